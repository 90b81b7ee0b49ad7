//! Where core-ingest keeps what it accepted, behind [`IngestStore`]: the
//! embedded default [`SqliteStore`] (one file, WAL mode: a lab, a small
//! site) or [`PgStore`] (PostgreSQL: several core-ingest instances against
//! one database, for an operator). `store = "..."` in the configuration
//! picks one ([`StoreLocation`]).
//!
//! The contract both keep:
//! * A batch is placed against the node's cursor and its verdicts and the
//!   new cursor are committed in one transaction ([`IngestStore::ingest`]),
//!   with the cursor locked from the read to the commit. Two instances
//!   committing batches of the same node at once serialise on that lock:
//!   the second reads the cursor the first left, so a seq is never stored
//!   twice and the cursor never moves past a gap.
//! * Exactly once rests on a unique key on (node id, seq) in the store;
//!   a resend with another body at a stored seq is a fork, kept aside.
//! * What is acknowledged is committed (durable) first.
//!
//! Tables (the same in both; PostgreSQL's `records` is partitioned by time,
//! with the unique key in `record_keys`, see [`postgres`]):
//! * `nodes(node_id PK, contiguous_seq, last_hash, duplicates, quarantined,
//!   first_seen_ms, last_seen_ms)`: the per-node cursor (kept forever: a
//!   node's high-water mark is never forgotten, so a duplicate is recognised
//!   however late it comes).
//! * `records(node_id, seq, …every UsageRecord field…, hash, signed,
//!   received_ms)`: one row per record, the signed bytes kept for
//!   re-verification.
//! * `gaps(node_id, first_seq, last_seq, reason)`: ranges declared lost.
//! * `quarantine(id, node_id, seq, reason, signed, received_ms, kind,
//!   signed_hash)`: records kept aside (faults and forks).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::ingest::{BatchVerdict, CheckedBatch, KnownHashes, NodeCursor};

pub mod pg_tls;
pub mod postgres;
mod sqlite;

pub use postgres::{PgOptions, PgStore};
pub use sqlite::SqliteStore;

/// A store error.
#[derive(Debug, thiserror::Error)]
pub enum IngestStoreError {
    /// SQLite failed.
    #[error("ingest store: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// PostgreSQL failed (the message never carries the password).
    #[error("ingest store (PostgreSQL): {0}")]
    Postgres(String),
    /// The database user lacks a right the core needs.
    #[error("ingest store (PostgreSQL): the database user {user:?} lacks a right: {detail}")]
    Privilege {
        /// The user.
        user: String,
        /// PostgreSQL's message, which names the object.
        detail: String,
    },
    /// The database holds a newer schema than this binary knows.
    #[error(
        "ingest store: the database's schema is version {found}; this core-ingest knows up to \
         {known} (upgrade core-ingest)"
    )]
    NewerSchema {
        /// In the database.
        found: i32,
        /// In this binary.
        known: i32,
    },
    /// A seq the store cannot hold (signed 64-bit integers in both engines):
    /// refused, never folded onto another seq.
    #[error("seq {0} is beyond what the store can hold (2^63 - 1)")]
    SeqOutOfRange(u64),
    /// Writing an export failed.
    #[error("writing the export: {0}")]
    Io(std::io::Error),
    /// A store location that names no store.
    #[error("store {0:?}: {1}")]
    Location(String, String),
}

impl From<std::io::Error> for IngestStoreError {
    fn from(e: std::io::Error) -> Self {
        // Named in the message, not chained as a source too (it would
        // print twice).
        IngestStoreError::Io(e)
    }
}

/// What `core-ingest audit` reports per node.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NodeAudit {
    /// Node id.
    pub node_id: String,
    /// Records stored.
    pub records: u64,
    /// Every seq at or below this is stored or declared lost.
    pub contiguous_seq: u64,
    /// Ranges the edge declared lost (salvaged from damage), inclusive.
    pub gaps: Vec<(u64, u64)>,
    /// Ranges the core had acknowledged and no longer holds (restored from
    /// a backup) that the edge had already deleted, inclusive.
    pub lost_by_core: Vec<(u64, u64)>,
    /// Seqs at which the node sent a record other than the one stored
    /// (a box restored from a snapshot): both are kept.
    pub forks: Vec<u64>,
    /// Records quarantined.
    pub quarantined: u64,
    /// Duplicates received (ignored).
    pub duplicates: u64,
    /// "ok" when every stored record chains to the one before it (across
    /// declared gaps the chain restarts), else the first break.
    pub chain: String,
}

