//! Several models on one box: which are loaded, loading on demand, eviction
//! under a memory cap, pins and keep-alive. One [`Engine`] per loaded model,
//! each with its own scheduler thread.
//!
//! The decisions are [`policy::Table`]'s (sans IO); this is its shell: it
//! reads each model's file for its estimate, loads on a thread of its own
//! (a request for a model that is not loaded starts the load and is told to
//! come back, never held), drops the engines the table evicts, and hands
//! out [`Lease`]s (an engine held by a request; the model is not evicted
//! while one lives).

pub mod policy;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::engine::{Engine, EngineConfig};
use crate::gpu::{self, DeviceChoice, Discovery};
use crate::model::{KvBudget, ModelConfig};
use policy::{LoadRefused, Millis, ModelState, NotNow, Slot, Table};

/// Where a model may run, as the configuration says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceWish {
    /// The GPU with the most free memory that fits it, else the CPU.
    #[default]
    Auto,
    /// The CPU.
    Cpu,
    /// This GPU (NVML index); the CPU when it is not there.
    Gpu(u32),
}

/// One model as the configuration gives it.
#[derive(Debug, Clone)]
pub struct ModelSpec {
    /// The id clients name.
    pub id: String,
    /// Other names that reach it.
    pub aliases: Vec<String>,
    /// The GGUF file.
    pub path: PathBuf,
    /// Its engine's slots, queue and prefix cache.
    pub engine: EngineConfig,
    /// Where it runs.
    pub device: DeviceWish,
    /// Never evicted nor unloaded for idleness.
    pub pinned: bool,
    /// Unloaded after this long idle; `None`: stays until evicted.
    pub keep_alive: Option<Duration>,
    /// Loaded when the agent starts (else on the first request).
    pub load_at_start: bool,
}

/// The registry's limits.
#[derive(Debug, Clone, Default)]
pub struct RegistryLimits {
    /// Most bytes of models on the host; `None`: 80% of its memory
    /// (`MemTotal`), unlimited when that cannot be read.
    pub host_bytes: Option<u64>,
    /// Most models loaded at once, all devices together.
    pub max_loaded: Option<usize>,
}

/// The configuration cannot be served as written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    /// Two models share a name (an id or an alias).
    #[error("models {first:?} and {second:?} both answer to {name:?}")]
    Duplicate {
        /// The name.
        name: String,
        /// The first model that has it.
        first: String,
        /// The second.
        second: String,
    },
    /// No model at all.
    #[error("no model is configured")]
    Empty,
}

/// Why a request cannot have its model now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unavailable {
    /// No model has this id or alias.
    Unknown,
    /// Being loaded (this request may have started it): come back after
    /// `retry_after`.
    Loading {
        /// The model's id.
        id: String,
        /// A guess at when it will be ready.
        retry_after: Duration,
    },
    /// Being unloaded.
    Unloading {
        /// The model's id.
        id: String,
    },
    /// Its load failed, or cannot start (no room while other models are
    /// busy or pinned).
    Failed {
        /// The model's id.
        id: String,
        /// Why.
        reason: String,
        /// Whether trying again later may work (room may free up), or the
        /// model is broken until an operator acts.
        transient: bool,
    },
}

/// What a loaded model offers.
struct Loaded {
    engine: Arc<Engine>,
    device: DeviceChoice,
}

struct Inner {
    specs: Vec<Arc<ModelSpec>>,
    /// Each id and alias, to its spec's index.
    names: HashMap<String, usize>,
    /// Per model (by index): the device it loads onto, its context length
    /// (once its file was read).
    choices: Vec<DeviceChoice>,
    contexts: Mutex<Vec<Option<usize>>>,
    found: Discovery,
    table: Mutex<Table>,
    /// The engines of the models loaded (and unloading).
    engines: Mutex<HashMap<String, Loaded>>,
    /// Signalled when a load ends.
    load_ended: Condvar,
    origin: Instant,
}

/// The models of one box. Cheap to clone (a handle).
#[derive(Clone)]
pub struct Registry {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("models", &self.inner.specs.len())
            .finish_non_exhaustive()
    }
}

