//! WebSocket tunnels through a real nginx (Debian's package, started by the test on a port it
//! holds): nginx terminates TLS with a test CA's certificate and proxies the upgrade to the
//! gateway's `--ws-listen`; the agent dials `wss://localhost:PORT/burrow --ca ca.pem`. Bulk and
//! parallel transfers are byte-exact; an idle session outlives nginx's `proxy_read_timeout`
//! (heartbeats keep it busy); nginx restarted mid-session, the agent comes back by itself.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use burrow_testkit::targets::{echo_transfer, EchoOpts};
use burrow_testkit::{AgentSpec, Burrow, GatewaySpec, Nginx, Pki, TcpTarget};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_burrow"))
}

const WAIT: Duration = Duration::from_secs(30);

/// The address in the gateway's "listening for WebSocket tunnels" log line.
async fn ws_listen_addr(gw: &mut Burrow) -> SocketAddr {
    let line = gw
        .wait_stderr("listening for WebSocket tunnels", WAIT)
        .await
        .unwrap();
    let at = line.find("listen=").expect("the line names the address") + "listen=".len();
    line[at..]
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .expect("an address")
}

/// nginx terminating TLS for `localhost` and proxying `/burrow` to `upstream`, with a short
/// `proxy_read_timeout` (an idle tunnel must survive it through its heartbeats).
async fn nginx_in_front(pki: &Pki, upstream: SocketAddr) -> Nginx {
    let (cert, key) = pki.issue("nginx").unwrap();
    let http = format!(
        "  server {{\n    listen {{listen}} ssl;\n    server_name localhost;\n    \
         ssl_certificate {};\n    ssl_certificate_key {};\n    ssl_protocols TLSv1.3;\n    \
         location /burrow {{\n      proxy_pass http://{upstream};\n      \
         proxy_http_version 1.1;\n      proxy_set_header Upgrade $http_upgrade;\n      \
         proxy_set_header Connection \"upgrade\";\n      proxy_set_header Host $host;\n      \
         proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;\n      \
         proxy_read_timeout 2s;\n      proxy_send_timeout 2s;\n      proxy_buffering off;\n    }}\n  }}\n",
        cert.display(),
        key.display()
    );
    Nginx::start(&http).await.unwrap()
}

/// Counts the agent's "connected to gateway" lines so far.
fn sessions(agent: &mut Burrow) -> usize {
    agent
        .stderr_lines()
        .iter()
        .filter(|l| l.contains("connected to gateway"))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wss_through_nginx_terminating_tls() {
    let state = tempfile::tempdir().unwrap();
    let conf = state.path().join("gateway.toml");
    // Heartbeats every 500 ms: well inside nginx's 2 s read timeout.
    std::fs::write(&conf, "[heartbeat]\ninterval = \"500ms\"\nmisses = 4\n").unwrap();
    let gw_state = state.path().join("state");
    let mut gw = GatewaySpec::new(&gw_state)
        .config(&conf)
        .args(["--ws-listen", "127.0.0.1:0"])
        .start(bin())
        .await
        .unwrap();
    let upstream = ws_listen_addr(&mut gw.proc).await;
    let pki = Pki::new("nginx").unwrap();
    let mut nginx = nginx_in_front(&pki, upstream).await;
    let echo = TcpTarget::echo().await.unwrap();
    let url = format!("wss://localhost:{}/burrow", nginx.addr().port());
    let key = gw.key().expect("the gateway printed the agent key");
    let mut agent = AgentSpec::new(vec![
        "agent".into(),
        "--gateway".into(),
        url.clone(),
        "--key".into(),
        key,
        "--ca".into(),
        pki.ca_file().display().to_string(),
        "--max-backoff".into(),
        "1s".into(),
    ])
    .forward(&echo.addr().to_string())
    .start(bin())
    .await
    .unwrap_or_else(|e| panic!("agent through nginx: {e}\nnginx: {}", nginx.log_text()));
    let public = agent.public(0);

    // 64 MiB each way, byte-exact.
    let bulk = echo_transfer(public, &EchoOpts::new(64 << 20, 3))
        .await
        .unwrap();
    assert!(bulk.exact, "{bulk:?}");
    // 100 streams at once.
    let mut tasks = Vec::new();
    for i in 0..100u64 {
        tasks.push(tokio::spawn(async move {
            echo_transfer(public, &EchoOpts::new(128 * 1024 + i * 31, 50 + i)).await
        }));
    }
    for t in tasks {
        let r = t.await.unwrap().unwrap();
        assert!(r.exact, "{r:?}");
    }
    println!(
        "wss through nginx: 64 MiB echo in {:?} ({:.0} MiB/s), 100 parallel streams byte-exact",
        bulk.elapsed,
        bulk.mib_per_sec()
    );

    // Idle for twice nginx's read timeout: the session stays, traffic still flows.
    assert_eq!(sessions(&mut agent.proc), 1);
    tokio::time::sleep(Duration::from_secs(4)).await;
    let after_idle = echo_transfer(public, &EchoOpts::new(1 << 20, 4))
        .await
        .unwrap();
    assert!(after_idle.exact, "{after_idle:?}");
    assert_eq!(
        sessions(&mut agent.proc),
        1,
        "the idle session outlived proxy_read_timeout without reconnecting: {:#?}",
        agent.proc.stderr_tail()
    );

    // nginx restarted: the agent notices and comes back by itself; traffic flows again.
    nginx.restart().await.unwrap();
    agent
        .proc
        .wait_stderr("connected to gateway", WAIT)
        .await
        .ok();
    let deadline = tokio::time::Instant::now() + WAIT;
    while sessions(&mut agent.proc) < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "agent did not reconnect after nginx restarted: {:#?}",
            agent.proc.stderr_tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let regranted = agent.wait_regranted(WAIT).await.unwrap();
    let again = echo_transfer(regranted[0], &EchoOpts::new(4 << 20, 5))
        .await
        .unwrap();
    assert!(again.exact, "{again:?}");
}

/// `--ca system` checks the proxy's certificate against the system's trust store: a test CA's
/// certificate is refused at once, with a message that says what to do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ca_system_refuses_a_certificate_from_an_unknown_ca() {
    let state = tempfile::tempdir().unwrap();
    let mut gw = GatewaySpec::new(state.path())
        .args(["--ws-listen", "127.0.0.1:0"])
        .start(bin())
        .await
        .unwrap();
    let upstream = ws_listen_addr(&mut gw.proc).await;
    let pki = Pki::new("unknown").unwrap();
    let nginx = nginx_in_front(&pki, upstream).await;
    let url = format!("wss://localhost:{}/burrow", nginx.addr().port());
    let mut agent = Burrow::spawn(
        bin(),
        [
            "agent",
            "--gateway",
            &url,
            "--key",
            &gw.key().unwrap(),
            "--ca",
            "system",
        ],
    )
    .unwrap();
    let st = agent.wait_exit(WAIT).await.unwrap();
    assert!(
        !st.success(),
        "the agent stops on a certificate it cannot trust"
    );
    let err = agent.stderr_tail().join("\n");
    assert!(
        err.contains("system's trust store") || err.contains("no usable CA certificates"),
        "the error names the trust store: {err}"
    );
}
