//! The MEC API handlers: who is calling, what they ask, the reservation,
//! generation, and the answer once its usage record is durable.
//!
//! Every generation runs in a task of its own (`run_generation`) that
//! outlives the HTTP exchange: if the client goes away, the task cancels the
//! generation (within one decode step), still settles and records what was
//! made, and only the answer is lost.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::stream::StreamExt;
use mec_inference::constraint::{Constraint, SchemaError, SchemaLimits};
use mec_inference::engine::{FinishReason, GenerateRequest, Generation, SubmitError, Summary};
use mec_inference::registry::{Lease, Unavailable};
use mec_inference::tokenizer::Tokenizer;
use mec_metering::Imsi;
use serde_json::json;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::sync::mpsc;

use mec_billing::tally::TallyError;
use mec_billing::{Admission, Admit, RequestDetail, RequestInfo, Settled};
use mec_sync::record::Outcome;

use super::error::ApiError;
use super::openai::{parse_body, ChatRequest, CompletionRequest, Sampling};
use super::response::{respond, Endpoint, Event, Output, Shape};
use super::tools::Tools;
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
    /// The model, held until the generation ends (then moved into its task).
    lease: Option<Lease>,
    /// Its tokenizer (the answer decodes with it).
    tokenizer: Arc<Tokenizer>,
    info: RequestInfo,
    prompt: Vec<u32>,
    params: mec_inference::sampling::SamplingParams,
    /// Most completion tokens asked per choice (already capped to the context).
    max_completion: u64,
    /// Choices (`n`).
    choices: usize,
    /// The grammar the output follows, if any.
    constraint: Option<Constraint>,
    /// How the output is read back.
    output: Output,
    stream: bool,
    include_usage: bool,
}

/// Whether `app` may use the model `spec` (named `name` by the request).
fn app_may_use(app: &App, name: &str, spec: &mec_inference::registry::ModelSpec) -> bool {
    app.models
        .iter()
        .any(|m| m == "*" || m == name || *m == spec.id || spec.aliases.contains(m))
}

/// The models a request naming `name` may go to, in the order to try:
/// a route's candidates (`[[routes]]`: tiers expanded through the rate
/// table in force, ordered by its policy, those the app may not use left
/// out), or `name` alone.
fn candidates(state: &AppState, app: &App, name: &str) -> Result<(Vec<String>, bool), ApiError> {
    use crate::config::RoutePolicy;
    let Some(route) = state.config.routes.iter().find(|r| r.name == name) else {
        return Ok((vec![name.to_string()], false));
    };
    if !app.models.iter().any(|m| m == "*" || m == name) {
        return Err(ApiError::forbidden(
            "model_not_allowed",
            format!("this app may not use the model {name:?}"),
        ));
    }
    let table = state.rates.current();
    let mut ids: Vec<String> = Vec::new();
    for c in &route.models {
        match c.strip_prefix("tier:") {
            Some(tier) => ids.extend(
                state
                    .config
                    .models
                    .iter()
                    .filter(|m| {
                        table
                            .as_ref()
                            .and_then(|t| t.model(&m.id))
                            .is_some_and(|r| r.tier.as_deref() == Some(tier))
                    })
                    .map(|m| m.id.clone()),
            ),
            None => ids.push(c.clone()),
        }
    }
    let mut seen = std::collections::HashSet::new();
    ids.retain(|id| seen.insert(id.clone()));
    ids.retain(|id| {
        state
            .models
            .resolve(id)
            .is_some_and(|spec| app_may_use(app, id, spec))
    });
    if route.policy == RoutePolicy::Cheapest {
        // A stable sort: equal prices (no table) keep the order given.
        ids.sort_by_key(|id| {
            let rate = state
                .rates
                .rate_for(id)
                .map(|a| a.rate)
                .unwrap_or(mec_billing::Rate::UNIT);
            rate.prompt_milli + rate.completion_milli
        });
    }
    if ids.is_empty() {
        return Err(ApiError::unavailable(
            "no_model",
            format!(
                "the route {name:?} has no model to try: its tiers name none in the rate table in force, \
                 or this app may use none of its models"
            ),
        ));
    }
    Ok((ids, true))
}