/// A request's hold on a loaded model: its engine, and the promise that the
/// model stays loaded until the lease drops.
pub struct Lease {
    /// Always there until the lease drops (taken then, to be retired with
    /// the map's reference when this was the model's last request).
    engine: Option<Arc<Engine>>,
    spec: Arc<ModelSpec>,
    device: DeviceChoice,
    registry: Registry,
}

impl Lease {
    /// The model's engine.
    pub fn engine(&self) -> &Engine {
        self.engine
            .as_deref()
            .expect("a lease holds its engine until it drops")
    }

    /// The model's configuration (its id is the one the request names in
    /// its record and its answer).
    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    /// Where it runs.
    pub fn device(&self) -> &DeviceChoice {
        &self.device
    }
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("model", &self.spec.id)
            .finish()
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let inner = &self.registry.inner;
        let now = self.registry.now();
        let mut table = inner.table.lock().unwrap();
        // An unloading model's last request: its engine leaves the map
        // under the table's lock (a load that starts after this sees it
        // gone), and stops off this thread.
        let mine = self.engine.take();
        if table.release(&self.spec.id, now) {
            let engine = inner.engines.lock().unwrap().remove(&self.spec.id);
            drop(table);
            // Both references go to the retiring thread: whichever is the
            // last, the engine stops there.
            retire((engine, mine));
            tracing::info!(model = %self.spec.id, "unloaded (its last request ended)");
        }
    }
}

/// Stops engines on a thread of their own: dropping one joins its
/// scheduler thread and frees its weights and KV cache, which no lock
/// holder or async worker should wait for. The lease that held the last
/// reference may still hold one; it ends when that lease drops.
fn retire<T: Send + 'static>(engines: T) {
    let spawned = std::thread::Builder::new()
        .name("engine-retire".into())
        .spawn(move || drop(engines));
    if let Err(e) = spawned {
        // No thread to spare: the engines are dropped with the closure
        // the failed spawn returned, here.
        tracing::warn!(error = %e, "stopping engines on the caller's thread");
    }
}

/// One model as `/v1/models` and the admin API show it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModelView {
    /// Id.
    pub id: String,
    /// Aliases.
    pub aliases: Vec<String>,
    /// `loaded`, `loading`, `unloaded`, `unloading` or `failed`.
    pub state: &'static str,
    /// Why it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Pinned.
    pub pinned: bool,
    /// Where it loads (`host`, `gpu:0`).
    pub pool: String,
    /// Where it runs, once loaded (after any fall-back to the CPU), and why.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device: Option<DeviceChoice>,
    /// Its memory estimate (weights plus the KV cache its slots can reach).
    pub memory_bytes: u64,
    /// Its context length, once its file was read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub context_length: Option<usize>,
    /// Requests holding it.
    pub requests: usize,
    /// How long its last load took, milliseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_load_ms: Option<u64>,
    /// Seconds since it was last used (while loaded).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idle_s: Option<u64>,
}

/// A model's memory estimate: its file (the weights stay as GGUF stores
/// them) plus the KV cache its slots and prefix cache can reach, at the
/// model's context length; and that context length.
pub fn estimate(spec: &ModelSpec) -> Result<(u64, ModelConfig), crate::gguf::ModelError> {
    let file = crate::gguf::GgufFile::open(&spec.path)?;
    let config = ModelConfig::from_gguf(&file)?;
    let weights = std::fs::metadata(&spec.path).map(|m| m.len()).unwrap_or(0);
    let kv = KvBudget {
        sequences: spec.engine.slots.max(1),
        extra_positions: spec.engine.prefix_cache_tokens,
        max_bytes: None,
    };
    let positions = kv.positions(&config) as u64;
    Ok((
        weights + positions * KvBudget::bytes_per_position(&config),
        config,
    ))
}

/// The host's memory (`MemTotal`), when it can be read.
fn host_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn pool_of(choice: &DeviceChoice) -> String {
    match choice {
        DeviceChoice::Cpu { .. } => "host".into(),
        DeviceChoice::Cuda { index } => format!("gpu:{index}"),
    }
}

