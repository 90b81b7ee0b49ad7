//! `GET /metrics`: Prometheus text format, through prometheus-client.
//! Counters and histograms are updated on the request path; gauges (queue,
//! slots, reservations, log backlog, GPU telemetry) are read at scrape time.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// `route`, `status`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    /// The route, e.g. `/v1/chat/completions`.
    pub route: String,
    /// HTTP status code.
    pub status: u16,
}

/// `model`, `kind` (prompt, cached, completion).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TokenLabels {
    /// Model id.
    pub model: String,
    /// prompt, cached or completion.
    pub kind: String,
}

/// `gpu` index.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GpuLabels {
    /// Index.
    pub gpu: u32,
    /// Name.
    pub name: String,
}

/// What happened to the box's questions to the core and its grants.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GrantEventLabels {
    /// asked, granted, refused or revoked.
    pub event: String,
}

/// Where the model runs: `cpu` or `cuda`, and the GPU index ("" on the CPU).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeviceLabels {
    /// cpu or cuda.
    pub kind: String,
    /// GPU index, or empty.
    pub gpu: String,
}

/// One model.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabels {
    /// Its id.
    pub model: String,
}

/// One model in one state.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelStateLabels {
    /// Its id.
    pub model: String,
    /// `loaded`, `loading`, `unloaded`, `unloading` or `failed`.
    pub state: String,
}

/// Every metric of the agent.
pub struct Metrics {
    registry: Registry,
    /// Requests by route and status.
    pub requests: Family<RouteLabels, Counter>,
    /// Tokens by model and kind.
    pub tokens: Family<TokenLabels, Counter>,
    /// Time to first token.
    pub ttft: Histogram,
    /// Time between tokens.
    pub inter_token: Histogram,
    /// Time a request spends in metering: rate limits and reservation
    /// before generation, settlement and the durable usage record after.
    pub metering: Histogram,
    queue_depth: Gauge,
    busy_slots: Gauge,
    kv_positions_used: Gauge,
    kv_positions_total: Gauge,
    kv_preemptions: Counter,
    reservations: Gauge,
    backlog_records: Gauge,
    backlog_bytes: Gauge,
    sync_connected: Gauge,
    sync_acked_seq: Gauge,
    sync_last_ack_age: Gauge,
    sync_lag: Gauge,
    grants_held: Gauge,
    grant_tokens_left: Gauge,
    grant_events: Family<GrantEventLabels, Counter>,
    downlink_connected: Gauge,
    downlink_last_message_age: Gauge,
    device: Family<DeviceLabels, Gauge>,
    model_state: Family<ModelStateLabels, Gauge>,
    model_load_seconds: Family<ModelLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    gpu_memory_used: Family<GpuLabels, Gauge>,
    gpu_memory_total: Family<GpuLabels, Gauge>,
    gpu_utilization: Family<GpuLabels, Gauge>,
    gpu_temperature: Family<GpuLabels, Gauge>,
    gpu_power: Family<GpuLabels, Gauge>,
}

