//! The MEC API handlers: who is calling, what they ask, the reservation,
//! generation, and the answer once its usage record is durable.
//!
//! Every generation runs in a task of its own (`run_generation`) that
//! outlives the HTTP exchange: if the client goes away, the task cancels the
//! generation (within one decode step), still settles and records what was
//! made, and only the answer is lost.

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::stream::{self, StreamExt};
use mec_inference::engine::{Delta, FinishReason, GenerateRequest, SubmitError, Summary};
use mec_metering::Imsi;
use serde_json::json;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::sync::mpsc;

use mec_billing::tally::TallyError;
use mec_billing::{Admission, Admit, RequestInfo, Settled, Usage};
use mec_sync::record::Outcome;

use super::error::ApiError;
use super::openai::{parse_body, ChatRequest, CompletionRequest, Sampling};
use super::AppState;

/// The header naming the subscriber.
pub const IMSI_HEADER: &str = "x-subscriber-imsi";

/// An app allowed to call, from the configuration.
#[derive(Debug, Clone)]
pub struct App {
    /// App id.
    pub id: String,
    /// SHA-256 of its key.
    pub key_digest: [u8; 32],
    /// IMSI prefixes it may bill.
    pub imsi_prefixes: Vec<String>,
    /// Models it may use (`*`: all).
    pub models: Vec<String>,
}

/// The app whose key is in `Authorization: Bearer …`. Every app's digest is
/// compared, in constant time, whatever matches.
fn authenticate<'a>(apps: &'a [App], headers: &HeaderMap) -> Result<&'a App, ApiError> {
    let value = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| ApiError::unauthorized("missing Authorization: Bearer <app key>"))?;
    let key = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .ok_or_else(|| ApiError::unauthorized("the Authorization header is not a bearer key"))?
        .trim();
    let digest: [u8; 32] = Sha256::digest(key.as_bytes()).into();
    let mut found = None;
    for app in apps {
        if bool::from(app.key_digest.ct_eq(&digest)) {
            found = Some(app);
        }
    }
    found.ok_or_else(|| ApiError::unauthorized("invalid app key"))
}

fn subscriber(headers: &HeaderMap, app: &App) -> Result<Imsi, ApiError> {
    let raw = headers
        .get(IMSI_HEADER)
        .ok_or_else(|| ApiError::invalid("missing_imsi", "missing X-Subscriber-Imsi"))?
        .to_str()
        .map_err(|_| ApiError::invalid("invalid_imsi", "X-Subscriber-Imsi is not text"))?;
    let imsi = Imsi::parse(raw)
        .map_err(|e| ApiError::invalid("invalid_imsi", format!("X-Subscriber-Imsi: {e}")))?;
    if !app.imsi_prefixes.iter().any(|p| imsi.has_prefix(p)) {
        return Err(ApiError::forbidden(
            "imsi_not_allowed",
            format!("this app may not bill IMSI {imsi} (outside its PLMN prefixes)"),
        ));
    }
    Ok(imsi)
}

/// A request checked and ready to reserve (the handlers check the model
/// first, before any templating).
struct Prepared {
    info: RequestInfo,
    prompt: Vec<u32>,
    params: mec_inference::sampling::SamplingParams,
    /// Most completion tokens asked (already capped to the context).
    max_completion: u64,
    stream: bool,
    include_usage: bool,
}

fn check_model(state: &AppState, app: &App, model: &str) -> Result<(), ApiError> {
    if model != state.config.model.id {
        return Err(ApiError::model_not_found(model));
    }
    if !app.models.iter().any(|m| m == "*" || m == model) {
        return Err(ApiError::forbidden(
            "model_not_allowed",
            format!("this app may not use the model {model:?}"),
        ));
    }
    Ok(())
}

/// Bytes read past the limit before answering 413: a client still sending
/// when the answer comes sees a reset instead of the 413, so a moderately
/// oversized body is read to its end (and thrown away); beyond this the
/// connection is cut.
const DRAIN_LIMIT: usize = 64 << 20;

