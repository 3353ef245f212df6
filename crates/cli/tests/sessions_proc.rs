//! What a user meets in the first hour with several agents, through the real binary (issue
//! "first hour", the gateway and agent items). `docs/testing.md` has the figures.
//!
//! - F1: a failing agent does not lock out the other agents behind its address; past its
//!   budget it is told, inside TLS, that it is rate-limited and when to retry, and stops; the
//!   gateway warns once.
//! - F2: two agents with one key do not take the session from each other forever: each is told
//!   the other's address, they back off, and the one taken over three times in a row stops.
//! - F4: a forward refused because its port is in use is asked for again until the port is
//!   free; an agent whose every forward is refused for good exits non-zero.
//! - F5: a port the gateway chose comes back after a gateway restart; a corrupt lease file is
//!   reported and ignored.
//! - F12: overlapping grants are warned about at start, and a refusal names the agent holding
//!   the port.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::Duration;

use burrow_testkit::harness::{agent_args, dirs, keygen, within};
use burrow_testkit::process::wait_public;
use burrow_testkit::targets::echo_once;
use burrow_testkit::{AgentSpec, Burrow, GatewaySpec, Signal, TcpTarget};
use tokio::time::Instant;

/// Upper bound for a whole test, so a hang fails instead of blocking the run.
const TEST_LIMIT: Duration = Duration::from_secs(120);
/// How long a process gets to print what we wait for.
const WAIT: Duration = Duration::from_secs(30);

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_burrow"))
}

/// How many of `proc`'s stderr lines contain every one of `needles`.
fn count_lines(proc: &mut Burrow, needles: &[&str]) -> usize {
    proc.stderr_lines()
        .iter()
        .filter(|l| needles.iter().all(|n| l.contains(n)))
        .count()
}

/// Runs an agent until it exits by itself (within `limit`); returns its stderr.
async fn run_to_exit(spec: &AgentSpec, limit: Duration) -> (bool, String) {
    let mut p = Burrow::start(spec.command(bin())).unwrap();
    let status = p.wait_exit(limit).await.unwrap_or_else(|e| {
        panic!("agent did not exit by itself: {e}");
    });
    (status.success(), p.stderr_lines().join("\n"))
}

