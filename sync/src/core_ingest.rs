//! The `core-ingest` commands: `init` (dev operator CA, server certificate,
//! configuration), `serve`, `issue-node-cert`, `audit` and `export` (for core
//! billing). The binary (`src/bin/core-ingest.rs`) only parses arguments.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use serde::Deserialize;

use crate::ingest_store::{
    ExportQuery, ExportValue, IngestStore, KeptAside, PgOptions, StoreLocation, DAY_COLUMNS,
    RECORD_COLUMNS,
};
use crate::pki::make_crl;
use crate::pki::{generate_ca, issue_node_cert, issue_server_cert, CertAndKey};
use crate::quic::{server_endpoint, TransportOptions};

/// core-ingest's configuration (TOML). Paths are relative to the file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoreConfig {
    /// UDP address to listen on (port 0: any; `serve` prints the bound one).
    pub listen: String,
    /// The store: a path or `sqlite:PATH` (the embedded default), or
    /// `postgres://USER@HOST[:PORT]/DB` (the password from `PGPASSWORD`, a
    /// password file or `~/.pgpass`; never in this file).
    pub store: String,
    /// PostgreSQL connection settings (pool size, password file).
    #[serde(default)]
    pub postgres: PgOptions,
    /// The directory of the configuration file (relative paths start there).
    #[serde(skip)]
    pub base: PathBuf,
    /// Operator CA certificate (verifies nodes).
    pub ca_cert: PathBuf,
    /// Operator CA key (issues dev node certificates).
    pub ca_key: PathBuf,
    /// The core's certificate.
    pub cert: PathBuf,
    /// Its key.
    pub key: PathBuf,
    /// Idle timeout, seconds.
    #[serde(default = "default_idle")]
    pub idle_timeout_s: u64,
    /// UDP segmentation offload (off works around kernel and NIC bugs).
    #[serde(default = "default_true")]
    pub segmentation_offload: bool,
    /// The operator's certificate revocation list (PEM): a node whose
    /// certificate it lists is refused in the handshake. `revoke-node-cert`
    /// writes it; `serve` reads it again within seconds of a change.
    #[serde(default)]
    pub crl: Option<PathBuf>,
    /// TCP address of the HTTP endpoint for load balancers and monitoring
    /// (`/healthz`, `/readyz`: the store answers and its schema is current,
    /// `/metrics`); none when absent.
    #[serde(default)]
    pub http: Option<String>,
    /// The operator API's bearer token, the first line of this file (mode
    /// 0600): with `http`, `/operator/v1/...` is served there for the BSS
    /// (`core_packages::operator_routes`); none when absent.
    #[serde(default)]
    pub operator_token_file: Option<PathBuf>,
    /// How grants to boxes are cut (`[grants]`: `slice`, `validity_s`,
    /// `threshold_percent`, `offline_allowance`, `return_grace_s`).
    #[serde(default)]
    pub grants: mec_metering::charging::GrantPolicy,
}

fn default_idle() -> u64 {
    30
}
fn default_true() -> bool {
    true
}

impl CoreConfig {
    /// Reads and checks `path`.
    pub fn load(path: &Path) -> anyhow::Result<CoreConfig> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let mut c: CoreConfig =
            toml::from_str(&text).with_context(|| format!("{}", path.display()))?;
        c.listen.parse::<SocketAddr>().with_context(|| {
            format!(
                "{}: listen: {:?} is not host:port",
                path.display(),
                c.listen
            )
        })?;
        if let Some(http) = &c.http {
            http.parse::<SocketAddr>()
                .with_context(|| format!("{}: http: {http:?} is not host:port", path.display()))?;
        }
        let base = path.parent().unwrap_or(Path::new("."));
        c.base = base.to_path_buf();
        c.location()?;
        if let Some(p) = c
            .postgres
            .password_file
            .as_mut()
            .filter(|p| p.is_relative())
        {
            *p = base.join(&*p);
        }
        for p in [&mut c.ca_cert, &mut c.ca_key, &mut c.cert, &mut c.key]
            .into_iter()
            .chain(c.crl.as_mut())
            .chain(c.operator_token_file.as_mut())
        {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        Ok(c)
    }

