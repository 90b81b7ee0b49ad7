//! The edge's side of the upload protocol, sans-IO: which records to send
//! next, how many batches may be in flight, what an acknowledgement
//! releases, where to resume after a reconnect, and how long to wait before
//! reconnecting. The QUIC shell reads the log and moves bytes; every decision
//! is here, with deterministic tests.
//!
//! The rule for releasing the log: a record is released only once the core
//! holds that very record, matched by (node, seq, body hash). The core's
//! hello names its position and the hash of its record there; the hash
//! chain makes a match there a match of every record before it. Without a
//! match (the core is ahead of this log: the box was restored from a
//! snapshot; or the bodies differ: a fork) the edge resends from what it
//! has not released, and the core compares each resend with what it holds
//! (a different body is a fork, kept and reported). When the core is behind
//! what this log released (the core was restored from a backup), the edge
//! resends what it still has and declares the rest lost by the core, so the
//! upload always moves on.

use std::collections::VecDeque;
use std::time::Duration;

use crate::wire::pb::{Ack, Batch, LossReason, LostRange};

/// Bounds of what is in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowLimits {
    /// Records per batch.
    pub batch_records: usize,
    /// Bytes of records per batch.
    pub batch_bytes: usize,
    /// Batches sent and not yet acknowledged.
    pub in_flight: usize,
}

impl Default for WindowLimits {
    fn default() -> Self {
        WindowLimits {
            batch_records: 2048,
            batch_bytes: 1 << 20,
            in_flight: 4,
        }
    }
}

/// A violation of the protocol by the core: close the connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// An Ack before the CoreHello.
    #[error("acknowledgement before the core's hello")]
    NotStarted,
    /// An Ack for a batch not in flight.
    #[error("acknowledgement of batch {0}, which is not in flight")]
    UnknownBatch(u64),
}

/// What the edge's log says at a hello.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EdgePosition {
    /// The log's acknowledged (released) seq.
    pub acked: u64,
    /// The log's last durable seq.
    pub durable: u64,
    /// The body hash of this log's record at the core's position, when the
    /// log has it (a durable record there, or the ack file's hash when the
    /// position is the log's acknowledged seq).
    pub hash_at_core: Option<[u8; 32]>,
}

/// Where a connection starts, after the core's hello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resume {
    /// The log may be released up to here.
    pub release_to: u64,
    /// The first seq to send.
    pub send_from: u64,
    /// Why the positions disagree, when they do (the shell alarms).
    pub alarm: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Flight {
    batch_id: u64,
    last_seq: u64,
}

/// The uploader's state for one connection at a time.
#[derive(Debug)]
pub struct UploadWindow {
    limits: WindowLimits,
    /// The core holds every seq at or below this.
    acked: u64,
    /// Next seq to read from the log; `None` until the core said hello.
    next_seq: Option<u64>,
    in_flight: VecDeque<Flight>,
    next_batch_id: u64,
    /// The log's released seq at the hello: seqs above the core's position
    /// and at or below this that the log no longer has are lost by the core.
    released: u64,
}

impl UploadWindow {
    /// A window with `limits`; `log_acked` is the log's acknowledged seq.
    pub fn new(limits: WindowLimits, log_acked: u64) -> UploadWindow {
        UploadWindow {
            limits,
            acked: log_acked,
            next_seq: None,
            in_flight: VecDeque::new(),
            next_batch_id: 1,
            released: log_acked,
        }
    }

    /// Everything the core acknowledged.
    pub fn acked(&self) -> u64 {
        self.acked
    }

