//! Whether a boot is good, as plain data: the agent must answer ready
//! without a break for a while, within a deadline. The caller polls and
//! feeds each answer with its time; [`HealthGate`] says when to stop.
//! (Marking a boot good at the first ready answer is how a slot that
//! crashes a minute later gets blessed: the failure mode RAUC and Mender
//! users report.)

use std::time::Duration;

/// The verdict so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Keep polling.
    Pending,
    /// Ready for the whole window.
    Good,
    /// The deadline passed before a whole window of readiness.
    TimedOut {
        /// The longest unbroken ready stretch seen.
        longest_ready: Duration,
    },
}

/// The gate: `ready_for` of unbroken readiness within `timeout` of the
/// start.
#[derive(Debug, Clone)]
pub struct HealthGate {
    ready_for: Duration,
    timeout: Duration,
    ready_since: Option<Duration>,
    longest: Duration,
}

impl HealthGate {
    /// A gate; times given to [`HealthGate::observe`] count from its start.
    pub fn new(ready_for: Duration, timeout: Duration) -> HealthGate {
        HealthGate {
            ready_for,
            timeout,
            ready_since: None,
            longest: Duration::ZERO,
        }
    }

    /// One poll's answer at `at` (time since the start).
    pub fn observe(&mut self, at: Duration, ready: bool) -> Verdict {
        if ready {
            let since = *self.ready_since.get_or_insert(at);
            let stretch = at.saturating_sub(since);
            self.longest = self.longest.max(stretch);
            if stretch >= self.ready_for {
                return Verdict::Good;
            }
        } else {
            self.ready_since = None;
        }
        if at >= self.timeout {
            return Verdict::TimedOut {
                longest_ready: self.longest,
            };
        }
        Verdict::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn good_only_after_an_unbroken_window() {
        let mut g = HealthGate::new(s(60), s(600));
        assert_eq!(g.observe(s(0), false), Verdict::Pending);
        assert_eq!(g.observe(s(10), true), Verdict::Pending);
        assert_eq!(g.observe(s(69), true), Verdict::Pending);
        // A break (the agent restarted) starts the window again.
        assert_eq!(g.observe(s(71), false), Verdict::Pending);
        assert_eq!(g.observe(s(73), true), Verdict::Pending);
        assert_eq!(g.observe(s(132), true), Verdict::Pending);
        assert_eq!(g.observe(s(133), true), Verdict::Good);
    }

    #[test]
    fn an_agent_that_never_stays_ready_times_out() {
        let mut g = HealthGate::new(s(60), s(300));
        let mut t = 0;
        let v = loop {
            // Ready for 30 s, then a crash, again and again.
            let v = g.observe(s(t), t % 40 < 30);
            if v != Verdict::Pending {
                break v;
            }
            t += 2;
        };
        assert_eq!(
            v,
            Verdict::TimedOut {
                longest_ready: s(28)
            }
        );
        assert_eq!(t, 300);
        let mut never = HealthGate::new(s(60), s(10));
        assert_eq!(never.observe(s(5), false), Verdict::Pending);
        assert!(matches!(
            never.observe(s(10), false),
            Verdict::TimedOut { .. }
        ));
    }

    #[test]
    fn a_zero_window_is_good_at_the_first_ready_answer() {
        let mut g = HealthGate::new(Duration::ZERO, s(10));
        assert_eq!(g.observe(s(3), true), Verdict::Good);
    }
}
