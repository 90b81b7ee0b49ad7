//! The tensor path (the GPU's) on candle's CPU backend: batched decoding
//! over the paged KV cache, held to the native path and to itself.

use std::sync::Arc;

use candle_core::Device;
use mec_inference::engine::{Engine, EngineConfig, FinishReason, GenerateRequest, Summary};
use mec_inference::gguf::GgufFile;
use mec_inference::model::{ForwardPath, KvCache, Model, BLOCK_POSITIONS};
use mec_inference::sampling::SamplingParams;
use mec_inference::tokenizer::Tokenizer;

fn load(path: ForwardPath, kv_positions: usize) -> Model {
    let mut file = GgufFile::open(&mec_inference::default_model_path()).unwrap();
    Model::load_with_kv(&mut file, &Device::Cpu, path, kv_positions).unwrap()
}

fn tokenizer() -> Tokenizer {
    let file = GgufFile::open(&mec_inference::default_model_path()).unwrap();
    Tokenizer::from_gguf(&file).unwrap()
}

fn argmax(v: &[f32]) -> usize {
    v.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .unwrap()
        .0
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Prompts of different lengths: within one block, across a block
/// boundary, over several blocks.
fn prompts(tok: &Tokenizer) -> Vec<Vec<u32>> {
    let ps = [
        "Hi".to_string(),
        "The capital of France is".to_string(),
        "Edge boxes serve tokens close to the phone, and they count them. ".repeat(3),
    ];
    let ids: Vec<Vec<u32>> = ps.iter().map(|p| tok.encode(p).unwrap()).collect();
    assert!(ids[0].len() < BLOCK_POSITIONS && ids[2].len() > 2 * BLOCK_POSITIONS);
    ids
}

/// Eight batched decode steps of three sequences of different lengths on
/// the tensor path (one pass per step, attention over the paged cache,
/// gathered and masked) give the logits each sequence gets on the native
/// path, stepping alone: the same next token, and logits within the bound
/// the two paths keep at a prompt (`native_and_tensor_paths_agree`).
#[test]
fn batched_paged_decoding_follows_the_native_path() {
    let tok = tokenizer();
    let native = load(ForwardPath::Native, 0);
    let tensor = load(ForwardPath::Tensor, 64 * BLOCK_POSITIONS);
    let prompts = prompts(&tok);
    let mut t_caches: Vec<KvCache> = Vec::new();
    let mut n_caches: Vec<KvCache> = Vec::new();
    let mut next = Vec::new();
    for p in &prompts {
        let mut tc = KvCache::new(&tensor);
        let mut nc = KvCache::new(&native);
        let tl = tensor
            .forward(p, &mut tc)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let nl = native
            .forward(p, &mut nc)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(argmax(&tl), argmax(&nl));
        next.push(argmax(&nl) as u32);
        t_caches.push(tc);
        n_caches.push(nc);
    }
    let mut worst = 0f32;
    for step in 0..8 {
        let mut steps: Vec<(u32, &mut KvCache)> =
            next.iter().copied().zip(t_caches.iter_mut()).collect();
        let batched = tensor.forward_batch(&mut steps).unwrap();
        for (i, (id, nc)) in next.iter_mut().zip(n_caches.iter_mut()).enumerate() {
            let alone = native
                .forward(&[*id], nc)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let spread = alone.iter().fold(0f32, |m, x| m.max(x.abs()));
            let d = max_diff(&batched[i], &alone);
            worst = worst.max(d / spread);
            assert!(
                d <= 0.1 * spread,
                "step {step}, sequence {i}: logits differ by {d}"
            );
            assert_eq!(
                argmax(&batched[i]),
                argmax(&alone),
                "step {step}, sequence {i}: another next token"
            );
            *id = argmax(&alone) as u32;
        }
    }
    for (t, n) in t_caches.iter().zip(&n_caches) {
        assert_eq!(t.len(), n.len());
    }
    eprintln!("largest logit difference, relative to the largest logit: {worst:.4}");
}

/// A batched step on the tensor path equals each sequence stepping alone
/// on the tensor path (padding and masks change nothing).
#[test]
fn a_batched_paged_step_equals_each_sequence_alone() {
    let tok = tokenizer();
    let tensor = load(ForwardPath::Tensor, 64 * BLOCK_POSITIONS);
    let mut caches = Vec::new();
    let mut alone = Vec::new();
    for p in prompts(&tok) {
        let mut c = KvCache::new(&tensor);
        tensor.forward(&p, &mut c).unwrap();
        let mut own = c.clone();
        alone.push(
            tensor
                .forward(&[504], &mut own)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
        );
        caches.push(c);
    }
    let mut steps: Vec<(u32, &mut KvCache)> = caches.iter_mut().map(|c| (504, c)).collect();
    let batched = tensor.forward_batch(&mut steps).unwrap();
    for (b, a) in batched.iter().zip(&alone) {
        assert!(max_diff(b, a) <= 1e-4, "differ by {}", max_diff(b, a));
    }
}

/// The prefix cache's use: a copy cut inside a block shares that block,
/// and writing after the cut copies it first, leaving the original intact.
/// Both sides run the same passes as an unshared reference, so they must
/// match it exactly (candle's products round differently for other chunk
/// sizes, so a reference with other chunks would only be close).
#[test]
fn a_shared_prefix_cut_inside_a_block_is_copied_on_write() {
    let tok = tokenizer();
    let tensor = load(ForwardPath::Tensor, 16 * BLOCK_POSITIONS);
    let ids = &prompts(&tok)[2];
    let cut = BLOCK_POSITIONS + 5;
    let tail = [504, 505, 506];
    let last_after = |cache: &KvCache, keep: usize, ids: &[u32]| {
        let mut c = cache.clone();
        c.truncate(keep).unwrap();
        tensor
            .forward(ids, &mut c)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    let mut original = KvCache::new(&tensor);
    tensor.forward(ids, &mut original).unwrap();
    let n = ids.len();
    let original_before = last_after(&original, n - 1, &ids[n - 1..]);

    // The reference: its own prefill, cut while nothing else holds it.
    let mut reference = KvCache::new(&tensor);
    tensor.forward(ids, &mut reference).unwrap();
    reference.truncate(cut).unwrap();
    let used = tensor.kv_pool_usage().unwrap().0;
    let want = tensor
        .forward(&tail, &mut reference)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(tensor.kv_pool_usage().unwrap().0, used, "no copy unshared");

    let mut copy = original.clone();
    copy.truncate(cut).unwrap();
    let used = tensor.kv_pool_usage().unwrap().0;
    let got = tensor
        .forward(&tail, &mut copy)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(
        tensor.kv_pool_usage().unwrap().0,
        used + BLOCK_POSITIONS,
        "the shared block was copied"
    );
    assert_eq!(max_diff(&got, &want), 0.0);
    // The copy's writes went to its own block: the original reads as before.
    let original_after = last_after(&original, n - 1, &ids[n - 1..]);
    assert_eq!(max_diff(&original_after, &original_before), 0.0);
}

/// A pool that is full refuses the pass with a clear error and leaves the
/// cache as it was; freed blocks serve the next sequence.
#[test]
fn a_full_kv_pool_is_a_clear_error_and_frees_on_drop() {
    let tensor = load(ForwardPath::Tensor, 2 * BLOCK_POSITIONS);
    assert_eq!(tensor.kv_pool_usage(), Some((0, 2 * BLOCK_POSITIONS)));
    let ids: Vec<u32> = (1..=20).collect();
    let mut a = KvCache::new(&tensor);
    tensor.forward(&ids, &mut a).unwrap();
    let mut b = KvCache::new(&tensor);
    let e = tensor.forward(&ids, &mut b).unwrap_err();
    assert!(e.to_string().contains("the KV cache is full"), "{e}");
    assert!(b.is_empty());
    let mut steps = vec![(5, &mut a)];
    tensor.forward_batch(&mut steps).unwrap();
    assert_eq!(a.len(), 21);
    drop(a);
    assert_eq!(tensor.kv_pool_usage(), Some((0, 2 * BLOCK_POSITIONS)));
    tensor.forward(&ids, &mut b).unwrap();
}

/// Greedy tokens after `prompt` on `model`, one pass per token, stopping at
/// the end of turn; with the smallest gap between the chosen logit and the
/// runner-up along the way.
fn greedy_alone(model: &Model, tok: &Tokenizer, prompt: &[u32], n: usize) -> (Vec<u32>, f32) {
    let mut cache = KvCache::new(model);
    let mut logits = model
        .forward(prompt, &mut cache)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let (mut out, mut gap) = (Vec::new(), f32::INFINITY);
    for _ in 0..n {
        let id = argmax(&logits);
        let second = logits
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != id)
            .map(|(_, l)| *l)
            .fold(f32::NEG_INFINITY, f32::max);
        gap = gap.min(logits[id] - second);
        out.push(id as u32);
        if tok.stop_ids().contains(&(id as u32)) {
            break;
        }
        logits = model
            .forward(&[id as u32], &mut cache)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
    }
    (out, gap)
}

fn engine_on(model: Model, slots: usize) -> Engine {
    Engine::start(
        Arc::new(model),
        Arc::new(tokenizer()),
        EngineConfig {
            slots,
            ..Default::default()
        },
    )
}

/// Runs `prompts` at once, greedy, `n` tokens at most each: the token ids
/// each stream carried and each summary.
fn run_together(e: &Engine, prompts: &[Vec<u32>], n: usize) -> Vec<(Vec<u32>, Summary)> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let gens: Vec<_> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            e.submit(GenerateRequest {
                prompt: p.clone(),
                params: SamplingParams {
                    max_tokens: Some(n),
                    ..Default::default()
                },
                subscriber: format!("s{i}"),
                ..Default::default()
            })
            .unwrap()
        })
        .collect();
    rt.block_on(async {
        let mut out = Vec::new();
        for mut g in gens {
            let mut ids = Vec::new();
            while let Some(d) = g.deltas.recv().await {
                ids.extend(d.token_ids);
            }
            out.push((ids, g.summary.await.unwrap()));
        }
        out
    })
}

