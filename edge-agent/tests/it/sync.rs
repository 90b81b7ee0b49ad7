//! `edge-agent serve` with a `[core]`: its usage records reach core-ingest
//! (run in this process from mec-sync) over QUIC with mutual TLS, once the
//! node certificate appears in the identity directory.

use crate::common;

use std::time::{Duration, Instant};

use common::{Agent, IMSI};
use mec_provisioning::pb::{ApplySiteConfig, DefaultPackage};
use mec_provisioning::site::SiteConfig;
use mec_sync::core_server::LoopbackCore;
use mec_sync::ingest_store::IngestStore;
use mec_sync::pki::issue_node_cert;
use serde_json::Value;

#[tokio::test(flavor = "multi_thread")]
async fn records_reach_the_core_once_the_node_certificate_appears() {
    let dir = tempfile::tempdir().unwrap();
    let core_ingest = LoopbackCore::start(&dir.path().join("core.sqlite")).unwrap();
    let (core, ca, store) = (
        core_ingest.addr,
        core_ingest.ca.clone(),
        core_ingest.store.clone(),
    );

    // The agent, pointed at the core, without a node certificate yet.
    let ca_file = dir.path().join("operator-ca.crt");
    std::fs::write(&ca_file, &ca.cert_pem).unwrap();
    let agent_dir = dir.path().join("agent");
    let core_args = [
        "--core",
        &core.to_string(),
        "--core-ca",
        ca_file.to_str().unwrap(),
    ];
    let init = common::init_json(&agent_dir, "edge-sync", &core_args);
    let config = std::path::PathBuf::from(init["config"].as_str().unwrap());
    // The box cannot reach the core before it is enrolled: the site's
    // welcome package serves the subscriber meanwhile (packages are sold
    // at the core; `admin grant` is refused on a box with one).
    let site = SiteConfig::from_request(&ApplySiteConfig {
        site_id: "cell-sync".into(),
        node_id: "edge-sync".into(),
        core_address: core.to_string(),
        core_server_name: "localhost".into(),
        api_listen: String::new(),
        default_packages: vec![DefaultPackage {
            kind: "trial".into(),
            tokens: 10_000,
            valid_days: 7,
        }],
        image_signing_key: String::new(),
    })
    .unwrap();
    std::fs::write(agent_dir.join("state/site.toml"), site.to_toml()).unwrap();
    let agent = Agent::serve(&agent_dir, &config, init["app_key"].as_str().unwrap());
    let mut told = 0;
    for q in ["One?", "Two?", "Three?"] {
        let v: Value = agent.chat(IMSI, q, 4, false).await.json().await.unwrap();
        told += v["usage"]["total_tokens"].as_u64().unwrap();
    }
    // Not enrolled yet: nothing leaves, and the lag grows with the age of
    // the oldest record waiting.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let waiting = agent
        .get_json(format!("{}/admin/v1/sync", agent.admin))
        .await;
    assert_eq!(waiting["status"]["connected"], false, "{waiting}");
    assert_eq!(waiting["backlog_records"], 3, "{waiting}");
    assert!(
        waiting["status"]["lag_s"].as_i64().unwrap() >= 1,
        "{waiting}"
    );
    // Enrollment: the certificate appears while the agent runs.
    let node_pub = std::fs::read_to_string(init["node_public_key_path"].as_str().unwrap()).unwrap();
    let cert = issue_node_cert(&ca, "edge-sync", &node_pub).unwrap();
    std::fs::write(init["node_cert_path"].as_str().unwrap(), cert).unwrap();

    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        let s = agent
            .get_json(format!("{}/admin/v1/sync", agent.admin))
            .await;
        if s["status"]["acked_seq"] == 3 && s["log_acked_seq"] == 3 {
            break s;
        }
        assert!(Instant::now() < deadline, "not uploaded: {s}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(status["status"]["connected"], true, "{status}");
    assert_eq!(status["backlog_records"], 0);
    let metrics = reqwest::get(format!("{}/metrics", agent.api))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("mec_sync_connected 1"), "{metrics}");
    assert!(metrics.contains("mec_sync_lag_seconds 0"), "{metrics}");
    assert_eq!(status["status"]["lag_s"], 0, "{status}");

    drop(agent);
    core_ingest.stop().await;
    let audit = store.audit().unwrap();
    assert_eq!(audit.len(), 1);
    assert_eq!(
        (
            audit[0].node_id.as_str(),
            audit[0].records,
            audit[0].chain.as_str()
        ),
        ("edge-sync", 3, "ok")
    );
    let billed: i64 = store
        .connection()
        .query_row("SELECT SUM(billed_tokens) FROM records", [], |r| r.get(0))
        .unwrap();
    assert_eq!(billed as u64, told);
}

