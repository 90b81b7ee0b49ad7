//! One benchmark report from the benchmarks' JSON files in `bench/out/`:
//! `bench/report.json` (every figure with its unit, its peer, the ratio, the
//! command that made it, and the machine), `bench/report.md` (the tables a
//! reader looks at) and PNG charts in `bench/charts/` (plotters).
//!
//! Each benchmark ran its peer side by side in one run (alternating rounds,
//! medians), so the ratios are what to compare across machines; the absolute
//! figures say what this machine did.

use std::path::{Path, PathBuf};

use anyhow::Context;
use plotters::prelude::*;
use serde_json::{json, Value};

/// Where the DejaVu font is on Debian (`fonts-dejavu-core`).
pub const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

/// One figure of the report.
#[derive(Debug, Clone, PartialEq)]
pub struct Figure {
    /// Which benchmark ("inference", "log", "api", "sync", "grants",
    /// "structured", "models").
    pub bench: &'static str,
    /// What was measured.
    pub name: String,
    /// Our value.
    pub value: f64,
    /// Its unit.
    pub unit: &'static str,
    /// The peer's name and value, measured in the same run.
    pub peer: Option<(String, f64)>,
    /// Whether more is better.
    pub higher_is_better: bool,
    /// The command that made it.
    pub command: String,
}

impl Figure {
    /// Ours over the peer, oriented so that above 1 means we do better.
    pub fn ratio(&self) -> Option<f64> {
        let (_, peer) = self.peer.as_ref()?;
        if *peer <= 0.0 || self.value <= 0.0 {
            return None;
        }
        Some(if self.higher_is_better {
            self.value / peer
        } else {
            peer / self.value
        })
    }
}

fn num(v: &Value) -> Option<f64> {
    v.as_f64()
}

