//! `core-ingest` as an operator runs it (init, serve, issue-node-cert, audit,
//! export), fed by a real uploader over loopback QUIC; the core killed with
//! SIGKILL mid-upload and restarted still holds every record exactly once,
//! and tells the edge at once that the old connection is gone (a stateless
//! reset from the same key).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mec_sync::identity::NodeIdentity;
use mec_sync::log::{BackendChoice, LogOptions, UsageLog};
use mec_sync::quic::TransportOptions;
use mec_sync::record::UsageRecord;
use mec_sync::upload::WindowLimits;
use mec_sync::uploader::{UploaderConfig, UploaderStatus};
use serde_json::Value;

fn core_ingest(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_core-ingest"))
        .args(args)
        .output()
        .unwrap()
}

fn serve(config: &Path) -> (Child, std::net::SocketAddr) {
    let (child, ready) = serve_ready(config);
    (child, ready["listen"].as_str().unwrap().parse().unwrap())
}

/// `core-ingest serve`, and its ready line.
fn serve_ready(config: &Path) -> (Child, Value) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_core-ingest"))
        .args(["serve", "--config"])
        .arg(config)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let line = BufReader::new(child.stdout.take().unwrap())
        .lines()
        .next()
        .unwrap()
        .unwrap();
    (child, serde_json::from_str(&line).unwrap())
}

