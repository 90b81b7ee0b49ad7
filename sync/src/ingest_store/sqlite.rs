//! The embedded store: one SQLite file in WAL mode, for a lab or a small
//! site. One connection behind a mutex; a batch's transaction is `BEGIN
//! IMMEDIATE`, so it holds SQLite's write lock from the cursor read to the
//! commit (which also serialises two processes sharing the file).

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

use super::{
    aside_only, debits_json, known_from, seq_i64, seqs_to_look_up, stored_at, to_i64, ChainAudit,
    ExportQuery, ExportValue, IngestStore, IngestStoreError, KeptAside, NodeAudit, NodeFacts,
    RowSink, StoredRecord,
};
use crate::ingest::{walk, BatchVerdict, CheckedBatch, KnownHashes, NodeCursor};

mod charging;

/// The SQLite store.
pub struct SqliteStore {
    conn: Mutex<Connection>,
    path: PathBuf,
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
CREATE TABLE IF NOT EXISTS node_keys (
    node_id       TEXT    NOT NULL,
    public_key    BLOB    NOT NULL,
    first_seen_ms INTEGER NOT NULL,
    PRIMARY KEY (node_id, public_key)
);
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
const ADDED_COLUMNS: [(&str, &str, &str); 9] = [
    // 'edge_salvaged' (the edge's log was damaged) or 'core_lost' (the core
    // had acknowledged them and no longer holds them).
    ("gaps", "reason", "TEXT NOT NULL DEFAULT 'edge_salvaged'"),
    // 'fault' (failed a check) or 'fork' (the node's own record at a seq
    // the core holds another record for).
    ("quarantine", "kind", "TEXT NOT NULL DEFAULT 'fault'"),
    // SHA-256 of `signed`: a resend of the same bytes is kept once.
    ("quarantine", "signed_hash", "BLOB"),
    // What the request asked (issue 24): the app's end user, the choices
    // (0 for records from before), the output constraint.
    ("records", "end_user", "TEXT NOT NULL DEFAULT ''"),
    ("records", "choices", "INTEGER NOT NULL DEFAULT 0"),
    ("records", "output_constraint", "TEXT NOT NULL DEFAULT ''"),
    // Rating (issue 25): the units charged (0 for records from before: read
    // billed_tokens), the rate table's version and digest.
    ("records", "billed_units", "INTEGER NOT NULL DEFAULT 0"),
    ("records", "rate_version", "INTEGER NOT NULL DEFAULT 0"),
    ("records", "rate_digest", "BLOB NOT NULL DEFAULT x''"),
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
        add_missing_columns(&conn, &ADDED_COLUMNS)?;
        conn.execute_batch(INDEXES)?;
        // A store made before settlement existed: its nodes' records are
        // settled up to where they are now (what they uploaded before was
        // never meant to be settled against packages sold at the core).
        let settling_is_new = !conn
            .prepare("SELECT 1 FROM sqlite_master WHERE name = 'charging_settled_through'")?
            .exists([])?;
        conn.execute_batch(charging::SCHEMA)?;
        if settling_is_new {
            conn.execute(
                "INSERT OR IGNORE INTO charging_settled_through (node_id, seq)
                 SELECT node_id, contiguous_seq FROM nodes",
                [],
            )?;
        }
        add_missing_columns(&conn, &charging::ADDED_COLUMNS)?;
        conn.execute_batch(charging::INDEXES)?;
        Ok(SqliteStore {
            conn: Mutex::new(conn),
            path: path.to_path_buf(),
        })
    }

