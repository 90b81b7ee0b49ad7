//! Field provisioning over a serial console.
//!
//! * [`frame`]: the framing on the line (COBS, CRC-32C, 0x00 delimiter),
//!   sans-IO, with resynchronisation after noise;
//! * [`pb`]: the messages (`proto/provision.proto`): requests with ids,
//!   answers, version negotiation;
//! * [`device`]: the box's end, acting on the agent's state directory (run
//!   by `edge-agent provision-listen` through [`serial`]);
//! * [`client`]: the technician's end, with timeouts and retries (safe:
//!   the box answers a repeated request id with its first answer);
//! * [`ca`]: the offline operator CA (`edgeprov ca`); [`cert`]: certificate
//!   checks on the box; [`site`]: the site configuration;
//! * [`pty`]: a serial line of two pseudo-terminals and a relay that can
//!   spoil bytes (development, tests, `edgeprov pty-line`);
//! * [`flash`]: writing a disk image and reading it back (`edgeprov flash`,
//!   `edgeprov verify`).
#![warn(missing_docs)]

pub mod ca;
pub mod cert;
pub mod client;
pub mod device;
pub mod flash;
pub mod frame;
pub mod pty;
pub mod serial;
pub mod site;

/// Generated protobuf types, package `mec.provision.v1`.
#[allow(missing_docs)]
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/mec.provision.v1.rs"));
}

/// The protocol version this crate speaks.
pub const PROTOCOL_VERSION: u32 = 1;

/// What a factory-reset authorization signs:
/// `"mec-factory-reset/v1" 0x00 device_id 0x00 nonce`.
pub fn reset_message(device_id: &str, nonce: &[u8]) -> Vec<u8> {
    let mut m = b"mec-factory-reset/v1\0".to_vec();
    m.extend_from_slice(device_id.as_bytes());
    m.push(0);
    m.extend_from_slice(nonce);
    m
}
