//! The driver task: owns the connection, reads and dispatches frames, writes queued frames,
//! sends heartbeats. The three loops run in one task under `select!`, so when any of them
//! ends the session ends.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use burrow_proto::frame::HEADER_LEN;
use burrow_proto::frame::{ACK, FIN};
use burrow_proto::message::{Datagram, GoAway, Open};
use burrow_proto::mux::{DataVerdict, OpenVerdict};
use burrow_proto::{ErrorCode, Frame, Header, Kind, ProtocolError, StreamId};
use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, trace};

use super::{Outbound, SessionEnd, Shared, Slot, State, Stream};
use crate::gather;
use crate::session::Stream as AnyStream;
use crate::transport::BoxIo;

/// How many bytes the writer gathers into one write.
const WRITE_BATCH: usize = 256 * 1024;
/// Payloads smaller than this are copied into the batch; larger ones are written by
/// reference.
const COPY_BELOW: usize = 16 * 1024;
/// A session with no session credit left, streams waiting to send, and no window update
/// from the peer for this many times the heartbeat's dead-peer time (`interval × misses`;
/// 60 s by default) is closed: see the watchdog in [`heartbeat_loop`].
pub(crate) const STALL_FACTOR: u32 = 2;
/// How long the writer may take to flush a final GoAway once the session is over.
const GOAWAY_FLUSH: Duration = Duration::from_secs(1);

/// Where inbound streams, control frames and datagrams go.
pub(super) struct Inbound {
    pub(super) accept: mpsc::Sender<AnyStream>,
    pub(super) control: mpsc::Sender<Frame>,
    pub(super) datagrams: mpsc::Sender<Datagram>,
}

pub(super) async fn run(
    shared: Arc<Shared>,
    mut rd: ReadHalf<BoxIo>,
    leftover: BytesMut,
    inbound: Inbound,
) {
    let mut writer = std::pin::pin!(write_loop(&shared));
    let mut writer_done = false;
    let mut reader_done = false;
    let end = {
        let reader = read_loop(&shared, &mut rd, leftover, &inbound);
        let heartbeat = heartbeat_loop(&shared);
        tokio::select! {
            end = reader => {
                reader_done = true;
                end
            }
            end = &mut writer => {
                writer_done = true;
                end
            }
            end = heartbeat => end,
            _ = shared.ended.cancelled() => None,
        }
    };
    if let Some(end) = end {
        debug!(peer = %shared.name, %end, "session ending");
        shared.end(end);
    }
    // Flush what is queued (at least the GoAway) without waiting on a dead peer for long. Keep
    // reading meanwhile: closing a socket with unread input makes the kernel send RST and
    // discard our unsent GoAway, so the peer would never learn why.
    let flush = async {
        if !writer_done {
            (&mut writer).await;
        }
    };
    let drain = async {
        if !reader_done {
            let mut scratch = vec![0u8; 16 * 1024];
            while matches!(rd.read(&mut scratch).await, Ok(n) if n > 0) {}
        }
    };
    let _ = tokio::time::timeout(GOAWAY_FLUSH, async { tokio::join!(flush, drain) }).await;
}

pub(super) fn io_end(e: &std::io::Error) -> SessionEnd {
    use std::io::ErrorKind::*;
    // In our words: the TLS library's own text for a missing close_notify ends in a URL.
    let detail = match e.kind() {
        UnexpectedEof => "the connection ended without a goodbye (the other side's process died, or something on the path closed it)".to_string(),
        ConnectionReset | ConnectionAborted | BrokenPipe => "the connection was reset (the other side's process died, or its host or something on the path dropped the connection)".to_string(),
        TimedOut => "the connection timed out (the other side's host is unreachable)".to_string(),
        _ => format!("the connection failed: {e}"),
    };
    SessionEnd {
        code: ErrorCode::Normal,
        detail,
        by_peer: true,
        lost: true,
    }
}

/// The connection closed cleanly but without a GoAway, which every orderly close sends.
fn peer_closed(detail: &str) -> SessionEnd {
    SessionEnd {
        code: ErrorCode::Normal,
        detail: detail.into(),
        by_peer: true,
        lost: true,
    }
}

fn protocol_end(e: ProtocolError) -> SessionEnd {
    SessionEnd {
        code: e.code,
        detail: e.detail,
        by_peer: false,
        lost: false,
    }
}