    /// Where the store is.
    pub fn location(&self) -> anyhow::Result<StoreLocation> {
        Ok(StoreLocation::parse(&self.store, &self.base)?)
    }

    /// Opens the store (a PostgreSQL schema is migrated to this binary's).
    pub fn open_store(&self) -> anyhow::Result<Arc<dyn IngestStore>> {
        let location = self.location()?;
        location.open(&self.postgres).with_context(|| {
            format!(
                "opening the store {}",
                match &location {
                    StoreLocation::Sqlite(p) => p.display().to_string(),
                    StoreLocation::Postgres(_) => "(PostgreSQL)".into(),
                }
            )
        })
    }

    fn ca(&self) -> anyhow::Result<CertAndKey> {
        Ok(CertAndKey {
            cert_pem: read(&self.ca_cert)?,
            key_pem: read(&self.ca_key)?,
        })
    }
}

fn read(p: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))
}

fn write_file(path: &Path, text: &str, private: bool) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if private { 0o600 } else { 0o644 })
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    Ok(())
}

/// `core-ingest init`: a dev operator CA, a server certificate for
/// localhost, 127.0.0.1, ::1 and `sans`, and a configuration in `dir`.
pub fn init(
    dir: &Path,
    listen: &str,
    sans: &[String],
    store: Option<&str>,
) -> anyhow::Result<serde_json::Value> {
    listen
        .parse::<SocketAddr>()
        .with_context(|| format!("--listen {listen:?} is not host:port"))?;
    let store = store.unwrap_or("core.sqlite");
    if let StoreLocation::Postgres(url) = StoreLocation::parse(store, dir)? {
        anyhow::ensure!(
            !crate::ingest_store::postgres::url_has_password(&url),
            "--store: leave the password out of the URL (it would show in `ps` and in the \
             configuration); give it in PGPASSWORD, ~/.pgpass or [postgres] password_file"
        );
    }
    std::fs::create_dir_all(dir)?;
    let dir = dir.canonicalize()?;
    let config_path = dir.join("core-ingest.toml");
    anyhow::ensure!(!config_path.exists(), "{} exists", config_path.display());
    // The store first, so that a wrong URL, a refused login or a missing
    // right shows now, before anything is written.
    let opened = StoreLocation::parse(store, &dir)?
        .open(&PgOptions::default())
        .context("opening the store")?;
    let ca = generate_ca("MEC dev operator CA")?;
    let mut names = vec!["localhost".to_string(), "127.0.0.1".into(), "::1".into()];
    names.extend(sans.iter().cloned());
    let server = issue_server_cert(&ca, &names)?;
    write_file(&dir.join("operator-ca.crt"), &ca.cert_pem, false)?;
    write_file(&dir.join("operator-ca.key"), &ca.key_pem, true)?;
    write_file(&dir.join("core.crt"), &server.cert_pem, false)?;
    write_file(&dir.join("core.key"), &server.key_pem, true)?;
    write_file(&dir.join("crl.pem"), &make_crl(&ca, &[], 1)?, false)?;
    let mut token = [0u8; 32];
    getrandom::fill(&mut token).map_err(|e| anyhow::anyhow!("the operator token: {e}"))?;
    write_file(
        &dir.join("operator.token"),
        &format!("{}\n", hex::encode(token)),
        true,
    )?;
    let text = format!(
        "# Written by `core-ingest init` (a dev operator CA: keep operator-ca.key secret).\n\
         listen = {listen:?}\nstore = {store:?}\nca_cert = \"operator-ca.crt\"\nca_key = \"operator-ca.key\"\n\
         cert = \"core.crt\"\nkey = \"core.key\"\n\
         # Revoked node certificates (core-ingest revoke-node-cert).\ncrl = \"crl.pem\"\n\
         # The operator API's bearer token (/operator/v1/..., served on `http`):\n\
         operator_token_file = \"operator.token\"\n\
         # idle_timeout_s = 30\n# segmentation_offload = true\n\
         # /healthz, /readyz and /metrics for load balancers and monitoring:\n# http = \"127.0.0.1:7444\"\n"
    );
    write_file(&config_path, &text, false)?;
    CoreConfig::load(&config_path)?;
    Ok(serde_json::json!({
        "config": config_path,
        "store": opened.describe(),
        "listen": listen,
        "ca_cert": dir.join("operator-ca.crt"),
        "operator_token_file": dir.join("operator.token"),
        "server_names": names,
    }))
}

