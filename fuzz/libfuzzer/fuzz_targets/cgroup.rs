//! libFuzzer target `cgroup`: see [`sigil_fuzz::cgroup`] for what it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sigil_fuzz::cgroup(data));
