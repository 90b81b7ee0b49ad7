//! Local inference runtime.
//!
//! Loads llama-family GGUF models with candle (CPU by default), tokenizes
//! with the GGUF's own byte-level BPE and chat template, and generates with
//! exact token counts: sampling, streaming with cancellation, a scheduler
//! that batches the decode steps of concurrent requests, a prefix cache, and
//! GPU discovery through NVML. It knows nothing of HTTP or billing.
#![warn(missing_docs)]

pub use candle_core::quantized::GgmlDType;
pub use candle_core::Device;

pub mod agreement;
pub mod constraint;
pub mod engine;
pub mod gguf;
pub mod gpu;
pub mod kernels;
pub mod model;
pub mod registry;
pub mod requantize;
pub mod sampling;
pub mod synthetic;
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

/// Loads the model onto the device `choice` names, and makes sure it runs
/// there: on a GPU, one forward step is taken before the model is handed
/// out, so a kernel the GPU cannot run (or memory it does not have) shows
/// here and not on the first request. When the GPU cannot be opened, or the
/// model cannot load or run on it, it is loaded on the CPU instead; the
/// returned choice says where it runs and why.
/// `budget` sizes the KV pool of the tensor path (the GPU's).
pub fn load_on(
    path: &std::path::Path,
    choice: &gpu::DeviceChoice,
    budget: &model::KvBudget,
) -> Result<(model::Model, tokenizer::Tokenizer, gpu::DeviceChoice), gguf::ModelError> {
    let (device, used) = gpu::open_device(choice);
    if let gpu::DeviceChoice::Cuda { index } = used {
        let on_gpu = load_budgeted(path, &device, budget).and_then(|(model, tokenizer)| {
            let mut cache = model::KvCache::new(&model);
            model
                .forward(&[0], &mut cache)
                .map_err(|e| gguf::ModelError::Load {
                    path: path.to_path_buf(),
                    reason: format!("a forward step on the GPU failed: {e}"),
                })?;
            Ok((model, tokenizer))
        });
        match on_gpu {
            Ok((model, tokenizer)) => return Ok((model, tokenizer, used)),
            Err(e) => {
                let (cpu, used) = gpu::fall_back(index, &e.to_string());
                let (model, tokenizer) = load(path, &cpu)?;
                return Ok((model, tokenizer, used));
            }
        }
    }
    let (model, tokenizer) = load(path, &device)?;
    Ok((model, tokenizer, used))
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

/// [`load`], with the tensor path's KV pool sized by `budget`.
pub fn load_budgeted(
    path: &std::path::Path,
    device: &Device,
    budget: &model::KvBudget,
) -> Result<(model::Model, tokenizer::Tokenizer), gguf::ModelError> {
    let mut file = gguf::GgufFile::open(path)?;
    let tokenizer = tokenizer::Tokenizer::from_gguf(&file)?;
    let model = model::Model::load_budgeted(
        &mut file,
        device,
        model::ForwardPath::for_device(device),
        budget,
    )?;
    Ok((model, tokenizer))
}