/// `core-ingest issue-node-cert`: a node certificate for `node_id` and the
/// node's public key (SPKI PEM, its `identity/node.pub`).
pub fn issue(config: &CoreConfig, node_id: &str, public_key_pem: &str) -> anyhow::Result<String> {
    Ok(issue_node_cert(&config.ca()?, node_id, public_key_pem)?)
}

/// `core-ingest serve`: until SIGTERM or SIGINT. Prints one ready line.
pub async fn serve(config: CoreConfig) -> anyhow::Result<()> {
    // One handle for the upload and for packages and grants (the downlink,
    // the operator API), opened off the async threads: the PostgreSQL
    // store blocks on its own small runtime.
    let (store, charging) = {
        let (location, pg) = (config.location()?, config.postgres.clone());
        tokio::task::spawn_blocking(move || location.open_core(&pg))
            .await?
            .context("opening the store")?
    };
    let transport = TransportOptions {
        idle_timeout: std::time::Duration::from_secs(config.idle_timeout_s),
        segmentation_offload: config.segmentation_offload,
        ..TransportOptions::default()
    };
    let crl_text = |c: &CoreConfig| -> anyhow::Result<String> {
        match &c.crl {
            Some(p) => read(p),
            None => Ok(String::new()),
        }
    };
    let endpoint = server_endpoint(
        config.listen.parse()?,
        &read(&config.cert)?,
        &read(&config.key)?,
        &read(&config.ca_cert)?,
        &crl_text(&config)?,
        &transport,
    )?;
    // A CRL the operator updates takes effect for new handshakes within
    // seconds, without a restart; one that does not parse keeps the last good one.
    let crl_watch = config.crl.clone().map(|path| {
        let (endpoint, config, transport) = (endpoint.clone(), config.clone(), transport);
        tokio::spawn(async move {
            let mtime = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
            let mut seen = mtime(&path);
            loop {
                tokio::time::sleep(std::time::Duration::from_secs(2)).await;
                let now = mtime(&path);
                if now == seen {
                    continue;
                }
                seen = now;
                let rebuilt = (|| -> anyhow::Result<quinn::ServerConfig> {
                    Ok(crate::quic::server_config(
                        &read(&config.cert)?,
                        &read(&config.key)?,
                        &read(&config.ca_cert)?,
                        &read(&path)?,
                        &transport,
                    )?)
                })();
                match rebuilt {
                    Ok(c) => {
                        endpoint.set_server_config(Some(c));
                        tracing::info!(crl = %path.display(), "certificate revocation list reloaded");
                    }
                    Err(e) => tracing::error!(crl = %path.display(), error = %e, "certificate revocation list not reloaded; the previous one stays"),
                }
            }
        })
    });
    let bound = endpoint.local_addr()?;
    let (stop, rx) = tokio::sync::watch::channel(false);
    let described = store.describe();
    let stats = Arc::new(crate::core_server::CoreStats::default());
    let downlink = Arc::new(crate::core_server::DownlinkService {
        store: charging.clone(),
        policy: config.grants.clone(),
    });
    if config.http.is_none() {
        if let Some(path) = &config.operator_token_file {
            tracing::warn!(
                token_file = %path.display(),
                "operator_token_file is set but http is not: no operator API is served (set http = \"HOST:PORT\")"
            );
        }
    }
    let http = match &config.http {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("http: binding {addr}"))?;
            let bound = listener.local_addr()?;
            let mut app = http_routes(store.clone(), stats.clone());
            if let Some(path) = &config.operator_token_file {
                let token = read(path)?;
                let token = token.lines().next().unwrap_or("").trim().to_string();
                anyhow::ensure!(
                    token.len() >= 16,
                    "{}: the operator token is empty or shorter than 16 characters",
                    path.display()
                );
                app = app.merge(crate::core_packages::operator_routes(
                    charging.clone(),
                    token,
                ));
            }
            let mut stop = rx.clone();
            tokio::spawn(async move {
                let _ = axum::serve(listener, app)
                    .with_graceful_shutdown(async move {
                        crate::core_server::stopped(&mut stop).await;
                    })
                    .await;
            });
            Some(bound.to_string())
        }
        None => None,
    };
    // New months' partitions are made ahead, daily (PostgreSQL; SQLite has none).
    let partitions = {
        let store = store.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(std::time::Duration::from_secs(24 * 3600)).await;
                let store = store.clone();
                match tokio::task::spawn_blocking(move || store.maintain()).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        tracing::error!(error = %e, "store upkeep (next months' partitions) failed; retried tomorrow")
                    }
                    Err(e) => tracing::error!(error = %e, "store upkeep panicked"),
                }
            }
        })
    };
    // Grants never given back (a box gone for good) end a grace after
    // their expiry, hourly: what they held returns to the balance
    // (`ChargingStore::expire`; instances doing it at once end each once).
    let expiry = {
        let (charging, policy) = (charging.clone(), config.grants.clone());
        tokio::spawn(async move {
            let mut hourly = tokio::time::interval(std::time::Duration::from_secs(3600));
            loop {
                hourly.tick().await;
                let (charging, policy) = (charging.clone(), policy.clone());
                let now = chrono::Utc::now().timestamp();
                match tokio::task::spawn_blocking(move || charging.expire(&policy, now)).await {
                    Ok(Ok(ended)) if !ended.is_empty() => {
                        tracing::info!(
                            grants = ended.len(),
                            "unreturned grants ended; their tokens are back in the balances"
                        )
                    }
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => {
                        tracing::error!(error = %e, "ending unreturned grants failed; tried again in an hour")
                    }
                    Err(e) => tracing::error!(error = %e, "ending unreturned grants panicked"),
                }
            }
        })
    };
    let server = tokio::spawn(crate::core_server::serve_counted(
        endpoint,
        store,
        Some(downlink),
        stats,
        rx,
    ));
    println!(
        "{}",
        serde_json::json!({ "event": "ready", "listen": bound.to_string(), "http": http, "store": described })
    );
    tracing::info!(%bound, "core-ingest serving");
    use tokio::signal::unix::{signal, SignalKind};
    let (mut term, mut int) = (
        signal(SignalKind::terminate())?,
        signal(SignalKind::interrupt())?,
    );
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    let _ = stop.send(true);
    partitions.abort();
    expiry.abort();
    if let Some(w) = crl_watch {
        w.abort();
    }
    let _ = tokio::time::timeout(std::time::Duration::from_secs(10), server).await;
    Ok(())
}

