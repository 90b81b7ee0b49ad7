//! The OpenAI request bodies the MEC API accepts, and their checks. Fields
//! we do not implement are refused when set (a silent ignore would change
//! what the client gets), unknown fields are ignored as OpenAI does.

use std::collections::HashMap;

use mec_inference::sampling::{SamplingParams, MAX_TOP_LOGPROBS};
use serde::Deserialize;

use super::error::ApiError;
use super::tools::{render_result, Tools};

/// Longest `user` (the app's end-user id) kept in the usage record; with
/// no control characters, it fits a stream's in-flight tally slot.
pub const MAX_USER_LEN: usize = 128;

/// `stop`: one string or several.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    /// One.
    One(String),
    /// Several.
    Many(Vec<String>),
}

/// `stream_options`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamOptions {
    /// Send a last chunk with the usage.
    #[serde(default)]
    pub include_usage: bool,
}

/// A message's `content`: text, or parts of which we take the text ones.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Content {
    /// Plain text.
    Text(String),
    /// Content parts.
    Parts(Vec<ContentPart>),
}

/// One content part.
#[derive(Debug, Clone, Deserialize)]
pub struct ContentPart {
    /// `text` (others are refused).
    #[serde(rename = "type")]
    pub kind: String,
    /// The text.
    #[serde(default)]
    pub text: Option<String>,
}

/// One chat message.
#[derive(Debug, Clone, Deserialize)]
pub struct Message {
    /// system, user, assistant, tool (developer is read as system).
    pub role: String,
    /// The text.
    pub content: Option<Content>,
    /// An assistant message's calls.
    #[serde(default)]
    pub tool_calls: Option<Vec<MessageToolCall>>,
    /// A tool message's call.
    #[serde(default)]
    pub tool_call_id: Option<String>,
}

/// A call in an assistant message.
#[derive(Debug, Clone, Deserialize)]
pub struct MessageToolCall {
    /// Its id (tool messages answer it).
    pub id: String,
    /// The function and its arguments.
    pub function: CalledFunction,
}

/// The function of a call.
#[derive(Debug, Clone, Deserialize)]
pub struct CalledFunction {
    /// Its name.
    pub name: String,
    /// Its arguments, a JSON text.
    #[serde(default)]
    pub arguments: String,
}

/// Sampling fields common to both endpoints.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Sampling {
    /// Most completion tokens (`max_completion_tokens` in newer clients).
    pub max_tokens: Option<i64>,
    /// Newer name of `max_tokens`.
    pub max_completion_tokens: Option<i64>,
    /// 0 to 2.
    pub temperature: Option<f32>,
    /// (0, 1].
    pub top_p: Option<f32>,
    /// Extension (llama.cpp, vLLM): keep the k most likely.
    pub top_k: Option<i64>,
    /// Reproducible sampling.
    pub seed: Option<u64>,
    /// Extension: penalty for repeated tokens (1: none).
    pub repetition_penalty: Option<f32>,
    /// Stop sequences (at most 4).
    pub stop: Option<Stop>,
    /// Stream as server-sent events.
    #[serde(default)]
    pub stream: bool,
    /// Streaming options.
    pub stream_options: Option<StreamOptions>,
    /// Choices (1 to `api.max_choices`).
    pub n: Option<i64>,
    /// −2 to 2.
    pub frequency_penalty: Option<f32>,
    /// −2 to 2.
    pub presence_penalty: Option<f32>,
    /// Chat: true or false; completions: 0 to 5 alternatives.
    pub logprobs: Option<serde_json::Value>,
    /// Chat: 0 to 20 alternatives per token (needs `logprobs: true`).
    pub top_logprobs: Option<i64>,
    /// Token id (as a string) → bias, −100 to 100.
    pub logit_bias: Option<HashMap<String, f32>>,
    /// The app's end-user id, recorded in the usage record.
    pub user: Option<String>,
    /// Functions the model may call.
    pub tools: Option<serde_json::Value>,
    /// none, auto, required, or a named function.
    pub tool_choice: Option<serde_json::Value>,
    /// Several calls in one answer (default true).
    pub parallel_tool_calls: Option<bool>,
    /// text, json_object or json_schema.
    pub response_format: Option<serde_json::Value>,
    /// Not implemented (completions).
    pub echo: Option<bool>,
    /// Not implemented (completions).
    pub suffix: Option<String>,
    /// Not implemented (completions).
    pub best_of: Option<i64>,
}

