//! `core-ingest bench-grants`: simulated boxes against a running core, to
//! measure the grants (issue 23). Each box is what a real box is on the
//! wire: its own key and node certificate (issued by the core's CA), a QUIC
//! connection with mutual TLS, the downlink ([`crate::downlink`]), and a
//! SQLite ledger store that applies every message durably before it is
//! acknowledged (`mec_metering::store`). Packages are sold in the core's
//! store first, one per subscriber.
//!
//! Three figures:
//! * the round trip of a grant: one box asks for a subscriber it holds
//!   nothing for, until the grant is applied at the box (p50, p99);
//! * grants per second with `boxes` boxes asking at once (each asks for its
//!   own subscribers one after another);
//! * how long a revocation takes to stop admission at a connected box:
//!   from the revocation's commit at the core to the box having applied it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mec_metering::charging::PackageSpec;
use mec_metering::grants::{GrantCache, Received};
use mec_metering::store::Store;
use mec_metering::{BucketKind, Imsi};
use serde_json::{json, Value};

use crate::core_ingest::CoreConfig;
use crate::downlink::{DownlinkSink, GrantAnswer, GrantAsker};
use crate::identity::NodeIdentity;
use crate::wire::pb;

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// The core's UDP address.
    pub core: SocketAddr,
    /// Boxes asking at once.
    pub boxes: usize,
    /// Grants each box asks for in the throughput run.
    pub grants_per_box: usize,
    /// Round trips measured (one box, one after another).
    pub round_trips: usize,
    /// Revocations measured.
    pub revocations: usize,
    /// Where the simulated boxes keep their keys and ledger stores (a new,
    /// empty directory).
    pub dir: std::path::PathBuf,
}

/// A box's ledger store as the downlink's sink, noting when each
/// revocation was applied.
struct BoxSink {
    started: Instant,
    store: Mutex<(Store, GrantCache)>,
    revoked: Mutex<HashMap<u64, Instant>>,
}

impl DownlinkSink for BoxSink {
    fn applied(&self) -> u64 {
        self.store.lock().unwrap().1.applied()
    }

    fn apply(&self, m: &pb::Downlink) -> Result<(), String> {
        let received = crate::downlink::received(m);
        // The simulated box's monotonic clock: seconds since the run began
        // (its deadlines are not judged here).
        let now = mec_metering::grants::Now {
            wall: chrono::Utc::now().timestamp(),
            mono: self.started.elapsed().as_secs() as i64,
        };
        let mut guard = self.store.lock().unwrap();
        let (store, cache) = &mut *guard;
        let Some(change) = cache.plan(m.seq, received.clone(), now) else {
            return Ok(());
        };
        let held = store
            .apply_downlink(m.seq, &change, now.wall, "bench")
            .map_err(|e| e.to_string())?;
        if let Received::Revoked { grant_id } = received {
            cache.revoke(grant_id);
            self.revoked
                .lock()
                .unwrap()
                .insert(grant_id, Instant::now());
        }
        cache.applied_message(m.seq, held);
        Ok(())
    }
}

/// One simulated box, connected.
struct SimBox {
    asker: GrantAsker,
    sink: Arc<BoxSink>,
    _endpoint: quinn::Endpoint,
    task: tokio::task::JoinHandle<()>,
}

