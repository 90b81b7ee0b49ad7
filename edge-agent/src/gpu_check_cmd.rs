//! `edge-agent gpu-check`: whether the GPU path works on this box and agrees
//! with the CPU, the way inference engines check one backend against
//! another (see `mec_inference::agreement`).
//!
//! It reports the driver's and the build's CUDA versions and the GPUs NVML
//! sees, then teacher-forces the agreement text through the tensor path
//! (the GPU's code) on the device chosen, and through the native CPU path,
//! and compares them with each other and with llama.cpp's figures for the
//! same text. Where no GPU can run, the tensor path runs on candle's CPU
//! backend: the same code, so the check still means something, and the
//! report says where it ran and why. Exit 0 when every figure is within
//! `agreement::TOLERANCE`, 1 when not.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use mec_inference::agreement::{self, Agreement, Reference, TOLERANCE};
use mec_inference::engine::{Engine, EngineConfig};
use mec_inference::gguf::GgufFile;
use mec_inference::gpu::{self, DeviceChoice};
use mec_inference::model::{ForwardPath, KvCache, Model};
use mec_inference::sampling::SamplingParams;
use mec_inference::tokenizer::Tokenizer;
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::bench_inference_cmd::{aggregate_rate, run_streams, templated, STREAM_QUESTIONS};
use crate::cli::{DeviceArg, GpuCheckArgs, SpeedPlan, SynthModelArgs};

/// KV positions for the candidate's agreement run: the text twice (the
/// batched twin) and a block of copy-on-write, with room to spare.
const KV_POSITIONS: usize = 2048;

/// Decode steps at the end of the text (batched with a twin); the rest is
/// prefill, in chunks of [`PREFILL_CHUNK`].
const DECODE_STEPS: usize = 64;
const PREFILL_CHUNK: usize = 128;

