//! The engine on the real model: counts, concurrency, cancellation, prefix
//! cache, overload and fairness.

use std::sync::Arc;
use std::time::Duration;

use candle_core::Device;
use mec_inference::engine::{
    Engine, EngineConfig, FinishReason, GenerateRequest, SubmitError, Summary,
};
use mec_inference::sampling::SamplingParams;
use mec_inference::tokenizer::ChatMessage;

fn engine(config: EngineConfig) -> Engine {
    let path = mec_inference::default_model_path();
    assert!(
        path.exists(),
        "{} is missing: run `cargo xtask setup`",
        path.display()
    );
    let (model, tok) = mec_inference::load(&path, &Device::Cpu).unwrap();
    Engine::start(Arc::new(model), Arc::new(tok), config)
}

fn chat(e: &Engine, text: &str) -> Vec<u32> {
    let t = e.tokenizer();
    t.encode(&t.apply_chat_template(&[ChatMessage::user(text)]).unwrap())
        .unwrap()
}

fn req(prompt: Vec<u32>, max_tokens: usize, subscriber: &str) -> GenerateRequest {
    GenerateRequest {
        prompt,
        params: SamplingParams {
            max_tokens: Some(max_tokens),
            ..Default::default()
        },
        subscriber: subscriber.into(),
        ..Default::default()
    }
}

