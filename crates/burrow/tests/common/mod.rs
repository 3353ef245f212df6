//! Test harness: a gateway and agents on 127.0.0.1:0, targets, and helpers that wait on
//! events (never on fixed sleeps).
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use burrow::agent::{Agent, AgentStatus, ForwardStatus};
use burrow::config::{AgentConfig, Forward, GatewayConfig, Limits, Target, Trust};
use burrow::gateway::Gateway;
use burrow::proto::auth::SecretKey;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A running gateway.
pub struct TestGateway {
    pub addr: SocketAddr,
    /// The `ws_listen` listener's address, if configured.
    pub ws: Option<SocketAddr>,
    pub fingerprint: Option<String>,
    pub key: SecretKey,
    pub command: Option<String>,
    pub stop: CancellationToken,
    pub task: JoinHandle<()>,
}

pub fn gateway_config(state: &Path) -> GatewayConfig {
    let mut cfg = GatewayConfig::new(state.to_path_buf());
    cfg.listen = "127.0.0.1:0".parse().unwrap();
    cfg.public_host = "127.0.0.1".parse().unwrap();
    cfg.grace = Duration::from_secs(2);
    cfg
}

pub async fn start_gateway(cfg: GatewayConfig) -> TestGateway {
    start_gateway_with_stats(cfg).await.0
}

pub fn agent_config(gw: &TestGateway, forwards: Vec<Forward>) -> AgentConfig {
    let trust = match &gw.fingerprint {
        Some(fp) => Trust::Fingerprint(burrow::tls::parse_fingerprint(fp).unwrap()),
        None => Trust::Plain,
    };
    AgentConfig {
        gateway: gw.addr.to_string(),
        key: gw.key.clone(),
        trust,
        server_name: None,
        extra_gateways: Vec::new(),
        proxy: burrow::transport::ProxyChoice::Direct,
        forwards,
        private: Default::default(),
        limits: Limits::default(),
        max_backoff: Duration::from_millis(500),
        connect_timeout: burrow::config::DEFAULT_CONNECT_TIMEOUT,
        udp: Default::default(),
        grace: Duration::from_secs(2),
        key_file: None,
        admin: Default::default(),
    }
}

pub fn forward(public_port: u16, target: SocketAddr) -> Forward {
    Forward {
        protocol: burrow::config::Protocol::Tcp,
        public_port,
        target: Target::Tcp {
            host: target.ip().to_string(),
            port: target.port(),
        },
        name: format!("fwd-{}", target.port()),
        proxy_protocol: None,
        public_path: None,
        group: None,
    }
}

/// A running agent.
pub struct TestAgent {
    pub status: watch::Receiver<AgentStatus>,
    pub stop: CancellationToken,
    pub task: JoinHandle<Result<(), burrow::agent::AgentError>>,
}

pub fn start_agent(cfg: AgentConfig) -> TestAgent {
    let agent = Agent::new(cfg);
    let status = agent.status();
    let stop = CancellationToken::new();
    let s = stop.clone();
    let task = tokio::spawn(agent.run(s));
    TestAgent { status, stop, task }
}

/// Waits until every forward has an answer; returns the granted addresses (or panics with
/// the refusal).
pub async fn granted(status: &mut watch::Receiver<AgentStatus>) -> Vec<SocketAddr> {
    let st = tokio::time::timeout(
        Duration::from_secs(20),
        status.wait_for(|s| {
            s.connected
                && s.forwards
                    .iter()
                    .all(|f| !matches!(f, ForwardStatus::Pending))
        }),
    )
    .await
    .expect("agent got answers for its forwards in time")
    .expect("agent alive")
    .clone();
    st.forwards
        .iter()
        .map(|f| match f {
            ForwardStatus::Granted(a) => a.parse().expect("granted address parses"),
            other => panic!("forward not granted: {other:?}"),
        })
        .collect()
}

/// An echo server; returns its address.
pub async fn echo_server() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

/// Deterministic pseudo-random bytes.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

