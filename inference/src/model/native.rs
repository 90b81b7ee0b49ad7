//! The forward pass on the CPU over plain `f32` slices, with our own
//! quantised kernels (`crate::kernels`) and candle's `QMatMul` only for
//! weight formats we have no kernel for.
//!
//! Shapes: activations are row-major `[t, width]` for the `t` tokens of one
//! call. The query, key and value projections are fused into one product
//! (rows `q | k | v`), as are the gate and up projections (`gate | up`), so a
//! layer is four products. The KV cache of a layer is position-major
//! (`[pos, n_kv_head · head_dim]`): appending a step is a `Vec` extend,
//! keeping a prefix is a `Vec` truncate.

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use rayon::prelude::*;

use super::{load_err, ModelConfig};
use crate::gguf::{GgufFile, ModelError};
use crate::kernels::attention::{AttentionKernels, Strided};
use crate::kernels::{q4_1::Q41Matrix, q8_0::Q80Matrix};

/// One weight matrix, `rows × cols`, applied as `y = W x`.
enum Linear {
    Q41(Q41Matrix),
    Q80(Arc<Q80Matrix>),
    /// Any other GGML type, through candle.
    Candle {
        m: QMatMul,
        rows: usize,
        cols: usize,
    },
}

impl Linear {
    fn new(t: QTensor) -> candle_core::Result<Linear> {
        Linear::shared(Arc::new(t))
    }

    fn shared(t: Arc<QTensor>) -> candle_core::Result<Linear> {
        let (rows, cols) = t.shape().dims2()?;
        Ok(match t.dtype() {
            GgmlDType::Q4_1 => Linear::Q41(
                Q41Matrix::from_raw(rows, cols, t.data()?.into_owned())
                    .map_err(candle_core::Error::msg)?,
            ),
            GgmlDType::Q8_0 => Linear::Q80(Arc::new(
                Q80Matrix::from_raw(rows, cols, &t.data()?).map_err(candle_core::Error::msg)?,
            )),
            _ => Linear::Candle {
                m: QMatMul::from_arc(t)?,
                rows,
                cols,
            },
        })
    }

    /// Stacks matrices of one width into one (`a` rows, then `b` rows...):
    /// one product, one quantisation of the activations, one dispatch to the
    /// threads instead of several. Different GGML types stay apart.
    fn stacked(parts: Vec<QTensor>) -> candle_core::Result<Vec<Linear>> {
        let same = parts.windows(2).all(|w| {
            w[0].dtype() == w[1].dtype() && w[0].shape().dims().get(1) == w[1].shape().dims().get(1)
        });
        if !same || !matches!(parts[0].dtype(), GgmlDType::Q4_1 | GgmlDType::Q8_0) {
            return parts.into_iter().map(Linear::new).collect();
        }
        let (_, cols) = parts[0].shape().dims2()?;
        let dtype = parts[0].dtype();
        let mut rows = 0;
        let mut raw = Vec::new();
        for p in &parts {
            rows += p.shape().dims2()?.0;
            raw.extend_from_slice(&p.data()?);
        }
        let t = candle_core::quantized::ggml_file::qtensor_from_ggml(
            dtype,
            &raw,
            vec![rows, cols],
            &Device::Cpu,
        )?;
        Ok(vec![Linear::new(t)?])
    }

    fn rows(&self) -> usize {
        match self {
            Linear::Q41(m) => m.rows(),
            Linear::Q80(m) => m.rows(),
            Linear::Candle { rows, .. } => *rows,
        }
    }

    fn cols(&self) -> usize {
        match self {
            Linear::Q41(m) => m.cols(),
            Linear::Q80(m) => m.cols(),
            Linear::Candle { cols, .. } => *cols,
        }
    }

    /// `out` (`n × rows`) = `x` (`n × cols`) times the transposed weights.
    fn matmul(&self, x: &[f32], n: usize, out: &mut [f32]) -> candle_core::Result<()> {
        match self {
            Linear::Q41(m) => m.matmul(x, n, out),
            Linear::Q80(m) => m.matmul(x, n, out),
            Linear::Candle { m, rows, cols } => {
                let xt = Tensor::from_slice(x, (n, *cols), &Device::Cpu)?;
                let y = m.forward(&xt)?.flatten_all()?.to_vec1::<f32>()?;
                if y.len() != n * rows {
                    candle_core::bail!("product of {} values, expected {}", y.len(), n * rows);
                }
                out.copy_from_slice(&y);
            }
        }
        Ok(())
    }
}

/// Several matrices applied to the same input, their outputs side by side
/// (`n × Σ rows`): the fused projections.
struct Projection {
    parts: Vec<Linear>,
    rows: usize,
}

