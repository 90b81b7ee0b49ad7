//! Opening a log directory after a clean stop or a crash: scan every segment,
//! truncate a torn tail, remove an interrupted rotation, refuse damage to
//! acknowledged data, and check that segments, the chain and the `ack` file
//! agree. Plain `std::fs`: it runs once, before the writer starts.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use super::format::{self, AckState, SegmentEnd, SegmentHeader, SEGMENT_HEADER_LEN};
use super::{LogError, SegmentIndex};
use crate::identity::NodeIdentity;
use crate::record::SignedRecord;

/// Name of the acknowledged-position file.
pub const ACK_FILE: &str = "ack";
/// Name of the lost-ranges file.
pub const LOST_FILE: &str = "lost";
/// A ballast file kept so that an acknowledgement can be written, and
/// segments freed, even when the disk is full: `ack` deletes it when writing
/// the ack file fails for want of space, then recreates it.
pub const RESERVE_FILE: &str = "reserve";
/// Size of the reserve file.
pub const RESERVE_BYTES: usize = 64 * 1024;
/// Folder for segments moved aside by `salvage`.
pub const DAMAGED_DIR: &str = "damaged";

/// A range of seqs given up by `edge-agent log salvage`: the records were
/// damaged on disk. The core will report the same range as a gap.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LostRange {
    /// First lost seq.
    pub first: u64,
    /// Last lost seq.
    pub last: u64,
    /// Where the damaged copy is kept.
    pub kept_at: String,
    /// What was wrong.
    pub reason: String,
}

pub(crate) struct Recovered {
    pub segments: Vec<SegmentIndex>,
    pub active_len: u64,
    pub durable_seq: u64,
    pub durable_hash: [u8; 32],
    pub ack: AckState,
    pub lost: Vec<LostRange>,
}

/// Fsyncs a directory, so that creations, renames and deletions in it are durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), LogError> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| LogError::io(dir, e))
}

/// Replaces `dir/name` atomically: temp file, fsync, rename, fsync of the directory.
pub(crate) fn replace_file(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), LogError> {
    let tmp = dir.join(format!("{name}.tmp"));
    let path = dir.join(name);
    let mut f = fs::File::create(&tmp).map_err(|e| LogError::io(&tmp, e))?;
    f.write_all(bytes).map_err(|e| LogError::io(&tmp, e))?;
    f.sync_all().map_err(|e| LogError::io(&tmp, e))?;
    drop(f);
    fs::rename(&tmp, &path).map_err(|e| LogError::io(&path, e))?;
    sync_dir(dir)
}

/// Writes the ack file atomically. On a full disk it gives up the reserve
/// file and tries once more: an acknowledgement is what frees room.
pub(crate) fn write_ack(dir: &Path, ack: &AckState) -> Result<(), LogError> {
    match replace_file(dir, ACK_FILE, &ack.encode()) {
        Err(LogError::Io { .. }) if dir.join(RESERVE_FILE).exists() => {
            let _ = fs::remove_file(dir.join(ACK_FILE).with_extension("tmp"));
            let reserve = dir.join(RESERVE_FILE);
            fs::remove_file(&reserve).map_err(|e| LogError::io(&reserve, e))?;
            sync_dir(dir)?;
            tracing::warn!(dir = %dir.display(), "disk full: released the reserve file to record an acknowledgement");
            replace_file(dir, ACK_FILE, &ack.encode())
        }
        other => other,
    }
}

/// Creates the reserve file if it is missing (best effort: on a full disk it
/// stays missing until room is freed, and the log says so).
pub(crate) fn ensure_reserve(dir: &Path) {
    let path = dir.join(RESERVE_FILE);
    if fs::metadata(&path)
        .map(|m| m.len() as usize == RESERVE_BYTES)
        .unwrap_or(false)
    {
        return;
    }
    let res = fs::write(&path, vec![0u8; RESERVE_BYTES])
        .and_then(|()| fs::File::open(&path)?.sync_all())
        .map_err(|e| LogError::io(&path, e))
        .and_then(|()| sync_dir(dir));
    if let Err(e) = res {
        let _ = fs::remove_file(&path);
        tracing::warn!(error = %e, "cannot create the usage log's reserve file; an acknowledgement on a full disk may fail");
    }
}

/// Reads the `ack` file (none: nothing acknowledged).
pub fn read_ack(dir: &Path) -> Result<AckState, LogError> {
    let path = dir.join(ACK_FILE);
    match fs::read(&path) {
        Ok(b) => AckState::decode(&b).map_err(|reason| LogError::Inconsistent {
            path,
            reason: format!("ack file is damaged ({reason}); it is rewritten on the next acknowledgement, or remove it to re-send everything in the log"),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(AckState::NONE),
        Err(e) => Err(LogError::io(&path, e)),
    }
}

/// Reads the `lost` file (none: nothing lost).
pub fn read_lost(dir: &Path) -> Result<Vec<LostRange>, LogError> {
    let path = dir.join(LOST_FILE);
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(LogError::io(&path, e)),
    };
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, line)| {
            serde_json::from_str(line).map_err(|e| LogError::Inconsistent {
                path: path.clone(),
                reason: format!("line {}: {e}", i + 1),
            })
        })
        .collect()
}

