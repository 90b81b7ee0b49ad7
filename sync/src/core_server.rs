//! core-ingest's QUIC shell: accepts connections whose client certificate
//! the operator CA issued, takes the node id and key from that certificate,
//! and for each batch runs the checks of [`crate::ingest`] and commits the
//! verdicts (one transaction) before it acknowledges.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::charging_store::{ChargingStore, ChargingStoreError};
use crate::ingest::{check_records, CheckedBatch};
use crate::ingest_store::IngestStore;
use crate::wire::pb::{
    core_frame, edge_frame, Ack, CoreFrame, CoreHello, DownlinkHello, EdgeFrame, GrantRefused,
    GrantRequest,
};
use crate::wire::{encode_frame, FrameDecoder};
use mec_metering::charging::{ChargingError, GrantPolicy};

/// The store, shared by every connection.
pub type SharedStore = Arc<dyn IngestStore>;

/// Grants and the downlink (`sync.proto`, version 3), when the core serves
/// them: the store of packages and grants, and how grants are cut.
pub struct DownlinkService {
    /// The packages, grants and each node's outbox.
    pub store: Arc<dyn ChargingStore>,
    /// How grants are cut.
    pub policy: GrantPolicy,
}

/// How often an instance looks at its connected boxes' outboxes (one query
/// for all of them) for messages another instance or the operator made: a
/// revocation reaches a connected box within about this long.
const OUTBOX_POLL: std::time::Duration = std::time::Duration::from_millis(250);

/// How often an instance looks for nodes with records not yet settled.
const SETTLE_SWEEP: std::time::Duration = std::time::Duration::from_secs(60);

/// How often a box's downlink tries again to send what the watch saw and a
/// failed read of the outbox left unsent.
const OUTBOX_RETRY: std::time::Duration = std::time::Duration::from_secs(5);

/// Downlink messages sent in one go.
const OUTBOX_BATCH: usize = 256;

/// What an instance has done since it started (its `/metrics`).
#[derive(Debug, Default)]
pub struct CoreStats {
    /// Batches committed and acknowledged.
    pub batches: std::sync::atomic::AtomicU64,
    /// Records stored.
    pub records: std::sync::atomic::AtomicU64,
    /// Records received again (already stored).
    pub duplicates: std::sync::atomic::AtomicU64,
    /// Records kept aside (faults and forks).
    pub quarantined: std::sync::atomic::AtomicU64,
    /// Store calls that failed: batches not committed (not acknowledged:
    /// resent) and hellos not answered.
    pub store_errors: std::sync::atomic::AtomicU64,
    /// Node connections open now.
    pub connections: std::sync::atomic::AtomicI64,
}

