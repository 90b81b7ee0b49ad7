//! The forward pass as candle tensor operations: the path for devices we
//! have no kernels of our own for (CUDA), and on the CPU a second
//! implementation the tests compare the native one with. Weights stay as GGUF
//! stores them (`QMatMul`: on CUDA, candle's MMVQ kernels for up to 8 rows
//! and MMQ beyond, both quantising activations to Q8_1 as llama.cpp does).
//!
//! One pass runs rows of one or several sequences ([`SeqRows`]): a prompt
//! (one sequence, many rows) or a decode step of a batch (many sequences,
//! one row each). Every row is one matrix product per weight for the whole
//! pass; attention reads the paged KV cache ([`super::paged`]) for all the
//! sequences at once, gathered to the longest and masked.
//!
//! What a decode step costs in kernel launches (CUDA, per layer, any batch
//! size): 2 RMS norms; 4 quantised products, each a Q8_1 quantisation of
//! its input and a product (8), with the query, key and value matrices
//! stacked into one and the gate and up matrices into another (35
//! launches per layer before, with 7 products); the copies of q, k and v
//! out of the stacked output (3), 2 RoPE, 2 scatters into the pool, 2
//! gathers and 2 transposes out of it, the query's permute, 2 attention
//! products, the scale, the mask, a softmax, the output permute, 2
//! residual adds, SiLU and the gate product: 32 launches per layer, 30
//! layers: about 960 per step, plus the embedding, the final norm, the
//! output product, the row selection and the copy to the host. Batching
//! amortises them over the sequences of a step; a CUDA graph of the step
//! (not done: candle allocates every intermediate afresh, which stream
//! capture would have to record and replay) would replay them in one.

use std::sync::Arc;

use candle_core::quantized::ggml_file::qtensor_from_ggml;
use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};

use super::paged::{KvPool, PagedSeq};
use super::{load_err, ModelConfig};
use crate::gguf::{GgufFile, ModelError};

struct Layer {
    attn_norm: Tensor,
    /// Rows `q | k | v`: one product (one quantisation of the input, one
    /// kernel) where three were.
    qkv: Stacked,
    /// Qwen2's attention biases, laid out as `qkv`'s rows.
    qkv_bias: Option<Tensor>,
    o: QMatMul,
    ffn_norm: Tensor,
    /// Rows `gate | up`.
    gate_up: Stacked,
    down: QMatMul,
}

/// Matrices applied to the same input, their outputs side by side
/// (`[n, Σ rows]`). Stored as one matrix when they share a type and a width
/// (GGUF quantises each row on its own, so their rows concatenate into a
/// valid matrix of that type); otherwise as parts whose outputs are joined.
enum Stacked {
    One(QMatMul),
    Parts(Vec<QMatMul>),
}

impl Stacked {
    fn load(file: &mut GgufFile, names: &[String], device: &Device) -> Result<Stacked, ModelError> {
        let parts = names
            .iter()
            .map(|n| file.tensor(n, &Device::Cpu))
            .collect::<Result<Vec<QTensor>, _>>()?;
        Stacked::new(parts, device).map_err(|e| load_err(file, e))
    }

    /// `parts` (on the CPU) stacked on `device`.
    fn new(parts: Vec<QTensor>, device: &Device) -> candle_core::Result<Stacked> {
        let dtype = parts[0].dtype();
        let width = |t: &QTensor| t.shape().dims().last().copied();
        let uniform = parts
            .iter()
            .all(|t| t.dtype() == dtype && t.shape().rank() == 2 && width(t) == width(&parts[0]));
        if uniform {
            let rows: usize = parts.iter().map(|t| t.shape().dims()[0]).sum();
            let mut bytes = Vec::new();
            for t in &parts {
                bytes.extend_from_slice(&t.data()?);
            }
            let dims = vec![rows, width(&parts[0]).unwrap_or(0)];
            let t = qtensor_from_ggml(dtype, &bytes, dims, device)?;
            return Ok(Stacked::One(QMatMul::from_qtensor(t)?));
        }
        let on_device = |t: QTensor| -> candle_core::Result<QMatMul> {
            let dims = t.shape().dims().to_vec();
            QMatMul::from_qtensor(qtensor_from_ggml(t.dtype(), &t.data()?, dims, device)?)
        };
        Ok(Stacked::Parts(
            parts
                .into_iter()
                .map(on_device)
                .collect::<candle_core::Result<_>>()?,
        ))
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Stacked::One(m) => m.forward(x),
            Stacked::Parts(parts) => {
                let outs = parts
                    .iter()
                    .map(|m| m.forward(x))
                    .collect::<candle_core::Result<Vec<_>>>()?;
                Tensor::cat(&outs, 1)
            }
        }
    }
}

