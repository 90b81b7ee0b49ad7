//! The durable usage log: signed, hash-chained records in append-only segment
//! files, acknowledged to the appender only once `fdatasync` has returned.
//!
//! The byte format and the crash assumptions are in [`format`]. This module is
//! the shell around it:
//!
//! * [`UsageLog::open`] recovers the directory (truncating a torn tail,
//!   refusing damage to acknowledged data) and starts the writer thread.
//! * [`UsageLog::append`] assigns the next dense seq, chains the record to the
//!   previous body, signs it, and resolves once the record is durable. Many
//!   appenders share one write and one `fdatasync` (group commit).
//! * [`UsageLog::read_from`] serves durable records to the uploader;
//!   [`UsageLog::ack`] records how far the core has them and deletes segments
//!   wholly at or below that.
//!
//! # Concurrency
//!
//! Seq assignment, chaining and encoding happen under one short lock; signing
//! (the expensive part, ~30 µs) happens outside it on the appender's thread,
//! so signing spreads over all cores. Signed frames reach the writer thread
//! out of order; it writes them in seq order. Once a seq is assigned, the
//! record reaches the writer even if the appender's future is dropped.
//!
//! # Failure
//!
//! When a write or `fdatasync` fails (ENOSPC, EIO, a file size limit), the
//! writer answers every record not yet durable with [`LogError::Unavailable`]
//! (or [`LogError::Full`] for a full disk), rolls the sequence back to the last
//! durable record, truncates the active segment to its last synced length and
//! syncs that before accepting work again. A record answered with an error is
//! therefore not in the log, its seq is reused, and nothing is claimed durable
//! that was not synced after the failure.

mod backend;
pub mod format;
mod recovery;
pub mod salvage;
pub mod verify;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use prost::Message;
use tokio::sync::{mpsc, oneshot};

#[cfg(target_os = "linux")]
pub use backend::UringBackend;
pub use backend::{BackendChoice, BackendKind, FileBackend, SegmentBackend};
pub use format::AckState;
pub use recovery::LostRange;
pub use writer::probe_uring;

use crate::identity::NodeIdentity;
use crate::record::{SignedRecord, UsageRecord, SCHEMA_VERSION};

/// Tunables of a usage log.
#[derive(Debug, Clone)]
pub struct LogOptions {
    /// A segment is closed and a new one started once it reaches this size.
    pub segment_bytes: u64,
    /// Most bytes of records not yet acknowledged by the core; past it,
    /// `append` fails with [`LogError::Full`]. Nothing unacknowledged is ever dropped.
    pub budget_bytes: u64,
    /// Most bytes written in one group commit.
    pub max_batch_bytes: usize,
    /// Which backend writes.
    pub backend: BackendChoice,
    /// How long the writer waits for more records before a group commit when
    /// the previous commit carried more than one (zero: never wait). Trades a
    /// little latency under concurrency for fewer syncs.
    pub commit_delay: std::time::Duration,
}

impl Default for LogOptions {
    fn default() -> Self {
        LogOptions {
            segment_bytes: 64 << 20,
            budget_bytes: 1 << 30,
            max_batch_bytes: 4 << 20,
            backend: BackendChoice::Auto,
            commit_delay: std::time::Duration::from_micros(200),
        }
    }
}

