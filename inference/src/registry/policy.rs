//! Which models are in memory, sans IO: the table of models and their
//! states, the memory each pool (the host, each GPU) has, and the decisions
//! (what a load must evict, which idle models' keep-alive ran out, whether a
//! request may use a model now). Time is an argument (milliseconds on a
//! monotonic clock), so every decision has a deterministic test.
//!
//! The rules, as llama.cpp's router and Ollama keep them:
//! * a model is loaded into one pool; the models loaded or loading in a pool
//!   never add up to more than its cap (each counts its estimate: weights
//!   plus the KV cache its slots can reach);
//! * to make room, the least recently used models are evicted first, and
//!   only those that are idle (no request holds them) and not pinned; when
//!   that is not enough, the load is refused and nothing is evicted;
//! * a model unloaded while requests hold it stops taking new ones
//!   (`Unloading`) and keeps its memory until the last one ends;
//! * a model whose keep-alive is set is unloaded after that long idle.

use std::collections::BTreeMap;

/// Milliseconds on a monotonic clock.
pub type Millis = u64;

/// Where a model is, as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelState {
    /// Not in memory (loads on the first request, or on the admin's word).
    Unloaded,
    /// Being loaded since this time.
    Loading {
        /// When the load began.
        since: Millis,
    },
    /// In memory and serving.
    Ready,
    /// Unloaded while requests held it: takes no new ones, frees its memory
    /// when the last one ends.
    Unloading,
    /// Its last load failed, for this reason (a missing, truncated or
    /// unsupported file); the admin's load tries again.
    Failed {
        /// Why.
        reason: String,
    },
}

impl ModelState {
    /// The state's name in the API (`loaded`, `loading`, ...).
    pub fn name(&self) -> &'static str {
        match self {
            ModelState::Unloaded => "unloaded",
            ModelState::Loading { .. } => "loading",
            ModelState::Ready => "loaded",
            ModelState::Unloading => "unloading",
            ModelState::Failed { .. } => "failed",
        }
    }

    /// Whether it holds memory.
    fn resident(&self) -> bool {
        matches!(
            self,
            ModelState::Loading { .. } | ModelState::Ready | ModelState::Unloading
        )
    }
}

/// One model in the table.
#[derive(Debug, Clone)]
pub struct Slot {
    /// The model's id.
    pub id: String,
    /// The pool it loads into (`host`, `gpu:0`, ...).
    pub pool: String,
    /// Its estimate: weights plus the KV cache its slots can reach.
    pub bytes: u64,
    /// Never evicted, never unloaded for idleness.
    pub pinned: bool,
    /// Unloaded after this long idle; `None`: stays until evicted.
    pub keep_alive: Option<Millis>,
    /// Its state.
    pub state: ModelState,
    /// Requests holding it.
    pub leases: usize,
    /// When it was last used (a request began or ended, or it loaded).
    pub last_used: Millis,
    /// How long its last load took.
    pub last_load: Option<Millis>,
}

/// Why a model cannot serve a request now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotNow {
    /// No model has this id.
    Unknown,
    /// Not loaded: a load may start.
    Unloaded,
    /// Being loaded since this time.
    Loading {
        /// When the load began.
        since: Millis,
    },
    /// Being unloaded.
    Unloading,
    /// Its last load failed.
    Failed {
        /// Why.
        reason: String,
    },
}

