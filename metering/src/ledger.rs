//! The quota ledger, sans-IO: every method takes the time as an argument, so
//! the tests are deterministic and the agent decides what "now" is.
//!
//! A subscriber (IMSI) holds any number of buckets. A bucket has an
//! allowance, a validity window `[valid_from, expires_at)` and a kind:
//! * `monthly`: the allowance renews each calendar month from `valid_from`;
//!   what a month leaves unused expires with it;
//! * `topup` and `trial`: one allowance for the whole window.
//!
//! Before generation the agent reserves tokens (prompt plus the most it may
//! generate), as 3GPP online charging reserves units: held tokens are not
//! available to other requests, so concurrent requests of one subscriber can
//! never spend more than the balance. After generation it settles the actual
//! tokens (debits) and releases the rest. Debits go to the bucket nearest its
//! expiry first (for a monthly bucket, the end of the current month).
//!
//! A debit names the bucket and the month (`period`) it counts in, so applying
//! the same debits again in another process (the store, a replay after a
//! crash) gives the same state whatever the order.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Months};

use crate::Imsi;

/// Seconds since the Unix epoch, UTC.
pub type Timestamp = i64;

/// What kind of package a bucket is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BucketKind {
    /// Renews each month; unused tokens expire at the end of the month.
    Monthly,
    /// A one-off allowance with its own validity.
    Topup,
    /// A free trial.
    Trial,
    /// A slice of a package sold at the core, granted to this box
    /// ([`crate::grants`]): one-off, valid as long as the grant.
    Grant,
    /// What a grant lets the box serve beyond it while the core cannot be
    /// reached (its offline allowance): spent only then.
    Offline,
}

impl BucketKind {
    /// The name used in the API, the CLI and the store.
    pub fn as_str(self) -> &'static str {
        match self {
            BucketKind::Monthly => "monthly",
            BucketKind::Topup => "topup",
            BucketKind::Trial => "trial",
            BucketKind::Grant => "grant",
            BucketKind::Offline => "offline",
        }
    }

    /// Parses a kind an operator sells: `monthly`, `topup` or `trial`
    /// (grants come only from the core).
    pub fn parse(s: &str) -> Option<BucketKind> {
        match s {
            "monthly" => Some(BucketKind::Monthly),
            "topup" => Some(BucketKind::Topup),
            "trial" => Some(BucketKind::Trial),
            _ => None,
        }
    }

    /// Parses any kind a store holds: those sold, `grant` and `offline`.
    pub fn from_stored(s: &str) -> Option<BucketKind> {
        match s {
            "grant" => Some(BucketKind::Grant),
            "offline" => Some(BucketKind::Offline),
            _ => BucketKind::parse(s),
        }
    }
}

/// One package of tokens of one subscriber.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bucket {
    /// Unique id (the store's row id).
    pub id: u64,
    /// Whose it is.
    pub imsi: Imsi,
    /// Monthly, top-up or trial.
    pub kind: BucketKind,
    /// Tokens per month (monthly) or in all (the others).
    pub allowance: u64,
    /// First second of validity.
    pub valid_from: Timestamp,
    /// First second no longer valid.
    pub expires_at: Timestamp,
    /// Tokens debited in month `used_period` (always 0 for the others).
    pub used: u64,
    /// The month `used` counts in.
    pub used_period: u32,
    /// Revoked buckets give nothing.
    pub revoked: bool,
    /// The models (ids) or model tiers it may be spent on; empty: every
    /// model.
    pub models: Vec<String>,
}

/// Months a monthly bucket can span (bounds the period search).
const MAX_PERIODS: u32 = 12 * 100;

impl Bucket {
    /// Whether it may be spent on `model` (of `tier`, when the rate table
    /// gives one).
    pub fn covers(&self, model: &str, tier: Option<&str>) -> bool {
        self.models.is_empty()
            || self
                .models
                .iter()
                .any(|m| m == model || Some(m.as_str()) == tier)
    }

    fn period_start(&self, p: u32) -> Timestamp {
        DateTime::from_timestamp(self.valid_from, 0)
            .and_then(|d| d.checked_add_months(Months::new(p)))
            .map(|d| d.timestamp())
            .unwrap_or(Timestamp::MAX)
    }