async fn collect(e: &Engine, r: GenerateRequest) -> (String, Summary) {
    let mut g = e.submit(r).unwrap();
    let mut text = String::new();
    let mut ids = 0;
    while let Some(d) = g.deltas.recv().await {
        text.push_str(&d.text);
        ids += d.token_ids.len();
    }
    let s = g.summary.await.unwrap();
    assert!(
        ids <= s.completion_tokens,
        "deltas carry at most the counted tokens"
    );
    (text, s)
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn counts_are_the_engines_own_and_max_tokens_gives_length() {
    let e = engine(EngineConfig {
        slots: 1,
        ..Default::default()
    });
    let prompt = chat(&e, "Name three colours.");
    let (text, s) = rt().block_on(collect(&e, req(prompt.clone(), 8, "a")));
    assert_eq!(s.prompt_tokens, prompt.len());
    assert_eq!(s.completion_tokens, 8);
    assert_eq!(s.finish_reason, FinishReason::Length);
    assert!(!text.is_empty());
    assert!(s.ttft > Duration::ZERO);
}

#[test]
fn concurrent_greedy_requests_equal_each_run_alone() {
    let prompts = [
        "What is 2 + 2?",
        "Write one word about the sea.",
        "Say hello in French.",
        "What colour is the sky?",
    ];
    let alone: Vec<String> = {
        let e = engine(EngineConfig {
            slots: 1,
            prefix_cache_tokens: 0,
            ..Default::default()
        });
        prompts
            .iter()
            .map(|p| rt().block_on(collect(&e, req(chat(&e, p), 12, "a"))).0)
            .collect()
    };
    let e = engine(EngineConfig {
        slots: 4,
        prefix_cache_tokens: 0,
        ..Default::default()
    });
    let together = rt().block_on(async {
        let futs: Vec<_> = prompts
            .iter()
            .enumerate()
            .map(|(i, p)| collect(&e, req(chat(&e, p), 12, &format!("s{i}"))))
            .collect();
        let mut out = Vec::new();
        for f in futs {
            out.push(f.await.0);
        }
        out
    });
    assert_eq!(alone, together);
}

#[test]
fn prefix_cache_hit_gives_the_same_text_and_reports_cached_tokens() {
    let e = engine(EngineConfig {
        slots: 1,
        ..Default::default()
    });
    let prompt = chat(&e, "Explain what a token package is, in one sentence.");
    let (first, s1) = rt().block_on(collect(&e, req(prompt.clone(), 10, "a")));
    let (second, s2) = rt().block_on(collect(&e, req(prompt.clone(), 10, "a")));
    assert_eq!(s1.cached_prompt_tokens, 0);
    assert_eq!(
        s2.cached_prompt_tokens,
        prompt.len() - 1,
        "all but the last prompt token reused"
    );
    assert_eq!(first, second);
    // A different question after the same system prompt shares its beginning.
    let other = chat(&e, "Why do edge boxes exist?");
    let (_, s3) = rt().block_on(collect(&e, req(other, 4, "a")));
    assert!(s3.cached_prompt_tokens >= 20, "{s3:?}");
}

#[test]
fn dropping_the_stream_cancels_within_a_step_and_still_reports_tokens() {
    let e = engine(EngineConfig {
        slots: 1,
        ..Default::default()
    });
    let prompt = chat(&e, "Tell me a long story about a lighthouse keeper.");
    let summary = rt().block_on(async {
        let mut g = e.submit(req(prompt, 200, "a")).unwrap();
        let mut seen = 0;
        while let Some(d) = g.deltas.recv().await {
            seen += d.token_ids.len();
            if seen >= 3 {
                break;
            }
        }
        drop(g.deltas);
        let s = g.summary.await.unwrap();
        (seen, s)
    });
    let (seen, s) = summary;
    assert_eq!(s.finish_reason, FinishReason::Cancelled);
    assert!(s.completion_tokens >= seen, "{s:?}");
    assert!(
        s.completion_tokens <= seen + 3,
        "stopped within a step or two of the drop: {s:?}"
    );
}

#[test]
fn full_queue_is_overloaded_and_long_prompts_are_refused() {
    let e = engine(EngineConfig {
        slots: 1,
        queue_capacity: 1,
        ..Default::default()
    });
    let p = chat(&e, "Count to one hundred.");
    let _running = e.submit(req(p.clone(), 60, "a")).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let _queued = e.submit(req(p.clone(), 60, "a")).unwrap();
    assert!(matches!(
        e.submit(req(p.clone(), 60, "a")),
        Err(SubmitError::Overloaded(1))
    ));
    let context = e.model().config().context_length;
    assert!(matches!(
        e.submit(req(vec![504; context], 1, "a")),
        Err(SubmitError::PromptTooLong { .. })
    ));
    assert!(matches!(
        e.submit(req(vec![], 1, "a")),
        Err(SubmitError::EmptyPrompt)
    ));
}

#[test]
fn one_subscribers_burst_does_not_starve_another() {
    let e = engine(EngineConfig {
        slots: 1,
        queue_capacity: 16,
        prefix_cache_tokens: 0,
        ..Default::default()
    });
    let p = chat(&e, "Say something.");
    rt().block_on(async {
        let mut a: Vec<_> = (0..4)
            .map(|_| e.submit(req(p.clone(), 6, "burst")).unwrap())
            .collect();
        let b = e.submit(req(p.clone(), 6, "quiet")).unwrap();
        let b_done = b.summary.await.unwrap();
        // Round robin: the quiet subscriber's request ran second, so at least
        // two of the burst's requests were still waiting or running.
        let mut unfinished = Vec::new();
        for g in a.iter_mut() {
            if g.summary.try_recv().is_err() {
                unfinished.push(g);
            }
        }
        assert!(
            unfinished.len() >= 2,
            "quiet request waited behind the whole burst ({b_done:?})"
        );
        for g in unfinished {
            (&mut g.summary).await.unwrap();
        }
    });
}

#[test]
fn stop_sequence_cuts_the_text_but_counts_its_tokens() {
    let e = engine(EngineConfig {
        slots: 1,
        ..Default::default()
    });
    let prompt = e.tokenizer().encode("The capital of France is").unwrap();
    let mut r = req(prompt, 20, "a");
    r.params.stop = vec!["\n".into()];
    let (text, s) = rt().block_on(collect(&e, r));
    assert_eq!(text, " Paris.");
    assert_eq!(s.finish_reason, FinishReason::Stop);
    assert_eq!(
        s.completion_tokens, 3,
        "' Paris', '.', and the newline token"
    );
}

/// A long prompt is prefilled a chunk at a time between decode steps: a
/// stream already decoding goes on meanwhile. With chunks of 16 tokens, a
/// prompt of over 200 takes more than 12 steps to prefill, in which the
/// running stream (8 tokens to go) finishes; prefilled whole at admission,
/// the long prompt's first token would come while the running stream still
/// had tokens left. The text is the same as with one big chunk.
#[test]
fn a_long_prompt_is_prefilled_in_chunks_while_another_stream_decodes() {
    let whole = {
        let e = engine(EngineConfig {
            slots: 2,
            prefix_cache_tokens: 0,
            ..Default::default()
        });
        let long = chat(
            &e,
            &"Tell me about the sea and the harbour town. ".repeat(20),
        );
        rt().block_on(collect(&e, req(long, 6, "b"))).0
    };
    let e = engine(EngineConfig {
        slots: 2,
        prefix_cache_tokens: 0,
        prefill_chunk: 16,
        ..Default::default()
    });
    let long = chat(
        &e,
        &"Tell me about the sea and the harbour town. ".repeat(20),
    );
    assert!(long.len() > 200, "{}", long.len());
    rt().block_on(async {
        let mut running = e.submit(req(chat(&e, "Count to twenty."), 9, "a")).unwrap();
        // Decoding has begun before the long prompt arrives.
        running.deltas.recv().await.expect("a first delta");
        let mut chunked = e.submit(req(long.clone(), 6, "b")).unwrap();
        let first = chunked.deltas.recv().await.expect("a first delta");
        let summary = running.summary.try_recv();
        assert!(
            summary.is_ok(),
            "the running stream had not finished when the long prompt's first token came"
        );
        let mut text = first.text;
        while let Some(d) = chunked.deltas.recv().await {
            text.push_str(&d.text);
        }
        let s = chunked.summary.await.unwrap();
        assert_eq!(s.prompt_tokens, long.len());
        assert_eq!(text, whole);
    });
}

/// The schema the structured-output tests hold the model to: nested
/// objects, arrays, enums and required fields.
fn person_schema() -> serde_json::Value {
    serde_json::json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 24},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "role": {"enum": ["engineer", "technician", "operator"]},
            "address": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 24},
                    "zip": {"type": "string", "pattern": "^[0-9]{5}$"}
                },
                "required": ["city", "zip"],
                "additionalProperties": false
            },
            "skills": {"type": "array", "items": {"type": "string", "maxLength": 16}, "maxItems": 3}
        },
        "required": ["name", "age", "role", "address", "skills"],
        "additionalProperties": false
    })
}

