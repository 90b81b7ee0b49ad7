//! The core's checks on an uploaded batch, sans-IO: given what the core
//! holds for a node (its [`NodeCursor`]) and the node's public key, decide
//! for each record whether to store it, count it as a duplicate, or
//! quarantine it, and where the node's cursor moves. The async server and
//! the store only carry out the verdicts (one transaction per batch).
//!
//! Rules, in order, for each record of a batch:
//! 1. it decodes, and its signature verifies with the key of the node the
//!    connection's certificate names (the strict equation, the one every
//!    other check of the product uses, in parallel over the cores) — else
//!    quarantined (a
//!    body that does not decode still takes its place by the seq it claims;
//!    one whose seq cannot be read at all is quarantined without one);
//! 2. its body names that node — else quarantined (node A's certificate
//!    carrying node B's records);
//! 3. a seq at or below the cursor is a duplicate when its body hash is one
//!    the core holds at that seq: counted, never stored again. A body the
//!    core does not hold there is a fork (a box restored from a snapshot
//!    wrote other records at seqs it had already sent): kept aside as a fork,
//!    reported and alarmed, never dropped silently;
//! 4. the next seq must chain to the cursor's hash — else quarantined;
//! 5. a seq beyond the next is accepted only when the edge declared the
//!    seqs between lost (they become a recorded gap, with the reason the
//!    edge gave: salvaged from damage, or lost by the core); otherwise the
//!    rest of the batch waits (the edge resends from the acknowledged
//!    position). A declared range right after the cursor moves it even in
//!    a batch without records;
//! 6. a seq the store cannot hold (above `i64::MAX`) is quarantined.
//!
//! A record at the next seq may chain to the stored record before it or to
//! a fork kept at that seq: after a fork, the node's own later records
//! still reach the core.
//!
//! A quarantined record at the next seq still moves the cursor past it (the
//! core keeps it aside, reports it and never bills it; the edge may release
//! it), so one bad record never blocks a node, and a resend of it is a
//! duplicate, not a second quarantine. When its signature failed, its body
//! is not the node's, so the next record's link to it is not checked (that
//! record's own signature vouches for it).

use ed25519_dalek::VerifyingKey;
use rayon::prelude::*;

use std::collections::HashMap;

use crate::record::{body_hash, SignedRecord, UsageRecord, GENESIS_HASH};
use crate::wire::pb::{Batch, LossReason, LostRange};

/// The body hashes the core holds at some seqs of a node: the stored
/// record's, then any forks kept there. The server looks them up for the
/// seqs of a batch at or below the cursor, and for the cursor's own seq.
pub type KnownHashes = HashMap<u64, Vec<[u8; 32]>>;

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
    /// An authentic record of the node at a seq the core holds another
    /// record for (not a faulty one).
    pub fork: bool,
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
    /// Seq ranges the edge declared lost (salvaged) that the cursor moved past.
    pub gaps: Vec<(u64, u64)>,
    /// Seq ranges the core had acknowledged, no longer holds, and the edge
    /// had deleted: named, the cursor moved past them.
    pub lost_by_core: Vec<(u64, u64)>,
    /// Of the duplicates, forks (kept in `quarantined`).
    pub forks: u64,
    /// Records left for a later batch (an undeclared jump in seq).
    pub deferred: u64,
    /// The cursor once the verdicts are committed.
    pub cursor: NodeCursor,
}

