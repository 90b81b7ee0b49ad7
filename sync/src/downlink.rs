//! The box's side of the downlink (`sync.proto`, version 3): a second
//! stream of the upload's connection on which the core sends grants and
//! revocations, and the box asks for grants.
//!
//! The box applies each message durably before it acknowledges it (a
//! [`DownlinkSink`], the agent's ledger store), so a message acknowledged
//! is never lost and one not acknowledged comes again; the sink applies a
//! message twice as once (by its seq). Questions ([`GrantAsker::ask`]) go
//! out on the stream while it is up and are answered by the grant itself
//! (a Downlink message naming the question) or by a refusal.
//!
//! [`run`] serves one connection's downlink; the uploader starts it on each
//! connection it makes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use crate::core_server::read_frame;
use crate::wire::pb::{
    self, core_frame, edge_frame, CoreFrame, DownlinkAck, DownlinkHello, EdgeFrame, GrantRequest,
};
use crate::wire::{encode_frame, FrameDecoder};

/// Where the box keeps what the downlink brings (the agent's ledger).
pub trait DownlinkSink: Send + Sync + 'static {
    /// Every message at or below this is applied durably.
    fn applied(&self) -> u64;
    /// Applies `message` durably, once by its seq (one applied before is
    /// not applied again); blocking. An error leaves it unacknowledged:
    /// the core sends it again on the next connection.
    fn apply(&self, message: &pb::Downlink) -> Result<(), String>;
}

/// What downlink message `m` says, in the grant cache's terms (one
/// reading for every sink). A grant for an IMSI that does not parse is
/// logged and read as a kind this box does not know (acknowledged, never
/// applied).
pub fn received(m: &pb::Downlink) -> mec_metering::grants::Received {
    use mec_metering::grants::{GrantTerms, Received};
    match &m.kind {
        Some(pb::downlink::Kind::Grant(g)) => match mec_metering::Imsi::parse(&g.imsi) {
            Ok(imsi) => Received::Grant(GrantTerms {
                grant_id: g.grant_id,
                imsi,
                model: Some(g.model.clone()).filter(|m| !m.is_empty()),
                tokens: g.tokens.min(i64::MAX as u64),
                threshold: g.threshold,
                offline_allowance: g.offline_allowance.min(i64::MAX as u64),
                final_unit_models: g.final_unit_models.clone(),
                valid_for_s: g.expires_at_unix_s.saturating_sub(m.core_time_unix_s),
            }),
            Err(e) => {
                tracing::error!(seq = m.seq, imsi = %g.imsi, error = %e, "the core sent a grant for an IMSI that does not parse; ignored");
                Received::Unknown
            }
        },
        Some(pb::downlink::Kind::Revoked(r)) => Received::Revoked {
            grant_id: r.grant_id,
        },
        None => Received::Unknown,
    }
}

/// How the core answered a question.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GrantAnswer {
    /// The grant arrived (and is applied): its id.
    Granted(u64),
    /// Refused: `sync.proto`'s code (insufficient_quota,
    /// unknown_subscriber, invalid_request, unavailable) and why.
    Refused {
        /// The code.
        code: String,
        /// The core's words.
        message: String,
    },
}

/// Why a question got no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AskError {
    /// No downlink is up (no connection to the core, or a core that
    /// serves none).
    #[error("the core cannot be reached")]
    NotConnected,
    /// No answer in time (it may still come: a grant answering it later
    /// is applied all the same).
    #[error("the core did not answer within {0:?}")]
    TimedOut(Duration),
}

/// The downlink as the admin API and the metrics show it.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct DownlinkStatus {
    /// A downlink stream is up.
    pub connected: bool,
    /// Every message at or below this is applied.
    pub applied_seq: u64,
    /// Seconds since the last message from the core on the downlink.
    pub last_message_age_s: Option<u64>,
    /// Why the last downlink ended, when one did.
    pub last_error: Option<String>,
}

/// A question waiting for its answer: who it is for, and where the answer
/// goes.
struct Waiting {
    imsi: String,
    answer: oneshot::Sender<GrantAnswer>,
}

struct Shared {
    next_request: AtomicU64,
    waiting: Mutex<HashMap<u64, Waiting>>,
    /// Where questions go while a downlink is up, and which downlink (its
    /// generation) set it: only that one clears it when it ends.
    outgoing: Mutex<(u64, Option<mpsc::UnboundedSender<GrantRequest>>)>,
    generation: AtomicU64,
    connected: std::sync::atomic::AtomicBool,
    applied: AtomicU64,
    last_message: Mutex<Option<Instant>>,
    last_error: Mutex<Option<String>>,
}