impl Projection {
    fn load(file: &mut GgufFile, names: &[String]) -> Result<Projection, ModelError> {
        let tensors = names
            .iter()
            .map(|n| file.tensor(n, &Device::Cpu))
            .collect::<Result<Vec<_>, _>>()?;
        let parts = Linear::stacked(tensors).map_err(|e| load_err(file, e))?;
        let rows = parts.iter().map(Linear::rows).sum();
        Ok(Projection { parts, rows })
    }

    fn apply(&self, x: &[f32], n: usize, out: &mut [f32]) -> candle_core::Result<()> {
        if let [one] = self.parts.as_slice() {
            return one.matmul(x, n, out);
        }
        let mut offset = 0;
        for p in &self.parts {
            let mut part = vec![0f32; n * p.rows()];
            p.matmul(x, n, &mut part)?;
            for (o, src) in out
                .chunks_exact_mut(self.rows)
                .zip(part.chunks_exact(p.rows()))
            {
                o[offset..offset + p.rows()].copy_from_slice(src);
            }
            offset += p.rows();
        }
        Ok(())
    }
}

struct Layer {
    attn_norm: Vec<f32>,
    /// Rows `q | k | v`.
    qkv: Projection,
    /// Qwen2's attention biases, laid out as `qkv`'s rows.
    qkv_bias: Option<Vec<f32>>,
    o: Projection,
    ffn_norm: Vec<f32>,
    /// Rows `gate | up`.
    gate_up: Projection,
    down: Projection,
    ffn_dim: usize,
}

enum Embedding {
    Q80(Arc<Q80Matrix>),
    Candle(Arc<QTensor>),
}

/// The weights, in the forms our kernels read.
pub(super) struct NativeWeights {
    embedding: Embedding,
    layers: Vec<Layer>,
    norm: Vec<f32>,
    output: Projection,
    /// `cos` and `sin` of position × inverse frequency, `[context, head_dim / 2]`.
    rope_cos: Vec<f32>,
    rope_sin: Vec<f32>,
}

/// One layer's cached keys and values, position-major.
#[derive(Debug, Clone, Default)]
pub(super) struct LayerKv {
    k: Vec<f32>,
    v: Vec<f32>,
}

impl LayerKv {
    /// Keeps the first `positions` positions, `width` floats each.
    pub(super) fn truncate(&mut self, positions: usize, width: usize) {
        self.k.truncate(positions * width);
        self.v.truncate(positions * width);
    }
}

fn dense(file: &mut GgufFile, name: &str) -> Result<Vec<f32>, ModelError> {
    let t = file.tensor(name, &Device::Cpu)?;
    t.dequantize(&Device::Cpu)
        .and_then(|t| t.flatten_all()?.to_vec1::<f32>())
        .map_err(|e| load_err(file, e))
}

impl NativeWeights {
    /// Loads the weights of `file` and fills in `config.vocab_size`.
    pub(super) fn load(
        file: &mut GgufFile,
        config: &mut ModelConfig,
    ) -> Result<NativeWeights, ModelError> {
        let cpu = Device::Cpu;
        let emb = file.tensor("token_embd.weight", &cpu)?;
        let (vocab, width) = emb.shape().dims2().map_err(|e| load_err(file, e))?;
        if width != config.dim {
            return Err(load_err(
                file,
                format!("token embedding is {width} wide, the model {}", config.dim),
            ));
        }
        config.vocab_size = vocab;
        let emb = Arc::new(emb);
        let embedding = if emb.dtype() == GgmlDType::Q8_0 {
            let raw = emb.data().map_err(|e| load_err(file, e))?;
            let m = Q80Matrix::from_raw(vocab, width, &raw).map_err(|e| load_err(file, e))?;
            Embedding::Q80(Arc::new(m))
        } else {
            Embedding::Candle(emb.clone())
        };
        // Small models tie the output projection to the token embedding.
        let output = if file.has_tensor("output.weight") {
            Projection::load(file, &["output.weight".to_string()])?
        } else {
            let tied = match &embedding {
                Embedding::Q80(m) => Linear::Q80(m.clone()),
                Embedding::Candle(_) => Linear::shared(emb).map_err(|e| load_err(file, e))?,
            };
            Projection {
                parts: vec![tied],
                rows: vocab,
            }
        };
        let mut layers = Vec::with_capacity(config.n_layer);
        let (q_dim, kv_dim) = (
            config.n_head * config.head_dim,
            config.n_kv_head * config.head_dim,
        );
        for i in 0..config.n_layer {
            let p = |s: &str| format!("blk.{i}.{s}");
            let qkv = Projection::load(
                file,
                &[p("attn_q.weight"), p("attn_k.weight"), p("attn_v.weight")],
            )?;
            if qkv.rows != q_dim + 2 * kv_dim {
                return Err(load_err(
                    file,
                    format!(
                        "layer {i}: attention projections give {} rows, expected {}",
                        qkv.rows,
                        q_dim + 2 * kv_dim
                    ),
                ));
            }
            let qkv_bias = if file.has_tensor(&p("attn_q.bias")) {
                let mut b = dense(file, &p("attn_q.bias"))?;
                b.extend(dense(file, &p("attn_k.bias"))?);
                b.extend(dense(file, &p("attn_v.bias"))?);
                Some(b)
            } else {
                None
            };
            let gate_up = Projection::load(file, &[p("ffn_gate.weight"), p("ffn_up.weight")])?;
            let ffn_dim = gate_up.rows / 2;
            let down = Projection::load(file, &[p("ffn_down.weight")])?;
            let o = Projection::load(file, &[p("attn_output.weight")])?;
            if o.rows != config.dim || down.rows != config.dim || down.parts[0].cols() != ffn_dim {
                return Err(load_err(
                    file,
                    format!("layer {i}: projection shapes do not fit"),
                ));
            }
            layers.push(Layer {
                attn_norm: dense(file, &p("attn_norm.weight"))?,
                qkv,
                qkv_bias,
                o,
                ffn_norm: dense(file, &p("ffn_norm.weight"))?,
                gate_up,
                down,
                ffn_dim,
            });
        }
        let norm = dense(file, "output_norm.weight")?;
        let inv = config.rope_inv_freq();
        let mut rope_cos = Vec::with_capacity(config.context_length * inv.len());
        let mut rope_sin = Vec::with_capacity(config.context_length * inv.len());
        for pos in 0..config.context_length {
            for f in &inv {
                let a = pos as f32 * f;
                rope_cos.push(a.cos());
                rope_sin.push(a.sin());
            }
        }
        Ok(NativeWeights {
            embedding,
            layers,
            norm,
            output,
            rope_cos,
            rope_sin,
        })
    }

