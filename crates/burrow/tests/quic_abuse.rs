//! Abuse over QUIC: a hostile client speaks QUIC to the gateway with quinn directly and meets
//! Burrow's limits as QUIC's own (issue 13): the handshake deadline, the pre-auth table, one
//! stream before the key proof, and `max_streams` once authenticated.
//!
//! The raw client pins the gateway's fingerprint with Burrow's own TLS settings (the attacker
//! is the client: what it trusts does not matter), and comes from its own loopback addresses
//! (127.0.0.2 and up) so that the per-source limits see distinct sources.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use burrow::config::{AgentConfig, Forward, GatewayConfig, Trust};
use burrow::gateway::Gateway;
use burrow::proto::message::{self, Role, SessionParams};
use burrow::session::handshake;
use burrow::stats::GatewayStats;
use burrow::transport::{self, GatewayUrl};
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

/// An in-process gateway serving QUIC beside its tunnel port.
struct QuicGateway {
    /// The gateway as the other in-process tests know it (its tunnel port, key, stop).
    base: TestGateway,
    /// QUIC on UDP.
    quic: SocketAddr,
    trust: Trust,
    stats: Arc<GatewayStats>,
    report: Arc<dyn burrow::admin::Report>,
}

impl Drop for QuicGateway {
    fn drop(&mut self) {
        self.base.stop.cancel();
    }
}

impl QuicGateway {
    async fn start(cfg: GatewayConfig) -> QuicGateway {
        let state = cfg.state_dir.clone();
        let gw = Gateway::bind(cfg).await.expect("gateway binds");
        let quic = gw.quic_local_addr().expect("the gateway serves QUIC");
        let fingerprint = gw.fingerprint().expect("a TLS gateway");
        let trust = Trust::Fingerprint(burrow::tls::parse_fingerprint(&fingerprint).unwrap());
        let (key, _) = burrow::state::load_or_create_agent_key(&state).unwrap();
        let (stats, report, addr) = (gw.stats(), gw.report(), gw.local_addr());
        let stop = CancellationToken::new();
        let s = stop.clone();
        let task = tokio::spawn(async move { gw.run(s).await.expect("gateway runs") });
        QuicGateway {
            base: TestGateway {
                addr,
                ws: None,
                fingerprint: Some(fingerprint),
                key,
                command: None,
                stop,
                task,
            },
            quic,
            trust,
            stats,
            report,
        }
    }

    /// An agent config for this gateway over `scheme` (`quic` or `tls`).
    fn agent(&self, scheme: &str, forwards: Vec<Forward>) -> AgentConfig {
        let port = match scheme {
            "quic" => self.quic.port(),
            _ => self.base.addr.port(),
        };
        let mut cfg = agent_config(&self.base, forwards);
        cfg.gateway = format!("{scheme}://127.0.0.1:{port}");
        cfg
    }

    /// The value of `burrow_auth_failures{reason=...}` in the gateway's metrics.
    fn auth_failures(&self, reason: &str) -> u64 {
        let text = self.report.metrics();
        let want = format!("reason=\"{reason}\"");
        text.lines()
            .find(|l| l.starts_with("burrow_auth_failures") && l.contains(&want))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no burrow_auth_failures for {reason} in:\n{text}"))
    }

    /// The gateway's recent errors, as the status shows them.
    fn recent_errors(&self) -> String {
        serde_json::to_string(&self.report.status().recent_errors).unwrap()
    }
}

fn config(dir: &std::path::Path, tune: impl FnOnce(&mut GatewayConfig)) -> GatewayConfig {
    let mut cfg = gateway_config(dir);
    tune(&mut cfg);
    cfg
}

/// 127.0.0.`last`.
fn local(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
}

