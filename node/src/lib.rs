//! A box's identity, in one place that the agent, provisioning and the
//! sync stack share without linking each other:
//!
//! * [`identity`]: the node's Ed25519 key pair on disk (made on the box,
//!   never leaving it), which signs usage records and authenticates the box
//!   in TLS;
//! * [`pki`]: the operator PKI around it (the CA, node certificates binding
//!   a node id to that key, the core's certificate, the CRL);
//! * [`state`]: the names of the files in a box's state directory.
#![warn(missing_docs)]

pub mod identity;
pub mod pki;
pub mod state;
