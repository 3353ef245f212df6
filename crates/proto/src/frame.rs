//! Frames: the unit everything on a session travels in.
//!
//! Every frame is a 10-byte header followed by `length` bytes of payload:
//!
//! ```text
//! 0      1      2             6             10
//! +------+------+-------------+-------------+----------------+
//! | kind | flags| stream (BE) | length (BE) | payload ...    |
//! +------+------+-------------+-------------+----------------+
//! ```
//!
//! The decoder checks the declared length against the session's maximum *before* it
//! waits for or allocates the payload, so a peer cannot make us buffer more than one
//! maximum-size frame. Decoding is two-step in the mini-redis manner: an incomplete frame
//! is `Ok(None)`, not an error.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::error::{ErrorCode, ProtocolError};

/// Size of a frame header on the wire.
pub const HEADER_LEN: usize = 10;

/// Hard ceiling for any frame's payload, whatever the configuration says (16 MiB).
pub const ABSOLUTE_MAX_PAYLOAD: u32 = 16 * 1024 * 1024;

/// Identifies one stream within a session. Stream 0 means "the session itself".
pub type StreamId = u32;

/// What a frame is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Kind {
    /// Stream payload. Flag [`FIN`] half-closes the sender's direction.
    Data = 0x00,
    /// Opens a new stream; payload is an [`crate::message::Open`].
    Open = 0x01,
    /// Grants send credit; payload is a `u32` increment. Stream 0 is the session window.
    Window = 0x02,
    /// Aborts a stream; payload is a `u32` [`ErrorCode`].
    Reset = 0x03,
    /// Liveness probe; payload is an opaque `u64`. Flag [`ACK`] marks the answer.
    Ping = 0x04,
    /// The sender is closing the session; payload is a [`crate::message::GoAway`].
    GoAway = 0x05,
    /// An unreliable datagram for a UDP flow (stream field = flow id).
    Datagram = 0x06,
    /// Gateway to client: the authentication challenge.
    Challenge = 0x10,
    /// Client to gateway: proof of the key.
    Auth = 0x11,
    /// Gateway to client: authentication accepted, with session parameters.
    AuthOk = 0x12,
    /// Agent to gateway: asks for a public port for one service.
    Bind = 0x13,
    /// Gateway to agent: the answer to one [`Kind::Bind`] or [`Kind::Announce`].
    BindResult = 0x14,
    /// Agent to gateway: gives one bound service's port back; payload is an
    /// [`crate::message::Unbind`]. Sent only to a gateway whose `AuthOk` offers
    /// [`crate::message::FEATURE_UNBIND`].
    Unbind = 0x15,
    /// Agent to gateway: a private service, which connectors reach by name and which has no
    /// public port; payload is a [`crate::connect::Announce`].
    Announce = 0x16,
}

impl Kind {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            0x00 => Self::Data,
            0x01 => Self::Open,
            0x02 => Self::Window,
            0x03 => Self::Reset,
            0x04 => Self::Ping,
            0x05 => Self::GoAway,
            0x06 => Self::Datagram,
            0x10 => Self::Challenge,
            0x11 => Self::Auth,
            0x12 => Self::AuthOk,
            0x13 => Self::Bind,
            0x14 => Self::BindResult,
            0x15 => Self::Unbind,
            0x16 => Self::Announce,
            _ => return None,
        })
    }

    /// Whether frames of this kind belong to the session (stream 0) rather than a stream.
    pub fn is_session_level(self) -> bool {
        matches!(
            self,
            Self::Ping
                | Self::GoAway
                | Self::Challenge
                | Self::Auth
                | Self::AuthOk
                | Self::Bind
                | Self::BindResult
                | Self::Unbind
                | Self::Announce
        )
    }
}

/// Flag on [`Kind::Data`]: the sender will send no more data on this stream.
pub const FIN: u8 = 0x01;
/// Flag on [`Kind::Ping`]: this is the answer to a ping.
pub const ACK: u8 = 0x01;

/// A decoded frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// What the frame is.
    pub kind: Kind,
    /// Kind-specific flags.
    pub flags: u8,
    /// The stream it belongs to (0 for the session).
    pub stream: StreamId,
    /// Payload length in bytes.
    pub length: u32,
}

impl Header {
    /// Writes the header into `dst`.
    pub fn encode(&self, dst: &mut impl BufMut) {
        dst.put_u8(self.kind as u8);
        dst.put_u8(self.flags);
        dst.put_u32(self.stream);
        dst.put_u32(self.length);
    }

