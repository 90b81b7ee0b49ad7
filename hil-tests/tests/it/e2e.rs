//! The whole story, over real processes: a box provisioned over a serial line
//! with `edgeprov`, an edge agent serving the real model to 20 subscribers
//! under a bounded load (streamed, not streamed, cancelled, over quota,
//! malformed), the backhaul to core-ingest cut twice and lossy for a while,
//! the agent SIGKILLed under load and restarted, the core SIGKILLed and
//! restarted. After the backlog drains, the bill must match what every client
//! saw, the core must hold the node's dense verified chain, and each
//! subscriber's balance (packages sold at the core, spent at the box from
//! the core's grants) must be what was sold minus the bill (see
//! `hil_tests::reconcile`).
//!
//! Without `MEC_HIL_*` variables it runs on loopback and ptys (CI); with them
//! it provisions and loads a real box (see `hil-tests/README.md`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hil_tests::load::{self, ApiTarget, Done, Outcome};
use hil_tests::procs::free_port;
use hil_tests::reconcile::{self, EdgeBalance, Evidence};
use hil_tests::relay::{LinkMode, UdpRelay};
use hil_tests::stack::{self, Admin, Core, LocalAgent, SiteSpec};
use hil_tests::target::{Hardware, Mode};
use mec_provisioning::pty::PtyLine;

/// The second model of the local box.
const SECOND_MODEL: &str = "smollm2-135m-q8_0";
/// Requests in the load.
const REQUESTS: usize = 400;
/// Concurrent clients.
const CLIENTS: usize = 8;
/// Subscribers; one in four has a package small enough to run out.
const SUBSCRIBERS: usize = 20;
const BIG_PACKAGE: u64 = 20_000;
const SMALL_PACKAGE: u64 = 150;
/// How long the backlog may take to drain after the load
/// (`MEC_E2E_DRAIN_LIMIT_S` overrides: `cargo xtask e2e-planted` shortens it).
fn drain_limit() -> Duration {
    let secs = std::env::var("MEC_E2E_DRAIN_LIMIT_S")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(240);
    Duration::from_secs(secs)
}
/// The whole scenario's bound (load plus faults).
const LOAD_LIMIT: Duration = Duration::from_secs(900);
const NODE_ID: &str = "edge-e2e-0001";

/// The box under test: an agent on this machine, or a real one.
enum TheBox {
    Local(LocalAgent),
    Remote(Hardware),
}

impl TheBox {
    /// SIGKILLs the agent and brings it back; what was done, or why not.
    fn kill_and_restart(&mut self) -> String {
        match self {
            TheBox::Local(agent) => {
                agent.kill9();
                let started = Instant::now();
                tokio::task::block_in_place(|| agent.start());
                format!(
                    "agent SIGKILLed under load, restarted (ready after {:.1} s)",
                    started.elapsed().as_secs_f64()
                )
            }
            TheBox::Remote(h) => match &h.kill_agent {
                Some(cmd) => {
                    let status = std::process::Command::new("sh")
                        .args(["-c", cmd])
                        .status()
                        .expect("run MEC_HIL_KILL_AGENT");
                    assert!(status.success(), "MEC_HIL_KILL_AGENT failed: {status}");
                    "agent SIGKILLed under load by MEC_HIL_KILL_AGENT (its unit restarts it)".into()
                }
                None => "agent SIGKILL skipped: no MEC_HIL_KILL_AGENT for the real box".into(),
            },
        }
    }
}

/// A fault, injected while the load runs.
#[derive(Clone, Copy)]
enum Fault {
    /// Nothing passes for this long. A short cut leaves the QUIC connection
    /// alive (retransmissions); one past the 30 s idle timeout ends it, and
    /// the uploader reconnects once the link is back.
    Cut(Duration),
    /// This share of datagrams (percent) dropped each way, for this long.
    Lossy(u8, Duration),
    /// SIGKILL the agent and start it again.
    KillAgent,
    /// SIGKILL core-ingest and start it again.
    KillCore,
}