/// `POST /v1/chat/completions`.
#[derive(Debug, Clone, Deserialize)]
pub struct ChatRequest {
    /// Model id.
    pub model: String,
    /// The conversation.
    pub messages: Vec<Message>,
    /// Sampling.
    #[serde(flatten)]
    pub sampling: Sampling,
}

/// `prompt` of the completions endpoint: one string (or a list of one).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    /// One prompt.
    One(String),
    /// Several (only one is served).
    Many(Vec<String>),
}

/// `POST /v1/completions`.
#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    /// Model id.
    pub model: String,
    /// The text to continue (no chat template).
    pub prompt: Prompt,
    /// Sampling.
    #[serde(flatten)]
    pub sampling: Sampling,
}

fn unsupported(param: &'static str, what: &str) -> ApiError {
    ApiError {
        param: Some(param),
        ..ApiError::invalid(
            "unsupported_parameter",
            format!("{param}: {what} is not supported"),
        )
    }
}

impl Sampling {
    /// The most completion tokens asked for, checked (`None`: up to the context).
    pub fn max_tokens(&self) -> Result<Option<u64>, ApiError> {
        match self.max_completion_tokens.or(self.max_tokens) {
            None => Ok(None),
            Some(n) if n >= 1 => Ok(Some(n as u64)),
            Some(n) => Err(ApiError::invalid_param(
                "max_tokens",
                format!("max_tokens must be at least 1, not {n}"),
            )),
        }
    }

    /// Choices asked for (`n`), at most `max`.
    pub fn choices(&self, max: usize) -> Result<usize, ApiError> {
        match self.n {
            None => Ok(1),
            Some(n) if n >= 1 && n as usize <= max => Ok(n as usize),
            Some(n) => Err(ApiError::invalid_param(
                "n",
                format!("n must be between 1 and {max} (api.max_choices), not {n}"),
            )),
        }
    }

    /// The app's end-user id, checked.
    pub fn end_user(&self) -> Result<String, ApiError> {
        match &self.user {
            Some(u) if u.len() > MAX_USER_LEN || u.chars().any(char::is_control) => {
                Err(ApiError::invalid_param(
                    "user",
                    format!(
                        "user must be at most {MAX_USER_LEN} bytes, without control characters"
                    ),
                ))
            }
            Some(u) => Ok(u.clone()),
            None => Ok(String::new()),
        }
    }

    /// Alternatives per token asked for: `None` without logprobs. Chat
    /// takes `logprobs: true` and `top_logprobs` (0 to 20); completions take
    /// `logprobs` as a count (0 to 5), as OpenAI's endpoints do.
    fn logprobs(&self, chat: bool) -> Result<Option<usize>, ApiError> {
        use serde_json::Value;
        if chat {
            let on = match &self.logprobs {
                None | Some(Value::Null) | Some(Value::Bool(false)) => false,
                Some(Value::Bool(true)) => true,
                Some(other) => {
                    return Err(ApiError::invalid_param(
                        "logprobs",
                        format!("logprobs must be true or false, not {other}"),
                    ))
                }
            };
            return match (on, self.top_logprobs) {
                (false, None) => Ok(None),
                (false, Some(_)) => Err(ApiError::invalid_param(
                    "top_logprobs",
                    "top_logprobs needs logprobs: true",
                )),
                (true, None) => Ok(Some(0)),
                (true, Some(k)) if (0..=MAX_TOP_LOGPROBS as i64).contains(&k) => {
                    Ok(Some(k as usize))
                }
                (true, Some(k)) => Err(ApiError::invalid_param(
                    "top_logprobs",
                    format!("top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}, not {k}"),
                )),
            };
        }
        match &self.logprobs {
            None | Some(Value::Null) => Ok(None),
            Some(v) => match v.as_i64() {
                Some(k) if (0..=5).contains(&k) => Ok(Some(k as usize)),
                _ => Err(ApiError::invalid_param(
                    "logprobs",
                    format!("logprobs must be an integer from 0 to 5, not {v}"),
                )),
            },
        }
    }

