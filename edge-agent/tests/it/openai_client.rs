//! The official `openai` Python client (from PyPI, in a virtual environment
//! this test makes under the target directory) against a real agent.

use crate::common;

use std::path::PathBuf;
use std::process::Command;

use common::{Agent, IMSI};
use serde_json::Value;

/// The client version the test pins.
const OPENAI: &str = "openai==3.54.0";

fn python_with_openai() -> PathBuf {
    let venv = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("openai-venv");
    let python = venv.join("bin/python");
    let ready = Command::new(&python)
        .args(["-c", "import openai"])
        .status()
        .is_ok_and(|s| s.success());
    if !ready {
        let s = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .unwrap();
        assert!(
            s.success(),
            "python3 -m venv failed (apt-get install python3-venv)"
        );
        let s = Command::new(&python)
            .args(["-m", "pip", "install", "-q", OPENAI])
            .status()
            .unwrap();
        assert!(s.success(), "pip install {OPENAI} failed");
    }
    python
}

#[tokio::test(flavor = "multi_thread")]
async fn the_official_openai_client_works_streaming_too() {
    let python = python_with_openai();
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::new(dir.path());
    agent.grant(IMSI, 10_000).await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/it/openai_client.py");
    let (api, key, model) = (agent.api.clone(), agent.key.clone(), agent.model.clone());
    let out = tokio::task::spawn_blocking(move || {
        Command::new(python)
            .arg(script)
            .args([&api, &key, &model, IMSI])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    for kind in ["chat", "stream", "completion"] {
        let u = &v[kind]["usage"];
        assert!(u["completion_tokens"].as_u64().unwrap() >= 1, "{kind}: {v}");
        assert_eq!(
            u["total_tokens"].as_u64().unwrap(),
            u["prompt_tokens"].as_u64().unwrap() + u["completion_tokens"].as_u64().unwrap()
        );
        assert!(!v[kind]["text"].as_str().unwrap().is_empty(), "{kind}: {v}");
    }
    // Greedy: the stream says what the plain answer said.
    assert_eq!(v["stream"]["text"], v["chat"]["text"]);
    assert!(v["stream"]["usage"]["prompt_tokens_details"]["cached_tokens"].is_u64());
    assert_eq!(v["completion"]["text"], " Paris.\n");
    assert_eq!(v["models"][0], agent.model.as_str());
    assert_eq!(v["not_found"], "model_not_found");
    let billed: u64 = ["chat", "stream", "completion"]
        .iter()
        .map(|k| v[k]["usage"]["total_tokens"].as_u64().unwrap())
        .sum();
    assert_eq!(agent.usage(IMSI, 3).await.len(), 3);
    assert_eq!(agent.remaining(IMSI).await, 10_000 - billed);
}
