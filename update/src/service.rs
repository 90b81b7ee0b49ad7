//! The privileged update service's protocol: the agent runs unprivileged,
//! so its admin API asks a root helper to apply a bundle. systemd accepts
//! each connection on a socket only root and the agent's group can open
//! (`Accept=yes`) and starts the helper with the connection as its stdin
//! and stdout; [`serve_one`] is that helper's whole job, over any reader
//! and writer, so tests drive it with buffers.
//!
//! One request line, JSON, at most [`MAX_REQUEST_BYTES`]:
//! `{"op": "status"}` or
//! `{"op": "apply", "bundle": "/path", "allow_downgrade": false, "retry_failed": false}`.
//! Replies are JSON lines: zero or more `{"event": "progress", ...}`, then
//! exactly one of `status`, `applied`, `refused` (nothing written) or
//! `error`.

use std::io::{BufRead, Write};
use std::path::PathBuf;

use ed25519_dalek::VerifyingKey;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::apply::{self, BoxPaths, UpdateError};
use crate::boot::ApplyOptions;

/// The longest request line read.
pub const MAX_REQUEST_BYTES: u64 = 64 * 1024;

/// A request to the update service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// The slots. (A struct variant, so unknown fields are refused:
    /// serde ignores them on a unit variant of a tagged enum.)
    Status {},
    /// Apply a bundle on the box's filesystem.
    Apply {
        /// The bundle's path (a file or a block device).
        bundle: PathBuf,
        /// See [`ApplyOptions::allow_downgrade`].
        #[serde(default)]
        allow_downgrade: bool,
        /// See [`ApplyOptions::retry_failed`].
        #[serde(default)]
        retry_failed: bool,
    },
}

/// How the request ended (also written as the last reply line).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Status given, or bundle applied.
    Done,
    /// The bundle was refused; nothing was written.
    Refused,
    /// A bad request, or a failure.
    Error,
}

fn reply(out: &mut dyn Write, v: serde_json::Value) -> std::io::Result<()> {
    writeln!(out, "{v}")?;
    out.flush()
}

/// Reads one request from `input`, carries it out on the box at `paths`,
/// and writes the replies to `output`. `operator_key` gives the key that
/// bundles must be signed with (the one installed at provisioning), or
/// why there is none.
pub fn serve_one(
    paths: &BoxPaths,
    operator_key: impl FnOnce() -> Result<VerifyingKey, String>,
    input: impl BufRead,
    output: &mut dyn Write,
) -> std::io::Result<Outcome> {
    let mut line = String::new();
    let n = input.take(MAX_REQUEST_BYTES + 1).read_line(&mut line)?;
    if n as u64 > MAX_REQUEST_BYTES {
        reply(
            output,
            json!({ "event": "error", "message": format!("request over {MAX_REQUEST_BYTES} bytes") }),
        )?;
        return Ok(Outcome::Error);
    }
    let request: Request = match serde_json::from_str(line.trim()) {
        Ok(r) => r,
        Err(e) => {
            reply(
                output,
                json!({ "event": "error", "message": format!("bad request: {e}") }),
            )?;
            return Ok(Outcome::Error);
        }
    };
    run(paths, operator_key, request, output)
}

/// Carries out a parsed request and writes its replies (the service after
/// parsing; `edge-agent update apply` calls it with its own arguments).
pub fn run(
    paths: &BoxPaths,
    operator_key: impl FnOnce() -> Result<VerifyingKey, String>,
    request: Request,
    output: &mut dyn Write,
) -> std::io::Result<Outcome> {
    match request {
        Request::Status {} => match apply::status(paths) {
            Ok(s) => {
                reply(output, json!({ "event": "status", "status": s }))?;
                Ok(Outcome::Done)
            }
            Err(e) => {
                reply(
                    output,
                    json!({ "event": "error", "message": e.to_string() }),
                )?;
                Ok(Outcome::Error)
            }
        },
        Request::Apply {
            bundle,
            allow_downgrade,
            retry_failed,
        } => {
            let key = match operator_key() {
                Ok(k) => k,
                Err(why) => {
                    reply(output, json!({ "event": "refused", "reason": why }))?;
                    return Ok(Outcome::Refused);
                }
            };
            let opts = ApplyOptions {
                allow_downgrade,
                retry_failed,
            };
            // Progress lines go out as they come; a client that went away
            // does not stop the apply (its steps are safe to finish).
            let mut write_failed = None;
            let result = apply::apply(paths, &bundle, &key, opts, &mut |p| {
                if write_failed.is_none() {
                    if let Err(e) = reply(
                        output,
                        json!({ "event": "progress", "stage": p.stage, "done": p.done, "total": p.total }),
                    ) {
                        write_failed = Some(e);
                    }
                }
            });
            let (line, outcome) = match result {
                Ok(applied) => (
                    json!({ "event": "applied", "applied": applied }),
                    Outcome::Done,
                ),
                Err(e @ (UpdateError::Refused(_) | UpdateError::Bundle(_) | UpdateError::Busy)) => {
                    (
                        json!({ "event": "refused", "reason": e.to_string() }),
                        Outcome::Refused,
                    )
                }
                Err(e) => (
                    json!({ "event": "error", "message": e.to_string() }),
                    Outcome::Error,
                ),
            };
            match write_failed {
                Some(e) => Err(e),
                None => reply(output, line).map(|()| outcome),
            }
        }
    }
}
