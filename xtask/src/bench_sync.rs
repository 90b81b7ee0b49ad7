//! `cargo xtask bench-sync`: records/s from edges' logs into core-ingest's
//! store (signatures checked, committed), over loopback QUIC, with real
//! processes: `edge-agent log bench` fills a log per node, `core-ingest
//! serve` runs 1 or 2 instances on one store, one `edge-agent log upload`
//! per node drains its log (node i to instance i mod k), `core-ingest audit`
//! checks every record arrived once.
//!
//! Scenarios: each store (SQLite, the embedded default; PostgreSQL, a
//! throw-away server) × instances (2 only on PostgreSQL: SQLite is one
//! process's file) × concurrent nodes. Beside them, in the same run, the
//! machine's ceiling: Ed25519 signatures batch-verified per second on all
//! cores (every record's signature is checked before it is stored). The
//! report gives ratios: PostgreSQL over SQLite, and each rate over the
//! ceiling.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Instant;

use anyhow::Context;
use serde_json::{json, Value};

use crate::{output, release_agent, root};

/// What to run.
pub struct Options {
    /// Records per scenario, spread over its nodes.
    pub records: u64,
    /// Concurrent nodes, one scenario each.
    pub nodes: Vec<usize>,
    /// Instances of core-ingest (more than 1 on PostgreSQL only).
    pub instances: Vec<usize>,
    /// `sqlite`, `postgres`.
    pub stores: Vec<String>,
}

impl Options {
    /// Every scenario, `records` each.
    pub fn all(records: u64) -> Options {
        Options {
            records,
            nodes: vec![1, 10, 100],
            instances: vec![1, 2],
            stores: vec!["sqlite".into(), "postgres".into()],
        }
    }
}

