//! Metering on the request path: rate limits, the reservation before
//! generation, and after it the settlement, the usage record made durable in
//! the log, and the store updated behind it.
//!
//! Order of a settlement, and why: (1) the ledger debits the actual tokens
//! in memory and releases the rest of the reservation; (2) the usage record,
//! carrying those debits, is appended and made durable; only then (3) does
//! the client get its last event, and (4) the store applies the debits and
//! marks the record's seq (batched on a thread of its own). A crash after (2)
//! and before (4) is repaired at start-up by re-applying the records the
//! store has not marked (`replay_log`): balances always equal grants minus
//! the debits of the records in the log.

use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use mec_inference::engine::{FinishReason, Summary};
use mec_metering::ledger::{BucketKind, Debit, Ledger, LedgerError, Reservation, Timestamp};
use mec_metering::ratelimit::{Limit, RateLimiter};
use mec_metering::store::{Applied, Store, UsageRow};
use mec_metering::Imsi;
use mec_sync::log::{LogError, UsageLog};
use mec_sync::record::pb::{ClockSync, Outcome, PackageDebit, UsageRecord};
use mec_sync::record::SignedRecord;

use super::error::ApiError;
use super::tally::{Counting, Entry, Slot, Tally};
use crate::config::LimitsConfig;
use anyhow::Context;

/// Unix seconds now.
pub fn unix_now() -> Timestamp {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The four rate limits.
struct Limiters {
    imsi_rps: Option<RateLimiter<String>>,
    imsi_tpm: Option<RateLimiter<String>>,
    app_rps: Option<RateLimiter<String>>,
    app_tpm: Option<RateLimiter<String>>,
}

impl Limiters {
    fn new(c: &LimitsConfig) -> Limiters {
        let mk = |v: f64, per_minute: bool| {
            (v > 0.0).then(|| {
                RateLimiter::new(if per_minute {
                    Limit::per_minute(v)
                } else {
                    Limit::per_second(v)
                })
            })
        };
        Limiters {
            imsi_rps: mk(c.imsi_requests_per_second, false),
            imsi_tpm: mk(c.imsi_tokens_per_minute, true),
            app_rps: mk(c.app_requests_per_second, false),
            app_tpm: mk(c.app_tokens_per_minute, true),
        }
    }
}

/// What a request is, for its record.
#[derive(Debug, Clone)]
pub struct RequestInfo {
    /// The request's id (UUIDv7): the usage record's `record_id`, the
    /// response's `id` (`chatcmpl-<hex>`) and its `x-request-id` header, so a
    /// bill line can be traced to the answer an app received.
    pub request_id: uuid::Uuid,
    /// Subscriber.
    pub imsi: Imsi,
    /// App id.
    pub app: String,
    /// Model id.
    pub model: String,
    /// Wall clock at arrival.
    pub started: SystemTime,
    /// Monotonic clock at arrival.
    pub started_at: Instant,
}

/// The usage a client is told: equal to the record.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Prompt tokens.
    pub prompt_tokens: u64,
    /// Of them, served from the prefix cache.
    pub cached_tokens: u64,
    /// Completion tokens.
    pub completion_tokens: u64,
    /// The record's seq (0 when nothing was recorded).
    pub seq: u64,
}

/// What [`Billing::recover_streams`] found.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Recovered {
    /// Streams billed now.
    pub billed: usize,
    /// Slots whose record was already in the log, or that streamed nothing.
    pub already: usize,
    /// Slots that could not be read.
    pub unreadable: usize,
}

/// The parts of a usage record, whichever path bills it.
struct Bill<'a> {
    request_id: Vec<u8>,
    imsi: &'a Imsi,
    app: &'a str,
    model: &'a str,
    prompt_tokens: u64,
    cached_tokens: u64,
    completion_tokens: u64,
    reservation: Option<&'a Reservation>,
    reserved_tokens: u64,
    outcome: Outcome,
    start_ms: i64,
    end_ms: i64,
    duration_us: u64,
    ttft_us: u64,
    failure_reason: String,
}

