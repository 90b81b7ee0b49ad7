//! Framing on a serial line, sans-IO.
//!
//! A frame on the wire is
//!
//! ```text
//! COBS( payload ‖ CRC-32C(payload), 4 bytes little-endian ) ‖ 0x00
//! ```
//!
//! COBS (consistent overhead byte stuffing) removes every 0x00 from the
//! encoded bytes, so 0x00 only ever ends a frame: after garbage, a cut
//! frame or a lost byte, the reader is back in step at the next 0x00
//! (resynchronisation costs at most one frame). A sender may put a 0x00
//! before a frame to end whatever noise the line carried before it. The
//! CRC catches flipped bytes; a payload is at most [`MAX_PAYLOAD`] bytes,
//! and the reader discards a longer run without keeping it in memory.
//!
//! [`FrameDecoder`] never fails: bad frames are reported as [`FrameEvent`]s
//! and counted, and it carries on with the next.

/// Largest payload a frame may carry (a request or a response).
pub const MAX_PAYLOAD: usize = 32 * 1024;

/// The frame delimiter.
pub const DELIMITER: u8 = 0x00;

const CRC_LEN: usize = 4;

/// Largest encoded frame (delimiter excluded).
pub const MAX_ENCODED: usize = MAX_PAYLOAD + CRC_LEN + (MAX_PAYLOAD + CRC_LEN) / 254 + 1;

/// A payload too large to frame.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("a payload of {0} bytes is over the {MAX_PAYLOAD}-byte frame limit")]
pub struct TooLarge(pub usize);

/// Encodes one frame, delimiter included, with a leading delimiter that
/// ends any noise before it.
pub fn encode_frame(payload: &[u8]) -> Result<Vec<u8>, TooLarge> {
    if payload.len() > MAX_PAYLOAD {
        return Err(TooLarge(payload.len()));
    }
    let mut raw = Vec::with_capacity(payload.len() + CRC_LEN);
    raw.extend_from_slice(payload);
    raw.extend_from_slice(&crc32c::crc32c(payload).to_le_bytes());
    let mut out = Vec::with_capacity(raw.len() + raw.len() / 254 + 3);
    out.push(DELIMITER);
    out.extend_from_slice(&cobs::encode_vec(&raw));
    out.push(DELIMITER);
    Ok(out)
}

/// What the decoder made of the bytes up to a delimiter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameEvent {
    /// A whole frame whose CRC checks.
    Frame(Vec<u8>),
    /// Bytes that are not COBS (garbage, or a frame that lost bytes).
    Malformed {
        /// Bytes discarded.
        len: usize,
    },
    /// A frame whose CRC does not match its payload (flipped bytes).
    BadCrc {
        /// Bytes discarded.
        len: usize,
    },
    /// More than [`MAX_ENCODED`] bytes without a delimiter.
    Oversize {
        /// Bytes discarded.
        len: usize,
    },
}

/// Counts of what the decoder discarded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FrameStats {
    /// Good frames.
    pub frames: u64,
    /// Malformed runs.
    pub malformed: u64,
    /// CRC mismatches.
    pub bad_crc: u64,
    /// Oversize runs.
    pub oversize: u64,
}

/// Splits a byte stream into frames.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    /// Bytes dropped since the current run went over the limit.
    overflow: usize,
    events: std::collections::VecDeque<FrameEvent>,
    stats: FrameStats,
}

impl FrameDecoder {
    /// A decoder at the start of a stream.
    pub fn new() -> FrameDecoder {
        FrameDecoder::default()
    }

