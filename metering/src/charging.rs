//! The charging function, sans-IO: the core's side of token packages, as
//! 3GPP's CHF (TS 32.290) holds a subscriber's balance and grants it to the
//! network nodes that serve the subscriber, one slice at a time.
//!
//! * The operator **sells** packages (monthly, top-up, trial: the box's
//!   [`Bucket`] kinds, with the same validity and renewal rules), each under
//!   an id the operator's system chooses: selling the same id again is the
//!   same sale (a BSS that retries never sells twice), and an id reused for
//!   another package is refused.
//! * A box asks for a **grant** for a subscriber it serves: a slice of the
//!   balance, held for that box, with a validity time (never past the end of
//!   the tokens it holds: a month's end for a monthly package), a threshold
//!   at which the box asks for more, an offline allowance and a final-unit
//!   action. A grant is a [`Ledger`] reservation: what boxes hold is never
//!   more than the balance, whatever the order of their requests.
//! * The box's signed usage records come back and **settle**: each (node,
//!   seq) once. Usage is taken from the grant the record names, then from
//!   the subscriber's free balance, and what neither covers (served offline
//!   beyond the grant) is **overage**, counted per subscriber, never hidden.
//! * A grant ends when its box **returns** it (its final usage is in the
//!   records it uploaded before) or, for a box that never does, a grace
//!   time after it expired: then what it still held goes back to the
//!   balance.
//! * **Revoking** a package stops new grants from it and names the open
//!   grants holding its tokens, for the downlink to revoke at their boxes;
//!   their running requests still settle against them.
//!
//! Time is an argument (the core's clock: a box's clock never decides a
//! grant's validity). The core's store keeps this state and makes each
//! operation one transaction; this type is the rules, tested on their own.

use std::collections::{BTreeMap, HashMap, HashSet};

use crate::ledger::{Bucket, BucketKind, Debit, Ledger, LedgerError, Reservation, Timestamp};
use crate::Imsi;

/// What a package is, as sold.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PackageSpec {
    /// Monthly, top-up or trial.
    pub kind: BucketKind,
    /// Tokens per month (monthly) or in all.
    pub allowance: u64,
    /// First second of validity.
    pub valid_from: Timestamp,
    /// First second no longer valid.
    pub expires_at: Timestamp,
    /// The operator's tier name ("basic", "pro"), for the bill.
    pub tier: String,
    /// The models it may be spent on; empty: any.
    pub models: Vec<String>,
}

/// A package sold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Package {
    /// The operator's id for it (the idempotency key of the sale).
    pub id: String,
    /// Whose.
    pub imsi: Imsi,
    /// What.
    pub spec: PackageSpec,
    /// Its bucket in the ledger.
    pub bucket_id: u64,
    /// Revoked: it gives nothing from then on.
    pub revoked: bool,
    /// The sale as the operator asked for it (its parameters, canonical):
    /// a retry is the same sale when this is the same, even where the
    /// package's times were set from the moment of the first sale.
    pub request: String,
}

/// What a box does when a grant is used up and no other comes (the 3GPP
/// final-unit action).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinalUnitAction {
    /// Refuse the subscriber's requests.
    Refuse,
    /// Serve only these models (a free tier, say), unbilled by this grant.
    RestrictTo(Vec<String>),
}

/// How grants are cut (the core's configuration).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GrantPolicy {
    /// Tokens a grant asks for when the box names no amount.
    pub slice: u64,
    /// How long a grant is valid, at most (seconds).
    pub validity_s: i64,
    /// The box asks for more when the grant's unused part falls to this
    /// percentage of it.
    pub threshold_percent: u8,
    /// Tokens a box may serve beyond its grant while the core cannot be
    /// reached (0: none).
    pub offline_allowance: u64,
    /// What the box does when the grant is spent.
    pub final_unit_action: FinalUnitAction,
    /// How long after its expiry an unreturned grant keeps its tokens held
    /// (its box may be offline with records still to upload), seconds.
    pub return_grace_s: i64,
}