/// Reads the body up to `api.max_body_bytes`; 413 beyond it.
async fn body_bytes(state: &AppState, body: Body) -> Result<Bytes, ApiError> {
    let limit = state.config.api.max_body_bytes;
    let read = async {
        let mut stream = body.into_data_stream();
        let mut buf = Vec::new();
        let mut total = 0usize;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk
                .map_err(|e| ApiError::invalid("invalid_body", format!("reading the body: {e}")))?;
            total += chunk.len();
            if total <= limit {
                buf.extend_from_slice(&chunk);
            } else if total > DRAIN_LIMIT {
                break;
            }
        }
        if total > limit {
            return Err(ApiError::too_large(limit));
        }
        Ok(Bytes::from(buf))
    };
    tokio::time::timeout(
        std::time::Duration::from_secs(state.config.api.request_timeout_s),
        read,
    )
    .await
    .map_err(|_| ApiError::invalid("invalid_body", "the body did not arrive in time"))?
}

fn prepare(
    state: &AppState,
    model: &str,
    sampling: &Sampling,
    prompt_text: String,
    imsi: Imsi,
    app: &App,
) -> Result<Prepared, ApiError> {
    let max_tokens = sampling.max_tokens()?;
    let params = sampling.params()?;
    let prompt = state
        .engine
        .tokenizer()
        .encode(&prompt_text)
        .map_err(|e| ApiError::invalid("invalid_prompt", e))?;
    let context = state.engine.model().config().context_length as u64;
    let n = prompt.len() as u64;
    if n == 0 {
        return Err(ApiError::invalid("invalid_prompt", "the prompt is empty"));
    }
    if n >= context {
        return Err(ApiError {
            param: Some("messages"),
            ..ApiError::invalid(
                "context_length_exceeded",
                format!("the prompt has {n} tokens; the model's context holds {context}, with one for the answer"),
            )
        });
    }
    let room = context - n;
    Ok(Prepared {
        info: RequestInfo {
            request_id: uuid::Uuid::now_v7(),
            imsi,
            app: app.id.clone(),
            model: model.to_string(),
            started: SystemTime::now(),
            started_at: Instant::now(),
        },
        prompt,
        params,
        max_completion: max_tokens.unwrap_or(room).min(room),
        stream: sampling.stream,
        include_usage: sampling.include_usage(),
    })
}

/// What the generation task tells the response.
enum Event {
    Delta(Delta),
    Done(Box<Summary>, Result<Usage, ApiError>),
}

/// Reserves, submits, and spawns the task that runs the generation to its
/// settlement. Returns the event stream of the answer.
async fn start(state: &Arc<AppState>, p: &mut Prepared) -> Result<mpsc::Receiver<Event>, ApiError> {
    if state.draining.load(Ordering::Relaxed) {
        return Err(ApiError::unavailable(
            "shutting_down",
            "the agent is shutting down",
        ));
    }
    let metering_started = Instant::now();
    // Rate limits, room in the log, the reservation (with a core: from its
    // grants, asked for when none covers it), a stream's slot. The
    // admission holds the reservation until it settles or is dropped.
    let admission = state
        .billing
        .admit_or_ask(Admit {
            info: &p.info,
            prompt_tokens: p.prompt.len() as u64,
            max_completion: p.max_completion,
            stream: p.stream,
        })
        .await?;
    let reserve_time = metering_started.elapsed();
    // The reservation caps what may be generated.
    let cap = admission.completion_cap();
    let mut params = p.params.clone();
    params.max_tokens = Some(cap as usize);
    let generation = match state.engine.submit(GenerateRequest {
        prompt: std::mem::take(&mut p.prompt),
        params,
        subscriber: p.info.imsi.to_string(),
    }) {
        Ok(g) => g,
        Err(e) => {
            drop(admission); // releases the reservation and the slot
            return Err(match e {
                SubmitError::Overloaded(n) => ApiError::unavailable(
                    "overloaded",
                    format!("the model is overloaded ({n} requests waiting); retry shortly"),
                ),
                SubmitError::ShuttingDown => {
                    ApiError::unavailable("shutting_down", "the agent is shutting down")
                }
                other => ApiError::invalid("invalid_request", other.to_string()),
            });
        }
    };
    let (tx, rx) = mpsc::channel(64);
    let state = state.clone();
    let info = p.info.clone();
    tokio::spawn(async move {
        let billed = Billed {
            info,
            admission,
            reserve_time,
        };
        run_generation(state, billed, generation, tx).await
    });
    Ok(rx)
}

/// What a generation is billed against.
struct Billed {
    info: RequestInfo,
    /// The reservation and, for a stream, its in-flight slot.
    admission: Admission,
    reserve_time: std::time::Duration,
}

