//! Payloads of the control frames: handshake, port binding, stream opens, go-away.
//!
//! Each message has a fixed, hand-written binary layout (big-endian integers, strings as
//! `u16` length plus UTF-8). Hand-written because the layouts are tiny, must be stable across
//! versions, and every field coming off the network is range-checked as it is read; a decoder
//! ignores trailing bytes so a later version may append fields.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use bytes::{BufMut, BytesMut};

use crate::error::{ErrorCode, ProtocolError};
use crate::frame::{Frame, Kind};

/// The first bytes each side sends: magic and protocol version.
pub const MAGIC: &[u8; 6] = b"BURROW";
/// The protocol version this crate speaks.
pub const PROTOCOL_VERSION: u16 = 1;
/// Length of the preamble (`MAGIC` plus a `u16` version).
pub const PREAMBLE_LEN: usize = 8;
/// Longest string accepted in any message.
pub const MAX_STRING: usize = 1024;
/// Most Bind requests one session may make.
pub const MAX_BINDS: usize = 256;

/// The preamble for our version.
pub fn preamble() -> [u8; PREAMBLE_LEN] {
    let mut out = [0u8; PREAMBLE_LEN];
    out[..6].copy_from_slice(MAGIC);
    out[6..].copy_from_slice(&PROTOCOL_VERSION.to_be_bytes());
    out
}

/// Checks a peer's preamble and returns its version.
pub fn parse_preamble(raw: &[u8; PREAMBLE_LEN]) -> Result<u16, ProtocolError> {
    if &raw[..6] != MAGIC {
        return Err(ProtocolError::new(
            ErrorCode::Protocol,
            "peer does not speak the burrow protocol (bad magic bytes)",
        ));
    }
    let version = u16::from_be_bytes([raw[6], raw[7]]);
    if version != PROTOCOL_VERSION {
        return Err(ProtocolError::new(
            ErrorCode::UnsupportedVersion,
            format!("peer speaks protocol version {version}, this build speaks {PROTOCOL_VERSION}"),
        ));
    }
    Ok(version)
}

/// Which role a client authenticates as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Role {
    /// Publishes services.
    Agent = 1,
    /// Visits services (a later feature; the value is reserved now).
    Connector = 2,
}

/// Transport protocol of a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Protocol {
    /// A TCP service: each client connection is one stream.
    Tcp = 0,
    /// A UDP service: each peer is one flow of datagrams.
    Udp = 1,
}

/// Gateway to client: random nonce to sign.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    /// 32 random bytes, fresh per connection.
    pub nonce: [u8; 32],
    /// TLS ended at a proxy in front of the gateway (a WebSocket listener behind nginx or a
    /// CDN), so the gateway cannot see the client's TLS exporter: the proof is bound to the
    /// WebSocket request's host and path instead (see [`crate::auth::proxied_binding`]).
    /// Sent as one trailing byte, only when set.
    pub proxied: bool,
}

/// Client to gateway: who it is and the proof.
#[derive(Clone, PartialEq, Eq)]
pub struct Auth {
    /// The role asked for.
    pub role: Role,
    /// The client's public key (Ed25519).
    pub public_key: [u8; 32],
    /// Signature over the transcript (see [`crate::auth`]).
    pub signature: [u8; 64],
    /// The most the client is willing to accept; the gateway narrows the session to it.
    pub limits: Option<StreamLimits>,
}

/// Limits a client asks for: the session uses, field by field, the smaller of these and the
/// gateway's own, so each side bounds what the other can make it hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamLimits {
    /// Largest frame payload.
    pub max_payload: u32,
    /// Most concurrent streams.
    pub max_streams: u32,
    /// Initial per-stream window.
    pub stream_window: u32,
    /// Per-stream window cap.
    pub max_stream_window: u32,
    /// Session-wide window.
    pub session_window: u32,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("role", &self.role)
            .field("public_key", &crate::auth::encode_b64(&self.public_key))
            .finish_non_exhaustive()
    }
}

