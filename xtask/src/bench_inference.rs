//! `cargo xtask bench-inference`: our engine beside llama.cpp, same GGUF file,
//! same prompt token ids, same thread count, in alternating rounds (these
//! machines are noisy, so each figure is the median of its rounds and the
//! report gives ratios). llama.cpp comes from llama-cpp-python, installed
//! into bench/venv by this command (it builds llama.cpp from source the
//! first time: minutes).

use std::path::Path;
use std::process::Command;

use anyhow::Context;
use serde_json::{json, Value};

use crate::{output, release_agent, root, run};

/// The peer's version, pinned.
const LLAMA_CPP_PYTHON: &str = "llama-cpp-python==0.3.36";

/// Figures compared, and whether more is better.
const METRICS: [(&str, bool); 6] = [
    ("prefill_tokens_per_s", true),
    ("ttft_ms", false),
    ("cached_ttft_ms", false),
    ("decode_tokens_per_s", true),
    ("aggregate_4_tokens_per_s", true),
    ("peak_rss_mb", false),
];

/// bench/venv's python with llama-cpp-python, installed on first use.
pub(crate) fn venv_python(root: &Path) -> anyhow::Result<std::path::PathBuf> {
    let venv = root.join("bench/venv");
    let python = venv.join("bin/python");
    let ready = python.exists()
        && Command::new(&python)
            .args(["-c", "import llama_cpp, numpy"])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
    if !ready {
        eprintln!(
            "installing {LLAMA_CPP_PYTHON} into {} (builds llama.cpp: minutes)",
            venv.display()
        );
        run(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
        run(Command::new(&python).args(["-m", "pip", "install", "-q", LLAMA_CPP_PYTHON, "numpy"]))?;
    }
    Ok(python)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Runs `rounds` alternating rounds and writes bench/out/inference-bench.json.
pub fn bench(rounds: usize, threads: usize, decode_tokens: usize) -> anyhow::Result<()> {
    let root = root();
    let model = crate::model::ensure(&root)?;
    let agent = release_agent()?;
    let python = venv_python(&root)?;
    let out = root.join("bench/out");
    std::fs::create_dir_all(&out)?;
    let prompts = out.join("inference-prompts.json");
    let script = root.join("bench/llamacpp_bench.py");
    let (threads_s, decode_s) = (threads.to_string(), decode_tokens.to_string());

    let mut ours: Vec<Value> = Vec::new();
    let mut theirs: Vec<Value> = Vec::new();
    for round in 1..=rounds {
        eprintln!("round {round}/{rounds}: mec-inference");
        let o = output(
            Command::new(&agent)
                .args([
                    "bench-inference",
                    "--threads",
                    &threads_s,
                    "--decode-tokens",
                    &decode_s,
                ])
                .arg("--model")
                .arg(&model)
                .arg("--prompts-out")
                .arg(&prompts),
        )?;
        ours.push(serde_json::from_str(o.trim()).context("our bench's JSON")?);
        eprintln!("round {round}/{rounds}: llama.cpp");
        let t = output(
            Command::new(&python)
                .arg(&script)
                .arg(&model)
                .arg(&prompts)
                .args([&threads_s, &decode_s]),
        )?;
        theirs.push(serde_json::from_str(t.trim()).context("llama.cpp bench's JSON")?);
    }

    let mut summary = serde_json::Map::new();
    println!(
        "{:<26} {:>14} {:>14} {:>8}",
        "median of rounds", "mec-inference", "llama.cpp", "ratio"
    );
    for (name, higher_is_better) in METRICS {
        let pick =
            |runs: &[Value]| -> Vec<f64> { runs.iter().filter_map(|r| r[name].as_f64()).collect() };
        let (a, b) = (median(pick(&ours)), median(pick(&theirs)));
        // Ratios read "how many times llama.cpp's figure we reach": above 1
        // is better for us, whichever way the metric points.
        let ratio = if higher_is_better { a / b } else { b / a };
        println!("{name:<26} {a:>14.1} {b:>14.1} {ratio:>8.2}");
        summary.insert(
            name.into(),
            json!({ "ours": a, "llama_cpp": b, "ratio_ours_better_above_1": ratio }),
        );
    }
    let cut = |runs: &[Value]| {
        median(
            runs.iter()
                .filter_map(|r| Some(r["ttft_ms"].as_f64()? / r["cached_ttft_ms"].as_f64()?))
                .collect(),
        )
    };
    let (our_cut, their_cut) = (cut(&ours), cut(&theirs));
    println!("prefix-cache TTFT cut      {our_cut:>13.1}x {their_cut:>13.1}x");
    let aggregate_gain = median(
        ours.iter()
            .filter_map(|r| {
                Some(r["aggregate_4_tokens_per_s"].as_f64()? / r["decode_tokens_per_s"].as_f64()?)
            })
            .collect(),
    );
    println!("4 streams / 1 stream (ours) {aggregate_gain:>12.2}x");
    let report = json!({
        "command": "cargo xtask bench-inference",
        "model": model.file_name().map(|f| f.to_string_lossy().into_owned()),
        "threads": threads,
        "decode_tokens": decode_tokens,
        "rounds": rounds,
        "machine": {
            "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            "arch": std::env::consts::ARCH,
        },
        "summary": summary,
        "prefix_cache_ttft_cut": { "ours": our_cut, "llama_cpp": their_cut },
        "aggregate_4_over_single_ours": aggregate_gain,
        "runs": { "mec_inference": ours, "llama_cpp": theirs },
    });
    let path = out.join("inference-bench.json");
    std::fs::write(&path, serde_json::to_string_pretty(&report)?)?;
    println!("wrote {}", path.display());
    Ok(())
}

/// Remakes llama.cpp's figures for the agreement text
/// (inference/src/agreement/llamacpp.json): its tokens, the token it ranks
/// first after each, and its perplexity (bench/agreement_reference.py).
pub fn agreement_reference() -> anyhow::Result<()> {
    let root = root();
    let model = crate::model::ensure(&root)?;
    let python = venv_python(&root)?;
    let dir = root.join("inference/src/agreement");
    run(Command::new(python)
        .arg(root.join("bench/agreement_reference.py"))
        .arg(&model)
        .arg(dir.join("text.txt"))
        .arg(dir.join("llamacpp.json"))
        .arg("2"))
}