/// Forwards deltas while the client listens, cancels when it leaves, then
/// settles and records what was made, and sends the last event.
async fn run_generation(
    state: Arc<AppState>,
    billed: Billed,
    generation: mec_inference::engine::Generation,
    events: mpsc::Sender<Event>,
) {
    let Billed {
        info,
        mut admission,
        reserve_time,
    } = billed;
    let mec_inference::engine::Generation {
        mut deltas,
        summary,
        cancel,
    } = generation;
    let _inflight = state.inflight.register(cancel.clone());
    let mut tally_failed = false;
    let mut tally = |r: Result<(), TallyError>| {
        if let Err(e) = r {
            if !std::mem::replace(&mut tally_failed, true) {
                tracing::error!(error = %e, request_id = %info.request_id, "in-flight tally; a crash now would leave this stream unbilled");
            }
        }
    };
    loop {
        tokio::select! {
            d = deltas.recv() => match d {
                Some(d) => {
                    // Counted before the client can have it.
                    tally(admission.count(d.token_ids.len() as u64));
                    if events.send(Event::Delta(d)).await.is_err() {
                        tally(admission.client_left());
                        cancel.store(true, Ordering::Relaxed);
                        break;
                    }
                }
                None => break,
            },
            _ = events.closed() => {
                tally(admission.client_left());
                cancel.store(true, Ordering::Relaxed);
                break;
            }
        }
    }
    drop(deltas);
    let summary = summary.await.unwrap_or_else(|_| Summary {
        prompt_tokens: 0,
        cached_prompt_tokens: 0,
        completion_tokens: 0,
        finish_reason: FinishReason::Error,
        ttft: Default::default(),
        decode_time: Default::default(),
        queue_time: Default::default(),
        error: Some("the engine stopped".into()),
    });
    let m = &state.metrics;
    m.add_tokens(&info.model, "prompt", summary.prompt_tokens as u64);
    m.add_tokens(&info.model, "cached", summary.cached_prompt_tokens as u64);
    m.add_tokens(&info.model, "completion", summary.completion_tokens as u64);
    if summary.completion_tokens > 0 {
        m.ttft.observe(summary.ttft.as_secs_f64());
    }
    if summary.completion_tokens > 1 {
        let per = summary.decode_time.as_secs_f64() / (summary.completion_tokens - 1) as f64;
        for _ in 1..summary.completion_tokens.min(4096) {
            m.inter_token.observe(per);
        }
    }
    let settle_started = Instant::now();
    let settled = Settled {
        prompt_tokens: summary.prompt_tokens as u64,
        cached_prompt_tokens: summary.cached_prompt_tokens as u64,
        completion_tokens: summary.completion_tokens as u64,
        outcome: match summary.finish_reason {
            FinishReason::Stop => Outcome::Completed,
            FinishReason::Length => Outcome::Length,
            FinishReason::Cancelled => Outcome::Cancelled,
            FinishReason::Error => Outcome::Failed,
        },
        ttft: summary.ttft,
        failure_reason: summary.error.clone(),
    };
    // A stream whose record cannot be written keeps its slot and hold and is
    // billed once the log has room (billing does that).
    let usage = admission.settle(&settled).await.map_err(ApiError::from);
    m.metering
        .observe((reserve_time + settle_started.elapsed()).as_secs_f64());
    let _ = events.send(Event::Done(Box::new(summary), usage)).await;
}

fn finish_reason(r: FinishReason) -> &'static str {
    match r {
        FinishReason::Stop | FinishReason::Cancelled => "stop",
        FinishReason::Length => "length",
        FinishReason::Error => "error",
    }
}

fn usage_json(u: &Usage) -> serde_json::Value {
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": { "cached_tokens": u.cached_tokens },
    })
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Chat,
    Completions,
}

/// The header carrying the request id (the usage record's `record_id` in hex):
/// a streaming client has it before the first token.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// The answer, with the request id header.
async fn respond(endpoint: Endpoint, p: &Prepared, rx: mpsc::Receiver<Event>) -> Response {
    let mut response = respond_body(endpoint, p, rx).await;
    if let Ok(v) = axum::http::HeaderValue::from_str(&p.info.request_id.simple().to_string()) {
        response.headers_mut().insert(REQUEST_ID_HEADER, v);
    }
    response
}

