//! The generation engine: a bounded queue, fair across subscribers, feeding
//! N slots. One scheduler thread (outside any async runtime) runs every
//! active sequence, each with its own KV cache, and batches their decode
//! steps: one forward pass per step for all of them (continuous batching, as
//! llama.cpp's server and vLLM do), so a weight is read once per step
//! instead of once per sequence. A new request's prompt is prefilled in
//! chunks of at most `prefill_chunk` tokens, one chunk between two decode
//! steps (chunked prefill, as vLLM and llama.cpp's server do), so a long
//! prompt delays the other streams' next token by one chunk, not by the
//! whole prompt; then it joins the batch. Finished sequences leave their KV
//! in a prefix cache that later prompts with the same beginning reuse.
//!
//! A request yields a stream of [`Delta`]s and, separately, one [`Summary`].
//! The summary always arrives, even when the caller dropped the stream (the
//! client went away), so the tokens computed can be billed.
//!
//! Counting rule: `completion_tokens` counts every token the model produced,
//! including the end-of-turn token that ended it (it was computed like any
//! other); a stop *sequence*'s tokens count too, though its text is cut.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use crate::constraint::{Constraint, Grammars};
use crate::model::{KvCache, Model};
use crate::sampling::{ParamError, Sampler, SamplingParams, TokenLogprob};
use crate::tokenizer::{TextStream, Tokenizer};

/// Engine settings.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Concurrent sequences (each with its own KV cache), decoded together.
    pub slots: usize,
    /// Requests waiting for a slot; beyond it, `submit` answers `Overloaded`.
    pub queue_capacity: usize,
    /// Tokens of KV kept in the prefix cache across all entries.
    pub prefix_cache_tokens: usize,
    /// Most prompt tokens prefilled between two decode steps.
    pub prefill_chunk: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            slots: 2,
            queue_capacity: 64,
            prefix_cache_tokens: 16_384,
            prefill_chunk: 256,
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
    /// More choices than the engine has slots: they run at once.
    #[error("{choices} choices asked; the engine runs at most {slots} sequences at once")]
    TooManyChoices {
        /// Asked.
        choices: usize,
        /// Slots.
        slots: usize,
    },
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
#[derive(Debug, Clone, PartialEq)]
pub struct Delta {
    /// Text (may be empty while a character or a possible stop sequence is incomplete).
    pub text: String,
    /// Ids produced since the previous delta.
    pub token_ids: Vec<u32>,
    /// Their log-probabilities, when asked for (the end-of-turn token that
    /// ends a sequence has none: it is not part of the text).
    pub logprobs: Vec<TokenLogprob>,
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
#[derive(Debug, Clone, Default)]
pub struct GenerateRequest {
    /// Prompt token ids (already templated).
    pub prompt: Vec<u32>,
    /// Sampling and stopping.
    pub params: SamplingParams,
    /// Who the request is for: the queue is round-robin between subscribers.
    pub subscriber: String,
    /// The grammar the output must follow (structured output, tool calls).
    pub constraint: Option<Constraint>,
    /// Choices to generate from the one prompt (0 is read as 1): the prompt
    /// is prefilled once and each further choice starts from a copy of its
    /// KV cache. Choice `i` samples with `seed + i` when a seed is given.
    pub choices: usize,
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
    out: Outlet,
    /// Choices 1 and on: they start when choice 0's prompt is prefilled.
    forks: Vec<Outlet>,
}

/// Where one choice's deltas and summary go.
struct Outlet {
    deltas: mpsc::UnboundedSender<Delta>,
    summary: oneshot::Sender<Summary>,
    cancel: Arc<AtomicBool>,
}

impl Outlet {
    fn new() -> (Outlet, Generation) {
        let (dtx, drx) = mpsc::unbounded_channel();
        let (stx, srx) = oneshot::channel();
        let cancel = Arc::new(AtomicBool::new(false));
        (
            Outlet {
                deltas: dtx,
                summary: stx,
                cancel: cancel.clone(),
            },
            Generation {
                deltas: drx,
                summary: srx,
                cancel,
            },
        )
    }
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

