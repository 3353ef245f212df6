#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Abuse: what a hostile peer can do to a gateway, and a hostile gateway to an agent (issue
//! "Reliability and security").
//!
//! Each test plays the attacker by hand, on raw frames after a real handshake, and checks what
//! an operator would check: the offending connection is closed with a GoAway carrying the right
//! reason code, the gateway's counters say what happened, no task panicked, and a second, honest
//! agent carries byte-exact traffic the whole time.
//!
//! Every test runs on its own runtime whose worker threads are named after it, so a panic hook
//! can tell whether any task of *that* test panicked (tokio swallows task panics otherwise).

mod common;

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant};

use burrow::agent::ForwardStatus;
use burrow::config::{
    AgentConfig, AgentGrant, GatewayConfig, KeySpec, Limits, PortRange, Target, TransportKind,
    Trust,
};
use burrow::proto::auth::SecretKey;
use burrow::proto::frame::{ABSOLUTE_MAX_PAYLOAD, ACK, HEADER_LEN};
use burrow::proto::message::{
    self, Auth, Bind, BindResult, Challenge, GoAway, Open, Protocol, Role, SessionParams,
};
use burrow::proto::{Decoder, ErrorCode, Frame, Kind};
use burrow::session::handshake;
use burrow::stats::{GatewayStats, StatsSnapshot};
use burrow::transport::BoxIo;
use bytes::{Bytes, BytesMut};
use common::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;

/// Upper bound for a whole test, so a hang fails instead of blocking the run.
const TEST_LIMIT: Duration = Duration::from_secs(120);

/// How long the gateway may take to close an offending session.
const CLOSE_LIMIT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// Runtime with a panic witness.

/// Names of the runtime threads on which a panic happened.
static PANICKED: Mutex<Vec<String>> = Mutex::new(Vec::new());
static HOOK: Once = Once::new();

/// Runs `test` on a fresh two-worker runtime whose threads are named `abuse-<name>`, within
/// [`TEST_LIMIT`], then fails if any task on those threads panicked.
fn run(name: &str, test: impl Future<Output = ()>) {
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if let Some(t) = std::thread::current().name() {
                if t.starts_with("abuse-") {
                    PANICKED
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(t.to_string());
                }
            }
            previous(info);
        }));
    });
    let thread = format!("abuse-{name}");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(&thread)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(within(TEST_LIMIT, name, test));
    rt.shutdown_timeout(Duration::from_secs(5));
    let panics = PANICKED
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .filter(|t| **t == thread)
        .count();
    assert_eq!(
        panics, 0,
        "{panics} task(s) panicked during {name} (see the panic messages above)"
    );
}

// ---------------------------------------------------------------------------------------------
// A raw peer: frames by hand after a real handshake.

/// How the other side ended a raw connection.
#[derive(Debug)]
struct Ended {
    /// The GoAway it sent, if any.
    goaway: Option<GoAway>,
    /// The read error that ended the connection (a reset), if it did not end with EOF.
    error: Option<std::io::ErrorKind>,
    /// Ping answers received.
    pongs: u64,
    /// When the connection ended.
    at: Instant,
}

impl Ended {
    /// Checks the connection ended with a GoAway carrying `code`.
    fn expect_goaway(&self, code: ErrorCode) {
        let ga = self
            .goaway
            .as_ref()
            .unwrap_or_else(|| panic!("closed without a GoAway (wanted {code:?}): {self:?}"));
        assert_eq!(ga.code, code, "GoAway reason code: {ga:?}");
    }
}

/// One side of a session spoken by hand. A reader task decodes everything the other side sends:
/// GoAway and ping answers are recorded in [`Ended`], other frames are handed over on
/// `frames` (dropped if nobody takes them).
struct Raw {
    wr: tokio::io::WriteHalf<BoxIo>,
    frames: mpsc::Receiver<Frame>,
    /// Ping answers received so far.
    pongs: Arc<AtomicU64>,
    end: JoinHandle<Ended>,
}

impl Raw {
    fn start(io: BoxIo, leftover: BytesMut) -> Raw {
        let (rd, wr) = tokio::io::split(io);
        let (tx, frames) = mpsc::channel(1024);
        let pongs = Arc::new(AtomicU64::new(0));
        let end = tokio::spawn(read_frames(rd, leftover, tx, pongs.clone()));
        Raw {
            wr,
            frames,
            pongs,
            end,
        }
    }

    /// Authenticates as an agent with `key` over plain TCP to `addr`.
    async fn agent(addr: SocketAddr, key: &SecretKey) -> Raw {
        Raw::agent_with(addr, key, None).await
    }

    /// As [`Raw::agent`], with a fixed receive buffer (which turns off the kernel's
    /// autotuning), as a peer with a bounded window has.
    async fn agent_with(addr: SocketAddr, key: &SecretKey, rcvbuf: Option<u32>) -> Raw {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        if let Some(size) = rcvbuf {
            sock.set_recv_buffer_size(size).unwrap();
        }
        let tcp = sock.connect(addr).await.unwrap();
        tcp.set_nodelay(true).unwrap();
        let mut io: BoxIo = Box::new(tcp);
        let (_, leftover) = within(
            Duration::from_secs(10),
            "raw agent handshake",
            handshake::client(&mut io, key, Role::Agent, &[0u8; 32], None),
        )
        .await
        .expect("the raw agent's key is accepted");
        Raw::start(io, leftover)
    }

    async fn send_bytes(&mut self, b: &[u8]) -> std::io::Result<()> {
        self.wr.write_all(b).await?;
        self.wr.flush().await
    }

    async fn send(&mut self, frames: &[Frame]) -> std::io::Result<()> {
        self.send_bytes(&encode(frames)).await
    }

    /// The next frame of `kind`, skipping others.
    async fn next(&mut self, kind: Kind) -> Frame {
        within(Duration::from_secs(10), "expected frame arrives", async {
            loop {
                let f = self
                    .frames
                    .recv()
                    .await
                    .unwrap_or_else(|| panic!("connection ended while waiting for {kind:?}"));
                if f.header.kind == kind {
                    return f;
                }
            }
        })
        .await
    }

    fn is_closed(&self) -> bool {
        self.end.is_finished()
    }

    /// Waits for the other side to close the connection.
    async fn closed(self) -> Ended {
        let Raw {
            wr, frames, end, ..
        } = self;
        let ended = within(CLOSE_LIMIT, "the other side closes the connection", end)
            .await
            .expect("reader task did not panic");
        drop((wr, frames));
        ended
    }

    /// Waits for the close and checks it came with a GoAway carrying `code`.
    async fn closed_with(self, code: ErrorCode) -> Ended {
        let ended = self.closed().await;
        ended.expect_goaway(code);
        ended
    }
}

fn encode(frames: &[Frame]) -> BytesMut {
    let mut b = BytesMut::new();
    for f in frames {
        f.encode(&mut b);
    }
    b
}

async fn read_frames(
    mut rd: impl AsyncRead + Unpin,
    mut buf: BytesMut,
    tx: mpsc::Sender<Frame>,
    pongs: Arc<AtomicU64>,
) -> Ended {
    let mut dec = Decoder::new(ABSOLUTE_MAX_PAYLOAD);
    let mut ended = Ended {
        goaway: None,
        error: None,
        pongs: 0,
        at: Instant::now(),
    };
    loop {
        loop {
            let f = match dec.decode(&mut buf) {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => panic!("the other side sent a frame we cannot decode: {e}"),
            };
            match f.header.kind {
                Kind::Ping if f.header.flags & ACK != 0 => {
                    ended.pongs += 1;
                    pongs.fetch_add(1, Ordering::Relaxed);
                }
                Kind::Ping => {}
                Kind::GoAway => {
                    let ga = GoAway::decode(&f.payload).expect("GoAway decodes");
                    assert!(ended.goaway.is_none(), "a second GoAway: {ga:?}");
                    ended.goaway = Some(ga);
                }
                _ => {
                    assert!(
                        ended.goaway.is_none(),
                        "{:?} frame after the GoAway",
                        f.header.kind
                    );
                    let _ = tx.try_send(f);
                }
            }
        }
        buf.reserve(64 * 1024);
        match rd.read_buf(&mut buf).await {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) => {
                ended.error = Some(e.kind());
                break;
            }
        }
    }
    ended.at = Instant::now();
    ended
}

/// A raw frame header, for headers no [`Frame`] can express.
fn raw_header(kind: u8, flags: u8, stream: u32, length: u32) -> Vec<u8> {
    let mut v = Vec::with_capacity(HEADER_LEN);
    v.push(kind);
    v.push(flags);
    v.extend_from_slice(&stream.to_be_bytes());
    v.extend_from_slice(&length.to_be_bytes());
    v
}

// ---------------------------------------------------------------------------------------------
// Fixture: a gateway, an honest agent with an echo forward and traffic through it.

fn grant(name: &str, key: &SecretKey) -> AgentGrant {
    AgentGrant {
        name: name.into(),
        key: KeySpec::Key(key.clone()),
        ports: vec![PortRange::UNPRIVILEGED],
        paths: Vec::new(),
        socket_mode: burrow::config::DEFAULT_SOCKET_MODE,
    }
}

/// Echo round trips through `public` in a loop until stopped, each checked byte for byte.
struct Traffic {
    stop: CancellationToken,
    task: JoinHandle<u64>,
}

impl Traffic {
    fn start(public: SocketAddr, seed: u64) -> Traffic {
        let stop = CancellationToken::new();
        let s = stop.clone();
        let task = tokio::spawn(async move {
            let mut rounds = 0u64;
            while !s.is_cancelled() {
                let data = pattern(64 * 1024, seed + rounds);
                let got = within(
                    Duration::from_secs(20),
                    "honest agent's echo round trip",
                    echo_roundtrip(public, &data),
                )
                .await;
                assert_eq!(got, sha(&data), "honest traffic is byte-exact");
                rounds += 1;
            }
            rounds
        });
        Traffic { stop, task }
    }

