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
    reservations: Gauge,
    backlog_records: Gauge,
    backlog_bytes: Gauge,
    sync_connected: Gauge,
    sync_acked_seq: Gauge,
    sync_last_ack_age: Gauge,
    sync_lag: Gauge,
    gpu_memory_used: Family<GpuLabels, Gauge>,
    gpu_utilization: Family<GpuLabels, Gauge>,
}

/// Values read at scrape time.
#[derive(Debug, Default, Clone)]
pub struct Snapshot {
    /// Requests waiting for a slot.
    pub queue_depth: usize,
    /// Slots generating.
    pub busy_slots: usize,
    /// Open reservations.
    pub reservations: usize,
    /// Records not yet acknowledged by the core.
    pub backlog_records: u64,
    /// Their bytes.
    pub backlog_bytes: u64,
    /// The upload to the core, when configured.
    pub sync: Option<super::SyncView>,
    /// `(index, name, memory used bytes, utilization %)` per GPU.
    pub gpus: Vec<(u32, String, u64, u32)>,
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
        let gpu_memory_used = Family::<GpuLabels, Gauge>::default();
        registry.register(
            "gpu_memory_used_bytes",
            "GPU memory in use",
            gpu_memory_used.clone(),
        );
        let gpu_utilization = Family::<GpuLabels, Gauge>::default();
        registry.register(
            "gpu_utilization_percent",
            "GPU utilization",
            gpu_utilization.clone(),
        );
        Metrics {
            registry,
            requests,
            tokens,
            ttft,
            inter_token,
            metering,
            queue_depth,
            busy_slots,
            reservations,
            backlog_records,
            backlog_bytes,
            sync_connected,
            sync_acked_seq,
            sync_last_ack_age,
            sync_lag,
            gpu_memory_used,
            gpu_utilization,
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
        self.reservations.set(snap.reservations as i64);
        self.backlog_records.set(snap.backlog_records as i64);
        self.backlog_bytes.set(snap.backlog_bytes as i64);
        if let Some(sync) = &snap.sync {
            self.sync_connected.set(i64::from(sync.connected));
            self.sync_acked_seq.set(sync.acked_seq as i64);
            self.sync_last_ack_age
                .set(sync.last_ack_age_s.unwrap_or(-1));
            self.sync_lag.set(sync.lag_s);
        }
        for (i, name, mem, util) in &snap.gpus {
            let l = GpuLabels {
                gpu: *i,
                name: name.clone(),
            };
            self.gpu_memory_used.get_or_create(&l).set(*mem as i64);
            self.gpu_utilization.get_or_create(&l).set(*util as i64);
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
