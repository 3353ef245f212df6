//! The session seam: one authenticated link between an agent and a gateway, whatever carries
//! it.
//!
//! Roles, relays and UDP flows see only [`Session`] (open a stream, send control frames and
//! datagrams, close with a code, wait for the end) and [`Stream`] (reserve and send, receive
//! and release, finish, reset). Two implementations stand behind them, chosen when the
//! session starts and never looked at again by the roles:
//!
//! - [`mux`]: Burrow's own multiplexer over one ordered byte stream (TCP, TLS, WebSocket):
//!   frames, per-stream and per-session credit, a writer serving streams round-robin.
//! - [`quic`]: a QUIC connection, where each stream is a QUIC stream and each datagram a QUIC
//!   datagram, with QUIC's own flow control.
//!
//! Static dispatch: both are enums over the two, so a call costs one match.

pub mod handshake;
pub mod mux;
pub mod quic;

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use burrow_proto::message::{Datagram, Open, SessionParams};
use burrow_proto::{ErrorCode, Frame, StreamId};
use bytes::{Bytes, BytesMut};
use tokio::sync::mpsc;

pub use mux::{
    control_queue_cap, ACCEPT_BACKLOG, CONTROL_BACKLOG, DATAGRAMS_PER_SEC, DATAGRAM_BACKLOG,
    DATAGRAM_QUEUE, MAX_QUEUED_CONTROL, SEND_BUFFER,
};

use crate::transport::BoxIo;

/// Counts of a session's datagrams, for logs and metrics.
#[derive(Debug, Default)]
pub struct DatagramCounters {
    /// Queued for sending.
    pub sent: AtomicU64,
    /// Dropped before sending: queue full, too large for a frame, or the session over.
    pub dropped_out: AtomicU64,
    /// Received and handed to the role.
    pub received: AtomicU64,
    /// Dropped on arrival: over the peer's budget, or the role not keeping up.
    pub dropped_in: AtomicU64,
}

/// What [`Session::on_rtt`] calls with each round-trip time.
pub type RttObserver = Box<dyn Fn(Duration) + Send + Sync>;

/// Why a session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionEnd {
    /// The reason code.
    pub code: ErrorCode,
    /// What happened, for logs.
    pub detail: String,
    /// Whether the peer ended it (its GoAway, or its connection closing).
    pub by_peer: bool,
    /// Whether the connection was lost rather than closed: it ended without a GoAway (the
    /// other process died, the network cut it) or went silent past the heartbeat.
    pub lost: bool,
}

impl std::fmt::Display for SessionEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.lost {
            return write!(f, "connection lost: {}", self.detail);
        }
        let who = if self.by_peer { "peer" } else { "local" };
        write!(f, "{} ({who}: {})", self.code, self.detail)
    }
}

/// Flow-control figures of one session end at one moment, for tests and diagnostics.
///
/// With nothing in flight (both ends idle), credit is conserved: what one end may still send
/// plus what it has charged but not written (`send_credit + unsent`) equals what the other
/// granted and has not yet received (`granted - received`); and each end's `held` equals
/// `received - consumed`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CreditSnapshot {
    /// Session credit left to send with.
    pub send_credit: u64,
    /// Bytes charged to that credit but not written yet: queued behind the writer, or
    /// reserved by a relay.
    pub unsent: u64,
    /// Cumulative bytes granted to the peer, the initial window included.
    pub granted: u64,
    /// Cumulative bytes received from the peer.
    pub received: u64,
    /// Cumulative bytes whose credit went back (read and released, or discarded).
    pub consumed: u64,
    /// Received bytes still held by streams: waiting to be read, or taken and not released.
    pub held: u64,
    /// Stream slots (open streams, and closed ones still flushing).
    pub slots: usize,
}

/// Why a stream could not be opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    /// The session has ended.
    #[error("session closed: {0}")]
    Closed(String),
    /// The session's stream limit is reached.
    #[error("stream limit of {0} reached")]
    Limit(u32),
}

/// Why a stream operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StreamError {
    /// The stream was reset, by the peer or locally.
    #[error("stream reset: {0}")]
    Reset(ErrorCode),
    /// The whole session ended.
    #[error("session closed")]
    SessionClosed,
    /// `send` after `finish`.
    #[error("stream already finished")]
    Finished,
}

