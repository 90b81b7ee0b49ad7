//! Named crash states of the usage log: each test builds the bytes a crash
//! leaves behind, reopens, and checks what recovery keeps and refuses.

use crate::common;

use std::fs;
use std::io::Write;

use common::*;
use mec_sync::log::format::{self, SegmentHeader, FRAME_HEADER_LEN, SEGMENT_HEADER_LEN};
use mec_sync::log::{BackendChoice, LogError, LogOptions};

fn file_opts() -> LogOptions {
    options(BackendChoice::File)
}

/// Writes 10 records, closes, and returns the segment path and its bytes.
fn ten_records(dir: &std::path::Path) -> (std::path::PathBuf, Vec<u8>) {
    let log = open(dir, file_opts()).unwrap();
    assert_eq!(append_seq(&log, 1, 10), (1..=10).collect::<Vec<_>>());
    log.close();
    let seg = segments(dir).pop().unwrap();
    let bytes = fs::read(&seg).unwrap();
    (seg, bytes)
}

fn frame_offsets(bytes: &[u8]) -> Vec<u64> {
    format::scan_segment(bytes)
        .frames
        .iter()
        .map(|f| f.offset)
        .collect()
}

#[test]
fn writer_recovers_when_last_frame_was_torn() {
    let dir = tempfile::tempdir().unwrap();
    let (seg, bytes) = ten_records(dir.path());
    let offs = frame_offsets(&bytes);
    // Cut frame 10 in half.
    fs::write(&seg, &bytes[..offs[9] as usize + 20]).unwrap();
    let report = verify(dir.path());
    assert!(
        report.ok(),
        "verify leaves a torn tail alone and passes: {:?}",
        report.problems
    );
    assert_eq!(report.last_seq, Some(9));
    let log = open(dir.path(), file_opts()).unwrap();
    assert_eq!(log.stats().durable_seq, 9);
    assert_eq!(
        fs::metadata(&seg).unwrap().len(),
        offs[9],
        "the torn bytes are truncated"
    );
    // Seq 10 was never acknowledged to anyone: it is reused, chained to record 9.
    assert_eq!(append_seq(&log, 100, 2), vec![10, 11]);
    log.close();
    let report = verify(dir.path());
    assert!(report.ok(), "{:?}", report.problems);
    assert_eq!(report.records, 11);
}

#[test]
fn writer_recovers_from_zero_filled_tail() {
    let dir = tempfile::tempdir().unwrap();
    let (seg, _) = ten_records(dir.path());
    let len = fs::metadata(&seg).unwrap().len();
    fs::OpenOptions::new()
        .append(true)
        .open(&seg)
        .unwrap()
        .write_all(&[0u8; 4096])
        .unwrap();
    let log = open(dir.path(), file_opts()).unwrap();
    assert_eq!(log.stats().durable_seq, 10);
    assert_eq!(fs::metadata(&seg).unwrap().len(), len);
    assert_eq!(append_seq(&log, 11, 1), vec![11]);
    log.close();
    assert!(verify(dir.path()).ok());
}

#[test]
fn damaged_middle_frame_refuses_to_open_then_salvage_continues() {
    let dir = tempfile::tempdir().unwrap();
    let (seg, mut bytes) = ten_records(dir.path());
    let offs = frame_offsets(&bytes);
    // Flip a byte inside record 5's payload; records 6..10 stay intact.
    bytes[offs[4] as usize + FRAME_HEADER_LEN + 10] ^= 0x40;
    fs::write(&seg, &bytes).unwrap();

    let err = open(dir.path(), file_opts()).unwrap_err();
    match &err {
        LogError::Damaged { path, offset, .. } => {
            assert_eq!(path, &seg);
            assert_eq!(*offset, offs[4]);
        }
        other => panic!("expected Damaged, got {other:?}"),
    }
    let msg = err.to_string();
    assert!(
        msg.contains("seg-00000000000000000001.log") && msg.contains("salvage"),
        "{msg}"
    );
    assert!(!verify(dir.path()).ok(), "verify reports the damage");
    assert_eq!(
        fs::read(&seg).unwrap(),
        bytes,
        "a refused open changes nothing"
    );

    let report = mec_sync::log::salvage::salvage(dir.path())
        .unwrap()
        .expect("something to salvage");
    assert_eq!(
        (report.lost.first, report.lost.last),
        (5, 5),
        "only the damaged record is lost"
    );
    assert_eq!((report.kept_before, report.kept_after), (4, 5));
    assert!(
        std::path::Path::new(&report.moved_to).exists(),
        "the damaged original is kept"
    );

    let log = open(dir.path(), file_opts()).unwrap();
    assert_eq!(log.lost_ranges().len(), 1);
    assert_eq!(log.stats().durable_seq, 10);
    assert_eq!(append_seq(&log, 11, 1), vec![11]);
    let seqs: Vec<u64> = log
        .read_from(1, 100, 1 << 20)
        .unwrap()
        .iter()
        .map(|r| r.0)
        .collect();
    assert_eq!(seqs, vec![1, 2, 3, 4, 6, 7, 8, 9, 10, 11]);
    log.close();
    let v = verify(dir.path());
    assert!(v.ok(), "{:?}", v.problems);
    assert_eq!(v.lost.len(), 1);
    assert!(mec_sync::log::salvage::salvage(dir.path())
        .unwrap()
        .is_none());
}

