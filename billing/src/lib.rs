//! Billing on the edge: everything between "a request arrived" and "its
//! tokens are on a signed usage record and debited from the packages".
//!
//! [`Billing`] owns the quota ledger, the ledger store, the log handle it
//! appends to and the in-flight tally, and offers a small API:
//!
//! * [`Billing::admit`]: rate limits, room in the log, the reservation, a
//!   stream's in-flight slot. Returns an [`Admission`], which owns the
//!   reservation for exactly as long as the request lives.
//! * [`Admission::settle`]: the debits, the durable record, the store.
//! * [`Billing::grant`], [`Billing::revoke`], [`Billing::balance`],
//!   [`Billing::recent_usage`]: the operator's side.
//! * [`replay_log`] (inside [`Billing::start`]) and
//!   [`Billing::recover_streams`]: what a crash left.
//!
//! It has its own error type ([`BillingError`]); the HTTP server maps it to
//! statuses. It knows nothing of HTTP or the model.
//!
//! # The promises, and how they are kept
//!
//! * **A reservation held by a live request never expires.** It lives in
//!   the [`Admission`]; dropping the admission (the request is gone, however
//!   it ended) releases it at once. No clock is involved, so neither a long
//!   queue nor a clock stepped forward can free a hold under a running request.
//! * **No record carries billed tokens without the debits that pay for
//!   them.** A record can only be built from a [`Settlement`], which exists
//!   only when its debits sum to the tokens billed. Tokens no package covers
//!   are refused and alarmed ([`BillingError::Unfunded`]), never recorded free.
//! * **Nothing is debited before its record is durable.** The debits are
//!   computed from the reservation, written into the record, and committed
//!   to the ledger only after the log's `fdatasync`; a record that never made
//!   it debits nothing, and its tokens stay held.
//! * **Every token a client received is billed.** A stream's tokens are
//!   counted in the tally before the client gets them. A stream whose record
//!   cannot be written now (a full log) keeps its reservation and its slot
//!   and is billed by [`Billing::bill_pending`] once the log has room; at
//!   start-up the slots a dead process left are billed the same way, so a
//!   full log never stops the agent from starting.
//! * **The store is a view of the log.** Its updates are applied on a thread
//!   of their own, retried until they succeed; the log is acknowledged to the
//!   core no further than the store's applied watermark ([`AppliedWatermark`]).

pub mod error;
pub mod record;
pub mod tally;

mod applier;
mod limits;

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use mec_metering::grants::{GrantCache, GrantChange, GrantCounters, Now};
use mec_metering::ledger::{Balance, Bucket, BucketKind, Ledger, LedgerError, Timestamp};
pub use mec_metering::rating::{AppliedRate, Rate};
use mec_metering::store::{Store, UsageRow};
use mec_metering::Imsi;
use mec_sync::downlink::{AskError, DownlinkSink, DownlinkStatus, GrantAnswer, GrantAsker};
use mec_sync::log::{LogError, UsageLog};
use mec_sync::record::pb::{Outcome, UsageRecord};
use mec_sync::record::SignedRecord;
use mec_sync::wire::pb;

pub use error::BillingError;
pub use limits::RateLimits;
use record::unix_ms;
pub use record::{Bill, RequestDetail, Settlement};
use tally::{Counting, Entry, Slot, Tally};

/// Unix seconds now (the wall clock: packages' calendar windows).
pub fn unix_now() -> Timestamp {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Both clocks now: the wall clock, and the monotonic clock that judges
/// grants (`CLOCK_BOOTTIME`, seconds: it runs on across the agent's
/// restarts and is never stepped).
pub fn clocks() -> Now {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given.
    let mono = if unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) } == 0 {
        ts.tv_sec
    } else {
        // No boot clock: the process's own monotonic clock, from a fixed
        // point (deadlines then last across restarts by the wall clock).
        static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
        START.get_or_init(Instant::now).elapsed().as_secs() as i64
    };
    Now {
        wall: unix_now(),
        mono,
    }
}

/// This boot's id (`/proc/sys/kernel/random/boot_id`): a grant's deadline
/// on the monotonic clock holds only within the boot that set it.
fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| format!("pid-{}", std::process::id()))
}

/// How billing is set up.
#[derive(Debug, Clone, Default)]
pub struct BillingConfig {
    /// Metering on (off only in benchmark configurations).
    pub enabled: bool,
    /// The rate limits.
    pub limits: RateLimits,
    /// Packages a subscriber gets the first time the box sees them (the
    /// site configuration's default packages). With a core, only for a
    /// subscriber the core does not know, or while it cannot be reached.
    pub welcome: Vec<WelcomePackage>,
    /// The core that sells the packages, when one is configured: requests
    /// are served from its grants ([`mec_metering::grants`]), asked for on
    /// the downlink; `admin grant` is refused.
    pub core: Option<GrantAsker>,
    /// The digest of every rate table the box kept, by version: a stream
    /// a dead process left is billed at the rate it started with, and its
    /// record names that table (the in-flight tally keeps the version).
    pub rate_digests: std::collections::BTreeMap<u64, Vec<u8>>,
    /// Each kept table's tiers (model id to tier), by version: such a
    /// stream is billed first from the packages for its model or tier.
    pub rate_tiers: std::collections::BTreeMap<u64, std::collections::BTreeMap<String, String>>,
}

/// How long after its end (wall clock) the box keeps a core's grant; the
/// agent forgets older ones when it starts.
pub const GRANTS_KEPT_AFTER_END_S: i64 = 7 * 86_400;

/// How long a request waits for the core's answer when it finds no grant.
pub const GRANT_WAIT: Duration = Duration::from_secs(5);

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

/// Every seq at or below this is applied to the ledger store: the uploader
/// acknowledges the log no further (a record leaves the log only after its
/// debits are in the store). Made by the wiring, shared by billing (which
/// advances it) and the uploader (which reads it).
#[derive(Debug, Clone, Default)]
pub struct AppliedWatermark(Arc<AtomicU64>);