/// A raw QUIC client endpoint on `from`, with the gateway's fingerprint pinned.
fn raw_endpoint(from: IpAddr, trust: &Trust) -> quinn::Endpoint {
    let tls = burrow::tls::client_config(trust).unwrap();
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    let mut t = quinn::TransportConfig::default();
    t.max_idle_timeout(Some(Duration::from_secs(30).try_into().unwrap()));
    config.transport_config(Arc::new(t));
    let mut ep = quinn::Endpoint::client(SocketAddr::new(from, 0)).unwrap();
    ep.set_default_client_config(config);
    ep
}

/// Completes the QUIC handshake with the gateway (no stream, no key proof).
async fn raw_connect(ep: &quinn::Endpoint, gw: SocketAddr) -> Result<quinn::Connection, String> {
    ep.connect(gw, "127.0.0.1")
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| e.to_string())
}

/// Opens the control stream and sends Burrow's preamble, then reads the gateway's first bytes
/// (its preamble and challenge): the gateway is waiting for the key proof, which never comes.
async fn start_handshake(conn: &quinn::Connection) -> (quinn::SendStream, quinn::RecvStream) {
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&message::preamble()).await.unwrap();
    let mut first = [0u8; 1];
    within(
        Duration::from_secs(5),
        "the gateway answers the preamble",
        recv.read_exact(&mut first),
    )
    .await
    .expect("the gateway's first bytes");
    (send, recv)
}

/// Resident memory of this process, in bytes.
fn rss() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: usize = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .expect("VmRSS in /proc/self/status");
    kb * 1024
}

// ---------------------------------------------------------------------------------------------
// 1. The handshake deadline.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quic_client_that_never_sends_its_key_proof_is_closed_at_the_handshake_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let deadline = Duration::from_secs(1);
    let gw = QuicGateway::start(config(dir.path(), |c| {
        c.limits.handshake_timeout = deadline
    }))
    .await;
    let before = gw.stats.snapshot();
    let ep = raw_endpoint(local(2), &gw.trust);
    let started = Instant::now();
    let conn = raw_connect(&ep, gw.quic).await.unwrap();
    let _control = start_handshake(&conn).await;
    let why = within(Duration::from_secs(5), "the gateway closes", conn.closed()).await;
    let after = started.elapsed();
    eprintln!("closed {after:?} after connecting ({why})");
    assert!(
        after >= deadline - Duration::from_millis(200) && after <= deadline * 2,
        "closed at the {deadline:?} handshake deadline, not after {after:?}"
    );
    // The operator sees why: the counter, the metrics' reason and the recent errors.
    let snap = wait_stats(&gw.stats, Duration::from_secs(2), "timeout counted", |s| {
        s.handshake_failures == before.handshake_failures + 1
    })
    .await;
    assert_eq!(snap.sessions, before.sessions, "no session came of it");
    assert_eq!(gw.auth_failures("timeout"), 1);
    let errors = gw.recent_errors();
    assert!(
        errors.contains("QUIC handshake timed out"),
        "the recent errors name the timeout: {errors}"
    );
}

// ---------------------------------------------------------------------------------------------
// 2. The pre-auth table.

/// Connections of the flood: it holds the QUIC connections the gateway let in and counts the
/// ones it refused or closed.
#[derive(Default)]
struct Flood {
    held: std::sync::Mutex<Vec<quinn::Connection>>,
    refused: AtomicUsize,
}

