//! The llama-family transformer over candle tensors: quantized weights kept
//! as GGUF stores them (`QMatMul`), a KV cache per sequence, RoPE, grouped
//! query attention, SwiGLU. Qwen2 differs only by attention biases and the
//! RoPE layout.

use std::sync::Arc;

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};

use crate::gguf::{GgufFile, ModelError};

/// Hyperparameters read from the GGUF metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// `general.architecture`.
    pub arch: String,
    /// Transformer blocks.
    pub n_layer: usize,
    /// Attention heads.
    pub n_head: usize,
    /// Key/value heads (grouped-query attention).
    pub n_kv_head: usize,
    /// Embedding width.
    pub dim: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// RMS norm epsilon.
    pub eps: f64,
    /// RoPE base frequency.
    pub rope_base: f32,
    /// Context length the model was trained for.
    pub context_length: usize,
    /// Vocabulary size (rows of the token embedding).
    pub vocab_size: usize,
}

/// A weight matrix applied to activations: our own kernel where we have
/// one (Q4_1 on the CPU), candle's `QMatMul` otherwise.
enum Linear {
    Q41(crate::kernels::q4_1::Q41Matrix),
    Candle(QMatMul),
}

impl Linear {
    fn new(t: QTensor, device: &Device) -> candle_core::Result<Linear> {
        if device.is_cpu() && t.dtype() == candle_core::quantized::GgmlDType::Q4_1 {
            let (rows, cols) = t.shape().dims2()?;
            let m = crate::kernels::q4_1::Q41Matrix::from_raw(rows, cols, t.data()?.into_owned())
                .map_err(candle_core::Error::msg)?;
            return Ok(Linear::Q41(m));
        }
        Ok(Linear::Candle(QMatMul::from_qtensor(t)?))
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Linear::Candle(q) => q.forward(x),
            Linear::Q41(m) => {
                let dims = x.dims().to_vec();
                let cols = *dims.last().unwrap();
                let n = x.elem_count() / cols;
                let xs = x.flatten_all()?.to_vec1::<f32>()?;
                let mut out = vec![0f32; n * m.rows()];
                m.matmul(&xs, n, &mut out);
                let mut shape = dims;
                *shape.last_mut().unwrap() = m.rows();
                Tensor::from_vec(out, shape, x.device())
            }
        }
    }
}

struct Layer {
    attn_norm: Tensor,
    q: Linear,
    k: Linear,
    v: Linear,
    q_bias: Option<Tensor>,
    k_bias: Option<Tensor>,
    v_bias: Option<Tensor>,
    o: Linear,
    ffn_norm: Tensor,
    gate: Linear,
    up: Linear,
    down: Linear,
}

/// A loaded model: immutable, shared by every sequence that runs on it.
pub struct Model {
    config: ModelConfig,
    device: Device,
    embedding: Arc<QTensor>,
    layers: Vec<Layer>,
    norm: Tensor,
    output: QMatMul,
    /// RoPE tables, `[context_length, head_dim / 2]`.
    cos: Tensor,
    sin: Tensor,
    /// GGUF llama weights are permuted for interleaved (GPT-J style) RoPE;
    /// Qwen2 keeps the halves (NeoX style).
    interleaved_rope: bool,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// The keys and values of one sequence, per layer.
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    len: usize,
}

impl KvCache {
    /// An empty cache for `model`.
    pub fn new(model: &Model) -> KvCache {
        KvCache {
            layers: vec![None; model.config.n_layer],
            len: 0,
        }
    }

    /// Positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Keeps the first `len` positions (to reuse a shared prefix).
    pub fn truncate(&mut self, len: usize) -> candle_core::Result<()> {
        if len >= self.len {
            return Ok(());
        }
        for l in self.layers.iter_mut() {
            if let Some((k, v)) = l.take() {
                if len > 0 {
                    *l = Some((k.narrow(2, 0, len)?, v.narrow(2, 0, len)?));
                }
            }
        }
        self.len = len;
        Ok(())
    }
}

fn load_err(file: &GgufFile, e: candle_core::Error) -> ModelError {
    ModelError::Load {
        path: file.path().to_path_buf(),
        reason: e.to_string(),
    }
}

impl Model {
    /// Loads the weights of `file` onto `device`.
    pub fn load(file: &mut GgufFile, device: &Device) -> Result<Model, ModelError> {
        let arch = file.arch().to_string();
        let key = |k: &str| format!("{arch}.{k}");
        let n_head = file.u64(&key("attention.head_count"))? as usize;
        let dim = file.u64(&key("embedding_length"))? as usize;
        let head_dim = match file.u64(&key("attention.key_length")) {
            Ok(d) => d as usize,
            Err(_) => dim / n_head,
        };
        let config = ModelConfig {
            n_layer: file.u64(&key("block_count"))? as usize,
            n_head,
            n_kv_head: file
                .u64(&key("attention.head_count_kv"))
                .map(|v| v as usize)
                .unwrap_or(n_head),
            dim,
            head_dim,
            eps: file.f32(&key("attention.layer_norm_rms_epsilon"))? as f64,
            rope_base: file.f32(&key("rope.freq_base")).unwrap_or(10_000.0),
            context_length: file.u64(&key("context_length"))? as usize,
            vocab_size: 0,
            arch: arch.clone(),
        };
        let q = |file: &mut GgufFile, name: &str| -> Result<Linear, ModelError> {
            let t = file.tensor(name, device)?;
            Linear::new(t, device).map_err(|e| load_err(file, e))
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
        let interleaved_rope = arch == "llama";
        Ok(Model {
            config: ModelConfig {
                vocab_size,
                ..config
            },
            device: device.clone(),
            embedding,
            layers,
            norm,
            output,
            cos,
            sin,
            interleaved_rope,
        })
    }

    /// Hyperparameters.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The device the weights are on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Runs `tokens` after what `cache` holds, appends them to the cache, and
    /// returns the logits for the next token after the last one (`[vocab]`, f32).
    pub fn forward(&self, tokens: &[u32], cache: &mut KvCache) -> candle_core::Result<Tensor> {
        let t = tokens.len();
        let pos = cache.len;
        if t == 0 {
            candle_core::bail!("forward needs at least one token");
        }
        if pos + t > self.config.context_length {
            candle_core::bail!(
                "{} positions exceed the context of {}",
                pos + t,
                self.config.context_length
            );
        }
        let c = &self.config;
        let ids = Tensor::new(tokens, &self.device)?;
        let mut x = self.embedding.embedding(&ids)?.unsqueeze(0)?; // [1, t, dim]
        let cos = self.cos.narrow(0, pos, t)?;
        let sin = self.sin.narrow(0, pos, t)?;
        let mask = if t > 1 {
            Some(causal_mask(t, pos, &self.device)?)
        } else {
            None
        };
        let n_rep = c.n_head / c.n_kv_head;
        for (layer, kv) in self.layers.iter().zip(cache.layers.iter_mut()) {
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
            let (q, k) = if self.interleaved_rope {
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
        cache.len += t;
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
