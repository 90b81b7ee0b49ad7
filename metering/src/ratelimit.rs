//! Rate limits, sans-IO: a token bucket per key (an IMSI, an app), refilled
//! continuously at `rate` per second up to `burst`. Requests per second and
//! tokens per minute are two limiters with different costs.

use std::collections::HashMap;
use std::hash::Hash;

/// One limit: `rate` units per second, at most `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limit {
    /// Units added per second.
    pub rate: f64,
    /// Most units held (and so the largest single cost allowed).
    pub burst: f64,
}

impl Limit {
    /// `n` per second, bursting to `n` (at least 1).
    pub fn per_second(n: f64) -> Limit {
        Limit {
            rate: n,
            burst: n.max(1.0),
        }
    }

    /// `n` per minute, bursting to `n`.
    pub fn per_minute(n: f64) -> Limit {
        Limit {
            rate: n / 60.0,
            burst: n.max(1.0),
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct State {
    level: f64,
    at: f64,
}

/// Token buckets for many keys under one limit.
#[derive(Debug)]
pub struct RateLimiter<K> {
    limit: Limit,
    keys: HashMap<K, State>,
}

impl<K: Hash + Eq + Clone> RateLimiter<K> {
    /// Limiter with `limit` for every key.
    pub fn new(limit: Limit) -> RateLimiter<K> {
        RateLimiter {
            limit,
            keys: HashMap::new(),
        }
    }

    fn level(&self, key: &K, now: f64) -> f64 {
        match self.keys.get(key) {
            Some(s) => (s.level + (now - s.at).max(0.0) * self.limit.rate).min(self.limit.burst),
            None => self.limit.burst,
        }
    }

    /// Seconds until `cost` units would be available for `key` (0 now).
    pub fn wait_for(&self, key: &K, cost: f64, now: f64) -> f64 {
        let cost = cost.min(self.limit.burst);
        let level = self.level(key, now);
        if level >= cost {
            0.0
        } else if self.limit.rate <= 0.0 {
            f64::INFINITY
        } else {
            (cost - level) / self.limit.rate
        }
    }

    /// Takes `cost` units for `key` at `now` (seconds) if available.
    /// Costs above the burst are capped to it (a large request waits for a
    /// full bucket rather than never passing). On refusal returns the
    /// seconds to wait.
    pub fn try_take(&mut self, key: &K, cost: f64, now: f64) -> Result<(), f64> {
        let wait = self.wait_for(key, cost, now);
        if wait > 0.0 {
            return Err(wait);
        }
        let level = self.level(key, now) - cost.min(self.limit.burst);
        self.keys.insert(key.clone(), State { level, at: now });
        Ok(())
    }

    /// Forgets keys whose bucket is full again (bounded memory).
    pub fn prune(&mut self, now: f64) {
        let (rate, burst) = (self.limit.rate, self.limit.burst);
        self.keys
            .retain(|_, s| s.level + (now - s.at).max(0.0) * rate < burst);
    }

    /// Keys tracked.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// True when no key is tracked.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bursts_then_refills_at_the_rate() {
        let mut l = RateLimiter::new(Limit::per_second(2.0));
        assert!(l.try_take(&"a", 1.0, 0.0).is_ok());
        assert!(l.try_take(&"a", 1.0, 0.0).is_ok());
        let wait = l.try_take(&"a", 1.0, 0.0).unwrap_err();
        assert!((wait - 0.5).abs() < 1e-9, "{wait}");
        // Another key is not affected.
        assert!(l.try_take(&"b", 1.0, 0.0).is_ok());
        assert!(l.try_take(&"a", 1.0, 0.5).is_ok());
        assert!(l.try_take(&"a", 1.0, 0.5).is_err());
    }

    #[test]
    fn tokens_per_minute_and_oversized_costs() {
        let mut l = RateLimiter::new(Limit::per_minute(600.0));
        assert!(l.try_take(&1, 500.0, 0.0).is_ok());
        let wait = l.try_take(&1, 200.0, 0.0).unwrap_err();
        assert!((wait - 10.0).abs() < 1e-9, "{wait}");
        // A cost above the burst waits for a full bucket, then passes.
        assert!(l.try_take(&1, 5000.0, 60.0).is_ok());
    }

    #[test]
    fn prune_forgets_full_buckets() {
        let mut l = RateLimiter::new(Limit::per_second(1.0));
        l.try_take(&"a", 1.0, 0.0).unwrap();
        l.prune(0.5);
        assert_eq!(l.len(), 1);
        l.prune(2.0);
        assert!(l.is_empty());
    }
}
