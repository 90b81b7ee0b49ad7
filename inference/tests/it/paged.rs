//! The tensor path (the GPU's) on candle's CPU backend: batched decoding
//! over the paged KV cache, held to the native path and to itself.

use candle_core::Device;
use mec_inference::gguf::GgufFile;
use mec_inference::model::{ForwardPath, KvCache, Model, BLOCK_POSITIONS};
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