    /// Batches in flight.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// The core's hello on a new connection (`core_hash`: the hash of its
    /// record at `core_contiguous`, `None` when it holds none there): where
    /// to send from, and how far the log may be released (see the module
    /// docs for the rule).
    pub fn on_core_hello(
        &mut self,
        core_contiguous: u64,
        core_hash: Option<[u8; 32]>,
        edge: EdgePosition,
    ) -> Resume {
        self.in_flight.clear();
        self.acked = self.acked.max(edge.acked);
        self.released = edge.acked;
        let matched = core_contiguous == 0
            || (core_contiguous <= edge.durable
                && core_hash.is_some()
                && core_hash == edge.hash_at_core);
        let send_from = if matched {
            self.acked = self.acked.max(core_contiguous);
            core_contiguous + 1
        } else {
            core_contiguous.min(edge.acked) + 1
        };
        let alarm = if core_contiguous < edge.acked {
            Some(format!(
                "the core holds seqs up to {core_contiguous}, fewer than the {} it acknowledged \
                 (restored from a backup?): resending what this log still has from {send_from}, \
                 declaring the rest lost by the core",
                edge.acked
            ))
        } else if core_contiguous > edge.durable {
            Some(format!(
                "the core holds seqs up to {core_contiguous}, beyond this log's last record {} \
                 (the box restored from an older snapshot?): sending from {send_from}; records at \
                 seqs the core holds are reported there as forks",
                edge.durable
            ))
        } else if !matched && core_hash.is_some() && edge.hash_at_core.is_some() {
            Some(format!(
                "fork: the core's record at seq {core_contiguous} is not this log's: sending from \
                 {send_from}; the core reports the differing records as forks"
            ))
        } else {
            None
        };
        self.next_seq = Some(send_from);
        Resume {
            release_to: self.acked,
            send_from,
            alarm,
        }
    }

    /// The connection is gone: what was in flight will be sent again.
    pub fn on_disconnect(&mut self) {
        self.in_flight.clear();
        self.next_seq = None;
    }

    /// What to read from the log next, `(from_seq, max_records, max_bytes)`,
    /// or `None` while the window is full or the core has not said hello.
    pub fn want(&self) -> Option<(u64, usize, usize)> {
        let next = self.next_seq?;
        (self.in_flight.len() < self.limits.in_flight).then_some((
            next,
            self.limits.batch_records,
            self.limits.batch_bytes,
        ))
    }

    /// Makes the batch of `records` (`(seq, SignedRecord bytes)` as read
    /// from the log, ascending), with the log's `lost` ranges (salvaged)
    /// that fall in what it covers, and the seqs the core lost that this log
    /// released and no longer has. `None` when there is nothing to send.
    pub fn batch(&mut self, records: Vec<(u64, Vec<u8>)>, lost: &[(u64, u64)]) -> Option<Batch> {
        let next = self.next_seq?;
        // Released seqs before the first record this log still has.
        let lost_by_core_to = match records.first() {
            Some(&(first, _)) => (first - 1).min(self.released),
            None => self.released,
        };
        let last = match records.last() {
            Some(&(last, _)) => last,
            None if next <= lost_by_core_to => lost_by_core_to,
            None => return None,
        };
        let mut ranges: Vec<LostRange> = lost
            .iter()
            .filter(|(f, l)| *l >= next && *f <= last)
            .map(|&(first, last)| LostRange {
                first,
                last,
                reason: LossReason::EdgeSalvaged as i32,
            })
            .collect();
        if next <= lost_by_core_to {
            ranges.push(LostRange {
                first: next,
                last: lost_by_core_to,
                reason: LossReason::CoreLost as i32,
            });
        }
        let batch_id = self.next_batch_id;
        self.next_batch_id += 1;
        self.in_flight.push_back(Flight {
            batch_id,
            last_seq: last,
        });
        self.next_seq = Some(last + 1);
        Some(Batch {
            batch_id,
            records: records.into_iter().map(|(_, b)| b).collect(),
            lost: ranges,
        })
    }

    /// An acknowledgement: returns the new release position when it moved.
    /// The log is released no further than this batch's last seq, even when
    /// the core's position is beyond it (the core is ahead of this log: it
    /// holds each record sent, stored, matched, or kept as a fork).
    pub fn on_ack(&mut self, ack: &Ack) -> Result<Option<u64>, ProtocolError> {
        let next = self.next_seq.ok_or(ProtocolError::NotStarted)?;
        let pos = self
            .in_flight
            .iter()
            .position(|f| f.batch_id == ack.batch_id)
            .ok_or(ProtocolError::UnknownBatch(ack.batch_id))?;
        let held = ack.contiguous_seq.min(self.in_flight[pos].last_seq);
        // Batches are committed in order: this one and all before it are done.
        self.in_flight.drain(..=pos);
        let moved = held > self.acked;
        self.acked = self.acked.max(held);
        // The core holds less than was sent (a record waits, or was
        // quarantined and must be resolved): resend from its position once
        // the window drains.
        if self.in_flight.is_empty() && self.acked < next - 1 {
            self.next_seq = Some(self.acked + 1);
        }
        Ok(moved.then_some(self.acked))
    }
}

