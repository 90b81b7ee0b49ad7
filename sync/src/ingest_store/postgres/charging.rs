//! The core's packages and grants in the PostgreSQL store
//! ([`crate::charging_store`]): the subscriber's row locked (`SELECT ...
//! FOR UPDATE`) from load to save, so that instances judge one
//! subscriber's operations one after the other; ids from sequences.

use std::collections::HashSet;

use mec_metering::charging::{
    Charging, Grant, Package, PackageSpec, Settlement, SubscriberState, Usage,
};
use mec_metering::{Bucket, Imsi, Timestamp};

use super::PgStore;
use crate::charging_store::{
    from_json, from_outbox, kind_from, outbox_body, to_json, BilledPackage, ChargingOp,
    ChargingStore, ChargingStoreError, GrantedToBox, Outbox, SubscriberBill, UsedLine,
};
use crate::ingest_store::{seq_i64, IngestStoreError};
use crate::wire::pb::Downlink;
use mec_metering::charging::ChargingError;

/// Schema version 2: the charging tables.
pub(super) const SCHEMA_V2: &str = "
CREATE TABLE charging_subscribers (
    imsi    TEXT   PRIMARY KEY,
    used    BIGINT NOT NULL,
    overage BIGINT NOT NULL
);
CREATE SEQUENCE charging_bucket_ids;
CREATE SEQUENCE charging_grant_ids;
CREATE TABLE charging_packages (
    id          TEXT    PRIMARY KEY,
    imsi        TEXT    NOT NULL,
    bucket_id   BIGINT  NOT NULL UNIQUE,
    kind        TEXT    NOT NULL,
    allowance   BIGINT  NOT NULL,
    valid_from  BIGINT  NOT NULL,
    expires_at  BIGINT  NOT NULL,
    tier        TEXT    NOT NULL,
    models      TEXT    NOT NULL,
    used        BIGINT  NOT NULL,
    used_period INTEGER NOT NULL,
    revoked     BOOLEAN NOT NULL,
    sold_at     BIGINT  NOT NULL,
    request     TEXT    NOT NULL
);
CREATE INDEX charging_packages_by_imsi ON charging_packages (imsi);
CREATE TABLE charging_grants (
    id                BIGINT  PRIMARY KEY,
    node_id           TEXT    NOT NULL,
    imsi              TEXT    NOT NULL,
    model             TEXT,
    tokens            BIGINT  NOT NULL,
    used              BIGINT  NOT NULL,
    granted_at        BIGINT  NOT NULL,
    expires_at        BIGINT  NOT NULL,
    threshold         BIGINT  NOT NULL,
    offline_allowance BIGINT  NOT NULL,
    final_unit_action TEXT    NOT NULL,
    revoked           BOOLEAN NOT NULL,
    holds             TEXT    NOT NULL,
    open              BOOLEAN NOT NULL,
    closed_at         BIGINT
);
CREATE INDEX charging_grants_open ON charging_grants (imsi) WHERE open;
CREATE INDEX charging_grants_expiring ON charging_grants (expires_at) WHERE open;
CREATE TABLE downlink_nodes (
    node_id  TEXT   PRIMARY KEY,
    last_seq BIGINT NOT NULL,
    applied  BIGINT NOT NULL
);
CREATE TABLE downlink_outbox (
    node_id TEXT   NOT NULL,
    seq     BIGINT NOT NULL,
    body    BYTEA  NOT NULL,
    made_at BIGINT NOT NULL,
    PRIMARY KEY (node_id, seq)
);
CREATE TABLE charging_settlements (
    node_id      TEXT   NOT NULL,
    seq          BIGINT NOT NULL,
    imsi         TEXT   NOT NULL,
    grant_id     BIGINT,
    tokens       BIGINT NOT NULL,
    from_grant   BIGINT NOT NULL,
    from_balance BIGINT NOT NULL,
    overage      BIGINT NOT NULL,
    settled_at   BIGINT NOT NULL,
    PRIMARY KEY (node_id, seq)
);
";

