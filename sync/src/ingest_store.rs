//! Where core-ingest keeps what it accepted: behind [`IngestStore`] so that
//! PostgreSQL can follow SQLite; [`SqliteStore`] is the default (embedded,
//! WAL mode).
//!
//! Schema (SQLite):
//! * `nodes(node_id PK, contiguous_seq, last_hash, duplicates, quarantined,
//!   first_seen_ms, last_seen_ms)`: the per-node cursor (kept forever: a
//!   node's high-water mark is never forgotten, so a duplicate is recognised
//!   however late it comes).
//! * `records(node_id, seq, …every UsageRecord field…, hash, signed,
//!   received_ms, PRIMARY KEY (node_id, seq))`: one row per record, the
//!   signed bytes kept for re-verification.
//! * `gaps(node_id, first_seq, last_seq)`: ranges the edge declared lost.
//! * `quarantine(id, node_id, seq, reason, signed, received_ms)`.
//!
//! A batch's verdicts are committed in one transaction, and the cursor moves
//! in the same transaction: dedup happens after the commit, never before.

use std::path::Path;

use rusqlite::{params, Connection, OptionalExtension};

use crate::ingest::{BatchVerdict, NodeCursor};

/// A store error.
#[derive(Debug, thiserror::Error)]
pub enum IngestStoreError {
    /// SQLite failed.
    #[error("ingest store: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// A seq the store cannot hold (SQLite integers are signed 64-bit):
    /// refused, never folded onto another seq.
    #[error("seq {0} is beyond what the store can hold (2^63 - 1)")]
    SeqOutOfRange(u64),
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

/// The store core-ingest writes to.
pub trait IngestStore {
    /// The node's cursor (a new one for a node never seen).
    fn cursor(&mut self, node_id: &str) -> Result<NodeCursor, IngestStoreError>;
    /// The body hashes the core holds for `node_id` at `seqs`: the stored
    /// record's first, then any forks kept there. Seqs with none are absent.
    fn known_hashes(
        &mut self,
        node_id: &str,
        seqs: &[u64],
    ) -> Result<crate::ingest::KnownHashes, IngestStoreError>;
    /// Commits a batch's verdicts and the cursor, in one transaction.
    fn commit(&mut self, verdict: &BatchVerdict, now_ms: i64) -> Result<(), IngestStoreError>;
    /// Per-node audit.
    fn audit(&mut self) -> Result<Vec<NodeAudit>, IngestStoreError>;
}

/// The SQLite store.
pub struct SqliteStore {
    conn: Connection,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS nodes (
    node_id        TEXT PRIMARY KEY,
    contiguous_seq INTEGER NOT NULL,
    last_hash      BLOB,
    duplicates     INTEGER NOT NULL DEFAULT 0,
    quarantined    INTEGER NOT NULL DEFAULT 0,
    first_seen_ms  INTEGER NOT NULL,
    last_seen_ms   INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS records (
    node_id              TEXT    NOT NULL,
    seq                  INTEGER NOT NULL,
    record_id            BLOB    NOT NULL,
    schema_version       INTEGER NOT NULL,
    key_id               TEXT    NOT NULL,
    imsi                 TEXT    NOT NULL,
    app_id               TEXT    NOT NULL,
    model_id             TEXT    NOT NULL,
    prompt_tokens        INTEGER NOT NULL,
    cached_prompt_tokens INTEGER NOT NULL,
    completion_tokens    INTEGER NOT NULL,
    reserved_tokens      INTEGER NOT NULL,
    billed_tokens        INTEGER NOT NULL,
    package_ids          TEXT    NOT NULL,
    debits               TEXT    NOT NULL,
    outcome              TEXT    NOT NULL,
    failure_reason       TEXT    NOT NULL,
    start_time_unix_ms   INTEGER NOT NULL,
    end_time_unix_ms     INTEGER NOT NULL,
    clock_sync           TEXT    NOT NULL,
    duration_us          INTEGER NOT NULL,
    ttft_us              INTEGER NOT NULL,
    offline              INTEGER NOT NULL,
    prev_hash            BLOB    NOT NULL,
    hash                 BLOB    NOT NULL,
    signed               BLOB    NOT NULL,
    received_ms          INTEGER NOT NULL,
    PRIMARY KEY (node_id, seq)
);
CREATE INDEX IF NOT EXISTS records_by_end ON records(end_time_unix_ms);
CREATE TABLE IF NOT EXISTS gaps (
    node_id   TEXT    NOT NULL,
    first_seq INTEGER NOT NULL,
    last_seq  INTEGER NOT NULL,
    PRIMARY KEY (node_id, first_seq)
);
CREATE TABLE IF NOT EXISTS quarantine (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    node_id     TEXT    NOT NULL,
    seq         INTEGER,
    reason      TEXT    NOT NULL,
    signed      BLOB    NOT NULL,
    received_ms INTEGER NOT NULL
);
";

/// Columns added since the first schema: (table, column, definition).
/// Added at open when missing, so a store made by an older core opens.
const ADDED_COLUMNS: [(&str, &str, &str); 3] = [
    // 'edge_salvaged' (the edge's log was damaged) or 'core_lost' (the core
    // had acknowledged them and no longer holds them).
    ("gaps", "reason", "TEXT NOT NULL DEFAULT 'edge_salvaged'"),
    // 'fault' (failed a check) or 'fork' (the node's own record at a seq
    // the core holds another record for).
    ("quarantine", "kind", "TEXT NOT NULL DEFAULT 'fault'"),
    // SHA-256 of `signed`: a resend of the same bytes is kept once.
    ("quarantine", "signed_hash", "BLOB"),
];

const INDEXES: &str = "
CREATE UNIQUE INDEX IF NOT EXISTS quarantine_once ON quarantine(node_id, signed_hash);
CREATE INDEX IF NOT EXISTS quarantine_by_seq ON quarantine(node_id, seq);
";

impl SqliteStore {
    /// Opens (creating) the store at `path`.
    pub fn open(path: &Path) -> Result<SqliteStore, IngestStoreError> {
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(SCHEMA)?;
        for (table, column, definition) in ADDED_COLUMNS {
            let has: bool = conn
                .prepare(&format!(
                    "SELECT 1 FROM pragma_table_info('{table}') WHERE name = ?1"
                ))?
                .exists([column])?;
            if !has {
                conn.execute_batch(&format!(
                    "ALTER TABLE {table} ADD COLUMN {column} {definition}"
                ))?;
            }
        }
        conn.execute_batch(INDEXES)?;
        Ok(SqliteStore { conn })
    }

    /// The connection, for read-only tools (export).
    pub fn connection(&self) -> &Connection {
        &self.conn
    }
}

/// A count for SQLite (counts beyond 2^63 - 1 do not happen; saturate).
fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// A seq for SQLite: never folded (two seqs above 2^63 - 1 must not become one).
fn seq_i64(seq: u64) -> Result<i64, IngestStoreError> {
    i64::try_from(seq).map_err(|_| IngestStoreError::SeqOutOfRange(seq))
}

impl IngestStore for SqliteStore {
    fn cursor(&mut self, node_id: &str) -> Result<NodeCursor, IngestStoreError> {
        let row: Option<(i64, Option<Vec<u8>>)> = self
            .conn
            .query_row(
                "SELECT contiguous_seq, last_hash FROM nodes WHERE node_id = ?1",
                [node_id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        Ok(match row {
            None => NodeCursor::new(node_id),
            Some((seq, hash)) => NodeCursor {
                node_id: node_id.to_string(),
                contiguous_seq: seq as u64,
                last_hash: hash.and_then(|h| h.try_into().ok()),
            },
        })
    }

    fn known_hashes(
        &mut self,
        node_id: &str,
        seqs: &[u64],
    ) -> Result<crate::ingest::KnownHashes, IngestStoreError> {
        let mut out = crate::ingest::KnownHashes::new();
        let mut stored = self
            .conn
            .prepare_cached("SELECT hash FROM records WHERE node_id = ?1 AND seq = ?2")?;
        let mut forks = self.conn.prepare_cached(
            "SELECT signed FROM quarantine WHERE node_id = ?1 AND seq = ?2 AND kind = 'fork'",
        )?;
        for &seq in seqs {
            let Ok(at) = i64::try_from(seq) else { continue };
            let mut hashes: Vec<[u8; 32]> = Vec::new();
            if let Some(h) = stored
                .query_row(params![node_id, at], |r| r.get::<_, Vec<u8>>(0))
                .optional()?
            {
                hashes.extend(<[u8; 32]>::try_from(h.as_slice()).ok());
            }
            let signed: Vec<Vec<u8>> = forks
                .query_map(params![node_id, at], |r| r.get(0))?
                .collect::<Result<_, _>>()?;
            hashes.extend(signed.iter().filter_map(|b| {
                crate::record::SignedRecord::from_bytes(b)
                    .ok()
                    .map(|s| crate::record::body_hash(&s.body))
            }));
            if !hashes.is_empty() {
                out.insert(seq, hashes);
            }
        }
        Ok(out)
    }

    fn commit(&mut self, v: &BatchVerdict, now_ms: i64) -> Result<(), IngestStoreError> {
        let tx = self.conn.transaction()?;
        let node = &v.cursor.node_id;
        tx.execute(
            "INSERT INTO nodes (node_id, contiguous_seq, last_hash, first_seen_ms, last_seen_ms)
             VALUES (?1, 0, NULL, ?2, ?2) ON CONFLICT(node_id) DO NOTHING",
            params![node, now_ms],
        )?;
        {
            let mut insert = tx.prepare_cached(
                "INSERT OR IGNORE INTO records (node_id, seq, record_id, schema_version, key_id, imsi,
                    app_id, model_id, prompt_tokens, cached_prompt_tokens, completion_tokens,
                    reserved_tokens, billed_tokens, package_ids, debits, outcome, failure_reason,
                    start_time_unix_ms, end_time_unix_ms, clock_sync, duration_us, ttft_us, offline,
                    prev_hash, hash, signed, received_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17,
                    ?18, ?19, ?20, ?21, ?22, ?23, ?24, ?25, ?26, ?27)",
            )?;
            for a in &v.accepted {
                let r = &a.record;
                let debits: Vec<serde_json::Value> = r
                    .debits
                    .iter()
                    .map(|d| serde_json::json!({"package_id": d.package_id, "tokens": d.tokens, "period": d.period}))
                    .collect();
                insert.execute(params![
                    node,
                    seq_i64(a.seq)?,
                    r.record_id,
                    r.schema_version,
                    r.key_id,
                    r.imsi,
                    r.app_id,
                    r.model_id,
                    to_i64(r.prompt_tokens),
                    to_i64(r.cached_prompt_tokens),
                    to_i64(r.completion_tokens),
                    to_i64(r.reserved_tokens),
                    to_i64(r.billed_tokens),
                    serde_json::to_string(&r.package_ids).unwrap_or_default(),
                    serde_json::Value::Array(debits).to_string(),
                    r.outcome().as_str_name(),
                    r.failure_reason,
                    r.start_time_unix_ms,
                    r.end_time_unix_ms,
                    r.clock_sync().as_str_name(),
                    to_i64(r.duration_us),
                    to_i64(r.ttft_us),
                    r.offline,
                    r.prev_hash,
                    a.hash.to_vec(),
                    a.signed,
                    now_ms
                ])?;
            }
        }
        for (ranges, reason) in [(&v.gaps, "edge_salvaged"), (&v.lost_by_core, "core_lost")] {
            for (first, last) in ranges {
                tx.execute(
                    "INSERT OR IGNORE INTO gaps (node_id, first_seq, last_seq, reason) VALUES (?1, ?2, ?3, ?4)",
                    params![node, seq_i64(*first)?, seq_i64(*last)?, reason],
                )?;
            }
        }
        // A resend of bytes already kept aside is not kept (nor counted) again.
        let mut quarantined = 0i64;
        for q in &v.quarantined {
            let seq = q.seq.map(seq_i64).transpose()?;
            quarantined += tx.execute(
                "INSERT OR IGNORE INTO quarantine (node_id, seq, reason, signed, received_ms, kind, signed_hash)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    node,
                    seq,
                    q.reason,
                    q.signed,
                    now_ms,
                    if q.fork { "fork" } else { "fault" },
                    crate::log::format::sha256(&q.signed).to_vec()
                ],
            )? as i64;
        }
        tx.execute(
            "UPDATE nodes SET contiguous_seq = MAX(contiguous_seq, ?2),
                 last_hash = CASE WHEN ?2 >= contiguous_seq THEN ?3 ELSE last_hash END,
                 duplicates = duplicates + ?4, quarantined = quarantined + ?5, last_seen_ms = ?6
             WHERE node_id = ?1",
            params![
                node,
                seq_i64(v.cursor.contiguous_seq)?,
                v.cursor.last_hash.map(|h| h.to_vec()),
                to_i64(v.duplicates),
                quarantined,
                now_ms
            ],
        )?;
        tx.commit()?;
        Ok(())
    }

    fn audit(&mut self) -> Result<Vec<NodeAudit>, IngestStoreError> {
        let nodes: Vec<(String, i64, i64, i64)> = {
            let mut stmt = self
                .conn
                .prepare("SELECT node_id, contiguous_seq, duplicates, quarantined FROM nodes ORDER BY node_id")?;
            let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?;
            rows.collect::<Result<_, _>>()?
        };
        let mut out = Vec::new();
        for (node_id, contiguous, duplicates, quarantined) in nodes {
            let (mut gaps, mut lost_by_core) = (Vec::new(), Vec::new());
            {
                let mut stmt = self.conn.prepare(
                    "SELECT first_seq, last_seq, reason FROM gaps WHERE node_id = ?1 ORDER BY first_seq",
                )?;
                let rows = stmt.query_map([&node_id], |r| {
                    Ok((
                        r.get::<_, i64>(0)? as u64,
                        r.get::<_, i64>(1)? as u64,
                        r.get::<_, String>(2)?,
                    ))
                })?;
                for row in rows {
                    let (first, last, reason) = row?;
                    match reason.as_str() {
                        "core_lost" => lost_by_core.push((first, last)),
                        _ => gaps.push((first, last)),
                    }
                }
            }
            // Forks: the body hashes kept at each seq besides the stored one.
            let mut fork_hashes: std::collections::HashMap<u64, Vec<Vec<u8>>> =
                std::collections::HashMap::new();
            {
                let mut stmt = self.conn.prepare(
                    "SELECT seq, signed FROM quarantine WHERE node_id = ?1 AND kind = 'fork' ORDER BY seq",
                )?;
                let rows = stmt.query_map([&node_id], |r| {
                    Ok((r.get::<_, i64>(0)? as u64, r.get::<_, Vec<u8>>(1)?))
                })?;
                for row in rows {
                    let (seq, signed) = row?;
                    if let Ok(s) = crate::record::SignedRecord::from_bytes(&signed) {
                        fork_hashes
                            .entry(seq)
                            .or_default()
                            .push(crate::record::body_hash(&s.body).to_vec());
                    }
                }
            }
            let mut forks: Vec<u64> = fork_hashes.keys().copied().collect();
            forks.sort_unstable();
            let all_gaps: Vec<(u64, u64)> = gaps.iter().chain(&lost_by_core).copied().collect();
            let quarantined_seqs: std::collections::HashSet<u64> = {
                let mut stmt = self
                    .conn
                    .prepare("SELECT seq FROM quarantine WHERE node_id = ?1 AND seq IS NOT NULL")?;
                let rows = stmt.query_map([&node_id], |r| Ok(r.get::<_, i64>(0)? as u64))?;
                rows.collect::<Result<_, _>>()?
            };
            // Walk the chain: each record's prev_hash is the previous record's
            // hash; across a declared gap or a quarantined record the link
            // cannot be checked here (ingestion checked it).
            let mut stmt = self.conn.prepare(
                "SELECT seq, prev_hash, hash FROM records WHERE node_id = ?1 ORDER BY seq",
            )?;
            let mut rows = stmt.query([&node_id])?;
            let (mut records, mut chain) = (0u64, "ok".to_string());
            let mut prev: Option<(u64, Vec<u8>)> = None;
            while let Some(row) = rows.next()? {
                let (seq, prev_hash, hash): (i64, Vec<u8>, Vec<u8>) =
                    (row.get(0)?, row.get(1)?, row.get(2)?);
                let seq = seq as u64;
                records += 1;
                let after_gap = all_gaps.iter().any(|g| g.1 + 1 == seq)
                    || quarantined_seqs.contains(&(seq - 1))
                    || prev.as_ref().is_some_and(|(p, _)| {
                        (p + 1..seq).all(|s| {
                            quarantined_seqs.contains(&s)
                                || all_gaps.iter().any(|g| g.0 <= s && s <= g.1)
                        })
                    });
                // After a fork the node's records chain to the fork.
                let to_fork = fork_hashes
                    .get(&(seq - 1))
                    .is_some_and(|hs| hs.contains(&prev_hash));
                let expected = match &prev {
                    Some((p, h)) if *p + 1 == seq => Some(h.clone()),
                    None if seq == 1 => Some(crate::record::GENESIS_HASH.to_vec()),
                    _ => None,
                };
                if chain == "ok" {
                    match expected {
                        Some(h) if h != prev_hash && !to_fork => {
                            chain = format!("broken at seq {seq}")
                        }
                        None if !after_gap => chain = format!("missing records before seq {seq}"),
                        _ => {}
                    }
                }
                prev = Some((seq, hash));
            }
            out.push(NodeAudit {
                node_id,
                records,
                contiguous_seq: contiguous as u64,
                gaps,
                lost_by_core,
                forks,
                quarantined: quarantined as u64,
                duplicates: duplicates as u64,
                chain,
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingest::{check_batch, test_chain as chain};
    use crate::wire::pb::Batch;
    use ed25519_dalek::SigningKey;

    fn verdict(
        node: &str,
        seqs: &[u64],
        quarantined: Vec<crate::ingest::Quarantined>,
    ) -> BatchVerdict {
        BatchVerdict {
            accepted: seqs
                .iter()
                .map(|&seq| crate::ingest::Accepted {
                    seq,
                    record: crate::record::UsageRecord {
                        seq,
                        node_id: node.into(),
                        ..Default::default()
                    },
                    signed: seq.to_be_bytes().to_vec(),
                    hash: [seq as u8; 32],
                })
                .collect(),
            duplicates: 0,
            quarantined,
            gaps: vec![],
            lost_by_core: vec![],
            forks: 0,
            deferred: 0,
            cursor: NodeCursor {
                node_id: node.into(),
                contiguous_seq: seqs.last().copied().unwrap_or(0),
                last_hash: None,
            },
        }
    }

    /// Two seqs above 2^63 - 1 must never become one row (SQLite integers
    /// are signed): the commit is refused instead.
    #[test]
    fn seqs_beyond_what_sqlite_holds_are_refused_never_folded() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = SqliteStore::open(&dir.path().join("c.sqlite")).unwrap();
        let big = i64::MAX as u64 + 5;
        let r = s.commit(&verdict("n1", &[big, big + 1], vec![]), 0);
        let rows: i64 = s
            .conn
            .query_row("SELECT COUNT(*) FROM records", [], |r| r.get(0))
            .unwrap();
        assert!(
            matches!(r, Err(IngestStoreError::SeqOutOfRange(_))),
            "{r:?}, {rows} rows"
        );
        assert_eq!(rows, 0);
    }

    /// An unreadable record resent again and again is kept aside once.
    #[test]
    fn a_resend_of_a_record_kept_aside_is_kept_once() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = SqliteStore::open(&dir.path().join("c.sqlite")).unwrap();
        let garbage = || crate::ingest::Quarantined {
            seq: None,
            reason: "undecodable record".into(),
            signed: b"not a record".to_vec(),
            fork: false,
        };
        for _ in 0..5 {
            s.commit(&verdict("n1", &[], vec![garbage()]), 0).unwrap();
        }
        let kept: i64 = s
            .conn
            .query_row("SELECT COUNT(*) FROM quarantine", [], |r| r.get(0))
            .unwrap();
        assert_eq!(kept, 1);
        assert_eq!(s.audit().unwrap()[0].quarantined, 1);
    }

    #[test]
    fn batches_commit_once_and_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("core.sqlite");
        let k = SigningKey::from_bytes(&[3; 32]);
        let recs = chain("edge-1", &k, 6);
        let mut s = SqliteStore::open(&path).unwrap();
        for part in [&recs[..4], &recs[2..6], &recs[..6]] {
            let cursor = s.cursor("edge-1").unwrap();
            let batch = Batch {
                batch_id: 1,
                records: part.to_vec(),
                lost: vec![],
            };
            let known = s.known_hashes("n1", &[cursor.contiguous_seq]).unwrap();
            let v = check_batch(&cursor, &k.verifying_key(), &batch, &known);
            s.commit(&v, 0).unwrap();
        }
        drop(s);
        let mut s = SqliteStore::open(&path).unwrap();
        assert_eq!(s.cursor("edge-1").unwrap().contiguous_seq, 6);
        let audit = s.audit().unwrap();
        assert_eq!(audit.len(), 1);
        let a = &audit[0];
        assert_eq!((a.records, a.contiguous_seq, a.duplicates), (6, 6, 2 + 6));
        assert_eq!(a.chain, "ok");
        assert!(a.gaps.is_empty());
        let billed: i64 = s
            .connection()
            .query_row("SELECT SUM(billed_tokens) FROM records", [], |r| r.get(0))
            .unwrap();
        assert_eq!(billed, (1..=6).map(|s| 7 + s).sum::<i64>());
    }
}