/// `core-ingest init` in `core_dir`: the configuration's path and the CA (PEM).
fn init_core(core_dir: &Path) -> (String, String) {
    let out = core_ingest(&[
        "init",
        "--dir",
        core_dir.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let init: Value = serde_json::from_slice(&out.stdout).unwrap();
    let config = init["config"].as_str().unwrap().to_string();
    let ca_pem = std::fs::read_to_string(init["ca_cert"].as_str().unwrap()).unwrap();
    (config, ca_pem)
}

#[tokio::test(flavor = "multi_thread")]
async fn an_operator_sees_records_arrive_once_even_across_a_core_crash() {
    let dir = tempfile::tempdir().unwrap();
    let (config, ca_pem) = init_core(&dir.path().join("core"));

    // The edge: identity, log with records, a certificate from the core's CA.
    let edge = dir.path().join("edge");
    let identity = NodeIdentity::generate().unwrap();
    identity.write_to(&edge.join("identity")).unwrap();
    let log = Arc::new(
        UsageLog::open(
            &edge.join("log"),
            identity,
            "edge-7",
            LogOptions {
                backend: BackendChoice::File,
                ..LogOptions::default()
            },
        )
        .unwrap(),
    );
    const N: u64 = 3000;
    for i in 0..N {
        log.append(UsageRecord {
            imsi: format!("00101000000000{}", i % 3),
            prompt_tokens: 10,
            cached_prompt_tokens: 4,
            completion_tokens: 5,
            billed_tokens: 15,
            end_time_unix_ms: 1_795_000_000_000 + i as i64,
            ..Default::default()
        })
        .await
        .unwrap();
    }
    let cert_path = edge.join("identity/node.crt");
    let out = core_ingest(&[
        "issue-node-cert",
        "--config",
        &config,
        "--node-id",
        "edge-7",
        "--public-key",
        edge.join("identity/node.pub").to_str().unwrap(),
        "--out",
        cert_path.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let (mut core, addr) = serve(Path::new(&config));
    let status = Arc::new(Mutex::new(UploaderStatus::default()));
    let (stop, rx) = tokio::sync::watch::channel(false);
    let uploader = tokio::spawn(mec_sync::uploader::run(
        log.clone(),
        UploaderConfig {
            core: addr,
            server_name: "localhost".into(),
            ca_pem,
            cert_pem: std::fs::read_to_string(&cert_path).unwrap(),
            key_pem: std::fs::read_to_string(edge.join("identity/node.key")).unwrap(),
            limits: WindowLimits {
                batch_records: 100,
                batch_bytes: 1 << 20,
                in_flight: 2,
            },
            // The default 30 s idle timeout: the old connection must end
            // by the restarted core's stateless reset, not by timing out.
            transport: TransportOptions::default(),
            poll: Duration::from_millis(20),
            ack_limit: None,
            downlink: None,
        },
        status.clone(),
        rx,
    ));
    // Kill the core mid-upload, then start it again on the same address.
    let deadline = Instant::now() + Duration::from_secs(30);
    while log.stats().acked_seq == 0 {
        assert!(Instant::now() < deadline, "nothing acknowledged");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    core.kill().unwrap();
    core.wait().unwrap();
    let killed_at = log.stats().acked_seq;
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, text.replace("127.0.0.1:0", &addr.to_string())).unwrap();
    let (mut core, _) = serve(Path::new(&config));
    let deadline = Instant::now() + Duration::from_secs(60);
    while log.stats().acked_seq < N {
        assert!(
            Instant::now() < deadline,
            "acked {} of {N} (killed at {killed_at})",
            log.stats().acked_seq
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let disconnect = status.lock().unwrap().last_disconnect.clone();
    assert!(
        disconnect
            .as_deref()
            .is_some_and(|d| d.contains("reset by peer")),
        "the old connection ended by {disconnect:?}, not the restarted core's stateless reset"
    );
    stop.send(true).unwrap();
    uploader.await.unwrap();
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(core.id() as i32, libc::SIGTERM) };
    assert!(core.wait().unwrap().success());

    let out = core_ingest(&["audit", "--config", &config]);
    let audit: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(audit[0]["node_id"], "edge-7");
    assert_eq!(audit[0]["records"], N);
    assert_eq!(audit[0]["contiguous_seq"], N);
    assert_eq!(audit[0]["gaps"].as_array().unwrap().len(), 0);
    assert_eq!(audit[0]["quarantined"], 0);
    assert_eq!(audit[0]["chain"], "ok");

    let out = core_ingest(&["export", "--config", &config, "--format", "csv"]);
    let csv = String::from_utf8(out.stdout).unwrap();
    assert!(csv.starts_with("node_id,seq,record_id,imsi,"), "{csv:.200}");
    assert_eq!(csv.lines().count() as u64, N + 1);
    let out = core_ingest(&[
        "export",
        "--config",
        &config,
        "--format",
        "jsonl",
        "--group-by",
        "imsi-day",
    ]);
    let days: Vec<Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(days.len(), 3);
    let completion: u64 = days
        .iter()
        .map(|d| d["completion_tokens"].as_u64().unwrap())
        .sum();
    let cached: u64 = days
        .iter()
        .map(|d| d["cached_prompt_tokens"].as_u64().unwrap())
        .sum();
    assert_eq!((completion, cached), (5 * N, 4 * N));
    assert!(days.iter().all(|d| d["day"] == "2026-11-18"), "{days:?}");
}

/// An edge's log, identity and certificate from the core's CA.
async fn enrolled_edge(
    dir: &Path,
    config: &str,
    node_id: &str,
    records: u64,
) -> (Arc<UsageLog>, String, String) {
    let identity = NodeIdentity::generate().unwrap();
    identity.write_to(&dir.join("identity")).unwrap();
    let log = Arc::new(
        UsageLog::open(
            &dir.join("log"),
            identity,
            node_id,
            LogOptions {
                backend: BackendChoice::File,
                ..LogOptions::default()
            },
        )
        .unwrap(),
    );
    for _ in 0..records {
        log.append(UsageRecord {
            imsi: "001010000000001".into(),
            billed_tokens: 10,
            prompt_tokens: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    }
    let cert_path = dir.join("identity/node.crt");
    let out = core_ingest(&[
        "issue-node-cert",
        "--config",
        config,
        "--node-id",
        node_id,
        "--public-key",
        dir.join("identity/node.pub").to_str().unwrap(),
        "--out",
        cert_path.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let key = std::fs::read_to_string(dir.join("identity/node.key")).unwrap();
    (log, std::fs::read_to_string(&cert_path).unwrap(), key)
}

/// Uploads for at most `for_at_most`; returns the log's acked seq and the
/// uploader's last error.
async fn upload_for(
    log: &Arc<UsageLog>,
    addr: std::net::SocketAddr,
    ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
    until_acked: u64,
    for_at_most: Duration,
) -> (u64, Option<String>) {
    let status = Arc::new(Mutex::new(UploaderStatus::default()));
    let (stop, rx) = tokio::sync::watch::channel(false);
    let transport = TransportOptions {
        idle_timeout: Duration::from_secs(3),
        ..Default::default()
    };
    let task = tokio::spawn(mec_sync::uploader::run(
        log.clone(),
        UploaderConfig {
            core: addr,
            server_name: "localhost".into(),
            ca_pem: ca_pem.into(),
            cert_pem: cert_pem.into(),
            key_pem: key_pem.into(),
            limits: WindowLimits::default(),
            transport,
            poll: Duration::from_millis(20),
            ack_limit: None,
            downlink: None,
        },
        status.clone(),
        rx,
    ));
    let deadline = Instant::now() + for_at_most;
    while log.stats().acked_seq < until_acked && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.send(true).unwrap();
    task.await.unwrap();
    let error = status.lock().unwrap().last_error.clone();
    (log.stats().acked_seq, error)
}

/// A stolen box signs valid records until its certificate expires, unless
/// the operator revokes it: `revoke-node-cert` puts it on the CRL, and the
/// running core refuses its next handshake; other nodes go on.
#[tokio::test(flavor = "multi_thread")]
async fn a_revoked_node_certificate_is_refused_by_the_running_core() {
    let dir = tempfile::tempdir().unwrap();
    let (config, ca_pem) = init_core(&dir.path().join("core"));
    let (stolen, stolen_cert, stolen_key) =
        enrolled_edge(&dir.path().join("stolen"), &config, "edge-s", 10).await;
    let (other, other_cert, other_key) =
        enrolled_edge(&dir.path().join("other"), &config, "edge-o", 10).await;
    let (mut core, addr) = serve(Path::new(&config));
    let up = |log, cert, key, until| {
        let (ca_pem, cert, key): (String, String, String) = (ca_pem.clone(), cert, key);
        async move {
            upload_for(
                log,
                addr,
                &ca_pem,
                &cert,
                &key,
                until,
                Duration::from_secs(20),
            )
            .await
        }
    };
    assert_eq!(
        up(&stolen, stolen_cert.clone(), stolen_key.clone(), 10)
            .await
            .0,
        10
    );

    let cert_file = dir.path().join("stolen/identity/node.crt");
    let out = core_ingest(&[
        "revoke-node-cert",
        "--config",
        &config,
        "--cert",
        cert_file.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let revoked: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (
            revoked["already_revoked"].as_bool(),
            revoked["revoked"].as_u64()
        ),
        (Some(false), Some(1))
    );
    let again = core_ingest(&[
        "revoke-node-cert",
        "--config",
        &config,
        "--cert",
        cert_file.to_str().unwrap(),
    ]);
    let again: Value = serde_json::from_slice(&again.stdout).unwrap();
    assert_eq!(again["already_revoked"], true);
    tokio::time::sleep(Duration::from_secs(3)).await; // the core reads the CRL again

    for _ in 0..5 {
        stolen
            .append(UsageRecord {
                billed_tokens: 1,
                prompt_tokens: 1,
                ..Default::default()
            })
            .await
            .unwrap();
    }
    let (acked, error) = upload_for(
        &stolen,
        addr,
        &ca_pem,
        &stolen_cert,
        &stolen_key,
        15,
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(acked, 10, "a revoked node uploaded");
    assert!(error.is_some(), "the refusal is reported");
    assert_eq!(
        up(&other, other_cert, other_key, 10).await.0,
        10,
        "other nodes go on"
    );
    unsafe { libc::kill(core.id() as i32, libc::SIGTERM) };
    assert!(core.wait().unwrap().success());
}

/// An operator puts the core on PostgreSQL: `init --store postgres://...`
/// makes the schema at once, `serve` names the store and answers `/readyz`
/// for the load balancer (200 while the database answers, 503 with the
/// reason when it is gone), `audit` reads it; a password on the command
/// line is refused (it would show in `ps`).
#[test]
fn an_operator_runs_the_core_on_postgresql_and_the_load_balancer_sees_readiness() {
    let dir = tempfile::tempdir().unwrap();
    let server = mec_pg_throwaway::PgServer::start().unwrap();
    let url = server.create_database("cli").unwrap();
    let refused = core_ingest(&[
        "init",
        "--dir",
        dir.path().join("x").to_str().unwrap(),
        "--store",
        "postgres://mec:s3cret@localhost/db",
    ]);
    assert!(!refused.status.success());
    let text = String::from_utf8_lossy(&refused.stderr);
    assert!(
        text.contains("password") && !text.contains("s3cret"),
        "{text}"
    );

    let out = core_ingest(&[
        "init",
        "--dir",
        dir.path().join("core").to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--store",
        &url,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let init: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        init["store"]
            .as_str()
            .unwrap()
            .starts_with("postgres://mec@"),
        "{init}"
    );
    let tables = server
        .sql("cli", "SELECT max(version) FROM schema_migrations")
        .unwrap();
    assert_eq!(
        tables,
        mec_sync::ingest_store::postgres::SCHEMA_VERSION.to_string(),
        "init made the schema"
    );
    let config = init["config"].as_str().unwrap();
    let mut text = std::fs::read_to_string(config).unwrap();
    text.push_str("http = \"127.0.0.1:0\"\n");
    std::fs::write(config, text).unwrap();

    let (mut child, ready) = serve_ready(Path::new(config));
    assert!(ready["store"].as_str().unwrap().contains("/cli"), "{ready}");
    let http = ready["http"].as_str().unwrap().to_string();
    let get = |path: &str| -> (u16, String) {
        let url = format!("http://{http}{path}");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let r = reqwest::get(&url).await.unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        })
    };
    let (status, body) = get("/readyz");
    assert_eq!(status, 200, "{body}");
    let (status, body) = get("/metrics");
    assert_eq!(status, 200);
    assert!(
        body.contains("core_ingest_records_stored_total 0"),
        "{body}"
    );
    // The database goes away: not ready, and why.
    drop(server);
    let (status, body) = get("/readyz");
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("\"ready\":false") && body.contains("PostgreSQL"),
        "{body}"
    );
    let _ = child.kill();
    let _ = child.wait();
}

/// A free UDP port on loopback (bound, then released for a server to take).
fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `core-ingest serve` for `config`, listening on `port`.
fn serve_on(config: &Path, port: u16) -> Child {
    let text = std::fs::read_to_string(config).unwrap();
    let own = config.with_file_name(format!("core-ingest-{port}.toml"));
    let listen = text
        .lines()
        .map(|l| {
            if l.starts_with("listen = ") {
                format!("listen = \"127.0.0.1:{port}\"")
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(&own, listen).unwrap();
    serve(&own).0
}

/// Two core-ingest processes on one PostgreSQL database, 50 nodes uploading
/// to them (node i to instance i mod 2); both are SIGKILLed mid-upload (a
/// quarter of the first halves acknowledged, the rest on the way), the
/// second halves are written while the core is down, and both start again
/// on their ports. Afterwards every node's records are stored once, dense
/// and chained.
#[tokio::test(flavor = "multi_thread")]
async fn two_instances_killed_mid_upload_lose_and_double_nothing() {
    const NODES: usize = 50;
    const RECORDS: u64 = 400;
    let dir = tempfile::tempdir().unwrap();
    let url = tokio::task::spawn_blocking(|| mec_pg_throwaway::fresh_database("sigkill"))
        .await
        .unwrap()
        .unwrap();
    let out = core_ingest(&[
        "init",
        "--dir",
        dir.path().join("core").to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--store",
        &url,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let init: Value = serde_json::from_slice(&out.stdout).unwrap();
    let config = PathBuf::from(init["config"].as_str().unwrap());
    let ca_pem = std::fs::read_to_string(init["ca_cert"].as_str().unwrap()).unwrap();
    let ports = [free_udp_port(), free_udp_port()];
    let mut servers: Vec<Child> = ports.iter().map(|&p| serve_on(&config, p)).collect();
    let mut edges = Vec::new();
    for i in 0..NODES {
        edges.push(
            enrolled_edge(
                &dir.path().join(format!("n{i}")),
                config.to_str().unwrap(),
                &format!("edge-k{i:02}"),
                RECORDS / 2,
            )
            .await,
        );
    }
    let mut uploads = Vec::new();
    for (i, (log, cert, key)) in edges.iter().enumerate() {
        let addr: std::net::SocketAddr = format!("127.0.0.1:{}", ports[i % 2]).parse().unwrap();
        let (log, cert, key, ca) = (log.clone(), cert.clone(), key.clone(), ca_pem.clone());
        uploads.push(tokio::spawn(async move {
            upload_for(
                &log,
                addr,
                &ca,
                &cert,
                &key,
                RECORDS,
                Duration::from_secs(150),
            )
            .await
        }));
    }
    // Killed once an eighth of the records are acknowledged, while the
    // rest of the first halves are still on their way. The watch runs on a
    // thread of its own: a task of this runtime may wait behind the
    // uploads (on a loaded 2-core machine, long enough for them to finish).
    let total = NODES as u64 * RECORDS / 2;
    let logs: Vec<Arc<UsageLog>> = edges.iter().map(|(log, _, _)| log.clone()).collect();
    let killer = std::thread::spawn(move || {
        let acked = || -> u64 { logs.iter().map(|log| log.stats().acked_seq).sum() };
        let deadline = Instant::now() + Duration::from_secs(60);
        while acked() < total / 8 {
            assert!(
                Instant::now() < deadline,
                "acknowledged {} of {total}",
                acked()
            );
            std::thread::sleep(Duration::from_micros(200));
        }
        for s in &mut servers {
            s.kill().unwrap(); // SIGKILL
        }
        let at_kill = acked();
        for s in &mut servers {
            s.wait().unwrap();
        }
        at_kill
    });
    let at_kill = tokio::task::spawn_blocking(move || killer.join().unwrap())
        .await
        .unwrap();
    assert!(
        at_kill < total,
        "the upload had not finished when the core was killed"
    );
    for (log, _, _) in &edges {
        for _ in 0..RECORDS / 2 {
            log.append(UsageRecord {
                imsi: "001010000000001".into(),
                billed_tokens: 10,
                ..Default::default()
            })
            .await
            .unwrap();
        }
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut servers: Vec<Child> = ports.iter().map(|&p| serve_on(&config, p)).collect();
    for u in uploads {
        let (acked, error) = u.await.unwrap();
        assert_eq!(acked, RECORDS, "{error:?}");
    }
    for s in &mut servers {
        let _ = s.kill();
        let _ = s.wait();
    }
    let out = core_ingest(&["audit", "--config", config.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let audit: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(audit.len(), NODES);
    for n in &audit {
        assert_eq!(n["records"], RECORDS, "{n}");
        assert_eq!(n["contiguous_seq"], RECORDS, "{n}");
        assert_eq!(n["quarantined"], 0, "{n}");
        assert_eq!(n["chain"], "ok", "{n}");
    }
}

/// The operator's packages at the core, as the BSS would drive them: a
/// sale sent twice is one sale; an id reused for another package, a bad
/// IMSI and an unknown package are refused with exit status 2 and a
/// message that names what is wrong; a revoked package leaves no balance.
#[test]
fn packages_are_sold_once_per_id_and_revoked_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let (config, _) = init_core(&dir.path().join("core"));
    let config = config.as_str();
    let json = |out: std::process::Output| -> Value {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let sell = |id: &str, imsi: &str, tokens: &str| {
        core_ingest(&[
            "package",
            "sell",
            "--config",
            config,
            "--id",
            id,
            "--imsi",
            imsi,
            "--kind",
            "monthly",
            "--tokens",
            tokens,
            "--tier",
            "9.9 a month",
        ])
    };
    let first = json(sell("bss-1", "001010123456789", "10000000"));
    assert_eq!(
        (
            first["new"].as_bool(),
            first["balance"]["remaining"].as_u64()
        ),
        (Some(true), Some(10_000_000))
    );
    // The BSS retries later: the package starts at the first sale, and the
    // retry (no --from either) is the same sale.
    std::thread::sleep(Duration::from_millis(1_100));
    let again = json(sell("bss-1", "001010123456789", "10000000"));
    assert_eq!(again["new"].as_bool(), Some(false));
    assert_eq!(
        again["balance"]["remaining"].as_u64(),
        Some(10_000_000),
        "sold once"
    );
    for (out, says) in [
        (
            sell("bss-1", "001010123456789", "5"),
            "sold before for another package",
        ),
        (sell("bss-2", "12ab", "5"), "IMSI \"12ab\""),
        (
            core_ingest(&["package", "revoke", "--config", config, "--id", "bss-9"]),
            "no package \"bss-9\"",
        ),
    ] {
        assert_eq!(out.status.code(), Some(2));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{err}");
    }
    let revoked = json(core_ingest(&[
        "package", "revoke", "--config", config, "--id", "bss-1",
    ]));
    assert_eq!(revoked["revoked"].as_bool(), Some(true));
    let balance = json(core_ingest(&[
        "package",
        "balance",
        "--config",
        config,
        "--imsi",
        "001010123456789",
    ]));
    assert_eq!(balance["remaining"].as_u64(), Some(0));

    // This month's bill names the package bought; a malformed month is
    // refused with the format; the export's summary has one line for the
    // subscriber.
    let sold_at = first["balance"]["packages"][0]["valid_from"]
        .as_i64()
        .unwrap();
    let month = chrono::DateTime::from_timestamp(sold_at, 0)
        .unwrap()
        .format("%Y-%m")
        .to_string();
    let bill = json(core_ingest(&[
        "package",
        "bill",
        "--config",
        config,
        "--imsi",
        "001010123456789",
        "--month",
        &month,
    ]));
    assert_eq!(bill["packages"][0]["id"], "bss-1", "{bill}");
    assert_eq!(bill["tokens_bought"].as_u64(), Some(10_000_000), "{bill}");
    assert_eq!(
        (bill["tokens_used"].as_u64(), bill["remaining"].as_u64()),
        (Some(0), Some(0))
    );
    let out = core_ingest(&[
        "package",
        "bill",
        "--config",
        config,
        "--imsi",
        "001010123456789",
        "--month",
        "2026-13",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("YYYY-MM"));
    let summary = dir.path().join("bills.csv");
    let out = core_ingest(&[
        "export",
        "--config",
        config,
        "--summary",
        summary.to_str().unwrap(),
        "--from",
        &(sold_at - 86_400).to_string(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&summary).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(
        lines[0].starts_with("imsi,from_ms,to_ms,packages,tokens_bought"),
        "{text}"
    );
    assert!(lines[1].starts_with("001010123456789,"), "{text}");
}

/// The operator API as a BSS calls it, on a running core: the bearer token
/// `init` wrote; a sale (201), the same sale again (200, one sale), an id
/// reused (409), malformed requests (400), a wrong or missing token (401),
/// unknown packages and subscribers (404), a revocation; every answer an
/// OpenAPI document `docs/operator-api.json` lists for its path.
#[test]
fn the_operator_api_sells_once_per_id_and_answers_as_its_openapi_document_says() {
    let dir = tempfile::tempdir().unwrap();
    let core = dir.path().join("core");
    let (config, _) = init_core(&core);
    let token = std::fs::read_to_string(core.join("operator.token")).unwrap();
    let token = token.trim().to_string();
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str("http = \"127.0.0.1:0\"\n");
    std::fs::write(&config, text).unwrap();
    let (child, ready) = serve_ready(Path::new(&config));
    // Killed however the test ends (an assertion failing included).
    struct Killed(Child);
    impl Drop for Killed {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let child = Killed(child);
    let http = ready["http"].as_str().unwrap().to_string();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let client = reqwest::Client::new();
    // (documented path, status) of every answer, checked against the document.
    let mut seen: Vec<(&str, &str, u16)> = Vec::new();
    let mut call = |method: &'static str,
                    doc_path: &'static str,
                    path: &str,
                    bearer: Option<&str>,
                    body: Option<&str>|
     -> (u16, Value) {
        let url = format!("http://{http}{path}");
        let (status, value) = rt.block_on(async {
            let mut req = match method {
                "post" => client.post(&url),
                _ => client.get(&url),
            };
            if let Some(t) = bearer {
                req = req.header("authorization", format!("Bearer {t}"));
            }
            if let Some(b) = body {
                req = req
                    .header("content-type", "application/json")
                    .body(b.to_string());
            }
            let r = req.send().await.unwrap();
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap_or(Value::Null))
        });
        seen.push((doc_path, method, status));
        (status, value)
    };
    let doc: Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../docs/operator-api.json"
        ))
        .unwrap(),
    )
    .unwrap();
    const SELL: &str = "/operator/v1/packages";
    const REVOKE: &str = "/operator/v1/packages/{id}/revoke";
    const BALANCE: &str = "/operator/v1/subscribers/{imsi}/balance";
    let sale = r#"{"id": "bss-42", "imsi": "001010123456789", "kind": "monthly", "tokens": 10000000, "tier": "9.9 a month"}"#;
    let t = Some(token.as_str());

    let (status, body) = call("post", SELL, SELL, None, Some(sale));
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (401, Some("invalid_token"))
    );
    assert_eq!(
        call("post", SELL, SELL, Some("not-the-token"), Some(sale)).0,
        401
    );
    let big = format!(
        r#"{{"id": "bss-1", "imsi": "001010123456789", "tokens": 5, "tier": "{}"}}"#,
        "x".repeat(70_000)
    );
    let (status, body) = call("post", SELL, SELL, t, Some(&big));
    assert_eq!(status, 413, "{body}");
    assert!(body["error"]["message"].is_string(), "{body}");
    let (status, body) = call("post", SELL, SELL, t, Some(sale));
    assert_eq!((status, body["new"].as_bool()), (201, Some(true)), "{body}");
    let (status, body) = call("post", SELL, SELL, t, Some(sale));
    assert_eq!(
        (status, body["new"].as_bool()),
        (200, Some(false)),
        "{body}"
    );
    assert_eq!(
        body["balance"]["remaining"].as_u64(),
        Some(10_000_000),
        "sold once"
    );
    let other = r#"{"id": "bss-42", "imsi": "001010123456789", "tokens": 5}"#;
    let (status, body) = call("post", SELL, SELL, t, Some(other));
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (409, Some("id_conflict")),
        "{body}"
    );
    for bad in [
        r#"{"id": "bss-43", "imsi": "12ab", "tokens": 5}"#,
        r#"{"id": "bss-43", "imsi": "001010123456789", "tokens": 0}"#,
        r#"{"id": "bss-43", "imsi": "001010123456789", "tokens": 5, "colour": "red"}"#,
        "not json",
        r#"{"id": "bss-43", "imsi": "001010123456789", "tokens": 5, "from": "99999999999999999"}"#,
    ] {
        let (status, body) = call("post", SELL, SELL, t, Some(bad));
        assert_eq!(status, 400, "{bad}: {body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{body}"
        );
    }
    let (status, body) = call(
        "get",
        BALANCE,
        "/operator/v1/subscribers/001010123456789/balance",
        t,
        None,
    );
    assert_eq!(
        (status, body["remaining"].as_u64()),
        (200, Some(10_000_000)),
        "{body}"
    );
    assert_eq!(body["packages"][0]["id"], "bss-42", "{body}");
    assert_eq!(body["packages"][0]["tier"], "9.9 a month", "{body}");
    // Every field the document requires of an account, and of a package in it.
    for (schema, value) in [("Account", &body), ("PackageView", &body["packages"][0])] {
        for field in doc["components"]["schemas"][schema]["required"]
            .as_array()
            .unwrap()
        {
            let field = field.as_str().unwrap();
            assert!(
                !value[field].is_null(),
                "{schema}.{field} missing in {value}"
            );
        }
    }
    assert_eq!(
        call(
            "get",
            BALANCE,
            "/operator/v1/subscribers/001019999999999/balance",
            t,
            None
        )
        .0,
        404
    );
    assert_eq!(
        call(
            "get",
            BALANCE,
            "/operator/v1/subscribers/12ab/balance",
            t,
            None
        )
        .0,
        400
    );
    assert_eq!(
        call(
            "post",
            REVOKE,
            "/operator/v1/packages/bss-0/revoke",
            t,
            None
        )
        .0,
        404
    );
    let (status, body) = call(
        "post",
        REVOKE,
        "/operator/v1/packages/bss-42/revoke",
        t,
        None,
    );
    assert_eq!(
        (status, body["revoked"].as_bool()),
        (200, Some(true)),
        "{body}"
    );
    drop(child);

    let mut paths: Vec<&str> = doc["paths"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    paths.sort();
    assert_eq!(paths, vec![SELL, REVOKE, BALANCE]);
    for (path, method, status) in seen {
        let documented = &doc["paths"][path][method]["responses"][status.to_string()];
        assert!(
            !documented.is_null(),
            "{method} {path} answered {status}, which the document does not list"
        );
    }
}
