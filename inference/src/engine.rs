//! The generation engine: a bounded queue, fair across subscribers, feeding
//! N slots. Each slot runs on a thread of its own (outside any async
//! runtime), with its own KV cache; finished sequences leave their KV in a
//! shared prefix cache that later prompts with the same beginning reuse.
//!
//! A request yields a stream of [`Delta`]s and, separately, one [`Summary`].
//! The summary always arrives, even when the caller dropped the stream (the
//! client went away), so the tokens computed can be billed.
//!
//! Counting rule: `completion_tokens` counts every token the model produced,
//! including the end-of-turn token that ended it (it was computed like any
//! other); a stop *sequence*'s tokens count too, though its text is cut.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use crate::model::{KvCache, Model};
use crate::sampling::{ParamError, Sampler, SamplingParams};
use crate::tokenizer::{TextStream, Tokenizer};

/// Engine settings.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Concurrent sequences (each with its own KV cache and thread).
    pub slots: usize,
    /// Requests waiting for a slot; beyond it, `submit` answers `Overloaded`.
    pub queue_capacity: usize,
    /// Tokens of KV kept in the prefix cache across all entries.
    pub prefix_cache_tokens: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            slots: 2,
            queue_capacity: 64,
            prefix_cache_tokens: 16_384,
        }
    }
}

/// Why a request was refused before it ran.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    /// The queue is full (the API answers 503).
    #[error("overloaded: {0} requests are already waiting")]
    Overloaded(usize),
    /// The prompt leaves no room for one completion token.
    #[error("the prompt has {prompt} tokens; the context holds {context}")]
    PromptTooLong {
        /// Prompt tokens.
        prompt: usize,
        /// Context length.
        context: usize,
    },
    /// An empty prompt.
    #[error("the prompt is empty")]
    EmptyPrompt,
    /// A sampling parameter out of range.
    #[error(transparent)]
    Param(#[from] ParamError),
    /// The engine is shutting down.
    #[error("the engine is shutting down")]
    ShuttingDown,
}

/// How a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// End of turn or a stop sequence.
    Stop,
    /// `max_tokens` or the context was reached.
    Length,
    /// The caller cancelled or went away.
    Cancelled,
    /// The forward pass failed.
    Error,
}

/// New text and the token ids that made it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delta {
    /// Text (may be empty while a character or a possible stop sequence is incomplete).
    pub text: String,
    /// Ids produced since the previous delta.
    pub token_ids: Vec<u32>,
}

/// The counts of one finished request: what the bill is made of.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Summary {
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Of them, served from the prefix cache.
    pub cached_prompt_tokens: usize,
    /// Completion tokens produced (see the module docs for the counting rule).
    pub completion_tokens: usize,
    /// Why it ended.
    pub finish_reason: FinishReason,
    /// From submission to the first completion token (zero when none).
    pub ttft: Duration,
    /// From the first token to the end.
    pub decode_time: Duration,
    /// Time waiting for a slot.
    pub queue_time: Duration,
    /// The error, when `finish_reason` is `Error`.
    pub error: Option<String>,
}

/// A request.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    /// Prompt token ids (already templated).
    pub prompt: Vec<u32>,
    /// Sampling and stopping.
    pub params: SamplingParams,
    /// Who the request is for: the queue is round-robin between subscribers.
    pub subscriber: String,
}

/// What `submit` returns: the stream, the summary, and a way to cancel.
#[derive(Debug)]
pub struct Generation {
    /// Text as it is produced; dropping it cancels the request.
    pub deltas: mpsc::UnboundedReceiver<Delta>,
    /// The counts, sent once at the end, whatever the end.
    pub summary: oneshot::Receiver<Summary>,
    /// Set to stop generation at the next step.
    pub cancel: Arc<AtomicBool>,
}

struct Job {
    req: GenerateRequest,
    submitted: Instant,
    deltas: mpsc::UnboundedSender<Delta>,
    summary: oneshot::Sender<Summary>,
    cancel: Arc<AtomicBool>,
}

#[derive(Default)]
struct Queue {
    per_subscriber: HashMap<String, VecDeque<Job>>,
    order: VecDeque<String>,
    len: usize,
    closed: bool,
}

impl Queue {
    fn push(&mut self, job: Job) {
        let q = self
            .per_subscriber
            .entry(job.req.subscriber.clone())
            .or_default();
        if q.is_empty() {
            self.order.push_back(job.req.subscriber.clone());
        }
        q.push_back(job);
        self.len += 1;
    }

    /// Round robin: one job from the subscriber whose turn it is.
    fn pop(&mut self) -> Option<Job> {
        let sub = self.order.pop_front()?;
        let q = self.per_subscriber.get_mut(&sub)?;
        let job = q.pop_front()?;
        if q.is_empty() {
            self.per_subscriber.remove(&sub);
        } else {
            self.order.push_back(sub);
        }
        self.len -= 1;
        Some(job)
    }
}

struct PrefixEntry {
    tokens: Vec<u32>,
    cache: KvCache,
    last_used: u64,
}