/// Gateway to client: accepted, and the parameters of this session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthOk {
    /// The name the gateway knows this client by.
    pub name: String,
    /// Parameters both sides use for this session.
    pub params: SessionParams,
    /// What the gateway understands beyond version 1's first messages ([`FEATURE_UNBIND`]).
    /// Sent as a trailing `u32` when not zero; a gateway that sends none offers none.
    pub features: u32,
}

/// In [`AuthOk::features`]: the gateway takes [`Unbind`] (an agent may give a port back
/// within a session). An agent sends `Unbind` only when the gateway offers this.
pub const FEATURE_UNBIND: u32 = 0x1;

/// Every feature this crate's gateway offers.
pub const FEATURES: u32 = FEATURE_UNBIND;

/// Settings the gateway fixes for a session; both sides enforce them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionParams {
    /// Interval between heartbeats, milliseconds.
    pub heartbeat_ms: u32,
    /// Missed heartbeats before the peer is declared dead.
    pub heartbeat_misses: u32,
    /// Largest frame payload either side may send.
    pub max_payload: u32,
    /// Initial per-stream receive window.
    pub stream_window: u32,
    /// Largest per-stream window after auto-tuning.
    pub max_stream_window: u32,
    /// Session-wide receive window.
    pub session_window: u32,
    /// Most concurrent streams the gateway will open or accept.
    pub max_streams: u32,
}

impl Default for SessionParams {
    fn default() -> Self {
        SessionParams {
            heartbeat_ms: 10_000,
            heartbeat_misses: 3,
            max_payload: 64 * 1024,
            stream_window: 256 * 1024,
            max_stream_window: 4 * 1024 * 1024,
            session_window: 32 * 1024 * 1024,
            max_streams: 16_384,
        }
    }
}

/// Agent to gateway: asks for a public port for one service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind {
    /// The agent's own id for the service, echoed in [`Open::service`].
    pub service: u32,
    /// TCP or UDP.
    pub protocol: Protocol,
    /// Port asked for; 0 lets the gateway choose.
    pub port: u16,
    /// A label for logs.
    pub name: String,
    /// A unix socket path on the gateway to listen on instead of a port (`port` is then 0).
    /// Sent after the name, only when set (or as an empty string when only the group follows);
    /// a gateway grants paths explicitly.
    pub path: Option<String>,
    /// The group this service joins: agents whose binds name the same group share one public
    /// port, and its clients are spread over them. Sent after the path, only when set (an
    /// older agent sends none, and an older gateway ignores it).
    pub group: Option<String>,
}

/// Gateway to agent: the answer to a [`Bind`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindResult {
    /// Which Bind this answers.
    pub service: u32,
    /// [`ErrorCode::Normal`] when granted.
    pub code: ErrorCode,
    /// The public address clients use (when granted), or the reason (when not).
    pub text: String,
}

/// Agent to gateway: the agent no longer publishes this service (its forward was removed
/// from its config); the gateway closes the port and its connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unbind {
    /// The service id of an earlier [`Bind`] of this session.
    pub service: u32,
}

/// Opens a stream: which service, and who the client is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Open {
    /// The service id from the agent's [`Bind`].
    pub service: u32,
    /// The remote client's address as the gateway saw it.
    pub client: Option<SocketAddr>,
}

/// Largest UDP payload a flow carries (the most an IPv4 UDP datagram can hold).
pub const MAX_DATAGRAM: usize = 65_507;

/// Flag on a Datagram frame: the payload starts with the flow's origin (service and client,
/// encoded as in [`Open`]). The gateway sets it on every datagram it sends, so the agent can
/// open (or re-open) a flow from any one of them: datagrams may be dropped, and nothing else
/// tells the agent where a flow belongs. The same encoding fits a QUIC datagram.
pub const DATAGRAM_ORIGIN: u8 = 0x01;

/// One UDP datagram of one flow. The frame's stream-id field is the flow id, which the
/// gateway assigns (odd ids are never reused within a session).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Datagram {
    /// The flow (non-zero).
    pub flow: u32,
    /// Which service and client the flow belongs to; sent by the gateway only.
    pub origin: Option<Open>,
    /// The UDP payload.
    pub data: bytes::Bytes,
}

