//! The tokenizer and chat template, built from the GGUF's own metadata
//! (`tokenizer.ggml.*`, `tokenizer.chat_template`), so the counts we bill are
//! the model's own: the same ids llama.cpp produces for the same file.

use candle_core::quantized::gguf_file::Value;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior};

use crate::gguf::{GgufFile, ModelError};

/// GGUF token types (`tokenizer.ggml.token_type`).
const TOKEN_TYPE_CONTROL: i32 = 3;
const TOKEN_TYPE_USER_DEFINED: i32 = 4;

const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// A chat message.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
}

impl ChatMessage {
    /// A user message.
    pub fn user(content: impl Into<String>) -> ChatMessage {
        ChatMessage {
            role: "user".into(),
            content: content.into(),
        }
    }
}

/// Tokenizer, special ids and chat template of one model.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    chat_template: Option<String>,
    bos: Option<(u32, String)>,
    eos: Option<(u32, String)>,
    /// Ids that end generation: the EOS token and the end-of-turn tokens.
    stop_ids: Vec<u32>,
    vocab_size: usize,
    /// Each token's bytes (byte-level BPE's characters mapped back to bytes;
    /// a control token's name as it is written).
    token_bytes: Vec<Vec<u8>>,
    /// Which tokens are control tokens (`<|im_end|>`…): never text.
    control: Vec<bool>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size)
            .finish_non_exhaustive()
    }
}

fn strings(values: &[Value], key: &str, file: &GgufFile) -> Result<Vec<String>, ModelError> {
    values
        .iter()
        .map(|v| match v {
            Value::String(s) => Ok(s.clone()),
            other => Err(ModelError::Tokenizer {
                path: file.path().to_path_buf(),
                reason: format!("{key} holds {other:?}, expected strings"),
            }),
        })
        .collect()
}