impl AppliedWatermark {
    /// The watermark.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }

    fn set(&self, seq: u64) {
        self.0.fetch_max(seq, Ordering::AcqRel);
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
    /// The end user, choices and constraint, for the record.
    pub detail: RequestDetail,
    /// The rate its model is served at (the table in force when it
    /// started): its reservation and its bill are in package units.
    pub rate: AppliedRate,
}

/// What a request asks to be admitted for.
#[derive(Debug, Clone, Copy)]
pub struct Admit<'a> {
    /// The request.
    pub info: &'a RequestInfo,
    /// Its prompt tokens.
    pub prompt_tokens: u64,
    /// The most completion tokens it asks for.
    pub max_completion: u64,
    /// The fewest completion tokens worth admitting it for (1; `n` for `n`
    /// choices, one each): a reservation that cannot cover them is refused.
    pub min_completion: u64,
    /// Streamed: its tokens are counted in the in-flight tally.
    pub stream: bool,
}

/// How a generation ended, as billing needs it.
#[derive(Debug, Clone, Default)]
pub struct Settled {
    /// Prompt tokens.
    pub prompt_tokens: u64,
    /// Of them, from the prefix cache.
    pub cached_prompt_tokens: u64,
    /// Completion tokens.
    pub completion_tokens: u64,
    /// How it ended.
    pub outcome: Outcome,
    /// Time to the first token.
    pub ttft: Duration,
    /// Why it failed, when it did.
    pub failure_reason: Option<String>,
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
    /// Slots whose record was already written, or that streamed nothing.
    pub already: usize,
    /// Slots that could not be read.
    pub unreadable: usize,
    /// Streams that cannot be billed yet (the log is full, or no package
    /// covers them): they keep their slot and are billed once they can be.
    pub waiting: usize,
}

/// Bytes of a typical record: admission (and readiness) ask the log for
/// room for one before serving billable work.
pub const TYPICAL_RECORD_BYTES: u64 = 512;

/// Billing. Cheap to clone (a handle).
#[derive(Clone)]
pub struct Billing {
    inner: Arc<Inner>,
}

struct Inner {
    enabled: bool,
    /// The core's grants held here, and the questions out. Locked before
    /// the ledger when both are (never the other way round).
    grants: Mutex<GrantCache>,
    /// This boot's id (grants' deadlines are on its monotonic clock).
    boot: String,
    /// The core, when packages are sold there.
    core: Option<GrantAsker>,
    ledger: Mutex<Ledger>,
    limits: Mutex<limits::Limiters>,
    log: Arc<UsageLog>,
    store: Arc<Mutex<Store>>,
    applier: applier::Applier,
    tally: Option<Arc<Tally>>,
    welcome: Vec<WelcomePackage>,
    /// Subscribers that ever held a package here (so a subscriber whose
    /// welcome package ran out does not get another).
    known: Mutex<HashSet<String>>,
    /// Streams whose tokens a client received and whose record could not be
    /// written yet.
    pending: Mutex<Vec<Pending>>,
    /// Rate tables' digests by version.
    rate_digests: std::collections::BTreeMap<u64, Vec<u8>>,
    /// Rate tables' tiers by version.
    rate_tiers: std::collections::BTreeMap<u64, std::collections::BTreeMap<String, String>>,
    /// One [`Billing::bill_pending`] at a time.
    billing_pending: tokio::sync::Mutex<()>,
}

/// A stream to bill once the log has room (or a package covers it).
struct Pending {
    bill: Bill,
    /// Its hold; `None` for a stream of the previous process, until one is
    /// taken for it.
    reservation: Option<u64>,
    slot: Counting,
    /// When the stream began (Unix s): the packages valid then pay for it.
    started_s: Timestamp,
    alarmed: bool,
}

impl Billing {
    /// Starts billing over `log` and `store`: re-applies to the store the
    /// records it missed (a crash between an append and its store update),
    /// loads the packages into the ledger and starts the store thread.
    /// `tally` is `None` only in tests and benchmarks that keep no slots.
    pub fn start(
        config: BillingConfig,
        log: Arc<UsageLog>,
        mut store: Store,
        tally: Option<Arc<Tally>>,
        applied: AppliedWatermark,
    ) -> Result<Billing, BillingError> {
        let replayed = replay_log(&log, &mut store)?;
        if replayed > 0 {
            tracing::warn!(
                records = replayed,
                "re-applied usage records the ledger store had missed"
            );
        }
        applied.set(store.applied_watermark()?);
        // Grants that ended a week ago pay for nothing any more (the core
        // settles their usage from the records): forgotten, with their
        // buckets, so the ledger does not grow with uptime.
        let pruned = store.prune_grants(unix_now().saturating_sub(GRANTS_KEPT_AFTER_END_S))?;
        if pruned > 0 {
            tracing::info!(
                grants = pruned,
                "forgot the core's grants that ended a week ago"
            );
        }
        let boot = boot_id();
        let grants = GrantCache::new(store.downlink_applied()?, store.grants(clocks(), &boot)?);
        let mut ledger = Ledger::new();
        let mut known = HashSet::new();
        for b in store.buckets()? {
            known.insert(b.imsi.as_str().to_string());
            ledger
                .insert(b)
                .map_err(|e| BillingError::Internal(e.to_string()))?;
        }
        let store = Arc::new(Mutex::new(store));
        let applier = applier::Applier::start(store.clone(), applied, tally.clone())
            .map_err(|e| BillingError::Internal(format!("starting the store thread: {e}")))?;
        Ok(Billing {
            inner: Arc::new(Inner {
                enabled: config.enabled,
                grants: Mutex::new(grants),
                boot,
                core: config.core,
                ledger: Mutex::new(ledger),
                limits: Mutex::new(limits::Limiters::new(&config.limits)),
                log,
                store,
                applier,
                tally,
                welcome: config.welcome,
                known: Mutex::new(known),
                pending: Mutex::default(),
                rate_digests: config.rate_digests,
                rate_tiers: config.rate_tiers,
                billing_pending: tokio::sync::Mutex::default(),
            }),
        })
    }

