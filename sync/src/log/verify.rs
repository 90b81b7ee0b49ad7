//! Full, read-only verification of a log directory, for `edge-agent log
//! verify`: frames, seq density, the hash chain, and every signature against
//! the node's public key. Unlike opening the log, it changes nothing: a torn
//! tail is reported (it is what a crash mid-append leaves) and left in place.

use std::path::Path;

use ed25519_dalek::VerifyingKey;

use super::format::{self, SegmentEnd};
use super::recovery::{self, covered_by_lost, LostRange};
use crate::record::{SignedRecord, UsageRecord};

/// What `verify` found. Serialised as the JSON summary of the CLI.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct VerifyReport {
    /// The log directory.
    pub dir: String,
    /// Intact records found.
    pub records: u64,
    /// First seq in the log (none when empty).
    pub first_seq: Option<u64>,
    /// Last seq in the log.
    pub last_seq: Option<u64>,
    /// Acknowledged seq from the `ack` file.
    pub acked_seq: u64,
    /// Bytes of all segment files.
    pub bytes: u64,
    /// Segment files.
    pub segments: usize,
    /// Bytes after the last intact frame of the last segment: a write that a
    /// crash interrupted, never acknowledged; the next open truncates them.
    pub torn_tail_bytes: u64,
    /// Ranges given up by `salvage`.
    pub lost: Vec<LostRange>,
    /// Everything wrong; empty means the log verifies.
    pub problems: Vec<String>,
}