/// `/healthz` (the process answers), `/readyz` (the store answers and its
/// schema is current: 503 with the reason otherwise) and `/metrics`.
fn http_routes(
    store: crate::core_server::SharedStore,
    stats: Arc<crate::core_server::CoreStats>,
) -> axum::Router {
    use axum::http::StatusCode;
    use axum::routing::get;
    let ready = {
        let store = store.clone();
        move || {
            let store = store.clone();
            async move {
                let described = store.describe();
                let checked = tokio::task::spawn_blocking(move || store.check_ready())
                    .await
                    .map_err(|e| e.to_string())
                    .and_then(|r| r.map_err(|e| e.to_string()));
                match checked {
                    Ok(()) => (
                        StatusCode::OK,
                        axum::Json(serde_json::json!({ "ready": true, "store": described })),
                    ),
                    Err(reason) => (
                        StatusCode::SERVICE_UNAVAILABLE,
                        axum::Json(
                            serde_json::json!({ "ready": false, "store": described, "reason": reason }),
                        ),
                    ),
                }
            }
        }
    };
    let metrics = move || {
        let stats = stats.clone();
        async move {
            (
                [(
                    "content-type",
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                )],
                render_metrics(&stats),
            )
        }
    };
    axum::Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(metrics))
}

/// The instance's counters in the OpenMetrics text format.
fn render_metrics(stats: &crate::core_server::CoreStats) -> String {
    use prometheus_client::metrics::counter::Counter;
    use prometheus_client::metrics::gauge::Gauge;
    use std::sync::atomic::Ordering::Relaxed;
    let mut registry = prometheus_client::registry::Registry::with_prefix("core_ingest");
    let counter =
        |registry: &mut prometheus_client::registry::Registry, name: &str, help: &str, v: u64| {
            let c: Counter = Counter::default();
            c.inc_by(v);
            registry.register(name, help, c);
        };
    counter(
        &mut registry,
        "batches",
        "Batches committed and acknowledged",
        stats.batches.load(Relaxed),
    );
    counter(
        &mut registry,
        "records_stored",
        "Records stored",
        stats.records.load(Relaxed),
    );
    counter(
        &mut registry,
        "duplicates",
        "Records received again (already stored)",
        stats.duplicates.load(Relaxed),
    );
    counter(
        &mut registry,
        "quarantined",
        "Records kept aside (faults and forks)",
        stats.quarantined.load(Relaxed),
    );
    counter(
        &mut registry,
        "store_errors",
        "Store calls that failed: batches not committed (not acknowledged), hellos not answered",
        stats.store_errors.load(Relaxed),
    );
    let open: Gauge = Gauge::default();
    open.set(stats.connections.load(Relaxed));
    registry.register("connections", "Node connections open", open);
    let mut text = String::new();
    let _ = prometheus_client::encoding::text::encode(&mut text, &registry);
    text
}

