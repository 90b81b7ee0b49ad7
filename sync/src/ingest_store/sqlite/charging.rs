//! The core's packages and grants in the SQLite store
//! ([`crate::charging_store`]): the subscriber's state loaded and saved
//! inside one `BEGIN IMMEDIATE` transaction, which holds the file's write
//! lock from load to save.

use std::collections::HashSet;

use mec_metering::charging::{
    Charging, Grant, Package, PackageSpec, Settlement, SubscriberState, Usage,
};
use mec_metering::{Bucket, Imsi, Timestamp};
use rusqlite::{params, OptionalExtension, Transaction, TransactionBehavior};

use super::SqliteStore;
use crate::charging_store::{
    from_json, from_outbox, kind_from, outbox_body, to_json, BilledPackage, ChargingOp,
    ChargingStore, ChargingStoreError, GrantedToBox, Outbox, SubscriberBill, UsedLine,
};
use crate::ingest_store::{seq_i64, IngestStoreError};
use crate::wire::pb::Downlink;
use mec_metering::charging::ChargingError;

/// The charging tables (made with the others at open).
pub(super) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS charging_subscribers (
    imsi    TEXT    PRIMARY KEY,
    used    INTEGER NOT NULL,
    overage INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS charging_packages (
    id          TEXT    PRIMARY KEY,
    imsi        TEXT    NOT NULL,
    bucket_id   INTEGER NOT NULL UNIQUE,
    kind        TEXT    NOT NULL,
    allowance   INTEGER NOT NULL,
    valid_from  INTEGER NOT NULL,
    expires_at  INTEGER NOT NULL,
    tier        TEXT    NOT NULL,
    models      TEXT    NOT NULL,
    used        INTEGER NOT NULL,
    used_period INTEGER NOT NULL,
    revoked     INTEGER NOT NULL,
    sold_at     INTEGER NOT NULL,
    request     TEXT    NOT NULL
);
CREATE INDEX IF NOT EXISTS charging_packages_by_imsi ON charging_packages(imsi);
CREATE TABLE IF NOT EXISTS charging_grants (
    id                INTEGER PRIMARY KEY,
    node_id           TEXT    NOT NULL,
    imsi              TEXT    NOT NULL,
    model             TEXT,
    tokens            INTEGER NOT NULL,
    used              INTEGER NOT NULL,
    granted_at        INTEGER NOT NULL,
    expires_at        INTEGER NOT NULL,
    threshold         INTEGER NOT NULL,
    offline_allowance INTEGER NOT NULL,
    final_unit_action TEXT    NOT NULL,
    revoked           INTEGER NOT NULL,
    holds             TEXT    NOT NULL,
    open              INTEGER NOT NULL,
    closed_at         INTEGER
);
CREATE INDEX IF NOT EXISTS charging_grants_open ON charging_grants(imsi, open);
CREATE INDEX IF NOT EXISTS charging_grants_expiring ON charging_grants(open, expires_at);
CREATE TABLE IF NOT EXISTS downlink_nodes (
    node_id  TEXT    PRIMARY KEY,
    last_seq INTEGER NOT NULL,
    applied  INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS downlink_outbox (
    node_id TEXT    NOT NULL,
    seq     INTEGER NOT NULL,
    body    BLOB    NOT NULL,
    made_at INTEGER NOT NULL,
    PRIMARY KEY (node_id, seq)
);
CREATE TABLE IF NOT EXISTS charging_settled_through (
    node_id TEXT    PRIMARY KEY,
    seq     INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS charging_settlements (
    node_id      TEXT    NOT NULL,
    seq          INTEGER NOT NULL,
    imsi         TEXT    NOT NULL,
    grant_id     INTEGER,
    tokens       INTEGER NOT NULL,
    from_grant   INTEGER NOT NULL,
    from_balance INTEGER NOT NULL,
    overage      INTEGER NOT NULL,
    settled_at   INTEGER NOT NULL,
    PRIMARY KEY (node_id, seq)
);
";

/// Columns added to the charging tables since they were first made:
/// (table, column, definition), added at open when missing.
pub(super) const ADDED_COLUMNS: [(&str, &str, &str); 2] = [
    // The bill's lines: the model served, and when (the record's end).
    ("charging_settlements", "model", "TEXT NOT NULL DEFAULT ''"),
    (
        "charging_settlements",
        "ended_ms",
        "INTEGER NOT NULL DEFAULT 0",
    ),
];

/// Indexes over added columns (made once the columns are there).
pub(super) const INDEXES: &str = "
CREATE INDEX IF NOT EXISTS charging_settlements_by_imsi ON charging_settlements(imsi, ended_ms);
CREATE INDEX IF NOT EXISTS charging_settlements_by_end ON charging_settlements(ended_ms);
CREATE INDEX IF NOT EXISTS charging_packages_by_sale ON charging_packages(sold_at);
";

fn imsi_of(text: String) -> Result<Imsi, IngestStoreError> {
    Imsi::parse(&text).map_err(|e| {
        IngestStoreError::Location("charging".into(), format!("stored IMSI {text:?}: {e}"))
    })
}

fn load(tx: &Transaction<'_>, imsi: &Imsi) -> Result<SubscriberState, IngestStoreError> {
    let mut state = SubscriberState::default();
    let mut packages = tx.prepare_cached(
        "SELECT id, bucket_id, kind, allowance, valid_from, expires_at, tier, models, used,
                used_period, revoked, request
         FROM charging_packages WHERE imsi = ?1 ORDER BY bucket_id",
    )?;
    let rows = packages.query_map([imsi.as_str()], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, i64>(1)?,
            r.get::<_, String>(2)?,
            r.get::<_, i64>(3)?,
            r.get::<_, i64>(4)?,
            r.get::<_, i64>(5)?,
            r.get::<_, String>(6)?,
            r.get::<_, String>(7)?,
            r.get::<_, i64>(8)?,
            r.get::<_, i64>(9)?,
            r.get::<_, bool>(10)?,
            r.get::<_, String>(11)?,
        ))
    })?;
    for row in rows {
        let (
            id,
            bucket_id,
            kind,
            allowance,
            valid_from,
            expires_at,
            tier,
            models,
            used,
            period,
            revoked,
            request,
        ) = row?;
        let kind = kind_from(&kind)?;
        let spec = PackageSpec {
            kind,
            allowance: allowance as u64,
            valid_from,
            expires_at,
            tier,
            models: from_json("a package's models", &models)?,
        };
        let bucket = Bucket {
            id: bucket_id as u64,
            imsi: imsi.clone(),
            kind,
            allowance: allowance as u64,
            valid_from,
            expires_at,
            used: used as u64,
            used_period: period as u32,
            revoked,
            models: Vec::new(),
        };
        let package = Package {
            id,
            imsi: imsi.clone(),
            spec,
            bucket_id: bucket_id as u64,
            revoked,
            request,
        };
        state.packages.push((package, bucket));
    }
    let mut grants = tx.prepare_cached(
        "SELECT id, node_id, model, tokens, used, granted_at, expires_at, threshold,
                offline_allowance, final_unit_action, revoked, holds
         FROM charging_grants WHERE imsi = ?1 AND open = 1 ORDER BY id",
    )?;
    let rows = grants.query_map([imsi.as_str()], |r| {
        Ok((
            r.get::<_, i64>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, Option<String>>(2)?,
            [
                r.get::<_, i64>(3)?,
                r.get::<_, i64>(4)?,
                r.get::<_, i64>(5)?,
                r.get::<_, i64>(6)?,
                r.get::<_, i64>(7)?,
                r.get::<_, i64>(8)?,
            ],
            r.get::<_, String>(9)?,
            r.get::<_, bool>(10)?,
            r.get::<_, String>(11)?,
        ))
    })?;
    for row in rows {
        let (
            id,
            node_id,
            model,
            [tokens, used, granted_at, expires_at, threshold, offline],
            action,
            revoked,
            holds,
        ) = row?;
        let grant = Grant {
            id: id as u64,
            node_id,
            imsi: imsi.clone(),
            model,
            tokens: tokens as u64,
            used: used as u64,
            granted_at,
            expires_at,
            threshold: threshold as u64,
            offline_allowance: offline as u64,
            final_unit_action: from_json("a grant's final-unit action", &action)?,
            revoked,
        };
        state
            .grants
            .push((grant, from_json("a grant's holds", &holds)?));
    }
    if let Some((used, overage)) = tx
        .query_row(
            "SELECT used, overage FROM charging_subscribers WHERE imsi = ?1",
            [imsi.as_str()],
            |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)),
        )
        .optional()?
    {
        state.used = used as u64;
        state.overage = overage as u64;
    }
    Ok(state)
}