impl VerifyReport {
    /// True when nothing is wrong.
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Calls `visit` for every intact record of the log in `dir`, in order, with
/// the envelope and the decoded body (or the decode error). Read-only.
pub fn for_each_record(
    dir: &Path,
    mut visit: impl FnMut(u64, &SignedRecord, Result<UsageRecord, String>),
) -> Result<(), super::LogError> {
    for (_, path) in recovery::list_segments(dir)? {
        let bytes = std::fs::read(&path).map_err(|e| super::LogError::io(&path, e))?;
        let scan = format::scan_segment(&bytes);
        for f in &scan.frames {
            let payload = &bytes
                [f.offset as usize + format::FRAME_HEADER_LEN..(f.offset + f.len as u64) as usize];
            match SignedRecord::from_bytes(payload) {
                Ok(signed) => {
                    let rec = signed.record().map_err(|e| e.to_string());
                    visit(f.seq, &signed, rec)
                }
                Err(e) => visit(f.seq, &SignedRecord::default(), Err(e.to_string())),
            }
        }
    }
    Ok(())
}

/// Verifies the log in `dir` against `key`.
pub fn verify_log(dir: &Path, key: &VerifyingKey) -> VerifyReport {
    let mut report = VerifyReport {
        dir: dir.display().to_string(),
        ..Default::default()
    };
    let problem = |r: &mut VerifyReport, p: String| {
        if r.problems.len() < 100 {
            r.problems.push(p);
        } else if r.problems.len() == 100 {
            r.problems.push("more problems not listed".into());
        }
    };
    let ack = match recovery::read_ack(dir) {
        Ok(a) => a,
        Err(e) => {
            problem(&mut report, e.to_string());
            format::AckState::NONE
        }
    };
    report.acked_seq = ack.seq;
    report.lost = match recovery::read_lost(dir) {
        Ok(l) => l,
        Err(e) => {
            problem(&mut report, e.to_string());
            Vec::new()
        }
    };
    let files = match recovery::list_segments(dir) {
        Ok(f) => f,
        Err(e) => {
            problem(&mut report, e.to_string());
            return report;
        }
    };
    report.segments = files.len();
    let key_id = crate::identity::key_id(key);
    let mut prev: Option<(u64, [u8; 32])> = None;
    let mut node_id: Option<String> = None;
    let n = files.len();
    for (i, (base, path)) in files.iter().enumerate() {
        let name = path.display();
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) => {
                problem(&mut report, format!("{name}: {e}"));
                continue;
            }
        };
        report.bytes += bytes.len() as u64;
        let scan = format::scan_segment(&bytes);
        let is_last = i + 1 == n;
        match &scan.end {
            SegmentEnd::Clean => {}
            SegmentEnd::TornTail { offset, .. } if is_last => report.torn_tail_bytes = bytes.len() as u64 - offset,
            SegmentEnd::BadHeader(_) if is_last && format::find_any_intact_frame(&bytes).is_none() => {
                // An interrupted rotation: nothing was written into it.
                report.torn_tail_bytes = bytes.len() as u64;
                continue;
            }
            SegmentEnd::BadHeader(reason) => problem(&mut report, format!("{name}: damaged header: {reason}")),
            SegmentEnd::TornTail { offset, reason } => {
                problem(&mut report, format!("{name}: offset {offset}: {reason} in a segment that is not the last"))
            }
            SegmentEnd::Damaged { offset, reason, next_seq, .. } => problem(
                &mut report,
                format!("{name}: offset {offset}: {reason}, and intact record {next_seq} follows: acknowledged data is damaged"),
            ),
        }
        let Some(header) = scan.header else { continue };
        if header.base_seq != *base {
            problem(
                &mut report,
                format!(
                    "{name}: header base seq {} differs from its file name",
                    header.base_seq
                ),
            );
        }
        // Where the chain stands entering this segment.
        let mut expect = match prev {
            None => (header.base_seq, header.prev_hash),
            Some((s, h)) if header.base_seq == s + 1 => {
                if header.prev_hash != h {
                    problem(
                        &mut report,
                        format!("{name}: header prev_hash does not match record {s}"),
                    );
                }
                (s + 1, h)
            }
            Some((s, _)) => {
                if header.base_seq <= s
                    || !covered_by_lost(&report.lost, s + 1, header.base_seq - 1)
                {
                    problem(
                        &mut report,
                        format!(
                            "{name}: seqs {}..={} are missing",
                            s + 1,
                            header.base_seq.saturating_sub(1)
                        ),
                    );
                }
                (header.base_seq, header.prev_hash)
            }
        };
        if prev.is_none()
            && ack.seq + 1 < header.base_seq
            && !covered_by_lost(&report.lost, ack.seq + 1, header.base_seq - 1)
        {
            problem(
                &mut report,
                format!(
                    "seqs {}..={} are neither acknowledged nor in the log",
                    ack.seq + 1,
                    header.base_seq - 1
                ),
            );
        }
        for f in &scan.frames {
            let seq = f.seq;
            let payload = &bytes
                [f.offset as usize + format::FRAME_HEADER_LEN..(f.offset + f.len as u64) as usize];
            report.records += 1;
            report.first_seq.get_or_insert(seq);
            report.last_seq = Some(seq);
            let signed = match SignedRecord::from_bytes(payload) {
                Ok(s) => s,
                Err(e) => {
                    problem(&mut report, format!("record {seq}: {e}"));
                    expect = (seq + 1, [0; 32]);
                    continue;
                }
            };
            let hash = format::sha256(&signed.body);
            if let Err(e) = signed.verify(key) {
                problem(&mut report, format!("record {seq}: {e}"));
            }
            match signed.record() {
                Ok(r) => {
                    if r.seq != seq {
                        problem(
                            &mut report,
                            format!("record {seq}: body says seq {}", r.seq),
                        );
                    }
                    if r.prev_hash != expect.1 {
                        problem(&mut report, format!("record {seq}: prev_hash does not match the previous record (chain broken)"));
                    }
                    if r.key_id != key_id {
                        problem(
                            &mut report,
                            format!(
                                "record {seq}: key_id {} is not the node key {key_id}",
                                r.key_id
                            ),
                        );
                    }
                    match &node_id {
                        None => node_id = Some(r.node_id.clone()),
                        Some(n) if *n != r.node_id => problem(
                            &mut report,
                            format!("record {seq}: node_id {:?} differs from {n:?}", r.node_id),
                        ),
                        _ => {}
                    }
                }
                Err(e) => problem(&mut report, format!("record {seq}: {e}")),
            }
            if seq == ack.seq && hash != ack.hash {
                problem(
                    &mut report,
                    format!("ack file's hash for record {seq} does not match the record"),
                );
            }
            expect = (seq + 1, hash);
        }
        prev = Some((expect.0 - 1, expect.1));
    }
    report
}
