//! The second model for tests (issue 25): the real model's weights written
//! again as Q8_0, a different file that loads and answers like the first.

use candle_core::quantized::{gguf_file, GgmlDType};
use candle_core::Device;
use mec_inference::model::KvCache;
use mec_inference::requantize::{requantize, RequantizeError};

fn argmax(v: &[f32]) -> usize {
    (0..v.len()).fold(0, |b, i| if v[i] > v[b] { i } else { b })
}

#[test]
fn the_model_requantised_to_q8_0_is_another_file_that_answers_the_same() {
    let src = mec_inference::default_model_path();
    let dir = tempfile::tempdir().unwrap();
    let dst = dir.path().join("smollm2-q8_0.gguf");
    let r = requantize(&src, &dst, GgmlDType::Q8_0).unwrap();
    assert!(r.converted > 100, "{r:?}");
    assert!(!dir.path().join("smollm2-q8_0.gguf.partial").exists());
    // Q8_0 keeps 34 bytes per 32 weights where Q4_1 keeps 20 (the token
    // embedding, already Q8_0, is copied): a larger file.
    let src_bytes = std::fs::metadata(&src).unwrap().len();
    assert!(r.file_bytes > src_bytes * 13 / 10, "{r:?} vs {src_bytes}");
    let mut f = std::fs::File::open(&dst).unwrap();
    let content = gguf_file::Content::read(&mut f).unwrap();
    assert_eq!(
        content.tensor_infos["blk.0.attn_q.weight"].ggml_dtype,
        GgmlDType::Q8_0
    );
    assert!(matches!(
        content.metadata.get("general.file_type"),
        Some(gguf_file::Value::U32(7))
    ));
    // It loads through the one loader, and the next token is the same.
    let (q41, tok) = mec_inference::load(&src, &Device::Cpu).unwrap();
    let (q80, _) = mec_inference::load(&dst, &Device::Cpu).unwrap();
    let ids = tok.encode("The capital of France is").unwrap();
    let next = |m: &mec_inference::model::Model| {
        let l = m
            .forward(&ids, &mut KvCache::new(m))
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        argmax(&l) as u32
    };
    let (a, b) = (next(&q41), next(&q80));
    assert_eq!(a, b);
    assert_eq!(tok.decode(&[b], true).unwrap(), " Paris");
}

#[test]
fn requantising_a_missing_file_or_to_an_unwritten_format_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let e = requantize(
        &dir.path().join("nope.gguf"),
        &dir.path().join("out.gguf"),
        GgmlDType::Q8_0,
    )
    .unwrap_err();
    assert!(matches!(e, RequantizeError::Read { .. }), "{e}");
    let e = requantize(
        &mec_inference::default_model_path(),
        &dir.path().join("out.gguf"),
        GgmlDType::F16,
    )
    .unwrap_err();
    assert!(matches!(e, RequantizeError::Unsupported(_)), "{e}");
    assert!(!dir.path().join("out.gguf").exists());
}
