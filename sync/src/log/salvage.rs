//! `edge-agent log salvage`: lets a node whose log refuses to open (damage to
//! acknowledged data) continue serving, while the damage stays on record.
//!
//! The first damaged segment is copied into `damaged/` untouched, the intact
//! records before and after the damage become segments of their own, and
//! the seq range in between is appended to the `lost` file. The log then
//! opens; the core will see the same range as a gap and report it. Run it
//! once per damaged segment (it says when nothing is left to salvage).
//!
//! A crash at any point leaves a state a second run finishes, losing
//! nothing more (the steps and their order are in [`salvage_until`]).

use std::fs;
use std::path::Path;

use super::format::{self, SegmentEnd, SegmentHeader, SEGMENT_HEADER_LEN};
use super::recovery::{self, LostRange, DAMAGED_DIR, LOST_FILE};
use super::LogError;
use crate::record::SignedRecord;

/// What `salvage` did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SalvageReport {
    /// The damaged segment, as it was named.
    pub segment: String,
    /// Where it was moved.
    pub moved_to: String,
    /// The seqs given up.
    pub lost: LostRange,
    /// Intact records kept before the damage.
    pub kept_before: u64,
    /// Intact records kept after the damage.
    pub kept_after: u64,
}

fn write_new(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), LogError> {
    recovery::replace_file(dir, name, bytes)
}

/// The kept pieces while a salvage runs (names the log never reads).
const SALVAGE_BEFORE: &str = "salvage-before.tmp";
const SALVAGE_AFTER: &str = "salvage-after.tmp";

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), LogError> {
    use std::io::Write;
    let mut f = fs::File::create(path).map_err(|e| LogError::io(path, e))?;
    f.write_all(bytes).map_err(|e| LogError::io(path, e))?;
    f.sync_all().map_err(|e| LogError::io(path, e))
}

/// Salvages the first damaged segment in `dir`; `Ok(None)` when there is none.
pub fn salvage(dir: &Path) -> Result<Option<SalvageReport>, LogError> {
    salvage_until(dir, usize::MAX)
}

