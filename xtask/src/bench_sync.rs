//! `cargo xtask bench-sync`: records/s from an edge's log into core-ingest's
//! store (signatures checked, committed), draining a backlog of N records
//! over loopback QUIC: `edge-agent log bench` fills a log, `core-ingest`
//! serves, `edge-agent log upload` drains it, `core-ingest audit` checks.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use anyhow::Context;
use serde_json::{json, Value};

use crate::{output, release_agent, root};

pub fn bench(records: u64) -> anyhow::Result<()> {
    let root = root();
    let agent = release_agent()?;
    let core_bin = root.join("target/release/core-ingest");
    let dir = tempfile::tempdir()?;
    let (edge, core) = (dir.path().join("edge"), dir.path().join("core"));
    eprintln!("filling a log with {records} signed records");
    output(
        Command::new(&agent)
            .args(["log", "bench", "--records", &records.to_string(), "--dir"])
            .arg(&edge),
    )?;
    let init: Value = serde_json::from_str(&output(
        Command::new(&core_bin)
            .args(["init", "--listen", "127.0.0.1:0", "--dir"])
            .arg(&core),
    )?)?;
    let config = init["config"].as_str().context("config")?.to_string();
    output(
        Command::new(&core_bin)
            .args([
                "issue-node-cert",
                "--config",
                &config,
                "--node-id",
                "bench-node",
                "--public-key",
            ])
            .arg(edge.join("identity/node.pub"))
            .arg("--out")
            .arg(edge.join("identity/node.crt")),
    )?;
    let mut server = Command::new(&core_bin)
        .args(["serve", "--config", &config])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let ready: Value = serde_json::from_str(
        &BufReader::new(server.stdout.take().unwrap())
            .lines()
            .next()
            .context("no ready line")??,
    )?;
    let listen = ready["listen"].as_str().context("listen")?.to_string();
    eprintln!("draining to core-ingest at {listen}");
    let upload = output(
        Command::new(&agent)
            .args([
                "log",
                "upload",
                "--node-id",
                "bench-node",
                "--core",
                &listen,
                "--dir",
            ])
            .arg(&edge)
            .arg("--core-ca")
            .arg(init["ca_cert"].as_str().context("ca_cert")?),
    );
    let _ = server.kill();
    let _ = server.wait();
    let upload: Value = serde_json::from_str(upload?.trim())?;
    let audit: Value = serde_json::from_str(&output(
        Command::new(&core_bin).args(["audit", "--config", &config]),
    )?)?;
    let stored = audit[0]["records"].as_u64().unwrap_or(0);
    println!(
        "{} records drained in {:.1} s: {:.0} records/s; the core holds {stored} (chain {})",
        upload["records"],
        upload["seconds"].as_f64().unwrap_or(0.0),
        upload["records_per_s"].as_f64().unwrap_or(0.0),
        audit[0]["chain"]
    );
    anyhow::ensure!(stored == records, "the core holds {stored} of {records}");
    let report = json!({ "command": "cargo xtask bench-sync", "records": records, "upload": upload, "audit": audit });
    let out = root.join("bench/out");
    std::fs::create_dir_all(&out)?;
    std::fs::write(
        out.join("sync-bench.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    println!("wrote {}", out.join("sync-bench.json").display());
    Ok(())
}