/// A value of an exported row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExportValue {
    /// An integer column.
    Int(i64),
    /// A text column.
    Text(String),
    /// SQL NULL.
    Null,
}

/// Which records `export` reads: end time in `[from_ms, to_ms)`, one row
/// each ([`RECORD_COLUMNS`]) or summed per IMSI per UTC day
/// ([`DAY_COLUMNS`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportQuery {
    /// Inclusive, Unix ms.
    pub from_ms: i64,
    /// Exclusive, Unix ms.
    pub to_ms: i64,
    /// Sums per IMSI per day instead of records.
    pub by_imsi_day: bool,
}

/// The columns of an exported record, in order.
pub const RECORD_COLUMNS: [&str; 22] = [
    "node_id",
    "seq",
    "record_id",
    "imsi",
    "app_id",
    "model_id",
    "prompt_tokens",
    "cached_prompt_tokens",
    "completion_tokens",
    "billed_tokens",
    "outcome",
    "failure_reason",
    "start_time_unix_ms",
    "end_time_unix_ms",
    "package_ids",
    // 1 when the box served it cut off from the core (issue 23).
    "offline",
    // What the request asked (issue 24): its choices (`n`; 0 before the
    // field), the output constraint, the app's end-user id.
    "choices",
    "constraint",
    "end_user",
    // Rating (issue 25): the package units charged (billed_tokens for
    // records from before rating), the rate table's version (0: none) and
    // its SHA-256, hex.
    "billed_units",
    "rate_version",
    "rate_digest",
];

/// The columns of an export summed per IMSI per day, in order.
pub const DAY_COLUMNS: [&str; 8] = [
    "imsi",
    "day",
    "records",
    "prompt_tokens",
    "cached_prompt_tokens",
    "completion_tokens",
    "billed_tokens",
    "billed_units",
];

/// A stored record as a copy of the store reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRecord {
    /// Its seq.
    pub seq: u64,
    /// The signed bytes as the node sent them.
    pub signed: Vec<u8>,
    /// When the core committed it (Unix ms).
    pub received_ms: i64,
}

/// A record kept aside (a fault or a fork), as a copy reads and writes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeptAside {
    /// Its seq when it could be read.
    pub seq: Option<u64>,
    /// Why it was kept aside.
    pub reason: String,
    /// The bytes as received.
    pub signed: Vec<u8>,
    /// When (Unix ms).
    pub received_ms: i64,
    /// A fork (the node's own record at a seq the core holds another for).
    pub fork: bool,
}

/// Receives exported rows one at a time (exports stream: nothing holds a
/// day of records in memory).
pub type RowSink<'a> = dyn FnMut(&[ExportValue]) -> std::io::Result<()> + 'a;

