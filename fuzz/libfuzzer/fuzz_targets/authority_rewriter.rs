//! libFuzzer target `authority_rewriter`: see [`sigil_fuzz::authority_rewriter`] for what it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sigil_fuzz::authority_rewriter(data));