pub fn sha(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

/// Sends `data` through `addr` (an echo service) and returns the sha256 of what came back,
/// writing and reading concurrently and half-closing after the write.
pub async fn echo_roundtrip(addr: SocketAddr, data: &[u8]) -> [u8; 32] {
    let s = TcpStream::connect(addr).await.unwrap();
    let (mut r, mut w) = s.into_split();
    let data = data.to_vec();
    let len = data.len();
    let writer = tokio::spawn(async move {
        w.write_all(&data).await.unwrap();
        w.shutdown().await.unwrap();
    });
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0;
    loop {
        let n = r.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        total += n;
    }
    writer.await.unwrap();
    assert_eq!(total, len, "echoed length");
    hasher.finalize().into()
}

// ---------------------------------------------------------------------------------------------
// Helpers for streams.rs and faults.rs.

/// Runs `f`, failing the test with `what` if it takes longer than `limit`.
pub async fn within<T>(limit: Duration, what: &str, f: impl std::future::Future<Output = T>) -> T {
    match tokio::time::timeout(limit, f).await {
        Ok(v) => v,
        Err(_) => panic!("{what}: not done within {limit:?}"),
    }
}

/// Waits until the agent is connected and every forward has an answer (granted or refused);
/// returns the answers in configuration order.
pub async fn answers(status: &mut watch::Receiver<AgentStatus>) -> Vec<ForwardStatus> {
    within(
        Duration::from_secs(20),
        "agent got answers for its forwards",
        status.wait_for(|s| {
            s.connected
                && s.forwards
                    .iter()
                    .all(|f| !matches!(f, ForwardStatus::Pending))
        }),
    )
    .await
    .expect("agent alive")
    .forwards
    .clone()
}

/// Waits (bounded) until the agent's status satisfies `pred`; returns that status.
pub async fn wait_status(
    status: &mut watch::Receiver<AgentStatus>,
    limit: Duration,
    what: &str,
    pred: impl FnMut(&AgentStatus) -> bool,
) -> AgentStatus {
    within(limit, what, status.wait_for(pred))
        .await
        .expect("agent status channel alive")
        .clone()
}

/// A forward to any target with an explicit name (the gateway keys ports by name).
pub fn forward_named(public_port: u16, target: Target, name: &str) -> Forward {
    Forward {
        protocol: burrow::config::Protocol::Tcp,
        public_port,
        target,
        name: name.to_string(),
        proxy_protocol: None,
        public_path: None,
        group: None,
    }
}

/// A unix-socket echo server listening at `path`.
pub fn unix_echo_server(path: &Path) {
    let l = tokio::net::UnixListener::bind(path).expect("bind unix socket");
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
}

/// Reads and discards until EOF or an error, at most `cap` bytes, within `limit`. Returns
/// `Ok(n)` on EOF after `n` bytes, `Err(e)` on a read error (a reset counts as closed).
/// Panics if the peer keeps the connection open past `limit` or sends more than `cap`.
pub async fn read_until_closed(
    s: &mut TcpStream,
    cap: usize,
    limit: Duration,
) -> std::io::Result<usize> {
    within(limit, "peer closes the connection", async {
        let mut buf = vec![0u8; 16 * 1024];
        let mut total = 0usize;
        loop {
            let n = s.read(&mut buf).await?;
            if n == 0 {
                return Ok(total);
            }
            total += n;
            assert!(
                total <= cap,
                "peer sent more than {cap} bytes instead of closing"
            );
        }
    })
    .await
}

/// The kernel's ephemeral port range (where `bind(0)` lands).
pub fn ephemeral_port_range() -> (u16, u16) {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|t| {
            let mut it = t.split_whitespace().map(|x| x.parse::<u16>().ok());
            Some((it.next()??, it.next()??))
        })
        .unwrap_or((32768, 60999))
}

/// Which bytes of a proxied connection stop flowing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freeze {
    /// Neither direction.
    Both,
    /// Client (agent) to upstream (gateway).
    ToUpstream,
    /// Upstream (gateway) to client (agent).
    ToDownstream,
}

#[derive(Clone, Default)]
struct ProxyConn {
    freeze_up: CancellationToken,
    freeze_down: CancellationToken,
    upstream_closed: CancellationToken,
    downstream_closed: CancellationToken,
}

/// A TCP proxy on 127.0.0.1:0 whose existing connections can be frozen: a frozen direction
/// swallows bytes without forwarding them and never closes, like a dead link. Connections
/// accepted after a freeze flow normally. Everything stops when the proxy is dropped.
pub struct FreezeProxy {
    pub addr: SocketAddr,
    conns: std::sync::Arc<std::sync::Mutex<Vec<ProxyConn>>>,
    accepted: watch::Receiver<usize>,
    stop: CancellationToken,
}

