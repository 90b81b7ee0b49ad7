//! The agent's TOML configuration: parsed with unknown keys refused, then
//! validated before any I/O, with errors that name the key. Every option is
//! documented in `edge-agent/edge-agent.example.toml`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// This box.
    pub node: NodeConfig,
    /// The MEC API listener.
    #[serde(default)]
    pub api: ApiConfig,
    /// The admin listener (loopback only).
    #[serde(default)]
    pub admin: AdminConfig,
    /// The one model served (the short form of a single `[[models]]`):
    /// moved into `models` when the file is parsed.
    #[serde(default, rename = "model")]
    single_model: Option<ModelConfig>,
    /// The models served (`[[models]]`; `[model]` is the first when given).
    #[serde(default)]
    pub models: Vec<ModelConfig>,
    /// How the models share the box.
    #[serde(default)]
    pub serving: ServingConfig,
    /// The operator's rate table.
    #[serde(default)]
    pub rating: RatingConfig,
    /// Names that route each request to one of several models (`auto`).
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
    /// Rate limits.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// The usage log.
    #[serde(default)]
    pub log: LogConfig,
    /// Metering.
    #[serde(default)]
    pub metering: MeteringConfig,
    /// The operator's core-ingest (absent: records stay in the log).
    #[serde(default)]
    pub core: Option<CoreConfig>,
    /// Apps allowed to call the API.
    #[serde(default)]
    pub apps: Vec<AppConfig>,
    /// The site configuration provisioning wrote (`state_dir/site.toml`),
    /// already laid over the fields above when the file was loaded.
    #[serde(skip)]
    pub site: Option<mec_provisioning::site::SiteConfig>,
}

/// `[node]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// Node id written into every usage record.
    pub id: String,
    /// Holds `identity/`, `log/` and `ledger.sqlite`. Relative paths are
    /// relative to the configuration file.
    pub state_dir: PathBuf,
}

/// `[api]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// Address of the MEC API (port 0: any free port, printed when ready).
    #[serde(default = "default_api_listen")]
    pub listen: String,
    /// Largest request body; larger ones get 413.
    #[serde(default = "default_max_body")]
    pub max_body_bytes: usize,
    /// Longest a request body may take to arrive. (A reservation is held for
    /// as long as its request runs; no clock expires it.)
    #[serde(default = "default_request_timeout")]
    pub request_timeout_s: u64,
    /// On SIGTERM, how long in-flight requests may finish before they are
    /// cancelled (and billed for what they made).
    #[serde(default = "default_grace")]
    pub shutdown_grace_s: u64,
    /// Largest JSON Schema (`response_format`, a tool's parameters, all
    /// tools together), serialized; larger ones get 400.
    #[serde(default = "default_max_schema_bytes")]
    pub max_schema_bytes: usize,
    /// Deepest nesting of a schema document; deeper ones get 400.
    #[serde(default = "default_max_schema_depth")]
    pub max_schema_depth: usize,
    /// Most choices (`n`) one request may ask for: at most `model.slots`
    /// (a request's choices decode at once); default `model.slots`.
    #[serde(default)]
    pub max_choices: Option<usize>,
}

impl ApiConfig {
    /// Most choices one request may ask for (`max_choices`, else `slots`).
    pub fn max_choices(&self, slots: usize) -> usize {
        self.max_choices.unwrap_or(slots).max(1)
    }
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            listen: default_api_listen(),
            max_body_bytes: default_max_body(),
            request_timeout_s: default_request_timeout(),
            shutdown_grace_s: default_grace(),
            max_schema_bytes: default_max_schema_bytes(),
            max_schema_depth: default_max_schema_depth(),
            max_choices: None,
        }
    }
}

/// `[admin]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Address of the admin API: must be a loopback address.
    #[serde(default = "default_admin_listen")]
    pub listen: String,
    /// The root update service's socket (`edge-update.socket` on the
    /// appliance): `/admin/v1/update` asks it for slot status and applies.
    #[serde(default = "default_update_socket")]
    pub update_socket: PathBuf,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: default_admin_listen(),
            update_socket: default_update_socket(),
        }
    }
}

