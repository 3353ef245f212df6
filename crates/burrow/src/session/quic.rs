//! The session over one QUIC connection: the other implementation behind the
//! [session seam](super).
//!
//! Nothing of Burrow's multiplexer runs here; QUIC's own does the work:
//! - **Control**: the first bidirectional stream, opened by the agent, carries the handshake
//!   (the same key proof, bound to the QUIC connection's TLS exporter) and then Burrow control
//!   frames (Bind, BindResult, Unbind, Announce, GoAway), encoded as on any other transport.
//! - **Streams**: each tunnelled connection is one QUIC bidirectional stream. Its first bytes
//!   are the Open frame (service and client, and a connector's Dial, as the mux sends it);
//!   what follows is the
//!   connection's bytes, FIN for half-close and RESET_STREAM / STOP_SENDING with Burrow's
//!   reason code for a reset.
//! - **Datagrams**: each UDP datagram is one QUIC datagram (RFC 9221) holding the Datagram
//!   frame, header and payload, exactly as the mux writes it.
//! - **Flow control and liveness**: QUIC's stream and connection windows, stream limit, idle
//!   timeout and keep-alive, set from the session's parameters (see
//!   [`crate::transport::quic`]). Ending the session is a CONNECTION_CLOSE with Burrow's
//!   reason code and message.

use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use burrow_proto::connect::Dial;
use burrow_proto::frame::{Header, HEADER_LEN};
use burrow_proto::message::{Datagram, GoAway, Open, SessionParams};
use burrow_proto::mux::{ControlBudget, Side};
use burrow_proto::{Decoder, ErrorCode, Frame, Kind, StreamId};
use bytes::{Bytes, BytesMut};
use futures_util::FutureExt;
use quinn::VarInt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::{
    DatagramCounters, OpenError, RttObserver, SessionEnd, Started, StreamError, ACCEPT_BACKLOG,
    CONTROL_BACKLOG, DATAGRAMS_PER_SEC, DATAGRAM_BACKLOG,
};
use crate::transport::BoxIo;

/// Most bytes [`Stream::reserve`] grants at once. QUIC's flow control is inside quinn, so a
/// relay blocked on a full window holds at most this much read ahead of it per stream.
const RESERVE_CHUNK: usize = 256 * 1024;
/// Most chunks taken from quinn in one [`Stream::recv_many`] (one waited for, the rest only
/// if already there).
const RECV_CHUNKS: usize = 64;
/// How long the peer has to send a stream's Open frame once it opened the stream.
const OPEN_DEADLINE: Duration = Duration::from_secs(10);
/// Longest reason text put in a CONNECTION_CLOSE (it must fit in one packet).
const MAX_REASON: usize = 512;

/// State shared by a session's handles and tasks.
struct Inner {
    conn: quinn::Connection,
    /// The agent's endpoint (see [`Session::rebind`]).
    endpoint: Option<quinn::Endpoint>,
    params: SessionParams,
    name: String,
    /// Frames for the control stream's writer.
    control_out: mpsc::Sender<Frame>,
    end: Mutex<Option<SessionEnd>>,
    ended: CancellationToken,
    dgrams: DatagramCounters,
    /// Stream handles alive.
    streams: AtomicUsize,
    next_id: AtomicU32,
    rtt_observer: OnceLock<RttObserver>,
}

impl Inner {
    /// Ends the session once: records why and closes the connection with Burrow's code.
    fn end(&self, end: SessionEnd) {
        {
            let mut slot = self.end.lock().unwrap_or_else(|p| p.into_inner());
            if slot.is_some() {
                return;
            }
            if !end.by_peer && !end.lost {
                let mut reason = end.detail.clone();
                if reason.len() > MAX_REASON {
                    let mut cut = MAX_REASON;
                    while !reason.is_char_boundary(cut) {
                        cut -= 1;
                    }
                    reason.truncate(cut);
                }
                self.conn
                    .close(VarInt::from_u32(end.code as u32), reason.as_bytes());
            }
            *slot = Some(end);
        }
        self.ended.cancel();
    }

