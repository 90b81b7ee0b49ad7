//! Agreement between forward paths, measured the way inference engines
//! check one backend against another: a fixed text is teacher-forced (each
//! position sees the text's own previous tokens, never a sampled one), and
//! the logits after every token are compared.
//!
//! - **Top-1 agreement**: the share of positions where both paths rank the
//!   same token first. Greedy text is a poor check across backends: one
//!   near-tie that rounds the other way changes every token after it.
//! - **Largest logit difference**, beside the logits' spread.
//! - **Perplexity** of the text under each path; llama.cpp validates its
//!   backends by perplexity, and its figure for this text and model is kept
//!   in [`LLAMA_CPP_REFERENCE`] (`cargo xtask agreement-reference` remakes
//!   it).
//!
//! [`teacher_force`] runs the candidate the way serving runs it: the text's
//! head as prefill chunks, the rest as decode steps batched with a twin
//! sequence, so prefill, the paged cache and batching all take part.
//! The figures are plain functions of logits, tested without a model.

use serde::{Deserialize, Serialize};

use crate::model::{KvCache, Model};

/// The fixed text (315 tokens of plain English prose for SmolLM2's tokenizer).
pub const TEXT: &str = include_str!("text.txt");

/// llama.cpp's figures for [`TEXT`] on the default model, as JSON
/// ([`Reference`]): its tokens, the token it ranks first after each, and
/// its perplexity. Written by `cargo xtask agreement-reference`.
pub const LLAMA_CPP_REFERENCE: &str = include_str!("llamacpp.json");

/// A reference engine's figures for [`TEXT`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Reference {
    /// What produced it (engine and version).
    pub engine: String,
    /// SHA-256 of the model file it ran.
    pub model_sha256: String,
    /// The text's tokens, as the engine's tokenizer made them.
    pub tokens: Vec<u32>,
    /// `top1[i]`: the token ranked first after `tokens[..=i]`.
    pub top1: Vec<u32>,
    /// Perplexity of `tokens[1..]` given what precedes each.
    pub perplexity: f64,
}

impl Reference {
    /// The bundled llama.cpp reference.
    pub fn llama_cpp() -> Reference {
        serde_json::from_str(LLAMA_CPP_REFERENCE).expect("the bundled reference is valid JSON")
    }
}

/// Limits a candidate path must keep against the reference path.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Tolerance {
    /// Least share of positions with the same first-ranked token.
    pub min_top1_agreement: f64,
    /// Largest relative difference of perplexity, `|a - b| / b`.
    pub max_perplexity_rel_diff: f64,
    /// Largest logit difference as a share of the reference's spread
    /// (its largest absolute logit over the text).
    pub max_logit_diff_of_spread: f64,
}

/// The tolerance between our paths (and against llama.cpp): a Q4_1 model
/// with activations quantised to 8 bits on one path and not on the other
/// ranks near-ties differently at a few percent of positions; a bug (a
/// wrong RoPE variant, a mask off by one) drops agreement far below this
/// and moves perplexity by tens of percent.
pub const TOLERANCE: Tolerance = Tolerance {
    min_top1_agreement: 0.90,
    max_perplexity_rel_diff: 0.03,
    max_logit_diff_of_spread: 0.10,
};

/// The logits after every token of a teacher-forced text.
#[derive(Debug, Clone)]
pub struct Forced {
    /// `logits[i]`: after `tokens[..=i]`.
    pub logits: Vec<Vec<f32>>,
    /// The largest difference between the logits of the two sequences of
    /// the batched decode steps (the same tokens, so it must be 0).
    pub batch_twin_max_diff: f32,
}

/// Teacher-forces `tokens` through `model`: the first `prefill` tokens in
/// chunks of `chunk`, the rest one decode step at a time, batched with a
/// twin sequence fed the same tokens.
pub fn teacher_force(
    model: &Model,
    tokens: &[u32],
    prefill: usize,
    chunk: usize,
) -> candle_core::Result<Forced> {
    let prefill = prefill.clamp(1, tokens.len().max(1));
    let mut logits = Vec::with_capacity(tokens.len());
    let mut cache = KvCache::new(model);
    for part in tokens[..prefill.min(tokens.len())].chunks(chunk.max(1)) {
        logits.extend(model.forward_all(part, &mut cache)?);
    }
    let mut twin = cache.clone();
    let mut batch_twin_max_diff = 0f32;
    for &id in &tokens[prefill.min(tokens.len())..] {
        let mut steps = [(id, &mut cache), (id, &mut twin)];
        let mut out = model.forward_batch(&mut steps)?;
        let b = out.pop().expect("two rows");
        let a = out.pop().expect("two rows");
        batch_twin_max_diff = batch_twin_max_diff.max(max_abs_diff(&a, &b));
        logits.push(a);
    }
    Ok(Forced {
        logits,
        batch_twin_max_diff,
    })
}