#[test]
fn a_json_schema_constraint_yields_a_complete_valid_document() {
    let e = engine(EngineConfig::default());
    let limits = mec_inference::constraint::SchemaLimits::default();
    let prompt = chat(&e, "Describe a field technician as JSON.");
    let r = GenerateRequest {
        constraint: Some(e.grammars().json_schema(&person_schema(), &limits).unwrap()),
        ..req(prompt.clone(), 200, "a")
    };
    let (text, s) = rt().block_on(collect(&e, r));
    // The document ends the sequence (no end-of-turn token needed).
    assert_eq!(s.finish_reason, FinishReason::Stop, "{text}");
    let v: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
    for key in ["name", "age", "role", "address", "skills"] {
        assert!(v.get(key).is_some(), "{key} missing in {text}");
    }
    let age = v["age"].as_i64().unwrap();
    assert!((0..=120).contains(&age), "{text}");
    assert!(["engineer", "technician", "operator"].contains(&v["role"].as_str().unwrap()));
    let zip = v["address"]["zip"].as_str().unwrap();
    assert!(
        zip.len() == 5 && zip.bytes().all(|b| b.is_ascii_digit()),
        "{text}"
    );
    assert_eq!(
        v.as_object().unwrap().len(),
        5,
        "no extra properties: {text}"
    );
    // Unconstrained, the same prompt does not answer in this JSON.
    let (free, _) = rt().block_on(collect(&e, req(prompt, 40, "a")));
    assert!(
        serde_json::from_str::<serde_json::Value>(&free).is_err(),
        "{free}"
    );
}