    /// The month `now` falls in (0 for non-monthly buckets), or `None`
    /// outside the validity window or when revoked.
    pub fn period(&self, now: Timestamp) -> Option<u32> {
        if self.revoked || now < self.valid_from || now >= self.expires_at {
            return None;
        }
        if self.kind != BucketKind::Monthly {
            return Some(0);
        }
        // Months since valid_from: estimate, then correct (months differ in length).
        let mut p = (((now - self.valid_from) / (31 * 86_400)) as u32).min(MAX_PERIODS);
        while p < MAX_PERIODS && self.period_start(p + 1) <= now {
            p += 1;
        }
        while p > 0 && self.period_start(p) > now {
            p -= 1;
        }
        Some(p)
    }

    /// When the tokens available at `now` expire: the end of the month for a
    /// monthly bucket, the end of validity otherwise.
    pub fn expiry_at(&self, now: Timestamp) -> Timestamp {
        match (self.kind, self.period(now)) {
            (BucketKind::Monthly, Some(p)) => self.period_start(p + 1).min(self.expires_at),
            _ => self.expires_at,
        }
    }

    /// Tokens left at `now` (before holds).
    pub fn remaining(&self, now: Timestamp) -> u64 {
        match self.period(now) {
            None => 0,
            Some(p) if p == self.used_period => self.allowance.saturating_sub(self.used),
            Some(p) if p > self.used_period => self.allowance,
            // A debit of a later month was applied already: this month is over.
            Some(_) => 0,
        }
    }

    /// Applies one debit (see the module docs for why it names its period).
    fn apply(&mut self, tokens: u64, period: u32) {
        if period == self.used_period {
            self.used = self.used.saturating_add(tokens);
        } else if period > self.used_period {
            self.used_period = period;
            self.used = tokens;
        }
        // A debit of an earlier month changes nothing that still counts.
    }
}

/// Tokens taken from one bucket, in one month.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Debit {
    /// The bucket.
    pub bucket_id: u64,
    /// Tokens.
    pub tokens: u64,
    /// The month it counts in (0 for non-monthly buckets).
    pub period: u32,
}

/// Tokens held for one request until it settles.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    /// Handle for `settle` and `release`.
    pub id: u64,
    /// Whose.
    pub imsi: Imsi,
    /// `(bucket, tokens, period)` held, nearest expiry first.
    pub holds: Vec<Debit>,
    /// Σ of the holds: the most the request may use.
    pub granted: u64,
}

/// One bucket as the admin API shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct BucketView {
    /// Bucket id.
    pub id: u64,
    /// Kind.
    pub kind: BucketKind,
    /// Allowance (per month for monthly).
    pub allowance: u64,
    /// Left now, before holds.
    pub remaining: u64,
    /// Held by running requests.
    pub reserved: u64,
    /// Validity start (Unix seconds).
    pub valid_from: Timestamp,
    /// Validity end (Unix seconds).
    pub expires_at: Timestamp,
    /// When the tokens left now expire (end of month for monthly).
    pub tokens_expire_at: Timestamp,
    /// Active now (valid and not revoked).
    pub active: bool,
    /// Revoked.
    pub revoked: bool,
    /// The models or tiers it may be spent on (empty: every model).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub models: Vec<String>,
}

/// A subscriber's balance.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Balance {
    /// The subscriber.
    pub imsi: Imsi,
    /// Σ remaining over active buckets, minus what running requests hold.
    pub remaining_tokens: u64,
    /// Held by running requests.
    pub reserved_tokens: u64,
    /// Every bucket, nearest expiry first.
    pub buckets: Vec<BucketView>,
}

/// What the ledger refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LedgerError {
    /// The balance cannot cover the prompt and one completion token.
    #[error("insufficient quota: {available} tokens available, {needed} needed")]
    InsufficientQuota {
        /// Tokens available.
        available: u64,
        /// Tokens needed at least.
        needed: u64,
    },
    /// No such reservation (settled, released or expired).
    #[error("no reservation {0}")]
    UnknownReservation(u64),
    /// No such bucket.
    #[error("no bucket {0}")]
    UnknownBucket(u64),
    /// A bucket with this id exists.
    #[error("bucket {0} exists")]
    DuplicateBucket(u64),
    /// An open reservation has this id.
    #[error("reservation {0} is open already")]
    DuplicateReservation(u64),
}

