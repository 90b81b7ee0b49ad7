//! The log writer under scripted storage faults: a backend behind
//! `SegmentBackend` that fails the Nth write, sync or truncate, or answers
//! slowly, as redb tests its storage with a fault-injecting backend.
//!
//! The contract: after any sequence of write/sync failures and repairs, the
//! next append is answered, seqs stay dense, and the chain links only
//! records that exist.

use crate::common;

use std::collections::HashMap;
use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use mec_sync::log::{FileBackend, LogError, LogOptions, SegmentBackend, UsageLog};

/// The operations the writer asks of storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    Open,
    Create,
    Write,
    Sync,
    SetLen,
}

/// What the script says the Nth call of an operation does (1-based).
type Plan = dyn Fn(Op, u64) -> Option<io::Error> + Send + Sync;

/// `FileBackend` with a script of failures. The plan may also block (a slow
/// disk) before it answers.
pub struct FaultBackend {
    inner: FileBackend,
    plan: Arc<Plan>,
    calls: Arc<Mutex<HashMap<Op, u64>>>,
}

impl FaultBackend {
    pub fn new(plan: impl Fn(Op, u64) -> Option<io::Error> + Send + Sync + 'static) -> Self {
        FaultBackend {
            inner: FileBackend,
            plan: Arc::new(plan),
            calls: Arc::default(),
        }
    }

