//! `edge-agent serve`: the MEC API and the admin API over the engine, the
//! ledger and the usage log.
//!
//! Start-up: open the usage log (recovering it), re-apply to the ledger store
//! the records it missed, load the model, bind both listeners, then tell
//! systemd `READY=1` and print one `{"event":"ready",…}` line on stdout.
//! SIGTERM (or SIGINT) drains: readiness goes false, no new request is
//! accepted, in-flight requests get `api.shutdown_grace_s` to finish, the
//! rest are cancelled and billed for what they made, the ledger store and the
//! log are flushed, and the process exits 0.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;
use mec_billing::tally::Tally;
use mec_billing::{AppliedWatermark, Billing, BillingConfig, RateLimits, WelcomePackage};
use mec_inference::gpu;
use mec_inference::registry::{Registry, RegistryLimits};
use mec_metering::store::Store;
use mec_sync::identity::NodeIdentity;
use mec_sync::log::{LogOptions, UsageLog};
use sha2::Digest;

use crate::config::Config;

pub mod admin;
pub mod api;
pub mod error;
pub mod metrics;
pub mod openai;
pub mod rates;
pub mod response;
pub mod tools;

/// Cancel flags of the generations in flight (the drain cancels them).
#[derive(Default)]
pub struct InFlight {
    next: AtomicU64,
    flags: Mutex<HashMap<u64, Arc<AtomicBool>>>,
    changed: tokio::sync::Notify,
}

/// Removes its generation from [`InFlight`] when dropped.
pub struct InFlightGuard<'a> {
    set: &'a InFlight,
    id: u64,
}

impl InFlight {
    /// Tracks a generation until the guard drops.
    pub fn register(&self, cancel: Arc<AtomicBool>) -> InFlightGuard<'_> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.flags.lock().unwrap().insert(id, cancel);
        InFlightGuard { set: self, id }
    }

    /// Generations running.
    pub fn count(&self) -> usize {
        self.flags.lock().unwrap().len()
    }

    /// Cancels every generation (each still settles and bills).
    pub fn cancel_all(&self) {
        for f in self.flags.lock().unwrap().values() {
            f.store(true, Ordering::Relaxed);
        }
    }

    /// Waits until none run, or `timeout`; true when none run.
    pub async fn wait_empty(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.changed.notified();
            if self.count() == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.count() == 0;
            }
        }
    }
}

impl Drop for InFlightGuard<'_> {
    fn drop(&mut self) {
        self.set.flags.lock().unwrap().remove(&self.id);
        self.set.changed.notify_waiters();
    }
}

/// Everything the handlers share.
pub struct AppState {
    /// The configuration.
    pub config: Config,
    /// The models: one engine per loaded model.
    pub models: Registry,
    /// The operator's rate tables (what a token of each model costs).
    pub rates: rates::RateBook,
    /// Metering: admission, settlement, packages (`mec-billing`).
    pub billing: Billing,
    /// The usage log (billing appends to it; readiness, metrics and the
    /// uploader read its state).
    pub log: Arc<UsageLog>,
    /// Metrics.
    pub metrics: metrics::Metrics,
    /// Apps allowed to call.
    pub apps: Vec<api::App>,
    /// Generations running.
    pub inflight: InFlight,
    /// Set by SIGTERM: refuse new work, readiness false.
    pub draining: AtomicBool,
    /// Start time, Unix seconds.
    pub started_unix: i64,
    /// The upload to the core, when one is configured.
    pub sync: Arc<Mutex<mec_sync::uploader::UploaderStatus>>,
    gpu: Option<gpu::TelemetryPoller>,
}

/// The site's default packages, for subscribers new to this box.
fn welcome_packages(config: &Config) -> Vec<WelcomePackage> {
    let Some(site) = &config.site else {
        return Vec::new();
    };
    site.default_packages
        .iter()
        .filter_map(|p| {
            Some(WelcomePackage {
                kind: mec_metering::ledger::BucketKind::parse(&p.kind)?,
                tokens: p.tokens,
                valid_days: p.valid_days,
            })
        })
        .collect()
}

