//! The upload protocol's messages (generated from `proto/sync.proto`) and
//! their framing, sans-IO: [`encode_frame`] gives the bytes to write,
//! [`FrameDecoder`] takes bytes as they arrive and yields whole messages.
//! Each frame is a protobuf message preceded by its length as a varint.

use prost::Message;

/// Generated protobuf types, package `mec.sync.v1`.
#[allow(missing_docs)]
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/mec.sync.v1.rs"));
}

/// ALPN protocol id of the upload protocol.
pub const ALPN: &[u8] = b"mec-usage/1";

/// Largest frame accepted (a batch is bounded well below it).
pub const MAX_FRAME: usize = 16 << 20;

/// A framing error: the peer is broken or hostile; close the connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The length prefix announces more than [`MAX_FRAME`].
    #[error("frame of {0} bytes exceeds the limit of {MAX_FRAME}")]
    TooLarge(u64),
    /// The length prefix is not a valid varint.
    #[error("malformed frame length")]
    BadLength,
    /// The frame is not the expected message.
    #[error("malformed frame: {0}")]
    Decode(String),
}

/// The bytes of one frame carrying `msg`.
pub fn encode_frame<M: Message>(msg: &M) -> Vec<u8> {
    msg.encode_length_delimited_to_vec()
}

/// Accumulates bytes and yields whole frames.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: Vec<u8>,
}

impl FrameDecoder {
    /// A decoder with nothing buffered.
    pub fn new() -> FrameDecoder {
        FrameDecoder::default()
    }

    /// Adds received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes buffered (not yet a whole frame).
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The next whole frame as `M`, `Ok(None)` when more bytes are needed.
    pub fn next_frame<M: Message + Default>(&mut self) -> Result<Option<M>, FrameError> {
        // The length is a varint of at most 10 bytes; decoding is prost's
        // (which refuses one whose value does not fit 64 bits).
        let Some(last) = self.buf.iter().take(10).position(|b| b & 0x80 == 0) else {
            return if self.buf.len() >= 10 {
                Err(FrameError::BadLength)
            } else {
                Ok(None)
            };
        };
        let mut prefix = &self.buf[..=last];
        let len = prost::encoding::decode_varint(&mut prefix).map_err(|_| FrameError::BadLength)?;
        let header = last + 1;
        if len > MAX_FRAME as u64 {
            return Err(FrameError::TooLarge(len));
        }
        let end = header + len as usize;
        if self.buf.len() < end {
            return Ok(None);
        }
        let msg =
            M::decode(&self.buf[header..end]).map_err(|e| FrameError::Decode(e.to_string()))?;
        self.buf.drain(..end);
        Ok(Some(msg))
    }
}

#[cfg(test)]
mod tests {
    use super::pb::{edge_frame, Batch, EdgeFrame};
    use super::*;

    fn batch(id: u64, n: usize) -> EdgeFrame {
        EdgeFrame {
            kind: Some(edge_frame::Kind::Batch(Batch {
                batch_id: id,
                records: (0..n).map(|i| vec![i as u8; 100 + i]).collect(),
                lost: vec![],
            })),
        }
    }

    #[test]
    fn frames_split_anywhere_decode_whole() {
        let frames: Vec<EdgeFrame> = (0..5).map(|i| batch(i, i as usize * 3)).collect();
        let bytes: Vec<u8> = frames.iter().flat_map(encode_frame).collect();
        for chunk in [1, 2, 7, 64, bytes.len()] {
            let mut d = FrameDecoder::new();
            let mut got = Vec::new();
            for part in bytes.chunks(chunk) {
                d.push(part);
                while let Some(f) = d.next_frame::<EdgeFrame>().unwrap() {
                    got.push(f);
                }
            }
            assert_eq!(got, frames, "chunks of {chunk}");
            assert_eq!(d.buffered(), 0);
        }
    }

    #[test]
    fn oversized_and_malformed_frames_are_errors() {
        let mut d = FrameDecoder::new();
        // Length 2^32 as a varint.
        d.push(&[0x80, 0x80, 0x80, 0x80, 0x10]);
        assert!(matches!(
            d.next_frame::<EdgeFrame>(),
            Err(FrameError::TooLarge(_))
        ));
        let mut d = FrameDecoder::new();
        d.push(&[0xff; 11]);
        assert_eq!(d.next_frame::<EdgeFrame>(), Err(FrameError::BadLength));
        // Ten bytes whose last carries bits beyond the 64th: not a length
        // (read as 64 bits it would be 0, an empty frame).
        let mut d = FrameDecoder::new();
        d.push(&[0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x02]);
        assert_eq!(d.next_frame::<EdgeFrame>(), Err(FrameError::BadLength));
        let mut d = FrameDecoder::new();
        d.push(&[3, 0xff, 0xff, 0xff]);
        assert!(matches!(
            d.next_frame::<EdgeFrame>(),
            Err(FrameError::Decode(_))
        ));
    }
}