impl Default for GrantPolicy {
    fn default() -> GrantPolicy {
        GrantPolicy {
            slice: 100_000,
            validity_s: 3_600,
            threshold_percent: 20,
            offline_allowance: 0,
            final_unit_action: FinalUnitAction::Refuse,
            return_grace_s: 86_400,
        }
    }
}

/// A slice of a subscriber's balance held for one box.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Grant {
    /// The core's id for it (records name it).
    pub id: u64,
    /// The box.
    pub node_id: String,
    /// The subscriber.
    pub imsi: Imsi,
    /// The model it was asked for (None: any model, from packages that
    /// name none).
    pub model: Option<String>,
    /// Tokens granted.
    pub tokens: u64,
    /// Of them, settled by the box's records so far.
    pub used: u64,
    /// When (core time).
    pub granted_at: Timestamp,
    /// Valid until (core time).
    pub expires_at: Timestamp,
    /// The box asks for more when `tokens - used` falls to this.
    pub threshold: u64,
    /// See [`GrantPolicy::offline_allowance`].
    pub offline_allowance: u64,
    /// See [`FinalUnitAction`].
    pub final_unit_action: FinalUnitAction,
    /// A package it holds tokens of was revoked: the box must stop
    /// admitting on it.
    pub revoked: bool,
}

/// A subscriber's state as the core's store keeps it between operations:
/// everything [`Charging`] needs to judge the next one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SubscriberState {
    /// Its packages, with what each has used (`Bucket::used`, `used_period`).
    pub packages: Vec<(Package, Bucket)>,
    /// Its open grants, with what each still holds.
    pub grants: Vec<(Grant, Vec<Debit>)>,
    /// Tokens settled from records.
    pub used: u64,
    /// Tokens served beyond the balance.
    pub overage: u64,
}

/// A usage record as it settles: who served whom, how many tokens, and the
/// grant the box spent them from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Usage {
    /// The box.
    pub node_id: String,
    /// The record's seq on that box (the settlement's idempotency key).
    pub seq: u64,
    /// The subscriber.
    pub imsi: Imsi,
    /// The grants the box spent it from, with the tokens it took from
    /// each (its debits naming a grant); empty: none.
    pub grants: Vec<(u64, u64)>,
    /// The model that served it (what it is taken from beyond its grant
    /// must allow that model).
    pub model: Option<String>,
    /// Tokens billed.
    pub tokens: u64,
    /// When the request ended, on the box's clock (Unix ms): the bill's
    /// month.
    pub ended_ms: i64,
}

/// Where a settlement's tokens went.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Settlement {
    /// From the grant the record names.
    pub from_grant: u64,
    /// From the subscriber's free balance (beyond the grant, or no grant).
    pub from_balance: u64,
    /// Covered by neither: served beyond the balance.
    pub overage: u64,
}

/// A subscriber's account at the core.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Account {
    /// The subscriber.
    pub imsi: Imsi,
    /// Tokens neither used nor held by a box.
    pub remaining: u64,
    /// Held by open grants, not yet used.
    pub granted: u64,
    /// Settled from records.
    pub used: u64,
    /// Served beyond the balance.
    pub overage: u64,
    /// Its packages, nearest expiry first.
    pub packages: Vec<PackageView>,
}

/// One package as the operator sees it in an account.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PackageView {
    /// The operator's id for the sale.
    pub id: String,
    /// Monthly, top-up or trial.
    pub kind: BucketKind,
    /// The tier's name.
    pub tier: String,
    /// Tokens (a month's, for monthly).
    pub allowance: u64,
    /// Left now, held by boxes or not.
    pub remaining: u64,
    /// Held by boxes' open grants.
    pub granted: u64,
    /// Validity (Unix seconds).
    pub valid_from: Timestamp,
    /// End of validity (Unix seconds).
    pub expires_at: Timestamp,
    /// When the tokens left now expire (a month's end for monthly).
    pub tokens_expire_at: Timestamp,
    /// Valid now and not revoked.
    pub active: bool,
    /// Revoked.
    pub revoked: bool,
    /// The models it may be spent on (empty: any).
    pub models: Vec<String>,
}