    fn protocol_error(&self, detail: impl Into<String>) {
        self.end(SessionEnd {
            code: ErrorCode::Protocol,
            detail: detail.into(),
            by_peer: false,
            lost: false,
        });
    }
}

/// Why the connection closed, as a [`SessionEnd`].
fn end_of(e: &quinn::ConnectionError, params: &SessionParams) -> SessionEnd {
    use quinn::ConnectionError::*;
    let lost = |code, detail: String| SessionEnd {
        code,
        detail,
        by_peer: false,
        lost: true,
    };
    match e {
        ApplicationClosed(c) => SessionEnd {
            code: ErrorCode::from_u32(u32::try_from(c.error_code.into_inner()).unwrap_or(14)),
            detail: String::from_utf8_lossy(&c.reason).into_owned(),
            by_peer: true,
            lost: false,
        },
        TimedOut => {
            let idle = Duration::from_millis(u64::from(params.heartbeat_ms))
                * params.heartbeat_misses.max(1);
            lost(
                ErrorCode::Timeout,
                format!(
                    "nothing heard from the other side for {idle:?} (QUIC idle timeout: \
                     heartbeat interval x misses)"
                ),
            )
        }
        LocallyClosed => SessionEnd {
            code: ErrorCode::Normal,
            detail: "closed".into(),
            by_peer: false,
            lost: false,
        },
        other => lost(ErrorCode::Internal, other.to_string()),
    }
}

/// A handle to a running QUIC session. Cheap to clone.
#[derive(Clone)]
pub struct Session {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuicSession")
            .field("peer", &self.inner.name)
            .field("remote", &self.inner.conn.remote_address())
            .finish()
    }
}

/// Starts the session on an authenticated QUIC connection whose control stream is `control`
/// (the handshake already ran on it; `leftover` holds bytes read past it). Raises the
/// connection's limits from the pre-authentication ones to `params`.
pub fn start(
    link: crate::transport::quic::Link,
    control: BoxIo,
    leftover: BytesMut,
    side: Side,
    params: SessionParams,
    name: String,
) -> Started {
    let conn = link.conn;
    crate::transport::quic::open_limits(&conn, &params);
    let (control_tx, control_rx) = mpsc::channel(CONTROL_BACKLOG);
    let (accept_tx, incoming) = mpsc::channel(ACCEPT_BACKLOG);
    let (ctl_in_tx, control_in) = mpsc::channel(CONTROL_BACKLOG);
    let (dgram_tx, datagrams) = mpsc::channel(DATAGRAM_BACKLOG);
    let inner = Arc::new(Inner {
        conn: conn.clone(),
        endpoint: link.endpoint,
        params,
        name,
        control_out: control_tx,
        end: Mutex::new(None),
        ended: CancellationToken::new(),
        dgrams: DatagramCounters::default(),
        streams: AtomicUsize::new(0),
        next_id: AtomicU32::new(match side {
            Side::Gateway => 2,
            Side::Client => 1,
        }),
        rtt_observer: OnceLock::new(),
    });
    let (rd, wr) = tokio::io::split(control);
    tokio::spawn(watch_end(inner.clone()));
    tokio::spawn(control_writer(inner.clone(), wr, control_rx));
    tokio::spawn(control_reader(inner.clone(), rd, leftover, ctl_in_tx));
    tokio::spawn(accept_streams(inner.clone(), accept_tx));
    tokio::spawn(read_datagrams(inner.clone(), dgram_tx));
    tokio::spawn(report_rtt(inner.clone()));
    Started {
        session: super::Session::Quic(Session { inner }),
        incoming,
        control: control_in,
        datagrams,
    }
}

async fn watch_end(inner: Arc<Inner>) {
    tokio::select! {
        e = inner.conn.closed() => {
            let end = end_of(&e, &inner.params);
            inner.end(end);
        }
        _ = inner.ended.cancelled() => {}
    }
}

