//! Usage records and their journey from the edge box to core billing.
//!
//! This crate owns the billing contract ([`record`], compiled from
//! `proto/usage.proto`), the node's signing identity ([`identity`]) and the
//! durable, signed, hash-chained usage log ([`log`]); the upload protocol
//! ([`wire`], [`upload`], [`uploader`]) and the `core-ingest` side
//! ([`ingest`], [`ingest_store`], [`core_server`], [`core_ingest`]).
//!
//! It knows nothing of HTTP, plans or models: the agent hands it a finished
//! [`record::UsageRecord`] and gets back a sequence number once the record is
//! durable.
#![warn(missing_docs)]

// The node's identity and PKI live in `mec-node` (provisioning uses them
// without this crate); re-exported under their old paths.
pub use mec_node::{identity, pki};

#[doc(hidden)]
pub mod bench_grants;
pub mod charging_store;
pub mod core_ingest;
pub mod core_packages;
pub mod core_server;
pub mod downlink;
#[doc(hidden)]
pub mod fuzz_targets;
pub mod ingest;
pub mod ingest_store;
pub mod log;
pub mod quic;
pub mod record;
pub mod upload;
pub mod uploader;
pub mod wire;