    /// The sequences the next job to pop needs (its choices).
    fn next_needs(&self) -> Option<usize> {
        let sub = self.order.front()?;
        let job = self.per_subscriber.get(sub)?.front()?;
        Some(1 + job.forks.len())
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
            self.evict_oldest();
        }
    }

    /// Drops the least recently used entry (its KV blocks go back to the
    /// pool unless a running sequence shares them); false when empty.
    fn evict_oldest(&mut self) -> bool {
        let oldest = self
            .entries
            .iter()
            .enumerate()
            .min_by_key(|(_, e)| e.last_used)
            .map(|(i, _)| i);
        match oldest {
            Some(i) => {
                self.entries.remove(i);
                true
            }
            None => false,
        }
    }
}

struct Shared {
    queue: Mutex<Queue>,
    ready: Condvar,
    prefix: Mutex<PrefixCache>,
    busy: AtomicUsize,
    /// Requests admitted so far (their order).
    admitted: AtomicU64,
    /// Sequences whose KV was dropped to make room (recomputed later).
    preempted: AtomicU64,
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
    /// Times a sequence's KV cache was dropped because the pool was full
    /// (the sequence recomputes it and goes on; nothing is lost).
    pub preemptions: u64,
}

/// The engine. Dropping it stops the scheduler after the requests it runs.
pub struct Engine {
    model: Arc<Model>,
    tokenizer: Arc<Tokenizer>,
    grammars: Grammars,
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
    /// Starts the scheduler thread on `model`, with `config.slots` slots.
    pub fn start(model: Arc<Model>, tokenizer: Arc<Tokenizer>, config: EngineConfig) -> Engine {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            ready: Condvar::new(),
            prefix: Mutex::new(PrefixCache::default()),
            busy: AtomicUsize::new(0),
            admitted: AtomicU64::new(0),
            preempted: AtomicU64::new(0),
        });
        let scheduler = {
            let (model, tokenizer, shared, config) = (
                model.clone(),
                tokenizer.clone(),
                shared.clone(),
                config.clone(),
            );
            std::thread::Builder::new()
                .name("inference-scheduler".into())
                .spawn(move || schedule(&model, &tokenizer, &shared, &config))
                .expect("spawn the scheduler thread")
        };
        Engine {
            model,
            grammars: Grammars::new(tokenizer.clone()),
            tokenizer,
            config,
            shared,
            threads: vec![scheduler],
        }
    }

    /// The tokenizer (for templating prompts).
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The tokenizer, shared (for answers that outlive a borrow: streams).
    pub fn shared_tokenizer(&self) -> Arc<Tokenizer> {
        self.tokenizer.clone()
    }

    /// Compiles schemas into constraints for this model's tokenizer.
    pub fn grammars(&self) -> &Grammars {
        &self.grammars
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
            slots: self.config.slots.max(1),
            preemptions: self.shared.preempted.load(Ordering::Relaxed),
        }
    }

    /// Queues a request, or refuses it at once.
    pub fn submit(&self, mut req: GenerateRequest) -> Result<Generation, SubmitError> {
        req.choices = 1;
        Ok(self.submit_choices(req)?.remove(0))
    }

    /// Queues a request for `req.choices` choices: one generation each, in
    /// order; or refuses it at once.
    pub fn submit_choices(&self, req: GenerateRequest) -> Result<Vec<Generation>, SubmitError> {
        req.params.validate()?;
        let slots = self.config.slots.max(1);
        if req.choices > slots {
            return Err(SubmitError::TooManyChoices {
                choices: req.choices,
                slots,
            });
        }
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
        let (out, first) = Outlet::new();
        let mut generations = vec![first];
        let forks = (1..req.choices.max(1))
            .map(|_| {
                let (out, g) = Outlet::new();
                generations.push(g);
                out
            })
            .collect();
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
            out,
            forks,
        });
        drop(q);
        self.shared.ready.notify_one();
        Ok(generations)
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

