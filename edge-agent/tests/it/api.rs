//! The MEC API over real HTTP on loopback, with the real model, a real usage
//! log and the real ledger store: a running `edge-agent serve` per test.

use crate::common;

use std::time::Duration;

use common::{sse_data, Agent, IMSI, NARROW_KEY};
use futures_util::StreamExt;
use serde_json::{json, Value};

fn total(u: &Value) -> u64 {
    u["prompt_tokens"].as_u64().unwrap() + u["completion_tokens"].as_u64().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn completions_streamed_or_not_report_the_usage_that_was_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::new(dir.path());
    agent.grant(IMSI, 10_000).await;

    // Non-streamed chat.
    let r = agent
        .chat(IMSI, "What is the capital of France?", 8, false)
        .await;
    assert_eq!(r.status(), 200);
    let header_id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["id"], format!("chatcmpl-{header_id}"));
    let text = v["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(!text.is_empty());
    let usage = &v["usage"];
    assert!(usage["completion_tokens"].as_u64().unwrap() <= 8);
    assert_eq!(usage["total_tokens"].as_u64().unwrap(), total(usage));
    assert!(usage["prompt_tokens_details"]["cached_tokens"].is_u64());
    let first_total = total(usage);

    // Streamed chat with usage.
    let body = agent
        .chat(IMSI, "Name three colours.", 6, true)
        .await
        .text()
        .await
        .unwrap();
    let events = sse_data(&body);
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let streamed: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert!(!streamed.is_empty());
    let usage_chunk = chunks.last().unwrap();
    assert_eq!(usage_chunk["choices"].as_array().unwrap().len(), 0);
    let stream_usage = &usage_chunk["usage"];
    assert!(stream_usage["completion_tokens"].as_u64().unwrap() <= 6);
    let finish = &chunks[chunks.len() - 2]["choices"][0]["finish_reason"];
    assert!(finish == "length" || finish == "stop", "{finish}");

    // Text completion (no template).
    let r = agent
        .post("/v1/completions", IMSI)
        .json(&json!({ "model": agent.model, "prompt": "The capital of France is", "max_tokens": 3, "temperature": 0 }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["choices"][0]["text"], " Paris.\n");
    assert_eq!(v["usage"]["prompt_tokens"], 5);
    let third_total = total(&v["usage"]);

    // The records equal what the client was told, and the balance moved by as much.
    let rows = agent.usage(IMSI, 3).await;
    let mut billed: Vec<u64> = rows
        .iter()
        .map(|r| r["billed_tokens"].as_u64().unwrap())
        .collect();
    billed.sort();
    let mut told = vec![first_total, total(stream_usage), third_total];
    told.sort();
    assert_eq!(billed, told);
    assert_eq!(
        agent.remaining(IMSI).await,
        10_000 - told.iter().sum::<u64>()
    );
    // The response's id is the record's: a bill line leads to the answer.
    let records = agent.dump();
    let first = uuid::Uuid::parse_str(&header_id).unwrap().to_string();
    let record = records.iter().find(|r| r["record_id"] == first.as_str());
    assert_eq!(
        record.expect("no record for the first answer")["billed_tokens"],
        first_total,
        "{records:?}"
    );

    // Models, health, readiness, metrics.
    let models = agent.get_json(format!("{}/v1/models", agent.api)).await;
    assert_eq!(models["data"][0]["id"], agent.model);
    for path in ["/healthz", "/readyz"] {
        let r = agent
            .http
            .get(format!("{}{path}", agent.api))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{path}");
    }
    let ready = agent.get_json(format!("{}/readyz", agent.api)).await;
    assert_eq!(ready["model"], agent.model);
    assert!(
        ["uring", "file"].contains(&ready["log_backend"].as_str().unwrap_or("")),
        "{ready}"
    );
    // No GPU here: the device is the CPU, with the reason (this build has
    // no CUDA, or NVML is missing), and no GPU telemetry.
    assert_eq!(ready["device"]["kind"], "cpu", "{ready}");
    assert!(
        !ready["device"]["reason"].as_str().unwrap_or("").is_empty(),
        "{ready}"
    );
    assert_eq!(ready["gpus"], serde_json::json!([]), "{ready}");
    let metrics = agent
        .http
        .get(format!("{}/metrics", agent.api))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for name in [
        "mec_requests_total",
        "mec_tokens_total",
        "mec_time_to_first_token_seconds",
        "mec_inter_token_latency_seconds",
        "mec_queue_depth",
        "mec_busy_slots",
        "mec_reservations_outstanding",
        "mec_usage_log_backlog_records",
    ] {
        assert!(metrics.contains(name), "{name} missing from\n{metrics}");
    }
    assert!(
        metrics.contains("route=\"/v1/chat/completions\""),
        "{metrics}"
    );
    assert!(
        metrics.contains("mec_inference_device{kind=\"cpu\",gpu=\"\"} 1"),
        "{metrics}"
    );
}

/// Any local process could grant packages or start an update through the
/// admin API; now only who can read the agent's admin token (its user,
/// root) can.
#[tokio::test(flavor = "multi_thread")]
async fn the_admin_api_refuses_requests_without_the_admin_token() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::new(dir.path());
    let grant = json!({ "imsi": IMSI, "tokens": 1000, "kind": "topup" });
    let url = format!("{}/admin/v1/grants", agent.admin);
    let anyone = reqwest::Client::new();
    for auth in [None, Some("Bearer not-the-token"), Some(agent.key.as_str())] {
        let mut r = anyone.post(&url).json(&grant);
        if let Some(a) = auth {
            r = r.header("Authorization", a);
        }
        let r = r.send().await.unwrap();
        assert_eq!(r.status(), 401, "with {auth:?}");
    }
    assert_eq!(agent.remaining(IMSI).await, 0, "nothing was granted");
    let token_file = &agent.admin_token_file;
    let mode = std::fs::metadata(token_file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "{}", token_file.display());
    agent.grant(IMSI, 1000).await;
    assert_eq!(agent.remaining(IMSI).await, 1000);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_exhausted_package_gets_429_before_any_inference() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::new(dir.path());
    // Nothing granted.
    let r = agent.chat(IMSI, "hello", 4, false).await;
    assert_eq!(r.status(), 429);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "insufficient_quota");
    // Less than the prompt and one token.
    agent.grant(IMSI, 10).await;
    let r = agent.chat(IMSI, "hello", 4, false).await;
    assert_eq!(r.status(), 429);
    assert_eq!(agent.remaining(IMSI).await, 10);
    assert!(agent.usage(IMSI, 0).await.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn fifty_concurrent_requests_never_spend_more_than_the_package() {
    let dir = tempfile::tempdir().unwrap();
    // Only the package limits these requests.
    let agent = Agent::with_extra(dir.path(), "\n[limits]\nimsi_requests_per_second = 0\n");
    const PACKAGE: u64 = 400;
    agent.grant(IMSI, PACKAGE).await;
    let requests = (0..50).map(|i| {
        agent
            .post("/v1/chat/completions", IMSI)
            .json(&agent.chat_body(&format!("Count to {i}."), 16, false))
            .send()
    });
    let answers = futures_util::future::join_all(requests).await;
    let (mut served, mut refused, mut told) = (0, 0, 0);
    for a in answers {
        let r = a.unwrap();
        match r.status().as_u16() {
            200 => {
                served += 1;
                let v: Value = r.json().await.unwrap();
                told += total(&v["usage"]);
            }
            429 => {
                refused += 1;
                let v: Value = r.json().await.unwrap();
                assert_eq!(v["error"]["code"], "insufficient_quota");
            }
            s => panic!("status {s}: {}", r.text().await.unwrap()),
        }
    }
    assert!(
        served >= 1 && refused >= 1,
        "served {served}, refused {refused}"
    );
    assert!(
        told <= PACKAGE,
        "{told} tokens served from a package of {PACKAGE}"
    );
    assert_eq!(agent.remaining(IMSI).await, PACKAGE - told);
    let rows = agent.usage(IMSI, served).await;
    assert_eq!(rows.len(), served);
    assert_eq!(
        rows.iter()
            .map(|r| r["billed_tokens"].as_u64().unwrap())
            .sum::<u64>(),
        told
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_subscriber_over_its_rate_gets_429_with_retry_after() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::with_extra(dir.path(), "\n[limits]\nimsi_requests_per_second = 2\n");
    agent.grant(IMSI, 100_000).await;
    let mut limited = None;
    for _ in 0..5 {
        let r = agent.chat(IMSI, "hi", 1, false).await;
        if r.status() == 429 {
            limited = Some(r);
            break;
        }
    }
    let r = limited.expect("5 requests at once passed a limit of 2 per second");
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry >= 1);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "rate_limit_exceeded");
    // Another subscriber is not limited by this one.
    let r = agent.chat("001010000000002", "hi", 1, false).await;
    assert_eq!(r.status(), 429);
    let v: Value = r.json().await.unwrap();
    assert_eq!(
        v["error"]["code"], "insufficient_quota",
        "no package, but not rate limited"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_disconnects_mid_stream_is_billed_for_what_was_made() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::new(dir.path());
    agent.grant(IMSI, 100_000).await;
    let r = agent
        .chat(IMSI, "Write a very long story about the sea.", 400, true)
        .await;
    assert_eq!(r.status(), 200);
    let mut body = r.bytes_stream();
    let mut seen = 0;
    while let Some(chunk) = body.next().await {
        let chunk = chunk.unwrap();
        seen += String::from_utf8_lossy(&chunk)
            .matches("\"content\"")
            .count();
        if seen >= 4 {
            break;
        }
    }
    drop(body); // the client goes away
    let rows = agent.usage(IMSI, 1).await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    let row = &rows[0];
    assert_eq!(row["outcome"], "cancelled", "{row}");
    let completion = row["completion_tokens"].as_u64().unwrap();
    assert!((3..400).contains(&completion), "{row}");
    assert_eq!(
        agent.remaining(IMSI).await,
        100_000 - row["billed_tokens"].as_u64().unwrap()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_gets_an_openai_error_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::new(dir.path());
    agent.grant(IMSI, 1000).await;
    let url = format!("{}/v1/chat/completions", agent.api);
    let good = agent.chat_body("hi", 4, false);
    let with = |patch: &str| {
        let patch: Value = serde_json::from_str(patch).unwrap();
        let mut b = good.clone();
        for (k, v) in patch.as_object().unwrap() {
            b[k] = v.clone();
        }
        b.to_string()
    };
    let long_prompt = json!({ "model": agent.model, "max_tokens": 4,
        "messages": [{ "role": "user", "content": "edge ".repeat(9000) }] })
    .to_string();
    let huge = "x".repeat(5 << 20);
    let no_messages = json!({ "model": agent.model }).to_string();
    let mut nested = json!({ "type": "string" });
    for _ in 0..40 {
        nested = json!({ "type": "array", "items": nested });
    }
    let format = |schema: Value| {
        let mut b = good.clone();
        b["response_format"] =
            json!({ "type": "json_schema", "json_schema": { "name": "x", "schema": schema } });
        b.to_string()
    };
    let deep_schema = format(nested);
    let large_schema = format(json!({ "type": "object", "description": "x".repeat(70_000) }));
    struct Case {
        name: &'static str,
        key: Option<String>,
        imsi: Option<&'static str>,
        body: String,
        status: u16,
        code: &'static str,
    }
    let case = |name, body: String, status, code| Case {
        name,
        key: Some(agent.key.clone()),
        imsi: Some(IMSI),
        body,
        status,
        code,
    };
    let g = good.to_string();
    let cases = vec![
        case("malformed JSON", "{\"model\":".into(), 400, "invalid_json"),
        case(
            "wrong type",
            with(r#"{ "max_tokens": "four" }"#),
            400,
            "invalid_request",
        ),
        case("missing messages", no_messages, 400, "invalid_request"),
        case(
            "empty messages",
            with(r#"{ "messages": [] }"#),
            400,
            "invalid_value",
        ),
        case(
            "unknown model",
            with(r#"{ "model": "gpt-9" }"#),
            404,
            "model_not_found",
        ),
        case(
            "max_tokens 0",
            with(r#"{ "max_tokens": 0 }"#),
            400,
            "invalid_value",
        ),
        case(
            "max_tokens < 0",
            with(r#"{ "max_tokens": -5 }"#),
            400,
            "invalid_value",
        ),
        case(
            "n above api.max_choices",
            with(r#"{ "n": 9 }"#),
            400,
            "invalid_value",
        ),
        case(
            "a schema keyword the engine cannot enforce",
            with(
                r#"{ "response_format": { "type": "json_schema", "json_schema": { "name": "x",
                     "schema": { "type": "object", "properties": { "a": { "not": {} } } } } } }"#,
            ),
            400,
            "unsupported_schema",
        ),
        case(
            "a schema that is not JSON Schema",
            with(
                r#"{ "response_format": { "type": "json_schema", "json_schema": { "name": "x", "schema": "object" } } }"#,
            ),
            400,
            "unsupported_schema",
        ),
        case("a schema too deep", deep_schema, 400, "schema_too_large"),
        case("a schema too large", large_schema, 400, "schema_too_large"),
        case(
            "a json_schema without its schema",
            with(
                r#"{ "response_format": { "type": "json_schema", "json_schema": { "name": "x" } } }"#,
            ),
            400,
            "invalid_value",
        ),
        case(
            "tool_choice naming an absent tool",
            with(
                r#"{ "tools": [{ "type": "function", "function": { "name": "a" } }],
                     "tool_choice": { "type": "function", "function": { "name": "b" } } }"#,
            ),
            400,
            "invalid_value",
        ),
        case(
            "a tool message answering no call",
            with(
                r#"{ "messages": [{ "role": "user", "content": "hi" }, { "role": "tool", "tool_call_id": "call_x", "content": "1" }] }"#,
            ),
            400,
            "invalid_value",
        ),
        case(
            "a stop sequence that would cut the JSON",
            with(r#"{ "stop": [","], "response_format": { "type": "json_object" } }"#),
            400,
            "unsupported_parameter",
        ),
        case(
            "top_logprobs 21",
            with(r#"{ "logprobs": true, "top_logprobs": 21 }"#),
            400,
            "invalid_value",
        ),
        case(
            "logit_bias on an unknown token",
            with(r#"{ "logit_bias": { "4000000": 1 } }"#),
            400,
            "invalid_value",
        ),
        case(
            "temperature 7",
            with(r#"{ "temperature": 7 }"#),
            400,
            "invalid_value",
        ),
        case(
            "beyond the context",
            long_prompt,
            400,
            "context_length_exceeded",
        ),
        case("body over the limit", huge, 413, "request_too_large"),
        Case {
            key: None,
            ..case("missing key", g.clone(), 401, "invalid_api_key")
        },
        Case {
            key: Some("sk-wrong".into()),
            ..case("wrong key", g.clone(), 401, "invalid_api_key")
        },
        Case {
            imsi: None,
            ..case("missing IMSI", g.clone(), 400, "missing_imsi")
        },
        Case {
            imsi: Some("00101abc"),
            ..case("malformed IMSI", g.clone(), 400, "invalid_imsi")
        },
        Case {
            imsi: Some("00101"),
            ..case("short IMSI", g.clone(), 400, "invalid_imsi")
        },
        Case {
            key: Some(NARROW_KEY.into()),
            imsi: Some("310150123456789"),
            ..case(
                "IMSI outside the app's prefixes",
                g.clone(),
                403,
                "imsi_not_allowed",
            )
        },
    ];
    for c in cases {
        let (name, status, code) = (c.name, c.status, c.code);
        let mut req = agent
            .http
            .post(&url)
            .header("content-type", "application/json");
        if let Some(k) = c.key {
            req = req.bearer_auth(k);
        }
        if let Some(i) = c.imsi {
            req = req.header("X-Subscriber-Imsi", i);
        }
        let r = req.body(c.body).send().await.unwrap();
        assert_eq!(r.status().as_u16(), status, "{name}");
        let v: Value = r
            .json()
            .await
            .unwrap_or_else(|e| panic!("{name}: not JSON: {e}"));
        let e = &v["error"];
        assert_eq!(e["code"], code, "{name}: {v}");
        assert!(
            e["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{name}"
        );
        assert!(e["type"].is_string(), "{name}");
    }
    // Nothing billed, nothing recorded, still serving.
    assert_eq!(agent.remaining(IMSI).await, 1000);
    assert!(agent.usage(IMSI, 0).await.is_empty());
    let r = agent
        .post("/v1/chat/completions", IMSI)
        .json(&good)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_lets_in_flight_requests_finish_and_records_them() {
    let dir = tempfile::tempdir().unwrap();
    let mut agent = Agent::new(dir.path());
    agent.grant(IMSI, 100_000).await;
    let r = agent
        .chat(IMSI, "Write a story about a lighthouse.", 60, true)
        .await;
    let mut body = r.bytes_stream();
    let first = body.next().await.unwrap().unwrap();
    assert!(!first.is_empty());
    agent.signal(libc::SIGTERM);
    let mut rest = String::from_utf8_lossy(&first).into_owned();
    while let Some(chunk) = body.next().await {
        rest.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
    }
    let events = sse_data(&rest);
    assert_eq!(events.last().unwrap(), "[DONE]", "{rest}");
    let usage: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    let status = tokio::task::spawn_blocking(move || {
        let s = agent.wait(Duration::from_secs(60));
        (s, agent)
    })
    .await
    .unwrap();
    assert!(status.0.success(), "{:?}", status.0);
    let records = status.1.dump();
    assert_eq!(records.len(), 1);
    assert_eq!(
        records[0]["billed_tokens"].as_u64().unwrap(),
        total(&usage["usage"])
    );
    assert_eq!(records[0]["imsi"], IMSI);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_usage_log_gets_503_and_serves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    // A log budget of a few records, and no core to acknowledge them.
    let extra = "\n[limits]\nimsi_requests_per_second = 0\n\n[log]\nsegment_bytes = 4096\nbudget_bytes = 4096\n";
    let agent = Agent::with_extra(dir.path(), extra);
    agent.grant(IMSI, 100_000).await;
    let mut served = 0;
    let refused = loop {
        let r = agent.chat(IMSI, "hi", 2, false).await;
        match r.status().as_u16() {
            200 => served += 1,
            503 => break r,
            s => panic!("status {s}"),
        }
        assert!(served < 100, "the log never filled");
    };
    assert!(served >= 1);
    assert!(refused.headers().contains_key("retry-after"));
    let v: Value = refused.json().await.unwrap();
    assert_eq!(v["error"]["code"], "usage_log_unavailable", "{v}");
    // Nothing was served or billed for the refused request.
    let rows = agent.usage(IMSI, served).await;
    assert_eq!(rows.len(), served);
    let billed: u64 = rows
        .iter()
        .map(|r| r["billed_tokens"].as_u64().unwrap())
        .sum();
    assert_eq!(agent.remaining(IMSI).await, 100_000 - billed);
    let ready = agent
        .http
        .get(format!("{}/readyz", agent.api))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 503);
}
