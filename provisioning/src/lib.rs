//! Field provisioning (issue 6, not built yet).
//!
//! This crate will hold the serial provisioning protocol as a sans-IO codec
//! (framing with CRC and resynchronisation, protobuf messages, version
//! negotiation), its device end (run by `edge-agent provision-listen` through
//! tokio-serial) and its technician end, the `edgeprov` CLI: provisioning a
//! box over a serial console, the offline operator CA, and verified flashing.
#![warn(missing_docs)]
