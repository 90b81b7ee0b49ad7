//! Property tests of the frame codec and of recovery: random record streams,
//! then random truncations and byte flips near the tail. Recovery must keep
//! exactly the intact frames, in order, and never call damage to an earlier
//! write a torn tail.

use crate::common;

use std::fs;

use common::*;
use mec_sync::log::format::{
    self, SegmentEnd, SegmentHeader, FRAME_HEADER_LEN, SEGMENT_HEADER_LEN,
};
use mec_sync::log::BackendChoice;
use proptest::prelude::*;

/// A segment of frames with the given payloads, each frame its own write.
fn build(payloads: &[Vec<u8>], batch_every: usize) -> (Vec<u8>, Vec<usize>) {
    let mut b = SegmentHeader {
        base_seq: 1,
        prev_hash: [0; 32],
    }
    .encode()
    .to_vec();
    let mut ends = Vec::new();
    let mut batch_start = 1;
    for (i, p) in payloads.iter().enumerate() {
        let seq = i as u64 + 1;
        if i % batch_every == 0 {
            batch_start = seq;
        }
        format::encode_frame(&mut b, seq, batch_start, p);
        ends.push(b.len());
    }
    (b, ends)
}

fn payloads() -> impl Strategy<Value = Vec<Vec<u8>>> {
    prop::collection::vec(prop::collection::vec(any::<u8>(), 1..300), 1..40)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn frames_round_trip(payloads in payloads(), batch_every in 1usize..5) {
        let (bytes, _) = build(&payloads, batch_every);
        let scan = format::scan_segment(&bytes);
        prop_assert_eq!(&scan.end, &SegmentEnd::Clean);
        prop_assert_eq!(scan.frames.len(), payloads.len());
        for (f, p) in scan.frames.iter().zip(&payloads) {
            let got = &bytes[f.offset as usize + FRAME_HEADER_LEN..(f.offset + f.len as u64) as usize];
            prop_assert_eq!(got, p.as_slice());
        }
    }

    #[test]
    fn truncation_keeps_exactly_the_whole_frames(payloads in payloads(), cut in any::<prop::sample::Index>()) {
        let (bytes, ends) = build(&payloads, 1);
        let cut = SEGMENT_HEADER_LEN + cut.index(bytes.len() - SEGMENT_HEADER_LEN + 1);
        let scan = format::scan_segment(&bytes[..cut]);
        let whole = ends.iter().filter(|&&e| e <= cut).count();
        prop_assert_eq!(scan.frames.len(), whole);
        let clean = whole == 0 && cut == SEGMENT_HEADER_LEN || ends.get(whole.wrapping_sub(1)) == Some(&cut);
        prop_assert_eq!(matches!(scan.end, SegmentEnd::Clean), clean);
        let clean_or_torn = matches!(scan.end, SegmentEnd::Clean | SegmentEnd::TornTail { .. });
        prop_assert!(clean_or_torn, "never damage: {:?}", scan.end);
    }

    #[test]
    fn flip_in_the_last_write_is_torn_and_earlier_is_damage(
        payloads in payloads(),
        batch_every in 1usize..5,
        at in any::<prop::sample::Index>(),
        bit in 0u8..8,
    ) {
        let (mut bytes, ends) = build(&payloads, batch_every);
        let pos = SEGMENT_HEADER_LEN + at.index(bytes.len() - SEGMENT_HEADER_LEN);
        bytes[pos] ^= 1 << bit;
        let hit = ends.iter().position(|&e| pos < e).unwrap();
        let scan = format::scan_segment(&bytes);
        // Every frame before the flipped one is kept, in order, and none after.
        prop_assert_eq!(scan.frames.len(), hit);
        for (i, f) in scan.frames.iter().enumerate() {
            prop_assert_eq!(f.seq, i as u64 + 1);
        }
        let last_batch_start = ((payloads.len() - 1) / batch_every) * batch_every;
        if hit >= last_batch_start {
            let torn = matches!(scan.end, SegmentEnd::TornTail { .. });
            prop_assert!(torn, "torn expected: {:?}", scan.end);
        } else {
            let damaged = matches!(scan.end, SegmentEnd::Damaged { .. });
            prop_assert!(damaged, "damage expected: {:?}", scan.end);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Through the real log: append, cut the file anywhere, reopen. The log
    /// keeps exactly the whole records, continues densely, and verifies.
    #[test]
    fn reopened_log_keeps_whole_records_and_continues(n in 1u64..30, cut in any::<prop::sample::Index>()) {
        let dir = tempfile::tempdir().unwrap();
        let log = open(dir.path(), options(BackendChoice::File)).unwrap();
        append_seq(&log, 1, n);
        log.close();
        let seg = segments(dir.path()).pop().unwrap();
        let bytes = fs::read(&seg).unwrap();
        let ends: Vec<usize> = format::scan_segment(&bytes).frames.iter().map(|f| (f.offset + f.len as u64) as usize).collect();
        let cut = SEGMENT_HEADER_LEN + cut.index(bytes.len() - SEGMENT_HEADER_LEN + 1);
        fs::write(&seg, &bytes[..cut]).unwrap();
        let kept = ends.iter().filter(|&&e| e <= cut).count() as u64;
        let log = open(dir.path(), options(BackendChoice::File)).unwrap();
        prop_assert_eq!(log.stats().durable_seq, kept);
        prop_assert_eq!(append_seq(&log, 1000, 2), vec![kept + 1, kept + 2]);
        log.close();
        let report = verify(dir.path());
        prop_assert!(report.ok(), "{:?}", report.problems);
        prop_assert_eq!(report.records, kept + 2);
    }
}