    /// Refuses what we do not implement and builds the engine's parameters
    /// (without `max_tokens`, which the reservation caps). `vocab` bounds
    /// the token ids `logit_bias` may name.
    pub fn params(&self, chat: bool, vocab: usize) -> Result<SamplingParams, ApiError> {
        if self.best_of.is_some_and(|b| b != 1) {
            return Err(unsupported("best_of", "best_of other than 1"));
        }
        if !chat && self.tools.as_ref().is_some_and(|v| !v.is_null()) {
            return Err(unsupported(
                "tools",
                "tool calling on completions (use chat)",
            ));
        }
        if !chat
            && self.response_format.as_ref().is_some_and(|v| {
                !(v.is_null() || v.get("type").and_then(|t| t.as_str()) == Some("text"))
            })
        {
            return Err(unsupported(
                "response_format",
                "a response format on completions (use chat)",
            ));
        }
        if self.echo == Some(true) {
            return Err(unsupported("echo", "echo"));
        }
        if self.suffix.as_ref().is_some_and(|s| !s.is_empty()) {
            return Err(unsupported("suffix", "suffix"));
        }
        let stop = match &self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) => v.clone(),
        };
        if stop.len() > 4 || stop.iter().any(String::is_empty) {
            return Err(ApiError::invalid_param(
                "stop",
                "at most 4 non-empty stop sequences",
            ));
        }
        let top_k = match self.top_k {
            None => 0,
            Some(k) if k >= 0 => k as usize,
            Some(k) => {
                return Err(ApiError::invalid_param(
                    "top_k",
                    format!("top_k must be at least 0, not {k}"),
                ))
            }
        };
        let mut logit_bias = Vec::new();
        for (key, &bias) in self.logit_bias.iter().flatten() {
            let id = key
                .parse::<u32>()
                .ok()
                .filter(|&id| (id as usize) < vocab)
                .ok_or_else(|| {
                    ApiError::invalid_param(
                        "logit_bias",
                        format!(
                            "logit_bias names token {key:?}, which is not a token id of this model (0 to {})",
                            vocab.saturating_sub(1)
                        ),
                    )
                })?;
            logit_bias.push((id, bias));
        }
        logit_bias.sort_by_key(|(id, _)| *id);
        let params = SamplingParams {
            temperature: self.temperature.unwrap_or(1.0),
            top_p: self.top_p.unwrap_or(1.0),
            top_k,
            seed: self.seed,
            repetition_penalty: self.repetition_penalty.unwrap_or(1.0),
            frequency_penalty: self.frequency_penalty.unwrap_or(0.0),
            presence_penalty: self.presence_penalty.unwrap_or(0.0),
            logit_bias,
            logprobs: self.logprobs(chat)?,
            max_tokens: None,
            stop,
        };
        params.validate().map_err(|e| ApiError {
            param: Some(e.param),
            ..ApiError::invalid("invalid_value", e.to_string())
        })?;
        Ok(params)
    }

    /// The tools offered, checked (`None`: none).
    pub fn tools(&self) -> Result<Option<Tools>, ApiError> {
        Tools::from_request(
            self.tools.as_ref(),
            self.tool_choice.as_ref(),
            self.parallel_tool_calls,
        )
    }

    /// `stream_options.include_usage`.
    pub fn include_usage(&self) -> bool {
        self.stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage)
    }
}