impl Drop for FreezeProxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl FreezeProxy {
    pub async fn start(upstream: SocketAddr) -> FreezeProxy {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let conns = std::sync::Arc::new(std::sync::Mutex::new(Vec::<ProxyConn>::new()));
        let (tx, accepted) = watch::channel(0usize);
        let stop = CancellationToken::new();
        let (c, s) = (conns.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let down = tokio::select! {
                    _ = s.cancelled() => return,
                    r = l.accept() => match r {
                        Ok((d, _)) => d,
                        Err(_) => continue,
                    },
                };
                let Ok(up) = TcpStream::connect(upstream).await else {
                    continue;
                };
                let _ = up.set_nodelay(true);
                let _ = down.set_nodelay(true);
                let ctl = ProxyConn::default();
                {
                    let mut v = c.lock().unwrap();
                    v.push(ctl.clone());
                    tx.send_replace(v.len());
                }
                let (dr, dw) = down.into_split();
                let (ur, uw) = up.into_split();
                tokio::spawn(pump(
                    dr,
                    uw,
                    ctl.freeze_up.clone(),
                    ctl.downstream_closed.clone(),
                    s.clone(),
                ));
                tokio::spawn(pump(
                    ur,
                    dw,
                    ctl.freeze_down.clone(),
                    ctl.upstream_closed.clone(),
                    s.clone(),
                ));
            }
        });
        FreezeProxy {
            addr,
            conns,
            accepted,
            stop,
        }
    }

    /// Freezes every connection accepted so far; returns how many.
    pub fn freeze(&self, which: Freeze) -> usize {
        let v = self.conns.lock().unwrap();
        for c in v.iter() {
            if which != Freeze::ToDownstream {
                c.freeze_up.cancel();
            }
            if which != Freeze::ToUpstream {
                c.freeze_down.cancel();
            }
        }
        v.len()
    }

    /// Number of connections accepted (and connected upstream) so far.
    pub fn accepted(&self) -> watch::Receiver<usize> {
        self.accepted.clone()
    }

    /// Cancelled once the upstream side of connection `i` closed (EOF or error).
    pub fn upstream_closed(&self, i: usize) -> CancellationToken {
        self.conns.lock().unwrap()[i].upstream_closed.clone()
    }

    /// Cancelled once the downstream side of connection `i` closed (EOF or error).
    pub fn downstream_closed(&self, i: usize) -> CancellationToken {
        self.conns.lock().unwrap()[i].downstream_closed.clone()
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    frozen: CancellationToken,
    closed: CancellationToken,
    stop: CancellationToken,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = tokio::select! {
            _ = stop.cancelled() => return,
            r = from.read(&mut buf) => r.unwrap_or(0),
        };
        if n == 0 {
            closed.cancel();
            if frozen.is_cancelled() {
                // A dead link passes nothing on, not even the close: keep `to` open.
                stop.cancelled().await;
            } else {
                let _ = to.shutdown().await;
            }
            return;
        }
        if frozen.is_cancelled() {
            continue;
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = frozen.cancelled() => {}
            r = to.write_all(&buf[..n]) => if r.is_err() {
                return;
            },
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers for abuse.rs.

/// Like [`start_gateway`], and also hands back the gateway's counters (they stay live while it
/// runs).
pub async fn start_gateway_with_stats(
    cfg: GatewayConfig,
) -> (TestGateway, std::sync::Arc<burrow::stats::GatewayStats>) {
    let state = cfg.state_dir.clone();
    let gw = Gateway::bind(cfg).await.expect("gateway binds");
    let stats = gw.stats();
    let addr = gw.local_addr();
    let ws = gw.ws_local_addr();
    let fingerprint = gw.fingerprint();
    let command = gw.agent_line().map(|l| l.full());
    let (key, _) = burrow::state::load_or_create_agent_key(&state).unwrap();
    let stop = CancellationToken::new();
    let s = stop.clone();
    let task = tokio::spawn(async move {
        gw.run(s).await.expect("gateway runs");
    });
    (
        TestGateway {
            addr,
            ws,
            fingerprint,
            key,
            command,
            stop,
            task,
        },
        stats,
    )
}

/// A TCP connection to `to` from the local address `from` (on Linux any 127.0.0.0/8 address
/// works without configuration), so tests can play many sources.
pub async fn connect_from(from: std::net::IpAddr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let sock = match from {
        std::net::IpAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        std::net::IpAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    sock.bind(SocketAddr::new(from, 0))?;
    let s = sock.connect(to).await?;
    let _ = s.set_nodelay(true);
    Ok(s)
}

/// Polls `stats` until `pred` holds (counters have no change notification); panics with the last
/// snapshot after `limit`.
pub async fn wait_stats(
    stats: &burrow::stats::GatewayStats,
    limit: Duration,
    what: &str,
    mut pred: impl FnMut(&burrow::stats::StatsSnapshot) -> bool,
) -> burrow::stats::StatsSnapshot {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let snap = stats.snapshot();
        if pred(&snap) {
            return snap;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("{what}: not reached within {limit:?}; gateway stats: {snap:?}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A gateway session and an agent session over one in-memory pipe (1 MiB of buffer).
pub fn session_pair(
    params: burrow::proto::message::SessionParams,
) -> (burrow::session::Started, burrow::session::Started) {
    use burrow::proto::mux::Side;
    let (a, b) = tokio::io::duplex(1 << 20);
    let start = |io: tokio::io::DuplexStream, side, name: &str| {
        burrow::session::start(
            Box::new(io),
            bytes::BytesMut::new(),
            side,
            params,
            name.into(),
        )
    };
    (start(a, Side::Gateway, "gw"), start(b, Side::Client, "ag"))
}