/// The scheduler: admits queued requests while slots are free, prefills
/// one chunk of the oldest prompt not yet prefilled, then runs one batched
/// decode step for every sequence past its prefill, and repeats until the
/// engine closes and nothing is left.
fn schedule(model: &Model, tokenizer: &Tokenizer, shared: &Shared, config: &EngineConfig) {
    let slots = config.slots.max(1);
    let mut active: Vec<Sequence> = Vec::new();
    loop {
        // Admit: wait for work only when there is nothing to run.
        while active.len() < slots {
            let job = {
                let mut q = shared.queue.lock().unwrap();
                loop {
                    // A job runs all its choices at once: it waits until
                    // they fit beside the sequences running.
                    if q.next_needs().is_some_and(|n| active.len() + n > slots) {
                        break None;
                    }
                    if let Some(job) = q.pop() {
                        break Some(job);
                    }
                    if q.closed || !active.is_empty() {
                        break None;
                    }
                    q = shared.ready.wait(q).unwrap();
                }
            };
            let Some(job) = job else { break };
            shared.busy.fetch_add(1, Ordering::Relaxed);
            match Sequence::start(model, shared, job) {
                Ok(seq) => active.push(seq),
                Err(finished) => {
                    finished.into_iter().for_each(Finished::send);
                    shared.busy.fetch_sub(1, Ordering::Relaxed);
                }
            }
        }
        if active.is_empty() {
            return; // closed, and nothing queued or running
        }
        // A request cancelled while its prompt waits to be prefilled ends
        // now, not when the prompts ahead of it are done.
        for seq in active.iter_mut().filter(|s| s.prefilling() && !s.ended) {
            if seq.cancelled() {
                seq.summary.finish_reason = FinishReason::Cancelled;
                seq.ended = true;
            }
        }
        // One prefill chunk, for the oldest sequence still prefilling.
        if let Some(i) = active.iter().position(|s| s.prefilling() && !s.ended) {
            let chunk = active[i].next_chunk(config.prefill_chunk.max(1));
            if room_for_prefill(model, shared, &mut active, i, chunk) {
                active[i].prefill_chunk(model, chunk);
                if !active[i].prefilling() && !active[i].forks.is_empty() {
                    let forks = active[i].spawn_forks(shared);
                    active.extend(forks);
                }
            }
        }
        // Each sequence past its prefill takes the token its logits give;
        // those that go on are fed back together.
        let mut next = Vec::with_capacity(active.len());
        let mut decoding = Vec::with_capacity(active.len());
        let mut prefilling = Vec::new();
        for mut seq in active.drain(..) {
            if seq.prefilling() && !seq.ended {
                prefilling.push(seq);
                continue;
            }
            match seq.take_token(tokenizer) {
                Some(id) => {
                    next.push(id);
                    decoding.push(seq);
                }
                None => seq
                    .finish(tokenizer, shared, config)
                    .send_and_release(shared),
            }
        }
        room_for_decode(
            model,
            tokenizer,
            shared,
            config,
            (&mut decoding, &mut next),
            &mut prefilling,
        );
        if !decoding.is_empty() {
            let mut steps: Vec<(u32, &mut KvCache)> = next
                .iter()
                .zip(decoding.iter_mut())
                .map(|(&id, seq)| (id, &mut seq.cache))
                .collect();
            match model.forward_batch(&mut steps) {
                Ok(logits) => {
                    for (seq, l) in decoding.iter_mut().zip(logits) {
                        seq.logits = l;
                    }
                }
                Err(e) => {
                    for mut seq in decoding.drain(..) {
                        seq.fail(e.to_string());
                        seq.finish(tokenizer, shared, config)
                            .send_and_release(shared);
                    }
                }
            }
        }
        // Oldest first, so prefill goes in order of admission.
        active = decoding;
        active.append(&mut prefilling);
        active.sort_by_key(|s| s.admitted);
    }
}

