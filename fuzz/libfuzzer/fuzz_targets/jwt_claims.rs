//! libFuzzer target `jwt_claims`: see [`sigil_fuzz::jwt_claims`] for what it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sigil_fuzz::jwt_claims(data));