/// `core-ingest revoke-node-cert`: adds the certificate's serial number to
/// the CRL (`crl` in the configuration), signed by the operator CA and
/// written atomically. A running core refuses the node's next handshake.
pub fn revoke_node_cert(config: &CoreConfig, cert_pem: &str) -> anyhow::Result<serde_json::Value> {
    let path = config
        .crl
        .as_ref()
        .context("the configuration names no crl file (crl = \"crl.pem\")")?;
    let ca = config.ca()?;
    let serial = crate::pki::serial_of(cert_pem)?;
    let existing = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let (mut revoked, number) =
        crate::pki::read_crl(&ca, &existing).with_context(|| format!("{}", path.display()))?;
    let already = revoked.iter().any(|r| r.serial == serial);
    if !already {
        revoked.push(crate::pki::Revoked {
            serial: serial.clone(),
            at_unix: chrono::Utc::now().timestamp(),
        });
        let tmp = path.with_extension("pem.tmp");
        write_file(&tmp, &make_crl(&ca, &revoked, number + 1)?, false)?;
        std::fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))?;
    }
    Ok(serde_json::json!({
        "serial": hex::encode(&serial),
        "already_revoked": already,
        "revoked": revoked.len(),
        "crl": path,
    }))
}

/// `core-ingest audit`: per node, records, highest contiguous seq, gaps,
/// quarantine, chain status.
pub fn audit(config: &CoreConfig) -> anyhow::Result<serde_json::Value> {
    Ok(serde_json::to_value(config.open_store()?.audit()?)?)
}

/// `core-ingest copy-store`: copies every node of `from` into `to` (an
/// empty store: SQLite into PostgreSQL when an operator moves the core) and
/// verifies the copy.
///
/// The copy does not trust the source: each node's records go into `to`
/// through [`IngestStore::ingest`], in batches as they were received (their
/// receive times kept), so every signature is checked again with the
/// node's keys, every body hash recomputed and every link of the chain
/// walked, as if the node were uploading them. Declared gaps travel as the
/// lost ranges they were; records kept aside are copied as kept. Then the
/// two audits must agree node by node (records, cursor, gaps, forks, kept
/// aside) and every chain in `to` must be whole. The counts of duplicates
/// received are history and start again at 0.
pub fn copy_store(
    from: &dyn IngestStore,
    to: &dyn IngestStore,
) -> anyhow::Result<serde_json::Value> {
    anyhow::ensure!(
        to.is_empty()?,
        "{} already holds nodes: copy into an empty store",
        to.describe()
    );
    copy_nodes(from, to).with_context(|| {
        format!(
            "copying {} into {} (what was copied is not usable: empty {} before trying again)",
            from.describe(),
            to.describe(),
            to.describe()
        )
    })
}