async fn read_loop(
    shared: &Shared,
    rd: &mut (impl AsyncRead + Unpin),
    leftover: BytesMut,
    inbound: &Inbound,
) -> Option<SessionEnd> {
    // Bytes read past the handshake come first.
    let mut rd = AsyncReadExt::chain(std::io::Cursor::new(leftover), rd);
    let max_payload = shared.params.max_payload;
    loop {
        // Read the header alone, then the payload straight into a buffer of exactly its size:
        // no payload is copied again, no buffer is shared between frames (so a stalled stream
        // pins only its own bytes), and an idle session holds no read buffer. The transport
        // below is buffered, so the two reads cost no extra system call.
        let mut raw = [0u8; HEADER_LEN];
        match read_full(&mut rd, &mut raw).await {
            Ok(true) => {}
            Ok(false) => {
                return Some(peer_closed(
                    "the connection closed without a goodbye (the other side's process died, or something on the path closed it)",
                ))
            }
            Err(e) => return Some(io_end(&e)),
        }
        let header = match Header::decode(&raw, max_payload) {
            Ok(h) => h,
            Err(e) => return Some(protocol_end(e)),
        };
        // The length was checked against the limit above, before this allocation.
        let mut payload = BytesMut::with_capacity(header.length as usize);
        while payload.len() < header.length as usize {
            match rd.read_buf(&mut payload).await {
                Ok(0) => {
                    return Some(peer_closed(
                        "the connection closed in the middle of a frame (the other side's process died, or something on the path closed it)",
                    ))
                }
                Ok(_) => {}
                Err(e) => return Some(io_end(&e)),
            }
        }
        shared.stamp_recv();
        let frame = Frame {
            header,
            payload: payload.freeze(),
        };
        if trace_enabled() {
            trace!(peer = %shared.name, kind = ?frame.header.kind, stream = frame.header.stream,
                   flags = frame.header.flags, len = frame.header.length, "frame in");
        }
        match handle(shared, frame, inbound) {
            Ok(None) => {}
            Ok(Some(end)) => return Some(end),
            Err(e) => return Some(protocol_end(e)),
        }
    }
}

/// An error once a control frame had to be refused because the queue was full (see
/// [`State::push_control`]); checked after every inbound frame that queues one.
fn check_queue(st: &State) -> Result<(), ProtocolError> {
    if st.control_overflow {
        Err(overflow(st))
    } else {
        Ok(())
    }
}

/// Why a session whose control queue overflowed is closed.
fn overflow(st: &State) -> ProtocolError {
    ProtocolError::new(
        ErrorCode::LimitExceeded,
        format!(
            "peer sends but does not read: {} control frames queued unsent (limit {})",
            st.control.len(),
            st.control_cap
        ),
    )
}

/// Fills `buf` completely. `Ok(false)` when the connection ended cleanly before the first
/// byte; an end part-way is an error.
async fn read_full(rd: &mut (impl AsyncRead + Unpin), buf: &mut [u8]) -> std::io::Result<bool> {
    let mut filled = 0;
    while filled < buf.len() {
        match rd.read(&mut buf[filled..]).await? {
            0 if filled == 0 => return Ok(false),
            0 => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "connection closed in the middle of a frame header",
                ))
            }
            n => filled += n,
        }
    }
    Ok(true)
}

fn trace_enabled() -> bool {
    tracing::enabled!(tracing::Level::TRACE)
}