    /// Feeds bytes read from the line.
    pub fn push(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if b == DELIMITER {
                self.end_run();
            } else if self.overflow > 0 {
                self.overflow += 1;
            } else if self.buf.len() == MAX_ENCODED {
                self.overflow = self.buf.len() + 1;
                self.buf.clear();
            } else {
                self.buf.push(b);
            }
        }
    }

    fn end_run(&mut self) {
        if self.overflow > 0 {
            self.stats.oversize += 1;
            self.events
                .push_back(FrameEvent::Oversize { len: self.overflow });
            self.overflow = 0;
            return;
        }
        if self.buf.is_empty() {
            return; // delimiters in a row: nothing between them
        }
        let run = std::mem::take(&mut self.buf);
        let event = match cobs::decode_vec(&run) {
            Ok(raw) if raw.len() >= CRC_LEN => {
                let (payload, crc) = raw.split_at(raw.len() - CRC_LEN);
                let crc = u32::from_le_bytes(crc.try_into().expect("4 bytes"));
                if crc32c::crc32c(payload) == crc {
                    self.stats.frames += 1;
                    FrameEvent::Frame(payload.to_vec())
                } else {
                    self.stats.bad_crc += 1;
                    FrameEvent::BadCrc { len: run.len() }
                }
            }
            _ => {
                self.stats.malformed += 1;
                FrameEvent::Malformed { len: run.len() }
            }
        };
        self.events.push_back(event);
    }

    /// The next event, if the bytes pushed so far complete one.
    pub fn next_event(&mut self) -> Option<FrameEvent> {
        self.events.pop_front()
    }

    /// Bytes held for an unfinished frame.
    pub fn pending(&self) -> usize {
        self.buf.len() + self.overflow
    }

    /// What was decoded and discarded so far.
    pub fn stats(&self) -> FrameStats {
        self.stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn frames(dec: &mut FrameDecoder) -> Vec<Vec<u8>> {
        std::iter::from_fn(|| dec.next_event())
            .filter_map(|e| match e {
                FrameEvent::Frame(p) => Some(p),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_frame_round_trips_and_carries_no_zero_inside() {
        let payload: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
        let wire = encode_frame(&payload).unwrap();
        assert_eq!(wire[0], 0);
        assert_eq!(*wire.last().unwrap(), 0);
        assert!(!wire[1..wire.len() - 1].contains(&0));
        let mut dec = FrameDecoder::new();
        dec.push(&wire);
        assert_eq!(frames(&mut dec), vec![payload]);
        assert_eq!(dec.pending(), 0);
    }

    #[test]
    fn an_empty_payload_is_a_frame() {
        let mut dec = FrameDecoder::new();
        dec.push(&encode_frame(&[]).unwrap());
        assert_eq!(dec.next_event(), Some(FrameEvent::Frame(vec![])));
    }

    #[test]
    fn too_large_a_payload_is_refused_and_an_oversize_run_is_dropped_unkept() {
        assert_eq!(
            encode_frame(&vec![1; MAX_PAYLOAD + 1]),
            Err(TooLarge(MAX_PAYLOAD + 1))
        );
        assert!(encode_frame(&vec![1; MAX_PAYLOAD]).is_ok());
        let mut dec = FrameDecoder::new();
        dec.push(&vec![7u8; 3 * MAX_ENCODED]);
        assert!(dec.buf.capacity() <= 2 * MAX_ENCODED, "not kept");
        assert_eq!(dec.pending(), 3 * MAX_ENCODED);
        dec.push(&[0]);
        assert_eq!(
            dec.next_event(),
            Some(FrameEvent::Oversize {
                len: 3 * MAX_ENCODED
            })
        );
        // And the next frame reads.
        dec.push(&encode_frame(b"after").unwrap());
        assert_eq!(frames(&mut dec), vec![b"after".to_vec()]);
    }

    #[test]
    fn a_flipped_byte_is_a_bad_crc_or_malformed_and_the_next_frame_reads() {
        let a = encode_frame(b"hello, box").unwrap();
        for i in 1..a.len() - 1 {
            let mut bad = a.clone();
            bad[i] ^= 0x20;
            let mut dec = FrameDecoder::new();
            dec.push(&bad);
            dec.push(&encode_frame(b"next").unwrap());
            let events: Vec<_> = std::iter::from_fn(|| dec.next_event()).collect();
            assert!(
                !events.contains(&FrameEvent::Frame(b"hello, box".to_vec())),
                "byte {i}"
            );
            assert_eq!(
                events.last(),
                Some(&FrameEvent::Frame(b"next".to_vec())),
                "byte {i}: {events:?}"
            );
        }
    }

    proptest! {
        /// Frames come through whole however the stream is cut into reads.
        #[test]
        fn frames_survive_any_read_boundaries(
            payloads in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 1..8),
            cuts in proptest::collection::vec(1usize..64, 1..40),
        ) {
            let wire: Vec<u8> = payloads.iter().flat_map(|p| encode_frame(p).unwrap()).collect();
            let mut dec = FrameDecoder::new();
            let (mut at, mut i) = (0, 0);
            while at < wire.len() {
                let n = cuts[i % cuts.len()].min(wire.len() - at);
                dec.push(&wire[at..at + n]);
                at += n;
                i += 1;
            }
            prop_assert_eq!(frames(&mut dec), payloads);
        }

        /// Garbage between frames costs at most the frames it touches: every
        /// frame it does not touch comes through, and nothing that comes
        /// through differs from what was sent.
        #[test]
        fn garbage_between_frames_never_yields_a_wrong_frame(
            payloads in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..200), 1..6),
            noise in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..50), 6),
        ) {
            let mut wire = Vec::new();
            for (p, n) in payloads.iter().zip(&noise) {
                wire.extend_from_slice(n);
                wire.extend(encode_frame(p).unwrap());
            }
            let mut dec = FrameDecoder::new();
            dec.push(&wire);
            let got = frames(&mut dec);
            // Each frame starts with its own delimiter, so noise before it
            // is cut off and every frame survives.
            prop_assert_eq!(got, payloads);
        }

        /// Random bytes never panic the decoder, and whatever it accepts has
        /// a matching CRC by construction.
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let mut dec = FrameDecoder::new();
            dec.push(&bytes);
            while dec.next_event().is_some() {}
            prop_assert!(dec.pending() <= MAX_ENCODED + bytes.len());
        }
    }
}
