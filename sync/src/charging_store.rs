//! The core's packages and grants in its store (issue 23). The rules are
//! `mec_metering::charging`'s; this is how the core keeps their state in
//! the database it already has, so that any core-ingest instance can serve
//! any operation: each operation loads one subscriber's state with the
//! subscriber locked (`BEGIN IMMEDIATE` on SQLite, `SELECT ... FOR UPDATE`
//! of its row on PostgreSQL), applies the rule, and saves what changed in
//! the same transaction. Two boxes asking at once for one subscriber are
//! judged one after the other; a settlement is kept once by its (node, seq)
//! key whatever instance sees the record.
//!
//! A store implements three methods ([`ChargingStore::with_subscriber`],
//! [`ChargingStore::package_owner`], [`ChargingStore::subscribers_with_grants_ending_by`]);
//! the operations are written once, here.

use mec_metering::charging::{
    Account, Charging, ChargingError, FinalUnitAction, Grant, GrantPolicy, PackageSpec, Settlement,
    Usage,
};
use mec_metering::{BucketKind, Imsi, Timestamp};

use crate::ingest_store::IngestStoreError;
use crate::wire::pb::{self, downlink};

/// One operation on one subscriber's state; what it puts in the outbox is
/// written in the same transaction.
pub type ChargingOp<'a> =
    &'a mut dyn FnMut(&mut Charging, &mut Outbox) -> Result<(), ChargingError>;

/// Downlink messages an operation sends, to each node's numbered outbox
/// (`sync.proto`: grants and revocations reach the box on its downlink
/// stream, sent again until it acknowledges them).
#[derive(Debug, Default)]
pub struct Outbox {
    /// (node, message), in the order made.
    pub messages: Vec<(String, downlink::Kind)>,
}

impl Outbox {
    /// The messages by node (sorted, so that transactions lock nodes' rows
    /// in one order), each node's in the order made.
    pub fn by_node(&self) -> Vec<(&str, Vec<&downlink::Kind>)> {
        let mut nodes: Vec<&str> = self.messages.iter().map(|(n, _)| n.as_str()).collect();
        nodes.sort();
        nodes.dedup();
        nodes
            .into_iter()
            .map(|n| {
                let mine = self
                    .messages
                    .iter()
                    .filter(|(m, _)| m == n)
                    .map(|(_, k)| k)
                    .collect();
                (n, mine)
            })
            .collect()
    }
}

/// The stored form of downlink message `seq` (the core's time is set when
/// it is sent).
pub(crate) fn outbox_body(seq: i64, kind: &downlink::Kind) -> Vec<u8> {
    use prost::Message;
    pb::Downlink {
        seq: seq as u64,
        core_time_unix_s: 0,
        kind: Some(kind.clone()),
    }
    .encode_to_vec()
}

/// A stored downlink message read back.
pub(crate) fn from_outbox(body: &[u8]) -> Result<pb::Downlink, IngestStoreError> {
    use prost::Message;
    pb::Downlink::decode(body).map_err(|e| {
        IngestStoreError::Location(
            "downlink".into(),
            format!("a stored message does not decode: {e}"),
        )
    })
}

/// The downlink message of a grant (answering `request_id`, 0: none).
pub fn grant_message(g: &Grant, request_id: u64) -> downlink::Kind {
    downlink::Kind::Grant(pb::Grant {
        grant_id: g.id,
        imsi: g.imsi.to_string(),
        model: g.model.clone().unwrap_or_default(),
        tokens: g.tokens,
        expires_at_unix_s: g.expires_at,
        threshold: g.threshold,
        offline_allowance: g.offline_allowance,
        final_unit_models: match &g.final_unit_action {
            FinalUnitAction::Refuse => Vec::new(),
            FinalUnitAction::RestrictTo(models) => models.clone(),
        },
        request_id,
    })
}