/// Makes room in the KV pool for the next `t` prompt positions of
/// `active[i]`: evicts the prefix cache, least recently used first; then,
/// when no sequence is decoding (none will free blocks by finishing),
/// preempts the newest other sequence holding blocks. False when the chunk
/// must wait for decoding sequences to finish, or when the pool cannot
/// hold this sequence even alone (it then ends with that error).
fn room_for_prefill(
    model: &Model,
    shared: &Shared,
    active: &mut [Sequence],
    i: usize,
    t: usize,
) -> bool {
    loop {
        if model.kv_has_room(&[(&active[i].cache, t)]) {
            return true;
        }
        if shared.prefix.lock().unwrap().evict_oldest() {
            continue;
        }
        if active.iter().any(|s| !s.prefilling() && !s.ended) {
            return false;
        }
        let victim = active
            .iter()
            .enumerate()
            .filter(|(j, s)| *j != i && !s.cache.is_empty())
            .max_by_key(|(_, s)| s.admitted)
            .map(|(j, _)| j);
        match victim {
            Some(j) => active[j].preempt(model, shared),
            None => {
                let want = active[i].cache.len() + t;
                active[i].fail(kv_full(model, want));
                return false;
            }
        }
    }
}

/// Makes room in the KV pool for one more position of every sequence in
/// the decode batch (`batch`: the sequences and the tokens they feed):
/// evicts the prefix cache, least recently used first, then preempts the
/// newest sequence holding blocks (a decoding one leaves the batch and
/// recomputes its KV once there is room: its text so far stands, and
/// greedy decoding continues exactly as it would have). A sequence that
/// cannot grow even alone ends with that error.
fn room_for_decode(
    model: &Model,
    tokenizer: &Tokenizer,
    shared: &Shared,
    config: &EngineConfig,
    batch: (&mut Vec<Sequence>, &mut Vec<u32>),
    prefilling: &mut Vec<Sequence>,
) {
    let (decoding, next) = batch;
    loop {
        let passes: Vec<(&KvCache, usize)> = decoding.iter().map(|s| (&s.cache, 1)).collect();
        if decoding.is_empty() || model.kv_has_room(&passes) {
            return;
        }
        if shared.prefix.lock().unwrap().evict_oldest() {
            continue;
        }
        let newest_decoding = decoding
            .iter()
            .enumerate()
            .max_by_key(|(_, s)| s.admitted)
            .map(|(j, s)| (j, s.admitted));
        let newest_waiting = prefilling
            .iter()
            .enumerate()
            .filter(|(_, s)| !s.cache.is_empty())
            .max_by_key(|(_, s)| s.admitted)
            .map(|(j, s)| (j, s.admitted));
        match (newest_decoding, newest_waiting) {
            (_, Some((j, w))) if newest_decoding.is_none_or(|(_, d)| w > d) => {
                prefilling[j].preempt(model, shared);
            }
            (Some((j, _)), _) if decoding.len() > 1 || newest_waiting.is_some() => {
                let mut seq = decoding.remove(j);
                next.remove(j);
                seq.preempt(model, shared);
                prefilling.push(seq);
            }
            _ => {
                // One sequence, holding every block that is not free.
                let mut seq = decoding.remove(0);
                next.remove(0);
                let want = seq.cache.len() + 1;
                seq.fail(kv_full(model, want));
                seq.finish(tokenizer, shared, config)
                    .send_and_release(shared);
            }
        }
    }
}

/// The error of a sequence the whole KV pool cannot hold.
fn kv_full(model: &Model, positions: usize) -> String {
    let total = model.kv_pool_usage().map_or(0, |(_, total)| total);
    format!(
        "the KV cache is full: this sequence needs {positions} positions and the pool holds \
         {total} (raise the KV budget or lower the context)"
    )
}

