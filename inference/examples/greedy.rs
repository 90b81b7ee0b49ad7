//! Greedy generation from the default model, with rough timings (a developer's
//! probe until `edge-agent generate` exists). `cargo run --release -p
//! mec-inference --example greedy -- "your question"` (prefix `raw:` to skip
//! the chat template).

use mec_inference::model::KvCache;
use mec_inference::tokenizer::ChatMessage;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = mec_inference::default_model_path();
    let (model, tok) = mec_inference::load(&path, &candle_core::Device::Cpu)?;
    let arg = std::env::args()
        .nth(1)
        .unwrap_or("What is the capital of France?".into());
    let prompt = match arg.strip_prefix("raw:") {
        Some(r) => r.to_string(),
        None => tok.apply_chat_template(&[ChatMessage::user(arg)])?,
    };
    let ids = tok.encode(&prompt)?;
    let mut cache = KvCache::new(&model);
    let t0 = std::time::Instant::now();
    let mut logits = model.forward(&ids, &mut cache)?;
    let ttft = t0.elapsed();
    let mut out = vec![];
    let t1 = std::time::Instant::now();
    for _ in 0..60 {
        let next = logits.argmax(0)?.to_scalar::<u32>()?;
        if tok.stop_ids().contains(&next) {
            break;
        }
        out.push(next);
        logits = model.forward(&[next], &mut cache)?;
    }
    let dt = t1.elapsed();
    println!("{}", tok.decode(&out, true)?);
    eprintln!(
        "prompt {} tokens, prefill {:?} ({:.1} tok/s); decode {} tokens at {:.1} tok/s",
        ids.len(),
        ttft,
        ids.len() as f64 / ttft.as_secs_f64(),
        out.len(),
        out.len() as f64 / dt.as_secs_f64()
    );
    Ok(())
}
