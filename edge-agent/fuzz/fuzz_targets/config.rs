//! `edge_agent::fuzz_targets::config` under libFuzzer (what it checks is there).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| edge_agent::fuzz_targets::config(data));
