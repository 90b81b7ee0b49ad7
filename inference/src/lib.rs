//! Local inference runtime.
//!
//! Loads llama-family GGUF models with candle (CPU by default), tokenizes
//! with the GGUF's own byte-level BPE and chat template, and generates with
//! exact token counts: sampling, streaming with cancellation, a scheduler
//! that batches the decode steps of concurrent requests, a prefix cache, and
//! GPU discovery through NVML. It knows nothing of HTTP or billing.
#![warn(missing_docs)]

pub use candle_core::Device;

pub mod engine;
pub mod gguf;
pub mod gpu;
pub mod kernels;
pub mod model;
pub mod sampling;
pub mod tokenizer;

/// The default model's path: `$MEC_MODEL` when set, else
/// `models/SmolLM2-135M-Instruct.Q4_1.gguf` at the workspace root (where
/// `cargo xtask setup` puts it).
pub fn default_model_path() -> std::path::PathBuf {
    if let Some(p) = std::env::var_os("MEC_MODEL") {
        return p.into();
    }
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the crate sits in the workspace")
        .join("models/SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// Opens a GGUF file and loads its tokenizer and weights onto `device`: the one
/// way every caller (agent, CLI, tests) gets a runnable model.
pub fn load(
    path: &std::path::Path,
    device: &Device,
) -> Result<(model::Model, tokenizer::Tokenizer), gguf::ModelError> {
    let mut file = gguf::GgufFile::open(path)?;
    let tokenizer = tokenizer::Tokenizer::from_gguf(&file)?;
    let model = model::Model::load(&mut file, device)?;
    Ok((model, tokenizer))
}
