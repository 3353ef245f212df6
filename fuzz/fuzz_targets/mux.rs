//! The stream table (`Mux`) driven by a sequence of peer frames and local actions, on both
//! sides, checked against an independent model of what the rules say.
//!
//! The model tracks, per stream and for the session: the send credit we hold (initial window
//! plus the peer's grants minus what we sent), the credit the peer holds towards us (initial
//! window plus every increment `Mux` told us to send minus what the peer sent), and the bytes
//! delivered to the application and not yet consumed. The driver is modelled honestly: it
//! never sends more than `send_credit`, never consumes more than was delivered, sends every
//! increment `Mux` returns, and stops at the first `ProtocolError` (the session closes).
//!
//! Checks after every operation:
//! - no panic; `stream_count() <= max_streams`; `contains` agrees with the model;
//! - `send_credit(id)` is exactly min(stream credit, session credit) for an open stream not
//!   finished by us, 0 otherwise (so `on_sent` never takes more than the windows allow);
//! - every peer frame gets the outcome the rules predict: data within the credit we granted
//!   is delivered, data beyond it is a FlowControl error, frames for never-opened ids are
//!   Protocol errors, frames for closed ids are dropped, opens past `max_streams` are refused;
//!   a LimitExceeded (control flood) error only after at least a full burst of control frames;
//! - receive windows neither over-grant nor starve: for the session and every stream the peer
//!   has not finished, (peer's credit + bytes we hold) stays within (window/2, max window].
#![no_main]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use arbitrary::Arbitrary;
use burrow_proto::flow::MAX_CREDIT;
use burrow_proto::message::SessionParams;
use burrow_proto::mux::{DataVerdict, Mux, OpenVerdict, Side, CONTROL_FRAMES_PER_SEC};
use burrow_proto::{ErrorCode, ProtocolError, StreamId};
use libfuzzer_sys::fuzz_target;

/// Picks a stream id relative to the current state, so the same operations make sense on both
/// sides.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum IdSel {
    /// One of the ids seen so far (by index).
    Known(u8),
    /// The k-th next id the peer may open (0 = the next one).
    NextRemote(u8),
    /// The id we opened k opens ago (0 = the next one we will open: never opened).
    Local(u8),
    /// Any id at all.
    Raw(u32),
}

