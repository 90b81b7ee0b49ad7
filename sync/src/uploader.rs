//! The edge's QUIC shell of the upload: connects to the core with the node
//! certificate, resumes where the core is, streams batches read from the
//! log within the window of [`crate::upload`], and acknowledges the log as
//! the core acknowledges. Reconnects with backoff and jitter, forever, until
//! shut down.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::core_server::{read_frame, stopped};
use crate::downlink::{DownlinkSink, GrantAsker};
use crate::log::UsageLog;
use crate::quic::{client_endpoint, TransportOptions};
use crate::upload::EdgePosition;
use crate::upload::{Backoff, UploadWindow, WindowLimits};
use crate::wire::pb::{core_frame, edge_frame, CoreFrame, EdgeFrame, Hello};
use crate::wire::{encode_frame, FrameDecoder};

/// Where and how to upload.
#[derive(Debug, Clone)]
pub struct UploaderConfig {
    /// The core's UDP address.
    pub core: SocketAddr,
    /// The name the core's certificate must carry.
    pub server_name: String,
    /// Operator CA, PEM.
    pub ca_pem: String,
    /// Node certificate, PEM.
    pub cert_pem: String,
    /// Node key (PKCS#8), PEM.
    pub key_pem: String,
    /// Batches.
    pub limits: WindowLimits,
    /// Transport.
    pub transport: TransportOptions,
    /// How often to look for new records when idle.
    pub poll: Duration,
    /// The log is never acknowledged past this (the agent's ledger store
    /// must have applied a record before the log may release it).
    pub ack_limit: Option<AckLimit>,
    /// The downlink (grants from the core), served on each connection when
    /// set: where its messages are applied, and who asks.
    pub downlink: Option<Downlink>,
}

/// The box's end of the downlink, for the uploader to serve.
#[derive(Clone)]
pub struct Downlink {
    /// Applies what the core sends, durably.
    pub sink: Arc<dyn DownlinkSink>,
    /// Questions to the core, and their answers.
    pub asker: GrantAsker,
}

impl std::fmt::Debug for Downlink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Downlink").finish_non_exhaustive()
    }
}

/// A bound on the log's acknowledged position, read at each acknowledgement.
#[derive(Clone)]
pub struct AckLimit(pub Arc<dyn Fn() -> u64 + Send + Sync>);

impl std::fmt::Debug for AckLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AckLimit")
    }
}

/// What the uploader shows in metrics and the admin API.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct UploaderStatus {
    /// A connection is up.
    pub connected: bool,
    /// The core holds every seq at or below this.
    pub acked_seq: u64,
    /// When the last acknowledgement came (Unix ms, 0: never).
    pub last_ack_unix_ms: i64,
    /// Connections made.
    pub connections: u64,
    /// The last error, if any (cleared by a successful connection).
    pub last_error: Option<String>,
    /// Why the last connection (or attempt) ended; kept after reconnecting.
    pub last_disconnect: Option<String>,
    /// Why the core's position and this log disagreed at the last hello (a
    /// fork, a core restored from a backup, a box from a snapshot); kept
    /// until a hello agrees.
    pub alarm: Option<String>,
}

/// A fault planted on purpose, to check that the end-to-end test catches a
/// lost batch (`cargo xtask e2e-planted`): built only with the
/// `planted-fault-skip-batch` feature, never in a product build, the uploader
/// believes it sent the batch holding this seq and never does.
#[cfg(feature = "planted-fault-skip-batch")]
pub const PLANTED_SKIPPED_SEQ: u64 = 40;

