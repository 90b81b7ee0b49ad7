//! The OpenAI request bodies the MEC API accepts, and their checks. Fields
//! we do not implement are refused when set (a silent ignore would change
//! what the client gets), unknown fields are ignored as OpenAI does.

use mec_inference::sampling::SamplingParams;
use serde::Deserialize;

use super::error::ApiError;

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
    /// system, user, assistant (developer is read as system).
    pub role: String,
    /// The text.
    pub content: Option<Content>,
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
    /// Choices: only 1.
    pub n: Option<i64>,
    /// Not implemented: refused unless 0.
    pub frequency_penalty: Option<f32>,
    /// Not implemented: refused unless 0.
    pub presence_penalty: Option<f32>,
    /// Not implemented: refused when true.
    pub logprobs: Option<serde_json::Value>,
    /// Not implemented.
    pub tools: Option<serde_json::Value>,
    /// Not implemented.
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

    /// Refuses what we do not implement and builds the engine's parameters
    /// (without `max_tokens`, which the reservation caps).
    pub fn params(&self) -> Result<SamplingParams, ApiError> {
        if let Some(n) = self.n {
            if n != 1 {
                return Err(unsupported("n", &format!("n = {n} (only 1)")));
            }
        }
        if self.best_of.is_some_and(|b| b != 1) {
            return Err(unsupported("best_of", "best_of other than 1"));
        }
        if self.frequency_penalty.is_some_and(|p| p != 0.0) {
            return Err(unsupported(
                "frequency_penalty",
                "a frequency penalty (use repetition_penalty)",
            ));
        }
        if self.presence_penalty.is_some_and(|p| p != 0.0) {
            return Err(unsupported(
                "presence_penalty",
                "a presence penalty (use repetition_penalty)",
            ));
        }
        if self
            .logprobs
            .as_ref()
            .is_some_and(|v| !(v.is_null() || v == &serde_json::Value::Bool(false)))
        {
            return Err(unsupported("logprobs", "logprobs"));
        }
        if self.tools.as_ref().is_some_and(|v| !v.is_null()) {
            return Err(unsupported("tools", "tool calling"));
        }
        if self.response_format.as_ref().is_some_and(|v| {
            !(v.is_null() || v.get("type").and_then(|t| t.as_str()) == Some("text"))
        }) {
            return Err(unsupported(
                "response_format",
                "a response format other than text",
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
        let params = SamplingParams {
            temperature: self.temperature.unwrap_or(1.0),
            top_p: self.top_p.unwrap_or(1.0),
            top_k,
            seed: self.seed,
            repetition_penalty: self.repetition_penalty.unwrap_or(1.0),
            max_tokens: None,
            stop,
        };
        params
            .validate()
            .map_err(|e| ApiError::invalid("invalid_value", e.to_string()))?;
        Ok(params)
    }

    /// `stream_options.include_usage`.
    pub fn include_usage(&self) -> bool {
        self.stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage)
    }
}

impl ChatRequest {
    /// The messages as the chat template takes them.
    pub fn chat_messages(&self) -> Result<Vec<mec_inference::tokenizer::ChatMessage>, ApiError> {
        if self.messages.is_empty() {
            return Err(ApiError::invalid_param(
                "messages",
                "messages must not be empty",
            ));
        }
        self.messages
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let role = match m.role.as_str() {
                    "system" | "developer" => "system",
                    "user" => "user",
                    "assistant" => "assistant",
                    other => {
                        return Err(ApiError::invalid_param(
                            "messages",
                            format!("messages[{i}].role {other:?}: system, user or assistant"),
                        ))
                    }
                };
                let text = match &m.content {
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
                                        &format!("content of type {kind:?}"),
                                    ))
                                }
                            }
                        }
                        text
                    }
                };
                Ok(mec_inference::tokenizer::ChatMessage {
                    role: role.to_string(),
                    content: text,
                })
            })
            .collect()
    }
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
        assert_eq!(r.sampling.params().unwrap().stop, vec!["\n".to_string()]);
        let r: ChatRequest =
            parse_body(br#"{"model":"m","messages":[{"role":"user","content":"hi"}],"n":2}"#)
                .unwrap();
        assert_eq!(
            r.sampling.params().unwrap_err().code,
            "unsupported_parameter"
        );
        let r: ChatRequest = parse_body(br#"{"model":"m","messages":[],"max_tokens":0}"#).unwrap();
        assert!(r.sampling.max_tokens().is_err());
        assert!(r.chat_messages().is_err());
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
        let m = r.chat_messages().unwrap();
        assert_eq!(
            (m[0].role.as_str(), m[0].content.as_str()),
            ("system", "ab")
        );
        let r: ChatRequest = parse_body(
            br#"{"model":"m","messages":[{"role":"user","content":[{"type":"image_url","image_url":{}}]}]}"#,
        )
        .unwrap();
        assert!(r.chat_messages().is_err());
        let r: ChatRequest =
            parse_body(br#"{"model":"m","messages":[{"role":"tool","content":"x"}]}"#).unwrap();
        assert!(r.chat_messages().is_err());
    }
}