/// Errors of the usage log.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum LogError {
    /// No room: the unacknowledged-bytes budget is used up, or the disk is
    /// full. The record was not logged; the agent refuses billable work (503).
    #[error("usage log full: {0}")]
    Full(String),
    /// The log cannot persist right now (an I/O error). The record was not logged.
    #[error("usage log unavailable: {0}")]
    Unavailable(String),
    /// The log was closed.
    #[error("usage log closed")]
    Closed,
    /// A record too large for one frame.
    #[error("record of {0} bytes is over the frame limit")]
    TooLarge(usize),
    /// A file of the log could not be read or written while opening or reading.
    #[error("{path}: {message}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What failed.
        message: String,
    },
    /// Acknowledged data is damaged: the log refuses to open. Run
    /// `edge-agent log salvage` to move the segment aside and continue.
    #[error("{path}: damaged at byte offset {offset}: {reason}; records after it are intact, so this is not a torn write. Run `edge-agent log salvage --dir <DIR>` to move the damaged segment aside (kept under log/damaged/) and record the lost range")]
    Damaged {
        /// The segment.
        path: PathBuf,
        /// Offset of the damage.
        offset: u64,
        /// What is wrong there.
        reason: String,
    },
    /// The log's files disagree with each other (gap between segments, broken
    /// chain across a segment boundary, ack file not matching the data).
    #[error("{path}: {reason}")]
    Inconsistent {
        /// The file where the disagreement shows.
        path: PathBuf,
        /// What disagrees.
        reason: String,
    },
    /// `ack` named a record that is not durable in this log.
    #[error("cannot acknowledge seq {seq}: the log's last durable record is {durable}")]
    AckBeyondDurable {
        /// Requested.
        seq: u64,
        /// Last durable seq.
        durable: u64,
    },
}

impl LogError {
    /// True for the errors after which the agent must refuse new billable work.
    pub fn refuses_billable_work(&self) -> bool {
        matches!(
            self,
            LogError::Full(_) | LogError::Unavailable(_) | LogError::Closed
        )
    }

    pub(crate) fn io(path: &Path, e: impl std::fmt::Display) -> LogError {
        LogError::Io {
            path: path.to_path_buf(),
            message: e.to_string(),
        }
    }

    /// Maps a write/sync failure: a full disk is `Full`, anything else `Unavailable`.
    pub(crate) fn from_write_failure(what: &str, e: &std::io::Error) -> LogError {
        let msg = format!("{what}: {e}");
        match e.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EFBIG) | Some(libc::EDQUOT) => LogError::Full(msg),
            _ => LogError::Unavailable(msg),
        }
    }
}

/// Where the sequencer stands: shared between appenders and the writer.
#[derive(Debug)]
pub(crate) struct Sequencer {
    pub next_seq: u64,
    pub last_hash: [u8; 32],
    /// Bumped when the writer discards undurable records after a failure;
    /// records assigned in an older epoch are answered with an error.
    pub epoch: u64,
    /// Frame bytes assigned but not yet durable.
    pub pending_bytes: u64,
    /// Set while the writer cannot repair the log after a failure (its last
    /// repair attempt failed): appends are refused at once.
    pub failure: Option<LogError>,
}

/// One durable segment as the readers see it.
#[derive(Debug, Clone)]
pub(crate) struct SegmentIndex {
    pub base_seq: u64,
    pub path: PathBuf,
    /// (offset, frame length) of frame `base_seq + i`.
    pub frames: Vec<(u64, u32)>,
}

impl SegmentIndex {
    fn last_seq(&self) -> u64 {
        self.base_seq + self.frames.len() as u64 - 1
    }
}

#[derive(Debug)]
pub(crate) struct Index {
    pub segments: Vec<SegmentIndex>,
    pub durable_seq: u64,
}

#[derive(Debug)]
pub(crate) struct Shared {
    pub dir: PathBuf,
    pub seq: Mutex<Sequencer>,
    pub index: Mutex<Index>,
    /// Frame bytes of durable records above the acknowledged seq.
    pub unacked_durable: AtomicU64,
    pub ack: Mutex<AckState>,
    pub lost: Vec<LostRange>,
}

/// A record on its way to the writer.
pub(crate) struct Item {
    pub epoch: u64,
    pub seq: u64,
    pub payload: Vec<u8>,
    pub body_hash: [u8; 32],
    pub frame_bytes: u64,
    pub reply: oneshot::Sender<Result<u64, LogError>>,
}

/// One contiguous read: a segment, the offset to start at, and the frames
/// (seq, offset, length) to take from it.
type ReadPlan = (PathBuf, u64, Vec<(u64, u64, u32)>);

/// Counts for metrics and the admin API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct LogStats {
    /// Last durable seq (0 when none).
    pub durable_seq: u64,
    /// Acknowledged seq.
    pub acked_seq: u64,
    /// Records durable but not acknowledged.
    pub backlog_records: u64,
    /// Their frame bytes.
    pub backlog_bytes: u64,
    /// Number of segment files.
    pub segments: usize,
}