async fn control_writer(
    inner: Arc<Inner>,
    mut wr: tokio::io::WriteHalf<BoxIo>,
    mut rx: mpsc::Receiver<Frame>,
) {
    let mut buf = BytesMut::new();
    loop {
        let frame = tokio::select! {
            f = rx.recv() => f,
            _ = inner.ended.cancelled() => None,
        };
        let Some(frame) = frame else { break };
        buf.clear();
        frame.encode(&mut buf);
        while let Ok(more) = rx.try_recv() {
            more.encode(&mut buf);
        }
        if let Err(e) = wr.write_all(&buf).await {
            debug!("QUIC control stream write failed: {e}");
            break;
        }
    }
}

async fn control_reader(
    inner: Arc<Inner>,
    mut rd: tokio::io::ReadHalf<BoxIo>,
    mut buf: BytesMut,
    tx: mpsc::Sender<Frame>,
) {
    let mut dec = Decoder::new(inner.params.max_payload);
    loop {
        let frame = match dec.decode(&mut buf) {
            Ok(Some(f)) => f,
            Ok(None) => {
                let read = tokio::select! {
                    r = rd.read_buf(&mut buf) => r,
                    _ = inner.ended.cancelled() => return,
                };
                match read {
                    Ok(0) | Err(_) => {
                        // The connection's own end says more; give it a moment to arrive.
                        let _ =
                            tokio::time::timeout(Duration::from_secs(1), inner.conn.closed()).await;
                        inner.protocol_error("the peer closed the QUIC control stream");
                        return;
                    }
                    Ok(_) => continue,
                }
            }
            Err(e) => {
                inner.end(SessionEnd {
                    code: e.code,
                    detail: e.detail,
                    by_peer: false,
                    lost: false,
                });
                return;
            }
        };
        match frame.header.kind {
            Kind::Bind | Kind::BindResult | Kind::Unbind | Kind::Announce => {
                if tx.try_send(frame).is_err() {
                    inner.end(SessionEnd {
                        code: ErrorCode::LimitExceeded,
                        detail: format!("more than {CONTROL_BACKLOG} control frames unread"),
                        by_peer: false,
                        lost: false,
                    });
                    return;
                }
            }
            Kind::GoAway => {
                let (code, detail) = match GoAway::decode(&frame.payload) {
                    Ok(ga) => (ga.code, ga.message),
                    Err(e) => (e.code, e.detail),
                };
                inner.end(SessionEnd {
                    code,
                    detail,
                    by_peer: true,
                    lost: false,
                });
                inner.conn.close(VarInt::from_u32(code as u32), b"");
                return;
            }
            other => {
                inner.protocol_error(format!("unexpected {other:?} on the QUIC control stream"));
                return;
            }
        }
    }
}

/// Takes the streams the peer opens: reads each one's Open frame (under [`OPEN_DEADLINE`],
/// at most [`ACCEPT_BACKLOG`] at once) and hands it to the role.
async fn accept_streams(inner: Arc<Inner>, tx: mpsc::Sender<super::Stream>) {
    let pending = Arc::new(Semaphore::new(ACCEPT_BACKLOG));
    loop {
        let (send, recv) = tokio::select! {
            r = inner.conn.accept_bi() => match r {
                Ok(pair) => pair,
                Err(_) => return,
            },
            _ = inner.ended.cancelled() => return,
        };
        let Ok(permit) = pending.clone().try_acquire_owned() else {
            refuse(send, recv, ErrorCode::LimitExceeded);
            continue;
        };
        let inner = inner.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let mut recv = recv;
            let read = tokio::time::timeout(OPEN_DEADLINE, read_open(&inner, &mut recv)).await;
            let (open, dial, first) = match read {
                Ok(Ok(x)) => x,
                Ok(Err(OpenReadError::Gone)) => return,
                Ok(Err(OpenReadError::Protocol(why))) => {
                    inner.protocol_error(why);
                    return;
                }
                Err(_) => {
                    refuse(send, recv, ErrorCode::Timeout);
                    return;
                }
            };
            let mut stream = Stream::accepted(&inner, send, recv, open, first);
            stream.dial = dial;
            if let Err(e) = tx.try_send(super::Stream::Quic(stream)) {
                let s = match e {
                    mpsc::error::TrySendError::Full(s) | mpsc::error::TrySendError::Closed(s) => s,
                };
                s.reset(ErrorCode::LimitExceeded);
            }
        });
    }
}

