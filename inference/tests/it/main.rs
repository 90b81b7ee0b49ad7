//! The integration tests of inference: the inference runtime, on the real model.
//!
//! One test binary per crate (one link of the whole stack instead of one
//! per file, as rust-analyzer and matklad's "Delete Cargo Integration
//! Tests" advise); each file is a module, and a test's name is
//! `<file>::<test>`.

mod engine;
mod model;
mod paged;
mod requantize;
mod synthetic;
mod tokenizer;
