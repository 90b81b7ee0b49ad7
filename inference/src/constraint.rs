//! Constrained decoding: the output follows a JSON Schema by construction.
//!
//! Before each token is sampled, a [`Constraint`] masks every token that
//! cannot continue a document valid against the schema (llguidance computes
//! the mask from the grammar and the tokenizer's trie, as llama.cpp's and
//! vLLM's llguidance backends do); after it, the chosen token is fed to the
//! constraint. The sequence ends when the document is complete. Nothing is
//! checked after the fact: there is no output to repair.
//!
//! [`Grammars`] is built once per tokenizer (the trie of its 49k tokens,
//! about 70 ms) and compiles each request's schema into a constraint in
//! about a millisecond, in the HTTP handler, so a schema the engine cannot
//! enforce is refused with the keyword it does not implement before
//! anything is reserved or queued.
//!
//! The JSON is written with fixed separators (`", "` and `": "`, as
//! Python's `json.dumps`) and no other whitespace: a small model left free
//! to add whitespace can fill its whole budget with it.

use std::sync::{Arc, OnceLock};

use llguidance::api::TopLevelGrammar;
use llguidance::{Matcher, ParserFactory};
use serde_json::Value;
use toktrie::{TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};

use crate::tokenizer::Tokenizer;

/// Limits on the schemas a request may send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchemaLimits {
    /// Most bytes of the schema, serialized.
    pub max_bytes: usize,
    /// Most nesting of objects and arrays in the schema document.
    pub max_depth: usize,
}

impl Default for SchemaLimits {
    fn default() -> Self {
        SchemaLimits {
            max_bytes: 64 * 1024,
            max_depth: 32,
        }
    }
}

/// Why a schema was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SchemaError {
    /// Larger than `SchemaLimits::max_bytes`.
    #[error("the schema has {bytes} bytes; the limit is {limit} (api.max_schema_bytes)")]
    TooLarge {
        /// Its size.
        bytes: usize,
        /// The limit.
        limit: usize,
    },
    /// Nested deeper than `SchemaLimits::max_depth`.
    #[error("the schema nests deeper than {limit} levels (api.max_schema_depth)")]
    TooDeep {
        /// The limit.
        limit: usize,
    },
    /// Not a schema the engine can enforce (an unimplemented keyword, an
    /// unknown format, a pattern with look-around, a remote `$ref`, an
    /// unsatisfiable schema…): llguidance's reason, which names it.
    #[error("{0}")]
    Unsupported(String),
    /// The tokenizer could not be turned into a token trie.
    #[error("constrained decoding is not available for this model: {0}")]
    Unavailable(String),
}

/// The token trie of one tokenizer, for llguidance.
struct TrieEnv {
    trie: TokTrie,
    tokenizer: Arc<Tokenizer>,
}

impl TokenizerEnv for TrieEnv {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        // The model's own BPE where the bytes are UTF-8, the trie's
        // greedy split elsewhere.
        self.trie
            .tokenize_with_greedy_fallback(s, |s| self.tokenizer.encode(s).unwrap_or_default())
    }
}

/// Compiles schemas into constraints for one tokenizer.
pub struct Grammars {
    tokenizer: Arc<Tokenizer>,
    factory: OnceLock<Result<ParserFactory, String>>,
}

impl std::fmt::Debug for Grammars {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grammars").finish_non_exhaustive()
    }
}

impl Grammars {
    /// Grammars for `tokenizer`; the trie is built at the first use (or by
    /// [`Grammars::warm`]).
    pub fn new(tokenizer: Arc<Tokenizer>) -> Grammars {
        Grammars {
            tokenizer,
            factory: OnceLock::new(),
        }
    }

    /// Builds the trie now, so the first constrained request does not wait.
    pub fn warm(&self) -> Result<(), SchemaError> {
        self.factory().map(|_| ())
    }

    fn factory(&self) -> Result<&ParserFactory, SchemaError> {
        self.factory
            .get_or_init(|| build_factory(&self.tokenizer))
            .as_ref()
            .map_err(|e| SchemaError::Unavailable(e.clone()))
    }

