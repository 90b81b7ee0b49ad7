//! The GPU path, as a technician checks it on a real box and CI checks it
//! without a driver.
//!
//! - `greedy_prompts_give_the_same_text_on_the_gpu_as_on_the_cpu`: the CUDA
//!   build runs the same greedy prompts on GPU 0 and on the CPU; prompt token
//!   counts and texts must be the same. Prints decode tokens/s on both and the
//!   GPU memory in use. Where there is no GPU (no `/dev/nvidia0`), or no CUDA
//!   build, it says so and checks nothing.
//! - `the_cuda_build_without_a_driver_serves_on_the_cpu` (ignored; `cargo
//!   xtask build-cuda --test` runs it): the CUDA build, with the CUDA
//!   libraries but no driver (the stubs of `cargo xtask build-cuda`), starts,
//!   serves a chat on the CPU and says why in `/readyz`; with a library
//!   missing, its launcher names it and points at the CPU build.
//!
//! The CUDA build is `target/cuda/edge-agent-cuda` (the launcher, with
//! `edge-agent-cuda.bin` beside it), or where `MEC_CUDA_AGENT` points.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use hil_tests::procs::{free_port, model_path, run_json, workspace, Proc};
use hil_tests::stack::LocalAgent;
use serde_json::Value;

/// The prompts, greedy, at most this many tokens each.
const PROMPTS: [&str; 3] = [
    "What is the capital of France?",
    "Write a haiku about a cell tower.",
    "List three prime numbers.",
];
const MAX_TOKENS: &str = "24";

fn cuda_agent() -> Option<PathBuf> {
    let path = std::env::var_os("MEC_CUDA_AGENT")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target/cuda/edge-agent-cuda"));
    path.exists().then_some(path)
}

fn generate(agent: &Path, prompt: &str, device: &str) -> (i32, Value) {
    run_json(
        Command::new(agent)
            .args(["generate", "--json", "--max-tokens", MAX_TOKENS])
            .args(["--prompt", prompt, "--device", device])
            .arg("--model")
            .arg(model_path()),
    )
}

#[test]
fn greedy_prompts_give_the_same_text_on_the_gpu_as_on_the_cpu() {
    let gpu_here = Path::new("/dev/nvidia0").exists();
    let Some(agent) = cuda_agent() else {
        assert!(
            !gpu_here,
            "this box has a GPU and no CUDA build: run `cargo xtask build-cuda` first"
        );
        eprintln!(
            "SKIPPED: no GPU here (no /dev/nvidia0) and no CUDA build (cargo xtask build-cuda)"
        );
        return;
    };
    if !gpu_here {
        eprintln!(
            "SKIPPED: no GPU here (no /dev/nvidia0); the CUDA build at {} is checked without \
             a driver by the_cuda_build_without_a_driver_serves_on_the_cpu",
            agent.display()
        );
        return;
    }
    let mut report = Vec::new();
    for prompt in PROMPTS {
        let (code, gpu) = generate(&agent, prompt, "0");
        assert_eq!(code, 0, "on the GPU: {gpu}");
        assert_eq!(
            gpu["device"]["kind"], "cuda",
            "a GPU is here but the model ran on the CPU: {}",
            gpu["device"]
        );
        let (code, cpu) = generate(&agent, prompt, "cpu");
        assert_eq!(code, 0, "on the CPU: {cpu}");
        assert_eq!(cpu["prompt_tokens"], gpu["prompt_tokens"], "{prompt}");
        let (g, c) = (gpu["text"].as_str().unwrap(), cpu["text"].as_str().unwrap());
        let same = g.chars().zip(c.chars()).take_while(|(a, b)| a == b).count();
        assert_eq!(
            g, c,
            "{prompt:?}: the GPU's greedy text differs from the CPU's after {same} characters"
        );
        assert_eq!(
            cpu["completion_tokens"], gpu["completion_tokens"],
            "{prompt}"
        );
        report.push(format!(
            "{prompt:?}: {} + {} tokens; decode {:.1} tokens/s on the GPU, {:.1} on the CPU; \
             GPU memory in use {:.0} MiB",
            gpu["prompt_tokens"],
            gpu["completion_tokens"],
            gpu["decode_tokens_per_s"].as_f64().unwrap_or(0.0),
            cpu["decode_tokens_per_s"].as_f64().unwrap_or(0.0),
            gpu["gpu_memory_used_bytes"].as_f64().unwrap_or(0.0) / (1 << 20) as f64,
        ));
    }
    eprintln!("GPU scenario:\n  {}", report.join("\n  "));
}