impl Tokenizer {
    /// Builds the tokenizer from a GGUF file's metadata.
    pub fn from_gguf(file: &GgufFile) -> Result<Tokenizer, ModelError> {
        let err = |reason: String| ModelError::Tokenizer {
            path: file.path().to_path_buf(),
            reason,
        };
        let model = file.string("tokenizer.ggml.model")?;
        if model != "gpt2" {
            return Err(err(format!(
                "tokenizer model {model:?} is not supported (only byte-level BPE, \"gpt2\")"
            )));
        }
        let tokens = strings(
            file.array("tokenizer.ggml.tokens")?,
            "tokenizer.ggml.tokens",
            file,
        )?;
        let merges = strings(
            file.array("tokenizer.ggml.merges")?,
            "tokenizer.ggml.merges",
            file,
        )?;
        let types: Vec<i32> = match file.get("tokenizer.ggml.token_type") {
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| if let Value::I32(t) = v { *t } else { 1 })
                .collect(),
            _ => vec![1; tokens.len()],
        };
        let vocab: tokenizers::models::bpe::Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let merges: Vec<(String, String)> = merges
            .iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| err(format!("merge {m:?} is not two symbols")))
            })
            .collect::<Result<_, _>>()?;
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| err(e.to_string()))?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        let pre = file.get("tokenizer.ggml.pre").and_then(|v| {
            if let Value::String(s) = v {
                Some(s.as_str())
            } else {
                None
            }
        });
        let byte_level =
            |regex: bool| PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, regex));
        let split = |pattern: &str| -> Result<PreTokenizerWrapper, ModelError> {
            Split::new(
                SplitPattern::Regex(pattern.into()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map(PreTokenizerWrapper::Split)
            .map_err(|e| err(e.to_string()))
        };
        let pre_tokenizer = match pre {
            // SmolLM: digits one by one, then byte-level with GPT-2's regex, no prefix space.
            Some("smollm") => Sequence::new(vec![
                PreTokenizerWrapper::Digits(Digits::new(true)),
                byte_level(true),
            ]),
            Some("llama-bpe") | Some("llama3") | Some("smaug-bpe") => {
                Sequence::new(vec![split(LLAMA3_PATTERN)?, byte_level(false)])
            }
            Some("qwen2") => Sequence::new(vec![split(QWEN2_PATTERN)?, byte_level(false)]),
            Some("gpt2") | Some("default") | None => Sequence::new(vec![byte_level(true)]),
            Some(other) => {
                tracing::warn!(
                    pre = other,
                    "unknown tokenizer.ggml.pre; using GPT-2 byte-level pre-tokenization"
                );
                Sequence::new(vec![byte_level(true)])
            }
        };
        inner.with_pre_tokenizer(Some(pre_tokenizer));
        inner.with_decoder(Some(ByteLevel::default()));
        let special: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(_, t)| **t == TOKEN_TYPE_CONTROL)
            .map(|(s, _)| AddedToken::from(s.clone(), true))
            .collect();
        inner
            .add_special_tokens(special)
            .map_err(|e| err(format!("special tokens: {e}")))?;
        let user: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(_, t)| **t == TOKEN_TYPE_USER_DEFINED)
            .map(|(s, _)| AddedToken::from(s.clone(), false))
            .collect();
        inner
            .add_tokens(user)
            .map_err(|e| err(format!("user-defined tokens: {e}")))?;

        let id_token = |key: &str| -> Option<(u32, String)> {
            let id = file.u64(key).ok()? as u32;
            tokens.get(id as usize).map(|t| (id, t.clone()))
        };
        let bos = id_token("tokenizer.ggml.bos_token_id");
        let eos = id_token("tokenizer.ggml.eos_token_id");
        let mut stop_ids: Vec<u32> = eos.iter().map(|e| e.0).collect();
        if let Some(id) = id_token("tokenizer.ggml.eot_token_id") {
            stop_ids.push(id.0);
        }
        for name in [
            "<|im_end|>",
            "<|eot_id|>",
            "<|end_of_text|>",
            "<|endoftext|>",
        ] {
            if let Some(i) = tokens.iter().position(|t| t == name) {
                stop_ids.push(i as u32);
            }
        }
        stop_ids.sort_unstable();
        stop_ids.dedup();
        let byte_of = byte_level_chars();
        let token_bytes = tokens
            .iter()
            .zip(&types)
            .map(|(t, ty)| match *ty {
                TOKEN_TYPE_CONTROL | TOKEN_TYPE_USER_DEFINED => t.as_bytes().to_vec(),
                _ => t
                    .chars()
                    .map(|c| byte_of.get(&c).copied())
                    .collect::<Option<Vec<u8>>>()
                    .unwrap_or_else(|| t.as_bytes().to_vec()),
            })
            .collect();
        let control = types.iter().map(|t| *t == TOKEN_TYPE_CONTROL).collect();
        let chat_template = match file.get("tokenizer.chat_template") {
            Some(Value::String(t)) => Some(t.clone()),
            _ => None,
        };
        Ok(Tokenizer {
            inner,
            chat_template,
            bos,
            eos,
            stop_ids,
            vocab_size: tokens.len(),
            token_bytes,
            control,
        })
    }

    /// The bytes token `id` stands for (a control token: its name); empty
    /// for an id outside the vocabulary.
    pub fn token_bytes(&self, id: u32) -> &[u8] {
        self.token_bytes
            .get(id as usize)
            .map_or(&[][..], Vec::as_slice)
    }

    /// Whether `id` is a control token (`<|im_end|>`…), which no text spells.
    pub fn is_control(&self, id: u32) -> bool {
        self.control.get(id as usize).copied().unwrap_or(false)
    }

    /// Token ids of `text`; special-token text (such as `<|im_start|>`) maps to its id.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, String> {
        self.inner
            .encode(text, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| e.to_string())
    }

    /// Text of `ids`; special tokens are left out when `skip_special`.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String, String> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| e.to_string())
    }

    /// Ids that end a turn.
    pub fn stop_ids(&self) -> &[u32] {
        &self.stop_ids
    }

    /// Number of tokens in the vocabulary.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// Renders messages through the model's chat template, ending with the
    /// assistant's turn opened (`add_generation_prompt`).
    pub fn apply_chat_template(&self, messages: &[ChatMessage]) -> Result<String, String> {
        let template = self
            .chat_template
            .as_deref()
            .ok_or("the model has no chat template; use a raw prompt")?;
        let mut env = minijinja::Environment::new();
        env.add_function(
            "raise_exception",
            |msg: String| -> Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_template("chat", template)
            .map_err(|e| format!("chat template does not parse: {e}"))?;
        let tmpl = env.get_template("chat").map_err(|e| e.to_string())?;
        tmpl.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => true,
            bos_token => self.bos.as_ref().map(|b| b.1.clone()).unwrap_or_default(),
            eos_token => self.eos.as_ref().map(|e| e.1.clone()).unwrap_or_default(),
        })
        .map_err(|e| format!("chat template failed: {e}"))
    }
}

/// Byte-level BPE's alphabet (GPT-2's): each byte is written as one
/// printable character; the bytes that are not printable themselves take
/// the characters from U+0100 on, in byte order.
fn byte_level_chars() -> std::collections::HashMap<char, u8> {
    let mut next = 0x100u32;
    (0..=255u8)
        .map(|b| {
            let c = b as char;
            let printable = matches!(c, '!'..='~' | '\u{A1}'..='\u{AC}' | '\u{AE}'..='\u{FF}');
            if printable {
                (c, b)
            } else {
                let c = char::from_u32(next).expect("below U+0200");
                next += 1;
                (c, b)
            }
        })
        .collect()
}

/// Turns a stream of token ids into text deltas, holding back bytes that do
/// not yet form whole UTF-8 characters.
#[derive(Debug, Default)]
pub struct TextStream {
    ids: Vec<u32>,
    emitted: usize,
}

impl TextStream {
    /// Adds a token; returns the new text it completes, if any.
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> String {
        self.ids.push(id);
        let text = tokenizer.decode(&self.ids, true).unwrap_or_default();
        if text.ends_with('\u{FFFD}') || text.len() <= self.emitted {
            return String::new();
        }
        let delta = text[self.emitted..].to_string();
        self.emitted = text.len();
        delta
    }

    /// Whatever is left at the end (an incomplete character becomes U+FFFD).
    pub fn finish(&mut self, tokenizer: &Tokenizer) -> String {
        let text = tokenizer.decode(&self.ids, true).unwrap_or_default();
        if text.len() <= self.emitted {
            return String::new();
        }
        let delta = text[self.emitted..].to_string();
        self.emitted = text.len();
        delta
    }
}
