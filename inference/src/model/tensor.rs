//! The forward pass as candle tensor operations: the path for devices we
//! have no kernels of our own for (CUDA), and on the CPU a second
//! implementation the tests compare the native one with. Weights stay as GGUF
//! stores them (`QMatMul`); the KV cache concatenates per step.

use std::sync::Arc;

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};

use super::{load_err, ModelConfig};
use crate::gguf::{GgufFile, ModelError};

struct Layer {
    attn_norm: Tensor,
    q: QMatMul,
    k: QMatMul,
    v: QMatMul,
    q_bias: Option<Tensor>,
    k_bias: Option<Tensor>,
    v_bias: Option<Tensor>,
    o: QMatMul,
    ffn_norm: Tensor,
    gate: QMatMul,
    up: QMatMul,
    down: QMatMul,
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

/// Keeps the first `len` positions of every layer.
pub(super) fn truncate(
    layers: &mut [Option<(Tensor, Tensor)>],
    len: usize,
) -> candle_core::Result<()> {
    for l in layers.iter_mut() {
        if let Some((k, v)) = l.take() {
            if len > 0 {
                *l = Some((k.narrow(2, 0, len)?, v.narrow(2, 0, len)?));
            }
        }
    }
    Ok(())
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
        let embedding = Arc::new(file.tensor("token_embd.weight", device)?);
        let vocab_size = embedding.shape().dims()[0];
        let mut layers = Vec::with_capacity(config.n_layer);
        for i in 0..config.n_layer {
            let p = |s: &str| format!("blk.{i}.{s}");
            layers.push(Layer {
                attn_norm: dense(file, &p("attn_norm.weight"))?,
                q: q(file, &p("attn_q.weight"))?,
                k: q(file, &p("attn_k.weight"))?,
                v: q(file, &p("attn_v.weight"))?,
                q_bias: optional(file, &p("attn_q.bias"))?,
                k_bias: optional(file, &p("attn_k.bias"))?,
                v_bias: optional(file, &p("attn_v.bias"))?,
                o: q(file, &p("attn_output.weight"))?,
                ffn_norm: dense(file, &p("ffn_norm.weight"))?,
                gate: q(file, &p("ffn_gate.weight"))?,
                up: q(file, &p("ffn_up.weight"))?,
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

    /// Runs `tokens` at positions `pos..`, appends their keys and values to
    /// `cache`, and returns the logits after the last one.
    pub(super) fn forward(
        &self,
        c: &ModelConfig,
        device: &Device,
        tokens: &[u32],
        pos: usize,
        cache: &mut [Option<(Tensor, Tensor)>],
    ) -> candle_core::Result<Tensor> {
        let t = tokens.len();
        let ids = Tensor::new(tokens, device)?;
        let mut x = self.embedding.embedding(&ids)?.unsqueeze(0)?; // [1, t, dim]
        let cos = self.cos.narrow(0, pos, t)?;
        let sin = self.sin.narrow(0, pos, t)?;
        let mask = if t > 1 {
            Some(causal_mask(t, pos, device)?)
        } else {
            None
        };
        let n_rep = c.n_head / c.n_kv_head;
        for (layer, kv) in self.layers.iter().zip(cache.iter_mut()) {
            let h = candle_nn::ops::rms_norm(&x, &layer.attn_norm, c.eps as f32)?;
            let add_bias = |y: Tensor, b: &Option<Tensor>| match b {
                Some(b) => y.broadcast_add(b),
                None => Ok(y),
            };
            let q = add_bias(layer.q.forward(&h)?, &layer.q_bias)?;
            let k = add_bias(layer.k.forward(&h)?, &layer.k_bias)?;
            let v = add_bias(layer.v.forward(&h)?, &layer.v_bias)?;
            let q = q
                .reshape((1, t, c.n_head, c.head_dim))?
                .transpose(1, 2)?
                .contiguous()?;
            let k = k
                .reshape((1, t, c.n_kv_head, c.head_dim))?
                .transpose(1, 2)?
                .contiguous()?;
            let v = v
                .reshape((1, t, c.n_kv_head, c.head_dim))?
                .transpose(1, 2)?
                .contiguous()?;
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
            let (k, v) = match kv.take() {
                Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
                None => (k, v),
            };
            *kv = Some((k.clone(), v.clone()));
            let k = repeat_kv(k, n_rep)?;
            let v = repeat_kv(v, n_rep)?;
            let scale = 1.0 / (c.head_dim as f64).sqrt();
            let att = (q.matmul(&k.t()?)? * scale)?;
            let att = match &mask {
                Some(m) => att.broadcast_add(m)?,
                None => att,
            };
            let att = candle_nn::ops::softmax_last_dim(&att)?;
            let y = att.matmul(&v.contiguous()?)?; // [1, heads, t, head_dim]
            let y = y.transpose(1, 2)?.reshape((1, t, c.n_head * c.head_dim))?;
            x = (x + layer.o.forward(&y)?)?;
            let h = candle_nn::ops::rms_norm(&x, &layer.ffn_norm, c.eps as f32)?;
            let gate = candle_nn::ops::silu(&layer.gate.forward(&h)?)?;
            let ff = layer.down.forward(&(gate * layer.up.forward(&h)?)?)?;
            x = (x + ff)?;
        }
        let last = x.narrow(1, t - 1, 1)?;
        let last = candle_nn::ops::rms_norm(&last, &self.norm, c.eps as f32)?;
        self.output
            .forward(&last)?
            .flatten_all()?
            .to_dtype(DType::F32)
    }
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

/// `[t, pos + t]`: 0 where query i may see key j (j <= pos + i), -inf elsewhere.
fn causal_mask(t: usize, pos: usize, device: &Device) -> candle_core::Result<Tensor> {
    let s = pos + t;
    let mask: Vec<f32> = (0..t)
        .flat_map(|i| (0..s).map(move |j| if j > pos + i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(mask, (t, s), device)
}

fn repeat_kv(x: Tensor, n_rep: usize) -> candle_core::Result<Tensor> {
    if n_rep == 1 {
        return Ok(x);
    }
    let (b, kv, s, d) = x.dims4()?;
    x.unsqueeze(2)?
        .expand((b, kv, n_rep, s, d))?
        .reshape((b, kv * n_rep, s, d))
}