/// Values read at scrape time.
#[derive(Debug, Default, Clone)]
pub struct Snapshot {
    /// Requests waiting for a slot.
    pub queue_depth: usize,
    /// Slots generating.
    pub busy_slots: usize,
    /// The GPU path's KV pool: positions in use and in all (none on the
    /// CPU path, whose caches grow in host memory).
    pub kv_pool: Option<(usize, usize)>,
    /// Sequences preempted because the KV pool was full (the engine's count).
    pub kv_preemptions: u64,
    /// Open reservations.
    pub reservations: usize,
    /// Records not yet acknowledged by the core.
    pub backlog_records: u64,
    /// Their bytes.
    pub backlog_bytes: u64,
    /// The upload to the core, when configured.
    pub sync: Option<super::SyncView>,
    /// The GPUs' latest telemetry.
    pub gpus: Vec<mec_inference::gpu::GpuInfo>,
    /// The models: their states, and where the loaded ones run.
    pub models: Vec<mec_inference::registry::ModelView>,
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("mec");
        let requests = Family::<RouteLabels, Counter>::default();
        registry.register(
            "requests",
            "API requests by route and status",
            requests.clone(),
        );
        let tokens = Family::<TokenLabels, Counter>::default();
        registry.register(
            "tokens",
            "Tokens by model and kind (prompt, cached, completion)",
            tokens.clone(),
        );
        let ttft = Histogram::new(exponential_buckets(0.005, 2.0, 14));
        registry.register(
            "time_to_first_token_seconds",
            "Time to first token",
            ttft.clone(),
        );
        let inter_token = Histogram::new(exponential_buckets(0.001, 2.0, 12));
        registry.register(
            "inter_token_latency_seconds",
            "Time between completion tokens",
            inter_token.clone(),
        );
        let metering = Histogram::new(exponential_buckets(0.000_05, 1.5, 24));
        registry.register(
            "metering_seconds",
            "Time in metering per request: reserve before, settle and durable record after",
            metering.clone(),
        );
        let gauge = |registry: &mut Registry, name: &str, help: &str| {
            let g = Gauge::default();
            registry.register(name, help, g.clone());
            g
        };
        let queue_depth = gauge(&mut registry, "queue_depth", "Requests waiting for a slot");
        let busy_slots = gauge(&mut registry, "busy_slots", "Slots generating");
        let kv_positions_used = gauge(
            &mut registry,
            "kv_cache_positions_used",
            "Positions of the GPU path's KV cache pool held by sequences and the prefix cache",
        );
        let kv_positions_total = gauge(
            &mut registry,
            "kv_cache_positions_total",
            "Positions of the GPU path's KV cache pool, allocated at start",
        );
        let kv_preemptions = Counter::default();
        registry.register(
            "kv_cache_preemptions",
            "Sequences whose KV was dropped because the pool was full, to be recomputed",
            kv_preemptions.clone(),
        );
        let reservations = gauge(
            &mut registry,
            "reservations_outstanding",
            "Open token reservations",
        );
        let backlog_records = gauge(
            &mut registry,
            "usage_log_backlog_records",
            "Usage records not yet acknowledged by the core",
        );
        let backlog_bytes = gauge(
            &mut registry,
            "usage_log_backlog_bytes",
            "Bytes of usage records not yet acknowledged by the core",
        );
        let sync_connected = gauge(
            &mut registry,
            "sync_connected",
            "1 while a connection to core-ingest is up",
        );
        let sync_acked_seq = gauge(
            &mut registry,
            "sync_acked_seq",
            "Highest seq core-ingest holds with none missing",
        );
        let sync_last_ack_age = gauge(
            &mut registry,
            "sync_last_ack_age_seconds",
            "Seconds since core-ingest last acknowledged (-1: never)",
        );
        let sync_lag = gauge(
            &mut registry,
            "sync_lag_seconds",
            "Seconds since the oldest record core-ingest does not hold ended (0: it holds all)",
        );
        let grants_held = gauge(
            &mut registry,
            "grants_held",
            "The core's grants held at this box (not revoked, not expired)",
        );
        let grant_tokens_left = gauge(
            &mut registry,
            "grant_tokens_left",
            "Tokens left in the grants held",
        );
        let grant_events = Family::<GrantEventLabels, Counter>::default();
        registry.register(
            "grant_events",
            "Questions to the core for quota (asked) and their outcomes (granted, refused), and revocations received",
            grant_events.clone(),
        );
        let downlink_connected = gauge(
            &mut registry,
            "downlink_connected",
            "1 while the downlink from the core (grants, revocations) is up",
        );
        let downlink_last_message_age = gauge(
            &mut registry,
            "downlink_last_message_age_seconds",
            "Seconds since the last message on the downlink (-1: none yet)",
        );
        let device = Family::<DeviceLabels, Gauge>::default();
        registry.register(
            "inference_device",
            "Where the loaded models run (1 on each device in use; the reason for the CPU is in /readyz)",
            device.clone(),
        );
        let model_state = Family::<ModelStateLabels, Gauge>::default();
        registry.register(
            "model_state",
            "Each model's state (1 for the state it is in)",
            model_state.clone(),
        );
        let model_load_seconds =
            Family::<ModelLabels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        registry.register(
            "model_load_seconds",
            "How long each model's last load took",
            model_load_seconds.clone(),
        );
        let gpu_family = |registry: &mut Registry, name: &str, help: &str| {
            let family = Family::<GpuLabels, Gauge>::default();
            registry.register(name, help, family.clone());
            family
        };
        let gpu_memory_used =
            gpu_family(&mut registry, "gpu_memory_used_bytes", "GPU memory in use");
        let gpu_memory_total =
            gpu_family(&mut registry, "gpu_memory_total_bytes", "GPU memory in all");
        let gpu_utilization =
            gpu_family(&mut registry, "gpu_utilization_percent", "GPU utilization");
        let gpu_temperature = gpu_family(
            &mut registry,
            "gpu_temperature_celsius",
            "GPU core temperature",
        );
        let gpu_power = gpu_family(&mut registry, "gpu_power_milliwatts", "GPU power draw");
        Metrics {
            registry,
            requests,
            tokens,
            ttft,
            inter_token,
            metering,
            queue_depth,
            busy_slots,
            kv_positions_used,
            kv_positions_total,
            kv_preemptions,
            reservations,
            backlog_records,
            backlog_bytes,
            sync_connected,
            sync_acked_seq,
            sync_last_ack_age,
            sync_lag,
            grants_held,
            grant_tokens_left,
            grant_events,
            downlink_connected,
            downlink_last_message_age,
            device,
            model_state,
            model_load_seconds,
            gpu_memory_used,
            gpu_memory_total,
            gpu_utilization,
            gpu_temperature,
            gpu_power,
        }
    }

    /// Counts one answered request.
    pub fn request(&self, route: &str, status: u16) {
        self.requests
            .get_or_create(&RouteLabels {
                route: route.into(),
                status,
            })
            .inc();
    }

    /// Counts tokens of one kind.
    pub fn add_tokens(&self, model: &str, kind: &str, n: u64) {
        if n > 0 {
            self.tokens
                .get_or_create(&TokenLabels {
                    model: model.into(),
                    kind: kind.into(),
                })
                .inc_by(n);
        }
    }

    /// The text exposition with `snap`'s gauges.
    pub fn render(&self, snap: &Snapshot) -> String {
        self.queue_depth.set(snap.queue_depth as i64);
        self.busy_slots.set(snap.busy_slots as i64);
        if let Some((used, total)) = snap.kv_pool {
            self.kv_positions_used.set(used as i64);
            self.kv_positions_total.set(total as i64);
        }
        // The engine counts; the counter catches up at each scrape.
        let seen = self.kv_preemptions.get();
        self.kv_preemptions
            .inc_by(snap.kv_preemptions.saturating_sub(seen));
        self.reservations.set(snap.reservations as i64);
        self.backlog_records.set(snap.backlog_records as i64);
        self.backlog_bytes.set(snap.backlog_bytes as i64);
        if let Some(sync) = &snap.sync {
            self.sync_connected.set(i64::from(sync.connected));
            self.sync_acked_seq.set(sync.acked_seq as i64);
            self.sync_last_ack_age
                .set(sync.last_ack_age_s.unwrap_or(-1));
            self.sync_lag.set(sync.lag_s);
            let g = &sync.grants;
            self.grants_held.set(g.held as i64);
            self.grant_tokens_left
                .set(i64::try_from(g.tokens_left).unwrap_or(i64::MAX));
            let c = g.counters;
            for (event, n) in [
                ("asked", c.asked),
                ("granted", c.granted),
                ("refused", c.refused),
                ("revoked", c.revoked),
            ] {
                // Billing counts; the counters catch up at each scrape.
                let counter = self.grant_events.get_or_create(&GrantEventLabels {
                    event: event.into(),
                });
                counter.inc_by(n.saturating_sub(counter.get()));
            }
            if let Some(d) = &g.downlink {
                self.downlink_connected.set(i64::from(d.connected));
                self.downlink_last_message_age
                    .set(d.last_message_age_s.map_or(-1, |a| a as i64));
            }
        }
        // The devices the loaded models run on (a model unloaded since the
        // last scrape no longer counts).
        self.device.clear();
        for device in snap.models.iter().filter_map(|m| m.device.as_ref()) {
            let (kind, gpu) = match device {
                mec_inference::gpu::DeviceChoice::Cpu { .. } => ("cpu", String::new()),
                mec_inference::gpu::DeviceChoice::Cuda { index } => ("cuda", index.to_string()),
            };
            self.device
                .get_or_create(&DeviceLabels {
                    kind: kind.into(),
                    gpu,
                })
                .set(1);
        }
        for m in &snap.models {
            for state in ["loaded", "loading", "unloaded", "unloading", "failed"] {
                self.model_state
                    .get_or_create(&ModelStateLabels {
                        model: m.id.clone(),
                        state: state.into(),
                    })
                    .set(i64::from(m.state == state));
            }
            if let Some(ms) = m.last_load_ms {
                self.model_load_seconds
                    .get_or_create(&ModelLabels {
                        model: m.id.clone(),
                    })
                    .set(ms as f64 / 1000.0);
            }
        }
        for g in &snap.gpus {
            let l = GpuLabels {
                gpu: g.index,
                name: g.name.clone(),
            };
            let used = g.memory_total_bytes.saturating_sub(g.memory_free_bytes);
            self.gpu_memory_used.get_or_create(&l).set(used as i64);
            self.gpu_memory_total
                .get_or_create(&l)
                .set(g.memory_total_bytes as i64);
            // A reading NVML could not take is left out, not shown as 0.
            if let Some(v) = g.utilization_percent {
                self.gpu_utilization.get_or_create(&l).set(i64::from(v));
            }
            if let Some(v) = g.temperature_c {
                self.gpu_temperature.get_or_create(&l).set(i64::from(v));
            }
            if let Some(v) = g.power_mw {
                self.gpu_power.get_or_create(&l).set(i64::from(v));
            }
        }
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "metrics encoding failed");
        }
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mec_inference::gpu::{DeviceChoice, GpuInfo};

    #[test]
    fn gpu_telemetry_and_the_device_in_use_are_exported() {
        let m = Metrics::new();
        let snap = Snapshot {
            gpus: vec![GpuInfo {
                index: 0,
                name: "NVIDIA L4".into(),
                memory_total_bytes: 24 << 30,
                memory_free_bytes: 20 << 30,
                utilization_percent: Some(37),
                temperature_c: Some(51),
                power_mw: None,
            }],
            models: vec![mec_inference::registry::ModelView {
                id: "m".into(),
                aliases: vec![],
                state: "loaded",
                reason: None,
                pinned: false,
                pool: "gpu:0".into(),
                device: Some(DeviceChoice::Cuda { index: 0 }),
                memory_bytes: 1 << 30,
                context_length: Some(8192),
                requests: 0,
                last_load_ms: Some(1500),
                idle_s: Some(0),
            }],
            kv_pool: Some((64, 32_768)),
            kv_preemptions: 3,
            ..Default::default()
        };
        m.render(&snap);
        let text = m.render(&snap);
        for line in [
            "mec_kv_cache_positions_used 64",
            // Rendered twice: the counter follows the engine's count, once.
            "mec_kv_cache_preemptions_total 3",
            "mec_kv_cache_positions_total 32768",
            "mec_model_state{model=\"m\",state=\"loaded\"} 1",
            "mec_model_state{model=\"m\",state=\"failed\"} 0",
            "mec_model_load_seconds{model=\"m\"} 1.5",
            "mec_inference_device{kind=\"cuda\",gpu=\"0\"} 1",
            "mec_gpu_memory_used_bytes{gpu=\"0\",name=\"NVIDIA L4\"} 4294967296",
            "mec_gpu_memory_total_bytes{gpu=\"0\",name=\"NVIDIA L4\"} 25769803776",
            "mec_gpu_utilization_percent{gpu=\"0\",name=\"NVIDIA L4\"} 37",
            "mec_gpu_temperature_celsius{gpu=\"0\",name=\"NVIDIA L4\"} 51",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
        // A reading NVML did not give is absent, not zero.
        assert!(!text.contains("mec_gpu_power_milliwatts{"), "{text}");
    }
}