/// When this share of the requests has finished, inject the fault.
const SCRIPT: [(f64, Fault); 5] = [
    (0.08, Fault::Cut(Duration::from_secs(6))),
    (0.25, Fault::KillAgent),
    (0.40, Fault::Lossy(25, Duration::from_secs(8))),
    (0.60, Fault::KillCore),
    (0.70, Fault::Cut(Duration::from_secs(35))),
];

/// The two runs of the story (one per store) take turns: each is the
/// machine's whole load.
pub(crate) static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn from_a_provisioned_box_to_the_bill_under_faults() {
    let _turn = ONE_AT_A_TIME.lock().await;
    box_to_bill(None).await;
}

/// The same story with the core on PostgreSQL (a throw-away server): the
/// core's SIGKILL leaves the database running, and the bill must match.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn from_a_provisioned_box_to_the_bill_under_faults_on_postgresql() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let url = tokio::task::spawn_blocking(|| mec_pg_throwaway::fresh_database("e2e"))
        .await
        .unwrap()
        .unwrap();
    box_to_bill(Some(url)).await;
}

async fn box_to_bill(store: Option<String>) {
    let mode = Mode::from_env().unwrap_or_else(|e| panic!("{e}"));
    println!("{}", mode.describe());
    let tmp = tempfile::tempdir().unwrap();
    let t0 = Instant::now();
    let mut stages: Vec<(String, f64)> = Vec::new();
    let mut stage = |name: &str, since: &mut Instant| {
        stages.push((name.to_string(), since.elapsed().as_secs_f64()));
        *since = Instant::now();
    };
    let mut since = Instant::now();

    // The core, and the backhaul to it.
    let core_addr: SocketAddr = format!("127.0.0.1:{}", free_port(true)).parse().unwrap();
    let (relay_listen, sans) = match &mode {
        Mode::Loopback { .. } => ("127.0.0.1:0".parse().unwrap(), vec![]),
        Mode::Hardware(h) => {
            let (host, port) = h
                .core_advertise
                .rsplit_once(':')
                .expect("MEC_HIL_CORE_ADVERTISE is host:port");
            (
                format!("0.0.0.0:{port}").parse().unwrap(),
                vec![host.trim_matches(['[', ']']).to_string()],
            )
        }
    };
    let mut core = Core::init_on(&tmp.path().join("core"), core_addr, &sans, store.as_deref());
    core.start();
    let relay = UdpRelay::start(relay_listen, core_addr).await.unwrap();

    // The box, provisioned over a serial line.
    let (mut the_box, admin, api) = match &mode {
        Mode::Loopback { gpu } => {
            let api: SocketAddr = format!("127.0.0.1:{}", free_port(false)).parse().unwrap();
            let admin: SocketAddr = format!("127.0.0.1:{}", free_port(false)).parse().unwrap();
            let mut agent = LocalAgent::init(&tmp.path().join("box"), api, admin, "");
            // Two models side by side (issue 25): the real model, and its
            // weights requantised to Q8_0 by the agent's own tool; every
            // other request asks for the second.
            let second = tmp.path().join("box/smollm2-q8_0.gguf");
            let made = std::process::Command::new(hil_tests::procs::bin("edge-agent"))
                .args(["requantize", "--to", "q8_0", "--out"])
                .arg(&second)
                .output()
                .unwrap();
            assert!(
                made.status.success(),
                "{}",
                String::from_utf8_lossy(&made.stderr)
            );
            let gpu_line = gpu.map(|i| format!("gpu = {i}\n")).unwrap_or_default();
            let text = std::fs::read_to_string(&agent.config).unwrap();
            let text = text.replacen("[model]\n", &format!("[[models]]\n{gpu_line}"), 1)
                + &format!(
                    "\n[[models]]\nid = \"{SECOND_MODEL}\"\npath = \"{}\"\n{gpu_line}",
                    second.display()
                );
            std::fs::write(&agent.config, text).unwrap();
            let line = PtyLine::new().expect("a pty pair");
            let listener = stack::provision_listener(
                &line.box_path,
                &agent.state_dir,
                &tmp.path().join("box/provision.log"),
            );
            provision(&line.tech_path, &relay.addr.to_string(), Some(api), &core);
            listener.terminate(Duration::from_secs(10));
            stage("provision over the pty line", &mut since);
            let ready = tokio::task::block_in_place(|| agent.start());
            assert_eq!(ready["api_url"], format!("http://{api}"), "{ready}");
            stage("agent start", &mut since);
            (
                TheBox::Local(agent),
                Admin::of_ready(&ready),
                ApiTarget {
                    base_url: format!("http://{api}"),
                    app_key: String::new(),
                    model: ready["model"].as_str().unwrap().to_string(),
                    second_model: Some(SECOND_MODEL.to_string()),
                },
            )
        }
        Mode::Hardware(h) => {
            provision(&h.serial, &h.core_advertise, None, &core);
            stage("provision over the serial device", &mut since);
            let admin = Admin::new(&h.admin, &h.admin_token);
            wait_for_core_configured(&admin, &h.core_advertise).await;
            stage("the box's agent takes the site configuration", &mut since);
            let models: serde_json::Value = reqwest::Client::new()
                .get(format!("{}/v1/models", h.api))
                .bearer_auth(&h.app_key)
                .send()
                .await
                .expect("the box's API answers")
                .json()
                .await
                .unwrap();
            (
                TheBox::Remote(h.clone()),
                admin,
                ApiTarget {
                    base_url: h.api.clone(),
                    app_key: h.app_key.clone(),
                    model: models["data"][0]["id"].as_str().unwrap().to_string(),
                    second_model: None,
                },
            )
        }
    };
    let api = ApiTarget {
        app_key: match &the_box {
            TheBox::Local(a) => a.app_key.clone(),
            TheBox::Remote(h) => h.app_key.clone(),
        },
        ..api
    };

    // Packages for 20 subscribers, a quarter of them small.
    let imsis: Vec<String> = (0..SUBSCRIBERS)
        .map(|i| format!("0010100000001{i:02}"))
        .collect();
    let mut grants = BTreeMap::new();
    for (i, imsi) in imsis.iter().enumerate() {
        let tokens = if i % 4 == 3 {
            SMALL_PACKAGE
        } else {
            BIG_PACKAGE
        };
        // Sold at the core: the box asks it for a grant at the
        // subscriber's first request.
        core.sell(&format!("e2e-{imsi}"), imsi, tokens);
        grants.insert(imsi.clone(), tokens);
    }

    // The load, and the faults while it runs.
    let plan = load::plan(&imsis, REQUESTS, 0x5eed_2026);
    let progress = Arc::new(AtomicUsize::new(0));
    let load = tokio::spawn(load::run(api.clone(), plan, CLIENTS, progress.clone()));
    let mut faults: Vec<String> = Vec::new();
    let load_started = Instant::now();
    for (at, fault) in SCRIPT {
        let target = (at * REQUESTS as f64) as usize;
        while progress.load(Ordering::SeqCst) < target && !load.is_finished() {
            assert!(
                load_started.elapsed() < LOAD_LIMIT,
                "the load is stuck at {} of {REQUESTS} requests",
                progress.load(Ordering::SeqCst)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let (t, at_request) = (t0.elapsed().as_secs_f64(), progress.load(Ordering::SeqCst));
        let what = match fault {
            Fault::Cut(d) => {
                relay.set(LinkMode::Cut);
                tokio::time::sleep(d).await;
                relay.set(LinkMode::Up);
                format!("link cut for {} s", d.as_secs())
            }
            Fault::Lossy(p, d) => {
                relay.set(LinkMode::Lossy(p));
                tokio::time::sleep(d).await;
                relay.set(LinkMode::Up);
                format!(
                    "link lossy for {} s ({p}% of datagrams dropped each way)",
                    d.as_secs()
                )
            }
            Fault::KillAgent => the_box.kill_and_restart(),
            Fault::KillCore => {
                core.kill9();
                tokio::time::sleep(Duration::from_secs(1)).await;
                tokio::task::block_in_place(|| core.start());
                "core-ingest SIGKILLed, restarted 1 s later".to_string()
            }
        };
        let during = if load.is_finished() {
            "ended after the load"
        } else {
            "under load"
        };
        faults.push(format!(
            "{t:6.1} s  at request {at_request:3}: {what} ({during})"
        ));
    }
    let done = tokio::time::timeout(LOAD_LIMIT, load)
        .await
        .expect("the load finished within its bound")
        .expect("the load ran");
    relay.set(LinkMode::Up);
    stage("load with faults", &mut since);

    // Drain, then the bill against what the clients saw.
    let drained = admin.wait_drained(drain_limit()).await;
    stage("drain", &mut since);
    let sync = admin.sync().await;
    let edge_last_seq = sync["log_durable_seq"].as_u64().unwrap_or(0);
    let audit = reconcile::audit_from_json(&core.audit());
    let rows = reconcile::rows_from_json(&core.export());
    // The core settles the uploaded records against the packages just
    // after it acknowledges them: wait (bounded) until each subscriber's
    // account holds its bill.
    let settled = core_accounts(&core, &imsis, &rows).await;
    let mut balances = BTreeMap::new();
    for imsi in &imsis {
        let edge = admin.balance(imsi).await;
        let at_core = &settled[imsi];
        let n = |v: &serde_json::Value| v.as_u64().unwrap_or(u64::MAX);
        balances.insert(
            imsi.clone(),
            EdgeBalance {
                remaining: n(&at_core["remaining"]).saturating_add(n(&at_core["granted"])),
                reserved: n(&edge["reserved_tokens"]),
                overage: n(&at_core["overage"]),
            },
        );
    }
    let asked: Vec<String> = [Some(api.model.clone()), api.second_model.clone()]
        .into_iter()
        .flatten()
        .collect();
    let verdict = reconcile::reconcile(&Evidence {
        models: &asked,
        node_id: NODE_ID,
        edge_last_seq,
        grants: &grants,
        done: &done,
        rows: &rows,
        audit: &audit,
        balances: &balances,
    });
    stage("reconcile", &mut since);

    print_summary(
        &done, &rows, &audit, &faults, &relay, &sync, &verdict, &stages, t0,
    );
    if let TheBox::Local(agent) = &mut the_box {
        agent.stop();
    }
    if let Err(last) = &drained {
        panic!(
            "the backlog did not drain within {:?}; last sync state: {last}\n{} problem(s) on the bill:\n{}\ncore log:\n{}",
            drain_limit(),
            verdict.problems.len(),
            verdict.problems.join("\n"),
            core.log_tail()
        );
    }
    assert!(
        verdict.problems.is_empty(),
        "{} problem(s) on the bill:\n{}",
        verdict.problems.len(),
        verdict.problems.join("\n")
    );
}

/// Each subscriber's account at the core (`core-ingest package balance`),
/// once it has settled what the export bills it (at most 60 s; what is
/// still unsettled then shows on the bill as a problem).
async fn core_accounts(
    core: &Core,
    imsis: &[String],
    rows: &[reconcile::CoreRow],
) -> BTreeMap<String, serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut accounts = BTreeMap::new();
    for imsi in imsis {
        let billed: u64 = rows
            .iter()
            .filter(|r| &r.imsi == imsi)
            .map(|r| r.billed_tokens)
            .sum();
        loop {
            let a = tokio::task::block_in_place(|| core.balance(imsi));
            let settled = a["used"].as_u64().unwrap_or(0) + a["overage"].as_u64().unwrap_or(0);
            if settled >= billed || Instant::now() >= deadline {
                accounts.insert(imsi.clone(), a);
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    accounts
}

/// `edgeprov status`, then `edgeprov provision` over `port`, issuing from
/// the core's CA directory.
fn provision(port: &Path, core_for_box: &str, api: Option<SocketAddr>, core: &Core) {
    let status = stack::edgeprov_status(port);
    assert_eq!(
        status["device"]["provisioned"], false,
        "the box is provisioned already (reset it first): {status}"
    );
    let out = stack::edgeprov_provision(
        port,
        &SiteSpec {
            site: "cell-e2e".into(),
            node_id: NODE_ID.into(),
            core: core_for_box.into(),
            core_server_name: "localhost".into(),
            api_listen: api.map(|a| a.to_string()),
        },
        &core.dir,
    );
    assert_eq!(out["device"]["node_id"], NODE_ID, "{out}");
    assert_eq!(out["core_address"], core_for_box, "{out}");
}

/// A real box's agent reads the site configuration at start: wait until its
/// admin API names our core.
async fn wait_for_core_configured(admin: &Admin, core: &str) {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let s = admin.sync().await;
        if s["core"] == core {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the box's agent does not use core {core} after provisioning (restart its unit): {s}"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

#[allow(clippy::too_many_arguments)]
fn print_summary(
    done: &[Done],
    rows: &[reconcile::CoreRow],
    audit: &[reconcile::AuditRow],
    faults: &[String],
    relay: &UdpRelay,
    sync: &serde_json::Value,
    verdict: &reconcile::Reconciliation,
    stages: &[(String, f64)],
    t0: Instant,
) {
    let mut kinds: BTreeMap<&str, usize> = BTreeMap::new();
    let mut unreachable = 0;
    for d in done {
        unreachable += d.unreachable;
        let k = match &d.outcome {
            Outcome::Completed { .. } => "completed",
            Outcome::Cancelled { .. } => "cancelled by the client",
            Outcome::Refused { status: 429, .. } => "refused 429 (quota or rate)",
            Outcome::Refused { .. } => "refused as malformed (400/401/404/413)",
            Outcome::Interrupted { .. } => "interrupted (agent killed)",
            Outcome::Unexpected { .. } => "UNEXPECTED",
        };
        *kinds.entry(k).or_default() += 1;
    }
    println!(
        "== end to end: {} requests by {CLIENTS} clients for {SUBSCRIBERS} subscribers",
        done.len()
    );
    for (k, n) in &kinds {
        println!("   {n:4}  {k}");
    }
    println!(
        "   {unreachable:4}  connection attempts refused while the agent restarted (sent again)"
    );
    let told: u64 = verdict.per_imsi.values().map(|t| t.told).sum();
    let billed: u64 = verdict.per_imsi.values().map(|t| t.billed).sum();
    let cancelled: u64 = verdict.per_imsi.values().map(|t| t.cancelled).sum();
    let interrupted: u64 = verdict.per_imsi.values().map(|t| t.interrupted).sum();
    println!(
        "== bill: {} records, {billed} tokens = {told} told in answers + {cancelled} for dropped streams + {interrupted} for broken connections",
        rows.len()
    );
    let mut by_model: BTreeMap<&str, usize> = BTreeMap::new();
    for r in rows {
        *by_model.entry(r.model_id.as_str()).or_default() += 1;
    }
    println!("== records by model: {by_model:?}");
    for a in audit {
        println!(
            "== core: node {} records {} contiguous to {} gaps {:?} quarantined {} duplicates ignored {} chain {}",
            a.node_id, a.records, a.contiguous_seq, a.gaps, a.quarantined, a.duplicates, a.chain
        );
    }
    let s = relay.stats();
    println!(
        "== faults ({} datagrams forwarded, {} dropped by the relay):",
        s.forwarded, s.dropped
    );
    for f in faults {
        println!("   {f}");
    }
    println!(
        "== upload: {} connection(s) since the agent's last start; the last ended by: {}",
        sync["status"]["connections"], sync["status"]["last_disconnect"]
    );
    println!("== stages:");
    for (name, secs) in stages {
        println!("   {secs:7.1} s  {name}");
    }
    println!("   {:7.1} s  in all", t0.elapsed().as_secs_f64());
    if verdict.problems.is_empty() {
        println!("== the bill matches what every client saw");
    } else {
        println!("== {} PROBLEMS:", verdict.problems.len());
        for p in &verdict.problems {
            println!("   {p}");
        }
    }
}
