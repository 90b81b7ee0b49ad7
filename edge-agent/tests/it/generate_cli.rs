//! `edge-agent generate` as a technician runs it, on the real model.

use std::process::Command;

fn edge_agent(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_edge-agent"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn generate_json_reports_text_and_exact_counts() {
    let out = edge_agent(&[
        "generate",
        "--raw",
        "--prompt",
        "The capital of France is",
        "--max-tokens",
        "5",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["text"], " Paris.\n\nThe");
    assert_eq!(v["prompt_tokens"], 5);
    assert_eq!(v["completion_tokens"], 5);
    assert_eq!(v["finish_reason"], "length");
    assert!(v["ttft_ms"].as_f64().unwrap() > 0.0);
    assert!(v["decode_tokens_per_s"].as_f64().unwrap() > 0.0);
}

#[test]
fn generate_streams_chat_text_to_stdout() {
    let out = edge_agent(&["generate", "--prompt", "Say hello.", "--max-tokens", "8"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!String::from_utf8_lossy(&out.stdout).trim().is_empty());
    assert!(String::from_utf8_lossy(&out.stderr).contains("completion tokens"));
}

#[test]
fn a_file_that_is_not_a_model_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("not-a-model.gguf");
    std::fs::write(&bad, b"hello").unwrap();
    let out = edge_agent(&[
        "generate",
        "--model",
        bad.to_str().unwrap(),
        "--prompt",
        "x",
    ]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("not-a-model.gguf") && err.contains("not a GGUF file"),
        "{err}"
    );
}

#[test]
fn out_of_range_temperature_is_refused() {
    let out = edge_agent(&["generate", "--prompt", "x", "--temperature", "5"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("temperature"));
}
