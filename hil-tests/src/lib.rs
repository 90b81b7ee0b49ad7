//! End-to-end tests over real processes: the stack's own binaries
//! (`core-ingest`, `edge-agent`, `edgeprov`), loopback QUIC through a UDP
//! relay that cuts and spoils the link, a box provisioned over a
//! pseudo-terminal line, processes killed with SIGKILL. With the `MEC_HIL_*`
//! variables (see `README.md`) the same scenarios aim at a real box.
//!
//! The library holds the parts the tests share, each testable alone:
//! - [`procs`]: finding the binaries and the model, child processes with a
//!   ready line, SIGKILL/SIGTERM;
//! - [`stack`]: core-ingest, provisioning, the edge agent and its admin API;
//! - [`relay`]: the backhaul as a UDP relay (up, cut, lossy);
//! - [`load`]: a fixed plan of apps' requests and what each client saw;
//! - [`reconcile`]: the bill against what the clients saw (pure checks);
//! - [`target`]: loopback or hardware, from the environment.
//!
//! `src/bin/log-append-loop.rs` is the writer the log's kill test SIGKILLs.
#![warn(missing_docs)]

pub mod load;
pub mod procs;
pub mod qemu;
pub mod reconcile;
pub mod relay;
pub mod stack;
pub mod target;

/// The fixed node key of the kill test's writer (a test key, never a real one).
pub const KILL_TEST_KEY: [u8; 32] = [42u8; 32];