/// The weights, as candle tensors.
pub(super) struct TensorWeights {
    embedding: Arc<QTensor>,
    layers: Vec<Layer>,
    norm: Tensor,
    output: QMatMul,
    /// RoPE tables, `[context_length, head_dim / 2]`.
    cos: Tensor,
    sin: Tensor,
}

impl TensorWeights {
    /// Loads the weights of `file` onto `device` and fills in
    /// `config.vocab_size`.
    pub(super) fn load(
        file: &mut GgufFile,
        config: &mut ModelConfig,
        device: &Device,
    ) -> Result<TensorWeights, ModelError> {
        let q = |file: &mut GgufFile, name: &str| -> Result<QMatMul, ModelError> {
            let t = file.tensor(name, device)?;
            QMatMul::from_qtensor(t).map_err(|e| load_err(file, e))
        };
        let dense = |file: &mut GgufFile, name: &str| -> Result<Tensor, ModelError> {
            let t = file.tensor(name, device)?;
            t.dequantize(device).map_err(|e| load_err(file, e))
        };
        let optional = |file: &mut GgufFile, name: &str| -> Result<Option<Tensor>, ModelError> {
            if file.has_tensor(name) {
                Ok(Some(dense(file, name)?))
            } else {
                Ok(None)
            }
        };
        // All three biases or none (Qwen2 has them, llama not).
        let biases =
            |file: &mut GgufFile, names: [String; 3]| -> Result<Option<Tensor>, ModelError> {
                let mut parts = Vec::new();
                for n in &names {
                    match optional(file, n)? {
                        Some(b) => parts.push(b),
                        None if parts.is_empty() => return Ok(None),
                        None => return Err(load_err(file, format!("{n} is missing"))),
                    }
                }
                Tensor::cat(&parts, 0)
                    .map(Some)
                    .map_err(|e| load_err(file, e))
            };
        let embedding = Arc::new(file.tensor("token_embd.weight", device)?);
        let vocab_size = embedding.shape().dims()[0];
        let mut layers = Vec::with_capacity(config.n_layer);
        for i in 0..config.n_layer {
            let p = |s: &str| format!("blk.{i}.{s}");
            layers.push(Layer {
                attn_norm: dense(file, &p("attn_norm.weight"))?,
                qkv: Stacked::load(
                    file,
                    &[p("attn_q.weight"), p("attn_k.weight"), p("attn_v.weight")],
                    device,
                )?,
                qkv_bias: biases(file, [p("attn_q.bias"), p("attn_k.bias"), p("attn_v.bias")])?,
                o: q(file, &p("attn_output.weight"))?,
                ffn_norm: dense(file, &p("ffn_norm.weight"))?,
                gate_up: Stacked::load(file, &[p("ffn_gate.weight"), p("ffn_up.weight")], device)?,
                down: q(file, &p("ffn_down.weight"))?,
            });
        }
        let norm = dense(file, "output_norm.weight")?;
        // Small models tie the output projection to the token embedding.
        let output = if file.has_tensor("output.weight") {
            let t = file.tensor("output.weight", device)?;
            QMatMul::from_qtensor(t).map_err(|e| load_err(file, e))?
        } else {
            QMatMul::from_arc(embedding.clone()).map_err(|e| load_err(file, e))?
        };
        let (cos, sin) = rope_tables(
            config.rope_base,
            config.head_dim,
            config.context_length,
            device,
        )
        .map_err(|e| load_err(file, e))?;
        config.vocab_size = vocab_size;
        Ok(TensorWeights {
            embedding,
            layers,
            norm,
            output,
            cos,
            sin,
        })
    }