/// Schema version 4: where each node's records are settled up to (the
/// settlement of uploaded records against the packages), and the bill's
/// lines (the model each settlement served, and when).
pub(super) const SCHEMA_V4: &str = "
CREATE TABLE charging_settled_through (
    node_id TEXT   PRIMARY KEY,
    seq     BIGINT NOT NULL
);
-- What nodes uploaded before settlement existed is not settled against
-- packages sold at the core: their cursors start where they are.
INSERT INTO charging_settled_through (node_id, seq)
    SELECT node_id, contiguous_seq FROM nodes;
ALTER TABLE charging_settlements
    ADD COLUMN model    TEXT   NOT NULL DEFAULT '',
    ADD COLUMN ended_ms BIGINT NOT NULL DEFAULT 0;
CREATE INDEX charging_settlements_by_imsi ON charging_settlements (imsi, ended_ms);
CREATE INDEX charging_settlements_by_end ON charging_settlements (ended_ms);
CREATE INDEX charging_packages_by_sale ON charging_packages (sold_at);
";

fn imsi_of(text: &str) -> Result<Imsi, IngestStoreError> {
    Imsi::parse(text).map_err(|e| {
        IngestStoreError::Location("charging".into(), format!("stored IMSI {text:?}: {e}"))
    })
}

impl PgStore {
    async fn load_subscriber(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
        imsi: &Imsi,
    ) -> Result<SubscriberState, IngestStoreError> {
        let mut state = SubscriberState::default();
        let rows = tx
            .query(
                "SELECT id, bucket_id, kind, allowance, valid_from, expires_at, tier, models, used,
                        used_period, revoked, request
                 FROM charging_packages WHERE imsi = $1 ORDER BY bucket_id",
                &[&imsi.as_str()],
            )
            .await
            .map_err(|e| self.err(e))?;
        for r in rows {
            let kind = kind_from(r.get(2))?;
            let (bucket_id, allowance): (i64, i64) = (r.get(1), r.get(3));
            let revoked: bool = r.get(10);
            let spec = PackageSpec {
                kind,
                allowance: allowance as u64,
                valid_from: r.get(4),
                expires_at: r.get(5),
                tier: r.get(6),
                models: from_json("a package's models", r.get(7))?,
            };
            let bucket = Bucket {
                id: bucket_id as u64,
                imsi: imsi.clone(),
                kind,
                allowance: allowance as u64,
                valid_from: spec.valid_from,
                expires_at: spec.expires_at,
                used: r.get::<_, i64>(8) as u64,
                used_period: r.get::<_, i32>(9) as u32,
                revoked,
                models: Vec::new(),
            };
            let package = Package {
                id: r.get(0),
                imsi: imsi.clone(),
                spec,
                bucket_id: bucket_id as u64,
                revoked,
                request: r.get(11),
            };
            state.packages.push((package, bucket));
        }
        let rows = tx
            .query(
                "SELECT id, node_id, model, tokens, used, granted_at, expires_at, threshold,
                        offline_allowance, final_unit_action, revoked, holds
                 FROM charging_grants WHERE imsi = $1 AND open ORDER BY id",
                &[&imsi.as_str()],
            )
            .await
            .map_err(|e| self.err(e))?;
        for r in rows {
            let n = |i: usize| r.get::<_, i64>(i);
            let grant = Grant {
                id: n(0) as u64,
                node_id: r.get(1),
                imsi: imsi.clone(),
                model: r.get(2),
                tokens: n(3) as u64,
                used: n(4) as u64,
                granted_at: n(5),
                expires_at: n(6),
                threshold: n(7) as u64,
                offline_allowance: n(8) as u64,
                final_unit_action: from_json("a grant's final-unit action", r.get(9))?,
                revoked: r.get(10),
            };
            state
                .grants
                .push((grant, from_json("a grant's holds", r.get(11))?));
        }
        let totals = tx
            .query_one(
                "SELECT used, overage FROM charging_subscribers WHERE imsi = $1",
                &[&imsi.as_str()],
            )
            .await
            .map_err(|e| self.err(e))?;
        state.used = totals.get::<_, i64>(0) as u64;
        state.overage = totals.get::<_, i64>(1) as u64;
        Ok(state)
    }

