//! Synthetic models for speed figures: a llama-shaped GGUF of a realistic
//! size (1.5B or 7B parameters) with random Q4_1 weights and the default
//! model's tokenizer, written in about a minute with nothing downloaded.
//!
//! A 135M model says little about memory bandwidth: its weights fit in a
//! GPU's cache. A 7B one reads 3.55 GB of weights per decode step, so its
//! tokens/s against the GPU's bandwidth says how close decoding comes to the
//! bound. **Its text is noise** (the weights are random): use it for
//! throughput only, never for agreement or quality.
//!
//! Weights are written as Q4_1 blocks directly (random 4-bit values, a scale
//! and minimum chosen so each row has the spread of a trained layer's,
//! about `1/sqrt(inputs)`), so no f32 copy of the model is ever made.

use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{ggml_file, GgmlDType, QTensor};
use candle_core::Device;
use rand::{RngCore, SeedableRng};

/// A model shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    /// Its name in the file and in reports.
    pub name: &'static str,
    /// Transformer layers.
    pub n_layer: usize,
    /// Hidden width.
    pub n_embd: usize,
    /// Attention heads.
    pub n_head: usize,
    /// Key/value heads (grouped-query attention when fewer than `n_head`).
    pub n_kv_head: usize,
    /// Feed-forward width.
    pub n_ff: usize,
}

/// The shapes offered: `1.5b` (24 layers, 2048 wide, GQA 16/8, 8192
/// feed-forward) and `7b` (llama-2-7B: 32 layers, 4096 wide, 32 heads,
/// 11008 feed-forward), and `tiny` for tests.
pub const SHAPES: [Shape; 3] = [
    Shape {
        name: "1.5b",
        n_layer: 24,
        n_embd: 2048,
        n_head: 16,
        n_kv_head: 8,
        n_ff: 8192,
    },
    Shape {
        name: "7b",
        n_layer: 32,
        n_embd: 4096,
        n_head: 32,
        n_kv_head: 32,
        n_ff: 11008,
    },
    Shape {
        name: "tiny",
        n_layer: 2,
        n_embd: 64,
        n_head: 4,
        n_kv_head: 2,
        n_ff: 128,
    },
];

/// The shape called `name`.
pub fn shape(name: &str) -> Option<Shape> {
    SHAPES.iter().copied().find(|s| s.name == name)
}

/// Errors of [`write`].
#[derive(Debug, thiserror::Error)]
pub enum SyntheticError {
    /// The tokenizer's source could not be read.
    #[error("reading the tokenizer from {path}: {reason}")]
    Tokenizer {
        /// The GGUF file.
        path: std::path::PathBuf,
        /// Why.
        reason: String,
    },
    /// The output could not be written.
    #[error("writing {path}: {reason}")]
    Write {
        /// The output file.
        path: std::path::PathBuf,
        /// Why.
        reason: String,
    },
}

/// What [`write`] made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Written {
    /// Parameters in all (embeddings included).
    pub parameters: u64,
    /// Bytes of weights one decode step reads (every matrix but the
    /// embedding table, of which one row is read).
    pub weight_bytes_per_token: u64,
    /// The file's size.
    pub file_bytes: u64,
}