impl Registry {
    /// The registry of `specs` (none loaded yet: see [`Registry::load_at_start`]).
    /// Each model's file is read for its estimate now; one that cannot be
    /// read is marked failed with the reason, and the others serve. Two
    /// models answering to one name are refused.
    pub fn new(
        specs: Vec<ModelSpec>,
        found: Discovery,
        limits: RegistryLimits,
    ) -> Result<Registry, RegistryError> {
        if specs.is_empty() {
            return Err(RegistryError::Empty);
        }
        let mut names: HashMap<String, usize> = HashMap::new();
        for (i, s) in specs.iter().enumerate() {
            for name in std::iter::once(&s.id).chain(&s.aliases) {
                if let Some(&j) = names.get(name) {
                    return Err(RegistryError::Duplicate {
                        name: name.clone(),
                        first: specs[j].id.clone(),
                        second: s.id.clone(),
                    });
                }
                names.insert(name.clone(), i);
            }
        }
        let mut slots = Vec::new();
        let mut choices = Vec::new();
        let mut contexts = Vec::new();
        for s in &specs {
            let estimated = estimate(s);
            let bytes = estimated.as_ref().map(|(b, _)| *b).unwrap_or(0);
            let choice = match s.device {
                DeviceWish::Cpu => DeviceChoice::Cpu {
                    reason: "the configuration asks for the CPU".into(),
                },
                DeviceWish::Gpu(index) => {
                    gpu::choose_device(&found.clone().only(index), gpu::CUDA_BUILD, bytes)
                }
                DeviceWish::Auto => gpu::choose_device(&found, gpu::CUDA_BUILD, bytes),
            };
            let state = match &estimated {
                Ok(_) => ModelState::Unloaded,
                Err(e) => {
                    tracing::error!(model = %s.id, error = %e, "model unusable");
                    ModelState::Failed {
                        reason: e.to_string(),
                    }
                }
            };
            contexts.push(estimated.ok().map(|(_, c)| c.context_length));
            slots.push(Slot {
                id: s.id.clone(),
                pool: pool_of(&choice),
                bytes,
                pinned: s.pinned,
                keep_alive: s.keep_alive.map(|d| d.as_millis() as Millis),
                state,
                leases: 0,
                last_used: 0,
                last_load: None,
            });
            choices.push(choice);
        }
        let mut caps = BTreeMap::new();
        if let Some(host) = limits
            .host_bytes
            .or_else(|| host_memory().map(|m| m / 10 * 8))
        {
            caps.insert("host".to_string(), host);
        }
        for g in &found.gpus {
            caps.insert(format!("gpu:{}", g.index), g.memory_total_bytes / 10 * 9);
        }
        Ok(Registry {
            inner: Arc::new(Inner {
                specs: specs.into_iter().map(Arc::new).collect(),
                names,
                choices,
                contexts: Mutex::new(contexts),
                found,
                table: Mutex::new(Table::new(slots, caps, limits.max_loaded)),
                engines: Mutex::default(),
                load_ended: Condvar::new(),
                origin: Instant::now(),
            }),
        })
    }

    fn now(&self) -> Millis {
        self.inner.origin.elapsed().as_millis() as Millis
    }

    /// The model a name (id or alias) reaches.
    pub fn resolve(&self, name: &str) -> Option<&ModelSpec> {
        self.inner
            .names
            .get(name)
            .map(|&i| self.inner.specs[i].as_ref())
    }

    /// Loads the models marked to load at start, one after the other,
    /// waiting for each; a model that fails is marked failed (the others
    /// load all the same). Returns the failures.
    pub fn load_at_start(&self) -> Vec<(String, String)> {
        let mut failed = Vec::new();
        for s in &self.inner.specs {
            if !s.load_at_start {
                continue;
            }
            if let Err(e) = self.load_and_wait(&s.id) {
                failed.push((s.id.clone(), e));
            }
        }
        failed
    }

