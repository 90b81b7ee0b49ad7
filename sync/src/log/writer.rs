//! The writer thread: takes signed frames from appenders, writes them in seq
//! order as one buffer per group commit, `fdatasync`s, then answers every
//! appender in the batch. Generic over [`SegmentBackend`], so the same loop
//! runs on io_uring and on plain files.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use super::backend::{BackendChoice, BackendKind, FileBackend, SegmentBackend};
use super::format::{self, SegmentHeader};
use super::recovery::sync_dir;
use super::{Item, LogError, SegmentIndex, Shared};

pub(crate) struct WriterStart {
    pub shared: Arc<Shared>,
    pub rx: mpsc::UnboundedReceiver<Item>,
    pub active_path: PathBuf,
    pub active_base: u64,
    pub active_len: u64,
    pub durable_seq: u64,
    pub durable_hash: [u8; 32],
    pub segment_bytes: u64,
    pub max_batch_bytes: usize,
    pub commit_delay: Duration,
}

/// The commit delay applies only after a write of at least this many records.
const COMMIT_SIBLINGS: usize = 24;

type Ready = std::sync::mpsc::Sender<Result<(), LogError>>;

/// Starts the writer thread with the chosen backend, probing io_uring for
/// `Auto`. Returns once the writer has opened the active segment.
pub(crate) fn spawn(
    choice: BackendChoice,
    start: WriterStart,
) -> Result<(std::thread::JoinHandle<()>, BackendKind), LogError> {
    let kind = match choice {
        BackendChoice::File => BackendKind::File,
        BackendChoice::Uring => {
            probe_uring().map_err(|e| {
                LogError::Unavailable(format!("io_uring was requested but is not available: {e}"))
            })?;
            BackendKind::Uring
        }
        BackendChoice::Auto => match probe_uring() {
            Ok(()) => BackendKind::Uring,
            Err(e) => {
                tracing::info!(error = %e, "io_uring is not available here; the usage log uses pwrite + fdatasync");
                BackendKind::File
            }
        },
    };
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let handle = std::thread::Builder::new()
        .name(format!("usage-log-{}", kind.as_str()))
        .spawn(move || match kind {
            BackendKind::File => run_on_tokio(FileBackend, start, ready_tx),
            #[cfg(target_os = "linux")]
            BackendKind::Uring => match tokio_uring::Runtime::new(&tokio_uring::builder()) {
                Ok(rt) => rt.block_on(run(super::backend::UringBackend, start, ready_tx)),
                Err(e) => {
                    let _ =
                        ready_tx.send(Err(LogError::Unavailable(format!("io_uring runtime: {e}"))));
                }
            },
            #[cfg(not(target_os = "linux"))]
            BackendKind::Uring => unreachable!(),
            BackendKind::Custom => unreachable!("spawn_with starts custom backends"),
        })
        .map_err(|e| LogError::Unavailable(format!("cannot start the writer thread: {e}")))?;
    wait_ready(handle, ready_rx).map(|h| (h, kind))
}

/// Starts the writer thread over a backend the caller made (a test's
/// fault-injecting backend, say), on a current-thread tokio runtime.
pub(crate) fn spawn_with<B: SegmentBackend + Send + 'static>(
    backend: B,
    start: WriterStart,
) -> Result<std::thread::JoinHandle<()>, LogError> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let handle = std::thread::Builder::new()
        .name("usage-log-custom".into())
        .spawn(move || run_on_tokio(backend, start, ready_tx))
        .map_err(|e| LogError::Unavailable(format!("cannot start the writer thread: {e}")))?;
    wait_ready(handle, ready_rx)
}

/// Runs the writer on a current-thread tokio runtime (every backend but io_uring).
fn run_on_tokio<B: SegmentBackend>(backend: B, start: WriterStart, ready: Ready) {
    match tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
    {
        Ok(rt) => rt.block_on(run(backend, start, ready)),
        Err(e) => {
            let _ = ready.send(Err(LogError::Unavailable(format!("writer runtime: {e}"))));
        }
    }
}

fn wait_ready(
    handle: std::thread::JoinHandle<()>,
    ready_rx: std::sync::mpsc::Receiver<Result<(), LogError>>,
) -> Result<std::thread::JoinHandle<()>, LogError> {
    match ready_rx.recv() {
        Ok(Ok(())) => Ok(handle),
        Ok(Err(e)) => {
            let _ = handle.join();
            Err(e)
        }
        Err(_) => {
            let _ = handle.join();
            Err(LogError::Unavailable(
                "the writer thread stopped while starting".into(),
            ))
        }
    }
}