/// `[[models]]` (or the one `[model]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// GGUF file. Relative paths are relative to the configuration file.
    pub path: PathBuf,
    /// The id clients name in `model`.
    pub id: String,
    /// Other names clients may use for it.
    #[serde(default)]
    pub aliases: Vec<String>,
    /// `start`: loaded before the agent says it is ready; `on_demand`:
    /// at the first request for it (which gets `503 model_loading`).
    #[serde(default)]
    pub load: LoadWhen,
    /// Never evicted to make room for another model, never unloaded for
    /// idleness.
    #[serde(default)]
    pub pin: bool,
    /// Unloaded after this many seconds without a request; absent: stays
    /// loaded until another model needs its memory.
    #[serde(default)]
    pub keep_alive_s: Option<u64>,
    /// `auto` (the GPU with the most free memory that fits it, else the
    /// CPU), `cpu`, or `gpu:N`.
    #[serde(default)]
    pub device: Option<String>,
    /// Sequences generated at once.
    #[serde(default = "default_slots")]
    pub slots: usize,
    /// Requests waiting beyond the slots; past it, 503.
    #[serde(default = "default_queue")]
    pub queue: usize,
    /// Tokens of KV kept for prompts that share a beginning.
    #[serde(default = "default_prefix_cache")]
    pub prefix_cache_tokens: usize,
    /// Run on this GPU (NVML index) only; absent: the GPU with the most free
    /// memory, or the CPU. A GPU that is not there means the CPU, logged.
    /// (The older spelling of `device = "gpu:N"`.)
    #[serde(default)]
    pub gpu: Option<u32>,
}

/// When a model loads.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LoadWhen {
    /// Before the agent is ready.
    #[default]
    Start,
    /// At the first request for it.
    OnDemand,
}

impl ModelConfig {
    /// Where the model may run, from `device` (or the older `gpu`).
    pub fn device_wish(&self) -> Result<mec_inference::registry::DeviceWish, String> {
        use mec_inference::registry::DeviceWish;
        match (self.device.as_deref(), self.gpu) {
            (Some(_), Some(_)) => Err("give device or gpu, not both".into()),
            (None, Some(i)) => Ok(DeviceWish::Gpu(i)),
            (None | Some("auto"), None) => Ok(DeviceWish::Auto),
            (Some("cpu"), None) => Ok(DeviceWish::Cpu),
            (Some(d), None) => d
                .strip_prefix("gpu:")
                .and_then(|i| i.parse().ok())
                .map(DeviceWish::Gpu)
                .ok_or_else(|| format!("{d:?}: auto, cpu or gpu:N")),
        }
    }

    /// The registry's view of this model.
    pub fn spec(&self) -> mec_inference::registry::ModelSpec {
        mec_inference::registry::ModelSpec {
            id: self.id.clone(),
            aliases: self.aliases.clone(),
            path: self.path.clone(),
            engine: mec_inference::engine::EngineConfig {
                slots: self.slots,
                queue_capacity: self.queue,
                prefix_cache_tokens: self.prefix_cache_tokens,
                ..Default::default()
            },
            // Checked when the configuration was validated.
            device: self.device_wish().unwrap_or_default(),
            pinned: self.pin,
            keep_alive: self.keep_alive_s.map(std::time::Duration::from_secs),
            load_at_start: self.load == LoadWhen::Start,
        }
    }
}

/// `[[routes]]`: a name clients may use as `model` that picks one of
/// several models per request.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// The name (`auto`).
    pub name: String,
    /// The candidates: model ids, or `tier:NAME` for the models the rate
    /// table puts in tier NAME (in the order of `[[models]]`).
    pub models: Vec<String>,
    /// `cheapest`: the candidates by their price in the rate table (prompt
    /// plus completion), cheapest first; `first`: in the order given. Each
    /// request goes to the first candidate that can take it now: a model
    /// that is loading (its load starts), unloading, failed, overloaded, or
    /// whose context cannot hold the prompt, or that the subscriber's
    /// packages do not cover, passes it to the next.
    #[serde(default)]
    pub policy: RoutePolicy,
}

/// How a route orders its candidates.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RoutePolicy {
    /// Cheapest first (by the rate table in force).
    #[default]
    Cheapest,
    /// In the order given.
    First,
}