/// The answer: one JSON object, or server-sent events.
async fn respond_body(endpoint: Endpoint, p: &Prepared, mut rx: mpsc::Receiver<Event>) -> Response {
    let request_id = p.info.request_id.simple().to_string();
    let id = match endpoint {
        Endpoint::Chat => format!("chatcmpl-{request_id}"),
        Endpoint::Completions => format!("cmpl-{request_id}"),
    };
    let created = mec_billing::unix_now();
    let model = p.info.model.clone();
    if !p.stream {
        let mut text = String::new();
        while let Some(ev) = rx.recv().await {
            match ev {
                Event::Delta(d) => text.push_str(&d.text),
                Event::Done(summary, usage) => {
                    let usage = match usage {
                        Ok(u) => u,
                        Err(e) => return e.into_response(),
                    };
                    if summary.finish_reason == FinishReason::Error {
                        return ApiError::internal(format!(
                            "generation failed: {}",
                            summary.error.unwrap_or_default()
                        ))
                        .into_response();
                    }
                    let choice = match endpoint {
                        Endpoint::Chat => json!({
                            "index": 0,
                            "message": { "role": "assistant", "content": text },
                            "finish_reason": finish_reason(summary.finish_reason),
                            "logprobs": null,
                        }),
                        Endpoint::Completions => json!({
                            "index": 0,
                            "text": text,
                            "finish_reason": finish_reason(summary.finish_reason),
                            "logprobs": null,
                        }),
                    };
                    let object = match endpoint {
                        Endpoint::Chat => "chat.completion",
                        Endpoint::Completions => "text_completion",
                    };
                    return Json(json!({
                        "id": id,
                        "object": object,
                        "created": created,
                        "model": model,
                        "choices": [choice],
                        "usage": usage_json(&usage),
                    }))
                    .into_response();
                }
            }
        }
        return ApiError::internal("the generation ended without a result").into_response();
    }
    let object = match endpoint {
        Endpoint::Chat => "chat.completion.chunk",
        Endpoint::Completions => "text_completion",
    };
    let chunk = move |choices: serde_json::Value, usage: Option<serde_json::Value>| {
        let mut v = json!({ "id": id, "object": object, "created": created, "model": model, "choices": choices });
        if let Some(u) = usage {
            v["usage"] = u;
        }
        SseEvent::default().data(v.to_string())
    };
    let include_usage = p.include_usage;
    let first = match endpoint {
        Endpoint::Chat => Some(chunk(
            json!([{ "index": 0, "delta": { "role": "assistant", "content": "" }, "finish_reason": null }]),
            None,
        )),
        Endpoint::Completions => None,
    };
    let body = tokio_stream::wrappers::ReceiverStream::new(rx).flat_map(move |ev| {
        let events: Vec<SseEvent> = match ev {
            Event::Delta(d) if d.text.is_empty() => Vec::new(),
            Event::Delta(d) => vec![match endpoint {
                Endpoint::Chat => chunk(
                    json!([{ "index": 0, "delta": { "content": d.text }, "finish_reason": null }]),
                    None,
                ),
                Endpoint::Completions => chunk(
                    json!([{ "index": 0, "text": d.text, "finish_reason": null, "logprobs": null }]),
                    None,
                ),
            }],
            Event::Done(summary, usage) => {
                let mut out = Vec::new();
                match usage {
                    Err(e) => out.push(SseEvent::default().data(e.body().to_string())),
                    Ok(_) if summary.finish_reason == FinishReason::Error => out.push(
                        SseEvent::default().data(
                            ApiError::internal(format!("generation failed: {}", summary.error.clone().unwrap_or_default()))
                                .body()
                                .to_string(),
                        ),
                    ),
                    Ok(u) => {
                        let fr = finish_reason(summary.finish_reason);
                        out.push(match endpoint {
                            Endpoint::Chat => chunk(json!([{ "index": 0, "delta": {}, "finish_reason": fr }]), None),
                            Endpoint::Completions => chunk(
                                json!([{ "index": 0, "text": "", "finish_reason": fr, "logprobs": null }]),
                                None,
                            ),
                        });
                        if include_usage {
                            out.push(chunk(json!([]), Some(usage_json(&u))));
                        }
                    }
                }
                out.push(SseEvent::default().data("[DONE]"));
                out
            }
        };
        stream::iter(events.into_iter().map(Ok::<_, Infallible>))
    });
    let all = stream::iter(first.into_iter().map(Ok::<_, Infallible>)).chain(body);
    Sse::new(all)
        .keep_alive(KeepAlive::default())
        .into_response()
}

