//! libFuzzer target `federation_bundle`: see [`sigil_fuzz::federation_bundle`] for what it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sigil_fuzz::federation_bundle(data));