/// A subscriber's bill for a period (a month, say): what was bought, what
/// each box was granted, what each box served of which model, what was
/// served beyond the balance, and what is left now.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct SubscriberBill {
    /// The subscriber.
    pub imsi: String,
    /// The period's start (Unix ms, inclusive).
    pub from_ms: i64,
    /// Its end (Unix ms, exclusive).
    pub to_ms: i64,
    /// Packages sold in the period.
    pub packages: Vec<BilledPackage>,
    /// Grants made in the period, per box.
    pub granted: Vec<GrantedToBox>,
    /// Tokens served in the period (by the records' end), per box and model.
    pub used: Vec<UsedLine>,
    /// Σ of the packages' allowances (a month's, for monthly ones).
    pub tokens_bought: u64,
    /// Σ granted to boxes.
    pub tokens_granted: u64,
    /// Σ served and paid by the packages.
    pub tokens_used: u64,
    /// Σ served beyond the balance.
    pub overage: u64,
    /// Left now, neither used nor served beyond: held by boxes or not.
    pub remaining: u64,
}

/// A package on a bill.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct BilledPackage {
    /// The operator's id for the sale.
    pub id: String,
    /// monthly, topup or trial.
    pub kind: String,
    /// The tier's name.
    pub tier: String,
    /// Tokens (a month's, for monthly).
    pub allowance: u64,
    /// Validity (Unix seconds).
    pub valid_from: Timestamp,
    /// End of validity (Unix seconds).
    pub expires_at: Timestamp,
    /// When it was sold (the core's clock, Unix seconds).
    pub sold_at: Timestamp,
}

/// What one box was granted.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct GrantedToBox {
    /// The box.
    pub node_id: String,
    /// Grants made.
    pub grants: u64,
    /// Tokens they held.
    pub tokens: u64,
}

/// What one box served of one model.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct UsedLine {
    /// The box.
    pub node_id: String,
    /// The model.
    pub model: String,
    /// Requests (records).
    pub records: u64,
    /// Tokens paid by the packages.
    pub tokens: u64,
    /// Tokens served beyond the balance.
    pub overage: u64,
}

/// What an operation on the core's packages fails with.
#[derive(Debug, thiserror::Error)]
pub enum ChargingStoreError {
    /// The rules refused it (no quota, an id sold before...).
    #[error(transparent)]
    Refused(#[from] ChargingError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] IngestStoreError),
}

impl From<rusqlite::Error> for ChargingStoreError {
    fn from(e: rusqlite::Error) -> Self {
        ChargingStoreError::Store(IngestStoreError::Sqlite(e))
    }
}

/// The core's packages, grants and settlements, kept in its store.
pub trait ChargingStore: Send + Sync {
    /// Runs `op` on `imsi`'s state (a [`Charging`] holding only that
    /// subscriber, its ids counters set from the store's) in one
    /// transaction, the subscriber locked from load to save, and saves what
    /// it changed: packages, grants (those gone are closed), settlements
    /// made (`Charging::take_settlements`), totals. `settle_keys` are the
    /// (node, seq) the op may settle: those the store settled before are
    /// marked so first. Nothing is saved when `op` fails.
    fn with_subscriber(
        &self,
        imsi: &Imsi,
        settle_keys: &[(String, u64)],
        now: Timestamp,
        op: ChargingOp<'_>,
    ) -> Result<(), ChargingStoreError>;

    /// Whose package `id` is, if it was sold.
    fn package_owner(&self, id: &str) -> Result<Option<Imsi>, IngestStoreError>;

