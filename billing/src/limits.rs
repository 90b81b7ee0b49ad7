//! The four rate limits of the MEC API, over the sans-IO token buckets of
//! `mec_metering::ratelimit`, with the state of keys not seen for a while
//! pruned (an app cycling IMSIs must not grow memory without bound).

use std::time::Instant;

use mec_metering::ratelimit::{Limit, RateLimiter};

use crate::BillingError;

/// Limits per subscriber and per app (0 turns one off).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RateLimits {
    /// Requests per second per subscriber.
    pub imsi_requests_per_second: f64,
    /// Tokens per minute per subscriber (prompt plus most completion).
    pub imsi_tokens_per_minute: f64,
    /// Requests per second per app.
    pub app_requests_per_second: f64,
    /// Tokens per minute per app.
    pub app_tokens_per_minute: f64,
}

/// Seconds between two prunings of full buckets.
const PRUNE_EVERY_S: f64 = 10.0;

pub(crate) struct Limiters {
    imsi_rps: Option<RateLimiter<String>>,
    imsi_tpm: Option<RateLimiter<String>>,
    app_rps: Option<RateLimiter<String>>,
    app_tpm: Option<RateLimiter<String>>,
    clock0: Instant,
    pruned_at: f64,
}

impl Limiters {
    pub fn new(c: &RateLimits) -> Limiters {
        let mk = |v: f64, per_minute: bool| {
            (v > 0.0).then(|| {
                RateLimiter::new(if per_minute {
                    Limit::per_minute(v)
                } else {
                    Limit::per_second(v)
                })
            })
        };
        Limiters {
            imsi_rps: mk(c.imsi_requests_per_second, false),
            imsi_tpm: mk(c.imsi_tokens_per_minute, true),
            app_rps: mk(c.app_requests_per_second, false),
            app_tpm: mk(c.app_tokens_per_minute, true),
            clock0: Instant::now(),
            pruned_at: 0.0,
        }
    }

    /// Refuses with the longest wait when any limit refuses; takes from
    /// every limit only when all allow.
    pub fn check(&mut self, imsi: &str, app: &str, tokens: u64) -> Result<(), BillingError> {
        let now = self.clock0.elapsed().as_secs_f64();
        self.check_at(imsi, app, tokens, now)
    }

    pub(crate) fn check_at(
        &mut self,
        imsi: &str,
        app: &str,
        tokens: u64,
        now: f64,
    ) -> Result<(), BillingError> {
        if now - self.pruned_at >= PRUNE_EVERY_S {
            self.pruned_at = now;
            for l in [
                &mut self.imsi_rps,
                &mut self.imsi_tpm,
                &mut self.app_rps,
                &mut self.app_tpm,
            ]
            .into_iter()
            .flatten()
            {
                l.prune(now);
            }
        }
        let (imsi, app) = (imsi.to_string(), app.to_string());
        let checks: [(&mut Option<RateLimiter<String>>, &String, f64, &'static str); 4] = [
            (
                &mut self.imsi_rps,
                &imsi,
                1.0,
                "requests per second of this subscriber",
            ),
            (
                &mut self.imsi_tpm,
                &imsi,
                tokens as f64,
                "tokens per minute of this subscriber",
            ),
            (
                &mut self.app_rps,
                &app,
                1.0,
                "requests per second of this app",
            ),
            (
                &mut self.app_tpm,
                &app,
                tokens as f64,
                "tokens per minute of this app",
            ),
        ];
        let mut worst: Option<(f64, &'static str)> = None;
        for (lim, key, cost, what) in checks.iter() {
            if let Some(lim) = lim.as_ref() {
                let wait = lim.wait_for(key, *cost, now);
                if wait > 0.0 && worst.is_none_or(|(w, _)| wait > w) {
                    worst = Some((wait, what));
                }
            }
        }
        if let Some((retry_after_s, what)) = worst {
            return Err(BillingError::RateLimited {
                what,
                retry_after_s,
            });
        }
        for (lim, key, cost, _) in checks {
            if let Some(lim) = lim.as_mut() {
                let _ = lim.try_take(key, cost, now);
            }
        }
        Ok(())
    }

    /// Keys tracked over all four limits.
    #[cfg(test)]
    fn keys(&self) -> usize {
        [&self.imsi_rps, &self.imsi_tpm, &self.app_rps, &self.app_tpm]
            .into_iter()
            .flatten()
            .map(|l| l.len())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limit_state_of_subscribers_gone_quiet_is_pruned() {
        let mut l = Limiters::new(&RateLimits {
            imsi_requests_per_second: 2.0,
            imsi_tokens_per_minute: 6000.0,
            app_requests_per_second: 0.0,
            app_tokens_per_minute: 0.0,
        });
        // An app cycling through 10,000 IMSIs, one request each.
        for i in 0..10_000u64 {
            l.check_at(&format!("00101{i:010}"), "app", 10, i as f64 * 0.001)
                .unwrap();
        }
        assert!(
            l.keys() >= 10_000,
            "every key is tracked while its bucket refills"
        );
        // A minute later every bucket is full again: one request prunes them all.
        l.check_at("001010000000001", "app", 10, 70.0).unwrap();
        assert!(l.keys() <= 2, "{} keys kept", l.keys());
    }

    #[test]
    fn a_refusal_names_the_limit_and_takes_nothing() {
        let mut l = Limiters::new(&RateLimits {
            imsi_requests_per_second: 1.0,
            imsi_tokens_per_minute: 0.0,
            app_requests_per_second: 0.0,
            app_tokens_per_minute: 60.0,
        });
        l.check_at("1", "a", 50, 0.0).unwrap();
        match l.check_at("2", "a", 50, 0.1) {
            Err(BillingError::RateLimited {
                what,
                retry_after_s,
            }) => {
                assert_eq!(what, "tokens per minute of this app");
                assert!(retry_after_s > 30.0, "{retry_after_s}");
            }
            other => panic!("{other:?}"),
        }
        // Subscriber 2's request budget was not taken by the refusal.
        l.check_at("2", "b", 1, 0.2).unwrap();
    }
}