    /// Runs one row per token: `rows[r] = (token, sequence, position)`,
    /// where `caches[sequence]` holds that sequence's earlier positions (a
    /// prompt is rows of one sequence; a batched decode step, one row of each
    /// of several). Appends every row's keys and values to its sequence's
    /// cache and returns the logits after each row named in `logits_of`.
    pub(super) fn forward(
        &self,
        c: &ModelConfig,
        rows: &[(u32, usize, usize)],
        caches: &mut [&mut [LayerKv]],
        logits_of: &[usize],
    ) -> candle_core::Result<Vec<Vec<f32>>> {
        let t = rows.len();
        let (dim, hd) = (c.dim, c.head_dim);
        let q_dim = c.n_head * hd;
        let kv_dim = c.n_kv_head * hd;
        let qkv_w = q_dim + 2 * kv_dim;

        let tokens: Vec<u32> = rows.iter().map(|r| r.0).collect();
        let mut x = vec![0f32; t * dim];
        self.embed(&tokens, &mut x)?;
        let mut h = vec![0f32; t * dim];
        let mut qkv = vec![0f32; t * qkv_w];
        let mut att = vec![0f32; t * q_dim];
        let mut proj = vec![0f32; t * dim];
        for (l, layer) in self.layers.iter().enumerate() {
            rms_norm(&x, &layer.attn_norm, c.eps as f32, &mut h);
            layer.qkv.apply(&h, t, &mut qkv)?;
            for (row, &(_, seq, pos)) in qkv.chunks_exact_mut(qkv_w).zip(rows) {
                if let Some(b) = &layer.qkv_bias {
                    row.iter_mut().zip(b).for_each(|(v, b)| *v += b);
                }
                let (q, rest) = row.split_at_mut(q_dim);
                let (k, v) = rest.split_at_mut(kv_dim);
                self.rope(c, q, pos);
                self.rope(c, k, pos);
                let kv = &mut caches[seq][l];
                kv.k.extend_from_slice(k);
                kv.v.extend_from_slice(v);
            }
            let layer_kv: Vec<&LayerKv> = caches.iter().map(|c| &c[l]).collect();
            attention(c, &qkv, rows, &layer_kv, &mut att);
            layer.o.apply(&att, t, &mut proj)?;
            x.iter_mut().zip(&proj).for_each(|(a, b)| *a += b);

            rms_norm(&x, &layer.ffn_norm, c.eps as f32, &mut h);
            let f = layer.ffn_dim;
            let mut gu = vec![0f32; t * 2 * f];
            layer.gate_up.apply(&h, t, &mut gu)?;
            let mut act = vec![0f32; t * f];
            for (a, g) in act.chunks_exact_mut(f).zip(gu.chunks_exact(2 * f)) {
                let (gate, up) = g.split_at(f);
                for ((a, &g), &u) in a.iter_mut().zip(gate).zip(up) {
                    *a = g / (1.0 + (-g).exp()) * u;
                }
            }
            layer.down.apply(&act, t, &mut proj)?;
            x.iter_mut().zip(&proj).for_each(|(a, b)| *a += b);
        }
        let n = logits_of.len();
        let mut last = vec![0f32; n * dim];
        for (o, &r) in last.chunks_exact_mut(dim).zip(logits_of) {
            rms_norm(&x[r * dim..(r + 1) * dim], &self.norm, c.eps as f32, o);
        }
        let vocab = self.output.rows;
        let mut logits = vec![0f32; n * vocab];
        self.output.apply(&last, n, &mut logits)?;
        Ok(logits.chunks_exact(vocab).map(<[f32]>::to_vec).collect())
    }

