//! When the core's position and the edge's log disagree: a box restored
//! from a snapshot (the core is ahead of its log), a core restored from a
//! backup (it lost records it had acknowledged). Neither side deletes or
//! drops a record it has not matched by (node, seq, body hash); a fork is
//! reported; lost records come back when the edge still has them and are
//! otherwise named; the upload never loops without progress.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use mec_sync::core_server::LoopbackCore;
use mec_sync::identity::NodeIdentity;
use mec_sync::ingest_store::{IngestStore, NodeAudit};
use mec_sync::log::{BackendChoice, LogOptions, UsageLog};
use mec_sync::pki::issue_node_cert;
use mec_sync::quic::TransportOptions;
use mec_sync::record::UsageRecord;
use mec_sync::upload::WindowLimits;
use mec_sync::uploader::{UploaderConfig, UploaderStatus};

const NODE: &str = "edge-p";

fn identity() -> NodeIdentity {
    NodeIdentity::from_signing_key(SigningKey::from_bytes(&[9; 32]))
}

fn open_log(dir: &Path) -> Arc<UsageLog> {
    Arc::new(
        UsageLog::open(
            dir,
            identity(),
            NODE,
            LogOptions {
                backend: BackendChoice::File,
                segment_bytes: 2048,
                ..LogOptions::default()
            },
        )
        .unwrap(),
    )
}

async fn append(log: &UsageLog, n: u64, tokens: u64) {
    for _ in 0..n {
        log.append(UsageRecord {
            record_id: uuid::Uuid::now_v7().as_bytes().to_vec(),
            imsi: "001010000000001".into(),
            prompt_tokens: tokens,
            billed_tokens: tokens,
            ..Default::default()
        })
        .await
        .unwrap();
    }
}

/// Uploads `log` to `core` until the log is acknowledged up to `seq` (or
/// the time is up); returns whether it got there.
async fn upload_until(log: &Arc<UsageLog>, core: &LoopbackCore, seq: u64) -> bool {
    let id_dir = log.dir().with_extension("identity");
    if !id_dir.join("node.key").exists() {
        identity().write_to(&id_dir).unwrap();
    }
    let key_pem = std::fs::read_to_string(id_dir.join("node.key")).unwrap();
    let cert = issue_node_cert(&core.ca, NODE, &identity().public_key_pem()).unwrap();
    let config = UploaderConfig {
        core: core.addr,
        server_name: "localhost".into(),
        ca_pem: core.ca.cert_pem.clone(),
        cert_pem: cert,
        key_pem,
        limits: WindowLimits {
            batch_records: 16,
            batch_bytes: 1 << 20,
            in_flight: 2,
        },
        transport: TransportOptions::default(),
        poll: Duration::from_millis(20),
        ack_limit: None,
        downlink: None,
    };
    let status = Arc::new(Mutex::new(UploaderStatus::default()));
    let (stop, rx) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(mec_sync::uploader::run(log.clone(), config, status, rx));
    let deadline = Instant::now() + Duration::from_secs(20);
    while log.stats().acked_seq < seq && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.send(true).unwrap();
    task.await.unwrap();
    log.stats().acked_seq >= seq
}

fn audit(core: &LoopbackCore) -> NodeAudit {
    core.store.audit().unwrap().remove(0)
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// A box restored from a snapshot of its log taken at seq 5, after the core
/// had stored seqs 1..=10: the box writes new records at seqs 6.. that the
/// core holds other records for. They are forks: reported, kept, never
/// acknowledged unmatched, and the records after them reach the core.
#[tokio::test(flavor = "multi_thread")]
async fn a_fork_is_reported_and_the_core_ahead_of_the_log_never_drops_its_records() {
    let dir = tempfile::tempdir().unwrap();
    let core = LoopbackCore::start(&dir.path().join("core.sqlite")).unwrap();
    let log = open_log(&dir.path().join("log"));
    append(&log, 5, 10).await;
    copy_dir(&dir.path().join("log"), &dir.path().join("snapshot"));
    append(&log, 5, 10).await;
    assert!(upload_until(&log, &core, 10).await);
    drop(log);

    let restored = open_log(&dir.path().join("snapshot"));
    assert_eq!(restored.stats().durable_seq, 5);
    append(&restored, 7, 77).await; // seqs 6..=12, other bodies
    let acked = upload_until(&restored, &core, 12).await;
    let a = audit(&core);
    assert_eq!(a.forks, vec![6, 7, 8, 9, 10], "{a:?}");
    assert_eq!((a.contiguous_seq, a.records), (12, 12), "{a:?}");
    assert!(acked, "the upload got past the forks: {a:?}");
    core.stop().await;
}

/// A core restored from a backup taken at seq 5, after it had acknowledged
/// seqs up to 60 and the edge had deleted what it could: the edge resends
/// what it still has and names the rest as lost by the core; the upload
/// goes on.
#[tokio::test(flavor = "multi_thread")]
async fn a_core_that_lost_acknowledged_records_gets_back_what_the_edge_has_and_names_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let core = LoopbackCore::start(&dir.path().join("core.sqlite")).unwrap();
    let log = open_log(&dir.path().join("log"));
    append(&log, 5, 10).await;
    assert!(upload_until(&log, &core, 5).await);
    core.stop().await;
    copy_dir(dir.path(), &dir.path().join("backup"));
    let core = LoopbackCore::start(&dir.path().join("core.sqlite")).unwrap();
    append(&log, 55, 10).await;
    assert!(upload_until(&log, &core, 60).await);
    core.stop().await;
    let first_kept = log.read_from(1, 1, 1 << 20).unwrap()[0].0;
    assert!(first_kept > 6, "acknowledged segments were deleted");

    // The core comes back from its backup (it holds 1..=5).
    let core = LoopbackCore::start(&dir.path().join("backup/core.sqlite")).unwrap();
    append(&log, 3, 10).await;
    let acked = upload_until(&log, &core, 63).await;
    let a = audit(&core);
    assert!(acked, "the upload made progress: {a:?}");
    assert_eq!(a.contiguous_seq, 63, "{a:?}");
    assert_eq!(a.lost_by_core, vec![(6, first_kept - 1)], "{a:?}");
    assert_eq!(a.records, 5 + 63 - (first_kept - 1), "{a:?}");
    core.stop().await;
}