/// Reads the next whole frame from `recv`; `Ok(None)` at a clean end.
pub async fn read_frame<M: prost::Message + Default>(
    recv: &mut quinn::RecvStream,
    dec: &mut FrameDecoder,
    buf: &mut [u8],
) -> Result<Option<M>, String> {
    loop {
        if let Some(m) = dec.next_frame::<M>().map_err(|e| e.to_string())? {
            return Ok(Some(m));
        }
        match recv.read(buf).await.map_err(|e| e.to_string())? {
            Some(n) => dec.push(&buf[..n]),
            None if dec.buffered() == 0 => return Ok(None),
            None => return Err("the stream ended inside a frame".into()),
        }
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Serves `endpoint` until `shutdown` turns true.
pub async fn serve(
    endpoint: quinn::Endpoint,
    store: SharedStore,
    shutdown: tokio::sync::watch::Receiver<bool>,
) {
    serve_counted(endpoint, store, None, Arc::default(), shutdown).await
}

/// [`serve`], counting into `stats`.
pub async fn serve_counted(
    endpoint: quinn::Endpoint,
    store: SharedStore,
    downlink: Option<Arc<DownlinkService>>,
    stats: Arc<CoreStats>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    use std::sync::atomic::Ordering::Relaxed;
    // With packages sold here: the downlink, and uploaded records settled
    // against the packages.
    let charging = downlink.map(|service| {
        Arc::new(Charging {
            settle: SettleQueue::start(store.clone(), service.store.clone()),
            watch: OutboxWatch::start(service.store.clone()),
            service,
        })
    });
    loop {
        tokio::select! {
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                let (store, stats, charging) = (store.clone(), stats.clone(), charging.clone());
                tokio::spawn(async move {
                    stats.connections.fetch_add(1, Relaxed);
                    if let Err(e) = connection(incoming, store, charging, stats.clone()).await {
                        tracing::warn!(error = %e, "connection ended");
                    }
                    stats.connections.fetch_sub(1, Relaxed);
                });
            }
            _ = stopped(&mut shutdown) => break,
        }
    }
    endpoint.close(quinn::VarInt::from_u32(0), b"shutdown");
    endpoint.wait_idle().await;
}

/// An instance's side of the packages: the downlink service, the
/// settlement of uploaded records, the watch over connected boxes'
/// outboxes.
struct Charging {
    service: Arc<DownlinkService>,
    settle: SettleQueue,
    watch: Arc<OutboxWatch>,
}

/// Boxes' last downlink messages made, as the watch last read them.
type LastMade = tokio::sync::watch::Sender<u64>;

/// One watch per instance over the outboxes of its connected boxes: every
/// [`OUTBOX_POLL`] one query gives the last message made for each, and a
/// box's downlink stream wakes when there is one it has not sent (a
/// revocation the operator made, a grant another instance made). One query
/// per instance, not one per box.
struct OutboxWatch {
    nodes: std::sync::Mutex<std::collections::HashMap<String, LastMade>>,
}

impl OutboxWatch {
    fn start(store: Arc<dyn ChargingStore>) -> Arc<OutboxWatch> {
        let watch = Arc::new(OutboxWatch {
            nodes: Default::default(),
        });
        let weak = Arc::downgrade(&watch);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(OUTBOX_POLL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                // Ends with the instance's server.
                let Some(watch) = weak.upgrade() else { return };
                let nodes: Vec<String> = {
                    let mut nodes = watch.nodes.lock().unwrap();
                    nodes.retain(|_, tx| tx.receiver_count() > 0);
                    nodes.keys().cloned().collect()
                };
                if nodes.is_empty() {
                    continue;
                }
                let store = store.clone();
                match tokio::task::spawn_blocking(move || store.downlink_lasts(&nodes)).await {
                    Ok(Ok(lasts)) => {
                        let nodes = watch.nodes.lock().unwrap();
                        for (node, last) in lasts {
                            if let Some(tx) = nodes.get(&node) {
                                tx.send_if_modified(|v| std::mem::replace(v, last) != last);
                            }
                        }
                    }
                    // Looked at again at the next tick; nothing is lost.
                    Ok(Err(e)) => tracing::warn!(error = %e, "outboxes not read"),
                    Err(e) => tracing::warn!(error = %e, "outboxes not read"),
                }
            }
        });
        watch
    }

    /// The last message made for `node_id`, as the watch last read it,
    /// while the receiver lives.
    fn watch(&self, node_id: &str) -> tokio::sync::watch::Receiver<u64> {
        self.nodes
            .lock()
            .unwrap()
            .entry(node_id.to_string())
            .or_insert_with(|| tokio::sync::watch::channel(0).0)
            .subscribe()
    }
}

/// Settles uploaded records against the packages
/// ([`crate::charging_store::settle_uploaded`]) on a task of its own, off
/// the acknowledgement's path: a node is queued when it says hello
/// (records a crash left unsettled) and after each batch committed.
#[derive(Clone)]
struct SettleQueue(tokio::sync::mpsc::UnboundedSender<String>);

