//! The llama-family transformer: RMS norm, RoPE, grouped-query attention,
//! SwiGLU; Qwen2 differs only by attention biases and the RoPE layout.
//!
//! Two implementations of one forward pass, chosen at load:
//! * [`native`] (the CPU default): plain `f32` slices and our own quantised
//!   kernels, fused projections, a position-major KV cache that grows in
//!   place. A 135M model does ~200 small products per token, and a tensor
//!   library's per-op cost (allocation, shape checks, a copy per
//!   concatenation) was most of the decode time.
//! * [`tensor`]: the same arithmetic as candle tensor ops, for devices we
//!   have no kernels of our own for (CUDA). On the CPU it serves as a second
//!   implementation the tests hold the first to.

use std::sync::Arc;

use candle_core::{Device, Tensor};

use crate::gguf::{GgufFile, ModelError};

mod native;
mod paged;
mod tensor;

pub use paged::BLOCK_POSITIONS;

/// Positions of KV cache a model on the tensor path holds unless told
/// otherwise ([`Model::load_with_kv`]): sixteen sequences of 2,048.
pub const DEFAULT_KV_POSITIONS: usize = 16 * 2048;

/// How large the tensor path's KV pool is made at load: room for every
/// sequence that runs at once to reach the context, and for the prefix
/// cache, within a memory budget (on a GPU, what its memory leaves after
/// the weights). A pool too small for all of that still serves: before
/// each pass the engine checks for room ([`Model::kv_has_room`]) and makes
/// it by evicting the prefix cache, then by preempting the newest sequence
/// (its KV is dropped and recomputed later, as vLLM does).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvBudget {
    /// Sequences that run at once (the engine's slots).
    pub sequences: usize,
    /// Positions beyond theirs (the prefix cache's).
    pub extra_positions: usize,
    /// At most this many bytes.
    pub max_bytes: Option<u64>,
}

impl KvBudget {
    /// Bytes one position takes in every layer's keys and values (f32).
    pub fn bytes_per_position(config: &ModelConfig) -> u64 {
        (2 * config.n_layer * config.n_kv_head * config.head_dim * 4) as u64
    }

    /// The pool's positions for a model of `config` (one block at least).
    pub fn positions(&self, config: &ModelConfig) -> usize {
        let want = self
            .sequences
            .saturating_mul(config.context_length)
            .saturating_add(self.extra_positions);
        let cap = self.max_bytes.map_or(usize::MAX, |b| {
            usize::try_from(b / Self::bytes_per_position(config).max(1)).unwrap_or(usize::MAX)
        });
        want.min(cap).max(BLOCK_POSITIONS)
    }
}

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
    /// GGUF llama weights are permuted for interleaved (GPT-J style) RoPE;
    /// Qwen2 keeps the halves (NeoX style).
    pub interleaved_rope: bool,
}

impl ModelConfig {
    pub(crate) fn from_gguf(file: &GgufFile) -> Result<ModelConfig, ModelError> {
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
            interleaved_rope: arch == "llama",
            arch,
        };
        if config.n_head == 0
            || config.n_kv_head == 0
            || !config.n_head.is_multiple_of(config.n_kv_head)
            || !config.head_dim.is_multiple_of(2)
        {
            return Err(ModelError::Load {
                path: file.path().to_path_buf(),
                reason: format!(
                    "inconsistent attention shape: {} heads, {} key/value heads, head width {}",
                    config.n_head, config.n_kv_head, config.head_dim
                ),
            });
        }
        Ok(config)
    }

    /// RoPE inverse frequencies, one per pair of a head's dimensions.
    fn rope_inv_freq(&self) -> Vec<f32> {
        (0..self.head_dim)
            .step_by(2)
            .map(|i| 1.0 / self.rope_base.powf(i as f32 / self.head_dim as f32))
            .collect()
    }
}

/// Which implementation of the forward pass a model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForwardPath {
    /// Our own CPU kernels (CPU only).
    Native,
    /// candle tensor operations (any device candle supports).
    Tensor,
}

impl ForwardPath {
    /// The path for `device`: native on the CPU, tensor ops elsewhere.
    pub fn for_device(device: &Device) -> ForwardPath {
        if device.is_cpu() {
            ForwardPath::Native
        } else {
            ForwardPath::Tensor
        }
    }
}