    /// Runs every sequence's rows after what its cache holds, writes their
    /// keys and values to the pool, and returns the logits after each row
    /// `logits_of` names (indexes into the concatenated rows), in order.
    /// Every sequence runs the same number of rows (a prompt alone, or one
    /// row each in a decode step). The caches must have been prepared for
    /// the new positions ([`super::paged::PagedSeq::prepare`]); their
    /// lengths are the caller's to keep.
    pub(super) fn forward(
        &self,
        c: &ModelConfig,
        device: &Device,
        seqs: &[SeqRows<'_>],
        logits_of: &[usize],
    ) -> candle_core::Result<Vec<Vec<f32>>> {
        let b = seqs.len();
        let t = seqs.first().map_or(0, |s| s.tokens.len());
        if b == 0 || t == 0 || seqs.iter().any(|s| s.tokens.len() != t) {
            candle_core::bail!("a pass needs sequences of the same, non-zero number of rows");
        }
        let n = b * t;
        let (kvh, hd) = (c.n_kv_head, c.head_dim);
        let n_rep = c.n_head / kvh;
        let kv_width = kvh * hd;
        // Longest sequence after this pass: the keys every query may read.
        let l = seqs.iter().map(|s| s.pos + t).max().unwrap_or(0);

        // What the host decides, uploaded once per pass.
        let mut ids = Vec::with_capacity(n);
        let mut positions = Vec::with_capacity(n);
        let mut new_slots = Vec::with_capacity(n);
        let mut gather = Vec::with_capacity(b * l);
        let mut mask = Vec::with_capacity(b * t * l);
        for s in seqs {
            for (i, &id) in s.tokens.iter().enumerate() {
                ids.push(id);
                positions.push((s.pos + i) as u32);
                new_slots.push(s.cache.slot(s.pos + i));
            }
            let len = s.pos + t;
            let pad = s.cache.slot(0);
            gather.extend((0..l).map(|j| if j < len { s.cache.slot(j) } else { pad }));
            for i in 0..t {
                mask.extend((0..l).map(|j| {
                    if j <= s.pos + i {
                        0f32
                    } else {
                        f32::NEG_INFINITY
                    }
                }));
            }
        }
        let ids = Tensor::new(ids.as_slice(), device)?;
        let positions = Tensor::new(positions.as_slice(), device)?;
        let new_slots = Tensor::new(new_slots.as_slice(), device)?
            .unsqueeze(1)?
            .broadcast_as((n, kv_width))?
            .contiguous()?;
        let gather = Tensor::new(gather.as_slice(), device)?;
        let mask = Tensor::from_vec(mask, (b, 1, 1, t, l), device)?;
        // One RoPE row per row of the pass, each at its own position.
        let cos = self.cos.index_select(&positions, 0)?.unsqueeze(1)?;
        let sin = self.sin.index_select(&positions, 0)?.unsqueeze(1)?;
        let pool = seqs[0].cache.pool();

        let mut x = self.embedding.embedding(&ids)?; // [n, dim]
        let scale = 1.0 / (hd as f64).sqrt();
        for (li, layer) in self.layers.iter().enumerate() {
            let h = candle_nn::ops::rms_norm(&x, &layer.attn_norm, c.eps as f32)?;
            let qkv = layer.qkv.forward(&h)?;
            let qkv = match &layer.qkv_bias {
                Some(bias) => qkv.broadcast_add(bias)?,
                None => qkv,
            };
            let q_width = c.n_head * hd;
            let q = qkv.narrow(1, 0, q_width)?;
            let k = qkv.narrow(1, q_width, kv_width)?;
            let v = qkv.narrow(1, q_width + kv_width, kv_width)?;
            // Rows as RoPE's batch, one position each (the reshape of a
            // column range copies it out, contiguous, as RoPE wants).
            let q = q.reshape((n, c.n_head, 1, hd))?;
            let k = k.reshape((n, kvh, 1, hd))?;
            let (q, k) = if c.interleaved_rope {
                (
                    candle_nn::rotary_emb::rope_i(&q, &cos, &sin)?,
                    candle_nn::rotary_emb::rope_i(&k, &cos, &sin)?,
                )
            } else {
                (
                    candle_nn::rotary_emb::rope(&q, &cos, &sin)?,
                    candle_nn::rotary_emb::rope(&k, &cos, &sin)?,
                )
            };
            pool.k[li].scatter_set(&new_slots, &k.reshape((n, kv_width))?, 0)?;
            pool.v[li].scatter_set(&new_slots, &v.contiguous()?, 0)?;
            // [b, kvh, l, hd]: each sequence's keys and values, padded.
            let keys = pool.k[li]
                .index_select(&gather, 0)?
                .reshape((b, l, kvh, hd))?
                .transpose(1, 2)?
                .contiguous()?;
            let values = pool.v[li]
                .index_select(&gather, 0)?
                .reshape((b, l, kvh, hd))?
                .transpose(1, 2)?
                .contiguous()?;
            // Queries grouped by the key/value head they read (heads
            // kv * n_rep .. kv * n_rep + n_rep share kv): no copy of keys
            // per head.
            let q = q
                .reshape((b, t, kvh, n_rep, hd))?
                .permute((0, 2, 3, 1, 4))?
                .contiguous()?
                .reshape((b, kvh, n_rep * t, hd))?;
            let att = (q.matmul(&keys.t()?)? * scale)?
                .reshape((b, kvh, n_rep, t, l))?
                .broadcast_add(&mask)?;
            let att = candle_nn::ops::softmax_last_dim(&att)?.reshape((b, kvh, n_rep * t, l))?;
            let y = att
                .matmul(&values)?
                .reshape((b, kvh, n_rep, t, hd))?
                .permute((0, 3, 1, 2, 4))?
                .contiguous()?
                .reshape((n, c.n_head * hd))?;
            x = (x + layer.o.forward(&y)?)?;
            let h = candle_nn::ops::rms_norm(&x, &layer.ffn_norm, c.eps as f32)?;
            let gate_up = layer.gate_up.forward(&h)?;
            let ffn = gate_up.dim(1)? / 2;
            let gate = candle_nn::ops::silu(&gate_up.narrow(1, 0, ffn)?)?;
            let ff = layer
                .down
                .forward(&(gate * gate_up.narrow(1, ffn, ffn)?)?)?;
            x = (x + ff)?;
        }
        // Only the rows whose logits are wanted go through the output
        // product and to the host.
        let rows: Vec<u32> = logits_of.iter().map(|&r| r as u32).collect();
        let rows = Tensor::new(rows.as_slice(), device)?;
        let last = x.index_select(&rows, 0)?;
        let last = candle_nn::ops::rms_norm(&last, &self.norm, c.eps as f32)?;
        self.output.forward(&last)?.to_dtype(DType::F32)?.to_vec2()
    }

    /// A pool for `positions` positions of every layer on `device`.
    pub(super) fn pool(
        &self,
        c: &ModelConfig,
        positions: usize,
        device: &Device,
    ) -> candle_core::Result<KvPool> {
        KvPool::new(
            self.layers.len(),
            c.n_kv_head * c.head_dim,
            positions,
            device,
        )
    }
}

/// One sequence's part of a pass: `tokens` at positions `pos..`.
pub(super) struct SeqRows<'a> {
    pub(super) tokens: &'a [u32],
    pub(super) pos: usize,
    pub(super) cache: &'a PagedSeq,
}