/// `[rating]`: what a token of each model costs in package units.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RatingConfig {
    /// A rate table to install at start (its signature beside it, `FILE.sig`);
    /// refused unless it verifies with the operator key and is newer than
    /// the one in force. Absent, and none installed: one unit per token.
    #[serde(default)]
    pub table: Option<PathBuf>,
    /// The operator's public key (SPKI PEM) rate tables are checked with;
    /// absent: the site's image key (from provisioning).
    #[serde(default)]
    pub key: Option<PathBuf>,
}

/// `[serving]`: how the models share the box.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServingConfig {
    /// Most bytes of models loaded on the host at once (each model counts
    /// its file plus the KV cache its slots can reach, as `/v1/models`
    /// shows it); absent: 80% of the host's memory. GPUs hold 90% of
    /// theirs. Past it, the least recently used idle model is unloaded.
    #[serde(default)]
    pub max_loaded_bytes: Option<u64>,
    /// Most models loaded at once; absent: as many as memory holds.
    #[serde(default)]
    pub max_loaded_models: Option<usize>,
}

/// `[limits]`: 0 disables a limit.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Requests per second per subscriber.
    #[serde(default = "default_imsi_rps")]
    pub imsi_requests_per_second: f64,
    /// Tokens per minute per subscriber (prompt plus most completion).
    #[serde(default = "default_imsi_tpm")]
    pub imsi_tokens_per_minute: f64,
    /// Requests per second per app.
    #[serde(default = "default_app_rps")]
    pub app_requests_per_second: f64,
    /// Tokens per minute per app.
    #[serde(default = "default_app_tpm")]
    pub app_tokens_per_minute: f64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            imsi_requests_per_second: default_imsi_rps(),
            imsi_tokens_per_minute: default_imsi_tpm(),
            app_requests_per_second: default_app_rps(),
            app_tokens_per_minute: default_app_tpm(),
        }
    }
}

/// `[log]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// Segment size.
    #[serde(default = "default_segment")]
    pub segment_bytes: u64,
    /// Most bytes of records not yet acknowledged by the core; past it,
    /// billable requests get 503.
    #[serde(default = "default_budget")]
    pub budget_bytes: u64,
    /// `auto`, `uring` or `file`.
    #[serde(default = "default_backend")]
    pub backend: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            segment_bytes: default_segment(),
            budget_bytes: default_budget(),
            backend: default_backend(),
        }
    }
}

/// `[core]`: where usage records go. The node certificate
/// (`identity/node.crt`) and the operator CA (`identity/operator-ca.crt`)
/// live in the state directory; the upload starts once both are there.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoreConfig {
    /// core-ingest's UDP address, host:port.
    pub address: String,
    /// The name its certificate carries.
    #[serde(default = "default_server_name")]
    pub server_name: String,
    /// UDP segmentation offload (off works around kernel and NIC bugs).
    #[serde(default = "default_true")]
    pub segmentation_offload: bool,
    /// Records per batch.
    #[serde(default = "default_batch_records")]
    pub batch_records: usize,
    /// Batches in flight.
    #[serde(default = "default_in_flight")]
    pub batches_in_flight: usize,
    /// Seconds without a packet from the core after which the connection
    /// is declared lost (QUIC's idle timeout; keep-alives every third of
    /// it): how soon the box knows it is cut off and serves offline.
    #[serde(default = "default_idle_timeout_s")]
    pub idle_timeout_s: u64,
}

fn default_idle_timeout_s() -> u64 {
    30
}

fn default_server_name() -> String {
    "localhost".into()
}
fn default_batch_records() -> usize {
    2048
}
fn default_in_flight() -> usize {
    4
}

/// `[metering]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeteringConfig {
    /// Benchmark-only: `false` serves without reserving, settling or
    /// recording anything. Never on a real box; the agent warns loudly.
    #[serde(default = "default_true")]
    pub enabled: bool,
}

impl Default for MeteringConfig {
    fn default() -> Self {
        MeteringConfig { enabled: true }
    }
}

/// `[[apps]]`: one app that may call the API.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppConfig {
    /// App id written into usage records.
    pub id: String,
    /// SHA-256 of the app key, hex (the key itself is never stored).
    pub key_sha256: String,
    /// IMSI prefixes (PLMN ids) the app may bill; `""` allows every IMSI.
    pub imsi_prefixes: Vec<String>,
    /// Model ids the app may use; `"*"` allows every model.
    pub models: Vec<String>,
}

