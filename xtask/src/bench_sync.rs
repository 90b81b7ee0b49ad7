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
//! machine's ceiling: Ed25519 signatures checked per second on all cores by
//! the core's own batch check (every record's signature is checked before
//! it is stored). The report gives ratios: PostgreSQL over SQLite, and
//! each rate over the ceiling.

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
    let rates = verify_ceiling();
    let ceiling = rates.batch;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let ceiling_per_core = ceiling / cores as f64;
    eprintln!(
        "ceiling: {ceiling:.0} Ed25519 signatures checked per second (the core's batch check, all cores; {:.0} one at a time by the strict check)",
        rates.strict_single
    );
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
                    "{store:8} instances {instances}  nodes {n:3}: {:8.0} records/s ({:.0}% of the ceiling); {:.0} a core-second of core-ingest ({:.0}% of the ceiling per core)",
                    r.records_per_s,
                    100.0 * r.records_per_s / ceiling,
                    r.records_per_core_s,
                    100.0 * r.records_per_core_s / ceiling_per_core
                );
                matrix.push(json!({
                    "store": store,
                    "instances": instances,
                    "nodes": n,
                    "records": opts.records,
                    "seconds": r.seconds,
                    "records_per_s": r.records_per_s,
                    "of_ceiling": r.records_per_s / ceiling,
                    "records_per_core_s": r.records_per_core_s,
                    "of_ceiling_per_core": r.records_per_core_s / ceiling_per_core,
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
        "verify_strict_single_per_s": rates.strict_single,
        "cores": cores,
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
    /// Records per second of CPU that core-ingest used (all instances):
    /// on this rig the uploading boxes and the database share its cores,
    /// so this is the core's own cost, comparable with the ceiling per core.
    records_per_core_s: f64,
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
    let mut core_cpu_s = 0.0;
    for s in &servers {
        core_cpu_s += cpu_seconds(s.id())?;
    }
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
        records_per_core_s: stored as f64 / core_cpu_s,
    })
}

/// CPU time (user and system) a running process has used, from
/// `/proc/PID/stat` (fields 14 and 15, in clock ticks).
fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name (field 2) may hold spaces: count from its ')'.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .context("no ')' in /proc/PID/stat")?
        .1
        .split_whitespace()
        .collect();
    let ticks = |i: usize| -> anyhow::Result<f64> {
        Ok(fields
            .get(i)
            .context("short /proc/PID/stat")?
            .parse::<f64>()?)
    };
    // After ')': field 3 is index 0, so utime (14) is 11 and stime (15) 12.
    let per_s = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok((ticks(11)? + ticks(12)?) / per_s)
}

/// Signatures checked per second on all cores, two ways, over record-sized
/// messages of one key (one node's batch):
/// - `batch`: the check core-ingest makes (`mec_sync::record`'s
///   `verify_all`: ZIP-215 batches of 256, `mec_sync::ingest`'s chunk), the
///   core's ceiling: no store is faster than its checks;
/// - `strict_single`: RFC 8032's strict check one signature at a time, what
///   the core made before issue 22, for comparison.
fn verify_ceiling() -> VerifyRates {
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
    let key_bytes = ed25519_zebra::VerificationKeyBytes::from(verifying.to_bytes());
    let rate = |rounds: usize, check: &(dyn Fn() + Sync)| {
        let t0 = Instant::now();
        for _ in 0..rounds {
            check();
        }
        (rounds * messages.len()) as f64 / t0.elapsed().as_secs_f64()
    };
    let batch = rate(8, &|| {
        messages
            .par_chunks(256)
            .zip(signatures.par_chunks(256))
            .for_each(|(m, s)| {
                let mut batch = ed25519_zebra::batch::Verifier::new();
                for (m, s) in m.iter().zip(s) {
                    let s = ed25519_zebra::Signature::from_bytes(&s.to_bytes());
                    batch.queue((key_bytes, s, m.as_slice()));
                }
                batch.verify(rand_zebra::rng()).expect("valid signatures");
            });
    });
    let strict_single = rate(2, &|| {
        messages.par_iter().zip(&signatures).for_each(|(m, s)| {
            verifying.verify_strict(m, s).expect("valid signature");
        });
    });
    VerifyRates {
        batch,
        strict_single,
    }
}

/// Signatures checked per second (see [`verify_ceiling`]).
struct VerifyRates {
    batch: f64,
    strict_single: f64,
}
