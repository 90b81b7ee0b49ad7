//! Packages rated per model (issue 25), over real HTTP with two real model
//! files: one subscriber's package spent on both at the operator's signed
//! rates, the balance moving by exactly the rated units and the records
//! saying how; a package for one tier refusing the other model; `auto`
//! routing to the cheapest model and falling back when it is unloaded; a
//! rate table with a bad signature or an older version refused, the old one
//! staying, also across a restart.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sha2::Digest;

use crate::common::{bin, Agent, IMSI};
use crate::models::{chat, chat_body, configure, model_toml, q4_model, q8_model, LARGE, SMALL};

const OTHER_IMSI: &str = "001010000000002";

/// A rate table of `version`: the small model one unit a token (tier
/// "entry"), the large one 4 / 0.25 / `completion` (tier "flagship").
fn table(version: u64, completion: u32) -> String {
    format!(
        "version = {version}\n\
         [[models]]\nid = \"{SMALL}\"\ntier = \"entry\"\nprompt = 1\ncached = 1\ncompletion = 1\n\
         [[models]]\nid = \"{LARGE}\"\ntier = \"flagship\"\nprompt = 4\ncached = 0.25\ncompletion = {completion}\n"
    )
}

/// Writes `text` to `path` and signs it with `key` (`edge-agent sign-rates`).
fn write_signed(path: &Path, text: &str, key: &Path) {
    std::fs::write(path, text).unwrap();
    let out = Command::new(bin())
        .args(["sign-rates", "--key"])
        .arg(key)
        .arg("--table")
        .arg(path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The units a chat answer costs at the large model's rate (4 / 0.25 / c).
fn large_units(usage: &Value, completion_price: u64) -> u64 {
    let prompt = usage["prompt_tokens"].as_u64().unwrap();
    let cached = usage["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap_or(0);
    let completion = usage["completion_tokens"].as_u64().unwrap();
    ((prompt - cached) * 4000 + cached * 250 + completion * completion_price * 1000).div_ceil(1000)
}

fn small_units(usage: &Value) -> u64 {
    usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap()
}

async fn put_rates(agent: &Agent, dir: &Path, name: &str) -> (u16, Value) {
    let path = dir.join(name);
    let r = agent
        .admin_http
        .put(format!("{}/admin/v1/rates", agent.admin))
        .json(&json!({
            "table": std::fs::read_to_string(&path).unwrap(),
            "signature": std::fs::read_to_string(dir.join(format!("{name}.sig"))).unwrap(),
        }))
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

async fn remaining_of(agent: &Agent, imsi: &str) -> u64 {
    agent.balance(imsi).await["remaining_tokens"]
        .as_u64()
        .unwrap()
}

/// Waits (bounded) until the store applied `n` records: balances are read
/// after that.
async fn wait_applied(agent: &Agent, imsi: &str, n: usize) {
    let rows = agent.usage(imsi, n).await;
    assert!(rows.len() >= n, "{} of {n} records applied", rows.len());
}

#[tokio::test(flavor = "multi_thread")]
async fn one_package_pays_two_models_at_their_signed_rates_and_routes_pick_by_price() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    mec_image::manifest::generate_signing_key(&d.join("operator.key"), &d.join("operator.pub"))
        .unwrap();
    write_signed(
        &d.join("rates.toml"),
        &table(1, 16),
        &d.join("operator.key"),
    );
    let models_toml = model_toml(SMALL, &q4_model(), "") + &model_toml(LARGE, &q8_model(), "");
    let extra = format!(
        "\n[rating]\ntable = \"rates.toml\"\nkey = \"operator.pub\"\n\
         \n[[routes]]\nname = \"auto\"\nmodels = [\"{LARGE}\", \"{SMALL}\"]\n\
         \n[[routes]]\nname = \"best\"\npolicy = \"first\"\nmodels = [\"tier:flagship\", \"{SMALL}\"]\n"
    );
    // The table and the key sit beside the configuration (paths in it are
    // relative to it).
    let (config, key) = configure(d, &models_toml, &extra);
    assert_eq!(config.parent().unwrap(), d);
    let agent = Agent::serve(d, &config, &key);
    agent.grant(IMSI, 1_000_000).await;
    let digest = hex::encode(sha2::Sha256::digest(table(1, 16).as_bytes()));
    let rates = agent
        .get_json(format!("{}/admin/v1/rates", agent.admin))
        .await;
    assert_eq!(
        (rates["version"].as_u64(), rates["digest"].as_str()),
        (Some(1), Some(digest.as_str()))
    );

    // The same subscriber, one package, both models, twice each.
    let mut expected = 0;
    let mut seen = Vec::new();
    for (model, prompt) in [
        (SMALL, "Name a colour."),
        (LARGE, "Name a colour."),
        (SMALL, "Name a fruit."),
        (LARGE, "Name a fruit."),
    ] {
        let (status, body) = chat(&agent, model, prompt, 12).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["model"], model);
        let units = match model {
            SMALL => small_units(&body["usage"]),
            _ => large_units(&body["usage"], 16),
        };
        expected += units;
        seen.push((model, units));
    }
    wait_applied(&agent, IMSI, 4).await;
    assert_eq!(
        remaining_of(&agent, IMSI).await,
        1_000_000 - expected,
        "the balance moved by exactly the rated units"
    );
    let records = agent.dump();
    assert_eq!(records.len(), 4);
    for (r, (model, units)) in records.iter().zip(&seen) {
        assert_eq!(r["model_id"], *model);
        assert_eq!(r["billed_units"].as_u64(), Some(*units), "{r}");
        let debits: u64 = r["debits"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["tokens"].as_u64().unwrap())
            .sum();
        assert_eq!(debits, *units, "the debits add up to the units: {r}");
        assert_eq!(
            r["billed_tokens"].as_u64().unwrap(),
            r["prompt_tokens"].as_u64().unwrap() + r["completion_tokens"].as_u64().unwrap(),
            "the raw tokens as before"
        );
        assert_eq!(
            (r["rate_version"].as_u64(), r["rate_digest"].as_str()),
            (Some(1), Some(digest.as_str()))
        );
    }
    assert!(
        seen[1].1 > 4 * seen[0].1,
        "the flagship costs more: {seen:?}"
    );

    // A package for the entry tier only: the flagship is refused, naming it.
    let r = agent
        .admin_http
        .post(format!("{}/admin/v1/grants", agent.admin))
        .json(&json!({ "imsi": OTHER_IMSI, "tokens": 10_000, "models": ["entry"] }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let bucket = r.json::<Value>().await.unwrap()["bucket_id"]
        .as_u64()
        .unwrap();
    let refused = agent
        .post("/v1/chat/completions", OTHER_IMSI)
        .json(&chat_body(LARGE, "Hi", 4, false))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 403);
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "model_not_covered", "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains(&format!("package {bucket} is for entry"))
            && message.contains(&format!("the model {LARGE} or the tier flagship")),
        "{message}"
    );
    let ok = agent
        .post("/v1/chat/completions", OTHER_IMSI)
        .json(&chat_body(SMALL, "Hi", 4, false))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    // `auto` for that subscriber: the flagship is not covered, the small one is.
    let routed = agent
        .post("/v1/chat/completions", OTHER_IMSI)
        .json(&chat_body("auto", "Hi", 4, false))
        .send()
        .await
        .unwrap();
    assert_eq!(routed.status(), 200);
    assert_eq!(routed.json::<Value>().await.unwrap()["model"], SMALL);

    // `auto` (cheapest first): the small model, though listed second.
    let (status, body) = chat(&agent, "auto", "Hi", 4).await;
    assert_eq!(
        (status, body["model"].as_str()),
        (200, Some(SMALL)),
        "{body}"
    );
    // `best` (tier flagship first): the large one.
    let (status, body) = chat(&agent, "best", "Hi", 4).await;
    assert_eq!(
        (status, body["model"].as_str()),
        (200, Some(LARGE)),
        "{body}"
    );
    // The small one unloaded: `auto` falls back to the large one (and the
    // small one starts loading again).
    let r = agent
        .admin_http
        .post(format!("{}/admin/v1/models/{SMALL}/unload", agent.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (status, body) = chat(&agent, "auto", "Hi", 4).await;
    assert_eq!(
        (status, body["model"].as_str()),
        (200, Some(LARGE)),
        "{body}"
    );
    let listed = agent.get_json(format!("{}/v1/models", agent.api)).await;
    let auto = listed["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == "auto")
        .unwrap()
        .clone();
    assert_eq!(auto["route"]["policy"], "cheapest", "{auto}");

    // Tables: a bad signature and an older version are refused, the one in
    // force stays; a newer one is taken, and rates the next requests.
    write_signed(&d.join("v2.toml"), &table(2, 8), &d.join("operator.key"));
    std::fs::write(d.join("forged.toml"), table(3, 1)).unwrap();
    std::fs::copy(d.join("v2.toml.sig"), d.join("forged.toml.sig")).unwrap();
    let (status, body) = put_rates(&agent, d, "forged.toml").await;
    assert_eq!(status, 409, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("signature"),
        "{body}"
    );
    let (status, body) = put_rates(&agent, d, "rates.toml").await;
    assert_eq!(status, 409, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not newer"),
        "{body}"
    );
    let (status, body) = put_rates(&agent, d, "v2.toml").await;
    assert_eq!((status, body["version"].as_u64()), (200, Some(2)), "{body}");
    wait_applied(&agent, IMSI, 7).await;
    let before = remaining_of(&agent, IMSI).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let body = loop {
        let (status, body) = chat(&agent, LARGE, "Name a colour.", 12).await;
        if status == 200 {
            break body;
        }
        assert!(Instant::now() < deadline, "{body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let units = large_units(&body["usage"], 8);
    let records = agent.dump();
    let last = records.last().unwrap();
    assert_eq!(
        (last["rate_version"].as_u64(), last["billed_units"].as_u64()),
        (Some(2), Some(units))
    );
    wait_applied(&agent, IMSI, 8).await;
    assert_eq!(remaining_of(&agent, IMSI).await, before - units);

    // A restart with version 1 still configured: version 2 stays in force.
    drop(agent);
    let agent = Agent::serve(d, &config, &key);
    let rates = agent
        .get_json(format!("{}/admin/v1/rates", agent.admin))
        .await;
    assert_eq!(rates["version"].as_u64(), Some(2), "{rates}");
    assert_eq!(rates["kept"], json!([1, 2]));
}
