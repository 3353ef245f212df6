//! UDP forwarding through the real binaries: a zero-config gateway (its default grant covers
//! UDP 1024-65535) and an agent with `--forward udp:HOST:PORT` to a UDP echo server.
//! Datagrams of every size echo byte-exact; 200 clients at once each get only their own
//! replies; idle flows end and their sockets go; each flow logs one line at both ends; a flow
//! to a target that never answers stays one flow while the client sends; a grant without
//! `/udp` refuses the UDP forward with a clear message while the TCP one carries on; an agent
//! that comes back gets the same public UDP port, and so does one after a gateway restart; a
//! UDP flood beside a TCP stream leaves the stream quick and byte-exact, and every datagram
//! burrow drops is counted; dig gets its answer from a real dnsmasq through the tunnel.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use burrow_testkit::harness::{admin_addr, udp_echo, write_config};
use burrow_testkit::{AgentSpec, Dnsmasq, GatewaySpec, TcpTarget};
use tokio::net::UdpSocket;

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_burrow"))
}

const WAIT: Duration = Duration::from_secs(30);

/// Sends `data` from `sock` to `to` until the echo comes back (UDP may drop one), and
/// returns it.
async fn echo(sock: &UdpSocket, to: SocketAddr, data: &[u8]) -> Vec<u8> {
    let mut buf = vec![0u8; 70_000];
    for _ in 0..20 {
        sock.send_to(data, to).await.unwrap();
        if let Ok(Ok((n, _))) =
            tokio::time::timeout(Duration::from_millis(500), sock.recv_from(&mut buf)).await
        {
            return buf[..n].to_vec();
        }
    }
    panic!("no echo of {} bytes through {to}", data.len());
}

/// The admin server's `/metrics` text.
async fn metrics(admin: SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(admin).await.unwrap();
    tcp.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut text = String::new();
    tcp.read_to_string(&mut text).await.unwrap();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    text
}