/// What starting a session hands back besides the session.
pub struct Started {
    /// The session handle.
    pub session: Session,
    /// Streams the peer opens.
    pub incoming: mpsc::Receiver<Stream>,
    /// Bind, BindResult, Unbind and Announce frames from the peer.
    pub control: mpsc::Receiver<Frame>,
    /// Datagrams from the peer. Dropping this receiver says the role carries no UDP: a
    /// datagram then closes the session as a protocol error.
    pub datagrams: mpsc::Receiver<Datagram>,
}

/// Starts Burrow's multiplexed session over an authenticated byte stream ([`mux::start`]).
/// `leftover` holds bytes read past the handshake; they are the start of the frame stream.
pub fn start(
    io: BoxIo,
    leftover: BytesMut,
    side: burrow_proto::mux::Side,
    params: SessionParams,
    name: String,
) -> Started {
    mux::start(io, leftover, side, params, name)
}

/// A handle to a running session. Cheap to clone; the session lives until it ends, whether
/// or not handles remain.
#[derive(Clone, Debug)]
pub enum Session {
    /// Burrow's multiplexer over a byte stream.
    Mux(mux::Session),
    /// A QUIC connection.
    Quic(quic::Session),
}

/// Calls the same method on whichever implementation `$self` holds.
macro_rules! each {
    ($self:expr, $s:ident => $e:expr) => {
        match $self {
            Session::Mux($s) => $e,
            Session::Quic($s) => $e,
        }
    };
}

impl Session {
    /// Opens a stream to the peer. The open is queued at once, so the caller may send at once
    /// (the first bytes travel right behind it).
    pub fn open(&self, open: &Open) -> Result<Stream, OpenError> {
        match self {
            Session::Mux(s) => s.open(open).map(Stream::Mux),
            Session::Quic(s) => s.open(open).map(Stream::Quic),
        }
    }

    /// As [`Session::open`], for a connector's stream: the open carries `dial` (see
    /// [`burrow_proto::connect`]).
    pub fn open_dial(
        &self,
        open: &Open,
        dial: &burrow_proto::connect::Dial,
    ) -> Result<Stream, OpenError> {
        match self {
            Session::Mux(s) => s.open_dial(open, dial).map(Stream::Mux),
            Session::Quic(s) => s.open_dial(open, dial).map(Stream::Quic),
        }
    }

    /// Queues a datagram unless the datagram queue is full, it is too large, or the session is
    /// over: then it is dropped and counted, and `false` returned. Never waits.
    pub fn send_datagram(&self, d: &Datagram) -> bool {
        each!(self, s => s.send_datagram(d))
    }

    /// The session's datagram counts.
    pub fn datagram_counters(&self) -> &DatagramCounters {
        each!(self, s => s.datagram_counters())
    }

    /// Queues a session-level control frame (Bind, BindResult).
    pub fn send_control(&self, frame: Frame) {
        each!(self, s => s.send_control(frame))
    }

    /// Ends the session, telling the peer why.
    pub fn close(&self, code: ErrorCode, detail: impl Into<String>) {
        let detail = detail.into();
        each!(self, s => s.close(code, detail))
    }

    /// Waits until the session has ended and says why.
    pub async fn closed(&self) -> SessionEnd {
        each!(self, s => s.closed().await)
    }

    /// Why the session ended, if it has.
    pub fn end(&self) -> Option<SessionEnd> {
        each!(self, s => s.end())
    }

    /// Whether the session has ended.
    pub fn is_closed(&self) -> bool {
        each!(self, s => s.is_closed())
    }

    /// Streams currently open.
    pub fn stream_count(&self) -> usize {
        each!(self, s => s.stream_count())
    }

    /// Stream slots still held (open streams plus ones flushing their last bytes).
    pub fn slot_count(&self) -> usize {
        match self {
            Session::Mux(s) => s.slot_count(),
            Session::Quic(s) => s.stream_count(),
        }
    }

    /// The session's flow-control figures now (see [`CreditSnapshot`]).
    /// Over QUIC, whose windows quinn keeps, all zeros but `slots`.
    pub fn credit(&self) -> CreditSnapshot {
        match self {
            Session::Mux(s) => s.credit(),
            Session::Quic(s) => CreditSnapshot {
                slots: s.stream_count(),
                ..CreditSnapshot::default()
            },
        }
    }

    /// Calls `f` with each round-trip time measured from now on (one per heartbeat). Only
    /// the first observer set is kept.
    pub fn on_rtt(&self, f: RttObserver) {
        each!(self, s => s.on_rtt(f))
    }

