//! The official `openai` Python client (from PyPI, in a virtual environment
//! this test makes under the target directory) against a real agent.

use crate::common;

use std::path::PathBuf;
use std::process::Command;

use common::{Agent, IMSI};
use serde_json::Value;

/// The client version the test pins, and the schema validator the agents'
/// test checks structured output with.
const OPENAI: &str = "openai==3.54.0";
const JSONSCHEMA: &str = "jsonschema==4.26.0";

fn python_with_openai() -> PathBuf {
    let venv = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("openai-venv");
    let python = venv.join("bin/python");
    let ready = Command::new(&python)
        .args(["-c", "import openai, jsonschema"])
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
            .args(["-m", "pip", "install", "-q", OPENAI, JSONSCHEMA])
            .status()
            .unwrap();
        assert!(s.success(), "pip install {OPENAI} {JSONSCHEMA} failed");
    }
    python
}

/// Runs `tests/it/<script>` against `agent`; its JSON output.
async fn run_script(python: PathBuf, script: &str, agent: &Agent) -> Value {
    let script = format!("{}/tests/it/{script}", env!("CARGO_MANIFEST_DIR"));
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
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_official_openai_client_works_streaming_too() {
    let python = python_with_openai();
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::new(dir.path());
    agent.grant(IMSI, 10_000).await;
    let v = run_script(python, "openai_client.py", &agent).await;
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

/// What agents' clients do (structured output, tool calls, logprobs, n
/// choices), through the official client, on the real model; then the bill:
/// every answer recorded once, with its choices, constraint and end user,
/// and nothing recorded for the requests refused.
#[tokio::test(flavor = "multi_thread")]
async fn agents_clients_get_structured_output_tool_calls_logprobs_and_choices() {
    let python = python_with_openai();
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::new(dir.path());
    agent.grant(IMSI, 2_000_000).await;
    let v = run_script(python, "openai_agents.py", &agent).await;
    eprintln!("{}", serde_json::to_string_pretty(&v).unwrap());
    // Structured output: every one parsed, every sample valid.
    assert_eq!(v["parsed"], 20, "{}", v["unparsed"]);
    // Streamed, the SDK's helper parses what came in pieces.
    assert_eq!(v["streamed_parsed"], 3, "{v}");
    assert!(v["streamed_content_events"].as_u64().unwrap() > 3, "{v}");
    assert_eq!(v["schema_valid"], 100, "{}", v["schema_failures"]);
    // Tool calls, whole and streamed (the script validated the arguments
    // against the function's schema).
    for case in ["required", "required_stream"] {
        assert_eq!(v[case]["finish"], "tool_calls", "{case}: {}", v[case]);
        let calls = v[case]["calls"].as_array().unwrap();
        assert!(!calls.is_empty(), "{case}");
        for c in calls {
            assert!(c["id"].as_str().unwrap().starts_with("call_"), "{c}");
            serde_json::from_str::<Value>(c["arguments"].as_str().unwrap()).unwrap();
        }
    }
    // Streamed, the arguments came in pieces and say what the whole answer said.
    let (whole, streamed) = (
        &v["required"]["calls"][0],
        &v["required_stream"]["calls"][0],
    );
    assert_eq!(whole["name"], streamed["name"]);
    assert_eq!(whole["arguments"], streamed["arguments"]);
    assert!(streamed["deltas"].as_u64().unwrap() > 1, "{streamed}");
    assert_eq!(v["named"]["finish"], "tool_calls");
    assert_eq!(v["named"]["names"], serde_json::json!(["get_time"]));
    // After the tool's result, an answer or a call: either is the format.
    let after = &v["after_result"];
    assert!(
        after["content"].is_string() || !after["calls"].as_array().unwrap().is_empty(),
        "{after}"
    );
    assert_eq!(v["orphan_result"], "invalid_value");
    // Greedy: each chosen token is its own top alternative.
    let lps = v["logprobs"].as_array().unwrap();
    assert!(!lps.is_empty());
    let mut text = String::new();
    for t in lps {
        assert_eq!(t["top"][0][0], t["token"], "{t}");
        assert_eq!(t["top"][0][1], t["logprob"], "{t}");
        assert!(t["logprob"].as_f64().unwrap() <= 0.0);
        text.push_str(t["token"].as_str().unwrap());
    }
    assert_eq!(text, v["logprobs_text"].as_str().unwrap());
    // n = 3: three choices, the prompt once.
    assert_eq!(v["n3"]["choices"], 3);
    assert_eq!(v["n3"]["indexes"], serde_json::json!([0, 1, 2]));
    // Refusals name the parameter.
    let r = &v["refusals"];
    assert_eq!(r["not_keyword"]["param"], "response_format", "{r}");
    assert!(
        r["not_keyword"]["message"]
            .as_str()
            .unwrap()
            .contains("not"),
        "{r}"
    );
    assert_eq!(r["absent_tool"]["param"], "tool_choice", "{r}");
    assert_eq!(r["top_logprobs"]["param"], "top_logprobs", "{r}");
    assert_eq!(r["n"]["param"], "n", "{r}");
    assert_eq!(r["logit_bias"]["param"], "logit_bias", "{r}");

    // The bill: one record per answered request, none for the refusals.
    let answered = v["requests"].as_u64().unwrap() as usize;
    let records = agent.dump();
    assert_eq!(records.len(), answered);
    let billed: u64 = records
        .iter()
        .map(|r| r["billed_tokens"].as_u64().unwrap())
        .sum();
    let usages: u64 = v["usages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["total_tokens"].as_u64().unwrap())
        .sum();
    assert_eq!(billed, usages, "the records bill what the answers said");
    assert_eq!(agent.remaining(IMSI).await, 2_000_000 - billed);
    let n3 = records.last().unwrap();
    assert_eq!(n3["choices"], 3);
    assert_eq!(n3["end_user"], "end-user-42");
    let u = &v["n3"]["usage"];
    assert_eq!(n3["prompt_tokens"], u["prompt_tokens"]);
    assert_eq!(n3["completion_tokens"], u["completion_tokens"]);
    assert!(u["completion_tokens"].as_u64().unwrap() >= 3);
    let constraints: std::collections::BTreeMap<String, usize> =
        records.iter().fold(Default::default(), |mut m, r| {
            *m.entry(r["constraint"].as_str().unwrap().to_string())
                .or_default() += 1;
            m
        });
    assert_eq!(constraints["json_schema"], 48, "{constraints:?}");
    assert_eq!(constraints["tool_calls"], 4, "{constraints:?}");
}