/// Reconnection delays: exponential from `base` to `max`, with full jitter
/// (a uniformly random share of the step), reset after a success.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    /// From `base` up to `max`.
    pub fn new(base: Duration, max: Duration) -> Backoff {
        Backoff {
            base,
            max,
            attempt: 0,
        }
    }

    /// The delay before the next attempt; `unit` is a random number in
    /// [0, 1) (the caller's generator: deterministic in tests).
    pub fn next_delay(&mut self, unit: f64) -> Duration {
        let step = self
            .base
            .saturating_mul(1u32 << self.attempt.min(20))
            .min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        step.mul_f64(0.5 + unit.clamp(0.0, 1.0) / 2.0)
    }

    /// A connection succeeded.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recs(from: u64, to: u64) -> Vec<(u64, Vec<u8>)> {
        (from..=to).map(|s| (s, vec![s as u8])).collect()
    }

    fn ack(batch_id: u64, contiguous_seq: u64) -> Ack {
        Ack {
            batch_id,
            contiguous_seq,
            ..Default::default()
        }
    }

    /// The body hash of "record `seq`" in these tests.
    fn h(seq: u64) -> [u8; 32] {
        [seq as u8; 32]
    }

    /// A hello from a core at `core` with the hash of the same record this
    /// log holds there (`hash_at_core` given when the log has it).
    fn hello(w: &mut UploadWindow, core: u64, acked: u64, durable: u64) -> Resume {
        let has = core >= acked && core <= durable;
        w.on_core_hello(
            core,
            (core > 0).then(|| h(core)),
            EdgePosition {
                acked,
                durable,
                hash_at_core: has.then(|| h(core)),
            },
        )
    }

    #[test]
    fn sends_from_the_cores_position_within_the_window() {
        let limits = WindowLimits {
            batch_records: 10,
            batch_bytes: 1 << 20,
            in_flight: 2,
        };
        let mut w = UploadWindow::new(limits, 3);
        assert_eq!(w.want(), None, "nothing before the core's hello");
        // The core holds more than the log released (the edge crashed
        // before its ack), and its record at 5 is this log's.
        assert_eq!(hello(&mut w, 5, 3, 20).release_to, 5);
        assert_eq!(w.want(), Some((6, 10, 1 << 20)));
        let b1 = w.batch(recs(6, 15), &[]).unwrap();
        let b2 = w.batch(recs(16, 20), &[]).unwrap();
        assert_eq!((b1.batch_id, b2.batch_id), (1, 2));
        assert_eq!(w.want(), None, "window full");
        assert_eq!(w.on_ack(&ack(1, 15)), Ok(Some(15)));
        assert_eq!(w.want(), Some((21, 10, 1 << 20)));
        assert_eq!(w.on_ack(&ack(2, 20)), Ok(Some(20)));
        assert_eq!(w.in_flight(), 0);
    }

    #[test]
    fn a_reconnect_resends_what_was_in_flight() {
        let mut w = UploadWindow::new(WindowLimits::default(), 0);
        hello(&mut w, 0, 0, 200);
        w.batch(recs(1, 100), &[]).unwrap();
        w.batch(recs(101, 200), &[]).unwrap();
        w.on_ack(&ack(1, 100)).unwrap();
        w.on_disconnect();
        assert_eq!(w.want(), None);
        // The core committed batch 2 before the link died.
        assert_eq!(hello(&mut w, 200, 100, 200).release_to, 200);
        assert_eq!(w.want().unwrap().0, 201);
        // Or it did not.
        let mut w2 = UploadWindow::new(WindowLimits::default(), 100);
        hello(&mut w2, 100, 100, 200);
        assert_eq!(w2.want().unwrap().0, 101);
    }

    #[test]
    fn a_short_ack_rewinds_once_the_window_drains() {
        let mut w = UploadWindow::new(WindowLimits::default(), 0);
        hello(&mut w, 0, 0, 10);
        w.batch(recs(1, 10), &[]).unwrap();
        // Seq 5 was quarantined: the core holds 1..=4.
        assert_eq!(w.on_ack(&ack(1, 4)), Ok(Some(4)));
        assert_eq!(w.want().unwrap().0, 5);
    }

    #[test]
    fn protocol_violations_are_errors() {
        let mut w = UploadWindow::new(WindowLimits::default(), 0);
        assert_eq!(w.on_ack(&ack(1, 1)), Err(ProtocolError::NotStarted));
        hello(&mut w, 0, 0, 3);
        w.batch(recs(1, 3), &[]).unwrap();
        assert_eq!(w.on_ack(&ack(9, 3)), Err(ProtocolError::UnknownBatch(9)));
    }

    #[test]
    fn a_core_ahead_of_the_log_releases_only_what_was_sent_and_matched() {
        // The box was restored from a snapshot at 5; the core holds 1..=10.
        let mut w = UploadWindow::new(WindowLimits::default(), 2);
        let r = hello(&mut w, 10, 2, 5);
        assert_eq!(
            (r.release_to, r.send_from),
            (2, 3),
            "nothing past the log's own ack"
        );
        assert!(r.alarm.unwrap().contains("beyond this log's last record 5"));
        // New records 6..=7 reach the core (it reports the forks) and are
        // released only up to what was sent, whatever the core's position.
        w.batch(recs(3, 7), &[]).unwrap();
        assert_eq!(w.on_ack(&ack(1, 10)), Ok(Some(7)));
        assert_eq!(w.want().unwrap().0, 8);
    }

    #[test]
    fn a_fork_at_the_cores_position_resends_from_the_logs_ack() {
        let mut w = UploadWindow::new(WindowLimits::default(), 2);
        let r = w.on_core_hello(
            6,
            Some(h(6)),
            EdgePosition {
                acked: 2,
                durable: 9,
                hash_at_core: Some([0xee; 32]),
            },
        );
        assert_eq!((r.release_to, r.send_from), (2, 3));
        assert!(r.alarm.unwrap().starts_with("fork"));
    }

    #[test]
    fn a_core_behind_what_it_acknowledged_gets_back_what_the_log_has_and_the_rest_is_named() {
        // The core acknowledged 60 and comes back from a backup holding 5;
        // the log kept 41..=63 (older segments were deleted).
        let mut w = UploadWindow::new(WindowLimits::default(), 60);
        let r = hello(&mut w, 5, 60, 63);
        assert_eq!((r.release_to, r.send_from), (60, 6));
        assert!(r.alarm.unwrap().contains("restored from a backup"));
        let b = w.batch(recs(41, 63), &[]).unwrap();
        assert_eq!(
            b.lost,
            vec![LostRange {
                first: 6,
                last: 40,
                reason: LossReason::CoreLost as i32
            }]
        );
        assert_eq!(w.on_ack(&ack(b.batch_id, 63)), Ok(Some(63)));
        // A log with nothing left to send names the whole range on its own.
        let mut w = UploadWindow::new(WindowLimits::default(), 60);
        hello(&mut w, 5, 60, 60);
        let b = w.batch(Vec::new(), &[]).unwrap();
        assert!(b.records.is_empty());
        assert_eq!((b.lost[0].first, b.lost[0].last), (6, 60));
        assert_eq!(w.batch(Vec::new(), &[]), None, "named once");
    }

    #[test]
    fn lost_ranges_travel_with_the_batch_that_covers_them() {
        let mut w = UploadWindow::new(WindowLimits::default(), 0);
        hello(&mut w, 0, 0, 7);
        let lost = [(4, 6), (50, 60)];
        let b = w
            .batch(
                vec![(1, vec![]), (2, vec![]), (3, vec![]), (7, vec![])],
                &lost,
            )
            .unwrap();
        assert_eq!(
            b.lost,
            vec![LostRange {
                first: 4,
                last: 6,
                reason: LossReason::EdgeSalvaged as i32
            }]
        );
    }

    #[test]
    fn backoff_grows_to_its_cap_with_jitter_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let d: Vec<Duration> = (0..8).map(|_| b.next_delay(1.0)).collect();
        assert_eq!(d[0], Duration::from_millis(100));
        assert_eq!(d[3], Duration::from_millis(800));
        assert_eq!(d[7], Duration::from_secs(5));
        assert_eq!(b.next_delay(0.0), Duration::from_millis(2500));
        b.reset();
        assert_eq!(b.next_delay(0.0), Duration::from_millis(50));
    }
}