fn refuse(mut send: quinn::SendStream, mut recv: quinn::RecvStream, code: ErrorCode) {
    let _ = send.reset(VarInt::from_u32(code as u32));
    let _ = recv.stop(VarInt::from_u32(code as u32));
}

/// Why no Open frame came from a stream the peer opened.
enum OpenReadError {
    /// The peer reset the stream, or the connection ended, before its Open arrived: the
    /// opener gave up (its public client left at once, or its port was just closed). The
    /// stream is dropped; the session carries on (or ends on its own).
    Gone,
    /// The stream broke the protocol: it closes the session.
    Protocol(String),
}

/// Reads the Open frame at the start of a stream the peer opened; returns it, the
/// connector's Dial it carries if any, and the bytes read past it.
async fn read_open(
    inner: &Inner,
    recv: &mut quinn::RecvStream,
) -> Result<(Open, Option<Dial>, BytesMut), OpenReadError> {
    use OpenReadError::Protocol;
    let mut buf = BytesMut::new();
    let mut dec = Decoder::new(inner.params.max_payload);
    loop {
        match dec.decode(&mut buf) {
            Ok(Some(f)) if f.header.kind == Kind::Open => {
                let open = Open::decode(&f.payload).map_err(|e| Protocol(e.to_string()))?;
                let dial = Dial::from_open(&f.payload).map_err(|e| Protocol(e.to_string()))?;
                return Ok((open, dial, buf));
            }
            Ok(Some(f)) => {
                return Err(Protocol(format!(
                    "a QUIC stream began with {:?}, not Open",
                    f.header.kind
                )))
            }
            Ok(None) => {}
            Err(e) => return Err(Protocol(e.to_string())),
        }
        match recv.read_chunk(64 * 1024, true).await {
            Ok(Some(c)) => buf.extend_from_slice(&c.bytes),
            Ok(None) => return Err(Protocol("a QUIC stream ended before its Open frame".into())),
            Err(quinn::ReadError::Reset(_) | quinn::ReadError::ConnectionLost(_)) => {
                return Err(OpenReadError::Gone)
            }
            Err(e) => {
                return Err(Protocol(format!(
                    "a QUIC stream failed before its Open frame: {e}"
                )))
            }
        }
    }
}

async fn read_datagrams(inner: Arc<Inner>, tx: mpsc::Sender<Datagram>) {
    let mut budget = ControlBudget::new(DATAGRAMS_PER_SEC);
    loop {
        let raw = tokio::select! {
            r = inner.conn.read_datagram() => match r {
                Ok(b) => b,
                Err(_) => return,
            },
            _ = inner.ended.cancelled() => return,
        };
        if !budget.allow(std::time::Instant::now()) {
            inner.dgrams.dropped_in.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let d = match decode_datagram(&raw, inner.params.max_payload) {
            Ok(d) => d,
            Err(why) => {
                inner.protocol_error(why);
                return;
            }
        };
        match tx.try_send(d) {
            Ok(()) => {
                inner.dgrams.received.fetch_add(1, Ordering::Relaxed);
            }
            Err(mpsc::error::TrySendError::Full(_)) => {
                inner.dgrams.dropped_in.fetch_add(1, Ordering::Relaxed);
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                inner.protocol_error("a datagram, but this side carries no UDP");
                return;
            }
        }
    }
}

/// A QUIC datagram: one Datagram frame, header and payload.
fn decode_datagram(raw: &Bytes, max_payload: u32) -> Result<Datagram, String> {
    let head: &[u8; HEADER_LEN] = raw
        .get(..HEADER_LEN)
        .and_then(|h| h.try_into().ok())
        .ok_or("a QUIC datagram shorter than a frame header")?;
    let header = Header::decode(head, max_payload).map_err(|e| e.to_string())?;
    if header.kind != Kind::Datagram || header.length as usize != raw.len() - HEADER_LEN {
        return Err("a QUIC datagram that is not one Datagram frame".into());
    }
    let frame = Frame {
        header,
        payload: raw.slice(HEADER_LEN..),
    };
    Datagram::decode(&frame).map_err(|e| e.to_string())
}

async fn report_rtt(inner: Arc<Inner>) {
    let every = Duration::from_millis(u64::from(inner.params.heartbeat_ms.max(100)));
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = inner.ended.cancelled() => return,
        }
        if let Some(f) = inner.rtt_observer.get() {
            f(inner.conn.rtt());
        }
    }
}