impl ChatRequest {
    /// The messages as the chat template takes them: earlier tool calls
    /// and their results in the generic format, and the tools described
    /// in the system message when they are offered.
    pub fn chat_messages(
        &self,
        tools: Option<&Tools>,
    ) -> Result<Vec<mec_inference::tokenizer::ChatMessage>, ApiError> {
        use mec_inference::tokenizer::ChatMessage;
        if self.messages.is_empty() {
            return Err(ApiError::invalid_param(
                "messages",
                "messages must not be empty",
            ));
        }
        // Call id → function name, from the assistant messages so far.
        let mut calls: HashMap<&str, &str> = HashMap::new();
        let mut out = Vec::with_capacity(self.messages.len() + 1);
        for (i, m) in self.messages.iter().enumerate() {
            let text = text_of(i, m)?;
            let role = match m.role.as_str() {
                "system" | "developer" => "system",
                "user" => "user",
                "assistant" => "assistant",
                "tool" => {
                    let id = m.tool_call_id.as_deref().ok_or_else(|| {
                        ApiError::invalid_param(
                            "messages",
                            format!("messages[{i}]: a tool message needs tool_call_id"),
                        )
                    })?;
                    let name = calls.get(id).ok_or_else(|| {
                        ApiError::invalid_param(
                            "messages",
                            format!(
                                "messages[{i}].tool_call_id {id:?} answers no call of an earlier assistant message"
                            ),
                        )
                    })?;
                    out.push(ChatMessage {
                        role: "user".into(),
                        content: render_result(id, name, &text),
                    });
                    continue;
                }
                other => {
                    return Err(ApiError::invalid_param(
                        "messages",
                        format!("messages[{i}].role {other:?}: system, user, assistant or tool"),
                    ))
                }
            };
            let content = match m.tool_calls.as_deref() {
                Some(tool_calls) if role == "assistant" && !tool_calls.is_empty() => {
                    let mut rendered = Vec::new();
                    for c in tool_calls {
                        calls.insert(c.id.as_str(), c.function.name.as_str());
                        let args =
                            serde_json::from_str(&c.function.arguments).unwrap_or_else(|_| {
                                serde_json::Value::String(c.function.arguments.clone())
                            });
                        rendered.push((c.id.clone(), c.function.name.clone(), args));
                    }
                    let format = tools.cloned().unwrap_or(Tools {
                        functions: Vec::new(),
                        choice: super::tools::ToolChoice::Auto,
                        parallel: true,
                    });
                    format.render_calls(&rendered)
                }
                _ => text,
            };
            out.push(ChatMessage {
                role: role.to_string(),
                content,
            });
        }
        if let Some(t) = tools.filter(|t| t.offered()) {
            let prompt = t.system_prompt();
            match out.first_mut() {
                Some(first) if first.role == "system" => {
                    first.content = format!("{}\n\n{prompt}", first.content);
                }
                _ => out.insert(
                    0,
                    ChatMessage {
                        role: "system".into(),
                        content: prompt,
                    },
                ),
            }
        }
        Ok(out)
    }
}

/// A message's text (its text parts joined).
fn text_of(i: usize, m: &Message) -> Result<String, ApiError> {
    Ok(match &m.content {
        None => String::new(),
        Some(Content::Text(t)) => t.clone(),
        Some(Content::Parts(parts)) => {
            let mut text = String::new();
            for p in parts {
                match (p.kind.as_str(), &p.text) {
                    ("text", Some(t)) => text.push_str(t),
                    (kind, _) => {
                        return Err(unsupported(
                            "messages",
                            &format!("messages[{i}]: content of type {kind:?}"),
                        ))
                    }
                }
            }
            text
        }
    })
}

impl CompletionRequest {
    /// The prompt text.
    pub fn prompt_text(&self) -> Result<&str, ApiError> {
        match &self.prompt {
            Prompt::One(s) => Ok(s),
            Prompt::Many(v) if v.len() == 1 => Ok(&v[0]),
            Prompt::Many(v) => Err(unsupported(
                "prompt",
                &format!("a batch of {} prompts (only 1)", v.len()),
            )),
        }
    }
}

