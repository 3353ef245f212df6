//! The session inside a WebSocket: straight to the gateway's TLS tunnel port (`wss://`), to a
//! plain gateway (`ws://`), and to a `ws_listen` listener as a TLS-terminating proxy would
//! reach it; byte-exact bulk and parallel transfers; prompt HTTP errors for requests that are
//! not upgrades. (Through nginx, with the real binary: `crates/cli/tests/ws_nginx.rs`.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use burrow::config::{GatewayConfig, TransportKind};
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A gateway tuned by `tune`, an agent dialing `url(gateway)`, and the agent's public address
/// for an echo service.
async fn tunnel(
    tune: impl FnOnce(&mut GatewayConfig),
    url: impl FnOnce(&TestGateway) -> String,
) -> (TestGateway, TestAgent, SocketAddr, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = gateway_config(dir.path());
    tune(&mut cfg);
    let gw = start_gateway(cfg).await;
    let echo = echo_server().await;
    let mut acfg = agent_config(&gw, vec![forward(0, echo)]);
    acfg.gateway = url(&gw);
    let mut agent = start_agent(acfg);
    let public = granted(&mut agent.status).await[0];
    (gw, agent, public, dir)
}

/// 64 MiB each way through one stream, then 100 streams at once, all byte-exact.
async fn bulk_and_parallel(public: SocketAddr, bulk: usize) {
    let data = pattern(bulk, 1);
    let got = within(
        Duration::from_secs(120),
        "bulk echo",
        echo_roundtrip(public, &data),
    )
    .await;
    assert_eq!(got, sha(&data), "bulk echo is byte-exact");
    let mut tasks = Vec::new();
    for i in 0..100u64 {
        tasks.push(tokio::spawn(async move {
            let data = pattern(64 * 1024 + i as usize * 97, 100 + i);
            (echo_roundtrip(public, &data).await, sha(&data))
        }));
    }
    for t in tasks {
        let (got, want) = within(Duration::from_secs(60), "parallel echo", t)
            .await
            .unwrap();
        assert_eq!(got, want, "each parallel stream is byte-exact");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wss_straight_to_the_tls_tunnel_port() {
    let (_gw, agent, public, _dir) = tunnel(|_| {}, |gw| format!("wss://{}/burrow", gw.addr)).await;
    bulk_and_parallel(public, 64 << 20).await;
    let st = agent.status.borrow().clone();
    assert_eq!(st.sessions, 1, "one session carried it all: {st:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_to_a_plain_gateway_on_a_custom_path() {
    let (_gw, _agent, public, _dir) = tunnel(
        |c| {
            c.transport = TransportKind::Tcp;
            c.ws_path = "/t/x".into();
        },
        |gw| format!("ws://{}/t/x", gw.addr),
    )
    .await;
    bulk_and_parallel(public, 8 << 20).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_listen_binds_the_proof_to_the_requested_host() {
    // As nginx would reach it: plain HTTP, the agent's TLS having ended at the proxy. Here the
    // agent dials it directly with ws://, which yields the same proof binding (host and path).
    let (_gw, _agent, public, _dir) = tunnel(
        |c| c.ws_listen = Some("127.0.0.1:0".parse().unwrap()),
        |gw| format!("ws://{}/burrow", gw.ws.unwrap()),
    )
    .await;
    bulk_and_parallel(public, 8 << 20).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_agent_cannot_use_a_websocket_only_listener() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = gateway_config(dir.path());
    cfg.ws_listen = Some("127.0.0.1:0".parse().unwrap());
    let gw = start_gateway(cfg).await;
    let mut acfg = agent_config(&gw, vec![]);
    acfg.gateway = format!("tcp://{}", gw.ws.unwrap());
    acfg.trust = burrow::config::Trust::Plain;
    let agent = start_agent(acfg);
    // Refused with a reason on the first attempt; the agent stops (it never connected).
    let r = within(Duration::from_secs(10), "agent gives up", agent.task)
        .await
        .unwrap();
    let err = r
        .expect_err("a non-WebSocket client is refused")
        .to_string();
    assert!(err.contains("WebSocket tunnels only"), "{err}");
}

/// What the gateway answers to `request` on a plain connection to `addr`.
async fn http_answer(addr: SocketAddr, request: &str) -> String {
    let mut c = TcpStream::connect(addr).await.unwrap();
    c.write_all(request.as_bytes()).await.unwrap();
    let mut out = String::new();
    within(
        Duration::from_secs(5),
        "the HTTP answer",
        c.read_to_string(&mut out),
    )
    .await
    .unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_that_are_not_upgrades_get_a_prompt_http_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = gateway_config(dir.path());
    cfg.ws_listen = Some("127.0.0.1:0".parse().unwrap());
    let gw = start_gateway(cfg).await;
    let ws = gw.ws.unwrap();
    let get = http_answer(ws, "GET /burrow HTTP/1.1\r\nHost: gw\r\n\r\n").await;
    assert!(get.starts_with("HTTP/1.1 426 "), "plain GET: {get}");
    let wrong = http_answer(
        ws,
        "GET /other HTTP/1.1\r\nHost: gw\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
    )
    .await;
    assert!(wrong.starts_with("HTTP/1.1 404 "), "wrong path: {wrong}");

    // And over TLS on the tunnel port, as a browser or curl would ask (ALPN http/1.1).
    let fp = burrow::tls::parse_fingerprint(gw.fingerprint.as_deref().unwrap()).unwrap();
    let trust = burrow::config::Trust::Fingerprint(fp);
    let mut config = (*burrow::tls::client_config(&trust).unwrap()).clone();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(gw.addr).await.unwrap();
    let name = burrow::tls::server_name("127.0.0.1").unwrap();
    let mut tls = connector.connect(name, tcp).await.unwrap();
    tls.write_all(b"GET / HTTP/1.1\r\nHost: gw\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    let _ = within(
        Duration::from_secs(5),
        "the HTTPS answer",
        tls.read_to_string(&mut out),
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 404 "), "GET / over TLS: {out}");
}
