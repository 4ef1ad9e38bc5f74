//! libFuzzer target `jwt_svid`: see [`sigil_fuzz::jwt_svid`] for what it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sigil_fuzz::jwt_svid(data));