/// Metering state shared by the handlers.
pub struct Billing {
    /// What running streams have sent (`None`: not kept, in tests).
    tally: Option<Arc<Tally>>,
    enabled: bool,
    ledger: Mutex<Ledger>,
    limits: Mutex<Limiters>,
    clock0: Instant,
    /// The log; `None` after shutdown.
    log: Arc<UsageLog>,
    store: Arc<Mutex<Store>>,
    applier: Mutex<Option<std_mpsc::Sender<Applied>>>,
    applier_thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    reservation_ttl: Duration,
    /// Packages a subscriber gets the first time the box sees them (the
    /// site configuration's default packages).
    welcome: Vec<WelcomePackage>,
    /// Subscribers that ever held a package here (so a subscriber whose
    /// welcome package ran out does not get another).
    known: Mutex<std::collections::HashSet<String>>,
}

/// A package granted to a subscriber new to this box.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WelcomePackage {
    /// Its kind.
    pub kind: BucketKind,
    /// Tokens.
    pub tokens: u64,
    /// Days it stays valid.
    pub valid_days: u32,
}

/// Bytes of a typical record, for the log's room check before serving.
const TYPICAL_RECORD_BYTES: u64 = 512;

impl Billing {
    /// Starts metering over `log` and `store` (already replayed), with the
    /// buckets of `store` loaded into the ledger.
    pub fn start(
        enabled: bool,
        limits: &LimitsConfig,
        log: Arc<UsageLog>,
        store: Store,
        reservation_ttl: Duration,
        welcome: Vec<WelcomePackage>,
        tally: Option<Arc<Tally>>,
    ) -> anyhow::Result<Billing> {
        let mut ledger = Ledger::new();
        let mut known = std::collections::HashSet::new();
        for b in store.buckets()? {
            known.insert(b.imsi.as_str().to_string());
            ledger.insert(b)?;
        }
        let store = Arc::new(Mutex::new(store));
        let (tx, rx) = std_mpsc::channel::<Applied>();
        let thread_store = store.clone();
        let applier = std::thread::Builder::new()
            .name("ledger-store".into())
            .spawn(move || apply_loop(&rx, &thread_store))?;
        Ok(Billing {
            tally,
            enabled,
            ledger: Mutex::new(ledger),
            limits: Mutex::new(Limiters::new(limits)),
            clock0: Instant::now(),
            log,
            store,
            applier: Mutex::new(Some(tx)),
            applier_thread: Mutex::new(Some(applier)),
            reservation_ttl,
            welcome,
            known: Mutex::new(known),
        })
    }

    /// Notes that a subscriber holds a package here (an operator's grant),
    /// so no welcome package follows.
    pub fn mark_known(&self, imsi: &Imsi) {
        self.known.lock().unwrap().insert(imsi.as_str().to_string());
    }

    /// Grants the welcome packages to a subscriber who never held a package
    /// here (durably, before the first reservation). Blocking: one SQLite
    /// transaction, once per new subscriber.
    fn welcome_if_new(&self, imsi: &Imsi, now: Timestamp) -> Result<(), ApiError> {
        if self.welcome.is_empty() {
            return Ok(());
        }
        let mut known = self.known.lock().unwrap();
        if known.contains(imsi.as_str()) {
            return Ok(());
        }
        for w in &self.welcome {
            let until = now + i64::from(w.valid_days) * 86_400;
            let bucket = self
                .store
                .lock()
                .unwrap()
                .grant(imsi, w.kind, w.tokens, now, until, now)
                .map_err(|e| ApiError::internal(format!("granting the welcome package: {e}")))?;
            tracing::info!(imsi = %imsi, bucket = bucket.id, tokens = w.tokens, kind = w.kind.as_str(), "welcome package granted");
            self.ledger
                .lock()
                .unwrap()
                .insert(bucket)
                .map_err(|e| ApiError::internal(e.to_string()))?;
        }
        known.insert(imsi.as_str().to_string());
        Ok(())
    }