/// Whether this process may use io_uring (seccomp filters in containers and
/// old kernels refuse `io_uring_setup`). Runs a real write and sync through it.
#[cfg(target_os = "linux")]
pub fn probe_uring() -> std::io::Result<()> {
    std::thread::spawn(|| {
        let rt = tokio_uring::Runtime::new(&tokio_uring::builder())?;
        rt.block_on(async {
            let dir = std::env::temp_dir();
            let path = dir.join(format!(".usage-log-uring-probe-{}", std::process::id()));
            let file = tokio_uring::fs::File::create(&path).await?;
            let (res, _) = file.write_all_at(vec![0u8; 16], 0).await;
            let res = match res {
                Ok(()) => file.sync_data().await,
                Err(e) => Err(e),
            };
            let _ = file.close().await;
            let _ = std::fs::remove_file(&path);
            res
        })
    })
    .join()
    .unwrap_or_else(|_| Err(std::io::Error::other("io_uring probe panicked")))
}

/// Whether this process may use io_uring: never, off Linux.
#[cfg(not(target_os = "linux"))]
pub fn probe_uring() -> std::io::Result<()> {
    Err(std::io::Error::other("io_uring exists only on Linux"))
}

struct Active<F> {
    file: F,
    path: PathBuf,
    base_seq: u64,
    /// Bytes known durable: everything up to here was synced.
    len: u64,
}

struct Writer<B: SegmentBackend> {
    backend: B,
    shared: Arc<Shared>,
    active: Active<B::File>,
    durable_seq: u64,
    durable_hash: [u8; 32],
    epoch: u64,
    pending: BTreeMap<u64, Item>,
    segment_bytes: u64,
    max_batch_bytes: usize,
    commit_delay: Duration,
    last_batch_len: usize,
    /// Set after a failed write until the active segment is repaired.
    broken: Option<LogError>,
    repair_delay: Duration,
}

const REPAIR_DELAY_MIN: Duration = Duration::from_millis(10);
const REPAIR_DELAY_MAX: Duration = Duration::from_secs(2);
/// Repair attempts when the log closes while broken.
const CLOSE_REPAIR_TRIES: usize = 12;

async fn run<B: SegmentBackend>(mut backend: B, start: WriterStart, ready: Ready) {
    let file = match backend.open(&start.active_path).await {
        Ok(f) => f,
        Err(e) => {
            let _ = ready.send(Err(LogError::io(&start.active_path, e)));
            return;
        }
    };
    let _ = ready.send(Ok(()));
    let mut rx = start.rx;
    let mut w = Writer {
        backend,
        shared: start.shared,
        active: Active {
            file,
            path: start.active_path,
            base_seq: start.active_base,
            len: start.active_len,
        },
        durable_seq: start.durable_seq,
        durable_hash: start.durable_hash,
        epoch: 0,
        pending: BTreeMap::new(),
        segment_bytes: start.segment_bytes,
        max_batch_bytes: start.max_batch_bytes,
        commit_delay: start.commit_delay,
        last_batch_len: 0,
        broken: None,
        repair_delay: REPAIR_DELAY_MIN,
    };
    loop {
        if let Some(failure) = w.broken.clone() {
            if !w.try_repair().await {
                // Wait before the next attempt, but stay responsive: a record
                // that arrives meanwhile is refused, a closed log ends the writer.
                match tokio::time::timeout(w.repair_delay, rx.recv()).await {
                    Ok(Some(item)) => {
                        w.accept(item);
                        while let Ok(item) = rx.try_recv() {
                            w.accept(item);
                        }
                        w.discard_undurable(failure, Vec::new());
                    }
                    Ok(None) => {
                        // Closing while broken: bytes of the failed write may
                        // still be in the file, and the next open would take
                        // them for durable records that were refused. Repair
                        // before leaving (a few quick tries).
                        for _ in 0..CLOSE_REPAIR_TRIES {
                            if w.try_repair().await {
                                break;
                            }
                            tokio::time::sleep(REPAIR_DELAY_MIN).await;
                        }
                        if w.broken.is_some() {
                            tracing::error!("usage log closed with a failed write it could not cut back: the next open may find records whose appends were refused");
                        }
                        break;
                    }
                    Err(_) => {}
                }
                w.repair_delay = (w.repair_delay * 2).min(REPAIR_DELAY_MAX);
                continue;
            }
        }
        if !w.pending.contains_key(&(w.durable_seq + 1)) {
            match rx.recv().await {
                Some(item) => w.accept(item),
                None => {
                    if w.pending.is_empty() {
                        break;
                    }
                    // Senders are gone but a seq is missing: cannot happen,
                    // since assignment and sending are one synchronous step.
                    w.fail_all(LogError::Closed);
                    break;
                }
            }
        }
        // Group-commit delay (PostgreSQL's commit_delay and commit_siblings):
        // when the last write carried many records, appenders are many, so wait
        // a moment for more before paying for a sync. Each fdatasync costs CPU
        // (VM exits, journal work) that signing needs. With few appenders the
        // wait would only add latency, so they never wait.
        if w.last_batch_len >= COMMIT_SIBLINGS && !w.commit_delay.is_zero() {
            // A blocking sleep: this thread runs nothing but the writer, and
            // tokio's timer is too coarse (1 ms) for this.
            std::thread::sleep(w.commit_delay);
        }
        while let Ok(item) = rx.try_recv() {
            w.accept(item);
        }
        let batch = w.take_batch();
        if batch.is_empty() {
            continue;
        }
        w.last_batch_len = batch.len();
        w.commit(batch).await;
    }
}