/// Buckets, holds and reservations of every subscriber.
#[derive(Debug, Default)]
pub struct Ledger {
    buckets: BTreeMap<u64, Bucket>,
    by_imsi: HashMap<Imsi, Vec<u64>>,
    /// Tokens held by open reservations per bucket and month (a hold of a
    /// month that is over takes nothing from the next one's allowance).
    held: HashMap<(u64, u32), u64>,
    reservations: HashMap<u64, Reservation>,
    next_reservation: u64,
}

impl Ledger {
    /// An empty ledger.
    pub fn new() -> Ledger {
        Ledger::default()
    }

    /// Adds a bucket (a grant, or one loaded from the store).
    pub fn insert(&mut self, bucket: Bucket) -> Result<(), LedgerError> {
        if self.buckets.contains_key(&bucket.id) {
            return Err(LedgerError::DuplicateBucket(bucket.id));
        }
        self.by_imsi
            .entry(bucket.imsi.clone())
            .or_default()
            .push(bucket.id);
        self.buckets.insert(bucket.id, bucket);
        Ok(())
    }

    /// Revokes a bucket: it gives nothing from now on (holds on it stay
    /// until their requests settle, so running requests are billed).
    pub fn revoke(&mut self, bucket_id: u64) -> Result<(), LedgerError> {
        let b = self
            .buckets
            .get_mut(&bucket_id)
            .ok_or(LedgerError::UnknownBucket(bucket_id))?;
        b.revoked = true;
        Ok(())
    }

    /// A bucket.
    pub fn bucket(&self, id: u64) -> Option<&Bucket> {
        self.buckets.get(&id)
    }

    /// Open reservations.
    pub fn reservations(&self) -> usize {
        self.reservations.len()
    }

    /// Held on `bucket` in every month.
    fn held_on(&self, bucket: u64) -> u64 {
        self.held
            .iter()
            .filter(|((b, _), _)| *b == bucket)
            .map(|(_, t)| *t)
            .fold(0u64, |a, t| a.saturating_add(t))
    }

    /// Held on `bucket` in month `period`.
    pub(crate) fn held_in(&self, bucket: u64, period: u32) -> u64 {
        self.held.get(&(bucket, period)).copied().unwrap_or(0)
    }

    /// The subscriber's active buckets (those `usable` takes) with what
    /// each can give now, nearest expiry first (ties: older grant first);
    /// offline allowances after everything else (they pay only for what
    /// no grant can).
    fn available(
        &self,
        imsi: &Imsi,
        now: Timestamp,
        usable: &dyn Fn(&Bucket) -> bool,
    ) -> Vec<(u64, u64, u32)> {
        let mut v: Vec<((bool, Timestamp), u64, u64, u32)> = self
            .by_imsi
            .get(imsi)
            .into_iter()
            .flatten()
            .filter_map(|id| {
                let b = &self.buckets[id];
                if !usable(b) {
                    return None;
                }
                let p = b.period(now)?;
                let free = b.remaining(now).saturating_sub(self.held_in(*id, p));
                let last = b.kind == BucketKind::Offline;
                Some(((last, b.expiry_at(now)), *id, free, p))
            })
            .collect();
        v.sort_by_key(|&(order, id, _, _)| (order, id));
        v.into_iter()
            .map(|(_, id, free, p)| (id, free, p))
            .collect()
    }

    /// Tokens of `imsi` the buckets `usable` takes can give at `now`, not
    /// held by open reservations.
    pub fn available_from(
        &self,
        imsi: &Imsi,
        now: Timestamp,
        usable: &dyn Fn(&Bucket) -> bool,
    ) -> u64 {
        self.available(imsi, now, usable)
            .iter()
            .fold(0u64, |a, &(_, free, _)| a.saturating_add(free))
    }