/// What the charging function refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChargingError {
    /// The subscriber holds no package at all.
    #[error("subscriber {0} has no package at this core")]
    UnknownSubscriber(String),
    /// Nothing left to grant.
    #[error("subscriber {imsi} has no tokens left to grant{}", model.as_ref().map(|m| format!(" for model {m}")).unwrap_or_default())]
    InsufficientQuota {
        /// The subscriber.
        imsi: String,
        /// The model asked for.
        model: Option<String>,
    },
    /// A package id sold before for another package.
    #[error("package id {0:?} was sold before for another package")]
    IdConflict(String),
    /// No package of that id.
    #[error("no package {0:?}")]
    UnknownPackage(String),
    /// No open grant of that id for that box.
    #[error("no open grant {grant} of box {node}")]
    UnknownGrant {
        /// The grant.
        grant: u64,
        /// The box.
        node: String,
    },
    /// A package's allowance or window makes no sense.
    #[error("bad package: {0}")]
    BadPackage(String),
}

/// Every subscriber's packages, grants and settled usage.
#[derive(Debug, Default)]
pub struct Charging {
    ledger: Ledger,
    packages: HashMap<String, Package>,
    models_by_bucket: HashMap<u64, Vec<String>>,
    grants: BTreeMap<u64, Grant>,
    settled: HashSet<(String, u64)>,
    /// Settlements made since the last `take_settlements`, for the store.
    made: Vec<(Usage, Settlement)>,
    used: HashMap<Imsi, u64>,
    overage: HashMap<Imsi, u64>,
    next_bucket: u64,
    next_grant: u64,
}

impl Charging {
    /// Nothing sold yet.
    pub fn new() -> Charging {
        Charging::default()
    }

    /// Sells `spec` to `imsi` under the operator's `id`; `request` is the
    /// sale as asked (see [`Package::request`]). The same id with the same
    /// request is the same sale (`Ok(false)`: nothing new).
    pub fn sell(
        &mut self,
        id: &str,
        imsi: &Imsi,
        spec: PackageSpec,
        request: &str,
    ) -> Result<bool, ChargingError> {
        if let Some(p) = self.packages.get(id) {
            return if &p.imsi == imsi && p.request == request {
                Ok(false)
            } else {
                Err(ChargingError::IdConflict(id.to_string()))
            };
        }
        if spec.allowance == 0 {
            return Err(ChargingError::BadPackage("an allowance of 0 tokens".into()));
        }
        if spec.allowance > i64::MAX as u64 {
            return Err(ChargingError::BadPackage(format!(
                "an allowance of {} tokens is more than a store holds ({})",
                spec.allowance,
                i64::MAX
            )));
        }
        if spec.expires_at <= spec.valid_from {
            return Err(ChargingError::BadPackage(
                "it expires before it starts".into(),
            ));
        }
        self.next_bucket += 1;
        let bucket_id = self.next_bucket;
        self.ledger
            .insert(Bucket {
                id: bucket_id,
                imsi: imsi.clone(),
                kind: spec.kind,
                allowance: spec.allowance,
                valid_from: spec.valid_from,
                expires_at: spec.expires_at,
                used: 0,
                used_period: 0,
                revoked: false,
                // The core keeps a package's models itself (`models_by_bucket`).
                models: Vec::new(),
            })
            .map_err(|e| ChargingError::BadPackage(e.to_string()))?;
        self.models_by_bucket.insert(bucket_id, spec.models.clone());
        self.packages.insert(
            id.to_string(),
            Package {
                id: id.to_string(),
                imsi: imsi.clone(),
                spec,
                bucket_id,
                revoked: false,
                request: request.to_string(),
            },
        );
        Ok(true)
    }

