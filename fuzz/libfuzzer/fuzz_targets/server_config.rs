//! libFuzzer target `server_config`: see [`sigil_fuzz::server_config`] for what it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sigil_fuzz::server_config(data));
