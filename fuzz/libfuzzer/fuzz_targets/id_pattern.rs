//! libFuzzer target `id_pattern`: see [`sigil_fuzz::id_pattern`] for what it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sigil_fuzz::id_pattern(data));