impl Session {
    /// Opens a stream: the QUIC stream is opened and its Open frame written in the
    /// background, so the caller may send at once.
    pub fn open(&self, open: &Open) -> Result<Stream, OpenError> {
        self.open_with(open, None)
    }

    /// As [`Session::open`], for a connector's stream: the Open frame carries `dial`.
    pub fn open_dial(&self, open: &Open, dial: &Dial) -> Result<Stream, OpenError> {
        self.open_with(open, Some(dial))
    }

    fn open_with(&self, open: &Open, dial: Option<&Dial>) -> Result<Stream, OpenError> {
        let inner = &self.inner;
        if let Some(end) = self.end() {
            return Err(OpenError::Closed(end.to_string()));
        }
        // Check and count in one step: two opens at once must not both pass a check that only
        // one of them fits (the loser would wait for QUIC's stream credit instead of being
        // refused). The stream's drop gives the count back.
        let max = inner.params.max_streams as usize;
        if inner
            .streams
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .is_err()
        {
            return Err(OpenError::Limit(inner.params.max_streams));
        }
        let id = inner.next_id.fetch_add(2, Ordering::Relaxed);
        let (send_tx, send_rx) = oneshot::channel();
        let (recv_tx, recv_rx) = oneshot::channel();
        let mut head = BytesMut::new();
        match dial {
            Some(d) => d.open_frame(open, id),
            None => open.to_frame(id),
        }
        .encode(&mut head);
        let conn = inner.conn.clone();
        let ended = inner.ended.clone();
        tokio::spawn(async move {
            let opened = tokio::select! {
                r = conn.open_bi() => r,
                _ = ended.cancelled() => return,
            };
            let Ok((mut send, recv)) = opened else { return };
            if send.write_all(&head).await.is_err() {
                return;
            }
            let _ = send_tx.send(send);
            let _ = recv_tx.send(recv);
        });
        let mut stream = Stream::new(
            inner,
            id,
            open.clone(),
            Half::Waiting(send_rx),
            Half::Waiting(recv_rx),
            BytesMut::new(),
        );
        stream.dial = dial.cloned();
        Ok(stream)
    }