fn save(
    tx: &Transaction<'_>,
    imsi: &Imsi,
    state: &SubscriberState,
    open_before: &HashSet<u64>,
    settlements: &[(Usage, Settlement)],
    now: Timestamp,
) -> Result<(), ChargingStoreError> {
    // A package is only ever updated by its own subscriber's operation: an
    // id that another subscriber's sale took meanwhile changes no row, and
    // is this sale's id conflict.
    let mut package = tx.prepare_cached(
        "INSERT INTO charging_packages (id, imsi, bucket_id, kind, allowance, valid_from,
             expires_at, tier, models, used, used_period, revoked, sold_at, request)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)
         ON CONFLICT (id) DO UPDATE SET used = excluded.used,
             used_period = excluded.used_period, revoked = excluded.revoked
         WHERE charging_packages.imsi = excluded.imsi",
    )?;
    for (p, b) in &state.packages {
        let changed = package.execute(params![
            p.id,
            imsi.as_str(),
            b.id as i64,
            b.kind.as_str(),
            b.allowance as i64,
            b.valid_from,
            b.expires_at,
            p.spec.tier,
            to_json(&p.spec.models),
            b.used as i64,
            i64::from(b.used_period),
            p.revoked,
            now,
            p.request,
        ])?;
        if changed == 0 {
            return Err(ChargingError::IdConflict(p.id.clone()).into());
        }
    }
    let mut grant = tx.prepare_cached(
        "INSERT INTO charging_grants (id, node_id, imsi, model, tokens, used, granted_at,
             expires_at, threshold, offline_allowance, final_unit_action, revoked, holds, open)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, 1)
         ON CONFLICT (id) DO UPDATE SET used = excluded.used, revoked = excluded.revoked,
             holds = excluded.holds",
    )?;
    let mut open_after = HashSet::new();
    for (g, holds) in &state.grants {
        open_after.insert(g.id);
        grant.execute(params![
            g.id as i64,
            g.node_id,
            imsi.as_str(),
            g.model,
            g.tokens as i64,
            g.used as i64,
            g.granted_at,
            g.expires_at,
            g.threshold as i64,
            g.offline_allowance as i64,
            to_json(&g.final_unit_action),
            g.revoked,
            to_json(holds),
        ])?;
    }
    let mut close = tx.prepare_cached(
        "UPDATE charging_grants SET open = 0, closed_at = ?2, holds = '[]' WHERE id = ?1",
    )?;
    for id in open_before.difference(&open_after) {
        close.execute(params![*id as i64, now])?;
    }
    let mut settled = tx.prepare_cached(
        "INSERT INTO charging_settlements (node_id, seq, imsi, grant_id, tokens, from_grant,
             from_balance, overage, settled_at, model, ended_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
    )?;
    for (u, s) in settlements {
        settled.execute(params![
            u.node_id,
            u.seq as i64,
            imsi.as_str(),
            u.grants.first().map(|g| g.0 as i64),
            u.tokens as i64,
            s.from_grant as i64,
            s.from_balance as i64,
            s.overage as i64,
            now,
            u.model.as_deref().unwrap_or(""),
            u.ended_ms,
        ])?;
    }
    tx.execute(
        "INSERT INTO charging_subscribers (imsi, used, overage) VALUES (?1, ?2, ?3)
         ON CONFLICT (imsi) DO UPDATE SET used = excluded.used, overage = excluded.overage",
        params![imsi.as_str(), state.used as i64, state.overage as i64],
    )?;
    Ok(())
}