#[derive(Default)]
struct PrefixCache {
    entries: Vec<PrefixEntry>,
    clock: u64,
}

impl PrefixCache {
    /// The cache sharing the longest prefix with `prompt`, cut to that prefix,
    /// leaving at least one prompt token to run (it yields the first logits).
    fn lookup(&mut self, prompt: &[u32]) -> Option<(usize, KvCache)> {
        self.clock += 1;
        let clock = self.clock;
        let (best, len) = self
            .entries
            .iter_mut()
            .map(|e| {
                let n = e
                    .tokens
                    .iter()
                    .zip(prompt)
                    .take_while(|(a, b)| a == b)
                    .count();
                (e, n.min(prompt.len() - 1))
            })
            .max_by_key(|(_, n)| *n)?;
        if len == 0 {
            return None;
        }
        best.last_used = clock;
        let mut cache = best.cache.clone();
        cache.truncate(len).ok()?;
        Some((len, cache))
    }

    fn insert(&mut self, tokens: Vec<u32>, cache: KvCache, budget: usize) {
        if tokens.len() > budget || tokens.is_empty() {
            return;
        }
        self.clock += 1;
        // An entry that is a prefix of the new one adds nothing.
        self.entries
            .retain(|e| !(e.tokens.len() <= tokens.len() && tokens.starts_with(&e.tokens)));
        self.entries.push(PrefixEntry {
            tokens,
            cache,
            last_used: self.clock,
        });
        while self.entries.iter().map(|e| e.tokens.len()).sum::<usize>() > budget {
            let oldest = self
                .entries
                .iter()
                .enumerate()
                .min_by_key(|(_, e)| e.last_used)
                .map(|(i, _)| i)
                .unwrap();
            self.entries.remove(oldest);
        }
    }
}

struct Shared {
    queue: Mutex<Queue>,
    ready: Condvar,
    prefix: Mutex<PrefixCache>,
    busy: AtomicUsize,
}

/// Counts for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineStats {
    /// Requests waiting.
    pub queued: usize,
    /// Slots generating.
    pub busy_slots: usize,
    /// Slots in all.
    pub slots: usize,
}