/// `POST /v1/chat/completions`.
pub async fn chat_completions(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let run = async {
        let app = authenticate(&state.apps, &headers)?;
        let imsi = subscriber(&headers, app)?;
        let body = body_bytes(&state, body).await?;
        let req: ChatRequest = parse_body(&body)?;
        let messages = req.chat_messages()?;
        check_model(&state, app, &req.model)?;
        let text = state
            .engine
            .tokenizer()
            .apply_chat_template(&messages)
            .map_err(|e| ApiError::invalid("invalid_messages", e))?;
        let mut p = prepare(&state, &req.model, &req.sampling, text, imsi, app)?;
        let rx = start(&state, &mut p).await?;
        Ok::<_, ApiError>((p, rx))
    };
    match run.await {
        Ok((p, rx)) => respond(Endpoint::Chat, &p, rx).await,
        Err(e) => e.into_response(),
    }
}

/// `POST /v1/completions`.
pub async fn completions(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let run = async {
        let app = authenticate(&state.apps, &headers)?;
        let imsi = subscriber(&headers, app)?;
        let body = body_bytes(&state, body).await?;
        let mut req: CompletionRequest = parse_body(&body)?;
        // OpenAI's default for this endpoint.
        if req.sampling.max_tokens.is_none() && req.sampling.max_completion_tokens.is_none() {
            req.sampling.max_tokens = Some(16);
        }
        check_model(&state, app, &req.model)?;
        let text = req.prompt_text()?.to_string();
        let mut p = prepare(&state, &req.model, &req.sampling, text, imsi, app)?;
        let rx = start(&state, &mut p).await?;
        Ok::<_, ApiError>((p, rx))
    };
    match run.await {
        Ok((p, rx)) => respond(Endpoint::Completions, &p, rx).await,
        Err(e) => e.into_response(),
    }
}

/// `GET /v1/models`.
pub async fn models(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Err(e) = authenticate(&state.apps, &headers) {
        return e.into_response();
    }
    Json(json!({
        "object": "list",
        "data": [{
            "id": state.config.model.id,
            "object": "model",
            "created": state.started_unix,
            "owned_by": state.config.node.id,
        }],
    }))
    .into_response()
}

/// `GET /healthz`: the process answers.
pub async fn healthz() -> Response {
    Json(json!({ "status": "ok" })).into_response()
}

/// `GET /readyz`: model loaded, log writable and not full, not draining.
pub async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    if state.draining.load(Ordering::Relaxed) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": "draining" })),
        )
            .into_response();
    }
    // Room in the log for a record, as admission asks (not when metering is off).
    let log_ok = match state.billing.enabled() {
        true => state
            .log
            .check_accepting(mec_billing::TYPICAL_RECORD_BYTES)
            .map_err(|e| ApiError::from(mec_billing::BillingError::LogUnavailable(e))),
        false => Ok(()),
    };
    match log_ok {
        Ok(()) => {
            // The log's backend shows whether io_uring survived the unit's
            // system call filter (else the agent took pwrite + fdatasync).
            // The device shows whether the model runs on the GPU the box was
            // bought for, or on the CPU and why.
            Json(json!({
                "status": "ready",
                "model": state.config.model.id,
                "log_backend": state.log.backend().as_str(),
                "device": state.device,
                "gpus": state.gpu_snapshot(),
            }))
            .into_response()
        }
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": "not_ready", "reason": e.message })),
        )
            .into_response(),
    }
}

/// `GET /metrics`.
pub async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let stats = state.engine.stats();
    let log = state.log.stats();
    let sync = {
        let state = state.clone();
        tokio::task::spawn_blocking(move || state.sync_view())
            .await
            .unwrap_or(None)
    };
    let snap = super::metrics::Snapshot {
        queue_depth: stats.queued,
        busy_slots: stats.busy_slots,
        kv_pool: state.engine.model().kv_pool_usage(),
        kv_preemptions: stats.preemptions,
        reservations: state.billing.open_reservations(),
        backlog_records: log.backlog_records,
        backlog_bytes: log.backlog_bytes,
        gpus: state.gpu_snapshot(),
        device: Some(state.device.clone()),
        sync,
    };
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(&snap),
    )
        .into_response()
}