    fn check(&self, op: Op) -> io::Result<()> {
        let n = {
            let mut calls = self.calls.lock().unwrap();
            let n = calls.entry(op).or_default();
            *n += 1;
            *n
        };
        match (self.plan)(op, n) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

impl SegmentBackend for FaultBackend {
    type File = std::fs::File;

    async fn open(&mut self, path: &Path) -> io::Result<std::fs::File> {
        self.check(Op::Open)?;
        self.inner.open(path).await
    }

    async fn create(&mut self, path: &Path) -> io::Result<std::fs::File> {
        self.check(Op::Create)?;
        self.inner.create(path).await
    }

    async fn write_all_at(
        &mut self,
        file: &std::fs::File,
        buf: Vec<u8>,
        offset: u64,
    ) -> (io::Result<()>, Vec<u8>) {
        if let Err(e) = self.check(Op::Write) {
            // A failed write may still leave some bytes behind: half of them.
            use std::os::unix::fs::FileExt;
            let _ = file.write_all_at(&buf[..buf.len() / 2], offset);
            return (Err(e), buf);
        }
        self.inner.write_all_at(file, buf, offset).await
    }

    async fn sync_data(&mut self, file: &std::fs::File) -> io::Result<()> {
        self.check(Op::Sync)?;
        self.inner.sync_data(file).await
    }

    async fn set_len(&mut self, file: &std::fs::File, len: u64) -> io::Result<()> {
        self.check(Op::SetLen)?;
        self.inner.set_len(file, len).await
    }
}

fn eio() -> io::Error {
    io::Error::from_raw_os_error(libc::EIO)
}

fn open_faulty(dir: &Path, backend: FaultBackend) -> UsageLog {
    UsageLog::open_with_backend(dir, identity(), NODE, LogOptions::default(), backend).unwrap()
}

/// An append that is not answered within this is a hang.
const ANSWER_WITHIN: Duration = Duration::from_secs(20);

async fn append_answered(log: &UsageLog, i: u64) -> Result<u64, LogError> {
    tokio::time::timeout(ANSWER_WITHIN, log.append(record(i)))
        .await
        .unwrap_or_else(|_| panic!("append of record {i} was not answered in {ANSWER_WITHIN:?}"))
}

/// The writer fails a write, its first repair fails too, and an append
/// arrives in between (while that repair is still running). Today the
/// appender gets a seq of the new epoch, is refused, and the sequencer is
/// not rolled back: after the next successful repair the writer waits for a
/// seq that never comes.
#[test]
fn after_a_failed_write_and_a_failed_repair_the_next_append_is_answered() {
    let dir = tempfile::tempdir().unwrap();
    // The repair's truncate waits for the test's go, then fails once.
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let go_rx = Mutex::new(go_rx);
    let (entered_tx, entered_rx) = std::sync::mpsc::channel::<()>();
    let entered_tx = Mutex::new(entered_tx);
    let backend = FaultBackend::new(move |op, n| match (op, n) {
        (Op::Write, 3) => Some(eio()),
        (Op::SetLen, 1) => {
            let _ = entered_tx.lock().unwrap().send(());
            let _ = go_rx.lock().unwrap().recv_timeout(ANSWER_WITHIN);
            Some(eio())
        }
        _ => None,
    });
    let log = Arc::new(open_faulty(dir.path(), backend));
    rt().block_on(async {
        assert_eq!(append_answered(&log, 1).await, Ok(1));
        assert_eq!(append_answered(&log, 2).await, Ok(2));
        assert!(matches!(
            append_answered(&log, 3).await,
            Err(LogError::Unavailable(_))
        ));
        // The repair is running: an append arrives now.
        entered_rx.recv_timeout(ANSWER_WITHIN).unwrap();
        let during = tokio::spawn({
            let log = log.clone();
            async move { append_answered(&log, 4).await }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        go_tx.send(()).unwrap();
        let during = during.await.unwrap();
        assert!(during.is_err(), "refused while broken: {during:?}");
        // The next repair succeeds; the log must answer again, densely.
        let mut next = Err(LogError::Closed);
        for i in 0..100 {
            next = append_answered(&log, 5 + i).await;
            if next.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(next, Ok(3), "the seq after the last durable one");
    });
    Arc::try_unwrap(log).unwrap().close();
    let report = verify(dir.path());
    assert!(report.ok(), "{report:?}");
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 24, ..Default::default() })]

    /// Any script of failed and slow writes, syncs, truncates and reopens, with
    /// appenders racing the failures and the repairs: every append is
    /// answered, the seqs that succeeded are dense from 1, and the log on
    /// disk verifies (its chain links only records that exist) and holds
    /// exactly them.
    #[test]
    fn under_any_fault_script_appends_are_answered_and_seqs_stay_dense(
        faults in proptest::collection::hash_set((0usize..4, 1u64..10), 0..10),
        slow in proptest::collection::hash_set((0usize..4, 1u64..10), 0..10),
        rounds in proptest::collection::vec(1usize..6, 4..12),
    ) {
        let ops = [Op::Write, Op::Sync, Op::SetLen, Op::Open];
        let faults: std::collections::HashSet<(Op, u64)> =
            faults.into_iter().map(|(o, n)| (ops[o], n + u64::from(ops[o] == Op::Open))).collect();
        let slow: std::collections::HashSet<(Op, u64)> =
            slow.into_iter().map(|(o, n)| (ops[o], n)).collect();
        // A slow call is one appenders can race (a repair still running).
        let backend = FaultBackend::new(move |op, n| {
            if slow.contains(&(op, n)) {
                std::thread::sleep(Duration::from_millis(40));
            }
            faults.contains(&(op, n)).then(eio)
        });
        let dir = tempfile::tempdir().unwrap();
        let log = Arc::new(open_faulty(dir.path(), backend));
        let mut ok: Vec<u64> = rt().block_on(async {
            let mut ok = Vec::new();
            let mut i = 0;
            for n in rounds {
                let tasks: Vec<_> = (0..n)
                    .map(|_| {
                        i += 1;
                        let (log, i) = (log.clone(), i);
                        tokio::spawn(async move { append_answered(&log, i).await })
                    })
                    .collect();
                for t in tasks {
                    if let Ok(seq) = t.await.unwrap() {
                        ok.push(seq);
                    }
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            ok
        });
        Arc::try_unwrap(log).unwrap().close();
        ok.sort_unstable();
        proptest::prop_assert_eq!(&ok, &(1..=ok.len() as u64).collect::<Vec<_>>());
        let reopened = open(dir.path(), LogOptions::default()).unwrap();
        proptest::prop_assert_eq!(reopened.stats().durable_seq, ok.len() as u64);
        reopened.close();
        let report = verify(dir.path());
        proptest::prop_assert!(report.ok(), "{:?}", report);
    }
}
