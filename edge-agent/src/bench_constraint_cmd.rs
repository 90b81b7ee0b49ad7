//! `edge-agent bench-constraint`: what structured output costs in our
//! engine (`cargo xtask bench-structured` runs it beside llama.cpp on the
//! same file, prompt ids, schemas and thread count). Prints one JSON object.
//!
//! - Decode tokens/s, greedy, the same prompt and the same number of
//!   tokens, without a constraint and under a JSON Schema, in alternating
//!   rounds (medians). Both run to `decode_tokens`: the free run with its
//!   end-of-turn tokens banned (`logit_bias`), the constrained one under a
//!   schema that needs more than that many tokens to complete.
//! - Time to the first token with a 50-property object schema, against
//!   none: the schema's compilation plus the first constrained step.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use mec_inference::constraint::SchemaLimits;
use mec_inference::engine::{Engine, EngineConfig, GenerateRequest, Summary};
use mec_inference::sampling::SamplingParams;
use serde_json::{json, Value};

use crate::bench_inference_cmd::{load_on_cpu, templated};
use crate::cli::BenchConstraintArgs;

/// The decode benchmark's schema: readings that go on for longer than the
/// benchmark decodes (at least 20 of them, some 300 tokens), each an integer, an enum and a
/// bounded string, so every kind of step is in the mix.
pub fn decode_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "site": {"type": "string", "maxLength": 24},
            "readings": {
                "type": "array",
                "minItems": 20,
                "items": {
                    "type": "object",
                    "properties": {
                        "cell": {"type": "integer", "minimum": 1, "maximum": 999},
                        "band": {"enum": ["n28", "n78", "n258"]},
                        "note": {"type": "string", "maxLength": 24}
                    },
                    "required": ["cell", "band", "note"],
                    "additionalProperties": false
                }
            }
        },
        "required": ["site", "readings"],
        "additionalProperties": false
    })
}

/// The large schema: one object of 50 properties of mixed types.
pub fn large_schema() -> Value {
    let mut props = serde_json::Map::new();
    for i in 0..50 {
        let p = match i % 5 {
            0 => json!({"type": "string", "maxLength": 32}),
            1 => json!({"type": "integer", "minimum": 0, "maximum": 100000}),
            2 => json!({"enum": ["low", "medium", "high"]}),
            3 => json!({"type": "boolean"}),
            _ => {
                json!({"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 4})
            }
        };
        props.insert(format!("field_{i:02}"), p);
    }
    let required: Vec<String> = props.keys().cloned().collect();
    json!({
        "type": "object",
        "properties": props,
        "required": required,
        "additionalProperties": false
    })
}

/// The question both runs answer.
pub const QUESTION: &str = "Report the cell readings of a 5G site as JSON.";

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Runs the benchmark and prints its JSON.
pub fn bench(args: &BenchConstraintArgs) -> anyhow::Result<ExitCode> {
    let (model, tokenizer) = load_on_cpu(args.model.as_deref(), args.threads)?;
    let prompt = templated(&tokenizer, QUESTION)?;
    let stop_ids = tokenizer.stop_ids().to_vec();
    if let Some(out) = &args.inputs_out {
        let inputs = json!({
            "prompt": prompt,
            "stop_ids": stop_ids,
            "decode_schema": decode_schema(),
            "large_schema": large_schema(),
        });
        std::fs::write(out, inputs.to_string())
            .with_context(|| format!("writing {}", out.display()))?;
    }
    let engine = Engine::start(
        Arc::new(model),
        Arc::new(tokenizer),
        EngineConfig {
            slots: 1,
            // Every run prefills its prompt: TTFT compares like with like.
            prefix_cache_tokens: 0,
            ..Default::default()
        },
    );
    let t0 = Instant::now();
    engine.grammars().warm()?;
    let trie_ms = ms(t0.elapsed());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let limits = SchemaLimits::default();
    let run = |schema: Option<&Value>, max_tokens: usize| -> anyhow::Result<(Summary, Duration)> {
        let t = Instant::now();
        let constraint = schema
            .map(|s| engine.grammars().json_schema(s, &limits))
            .transpose()?;
        let compile = t.elapsed();
        let params = SamplingParams {
            max_tokens: Some(max_tokens),
            // Unconstrained, the end-of-turn tokens are banned so both runs
            // decode the same number of tokens.
            logit_bias: match constraint {
                None => stop_ids.iter().map(|&id| (id, -100.0)).collect(),
                Some(_) => Vec::new(),
            },
            ..Default::default()
        };
        let mut g = engine.submit(GenerateRequest {
            prompt: prompt.clone(),
            params,
            subscriber: "bench".into(),
            constraint,
            choices: 1,
        })?;
        let summary = rt.block_on(async {
            while g.deltas.recv().await.is_some() {}
            (&mut g.summary).await.context("no summary")
        })?;
        if let Some(e) = &summary.error {
            anyhow::bail!("generation failed: {e}");
        }
        Ok((summary, compile))
    };
    // Warm-up.
    run(None, 4)?;
    run(Some(&decode_schema()), 4)?;
    let (mut free, mut constrained) = (Vec::new(), Vec::new());
    let (mut ttft_free, mut ttft_large, mut compile_large) = (Vec::new(), Vec::new(), Vec::new());
    let mut tokens = 0;
    for _ in 0..args.rounds {
        let (s, _) = run(None, args.decode_tokens)?;
        free.push(rate(&s));
        let (s, _) = run(Some(&decode_schema()), args.decode_tokens)?;
        anyhow::ensure!(
            s.completion_tokens == args.decode_tokens,
            "the constrained run ended after {} tokens, before {}",
            s.completion_tokens,
            args.decode_tokens
        );
        tokens = s.completion_tokens;
        constrained.push(rate(&s));
        let (s, _) = run(None, 1)?;
        ttft_free.push(ms(s.ttft));
        let (s, compile) = run(Some(&large_schema()), 1)?;
        ttft_large.push(ms(s.ttft + compile));
        compile_large.push(ms(compile));
    }
    let (free, constrained) = (median(free), median(constrained));
    let report = json!({
        "engine": "mec-inference (llguidance)",
        "threads": args.threads,
        "prompt_tokens": prompt.len(),
        "decode_tokens": tokens,
        "rounds": args.rounds,
        "trie_build_ms": trie_ms,
        "decode_tokens_per_s_free": free,
        "decode_tokens_per_s_constrained": constrained,
        "constrained_over_free": constrained / free,
        "constraint_us_per_token": (1e6 / constrained - 1e6 / free),
        "ttft_ms_free": median(ttft_free),
        "ttft_ms_large_schema": median(ttft_large),
        "large_schema_compile_ms": median(compile_large),
    });
    println!("{report}");
    Ok(ExitCode::SUCCESS)
}

fn rate(s: &Summary) -> f64 {
    let secs = s.decode_time.as_secs_f64();
    if secs > 0.0 {
        s.completion_tokens.saturating_sub(1) as f64 / secs
    } else {
        0.0
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
