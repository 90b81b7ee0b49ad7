//! Helpers shared by the usage log's integration tests.
#![allow(dead_code)]

pub mod stores;

/// A node's QUIC connection to a loopback core (its certificate and key),
/// with the endpoint it lives on.
pub async fn connect_node(
    core: &mec_sync::core_server::LoopbackCore,
    cert: &str,
    key_pem: &str,
) -> (quinn::Endpoint, quinn::Connection) {
    let endpoint = mec_sync::quic::client_endpoint(
        "127.0.0.1:0".parse().unwrap(),
        cert,
        key_pem,
        &core.ca.cert_pem,
        &mec_sync::quic::TransportOptions::default(),
    )
    .unwrap();
    let conn = endpoint
        .connect(core.addr, "localhost")
        .unwrap()
        .await
        .unwrap();
    (endpoint, conn)
}

use std::path::{Path, PathBuf};

use ed25519_dalek::SigningKey;
use mec_sync::identity::NodeIdentity;
use mec_sync::log::{BackendChoice, LogError, LogOptions, UsageLog};
use mec_sync::record::{Outcome, UsageRecord};

pub const NODE: &str = "node-test";

pub fn identity() -> NodeIdentity {
    NodeIdentity::from_signing_key(SigningKey::from_bytes(&[1u8; 32]))
}

/// A deterministic record (fixed record id), so two logs given the same
/// appends hold the same bytes.
pub fn record(i: u64) -> UsageRecord {
    UsageRecord {
        record_id: i.to_be_bytes().repeat(2),
        imsi: format!("0010100{:08}", i),
        app_id: "app".into(),
        model_id: "model".into(),
        prompt_tokens: 100 + i,
        completion_tokens: i % 37,
        billed_tokens: 100 + i + i % 37,
        outcome: Outcome::Completed as i32,
        start_time_unix_ms: 1_795_000_000_000 + i as i64,
        end_time_unix_ms: 1_795_000_000_500 + i as i64,
        ..Default::default()
    }
}

pub fn options(backend: BackendChoice) -> LogOptions {
    LogOptions {
        backend,
        ..LogOptions::default()
    }
}

pub fn open(dir: &Path, options: LogOptions) -> Result<UsageLog, LogError> {
    UsageLog::open(dir, identity(), NODE, options)
}

pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Appends records `from..from+n` one after the other; returns their seqs.
pub fn append_seq(log: &UsageLog, from: u64, n: u64) -> Vec<u64> {
    rt().block_on(async {
        let mut seqs = Vec::new();
        for i in from..from + n {
            seqs.push(log.append(record(i)).await.unwrap());
        }
        seqs
    })
}

pub fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_str().unwrap().starts_with("seg-"))
        .collect();
    v.sort();
    v
}

/// Verifies the whole log (frames, density, chain, signatures) and returns the report.
pub fn verify(dir: &Path) -> mec_sync::log::verify::VerifyReport {
    mec_sync::log::verify::verify_log(dir, &identity().verifying_key())
}