/// A KV pool with room for two of three sequences at once: the engine
/// makes room by evicting the prefix cache and preempting the newest
/// sequence, whose KV is recomputed once blocks are free. Every request
/// completes with the tokens it gets alone (its greedy choices are far
/// from ties, checked first, so the recomputed KV's rounding cannot turn
/// them), and none ends in an error.
#[test]
fn a_full_kv_pool_preempts_and_every_request_completes_as_alone() {
    let tok = tokenizer();
    let n = 24;
    let prompts: Vec<Vec<u32>> = [
        "1, 2, 3, 4, 5,",
        "Python is a programming language",
        "Edge boxes serve tokens close to the phone, and",
    ]
    .iter()
    .map(|p| tok.encode(p).unwrap())
    .collect();
    let reference = load(ForwardPath::Tensor, 64 * BLOCK_POSITIONS);
    let alone: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| {
            let (ids, gap) = greedy_alone(&reference, &tok, p, n);
            assert!(gap > 0.05, "a near tie ({gap}): choose another prompt");
            ids
        })
        .collect();
    drop(reference);
    let need: Vec<usize> = prompts
        .iter()
        .zip(&alone)
        .map(|(p, a)| (p.len() + a.len()).div_ceil(BLOCK_POSITIONS))
        .collect();
    // Room for the longest alone, and one block more: not for all three.
    let blocks = need.iter().max().unwrap() + 1;
    assert!(need.iter().sum::<usize>() > blocks + 1, "{need:?}");
    let e = engine_on(load(ForwardPath::Tensor, blocks * BLOCK_POSITIONS), 3);
    let together = run_together(&e, &prompts, n);
    for (i, ((ids, s), want)) in together.iter().zip(&alone).enumerate() {
        assert_ne!(s.finish_reason, FinishReason::Error, "{i}: {:?}", s.error);
        assert_eq!(s.completion_tokens, want.len(), "{i}");
        let shown = if tok.stop_ids().contains(want.last().unwrap()) {
            &want[..want.len() - 1]
        } else {
            &want[..]
        };
        assert_eq!(ids, shown, "sequence {i}");
    }
    assert!(e.stats().preemptions > 0, "the pool was never short");
}

/// A sequence the whole pool cannot hold ends with an error that names the
/// KV cache, and its summary counts the tokens it produced (so they are
/// billed); the next request is served.
#[test]
fn a_sequence_longer_than_the_pool_ends_with_a_clear_error() {
    let tok = tokenizer();
    let prompt = tok.encode("The capital of France is").unwrap();
    let e = engine_on(load(ForwardPath::Tensor, 2 * BLOCK_POSITIONS), 1);
    let out = run_together(&e, std::slice::from_ref(&prompt), 3 * BLOCK_POSITIONS);
    let (ids, s) = &out[0];
    assert_eq!(s.finish_reason, FinishReason::Error);
    let err = s.error.as_deref().unwrap();
    assert!(err.contains("the KV cache is full"), "{err}");
    assert_eq!(prompt.len() + s.completion_tokens, 2 * BLOCK_POSITIONS + 1);
    assert_eq!(ids.len(), s.completion_tokens);
    // Its KV went to the prefix cache; the next request makes room there.
    let next = run_together(&e, &[prompt], 4);
    assert_eq!(
        next[0].1.finish_reason,
        FinishReason::Length,
        "{:?}",
        next[0].1
    );
}
