//! `mec_sync::fuzz_targets::ingest_records` under libFuzzer (what it checks is there).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| mec_sync::fuzz_targets::ingest_records(data));
