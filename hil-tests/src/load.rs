//! A bounded load of apps' requests against the MEC API, and what each
//! client saw: the usage it was told, how many chunks a cancelled stream got,
//! the error it was refused with, or the connection breaking under it.
//!
//! The plan is fixed by a seed (the same requests every run); the order in
//! which workers take them is not. A request that cannot connect (the agent
//! restarting) was never sent, so it is sent again, within a time bound.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{json, Value};

/// The prompts the plan uses (chat messages, or text for completions).
pub const PROMPTS: [&str; 4] = [
    "What is MEC?",
    "Name three colours.",
    "Say hello to a field technician.",
    "Why do cell towers need power?",
];

/// The prompt cancelled streams use: it makes a long answer.
pub const LONG_PROMPT: &str = "Write a long story about a cell tower in the mountains.";

/// What a request is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A chat completion, streamed or not.
    Chat {
        /// Streamed (with `include_usage`).
        stream: bool,
    },
    /// A text completion, not streamed.
    Completion,
    /// A streamed chat the client drops after `after` content chunks.
    Cancel {
        /// Content chunks read before dropping.
        after: u64,
    },
    /// A body that is not JSON: 400.
    BadJson,
    /// An IMSI with letters in it: 400.
    BadImsi,
    /// A key no app has: 401.
    WrongKey,
    /// A body over the agent's limit: 413.
    Oversize,
    /// A model the box does not serve: 404.
    UnknownModel,
}

impl Kind {
    /// The HTTP status a request of this kind must be refused with, if it
    /// is malformed.
    pub fn malformed_status(self) -> Option<u16> {
        match self {
            Kind::BadJson | Kind::BadImsi => Some(400),
            Kind::WrongKey => Some(401),
            Kind::Oversize => Some(413),
            Kind::UnknownModel => Some(404),
            _ => None,
        }
    }
}

/// One planned request.
#[derive(Debug, Clone)]
pub struct Planned {
    /// Its place in the plan.
    pub index: usize,
    /// The subscriber.
    pub imsi: String,
    /// What it is.
    pub kind: Kind,
    /// Index into [`PROMPTS`] (cancelled streams use [`LONG_PROMPT`]).
    pub prompt: usize,
    /// `max_tokens`.
    pub max_tokens: u64,
    /// Which of the target's models it asks for: 0, or 1 for the second
    /// (every other request, when the target has one).
    pub model: usize,
}

impl Planned {
    /// The prompt text sent.
    pub fn prompt_text(&self) -> &'static str {
        match self.kind {
            Kind::Cancel { .. } => LONG_PROMPT,
            _ => PROMPTS[self.prompt],
        }
    }
}

/// A fixed plan of `count` requests over `imsis`: mostly chats (half of them
/// streamed), some text completions, one in ten cancelled mid-stream, one in
/// twelve malformed in one of five ways.
pub fn plan(imsis: &[String], count: usize, seed: u64) -> Vec<Planned> {
    let mut rng = seed | 1;
    let mut next = move |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };
    (0..count)
        .map(|index| {
            let imsi = imsis[index % imsis.len()].clone();
            let kind = match next(24) {
                0..=9 => Kind::Chat { stream: false },
                10..=16 => Kind::Chat { stream: true },
                17..=18 => Kind::Completion,
                19..=20 => Kind::Cancel { after: 2 },
                _ => match next(5) {
                    0 => Kind::BadJson,
                    1 => Kind::BadImsi,
                    2 => Kind::WrongKey,
                    3 => Kind::Oversize,
                    _ => Kind::UnknownModel,
                },
            };
            let max_tokens = match kind {
                Kind::Cancel { .. } => 48,
                _ => 4 + next(13),
            };
            Planned {
                index,
                imsi,
                kind,
                prompt: next(PROMPTS.len() as u64) as usize,
                max_tokens,
                model: index % 2,
            }
        })
        .collect()
}

/// The usage a client was told.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ToldUsage {
    /// Prompt tokens.
    pub prompt_tokens: u64,
    /// Of which served from the prefix cache.
    pub cached_prompt_tokens: u64,
    /// Completion tokens.
    pub completion_tokens: u64,
}

/// What the client saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// An answer with its usage.
    Completed {
        /// The request id (the usage record's `record_id`, hex).
        request_id: String,
        /// The usage told.
        usage: ToldUsage,
    },
    /// A stream the client dropped after `chunks` content chunks.
    Cancelled {
        /// The request id.
        request_id: String,
        /// Content chunks received.
        chunks: u64,
    },
    /// An error answer.
    Refused {
        /// HTTP status.
        status: u16,
        /// The OpenAI error code (or type).
        code: String,
    },
    /// The connection broke after the request was sent (the agent killed).
    Interrupted {
        /// The request id, when the headers had arrived.
        request_id: Option<String>,
        /// Content chunks of a stream received before the break.
        chunks: u64,
        /// What broke.
        error: String,
    },
    /// Anything else: always a failure of the test.
    Unexpected {
        /// What happened.
        detail: String,
    },
}

