//! Test helper for the kill test: appends records to the usage log in DIR
//! from several tasks, forever, and prints each seq on its own line once
//! `append` has returned it (so every printed seq was acknowledged durable).
//!
//! Usage: `log-append-loop DIR [CONCURRENCY] [BACKEND]`

use std::io::Write;
use std::sync::Arc;

use ed25519_dalek::SigningKey;
use mec_sync::identity::NodeIdentity;
use mec_sync::log::{LogOptions, UsageLog};
use mec_sync::record::UsageRecord;

fn main() {
    let mut args = std::env::args().skip(1);
    let dir = args
        .next()
        .expect("usage: log-append-loop DIR [CONCURRENCY] [BACKEND]");
    let concurrency: u64 = args
        .next()
        .map(|c| c.parse().expect("concurrency"))
        .unwrap_or(8);
    let backend = args
        .next()
        .map(|b| b.parse().expect("backend"))
        .unwrap_or_default();
    let identity =
        NodeIdentity::from_signing_key(SigningKey::from_bytes(&hil_tests::KILL_TEST_KEY));
    let options = LogOptions {
        segment_bytes: 32 * 1024,
        backend,
        ..LogOptions::default()
    };
    let log = Arc::new(
        UsageLog::open(dir.as_ref(), identity, "kill-test-node", options).expect("open log"),
    );
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<u64>();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        for t in 0..concurrency {
            let log = log.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                for i in 0.. {
                    let rec = UsageRecord {
                        imsi: format!("00101{t:04}{i:06}"),
                        prompt_tokens: i,
                        ..Default::default()
                    };
                    let seq = log.append(rec).await.expect("append");
                    if tx.send(seq).is_err() {
                        return;
                    }
                }
            });
        }
        drop(tx);
        let stdout = std::io::stdout();
        while let Some(seq) = rx.recv().await {
            let mut out = stdout.lock();
            // Unbuffered per line: a seq is printed only after append returned.
            writeln!(out, "{seq}").unwrap();
            out.flush().unwrap();
        }
    });
}
