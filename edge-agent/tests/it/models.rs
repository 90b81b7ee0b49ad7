//! Several models on one box (issue 25), over real HTTP with real files:
//! the real model (Q4_1) and the same weights requantised to Q8_0 by
//! `edge-agent requantize`, two genuinely different files served side by
//! side; models loaded on demand (`503 model_loading`), evicted under a
//! memory cap (least recently used, never a busy one), unloaded after their
//! keep-alive; broken model files marked failed while the others serve; a
//! kill -9 in the middle of a load.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::common::{bin, init, Agent, IMSI};

pub const SMALL: &str = "smollm2-q4";
pub const LARGE: &str = "smollm2-q8";

/// The real model's weights as Q8_0, written once per test run by the
/// agent's own tool (`edge-agent requantize`).
pub fn q8_model() -> PathBuf {
    static MADE: OnceLock<PathBuf> = OnceLock::new();
    MADE.get_or_init(|| {
        let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("smollm2-135m-q8_0.gguf");
        if !out.exists() {
            let status = Command::new(bin())
                .args(["requantize", "--to", "q8_0", "--out"])
                .arg(&out)
                .status()
                .unwrap();
            assert!(status.success(), "edge-agent requantize failed");
        }
        out
    })
    .clone()
}

pub fn q4_model() -> PathBuf {
    mec_inference::default_model_path()
}

/// One `[[models]]` entry.
pub fn model_toml(id: &str, path: &Path, extra: &str) -> String {
    format!(
        "\n[[models]]\nid = \"{id}\"\npath = \"{}\"\nslots = 2\n{extra}\n",
        path.display()
    )
}

/// `edge-agent init` in `dir`, its `[model]` replaced by `models` (TOML
/// of `[[models]]` entries) and `extra` appended. The config and app key.
pub fn configure(dir: &Path, models: &str, extra: &str) -> (PathBuf, String) {
    let (config, key) = init(dir);
    let text = std::fs::read_to_string(&config).unwrap();
    // init writes `[model]` with its path and id, then a blank line.
    let start = text.find("[model]\n").unwrap();
    let end = start + text[start..].find("\n\n").unwrap();
    let text = format!("{}{}{}{models}{extra}", &text[..start], "", &text[end..]);
    std::fs::write(&config, text).unwrap();
    (config, key)
}

pub fn chat_body(model: &str, content: &str, max_tokens: u64, stream: bool) -> Value {
    json!({
        "model": model,
        "messages": [{ "role": "user", "content": content }],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
    })
}

/// Sends a chat to `model`; the status and the body.
pub async fn chat(agent: &Agent, model: &str, content: &str, max_tokens: u64) -> (u16, Value) {
    let r = agent
        .post("/v1/chat/completions", IMSI)
        .json(&chat_body(model, content, max_tokens, false))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap())
}

/// Chats with `model` until it is loaded: every refusal on the way must be
/// `503 model_loading` with a `Retry-After` of at least a second (waited in
/// tenths here). The answer and how many refusals came first.
pub async fn chat_when_loaded(agent: &Agent, model: &str, content: &str) -> (Value, usize) {
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut refused = 0;
    loop {
        let r = agent
            .post("/v1/chat/completions", IMSI)
            .json(&chat_body(model, content, 8, false))
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let retry_after = r
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap().parse::<u64>().unwrap());
        let body: Value = r.json().await.unwrap();
        if status == 200 {
            return (body, refused);
        }
        assert_eq!(status, 503, "{body}");
        assert_eq!(body["error"]["code"], "model_loading", "{body}");
        assert!(
            retry_after.is_some_and(|s| s >= 1),
            "Retry-After: {retry_after:?}"
        );
        refused += 1;
        assert!(Instant::now() < deadline, "{model} never loaded");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `/v1/models`, by id.
pub async fn models(agent: &Agent) -> std::collections::BTreeMap<String, Value> {
    let v = agent.get_json(format!("{}/v1/models", agent.api)).await;
    v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["id"].as_str().unwrap().to_string(), m.clone()))
        .collect()
}