    /// The balance of `imsi` at `now`.
    pub fn balance(&self, imsi: &Imsi, now: Timestamp) -> Balance {
        let mut buckets: Vec<BucketView> = self
            .by_imsi
            .get(imsi)
            .into_iter()
            .flatten()
            .map(|id| {
                let b = &self.buckets[id];
                BucketView {
                    id: *id,
                    kind: b.kind,
                    allowance: b.allowance,
                    remaining: b.remaining(now),
                    reserved: self.held_on(*id),
                    valid_from: b.valid_from,
                    expires_at: b.expires_at,
                    tokens_expire_at: b.expiry_at(now),
                    active: b.period(now).is_some(),
                    revoked: b.revoked,
                    models: b.models.clone(),
                }
            })
            .collect();
        buckets.sort_by_key(|b| (b.tokens_expire_at, b.id));
        // What each active bucket can still give this month: holds on a
        // revoked or expired bucket, or of a month that is over, take
        // nothing from the others.
        let free: u64 = self
            .available(imsi, now, &|_| true)
            .iter()
            .fold(0u64, |a, &(_, free, _)| a.saturating_add(free));
        let reserved: u64 = buckets
            .iter()
            .map(|b| b.reserved)
            .fold(0u64, |a, t| a.saturating_add(t));
        Balance {
            imsi: imsi.clone(),
            remaining_tokens: free,
            reserved_tokens: reserved,
            buckets,
        }
    }

    /// Holds up to `wanted` tokens of `imsi`, nearest expiry first, until
    /// the reservation is settled or released; refuses when fewer than
    /// `needed` are available.
    ///
    /// A reservation never expires by itself: no clock decides that the
    /// request holding it is gone (a request that waits long in a queue is
    /// still live, and a clock stepped forward would free every hold at
    /// once). Whoever holds it releases it when the request ends; the agent
    /// ties that to the request's lifetime.
    pub fn reserve(
        &mut self,
        imsi: &Imsi,
        needed: u64,
        wanted: u64,
        now: Timestamp,
    ) -> Result<Reservation, LedgerError> {
        self.reserve_from(imsi, needed, wanted, now, &|_| true)
    }

    /// [`Ledger::reserve`] from the buckets `usable` takes only (the core's
    /// packages that may be spent on a model, say).
    pub fn reserve_from(
        &mut self,
        imsi: &Imsi,
        needed: u64,
        wanted: u64,
        now: Timestamp,
        usable: &dyn Fn(&Bucket) -> bool,
    ) -> Result<Reservation, LedgerError> {
        let id = self.next_reservation + 1;
        self.reserve_as(id, imsi, needed, wanted, now, usable)
    }

    /// [`Ledger::reserve_from`] under the caller's id (the core's grant
    /// ids, which outlive this ledger), refused when that id is open.
    pub fn reserve_as(
        &mut self,
        id: u64,
        imsi: &Imsi,
        needed: u64,
        wanted: u64,
        now: Timestamp,
        usable: &dyn Fn(&Bucket) -> bool,
    ) -> Result<Reservation, LedgerError> {
        if self.reservations.contains_key(&id) {
            return Err(LedgerError::DuplicateReservation(id));
        }
        let wanted = wanted.max(needed);
        let avail = self.available(imsi, now, usable);
        let total: u64 = avail.iter().fold(0u64, |a, x| a.saturating_add(x.1));
        if total < needed {
            return Err(LedgerError::InsufficientQuota {
                available: total,
                needed,
            });
        }
        let mut holds = Vec::new();
        let mut left = wanted;
        for (id, free, period) in avail {
            if left == 0 {
                break;
            }
            let take = free.min(left);
            if take > 0 {
                holds.push(Debit {
                    bucket_id: id,
                    tokens: take,
                    period,
                });
                *self.held.entry((id, period)).or_default() += take;
                left -= take;
            }
        }
        self.next_reservation = self.next_reservation.max(id);
        let r = Reservation {
            id,
            imsi: imsi.clone(),
            granted: wanted - left,
            holds,
        };
        self.reservations.insert(r.id, r.clone());
        Ok(r)
    }

    fn drop_holds(&mut self, r: &Reservation) {
        for h in &r.holds {
            unhold(&mut self.held, h);
        }
    }