/// Why a load was refused (nothing was evicted).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LoadRefused {
    /// No model has this id.
    #[error("no model has the id {0:?}")]
    Unknown(String),
    /// Already loaded.
    #[error("{0} is already loaded")]
    AlreadyLoaded(String),
    /// Already being loaded.
    #[error("{0} is already loading")]
    AlreadyLoading(String),
    /// Being unloaded; it can load again once its requests end.
    #[error("{0} is being unloaded; it can load again once its requests end")]
    Unloading(String),
    /// Larger than its pool, even empty.
    #[error("{id} needs {needed} bytes; {pool} holds at most {cap}")]
    TooLarge {
        /// The model.
        id: String,
        /// Its estimate.
        needed: u64,
        /// The pool.
        pool: String,
        /// The pool's cap.
        cap: u64,
    },
    /// There would be room only by evicting models that are busy or pinned.
    #[error(
        "{id} needs {needed} bytes and {pool} has {free} free; \
         the models that could make room are busy or pinned: {held:?}"
    )]
    NoRoom {
        /// The model.
        id: String,
        /// Its estimate.
        needed: u64,
        /// The pool.
        pool: String,
        /// Free in the pool, after evicting every idle model.
        free: u64,
        /// The models that hold the rest.
        held: Vec<String>,
    },
    /// No thread could be started to load it.
    #[error("{0}")]
    NoThread(String),
    /// The most models that may be loaded at once are, and none is idle.
    #[error("{max} models are loaded, the most allowed, and none is idle: {held:?}")]
    TooMany {
        /// `max_loaded_models`.
        max: usize,
        /// The models loaded.
        held: Vec<String>,
    },
}

/// What a load must do first: unload these (least recently used first).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LoadPlan {
    /// Models to unload before the load.
    pub evict: Vec<String>,
}

/// The table.
#[derive(Debug, Clone, Default)]
pub struct Table {
    slots: Vec<Slot>,
    /// Each pool's cap in bytes; a pool not named has none.
    caps: BTreeMap<String, u64>,
    /// Most models loaded (or loading) at once, all pools together.
    max_loaded: Option<usize>,
}

impl Table {
    /// A table of `slots` (all unloaded), with the pools' caps.
    pub fn new(slots: Vec<Slot>, caps: BTreeMap<String, u64>, max_loaded: Option<usize>) -> Table {
        Table {
            slots,
            caps,
            max_loaded,
        }
    }

    /// Every model, in the configuration's order.
    pub fn slots(&self) -> &[Slot] {
        &self.slots
    }

    /// One model.
    pub fn get(&self, id: &str) -> Option<&Slot> {
        self.slots.iter().find(|s| s.id == id)
    }

    fn get_mut(&mut self, id: &str) -> Option<&mut Slot> {
        self.slots.iter_mut().find(|s| s.id == id)
    }

    /// A pool's cap, if it has one.
    pub fn cap(&self, pool: &str) -> Option<u64> {
        self.caps.get(pool).copied()
    }

    /// Bytes the models loaded, loading or unloading in `pool` hold.
    pub fn used(&self, pool: &str) -> u64 {
        self.slots
            .iter()
            .filter(|s| s.pool == pool && s.state.resident())
            .map(|s| s.bytes)
            .sum()
    }

    /// Sets a model's estimate (known once its file is read).
    pub fn set_bytes(&mut self, id: &str, bytes: u64) {
        if let Some(s) = self.get_mut(id) {
            s.bytes = bytes;
        }
    }

    /// Begins loading `id`: decides what to evict, marks those unloaded
    /// and `id` loading. Refused (and nothing changed) when it is loaded
    /// or loading already, or when the room can only be made by evicting
    /// busy or pinned models.
    pub fn begin_load(&mut self, id: &str, now: Millis) -> Result<LoadPlan, LoadRefused> {
        let me = self
            .get(id)
            .ok_or_else(|| LoadRefused::Unknown(id.to_string()))?
            .clone();
        match me.state {
            ModelState::Ready => return Err(LoadRefused::AlreadyLoaded(me.id)),
            ModelState::Loading { .. } => return Err(LoadRefused::AlreadyLoading(me.id)),
            ModelState::Unloading => return Err(LoadRefused::Unloading(me.id)),
            ModelState::Unloaded | ModelState::Failed { .. } => {}
        }
        // The idle models of the pool, least recently used first.
        let mut idle: Vec<&Slot> = self
            .slots
            .iter()
            .filter(|s| s.state == ModelState::Ready && s.leases == 0 && !s.pinned)
            .collect();
        idle.sort_by_key(|s| (s.last_used, s.id.clone()));
        let mut evict = Vec::new();
        if let Some(cap) = self.cap(&me.pool) {
            if me.bytes > cap {
                return Err(LoadRefused::TooLarge {
                    id: me.id,
                    needed: me.bytes,
                    pool: me.pool,
                    cap,
                });
            }
            let mut used = self.used(&me.pool);
            for s in idle.iter().filter(|s| s.pool == me.pool) {
                if used + me.bytes <= cap {
                    break;
                }
                used -= s.bytes;
                evict.push(s.id.clone());
            }
            if used + me.bytes > cap {
                let held = self
                    .slots
                    .iter()
                    .filter(|s| s.pool == me.pool && s.state.resident() && !evict.contains(&s.id))
                    .map(|s| s.id.clone())
                    .collect();
                return Err(LoadRefused::NoRoom {
                    id: me.id,
                    needed: me.bytes,
                    pool: me.pool,
                    free: cap.saturating_sub(used),
                    held,
                });
            }
        }
        if let Some(max) = self.max_loaded {
            let loaded: Vec<&Slot> = self.slots.iter().filter(|s| s.state.resident()).collect();
            let mut count = loaded.len() - evict.len();
            if count >= max {
                for s in &idle {
                    if count < max {
                        break;
                    }
                    if !evict.contains(&s.id) {
                        evict.push(s.id.clone());
                        count -= 1;
                    }
                }
            }
            if count >= max {
                return Err(LoadRefused::TooMany {
                    max,
                    held: loaded.iter().map(|s| s.id.clone()).collect(),
                });
            }
        }
        for id in &evict {
            if let Some(s) = self.get_mut(id) {
                s.state = ModelState::Unloaded;
            }
        }
        let s = self.get_mut(id).expect("looked up above");
        s.state = ModelState::Loading { since: now };
        Ok(LoadPlan { evict })
    }