    /// The engine for a request naming `name`, held until the lease drops.
    /// A model that is not loaded starts loading (evicting what its pool
    /// needs) and the request is told to come back.
    pub fn lease(&self, name: &str) -> Result<Lease, Unavailable> {
        self.lease_with(name, true)
    }

    /// [`Registry::lease`] of a model only if it is loaded now: one that is
    /// not is `Loading`/`Unavailable` as usual, but no load starts (a route
    /// tries its loaded candidates first, so that loading one never evicts
    /// another that could have served).
    pub fn lease_if_loaded(&self, name: &str) -> Result<Lease, Unavailable> {
        self.lease_with(name, false)
    }

    fn lease_with(&self, name: &str, may_load: bool) -> Result<Lease, Unavailable> {
        let &i = self.inner.names.get(name).ok_or(Unavailable::Unknown)?;
        let spec = self.inner.specs[i].clone();
        let now = self.now();
        let mut table = self.inner.table.lock().unwrap();
        match table.lease(&spec.id, now) {
            Ok(()) => {
                let engines = self.inner.engines.lock().unwrap();
                match engines.get(&spec.id) {
                    Some(loaded) => Ok(Lease {
                        engine: Some(loaded.engine.clone()),
                        device: loaded.device.clone(),
                        spec,
                        registry: self.clone(),
                    }),
                    None => {
                        // Never so: a ready model's engine is in the map
                        // (both change under the table's lock). Refused, not
                        // a panic under two locks.
                        table.release(&spec.id, now);
                        tracing::error!(model = %spec.id, "a ready model without its engine");
                        Err(Unavailable::Failed {
                            id: spec.id.clone(),
                            reason: "its engine is missing (a bug); load it again".into(),
                            transient: true,
                        })
                    }
                }
            }
            Err(NotNow::Unknown) => Err(Unavailable::Unknown),
            Err(NotNow::Loading { since }) => Err(Unavailable::Loading {
                retry_after: retry_after(table.get(&spec.id), now.saturating_sub(since)),
                id: spec.id.clone(),
            }),
            Err(NotNow::Unloading) => Err(Unavailable::Unloading {
                id: spec.id.clone(),
            }),
            Err(NotNow::Failed { reason }) => Err(Unavailable::Failed {
                id: spec.id.clone(),
                reason,
                transient: false,
            }),
            Err(NotNow::Unloaded) if !may_load => Err(Unavailable::Loading {
                retry_after: retry_after(table.get(&spec.id), 0),
                id: spec.id.clone(),
            }),
            Err(NotNow::Unloaded) => match self.begin_load(&mut table, i, now) {
                Ok(()) => Err(Unavailable::Loading {
                    retry_after: retry_after(table.get(&spec.id), 0),
                    id: spec.id.clone(),
                }),
                Err(e) => Err(Unavailable::Failed {
                    id: spec.id.clone(),
                    transient: matches!(
                        e,
                        LoadRefused::NoRoom { .. }
                            | LoadRefused::TooMany { .. }
                            | LoadRefused::NoThread(_)
                    ),
                    reason: e.to_string(),
                }),
            },
        }
    }

    /// Starts loading `id` (the admin's load, or a failed model tried
    /// again); returns at once.
    pub fn load(&self, id: &str) -> Result<(), LoadRefused> {
        let &i = self
            .inner
            .names
            .get(id)
            .ok_or_else(|| LoadRefused::Unknown(id.to_string()))?;
        let spec = self.inner.specs[i].clone();
        // A failed model's file may have been fixed: read it again, before
        // the table's lock (a file read is no work to do under it).
        let failed = matches!(
            self.inner
                .table
                .lock()
                .unwrap()
                .get(&spec.id)
                .map(|s| &s.state),
            Some(ModelState::Failed { .. })
        );
        let estimated = failed.then(|| estimate(&spec)).and_then(Result::ok);
        let now = self.now();
        let mut table = self.inner.table.lock().unwrap();
        if let Some((bytes, config)) = estimated {
            if matches!(
                table.get(&spec.id).map(|s| &s.state),
                Some(ModelState::Failed { .. })
            ) {
                table.set_bytes(&spec.id, bytes);
                self.inner.contexts.lock().unwrap()[i] = Some(config.context_length);
            }
        }
        self.begin_load(&mut table, i, now)
    }