/// Handles one inbound frame. `Ok(Some(end))` when the peer ended the session.
fn handle(
    shared: &Shared,
    frame: Frame,
    inbound: &Inbound,
) -> Result<Option<SessionEnd>, ProtocolError> {
    let now = Instant::now();
    let id = frame.header.stream;
    match frame.header.kind {
        Kind::Data => {
            let fin = frame.header.flags & FIN != 0;
            let mut st = shared.lock();
            match st
                .mux
                .on_data(id, frame.header.length, fin, now.into_std())?
            {
                DataVerdict::Deliver => {
                    if let Some(slot) = st.slots.get_mut(&id) {
                        if !frame.payload.is_empty() {
                            slot.recv.push_back(frame.payload);
                        }
                        if fin {
                            slot.recv_fin = true;
                        }
                        if let Some(w) = slot.recv_waker.take() {
                            w.wake();
                        }
                    }
                }
                DataVerdict::Discard(credit) => {
                    st.push_window(0, credit);
                    check_queue(&st)?;
                    drop(st);
                    shared.writer.notify_one();
                }
            }
        }
        Kind::Open => {
            let open = Open::decode(&frame.payload)?;
            let dial = burrow_proto::connect::Dial::from_open(&frame.payload)?;
            let mut st = shared.lock();
            match st.mux.on_open(id, now.into_std())? {
                OpenVerdict::Accept => {
                    st.slots.insert(id, Slot::default());
                }
                OpenVerdict::Refuse(code) => {
                    st.push_control(Frame::reset(id, code));
                    check_queue(&st)?;
                    drop(st);
                    shared.writer.notify_one();
                    return Ok(None);
                }
            }
            drop(st);
            let stream = AnyStream::Mux(Stream::new(id, shared_arc(shared), open).with_dial(dial));
            if let Err(e) = inbound.accept.try_send(stream) {
                // Nobody is taking streams fast enough (or at all): refuse this one.
                let stream = match e {
                    mpsc::error::TrySendError::Full(s) | mpsc::error::TrySendError::Closed(s) => s,
                };
                stream.reset(ErrorCode::LimitExceeded);
                drop(stream);
                check_queue(&shared.lock())?;
            }
        }
        Kind::Window => {
            let inc = frame.payload_u32()?;
            let mut st = shared.lock();
            // Streams can be waiting on session credit only when it had run low; waking them
            // all is O(streams), so do it only then.
            let was_low = st.mux.session_credit() < u64::from(shared.params.max_payload);
            st.mux.on_window(id, inc, now.into_std())?;
            if id != 0 {
                if let Some(w) = st.slots.get_mut(&id).and_then(|s| s.send_waker.take()) {
                    w.wake();
                }
            } else if was_low {
                st.session_credit_returned();
            } else {
                st.starved_since = None;
            }
        }
        Kind::Reset => {
            let code = ErrorCode::from_u32(frame.payload_u32()?);
            let mut st = shared.lock();
            if st.mux.contains(id) {
                // Nothing it received will be written out now, and nothing it queued will be
                // sent: both credits go back at once, before the stream leaves the table.
                st.discard_recv(id);
                st.drop_output(id);
            }
            if st.mux.on_reset(id, now.into_std())? {
                let mut detached = false;
                if let Some(slot) = st.slots.get_mut(&id) {
                    slot.reset = Some(code);
                    slot.wake_all();
                    detached = slot.detached;
                }
                if detached {
                    st.slots.remove(&id);
                }
                check_queue(&st)?;
                drop(st);
                shared.writer.notify_one();
            }
        }
        Kind::Ping => {
            let opaque = frame.payload_u64()?;
            let mut st = shared.lock();
            st.mux.on_control(now.into_std())?;
            if frame.header.flags & ACK != 0 {
                if let Some((sent_id, sent_at)) = st.ping_sent {
                    if sent_id == opaque {
                        st.rtt = now
                            .saturating_duration_since(sent_at)
                            .max(Duration::from_micros(10));
                        st.ping_sent = None;
                        if let Some(observe) = shared.rtt_observer.get() {
                            observe(st.rtt);
                        }
                    }
                }
            } else {
                if st.control.len() >= st.control_cap {
                    st.control_overflow = true;
                    return Err(overflow(&st));
                }
                st.control.push_front(Frame::ping(opaque, true));
                drop(st);
                shared.writer.notify_one();
            }
        }
        Kind::GoAway => {
            let ga = GoAway::decode(&frame.payload)?;
            return Ok(Some(SessionEnd {
                code: ga.code,
                detail: if ga.message.is_empty() {
                    ga.code.describe().to_string()
                } else {
                    ga.message
                },
                by_peer: true,
                lost: false,
            }));
        }
        Kind::Bind | Kind::BindResult | Kind::Unbind | Kind::Announce => {
            shared.lock().mux.on_control(now.into_std())?;
            if inbound.control.try_send(frame).is_err() {
                return Err(ProtocolError::new(
                    ErrorCode::LimitExceeded,
                    "too many bind messages waiting",
                ));
            }
        }
        Kind::Datagram => {
            let d = Datagram::decode(&frame)?;
            // UDP stays UDP: past the peer's budget, or when the role is behind, datagrams
            // are dropped and counted, never queued without bound.
            if !shared.lock().dgram_budget.allow(now.into_std()) {
                shared.dgrams.dropped_in.fetch_add(1, Ordering::Relaxed);
                return Ok(None);
            }
            match inbound.datagrams.try_send(d) {
                Ok(()) => {
                    shared.dgrams.received.fetch_add(1, Ordering::Relaxed);
                }
                Err(mpsc::error::TrySendError::Full(_)) => {
                    shared.dgrams.dropped_in.fetch_add(1, Ordering::Relaxed);
                }
                // Accepting them unchecked would let a peer send frames that cost us work
                // and no budget.
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    return Err(ProtocolError::new(
                        ErrorCode::Protocol,
                        "datagram frame, but this session carries no UDP flows",
                    ))
                }
            }
        }
        Kind::Challenge | Kind::Auth | Kind::AuthOk => {
            return Err(ProtocolError::new(
                ErrorCode::Protocol,
                format!("{:?} frame after the handshake", frame.header.kind),
            ));
        }
    }
    Ok(None)
}