/// A summary on its way back to the caller.
struct Finished {
    summary: Summary,
    tx: oneshot::Sender<Summary>,
}

impl Finished {
    fn send(self) {
        let _ = self.tx.send(self.summary);
    }

    fn send_and_release(self, shared: &Shared) {
        self.send();
        shared.busy.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One request being generated: its KV cache, sampler, text stream and
/// counts. `logits` are those after the last token fed.
struct Sequence {
    params: SamplingParams,
    submitted: Instant,
    deltas: mpsc::UnboundedSender<Delta>,
    summary_tx: oneshot::Sender<Summary>,
    cancel: Arc<AtomicBool>,
    summary: Summary,
    cache: KvCache,
    logits: Vec<f32>,
    max_tokens: usize,
    sampler: Sampler,
    /// The grammar the output follows, if any.
    constraint: Option<Constraint>,
    /// Prompt and completion ids (the penalties read them).
    history: Vec<u32>,
    /// Of `history`, the prompt's.
    prompt_len: usize,
    /// Further choices, started from this one's KV once its prompt is in.
    forks: Vec<Outlet>,
    /// Log-probabilities of `pending_ids`, when asked for.
    pending_logprobs: Vec<TokenLogprob>,
    stream: TextStream,
    /// Completion text so far, and how many of its bytes were sent.
    text: String,
    sent: usize,
    pending_ids: Vec<u32>,
    first_token_at: Option<Instant>,
    /// Set when the sequence must end at the next `take_token`.
    ended: bool,
    /// Prompt tokens in the cache so far (the prompt is prefilled when it
    /// reaches `history.len()` before the first completion token).
    prefilled: usize,
    /// Admission order (prefill goes oldest first).
    admitted: u64,
}

impl Sequence {
    /// Prefills the prompt (after what the prefix cache holds), or ends the
    /// request at once (cancelled while queued): every choice's summary
    /// then goes back.
    fn start(model: &Model, shared: &Shared, job: Job) -> Result<Sequence, Vec<Finished>> {
        let started = Instant::now();
        let prompt = &job.req.prompt;
        let mut summary = Summary {
            prompt_tokens: prompt.len(),
            cached_prompt_tokens: 0,
            completion_tokens: 0,
            finish_reason: FinishReason::Stop,
            ttft: Duration::ZERO,
            decode_time: Duration::ZERO,
            queue_time: started - job.submitted,
            error: None,
        };
        let gone = |o: &Outlet| o.cancel.load(Ordering::Relaxed) || o.deltas.is_closed();
        if gone(&job.out) && job.forks.iter().all(gone) {
            summary.finish_reason = FinishReason::Cancelled;
            return Err(std::iter::once(job.out)
                .chain(job.forks)
                .map(|o| Finished {
                    summary: summary.clone(),
                    tx: o.summary,
                })
                .collect());
        }
        let (cached, cache) = shared
            .prefix
            .lock()
            .unwrap()
            .lookup(prompt)
            .unwrap_or_else(|| (0, KvCache::new(model)));
        summary.cached_prompt_tokens = cached;
        let max_tokens = job
            .req
            .params
            .max_tokens
            .unwrap_or(usize::MAX)
            .min(model.config().context_length - prompt.len());
        Ok(Sequence {
            sampler: Sampler::new(job.req.params.clone()),
            params: job.req.params,
            constraint: job.req.constraint,
            prompt_len: job.req.prompt.len(),
            history: job.req.prompt,
            forks: job.forks,
            pending_logprobs: Vec::new(),
            submitted: job.submitted,
            deltas: job.out.deltas,
            summary_tx: job.out.summary,
            cancel: job.out.cancel,
            summary,
            cache,
            logits: Vec::new(),
            max_tokens,
            stream: TextStream::default(),
            text: String::new(),
            sent: 0,
            pending_ids: Vec::new(),
            first_token_at: None,
            ended: false,
            prefilled: cached,
            admitted: shared.admitted.fetch_add(1, Ordering::Relaxed),
        })
    }

    /// The further choices, each from a copy of this one's KV cache and
    /// first logits (its prompt is prefilled, nothing generated yet). A
    /// copy shares the pool's blocks until it writes (copy on write), and
    /// each bills the whole prompt as cached.
    fn spawn_forks(&mut self, shared: &Shared) -> Vec<Sequence> {
        let forks = std::mem::take(&mut self.forks);
        forks
            .into_iter()
            .enumerate()
            .map(|(i, out)| {
                let mut params = self.params.clone();
                params.seed = params.seed.map(|s| s.wrapping_add(i as u64 + 1));
                shared.busy.fetch_add(1, Ordering::Relaxed);
                Sequence {
                    sampler: Sampler::new(params.clone()),
                    params,
                    constraint: self.constraint.clone(),
                    prompt_len: self.prompt_len,
                    history: self.history.clone(),
                    forks: Vec::new(),
                    pending_logprobs: Vec::new(),
                    submitted: self.submitted,
                    deltas: out.deltas,
                    summary_tx: out.summary,
                    cancel: out.cancel,
                    summary: Summary {
                        cached_prompt_tokens: self.prompt_len,
                        ..self.summary.clone()
                    },
                    cache: self.cache.clone(),
                    logits: self.logits.clone(),
                    max_tokens: self.max_tokens,
                    stream: TextStream::default(),
                    text: String::new(),
                    sent: 0,
                    pending_ids: Vec::new(),
                    first_token_at: None,
                    ended: false,
                    prefilled: self.prefilled,
                    admitted: shared.admitted.fetch_add(1, Ordering::Relaxed),
                }
            })
            .collect()
    }

    /// Prompt positions the next prefill chunk runs (at most `chunk`).
    fn next_chunk(&self, chunk: usize) -> usize {
        (self.history.len() - self.prefilled).min(chunk)
    }

    /// Drops the KV cache to give its blocks back to the pool: the
    /// sequence prefills its prompt and what it has generated again when
    /// there is room (recomputation, as vLLM preempts), then goes on where
    /// it was; the sampler's state is kept, so nothing it sends changes.
    fn preempt(&mut self, model: &Model, shared: &Shared) {
        tracing::debug!(
            positions = self.cache.len(),
            admitted = self.admitted,
            "the KV cache is full: a sequence is preempted and will recompute"
        );
        self.cache = KvCache::new(model);
        self.prefilled = 0;
        self.logits.clear();
        shared.preempted.fetch_add(1, Ordering::Relaxed);
    }

    /// Whether prompt tokens are still to be prefilled.
    fn prefilling(&self) -> bool {
        self.logits.is_empty()
    }

    /// Runs the next `chunk` prompt tokens; after the last, the sequence
    /// has the logits of its first completion token. A cancelled request
    /// or a failed pass ends the sequence (at its next turn).
    fn prefill_chunk(&mut self, model: &Model, chunk: usize) {
        if self.cancelled() {
            self.summary.finish_reason = FinishReason::Cancelled;
            self.ended = true;
            return;
        }
        // The prefix cache leaves at least the prompt's last token to run
        // (its logits are the first completion token's).
        let start = self.prefilled;
        let end = start + self.next_chunk(chunk);
        match model.forward(&self.history[start..end], &mut self.cache) {
            Ok(l) if end == self.history.len() => match l.to_vec1::<f32>() {
                Ok(l) => self.logits = l,
                Err(e) => self.fail(e.to_string()),
            },
            Ok(_) => {}
            Err(e) => self.fail(e.to_string()),
        }
        self.prefilled = end;
    }

    fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed) || self.deltas.is_closed()
    }

