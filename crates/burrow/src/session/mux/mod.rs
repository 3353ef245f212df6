//! Burrow's own multiplexed session over one ordered byte stream (TCP, TLS, WebSocket): one
//! implementation behind the [session seam](super).
//!
//! [`start`] spawns one driver task that owns the connection: it decodes inbound frames into
//! per-stream buffers, and writes outbound frames, taking control frames first and then one
//! chunk per stream in turn (round-robin), so a bulk stream never starves an interactive one.
//! Streams are cheap handles ([`Stream`]) over shared state; they wait for flow-control
//! credit and data through wakers registered in that state. All rules about what the peer may
//! do live in [`burrow_proto::mux::Mux`]; this module only moves bytes and wakes tasks.
//!
//! Memory per stream is bounded: inbound, by the stream's receive window (the peer may not
//! send more); outbound, by [`SEND_BUFFER`] bytes queued ahead of the writer.

mod driver;
mod stream;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::Waker;
use std::time::Duration;

use burrow_proto::message::{GoAway, Open, SessionParams};
use burrow_proto::mux::{Mux, Side};
use burrow_proto::{ErrorCode, Frame, StreamId};
use bytes::{Bytes, BytesMut};
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub use stream::Stream;

use super::{CreditSnapshot, DatagramCounters, OpenError, RttObserver, SessionEnd};

use crate::transport::BoxIo;

/// Bytes a stream may queue ahead of the writer before `send` waits.
pub const SEND_BUFFER: usize = 256 * 1024;
/// Incoming streams waiting to be accepted before new ones are refused.
pub const ACCEPT_BACKLOG: usize = 1024;
/// Session control frames (bind requests and results) waiting for the role to read them.
pub const CONTROL_BACKLOG: usize = 512;
/// Control frames we may have queued unsent (pongs, window updates, opens, resets) before a
/// peer that sends but does not read is cut off with `LimitExceeded`: without it, a ping or
/// open flood from a peer that never reads would grow our memory without bound. The cap is
/// this or twice the session's stream limit, whichever is larger, so that opening every
/// stream the session allows at once (one Open each, then perhaps one Reset) always fits.
pub const MAX_QUEUED_CONTROL: usize = 8192;

/// Bytes of datagrams we may have queued unsent; past it, new ones are dropped (UDP stays UDP:
/// never buffered without bound, never blocking the session).
pub const DATAGRAM_QUEUE: usize = 1 << 20;
/// Datagrams received and not yet taken by the role before new ones are dropped.
pub const DATAGRAM_BACKLOG: usize = 1024;
/// Datagrams a peer may send per second (burst twice that) before the excess is dropped.
pub const DATAGRAMS_PER_SEC: u32 = 100_000;

/// The control-queue cap of a session with these parameters (see [`MAX_QUEUED_CONTROL`]).
pub fn control_queue_cap(params: &SessionParams) -> usize {
    MAX_QUEUED_CONTROL.max(2 * params.max_streams as usize)
}

/// Per-stream state shared between the driver and the stream's handle.
#[derive(Debug, Default)]
pub(crate) struct Slot {
    /// Inbound chunks not yet read.
    recv: VecDeque<Bytes>,
    /// The peer sent FIN (after the chunks in `recv`).
    recv_fin: bool,
    /// The stream was reset (by the peer or by us).
    reset: Option<ErrorCode>,
    recv_waker: Option<Waker>,
    send_waker: Option<Waker>,
    /// Bytes handed to the reader by [`Stream::recv_many`] whose credit it has not yet given
    /// back with [`Stream::release`].
    taken: u64,
    /// Outbound chunks waiting for the writer.
    out: VecDeque<Bytes>,
    out_bytes: usize,
    /// Send credit charged by [`Stream::reserve`] and not yet used by
    /// [`Stream::send_reserved`].
    reserved: usize,
    /// FIN requested; sent after `out` drains.
    out_fin: bool,
    fin_sent: bool,
    /// In the writer's ready queue.
    queued: bool,
    /// The handle is gone; the slot lives on only to flush `out` and the FIN.
    detached: bool,
}

impl Slot {
    fn wake_all(&mut self) {
        if let Some(w) = self.recv_waker.take() {
            w.wake();
        }
        if let Some(w) = self.send_waker.take() {
            w.wake();
        }
    }

    fn has_output(&self) -> bool {
        !self.out.is_empty() || (self.out_fin && !self.fin_sent)
    }
}