    /// Revokes a package: no grant takes from it from now on. Returns the
    /// open grants holding its tokens, for their boxes to stop admitting on
    /// them (they stay open, so that running requests settle).
    pub fn revoke(&mut self, id: &str) -> Result<Vec<Grant>, ChargingError> {
        let p = self
            .packages
            .get_mut(id)
            .ok_or_else(|| ChargingError::UnknownPackage(id.to_string()))?;
        p.revoked = true;
        let bucket = p.bucket_id;
        self.ledger
            .revoke(bucket)
            .map_err(|e| ChargingError::BadPackage(e.to_string()))?;
        let mut hit = Vec::new();
        for g in self.grants.values_mut() {
            let holds = self
                .ledger
                .reservation(g.id)
                .is_some_and(|r| r.holds.iter().any(|h| h.bucket_id == bucket));
            if holds {
                g.revoked = true;
                hit.push(g.clone());
            }
        }
        Ok(hit)
    }

    /// A package sold.
    pub fn package(&self, id: &str) -> Option<&Package> {
        self.packages.get(id)
    }

    /// Grants `node_id` a slice of `imsi`'s balance: `wanted` tokens (0:
    /// the policy's slice) or what is left if less, from the packages that
    /// may be spent on `model` (None: packages that name no model).
    pub fn grant(
        &mut self,
        node_id: &str,
        imsi: &Imsi,
        model: Option<&str>,
        wanted: u64,
        policy: &GrantPolicy,
        now: Timestamp,
    ) -> Result<Grant, ChargingError> {
        if !self.packages.values().any(|p| &p.imsi == imsi) {
            return Err(ChargingError::UnknownSubscriber(imsi.to_string()));
        }
        let wanted = if wanted == 0 { policy.slice } else { wanted };
        let models = &self.models_by_bucket;
        let usable = |b: &Bucket| allows(models, b, model);
        // The grant's tokens are the ledger reservation of the same id.
        let id = self.next_grant + 1;
        let r = match self.ledger.reserve_as(id, imsi, 1, wanted, now, &usable) {
            Ok(r) => r,
            Err(LedgerError::InsufficientQuota { .. }) => {
                return Err(ChargingError::InsufficientQuota {
                    imsi: imsi.to_string(),
                    model: model.map(str::to_string),
                })
            }
            Err(e) => return Err(ChargingError::BadPackage(e.to_string())),
        };
        // Never valid past the end of the tokens it holds (a monthly
        // package's month), so a grant never spans two months' allowances.
        let tokens_end = r
            .holds
            .iter()
            .filter_map(|h| self.ledger.bucket(h.bucket_id))
            .map(|b| b.expiry_at(now))
            .min()
            .unwrap_or(now);
        self.next_grant = id;
        let grant = Grant {
            id,
            node_id: node_id.to_string(),
            imsi: imsi.clone(),
            model: model.map(str::to_string),
            tokens: r.granted,
            used: 0,
            granted_at: now,
            expires_at: now.saturating_add(policy.validity_s).min(tokens_end),
            threshold: (u128::from(r.granted) * u128::from(policy.threshold_percent.min(100)) / 100)
                as u64,
            offline_allowance: policy.offline_allowance,
            final_unit_action: policy.final_unit_action.clone(),
            revoked: false,
        };
        self.grants.insert(grant.id, grant.clone());
        Ok(grant)
    }

    /// Loads subscribers' states (from the core's store): their packages,
    /// open grants and totals. Settlements already made are the store's to
    /// remember (a unique key on node and seq); this type remembers only
    /// those it made itself.
    pub fn restore(&mut self, imsi: &Imsi, state: SubscriberState) -> Result<(), ChargingError> {
        let bad = |e: LedgerError| ChargingError::BadPackage(e.to_string());
        for (package, bucket) in state.packages {
            self.next_bucket = self.next_bucket.max(bucket.id);
            self.models_by_bucket
                .insert(bucket.id, package.spec.models.clone());
            self.ledger.insert(bucket).map_err(bad)?;
            self.packages.insert(package.id.clone(), package);
        }
        for (grant, holds) in state.grants {
            self.next_grant = self.next_grant.max(grant.id);
            self.ledger
                .restore(Reservation {
                    id: grant.id,
                    imsi: grant.imsi.clone(),
                    granted: holds.iter().map(|h| h.tokens).sum(),
                    holds,
                })
                .map_err(bad)?;
            self.grants.insert(grant.id, grant);
        }
        self.used.insert(imsi.clone(), state.used);
        self.overage.insert(imsi.clone(), state.overage);
        Ok(())
    }

