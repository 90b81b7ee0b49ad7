//! The upload end to end on loopback: a real usage log, the uploader over
//! real QUIC with mutual TLS, core-ingest's server and its SQLite store.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mec_sync::core_server::LoopbackCore;
use mec_sync::identity::NodeIdentity;
use mec_sync::ingest_store::IngestStore;
use mec_sync::log::{BackendChoice, LogOptions, UsageLog};
use mec_sync::pki::{generate_ca, issue_node_cert, CertAndKey};
use mec_sync::quic::TransportOptions;
use mec_sync::record::UsageRecord;
use mec_sync::upload::WindowLimits;
use mec_sync::uploader::{UploaderConfig, UploaderStatus};

struct Node {
    log: Arc<UsageLog>,
    key_pem: String,
    pub_pem: String,
}

fn node(dir: &std::path::Path, id: &str) -> Node {
    let identity = NodeIdentity::generate().unwrap();
    identity.write_to(&dir.join("identity")).unwrap();
    let key_pem = std::fs::read_to_string(dir.join("identity/node.key")).unwrap();
    let pub_pem = identity.public_key_pem();
    let log = UsageLog::open(
        &dir.join("log"),
        identity,
        id,
        LogOptions {
            backend: BackendChoice::File,
            ..LogOptions::default()
        },
    )
    .unwrap();
    Node {
        log: Arc::new(log),
        key_pem,
        pub_pem,
    }
}

async fn append(log: &UsageLog, n: u64) {
    for i in 0..n {
        log.append(UsageRecord {
            imsi: "001010000000001".into(),
            prompt_tokens: 10,
            completion_tokens: i % 7,
            billed_tokens: 10 + i % 7,
            ..Default::default()
        })
        .await
        .unwrap();
    }
}

async fn wait_acked(log: &UsageLog, seq: u64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while log.stats().acked_seq < seq {
        assert!(
            Instant::now() < deadline,
            "acked {} of {seq}",
            log.stats().acked_seq
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn uploader_config(
    core: std::net::SocketAddr,
    ca: &CertAndKey,
    cert_pem: String,
    key_pem: String,
) -> UploaderConfig {
    UploaderConfig {
        core,
        server_name: "localhost".into(),
        ca_pem: ca.cert_pem.clone(),
        cert_pem,
        key_pem,
        limits: WindowLimits {
            batch_records: 128,
            batch_bytes: 1 << 20,
            in_flight: 4,
        },
        transport: TransportOptions::default(),
        poll: Duration::from_millis(20),
        ack_limit: None,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn records_reach_the_core_once_and_the_log_is_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let core_ingest = LoopbackCore::start(&dir.path().join("core.sqlite")).unwrap();
    let (core, ca, store) = (
        core_ingest.addr,
        core_ingest.ca.clone(),
        core_ingest.store.clone(),
    );

    let edge = node(&dir.path().join("edge"), "edge-1");
    append(&edge.log, 500).await;
    let cert = issue_node_cert(&ca, "edge-1", &edge.pub_pem).unwrap();
    let status = Arc::new(Mutex::new(UploaderStatus::default()));
    let (stop_up, up_rx) = tokio::sync::watch::channel(false);
    let up = tokio::spawn(mec_sync::uploader::run(
        edge.log.clone(),
        uploader_config(core, &ca, cert, edge.key_pem.clone()),
        status.clone(),
        up_rx,
    ));
    wait_acked(&edge.log, 500).await;
    append(&edge.log, 100).await;
    wait_acked(&edge.log, 600).await;
    assert!(status.lock().unwrap().connected);

    // A node whose certificate another CA issued is refused in the handshake.
    let rogue_ca = generate_ca("rogue CA").unwrap();
    let rogue = node(&dir.path().join("rogue"), "edge-1");
    append(&rogue.log, 5).await;
    let rogue_cert = issue_node_cert(&rogue_ca, "edge-1", &rogue.pub_pem).unwrap();
    let rogue_status = Arc::new(Mutex::new(UploaderStatus::default()));
    let (stop_rogue, rogue_rx) = tokio::sync::watch::channel(false);
    let mut rogue_cfg = uploader_config(core, &ca, rogue_cert, rogue.key_pem.clone());
    rogue_cfg.transport.idle_timeout = Duration::from_secs(5);
    let rogue_task = tokio::spawn(mec_sync::uploader::run(
        rogue.log.clone(),
        rogue_cfg,
        rogue_status.clone(),
        rogue_rx,
    ));
    let deadline = Instant::now() + Duration::from_secs(20);
    while rogue_status.lock().unwrap().last_error.is_none() {
        assert!(
            Instant::now() < deadline,
            "the rogue node was neither refused nor accepted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!rogue_status.lock().unwrap().connected);
    assert_eq!(rogue.log.stats().acked_seq, 0);

    for s in [stop_up, stop_rogue] {
        s.send(true).unwrap();
    }
    up.await.unwrap();
    rogue_task.await.unwrap();
    core_ingest.stop().await;
    let audit = store.lock().unwrap().audit().unwrap();
    assert_eq!(audit.len(), 1, "{audit:?}");
    let a = &audit[0];
    assert_eq!(
        (a.node_id.as_str(), a.records, a.contiguous_seq),
        ("edge-1", 600, 600)
    );
    assert_eq!((a.quarantined, a.chain.as_str()), (0, "ok"));
    assert!(a.gaps.is_empty());
}
