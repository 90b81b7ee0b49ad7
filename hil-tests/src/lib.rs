//! End-to-end tests over real processes (issue 7 grows them).
//!
//! The tests in `tests/` run the workspace's real binaries: the usage log's
//! writer killed with SIGKILL mid-append, and later core-ingest and the edge
//! agent over loopback QUIC, a box provisioned over a pty pair, injected
//! faults. With hardware variables set they aim at real hardware; without,
//! they use ptys and loopback and say so.
#![warn(missing_docs)]
