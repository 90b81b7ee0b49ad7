//! The on-disk format of the usage log, as plain functions over byte slices
//! (no I/O, no clock): encoding frames and headers, and scanning a segment's
//! bytes into "intact frames, then a clean end, a torn tail, or damage".
//!
//! # Files
//!
//! A log directory holds:
//!
//! | name                       | what                                                      |
//! |----------------------------|-----------------------------------------------------------|
//! | `seg-<base seq, 20 digits>.log` | segment files, append-only; the last one is active   |
//! | `ack`                      | acknowledged position (replaced atomically)               |
//! | `lost`                     | seq ranges given up by `edge-agent log salvage`, one JSON object a line |
//! | `damaged/`                 | segments moved aside by `salvage`, kept for forensics     |
//! | `reserve`                  | 64 KiB of ballast, given up so an `ack` can be written on a full disk |
//!
//! # Segment header (64 bytes, little-endian)
//!
//! | offset | size | field                                                          |
//! |--------|------|----------------------------------------------------------------|
//! | 0      | 8    | magic `MECULOG\0`                                              |
//! | 8      | 2    | format version, 1                                              |
//! | 10     | 2    | header length, 64                                              |
//! | 12     | 4    | reserved, zero                                                 |
//! | 16     | 8    | `base_seq`: seq of the segment's first frame                   |
//! | 24     | 32   | `prev_hash`: SHA-256 of the body of record `base_seq - 1` (zeros when `base_seq` is 1) |
//! | 56     | 4    | reserved, zero                                                 |
//! | 60     | 4    | CRC32C of bytes 0..60                                          |
//!
//! The header carries the chain head, so a segment with no frame yet (a new
//! segment, or one whose predecessors were all acknowledged and deleted) still
//! says where the sequence and the chain continue.
//!
//! # Frame (24-byte header, then the payload)
//!
//! | offset | size | field                                                                 |
//! |--------|------|-----------------------------------------------------------------------|
//! | 0      | 4    | `len`: payload length, 1 ..= [`MAX_PAYLOAD`]                           |
//! | 4      | 4    | CRC32C of bytes 0..4 followed by bytes 8..24+len                      |
//! | 8      | 8    | `seq` of the record                                                   |
//! | 16     | 8    | `batch_start`: seq of the first frame of the write this frame was part of |
//! | 24     | len  | payload: a protobuf `SignedRecord` (body + Ed25519 signature)         |
//!
//! Frames follow each other with no padding. Seqs are dense: each frame's seq
//! is one more than the previous frame's, across segments.
//!
//! # Crash assumptions
//!
//! * One group commit is one `write` of consecutive frames at the end of the
//!   active segment, then `fdatasync`. Appenders are answered only after that
//!   `fdatasync` returned success. The next write starts only after it.
//! * Nothing is assumed atomic within a write: after a power cut, any subset of
//!   the last write's sectors may be on disk, in any order, and the file may
//!   have grown with zeros (a size update that beat the data).
//! * So damage can only be *legitimate* inside the last write. The frame's
//!   `batch_start` tells recovery which write a frame belonged to: a damaged
//!   frame followed only by intact frames of its own write (or by nothing, or
//!   by zeros) is a torn tail, truncated on open; a damaged frame followed by an
//!   intact frame of a *later* write, or in a segment that is not the last, is
//!   damage to data that had been acknowledged, and the log refuses to open.
//! * A record that `fdatasync` acknowledged but that the disk lost or corrupted
//!   inside the last write is indistinguishable from a torn write; that is the
//!   limit of a single copy on one disk.
//! * A new segment is created with its header written and synced, then the
//!   directory synced, before any frame goes into it; the previous segment is
//!   complete and synced before that. A last segment with a missing or torn
//!   header and no frame is an interrupted rotation and is removed on open.
//! * The `ack` file is replaced by write to a temporary file, `fsync`,
//!   `rename`, `fsync` of the directory; segments wholly at or below it are
//!   deleted only after that.

use sha2::{Digest, Sha256};

