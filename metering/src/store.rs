//! The ledger's durable state in SQLite: buckets (grants, revocations, what
//! each has used) and which usage records' debits are applied.
//!
//! **The usage log is the source of truth for debits.** The agent settles a
//! request in memory, appends its usage record (which carries the debits)
//! durably, and only then applies the debits here, marking the record's seq
//! applied in the same transaction. A crash between the append and this
//! transaction loses nothing: at start-up the agent re-applies every record
//! of the log that the store has not marked ([`Store::applied_watermark`],
//! [`Store::is_applied`]). Applying is idempotent per seq, so a replay twice
//! changes nothing. Grants and revocations are written with `synchronous =
//! FULL` before they are acknowledged.
//!
//! Marks are kept as a watermark (every seq at or below it applied) plus the
//! seqs applied above it (settlements finish out of seq order).

use std::path::Path;

use rusqlite::{params, Connection, OptionalExtension};

use crate::grants::{GrantChange, GrantTerms, HeldGrant, Now, GRANT_BUCKET_END};
use crate::ledger::{Bucket, BucketKind, Debit, Timestamp};
use crate::Imsi;

/// A store error: SQLite's, or a row that does not parse.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite failed.
    #[error("ledger store: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// A row holds a value this version cannot read.
    #[error("ledger store: bucket {id}: {reason}")]
    Corrupt {
        /// The row.
        id: u64,
        /// What is wrong.
        reason: String,
    },
}

/// One settled request as the admin API's recent usage shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct UsageRow {
    /// The usage record's seq in the log.
    pub seq: u64,
    /// Subscriber.
    pub imsi: String,
    /// End of the request, Unix milliseconds.
    pub at_ms: i64,
    /// App.
    pub app: String,
    /// Model.
    pub model: String,
    /// Prompt tokens.
    pub prompt_tokens: u64,
    /// Completion tokens.
    pub completion_tokens: u64,
    /// Tokens billed (prompt and completion).
    pub billed_tokens: u64,
    /// Package units debited (the tokens at the model's rate).
    pub billed_units: u64,
    /// completed, length, cancelled, failed.
    pub outcome: String,
}

/// Debits of one usage record, to apply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// The record's seq.
    pub seq: u64,
    /// The record's `record_id` (the request id), kept so that the next
    /// start can tell a stream's record was written even once the log has
    /// deleted it (see [`Store::record_seq`]).
    pub record_id: Vec<u8>,
    /// Its debits.
    pub debits: Vec<Debit>,
    /// Its summary for the recent-usage view.
    pub usage: UsageRow,
}