/// The figures of a candidate against a reference.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Agreement {
    /// Positions compared.
    pub positions: usize,
    /// Share of positions with the same first-ranked token.
    pub top1_agreement: f64,
    /// The first position where they differ, if any.
    pub first_disagreement: Option<usize>,
    /// The largest absolute logit difference (`None` where the reference
    /// has no logits, as llama.cpp's does not).
    pub max_logit_diff: Option<f32>,
    /// The reference's largest absolute logit.
    pub logit_spread: Option<f32>,
    /// Perplexity of the text under the reference.
    pub perplexity_reference: f64,
    /// Perplexity under the candidate.
    pub perplexity_candidate: f64,
}

impl Agreement {
    /// `|candidate - reference| / reference` of perplexity.
    pub fn perplexity_rel_diff(&self) -> f64 {
        (self.perplexity_candidate - self.perplexity_reference).abs() / self.perplexity_reference
    }

    /// What is outside `tol`, in words (empty when all holds).
    pub fn failures(&self, tol: &Tolerance) -> Vec<String> {
        let mut out = Vec::new();
        if self.top1_agreement < tol.min_top1_agreement {
            out.push(format!(
                "top-1 agreement {:.1}% is under {:.0}% (first difference at position {})",
                self.top1_agreement * 100.0,
                tol.min_top1_agreement * 100.0,
                self.first_disagreement
                    .map_or("-".into(), |p| p.to_string()),
            ));
        }
        if self.perplexity_rel_diff() > tol.max_perplexity_rel_diff {
            out.push(format!(
                "perplexity {:.3} against {:.3}: {:.1}% apart, over {:.0}%",
                self.perplexity_candidate,
                self.perplexity_reference,
                self.perplexity_rel_diff() * 100.0,
                tol.max_perplexity_rel_diff * 100.0,
            ));
        }
        if let (Some(d), Some(s)) = (self.max_logit_diff, self.logit_spread) {
            if f64::from(d) > tol.max_logit_diff_of_spread * f64::from(s) {
                out.push(format!(
                    "a logit differs by {d:.3}, over {:.0}% of the spread {s:.3}",
                    tol.max_logit_diff_of_spread * 100.0,
                ));
            }
        }
        out
    }
}

/// Compares candidate logits with reference logits over `tokens` (both
/// teacher-forced on them).
pub fn compare(reference: &[Vec<f32>], candidate: &[Vec<f32>], tokens: &[u32]) -> Agreement {
    let positions = reference.len().min(candidate.len());
    let reference_top1: Vec<u32> = reference[..positions].iter().map(|l| argmax(l)).collect();
    let mut a = compare_top1(
        &reference_top1,
        perplexity(reference, tokens),
        candidate,
        tokens,
    );
    let mut max = 0f32;
    let mut spread = 0f32;
    for (r, c) in reference.iter().zip(candidate) {
        max = max.max(max_abs_diff(r, c));
        spread = r.iter().fold(spread, |m, x| m.max(x.abs()));
    }
    a.max_logit_diff = Some(max);
    a.logit_spread = Some(spread);
    a
}

/// Compares candidate logits with a reference known only by its
/// first-ranked tokens and its perplexity (llama.cpp's figures).
pub fn compare_top1(
    reference_top1: &[u32],
    reference_perplexity: f64,
    candidate: &[Vec<f32>],
    tokens: &[u32],
) -> Agreement {
    let positions = reference_top1.len().min(candidate.len());
    let mut same = 0;
    let mut first_disagreement = None;
    for (i, (&r, c)) in reference_top1.iter().zip(candidate).enumerate() {
        if argmax(c) == r {
            same += 1;
        } else if first_disagreement.is_none() {
            first_disagreement = Some(i);
        }
    }
    Agreement {
        positions,
        top1_agreement: if positions == 0 {
            0.0
        } else {
            same as f64 / positions as f64
        },
        first_disagreement,
        max_logit_diff: None,
        logit_spread: None,
        perplexity_reference: reference_perplexity,
        perplexity_candidate: perplexity(candidate, tokens),
    }
}