#[test]
fn schemas_the_engine_cannot_enforce_are_refused_naming_why() {
    use mec_inference::constraint::{SchemaError, SchemaLimits};
    let e = engine(EngineConfig::default());
    let limits = SchemaLimits {
        max_bytes: 2000,
        max_depth: 6,
    };
    let refused =
        |schema: serde_json::Value| e.grammars().json_schema(&schema, &limits).unwrap_err();
    let msg = refused(
        serde_json::json!({"type": "object", "properties": {"a": {"not": {"type": "string"}}}}),
    )
    .to_string();
    assert!(msg.contains("not"), "{msg}");
    let msg = refused(serde_json::json!({"type": "string", "format": "color"})).to_string();
    assert!(msg.contains("color"), "{msg}");
    let msg = refused(serde_json::json!({"type": "oranges"})).to_string();
    assert!(
        msg.contains("oranges") || msg.to_lowercase().contains("type"),
        "{msg}"
    );
    assert!(matches!(
        refused(serde_json::json!("a string")),
        SchemaError::Unsupported(_)
    ));
    let big = serde_json::json!({"type": "object", "description": "x".repeat(3000)});
    assert!(matches!(
        refused(big),
        SchemaError::TooLarge { limit: 2000, .. }
    ));
    let mut deep = serde_json::json!({"type": "string"});
    for _ in 0..6 {
        deep = serde_json::json!({"type": "array", "items": deep});
    }
    assert!(matches!(refused(deep), SchemaError::TooDeep { limit: 6 }));
}

#[test]
fn choices_share_one_prefill_and_each_is_its_own_sample() {
    let e = engine(EngineConfig {
        slots: 3,
        ..Default::default()
    });
    let prompt = chat(&e, "Write a word.");
    let r = GenerateRequest {
        params: SamplingParams {
            temperature: 1.0,
            seed: Some(11),
            max_tokens: Some(12),
            ..Default::default()
        },
        choices: 3,
        ..req(prompt.clone(), 12, "a")
    };
    let run = |r: GenerateRequest| {
        rt().block_on(async {
            let gens = e.submit_choices(r).unwrap();
            let mut out = Vec::new();
            for mut g in gens {
                let mut text = String::new();
                while let Some(d) = g.deltas.recv().await {
                    text.push_str(&d.text);
                }
                out.push((text, g.summary.await.unwrap()));
            }
            out
        })
    };
    // More choices than slots: they could not decode at once.
    let too_many = GenerateRequest {
        choices: 4,
        ..r.clone()
    };
    assert!(matches!(
        e.submit_choices(too_many),
        Err(SubmitError::TooManyChoices {
            choices: 4,
            slots: 3
        })
    ));
    let a = run(r.clone());
    assert_eq!(a.len(), 3);
    // Choice 0 prefilled the prompt; the others copied its cache.
    assert_eq!(a[1].1.cached_prompt_tokens, prompt.len());
    assert_eq!(a[2].1.cached_prompt_tokens, prompt.len());
    assert!(a.iter().all(|(_, s)| s.prompt_tokens == prompt.len()));
    let texts: std::collections::HashSet<_> = a.iter().map(|(t, _)| t.clone()).collect();
    assert!(texts.len() > 1, "three samples, all equal: {a:?}");
    // The same seed gives the same three choices.
    let b = run(r);
    let t = |v: &[(String, Summary)]| v.iter().map(|(t, _)| t.clone()).collect::<Vec<_>>();
    assert_eq!(t(&a), t(&b));
}

#[test]
fn greedy_logprobs_name_the_chosen_token_as_the_most_likely() {
    let e = engine(EngineConfig::default());
    let prompt = chat(&e, "What is the capital of France?");
    let r = GenerateRequest {
        params: SamplingParams {
            logprobs: Some(5),
            max_tokens: Some(6),
            ..Default::default()
        },
        ..req(prompt, 6, "a")
    };
    rt().block_on(async {
        let mut g = e.submit(r).unwrap();
        let mut n = 0;
        while let Some(d) = g.deltas.recv().await {
            assert_eq!(d.logprobs.len(), d.token_ids.len());
            for (lp, id) in d.logprobs.iter().zip(&d.token_ids) {
                assert_eq!(lp.id, *id);
                assert_eq!(lp.top.len(), 5);
                assert_eq!(lp.top[0], (*id, lp.logprob));
                assert!(lp.logprob <= 0.0);
                assert!(lp.top.windows(2).all(|w| w[0].1 >= w[1].1));
                n += 1;
            }
        }
        assert!(n >= 1);
    });
}