async fn connect_box(
    config: &CoreConfig,
    core: SocketAddr,
    node_id: &str,
    dir: &std::path::Path,
) -> anyhow::Result<SimBox> {
    let identity = NodeIdentity::generate()?;
    identity.write_to(&dir.join("identity"))?;
    let key_pem = std::fs::read_to_string(dir.join("identity/node.key"))?;
    let cert_pem = crate::core_ingest::issue(config, node_id, &identity.public_key_pem())?;
    let ca_pem = std::fs::read_to_string(&config.ca_cert)?;
    let endpoint = crate::quic::client_endpoint(
        "127.0.0.1:0".parse()?,
        &cert_pem,
        &key_pem,
        &ca_pem,
        &Default::default(),
    )?;
    let conn = endpoint.connect(core, "localhost")?.await?;
    let store = Store::open(&dir.join("ledger.sqlite"))?;
    let sink = Arc::new(BoxSink {
        started: Instant::now(),
        store: Mutex::new((store, GrantCache::default())),
        revoked: Mutex::default(),
    });
    let asker = GrantAsker::new();
    let task = {
        let (sink, asker) = (sink.clone() as Arc<dyn DownlinkSink>, asker.clone());
        tokio::spawn(async move {
            if let Err(e) = crate::downlink::run(conn, sink, asker).await {
                tracing::warn!(error = %e, "a simulated box's downlink ended");
            }
        })
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !asker.connected() {
        anyhow::ensure!(Instant::now() < deadline, "{node_id}: no downlink in 30 s");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(SimBox {
        asker,
        sink,
        _endpoint: endpoint,
        task,
    })
}

async fn grant(b: &SimBox, imsi: &str) -> anyhow::Result<u64> {
    match b.asker.ask(imsi, "", 0, Duration::from_secs(60)).await? {
        GrantAnswer::Granted(id) => Ok(id),
        GrantAnswer::Refused { code, message } => {
            anyhow::bail!("{imsi}: refused {code}: {message}")
        }
    }
}

fn percentiles(mut ms: Vec<f64>) -> Value {
    ms.sort_by(|a, b| a.total_cmp(b));
    let at = |p: f64| {
        if ms.is_empty() {
            return 0.0;
        }
        let i = ((p / 100.0) * (ms.len() - 1) as f64).round() as usize;
        ms[i.min(ms.len() - 1)]
    };
    json!({ "n": ms.len(), "p50": at(50.0), "p99": at(99.0), "max": at(100.0) })
}

/// Runs the three measurements against the core `config` describes,
/// serving at `opts.core`. Returns the figures (JSON).
pub async fn bench(config: &CoreConfig, opts: &BenchOptions) -> anyhow::Result<Value> {
    let charging = {
        let (location, pg) = (config.location()?, config.postgres.clone());
        tokio::task::spawn_blocking(move || location.open_charging(&pg)).await??
    };
    // Fresh subscribers each run: a run's id in their IMSIs.
    let run = (chrono::Utc::now().timestamp() % 100_000) as u64;
    let subscriber = |i: usize| format!("999{run:05}{i:07}");
    let needed = opts.boxes * opts.grants_per_box + opts.round_trips + opts.revocations;
    eprintln!("selling {needed} packages");
    {
        let charging = charging.clone();
        let subscribers: Vec<String> = (0..needed).map(subscriber).collect();
        tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            let now = chrono::Utc::now().timestamp();
            let spec = PackageSpec {
                kind: BucketKind::Topup,
                allowance: 1_000_000,
                valid_from: now - 60,
                expires_at: now + 86_400,
                tier: "bench".into(),
                models: vec![],
            };
            for s in &subscribers {
                let id = format!("bench-{s}");
                charging.sell(&id, &Imsi::parse(s)?, &spec, &id, now)?;
            }
            Ok(())
        })
        .await??;
    }
    eprintln!("connecting {} boxes", opts.boxes);
    let mut boxes = Vec::new();
    for i in 0..opts.boxes {
        let dir = opts.dir.join(format!("box-{i}"));
        boxes.push(connect_box(config, opts.core, &format!("bench-box-{run}-{i}"), &dir).await?);
    }

    // The round trip, one box, one question at a time.
    let mut round_trips = Vec::new();
    let base = opts.boxes * opts.grants_per_box;
    for i in 0..opts.round_trips {
        let t = Instant::now();
        grant(&boxes[0], &subscriber(base + i)).await?;
        round_trips.push(t.elapsed().as_secs_f64() * 1000.0);
    }

    // Every box at once.
    eprintln!(
        "{} boxes asking {} grants each",
        opts.boxes, opts.grants_per_box
    );
    let t = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (i, b) in boxes.iter().enumerate() {
        let asker = b.asker.clone();
        let mine: Vec<String> = (0..opts.grants_per_box)
            .map(|k| subscriber(i * opts.grants_per_box + k))
            .collect();
        tasks.spawn(async move {
            for s in mine {
                match asker.ask(&s, "", 0, Duration::from_secs(120)).await? {
                    GrantAnswer::Granted(_) => {}
                    GrantAnswer::Refused { code, message } => {
                        anyhow::bail!("{s}: refused {code}: {message}")
                    }
                }
            }
            Ok(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    let seconds = t.elapsed().as_secs_f64();
    let grants = opts.boxes * opts.grants_per_box;

    // Revocations: a grant at box 0, then its package revoked at the core.
    let mut revocations = Vec::new();
    let base = base + opts.round_trips;
    for i in 0..opts.revocations {
        let s = subscriber(base + i);
        let id = grant(&boxes[0], &s).await?;
        let charging = charging.clone();
        let package = format!("bench-{s}");
        let committed = tokio::task::spawn_blocking(move || {
            charging.revoke(&package, chrono::Utc::now().timestamp())?;
            Ok::<_, anyhow::Error>(Instant::now())
        })
        .await??;
        let deadline = committed + Duration::from_secs(30);
        let applied = loop {
            if let Some(t) = boxes[0].sink.revoked.lock().unwrap().get(&id) {
                break *t;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "revocation of grant {id} never arrived"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        };
        revocations.push(applied.saturating_duration_since(committed).as_secs_f64() * 1000.0);
    }
    for b in boxes {
        b.task.abort();
    }
    Ok(json!({
        "boxes": opts.boxes,
        "grants": grants,
        "seconds": seconds,
        "grants_per_s": grants as f64 / seconds,
        "round_trip_ms": percentiles(round_trips),
        "revocation_ms": percentiles(revocations),
    }))
}