    /// Metering on.
    pub fn enabled(&self) -> bool {
        self.inner.enabled
    }

    /// Admits a request: rate limits, room in the log, the welcome packages
    /// of a subscriber new here, the reservation (prompt + 1 to prompt +
    /// `max_completion` tokens), and a stream's in-flight slot. Blocking
    /// only for a new subscriber's welcome grant (one SQLite transaction).
    pub fn admit(&self, a: Admit<'_>) -> Result<Admission, BillingError> {
        self.admit_with(a, true)
    }

    /// [`Billing::admit`]; `rate_limits` false for a request admitted
    /// again after waiting for a grant (its limits were taken once).
    fn admit_with(&self, a: Admit<'_>, rate_limits: bool) -> Result<Admission, BillingError> {
        let mut admission = Admission {
            billing: self.clone(),
            info: a.info.clone(),
            reservation: None,
            granted: 0,
            cap: a.max_completion,
            counting: None,
        };
        if !self.inner.enabled {
            return Ok(admission);
        }
        let info = a.info;
        if rate_limits {
            self.inner.limits.lock().unwrap().check(
                info.imsi.as_str(),
                &info.app,
                a.prompt_tokens + a.max_completion,
            )?;
        }
        self.inner
            .log
            .check_accepting(TYPICAL_RECORD_BYTES)
            .map_err(BillingError::LogUnavailable)?;
        let now = unix_now();
        if self.inner.core.is_none() {
            self.welcome_if_new(&info.imsi, now)?;
        }
        let connected = self.core_connected();
        let mono = clocks().mono;
        let grants = self.inner.grants.lock().unwrap();
        // In package units at the request's rate (units are tokens
        // without a rate table).
        let rate = &info.rate.rate;
        let tier = info.rate.tier.as_deref();
        let mut ledger = self.inner.ledger.lock().unwrap();
        let r = ledger
            .reserve_from(
                &info.imsi,
                rate.reserve_units(
                    a.prompt_tokens,
                    a.min_completion.clamp(1, a.max_completion.max(1)),
                ),
                rate.reserve_units(a.prompt_tokens, a.max_completion),
                now,
                // Packages for this model (or its tier) only.
                &|b| b.covers(&info.model, tier) && grants.admits(b, &info.model, connected, mono),
            )
            .map_err(|e| match e {
                // Nothing for this model, while packages for others have
                // units left: the package's rule refuses it, not the balance.
                LedgerError::InsufficientQuota { available: 0, .. } => {
                    let packages: Vec<(u64, Vec<String>)> = ledger
                        .balance(&info.imsi, now)
                        .buckets
                        .into_iter()
                        .filter(|b| {
                            b.active
                                && b.remaining > b.reserved
                                && !b.models.is_empty()
                                && !b
                                    .models
                                    .iter()
                                    .any(|m| *m == info.model || Some(m.as_str()) == tier)
                        })
                        .map(|b| (b.id, b.models))
                        .collect();
                    if packages.is_empty() {
                        BillingError::InsufficientQuota {
                            available: 0,
                            needed: rate.reserve_units(a.prompt_tokens, a.min_completion.max(1)),
                        }
                    } else {
                        BillingError::ModelNotCovered {
                            model: info.model.clone(),
                            tier: tier.map(str::to_string),
                            packages,
                        }
                    }
                }
                LedgerError::InsufficientQuota { available, needed } => {
                    BillingError::InsufficientQuota { available, needed }
                }
                e => BillingError::Internal(e.to_string()),
            })?;
        drop(ledger);
        drop(grants);
        admission.reservation = Some(r.id);
        admission.granted = r.granted;
        admission.cap = rate
            .completion_within(r.granted, a.prompt_tokens)
            .min(a.max_completion);
        if let (true, Some(tally)) = (a.stream, &self.inner.tally) {
            let started_ms = unix_ms(info.started);
            let counting = tally
                .begin(Entry {
                    request_id: info.request_id.simple().to_string(),
                    imsi: info.imsi.to_string(),
                    app: info.app.clone(),
                    model: info.model.clone(),
                    started_ms,
                    updated_ms: started_ms,
                    prompt_tokens: a.prompt_tokens,
                    completion_tokens: 0,
                    reserved_tokens: r.granted,
                    client_left: false,
                    log_seq: self.inner.log.stats().durable_seq,
                    end_user: info.detail.end_user.clone(),
                    choices: info.detail.choices,
                    constraint: info.detail.constraint.clone(),
                    rate: tally::RateEntry::of(&info.rate),
                })
                .map_err(|e| {
                    tracing::error!(error = %e, "in-flight tally");
                    BillingError::TallyUnavailable(e.to_string())
                })?;
            admission.counting = Some(counting);
        }
        Ok(admission)
    }

    /// A core is configured and its downlink is up (without a core: true,
    /// nothing is offline).
    fn core_connected(&self) -> bool {
        self.inner.core.as_ref().is_none_or(GrantAsker::connected)
    }

    /// [`Billing::admit`], asking the core for a grant when the box holds
    /// none that covers the request (a subscriber seen here for the first
    /// time, or one whose grants are spent), waiting up to [`GRANT_WAIT`]
    /// for it; and, once admitted, asking in the background for more when
    /// what is left of the subscriber's grants falls to their threshold.
    /// Without a core, the same as `admit`.
    pub async fn admit_or_ask(&self, a: Admit<'_>) -> Result<Admission, BillingError> {
        self.admit_or_ask_with(a, true).await
    }

    /// [`Billing::admit_or_ask`] for a request whose rate limits were
    /// already taken (a routed request trying its next model: one request,
    /// counted once).
    pub async fn admit_or_ask_again(&self, a: Admit<'_>) -> Result<Admission, BillingError> {
        self.admit_or_ask_with(a, false).await
    }