enum Weights {
    Native(native::NativeWeights),
    /// The weights and the paged KV pool every sequence's cache lives in.
    Tensor(tensor::TensorWeights, Arc<paged::KvPool>),
}

/// A loaded model: immutable, shared by every sequence that runs on it.
pub struct Model {
    config: ModelConfig,
    device: Device,
    weights: Weights,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("config", &self.config)
            .field("path", &self.forward_path())
            .finish_non_exhaustive()
    }
}

/// The keys and values of one sequence, per layer.
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: CacheLayers,
    len: usize,
    /// Floats per position of one layer's keys (and of its values).
    width: usize,
}

#[derive(Debug, Clone)]
enum CacheLayers {
    Native(Vec<native::LayerKv>),
    /// Blocks of the model's pool (a clone shares them, copy on write).
    Paged(paged::PagedSeq),
}

impl KvCache {
    /// An empty cache for `model`.
    pub fn new(model: &Model) -> KvCache {
        let n = model.config.n_layer;
        let layers = match &model.weights {
            Weights::Native(_) => CacheLayers::Native(vec![native::LayerKv::default(); n]),
            Weights::Tensor(_, pool) => CacheLayers::Paged(paged::PagedSeq::new(pool.clone())),
        };
        KvCache {
            layers,
            len: 0,
            width: model.config.n_kv_head * model.config.head_dim,
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
        match &mut self.layers {
            CacheLayers::Native(layers) => {
                for l in layers {
                    l.truncate(len, self.width);
                }
            }
            CacheLayers::Paged(seq) => seq.truncate(len),
        }
        self.len = len;
        Ok(())
    }
}

impl Model {
    /// Loads the weights of `file` onto `device`, with the forward path
    /// that suits it.
    pub fn load(file: &mut GgufFile, device: &Device) -> Result<Model, ModelError> {
        Model::load_with(file, device, ForwardPath::for_device(device))
    }

    /// Loads with a chosen forward path (`Native` needs the CPU).
    pub fn load_with(
        file: &mut GgufFile,
        device: &Device,
        path: ForwardPath,
    ) -> Result<Model, ModelError> {
        Model::load_with_kv(file, device, path, DEFAULT_KV_POSITIONS)
    }

    /// [`Model::load_with`], with a KV pool sized by `budget` for this
    /// model's shape and context.
    pub fn load_budgeted(
        file: &mut GgufFile,
        device: &Device,
        path: ForwardPath,
        budget: &KvBudget,
    ) -> Result<Model, ModelError> {
        let config = ModelConfig::from_gguf(file)?;
        Model::load_with_kv(file, device, path, budget.positions(&config))
    }