/// Whether every seq in `first..=last` lies in a declared range, and why
/// (lost by the core only when every covering range says so).
fn declared_lost(lost: &[LostRange], first: u64, last: u64) -> Option<LossReason> {
    let mut next = first;
    let mut reason = LossReason::CoreLost;
    // A range reaching beyond what the store can hold is not honoured.
    let mut ranges: Vec<&LostRange> = lost
        .iter()
        .filter(|r| i64::try_from(r.last).is_ok())
        .collect();
    ranges.sort_by_key(|r| r.first);
    for r in ranges {
        if r.first <= next && r.last >= next {
            next = r.last.saturating_add(1);
            if r.reason() != LossReason::CoreLost {
                reason = LossReason::EdgeSalvaged;
            }
        }
        if next > last {
            return Some(reason);
        }
    }
    (next > last).then_some(reason)
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
    /// The key the signatures were checked with (the store keeps a node's
    /// keys, so that a copy of the store can check them again).
    key: [u8; 32],
    /// Readable records, in seq order.
    records: Vec<CheckedRecord>,
    /// Records that could not be read at all.
    unreadable: Vec<Quarantined>,
    lost: Vec<LostRange>,
}

impl CheckedBatch {
    /// The node's public key the signatures were checked with.
    pub fn key(&self) -> [u8; 32] {
        self.key
    }

    /// Records in the batch, readable or not.
    pub fn len(&self) -> usize {
        self.records.len() + self.unreadable.len()
    }

    /// True for a batch with no records.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The seqs of its readable records at or below `seq` (resends, or
    /// forks): the server looks up the hashes it holds there.
    pub fn seqs_at_or_below(&self, seq: u64) -> Vec<u64> {
        self.records
            .iter()
            .map(|r| r.seq)
            .filter(|&s| s <= seq)
            .collect()
    }
}

/// Records per batch signature check: large enough that a batch check pays
/// (its rate on one key keeps rising to about 256), small enough that a
/// 2,048-record upload batch still spreads over 8 cores.
const VERIFY_CHUNK: usize = 256;