impl Datagram {
    /// As a Datagram frame.
    pub fn to_frame(&self) -> Frame {
        match &self.origin {
            None => Frame::new(Kind::Datagram, 0, self.flow, self.data.clone()),
            Some(origin) => {
                let mut b = BytesMut::with_capacity(23 + self.data.len());
                origin.encode(&mut b);
                b.extend_from_slice(&self.data);
                Frame::new(Kind::Datagram, DATAGRAM_ORIGIN, self.flow, b.freeze())
            }
        }
    }

    /// From a Datagram frame; the payload may be no longer than [`MAX_DATAGRAM`].
    pub fn decode(frame: &Frame) -> Result<Self, ProtocolError> {
        let flow = frame.header.stream;
        let (origin, data) = if frame.header.flags & DATAGRAM_ORIGIN != 0 {
            let mut r = Reader::new(&frame.payload, "datagram");
            let origin = Open::read(&mut r)?;
            let used = frame.payload.len() - r.buf.len();
            (Some(origin), frame.payload.slice(used..))
        } else {
            (None, frame.payload.clone())
        };
        if data.len() > MAX_DATAGRAM {
            return Err(bad(
                "datagram",
                format_args!("{} bytes, more than UDP's {MAX_DATAGRAM}", data.len()),
            ));
        }
        Ok(Datagram { flow, origin, data })
    }
}

/// The sender closes the session, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GoAway {
    /// The reason code.
    pub code: ErrorCode,
    /// Human-readable detail (never a secret).
    pub message: String,
}

/// Bounds-checked reader over a payload.
pub(crate) struct Reader<'a> {
    pub(crate) buf: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8], what: &'static str) -> Self {
        Reader { buf, what }
    }

    fn short(&self) -> ProtocolError {
        ProtocolError::new(
            ErrorCode::Protocol,
            format!("truncated {} message", self.what),
        )
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], ProtocolError> {
        if self.buf.len() < n {
            return Err(self.short());
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], ProtocolError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    pub(crate) fn u8(&mut self) -> Result<u8, ProtocolError> {
        Ok(self.array::<1>()?[0])
    }

    fn u16(&mut self) -> Result<u16, ProtocolError> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    pub(crate) fn u32(&mut self) -> Result<u32, ProtocolError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    pub(crate) fn string(&mut self) -> Result<String, ProtocolError> {
        let len = self.u16()? as usize;
        if len > MAX_STRING {
            return Err(ProtocolError::new(
                ErrorCode::Protocol,
                format!("string of {len} bytes in {} message", self.what),
            ));
        }
        let raw = self.take(len)?;
        String::from_utf8(raw.to_vec()).map_err(|_| {
            ProtocolError::new(
                ErrorCode::Protocol,
                format!("invalid UTF-8 in {} message", self.what),
            )
        })
    }
}

pub(crate) fn put_string(dst: &mut BytesMut, s: &str) {
    // Truncate on a char boundary rather than send something the peer must refuse.
    let mut end = s.len().min(MAX_STRING);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    dst.put_u16(end as u16);
    dst.extend_from_slice(&s.as_bytes()[..end]);
}

pub(crate) fn bad(what: &str, detail: impl std::fmt::Display) -> ProtocolError {
    ProtocolError::new(ErrorCode::Protocol, format!("bad {what} message: {detail}"))
}

impl Challenge {
    /// As a frame.
    pub fn to_frame(&self) -> Frame {
        let mut b = BytesMut::with_capacity(33);
        b.extend_from_slice(&self.nonce);
        if self.proxied {
            b.put_u8(1);
        }
        Frame::new(Kind::Challenge, 0, 0, b.freeze())
    }
    /// From a payload.
    pub fn decode(p: &[u8]) -> Result<Self, ProtocolError> {
        let mut r = Reader::new(p, "challenge");
        let nonce = r.array()?;
        let proxied = match r.buf {
            [] => false,
            [1] => true,
            _ => {
                return Err(ProtocolError::new(
                    ErrorCode::Protocol,
                    "unknown binding in challenge message",
                ))
            }
        };
        Ok(Challenge { nonce, proxied })
    }
}

