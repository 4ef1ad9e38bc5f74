//! libFuzzer target `forwarder_config`: see [`sigil_fuzz::forwarder_config`] for what it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sigil_fuzz::forwarder_config(data));