/// The upload to the core as the admin API and the metrics show it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SyncView {
    /// A connection to core-ingest is up.
    pub connected: bool,
    /// Highest seq core-ingest holds with none missing.
    pub acked_seq: u64,
    /// Seconds since core-ingest last acknowledged; `None` before the first.
    pub last_ack_age_s: Option<i64>,
    /// How far the upload lags: seconds since the oldest record the core
    /// does not hold ended (0 when it holds every record).
    pub lag_s: i64,
    /// Connections made since the agent started.
    pub connections: u64,
    /// Why the last attempt failed, while it is failing.
    pub last_error: Option<String>,
    /// Why the last connection ended (kept after reconnecting).
    pub last_disconnect: Option<String>,
    /// Why the core's position and this box's log disagree (a fork, a core
    /// restored from a backup, a box restored from a snapshot), while they do.
    pub alarm: Option<String>,
    /// The core's grants held here and the downlink that brings them.
    pub grants: mec_billing::GrantsView,
}

impl AppState {
    /// The upload's state, when a core is configured. Blocking (reads one
    /// record of the log).
    pub fn sync_view(&self) -> Option<SyncView> {
        self.config.core.as_ref()?;
        let status = self.sync.lock().unwrap().clone();
        // Milliseconds, not whole seconds times 1000: the lag of a record
        // made 1.1 s ago is 1 s, not 0.
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        let lag_s = match self.log.oldest_unacked_end_ms() {
            Ok(Some(end_ms)) => ((now_ms - end_ms) / 1000).max(0),
            Ok(None) => 0,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the oldest unacknowledged record");
                -1
            }
        };
        Some(SyncView {
            connected: status.connected,
            acked_seq: status.acked_seq,
            last_ack_age_s: (status.last_ack_unix_ms != 0)
                .then(|| ((now_ms - status.last_ack_unix_ms) / 1000).max(0)),
            lag_s,
            connections: status.connections,
            last_error: status.last_error,
            last_disconnect: status.last_disconnect,
            alarm: status.alarm,
            grants: self.billing.grants_view(),
        })
    }
}

impl AppState {
    /// The GPUs' latest telemetry (NVML, every 10 s), when any was found.
    pub fn gpu_snapshot(&self) -> Vec<gpu::GpuInfo> {
        self.gpu
            .as_ref()
            .map(|p| p.snapshot().discovery.gpus)
            .unwrap_or_default()
    }
}

fn apps(config: &Config) -> anyhow::Result<Vec<api::App>> {
    config
        .apps
        .iter()
        .map(|a| {
            let digest: [u8; 32] = hex::decode(&a.key_sha256)?
                .try_into()
                .map_err(|_| anyhow::anyhow!("apps {}: key_sha256 is not 32 bytes", a.id))?;
            Ok(api::App {
                id: a.id.clone(),
                key_digest: digest,
                imsi_prefixes: a.imsi_prefixes.clone(),
                models: a.models.clone(),
            })
        })
        .collect()
}

/// SHA-256 hex of an app key, as the configuration stores it.
pub fn key_digest_hex(key: &str) -> String {
    hex::encode(sha2::Sha256::digest(key.as_bytes()))
}

/// The MEC API routes.
pub fn api_router(state: Arc<AppState>) -> Router {
    let limit = state.config.api.max_body_bytes;
    let metered = state.clone();
    Router::new()
        .route("/v1/chat/completions", post(api::chat_completions))
        .route("/v1/completions", post(api::completions))
        .route("/v1/models", get(api::models))
        .route("/healthz", get(api::healthz))
        .route("/readyz", get(api::readyz))
        .route("/metrics", get(api::metrics))
        // The completion handlers read their body with their own limit (413
        // in OpenAI's shape); this one guards the other routes.
        .layer(DefaultBodyLimit::max(limit))
        .layer(axum::middleware::from_fn(
            move |req: axum::extract::Request, next: axum::middleware::Next| {
                let state = metered.clone();
                async move {
                    let route = req
                        .extensions()
                        .get::<axum::extract::MatchedPath>()
                        .map(|p| p.as_str().to_string())
                        .unwrap_or_else(|| "other".into());
                    let resp = next.run(req).await;
                    state.metrics.request(&route, resp.status().as_u16());
                    resp
                }
            },
        ))
        .with_state(state)
}

fn sd_notify(state: &[sd_notify::NotifyState<'_>]) {
    if std::env::var_os("NOTIFY_SOCKET").is_some() {
        if let Err(e) = sd_notify::notify(false, state) {
            tracing::warn!(error = %e, "sd_notify failed");
        }
    }
}

/// Runs the agent until SIGTERM or SIGINT.
pub fn serve(config: Config) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("edge-agent-io")
        .build()?;
    rt.block_on(serve_async(config))
}

