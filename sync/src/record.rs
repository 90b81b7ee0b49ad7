//! The usage record schema (generated from `proto/usage.proto`) and the
//! signing rules around it: how a record is chained, signed and checked.
//!
//! The signature covers the encoded `body` exactly as produced, so a verifier
//! never re-encodes: [`SignedRecord::verify`] checks the bytes it was given.

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use prost::Message;
use sha2::{Digest, Sha256};

/// Generated protobuf types, package `mec.usage.v1`.
#[allow(missing_docs)]
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/mec.usage.v1.rs"));
}

pub use pb::{ClockSync, Outcome, SignedRecord, UsageRecord};

/// The schema version this crate writes (`UsageRecord.schema_version`).
pub const SCHEMA_VERSION: u32 = 1;

/// `prev_hash` of a node's first record.
pub const GENESIS_HASH: [u8; 32] = [0u8; 32];

/// SHA-256 of a record body: the chain link the next record carries in `prev_hash`.
pub fn body_hash(body: &[u8]) -> [u8; 32] {
    Sha256::digest(body).into()
}

/// The `seq` field alone of a record body (tag 4 of `UsageRecord`): decoding
/// skips every other field unread, so a body damaged elsewhere (an invalid
/// UTF-8 string, say) still tells which seq it claims.
#[derive(Clone, PartialEq, prost::Message)]
struct SeqOnly {
    #[prost(uint64, tag = "4")]
    seq: u64,
}

/// The seq a body claims, when at least its framing and that field read.
pub fn claimed_seq(body: &[u8]) -> Option<u64> {
    SeqOnly::decode(body).ok().map(|s| s.seq).filter(|&s| s > 0)
}

/// Why a signed record failed a check.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RecordError {
    /// The envelope or the body is not valid protobuf.
    #[error("record does not decode: {0}")]
    Decode(String),
    /// The signature is not 64 bytes.
    #[error("signature has {0} bytes, expected 64")]
    SignatureLength(usize),
    /// The signature does not verify against the node key.
    #[error("signature does not verify against the node key")]
    BadSignature,
}

impl SignedRecord {
    /// Signs an encoded record body.
    pub fn sign(body: Vec<u8>, key: &SigningKey) -> SignedRecord {
        let signature = key.sign(&body).to_bytes().to_vec();
        SignedRecord { body, signature }
    }

    /// Checks the signature over `body` as stored, with the strict
    /// equation (`verify_strict`: small-order keys and non-canonical
    /// signatures refused). Every check in the product uses this one, so
    /// the edge's `log verify` and the core's ingest never disagree.
    pub fn verify(&self, key: &VerifyingKey) -> Result<(), RecordError> {
        let bytes: [u8; 64] = self
            .signature
            .as_slice()
            .try_into()
            .map_err(|_| RecordError::SignatureLength(self.signature.len()))?;
        key.verify_strict(&self.body, &Signature::from_bytes(&bytes))
            .map_err(|_| RecordError::BadSignature)
    }

    /// Decodes the body.
    pub fn record(&self) -> Result<UsageRecord, RecordError> {
        UsageRecord::decode(self.body.as_slice()).map_err(|e| RecordError::Decode(e.to_string()))
    }

    /// Decodes an envelope from bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<SignedRecord, RecordError> {
        SignedRecord::decode(bytes).map_err(|e| RecordError::Decode(e.to_string()))
    }
}

/// The protobuf encoding of a record (what goes into `SignedRecord.body`).
pub fn encode_record(r: &UsageRecord) -> Vec<u8> {
    r.encode_to_vec()
}

/// The record as JSON, every field by its `.proto` name (enums by their
/// `.proto` value names, bytes as lowercase hex for hashes and UUID text for
/// `record_id`). Used by `edge-agent log dump`.
pub fn record_to_json(r: &UsageRecord) -> serde_json::Value {
    let record_id = uuid::Uuid::from_slice(&r.record_id)
        .map(|u| u.to_string())
        .unwrap_or_else(|_| hex::encode(&r.record_id));
    serde_json::json!({
        "schema_version": r.schema_version,
        "node_id": r.node_id,
        "key_id": r.key_id,
        "seq": r.seq,
        "record_id": record_id,
        "imsi": r.imsi,
        "app_id": r.app_id,
        "model_id": r.model_id,
        "prompt_tokens": r.prompt_tokens,
        "cached_prompt_tokens": r.cached_prompt_tokens,
        "completion_tokens": r.completion_tokens,
        "reserved_tokens": r.reserved_tokens,
        "billed_tokens": r.billed_tokens,
        "package_ids": r.package_ids,
        "debits": r.debits.iter().map(|d| serde_json::json!({
            "package_id": d.package_id,
            "tokens": d.tokens,
            "period": d.period,
        })).collect::<Vec<_>>(),
        "outcome": r.outcome().as_str_name(),
        "failure_reason": r.failure_reason,
        "start_time_unix_ms": r.start_time_unix_ms,
        "end_time_unix_ms": r.end_time_unix_ms,
        "clock_sync": r.clock_sync().as_str_name(),
        "duration_us": r.duration_us,
        "ttft_us": r.ttft_us,
        "offline": r.offline,
        "prev_hash": hex::encode(&r.prev_hash),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_covers_exact_body_bytes() {
        let key = SigningKey::from_bytes(&[7u8; 32]);
        let body = UsageRecord {
            seq: 1,
            imsi: "001010123456789".into(),
            ..Default::default()
        }
        .encode_to_vec();
        let mut signed = SignedRecord::sign(body, &key);
        assert_eq!(signed.verify(&key.verifying_key()), Ok(()));
        signed.body[0] ^= 1;
        assert_eq!(
            signed.verify(&key.verifying_key()),
            Err(RecordError::BadSignature)
        );
        signed.signature.pop();
        assert_eq!(
            signed.verify(&key.verifying_key()),
            Err(RecordError::SignatureLength(63))
        );
    }

    /// A key of small order (here the identity point) with the signature
    /// (R = identity, s = 0) "verifies" any message under the permissive
    /// equation. Every check of the product is the strict one, so the
    /// single check and the core's checks agree: refused everywhere.
    #[test]
    fn a_small_order_key_and_its_forgery_verify_nowhere() {
        let mut identity = [0u8; 32];
        identity[0] = 1;
        let weak = VerifyingKey::from_bytes(&identity).unwrap();
        let mut signature = [0u8; 64];
        signature[0] = 1;
        let forged = SignedRecord {
            body: UsageRecord {
                seq: 1,
                billed_tokens: 1_000_000,
                ..Default::default()
            }
            .encode_to_vec(),
            signature: signature.to_vec(),
        };
        assert_eq!(forged.verify(&weak), Err(RecordError::BadSignature));
        let batch = crate::ingest::check_records(
            "",
            &weak,
            crate::wire::pb::Batch {
                batch_id: 1,
                records: vec![forged.encode_to_vec()],
                lost: vec![],
            },
        );
        let v = crate::ingest::walk(
            &crate::ingest::NodeCursor::new(""),
            batch,
            &Default::default(),
        );
        assert!(v.accepted.is_empty(), "the core stored a forgery");
    }
}