#[test]
fn acknowledged_position_ahead_of_the_data_never_reuses_a_seq() {
    let dir = tempfile::tempdir().unwrap();
    let (seg, bytes) = ten_records(dir.path());
    // The core acknowledged up to 20 (with that record's hash), but the box
    // only has 10 records: its tail was lost.
    let hash = [0xabu8; 32];
    fs::write(
        dir.path().join("ack"),
        format::AckState { seq: 20, hash }.encode(),
    )
    .unwrap();
    let _ = (seg, bytes);
    let log = open(dir.path(), file_opts()).unwrap();
    assert_eq!(log.stats().acked_seq, 20);
    assert_eq!(append_seq(&log, 21, 1), vec![21]);
    let got = log.read_from(1, 10, 1 << 20).unwrap();
    assert_eq!(got.len(), 1);
    let rec = mec_sync::record::SignedRecord::from_bytes(&got[0].1)
        .unwrap()
        .record()
        .unwrap();
    assert_eq!(
        rec.prev_hash,
        hash.to_vec(),
        "the chain continues from the acknowledged record"
    );
    log.close();
    assert!(verify(dir.path()).ok());
}

#[test]
fn rotation_interrupted_before_header_was_durable() {
    let dir = tempfile::tempdir().unwrap();
    ten_records(dir.path());
    // The next segment's file exists, with half a header.
    let next = dir.path().join(format::segment_file_name(11));
    let header = SegmentHeader {
        base_seq: 11,
        prev_hash: [0; 32],
    }
    .encode();
    fs::write(&next, &header[..SEGMENT_HEADER_LEN / 2]).unwrap();
    let log = open(dir.path(), file_opts()).unwrap();
    assert!(!next.exists(), "the half-made segment is removed");
    assert_eq!(append_seq(&log, 11, 1), vec![11]);
    log.close();
    assert!(verify(dir.path()).ok());
}

#[test]
fn rotation_interrupted_after_header_continues_in_the_new_segment() {
    let dir = tempfile::tempdir().unwrap();
    let (seg, bytes) = ten_records(dir.path());
    let scan = format::scan_segment(&bytes);
    let last = scan.frames.last().unwrap();
    let payload =
        &bytes[last.offset as usize + FRAME_HEADER_LEN..(last.offset + last.len as u64) as usize];
    let body = mec_sync::record::SignedRecord::from_bytes(payload)
        .unwrap()
        .body;
    let next = dir.path().join(format::segment_file_name(11));
    fs::write(
        &next,
        SegmentHeader {
            base_seq: 11,
            prev_hash: format::sha256(&body),
        }
        .encode(),
    )
    .unwrap();
    let log = open(dir.path(), file_opts()).unwrap();
    assert_eq!(append_seq(&log, 11, 1), vec![11]);
    log.close();
    assert_eq!(fs::read(&seg).unwrap(), bytes);
    assert_eq!(
        format::scan_segment(&fs::read(&next).unwrap()).frames.len(),
        1
    );
    assert!(verify(dir.path()).ok());
}

#[test]
fn missing_segment_between_others_is_a_named_gap() {
    let dir = tempfile::tempdir().unwrap();
    let opts = LogOptions {
        segment_bytes: 1,
        ..file_opts()
    };
    let log = open(dir.path(), opts.clone()).unwrap();
    append_seq(&log, 1, 5);
    log.close();
    let segs = segments(dir.path());
    assert!(segs.len() >= 4, "one record per segment: {segs:?}");
    fs::remove_file(&segs[2]).unwrap();
    let err = open(dir.path(), opts).unwrap_err();
    assert!(matches!(err, LogError::Inconsistent { .. }), "{err:?}");
    assert!(err.to_string().contains("previous record"), "{err}");
}

