//! libFuzzer target `certificate`: see [`sigil_fuzz::certificate`] for what it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sigil_fuzz::certificate(data));