    /// Stops after the current round; returns how many rounds ran.
    async fn finish(self) -> u64 {
        self.stop.cancel();
        within(Duration::from_secs(30), "honest traffic stops", self.task)
            .await
            .expect("honest traffic task did not panic")
    }
}

struct Fixture {
    gw: TestGateway,
    stats: Arc<GatewayStats>,
    agent: TestAgent,
    public: SocketAddr,
    /// A second key the gateway accepts, for the raw (misbehaving) agent.
    intruder: SecretKey,
    traffic: Option<Traffic>,
    _dir: tempfile::TempDir,
}

impl Fixture {
    /// A gateway on `transport` accepting the honest agent's key and [`Fixture::intruder`],
    /// with `tune` applied to its config; the honest agent connected and traffic running.
    async fn start(transport: TransportKind, tune: impl FnOnce(&mut GatewayConfig)) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let good = SecretKey::generate();
        let intruder = SecretKey::generate();
        let mut cfg = gateway_config(dir.path());
        cfg.transport = transport;
        cfg.agents = vec![grant("good", &good), grant("intruder", &intruder)];
        tune(&mut cfg);
        let (gw, stats) = start_gateway_with_stats(cfg).await;
        let echo = echo_server().await;
        let mut acfg = agent_config(&gw, vec![forward(0, echo)]);
        acfg.key = good;
        let mut agent = start_agent(acfg);
        let public = granted(&mut agent.status).await[0];
        wait_stats(&stats, Duration::from_secs(5), "honest session up", |s| {
            s.active_sessions == 1
        })
        .await;
        let traffic = Some(Traffic::start(public, 7_000));
        Fixture {
            gw,
            stats,
            agent,
            public,
            intruder,
            traffic,
            _dir: dir,
        }
    }

    async fn tcp() -> Fixture {
        Fixture::start(TransportKind::Tcp, |_| {}).await
    }

    /// Waits until the offending session is gone (only the honest one left) and, when
    /// `violation`, counted as a protocol error.
    async fn session_gone(&self, before: StatsSnapshot, violation: bool) -> StatsSnapshot {
        let after = wait_stats(
            &self.stats,
            Duration::from_secs(5),
            "offending session gone",
            |s| {
                s.active_sessions == 1 && (!violation || s.protocol_errors > before.protocol_errors)
            },
        )
        .await;
        if violation {
            assert_eq!(
                after.protocol_errors,
                before.protocol_errors + 1,
                "exactly one protocol error counted"
            );
        }
        after
    }

    /// The honest agent carried traffic throughout, still does, and never lost its session.
    async fn honest_agent_unaffected(self) {
        let rounds = match self.traffic {
            Some(t) => {
                let rounds = t.finish().await;
                assert!(rounds >= 1, "honest traffic made progress");
                rounds
            }
            None => 0,
        };
        let data = pattern(1 << 20, 7_777);
        assert_eq!(echo_roundtrip(self.public, &data).await, sha(&data));
        let st = self.agent.status.borrow().clone();
        assert!(
            st.connected && st.sessions == 1,
            "honest agent kept its one session: {st:?}"
        );
        assert_eq!(self.stats.snapshot().active_sessions, 1);
        eprintln!(
            "honest agent: {rounds} echo rounds during the test; stats {:?}",
            self.stats.snapshot()
        );
        self.gw.stop.cancel();
        within(Duration::from_secs(15), "gateway stops", self.gw.task)
            .await
            .expect("gateway task did not panic");
    }
}

/// An authenticated raw agent sends `bytes` (then half-closes when `eof`); the gateway must
/// close that session, with a GoAway carrying `expect` when given, count the violation, and the
/// honest agent must not notice.
async fn malformed(bytes: Vec<u8>, eof: bool, expect: Option<ErrorCode>) -> Ended {
    let fx = Fixture::tcp().await;
    let before = fx.stats.snapshot();
    let mut raw = Raw::agent(fx.gw.addr, &fx.intruder).await;
    wait_stats(&fx.stats, Duration::from_secs(5), "raw session up", |s| {
        s.active_sessions == 2
    })
    .await;
    // The gateway may close while we write: only what it answers matters.
    let _ = raw.send_bytes(&bytes).await;
    if eof {
        let _ = raw.wr.shutdown().await;
    }
    let ended = match expect {
        Some(code) => raw.closed_with(code).await,
        None => raw.closed().await,
    };
    eprintln!("gateway ended the raw session: {ended:?}");
    let after = fx.session_gone(before, expect.is_some()).await;
    if expect.is_none() {
        assert_eq!(
            after.protocol_errors, before.protocol_errors,
            "a peer that just left is not a protocol error"
        );
    }
    fx.honest_agent_unaffected().await;
    ended
}

// ---------------------------------------------------------------------------------------------
// A. Malformed frames after a successful handshake.

#[test]
fn a1_unknown_frame_kind_is_a_protocol_error() {
    run("a1", async {
        malformed(raw_header(0x7f, 0, 0, 0), false, Some(ErrorCode::Protocol)).await;
    });
}

#[test]
fn a2_truncated_frame_then_eof_closes_quietly() {
    run("a2", async {
        // A Data header announcing 100 bytes, 10 of them, then EOF.
        let mut bytes = raw_header(Kind::Data as u8, 0, 1, 100);
        bytes.extend_from_slice(&[0xAB; 10]);
        let ended = malformed(bytes, true, None).await;
        // The peer left; nothing to tell it.
        assert!(ended.goaway.is_none(), "{ended:?}");
    });
}

#[test]
fn a3_oversized_frame_header_is_frame_too_large() {
    run("a3", async {
        let max = Limits::default().max_frame;
        // Only the header: the gateway must refuse before waiting for the payload.
        let bytes = raw_header(Kind::Data as u8, 0, 1, max + 1);
        malformed(bytes, false, Some(ErrorCode::FrameTooLarge)).await;
    });
}

#[test]
fn a4_data_on_a_stream_never_opened_is_a_protocol_error() {
    run("a4", async {
        let bytes = encode(&[Frame::new(Kind::Data, 0, 3, Bytes::from_static(b"hello"))]);
        malformed(bytes.to_vec(), false, Some(ErrorCode::Protocol)).await;
    });
}

#[test]
fn a5_session_window_overflow_is_flow_control() {
    run("a5", async {
        let w = Frame::window(0, u32::MAX);
        let bytes = encode(&[w.clone(), w]);
        malformed(bytes.to_vec(), false, Some(ErrorCode::FlowControl)).await;
    });
}

#[test]
fn a6_auth_frame_after_handshake_is_a_protocol_error() {
    run("a6", async {
        let key = SecretKey::generate();
        let auth = Auth {
            role: Role::Agent,
            public_key: key.hash().0,
            signature: key.prove(Role::Agent, &[1; 32], &[0; 32]),
            limits: None,
        };
        let bytes = encode(&[auth.to_frame()]);
        malformed(bytes.to_vec(), false, Some(ErrorCode::Protocol)).await;
    });
}

#[test]
fn a6_challenge_frame_after_handshake_is_a_protocol_error() {
    run("a6c", async {
        let bytes = encode(&[Challenge {
            nonce: [9; 32],
            proxied: false,
        }
        .to_frame()]);
        malformed(bytes.to_vec(), false, Some(ErrorCode::Protocol)).await;
    });
}

#[test]
fn a7_open_with_the_gateways_parity_is_a_protocol_error() {
    run("a7", async {
        let open = Open {
            service: 0,
            client: None,
        };
        let bytes = encode(&[open.to_frame(1)]);
        malformed(bytes.to_vec(), false, Some(ErrorCode::Protocol)).await;
    });
}

/// Binds one service on the raw agent's session and connects a client to its public port;
/// returns the client and the id of the stream the gateway opened for it.
async fn raw_stream(raw: &mut Raw) -> (TcpStream, u32) {
    let bind = Bind {
        service: 0,
        protocol: Protocol::Tcp,
        port: 0,
        name: "raw".into(),
        path: None,
        group: None,
    };
    raw.send(&[bind.to_frame()]).await.unwrap();
    let res = BindResult::decode(&raw.next(Kind::BindResult).await.payload).unwrap();
    assert_eq!(res.code, ErrorCode::Normal, "bind granted: {res:?}");
    let public: SocketAddr = res.text.parse().expect("granted address");
    let client = TcpStream::connect(public).await.unwrap();
    let open = raw.next(Kind::Open).await;
    let info = Open::decode(&open.payload).unwrap();
    assert_eq!(info.service, 0);
    assert_eq!(info.client, Some(client.local_addr().unwrap()));
    (client, open.header.stream)
}

#[test]
fn a12_group_names_from_the_wire_are_checked() {
    run("a12", async {
        let fx = Fixture::tcp().await;
        let mut raw = Raw::agent(fx.gw.addr, &fx.intruder).await;
        // A name the agent's config would not take (too long, or not a name), and a group bind
        // on the honest agent's port, which is in no group: refused, the session goes on.
        let binds = [
            (Some("x".repeat(1000)), 0, "not a group name"),
            (Some("web pool".to_string()), 0, "not a group name"),
            (
                Some("web".to_string()),
                fx.public.port(),
                "outside any group",
            ),
        ];
        for (i, (group, port, says)) in binds.into_iter().enumerate() {
            let bind = Bind {
                service: i as u32,
                protocol: Protocol::Tcp,
                port,
                name: format!("g{i}"),
                path: None,
                group,
            };
            raw.send(&[bind.to_frame()]).await.unwrap();
            let res = BindResult::decode(&raw.next(Kind::BindResult).await.payload).unwrap();
            assert_ne!(res.code, ErrorCode::Normal, "{res:?}");
            assert!(res.text.contains(says), "{says}: {res:?}");
        }
        // A unix socket endpoint in a group: refused too (a group shares a port).
        let bind = Bind {
            service: 9,
            protocol: Protocol::Tcp,
            port: 0,
            name: "u".into(),
            path: Some("/tmp/burrow-a12.sock".into()),
            group: Some("web".into()),
        };
        raw.send(&[bind.to_frame()]).await.unwrap();
        let res = BindResult::decode(&raw.next(Kind::BindResult).await.payload).unwrap();
        assert_eq!(res.code, ErrorCode::PortNotGranted, "{res:?}");
        assert!(res.text.contains("cannot join one"), "{res:?}");
        assert!(!raw.is_closed(), "refusals, not a violation");
        let before = fx.stats.snapshot();
        // Both halves go: the reader task holds the other.
        raw.end.abort();
        drop(raw);
        fx.session_gone(before, false).await;
        fx.honest_agent_unaffected().await;
    });
}