    /// Metering on (false only in benchmark configurations).
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// The log.
    pub fn log(&self) -> &UsageLog {
        &self.log
    }

    /// The log, shared (the uploader reads and acknowledges it).
    pub fn shared_log(&self) -> Arc<UsageLog> {
        self.log.clone()
    }

    /// The ledger (admin API, metrics).
    pub fn ledger(&self) -> &Mutex<Ledger> {
        &self.ledger
    }

    /// The store (admin API).
    pub fn store(&self) -> &Arc<Mutex<Store>> {
        &self.store
    }

    /// 429 with Retry-After when a rate limit refuses; takes from every
    /// limit only when all allow.
    pub fn check_rate(&self, imsi: &Imsi, app: &str, tokens: u64) -> Result<(), ApiError> {
        let now = self.clock0.elapsed().as_secs_f64();
        let mut l = self.limits.lock().unwrap();
        let (imsi_key, app_key) = (imsi.to_string(), app.to_string());
        let checks: [(&mut Option<RateLimiter<String>>, &String, f64, &str); 4] = {
            let Limiters {
                imsi_rps,
                imsi_tpm,
                app_rps,
                app_tpm,
            } = &mut *l;
            [
                (
                    imsi_rps,
                    &imsi_key,
                    1.0,
                    "requests per second of this subscriber",
                ),
                (
                    imsi_tpm,
                    &imsi_key,
                    tokens as f64,
                    "tokens per minute of this subscriber",
                ),
                (app_rps, &app_key, 1.0, "requests per second of this app"),
                (
                    app_tpm,
                    &app_key,
                    tokens as f64,
                    "tokens per minute of this app",
                ),
            ]
        };
        let mut worst: Option<(f64, &str)> = None;
        for (lim, key, cost, what) in checks.iter() {
            if let Some(lim) = lim.as_ref() {
                let wait = lim.wait_for(key, *cost, now);
                if wait > 0.0 && worst.is_none_or(|(w, _)| wait > w) {
                    worst = Some((wait, what));
                }
            }
        }
        if let Some((wait, what)) = worst {
            return Err(ApiError::rate_limited(
                format!("rate limit exceeded: {what}; retry in {wait:.1} s"),
                wait.ceil() as u64,
            ));
        }
        for (lim, key, cost, _) in checks {
            if let Some(lim) = lim.as_mut() {
                let _ = lim.try_take(key, cost, now);
            }
        }
        Ok(())
    }

    /// 503 when the log cannot take a record now (nothing billable is served).
    pub fn check_log(&self) -> Result<(), ApiError> {
        if !self.enabled {
            return Ok(());
        }
        self.log.check_accepting(TYPICAL_RECORD_BYTES).map_err(|e| {
            ApiError::unavailable("usage_log_unavailable", format!("not serving: {e}"))
        })
    }

    /// Reserves `prompt + 1` to `prompt + wanted_completion` tokens; the
    /// reservation caps what the request may generate.
    pub fn reserve(
        &self,
        imsi: &Imsi,
        prompt: u64,
        wanted_completion: u64,
    ) -> Result<Option<Reservation>, ApiError> {
        if !self.enabled {
            return Ok(None);
        }
        let now = unix_now();
        self.welcome_if_new(imsi, now)?;
        let expires = now + self.reservation_ttl.as_secs() as i64;
        let mut ledger = self.ledger.lock().unwrap();
        ledger.expire(now);
        match ledger.reserve(imsi, prompt + 1, prompt + wanted_completion, now, expires) {
            Ok(r) => Ok(Some(r)),
            Err(LedgerError::InsufficientQuota { available, needed }) => Err(ApiError::insufficient_quota(format!(
                "the subscriber's packages have {available} tokens available; this request needs at least {needed} \
                 (its prompt and one completion token)"
            ))),
            Err(e) => Err(ApiError::internal(e.to_string())),
        }
    }

