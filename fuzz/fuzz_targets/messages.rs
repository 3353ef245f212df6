//! Every control-message decoder (and the preamble and key-string parsers) on arbitrary bytes,
//! the connector's `Dial` and `Announce` included.
//!
//! Checks, besides "no panic":
//! - whatever decodes re-encodes (`to_frame`) to a frame of the right kind whose payload
//!   decodes to an equal value (round trip);
//! - the encoding is canonical: decoders ignore trailing bytes, so the re-encoded payload is a
//!   prefix of the input (except reason codes this build does not know, which decode to
//!   `Internal` by design);
//! - a decoded `AuthOk` carries session parameters that pass `validate`;
//! - narrowing valid session parameters (a decoded `AuthOk`'s, else the defaults) to a
//!   client's `StreamLimits` (an `Auth`'s, else the first 20 input bytes) keeps them valid,
//!   never grows a field, and honours the client's limit wherever it is above the protocol
//!   minimum;
//! - `parse_preamble` accepts exactly our preamble;
//! - a key or key hash that parses prints back to an equal value.
#![no_main]

use burrow_proto::auth::{KeyHash, SecretKey};
use burrow_proto::connect::{Announce, Dial};
use burrow_proto::frame::{Kind, ABSOLUTE_MAX_PAYLOAD, HEADER_LEN};
use burrow_proto::message::{
    parse_preamble, preamble, Auth, AuthOk, Bind, BindResult, Challenge, GoAway, Open,
    SessionParams, StreamLimits, Unbind, PREAMBLE_LEN,
};
use burrow_proto::{Decoder, ErrorCode, Frame};
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;

/// The frame goes through the real decoder and keeps its kind and stream.
fn check_frame(frame: &Frame, kind: Kind, stream: u32) -> Frame {
    assert_eq!(frame.header.kind, kind);
    assert_eq!(frame.header.stream, stream);
    assert_eq!(frame.header.length as usize, frame.payload.len());
    let mut buf = BytesMut::new();
    frame.encode(&mut buf);
    let out = Decoder::new(ABSOLUTE_MAX_PAYLOAD)
        .decode(&mut buf)
        .expect("our own encoding is a valid frame")
        .expect("a whole frame");
    assert!(buf.is_empty());
    assert_eq!(&out, frame);
    out
}

fn assert_prefix(input: &[u8], encoded: &[u8], what: &str) {
    assert!(
        input.starts_with(encoded),
        "{what}: re-encoding is not a prefix of the input\n input: {input:02x?}\n encoded: {encoded:02x?}"
    );
}

fn known_code(raw: &[u8]) -> bool {
    let v = u32::from_be_bytes([raw[0], raw[1], raw[2], raw[3]]);
    ErrorCode::from_u32(v) as u32 == v
}

