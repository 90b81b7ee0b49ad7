//! The answer in OpenAI's shapes: one JSON object, or server-sent events,
//! for every choice of a request; with tool calls read back from the
//! generic format, and log-probabilities.

use std::convert::Infallible;
use std::sync::Arc;

use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::stream::{self, StreamExt};
use mec_billing::Usage;
use mec_inference::engine::{Delta, FinishReason, Summary};
use mec_inference::sampling::TokenLogprob;
use mec_inference::tokenizer::Tokenizer;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::error::ApiError;
use super::tools::{new_call_id, scan, StreamEvent, ToolStream};

/// What the generation task tells the response.
pub enum Event {
    /// New output of one choice.
    Delta(usize, Delta),
    /// Every choice's summary and the settlement.
    Done(Vec<Summary>, Result<Usage, ApiError>),
}

/// Which endpoint answers.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Endpoint {
    /// `/v1/chat/completions`.
    Chat,
    /// `/v1/completions`.
    Completions,
}

/// How the output is read back.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Output {
    /// Text (or JSON held to a schema: still the message's content).
    Text,
    /// The generic tool format: calls, or a `response`.
    Tools,
}

/// What the response needs to know of the request.
pub struct Shape {
    /// The endpoint.
    pub endpoint: Endpoint,
    /// How to read the output.
    pub output: Output,
    /// Choices.
    pub choices: usize,
    /// Log-probabilities were asked for.
    pub logprobs: bool,
    /// Streamed.
    pub stream: bool,
    /// `stream_options.include_usage`.
    pub include_usage: bool,
    /// `chatcmpl-…` / `cmpl-…`.
    pub id: String,
    /// The model id.
    pub model: String,
}

fn finish_reason(r: FinishReason, called: bool) -> &'static str {
    match r {
        FinishReason::Stop | FinishReason::Cancelled if called => "tool_calls",
        FinishReason::Stop | FinishReason::Cancelled => "stop",
        FinishReason::Length => "length",
        FinishReason::Error => "error",
    }
}

/// `usage` of a response.
pub fn usage_json(u: &Usage) -> Value {
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": { "cached_tokens": u.cached_tokens },
    })
}

/// A token as OpenAI names it: its text (bytes that are not UTF-8 on
/// their own written lossily) and its bytes.
fn token_json(tok: &Tokenizer, id: u32, logprob: f32) -> Value {
    let bytes = tok.token_bytes(id);
    json!({
        "token": String::from_utf8_lossy(bytes),
        "logprob": logprob,
        "bytes": bytes,
    })
}

/// Chat's `logprobs.content` entries.
fn chat_logprobs(tok: &Tokenizer, lps: &[TokenLogprob]) -> Value {
    Value::Array(
        lps.iter()
            .map(|lp| {
                let mut v = token_json(tok, lp.id, lp.logprob);
                v["top_logprobs"] = Value::Array(
                    lp.top
                        .iter()
                        .map(|&(id, l)| token_json(tok, id, l))
                        .collect(),
                );
                v
            })
            .collect(),
    )
}

/// Completions' legacy `logprobs` object; `offset` is the text before.
fn completion_logprobs(tok: &Tokenizer, lps: &[TokenLogprob], mut offset: usize) -> Value {
    let mut tokens = Vec::new();
    let mut token_logprobs = Vec::new();
    let mut top = Vec::new();
    let mut offsets = Vec::new();
    for lp in lps {
        let text = String::from_utf8_lossy(tok.token_bytes(lp.id)).into_owned();
        offsets.push(offset);
        offset += text.len();
        tokens.push(text);
        token_logprobs.push(lp.logprob);
        let alternatives: serde_json::Map<String, Value> = lp
            .top
            .iter()
            .map(|&(id, l)| {
                (
                    String::from_utf8_lossy(tok.token_bytes(id)).into_owned(),
                    json!(l),
                )
            })
            .collect();
        top.push(Value::Object(alternatives));
    }
    json!({
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top,
        "text_offset": offsets,
    })
}

/// The error of a generation that failed.
fn failed(summary: &Summary) -> ApiError {
    ApiError::internal(format!(
        "generation failed: {}",
        summary.error.clone().unwrap_or_default()
    ))
}

