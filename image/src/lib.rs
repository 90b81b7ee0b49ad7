//! The appliance image recipe (issue 8, not built yet).
//!
//! This crate will build the bootable disk of an edge box from the
//! workspace's release binaries: root filesystem, systemd units, default
//! configuration, the model, and a manifest of SHA-256 hashes that
//! `edgeprov flash` verifies against.
#![warn(missing_docs)]