    /// The header as a fixed array, for vectored writes that send the payload without copying.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        let mut cursor = &mut out[..];
        self.encode(&mut cursor);
        out
    }

    /// Parses a header from exactly [`HEADER_LEN`] bytes and checks it against `max_payload`.
    pub fn decode(src: &[u8; HEADER_LEN], max_payload: u32) -> Result<Self, ProtocolError> {
        let mut buf = &src[..];
        let raw_kind = buf.get_u8();
        let flags = buf.get_u8();
        let stream = buf.get_u32();
        let length = buf.get_u32();
        let kind = Kind::from_u8(raw_kind).ok_or_else(|| {
            ProtocolError::new(
                ErrorCode::Protocol,
                format!("unknown frame kind 0x{raw_kind:02x}"),
            )
        })?;
        if length > max_payload.min(ABSOLUTE_MAX_PAYLOAD) {
            return Err(ProtocolError::new(
                ErrorCode::FrameTooLarge,
                format!("frame of {length} bytes exceeds the limit of {max_payload}"),
            ));
        }
        if kind.is_session_level() && stream != 0 {
            return Err(ProtocolError::new(
                ErrorCode::Protocol,
                format!("{kind:?} frame on stream {stream}; it belongs to stream 0"),
            ));
        }
        if !kind.is_session_level() && kind != Kind::Window && stream == 0 {
            return Err(ProtocolError::new(
                ErrorCode::Protocol,
                format!("{kind:?} frame on stream 0 needs a stream id"),
            ));
        }
        Ok(Header {
            kind,
            flags,
            stream,
            length,
        })
    }
}

/// A whole frame: header plus payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// The header; `header.length` equals `payload.len()`.
    pub header: Header,
    /// The payload (zero-copy slice of the receive buffer).
    pub payload: Bytes,
}

impl Frame {
    /// Builds a frame, filling in the length from the payload.
    pub fn new(kind: Kind, flags: u8, stream: StreamId, payload: Bytes) -> Self {
        let length = u32::try_from(payload.len()).unwrap_or(u32::MAX);
        Frame {
            header: Header {
                kind,
                flags,
                stream,
                length,
            },
            payload,
        }
    }

    /// A window update for `stream` (0 = session).
    pub fn window(stream: StreamId, increment: u32) -> Self {
        Frame::new(
            Kind::Window,
            0,
            stream,
            Bytes::copy_from_slice(&increment.to_be_bytes()),
        )
    }

    /// A reset of `stream` with a reason.
    pub fn reset(stream: StreamId, code: ErrorCode) -> Self {
        Frame::new(
            Kind::Reset,
            0,
            stream,
            Bytes::copy_from_slice(&(code as u32).to_be_bytes()),
        )
    }

    /// A ping (or its answer when `ack`).
    pub fn ping(opaque: u64, ack: bool) -> Self {
        Frame::new(
            Kind::Ping,
            if ack { ACK } else { 0 },
            0,
            Bytes::copy_from_slice(&opaque.to_be_bytes()),
        )
    }

    /// Encodes header and payload into `dst`.
    pub fn encode(&self, dst: &mut BytesMut) {
        dst.reserve(HEADER_LEN + self.payload.len());
        self.header.encode(dst);
        dst.extend_from_slice(&self.payload);
    }

    /// Reads the `u32` payload of a Window or Reset frame.
    pub fn payload_u32(&self) -> Result<u32, ProtocolError> {
        let arr: [u8; 4] = self.payload.as_ref().try_into().map_err(|_| {
            ProtocolError::new(
                ErrorCode::Protocol,
                format!(
                    "{:?} frame payload is {} bytes, expected 4",
                    self.header.kind,
                    self.payload.len()
                ),
            )
        })?;
        Ok(u32::from_be_bytes(arr))
    }

    /// Reads the `u64` payload of a Ping frame.
    pub fn payload_u64(&self) -> Result<u64, ProtocolError> {
        let arr: [u8; 8] = self.payload.as_ref().try_into().map_err(|_| {
            ProtocolError::new(
                ErrorCode::Protocol,
                format!("ping payload is {} bytes, expected 8", self.payload.len()),
            )
        })?;
        Ok(u64::from_be_bytes(arr))
    }
}

/// Incremental frame decoder over a receive buffer.
#[derive(Debug, Clone)]
pub struct Decoder {
    max_payload: u32,
    pending: Option<Header>,
}

impl Decoder {
    /// A decoder that rejects payloads over `max_payload` bytes.
    pub fn new(max_payload: u32) -> Self {
        Decoder {
            max_payload: max_payload.min(ABSOLUTE_MAX_PAYLOAD),
            pending: None,
        }
    }

    /// The largest payload this decoder accepts.
    pub fn max_payload(&self) -> u32 {
        self.max_payload
    }