/// A planned request and what came of it.
#[derive(Debug, Clone)]
pub struct Done {
    /// The request.
    pub planned: Planned,
    /// What the client saw.
    pub outcome: Outcome,
    /// Times it could not connect before it was sent.
    pub unreachable: u32,
}

/// Where and as whom the load is sent.
#[derive(Debug, Clone)]
pub struct ApiTarget {
    /// `http://host:port` of the MEC API.
    pub base_url: String,
    /// The app's key.
    pub app_key: String,
    /// The model id.
    pub model: String,
    /// A second model, asked for by every other request.
    pub second_model: Option<String>,
}

impl ApiTarget {
    /// The model `p` asks for.
    pub fn model_for(&self, p: &Planned) -> &str {
        match (p.model, &self.second_model) {
            (1, Some(second)) => second,
            _ => &self.model,
        }
    }
}

/// How long a request keeps trying to connect (an agent restarting).
const CONNECT_PATIENCE: Duration = Duration::from_secs(90);
/// The most a request may take once sent.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

/// Runs `plan` with `concurrency` workers; `progress` counts finished
/// requests (fault scripts watch it).
pub async fn run(
    target: ApiTarget,
    plan: Vec<Planned>,
    concurrency: usize,
    progress: Arc<AtomicUsize>,
) -> Vec<Done> {
    let http = reqwest::Client::builder()
        .timeout(REQUEST_TIMEOUT)
        .build()
        .expect("an HTTP client");
    let queue = Arc::new(std::sync::Mutex::new(plan.into_iter()));
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let (queue, http, target, progress) = (
            queue.clone(),
            http.clone(),
            target.clone(),
            progress.clone(),
        );
        workers.push(tokio::spawn(async move {
            let mut done = Vec::new();
            loop {
                let Some(p) = queue.lock().unwrap().next() else {
                    break;
                };
                done.push(send_with_patience(&http, &target, p).await);
                progress.fetch_add(1, Ordering::SeqCst);
            }
            done
        }));
    }
    let mut all = Vec::new();
    for w in workers {
        all.extend(w.await.expect("a load worker panicked"));
    }
    all.sort_by_key(|d| d.planned.index);
    all
}

