//! Choosing the next token from logits: greedy, or temperature with top-k and
//! top-p; a repetition penalty, OpenAI's frequency and presence penalties and
//! logit bias; log-probabilities; and a seed for reproducible runs.
//!
//! The order, for each token: the constraint's mask (the engine's), then the
//! logit bias, the repetition penalty, the frequency and presence penalties.
//! Log-probabilities are taken there, from the adjusted logits, before
//! temperature, top-k and top-p (which only choose among them): a greedy
//! choice's logprob is the top one. llama.cpp's server reports the same
//! point unless asked for post-sampling probabilities.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// How to pick tokens and when to stop. The defaults are greedy, unbounded.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 is greedy; otherwise logits are divided by it (0 < t <= 2).
    pub temperature: f32,
    /// Nucleus sampling: keep the smallest set of tokens whose probability
    /// reaches this (0 < p <= 1; 1 keeps all).
    pub top_p: f32,
    /// Keep only the k most likely tokens (0: no limit).
    pub top_k: usize,
    /// Seed of the random generator; the same seed and inputs give the same output.
    pub seed: Option<u64>,
    /// Penalty for tokens already in the prompt or completion (1: none; > 1 discourages).
    pub repetition_penalty: f32,
    /// OpenAI's: subtracted from a token's logit once per time it is already
    /// in the completion (−2 to 2).
    pub frequency_penalty: f32,
    /// OpenAI's: subtracted once from the logit of a token already in the
    /// completion (−2 to 2).
    pub presence_penalty: f32,
    /// Added to the logits of these token ids (−100 to 100; −100 bans).
    pub logit_bias: Vec<(u32, f32)>,
    /// Log-probabilities: `Some(k)` gives the chosen token's and the `k`
    /// most likely (0 to 20).
    pub logprobs: Option<usize>,
    /// Most completion tokens; `None`: up to the context.
    pub max_tokens: Option<usize>,
    /// Text that ends the completion when generated (not included in the output).
    pub stop: Vec<String>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: None,
            repetition_penalty: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            logit_bias: Vec::new(),
            logprobs: None,
            max_tokens: None,
            stop: Vec::new(),
        }
    }
}

/// Most alternatives `logprobs` may ask for (OpenAI's limit).
pub const MAX_TOP_LOGPROBS: usize = 20;

/// The log-probability of one token, and of the most likely alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    /// The token chosen.
    pub id: u32,
    /// Its natural log-probability.
    pub logprob: f32,
    /// The most likely tokens and theirs, most likely first.
    pub top: Vec<(u32, f32)>,
}

/// A parameter out of range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{param}: {reason}")]
pub struct ParamError {
    /// Which parameter.
    pub param: &'static str,
    /// What is wrong.
    pub reason: String,
}

impl SamplingParams {
    /// Checks ranges; the engine refuses a request that fails this.
    pub fn validate(&self) -> Result<(), ParamError> {
        let err = |param, reason: &str| {
            Err(ParamError {
                param,
                reason: reason.into(),
            })
        };
        if !(0.0..=2.0).contains(&self.temperature) || self.temperature.is_nan() {
            return err("temperature", "must be between 0 and 2");
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return err("top_p", "must be greater than 0 and at most 1");
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return err("repetition_penalty", "must be a positive number");
        }
        if !(-2.0..=2.0).contains(&self.frequency_penalty) {
            return err("frequency_penalty", "must be between -2 and 2");
        }
        if !(-2.0..=2.0).contains(&self.presence_penalty) {
            return err("presence_penalty", "must be between -2 and 2");
        }
        if self
            .logit_bias
            .iter()
            .any(|(_, b)| !(-100.0..=100.0).contains(b))
        {
            return err("logit_bias", "biases must be between -100 and 100");
        }
        if self.logprobs.is_some_and(|k| k > MAX_TOP_LOGPROBS) {
            return err("top_logprobs", "must be between 0 and 20");
        }
        if self.max_tokens == Some(0) {
            return err("max_tokens", "must be at least 1");
        }
        if self.stop.iter().any(|s| s.is_empty()) {
            return err("stop", "stop sequences must not be empty");
        }
        if self.stop.len() > 4 {
            return err("stop", "at most 4 stop sequences");
        }
        Ok(())
    }
}

/// Picks tokens for one request.
#[derive(Debug)]
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
}

impl Sampler {
    /// A sampler for `params` (seeded from the OS when no seed is given).
    pub fn new(params: SamplingParams) -> Sampler {
        let rng = match params.seed {
            Some(s) => StdRng::seed_from_u64(s),
            None => StdRng::from_os_rng(),
        };
        Sampler { params, rng }
    }