/// The durable usage log of one node. See the module docs.
pub struct UsageLog {
    shared: Arc<Shared>,
    tx: Option<mpsc::UnboundedSender<Item>>,
    writer: Option<std::thread::JoinHandle<()>>,
    identity: NodeIdentity,
    node_id: String,
    options: LogOptions,
    backend: BackendKind,
}

impl std::fmt::Debug for UsageLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UsageLog")
            .field("dir", &self.shared.dir)
            .field("node_id", &self.node_id)
            .field("backend", &self.backend)
            .finish_non_exhaustive()
    }
}

/// Frame bytes of the records with `above < seq <= upto`.
fn frame_bytes_between(segments: &[SegmentIndex], above: u64, upto: u64) -> u64 {
    segments
        .iter()
        .flat_map(|s| {
            let base = s.base_seq;
            s.frames
                .iter()
                .enumerate()
                .map(move |(i, f)| (base + i as u64, f.1))
        })
        .filter(|&(seq, _)| seq > above && seq <= upto)
        .map(|(_, len)| len as u64)
        .sum()
}

/// The size of the `SignedRecord` encoding for a body of `body_len` bytes
/// (the signature is always 64 bytes, so the size is known before signing).
fn signed_len(body_len: usize) -> usize {
    SignedRecord {
        body: vec![0; body_len],
        signature: vec![0; 64],
    }
    .encoded_len()
}

impl UsageLog {
    /// Opens (or creates) the log in `dir`, recovering from any crash, and
    /// starts its writer. Records are signed by `identity` in the name of `node_id`.
    pub fn open(
        dir: &Path,
        identity: NodeIdentity,
        node_id: &str,
        options: LogOptions,
    ) -> Result<UsageLog, LogError> {
        let choice = options.backend;
        Self::open_inner(dir, identity, node_id, options, |start| {
            writer::spawn(choice, start)
        })
    }