impl<B: SegmentBackend> Writer<B> {
    fn accept(&mut self, item: Item) {
        if item.epoch != self.epoch {
            let _ = item.reply.send(Err(LogError::Unavailable(
                "discarded: an earlier write failed before this record could be written".into(),
            )));
            return;
        }
        self.pending.insert(item.seq, item);
    }

    /// The run of consecutive seqs after the last durable one, up to the batch limit.
    fn take_batch(&mut self) -> Vec<Item> {
        let mut batch = Vec::new();
        let mut bytes = 0usize;
        let mut next = self.durable_seq + 1;
        while let Some(item) = self.pending.remove(&next) {
            bytes += item.frame_bytes as usize;
            batch.push(item);
            next += 1;
            if bytes >= self.max_batch_bytes {
                break;
            }
        }
        batch
    }

    async fn commit(&mut self, batch: Vec<Item>) {
        if self.active.len >= self.segment_bytes && self.active.base_seq <= self.durable_seq {
            if let Err(e) = self.rotate(batch[0].seq).await {
                self.fail(e, batch).await;
                return;
            }
        }
        let batch_start = batch[0].seq;
        let mut buf = Vec::with_capacity(batch.iter().map(|i| i.frame_bytes as usize).sum());
        let mut frames = Vec::with_capacity(batch.len());
        for item in &batch {
            let offset = self.active.len + buf.len() as u64;
            format::encode_frame(&mut buf, item.seq, batch_start, &item.payload);
            frames.push((offset, item.frame_bytes as u32));
        }
        let written = buf.len() as u64;
        let (res, _buf) = self
            .backend
            .write_all_at(&self.active.file, buf, self.active.len)
            .await;
        let res = match res {
            Ok(()) => self
                .backend
                .sync_data(&self.active.file)
                .await
                .map_err(|e| LogError::from_write_failure("fdatasync", &e)),
            Err(e) => Err(LogError::from_write_failure("write", &e)),
        };
        if let Err(e) = res {
            self.fail(e, batch).await;
            return;
        }
        // Durable. Publish to readers first, then answer the appenders.
        self.active.len += written;
        let last = batch.last().unwrap();
        self.durable_seq = last.seq;
        self.durable_hash = last.body_hash;
        let bytes: u64 = batch.iter().map(|i| i.frame_bytes).sum();
        {
            let mut index = self.shared.index.lock().unwrap();
            index.segments.last_mut().unwrap().frames.extend(frames);
            index.durable_seq = self.durable_seq;
        }
        self.shared
            .unacked_durable
            .fetch_add(bytes, Ordering::AcqRel);
        self.shared.seq.lock().unwrap().pending_bytes -= bytes;
        for item in batch {
            let _ = item.reply.send(Ok(item.seq));
        }
    }