    async fn admit_or_ask_with(
        &self,
        a: Admit<'_>,
        take_limits: bool,
    ) -> Result<Admission, BillingError> {
        let Some(asker) = self.inner.core.clone().filter(|_| self.inner.enabled) else {
            return self.admit_with(a, take_limits);
        };
        let (imsi, model) = (&a.info.imsi, a.info.model.as_str());
        let deadline = tokio::time::Instant::now() + GRANT_WAIT;
        // The rate limits are taken once, by the first try.
        let mut first = take_limits;
        loop {
            match self.admit_with(a, std::mem::replace(&mut first, false)) {
                Err(BillingError::InsufficientQuota { .. }) => {}
                Ok(admission) => {
                    self.top_up_if_low(&asker, imsi, model);
                    return Ok(admission);
                }
                Err(e) => return Err(e),
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(BillingError::NoGrant(
                    "the core did not answer in time".into(),
                ));
            }
            // One question per subscriber and model: a request that finds
            // one out waits for its grant instead of asking again.
            let mine = self.inner.grants.lock().unwrap().ask_now(imsi, model);
            if !mine {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
            // The question ends with this request, however it ends (a
            // client that leaves drops this future mid-question).
            let question = Question {
                billing: self,
                imsi,
                model,
                refused: false,
            };
            let answer = asker
                .ask(
                    imsi.as_str(),
                    model,
                    0,
                    deadline - tokio::time::Instant::now(),
                )
                .await;
            question.end(refused(&answer));
            match answer {
                // Applied before the answer came: admit again.
                Ok(GrantAnswer::Granted(_)) => continue,
                Ok(GrantAnswer::Refused { code, message }) => {
                    if code == "unknown_subscriber" && self.welcome_unknown(imsi).await? {
                        return self.admit_with(a, false);
                    }
                    return Err(if code == "unavailable" {
                        BillingError::NoGrant(format!("the core could not grant one: {message}"))
                    } else {
                        BillingError::GrantRefused { code, message }
                    });
                }
                Err(AskError::NotConnected) => {
                    if self.welcome_unknown(imsi).await? {
                        return self.admit_with(a, false);
                    }
                    return Err(BillingError::NoGrant("the core cannot be reached".into()));
                }
                Err(AskError::TimedOut(_)) => {
                    return Err(BillingError::NoGrant(
                        "the core did not answer in time".into(),
                    ))
                }
            }
        }
    }

    /// The site's welcome packages for a subscriber the core does not know
    /// (or while it cannot be reached), when the site has any and the
    /// subscriber never held a package here; true when granted now.
    async fn welcome_unknown(&self, imsi: &Imsi) -> Result<bool, BillingError> {
        if self.inner.welcome.is_empty() || self.inner.known.lock().unwrap().contains(imsi.as_str())
        {
            return Ok(false);
        }
        let this = self.clone();
        let imsi2 = imsi.clone();
        // One SQLite transaction per package; the request waits for it.
        tokio::task::spawn_blocking(move || this.welcome_if_new(&imsi2, unix_now()))
            .await
            .map_err(|e| BillingError::Internal(e.to_string()))??;
        Ok(self.inner.known.lock().unwrap().contains(imsi.as_str()))
    }

    /// Asks the core for more in the background when what is left of
    /// `imsi`'s grants for `model` is at or below their threshold.
    fn top_up_if_low(&self, asker: &GrantAsker, imsi: &Imsi, model: &str) {
        if !asker.connected() {
            return;
        }
        let now = clocks();
        let mut grants = self.inner.grants.lock().unwrap();
        let left = self
            .inner
            .ledger
            .lock()
            .unwrap()
            .available_from(imsi, now.wall, &|b| {
                grants.is_granted(b.id) && grants.admits(b, model, true, now.mono)
            });
        if !grants.should_ask(imsi, model, left, now.mono) {
            return;
        }
        drop(grants);
        let (this, asker, imsi, model) =
            (self.clone(), asker.clone(), imsi.clone(), model.to_string());
        tokio::spawn(async move {
            let question = Question {
                billing: &this,
                imsi: &imsi,
                model: &model,
                refused: false,
            };
            let answer = asker.ask(imsi.as_str(), &model, 0, GRANT_WAIT).await;
            if let Ok(GrantAnswer::Refused { code, message }) = &answer {
                tracing::info!(%imsi, %model, %code, %message, "the core refused more quota");
            }
            question.end(refused(&answer));
        });
    }

    /// Grants the welcome packages to a subscriber who never held a package
    /// here (durably, before the first reservation).
    fn welcome_if_new(&self, imsi: &Imsi, now: Timestamp) -> Result<(), BillingError> {
        if self.inner.welcome.is_empty() {
            return Ok(());
        }
        let mut known = self.inner.known.lock().unwrap();
        if known.contains(imsi.as_str()) {
            return Ok(());
        }
        for w in &self.inner.welcome {
            let until = now + i64::from(w.valid_days) * 86_400;
            let bucket =
                self.grant_locked(&mut known, imsi, w.kind, w.tokens, (now, until), &[], now)?;
            tracing::info!(imsi = %imsi, bucket = bucket.id, tokens = w.tokens, kind = w.kind.as_str(), "welcome package granted");
        }
        Ok(())
    }

    /// Grants a package: durable in the store, then in the ledger. The
    /// subscriber no longer gets the welcome packages. Blocking (SQLite).
    pub fn grant(
        &self,
        imsi: &Imsi,
        kind: BucketKind,
        tokens: u64,
        valid_from: Timestamp,
        expires_at: Timestamp,
    ) -> Result<Bucket, BillingError> {
        self.grant_for(imsi, kind, tokens, (valid_from, expires_at), &[])
    }

    /// [`Billing::grant`] of a package that may be spent only on `models`
    /// (model ids or tiers of the rate table; empty: every model).
    pub fn grant_for(
        &self,
        imsi: &Imsi,
        kind: BucketKind,
        tokens: u64,
        (valid_from, expires_at): (Timestamp, Timestamp),
        models: &[String],
    ) -> Result<Bucket, BillingError> {
        if self.inner.core.is_some() {
            return Err(BillingError::CoreManaged(
                "this box takes its packages from the core: sell the package there \
                 (`core-ingest package sell`, or the core's operator API); \
                 `admin grant` is for a box without a core"
                    .into(),
            ));
        }
        let mut known = self.inner.known.lock().unwrap();
        self.grant_locked(
            &mut known,
            imsi,
            kind,
            tokens,
            (valid_from, expires_at),
            models,
            unix_now(),
        )
    }

    /// The one grant sequence (operator grants and welcome packages).
    #[allow(clippy::too_many_arguments)]
    fn grant_locked(
        &self,
        known: &mut HashSet<String>,
        imsi: &Imsi,
        kind: BucketKind,
        tokens: u64,
        window: (Timestamp, Timestamp),
        models: &[String],
        now: Timestamp,
    ) -> Result<Bucket, BillingError> {
        let bucket = self
            .inner
            .store
            .lock()
            .unwrap()
            .grant_for(imsi, kind, tokens, window, models, now)?;
        self.inner
            .ledger
            .lock()
            .unwrap()
            .insert(bucket.clone())
            .map_err(|e| BillingError::Internal(e.to_string()))?;
        known.insert(imsi.as_str().to_string());
        Ok(bucket)
    }

    /// Revokes a package: it gives nothing from now on (running requests
    /// holding tokens of it are still billed). Blocking (SQLite).
    pub fn revoke(&self, bucket_id: u64) -> Result<(), BillingError> {
        if let Some(grant) = self.inner.grants.lock().unwrap().grant_of(bucket_id) {
            return Err(BillingError::CoreManaged(format!(
                "bucket {bucket_id} holds the core's grant {grant}: revoke its package at the core \
                 (`core-ingest package revoke`)"
            )));
        }
        if !self.inner.store.lock().unwrap().revoke(bucket_id)? {
            return Err(BillingError::UnknownPackage(bucket_id));
        }
        let _ = self.inner.ledger.lock().unwrap().revoke(bucket_id);
        Ok(())
    }

    /// The box's end of the downlink: applies the core's grants and
    /// revocations (the uploader serves it on each connection).
    pub fn downlink_sink(&self) -> Arc<dyn DownlinkSink> {
        Arc::new(GrantSink(self.clone()))
    }

    /// Applies one downlink message: planned by the grant cache, durable in
    /// the store, then in the ledger and the cache. Blocking (SQLite).
    fn apply_downlink(&self, m: &pb::Downlink) -> Result<(), BillingError> {
        let received = mec_sync::downlink::received(m);
        let now = clocks();
        let Some(change) = self.inner.grants.lock().unwrap().plan(m.seq, received, now) else {
            return Ok(()); // applied before
        };
        // Durable first, the grant cache unlocked meanwhile (admissions go on
        // during the commit); the store applies a seq once whoever asks.
        let held = self.inner.store.lock().unwrap().apply_downlink(
            m.seq,
            &change,
            now.wall,
            &self.inner.boot,
        )?;
        let mut grants = self.inner.grants.lock().unwrap();
        match (&change, &held) {
            (GrantChange::Grant { .. }, Some(h)) => {
                let mut ledger = self.inner.ledger.lock().unwrap();
                for b in h.buckets() {
                    ledger
                        .insert(b)
                        .map_err(|e| BillingError::Internal(e.to_string()))?;
                }
                drop(ledger);
                self.inner
                    .known
                    .lock()
                    .unwrap()
                    .insert(h.terms.imsi.as_str().to_string());
                tracing::info!(seq = m.seq, grant = h.terms.grant_id, imsi = %h.terms.imsi, tokens = h.terms.tokens, valid_s = h.terms.valid_for_s, "grant from the core");
            }
            (GrantChange::Revoke { grant_id }, _) => {
                let mut ledger = self.inner.ledger.lock().unwrap();
                for b in grants.revoke(*grant_id) {
                    let _ = ledger.revoke(b);
                }
                tracing::info!(seq = m.seq, grant = grant_id, "grant revoked by the core");
            }
            _ => {}
        }
        grants.applied_message(m.seq, held);
        Ok(())
    }

    /// The core's grants as the admin API and the metrics show them.
    pub fn grants_view(&self) -> GrantsView {
        let now = clocks();
        let grants = self.inner.grants.lock().unwrap();
        let ledger = self.inner.ledger.lock().unwrap();
        let live: Vec<_> = grants.live(now.mono).collect();
        let tokens_left = live
            .iter()
            .filter_map(|g| ledger.bucket(g.bucket_id))
            .map(|b| b.remaining(now.wall))
            .fold(0u64, u64::saturating_add);
        GrantsView {
            held: live.len(),
            tokens_left,
            asking: grants.asking(),
            counters: grants.counters(),
            downlink: self.inner.core.as_ref().map(GrantAsker::status),
        }
    }

    /// A subscriber's balance now. The core's grants count while they are
    /// live (their offline allowances never do), and show their own end.
    pub fn balance(&self, imsi: &Imsi) -> Balance {
        let now = clocks();
        let grants = self.inner.grants.lock().unwrap();
        let ledger = self.inner.ledger.lock().unwrap();
        let mut balance = ledger.balance(imsi, now.wall);
        balance.remaining_tokens =
            ledger.available_from(imsi, now.wall, &|b| grants.in_balance(b, now.mono));
        for view in &mut balance.buckets {
            if let Some(g) = grants.held_by(view.id) {
                view.expires_at = g.expires_at;
                view.tokens_expire_at = g.expires_at;
                view.valid_from = g.expires_at.saturating_sub(g.terms.valid_for_s);
                view.active = !g.revoked && now.mono < g.deadline;
            }
        }
        balance
    }

    /// A subscriber's last settled requests, newest first. Blocking (SQLite).
    pub fn recent_usage(&self, imsi: &Imsi, limit: usize) -> Result<Vec<UsageRow>, BillingError> {
        Ok(self.inner.store.lock().unwrap().recent_usage(imsi, limit)?)
    }

    /// Reservations held by running requests (and by streams waiting to be billed).
    pub fn open_reservations(&self) -> usize {
        self.inner.ledger.lock().unwrap().reservations()
    }

    /// Streams waiting to be billed.
    pub fn pending(&self) -> usize {
        self.inner.pending.lock().unwrap().len()
    }

    /// Bills, then debits a reservation: the debits are computed from the
    /// hold, written into the record, and committed to the ledger only once
    /// the record is durable. Returns the record's seq.
    async fn bill(&self, bill: &Bill, reservation: u64) -> Result<u64, BillingError> {
        let billed = bill.units();
        let debits = self
            .inner
            .ledger
            .lock()
            .unwrap()
            .debits_for(reservation, billed)
            .map_err(|e| BillingError::Internal(e.to_string()))?;
        let Some(settlement) = Settlement::new(billed, debits) else {
            return Err(BillingError::Unfunded {
                imsi: bill.imsi.clone(),
                tokens: billed,
            });
        };
        let mut record = {
            let grants = self.inner.grants.lock().unwrap();
            settlement.record(bill, &|bucket| grants.grant_of(bucket))
        };
        record.offline = !self.core_connected();
        record.seq = self.append_durably(&record).await?;
        self.inner
            .ledger
            .lock()
            .unwrap()
            .commit(reservation, settlement.debits())
            .map_err(|e| BillingError::Internal(e.to_string()))?;
        self.inner
            .applier
            .send(record::applied(record.seq, &record));
        Ok(record.seq)
    }

    /// Appends with a few retries on a transient failure; the response waits
    /// for it. A record that cannot be made durable is logged in full at
    /// error level (never dropped silently).
    async fn append_durably(&self, record: &UsageRecord) -> Result<u64, BillingError> {
        let mut delay = Duration::from_millis(20);
        let mut last = LogError::Closed;
        for _ in 0..4 {
            match self.inner.log.append(record.clone()).await {
                Ok(seq) => return Ok(seq),
                // Room comes back only with an ack from the core, far later
                // than a retry: a full log is not retried.
                Err(e @ (LogError::TooLarge(_) | LogError::Closed | LogError::Full(_))) => {
                    last = e;
                    break;
                }
                Err(e) => {
                    last = e;
                    tokio::time::sleep(delay).await;
                    delay *= 4;
                }
            }
        }
        tracing::error!(
            error = %last,
            record = %mec_sync::record::record_to_json(record),
            "a usage record could not be made durable"
        );
        Err(BillingError::NotRecorded(last))
    }

    /// Takes over what the previous process left in the in-flight tally
    /// (streams it was serving when it died) and bills each one whose
    /// record is not already written. Runs at start-up, before the API
    /// opens. Never fails for want of room: a stream that cannot be billed
    /// yet keeps its slot and waits ([`Billing::bill_pending`]).
    pub async fn recover_streams(&self, left: Vec<(u32, Slot)>) -> Recovered {
        let mut out = Recovered::default();
        let Some(tally) = self.inner.tally.clone() else {
            return out;
        };
        for (index, slot) in left {
            let e = match slot {
                Slot::Live(e) => e,
                Slot::Free => continue,
                Slot::Corrupt(why) => {
                    tracing::error!(slot = index, reason = %why, "an in-flight slot cannot be read (torn by a power cut?); its stream is not billed");
                    out.unreadable += 1;
                    continue;
                }
            };
            let parsed = uuid::Uuid::parse_str(&e.request_id)
                .map_err(|err| format!("request id {:?}: {err}", e.request_id))
                .and_then(|id| {
                    Imsi::parse(&e.imsi)
                        .map(|imsi| (id, imsi))
                        .map_err(|err| format!("IMSI {:?}: {err}", e.imsi))
                });
            let (id, _imsi) = match parsed {
                Ok(v) => v,
                Err(why) => {
                    tracing::error!(slot = index, reason = %why, "an in-flight slot holds what no stream of this agent writes; its stream is not billed");
                    out.unreadable += 1;
                    tally.adopt(index, e).release();
                    continue;
                }
            };
            let written = match self.inner.store.lock().unwrap().record_seq(id.as_bytes()) {
                Ok(seq) => seq.is_some(),
                Err(err) => {
                    // Unknown: billing it might bill twice, freeing it might
                    // bill never. Keep it for the next start.
                    tracing::error!(error = %err, slot = index, "cannot tell whether an interrupted stream was billed; it keeps its slot");
                    out.waiting += 1;
                    let _ = tally.adopt(index, e);
                    continue;
                }
            };
            if e.completion_tokens == 0 || written {
                out.already += 1;
                tally.adopt(index, e).release();
                continue;
            }
            let digest = self.rate_digest(e.rate.1);
            let tier = self
                .inner
                .rate_tiers
                .get(&e.rate.1)
                .and_then(|t| t.get(&e.model))
                .cloned();
            let bill = bill_of_slot(&e, id, digest, tier);
            let started_s = e.started_ms.div_euclid(1000);
            self.inner.pending.lock().unwrap().push(Pending {
                bill,
                reservation: None,
                slot: tally.adopt(index, e),
                started_s,
                alarmed: false,
            });
        }
        out.billed = self.bill_pending().await;
        out.waiting += self.pending();
        out
    }

    /// Bills the streams waiting for room in the log (or for a package);
    /// returns how many were billed. Each keeps its reservation and its
    /// slot until its record is durable.
    pub async fn bill_pending(&self) -> usize {
        let _one = self.inner.billing_pending.lock().await;
        let mut list = std::mem::take(&mut *self.inner.pending.lock().unwrap());
        // Every stream gets its hold first, billed now or not: a stream left
        // waiting without one would let new requests spend its tokens.
        for p in list.iter_mut().filter(|p| p.reservation.is_none()) {
            p.reservation = self.hold_for_interrupted(p);
        }
        let mut kept = Vec::new();
        let mut billed = 0;
        let mut log_full = false;
        for mut p in list {
            if log_full {
                kept.push(p);
                continue;
            }
            let Some(reservation) = p.reservation else {
                if !std::mem::replace(&mut p.alarmed, true) {
                    tracing::error!(
                        imsi = %p.bill.imsi,
                        units = p.bill.units(),
                        "ALARM: a stream's tokens are covered by no package; it is kept until one is granted"
                    );
                }
                kept.push(p);
                continue;
            };
            match self.bill(&p.bill, reservation).await {
                Ok(seq) => {
                    tracing::warn!(
                        seq,
                        imsi = %p.bill.imsi,
                        completion_tokens = p.bill.completion_tokens,
                        "billed a stream whose record could not be written when it ended"
                    );
                    p.slot.release();
                    billed += 1;
                }
                Err(e) => {
                    // The others would not fit either.
                    log_full = matches!(e, BillingError::NotRecorded(LogError::Full(_)));
                    if !std::mem::replace(&mut p.alarmed, true) {
                        tracing::warn!(error = %e, imsi = %p.bill.imsi, "a stream waits to be billed");
                    }
                    kept.push(p);
                }
            }
        }
        self.inner.pending.lock().unwrap().extend(kept);
        billed
    }

    /// A hold for a stream of the previous process (whose reservation died
    /// with it): its tokens, from the packages valid when it began. Tokens
    /// beyond what they have left are debited from the first of them all
    /// the same (they were served). `None` when no package was valid then.
    fn hold_for_interrupted(&self, p: &Pending) -> Option<u64> {
        let imsi = Imsi::parse(&p.bill.imsi).ok()?;
        // Its model's grants; their offline allowances too, last (the
        // tokens were served: they are billed from whatever can pay).
        let connected = false;
        let mono = clocks().mono;
        let grants = self.inner.grants.lock().unwrap();
        let mut ledger = self.inner.ledger.lock().unwrap();
        // Its model's packages first; any other of the subscriber's after
        // (the tokens were served: they are billed from whatever can pay).
        let tier = p.bill.rate.tier.as_deref();
        let mut r = ledger
            .reserve_from(&imsi, 0, p.bill.units(), p.started_s, &|b| {
                b.covers(&p.bill.model, tier) && grants.admits(b, &p.bill.model, connected, mono)
            })
            .ok()?;
        // Short of what the stream costs: every package of the subscriber
        // pays (one that covers the model is not overdrawn while others have
        // units).
        if r.granted < p.bill.units() {
            let _ = ledger.release(r.id);
            r = ledger
                .reserve_from(&imsi, 0, p.bill.units(), p.started_s, &|b| {
                    grants.admits(b, &p.bill.model, connected, mono)
                })
                .ok()?;
        }
        if r.holds.is_empty() {
            let _ = ledger.release(r.id);
            return None;
        }
        Some(r.id)
    }

    /// Bills waiting streams every second until `stop`.
    pub async fn run_pending(&self, mut stop: tokio::sync::watch::Receiver<bool>) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            if self.pending() > 0 {
                self.bill_pending().await;
            }
        }
    }

    /// Keeps a stream whose record could not be written: its client has
    /// tokens, so it is billed later with its hold and its slot.
    fn defer(&self, bill: Bill, reservation: Option<u64>, slot: Counting) {
        let started_s = bill.start_ms.div_euclid(1000);
        self.inner.pending.lock().unwrap().push(Pending {
            bill,
            reservation,
            slot,
            started_s,
            alarmed: false,
        });
    }

    /// The digest of rate table `version` (empty for none, or one the box
    /// no longer has).
    fn rate_digest(&self, version: u64) -> Vec<u8> {
        self.inner
            .rate_digests
            .get(&version)
            .cloned()
            .unwrap_or_default()
    }

    /// Stops the store thread after it applied everything sent.
    pub fn shutdown(&self) {
        self.inner.applier.shutdown();
    }

    fn release(&self, reservation: u64) {
        let _ = self.inner.ledger.lock().unwrap().release(reservation);
    }
}

