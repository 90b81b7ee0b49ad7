//! The usage record schema (generated from `proto/usage.proto`) and the
//! signing rules around it: how a record is chained, signed and checked.
//!
//! The signature covers the encoded `body` exactly as produced, so a verifier
//! never re-encodes: [`SignedRecord::verify`] checks the bytes it was given.

use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
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
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
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

    /// Checks the signature over `body` as stored, by the ZIP-215 rule:
    /// `s` canonical, `R` and the key valid encodings, and the cofactored
    /// equation `[8][s]B = [8]R + [8][k]A`. A key of small order is refused
    /// outright (under that equation it lets anyone sign).
    ///
    /// Why this rule: its single and batch checks accept exactly the same
    /// signatures, by definition (ZIP-215 was written for that). The edge's
    /// `log verify`, `audit` and `copy-store` check one record at a time, the
    /// core's ingest checks a node's whole batch at once
    /// ([`SignedRecord::verify_all`], about three times the rate on one key),
    /// and the two can never disagree. RFC 8032's strict single check and a
    /// batch check can: the batch equation is cofactored, the strict one not.
    /// Every signature the strict check accepts, this rule accepts.
    pub fn verify(&self, key: &VerifyingKey) -> Result<(), RecordError> {
        let signature = self.signature_bytes()?;
        if key.is_weak() {
            return Err(RecordError::BadSignature);
        }
        ed25519_zebra::VerificationKey::try_from(key.to_bytes())
            .and_then(|k| {
                k.verify(
                    &ed25519_zebra::Signature::from_bytes(&signature),
                    &self.body,
                )
            })
            .map_err(|_| RecordError::BadSignature)
    }

    /// [`SignedRecord::verify`] for each of `records`, all under one key, in
    /// one batch check: the same answers, each in its record's place. When
    /// the batch fails, each record is checked alone to find which.
    pub fn verify_all(
        key: &VerifyingKey,
        records: &[&SignedRecord],
    ) -> Vec<Result<(), RecordError>> {
        let signatures: Vec<Result<[u8; 64], RecordError>> =
            records.iter().map(|r| r.signature_bytes()).collect();
        if key.is_weak() {
            return signatures
                .into_iter()
                .map(|s| s.and(Err(RecordError::BadSignature)))
                .collect();
        }
        if batch_passes(key, records, &signatures) {
            return signatures.into_iter().map(|s| s.map(|_| ())).collect();
        }
        records.iter().map(|r| r.verify(key)).collect()
    }

    fn signature_bytes(&self) -> Result<[u8; 64], RecordError> {
        self.signature
            .as_slice()
            .try_into()
            .map_err(|_| RecordError::SignatureLength(self.signature.len()))
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

/// Whether one batch check passes for the records whose signature has 64
/// bytes (`signatures`, in the records' order), `key` not weak.
fn batch_passes(
    key: &VerifyingKey,
    records: &[&SignedRecord],
    signatures: &[Result<[u8; 64], RecordError>],
) -> bool {
    let key_bytes = ed25519_zebra::VerificationKeyBytes::from(key.to_bytes());
    let mut batch = ed25519_zebra::batch::Verifier::new();
    for (record, signature) in records.iter().zip(signatures) {
        if let Ok(signature) = signature {
            let signature = ed25519_zebra::Signature::from_bytes(signature);
            batch.queue((key_bytes, signature, record.body.as_slice()));
        }
    }
    // The coefficients must be unpredictable to the signer, or a node could
    // make a batch pass that holds a bad signature: a CSPRNG.
    batch.verify(rand_zebra::rng()).is_ok()
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
            "grant_id": d.grant_id,
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
        "end_user": r.end_user,
        "choices": r.choices,
        "constraint": r.constraint,
        "billed_units": units_charged(r),
        "rate_version": r.rate_version,
        "rate_digest": hex::encode(&r.rate_digest),
        "rate": r.rate.as_ref().map(|p| serde_json::json!({
            "prompt_milli": p.prompt_milli,
            "cached_milli": p.cached_milli,
            "completion_milli": p.completion_milli,
        })),
    })
}

