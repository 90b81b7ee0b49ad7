//! The model forward pass on the real model (SmolLM2-135M-Instruct Q4_1).

use candle_core::Device;
use mec_inference::gguf::{GgufFile, ModelError};
use mec_inference::model::{ForwardPath, KvCache, Model};
use mec_inference::tokenizer::Tokenizer;

fn load() -> (Model, Tokenizer) {
    let path = mec_inference::default_model_path();
    assert!(
        path.exists(),
        "{} is missing: run `cargo xtask setup`",
        path.display()
    );
    mec_inference::load(&path, &Device::Cpu).unwrap()
}

fn greedy(model: &Model, prompt: &[u32], n: usize) -> Vec<u32> {
    let mut cache = KvCache::new(model);
    let mut logits = model.forward(prompt, &mut cache).unwrap();
    let mut out = Vec::new();
    for _ in 0..n {
        let next = logits.argmax(0).unwrap().to_scalar::<u32>().unwrap();
        out.push(next);
        logits = model.forward(&[next], &mut cache).unwrap();
    }
    out
}

/// Logits after each of `tokens`, from candle-transformers' quantized llama on
/// the same file: a reference implementation to compare against.
fn reference_logits(tokens: &[u32]) -> Vec<Vec<f32>> {
    let path = mec_inference::default_model_path();
    let dev = Device::Cpu;
    let mut file = std::fs::File::open(&path).unwrap();
    let content = candle_core::quantized::gguf_file::Content::read(&mut file).unwrap();
    let mut m = candle_transformers::models::quantized_llama::ModelWeights::from_gguf(
        content, &mut file, &dev,
    )
    .unwrap();
    (0..tokens.len())
        .map(|i| {
            let input = candle_core::Tensor::new(&tokens[i..i + 1], &dev)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            m.forward(&input, i)
                .unwrap()
                .squeeze(0)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        })
        .collect()
}

fn max_abs_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn argmax(v: &[f32]) -> usize {
    v.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .unwrap()
        .0
}

#[test]
fn greedy_completion_of_a_fixed_prompt_is_the_expected_text() {
    let (model, tok) = load();
    let ids = tok.encode("The capital of France is").unwrap();
    assert_eq!(ids, vec![504, 3575, 282, 4649, 314]);
    let out = greedy(&model, &ids, 6);
    assert_eq!(tok.decode(&out, false).unwrap(), " Paris.\n\nThe United");
}

/// Teacher-forced over the same tokens, our logits stay close to the
/// reference's at every position. (Not token-for-token equality: our Q4_1
/// kernel rounds the activation block sums as llama.cpp does, candle slightly
/// differently, so near-ties may break the other way.)
#[test]
fn forward_matches_the_candle_transformers_reference() {
    let (model, tok) = load();
    let prompt = tok.encode("<|im_start|>user\nWrite a haiku about edge computing.<|im_end|>\n<|im_start|>assistant\n").unwrap();
    let mut tokens = prompt.clone();
    tokens.extend(greedy(&model, &prompt, 16));
    let reference = reference_logits(&tokens);
    let mut cache = KvCache::new(&model);
    let mut agree = 0;
    for (i, want) in reference.iter().enumerate() {
        let got = model
            .forward(&tokens[i..i + 1], &mut cache)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let spread = want.iter().fold(0f32, |a, v| a.max(v.abs()));
        let diff = got
            .iter()
            .zip(want)
            .fold(0f32, |a, (g, w)| a.max((g - w).abs()));
        eprintln!("position {i}: max logit difference {diff:.3} (scale {spread:.1})");
        assert!(
            diff <= 0.1 * spread,
            "position {i}: logits differ by {diff} (scale {spread})"
        );
        agree += usize::from(argmax(&got) == argmax(want));
    }
    assert!(
        agree * 10 >= reference.len() * 9,
        "argmax agrees at {agree} of {} positions",
        reference.len()
    );
}

