//! The box's side of the core's grants, sans-IO: the local ledger as a
//! cache of slices of packages sold at the core (issue 23).
//!
//! A grant arrives on the downlink (`sync.proto`'s `Downlink`, numbered per
//! box). The box keeps it as ledger buckets: one of kind
//! [`BucketKind::Grant`] holding its tokens and, when the core allows any,
//! one of kind [`BucketKind::Offline`] holding its offline allowance. It is
//! valid from the moment it arrived for as long as the core said
//! (`expires_at - core_time` of the message), counted on the box's
//! monotonic clock ([`Now::mono`]): a box whose wall clock is hours off, or
//! is stepped while it holds the grant, holds it exactly as long as the
//! core meant. The ledger sees its buckets as always valid; this cache
//! decides ([`GrantCache::admits`]).
//!
//! This type decides:
//! * which downlink messages are new (each is applied once, in seq order:
//!   a replayed old one is refused by its seq);
//! * which buckets a request may take from ([`GrantCache::admits`]): a
//!   grant's for the model it was granted for, not revoked; its offline
//!   allowance only while the core cannot be reached; the box's own
//!   packages (welcome packages, a lab's grants) always;
//! * when to ask the core for more ([`GrantCache::should_ask`]): when what
//!   is left of a subscriber's grants falls to their threshold, one
//!   question at a time per subscriber and model, not again for a while
//!   after a refusal.
//!
//! The store makes a message's change durable (and gives the buckets their
//! ids) before the box acknowledges it; the ledger holds the buckets.

use std::collections::{BTreeMap, HashMap, HashSet};

use crate::ledger::{Bucket, BucketKind, Timestamp};
use crate::Imsi;

/// How long the box waits after a refusal before asking again for the same
/// subscriber and model on its own (a request still asks at once when it
/// finds nothing to take from).
pub const ASK_AGAIN_AFTER_REFUSAL_S: i64 = 30;

/// The end of a grant bucket's window as the ledger sees it: never (the
/// grant's own deadline, on the monotonic clock, is what ends it).
pub const GRANT_BUCKET_END: Timestamp = i64::MAX / 2;

/// The box's two clocks at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Now {
    /// The wall clock, Unix seconds: a grant's end as shown, and as kept
    /// across a reboot.
    pub wall: Timestamp,
    /// A monotonic clock, seconds (the agent uses `CLOCK_BOOTTIME`, which
    /// runs on across the agent's restarts): what judges validity.
    pub mono: i64,
}

/// A grant as the core sent it, in the ledger's terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantTerms {
    /// The core's id for it (records name it in their debits).
    pub grant_id: u64,
    /// The subscriber.
    pub imsi: Imsi,
    /// The model it may be spent on (None: any).
    pub model: Option<String>,
    /// Tokens.
    pub tokens: u64,
    /// Ask for more when what is left falls to this.
    pub threshold: u64,
    /// Tokens the box may serve beyond it while the core cannot be reached.
    pub offline_allowance: u64,
    /// When it is spent, serve only these models (empty: refuse).
    pub final_unit_models: Vec<String>,
    /// Seconds of validity it had when the core sent it (its expiry minus
    /// the core's clock then; never below 0).
    pub valid_for_s: i64,
}

/// A grant this box holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldGrant {
    /// What the core granted.
    pub terms: GrantTerms,
    /// The ledger bucket of its tokens.
    pub bucket_id: u64,
    /// The ledger bucket of its offline allowance (none when 0).
    pub offline_bucket_id: Option<u64>,
    /// Valid until, on the wall clock as it was when the grant arrived
    /// (shown; judges validity only after a reboot).
    pub expires_at: Timestamp,
    /// Valid until, on the monotonic clock: what judges validity.
    pub deadline: i64,
    /// Revoked by the core: no new request takes from it.
    pub revoked: bool,
}

impl HeldGrant {
    /// The ledger buckets that hold it: its tokens, then its offline
    /// allowance. Their window never ends as the ledger sees it
    /// ([`GRANT_BUCKET_END`]): the grant's deadline does.
    pub fn buckets(&self) -> Vec<Bucket> {
        let bucket = |id, kind, allowance| Bucket {
            id,
            imsi: self.terms.imsi.clone(),
            kind,
            allowance,
            valid_from: 0,
            expires_at: GRANT_BUCKET_END,
            used: 0,
            used_period: 0,
            revoked: self.revoked,
            // A grant is for its model already (`admits`).
            models: Vec::new(),
        };
        let mut v = vec![bucket(self.bucket_id, BucketKind::Grant, self.terms.tokens)];
        if let Some(id) = self.offline_bucket_id {
            v.push(bucket(
                id,
                BucketKind::Offline,
                self.terms.offline_allowance,
            ));
        }
        v
    }
}

