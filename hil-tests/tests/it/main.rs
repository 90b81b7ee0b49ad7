//! The integration tests of hil-tests: end-to-end tests over real processes (the image's QEMU tests and the GPU scenario are here too, ignored by a plain `cargo test`).
//!
//! One test binary per crate (one link of the whole stack instead of one
//! per file, as rust-analyzer and matklad's "Delete Cargo Integration
//! Tests" advise); each file is a module, and a test's name is
//! `<file>::<test>`.

mod e2e;
mod gpu;
mod image_boot;
mod image_update;
mod log_kill;
mod packages;