/// The engine. Dropping it stops the slots after the requests they run.
pub struct Engine {
    model: Arc<Model>,
    tokenizer: Arc<Tokenizer>,
    config: EngineConfig,
    shared: Arc<Shared>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Engine {
    /// Starts `config.slots` slot threads on `model`.
    pub fn start(model: Arc<Model>, tokenizer: Arc<Tokenizer>, config: EngineConfig) -> Engine {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            ready: Condvar::new(),
            prefix: Mutex::new(PrefixCache::default()),
            busy: AtomicUsize::new(0),
        });
        let threads = (0..config.slots.max(1))
            .map(|i| {
                let (model, tokenizer, shared, config) = (
                    model.clone(),
                    tokenizer.clone(),
                    shared.clone(),
                    config.clone(),
                );
                std::thread::Builder::new()
                    .name(format!("inference-slot-{i}"))
                    .spawn(move || slot_loop(&model, &tokenizer, &shared, &config))
                    .expect("spawn a slot thread")
            })
            .collect();
        Engine {
            model,
            tokenizer,
            config,
            shared,
            threads,
        }
    }

    /// The tokenizer (for templating prompts).
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The model.
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// Queue depth and busy slots.
    pub fn stats(&self) -> EngineStats {
        EngineStats {
            queued: self.shared.queue.lock().unwrap().len,
            busy_slots: self.shared.busy.load(Ordering::Relaxed),
            slots: self.threads.len(),
        }
    }

    /// Queues a request, or refuses it at once.
    pub fn submit(&self, req: GenerateRequest) -> Result<Generation, SubmitError> {
        req.params.validate()?;
        let context = self.model.config().context_length;
        if req.prompt.is_empty() {
            return Err(SubmitError::EmptyPrompt);
        }
        if req.prompt.len() >= context {
            return Err(SubmitError::PromptTooLong {
                prompt: req.prompt.len(),
                context,
            });
        }
        let (dtx, drx) = mpsc::unbounded_channel();
        let (stx, srx) = oneshot::channel();
        let cancel = Arc::new(AtomicBool::new(false));
        let mut q = self.shared.queue.lock().unwrap();
        if q.closed {
            return Err(SubmitError::ShuttingDown);
        }
        if q.len >= self.config.queue_capacity {
            return Err(SubmitError::Overloaded(q.len));
        }
        q.push(Job {
            req,
            submitted: Instant::now(),
            deltas: dtx,
            summary: stx,
            cancel: cancel.clone(),
        });
        drop(q);
        self.shared.ready.notify_one();
        Ok(Generation {
            deltas: drx,
            summary: srx,
            cancel,
        })
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.shared.queue.lock().unwrap().closed = true;
        self.shared.ready.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn slot_loop(model: &Model, tokenizer: &Tokenizer, shared: &Shared, config: &EngineConfig) {
    loop {
        let job = {
            let mut q = shared.queue.lock().unwrap();
            loop {
                if let Some(job) = q.pop() {
                    break job;
                }
                if q.closed {
                    return;
                }
                q = shared.ready.wait(q).unwrap();
            }
        };
        shared.busy.fetch_add(1, Ordering::Relaxed);
        let summary_tx = job.summary;
        let summary = run(
            model,
            tokenizer,
            shared,
            config,
            job.req,
            job.submitted,
            &job.deltas,
            &job.cancel,
        );
        let _ = summary_tx.send(summary);
        shared.busy.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Holds back text that could be the start of a stop sequence.
fn split_safe(text: &str, stops: &[String]) -> usize {
    let mut safe = text.len();
    for s in stops {
        for k in (1..s.len()).rev() {
            if s.is_char_boundary(k) && text.ends_with(&s[..k]) {
                safe = safe.min(text.len() - k);
                break;
            }
        }
    }
    safe
}

#[allow(clippy::too_many_arguments)]
fn run(
    model: &Model,
    tokenizer: &Tokenizer,
    shared: &Shared,
    config: &EngineConfig,
    req: GenerateRequest,
    submitted: Instant,
    deltas: &mpsc::UnboundedSender<Delta>,
    cancel: &AtomicBool,
) -> Summary {
    let started = Instant::now();
    let context = model.config().context_length;
    let prompt = &req.prompt;
    let mut summary = Summary {
        prompt_tokens: prompt.len(),
        cached_prompt_tokens: 0,
        completion_tokens: 0,
        finish_reason: FinishReason::Stop,
        ttft: Duration::ZERO,
        decode_time: Duration::ZERO,
        queue_time: started - submitted,
        error: None,
    };
    let cancelled = || cancel.load(Ordering::Relaxed) || deltas.is_closed();
    if cancelled() {
        summary.finish_reason = FinishReason::Cancelled;
        return summary;
    }
    let (cached, mut cache) = shared
        .prefix
        .lock()
        .unwrap()
        .lookup(prompt)
        .unwrap_or_else(|| (0, KvCache::new(model)));
    summary.cached_prompt_tokens = cached;
    let mut logits = match model.forward(&prompt[cached..], &mut cache) {
        Ok(l) => l,
        Err(e) => {
            summary.finish_reason = FinishReason::Error;
            summary.error = Some(e.to_string());
            return summary;
        }
    };
    let max_tokens = req
        .params
        .max_tokens
        .unwrap_or(usize::MAX)
        .min(context - prompt.len());
    let mut sampler = Sampler::new(req.params.clone());
    let mut history = prompt.clone();
    let mut stream = TextStream::default();
    let mut text = String::new(); // completion text so far
    let mut sent = 0; // bytes of `text` already sent
    let mut pending_ids = Vec::new();
    let mut first_token_at = None;
    let stop_ids = tokenizer.stop_ids();
    loop {
        let mut l = match logits.to_vec1::<f32>() {
            Ok(l) => l,
            Err(e) => {
                summary.finish_reason = FinishReason::Error;
                summary.error = Some(e.to_string());
                break;
            }
        };
        let id = sampler.sample(&mut l, &history);
        summary.completion_tokens += 1;
        first_token_at.get_or_insert_with(Instant::now);
        history.push(id);
        if stop_ids.contains(&id) {
            summary.finish_reason = FinishReason::Stop;
            break;
        }
        text.push_str(&stream.push(tokenizer, id));
        pending_ids.push(id);
        if let Some(at) = req
            .params
            .stop
            .iter()
            .filter_map(|s| text[sent..].find(s.as_str()).map(|i| sent + i))
            .min()
        {
            text.truncate(at);
            summary.finish_reason = FinishReason::Stop;
            break;
        }
        let safe = split_safe(&text, &req.params.stop);
        if safe > sent {
            let _ = deltas.send(Delta {
                text: text[sent..safe].to_string(),
                token_ids: std::mem::take(&mut pending_ids),
            });
            sent = safe;
        }
        if summary.completion_tokens >= max_tokens {
            summary.finish_reason = FinishReason::Length;
            break;
        }
        if cancelled() {
            summary.finish_reason = FinishReason::Cancelled;
            break;
        }
        logits = match model.forward(&[id], &mut cache) {
            Ok(l) => l,
            Err(e) => {
                summary.finish_reason = FinishReason::Error;
                summary.error = Some(e.to_string());
                break;
            }
        };
    }
    if summary.finish_reason != FinishReason::Stop || req.params.stop.is_empty() {
        text.push_str(&stream.finish(tokenizer));
    }
    if text.len() > sent || !pending_ids.is_empty() {
        let _ = deltas.send(Delta {
            text: text[sent.min(text.len())..].to_string(),
            token_ids: pending_ids,
        });
    }
    let end = Instant::now();
    if let Some(first) = first_token_at {
        summary.ttft = first - submitted;
        summary.decode_time = end - first;
    }
    // The sequence's KV (prompt and what was fed back) serves later prompts.
    let mut fed = history;
    fed.truncate(cache.len());
    shared
        .prefix
        .lock()
        .unwrap()
        .insert(fed, cache, config.prefix_cache_tokens);
    summary
}