/// The native CPU path (our kernels, fused projections) and the candle
/// tensor path (the GPU path, here on the CPU) compute the same model: the
/// same greedy text, logits close at the prompt.
#[test]
fn native_and_tensor_paths_agree() {
    let (native, tok) = load();
    assert_eq!(native.forward_path(), ForwardPath::Native);
    let mut file = GgufFile::open(&mec_inference::default_model_path()).unwrap();
    let tensor = Model::load_with(&mut file, &Device::Cpu, ForwardPath::Tensor).unwrap();
    let ids = tok.encode("The capital of France is").unwrap();
    let a = native.forward(&ids, &mut KvCache::new(&native)).unwrap();
    let b = tensor.forward(&ids, &mut KvCache::new(&tensor)).unwrap();
    // candle rounds each activation block's sum differently from llama.cpp
    // and us (see the kernel's test), and a different rounding of one
    // activation moves later ones across 30 layers: the same bound as
    // against candle-transformers.
    let spread = b
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let diff = max_abs_diff(&a, &b);
    eprintln!("max logit difference {diff:.3} (scale {spread:.1})");
    assert!(
        diff <= 0.1 * spread,
        "logits differ by {diff} (scale {spread})"
    );
    assert_eq!(greedy(&native, &ids, 6), greedy(&tensor, &ids, 6));
}

/// A KV cache belongs to the model it was made for.
#[test]
fn a_cache_of_the_other_path_is_refused() {
    let (native, _) = load();
    let mut file = GgufFile::open(&mec_inference::default_model_path()).unwrap();
    let tensor = Model::load_with(&mut file, &Device::Cpu, ForwardPath::Tensor).unwrap();
    let mut cache = KvCache::new(&tensor);
    assert!(native.forward(&[1, 2], &mut cache).is_err());
}

#[test]
fn out_of_vocabulary_ids_are_an_error() {
    let (model, _) = load();
    let vocab = model.config().vocab_size as u32;
    let mut cache = KvCache::new(&model);
    let err = model.forward(&[1, vocab], &mut cache).unwrap_err();
    assert!(err.to_string().contains("outside the vocabulary"), "{err}");
    assert!(cache.is_empty());
}

#[test]
fn prefill_at_once_equals_token_by_token() {
    let (model, tok) = load();
    // Long enough for the four-row kernel and the parallel attention.
    let ids = tok
        .encode(&"Edge boxes serve tokens close to the phone. ".repeat(6))
        .unwrap();
    assert!(ids.len() >= 50, "{} tokens", ids.len());
    let mut a = KvCache::new(&model);
    let whole = model.forward(&ids, &mut a).unwrap();
    let mut b = KvCache::new(&model);
    let mut step = None;
    for id in &ids {
        step = Some(model.forward(&[*id], &mut b).unwrap());
    }
    let step = step.unwrap();
    assert_eq!(a.len(), b.len());
    // The native kernels sum in the same order however many rows they
    // take, so the two are the same to the bit.
    assert_eq!(
        whole.to_vec1::<f32>().unwrap(),
        step.to_vec1::<f32>().unwrap()
    );
}

/// One batched decode step over three sequences at different positions
/// gives each the logits it gets alone, to the bit (the kernels sum in the
/// same order whatever the batch), and advances each cache by one.
#[test]
fn a_batched_step_equals_each_sequence_alone() {
    let (model, tok) = load();
    let prompts = [
        "The capital of France is",
        "One two three",
        "Edge computing means that the",
    ];
    let mut alone = Vec::new();
    let mut caches = Vec::new();
    let mut next = Vec::new();
    for p in prompts {
        let ids = tok.encode(p).unwrap();
        let mut cache = KvCache::new(&model);
        let l = model.forward(&ids, &mut cache).unwrap();
        let id = l.argmax(0).unwrap().to_scalar::<u32>().unwrap();
        let mut own = cache.clone();
        alone.push(
            model
                .forward(&[id], &mut own)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
        );
        caches.push(cache);
        next.push(id);
    }
    let lens: Vec<usize> = caches.iter().map(KvCache::len).collect();
    let mut steps: Vec<(u32, &mut KvCache)> = next.iter().copied().zip(caches.iter_mut()).collect();
    let batched = model.forward_batch(&mut steps).unwrap();
    assert_eq!(batched, alone);
    for (c, before) in caches.iter().zip(lens) {
        assert_eq!(c.len(), before + 1);
    }
}

