//! `edge-agent generate`: one prompt through the local model, streamed to
//! stdout, or as one JSON object with the counts.

use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use mec_inference::engine::{Engine, EngineConfig, GenerateRequest};
use mec_inference::gpu;
use mec_inference::sampling::SamplingParams;
use mec_inference::tokenizer::ChatMessage;

use crate::cli::{DeviceArg, GenerateArgs};

/// Runs one generation.
pub fn generate(args: &GenerateArgs) -> anyhow::Result<ExitCode> {
    let path = args
        .model
        .clone()
        .unwrap_or_else(mec_inference::default_model_path);
    let model_bytes = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    let found = gpu::discover(None);
    // Room for the weights and as much again for KV caches and activations.
    let choice = match args.device {
        DeviceArg::Cpu => gpu::DeviceChoice::Cpu {
            reason: "--device cpu".into(),
        },
        DeviceArg::Auto => gpu::choose_device(&found, gpu::CUDA_BUILD, model_bytes * 2),
        // A GPU named on the command line is opened without asking NVML:
        // whether it can run the model is what the caller wants to know.
        DeviceArg::Gpu(index) if gpu::CUDA_BUILT => gpu::DeviceChoice::Cuda { index },
        DeviceArg::Gpu(_) => gpu::DeviceChoice::Cpu {
            reason: "built without the cuda feature".into(),
        },
    };
    // One sequence, up to the whole context.
    let budget = gpu::kv_budget(&found, &choice, model_bytes, 1, 0);
    let (model, tokenizer, device) = mec_inference::load_on(&path, &choice, &budget)?;
    let prompt = if args.raw {
        args.prompt.clone()
    } else {
        tokenizer
            .apply_chat_template(&[ChatMessage::user(args.prompt.clone())])
            .map_err(anyhow::Error::msg)?
    };
    let ids = tokenizer.encode(&prompt).map_err(anyhow::Error::msg)?;
    let engine = Engine::start(
        Arc::new(model),
        Arc::new(tokenizer),
        EngineConfig {
            slots: 1,
            ..Default::default()
        },
    );
    let params = SamplingParams {
        temperature: args.temperature,
        top_p: args.top_p,
        seed: args.seed,
        max_tokens: Some(args.max_tokens),
        ..Default::default()
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut generation = engine.submit(GenerateRequest {
        prompt: ids,
        params,
        subscriber: "cli".into(),
        ..Default::default()
    })?;
    let (text, summary) = rt.block_on(async {
        let mut text = String::new();
        let stdout = std::io::stdout();
        while let Some(delta) = generation.deltas.recv().await {
            if !args.json {
                let mut out = stdout.lock();
                let _ = out.write_all(delta.text.as_bytes());
                let _ = out.flush();
            }
            text.push_str(&delta.text);
        }
        let summary = (&mut generation.summary)
            .await
            .context("the engine stopped without a summary")?;
        Ok::<_, anyhow::Error>((text, summary))
    })?;
    let decode_tokens_per_s = if summary.decode_time.is_zero() || summary.completion_tokens < 2 {
        0.0
    } else {
        (summary.completion_tokens - 1) as f64 / summary.decode_time.as_secs_f64()
    };
    let report = serde_json::json!({
        "text": text,
        "prompt_tokens": summary.prompt_tokens,
        "cached_prompt_tokens": summary.cached_prompt_tokens,
        "completion_tokens": summary.completion_tokens,
        "finish_reason": summary.finish_reason,
        "ttft_ms": summary.ttft.as_secs_f64() * 1e3,
        "decode_tokens_per_s": decode_tokens_per_s,
        "device": device,
        // Read after the run: the GPU's memory in use, this process's
        // weights, caches and candle's pool included (others' too).
        "gpu_memory_used_bytes": gpu_memory_used(&device),
    });
    if args.json {
        println!("{report}");
    } else {
        println!();
        eprintln!(
            "[{} prompt + {} completion tokens, finish {:?}, ttft {:.0} ms, {:.1} tokens/s]",
            summary.prompt_tokens,
            summary.completion_tokens,
            summary.finish_reason,
            summary.ttft.as_secs_f64() * 1e3,
            decode_tokens_per_s
        );
    }
    if !args.json {
        if let gpu::DeviceChoice::Cpu { reason } = &device {
            eprintln!("[on the CPU: {reason}]");
        }
    }
    if let Some(e) = summary.error {
        anyhow::bail!("generation failed: {e}");
    }
    Ok(ExitCode::SUCCESS)
}

/// NVML's figure for the GPU the model ran on, if it ran on one.
fn gpu_memory_used(device: &gpu::DeviceChoice) -> Option<u64> {
    let gpu::DeviceChoice::Cuda { index } = device else {
        return None;
    };
    gpu::discover(None)
        .gpus
        .into_iter()
        .find(|g| g.index == *index)
        .map(|g| g.memory_total_bytes.saturating_sub(g.memory_free_bytes))
}
