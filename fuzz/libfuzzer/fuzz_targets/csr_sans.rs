//! libFuzzer target `csr_sans`: see [`sigil_fuzz::csr_sans`] for what it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sigil_fuzz::csr_sans(data));