    fn embed(&self, tokens: &[u32], x: &mut [f32]) -> candle_core::Result<()> {
        match &self.embedding {
            Embedding::Q80(m) => {
                for (&id, row) in tokens.iter().zip(x.chunks_exact_mut(m.cols())) {
                    m.dequantize_row(id as usize, row);
                }
            }
            Embedding::Candle(q) => {
                let ids = Tensor::new(tokens, &Device::Cpu)?;
                let e = q.embedding(&ids)?.flatten_all()?.to_vec1::<f32>()?;
                x.copy_from_slice(&e);
            }
        }
        Ok(())
    }

    /// Rotates every head of `v` (heads side by side) for position `pos`.
    fn rope(&self, c: &ModelConfig, v: &mut [f32], pos: usize) {
        let half = c.head_dim / 2;
        let cos = &self.rope_cos[pos * half..(pos + 1) * half];
        let sin = &self.rope_sin[pos * half..(pos + 1) * half];
        for head in v.chunks_exact_mut(c.head_dim) {
            for i in 0..half {
                // Interleaved pairs (2i, 2i+1), or halves (i, i + half).
                let (a, b) = if c.interleaved_rope {
                    (2 * i, 2 * i + 1)
                } else {
                    (i, i + half)
                };
                let (x0, x1) = (head[a], head[b]);
                head[a] = x0 * cos[i] - x1 * sin[i];
                head[b] = x0 * sin[i] + x1 * cos[i];
            }
        }
    }
}

/// Row-wise RMS norm of `x` (rows of `w.len()`) into `out`.
fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    for (row, o) in x.chunks_exact(w.len()).zip(out.chunks_exact_mut(w.len())) {
        let ms = row.iter().map(|v| v * v).sum::<f32>() / w.len() as f32;
        let scale = 1.0 / (ms + eps).sqrt();
        for ((o, &v), &w) in o.iter_mut().zip(row).zip(w) {
            *o = v * scale * w;
        }
    }
}

/// Causal attention of each row's query (in `qkv`, rows `q | k | v`) over
/// its own sequence's cache up to and including its position, written to
/// `out` (`[rows, n_head · head_dim]`). `rows[r] = (token, sequence, position)`.
fn attention(
    c: &ModelConfig,
    qkv: &[f32],
    rows: &[(u32, usize, usize)],
    caches: &[&LayerKv],
    out: &mut [f32],
) {
    let hd = c.head_dim;
    let kv_dim = c.n_kv_head * hd;
    let qkv_w = c.n_head * hd + 2 * kv_dim;
    let group = c.n_head / c.n_kv_head;
    let scale = 1.0 / (hd as f32).sqrt();
    let kernels = AttentionKernels::detect(hd);
    let one = |idx: usize, o: &mut [f32]| {
        let (i, head) = (idx / c.n_head, idx % c.n_head);
        let (_, seq, pos) = rows[i];
        let kv = caches[seq];
        let q = &qkv[i * qkv_w + head * hd..][..hd];
        let cached = |data| Strided {
            data,
            stride: kv_dim,
            offset: (head / group) * hd,
            width: hd,
        };
        let mut p = vec![0f32; pos + 1];
        (kernels.scores)(q, cached(&kv.k), scale, &mut p);
        let max = p.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        let mut sum = 0f32;
        for s in p.iter_mut() {
            *s = (*s - max).exp();
            sum += *s;
        }
        p.iter_mut().for_each(|s| *s /= sum);
        (kernels.mix)(&p, cached(&kv.v), o);
    };
    // Heads in parallel, unless the whole is too little work to split (a
    // decode step over a few dozen positions).
    let work: usize = rows.iter().map(|r| r.2 + 1).sum::<usize>() * c.n_head;
    if work < 1024 {
        out.chunks_exact_mut(hd)
            .enumerate()
            .for_each(|(idx, o)| one(idx, o));
    } else {
        out.par_chunks_mut(hd)
            .enumerate()
            .for_each(|(idx, o)| one(idx, o));
    }
}
