//! The bodies of the fuzz targets of this crate: each takes arbitrary bytes
//! from outside and checks what must hold whatever they are (no panic, and
//! the invariant named). `sync/fuzz/` runs them under libFuzzer (nightly,
//! `cargo +nightly fuzz run <target>`); `tests/it/fuzz_smoke.rs` runs them on
//! stable over seeded random and mutated inputs for a bounded count, in CI.

use prost::Message;

use crate::ingest::{check_records, walk, KnownHashes, NodeCursor};
use crate::log::format::{self, FrameRead, SegmentEnd};
use crate::wire::pb::{Batch, CoreFrame, EdgeFrame};
use crate::wire::{encode_frame, FrameDecoder};

/// The log's segment scanner (recovery reads every segment through it):
/// the intact frames it reports lie inside the bytes, in order, with dense
/// seqs, each reading back as itself; what follows is classified within
/// the bytes.
pub fn segment_scanner(data: &[u8]) {
    let scan = format::scan_segment(data);
    assert!(scan.valid_end as usize <= data.len());
    let mut expect_seq = scan.header.as_ref().map(|h| h.base_seq);
    let mut end = format::SEGMENT_HEADER_LEN as u64;
    for f in &scan.frames {
        assert_eq!(Some(f.seq), expect_seq, "dense seqs");
        assert_eq!(f.offset, end, "frames follow each other");
        end = f.offset + u64::from(f.len);
        assert!(end <= scan.valid_end);
        match format::read_frame(&data[f.offset as usize..end as usize]) {
            FrameRead::Frame { seq, .. } => assert_eq!(seq, f.seq),
            other => panic!("a reported frame does not read back: {other:?}"),
        }
        expect_seq = f.seq.checked_add(1);
    }
    match scan.end {
        SegmentEnd::TornTail { offset, .. } => assert!(offset as usize <= data.len()),
        SegmentEnd::Damaged {
            offset,
            next_intact,
            ..
        } => assert!(offset < next_intact && (next_intact as usize) < data.len()),
        SegmentEnd::Clean | SegmentEnd::BadHeader(_) => {}
    }
    // The tools that look past damage stay inside the bytes too.
    if let Some(at) = format::find_any_intact_frame(data) {
        assert!(at < data.len());
    }
}

/// The upload protocol's frame decoder, fed the bytes in pieces whose sizes
/// the first bytes choose: whole messages or a clean error, never a panic;
/// a decoded message re-encodes to a frame that decodes to itself; it never
/// holds more bytes than it was given.
pub fn sync_frames(data: &[u8]) {
    let (cuts, bytes) = data.split_at(data.len().min(4));
    for as_core in [false, true] {
        let mut dec = FrameDecoder::new();
        let (mut at, mut given) = (0usize, 0usize);
        let mut cut = cuts.iter().cycle();
        'feed: while at < bytes.len() {
            let n = (usize::from(*cut.next().unwrap_or(&255)) % 61 + 1).min(bytes.len() - at);
            dec.push(&bytes[at..at + n]);
            at += n;
            given += n;
            loop {
                let r = next_encoded(&mut dec, as_core);
                match r {
                    Ok(Some(wire)) => {
                        let mut again = FrameDecoder::new();
                        again.push(&wire);
                        let round = next_encoded(&mut again, as_core);
                        assert_eq!(round, Ok(Some(wire)), "a decoded message round-trips");
                    }
                    Ok(None) => break,
                    Err(_) => break 'feed, // the connection closes here
                }
            }
            assert!(dec.buffered() <= given);
        }
    }
}

/// The node whose records [`ingest_records`] checks: the id and key the
/// tests' seed records carry, so mutated seeds reach the deeper checks.
pub const FUZZ_NODE: &str = "node-test";

/// The next whole frame, as a core's or an edge's message, encoded again.
fn next_encoded(
    dec: &mut FrameDecoder,
    as_core: bool,
) -> Result<Option<Vec<u8>>, crate::wire::FrameError> {
    if as_core {
        dec.next_frame::<CoreFrame>()
            .map(|m| m.map(|m| encode_frame(&m)))
    } else {
        dec.next_frame::<EdgeFrame>()
            .map(|m| m.map(|m| encode_frame(&m)))
    }
}

/// core-ingest's decoding and placing of a batch from a node: the bytes as
/// a `Batch`, and as one record of a batch. Never a panic; every record is
/// accounted for (stored, duplicate, quarantined or deferred); what is
/// stored has dense seqs after the cursor.
pub fn ingest_records(data: &[u8]) {
    let key = ed25519_dalek::SigningKey::from_bytes(&[1; 32]).verifying_key();
    let batches = [
        Batch::decode(data).ok(),
        Some(Batch {
            batch_id: 1,
            records: vec![data.to_vec()],
            lost: vec![],
        }),
    ];
    for batch in batches.into_iter().flatten() {
        let n = batch.records.len() as u64;
        let cursor = NodeCursor::new(FUZZ_NODE);
        let checked = check_records(FUZZ_NODE, &key, batch);
        let v = walk(&cursor, checked, &KnownHashes::new());
        let accounted =
            v.accepted.len() as u64 + v.quarantined.len() as u64 + v.duplicates + v.deferred
                - v.forks;
        assert_eq!(accounted, n, "every record is accounted for");
        let mut seq = cursor.contiguous_seq;
        for a in &v.accepted {
            assert!(a.seq > seq);
            seq = a.seq;
        }
        assert!(v.cursor.contiguous_seq >= seq);
    }
}