impl Flood {
    /// Connections the gateway has closed (evicted) among those it let in.
    fn closed(&self) -> usize {
        let held = self.held.lock().unwrap();
        held.iter().filter(|c| c.close_reason().is_some()).count()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quic_preauth_flood_does_not_lock_out_a_quic_agent() {
    const MAX_PREAUTH: u32 = 16;
    const SOURCES: u8 = 4;
    const FLOOD: usize = MAX_PREAUTH as usize + 20;
    const MORE: usize = 40;
    let dir = tempfile::tempdir().unwrap();
    // The default handshake deadline (10 s): slots freed at the deadline would come too late
    // for the agent's login bound below.
    let gw = QuicGateway::start(config(dir.path(), |c| {
        c.limits.max_preauth = MAX_PREAUTH;
        c.limits.max_preauth_per_source = 8;
    }))
    .await;
    let before = gw.stats.snapshot();
    let eps: Vec<_> = (0..SOURCES)
        .map(|i| raw_endpoint(local(2 + i), &gw.trust))
        .collect();
    let flood = Arc::new(Flood::default());
    let connect = {
        let (eps, flood, addr) = (eps.clone(), flood.clone(), gw.quic);
        move |i: usize| {
            let (ep, flood) = (eps[i % eps.len()].clone(), flood.clone());
            async move {
                match raw_connect(&ep, addr).await {
                    Ok(c) => flood.held.lock().unwrap().push(c),
                    Err(_) => {
                        flood.refused.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
    };
    // The pre-auth limit + 20 connections that complete QUIC's handshake and then say
    // nothing, from 4 sources at once.
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..FLOOD {
        tasks.spawn(connect(i));
    }
    while tasks.join_next().await.is_some() {}
    eprintln!(
        "flood of {FLOOD} in {:?}: {} let in, {} refused",
        started.elapsed(),
        flood.held.lock().unwrap().len(),
        flood.refused.load(Ordering::Relaxed)
    );
    // The flood goes on while the agent logs in (bounded: MORE connections, one every 25 ms).
    let more = {
        let connect = connect.clone();
        tokio::spawn(async move {
            for i in 0..MORE {
                connect(i).await;
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        })
    };
    let echo = echo_server().await;
    let login = Instant::now();
    let mut agent = start_agent(gw.agent("quic", vec![forward(0, echo)]));
    let public = within(
        Duration::from_secs(5),
        "the QUIC agent logs in under the flood",
        granted(&mut agent.status),
    )
    .await[0];
    let took = login.elapsed();
    let data = pattern(256 * 1024, 21);
    assert_eq!(echo_roundtrip(public, &data).await, sha(&data));
    more.await.unwrap();
    let snap = gw.stats.snapshot();
    let (evicted, refused) = (
        snap.preauth_evicted - before.preauth_evicted,
        snap.preauth_refused - before.preauth_refused,
    );
    eprintln!(
        "the agent logged in {took:?} after starting; the gateway evicted {evicted} and refused \
         {refused} of {} flood connections, {} closed at the client",
        FLOOD + MORE,
        flood.closed() + flood.refused.load(Ordering::Relaxed)
    );
    assert!(
        took < Duration::from_secs(3),
        "logged in promptly, not in {took:?}"
    );
    // The QUIC connections are in the tunnel port's pre-auth table: past its 16 slots they
    // were evicted (they had sent nothing) or refused.
    assert!(
        evicted + refused >= (FLOOD + MORE) as u64 - u64::from(MAX_PREAUTH),
        "the flood's connections are counted in the pre-auth table: {evicted} evicted, \
         {refused} refused"
    );
    assert!(
        evicted >= 1,
        "idle connections make room: {evicted} evicted"
    );
    assert_eq!(
        snap.sessions,
        before.sessions + 1,
        "only the agent got a session"
    );
}

// ---------------------------------------------------------------------------------------------
// 3. Before the key proof, only the control stream.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn before_its_key_proof_a_quic_client_gets_one_stream_and_no_datagram_through() {
    const DATAGRAMS: usize = 20_000;
    let dir = tempfile::tempdir().unwrap();
    let deadline = Duration::from_secs(3);
    let gw = QuicGateway::start(config(dir.path(), |c| {
        c.limits.handshake_timeout = deadline
    }))
    .await;
    let ep = raw_endpoint(local(2), &gw.trust);
    let started = Instant::now();
    let conn = raw_connect(&ep, gw.quic).await.unwrap();
    let _control = start_handshake(&conn).await;

    // A second bidirectional stream and any unidirectional one: QUIC's stream limit (1 and
    // 0 before the key proof) keeps the opener waiting.
    let c = conn.clone();
    let second_bi = tokio::spawn(async move { c.open_bi().await.map(|_| ()) });
    let c = conn.clone();
    let uni = tokio::spawn(async move { c.open_uni().await.map(|_| ()) });

    // Datagrams: some 24 MB of them, which the gateway neither answers nor keeps beyond
    // its bounded queue.
    let size = conn
        .max_datagram_size()
        .expect("the gateway takes datagrams")
        .min(1200);
    let rss_before = rss();
    let payload = bytes::Bytes::from(vec![0x5a; size]);
    let mut sent = 0;
    let flood_until = Instant::now() + Duration::from_millis(1500);
    while sent < DATAGRAMS && Instant::now() < flood_until {
        if conn.send_datagram_wait(payload.clone()).await.is_err() {
            break;
        }
        sent += 1;
    }
    let answered = tokio::time::timeout(Duration::from_millis(200), conn.read_datagram()).await;
    let grown = rss().saturating_sub(rss_before);
    eprintln!(
        "{sent} datagrams of {size} bytes ({} MB) sent before authenticating in {:?}; \
         resident memory grew {} KiB",
        sent * size / 1_000_000,
        started.elapsed(),
        grown / 1024
    );
    assert!(
        answered.is_err(),
        "no datagram comes back before the key proof"
    );
    assert!(
        sent * size >= 8 << 20,
        "the flood was on: {sent} datagrams in 1.5 s"
    );
    assert!(
        grown < 8 << 20,
        "the gateway holds at most its datagram queue of the flood, not {} KiB more",
        grown / 1024
    );
    assert!(
        !second_bi.is_finished() && !uni.is_finished(),
        "no stream beside the control stream opens before the key proof"
    );

    // The connection ends at the handshake deadline; the waiting openers with it.
    within(Duration::from_secs(5), "the gateway closes", conn.closed()).await;
    let after = started.elapsed();
    assert!(
        after <= deadline + Duration::from_secs(1),
        "closed at the {deadline:?} deadline, not after {after:?}"
    );
    assert!(
        second_bi.await.unwrap().is_err(),
        "the second stream never opened"
    );
    assert!(
        uni.await.unwrap().is_err(),
        "the unidirectional stream never opened"
    );
    assert_eq!(gw.auth_failures("timeout"), 1);
}

// ---------------------------------------------------------------------------------------------
// 4. max_streams once authenticated.

/// An authenticated raw agent: Burrow's QUIC dial and key proof, then nothing of the session
/// code; the caller drives the connection by hand.
async fn raw_agent(gw: &QuicGateway) -> (quinn::Connection, transport::Connected) {
    let url = GatewayUrl::parse(&format!("quic://127.0.0.1:{}", gw.quic.port())).unwrap();
    let tls = burrow::tls::client_config(&gw.trust).unwrap();
    let mut c = transport::quic::dial(&url, tls, "127.0.0.1", &gw.trust, &SessionParams::default())
        .await
        .unwrap();
    handshake::client_bound(&mut c.io, &gw.base.key, Role::Agent, &c.bindings, None)
        .await
        .expect("the key proof checks out");
    let conn = c.quic.as_ref().expect("over QUIC").conn.clone();
    (conn, c)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_authenticated_quic_peer_cannot_open_more_than_max_streams() {
    const MAX_STREAMS: u32 = 8;
    const TRY: usize = MAX_STREAMS as usize + 8;
    let dir = tempfile::tempdir().unwrap();
    let gw = QuicGateway::start(config(dir.path(), |c| c.limits.max_streams = MAX_STREAMS)).await;
    let (conn, _control) = raw_agent(&gw).await;
    // Each stream sends one byte (not yet a whole Open frame), so the gateway holds it open.
    let opened = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..TRY {
        let (conn, opened) = (conn.clone(), opened.clone());
        tasks.push(tokio::spawn(async move {
            let (mut send, recv) = conn.open_bi().await?;
            opened.fetch_add(1, Ordering::Relaxed);
            let _ = send.write_all(&[0]).await;
            conn.closed().await;
            drop((send, recv));
            Ok::<_, quinn::ConnectionError>(())
        }));
    }
    // The control stream is one of the max_streams.
    let allowed = MAX_STREAMS as usize - 1;
    let t = Instant::now();
    while opened.load(Ordering::Relaxed) < allowed && t.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        opened.load(Ordering::Relaxed),
        allowed,
        "the streams up to the limit open at once"
    );
    // The rest stay waiting for credit the gateway does not give.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let n = opened.load(Ordering::Relaxed);
    eprintln!("{n} of {TRY} streams opened beside the control stream (max_streams {MAX_STREAMS})");
    assert_eq!(
        n, allowed,
        "no more than max_streams ({MAX_STREAMS}, the control stream included) open at once"
    );
    assert!(conn.close_reason().is_none(), "the session is still up");
    assert_eq!(gw.stats.snapshot().protocol_errors, 0);
    conn.close(0u32.into(), b"done");
    for t in tasks {
        let _ = t.await;
    }
}

/// Opens `n` public connections at once to `public` (an echo service); each sends a byte.
/// Returns how many echoed it (held open) and how many were refused (closed or reset).
async fn public_clients(public: SocketAddr, n: usize) -> (Vec<TcpStream>, usize) {
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..n {
        tasks.spawn(async move {
            // A reset can come before the connect completes, or before the write.
            let Ok(mut s) = TcpStream::connect(public).await else {
                return Some(None);
            };
            if s.write_all(b"x").await.is_err() {
                return Some(None);
            }
            let mut b = [0u8; 1];
            match tokio::time::timeout(Duration::from_secs(3), s.read(&mut b)).await {
                Ok(Ok(1)) => Some(Some(s)),
                Ok(_) => Some(None),
                Err(_) => None,
            }
        });
    }
    let (mut held, mut refused) = (Vec::new(), 0);
    while let Some(r) = tasks.join_next().await {
        match r.unwrap() {
            Some(Some(s)) => held.push(s),
            Some(None) => refused += 1,
            None => panic!("a public connection neither echoed nor was refused within 3 s"),
        }
    }
    (held, refused)
}

/// An agent with `max_streams` over `scheme`; `max_streams` + 4 public connections at once:
/// `max_streams` are relayed, the rest refused at once, and a slot freed is taken again.
async fn public_connections_past_max_streams(scheme: &str) {
    const MAX_STREAMS: u32 = 4;
    const EXTRA: usize = 4;
    let dir = tempfile::tempdir().unwrap();
    let gw = QuicGateway::start(config(dir.path(), |c| c.limits.max_streams = MAX_STREAMS)).await;
    let echo = echo_server().await;
    let mut cfg = gw.agent(scheme, vec![forward(0, echo)]);
    cfg.limits.max_streams = MAX_STREAMS;
    let mut agent = start_agent(cfg);
    let public = granted(&mut agent.status).await[0];
    let before = gw.stats.snapshot();
    let (mut held, refused) = public_clients(public, MAX_STREAMS as usize + EXTRA).await;
    eprintln!(
        "{scheme}: {} of {} public connections relayed, {refused} refused (max_streams {MAX_STREAMS})",
        held.len(),
        MAX_STREAMS as usize + EXTRA
    );
    assert_eq!(
        held.len(),
        MAX_STREAMS as usize,
        "max_streams relayed at once"
    );
    assert_eq!(refused, EXTRA, "the rest refused");
    let snap = gw.stats.snapshot();
    assert_eq!(snap.streams_refused - before.streams_refused, EXTRA as u64);
    // One relayed connection ends: its slot serves a newcomer.
    drop(held.pop());
    wait_stats(&gw.stats, Duration::from_secs(5), "the stream ended", |s| {
        s.active_streams == u64::from(MAX_STREAMS) - 1
    })
    .await;
    let (again, refused) = public_clients(public, 1).await;
    assert_eq!((again.len(), refused), (1, 0), "the freed slot is taken");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_connections_past_max_streams_over_quic_are_refused_as_over_tls() {
    public_connections_past_max_streams("quic").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_connections_past_max_streams_over_tls() {
    public_connections_past_max_streams("tls").await;
}
