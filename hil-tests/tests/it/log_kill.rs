//! The kill test: a child process appends in a loop and prints each seq once
//! `append` has returned; the test SIGKILLs it at random moments, reopens, and
//! checks that every printed seq is present and intact, seqs are dense from 1,
//! and the chain and every signature verify.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use mec_sync::identity::NodeIdentity;
use mec_sync::log::{verify, BackendChoice, LogOptions, UsageLog};

const ROUNDS: u32 = 20;

/// A small deterministic generator for the kill moments (no extra crate).
fn next_delay(state: &mut u64) -> Duration {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    Duration::from_millis(20 + *state % 250)
}

fn kill_loop(backend: &str) {
    let dir = tempfile::tempdir().unwrap();
    let log_dir = dir.path().join("log");
    let key = SigningKey::from_bytes(&hil_tests::KILL_TEST_KEY);
    let mut printed = BTreeSet::new();
    let mut rng = 0x9e3779b97f4a7c15u64 ^ std::process::id() as u64;
    let deadline = Instant::now() + Duration::from_secs(120);
    for round in 0..ROUNDS {
        assert!(Instant::now() < deadline, "kill loop over its time bound");
        let mut child = Command::new(env!("CARGO_BIN_EXE_log-append-loop"))
            .arg(&log_dir)
            .arg("16")
            .arg(backend)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
                .filter_map(|l| l.parse::<u64>().ok())
                .collect::<Vec<u64>>()
        });
        std::thread::sleep(next_delay(&mut rng));
        unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
        child.wait().unwrap();
        let seqs = reader.join().unwrap();
        printed.extend(seqs.iter().copied());

        // `edge-agent log verify` semantics on the crashed log, before any reopen.
        let report = verify::verify_log(&log_dir, &key.verifying_key());
        assert!(
            report.ok(),
            "round {round}: verify after SIGKILL: {:?}",
            report.problems
        );
        let last = report.last_seq.unwrap_or(0);
        let max_printed = printed.iter().next_back().copied().unwrap_or(0);
        assert!(
            last >= max_printed,
            "round {round}: printed seq {max_printed} but the log ends at {last}"
        );
        assert_eq!(report.first_seq.unwrap_or(1), 1);
        assert_eq!(report.records, last, "round {round}: seqs dense from 1");
    }
    // Reopen through recovery and read every record back.
    let identity = NodeIdentity::from_signing_key(key);
    let log = UsageLog::open(
        &log_dir,
        identity,
        "kill-test-node",
        LogOptions {
            backend: BackendChoice::File,
            ..LogOptions::default()
        },
    )
    .unwrap();
    let durable = log.stats().durable_seq;
    let all = log.read_from(1, usize::MAX, usize::MAX).unwrap();
    assert_eq!(all.len() as u64, durable);
    let present: BTreeSet<u64> = all.iter().map(|r| r.0).collect();
    let missing: Vec<_> = printed.difference(&present).take(5).collect();
    assert!(missing.is_empty(), "acknowledged seqs lost: {missing:?}");
    for (seq, payload) in &all {
        let signed = mec_sync::record::SignedRecord::from_bytes(payload).unwrap();
        signed.verify(&log.identity().verifying_key()).unwrap();
        assert_eq!(signed.record().unwrap().seq, *seq);
    }
    eprintln!(
        "kill test ({backend}): {ROUNDS} SIGKILLs, {} acknowledged seqs, {durable} durable records",
        printed.len()
    );
    assert!(printed.len() > ROUNDS as usize, "the child made progress");
}

#[test]
fn sigkill_mid_append_loses_no_acknowledged_record_file_backend() {
    kill_loop("file");
}

#[test]
fn sigkill_mid_append_loses_no_acknowledged_record_uring_backend() {
    if let Err(e) = mec_sync::log::probe_uring() {
        eprintln!("SKIPPED: io_uring refused here ({e})");
        return;
    }
    kill_loop("uring");
}