fn default_api_listen() -> String {
    "127.0.0.1:8080".into()
}
fn default_admin_listen() -> String {
    "127.0.0.1:8081".into()
}
fn default_update_socket() -> PathBuf {
    "/run/edge-update.sock".into()
}
fn default_max_body() -> usize {
    4 << 20
}
fn default_max_schema_bytes() -> usize {
    64 << 10
}
fn default_max_schema_depth() -> usize {
    32
}

fn default_request_timeout() -> u64 {
    600
}
fn default_grace() -> u64 {
    30
}
fn default_slots() -> usize {
    4
}
fn default_queue() -> usize {
    64
}
fn default_prefix_cache() -> usize {
    16_384
}
fn default_imsi_rps() -> f64 {
    20.0
}
fn default_imsi_tpm() -> f64 {
    200_000.0
}
fn default_app_rps() -> f64 {
    1000.0
}
fn default_app_tpm() -> f64 {
    20_000_000.0
}
fn default_segment() -> u64 {
    64 << 20
}
fn default_budget() -> u64 {
    1 << 30
}
fn default_backend() -> String {
    "auto".into()
}
fn default_true() -> bool {
    true
}

/// A configuration error, naming the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Not TOML, an unknown key, a wrong type.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// toml's message (it names the key and the line).
        message: String,
    },
    /// A value out of range.
    #[error("{path}: {key}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The key, dotted (`api.listen`, `apps[0].key_sha256`).
        key: String,
        /// What is wrong.
        message: String,
    },
}

impl Config {
    /// Reads, parses and validates `path`; relative paths in it become
    /// relative to its directory.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut c = Config::parse(&text, path)?;
        let base = path.parent().unwrap_or(Path::new("."));
        if c.node.state_dir.is_relative() {
            c.node.state_dir = base.join(&c.node.state_dir);
        }
        for m in &mut c.models {
            if m.path.is_relative() {
                m.path = base.join(&m.path);
            }
        }
        for p in [&mut c.rating.table, &mut c.rating.key]
            .into_iter()
            .flatten()
        {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        let site_path = c.state().site();
        let site = mec_provisioning::site::SiteConfig::load(&site_path).map_err(|message| {
            ConfigError::Parse {
                path: site_path.clone(),
                message,
            }
        })?;
        if let Some(site) = site {
            c.apply_site(site);
            c.validate(&site_path)?;
        }
        Ok(c)
    }

    /// Lays a provisioned site configuration over this one: the node id,
    /// the core, the API's address. The site's word wins: a technician set
    /// it for this box.
    pub fn apply_site(&mut self, site: mec_provisioning::site::SiteConfig) {
        self.node.id.clone_from(&site.node_id);
        match &mut self.core {
            Some(core) => {
                core.address.clone_from(&site.core_address);
                core.server_name.clone_from(&site.core_server_name);
            }
            None => {
                self.core = Some(CoreConfig {
                    address: site.core_address.clone(),
                    server_name: site.core_server_name.clone(),
                    segmentation_offload: default_true(),
                    batch_records: default_batch_records(),
                    batches_in_flight: default_in_flight(),
                    idle_timeout_s: default_idle_timeout_s(),
                })
            }
        }
        if let Some(listen) = &site.api_listen {
            self.api.listen.clone_from(listen);
        }
        self.site = Some(site);
    }

