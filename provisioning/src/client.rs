//! The technician's end: requests with ids, a timeout per attempt, and
//! retries. A retry resends the same request with the same id, so the box
//! answers it from memory if the first copy got through and only the answer
//! was lost: every request is safe to repeat.

use std::time::Duration;

use prost::Message;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::frame::{encode_frame, FrameDecoder, FrameEvent, FrameStats};
use crate::pb::{request, response, ErrorCode, Hello, HelloReply, Request, Response};
use crate::PROTOCOL_VERSION;

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No answer after every attempt.
    #[error("no answer from the box after {attempts} attempts of {timeout:?} each (is the cable on {port}, and provision-listen running?)")]
    NoAnswer {
        /// Attempts made.
        attempts: u32,
        /// Per attempt.
        timeout: Duration,
        /// The port.
        port: String,
    },
    /// The box refused.
    #[error("the box refused ({code:?}): {message}")]
    Refused {
        /// Its code.
        code: ErrorCode,
        /// Its message.
        message: String,
    },
    /// The box answered something else than the request calls for.
    #[error("unexpected answer: {0}")]
    Unexpected(String),
    /// The line failed.
    #[error("serial line: {0}")]
    Io(#[from] std::io::Error),
}

/// Timeouts and retries.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Wait for an answer this long per attempt.
    pub timeout: Duration,
    /// Attempts per request.
    pub attempts: u32,
    /// The port's name, for messages.
    pub port_name: String,
}

impl Default for ClientOptions {
    fn default() -> ClientOptions {
        ClientOptions {
            timeout: Duration::from_secs(2),
            attempts: 5,
            port_name: "the port".into(),
        }
    }
}

/// A provisioning session with one box.
pub struct Client<S> {
    port: S,
    dec: FrameDecoder,
    next_id: u64,
    options: ClientOptions,
    /// The box's answer to Hello, once a session is open.
    pub session: Option<HelloReply>,
    retries: u64,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Client<S> {
    /// A client on `port`. Request ids start at a random point, so that a
    /// box never mistakes a new run's request for an old one it remembers.
    pub fn new(port: S, options: ClientOptions) -> Client<S> {
        let mut seed = [0u8; 8];
        let _ = getrandom::fill(&mut seed);
        Client {
            port,
            dec: FrameDecoder::new(),
            next_id: (u64::from_le_bytes(seed) >> 1).max(1),
            options,
            session: None,
            retries: 0,
        }
    }

    /// Opens a session: version negotiation and what the box says of itself.
    pub async fn hello(&mut self) -> Result<HelloReply, ClientError> {
        let kind = request::Kind::Hello(Hello {
            min_version: PROTOCOL_VERSION,
            max_version: PROTOCOL_VERSION,
            client: format!("edgeprov {}", env!("CARGO_PKG_VERSION")),
        });
        match self.exchange(kind).await? {
            response::Kind::Hello(h) => {
                self.session = Some(h.clone());
                Ok(h)
            }
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Sends a request and returns the box's answer; a refusal is an error.
    /// Opens the session first when needed (and again if the box restarted).
    pub async fn call(&mut self, kind: request::Kind) -> Result<response::Kind, ClientError> {
        if self.session.is_none() {
            self.hello().await?;
        }
        match self.exchange(kind.clone()).await {
            Err(ClientError::Refused {
                code: ErrorCode::NoSession,
                ..
            }) => {
                self.hello().await?;
                self.exchange(kind).await
            }
            other => other,
        }
    }

    /// Frames and counters: retries made, and what the decoder discarded.
    pub fn stats(&self) -> (u64, FrameStats) {
        (self.retries, self.dec.stats())
    }

    async fn exchange(&mut self, kind: request::Kind) -> Result<response::Kind, ClientError> {
        let id = self.next_id;
        self.next_id += 1;
        let payload = Request {
            id,
            kind: Some(kind),
        }
        .encode_to_vec();
        let frame = encode_frame(&payload).map_err(|e| ClientError::Unexpected(e.to_string()))?;
        for attempt in 0..self.options.attempts {
            if attempt > 0 {
                self.retries += 1;
                tracing::debug!(id, attempt, "no answer yet; sending again");
            }
            self.port.write_all(&frame).await?;
            self.port.flush().await?;
            let deadline = tokio::time::Instant::now() + self.options.timeout;
            if let Some(answer) = self.answer_to(id, deadline).await? {
                return match answer.kind {
                    Some(response::Kind::Error(e)) => Err(ClientError::Refused {
                        code: ErrorCode::try_from(e.code).unwrap_or(ErrorCode::Unspecified),
                        message: e.message,
                    }),
                    Some(kind) => Ok(kind),
                    None => Err(ClientError::Unexpected("an empty answer".into())),
                };
            }
        }
        Err(ClientError::NoAnswer {
            attempts: self.options.attempts,
            timeout: self.options.timeout,
            port: self.options.port_name.clone(),
        })
    }

    /// Reads until the answer to `id` arrives or `deadline` passes; answers
    /// to other ids (late answers to earlier attempts) are skipped.
    async fn answer_to(
        &mut self,
        id: u64,
        deadline: tokio::time::Instant,
    ) -> Result<Option<Response>, ClientError> {
        let mut buf = [0u8; 4096];
        loop {
            while let Some(event) = self.dec.next_event() {
                if let FrameEvent::Frame(p) = event {
                    match Response::decode(p.as_slice()) {
                        Ok(r) if r.id == id => return Ok(Some(r)),
                        Ok(_) | Err(_) => {}
                    }
                }
            }
            match tokio::time::timeout_at(deadline, self.port.read(&mut buf)).await {
                Err(_) => return Ok(None),
                Ok(Ok(0)) => {
                    return Err(ClientError::Io(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "the line closed",
                    )))
                }
                Ok(Ok(n)) => self.dec.push(&buf[..n]),
                Ok(Err(e)) => return Err(e.into()),
            }
        }
    }
}