    /// `imsi`'s state, for the core's store to keep.
    pub fn state(&self, imsi: &Imsi) -> SubscriberState {
        let mut packages: Vec<(Package, Bucket)> = self
            .packages
            .values()
            .filter(|p| &p.imsi == imsi)
            .filter_map(|p| Some((p.clone(), self.ledger.bucket(p.bucket_id)?.clone())))
            .collect();
        packages.sort_by_key(|(_, b)| b.id);
        let grants = self
            .grants
            .values()
            .filter(|g| &g.imsi == imsi)
            .map(|g| {
                let holds = self
                    .ledger
                    .reservation(g.id)
                    .map(|r| r.holds.clone())
                    .unwrap_or_default();
                (g.clone(), holds)
            })
            .collect();
        SubscriberState {
            packages,
            grants,
            used: self.used.get(imsi).copied().unwrap_or(0),
            overage: self.overage.get(imsi).copied().unwrap_or(0),
        }
    }

    /// Ids below these are taken (the store keeps the counters across
    /// instances: each operation starts from them).
    pub fn reserve_ids(&mut self, next_bucket: u64, next_grant: u64) {
        self.next_bucket = self.next_bucket.max(next_bucket.saturating_sub(1));
        self.next_grant = self.next_grant.max(next_grant.saturating_sub(1));
    }

    /// An open grant.
    pub fn open_grant(&self, id: u64) -> Option<&Grant> {
        self.grants.get(&id)
    }

    /// Open grants, oldest first.
    pub fn open_grants(&self) -> impl Iterator<Item = &Grant> {
        self.grants.values()
    }

    /// Settles one usage record, once per (node, seq): `None` when it was
    /// settled before. Tokens come from the grants it names (when open and
    /// that box's and subscriber's; what the box served from a grant beyond
    /// what the grant still holds, offline, is not taken from it), then
    /// from the free balance at `now`; the rest is overage.
    pub fn settle(&mut self, usage: &Usage, now: Timestamp) -> Option<Settlement> {
        if !self.settled.insert((usage.node_id.clone(), usage.seq)) {
            return None;
        }
        let mut from_grant = 0u64;
        for &(grant_id, tokens) in &usage.grants {
            // Never more than the record bills, whatever its debits say.
            let tokens = tokens.min(usage.tokens - from_grant);
            let Some(g) = self.grants.get_mut(&grant_id) else {
                continue;
            };
            if g.node_id != usage.node_id || g.imsi != usage.imsi || tokens == 0 {
                continue;
            }
            let (_, beyond) = self
                .ledger
                .consume(g.id, tokens)
                .unwrap_or((Vec::new(), tokens));
            g.used += tokens - beyond;
            from_grant += tokens - beyond;
        }
        let mut from_balance = 0;
        let beyond = usage.tokens - from_grant;
        if beyond > 0 {
            let models = &self.models_by_bucket;
            let model = usage.model.as_deref();
            let usable = |b: &Bucket| allows(models, b, model);
            if let Ok(r) = self
                .ledger
                .reserve_from(&usage.imsi, 0, beyond, now, &usable)
            {
                if let Ok((_, left)) = self.ledger.consume(r.id, r.granted) {
                    from_balance = r.granted - left;
                }
                let _ = self.ledger.release(r.id);
            }
        }
        let overage = beyond - from_balance;
        let used = self.used.entry(usage.imsi.clone()).or_default();
        *used = used.saturating_add(from_grant + from_balance);
        if overage > 0 {
            let over = self.overage.entry(usage.imsi.clone()).or_default();
            *over = over.saturating_add(overage);
        }
        let settlement = Settlement {
            from_grant,
            from_balance,
            overage,
        };
        self.made.push((usage.clone(), settlement.clone()));
        Some(settlement)
    }