    /// A constraint for `schema`, checked against `limits` first.
    pub fn json_schema(
        &self,
        schema: &Value,
        limits: &SchemaLimits,
    ) -> Result<Constraint, SchemaError> {
        let bytes = serde_json::to_vec(schema).map_or(usize::MAX, |v| v.len());
        if bytes > limits.max_bytes {
            return Err(SchemaError::TooLarge {
                bytes,
                limit: limits.max_bytes,
            });
        }
        if depth(schema) > limits.max_depth {
            return Err(SchemaError::TooDeep {
                limit: limits.max_depth,
            });
        }
        if !schema.is_object() && !schema.is_boolean() {
            return Err(SchemaError::Unsupported(
                "a JSON Schema is an object (or true/false)".into(),
            ));
        }
        let mut schema = schema.clone();
        if let Some(o) = schema.as_object_mut() {
            // Our separators, whatever the request said (see the module docs).
            o.insert(
                "x-guidance".into(),
                serde_json::json!({
                    "whitespace_flexible": false,
                    "item_separator": ", ",
                    "key_separator": ": ",
                }),
            );
        }
        let parser = self
            .factory()?
            .create_parser(TopLevelGrammar::from_json_schema(schema))
            .map_err(|e| SchemaError::Unsupported(first_line(&e.to_string())))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(SchemaError::Unsupported(first_line(&e)));
        }
        Ok(Constraint { matcher })
    }
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or(s).trim().to_string()
}

/// Nesting of objects and arrays in a JSON document (a scalar is 0).
fn depth(v: &Value) -> usize {
    match v {
        Value::Array(a) => 1 + a.iter().map(depth).max().unwrap_or(0),
        Value::Object(o) => 1 + o.values().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

fn build_factory(tokenizer: &Arc<Tokenizer>) -> Result<ParserFactory, String> {
    let vocab = tokenizer.vocab_size();
    let words: Vec<Vec<u8>> = (0..vocab as u32)
        .map(|id| {
            let bytes = tokenizer.token_bytes(id);
            if tokenizer.is_control(id) {
                // No grammar text can spell a control token.
                let mut w = vec![TokTrie::SPECIAL_TOKEN_MARKER];
                w.extend_from_slice(bytes);
                w
            } else {
                bytes.to_vec()
            }
        })
        .collect();
    let stops = tokenizer.stop_ids();
    let eos = *stops
        .first()
        .ok_or("the tokenizer has no end-of-turn token")?;
    let info = TokRxInfo::new(vocab as u32, eos);
    let trie = TokTrie::from(&info, &words).with_eos_tokens(stops);
    let env: TokEnv = Arc::new(TrieEnv {
        trie,
        tokenizer: tokenizer.clone(),
    });
    let mut factory = ParserFactory::new_simple(&env).map_err(|e| e.to_string())?;
    factory.quiet();
    Ok(factory)
}

/// One sequence's constraint: which tokens may come next.
pub struct Constraint {
    matcher: Matcher,
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Constraint")
            .field("stopped", &self.matcher.is_stopped())
            .finish()
    }
}

impl Clone for Constraint {
    fn clone(&self) -> Self {
        self.fork()
    }
}

impl Constraint {
    /// Sets the logits of every token that cannot come next to −∞.
    pub fn mask(&mut self, logits: &mut [f32]) -> Result<(), String> {
        let mask = self.matcher.compute_mask().map_err(|e| e.to_string())?;
        mask.iter_unset_entries(|i| {
            if let Some(l) = logits.get_mut(i) {
                *l = f32::NEG_INFINITY;
            }
        });
        // Ids past the trie (a vocabulary padded in the weights) never come.
        for l in logits.iter_mut().skip(mask.len()) {
            *l = f32::NEG_INFINITY;
        }
        Ok(())
    }

    /// Feeds the token that was chosen.
    pub fn consume(&mut self, id: u32) -> Result<(), String> {
        self.matcher.consume_token(id).map_err(|e| e.to_string())
    }

    /// Whether the document is complete: nothing more may follow.
    pub fn is_stopped(&self) -> bool {
        self.matcher.is_stopped()
    }

    /// An independent copy at the same point (for `n` choices).
    pub fn fork(&self) -> Constraint {
        Constraint {
            matcher: self.matcher.deep_clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn depth_counts_nesting() {
        assert_eq!(depth(&json!(1)), 0);
        assert_eq!(depth(&json!({"a": [1, {"b": {}}]})), 4);
    }
}