/// State behind the session's lock.
#[derive(Debug)]
pub(crate) struct State {
    mux: Mux,
    slots: HashMap<StreamId, Slot>,
    /// Control frames, written before any data.
    control: VecDeque<Frame>,
    /// Streams with output, in turn order.
    ready: VecDeque<StreamId>,
    /// Set once the session is over.
    end: Option<SessionEnd>,
    rtt: Duration,
    ping_sent: Option<(u64, Instant)>,
    /// Since when a stream has been waiting for session credit (none left) without a session
    /// window update arriving: the watchdog closes a session stuck like this for too long.
    starved_since: Option<Instant>,
    /// A control frame was refused because [`control_queue_cap`] were already queued: the
    /// peer does not read what we send. The driver ends the session when it sees this.
    control_overflow: bool,
    /// See [`control_queue_cap`].
    control_cap: usize,
    /// Datagram frames waiting for the writer, taken in turn with stream chunks.
    dgram_out: VecDeque<Frame>,
    dgram_out_bytes: usize,
    /// The peer's datagram budget ([`DATAGRAMS_PER_SEC`]).
    dgram_budget: burrow_proto::mux::ControlBudget,
}

impl State {
    /// Queues a control frame behind the others, unless the cap ([`control_queue_cap`]) is
    /// reached: then the frame is dropped and the session marked for closing (it cannot go on
    /// correctly without the frame, and a peer that reads nothing must not grow our memory).
    fn push_control(&mut self, frame: Frame) {
        if self.control.len() >= self.control_cap {
            self.control_overflow = true;
        } else {
            self.control.push_back(frame);
        }
    }

    fn push_window(&mut self, stream: StreamId, inc: Option<u32>) {
        if let Some(inc) = inc {
            self.push_control(Frame::window(stream, inc));
        }
    }

    /// Throws away what `id` received but nobody will write out (queued chunks, and chunks
    /// the reader took but did not release), returning their session credit: bytes discarded
    /// without this would shrink the session window for good.
    fn discard_recv(&mut self, id: StreamId) {
        let Some(slot) = self.slots.get_mut(&id) else {
            return;
        };
        let n = slot.recv.iter().map(|c| c.len() as u64).sum::<u64>() + slot.taken;
        slot.recv.clear();
        slot.taken = 0;
        if n > 0 {
            let now = Instant::now().into_std();
            let (_, session) = self.mux.on_consumed(id, n, now, self.rtt);
            self.push_window(0, session);
        }
    }

    /// Drops what `id` queued or reserved to send and gives its credit back: the peer will
    /// never see these bytes, so it would never return their credit either.
    fn drop_output(&mut self, id: StreamId) {
        let Some(slot) = self.slots.get_mut(&id) else {
            return;
        };
        let n = slot.out_bytes + slot.reserved;
        slot.out.clear();
        slot.out_bytes = 0;
        slot.reserved = 0;
        if n > 0 {
            let was_low = self.mux.session_credit() == 0;
            self.mux.unsend(id, n as u64);
            if was_low {
                self.session_credit_returned();
            }
        }
    }

    /// Session credit came back (a window update, a refund): wake every stream waiting for it
    /// and stop the stall watchdog. O(streams), so callers do it only when credit had run out
    /// or low.
    fn session_credit_returned(&mut self) {
        self.starved_since = None;
        for slot in self.slots.values_mut() {
            if let Some(w) = slot.send_waker.take() {
                w.wake();
            }
        }
    }

    /// A stream waits for credit; notes when the session itself ran out, for the watchdog.
    fn note_send_wait(&mut self) {
        if self.mux.session_credit() == 0 && self.starved_since.is_none() {
            self.starved_since = Some(Instant::now());
        }
    }

    fn enqueue(&mut self, id: StreamId) {
        if let Some(slot) = self.slots.get_mut(&id) {
            if !slot.queued && slot.has_output() {
                slot.queued = true;
                self.ready.push_back(id);
            }
        }
    }
}

/// The connection's write side, shared so that whichever task finds it free writes: the
/// writer task when woken, or a sending stream directly (saving a task hop per send).
pub(crate) struct Outbound {
    wr: tokio::io::WriteHalf<BoxIo>,
    batch: driver::Batch,
}

pub(crate) struct Shared {
    /// When the last whole frame arrived, in microseconds since `epoch`. An atomic, not a
    /// field behind the lock, because the reader stamps it once per frame.
    last_recv_us: AtomicU64,
    epoch: Instant,
    state: Mutex<State>,
    out: tokio::sync::Mutex<Outbound>,
    writer: Notify,
    ended: CancellationToken,
    params: SessionParams,
    /// Datagram counts.
    dgrams: DatagramCounters,
    /// Called with each RTT measured (for metrics).
    rtt_observer: std::sync::OnceLock<RttObserver>,
    name: String,
    /// Lets the driver, which borrows `Shared`, hand out new stream handles.
    self_ref: Weak<Shared>,
}

