//! `kill -9` of a serving agent under load, then a restart: every balance
//! equals its grants minus the tokens of the records in the usage log.

mod common;

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
    for imsi in imsis {
        for c in 0..3 {
            let req = agent
                .post("/v1/chat/completions", imsi)
                .json(&agent.chat_body(&format!("Tell me fact number {c}."), 12, c == 0));
            clients.push(tokio::spawn(async move {
                let mut ok = 0;
                for _ in 0..200 {
                    let Some(r) = req.try_clone() else { break };
                    match r.send().await {
                        Ok(resp) => match resp.text().await {
                            Ok(_) => ok += 1,
                            Err(_) => break,
                        },
                        Err(_) => break,
                    }
                }
                ok
            }));
        }
    }
    tokio::time::sleep(Duration::from_millis(2500)).await;
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