/// A batch with one bad token is refused before anything runs.
#[test]
fn a_bad_token_in_a_batch_leaves_every_cache_as_it_was() {
    let (model, tok) = load();
    let ids = tok.encode("One two three").unwrap();
    let mut a = KvCache::new(&model);
    model.forward(&ids, &mut a).unwrap();
    let mut b = a.clone();
    let vocab = model.config().vocab_size as u32;
    let mut steps = vec![(504, &mut a), (vocab, &mut b)];
    assert!(model.forward_batch(&mut steps).is_err());
    assert_eq!((a.len(), b.len()), (ids.len(), ids.len()));
    // And `a` still runs on exactly as a fresh pass over the same tokens.
    let got = model.forward(&[504], &mut a).unwrap();
    let mut fresh2 = KvCache::new(&model);
    let mut with_next = ids.clone();
    with_next.push(504);
    let want_next = model.forward(&with_next, &mut fresh2).unwrap();
    assert_eq!(
        got.to_vec1::<f32>().unwrap(),
        want_next.to_vec1::<f32>().unwrap()
    );
}

#[test]
fn truncated_cache_reuses_a_prefix_exactly() {
    let (model, tok) = load();
    let ids = tok.encode("One two three four five six").unwrap();
    let mut cache = KvCache::new(&model);
    model.forward(&ids, &mut cache).unwrap();
    cache.truncate(3).unwrap();
    let reused = model.forward(&ids[3..], &mut cache).unwrap();
    let mut fresh = KvCache::new(&model);
    let full = model.forward(&ids, &mut fresh).unwrap();
    assert_eq!(
        reused.to_vec1::<f32>().unwrap(),
        full.to_vec1::<f32>().unwrap()
    );
}

#[test]
fn prompt_beyond_the_context_is_an_error() {
    let (model, _) = load();
    let mut cache = KvCache::new(&model);
    let too_long = vec![504u32; model.config().context_length + 1];
    assert!(model.forward(&too_long, &mut cache).is_err());
}

fn check_refused(bytes: &[u8], expect: impl Fn(&ModelError) -> bool, words: &str) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.gguf");
    std::fs::write(&path, bytes).unwrap();
    let err = GgufFile::open(&path).unwrap_err();
    assert!(expect(&err), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("bad.gguf") && msg.contains(words), "{msg}");
}

#[test]
fn bad_files_are_refused_with_the_file_and_the_reason() {
    check_refused(
        b"PK\x03\x04 this is a zip",
        |e| matches!(e, ModelError::NotGguf { .. }),
        "not a GGUF file",
    );
    check_refused(
        b"",
        |e| matches!(e, ModelError::NotGguf { .. }),
        "not a GGUF file",
    );
    let real = std::fs::read(mec_inference::default_model_path()).unwrap();
    check_refused(
        &real[..real.len() / 2],
        |e| matches!(e, ModelError::Truncated { .. }),
        "truncated",
    );
    check_refused(
        &real[..1000],
        |e| matches!(e, ModelError::Corrupt { .. } | ModelError::Truncated { .. }),
        "GGUF",
    );
    // The whole file, with the value of general.architecture changed from
    // "llama" to "llamb" (key, then a u32 type tag and a u64 length, then the value).
    let mut other = real.clone();
    let key = b"general.architecture";
    let at = other.windows(key.len()).position(|w| w == key).unwrap() + key.len() + 4 + 8;
    assert_eq!(&other[at..at + 5], b"llama");
    other[at + 4] = b'b';
    check_refused(
        &other,
        |e| matches!(e, ModelError::UnsupportedArchitecture { .. }),
        "unsupported architecture \"llamb\"",
    );
}