/// Decodes `batch` and checks each record's signature against `key` and its
/// node id against `node_id` (the certificate's), in parallel.
pub fn check_records(node_id: &str, key: &VerifyingKey, batch: Batch) -> CheckedBatch {
    let mut unreadable = Vec::new();
    // Decode envelopes; quarantine what does not decode.
    let mut envelopes: Vec<(Vec<u8>, SignedRecord)> = Vec::new();
    for bytes in batch.records {
        let parsed = SignedRecord::from_bytes(&bytes).and_then(|s| match s.signature.len() {
            64 => Ok(s),
            n => Err(crate::record::RecordError::SignatureLength(n)),
        });
        match parsed {
            Ok(s) => envelopes.push((bytes, s)),
            Err(e) => unreadable.push(Quarantined {
                seq: None,
                reason: format!("undecodable record: {e}"),
                signed: bytes,
                fork: false,
            }),
        }
    }
    // Signatures, in batch checks spread over the cores (the same answers
    // as checking each alone: `SignedRecord::verify_all`); bodies are
    // decoded and hashed in the same tasks.
    let checked: Vec<Result<CheckedRecord, Quarantined>> = envelopes
        .par_chunks_mut(VERIFY_CHUNK)
        .flat_map_iter(|chunk| {
            let signed: Vec<&SignedRecord> = chunk.iter().map(|(_, s)| s).collect();
            let authentic = SignedRecord::verify_all(key, &signed);
            chunk.iter_mut().zip(authentic)
        })
        .map(|((bytes, s), authentic)| {
            let signed = std::mem::take(bytes);
            let authentic = authentic.is_ok();
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
                            fork: false,
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
        key: key.to_bytes(),
        records,
        unreadable,
        lost: batch.lost,
    }
}

/// Places a checked batch against what the core holds for the node: which
/// records to store, which are duplicates or forks, which to quarantine, and
/// where the cursor moves. `known` holds the body hashes the core keeps at
/// the batch's seqs at or below the cursor, and at the cursor's seq. Cheap;
/// the server runs it under the store's lock.
pub fn walk(cursor: &NodeCursor, checked: CheckedBatch, known: &KnownHashes) -> BatchVerdict {
    debug_assert_eq!(cursor.node_id, checked.node_id);
    let mut v = BatchVerdict {
        accepted: Vec::new(),
        duplicates: 0,
        quarantined: checked.unreadable,
        gaps: Vec::new(),
        lost_by_core: Vec::new(),
        forks: 0,
        deferred: 0,
        cursor: cursor.clone(),
    };
    // Bodies the next record may chain to besides the cursor's hash: forks
    // kept at the cursor's seq.
    let mut alternatives: Vec<[u8; 32]> = known
        .get(&cursor.contiguous_seq)
        .cloned()
        .unwrap_or_default();
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
            match known.get(&seq) {
                Some(held) if r.authentic && r.fault.is_none() && !held.contains(&r.hash) => {
                    v.forks += 1;
                    if seq == cursor.contiguous_seq {
                        alternatives.push(r.hash);
                    }
                    v.quarantined.push(Quarantined {
                        seq: Some(seq),
                        reason: format!(
                            "fork: the node sent another record at seq {seq} than the one stored (restored from an older snapshot?)"
                        ),
                        signed: r.signed,
                        fork: true,
                    });
                }
                // The same body (or no stored body to compare: a declared
                // gap, a quarantined seq): a resend.
                _ => {}
            }
            continue;
        }
        if deferring {
            v.deferred += 1;
            continue;
        }
        if seq > c.contiguous_seq + 1 {
            let (first, last) = (c.contiguous_seq + 1, seq - 1);
            match declared_lost(&checked.lost, first, last) {
                Some(reason) => {
                    push_loss(&mut v.gaps, &mut v.lost_by_core, reason, first, last);
                    c.contiguous_seq = last;
                    c.last_hash = None;
                    alternatives.clear();
                }
                None => {
                    deferring = true;
                    v.deferred += 1;
                    continue;
                }
            }
        }
        let fault = r.fault.or_else(|| {
            if i64::try_from(seq).is_err() {
                return Some(format!("seq {seq} is beyond what the store can hold"));
            }
            let record = r.record.as_ref()?;
            let prev: [u8; 32] = record.prev_hash.as_slice().try_into().unwrap_or([0xff; 32]);
            c.last_hash
                .is_some_and(|h| h != prev && !alternatives.contains(&prev))
                .then(|| {
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
        alternatives.clear();
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
                fork: false,
            }),
        }
    }
    // Declared ranges right after the cursor move it, records or not (an
    // edge that has nothing left to send of what the core lost).
    if !deferring {
        let c = &mut v.cursor;
        while let Some(r) = checked.lost.iter().find(|r| {
            r.first <= c.contiguous_seq + 1
                && r.last > c.contiguous_seq
                && i64::try_from(r.last).is_ok()
        }) {
            let (first, last) = (c.contiguous_seq + 1, r.last);
            push_loss(&mut v.gaps, &mut v.lost_by_core, r.reason(), first, last);
            c.contiguous_seq = last;
            c.last_hash = None;
        }
    }
    v
}

fn push_loss(
    gaps: &mut Vec<(u64, u64)>,
    lost_by_core: &mut Vec<(u64, u64)>,
    reason: LossReason,
    first: u64,
    last: u64,
) {
    match reason {
        LossReason::CoreLost => lost_by_core.push((first, last)),
        LossReason::EdgeSalvaged => gaps.push((first, last)),
    }
}