    /// Settles a reservation at once: [`Ledger::debits_for`] then
    /// [`Ledger::commit`].
    pub fn settle(&mut self, reservation: u64, used: u64) -> Result<Vec<Debit>, LedgerError> {
        let debits = self.debits_for(reservation, used)?;
        self.commit(reservation, &debits)?;
        Ok(debits)
    }

    /// The debits that settle `used` tokens of a reservation, changing
    /// nothing: taken from its holds in order. Tokens beyond the grant (the
    /// engine caps generation, so only a bug makes any) go to the first
    /// hold, so nothing made goes unbilled. Every reservation has at least
    /// one hold (it covers at least its `needed`, and a hold is only made
    /// of tokens), so the debits always sum to `used`.
    ///
    /// The agent asks for these, writes them into the usage record, and
    /// commits them only once the record is durable: a record that never
    /// made it into the log debits nothing.
    pub fn debits_for(&self, reservation: u64, used: u64) -> Result<Vec<Debit>, LedgerError> {
        let r = self
            .reservations
            .get(&reservation)
            .ok_or(LedgerError::UnknownReservation(reservation))?;
        let mut debits = Vec::new();
        let mut left = used;
        for h in &r.holds {
            if left == 0 {
                break;
            }
            let take = h.tokens.min(left);
            debits.push(Debit { tokens: take, ..*h });
            left -= take;
        }
        if left > 0 {
            match debits.first_mut() {
                Some(d) => d.tokens += left,
                None => {
                    if let Some(h) = r.holds.first() {
                        debits.push(Debit { tokens: left, ..*h });
                    }
                }
            }
        }
        Ok(debits)
    }

    /// Ends a reservation with `debits` (from [`Ledger::debits_for`]):
    /// releases its holds and applies the debits.
    pub fn commit(&mut self, reservation: u64, debits: &[Debit]) -> Result<(), LedgerError> {
        let r = self
            .reservations
            .remove(&reservation)
            .ok_or(LedgerError::UnknownReservation(reservation))?;
        self.drop_holds(&r);
        self.apply(debits);
        Ok(())
    }

    /// Debits `used` tokens of an open reservation from its holds in order
    /// and keeps it open with the rest held: the core's grant to a box is a
    /// reservation settled record by record. Returns the debits (applied)
    /// and the tokens beyond what it still held, which it does not debit:
    /// the caller decides where they go.
    pub fn consume(
        &mut self,
        reservation: u64,
        used: u64,
    ) -> Result<(Vec<Debit>, u64), LedgerError> {
        let r = self
            .reservations
            .get_mut(&reservation)
            .ok_or(LedgerError::UnknownReservation(reservation))?;
        let mut debits = Vec::new();
        let mut left = used;
        for h in r.holds.iter_mut() {
            if left == 0 {
                break;
            }
            let take = h.tokens.min(left);
            if take == 0 {
                continue;
            }
            debits.push(Debit { tokens: take, ..*h });
            h.tokens -= take;
            left -= take;
            unhold(&mut self.held, &Debit { tokens: take, ..*h });
        }
        r.holds.retain(|h| h.tokens > 0);
        r.granted -= used - left;
        self.apply(&debits);
        Ok((debits, left))
    }

    /// Puts back an open reservation kept elsewhere (the core's grants,
    /// stored between transactions): its holds count again. Refused when
    /// its id is open already or a hold names an unknown bucket.
    pub fn restore(&mut self, r: Reservation) -> Result<(), LedgerError> {
        if self.reservations.contains_key(&r.id) {
            return Err(LedgerError::DuplicateReservation(r.id));
        }
        if let Some(h) = r
            .holds
            .iter()
            .find(|h| !self.buckets.contains_key(&h.bucket_id))
        {
            return Err(LedgerError::UnknownBucket(h.bucket_id));
        }
        for h in &r.holds {
            *self.held.entry((h.bucket_id, h.period)).or_default() += h.tokens;
        }
        self.next_reservation = self.next_reservation.max(r.id);
        self.reservations.insert(r.id, r);
        Ok(())
    }