    /// Releases a reservation of a request that made no token.
    pub fn release(&self, reservation: Option<&Reservation>) {
        if let Some(r) = reservation {
            let _ = self.ledger.lock().unwrap().release(r.id);
        }
    }

    /// Settles a finished generation: debits, a durable usage record, the
    /// store behind it. Returns the usage told to the client (equal to the
    /// record). A generation that made no token releases its reservation and
    /// records nothing.
    pub async fn settle(
        &self,
        info: &RequestInfo,
        reservation: Option<&Reservation>,
        summary: &Summary,
    ) -> Result<Usage, ApiError> {
        let mut usage = Usage {
            prompt_tokens: summary.prompt_tokens as u64,
            cached_tokens: summary.cached_prompt_tokens as u64,
            completion_tokens: summary.completion_tokens as u64,
            seq: 0,
        };
        let Some(reservation) = reservation.filter(|_| self.enabled) else {
            return Ok(usage);
        };
        if summary.completion_tokens == 0 {
            self.release(Some(reservation));
            return Ok(usage);
        }
        let outcome = match summary.finish_reason {
            FinishReason::Stop => Outcome::Completed,
            FinishReason::Length => Outcome::Length,
            FinishReason::Cancelled => Outcome::Cancelled,
            FinishReason::Error => Outcome::Failed,
        };
        usage.seq = self
            .bill(Bill {
                request_id: info.request_id.as_bytes().to_vec(),
                imsi: &info.imsi,
                app: &info.app,
                model: &info.model,
                prompt_tokens: usage.prompt_tokens,
                cached_tokens: usage.cached_tokens,
                completion_tokens: usage.completion_tokens,
                reservation: Some(reservation),
                reserved_tokens: reservation.granted,
                outcome,
                start_ms: unix_ms(info.started),
                end_ms: unix_ms(SystemTime::now()),
                duration_us: info.started_at.elapsed().as_micros() as u64,
                ttft_us: summary.ttft.as_micros() as u64,
                failure_reason: summary.error.clone().unwrap_or_default(),
            })
            .await?;
        Ok(usage)
    }

    /// Debits the ledger (from the reservation when there is one, else
    /// directly), appends the record durably and hands the debits to the
    /// store thread. Returns the record's seq.
    async fn bill(&self, b: Bill<'_>) -> Result<u64, ApiError> {
        let billed = b.prompt_tokens + b.completion_tokens;
        let debits = match b.reservation {
            Some(r) => self
                .ledger
                .lock()
                .unwrap()
                .settle(r.id, billed)
                .unwrap_or_else(|e| {
                    // The reservation expired under a request that outlived the
                    // timeout: bill from the subscriber's buckets directly.
                    tracing::warn!(error = %e, "settling without the reservation");
                    Vec::new()
                }),
            None => Vec::new(),
        };
        let debits = if debits.is_empty() {
            self.debit_directly(b.imsi, billed)
        } else {
            debits
        };
        let record = UsageRecord {
            record_id: b.request_id,
            imsi: b.imsi.to_string(),
            app_id: b.app.to_string(),
            model_id: b.model.to_string(),
            prompt_tokens: b.prompt_tokens,
            cached_prompt_tokens: b.cached_tokens,
            completion_tokens: b.completion_tokens,
            reserved_tokens: b.reserved_tokens,
            package_ids: debits.iter().map(|d| d.bucket_id.to_string()).collect(),
            debits: debits
                .iter()
                .map(|d| PackageDebit {
                    package_id: d.bucket_id.to_string(),
                    tokens: d.tokens,
                    period: d.period,
                })
                .collect(),
            outcome: b.outcome as i32,
            start_time_unix_ms: b.start_ms,
            end_time_unix_ms: b.end_ms,
            clock_sync: ClockSync::Unknown as i32,
            duration_us: b.duration_us,
            ttft_us: b.ttft_us,
            offline: false,
            billed_tokens: billed,
            failure_reason: b.failure_reason,
            ..Default::default()
        };
        let seq = self.append_durably(&record).await?;
        let applied = Applied {
            seq,
            debits,
            usage: UsageRow {
                seq,
                imsi: record.imsi.clone(),
                at_ms: record.end_time_unix_ms,
                app: record.app_id.clone(),
                model: record.model_id.clone(),
                prompt_tokens: record.prompt_tokens,
                completion_tokens: record.completion_tokens,
                billed_tokens: billed,
                outcome: outcome_name(b.outcome).into(),
            },
        };
        if let Some(tx) = self.applier.lock().unwrap().as_ref() {
            let _ = tx.send(applied);
        }
        Ok(seq)
    }