    /// Marks (node, seq) as settled before (the store's memory of it), so
    /// that [`Charging::settle`] gives `None` for it.
    pub fn settled_before(&mut self, node_id: &str, seq: u64) {
        self.settled.insert((node_id.to_string(), seq));
    }

    /// The settlements made since the last call, for the store to keep.
    pub fn take_settlements(&mut self) -> Vec<(Usage, Settlement)> {
        std::mem::take(&mut self.made)
    }

    /// The box gives a grant back (its usage is in the records it uploaded
    /// before): what it still held returns to the balance. Returns that.
    pub fn return_grant(&mut self, node_id: &str, grant_id: u64) -> Result<u64, ChargingError> {
        let unknown = || ChargingError::UnknownGrant {
            grant: grant_id,
            node: node_id.to_string(),
        };
        let g = self.grants.get(&grant_id).ok_or_else(unknown)?;
        if g.node_id != node_id {
            return Err(unknown());
        }
        let g = self.grants.remove(&grant_id).ok_or_else(unknown)?;
        Ok(self.close(&g))
    }

    /// Ends the grants that expired more than the policy's grace ago and
    /// were never returned; returns them.
    pub fn expire(&mut self, policy: &GrantPolicy, now: Timestamp) -> Vec<Grant> {
        let gone: Vec<u64> = self
            .grants
            .values()
            .filter(|g| g.expires_at.saturating_add(policy.return_grace_s) <= now)
            .map(|g| g.id)
            .collect();
        let mut ended = Vec::new();
        for id in gone {
            if let Some(g) = self.grants.remove(&id) {
                self.close(&g);
                ended.push(g);
            }
        }
        ended
    }

    fn close(&mut self, g: &Grant) -> u64 {
        let held = self.ledger.reservation(g.id).map_or(0, |r| r.granted);
        let _ = self.ledger.release(g.id);
        held
    }

    /// `imsi`'s account at `now`.
    pub fn account(&self, imsi: &Imsi, now: Timestamp) -> Account {
        let balance = self.ledger.balance(imsi, now);
        let by_bucket: HashMap<u64, &Package> = self
            .packages
            .values()
            .filter(|p| &p.imsi == imsi)
            .map(|p| (p.bucket_id, p))
            .collect();
        let packages = balance
            .buckets
            .iter()
            .filter_map(|b| {
                let p = by_bucket.get(&b.id)?;
                Some(PackageView {
                    id: p.id.clone(),
                    kind: b.kind,
                    tier: p.spec.tier.clone(),
                    allowance: b.allowance,
                    remaining: b.remaining,
                    granted: b.reserved,
                    valid_from: b.valid_from,
                    expires_at: b.expires_at,
                    tokens_expire_at: b.tokens_expire_at,
                    active: b.active,
                    revoked: b.revoked,
                    models: p.spec.models.clone(),
                })
            })
            .collect();
        Account {
            imsi: imsi.clone(),
            remaining: balance.remaining_tokens,
            granted: balance.reserved_tokens,
            used: self.used.get(imsi).copied().unwrap_or(0),
            overage: self.overage.get(imsi).copied().unwrap_or(0),
            packages,
        }
    }
}

/// Whether `bucket` may be spent on `model` (None: a use that names no
/// model, which only packages naming none may pay for).
fn allows(models: &HashMap<u64, Vec<String>>, bucket: &Bucket, model: Option<&str>) -> bool {
    let named = models
        .get(&bucket.id)
        .map(Vec::as_slice)
        .unwrap_or_default();
    match model {
        None => named.is_empty(),
        Some(m) => named.is_empty() || named.iter().any(|n| n == m),
    }
}

#[cfg(test)]
mod tests;