/// Perplexity of `tokens[1..]` where `logits[i]` predicts `tokens[i + 1]`:
/// `exp` of the mean negative log-likelihood (log-softmax in f64).
pub fn perplexity(logits: &[Vec<f32>], tokens: &[u32]) -> f64 {
    let mut nll = 0f64;
    let mut n = 0usize;
    for (row, &next) in logits.iter().zip(tokens.iter().skip(1)) {
        let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) as f64;
        let sum: f64 = row.iter().map(|&x| (x as f64 - max).exp()).sum();
        let log_p = row[next as usize] as f64 - max - sum.ln();
        nll -= log_p;
        n += 1;
    }
    if n == 0 {
        return f64::NAN;
    }
    (nll / n as f64).exp()
}

/// The index of the largest logit (the first one on a tie).
pub fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in row.iter().enumerate() {
        if x > row[best] {
            best = i;
        }
    }
    best as u32
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn perplexity_of_a_uniform_guess_is_the_vocabulary_size() {
        let logits = vec![vec![0.0f32; 8]; 4];
        let p = perplexity(&logits, &[1, 2, 3, 4, 5]);
        assert!((p - 8.0).abs() < 1e-9, "{p}");
    }

    #[test]
    fn perplexity_of_a_sure_right_guess_is_one_and_of_a_wrong_one_is_large() {
        let mut sure = vec![-30.0f32; 4];
        sure[2] = 30.0;
        assert!((perplexity(&[sure.clone()], &[0, 2]) - 1.0).abs() < 1e-9);
        assert!(perplexity(&[sure], &[0, 1]) > 1e20);
    }

    #[test]
    fn agreement_counts_first_ranked_tokens_and_finds_the_first_difference() {
        let row = |best: usize| {
            let mut r = vec![0.0f32; 4];
            r[best] = 1.0;
            r
        };
        let reference = vec![row(1), row(2), row(3), row(0)];
        let candidate = vec![row(1), row(2), row(0), row(0)];
        let a = compare(&reference, &candidate, &[0, 1, 2, 3, 0]);
        assert_eq!(a.positions, 4);
        assert_eq!(a.top1_agreement, 0.75);
        assert_eq!(a.first_disagreement, Some(2));
        assert_eq!(a.max_logit_diff, Some(1.0));
        assert_eq!(a.logit_spread, Some(1.0));
        let fails = a.failures(&TOLERANCE);
        assert!(
            fails.iter().any(|f| f.contains("top-1 agreement 75.0%")),
            "{fails:?}"
        );
        assert!(
            fails.iter().any(|f| f.contains("a logit differs by 1.000")),
            "{fails:?}"
        );

        let same = compare(&reference, &reference, &[0, 1, 2, 3, 0]);
        assert_eq!(same.top1_agreement, 1.0);
        assert_eq!(same.first_disagreement, None);
        assert!(same.failures(&TOLERANCE).is_empty());
    }

    #[test]
    fn a_perplexity_apart_is_a_failure_that_says_by_how_much() {
        let a = Agreement {
            positions: 10,
            top1_agreement: 1.0,
            first_disagreement: None,
            max_logit_diff: None,
            logit_spread: None,
            perplexity_reference: 10.0,
            perplexity_candidate: 10.5,
        };
        let fails = a.failures(&TOLERANCE);
        assert_eq!(fails.len(), 1, "{fails:?}");
        assert!(fails[0].contains("5.0% apart"), "{fails:?}");
    }

    #[test]
    fn the_bundled_reference_matches_its_text_length() {
        let r = Reference::llama_cpp();
        assert_eq!(r.tokens.len(), r.top1.len());
        assert!(r.tokens.len() > 250, "{}", r.tokens.len());
        assert!(
            r.perplexity > 1.0 && r.perplexity < 100.0,
            "{}",
            r.perplexity
        );
    }
}
