//! The multiplexer's state: which streams exist, what each may send and must accept.
//!
//! `Mux` holds no buffers and does no I/O: the session driver feeds it every frame header it
//! receives and every byte count it sends or consumes, and it answers what is allowed, what
//! credit to return, and which peer behaviour is a violation. Keeping the rules here means
//! they are tested without sockets.
//!
//! Stream ids: the gateway opens odd ids, the client (agent or connector) even ids, each side
//! in increasing order. So every id tells who opened it, and an id at or below the highest
//! one seen that is no longer in the table is a stream that has closed: late frames for it
//! are dropped, while frames for ids never opened are a protocol error.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::error::{ErrorCode, ProtocolError};
use crate::flow::{RecvWindow, SendWindow};
use crate::frame::StreamId;
use crate::message::SessionParams;

/// Which end of the session this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The gateway: opens odd stream ids.
    Gateway,
    /// An agent or connector: opens even stream ids.
    Client,
}

impl Side {
    fn first_id(self) -> StreamId {
        match self {
            Side::Gateway => 1,
            Side::Client => 2,
        }
    }

    fn owns(self, id: StreamId) -> bool {
        (id % 2 == 1) == (self == Side::Gateway)
    }
}

/// The state of one stream.
#[derive(Debug)]
struct StreamState {
    send: SendWindow,
    recv: RecvWindow,
    /// We sent FIN.
    local_fin: bool,
    /// The peer sent FIN.
    remote_fin: bool,
}

/// What to do with an incoming Open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenVerdict {
    /// Accepted: serve it.
    Accept,
    /// Over our stream limit: reset it with this code; the session goes on.
    Refuse(ErrorCode),
}

/// What to do with incoming Data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataVerdict {
    /// Hand the bytes to the stream.
    Deliver,
    /// The stream has closed; drop the bytes (their session credit is already returned via
    /// the included increment, if any).
    Discard(Option<u32>),
}

/// Multiplexer state for one session.
#[derive(Debug)]
pub struct Mux {
    side: Side,
    params: SessionParams,
    streams: HashMap<StreamId, StreamState>,
    next_local: StreamId,
    highest_remote: StreamId,
    session_send: SendWindow,
    session_recv: RecvWindow,
    control: ControlBudget,
}

impl Mux {
    /// State for a fresh session on `side` with the agreed parameters.
    pub fn new(side: Side, params: SessionParams) -> Self {
        Mux {
            side,
            params,
            streams: HashMap::new(),
            next_local: side.first_id(),
            highest_remote: 0,
            session_send: SendWindow::new(params.session_window),
            session_recv: RecvWindow::new(params.session_window, params.session_window),
            control: ControlBudget::new(CONTROL_FRAMES_PER_SEC),
        }
    }

    /// The session's parameters.
    pub fn params(&self) -> &SessionParams {
        &self.params
    }

    /// Number of open streams.
    pub fn stream_count(&self) -> usize {
        self.streams.len()
    }

    /// Whether `id` is open.
    pub fn contains(&self, id: StreamId) -> bool {
        self.streams.contains_key(&id)
    }

    fn new_state(&self) -> StreamState {
        StreamState {
            send: SendWindow::new(self.params.stream_window),
            recv: RecvWindow::new(self.params.stream_window, self.params.max_stream_window),
            local_fin: false,
            remote_fin: false,
        }
    }

    /// Allocates an id for a stream we open. Fails when the stream limit is reached or ids are
    /// exhausted (the session must then be replaced).
    pub fn open_local(&mut self) -> Result<StreamId, ErrorCode> {
        if self.streams.len() >= self.params.max_streams as usize {
            return Err(ErrorCode::LimitExceeded);
        }
        let id = self.next_local;
        self.next_local = id.checked_add(2).ok_or(ErrorCode::LimitExceeded)?;
        let st = self.new_state();
        self.streams.insert(id, st);
        Ok(id)
    }

    /// The peer opens stream `id`.
    pub fn on_open(&mut self, id: StreamId, now: Instant) -> Result<OpenVerdict, ProtocolError> {
        self.control.charge(now)?;
        if self.side.owns(id) {
            return Err(ProtocolError::new(
                ErrorCode::Protocol,
                format!("peer opened stream {id}, which has our parity"),
            ));
        }
        if id <= self.highest_remote {
            return Err(ProtocolError::new(
                ErrorCode::Protocol,
                format!(
                    "peer opened stream {id} at or below its previous id {}",
                    self.highest_remote
                ),
            ));
        }
        self.highest_remote = id;
        if self.streams.len() >= self.params.max_streams as usize {
            return Ok(OpenVerdict::Refuse(ErrorCode::LimitExceeded));
        }
        let st = self.new_state();
        self.streams.insert(id, st);
        Ok(OpenVerdict::Accept)
    }

