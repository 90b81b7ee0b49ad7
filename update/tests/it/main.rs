//! The integration tests of update: signed A/B update bundles applied to a box laid out in a directory.
//!
//! One test binary per crate (one link of the whole stack instead of one
//! per file, as rust-analyzer and matklad's "Delete Cargo Integration
//! Tests" advise); each file is a module, and a test's name is
//! `<file>::<test>`.

mod apply;