#[test]
fn a8_data_past_the_stream_window_is_flow_control() {
    run("a8", async {
        let fx = Fixture::tcp().await;
        let before = fx.stats.snapshot();
        let mut raw = Raw::agent(fx.gw.addr, &fx.intruder).await;
        // The client never reads, so the gateway can hand on only what socket buffers take.
        let (_client, id) = raw_stream(&mut raw).await;
        let window = u64::from(SessionParams::default().stream_window);
        let chunk = encode(&[Frame::new(
            Kind::Data,
            0,
            id,
            Bytes::from(vec![7u8; 64 * 1024]),
        )]);
        let mut sent = 0u64;
        // Ignore every Window frame: keep sending until the gateway hangs up (64 MiB at most).
        while sent < 64 << 20 && !raw.is_closed() {
            if raw.send_bytes(&chunk).await.is_err() {
                break;
            }
            sent += 64 * 1024;
        }
        let ended = raw.closed_with(ErrorCode::FlowControl).await;
        eprintln!(
            "sent {sent} bytes against a {window}-byte initial window; {:?}",
            ended.goaway
        );
        assert!(sent > window, "the violation needs more than one window");
        fx.session_gone(before, true).await;
        fx.honest_agent_unaffected().await;
    });
}

#[test]
fn a9_wrong_protocol_version_from_a_client() {
    run("a9", async {
        let fx = Fixture::tcp().await;
        let before = fx.stats.snapshot();
        let mut tcp = TcpStream::connect(fx.gw.addr).await.unwrap();
        let mut hello = message::MAGIC.to_vec();
        hello.extend_from_slice(&99u16.to_be_bytes());
        tcp.write_all(&hello).await.unwrap();
        // The gateway speaks first (preamble + challenge), then refuses our preamble.
        let mut got = Vec::new();
        let r = within(CLOSE_LIMIT, "gateway closes", tcp.read_to_end(&mut got)).await;
        eprintln!("version 99: read {} bytes, ended with {r:?}", got.len());
        assert_eq!(&got[..message::PREAMBLE_LEN], &message::preamble()[..]);
        let mut buf = BytesMut::from(&got[message::PREAMBLE_LEN..]);
        let mut dec = Decoder::new(4096);
        let challenge = dec.decode(&mut buf).unwrap().expect("a challenge");
        assert_eq!(challenge.header.kind, Kind::Challenge);
        match dec.decode(&mut buf).unwrap() {
            Some(f) => {
                assert_eq!(f.header.kind, Kind::GoAway);
                let ga = GoAway::decode(&f.payload).unwrap();
                assert_eq!(ga.code, ErrorCode::UnsupportedVersion, "{ga:?}");
                assert!(ga.message.contains("99"), "says which version: {ga:?}");
            }
            None => eprintln!("closed without a GoAway"),
        }
        assert!(buf.is_empty(), "nothing after the GoAway");
        wait_stats(&fx.stats, Duration::from_secs(5), "failure counted", |s| {
            s.handshake_failures == before.handshake_failures + 1
        })
        .await;
        fx.honest_agent_unaffected().await;
    });
}

/// A fake gateway that answers an agent's preamble with version 99 (and a challenge).
async fn version_99_gateway() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut out = message::MAGIC.to_vec();
                out.extend_from_slice(&99u16.to_be_bytes());
                out.extend_from_slice(&encode(&[Challenge {
                    nonce: [3; 32],
                    proxied: false,
                }
                .to_frame()]));
                let _ = s.write_all(&out).await;
                let mut sink = vec![0u8; 1024];
                while let Ok(n) = s.read(&mut sink).await {
                    if n == 0 {
                        break;
                    }
                }
            });
        }
    });
    addr
}

#[test]
fn a9_wrong_protocol_version_from_a_gateway() {
    run("a9g", async {
        let addr = version_99_gateway().await;
        let mut io: BoxIo = Box::new(TcpStream::connect(addr).await.unwrap());
        let err = within(
            Duration::from_secs(5),
            "client handshake",
            handshake::client(&mut io, &SecretKey::generate(), Role::Agent, &[0; 32], None),
        )
        .await
        .expect_err("version 99 is refused");
        let text = err.to_string();
        eprintln!("handshake::client: {text}");
        assert!(text.contains("version") && text.contains("99"), "{text}");
        match err {
            handshake::HandshakeError::Protocol(p) => {
                assert_eq!(p.code, ErrorCode::UnsupportedVersion)
            }
            other => panic!("a protocol error, not {other:?}"),
        }

        // The agent gives up at once: retrying cannot fix a version mismatch.
        let cfg = AgentConfig {
            gateway: addr.to_string(),
            key: SecretKey::generate(),
            trust: Trust::Plain,
            server_name: None,
            extra_gateways: Vec::new(),
            proxy: burrow::transport::ProxyChoice::Direct,
            forwards: vec![],
            private: Default::default(),
            limits: Limits::default(),
            max_backoff: Duration::from_millis(500),
            connect_timeout: burrow::config::DEFAULT_CONNECT_TIMEOUT,
            udp: Default::default(),
            grace: Duration::from_secs(1),
            key_file: None,
            admin: Default::default(),
        };
        let agent = start_agent(cfg);
        let err = within(Duration::from_secs(10), "agent gives up", agent.task)
            .await
            .expect("agent task did not panic")
            .expect_err("version mismatch is fatal")
            .to_string();
        eprintln!("agent: {err}");
        assert!(err.contains("version 99"), "{err}");
    });
}

// ---------------------------------------------------------------------------------------------
// B. Control floods.

/// Frames per write in a flood; the last of each batch is a ping whose answer counts progress.
const BATCH: usize = 1000;

/// Writes `unit` (holding [`BATCH`] frames) over and over until the gateway closes, `max`
/// frames are out or `limit` passes. Returns the frames written.
async fn flood(raw: &mut Raw, unit: &[u8], max: usize, limit: Duration) -> usize {
    let start = Instant::now();
    let mut sent = 0;
    while sent < max && start.elapsed() < limit && !raw.is_closed() {
        if raw.send_bytes(unit).await.is_err() {
            break;
        }
        sent += BATCH;
    }
    sent
}

/// A flood of `frame` on the raw agent's session must end it (counted as a protocol error)
/// before the gateway has handled 200,000 frames, and not before `burst` (budget: 20,000/s
/// after a burst of 40,000). Writes go into socket buffers far faster than the gateway reads,
/// so what counts is how far the gateway got, which the answers to the pings among the flood
/// tell. Returns how the connection ended; the caller checks the GoAway last, so a lost GoAway
/// does not hide the rest.
async fn control_flood(fx: &Fixture, mut raw: Raw, frame: Frame, what: &str, _burst: u64) -> Ended {
    let before = fx.stats.snapshot();
    let pings = frame.header.kind == Kind::Ping;
    let mut frames = vec![frame; BATCH - 1];
    frames.push(Frame::ping(1, false));
    let unit = encode(&frames);
    let start = Instant::now();
    let sent = flood(&mut raw, &unit, 200_000, Duration::from_secs(10)).await;
    // Done flooding: say so, as a well-behaved peer would, and read what the gateway says.
    let _ = raw.wr.shutdown().await;
    let ended = raw.closed().await;
    let handled = if pings {
        ended.pongs
    } else {
        ended.pongs * BATCH as u64
    };
    eprintln!(
        "{what} flood: {sent} frames written, the gateway answered ~{handled} and closed after {:?}: {:?}",
        ended.at - start,
        ended
    );
    assert!(
        handled < 200_000,
        "the session survived {handled} {what} frames"
    );
    // The gateway drops answers still queued when it ends the session (the GoAway goes
    // first), so the pong count cannot show where the cut came; the exact burst allowed is
    // asserted in the mux unit tests. What the peer must learn is why.
    if let Some(ga) = &ended.goaway {
        assert_eq!(ga.code, ErrorCode::LimitExceeded, "{ga:?}");
    }
    fx.session_gone(before, true).await;
    ended
}

#[test]
fn b1_ping_flood_is_cut() {
    run("b1", async {
        let fx = Fixture::tcp().await;
        // A peer whose window is bounded (64 KiB) like any agent's over a real network.
        let raw = Raw::agent_with(fx.gw.addr, &fx.intruder, Some(64 * 1024)).await;
        let ended = control_flood(&fx, raw, Frame::ping(42, false), "ping", 40_000).await;
        fx.honest_agent_unaffected().await;
        ended.expect_goaway(ErrorCode::LimitExceeded);
    });
}

#[test]
fn b2_empty_data_flood_is_cut() {
    run("b2", async {
        let fx = Fixture::tcp().await;
        let mut raw = Raw::agent(fx.gw.addr, &fx.intruder).await;
        let (_client, id) = raw_stream(&mut raw).await;
        let empty = Frame::new(Kind::Data, 0, id, Bytes::new());
        let ended = control_flood(&fx, raw, empty, "empty data", 40_000).await;
        fx.honest_agent_unaffected().await;
        ended.expect_goaway(ErrorCode::LimitExceeded);
    });
}

