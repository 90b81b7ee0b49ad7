//! `mec_sync::fuzz_targets::segment_scanner` under libFuzzer (what it checks is there).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| mec_sync::fuzz_targets::segment_scanner(data));