/// `burrow_datagrams_total{direction, outcome}` in a `/metrics` text.
fn datagrams(metrics: &str, direction: &str, outcome: &str) -> u64 {
    let name =
        format!("burrow_datagrams_total{{direction=\"{direction}\",outcome=\"{outcome}\"}} ");
    let line = metrics.lines().find(|l| l.starts_with(&name));
    let value = line.unwrap_or_else(|| panic!("no {name}in {metrics}"));
    value[name.len()..].trim().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn datagrams_of_every_size_and_200_clients_each_get_their_own() {
    let state = tempfile::tempdir().unwrap();
    let gw = GatewaySpec::new(state.path()).start(bin()).await.unwrap();
    let target = udp_echo().await;
    let spec = format!("udp:{target}");
    let agent = AgentSpec::new(gw.agent_args())
        .forward(&spec)
        .start(bin())
        .await
        .unwrap();
    let public = agent.public(0);

    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    for len in [1usize, 512, 1400, 8192, 65_507] {
        let data: Vec<u8> = (0..len).map(|i| (i * 31 + len) as u8).collect();
        let got = echo(&sock, public, &data).await;
        assert_eq!(got, data, "{len}-byte datagram echoed byte-exact");
    }

    // 200 clients at once, each with its own payload: each sees only its own replies.
    let mut tasks = Vec::new();
    for i in 0..200u32 {
        tasks.push(tokio::spawn(async move {
            let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            let data = format!("client {i} says hello").into_bytes();
            for _ in 0..3 {
                let got = echo(&s, public, &data).await;
                assert_eq!(got, data, "client {i} got someone else's reply");
            }
        }));
    }
    for t in tasks {
        tokio::time::timeout(WAIT, t).await.unwrap().unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_flows_end_and_their_sockets_go() {
    let state = tempfile::tempdir().unwrap();
    let conf = write_config(state.path(), "[udp]\nidle = \"1s\"\n");
    let gw = GatewaySpec::new(&state.path().join("state"))
        .config(&conf)
        .start(bin())
        .await
        .unwrap();
    let target = udp_echo().await;
    let agent_conf = state.path().join("agent.toml");
    std::fs::write(&agent_conf, "[udp]\nidle = \"1s\"\n").unwrap();
    let mut agent = AgentSpec::new(gw.agent_args())
        .args(["--config", agent_conf.to_str().unwrap()])
        .forward(&format!("udp:{target}"))
        .start(bin())
        .await
        .unwrap();
    let public = agent.public(0);
    let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    assert_eq!(echo(&s, public, b"warm").await, b"warm");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let base = agent.stats().unwrap().fds;
    let (gw_mem, agent_mem) = (gw.stats().unwrap().rss_kib, agent.stats().unwrap().rss_kib);
    // 200 flows at once (well inside the idle time of 1 s), ending together.
    let mut tasks = Vec::new();
    for i in 0..200u32 {
        tasks.push(tokio::spawn(async move {
            let c = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            let data = i.to_be_bytes();
            assert_eq!(echo(&c, public, &data).await, data);
            c
        }));
    }
    let mut clients = Vec::new();
    for t in tasks {
        clients.push(t.await.unwrap());
    }
    let busy = agent.stats().unwrap().fds;
    assert!(
        busy >= base + 200,
        "a socket per flow at the agent: {base} -> {busy}"
    );
    // Idle: every flow ends, on both sides, with one line each.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let now = agent.stats().unwrap().fds;
        if now <= base + 1 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "flow sockets did not go: {base} at rest, {busy} busy, {now} now"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Memory back too (within what the allocator keeps), at both ends.
    let (gw_after, agent_after) = (gw.stats().unwrap().rss_kib, agent.stats().unwrap().rss_kib);
    for (who, before, after) in [
        ("gateway", gw_mem, gw_after),
        ("agent", agent_mem, agent_after),
    ] {
        assert!(
            after <= before + 2048,
            "{who} holds {after} KiB after its flows ended, {before} KiB before them"
        );
    }
    agent
        .proc
        .wait_stderr("flow closed", WAIT)
        .await
        .expect("the agent logs each flow's end");
    let mut gw = gw;
    gw.proc
        .wait_stderr("flow closed", WAIT)
        .await
        .expect("the gateway logs each flow's end");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_without_udp_refuses_the_udp_forward_and_the_tcp_one_carries_on() {
    let state = tempfile::tempdir().unwrap();
    let key = burrow::proto::auth::SecretKey::generate();
    let conf = write_config(
        state.path(),
        &format!(
            "[[agents]]\nname = \"tcp-only\"\nkey_hash = \"{}\"\nports = [\"20000-60000\"]\n",
            key.hash()
        ),
    );
    let gw = GatewaySpec::new(&state.path().join("state"))
        .config(&conf)
        .expect_agent_line(false)
        .start(bin())
        .await
        .unwrap();
    let target = udp_echo().await;
    let echo_tcp = TcpTarget::echo().await.unwrap();
    let mut args = vec![
        "agent".to_string(),
        "--gateway".into(),
        gw.addr().to_string(),
        "--fingerprint".into(),
        gw.fingerprint().to_string(),
        "--key".into(),
        key.expose().to_string(),
    ];
    args.extend(["--forward".into(), format!("udp:{target}")]);
    args.extend(["--forward".into(), echo_tcp.addr().to_string()]);
    let mut agent = burrow_testkit::Burrow::spawn(bin(), &args).unwrap();
    let refused = agent
        .wait_stdout(|l| l.starts_with(&format!("forward udp:{target}: ")), WAIT)
        .await
        .unwrap();
    assert!(
        refused.contains("not granted") && refused.contains("/udp"),
        "the refusal says what to grant: {refused}"
    );
    let granted = agent
        .wait_stdout(
            |l| l.starts_with(&format!("forward {}: public address", echo_tcp.addr())),
            WAIT,
        )
        .await
        .unwrap();
    let public: SocketAddr = granted.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(burrow_testkit::targets::echo_once(public, b"still here")
        .await
        .unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_returning_agent_gets_its_udp_port_back() {
    let state = tempfile::tempdir().unwrap();
    let gw = GatewaySpec::new(state.path()).start(bin()).await.unwrap();
    let target = udp_echo().await;
    let spec = format!("udp:{target}");
    let mut agent = AgentSpec::new(gw.agent_args())
        .forward(&spec)
        .start(bin())
        .await
        .unwrap();
    let first = agent.public(0);
    let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    assert_eq!(echo(&s, first, b"one").await, b"one");
    agent.kill().await.unwrap();
    let agent = AgentSpec::new(gw.agent_args())
        .forward(&spec)
        .start(bin())
        .await
        .unwrap();
    assert_eq!(
        agent.public(0),
        first,
        "the same public UDP port, kept by the lease"
    );
    assert_eq!(echo(&s, first, b"two").await, b"two");
}

/// A UDP flood through one service while a TCP echo runs in the same session: the TCP stream
/// stays byte-exact and its round trips stay quick; the flood's excess is dropped, not queued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_udp_flood_does_not_stall_tcp_in_the_same_session() {
    let state = tempfile::tempdir().unwrap();
    let mut gw = GatewaySpec::new(state.path())
        .args(["--admin", "127.0.0.1:0"])
        .start(bin())
        .await
        .unwrap();
    let gw_admin = admin_addr(&mut gw.proc, WAIT).await;
    let target = udp_echo().await;
    let tcp = TcpTarget::echo().await.unwrap();
    let mut agent = AgentSpec::new(gw.agent_args())
        .args(["--admin", "127.0.0.1:0"])
        .forward(&format!("udp:{target}"))
        .forward(&tcp.addr().to_string())
        .start(bin())
        .await
        .unwrap();
    let agent_admin = admin_addr(&mut agent.proc, WAIT).await;
    let (udp_pub, tcp_pub) = (agent.public(0), agent.public(1));
    let stop = tokio_util::sync::CancellationToken::new();
    let mut flooders = Vec::new();
    for _ in 0..4 {
        let stop = stop.clone();
        flooders.push(tokio::spawn(async move {
            let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            let data = vec![0x5au8; 1400];
            let mut sent = 0u64;
            let started = tokio::time::Instant::now();
            while !stop.is_cancelled() && started.elapsed() < Duration::from_secs(5) {
                for _ in 0..64 {
                    if s.send_to(&data, udp_pub).await.is_ok() {
                        sent += 1;
                    }
                }
                tokio::task::yield_now().await;
            }
            sent
        }));
    }
    // Meanwhile: round trips and a bulk echo on the TCP service.
    let mut c = tokio::net::TcpStream::connect(tcp_pub).await.unwrap();
    let mut worst = Duration::ZERO;
    let mut times = Vec::new();
    for i in 0..200u32 {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let msg = i.to_be_bytes();
        let t = tokio::time::Instant::now();
        c.write_all(&msg).await.unwrap();
        let mut got = [0u8; 4];
        tokio::time::timeout(Duration::from_secs(5), c.read_exact(&mut got))
            .await
            .expect("a TCP round trip during the flood")
            .unwrap();
        assert_eq!(got, msg);
        let dt = t.elapsed();
        worst = worst.max(dt);
        times.push(dt);
    }
    let bulk = burrow_testkit::targets::echo_transfer(
        tcp_pub,
        &burrow_testkit::targets::EchoOpts::new(8 << 20, 9),
    )
    .await
    .unwrap();
    stop.cancel();
    let mut sent = 0;
    for f in flooders {
        sent += f.await.unwrap();
    }
    times.sort();
    let p50 = times[times.len() / 2];
    // The flood's drops are counted: every datagram one side queued into the session is,
    // at the other, received or counted as dropped (over the budget, the backlog full), each
    // way. (Drops in the kernel, at a full socket buffer, come before burrow sees them.)
    let settled = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (gw_m, ag_m) = (metrics(gw_admin).await, metrics(agent_admin).await);
        let gw_out = [
            datagrams(&gw_m, "out", "sent"),
            datagrams(&gw_m, "in", "received"),
        ];
        let ag_in = [
            datagrams(&ag_m, "in", "received") + datagrams(&ag_m, "in", "dropped"),
            datagrams(&ag_m, "out", "sent"),
        ];
        let gw_in = datagrams(&gw_m, "in", "received") + datagrams(&gw_m, "in", "dropped");
        if gw_out[0] == ag_in[0] && gw_in == ag_in[1] {
            println!(
                "gateway queued {} datagrams (dropped {} before the session); agent received \
                 {} and dropped {}; replies: agent queued {}, gateway received {gw_in}",
                gw_out[0],
                datagrams(&gw_m, "out", "dropped"),
                datagrams(&ag_m, "in", "received"),
                datagrams(&ag_m, "in", "dropped"),
                ag_in[1],
            );
            break;
        }
        assert!(
            tokio::time::Instant::now() < settled,
            "datagrams lost without being counted: gateway sent/received {gw_out:?}, agent \
             received+dropped/sent {ag_in:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "UDP flood of {sent} datagrams beside TCP: round trip p50 {p50:?}, worst {worst:?}; \
         8 MiB echo in {:?}",
        bulk.elapsed
    );
    assert!(bulk.exact, "{bulk:?}");
    // Generous for a debug build on a shared 2-core machine; an unfair writer makes TCP wait
    // behind the whole datagram queue for every round trip.
    assert!(
        p50 < Duration::from_millis(50),
        "TCP round trip p50 {p50:?} under the flood"
    );
}

/// A real DNS server (Debian's dnsmasq) answering a test zone, published as a UDP forward and
/// asked with `dig` through the tunnel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dig_through_the_tunnel_asks_a_real_dnsmasq() {
    let dns = Dnsmasq::start().await.unwrap();
    let state = tempfile::tempdir().unwrap();
    let gw = GatewaySpec::new(state.path()).start(bin()).await.unwrap();
    let agent = AgentSpec::new(gw.agent_args())
        .forward(&format!("udp:127.0.0.1:{}", dns.port()))
        .start(bin())
        .await
        .unwrap();
    let (answer, stderr) = burrow_testkit::dns::dig(agent.public(0)).await.unwrap();
    assert_eq!(
        answer,
        burrow_testkit::dns::ADDRESS,
        "dig through the tunnel: {answer} {stderr}"
    );
}

/// Whether a datagram sent to `to` comes back from it within a short wait (a few tries).
async fn udp_answers(sock: &UdpSocket, to: SocketAddr) -> bool {
    let mut buf = [0u8; 64];
    for _ in 0..5 {
        sock.send_to(b"ping", to).await.unwrap();
        if let Ok(Ok((n, from))) =
            tokio::time::timeout(Duration::from_millis(200), sock.recv_from(&mut buf)).await
        {
            return from == to && &buf[..n] == b"ping";
        }
    }
    false
}

/// UDP ports the gateway chose survive a gateway restart, as TCP ones do: the lease file keeps
/// them by agent, protocol and service, beside the TCP ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chosen_udp_ports_survive_a_gateway_restart() {
    use burrow_testkit::Signal;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let mut gw = GatewaySpec::new(&state).start(bin()).await.unwrap();
    let target = udp_echo().await;
    let tcp = TcpTarget::echo().await.unwrap();
    let mut agent = AgentSpec::new(gw.agent_args())
        .args(["--max-backoff", "1s"])
        .forward(&tcp.addr().to_string())
        .forward(&format!("udp:{target}"))
        .start(bin())
        .await
        .unwrap();
    let (tcp_port, udp_port) = (agent.public(0), agent.public(1));
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    assert!(
        udp_answers(&client, udp_port).await,
        "UDP through {udp_port}"
    );

    let addr = gw.addr();
    gw.signal(Signal::Term).unwrap();
    assert!(gw.wait_exit(WAIT).await.unwrap().success());
    let leases = std::fs::read_to_string(state.join("leases.toml")).unwrap();
    assert!(
        leases.contains(&format!("port = {}", udp_port.port()))
            && leases.contains("protocol = \"udp\"")
            && leases.matches("[[lease]]").count() == 2,
        "a TCP and a UDP lease: {leases}"
    );
    let _gw = GatewaySpec::new(&state)
        .listen(addr)
        .start(bin())
        .await
        .unwrap();
    let again = agent.wait_regranted(WAIT).await.unwrap();
    assert_eq!(
        again,
        [tcp_port, udp_port],
        "the same TCP and UDP ports after the gateway's restart"
    );
    assert!(
        udp_answers(&client, udp_port).await,
        "datagrams flow again through {udp_port}"
    );
    assert!(burrow_testkit::targets::echo_once(tcp_port, b"tcp")
        .await
        .unwrap());
}

/// A TCP port and a UDP port of the same number are two ports: an agent may bind UDP port P
/// while another agent holds TCP port P (their grants overlap).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_udp_port_of_the_number_another_agent_holds_for_tcp_is_granted() {
    let dir = tempfile::tempdir().unwrap();
    let (ka, kb) = (
        burrow::proto::auth::SecretKey::generate(),
        burrow::proto::auth::SecretKey::generate(),
    );
    let grant = "ports = [\"1024-65535\", \"1024-65535/udp\"]";
    let conf = write_config(
        dir.path(),
        &format!(
            "[[agents]]\nname = \"a\"\nkey_hash = \"{}\"\n{grant}\n\n\
             [[agents]]\nname = \"b\"\nkey_hash = \"{}\"\n{grant}\n",
            ka.hash(),
            kb.hash()
        ),
    );
    let gw = GatewaySpec::new(&dir.path().join("state"))
        .config(&conf)
        .expect_agent_line(false)
        .start(bin())
        .await
        .unwrap();
    let args = |key: &burrow::proto::auth::SecretKey| {
        vec![
            "agent".to_string(),
            "--gateway".into(),
            gw.addr().to_string(),
            "--fingerprint".into(),
            gw.fingerprint().to_string(),
            "--key".into(),
            key.expose().to_string(),
        ]
    };
    let tcp = TcpTarget::echo().await.unwrap();
    let a = AgentSpec::new(args(&ka))
        .forward(&tcp.addr().to_string())
        .start(bin())
        .await
        .unwrap();
    let port = a.public(0).port();
    let target = udp_echo().await;
    let b = AgentSpec::new(args(&kb))
        .forward(&format!("udp:{port}={target}"))
        .start(bin())
        .await
        .expect("UDP port P granted to b while a holds TCP port P");
    assert_eq!(b.public(0).port(), port);
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    assert!(udp_answers(&client, b.public(0)).await);
    assert!(burrow_testkit::targets::echo_once(a.public(0), b"tcp")
        .await
        .unwrap());
}

/// A gateway and an agent with `[udp] idle = "1s"` on both sides (and `gateway` and `agent`,
/// more lines of `[udp]` for each), the agent forwarding UDP to `target`.
async fn with_udp_settings(
    dir: &Path,
    target: SocketAddr,
    (gateway, agent): (&str, &str),
) -> (burrow_testkit::GatewayProc, burrow_testkit::AgentProc) {
    let conf = write_config(dir, &format!("[udp]\nidle = \"1s\"\n{gateway}"));
    let gw = GatewaySpec::new(&dir.join("state"))
        .config(&conf)
        .start(bin())
        .await
        .unwrap();
    let agent_conf = dir.join("agent.toml");
    std::fs::write(&agent_conf, format!("[udp]\nidle = \"1s\"\n{agent}")).unwrap();
    let agent = AgentSpec::new(gw.agent_args())
        .args(["--config", agent_conf.to_str().unwrap()])
        .forward(&format!("udp:{target}"))
        .start(bin())
        .await
        .unwrap();
    (gw, agent)
}

/// Each flow logs one line at info when it ends, at both ends: its service, the client's
/// address (which reached the agent with the flow's first datagram), datagrams and bytes each
/// way, drops and duration.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_flow_logs_its_client_and_counts_each_way_when_it_ends() {
    let dir = tempfile::tempdir().unwrap();
    let target = udp_echo().await;
    let (mut gw, mut agent) = with_udp_settings(dir.path(), target, ("", "")).await;
    let public = agent.public(0);
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut buf = [0u8; 512];
    for i in 0..5u8 {
        client.send_to(&[i; 100], public).await.unwrap();
        let (n, _) = tokio::time::timeout(Duration::from_secs(5), client.recv_from(&mut buf))
            .await
            .expect("an echo on loopback")
            .unwrap();
        assert_eq!(&buf[..n], &[i; 100]);
    }
    let me = client.local_addr().unwrap();
    for (who, line) in [
        (
            "gateway",
            gw.proc.wait_stderr("flow closed", WAIT).await.unwrap(),
        ),
        (
            "agent",
            agent.proc.wait_stderr("flow closed", WAIT).await.unwrap(),
        ),
    ] {
        assert!(line.contains(" INFO "), "{who}: {line}");
        for field in [
            format!("service=\"udp:{target}\""),
            format!("client={me}"),
            "datagrams_to_service=5".into(),
            "bytes_to_service=500".into(),
            "datagrams_to_client=5".into(),
            "bytes_to_client=500".into(),
            "dropped=0".into(),
            "duration_ms=".into(),
        ] {
            assert!(
                line.contains(&field),
                "{who}'s line has no `{field}`: {line}"
            );
        }
    }
}

/// A flow whose target never answers (syslog, metrics) is kept open by the client's
/// datagrams: it stays one flow, one socket toward the target, for as long as they come.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flow_to_a_target_that_never_answers_stays_open_while_the_client_sends() {
    let dir = tempfile::tempdir().unwrap();
    let sink = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let target = sink.local_addr().unwrap();
    let (_gw, agent) = with_udp_settings(dir.path(), target, ("", "")).await;
    let public = agent.public(0);
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    // Fifteen datagrams 200 ms apart: three seconds, three times the idle timeout.
    let mut sources = std::collections::BTreeSet::new();
    let mut buf = [0u8; 64];
    for i in 0..15u8 {
        client.send_to(&[i], public).await.unwrap();
        let (n, from) = tokio::time::timeout(Duration::from_secs(5), sink.recv_from(&mut buf))
            .await
            .expect("the datagram reached the target")
            .unwrap();
        assert_eq!(&buf[..n], &[i]);
        sources.insert(from);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        sources.len(),
        1,
        "one flow, one socket toward the target: {sources:?}"
    );
}