/// A length relative to what the peer may send, or any length.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum LenSel {
    /// Within the peer's credit: `credit * n / 255`.
    Fraction(u8),
    /// Exactly the credit plus `n` (n = 0 is the edge).
    Over(u8),
    /// Small.
    Small(u16),
    /// Anything.
    Raw(u32),
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum IncSel {
    Small(u16),
    Raw(u32),
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Op {
    PeerOpen(IdSel),
    PeerData {
        id: IdSel,
        len: LenSel,
        fin: bool,
    },
    PeerWindow {
        id: IdSel,
        inc: IncSel,
        session: bool,
    },
    PeerReset(IdSel),
    PeerPing,
    /// Many control frames at the same instant.
    PeerPingBurst(u16),
    OpenLocal,
    /// Send up to `n` bytes (clamped to `send_credit`).
    Send {
        id: IdSel,
        n: u16,
    },
    /// Consume up to `n` delivered bytes, with this round-trip estimate in ms.
    Consume {
        id: IdSel,
        n: u16,
        rtt_ms: u8,
    },
    FinishLocal(IdSel),
    FinishRemoteConsumed(IdSel),
    Remove(IdSel),
    Advance {
        ms: u16,
    },
}

#[derive(Arbitrary, Debug)]
struct Input {
    /// Stream window in KiB steps: 1..=4 KiB.
    stream_kib: u8,
    /// Extra KiB the stream window may grow to: 0..=7.
    grow_kib: u8,
    /// Session window as extra KiB over the stream window: 0..=15.
    session_extra_kib: u8,
    /// 1..=8.
    max_streams: u8,
    ops: Vec<Op>,
}

impl Input {
    fn params(&self) -> SessionParams {
        let stream_window = (u32::from(self.stream_kib % 4) + 1) * 1024;
        let p = SessionParams {
            stream_window,
            max_stream_window: stream_window + u32::from(self.grow_kib % 8) * 1024,
            session_window: stream_window + u32::from(self.session_extra_kib % 16) * 1024,
            max_streams: u32::from(self.max_streams % 8) + 1,
            ..SessionParams::default()
        };
        p.validate().expect("fuzz params are valid");
        p
    }
}

#[derive(Debug, Default)]
struct ModelStream {
    /// Still in the Mux table.
    open: bool,
    /// Credit we hold to send on it.
    send: u64,
    /// Credit the peer holds to send to us on it.
    peer_credit: u64,
    /// Delivered to the application, not yet consumed (kept after the stream leaves the table
    /// through FIN or a peer reset: the application may still read it).
    buffered: u64,
    local_fin: bool,
    remote_fin: bool,
}

struct Model {
    side: Side,
    p: SessionParams,
    streams: BTreeMap<StreamId, ModelStream>,
    /// Every id seen, for `IdSel::Known`.
    ids: Vec<StreamId>,
    next_local: StreamId,
    highest_remote: StreamId,
    session_send: u64,
    session_peer_credit: u64,
    /// Bytes received on the session and not yet consumed (as the Mux counts them).
    session_held: u64,
    /// Control frames charged so far (a flood error needs at least a full burst).
    charged: u64,
}

fn owns(side: Side, id: StreamId) -> bool {
    (id % 2 == 1) == (side == Side::Gateway)
}

impl Model {
    fn new(side: Side, p: SessionParams) -> Self {
        Model {
            side,
            p,
            streams: BTreeMap::new(),
            ids: Vec::new(),
            next_local: if side == Side::Gateway { 1 } else { 2 },
            highest_remote: 0,
            session_send: u64::from(p.session_window),
            session_peer_credit: u64::from(p.session_window),
            session_held: 0,
            charged: 0,
        }
    }

    fn resolve(&self, sel: IdSel) -> StreamId {
        match sel {
            IdSel::Known(i) => {
                if self.ids.is_empty() {
                    1
                } else {
                    self.ids[usize::from(i) % self.ids.len()]
                }
            }
            IdSel::NextRemote(k) => {
                let mut id = self.highest_remote.saturating_add(1);
                if owns(self.side, id) {
                    id = id.saturating_add(1);
                }
                id.saturating_add(2 * u32::from(k))
            }
            IdSel::Local(k) => self.next_local.saturating_sub(2 * u32::from(k)),
            IdSel::Raw(id) => id,
        }
    }

    fn open_count(&self) -> usize {
        self.streams.values().filter(|s| s.open).count()
    }

    /// Whether an id not in the table was opened once (late frames are fine) rather than never.
    fn seen(&self, id: StreamId) -> bool {
        if owns(self.side, id) {
            id < self.next_local
        } else {
            id <= self.highest_remote
        }
    }

    fn remember(&mut self, id: StreamId) {
        if !self.ids.contains(&id) {
            self.ids.push(id);
        }
    }

    fn new_stream(&self) -> ModelStream {
        ModelStream {
            open: true,
            send: u64::from(self.p.stream_window),
            peer_credit: u64::from(self.p.stream_window),
            ..ModelStream::default()
        }
    }

    fn is_open(&self, id: StreamId) -> bool {
        self.streams.get(&id).is_some_and(|s| s.open)
    }
}

/// Outcome of a peer frame: the session goes on, or it ends with this error.
type Step = Result<(), ProtocolError>;

/// A flood error is legitimate only after at least a full burst of charged frames.
fn flood_ok(m: &Model, e: &ProtocolError) -> bool {
    e.code == ErrorCode::LimitExceeded && m.charged >= 2 * u64::from(CONTROL_FRAMES_PER_SEC)
}

/// Checks an error against the code the model expects (a flood error is always allowed once
/// enough control frames were sent), or fails.
fn expect_err<T: std::fmt::Debug>(
    m: &Model,
    got: Result<T, ProtocolError>,
    code: ErrorCode,
    what: &str,
) -> Step {
    match got {
        Err(e) if e.code == code || flood_ok(m, &e) => Err(e),
        other => panic!("{what}: expected {code:?}, got {other:?}"),
    }
}

fn check_invariants(mux: &Mux, m: &Model) {
    let p = &m.p;
    assert!(mux.stream_count() <= p.max_streams as usize);
    assert_eq!(mux.stream_count(), m.open_count(), "stream table size");
    for (&id, s) in &m.streams {
        assert_eq!(mux.contains(id), s.open, "contains({id})");
        let expected = if s.open && !s.local_fin {
            s.send.min(m.session_send)
        } else {
            0
        };
        assert_eq!(mux.send_credit(id), expected, "send_credit({id})");
        if s.open && !s.remote_fin {
            let outstanding = s.peer_credit + s.buffered;
            assert!(
                outstanding > u64::from(p.stream_window / 2)
                    && outstanding <= u64::from(p.max_stream_window),
                "stream {id}: peer credit {} + held {} outside (window/2, max window]",
                s.peer_credit,
                s.buffered
            );
        }
    }
    let outstanding = m.session_peer_credit + m.session_held;
    assert!(
        outstanding > u64::from(p.session_window / 2) && outstanding <= u64::from(p.session_window),
        "session: peer credit {} + held {} outside (window/2, window]",
        m.session_peer_credit,
        m.session_held
    );
    assert!(m.session_send <= MAX_CREDIT);
    assert_eq!(mux.session_credit(), m.session_send, "session_credit");
}

fn peer_data(
    mux: &mut Mux,
    m: &mut Model,
    id: StreamId,
    len: LenSel,
    fin: bool,
    now: Instant,
) -> Step {
    let credit = match m.streams.get(&id) {
        Some(s) if s.open => s.peer_credit.min(m.session_peer_credit),
        _ => m.session_peer_credit,
    };
    let len: u32 = match len {
        LenSel::Fraction(n) => (credit * u64::from(n) / 255) as u32,
        LenSel::Over(n) => (credit + u64::from(n)).min(u64::from(u32::MAX)) as u32,
        LenSel::Small(n) => u32::from(n),
        LenSel::Raw(n) => n,
    };
    let n = u64::from(len);
    // Charged like control frames: empty frames without FIN, and anything for a stream that
    // is not open (late bytes, or floods of them on dead streams).
    if (len == 0 && !fin) || !m.is_open(id) {
        m.charged += 1;
    }
    let got = mux.on_data(id, len, fin, now);
    if n > m.session_peer_credit {
        return expect_err(
            m,
            got,
            ErrorCode::FlowControl,
            "data over the session window",
        );
    }
    let open = m.is_open(id);
    if !open {
        if !m.seen(id) {
            return expect_err(m, got, ErrorCode::Protocol, "data on a never-opened stream");
        }
        match got {
            Ok(DataVerdict::Discard(inc)) => {
                // Received and consumed at once at session level.
                m.session_peer_credit -= n;
                m.session_peer_credit += inc.map_or(0, u64::from);
                return Ok(());
            }
            Err(e) if flood_ok(m, &e) => return Err(e),
            other => panic!("data on closed stream {id}: expected Discard, got {other:?}"),
        }
    }
    let s = &m.streams[&id];
    if s.remote_fin {
        return expect_err(m, got, ErrorCode::Protocol, "data after FIN");
    }
    if n > s.peer_credit {
        return expect_err(
            m,
            got,
            ErrorCode::FlowControl,
            "data over the stream window",
        );
    }
    match got {
        Ok(DataVerdict::Deliver) => {}
        Err(e) if flood_ok(m, &e) => return Err(e),
        other => panic!("data within credit on stream {id}: expected Deliver, got {other:?}"),
    }
    m.session_peer_credit -= n;
    m.session_held += n;
    let s = m.streams.get_mut(&id).expect("open stream");
    s.peer_credit -= n;
    s.buffered += n;
    s.remote_fin |= fin;
    Ok(())
}

fn apply(mux: &mut Mux, m: &mut Model, op: Op, now: &mut Instant) -> Step {
    match op {
        Op::PeerOpen(sel) => {
            let id = m.resolve(sel);
            m.charged += 1;
            let got = mux.on_open(id, *now);
            if owns(m.side, id) {
                return expect_err(m, got, ErrorCode::Protocol, "open with our parity");
            }
            if id <= m.highest_remote {
                return expect_err(m, got, ErrorCode::Protocol, "open of a used id");
            }
            m.highest_remote = id;
            m.remember(id);
            let expected = if m.open_count() >= m.p.max_streams as usize {
                OpenVerdict::Refuse(ErrorCode::LimitExceeded)
            } else {
                OpenVerdict::Accept
            };
            match got {
                Ok(v) if v == expected => {}
                Err(e) if flood_ok(m, &e) => return Err(e),
                other => panic!("open {id}: expected {expected:?}, got {other:?}"),
            }
            if expected == OpenVerdict::Accept {
                let st = m.new_stream();
                m.streams.insert(id, st);
            }
        }
        Op::PeerData { id, len, fin } => {
            let id = m.resolve(id);
            peer_data(mux, m, id, len, fin, *now)?;
        }
        Op::PeerWindow { id, inc, session } => {
            let id = if session { 0 } else { m.resolve(id) };
            let inc = match inc {
                IncSel::Small(n) => u32::from(n),
                IncSel::Raw(n) => n,
            };
            // Increments below half a window are charged to the control budget.
            let honest_step = if id == 0 {
                m.p.session_window / 2
            } else {
                m.p.stream_window / 2
            };
            if inc < honest_step {
                m.charged += 1;
            }
            let got = mux.on_window(id, inc, *now);
            let credit = if id == 0 {
                Some(&mut m.session_send)
            } else {
                m.streams
                    .get_mut(&id)
                    .filter(|s| s.open)
                    .map(|s| &mut s.send)
            };
            match credit {
                Some(c) => {
                    if *c + u64::from(inc) > MAX_CREDIT {
                        return expect_err(m, got, ErrorCode::FlowControl, "window overflow");
                    }
                    *c += u64::from(inc);
                    match got {
                        Ok(()) => {}
                        Err(e) if flood_ok(m, &e) => return Err(e),
                        Err(e) => panic!("window {inc} on {id}: unexpected {e:?}"),
                    }
                }
                None => {
                    m.charged += 1;
                    if !m.seen(id) {
                        return expect_err(m, got, ErrorCode::Protocol, "window on unknown id");
                    }
                    match got {
                        Ok(()) => {}
                        Err(e) if flood_ok(m, &e) => return Err(e),
                        Err(e) => panic!("window on closed {id}: unexpected {e:?}"),
                    }
                }
            }
        }
        Op::PeerReset(sel) => {
            let id = m.resolve(sel);
            m.charged += 1;
            let got = mux.on_reset(id, *now);
            if m.is_open(id) {
                match got {
                    Ok(true) => {}
                    Err(e) if flood_ok(m, &e) => return Err(e),
                    other => panic!("reset of open {id}: got {other:?}"),
                }
                // Buffered bytes stay readable; the application may still consume them.
                m.streams.get_mut(&id).expect("open").open = false;
            } else if m.seen(id) {
                match got {
                    Ok(false) => {}
                    Err(e) if flood_ok(m, &e) => return Err(e),
                    other => panic!("reset of closed {id}: got {other:?}"),
                }
            } else {
                return expect_err(m, got, ErrorCode::Protocol, "reset of a never-opened id");
            }
        }
        Op::PeerPing => {
            m.charged += 1;
            if let Err(e) = mux.on_control(*now) {
                assert!(flood_ok(m, &e), "ping: {e:?}");
                return Err(e);
            }
        }
        Op::PeerPingBurst(n) => {
            for _ in 0..n {
                m.charged += 1;
                if let Err(e) = mux.on_control(*now) {
                    assert!(flood_ok(m, &e), "ping burst: {e:?}");
                    return Err(e);
                }
            }
        }
        Op::OpenLocal => {
            let got = mux.open_local();
            if m.open_count() >= m.p.max_streams as usize {
                assert_eq!(got, Err(ErrorCode::LimitExceeded));
            } else {
                let id = got.expect("open_local under the limit");
                assert_eq!(id, m.next_local, "local ids in order");
                assert!(owns(m.side, id));
                m.next_local += 2;
                m.remember(id);
                let st = m.new_stream();
                m.streams.insert(id, st);
            }
        }
        Op::Send { id, n } => {
            let id = m.resolve(id);
            let credit = mux.send_credit(id);
            let n = u64::from(n).min(credit);
            // Never more than send_credit: that is the caller's contract.
            mux.on_sent(id, n);
            if n > 0 {
                let s = m
                    .streams
                    .get_mut(&id)
                    .expect("credit only on known streams");
                assert!(s.open && !s.local_fin);
                s.send = s.send.checked_sub(n).expect("stream credit went negative");
                m.session_send = m
                    .session_send
                    .checked_sub(n)
                    .expect("session credit went negative");
            }
        }
        Op::Consume { id, n, rtt_ms } => {
            let id = m.resolve(id);
            let buffered = m.streams.get(&id).map_or(0, |s| s.buffered);
            let n = u64::from(n).min(buffered);
            let rtt = Duration::from_millis(u64::from(rtt_ms));
            let (stream_inc, session_inc) = mux.on_consumed(id, n, *now, rtt);
            m.session_held -= n;
            m.session_peer_credit += session_inc.map_or(0, u64::from);
            if let Some(s) = m.streams.get_mut(&id) {
                s.buffered -= n;
                if s.open && !s.remote_fin {
                    s.peer_credit += stream_inc.map_or(0, u64::from);
                } else {
                    assert_eq!(stream_inc, None, "stream credit for finished stream {id}");
                }
            } else {
                assert_eq!(stream_inc, None, "stream credit for unknown stream {id}");
            }
        }
        Op::FinishLocal(sel) => {
            let id = m.resolve(sel);
            let done = mux.finish_local(id);
            match m.streams.get_mut(&id).filter(|s| s.open) {
                Some(s) => {
                    s.local_fin = true;
                    assert_eq!(done, s.remote_fin, "finish_local({id}) removal");
                    if done {
                        s.open = false;
                    }
                }
                None => assert!(!done),
            }
        }
        Op::FinishRemoteConsumed(sel) => {
            let id = m.resolve(sel);
            let done = mux.finish_remote_consumed(id);
            match m.streams.get_mut(&id).filter(|s| s.open) {
                Some(s) => {
                    assert_eq!(done, s.local_fin && s.remote_fin);
                    if done {
                        s.open = false;
                    }
                }
                None => assert!(!done),
            }
        }
        Op::Remove(sel) => {
            let id = m.resolve(sel);
            let inc = mux.remove(id, *now);
            match m.streams.get_mut(&id).filter(|s| s.open) {
                Some(s) => {
                    // Buffered bytes are dropped and their session credit comes back.
                    if s.buffered == 0 {
                        assert_eq!(inc, None);
                    }
                    m.session_held -= s.buffered;
                    s.buffered = 0;
                    s.open = false;
                    m.session_peer_credit += inc.map_or(0, u64::from);
                }
                None => assert_eq!(inc, None, "remove of a stream not in the table"),
            }
        }
        Op::Advance { ms } => {
            *now += Duration::from_millis(u64::from(ms));
        }
    }
    Ok(())
}

fn run(side: Side, input: &Input) {
    let p = input.params();
    let mut mux = Mux::new(side, p);
    let mut m = Model::new(side, p);
    // A fixed base; time only moves forward through `Advance`.
    let mut now = base();
    check_invariants(&mux, &m);
    for &op in &input.ops {
        let step = apply(&mut mux, &mut m, op, &mut now);
        // Also holds after an error: an error must not have broken the table.
        assert!(mux.stream_count() <= p.max_streams as usize);
        if step.is_err() {
            // The session closes on a protocol error; nothing more is fed to it.
            return;
        }
        check_invariants(&mux, &m);
    }
}

fn base() -> Instant {
    use std::sync::OnceLock;
    static BASE: OnceLock<Instant> = OnceLock::new();
    *BASE.get_or_init(Instant::now)
}

fuzz_target!(|input: Input| {
    run(Side::Gateway, &input);
    run(Side::Client, &input);
});
