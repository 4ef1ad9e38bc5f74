//! libFuzzer target `path_normalize`: see [`sigil_fuzz::path_normalize`] for what it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sigil_fuzz::path_normalize(data));
