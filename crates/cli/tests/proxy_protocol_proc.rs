//! The PROXY protocol through the real binary, read by real servers from Debian's packages:
//! nginx (`listen … proxy_protocol`, answering `$proxy_protocol_addr`) and HAProxy
//! (`accept-proxy`, answering `%[src]`). A client connects to the gateway's public port from
//! 127.0.0.2 (or ::1), so the address the server reports can only be the client's: the
//! agent itself reaches the server from 127.0.0.1. Targets are TCP ports and unix sockets.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use burrow_testkit::harness::keygen;
use burrow_testkit::{AgentSpec, GatewaySpec, Haproxy, Nginx};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpSocket;

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_burrow"))
}

/// An HTTP request to `public` from a socket bound to `from`; the answer's body and the
/// client's own address.
async fn ask(public: SocketAddr, from: IpAddr) -> (String, SocketAddr) {
    let sock = match from {
        IpAddr::V4(_) => TcpSocket::new_v4(),
        IpAddr::V6(_) => TcpSocket::new_v6(),
    }
    .unwrap();
    sock.bind(SocketAddr::new(from, 0)).unwrap();
    let mut conn = tokio::time::timeout(Duration::from_secs(5), sock.connect(public))
        .await
        .expect("connect within 5 s")
        .unwrap();
    let me = conn.local_addr().unwrap();
    conn.write_all(b"GET / HTTP/1.0\r\nHost: burrow\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), conn.read_to_end(&mut answer))
        .await
        .expect("an answer within 5 s")
        .ok();
    (String::from_utf8_lossy(&answer).into_owned(), me)
}

/// The `addr=… port=…` the server reported.
fn reported(answer: &str) -> Option<String> {
    let body = answer.split("\r\n\r\n").nth(1)?;
    let line = body.lines().next()?;
    let mut words = line.split_whitespace();
    let addr = words.next()?.strip_prefix("addr=")?;
    let port = words.next()?.strip_prefix("port=")?;
    Some(format!("{addr} {port}"))
}

fn expect_client(answer: &str, me: SocketAddr, what: &str) {
    assert!(answer.starts_with("HTTP/1.1 200"), "{what}: {answer:?}");
    assert_eq!(
        reported(answer).as_deref(),
        Some(format!("{} {}", me.ip(), me.port()).as_str()),
        "{what}: the server must report the client's address: {answer:?}"
    );
}

const CLIENT_V4: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 2));

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_reads_v1_and_v2_with_the_public_clients_address() {
    let nginx = Nginx::proxy_protocol_echo().await.unwrap();
    let state = tempfile::tempdir().unwrap();
    let gw = GatewaySpec::new(state.path()).start(bin()).await.unwrap();
    let port = nginx.addr().port();
    let sock = nginx.unix_socket();
    let specs = [
        format!("127.0.0.1:{port}?proxy_protocol=v1"),
        format!("0=127.0.0.1:{port}?proxy_protocol=v2"),
        format!("unix:{}?proxy_protocol=v1", sock.display()),
        format!("0=unix:{}?proxy_protocol=v2", sock.display()),
        // Without the option nginx gets no header and refuses: the check above can fail.
        format!("localhost:{port}"),
    ];
    let mut spec = AgentSpec::new(gw.agent_args());
    for s in &specs {
        spec = spec.forward(s);
    }
    let agent = spec.start(bin()).await.unwrap();
    let started = Instant::now();
    for (i, what) in ["tcp v1", "tcp v2", "unix v1", "unix v2"]
        .iter()
        .enumerate()
    {
        let (answer, me) = ask(agent.public(i), CLIENT_V4).await;
        expect_client(&answer, me, what);
        assert!(
            answer.contains("remote=127.0.0.1") || answer.contains("remote=unix:"),
            "{what}: nginx's own peer is the agent: {answer:?}"
        );
    }
    let (answer, _) = ask(agent.public(4), CLIENT_V4).await;
    assert!(
        !answer.starts_with("HTTP/1.1 200"),
        "without a header nginx must refuse: {answer:?}"
    );
    assert!(
        nginx.log_text().contains("broken header"),
        "nginx logs the missing header: {}",
        nginx.log_text()
    );
    println!(
        "nginx: v1 and v2 over TCP and a unix socket report the client 127.0.0.2 (5 requests in {:?})",
        started.elapsed()
    );
    drop(gw);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxy_reads_v1_and_v2_over_tcp_and_a_unix_socket() {
    if !Haproxy::installed() {
        assert!(
            std::env::var_os("CI").is_none(),
            "haproxy is missing in CI: .ci/run installs Debian's haproxy"
        );
        println!(
            "SKIPPED: {} not installed (apt-get install haproxy)",
            burrow_testkit::haproxy::HAPROXY
        );
        return;
    }
    let hap = Haproxy::proxy_protocol_echo().await.unwrap();
    let state = tempfile::tempdir().unwrap();
    let gw = GatewaySpec::new(state.path()).start(bin()).await.unwrap();
    let port = hap.addr().port();
    let sock = hap.unix_socket();
    let specs = [
        format!("127.0.0.1:{port}?proxy_protocol=v1"),
        format!("0=127.0.0.1:{port}?proxy_protocol=v2"),
        format!("unix:{}?proxy_protocol=v1", sock.display()),
        format!("0=unix:{}?proxy_protocol=v2", sock.display()),
    ];
    let mut spec = AgentSpec::new(gw.agent_args());
    for s in &specs {
        spec = spec.forward(s);
    }
    let agent = spec.start(bin()).await.unwrap();
    for (i, what) in ["tcp v1", "tcp v2", "unix v1", "unix v2"]
        .iter()
        .enumerate()
    {
        let (answer, me) = ask(agent.public(i), CLIENT_V4).await;
        expect_client(&answer, me, what);
    }
    println!("haproxy: v1 and v2 over TCP and a unix socket report the client 127.0.0.2");
    drop(gw);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ipv6_client_is_reported_as_such() {
    let nginx = Nginx::proxy_protocol_echo().await.unwrap();
    let state = tempfile::tempdir().unwrap();
    let gw = GatewaySpec::new(state.path())
        .public_host("::1".parse().unwrap())
        .start(bin())
        .await
        .unwrap();
    let port = nginx.addr().port();
    let agent = AgentSpec::new(gw.agent_args())
        .forward(&format!("127.0.0.1:{port}?proxy_protocol=v1"))
        .forward(&format!("0=127.0.0.1:{port}?proxy_protocol=v2"))
        .start(bin())
        .await
        .unwrap();
    for (i, what) in ["v1", "v2"].iter().enumerate() {
        let public = agent.public(i);
        assert!(public.is_ipv6(), "{public}");
        let (answer, me) = ask(public, "::1".parse().unwrap()).await;
        expect_client(&answer, me, what);
    }
    drop(gw);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_of_a_unix_endpoint_has_no_address_to_pass_on() {
    let nginx = Nginx::proxy_protocol_echo().await.unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let key = keygen(bin());
    let conf = tmp.path().join("gateway.toml");
    std::fs::write(
        &conf,
        format!(
            "[[agents]]\nname = \"local\"\nkey = \"{key}\"\npaths = [\"{}/*.sock\"]\n",
            tmp.path().display()
        ),
    )
    .unwrap();
    let gw = GatewaySpec::new(&tmp.path().join("state"))
        .config(&conf)
        .expect_agent_line(false)
        .start(bin())
        .await
        .unwrap();
    let port = nginx.addr().port();
    let (v1, v2) = (tmp.path().join("v1.sock"), tmp.path().join("v2.sock"));
    let args = vec![
        "agent".to_string(),
        "--gateway".into(),
        gw.addr().to_string(),
        "--key".into(),
        key,
        "--fingerprint".into(),
        gw.fingerprint().to_string(),
    ];
    let mut agent = burrow_testkit::Burrow::start(
        AgentSpec::new(args)
            .forward(&format!(
                "unix:{}=127.0.0.1:{port}?proxy_protocol=v1",
                v1.display()
            ))
            .forward(&format!(
                "unix:{}=127.0.0.1:{port}?proxy_protocol=v2",
                v2.display()
            ))
            .command(bin()),
    )
    .unwrap();
    for sock in [&v1, &v2] {
        let want = format!("public address unix:{}", sock.display());
        agent
            .wait_stdout(|l| l.contains(&want), Duration::from_secs(30))
            .await
            .unwrap();
    }
    for (sock, what) in [(&v1, "v1 UNKNOWN"), (&v2, "v2 LOCAL")] {
        let mut c = tokio::net::UnixStream::connect(sock).await.unwrap();
        c.write_all(b"GET / HTTP/1.0\r\nHost: burrow\r\n\r\n")
            .await
            .unwrap();
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut answer))
            .await
            .expect("an answer within 5 s")
            .unwrap();
        let answer = String::from_utf8_lossy(&answer);
        // nginx accepts the header and, told to use the connection's own addresses, has none.
        assert!(answer.starts_with("HTTP/1.1 200"), "{what}: {answer:?}");
        assert!(
            answer.contains("addr= port= remote=127.0.0.1"),
            "{what}: {answer:?}"
        );
    }
    drop(gw);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_reads_v1_and_v2_with_a_connector_clients_address() {
    use burrow::proto::auth::SecretKey;
    let nginx = Nginx::proxy_protocol_echo().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (office, laptop) = (SecretKey::generate(), SecretKey::generate());
    let config = dir.path().join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "[[agents]]\nname = \"office\"\nkey_hash = \"{}\"\nports = [\"1024-65535\"]\n\n\
             [[connectors]]\nname = \"laptop\"\nkey_hash = \"{}\"\nreach = [\"office/*\"]\n",
            office.hash(),
            laptop.hash()
        ),
    )
    .unwrap();
    let gw = GatewaySpec::new(&dir.path().join("state"))
        .config(&config)
        .expect_agent_line(false)
        .start(bin())
        .await
        .unwrap();
    let role = |role: &str, key: &SecretKey| {
        let mut cmd = burrow_testkit::Burrow::command(bin());
        cmd.arg(role)
            .args(["--gateway", &gw.addr().to_string()])
            .args(["--fingerprint", gw.fingerprint()])
            .env("BURROW_KEY", key.expose());
        cmd
    };
    let port = nginx.addr().port();
    let sock = nginx.unix_socket();
    // Private services: v1 and v2 to nginx's TCP port and to its unix socket, and one
    // without the option (nginx refuses it: the check can fail).
    let mut agent_cmd = role("agent", &office);
    for p in [
        format!("v1tcp=127.0.0.1:{port}?proxy_protocol=v1"),
        format!("v2tcp=127.0.0.1:{port}?proxy_protocol=v2"),
        format!("v1unix=unix:{}?proxy_protocol=v1", sock.display()),
        format!("v2unix=unix:{}?proxy_protocol=v2", sock.display()),
        format!("plain=127.0.0.1:{port}"),
    ] {
        agent_cmd.arg("--private").arg(p);
    }
    let mut agent = burrow_testkit::Burrow::start(agent_cmd).unwrap();
    for _ in 0..5 {
        agent
            .wait_stderr("private service announced", Duration::from_secs(30))
            .await
            .unwrap();
    }
    let names = ["v1tcp", "v2tcp", "v1unix", "v2unix", "plain"];
    let mut connector = {
        let mut c = role("connect", &laptop);
        for n in names {
            c.arg("--forward").arg(format!("0=office/{n}"));
        }
        burrow_testkit::Burrow::start(c).unwrap()
    };
    let mut listen = Vec::new();
    for n in names {
        let prefix = format!("forward 0=office/{n}: listening on ");
        let line = connector
            .wait_stdout(|l| l.starts_with(&prefix), Duration::from_secs(30))
            .await
            .unwrap();
        listen.push(line[prefix.len()..].trim().parse::<SocketAddr>().unwrap());
    }
    // Every forward ready (the lines come in any order).
    let deadline = Instant::now() + Duration::from_secs(30);
    while names.iter().any(|n| {
        let want = format!("forward 0=office/{n}: ready");
        !connector.stdout_lines().contains(&want)
    }) {
        assert!(
            Instant::now() < deadline,
            "not every forward ready: {:#?}",
            connector.stdout_lines()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The client connects to the connector's listener from 127.0.0.2: only the header can
    // tell nginx that address.
    for (i, what) in ["tcp v1", "tcp v2", "unix v1", "unix v2"]
        .iter()
        .enumerate()
    {
        let (answer, me) = ask(listen[i], CLIENT_V4).await;
        expect_client(&answer, me, &format!("connector, {what}"));
    }
    let (answer, _) = ask(listen[4], CLIENT_V4).await;
    assert!(
        !answer.starts_with("HTTP/1.1 200"),
        "without a header nginx must refuse: {answer:?}"
    );
    println!("nginx: v1 and v2 over TCP and a unix socket report the connector's client 127.0.0.2");
    drop(gw);
}
