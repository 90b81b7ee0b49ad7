//! The operator commands, run as a new user would: the real `edge-agent`
//! binary on real files.

use std::process::{Command, Output, Stdio};
use std::time::Duration;

fn edge_agent(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_edge-agent"))
        .args(args)
        .output()
        .unwrap()
}

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

#[test]
fn bench_then_verify_then_dump() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let out = edge_agent(&[
        "log",
        "bench",
        "--dir",
        d,
        "--records",
        "500",
        "--concurrency",
        "16",
        "--backend",
        "file",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bench = json(&out);
    assert_eq!(bench["records"], 500);
    assert_eq!(bench["backend"], "file");
    assert!(bench["records_per_s"].as_f64().unwrap() > 0.0);
    assert!(
        bench["append_latency_us_p99"].as_u64().unwrap()
            >= bench["append_latency_us_p50"].as_u64().unwrap()
    );

    let out = edge_agent(&["log", "verify", "--dir", d]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let v = json(&out);
    assert_eq!(
        (
            v["records"].as_u64(),
            v["first_seq"].as_u64(),
            v["last_seq"].as_u64()
        ),
        (Some(500), Some(1), Some(500))
    );
    assert_eq!(v["ok"], true);

    let out = edge_agent(&["log", "dump", "--dir", d]);
    assert!(out.status.success());
    let lines: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 500);
    assert_eq!(lines[0]["seq"], 1);
    assert_eq!(lines[0]["outcome"], "OUTCOME_COMPLETED");
    assert_eq!(lines[0]["prev_hash"], "0".repeat(64));
    for field in [
        "node_id",
        "key_id",
        "record_id",
        "imsi",
        "prompt_tokens",
        "cached_prompt_tokens",
        "clock_sync",
        "body",
        "signature",
    ] {
        assert!(lines[499].get(field).is_some(), "dump has {field}");
    }
}

#[test]
fn verify_passes_on_a_log_whose_writer_was_killed_mid_append() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    for round in 0..3 {
        let mut child = Command::new(env!("CARGO_BIN_EXE_edge-agent"))
            .args([
                "log",
                "bench",
                "--dir",
                d,
                "--records",
                "100000000",
                "--concurrency",
                "64",
            ])
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(400 + 150 * round));
        // SIGKILL: no destructor, no flush, as on a power cut of the process.
        unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
        child.wait().unwrap();
        let out = edge_agent(&["log", "verify", "--dir", d]);
        let v = json(&out);
        assert!(out.status.success(), "round {round}: {v}");
        assert!(
            v["records"].as_u64().unwrap() > 0,
            "round {round}: the writer made progress before the kill"
        );
    }
}

#[test]
fn verify_fails_on_a_flipped_byte_and_on_a_foreign_key() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    assert!(edge_agent(&[
        "log",
        "bench",
        "--dir",
        d,
        "--records",
        "50",
        "--concurrency",
        "1",
        "--backend",
        "file"
    ])
    .status
    .success());
    let seg = dir.path().join("log/seg-00000000000000000001.log");
    let mut bytes = std::fs::read(&seg).unwrap();
    let clean = bytes.clone();
    bytes[200] ^= 0x01; // inside record 1 or 2: later records are intact
    std::fs::write(&seg, &bytes).unwrap();
    let out = edge_agent(&["log", "verify", "--dir", d]);
    assert_eq!(out.status.code(), Some(1));
    assert!(!json(&out)["problems"].as_array().unwrap().is_empty());

    // The same log against another node's public key: every signature fails.
    std::fs::write(&seg, &clean).unwrap();
    let other = tempfile::tempdir().unwrap();
    assert!(edge_agent(&[
        "log",
        "bench",
        "--dir",
        other.path().to_str().unwrap(),
        "--records",
        "1",
        "--concurrency",
        "1"
    ])
    .status
    .success());
    std::fs::copy(
        other.path().join("identity/node.pub"),
        dir.path().join("identity/node.pub"),
    )
    .unwrap();
    let out = edge_agent(&["log", "verify", "--dir", d]);
    assert_eq!(out.status.code(), Some(1));
    let problems = json(&out)["problems"].to_string();
    assert!(problems.contains("signature"), "{problems}");
}

#[test]
fn missing_directory_and_unknown_backend_are_clear_errors() {
    let out = edge_agent(&["log", "verify", "--dir", "/nonexistent/state"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("node.pub"));
    let out = edge_agent(&["log", "bench", "--dir", "/tmp/x", "--backend", "floppy"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("floppy"));
}