/// Magic at the start of every segment.
pub const SEGMENT_MAGIC: [u8; 8] = *b"MECULOG\0";
/// Format version written into segment headers.
pub const FORMAT_VERSION: u16 = 1;
/// Length of a segment header.
pub const SEGMENT_HEADER_LEN: usize = 64;
/// Length of a frame header.
pub const FRAME_HEADER_LEN: usize = 24;
/// Largest payload a frame may carry. Records are a few hundred bytes; the cap
/// keeps a damaged length field from making recovery read gigabytes.
pub const MAX_PAYLOAD: usize = 1 << 20;
/// Magic at the start of the `ack` file.
pub const ACK_MAGIC: [u8; 8] = *b"MECUACK1";
/// Length of the `ack` file.
pub const ACK_LEN: usize = 52;

/// The parsed header of a segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentHeader {
    /// Seq of the first frame in the segment.
    pub base_seq: u64,
    /// SHA-256 of the body of record `base_seq - 1`.
    pub prev_hash: [u8; 32],
}

impl SegmentHeader {
    /// The 64 header bytes.
    pub fn encode(&self) -> [u8; SEGMENT_HEADER_LEN] {
        let mut b = [0u8; SEGMENT_HEADER_LEN];
        b[0..8].copy_from_slice(&SEGMENT_MAGIC);
        b[8..10].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        b[10..12].copy_from_slice(&(SEGMENT_HEADER_LEN as u16).to_le_bytes());
        b[16..24].copy_from_slice(&self.base_seq.to_le_bytes());
        b[24..56].copy_from_slice(&self.prev_hash);
        let crc = crc32c::crc32c(&b[0..60]);
        b[60..64].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Parses a header, saying what is wrong with it.
    pub fn decode(b: &[u8]) -> Result<SegmentHeader, String> {
        if b.len() < SEGMENT_HEADER_LEN {
            return Err(format!(
                "header is {} bytes, expected {SEGMENT_HEADER_LEN}",
                b.len()
            ));
        }
        if b[0..8] != SEGMENT_MAGIC {
            return Err("bad magic: not a usage log segment".into());
        }
        let crc = u32::from_le_bytes(b[60..64].try_into().unwrap());
        if crc != crc32c::crc32c(&b[0..60]) {
            return Err("header checksum mismatch".into());
        }
        let version = u16::from_le_bytes(b[8..10].try_into().unwrap());
        if version != FORMAT_VERSION {
            return Err(format!(
                "format version {version}, this build reads {FORMAT_VERSION}"
            ));
        }
        Ok(SegmentHeader {
            base_seq: u64::from_le_bytes(b[16..24].try_into().unwrap()),
            prev_hash: b[24..56].try_into().unwrap(),
        })
    }
}

/// File name of the segment whose first seq is `base_seq`.
pub fn segment_file_name(base_seq: u64) -> String {
    format!("seg-{base_seq:020}.log")
}

/// The base seq named by a segment file name, if it is one.
pub fn parse_segment_file_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("seg-")?.strip_suffix(".log")?;
    if digits.len() != 20 || !digits.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Appends one frame to `out`.
pub fn encode_frame(out: &mut Vec<u8>, seq: u64, batch_start: u64, payload: &[u8]) {
    assert!(
        !payload.is_empty() && payload.len() <= MAX_PAYLOAD,
        "payload size out of range"
    );
    let start = out.len();
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&[0u8; 4]);
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&batch_start.to_le_bytes());
    out.extend_from_slice(payload);
    let crc = frame_crc(&out[start..]);
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// Size of the frame that carries a payload of `payload_len` bytes.
pub fn frame_len(payload_len: usize) -> u64 {
    (FRAME_HEADER_LEN + payload_len) as u64
}

fn frame_crc(frame: &[u8]) -> u32 {
    let crc = crc32c::crc32c(&frame[0..4]);
    crc32c::crc32c_append(crc, &frame[8..])
}

/// What lies at an offset of a segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameRead<'a> {
    /// An intact frame.
    Frame {
        /// Record seq.
        seq: u64,
        /// First seq of the write the frame was part of.
        batch_start: u64,
        /// The `SignedRecord` bytes.
        payload: &'a [u8],
        /// Length of the whole frame, header included.
        len: usize,
    },
    /// Nothing: the offset is the end of the bytes.
    End,
    /// Zeros up to the end of the bytes (a file grown before its data landed).
    ZeroTail,
    /// A frame that runs past the end of the bytes.
    Truncated,
    /// Bytes that are not an intact frame.
    Corrupt(&'static str),
}

