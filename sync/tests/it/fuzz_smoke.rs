//! The crate's fuzz targets (`mec_sync::fuzz_targets`, run under libFuzzer
//! from `sync/fuzz/`) on stable, in CI: each over seeded random bytes and
//! mutations of real inputs (a real log segment, real frames, a real signed
//! batch), bounded in count and time.

use std::time::{Duration, Instant};

use mec_sync::fuzz_targets;
use mec_sync::wire::encode_frame;
use mec_sync::wire::pb::{edge_frame, Batch, EdgeFrame};
use prost::Message;
use rand::{Rng, RngCore, SeedableRng};

const CASES: usize = 20_000;
const AT_MOST: Duration = Duration::from_secs(20);

/// One input: random bytes, or a seed with a few random edits.
fn input(rng: &mut rand::rngs::StdRng, seeds: &[Vec<u8>]) -> Vec<u8> {
    if seeds.is_empty() || rng.random_bool(0.3) {
        let mut b = vec![0u8; rng.random_range(0..2048)];
        rng.fill_bytes(&mut b);
        return b;
    }
    let mut b = seeds[rng.random_range(0..seeds.len())].clone();
    for _ in 0..rng.random_range(1..6) {
        if b.is_empty() {
            break;
        }
        let at = rng.random_range(0..b.len());
        match rng.random_range(0..4) {
            0 => b[at] ^= 1 << rng.random_range(0..8),
            1 => b.truncate(at),
            2 => b.insert(at, rng.random()),
            _ => {
                let end = (at + rng.random_range(1..64)).min(b.len());
                b.drain(at..end);
            }
        }
    }
    b
}

fn run(name: &str, seeds: &[Vec<u8>], target: fn(&[u8])) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x6d65_6300 + name.len() as u64);
    let started = Instant::now();
    let mut n = 0;
    while n < CASES && started.elapsed() < AT_MOST {
        let data = input(&mut rng, seeds);
        if std::panic::catch_unwind(|| target(&data)).is_err() {
            panic!("{name}: fuzz input {n} breaks it: {}", hex::encode(&data));
        }
        n += 1;
    }
    assert!(n >= 100, "{name}: only {n} inputs in {AT_MOST:?}");
}

/// A real segment file of a log with a few records.
fn segment() -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let log = crate::common::open(
        dir.path(),
        crate::common::options(mec_sync::log::BackendChoice::File),
    )
    .unwrap();
    crate::common::append_seq(&log, 1, 6);
    log.close();
    let path = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.file_name().unwrap().to_string_lossy().starts_with("seg-"))
        .expect("a segment file");
    std::fs::read(path).unwrap()
}

fn signed_records(n: u64) -> Vec<Vec<u8>> {
    let dir = tempfile::tempdir().unwrap();
    let log = crate::common::open(
        dir.path(),
        crate::common::options(mec_sync::log::BackendChoice::File),
    )
    .unwrap();
    crate::common::append_seq(&log, 1, n);
    let out = log
        .read_from(1, n as usize, 1 << 20)
        .unwrap()
        .into_iter()
        .map(|(_, r)| r)
        .collect();
    log.close();
    out
}

#[test]
fn the_log_segment_scanner_holds_its_invariants_on_any_bytes() {
    run(
        "segment_scanner",
        &[segment()],
        fuzz_targets::segment_scanner,
    );
}

#[test]
fn the_sync_frame_decoder_holds_its_invariants_on_any_bytes() {
    let records = signed_records(3);
    let frames: Vec<u8> = [
        EdgeFrame {
            kind: Some(edge_frame::Kind::Batch(Batch {
                batch_id: 9,
                records,
                lost: vec![],
            })),
        },
        EdgeFrame {
            kind: Some(edge_frame::Kind::Hello(Default::default())),
        },
    ]
    .iter()
    .flat_map(encode_frame)
    .collect();
    run(
        "sync_frames",
        &[[vec![3, 17, 1, 60], frames].concat()],
        fuzz_targets::sync_frames,
    );
}

#[test]
fn core_ingest_decodes_any_batch_without_losing_count() {
    let records = signed_records(4);
    let mut seeds: Vec<Vec<u8>> = records.clone();
    seeds.push(
        Batch {
            batch_id: 1,
            records,
            lost: vec![],
        }
        .encode_to_vec(),
    );
    run("ingest_records", &seeds, fuzz_targets::ingest_records);
}
