//! Faults: wrong credentials, restarts of either side, garbage on the tunnel port, port
//! grants, and dead links found by heartbeats.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use burrow::agent::ForwardStatus;
use burrow::config::{AgentGrant, KeySpec, PortRange, TransportKind, Trust};
use burrow::proto::auth::SecretKey;
use burrow::proto::message::{preamble, Role};
use burrow::proto::{Header, Kind};
use burrow::session::handshake;
use burrow::transport::BoxIo;
use common::*;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

/// Upper bound for a whole test, so a hang fails instead of blocking the run.
const TEST_LIMIT: Duration = Duration::from_secs(120);

fn grant(name: &str, key: &SecretKey, ports: Vec<PortRange>) -> AgentGrant {
    AgentGrant {
        name: name.into(),
        key: KeySpec::Key(key.clone()),
        ports,
        paths: Vec::new(),
        socket_mode: burrow::config::DEFAULT_SOCKET_MODE,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_key_is_fatal_on_first_attempt() {
    within(TEST_LIMIT, "wrong key", async {
        let dir = tempfile::tempdir().unwrap();
        let gw = start_gateway(gateway_config(dir.path())).await;
        let echo = echo_server().await;
        let mut cfg = agent_config(&gw, vec![forward(0, echo)]);
        cfg.key = SecretKey::generate();
        let agent = start_agent(cfg);
        let err = within(Duration::from_secs(10), "agent gives up", agent.task)
            .await
            .expect("agent task did not panic")
            .expect_err("a key the gateway does not know is fatal on the first attempt")
            .to_string();
        assert!(
            err.contains(&gw.addr.to_string()),
            "error names the gateway: {err}"
        );
        assert!(err.contains("--key"), "error points at --key: {err}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_fingerprint_is_fatal_on_first_attempt() {
    within(TEST_LIMIT, "wrong fingerprint", async {
        let dir = tempfile::tempdir().unwrap();
        let gw = start_gateway(gateway_config(dir.path())).await;
        let echo = echo_server().await;
        let mut cfg = agent_config(&gw, vec![forward(0, echo)]);
        cfg.trust = Trust::Fingerprint([0x11; 32]);
        let agent = start_agent(cfg);
        let err = within(Duration::from_secs(10), "agent gives up", agent.task)
            .await
            .expect("agent task did not panic")
            .expect_err("a certificate that does not match the pin is fatal")
            .to_string();
        assert!(
            err.contains("fingerprint"),
            "error mentions the fingerprint: {err}"
        );
        assert!(
            err.contains(&gw.addr.to_string()),
            "error names the gateway: {err}"
        );
    })
    .await;
}

/// Runs an agent until its forward is granted, stops it with `stop`, runs a second agent with
/// the same configuration and checks it gets the same public port and carries traffic.
async fn restarted_agent_keeps_port(graceful: bool) {
    let dir = tempfile::tempdir().unwrap();
    let gw = start_gateway(gateway_config(dir.path())).await;
    let echo = echo_server().await;
    let cfg = agent_config(&gw, vec![forward(0, echo)]);
    let mut first = start_agent(cfg.clone());
    let port = granted(&mut first.status).await[0];
    let data = pattern(256 * 1024, 91);
    assert_eq!(echo_roundtrip(port, &data).await, sha(&data));

    if graceful {
        first.stop.cancel();
        within(Duration::from_secs(10), "agent stops", first.task)
            .await
            .expect("agent task did not panic")
            .expect("agent stopped cleanly");
    } else {
        first.task.abort();
        let r = within(
            Duration::from_secs(10),
            "aborted agent task ends",
            first.task,
        )
        .await;
        assert!(r.is_err_and(|e| e.is_cancelled()), "task was aborted");
    }

    let mut second = start_agent(cfg);
    let again = granted(&mut second.status).await[0];
    assert_eq!(
        again, port,
        "the lease gives the restarted agent its port back"
    );
    let data = pattern(1 << 20, 92);
    assert_eq!(echo_roundtrip(again, &data).await, sha(&data));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_stopped_and_restarted_gets_its_port_back() {
    within(
        TEST_LIMIT,
        "graceful restart",
        restarted_agent_keeps_port(true),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_aborted_and_restarted_gets_its_port_back() {
    within(
        TEST_LIMIT,
        "abort restart",
        restarted_agent_keeps_port(false),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_restart_agent_reconnects_by_itself() {
    within(TEST_LIMIT, "gateway restart", async {
        let dir = tempfile::tempdir().unwrap();
        let gw = start_gateway(gateway_config(dir.path())).await;
        let echo = echo_server().await;
        let mut agent = start_agent(agent_config(&gw, vec![forward(0, echo)]));
        let first = granted(&mut agent.status).await[0];
        let data = pattern(256 * 1024, 101);
        assert_eq!(echo_roundtrip(first, &data).await, sha(&data));

        let addr = gw.addr;
        gw.stop.cancel();
        within(Duration::from_secs(15), "gateway stops", gw.task)
            .await
            .expect("gateway task did not panic");

        // Same tunnel address and state dir: same certificate, same generated key.
        let mut cfg = gateway_config(dir.path());
        cfg.listen = addr;
        let gw2 = start_gateway(cfg).await;
        assert_eq!(gw2.addr, addr);
        assert_eq!(gw2.fingerprint, gw.fingerprint, "certificate kept");

        wait_status(
            &mut agent.status,
            Duration::from_secs(20),
            "agent reconnects to the new gateway",
            |s| s.sessions >= 2 && s.connected,
        )
        .await;
        let second = granted(&mut agent.status).await[0];
        let data = pattern(1 << 20, 102);
        assert_eq!(echo_roundtrip(second, &data).await, sha(&data));
        assert_eq!(agent.status.borrow().sessions, 2);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_tls_tunnel_port_is_dropped_agent_unaffected() {
    within(TEST_LIMIT, "garbage on TLS port", async {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = gateway_config(dir.path());
        cfg.limits.handshake_timeout = Duration::from_secs(2);
        let gw = start_gateway(cfg).await;
        let echo = echo_server().await;
        let mut agent = start_agent(agent_config(&gw, vec![forward(0, echo)]));
        let public = granted(&mut agent.status).await[0];

        // Keep the agent busy while the garbage arrives.
        let bulk = tokio::spawn(async move {
            let data = pattern(8 << 20, 111);
            echo_roundtrip(public, &data).await == sha(&data)
        });

        let mut g = TcpStream::connect(gw.addr).await.unwrap();
        // Whether the write completes or the gateway resets us first does not matter.
        let _ = g.write_all(&pattern(4096, 112)).await;
        // Within the 2 s handshake timeout (plus scheduling slack).
        let r = read_until_closed(&mut g, 64 * 1024, Duration::from_secs(3)).await;
        eprintln!("garbage connection ended with {r:?}");

        // A connection that never says anything is cut at the handshake deadline.
        let mut silent = TcpStream::connect(gw.addr).await.unwrap();
        let r = read_until_closed(&mut silent, 64 * 1024, Duration::from_secs(4)).await;
        eprintln!("silent connection ended with {r:?}");

        assert!(
            bulk.await.unwrap(),
            "bulk echo during the garbage is byte-exact"
        );
        let data = pattern(1 << 20, 113);
        assert_eq!(echo_roundtrip(public, &data).await, sha(&data));
        let st = agent.status.borrow().clone();
        assert!(st.connected && st.sessions == 1, "{st:?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_frame_on_tcp_tunnel_is_dropped_agent_unaffected() {
    within(TEST_LIMIT, "oversized frame on TCP port", async {
        let dir = tempfile::tempdir().unwrap();
        let good = SecretKey::generate();
        let intruder = SecretKey::generate();
        let mut cfg = gateway_config(dir.path());
        cfg.transport = TransportKind::Tcp;
        cfg.limits.handshake_timeout = Duration::from_secs(2);
        cfg.agents = vec![
            grant("good", &good, vec![PortRange::UNPRIVILEGED]),
            grant("intruder", &intruder, vec![PortRange::UNPRIVILEGED]),
        ];
        let gw = start_gateway(cfg).await;
        assert!(gw.fingerprint.is_none(), "plain TCP gateway");
        let echo = echo_server().await;
        let mut acfg = agent_config(&gw, vec![forward(0, echo)]);
        assert_eq!(acfg.trust, Trust::Plain);
        acfg.key = good.clone();
        let mut agent = start_agent(acfg);
        let public = granted(&mut agent.status).await[0];

        let bulk = tokio::spawn(async move {
            let data = pattern(8 << 20, 121);
            echo_roundtrip(public, &data).await == sha(&data)
        });
        let huge = Header {
            kind: Kind::Data,
            flags: 0,
            stream: 1,
            length: 100 << 20,
        }
        .to_bytes();

        // Before authentication: the handshake decoder sees the 100 MiB header.
        let mut g = TcpStream::connect(gw.addr).await.unwrap();
        let mut hello = preamble().to_vec();
        hello.extend_from_slice(&huge);
        let _ = g.write_all(&hello).await;
        let r = read_until_closed(&mut g, 64 * 1024, Duration::from_secs(3)).await;
        eprintln!("pre-auth oversized frame: connection ended with {r:?}");

        // After authentication (another agent's key): the session decoder sees it.
        let tcp = TcpStream::connect(gw.addr).await.unwrap();
        let mut io: BoxIo = Box::new(tcp);
        let (ok, _) = within(
            Duration::from_secs(5),
            "intruder handshake",
            handshake::client(&mut io, &intruder, Role::Agent, &[0u8; 32], None),
        )
        .await
        .expect("intruder key is accepted");
        assert_eq!(ok.name, "intruder");
        let _ = io.write_all(&huge).await;
        let _ = io.flush().await;
        let r = within(Duration::from_secs(5), "session closes", async {
            let mut buf = vec![0u8; 16 * 1024];
            let mut total = 0usize;
            loop {
                match tokio::io::AsyncReadExt::read(&mut io, &mut buf).await {
                    Ok(0) => return Ok(total),
                    Ok(n) => total += n,
                    Err(e) => return Err(e),
                }
                assert!(
                    total <= 64 * 1024,
                    "gateway keeps sending instead of closing"
                );
            }
        })
        .await;
        eprintln!("post-auth oversized frame: connection ended with {r:?}");

        assert!(
            bulk.await.unwrap(),
            "bulk echo during the garbage is byte-exact"
        );
        let data = pattern(1 << 20, 122);
        assert_eq!(echo_roundtrip(public, &data).await, sha(&data));
        let st = agent.status.borrow().clone();
        assert!(st.connected && st.sessions == 1, "{st:?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn port_grants_refuse_outside_range_and_ports_in_use() {
    within(TEST_LIMIT, "port grants", async {
        let dir = tempfile::tempdir().unwrap();
        let main_key = SecretKey::generate();
        let limited_key = SecretKey::generate();
        let (lo, hi) = ephemeral_port_range();
        let outside = if lo > 1024 { lo - 1 } else { hi + 1 };
        let mut cfg = gateway_config(dir.path());
        cfg.agents = vec![
            grant("main", &main_key, vec![PortRange::UNPRIVILEGED]),
            grant("limited", &limited_key, vec![PortRange::tcp(lo, hi)]),
        ];
        let gw = start_gateway(cfg).await;
        let echo = echo_server().await;
        let target = burrow::config::Target::Tcp {
            host: echo.ip().to_string(),
            port: echo.port(),
        };

        let mut main_cfg = agent_config(&gw, vec![forward(0, echo)]);
        main_cfg.key = main_key;
        let mut main = start_agent(main_cfg);
        let main_public = granted(&mut main.status).await[0];

        let taken = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let taken_port = taken.local_addr().unwrap().port();
        assert!(
            (lo..=hi).contains(&taken_port),
            "bind(0) lands in the grant"
        );
        let mut limited_cfg = agent_config(
            &gw,
            vec![
                forward_named(outside, target.clone(), "outside"),
                forward_named(0, target.clone(), "any"),
                forward_named(taken_port, target.clone(), "taken"),
            ],
        );
        limited_cfg.key = limited_key;
        let mut limited = start_agent(limited_cfg);
        let got = answers(&mut limited.status).await;

        match &got[0] {
            ForwardStatus::Refused(why) => {
                assert!(
                    why.contains("not granted"),
                    "outside refusal says why: {why}"
                )
            }
            other => panic!("port {outside} outside the grant: {other:?}"),
        }
        let any: std::net::SocketAddr = match &got[1] {
            ForwardStatus::Granted(a) => a.parse().unwrap(),
            other => panic!("port 0 inside the grant: {other:?}"),
        };
        assert!(
            (lo..=hi).contains(&any.port()),
            "granted port {any} is inside the grant"
        );
        match &got[2] {
            ForwardStatus::Refused(why) => {
                assert!(why.contains("in use"), "in-use refusal says why: {why}")
            }
            other => panic!("port {taken_port} already bound: {other:?}"),
        }

        // The status says what is published, and which refusal is asked for again: the port
        // in use may be freed, the port outside the grant will not be granted.
        let st = wait_status(
            &mut limited.status,
            Duration::from_secs(5),
            "refused forwards classified",
            |s| s.forward_retries[2].is_some(),
        )
        .await;
        assert_eq!(st.published(), 1, "{st:?}");
        assert_eq!(st.forward_retries[0], None, "{st:?}");
        assert_eq!(st.forward_retries[1], None, "{st:?}");

        // The refusals cost nothing else: both agents' live forwards carry traffic.
        let data = pattern(512 * 1024, 131);
        assert_eq!(echo_roundtrip(any, &data).await, sha(&data));
        assert_eq!(echo_roundtrip(main_public, &data).await, sha(&data));
        for a in [&main, &limited] {
            let st = a.status.borrow().clone();
            assert!(st.connected && st.sessions == 1, "{st:?}");
        }
        drop(taken);
    })
    .await;
}

/// Gateway with 200 ms heartbeats (dead after 2 misses), an agent dialing it through a
/// [`FreezeProxy`]. Freezes the live link in `which` direction(s) and checks the agent drops
/// the session for a heartbeat, reconnects through a fresh proxied connection, keeps its
/// public port (lease) and carries traffic again. Returns the agent's error for that session.
async fn frozen_link(which: Freeze) -> String {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = gateway_config(dir.path());
    cfg.heartbeat.interval = Duration::from_millis(200);
    cfg.heartbeat.misses = 2;
    let gw = start_gateway(cfg).await;
    let proxy = FreezeProxy::start(gw.addr).await;
    let echo = echo_server().await;
    let mut acfg = agent_config(&gw, vec![forward(0, echo)]);
    acfg.gateway = proxy.addr.to_string();
    let mut agent = start_agent(acfg);
    let public = granted(&mut agent.status).await[0];
    let data = pattern(256 * 1024, 141);
    assert_eq!(echo_roundtrip(public, &data).await, sha(&data));
    assert_eq!(*proxy.accepted().borrow(), 1);

    assert_eq!(proxy.freeze(which), 1);
    // The agent's status keeps the error only until the next session is up (>= 250 ms of
    // backoff later), so catch it while disconnected.
    let down = wait_status(
        &mut agent.status,
        Duration::from_secs(5),
        "agent notices the dead link",
        |s| !s.connected && s.last_error.is_some(),
    )
    .await;
    let error = down.last_error.unwrap();
    assert!(error.contains("heartbeat"), "ended by a heartbeat: {error}");

    // The gateway let go of the dead connection too (its own heartbeat, the agent's GoAway
    // or, at the latest, the replacing session).
    within(
        Duration::from_secs(5),
        "gateway closes the frozen connection",
        proxy.upstream_closed(0).cancelled(),
    )
    .await;

    wait_status(
        &mut agent.status,
        Duration::from_secs(10),
        "agent reconnects",
        |s| s.sessions >= 2 && s.connected,
    )
    .await;
    assert!(*proxy.accepted().borrow() >= 2, "through a new connection");
    let again = granted(&mut agent.status).await[0];
    assert_eq!(again, public, "same public port after the reconnect");
    let data = pattern(1 << 20, 142);
    assert_eq!(echo_roundtrip(again, &data).await, sha(&data));
    error
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeat_detects_frozen_link_and_agent_reconnects() {
    let error = within(TEST_LIMIT, "frozen link", frozen_link(Freeze::Both)).await;
    // Nothing reached the agent, so it found the dead link itself (a GoAway from the
    // gateway would read "timed out (peer: ...)").
    assert!(
        error.starts_with("connection lost: nothing heard from the other side"),
        "agent's own heartbeat: {error}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_heartbeat_detects_silent_agent() {
    // Only agent -> gateway is dead: the agent still hears the gateway's pings, so its own
    // heartbeat cannot fire; the session can only end because the gateway noticed.
    let error = within(TEST_LIMIT, "silent agent", frozen_link(Freeze::ToUpstream)).await;
    assert!(error.contains("(peer:"), "ended by the gateway: {error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_heartbeat_detects_silent_gateway() {
    let error = within(
        TEST_LIMIT,
        "silent gateway",
        frozen_link(Freeze::ToDownstream),
    )
    .await;
    assert!(
        error.starts_with("connection lost: nothing heard from the other side"),
        "agent's own heartbeat: {error}"
    );
}

/// Name of the worker threads of [`graceful_stops_do_not_panic_session_tasks`]'s runtime, so
/// its panic hook counts only panics of the tasks that test started.
const WATCHED_THREADS: &str = "faults-panic-watch";

#[test]
fn graceful_stops_do_not_panic_session_tasks() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static PANICS: AtomicUsize = AtomicUsize::new(0);
    // Tokio catches a spawned task's panic, so the only witness is the panic hook. Chain to the
    // previous hook and count only our runtime's threads: other tests are unaffected.
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if std::thread::current().name() == Some(WATCHED_THREADS) {
            PANICS.fetch_add(1, Ordering::SeqCst);
        }
        previous(info);
    }));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(WATCHED_THREADS)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(within(TEST_LIMIT, "stop cycles", async {
        let dir = tempfile::tempdir().unwrap();
        let gw = start_gateway(gateway_config(dir.path())).await;
        let echo = echo_server().await;
        let cfg = agent_config(&gw, vec![forward(0, echo)]);
        for round in 0..10u64 {
            let mut agent = start_agent(cfg.clone());
            let public = granted(&mut agent.status).await[0];
            let data = pattern(64 * 1024, 150 + round);
            assert_eq!(echo_roundtrip(public, &data).await, sha(&data));
            agent.stop.cancel();
            within(Duration::from_secs(10), "agent stops", agent.task)
                .await
                .unwrap()
                .unwrap();
        }
        gw.stop.cancel();
        within(Duration::from_secs(15), "gateway stops", gw.task)
            .await
            .unwrap();
    }));
    drop(rt);
    assert_eq!(
        PANICS.load(Ordering::SeqCst),
        0,
        "tasks panicked during graceful stops (see the panic messages above)"
    );
}