    async fn save_subscriber(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
        imsi: &Imsi,
        state: &SubscriberState,
        open_before: &HashSet<u64>,
        settlements: &[(Usage, Settlement)],
        now: Timestamp,
    ) -> Result<(), ChargingStoreError> {
        let err = |e| self.err(e);
        // A package is only ever updated by its own subscriber's operation:
        // an id that another subscriber's sale took meanwhile changes no
        // row, and is this sale's id conflict.
        let package = tx
            .prepare_cached(
                "INSERT INTO charging_packages (id, imsi, bucket_id, kind, allowance, valid_from,
                     expires_at, tier, models, used, used_period, revoked, sold_at, request)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)
                 ON CONFLICT (id) DO UPDATE SET used = excluded.used,
                     used_period = excluded.used_period, revoked = excluded.revoked
                 WHERE charging_packages.imsi = excluded.imsi",
            )
            .await
            .map_err(err)?;
        for (p, b) in &state.packages {
            let changed = tx
                .execute(
                    &package,
                    &[
                        &p.id,
                        &imsi.as_str(),
                        &(b.id as i64),
                        &b.kind.as_str(),
                        &(b.allowance as i64),
                        &b.valid_from,
                        &b.expires_at,
                        &p.spec.tier,
                        &to_json(&p.spec.models),
                        &(b.used as i64),
                        &(b.used_period as i32),
                        &p.revoked,
                        &now,
                        &p.request,
                    ],
                )
                .await
                .map_err(err)?;
            if changed == 0 {
                return Err(ChargingError::IdConflict(p.id.clone()).into());
            }
        }
        let grant = tx
            .prepare_cached(
                "INSERT INTO charging_grants (id, node_id, imsi, model, tokens, used, granted_at,
                     expires_at, threshold, offline_allowance, final_unit_action, revoked, holds,
                     open)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, true)
                 ON CONFLICT (id) DO UPDATE SET used = excluded.used,
                     revoked = excluded.revoked, holds = excluded.holds",
            )
            .await
            .map_err(err)?;
        let mut open_after = HashSet::new();
        for (g, holds) in &state.grants {
            open_after.insert(g.id);
            tx.execute(
                &grant,
                &[
                    &(g.id as i64),
                    &g.node_id,
                    &imsi.as_str(),
                    &g.model,
                    &(g.tokens as i64),
                    &(g.used as i64),
                    &g.granted_at,
                    &g.expires_at,
                    &(g.threshold as i64),
                    &(g.offline_allowance as i64),
                    &to_json(&g.final_unit_action),
                    &g.revoked,
                    &to_json(holds),
                ],
            )
            .await
            .map_err(err)?;
        }
        let closed: Vec<i64> = open_before
            .difference(&open_after)
            .map(|&id| id as i64)
            .collect();
        if !closed.is_empty() {
            tx.execute(
                "UPDATE charging_grants SET open = false, closed_at = $2, holds = '[]'
                 WHERE id = ANY($1)",
                &[&closed, &now],
            )
            .await
            .map_err(err)?;
        }
        let settled = tx
            .prepare_cached(
                "INSERT INTO charging_settlements (node_id, seq, imsi, grant_id, tokens,
                     from_grant, from_balance, overage, settled_at, model, ended_ms)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
            )
            .await
            .map_err(err)?;
        for (u, s) in settlements {
            tx.execute(
                &settled,
                &[
                    &u.node_id,
                    &(u.seq as i64),
                    &imsi.as_str(),
                    &u.grants.first().map(|g| g.0 as i64),
                    &(u.tokens as i64),
                    &(s.from_grant as i64),
                    &(s.from_balance as i64),
                    &(s.overage as i64),
                    &now,
                    &u.model.as_deref().unwrap_or(""),
                    &u.ended_ms,
                ],
            )
            .await
            .map_err(err)?;
        }
        tx.execute(
            "UPDATE charging_subscribers SET used = $2, overage = $3 WHERE imsi = $1",
            &[
                &imsi.as_str(),
                &(state.used as i64),
                &(state.overage as i64),
            ],
        )
        .await
        .map_err(err)?;
        Ok(())
    }
}

