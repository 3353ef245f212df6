//! What the connector role adds to the wire: the [`Dial`] that follows the [`Open`] of a
//! connector's stream, and an agent's [`Announce`] of a private service.
//!
//! A connector opens streams itself (even ids). Each Open carries, after the usual service
//! id and client address, a Dial: which agent, and which of its private services (or, where
//! the agent allows it, which `host:port`) the stream is for. The gateway checks the Dial
//! against the connector's `reach`, then opens a stream of its own to that agent with
//! [`DIAL_SERVICE`] and the same Dial (its `connector` field set to the name the gateway
//! knows the connector by), and relays one stream into the other. The agent checks the
//! Dial again against its own private services and `allow` patterns.
//!
//! The Dial travels in the Open frame's trailing bytes, which an older peer ignores; the
//! service id [`DIAL_SERVICE`] is no agent's forward, so an agent that does not read Dials
//! refuses such a stream instead of connecting it anywhere.

use bytes::{BufMut, BytesMut};

use crate::error::ProtocolError;
use crate::frame::{Frame, Kind, StreamId};
use crate::message::{bad, put_string, Open, Reader};

/// The service id of an Open that carries a [`Dial`]. An agent's services are numbered from
/// 0, so no forward has it.
pub const DIAL_SERVICE: u32 = u32::MAX;

/// The first byte of a Dial after the Open's fields: marks the trailer as a Dial, so that a
/// later version can append something else.
const DIAL_TAG: u8 = 1;
/// Dial flag: check only, connect nothing (see [`Dial::probe`]).
const PROBE: u8 = 0x01;

/// What a connector's stream is for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum DialTarget {
    /// One of the agent's private services, by name.
    Service(String),
    /// A `host:port` the agent connects to itself, if its `allow` patterns let it.
    Address(String),
}

impl std::fmt::Display for DialTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DialTarget::Service(s) | DialTarget::Address(s) => f.write_str(s),
        }
    }
}

/// A connector's request, carried after the [`Open`] of its stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dial {
    /// The agent, by the name the gateway knows it by.
    pub agent: String,
    /// Its service, or a target.
    pub target: DialTarget,
    /// The connector, by the name the gateway knows it by: filled in by the gateway (what a
    /// connector sends here is ignored).
    pub connector: String,
    /// Only ask whether the stream would be allowed: the agent checks as for a real stream,
    /// connects to nothing, and finishes the stream (allowed) or resets it with the reason.
    pub probe: bool,
}

impl Dial {
    /// The Open frame for `stream`: `open`'s fields, then this Dial.
    pub fn open_frame(&self, open: &Open, stream: StreamId) -> Frame {
        let mut b = BytesMut::with_capacity(64);
        open.encode(&mut b);
        b.put_u8(DIAL_TAG);
        b.put_u8(if self.probe { PROBE } else { 0 });
        put_string(&mut b, &self.agent);
        let (kind, text) = match &self.target {
            DialTarget::Service(s) => (1, s),
            DialTarget::Address(a) => (2, a),
        };
        b.put_u8(kind);
        put_string(&mut b, text);
        put_string(&mut b, &self.connector);
        Frame::new(Kind::Open, 0, stream, b.freeze())
    }

    /// The Dial in an Open frame's payload, if it carries one. The Open's own fields are
    /// read (and checked) again; bytes after the Dial are ignored.
    pub fn from_open(payload: &[u8]) -> Result<Option<Dial>, ProtocolError> {
        let mut r = Reader::new(payload, "open");
        Open::read(&mut r)?;
        match r.buf.first() {
            Some(&DIAL_TAG) => {}
            // Nothing after the Open (a gateway's stream for a public client), or a trailer
            // of a later version.
            _ => return Ok(None),
        }
        r.u8()?;
        let flags = r.u8()?;
        let agent = r.string()?;
        let target = match r.u8()? {
            1 => DialTarget::Service(r.string()?),
            2 => DialTarget::Address(r.string()?),
            other => return Err(bad("dial", format_args!("unknown target kind {other}"))),
        };
        let connector = r.string()?;
        Ok(Some(Dial {
            agent,
            target,
            connector,
            probe: flags & PROBE != 0,
        }))
    }
}

/// Agent to gateway: a private service. It has no public port; connectors name it. The
/// gateway answers with a [`crate::message::BindResult`] for `service`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Announce {
    /// The agent's own id for it, echoed in the answer.
    pub service: u32,
    /// The name connectors use.
    pub name: String,
}

impl Announce {
    /// As a frame.
    pub fn to_frame(&self) -> Frame {
        let mut b = BytesMut::new();
        b.put_u32(self.service);
        put_string(&mut b, &self.name);
        Frame::new(Kind::Announce, 0, 0, b.freeze())
    }

    /// From a payload.
    pub fn decode(p: &[u8]) -> Result<Self, ProtocolError> {
        let mut r = Reader::new(p, "announce");
        Ok(Announce {
            service: r.u32()?,
            name: r.string()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn dials_roundtrip_and_plain_opens_have_none() {
        let open = Open {
            service: DIAL_SERVICE,
            client: Some("192.0.2.7:40000".parse().unwrap()),
        };
        for dial in [
            Dial {
                agent: "office".into(),
                target: DialTarget::Service("vnc".into()),
                connector: "laptop".into(),
                probe: false,
            },
            Dial {
                agent: "office".into(),
                target: DialTarget::Address("[2001:db8::1]:22".into()),
                connector: String::new(),
                probe: true,
            },
        ] {
            let frame = dial.open_frame(&open, 4);
            assert_eq!(frame.header.kind, Kind::Open);
            assert_eq!(frame.header.stream, 4);
            // The Open reads as before: an older peer sees a stream for DIAL_SERVICE.
            assert_eq!(Open::decode(&frame.payload).unwrap(), open);
            assert_eq!(Dial::from_open(&frame.payload).unwrap(), Some(dial));
        }
        let plain = open.to_frame(3);
        assert_eq!(Dial::from_open(&plain.payload).unwrap(), None);
        // A trailer of a later version is not a Dial.
        let mut later = BytesMut::from(&plain.payload[..]);
        later.put_u8(9);
        assert_eq!(Dial::from_open(&later).unwrap(), None);
        // A Dial cut short is an error, not a guess.
        let full = Dial {
            agent: "a".into(),
            target: DialTarget::Service("s".into()),
            connector: "c".into(),
            probe: false,
        }
        .open_frame(&open, 2);
        for cut in 8..full.payload.len() {
            let short = &full.payload[..cut];
            assert!(
                Dial::from_open(short).is_err() || Open::decode(short).is_ok(),
                "{cut}"
            );
        }
        assert!(Dial::from_open(&full.payload[..full.payload.len() - 1]).is_err());
    }

    #[test]
    fn announces_roundtrip() {
        let a = Announce {
            service: 0x8000_0001,
            name: "vnc".into(),
        };
        let f = a.to_frame();
        assert_eq!(f.header.kind, Kind::Announce);
        assert_eq!(Announce::decode(&f.payload).unwrap(), a);
        assert!(Announce::decode(&f.payload[..3]).is_err());
    }

    proptest! {
        #[test]
        fn decoders_never_panic(data in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = Dial::from_open(&data);
            let _ = Announce::decode(&data);
        }
    }
}