    /// Sends a datagram, unless it is too large for the path or the session is over (then it
    /// is dropped and counted). quinn drops the oldest queued datagrams past its send buffer.
    pub fn send_datagram(&self, d: &Datagram) -> bool {
        let mut buf = BytesMut::new();
        d.to_frame().encode(&mut buf);
        let ok = !self.is_closed() && self.inner.conn.send_datagram(buf.freeze()).is_ok();
        let counter = match ok {
            true => &self.inner.dgrams.sent,
            false => &self.inner.dgrams.dropped_out,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        ok
    }

    /// The session's datagram counts.
    pub fn datagram_counters(&self) -> &DatagramCounters {
        &self.inner.dgrams
    }

    /// Queues a control frame on the control stream; past [`CONTROL_BACKLOG`] unsent, the
    /// session is closed (the peer does not read).
    pub fn send_control(&self, frame: Frame) {
        if self.inner.control_out.try_send(frame).is_err() && !self.is_closed() {
            self.inner.end(SessionEnd {
                code: ErrorCode::LimitExceeded,
                detail: format!("more than {CONTROL_BACKLOG} control frames unsent"),
                by_peer: false,
                lost: false,
            });
        }
    }

    /// Ends the session with a CONNECTION_CLOSE carrying `code` and `detail`.
    pub fn close(&self, code: ErrorCode, detail: String) {
        self.inner.end(SessionEnd {
            code,
            detail,
            by_peer: false,
            lost: false,
        });
    }

    /// Waits until the session has ended and says why.
    pub async fn closed(&self) -> SessionEnd {
        self.inner.ended.cancelled().await;
        self.end().unwrap_or(SessionEnd {
            code: ErrorCode::Internal,
            detail: "ended without a reason".into(),
            by_peer: false,
            lost: false,
        })
    }

    /// Why the session ended, if it has.
    pub fn end(&self) -> Option<SessionEnd> {
        self.inner
            .end
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Whether the session has ended.
    pub fn is_closed(&self) -> bool {
        self.inner.ended.is_cancelled()
    }

    /// Stream handles alive.
    pub fn stream_count(&self) -> usize {
        self.inner.streams.load(Ordering::Relaxed)
    }

    /// Calls `f` with the connection's RTT once per heartbeat interval.
    pub fn on_rtt(&self, f: RttObserver) {
        let _ = self.inner.rtt_observer.set(f);
    }

    /// quinn's current RTT estimate.
    pub fn rtt(&self) -> Duration {
        self.inner.conn.rtt()
    }

    /// The session's parameters.
    pub fn params(&self) -> SessionParams {
        self.inner.params
    }

    /// The peer's name.
    pub fn peer_name(&self) -> &str {
        &self.inner.name
    }

    /// Moves the agent's side of the connection to `socket` (a new local address, as when the
    /// host changes networks): QUIC migrates the connection, and open streams carry on.
    /// An error at the gateway, whose endpoint serves every agent.
    pub fn rebind(&self, socket: std::net::UdpSocket) -> std::io::Result<()> {
        match &self.inner.endpoint {
            Some(e) => e.rebind(socket),
            None => Err(std::io::Error::other(
                "only the agent's side of a QUIC session can rebind",
            )),
        }
    }

    /// The agent endpoint's local address (`None` at the gateway).
    pub fn local_addr(&self) -> Option<std::net::SocketAddr> {
        self.inner.endpoint.as_ref()?.local_addr().ok()
    }

    /// The QUIC connection (for its statistics and address).
    pub fn connection(&self) -> &quinn::Connection {
        &self.inner.conn
    }
}

/// One direction of a stream: its quinn half once the stream is open.
enum Half<T> {
    Ready(T),
    Waiting(oneshot::Receiver<T>),
    Gone,
}

impl<T> Half<T> {
    /// The quinn half, waiting for the open to finish if need be.
    async fn get(&mut self) -> Result<&mut T, StreamError> {
        if let Half::Waiting(rx) = self {
            *self = match rx.await {
                Ok(t) => Half::Ready(t),
                Err(_) => Half::Gone,
            };
        }
        match self {
            Half::Ready(t) => Ok(t),
            _ => Err(StreamError::SessionClosed),
        }
    }
}

struct StreamInner {
    session: Arc<Inner>,
    send: tokio::sync::Mutex<Half<quinn::SendStream>>,
    recv: tokio::sync::Mutex<(Half<quinn::RecvStream>, BytesMut)>,
    flags: Mutex<Flags>,
}

#[derive(Default)]
struct Flags {
    finished: bool,
    recv_done: bool,
    reset: Option<ErrorCode>,
    /// The code the peer reset the stream with (RESET_STREAM or STOP_SENDING), once seen.
    peer_reset: Option<ErrorCode>,
}

/// One stream of a QUIC session: a QUIC bidirectional stream.
pub struct Stream {
    id: StreamId,
    open: Open,
    dial: Option<Dial>,
    inner: Arc<StreamInner>,
}

impl std::fmt::Debug for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuicStream")
            .field("id", &self.id)
            .field("open", &self.open)
            .finish()
    }
}

fn code_of(v: VarInt) -> ErrorCode {
    ErrorCode::from_u32(u32::try_from(v.into_inner()).unwrap_or(14))
}

fn write_error(e: quinn::WriteError) -> StreamError {
    match e {
        quinn::WriteError::Stopped(c) => StreamError::Reset(code_of(c)),
        quinn::WriteError::ClosedStream => StreamError::Finished,
        _ => StreamError::SessionClosed,
    }
}