/// Runs until `shutdown` turns true.
pub async fn run(
    log: Arc<UsageLog>,
    config: UploaderConfig,
    status: Arc<Mutex<UploaderStatus>>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let bind: SocketAddr = if config.core.is_ipv6() {
        "[::]:0".parse().unwrap()
    } else {
        "0.0.0.0:0".parse().unwrap()
    };
    let endpoint = match client_endpoint(
        bind,
        &config.cert_pem,
        &config.key_pem,
        &config.ca_pem,
        &config.transport,
    ) {
        Ok(e) => e,
        Err(e) => {
            tracing::error!(error = %e, "uploader cannot start");
            status.lock().unwrap().last_error = Some(e.to_string());
            return;
        }
    };
    let mut window = UploadWindow::new(config.limits, log.stats().acked_seq);
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
    loop {
        let stop = *shutdown.borrow();
        if stop {
            break;
        }
        let result = session(
            &endpoint,
            &log,
            &config,
            &mut window,
            &status,
            &mut backoff,
            &mut shutdown,
        )
        .await;
        window.on_disconnect();
        {
            let mut s = status.lock().unwrap();
            s.connected = false;
            if let Err(e) = &result {
                s.last_error = Some(e.clone());
                s.last_disconnect = Some(e.clone());
            }
        }
        match result {
            Ok(()) => break,
            Err(e) => tracing::warn!(error = %e, "upload connection lost"),
        }
        // Full jitter from a real random source: boxes that lost the core
        // together must not reconnect together.
        let jitter: f64 = rand::random();
        tokio::select! {
            _ = tokio::time::sleep(backoff.next_delay(jitter)) => {}
            _ = stopped(&mut shutdown) => break,
        }
    }
    endpoint.close(quinn::VarInt::from_u32(0), b"shutdown");
    endpoint.wait_idle().await;
}

/// The downlink of `conn`, opened again after it ends for as long as the
/// connection lives: after a failure (a message the box could not apply,
/// the core's store failing), with backoff; after a clean end (an older
/// core, which serves none), once a minute.
async fn serve_downlink(conn: quinn::Connection, d: Downlink) {
    let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
    loop {
        let delay = match crate::downlink::run(conn.clone(), d.sink.clone(), d.asker.clone()).await
        {
            Ok(()) => {
                tracing::info!("the core ended the downlink (an older core serves none); trying again in a minute");
                Duration::from_secs(60)
            }
            Err(e) => {
                tracing::warn!(error = %e, "downlink ended; opening it again");
                backoff.next_delay(rand::random())
            }
        };
        if conn.close_reason().is_some() {
            return;
        }
        tokio::time::sleep(delay).await;
    }
}

async fn ack_log(log: &Arc<UsageLog>, seq: u64, limit: &Option<AckLimit>) -> Result<(), String> {
    let log = log.clone();
    let limit = limit.clone();
    tokio::task::spawn_blocking(move || {
        let durable = log.stats().durable_seq;
        let cap = limit.map(|l| (l.0)()).unwrap_or(u64::MAX);
        log.ack(seq.min(durable).min(cap))
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| e.to_string())
}

async fn session(
    endpoint: &quinn::Endpoint,
    log: &Arc<UsageLog>,
    config: &UploaderConfig,
    window: &mut UploadWindow,
    status: &Mutex<UploaderStatus>,
    backoff: &mut Backoff,
    shutdown: &mut tokio::sync::watch::Receiver<bool>,
) -> Result<(), String> {
    let conn = endpoint
        .connect(config.core, &config.server_name)
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| format!("connecting to {}: {e}", config.core))?;
    backoff.reset();
    // The downlink runs beside the upload, on the same connection, and
    // ends with it.
    let downlink = config.downlink.clone().map(|d| {
        let conn = conn.clone();
        tokio::spawn(serve_downlink(conn, d))
    });
    let result = exchange(&conn, log, config, window, status, shutdown).await;
    if let Some(d) = downlink {
        // Ended before the next connection's downlink starts (the asker is
        // told this one is gone before the next says it is up).
        d.abort();
        let _ = d.await;
    }
    result.map_err(|e| match conn.close_reason() {
        // Stream errors say only "connection lost": name why.
        Some(reason) => format!("{e}: {reason}"),
        None => e,
    })
}