async fn state_of(agent: &Agent, id: &str) -> String {
    models(agent).await[id]["state"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Waits (bounded) until `id` is in `state`.
async fn wait_state(agent: &Agent, id: &str, state: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while state_of(agent, id).await != state {
        assert!(Instant::now() < deadline, "{id} never became {state}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn two_models_serve_side_by_side_each_answering_with_its_own_id() {
    let dir = tempfile::tempdir().unwrap();
    let models_toml = model_toml(SMALL, &q4_model(), "aliases = [\"small\"]")
        + &model_toml(
            LARGE,
            &q8_model(),
            "load = \"on_demand\"\naliases = [\"large\"]",
        );
    let (config, key) = configure(dir.path(), &models_toml, "");
    let agent = Agent::serve(dir.path(), &config, &key);
    agent.grant(IMSI, 1_000_000).await;

    let listed = models(&agent).await;
    assert_eq!(listed[SMALL]["state"], "loaded", "{listed:?}");
    assert_eq!(listed[SMALL]["aliases"], json!(["small"]));
    assert_eq!(listed[LARGE]["state"], "unloaded", "{listed:?}");
    // Two files of different sizes: the estimates differ.
    assert!(listed[LARGE]["memory_bytes"].as_u64() > listed[SMALL]["memory_bytes"].as_u64());

    // The on-demand model: refused while it loads, then served.
    let (answer, refused) =
        chat_when_loaded(&agent, "large", "What is the capital of France?").await;
    assert!(
        refused >= 1,
        "the first request for an unloaded model is told to come back"
    );
    assert_eq!(
        answer["model"], LARGE,
        "the answer names the model, not the alias"
    );
    assert_eq!(state_of(&agent, LARGE).await, "loaded");

    // Both at once, each answering with its own id.
    let prompt = "Name three colours.";
    let (a, b) = tokio::join!(
        chat(&agent, SMALL, prompt, 24),
        chat(&agent, LARGE, prompt, 24)
    );
    assert_eq!((a.0, b.0), (200, 200), "{a:?} {b:?}");
    assert_eq!(a.1["model"], SMALL);
    assert_eq!(b.1["model"], LARGE);
    // Two different files: greedy decoding of the same prompt differs
    // somewhere in 24 tokens (seen: "L'Étoile, la Marseillaise," against
    // "L'Étoile, la Cité, la France" for the capital question).
    let text = |v: &Value| {
        v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let (_, capital_small) = chat(&agent, "small", "What is the capital of France?", 8).await;
    assert_ne!(text(&capital_small), text(&answer), "two different models");

    // An unknown name: 404 naming it.
    let (status, body) = chat(&agent, "gpt-9", prompt, 4).await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"]["code"], "model_not_found");
    assert_eq!(body["error"]["param"], "model");

    // Every record names the model that served it.
    let records = agent.dump();
    let by_model = |m: &str| records.iter().filter(|r| r["model_id"] == m).count();
    assert_eq!(by_model(SMALL), 2, "{records:?}");
    assert_eq!(by_model(LARGE), 2, "{records:?}");
    assert_eq!(records.len(), 4, "the refusals are not billed");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_broken_model_file_is_marked_failed_and_the_others_serve() {
    let dir = tempfile::tempdir().unwrap();
    let real = std::fs::read(q4_model()).unwrap();
    let truncated = dir.path().join("truncated.gguf");
    std::fs::write(&truncated, &real[..real.len() / 2]).unwrap();
    // general.architecture "llama" made "llamb".
    let mut other = real.clone();
    let key = b"general.architecture";
    let at = other.windows(key.len()).position(|w| w == key).unwrap() + key.len() + 4 + 8;
    other[at + 4] = b'b';
    let other_arch = dir.path().join("other-arch.gguf");
    std::fs::write(&other_arch, &other).unwrap();
    drop((real, other));
    let models_toml = model_toml("missing", &dir.path().join("nowhere.gguf"), "")
        + &model_toml("truncated", &truncated, "")
        + &model_toml("other-arch", &other_arch, "load = \"on_demand\"")
        + &model_toml(SMALL, &q4_model(), "");
    let (config, key) = configure(dir.path(), &models_toml, "");
    let agent = Agent::serve(dir.path(), &config, &key);
    agent.grant(IMSI, 100_000).await;

    // Ready: one model serves; each broken one is listed with its reason.
    let r = agent
        .http
        .get(format!("{}/readyz", agent.api))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let ready: Value = r.json().await.unwrap();
    let reason = |id: &str| {
        ready["models"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["id"] == id)
            .map(|m| {
                (
                    m["state"].as_str().unwrap().to_string(),
                    m["reason"].to_string(),
                )
            })
            .unwrap()
    };
    let (state, why) = reason("missing");
    assert_eq!(state, "failed");
    assert!(
        why.contains("nowhere.gguf") && why.contains("No such file"),
        "{why}"
    );
    let (state, why) = reason("truncated");
    assert_eq!(state, "failed");
    assert!(why.contains("truncated"), "{why}");
    // Found unusable when its file was read at start, though on demand.
    let (state, why) = reason("other-arch");
    assert_eq!(state, "failed");
    assert!(
        why.contains("unsupported architecture \\\"llamb\\\""),
        "{why}"
    );
    assert_eq!(reason(SMALL).0, "loaded");
    assert_eq!(models(&agent).await["truncated"]["state"], "failed");

    // A request for a failed model: 503 naming why; the others serve.
    let (status, body) = chat(&agent, "truncated", "Hi", 4).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "model_failed");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("truncated"),
        "{body}"
    );
    let (status, body) = chat(&agent, SMALL, "Hi", 4).await;
    assert_eq!(status, 200, "{body}");

    // Fixed on disk, the admin's load tries again and it serves.
    std::fs::copy(q4_model(), &truncated).unwrap();
    let r = agent
        .admin_http
        .post(format!("{}/admin/v1/models/truncated/load", agent.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let view: Value = r.json().await.unwrap();
    assert_eq!(view["state"], "loaded", "{view}");
    let (status, body) = chat(&agent, "truncated", "Hi", 4).await;
    assert_eq!((status, body["model"].as_str()), (200, Some("truncated")));
    assert_eq!(agent.dump().len(), 2, "one record per answer");
}

#[test]
fn two_models_sharing_an_alias_are_refused_at_start_naming_both() {
    let dir = tempfile::tempdir().unwrap();
    let models_toml = model_toml(SMALL, &q4_model(), "aliases = [\"fast\"]")
        + &model_toml(LARGE, &q4_model(), "aliases = [\"fast\"]");
    let (config, _) = configure(dir.path(), &models_toml, "");
    let out = Command::new(bin())
        .args(["serve", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("models[1].aliases")
            && err.contains(&format!("\"fast\" names both \"{SMALL}\" and \"{LARGE}\"")),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn under_a_memory_cap_the_least_recently_used_idle_model_is_evicted_and_reloads_on_demand() {
    let dir = tempfile::tempdir().unwrap();
    let models_toml = model_toml(SMALL, &q4_model(), "load = \"on_demand\"")
        + &model_toml(LARGE, &q8_model(), "load = \"on_demand\"\nkeep_alive_s = 2");
    // The estimates, from an agent without a cap (nothing loads on demand
    // until asked).
    let (config, key) = configure(dir.path(), &models_toml, "");
    let agent = Agent::serve(dir.path(), &config, &key);
    let listed = models(&agent).await;
    let (small, large) = (
        listed[SMALL]["memory_bytes"].as_u64().unwrap(),
        listed[LARGE]["memory_bytes"].as_u64().unwrap(),
    );
    drop(agent);
    // Room for either, not both.
    let cap = large + small / 2;
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(&format!("\n[serving]\nmax_loaded_bytes = {cap}\n"));
    std::fs::write(&config, text).unwrap();
    let agent = Agent::serve(dir.path(), &config, &key);
    agent.grant(IMSI, 1_000_000).await;

    let (a, _) = chat_when_loaded(&agent, SMALL, "Hi").await;
    assert_eq!(a["model"], SMALL);
    // The large one needs the small one's room: the small one goes.
    let (b, refused) = chat_when_loaded(&agent, LARGE, "Hi").await;
    assert_eq!(b["model"], LARGE);
    assert!(refused >= 1);
    assert_eq!(state_of(&agent, SMALL).await, "unloaded");
    // And comes back on demand, the large one evicted in turn.
    let (a, refused) = chat_when_loaded(&agent, SMALL, "Hi").await;
    assert_eq!(a["model"], SMALL);
    assert!(
        refused >= 1,
        "an evicted model loads again, with 503 model_loading meanwhile"
    );
    assert_eq!(state_of(&agent, LARGE).await, "unloaded");

    // A busy model is never evicted: while a stream holds the small one,
    // the large one cannot load, and says why.
    let mut stream = agent
        .post("/v1/chat/completions", IMSI)
        .json(&chat_body(
            SMALL,
            "Write a long story about the sea.",
            2000,
            true,
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    stream.chunk().await.unwrap().expect("a first chunk");
    let (status, body) = chat(&agent, LARGE, "Hi", 4).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "model_capacity", "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains(SMALL) && message.contains("busy or pinned"),
        "{message}"
    );
    assert_eq!(state_of(&agent, SMALL).await, "loaded");
    drop(stream); // the client leaves: cancelled, billed, released

    // Once it is idle, the large one loads; its keep-alive (2 s) unloads it
    // after that long without a request.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, body) = chat(&agent, LARGE, "Hi", 4).await;
        if status == 200 {
            break;
        }
        let code = body["error"]["code"].as_str().unwrap().to_string();
        assert!(
            ["model_capacity", "model_loading"].contains(&code.as_str()),
            "{body}"
        );
        assert!(Instant::now() < deadline, "the large model never loaded");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_state(&agent, LARGE, "unloaded").await;
    assert_eq!(
        state_of(&agent, SMALL).await,
        "unloaded",
        "evicted by the large one's load"
    );
    let metrics = agent
        .http
        .get(format!("{}/metrics", agent.api))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(&format!(
            "mec_model_state{{model=\"{LARGE}\",state=\"unloaded\"}} 1"
        )),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_during_a_load_then_a_restart_bills_nothing_twice() {
    let dir = tempfile::tempdir().unwrap();
    let models_toml = model_toml(SMALL, &q4_model(), "")
        + &model_toml(LARGE, &q8_model(), "load = \"on_demand\"");
    let (config, key) = configure(dir.path(), &models_toml, "");
    let mut agent = Agent::serve(dir.path(), &config, &key);
    agent.grant(IMSI, 100_000).await;
    let mut answered = 0;
    for _ in 0..3 {
        let (status, body) = chat(&agent, SMALL, "Hi", 8).await;
        assert_eq!(status, 200, "{body}");
        answered += body["usage"]["total_tokens"].as_u64().unwrap();
    }
    // The large model starts loading; the agent dies in the middle.
    let (status, body) = chat(&agent, LARGE, "Hi", 8).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (503, Some("model_loading"))
    );
    assert_eq!(state_of(&agent, LARGE).await, "loading");
    agent.signal(libc::SIGKILL);
    agent.wait(Duration::from_secs(10));
    drop(agent);

    let agent = Agent::serve(dir.path(), &config, &key);
    assert_eq!(state_of(&agent, LARGE).await, "unloaded");
    assert_eq!(agent.remaining(IMSI).await, 100_000 - answered);
    let (b, _) = chat_when_loaded(&agent, LARGE, "Hi").await;
    answered += b["usage"]["total_tokens"].as_u64().unwrap();
    let records = agent.dump();
    assert_eq!(records.len(), 4, "{records:?}");
    let billed: u64 = records
        .iter()
        .map(|r| r["billed_tokens"].as_u64().unwrap())
        .sum();
    assert_eq!(billed, answered);
    // The store applies a settlement behind the answer.
    let deadline = Instant::now() + Duration::from_secs(20);
    while agent.remaining(IMSI).await != 100_000 - answered {
        assert!(
            Instant::now() < deadline,
            "the balance never matched the records"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
