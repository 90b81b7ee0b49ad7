//! Local inference runtime (issue 3, not built yet).
//!
//! This crate will load llama-family GGUF models with candle (CPU by default,
//! CUDA behind a `cuda` feature), tokenize with the GGUF's own byte-level BPE
//! and chat template, sample (greedy, temperature, top-p/k, seed, stop
//! sequences), stream tokens with exact counts, cancel within one decode step,
//! schedule concurrent requests over slots with their own KV caches and a
//! prefix cache, and report GPUs through NVML (none means CPU). It knows
//! nothing of HTTP or billing.
#![warn(missing_docs)]
