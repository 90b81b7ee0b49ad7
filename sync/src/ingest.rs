//! The core's checks on an uploaded batch, sans-IO: given what the core
//! holds for a node (its [`NodeCursor`]) and the node's public key, decide
//! for each record whether to store it, count it as a duplicate, or
//! quarantine it, and where the node's cursor moves. The async server and
//! the store only carry out the verdicts (one transaction per batch).
//!
//! Rules, in order, for each record of a batch:
//! 1. it decodes, and its signature verifies with the key of the node the
//!    connection's certificate names (batch verification; on failure each
//!    record is checked alone to find the bad ones) — else quarantined (a
//!    body that does not decode still takes its place by the seq it claims;
//!    one whose seq cannot be read at all is quarantined without one);
//! 2. its body names that node — else quarantined (node A's certificate
//!    carrying node B's records);
//! 3. a seq at or below the cursor is a duplicate: counted, never stored again;
//! 4. the next seq must chain to the cursor's hash — else quarantined;
//! 5. a seq beyond the next is accepted only when the edge declared the
//!    seqs between lost (they become a recorded gap); otherwise the rest of
//!    the batch waits (the edge resends from the acknowledged position).
//!
//! A quarantined record at the next seq still moves the cursor past it (the
//! core keeps it aside, reports it and never bills it; the edge may release
//! it), so one bad record never blocks a node, and a resend of it is a
//! duplicate, not a second quarantine. When its signature failed, its body
//! is not the node's, so the next record's link to it is not checked (that
//! record's own signature vouches for it).

use ed25519_dalek::{Signature, VerifyingKey};
use rayon::prelude::*;

use crate::record::{body_hash, SignedRecord, UsageRecord, GENESIS_HASH};
use crate::wire::pb::{Batch, LostRange};

/// What the core holds for one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeCursor {
    /// Node id (from its certificate).
    pub node_id: String,
    /// Every seq at or below this is stored or recorded as lost.
    pub contiguous_seq: u64,
    /// Hash of the body of the record at `contiguous_seq` (genesis at 0, or
    /// after a lost range, the hash the next record must carry is unknown:
    /// `None`).
    pub last_hash: Option<[u8; 32]>,
}

impl NodeCursor {
    /// A node the core has never heard from.
    pub fn new(node_id: &str) -> NodeCursor {
        NodeCursor {
            node_id: node_id.to_string(),
            contiguous_seq: 0,
            last_hash: Some(GENESIS_HASH),
        }
    }
}

/// A record to store.
#[derive(Debug, Clone, PartialEq)]
pub struct Accepted {
    /// Its seq.
    pub seq: u64,
    /// The decoded record.
    pub record: UsageRecord,
    /// The SignedRecord bytes as received (kept for re-verification).
    pub signed: Vec<u8>,
    /// SHA-256 of the body.
    pub hash: [u8; 32],
}

/// A record kept aside.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quarantined {
    /// Its seq when it could be read.
    pub seq: Option<u64>,
    /// Why.
    pub reason: String,
    /// The bytes as received.
    pub signed: Vec<u8>,
}

/// The verdicts on one batch.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchVerdict {
    /// To store, in seq order.
    pub accepted: Vec<Accepted>,
    /// Already stored.
    pub duplicates: u64,
    /// Kept aside.
    pub quarantined: Vec<Quarantined>,
    /// Seq ranges declared lost that the cursor moved past.
    pub gaps: Vec<(u64, u64)>,
    /// Records left for a later batch (an undeclared jump in seq).
    pub deferred: u64,
    /// The cursor once the verdicts are committed.
    pub cursor: NodeCursor,
}

fn declared_lost(lost: &[LostRange], first: u64, last: u64) -> bool {
    // Every seq in first..=last lies in one of the declared ranges.
    let mut next = first;
    let mut ranges: Vec<&LostRange> = lost.iter().collect();
    ranges.sort_by_key(|r| r.first);
    for r in ranges {
        if r.first <= next && r.last >= next {
            next = r.last.saturating_add(1);
        }
        if next > last {
            return true;
        }
    }
    next > last
}