/// The answer: one JSON object, or server-sent events.
pub async fn respond(shape: Shape, tok: Arc<Tokenizer>, rx: mpsc::Receiver<Event>) -> Response {
    if shape.stream {
        stream_response(shape, tok, rx)
    } else {
        whole_response(shape, &tok, rx).await
    }
}

async fn whole_response(shape: Shape, tok: &Tokenizer, mut rx: mpsc::Receiver<Event>) -> Response {
    let created = mec_billing::unix_now();
    let mut texts = vec![String::new(); shape.choices];
    let mut lps: Vec<Vec<TokenLogprob>> = vec![Vec::new(); shape.choices];
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Delta(i, d) => {
                texts[i].push_str(&d.text);
                lps[i].extend(d.logprobs);
            }
            Event::Done(summaries, usage) => {
                let usage = match usage {
                    Ok(u) => u,
                    Err(e) => return e.into_response(),
                };
                if let Some(s) = summaries
                    .iter()
                    .find(|s| s.finish_reason == FinishReason::Error)
                {
                    return failed(s).into_response();
                }
                let choices: Vec<Value> = summaries
                    .iter()
                    .enumerate()
                    .map(|(i, s)| whole_choice(&shape, tok, i, &texts[i], &lps[i], s))
                    .collect();
                let object = match shape.endpoint {
                    Endpoint::Chat => "chat.completion",
                    Endpoint::Completions => "text_completion",
                };
                return Json(json!({
                    "id": shape.id,
                    "object": object,
                    "created": created,
                    "model": shape.model,
                    "choices": choices,
                    "usage": usage_json(&usage),
                }))
                .into_response();
            }
        }
    }
    ApiError::internal("the generation ended without a result").into_response()
}

fn whole_choice(
    shape: &Shape,
    tok: &Tokenizer,
    index: usize,
    text: &str,
    lps: &[TokenLogprob],
    s: &Summary,
) -> Value {
    if shape.endpoint == Endpoint::Completions {
        return json!({
            "index": index,
            "text": text,
            "finish_reason": finish_reason(s.finish_reason, false),
            "logprobs": if shape.logprobs { completion_logprobs(tok, lps, 0) } else { Value::Null },
        });
    }
    let logprobs = if shape.logprobs {
        json!({ "content": chat_logprobs(tok, lps), "refusal": null })
    } else {
        Value::Null
    };
    let mut message = json!({ "role": "assistant", "content": text, "refusal": null });
    let mut called = false;
    if shape.output == Output::Tools {
        let read = scan(text);
        let calls: Vec<Value> = read
            .calls
            .iter()
            .filter_map(|c| {
                let name = c.name.as_ref()?;
                Some(json!({
                    "id": new_call_id(),
                    "type": "function",
                    "function": { "name": name, "arguments": c.arguments },
                }))
            })
            .collect();
        called = !calls.is_empty();
        message["content"] = json!(read.content);
        if called {
            message["tool_calls"] = Value::Array(calls);
        }
    }
    json!({
        "index": index,
        "message": message,
        "finish_reason": finish_reason(s.finish_reason, called),
        "logprobs": logprobs,
    })
}

/// Per choice, while streaming.
#[derive(Default)]
struct StreamedChoice {
    tools: ToolStream,
    /// Bytes of text sent (completions' logprob offsets).
    sent: usize,
}