    /// `node_id`'s downlink messages after seq `after`, in order, at most
    /// `limit` (their `core_time_unix_s` is the sender's to set).
    fn downlink_after(
        &self,
        node_id: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<pb::Downlink>, IngestStoreError>;

    /// `node_id` applied every downlink message up to `seq` durably: they
    /// are dropped from its outbox (at most up to the last one made).
    fn downlink_applied(&self, node_id: &str, seq: u64) -> Result<(), IngestStoreError>;

    /// `imsi`'s bill lines for `[from_ms, to_ms)`: packages sold, grants
    /// made and settlements of records ending in it (totals and
    /// `remaining` are [`ChargingStore::bill`]'s).
    fn bill_lines(
        &self,
        imsi: &Imsi,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<SubscriberBill, IngestStoreError>;

    /// Subscribers with a package sold or a record settled in
    /// `[from_ms, to_ms)`, in order.
    fn subscribers_billed(&self, from_ms: i64, to_ms: i64) -> Result<Vec<Imsi>, IngestStoreError>;

    /// Every record of `node_id` at or below this seq is settled.
    fn settled_through(&self, node_id: &str) -> Result<u64, IngestStoreError>;

    /// Nodes holding records beyond their settlement cursor (what a crash
    /// or a failed settlement left, swept periodically).
    fn nodes_unsettled(&self) -> Result<Vec<String>, IngestStoreError>;

    /// Records that every record of `node_id` at or below `seq` is settled
    /// (never moves back).
    fn set_settled_through(&self, node_id: &str, seq: u64) -> Result<(), IngestStoreError>;

    /// The seq of the last downlink message made for `node_id` (0: none).
    fn downlink_last(&self, node_id: &str) -> Result<u64, IngestStoreError>;

    /// `node_id` applied messages up to `seq`, beyond what this store ever
    /// made for it (the store was restored from a backup, or moved): its
    /// numbering goes on after `seq`, so that no new message takes a seq
    /// the box would take for one it applied.
    fn downlink_raise(&self, node_id: &str, seq: u64) -> Result<(), IngestStoreError>;

    /// [`ChargingStore::downlink_last`] of each of `nodes` that has had a
    /// message (one query: the instance's watch over its connected boxes).
    fn downlink_lasts(&self, nodes: &[String]) -> Result<Vec<(String, u64)>, IngestStoreError>;

    /// Subscribers with an open grant expiring at or before `t`.
    fn subscribers_with_grants_ending_by(
        &self,
        t: Timestamp,
    ) -> Result<Vec<Imsi>, IngestStoreError>;

    /// Sells `spec` to `imsi` under the operator's `id`; `request` is the
    /// sale as the operator asked for it (`Package::request`). `Ok(false)`
    /// when that sale was made before (the same id, the same request).
    fn sell(
        &self,
        id: &str,
        imsi: &Imsi,
        spec: &PackageSpec,
        request: &str,
        now: Timestamp,
    ) -> Result<bool, ChargingStoreError> {
        if let Some(owner) = self.package_owner(id)? {
            if &owner != imsi {
                return Err(ChargingError::IdConflict(id.to_string()).into());
            }
        }
        let mut new = false;
        self.with_subscriber(imsi, &[], now, &mut |c, _| {
            new = c.sell(id, imsi, spec.clone(), request)?;
            Ok(())
        })?;
        Ok(new)
    }

    /// Revokes package `id`; returns the open grants holding its tokens.
    fn revoke(&self, id: &str, now: Timestamp) -> Result<Vec<Grant>, ChargingStoreError> {
        let imsi = self
            .package_owner(id)?
            .ok_or_else(|| ChargingError::UnknownPackage(id.to_string()))?;
        let mut hit = Vec::new();
        self.with_subscriber(&imsi, &[], now, &mut |c, outbox| {
            hit = c.revoke(id)?;
            for g in &hit {
                outbox.messages.push((
                    g.node_id.clone(),
                    downlink::Kind::Revoked(pb::GrantRevoked {
                        grant_id: g.id,
                        imsi: g.imsi.to_string(),
                    }),
                ));
            }
            Ok(())
        })?;
        Ok(hit)
    }

    /// Grants `node_id` a slice of `imsi`'s balance (see
    /// `Charging::grant`).
    fn grant(
        &self,
        node_id: &str,
        imsi: &Imsi,
        model: Option<&str>,
        wanted: u64,
        policy: &GrantPolicy,
        now: Timestamp,
    ) -> Result<Grant, ChargingStoreError> {
        self.grant_answering(0, node_id, imsi, model, wanted, policy, now)
    }

    /// [`ChargingStore::grant`] answering the box's request `request_id`:
    /// the grant goes into the node's outbox in the same transaction, so a
    /// grant made is a grant delivered, whatever instance or connection
    /// fails after.
    #[allow(clippy::too_many_arguments)]
    fn grant_answering(
        &self,
        request_id: u64,
        node_id: &str,
        imsi: &Imsi,
        model: Option<&str>,
        wanted: u64,
        policy: &GrantPolicy,
        now: Timestamp,
    ) -> Result<Grant, ChargingStoreError> {
        let mut made = None;
        self.with_subscriber(imsi, &[], now, &mut |c, outbox| {
            let g = c.grant(node_id, imsi, model, wanted, policy, now)?;
            outbox
                .messages
                .push((node_id.to_string(), grant_message(&g, request_id)));
            made = Some(g);
            Ok(())
        })?;
        Ok(made.expect("a grant when the operation succeeded"))
    }

    /// `node_id` gives grant `grant_id` of `imsi` back; returns what it
    /// still held.
    fn return_grant(
        &self,
        node_id: &str,
        imsi: &Imsi,
        grant_id: u64,
        now: Timestamp,
    ) -> Result<u64, ChargingStoreError> {
        let mut back = 0;
        self.with_subscriber(imsi, &[], now, &mut |c, _| {
            back = c.return_grant(node_id, grant_id)?;
            Ok(())
        })?;
        Ok(back)
    }

    /// Ends the grants expired more than the policy's grace ago.
    fn expire(
        &self,
        policy: &GrantPolicy,
        now: Timestamp,
    ) -> Result<Vec<Grant>, ChargingStoreError> {
        let mut ended = Vec::new();
        let by = now.saturating_sub(policy.return_grace_s);
        for imsi in self.subscribers_with_grants_ending_by(by)? {
            // One subscriber's failure (a lock not had in time) does not
            // keep the others' grants open, nor hide those already ended:
            // logged, and tried again at the next upkeep.
            let mut these = Vec::new();
            let done = self.with_subscriber(&imsi, &[], now, &mut |c, _| {
                these = c.expire(policy, now);
                Ok(())
            });
            match done {
                Ok(()) => ended.append(&mut these),
                Err(e) => {
                    tracing::warn!(%imsi, error = %e, "expiring grants failed; tried again next time")
                }
            }
        }
        Ok(ended)
    }

    /// Settles usage records, each (node, seq) once: the answers in order
    /// (`None`: settled before).
    fn settle(
        &self,
        usage: &[Usage],
        now: Timestamp,
    ) -> Result<Vec<Option<Settlement>>, ChargingStoreError> {
        let mut answers = vec![None; usage.len()];
        let mut imsis: Vec<&Imsi> = usage.iter().map(|u| &u.imsi).collect();
        imsis.sort();
        imsis.dedup();
        for imsi in imsis {
            let mine: Vec<usize> = (0..usage.len())
                .filter(|&i| &usage[i].imsi == imsi)
                .collect();
            let keys: Vec<(String, u64)> = mine
                .iter()
                .map(|&i| (usage[i].node_id.clone(), usage[i].seq))
                .collect();
            self.with_subscriber(imsi, &keys, now, &mut |c, _| {
                for &i in &mine {
                    answers[i] = c.settle(&usage[i], now);
                }
                Ok(())
            })?;
        }
        Ok(answers)
    }

    /// `imsi`'s bill for `[from_ms, to_ms)`, with what is left at `now`.
    fn bill(
        &self,
        imsi: &Imsi,
        from_ms: i64,
        to_ms: i64,
        now: Timestamp,
    ) -> Result<SubscriberBill, ChargingStoreError> {
        let mut bill = self.bill_lines(imsi, from_ms, to_ms)?;
        let sum = |v: &mut dyn Iterator<Item = u64>| v.fold(0u64, u64::saturating_add);
        bill.tokens_bought = sum(&mut bill.packages.iter().map(|p| p.allowance));
        bill.tokens_granted = sum(&mut bill.granted.iter().map(|g| g.tokens));
        bill.tokens_used = sum(&mut bill.used.iter().map(|u| u.tokens));
        bill.overage = sum(&mut bill.used.iter().map(|u| u.overage));
        bill.remaining = match self.account(imsi, now) {
            Ok(a) => a.remaining.saturating_add(a.granted),
            // Served (overage) without ever buying: nothing left.
            Err(ChargingStoreError::Refused(ChargingError::UnknownSubscriber(_))) => 0,
            Err(e) => return Err(e),
        };
        Ok(bill)
    }

    /// `imsi`'s account.
    fn account(&self, imsi: &Imsi, now: Timestamp) -> Result<Account, ChargingStoreError> {
        let mut account = None;
        self.with_subscriber(imsi, &[], now, &mut |c, _| {
            if c.state(imsi).packages.is_empty() {
                // A mistyped IMSI is not a subscriber with nothing left
                // (and, refused, the operation saves nothing).
                return Err(ChargingError::UnknownSubscriber(imsi.to_string()));
            }
            account = Some(c.account(imsi, now));
            Ok(())
        })?;
        Ok(account.expect("an account when the operation succeeded"))
    }
}

/// A bucket kind from its stored name.
pub(crate) fn kind_from(s: &str) -> Result<BucketKind, IngestStoreError> {
    BucketKind::parse(s).ok_or_else(|| {
        IngestStoreError::Location("charging".into(), format!("unknown package kind {s:?}"))
    })
}

/// A stored JSON column read back.
pub(crate) fn from_json<T: serde::de::DeserializeOwned>(
    what: &str,
    text: &str,
) -> Result<T, IngestStoreError> {
    serde_json::from_str(text).map_err(|e| {
        IngestStoreError::Location("charging".into(), format!("{what} does not read: {e}"))
    })
}

/// A value as a JSON column.
pub(crate) fn to_json<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_default()
}

/// Records settled per round of [`settle_uploaded`].
const SETTLE_CHUNK: usize = 512;

/// The usage a stored record settles: its billed units, the grants its
/// debits name (tokens summed per grant), its model. `None` for a record
/// that bills nothing or does not decode (the core stored it checked, so
/// that is a bug, logged).
pub fn usage_of(node_id: &str, seq: u64, signed: &[u8]) -> Option<Usage> {
    let record = match crate::record::SignedRecord::from_bytes(signed).and_then(|s| s.record()) {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(node = %node_id, seq, error = %e, "a stored record does not decode; not settled");
            return None;
        }
    };
    let units = crate::record::units_charged(&record);
    if units == 0 {
        return None;
    }
    let imsi = match Imsi::parse(&record.imsi) {
        Ok(i) => i,
        Err(e) => {
            tracing::error!(node = %node_id, seq, error = %e, "a stored record's IMSI does not parse; not settled");
            return None;
        }
    };
    let mut grants: Vec<(u64, u64)> = Vec::new();
    for d in record.debits.iter().filter(|d| d.grant_id != 0) {
        match grants.iter_mut().find(|(g, _)| *g == d.grant_id) {
            Some((_, t)) => *t = t.saturating_add(d.tokens),
            None => grants.push((d.grant_id, d.tokens)),
        }
    }
    Some(Usage {
        node_id: node_id.to_string(),
        seq,
        imsi,
        grants,
        model: Some(record.model_id).filter(|m| !m.is_empty()),
        // Packages hold units (tokens at one unit each without a rate table).
        tokens: units,
        ended_ms: record.end_time_unix_ms,
    })
}

/// Settles `node_id`'s stored records after its settlement cursor against
/// the subscribers' packages, in seq order, and moves the cursor. Each
/// (node, seq) is settled once whatever runs this (any instance, again
/// after a crash between a settlement and the cursor's move). Returns the
/// records settled now.
pub fn settle_uploaded(
    records: &dyn crate::ingest_store::IngestStore,
    charging: &dyn ChargingStore,
    node_id: &str,
    now: Timestamp,
) -> Result<u64, ChargingStoreError> {
    let mut settled = 0;
    loop {
        let from = charging.settled_through(node_id)?;
        let stored = records.records_after(node_id, from, SETTLE_CHUNK)?;
        let Some(last) = stored.last().map(|r| r.seq) else {
            return Ok(settled);
        };
        let usage: Vec<Usage> = stored
            .iter()
            .filter_map(|r| usage_of(node_id, r.seq, &r.signed))
            .collect();
        let answers = charging.settle(&usage, now)?;
        settled += answers.iter().filter(|a| a.is_some()).count() as u64;
        for (u, a) in usage.iter().zip(&answers) {
            if let Some(s) = a.as_ref().filter(|s| s.overage > 0) {
                tracing::warn!(node = %node_id, seq = u.seq, imsi = %u.imsi, overage = s.overage, "served beyond the subscriber's balance (overage)");
            }
        }
        charging.set_settled_through(node_id, last)?;
    }
}