    /// Loads `id` and waits for the load to end: its failure reason, or
    /// `Ok` once it is loaded (also when it already was). Blocking.
    pub fn load_and_wait(&self, id: &str) -> Result<(), String> {
        let id = self
            .resolve(id)
            .ok_or_else(|| format!("no model has the id {id:?}"))?
            .id
            .clone();
        match self.load(&id) {
            Ok(()) | Err(LoadRefused::AlreadyLoading(_)) | Err(LoadRefused::AlreadyLoaded(_)) => {}
            Err(e) => return Err(e.to_string()),
        }
        let mut table = self.inner.table.lock().unwrap();
        loop {
            match &table.get(&id).expect("resolved").state {
                ModelState::Loading { .. } => {}
                ModelState::Ready => return Ok(()),
                ModelState::Failed { reason } => return Err(reason.clone()),
                other => return Err(format!("{id} is {}", other.name())),
            }
            table = self.inner.load_ended.wait(table).unwrap();
        }
    }

    /// The table's decision, then the evicted engines retired and the load
    /// started on a thread of its own. The table is locked by the caller.
    fn begin_load(&self, table: &mut Table, i: usize, now: Millis) -> Result<(), LoadRefused> {
        let spec = self.inner.specs[i].clone();
        let plan = table.begin_load(&spec.id, now)?;
        // Out of the map while the table is locked: a load of the same
        // model that starts later finds the map without them.
        let evicted: Vec<Loaded> = {
            let mut engines = self.inner.engines.lock().unwrap();
            plan.evict
                .iter()
                .filter_map(|id| engines.remove(id))
                .collect()
        };
        for id in &plan.evict {
            tracing::info!(model = %id, to_load = %spec.id, "evicted (least recently used)");
        }
        if !evicted.is_empty() {
            retire(evicted);
        }
        let this = self.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("load-{}", spec.id))
            .spawn(move || this.run_load(i));
        if let Err(e) = spawned {
            let reason = format!("cannot start a thread to load it: {e}");
            table.finish_load(&spec.id, Err(reason.clone()), now);
            self.inner.load_ended.notify_all();
            return Err(LoadRefused::NoThread(reason));
        }
        Ok(())
    }

    /// Loads model `i` (on the load thread) and records how it ended,
    /// whatever happens: a load that panics is a failed load, never a
    /// model left `loading`.
    fn run_load(&self, i: usize) {
        let spec = &self.inner.specs[i];
        let started = Instant::now();
        tracing::info!(model = %spec.id, path = %spec.path.display(), "loading");
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.load_engine(i)))
            .unwrap_or_else(|panic| {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "a panic".into());
                Err(format!("the load failed: {what}"))
            });
        let inner = &self.inner;
        let mut table = inner.table.lock().unwrap();
        let now = self.now();
        let mut stale = None;
        match result {
            Ok(loaded) => {
                stale = inner
                    .engines
                    .lock()
                    .unwrap()
                    .insert(spec.id.clone(), loaded);
                table.finish_load(&spec.id, Ok(()), now);
                tracing::info!(model = %spec.id, ms = started.elapsed().as_millis() as u64, "loaded");
            }
            Err(reason) => {
                tracing::error!(model = %spec.id, %reason, "load failed");
                table.finish_load(&spec.id, Err(reason), now);
            }
        }
        drop(table);
        inner.load_ended.notify_all();
        if stale.is_some() {
            retire(stale);
        }
    }

    fn load_engine(&self, i: usize) -> Result<Loaded, String> {
        let spec = &self.inner.specs[i];
        let choice = &self.inner.choices[i];
        let weights = std::fs::metadata(&spec.path)
            .map_err(|e| format!("{}: {e}", spec.path.display()))?
            .len();
        let budget = gpu::kv_budget(
            &self.inner.found,
            choice,
            weights,
            spec.engine.slots,
            spec.engine.prefix_cache_tokens,
        );
        let (model, tokenizer, device) =
            crate::load_on(&spec.path, choice, &budget).map_err(|e| e.to_string())?;
        let engine = Engine::start(Arc::new(model), Arc::new(tokenizer), spec.engine.clone());
        // The token trie for structured output, built before the first
        // request that needs it.
        if let Err(e) = engine.grammars().warm() {
            tracing::warn!(model = %spec.id, error = %e, "structured output is unavailable for this model");
        }
        Ok(Loaded {
            engine: Arc::new(engine),
            device,
        })
    }

    /// Unloads `id`: at once when no request holds it (true), else when
    /// the last one ends (false). A pinned model is refused.
    pub fn unload(&self, id: &str) -> Result<bool, String> {
        let id = self
            .resolve(id)
            .ok_or_else(|| format!("no model has the id {id:?}"))?
            .id
            .clone();
        let mut table = self.inner.table.lock().unwrap();
        let now_free = table.unload(&id)?;
        if now_free {
            let engine = self.inner.engines.lock().unwrap().remove(&id);
            drop(table);
            retire(engine);
            tracing::info!(model = %id, "unloaded");
        }
        Ok(now_free)
    }

    /// Pins or unpins `id`.
    pub fn pin(&self, id: &str, pinned: bool) -> Result<(), String> {
        let id = self
            .resolve(id)
            .ok_or_else(|| format!("no model has the id {id:?}"))?
            .id
            .clone();
        self.inner.table.lock().unwrap().pin(&id, pinned)
    }

    /// Unloads the idle models whose keep-alive ran out (the agent calls
    /// this every second). Returns their ids.
    pub fn expire_idle(&self) -> Vec<String> {
        let now = self.now();
        let mut table = self.inner.table.lock().unwrap();
        let expired = table.expire(now);
        let engines: Vec<Loaded> = {
            let mut engines = self.inner.engines.lock().unwrap();
            expired.iter().filter_map(|id| engines.remove(id)).collect()
        };
        drop(table);
        if !engines.is_empty() {
            retire(engines);
        }
        for id in &expired {
            tracing::info!(model = %id, "unloaded (keep-alive ran out)");
        }
        expired
    }

    /// The engines loaded now, by id (for metrics).
    pub fn engines(&self) -> Vec<(String, Arc<Engine>)> {
        let engines = self.inner.engines.lock().unwrap();
        self.inner
            .specs
            .iter()
            .filter_map(|s| engines.get(&s.id).map(|l| (s.id.clone(), l.engine.clone())))
            .collect()
    }

    /// Every model's state.
    pub fn views(&self) -> Vec<ModelView> {
        let now = self.now();
        let table = self.inner.table.lock().unwrap();
        let engines = self.inner.engines.lock().unwrap();
        let contexts = self.inner.contexts.lock().unwrap();
        self.inner
            .specs
            .iter()
            .zip(table.slots())
            .zip(contexts.iter())
            .map(|((spec, slot), context)| ModelView {
                id: spec.id.clone(),
                aliases: spec.aliases.clone(),
                state: slot.state.name(),
                reason: match &slot.state {
                    ModelState::Failed { reason } => Some(reason.clone()),
                    _ => None,
                },
                pinned: slot.pinned,
                pool: slot.pool.clone(),
                device: engines.get(&spec.id).map(|l| l.device.clone()),
                memory_bytes: slot.bytes,
                context_length: *context,
                requests: slot.leases,
                last_load_ms: slot.last_load,
                idle_s: (slot.state == ModelState::Ready && slot.leases == 0)
                    .then(|| now.saturating_sub(slot.last_used) / 1000),
            })
            .collect()
    }
}

/// When a loading model should be ready: its last load's time (else two
/// seconds) less what has passed, at least a second.
fn retry_after(slot: Option<&Slot>, elapsed: Millis) -> Duration {
    let expected = slot.and_then(|s| s.last_load).unwrap_or(2000);
    // Retry-After counts whole seconds: rounded up.
    Duration::from_secs(expected.saturating_sub(elapsed).max(1000).div_ceil(1000))
}