impl Auth {
    /// As a frame.
    pub fn to_frame(&self) -> Frame {
        let mut b = BytesMut::with_capacity(97 + 20);
        b.put_u8(self.role as u8);
        b.extend_from_slice(&self.public_key);
        b.extend_from_slice(&self.signature);
        if let Some(l) = &self.limits {
            for v in [
                l.max_payload,
                l.max_streams,
                l.stream_window,
                l.max_stream_window,
                l.session_window,
            ] {
                b.put_u32(v);
            }
        }
        Frame::new(Kind::Auth, 0, 0, b.freeze())
    }
    /// From a payload.
    pub fn decode(p: &[u8]) -> Result<Self, ProtocolError> {
        let mut r = Reader::new(p, "auth");
        let role = match r.u8()? {
            1 => Role::Agent,
            2 => Role::Connector,
            other => return Err(bad("auth", format_args!("unknown role {other}"))),
        };
        let public_key = r.array()?;
        let signature = r.array()?;
        // The limits are optional (an older client sends none).
        let limits = if r.buf.is_empty() {
            None
        } else {
            Some(StreamLimits {
                max_payload: r.u32()?,
                max_streams: r.u32()?,
                stream_window: r.u32()?,
                max_stream_window: r.u32()?,
                session_window: r.u32()?,
            })
        };
        Ok(Auth {
            role,
            public_key,
            signature,
            limits,
        })
    }
}

impl AuthOk {
    /// As a frame.
    pub fn to_frame(&self) -> Frame {
        let mut b = BytesMut::new();
        put_string(&mut b, &self.name);
        let p = &self.params;
        for v in [
            p.heartbeat_ms,
            p.heartbeat_misses,
            p.max_payload,
            p.stream_window,
            p.max_stream_window,
            p.session_window,
            p.max_streams,
        ] {
            b.put_u32(v);
        }
        if self.features != 0 {
            b.put_u32(self.features);
        }
        Frame::new(Kind::AuthOk, 0, 0, b.freeze())
    }
    /// From a payload; parameters are checked for sanity so a hostile gateway cannot make the
    /// agent allocate or spin.
    pub fn decode(p: &[u8]) -> Result<Self, ProtocolError> {
        let mut r = Reader::new(p, "auth-ok");
        let name = r.string()?;
        let params = SessionParams {
            heartbeat_ms: r.u32()?,
            heartbeat_misses: r.u32()?,
            max_payload: r.u32()?,
            stream_window: r.u32()?,
            max_stream_window: r.u32()?,
            session_window: r.u32()?,
            max_streams: r.u32()?,
        };
        params.validate()?;
        // An older gateway ends here: it offers no features.
        let features = if r.buf.len() >= 4 { r.u32()? } else { 0 };
        Ok(AuthOk {
            name,
            params,
            features,
        })
    }
}

impl SessionParams {
    /// These parameters narrowed to what the client accepts, keeping them valid: no field
    /// grows, and a client's nonsense (zero, or below the protocol minimums) is lifted to the
    /// minimum rather than accepted.
    pub fn narrowed(self, l: &StreamLimits) -> SessionParams {
        let max_payload = self.max_payload.min(l.max_payload.max(1024));
        let stream_window = self.stream_window.min(l.stream_window.max(1024));
        SessionParams {
            max_payload,
            max_streams: self.max_streams.min(l.max_streams.max(1)),
            stream_window,
            max_stream_window: self
                .max_stream_window
                .min(l.max_stream_window)
                .max(stream_window),
            session_window: self.session_window.min(l.session_window).max(stream_window),
            ..self
        }
    }

    /// Rejects values no sane peer would send.
    pub fn validate(&self) -> Result<(), ProtocolError> {
        let p = self;
        let check = |ok: bool, what: &str| {
            if ok {
                Ok(())
            } else {
                Err(bad("session parameters", what))
            }
        };
        check(p.heartbeat_ms >= 50, "heartbeat under 50 ms")?;
        check(p.heartbeat_misses >= 1, "zero heartbeat misses")?;
        check(
            (1024..=crate::frame::ABSOLUTE_MAX_PAYLOAD).contains(&p.max_payload),
            "max payload out of range",
        )?;
        check(p.stream_window >= 1024, "stream window under 1 KiB")?;
        check(
            p.max_stream_window >= p.stream_window,
            "max stream window below initial window",
        )?;
        check(
            p.session_window >= p.stream_window,
            "session window below stream window",
        )?;
        check(p.max_streams >= 1, "zero streams")?;
        Ok(())
    }
}

