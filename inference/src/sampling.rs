//! Choosing the next token from logits: greedy, or temperature with top-k and
//! top-p, a repetition penalty, and a seed for reproducible runs.

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
            max_tokens: None,
            stop: Vec::new(),
        }
    }
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

    /// The next token from `logits`, given the ids seen so far (for the penalty).
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
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
        *idx.last().unwrap()
    }
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
            Sampler::new(SamplingParams::default()).sample(&mut logits(), &[]),
            1
        );
    }

    #[test]
    fn repetition_penalty_moves_greedy_off_a_seen_token() {
        let params = SamplingParams {
            repetition_penalty: 1.5,
            ..Default::default()
        };
        assert_eq!(Sampler::new(params).sample(&mut logits(), &[1]), 2);
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
                .map(|_| s.sample(&mut logits(), &[]))
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
        assert!((0..50).all(|_| s.sample(&mut logits(), &[]) == 1));
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
        ] {
            assert_eq!(p.validate().unwrap_err().param, name);
        }
    }
}
