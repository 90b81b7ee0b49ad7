//! Log full and disk full: appends fail with the distinct error, nothing
//! durable is lost, the seq stays dense, and appends work again once an ack
//! frees room.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use mec_sync::log::{BackendChoice, LogError, LogOptions, UsageLog};

/// Appends one record at a time until the first error; returns the seqs that
/// succeeded and the error.
fn fill(log: &UsageLog, from: u64, max: u64) -> (Vec<u64>, LogError) {
    rt().block_on(async {
        let mut ok = Vec::new();
        for i in from..from + max {
            match log.append(record(i)).await {
                Ok(s) => ok.push(s),
                Err(e) => return (ok, e),
            }
        }
        panic!("no error after {max} appends")
    })
}

#[test]
fn budget_full_refuses_then_ack_frees_room() {
    let dir = tempfile::tempdir().unwrap();
    let opts = LogOptions {
        budget_bytes: 8 * 1024,
        segment_bytes: 2048,
        backend: BackendChoice::File,
        ..LogOptions::default()
    };
    let log = open(dir.path(), opts).unwrap();
    let (ok, err) = fill(&log, 1, 10_000);
    assert!(matches!(err, LogError::Full(_)), "{err:?}");
    assert!(err.refuses_billable_work());
    assert_eq!(ok, (1..=ok.len() as u64).collect::<Vec<_>>());
    let n = ok.len() as u64;
    // Still full: nothing was dropped to make room.
    assert!(matches!(fill(&log, 100, 1).1, LogError::Full(_)));
    assert_eq!(log.read_from(1, 10_000, 1 << 20).unwrap().len() as u64, n);
    log.ack(n / 2).unwrap();
    let (more, err) = fill(&log, 200, 10_000);
    assert!(!more.is_empty(), "an ack frees room");
    assert_eq!(more[0], n + 1, "seqs stay dense across the refusal");
    assert!(matches!(err, LogError::Full(_)));
    log.close();
    assert!(verify(dir.path()).ok());
}

/// A small tmpfs mounted for one test; unmounted on drop.
struct Tmpfs(PathBuf, #[allow(dead_code)] tempfile::TempDir);

impl Tmpfs {
    fn mount(size: &str) -> Result<Tmpfs, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
        }
        Ok(Tmpfs(dir.path().to_path_buf(), dir))
    }
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

fn disk_full(backend: BackendChoice) {
    let fs = match Tmpfs::mount("192k") {
        Ok(fs) => fs,
        Err(e) => {
            eprintln!("SKIPPED disk-full test: cannot mount a small tmpfs here ({e}); needs root or CAP_SYS_ADMIN");
            return;
        }
    };
    let dir = fs.path().join("log");
    let opts = LogOptions {
        budget_bytes: 1 << 30,
        segment_bytes: 16 * 1024,
        backend,
        ..LogOptions::default()
    };
    let log = open(&dir, opts.clone()).unwrap();
    let (ok, err) = fill(&log, 1, 100_000);
    assert!(
        matches!(err, LogError::Full(ref m) if m.contains("No space")),
        "{err:?}"
    );
    let n = ok.len() as u64;
    assert_eq!(ok, (1..=n).collect::<Vec<_>>());
    // Refused again while the disk is full; nothing durable is lost.
    assert!(matches!(fill(&log, 50_000, 1).1, LogError::Full(_)));
    assert_eq!(log.read_from(1, 100_000, 64 << 20).unwrap().len() as u64, n);
    assert_eq!(log.stats().durable_seq, n);
    // The core acknowledges: whole segments go, and appends work again.
    log.ack(n).unwrap();
    let (more, more_err) = fill(&log, 60_000, 100_000);
    assert!(
        more.len() > 10,
        "appends work again after the ack freed room: {} appended, then {more_err:?}",
        more.len()
    );
    assert_eq!(more[0], n + 1, "no seq was burnt by the failed appends");
    log.close();
    let report = verify(&dir);
    assert!(report.ok(), "{:?}", report.problems);
    // And the log reopens cleanly from what is on the full disk.
    let log = open(&dir, opts).unwrap();
    assert_eq!(log.stats().durable_seq, n + more.len() as u64);
}

#[test]
fn disk_full_refuses_then_ack_frees_room_on_file_backend() {
    disk_full(BackendChoice::File);
}

#[test]
fn disk_full_refuses_then_ack_frees_room_on_uring_backend() {
    if mec_sync::log::probe_uring().is_ok() {
        disk_full(BackendChoice::Uring);
    } else {
        eprintln!("SKIPPED: io_uring refused here");
    }
}

#[test]
fn closing_a_log_whose_disk_cannot_be_repaired_does_not_hang() {
    let fs = match Tmpfs::mount("128k") {
        Ok(fs) => fs,
        Err(e) => {
            eprintln!(
                "SKIPPED: cannot mount a small tmpfs here ({e}); needs root or CAP_SYS_ADMIN"
            );
            return;
        }
    };
    let dir = fs.path().join("log");
    let opts = LogOptions {
        budget_bytes: 1 << 30,
        segment_bytes: 1 << 30,
        backend: BackendChoice::File,
        ..LogOptions::default()
    };
    let log = open(&dir, opts).unwrap();
    let (ok, err) = fill(&log, 1, 100_000);
    assert!(matches!(err, LogError::Full(_)));
    // The active segment disappears: the writer can no longer reopen it, so
    // every repair fails and the log stays refusing.
    for seg in segments(&dir) {
        std::fs::remove_file(seg).unwrap();
    }
    let e = fill(&log, 200_000, 3).1;
    assert!(e.refuses_billable_work(), "{e:?}");
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        drop(log);
        let _ = done_tx.send(());
    });
    done_rx
        .recv_timeout(std::time::Duration::from_secs(10))
        .expect("closing the log must not wait for a disk that never recovers");
    assert!(!ok.is_empty());
}