async fn serve_async(config: Config) -> anyhow::Result<()> {
    std::fs::create_dir_all(&config.node.state_dir)
        .with_context(|| format!("creating {}", config.node.state_dir.display()))?;
    let identity = NodeIdentity::load_or_create(&config.identity_dir())
        .with_context(|| format!("node identity in {}", config.identity_dir().display()))?;
    let options = LogOptions {
        segment_bytes: config.log.segment_bytes,
        budget_bytes: config.log.budget_bytes,
        backend: config.log.backend.parse().map_err(anyhow::Error::msg)?,
        ..LogOptions::default()
    };
    let log = UsageLog::open(&config.log_dir(), identity, &config.node.id, options)
        .with_context(|| format!("usage log in {}", config.log_dir().display()))?;
    let log = Arc::new(log);
    let store = Store::open(&config.ledger_path())
        .with_context(|| format!("ledger store {}", config.ledger_path().display()))?;
    if !config.metering.enabled {
        tracing::warn!(
            "METERING IS OFF (metering.enabled = false): nothing is reserved, settled or recorded"
        );
    }
    let rates = open_rates(&config)?;
    let (tally, left_in_flight) = Tally::open(&config.tally_path())?;
    let applied = AppliedWatermark::default();
    // With a core, packages are sold there and served from its grants.
    let grant_asker = config
        .core
        .as_ref()
        .map(|_| mec_sync::downlink::GrantAsker::new());
    let limits = &config.limits;
    let billing = Billing::start(
        BillingConfig {
            enabled: config.metering.enabled,
            limits: RateLimits {
                imsi_requests_per_second: limits.imsi_requests_per_second,
                imsi_tokens_per_minute: limits.imsi_tokens_per_minute,
                app_requests_per_second: limits.app_requests_per_second,
                app_tokens_per_minute: limits.app_tokens_per_minute,
            },
            welcome: welcome_packages(&config),
            core: grant_asker.clone(),
            rate_digests: rates.digests(),
            rate_tiers: rates.tiers(),
        },
        log.clone(),
        store,
        Some(Arc::new(tally)),
        applied.clone(),
    )?;
    // Streams the previous process was serving when it died are billed
    // before anything else is served; those that cannot be yet (a full
    // log) wait with their slots, and the agent starts all the same.
    let recovered = billing.recover_streams(left_in_flight).await;
    if recovered != mec_billing::Recovered::default() {
        tracing::warn!(
            billed = recovered.billed,
            already_recorded = recovered.already,
            unreadable = recovered.unreadable,
            waiting = recovered.waiting,
            "in-flight tally of the previous process"
        );
    }

    // The models: those to load at start are loaded now, one after the
    // other; one that fails is marked failed (with the reason in /readyz and
    // /v1/models) and the others serve.
    let found = gpu::discover(None);
    let models = Registry::new(
        config.models.iter().map(|m| m.spec()).collect(),
        found.clone(),
        RegistryLimits {
            host_bytes: config.serving.max_loaded_bytes,
            max_loaded: config.serving.max_loaded_models,
        },
    )?;
    let failed = tokio::task::block_in_place(|| models.load_at_start());
    for (model, reason) in &failed {
        tracing::error!(%model, %reason, "the model failed to load; the others serve");
    }
    let gpu = (!found.gpus.is_empty())
        .then(|| gpu::TelemetryPoller::start(Duration::from_secs(10), None));

    let api_addr: SocketAddr = config.api.listen.parse()?;
    let admin_addr: SocketAddr = config.admin.listen.parse()?;
    let api_listener = tokio::net::TcpListener::bind(api_addr)
        .await
        .with_context(|| format!("binding api.listen {api_addr}"))?;
    let admin_listener = tokio::net::TcpListener::bind(admin_addr)
        .await
        .with_context(|| format!("binding admin.listen {admin_addr}"))?;
    let (api_bound, admin_bound) = (api_listener.local_addr()?, admin_listener.local_addr()?);
    let grace = Duration::from_secs(config.api.shutdown_grace_s);
    let admin_token_path = config.admin_token_path();
    let admin_token = Arc::new(admin::load_or_create_token(&admin_token_path)?);

    let state = Arc::new(AppState {
        apps: apps(&config)?,
        config,
        models,
        rates,
        billing,
        log,
        metrics: metrics::Metrics::new(),
        inflight: InFlight::default(),
        draining: AtomicBool::new(false),
        started_unix: mec_billing::unix_now(),
        sync: Arc::default(),
        gpu,
    });

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|v| *v).await;
    };
    let api_server = {
        let (router, stop) = (api_router(state.clone()), stopped(stop_rx.clone()));
        tokio::spawn(async move {
            axum::serve(api_listener, router)
                .with_graceful_shutdown(stop)
                .await
        })
    };
    let admin_server = {
        let (router, stop) = (
            admin::router(state.clone(), admin_token),
            stopped(stop_rx.clone()),
        );
        tokio::spawn(async move {
            axum::serve(admin_listener, router)
                .with_graceful_shutdown(stop)
                .await
        })
    };
    // Streams whose record could not be written are billed once the log has room.
    let pending_biller = {
        let (billing, stop) = (state.billing.clone(), stop_rx.clone());
        tokio::spawn(async move { billing.run_pending(stop).await })
    };
    // Models whose keep-alive ran out are unloaded.
    let keep_alive = {
        let models = state.models.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                let models = models.clone();
                let _ = tokio::task::spawn_blocking(move || models.expire_idle()).await;
            }
        })
    };
    let watchdog = watchdog_usec().map(|watchdog_usec| {
        tokio::spawn(async move {
            let period = Duration::from_micros(watchdog_usec / 2).max(Duration::from_millis(100));
            loop {
                sd_notify(&[sd_notify::NotifyState::Watchdog]);
                tokio::time::sleep(period).await;
            }
        })
    });

    let uploader = state.config.core.clone().map(|core| {
        let (state, rx) = (state.clone(), stop_rx.clone());
        let applied = applied.clone();
        let downlink = grant_asker
            .clone()
            .map(|asker| mec_sync::uploader::Downlink {
                sink: state.billing.downlink_sink(),
                asker,
            });
        tokio::spawn(async move { upload(state, core, applied, downlink, rx).await })
    });

    // The handlers are in place before anyone hears the agent is ready: a
    // SIGTERM right after the ready line drains instead of killing.
    let stop_signal = stop_signal()?;
    sd_notify(&[sd_notify::NotifyState::Ready]);
    let ready = serde_json::json!({
        "event": "ready",
        "api_url": format!("http://{api_bound}"),
        "admin_url": format!("http://{admin_bound}"),
        "admin_token_file": admin_token_path,
        "model": state.config.models[0].id,
        "models": state.models.views().iter().map(|m| serde_json::json!({"id": m.id, "state": m.state})).collect::<Vec<_>>(),
    });
    println!("{ready}");
    tracing::info!(api = %api_bound, admin = %admin_bound, "serving");

    stop_signal.await;
    tracing::info!("draining");
    sd_notify(&[sd_notify::NotifyState::Stopping]);
    state.draining.store(true, Ordering::Relaxed);
    let _ = stop_tx.send(true);
    if !state.inflight.wait_empty(grace).await {
        tracing::warn!(
            requests = state.inflight.count(),
            "grace period over; cancelling (they are billed)"
        );
        state.inflight.cancel_all();
        state.inflight.wait_empty(Duration::from_secs(30)).await;
    }
    for server in [api_server, admin_server] {
        match tokio::time::timeout(Duration::from_secs(5), server).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "listener"),
            Ok(Err(e)) => tracing::warn!(error = %e, "listener task"),
            Err(_) => tracing::warn!("a connection outlived the drain"),
        }
    }
    if let Some(u) = uploader {
        let _ = tokio::time::timeout(Duration::from_secs(5), u).await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), pending_biller).await;
    if let Some(w) = watchdog {
        w.abort();
    }
    keep_alive.abort();
    // Flush: the store thread applies what it was sent; the log closes last.
    state.billing.shutdown();
    tracing::info!("stopped");
    Ok(())
}