impl Default for Shared {
    fn default() -> Shared {
        Shared {
            // Random, so that an answer to a question of an earlier process
            // (a grant made before a crash, delivered after) never matches
            // a question of this one.
            next_request: AtomicU64::new(rand::random::<u64>() >> 2),
            waiting: Mutex::default(),
            outgoing: Mutex::default(),
            generation: AtomicU64::default(),
            connected: Default::default(),
            applied: AtomicU64::default(),
            last_message: Mutex::default(),
            last_error: Mutex::default(),
        }
    }
}

/// Asks the core for grants over whichever downlink is up. Cheap to clone.
#[derive(Clone, Default)]
pub struct GrantAsker {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for GrantAsker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrantAsker")
            .field("connected", &self.connected())
            .finish_non_exhaustive()
    }
}

impl GrantAsker {
    /// Not connected until [`run`] serves a downlink with it.
    pub fn new() -> GrantAsker {
        GrantAsker::default()
    }

    /// A downlink is up: the core can be asked.
    pub fn connected(&self) -> bool {
        self.shared.connected.load(Ordering::Acquire)
    }

    /// Asks for `tokens` (0: the core's usual slice) of `imsi`'s balance,
    /// for `model`, and waits up to `timeout` for the answer.
    pub async fn ask(
        &self,
        imsi: &str,
        model: &str,
        tokens: u64,
        timeout: Duration,
    ) -> Result<GrantAnswer, AskError> {
        // Ids unique for the process's life; a grant answering an id the
        // box no longer waits for is applied all the same.
        let request_id = self.shared.next_request.fetch_add(1, Ordering::Relaxed) + 1;
        let (tx, rx) = oneshot::channel();
        self.shared.waiting.lock().unwrap().insert(
            request_id,
            Waiting {
                imsi: imsi.to_string(),
                answer: tx,
            },
        );
        let sent = self
            .shared
            .outgoing
            .lock()
            .unwrap()
            .1
            .as_ref()
            .is_some_and(|out| {
                out.send(GrantRequest {
                    request_id,
                    imsi: imsi.to_string(),
                    model: model.to_string(),
                    tokens,
                })
                .is_ok()
            });
        if !sent {
            self.shared.waiting.lock().unwrap().remove(&request_id);
            return Err(AskError::NotConnected);
        }
        let answer = tokio::time::timeout(timeout, rx).await;
        self.shared.waiting.lock().unwrap().remove(&request_id);
        match answer {
            Ok(Ok(a)) => Ok(a),
            // The downlink ended under the question.
            Ok(Err(_)) => Err(AskError::NotConnected),
            Err(_) => Err(AskError::TimedOut(timeout)),
        }
    }

    /// The downlink's state.
    pub fn status(&self) -> DownlinkStatus {
        DownlinkStatus {
            connected: self.connected(),
            applied_seq: self.shared.applied.load(Ordering::Acquire),
            last_message_age_s: self
                .shared
                .last_message
                .lock()
                .unwrap()
                .map(|t| t.elapsed().as_secs()),
            last_error: self.shared.last_error.lock().unwrap().clone(),
        }
    }

    /// Routes an answer to its question, when it is this process's and
    /// for the same subscriber.
    fn answer(&self, request_id: u64, imsi: &str, answer: GrantAnswer) {
        let mut waiting = self.shared.waiting.lock().unwrap();
        if waiting.get(&request_id).is_some_and(|w| w.imsi == imsi) {
            if let Some(w) = waiting.remove(&request_id) {
                let _ = w.answer.send(answer);
            }
        }
    }

    /// A downlink is up: questions go to `out` until downlink
    /// `generation` ends.
    fn connected_as(&self, generation: u64, out: mpsc::UnboundedSender<GrantRequest>) {
        *self.shared.outgoing.lock().unwrap() = (generation, Some(out));
        self.shared.connected.store(true, Ordering::Release);
    }

    /// Downlink `generation` ended: questions out get no answer from it.
    /// A later downlink, up already, is left alone.
    fn disconnected(&self, generation: u64) {
        let mut outgoing = self.shared.outgoing.lock().unwrap();
        if outgoing.0 != generation {
            return;
        }
        *outgoing = (generation, None);
        self.shared.connected.store(false, Ordering::Release);
        // Dropping the senders ends each waiting question (NotConnected).
        self.shared.waiting.lock().unwrap().clear();
    }
}