    /// Parses and validates TOML text (`path` only names it in errors).
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let mut c: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        if let Some(single) = c.single_model.take() {
            if !c.models.is_empty() {
                return Err(ConfigError::Invalid {
                    path: path.to_path_buf(),
                    key: "model".into(),
                    message: "give one [model] or several [[models]], not both".into(),
                });
            }
            c.models.push(single);
        }
        c.validate(path)?;
        Ok(c)
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let bad = |key: &str, message: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            key: key.into(),
            message,
        };
        if self.node.id.is_empty() || self.node.id.len() > 128 {
            return Err(bad("node.id", "1 to 128 characters".into()));
        }
        let api: SocketAddr = self.api.listen.parse().map_err(|e| {
            bad(
                "api.listen",
                format!("{:?} is not host:port ({e})", self.api.listen),
            )
        })?;
        let admin: SocketAddr = self.admin.listen.parse().map_err(|e| {
            bad(
                "admin.listen",
                format!("{:?} is not host:port ({e})", self.admin.listen),
            )
        })?;
        if !admin.ip().is_loopback() {
            return Err(bad(
                "admin.listen",
                format!("{admin} is not a loopback address; the admin API must not leave the box"),
            ));
        }
        if api == admin && api.port() != 0 {
            return Err(bad("admin.listen", "the same address as api.listen".into()));
        }
        if self.api.max_body_bytes < 1024 {
            return Err(bad("api.max_body_bytes", "at least 1024".into()));
        }
        if self.api.max_schema_bytes == 0 || self.api.max_schema_depth == 0 {
            return Err(bad(
                "api.max_schema_bytes",
                "api.max_schema_bytes and api.max_schema_depth must be at least 1".into(),
            ));
        }
        let most_slots = self.models.iter().map(|m| m.slots).max().unwrap_or(1);
        if let Some(n) = self.api.max_choices {
            if n == 0 || n > most_slots {
                return Err(bad(
                    "api.max_choices",
                    format!(
                        "1 to the models' slots ({most_slots}): a request's choices decode at once"
                    ),
                ));
            }
        }
        if self.api.request_timeout_s == 0 {
            return Err(bad("api.request_timeout_s", "at least 1".into()));
        }
        if self.models.is_empty() {
            return Err(bad("models", "no model: give [model] or [[models]]".into()));
        }
        // Every name a client may use reaches one model.
        let mut names: std::collections::HashMap<&str, &str> = Default::default();
        for (i, m) in self.models.iter().enumerate() {
            let key = |k: &str| format!("models[{i}].{k}");
            if !id_ok(&m.id) {
                return Err(bad(&key("id"), format!("{:?}: {ID_RULE}", m.id)));
            }
            if m.id.starts_with("tier:") || m.aliases.iter().any(|a| a.starts_with("tier:")) {
                return Err(bad(
                    &key("id"),
                    "tier:NAME names a tier of the rate table in routes, not a model".into(),
                ));
            }
            for (k, name) in
                std::iter::once(("id", &m.id)).chain(m.aliases.iter().map(|a| ("aliases", a)))
            {
                if !id_ok(name) {
                    return Err(bad(&key(k), format!("{name:?}: {ID_RULE}")));
                }
                if let Some(first) = names.insert(name, &m.id) {
                    return Err(bad(
                        &key(k),
                        format!("{name:?} names both {first:?} and {:?}", m.id),
                    ));
                }
            }
            if !(1..=256).contains(&m.slots) {
                return Err(bad(&key("slots"), "1 to 256".into()));
            }
            if m.queue == 0 {
                return Err(bad(&key("queue"), "at least 1".into()));
            }
            m.device_wish().map_err(|e| bad(&key("device"), e))?;
            if m.keep_alive_s == Some(0) {
                return Err(bad(
                    &key("keep_alive_s"),
                    "at least 1 (absent: stays loaded)".into(),
                ));
            }
        }
        for (i, r) in self.routes.iter().enumerate() {
            let key = |k: &str| format!("routes[{i}].{k}");
            if !id_ok(&r.name) {
                return Err(bad(&key("name"), format!("{:?}: {ID_RULE}", r.name)));
            }
            if let Some(first) = names.insert(&r.name, &r.name) {
                return Err(bad(
                    &key("name"),
                    format!(
                        "{:?} is also the model {first:?} (or another route)",
                        r.name
                    ),
                ));
            }
            if r.models.is_empty() {
                return Err(bad(&key("models"), "no candidate".into()));
            }
            for m in &r.models {
                let known = self.models.iter().any(|x| &x.id == m);
                if !known && m.strip_prefix("tier:").is_none_or(str::is_empty) {
                    return Err(bad(
                        &key("models"),
                        format!("{m:?} is neither a model id nor tier:NAME"),
                    ));
                }
            }
        }
        if self.serving.max_loaded_models == Some(0) {
            return Err(bad("serving.max_loaded_models", "at least 1".into()));
        }
        for (key, v) in [
            (
                "limits.imsi_requests_per_second",
                self.limits.imsi_requests_per_second,
            ),
            (
                "limits.imsi_tokens_per_minute",
                self.limits.imsi_tokens_per_minute,
            ),
            (
                "limits.app_requests_per_second",
                self.limits.app_requests_per_second,
            ),
            (
                "limits.app_tokens_per_minute",
                self.limits.app_tokens_per_minute,
            ),
        ] {
            if !v.is_finite() || v < 0.0 {
                return Err(bad(
                    key,
                    format!("{v} is not a rate (0 disables the limit)"),
                ));
            }
        }
        if !["auto", "uring", "file"].contains(&self.log.backend.as_str()) {
            return Err(bad(
                "log.backend",
                format!("{:?}: auto, uring or file", self.log.backend),
            ));
        }
        if self.log.segment_bytes < 4096 || self.log.budget_bytes < self.log.segment_bytes {
            return Err(bad(
                "log.budget_bytes",
                "segment_bytes at least 4096 and budget_bytes at least segment_bytes".into(),
            ));
        }
        if let Some(core) = &self.core {
            core.address.parse::<SocketAddr>().map_err(|e| {
                bad(
                    "core.address",
                    format!("{:?} is not host:port ({e})", core.address),
                )
            })?;
            if core.server_name.is_empty() {
                return Err(bad("core.server_name", "must not be empty".into()));
            }
            if !(1..=100_000).contains(&core.batch_records)
                || !(1..=64).contains(&core.batches_in_flight)
            {
                return Err(bad(
                    "core.batch_records",
                    "1 to 100000 records, 1 to 64 batches in flight".into(),
                ));
            }
        }
        let mut ids = std::collections::HashSet::new();
        for (i, app) in self.apps.iter().enumerate() {
            let key = |k: &str| format!("apps[{i}].{k}");
            if !id_ok(&app.id) {
                return Err(bad(&key("id"), format!("{:?}: {ID_RULE}", app.id)));
            }
            if !ids.insert(app.id.as_str()) {
                return Err(bad(&key("id"), format!("{:?}: not unique", app.id)));
            }
            if app.key_sha256.len() != 64 || hex::decode(&app.key_sha256).is_err() {
                return Err(bad(
                    &key("key_sha256"),
                    "64 hex digits (SHA-256 of the key)".into(),
                ));
            }
            for p in &app.imsi_prefixes {
                if p.len() > 15 || !p.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(bad(
                        &key("imsi_prefixes"),
                        format!("{p:?} is not digits (at most 15)"),
                    ));
                }
            }
            if app.imsi_prefixes.is_empty() {
                return Err(bad(
                    &key("imsi_prefixes"),
                    "empty: the app could bill nobody".into(),
                ));
            }
            if app.models.is_empty() {
                return Err(bad(
                    &key("models"),
                    "empty: the app could use no model".into(),
                ));
            }
        }
        Ok(())
    }

    /// The state directory's layout (file names in `mec_node::state`).
    pub fn state(&self) -> mec_node::state::StateDir {
        mec_node::state::StateDir::new(&self.node.state_dir)
    }

    /// `state_dir/identity`.
    pub fn identity_dir(&self) -> PathBuf {
        self.state().identity_dir()
    }

    /// `state_dir/log`.
    pub fn log_dir(&self) -> PathBuf {
        self.state().log_dir()
    }

    /// `state_dir/identity/node.crt`: the node certificate for the upload.
    pub fn node_cert_path(&self) -> PathBuf {
        self.state().node_cert()
    }

    /// `state_dir/identity/operator-ca.crt`.
    pub fn operator_ca_path(&self) -> PathBuf {
        self.state().operator_ca()
    }

    /// `state_dir/admin.token`: the admin API's bearer credential (0600,
    /// made at the first start). Only the agent's user and root can read
    /// it, so only they can grant packages or start updates.
    pub fn admin_token_path(&self) -> PathBuf {
        self.state().admin_token()
    }

    /// `state_dir/inflight.tally` (see `mec_billing::tally`).
    pub fn tally_path(&self) -> PathBuf {
        self.state().tally()
    }

    /// `state_dir/ledger.sqlite`.
    pub fn ledger_path(&self) -> PathBuf {
        self.state().ledger()
    }
}