fn copy_nodes(from: &dyn IngestStore, to: &dyn IngestStore) -> anyhow::Result<serde_json::Value> {
    use crate::wire::pb::{Batch, LossReason, LostRange};
    let t0 = std::time::Instant::now();
    // In node id order as Rust compares them (the engines' collations differ).
    let mut source = from.audit()?;
    source.sort_by(|a, b| a.node_id.cmp(&b.node_id));
    let (mut records, mut kept) = (0u64, 0u64);
    for node in &source {
        let id = node.node_id.as_str();
        let keys: Vec<ed25519_dalek::VerifyingKey> = from
            .node_keys(id)?
            .iter()
            .filter_map(|k| ed25519_dalek::VerifyingKey::from_bytes(k).ok())
            .collect();
        anyhow::ensure!(
            !keys.is_empty() || node.records == 0,
            "node {id}: no public key is stored for it (its records reached a core older than \
             this one), so their signatures cannot be checked again; nothing was copied of it"
        );
        let lost: Vec<LostRange> = node
            .gaps
            .iter()
            .map(|&(first, last)| (first, last, LossReason::EdgeSalvaged))
            .chain(
                node.lost_by_core
                    .iter()
                    .map(|&(f, l)| (f, l, LossReason::CoreLost)),
            )
            .map(|(first, last, reason)| LostRange {
                first,
                last,
                reason: reason as i32,
            })
            .collect();
        // Records kept aside for a fault at a seq took their place in the
        // walk (the cursor moved past them): they ride again with the
        // records around them and are kept aside again. A fork is sent
        // right after the record it forks from is stored (the records
        // after it may chain to it). Records without a seq are copied as
        // they are.
        let aside = from.kept_aside(id)?;
        let (with_seq, as_kept): (Vec<_>, Vec<_>) =
            aside.into_iter().partition(|a| a.seq.is_some());
        let (mut forks, mut faults): (Vec<_>, Vec<_>) = with_seq.into_iter().partition(|a| a.fork);
        faults.sort_by_key(|a| a.seq);
        forks.sort_by_key(|a| a.seq);
        let mut faults = faults.into_iter().peekable();
        let mut forks = forks.into_iter().peekable();
        let mut after = 0u64;
        let mut records_of_node = 0u64;
        loop {
            let page = from.records_after(id, after, 1000)?;
            let Some(last) = page.last() else { break };
            after = last.seq;
            // A batch: records received together, signed with one key.
            let mut start = 0;
            while start < page.len() {
                let key_of = |r: &crate::ingest_store::StoredRecord| {
                    crate::record::SignedRecord::from_bytes(&r.signed)
                        .ok()
                        .and_then(|s| keys.iter().position(|k| s.verify(k).is_ok()))
                };
                let key = key_of(&page[start]).with_context(|| {
                    format!(
                        "node {id}, seq {}: the stored record's signature verifies with none of \
                         the node's keys",
                        page[start].seq
                    )
                })?;
                let fork_at = forks.peek().and_then(|f| f.seq);
                let mut end = start + 1;
                while end < page.len()
                    && page[end].received_ms == page[start].received_ms
                    && key_of(&page[end]) == Some(key)
                    && fork_at.is_none_or(|f| page[end - 1].seq < f)
                {
                    end += 1;
                }
                let mut signed: Vec<Vec<u8>> =
                    page[start..end].iter().map(|r| r.signed.clone()).collect();
                let mut riding = 0;
                while let Some(f) = faults.next_if(|f| f.seq <= Some(page[end - 1].seq)) {
                    signed.push(f.signed);
                    riding += 1;
                }
                let batch = Batch {
                    batch_id: 0,
                    records: signed,
                    lost: lost.clone(),
                };
                let checked = crate::ingest::check_records(id, &keys[key], batch);
                let v = to.ingest(id, checked, page[start].received_ms)?;
                let stored: Vec<u64> = v.accepted.iter().map(|a| a.seq).collect();
                let wanted: Vec<u64> = page[start..end].iter().map(|r| r.seq).collect();
                anyhow::ensure!(
                    stored == wanted
                        && v.quarantined.len() == riding
                        && v.deferred == 0
                        && v.duplicates == 0,
                    "node {id}: records {}..={} did not pass the checks again: {:?}",
                    page[start].seq,
                    page[end - 1].seq,
                    v.quarantined
                        .iter()
                        .map(|q| (q.seq, &q.reason))
                        .collect::<Vec<_>>()
                );
                records += v.accepted.len() as u64;
                records_of_node += v.accepted.len() as u64;
                kept += riding as u64;
                while let Some(f) = forks.next_if(|f| f.seq <= Some(page[end - 1].seq)) {
                    // A fork is the node's own record: one of its keys signed it.
                    let fork_key = crate::record::SignedRecord::from_bytes(&f.signed)
                        .ok()
                        .and_then(|s| keys.iter().find(|k| s.verify(k).is_ok()))
                        .unwrap_or(&keys[key]);
                    let batch = Batch {
                        batch_id: 0,
                        records: vec![f.signed.clone()],
                        lost: vec![],
                    };
                    let v = to.ingest(
                        id,
                        crate::ingest::check_records(id, fork_key, batch),
                        f.received_ms,
                    )?;
                    anyhow::ensure!(
                        v.forks == 1 && v.quarantined.len() == 1,
                        "node {id}: the fork at seq {:?} is not one again: {v:?}",
                        f.seq
                    );
                    kept += 1;
                }
                start = end;
            }
        }
        // Faults and lost ranges after the last stored record move the
        // cursor too; a node with nothing stored still gets its row.
        let (cursor, _) = to.position(id)?;
        let trailing: Vec<KeptAside> = faults.collect();
        if cursor.contiguous_seq < node.contiguous_seq
            || !trailing.is_empty()
            || records_of_node == 0
        {
            let key = keys.first().copied().unwrap_or_else(|| {
                // A node that sent only faults: no key was kept; the
                // faults fail their checks with any key.
                ed25519_dalek::SigningKey::from_bytes(&[0; 32]).verifying_key()
            });
            let batch = Batch {
                batch_id: 0,
                records: trailing.iter().map(|f| f.signed.clone()).collect(),
                lost: lost.clone(),
            };
            let received = trailing.first().map_or(0, |f| f.received_ms);
            let v = to.ingest(id, crate::ingest::check_records(id, &key, batch), received)?;
            kept += v.quarantined.len() as u64;
        }
        kept += as_kept.len() as u64;
        to.restore_kept_aside(id, &as_kept)?;
    }
    // The verification: the copy's audit is the source's, and whole.
    let mut copy = to.audit()?;
    copy.sort_by(|a, b| a.node_id.cmp(&b.node_id));
    anyhow::ensure!(
        copy.len() == source.len(),
        "the copy holds {} nodes, the source {}",
        copy.len(),
        source.len()
    );
    for (s, c) in source.iter().zip(&copy) {
        let same = s.node_id == c.node_id
            && s.records == c.records
            && s.contiguous_seq == c.contiguous_seq
            && s.gaps == c.gaps
            && s.lost_by_core == c.lost_by_core
            && s.forks == c.forks
            && s.quarantined == c.quarantined
            && c.chain == s.chain;
        anyhow::ensure!(
            same,
            "node {}: the copy differs:\n source {s:?}\n copy   {c:?}",
            s.node_id
        );
    }
    Ok(serde_json::json!({
        "from": from.describe(),
        "to": to.describe(),
        "nodes": copy.len(),
        "records": records,
        "kept_aside": kept,
        "signatures_checked": records,
        "verified": true,
        "seconds": t0.elapsed().as_secs_f64(),
    }))
}

