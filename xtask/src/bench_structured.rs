//! `cargo xtask bench-structured`: what structured output costs (issue 24),
//! ours beside llama.cpp (llama-cpp-python in bench/venv: a GBNF grammar
//! made from the schema) on the same GGUF file, prompt ids, schemas and
//! thread count. Each side alternates free and constrained runs itself and
//! reports medians; this runs them one after the other and writes
//! bench/out/structured-bench.json.

use std::process::Command;

use anyhow::Context;
use serde_json::{json, Value};

use crate::{output, release_agent, root};

/// Runs both sides and writes the report.
pub fn bench(rounds: usize, threads: usize, decode_tokens: usize) -> anyhow::Result<()> {
    let root = root();
    let model = crate::model::ensure(&root)?;
    let agent = release_agent()?;
    let python = crate::bench_inference::venv_python(&root)?;
    let out = root.join("bench/out");
    std::fs::create_dir_all(&out)?;
    let inputs = out.join("structured-inputs.json");
    let (rounds_s, threads_s, decode_s) = (
        rounds.to_string(),
        threads.to_string(),
        decode_tokens.to_string(),
    );
    eprintln!("mec-inference: {rounds} rounds");
    let ours: Value = serde_json::from_str(&output(
        Command::new(&agent)
            .args(["bench-constraint", "--threads", &threads_s])
            .args(["--decode-tokens", &decode_s, "--rounds", &rounds_s])
            .arg("--model")
            .arg(&model)
            .arg("--inputs-out")
            .arg(&inputs),
    )?)
    .context("bench-constraint's JSON")?;
    eprintln!("llama.cpp: {rounds} rounds");
    let theirs: Value = serde_json::from_str(&output(
        Command::new(&python)
            .arg(root.join("bench/llamacpp_structured.py"))
            .arg(&model)
            .arg(&inputs)
            .args([&threads_s, &decode_s, &rounds_s]),
    )?)
    .context("llamacpp_structured.py's JSON")?;
    let f = |v: &Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    println!(
        "{:<34} {:>14} {:>14}",
        "median of rounds", "mec-inference", "llama.cpp"
    );
    for k in [
        "decode_tokens_per_s_free",
        "decode_tokens_per_s_constrained",
        "constrained_over_free",
        "constraint_us_per_token",
        "ttft_ms_free",
        "ttft_ms_large_schema",
        "large_schema_compile_ms",
    ] {
        println!("{k:<34} {:>14.2} {:>14.2}", f(&ours, k), f(&theirs, k));
    }
    let report = json!({
        "command": "cargo xtask bench-structured",
        "model": model.file_name().map(|f| f.to_string_lossy().into_owned()),
        "threads": threads,
        "rounds": rounds,
        "decode_tokens": decode_tokens,
        "ours": ours,
        "llama_cpp": theirs,
    });
    let path = out.join("structured-bench.json");
    std::fs::write(&path, serde_json::to_string_pretty(&report)?)?;
    println!("wrote {}", path.display());
    Ok(())
}
