//! libFuzzer target `csr`: see [`sigil_fuzz::csr`] for what it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sigil_fuzz::csr(data));