    /// Takes one frame off the front of `src`. `Ok(None)` means more bytes are needed;
    /// an error means the stream of frames is corrupt and the session must close.
    pub fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, ProtocolError> {
        let header = match self.pending {
            Some(h) => h,
            None => {
                if src.len() < HEADER_LEN {
                    return Ok(None);
                }
                let mut raw = [0u8; HEADER_LEN];
                raw.copy_from_slice(&src[..HEADER_LEN]);
                let h = Header::decode(&raw, self.max_payload)?;
                src.advance(HEADER_LEN);
                self.pending = Some(h);
                h
            }
        };
        let len = header.length as usize;
        if src.len() < len {
            // Reserve only what the declared (already bounded) length needs.
            src.reserve(len - src.len());
            return Ok(None);
        }
        self.pending = None;
        let payload = src.split_to(len).freeze();
        Ok(Some(Frame { header, payload }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn roundtrip(frame: &Frame) -> Frame {
        let mut buf = BytesMut::new();
        frame.encode(&mut buf);
        let mut dec = Decoder::new(1 << 20);
        let out = dec.decode(&mut buf).unwrap().unwrap();
        assert!(buf.is_empty());
        out
    }

    #[test]
    fn data_frame_roundtrips() {
        let f = Frame::new(Kind::Data, FIN, 7, Bytes::from_static(b"hello"));
        assert_eq!(roundtrip(&f), f);
    }

    #[test]
    fn incomplete_is_none_then_completes() {
        let f = Frame::new(Kind::Data, 0, 3, Bytes::from(vec![9u8; 100]));
        let mut whole = BytesMut::new();
        f.encode(&mut whole);
        let mut dec = Decoder::new(1 << 20);
        let mut buf = BytesMut::new();
        for (i, b) in whole.iter().enumerate() {
            buf.extend_from_slice(&[*b]);
            let got = dec.decode(&mut buf).unwrap();
            if i + 1 < whole.len() {
                assert!(got.is_none());
            } else {
                assert_eq!(got.unwrap(), f);
            }
        }
    }

    #[test]
    fn oversized_frame_rejected_before_payload_arrives() {
        let h = Header {
            kind: Kind::Data,
            flags: 0,
            stream: 1,
            length: 70_000,
        };
        let mut buf = BytesMut::new();
        h.encode(&mut buf);
        let mut dec = Decoder::new(65_536);
        let err = dec.decode(&mut buf).unwrap_err();
        assert_eq!(err.code, ErrorCode::FrameTooLarge);
        // Nothing was reserved for the refused payload.
        assert!(buf.capacity() < 70_000);
    }

    #[test]
    fn unknown_kind_and_misplaced_stream_rejected() {
        let mut raw = [0u8; HEADER_LEN];
        raw[0] = 0x7f;
        assert_eq!(
            Header::decode(&raw, 100).unwrap_err().code,
            ErrorCode::Protocol
        );
        let ping_on_stream = Header {
            kind: Kind::Ping,
            flags: 0,
            stream: 5,
            length: 8,
        };
        assert!(Header::decode(&ping_on_stream.to_bytes(), 100).is_err());
        let data_on_zero = Header {
            kind: Kind::Data,
            flags: 0,
            stream: 0,
            length: 0,
        };
        assert!(Header::decode(&data_on_zero.to_bytes(), 100).is_err());
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let mut buf = BytesMut::from(&data[..]);
            let mut dec = Decoder::new(1024);
            while let Ok(Some(_)) = dec.decode(&mut buf) {}
        }

        #[test]
        fn data_frames_roundtrip(stream in 1u32.., fin in any::<bool>(),
                                 payload in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let f = Frame::new(Kind::Data, if fin { FIN } else { 0 }, stream, Bytes::from(payload));
            prop_assert_eq!(roundtrip(&f), f);
        }

        #[test]
        fn split_anywhere_decodes_same(payload in proptest::collection::vec(any::<u8>(), 0..512),
                                       cut in 0usize..600) {
            let f = Frame::new(Kind::Data, 0, 9, Bytes::from(payload));
            let mut whole = BytesMut::new();
            f.encode(&mut whole);
            let cut = cut.min(whole.len());
            let mut buf = BytesMut::from(&whole[..cut]);
            let mut dec = Decoder::new(1024);
            let first = dec.decode(&mut buf).unwrap();
            if cut < whole.len() {
                prop_assert!(first.is_none());
                buf.extend_from_slice(&whole[cut..]);
                prop_assert_eq!(dec.decode(&mut buf).unwrap().unwrap(), f);
            } else {
                prop_assert_eq!(first.unwrap(), f);
            }
        }
    }
}