/// The store core-ingest writes to. Shared by every connection of an
/// instance (`&self`); each engine keeps its own connections.
pub trait IngestStore: Send + Sync {
    /// Where it is, for logs and `/readyz` (never with a password).
    fn describe(&self) -> String;
    /// The node's cursor and the body hash of the record stored at it
    /// (none at 0), for the hello that tells a node where the core stands.
    fn position(&self, node_id: &str) -> Result<(NodeCursor, Option<[u8; 32]>), IngestStoreError>;
    /// Places `checked` against the node's cursor ([`crate::ingest::walk`]) and commits the
    /// verdicts and the new cursor in one transaction, the cursor locked
    /// from its read to the commit. Returns the committed verdicts.
    fn ingest(
        &self,
        node_id: &str,
        checked: CheckedBatch,
        now_ms: i64,
    ) -> Result<BatchVerdict, IngestStoreError>;
    /// Per-node audit.
    fn audit(&self) -> Result<Vec<NodeAudit>, IngestStoreError>;
    /// Streams the rows `query` selects to `sink`, in (node, seq) or (IMSI,
    /// day) order; returns how many.
    fn export(&self, query: &ExportQuery, sink: &mut RowSink<'_>) -> Result<u64, IngestStoreError>;
    /// Whether the store answers and its schema is current (`/readyz`).
    fn check_ready(&self) -> Result<(), IngestStoreError>;
    /// Periodic upkeep (`serve` runs it daily): PostgreSQL makes the coming
    /// months' partitions. Nothing by default.
    fn maintain(&self) -> Result<(), IngestStoreError> {
        Ok(())
    }

    // What a copy of the store to another (`core-ingest copy-store`) reads
    // and writes beyond `ingest`.

    /// True when the store holds no node.
    fn is_empty(&self) -> Result<bool, IngestStoreError>;
    /// The public keys the node's signatures were checked with.
    fn node_keys(&self, node_id: &str) -> Result<Vec<[u8; 32]>, IngestStoreError>;
    /// Up to `limit` stored records of the node after `after_seq`, in seq order.
    fn records_after(
        &self,
        node_id: &str,
        after_seq: u64,
        limit: usize,
    ) -> Result<Vec<StoredRecord>, IngestStoreError>;
    /// The node's records kept aside.
    fn kept_aside(&self, node_id: &str) -> Result<Vec<KeptAside>, IngestStoreError>;
    /// Keeps `rows` aside for the node (a copy's; one already kept is kept once).
    fn restore_kept_aside(&self, node_id: &str, rows: &[KeptAside])
        -> Result<(), IngestStoreError>;
}

/// `row` as a verdict that only keeps it aside, at `cursor` (which it
/// leaves where it is).
pub(crate) fn aside_only(cursor: NodeCursor, row: &KeptAside) -> BatchVerdict {
    BatchVerdict {
        accepted: vec![],
        duplicates: 0,
        quarantined: vec![crate::ingest::Quarantined {
            seq: row.seq,
            reason: row.reason.clone(),
            signed: row.signed.clone(),
            fork: row.fork,
        }],
        gaps: vec![],
        lost_by_core: vec![],
        forks: 0,
        deferred: 0,
        cursor,
    }
}

/// Where the store is, as the configuration's `store` names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreLocation {
    /// `sqlite:PATH` or a bare path: the embedded store.
    Sqlite(PathBuf),
    /// `postgres://...` or `postgresql://...` (or `postgres:` alone, for
    /// everything from the standard `PG*` variables).
    Postgres(String),
}

impl StoreLocation {
    /// Reads `text`; a relative SQLite path is taken from `base`.
    pub fn parse(text: &str, base: &Path) -> Result<StoreLocation, IngestStoreError> {
        let t = text.trim();
        if t.is_empty() {
            return Err(IngestStoreError::Location(
                text.into(),
                "empty: a path, sqlite:PATH or postgres://...".into(),
            ));
        }
        if t.starts_with("postgres://")
            || t.starts_with("postgresql://")
            || t == "postgres:"
            || t == "postgresql:"
        {
            return Ok(StoreLocation::Postgres(t.to_string()));
        }
        let path = Path::new(t.strip_prefix("sqlite:").unwrap_or(t));
        if path.as_os_str().is_empty() {
            return Err(IngestStoreError::Location(
                text.into(),
                "sqlite: needs a path".into(),
            ));
        }
        Ok(StoreLocation::Sqlite(if path.is_relative() {
            base.join(path)
        } else {
            path.to_path_buf()
        }))
    }

    /// Opens the store (migrating a PostgreSQL schema to this binary's).
    pub fn open(&self, pg: &PgOptions) -> Result<Arc<dyn IngestStore>, IngestStoreError> {
        Ok(match self {
            StoreLocation::Sqlite(p) => Arc::new(SqliteStore::open(p)?),
            StoreLocation::Postgres(url) => Arc::new(PgStore::connect(url, pg)?),
        })
    }

