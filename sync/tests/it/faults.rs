//! The upload through a hostile network: a UDP relay (test code) between the
//! edge and the core that drops everything for a while, then drops a share of
//! datagrams, duplicates and reorders them. Afterwards the core holds every
//! record exactly once, and its audit is clean.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mec_sync::core_server::LoopbackCore;
use mec_sync::identity::NodeIdentity;
use mec_sync::ingest_store::IngestStore;
use mec_sync::ingest_store::{PgOptions, PgStore};
use mec_sync::log::{BackendChoice, LogOptions, UsageLog};
use mec_sync::pki::{generate_ca, issue_node_cert, CertAndKey};
use mec_sync::quic::TransportOptions;
use mec_sync::record::UsageRecord;
use mec_sync::upload::WindowLimits;
use mec_sync::uploader::{UploaderConfig, UploaderStatus};
use tokio::net::UdpSocket;

const PASS: u8 = 0;
const BLACKHOLE: u8 = 1;
const HOSTILE: u8 = 2;

/// What happens to datagrams in one direction (deterministic).
struct Fate {
    rng: u64,
    held: Option<Vec<u8>>,
}

impl Fate {
    /// The datagrams to send for `d`: in HOSTILE mode 15% are dropped, 10%
    /// duplicated, 15% held back and sent after the next one (reordered).
    fn apply(&mut self, d: &[u8], mode: u8) -> Vec<Vec<u8>> {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let roll = self.rng % 100;
        match mode {
            BLACKHOLE => vec![],
            HOSTILE if roll < 15 => vec![],
            HOSTILE if roll < 25 => vec![d.to_vec(), d.to_vec()],
            HOSTILE if roll < 40 && self.held.is_none() => {
                self.held = Some(d.to_vec());
                vec![]
            }
            _ => std::iter::once(d.to_vec())
                .chain(self.held.take())
                .collect(),
        }
    }
}

/// A UDP relay between one client and the core.
struct Relay {
    /// Where the client sends.
    addr: SocketAddr,
    upstream: SocketAddr,
    /// The socket facing the core; replacing it moves the client, as the
    /// core sees it, to a new address (a NAT rebinding, a new uplink).
    back: tokio::sync::watch::Sender<Arc<UdpSocket>>,
}

impl Relay {
    /// From now on the core sees the client at a new port.
    async fn rebind(&self) -> SocketAddr {
        self.retarget(self.upstream).await
    }

    /// From now on the client's datagrams go to `upstream` (another
    /// instance of the core), from a new port.
    async fn retarget(&self, upstream: SocketAddr) -> SocketAddr {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        socket.connect(upstream).await.unwrap();
        let addr = socket.local_addr().unwrap();
        self.back.send_replace(Arc::new(socket));
        addr
    }
}

/// Forwards datagrams between one client and `upstream`, as `mode` says.
async fn relay(upstream: SocketAddr, mode: Arc<AtomicU8>) -> Relay {
    let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
    let first_back = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    first_back.connect(upstream).await.unwrap();
    let (back, mut back_rx) = tokio::sync::watch::channel(Arc::new(first_back));
    let addr = front.local_addr().unwrap();
    let client: Arc<Mutex<Option<SocketAddr>>> = Arc::default();
    {
        let (front, back_rx, client, mode) =
            (front.clone(), back_rx.clone(), client.clone(), mode.clone());
        tokio::spawn(async move {
            let (mut buf, mut fate) = (
                [0u8; 65536],
                Fate {
                    rng: 0x9e37,
                    held: None,
                },
            );
            while let Ok((n, from)) = front.recv_from(&mut buf).await {
                *client.lock().unwrap() = Some(from);
                let back = back_rx.borrow().clone();
                for d in fate.apply(&buf[..n], mode.load(Ordering::Relaxed)) {
                    let _ = back.send(&d).await;
                }
            }
        });
    }
    tokio::spawn(async move {
        let (mut buf, mut fate) = (
            [0u8; 65536],
            Fate {
                rng: 0x51f1,
                held: None,
            },
        );
        loop {
            let back = back_rx.borrow_and_update().clone();
            let n = tokio::select! {
                r = back.recv(&mut buf) => match r {
                    Ok(n) => n,
                    Err(_) => break,
                },
                changed = back_rx.changed() => match changed {
                    Ok(()) => continue,
                    Err(_) => break,
                },
            };
            let to = *client.lock().unwrap();
            for d in fate.apply(&buf[..n], mode.load(Ordering::Relaxed)) {
                if let Some(to) = to {
                    let _ = front.send_to(&d, to).await;
                }
            }
        }
    });
    Relay {
        addr,
        upstream,
        back,
    }
}