/// A salvage cut short after `steps` durable steps, as a crash would leave
/// it (`Err(Interrupted)` then): for the crash tests.
#[doc(hidden)]
pub fn salvage_until(dir: &Path, steps: usize) -> Result<Option<SalvageReport>, LogError> {
    let mut done = 0;
    let mut step = || -> Result<(), LogError> {
        done += 1;
        if done > steps {
            return Err(LogError::Unavailable("salvage interrupted (test)".into()));
        }
        Ok(())
    };
    let files = recovery::list_segments(dir)?;
    let n = files.len();
    for (i, (base, path)) in files.iter().enumerate() {
        let is_last = i + 1 == n;
        let bytes = fs::read(path).map_err(|e| LogError::io(path, e))?;
        let scan = format::scan_segment(&bytes);
        // Where the damage starts, and the first intact frame after it (if any).
        let (damage_reason, next_intact) = match &scan.end {
            SegmentEnd::Clean => continue,
            SegmentEnd::TornTail { .. } if is_last => continue,
            SegmentEnd::TornTail { reason, .. } => (reason.clone(), None),
            SegmentEnd::Damaged {
                reason,
                next_intact,
                ..
            } => (reason.clone(), Some(*next_intact as usize)),
            SegmentEnd::BadHeader(reason) => match format::find_any_intact_frame(&bytes) {
                None if is_last => continue,
                found => (format!("header: {reason}"), found),
            },
        };
        let first_lost = scan.last_seq().map(|s| s + 1).unwrap_or(*base);
        // Keep every intact record after the damage, including those written in
        // the same group commit as the damaged one (they were synced too: a
        // later write exists).
        let next_intact = next_intact.map(|p| {
            format::find_intact_frame_from(&bytes, scan.valid_end as usize + 1, first_lost + 1)
                .filter(|&q| q <= p)
                .unwrap_or(p)
        });
        let damaged_dir = dir.join(DAMAGED_DIR);
        fs::create_dir_all(&damaged_dir).map_err(|e| LogError::io(&damaged_dir, e))?;
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        // Named by its content, so a run after a crash finds its own copy.
        let digest = hex::encode(&format::sha256(&bytes)[..8]);
        let moved_to = damaged_dir.join(format!("{name}.{digest}"));

        // The records after the damage, as a segment of their own.
        let mut after: Option<(u64, Vec<u8>, u64)> = None;
        if let Some(p) = next_intact {
            if let format::FrameRead::Frame { seq, payload, .. } = format::read_frame(&bytes[p..]) {
                let prev_hash = SignedRecord::from_bytes(payload)
                    .and_then(|s| s.record())
                    .ok()
                    .and_then(|r| r.prev_hash.try_into().ok())
                    .unwrap_or([0u8; 32]);
                let mut seg = SegmentHeader {
                    base_seq: seq,
                    prev_hash,
                }
                .encode()
                .to_vec();
                seg.extend_from_slice(&bytes[p..]);
                let rescan = format::scan_segment(&seg);
                seg.truncate(rescan.valid_end as usize);
                after = Some((seq, seg, rescan.frames.len() as u64));
            }
        }
        let last_lost = match &after {
            Some((seq, _, _)) => seq - 1,
            None => match files.get(i + 1) {
                Some((next_base, _)) => next_base - 1,
                None => first_lost.saturating_sub(1),
            },
        };
        if last_lost < first_lost {
            return Err(LogError::Inconsistent {
                path: path.clone(),
                reason: "damaged, but no record range can be named as lost; inspect it by hand"
                    .into(),
            });
        }
        let lost = LostRange {
            first: first_lost,
            last: last_lost,
            kept_at: moved_to.display().to_string(),
            reason: format!("{name}: {damage_reason}"),
        };

        // Order matters for a crash in the middle: every step is durable
        // and leaves a state the next run of salvage finishes, and the
        // original stays in place until both kept pieces are in theirs.
        // 1. The kept pieces, complete and synced, under names the log does
        //    not read.
        let kept_before = scan.frames.len() as u64;
        let keep_before = scan.header.is_some() && (kept_before > 0 || after.is_none());
        let before_tmp = dir.join(SALVAGE_BEFORE);
        let after_tmp = dir.join(SALVAGE_AFTER);
        if keep_before {
            write_synced(
                &before_tmp,
                &bytes[..scan.valid_end.max(SEGMENT_HEADER_LEN as u64) as usize],
            )?;
        }
        if let Some((_, seg, _)) = &after {
            write_synced(&after_tmp, seg)?;
        }
        recovery::sync_dir(dir)?;
        step()?;
        // 2. The loss, recorded once (a run after a crash finds it there).
        let mut lost_text = fs::read_to_string(dir.join(LOST_FILE)).unwrap_or_default();
        let recorded = lost_text
            .lines()
            .filter_map(|l| serde_json::from_str::<LostRange>(l).ok())
            .any(|r| (r.first, r.last) == (lost.first, lost.last));
        if !recorded {
            lost_text.push_str(&serde_json::to_string(&lost).expect("serialisable"));
            lost_text.push('\n');
            write_new(dir, LOST_FILE, lost_text.as_bytes())?;
        }
        step()?;
        // 3. The damaged original, copied aside untouched.
        if !moved_to.exists() {
            let tmp = moved_to.with_extension("tmp");
            write_synced(&tmp, &bytes)?;
            fs::rename(&tmp, &moved_to).map_err(|e| LogError::io(&moved_to, e))?;
            recovery::sync_dir(&damaged_dir)?;
        }
        step()?;
        // 4. The records after the damage, in a segment of their own (until
        //    step 5 they overlap the damaged original, which keeps the log
        //    closed and salvage able to run again).
        let mut kept_after = 0;
        if let Some((seq, _, frames)) = &after {
            let to = dir.join(format::segment_file_name(*seq));
            fs::rename(&after_tmp, &to).map_err(|e| LogError::io(&to, e))?;
            recovery::sync_dir(dir)?;
            kept_after = *frames;
        }
        step()?;
        // 5. The original replaced by its intact beginning, in one rename
        //    (or removed when nothing before the damage is kept).
        if keep_before {
            fs::rename(&before_tmp, path).map_err(|e| LogError::io(path, e))?;
        } else {
            fs::remove_file(path).map_err(|e| LogError::io(path, e))?;
        }
        recovery::sync_dir(dir)?;
        return Ok(Some(SalvageReport {
            segment: path.display().to_string(),
            moved_to: moved_to.display().to_string(),
            lost,
            kept_before,
            kept_after,
        }));
    }
    Ok(None)
}