/// Whether an answer is a refusal that should keep the box from asking
/// again on its own for a while (no quota, no package); an unavailable core
/// or no answer is not.
fn refused(answer: &Result<GrantAnswer, AskError>) -> bool {
    matches!(answer, Ok(GrantAnswer::Refused { code, .. }) if code != "unavailable")
}

/// A question to the core, out until it ends: ended by its answer, or by
/// being dropped (the request that asked went away).
struct Question<'a> {
    billing: &'a Billing,
    imsi: &'a Imsi,
    model: &'a str,
    refused: bool,
}

impl Question<'_> {
    fn end(mut self, refused: bool) {
        self.refused = refused;
    }
}

impl Drop for Question<'_> {
    fn drop(&mut self) {
        self.billing.inner.grants.lock().unwrap().answered(
            self.imsi,
            self.model,
            self.refused,
            clocks().mono,
        );
    }
}

/// The core's grants at this box.
#[derive(Debug, Clone, serde::Serialize)]
pub struct GrantsView {
    /// Grants held now (not revoked, not expired).
    pub held: usize,
    /// Tokens left in them (before running requests' holds).
    pub tokens_left: u64,
    /// Questions to the core out now.
    pub asking: usize,
    /// Asked, granted, refused, revoked since the agent started.
    pub counters: GrantCounters,
    /// The downlink (None: no core configured).
    pub downlink: Option<DownlinkStatus>,
}