    /// What an open reservation still holds.
    pub fn reservation(&self, id: u64) -> Option<&Reservation> {
        self.reservations.get(&id)
    }

    /// Releases a reservation without debiting anything (no token was made).
    pub fn release(&mut self, reservation: u64) -> Result<(), LedgerError> {
        let r = self
            .reservations
            .remove(&reservation)
            .ok_or(LedgerError::UnknownReservation(reservation))?;
        self.drop_holds(&r);
        Ok(())
    }

    /// Applies debits (from a settlement, or replayed from the usage log).
    /// Debits of unknown buckets are ignored and counted in the result.
    pub fn apply(&mut self, debits: &[Debit]) -> usize {
        let mut unknown = 0;
        for d in debits {
            match self.buckets.get_mut(&d.bucket_id) {
                Some(b) => b.apply(d.tokens, d.period),
                None => unknown += 1,
            }
        }
        unknown
    }
}

/// Takes `hold` off what open reservations hold.
fn unhold(held: &mut HashMap<(u64, u32), u64>, hold: &Debit) {
    let key = (hold.bucket_id, hold.period);
    if let Some(v) = held.get_mut(&key) {
        *v = v.saturating_sub(hold.tokens);
        if *v == 0 {
            held.remove(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: i64 = 86_400;
    /// 2026-01-15T00:00:00Z.
    const T0: i64 = 1_768_435_200;

    fn imsi() -> Imsi {
        Imsi::parse("001010000000001").unwrap()
    }

    fn bucket(id: u64, kind: BucketKind, allowance: u64, days: i64) -> Bucket {
        Bucket {
            id,
            imsi: imsi(),
            kind,
            allowance,
            valid_from: T0,
            expires_at: T0 + days * DAY,
            used: 0,
            used_period: 0,
            revoked: false,
            models: Vec::new(),
        }
    }

    #[test]
    fn reserve_holds_and_settle_debits_the_actual_tokens() {
        let mut l = Ledger::new();
        l.insert(bucket(1, BucketKind::Topup, 100, 30)).unwrap();
        let r = l.reserve(&imsi(), 11, 60, T0).unwrap();
        assert_eq!(r.granted, 60);
        assert_eq!(l.balance(&imsi(), T0).remaining_tokens, 40);
        // A second request sees only what is not held.
        assert_eq!(
            l.reserve(&imsi(), 41, 41, T0),
            Err(LedgerError::InsufficientQuota {
                available: 40,
                needed: 41
            })
        );
        let d = l.settle(r.id, 25).unwrap();
        assert_eq!(
            d,
            vec![Debit {
                bucket_id: 1,
                tokens: 25,
                period: 0
            }]
        );
        let b = l.balance(&imsi(), T0);
        assert_eq!((b.remaining_tokens, b.reserved_tokens), (75, 0));
        assert_eq!(
            l.settle(r.id, 1),
            Err(LedgerError::UnknownReservation(r.id))
        );
    }

    #[test]
    fn grants_are_capped_by_the_balance_but_need_only_cover_the_minimum() {
        let mut l = Ledger::new();
        l.insert(bucket(1, BucketKind::Trial, 30, 30)).unwrap();
        let r = l.reserve(&imsi(), 20, 500, T0).unwrap();
        assert_eq!(r.granted, 30);
    }

    #[test]
    fn the_bucket_nearest_its_expiry_is_debited_first() {
        let mut l = Ledger::new();
        l.insert(bucket(1, BucketKind::Topup, 50, 90)).unwrap();
        l.insert(bucket(2, BucketKind::Trial, 10, 7)).unwrap();
        let r = l.reserve(&imsi(), 1, 30, T0).unwrap();
        assert_eq!(r.holds[0].bucket_id, 2);
        let d = l.settle(r.id, 30).unwrap();
        assert_eq!(
            d,
            vec![
                Debit {
                    bucket_id: 2,
                    tokens: 10,
                    period: 0
                },
                Debit {
                    bucket_id: 1,
                    tokens: 20,
                    period: 0
                }
            ]
        );
        assert_eq!(l.balance(&imsi(), T0).remaining_tokens, 30);
    }

    #[test]
    fn monthly_allowance_renews_and_unused_tokens_expire() {
        let mut l = Ledger::new();
        l.insert(bucket(1, BucketKind::Monthly, 100, 365)).unwrap();
        let r = l.reserve(&imsi(), 1, 70, T0).unwrap();
        l.settle(r.id, 70).unwrap();
        assert_eq!(l.balance(&imsi(), T0 + DAY).remaining_tokens, 30);
        // 2026-02-15: a new month, the full allowance again (30 expired).
        let feb = T0 + 31 * DAY;
        assert_eq!(l.bucket(1).unwrap().period(feb), Some(1));
        assert_eq!(l.balance(&imsi(), feb).remaining_tokens, 100);
        assert_eq!(l.bucket(1).unwrap().period(feb - 1), Some(0));
        // The end of this month is the tokens' expiry, not the bucket's.
        assert_eq!(l.bucket(1).unwrap().expiry_at(T0), feb);
        let r = l.reserve(&imsi(), 1, 10, feb).unwrap();
        assert_eq!(l.settle(r.id, 10).unwrap()[0].period, 1);
        assert_eq!(l.balance(&imsi(), feb).remaining_tokens, 90);
    }

    #[test]
    fn a_monthly_bucket_expiring_this_month_goes_before_a_topup_expiring_later() {
        let mut l = Ledger::new();
        l.insert(bucket(1, BucketKind::Topup, 100, 40)).unwrap();
        l.insert(bucket(2, BucketKind::Monthly, 100, 365)).unwrap();
        // On Jan 15 the month's tokens expire Feb 15, the top-up Feb 24.
        assert_eq!(l.reserve(&imsi(), 1, 1, T0).unwrap().holds[0].bucket_id, 2);
        // On Feb 16 the new month's tokens expire Mar 15: the top-up first.
        let feb16 = T0 + 32 * DAY;
        assert_eq!(
            l.reserve(&imsi(), 1, 1, feb16).unwrap().holds[0].bucket_id,
            1
        );
    }

    #[test]
    fn outside_validity_and_revoked_buckets_give_nothing() {
        let mut l = Ledger::new();
        l.insert(bucket(1, BucketKind::Topup, 100, 30)).unwrap();
        assert_eq!(l.balance(&imsi(), T0 - 1).remaining_tokens, 0);
        assert_eq!(l.balance(&imsi(), T0 + 30 * DAY).remaining_tokens, 0);
        l.revoke(1).unwrap();
        assert_eq!(l.balance(&imsi(), T0).remaining_tokens, 0);
        assert!(l.reserve(&imsi(), 1, 1, T0).is_err());
        assert_eq!(l.revoke(9), Err(LedgerError::UnknownBucket(9)));
    }

    #[test]
    fn a_reservation_consumed_in_parts_keeps_the_rest_held() {
        let mut l = Ledger::new();
        l.insert(bucket(1, BucketKind::Topup, 100, 30)).unwrap();
        l.insert(bucket(2, BucketKind::Topup, 100, 60)).unwrap();
        let r = l.reserve(&imsi(), 1, 150, T0).unwrap();
        let (debits, beyond) = l.consume(r.id, 120).unwrap();
        assert_eq!(beyond, 0);
        assert_eq!(
            debits,
            vec![
                Debit {
                    bucket_id: 1,
                    tokens: 100,
                    period: 0
                },
                Debit {
                    bucket_id: 2,
                    tokens: 20,
                    period: 0
                },
            ]
        );
        let b = l.balance(&imsi(), T0);
        assert_eq!((b.remaining_tokens, b.reserved_tokens), (50, 30));
        assert_eq!(l.reservation(r.id).unwrap().granted, 30);
        // Beyond what it holds: the rest is not debited, and said.
        assert_eq!(l.consume(r.id, 50).unwrap().1, 20);
        let b = l.balance(&imsi(), T0);
        assert_eq!((b.remaining_tokens, b.reserved_tokens), (50, 0));
        l.release(r.id).unwrap();
        assert_eq!(
            l.consume(r.id, 1),
            Err(LedgerError::UnknownReservation(r.id))
        );
    }

    #[test]
    fn a_reservation_holds_until_released_whatever_the_time() {
        let mut l = Ledger::new();
        l.insert(bucket(1, BucketKind::Topup, 100, 30)).unwrap();
        let r = l.reserve(&imsi(), 1, 100, T0).unwrap();
        // Days later (a long queue, a clock stepped forward): still held.
        assert_eq!(l.balance(&imsi(), T0 + 20 * DAY).remaining_tokens, 0);
        assert!(l.reserve(&imsi(), 1, 1, T0 + 20 * DAY).is_err());
        l.release(r.id).unwrap();
        assert_eq!(l.balance(&imsi(), T0).remaining_tokens, 100);
        assert_eq!(l.reservations(), 0);
        assert_eq!(l.release(r.id), Err(LedgerError::UnknownReservation(r.id)));
    }

    #[test]
    fn debits_are_planned_without_change_and_committed_once() {
        let mut l = Ledger::new();
        l.insert(bucket(1, BucketKind::Topup, 100, 30)).unwrap();
        let r = l.reserve(&imsi(), 1, 40, T0).unwrap();
        let d = l.debits_for(r.id, 50).unwrap();
        assert_eq!(
            d.iter().map(|d| d.tokens).sum::<u64>(),
            50,
            "beyond the grant still billed"
        );
        assert_eq!(
            l.balance(&imsi(), T0).remaining_tokens,
            60,
            "nothing debited yet"
        );
        l.commit(r.id, &d).unwrap();
        assert_eq!(l.balance(&imsi(), T0).remaining_tokens, 50);
        assert_eq!(
            l.commit(r.id, &d),
            Err(LedgerError::UnknownReservation(r.id))
        );
    }

    #[test]
    fn applying_debits_is_order_independent_across_months() {
        let mk = || {
            let mut l = Ledger::new();
            l.insert(bucket(1, BucketKind::Monthly, 100, 365)).unwrap();
            l
        };
        let debits = [
            Debit {
                bucket_id: 1,
                tokens: 5,
                period: 0,
            },
            Debit {
                bucket_id: 1,
                tokens: 7,
                period: 1,
            },
            Debit {
                bucket_id: 1,
                tokens: 3,
                period: 1,
            },
        ];
        let (mut a, mut b) = (mk(), mk());
        a.apply(&debits);
        b.apply(&[debits[1], debits[0], debits[2]]);
        assert_eq!(a.bucket(1), b.bucket(1));
        assert_eq!(a.bucket(1).unwrap().used, 10);
        assert_eq!(
            a.apply(&[Debit {
                bucket_id: 9,
                tokens: 1,
                period: 0
            }]),
            1
        );
    }

    proptest::proptest! {
        /// However reservations and settlements interleave, the tokens
        /// debited never exceed what was granted to the subscriber.
        #[test]
        fn concurrent_requests_never_spend_more_than_the_balance(
            ops in proptest::collection::vec((1u64..40, 0u64..60, proptest::bool::ANY), 1..80)
        ) {
            let mut l = Ledger::new();
            l.insert(bucket(1, BucketKind::Topup, 300, 30)).unwrap();
            l.insert(bucket(2, BucketKind::Trial, 50, 3)).unwrap();
            let mut open = Vec::new();
            let mut debited = 0;
            for (needed, extra, settle_one) in ops {
                if settle_one && !open.is_empty() {
                    let r: Reservation = open.remove(0);
                    let used = r.granted.min(needed + extra / 2);
                    debited += l.settle(r.id, used).unwrap().iter().map(|d| d.tokens).sum::<u64>();
                } else if let Ok(r) = l.reserve(&imsi(), needed, needed + extra, T0) {
                    proptest::prop_assert!(r.granted >= needed);
                    open.push(r);
                }
                let b = l.balance(&imsi(), T0);
                proptest::prop_assert!(debited + b.reserved_tokens + b.remaining_tokens == 350);
            }
            for r in open {
                debited += l.settle(r.id, r.granted).unwrap().iter().map(|d| d.tokens).sum::<u64>();
            }
            proptest::prop_assert!(debited <= 350);
            proptest::prop_assert_eq!(l.balance(&imsi(), T0).remaining_tokens, 350 - debited);
        }
    }
}