/// Writes a synthetic model of `shape` to `out`, with the tokenizer (and
/// vocabulary size) of the GGUF at `tokenizer_from`; `seed` fixes the
/// weights.
pub fn write(
    shape: &Shape,
    tokenizer_from: &Path,
    out: &Path,
    seed: u64,
) -> Result<Written, SyntheticError> {
    let tok_err = |reason: String| SyntheticError::Tokenizer {
        path: tokenizer_from.to_path_buf(),
        reason,
    };
    let write_err = |reason: String| SyntheticError::Write {
        path: out.to_path_buf(),
        reason,
    };
    let mut src = std::fs::File::open(tokenizer_from).map_err(|e| tok_err(e.to_string()))?;
    let content = gguf_file::Content::read(&mut src).map_err(|e| tok_err(e.to_string()))?;
    let vocab = match content.metadata.get("tokenizer.ggml.tokens") {
        Some(Value::Array(tokens)) => tokens.len(),
        _ => return Err(tok_err("no tokenizer.ggml.tokens".into())),
    };

    let mut metadata: Vec<(String, Value)> = content
        .metadata
        .iter()
        .filter(|(k, _)| k.starts_with("tokenizer."))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    // The same file for the same seed: metadata in a fixed order.
    metadata.sort_by(|a, b| a.0.cmp(&b.0));
    let u32v = |v: usize| Value::U32(v as u32);
    metadata.extend([
        ("general.architecture".into(), Value::String("llama".into())),
        (
            "general.name".into(),
            Value::String(format!(
                "synthetic-{} (random weights: its text is noise; for speed figures only)",
                shape.name
            )),
        ),
        ("llama.block_count".into(), u32v(shape.n_layer)),
        ("llama.embedding_length".into(), u32v(shape.n_embd)),
        ("llama.feed_forward_length".into(), u32v(shape.n_ff)),
        ("llama.attention.head_count".into(), u32v(shape.n_head)),
        (
            "llama.attention.head_count_kv".into(),
            u32v(shape.n_kv_head),
        ),
        ("llama.context_length".into(), u32v(4096)),
        ("llama.rope.freq_base".into(), Value::F32(10_000.0)),
        (
            "llama.attention.layer_norm_rms_epsilon".into(),
            Value::F32(1e-5),
        ),
        ("llama.vocab_size".into(), u32v(vocab)),
    ]);

    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let head_dim = shape.n_embd / shape.n_head;
    let kv = shape.n_kv_head * head_dim;
    let (d, f) = (shape.n_embd, shape.n_ff);
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    let mut per_token = 0u64;
    let mut parameters = 0u64;
    let mut q41 = |name: String, rows: usize, cols: usize, read_whole: bool| {
        let t = random_q4_1(&mut rng, rows, cols).map_err(|e| write_err(e.to_string()))?;
        let bytes = (rows * cols / 32 * 20) as u64;
        per_token += if read_whole {
            bytes
        } else {
            bytes / rows as u64
        };
        parameters += (rows * cols) as u64;
        tensors.push((name, t));
        Ok::<_, SyntheticError>(())
    };
    q41("token_embd.weight".into(), vocab, d, false)?;
    for i in 0..shape.n_layer {
        let p = |s: &str| format!("blk.{i}.{s}");
        q41(p("attn_q.weight"), d, d, true)?;
        q41(p("attn_k.weight"), kv, d, true)?;
        q41(p("attn_v.weight"), kv, d, true)?;
        q41(p("attn_output.weight"), d, d, true)?;
        q41(p("ffn_gate.weight"), f, d, true)?;
        q41(p("ffn_up.weight"), f, d, true)?;
        q41(p("ffn_down.weight"), d, f, true)?;
    }
    q41("output.weight".into(), vocab, d, true)?;
    let ones = |n: usize| -> Result<QTensor, SyntheticError> {
        let bytes: Vec<u8> = std::iter::repeat_n(1f32.to_le_bytes(), n)
            .flatten()
            .collect();
        ggml_file::qtensor_from_ggml(GgmlDType::F32, &bytes, vec![n], &Device::Cpu)
            .map_err(|e| write_err(e.to_string()))
    };
    for i in 0..shape.n_layer {
        tensors.push((format!("blk.{i}.attn_norm.weight"), ones(d)?));
        tensors.push((format!("blk.{i}.ffn_norm.weight"), ones(d)?));
    }
    tensors.push(("output_norm.weight".into(), ones(d)?));

    let file_bytes =
        crate::requantize::write_atomically(out, &metadata, &tensors).map_err(write_err)?;
    Ok(Written {
        parameters,
        weight_bytes_per_token: per_token,
        file_bytes,
    })
}

/// A `[rows, cols]` Q4_1 matrix of random 4-bit values; each block's scale
/// and minimum centre it on zero with a spread of about `1/sqrt(cols)`.
fn random_q4_1(
    rng: &mut rand::rngs::StdRng,
    rows: usize,
    cols: usize,
) -> candle_core::Result<QTensor> {
    const BLOCK: usize = 20; // f16 scale, f16 minimum, 16 bytes of nibbles
    let blocks = rows * cols / 32;
    let mut raw = vec![0u8; blocks * BLOCK];
    rng.fill_bytes(&mut raw);
    // Uniform over 16 levels: standard deviation 16 * scale / sqrt(12).
    let scale = (12f32.sqrt() / 16.0) / (cols as f32).sqrt();
    let head = [
        half::f16::from_f32(scale).to_le_bytes(),
        half::f16::from_f32(-7.5 * scale).to_le_bytes(),
    ]
    .concat();
    for b in raw.chunks_exact_mut(BLOCK) {
        b[..4].copy_from_slice(&head);
    }
    ggml_file::qtensor_from_ggml(GgmlDType::Q4_1, &raw, vec![rows, cols], &Device::Cpu)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_have_whole_blocks_and_heads() {
        for s in SHAPES {
            assert_eq!(s.n_embd % 32, 0, "{}", s.name);
            assert_eq!(s.n_ff % 32, 0, "{}", s.name);
            assert_eq!(s.n_embd % s.n_head, 0, "{}", s.name);
            assert_eq!(s.n_head % s.n_kv_head, 0, "{}", s.name);
        }
        assert_eq!(shape("7b").map(|s| s.n_layer), Some(32));
        assert_eq!(shape("13b"), None);
    }
}
