//! libFuzzer target `spiffe_id`: see [`sigil_fuzz::spiffe_id`] for what it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sigil_fuzz::spiffe_id(data));