    /// Whether `id` is unknown because it closed (late frames are fine) rather than because
    /// it never existed (a protocol error).
    fn check_closed(&self, id: StreamId, what: &str) -> Result<(), ProtocolError> {
        let seen = if self.side.owns(id) {
            id < self.next_local
        } else {
            id <= self.highest_remote
        };
        if seen {
            Ok(())
        } else {
            Err(ProtocolError::new(
                ErrorCode::Protocol,
                format!("{what} on stream {id}, which was never opened"),
            ))
        }
    }

    /// Data of `len` bytes (with or without FIN) arrives on `id`.
    pub fn on_data(
        &mut self,
        id: StreamId,
        len: u32,
        fin: bool,
        now: Instant,
    ) -> Result<DataVerdict, ProtocolError> {
        let live = self.streams.contains_key(&id);
        if (len == 0 && !fin) || !live {
            // Frames that bring a live stream nothing new are charged like control frames:
            // empty ones without FIN (a FIN comes once per stream; a second is an error), and
            // anything for a closed stream (late bytes are normal, but a flood of 1-byte or
            // empty FIN frames on dead streams would otherwise cost a core and never be cut).
            self.control.charge(now)?;
        }
        self.session_recv.on_data(u64::from(len))?;
        let Some(st) = self.streams.get_mut(&id) else {
            self.check_closed(id, "data")?;
            let inc = self
                .session_recv
                .on_consumed(u64::from(len), now, Duration::ZERO);
            return Ok(DataVerdict::Discard(inc));
        };
        if st.remote_fin {
            return Err(ProtocolError::new(
                ErrorCode::Protocol,
                format!("data on stream {id} after its FIN"),
            ));
        }
        st.recv.on_data(u64::from(len))?;
        if fin {
            st.remote_fin = true;
        }
        Ok(DataVerdict::Deliver)
    }

    /// The application consumed `n` bytes of `id`. Returns the (stream, session) window
    /// increments to send, if due.
    pub fn on_consumed(
        &mut self,
        id: StreamId,
        n: u64,
        now: Instant,
        rtt: Duration,
    ) -> (Option<u32>, Option<u32>) {
        let session = self.session_recv.on_consumed(n, now, rtt);
        let stream = match self.streams.get_mut(&id) {
            // After the peer's FIN no more data comes, so no credit is worth sending.
            Some(st) if !st.remote_fin => st.recv.on_consumed(n, now, rtt),
            Some(st) => {
                st.recv.on_consumed(n, now, rtt);
                None
            }
            None => None,
        };
        (stream, session)
    }

    /// A Window frame arrives.
    ///
    /// An honest peer returns credit in steps of at least half a window (see
    /// [`crate::flow::RecvWindow::on_consumed`]), so updates smaller than that are charged to
    /// the control budget: a flood of tiny updates is cut like any other control flood.
    pub fn on_window(
        &mut self,
        id: StreamId,
        increment: u32,
        now: Instant,
    ) -> Result<(), ProtocolError> {
        let honest_step = if id == 0 {
            self.params.session_window / 2
        } else {
            self.params.stream_window / 2
        };
        if increment < honest_step {
            self.control.charge(now)?;
        }
        if id == 0 {
            return self.session_send.grant(increment);
        }
        match self.streams.get_mut(&id) {
            Some(st) => st.send.grant(increment),
            None => {
                self.control.charge(now)?;
                self.check_closed(id, "window update")
            }
        }
    }

    /// A Reset arrives; the stream is gone. Returns whether it was open.
    pub fn on_reset(&mut self, id: StreamId, now: Instant) -> Result<bool, ProtocolError> {
        self.control.charge(now)?;
        if self.streams.remove(&id).is_some() {
            return Ok(true);
        }
        self.check_closed(id, "reset")?;
        Ok(false)
    }

    /// A Ping, Bind or other control frame arrives: charged to the control budget.
    pub fn on_control(&mut self, now: Instant) -> Result<(), ProtocolError> {
        self.control.charge(now)
    }

    /// Session-wide send credit left.
    pub fn session_credit(&self) -> u64 {
        self.session_send.available()
    }

    /// Bytes `id` may send now: the smaller of its own and the session's credit.
    pub fn send_credit(&self, id: StreamId) -> u64 {
        match self.streams.get(&id) {
            Some(st) if !st.local_fin => st.send.available().min(self.session_send.available()),
            _ => 0,
        }
    }