    /// Starts a new segment at `base_seq`: header written and synced, then the
    /// directory synced, before any frame goes in.
    async fn rotate(&mut self, base_seq: u64) -> Result<(), LogError> {
        let dir = self.shared.dir.clone();
        let path = dir.join(format::segment_file_name(base_seq));
        let header = SegmentHeader {
            base_seq,
            prev_hash: self.durable_hash,
        }
        .encode()
        .to_vec();
        // A file of this name can only be left over from a rotation that failed
        // earlier: it holds nothing durable (every durable seq is below base_seq).
        let _ = std::fs::remove_file(&path);
        let file = self
            .backend
            .create(&path)
            .await
            .map_err(|e| LogError::from_write_failure("create segment", &e))?;
        let (res, _) = self.backend.write_all_at(&file, header, 0).await;
        let res = match res {
            Ok(()) => self.backend.sync_data(&file).await,
            Err(e) => Err(e),
        };
        if let Err(e) = res {
            // Leave no half-made segment behind (recovery would remove it too).
            let _ = std::fs::remove_file(&path);
            return Err(LogError::from_write_failure("write segment header", &e));
        }
        if let Err(e) = sync_dir(&dir) {
            let _ = std::fs::remove_file(&path);
            return Err(LogError::Unavailable(e.to_string()));
        }
        self.shared
            .index
            .lock()
            .unwrap()
            .segments
            .push(SegmentIndex {
                base_seq,
                path: path.clone(),
                frames: Vec::new(),
            });
        tracing::debug!(path = %path.display(), base_seq, "usage log segment started");
        self.active = Active {
            file,
            path,
            base_seq,
            len: format::SEGMENT_HEADER_LEN as u64,
        };
        Ok(())
    }

    /// A write or sync failed: roll the sequence back to the last durable
    /// record, answer every undurable record with the error, and leave the
    /// run loop to cut the active segment back to its synced length before
    /// it writes again (records appended meanwhile carry the new epoch and
    /// wait for that repair).
    async fn fail(&mut self, error: LogError, batch: Vec<Item>) {
        tracing::error!(%error, durable_seq = self.durable_seq, "usage log write failed; records not yet durable are refused");
        self.discard_undurable(error.clone(), batch);
        // The run loop repairs before it writes again.
        self.broken = Some(error);
    }

    /// Answers every record not yet durable (`batch` and all pending) with
    /// `error`, and rolls the sequencer back to the last durable record in
    /// a new epoch, in one step. Whoever refuses records must roll back:
    /// seqs handed out and then refused would otherwise leave a hole the
    /// writer waits on forever, and a chain head naming a record that does
    /// not exist. Records of the old epoch still on their way are refused
    /// on arrival ([`Writer::accept`]).
    fn discard_undurable(&mut self, error: LogError, batch: Vec<Item>) {
        {
            let mut s = self.shared.seq.lock().unwrap();
            s.epoch += 1;
            s.next_seq = self.durable_seq + 1;
            s.last_hash = self.durable_hash;
            s.pending_bytes = 0;
            self.epoch = s.epoch;
        }
        for item in batch {
            let _ = item.reply.send(Err(error.clone()));
        }
        self.fail_all(error);
    }

    /// One repair attempt; on success the log accepts appends again.
    async fn try_repair(&mut self) -> bool {
        match self.repair().await {
            Ok(()) => {
                self.broken = None;
                self.repair_delay = REPAIR_DELAY_MIN;
                self.shared.seq.lock().unwrap().failure = None;
                true
            }
            Err(e) => {
                // Only now do appends fail at once: until a repair attempt
                // has failed, an append waits for the writer, which repairs
                // first (a stale refusal would outlive an ack that freed room).
                self.shared.seq.lock().unwrap().failure = self.broken.clone();
                if self.repair_delay == REPAIR_DELAY_MIN || self.repair_delay == REPAIR_DELAY_MAX {
                    tracing::error!(error = %e, "usage log repair failed; retrying");
                }
                false
            }
        }
    }

    /// Answers every pending record with `error`. Only with the sequencer
    /// rolled back ([`Writer::discard_undurable`]), or when the log closes.
    fn fail_all(&mut self, error: LogError) {
        for (_, item) in std::mem::take(&mut self.pending) {
            let _ = item.reply.send(Err(error.clone()));
        }
    }

    /// Drops whatever a failed write may have left after the synced length,
    /// syncs that, and reopens the file so no stale error state carries over.
    async fn repair(&mut self) -> Result<(), std::io::Error> {
        self.backend
            .set_len(&self.active.file, self.active.len)
            .await?;
        self.backend.sync_data(&self.active.file).await?;
        let file = self.backend.open(&self.active.path).await?;
        self.active.file = file;
        Ok(())
    }
}