/// What a downlink message says, in the ledger's terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Received {
    /// A grant.
    Grant(GrantTerms),
    /// A grant revoked.
    Revoked {
        /// The grant.
        grant_id: u64,
    },
    /// A kind this box does not know (a later protocol's).
    Unknown,
}

/// What one downlink message changes at the box.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GrantChange {
    /// A new grant.
    Grant {
        /// What the core granted.
        terms: GrantTerms,
        /// Its end on the wall clock at its arrival.
        expires_at: Timestamp,
        /// Its end on the monotonic clock.
        deadline: i64,
    },
    /// A grant revoked.
    Revoke {
        /// The grant.
        grant_id: u64,
    },
    /// Nothing this box knows how to apply (a later protocol's kind): the
    /// message is acknowledged all the same.
    Nothing,
}

/// Counters for the admin API and the metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct GrantCounters {
    /// Questions sent to the core.
    pub asked: u64,
    /// Grants received.
    pub granted: u64,
    /// Questions the core refused.
    pub refused: u64,
    /// Revocations received.
    pub revoked: u64,
}

/// The grants a box holds, and what it asked.
#[derive(Debug, Default)]
pub struct GrantCache {
    grants: BTreeMap<u64, HeldGrant>,
    /// Bucket → (grant, whether it is the offline allowance's).
    by_bucket: HashMap<u64, (u64, bool)>,
    /// Subscriber → its grants (an admission looks at its subscriber's only).
    by_imsi: HashMap<Imsi, Vec<u64>>,
    /// Every downlink message at or below this is applied.
    applied: u64,
    asking: HashSet<(Imsi, Option<String>)>,
    refused_until: HashMap<(Imsi, Option<String>), Timestamp>,
    counters: GrantCounters,
}

impl GrantCache {
    /// The cache as the store kept it: messages applied up to `applied`,
    /// and the grants held.
    pub fn new(applied: u64, held: Vec<HeldGrant>) -> GrantCache {
        let mut c = GrantCache {
            applied,
            ..GrantCache::default()
        };
        for g in held {
            c.hold(g);
        }
        c
    }

    /// Every downlink message at or below this is applied.
    pub fn applied(&self) -> u64 {
        self.applied
    }

    /// What downlink message `seq`, saying `received`, changes at `now`,
    /// or `None` when it is not new (applied before: a resend, or a replay
    /// of an old message).
    pub fn plan(&self, seq: u64, received: Received, now: Now) -> Option<GrantChange> {
        if seq <= self.applied {
            return None;
        }
        Some(match received {
            // A grant held already (never sent twice by a correct core).
            Received::Grant(terms) if self.grants.contains_key(&terms.grant_id) => {
                GrantChange::Nothing
            }
            Received::Grant(terms) => GrantChange::Grant {
                expires_at: now.wall.saturating_add(terms.valid_for_s.max(0)),
                deadline: now.mono.saturating_add(terms.valid_for_s.max(0)),
                terms,
            },
            Received::Revoked { grant_id } => GrantChange::Revoke { grant_id },
            Received::Unknown => GrantChange::Nothing,
        })
    }

    /// Records that message `seq` is applied (durably: the store has it),
    /// with the grant it brought, if any.
    pub fn applied_message(&mut self, seq: u64, held: Option<HeldGrant>) {
        self.applied = self.applied.max(seq);
        if let Some(g) = held {
            self.counters.granted += 1;
            // It answers the questions out for the models it may be spent on.
            let answers = |(imsi, model): &(Imsi, Option<String>)| {
                imsi == &g.terms.imsi && (g.terms.model.is_none() || model == &g.terms.model)
            };
            self.asking.retain(|k| !answers(k));
            self.refused_until.retain(|k, _| !answers(k));
            self.hold(g);
        }
    }

    /// Marks a grant revoked (applied durably); returns its buckets, for
    /// the ledger to revoke. Unknown grants (never received here, or
    /// already gone) change nothing.
    pub fn revoke(&mut self, grant_id: u64) -> Vec<u64> {
        let Some(g) = self.grants.get_mut(&grant_id) else {
            return Vec::new();
        };
        self.counters.revoked += 1;
        g.revoked = true;
        std::iter::once(g.bucket_id)
            .chain(g.offline_bucket_id)
            .collect()
    }

    fn hold(&mut self, g: HeldGrant) {
        self.by_imsi
            .entry(g.terms.imsi.clone())
            .or_default()
            .push(g.terms.grant_id);
        self.by_bucket
            .insert(g.bucket_id, (g.terms.grant_id, false));
        if let Some(id) = g.offline_bucket_id {
            self.by_bucket.insert(id, (g.terms.grant_id, true));
        }
        self.grants.insert(g.terms.grant_id, g);
    }

    /// The grant a bucket holds, when it holds one (records name it).
    pub fn grant_of(&self, bucket_id: u64) -> Option<u64> {
        self.by_bucket.get(&bucket_id).map(|&(g, _)| g)
    }