    /// Takes an in-flight slot for a stream about to start (see
    /// [`super::tally`]); `None` when nothing is metered. A slot that cannot
    /// be written refuses the request: its tokens could not be billed after
    /// a crash.
    pub fn begin_stream(
        &self,
        info: &RequestInfo,
        prompt_tokens: u64,
        reservation: Option<&Reservation>,
    ) -> Result<Option<Counting>, ApiError> {
        let (Some(tally), Some(r)) = (&self.tally, reservation.filter(|_| self.enabled)) else {
            return Ok(None);
        };
        let started_ms = unix_ms(info.started);
        tally
            .begin(Entry {
                request_id: info.request_id.simple().to_string(),
                imsi: info.imsi.to_string(),
                app: info.app.clone(),
                model: info.model.clone(),
                started_ms,
                updated_ms: started_ms,
                prompt_tokens,
                completion_tokens: 0,
                reserved_tokens: r.granted,
                client_left: false,
                log_seq: self.log.stats().durable_seq,
            })
            .map(Some)
            .map_err(|e| {
                tracing::error!(error = %e, "in-flight tally");
                ApiError::unavailable("usage_not_recorded", format!("not streaming: {e}"))
            })
    }

    /// Bills what the previous process left in the in-flight tally (streams
    /// it was serving when it died), then empties the tally. Runs at
    /// start-up, before the API opens.
    pub async fn recover_streams(&self, left: Vec<Slot>) -> anyhow::Result<Recovered> {
        let mut out = Recovered::default();
        let Some(tally) = &self.tally else {
            return Ok(out);
        };
        for slot in left {
            let e = match slot {
                Slot::Live(e) => e,
                Slot::Free => continue,
                Slot::Corrupt(why) => {
                    tracing::error!(reason = %why, "an in-flight slot cannot be read (torn by a power cut?); its stream is not billed");
                    out.unreadable += 1;
                    continue;
                }
            };
            let id = uuid::Uuid::parse_str(&e.request_id)
                .with_context(|| format!("in-flight slot request id {:?}", e.request_id))?;
            if e.completion_tokens == 0 || self.logged(id, e.log_seq)? {
                out.already += 1;
                continue;
            }
            let imsi = Imsi::parse(&e.imsi)
                .map_err(|err| anyhow::anyhow!("in-flight slot IMSI {:?}: {err}", e.imsi))?;
            let outcome = if e.client_left {
                Outcome::Cancelled
            } else {
                Outcome::Failed
            };
            let seq = self
                .bill(Bill {
                    request_id: id.as_bytes().to_vec(),
                    imsi: &imsi,
                    app: &e.app,
                    model: &e.model,
                    prompt_tokens: e.prompt_tokens,
                    cached_tokens: 0,
                    completion_tokens: e.completion_tokens,
                    reservation: None,
                    reserved_tokens: e.reserved_tokens,
                    outcome,
                    start_ms: e.started_ms,
                    end_ms: e.updated_ms,
                    duration_us: (e.updated_ms - e.started_ms).max(0) as u64 * 1000,
                    ttft_us: 0,
                    failure_reason: if e.client_left {
                        String::new()
                    } else {
                        "the agent stopped while streaming; billed the tokens streamed".into()
                    },
                })
                .await
                .map_err(|err| anyhow::anyhow!("billing an interrupted stream: {}", err.message))?;
            tracing::warn!(
                seq,
                request_id = %id,
                imsi = %imsi,
                completion_tokens = e.completion_tokens,
                "billed a stream the previous process did not settle"
            );
            out.billed += 1;
        }
        tally.clear()?;
        Ok(out)
    }