/// An edge: a usage log and its uploader, sending to `via`.
struct Edge {
    log: Arc<UsageLog>,
    status: Arc<Mutex<UploaderStatus>>,
    stop: tokio::sync::watch::Sender<bool>,
    uploader: tokio::task::JoinHandle<()>,
}

impl Edge {
    /// Small batches, a short idle timeout and keep-alive, so that faults
    /// show within seconds.
    fn start(dir: &std::path::Path, core: &LoopbackCore, via: SocketAddr) -> Edge {
        Edge::start_as(dir, "edge-f", &core.ca, via)
    }

    /// Node `node` under the operator CA `ca`.
    fn start_as(dir: &std::path::Path, node: &str, ca: &CertAndKey, via: SocketAddr) -> Edge {
        let identity = NodeIdentity::generate().unwrap();
        identity.write_to(&dir.join("identity")).unwrap();
        let cert = issue_node_cert(ca, node, &identity.public_key_pem()).unwrap();
        let key_pem = std::fs::read_to_string(dir.join("identity/node.key")).unwrap();
        let log = Arc::new(
            UsageLog::open(
                &dir.join("log"),
                identity,
                node,
                LogOptions {
                    backend: BackendChoice::File,
                    ..LogOptions::default()
                },
            )
            .unwrap(),
        );
        let status = Arc::new(Mutex::new(UploaderStatus::default()));
        let (stop, rx) = tokio::sync::watch::channel(false);
        let uploader = tokio::spawn(mec_sync::uploader::run(
            log.clone(),
            UploaderConfig {
                core: via,
                server_name: "localhost".into(),
                ca_pem: ca.cert_pem.clone(),
                cert_pem: cert,
                key_pem,
                limits: WindowLimits {
                    batch_records: 50,
                    batch_bytes: 1 << 20,
                    in_flight: 4,
                },
                transport: TransportOptions {
                    idle_timeout: Duration::from_secs(2),
                    keep_alive: Duration::from_millis(500),
                    ..TransportOptions::default()
                },
                poll: Duration::from_millis(20),
                ack_limit: None,
                downlink: None,
            },
            status.clone(),
            rx,
        ));
        Edge {
            log,
            status,
            stop,
            uploader,
        }
    }

    async fn append(&self, n: u64) {
        for i in 0..n {
            self.log
                .append(UsageRecord {
                    billed_tokens: i,
                    ..Default::default()
                })
                .await
                .unwrap();
        }
    }