    /// The same store, for its packages and grants.
    pub fn open_charging(
        &self,
        pg: &PgOptions,
    ) -> Result<Arc<dyn crate::charging_store::ChargingStore>, IngestStoreError> {
        Ok(self.open_core(pg)?.1)
    }

    /// One handle (one connection, one PostgreSQL pool) seen as both the
    /// upload's store and the packages' store: what `serve` uses.
    #[allow(clippy::type_complexity)]
    pub fn open_core(
        &self,
        pg: &PgOptions,
    ) -> Result<
        (
            Arc<dyn IngestStore>,
            Arc<dyn crate::charging_store::ChargingStore>,
        ),
        IngestStoreError,
    > {
        Ok(match self {
            StoreLocation::Sqlite(p) => {
                let s = Arc::new(SqliteStore::open(p)?);
                (s.clone(), s)
            }
            StoreLocation::Postgres(url) => {
                let s = Arc::new(PgStore::connect(url, pg)?);
                (s.clone(), s)
            }
        })
    }
}

/// A count for the store (counts beyond 2^63 - 1 do not happen; saturate).
pub(crate) fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// A seq for the store: never folded (two seqs above 2^63 - 1 must not become one).
pub(crate) fn seq_i64(seq: u64) -> Result<i64, IngestStoreError> {
    i64::try_from(seq).map_err(|_| IngestStoreError::SeqOutOfRange(seq))
}

/// The seqs whose stored hashes `walk` needs: the batch's resends (at or
/// below the cursor) and the cursor's own.
pub(crate) fn seqs_to_look_up(cursor: &NodeCursor, checked: &CheckedBatch) -> Vec<u64> {
    let mut seqs = checked.seqs_at_or_below(cursor.contiguous_seq);
    seqs.push(cursor.contiguous_seq);
    seqs
}

/// The hash of the record stored at the cursor (not a fork's; none at 0):
/// what the hello tells the node.
pub(crate) fn stored_at(cursor: &NodeCursor, known: &KnownHashes) -> Option<[u8; 32]> {
    known
        .get(&cursor.contiguous_seq)
        .and_then(|h| h.first().copied())
        .filter(|_| cursor.contiguous_seq > 0)
}

/// The stored hash first, then the forks' (their body hashes, from the
/// signed bytes kept aside).
pub(crate) fn known_from(stored: Vec<(u64, Vec<u8>)>, forks: Vec<(u64, Vec<u8>)>) -> KnownHashes {
    let mut out = KnownHashes::new();
    for (seq, h) in stored {
        if let Ok(h) = <[u8; 32]>::try_from(h.as_slice()) {
            out.entry(seq).or_default().insert(0, h);
        }
    }
    for (seq, signed) in forks {
        if let Ok(s) = crate::record::SignedRecord::from_bytes(&signed) {
            out.entry(seq)
                .or_default()
                .push(crate::record::body_hash(&s.body));
        }
    }
    out
}

/// The debits of a record as the store keeps them (JSON).
pub(crate) fn debits_json(r: &crate::record::UsageRecord) -> String {
    let debits: Vec<serde_json::Value> = r
        .debits
        .iter()
        .map(|d| serde_json::json!({"package_id": d.package_id, "tokens": d.tokens, "period": d.period, "grant_id": d.grant_id}))
        .collect();
    serde_json::Value::Array(debits).to_string()
}

/// What the audit reads of one node besides its records, whatever the store.
#[derive(Debug, Default)]
pub(crate) struct NodeFacts {
    pub node_id: String,
    pub contiguous_seq: u64,
    pub duplicates: u64,
    pub quarantined: u64,
    /// `(first, last, reason)`.
    pub gaps: Vec<(u64, u64, String)>,
    /// `(seq, signed)` of the forks kept aside.
    pub forks: Vec<(u64, Vec<u8>)>,
    /// Seqs of records kept aside (faults and forks).
    pub quarantined_seqs: HashSet<u64>,
}