async fn send_with_patience(http: &reqwest::Client, target: &ApiTarget, p: Planned) -> Done {
    let started = Instant::now();
    let mut unreachable = 0;
    loop {
        match send(http, target, &p).await {
            Err(NotSent(e)) => {
                unreachable += 1;
                if started.elapsed() > CONNECT_PATIENCE {
                    return Done {
                        planned: p,
                        outcome: Outcome::Unexpected {
                            detail: format!("could not connect for {CONNECT_PATIENCE:?}: {e}"),
                        },
                        unreachable,
                    };
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            // No grant covers the request and the box cannot get one now
            // (its link to the core is down): a client retries after the
            // Retry-After it is given, within the same patience.
            Ok(Outcome::Refused { status: 503, code })
                if code == "quota_unavailable" && started.elapsed() < CONNECT_PATIENCE =>
            {
                unreachable += 1;
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Ok(outcome) => {
                return Done {
                    planned: p,
                    outcome,
                    unreachable,
                }
            }
        }
    }
}

/// The request never left: safe to send again.
struct NotSent(String);

fn body(target: &ApiTarget, p: &Planned) -> String {
    let model = match p.kind {
        Kind::UnknownModel => "no-such-model".to_string(),
        _ => target.model_for(p).to_string(),
    };
    match p.kind {
        Kind::BadJson => "{\"model\": \"x\", \"messages\": [".to_string(),
        Kind::Oversize => "x".repeat(5 << 20),
        Kind::Completion => json!({
            "model": model, "prompt": p.prompt_text(), "max_tokens": p.max_tokens, "temperature": 0,
        })
        .to_string(),
        Kind::Chat { stream } => chat(&model, p, stream),
        Kind::Cancel { .. } => chat(&model, p, true),
        _ => chat(&model, p, false),
    }
}

fn chat(model: &str, p: &Planned, stream: bool) -> String {
    json!({
        "model": model,
        "messages": [{ "role": "user", "content": p.prompt_text() }],
        "max_tokens": p.max_tokens,
        "temperature": 0,
        "stream": stream,
        "stream_options": { "include_usage": true },
    })
    .to_string()
}

async fn send(http: &reqwest::Client, target: &ApiTarget, p: &Planned) -> Result<Outcome, NotSent> {
    let path = match p.kind {
        Kind::Completion => "/v1/completions",
        _ => "/v1/chat/completions",
    };
    let key = match p.kind {
        Kind::WrongKey => "sk-not-a-key-of-this-box",
        _ => &target.app_key,
    };
    let imsi = match p.kind {
        Kind::BadImsi => "00101abc0000001",
        _ => &p.imsi,
    };
    let sent = http
        .post(format!("{}{path}", target.base_url))
        .bearer_auth(key)
        .header("X-Subscriber-Imsi", imsi)
        .header("Content-Type", "application/json")
        .body(body(target, p))
        .send()
        .await;
    let response = match sent {
        Ok(r) => r,
        Err(e) if e.is_connect() => return Err(NotSent(e.to_string())),
        Err(e) => {
            return Ok(Outcome::Interrupted {
                request_id: None,
                chunks: 0,
                error: format!("{e:#}"),
            })
        }
    };
    let status = response.status().as_u16();
    let request_id = response
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    if status != 200 {
        let text = response.text().await.unwrap_or_default();
        let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        let code = v["error"]["code"]
            .as_str()
            .or(v["error"]["type"].as_str())
            .unwrap_or("")
            .to_string();
        return Ok(if code.is_empty() {
            Outcome::Unexpected {
                detail: format!("{status} without an OpenAI error: {text}"),
            }
        } else {
            Outcome::Refused { status, code }
        });
    }
    let Some(request_id) = request_id else {
        return Ok(Outcome::Unexpected {
            detail: "a 200 without x-request-id".into(),
        });
    };
    let streamed = matches!(p.kind, Kind::Chat { stream: true } | Kind::Cancel { .. });
    if !streamed {
        return Ok(match response.json::<Value>().await {
            Ok(v) => match told_usage(&v["usage"]) {
                Some(usage) => Outcome::Completed { request_id, usage },
                None => Outcome::Unexpected {
                    detail: format!("an answer without usage: {v}"),
                },
            },
            Err(e) => Outcome::Interrupted {
                request_id: Some(request_id),
                chunks: 0,
                error: format!("{e:#}"),
            },
        });
    }
    let cancel_after = match p.kind {
        Kind::Cancel { after } => Some(after),
        _ => None,
    };
    Ok(read_stream(response, request_id, cancel_after).await)
}

fn told_usage(u: &Value) -> Option<ToldUsage> {
    Some(ToldUsage {
        prompt_tokens: u["prompt_tokens"].as_u64()?,
        cached_prompt_tokens: u["prompt_tokens_details"]["cached_tokens"].as_u64()?,
        completion_tokens: u["completion_tokens"].as_u64()?,
    })
}

/// Reads server-sent events: content chunks, then the usage chunk and
/// `[DONE]`; drops the stream after `cancel_after` content chunks.
async fn read_stream(
    response: reqwest::Response,
    request_id: String,
    cancel_after: Option<u64>,
) -> Outcome {
    let mut bytes = response.bytes_stream();
    let (mut pending, mut chunks, mut usage) = (String::new(), 0u64, None);
    loop {
        let piece = match bytes.next().await {
            Some(Ok(b)) => b,
            Some(Err(e)) => {
                return Outcome::Interrupted {
                    request_id: Some(request_id),
                    chunks,
                    error: format!("{e:#}"),
                }
            }
            None => {
                return Outcome::Interrupted {
                    request_id: Some(request_id),
                    chunks,
                    error: "the stream ended without [DONE]".into(),
                }
            }
        };
        pending.push_str(&String::from_utf8_lossy(&piece));
        while let Some(end) = pending.find("\n\n") {
            let event: String = pending.drain(..end + 2).collect();
            for data in event.lines().filter_map(|l| l.strip_prefix("data:")) {
                let data = data.trim();
                if data == "[DONE]" {
                    return match usage {
                        Some(usage) => Outcome::Completed { request_id, usage },
                        None => Outcome::Unexpected {
                            detail: "a stream ended without its usage chunk".into(),
                        },
                    };
                }
                let v: Value = match serde_json::from_str(data) {
                    Ok(v) => v,
                    Err(e) => {
                        return Outcome::Unexpected {
                            detail: format!("an event that is not JSON ({e}): {data}"),
                        }
                    }
                };
                if v.get("error").is_some() {
                    return Outcome::Unexpected {
                        detail: format!("an error inside the stream: {v}"),
                    };
                }
                if let Some(u) = told_usage(&v["usage"]) {
                    usage = Some(u);
                }
                let content = v["choices"][0]["delta"]["content"].as_str();
                if content.is_some_and(|c| !c.is_empty()) {
                    chunks += 1;
                    if cancel_after.is_some_and(|n| chunks >= n) {
                        // Dropping the body closes the connection: the
                        // agent sees the client leave.
                        return Outcome::Cancelled { request_id, chunks };
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plan_is_fixed_by_its_seed_and_has_every_kind() {
        let imsis: Vec<String> = (0..20).map(|i| format!("0010100000001{i:02}")).collect();
        let a = plan(&imsis, 200, 7);
        let b = plan(&imsis, 200, 7);
        assert_eq!(format!("{a:?}"), format!("{b:?}"));
        for kind in [
            Kind::Chat { stream: false },
            Kind::Chat { stream: true },
            Kind::Completion,
            Kind::Cancel { after: 2 },
            Kind::BadJson,
            Kind::BadImsi,
            Kind::WrongKey,
            Kind::Oversize,
            Kind::UnknownModel,
        ] {
            assert!(a.iter().any(|p| p.kind == kind), "no {kind:?} in the plan");
        }
        assert!(imsis.iter().all(|i| a.iter().any(|p| &p.imsi == i)));
    }
}
