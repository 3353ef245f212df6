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
    let state = cfg.state_dir.clone();
    let gw = Gateway::bind(cfg).await.expect("gateway binds");
    let addr = gw.local_addr();
    let fingerprint = gw.fingerprint();
    let command = gw.agent_command();
    let (key, _) = burrow::state::load_or_create_agent_key(&state).unwrap();
    let stop = CancellationToken::new();
    let s = stop.clone();
    let task = tokio::spawn(async move {
        gw.run(s).await.expect("gateway runs");
    });
    TestGateway {
        addr,
        fingerprint,
        key,
        command,
        stop,
        task,
    }
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
        forwards,
        limits: Limits::default(),
        max_backoff: Duration::from_millis(500),
        grace: Duration::from_secs(2),
    }
}

pub fn forward(public_port: u16, target: SocketAddr) -> Forward {
    Forward {
        public_port,
        target: Target::Tcp {
            host: target.ip().to_string(),
            port: target.port(),
        },
        name: format!("fwd-{}", target.port()),
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
