//! `edge-agent bench-inference`: our engine's side of the inference benchmark
//! (`cargo xtask bench-inference` runs it beside llama.cpp on the same file,
//! the same prompt ids and the same thread count). Prints one JSON object;
//! the field names match `bench/llamacpp_bench.py`.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use mec_inference::engine::{Engine, EngineConfig, GenerateRequest, Summary};
use mec_inference::model::KvCache;
use mec_inference::sampling::SamplingParams;
use mec_inference::tokenizer::{ChatMessage, Tokenizer};

use crate::cli::BenchInferenceArgs;

/// The four concurrent streams' questions: open-ended, so each runs long.
pub(crate) const STREAM_QUESTIONS: [&str; 4] = [
    "Write a long story about a lighthouse keeper who befriends a whale.",
    "Explain in detail how a cellular network hands a call from one tower to the next.",
    "Describe, step by step, how to bake bread at home, with tips for beginners.",
    "Write a long letter from a sailor to his family about life at sea.",
];

/// Runs the benchmark and prints its JSON.
pub fn bench(args: &BenchInferenceArgs) -> anyhow::Result<ExitCode> {
    let (model, tokenizer) = load_on_cpu(args.model.as_deref(), args.threads)?;
    let long = long_prompt(&tokenizer, args.prompt_tokens)?;
    let streams = STREAM_QUESTIONS
        .iter()
        .map(|q| templated(&tokenizer, q))
        .collect::<anyhow::Result<Vec<_>>>()?;
    if let Some(out) = &args.prompts_out {
        let prompts = serde_json::json!({
            "long": long,
            "streams": streams,
            "stop_ids": tokenizer.stop_ids(),
        });
        std::fs::write(out, prompts.to_string())
            .with_context(|| format!("writing {}", out.display()))?;
    }

    // Warm-up (first-use allocations), as the peer's side does; then
    // prefill alone: the whole prompt in one forward pass, empty cache.
    model.forward(&long[..16.min(long.len())], &mut KvCache::new(&model))?;
    let mut cache = KvCache::new(&model);
    let t0 = Instant::now();
    model.forward(&long, &mut cache)?;
    let prefill = t0.elapsed();
    drop(cache);

    let engine = Engine::start(
        Arc::new(model),
        Arc::new(tokenizer),
        EngineConfig {
            slots: STREAM_QUESTIONS.len(),
            ..Default::default()
        },
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let greedy = SamplingParams {
        max_tokens: Some(args.decode_tokens),
        ..Default::default()
    };
    let run = |prompts: Vec<Vec<u32>>| run_streams(&engine, &rt, prompts, &greedy);

    let single = run(vec![long.clone()])?.remove(0).1;
    let cached = run(vec![long.clone()])?.remove(0).1;
    let concurrent = run(streams)?;
    let report = serde_json::json!({
        "engine": "mec-inference",
        "version": env!("CARGO_PKG_VERSION"),
        "threads": args.threads,
        "prompt_tokens": long.len(),
        "prefill_tokens_per_s": long.len() as f64 / prefill.as_secs_f64(),
        "ttft_ms": ms(single.ttft),
        "completion_tokens": single.completion_tokens,
        "decode_tokens_per_s": rate(single.completion_tokens.saturating_sub(1), single.decode_time),
        "cached_ttft_ms": ms(cached.ttft),
        "cached_prompt_tokens": cached.cached_prompt_tokens,
        "aggregate_4_tokens_per_s": aggregate_rate(&concurrent),
        "peak_rss_mb": peak_rss_mb(),
    });
    println!("{report}");
    Ok(ExitCode::SUCCESS)
}

/// The benchmark's model on the CPU, with `threads` kernel threads.
pub(crate) fn load_on_cpu(
    model: Option<&std::path::Path>,
    threads: usize,
) -> anyhow::Result<(mec_inference::model::Model, Tokenizer)> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
        .context("setting the kernel thread count")?;
    let path = model.map_or_else(mec_inference::default_model_path, ToOwned::to_owned);
    Ok(mec_inference::load(&path, &mec_inference::Device::Cpu)?)
}

/// Submits every prompt to `engine` at once and waits for each to end: when
/// it was submitted, and its summary. A generation that failed is an error.
pub(crate) fn run_streams(
    engine: &Engine,
    rt: &tokio::runtime::Runtime,
    prompts: Vec<Vec<u32>>,
    params: &SamplingParams,
) -> anyhow::Result<Vec<(Instant, Summary)>> {
    let gens = prompts
        .into_iter()
        .enumerate()
        .map(|(i, prompt)| {
            let submitted = Instant::now();
            let g = engine.submit(GenerateRequest {
                prompt,
                params: params.clone(),
                subscriber: format!("bench-{i}"),
                ..Default::default()
            })?;
            Ok((submitted, g))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    rt.block_on(async {
        let mut out = Vec::new();
        for (submitted, mut g) in gens {
            while g.deltas.recv().await.is_some() {}
            let s = (&mut g.summary).await.context("no summary")?;
            if let Some(e) = &s.error {
                anyhow::bail!("generation failed: {e}");
            }
            out.push((submitted, s));
        }
        Ok(out)
    })
}

/// Aggregate decode rate of streams run together: tokens after each
/// stream's first, over the span from the earliest first token to the last
/// end (0 when there is no span).
pub(crate) fn aggregate_rate(done: &[(Instant, Summary)]) -> f64 {
    let first = done.iter().map(|(at, s)| *at + s.ttft).min();
    let end = done
        .iter()
        .map(|(at, s)| *at + s.ttft + s.decode_time)
        .max();
    let tokens: usize = done
        .iter()
        .map(|(_, s)| s.completion_tokens.saturating_sub(1))
        .sum();
    match (first, end) {
        (Some(a), Some(b)) => rate(tokens, b - a),
        _ => 0.0,
    }
}

pub(crate) fn templated(tok: &Tokenizer, question: &str) -> anyhow::Result<Vec<u32>> {
    let text = tok
        .apply_chat_template(&[ChatMessage::user(question.to_string())])
        .map_err(anyhow::Error::msg)?;
    tok.encode(&text).map_err(anyhow::Error::msg)
}

/// A chat prompt of at least `target` tokens after the template: a question
/// after a growing passage of operator documentation-like text.
fn long_prompt(tok: &Tokenizer, target: usize) -> anyhow::Result<Vec<u32>> {
    const SENTENCES: [&str; 6] = [
        "The edge site serves subscribers within a few kilometres of the radio.",
        "Each request is metered in tokens against the subscriber's package.",
        "Usage records are signed and stored before they are sent to the core.",
        "When the link to the core is down, records wait on the local disk.",
        "Technicians provision the box over a serial console on first boot.",
        "Low latency matters most for the first word of every answer.",
    ];
    let mut passage = String::new();
    for i in 0.. {
        let text = format!("{passage}\n\nSummarise the passage above in three sentences.");
        let ids = templated(tok, &text)?;
        if ids.len() >= target || i > 10_000 {
            return Ok(ids);
        }
        passage.push_str(SENTENCES[i % SENTENCES.len()]);
        passage.push(' ');
    }
    unreachable!("the loop returns")
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn rate(tokens: usize, over: Duration) -> f64 {
    if over.is_zero() {
        0.0
    } else {
        tokens as f64 / over.as_secs_f64()
    }
}

/// The most resident memory this process has held (VmHWM), in MB.
fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}