/// The edge killed with SIGKILL in the middle of an upload, then started
/// again: the core holds every record exactly once.
#[tokio::test(flavor = "multi_thread")]
async fn an_edge_killed_mid_upload_resumes_and_nothing_is_doubled() {
    let dir = tempfile::tempdir().unwrap();
    let core_ingest = LoopbackCore::start(&dir.path().join("core.sqlite")).unwrap();
    let edge = dir.path().join("edge");
    const N: u64 = 50_000;
    let out = std::process::Command::new(common::bin())
        .args([
            "log",
            "bench",
            "--records",
            &N.to_string(),
            "--concurrency",
            "64",
            "--dir",
        ])
        .arg(&edge)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let node_pub = std::fs::read_to_string(edge.join("identity/node.pub")).unwrap();
    let cert = issue_node_cert(&core_ingest.ca, "bench-node", &node_pub).unwrap();
    std::fs::write(edge.join("identity/node.crt"), cert).unwrap();
    let ca_file = dir.path().join("operator-ca.crt");
    std::fs::write(&ca_file, &core_ingest.ca.cert_pem).unwrap();
    let core_addr = core_ingest.addr.to_string();
    let upload = move || {
        let mut c = std::process::Command::new(common::bin());
        c.args([
            "log",
            "upload",
            "--node-id",
            "bench-node",
            "--batch-records",
            "50",
        ])
        .args(["--core", &core_addr, "--dir"])
        .arg(&edge)
        .arg("--core-ca")
        .arg(&ca_file)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null());
        c
    };
    let cursor = || {
        core_ingest
            .store
            .position("bench-node")
            .unwrap()
            .0
            .contiguous_seq
    };
    let mut first = upload().spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while cursor() == 0 {
        assert!(Instant::now() < deadline, "nothing arrived");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    first.kill().unwrap();
    first.wait().unwrap();
    let at_kill = cursor();
    assert!(at_kill < N, "the upload finished before the kill");
    let mut again = upload();
    let second = tokio::task::spawn_blocking(move || again.output().unwrap())
        .await
        .unwrap();
    assert!(second.status.success());
    let report: Value = serde_json::from_slice(&second.stdout).unwrap();
    assert_eq!(report["acked_seq"], N, "{report}");
    let audit = core_ingest.store.audit().unwrap();
    assert_eq!(
        (audit[0].records, audit[0].contiguous_seq),
        (N, N),
        "killed at {at_kill}"
    );
    assert_eq!((audit[0].quarantined, audit[0].chain.as_str()), (0, "ok"));
    core_ingest.stop().await;
}