fn stream_response(shape: Shape, tok: Arc<Tokenizer>, rx: mpsc::Receiver<Event>) -> Response {
    let created = mec_billing::unix_now();
    let object = match shape.endpoint {
        Endpoint::Chat => "chat.completion.chunk",
        Endpoint::Completions => "text_completion",
    };
    let (id, model) = (shape.id.clone(), shape.model.clone());
    let chunk = move |choices: Value, usage: Option<Value>| {
        let mut v = json!({ "id": id, "object": object, "created": created, "model": model, "choices": choices });
        if let Some(u) = usage {
            v["usage"] = u;
        }
        SseEvent::default().data(v.to_string())
    };
    let first: Vec<SseEvent> = match shape.endpoint {
        Endpoint::Chat => (0..shape.choices)
            .map(|i| {
                chunk(
                    json!([{ "index": i, "delta": { "role": "assistant", "content": "" }, "logprobs": null, "finish_reason": null }]),
                    None,
                )
            })
            .collect(),
        Endpoint::Completions => Vec::new(),
    };
    let mut state: Vec<StreamedChoice> = (0..shape.choices)
        .map(|_| StreamedChoice::default())
        .collect();
    let (endpoint, output, include_usage, logprobs) = (
        shape.endpoint,
        shape.output,
        shape.include_usage,
        shape.logprobs,
    );
    let body = tokio_stream::wrappers::ReceiverStream::new(rx).flat_map(move |ev| {
        let events: Vec<SseEvent> = match ev {
            Event::Delta(i, d) => {
                let st = &mut state[i];
                let lp = |offset| -> Value {
                    if !logprobs {
                        return Value::Null;
                    }
                    match endpoint {
                        Endpoint::Chat => json!({ "content": chat_logprobs(&tok, &d.logprobs), "refusal": null }),
                        Endpoint::Completions => completion_logprobs(&tok, &d.logprobs, offset),
                    }
                };
                match (endpoint, output) {
                    (Endpoint::Completions, _) if d.text.is_empty() && d.logprobs.is_empty() => Vec::new(),
                    (Endpoint::Completions, _) => {
                        let v = chunk(
                            json!([{ "index": i, "text": d.text, "finish_reason": null, "logprobs": lp(st.sent) }]),
                            None,
                        );
                        st.sent += d.text.len();
                        vec![v]
                    }
                    (Endpoint::Chat, Output::Text) if d.text.is_empty() && d.logprobs.is_empty() => Vec::new(),
                    (Endpoint::Chat, Output::Text) => vec![chunk(
                        json!([{ "index": i, "delta": { "content": d.text }, "logprobs": lp(0), "finish_reason": null }]),
                        None,
                    )],
                    (Endpoint::Chat, Output::Tools) => {
                        let deltas: Vec<Value> = st
                            .tools
                            .push(&d.text)
                            .into_iter()
                            .map(|e| match e {
                                StreamEvent::Content(text) => json!({ "content": text }),
                                StreamEvent::CallStart { index, id, name } => json!({ "tool_calls": [{
                                    "index": index, "id": id, "type": "function",
                                    "function": { "name": name, "arguments": "" },
                                }]}),
                                StreamEvent::Arguments { index, text } => json!({ "tool_calls": [{
                                    "index": index, "function": { "arguments": text },
                                }]}),
                            })
                            .collect();
                        let mut lp = Some(lp(0)).filter(|_| logprobs && !d.logprobs.is_empty());
                        let mut out: Vec<SseEvent> = deltas
                            .into_iter()
                            .map(|delta| {
                                chunk(
                                    json!([{ "index": i, "delta": delta, "logprobs": lp.take().unwrap_or(Value::Null), "finish_reason": null }]),
                                    None,
                                )
                            })
                            .collect();
                        if let Some(lp) = lp {
                            // Tokens that changed nothing yet (inside a key).
                            out.push(chunk(
                                json!([{ "index": i, "delta": {}, "logprobs": lp, "finish_reason": null }]),
                                None,
                            ));
                        }
                        out
                    }
                }
            }
            Event::Done(summaries, usage) => {
                let mut out = Vec::new();
                match usage {
                    Err(e) => out.push(SseEvent::default().data(e.body().to_string())),
                    Ok(_) if summaries.iter().any(|s| s.finish_reason == FinishReason::Error) => {
                        let s = summaries.iter().find(|s| s.finish_reason == FinishReason::Error);
                        out.push(SseEvent::default().data(failed(s.expect("found")).body().to_string()));
                    }
                    Ok(u) => {
                        for (i, s) in summaries.iter().enumerate() {
                            let fr = finish_reason(s.finish_reason, state[i].tools.has_calls());
                            out.push(match endpoint {
                                Endpoint::Chat => chunk(json!([{ "index": i, "delta": {}, "logprobs": null, "finish_reason": fr }]), None),
                                Endpoint::Completions => chunk(
                                    json!([{ "index": i, "text": "", "finish_reason": fr, "logprobs": null }]),
                                    None,
                                ),
                            });
                        }
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