/// Runs the check and prints the report.
pub fn check(args: &GpuCheckArgs) -> anyhow::Result<ExitCode> {
    let path = args
        .model
        .clone()
        .unwrap_or_else(mec_inference::default_model_path);
    let found = gpu::discover(None);
    let driver = gpu::cuda_driver_version().or(found.cuda_driver_version);
    let model_bytes = std::fs::metadata(&path)
        .with_context(|| format!("reading {}", path.display()))?
        .len();
    let choice = match args.device {
        DeviceArg::Cpu => DeviceChoice::Cpu {
            reason: "--device cpu".into(),
        },
        DeviceArg::Auto => gpu::choose_device(&found, gpu::CUDA_BUILD, model_bytes * 2),
        DeviceArg::Gpu(index) if gpu::CUDA_BUILT => DeviceChoice::Cuda { index },
        DeviceArg::Gpu(_) => DeviceChoice::Cpu {
            reason: "built without the cuda feature".into(),
        },
    };

    // Room for the text twice over (the batched twin), and for the speed
    // plan's streams: a question, its completion and a block of slack each.
    let kv_positions = args.speed.as_ref().map_or(KV_POSITIONS, |plan| {
        let most = plan.streams.iter().copied().max().unwrap_or(1);
        let prompt = plan.prompt_tokens.iter().copied().max().unwrap_or(0);
        KV_POSITIONS.max(most * (128 + plan.decode_tokens + 32) + prompt + 64)
    });
    let t = Instant::now();
    let (candidate, device) = load_candidate(&path, &choice, kv_positions)?;
    let candidate_load_s = t.elapsed().as_secs_f64();
    if args.speed_only {
        let plan = args.speed.as_ref().context("--speed-only needs --speed")?;
        let tokenizer = Tokenizer::from_gguf(&GgufFile::open(&path)?)?;
        let tokens = tokenizer
            .encode(agreement::TEXT)
            .map_err(anyhow::Error::msg)?;
        let report = json!({
            "build_cuda": gpu::CUDA_BUILD.map(gpu::cuda_version_text),
            "driver_cuda": driver.map(gpu::cuda_version_text),
            "gpus": found.gpus,
            "device": device,
            "model": path,
            "seconds": { "candidate_load": candidate_load_s },
            "speed": speed(candidate, tokenizer, &tokens, plan)?,
        });
        if let Some(out) = &args.json_out {
            std::fs::write(out, format!("{report}\n"))
                .with_context(|| format!("writing {}", out.display()))?;
        }
        println!("{report}");
        return Ok(ExitCode::SUCCESS);
    }
    let mut file = GgufFile::open(&path)?;
    let tokenizer = Tokenizer::from_gguf(&file)?;
    let reference = Model::load_with(&mut file, &mec_inference::Device::Cpu, ForwardPath::Native)?;
    let tokens = tokenizer
        .encode(agreement::TEXT)
        .map_err(anyhow::Error::msg)?;

    let t = Instant::now();
    let prefill = tokens.len().saturating_sub(DECODE_STEPS);
    let forced = agreement::teacher_force(&candidate, &tokens, prefill, PREFILL_CHUNK)
        .context("teacher-forcing the text on the candidate path")?;
    let candidate_s = t.elapsed().as_secs_f64();
    let reference_logits = reference
        .forward_all(&tokens, &mut KvCache::new(&reference))
        .context("teacher-forcing the text on the CPU")?;
    let against_cpu = agreement::compare(&reference_logits, &forced.logits, &tokens);

    let mut failures: Vec<String> = against_cpu
        .failures(&TOLERANCE)
        .into_iter()
        .map(|f| format!("against the CPU: {f}"))
        .collect();
    if forced.batch_twin_max_diff != 0.0 {
        failures.push(format!(
            "two sequences of one batch fed the same tokens differ by {}",
            forced.batch_twin_max_diff
        ));
    }

    // llama.cpp's figures hold for the default model's file only.
    let llama = Reference::llama_cpp();
    let sha = sha256_file(&path)?;
    let mut notes = Vec::new();
    let (llama_candidate, llama_cpu) = if sha != llama.model_sha256 {
        notes.push(format!(
            "llama.cpp's figures are for the model with SHA-256 {}; this one is {sha}: not compared",
            llama.model_sha256
        ));
        (None, None)
    } else if tokens != llama.tokens {
        failures.push(format!(
            "our tokenizer makes {} tokens of the text and llama.cpp's {}: they differ",
            tokens.len(),
            llama.tokens.len()
        ));
        (None, None)
    } else {
        let c = agreement::compare_top1(&llama.top1, llama.perplexity, &forced.logits, &tokens);
        let r = agreement::compare_top1(&llama.top1, llama.perplexity, &reference_logits, &tokens);
        for (who, a) in [("the candidate", &c), ("the CPU", &r)] {
            failures.extend(
                a.failures(&TOLERANCE)
                    .into_iter()
                    .map(|f| format!("{who} against llama.cpp: {f}")),
            );
        }
        (Some(c), Some(r))
    };

    let speed = match &args.speed {
        Some(plan) => Some(speed(candidate, tokenizer, &tokens, plan).context("measuring speed")?),
        None => None,
    };

    let report = json!({
        "build_cuda": gpu::CUDA_BUILD.map(gpu::cuda_version_text),
        "driver_cuda": driver.map(gpu::cuda_version_text),
        "gpus": found.gpus,
        "gpus_reason": found.reason,
        "device": device,
        "model": path,
        "text_tokens": tokens.len(),
        "prefill_tokens": prefill,
        "decode_steps": tokens.len() - prefill,
        "against_cpu": against_cpu,
        "against_llama_cpp": llama_candidate,
        "cpu_against_llama_cpp": llama_cpu,
        "llama_cpp_engine": llama.engine,
        "batch_twin_max_diff": forced.batch_twin_max_diff,
        "tolerance": TOLERANCE,
        "seconds": { "candidate_load": candidate_load_s, "candidate_text": candidate_s },
        "speed": speed,
        "notes": notes,
        "failures": failures,
        "pass": failures.is_empty(),
    });
    if let Some(out) = &args.json_out {
        std::fs::write(out, format!("{report}\n"))
            .with_context(|| format!("writing {}", out.display()))?;
    }
    if args.json {
        println!("{report}");
    } else {
        print_text(
            &report,
            &against_cpu,
            [llama_candidate.as_ref(), llama_cpu.as_ref()],
            &failures,
            &notes,
        );
        if let Some(speed) = &report["speed"].as_object() {
            for (k, v) in speed.iter() {
                println!("speed {k}: {v}");
            }
        }
    }
    Ok(if failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// `edge-agent synth-model`: writes the model and prints what it is.
pub fn synth_model(args: &SynthModelArgs) -> anyhow::Result<ExitCode> {
    let from = args
        .tokenizer_from
        .clone()
        .unwrap_or_else(mec_inference::default_model_path);
    let t = Instant::now();
    let written = mec_inference::synthetic::write(&args.shape, &from, &args.out, args.seed)?;
    println!(
        "{}",
        json!({
            "path": args.out,
            "shape": args.shape.name,
            "parameters": written.parameters,
            "weight_bytes_per_token": written.weight_bytes_per_token,
            "file_bytes": written.file_bytes,
            "seconds": t.elapsed().as_secs_f64(),
            "note": "random weights: its text is noise; for speed figures only",
        })
    );
    Ok(ExitCode::SUCCESS)
}

/// `edge-agent requantize`: the model's weights in another block format.
pub fn requantize(args: &crate::cli::RequantizeArgs) -> anyhow::Result<ExitCode> {
    let from = args
        .model
        .clone()
        .unwrap_or_else(mec_inference::default_model_path);
    let t = Instant::now();
    let r = mec_inference::requantize::requantize(&from, &args.out, args.to)?;
    println!(
        "{}",
        json!({
            "path": args.out,
            "from": from,
            "format": format!("{:?}", args.to),
            "tensors_converted": r.converted,
            "tensors_copied": r.copied,
            "file_bytes": r.file_bytes,
            "seconds": t.elapsed().as_secs_f64(),
        })
    );
    Ok(ExitCode::SUCCESS)
}

/// The tensor path on the device `choice` names; on the CPU (chosen, or
/// fallen back to) it runs on candle's CPU backend.
fn load_candidate(
    path: &std::path::Path,
    choice: &DeviceChoice,
    kv_positions: usize,
) -> anyhow::Result<(Model, DeviceChoice)> {
    let (device, used) = gpu::open_device(choice);
    let load = |device: &mec_inference::Device| -> anyhow::Result<Model> {
        let mut file = GgufFile::open(path)?;
        let model = Model::load_with_kv(&mut file, device, ForwardPath::Tensor, kv_positions)?;
        // One step, so a kernel the GPU cannot run shows here.
        model.forward(&[0], &mut KvCache::new(&model))?;
        Ok(model)
    };
    match (&used, load(&device)) {
        (_, Ok(model)) => Ok((model, used)),
        (DeviceChoice::Cuda { index }, Err(e)) => {
            let (cpu, used) = gpu::fall_back(*index, &format!("{e:#}"));
            Ok((load(&cpu)?, used))
        }
        (DeviceChoice::Cpu { .. }, Err(e)) => Err(e),
    }
}

/// Time to first token for prompts of the plan's lengths (the text's
/// tokens repeated), one at a time; then decode tokens/s with N concurrent
/// streams through the engine the agent serves with (continuous batching,
/// the paged cache), for each N of the plan.
fn speed(
    model: Model,
    tokenizer: Tokenizer,
    text: &[u32],
    plan: &SpeedPlan,
) -> anyhow::Result<serde_json::Value> {
    let most = plan.streams.iter().copied().max().unwrap_or(1);
    let model = Arc::new(model);
    let tokenizer = Arc::new(tokenizer);
    let engine = Engine::start(
        model.clone(),
        tokenizer.clone(),
        EngineConfig {
            slots: most,
            queue_capacity: most,
            // No reuse between runs: each prompt is prefilled in full.
            prefix_cache_tokens: 0,
            ..Default::default()
        },
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let run = |prompts: Vec<Vec<u32>>, max_tokens: usize| {
        let params = SamplingParams {
            max_tokens: Some(max_tokens),
            ..Default::default()
        };
        run_streams(&engine, &rt, prompts, &params)
    };
    // Warm-up: first-use allocations and, on a GPU, the kernels' loading.
    run(vec![text[..16.min(text.len())].to_vec()], 2)?;
    let mut ttft = serde_json::Map::new();
    for &n in &plan.prompt_tokens {
        let prompt: Vec<u32> = text.iter().copied().cycle().take(n).collect();
        let (_, s) = run(vec![prompt], 1)?.remove(0);
        ttft.insert(format!("ttft_ms_{n}"), json!(s.ttft.as_secs_f64() * 1e3));
    }
    let questions: Vec<Vec<u32>> = STREAM_QUESTIONS
        .iter()
        .map(|q| templated(&tokenizer, q))
        .collect::<anyhow::Result<_>>()?;
    let mut decode = serde_json::Map::new();
    for &c in &plan.streams {
        let prompts = questions.iter().cycle().take(c).cloned().collect();
        let done = run(prompts, plan.decode_tokens)?;
        decode.insert(
            format!("decode_tokens_per_s_{c}_streams"),
            json!(aggregate_rate(&done)),
        );
    }
    drop(engine);
    Ok(json!({
        "ttft": ttft,
        "decode": decode,
        "decode_tokens_per_stream": plan.decode_tokens,
        "kv_positions_in_use_after": model.kv_pool_usage().map(|(used, _)| used),
    }))
}

fn sha256_file(path: &std::path::Path) -> anyhow::Result<String> {
    let mut f = std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = std::io::Read::read(&mut f, &mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            return Ok(hex::encode(h.finalize()));
        }
        h.update(&buf[..n]);
    }
}

fn print_text(
    report: &serde_json::Value,
    against_cpu: &Agreement,
    [against_llama, cpu_against_llama]: [Option<&Agreement>; 2],
    failures: &[String],
    notes: &[String],
) {
    let or_none = |v: &serde_json::Value| v.as_str().unwrap_or("none").to_string();
    println!(
        "CUDA: build {}, driver {}",
        or_none(&report["build_cuda"]),
        or_none(&report["driver_cuda"])
    );
    match report["gpus"].as_array() {
        Some(gpus) if !gpus.is_empty() => {
            for g in gpus {
                println!(
                    "GPU {}: {}, {:.1} of {:.1} GiB free",
                    g["index"],
                    g["name"].as_str().unwrap_or("?"),
                    g["memory_free_bytes"].as_f64().unwrap_or(0.0) / (1u64 << 30) as f64,
                    g["memory_total_bytes"].as_f64().unwrap_or(0.0) / (1u64 << 30) as f64,
                );
            }
        }
        _ => println!("GPUs: none ({})", or_none(&report["gpus_reason"])),
    }
    match &report["device"]["kind"] {
        k if k == "cuda" => println!("the tensor path ran on GPU {}", report["device"]["index"]),
        _ => println!(
            "the tensor path ran on the CPU (candle's CPU backend): {}",
            or_none(&report["device"]["reason"])
        ),
    }
    let line = |who: &str, a: &Agreement| {
        let diff = a
            .max_logit_diff
            .map(|d| {
                format!(
                    ", largest logit difference {d:.3} of spread {:.3}",
                    a.logit_spread.unwrap_or(0.0)
                )
            })
            .unwrap_or_default();
        println!(
            "{who}: top-1 agreement {:.1}% over {} positions{diff}; perplexity {:.4} against {:.4}",
            a.top1_agreement * 100.0,
            a.positions,
            a.perplexity_candidate,
            a.perplexity_reference,
        );
    };
    line("against the CPU path", against_cpu);
    if let Some(a) = against_llama {
        line("against llama.cpp", a);
    }
    if let Some(a) = cpu_against_llama {
        line("the CPU path against llama.cpp", a);
    }
    for n in notes {
        println!("note: {n}");
    }
    if failures.is_empty() {
        println!("PASS");
    } else {
        for f in failures {
            println!("FAIL: {f}");
        }
    }
}