    /// Whether a request for `model` may take from `bucket` at `mono` (the
    /// monotonic clock): a box's own package always; a grant's tokens when
    /// it is neither revoked nor past its deadline and was granted for
    /// this model (or any); its offline allowance only while the core
    /// cannot be reached (`connected` false).
    pub fn admits(&self, bucket: &Bucket, model: &str, connected: bool, mono: i64) -> bool {
        let Some(&(grant_id, offline)) = self.by_bucket.get(&bucket.id) else {
            return true;
        };
        let Some(g) = self.grants.get(&grant_id) else {
            return false;
        };
        !g.revoked
            && mono < g.deadline
            && (!offline || !connected)
            && g.terms.model.as_deref().is_none_or(|m| m == model)
    }

    /// Whether `bucket` counts in a balance at `mono`: a box's own package,
    /// or a live grant's tokens (not its offline allowance).
    pub fn in_balance(&self, bucket: &Bucket, mono: i64) -> bool {
        match self.by_bucket.get(&bucket.id) {
            None => true,
            Some(&(_, true)) => false,
            Some(&(grant_id, false)) => self
                .grants
                .get(&grant_id)
                .is_some_and(|g| !g.revoked && mono < g.deadline),
        }
    }

    /// The grant a bucket holds, with its end on the wall clock.
    pub fn held_by(&self, bucket_id: u64) -> Option<&HeldGrant> {
        let (grant_id, _) = self.by_bucket.get(&bucket_id)?;
        self.grants.get(grant_id)
    }

    /// Whether a bucket is one of the core's (a grant's or its offline
    /// allowance's).
    pub fn is_granted(&self, bucket_id: u64) -> bool {
        self.by_bucket.contains_key(&bucket_id)
    }

    /// Whether to ask the core for more for `imsi` and `model` now, given
    /// `left`, what its usable grants can still give: when that is at or
    /// below the sum of their thresholds (or it holds none), no question is
    /// out for them, and no refusal is recent. Marks the question as out
    /// when it answers yes: [`GrantCache::answered`] ends it.
    /// `mono` is the monotonic clock.
    pub fn should_ask(&mut self, imsi: &Imsi, model: &str, left: u64, mono: i64) -> bool {
        let key = (imsi.clone(), Some(model.to_string()));
        if self.asking.contains(&key) {
            return false;
        }
        if self.refused_until.get(&key).is_some_and(|&t| mono < t) {
            return false;
        }
        let threshold: u64 = self
            .by_imsi
            .get(imsi)
            .into_iter()
            .flatten()
            .filter_map(|id| self.grants.get(id))
            .filter(|g| {
                !g.revoked
                    && mono < g.deadline
                    && g.terms.model.as_deref().is_none_or(|m| m == model)
            })
            .map(|g| g.terms.threshold)
            .fold(0u64, u64::saturating_add);
        if left > threshold {
            return false;
        }
        self.asking.insert(key);
        self.counters.asked += 1;
        true
    }

    /// Starts a question a request needs answered now (it found nothing to
    /// take from), whatever the thresholds and recent refusals say; false
    /// when one is out already (the request waits for that one).
    pub fn ask_now(&mut self, imsi: &Imsi, model: &str) -> bool {
        let key = (imsi.clone(), Some(model.to_string()));
        if !self.asking.insert(key) {
            return false;
        }
        self.counters.asked += 1;
        true
    }

    /// The question for `imsi` and `model` is answered: granted (the grant
    /// arrives as a downlink message), refused, or never answered (the
    /// link went down). A refusal keeps [`GrantCache::should_ask`] quiet
    /// for [`ASK_AGAIN_AFTER_REFUSAL_S`] (`mono`: the monotonic clock).
    pub fn answered(&mut self, imsi: &Imsi, model: &str, refused: bool, mono: i64) {
        let key = (imsi.clone(), Some(model.to_string()));
        self.asking.remove(&key);
        if refused {
            self.counters.refused += 1;
            self.refused_until
                .insert(key, mono.saturating_add(ASK_AGAIN_AFTER_REFUSAL_S));
        }
    }

    /// Grants held now: not revoked and before their deadline at `mono`.
    pub fn live(&self, mono: i64) -> impl Iterator<Item = &HeldGrant> {
        self.grants
            .values()
            .filter(move |g| !g.revoked && mono < g.deadline)
    }

    /// Every grant held, live or not.
    pub fn all(&self) -> impl Iterator<Item = &HeldGrant> {
        self.grants.values()
    }

    /// The counters.
    pub fn counters(&self) -> GrantCounters {
        self.counters
    }

    /// Questions out now.
    pub fn asking(&self) -> usize {
        self.asking.len()
    }
}

#[cfg(test)]
mod tests;