impl SettleQueue {
    fn start(records: SharedStore, charging: Arc<dyn ChargingStore>) -> SettleQueue {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
        // At start and every minute: the nodes a crash or a failed
        // settlement left behind (a node that never reconnects included).
        let sweep = {
            let (tx, charging) = (tx.downgrade(), charging.clone());
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(SETTLE_SWEEP);
                loop {
                    tick.tick().await;
                    let charging = charging.clone();
                    let behind =
                        tokio::task::spawn_blocking(move || charging.nodes_unsettled()).await;
                    let Some(tx) = tx.upgrade() else { return };
                    match behind {
                        Ok(Ok(nodes)) => {
                            for n in nodes {
                                let _ = tx.send(n);
                            }
                        }
                        Ok(Err(e)) => tracing::warn!(error = %e, "nodes to settle not read"),
                        Err(e) => tracing::warn!(error = %e, "nodes to settle not read"),
                    }
                }
            })
        };
        tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                let mut nodes = std::collections::BTreeSet::from([first]);
                while let Ok(n) = rx.try_recv() {
                    nodes.insert(n);
                }
                for node in nodes {
                    let (records, charging) = (records.clone(), charging.clone());
                    let done = tokio::task::spawn_blocking(move || {
                        let now = now_ms() / 1000;
                        crate::charging_store::settle_uploaded(&*records, &*charging, &node, now)
                            .map_err(|e| (node, e))
                    })
                    .await;
                    if let Ok(Err((node, e))) = done {
                        // Settled at the node's next batch or hello, or the sweep.
                        tracing::error!(node = %node, error = %e, "uploaded records not settled yet");
                    }
                }
            }
            sweep.abort();
        });
        SettleQueue(tx)
    }

    fn queue(&self, node_id: &str) {
        let _ = self.0.send(node_id.to_string());
    }
}

async fn connection(
    incoming: quinn::Incoming,
    store: SharedStore,
    charging: Option<Arc<Charging>>,
    stats: Arc<CoreStats>,
) -> Result<(), String> {
    let remote = incoming.remote_address();
    // The handshake verifies the client certificate against the operator CA.
    let conn = incoming
        .await
        .map_err(|e| format!("{remote}: handshake: {e}"))?;
    let cert = crate::quic::peer_certificate(&conn).ok_or("no client certificate")?;
    let node_id = crate::pki::node_id_of(&cert).map_err(|e| e.to_string())?;
    let key = crate::pki::ed25519_key_of(&cert).map_err(|e| e.to_string())?;
    tracing::info!(node = %node_id, %remote, "node connected");
    loop {
        let (send, recv) = match conn.accept_bi().await {
            Ok(s) => s,
            Err(quinn::ConnectionError::ApplicationClosed(_))
            | Err(quinn::ConnectionError::LocallyClosed) => return Ok(()),
            Err(e) => return Err(format!("{node_id}: {e}")),
        };
        let (store, node_id, stats) = (store.clone(), node_id.clone(), stats.clone());
        let charging = charging.clone();
        tokio::spawn(async move {
            if let Err(e) = stream(&node_id, key, send, recv, store, charging, stats).await {
                tracing::warn!(node = %node_id, error = %e, "stream ended");
            }
        });
    }
}

