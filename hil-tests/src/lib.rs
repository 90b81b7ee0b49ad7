//! End-to-end tests over real processes (issue 7 grows them).
//!
//! The tests in `tests/` run real binaries: today the usage log's writer
//! (`src/bin/log-append-loop.rs`) killed with SIGKILL mid-append; later
//! core-ingest and the edge agent over loopback QUIC, a box provisioned over a
//! pty pair, injected faults. With hardware variables set they will aim at
//! real hardware; without, they use ptys and loopback and say so.
#![warn(missing_docs)]

/// The fixed node key of the kill test's writer (a test key, never a real one).
pub const KILL_TEST_KEY: [u8; 32] = [42u8; 32];