/// Serves the downlink of `conn` until it ends: opens the stream with the
/// sink's applied seq, applies and acknowledges what the core sends,
/// sends the asker's questions and routes the answers. Returns why it
/// ended (`Ok` when the core ended it cleanly, as an older core that
/// serves no downlink does at once).
pub async fn run(
    conn: quinn::Connection,
    sink: Arc<dyn DownlinkSink>,
    asker: GrantAsker,
) -> Result<(), String> {
    // However it ends (an error, or the uploader aborting it with its
    // connection), the questions out are told and no new one goes out.
    let generation = asker.shared.generation.fetch_add(1, Ordering::AcqRel) + 1;
    let _down = DisconnectOnDrop(asker.clone(), generation);
    let result = serve(&conn, &sink, &asker, generation).await;
    if let Err(e) = &result {
        *asker.shared.last_error.lock().unwrap() = Some(e.clone());
    }
    result
}

struct DisconnectOnDrop(GrantAsker, u64);

impl Drop for DisconnectOnDrop {
    fn drop(&mut self) {
        self.0.disconnected(self.1);
    }
}

async fn serve(
    conn: &quinn::Connection,
    sink: &Arc<dyn DownlinkSink>,
    asker: &GrantAsker,
    generation: u64,
) -> Result<(), String> {
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    let applied = {
        let sink = sink.clone();
        tokio::task::spawn_blocking(move || sink.applied())
            .await
            .map_err(|e| e.to_string())?
    };
    asker.shared.applied.store(applied, Ordering::Release);
    let hello = EdgeFrame {
        kind: Some(edge_frame::Kind::DownlinkHello(DownlinkHello { applied })),
    };
    send.write_all(&encode_frame(&hello))
        .await
        .map_err(|e| e.to_string())?;
    let (out_tx, mut out_rx) = mpsc::unbounded_channel::<GrantRequest>();
    asker.connected_as(generation, out_tx);
    tracing::info!(applied, "downlink open");
    // Frames are read by a task of their own, so that sending a question
    // never interrupts a read.
    let (frames_tx, mut frames) = mpsc::channel::<Result<CoreFrame, String>>(16);
    let reader = tokio::spawn(async move {
        let mut dec = FrameDecoder::new();
        let mut buf = vec![0u8; 16 << 10];
        loop {
            let frame = read_frame::<CoreFrame>(&mut recv, &mut dec, &mut buf).await;
            let end = !matches!(frame, Ok(Some(_)));
            if frames_tx
                .send(frame.and_then(|f| f.ok_or_else(String::new)))
                .await
                .is_err()
                || end
            {
                return;
            }
        }
    });
    let _reader = AbortOnDrop(reader);
    loop {
        tokio::select! {
            frame = frames.recv() => {
                let frame = match frame {
                    Some(Ok(f)) => f,
                    // The core finished its side: a clean end.
                    Some(Err(e)) if e.is_empty() => return Ok(()),
                    Some(Err(e)) => return Err(e),
                    None => return Ok(()),
                };
                *asker.shared.last_message.lock().unwrap() = Some(Instant::now());
                match frame.kind {
                    Some(core_frame::Kind::Downlink(message)) => {
                        let seq = message.seq;
                        let answers = match &message.kind {
                            Some(pb::downlink::Kind::Grant(g)) if g.request_id != 0 => {
                                Some((g.request_id, g.imsi.clone(), g.grant_id))
                            }
                            _ => None,
                        };
                        let sink = sink.clone();
                        tokio::task::spawn_blocking(move || sink.apply(&message))
                            .await
                            .map_err(|e| e.to_string())?
                            .map_err(|e| format!("downlink message {seq} not applied: {e}"))?;
                        asker.shared.applied.fetch_max(seq, Ordering::AcqRel);
                        let ack = EdgeFrame {
                            kind: Some(edge_frame::Kind::DownlinkAck(DownlinkAck { seq })),
                        };
                        send.write_all(&encode_frame(&ack))
                            .await
                            .map_err(|e| e.to_string())?;
                        if let Some((request_id, imsi, grant_id)) = answers {
                            asker.answer(request_id, &imsi, GrantAnswer::Granted(grant_id));
                        }
                    }
                    Some(core_frame::Kind::GrantRefused(r)) => {
                        asker.answer(r.request_id, &r.imsi, GrantAnswer::Refused {
                            code: r.code,
                            message: r.message,
                        });
                    }
                    // A kind of a later protocol version: not this box's.
                    None => tracing::debug!("an unknown frame on the downlink, ignored"),
                    Some(other) => return Err(format!("unexpected on the downlink: {other:?}")),
                }
            }
            Some(question) = out_rx.recv() => {
                let frame = EdgeFrame {
                    kind: Some(edge_frame::Kind::GrantRequest(question)),
                };
                send.write_all(&encode_frame(&frame))
                    .await
                    .map_err(|e| e.to_string())?;
            }
        }
    }
}

/// Aborts a task when dropped (the downlink's reader ends with it).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