/// One connection's upload: hello, then batches and acks until an error or
/// shutdown.
async fn exchange(
    conn: &quinn::Connection,
    log: &Arc<UsageLog>,
    config: &UploaderConfig,
    window: &mut UploadWindow,
    status: &Mutex<UploaderStatus>,
    shutdown: &mut tokio::sync::watch::Receiver<bool>,
) -> Result<(), String> {
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    let hello = EdgeFrame {
        kind: Some(edge_frame::Kind::Hello(Hello {
            log_acked_seq: log.stats().acked_seq,
        })),
    };
    send.write_all(&encode_frame(&hello))
        .await
        .map_err(|e| e.to_string())?;
    let mut dec = FrameDecoder::new();
    let mut buf = vec![0u8; 64 << 10];
    let core_hello = match read_frame::<CoreFrame>(&mut recv, &mut dec, &mut buf).await? {
        Some(CoreFrame {
            kind: Some(core_frame::Kind::Hello(h)),
        }) => h,
        other => return Err(format!("expected CoreHello, got {other:?}")),
    };
    let contiguous = core_hello.contiguous_seq;
    let core_hash: Option<[u8; 32]> = core_hello.contiguous_hash.as_slice().try_into().ok();
    let edge = {
        let l = log.clone();
        tokio::task::spawn_blocking(move || {
            let stats = l.stats();
            let hash_at_core = if contiguous <= stats.durable_seq {
                l.body_hash_at(contiguous)?
            } else {
                None
            };
            Ok::<_, crate::log::LogError>(EdgePosition {
                acked: stats.acked_seq,
                durable: stats.durable_seq,
                hash_at_core,
            })
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?
    };
    let resume = window.on_core_hello(contiguous, core_hash, edge);
    if let Some(alarm) = &resume.alarm {
        tracing::error!(
            core_seq = contiguous,
            log_acked = edge.acked,
            log_durable = edge.durable,
            "ALARM: {alarm}"
        );
    }
    let pos = resume.release_to;
    ack_log(log, pos, &config.ack_limit).await?;
    {
        let mut s = status.lock().unwrap();
        s.connected = true;
        s.connections += 1;
        s.acked_seq = pos;
        s.last_error = None;
        s.alarm = resume.alarm;
    }
    loop {
        // Fill the window with what the log holds.
        while let Some((from, n, bytes)) = window.want() {
            let l = log.clone();
            let records = tokio::task::spawn_blocking(move || l.read_from(from, n, bytes))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
            let lost: Vec<(u64, u64)> = log
                .lost_ranges()
                .iter()
                .map(|r| (r.first, r.last))
                .collect();
            #[cfg(feature = "planted-fault-skip-batch")]
            let planted_skip = records
                .first()
                .zip(records.last())
                .is_some_and(|(f, l)| (f.0..=l.0).contains(&PLANTED_SKIPPED_SEQ));
            let Some(batch) = window.batch(records, &lost) else {
                break;
            };
            #[cfg(feature = "planted-fault-skip-batch")]
            if planted_skip {
                tracing::error!(
                    seq = PLANTED_SKIPPED_SEQ,
                    "planted fault: the batch holding this seq is not sent"
                );
                continue;
            }
            let frame = EdgeFrame {
                kind: Some(edge_frame::Kind::Batch(batch)),
            };
            send.write_all(&encode_frame(&frame))
                .await
                .map_err(|e| e.to_string())?;
        }
        let idle = window.in_flight() == 0 || window.want().is_some();
        tokio::select! {
            frame = read_frame::<CoreFrame>(&mut recv, &mut dec, &mut buf) => {
                let ack = match frame? {
                    Some(CoreFrame { kind: Some(core_frame::Kind::Ack(a)) }) => a,
                    Some(other) => return Err(format!("unexpected frame {other:?}")),
                    None => return Err("the core closed the stream".into()),
                };
                if let Some(pos) = window.on_ack(&ack).map_err(|e| e.to_string())? {
                    ack_log(log, pos, &config.ack_limit).await?;
                    let mut s = status.lock().unwrap();
                    s.acked_seq = pos;
                    s.last_ack_unix_ms = SystemTime::now()
                        .duration_since(UNIX_EPOCH)
                        .map(|d| d.as_millis() as i64)
                        .unwrap_or(0);
                }
            }
            _ = tokio::time::sleep(config.poll), if idle => {}
            _ = stopped(shutdown) => {
                conn.close(quinn::VarInt::from_u32(0), b"shutdown");
                return Ok(());
            }
        }
    }
}
