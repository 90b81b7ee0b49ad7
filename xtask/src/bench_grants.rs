//! `cargo xtask bench-grants`: the core's grants (issue 23), measured with
//! real processes on loopback: `core-ingest serve` on each store (SQLite;
//! PostgreSQL, a throw-away server) and `core-ingest bench-grants`, whose
//! simulated boxes (each its own key, certificate, QUIC connection and
//! durable ledger store) ask at once. Figures: a grant's round trip (p50,
//! p99), grants per second with 100 boxes asking at once, and how long a
//! revocation takes to reach a connected box; PostgreSQL over SQLite.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use anyhow::Context;
use serde_json::{json, Value};

use crate::{output, root};

/// Runs both stores, `boxes` boxes asking `grants_per_box` each.
pub fn bench(boxes: usize, grants_per_box: usize) -> anyhow::Result<()> {
    let core_bin = root().join("target/release/core-ingest");
    anyhow::ensure!(
        core_bin.exists(),
        "{} is missing: cargo build --release --bin core-ingest",
        core_bin.display()
    );
    let work = tempfile::tempdir()?;
    let pg = mec_pg_throwaway::PgServer::start().map_err(anyhow::Error::msg)?;
    let mut stores = Vec::new();
    for store in ["sqlite", "postgres"] {
        let dir = work.path().join(store);
        let mut init = Command::new(&core_bin);
        init.args(["init", "--listen", "127.0.0.1:0", "--dir"])
            .arg(dir.join("core"));
        if store == "postgres" {
            init.args([
                "--store",
                &pg.create_database("bench_grants")
                    .map_err(anyhow::Error::msg)?,
            ]);
        }
        let init: Value = serde_json::from_str(&output(&mut init)?)?;
        let config = init["config"].as_str().context("config")?.to_string();
        let mut server = Command::new(&core_bin)
            .args(["serve", "--config", &config])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let line = BufReader::new(server.stdout.take().context("stdout")?)
            .lines()
            .next()
            .context("no ready line")??;
        let ready: Value = serde_json::from_str(&line)?;
        let addr = ready["listen"].as_str().context("listen")?.to_string();
        let figures = output(
            Command::new(&core_bin)
                .args(["bench-grants", "--config", &config, "--core", &addr])
                .args(["--boxes", &boxes.to_string()])
                .args(["--grants-per-box", &grants_per_box.to_string()])
                .arg("--dir")
                .arg(dir.join("boxes")),
        );
        let _ = server.kill();
        let _ = server.wait();
        let mut figures: Value = serde_json::from_str(&figures?)?;
        eprintln!(
            "{store:8}: {:.0} grants/s with {boxes} boxes asking at once; round trip p50 {:.1} ms, p99 {:.1} ms; revocation at the box p50 {:.0} ms, p99 {:.0} ms",
            figures["grants_per_s"].as_f64().unwrap_or(0.0),
            figures["round_trip_ms"]["p50"].as_f64().unwrap_or(0.0),
            figures["round_trip_ms"]["p99"].as_f64().unwrap_or(0.0),
            figures["revocation_ms"]["p50"].as_f64().unwrap_or(0.0),
            figures["revocation_ms"]["p99"].as_f64().unwrap_or(0.0),
        );
        figures["store"] = json!(store);
        stores.push(figures);
    }
    let rate = |i: usize| stores[i]["grants_per_s"].as_f64().unwrap_or(0.0);
    let ratio = rate(1) / rate(0).max(f64::MIN_POSITIVE);
    println!("grants/s, PostgreSQL / SQLite = {ratio:.2}");
    let report = json!({
        "command": "cargo xtask bench-grants",
        "boxes": boxes,
        "grants_per_box": grants_per_box,
        "stores": stores,
        "postgres_over_sqlite": ratio,
    });
    let out = root().join("bench/out");
    std::fs::create_dir_all(&out)?;
    std::fs::write(
        out.join("grants-bench.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    println!("wrote {}", out.join("grants-bench.json").display());
    Ok(())
}