    /// Opens the log over a backend the caller made, ignoring
    /// `options.backend`: how the tests put a fault-injecting backend (one
    /// that fails the Nth write or sync, or answers slowly) under the writer.
    pub fn open_with_backend<B: SegmentBackend + Send + 'static>(
        dir: &Path,
        identity: NodeIdentity,
        node_id: &str,
        options: LogOptions,
        backend: B,
    ) -> Result<UsageLog, LogError> {
        Self::open_inner(dir, identity, node_id, options, move |start| {
            writer::spawn_with(backend, start).map(|h| (h, BackendKind::Custom))
        })
    }

    fn open_inner(
        dir: &Path,
        identity: NodeIdentity,
        node_id: &str,
        options: LogOptions,
        spawn: impl FnOnce(
            writer::WriterStart,
        ) -> Result<(std::thread::JoinHandle<()>, BackendKind), LogError>,
    ) -> Result<UsageLog, LogError> {
        let recovered = recovery::recover(dir, &identity, node_id)?;
        let active = recovered
            .segments
            .last()
            .expect("recovery leaves an active segment")
            .clone();
        let active_len = recovered.active_len;
        let durable_seq = recovered.durable_seq;
        let durable_hash = recovered.durable_hash;
        let unacked = frame_bytes_between(&recovered.segments, recovered.ack.seq, u64::MAX);
        let shared = Arc::new(Shared {
            dir: dir.to_path_buf(),
            seq: Mutex::new(Sequencer {
                next_seq: durable_seq + 1,
                last_hash: durable_hash,
                epoch: 0,
                pending_bytes: 0,
                failure: None,
            }),
            index: Mutex::new(Index {
                segments: recovered.segments,
                durable_seq,
            }),
            unacked_durable: AtomicU64::new(unacked),
            ack: Mutex::new(recovered.ack),
            lost: recovered.lost,
        });
        let (tx, rx) = mpsc::unbounded_channel();
        let start = writer::WriterStart {
            shared: shared.clone(),
            rx,
            active_path: active.path.clone(),
            active_base: active.base_seq,
            active_len,
            durable_seq,
            durable_hash,
            segment_bytes: options.segment_bytes,
            max_batch_bytes: options.max_batch_bytes,
            commit_delay: options.commit_delay,
        };
        let (writer, backend) = spawn(start)?;
        tracing::info!(dir = %dir.display(), backend = backend.as_str(), durable_seq, acked_seq = recovered.ack.seq, "usage log open");
        Ok(UsageLog {
            shared,
            tx: Some(tx),
            writer: Some(writer),
            identity,
            node_id: node_id.to_string(),
            options,
            backend,
        })
    }

    /// The backend in use.
    pub fn backend(&self) -> BackendKind {
        self.backend
    }

    /// The log directory.
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// The signing identity.
    pub fn identity(&self) -> &NodeIdentity {
        &self.identity
    }

    /// The node id written into records.
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// Appends a record and resolves once it is durable, with its seq.
    ///
    /// The log fills in `schema_version`, `node_id`, `key_id`, `seq` and
    /// `prev_hash`; the caller fills in the rest. Dropping the returned future
    /// after it was first polled does not withdraw the record.
    pub async fn append(&self, record: UsageRecord) -> Result<u64, LogError> {
        let reply = self.submit(record)?;
        reply.await.map_err(|_| LogError::Closed)?
    }

    /// The synchronous half of `append`: assign, chain, sign, hand to the writer.
    fn submit(
        &self,
        mut record: UsageRecord,
    ) -> Result<oneshot::Receiver<Result<u64, LogError>>, LogError> {
        let tx = self.tx.as_ref().ok_or(LogError::Closed)?;
        let (epoch, seq, body, body_hash, frame_bytes) = {
            let mut s = self.shared.seq.lock().unwrap();
            if let Some(failure) = &s.failure {
                return Err(failure.clone());
            }
            record.schema_version = SCHEMA_VERSION;
            record.node_id.clone_from(&self.node_id);
            record.key_id = self.identity.key_id().to_string();
            record.seq = s.next_seq;
            record.prev_hash = s.last_hash.to_vec();
            let body = record.encode_to_vec();
            let payload_len = signed_len(body.len());
            if payload_len > format::MAX_PAYLOAD {
                return Err(LogError::TooLarge(payload_len));
            }
            let frame_bytes = format::frame_len(payload_len);
            let unacked = self.shared.unacked_durable.load(Ordering::Acquire) + s.pending_bytes;
            if unacked + frame_bytes > self.options.budget_bytes {
                return Err(LogError::Full(format!(
                    "{unacked} bytes of records await acknowledgement by the core; the budget is {} bytes",
                    self.options.budget_bytes
                )));
            }
            let body_hash = format::sha256(&body);
            s.next_seq += 1;
            s.last_hash = body_hash;
            s.pending_bytes += frame_bytes;
            (s.epoch, record.seq, body, body_hash, frame_bytes)
        };
        let payload = SignedRecord::sign(body, self.identity.signing_key()).encode_to_vec();
        let (reply, rx) = oneshot::channel();
        tx.send(Item {
            epoch,
            seq,
            payload,
            body_hash,
            frame_bytes,
            reply,
        })
        .map_err(|_| LogError::Closed)?;
        Ok(rx)
    }

    /// Whether an append of a record of `record_bytes` would be refused now
    /// (closed, failing, or over the budget): the agent asks before it
    /// serves billable work, and readiness reports it.
    pub fn check_accepting(&self, record_bytes: u64) -> Result<(), LogError> {
        if self.tx.is_none() {
            return Err(LogError::Closed);
        }
        let s = self.shared.seq.lock().unwrap();
        if let Some(failure) = &s.failure {
            return Err(failure.clone());
        }
        let unacked = self.shared.unacked_durable.load(Ordering::Acquire) + s.pending_bytes;
        if unacked + record_bytes > self.options.budget_bytes {
            return Err(LogError::Full(format!(
                "{unacked} bytes of records await acknowledgement by the core; the budget is {} bytes",
                self.options.budget_bytes
            )));
        }
        Ok(())
    }

    /// Counts for metrics.
    pub fn stats(&self) -> LogStats {
        let ack = *self.shared.ack.lock().unwrap();
        let index = self.shared.index.lock().unwrap();
        LogStats {
            durable_seq: index.durable_seq,
            acked_seq: ack.seq,
            backlog_records: index.durable_seq.saturating_sub(ack.seq),
            backlog_bytes: self.shared.unacked_durable.load(Ordering::Acquire),
            segments: index.segments.len(),
        }
    }

    /// The acknowledged position and the body hash of the record there (kept
    /// after the record itself is deleted).
    pub fn ack_state(&self) -> AckState {
        *self.shared.ack.lock().unwrap()
    }

    /// The body hash of durable record `seq`: from the ack file when `seq`
    /// is the acknowledged one, else from the record if the log still has
    /// it. `None` when it has neither. Blocking file I/O (one read).
    pub fn body_hash_at(&self, seq: u64) -> Result<Option<[u8; 32]>, LogError> {
        let ack = self.ack_state();
        if seq == ack.seq {
            return Ok((seq > 0).then_some(ack.hash));
        }
        match self.read_from(seq, 1, usize::MAX)?.into_iter().next() {
            Some((s, bytes)) if s == seq => {
                let signed =
                    SignedRecord::from_bytes(&bytes).map_err(|e| LogError::Inconsistent {
                        path: self.shared.dir.clone(),
                        reason: format!("seq {seq} does not decode: {e}"),
                    })?;
                Ok(Some(format::sha256(&signed.body)))
            }
            _ => Ok(None),
        }
    }

    /// When the oldest record the core has not acknowledged ended (its
    /// `end_time_unix_ms`): how far the upload lags. `None` when the core
    /// holds every record. Blocking file I/O (one read).
    pub fn oldest_unacked_end_ms(&self) -> Result<Option<i64>, LogError> {
        let from = self.stats().acked_seq + 1;
        let Some((seq, bytes)) = self.read_from(from, 1, usize::MAX)?.into_iter().next() else {
            return Ok(None);
        };
        let record = SignedRecord::from_bytes(&bytes)
            .and_then(|s| s.record())
            .map_err(|e| LogError::Inconsistent {
                path: self.shared.dir.clone(),
                reason: format!("seq {seq} does not decode: {e}"),
            })?;
        Ok(Some(record.end_time_unix_ms))
    }

    /// Seq ranges recorded as lost by `salvage`.
    pub fn lost_ranges(&self) -> &[LostRange] {
        &self.shared.lost
    }

    /// Reads durable records from `from_seq` on, at most `max_records` of them
    /// and at most `max_bytes` of payload (at least one record when any is
    /// there). Returns `(seq, SignedRecord bytes)`. Blocking file I/O.
    pub fn read_from(
        &self,
        from_seq: u64,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, LogError> {
        let plan: Vec<ReadPlan> = {
            let index = self.shared.index.lock().unwrap();
            let mut plan = Vec::new();
            let mut seq = from_seq.max(1);
            let (mut n, mut bytes) = (0usize, 0usize);
            for seg in &index.segments {
                if seg.frames.is_empty() || seg.last_seq() < seq {
                    continue;
                }
                if seg.base_seq > seq {
                    // A recorded lost range: continue after it.
                    seq = seg.base_seq;
                }
                let mut frames = Vec::new();
                while seq <= seg.last_seq() && n < max_records {
                    let (off, len) = seg.frames[(seq - seg.base_seq) as usize];
                    if n > 0 && bytes + len as usize > max_bytes {
                        break;
                    }
                    frames.push((seq, off, len));
                    n += 1;
                    bytes += len as usize;
                    seq += 1;
                }
                if !frames.is_empty() {
                    plan.push((seg.path.clone(), frames[0].1, frames));
                }
                if n >= max_records || bytes >= max_bytes {
                    break;
                }
            }
            plan
        };
        let mut out = Vec::new();
        for (path, start, frames) in plan {
            let (_, last_off, last_len) = *frames.last().unwrap();
            let end = last_off + last_len as u64;
            let mut buf = vec![0u8; (end - start) as usize];
            let file = std::fs::File::open(&path).map_err(|e| LogError::io(&path, e))?;
            std::os::unix::fs::FileExt::read_exact_at(&file, &mut buf, start)
                .map_err(|e| LogError::io(&path, e))?;
            for (seq, off, len) in frames {
                let at = (off - start) as usize;
                match format::read_frame(&buf[at..at + len as usize]) {
                    format::FrameRead::Frame {
                        seq: s, payload, ..
                    } if s == seq => out.push((seq, payload.to_vec())),
                    other => {
                        return Err(LogError::Damaged {
                            path: path.clone(),
                            offset: off,
                            reason: format!("frame {seq} no longer reads back intact ({other:?})"),
                        })
                    }
                }
            }
        }
        Ok(out)
    }

    /// Records that the core durably holds every record up to `seq`, then
    /// deletes segments wholly at or below it (never the active one). Atomic:
    /// after a crash the ack file holds either the old or the new position.
    /// Idempotent; an older `seq` changes nothing. Blocking file I/O.
    pub fn ack(&self, seq: u64) -> Result<(), LogError> {
        let mut ack = self.shared.ack.lock().unwrap();
        if seq <= ack.seq {
            return Ok(());
        }
        let (path, offset, len, freed) = {
            let index = self.shared.index.lock().unwrap();
            if seq > index.durable_seq {
                return Err(LogError::AckBeyondDurable {
                    seq,
                    durable: index.durable_seq,
                });
            }
            let seg = index
                .segments
                .iter()
                .find(|s| !s.frames.is_empty() && s.base_seq <= seq && seq <= s.last_seq())
                .ok_or_else(|| LogError::Inconsistent {
                    path: self.shared.dir.clone(),
                    reason: format!(
                        "seq {seq} is in a recorded lost range and cannot be acknowledged"
                    ),
                })?;
            let (offset, len) = seg.frames[(seq - seg.base_seq) as usize];
            let freed = frame_bytes_between(&index.segments, ack.seq, seq);
            (seg.path.clone(), offset, len, freed)
        };
        let mut buf = vec![0u8; len as usize];
        let file = std::fs::File::open(&path).map_err(|e| LogError::io(&path, e))?;
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut buf, offset)
            .map_err(|e| LogError::io(&path, e))?;
        let hash = match format::read_frame(&buf) {
            format::FrameRead::Frame { payload, .. } => {
                let signed =
                    SignedRecord::from_bytes(payload).map_err(|e| LogError::io(&path, e))?;
                format::sha256(&signed.body)
            }
            other => {
                return Err(LogError::Damaged {
                    path,
                    offset,
                    reason: format!("frame {seq} no longer reads back intact ({other:?})"),
                })
            }
        };
        let new_ack = AckState { seq, hash };
        recovery::write_ack(&self.shared.dir, &new_ack)?;
        *ack = new_ack;
        self.shared
            .unacked_durable
            .fetch_sub(freed, Ordering::AcqRel);
        let doomed: Vec<PathBuf> = {
            let mut index = self.shared.index.lock().unwrap();
            let keep_from = index.segments.len() - 1;
            let mut doomed = Vec::new();
            let mut i = 0;
            index.segments.retain(|s| {
                let delete = i < keep_from && (s.frames.is_empty() || s.last_seq() <= seq);
                i += 1;
                if delete {
                    doomed.push(s.path.clone());
                }
                !delete
            });
            doomed
        };
        for p in &doomed {
            std::fs::remove_file(p).map_err(|e| LogError::io(p, e))?;
        }
        if !doomed.is_empty() {
            recovery::sync_dir(&self.shared.dir)?;
            recovery::ensure_reserve(&self.shared.dir);
        }
        Ok(())
    }

    /// Stops the writer after it has written everything already submitted.
    pub fn close(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.tx.take();
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
    }
}

impl Drop for UsageLog {
    fn drop(&mut self) {
        self.shutdown();
    }
}