fn read_error(e: quinn::ReadError) -> StreamError {
    match e {
        quinn::ReadError::Reset(c) => StreamError::Reset(code_of(c)),
        quinn::ReadError::ClosedStream => StreamError::Reset(ErrorCode::Internal),
        _ => StreamError::SessionClosed,
    }
}

impl Stream {
    fn new(
        session: &Arc<Inner>,
        id: StreamId,
        open: Open,
        send: Half<quinn::SendStream>,
        recv: Half<quinn::RecvStream>,
        first: BytesMut,
    ) -> Stream {
        Stream {
            id,
            open,
            dial: None,
            inner: Arc::new(StreamInner {
                session: session.clone(),
                send: tokio::sync::Mutex::new(send),
                recv: tokio::sync::Mutex::new((recv, first)),
                flags: Mutex::new(Flags::default()),
            }),
        }
    }

    fn accepted(
        session: &Arc<Inner>,
        send: quinn::SendStream,
        recv: quinn::RecvStream,
        open: Open,
        first: BytesMut,
    ) -> Stream {
        let id = u32::try_from(send.id().index()).unwrap_or(u32::MAX);
        // QUIC's own stream limit bounds what the peer opens; count it for the status and for
        // our own opens' check.
        session.streams.fetch_add(1, Ordering::AcqRel);
        Stream::new(
            session,
            id,
            open,
            Half::Ready(send),
            Half::Ready(recv),
            first,
        )
    }

    fn flags(&self) -> std::sync::MutexGuard<'_, Flags> {
        self.inner.flags.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn check(&self) -> Result<(), StreamError> {
        if let Some(code) = self.flags().reset {
            return Err(StreamError::Reset(code));
        }
        Ok(())
    }

    /// Notes a reset the peer sent, for [`Stream::reset_code`]; returns `e`.
    fn peer(&self, e: StreamError) -> StreamError {
        if let StreamError::Reset(code) = e {
            self.flags().peer_reset.get_or_insert(code);
        }
        e
    }

    /// The code the stream was reset with (here, or by the peer as far as reads and writes
    /// have seen), if it was.
    pub fn reset_code(&self) -> Option<ErrorCode> {
        let f = self.flags();
        f.reset.or(f.peer_reset)
    }

    /// The stream id (unique within the session).
    pub fn id(&self) -> StreamId {
        self.id
    }

    /// The Open that created it.
    pub fn info(&self) -> &Open {
        &self.open
    }

    /// The [`Dial`] its Open carried: what a connector asked for.
    pub fn dial(&self) -> Option<&Dial> {
        self.dial.as_ref()
    }

    /// The next chunk from the peer; `Ok(None)` at its FIN.
    pub async fn recv(&self) -> Result<Option<Bytes>, StreamError> {
        let mut v = Vec::new();
        Ok(match self.recv_many(&mut v, usize::MAX).await? {
            true => {
                let mut all = BytesMut::new();
                for c in v {
                    all.extend_from_slice(&c);
                }
                Some(all.freeze())
            }
            false => None,
        })
    }

    /// Waits for data, then moves what quinn already holds (up to 64 chunks, and `max` bytes
    /// past the first) into `out`. `Ok(false)` at the peer's FIN.
    pub async fn recv_many(
        &self,
        out: &mut impl Extend<Bytes>,
        max: usize,
    ) -> Result<bool, StreamError> {
        self.check()?;
        let mut guard = self.inner.recv.lock().await;
        let (half, first) = &mut *guard;
        if !first.is_empty() {
            out.extend(Some(first.split().freeze()));
            return Ok(true);
        }
        let recv = half.get().await?;
        match recv.read_chunk(usize::MAX, true).await {
            Ok(Some(c)) => {
                let mut taken = c.bytes.len();
                out.extend(Some(c.bytes));
                // Whatever else quinn already holds, without waiting (nothing is lost when
                // the poll finds nothing: read_chunk is cancel-safe).
                for _ in 1..RECV_CHUNKS {
                    if taken >= max {
                        break;
                    }
                    match recv.read_chunk(max - taken, true).now_or_never() {
                        Some(Ok(Some(c))) => {
                            taken += c.bytes.len();
                            out.extend(Some(c.bytes));
                        }
                        _ => break,
                    }
                }
                Ok(true)
            }
            Ok(None) => {
                self.flags().recv_done = true;
                Ok(false)
            }
            Err(e) => Err(self
                .check()
                .err()
                .unwrap_or_else(|| self.peer(read_error(e)))),
        }
    }

