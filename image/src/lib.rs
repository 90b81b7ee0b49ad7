//! The appliance image (issue 8): a bootable GPT disk with the whole stack.
//!
//! - [`layout`]: the partitions (ESP, root A, root B, data), fixed ids, the
//!   `sfdisk` script. Sans-IO.
//! - [`files`]: what the image adds to the Debian base: the agent's
//!   configuration, the systemd units, mounts, network, loader entries.
//! - [`manifest`]: the signed manifest (disk, partitions, files, packages).
//! - [`build`]: the steps, driving debootstrap, mke2fs, mkfs.fat, mtools,
//!   sfdisk and qemu-img. No loop devices and no mounts (they fail in
//!   containers). `cargo xtask image` runs it.
#![warn(missing_docs)]

pub mod build;
pub mod files;
pub mod layout;
pub mod manifest;