    /// The connection, for read-only tools and tests.
    pub fn connection(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Adds the `(table, column, definition)` columns a table made by an older
/// core lacks.
fn add_missing_columns(
    conn: &Connection,
    columns: &[(&str, &str, &str)],
) -> Result<(), IngestStoreError> {
    for (table, column, definition) in columns {
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
    Ok(())
}

fn cursor(conn: &Connection, node_id: &str) -> Result<NodeCursor, IngestStoreError> {
    let row: Option<(i64, Option<Vec<u8>>)> = conn
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
    conn: &Connection,
    node_id: &str,
    seqs: &[u64],
) -> Result<KnownHashes, IngestStoreError> {
    let mut stored =
        conn.prepare_cached("SELECT hash FROM records WHERE node_id = ?1 AND seq = ?2")?;
    let mut forks = conn.prepare_cached(
        "SELECT signed FROM quarantine WHERE node_id = ?1 AND seq = ?2 AND kind = 'fork'",
    )?;
    let (mut hashes, mut signed) = (Vec::new(), Vec::new());
    for &seq in seqs {
        let Ok(at) = i64::try_from(seq) else { continue };
        if let Some(h) = stored
            .query_row(params![node_id, at], |r| r.get::<_, Vec<u8>>(0))
            .optional()?
        {
            hashes.push((seq, h));
        }
        for s in forks.query_map(params![node_id, at], |r| r.get::<_, Vec<u8>>(0))? {
            signed.push((seq, s?));
        }
    }
    Ok(known_from(hashes, signed))
}

/// Writes a batch's verdicts and moves the cursor (inside the caller's
/// transaction).
fn commit(conn: &Connection, v: &BatchVerdict, now_ms: i64) -> Result<(), IngestStoreError> {
    let node = &v.cursor.node_id;
    conn.execute(
        "INSERT INTO nodes (node_id, contiguous_seq, last_hash, first_seen_ms, last_seen_ms)
         VALUES (?1, 0, NULL, ?2, ?2) ON CONFLICT(node_id) DO NOTHING",
        params![node, now_ms],
    )?;
    {
        let mut insert = conn.prepare_cached(
            "INSERT OR IGNORE INTO records (node_id, seq, record_id, schema_version, key_id, imsi,
                app_id, model_id, prompt_tokens, cached_prompt_tokens, completion_tokens,
                reserved_tokens, billed_tokens, package_ids, debits, outcome, failure_reason,
                start_time_unix_ms, end_time_unix_ms, clock_sync, duration_us, ttft_us, offline,
                prev_hash, hash, signed, received_ms, end_user, choices, output_constraint,
                billed_units, rate_version, rate_digest)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17,
                ?18, ?19, ?20, ?21, ?22, ?23, ?24, ?25, ?26, ?27, ?28, ?29, ?30, ?31, ?32, ?33)",
        )?;
        for a in &v.accepted {
            let r = &a.record;
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
                debits_json(r),
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
                now_ms,
                r.end_user,
                r.choices,
                r.constraint,
                to_i64(crate::record::units_charged(r)),
                to_i64(r.rate_version),
                r.rate_digest
            ])?;
        }
    }
    for (ranges, reason) in [(&v.gaps, "edge_salvaged"), (&v.lost_by_core, "core_lost")] {
        for (first, last) in ranges {
            conn.execute(
                "INSERT OR IGNORE INTO gaps (node_id, first_seq, last_seq, reason) VALUES (?1, ?2, ?3, ?4)",
                params![node, seq_i64(*first)?, seq_i64(*last)?, reason],
            )?;
        }
    }
    // A resend of bytes already kept aside is not kept (nor counted) again.
    let mut quarantined = 0i64;
    for q in &v.quarantined {
        let seq = q.seq.map(seq_i64).transpose()?;
        quarantined += conn.execute(
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
    conn.execute(
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
    Ok(())
}

impl IngestStore for SqliteStore {
    fn describe(&self) -> String {
        format!("sqlite:{}", self.path.display())
    }

    fn position(&self, node_id: &str) -> Result<(NodeCursor, Option<[u8; 32]>), IngestStoreError> {
        let conn = self.connection();
        let c = cursor(&conn, node_id)?;
        let known = known_hashes(&conn, node_id, &[c.contiguous_seq])?;
        let at = stored_at(&c, &known);
        Ok((c, at))
    }

    fn ingest(
        &self,
        node_id: &str,
        checked: CheckedBatch,
        now_ms: i64,
    ) -> Result<BatchVerdict, IngestStoreError> {
        let mut conn = self.connection();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute(
            "INSERT OR IGNORE INTO node_keys (node_id, public_key, first_seen_ms) VALUES (?1, ?2, ?3)",
            params![node_id, checked.key().to_vec(), now_ms],
        )?;
        let c = cursor(&tx, node_id)?;
        let known = known_hashes(&tx, node_id, &seqs_to_look_up(&c, &checked))?;
        let v = walk(&c, checked, &known);
        commit(&tx, &v, now_ms)?;
        tx.commit()?;
        Ok(v)
    }

    fn audit(&self) -> Result<Vec<NodeAudit>, IngestStoreError> {
        let conn = self.connection();
        let nodes: Vec<(String, i64, i64, i64)> = {
            let mut stmt = conn.prepare(
                "SELECT node_id, contiguous_seq, duplicates, quarantined FROM nodes ORDER BY node_id",
            )?;
            let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?;
            rows.collect::<Result<_, _>>()?
        };
        let mut out = Vec::new();
        for (node_id, contiguous, duplicates, quarantined) in nodes {
            let gaps = conn
                .prepare(
                    "SELECT first_seq, last_seq, reason FROM gaps WHERE node_id = ?1 ORDER BY first_seq",
                )?
                .query_map([&node_id], |r| {
                    Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64, r.get(2)?))
                })?
                .collect::<Result<_, _>>()?;
            let forks = conn
                .prepare(
                    "SELECT seq, signed FROM quarantine WHERE node_id = ?1 AND kind = 'fork' ORDER BY seq",
                )?
                .query_map([&node_id], |r| Ok((r.get::<_, i64>(0)? as u64, r.get(1)?)))?
                .collect::<Result<_, _>>()?;
            let quarantined_seqs = conn
                .prepare("SELECT seq FROM quarantine WHERE node_id = ?1 AND seq IS NOT NULL")?
                .query_map([&node_id], |r| Ok(r.get::<_, i64>(0)? as u64))?
                .collect::<Result<_, _>>()?;
            let mut audit = ChainAudit::new(NodeFacts {
                node_id: node_id.clone(),
                contiguous_seq: contiguous as u64,
                duplicates: duplicates as u64,
                quarantined: quarantined as u64,
                gaps,
                forks,
                quarantined_seqs,
            });
            let mut stmt = conn.prepare(
                "SELECT seq, prev_hash, hash FROM records WHERE node_id = ?1 ORDER BY seq",
            )?;
            let mut rows = stmt.query([&node_id])?;
            while let Some(row) = rows.next()? {
                audit.push(row.get::<_, i64>(0)? as u64, row.get(1)?, row.get(2)?);
            }
            out.push(audit.finish());
        }
        Ok(out)
    }

    fn export(&self, q: &ExportQuery, sink: &mut RowSink<'_>) -> Result<u64, IngestStoreError> {
        let conn = self.connection();
        let sql = if q.by_imsi_day {
            "SELECT imsi, strftime('%Y-%m-%d', end_time_unix_ms / 1000, 'unixepoch') AS day, COUNT(*),
                    SUM(prompt_tokens), SUM(cached_prompt_tokens), SUM(completion_tokens), SUM(billed_tokens),
                    SUM(CASE billed_units WHEN 0 THEN billed_tokens ELSE billed_units END)
             FROM records WHERE end_time_unix_ms >= ?1 AND end_time_unix_ms < ?2
             GROUP BY imsi, day ORDER BY imsi, day"
        } else {
            "SELECT node_id, seq, lower(hex(record_id)), imsi, app_id, model_id, prompt_tokens,
                    cached_prompt_tokens, completion_tokens, billed_tokens, outcome, failure_reason,
                    start_time_unix_ms, end_time_unix_ms, package_ids, offline, choices,
                    output_constraint, end_user,
                    CASE billed_units WHEN 0 THEN billed_tokens ELSE billed_units END,
                    rate_version, lower(hex(rate_digest))
             FROM records WHERE end_time_unix_ms >= ?1 AND end_time_unix_ms < ?2
             ORDER BY node_id, seq"
        };
        let mut stmt = conn.prepare(sql)?;
        let columns = stmt.column_count();
        let mut rows = stmt.query(params![q.from_ms, q.to_ms])?;
        let (mut n, mut values) = (0u64, Vec::with_capacity(columns));
        while let Some(row) = rows.next()? {
            values.clear();
            for i in 0..columns {
                values.push(match row.get::<_, rusqlite::types::Value>(i)? {
                    rusqlite::types::Value::Integer(v) => ExportValue::Int(v),
                    rusqlite::types::Value::Text(t) => ExportValue::Text(t),
                    rusqlite::types::Value::Real(f) => ExportValue::Text(f.to_string()),
                    _ => ExportValue::Null,
                });
            }
            sink(&values)?;
            n += 1;
        }
        Ok(n)
    }

    fn check_ready(&self) -> Result<(), IngestStoreError> {
        self.connection().query_row("SELECT 1", [], |_| Ok(()))?;
        Ok(())
    }

    fn is_empty(&self) -> Result<bool, IngestStoreError> {
        let n: i64 = self
            .connection()
            .query_row("SELECT COUNT(*) FROM nodes", [], |r| r.get(0))?;
        Ok(n == 0)
    }

    fn node_keys(&self, node_id: &str) -> Result<Vec<[u8; 32]>, IngestStoreError> {
        let conn = self.connection();
        let keys: Vec<Vec<u8>> = conn
            .prepare("SELECT public_key FROM node_keys WHERE node_id = ?1 ORDER BY first_seen_ms")?
            .query_map([node_id], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        Ok(keys.into_iter().filter_map(|k| k.try_into().ok()).collect())
    }

    fn records_after(
        &self,
        node_id: &str,
        after_seq: u64,
        limit: usize,
    ) -> Result<Vec<StoredRecord>, IngestStoreError> {
        let conn = self.connection();
        let mut stmt = conn.prepare(
            "SELECT seq, signed, received_ms FROM records WHERE node_id = ?1 AND seq > ?2
             ORDER BY seq LIMIT ?3",
        )?;
        let rows = stmt.query_map(
            params![node_id, seq_i64(after_seq)?, to_i64(limit as u64)],
            |r| {
                Ok(StoredRecord {
                    seq: r.get::<_, i64>(0)? as u64,
                    signed: r.get(1)?,
                    received_ms: r.get(2)?,
                })
            },
        )?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn kept_aside(&self, node_id: &str) -> Result<Vec<KeptAside>, IngestStoreError> {
        let conn = self.connection();
        let mut stmt = conn.prepare(
            "SELECT seq, reason, signed, received_ms, kind FROM quarantine WHERE node_id = ?1 ORDER BY id",
        )?;
        let rows = stmt.query_map([node_id], |r| {
            Ok(KeptAside {
                seq: r.get::<_, Option<i64>>(0)?.map(|s| s as u64),
                reason: r.get(1)?,
                signed: r.get(2)?,
                received_ms: r.get(3)?,
                fork: r.get::<_, String>(4)? == "fork",
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn restore_kept_aside(
        &self,
        node_id: &str,
        rows: &[KeptAside],
    ) -> Result<(), IngestStoreError> {
        let mut conn = self.connection();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        for row in rows {
            let c = cursor(&tx, node_id)?;
            commit(&tx, &aside_only(c, row), row.received_ms)?;
        }
        tx.commit()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingest::NodeCursor;

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
        let s = SqliteStore::open(&dir.path().join("c.sqlite")).unwrap();
        let big = i64::MAX as u64 + 5;
        let r = {
            let mut conn = s.connection();
            let tx = conn.transaction().unwrap();
            // Dropped: rolled back.
            commit(&tx, &verdict("n1", &[big, big + 1], vec![]), 0)
        };
        let rows: i64 = s
            .connection()
            .query_row("SELECT COUNT(*) FROM records", [], |r| r.get(0))
            .unwrap();
        assert!(
            matches!(r, Err(IngestStoreError::SeqOutOfRange(_))),
            "{r:?}, {rows} rows"
        );
        assert_eq!(rows, 0);
    }
}