/// Reads the frame at the start of `b`.
pub fn read_frame(b: &[u8]) -> FrameRead<'_> {
    if b.is_empty() {
        return FrameRead::End;
    }
    if b.len() < FRAME_HEADER_LEN {
        return if b.iter().all(|&x| x == 0) {
            FrameRead::ZeroTail
        } else {
            FrameRead::Truncated
        };
    }
    let len = u32::from_le_bytes(b[0..4].try_into().unwrap()) as usize;
    if len == 0 {
        return if b.iter().all(|&x| x == 0) {
            FrameRead::ZeroTail
        } else {
            FrameRead::Corrupt("zero length")
        };
    }
    if len > MAX_PAYLOAD {
        return FrameRead::Corrupt("length over the maximum");
    }
    let total = FRAME_HEADER_LEN + len;
    if b.len() < total {
        return FrameRead::Truncated;
    }
    let crc = u32::from_le_bytes(b[4..8].try_into().unwrap());
    if crc != frame_crc(&b[..total]) {
        return FrameRead::Corrupt("checksum mismatch");
    }
    FrameRead::Frame {
        seq: u64::from_le_bytes(b[8..16].try_into().unwrap()),
        batch_start: u64::from_le_bytes(b[16..24].try_into().unwrap()),
        payload: &b[FRAME_HEADER_LEN..total],
        len: total,
    }
}

/// One intact frame found by [`scan_segment`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameInfo {
    /// Record seq.
    pub seq: u64,
    /// Offset of the frame in the segment file.
    pub offset: u64,
    /// Length of the whole frame.
    pub len: u32,
}

/// How a segment's bytes end after its last intact frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SegmentEnd {
    /// The last intact frame ends the file.
    Clean,
    /// An incomplete or damaged last write (or zeros) from `offset` on: safe to
    /// truncate there in the last segment, since nothing after it was ever
    /// acknowledged.
    TornTail {
        /// Where the intact frames end.
        offset: u64,
        /// What was found there.
        reason: String,
    },
    /// Damage at `offset` followed by an intact frame of a later write (at
    /// `next_intact`): acknowledged data was lost or altered.
    Damaged {
        /// Where the damage starts.
        offset: u64,
        /// What was found there.
        reason: String,
        /// Offset of the intact frame found after it.
        next_intact: u64,
        /// Seq of that frame.
        next_seq: u64,
    },
    /// The header itself is missing or damaged.
    BadHeader(String),
}

/// The result of scanning one segment's bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentScan {
    /// The header, when it is intact.
    pub header: Option<SegmentHeader>,
    /// The intact frames with dense seqs from `header.base_seq`, in order.
    pub frames: Vec<FrameInfo>,
    /// Offset just past the last intact frame (the header length when none).
    pub valid_end: u64,
    /// What follows `valid_end`.
    pub end: SegmentEnd,
}

impl SegmentScan {
    /// Seq of the last intact frame.
    pub fn last_seq(&self) -> Option<u64> {
        self.frames.last().map(|f| f.seq)
    }
}

/// Scans a whole segment file's bytes: intact frames in order, then how it ends.
pub fn scan_segment(bytes: &[u8]) -> SegmentScan {
    let header = match SegmentHeader::decode(bytes) {
        Ok(h) => h,
        Err(reason) => {
            // A header that never made it to disk: only zeros or a short file.
            let reason = if bytes.len() < SEGMENT_HEADER_LEN || bytes.iter().all(|&b| b == 0) {
                format!("incomplete header ({} bytes written)", bytes.len())
            } else {
                reason
            };
            return SegmentScan {
                header: None,
                frames: Vec::new(),
                valid_end: 0,
                end: SegmentEnd::BadHeader(reason),
            };
        }
    };
    let mut frames = Vec::new();
    let mut offset = SEGMENT_HEADER_LEN;
    let mut expected = header.base_seq;
    let end = loop {
        let problem = match read_frame(&bytes[offset..]) {
            FrameRead::End => break SegmentEnd::Clean,
            FrameRead::Frame {
                seq,
                batch_start,
                len,
                ..
            } => {
                if seq == expected && batch_start <= seq {
                    frames.push(FrameInfo {
                        seq,
                        offset: offset as u64,
                        len: len as u32,
                    });
                    offset += len;
                    expected += 1;
                    continue;
                }
                "intact frame with an unexpected seq"
            }
            FrameRead::ZeroTail => "zero-filled tail",
            FrameRead::Truncated => "incomplete frame",
            FrameRead::Corrupt(why) => why,
        };
        break classify_damage(bytes, offset, expected, problem);
    };
    SegmentScan {
        header: Some(header),
        frames,
        valid_end: offset as u64,
        end,
    }
}

