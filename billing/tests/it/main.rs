//! The integration tests of billing: the review's broken promises, one test
//! each, and a model-based test of billing against a trivially correct
//! model, all over a real usage log, a real SQLite store and a real tally file.

mod common;

mod core_grants;
mod defects;
mod model;
mod rating;