/// [`DownlinkSink`] over billing.
struct GrantSink(Billing);

impl DownlinkSink for GrantSink {
    fn applied(&self) -> u64 {
        self.0.inner.grants.lock().unwrap().applied()
    }

    fn apply(&self, message: &pb::Downlink) -> Result<(), String> {
        self.0.apply_downlink(message).map_err(|e| e.to_string())
    }
}

/// The bill of a stream a dead process left in the tally.
fn bill_of_slot(e: &Entry, id: uuid::Uuid, rate_digest: Vec<u8>, tier: Option<String>) -> Bill {
    Bill {
        request_id: *id.as_bytes(),
        imsi: e.imsi.clone(),
        app: e.app.clone(),
        model: e.model.clone(),
        prompt_tokens: e.prompt_tokens,
        cached_tokens: 0,
        completion_tokens: e.completion_tokens,
        reserved_tokens: e.reserved_tokens,
        outcome: if e.client_left {
            Outcome::Cancelled
        } else {
            Outcome::Failed
        },
        start_ms: e.started_ms,
        end_ms: e.updated_ms,
        duration_us: (e.updated_ms - e.started_ms).max(0) as u64 * 1000,
        ttft_us: 0,
        failure_reason: if e.client_left {
            String::new()
        } else {
            "the agent stopped while streaming; billed the tokens streamed".into()
        },
        detail: RequestDetail {
            end_user: e.end_user.clone(),
            choices: e.choices,
            constraint: e.constraint.clone(),
        },
        rate: e.rate.applied(rate_digest, tier),
    }
}

