//! The edge's side of the upload protocol, sans-IO: which records to send
//! next, how many batches may be in flight, what an acknowledgement
//! releases, where to resume after a reconnect, and how long to wait before
//! reconnecting. The QUIC shell reads the log and moves bytes; every decision
//! is here, with deterministic tests.

use std::collections::VecDeque;
use std::time::Duration;

use crate::wire::pb::{Ack, Batch, LostRange};

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
    /// The core acknowledged past what was sent.
    #[error("the core acknowledged seq {acked}, beyond the {sent} sent")]
    BeyondSent {
        /// Acknowledged.
        acked: u64,
        /// Highest sent.
        sent: u64,
    },
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

    /// The core's hello on a new connection: sending resumes after what the
    /// core holds. Returns the position the log may be acknowledged to (the
    /// core may hold more than the log knows, after an edge crash).
    pub fn on_core_hello(&mut self, core_contiguous: u64) -> u64 {
        self.in_flight.clear();
        self.acked = self.acked.max(core_contiguous);
        self.next_seq = Some(self.acked + 1);
        self.acked
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
    /// from the log, ascending), with the log's `lost` ranges that fall in
    /// what it covers. `None` when there is nothing to send.
    pub fn batch(&mut self, records: Vec<(u64, Vec<u8>)>, lost: &[(u64, u64)]) -> Option<Batch> {
        let next = self.next_seq?;
        let last = records.last()?.0;
        let lost = lost
            .iter()
            .filter(|(f, l)| *l >= next && *f <= last)
            .map(|&(first, last)| LostRange { first, last })
            .collect();
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
            lost,
        })
    }

    /// An acknowledgement: returns the new acknowledged position when it
    /// moved (the log may release up to it).
    pub fn on_ack(&mut self, ack: &Ack) -> Result<Option<u64>, ProtocolError> {
        let next = self.next_seq.ok_or(ProtocolError::NotStarted)?;
        let pos = self
            .in_flight
            .iter()
            .position(|f| f.batch_id == ack.batch_id)
            .ok_or(ProtocolError::UnknownBatch(ack.batch_id))?;
        if ack.contiguous_seq >= next {
            return Err(ProtocolError::BeyondSent {
                acked: ack.contiguous_seq,
                sent: next - 1,
            });
        }
        // Batches are committed in order: this one and all before it are done.
        self.in_flight.drain(..=pos);
        let moved = ack.contiguous_seq > self.acked;
        self.acked = self.acked.max(ack.contiguous_seq);
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
            duplicates: 0,
            quarantined: 0,
        }
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
        // The core holds more than the log knows (the edge crashed after the ack).
        assert_eq!(w.on_core_hello(5), 5);
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
        w.on_core_hello(0);
        w.batch(recs(1, 100), &[]).unwrap();
        w.batch(recs(101, 200), &[]).unwrap();
        w.on_ack(&ack(1, 100)).unwrap();
        w.on_disconnect();
        assert_eq!(w.want(), None);
        // The core committed batch 2 before the link died.
        assert_eq!(w.on_core_hello(200), 200);
        assert_eq!(w.want().unwrap().0, 201);
        // Or it did not.
        let mut w2 = UploadWindow::new(WindowLimits::default(), 100);
        w2.on_core_hello(100);
        assert_eq!(w2.want().unwrap().0, 101);
    }

    #[test]
    fn a_short_ack_rewinds_once_the_window_drains() {
        let mut w = UploadWindow::new(WindowLimits::default(), 0);
        w.on_core_hello(0);
        w.batch(recs(1, 10), &[]).unwrap();
        // Seq 5 was quarantined: the core holds 1..=4.
        assert_eq!(w.on_ack(&ack(1, 4)), Ok(Some(4)));
        assert_eq!(w.want().unwrap().0, 5);
    }

    #[test]
    fn protocol_violations_are_errors() {
        let mut w = UploadWindow::new(WindowLimits::default(), 0);
        assert_eq!(w.on_ack(&ack(1, 1)), Err(ProtocolError::NotStarted));
        w.on_core_hello(0);
        w.batch(recs(1, 3), &[]).unwrap();
        assert_eq!(w.on_ack(&ack(9, 3)), Err(ProtocolError::UnknownBatch(9)));
        assert_eq!(
            w.on_ack(&ack(1, 4)),
            Err(ProtocolError::BeyondSent { acked: 4, sent: 3 })
        );
    }

    #[test]
    fn lost_ranges_travel_with_the_batch_that_covers_them() {
        let mut w = UploadWindow::new(WindowLimits::default(), 0);
        w.on_core_hello(0);
        let lost = [(4, 6), (50, 60)];
        let b = w
            .batch(
                vec![(1, vec![]), (2, vec![]), (3, vec![]), (7, vec![])],
                &lost,
            )
            .unwrap();
        assert_eq!(b.lost, vec![LostRange { first: 4, last: 6 }]);
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