/// A package sold at the core (issue 23) is spent at the agent: the first
/// request asks the core for a grant on the downlink, the admin API and
/// the metrics show it, the core settles the uploaded records against the
/// package, a subscriber the core does not know is refused with its words,
/// `admin grant` is refused, and a revocation stops admission.
#[tokio::test(flavor = "multi_thread")]
async fn a_package_sold_at_the_core_is_spent_at_the_agent() {
    use mec_metering::charging::PackageSpec;
    use mec_sync::charging_store::ChargingStore;
    let dir = tempfile::tempdir().unwrap();
    let core_ingest = LoopbackCore::start(&dir.path().join("core.sqlite")).unwrap();
    let store = core_ingest.store.clone();
    let imsi = mec_metering::Imsi::parse(IMSI).unwrap();
    let now = mec_billing::unix_now();
    let spec = PackageSpec {
        kind: mec_metering::BucketKind::Topup,
        allowance: 10_000,
        valid_from: now - 60,
        expires_at: now + 30 * 86_400,
        tier: "basic".into(),
        models: vec![],
    };
    store.sell("shop-7", &imsi, &spec, "shop-7", now).unwrap();

    let ca_file = dir.path().join("operator-ca.crt");
    std::fs::write(&ca_file, &core_ingest.ca.cert_pem).unwrap();
    let agent_dir = dir.path().join("agent");
    let core_addr = core_ingest.addr.to_string();
    let init = common::init_json(
        &agent_dir,
        "edge-grants",
        &["--core", &core_addr, "--core-ca", ca_file.to_str().unwrap()],
    );
    let node_pub = std::fs::read_to_string(init["node_public_key_path"].as_str().unwrap()).unwrap();
    let cert = issue_node_cert(&core_ingest.ca, "edge-grants", &node_pub).unwrap();
    std::fs::write(init["node_cert_path"].as_str().unwrap(), cert).unwrap();
    let config = std::path::PathBuf::from(init["config"].as_str().unwrap());
    let agent = Agent::serve(&agent_dir, &config, init["app_key"].as_str().unwrap());
    let sync_url = format!("{}/admin/v1/sync", agent.admin);
    let deadline = Instant::now() + Duration::from_secs(30);
    while agent.get_json(sync_url.clone()).await["status"]["grants"]["downlink"]["connected"]
        != true
    {
        assert!(Instant::now() < deadline, "the downlink never came up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let r = agent.chat(IMSI, "Hello?", 4, false).await;
    assert_eq!(r.status(), 200);
    let told = r.json::<Value>().await.unwrap()["usage"]["total_tokens"]
        .as_u64()
        .unwrap();
    let s = agent.get_json(sync_url.clone()).await;
    let grants = &s["status"]["grants"];
    assert_eq!(grants["held"], 1, "{s}");
    assert_eq!(grants["counters"]["granted"], 1, "{s}");
    let metrics = reqwest::get(format!("{}/metrics", agent.api))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for line in [
        "mec_grants_held 1",
        "mec_downlink_connected 1",
        "mec_grant_events_total{event=\"granted\"} 1",
    ] {
        assert!(metrics.contains(line), "{line} not in\n{metrics}");
    }

    // Unknown at the core: 429 with the core's words.
    let r = agent.chat("001010000000999", "Hello?", 4, false).await;
    assert_eq!(r.status(), 429);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "insufficient_quota", "{v}");
    let message = v["error"]["message"].as_str().unwrap();
    assert!(message.contains("no package at this core"), "{message}");
    // A box with a core takes no local grants.
    let r = agent
        .admin_http
        .post(format!("{}/admin/v1/grants", agent.admin))
        .json(&serde_json::json!({ "imsi": IMSI, "tokens": 100 }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409);
    let v: Value = r.json().await.unwrap();
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("core-ingest package sell"),
        "{v}"
    );

    // The core settles the uploaded record against the package.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let a = store.account(&imsi, mec_billing::unix_now()).unwrap();
        if a.used == told {
            assert_eq!(a.used + a.granted + a.remaining, 10_000, "{a:?}");
            break;
        }
        assert!(Instant::now() < deadline, "never settled: {a:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Revoked at the core: admission stops once the revocation arrives.
    store.revoke("shop-7", mec_billing::unix_now()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = agent.chat(IMSI, "Again?", 4, false).await;
        if r.status() == 429 {
            break;
        }
        assert_eq!(r.status(), 200);
        assert!(
            Instant::now() < deadline,
            "still admitted after the revocation"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(agent);
    core_ingest.stop().await;
}