fn rope_tables(
    base: f32,
    head_dim: usize,
    ctx: usize,
    device: &Device,
) -> candle_core::Result<(Tensor, Tensor)> {
    let inv: Vec<f32> = (0..head_dim)
        .step_by(2)
        .map(|i| 1.0 / base.powf(i as f32 / head_dim as f32))
        .collect();
    let inv = Tensor::new(inv.as_slice(), device)?;
    let pos = Tensor::arange(0u32, ctx as u32, device)?.to_dtype(DType::F32)?;
    let freqs = pos.unsqueeze(1)?.broadcast_mul(&inv.unsqueeze(0)?)?;
    Ok((freqs.cos()?, freqs.sin()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::GgmlDType;

    fn quantized(rows: usize, seed: f64, dtype: GgmlDType) -> QTensor {
        let w = Tensor::arange(0f32, (rows * 64) as f32, &Device::Cpu)
            .unwrap()
            .affine(0.37, seed)
            .unwrap()
            .sin()
            .unwrap()
            .reshape((rows, 64))
            .unwrap();
        QTensor::quantize(&w, dtype).unwrap()
    }

    /// Stacked rows give each part's product side by side, to the bit:
    /// one matrix when the parts share a type, parts joined when not.
    #[test]
    fn a_stacked_product_equals_its_parts_side_by_side() {
        let x = Tensor::arange(0f32, 3.0 * 64.0, &Device::Cpu)
            .unwrap()
            .affine(0.01, -0.9)
            .unwrap()
            .cos()
            .unwrap()
            .reshape((3, 64))
            .unwrap();
        for dtypes in [
            [GgmlDType::Q4_1, GgmlDType::Q4_1, GgmlDType::Q4_1],
            [GgmlDType::Q4_1, GgmlDType::Q4_1, GgmlDType::Q8_0],
        ] {
            let shapes = [(64, 0.1), (32, 0.2), (32, 0.3)];
            let make = || {
                shapes
                    .iter()
                    .zip(dtypes)
                    .map(|(&(rows, seed), dtype)| quantized(rows, seed, dtype))
                    .collect::<Vec<_>>()
            };
            let stacked = Stacked::new(make(), &Device::Cpu).unwrap();
            let uniform = dtypes.iter().all(|&d| d == dtypes[0]);
            assert_eq!(matches!(stacked, Stacked::One(_)), uniform, "{dtypes:?}");
            let got = stacked.forward(&x).unwrap();
            assert_eq!(got.dims(), &[3, 128]);
            let want = Tensor::cat(
                &make()
                    .into_iter()
                    .map(|t| QMatMul::from_qtensor(t).unwrap().forward(&x).unwrap())
                    .collect::<Vec<_>>(),
                1,
            )
            .unwrap();
            assert_eq!(
                got.to_vec2::<f32>().unwrap(),
                want.to_vec2::<f32>().unwrap(),
                "{dtypes:?}"
            );
        }
    }
}