    /// Records `n` bytes sent on `id` (at most [`Mux::send_credit`]).
    pub fn on_sent(&mut self, id: StreamId, n: u64) {
        if let Some(st) = self.streams.get_mut(&id) {
            st.send.consume(n);
            self.session_send.consume(n);
        }
    }

    /// Gives back credit charged by [`Mux::on_sent`] for `n` bytes that will never be sent
    /// (queued output dropped by a reset, an unused reservation). Without it each such drop
    /// shrinks the session's send window for good, since the peer never sees those bytes and
    /// so never returns their credit.
    pub fn unsend(&mut self, id: StreamId, n: u64) {
        if n == 0 {
            return;
        }
        self.session_send.refund(n);
        if let Some(st) = self.streams.get_mut(&id) {
            st.send.refund(n);
        }
    }

    /// The session's receive window.
    pub fn session_recv(&self) -> &RecvWindow {
        &self.session_recv
    }

    /// We send FIN on `id`. Returns true when the stream is now fully closed and removed.
    pub fn finish_local(&mut self, id: StreamId) -> bool {
        match self.streams.get_mut(&id) {
            Some(st) => {
                st.local_fin = true;
                self.remove_if_done(id)
            }
            None => false,
        }
    }

    /// The application has consumed the peer's FIN on `id`. Returns true when the stream is now
    /// fully closed and removed.
    pub fn finish_remote_consumed(&mut self, id: StreamId) -> bool {
        self.remove_if_done(id)
    }

    fn remove_if_done(&mut self, id: StreamId) -> bool {
        let done = self
            .streams
            .get(&id)
            .is_some_and(|st| st.local_fin && st.remote_fin);
        if done {
            self.streams.remove(&id);
        }
        done
    }

    /// We reset `id` (or gave up on it); forget it. Returns the session credit to return for
    /// bytes that were buffered and will now never be consumed.
    pub fn remove(&mut self, id: StreamId, now: Instant) -> Option<u32> {
        let st = self.streams.remove(&id)?;
        let buffered = st.recv.buffered();
        if buffered == 0 {
            return None;
        }
        self.session_recv.on_consumed(buffered, now, Duration::ZERO)
    }
}

/// Control frames (opens, resets, pings, empty frames) a peer may send per second before the
/// session is closed for flooding. Generous: a busy legitimate session opens and closes a few
/// thousand streams a second.
pub const CONTROL_FRAMES_PER_SEC: u32 = 20_000;

/// A token bucket over control frames.
#[derive(Debug, Clone)]
pub struct ControlBudget {
    per_sec: u32,
    tokens: f64,
    last: Option<Instant>,
}

impl ControlBudget {
    /// A budget of `per_sec` frames a second, with a burst of twice that.
    pub fn new(per_sec: u32) -> Self {
        ControlBudget {
            per_sec,
            tokens: f64::from(per_sec) * 2.0,
            last: None,
        }
    }

    /// Spends one token if there is one: `false` when over budget (for traffic that is
    /// dropped rather than punished, such as datagrams).
    pub fn allow(&mut self, now: Instant) -> bool {
        self.charge(now).is_ok()
    }