/// Decides whether the bad bytes at `offset` (where frame `expected` should
/// be) are a torn last write or damage to acknowledged data, by looking for an
/// intact frame after them that belongs to a later write.
fn classify_damage(bytes: &[u8], offset: usize, expected: u64, reason: &str) -> SegmentEnd {
    let max_frames_left = ((bytes.len() - offset) / FRAME_HEADER_LEN) as u64;
    for p in offset + 1..bytes.len().saturating_sub(FRAME_HEADER_LEN - 1) {
        // Cheap filter before the checksum: a frame of this segment has a seq
        // at or after `expected`, and not further on than the bytes allow.
        let seq = u64::from_le_bytes(bytes[p + 8..p + 16].try_into().unwrap());
        if seq < expected || seq > expected + max_frames_left {
            continue;
        }
        if let FrameRead::Frame {
            seq, batch_start, ..
        } = read_frame(&bytes[p..])
        {
            if batch_start > expected {
                return SegmentEnd::Damaged {
                    offset: offset as u64,
                    reason: reason.to_string(),
                    next_intact: p as u64,
                    next_seq: seq,
                };
            }
        }
    }
    SegmentEnd::TornTail {
        offset: offset as u64,
        reason: reason.to_string(),
    }
}

/// The acknowledged position: the highest seq the core holds durably with no
/// gap below it, and the hash of that record's body (so the chain can go on
/// even if the log no longer holds that record).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AckState {
    /// Highest acknowledged seq (0: nothing acknowledged).
    pub seq: u64,
    /// SHA-256 of the body of record `seq` (zeros when `seq` is 0).
    pub hash: [u8; 32],
}

impl AckState {
    /// Nothing acknowledged yet.
    pub const NONE: AckState = AckState {
        seq: 0,
        hash: [0; 32],
    };