/// App and model ids travel in every usage record (and in the in-flight
/// tally's fixed slots): bounded, printable.
const ID_RULE: &str = "1 to 128 bytes, no control characters";

fn id_ok(id: &str) -> bool {
    !id.is_empty() && id.len() <= 128 && !id.chars().any(char::is_control)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[node]
id = "edge-1"
state_dir = "state"
[model]
path = "m.gguf"
id = "m"
"#;

    fn err(text: &str) -> String {
        Config::parse(text, Path::new("x.toml"))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = Config::parse(MINIMAL, Path::new("x.toml")).unwrap();
        assert_eq!(c.api.listen, "127.0.0.1:8080");
        assert_eq!(c.models.len(), 1);
        assert_eq!(c.models[0].slots, 4);
        assert!(c.metering.enabled);
    }

    #[test]
    fn the_example_config_is_valid() {
        let text = include_str!("../edge-agent.example.toml");
        Config::parse(text, Path::new("edge-agent.example.toml")).unwrap();
    }

    const TWO: &str = r#"
[node]
id = "edge-1"
state_dir = "state"
[[models]]
path = "small.gguf"
id = "small"
aliases = ["auto-small"]
[[models]]
path = "big.gguf"
id = "big"
load = "on_demand"
keep_alive_s = 300
device = "gpu:1"
"#;

    #[test]
    fn several_models_parse_with_their_policies() {
        let c = Config::parse(TWO, Path::new("x.toml")).unwrap();
        assert_eq!(c.models.len(), 2);
        assert_eq!(c.models[0].load, LoadWhen::Start);
        assert_eq!(c.models[1].load, LoadWhen::OnDemand);
        let big = c.models[1].spec();
        assert_eq!(big.device, mec_inference::registry::DeviceWish::Gpu(1));
        assert_eq!(big.keep_alive, Some(std::time::Duration::from_secs(300)));
        assert!(!big.load_at_start);
        assert_eq!(c.models[0].spec().aliases, vec!["auto-small".to_string()]);
    }

    #[test]
    fn two_models_sharing_a_name_are_refused_naming_both() {
        let e = err(&TWO.replace("aliases = [\"auto-small\"]", "aliases = [\"big\"]"));
        assert!(
            e.contains("\"big\" names both \"small\" and \"big\""),
            "{e}"
        );
        let e = err(&TWO.replace("id = \"big\"", "id = \"small\""));
        assert!(
            e.contains("models[1].id") && e.contains("names both"),
            "{e}"
        );
        let e = err(&format!(
            "{MINIMAL}\n[[models]]\npath = \"b\"\nid = \"b\"\n"
        ));
        assert!(e.contains("not both"), "{e}");
        let e = err(&TWO.replace("gpu:1", "tpu"));
        assert!(e.contains("models[1].device"), "{e}");
        let e = err("[node]\nid = \"e\"\nstate_dir = \"s\"\n");
        assert!(e.contains("no model"), "{e}");
    }

    #[test]
    fn errors_name_the_key() {
        let e = err(&format!("{MINIMAL}\n[admin]\nlisten = \"0.0.0.0:9\"\n"));
        assert!(e.contains("admin.listen") && e.contains("loopback"), "{e}");
        let e = err(&format!("{MINIMAL}\n[api]\nlisten = \"nowhere\"\n"));
        assert!(e.contains("api.listen"), "{e}");
        let e = err(&format!("{MINIMAL}\n[api]\nlistn = \"1\"\n"));
        assert!(e.contains("listn"), "{e}");
        let e = err(&format!(
            "{MINIMAL}\n[[apps]]\nid = \"a\"\nkey_sha256 = \"zz\"\nimsi_prefixes = [\"\"]\nmodels = [\"*\"]\n"
        ));
        assert!(e.contains("apps[0].key_sha256"), "{e}");
        let e = err(&format!("{MINIMAL}\n[log]\nbackend = \"tape\"\n"));
        assert!(e.contains("log.backend"), "{e}");
        let e = err(&format!(
            "{MINIMAL}\n[limits]\nimsi_requests_per_second = -1\n"
        ));
        assert!(e.contains("limits.imsi_requests_per_second"), "{e}");
        let e = err("[node]\nid = 3\n");
        assert!(e.contains("id"), "{e}");
    }
}
