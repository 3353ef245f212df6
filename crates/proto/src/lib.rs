//! Burrow's wire protocol, without I/O.
//!
//! Nothing here touches a socket, a clock or a runtime: functions that depend on time take
//! `now` as an argument. The session driver in the `burrow` crate owns the I/O and feeds this
//! crate bytes and events.
//!
//! # Layout
//! - [`frame`]: the frame header, frame kinds and the incremental decoder.
//! - [`message`]: payloads of control frames (handshake, bind, open, go-away).
//! - [`connect`]: what the connector role adds: the [`connect::Dial`] a connector's Open
//!   carries, and an agent's [`connect::Announce`] of a private service.
//! - [`auth`]: keys, key hashes and the signed challenge-response.
//! - [`flow`]: send and receive windows.
//! - [`mux`]: the stream table and the rules a peer must follow.
//! - [`error`]: reason codes and the protocol error.
//!
//! # A session on the wire
//! 1. Both sides send an 8-byte preamble (`BURROW` + version); the gateway adds a
//!    [`message::Challenge`] with a fresh nonce.
//! 2. The client answers with [`message::Auth`]: its key hash and a signature over the nonce and
//!    the TLS exporter value. The gateway answers [`message::AuthOk`] or a GoAway.
//! 3. An agent sends one [`message::Bind`] per service; the gateway answers each with a
//!    [`message::BindResult`].
//! 4. For each client, the gateway sends Open (service id, client address) on a new odd
//!    stream id and may send Data right behind it; the agent connects to the target and relays,
//!    or resets the stream with a reason.
//! 5. A connector opens streams itself (even ids), each Open followed by a
//!    [`connect::Dial`] naming an agent and one of its private services or a target; the
//!    gateway checks it, opens a stream of its own to that agent with the same Dial, and
//!    relays one stream into the other.

pub mod auth;
pub mod connect;
pub mod error;
pub mod flow;
pub mod frame;
pub mod message;
pub mod mux;

pub use error::{ErrorCode, ProtocolError};
pub use frame::{Decoder, Frame, Header, Kind, StreamId};
