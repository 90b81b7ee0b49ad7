//! The integration tests of sync: the usage log, its crash states and the sync over loopback QUIC.
//!
//! One test binary per crate (one link of the whole stack instead of one
//! per file, as rust-analyzer and matklad's "Delete Cargo Integration
//! Tests" advise); each file is a module, and a test's name is
//! `<file>::<test>`.

mod common;

mod charging_suite;
mod core_ingest_cli;
mod downlink;
mod faults;
mod fuzz_smoke;
mod log_backends;
mod log_crash_states;
mod log_faults;
mod log_full;
mod log_properties;
mod store_suite;
mod upload_e2e;
mod upload_positions;
