//! Synthetic models: written with the default model's tokenizer, loaded by
//! the same loader as any GGUF, and run on both forward paths.

use candle_core::Device;
use mec_inference::gguf::GgufFile;
use mec_inference::model::{ForwardPath, KvCache, Model};
use mec_inference::synthetic;

#[test]
fn a_synthetic_model_loads_and_runs_on_both_paths_with_the_real_tokenizer() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("tiny.gguf");
    let shape = synthetic::shape("tiny").unwrap();
    let w = synthetic::write(&shape, &mec_inference::default_model_path(), &out, 7).unwrap();
    assert_eq!(w.file_bytes, std::fs::metadata(&out).unwrap().len());
    assert!(!dir.path().join("tiny.gguf.partial").exists());

    let (model, tokenizer) = mec_inference::load(&out, &Device::Cpu).unwrap();
    let c = model.config();
    assert_eq!(
        (c.n_layer, c.n_head, c.n_kv_head, c.vocab_size),
        (2, 4, 2, 49152)
    );
    let ids = tokenizer.encode("The harbour town woke slowly.").unwrap();
    let native = model
        .forward(&ids, &mut KvCache::new(&model))
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert!(native.iter().all(|x| x.is_finite()));
    let spread = native.iter().fold(0f32, |m, x| m.max(x.abs()));
    assert!(spread > 0.0, "the logits are all zero");

    let mut file = GgufFile::open(&out).unwrap();
    let tensor = Model::load_with_kv(&mut file, &Device::Cpu, ForwardPath::Tensor, 256).unwrap();
    let t = tensor
        .forward(&ids, &mut KvCache::new(&tensor))
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let diff = t
        .iter()
        .zip(&native)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(
        diff <= 0.1 * spread,
        "the paths differ by {diff} of {spread}"
    );

    // The same seed gives the same file; another seed another one.
    let again = dir.path().join("again.gguf");
    synthetic::write(&shape, &mec_inference::default_model_path(), &again, 7).unwrap();
    let same = std::fs::read(&out).unwrap() == std::fs::read(&again).unwrap();
    assert!(same, "the same seed gave another file");
    synthetic::write(&shape, &mec_inference::default_model_path(), &again, 8).unwrap();
    let same = std::fs::read(&out).unwrap() == std::fs::read(&again).unwrap();
    assert!(!same, "another seed gave the same file");
}

#[test]
fn a_tokenizer_source_that_is_not_gguf_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("not.gguf");
    std::fs::write(&bad, b"hello").unwrap();
    let shape = synthetic::shape("tiny").unwrap();
    let e = synthetic::write(&shape, &bad, &dir.path().join("out.gguf"), 1).unwrap_err();
    assert!(e.to_string().contains("not.gguf"), "{e}");
    assert!(!dir.path().join("out.gguf").exists());
}