    fn fail(&mut self, error: String) {
        self.summary.finish_reason = FinishReason::Error;
        self.summary.error = Some(error);
        self.ended = true;
    }

    /// Samples the next token from the current logits, counts it and streams
    /// its text; returns it when generation goes on (it must be fed back),
    /// `None` when the sequence has ended.
    fn take_token(&mut self, tokenizer: &Tokenizer) -> Option<u32> {
        if self.ended {
            return None;
        }
        if let Some(c) = &mut self.constraint {
            if let Err(e) = c.mask(&mut self.logits) {
                self.fail(format!("the output constraint failed: {e}"));
                return None;
            }
        }
        let (id, logprob) = self
            .sampler
            .sample(&mut self.logits, &self.history, self.prompt_len);
        self.summary.completion_tokens += 1;
        self.first_token_at.get_or_insert_with(Instant::now);
        self.history.push(id);
        if let Some(c) = &mut self.constraint {
            if let Err(e) = c.consume(id) {
                self.fail(format!("the output constraint failed: {e}"));
                return None;
            }
        }
        if tokenizer.stop_ids().contains(&id) {
            self.summary.finish_reason = FinishReason::Stop;
            return None;
        }
        self.text.push_str(&self.stream.push(tokenizer, id));
        self.pending_ids.push(id);
        self.pending_logprobs.extend(logprob);
        let sent = self.sent;
        if let Some(at) = self
            .params
            .stop
            .iter()
            .filter_map(|s| self.text[sent..].find(s.as_str()).map(|i| sent + i))
            .min()
        {
            self.text.truncate(at);
            self.summary.finish_reason = FinishReason::Stop;
            return None;
        }
        let safe = split_safe(&self.text, &self.params.stop);
        if safe > self.sent {
            let _ = self.deltas.send(Delta {
                text: self.text[self.sent..safe].to_string(),
                token_ids: std::mem::take(&mut self.pending_ids),
                logprobs: std::mem::take(&mut self.pending_logprobs),
            });
            self.sent = safe;
        }
        if self.constraint.as_ref().is_some_and(Constraint::is_stopped) {
            // The document is complete.
            self.summary.finish_reason = FinishReason::Stop;
            return None;
        }
        if self.summary.completion_tokens >= self.max_tokens {
            self.summary.finish_reason = FinishReason::Length;
            return None;
        }
        if self.cancelled() {
            self.summary.finish_reason = FinishReason::Cancelled;
            return None;
        }
        Some(id)
    }