/// The operator key rate tables are checked with: `[rating] key`, else
/// the site's image key.
fn rating_key(config: &Config) -> anyhow::Result<Option<ed25519_dalek::VerifyingKey>> {
    if let Some(path) = &config.rating.key {
        let pem = std::fs::read_to_string(path)
            .with_context(|| format!("rating.key {}", path.display()))?;
        let key = mec_image::manifest::parse_verifying_key(&pem)
            .map_err(|e| anyhow::anyhow!("rating.key {}: {e}", path.display()))?;
        return Ok(Some(key));
    }
    let site_key = config
        .site
        .as_ref()
        .and_then(|s| s.image_signing_key.as_deref());
    match site_key {
        Some(pem) => Ok(Some(
            mec_image::manifest::parse_verifying_key(pem)
                .map_err(|e| anyhow::anyhow!("the site's image key: {e}"))?,
        )),
        None => Ok(None),
    }
}

/// The rate tables kept in the state directory, and `[rating] table`
/// installed when it is newer. A configured table that is refused while
/// none is in force stops the start: serving would bill at one unit per
/// token against the operator's word.
fn open_rates(config: &Config) -> anyhow::Result<rates::RateBook> {
    let key = rating_key(config)?;
    let book = rates::RateBook::open(&config.state().rates_dir(), key)?;
    let Some(path) = &config.rating.table else {
        return Ok(book);
    };
    let bytes = std::fs::read(path).with_context(|| format!("rating.table {}", path.display()))?;
    let sig_path = rates::signature_path(path);
    let signature = std::fs::read_to_string(&sig_path)
        .with_context(|| format!("rating.table's signature {}", sig_path.display()))?;
    match book.install(&bytes, &signature) {
        Ok(_) => {}
        // The same table again (every start reads it): nothing to do.
        Err(_)
            if book
                .current()
                .is_some_and(|t| t.digest == <[u8; 32]>::from(sha2::Sha256::digest(&bytes))) => {}
        Err(e) if book.current().is_none() => {
            anyhow::bail!("rating.table {}: {e}", path.display())
        }
        Err(e) => {
            let in_force = book.current().map(|t| t.version).unwrap_or(0);
            tracing::error!(table = %path.display(), error = %e, in_force, "the configured rate table is refused; the one in force stays");
        }
    }
    Ok(book)
}

