//! Token packages per subscriber, as a phone plan sells them.
//!
//! * [`charging`]: the core's charging function, sans-IO: packages sold
//!   centrally, slices of their balance granted to boxes, usage records
//!   settled once, overage counted.
//! * [`grants`]: the box's side of the core's grants, sans-IO: which
//!   downlink messages are new, which buckets a request may take from,
//!   when to ask the core for more.
//! * [`imsi`]: the subscriber identity, validated.
//! * [`ledger`]: the quota ledger, sans-IO (time is an argument): buckets of
//!   tokens with validity windows, reservations before generation, settlement
//!   of the actual tokens after it, debits nearest-expiry first.
//! * [`ratelimit`]: token-bucket rate limits per key, sans-IO.
//! * [`rating`]: the operator's signed rate table (package units per token
//!   of each model), sans-IO, and the arithmetic from tokens to units.
//! * [`store`]: the ledger's buckets and applied debits in SQLite.
//!
//! The usage log (mec-sync) is the source of truth for debits: every debit
//! is carried by a signed usage record, and the store marks which records it
//! has applied, so after a crash the agent re-applies the records the store
//! missed (see `store`).
#![warn(missing_docs)]

pub mod charging;
pub mod grants;
pub mod imsi;
pub mod ledger;
pub mod ratelimit;
pub mod rating;
pub mod store;

pub use imsi::{Imsi, ImsiError};
pub use ledger::{
    Balance, Bucket, BucketKind, BucketView, Debit, Ledger, LedgerError, Reservation, Timestamp,
};