/// Output format of `export`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Comma-separated values with a header row.
    Csv,
    /// One JSON object per line.
    Jsonl,
}

/// Parses `--from`/`--to`: RFC 3339, a date (UTC midnight), or Unix seconds.
pub fn parse_time(s: &str) -> anyhow::Result<i64> {
    if let Ok(secs) = s.parse::<i64>() {
        return secs
            .checked_mul(1000)
            .with_context(|| format!("{s:?}: seconds beyond what a time holds"));
    }
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        return Ok(t.timestamp_millis());
    }
    if let Ok(d) = chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        return Ok(d.and_hms_opt(0, 0, 0).unwrap().and_utc().timestamp_millis());
    }
    anyhow::bail!("{s:?} is not a time (RFC 3339, YYYY-MM-DD, or Unix seconds)")
}

/// Columns of the bills' summary (`export --summary`).
pub const BILL_COLUMNS: [&str; 10] = [
    "imsi",
    "from_ms",
    "to_ms",
    "packages",
    "tokens_bought",
    "tokens_granted",
    "tokens_used",
    "overage",
    "remaining",
    "boxes",
];

/// Writes the bill of every subscriber with a package sold or a record
/// settled in `[from_ms, to_ms)`: CSV, one row of totals each
/// ([`BILL_COLUMNS`]), or JSON lines, the whole bill each (per box and
/// model). Returns how many.
pub fn export_bills(
    config: &CoreConfig,
    format: Format,
    from_ms: Option<i64>,
    to_ms: Option<i64>,
    out: &mut dyn Write,
) -> anyhow::Result<u64> {
    let store = config.location()?.open_charging(&config.postgres)?;
    let (from_ms, to_ms) = (from_ms.unwrap_or(0), to_ms.unwrap_or(i64::MAX));
    let now = chrono::Utc::now().timestamp();
    let subscribers = store.subscribers_billed(from_ms, to_ms)?;
    let bills = subscribers
        .iter()
        .map(|imsi| store.bill(imsi, from_ms, to_ms, now));
    let mut n = 0;
    match format {
        Format::Csv => {
            let mut w = csv::Writer::from_writer(out);
            w.write_record(BILL_COLUMNS)?;
            for bill in bills {
                let bill = bill?;
                let mut boxes: Vec<&str> = bill
                    .granted
                    .iter()
                    .map(|g| g.node_id.as_str())
                    .chain(bill.used.iter().map(|u| u.node_id.as_str()))
                    .collect();
                boxes.sort();
                boxes.dedup();
                w.write_record([
                    bill.imsi.clone(),
                    bill.from_ms.to_string(),
                    bill.to_ms.to_string(),
                    bill.packages.len().to_string(),
                    bill.tokens_bought.to_string(),
                    bill.tokens_granted.to_string(),
                    bill.tokens_used.to_string(),
                    bill.overage.to_string(),
                    bill.remaining.to_string(),
                    boxes.len().to_string(),
                ])?;
                n += 1;
            }
            w.flush()?;
        }
        Format::Jsonl => {
            for bill in bills {
                writeln!(out, "{}", serde_json::to_string(&bill?)?)?;
                n += 1;
            }
        }
    }
    Ok(n)
}