/// Whether a routed request tries its next candidate after `e`: the model
/// cannot take it now (loading, unloading, failed, no room, overloaded,
/// its context too small, unrated, or not covered by the packages).
fn falls_through(e: &ApiError) -> bool {
    [
        "model_loading",
        "model_unloading",
        "model_capacity",
        "model_failed",
        "overloaded",
        "context_length_exceeded",
        "model_unrated",
        "model_not_covered",
    ]
    .contains(&e.code)
}

/// The model a request names (an id or an alias), held for the request:
/// 404 for a name no model has, 403 for a model the app may not use, 503
/// (with `Retry-After`) while it loads or unloads, or when its load failed.
/// `may_load`: a model that is not loaded starts loading (else it is only
/// reported as not ready: a route's first pass).
fn lease_model(state: &AppState, app: &App, name: &str, may_load: bool) -> Result<Lease, ApiError> {
    let spec = state
        .models
        .resolve(name)
        .ok_or_else(|| ApiError::model_not_found(name))?;
    if !app_may_use(app, name, spec) {
        return Err(ApiError::forbidden(
            "model_not_allowed",
            format!("this app may not use the model {name:?}"),
        ));
    }
    // A model the rate table does not price is refused before it is loaded
    // (a load may evict others).
    state
        .rates
        .rate_for(&spec.id)
        .map_err(|e| ApiError::unavailable("model_unrated", e.to_string()))?;
    let leased = match may_load {
        true => state.models.lease(name),
        false => state.models.lease_if_loaded(name),
    };
    leased.map_err(|e| match e {
        Unavailable::Unknown => ApiError::model_not_found(name),
        Unavailable::Loading { id, retry_after } => ApiError {
            retry_after: Some(retry_after.as_secs().max(1)),
            ..ApiError::unavailable(
                "model_loading",
                format!(
                    "the model {id} is loading; retry in {} s",
                    retry_after.as_secs().max(1)
                ),
            )
        },
        Unavailable::Unloading { id } => ApiError::unavailable(
            "model_unloading",
            format!(
                "the model {id} is being unloaded; it can be loaded again once its requests end"
            ),
        ),
        Unavailable::Failed {
            id,
            reason,
            transient: true,
        } => ApiError {
            retry_after: Some(5),
            ..ApiError::unavailable(
                "model_capacity",
                format!("the model {id} cannot be loaded now: {reason}"),
            )
        },
        Unavailable::Failed { id, reason, .. } => ApiError {
            retry_after: None,
            ..ApiError::unavailable(
                "model_failed",
                format!("the model {id} failed to load: {reason}"),
            )
        },
    })
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

#[allow(clippy::too_many_arguments)]
fn prepare(
    state: &AppState,
    lease: Lease,
    sampling: &Sampling,
    prompt_text: String,
    imsi: Imsi,
    app: &App,
    endpoint: Endpoint,
) -> Result<Prepared, ApiError> {
    let max_tokens = sampling.max_tokens()?;
    let engine = lease.engine();
    let tokenizer = engine.tokenizer();
    let params = sampling.params(endpoint == Endpoint::Chat, tokenizer.vocab_size())?;
    let slots = engine.stats().slots;
    let choices = sampling.choices(state.config.api.max_choices(slots).min(slots))?;
    let end_user = sampling.end_user()?;
    let prompt = tokenizer
        .encode(&prompt_text)
        .map_err(|e| ApiError::invalid("invalid_prompt", e))?;
    let context = engine.model().config().context_length as u64;
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
    // The rate in force when the request starts: its reservation and bill.
    let rate = state
        .rates
        .rate_for(&lease.spec().id)
        .map_err(|e| ApiError::unavailable("model_unrated", e.to_string()))?;
    Ok(Prepared {
        tokenizer: engine.shared_tokenizer(),
        info: RequestInfo {
            request_id: uuid::Uuid::now_v7(),
            imsi,
            app: app.id.clone(),
            // The model's id, whatever name the request used: the record
            // and the answer name the model that served.
            model: lease.spec().id.clone(),
            started: SystemTime::now(),
            started_at: Instant::now(),
            detail: RequestDetail {
                end_user,
                choices: choices as u32,
                constraint: String::new(),
            },
            rate,
        },
        prompt,
        params,
        max_completion: max_tokens.unwrap_or(room).min(room),
        choices,
        constraint: None,
        output: Output::Text,
        stream: sampling.stream,
        include_usage: sampling.include_usage(),
        lease: Some(lease),
    })
}

/// The constraint a chat request's `response_format` or tools ask for,
/// compiled (a schema the engine cannot enforce is refused here, before
/// anything is reserved), with its name for the usage record and how the
/// output is read back.
fn constraint_for(
    state: &AppState,
    engine: &mec_inference::engine::Engine,
    sampling: &Sampling,
    tools: Option<&Tools>,
) -> Result<Option<(Constraint, &'static str, Output)>, ApiError> {
    let limits = SchemaLimits {
        max_bytes: state.config.api.max_schema_bytes,
        max_depth: state.config.api.max_schema_depth,
    };
    let format = sampling.response_format.as_ref().filter(|v| !v.is_null());
    let kind = match format {
        None => None,
        Some(v) => match v.get("type").and_then(|t| t.as_str()) {
            Some("text") => None,
            Some(k @ ("json_object" | "json_schema")) => Some(k),
            _ => {
                return Err(ApiError::invalid_param(
                    "response_format",
                    "response_format.type must be text, json_object or json_schema",
                ))
            }
        },
    };
    let (schema, name, param) = match (tools.filter(|t| t.offered()), kind) {
        (Some(_), Some(_)) => {
            return Err(ApiError {
                param: Some("response_format"),
                ..ApiError::invalid(
                    "unsupported_parameter",
                    "response_format together with tools is not supported: the tool format already constrains the output",
                )
            })
        }
        (Some(t), None) => (t.schema(), "tool_calls", "tools"),
        (None, Some("json_object")) => (serde_json::json!({"type": "object"}), "json_object", "response_format"),
        (None, Some(_)) => {
            let spec = format.and_then(|f| f.get("json_schema")).ok_or_else(|| {
                ApiError::invalid_param("response_format", "response_format.json_schema is missing")
            })?;
            let mut schema = spec.get("schema").cloned().ok_or_else(|| {
                ApiError::invalid_param(
                    "response_format",
                    "response_format.json_schema.schema is missing",
                )
            })?;
            if spec.get("strict").and_then(|s| s.as_bool()) == Some(true) {
                close_objects(&mut schema);
            }
            (schema, "json_schema", "response_format")
        }
        (None, None) => return Ok(None),
    };
    let constraint = engine
        .grammars()
        .json_schema(&schema, &limits)
        .map_err(|e| {
            let code = match e {
                SchemaError::TooLarge { .. } | SchemaError::TooDeep { .. } => "schema_too_large",
                SchemaError::Unsupported(_) => "unsupported_schema",
                SchemaError::Unavailable(_) => "unsupported_parameter",
            };
            ApiError {
                param: Some(param),
                ..ApiError::invalid(code, format!("{param}: {e}"))
            }
        })?;
    let output = match tools.filter(|t| t.offered()) {
        Some(_) => Output::Tools,
        None => Output::Text,
    };
    Ok(Some((constraint, name, output)))
}

/// Strict mode: an object schema with `properties` and no word on others
/// allows none, as OpenAI's strict schemas require. Walks the schema's
/// subschemas only (a property named `properties` is not a keyword).
fn close_objects(schema: &mut serde_json::Value) {
    use serde_json::Value;
    let Value::Object(o) = schema else { return };
    if o.contains_key("properties") && !o.contains_key("additionalProperties") {
        o.insert("additionalProperties".into(), Value::Bool(false));
    }
    for (key, sub) in o.iter_mut() {
        match key.as_str() {
            "properties" | "$defs" | "definitions" | "patternProperties" => {
                if let Value::Object(m) = sub {
                    m.values_mut().for_each(close_objects);
                }
            }
            "items" | "additionalProperties" | "not" | "if" | "then" | "else" => close_objects(sub),
            "anyOf" | "allOf" | "oneOf" | "prefixItems" => {
                if let Value::Array(a) = sub {
                    a.iter_mut().for_each(close_objects);
                }
            }
            _ => {}
        }
    }
}

/// Reserves, submits, and spawns the task that runs the generation to its
/// settlement. Returns the event stream of the answer.
/// `limits_taken`: the request's rate limits were taken by an earlier try
/// (a route's previous model); set once this try takes them.
async fn start(
    state: &Arc<AppState>,
    p: &mut Prepared,
    limits_taken: &mut bool,
) -> Result<mpsc::Receiver<Event>, ApiError> {
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
    let admit = Admit {
        info: &p.info,
        prompt_tokens: p.prompt.len() as u64,
        // Every choice may take its max_tokens; the prompt is billed once.
        max_completion: p.max_completion * p.choices as u64,
        // At least one token for each choice.
        min_completion: p.choices as u64,
        stream: p.stream,
    };
    let admitted = match *limits_taken {
        false => state.billing.admit_or_ask(admit).await,
        true => state.billing.admit_or_ask_again(admit).await,
    };
    // Past the rate limits (they are checked first): taken for this request.
    if !matches!(admitted, Err(mec_billing::BillingError::RateLimited { .. })) {
        *limits_taken = true;
    }
    let admission = admitted?;
    let reserve_time = metering_started.elapsed();
    // The reservation caps what may be generated, shared among the choices
    // (it covers at least one token each: `min_completion`).
    let per_choice = (admission.completion_cap() / p.choices as u64).max(1);
    let mut params = p.params.clone();
    params.max_tokens = Some(per_choice as usize);
    let lease = p.lease.take().expect("a prepared request holds its model");
    let generations = match lease.engine().submit_choices(GenerateRequest {
        prompt: std::mem::take(&mut p.prompt),
        params,
        subscriber: p.info.imsi.to_string(),
        constraint: p.constraint.take(),
        choices: p.choices,
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
        run_generation(state, billed, generations, tx).await;
        // The model may be evicted once its requests have ended.
        drop(lease);
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

/// Forwards every choice's deltas while the client listens, cancels them
/// all when it leaves, then settles and records what was made (the prompt
/// once, every choice's completion), and sends the last event.
async fn run_generation(
    state: Arc<AppState>,
    billed: Billed,
    generations: Vec<Generation>,
    events: mpsc::Sender<Event>,
) {
    let Billed {
        info,
        mut admission,
        reserve_time,
    } = billed;
    let mut cancels = Vec::with_capacity(generations.len());
    let mut summaries = Vec::with_capacity(generations.len());
    let mut streams = Vec::with_capacity(generations.len());
    for (i, g) in generations.into_iter().enumerate() {
        cancels.push(g.cancel);
        summaries.push(g.summary);
        streams.push(
            tokio_stream::wrappers::UnboundedReceiverStream::new(g.deltas).map(move |d| (i, d)),
        );
    }
    let _inflight: Vec<_> = cancels
        .iter()
        .map(|c| state.inflight.register(c.clone()))
        .collect();
    let cancel_all = || {
        cancels
            .iter()
            .for_each(|c| c.store(true, Ordering::Relaxed))
    };
    let mut tally_failed = false;
    let mut tally = |r: Result<(), TallyError>| {
        if let Err(e) = r {
            if !std::mem::replace(&mut tally_failed, true) {
                tracing::error!(error = %e, request_id = %info.request_id, "in-flight tally; a crash now would leave this stream unbilled");
            }
        }
    };
    let mut deltas = futures_util::stream::select_all(streams);
    loop {
        tokio::select! {
            d = deltas.next() => match d {
                Some((i, d)) => {
                    // Counted before the client can have it.
                    tally(admission.count(d.token_ids.len() as u64));
                    if events.send(Event::Delta(i, d)).await.is_err() {
                        tally(admission.client_left());
                        cancel_all();
                        break;
                    }
                }
                None => break,
            },
            _ = events.closed() => {
                tally(admission.client_left());
                cancel_all();
                break;
            }
        }
    }
    drop(deltas);
    let mut finished = Vec::with_capacity(summaries.len());
    for s in summaries {
        finished.push(s.await.unwrap_or_else(|_| Summary {
            prompt_tokens: 0,
            cached_prompt_tokens: 0,
            completion_tokens: 0,
            finish_reason: FinishReason::Error,
            ttft: Default::default(),
            decode_time: Default::default(),
            queue_time: Default::default(),
            error: Some("the engine stopped".into()),
        }));
    }
    let m = &state.metrics;
    for (i, summary) in finished.iter().enumerate() {
        // The prompt once: further choices copied its cache.
        if i == 0 {
            m.add_tokens(&info.model, "prompt", summary.prompt_tokens as u64);
            m.add_tokens(&info.model, "cached", summary.cached_prompt_tokens as u64);
        }
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
    }
    let settle_started = Instant::now();
    let settled = settled_of(&finished);
    // A stream whose record cannot be written keeps its slot and hold and is
    // billed once the log has room (billing does that).
    let usage = admission.settle(&settled).await.map_err(ApiError::from);
    m.metering
        .observe((reserve_time + settle_started.elapsed()).as_secs_f64());
    let _ = events.send(Event::Done(finished, usage)).await;
}

/// What the choices of one request bill: the prompt once (as the first
/// choice prefilled it), every choice's completion tokens, and the worst
/// way any of them ended.
fn settled_of(choices: &[Summary]) -> Settled {
    let first = &choices[0];
    let worst = |s: &Summary| match s.finish_reason {
        FinishReason::Stop => 0,
        FinishReason::Length => 1,
        FinishReason::Cancelled => 2,
        FinishReason::Error => 3,
    };
    let ending = choices.iter().max_by_key(|s| worst(s)).unwrap_or(first);
    Settled {
        prompt_tokens: first.prompt_tokens as u64,
        cached_prompt_tokens: first.cached_prompt_tokens as u64,
        completion_tokens: choices.iter().map(|s| s.completion_tokens as u64).sum(),
        outcome: match ending.finish_reason {
            FinishReason::Stop => Outcome::Completed,
            FinishReason::Length => Outcome::Length,
            FinishReason::Cancelled => Outcome::Cancelled,
            FinishReason::Error => Outcome::Failed,
        },
        ttft: choices
            .iter()
            .filter(|s| s.completion_tokens > 0)
            .map(|s| s.ttft)
            .min()
            .unwrap_or_default(),
        failure_reason: choices.iter().find_map(|s| s.error.clone()),
    }
}

/// The header carrying the request id (the usage record's `record_id` in hex):
/// a streaming client has it before the first token.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// The answer, with the request id header.
async fn answer(endpoint: Endpoint, p: Prepared, rx: mpsc::Receiver<Event>) -> Response {
    let request_id = p.info.request_id.simple().to_string();
    let shape = Shape {
        endpoint,
        output: p.output,
        choices: p.choices,
        logprobs: p.params.logprobs.is_some(),
        stream: p.stream,
        include_usage: p.include_usage,
        id: match endpoint {
            Endpoint::Chat => format!("chatcmpl-{request_id}"),
            Endpoint::Completions => format!("cmpl-{request_id}"),
        },
        model: p.info.model.clone(),
    };
    let mut response = respond(shape, p.tokenizer.clone(), rx).await;
    if let Ok(v) = axum::http::HeaderValue::from_str(&request_id) {
        response.headers_mut().insert(REQUEST_ID_HEADER, v);
    }
    response
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
        let tools = req.sampling.tools()?;
        let messages = req.chat_messages(tools.as_ref())?;
        let (models, routed) = candidates(&state, app, &req.model)?;
        let mut first_refusal = None;
        let mut limits_taken = false;
        // A route tries its loaded models first: loading one may evict
        // another that could have served. Then any, loading the first it
        // can.
        let passes: &[bool] = if routed { &[false, true] } else { &[true] };
        let tries: Vec<(bool, &String)> = passes
            .iter()
            .flat_map(|&l| models.iter().map(move |m| (l, m)))
            .collect();
        for &(may_load, model) in &tries {
            let attempt = async {
                let lease = lease_model(&state, app, model, may_load)?;
                let text = lease
                    .engine()
                    .tokenizer()
                    .apply_chat_template(&messages)
                    .map_err(|e| ApiError::invalid("invalid_messages", e))?;
                let mut p = prepare(
                    &state,
                    lease,
                    &req.sampling,
                    text,
                    imsi.clone(),
                    app,
                    Endpoint::Chat,
                )?;
                // Compiling a schema is CPU work (about a millisecond, more
                // for a large one): off the async workers' turn.
                let engine = p.lease.as_ref().expect("held until start").engine();
                let constraint = tokio::task::block_in_place(|| {
                    constraint_for(&state, engine, &req.sampling, tools.as_ref())
                })?;
                if constraint.is_some() && !p.params.stop.is_empty() {
                    // A stop sequence would cut the document the constraint
                    // holds the output to: the answer would not parse.
                    return Err(ApiError {
                        param: Some("stop"),
                        ..ApiError::invalid(
                            "unsupported_parameter",
                            "stop sequences cannot be combined with response_format or tools: they would cut the JSON",
                        )
                    });
                }
                if let Some((constraint, name, output)) = constraint {
                    p.constraint = Some(constraint);
                    p.info.detail.constraint = name.to_string();
                    p.output = output;
                }
                let rx = start(&state, &mut p, &mut limits_taken).await?;
                Ok::<_, ApiError>((p, rx))
            };
            match attempt.await {
                Ok(started) => return Ok(started),
                Err(e) if routed && falls_through(&e) => {
                    tracing::debug!(route = %req.model, %model, code = e.code, "passed to the next model");
                    first_refusal.get_or_insert(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(first_refusal.expect("a route has a candidate"))
    };
    match run.await {
        Ok((p, rx)) => answer(Endpoint::Chat, p, rx).await,
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
        let text = req.prompt_text()?.to_string();
        let (models, routed) = candidates(&state, app, &req.model)?;
        let mut first_refusal = None;
        let mut limits_taken = false;
        let passes: &[bool] = if routed { &[false, true] } else { &[true] };
        let tries: Vec<(bool, &String)> = passes
            .iter()
            .flat_map(|&l| models.iter().map(move |m| (l, m)))
            .collect();
        for &(may_load, model) in &tries {
            let attempt = async {
                let lease = lease_model(&state, app, model, may_load)?;
                let mut p = prepare(
                    &state,
                    lease,
                    &req.sampling,
                    text.clone(),
                    imsi.clone(),
                    app,
                    Endpoint::Completions,
                )?;
                let rx = start(&state, &mut p, &mut limits_taken).await?;
                Ok::<_, ApiError>((p, rx))
            };
            match attempt.await {
                Ok(started) => return Ok(started),
                Err(e) if routed && falls_through(&e) => first_refusal.get_or_insert(e),
                Err(e) => return Err(e),
            };
        }
        Err(first_refusal.expect("a route has a candidate"))
    };
    match run.await {
        Ok((p, rx)) => answer(Endpoint::Completions, p, rx).await,
        Err(e) => e.into_response(),
    }
}

/// `GET /v1/models`: the models this app may use, each with its state
/// (`loaded`, `loading`, `unloaded`, `unloading`, `failed` and why), its
/// aliases and its memory estimate, beside OpenAI's fields.
pub async fn models(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    let app = match authenticate(&state.apps, &headers) {
        Ok(app) => app,
        Err(e) => return e.into_response(),
    };
    let data: Vec<serde_json::Value> = state
        .models
        .views()
        .into_iter()
        .filter(|v| {
            app.models
                .iter()
                .any(|m| m == "*" || *m == v.id || v.aliases.contains(m))
        })
        .map(|v| {
            let mut entry = json!({
                "id": v.id,
                "object": "model",
                "created": state.started_unix,
                "owned_by": state.config.node.id,
            });
            if let (Some(o), Ok(serde_json::Value::Object(extra))) =
                (entry.as_object_mut(), serde_json::to_value(&v))
            {
                o.extend(extra);
            }
            entry
        })
        .collect();
    // Routes, after the models: what each may pick from.
    let routes = state
        .config
        .routes
        .iter()
        .filter(|r| app.models.iter().any(|m| m == "*" || *m == r.name))
        .map(|r| {
            json!({
                "id": r.name,
                "object": "model",
                "created": state.started_unix,
                "owned_by": state.config.node.id,
                "state": "route",
                "route": {
                    "policy": match r.policy {
                        crate::config::RoutePolicy::Cheapest => "cheapest",
                        crate::config::RoutePolicy::First => "first",
                    },
                    "models": r.models,
                },
            })
        });
    let data: Vec<serde_json::Value> = data.into_iter().chain(routes).collect();
    Json(json!({ "object": "list", "data": data })).into_response()
}

/// `GET /healthz`: the process answers.
pub async fn healthz() -> Response {
    Json(json!({ "status": "ok" })).into_response()
}

/// `GET /readyz`: a model can serve (loaded, or loadable on demand), the
/// log writable and not full, not draining. Every model's state is listed
/// (a model that failed to load, and why, while the others serve).
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
    let models = state.models.views();
    let servable = models.iter().any(|m| m.state != "failed");
    let log_ok = log_ok.and_then(|()| match servable {
        true => Ok(()),
        false => Err(ApiError::unavailable(
            "no_model",
            "no model can serve: every model failed to load (see models)",
        )),
    });
    let first = models.first();
    let states: Vec<serde_json::Value> = models
        .iter()
        .map(|m| json!({ "id": m.id, "state": m.state, "reason": m.reason, "device": m.device }))
        .collect();
    match log_ok {
        Ok(()) => {
            // The log's backend shows whether io_uring survived the unit's
            // system call filter (else the agent took pwrite + fdatasync).
            // The device shows whether the model runs on the GPU the box was
            // bought for, or on the CPU and why.
            // `model` and `device` are the first model's (as before there
            // were several).
            Json(json!({
                "status": "ready",
                "model": first.map(|m| m.id.clone()),
                "log_backend": state.log.backend().as_str(),
                "device": first.and_then(|m| m.device.clone()),
                "models": states,
                "gpus": state.gpu_snapshot(),
            }))
            .into_response()
        }
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": "not_ready", "reason": e.message, "models": states })),
        )
            .into_response(),
    }
}

/// `GET /metrics`.
pub async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    // Read now, the engines let go of before any await: an engine held
    // here would outlive its eviction.
    let (stats, pools): (Vec<_>, Vec<_>) = {
        let engines = state.models.engines();
        (
            engines.iter().map(|(_, e)| e.stats()).collect(),
            engines
                .iter()
                .filter_map(|(_, e)| e.model().kv_pool_usage())
                .collect(),
        )
    };
    let log = state.log.stats();
    let sync = {
        let state = state.clone();
        tokio::task::spawn_blocking(move || state.sync_view())
            .await
            .unwrap_or(None)
    };
    let snap = super::metrics::Snapshot {
        queue_depth: stats.iter().map(|s| s.queued).sum(),
        busy_slots: stats.iter().map(|s| s.busy_slots).sum(),
        kv_pool: (!pools.is_empty()).then(|| {
            pools
                .iter()
                .fold((0, 0), |(u, t), (pu, pt)| (u + pu, t + pt))
        }),
        kv_preemptions: stats.iter().map(|s| s.preemptions).sum(),
        reservations: state.billing.open_reservations(),
        backlog_records: log.backlog_records,
        backlog_bytes: log.backlog_bytes,
        gpus: state.gpu_snapshot(),
        models: state.models.views(),
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