/// The raw agent opens a stream, resets it (the client sees it closed, its id stays known),
/// then floods frames that `make` builds for that closed stream: the session must be cut
/// (`LimitExceeded`) while the honest agent carries on.
async fn flood_on_a_closed_stream(what: &str, make: impl FnOnce(u32) -> Frame) {
    let fx = Fixture::tcp().await;
    let mut raw = Raw::agent(fx.gw.addr, &fx.intruder).await;
    let (mut client, id) = raw_stream(&mut raw).await;
    raw.send(&[Frame::reset(id, ErrorCode::StreamReset)])
        .await
        .unwrap();
    let r = read_until_closed(&mut client, 0, Duration::from_secs(5)).await;
    eprintln!("client of the reset stream: {r:?}");
    let ended = control_flood(&fx, raw, make(id), what, 40_000).await;
    fx.honest_agent_unaffected().await;
    ended.expect_goaway(ErrorCode::LimitExceeded);
}

#[test]
fn b3_reset_flood_on_a_closed_stream_is_cut() {
    run(
        "b3",
        flood_on_a_closed_stream("reset", |id| Frame::reset(id, ErrorCode::StreamReset)),
    );
}

#[test]
fn b4_duplicate_bind_flood_is_cut() {
    run("b4", async {
        let fx = Fixture::tcp().await;
        let raw = Raw::agent(fx.gw.addr, &fx.intruder).await;
        let bind = Bind {
            service: 0,
            protocol: Protocol::Tcp,
            port: 0,
            name: "same".into(),
            path: None,
            group: None,
        };
        // All at once: cut by the 512 binds allowed to wait, if not by the budget.
        let ended = control_flood(&fx, raw, bind.to_frame(), "duplicate bind", 512).await;
        fx.honest_agent_unaffected().await;
        ended.expect_goaway(ErrorCode::LimitExceeded);
    });
}

#[test]
fn b6_window_update_flood_is_cut() {
    run("b6", async {
        let fx = Fixture::tcp().await;
        let raw = Raw::agent(fx.gw.addr, &fx.intruder).await;
        // One byte of session credit per frame: 200,000 of them stay far from the 2^31 cap, so
        // only the control budget can stop this.
        let ended = control_flood(&fx, raw, Frame::window(0, 1), "window update", 40_000).await;
        fx.honest_agent_unaffected().await;
        ended.expect_goaway(ErrorCode::LimitExceeded);
    });
}

#[test]
fn b7_empty_fin_flood_on_a_closed_stream_is_cut() {
    run(
        "b7",
        flood_on_a_closed_stream("empty FIN on a closed stream", |id| {
            Frame::new(Kind::Data, burrow::proto::frame::FIN, id, Bytes::new())
        }),
    );
}

#[test]
fn b8_one_byte_data_flood_on_a_closed_stream_is_cut() {
    run(
        "b8",
        flood_on_a_closed_stream("1-byte data on a closed stream", |id| {
            Frame::new(Kind::Data, 0, id, Bytes::from_static(b"x"))
        }),
    );
}

#[test]
fn a10_datagram_for_a_flow_never_opened_is_a_protocol_error() {
    run("a10", async {
        // Flow 1, as a UDP flow's datagram would be tagged.
        let dgram = Frame::new(Kind::Datagram, 0, 1, Bytes::from_static(b"udp payload"));
        let bytes = encode(&[dgram]);
        let ended = malformed(bytes.to_vec(), false, Some(ErrorCode::Protocol)).await;
        let ga = ended.goaway.expect("a GoAway");
        assert!(ga.message.contains("datagram"), "{ga:?}");
    });
}

#[test]
fn a11_oversized_datagram_is_a_protocol_error() {
    run("a11", async {
        let big = Frame::new(
            Kind::Datagram,
            0,
            1,
            Bytes::from(vec![0u8; message::MAX_DATAGRAM + 1]),
        );
        let ended = malformed(encode(&[big]).to_vec(), false, Some(ErrorCode::Protocol)).await;
        let ga = ended.goaway.expect("a GoAway");
        assert!(ga.message.contains("datagram"), "{ga:?}");
    });
}

/// An agent that opens streams from its side (which the gateway refuses, one Reset each) and
/// reads nothing: the Resets pile up in the gateway's control queue. Past its cap the session
/// must be cut with `LimitExceeded`, not grow the gateway's memory for as long as it lasts.
#[test]
fn b9_opens_from_a_peer_that_never_reads_are_cut_once_resets_pile_up() {
    run("b9", async {
        // 1,024 streams: the control-queue cap is then its floor of 8,192 frames.
        let fx = Fixture::start(TransportKind::Tcp, |c| c.limits.max_streams = 1024).await;
        let before = fx.stats.snapshot();
        // A small receive buffer, and nothing read until the flood is over: the gateway's
        // Resets can go nowhere but its queue.
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.set_recv_buffer_size(4096).unwrap();
        let tcp = sock.connect(fx.gw.addr).await.unwrap();
        let mut io: BoxIo = Box::new(tcp);
        let (_, leftover) = handshake::client(&mut io, &fx.intruder, Role::Agent, &[0; 32], None)
            .await
            .unwrap();
        wait_stats(&fx.stats, Duration::from_secs(5), "raw session up", |s| {
            s.active_sessions == 2
        })
        .await;
        // 18,000 opens a second, under the 20,000/s control budget, for at most 20 s.
        let open = Open {
            service: 0,
            client: None,
        };
        let start = Instant::now();
        let mut next_id = 2u32;
        let mut sent = 0usize;
        for tick in 0..200u32 {
            let frames: Vec<Frame> = (0..1800)
                .map(|_| {
                    let f = open.to_frame(next_id);
                    next_id += 2;
                    f
                })
                .collect();
            match tokio::time::timeout(Duration::from_secs(2), io.write_all(&encode(&frames))).await
            {
                Ok(Ok(())) => sent += 1800,
                // Closed by the gateway, or it stopped reading: either way, done.
                Ok(Err(_)) | Err(_) => break,
            }
            tokio::time::sleep_until((start + Duration::from_millis(100) * (tick + 1)).into())
                .await;
        }
        let elapsed = start.elapsed();
        let raw = Raw::start(io, leftover);
        let ended = raw.closed().await;
        eprintln!("{sent} opens in {elapsed:?} from a peer that read nothing; {ended:?}");
        // Cut by the gateway (counted as a violation), before our 20 s of flooding ran out.
        // The kernel's socket buffers take a few MB of Resets first (the gateway's send buffer
        // grows whatever ours is), so the cut comes after 10-15 s at this rate.
        fx.session_gone(before, true).await;
        assert!(
            elapsed < Duration::from_secs(19),
            "the session took {elapsed:?} to be cut ({sent} opens refused, none read)"
        );
        // The GoAway is queued behind Resets that a peer that does not read never takes, so
        // it may be lost; if it arrives it must say why.
        if let Some(ga) = &ended.goaway {
            assert_eq!(ga.code, ErrorCode::LimitExceeded, "{ga:?}");
        }
        fx.honest_agent_unaffected().await;
    });
}

/// A peer that keeps the session alive (pings) but never returns flow-control credit while
/// the gateway has data for it: nothing could ever move again. The watchdog closes it once
/// the credit has been gone for twice the heartbeat's dead-peer time.
#[test]
fn b10_a_peer_that_never_returns_credit_is_closed_by_the_watchdog() {
    run("b10", async {
        let fx = Fixture::start(TransportKind::Tcp, |c| {
            c.heartbeat.interval = Duration::from_millis(100);
            c.heartbeat.misses = 3;
            c.limits.session_window = 256 * 1024;
        })
        .await;
        let before = fx.stats.snapshot();
        let mut raw = Raw::agent(fx.gw.addr, &fx.intruder).await;
        let (mut client, _id) = raw_stream(&mut raw).await;
        // More than the session window, so a stream waits for credit that never comes.
        let push = tokio::spawn(async move {
            let data = vec![1u8; 1 << 20];
            let _ = client.write_all(&data).await;
            client
        });
        let start = Instant::now();
        let alive = CancellationToken::new();
        let keepalive = {
            let alive = alive.clone();
            async move {
                let mut n = 0u64;
                while !alive.is_cancelled() && !raw.is_closed() && n < 200 {
                    if raw.send(&[Frame::ping(n, false)]).await.is_err() {
                        break;
                    }
                    n += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                raw
            }
        };
        let raw = keepalive.await;
        let ended = raw.closed().await;
        alive.cancel();
        eprintln!(
            "stalled session closed after {:?}: {ended:?}",
            ended.at - start
        );
        ended.expect_goaway(ErrorCode::Timeout);
        let ga = ended.goaway.as_ref().unwrap();
        assert!(
            ga.message.contains("flow-control credit"),
            "the reason names the stall: {ga:?}"
        );
        // Dead-peer time 300 ms, so the stall limit is 600 ms (checked at each 100 ms tick).
        assert!(
            ended.at - start >= Duration::from_millis(500),
            "closed before the stall limit: {:?}",
            ended.at - start
        );
        drop(push);
        fx.session_gone(before, false).await;
        fx.honest_agent_unaffected().await;
    });
}

/// Bytes a loopback TCP connection absorbs when its reader stops reading: the sender's send
/// buffer (autotuned, up to `tcp_wmem[2]`) plus the receiver's receive buffer. Measured, since
/// it depends on the machine.
async fn loopback_buffer_capacity() -> usize {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let _client = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
    let (mut server, _) = l.accept().await.unwrap();
    server.set_nodelay(true).unwrap();
    // Small writes, like a writer flushing pongs.
    let chunk = vec![0u8; 27_000];
    let mut total = 0;
    while total < 256 << 20 {
        match tokio::time::timeout(Duration::from_millis(300), server.write(&chunk)).await {
            Ok(Ok(n)) => total += n,
            _ => break,
        }
    }
    total
}

#[test]
fn b5_pings_from_a_peer_that_never_reads_are_not_queued_without_bound() {
    run("b5", async {
        let fx = Fixture::tcp().await;
        let before = fx.stats.snapshot();
        let capacity = loopback_buffer_capacity().await;
        // Connect by hand so nothing reads the gateway's answers until we choose to.
        let tcp = TcpStream::connect(fx.gw.addr).await.unwrap();
        let mut io: BoxIo = Box::new(tcp);
        let (_, leftover) = handshake::client(&mut io, &fx.intruder, Role::Agent, &[0; 32], None)
            .await
            .unwrap();
        // 18,000 pings a second, under the 20,000/s budget, reading nothing, until the pongs
        // owed exceed what the kernel can buffer by 4 MiB (at most 60 s).
        let ping_len = HEADER_LEN + 8;
        let target = (capacity + (4 << 20)) / ping_len;
        let unit = encode(&vec![Frame::ping(5, false); 1800]);
        let start = Instant::now();
        let mut sent = 0usize;
        let mut pushed_back = false;
        for tick in 0..600u32 {
            if sent >= target {
                break;
            }
            match tokio::time::timeout(Duration::from_secs(2), io.write_all(&unit)).await {
                Ok(Ok(())) => sent += 1800,
                Ok(Err(_)) => break,
                Err(_) => {
                    // The gateway stopped reading from us: backpressure.
                    pushed_back = true;
                    break;
                }
            }
            tokio::time::sleep_until((start + Duration::from_millis(100) * (tick + 1)).into())
                .await;
        }
        let elapsed = start.elapsed();
        // Now read: every pong the gateway still delivers, it held for us somewhere.
        let raw = Raw::start(io, leftover);
        let mut seen = 0;
        within(Duration::from_secs(30), "pongs stop coming", async {
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                let now = raw.pongs.load(Ordering::Relaxed);
                if now == seen || raw.is_closed() {
                    break;
                }
                seen = now;
            }
        })
        .await;
        let pongs = raw.pongs.load(Ordering::Relaxed) as usize;
        let still_open = !raw.is_closed();
        let mut raw = raw;
        let _ = raw.wr.shutdown().await;
        let ended = raw.closed().await;
        let held = pongs * ping_len;
        eprintln!(
            "{sent} pings ({} KiB) in {elapsed:?} from a peer that did not read \
             (backpressure: {pushed_back}); then {pongs} pongs ({} KiB) delivered; \
             kernel buffers hold {} KiB; session open until we left: {still_open}; {ended:?}",
            sent * ping_len / 1024,
            held / 1024,
            capacity / 1024
        );
        // Whatever the kernel could not hold, the gateway kept in its own memory for a peer
        // that was not reading. Allow it 1 MiB of its own.
        assert!(
            held <= capacity + (1 << 20),
            "the gateway queued ~{} KiB of pongs beyond the kernel's {} KiB for a peer that reads nothing",
            (held - capacity) / 1024,
            capacity / 1024
        );
        fx.session_gone(before, false).await;
        fx.honest_agent_unaffected().await;
    });
}