/// `core-ingest export`: records whose end time is in `[from, to)` (Unix
/// ms), one row each, or with `by_imsi_day` the sums per IMSI per UTC day.
pub fn export(
    config: &CoreConfig,
    format: Format,
    from_ms: Option<i64>,
    to_ms: Option<i64>,
    by_imsi_day: bool,
    out: &mut dyn Write,
) -> anyhow::Result<u64> {
    let store = config.open_store()?;
    let query = ExportQuery {
        from_ms: from_ms.unwrap_or(i64::MIN),
        to_ms: to_ms.unwrap_or(i64::MAX),
        by_imsi_day,
    };
    let columns: &[&str] = if by_imsi_day {
        &DAY_COLUMNS
    } else {
        &RECORD_COLUMNS
    };
    // Each row is written as it comes from the store: nothing holds the
    // export in memory.
    let n = match format {
        Format::Csv => {
            let mut w = csv::Writer::from_writer(out);
            w.write_record(columns)?;
            let n = store.export(&query, &mut |values| {
                w.write_record(values.iter().map(|v| match v {
                    ExportValue::Int(i) => i.to_string(),
                    ExportValue::Text(t) => t.clone(),
                    ExportValue::Null => String::new(),
                }))
                .map_err(std::io::Error::other)
            })?;
            w.flush()?;
            n
        }
        Format::Jsonl => store.export(&query, &mut |values| {
            let obj: serde_json::Map<String, serde_json::Value> = columns
                .iter()
                .zip(values)
                .map(|(c, v)| {
                    let j = match v {
                        ExportValue::Int(i) => serde_json::json!(i),
                        ExportValue::Text(t) if *c == "package_ids" => {
                            serde_json::from_str(t).unwrap_or(serde_json::json!(t))
                        }
                        ExportValue::Text(t) => serde_json::json!(t),
                        ExportValue::Null => serde_json::Value::Null,
                    };
                    (c.to_string(), j)
                })
                .collect();
            writeln!(out, "{}", serde_json::Value::Object(obj))
        })?,
    };
    Ok(n)
}