/// The figures found in the benchmarks' outputs (a missing file or field is
/// left out, not invented).
pub fn figures(out: &Path) -> Vec<Figure> {
    let read = |name: &str| -> Option<Value> {
        serde_json::from_str(&std::fs::read_to_string(out.join(name)).ok()?).ok()
    };
    let mut f = Vec::new();
    if let Some(v) = read("inference-bench.json") {
        let command = format!(
            "{} (rounds {}, threads {}, {} decode tokens)",
            v["command"]
                .as_str()
                .unwrap_or("cargo xtask bench-inference"),
            v["rounds"],
            v["threads"],
            v["decode_tokens"]
        );
        let s = &v["summary"];
        for (key, name, unit, higher) in [
            ("decode_tokens_per_s", "decode, 1 stream", "tokens/s", true),
            (
                "aggregate_4_tokens_per_s",
                "decode, 4 streams together",
                "tokens/s",
                true,
            ),
            ("prefill_tokens_per_s", "prefill", "tokens/s", true),
            (
                "ttft_ms",
                "time to first token, 206-token prompt",
                "ms",
                false,
            ),
            (
                "cached_ttft_ms",
                "time to first token, cached prefix",
                "ms",
                false,
            ),
            ("peak_rss_mb", "peak memory (RSS)", "MB", false),
        ] {
            if let (Some(ours), Some(peer)) = (num(&s[key]["ours"]), num(&s[key]["llama_cpp"])) {
                f.push(Figure {
                    bench: "inference",
                    name: name.into(),
                    value: ours,
                    unit,
                    peer: Some(("llama.cpp".into(), peer)),
                    higher_is_better: higher,
                    command: command.clone(),
                });
            }
        }
    }
    if let Some(v) = read("log-bench.json") {
        let command = v["command"]
            .as_str()
            .unwrap_or("cargo xtask bench-log")
            .to_string();
        let fsync = num(&v["baselines"]["fdatasync_per_s"]);
        for r in v["runs"].as_array().into_iter().flatten() {
            if let Some(rps) = num(&r["records_per_s"]) {
                f.push(Figure {
                    bench: "log",
                    name: format!(
                        "durable appends, {} backend, C = {}",
                        r["backend"].as_str().unwrap_or("?"),
                        r["concurrency"]
                    ),
                    value: rps,
                    unit: "records/s",
                    peer: fsync.map(|s| ("fdatasync rate".to_string(), s)),
                    higher_is_better: true,
                    command: command.clone(),
                });
            }
        }
    }
    if let Some(v) = read("api-bench.json") {
        let command = format!(
            "{} ({} clients, {} rounds of {} s, max_tokens = 1)",
            v["command"].as_str().unwrap_or("cargo xtask bench-api"),
            v["clients"],
            v["rounds"],
            v["seconds_per_round"]
        );
        let (on, off) = (&v["metering_on"], &v["metering_off"]);
        for (key, name, unit, higher) in [
            ("requests_per_s", "API requests", "requests/s", true),
            ("p50_ms", "API latency p50", "ms", false),
            ("p99_ms", "API latency p99", "ms", false),
        ] {
            if let (Some(a), Some(b)) = (num(&on[key]), num(&off[key])) {
                f.push(Figure {
                    bench: "api",
                    name: format!("{name}, metering on"),
                    value: a,
                    unit,
                    peer: Some(("metering off".into(), b)),
                    higher_is_better: higher,
                    command: command.clone(),
                });
            }
        }
        // Issue 25: a signed rate table in force, against metering alone.
        let rated = &v["metering_rated"];
        for (key, name, unit, higher) in [
            ("requests_per_s", "API requests", "requests/s", true),
            ("p50_ms", "API latency p50", "ms", false),
        ] {
            if let (Some(a), Some(b)) = (num(&rated[key]), num(&on[key])) {
                f.push(Figure {
                    bench: "api",
                    name: format!("{name}, metering on, rated"),
                    value: a,
                    unit,
                    peer: Some(("metering on, not rated".into(), b)),
                    higher_is_better: higher,
                    command: command.clone(),
                });
            }
        }
        if let Some(m) = num(&on["metering_p50_ms"]) {
            f.push(Figure {
                bench: "api",
                name: "metering's own time per request, p50".into(),
                value: m,
                unit: "ms",
                peer: None,
                higher_is_better: false,
                command: command.clone(),
            });
        }
    }
    if let Some(v) = read("models-bench.json") {
        // Issue 25: several models on one box.
        let command = format!(
            "{} ({} rounds per model)",
            v["command"].as_str().unwrap_or("cargo xtask bench-models"),
            v["rounds"]
        );
        for (id, m) in v["models"].as_object().into_iter().flatten() {
            for (key, what) in [
                ("load_ms", "load (file to serving engine)"),
                (
                    "unload_ms",
                    "unload (answered; the engine stops on a thread of its own)",
                ),
            ] {
                if let Some(ms) = num(&m[key]) {
                    f.push(Figure {
                        bench: "models",
                        name: format!("{id}: {what}"),
                        value: ms,
                        unit: "ms",
                        peer: None,
                        higher_is_better: false,
                        command: command.clone(),
                    });
                }
            }
            if let (Some(cold), Some(warm)) =
                (num(&m["cold_first_request_ms"]), num(&m["warm_request_ms"]))
            {
                f.push(Figure {
                    bench: "models",
                    name: format!("{id}: first request, model cold (503 model_loading, retried)"),
                    value: cold,
                    unit: "ms",
                    peer: Some(("the same request, model warm".into(), warm)),
                    higher_is_better: false,
                    command: command.clone(),
                });
            }
        }
    }
    if let Some(v) = read("models-bench.json") {
        // Issue 25: how two models share the box (decoding at once).
        let sharing = &v["sharing"];
        for (id, alone) in sharing["alone_tokens_per_s"]
            .as_object()
            .into_iter()
            .flatten()
        {
            if let (Some(together), Some(alone)) =
                (num(&sharing["together_tokens_per_s"][id]), num(alone))
            {
                f.push(Figure {
                    bench: "models",
                    name: format!("{id}: decode while the other model decodes too"),
                    value: together,
                    unit: "tokens/s",
                    peer: Some(("the same model decoding alone".into(), alone)),
                    higher_is_better: true,
                    command: format!(
                        "{} ({} streams per model)",
                        v["command"].as_str().unwrap_or("cargo xtask bench-models"),
                        sharing["streams_per_model"]
                    ),
                });
            }
        }
    }
    if let Some(v) = read("sync-bench.json") {
        if let Some(rps) = num(&v["upload"]["records_per_s"]) {
            f.push(Figure {
                bench: "sync",
                name: format!(
                    "upload of {} records, verified and committed",
                    num(&v["upload"]["records"])
                        .or(num(&v["records"]))
                        .map_or("?".into(), fmt)
                ),
                value: rps,
                unit: "records/s",
                peer: Some(("the 50,000/s goal".into(), 50_000.0)),
                higher_is_better: true,
                command: format!(
                    "{} --records {}",
                    v["command"].as_str().unwrap_or("cargo xtask bench-sync"),
                    num(&v["upload"]["records"])
                        .or(num(&v["records"]))
                        .map_or("?".into(), |n| format!("{n:.0}"))
                ),
            });
        }
        // Since issue 22: each store × instances × nodes, against the core's
        // own signature-check ceiling, and PostgreSQL against SQLite.
        let command = v["command"]
            .as_str()
            .unwrap_or("cargo xtask bench-sync")
            .to_string();
        let ceiling = num(&v["verify_ceiling_per_s"]);
        let matrix = v["matrix"].as_array().cloned().unwrap_or_default();
        let rate = |store: &str, instances: u64, nodes: u64| {
            matrix
                .iter()
                .find(|m| m["store"] == store && m["instances"] == instances && m["nodes"] == nodes)
                .and_then(|m| num(&m["records_per_s"]))
        };
        for m in &matrix {
            let (Some(store), Some(instances), Some(nodes), Some(rps)) = (
                m["store"].as_str(),
                m["instances"].as_u64(),
                m["nodes"].as_u64(),
                num(&m["records_per_s"]),
            ) else {
                continue;
            };
            let what = format!(
                "{store}, {instances} instance{}, {nodes} nodes",
                if instances == 1 { "" } else { "s" }
            );
            f.push(Figure {
                bench: "sync",
                name: format!("{what}: records drained"),
                value: rps,
                unit: "records/s",
                peer: ceiling.map(|c| ("the core's signature-check ceiling".to_string(), c)),
                higher_is_better: true,
                command: command.clone(),
            });
            if store == "postgres" && instances == 1 {
                if let Some(sqlite) = rate("sqlite", 1, nodes) {
                    f.push(Figure {
                        bench: "sync",
                        name: format!("{what}: against SQLite"),
                        value: rps,
                        unit: "records/s",
                        peer: Some((format!("sqlite, 1 instance, {nodes} nodes"), sqlite)),
                        higher_is_better: true,
                        command: command.clone(),
                    });
                }
            }
        }
    }
    if let Some(v) = read("grants-bench.json") {
        // Issue 23: the core's grants to boxes, on both stores.
        let command = v["command"]
            .as_str()
            .unwrap_or("cargo xtask bench-grants")
            .to_string();
        let stores = v["stores"].as_array().cloned().unwrap_or_default();
        let sqlite = stores
            .iter()
            .find(|s| s["store"] == "sqlite")
            .and_then(|s| num(&s["grants_per_s"]));
        for s in &stores {
            let (Some(store), Some(boxes)) = (s["store"].as_str(), s["boxes"].as_u64()) else {
                continue;
            };
            if let Some(rate) = num(&s["grants_per_s"]) {
                f.push(Figure {
                    bench: "grants",
                    name: format!("{store}: grants with {boxes} boxes asking at once"),
                    value: rate,
                    unit: "grants/s",
                    peer: sqlite
                        .filter(|_| store != "sqlite")
                        .map(|r| (format!("sqlite, {boxes} boxes"), r)),
                    higher_is_better: true,
                    command: command.clone(),
                });
            }
            for (key, what) in [
                (
                    "round_trip_ms",
                    "a grant's round trip (asked to applied at the box)",
                ),
                ("revocation_ms", "a revocation's way to a connected box"),
            ] {
                for p in ["p50", "p99"] {
                    if let Some(ms) = num(&s[key][p]) {
                        f.push(Figure {
                            bench: "grants",
                            name: format!("{store}: {what}, {p}"),
                            value: ms,
                            unit: "ms",
                            peer: None,
                            higher_is_better: false,
                            command: command.clone(),
                        });
                    }
                }
            }
        }
    }
    if let Some(v) = read("structured-bench.json") {
        // Issue 24: structured output, ours (llguidance) against llama.cpp (GBNF).
        let command = v["command"]
            .as_str()
            .unwrap_or("cargo xtask bench-structured")
            .to_string();
        for (key, what, unit, higher_is_better) in [
            (
                "decode_tokens_per_s_constrained",
                "decode under a JSON Schema",
                "tokens/s",
                true,
            ),
            (
                "decode_tokens_per_s_free",
                "decode, same prompt and length, no constraint",
                "tokens/s",
                true,
            ),
            (
                "constrained_over_free",
                "constrained / free decode rate",
                "×",
                true,
            ),
            (
                "ttft_ms_large_schema",
                "first token with a 50-property schema (compiled per request)",
                "ms",
                false,
            ),
            ("ttft_ms_free", "first token, no schema", "ms", false),
        ] {
            if let Some(ours) = num(&v["ours"][key]) {
                f.push(Figure {
                    bench: "structured",
                    name: what.to_string(),
                    value: ours,
                    unit,
                    peer: num(&v["llama_cpp"][key]).map(|p| ("llama.cpp".to_string(), p)),
                    higher_is_better,
                    command: command.clone(),
                });
            }
        }
    }
    f
}