/// Uploads the log to the core once the node certificate and the operator CA
/// are in the identity directory (enrollment may put them there while the
/// agent runs), until shutdown.
async fn upload(
    state: Arc<AppState>,
    core: crate::config::CoreConfig,
    applied: AppliedWatermark,
    downlink: Option<mec_sync::uploader::Downlink>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let c = &state.config;
    let files = [
        c.node_cert_path(),
        c.operator_ca_path(),
        c.state().node_key(),
    ];
    let pems = loop {
        if let [Ok(cert), Ok(ca), Ok(key)] = files.clone().map(std::fs::read_to_string) {
            break (cert, ca, key);
        }
        tracing::info!(cert = %files[0].display(), "waiting for the node certificate and the operator CA to upload");
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    };
    let Ok(address) = core.address.parse() else {
        return;
    };
    let config = mec_sync::uploader::UploaderConfig {
        core: address,
        server_name: core.server_name.clone(),
        cert_pem: pems.0,
        ca_pem: pems.1,
        key_pem: pems.2,
        limits: mec_sync::upload::WindowLimits {
            batch_records: core.batch_records,
            in_flight: core.batches_in_flight,
            ..Default::default()
        },
        transport: mec_sync::quic::TransportOptions {
            segmentation_offload: core.segmentation_offload,
            idle_timeout: Duration::from_secs(core.idle_timeout_s.max(3)),
            keep_alive: Duration::from_secs(core.idle_timeout_s.max(3)) / 3,
        },
        poll: Duration::from_millis(100),
        // The log releases only records whose debits the ledger store holds.
        ack_limit: Some(mec_sync::uploader::AckLimit(Arc::new(move || {
            applied.get()
        }))),
        downlink,
    };
    tracing::info!(core = %core.address, "uploading usage records");
    mec_sync::uploader::run(state.log.clone(), config, state.sync.clone(), stop).await;
}

/// The watchdog period systemd asks for, as libsystemd's
/// `sd_watchdog_enabled` reads it: `WATCHDOG_USEC`, unless `WATCHDOG_PID`
/// names another process. (sd-notify's `watchdog_enabled` also demands
/// `WATCHDOG_PID`, which systemd sets but a supervisor may not.)
fn watchdog_usec() -> Option<u64> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.parse::<u32>().ok() != Some(std::process::id()) {
            return None;
        }
    }
    (usec > 0).then_some(usec)
}

/// SIGTERM or SIGINT: the handlers are installed when this returns; the
/// future ends at the first signal.
fn stop_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
}