/// The driver holds `&Shared` borrowed from an `Arc`; new stream handles need the `Arc`.
fn shared_arc(shared: &Shared) -> Arc<Shared> {
    shared
        .self_ref
        .upgrade()
        .expect("the driver runs only while the session's Arc is alive")
}

/// Frames gathered for one vectored write: headers and small payloads are packed into
/// `packed`, large payloads are passed by reference (no copy).
pub(super) struct Batch {
    packed: BytesMut,
    segs: VecDeque<Bytes>,
    len: usize,
}

impl Batch {
    pub(super) fn new() -> Self {
        Batch {
            packed: BytesMut::with_capacity(64 * 1024),
            segs: VecDeque::new(),
            len: 0,
        }
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn push(&mut self, header: &Header, payload: &Bytes) {
        header.encode(&mut self.packed);
        if payload.len() < COPY_BELOW {
            self.packed.extend_from_slice(payload);
        } else {
            self.seal();
            self.segs.push_back(payload.clone());
        }
        self.len += HEADER_LEN + payload.len();
    }

    /// Moves the packed bytes so far into the segment list.
    fn seal(&mut self) {
        if !self.packed.is_empty() {
            self.segs.push_back(self.packed.split().freeze());
        }
    }

    async fn write_to(&mut self, wr: &mut (impl AsyncWrite + Unpin)) -> std::io::Result<()> {
        self.seal();
        while !self.segs.is_empty() {
            let segs = &self.segs;
            let n = std::future::poll_fn(|cx| {
                gather::with_slices(segs, |slices| {
                    Pin::new(&mut *wr).poll_write_vectored(cx, slices)
                })
            })
            .await?;
            if n == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            gather::consume(&mut self.segs, n);
        }
        self.len = 0;
        self.packed.clear();
        Ok(())
    }
}

/// Writes everything queued, batch after batch, until nothing is left. Returns whether the
/// session has ended (and its last frames are out).
pub(super) async fn flush(shared: &Shared, out: &mut Outbound) -> std::io::Result<bool> {
    loop {
        let ended = fill_batch(shared, &mut out.batch);
        if out.batch.is_empty() {
            return Ok(ended);
        }
        out.batch.write_to(&mut out.wr).await?;
        out.wr.flush().await?;
    }
}

/// The writer task: flushes whenever woken, until the session has ended.
async fn write_loop(shared: &Shared) -> Option<SessionEnd> {
    loop {
        {
            let mut out = shared.out.lock().await;
            match flush(shared, &mut out).await {
                Err(e) => return Some(io_end(&e)),
                Ok(true) => {
                    let _ = out.wr.shutdown().await;
                    return None;
                }
                Ok(false) => {}
            }
        }
        shared.writer.notified().await;
    }
}

/// Moves queued frames into `batch`: all control frames, then data round-robin, one chunk
/// per stream per turn. Returns whether the session has ended.
fn fill_batch(shared: &Shared, batch: &mut Batch) -> bool {
    let mut guard = shared.lock();
    let st = &mut *guard;
    let push = |batch: &mut Batch, frame: &Frame| {
        trace_out(
            shared,
            &frame.header.kind,
            frame.header.stream,
            frame.payload.len(),
        );
        batch.push(&frame.header, &frame.payload);
    };
    while let Some(frame) = st.control.pop_front() {
        push(batch, &frame);
    }
    if st.end.is_some() {
        // After the end only the GoAway (and other control frames already queued) go out.
        return true;
    }
    // Datagrams and stream chunks in turn, one of each per round: a UDP flood cannot stall
    // the streams, nor the streams starve UDP.
    while batch.len < WRITE_BATCH {
        let dgram = st.dgram_out.pop_front();
        if let Some(frame) = &dgram {
            st.dgram_out_bytes -= frame.payload.len();
            push(batch, frame);
        }
        let Some(id) = st.ready.pop_front() else {
            if dgram.is_none() {
                break;
            }
            continue;
        };
        let Some(slot) = st.slots.get_mut(&id) else {
            continue;
        };
        slot.queued = false;
        write_chunk(id, slot, batch);
        if let Some(w) = slot.send_waker.take() {
            w.wake();
        }
        let drop_slot = slot.detached && !slot.has_output();
        if slot.has_output() {
            slot.queued = true;
            st.ready.push_back(id);
        } else if drop_slot {
            st.slots.remove(&id);
        }
    }
    false
}

fn write_chunk(id: StreamId, slot: &mut Slot, batch: &mut Batch) {
    let chunk = slot.out.pop_front();
    let fin = slot.out_fin && slot.out.is_empty() && !slot.fin_sent;
    let payload = chunk.unwrap_or_default();
    slot.out_bytes -= payload.len();
    if payload.is_empty() && !fin {
        return;
    }
    if fin {
        slot.fin_sent = true;
    }
    let header = Header {
        kind: Kind::Data,
        flags: if fin { FIN } else { 0 },
        stream: id,
        length: payload.len() as u32,
    };
    batch.push(&header, &payload);
}

fn trace_out(shared: &Shared, kind: &Kind, stream: StreamId, len: usize) {
    if trace_enabled() {
        trace!(peer = %shared.name, ?kind, stream, len, "frame out");
    }
}

async fn heartbeat_loop(shared: &Shared) -> Option<SessionEnd> {
    let interval = Duration::from_millis(u64::from(shared.params.heartbeat_ms));
    let dead_after = interval * shared.params.heartbeat_misses;
    let mut seq: u64 = 0;
    loop {
        {
            let mut st = shared.lock();
            let now = Instant::now();
            let silent = shared.silence(now);
            if silent > dead_after {
                return Some(SessionEnd {
                    code: ErrorCode::Timeout,
                    detail: format!(
                        "nothing heard from the other side for {silent:.1?} (heartbeat: a ping every {interval:?}, {} missed allowed)",
                        shared.params.heartbeat_misses
                    ),
                    by_peer: false,
                    lost: true,
                });
            }
            if st.control_overflow {
                return Some(protocol_end(overflow(&st)));
            }
            // A peer that answers pings but returns no session credit while our streams wait
            // for it is stuck (or leaking credit): nothing would ever move again, and pings
            // keep the session looking alive. Closing it lets the agent reconnect.
            let stall_limit = dead_after * STALL_FACTOR;
            if let Some(since) = st.starved_since {
                let stalled = now.saturating_duration_since(since);
                if stalled > stall_limit && st.mux.session_credit() == 0 {
                    return Some(SessionEnd {
                        code: ErrorCode::Timeout,
                        detail: format!(
                            "no flow-control credit from the peer for {stalled:.1?} while data waits to be sent"
                        ),
                        by_peer: false,
                        lost: false,
                    });
                }
            }
            seq += 1;
            st.control.push_front(Frame::ping(seq, false));
            st.ping_sent = Some((seq, now));
        }
        shared.writer.notify_one();
        tokio::time::sleep(interval).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn read_full_tells_a_clean_end_from_a_cut_header() {
        // Bytes arriving in pieces are gathered.
        let (mut tx, mut rx) = tokio::io::duplex(64);
        tx.write_all(b"0123").await.unwrap();
        let feeding = tokio::spawn(async move {
            tokio::task::yield_now().await;
            tx.write_all(b"456789ab").await.unwrap();
            tx
        });
        let mut header = [0u8; HEADER_LEN];
        assert!(read_full(&mut rx, &mut header).await.unwrap());
        assert_eq!(&header, b"0123456789");
        // Two bytes left over, then the end: cut inside a header.
        drop(feeding.await.unwrap());
        let err = read_full(&mut rx, &mut header).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof);
        // An end on a frame boundary is clean.
        let mut nothing: &[u8] = &[];
        assert!(!read_full(&mut nothing, &mut header).await.unwrap());
    }
}