#[test]
fn ack_deletes_whole_segments_and_persists() {
    let dir = tempfile::tempdir().unwrap();
    let opts = LogOptions {
        segment_bytes: 600,
        ..file_opts()
    };
    let log = open(dir.path(), opts.clone()).unwrap();
    append_seq(&log, 1, 20);
    let before = segments(dir.path()).len();
    assert!(before > 3);
    assert!(matches!(
        log.ack(21),
        Err(LogError::AckBeyondDurable {
            seq: 21,
            durable: 20
        })
    ));
    log.ack(12).unwrap();
    log.ack(5).unwrap(); // older: no change
    assert_eq!(log.stats().acked_seq, 12);
    assert_eq!(log.stats().backlog_records, 8);
    let after = segments(dir.path());
    assert!(after.len() < before);
    let first = log.read_from(0, 1, 1 << 20).unwrap();
    assert!(first[0].0 <= 13, "record 13 is still readable");
    log.close();
    let log = open(dir.path(), opts).unwrap();
    assert_eq!(log.stats().acked_seq, 12);
    assert_eq!(log.read_from(13, 100, 1 << 20).unwrap().len(), 8);
    log.ack(20).unwrap();
    assert_eq!(
        segments(dir.path()).len(),
        1,
        "the active segment is never deleted"
    );
    assert_eq!(
        append_seq(&log, 21, 1),
        vec![21],
        "the chain continues after everything was acknowledged"
    );
    log.close();
    assert!(verify(dir.path()).ok());
}

#[test]
fn damaged_ack_file_is_refused_with_its_name() {
    let dir = tempfile::tempdir().unwrap();
    ten_records(dir.path());
    fs::write(dir.path().join("ack"), b"garbage").unwrap();
    let err = open(dir.path(), file_opts()).unwrap_err().to_string();
    assert!(err.contains("ack"), "{err}");
}

#[test]
fn log_of_another_node_key_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    ten_records(dir.path());
    let other = mec_sync::identity::NodeIdentity::from_signing_key(
        ed25519_dalek::SigningKey::from_bytes(&[2; 32]),
    );
    let err = mec_sync::log::UsageLog::open(dir.path(), other, NODE, file_opts()).unwrap_err();
    assert!(err.to_string().contains("belongs to node"), "{err}");
}

#[test]
fn salvage_keeps_intact_records_of_the_damaged_records_own_write() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path(), file_opts()).unwrap();
    // One group commit of 40 records, then one more write.
    let log = std::sync::Arc::new(log);
    rt().block_on(async {
        let tasks: Vec<_> = (0..40)
            .map(|i| {
                let log = log.clone();
                tokio::spawn(async move { log.append(record(i)).await.unwrap() })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
    });
    append_seq(&log, 100, 1);
    drop(log);
    let seg = segments(dir.path()).pop().unwrap();
    let mut bytes = fs::read(&seg).unwrap();
    let offs = frame_offsets(&bytes);
    bytes[offs[2] as usize + FRAME_HEADER_LEN + 5] ^= 0x01;
    fs::write(&seg, &bytes).unwrap();
    if let Ok(log) = open(dir.path(), file_opts()) {
        // All 40 landed in separate writes on this run: damage is refused the same way.
        panic!("damaged log opened: {:?}", log.stats());
    }
    let report = mec_sync::log::salvage::salvage(dir.path())
        .unwrap()
        .unwrap();
    assert_eq!((report.lost.first, report.lost.last), (3, 3));
    assert_eq!(report.kept_before + report.kept_after, 40);
    let v = verify(dir.path());
    assert!(v.ok(), "{:?}", v.problems);
    assert_eq!(v.records, 40);
}

/// `log salvage` cut short by a crash after any of its steps, then run
/// again until it has nothing left to do: the log opens with exactly the
/// records an uninterrupted salvage keeps, and the loss recorded once.
#[test]
fn a_salvage_interrupted_at_any_step_finishes_when_run_again_and_keeps_every_intact_record() {
    let whole = tempfile::tempdir().unwrap();
    let (seg, mut bytes) = ten_records(whole.path());
    let offs = frame_offsets(&bytes);
    bytes[offs[4] as usize + FRAME_HEADER_LEN + 10] ^= 0x40;
    fs::write(&seg, &bytes).unwrap();
    let kept = |dir: &std::path::Path| -> (Vec<u64>, usize) {
        let log = open(dir, file_opts()).unwrap_or_else(|e| panic!("{e}"));
        let seqs = log
            .read_from(1, 100, 1 << 20)
            .unwrap()
            .iter()
            .map(|r| r.0)
            .collect();
        let lost = log.lost_ranges().len();
        log.close();
        (seqs, lost)
    };
    for steps in 0..5 {
        let dir = tempfile::tempdir().unwrap();
        for e in fs::read_dir(whole.path()).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_file() {
                fs::copy(e.path(), dir.path().join(e.file_name())).unwrap();
            }
        }
        let _ = mec_sync::log::salvage::salvage_until(dir.path(), steps);
        let mut runs = 0;
        while mec_sync::log::salvage::salvage(dir.path())
            .unwrap_or_else(|e| panic!("after a cut at step {steps}: {e}"))
            .is_some()
        {
            runs += 1;
            assert!(runs < 4, "salvage never finishes");
        }
        assert_eq!(
            kept(dir.path()),
            (vec![1, 2, 3, 4, 6, 7, 8, 9, 10], 1),
            "cut after step {steps}"
        );
    }
}