/// Checks the records of `batch` from node `cursor.node_id`, whose key is
/// `key`: [`check_records`] then [`walk`].
pub fn check_batch(
    cursor: &NodeCursor,
    key: &VerifyingKey,
    batch: &Batch,
    known: &KnownHashes,
) -> BatchVerdict {
    walk(
        cursor,
        check_records(&cursor.node_id, key, batch.clone()),
        known,
    )
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

    /// `check_batch` where the core holds no hashes to compare with beyond
    /// the cursor (resends count as duplicates).
    fn check_batch_fresh(cursor: &NodeCursor, key: &VerifyingKey, batch: &Batch) -> BatchVerdict {
        check_batch(cursor, key, batch, &KnownHashes::new())
    }
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
            let v1 = check_batch_fresh(&NodeCursor::new("n1"), &k.verifying_key(), &first);
            let v2 = check_batch_fresh(&v1.cursor, &k.verifying_key(), &second);
            (v1, v2)
        };
        let c1 = check_records("n1", &k.verifying_key(), first);
        let c2 = check_records("n1", &k.verifying_key(), second);
        let v1 = walk(&NodeCursor::new("n1"), c1, &KnownHashes::new());
        let v2 = walk(&v1.cursor, c2, &KnownHashes::new());
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
                let v = check_batch_fresh(
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
        let v = check_batch_fresh(&NodeCursor::new("n1"), &k.verifying_key(), &batch(&recs));
        assert_eq!(v.accepted.len(), 5);
        assert_eq!(v.cursor.contiguous_seq, 5);
        assert!(v.quarantined.is_empty() && v.duplicates == 0);
        // The same batch again: all duplicates, nothing moves.
        let again = check_batch_fresh(&v.cursor, &k.verifying_key(), &batch(&recs));
        assert_eq!((again.accepted.len(), again.duplicates), (0, 5));
        assert_eq!(again.cursor, v.cursor);
        // Overlapping: 4..=5 duplicates, nothing new.
        let more = chain("n1", &k, 7);
        let next = check_batch_fresh(&v.cursor, &k.verifying_key(), &batch(&more[3..]));
        assert_eq!((next.accepted.len(), next.duplicates), (2, 2));
        assert_eq!(next.cursor.contiguous_seq, 7);
    }

    #[test]
    fn a_flipped_byte_is_quarantined_once_and_passed() {
        let k = key(1);
        let mut recs = chain("n1", &k, 4);
        let last = recs[1].len() - 10;
        recs[1][last] ^= 1;
        let v = check_batch_fresh(&NodeCursor::new("n1"), &k.verifying_key(), &batch(&recs));
        // The bad record is kept aside and passed; the chain goes on.
        let accepted: Vec<u64> = v.accepted.iter().map(|a| a.seq).collect();
        assert_eq!(accepted, vec![1, 3, 4]);
        assert_eq!(v.quarantined.len(), 1, "{:?}", v.quarantined);
        assert_eq!(v.quarantined[0].seq, Some(2));
        assert_eq!(v.cursor.contiguous_seq, 4);
        // Sent again, it is a duplicate, not a second quarantine.
        let again = check_batch_fresh(&v.cursor, &k.verifying_key(), &batch(&recs));
        assert_eq!((again.duplicates, again.quarantined.len()), (4, 0));
    }

    #[test]
    fn records_signed_by_another_nodes_key_or_naming_it_are_quarantined() {
        let (a, b) = (key(1), key(2));
        // Node B's records sent over node A's connection.
        let recs = chain("b", &b, 2);
        let v = check_batch_fresh(&NodeCursor::new("a"), &a.verifying_key(), &batch(&recs));
        assert!(v.accepted.is_empty());
        assert_eq!(v.quarantined.len(), 2);
        assert!(v.quarantined[0].reason.contains("signature"));
        // Signed with A's key but naming node B.
        let recs = chain("b", &a, 1);
        let v = check_batch_fresh(&NodeCursor::new("a"), &a.verifying_key(), &batch(&recs));
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
        let v = check_batch_fresh(&NodeCursor::new("n1"), &k.verifying_key(), &b);
        assert_eq!((v.accepted.len(), v.deferred), (1, 2));
        assert_eq!(v.cursor.contiguous_seq, 1);
        b.lost = vec![LostRange {
            first: 2,
            last: 4,
            reason: LossReason::EdgeSalvaged as i32,
        }];
        let v = check_batch_fresh(&NodeCursor::new("n1"), &k.verifying_key(), &b);
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
        let v = check_batch_fresh(
            &NodeCursor::new("n1"),
            &k.verifying_key(),
            &batch(&[vec![0xff, 0x01]]),
        );
        assert_eq!(v.quarantined.len(), 1);
        assert_eq!(v.quarantined[0].seq, None);
    }
}