// ---------------------------------------------------------------------------------------
// F1

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f1_a_failing_agent_does_not_lock_out_its_neighbours() {
    within(TEST_LIMIT, "F1", async {
        let d = dirs();
        let mut gw = GatewaySpec::new(&d.state)
            .args(["--log-level", "debug"])
            .start(bin())
            .await
            .unwrap();
        // A stale container with a revoked key, restarted over and over from the same
        // address as a good agent.
        let bad = AgentSpec::new(agent_args(&gw, &keygen(bin()))).forward("127.0.0.1:9");
        for i in 0..5 {
            let (ok, err) = run_to_exit(&bad, WAIT).await;
            assert!(!ok && err.contains("rejected the key"), "attempt {i}: {err}");
        }
        // Past its budget: told inside TLS, and it stops (before: cut before TLS, the agent
        // retried "tls handshake eof" forever).
        let t = Instant::now();
        let (ok, err) = run_to_exit(&bad, Duration::from_secs(10)).await;
        let took = t.elapsed();
        assert!(!ok, "{err}");
        assert!(
            err.contains("rate-limited: too many failed attempts from your address, retry in ")
                && err.contains("check --key"),
            "{err}"
        );
        let (_, err) = run_to_exit(&bad, Duration::from_secs(10)).await;
        assert!(err.contains("rate-limited"), "{err}");

        // The good agent from the same address still logs in and serves.
        let echo = TcpTarget::echo().await.unwrap();
        let t = Instant::now();
        let good = AgentSpec::new(gw.agent_args())
            .forward(&echo.addr().to_string())
            .start(bin())
            .await
            .unwrap();
        let login = t.elapsed();
        assert!(echo_once(good.public(0), b"neighbour").await.unwrap());

        // One warning for the throttled address and key class, however many refusals.
        gw.wait_stderr("agent connected", WAIT).await.unwrap();
        let warned = count_lines(&mut gw, &["WARN", "too many failed handshakes from this address"]);
        let refusals = count_lines(&mut gw, &["tunnel handshake refused", "rate-limited"]);
        println!(
            "F1: 6th attempt refused and exited in {took:?}; good agent from the same address in {login:?}; gateway: {warned} warning, {refusals} more refusals at debug"
        );
        assert_eq!(warned, 1, "{:?}", gw.stderr_tail());
        assert!(refusals >= 1, "later refusals are logged at debug");
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// F2

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f2_two_agents_with_one_key_stop_taking_over_each_other() {
    within(TEST_LIMIT, "F2", async {
        let d = dirs();
        let mut gw = GatewaySpec::new(&d.state).start(bin()).await.unwrap();
        let echo = TcpTarget::echo().await.unwrap();
        let spec = AgentSpec::new(gw.agent_args())
            .args(["--max-backoff", "1s"])
            .forward(&echo.addr().to_string());
        let mut old = spec.start(bin()).await.unwrap();
        // A second copy with the same key (the stale container's replacement).
        let t = Instant::now();
        let mut new = spec.start(bin()).await.unwrap();
        let told = old
            .wait_stderr("session taken over by another agent with this key", WAIT)
            .await
            .unwrap();
        assert!(told.contains("connected from 127.0.0.1:"), "{told}");
        let status = old.wait_exit(Duration::from_secs(20)).await.unwrap();
        let stopped = t.elapsed();
        let err = old.stderr_lines().join("\n");
        assert!(!status.success(), "{err}");
        assert!(
            err.contains("another agent with this key is connected from 127.0.0.1:"),
            "{err}"
        );
        // Each side was told the other's address; the one left keeps serving.
        let back = new
            .wait_stderr("session taken over by another agent with this key", WAIT)
            .await
            .unwrap();
        assert!(back.contains("connected from 127.0.0.1:"), "{back}");
        let public = new.wait_regranted(WAIT).await.unwrap()[0];
        assert!(echo_once(public, b"survivor").await.unwrap());
        let takeovers = count_lines(&mut gw, &["replacing its previous session"]);
        println!("F2: the first agent stopped {stopped:?} after the second started, after {takeovers} takeovers at the gateway");
        assert!(takeovers <= 6, "takeovers: {takeovers}");
        // Nothing takes the session any more.
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(count_lines(&mut gw, &["replacing its previous session"]), takeovers);
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// F4

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f4_a_refused_forward_is_asked_for_again_once_its_port_is_free() {
    within(TEST_LIMIT, "F4", async {
        let d = dirs();
        let gw = GatewaySpec::new(&d.state).start(bin()).await.unwrap();
        let echo = TcpTarget::echo().await.unwrap();
        // Something else holds the public port on the gateway's host.
        let squatter = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = squatter.local_addr().unwrap().port();
        let spec = format!("{port}={}", echo.addr());
        let mut agent = Burrow::start(
            AgentSpec::new(gw.agent_args())
                .args(["--max-backoff", "2s"])
                .forward(&spec)
                .command(bin()),
        )
        .unwrap();
        let refused = agent
            .wait_stdout(|l| l.starts_with(&format!("forward {spec}: refused")), WAIT)
            .await
            .unwrap();
        assert!(refused.contains("in use"), "{refused}");
        agent.wait_stderr("asking again in", WAIT).await.unwrap();
        let freed = Instant::now();
        drop(squatter);
        let public = wait_public(
            &mut agent,
            std::slice::from_ref(&spec),
            Duration::from_secs(10),
        )
        .await
        .unwrap()[0];
        let took = freed.elapsed();
        assert_eq!(public.port(), port);
        assert!(echo_once(public, b"retried").await.unwrap());
        println!("F4: forward granted {took:?} after its port was freed (max backoff 2 s)");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f4_an_agent_with_nothing_to_publish_exits_non_zero() {
    within(TEST_LIMIT, "F4b", async {
        let d = dirs();
        let key = keygen(bin());
        let cfg = d.config(&format!(
            "[[agents]]\nname = \"narrow\"\nkey = \"{key}\"\nports = [40000]\n"
        ));
        let gw = GatewaySpec::new(&d.state)
            .config(&cfg)
            .expect_agent_line(false)
            .start(bin())
            .await
            .unwrap();
        let spec = AgentSpec::new(agent_args(&gw, &key))
            .forward("30001=127.0.0.1:9")
            .forward("30002=127.0.0.1:9");
        let (ok, err) = run_to_exit(&spec, Duration::from_secs(10)).await;
        assert!(!ok, "{err}");
        assert!(
            err.contains("nothing to publish")
                && err.contains("port 30001 is not granted")
                && err.contains("port 30002 is not granted"),
            "{err}"
        );
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// F5

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f5_chosen_ports_survive_a_gateway_restart() {
    within(TEST_LIMIT, "F5", async {
        let d = dirs();
        let mut gw = GatewaySpec::new(&d.state).start(bin()).await.unwrap();
        let echo = TcpTarget::echo().await.unwrap();
        let mut agent = AgentSpec::new(gw.agent_args())
            .args(["--max-backoff", "1s"])
            .forward(&echo.addr().to_string())
            .start(bin())
            .await
            .unwrap();
        let chosen = agent.public(0);
        let addr = gw.addr();
        gw.signal(Signal::Term).unwrap();
        assert!(gw.wait_exit(WAIT).await.unwrap().success());
        let restarted = Instant::now();
        let mut gw = GatewaySpec::new(&d.state)
            .listen(addr)
            .start(bin())
            .await
            .unwrap();
        let again = agent.wait_regranted(WAIT).await.unwrap()[0];
        let took = restarted.elapsed();
        assert_eq!(again, chosen, "the same port after a restart");
        assert!(echo_once(again, b"same port").await.unwrap());
        println!("F5: port {} back {took:?} after the restart", chosen.port());

        // A corrupt lease file is reported and ignored.
        gw.signal(Signal::Term).unwrap();
        assert!(gw.wait_exit(WAIT).await.unwrap().success());
        std::fs::write(d.state.join("leases.toml"), "[[lease]\ngarbage").unwrap();
        let mut gw = GatewaySpec::new(&d.state)
            .listen(addr)
            .start(bin())
            .await
            .unwrap();
        let line = gw.wait_stderr("leases.toml ignored", WAIT).await.unwrap();
        assert!(line.contains("WARN"), "{line}");
        let public = agent.wait_regranted(WAIT).await.unwrap()[0];
        assert!(echo_once(public, b"new port").await.unwrap());
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// F12

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f12_overlapping_grants_are_named() {
    within(TEST_LIMIT, "F12", async {
        let d = dirs();
        let (ka, kb) = (keygen(bin()), keygen(bin()));
        let cfg = d.config(&format!(
            "[[agents]]\nname = \"alpha\"\nkey = \"{ka}\"\nports = [\"1024-65535\"]\n\n\
             [[agents]]\nname = \"beta\"\nkey = \"{kb}\"\nports = [8080, \"20000-65535\"]\n"
        ));
        let mut gw = GatewaySpec::new(&d.state)
            .config(&cfg)
            .expect_agent_line(false)
            .start(bin())
            .await
            .unwrap();
        let warning = gw
            .wait_stderr("are both granted ports", WAIT)
            .await
            .unwrap();
        assert!(
            warning.contains("WARN")
                && warning
                    .contains("agents `alpha` and `beta` are both granted ports 8080, 20000-65535"),
            "{warning}"
        );
        let echo = TcpTarget::echo().await.unwrap();
        let a = AgentSpec::new(agent_args(&gw, &ka))
            .forward(&echo.addr().to_string())
            .start(bin())
            .await
            .unwrap();
        let port = a.public(0).port();
        let spec = format!("{port}={}", echo.addr());
        let mut b = Burrow::start(
            AgentSpec::new(agent_args(&gw, &kb))
                .forward(&spec)
                .command(bin()),
        )
        .unwrap();
        let refused = b
            .wait_stdout(|l| l.starts_with(&format!("forward {spec}: refused")), WAIT)
            .await
            .unwrap();
        assert!(
            refused.contains(&format!("port {port} is held by agent `alpha`")),
            "{refused}"
        );
    })
    .await;
}