async fn stream(
    node_id: &str,
    key: ed25519_dalek::VerifyingKey,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    store: SharedStore,
    charging: Option<Arc<Charging>>,
    stats: Arc<CoreStats>,
) -> Result<(), String> {
    let mut dec = FrameDecoder::new();
    let mut buf = vec![0u8; 64 << 10];
    match read_frame::<EdgeFrame>(&mut recv, &mut dec, &mut buf).await? {
        Some(EdgeFrame {
            kind: Some(edge_frame::Kind::Hello(_)),
        }) => {}
        Some(EdgeFrame {
            kind: Some(edge_frame::Kind::DownlinkHello(hello)),
        }) => {
            let Some(charging) = charging else {
                // As an older core does: the box learns it has no downlink here.
                return Err("a downlink stream, and this core serves none".into());
            };
            let outbox = charging.watch.watch(node_id);
            let service = charging.service.clone();
            return downlink_stream(node_id, hello, send, recv, dec, service, outbox).await;
        }
        other => return Err(format!("expected Hello, got {other:?}")),
    }
    let settle = charging.map(|c| c.settle.clone());
    if let Some(s) = &settle {
        s.queue(node_id);
    }
    // The hash of the stored record at the position (not a fork's): the
    // edge releases its log to here only when its own record matches.
    let (cursor, at) = {
        let node = node_id.to_string();
        let store = store.clone();
        let stats = stats.clone();
        tokio::task::spawn_blocking(move || {
            store.position(&node).inspect_err(|_| {
                stats
                    .store_errors
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            })
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?
    };
    let contiguous_hash = at.map(|h| h.to_vec()).unwrap_or_default();
    let hello = CoreFrame {
        kind: Some(core_frame::Kind::Hello(CoreHello {
            contiguous_seq: cursor.contiguous_seq,
            contiguous_hash,
        })),
    };
    send.write_all(&encode_frame(&hello))
        .await
        .map_err(|e| e.to_string())?;
    // Two stages: this task reads batches and starts their checks (the
    // costly, cursor-free part: signatures), the committer places each
    // against the cursor, commits and acknowledges, in arrival order. So
    // batch n+1 is being verified while batch n commits.
    let (checks_tx, checks_rx) = tokio::sync::mpsc::channel(CHECKS_AHEAD);
    let committer = tokio::spawn(commit_in_order(
        node_id.to_string(),
        send,
        checks_rx,
        store,
        settle,
        stats,
    ));
    let read_result = async {
        while let Some(frame) = read_frame::<EdgeFrame>(&mut recv, &mut dec, &mut buf).await? {
            let Some(edge_frame::Kind::Batch(batch)) = frame.kind else {
                return Err("expected a Batch".to_string());
            };
            let batch_id = batch.batch_id;
            let node = node_id.to_string();
            let check = tokio::task::spawn_blocking(move || check_records(&node, &key, batch));
            if checks_tx.send((batch_id, check)).await.is_err() {
                break; // the committer stopped; its error is the one to report
            }
        }
        Ok(())
    }
    .await;
    drop(checks_tx);
    let commit_result = committer.await.map_err(|e| e.to_string())?;
    commit_result.and(read_result)
}

/// A box's downlink stream: what its outbox holds after `hello.applied`,
/// then grant requests answered (the grant through the outbox, a refusal at
/// once), acknowledgements recorded, and what others put in the outbox
/// sent when the instance's [`OutboxWatch`] (`outbox`) sees it.
async fn downlink_stream(
    node_id: &str,
    hello: DownlinkHello,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    mut dec: FrameDecoder,
    service: Arc<DownlinkService>,
    mut outbox: tokio::sync::watch::Receiver<u64>,
) -> Result<(), String> {
    // A box that applied more than this store ever made for it (the store
    // was restored from a backup, or moved): the numbering goes on after
    // what the box applied, or the box would take new messages for ones it
    // applied and drop them.
    let numbered = {
        let (node, store, applied) = (node_id.to_string(), service.store.clone(), hello.applied);
        tokio::task::spawn_blocking(move || {
            let last = store.downlink_last(&node)?;
            if applied > last {
                tracing::warn!(node = %node, applied, last, "the box applied more downlink messages than this store made for it (restored from a backup?): numbering goes on after the box's");
                store.downlink_raise(&node, applied)?;
            }
            Ok::<_, crate::ingest_store::IngestStoreError>(())
        })
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r.map_err(|e| e.to_string()))
    };
    if let Err(e) = numbered {
        // Reset, not finished: the box sees a failure and opens it again.
        let _ = send.reset(quinn::VarInt::from_u32(1));
        return Err(e);
    }
    let applied = hello.applied;
    tracing::info!(node = %node_id, applied, "downlink opened");
    let (frames_tx, mut frames) = tokio::sync::mpsc::channel::<EdgeFrame>(16);
    let reader = tokio::spawn(async move {
        let mut buf = vec![0u8; 16 << 10];
        loop {
            match read_frame::<EdgeFrame>(&mut recv, &mut dec, &mut buf).await {
                Ok(Some(f)) => {
                    if frames_tx.send(f).await.is_err() {
                        return Ok(());
                    }
                }
                Ok(None) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    });
    let mut sent = applied;
    // What the outbox held when the stream opened.
    if let Err(e) = flush(node_id, &mut sent, &mut send, &service).await {
        reader.abort();
        // Reset, not finished: the box sees a failure and opens it again.
        let _ = send.reset(quinn::VarInt::from_u32(1));
        return Err(e);
    }
    // A flush whose read failed is tried again, even with nothing new.
    let mut retry = tokio::time::interval(OUTBOX_RETRY);
    retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let result = loop {
        tokio::select! {
            _ = retry.tick() => {
                if *outbox.borrow() > sent {
                    if let Err(e) = flush(node_id, &mut sent, &mut send, &service).await {
                        break Err(e);
                    }
                }
            }
            frame = frames.recv() => {
                let Some(frame) = frame else { break Ok(()) };
                match frame.kind {
                    Some(edge_frame::Kind::GrantRequest(request)) => {
                        if let Some(refused) = answer(node_id, request, &service).await {
                            let frame = CoreFrame { kind: Some(core_frame::Kind::GrantRefused(refused)) };
                            if let Err(e) = send.write_all(&encode_frame(&frame)).await {
                                break Err(e.to_string());
                            }
                        }
                        if let Err(e) = flush(node_id, &mut sent, &mut send, &service).await {
                            break Err(e);
                        }
                    }
                    Some(edge_frame::Kind::DownlinkAck(ack)) => {
                        let (node, store) = (node_id.to_string(), service.store.clone());
                        let recorded = tokio::task::spawn_blocking(move || store.downlink_applied(&node, ack.seq)).await;
                        if let Ok(Err(e)) = recorded {
                            tracing::warn!(node = %node_id, error = %e, "downlink acknowledgement not recorded");
                        }
                    }
                    // A kind of a later protocol version: not this core's.
                    None => tracing::debug!(node = %node_id, "an unknown frame on the downlink, ignored"),
                    Some(other) => break Err(format!("unexpected on the downlink: {other:?}")),
                }
            }
            changed = outbox.changed() => {
                if changed.is_err() {
                    break Err("the instance's outbox watch ended".into());
                }
                let last = *outbox.borrow_and_update();
                if last > sent {
                    if let Err(e) = flush(node_id, &mut sent, &mut send, &service).await {
                        break Err(e);
                    }
                }
            }
        }
    };
    reader.abort();
    if result.is_err() {
        // Reset, not finished: the box sees a failure and opens it again.
        let _ = send.reset(quinn::VarInt::from_u32(1));
    }
    // How the box's side ended (a reset, a frame that does not decode),
    // when it ended first.
    if let Ok(Ok(Err(e))) = tokio::time::timeout(std::time::Duration::from_millis(10), reader).await
    {
        tracing::warn!(node = %node_id, error = %e, "the box's side of the downlink ended");
    }
    result
}

/// Makes the grant `request` asks for (it reaches the box through its
/// outbox), or says why not.
async fn answer(
    node_id: &str,
    request: GrantRequest,
    service: &Arc<DownlinkService>,
) -> Option<GrantRefused> {
    let refused = |code: &str, message: String| GrantRefused {
        request_id: request.request_id,
        imsi: request.imsi.clone(),
        code: code.into(),
        message,
    };
    let imsi = match mec_metering::Imsi::parse(&request.imsi) {
        Ok(i) => i,
        Err(e) => {
            return Some(refused(
                "invalid_request",
                format!("IMSI {:?}: {e}", request.imsi),
            ))
        }
    };
    let (node, service2) = (node_id.to_string(), service.clone());
    let (request_id, tokens) = (request.request_id, request.tokens);
    let model = Some(request.model.clone()).filter(|m| !m.is_empty());
    let made = tokio::task::spawn_blocking(move || {
        let now = now_ms() / 1000;
        service2.store.grant_answering(
            request_id,
            &node,
            &imsi,
            model.as_deref(),
            tokens,
            &service2.policy,
            now,
        )
    })
    .await;
    match made {
        Ok(Ok(_)) => None,
        Ok(Err(ChargingStoreError::Refused(e @ ChargingError::InsufficientQuota { .. }))) => {
            Some(refused("insufficient_quota", e.to_string()))
        }
        Ok(Err(ChargingStoreError::Refused(e @ ChargingError::UnknownSubscriber(_)))) => {
            Some(refused("unknown_subscriber", e.to_string()))
        }
        Ok(Err(ChargingStoreError::Refused(e))) => Some(refused("invalid_request", e.to_string())),
        Ok(Err(ChargingStoreError::Store(e))) => {
            tracing::error!(node = %node_id, error = %e, "grant not made: the store failed");
            Some(refused(
                "unavailable",
                "the core's store is unavailable; ask again".into(),
            ))
        }
        Err(e) => Some(refused("unavailable", e.to_string())),
    }
}

/// Sends what the node's outbox holds after `sent`, the core's time on each.
async fn flush(
    node_id: &str,
    sent: &mut u64,
    send: &mut quinn::SendStream,
    service: &Arc<DownlinkService>,
) -> Result<(), String> {
    loop {
        let (node, store, after) = (node_id.to_string(), service.store.clone(), *sent);
        let pending =
            tokio::task::spawn_blocking(move || store.downlink_after(&node, after, OUTBOX_BATCH))
                .await
                .map_err(|e| e.to_string())?;
        let pending = match pending {
            Ok(p) => p,
            Err(e) => {
                // Tried again at the next poll; the box waits, nothing lost.
                tracing::warn!(node = %node_id, error = %e, "outbox not read");
                return Ok(());
            }
        };
        let more = pending.len() == OUTBOX_BATCH;
        for mut message in pending {
            message.core_time_unix_s = now_ms() / 1000;
            *sent = message.seq;
            let frame = CoreFrame {
                kind: Some(core_frame::Kind::Downlink(message)),
            };
            send.write_all(&encode_frame(&frame))
                .await
                .map_err(|e| e.to_string())?;
        }
        if !more {
            return Ok(());
        }
    }
}

/// Batches whose checks may run ahead of the commit.
const CHECKS_AHEAD: usize = 2;

type PendingCheck = (u64, tokio::task::JoinHandle<CheckedBatch>);

/// Commits checked batches in arrival order and acknowledges each once its
/// transaction is durable.
async fn commit_in_order(
    node: String,
    mut send: quinn::SendStream,
    mut checks: tokio::sync::mpsc::Receiver<PendingCheck>,
    store: SharedStore,
    settle: Option<SettleQueue>,
    stats: Arc<CoreStats>,
) -> Result<(), String> {
    use std::sync::atomic::Ordering::Relaxed;
    while let Some((batch_id, check)) = checks.recv().await {
        let checked = check.await.map_err(|e| e.to_string())?;
        let (node_id, store, stats) = (node.clone(), store.clone(), stats.clone());
        let ack = tokio::task::spawn_blocking(move || -> Result<Ack, String> {
            let node = node_id;
            // Placed against the cursor and committed in one transaction,
            // the cursor locked: no other instance moves it in between.
            let v = store.ingest(&node, checked, now_ms()).map_err(|e| {
                stats.store_errors.fetch_add(1, Relaxed);
                tracing::error!(node = %node, error = %e, "batch not committed (not acknowledged: the node sends it again)");
                e.to_string()
            })?;
            stats.batches.fetch_add(1, Relaxed);
            stats.records.fetch_add(v.accepted.len() as u64, Relaxed);
            stats.duplicates.fetch_add(v.duplicates, Relaxed);
            stats.quarantined.fetch_add(v.quarantined.len() as u64, Relaxed);
            for q in &v.quarantined {
                if q.fork {
                    tracing::error!(node = %node, seq = ?q.seq, "ALARM: fork: the node sent another record at a seq the core holds (kept aside; see core-ingest audit)");
                } else {
                    tracing::warn!(node = %node, seq = ?q.seq, reason = %q.reason, "record quarantined");
                }
            }
            for (first, last) in &v.lost_by_core {
                tracing::error!(node = %node, first, last, "ALARM: records the core had acknowledged are lost (the core was restored from a backup?); the node had deleted them");
            }
            Ok(Ack {
                batch_id,
                contiguous_seq: v.cursor.contiguous_seq,
                duplicates: v.duplicates,
                quarantined: v.quarantined.iter().filter(|q| !q.fork).count() as u64,
                forks: v.forks,
            })
        })
        .await
        .map_err(|e| e.to_string())??;
        let frame = CoreFrame {
            kind: Some(core_frame::Kind::Ack(ack)),
        };
        send.write_all(&encode_frame(&frame))
            .await
            .map_err(|e| e.to_string())?;
        if let Some(s) = &settle {
            s.queue(&node);
        }
    }
    let _ = send.finish();
    Ok(())
}

/// Resolves once `rx` holds true (the guard is not kept across awaits).
pub(crate) async fn stopped(rx: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

/// A core-ingest running in this process on a loopback port: for tests and
/// demos of the upload. `start` makes a fresh dev CA and a SQLite store;
/// `start_on` serves a store it is given (PostgreSQL, shared with other
/// instances) under a CA it is given, as a second instance of one core.
pub struct LoopbackCore<S: ?Sized = crate::ingest_store::SqliteStore> {
    /// Its UDP address.
    pub addr: std::net::SocketAddr,
    /// The operator CA (issue node certificates with it).
    pub ca: crate::pki::CertAndKey,
    /// The store.
    pub store: Arc<S>,
    /// What it has done (its `/metrics`).
    pub stats: Arc<CoreStats>,
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

/// Starts serving `store` on a loopback port with a server certificate of
/// `ca`, counting into `stats`.
fn launch(
    store: SharedStore,
    downlink: Option<Arc<DownlinkService>>,
    ca: &crate::pki::CertAndKey,
    stats: Arc<CoreStats>,
) -> Result<
    (
        std::net::SocketAddr,
        tokio::sync::watch::Sender<bool>,
        tokio::task::JoinHandle<()>,
    ),
    String,
> {
    let server = crate::pki::issue_server_cert(ca, &["localhost".into(), "127.0.0.1".into()])
        .map_err(|e| e.to_string())?;
    let endpoint = crate::quic::server_endpoint(
        "127.0.0.1:0".parse().expect("an address"),
        &server.cert_pem,
        &server.key_pem,
        &ca.cert_pem,
        "",
        &crate::quic::TransportOptions::default(),
    )
    .map_err(|e| e.to_string())?;
    let addr = endpoint.local_addr().map_err(|e| e.to_string())?;
    let (stop, rx) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(serve_counted(endpoint, store, downlink, stats, rx));
    Ok((addr, stop, task))
}

impl LoopbackCore {
    /// Starts one with its store at `store_path` (inside a tokio runtime).
    pub fn start(store_path: &std::path::Path) -> Result<LoopbackCore, String> {
        LoopbackCore::start_with_policy(store_path, GrantPolicy::default())
    }

    /// [`LoopbackCore::start`], cutting grants by `policy`.
    pub fn start_with_policy(
        store_path: &std::path::Path,
        policy: GrantPolicy,
    ) -> Result<LoopbackCore, String> {
        let ca = crate::pki::generate_ca("loopback operator CA").map_err(|e| e.to_string())?;
        let store = Arc::new(
            crate::ingest_store::SqliteStore::open(store_path).map_err(|e| e.to_string())?,
        );
        let stats = Arc::new(CoreStats::default());
        // The SQLite store keeps packages and grants too: this core serves
        // the downlink, with the default grant policy.
        let downlink = Arc::new(DownlinkService {
            store: store.clone(),
            policy,
        });
        let (addr, stop, task) = launch(store.clone(), Some(downlink), &ca, stats.clone())?;
        Ok(LoopbackCore {
            addr,
            ca,
            store,
            stats,
            stop,
            task,
        })
    }
}

impl LoopbackCore<dyn IngestStore> {
    /// Starts one serving `store` under `ca` (inside a tokio runtime).
    pub fn start_on(
        store: SharedStore,
        ca: crate::pki::CertAndKey,
    ) -> Result<LoopbackCore<dyn IngestStore>, String> {
        let stats = Arc::new(CoreStats::default());
        let (addr, stop, task) = launch(store.clone(), None, &ca, stats.clone())?;
        Ok(LoopbackCore {
            addr,
            ca,
            store,
            stats,
            stop,
            task,
        })
    }
}

impl<S: ?Sized> LoopbackCore<S> {
    /// Stops it and waits until it has.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}