/// Parses a JSON body into `T`, with an OpenAI-shaped error naming what is wrong.
pub fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        let code = if e.is_syntax() || e.is_eof() {
            "invalid_json"
        } else {
            "invalid_request"
        };
        ApiError::invalid(
            code,
            format!("the request body is not a valid request: {e}"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_requests_parse_and_refuse_what_we_do_not_do() {
        let r: ChatRequest = parse_body(
            br#"{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":5,"stream":true,
                 "stream_options":{"include_usage":true},"stop":"\n","unknown_field":1}"#,
        )
        .unwrap();
        assert_eq!(r.sampling.max_tokens().unwrap(), Some(5));
        assert!(r.sampling.include_usage());
        assert_eq!(
            r.sampling.params(true, 100).unwrap().stop,
            vec!["\n".to_string()]
        );
        let r: ChatRequest =
            parse_body(br#"{"model":"m","messages":[{"role":"user","content":"hi"}],"n":9}"#)
                .unwrap();
        assert_eq!(r.sampling.choices(8).unwrap_err().param, Some("n"));
        assert_eq!(r.sampling.choices(9).unwrap(), 9);
        let r: ChatRequest = parse_body(br#"{"model":"m","messages":[],"max_tokens":0}"#).unwrap();
        assert!(r.sampling.max_tokens().is_err());
        assert!(r.chat_messages(None).is_err());
        assert_eq!(
            parse_body::<ChatRequest>(b"{").unwrap_err().code,
            "invalid_json"
        );
        assert_eq!(
            parse_body::<ChatRequest>(br#"{"model":"m"}"#)
                .unwrap_err()
                .code,
            "invalid_request"
        );
        assert_eq!(
            parse_body::<ChatRequest>(br#"{"model":"m","messages":"hi"}"#)
                .unwrap_err()
                .code,
            "invalid_request"
        );
    }

    #[test]
    fn content_parts_and_roles() {
        let r: ChatRequest = parse_body(
            br#"{"model":"m","messages":[{"role":"developer","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]}]}"#,
        )
        .unwrap();
        let m = r.chat_messages(None).unwrap();
        assert_eq!(
            (m[0].role.as_str(), m[0].content.as_str()),
            ("system", "ab")
        );
        let r: ChatRequest = parse_body(
            br#"{"model":"m","messages":[{"role":"user","content":[{"type":"image_url","image_url":{}}]}]}"#,
        )
        .unwrap();
        assert!(r.chat_messages(None).is_err());
        let r: ChatRequest =
            parse_body(br#"{"model":"m","messages":[{"role":"function","content":"x"}]}"#).unwrap();
        assert!(r.chat_messages(None).is_err());
    }

    #[test]
    fn tool_messages_must_answer_an_earlier_call() {
        let r: ChatRequest = parse_body(
            br#"{"model":"m","messages":[{"role":"user","content":"weather?"},
                {"role":"assistant","content":null,"tool_calls":[{"id":"call_1","type":"function","function":{"name":"get_weather","arguments":"{\"city\": \"Oslo\"}"}}]},
                {"role":"tool","tool_call_id":"call_1","content":"-3 C"}]}"#,
        )
        .unwrap();
        let m = r.chat_messages(None).unwrap();
        assert_eq!(m[1].role, "assistant");
        assert_eq!(
            m[1].content,
            r#"{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Oslo"}}]}"#
        );
        assert_eq!(m[2].role, "user");
        assert!(
            m[2].content.contains(r#""tool_call_id": "call_1""#),
            "{}",
            m[2].content
        );
        let r: ChatRequest = parse_body(
            br#"{"model":"m","messages":[{"role":"user","content":"weather?"},
                {"role":"tool","tool_call_id":"call_9","content":"-3 C"}]}"#,
        )
        .unwrap();
        let e = r.chat_messages(None).unwrap_err();
        assert!(e.message.contains("call_9"), "{}", e.message);
        let r: ChatRequest =
            parse_body(br#"{"model":"m","messages":[{"role":"tool","content":"-3 C"}]}"#).unwrap();
        assert!(r.chat_messages(None).is_err());
    }

    #[test]
    fn sampling_extensions_are_checked() {
        let body = |extra: &str| -> ChatRequest {
            parse_body(
                format!(r#"{{"model":"m","messages":[{{"role":"user","content":"hi"}}]{extra}}}"#)
                    .as_bytes(),
            )
            .unwrap()
        };
        let p = body(r#","logprobs":true,"top_logprobs":3,"logit_bias":{"5":-100},"frequency_penalty":0.5,"presence_penalty":-0.5,"user":"u1""#)
            .sampling;
        let params = p.params(true, 10).unwrap();
        assert_eq!(params.logprobs, Some(3));
        assert_eq!(params.logit_bias, vec![(5, -100.0)]);
        assert_eq!(
            (params.frequency_penalty, params.presence_penalty),
            (0.5, -0.5)
        );
        assert_eq!(p.end_user().unwrap(), "u1");
        for (extra, param) in [
            (r#","top_logprobs":21,"logprobs":true"#, "top_logprobs"),
            (r#","top_logprobs":2"#, "top_logprobs"),
            (r#","logit_bias":{"10":1}"#, "logit_bias"),
            (r#","logit_bias":{"x":1}"#, "logit_bias"),
            (r#","logit_bias":{"1":101}"#, "logit_bias"),
            (r#","frequency_penalty":3"#, "frequency_penalty"),
            (r#","logprobs":3"#, "logprobs"),
        ] {
            assert_eq!(
                body(extra).sampling.params(true, 10).unwrap_err().param,
                Some(param),
                "{extra}"
            );
        }
        let long = format!(r#","user":"{}""#, "u".repeat(MAX_USER_LEN + 1));
        assert_eq!(
            body(&long).sampling.end_user().unwrap_err().param,
            Some("user")
        );
        let control = r#","user":"a\u0000b""#;
        assert_eq!(
            body(control).sampling.end_user().unwrap_err().param,
            Some("user")
        );
    }
}