impl PgStore {
    /// Appends `outbox`'s messages to their nodes' downlinks, numbered on
    /// (each node's row locked, nodes in one order, until the commit).
    async fn write_outbox(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
        outbox: &Outbox,
        now: Timestamp,
    ) -> Result<(), IngestStoreError> {
        for (node, kinds) in outbox.by_node() {
            tx.execute(
                "INSERT INTO downlink_nodes (node_id, last_seq, applied) VALUES ($1, 0, 0)
                 ON CONFLICT (node_id) DO NOTHING",
                &[&node],
            )
            .await
            .map_err(|e| self.err(e))?;
            for kind in kinds {
                let seq: i64 = tx
                    .query_one(
                        "UPDATE downlink_nodes SET last_seq = last_seq + 1 WHERE node_id = $1 RETURNING last_seq",
                        &[&node],
                    )
                    .await
                    .map_err(|e| self.err(e))?
                    .get(0);
                let body = outbox_body(seq, kind);
                tx.execute(
                    "INSERT INTO downlink_outbox (node_id, seq, body, made_at) VALUES ($1, $2, $3, $4)",
                    &[&node, &seq, &body, &now],
                )
                .await
                .map_err(|e| self.err(e))?;
            }
        }
        Ok(())
    }
}

impl ChargingStore for PgStore {
    fn with_subscriber(
        &self,
        imsi: &Imsi,
        settle_keys: &[(String, u64)],
        now: Timestamp,
        op: ChargingOp<'_>,
    ) -> Result<(), ChargingStoreError> {
        self.block_on(async {
            let mut client = self.client().await?;
            let tx = self.begin(&mut client).await?;
            // The row first (a new subscriber's totals are zero), then the
            // lock: a second instance waits here until the first commits.
            tx.execute(
                "INSERT INTO charging_subscribers (imsi, used, overage) VALUES ($1, 0, 0)
                 ON CONFLICT (imsi) DO NOTHING",
                &[&imsi.as_str()],
            )
            .await
            .map_err(|e| self.err(e))?;
            tx.execute(
                "SELECT 1 FROM charging_subscribers WHERE imsi = $1 FOR UPDATE",
                &[&imsi.as_str()],
            )
            .await
            .map_err(|e| self.err(e))?;
            let state = self.load_subscriber(&tx, imsi).await?;
            let open_before: HashSet<u64> = state.grants.iter().map(|(g, _)| g.id).collect();
            let ids = tx
                .query_one(
                    "SELECT nextval('charging_bucket_ids'), nextval('charging_grant_ids')",
                    &[],
                )
                .await
                .map_err(|e| self.err(e))?;
            let mut c = Charging::new();
            c.reserve_ids(ids.get::<_, i64>(0) as u64, ids.get::<_, i64>(1) as u64);
            c.restore(imsi, state)?;
            if !settle_keys.is_empty() {
                let nodes: Vec<&str> = settle_keys.iter().map(|(n, _)| n.as_str()).collect();
                let seqs: Vec<i64> = settle_keys.iter().map(|(_, s)| *s as i64).collect();
                let seen = tx
                    .query(
                        "SELECT s.node_id, s.seq FROM charging_settlements s
                         JOIN unnest($1::text[], $2::bigint[]) AS k(node_id, seq)
                           ON s.node_id = k.node_id AND s.seq = k.seq",
                        &[&nodes, &seqs],
                    )
                    .await
                    .map_err(|e| self.err(e))?;
                for r in seen {
                    c.settled_before(r.get(0), r.get::<_, i64>(1) as u64);
                }
            }
            let mut outbox = Outbox::default();
            op(&mut c, &mut outbox)?;
            let settlements = c.take_settlements();
            self.save_subscriber(&tx, imsi, &c.state(imsi), &open_before, &settlements, now)
                .await?;
            self.write_outbox(&tx, &outbox, now).await?;
            tx.commit().await.map_err(|e| self.err(e))?;
            Ok(())
        })
    }

