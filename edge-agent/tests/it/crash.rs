//! `kill -9` of a serving agent under load, then a restart: every balance
//! equals its grants minus the tokens of the records in the usage log.

use crate::common;

use std::collections::HashMap;
use std::time::Duration;

use common::Agent;
use serde_json::Value;

const GRANT: u64 = 100_000;

#[tokio::test(flavor = "multi_thread")]
async fn after_kill_9_under_load_balances_equal_grants_minus_logged_records() {
    let dir = tempfile::tempdir().unwrap();
    let mut agent = Agent::with_extra(dir.path(), "\n[limits]\nimsi_requests_per_second = 0\n");
    let imsis = ["001010000000011", "001010000000012", "001010000000013"];
    for imsi in imsis {
        agent.grant(imsi, GRANT).await;
    }
    // Three clients per subscriber, each sending requests one after another
    // (bounded) until the agent dies under them.
    let mut clients = Vec::new();
    let completed = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    for imsi in imsis {
        for c in 0..3 {
            let req = agent
                .post("/v1/chat/completions", imsi)
                .json(&agent.chat_body(&format!("Tell me fact number {c}."), 12, c == 0));
            let completed = completed.clone();
            clients.push(tokio::spawn(async move {
                let mut ok = 0;
                for _ in 0..200 {
                    let Some(r) = req.try_clone() else { break };
                    match r.send().await {
                        Ok(resp) => match resp.text().await {
                            Ok(_) => {
                                ok += 1;
                                completed.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            }
                            Err(_) => break,
                        },
                        Err(_) => break,
                    }
                }
                ok
            }));
        }
    }
    // Killed under load, once a few requests went through (a slow machine,
    // or other tests loading models beside this one, may take a while).
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while completed.load(std::sync::atomic::Ordering::SeqCst) < 3
        && std::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    agent.signal(libc::SIGKILL);
    let mut answered = 0;
    for c in clients {
        answered += c.await.unwrap();
    }
    assert!(answered > 0, "no request completed before the kill");
    let status = agent.wait(Duration::from_secs(10));
    assert!(!status.success());
    let (config, key) = (agent.config.clone(), agent.key.clone());
    drop(agent);

    let mut agent = Agent::serve(dir.path(), &config, &key);
    let mut balances = HashMap::new();
    for imsi in imsis {
        balances.insert(imsi, agent.remaining(imsi).await);
    }
    agent.signal(libc::SIGTERM);
    let agent = tokio::task::spawn_blocking(move || {
        assert!(agent.wait(Duration::from_secs(60)).success());
        agent
    })
    .await
    .unwrap();
    let records: Vec<Value> = agent.dump();
    assert!(!records.is_empty());
    for imsi in imsis {
        let logged: u64 = records
            .iter()
            .filter(|r| r["imsi"] == imsi)
            .map(|r| r["billed_tokens"].as_u64().unwrap())
            .sum();
        let debited: u64 = records
            .iter()
            .filter(|r| r["imsi"] == imsi)
            .flat_map(|r| r["debits"].as_array().unwrap().clone())
            .map(|d| d["tokens"].as_u64().unwrap())
            .sum();
        assert_eq!(logged, debited, "{imsi}: billed_tokens and debits disagree");
        assert_eq!(balances[imsi], GRANT - logged, "{imsi}");
    }
}

/// Reads a stream until `n` content chunks arrived; the chunks read.
async fn read_content_chunks(resp: &mut reqwest::Response, n: usize) -> usize {
    let (mut pending, mut chunks) = (String::new(), 0);
    while chunks < n {
        let piece = resp
            .chunk()
            .await
            .expect("the stream broke early")
            .expect("the stream ended early");
        pending.push_str(&String::from_utf8_lossy(&piece));
        while let Some(end) = pending.find("\n\n") {
            let event: String = pending.drain(..end + 2).collect();
            for data in event.lines().filter_map(|l| l.strip_prefix("data:")) {
                let v: Value = serde_json::from_str(data.trim()).expect("a JSON event");
                if v["choices"][0]["delta"]["content"]
                    .as_str()
                    .is_some_and(|c| !c.is_empty())
                {
                    chunks += 1;
                }
            }
        }
    }
    chunks
}

