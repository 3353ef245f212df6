//! A model test of the session's flow control: two real session ends over an in-memory pipe,
//! driven by random sequences of opens, sends (plain and relay-style reservations), reads
//! (released at once or held), half-closes, resets and drops, with readers that stop or go
//! slow. After every step, once both ends are idle, credit must be conserved in each direction
//! (what one end may still send, plus what it charged but has not written, equals what the
//! other granted and has not received), and every received byte must be either held by a
//! stream or given back. When every stream is gone, nothing may be held, nothing charged, and
//! at least half the session window must be free again.
//!
//! The Mux fuzz target cannot see credit lost in the session's queues; this can. Time is
//! paused: a short sleep returns only once every other task is idle, which is what "nothing
//! in flight" needs. Either end's reading of the pipe can be stalled, so that output queues
//! up behind a writer that cannot write (the state in which a reset used to lose credit);
//! the conservation checks run whenever neither is stalled.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use burrow::proto::message::{Open, SessionParams};
use burrow::proto::mux::Side;
use burrow::proto::ErrorCode;
use burrow::session::{self, CreditSnapshot, Session, Started, Stream};
use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use tokio::io::{AsyncRead, AsyncWrite, DuplexStream, ReadBuf};
use tokio::task::JoinHandle;

const STREAMS: usize = 5;
const WINDOW: u32 = 8192;

fn params() -> SessionParams {
    SessionParams {
        max_payload: 1024,
        stream_window: 2048,
        max_stream_window: 4096,
        session_window: WINDOW,
        ..SessionParams::default()
    }
}

/// Which end acts.
#[derive(Debug, Clone, Copy)]
enum End {
    Gw,
    Ag,
}

#[derive(Debug, Clone)]
enum Op {
    Open(End),
    /// The other end stops reading what this end writes (so this end's output queues up).
    Stall(End),
    /// It reads again.
    Unstall(End),
    /// `Stream::send` of this many bytes, in a task of its own (it may wait for credit).
    Send(usize, End, usize),
    /// Relay-style: reserve, then send what fits, until this many bytes are queued.
    Pump(usize, End, usize),
    /// Take what has arrived (up to a limit) without waiting, and release it at once.
    Read(usize, End, usize),
    /// Take what has arrived without releasing it (a relay whose socket is full).
    Hold(usize, End),
    /// Release what was held.
    Release(usize, End),
    Finish(usize, End),
    Reset(usize, End),
    Drop(usize, End),
}

fn end() -> impl Strategy<Value = End> {
    prop_oneof![Just(End::Gw), Just(End::Ag)]
}

fn op() -> impl Strategy<Value = Op> {
    let s = 0..STREAMS;
    prop_oneof![
        2 => end().prop_map(Op::Open),
        1 => end().prop_map(Op::Stall),
        2 => end().prop_map(Op::Unstall),
        4 => (s.clone(), end(), 1..6000usize).prop_map(|(i, e, n)| Op::Send(i, e, n)),
        3 => (s.clone(), end(), 1..6000usize).prop_map(|(i, e, n)| Op::Pump(i, e, n)),
        4 => (s.clone(), end(), 1..5000usize).prop_map(|(i, e, n)| Op::Read(i, e, n)),
        2 => (s.clone(), end()).prop_map(|(i, e)| Op::Hold(i, e)),
        2 => (s.clone(), end()).prop_map(|(i, e)| Op::Release(i, e)),
        1 => (s.clone(), end()).prop_map(|(i, e)| Op::Finish(i, e)),
        1 => (s.clone(), end()).prop_map(|(i, e)| Op::Reset(i, e)),
        1 => (s, end()).prop_map(|(i, e)| Op::Drop(i, e)),
    ]
}

/// One end of a stream as the model holds it.
#[derive(Default)]
struct EndState {
    stream: Option<Arc<Stream>>,
    /// Bytes taken and not released.
    held: usize,
    tasks: Vec<JoinHandle<()>>,
}

impl EndState {
    fn forget(&mut self) {
        for t in self.tasks.drain(..) {
            t.abort();
        }
        self.stream = None;
        self.held = 0;
    }
}

#[derive(Default)]
struct Pair {
    gw: EndState,
    ag: EndState,
}

impl Pair {
    fn at(&mut self, e: End) -> &mut EndState {
        match e {
            End::Gw => &mut self.gw,
            End::Ag => &mut self.ag,
        }
    }
}

/// A valve on one end's reading of the pipe.
#[derive(Default)]
struct Gate {
    shut: AtomicBool,
    waker: Mutex<Option<Waker>>,
}