pub fn bench(opts: &Options) -> anyhow::Result<()> {
    for s in &opts.stores {
        anyhow::ensure!(
            s == "sqlite" || s == "postgres",
            "--stores: {s:?} is not sqlite or postgres"
        );
    }
    let agent = release_agent()?;
    let core_bin = root().join("target/release/core-ingest");
    let work = tempfile::tempdir()?;
    let ceiling = verify_ceiling();
    eprintln!("ceiling: {ceiling:.0} Ed25519 signatures verified per second (batches, all cores)");
    let pg = if opts.stores.iter().any(|s| s == "postgres") {
        Some(mec_pg_throwaway::PgServer::start().map_err(anyhow::Error::msg)?)
    } else {
        None
    };
    // One filled set of logs per node count, copied for each scenario
    // (an upload drains the log it reads).
    let mut templates = Vec::new();
    for &n in &opts.nodes {
        let t = work.path().join(format!("template-{n}"));
        let held = fill(&agent, &t, n, opts.records)?;
        templates.push((n, t, held));
    }
    let mut matrix = Vec::new();
    let mut runs = 0;
    for store in &opts.stores {
        for &instances in &opts.instances {
            if store == "sqlite" && instances > 1 {
                continue;
            }
            for (n, template, held) in &templates {
                runs += 1;
                let dir = work.path().join(format!("run-{runs}"));
                let url = match &pg {
                    Some(pg) if store == "postgres" => Some(
                        pg.create_database(&format!("bench_{runs}"))
                            .map_err(anyhow::Error::msg)?,
                    ),
                    _ => None,
                };
                let logs = Logs {
                    template,
                    nodes: *n,
                    records: *held,
                };
                let r = scenario(&agent, &core_bin, &dir, &logs, instances, url.as_deref())?;
                eprintln!(
                    "{store:8} instances {instances}  nodes {n:3}: {:8.0} records/s ({:.0}% of the ceiling)",
                    r.records_per_s,
                    100.0 * r.records_per_s / ceiling
                );
                matrix.push(json!({
                    "store": store,
                    "instances": instances,
                    "nodes": n,
                    "records": opts.records,
                    "seconds": r.seconds,
                    "records_per_s": r.records_per_s,
                    "of_ceiling": r.records_per_s / ceiling,
                }));
                let _ = std::fs::remove_dir_all(&dir);
            }
        }
    }
    let rate = |store: &str, instances: usize, nodes: usize| {
        matrix
            .iter()
            .find(|m| m["store"] == store && m["instances"] == instances && m["nodes"] == nodes)
            .and_then(|m| m["records_per_s"].as_f64())
    };
    let mut ratios = Vec::new();
    for &n in &opts.nodes {
        if let (Some(p), Some(s)) = (rate("postgres", 1, n), rate("sqlite", 1, n)) {
            println!(
                "nodes {n:3}: PostgreSQL / SQLite (1 instance) = {:.2}",
                p / s
            );
            ratios.push(json!({ "nodes": n, "postgres_over_sqlite": p / s }));
        }
    }
    // The figure the benchmark report has charted since issue 5: SQLite,
    // one instance, the first node count.
    let upload = matrix
        .first()
        .map(|m| json!({ "records_per_s": m["records_per_s"], "records": m["records"], "seconds": m["seconds"] }))
        .unwrap_or(Value::Null);
    let report = json!({
        "command": "cargo xtask bench-sync",
        "records_per_scenario": opts.records,
        "verify_ceiling_per_s": ceiling,
        "matrix": matrix,
        "ratios": ratios,
        "upload": upload,
    });
    let out = root().join("bench/out");
    std::fs::create_dir_all(&out)?;
    std::fs::write(
        out.join("sync-bench.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    println!("wrote {}", out.join("sync-bench.json").display());
    Ok(())
}

/// `n` nodes (`bench-0` ...) in `dir/node-i`, holding `records` in all
/// (at least one each); returns how many they hold.
fn fill(agent: &Path, dir: &Path, n: usize, records: u64) -> anyhow::Result<u64> {
    eprintln!("filling {n} logs with {records} signed records in all");
    let mut held = 0;
    for i in 0..n {
        let share = (records / n as u64 + u64::from((i as u64) < records % n as u64)).max(1);
        held += share;
        output(
            Command::new(agent)
                .args(["log", "bench", "--concurrency", "16", "--records"])
                .arg(share.to_string())
                .args(["--node-id", &format!("bench-{i}"), "--dir"])
                .arg(dir.join(format!("node-{i}"))),
        )?;
    }
    Ok(held)
}

/// Filled logs: `nodes` of them in `template`, `records` in all.
struct Logs<'a> {
    template: &'a Path,
    nodes: usize,
    records: u64,
}

struct Drained {
    seconds: f64,
    records_per_s: f64,
}

/// One scenario: a core (its store at `url`, or SQLite), `instances` of it,
/// the logs drained by one concurrent upload each.
fn scenario(
    agent: &Path,
    core_bin: &Path,
    dir: &Path,
    logs: &Logs<'_>,
    instances: usize,
    url: Option<&str>,
) -> anyhow::Result<Drained> {
    let n = logs.nodes;
    std::fs::create_dir_all(dir)?;
    let edges = dir.join("edges");
    crate::run(Command::new("cp").arg("-a").arg(logs.template).arg(&edges))?;
    let mut init = Command::new(core_bin);
    init.args(["init", "--listen", "127.0.0.1:0", "--dir"])
        .arg(dir.join("core"));
    if let Some(url) = url {
        init.args(["--store", url]);
    }
    let init: Value = serde_json::from_str(&output(&mut init)?)?;
    let config = init["config"].as_str().context("config")?.to_string();
    let ca = init["ca_cert"].as_str().context("ca_cert")?.to_string();
    for i in 0..n {
        let node = edges.join(format!("node-{i}"));
        output(
            Command::new(core_bin)
                .args(["issue-node-cert", "--config", &config, "--node-id"])
                .arg(format!("bench-{i}"))
                .arg("--public-key")
                .arg(node.join("identity/node.pub"))
                .arg("--out")
                .arg(node.join("identity/node.crt")),
        )?;
    }
    let mut servers: Vec<Child> = Vec::new();
    let mut addrs = Vec::new();
    for _ in 0..instances {
        let mut server = Command::new(core_bin)
            .args(["serve", "--config", &config])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let line = BufReader::new(server.stdout.take().context("stdout")?)
            .lines()
            .next()
            .context("no ready line")??;
        servers.push(server);
        let ready: Value = serde_json::from_str(&line)?;
        addrs.push(ready["listen"].as_str().context("listen")?.to_string());
    }
    let t0 = Instant::now();
    let uploads: Vec<(usize, Child)> = (0..n)
        .map(|i| {
            Command::new(agent)
                .args(["log", "upload", "--node-id"])
                .arg(format!("bench-{i}"))
                .args(["--core", &addrs[i % instances], "--core-ca", &ca, "--dir"])
                .arg(edges.join(format!("node-{i}")))
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .map(|c| (i, c))
        })
        .collect::<Result<_, _>>()?;
    let mut failed = Vec::new();
    for (i, c) in uploads {
        let out = c.wait_with_output()?;
        if !out.status.success() {
            failed.push(format!(
                "node {i}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
    }
    let seconds = t0.elapsed().as_secs_f64();
    for mut s in servers {
        let _ = s.kill();
        let _ = s.wait();
    }
    anyhow::ensure!(failed.is_empty(), "uploads failed: {failed:?}");
    let audit: Value = serde_json::from_str(&output(
        Command::new(core_bin).args(["audit", "--config", &config]),
    )?)?;
    let nodes = audit.as_array().context("audit")?;
    let stored: u64 = nodes.iter().filter_map(|a| a["records"].as_u64()).sum();
    let broken: Vec<&Value> = nodes.iter().filter(|a| a["chain"] != "ok").collect();
    anyhow::ensure!(broken.is_empty(), "chains broken: {broken:?}");
    let expected = logs.records;
    anyhow::ensure!(
        stored == expected && nodes.len() == n,
        "the core holds {stored} records of {expected}, from {} nodes of {n}",
        nodes.len()
    );
    Ok(Drained {
        seconds,
        records_per_s: stored as f64 / seconds,
    })
}

/// Ed25519 signatures of record-sized messages batch-verified per second
/// on all cores (the core's ceiling: no store is faster than its checks).
fn verify_ceiling() -> f64 {
    use ed25519_dalek::{Signer, SigningKey};
    use rayon::prelude::*;
    let key = SigningKey::from_bytes(&[9; 32]);
    let messages: Vec<Vec<u8>> = (0..16_384u32)
        .map(|i| {
            let mut m = vec![0u8; 160];
            m[..4].copy_from_slice(&i.to_le_bytes());
            m
        })
        .collect();
    let signatures: Vec<_> = messages.iter().map(|m| key.sign(m)).collect();
    let verifying = key.verifying_key();
    let keys = vec![verifying; 64];
    let t0 = Instant::now();
    let rounds = 4;
    for _ in 0..rounds {
        messages
            .par_chunks(64)
            .zip(signatures.par_chunks(64))
            .for_each(|(m, s)| {
                let m: Vec<&[u8]> = m.iter().map(Vec::as_slice).collect();
                ed25519_dalek::verify_batch(&m, s, &keys[..m.len()]).expect("valid signatures");
            });
    }
    (rounds * messages.len()) as f64 / t0.elapsed().as_secs_f64()
}
