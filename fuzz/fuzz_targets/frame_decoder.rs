//! The frame decoder on arbitrary bytes, delivered in arbitrary pieces.
//!
//! Input layout:
//! - byte 0: the decoder's maximum payload, `byte0 * 4` (0..=1020 bytes);
//! - byte 1: `k = (byte1 & 7) + 1`, the number of chunk-size bytes that follow;
//! - the next `k` bytes: chunk sizes, used in turn and cycled (0 = all the rest at once);
//! - the rest: the bytes as they come off the wire.
//!
//! Checks:
//! - no panic;
//! - every frame's payload length equals `header.length` and is within the limit; header
//!   invariants (session-level kinds on stream 0, stream kinds other than Window never on 0);
//! - re-encoding a frame and decoding it with a fresh decoder gives the same frame and
//!   consumes exactly the encoding;
//! - the frames (and the error, if any) do not depend on how the bytes were split: the
//!   chunked run equals a run that gets all bytes in one piece.
#![no_main]

use burrow_proto::frame::HEADER_LEN;
use burrow_proto::{Decoder, ErrorCode, Frame};
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;

/// Decodes everything in `buf` that is complete; `Err` ends the session.
fn drain(
    dec: &mut Decoder,
    buf: &mut BytesMut,
    max: u32,
    out: &mut Vec<Frame>,
) -> Result<(), ErrorCode> {
    loop {
        match dec.decode(buf) {
            Ok(Some(frame)) => {
                check_frame(&frame, max);
                out.push(frame);
            }
            Ok(None) => return Ok(()),
            Err(e) => return Err(e.code),
        }
    }
}

fn check_frame(frame: &Frame, max: u32) {
    let h = frame.header;
    assert_eq!(
        frame.payload.len(),
        h.length as usize,
        "payload length != header length"
    );
    assert!(
        h.length <= max,
        "payload of {} over the limit {max}",
        h.length
    );
    if h.kind.is_session_level() {
        assert_eq!(h.stream, 0, "{:?} on stream {}", h.kind, h.stream);
    } else if h.kind != burrow_proto::Kind::Window {
        assert_ne!(h.stream, 0, "{:?} on stream 0", h.kind);
    }
    assert_eq!(h.to_bytes().len(), HEADER_LEN);

    // Round trip through a fresh decoder.
    let mut enc = BytesMut::new();
    frame.encode(&mut enc);
    assert_eq!(enc.len(), HEADER_LEN + frame.payload.len());
    assert_eq!(&enc[..HEADER_LEN], &h.to_bytes()[..]);
    let mut dec = Decoder::new(max);
    let again = dec
        .decode(&mut enc)
        .expect("a decoded frame re-encodes to something decodable")
        .expect("a whole encoded frame decodes at once");
    assert_eq!(&again, frame);
    assert!(enc.is_empty(), "re-decoding left {} bytes", enc.len());
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let max = u32::from(data[0]) * 4;
    let k = usize::from(data[1] & 7) + 1;
    if data.len() < 2 + k {
        return;
    }
    let sizes = &data[2..2 + k];
    let wire = &data[2 + k..];

    // Reference: everything at once.
    let mut whole_frames = Vec::new();
    let mut dec = Decoder::new(max);
    assert_eq!(dec.max_payload(), max);
    let mut buf = BytesMut::from(wire);
    let whole_result = drain(&mut dec, &mut buf, max, &mut whole_frames);

    // The same bytes in pieces.
    let mut chunk_frames = Vec::new();
    let mut dec = Decoder::new(max);
    let mut buf = BytesMut::new();
    let mut rest = wire;
    let mut chunk_result = Ok(());
    let mut i = 0;
    while !rest.is_empty() {
        let size = match sizes[i % sizes.len()] {
            0 => rest.len(),
            n => usize::from(n).min(rest.len()),
        };
        i += 1;
        buf.extend_from_slice(&rest[..size]);
        rest = &rest[size..];
        chunk_result = drain(&mut dec, &mut buf, max, &mut chunk_frames);
        if chunk_result.is_err() {
            break;
        }
    }
    if wire.is_empty() {
        chunk_result = drain(&mut dec, &mut buf, max, &mut chunk_frames);
    }

    assert_eq!(
        chunk_frames, whole_frames,
        "frames depend on how the input was split"
    );
    assert_eq!(
        chunk_result, whole_result,
        "outcome depends on how the input was split"
    );
});