// ---------------------------------------------------------------------------------------------
// C. Authentication.

fn local(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
}

/// What became of one connection attempt.
#[derive(Debug, PartialEq, Eq)]
enum Attempt {
    /// Closed before the gateway said anything: no preamble, no challenge.
    Cut,
    /// Challenged, then refused with this GoAway.
    Refused(ErrorCode),
}

/// Connects from `from`, and if the gateway speaks (preamble + challenge), answers with a proof
/// made by a key it does not know.
async fn wrong_key_attempt(from: IpAddr, gw: SocketAddr) -> Attempt {
    let tcp = match connect_from(from, gw).await {
        Ok(tcp) => tcp,
        // Dropped so fast that the connect itself saw it.
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Attempt::Cut,
        Err(e) => panic!("connect from {from}: {e}"),
    };
    let mut io: BoxIo = Box::new(tcp);
    match within(
        Duration::from_secs(10),
        "wrong-key handshake",
        handshake::client(&mut io, &SecretKey::generate(), Role::Agent, &[0; 32], None),
    )
    .await
    {
        Ok(_) => panic!("an unknown key was accepted"),
        Err(handshake::HandshakeError::Rejected { code, .. }) => Attempt::Refused(code),
        Err(handshake::HandshakeError::Io(e)) => {
            // handshake::client fails this way only before a whole preamble arrived; check
            // that not even one byte came.
            assert!(
                matches!(
                    e.kind(),
                    std::io::ErrorKind::UnexpectedEof
                        | std::io::ErrorKind::ConnectionReset
                        | std::io::ErrorKind::BrokenPipe
                ),
                "{e}"
            );
            Attempt::Cut
        }
        Err(other) => panic!("unexpected handshake error: {other}"),
    }
}

/// Connects from `from` and reads what the gateway sends first: its preamble and challenge, or
/// nothing at all.
async fn first_bytes(from: IpAddr, gw: SocketAddr) -> Vec<u8> {
    let mut tcp = match connect_from(from, gw).await {
        Ok(tcp) => tcp,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Vec::new(),
        Err(e) => panic!("connect from {from}: {e}"),
    };
    // The client speaks first (the gateway waits for it, to tell a Burrow preamble from a
    // WebSocket upgrade); a refused connection may already be closed.
    let _ = tcp.write_all(&message::preamble()).await;
    let mut got = vec![0u8; 128];
    let mut n = 0;
    within(Duration::from_secs(5), "gateway speaks or closes", async {
        while n < message::PREAMBLE_LEN + HEADER_LEN + 32 {
            match tcp.read(&mut got[n..]).await {
                Ok(0) | Err(_) => break,
                Ok(k) => n += k,
            }
        }
    })
    .await;
    got.truncate(n);
    got
}

#[test]
fn c1_failed_handshakes_rate_limited_per_source_and_key() {
    run("c1", async {
        let fx = Fixture::tcp().await;
        let gw = fx.gw.addr;
        let before = fx.stats.snapshot();

        // 200 sources, 3 failures each (under the budget of 5), 16 at a time.
        let many = async {
            let gate = Arc::new(tokio::sync::Semaphore::new(16));
            let mut set = JoinSet::new();
            for last in 2..=201u8 {
                for _ in 0..3 {
                    let gate = gate.clone();
                    set.spawn(async move {
                        let _p = gate.acquire_owned().await.unwrap();
                        (last, wrong_key_attempt(local(last), gw).await)
                    });
                }
            }
            let mut refused = 0;
            while let Some(r) = set.join_next().await {
                let (last, attempt) = r.unwrap();
                assert_eq!(
                    attempt,
                    Attempt::Refused(ErrorCode::AuthFailed),
                    "127.0.0.{last}, under its budget, is challenged and refused"
                );
                refused += 1;
            }
            refused
        };
        // Meanwhile one source fails over and over.
        let offender = local(222);
        let repeat = async {
            let mut attempts = Vec::new();
            for _ in 0..20 {
                attempts.push(wrong_key_attempt(offender, gw).await);
            }
            attempts
        };
        let (refused, attempts) = tokio::join!(many, repeat);
        assert_eq!(refused, 600);
        let failed = attempts
            .iter()
            .filter(|a| **a == Attempt::Refused(ErrorCode::AuthFailed))
            .count();
        eprintln!("offender: {failed} of 20 attempts refused as a wrong key, then: {attempts:?}");
        // 5 failures are allowed at once; one token may refill (1 per 10 s). After that the
        // offender is still taken through the handshake, and told it is rate-limited (before:
        // cut before any byte, so a failing agent saw only "eof" and retried forever).
        assert!((5..=6).contains(&failed), "offender refused {failed} times");
        assert!(
            attempts[..5]
                .iter()
                .all(|a| *a == Attempt::Refused(ErrorCode::AuthFailed)),
            "the first five are challenged: {attempts:?}"
        );
        assert!(
            attempts[failed..]
                .iter()
                .all(|a| *a == Attempt::Refused(ErrorCode::RateLimited)),
            "then rate-limited, inside the handshake: {attempts:?}"
        );
        let message = wrong_key_message(offender, gw).await;
        assert!(
            message
                .starts_with("rate-limited: too many failed attempts from your address, retry in ")
                && handshake::retry_after(&message).is_some_and(|d| d <= Duration::from_secs(10)),
            "{message}"
        );

        // A key the gateway knows still gets in from the offender's address: failures are
        // counted per address and key.
        let mut io: BoxIo = Box::new(connect_from(offender, gw).await.unwrap());
        let ok = within(
            Duration::from_secs(5),
            "known key from the offender's address",
            handshake::client(&mut io, &fx.intruder, Role::Agent, &[0; 32], None),
        )
        .await
        .expect("a known key is not locked out by another key's failures");
        assert_eq!(ok.0.name, "intruder");
        drop(io);

        // A flood from the offender is cut before TLS once it is far past every budget
        // (100 failed attempts, then one a second).
        let mut flood = 0;
        let mut cut = false;
        while flood < 300 && !cut {
            flood += 1;
            cut = wrong_key_attempt(offender, gw).await == Attempt::Cut;
        }
        eprintln!("offender flood: cut after {flood} more attempts");
        assert!(cut, "a flood of 300 failed attempts is cut before TLS");
        assert!(
            (70..=100).contains(&flood),
            "cut only far past the per-key budget: after {} attempts in all",
            flood + 22
        );
        assert!(
            first_bytes(offender, gw).await.is_empty(),
            "offender gets no preamble"
        );
        // A fresh source still gets a preamble and a challenge.
        let fresh = first_bytes(local(230), gw).await;
        assert_eq!(&fresh[..message::PREAMBLE_LEN], &message::preamble()[..]);
        assert_eq!(fresh[message::PREAMBLE_LEN], Kind::Challenge as u8);

        let after = wait_stats(
            &fx.stats,
            Duration::from_secs(5),
            "the known key's session from the offender's address ended",
            |s| s.active_sessions == 1,
        )
        .await;
        eprintln!("stats before {before:?}\n      after  {after:?}");
        assert!(
            after.rate_limited - before.rate_limited >= (20 - failed + flood) as u64,
            "each rate-limited refusal and cut counted"
        );
        assert!(after.handshake_failures - before.handshake_failures >= 600 + 20);

        fx.honest_agent_unaffected().await;
    });
}