    /// Waits (at most `secs`) until the core acknowledged `seq`.
    async fn acked(&self, seq: u64, secs: u64) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while self.log.stats().acked_seq < seq {
            assert!(
                Instant::now() < deadline,
                "acked {} of {seq}",
                self.log.stats().acked_seq
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn status(&self) -> UploaderStatus {
        self.status.lock().unwrap().clone()
    }

    async fn stop(self) {
        self.stop.send(true).unwrap();
        self.uploader.await.unwrap();
    }
}

/// Stops the core and checks it holds records 1..=n once each, chained.
async fn assert_core_holds_exactly(core: LoopbackCore, n: u64) {
    let store = core.store.clone();
    core.stop().await;
    let audit = store.audit().unwrap();
    assert_eq!(audit.len(), 1);
    let a = &audit[0];
    assert_eq!((a.records, a.contiguous_seq, a.quarantined), (n, n, 0));
    assert_eq!(a.chain, "ok");
    assert!(a.gaps.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn every_record_arrives_once_through_loss_duplication_and_reordering() {
    let dir = tempfile::tempdir().unwrap();
    let core = LoopbackCore::start(&dir.path().join("core.sqlite")).unwrap();
    let mode = Arc::new(AtomicU8::new(PASS));
    let relay = relay(core.addr, mode.clone()).await;
    let edge = Edge::start(dir.path(), &core, relay.addr);
    edge.append(500).await;
    edge.acked(500, 30).await;
    // The link goes dark for longer than the idle timeout, records pile up.
    mode.store(BLACKHOLE, Ordering::Relaxed);
    edge.append(500).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(edge.log.stats().acked_seq < 1000);
    // It comes back hostile: loss, duplicates, reordering.
    mode.store(HOSTILE, Ordering::Relaxed);
    edge.append(1000).await;
    edge.acked(2000, 90).await;
    mode.store(PASS, Ordering::Relaxed);
    let status = edge.status();
    assert!(status.connections >= 2, "{status:?}");
    edge.stop().await;
    assert_core_holds_exactly(core, 2000).await;
}

/// The edge's address changes mid-upload (as the core sees it: a NAT
/// rebinding, a new uplink): QUIC migrates the connection, and the upload
/// goes on without a reconnect.
#[tokio::test(flavor = "multi_thread")]
async fn the_upload_survives_the_edge_changing_address() {
    let dir = tempfile::tempdir().unwrap();
    let core = LoopbackCore::start(&dir.path().join("core.sqlite")).unwrap();
    let relay = relay(core.addr, Arc::new(AtomicU8::new(PASS))).await;
    let edge = Edge::start(dir.path(), &core, relay.addr);
    edge.append(300).await;
    edge.acked(300, 30).await;
    let before = relay.back.borrow().local_addr().unwrap();
    let after = relay.rebind().await;
    assert_ne!(before, after);
    edge.append(300).await;
    edge.acked(600, 30).await;
    let after_again = relay.rebind().await;
    edge.append(300).await;
    edge.acked(900, 30).await;
    assert_ne!(after, after_again);
    let status = edge.status();
    assert_eq!(
        status.connections, 1,
        "migrated, not reconnected: {status:?}"
    );
    edge.stop().await;
    assert_core_holds_exactly(core, 900).await;
}

/// Node A's certificate carrying records signed by node B's key: the
/// connection is A's, so every record fails A's key. Each is quarantined
/// once, never stored, and the upload does not stall on them.
#[tokio::test(flavor = "multi_thread")]
async fn records_signed_by_another_nodes_key_are_quarantined_not_stored() {
    let dir = tempfile::tempdir().unwrap();
    let core = LoopbackCore::start(&dir.path().join("core.sqlite")).unwrap();
    let (a, b) = (
        NodeIdentity::generate().unwrap(),
        NodeIdentity::generate().unwrap(),
    );
    a.write_to(&dir.path().join("a")).unwrap();
    let cert_a = issue_node_cert(&core.ca, "edge-a", &a.public_key_pem()).unwrap();
    let key_a = std::fs::read_to_string(dir.path().join("a/node.key")).unwrap();
    // B's log, naming node A in its records.
    let log = Arc::new(
        UsageLog::open(
            &dir.path().join("log"),
            b,
            "edge-a",
            LogOptions {
                backend: BackendChoice::File,
                ..LogOptions::default()
            },
        )
        .unwrap(),
    );
    for i in 0..20 {
        log.append(UsageRecord {
            billed_tokens: i,
            ..Default::default()
        })
        .await
        .unwrap();
    }
    let status = Arc::new(Mutex::new(UploaderStatus::default()));
    let (stop, rx) = tokio::sync::watch::channel(false);
    let config = UploaderConfig {
        core: core.addr,
        server_name: "localhost".into(),
        ca_pem: core.ca.cert_pem.clone(),
        cert_pem: cert_a,
        key_pem: key_a,
        limits: WindowLimits {
            batch_records: 8,
            batch_bytes: 1 << 20,
            in_flight: 2,
        },
        transport: TransportOptions::default(),
        poll: Duration::from_millis(20),
        ack_limit: None,
        downlink: None,
    };
    let uploader = tokio::spawn(mec_sync::uploader::run(log.clone(), config, status, rx));
    let deadline = Instant::now() + Duration::from_secs(30);
    while log.stats().acked_seq < 20 {
        assert!(Instant::now() < deadline, "acked {}", log.stats().acked_seq);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.send(true).unwrap();
    uploader.await.unwrap();
    let store = core.store.clone();
    core.stop().await;
    let audit = store.audit().unwrap();
    assert_eq!(
        (
            audit[0].records,
            audit[0].quarantined,
            audit[0].contiguous_seq
        ),
        (0, 20, 20)
    );
    let billed: Option<i64> = store
        .connection()
        .query_row("SELECT SUM(billed_tokens) FROM records", [], |r| r.get(0))
        .unwrap();
    assert_eq!(billed, None, "nothing quarantined is billed");
}

/// A PostgreSQL store on `url`, opened off the async threads (its client
/// blocks on a runtime of its own).
async fn pg_store(url: String) -> Arc<dyn IngestStore> {
    tokio::task::spawn_blocking(move || PgStore::connect(&url, &PgOptions::default()))
        .await
        .unwrap()
        .map(|s| Arc::new(s) as Arc<dyn IngestStore>)
        .unwrap()
}

/// The audit of a store, off the async threads.
async fn audit_of(store: Arc<dyn IngestStore>) -> Vec<mec_sync::ingest_store::NodeAudit> {
    tokio::task::spawn_blocking(move || store.audit())
        .await
        .unwrap()
        .unwrap()
}

/// The database crashes and comes back (`pg_ctl restart -m immediate`)
/// while a node is connected and uploading to a core on PostgreSQL (1500
/// records appended, at least 200 acknowledged; 500 more after the
/// restart): whatever was in flight is not acknowledged, the node sends it
/// again, and the core holds every record once, dense and chained.
#[tokio::test(flavor = "multi_thread")]
async fn the_database_restarting_mid_upload_loses_and_doubles_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let server = Arc::new(
        tokio::task::spawn_blocking(mec_pg_throwaway::PgServer::start)
            .await
            .unwrap()
            .unwrap(),
    );
    let url = {
        let server = server.clone();
        tokio::task::spawn_blocking(move || server.create_database("restart"))
            .await
            .unwrap()
            .unwrap()
    };
    let ca = generate_ca("restart test CA").unwrap();
    let core = LoopbackCore::start_on(pg_store(url).await, ca).unwrap();
    let edge = Edge::start_as(dir.path(), "edge-db", &core.ca, core.addr);
    edge.append(1500).await;
    edge.acked(200, 60).await;
    let at_restart = edge.log.stats().acked_seq;
    {
        let server = server.clone();
        tokio::task::spawn_blocking(move || server.restart_immediate())
            .await
            .unwrap()
            .unwrap();
    }
    edge.append(500).await;
    edge.acked(2000, 120).await;
    let status = edge.status();
    edge.stop().await;
    let store = core.store.clone();
    core.stop().await;
    let audit = audit_of(store).await;
    let a = &audit[0];
    assert_eq!(
        (a.records, a.contiguous_seq, a.quarantined),
        (2000, 2000, 0),
        "{a:?}"
    );
    assert_eq!(a.chain, "ok");
    eprintln!("restart at acked seq {at_restart}; uploader {status:?}");
}

/// Two core-ingest instances on one PostgreSQL; 50 nodes upload, each
/// through a relay that moves it from one instance to the other every 1.5
/// s, so nodes reconnect to the other instance mid-upload (a load
/// balancer's choice changing). Every node's records are stored once, dense
/// and chained: the node's cursor, locked in the database, is the only
/// point the instances serialise on.
#[tokio::test(flavor = "multi_thread")]
async fn fifty_nodes_moving_between_two_instances_on_one_postgres_store_each_record_once() {
    const NODES: usize = 50;
    const RECORDS: u64 = 100;
    let dir = tempfile::tempdir().unwrap();
    let url = tokio::task::spawn_blocking(|| mec_pg_throwaway::fresh_database("instances"))
        .await
        .unwrap()
        .unwrap();
    let ca = generate_ca("two instances CA").unwrap();
    let a = LoopbackCore::start_on(pg_store(url.clone()).await, ca.clone()).unwrap();
    let b = LoopbackCore::start_on(pg_store(url).await, ca.clone()).unwrap();
    let (mut relays, mut edges) = (Vec::new(), Vec::new());
    for i in 0..NODES {
        let upstream = if i % 2 == 0 { a.addr } else { b.addr };
        let r = relay(upstream, Arc::new(AtomicU8::new(PASS))).await;
        let node_dir = dir.path().join(format!("n{i}"));
        edges.push(Edge::start_as(
            &node_dir,
            &format!("edge-{i:02}"),
            &ca,
            r.addr,
        ));
        relays.push(r);
    }
    let (stop_moving, mut moving) = tokio::sync::watch::channel(false);
    let mover = {
        let (a, b) = (a.addr, b.addr);
        tokio::spawn(async move {
            let mut to_b = true;
            let mut moves = 0u32;
            // Bounded: at most 80 moves (two minutes).
            while moves < 80 {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(1500)) => {}
                    _ = moving.changed() => break,
                }
                for (i, r) in relays.iter().enumerate() {
                    let even = i % 2 == 0;
                    r.retarget(if even == to_b { b } else { a }).await;
                }
                to_b = !to_b;
                moves += 1;
            }
            moves
        })
    };
    for round in 0..4 {
        for e in &edges {
            e.append(RECORDS / 4).await;
        }
        tokio::time::sleep(Duration::from_millis(if round < 3 { 1000 } else { 0 })).await;
    }
    for e in &edges {
        e.acked(RECORDS, 120).await;
    }
    stop_moving.send(true).unwrap();
    let moves = mover.await.unwrap();
    assert!(
        moves >= 2,
        "the nodes moved between the instances ({moves} moves)"
    );
    let batches = |c: &LoopbackCore<dyn IngestStore>| {
        c.stats.batches.load(std::sync::atomic::Ordering::Relaxed)
    };
    assert!(
        batches(&a) > 0 && batches(&b) > 0,
        "both instances committed batches: {} and {}",
        batches(&a),
        batches(&b)
    );
    let reconnects: u64 = edges.iter().map(|e| e.status().connections).sum();
    for e in edges {
        e.stop().await;
    }
    let store = a.store.clone();
    a.stop().await;
    b.stop().await;
    let audit = audit_of(store).await;
    assert_eq!(audit.len(), NODES);
    for n in &audit {
        assert_eq!(
            (n.records, n.contiguous_seq, n.quarantined),
            (RECORDS, RECORDS, 0),
            "{n:?}"
        );
        assert_eq!(n.chain, "ok", "{n:?}");
    }
    eprintln!("{moves} moves, {reconnects} connections in all");
}

/// A pool of one connection that no batch waits for (`pool_wait_s = 0`)
/// while 12 nodes upload at once, and that one connection held up for 2 s
/// (the nodes table locked from outside): calls find the pool busy, their
/// streams end unacknowledged, the nodes back off and send again, and in
/// the end every record is stored once. The store's errors are counted,
/// never silent.
#[tokio::test(flavor = "multi_thread")]
async fn an_exhausted_connection_pool_delays_batches_and_loses_none() {
    const NODES: usize = 12;
    const RECORDS: u64 = 200;
    let dir = tempfile::tempdir().unwrap();
    let url = tokio::task::spawn_blocking(|| mec_pg_throwaway::fresh_database("pool"))
        .await
        .unwrap()
        .unwrap();
    let db = format!("pool_{}", std::process::id());
    let store = tokio::task::spawn_blocking(move || {
        PgStore::connect(
            &url,
            &PgOptions {
                pool_size: 1,
                pool_wait_s: 0,
                password_file: None,
            },
        )
    })
    .await
    .unwrap()
    .map(|s| Arc::new(s) as Arc<dyn IngestStore>)
    .unwrap();
    let ca = generate_ca("pool test CA").unwrap();
    let core = LoopbackCore::start_on(store, ca.clone()).unwrap();
    let edges: Vec<Edge> = (0..NODES)
        .map(|i| {
            Edge::start_as(
                &dir.path().join(format!("n{i}")),
                &format!("edge-p{i:02}"),
                &ca,
                core.addr,
            )
        })
        .collect();
    // The one connection stuck behind a lock for 2 s while the nodes come.
    let holder = tokio::task::spawn_blocking(move || {
        mec_pg_throwaway::shared()
            .unwrap()
            .sql(
                &db,
                "BEGIN; LOCK TABLE nodes IN ACCESS EXCLUSIVE MODE; SELECT pg_sleep(2); COMMIT;",
            )
            .unwrap();
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    for e in &edges {
        e.append(RECORDS).await;
    }
    holder.await.unwrap();
    for e in &edges {
        e.acked(RECORDS, 120).await;
    }
    let reconnects: u64 = edges.iter().map(|e| e.status().connections).sum();
    for e in edges {
        e.stop().await;
    }
    let refused = core
        .stats
        .store_errors
        .load(std::sync::atomic::Ordering::Relaxed);
    let store = core.store.clone();
    core.stop().await;
    let audit = audit_of(store).await;
    assert_eq!(audit.len(), NODES);
    for n in &audit {
        assert_eq!(
            (n.records, n.contiguous_seq, n.quarantined),
            (RECORDS, RECORDS, 0),
            "{n:?}"
        );
        assert_eq!(n.chain, "ok");
    }
    assert!(refused > 0, "no store call found the pool busy");
    eprintln!("{refused} store calls found the pool busy; {reconnects} connections in all");
}
