//! `cargo xtask bench-api`: requests/s and latency of the whole MEC API path
//! (HTTP, auth, rate limits, reservation, one generated token, settlement,
//! signed durable usage record) with `max_tokens = 1` at C concurrent
//! clients, with metering on and off (`metering.enabled = false`, a
//! benchmark-only switch), and with metering on under an operator's signed
//! rate table (issue 25: every request rated in package units), in
//! alternating rounds. Reports medians, the cost of metering as the
//! difference of the p50s, and the cost of rating as the ratio of the rated
//! run to the plain metered one.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::{json, Value};

use crate::{output, release_agent, root};

struct Server {
    child: Child,
    api: String,
    admin: String,
    admin_token: String,
    key: String,
    model: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What a round measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// `metering.enabled = false`.
    Off,
    /// Metering on, no rate table (one unit per token).
    On,
    /// Metering on, a signed rate table in force.
    Rated,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Off => "metering off",
            Mode::On => "metering on",
            Mode::Rated => "metering on, rated",
        }
    }
}

/// A signed rate table for `model` (1.5 / 0.5 / 3 units a token) and the
/// `[rating]` section that installs it.
fn rating_section(agent: &Path, dir: &Path, model: &str) -> anyhow::Result<String> {
    let (private, public) = (dir.join("operator.key"), dir.join("operator.pub"));
    mec_image::manifest::generate_signing_key(&private, &public)?;
    let table = dir.join("rates.toml");
    std::fs::write(
        &table,
        format!("version = 1\n[[models]]\nid = \"{model}\"\nprompt = 1.5\ncached = 0.5\ncompletion = 3\n"),
    )?;
    output(
        Command::new(agent)
            .args(["sign-rates", "--key"])
            .arg(&private)
            .arg("--table")
            .arg(&table),
    )?;
    Ok(format!(
        "\n[rating]\ntable = \"{}\"\nkey = \"{}\"\n",
        table.display(),
        public.display()
    ))
}

fn start(agent: &Path, dir: &Path, mode: Mode) -> anyhow::Result<Server> {
    let metering = mode != Mode::Off;
    let out = output(Command::new(agent).args(["init", "--dir"]).arg(dir).args([
        "--api-listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        "--node-id",
        "bench",
    ]))?;
    let init: Value = serde_json::from_str(&out)?;
    let config = init["config"].as_str().context("config")?.to_string();
    let mut text = std::fs::read_to_string(&config)?;
    text.push_str(&format!(
        "\n[limits]\nimsi_requests_per_second = 0\nimsi_tokens_per_minute = 0\napp_requests_per_second = 0\napp_tokens_per_minute = 0\n\n[metering]\nenabled = {metering}\n"
    ));
    // More room in the queue than clients: the benchmark measures latency, not 503s.
    text = text.replace("[model]\n", "[model]\nqueue = 1024\n");
    if mode == Mode::Rated {
        // init names the model after its file: `id = "..."` under [model].
        let model = text
            .split("[model]\n")
            .nth(1)
            .and_then(|t| t.lines().find_map(|l| l.strip_prefix("id = ")))
            .map(|id| id.trim_matches('"').to_string())
            .context("the model's id in the configuration")?;
        text.push_str(&rating_section(agent, dir, &model)?);
    }
    std::fs::write(&config, text)?;
    let mut child = Command::new(agent)
        .args(["serve", "--config", &config])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let line = BufReader::new(child.stdout.take().unwrap())
        .lines()
        .next()
        .context("no ready line")??;
    let ready: Value = serde_json::from_str(&line)?;
    Ok(Server {
        child,
        api: ready["api_url"].as_str().unwrap_or_default().into(),
        admin: ready["admin_url"].as_str().unwrap_or_default().into(),
        admin_token: std::fs::read_to_string(
            ready["admin_token_file"].as_str().unwrap_or_default(),
        )
        .context("reading the agent's admin token")?
        .trim()
        .to_string(),
        key: init["app_key"].as_str().unwrap_or_default().into(),
        model: ready["model"].as_str().unwrap_or_default().into(),
    })
}