#[test]
#[ignore = "needs the CUDA build and its stub libraries: cargo xtask build-cuda --test"]
fn the_cuda_build_without_a_driver_serves_on_the_cpu() {
    let agent = cuda_agent().expect("no CUDA build: run cargo xtask build-cuda");
    let stubs = std::env::var_os("MEC_CUDA_NO_DRIVER_LIBS")
        .expect("MEC_CUDA_NO_DRIVER_LIBS names the stub libraries (cargo xtask build-cuda --test)");

    // Without the libraries: the launcher says which and what to run instead.
    let out = Command::new(&agent)
        .args(["generate", "--prompt", "hi"])
        .env("LD_LIBRARY_PATH", "/nonexistent")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(69), "{stderr}");
    assert!(
        stderr.contains("libcuda.so.1 is missing: the NVIDIA driver's library"),
        "{stderr}"
    );
    assert!(
        stderr.contains("run the CPU build instead: edge-agent generate --prompt hi"),
        "{stderr}"
    );
    assert!(!stderr.contains("error while loading"), "{stderr}");

    // With the libraries and no driver: it serves on the CPU and says why.
    let dir = tempfile::tempdir().unwrap();
    let loopback = |port| SocketAddr::from(([127, 0, 0, 1], port));
    let (api, admin) = (loopback(free_port(false)), loopback(free_port(false)));
    let agent_dir = dir.path().join("agent");
    let local = LocalAgent::init(&agent_dir, api, admin, "");
    let mut serve = Command::new(&agent);
    serve
        .args(["serve", "--config"])
        .arg(&local.config)
        .env("LD_LIBRARY_PATH", &stubs)
        .env("RUST_LOG", "info");
    let log = dir.path().join("serve.log");
    let (proc, ready_line) =
        Proc::start_ready("edge-agent-cuda", serve, &log, Duration::from_secs(120));

    let http = reqwest::blocking::Client::new();
    let imsi = "001010000000001";
    let admin_token =
        std::fs::read_to_string(ready_line["admin_token_file"].as_str().unwrap()).unwrap();
    let granted = http
        .post(format!("http://{admin}/admin/v1/grants"))
        .bearer_auth(admin_token.trim())
        .json(
            &serde_json::json!({ "imsi": imsi, "tokens": 1000, "kind": "topup", "valid_days": 30 }),
        )
        .send()
        .unwrap();
    assert_eq!(granted.status(), 201);
    let ready: Value = http
        .get(format!("http://{api}/readyz"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(ready["status"], "ready", "{ready}");
    assert_eq!(ready["device"]["kind"], "cpu", "{ready}");
    let reason = ready["device"]["reason"].as_str().unwrap_or("");
    // No libnvidia-ml here either: discovery finds no GPU and says why.
    assert!(reason.contains("NVML is not available"), "{ready}");

    let answer: Value = http
        .post(format!("http://{api}/v1/chat/completions"))
        .bearer_auth(&local.app_key)
        .header("X-Subscriber-Imsi", imsi)
        .json(&serde_json::json!({
            "model": ready_line["model"],
            "messages": [{"role": "user", "content": "Say hello."}],
            "max_tokens": 8,
        }))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert!(
        answer["usage"]["completion_tokens"].as_u64().unwrap_or(0) > 0,
        "{answer}\n{}",
        proc.log_tail(20)
    );
    let metrics = http
        .get(format!("http://{api}/metrics"))
        .send()
        .unwrap()
        .text()
        .unwrap();
    assert!(
        metrics.contains("mec_inference_device{kind=\"cpu\",gpu=\"\"} 1"),
        "{metrics}"
    );
    // Asked for GPU 0 by name (generate --device 0), the agent opens it
    // through the stub driver, whose cuInit refuses: it falls back to the CPU
    // with the reason, and still answers.
    let (code, out) = Command::new(&agent)
        .env("LD_LIBRARY_PATH", &stubs)
        .args([
            "generate",
            "--json",
            "--max-tokens",
            "4",
            "--prompt",
            "hi",
            "--device",
            "0",
        ])
        .arg("--model")
        .arg(model_path())
        .output()
        .map(|o| {
            (
                o.status.code(),
                String::from_utf8_lossy(&o.stdout).to_string(),
            )
        })
        .unwrap();
    assert_eq!(code, Some(0), "{out}");
    let out: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(out["device"]["kind"], "cpu", "{out}");
    let reason = out["device"]["reason"].as_str().unwrap_or("");
    assert!(
        reason.starts_with("GPU 0: cannot open the CUDA device"),
        "{out}"
    );
    assert!(out["completion_tokens"].as_u64().unwrap_or(0) > 0, "{out}");
    drop(proc);
}
