//! libFuzzer target `bundle_json`: see [`sigil_fuzz::bundle_json`] for what it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sigil_fuzz::bundle_json(data));