    /// [`Model::load_with`], with a KV pool of `kv_positions` positions on
    /// the tensor path (allocated here, on the device; the native path's
    /// caches grow in host memory instead).
    pub fn load_with_kv(
        file: &mut GgufFile,
        device: &Device,
        path: ForwardPath,
        kv_positions: usize,
    ) -> Result<Model, ModelError> {
        let mut config = ModelConfig::from_gguf(file)?;
        let weights = match path {
            ForwardPath::Native => {
                if !device.is_cpu() {
                    return Err(ModelError::Load {
                        path: file.path().to_path_buf(),
                        reason: "the native forward path runs on the CPU only".into(),
                    });
                }
                Weights::Native(native::NativeWeights::load(file, &mut config)?)
            }
            ForwardPath::Tensor => {
                let w = tensor::TensorWeights::load(file, &mut config, device)?;
                let pool = w.pool(&config, kv_positions, device).map_err(|e| {
                    load_err(
                        file,
                        format!("the KV cache of {kv_positions} positions: {e}"),
                    )
                })?;
                Weights::Tensor(w, Arc::new(pool))
            }
        };
        Ok(Model {
            config,
            device: device.clone(),
            weights,
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

    /// The implementation this model runs.
    pub fn forward_path(&self) -> ForwardPath {
        match self.weights {
            Weights::Native(_) => ForwardPath::Native,
            Weights::Tensor(..) => ForwardPath::Tensor,
        }
    }

    /// The tensor path's KV pool: positions in use and in all (`None` on the
    /// native path, whose caches live in host memory).
    pub fn kv_pool_usage(&self) -> Option<(usize, usize)> {
        match &self.weights {
            Weights::Native(_) => None,
            Weights::Tensor(_, pool) => Some((pool.used(), pool.capacity())),
        }
    }

    /// Whether the tensor path's KV pool has room for these passes, each
    /// `(cache, tokens)`: what [`Model::forward`] or [`Model::forward_batch`]
    /// would take of it (new blocks, and copies of shared blocks written
    /// into). Always true on the native path. A pass without room fails
    /// with "the KV cache is full"; the engine asks first and makes room.
    pub fn kv_has_room(&self, passes: &[(&KvCache, usize)]) -> bool {
        match &self.weights {
            Weights::Native(_) => true,
            Weights::Tensor(_, pool) => {
                pool.has_room(passes.iter().filter_map(|(cache, t)| match &cache.layers {
                    CacheLayers::Paged(seq) => Some((seq, cache.len, *t)),
                    CacheLayers::Native(_) => None,
                }))
            }
        }
    }

    /// Checks that `tokens` can run after `held` positions with a cache of
    /// the right kind.
    fn check_step(&self, tokens: &[u32], cache: &KvCache) -> candle_core::Result<()> {
        let t = tokens.len();
        if t == 0 {
            candle_core::bail!("forward needs at least one token");
        }
        if cache.len + t > self.config.context_length {
            candle_core::bail!(
                "{} positions exceed the context of {}",
                cache.len + t,
                self.config.context_length
            );
        }
        if let Some(bad) = tokens
            .iter()
            .find(|&&id| id as usize >= self.config.vocab_size)
        {
            candle_core::bail!(
                "token id {bad} is outside the vocabulary of {}",
                self.config.vocab_size
            );
        }
        let matches = match (&self.weights, &cache.layers) {
            (Weights::Native(_), CacheLayers::Native(_)) => true,
            (Weights::Tensor(_, pool), CacheLayers::Paged(seq)) => Arc::ptr_eq(pool, seq.pool()),
            _ => false,
        };
        if !matches {
            candle_core::bail!("this KV cache was made for another model");
        }
        Ok(())
    }

    /// Runs `tokens` after what `cache` holds, appends them to the cache, and
    /// returns the logits for the next token after the last one (`[vocab]`, f32).
    /// On error the cache is left as it was.
    pub fn forward(&self, tokens: &[u32], cache: &mut KvCache) -> candle_core::Result<Tensor> {
        let mut out = self.forward_rows(tokens, cache, false)?;
        let last = out.pop().expect("one row of logits");
        Tensor::from_vec(last, self.config.vocab_size, &self.device)
    }

    /// Runs `tokens` as [`Model::forward`] does and returns the logits after
    /// every one of them (teacher forcing: what perplexity and agreement
    /// between backends are measured on).
    pub fn forward_all(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
    ) -> candle_core::Result<Vec<Vec<f32>>> {
        self.forward_rows(tokens, cache, true)
    }

    fn forward_rows(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        all: bool,
    ) -> candle_core::Result<Vec<Vec<f32>>> {
        self.check_step(tokens, cache)?;
        let pos = cache.len;
        let t = tokens.len();
        let logits_of: Vec<usize> = if all { (0..t).collect() } else { vec![t - 1] };
        let logits = match (&self.weights, &mut cache.layers) {
            (Weights::Native(w), CacheLayers::Native(kv)) => {
                let rows: Vec<(u32, usize, usize)> = tokens
                    .iter()
                    .enumerate()
                    .map(|(i, &id)| (id, 0, pos + i))
                    .collect();
                let mut caches = [kv.as_mut_slice()];
                native_pass(w, &self.config, &rows, &mut caches, &logits_of)
            }
            (Weights::Tensor(w, _), CacheLayers::Paged(seq)) => {
                seq.prepare(pos, t)?;
                let rows = [tensor::SeqRows {
                    tokens,
                    pos,
                    cache: seq,
                }];
                w.forward(&self.config, &self.device, &rows, &logits_of)
            }
            _ => unreachable!("checked by check_step"),
        };
        match logits {
            Ok(l) => {
                cache.len += t;
                Ok(l)
            }
            Err(e) => {
                cache.len += t;
                cache.truncate(pos)?;
                Err(e)
            }
        }
    }

    /// One decode step of several sequences at once: `steps[i] = (token,
    /// cache)` runs `token` after what that cache holds. The sequences share
    /// each weight product (a weight block is read once for all of them),
    /// on the native path as on the tensor path, where attention reads the
    /// paged caches of the whole batch at once. Returns the logits after
    /// each token, in order. On error every cache is left as it was.
    pub fn forward_batch(
        &self,
        steps: &mut [(u32, &mut KvCache)],
    ) -> candle_core::Result<Vec<Vec<f32>>> {
        for (id, cache) in steps.iter() {
            self.check_step(&[*id], cache)?;
        }
        let positions: Vec<usize> = steps.iter().map(|(_, c)| c.len).collect();
        let out = match &self.weights {
            Weights::Native(w) => {
                let rows: Vec<(u32, usize, usize)> = steps
                    .iter()
                    .enumerate()
                    .map(|(i, (id, cache))| (*id, i, cache.len))
                    .collect();
                let mut caches: Vec<&mut [native::LayerKv]> = steps
                    .iter_mut()
                    .map(|(_, cache)| match &mut cache.layers {
                        CacheLayers::Native(kv) => kv.as_mut_slice(),
                        CacheLayers::Paged(_) => unreachable!("checked by check_step"),
                    })
                    .collect();
                let all: Vec<usize> = (0..rows.len()).collect();
                native_pass(w, &self.config, &rows, &mut caches, &all)
            }
            Weights::Tensor(w, _) => {
                let ids: Vec<[u32; 1]> = steps.iter().map(|(id, _)| [*id]).collect();
                let prepared =
                    steps
                        .iter_mut()
                        .try_for_each(|(_, cache)| match &mut cache.layers {
                            CacheLayers::Paged(seq) => seq.prepare(cache.len, 1),
                            CacheLayers::Native(_) => unreachable!("checked by check_step"),
                        });
                prepared.and_then(|()| {
                    let rows: Vec<tensor::SeqRows<'_>> = steps
                        .iter()
                        .zip(&ids)
                        .map(|((_, cache), id)| match &cache.layers {
                            CacheLayers::Paged(seq) => tensor::SeqRows {
                                tokens: id,
                                pos: cache.len,
                                cache: seq,
                            },
                            CacheLayers::Native(_) => unreachable!("checked by check_step"),
                        })
                        .collect();
                    let all: Vec<usize> = (0..rows.len()).collect();
                    w.forward(&self.config, &self.device, &rows, &all)
                })
            }
        };
        for ((_, cache), held) in steps.iter_mut().zip(positions) {
            cache.len = held + 1;
            if out.is_err() {
                cache.truncate(held)?;
            }
        }
        out
    }
}

/// Runs a native pass on one of rayon's workers, so each product's fork and
/// join stay inside the pool instead of waking a sleeping caller ~120 times
/// per token.
fn native_pass(
    w: &native::NativeWeights,
    config: &ModelConfig,
    rows: &[(u32, usize, usize)],
    caches: &mut [&mut [native::LayerKv]],
    logits_of: &[usize],
) -> candle_core::Result<Vec<Vec<f32>>> {
    rayon::scope(|_| w.forward(config, rows, caches, logits_of))
}

pub(crate) fn load_err(file: &GgufFile, e: impl std::fmt::Display) -> ModelError {
    ModelError::Load {
        path: file.path().to_path_buf(),
        reason: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn smollm2() -> ModelConfig {
        ModelConfig {
            arch: "llama".into(),
            n_layer: 30,
            n_head: 9,
            n_kv_head: 3,
            dim: 576,
            head_dim: 64,
            eps: 1e-5,
            rope_base: 100_000.0,
            context_length: 8192,
            vocab_size: 49152,
            interleaved_rope: true,
        }
    }

    #[test]
    fn the_kv_pool_holds_every_slot_and_the_prefix_cache_within_the_bytes() {
        let c = smollm2();
        // 30 layers x (keys + values) x 3 heads x 64 x 4 bytes.
        assert_eq!(KvBudget::bytes_per_position(&c), 46_080);
        let all = KvBudget {
            sequences: 4,
            extra_positions: 16_384,
            max_bytes: None,
        };
        assert_eq!(all.positions(&c), 4 * 8192 + 16_384);
        let capped = KvBudget {
            max_bytes: Some(1 << 30),
            ..all
        };
        assert_eq!(capped.positions(&c), (1usize << 30) / 46_080);
        let tiny = KvBudget {
            max_bytes: Some(10),
            ..all
        };
        assert_eq!(tiny.positions(&c), BLOCK_POSITIONS, "one block at least");
    }
}
