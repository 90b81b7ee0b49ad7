//! The store thread: applies settlements to the ledger store in batches
//! (one SQLite transaction each), off the request path.
//!
//! A batch that fails is retried with backoff until it succeeds: the
//! watermark it moves is what lets the uploader acknowledge (and so delete)
//! the log, so a batch dropped on the floor would pin the log until it
//! filled. At shutdown a store that keeps failing is given up on after a
//! few tries; the records are durable in the log and the next start
//! re-applies them.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mec_metering::store::{Applied, Store};

use crate::tally::Tally;
use crate::AppliedWatermark;

/// Records applied between two prunings of the store's record ids.
const PRUNE_EVERY: usize = 4096;
/// Tries of a failing batch once shutdown began.
const TRIES_AT_SHUTDOWN: u32 = 3;

pub(crate) struct Applier {
    tx: Mutex<Option<mpsc::Sender<Applied>>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    closing: Arc<AtomicBool>,
}

impl Applier {
    pub fn start(
        store: Arc<Mutex<Store>>,
        watermark: AppliedWatermark,
        tally: Option<Arc<Tally>>,
    ) -> std::io::Result<Applier> {
        let (tx, rx) = mpsc::channel::<Applied>();
        let closing = Arc::new(AtomicBool::new(false));
        let thread = {
            let closing = closing.clone();
            std::thread::Builder::new()
                .name("ledger-store".into())
                .spawn(move || apply_loop(&rx, &store, &watermark, tally.as_deref(), &closing))?
        };
        Ok(Applier {
            tx: Mutex::new(Some(tx)),
            thread: Mutex::new(Some(thread)),
            closing,
        })
    }

    pub fn send(&self, applied: Applied) {
        if let Some(tx) = self.tx.lock().unwrap().as_ref() {
            let _ = tx.send(applied);
        }
    }

    /// Stops the thread after it applied (or gave up on) everything sent.
    pub fn shutdown(&self) {
        self.closing.store(true, Ordering::Release);
        self.tx.lock().unwrap().take();
        if let Some(t) = self.thread.lock().unwrap().take() {
            let _ = t.join();
        }
    }
}

fn apply_loop(
    rx: &mpsc::Receiver<Applied>,
    store: &Mutex<Store>,
    watermark: &AppliedWatermark,
    tally: Option<&Tally>,
    closing: &AtomicBool,
) {
    let mut since_prune = 0;
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < 512 {
            match rx.try_recv() {
                Ok(a) => batch.push(a),
                Err(_) => break,
            }
        }
        let mut delay = Duration::from_millis(50);
        let mut tries = 0u32;
        loop {
            let result = store.lock().unwrap().apply(&batch);
            match result {
                Ok(_) => break,
                Err(e) => {
                    tries += 1;
                    if tries == 1 || tries.is_power_of_two() {
                        tracing::error!(error = %e, records = batch.len(), tries, "ledger store update failed; retrying");
                    }
                    if closing.load(Ordering::Acquire) && tries >= TRIES_AT_SHUTDOWN {
                        tracing::error!(records = batch.len(), "ledger store update abandoned at shutdown; the next start re-applies these records from the log");
                        break;
                    }
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
        let mut store = store.lock().unwrap();
        if let Ok(w) = store.applied_watermark() {
            watermark.set(w);
        }
        since_prune += batch.len();
        if since_prune >= PRUNE_EVERY {
            since_prune = 0;
            // A slot asks only about records after the log position it
            // started at; with no slot live, none at or below the
            // watermark will ever be asked about.
            let below = tally
                .and_then(Tally::min_live_log_seq)
                .unwrap_or(u64::MAX)
                .min(watermark.get());
            // The releases that made those slots free must be durable first.
            match tally.map(Tally::sync).transpose() {
                Ok(_) => {
                    if let Err(e) = store.prune_record_ids(below) {
                        tracing::warn!(error = %e, "pruning the store's record ids");
                    }
                }
                Err(e) => tracing::warn!(error = %e, "in-flight tally not synced; record ids kept"),
            }
            if let Err(e) = store.prune_usage() {
                tracing::warn!(error = %e, "pruning the store's recent usage");
            }
        }
    }
}