/// Segment files in `dir`, sorted by base seq.
pub fn list_segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>, LogError> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| LogError::io(dir, e))? {
        let entry = entry.map_err(|e| LogError::io(dir, e))?;
        if let Some(base) = entry
            .file_name()
            .to_str()
            .and_then(format::parse_segment_file_name)
        {
            out.push((base, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

pub(crate) fn covered_by_lost(lost: &[LostRange], first: u64, last: u64) -> bool {
    // The union of lost ranges must cover [first, last].
    let mut next = first;
    let mut ranges: Vec<_> = lost.iter().map(|r| (r.first, r.last)).collect();
    ranges.sort();
    for (a, b) in ranges {
        if a <= next && b >= next {
            next = b + 1;
        }
        if next > last {
            return true;
        }
    }
    next > last
}

fn decode_payload(
    path: &Path,
    bytes: &[u8],
    f: &format::FrameInfo,
) -> Result<SignedRecord, LogError> {
    let frame = &bytes[f.offset as usize..(f.offset + f.len as u64) as usize];
    SignedRecord::from_bytes(&frame[format::FRAME_HEADER_LEN..]).map_err(|e| LogError::Damaged {
        path: path.to_path_buf(),
        offset: f.offset,
        reason: format!(
            "frame {} has an intact checksum but does not decode: {e}",
            f.seq
        ),
    })
}

fn create_segment(dir: &Path, header: SegmentHeader) -> Result<SegmentIndex, LogError> {
    let path = dir.join(format::segment_file_name(header.base_seq));
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(|e| LogError::io(&path, e))?;
    f.write_all(&header.encode())
        .map_err(|e| LogError::io(&path, e))?;
    f.sync_data().map_err(|e| LogError::io(&path, e))?;
    sync_dir(dir)?;
    Ok(SegmentIndex {
        base_seq: header.base_seq,
        path,
        frames: Vec::new(),
    })
}

pub(crate) fn recover(
    dir: &Path,
    identity: &NodeIdentity,
    node_id: &str,
) -> Result<Recovered, LogError> {
    fs::create_dir_all(dir).map_err(|e| LogError::io(dir, e))?;
    let ack = read_ack(dir)?;
    ensure_reserve(dir);
    let lost = read_lost(dir)?;
    let files = list_segments(dir)?;

    let mut segments: Vec<SegmentIndex> = Vec::new();
    // Seq and body hash of the last record seen so far.
    let mut last: Option<(u64, [u8; 32])> = None;
    let mut active_len = SEGMENT_HEADER_LEN as u64;
    let n = files.len();
    for (i, (base, path)) in files.into_iter().enumerate() {
        let is_last = i + 1 == n;
        let bytes = fs::read(&path).map_err(|e| LogError::io(&path, e))?;
        let scan = format::scan_segment(&bytes);
        let header = match (&scan.end, scan.header) {
            (SegmentEnd::BadHeader(reason), _) => {
                if is_last && format::find_any_intact_frame(&bytes).is_none() {
                    // A rotation interrupted before its header was durable: no
                    // frame was ever written into this file.
                    tracing::warn!(path = %path.display(), %reason, "removing a segment whose creation was interrupted");
                    fs::remove_file(&path).map_err(|e| LogError::io(&path, e))?;
                    sync_dir(dir)?;
                    continue;
                }
                return Err(LogError::Damaged {
                    path,
                    offset: 0,
                    reason: format!("segment header: {reason}"),
                });
            }
            (_, Some(h)) => h,
            (_, None) => unreachable!("a scan without header ends in BadHeader"),
        };
        if header.base_seq != base {
            return Err(LogError::Inconsistent {
                path,
                reason: format!(
                    "header says base seq {}, file name says {base}",
                    header.base_seq
                ),
            });
        }
        match &scan.end {
            SegmentEnd::Clean | SegmentEnd::BadHeader(_) => {}
            SegmentEnd::TornTail { offset, reason } if is_last => {
                tracing::warn!(path = %path.display(), offset, %reason, dropped_bytes = bytes.len() as u64 - offset,
                    "truncating the torn tail of the usage log (a write that was never acknowledged)");
                let f = fs::OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(|e| LogError::io(&path, e))?;
                f.set_len(*offset).map_err(|e| LogError::io(&path, e))?;
                f.sync_all().map_err(|e| LogError::io(&path, e))?;
            }
            SegmentEnd::TornTail { offset, reason } => {
                return Err(LogError::Damaged {
                    path,
                    offset: *offset,
                    reason: format!("{reason} in a segment that is not the last one"),
                })
            }
            SegmentEnd::Damaged {
                offset,
                reason,
                next_seq,
                ..
            } => {
                return Err(LogError::Damaged {
                    path,
                    offset: *offset,
                    reason: format!("{reason} (an intact record {next_seq} follows)"),
                })
            }
        }
        // Continuity with the previous segment.
        if let Some((prev_seq, prev_hash)) = last {
            if base != prev_seq + 1 {
                if base <= prev_seq || !covered_by_lost(&lost, prev_seq + 1, base - 1) {
                    return Err(LogError::Inconsistent {
                        path,
                        reason: format!(
                            "segment starts at seq {base} but the previous record is {prev_seq}"
                        ),
                    });
                }
            } else if header.prev_hash != prev_hash {
                return Err(LogError::Inconsistent {
                    path,
                    reason: format!(
                        "chain broken: segment header's prev_hash does not match record {prev_seq}"
                    ),
                });
            }
        }
        last = Some(match scan.frames.last() {
            Some(f) => (
                f.seq,
                format::sha256(&decode_payload(&path, &bytes, f)?.body),
            ),
            None => (base - 1, header.prev_hash),
        });
        if let Some(f) = scan.frames.last() {
            let rec =
                decode_payload(&path, &bytes, f)?
                    .record()
                    .map_err(|e| LogError::Damaged {
                        path: path.clone(),
                        offset: f.offset,
                        reason: e.to_string(),
                    })?;
            if is_last && (rec.key_id != identity.key_id() || rec.node_id != node_id) {
                return Err(LogError::Inconsistent {
                    path,
                    reason: format!(
                        "the log belongs to node {:?} with key {}, not node {node_id:?} with key {}",
                        rec.node_id,
                        rec.key_id,
                        identity.key_id()
                    ),
                });
            }
        }
        active_len = scan.valid_end;
        segments.push(SegmentIndex {
            base_seq: base,
            path,
            frames: scan.frames.iter().map(|f| (f.offset, f.len)).collect(),
        });
    }

    let (mut durable_seq, mut durable_hash) = last.unwrap_or((ack.seq, ack.hash));
    if segments.is_empty() || ack.seq > durable_seq {
        if !segments.is_empty() {
            // The core holds records this log no longer has (a lost tail, or a
            // restored backup). Never reuse an acknowledged seq: continue after
            // the ack, chained to the hash the core acknowledged.
            tracing::warn!(
                acked_seq = ack.seq,
                durable_seq,
                "acknowledged position is ahead of the log's data; continuing after it"
            );
            for s in segments.drain(..) {
                fs::remove_file(&s.path).map_err(|e| LogError::io(&s.path, e))?;
            }
        }
        segments.push(create_segment(
            dir,
            SegmentHeader {
                base_seq: ack.seq + 1,
                prev_hash: ack.hash,
            },
        )?);
        active_len = SEGMENT_HEADER_LEN as u64;
        durable_seq = ack.seq;
        durable_hash = ack.hash;
    } else {
        let first = segments[0].base_seq;
        if ack.seq + 1 < first && !covered_by_lost(&lost, ack.seq + 1, first - 1) {
            return Err(LogError::Inconsistent {
                path: segments[0].path.clone(),
                reason: format!(
                    "records {}..={} are neither acknowledged (ack is {}) nor in the log",
                    ack.seq + 1,
                    first - 1,
                    ack.seq
                ),
            });
        }
        if ack.seq >= first {
            if let Some(seg) = segments.iter().find(|s| {
                !s.frames.is_empty()
                    && s.base_seq <= ack.seq
                    && ack.seq < s.base_seq + s.frames.len() as u64
            }) {
                let (off, len) = seg.frames[(ack.seq - seg.base_seq) as usize];
                let bytes = fs::read(&seg.path).map_err(|e| LogError::io(&seg.path, e))?;
                let f = format::FrameInfo {
                    seq: ack.seq,
                    offset: off,
                    len,
                };
                let hash = format::sha256(&decode_payload(&seg.path, &bytes, &f)?.body);
                if hash != ack.hash {
                    return Err(LogError::Inconsistent {
                        path: dir.join(ACK_FILE),
                        reason: format!(
                            "acknowledged record {} has a different hash than the log's record {}",
                            ack.seq, ack.seq
                        ),
                    });
                }
            }
        }
        // A crash between writing the ack and deleting segments leaves some behind.
        let keep_from = segments.len() - 1;
        let mut i = 0;
        let mut removed = false;
        let mut err = None;
        segments.retain(|s| {
            let delete = i < keep_from && s.base_seq + (s.frames.len() as u64) <= ack.seq + 1;
            i += 1;
            if delete {
                if let Err(e) = fs::remove_file(&s.path) {
                    err = Some(LogError::io(&s.path, e));
                }
                removed = true;
            }
            !delete
        });
        if let Some(e) = err {
            return Err(e);
        }
        if removed {
            sync_dir(dir)?;
        }
    }
    Ok(Recovered {
        segments,
        active_len,
        durable_seq,
        durable_hash,
        ack,
        lost,
    })
}