    /// The next token from `logits` (already masked by a constraint, if
    /// any), given the ids seen so far, of which the first `prompt_len` are
    /// the prompt; with its log-probabilities when they were asked for.
    pub fn sample(
        &mut self,
        logits: &mut [f32],
        history: &[u32],
        prompt_len: usize,
    ) -> (u32, Option<TokenLogprob>) {
        self.adjust(logits, history, prompt_len);
        let logprob = self.params.logprobs.map(|k| logprobs(logits, k));
        let id = self.pick(logits);
        let logprob = logprob.map(|(lse, top)| TokenLogprob {
            id,
            logprob: logits[id as usize] - lse,
            top,
        });
        (id, logprob)
    }

    /// Logit bias and penalties, in place.
    fn adjust(&self, logits: &mut [f32], history: &[u32], prompt_len: usize) {
        for &(id, bias) in &self.params.logit_bias {
            if let Some(l) = logits.get_mut(id as usize) {
                *l += bias;
            }
        }
        if self.params.repetition_penalty != 1.0 {
            let p = self.params.repetition_penalty;
            let mut seen = history.to_vec();
            seen.sort_unstable();
            seen.dedup();
            for &id in &seen {
                if let Some(l) = logits.get_mut(id as usize) {
                    *l = if *l > 0.0 { *l / p } else { *l * p };
                }
            }
        }
        let (freq, presence) = (self.params.frequency_penalty, self.params.presence_penalty);
        if freq != 0.0 || presence != 0.0 {
            let mut counts: Vec<u32> = history[prompt_len.min(history.len())..].to_vec();
            counts.sort_unstable();
            for run in counts.chunk_by(|a, b| a == b) {
                if let Some(l) = logits.get_mut(run[0] as usize) {
                    *l -= freq * run.len() as f32 + presence;
                }
            }
        }
    }

    /// Greedy, or a draw after temperature, top-k and top-p.
    fn pick(&mut self, logits: &[f32]) -> u32 {
        if self.params.temperature == 0.0 {
            return argmax(logits);
        }
        let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
        idx.sort_unstable_by(|&a, &b| {
            logits[b as usize]
                .total_cmp(&logits[a as usize])
                .then(a.cmp(&b))
        });
        if self.params.top_k > 0 {
            idx.truncate(self.params.top_k);
        }
        let max = logits[idx[0] as usize];
        let t = self.params.temperature;
        let mut probs: Vec<f32> = idx
            .iter()
            .map(|&i| ((logits[i as usize] - max) / t).exp())
            .collect();
        let sum: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= sum);
        if self.params.top_p < 1.0 {
            let mut acc = 0.0;
            let mut keep = probs.len();
            for (n, p) in probs.iter().enumerate() {
                acc += p;
                if acc >= self.params.top_p {
                    keep = n + 1;
                    break;
                }
            }
            probs.truncate(keep);
            idx.truncate(keep);
        }
        let total: f32 = probs.iter().sum();
        let mut r = self.rng.random::<f32>() * total;
        for (p, &i) in probs.iter().zip(&idx) {
            r -= p;
            if r <= 0.0 {
                return i;
            }
        }
        // Rounding left a sliver: the least likely token still possible
        // (never one the mask or top-p ruled out).
        probs
            .iter()
            .zip(&idx)
            .rev()
            .find(|(p, _)| **p > 0.0)
            .map_or(idx[0], |(_, &i)| i)
    }
}

/// The log of the sum of the exponentials of `logits` (the softmax's
/// normaliser) and the `k` most likely ids with their log-probabilities.
fn logprobs(logits: &[f32], k: usize) -> (f32, Vec<(u32, f32)>) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&l| f64::from(l - max).exp()).sum();
    let lse = max + sum.ln() as f32;
    let mut top: Vec<(u32, f32)> = Vec::with_capacity(k + 1);
    if k > 0 {
        for (i, &l) in logits.iter().enumerate() {
            if top.len() == k && l <= top[k - 1].1 {
                continue;
            }
            let at = top.partition_point(|&(_, t)| t >= l);
            top.insert(at, (i as u32, l));
            top.truncate(k);
        }
    }
    let top = top
        .into_iter()
        .filter(|(_, l)| l.is_finite())
        .map(|(i, l)| (i, l - lse))
        .collect();
    (lse, top)
}

fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logits() -> Vec<f32> {
        vec![0.1, 2.0, 1.9, -1.0, 0.5]
    }

    #[test]
    fn greedy_takes_the_largest() {
        assert_eq!(
            Sampler::new(SamplingParams::default())
                .sample(&mut logits(), &[], 0)
                .0,
            1
        );
    }

    #[test]
    fn repetition_penalty_moves_greedy_off_a_seen_token() {
        let params = SamplingParams {
            repetition_penalty: 1.5,
            ..Default::default()
        };
        assert_eq!(Sampler::new(params).sample(&mut logits(), &[1], 0).0, 2);
    }

    #[test]
    fn same_seed_same_choices_and_top_k_limits_them() {
        let params = SamplingParams {
            temperature: 1.0,
            top_k: 2,
            seed: Some(7),
            ..Default::default()
        };
        let draw = |p: &SamplingParams| {
            let mut s = Sampler::new(p.clone());
            (0..200)
                .map(|_| s.sample(&mut logits(), &[], 0).0)
                .collect::<Vec<_>>()
        };
        let a = draw(&params);
        assert_eq!(a, draw(&params));
        assert!(a.iter().all(|&t| t == 1 || t == 2));
        assert!(a.contains(&1) && a.contains(&2));
    }

    #[test]
    fn tiny_top_p_is_greedy() {
        let params = SamplingParams {
            temperature: 1.0,
            top_p: 0.01,
            seed: Some(1),
            ..Default::default()
        };
        let mut s = Sampler::new(params);
        assert!((0..50).all(|_| s.sample(&mut logits(), &[], 0).0 == 1));
    }

    #[test]
    fn frequency_and_presence_penalties_count_the_completion_only() {
        // Token 1 leads by 0.1. In the prompt only: no penalty.
        let params = SamplingParams {
            frequency_penalty: 0.2,
            ..Default::default()
        };
        assert_eq!(
            Sampler::new(params.clone())
                .sample(&mut logits(), &[1, 1], 2)
                .0,
            1
        );
        // Once in the completion: 2.0 - 0.2 < 1.9.
        assert_eq!(Sampler::new(params).sample(&mut logits(), &[1], 0).0, 2);
        let params = SamplingParams {
            presence_penalty: 0.05,
            ..Default::default()
        };
        // Presence counts once: 2.0 - 0.05 > 1.9, however many times.
        assert_eq!(
            Sampler::new(params).sample(&mut logits(), &[1, 1, 1], 0).0,
            1
        );
    }

    #[test]
    fn logit_bias_bans_and_favours() {
        let params = SamplingParams {
            logit_bias: vec![(1, -100.0), (4, 5.0)],
            ..Default::default()
        };
        assert_eq!(Sampler::new(params).sample(&mut logits(), &[], 0).0, 4);
    }

    #[test]
    fn logprobs_are_the_log_softmax_and_greedy_takes_the_top_one() {
        let params = SamplingParams {
            logprobs: Some(3),
            ..Default::default()
        };
        let (id, lp) = Sampler::new(params).sample(&mut logits(), &[], 0);
        let lp = lp.unwrap();
        assert_eq!(id, 1);
        assert_eq!(lp.top.len(), 3);
        assert_eq!(lp.top[0], (1, lp.logprob));
        assert_eq!(lp.top[1].0, 2);
        assert_eq!(lp.top[2].0, 4);
        let total: f32 = logits().iter().map(|l| l.exp()).sum();
        assert!((lp.logprob - (2.0 - total.ln())).abs() < 1e-5);
        // A masked token is never an alternative.
        let params = SamplingParams {
            logprobs: Some(5),
            ..Default::default()
        };
        let mut masked = logits();
        masked[2] = f32::NEG_INFINITY;
        let (_, lp) = Sampler::new(params).sample(&mut masked, &[], 0);
        assert_eq!(lp.unwrap().top.len(), 4);
    }

    #[test]
    fn out_of_range_parameters_are_named() {
        for (p, name) in [
            (
                SamplingParams {
                    temperature: 3.0,
                    ..Default::default()
                },
                "temperature",
            ),
            (
                SamplingParams {
                    top_p: 0.0,
                    ..Default::default()
                },
                "top_p",
            ),
            (
                SamplingParams {
                    max_tokens: Some(0),
                    ..Default::default()
                },
                "max_tokens",
            ),
            (
                SamplingParams {
                    repetition_penalty: 0.0,
                    ..Default::default()
                },
                "repetition_penalty",
            ),
            (
                SamplingParams {
                    stop: vec![String::new()],
                    ..Default::default()
                },
                "stop",
            ),
            (
                SamplingParams {
                    frequency_penalty: 2.5,
                    ..Default::default()
                },
                "frequency_penalty",
            ),
            (
                SamplingParams {
                    logit_bias: vec![(0, 101.0)],
                    ..Default::default()
                },
                "logit_bias",
            ),
            (
                SamplingParams {
                    logprobs: Some(21),
                    ..Default::default()
                },
                "top_logprobs",
            ),
        ] {
            assert_eq!(p.validate().unwrap_err().param, name);
        }
    }
}