impl Gate {
    fn set(&self, shut: bool) {
        self.shut.store(shut, Ordering::SeqCst);
        if !shut {
            if let Some(w) = self.waker.lock().unwrap().take() {
                w.wake();
            }
        }
    }
}

/// One end of the pipe, whose reads wait while its gate is shut.
struct Gated {
    io: DuplexStream,
    gate: Arc<Gate>,
}

impl AsyncRead for Gated {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.gate.shut.load(Ordering::SeqCst) {
            *self.gate.waker.lock().unwrap() = Some(cx.waker().clone());
            // Checked again after registering, so an unstall in between is not missed.
            if self.gate.shut.load(Ordering::SeqCst) {
                return Poll::Pending;
            }
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Gated {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

struct World {
    gw: Started,
    ag: Started,
    /// Gates on the gateway's and the agent's reads.
    gw_reads: Arc<Gate>,
    ag_reads: Arc<Gate>,
    streams: Vec<Pair>,
}

/// Lets every task run until all are idle (paused time advances only then).
async fn settle() {
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

fn check(what: &str, from: (&str, CreditSnapshot), to: (&str, CreditSnapshot)) {
    let (a, x) = from;
    let (b, y) = to;
    assert_eq!(
        x.send_credit + x.unsent,
        y.granted - y.received,
        "{what}: credit {a} -> {b} not conserved: {a} {x:?}, {b} {y:?}"
    );
    assert_eq!(
        y.held,
        y.received - y.consumed,
        "{what}: {b} holds bytes its window does not account for: {y:?}"
    );
}

fn check_both(what: &str, gw: &Session, ag: &Session) {
    let (g, a) = (gw.credit(), ag.credit());
    check(what, ("gateway", g), ("agent", a));
    check(what, ("agent", a), ("gateway", g));
}

impl World {
    fn new() -> World {
        let (a, b) = tokio::io::duplex(4096);
        let (gw_reads, ag_reads) = (Arc::new(Gate::default()), Arc::new(Gate::default()));
        let a = Gated {
            io: a,
            gate: gw_reads.clone(),
        };
        let b = Gated {
            io: b,
            gate: ag_reads.clone(),
        };
        let gw = session::start(
            Box::new(a),
            BytesMut::new(),
            Side::Gateway,
            params(),
            "gw".into(),
        );
        let ag = session::start(
            Box::new(b),
            BytesMut::new(),
            Side::Client,
            params(),
            "ag".into(),
        );
        World {
            gw,
            ag,
            gw_reads,
            ag_reads,
            streams: Vec::new(),
        }
    }

    /// The gate on the reads of the end that receives what `e` writes.
    fn gate_after(&self, e: End) -> &Gate {
        match e {
            End::Gw => &self.ag_reads,
            End::Ag => &self.gw_reads,
        }
    }

    fn stalled(&self) -> bool {
        self.gw_reads.shut.load(Ordering::SeqCst) || self.ag_reads.shut.load(Ordering::SeqCst)
    }

    async fn apply(&mut self, op: &Op) {
        let slot = |i: usize, n: usize| if n == 0 { None } else { Some(i % n) };
        let n = self.streams.len();
        match *op {
            Op::Stall(e) => self.gate_after(e).set(true),
            Op::Unstall(e) => self.gate_after(e).set(false),
            Op::Open(e) => {
                // Opening needs both directions (the accept is checked at once).
                if n >= STREAMS || self.stalled() {
                    return;
                }
                let (opener, acceptor) = match e {
                    End::Gw => (&self.gw, &mut self.ag),
                    End::Ag => (&self.ag, &mut self.gw),
                };
                let Ok(s) = opener.session.open(&Open {
                    service: 0,
                    client: None,
                }) else {
                    return;
                };
                // The Open is written right away; the other end accepts it once idle.
                settle().await;
                let Ok(accepted) = acceptor.incoming.try_recv() else {
                    panic!("an opened stream reaches the other end");
                };
                let mut p = Pair::default();
                p.at(e).stream = Some(Arc::new(s));
                let other = match e {
                    End::Gw => End::Ag,
                    End::Ag => End::Gw,
                };
                p.at(other).stream = Some(Arc::new(accepted));
                self.streams.push(p);
            }
            Op::Send(i, e, len) => {
                let Some(i) = slot(i, n) else { return };
                let side = self.streams[i].at(e);
                let Some(s) = side.stream.clone() else { return };
                side.tasks.push(tokio::spawn(async move {
                    let _ = s.send(Bytes::from(vec![0x42; len])).await;
                }));
            }
            Op::Pump(i, e, len) => {
                let Some(i) = slot(i, n) else { return };
                let side = self.streams[i].at(e);
                let Some(s) = side.stream.clone() else { return };
                side.tasks.push(tokio::spawn(async move {
                    let mut left = len;
                    while left > 0 {
                        let Ok(credit) = s.reserve(left.min(3000)).await else {
                            return;
                        };
                        // A read that came up shorter than the credit reserved.
                        let k = credit.min(left).div_ceil(2).max(1).min(credit);
                        if s.send_reserved(Bytes::from(vec![0x17; k])).await.is_err() {
                            return;
                        }
                        left -= k;
                    }
                }));
            }
            Op::Read(i, e, max) => {
                let Some(i) = slot(i, n) else { return };
                let side = self.streams[i].at(e);
                let Some(s) = side.stream.clone() else { return };
                let mut got = Vec::new();
                if let Ok(Ok(true)) =
                    tokio::time::timeout(Duration::ZERO, s.recv_many(&mut got, max)).await
                {
                    s.release(got.iter().map(Bytes::len).sum());
                }
            }
            Op::Hold(i, e) => {
                let Some(i) = slot(i, n) else { return };
                let side = self.streams[i].at(e);
                let Some(s) = side.stream.clone() else { return };
                let mut got = Vec::new();
                if let Ok(Ok(true)) =
                    tokio::time::timeout(Duration::ZERO, s.recv_many(&mut got, usize::MAX)).await
                {
                    side.held += got.iter().map(Bytes::len).sum::<usize>();
                }
            }
            Op::Release(i, e) => {
                let Some(i) = slot(i, n) else { return };
                let side = self.streams[i].at(e);
                if let Some(s) = &side.stream {
                    s.release(side.held);
                }
                side.held = 0;
            }
            Op::Finish(i, e) => {
                let Some(i) = slot(i, n) else { return };
                if let Some(s) = &self.streams[i].at(e).stream {
                    s.finish();
                }
            }
            Op::Reset(i, e) => {
                let Some(i) = slot(i, n) else { return };
                if let Some(s) = &self.streams[i].at(e).stream {
                    s.reset(ErrorCode::StreamReset);
                }
            }
            Op::Drop(i, e) => {
                let Some(i) = slot(i, n) else { return };
                self.streams[i].at(e).forget();
            }
        }
    }
}

fn run(ops: &[Op]) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap();
    rt.block_on(async {
        let mut w = World::new();
        for (k, op) in ops.iter().enumerate() {
            w.apply(op).await;
            settle().await;
            if w.stalled() {
                // Bytes sit in the pipe: "nothing in flight" does not hold.
                continue;
            }
            check_both(
                &format!("after step {k} ({op:?})"),
                &w.gw.session,
                &w.ag.session,
            );
        }
        // Every stream goes away; then nothing may be left behind.
        w.gw_reads.set(false);
        w.ag_reads.set(false);
        for p in &mut w.streams {
            p.gw.forget();
            p.ag.forget();
        }
        settle().await;
        let (g, a) = (w.gw.session.credit(), w.ag.session.credit());
        check_both("at the end", &w.gw.session, &w.ag.session);
        for (who, c) in [("gateway", g), ("agent", a)] {
            assert_eq!(
                c.held, 0,
                "{who} still holds bytes of closed streams: {c:?}"
            );
            assert_eq!(c.unsent, 0, "{who} still has output charged: {c:?}");
            assert_eq!(c.slots, 0, "{who} still has stream slots: {c:?}");
            assert!(
                c.send_credit >= u64::from(WINDOW / 2),
                "{who} lost send credit for good: {c:?} (window {WINDOW})"
            );
        }
        assert!(!w.gw.session.is_closed() && !w.ag.session.is_closed());
    });
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]
    #[test]
    fn credit_is_conserved_and_given_back(ops in prop::collection::vec(op(), 1..60)) {
        run(&ops);
    }
}

/// The case that wedged real sessions: output queued behind a writer that cannot write
/// (three streams' windows are more than the pipe holds, and the peer is not reading), then
/// the streams are reset.
#[test]
fn reset_with_queued_output_gives_its_credit_back() {
    run(&[
        Op::Open(End::Gw),
        Op::Open(End::Gw),
        Op::Open(End::Gw),
        Op::Stall(End::Gw),
        Op::Send(0, End::Gw, 6000),
        Op::Send(1, End::Gw, 6000),
        Op::Pump(2, End::Gw, 6000),
        Op::Reset(0, End::Gw),
        Op::Reset(1, End::Gw),
        Op::Drop(2, End::Gw),
        Op::Unstall(End::Gw),
    ]);
}