    /// Nothing to do: quinn returns credit as bytes are read.
    pub fn release(&self, _n: usize) {}

    /// Waits for the stream to be open and grants up to `max` bytes (at most
    /// 256 KiB); the window itself is waited for in [`Stream::send_reserved`].
    pub async fn reserve(&self, max: usize) -> Result<usize, StreamError> {
        self.check()?;
        if self.flags().finished {
            return Err(StreamError::Finished);
        }
        let mut guard = self.inner.send.lock().await;
        guard.get().await?;
        Ok(max.clamp(1, RESERVE_CHUNK))
    }

    /// Writes `data` to the QUIC stream, waiting for its windows.
    pub async fn send_reserved(&self, data: Bytes) -> Result<(), StreamError> {
        if data.is_empty() {
            return Ok(());
        }
        self.send(data).await
    }

    /// Writes `data` to the QUIC stream, waiting for its windows.
    pub async fn send(&self, data: Bytes) -> Result<(), StreamError> {
        self.check()?;
        if self.flags().finished {
            return Err(StreamError::Finished);
        }
        let mut guard = self.inner.send.lock().await;
        let send = guard.get().await?;
        match send.write_chunk(data).await {
            Ok(()) => Ok(()),
            Err(e) => Err(self
                .check()
                .err()
                .unwrap_or_else(|| self.peer(write_error(e)))),
        }
    }

    /// Sends FIN after what was written.
    pub fn finish(&self) {
        {
            let mut f = self.flags();
            if f.finished || f.reset.is_some() {
                return;
            }
            f.finished = true;
        }
        on_send_half(&self.inner, |s| {
            let _ = s.finish();
        });
    }

    /// Resets both directions with `code`.
    pub fn reset(&self, code: ErrorCode) {
        {
            let mut f = self.flags();
            if f.reset.is_some() {
                return;
            }
            f.reset = Some(code);
        }
        let v = VarInt::from_u32(code as u32);
        on_send_half(&self.inner, move |s| {
            let _ = s.reset(v);
        });
        let stopped = match self.inner.recv.try_lock() {
            Ok(mut g) => match &mut g.0 {
                Half::Ready(r) => {
                    let _ = r.stop(v);
                    true
                }
                Half::Gone => true,
                Half::Waiting(_) => false,
            },
            Err(_) => false,
        };
        if !stopped {
            let inner = self.inner.clone();
            {
                spawn(async move {
                    let mut g = inner.recv.lock().await;
                    if let Ok(r) = g.0.get().await {
                        let _ = r.stop(v);
                    }
                });
            }
        }
    }
}

/// Runs `f` on the stream's quinn send half: now if it is open and free, else once it is.
fn on_send_half(inner: &Arc<StreamInner>, f: impl FnOnce(&mut quinn::SendStream) + Send + 'static) {
    if let Ok(mut g) = inner.send.try_lock() {
        if let Half::Ready(s) = &mut *g {
            f(s);
            return;
        }
        if matches!(&*g, Half::Gone) {
            return;
        }
    }
    let inner = inner.clone();
    spawn(async move {
        let mut g = inner.send.lock().await;
        if let Ok(s) = g.get().await {
            f(s);
        }
    });
}

fn spawn(f: impl std::future::Future<Output = ()> + Send + 'static) {
    if let Ok(rt) = tokio::runtime::Handle::try_current() {
        rt.spawn(f);
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        let clean = {
            let f = self.flags();
            f.reset.is_none() && f.finished && f.recv_done
        };
        if !clean && self.flags().reset.is_none() {
            self.reset(ErrorCode::StreamReset);
        }
        self.inner.session.streams.fetch_sub(1, Ordering::AcqRel);
    }
}