/// The SQLite store.
pub struct Store {
    conn: Connection,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").finish_non_exhaustive()
    }
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS buckets (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    imsi        TEXT    NOT NULL,
    kind        TEXT    NOT NULL,
    allowance   INTEGER NOT NULL,
    valid_from  INTEGER NOT NULL,
    expires_at  INTEGER NOT NULL,
    used        INTEGER NOT NULL DEFAULT 0,
    used_period INTEGER NOT NULL DEFAULT 0,
    revoked     INTEGER NOT NULL DEFAULT 0,
    granted_at  INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS buckets_by_imsi ON buckets(imsi);
CREATE TABLE IF NOT EXISTS applied (seq INTEGER PRIMARY KEY);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS usage (
    seq               INTEGER PRIMARY KEY,
    imsi              TEXT    NOT NULL,
    at_ms             INTEGER NOT NULL,
    app               TEXT    NOT NULL,
    model             TEXT    NOT NULL,
    prompt_tokens     INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    billed_tokens     INTEGER NOT NULL,
    outcome           TEXT    NOT NULL
);
CREATE INDEX IF NOT EXISTS usage_by_imsi ON usage(imsi, seq);
CREATE TABLE IF NOT EXISTS record_ids (
    record_id BLOB    PRIMARY KEY,
    seq       INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS record_ids_by_seq ON record_ids(seq);
CREATE TABLE IF NOT EXISTS core_grants (
    grant_id          INTEGER PRIMARY KEY,
    imsi              TEXT    NOT NULL,
    model             TEXT,
    tokens            INTEGER NOT NULL,
    threshold         INTEGER NOT NULL,
    offline_allowance INTEGER NOT NULL,
    final_unit_models TEXT    NOT NULL,
    valid_for_s       INTEGER NOT NULL,
    bucket_id         INTEGER NOT NULL,
    offline_bucket_id INTEGER,
    expires_at        INTEGER NOT NULL,
    deadline          INTEGER NOT NULL,
    boot_id           TEXT    NOT NULL,
    revoked           INTEGER NOT NULL DEFAULT 0
);
";

/// Recent-usage rows kept per subscriber.
const USAGE_KEPT: i64 = 1000;

type BucketRow = (u64, String, String, [i64; 6], String);

fn bucket_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<BucketRow> {
    Ok((
        row.get::<_, i64>(0)? as u64,
        row.get(1)?,
        row.get(2)?,
        [
            row.get(3)?,
            row.get(4)?,
            row.get(5)?,
            row.get(6)?,
            row.get(7)?,
            row.get(8)?,
        ],
        row.get(9)?,
    ))
}

fn to_bucket((id, imsi, kind, v, models): BucketRow) -> Result<Bucket, StoreError> {
    let corrupt = |reason: String| StoreError::Corrupt { id, reason };
    Ok(Bucket {
        id,
        imsi: Imsi::parse(&imsi).map_err(|e| corrupt(format!("imsi {imsi:?}: {e}")))?,
        kind: BucketKind::from_stored(&kind).ok_or_else(|| corrupt(format!("kind {kind:?}")))?,
        allowance: u64::try_from(v[0]).map_err(|_| corrupt("negative allowance".into()))?,
        valid_from: v[1],
        expires_at: v[2],
        used: u64::try_from(v[3]).map_err(|_| corrupt("negative use".into()))?,
        used_period: u32::try_from(v[4]).map_err(|_| corrupt("bad period".into()))?,
        revoked: v[5] != 0,
        models: match models.as_str() {
            "" => Vec::new(),
            json => {
                serde_json::from_str(json).map_err(|e| corrupt(format!("models {json:?}: {e}")))?
            }
        },
    })
}

/// Adds `column` to `table` unless it is there.
fn add_column(conn: &Connection, table: &str, column: &str, decl: &str) -> Result<(), StoreError> {
    let has: bool = conn
        .prepare(&format!(
            "SELECT 1 FROM pragma_table_info('{table}') WHERE name = ?1"
        ))?
        .exists([column])?;
    if !has {
        conn.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {decl}"))?;
    }
    Ok(())
}

const BUCKET_COLUMNS: &str =
    "id, imsi, kind, allowance, valid_from, expires_at, used, used_period, revoked, models";

impl Store {
    /// Opens (creating) the store at `path`.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(SCHEMA)?;
        // Columns added after the first release: a store made before them
        // gains them (rows from before read 0).
        add_column(&conn, "usage", "billed_units", "INTEGER NOT NULL DEFAULT 0")?;
        // A package's models or tiers, JSON; empty: every model.
        add_column(&conn, "buckets", "models", "TEXT NOT NULL DEFAULT ''")?;
        Ok(Store { conn })
    }

    /// Adds a bucket for every model and returns it (durable when this
    /// returns).
    pub fn grant(
        &mut self,
        imsi: &Imsi,
        kind: BucketKind,
        allowance: u64,
        valid_from: Timestamp,
        expires_at: Timestamp,
        now: Timestamp,
    ) -> Result<Bucket, StoreError> {
        self.grant_for(imsi, kind, allowance, (valid_from, expires_at), &[], now)
    }

    /// Adds a bucket that may be spent only on `models` (ids or tiers;
    /// empty: every model) over `window` (from, until), and returns it.
    pub fn grant_for(
        &mut self,
        imsi: &Imsi,
        kind: BucketKind,
        allowance: u64,
        (valid_from, expires_at): (Timestamp, Timestamp),
        models: &[String],
        now: Timestamp,
    ) -> Result<Bucket, StoreError> {
        let allowance_sql = i64::try_from(allowance).unwrap_or(i64::MAX);
        let models_sql = match models {
            [] => String::new(),
            m => serde_json::to_string(m).unwrap_or_default(),
        };
        self.conn.execute(
            "INSERT INTO buckets (imsi, kind, allowance, valid_from, expires_at, granted_at, models)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                imsi.as_str(),
                kind.as_str(),
                allowance_sql,
                valid_from,
                expires_at,
                now,
                models_sql
            ],
        )?;
        let id = self.conn.last_insert_rowid() as u64;
        Ok(Bucket {
            id,
            imsi: imsi.clone(),
            kind,
            allowance: allowance_sql as u64,
            valid_from,
            expires_at,
            used: 0,
            used_period: 0,
            revoked: false,
            models: models.to_vec(),
        })
    }

    /// Every downlink message at or below this is applied.
    pub fn downlink_applied(&self) -> Result<u64, StoreError> {
        let v: Option<i64> = self
            .conn
            .query_row(
                "SELECT value FROM meta WHERE key = 'downlink_applied'",
                [],
                |r| r.get(0),
            )
            .optional()?;
        Ok(v.unwrap_or(0) as u64)
    }

    /// Applies downlink message `seq`'s change in one transaction, durable
    /// when this returns (the box acknowledges the message only then): a
    /// grant's buckets and row, or a revocation; and the message's seq.
    /// `now` is the wall clock when it arrived; `boot_id` names the boot
    /// whose monotonic clock the grant's deadline is on. Returns the grant
    /// made, if any. A message applied before (its seq at or below the
    /// applied one) changes nothing.
    pub fn apply_downlink(
        &mut self,
        seq: u64,
        change: &GrantChange,
        now: Timestamp,
        boot_id: &str,
    ) -> Result<Option<HeldGrant>, StoreError> {
        let tx = self.conn.transaction()?;
        let applied: i64 = tx
            .query_row(
                "SELECT value FROM meta WHERE key = 'downlink_applied'",
                [],
                |r| r.get(0),
            )
            .optional()?
            .unwrap_or(0);
        let seq_sql = i64::try_from(seq).unwrap_or(i64::MAX);
        if seq_sql <= applied {
            return Ok(None);
        }
        let mut made = None;
        match change {
            GrantChange::Grant {
                terms,
                expires_at,
                deadline,
            } => {
                let known: i64 = tx.query_row(
                    "SELECT COUNT(*) FROM core_grants WHERE grant_id = ?1",
                    [terms.grant_id as i64],
                    |r| r.get(0),
                )?;
                if known == 0 {
                    let bucket = |kind: BucketKind, allowance: u64| {
                        tx.execute(
                            "INSERT INTO buckets (imsi, kind, allowance, valid_from, expires_at, granted_at)
                             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                            params![
                                terms.imsi.as_str(),
                                kind.as_str(),
                                i64::try_from(allowance).unwrap_or(i64::MAX),
                                0,
                                GRANT_BUCKET_END,
                                now
                            ],
                        )?;
                        Ok::<_, rusqlite::Error>(tx.last_insert_rowid() as u64)
                    };
                    let bucket_id = bucket(BucketKind::Grant, terms.tokens)?;
                    let offline_bucket_id = if terms.offline_allowance > 0 {
                        Some(bucket(BucketKind::Offline, terms.offline_allowance)?)
                    } else {
                        None
                    };
                    tx.execute(
                        "INSERT INTO core_grants (grant_id, imsi, model, tokens, threshold,
                             offline_allowance, final_unit_models, valid_for_s, bucket_id,
                             offline_bucket_id, expires_at, deadline, boot_id)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
                        params![
                            terms.grant_id as i64,
                            terms.imsi.as_str(),
                            terms.model,
                            i64::try_from(terms.tokens).unwrap_or(i64::MAX),
                            i64::try_from(terms.threshold).unwrap_or(i64::MAX),
                            i64::try_from(terms.offline_allowance).unwrap_or(i64::MAX),
                            serde_json::to_string(&terms.final_unit_models).unwrap_or_default(),
                            terms.valid_for_s,
                            bucket_id as i64,
                            offline_bucket_id.map(|b| b as i64),
                            expires_at,
                            deadline,
                            boot_id
                        ],
                    )?;
                    made = Some(HeldGrant {
                        terms: terms.clone(),
                        bucket_id,
                        offline_bucket_id,
                        expires_at: *expires_at,
                        deadline: *deadline,
                        revoked: false,
                    });
                }
            }
            GrantChange::Revoke { grant_id } => {
                tx.execute(
                    "UPDATE buckets SET revoked = 1 WHERE id IN (
                         SELECT bucket_id FROM core_grants WHERE grant_id = ?1
                         UNION SELECT offline_bucket_id FROM core_grants WHERE grant_id = ?1)",
                    [*grant_id as i64],
                )?;
                tx.execute(
                    "UPDATE core_grants SET revoked = 1 WHERE grant_id = ?1",
                    [*grant_id as i64],
                )?;
            }
            GrantChange::Nothing => {}
        }
        tx.execute(
            "INSERT INTO meta (key, value) VALUES ('downlink_applied', ?1)
             ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            [seq_sql],
        )?;
        tx.commit()?;
        Ok(made)
    }

    /// The core's grants this box holds (revoked and expired ones too), at
    /// `now` in boot `boot_id`: a deadline kept on another boot's monotonic
    /// clock is carried over by the wall clock (what is left of
    /// `expires_at`).
    pub fn grants(&self, now: Now, boot_id: &str) -> Result<Vec<HeldGrant>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT grant_id, imsi, model, tokens, threshold, offline_allowance,
                    final_unit_models, valid_for_s, bucket_id, offline_bucket_id,
                    expires_at, revoked, deadline, boot_id
             FROM core_grants ORDER BY grant_id",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, i64>(0)? as u64,
                r.get::<_, String>(1)?,
                r.get::<_, Option<String>>(2)?,
                [
                    r.get::<_, i64>(3)?,
                    r.get::<_, i64>(4)?,
                    r.get::<_, i64>(5)?,
                ],
                r.get::<_, String>(6)?,
                r.get::<_, i64>(7)?,
                r.get::<_, i64>(8)? as u64,
                r.get::<_, Option<i64>>(9)?.map(|b| b as u64),
                r.get::<_, i64>(10)?,
                r.get::<_, i64>(11)? != 0,
                (r.get::<_, i64>(12)?, r.get::<_, String>(13)?),
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (
                grant_id,
                imsi,
                model,
                n,
                fum,
                valid_for_s,
                bucket_id,
                offline,
                expires_at,
                revoked,
                (deadline, boot),
            ) = row?;
            let deadline = if boot == boot_id {
                deadline
            } else {
                now.mono
                    .saturating_add(expires_at.saturating_sub(now.wall).max(0))
            };
            let corrupt = |reason: String| StoreError::Corrupt {
                id: bucket_id,
                reason: format!("grant {grant_id}: {reason}"),
            };
            let count =
                |v: i64| u64::try_from(v).map_err(|_| corrupt(format!("negative count {v}")));
            out.push(HeldGrant {
                terms: GrantTerms {
                    grant_id,
                    imsi: Imsi::parse(&imsi).map_err(|e| corrupt(format!("imsi {imsi:?}: {e}")))?,
                    model,
                    tokens: count(n[0])?,
                    threshold: count(n[1])?,
                    offline_allowance: count(n[2])?,
                    final_unit_models: serde_json::from_str(&fum)
                        .map_err(|e| corrupt(format!("final-unit models: {e}")))?,
                    valid_for_s,
                },
                bucket_id,
                offline_bucket_id: offline,
                expires_at,
                deadline,
                revoked,
            });
        }
        Ok(out)
    }

    /// Forgets the core's grants that ended before `before` (the wall
    /// clock), with their buckets: the box keeps a grant only while it may
    /// still pay for something (a grant held days past its end pays for
    /// nothing; the core settles its usage from the records). Returns how
    /// many grants went.
    pub fn prune_grants(&mut self, before: Timestamp) -> Result<usize, StoreError> {
        let tx = self.conn.transaction()?;
        tx.execute(
            "DELETE FROM buckets WHERE id IN (
                 SELECT bucket_id FROM core_grants WHERE expires_at < ?1
                 UNION SELECT offline_bucket_id FROM core_grants
                       WHERE expires_at < ?1 AND offline_bucket_id IS NOT NULL)",
            [before],
        )?;
        let n = tx.execute("DELETE FROM core_grants WHERE expires_at < ?1", [before])?;
        tx.commit()?;
        Ok(n)
    }

    /// Revokes a bucket; false when there is none with this id.
    pub fn revoke(&mut self, id: u64) -> Result<bool, StoreError> {
        let n = self
            .conn
            .execute("UPDATE buckets SET revoked = 1 WHERE id = ?1", [id as i64])?;
        Ok(n == 1)
    }

    /// Every bucket.
    pub fn buckets(&self) -> Result<Vec<Bucket>, StoreError> {
        let mut stmt = self
            .conn
            .prepare(&format!("SELECT {BUCKET_COLUMNS} FROM buckets ORDER BY id"))?;
        let rows = stmt.query_map([], bucket_from_row)?;
        rows.map(|r| to_bucket(r?)).collect()
    }

    /// Every seq at or below this has been applied.
    pub fn applied_watermark(&self) -> Result<u64, StoreError> {
        let v: Option<i64> = self
            .conn
            .query_row(
                "SELECT value FROM meta WHERE key = 'applied_watermark'",
                [],
                |r| r.get(0),
            )
            .optional()?;
        Ok(v.unwrap_or(0) as u64)
    }

    /// True when the debits of record `seq` are applied.
    pub fn is_applied(&self, seq: u64) -> Result<bool, StoreError> {
        if seq <= self.applied_watermark()? {
            return Ok(true);
        }
        let n: i64 = self.conn.query_row(
            "SELECT COUNT(*) FROM applied WHERE seq = ?1",
            [seq as i64],
            |r| r.get(0),
        )?;
        Ok(n > 0)
    }

    /// Applies the debits of records not applied yet, in one transaction;
    /// returns how many were new.
    pub fn apply(&mut self, batch: &[Applied]) -> Result<usize, StoreError> {
        let tx = self.conn.transaction()?;
        let watermark: i64 = tx
            .query_row(
                "SELECT value FROM meta WHERE key = 'applied_watermark'",
                [],
                |r| r.get(0),
            )
            .optional()?
            .unwrap_or(0);
        let mut new = 0;
        for a in batch {
            let seq = a.seq as i64;
            if seq <= watermark
                || tx.execute("INSERT OR IGNORE INTO applied (seq) VALUES (?1)", [seq])? == 0
            {
                continue;
            }
            new += 1;
            if !a.record_id.is_empty() {
                tx.execute(
                    "INSERT OR IGNORE INTO record_ids (record_id, seq) VALUES (?1, ?2)",
                    params![a.record_id, seq],
                )?;
            }
            for d in &a.debits {
                tx.execute(
                    "UPDATE buckets SET
                        used = CASE WHEN ?3 = used_period THEN used + ?2
                                    WHEN ?3 > used_period THEN ?2 ELSE used END,
                        used_period = MAX(used_period, ?3)
                     WHERE id = ?1",
                    params![d.bucket_id as i64, d.tokens as i64, d.period as i64],
                )?;
            }
            let u = &a.usage;
            tx.execute(
                "INSERT OR REPLACE INTO usage (seq, imsi, at_ms, app, model, prompt_tokens,
                     completion_tokens, billed_tokens, outcome, billed_units)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                params![
                    seq,
                    u.imsi,
                    u.at_ms,
                    u.app,
                    u.model,
                    u.prompt_tokens as i64,
                    u.completion_tokens as i64,
                    u.billed_tokens as i64,
                    u.outcome,
                    u.billed_units as i64
                ],
            )?;
        }
        // Advance the watermark over the contiguous run of applied seqs.
        let mut w = watermark;
        while tx.execute("DELETE FROM applied WHERE seq = ?1", [w + 1])? == 1 {
            w += 1;
        }
        if w != watermark {
            tx.execute(
                "INSERT INTO meta (key, value) VALUES ('applied_watermark', ?1)
                 ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                [w],
            )?;
        }
        tx.commit()?;
        Ok(new)
    }

    /// The seq of the applied record with this `record_id`, if the store
    /// still knows it (ids are kept until [`Store::prune_record_ids`]).
    pub fn record_seq(&self, record_id: &[u8]) -> Result<Option<u64>, StoreError> {
        Ok(self
            .conn
            .query_row(
                "SELECT seq FROM record_ids WHERE record_id = ?1",
                [record_id],
                |r| r.get::<_, i64>(0),
            )
            .optional()?
            .map(|s| s as u64))
    }

    /// Forgets the record ids of seqs at or below `seq`: no in-flight slot
    /// can ask about them any more (a slot only asks about records after
    /// the log position it started at). Returns how many went.
    pub fn prune_record_ids(&mut self, seq: u64) -> Result<usize, StoreError> {
        Ok(self.conn.execute(
            "DELETE FROM record_ids WHERE seq <= ?1",
            [i64::try_from(seq).unwrap_or(i64::MAX)],
        )?)
    }

    /// The last `limit` settled requests of `imsi`, newest first.
    pub fn recent_usage(&self, imsi: &Imsi, limit: usize) -> Result<Vec<UsageRow>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT seq, imsi, at_ms, app, model, prompt_tokens, completion_tokens,
                    billed_tokens, outcome, billed_units
             FROM usage WHERE imsi = ?1 ORDER BY seq DESC LIMIT ?2",
        )?;
        let rows = stmt.query_map(
            params![imsi.as_str(), limit.min(USAGE_KEPT as usize) as i64],
            |r| {
                Ok(UsageRow {
                    seq: r.get::<_, i64>(0)? as u64,
                    imsi: r.get(1)?,
                    at_ms: r.get(2)?,
                    app: r.get(3)?,
                    model: r.get(4)?,
                    prompt_tokens: r.get::<_, i64>(5)? as u64,
                    completion_tokens: r.get::<_, i64>(6)? as u64,
                    billed_tokens: r.get::<_, i64>(7)? as u64,
                    outcome: r.get(8)?,
                    // A row from before rating: one unit a token.
                    billed_units: match r.get::<_, i64>(9)? as u64 {
                        0 => r.get::<_, i64>(7)? as u64,
                        u => u,
                    },
                })
            },
        )?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Drops recent-usage rows beyond the last 1000 of each subscriber.
    pub fn prune_usage(&mut self) -> Result<usize, StoreError> {
        Ok(self.conn.execute(
            "DELETE FROM usage WHERE seq IN (
                SELECT seq FROM (
                    SELECT seq, ROW_NUMBER() OVER (PARTITION BY imsi ORDER BY seq DESC) AS n
                    FROM usage) WHERE n > ?1)",
            [USAGE_KEPT],
        )?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Ledger;

    fn imsi() -> Imsi {
        Imsi::parse("001010000000001").unwrap()
    }

    fn applied(seq: u64, bucket: u64, tokens: u64) -> Applied {
        Applied {
            seq,
            record_id: seq.to_be_bytes().to_vec(),
            debits: vec![Debit {
                bucket_id: bucket,
                tokens,
                period: 0,
            }],
            usage: UsageRow {
                seq,
                imsi: imsi().to_string(),
                at_ms: 1000 * seq as i64,
                app: "app".into(),
                model: "m".into(),
                prompt_tokens: 1,
                completion_tokens: tokens - 1,
                billed_tokens: tokens,
                billed_units: tokens,
                outcome: "completed".into(),
            },
        }
    }

    #[test]
    fn grants_debits_and_marks_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.sqlite");
        let mut s = Store::open(&path).unwrap();
        let b = s
            .grant(&imsi(), BucketKind::Topup, 100, 0, 1000, 0)
            .unwrap();
        // Out of order: 2 then 1, then 4 (3 missing).
        assert_eq!(s.apply(&[applied(2, b.id, 10)]).unwrap(), 1);
        assert_eq!(s.applied_watermark().unwrap(), 0);
        assert_eq!(
            s.apply(&[applied(1, b.id, 5), applied(4, b.id, 1)])
                .unwrap(),
            2
        );
        assert_eq!(s.applied_watermark().unwrap(), 2);
        assert!(s.is_applied(4).unwrap() && !s.is_applied(3).unwrap());
        assert_eq!(s.record_seq(&4u64.to_be_bytes()).unwrap(), Some(4));
        assert_eq!(s.record_seq(&3u64.to_be_bytes()).unwrap(), None);
        // Applying again changes nothing.
        assert_eq!(
            s.apply(&[applied(2, b.id, 10), applied(4, b.id, 1)])
                .unwrap(),
            0
        );
        drop(s);
        let s = Store::open(&path).unwrap();
        let buckets = s.buckets().unwrap();
        assert_eq!(buckets[0].used, 16);
        let mut l = Ledger::new();
        l.insert(buckets[0].clone()).unwrap();
        assert_eq!(l.balance(&imsi(), 10).remaining_tokens, 84);
        let recent = s.recent_usage(&imsi(), 2).unwrap();
        assert_eq!(recent.iter().map(|u| u.seq).collect::<Vec<_>>(), vec![4, 2]);
    }

    #[test]
    fn a_downlink_grant_and_its_revocation_are_applied_once_and_survive_reopening() {
        use crate::grants::{GrantChange, GrantTerms};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.sqlite");
        let mut s = Store::open(&path).unwrap();
        let terms = GrantTerms {
            grant_id: 42,
            imsi: imsi(),
            model: Some("m".into()),
            tokens: 1000,
            threshold: 200,
            offline_allowance: 50,
            final_unit_models: vec!["free".into()],
            valid_for_s: 3600,
        };
        // Arrived at 1400 on the wall clock, 100 s after boot "b1".
        let grant = GrantChange::Grant {
            terms: terms.clone(),
            expires_at: 5000,
            deadline: 3700,
        };
        let held = s.apply_downlink(1, &grant, 1400, "b1").unwrap().unwrap();
        assert_eq!((held.expires_at, held.deadline), (5000, 3700));
        assert!(held.offline_bucket_id.is_some());
        // The same message again, or an older one: nothing.
        assert_eq!(s.apply_downlink(1, &grant, 1400, "b1").unwrap(), None);
        assert_eq!(s.buckets().unwrap().len(), 2);
        let revoke = GrantChange::Revoke { grant_id: 42 };
        assert_eq!(s.apply_downlink(2, &revoke, 1500, "b1").unwrap(), None);
        drop(s);
        let s = Store::open(&path).unwrap();
        assert_eq!(s.downlink_applied().unwrap(), 2);
        // The agent restarted in the same boot: the deadline holds, whatever
        // the wall clock says now.
        let same_boot = Now {
            wall: 9_999,
            mono: 200,
        };
        let grants = s.grants(same_boot, "b1").unwrap();
        assert_eq!(grants.len(), 1);
        assert!(grants[0].revoked);
        assert_eq!(grants[0].terms, terms);
        assert_eq!(grants[0].deadline, 3700);
        // After a reboot the monotonic clock starts again: what is left is
        // carried over by the wall clock (1000 s left at 4000).
        let rebooted = Now {
            wall: 4000,
            mono: 30,
        };
        assert_eq!(s.grants(rebooted, "b2").unwrap()[0].deadline, 1030);
        let buckets = s.buckets().unwrap();
        assert!(buckets
            .iter()
            .all(|b| b.revoked && b.valid_from == 0 && b.expires_at == GRANT_BUCKET_END));
        assert_eq!(
            buckets
                .iter()
                .map(|b| (b.kind, b.allowance))
                .collect::<Vec<_>>(),
            vec![(BucketKind::Grant, 1000), (BucketKind::Offline, 50)]
        );
    }

    #[test]
    fn grants_ended_long_ago_are_forgotten_with_their_buckets() {
        use crate::grants::{GrantChange, GrantTerms};
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(&dir.path().join("l.sqlite")).unwrap();
        let own = s.grant(&imsi(), BucketKind::Trial, 10, 0, 10, 0).unwrap();
        let grant = |grant_id, expires_at| GrantChange::Grant {
            terms: GrantTerms {
                grant_id,
                imsi: imsi(),
                model: None,
                tokens: 100,
                threshold: 20,
                offline_allowance: 10,
                final_unit_models: vec![],
                valid_for_s: 3600,
            },
            expires_at,
            deadline: expires_at,
        };
        s.apply_downlink(1, &grant(1, 1_000), 0, "b").unwrap();
        s.apply_downlink(2, &grant(2, 9_000), 0, "b").unwrap();
        assert_eq!(s.buckets().unwrap().len(), 5);
        assert_eq!(s.prune_grants(5_000).unwrap(), 1);
        let now = Now { wall: 0, mono: 0 };
        let left: Vec<u64> = s
            .grants(now, "b")
            .unwrap()
            .iter()
            .map(|g| g.terms.grant_id)
            .collect();
        assert_eq!(left, vec![2]);
        let buckets = s.buckets().unwrap();
        assert_eq!(buckets.len(), 3, "grant 2's two buckets and the box's own");
        assert!(buckets.iter().any(|b| b.id == own.id));
        assert_eq!(
            s.downlink_applied().unwrap(),
            2,
            "what was applied stays applied"
        );
    }

    #[test]
    fn revoke_and_unknown_buckets() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(&dir.path().join("l.sqlite")).unwrap();
        let b = s.grant(&imsi(), BucketKind::Trial, 10, 0, 10, 0).unwrap();
        assert!(s.revoke(b.id).unwrap());
        assert!(!s.revoke(99).unwrap());
        assert!(s.buckets().unwrap()[0].revoked);
    }

    #[test]
    fn a_corrupt_row_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.sqlite");
        let mut s = Store::open(&path).unwrap();
        s.grant(&imsi(), BucketKind::Trial, 10, 0, 10, 0).unwrap();
        s.conn
            .execute("UPDATE buckets SET kind = 'weekly'", [])
            .unwrap();
        let err = s.buckets().unwrap_err().to_string();
        assert!(err.contains("bucket 1") && err.contains("weekly"), "{err}");
    }
}