    /// A load ended: ready, or failed with its reason.
    pub fn finish_load(&mut self, id: &str, result: Result<(), String>, now: Millis) {
        let Some(s) = self.get_mut(id) else { return };
        let ModelState::Loading { since } = s.state else {
            return;
        };
        s.last_used = now;
        s.state = match result {
            Ok(()) => {
                s.last_load = Some(now.saturating_sub(since));
                ModelState::Ready
            }
            Err(reason) => ModelState::Failed { reason },
        };
    }

    /// Whether a request may use `id` now; when it may, it holds it until
    /// [`Table::release`].
    pub fn lease(&mut self, id: &str, now: Millis) -> Result<(), NotNow> {
        let s = self.get_mut(id).ok_or(NotNow::Unknown)?;
        match &s.state {
            ModelState::Ready => {
                s.leases += 1;
                s.last_used = now;
                Ok(())
            }
            ModelState::Unloaded => Err(NotNow::Unloaded),
            ModelState::Loading { since } => Err(NotNow::Loading { since: *since }),
            ModelState::Unloading => Err(NotNow::Unloading),
            ModelState::Failed { reason } => Err(NotNow::Failed {
                reason: reason.clone(),
            }),
        }
    }

    /// A request let go of `id`. True when that unloaded it (it was
    /// `Unloading` and this was its last request): its memory is free.
    pub fn release(&mut self, id: &str, now: Millis) -> bool {
        let Some(s) = self.get_mut(id) else {
            return false;
        };
        s.leases = s.leases.saturating_sub(1);
        s.last_used = now;
        if s.leases == 0 && s.state == ModelState::Unloading {
            s.state = ModelState::Unloaded;
            return true;
        }
        false
    }

    /// Unloads `id`: at once when idle (true), else it stops taking
    /// requests and unloads when the last ends (false). Refused for a
    /// pinned model (unpin it first) and for one that is not loaded.
    pub fn unload(&mut self, id: &str) -> Result<bool, String> {
        let s = self
            .get_mut(id)
            .ok_or_else(|| format!("no model has the id {id:?}"))?;
        if s.pinned {
            return Err(format!("{id} is pinned: unpin it first"));
        }
        match s.state {
            ModelState::Ready if s.leases == 0 => {
                s.state = ModelState::Unloaded;
                Ok(true)
            }
            ModelState::Ready => {
                s.state = ModelState::Unloading;
                Ok(false)
            }
            ModelState::Unloading => Ok(false),
            ModelState::Loading { .. } => {
                Err(format!("{id} is loading; unload it once it is loaded"))
            }
            ModelState::Unloaded | ModelState::Failed { .. } => Err(format!("{id} is not loaded")),
        }
    }