/// A wrong-key attempt from `from` that must be refused; returns the gateway's message.
async fn wrong_key_message(from: IpAddr, gw: SocketAddr) -> String {
    let mut io: BoxIo = Box::new(connect_from(from, gw).await.unwrap());
    match within(
        Duration::from_secs(10),
        "wrong-key handshake",
        handshake::client(&mut io, &SecretKey::generate(), Role::Agent, &[0; 32], None),
    )
    .await
    {
        Err(handshake::HandshakeError::Rejected { message, .. }) => message,
        other => panic!("expected a refusal, got {:?}", other.map(|_| ())),
    }
}

/// Writes our preamble, reads the gateway's preamble and challenge; returns the nonce and
/// whatever was read past it.
async fn read_challenge(io: &mut BoxIo) -> ([u8; 32], BytesMut) {
    io.write_all(&message::preamble()).await.unwrap();
    io.flush().await.unwrap();
    let mut buf = BytesMut::new();
    within(Duration::from_secs(5), "challenge arrives", async {
        while buf.len() < message::PREAMBLE_LEN + HEADER_LEN + 32 {
            assert_ne!(io.read_buf(&mut buf).await.unwrap(), 0, "closed early");
        }
    })
    .await;
    let pre = buf.split_to(message::PREAMBLE_LEN);
    assert_eq!(&pre[..], &message::preamble()[..]);
    let f = Decoder::new(4096).decode(&mut buf).unwrap().unwrap();
    assert_eq!(f.header.kind, Kind::Challenge);
    (Challenge::decode(&f.payload).unwrap().nonce, buf)
}

/// Sends `auth` (raw bytes of an Auth frame) and returns the gateway's answer frame.
async fn answer_to(io: &mut BoxIo, mut buf: BytesMut, auth: &[u8]) -> Frame {
    io.write_all(auth).await.unwrap();
    io.flush().await.unwrap();
    let mut dec = Decoder::new(4096);
    within(Duration::from_secs(5), "gateway answers the proof", async {
        loop {
            if let Some(f) = dec.decode(&mut buf).unwrap() {
                return f;
            }
            assert_ne!(io.read_buf(&mut buf).await.unwrap(), 0, "closed, no answer");
        }
    })
    .await
}

fn auth_bytes(key: &SecretKey, nonce: &[u8; 32], binding: &[u8; 32]) -> BytesMut {
    let auth = Auth {
        role: Role::Agent,
        public_key: key.hash().0,
        signature: key.prove(Role::Agent, nonce, binding),
        limits: None,
    };
    encode(&[auth.to_frame()])
}

fn expect_goaway(f: &Frame, code: ErrorCode) {
    assert_eq!(f.header.kind, Kind::GoAway, "refused with a GoAway");
    let ga = GoAway::decode(&f.payload).unwrap();
    assert_eq!(ga.code, code, "{ga:?}");
}

/// Opens a tunnel connection the way the agent does: TCP, or TLS pinned to the fingerprint.
async fn tunnel(gw: &TestGateway) -> (BoxIo, [u8; 32]) {
    match &gw.fingerprint {
        None => (
            Box::new(TcpStream::connect(gw.addr).await.unwrap()),
            [0; 32],
        ),
        Some(fp) => {
            let trust = Trust::Fingerprint(burrow::tls::parse_fingerprint(fp).unwrap());
            let tls = burrow::tls::client_config(&trust).unwrap();
            let url = burrow::transport::GatewayUrl::parse(&gw.addr.to_string()).unwrap();
            let c = burrow::transport::dial(&url, None, &trust, Some(tls), None)
                .await
                .unwrap();
            (c.io, c.bindings.connection)
        }
    }
}

async fn replayed_proof_is_refused(transport: TransportKind) {
    let fx = Fixture::start(transport, |_| {}).await;
    let before = fx.stats.snapshot();
    let key = fx.intruder.clone();

    // Connection 1: a genuine proof, accepted.
    let (mut io1, binding1) = tunnel(&fx.gw).await;
    let (nonce1, buf1) = read_challenge(&mut io1).await;
    let captured = auth_bytes(&key, &nonce1, &binding1);
    let ok = answer_to(&mut io1, buf1, &captured).await;
    assert_eq!(
        ok.header.kind,
        Kind::AuthOk,
        "the genuine proof is accepted"
    );
    drop(io1);
    wait_stats(&fx.stats, Duration::from_secs(5), "session 1 gone", |s| {
        s.sessions == before.sessions + 1 && s.active_sessions == 1
    })
    .await;

    // Connection 2: the same bytes, replayed.
    let (mut io2, binding2) = tunnel(&fx.gw).await;
    let (nonce2, buf2) = read_challenge(&mut io2).await;
    assert_ne!(nonce1, nonce2, "every connection gets a fresh nonce");
    let answer = answer_to(&mut io2, buf2, &captured).await;
    expect_goaway(&answer, ErrorCode::AuthFailed);
    let mut rest = Vec::new();
    let _ = within(
        CLOSE_LIMIT,
        "closed after refusal",
        io2.read_to_end(&mut rest),
    )
    .await;

    if transport == TransportKind::Tls {
        assert_ne!(binding1, binding2, "the exporter differs per connection");
        // A relay in the middle: this connection's nonce, signed for another TLS session.
        let (mut io3, _) = tunnel(&fx.gw).await;
        let (nonce3, buf3) = read_challenge(&mut io3).await;
        let relayed = auth_bytes(&key, &nonce3, &binding1);
        let answer = answer_to(&mut io3, buf3, &relayed).await;
        expect_goaway(&answer, ErrorCode::AuthFailed);
    }
    let failures = if transport == TransportKind::Tls {
        2
    } else {
        1
    };
    wait_stats(&fx.stats, Duration::from_secs(5), "failures counted", |s| {
        s.handshake_failures == before.handshake_failures + failures
    })
    .await;
    assert_eq!(fx.stats.snapshot().sessions, before.sessions + 1);
    fx.honest_agent_unaffected().await;
}

#[test]
fn c2_replayed_proof_is_refused_tcp() {
    run("c2", replayed_proof_is_refused(TransportKind::Tcp));
}

#[test]
fn c2_replayed_proof_is_refused_tls() {
    run("c2tls", replayed_proof_is_refused(TransportKind::Tls));
}

// ---------------------------------------------------------------------------------------------
// D. Slow handshakes and the pre-authentication limit.