fn check_narrowing(gw: &SessionParams, l: &StreamLimits) {
    let p = gw.narrowed(l);
    if let Err(e) = p.validate() {
        panic!(
            "narrowed parameters are invalid: {e}\n gateway {gw:?}\n limits {l:?}\n result {p:?}"
        );
    }
    assert_eq!(p.heartbeat_ms, gw.heartbeat_ms);
    assert_eq!(p.heartbeat_misses, gw.heartbeat_misses);
    assert!(p.max_payload <= gw.max_payload && p.max_payload <= l.max_payload.max(1024));
    assert!(p.max_streams <= gw.max_streams && p.max_streams <= l.max_streams.max(1));
    assert!(p.stream_window <= gw.stream_window && p.stream_window <= l.stream_window.max(1024));
    assert!(p.max_stream_window <= gw.max_stream_window);
    assert!(p.max_stream_window <= l.max_stream_window.max(p.stream_window));
    assert!(p.session_window <= gw.session_window);
    assert!(p.session_window <= l.session_window.max(p.stream_window));
}

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = Challenge::decode(data) {
        let f = check_frame(&m.to_frame(), Kind::Challenge, 0);
        assert_eq!(Challenge::decode(&f.payload).expect("roundtrip"), m);
        assert_prefix(data, &f.payload, "challenge");
    }
    if let Ok(m) = Auth::decode(data) {
        let f = check_frame(&m.to_frame(), Kind::Auth, 0);
        assert_eq!(Auth::decode(&f.payload).expect("roundtrip"), m);
        assert_prefix(data, &f.payload, "auth");
    }
    if let Ok(m) = AuthOk::decode(data) {
        m.params.validate().expect("decoded params are valid");
        let f = check_frame(&m.to_frame(), Kind::AuthOk, 0);
        assert_eq!(AuthOk::decode(&f.payload).expect("roundtrip"), m);
        assert_prefix(data, &f.payload, "auth-ok");
    }
    if let Ok(m) = Bind::decode(data) {
        let f = check_frame(&m.to_frame(), Kind::Bind, 0);
        assert_eq!(Bind::decode(&f.payload).expect("roundtrip"), m);
        assert_prefix(data, &f.payload, "bind");
    }
    if let Ok(m) = BindResult::decode(data) {
        let f = check_frame(&m.to_frame(), Kind::BindResult, 0);
        assert_eq!(BindResult::decode(&f.payload).expect("roundtrip"), m);
        if known_code(&data[4..8]) {
            assert_prefix(data, &f.payload, "bind-result");
        } else {
            assert_eq!(m.code, ErrorCode::Internal);
        }
    }
    if let Ok(m) = Unbind::decode(data) {
        let f = check_frame(&m.to_frame(), Kind::Unbind, 0);
        assert_eq!(Unbind::decode(&f.payload).expect("roundtrip"), m);
        assert_prefix(data, &f.payload, "unbind");
    }
    if let Ok(m) = Open::decode(data) {
        // Any non-zero stream id; take it from the input so it varies.
        let stream = u32::from(data[0]) * 2 + 1;
        let f = check_frame(&m.to_frame(stream), Kind::Open, stream);
        assert_eq!(Open::decode(&f.payload).expect("roundtrip"), m);
        assert_prefix(data, &f.payload, "open");
    }
    // The connector's additions: the Dial after an Open, and the Announce.
    if let Ok(Some(d)) = Dial::from_open(data) {
        let open = Open::decode(data).expect("a Dial comes after a valid Open");
        let stream = u32::from(data[0]) * 2 + 2;
        let f = check_frame(&d.open_frame(&open, stream), Kind::Open, stream);
        assert_eq!(
            Open::decode(&f.payload).expect("the Open reads as before"),
            open
        );
        assert_eq!(Dial::from_open(&f.payload).expect("roundtrip"), Some(d));
    }
    if let Ok(m) = Announce::decode(data) {
        let f = check_frame(&m.to_frame(), Kind::Announce, 0);
        assert_eq!(Announce::decode(&f.payload).expect("roundtrip"), m);
        assert_prefix(data, &f.payload, "announce");
    }
    if let Ok(m) = GoAway::decode(data) {
        let f = check_frame(&m.to_frame(), Kind::GoAway, 0);
        assert_eq!(GoAway::decode(&f.payload).expect("roundtrip"), m);
        if known_code(&data[..4]) {
            assert_prefix(data, &f.payload, "go-away");
        } else {
            assert_eq!(m.code, ErrorCode::Internal);
        }
    }

    let gateway = AuthOk::decode(data).map_or_else(|_| SessionParams::default(), |m| m.params);
    let client = Auth::decode(data).ok().and_then(|a| a.limits).or_else(|| {
        let w = |i: usize| -> Option<u32> {
            Some(u32::from_be_bytes(data.get(i..i + 4)?.try_into().ok()?))
        };
        Some(StreamLimits {
            max_payload: w(0)?,
            max_streams: w(4)?,
            stream_window: w(8)?,
            max_stream_window: w(12)?,
            session_window: w(16)?,
        })
    });
    if let Some(l) = client {
        check_narrowing(&gateway, &l);
    }

    if data.len() >= PREAMBLE_LEN {
        let mut raw = [0u8; PREAMBLE_LEN];
        raw.copy_from_slice(&data[..PREAMBLE_LEN]);
        match parse_preamble(&raw) {
            Ok(v) => {
                assert_eq!(raw, preamble());
                assert_eq!(v, burrow_proto::message::PROTOCOL_VERSION);
            }
            Err(e) => {
                assert_ne!(raw, preamble());
                assert!(matches!(
                    e.code,
                    ErrorCode::Protocol | ErrorCode::UnsupportedVersion
                ));
            }
        }
    }

    // Frame payload helpers used on Window, Reset and Ping frames.
    if data.len() >= HEADER_LEN {
        let f = Frame::new(
            Kind::Ping,
            0,
            0,
            bytes::Bytes::copy_from_slice(&data[HEADER_LEN..]),
        );
        assert_eq!(f.payload_u32().is_ok(), f.payload.len() == 4);
        assert_eq!(f.payload_u64().is_ok(), f.payload.len() == 8);
    }

    if let Ok(s) = std::str::from_utf8(data) {
        if let Ok(h) = KeyHash::parse(s) {
            let text = h.to_string();
            assert_eq!(KeyHash::parse(&text).expect("printed hash parses"), h);
            assert_eq!(text, s.trim(), "key hash encoding is not canonical");
            assert!(h.short().starts_with("bkh_"));
        }
        if let Ok(k) = SecretKey::parse(s) {
            let text = k.expose();
            assert_eq!(SecretKey::parse(&text).expect("exposed key parses"), k);
            assert_eq!(text, s.trim(), "key encoding is not canonical");
        }
    }
});
