//! The integration tests of provisioning: the serial provisioning protocol over real pseudo-terminals, and flashing.
//!
//! One test binary per crate (one link of the whole stack instead of one
//! per file, as rust-analyzer and matklad's "Delete Cargo Integration
//! Tests" advise); each file is a module, and a test's name is
//! `<file>::<test>`.

mod common;

mod device;
mod flash;
mod pty_line;