/// Sends `bytes` one per second on `io` until the other side closes; returns when it closed,
/// measured from `start`.
async fn drip(io: impl AsyncRead + AsyncWrite, bytes: Vec<u8>, start: Instant) -> Duration {
    let (mut rd, mut wr) = tokio::io::split(io);
    let reader = async {
        let mut buf = [0u8; 4096];
        while let Ok(n) = rd.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    };
    let writer = async {
        for b in bytes {
            if wr.write_all(&[b]).await.is_err() || wr.flush().await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        std::future::pending::<()>().await;
    };
    within(Duration::from_secs(10), "slow client is cut", async {
        tokio::select! {
            _ = reader => {}
            _ = writer => {}
        }
    })
    .await;
    start.elapsed()
}

#[test]
fn d1_slow_handshake_is_cut_at_the_deadline() {
    run("d1", async {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = gateway_config(dir.path());
        cfg.limits.handshake_timeout = Duration::from_secs(2);
        let (gw, stats) = start_gateway_with_stats(cfg).await;
        let fp = gw.fingerprint.clone().expect("TLS gateway");
        let trust = Trust::Fingerprint(burrow::tls::parse_fingerprint(&fp).unwrap());
        let tls = burrow::tls::client_config(&trust).unwrap();
        let before = stats.snapshot();

        // 1: a TLS ClientHello, one byte per second.
        let mut hello = Vec::new();
        let name = burrow::tls::server_name("127.0.0.1").unwrap();
        rustls::ClientConnection::new(tls.clone(), name)
            .unwrap()
            .write_tls(&mut hello)
            .unwrap();
        let start1 = Instant::now();
        let tcp = connect_from(local(2), gw.addr).await.unwrap();
        let slow_tls = tokio::spawn(drip(tcp, hello, start1));

        // 2: TLS at full speed, then the burrow preamble one byte per second.
        let start2 = Instant::now();
        let tcp = connect_from(local(3), gw.addr).await.unwrap();
        let stream = tokio_rustls::TlsConnector::from(tls)
            .connect(burrow::tls::server_name("127.0.0.1").unwrap(), tcp)
            .await
            .unwrap();
        let slow_preamble = tokio::spawn(drip(stream, message::preamble().to_vec(), start2));

        // Meanwhile a real agent connects and carries traffic.
        let echo = echo_server().await;
        let mut agent = start_agent(agent_config(&gw, vec![forward(0, echo)]));
        let public = granted(&mut agent.status).await[0];
        let data = pattern(64 * 1024, 401);
        assert_eq!(echo_roundtrip(public, &data).await, sha(&data));
        let agent_ready = start1.elapsed();

        let cut1 = slow_tls.await.unwrap();
        let cut2 = slow_preamble.await.unwrap();
        eprintln!("agent ready after {agent_ready:?}; slow ClientHello cut after {cut1:?}, slow preamble after {cut2:?}");
        for cut in [cut1, cut2] {
            assert!(
                cut >= Duration::from_millis(1500) && cut <= Duration::from_millis(4000),
                "cut at the 2 s deadline, not {cut:?}"
            );
        }
        assert!(
            agent_ready < cut1,
            "the agent got in while the slow clients held their connections"
        );
        wait_stats(&stats, Duration::from_secs(5), "timeouts counted", |s| {
            s.handshake_failures == before.handshake_failures + 2
        })
        .await;
        let data = pattern(1 << 20, 402);
        assert_eq!(echo_roundtrip(public, &data).await, sha(&data));
        assert_eq!(agent.status.borrow().sessions, 1);
    });
}

#[test]
fn d2_full_preauth_table_gives_an_idle_slot_to_a_newcomer() {
    run("d2", async {
        let dir = tempfile::tempdir().unwrap();
        let good = SecretKey::generate();
        let late = SecretKey::generate();
        let mut cfg = gateway_config(dir.path());
        cfg.limits.handshake_timeout = Duration::from_secs(2);
        cfg.limits.max_preauth = 4;
        cfg.agents = vec![grant("good", &good), grant("late", &late)];
        let (gw, stats) = start_gateway_with_stats(cfg).await;
        let echo = echo_server().await;
        let mut acfg = agent_config(&gw, vec![forward(0, echo)]);
        acfg.key = good;
        let mut agent = start_agent(acfg);
        let public = granted(&mut agent.status).await[0];
        let traffic = Traffic::start(public, 8_000);
        let before = stats.snapshot();

        // Four idle connections (TLS waits for a ClientHello that never comes) take the four
        // slots; accepts happen in order.
        let mut idle = Vec::new();
        for last in 2..=5u8 {
            idle.push(connect_from(local(last), gw.addr).await.unwrap());
        }
        // A fifth, from another address, takes the slot of the oldest: it is closed at once.
        let t = Instant::now();
        let mut fifth = connect_from(local(6), gw.addr).await.unwrap();
        let r = read_until_closed(&mut idle[0], 0, Duration::from_secs(5)).await;
        let evicted_after = t.elapsed();
        eprintln!(
            "the first idle connection ended {evicted_after:?} after the fifth came, with {r:?}"
        );
        assert!(
            evicted_after < Duration::from_millis(1500),
            "closed at once, not at the handshake deadline ({evicted_after:?})"
        );
        let snap = wait_stats(&stats, Duration::from_secs(2), "eviction counted", |s| {
            s.preauth_evicted == before.preauth_evicted + 1
        })
        .await;
        assert_eq!(snap.preauth_refused, before.preauth_refused, "{snap:?}");
        assert_eq!(
            snap.handshake_failures, before.handshake_failures,
            "giving way is not a failure charged to the source: {snap:?}"
        );

        // Another agent logs in at once while three idle ones and the fifth hold slots.
        let echo2 = echo_server().await;
        let mut lcfg = agent_config(&gw, vec![forward_named(0, echo_target(echo2), "late")]);
        lcfg.key = late;
        let t = Instant::now();
        let mut second = start_agent(lcfg);
        let public2 = granted(&mut second.status).await[0];
        eprintln!("second agent logged in after {:?}", t.elapsed());
        assert_eq!(second.status.borrow().failed_attempts, 0, "first try");
        let data = pattern(256 * 1024, 501);
        assert_eq!(echo_roundtrip(public2, &data).await, sha(&data));

        // The rest end by the deadline (one more gave way to the second agent).
        for (i, s) in idle.iter_mut().enumerate().skip(1) {
            let r = read_until_closed(s, 0, Duration::from_secs(5)).await;
            eprintln!("idle connection {i} ended with {r:?}");
        }
        let _ = read_until_closed(&mut fifth, 0, Duration::from_secs(5)).await;
        assert!(traffic.finish().await >= 1);
        assert_eq!(echo_roundtrip(public, &data).await, sha(&data));
        assert_eq!(agent.status.borrow().sessions, 1);
    });
}

#[test]
fn d3_one_address_holds_at_most_its_share_of_preauth_slots() {
    run("d3", async {
        let fx = Fixture::start(TransportKind::Tls, |c| {
            c.limits.max_preauth = 16;
            c.limits.max_preauth_per_source = 3;
        })
        .await;
        let before = fx.stats.snapshot();
        let mut held = Vec::new();
        for _ in 0..3 {
            held.push(connect_from(local(2), fx.gw.addr).await.unwrap());
        }
        // The fourth from the same address is closed at once, and counted.
        let t = Instant::now();
        let r = match connect_from(local(2), fx.gw.addr).await {
            Ok(mut fourth) => read_until_closed(&mut fourth, 0, Duration::from_secs(5)).await,
            Err(e) => Err(e),
        };
        eprintln!(
            "fourth connection from one address ended after {:?} with {r:?}",
            t.elapsed()
        );
        assert!(t.elapsed() < Duration::from_millis(1500));
        let snap = wait_stats(&fx.stats, Duration::from_secs(2), "refusal counted", |s| {
            s.preauth_source_refused == before.preauth_source_refused + 1
        })
        .await;
        assert_eq!(snap.preauth_evicted, before.preauth_evicted, "{snap:?}");
        // The first three still wait in their handshake; another address gets a slot.
        let mut other = connect_from(local(3), fx.gw.addr).await.unwrap();
        for s in held.iter_mut().chain(std::iter::once(&mut other)) {
            let mut b = [0u8; 1];
            let r = tokio::time::timeout(Duration::from_millis(200), s.read(&mut b)).await;
            assert!(r.is_err(), "still open, waiting for a ClientHello: {r:?}");
        }
        // An IPv4-mapped IPv6 source is the same source as the IPv4 address.
        assert_eq!(
            burrow::limiter::source_of("::ffff:127.0.0.2".parse().unwrap()),
            local(2)
        );
        fx.honest_agent_unaffected().await;
    });
}

fn echo_target(addr: SocketAddr) -> Target {
    Target::Tcp {
        host: addr.ip().to_string(),
        port: addr.port(),
    }
}

// ---------------------------------------------------------------------------------------------
// E. Per-stream checks.

/// A listener that counts the connections it accepts (and holds them open).
async fn counting_listener() -> (SocketAddr, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let c = count.clone();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = l.accept().await {
            c.fetch_add(1, Ordering::SeqCst);
            held.push(s);
        }
    });
    (addr, count)
}