/// The machine the benchmarks ran on.
pub fn machine(root: &Path) -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    let run = |cmd: &str, args: &[&str]| {
        std::process::Command::new(cmd)
            .args(args)
            .current_dir(root)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_else(|| "unknown".into())
    };
    let memory_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("MemTotal"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map(|kb| (kb / 1024.0 / 1024.0 * 10.0).round() / 10.0);
    json!({
        "cpu": cpu,
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "memory_gib": memory_gib,
        "kernel": run("uname", &["-r"]),
        "os": std::fs::read_to_string("/etc/os-release").ok().and_then(|t| t.lines().find(|l| l.starts_with("PRETTY_NAME=")).map(|l| l[13..].trim_matches('"').to_string())),
        "rustc": run("rustc", &["--version"]),
        "commit": run("git", &["rev-parse", "--short", "HEAD"]),
    })
}

/// Writes `report.json`, `report.md` and `charts/*.png` into `bench_dir`
/// from `bench_dir/out/*.json`; returns the paths written.
pub fn write(bench_dir: &Path, machine: &Value, date: &str) -> anyhow::Result<Vec<PathBuf>> {
    let mut figures = figures(&bench_dir.join("out"));
    // A benchmark run alone (`cargo xtask bench-grants`) updates its own
    // section; the others keep the previous report's figures, marked so.
    if let Some(previous) = std::fs::read_to_string(bench_dir.join("report.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
    {
        let kept = carried_over(&previous, &figures);
        figures.extend(kept);
    }
    anyhow::ensure!(
        !figures.is_empty(),
        "no benchmark output in {}: run `cargo xtask bench` first",
        bench_dir.join("out").display()
    );
    let charts_dir = bench_dir.join("charts");
    std::fs::create_dir_all(&charts_dir)?;
    register_font()?;
    let mut written = Vec::new();
    let charts = charts(&figures);
    for (file, chart) in &charts {
        let path = charts_dir.join(file);
        draw(&path, chart).with_context(|| format!("drawing {}", path.display()))?;
        written.push(path);
    }
    let report = json!({
        "date": date,
        "machine": machine,
        "figures": figures.iter().map(|f| json!({
            "bench": f.bench,
            "name": f.name,
            "value": f.value,
            "unit": f.unit,
            "peer": f.peer.as_ref().map(|(n, _)| n),
            "peer_value": f.peer.as_ref().map(|(_, v)| v),
            "ratio_above_1_is_better_for_us": f.ratio(),
            "command": f.command,
        })).collect::<Vec<_>>(),
        "charts": charts.iter().map(|(f, _)| format!("charts/{f}")).collect::<Vec<_>>(),
    });
    let json_path = bench_dir.join("report.json");
    std::fs::write(&json_path, serde_json::to_string_pretty(&report)? + "\n")?;
    written.push(json_path);
    let md_path = bench_dir.join("report.md");
    std::fs::write(&md_path, markdown(&figures, machine, date, &charts))?;
    written.push(md_path);
    Ok(written)
}

/// The previous report's figures of the benchmarks `present` has none of,
/// their commands marked with that report's date.
fn carried_over(previous: &Value, present: &[Figure]) -> Vec<Figure> {
    let date = previous["date"].as_str().unwrap_or("an earlier run");
    let leak = |s: &str| -> &'static str { Box::leak(s.to_string().into_boxed_str()) };
    previous["figures"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|f| {
            let bench = f["bench"].as_str()?;
            if present.iter().any(|p| p.bench == bench) {
                return None;
            }
            let value = f["value"].as_f64()?;
            let peer = f["peer"]
                .as_str()
                .zip(f["peer_value"].as_f64())
                .map(|(n, v)| (n.to_string(), v));
            // The ratio says which way is better: value / peer when more is.
            let higher_is_better = match (&peer, f["ratio_above_1_is_better_for_us"].as_f64()) {
                (Some((_, pv)), Some(r)) if *pv != 0.0 => (r - value / pv).abs() < 1e-9,
                _ => true,
            };
            let command = f["command"].as_str().unwrap_or("?");
            Some(Figure {
                bench: leak(bench),
                name: f["name"].as_str()?.to_string(),
                value,
                unit: leak(f["unit"].as_str()?),
                peer,
                higher_is_better,
                // Marked once, with the date of the run that measured it.
                command: if command.contains("(carried over from the report of ") {
                    command.to_string()
                } else {
                    format!("{command} (carried over from the report of {date})")
                },
            })
        })
        .collect()
}

fn register_font() -> anyhow::Result<()> {
    let bytes = std::fs::read(FONT).with_context(|| {
        format!("{FONT} is missing: apt-get install fonts-dejavu-core (cargo xtask bench does)")
    })?;
    // plotters keeps fonts for the process's life.
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| anyhow::anyhow!("{FONT} is not a font plotters can read"))
}

fn fmt(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if v >= 1000.0 {
        let s = format!("{:.0}", v);
        let mut out = String::new();
        for (i, c) in s.chars().enumerate() {
            if i > 0 && (s.len() - i) % 3 == 0 {
                out.push(',');
            }
            out.push(c);
        }
        out
    } else if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn markdown(figures: &[Figure], machine: &Value, date: &str, charts: &[(String, Chart)]) -> String {
    let mut md = String::new();
    md.push_str("# Benchmark report\n\n");
    md.push_str(&format!(
        "Made by `cargo xtask bench` on {date}, at commit `{}`. Machine: {}, {} cores, {} GiB, {}, kernel {}, {}.\n\n",
        machine["commit"].as_str().unwrap_or("?"),
        machine["cpu"].as_str().unwrap_or("?"),
        machine["cores"],
        machine["memory_gib"],
        machine["os"].as_str().unwrap_or("?"),
        machine["kernel"].as_str().unwrap_or("?"),
        machine["rustc"].as_str().unwrap_or("?"),
    ));
    md.push_str(
        "Each benchmark runs its peer side by side, in the same run and on the same machine (alternating rounds, medians). Compare the **ratios**: the machines are shared and noisy. A ratio above 1 means we do better (for times and memory, that is the peer's value over ours).\n\n",
    );
    let sections = [
        (
            "inference",
            "Inference: our runtime against llama.cpp (same model, prompt token ids and threads)",
        ),
        (
            "log",
            "Usage log: durable, signed appends against the disk's own fdatasync rate",
        ),
        (
            "api",
            "MEC API: metering on against metering off, and rated against not rated",
        ),
        (
            "sync",
            "Sync: the upload into core-ingest over loopback QUIC",
        ),
        (
            "grants",
            "Grants: packages sold at the core reaching boxes (simulated boxes over loopback QUIC)",
        ),
        (
            "structured",
            "Structured output: a JSON Schema's cost, llguidance against llama.cpp's GBNF",
        ),
        (
            "models",
            "Several models: load, unload, and the first request on a cold model against a warm one",
        ),
    ];
    for (bench, title) in sections {
        let rows: Vec<&Figure> = figures.iter().filter(|f| f.bench == bench).collect();
        if rows.is_empty() {
            continue;
        }
        md.push_str(&format!("## {title}\n\n"));
        md.push_str("| figure | ours | peer | peer's value | ratio |\n|---|---:|---|---:|---:|\n");
        for f in &rows {
            let (peer, pv) = match &f.peer {
                Some((n, v)) => (n.clone(), format!("{} {}", fmt(*v), f.unit)),
                None => ("—".into(), "—".into()),
            };
            md.push_str(&format!(
                "| {} | {} {} | {} | {} | {} |\n",
                f.name,
                fmt(f.value),
                f.unit,
                peer,
                pv,
                f.ratio().map_or("—".into(), |r| format!("{r:.2}×")),
            ));
        }
        md.push_str(&format!("\nCommand: `{}`.\n\n", rows[0].command));
        for (file, chart) in charts.iter().filter(|(_, c)| c.bench == bench) {
            md.push_str(&format!("![{}](charts/{file})\n\n", chart.title));
        }
    }
    for (file, chart) in charts.iter().filter(|(_, c)| c.bench == "all") {
        md.push_str(&format!(
            "## All ratios\n\n![{}](charts/{file})\n",
            chart.title
        ));
    }
    md
}

/// A horizontal bar chart: one bar per row.
#[derive(Debug, Clone)]
pub struct Chart {
    bench: &'static str,
    title: String,
    unit: String,
    rows: Vec<(String, f64, RGBColor)>,
    /// A vertical reference line (1.0 on the ratio chart).
    reference: Option<f64>,
}

const OURS: RGBColor = RGBColor(31, 119, 180);
const PEER: RGBColor = RGBColor(190, 190, 190);
const BETTER: RGBColor = RGBColor(44, 160, 44);
const WORSE: RGBColor = RGBColor(214, 39, 40);

fn charts(figures: &[Figure]) -> Vec<(String, Chart)> {
    let mut out = Vec::new();
    let pair_rows = |bench: &str, unit: &str| -> Vec<(String, f64, RGBColor)> {
        let mut rows = Vec::new();
        for f in figures
            .iter()
            .filter(|f| f.bench == bench && f.unit == unit)
        {
            rows.push((format!("{} — ours", f.name), f.value, OURS));
            if let Some((n, v)) = &f.peer {
                rows.push((format!("{} — {n}", f.name), *v, PEER));
            }
        }
        rows
    };
    let mut add = |file: &str,
                   bench: &'static str,
                   title: &str,
                   unit: &str,
                   rows: Vec<(String, f64, RGBColor)>| {
        if !rows.is_empty() {
            out.push((
                file.to_string(),
                Chart {
                    bench,
                    title: title.into(),
                    unit: unit.into(),
                    rows,
                    reference: None,
                },
            ));
        }
    };
    add(
        "inference-throughput.png",
        "inference",
        "Inference throughput: ours vs llama.cpp",
        "tokens/s",
        pair_rows("inference", "tokens/s"),
    );
    add(
        "inference-latency.png",
        "inference",
        "Time to first token: ours vs llama.cpp (lower is better)",
        "ms",
        pair_rows("inference", "ms"),
    );
    // The log: every run against one fdatasync bar.
    let mut log_rows: Vec<(String, f64, RGBColor)> = figures
        .iter()
        .filter(|f| f.bench == "log")
        .map(|f| (f.name.replace("durable appends, ", ""), f.value, OURS))
        .collect();
    if let Some((n, v)) = figures
        .iter()
        .find(|f| f.bench == "log")
        .and_then(|f| f.peer.clone())
    {
        log_rows.push((n, v, PEER));
    }
    add(
        "log-appends.png",
        "log",
        "Durable signed appends vs the disk's fdatasync rate",
        "records/s",
        log_rows,
    );
    add(
        "structured-decode.png",
        "structured",
        "Decode with and without a JSON Schema: ours vs llama.cpp",
        "tokens/s",
        pair_rows("structured", "tokens/s"),
    );
    add(
        "api-metering.png",
        "api",
        "MEC API throughput, metering on vs off",
        "requests/s",
        pair_rows("api", "requests/s"),
    );
    add(
        "sync-upload.png",
        "sync",
        "Upload into core-ingest vs its peers",
        "records/s",
        pair_rows("sync", "records/s"),
    );
    let ratio_rows: Vec<(String, f64, RGBColor)> = figures
        .iter()
        .filter_map(|f| {
            let r = f.ratio()?;
            let peer = &f.peer.as_ref()?.0;
            Some((
                format!("{} vs {peer}", f.name),
                r,
                if r >= 1.0 { BETTER } else { WORSE },
            ))
        })
        .collect();
    if !ratio_rows.is_empty() {
        out.push((
            "ratios.png".into(),
            Chart {
                bench: "all",
                title: "Every ratio (above 1: we do better)".into(),
                unit: "ratio".into(),
                rows: ratio_rows,
                reference: Some(1.0),
            },
        ));
    }
    out
}

/// A bar from `a` to `b` filling row `row`, with a little air above and below.
fn bar(a: f64, b: f64, row: usize, color: RGBColor) -> Rectangle<(f64, SegmentValue<usize>)> {
    let mut bar = Rectangle::new(
        [
            (a, SegmentValue::Exact(row)),
            (b, SegmentValue::Exact(row + 1)),
        ],
        color.filled(),
    );
    bar.set_margin(5, 5, 0, 0);
    bar
}

fn draw(path: &Path, chart: &Chart) -> anyhow::Result<()> {
    let n = chart.rows.len();
    let height = 110 + 34 * n as u32;
    let root = BitMapBackend::new(path, (1200, height)).into_drawing_area();
    root.fill(&WHITE)?;
    // The first row at the top (the y axis grows upwards).
    let at = |i: usize| n - 1 - i;
    let labels: Vec<String> = chart.rows.iter().rev().map(|r| r.0.clone()).collect();
    let label = |v: &SegmentValue<usize>| match v {
        SegmentValue::CenterOf(i) => labels.get(*i).cloned().unwrap_or_default(),
        _ => String::new(),
    };
    let value_text = |v: f64| {
        if chart.unit == "ratio" {
            format!("{v:.2}×")
        } else {
            fmt(v)
        }
    };
    let text_style = ("sans-serif", 14).into_font().color(&BLACK);
    let caption = ("sans-serif", 22);
    if let Some(reference) = chart.reference {
        // Ratios on a log scale: 2× better and 2× worse are as long.
        let lo = chart.rows.iter().map(|r| r.1).fold(reference, f64::min) / 1.6;
        let hi = chart.rows.iter().map(|r| r.1).fold(reference, f64::max) * 1.6;
        let mut c = ChartBuilder::on(&root)
            .caption(&chart.title, caption)
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(480)
            .build_cartesian_2d((lo..hi).log_scale(), (0..n).into_segmented())?;
        c.configure_mesh()
            .disable_y_mesh()
            .y_labels(n)
            .y_label_formatter(&label)
            .y_label_style(("sans-serif", 14))
            .x_desc("ratio, log scale (above 1: we do better)")
            .x_label_formatter(&|v| {
                // Only 1, 2 and 5 of each decade: the others crowd.
                let m = v / 10f64.powf(v.log10().floor());
                if [1.0, 2.0, 5.0].iter().any(|k| (m - k).abs() < 0.05) {
                    format!("{v}×")
                } else {
                    String::new()
                }
            })
            .x_label_style(("sans-serif", 13))
            .draw()?;
        c.draw_series(chart.rows.iter().enumerate().map(|(i, (_, v, color))| {
            let (a, b) = if *v >= reference {
                (reference, *v)
            } else {
                (*v, reference)
            };
            bar(a, b, at(i), *color)
        }))?;
        c.draw_series(chart.rows.iter().enumerate().map(|(i, (_, v, _))| {
            Text::new(
                value_text(*v),
                (v.max(reference) * 1.02, SegmentValue::CenterOf(at(i))),
                text_style.clone(),
            )
        }))?;
        c.draw_series(std::iter::once(PathElement::new(
            vec![
                (reference, SegmentValue::Exact(0)),
                (reference, SegmentValue::Last),
            ],
            BLACK.stroke_width(2),
        )))?;
    } else {
        let max = chart
            .rows
            .iter()
            .map(|r| r.1)
            .fold(f64::MIN_POSITIVE, f64::max);
        let mut c = ChartBuilder::on(&root)
            .caption(&chart.title, caption)
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(480)
            .build_cartesian_2d(0.0..max * 1.18, (0..n).into_segmented())?;
        c.configure_mesh()
            .disable_y_mesh()
            .y_labels(n)
            .y_label_formatter(&label)
            .y_label_style(("sans-serif", 14))
            .x_desc(chart.unit.as_str())
            .x_label_formatter(&|v| fmt(*v))
            .x_label_style(("sans-serif", 13))
            .draw()?;
        c.draw_series(
            chart
                .rows
                .iter()
                .enumerate()
                .map(|(i, (_, v, color))| bar(0.0, *v, at(i), *color)),
        )?;
        c.draw_series(chart.rows.iter().enumerate().map(|(i, (_, v, _))| {
            Text::new(
                value_text(*v),
                (*v + max * 0.01, SegmentValue::CenterOf(at(i))),
                text_style.clone(),
            )
        }))?;
    }
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(dir: &Path) {
        let out = dir.join("out");
        std::fs::create_dir_all(&out).unwrap();
        let pair = |o: f64, l: f64| json!({ "ours": o, "llama_cpp": l });
        std::fs::write(
            out.join("inference-bench.json"),
            json!({
                "command": "cargo xtask bench-inference", "rounds": 3, "threads": 2, "decode_tokens": 128,
                "summary": {
                    "decode_tokens_per_s": pair(132.0, 114.0),
                    "aggregate_4_tokens_per_s": pair(220.0, 174.0),
                    "prefill_tokens_per_s": pair(279.0, 269.0),
                    "ttft_ms": pair(728.0, 740.0),
                    "cached_ttft_ms": pair(16.7, 9.6),
                    "peak_rss_mb": pair(217.0, 307.0),
                }
            })
            .to_string(),
        )
        .unwrap();
        std::fs::write(
            out.join("log-bench.json"),
            json!({
                "command": "cargo xtask bench-log",
                "baselines": { "fdatasync_per_s": 4660.0 },
                "runs": [
                    { "backend": "uring", "concurrency": 1, "records_per_s": 2371.0 },
                    { "backend": "uring", "concurrency": 256, "records_per_s": 59366.0 },
                ]
            })
            .to_string(),
        )
        .unwrap();
        std::fs::write(
            out.join("sync-bench.json"),
            json!({ "command": "cargo xtask bench-sync", "records": 1000000,
                    "upload": { "records_per_s": 60826.0 },
                    "verify_ceiling_per_s": 160000.0,
                    "matrix": [
                        { "store": "sqlite", "instances": 1, "nodes": 10, "records_per_s": 50000.0 },
                        { "store": "postgres", "instances": 1, "nodes": 10, "records_per_s": 45000.0 },
                        { "store": "postgres", "instances": 2, "nodes": 10, "records_per_s": 47000.0 },
                    ] })
            .to_string(),
        )
        .unwrap();
        std::fs::write(
            out.join("grants-bench.json"),
            json!({ "command": "cargo xtask bench-grants", "boxes": 100,
                    "stores": [
                        { "store": "sqlite", "boxes": 100, "grants_per_s": 1000.0,
                          "round_trip_ms": { "p50": 1.5, "p99": 3.0 },
                          "revocation_ms": { "p50": 240.0, "p99": 300.0 } },
                        { "store": "postgres", "boxes": 100, "grants_per_s": 500.0,
                          "round_trip_ms": { "p50": 5.0, "p99": 12.0 },
                          "revocation_ms": { "p50": 240.0, "p99": 250.0 } },
                    ] })
            .to_string(),
        )
        .unwrap();
    }

    #[test]
    fn figures_carry_their_peer_and_a_ratio_oriented_so_above_1_is_better() {
        let dir = tempfile::tempdir().unwrap();
        fixture(dir.path());
        let f = figures(&dir.path().join("out"));
        let decode = f.iter().find(|f| f.name == "decode, 1 stream").unwrap();
        assert!((decode.ratio().unwrap() - 132.0 / 114.0).abs() < 1e-9);
        let cached = f.iter().find(|f| f.name.contains("cached prefix")).unwrap();
        assert!((cached.ratio().unwrap() - 9.6 / 16.7).abs() < 1e-9);
        let log = f.iter().filter(|f| f.bench == "log").count();
        assert_eq!(log, 2);
        // The upload goal, 3 scenarios against the ceiling, 1 against SQLite.
        assert_eq!(f.iter().filter(|f| f.bench == "sync").count(), 5);
        let pg = f
            .iter()
            .find(|f| f.name == "postgres, 1 instance, 10 nodes: against SQLite")
            .unwrap();
        assert!((pg.ratio().unwrap() - 0.9).abs() < 1e-9);
        // Per store: grants/s, and p50 and p99 of the round trip and of a
        // revocation; PostgreSQL's rate against SQLite's.
        assert_eq!(f.iter().filter(|f| f.bench == "grants").count(), 10);
        let pg = f
            .iter()
            .find(|f| f.name == "postgres: grants with 100 boxes asking at once")
            .unwrap();
        assert!((pg.ratio().unwrap() - 0.5).abs() < 1e-9);
        // No API benchmark output: no API figure, none invented.
        assert!(f.iter().all(|f| f.bench != "api"));
    }

    #[test]
    fn a_benchmark_run_alone_keeps_the_other_sections_of_the_previous_report() {
        let dir = tempfile::tempdir().unwrap();
        fixture(dir.path());
        let machine = json!({ "cpu": "test cpu", "cores": 2, "commit": "abc1234" });
        write(dir.path(), &machine, "2026-11-23").unwrap();
        // Only the grants benchmark ran again.
        for f in std::fs::read_dir(dir.path().join("out")).unwrap() {
            let f = f.unwrap().path();
            if !f.ends_with("grants-bench.json") {
                std::fs::remove_file(f).unwrap();
            }
        }
        write(dir.path(), &machine, "2026-12-01").unwrap();
        let md = std::fs::read_to_string(dir.path().join("report.md")).unwrap();
        assert!(
            md.contains("| decode, 1 stream | 132 tokens/s | llama.cpp | 114 tokens/s | 1.16× |"),
            "{md}"
        );
        assert!(
            md.contains("(carried over from the report of 2026-11-23)"),
            "{md}"
        );
        assert!(md.contains("## Grants"), "{md}");
        let grants = md.split("## Grants").nth(1).unwrap();
        assert!(!grants.contains("carried over"), "{md}");
    }

    #[test]
    fn the_report_renders_readable_charts_and_a_table() {
        if !Path::new(FONT).exists() {
            panic!("{FONT} is missing: apt-get install fonts-dejavu-core");
        }
        let dir = tempfile::tempdir().unwrap();
        fixture(dir.path());
        let machine = json!({ "cpu": "test cpu", "cores": 2, "commit": "abc1234" });
        let written = write(dir.path(), &machine, "2026-11-23").unwrap();
        let md = std::fs::read_to_string(dir.path().join("report.md")).unwrap();
        assert!(
            md.contains("| decode, 1 stream | 132 tokens/s | llama.cpp | 114 tokens/s | 1.16× |"),
            "{md}"
        );
        assert!(md.contains("![Inference throughput"), "{md}");
        let report: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join("report.json")).unwrap())
                .unwrap();
        assert_eq!(report["machine"]["cpu"], "test cpu");
        let pngs: Vec<&PathBuf> = written
            .iter()
            .filter(|p| p.extension().is_some_and(|e| e == "png"))
            .collect();
        assert!(pngs.len() >= 4, "{written:?}");
        for p in pngs {
            let img = image::open(p).unwrap().to_rgb8();
            assert_eq!(img.width(), 1200, "{}", p.display());
            // Text is drawn: many pixels are dark (black labels), bars are
            // coloured, and the rest is white.
            let dark = img
                .pixels()
                .filter(|px| px.0.iter().all(|&c| c < 80))
                .count();
            let colored = img
                .pixels()
                .filter(|px| {
                    px.0 == [OURS.0, OURS.1, OURS.2]
                        || px.0 == [BETTER.0, BETTER.1, BETTER.2]
                        || px.0 == [WORSE.0, WORSE.1, WORSE.2]
                })
                .count();
            assert!(dark > 2000, "{}: {dark} dark pixels: no text?", p.display());
            assert!(colored > 2000, "{}: {colored} bar pixels", p.display());
        }
    }
}