/// Appends `outbox`'s messages to their nodes' downlinks, numbered on.
fn write_outbox(
    tx: &Transaction<'_>,
    outbox: &Outbox,
    now: Timestamp,
) -> Result<(), IngestStoreError> {
    for (node, kinds) in outbox.by_node() {
        tx.execute(
            "INSERT INTO downlink_nodes (node_id, last_seq, applied) VALUES (?1, 0, 0)
             ON CONFLICT (node_id) DO NOTHING",
            [node],
        )?;
        for kind in kinds {
            let seq: i64 = tx.query_row(
                "UPDATE downlink_nodes SET last_seq = last_seq + 1 WHERE node_id = ?1 RETURNING last_seq",
                [node],
                |r| r.get(0),
            )?;
            let body = outbox_body(seq, kind);
            tx.execute(
                "INSERT INTO downlink_outbox (node_id, seq, body, made_at) VALUES (?1, ?2, ?3, ?4)",
                params![node, seq, body, now],
            )?;
        }
    }
    Ok(())
}

impl ChargingStore for SqliteStore {
    fn with_subscriber(
        &self,
        imsi: &Imsi,
        settle_keys: &[(String, u64)],
        now: Timestamp,
        op: ChargingOp<'_>,
    ) -> Result<(), ChargingStoreError> {
        let mut conn = self.connection();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(IngestStoreError::from)?;
        let state = load(&tx, imsi)?;
        let open_before: HashSet<u64> = state.grants.iter().map(|(g, _)| g.id).collect();
        let next = |sql: &str| -> Result<u64, IngestStoreError> {
            Ok(tx.query_row(sql, [], |r| r.get::<_, i64>(0))? as u64)
        };
        let mut c = Charging::new();
        c.reserve_ids(
            next("SELECT COALESCE(MAX(bucket_id), 0) + 1 FROM charging_packages")?,
            next("SELECT COALESCE(MAX(id), 0) + 1 FROM charging_grants")?,
        );
        c.restore(imsi, state)?;
        {
            let mut seen = tx
                .prepare_cached(
                    "SELECT 1 FROM charging_settlements WHERE node_id = ?1 AND seq = ?2",
                )
                .map_err(IngestStoreError::from)?;
            for (node, seq) in settle_keys {
                if seen
                    .exists(params![node, *seq as i64])
                    .map_err(IngestStoreError::from)?
                {
                    c.settled_before(node, *seq);
                }
            }
        }
        let mut outbox = Outbox::default();
        op(&mut c, &mut outbox)?;
        let settlements = c.take_settlements();
        save(&tx, imsi, &c.state(imsi), &open_before, &settlements, now)?;
        write_outbox(&tx, &outbox, now)?;
        tx.commit().map_err(IngestStoreError::from)?;
        Ok(())
    }