    /// Whether the log holds a record of `id` after `after_seq`.
    fn logged(&self, id: uuid::Uuid, after_seq: u64) -> anyhow::Result<bool> {
        let mut from = after_seq + 1;
        loop {
            let batch = self.log.read_from(from, 1024, 8 << 20)?;
            if batch.is_empty() {
                return Ok(false);
            }
            for (seq, bytes) in &batch {
                from = seq + 1;
                let r = SignedRecord::from_bytes(bytes)?.record()?;
                if r.record_id == id.as_bytes() {
                    return Ok(true);
                }
            }
        }
    }

    /// Debits without a reservation, nearest expiry first (a request that
    /// outlived its reservation).
    fn debit_directly(&self, imsi: &Imsi, tokens: u64) -> Vec<Debit> {
        let now = unix_now();
        let mut ledger = self.ledger.lock().unwrap();
        let granted = ledger.reserve(imsi, 0, tokens, now, now + 1).ok();
        match granted {
            Some(r) => ledger.settle(r.id, tokens).unwrap_or_default(),
            None => Vec::new(),
        }
    }

    /// Appends with a few retries on a transient failure; the response waits
    /// for it. A record that cannot be made durable is logged in full at
    /// error level (never dropped silently) and the client gets 503.
    async fn append_durably(&self, record: &UsageRecord) -> Result<u64, ApiError> {
        let mut delay = Duration::from_millis(20);
        let mut last: Option<LogError> = None;
        for _ in 0..4 {
            match self.log.append(record.clone()).await {
                Ok(seq) => return Ok(seq),
                Err(e @ (LogError::TooLarge(_) | LogError::Closed)) => {
                    last = Some(e);
                    break;
                }
                Err(e) => {
                    last = Some(e);
                    tokio::time::sleep(delay).await;
                    delay *= 4;
                }
            }
        }
        let e = last.map(|e| e.to_string()).unwrap_or_default();
        tracing::error!(
            error = %e,
            record = %mec_sync::record::record_to_json(record),
            "a usage record could not be made durable"
        );
        Err(ApiError::unavailable(
            "usage_not_recorded",
            format!("the usage of this request could not be recorded: {e}"),
        ))
    }

    /// Stops the store thread after it applied everything sent.
    pub fn shutdown(&self) {
        self.applier.lock().unwrap().take();
        if let Some(t) = self.applier_thread.lock().unwrap().take() {
            let _ = t.join();
        }
    }
}

fn outcome_name(o: Outcome) -> &'static str {
    match o {
        Outcome::Completed => "completed",
        Outcome::Length => "length",
        Outcome::Cancelled => "cancelled",
        Outcome::Failed => "failed",
        Outcome::Unspecified => "unspecified",
    }
}

/// The store thread: applies settlements in batches (one transaction each).
fn apply_loop(rx: &std_mpsc::Receiver<Applied>, store: &Mutex<Store>) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < 512 {
            match rx.try_recv() {
                Ok(a) => batch.push(a),
                Err(_) => break,
            }
        }
        if let Err(e) = store.lock().unwrap().apply(&batch) {
            // The records are durable in the log: the next start re-applies them.
            tracing::error!(error = %e, records = batch.len(), "ledger store update failed; the log will replay it");
        }
    }
}