#[test]
fn e1_rogue_gateway_cannot_open_unconfigured_or_refused_services() {
    run("e1", async {
        let rogue = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (t0, t0_count) = counting_listener().await;
        let (t1, t1_count) = counting_listener().await;
        // The address the rogue names in its Opens as the "client": the agent must never dial it.
        let (named, named_count) = counting_listener().await;
        let cfg = AgentConfig {
            gateway: rogue.local_addr().unwrap().to_string(),
            key: SecretKey::generate(),
            trust: Trust::Plain,
            server_name: None,
            extra_gateways: Vec::new(),
            proxy: burrow::transport::ProxyChoice::Direct,
            forwards: vec![
                forward_named(0, echo_target(t0), "granted"),
                forward_named(0, echo_target(t1), "refused"),
            ],
            private: Default::default(),
            limits: Limits::default(),
            max_backoff: Duration::from_millis(500),
            connect_timeout: burrow::config::DEFAULT_CONNECT_TIMEOUT,
            udp: Default::default(),
            grace: Duration::from_secs(1),
            key_file: None,
            admin: Default::default(),
        };
        let mut agent = start_agent(cfg);

        // The rogue side: the library's gateway handshake, then frames by hand.
        let (tcp, _) = within(Duration::from_secs(10), "agent dials", rogue.accept())
            .await
            .unwrap();
        let mut io: BoxIo = Box::new(tcp);
        let acc = handshake::server(&mut io, &[0; 32], |_, _| {
            handshake::Verdict::Accept("victim".into(), SessionParams::default())
        })
        .await
        .unwrap();
        let mut raw = Raw::start(io, acc.leftover);
        for _ in 0..2 {
            let bind = Bind::decode(&raw.next(Kind::Bind).await.payload).unwrap();
            let res = match bind.service {
                0 => BindResult {
                    service: 0,
                    code: ErrorCode::Normal,
                    text: "127.0.0.1:1".into(),
                },
                s => BindResult {
                    service: s,
                    code: ErrorCode::PortNotGranted,
                    text: "no".into(),
                },
            };
            raw.send(&[res.to_frame()]).await.unwrap();
        }
        let st = wait_status(
            &mut agent.status,
            Duration::from_secs(5),
            "agent took the bind results",
            |s| {
                s.forwards
                    .iter()
                    .all(|f| !matches!(f, ForwardStatus::Pending))
            },
        )
        .await;
        eprintln!("agent forwards: {:?}", st.forwards);

        let open = |service| Open {
            service,
            client: Some(named),
        };
        // Never configured, the largest id, and configured but refused by "us".
        raw.send(&[
            open(7).to_frame(1),
            open(u32::MAX).to_frame(3),
            open(1).to_frame(5),
        ])
        .await
        .unwrap();
        let mut resets = Vec::new();
        while resets.len() < 3 {
            let f = raw.next(Kind::Reset).await;
            let code = ErrorCode::from_u32(f.payload_u32().unwrap());
            resets.push((f.header.stream, code));
        }
        resets.sort_by_key(|r| r.0);
        assert_eq!(
            resets,
            vec![
                (1, ErrorCode::TargetNotAllowed),
                (3, ErrorCode::TargetNotAllowed),
                (5, ErrorCode::TargetNotAllowed)
            ]
        );

        // Control: an Open for the granted service does reach its target, so the counters
        // would have seen any connection the refused ones made.
        raw.send(&[open(0).to_frame(7)]).await.unwrap();
        within(Duration::from_secs(5), "granted service connects", async {
            while t0_count.load(Ordering::SeqCst) == 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        assert_eq!(t0_count.load(Ordering::SeqCst), 1);
        assert_eq!(t1_count.load(Ordering::SeqCst), 0, "refused service dialed");
        assert_eq!(
            named_count.load(Ordering::SeqCst),
            0,
            "Open's address dialed"
        );
        let st = agent.status.borrow().clone();
        assert!(st.connected && st.sessions == 1, "session survives: {st:?}");
        assert!(!raw.is_closed());
        agent.stop.cancel();
        let _ = within(Duration::from_secs(10), "agent stops", agent.task).await;
    });
}

#[test]
fn e2_stream_limit_refuses_the_ninth_client() {
    run("e2", async {
        let mut fx = Fixture::start(TransportKind::Tls, |c| c.limits.max_streams = 8).await;
        // The fixture's traffic uses streams too; stop it so the count is ours.
        fx.traffic.take().unwrap().finish().await;
        wait_stats(&fx.stats, Duration::from_secs(30), "traffic idle", |s| {
            s.active_streams == 0
        })
        .await;
        let before = fx.stats.snapshot();

        let mut held = Vec::new();
        for i in 0..8u64 {
            let mut c = TcpStream::connect(fx.public).await.unwrap();
            let msg = pattern(64, 600 + i);
            c.write_all(&msg).await.unwrap();
            let mut back = vec![0u8; 64];
            let r = within(Duration::from_secs(5), "echo", c.read_exact(&mut back)).await;
            if let Err(e) = r {
                panic!(
                    "stream {i} of 8 failed: {e}; gateway stats {:?}",
                    fx.stats.snapshot()
                );
            }
            assert_eq!(back, msg);
            held.push(c);
        }
        let t = Instant::now();
        // The refusal (a reset) can be so quick that it already fails the connect.
        let r = match TcpStream::connect(fx.public).await {
            Ok(mut ninth) => {
                let _ = ninth.write_all(b"hello?").await;
                read_until_closed(&mut ninth, 0, Duration::from_secs(2)).await
            }
            Err(e) => Err(e),
        };
        eprintln!("ninth client ended after {:?} with {r:?}", t.elapsed());
        let snap = wait_stats(&fx.stats, Duration::from_secs(2), "refusal counted", |s| {
            s.streams_refused == before.streams_refused + 1
        })
        .await;
        assert_eq!(snap.active_streams, 8, "{snap:?}");

        // One client leaves; a new one gets through.
        let mut gone = held.pop().unwrap();
        gone.shutdown().await.unwrap();
        let r = read_until_closed(&mut gone, 0, Duration::from_secs(5)).await;
        assert_eq!(r.unwrap(), 0);
        let data = pattern(128 * 1024, 650);
        assert_eq!(echo_roundtrip(fx.public, &data).await, sha(&data));
        for c in &mut held {
            let msg = pattern(64, 660);
            c.write_all(&msg).await.unwrap();
            let mut back = vec![0u8; 64];
            within(Duration::from_secs(5), "held echo", c.read_exact(&mut back))
                .await
                .unwrap();
            assert_eq!(back, msg, "held streams still work");
        }
        drop(held);
        fx.honest_agent_unaffected().await;
    });
}

/// Connects to `public` and echoes 64 bytes: `true` if they came back, `false` if the gateway
/// closed or reset the connection instead.
async fn echoes(public: SocketAddr, seed: u64) -> (bool, Option<TcpStream>) {
    let Ok(mut c) = TcpStream::connect(public).await else {
        return (false, None);
    };
    let msg = pattern(64, seed);
    if c.write_all(&msg).await.is_err() {
        return (false, None);
    }
    let mut back = vec![0u8; 64];
    match tokio::time::timeout(Duration::from_secs(5), c.read_exact(&mut back)).await {
        Ok(Ok(_)) if back == msg => (true, Some(c)),
        Ok(_) => (false, None),
        Err(_) => panic!("neither echoed nor closed within 5 s"),
    }
}

#[test]
fn e3_public_connections_are_capped_per_agent_and_per_gateway() {
    run("e3", async {
        let dir = tempfile::tempdir().unwrap();
        let (ka, kb) = (SecretKey::generate(), SecretKey::generate());
        let mut cfg = gateway_config(dir.path());
        cfg.limits.max_public_conns_per_agent = 3;
        cfg.limits.max_public_conns = 5;
        cfg.agents = vec![grant("a", &ka), grant("b", &kb)];
        let (gw, stats) = start_gateway_with_stats(cfg).await;
        let mut publics = Vec::new();
        let mut agents = Vec::new();
        for key in [ka, kb] {
            let mut acfg = agent_config(&gw, vec![forward(0, echo_server().await)]);
            acfg.key = key;
            let mut agent = start_agent(acfg);
            publics.push(granted(&mut agent.status).await[0]);
            agents.push(agent);
        }
        let (a, b) = (publics[0], publics[1]);
        let before = stats.snapshot();
        let mut held = Vec::new();
        for i in 0..3 {
            let (ok, c) = echoes(a, 700 + i).await;
            assert!(ok, "a's connection {i} of 3");
            held.extend(c);
        }
        // a's fourth: its own cap.
        assert!(!echoes(a, 710).await.0, "a's fourth connection is refused");
        for i in 0..2 {
            let (ok, c) = echoes(b, 720 + i).await;
            assert!(ok, "b's connection {i} of 2");
            held.extend(c);
        }
        // b's third: the gateway's cap of 5.
        assert!(
            !echoes(b, 730).await.0,
            "the gateway's sixth connection is refused"
        );
        let snap = wait_stats(&stats, Duration::from_secs(2), "refusals counted", |s| {
            s.public_refused == before.public_refused + 2
        })
        .await;
        assert_eq!(snap.active_streams, 5, "{snap:?}");
        assert_eq!(snap.streams_refused, before.streams_refused, "{snap:?}");
        // One of a's leaves: b gets the place.
        let mut gone = held.remove(0);
        gone.shutdown().await.unwrap();
        let _ = read_until_closed(&mut gone, 0, Duration::from_secs(5)).await;
        wait_stats(&stats, Duration::from_secs(5), "stream gone", |s| {
            s.active_streams == 4
        })
        .await;
        let (ok, _c) = echoes(b, 740).await;
        assert!(ok, "b gets the freed place");
    });
}

// ---------------------------------------------------------------------------------------------
// F. Fairness.

/// 50 clients, each 100 round trips of 64 bytes, all at once; returns the p99 round trip.
async fn request_response_p99(public: SocketAddr, seed: u64) -> Duration {
    let mut set = JoinSet::new();
    for c in 0..50u64 {
        set.spawn(async move {
            let mut s = TcpStream::connect(public).await.unwrap();
            s.set_nodelay(true).unwrap();
            let mut samples = Vec::with_capacity(100);
            let mut back = [0u8; 64];
            for i in 0..100u64 {
                let msg = pattern(64, seed + c * 1000 + i);
                let t = Instant::now();
                s.write_all(&msg).await.unwrap();
                s.read_exact(&mut back).await.unwrap();
                samples.push(t.elapsed());
                assert_eq!(&back[..], &msg[..], "request/response echo is exact");
            }
            samples
        });
    }
    let mut all = Vec::with_capacity(5000);
    while let Some(r) = set.join_next().await {
        all.extend(r.unwrap());
    }
    all.sort();
    all[all.len() * 99 / 100]
}

#[test]
fn f1_bulk_stream_does_not_starve_request_response_streams() {
    run("f1", async {
        let dir = tempfile::tempdir().unwrap();
        let (gw, stats) = start_gateway_with_stats(gateway_config(dir.path())).await;
        let echo = echo_server().await;
        let mut agent = start_agent(agent_config(&gw, vec![forward(0, echo)]));
        let public = granted(&mut agent.status).await[0];

        // Warm up, then measure idle.
        request_response_p99(public, 1).await;
        let idle = request_response_p99(public, 100_000).await;

        // Bulk echo: writes a 1 MiB block over and over until told to stop (512 MiB at most)
        // and checks every byte that comes back.
        let stop = CancellationToken::new();
        let moved = Arc::new(AtomicUsize::new(0));
        let block = Bytes::from(pattern(1 << 20, 900));
        let bulk = {
            let stop = stop.clone();
            let moved = moved.clone();
            tokio::spawn(async move {
                let s = TcpStream::connect(public).await.unwrap();
                let (mut r, mut w) = s.into_split();
                let out = block.clone();
                let writer = tokio::spawn(async move {
                    let mut blocks = 0usize;
                    while !stop.is_cancelled() && blocks < 512 {
                        w.write_all(&out).await.unwrap();
                        blocks += 1;
                    }
                    w.shutdown().await.unwrap();
                    blocks
                });
                let mut buf = vec![0u8; 256 * 1024];
                let mut total = 0usize;
                loop {
                    let n = r.read(&mut buf).await.unwrap();
                    if n == 0 {
                        break;
                    }
                    let mut done = 0;
                    while done < n {
                        let at = (total + done) % block.len();
                        let k = (n - done).min(block.len() - at);
                        assert!(
                            buf[done..done + k] == block[at..at + k],
                            "bulk echo differs at byte {}",
                            total + done
                        );
                        done += k;
                    }
                    total += n;
                    moved.fetch_add(n, Ordering::Relaxed);
                }
                let blocks = writer.await.unwrap();
                assert_eq!(total, blocks * block.len(), "bulk echo is complete");
                blocks
            })
        };
        within(Duration::from_secs(30), "bulk flowing", async {
            while moved.load(Ordering::Relaxed) < 8 << 20 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        let at_start = moved.load(Ordering::Relaxed);
        let loaded = request_response_p99(public, 200_000).await;
        let during = moved.load(Ordering::Relaxed) - at_start;
        stop.cancel();
        let chunks = within(Duration::from_secs(60), "bulk drains", bulk)
            .await
            .unwrap();
        // Generous: the machine is shared; starvation would show as seconds, not milliseconds.
        let bound = (idle * 20).max(Duration::from_millis(250));
        eprintln!(
            "p99 round trip idle {idle:?}, with bulk {loaded:?} (bound {bound:?}); bulk moved {} MiB during the measurement, {} MiB in all",
            during >> 20,
            chunks
        );
        assert!(during > 0, "bulk kept flowing during the measurement");
        assert!(
            loaded < bound,
            "loaded p99 {loaded:?} over {bound:?} (idle p99 {idle:?})"
        );
        assert_eq!(stats.snapshot().active_sessions, 1);
    });
}
