//! The edge agent of a MEC appliance.
//!
//! Today it carries the operator commands for the usage log (`edge-agent log
//! verify|dump|bench|salvage`) and local generation (`edge-agent generate`). Later issues add the MEC API, metering, the
//! wiring of inference and sync, and systemd integration.
#![warn(missing_docs)]

pub mod bench_inference_cmd;
pub mod cli;
pub mod generate_cmd;
pub mod log_cmd;
