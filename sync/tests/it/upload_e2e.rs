//! The upload end to end on loopback: a real usage log, the uploader over
//! real QUIC with mutual TLS, core-ingest's server and its SQLite store; and
//! a hand-driven client sending what the uploader never would.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mec_sync::core_server::{read_frame, LoopbackCore};
use mec_sync::identity::NodeIdentity;
use mec_sync::ingest_store::IngestStore;
use mec_sync::log::{BackendChoice, LogOptions, UsageLog};
use mec_sync::pki::{generate_ca, issue_node_cert, CertAndKey};
use mec_sync::quic::TransportOptions;
use mec_sync::record::UsageRecord;
use mec_sync::upload::WindowLimits;
use mec_sync::uploader::{UploaderConfig, UploaderStatus};
use mec_sync::wire::pb::{core_frame, edge_frame, Ack, Batch, CoreFrame, EdgeFrame, Hello};
use mec_sync::wire::{encode_frame, FrameDecoder};

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
        downlink: None,
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
    let audit = store.audit().unwrap();
    assert_eq!(audit.len(), 1, "{audit:?}");
    let a = &audit[0];
    assert_eq!(
        (a.node_id.as_str(), a.records, a.contiguous_seq),
        ("edge-1", 600, 600)
    );
    assert_eq!((a.quarantined, a.chain.as_str()), (0, "ok"));
    assert!(a.gaps.is_empty());
}

/// A client that speaks the protocol by hand, to send what the uploader
/// never would: an old batch again, a record with a flipped byte.
struct RawClient {
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    dec: FrameDecoder,
    buf: Vec<u8>,
    _conn: quinn::Connection,
    _endpoint: quinn::Endpoint,
}

impl RawClient {
    async fn connect(core: &LoopbackCore, cert: &str, key_pem: &str) -> (RawClient, u64) {
        let (endpoint, conn) = crate::common::connect_node(core, cert, key_pem).await;
        let (send, recv) = conn.open_bi().await.unwrap();
        let mut client = RawClient {
            send,
            recv,
            dec: FrameDecoder::new(),
            buf: vec![0u8; 64 << 10],
            _conn: conn,
            _endpoint: endpoint,
        };
        client
            .send(edge_frame::Kind::Hello(Hello { log_acked_seq: 0 }))
            .await;
        let contiguous = match client.next().await {
            core_frame::Kind::Hello(h) => h.contiguous_seq,
            other => panic!("expected CoreHello, got {other:?}"),
        };
        (client, contiguous)
    }

    async fn send(&mut self, kind: edge_frame::Kind) {
        let frame = encode_frame(&EdgeFrame { kind: Some(kind) });
        self.send.write_all(&frame).await.unwrap();
    }

    async fn next(&mut self) -> core_frame::Kind {
        read_frame::<CoreFrame>(&mut self.recv, &mut self.dec, &mut self.buf)
            .await
            .unwrap()
            .and_then(|f| f.kind)
            .expect("a frame")
    }

    async fn batch(&mut self, batch_id: u64, records: Vec<Vec<u8>>) -> Ack {
        self.send(edge_frame::Kind::Batch(Batch {
            batch_id,
            records,
            lost: vec![],
        }))
        .await;
        match self.next().await {
            core_frame::Kind::Ack(a) => a,
            other => panic!("expected an Ack, got {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_old_batch_again_changes_nothing_and_a_flipped_byte_is_quarantined() {
    let dir = tempfile::tempdir().unwrap();
    let core = LoopbackCore::start(&dir.path().join("core.sqlite")).unwrap();
    let edge = node(&dir.path().join("edge"), "edge-r");
    append(&edge.log, 20).await;
    let cert = issue_node_cert(&core.ca, "edge-r", &edge.pub_pem).unwrap();
    let records: Vec<Vec<u8>> = edge
        .log
        .read_from(1, 20, 1 << 20)
        .unwrap()
        .into_iter()
        .map(|(_, r)| r)
        .collect();
    let (mut client, contiguous) = RawClient::connect(&core, &cert, &edge.key_pem).await;
    assert_eq!(contiguous, 0);
    let first = client.batch(1, records[..10].to_vec()).await;
    assert_eq!((first.contiguous_seq, first.duplicates), (10, 0));
    // The same batch again, then a part of it: duplicates, nothing stored.
    let again = client.batch(2, records[..10].to_vec()).await;
    assert_eq!((again.contiguous_seq, again.duplicates), (10, 10));
    let part = client.batch(3, records[4..8].to_vec()).await;
    assert_eq!((part.contiguous_seq, part.duplicates), (10, 4));
    // Seq 15 with one byte of its body flipped (its imsi's last digit).
    let mut rest = records[10..].to_vec();
    let at = find(&rest[4], b"001010000000001").expect("the imsi") + 14;
    rest[4][at] ^= 0x01;
    let ack = client.batch(4, rest).await;
    assert_eq!(
        (ack.contiguous_seq, ack.duplicates, ack.quarantined),
        (20, 0, 1)
    );
    // And through a new connection the core says where it stands.
    drop(client);
    let (_client, contiguous) = RawClient::connect(&core, &cert, &edge.key_pem).await;
    assert_eq!(contiguous, 20);

    let store = core.store.clone();
    core.stop().await;
    let audit = store.audit().unwrap();
    let a = &audit[0];
    assert_eq!(
        (a.records, a.contiguous_seq, a.quarantined, a.duplicates),
        (19, 20, 1, 14)
    );
    assert_eq!(a.chain, "ok");
    let conn = store.connection();
    let (seq, reason): (i64, String) = conn
        .query_row("SELECT seq, reason FROM quarantine", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .unwrap();
    assert_eq!(seq, 15);
    assert!(reason.contains("signature"), "{reason}");
    let stored_15: i64 = conn
        .query_row("SELECT COUNT(*) FROM records WHERE seq = 15", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert_eq!(stored_15, 0, "the tampered record is never billed");
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}