impl Bind {
    /// As a frame.
    pub fn to_frame(&self) -> Frame {
        let mut b = BytesMut::new();
        b.put_u32(self.service);
        b.put_u8(self.protocol as u8);
        b.put_u16(self.port);
        put_string(&mut b, &self.name);
        // Both trailing fields are optional; the path comes first (an empty one stands for
        // none when a group follows), so a gateway that knows only the path still reads it.
        if self.path.is_some() || self.group.is_some() {
            put_string(&mut b, self.path.as_deref().unwrap_or(""));
        }
        if let Some(group) = &self.group {
            put_string(&mut b, group);
        }
        Frame::new(Kind::Bind, 0, 0, b.freeze())
    }
    /// From a payload.
    pub fn decode(p: &[u8]) -> Result<Self, ProtocolError> {
        let mut r = Reader::new(p, "bind");
        let service = r.u32()?;
        let protocol = match r.u8()? {
            0 => Protocol::Tcp,
            1 => Protocol::Udp,
            other => return Err(bad("bind", format_args!("unknown protocol {other}"))),
        };
        let port = r.u16()?;
        let name = r.string()?;
        // The path and the group are optional (an older agent sends neither); an empty path
        // stands for none.
        let path = if r.buf.is_empty() {
            None
        } else {
            Some(r.string()?).filter(|p| !p.is_empty())
        };
        let group = if r.buf.is_empty() {
            None
        } else {
            Some(r.string()?)
        };
        Ok(Bind {
            service,
            protocol,
            port,
            name,
            path,
            group,
        })
    }
}

impl BindResult {
    /// As a frame.
    pub fn to_frame(&self) -> Frame {
        let mut b = BytesMut::new();
        b.put_u32(self.service);
        b.put_u32(self.code as u32);
        put_string(&mut b, &self.text);
        Frame::new(Kind::BindResult, 0, 0, b.freeze())
    }
    /// From a payload.
    pub fn decode(p: &[u8]) -> Result<Self, ProtocolError> {
        let mut r = Reader::new(p, "bind-result");
        Ok(BindResult {
            service: r.u32()?,
            code: ErrorCode::from_u32(r.u32()?),
            text: r.string()?,
        })
    }
}

impl Unbind {
    /// As a frame.
    pub fn to_frame(&self) -> Frame {
        let mut b = BytesMut::with_capacity(4);
        b.put_u32(self.service);
        Frame::new(Kind::Unbind, 0, 0, b.freeze())
    }
    /// From a payload.
    pub fn decode(p: &[u8]) -> Result<Self, ProtocolError> {
        let mut r = Reader::new(p, "unbind");
        Ok(Unbind { service: r.u32()? })
    }
}

impl Open {
    /// As an Open frame for `stream`.
    pub fn to_frame(&self, stream: u32) -> Frame {
        let mut b = BytesMut::with_capacity(24);
        self.encode(&mut b);
        Frame::new(Kind::Open, 0, stream, b.freeze())
    }

    pub(crate) fn encode(&self, b: &mut BytesMut) {
        b.put_u32(self.service);
        match self.client {
            None => b.put_u8(0),
            Some(SocketAddr::V4(a)) => {
                b.put_u8(4);
                b.extend_from_slice(&a.ip().octets());
                b.put_u16(a.port());
            }
            Some(SocketAddr::V6(a)) => {
                b.put_u8(6);
                b.extend_from_slice(&a.ip().octets());
                b.put_u16(a.port());
            }
        }
    }

    /// From a payload.
    pub fn decode(p: &[u8]) -> Result<Self, ProtocolError> {
        Open::read(&mut Reader::new(p, "open"))
    }

