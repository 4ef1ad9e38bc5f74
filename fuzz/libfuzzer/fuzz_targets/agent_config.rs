//! libFuzzer target `agent_config`: see [`sigil_fuzz::agent_config`] for what it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sigil_fuzz::agent_config(data));