/// The package units a record charged: `billed_units`, or its
/// `billed_tokens` in a record written before rating (one unit a token).
/// Its debits sum to this.
pub fn units_charged(r: &UsageRecord) -> u64 {
    if r.billed_units != 0 {
        r.billed_units
    } else {
        r.billed_tokens
    }
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

    /// A signature whose `R` carries a component of small order, made by
    /// the key's holder: RFC 8032's strict check refuses it, a cofactorless
    /// batch check accepts it or not depending on its random coefficients,
    /// so a product using both would disagree with itself. Under ZIP-215 the
    /// single and the batch check both accept it, every time.
    #[test]
    fn a_torsion_component_in_r_is_judged_alike_by_the_single_and_the_batch_check() {
        use curve25519_dalek::{constants, EdwardsPoint, Scalar};
        use sha2::Sha512;
        let secret = Scalar::from(0x5eed_1234_u64);
        let public = EdwardsPoint::mul_base(&secret).compress().to_bytes();
        let key = VerifyingKey::from_bytes(&public).unwrap();
        let body = UsageRecord {
            seq: 1,
            billed_tokens: 42,
            ..Default::default()
        }
        .encode_to_vec();
        let nonce = Scalar::from(0x0dd_ba11_u64);
        let r = (EdwardsPoint::mul_base(&nonce) + constants::EIGHT_TORSION[1])
            .compress()
            .to_bytes();
        let k: [u8; 64] = Sha512::new()
            .chain_update(r)
            .chain_update(public)
            .chain_update(&body)
            .finalize()
            .into();
        let s = nonce + Scalar::from_bytes_mod_order_wide(&k) * secret;
        let mut signature = r.to_vec();
        signature.extend_from_slice(s.as_bytes());
        let signed = SignedRecord { body, signature };

        let dalek = ed25519_dalek::Signature::from_slice(&signed.signature).unwrap();
        assert!(
            key.verify_strict(&signed.body, &dalek).is_err(),
            "strict refuses it"
        );
        assert_eq!(signed.verify(&key), Ok(()));
        // Each batch check draws new coefficients: a cofactorless batch
        // would refuse this signature 7 times in 8.
        for round in 1..=16 {
            let batch = vec![&signed; round];
            // The batch check itself, not its one-at-a-time fallback.
            let signatures: Vec<_> = batch.iter().map(|r| r.signature_bytes()).collect();
            assert!(batch_passes(&key, &batch, &signatures), "round {round}");
            assert_eq!(
                SignedRecord::verify_all(&key, &batch),
                vec![Ok(()); round],
                "round {round}"
            );
        }
    }

    proptest::proptest! {
        /// A batch of records, some signed right, some with a body, an `R`
        /// or an `s` altered or a signature cut short: the batch check gives
        /// each record the answer its own check gives, and the right one.
        #[test]
        fn the_batch_check_answers_as_each_check_alone(
            faults in proptest::collection::vec(0u8..5, 1..40),
        ) {
            let key = SigningKey::from_bytes(&[3u8; 32]);
            let records: Vec<SignedRecord> = faults
                .iter()
                .enumerate()
                .map(|(i, fault)| {
                    let body = UsageRecord { seq: i as u64 + 1, ..Default::default() }.encode_to_vec();
                    let mut signed = SignedRecord::sign(body, &key);
                    match fault {
                        1 => signed.body.push(0),
                        2 => signed.signature[3] ^= 0x10,
                        3 => signed.signature[40] ^= 0x01,
                        4 => { signed.signature.pop(); }
                        _ => {}
                    }
                    signed
                })
                .collect();
            let refs: Vec<&SignedRecord> = records.iter().collect();
            let together = SignedRecord::verify_all(&key.verifying_key(), &refs);
            // The batch check passes exactly when every record is good (so
            // the fast path is the one taken for honest batches).
            let signatures: Vec<_> = refs.iter().map(|r| r.signature_bytes()).collect();
            proptest::prop_assert_eq!(
                batch_passes(&key.verifying_key(), &refs, &signatures),
                faults.iter().all(|&f| f == 0 || f == 4)
            );
            for ((record, fault), answer) in records.iter().zip(&faults).zip(&together) {
                proptest::prop_assert_eq!(answer, &record.verify(&key.verifying_key()));
                let expected = match fault {
                    0 => Ok(()),
                    4 => Err(RecordError::SignatureLength(63)),
                    _ => Err(RecordError::BadSignature),
                };
                proptest::prop_assert_eq!(answer, &expected);
            }
        }
    }

    /// A key of small order (here the identity point) with the signature
    /// (R = identity, s = 0) "verifies" any message under the permissive
    /// equation. The product refuses a small-order key before any
    /// equation, in the single and in the batch check: refused everywhere.
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
        assert_eq!(
            SignedRecord::verify_all(&weak, &[&forged]),
            vec![Err(RecordError::BadSignature)]
        );
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