/// Re-applies to `store` the debits of every record in `log` it has not
/// applied (a crash between an append and its store update). Returns how
/// many records were re-applied.
pub fn replay_log(log: &UsageLog, store: &mut Store) -> anyhow::Result<usize> {
    let mut from = store.applied_watermark()? + 1;
    let mut replayed = 0;
    loop {
        let batch = log.read_from(from, 1024, 8 << 20)?;
        if batch.is_empty() {
            break;
        }
        let mut applied = Vec::new();
        for (seq, bytes) in &batch {
            from = seq + 1;
            if store.is_applied(*seq)? {
                continue;
            }
            let r = SignedRecord::from_bytes(bytes)?.record()?;
            let debits = r
                .debits
                .iter()
                .filter_map(|d| {
                    Some(Debit {
                        bucket_id: d.package_id.parse().ok()?,
                        tokens: d.tokens,
                        period: d.period,
                    })
                })
                .collect();
            applied.push(Applied {
                seq: *seq,
                debits,
                usage: UsageRow {
                    seq: *seq,
                    imsi: r.imsi.clone(),
                    at_ms: r.end_time_unix_ms,
                    app: r.app_id.clone(),
                    model: r.model_id.clone(),
                    prompt_tokens: r.prompt_tokens,
                    completion_tokens: r.completion_tokens,
                    billed_tokens: r.billed_tokens,
                    outcome: outcome_name(r.outcome()).into(),
                },
            });
        }
        replayed += store.apply(&applied)?;
    }
    Ok(replayed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use mec_metering::BucketKind;
    use mec_sync::identity::NodeIdentity;
    use mec_sync::log::{BackendChoice, LogOptions};

    fn record(imsi: &Imsi, bucket: u64, tokens: u64) -> UsageRecord {
        UsageRecord {
            imsi: imsi.to_string(),
            billed_tokens: tokens,
            package_ids: vec![bucket.to_string()],
            debits: vec![PackageDebit {
                package_id: bucket.to_string(),
                tokens,
                period: 0,
            }],
            outcome: Outcome::Completed as i32,
            ..Default::default()
        }
    }

    /// The crash window: records durable in the log, some never applied to
    /// the store. Replay applies exactly those, once.
    #[tokio::test]
    async fn records_the_store_missed_are_reapplied_once() {
        let dir = tempfile::tempdir().unwrap();
        let log = UsageLog::open(
            &dir.path().join("log"),
            NodeIdentity::generate().unwrap(),
            "test-node",
            LogOptions {
                backend: BackendChoice::File,
                ..LogOptions::default()
            },
        )
        .unwrap();
        let mut store = Store::open(&dir.path().join("ledger.sqlite")).unwrap();
        let imsi = Imsi::parse("001010000000001").unwrap();
        let b = store
            .grant(&imsi, BucketKind::Topup, 1000, 0, i64::MAX / 2, 0)
            .unwrap();
        let mut seqs = Vec::new();
        for tokens in [10, 20, 30] {
            seqs.push(log.append(record(&imsi, b.id, tokens)).await.unwrap());
        }
        // Only the second reached the store before the "crash".
        let row = |seq| UsageRow {
            seq,
            imsi: imsi.to_string(),
            at_ms: 0,
            app: String::new(),
            model: String::new(),
            prompt_tokens: 0,
            completion_tokens: 0,
            billed_tokens: 20,
            outcome: "completed".into(),
        };
        let debit = Debit {
            bucket_id: b.id,
            tokens: 20,
            period: 0,
        };
        store
            .apply(&[Applied {
                seq: seqs[1],
                debits: vec![debit],
                usage: row(seqs[1]),
            }])
            .unwrap();
        assert_eq!(replay_log(&log, &mut store).unwrap(), 2);
        assert_eq!(store.buckets().unwrap()[0].used, 60);
        assert_eq!(store.applied_watermark().unwrap(), 3);
        assert_eq!(replay_log(&log, &mut store).unwrap(), 0);
        assert_eq!(store.buckets().unwrap()[0].used, 60);
    }
}