    /// Sends the rest of the text, fills in the timings, and leaves the KV
    /// (prompt and what was fed back) in the prefix cache.
    fn finish(mut self, tokenizer: &Tokenizer, shared: &Shared, config: &EngineConfig) -> Finished {
        let summary = &mut self.summary;
        if summary.finish_reason != FinishReason::Stop || self.params.stop.is_empty() {
            self.text.push_str(&self.stream.finish(tokenizer));
        }
        if self.text.len() > self.sent || !self.pending_ids.is_empty() {
            let _ = self.deltas.send(Delta {
                text: self.text[self.sent.min(self.text.len())..].to_string(),
                token_ids: std::mem::take(&mut self.pending_ids),
                logprobs: std::mem::take(&mut self.pending_logprobs),
            });
        }
        let end = Instant::now();
        if let Some(first) = self.first_token_at {
            summary.ttft = first - self.submitted;
            summary.decode_time = end - first;
        }
        // Choices that never started (the prompt's prefill failed or was
        // cancelled) end as this one did.
        for out in std::mem::take(&mut self.forks) {
            let _ = out.summary.send(Summary {
                completion_tokens: 0,
                cached_prompt_tokens: self.prompt_len,
                ..self.summary.clone()
            });
        }
        let mut fed = self.history;
        fed.truncate(self.cache.len());
        shared
            .prefix
            .lock()
            .unwrap()
            .insert(fed, self.cache, config.prefix_cache_tokens);
        Finished {
            summary: self.summary,
            tx: self.summary_tx,
        }
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