/// One record after the checks that need no cursor.
#[derive(Debug, Clone, PartialEq)]
struct CheckedRecord {
    /// The seq its body claims.
    seq: u64,
    signed: Vec<u8>,
    /// The decoded body; `None` when only its seq could be read.
    record: Option<UsageRecord>,
    hash: [u8; 32],
    /// Its signature verified: the body is the node's, so its hash anchors
    /// the next record's link.
    authentic: bool,
    /// Why it cannot be stored whatever the cursor (bad signature, another
    /// node's record, a body that does not decode).
    fault: Option<String>,
}

/// A batch after the checks that need no cursor: decoding, signatures, the
/// node id, body hashes. This is nearly all of the work, so the server runs
/// it for the next batch while the one before commits; [`walk`] then places
/// it against the cursor.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckedBatch {
    node_id: String,
    /// Readable records, in seq order.
    records: Vec<CheckedRecord>,
    /// Records that could not be read at all.
    unreadable: Vec<Quarantined>,
    lost: Vec<LostRange>,
}

impl CheckedBatch {
    /// Records in the batch, readable or not.
    pub fn len(&self) -> usize {
        self.records.len() + self.unreadable.len()
    }

    /// True for a batch with no records.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Records per batch verification: large enough that a verification
/// amortises well (per-signature cost falls until about 1,000), small enough
/// that every rayon thread gets a share of a batch.
fn verify_chunk(records: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    records.div_ceil(threads).clamp(128, 1024)
}

/// Decodes `batch` and checks each record's signature against `key` and its
/// node id against `node_id` (the certificate's), in parallel.
pub fn check_records(node_id: &str, key: &VerifyingKey, batch: Batch) -> CheckedBatch {
    let mut unreadable = Vec::new();
    // Decode envelopes; quarantine what does not decode.
    let mut envelopes: Vec<(Vec<u8>, SignedRecord, Signature)> = Vec::new();
    for bytes in batch.records {
        let parsed = SignedRecord::from_bytes(&bytes).and_then(|s| {
            let sig: [u8; 64] = s
                .signature
                .as_slice()
                .try_into()
                .map_err(|_| crate::record::RecordError::SignatureLength(s.signature.len()))?;
            Ok((s, Signature::from_bytes(&sig)))
        });
        match parsed {
            Ok((s, sig)) => envelopes.push((bytes, s, sig)),
            Err(e) => unreadable.push(Quarantined {
                seq: None,
                reason: format!("undecodable record: {e}"),
                signed: bytes,
            }),
        }
    }
    // Signatures: batch verification in chunks spread over the cores, and
    // one by one only inside a chunk that fails. Bodies are decoded and
    // hashed in the same tasks.
    let chunk = verify_chunk(envelopes.len());
    let checked: Vec<Result<CheckedRecord, Quarantined>> = envelopes
        .par_chunks_mut(chunk)
        .flat_map_iter(|chunk| {
            let messages: Vec<&[u8]> = chunk.iter().map(|e| e.1.body.as_slice()).collect();
            let signatures: Vec<Signature> = chunk.iter().map(|e| e.2).collect();
            let keys = vec![*key; chunk.len()];
            let chunk_ok = ed25519_dalek::verify_batch(&messages, &signatures, &keys).is_ok();
            chunk.iter_mut().map(move |(bytes, s, _)| {
                let signed = std::mem::take(bytes);
                let authentic = chunk_ok || s.verify(key).is_ok();
                let hash = body_hash(&s.body);
                let (seq, record, fault) = match s.record() {
                    Ok(record) => {
                        let fault = if !authentic {
                            Some("signature does not verify with the node's key".to_string())
                        } else if record.node_id != node_id {
                            Some(format!(
                                "record names node {:?}, the certificate {node_id:?}",
                                record.node_id
                            ))
                        } else {
                            None
                        };
                        (record.seq, Some(record), fault)
                    }
                    // It still takes its place in the walk if its seq reads,
                    // so that one damaged record cannot hold a node back.
                    Err(e) => match crate::record::claimed_seq(&s.body) {
                        Some(seq) => (seq, None, Some(format!("undecodable body: {e}"))),
                        None => {
                            return Err(Quarantined {
                                seq: None,
                                reason: format!("undecodable body: {e}"),
                                signed,
                            })
                        }
                    },
                };
                Ok(CheckedRecord {
                    seq,
                    signed,
                    record,
                    hash,
                    authentic,
                    fault,
                })
            })
        })
        .collect();
    let mut records = Vec::with_capacity(checked.len());
    for c in checked {
        match c {
            Ok(r) => records.push(r),
            Err(q) => unreadable.push(q),
        }
    }
    records.sort_by_key(|r| r.seq);
    CheckedBatch {
        node_id: node_id.to_string(),
        records,
        unreadable,
        lost: batch.lost,
    }
}

/// Places a checked batch against what the core holds for the node: which
/// records to store, which are duplicates, which to quarantine, and where
/// the cursor moves. Cheap; the server runs it under the store's lock.
pub fn walk(cursor: &NodeCursor, checked: CheckedBatch) -> BatchVerdict {
    debug_assert_eq!(cursor.node_id, checked.node_id);
    let mut v = BatchVerdict {
        accepted: Vec::new(),
        duplicates: 0,
        quarantined: checked.unreadable,
        gaps: Vec::new(),
        deferred: 0,
        cursor: cursor.clone(),
    };
    // Every record whose seq can be read takes part in the ordered walk,
    // sound or not: a bad record at the next seq is quarantined and the
    // cursor moves past it (the edge may release it; the core reports it),
    // so one bad record never blocks a node's upload.
    let mut deferring = false;
    for r in checked.records {
        let c = &mut v.cursor;
        let seq = r.seq;
        if seq <= c.contiguous_seq {
            v.duplicates += 1;
            continue;
        }
        if deferring {
            v.deferred += 1;
            continue;
        }
        if seq > c.contiguous_seq + 1 {
            let (first, last) = (c.contiguous_seq + 1, seq - 1);
            if declared_lost(&checked.lost, first, last) {
                v.gaps.push((first, last));
                c.contiguous_seq = last;
                c.last_hash = None;
            } else {
                deferring = true;
                v.deferred += 1;
                continue;
            }
        }
        let fault = r.fault.or_else(|| {
            let record = r.record.as_ref()?;
            let prev: [u8; 32] = record.prev_hash.as_slice().try_into().unwrap_or([0xff; 32]);
            c.last_hash.is_some_and(|h| h != prev).then(|| {
                format!(
                    "seq {seq}: prev_hash does not chain to seq {}",
                    c.contiguous_seq
                )
            })
        });
        // Either way the cursor moves to this seq. The next record must chain
        // to this body if it is the node's own; a body whose signature fails
        // is not, so the next link cannot be checked (the next record's own
        // signature still vouches for it).
        c.contiguous_seq = seq;
        c.last_hash = r.authentic.then_some(r.hash);
        match (fault, r.record) {
            (None, Some(record)) => v.accepted.push(Accepted {
                seq,
                record,
                signed: r.signed,
                hash: r.hash,
            }),
            (fault, _) => v.quarantined.push(Quarantined {
                seq: Some(seq),
                reason: fault.unwrap_or_else(|| "undecodable body".into()),
                signed: r.signed,
            }),
        }
    }
    v
}

/// Checks the records of `batch` from node `cursor.node_id`, whose key is
/// `key`: [`check_records`] then [`walk`].
pub fn check_batch(cursor: &NodeCursor, key: &VerifyingKey, batch: &Batch) -> BatchVerdict {
    walk(cursor, check_records(&cursor.node_id, key, batch.clone()))
}

/// Records 1..=n of `node`, chained and signed with `k` (tests).
#[cfg(test)]
pub(crate) fn test_chain(node: &str, k: &ed25519_dalek::SigningKey, n: u64) -> Vec<Vec<u8>> {
    use prost::Message;
    let mut prev = GENESIS_HASH;
    (1..=n)
        .map(|seq| {
            let r = UsageRecord {
                node_id: node.into(),
                seq,
                prev_hash: prev.to_vec(),
                imsi: "001010000000001".into(),
                prompt_tokens: 7,
                completion_tokens: seq,
                billed_tokens: 7 + seq,
                ..Default::default()
            };
            let body = crate::record::encode_record(&r);
            prev = body_hash(&body);
            SignedRecord::sign(body, k).encode_to_vec()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::SigningKey;

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    fn chain(node: &str, k: &SigningKey, n: u64) -> Vec<Vec<u8>> {
        test_chain(node, k, n)
    }

    fn batch(records: &[Vec<u8>]) -> Batch {
        Batch {
            batch_id: 1,
            records: records.to_vec(),
            lost: vec![],
        }
    }

    #[test]
    fn batches_checked_before_the_cursor_moves_walk_as_if_checked_in_turn() {
        // The server checks batch n+1 while batch n commits: the checks must
        // not depend on the cursor. Large batches span several verification
        // chunks; one record in the second batch carries a flipped byte.
        let k = key(4);
        let mut recs = chain("n1", &k, 3000);
        let last = recs[2500].len() - 1;
        recs[2500][last] ^= 1;
        let (first, second) = (batch(&recs[..1400]), batch(&recs[1400..]));
        let in_turn = {
            let v1 = check_batch(&NodeCursor::new("n1"), &k.verifying_key(), &first);
            let v2 = check_batch(&v1.cursor, &k.verifying_key(), &second);
            (v1, v2)
        };
        let c1 = check_records("n1", &k.verifying_key(), first);
        let c2 = check_records("n1", &k.verifying_key(), second);
        let v1 = walk(&NodeCursor::new("n1"), c1);
        let v2 = walk(&v1.cursor, c2);
        assert_eq!((v1, v2), in_turn);
        let v2 = &in_turn.1;
        assert_eq!(v2.cursor.contiguous_seq, 3000);
        assert_eq!(v2.accepted.len(), 1599);
        assert_eq!(v2.quarantined.len(), 1);
        assert_eq!(v2.quarantined[0].seq, Some(2501));
    }

    #[test]
    fn any_one_flipped_byte_is_never_stored_and_never_holds_the_node_back() {
        use crate::record::claimed_seq;
        let k = key(5);
        let recs = chain("n1", &k, 5);
        for pos in 0..recs[2].len() {
            for bit in [0x01u8, 0x80] {
                let mut tampered = recs.clone();
                tampered[2][pos] ^= bit;
                let v = check_batch(
                    &NodeCursor::new("n1"),
                    &k.verifying_key(),
                    &batch(&tampered),
                );
                // Whatever the byte, nothing but the node's own records is stored.
                for a in &v.accepted {
                    assert_eq!(a.signed, recs[a.seq as usize - 1], "pos {pos}");
                }
                // Where the record still claims its seq, it alone is set aside.
                let claims_its_seq = SignedRecord::from_bytes(&tampered[2])
                    .ok()
                    .and_then(|s| claimed_seq(&s.body))
                    == Some(3);
                if claims_its_seq {
                    let seqs: Vec<u64> = v.accepted.iter().map(|a| a.seq).collect();
                    assert_eq!(seqs, [1, 2, 4, 5], "pos {pos} bit {bit:#x}");
                    assert_eq!(v.quarantined.len(), 1, "pos {pos} bit {bit:#x}");
                    assert_eq!(v.quarantined[0].seq, Some(3));
                    assert_eq!(v.cursor.contiguous_seq, 5);
                }
            }
        }
    }

    #[test]
    fn a_clean_batch_is_accepted_and_moves_the_cursor() {
        let k = key(1);
        let recs = chain("n1", &k, 5);
        let v = check_batch(&NodeCursor::new("n1"), &k.verifying_key(), &batch(&recs));
        assert_eq!(v.accepted.len(), 5);
        assert_eq!(v.cursor.contiguous_seq, 5);
        assert!(v.quarantined.is_empty() && v.duplicates == 0);
        // The same batch again: all duplicates, nothing moves.
        let again = check_batch(&v.cursor, &k.verifying_key(), &batch(&recs));
        assert_eq!((again.accepted.len(), again.duplicates), (0, 5));
        assert_eq!(again.cursor, v.cursor);
        // Overlapping: 4..=5 duplicates, nothing new.
        let more = chain("n1", &k, 7);
        let next = check_batch(&v.cursor, &k.verifying_key(), &batch(&more[3..]));
        assert_eq!((next.accepted.len(), next.duplicates), (2, 2));
        assert_eq!(next.cursor.contiguous_seq, 7);
    }

    #[test]
    fn a_flipped_byte_is_quarantined_once_and_passed() {
        let k = key(1);
        let mut recs = chain("n1", &k, 4);
        let last = recs[1].len() - 10;
        recs[1][last] ^= 1;
        let v = check_batch(&NodeCursor::new("n1"), &k.verifying_key(), &batch(&recs));
        // The bad record is kept aside and passed; the chain goes on.
        let accepted: Vec<u64> = v.accepted.iter().map(|a| a.seq).collect();
        assert_eq!(accepted, vec![1, 3, 4]);
        assert_eq!(v.quarantined.len(), 1, "{:?}", v.quarantined);
        assert_eq!(v.quarantined[0].seq, Some(2));
        assert_eq!(v.cursor.contiguous_seq, 4);
        // Sent again, it is a duplicate, not a second quarantine.
        let again = check_batch(&v.cursor, &k.verifying_key(), &batch(&recs));
        assert_eq!((again.duplicates, again.quarantined.len()), (4, 0));
    }

    #[test]
    fn records_signed_by_another_nodes_key_or_naming_it_are_quarantined() {
        let (a, b) = (key(1), key(2));
        // Node B's records sent over node A's connection.
        let recs = chain("b", &b, 2);
        let v = check_batch(&NodeCursor::new("a"), &a.verifying_key(), &batch(&recs));
        assert!(v.accepted.is_empty());
        assert_eq!(v.quarantined.len(), 2);
        assert!(v.quarantined[0].reason.contains("signature"));
        // Signed with A's key but naming node B.
        let recs = chain("b", &a, 1);
        let v = check_batch(&NodeCursor::new("a"), &a.verifying_key(), &batch(&recs));
        assert!(
            v.quarantined[0].reason.contains("names node"),
            "{:?}",
            v.quarantined
        );
        assert_eq!(v.cursor.contiguous_seq, 1);
    }

    #[test]
    fn a_jump_is_a_gap_only_when_declared_lost() {
        let k = key(1);
        let recs = chain("n1", &k, 6);
        let mut b = batch(&[recs[0].clone(), recs[4].clone(), recs[5].clone()]);
        let v = check_batch(&NodeCursor::new("n1"), &k.verifying_key(), &b);
        assert_eq!((v.accepted.len(), v.deferred), (1, 2));
        assert_eq!(v.cursor.contiguous_seq, 1);
        b.lost = vec![LostRange { first: 2, last: 4 }];
        let v = check_batch(&NodeCursor::new("n1"), &k.verifying_key(), &b);
        assert_eq!(
            v.accepted.iter().map(|a| a.seq).collect::<Vec<_>>(),
            vec![1, 5, 6]
        );
        assert_eq!(v.gaps, vec![(2, 4)]);
        assert_eq!(v.cursor.contiguous_seq, 6);
    }

    #[test]
    fn undecodable_bytes_are_quarantined() {
        let k = key(1);
        let v = check_batch(
            &NodeCursor::new("n1"),
            &k.verifying_key(),
            &batch(&[vec![0xff, 0x01]]),
        );
        assert_eq!(v.quarantined.len(), 1);
        assert_eq!(v.quarantined[0].seq, None);
    }
}
