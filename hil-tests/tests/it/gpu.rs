//! The GPU path, as a technician checks it on a real box and CI checks it
//! without a driver.
//!
//! - `the_tensor_path_agrees_with_the_cpu_and_llama_cpp`: `edge-agent
//!   gpu-check` teacher-forces a fixed text through the tensor path (the
//!   GPU's code) and the native CPU path and compares them with each other
//!   and with llama.cpp's figures (top-1 agreement, largest logit
//!   difference, perplexity; see `mec_inference::agreement`). Here with the
//!   CPU build, on candle's CPU backend; on a box with a GPU and the CUDA
//!   build, also on GPU 0. Greedy text is not compared: one near-tie that
//!   rounds the other way on another backend changes every token after it.
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

use hil_tests::procs::{bin, free_port, model_path, run_json, workspace, Proc};
use hil_tests::stack::LocalAgent;
use serde_json::Value;

fn cuda_agent() -> Option<PathBuf> {
    let path = std::env::var_os("MEC_CUDA_AGENT")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target/cuda/edge-agent-cuda"));
    path.exists().then_some(path)
}

/// `agent gpu-check --json --device DEVICE` on the default model: its exit
/// code and report.
fn gpu_check(agent: &Path, device: &str, libs: Option<&std::ffi::OsStr>) -> (i32, Value) {
    let mut cmd = Command::new(agent);
    cmd.args(["gpu-check", "--json", "--device", device])
        .arg("--model")
        .arg(model_path());
    if let Some(libs) = libs {
        cmd.env("LD_LIBRARY_PATH", libs);
    }
    run_json(&mut cmd)
}

/// What every passing report shows: all three comparisons made, within
/// the tolerance, and a batch whose twins agree exactly.
fn assert_agrees(report: &Value) {
    assert_eq!(report["pass"], true, "{report}");
    assert_eq!(report["failures"], serde_json::json!([]), "{report}");
    let tol = &report["tolerance"];
    for key in ["against_cpu", "against_llama_cpp", "cpu_against_llama_cpp"] {
        let a = &report[key];
        assert!(
            a["positions"].as_u64().unwrap_or(0) > 250,
            "{key} compared too little: {report}"
        );
        assert!(
            a["top1_agreement"].as_f64().unwrap() >= tol["min_top1_agreement"].as_f64().unwrap(),
            "{key}: {a}"
        );
    }
    assert_eq!(report["batch_twin_max_diff"], 0.0, "{report}");
}

fn summary(report: &Value) -> String {
    let a = |k: &str| {
        format!(
            "top-1 {:.1}%, perplexity {:.4} (reference {:.4})",
            report[k]["top1_agreement"].as_f64().unwrap_or(0.0) * 100.0,
            report[k]["perplexity_candidate"].as_f64().unwrap_or(0.0),
            report[k]["perplexity_reference"].as_f64().unwrap_or(0.0),
        )
    };
    format!(
        "on {}: against the CPU path {}, largest logit difference {:.3}; against llama.cpp {}",
        report["device"],
        a("against_cpu"),
        report["against_cpu"]["max_logit_diff"]
            .as_f64()
            .unwrap_or(0.0),
        a("against_llama_cpp"),
    )
}

#[test]
fn the_tensor_path_agrees_with_the_cpu_and_llama_cpp() {
    let (code, cpu) = gpu_check(&bin("edge-agent"), "cpu", None);
    assert_eq!(code, 0, "{cpu}");
    assert_eq!(cpu["device"]["kind"], "cpu", "{cpu}");
    assert_agrees(&cpu);
    eprintln!("gpu-check {}", summary(&cpu));

    let gpu_here = Path::new("/dev/nvidia0").exists();
    let Some(agent) = cuda_agent() else {
        assert!(
            !gpu_here,
            "this box has a GPU and no CUDA build: run `cargo xtask build-cuda` first"
        );
        eprintln!("SKIPPED on a GPU: no GPU here (no /dev/nvidia0) and no CUDA build");
        return;
    };
    if !gpu_here {
        eprintln!(
            "SKIPPED on a GPU: no GPU here (no /dev/nvidia0); the CUDA build at {} is checked \
             without a driver by the_cuda_build_without_a_driver_serves_on_the_cpu",
            agent.display()
        );
        return;
    }
    let (code, gpu) = gpu_check(&agent, "0", None);
    assert_eq!(
        gpu["device"]["kind"], "cuda",
        "a GPU is here but the check ran on the CPU: {gpu}"
    );
    assert_eq!(code, 0, "{gpu}");
    assert_agrees(&gpu);
    eprintln!("gpu-check {}", summary(&gpu));
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

    // The CUDA build's own check, asked for GPU 0 without a driver: the
    // tensor path falls back to candle's CPU backend, says why, and agrees.
    let (code, check) = gpu_check(&agent, "0", Some(&stubs));
    assert_eq!(check["device"]["kind"], "cpu", "{check}");
    assert!(
        check["device"]["reason"]
            .as_str()
            .unwrap_or("")
            .starts_with("GPU 0: cannot open the CUDA device"),
        "{check}"
    );
    assert_eq!(check["build_cuda"], "13.0", "{check}");
    assert_eq!(code, 0, "{check}");
    assert_agrees(&check);
}