/// One admitted request: owns its reservation (released when dropped
/// unsettled: the request is gone) and, for a stream, its in-flight slot.
pub struct Admission {
    billing: Billing,
    info: RequestInfo,
    reservation: Option<u64>,
    granted: u64,
    cap: u64,
    counting: Option<Counting>,
}

impl std::fmt::Debug for Admission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admission")
            .field("request_id", &self.info.request_id)
            .field("reservation", &self.reservation)
            .field("granted", &self.granted)
            .finish_non_exhaustive()
    }
}

impl Admission {
    /// The most completion tokens the reservation covers.
    pub fn completion_cap(&self) -> u64 {
        self.cap
    }

    /// Package units reserved (0 when metering is off).
    pub fn granted(&self) -> u64 {
        self.granted
    }

    /// Counts `tokens` of a stream before they go to the client.
    pub fn count(&mut self, tokens: u64) -> Result<(), tally::TallyError> {
        match self.counting.as_mut() {
            Some(c) => c.count(tokens),
            None => Ok(()),
        }
    }

    /// Notes that a stream's client left.
    pub fn client_left(&mut self) -> Result<(), tally::TallyError> {
        match self.counting.as_mut() {
            Some(c) => c.client_left(),
            None => Ok(()),
        }
    }

    /// Settles: the debits, the durable record, the store behind it.
    /// Returns the usage told to the client (equal to the record). A
    /// generation that made no token releases its reservation and records
    /// nothing. When the record cannot be written, a stream (whose client
    /// has tokens) keeps its hold and slot and is billed once it can be.
    pub async fn settle(mut self, s: &Settled) -> Result<Usage, BillingError> {
        let mut usage = Usage {
            prompt_tokens: s.prompt_tokens,
            cached_tokens: s.cached_prompt_tokens,
            completion_tokens: s.completion_tokens,
            seq: 0,
        };
        let Some(reservation) = self.reservation else {
            return Ok(usage);
        };
        if s.completion_tokens == 0 {
            return Ok(usage); // dropping releases the hold and frees the slot
        }
        let bill = Bill {
            request_id: *self.info.request_id.as_bytes(),
            imsi: self.info.imsi.to_string(),
            app: self.info.app.clone(),
            model: self.info.model.clone(),
            prompt_tokens: s.prompt_tokens,
            cached_tokens: s.cached_prompt_tokens,
            completion_tokens: s.completion_tokens,
            reserved_tokens: self.granted,
            outcome: s.outcome,
            start_ms: unix_ms(self.info.started),
            end_ms: unix_ms(SystemTime::now()),
            duration_us: self.info.started_at.elapsed().as_micros() as u64,
            ttft_us: s.ttft.as_micros() as u64,
            failure_reason: s.failure_reason.clone().unwrap_or_default(),
            detail: self.info.detail.clone(),
            rate: self.info.rate.clone(),
        };
        match self.billing.bill(&bill, reservation).await {
            Ok(seq) => {
                self.reservation = None;
                if let Some(c) = self.counting.take() {
                    c.release();
                }
                usage.seq = seq;
                Ok(usage)
            }
            Err(e) => {
                if let Some(c) = self.counting.take() {
                    self.reservation = None;
                    self.billing.defer(bill, Some(reservation), c);
                }
                Err(e)
            }
        }
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        let reservation = self.reservation.take();
        match self.counting.take() {
            // A stream that handed out tokens and never settled (its task
            // ended early): billed from its slot, with its hold.
            Some(c) if c.entry().completion_tokens > 0 => {
                let bill = bill_of_slot(
                    c.entry(),
                    self.info.request_id,
                    self.info.rate.digest.clone(),
                    self.info.rate.tier.clone(),
                );
                self.billing.defer(bill, reservation, c);
                return;
            }
            Some(c) => c.release(),
            None => {}
        }
        if let Some(r) = reservation {
            self.billing.release(r);
        }
    }
}

/// Re-applies to `store` the debits of every record in `log` it has not
/// applied (a crash between an append and its store update). Returns how
/// many records were re-applied.
pub fn replay_log(log: &UsageLog, store: &mut Store) -> Result<usize, BillingError> {
    let mut from = store.applied_watermark()? + 1;
    let mut replayed = 0;
    let log_error = |e: LogError| BillingError::Internal(format!("replaying the usage log: {e}"));
    loop {
        let batch = log.read_from(from, 1024, 8 << 20).map_err(log_error)?;
        if batch.is_empty() {
            break;
        }
        let mut applied = Vec::new();
        for (seq, bytes) in &batch {
            from = seq + 1;
            if store.is_applied(*seq)? {
                continue;
            }
            let r = SignedRecord::from_bytes(bytes)
                .and_then(|s| s.record())
                .map_err(|e| BillingError::Internal(format!("record {seq} of the log: {e}")))?;
            applied.push(record::applied(*seq, &r));
        }
        replayed += store.apply(&applied)?;
    }
    Ok(replayed)
}