/// Walks a node's stored records in seq order and checks the chain: each
/// record's `prev_hash` is the previous record's hash; across a declared gap
/// or a record kept aside the link cannot be checked here (ingestion did).
pub(crate) struct ChainAudit {
    facts: NodeFacts,
    fork_hashes: HashMap<u64, Vec<Vec<u8>>>,
    all_gaps: Vec<(u64, u64)>,
    records: u64,
    chain: String,
    prev: Option<(u64, Vec<u8>)>,
}

impl ChainAudit {
    pub(crate) fn new(facts: NodeFacts) -> ChainAudit {
        let mut fork_hashes: HashMap<u64, Vec<Vec<u8>>> = HashMap::new();
        for (seq, signed) in &facts.forks {
            if let Ok(s) = crate::record::SignedRecord::from_bytes(signed) {
                fork_hashes
                    .entry(*seq)
                    .or_default()
                    .push(crate::record::body_hash(&s.body).to_vec());
            }
        }
        let all_gaps = facts.gaps.iter().map(|(f, l, _)| (*f, *l)).collect();
        ChainAudit {
            facts,
            fork_hashes,
            all_gaps,
            records: 0,
            chain: "ok".into(),
            prev: None,
        }
    }

    /// The next stored record, in seq order.
    pub(crate) fn push(&mut self, seq: u64, prev_hash: Vec<u8>, hash: Vec<u8>) {
        self.records += 1;
        let (gaps, quarantined) = (&self.all_gaps, &self.facts.quarantined_seqs);
        let after_gap = gaps.iter().any(|g| g.1 + 1 == seq)
            || quarantined.contains(&(seq - 1))
            || self.prev.as_ref().is_some_and(|(p, _)| {
                (p + 1..seq)
                    .all(|s| quarantined.contains(&s) || gaps.iter().any(|g| g.0 <= s && s <= g.1))
            });
        // After a fork the node's records chain to the fork.
        let to_fork = self
            .fork_hashes
            .get(&(seq - 1))
            .is_some_and(|hs| hs.contains(&prev_hash));
        let expected = match &self.prev {
            Some((p, h)) if *p + 1 == seq => Some(h.clone()),
            None if seq == 1 => Some(crate::record::GENESIS_HASH.to_vec()),
            _ => None,
        };
        if self.chain == "ok" {
            match expected {
                Some(h) if h != prev_hash && !to_fork => {
                    self.chain = format!("broken at seq {seq}")
                }
                None if !after_gap => self.chain = format!("missing records before seq {seq}"),
                _ => {}
            }
        }
        self.prev = Some((seq, hash));
    }

    pub(crate) fn finish(self) -> NodeAudit {
        let (mut gaps, mut lost_by_core) = (Vec::new(), Vec::new());
        for (first, last, reason) in self.facts.gaps {
            match reason.as_str() {
                "core_lost" => lost_by_core.push((first, last)),
                _ => gaps.push((first, last)),
            }
        }
        let mut forks: Vec<u64> = self.fork_hashes.keys().copied().collect();
        forks.sort_unstable();
        NodeAudit {
            node_id: self.facts.node_id,
            records: self.records,
            contiguous_seq: self.facts.contiguous_seq,
            gaps,
            lost_by_core,
            forks,
            quarantined: self.facts.quarantined,
            duplicates: self.facts.duplicates,
            chain: self.chain,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_locations_are_read_as_written() {
        let base = Path::new("/etc/core");
        let sqlite = |p: &str| StoreLocation::Sqlite(PathBuf::from(p));
        assert_eq!(
            StoreLocation::parse("core.sqlite", base).unwrap(),
            sqlite("/etc/core/core.sqlite")
        );
        assert_eq!(
            StoreLocation::parse("sqlite:/var/core.db", base).unwrap(),
            sqlite("/var/core.db")
        );
        assert_eq!(
            StoreLocation::parse("postgres://core@db.example/usage", base).unwrap(),
            StoreLocation::Postgres("postgres://core@db.example/usage".into())
        );
        assert_eq!(
            StoreLocation::parse("postgres:", base).unwrap(),
            StoreLocation::Postgres("postgres:".into())
        );
        for bad in ["", "sqlite:", "  "] {
            assert!(StoreLocation::parse(bad, base).is_err(), "{bad:?}");
        }
    }
}