    pub(crate) fn read(r: &mut Reader<'_>) -> Result<Self, ProtocolError> {
        let service = r.u32()?;
        let client = match r.u8()? {
            0 => None,
            4 => {
                let ip = Ipv4Addr::from(r.array::<4>()?);
                Some(SocketAddr::new(IpAddr::V4(ip), r.u16()?))
            }
            6 => {
                let ip = Ipv6Addr::from(r.array::<16>()?);
                Some(SocketAddr::new(IpAddr::V6(ip), r.u16()?))
            }
            other => return Err(bad("open", format_args!("unknown address family {other}"))),
        };
        Ok(Open { service, client })
    }
}

impl GoAway {
    /// As a frame.
    pub fn to_frame(&self) -> Frame {
        let mut b = BytesMut::new();
        b.put_u32(self.code as u32);
        put_string(&mut b, &self.message);
        Frame::new(Kind::GoAway, 0, 0, b.freeze())
    }
    /// From a payload.
    pub fn decode(p: &[u8]) -> Result<Self, ProtocolError> {
        let mut r = Reader::new(p, "go-away");
        Ok(GoAway {
            code: ErrorCode::from_u32(r.u32()?),
            message: r.string()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn datagrams_roundtrip_with_and_without_origin() {
        let origin = Open {
            service: 7,
            client: Some("[2001:db8::1]:5353".parse().unwrap()),
        };
        for (origin, len) in [(Some(origin), MAX_DATAGRAM), (None, 0), (None, 1400)] {
            let d = Datagram {
                flow: 3,
                origin,
                data: bytes::Bytes::from(vec![0xabu8; len]),
            };
            assert_eq!(Datagram::decode(&d.to_frame()).unwrap(), d);
        }
        let big = Frame::new(
            Kind::Datagram,
            0,
            3,
            bytes::Bytes::from(vec![0; MAX_DATAGRAM + 1]),
        );
        assert!(Datagram::decode(&big).is_err(), "more than UDP carries");
        let cut = Frame::new(
            Kind::Datagram,
            DATAGRAM_ORIGIN,
            3,
            bytes::Bytes::from_static(b"\0"),
        );
        assert!(Datagram::decode(&cut).is_err(), "origin cut short");
    }

    #[test]
    fn messages_roundtrip() {
        let open = Open {
            service: 3,
            client: Some("[2001:db8::1]:4433".parse().unwrap()),
        };
        assert_eq!(Open::decode(&open.to_frame(5).payload).unwrap(), open);
        let open4 = Open {
            service: 1,
            client: Some("192.0.2.7:80".parse().unwrap()),
        };
        assert_eq!(Open::decode(&open4.to_frame(5).payload).unwrap(), open4);
        let bind = Bind {
            service: 2,
            protocol: Protocol::Tcp,
            port: 8080,
            name: "web".into(),
            path: None,
            group: None,
        };
        assert_eq!(Bind::decode(&bind.to_frame().payload).unwrap(), bind);
        let grouped = Bind {
            group: Some("web-pool".into()),
            ..bind.clone()
        };
        assert_eq!(Bind::decode(&grouped.to_frame().payload).unwrap(), grouped);
        let unix = Bind {
            path: Some("/run/burrow/docker.sock".into()),
            port: 0,
            ..bind.clone()
        };
        assert_eq!(Bind::decode(&unix.to_frame().payload).unwrap(), unix);
        let both = Bind {
            group: Some("web-pool".into()),
            ..unix.clone()
        };
        assert_eq!(Bind::decode(&both.to_frame().payload).unwrap(), both);
        // A bind with neither field is the old layout, byte for byte.
        let mut old = BytesMut::new();
        old.put_u32(2);
        old.put_u8(0);
        old.put_u16(8080);
        put_string(&mut old, "web");
        assert_eq!(&bind.to_frame().payload[..], &old[..]);
        // A gateway that knows only the path reads a grouped bind's path as the empty string
        // (which is no path), and a unix bind's path as the path.
        let frame = grouped.to_frame();
        let mut r = Reader::new(&frame.payload, "bind");
        r.u32().unwrap();
        r.u8().unwrap();
        r.u16().unwrap();
        r.string().unwrap();
        assert_eq!(r.string().unwrap(), "");
        let res = BindResult {
            service: 2,
            code: ErrorCode::PortInUse,
            text: "0.0.0.0:8080 is taken".into(),
        };
        assert_eq!(BindResult::decode(&res.to_frame().payload).unwrap(), res);
        let ok = AuthOk {
            name: "home".into(),
            params: SessionParams::default(),
            features: FEATURES,
        };
        assert_eq!(AuthOk::decode(&ok.to_frame().payload).unwrap(), ok);
        // An older gateway's AuthOk, without the features: none offered.
        let old = ok.to_frame().payload;
        let old = AuthOk::decode(&old[..old.len() - 4]).unwrap();
        assert_eq!(old.features, 0);
        assert_eq!(old.params, ok.params);
        let unbind = Unbind { service: 9 };
        assert_eq!(Unbind::decode(&unbind.to_frame().payload).unwrap(), unbind);
        let ga = GoAway {
            code: ErrorCode::AuthFailed,
            message: "no".into(),
        };
        assert_eq!(GoAway::decode(&ga.to_frame().payload).unwrap(), ga);
        let auth = Auth {
            role: Role::Agent,
            public_key: [1; 32],
            signature: [2; 64],
            limits: None,
        };
        assert_eq!(Auth::decode(&auth.to_frame().payload).unwrap(), auth);
        let with_limits = Auth {
            limits: Some(StreamLimits {
                max_payload: 1,
                max_streams: 2,
                stream_window: 3,
                max_stream_window: 4,
                session_window: 5,
            }),
            ..auth
        };
        assert_eq!(
            Auth::decode(&with_limits.to_frame().payload).unwrap(),
            with_limits
        );
    }

    #[test]
    fn preamble_checks_magic_and_version() {
        assert_eq!(parse_preamble(&preamble()).unwrap(), PROTOCOL_VERSION);
        let mut other = preamble();
        other[7] = 99;
        assert_eq!(
            parse_preamble(&other).unwrap_err().code,
            ErrorCode::UnsupportedVersion
        );
        assert_eq!(
            parse_preamble(b"GET / HT").unwrap_err().code,
            ErrorCode::Protocol
        );
    }

    #[test]
    fn hostile_params_rejected() {
        let p = SessionParams {
            max_payload: u32::MAX,
            ..SessionParams::default()
        };
        assert!(p.validate().is_err());
        let p = SessionParams {
            heartbeat_ms: 0,
            ..SessionParams::default()
        };
        assert!(p.validate().is_err());
    }

    #[test]
    fn narrowing_takes_the_smaller_and_stays_valid() {
        let gw = SessionParams::default();
        let strict = StreamLimits {
            max_payload: 16 * 1024,
            max_streams: 1,
            stream_window: 64 * 1024,
            max_stream_window: 128 * 1024,
            session_window: 1024 * 1024,
        };
        let p = gw.narrowed(&strict);
        assert_eq!(p.max_payload, 16 * 1024);
        assert_eq!(p.max_streams, 1);
        assert_eq!(p.stream_window, 64 * 1024);
        assert_eq!(p.max_stream_window, 128 * 1024);
        assert_eq!(p.session_window, 1024 * 1024);
        assert_eq!(p.heartbeat_ms, gw.heartbeat_ms);
        p.validate().unwrap();
        // A generous client changes nothing; a nonsensical one cannot break the session.
        let loose = StreamLimits {
            max_payload: u32::MAX,
            max_streams: u32::MAX,
            stream_window: u32::MAX,
            max_stream_window: u32::MAX,
            session_window: u32::MAX,
        };
        assert_eq!(gw.narrowed(&loose), gw);
        let zero = StreamLimits {
            max_payload: 0,
            max_streams: 0,
            stream_window: 0,
            max_stream_window: 0,
            session_window: 0,
        };
        gw.narrowed(&zero).validate().unwrap();
    }

    proptest! {
        #[test]
        fn decoders_never_panic(data in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = Challenge::decode(&data);
            let _ = Auth::decode(&data);
            let _ = AuthOk::decode(&data);
            let _ = Bind::decode(&data);
            let _ = BindResult::decode(&data);
            let _ = Unbind::decode(&data);
            let _ = Open::decode(&data);
            let _ = GoAway::decode(&data);
        }
    }
}