    /// The `ack` file's bytes: magic, seq, hash, CRC32C of what precedes it.
    pub fn encode(&self) -> [u8; ACK_LEN] {
        let mut b = [0u8; ACK_LEN];
        b[0..8].copy_from_slice(&ACK_MAGIC);
        b[8..16].copy_from_slice(&self.seq.to_le_bytes());
        b[16..48].copy_from_slice(&self.hash);
        let crc = crc32c::crc32c(&b[0..48]);
        b[48..52].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Parses the `ack` file.
    pub fn decode(b: &[u8]) -> Result<AckState, String> {
        if b.len() != ACK_LEN {
            return Err(format!("{} bytes, expected {ACK_LEN}", b.len()));
        }
        if b[0..8] != ACK_MAGIC {
            return Err("bad magic".into());
        }
        let crc = u32::from_le_bytes(b[48..52].try_into().unwrap());
        if crc != crc32c::crc32c(&b[0..48]) {
            return Err("checksum mismatch".into());
        }
        Ok(AckState {
            seq: u64::from_le_bytes(b[8..16].try_into().unwrap()),
            hash: b[16..48].try_into().unwrap(),
        })
    }
}

/// SHA-256 of bytes (the chain link).
pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// Offset of the first intact frame at or after `from` whose seq is at least
/// `min_seq` (used by salvage to keep every intact record after damage).
pub fn find_intact_frame_from(bytes: &[u8], from: usize, min_seq: u64) -> Option<usize> {
    (from..bytes.len().saturating_sub(FRAME_HEADER_LEN - 1)).find(|&p| {
        let seq = u64::from_le_bytes(bytes[p + 8..p + 16].try_into().unwrap());
        seq >= min_seq && matches!(read_frame(&bytes[p..]), FrameRead::Frame { .. })
    })
}

/// Offset of the first intact frame anywhere after the segment header, if
/// any (used to tell an interrupted rotation from a damaged header).
pub fn find_any_intact_frame(bytes: &[u8]) -> Option<usize> {
    (SEGMENT_HEADER_LEN..bytes.len().saturating_sub(FRAME_HEADER_LEN - 1))
        .find(|&p| matches!(read_frame(&bytes[p..]), FrameRead::Frame { .. }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segment(base: u64, frames: &[(u64, u64, &[u8])]) -> Vec<u8> {
        let mut b = SegmentHeader {
            base_seq: base,
            prev_hash: [9; 32],
        }
        .encode()
        .to_vec();
        for (seq, batch, payload) in frames {
            encode_frame(&mut b, *seq, *batch, payload);
        }
        b
    }

    #[test]
    fn header_round_trips_and_rejects_flips() {
        let h = SegmentHeader {
            base_seq: 42,
            prev_hash: [3; 32],
        };
        let mut b = h.encode();
        assert_eq!(SegmentHeader::decode(&b), Ok(h));
        b[20] ^= 0x10;
        assert!(SegmentHeader::decode(&b).unwrap_err().contains("checksum"));
    }

    #[test]
    fn file_names_round_trip() {
        assert_eq!(parse_segment_file_name(&segment_file_name(77)), Some(77));
        assert_eq!(parse_segment_file_name("seg-77.log"), None);
        assert_eq!(parse_segment_file_name("ack"), None);
    }

    #[test]
    fn ack_round_trips_and_rejects_flips() {
        let a = AckState {
            seq: 9,
            hash: [1; 32],
        };
        let mut b = a.encode();
        assert_eq!(AckState::decode(&b), Ok(a));
        b[9] ^= 1;
        assert!(AckState::decode(&b).is_err());
    }

    // One table for the tail cases: (name, bytes, expected frames, expected end kind).
    #[test]
    fn tails_are_classified() {
        let full = segment(1, &[(1, 1, b"aaaa"), (2, 2, b"bbbb"), (3, 3, b"cccc")]);
        let frame = frame_len(4) as usize;
        let h = SEGMENT_HEADER_LEN;
        let check = |name: &str, bytes: Vec<u8>, frames: usize, end: &str| {
            let scan = scan_segment(&bytes);
            assert_eq!(scan.frames.len(), frames, "{name}: frames");
            let kind = match scan.end {
                SegmentEnd::Clean => "clean",
                SegmentEnd::TornTail { .. } => "torn",
                SegmentEnd::Damaged { .. } => "damaged",
                SegmentEnd::BadHeader(_) => "header",
            };
            assert_eq!(kind, end, "{name}: {:?}", scan.end);
        };
        check("intact", full.clone(), 3, "clean");
        check(
            "cut mid frame",
            full[..h + 2 * frame + 5].to_vec(),
            2,
            "torn",
        );
        check(
            "cut mid header",
            full[..h + 2 * frame + 3].to_vec(),
            2,
            "torn",
        );
        let mut zeros = full.clone();
        zeros.extend_from_slice(&[0; 100]);
        check("zero tail", zeros, 3, "torn");
        let mut flip_last = full.clone();
        *flip_last.last_mut().unwrap() ^= 1;
        check("flip in last frame", flip_last, 2, "torn");
        let mut flip_mid = full.clone();
        flip_mid[h + frame + 26] ^= 1;
        check("flip in middle frame", flip_mid, 1, "damaged");
        check("empty segment", full[..h].to_vec(), 0, "clean");
        check("no header", vec![0; 10], 0, "header");
    }

    #[test]
    fn damage_inside_the_last_write_is_a_torn_tail() {
        // Frames 2 and 3 were written together (batch_start 2): a power cut may
        // keep frame 3's sectors and lose frame 2's.
        let mut b = segment(1, &[(1, 1, b"aaaa"), (2, 2, b"bbbb"), (3, 2, b"cccc")]);
        let h = SEGMENT_HEADER_LEN;
        let frame = frame_len(4) as usize;
        b[h + frame + 26] ^= 0xff;
        let scan = scan_segment(&b);
        assert_eq!(scan.frames.len(), 1);
        assert!(
            matches!(scan.end, SegmentEnd::TornTail { .. }),
            "{:?}",
            scan.end
        );
    }
}