    /// The latest measured round-trip time.
    pub fn rtt(&self) -> Duration {
        each!(self, s => s.rtt())
    }

    /// The session's parameters.
    pub fn params(&self) -> SessionParams {
        each!(self, s => s.params())
    }

    /// The peer's name (agent name on the gateway, gateway address on the agent).
    pub fn peer_name(&self) -> &str {
        each!(self, s => s.peer_name())
    }

    /// The QUIC session, when QUIC carries this one.
    pub fn as_quic(&self) -> Option<&quic::Session> {
        match self {
            Session::Quic(s) => Some(s),
            Session::Mux(_) => None,
        }
    }

    /// What carries the session: `"mux"` (Burrow's multiplexer over TCP, TLS or a WebSocket)
    /// or `"quic"`.
    pub fn carrier(&self) -> &'static str {
        match self {
            Session::Mux(_) => "mux",
            Session::Quic(_) => "quic",
        }
    }
}

/// One stream of a session. Dropping it before both directions finished resets it.
///
/// `recv` and `send` take `&self` so one task can run both directions concurrently
/// (`tokio::join!`); each direction must have a single caller at a time.
#[derive(Debug)]
pub enum Stream {
    /// A stream of Burrow's multiplexer.
    Mux(mux::Stream),
    /// A QUIC bidirectional stream.
    Quic(quic::Stream),
}

macro_rules! each_stream {
    ($self:expr, $s:ident => $e:expr) => {
        match $self {
            Stream::Mux($s) => $e,
            Stream::Quic($s) => $e,
        }
    };
}

impl Stream {
    /// The stream id (unique within its session).
    pub fn id(&self) -> StreamId {
        each_stream!(self, s => s.id())
    }

    /// The Open that created it: service id and client address.
    pub fn info(&self) -> &Open {
        each_stream!(self, s => s.info())
    }

    /// The [`burrow_proto::connect::Dial`] the stream's Open carried: what a connector asked
    /// for.
    pub fn dial(&self) -> Option<&burrow_proto::connect::Dial> {
        each_stream!(self, s => s.dial())
    }

    /// The code the stream was reset with (by the peer or here), if it was.
    pub fn reset_code(&self) -> Option<ErrorCode> {
        each_stream!(self, s => s.reset_code())
    }

    /// The next chunk from the peer; `Ok(None)` once the peer has finished sending.
    pub async fn recv(&self) -> Result<Option<Bytes>, StreamError> {
        each_stream!(self, s => s.recv().await)
    }

    /// Waits for data from the peer, then moves what is already received into `out`, up to
    /// `max` bytes (the first chunk always). `Ok(false)` once the peer has finished sending
    /// and everything was read. Give the bytes' credit back with [`Stream::release`] once
    /// they are written on.
    pub async fn recv_many(
        &self,
        out: &mut impl Extend<Bytes>,
        max: usize,
    ) -> Result<bool, StreamError> {
        each_stream!(self, s => s.recv_many(out, max).await)
    }

    /// Gives back the credit of `n` bytes taken by [`Stream::recv_many`].
    pub fn release(&self, n: usize) {
        each_stream!(self, s => s.release(n))
    }

    /// Waits until the stream may send, then reserves up to `max` bytes and returns how many:
    /// the caller reads at most that many from its source and hands them to
    /// [`Stream::send_reserved`].
    pub async fn reserve(&self, max: usize) -> Result<usize, StreamError> {
        each_stream!(self, s => s.reserve(max).await)
    }

    /// Sends `data`, which must fit in what [`Stream::reserve`] granted; an empty `data`
    /// cancels the reservation.
    pub async fn send_reserved(&self, data: Bytes) -> Result<(), StreamError> {
        each_stream!(self, s => s.send_reserved(data).await)
    }

    /// Sends `data`, waiting for flow-control credit as needed.
    pub async fn send(&self, data: Bytes) -> Result<(), StreamError> {
        each_stream!(self, s => s.send(data).await)
    }

    /// Half-closes our direction: the peer reads to the end of what was sent, then `None`.
    pub fn finish(&self) {
        each_stream!(self, s => s.finish())
    }

    /// Aborts the stream in both directions, telling the peer why.
    pub fn reset(&self, code: ErrorCode) {
        each_stream!(self, s => s.reset(code))
    }
}