    fn downlink_after(
        &self,
        node_id: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<Downlink>, IngestStoreError> {
        self.rows(
            "SELECT body FROM downlink_outbox WHERE node_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
            &[&node_id, &seq_i64(after)?, &(limit as i64)],
        )?
        .iter()
        .map(|r| {
            from_outbox(r.get::<_, &[u8]>(0))
        })
        .collect()
    }

    fn downlink_applied(&self, node_id: &str, seq: u64) -> Result<(), IngestStoreError> {
        self.rows(
            "WITH done AS (
                 UPDATE downlink_nodes SET applied = GREATEST(applied, LEAST($2, last_seq))
                 WHERE node_id = $1 RETURNING applied)
             DELETE FROM downlink_outbox WHERE node_id = $1 AND seq <= (SELECT applied FROM done)",
            &[&node_id, &seq_i64(seq)?],
        )?;
        Ok(())
    }

    fn bill_lines(
        &self,
        imsi: &Imsi,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<SubscriberBill, IngestStoreError> {
        let (from_s, to_s) = (from_ms.div_euclid(1000), to_ms.div_euclid(1000));
        let n = |r: &tokio_postgres::Row, i: usize| r.get::<_, i64>(i) as u64;
        let packages = self
            .rows(
                "SELECT id, kind, tier, allowance, valid_from, expires_at, sold_at
                 FROM charging_packages WHERE imsi = $1 AND sold_at >= $2 AND sold_at < $3
                 ORDER BY sold_at, id",
                &[&imsi.as_str(), &from_s, &to_s],
            )?
            .iter()
            .map(|r| BilledPackage {
                id: r.get(0),
                kind: r.get(1),
                tier: r.get(2),
                allowance: n(r, 3),
                valid_from: r.get(4),
                expires_at: r.get(5),
                sold_at: r.get(6),
            })
            .collect();
        let granted = self
            .rows(
                "SELECT node_id, COUNT(*)::BIGINT, SUM(tokens)::BIGINT FROM charging_grants
                 WHERE imsi = $1 AND granted_at >= $2 AND granted_at < $3
                 GROUP BY node_id ORDER BY node_id",
                &[&imsi.as_str(), &from_s, &to_s],
            )?
            .iter()
            .map(|r| GrantedToBox {
                node_id: r.get(0),
                grants: n(r, 1),
                tokens: n(r, 2),
            })
            .collect();
        let used = self
            .rows(
                "SELECT node_id, model, COUNT(*)::BIGINT, SUM(from_grant + from_balance)::BIGINT,
                        SUM(overage)::BIGINT
                 FROM charging_settlements WHERE imsi = $1 AND ended_ms >= $2 AND ended_ms < $3
                 GROUP BY node_id, model ORDER BY node_id, model",
                &[&imsi.as_str(), &from_ms, &to_ms],
            )?
            .iter()
            .map(|r| UsedLine {
                node_id: r.get(0),
                model: r.get(1),
                records: n(r, 2),
                tokens: n(r, 3),
                overage: n(r, 4),
            })
            .collect();
        Ok(SubscriberBill {
            imsi: imsi.to_string(),
            from_ms,
            to_ms,
            packages,
            granted,
            used,
            ..SubscriberBill::default()
        })
    }

    fn subscribers_billed(&self, from_ms: i64, to_ms: i64) -> Result<Vec<Imsi>, IngestStoreError> {
        let rows = self.rows(
            "SELECT imsi FROM charging_settlements WHERE ended_ms >= $1 AND ended_ms < $2
             UNION
             SELECT imsi FROM charging_packages WHERE sold_at >= $3 AND sold_at < $4
             ORDER BY 1",
            &[
                &from_ms,
                &to_ms,
                &from_ms.div_euclid(1000),
                &to_ms.div_euclid(1000),
            ],
        )?;
        rows.iter().map(|r| imsi_of(r.get::<_, &str>(0))).collect()
    }

    fn nodes_unsettled(&self) -> Result<Vec<String>, IngestStoreError> {
        let rows = self.rows(
            "SELECT n.node_id FROM nodes n
             LEFT JOIN charging_settled_through s ON s.node_id = n.node_id
             WHERE n.contiguous_seq > COALESCE(s.seq, 0) ORDER BY n.node_id",
            &[],
        )?;
        Ok(rows.iter().map(|r| r.get::<_, String>(0)).collect())
    }

    fn settled_through(&self, node_id: &str) -> Result<u64, IngestStoreError> {
        let rows = self.rows(
            "SELECT seq FROM charging_settled_through WHERE node_id = $1",
            &[&node_id],
        )?;
        Ok(rows.first().map_or(0, |r| r.get::<_, i64>(0) as u64))
    }

    fn set_settled_through(&self, node_id: &str, seq: u64) -> Result<(), IngestStoreError> {
        self.rows(
            "INSERT INTO charging_settled_through (node_id, seq) VALUES ($1, $2)
             ON CONFLICT (node_id) DO UPDATE
             SET seq = GREATEST(charging_settled_through.seq, excluded.seq)",
            &[&node_id, &seq_i64(seq)?],
        )?;
        Ok(())
    }

    fn downlink_lasts(&self, nodes: &[String]) -> Result<Vec<(String, u64)>, IngestStoreError> {
        let rows = self.rows(
            "SELECT node_id, last_seq FROM downlink_nodes WHERE node_id = ANY($1)",
            &[&nodes],
        )?;
        Ok(rows
            .iter()
            .map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1) as u64))
            .collect())
    }

    fn downlink_raise(&self, node_id: &str, seq: u64) -> Result<(), IngestStoreError> {
        self.rows(
            "INSERT INTO downlink_nodes (node_id, last_seq, applied) VALUES ($1, $2, $2)
             ON CONFLICT (node_id) DO UPDATE
             SET last_seq = GREATEST(downlink_nodes.last_seq, excluded.last_seq),
                 applied = GREATEST(downlink_nodes.applied, excluded.applied)",
            &[&node_id, &seq_i64(seq)?],
        )?;
        Ok(())
    }

    fn downlink_last(&self, node_id: &str) -> Result<u64, IngestStoreError> {
        let rows = self.rows(
            "SELECT last_seq FROM downlink_nodes WHERE node_id = $1",
            &[&node_id],
        )?;
        Ok(rows.first().map_or(0, |r| r.get::<_, i64>(0) as u64))
    }

    fn package_owner(&self, id: &str) -> Result<Option<Imsi>, IngestStoreError> {
        let rows = self.rows("SELECT imsi FROM charging_packages WHERE id = $1", &[&id])?;
        rows.first()
            .map(|r| imsi_of(r.get::<_, &str>(0)))
            .transpose()
    }

    fn subscribers_with_grants_ending_by(
        &self,
        t: Timestamp,
    ) -> Result<Vec<Imsi>, IngestStoreError> {
        self.rows(
            "SELECT DISTINCT imsi FROM charging_grants WHERE open AND expires_at <= $1 ORDER BY imsi",
            &[&t],
        )?
        .iter()
        .map(|r| imsi_of(r.get::<_, &str>(0)))
        .collect()
    }
}