fn request_id(resp: &reqwest::Response) -> String {
    let id = resp.headers()["x-request-id"].to_str().unwrap();
    uuid::Uuid::parse_str(id).unwrap().to_string()
}

/// Stops the agent with SIGTERM and returns its log's records.
async fn stop_and_dump(mut agent: Agent) -> Vec<Value> {
    agent.signal(libc::SIGTERM);
    tokio::task::spawn_blocking(move || {
        let status = agent.wait(Duration::from_secs(60));
        let log = agent.dir.join(format!("serve-{}.log", std::process::id()));
        assert!(
            status.success(),
            "{status}: {}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        agent.dump()
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn streams_cut_by_kill_9_are_billed_once_at_the_restart_for_what_they_sent() {
    let dir = tempfile::tempdir().unwrap();
    let mut agent = Agent::new(dir.path());
    let (reading, leaving) = ("001010000000021", "001010000000022");
    for imsi in [reading, leaving] {
        agent.grant(imsi, GRANT).await;
    }
    let story = "Write a long story about a lighthouse keeper and the sea.";
    let mut a = agent.chat(reading, story, 200, true).await;
    let mut b = agent.chat(leaving, story, 200, true).await;
    assert_eq!((a.status().as_u16(), b.status().as_u16()), (200, 200));
    let (id_a, id_b) = (request_id(&a), request_id(&b));
    let got_b = read_content_chunks(&mut b, 2).await;
    let got_a = read_content_chunks(&mut a, 3).await;
    // One client leaves, and the agent dies at once: whether or not it saw
    // the client go, the stream is on the bill. The other client is still
    // reading when the agent dies.
    drop(b);
    agent.signal(libc::SIGKILL);
    let mut rest = String::new();
    let cut = loop {
        match a.chunk().await {
            Ok(Some(piece)) => rest.push_str(&String::from_utf8_lossy(&piece)),
            Ok(None) => break !rest.contains("[DONE]"),
            Err(_) => break true,
        }
    };
    assert!(cut, "the stream finished before the kill: {rest}");
    assert!(!agent.wait(Duration::from_secs(10)).success());
    let (config, key) = (agent.config.clone(), agent.key.clone());
    drop(agent);

    let agent = Agent::serve(dir.path(), &config, &key);
    let remaining = [
        agent.remaining(reading).await,
        agent.remaining(leaving).await,
    ];
    let records = stop_and_dump(agent).await;
    let find = |id: &str| -> Value {
        let found: Vec<&Value> = records.iter().filter(|r| r["record_id"] == id).collect();
        assert_eq!(found.len(), 1, "records of {id}: {found:?}");
        found[0].clone()
    };
    let (ra, rb) = (find(&id_a), find(&id_b));
    assert_eq!(ra["imsi"], reading);
    assert_eq!(ra["outcome"], "OUTCOME_FAILED", "{ra}");
    assert!(
        ra["completion_tokens"].as_u64().unwrap() >= got_a as u64,
        "{got_a} chunks reached the client: {ra}"
    );
    assert_eq!(rb["imsi"], leaving);
    assert!(
        ["OUTCOME_CANCELLED", "OUTCOME_FAILED"].contains(&rb["outcome"].as_str().unwrap()),
        "{rb}"
    );
    assert!(
        rb["completion_tokens"].as_u64().unwrap() >= got_b as u64,
        "{rb}"
    );
    for (r, left) in [(&ra, remaining[0]), (&rb, remaining[1])] {
        let billed = r["billed_tokens"].as_u64().unwrap();
        assert!(r["prompt_tokens"].as_u64().unwrap() > 0, "{r}");
        assert_eq!(
            billed,
            r["prompt_tokens"].as_u64().unwrap() + r["completion_tokens"].as_u64().unwrap()
        );
        assert_eq!(left, GRANT - billed, "{r}");
    }

    // A second start bills nothing again.
    let agent = Agent::serve(dir.path(), &config, &key);
    assert_eq!(agent.remaining(reading).await, remaining[0]);
    let again = stop_and_dump(agent).await;
    assert_eq!(again.len(), records.len());
}