    /// Spends one token; an error when the peer has exceeded its budget.
    pub fn charge(&mut self, now: Instant) -> Result<(), ProtocolError> {
        let cap = f64::from(self.per_sec) * 2.0;
        if let Some(last) = self.last {
            let dt = now.saturating_duration_since(last).as_secs_f64();
            self.tokens = (self.tokens + dt * f64::from(self.per_sec)).min(cap);
        }
        self.last = Some(now);
        if self.tokens < 1.0 {
            return Err(ProtocolError::new(
                ErrorCode::LimitExceeded,
                format!("control frame flood: more than {} per second", self.per_sec),
            ));
        }
        self.tokens -= 1.0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> SessionParams {
        SessionParams {
            stream_window: 1000,
            max_stream_window: 1000,
            session_window: 1500,
            max_streams: 2,
            ..SessionParams::default()
        }
    }

    #[test]
    fn ids_have_parity_and_increase() {
        let now = Instant::now();
        let mut gw = Mux::new(Side::Gateway, params());
        assert_eq!(gw.open_local().unwrap(), 1);
        assert_eq!(gw.open_local().unwrap(), 3);
        assert_eq!(gw.open_local().unwrap_err(), ErrorCode::LimitExceeded);
        let mut cl = Mux::new(Side::Client, params());
        assert_eq!(cl.on_open(1, now).unwrap(), OpenVerdict::Accept);
        assert!(cl.on_open(1, now).is_err(), "reused id");
        assert!(cl.on_open(2, now).is_err(), "wrong parity");
        assert_eq!(cl.on_open(3, now).unwrap(), OpenVerdict::Accept);
        assert_eq!(
            cl.on_open(5, now).unwrap(),
            OpenVerdict::Refuse(ErrorCode::LimitExceeded)
        );
    }

    #[test]
    fn data_on_never_opened_stream_is_error_but_closed_is_dropped() {
        let now = Instant::now();
        let mut cl = Mux::new(Side::Client, params());
        assert!(cl.on_data(7, 10, false, now).is_err());
        cl.on_open(1, now).unwrap();
        assert!(cl.on_reset(1, now).unwrap());
        assert!(matches!(
            cl.on_data(1, 10, false, now).unwrap(),
            DataVerdict::Discard(_)
        ));
        assert!(cl.on_window(1, 10, now).is_ok());
        assert!(cl.on_window(9, 10, now).is_err());
    }

    #[test]
    fn stream_and_session_windows_enforced() {
        let now = Instant::now();
        let mut cl = Mux::new(Side::Client, params());
        cl.on_open(1, now).unwrap();
        cl.on_open(3, now).unwrap();
        cl.on_data(1, 1000, false, now).unwrap();
        assert_eq!(
            cl.on_data(1, 1, false, now).unwrap_err().code,
            ErrorCode::FlowControl
        );
        let mut cl = Mux::new(Side::Client, params());
        cl.on_open(1, now).unwrap();
        cl.on_open(3, now).unwrap();
        cl.on_data(1, 1000, false, now).unwrap();
        // Session window is 1500: stream 3 may only get 500 more.
        cl.on_data(3, 500, false, now).unwrap();
        assert_eq!(
            cl.on_data(3, 1, false, now).unwrap_err().code,
            ErrorCode::FlowControl
        );
    }

    #[test]
    fn send_credit_is_min_of_stream_and_session() {
        let mut gw = Mux::new(Side::Gateway, params());
        let a = gw.open_local().unwrap();
        let b = gw.open_local().unwrap();
        assert_eq!(gw.send_credit(a), 1000);
        gw.on_sent(a, 1000);
        assert_eq!(gw.send_credit(a), 0);
        assert_eq!(gw.send_credit(b), 500);
        gw.on_window(0, 100, Instant::now()).unwrap();
        assert_eq!(gw.send_credit(b), 600);
    }

    #[test]
    fn half_close_both_ways_removes_stream() {
        let now = Instant::now();
        let mut cl = Mux::new(Side::Client, params());
        cl.on_open(1, now).unwrap();
        assert!(!cl.finish_local(1));
        assert_eq!(cl.send_credit(1), 0, "no sending after FIN");
        cl.on_data(1, 5, true, now).unwrap();
        assert!(cl.on_data(1, 1, false, now).is_err(), "data after FIN");
        assert!(cl.finish_remote_consumed(1));
        assert!(!cl.contains(1));
    }

    #[test]
    fn removing_a_stream_returns_its_buffered_session_credit() {
        let now = Instant::now();
        let mut cl = Mux::new(Side::Client, params());
        cl.on_open(1, now).unwrap();
        cl.on_data(1, 1000, false, now).unwrap();
        // 1000 of 1500 session bytes are held; dropping the stream gives them back.
        assert_eq!(cl.remove(1, now), Some(1000));
    }

    #[test]
    fn tiny_window_updates_are_charged_but_honest_ones_are_not() {
        let now = Instant::now();
        let mut gw = Mux::new(Side::Gateway, SessionParams::default());
        let id = gw.open_local().unwrap();
        let half = SessionParams::default().stream_window / 2;
        let session_half = SessionParams::default().session_window / 2;
        // Far more honest updates than the budget allows, all accepted.
        for i in 0..(2 * CONTROL_FRAMES_PER_SEC + 10) {
            gw.on_sent(id, u64::from(half));
            gw.on_window(id, half, now).unwrap();
            if (i + 1) % (session_half / half) == 0 {
                gw.on_window(0, session_half, now).unwrap();
            }
        }
        let mut gw = Mux::new(Side::Gateway, SessionParams::default());
        let flood =
            (0..(2 * CONTROL_FRAMES_PER_SEC + 10)).try_for_each(|_| gw.on_window(0, 1, now));
        assert_eq!(flood.unwrap_err().code, ErrorCode::LimitExceeded);
    }

    #[test]
    fn control_flood_is_cut() {
        let now = Instant::now();
        let mut b = ControlBudget::new(10);
        for _ in 0..20 {
            b.charge(now).unwrap();
        }
        assert_eq!(b.charge(now).unwrap_err().code, ErrorCode::LimitExceeded);
        // A second later ten more are fine.
        let later = now + Duration::from_secs(1);
        for _ in 0..10 {
            b.charge(later).unwrap();
        }
    }
}