    /// Pins or unpins `id`.
    pub fn pin(&mut self, id: &str, pinned: bool) -> Result<(), String> {
        let s = self
            .get_mut(id)
            .ok_or_else(|| format!("no model has the id {id:?}"))?;
        s.pinned = pinned;
        Ok(())
    }

    /// The idle models whose keep-alive ran out at `now`: marked unloaded;
    /// the caller drops their engines.
    pub fn expire(&mut self, now: Millis) -> Vec<String> {
        let mut out = Vec::new();
        for s in &mut self.slots {
            if let (ModelState::Ready, 0, false, Some(keep)) =
                (&s.state, s.leases, s.pinned, s.keep_alive)
            {
                if now.saturating_sub(s.last_used) >= keep {
                    s.state = ModelState::Unloaded;
                    out.push(s.id.clone());
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: u64 = 1 << 20;

    fn slot(id: &str, pool: &str, bytes: u64) -> Slot {
        Slot {
            id: id.into(),
            pool: pool.into(),
            bytes,
            pinned: false,
            keep_alive: None,
            state: ModelState::Unloaded,
            leases: 0,
            last_used: 0,
            last_load: None,
        }
    }

    fn table(cap: u64, models: &[(&str, u64)]) -> Table {
        Table::new(
            models.iter().map(|(id, b)| slot(id, "host", *b)).collect(),
            [("host".to_string(), cap)].into(),
            None,
        )
    }

    fn load(t: &mut Table, id: &str, now: Millis) -> LoadPlan {
        let plan = t.begin_load(id, now).unwrap();
        t.finish_load(id, Ok(()), now + 10);
        plan
    }

    #[test]
    fn loads_within_the_cap_evict_nothing() {
        let mut t = table(300 * MB, &[("a", 100 * MB), ("b", 150 * MB)]);
        assert_eq!(load(&mut t, "a", 0).evict, Vec::<String>::new());
        assert_eq!(load(&mut t, "b", 100).evict, Vec::<String>::new());
        assert_eq!(t.used("host"), 250 * MB);
        assert_eq!(t.get("a").unwrap().last_load, Some(10));
    }

    #[test]
    fn the_least_recently_used_idle_model_is_evicted_first() {
        let mut t = table(
            300 * MB,
            &[
                ("a", 100 * MB),
                ("b", 100 * MB),
                ("c", 100 * MB),
                ("d", 100 * MB),
            ],
        );
        load(&mut t, "a", 0);
        load(&mut t, "b", 100);
        load(&mut t, "c", 200);
        // a is used again: b is now the oldest.
        t.lease("a", 300).unwrap();
        t.release("a", 310);
        assert_eq!(load(&mut t, "d", 400).evict, vec!["b".to_string()]);
        assert_eq!(t.get("b").unwrap().state, ModelState::Unloaded);
        assert_eq!(t.used("host"), 300 * MB);
    }

    #[test]
    fn busy_and_pinned_models_are_never_evicted() {
        let mut t = table(
            200 * MB,
            &[("a", 100 * MB), ("b", 100 * MB), ("c", 100 * MB)],
        );
        load(&mut t, "a", 0);
        load(&mut t, "b", 10);
        t.lease("a", 20).unwrap();
        t.pin("b", true).unwrap();
        let e = t.begin_load("c", 30).unwrap_err();
        assert_eq!(
            e,
            LoadRefused::NoRoom {
                id: "c".into(),
                needed: 100 * MB,
                pool: "host".into(),
                free: 0,
                held: vec!["a".into(), "b".into()],
            }
        );
        // Refused: nothing changed.
        assert_eq!(t.get("a").unwrap().state, ModelState::Ready);
        assert_eq!(t.get("c").unwrap().state, ModelState::Unloaded);
        // Once a's request ends, a goes.
        t.release("a", 40);
        assert_eq!(t.begin_load("c", 50).unwrap().evict, vec!["a".to_string()]);
    }

    #[test]
    fn a_model_larger_than_its_pool_is_refused() {
        let mut t = table(100 * MB, &[("big", 200 * MB)]);
        assert!(matches!(
            t.begin_load("big", 0),
            Err(LoadRefused::TooLarge { .. })
        ));
    }

    #[test]
    fn pools_are_separate() {
        let mut t = Table::new(
            vec![slot("g", "gpu:0", 100 * MB), slot("h", "host", 100 * MB)],
            [
                ("gpu:0".to_string(), 100 * MB),
                ("host".to_string(), 100 * MB),
            ]
            .into(),
            None,
        );
        load(&mut t, "g", 0);
        assert_eq!(load(&mut t, "h", 10).evict, Vec::<String>::new());
    }

    #[test]
    fn max_loaded_models_counts_every_pool() {
        let mut t = Table::new(
            vec![
                slot("a", "host", 1),
                slot("b", "host", 1),
                slot("c", "gpu:0", 1),
            ],
            BTreeMap::new(),
            Some(2),
        );
        load(&mut t, "a", 0);
        load(&mut t, "b", 10);
        assert_eq!(load(&mut t, "c", 20).evict, vec!["a".to_string()]);
        t.lease("b", 30).unwrap();
        t.lease("c", 30).unwrap();
        assert!(matches!(
            t.begin_load("a", 40),
            Err(LoadRefused::TooMany { max: 2, .. })
        ));
    }

    #[test]
    fn requests_see_each_state() {
        let mut t = table(300 * MB, &[("a", 100 * MB)]);
        assert_eq!(t.lease("nope", 0), Err(NotNow::Unknown));
        assert_eq!(t.lease("a", 0), Err(NotNow::Unloaded));
        t.begin_load("a", 5).unwrap();
        assert_eq!(t.lease("a", 6), Err(NotNow::Loading { since: 5 }));
        assert_eq!(
            t.begin_load("a", 6),
            Err(LoadRefused::AlreadyLoading("a".into()))
        );
        t.finish_load("a", Err("truncated".into()), 7);
        assert_eq!(
            t.lease("a", 8),
            Err(NotNow::Failed {
                reason: "truncated".into()
            })
        );
        // A failed model holds no memory, and may be loaded again.
        assert_eq!(t.used("host"), 0);
        load(&mut t, "a", 9);
        assert_eq!(t.lease("a", 20), Ok(()));
    }

    #[test]
    fn unloading_a_busy_model_waits_for_its_last_request() {
        let mut t = table(300 * MB, &[("a", 100 * MB)]);
        load(&mut t, "a", 0);
        t.lease("a", 10).unwrap();
        t.lease("a", 11).unwrap();
        assert_eq!(t.unload("a"), Ok(false));
        assert_eq!(t.lease("a", 12), Err(NotNow::Unloading));
        assert_eq!(t.used("host"), 100 * MB);
        assert!(!t.release("a", 13));
        assert!(t.release("a", 14));
        assert_eq!(t.get("a").unwrap().state, ModelState::Unloaded);
        assert_eq!(t.used("host"), 0);
    }

    #[test]
    fn pinned_models_are_not_unloaded() {
        let mut t = table(300 * MB, &[("a", 100 * MB)]);
        load(&mut t, "a", 0);
        t.pin("a", true).unwrap();
        assert!(t.unload("a").unwrap_err().contains("pinned"));
        t.pin("a", false).unwrap();
        assert_eq!(t.unload("a"), Ok(true));
        assert!(t.unload("a").unwrap_err().contains("not loaded"));
    }

    #[test]
    fn keep_alive_unloads_idle_unpinned_models() {
        let mut t = table(300 * MB, &[("a", MB), ("b", MB), ("c", MB)]);
        for (i, id) in ["a", "b", "c"].iter().enumerate() {
            t.slots[i].keep_alive = Some(1000);
            load(&mut t, id, 0);
        }
        t.pin("b", true).unwrap();
        t.lease("c", 500).unwrap();
        assert_eq!(t.expire(999), Vec::<String>::new());
        assert_eq!(t.expire(1010), vec!["a".to_string()]);
        t.release("c", 1020);
        assert_eq!(t.expire(2000), Vec::<String>::new());
        assert_eq!(t.expire(2020), vec!["c".to_string()]);
        assert_eq!(t.get("b").unwrap().state, ModelState::Ready);
    }
}