fn imsi(i: usize) -> String {
    format!("0010100000{i:05}")
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

async fn load(s: &Server, clients: usize, duration: Duration) -> anyhow::Result<Value> {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(clients)
        .build()?;
    for i in 0..clients {
        let r = http
            .post(format!("{}/admin/v1/grants", s.admin))
            .bearer_auth(&s.admin_token)
            .json(&json!({ "imsi": imsi(i), "tokens": 1_000_000_000u64 }))
            .send()
            .await?;
        anyhow::ensure!(r.status().is_success(), "grant: {}", r.status());
    }
    let body = json!({
        "model": s.model,
        "messages": [{ "role": "user", "content": "Say yes." }],
        "max_tokens": 1,
        "temperature": 0,
    })
    .to_string();
    // Warm-up: the prefix cache, connections.
    let run = |until: Instant| {
        let tasks: Vec<_> = (0..clients)
            .map(|i| {
                let (http, body) = (http.clone(), body.clone());
                let url = format!("{}/v1/chat/completions", s.api);
                let (key, imsi) = (s.key.clone(), imsi(i));
                tokio::spawn(async move {
                    let mut lat = Vec::new();
                    let mut errors = 0u64;
                    while Instant::now() < until && lat.len() < 100_000 {
                        let t = Instant::now();
                        let r = http
                            .post(&url)
                            .bearer_auth(&key)
                            .header("X-Subscriber-Imsi", &imsi)
                            .header("content-type", "application/json")
                            .body(body.clone())
                            .send()
                            .await;
                        match r {
                            Ok(r) if r.status().is_success() => {
                                let _ = r.bytes().await;
                                lat.push(t.elapsed().as_secs_f64() * 1e3);
                            }
                            _ => errors += 1,
                        }
                    }
                    (lat, errors)
                })
            })
            .collect();
        async move {
            let mut all = Vec::new();
            let mut errors = 0;
            for t in tasks {
                let (l, e) = t.await.unwrap();
                all.extend(l);
                errors += e;
            }
            (all, errors)
        }
    };
    run(Instant::now() + Duration::from_secs(2)).await;
    let t0 = Instant::now();
    let (mut lat, errors) = run(t0 + duration).await;
    let secs = t0.elapsed().as_secs_f64();
    lat.sort_by(f64::total_cmp);
    let metrics = http
        .get(format!("{}/metrics", s.api))
        .send()
        .await?
        .text()
        .await?;
    Ok(json!({
        "metering_p50_ms": histogram_quantile(&metrics, "mec_metering_seconds", 0.5) * 1e3,
        "metering_p99_ms": histogram_quantile(&metrics, "mec_metering_seconds", 0.99) * 1e3,
        "requests": lat.len(),
        "errors": errors,
        "requests_per_s": lat.len() as f64 / secs,
        "p50_ms": percentile(&lat, 0.5),
        "p99_ms": percentile(&lat, 0.99),
    }))
}

/// The upper bound of the histogram bucket holding quantile `q` (an upper
/// estimate, as Prometheus' buckets allow).
fn histogram_quantile(text: &str, name: &str, q: f64) -> f64 {
    let prefix = format!("{name}_bucket{{le=\"");
    let buckets: Vec<(f64, f64)> = text
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(&prefix)?;
            let (le, count) = rest.split_once("\"} ")?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, count.trim().parse().ok()?))
        })
        .collect();
    let total = buckets.last().map(|b| b.1).unwrap_or(0.0);
    buckets
        .iter()
        .find(|(_, c)| *c >= q * total && total > 0.0)
        .map(|b| b.0)
        .unwrap_or(0.0)
}

fn median(v: &[Value], key: &str) -> f64 {
    let mut x: Vec<f64> = v.iter().filter_map(|r| r[key].as_f64()).collect();
    x.sort_by(f64::total_cmp);
    if x.is_empty() {
        0.0
    } else {
        x[x.len() / 2]
    }
}

/// Runs `rounds` alternating rounds of `seconds` each.
pub fn bench(rounds: usize, clients: usize, seconds: u64) -> anyhow::Result<()> {
    let root = root();
    crate::model::ensure(&root)?;
    let agent = release_agent()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let (mut on, mut off, mut rated) = (Vec::new(), Vec::new(), Vec::new());
    for round in 1..=rounds {
        for mode in [Mode::On, Mode::Off, Mode::Rated] {
            let dir = tempfile::tempdir()?;
            let server = start(&agent, dir.path(), mode)?;
            let r = rt.block_on(load(&server, clients, Duration::from_secs(seconds)))?;
            eprintln!("round {round}, {}: {r}", mode.name());
            match mode {
                Mode::On => on.push(r),
                Mode::Off => off.push(r),
                Mode::Rated => rated.push(r),
            }
        }
    }
    let summary = |runs: &[Value]| {
        json!({
            "requests_per_s": median(runs, "requests_per_s"),
            "p50_ms": median(runs, "p50_ms"),
            "p99_ms": median(runs, "p99_ms"),
            "metering_p50_ms": median(runs, "metering_p50_ms"),
            "metering_p99_ms": median(runs, "metering_p99_ms"),
        })
    };
    let (s_on, s_off, s_rated) = (summary(&on), summary(&off), summary(&rated));
    let cost_p50 = median(&on, "p50_ms") - median(&off, "p50_ms");
    let rated_over_on = median(&rated, "requests_per_s") / median(&on, "requests_per_s");
    println!(
        "{:<20} {:>12} {:>10} {:>10}",
        "median of rounds", "requests/s", "p50 ms", "p99 ms"
    );
    for (mode, s) in [
        (Mode::On, &s_on),
        (Mode::Off, &s_off),
        (Mode::Rated, &s_rated),
    ] {
        println!(
            "{:<20} {:>12.1} {:>10.2} {:>10.2}",
            mode.name(),
            s["requests_per_s"].as_f64().unwrap_or(0.0),
            s["p50_ms"].as_f64().unwrap_or(0.0),
            s["p99_ms"].as_f64().unwrap_or(0.0)
        );
    }
    println!("end-to-end p50 difference (on - off): {cost_p50:.2} ms");
    println!("requests/s rated / not rated (both metered): {rated_over_on:.3}");
    println!(
        "time in metering per request, server side (metering on): p50 <= {:.2} ms, p99 <= {:.2} ms",
        s_on["metering_p50_ms"].as_f64().unwrap_or(0.0),
        s_on["metering_p99_ms"].as_f64().unwrap_or(0.0)
    );
    let report = json!({
        "command": "cargo xtask bench-api",
        "clients": clients,
        "seconds_per_round": seconds,
        "rounds": rounds,
        "metering_on": s_on,
        "metering_off": s_off,
        "metering_rated": s_rated,
        "metering_cost_p50_ms": cost_p50,
        "rated_over_unrated_requests_per_s": rated_over_on,
        "runs": { "on": on, "off": off, "rated": rated },
    });
    let out = root.join("bench/out");
    std::fs::create_dir_all(&out)?;
    std::fs::write(
        out.join("api-bench.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    println!("wrote {}", out.join("api-bench.json").display());
    Ok(())
}