impl Shared {
    /// Records that a frame arrived now.
    fn stamp_recv(&self) {
        let us = Instant::now()
            .saturating_duration_since(self.epoch)
            .as_micros();
        self.last_recv_us
            .store(u64::try_from(us).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// How long since the last frame arrived.
    fn silence(&self, now: Instant) -> Duration {
        let last = self.epoch + Duration::from_micros(self.last_recv_us.load(Ordering::Relaxed));
        now.saturating_duration_since(last)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock is a bug; keep serving the other sessions rather than
        // poisoning every later call.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes queued frames now if nobody else is writing; otherwise leaves them to the
    /// writer (woken, in case the one writing has already taken its last batch).
    async fn flush_now(&self) {
        match self.out.try_lock() {
            Ok(mut out) => {
                if let Err(e) = driver::flush(self, &mut out).await {
                    drop(out);
                    self.end(driver::io_end(&e));
                }
            }
            Err(_) => self.writer.notify_one(),
        }
    }

    /// Ends the session once: records why, queues a GoAway when we are the one ending it,
    /// wakes every stream and the writer.
    fn end(&self, end: SessionEnd) {
        let mut st = self.lock();
        if st.end.is_some() {
            return;
        }
        // Whatever was queued (pongs, window updates) is moot now: the GoAway goes first.
        st.control.clear();
        st.ready.clear();
        if !end.by_peer {
            st.control.push_back(
                GoAway {
                    code: end.code,
                    message: end.detail.clone(),
                }
                .to_frame(),
            );
        }
        st.end = Some(end);
        for slot in st.slots.values_mut() {
            slot.wake_all();
        }
        drop(st);
        self.writer.notify_one();
        self.ended.cancel();
    }
}

/// A handle to a running session. Cheap to clone; the session lives until it ends, whether
/// or not handles remain.
#[derive(Clone)]
pub struct Session {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("peer", &self.shared.name)
            .finish()
    }
}

/// Starts the driver task for an authenticated connection. `leftover` holds bytes read past
/// the handshake; they are the start of the frame stream.
pub fn start(
    io: BoxIo,
    leftover: BytesMut,
    side: Side,
    params: SessionParams,
    name: String,
) -> super::Started {
    let (rd, wr) = tokio::io::split(io);
    let (accept_tx, incoming) = mpsc::channel(ACCEPT_BACKLOG);
    let (control_tx, control) = mpsc::channel(CONTROL_BACKLOG);
    let (dgram_tx, datagrams) = mpsc::channel(DATAGRAM_BACKLOG);
    let shared = Arc::new_cyclic(|self_ref| Shared {
        state: Mutex::new(State {
            mux: Mux::new(side, params),
            slots: HashMap::new(),
            control: VecDeque::new(),
            ready: VecDeque::new(),
            end: None,
            rtt: Duration::from_millis(1),
            ping_sent: None,
            starved_since: None,
            control_overflow: false,
            control_cap: control_queue_cap(&params),
            dgram_out: VecDeque::new(),
            dgram_out_bytes: 0,
            dgram_budget: burrow_proto::mux::ControlBudget::new(DATAGRAMS_PER_SEC),
        }),
        out: tokio::sync::Mutex::new(Outbound {
            wr,
            batch: driver::Batch::new(),
        }),
        writer: Notify::new(),
        last_recv_us: AtomicU64::new(0),
        epoch: Instant::now(),
        ended: CancellationToken::new(),
        params,
        dgrams: DatagramCounters::default(),
        rtt_observer: std::sync::OnceLock::new(),
        name,
        self_ref: self_ref.clone(),
    });
    let inbound = driver::Inbound {
        accept: accept_tx,
        control: control_tx,
        datagrams: dgram_tx,
    };
    tokio::spawn(driver::run(shared.clone(), rd, leftover, inbound));
    super::Started {
        session: super::Session::Mux(Session { shared }),
        incoming,
        control,
        datagrams,
    }
}

impl Session {
    /// Opens a stream to the peer. The Open frame is queued ahead of any data, so the caller
    /// may send at once (the first bytes travel right behind the Open).
    pub fn open(&self, open: &Open) -> Result<Stream, OpenError> {
        self.open_with(open, None)
    }

    /// As [`Session::open`], for a connector's stream: the Open carries `dial` (see
    /// [`burrow_proto::connect`]).
    pub fn open_dial(
        &self,
        open: &Open,
        dial: &burrow_proto::connect::Dial,
    ) -> Result<Stream, OpenError> {
        self.open_with(open, Some(dial))
    }

    fn open_with(
        &self,
        open: &Open,
        dial: Option<&burrow_proto::connect::Dial>,
    ) -> Result<Stream, OpenError> {
        let mut st = self.shared.lock();
        if let Some(end) = &st.end {
            return Err(OpenError::Closed(end.to_string()));
        }
        let id = st
            .mux
            .open_local()
            .map_err(|_| OpenError::Limit(self.shared.params.max_streams))?;
        st.slots.insert(id, Slot::default());
        st.push_control(match dial {
            Some(d) => d.open_frame(open, id),
            None => open.to_frame(id),
        });
        drop(st);
        self.shared.writer.notify_one();
        Ok(Stream::new(id, self.shared.clone(), open.clone()).with_dial(dial.cloned()))
    }

    /// Queues a datagram, unless [`DATAGRAM_QUEUE`] bytes are already waiting, the frame
    /// would exceed the session's frame limit, or the session is over: then it is dropped
    /// and counted, and `false` returned. Never waits.
    pub fn send_datagram(&self, d: &burrow_proto::message::Datagram) -> bool {
        let frame = d.to_frame();
        let len = frame.payload.len();
        let mut st = self.shared.lock();
        let fits = len <= self.shared.params.max_payload as usize
            && st.dgram_out_bytes + len <= DATAGRAM_QUEUE;
        if st.end.is_some() || !fits {
            drop(st);
            self.shared
                .dgrams
                .dropped_out
                .fetch_add(1, Ordering::Relaxed);
            return false;
        }
        st.dgram_out_bytes += len;
        st.dgram_out.push_back(frame);
        drop(st);
        self.shared.dgrams.sent.fetch_add(1, Ordering::Relaxed);
        self.shared.writer.notify_one();
        true
    }

    /// The session's datagram counts.
    pub fn datagram_counters(&self) -> &DatagramCounters {
        &self.shared.dgrams
    }

    /// Queues a session-level control frame (Bind, BindResult).
    pub fn send_control(&self, frame: Frame) {
        let mut st = self.shared.lock();
        if st.end.is_none() {
            st.push_control(frame);
        }
        drop(st);
        self.shared.writer.notify_one();
    }

    /// Ends the session, telling the peer why.
    pub fn close(&self, code: ErrorCode, detail: impl Into<String>) {
        self.shared.end(SessionEnd {
            code,
            detail: detail.into(),
            by_peer: false,
            lost: false,
        });
    }

    /// Waits until the session has ended and says why.
    pub async fn closed(&self) -> SessionEnd {
        self.shared.ended.cancelled().await;
        self.end().unwrap_or(SessionEnd {
            code: ErrorCode::Internal,
            detail: "ended without a reason".into(),
            by_peer: false,
            lost: false,
        })
    }

    /// Why the session ended, if it has.
    pub fn end(&self) -> Option<SessionEnd> {
        self.shared.lock().end.clone()
    }

    /// Whether the session has ended.
    pub fn is_closed(&self) -> bool {
        self.shared.ended.is_cancelled()
    }

    /// Streams currently open.
    pub fn stream_count(&self) -> usize {
        self.shared.lock().mux.stream_count()
    }

    /// Stream slots still held (open streams plus ones flushing their last bytes).
    pub fn slot_count(&self) -> usize {
        self.shared.lock().slots.len()
    }

    /// The session's flow-control figures now (see [`CreditSnapshot`]).
    pub fn credit(&self) -> CreditSnapshot {
        let st = self.shared.lock();
        let recv = st.mux.session_recv();
        let (mut unsent, mut held) = (0u64, 0u64);
        for slot in st.slots.values() {
            unsent += (slot.out_bytes + slot.reserved) as u64;
            held += slot.recv.iter().map(|c| c.len() as u64).sum::<u64>() + slot.taken;
        }
        CreditSnapshot {
            send_credit: st.mux.session_credit(),
            unsent,
            granted: recv.limit(),
            received: recv.received(),
            consumed: recv.consumed(),
            held,
            slots: st.slots.len(),
        }
    }

    /// Calls `f` with each round-trip time measured from now on (one per heartbeat). Only
    /// the first observer set is kept.
    pub fn on_rtt(&self, f: RttObserver) {
        let _ = self.shared.rtt_observer.set(f);
    }

    /// The latest measured round-trip time.
    pub fn rtt(&self) -> Duration {
        self.shared.lock().rtt
    }

    /// The session's parameters.
    pub fn params(&self) -> SessionParams {
        self.shared.params
    }

    /// The peer's name (agent name on the gateway, gateway address on the agent).
    pub fn peer_name(&self) -> &str {
        &self.shared.name
    }
}
