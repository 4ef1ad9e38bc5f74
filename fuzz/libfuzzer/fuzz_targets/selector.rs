//! libFuzzer target `selector`: see [`sigil_fuzz::selector`] for what it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sigil_fuzz::selector(data));