    fn downlink_after(
        &self,
        node_id: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<Downlink>, IngestStoreError> {
        let conn = self.connection();
        let mut q = conn.prepare_cached(
            "SELECT body FROM downlink_outbox WHERE node_id = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
        )?;
        let rows = q.query_map(params![node_id, seq_i64(after)?, limit as i64], |r| {
            r.get::<_, Vec<u8>>(0)
        })?;
        let mut out = Vec::new();
        for body in rows {
            out.push(from_outbox(&body?)?);
        }
        Ok(out)
    }

    fn downlink_applied(&self, node_id: &str, seq: u64) -> Result<(), IngestStoreError> {
        let seq = seq_i64(seq)?;
        let mut conn = self.connection();
        let tx = conn.transaction()?;
        tx.execute(
            "UPDATE downlink_nodes SET applied = MAX(applied, MIN(?2, last_seq)) WHERE node_id = ?1",
            params![node_id, seq],
        )?;
        tx.execute(
            "DELETE FROM downlink_outbox WHERE node_id = ?1
             AND seq <= (SELECT applied FROM downlink_nodes WHERE node_id = ?1)",
            [node_id],
        )?;
        tx.commit()?;
        Ok(())
    }

    fn bill_lines(
        &self,
        imsi: &Imsi,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<SubscriberBill, IngestStoreError> {
        let conn = self.connection();
        let (from_s, to_s) = (from_ms.div_euclid(1000), to_ms.div_euclid(1000));
        let mut bill = SubscriberBill {
            imsi: imsi.to_string(),
            from_ms,
            to_ms,
            ..SubscriberBill::default()
        };
        let mut packages = conn.prepare_cached(
            "SELECT id, kind, tier, allowance, valid_from, expires_at, sold_at
             FROM charging_packages WHERE imsi = ?1 AND sold_at >= ?2 AND sold_at < ?3
             ORDER BY sold_at, id",
        )?;
        let rows = packages.query_map(params![imsi.as_str(), from_s, to_s], |r| {
            Ok(BilledPackage {
                id: r.get(0)?,
                kind: r.get(1)?,
                tier: r.get(2)?,
                allowance: r.get::<_, i64>(3)? as u64,
                valid_from: r.get(4)?,
                expires_at: r.get(5)?,
                sold_at: r.get(6)?,
            })
        })?;
        bill.packages = rows.collect::<Result<_, _>>()?;
        let mut granted = conn.prepare_cached(
            "SELECT node_id, COUNT(*), SUM(tokens) FROM charging_grants
             WHERE imsi = ?1 AND granted_at >= ?2 AND granted_at < ?3
             GROUP BY node_id ORDER BY node_id",
        )?;
        let rows = granted.query_map(params![imsi.as_str(), from_s, to_s], |r| {
            Ok(GrantedToBox {
                node_id: r.get(0)?,
                grants: r.get::<_, i64>(1)? as u64,
                tokens: r.get::<_, i64>(2)? as u64,
            })
        })?;
        bill.granted = rows.collect::<Result<_, _>>()?;
        let mut used = conn.prepare_cached(
            "SELECT node_id, model, COUNT(*), SUM(from_grant + from_balance), SUM(overage)
             FROM charging_settlements WHERE imsi = ?1 AND ended_ms >= ?2 AND ended_ms < ?3
             GROUP BY node_id, model ORDER BY node_id, model",
        )?;
        let rows = used.query_map(params![imsi.as_str(), from_ms, to_ms], |r| {
            Ok(UsedLine {
                node_id: r.get(0)?,
                model: r.get(1)?,
                records: r.get::<_, i64>(2)? as u64,
                tokens: r.get::<_, i64>(3)? as u64,
                overage: r.get::<_, i64>(4)? as u64,
            })
        })?;
        bill.used = rows.collect::<Result<_, _>>()?;
        Ok(bill)
    }

    fn subscribers_billed(&self, from_ms: i64, to_ms: i64) -> Result<Vec<Imsi>, IngestStoreError> {
        let conn = self.connection();
        let mut stmt = conn.prepare_cached(
            "SELECT imsi FROM charging_settlements WHERE ended_ms >= ?1 AND ended_ms < ?2
             UNION
             SELECT imsi FROM charging_packages WHERE sold_at >= ?3 AND sold_at < ?4
             ORDER BY 1",
        )?;
        let rows = stmt.query_map(
            params![
                from_ms,
                to_ms,
                from_ms.div_euclid(1000),
                to_ms.div_euclid(1000)
            ],
            |r| r.get::<_, String>(0),
        )?;
        rows.map(|r| imsi_of(r?)).collect()
    }

    fn nodes_unsettled(&self) -> Result<Vec<String>, IngestStoreError> {
        let conn = self.connection();
        let mut stmt = conn.prepare_cached(
            "SELECT n.node_id FROM nodes n
             LEFT JOIN charging_settled_through s ON s.node_id = n.node_id
             WHERE n.contiguous_seq > COALESCE(s.seq, 0) ORDER BY n.node_id",
        )?;
        let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn settled_through(&self, node_id: &str) -> Result<u64, IngestStoreError> {
        let seq: Option<i64> = self
            .connection()
            .query_row(
                "SELECT seq FROM charging_settled_through WHERE node_id = ?1",
                [node_id],
                |r| r.get(0),
            )
            .optional()?;
        Ok(seq.unwrap_or(0) as u64)
    }

    fn set_settled_through(&self, node_id: &str, seq: u64) -> Result<(), IngestStoreError> {
        self.connection().execute(
            "INSERT INTO charging_settled_through (node_id, seq) VALUES (?1, ?2)
             ON CONFLICT(node_id) DO UPDATE SET seq = MAX(seq, excluded.seq)",
            params![node_id, seq_i64(seq)?],
        )?;
        Ok(())
    }

    fn downlink_lasts(&self, nodes: &[String]) -> Result<Vec<(String, u64)>, IngestStoreError> {
        let conn = self.connection();
        let mut stmt =
            conn.prepare_cached("SELECT last_seq FROM downlink_nodes WHERE node_id = ?1")?;
        let mut out = Vec::new();
        for node in nodes {
            if let Some(last) = stmt.query_row([node], |r| r.get::<_, i64>(0)).optional()? {
                out.push((node.clone(), last as u64));
            }
        }
        Ok(out)
    }

    fn downlink_raise(&self, node_id: &str, seq: u64) -> Result<(), IngestStoreError> {
        let seq = seq_i64(seq)?;
        self.connection().execute(
            "INSERT INTO downlink_nodes (node_id, last_seq, applied) VALUES (?1, ?2, ?2)
             ON CONFLICT(node_id) DO UPDATE SET last_seq = MAX(last_seq, excluded.last_seq),
                 applied = MAX(applied, excluded.applied)",
            params![node_id, seq],
        )?;
        Ok(())
    }

    fn downlink_last(&self, node_id: &str) -> Result<u64, IngestStoreError> {
        let last: Option<i64> = self
            .connection()
            .query_row(
                "SELECT last_seq FROM downlink_nodes WHERE node_id = ?1",
                [node_id],
                |r| r.get(0),
            )
            .optional()?;
        Ok(last.unwrap_or(0) as u64)
    }

    fn package_owner(&self, id: &str) -> Result<Option<Imsi>, IngestStoreError> {
        let owner: Option<String> = self
            .connection()
            .query_row(
                "SELECT imsi FROM charging_packages WHERE id = ?1",
                [id],
                |r| r.get(0),
            )
            .optional()?;
        owner.map(imsi_of).transpose()
    }

    fn subscribers_with_grants_ending_by(
        &self,
        t: Timestamp,
    ) -> Result<Vec<Imsi>, IngestStoreError> {
        let conn = self.connection();
        let mut q = conn.prepare(
            "SELECT DISTINCT imsi FROM charging_grants WHERE open = 1 AND expires_at <= ?1 ORDER BY imsi",
        )?;
        let rows = q.query_map([t], |r| r.get::<_, String>(0))?;
        let mut out = Vec::new();
        for r in rows {
            out.push(imsi_of(r?)?);
        }
        Ok(out)
    }
}
