//! The integration tests of edge-agent: the edge agent: its binary's commands and the MEC API over real processes.
//!
//! One test binary per crate (one link of the whole stack instead of one
//! per file, as rust-analyzer and matklad's "Delete Cargo Integration
//! Tests" advise); each file is a module, and a test's name is
//! `<file>::<test>`.

mod common;

mod api;
mod crash;
mod fuzz_smoke;
mod generate_cli;
mod log_cli;
mod models;
mod openai_client;
mod provision_listen;
mod rating;
mod site;
mod sync;
mod systemd;
mod update_api;
