//! `cargo xtask bench-models`: what several models on one box cost (issue
//! 25). Two genuinely different files (the real model, and its weights
//! requantised to Q8_0 by `edge-agent requantize`), both loaded on demand,
//! over real HTTP: per model and round, the time to load it (the agent's
//! own `last_load_ms`, and the admin's load waited for), to unload it, and
//! the first request's latency on the model cold (unloaded: `503
//! model_loading`, retried every 20 ms, until answered) against warm (the
//! same request again); and how the two share the box: each model's decode
//! rate alone, then both decoding at once. Writes
//! bench/out/models-bench.json.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::{json, Value};

use crate::{output, release_agent, root};

const IMSI: &str = "001010000000001";

struct Agent {
    child: Child,
    api: String,
    admin: String,
    token: String,
    key: String,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(agent: &Path, dir: &Path, models: &[(&str, &Path)]) -> anyhow::Result<Agent> {
    let init: Value = serde_json::from_str(&output(
        Command::new(agent).args(["init", "--dir"]).arg(dir).args([
            "--api-listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ]),
    )?)?;
    let config = init["config"].as_str().context("config")?.to_string();
    let text = std::fs::read_to_string(&config)?;
    // init's [model] (path, id, a blank line) replaced by on-demand models.
    let start = text.find("[model]\n").context("[model] in init's config")?;
    let end = start + text[start..].find("\n\n").context("the end of [model]")?;
    let mut text = format!("{}{}", &text[..start], &text[end..]);
    for (id, path) in models {
        text.push_str(&format!(
            "\n[[models]]\nid = \"{id}\"\npath = \"{}\"\nload = \"on_demand\"\n",
            path.display()
        ));
    }
    text.push_str("\n[limits]\nimsi_requests_per_second = 0\nimsi_tokens_per_minute = 0\n");
    std::fs::write(&config, text)?;
    let mut child = Command::new(agent)
        .args(["serve", "--config", &config])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let line = BufReader::new(child.stdout.take().unwrap())
        .lines()
        .next()
        .context("no ready line")??;
    let ready: Value = serde_json::from_str(&line)?;
    Ok(Agent {
        child,
        api: ready["api_url"].as_str().unwrap_or_default().into(),
        admin: ready["admin_url"].as_str().unwrap_or_default().into(),
        token: std::fs::read_to_string(ready["admin_token_file"].as_str().unwrap_or_default())?
            .trim()
            .to_string(),
        key: init["app_key"].as_str().unwrap_or_default().into(),
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// One request (max_tokens 1) until it is answered: its latency from the
/// first try, and how many `503 model_loading` came first.
async fn first_answer(
    http: &reqwest::Client,
    a: &Agent,
    model: &str,
) -> anyhow::Result<(f64, u32)> {
    let body = json!({
        "model": model,
        "messages": [{ "role": "user", "content": "Say yes." }],
        "max_tokens": 1,
        "temperature": 0,
    });
    let t = Instant::now();
    let mut refused = 0;
    loop {
        let r = http
            .post(format!("{}/v1/chat/completions", a.api))
            .bearer_auth(&a.key)
            .header("X-Subscriber-Imsi", IMSI)
            .json(&body)
            .send()
            .await?;
        let status = r.status();
        let v: Value = r.json().await?;
        if status.is_success() {
            return Ok((t.elapsed().as_secs_f64() * 1e3, refused));
        }
        anyhow::ensure!(
            status == 503 && v["error"]["code"] == "model_loading",
            "{model}: {status} {v}"
        );
        refused += 1;
        anyhow::ensure!(
            t.elapsed() < Duration::from_secs(120),
            "{model} never loaded"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn admin_ms(
    http: &reqwest::Client,
    a: &Agent,
    model: &str,
    action: &str,
) -> anyhow::Result<f64> {
    let t = Instant::now();
    let r = http
        .post(format!("{}/admin/v1/models/{model}/{action}", a.admin))
        .bearer_auth(&a.token)
        .send()
        .await?;
    anyhow::ensure!(
        r.status().is_success(),
        "{action} {model}: {}",
        r.text().await?
    );
    Ok(t.elapsed().as_secs_f64() * 1e3)
}

async fn last_load_ms(http: &reqwest::Client, a: &Agent, model: &str) -> anyhow::Result<f64> {
    let v: Value = http
        .get(format!("{}/admin/v1/models", a.admin))
        .bearer_auth(&a.token)
        .send()
        .await?
        .json()
        .await?;
    v["models"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["id"] == model))
        .and_then(|m| m["last_load_ms"].as_f64())
        .context("last_load_ms")
}

/// Streams per model, and tokens each, in the sharing measurement.
const SHARING_STREAMS: usize = 2;
const SHARING_TOKENS: u64 = 96;

/// Decode tokens/s of each of `models` while all of them run
/// `SHARING_STREAMS` requests of `SHARING_TOKENS` tokens at once (the
/// end-of-turn token banned, so every request makes all of them).
async fn decode_rate(
    http: &reqwest::Client,
    a: &Agent,
    models: &[&str],
) -> anyhow::Result<Vec<f64>> {
    let mut tasks = Vec::new();
    for model in models {
        for i in 0..SHARING_STREAMS {
            let (http, url, key) = (
                http.clone(),
                format!("{}/v1/completions", a.api),
                a.key.clone(),
            );
            let body = json!({
                "model": model,
                "prompt": format!("Story {i}: once upon a time"),
                "max_tokens": SHARING_TOKENS,
                "temperature": 0,
                // SmolLM2's end-of-turn and end-of-text tokens.
                "logit_bias": { "0": -100, "2": -100 },
            });
            tasks.push(tokio::spawn(async move {
                let t = Instant::now();
                let v: Value = http
                    .post(url)
                    .bearer_auth(key)
                    .header("X-Subscriber-Imsi", IMSI)
                    .json(&body)
                    .send()
                    .await?
                    .json()
                    .await?;
                let n = v["usage"]["completion_tokens"].as_f64().context("usage")?;
                Ok::<_, anyhow::Error>((n, t.elapsed().as_secs_f64()))
            }));
        }
    }
    let mut per_model = vec![(0.0, 0.0f64); models.len()];
    for (i, t) in tasks.into_iter().enumerate() {
        let (n, secs) = t.await??;
        let m = &mut per_model[i / SHARING_STREAMS];
        m.0 += n;
        m.1 = m.1.max(secs);
    }
    Ok(per_model.into_iter().map(|(n, secs)| n / secs).collect())
}

/// Runs `rounds` rounds per model and writes the report.
pub fn bench(rounds: usize) -> anyhow::Result<()> {
    let root = root();
    let q4 = crate::model::ensure(&root)?;
    let agent = release_agent()?;
    let out = root.join("bench/out");
    std::fs::create_dir_all(&out)?;
    let q8 = out.join("smollm2-135m-q8_0.gguf");
    if !q8.exists() {
        output(
            Command::new(&agent)
                .args(["requantize", "--to", "q8_0", "--out"])
                .arg(&q8)
                .arg("--model")
                .arg(&q4),
        )?;
    }
    let models = [
        ("smollm2-q4_1", q4.as_path()),
        ("smollm2-q8_0", q8.as_path()),
    ];
    let dir = tempfile::tempdir()?;
    let a = start(&agent, dir.path(), &models)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let report = rt.block_on(async {
        let http = reqwest::Client::new();
        let r = http
            .post(format!("{}/admin/v1/grants", a.admin))
            .bearer_auth(&a.token)
            .json(&json!({ "imsi": IMSI, "tokens": 1_000_000_000u64 }))
            .send()
            .await?;
        anyhow::ensure!(r.status().is_success(), "grant: {}", r.status());
        let mut per_model = serde_json::Map::new();
        for (id, path) in &models {
            let (mut cold, mut warm, mut load, mut admin_load, mut unload, mut refusals) =
                (vec![], vec![], vec![], vec![], vec![], vec![]);
            for round in 1..=rounds {
                // Cold: not loaded; the request starts the load.
                let (c, refused) = first_answer(&http, &a, id).await?;
                load.push(last_load_ms(&http, &a, id).await?);
                let (w, _) = first_answer(&http, &a, id).await?;
                unload.push(admin_ms(&http, &a, id, "unload").await?);
                admin_load.push(admin_ms(&http, &a, id, "load").await?);
                unload.push(admin_ms(&http, &a, id, "unload").await?);
                eprintln!("{id} round {round}: cold {c:.1} ms ({refused} × 503), warm {w:.1} ms");
                cold.push(c);
                warm.push(w);
                refusals.push(f64::from(refused));
            }
            let bytes = std::fs::metadata(path)?.len();
            let (c, w) = (median(cold.clone()), median(warm.clone()));
            per_model.insert(
                id.to_string(),
                json!({
                    "file_bytes": bytes,
                    "load_ms": median(load),
                    "admin_load_ms": median(admin_load),
                    "unload_ms": median(unload),
                    "cold_first_request_ms": c,
                    "warm_request_ms": w,
                    "cold_over_warm": c / w,
                    "refusals_before_cold_answer": median(refusals),
                    "runs": { "cold_ms": cold, "warm_ms": warm },
                }),
            );
        }
        // Sharing: each model decoding alone, then both at once.
        for (id, _) in &models {
            admin_ms(&http, &a, id, "load").await.ok();
        }
        let mut alone = serde_json::Map::new();
        for (id, _) in &models {
            alone.insert(
                id.to_string(),
                json!(decode_rate(&http, &a, &[id]).await?[0]),
            );
        }
        let ids: Vec<&str> = models.iter().map(|(id, _)| *id).collect();
        let together = decode_rate(&http, &a, &ids).await?;
        let together: serde_json::Map<String, Value> = ids
            .iter()
            .zip(&together)
            .map(|(id, r)| (id.to_string(), json!(r)))
            .collect();
        Ok::<_, anyhow::Error>(json!({
            "command": "cargo xtask bench-models",
            "rounds": rounds,
            "models": per_model,
            "sharing": {
                "streams_per_model": SHARING_STREAMS,
                "tokens_per_stream": SHARING_TOKENS,
                "alone_tokens_per_s": alone,
                "together_tokens_per_s": together,
            },
        }))
    })?;
    println!(
        "{:<14} {:>10} {:>10} {:>10} {:>12} {:>10}",
        "median", "load ms", "unload ms", "cold ms", "warm ms", "cold/warm"
    );
    for (id, v) in report["models"].as_object().into_iter().flatten() {
        let f = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
        println!(
            "{id:<14} {:>10.1} {:>10.1} {:>10.1} {:>12.1} {:>10.1}",
            f("load_ms"),
            f("unload_ms"),
            f("cold_first_request_ms"),
            f("warm_request_ms"),
            f("cold_over_warm")
        );
    }
    let sharing = &report["sharing"];
    for (id, alone) in sharing["alone_tokens_per_s"]
        .as_object()
        .into_iter()
        .flatten()
    {
        let together = sharing["together_tokens_per_s"][id]
            .as_f64()
            .unwrap_or(f64::NAN);
        let alone = alone.as_f64().unwrap_or(f64::NAN);
        println!(
            "{id}: {alone:.1} tokens/s alone, {together:.1} beside the other ({:.2} of alone)",
            together / alone
        );
    }
    let path = out.join("models-bench.json");
    std::fs::write(&path, serde_json::to_string_pretty(&report)?)?;
    println!("wrote {}", path.display());
    Ok(())
}