/// Whether a datagram from `sock` to `to` is echoed within `wait` (one try).
async fn echoed_once(sock: &UdpSocket, to: SocketAddr, wait: Duration) -> bool {
    let mut buf = [0u8; 64];
    sock.send_to(b"hi", to).await.unwrap();
    matches!(
        tokio::time::timeout(wait, sock.recv_from(&mut buf)).await,
        Ok(Ok((2, _)))
    )
}

/// `max_flows` reached, at the gateway or at the agent: a new client's datagrams are dropped
/// and the flows already open carry on; once they have ended, a new client gets through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flow_limit_drops_new_flows_and_the_others_carry_on() {
    tokio::join!(
        flow_limit("gateway", ("max_flows = 2\n", "")),
        flow_limit("agent", ("", "max_flows = 2\n")),
    );
}

async fn flow_limit(side: &str, settings: (&str, &str)) {
    let dir = tempfile::tempdir().unwrap();
    let target = udp_echo().await;
    let (_gw, agent) = with_udp_settings(dir.path(), target, settings).await;
    let public = agent.public(0);
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(UdpSocket::bind("127.0.0.1:0").await.unwrap());
    }
    for c in &clients[..2] {
        assert_eq!(
            echo(c, public, b"in").await,
            b"in",
            "{side}: within the limit"
        );
    }
    for _ in 0..3 {
        assert!(
            !echoed_once(&clients[2], public, Duration::from_millis(300)).await,
            "{side}: a third flow past max_flows = 2 is dropped"
        );
    }
    for c in &clients[..2] {
        assert!(
            echoed_once(c, public, Duration::from_secs(5)).await,
            "{side}: the two open flows carry on"
        );
    }
    // Once they have been idle for a second, they end; a new flow fits again. (Its earlier
    // datagrams were dropped, not queued: only this one is echoed.)
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(echo(&clients[2], public, b"now").await, b"now", "{side}");
}
