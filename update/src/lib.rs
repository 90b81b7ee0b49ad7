//! A/B updates of the appliance (issue 9), in the manner of RAUC and
//! systemd-sysupdate, on the disk `mec-image` lays out:
//!
//! - [`bundle`]: the update bundle, a tar of a signed manifest, the kernel,
//!   the initrd and the root filesystem (zstd); written by `cargo xtask
//!   image`, checked against the operator's image key installed at
//!   provisioning, never a key the bundle carries;
//! - [`boot`] (sans-IO): systemd-boot's loader entries with their boot
//!   counters, the order systemd-boot boots them in, each slot's state, and
//!   the decision whether a bundle may be applied;
//! - [`health`] (sans-IO): when a boot counts as good (ready for a while,
//!   without a break);
//! - [`apply`]: the steps on a box, ordered so that a power cut at any point
//!   leaves the running slot the one that boots;
//! - [`service`]: the root helper's protocol (one JSON request, JSON-line
//!   replies), for the unprivileged agent's admin API.

pub mod apply;
pub mod boot;
pub mod bundle;
pub mod health;
pub mod service;
