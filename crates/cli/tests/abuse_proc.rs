//! Abuse through the real binary: floods from a hostile internet against the tunnel port and
//! the public ports, and an agent that churns its ports by taking over its own sessions
//! (hardening issue, findings 2, 3 and 5). `docs/testing.md` has the figures.
//!
//! - H2: idle pre-auth connections from several addresses, re-opened as they are cut, do not
//!   keep a real agent from logging in.
//! - H3: more public clients than the usual soft open-file limit: the gateway raises its
//!   limit, caps public connections, keeps descriptors for the tunnel port, and another
//!   tenant's agent still logs in (also with a hard limit of 1024, where only the caps and the
//!   reserve help).
//! - H5: the ports of a replaced session close when their lease runs out, though a session
//!   lives; one agent's ports are bounded across sessions.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use burrow_testkit::attack::loopback;
use burrow_testkit::harness::{self, agent_args, dirs};
use burrow_testkit::process::{count_tcp_state, wait_public};
use burrow_testkit::targets::echo_once;
use burrow_testkit::{
    raise_fd_limit, AgentSpec, Burrow, FaultProxy, FloodOpts, GatewaySpec, IdleFlood, TcpState,
    TcpTarget,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Upper bound for a whole test, so a hang fails instead of blocking the run.
const TEST_LIMIT: Duration = Duration::from_secs(120);
/// How long a process gets to print what we wait for when nothing is under attack.
const WAIT: Duration = Duration::from_secs(30);
/// How long a legitimate agent may take to log in while an attack goes on.
const LOGIN_BOUND: Duration = Duration::from_secs(3);

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_burrow"))
}

async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    harness::within(TEST_LIMIT, what, f).await
}

fn keygen() -> String {
    harness::keygen(bin())
}

/// Polls `f` every 20 ms until it returns `Some`, or panics after `limit` with `describe()`.
async fn eventually<T>(
    limit: Duration,
    f: impl FnMut() -> Option<T>,
    describe: impl Fn() -> String,
) -> T {
    harness::eventually(limit, Duration::from_millis(20), f, describe).await
}

/// How many of `proc`'s stderr lines contain `needle`.
fn count_lines(proc: &mut Burrow, needle: &str) -> usize {
    proc.stderr_lines()
        .iter()
        .filter(|l| l.contains(needle))
        .count()
}

// ---------------------------------------------------------------------------------------
// H2

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_idle_preauth_flood_does_not_lock_out_agent_logins() {
    within("H2", async {
        raise_fd_limit();
        let d = dirs();
        // 32 pre-auth slots against 8 sources holding 12 idle connections each: the table is
        // full for the whole test, and every source tries to hold more than its share.
        let cfg = d.config("[limits]\nmax_preauth = 32\n");
        let mut gw = GatewaySpec::new(&d.state)
            .config(&cfg)
            .start(bin())
            .await
            .unwrap();
        let mut opts = FloodOpts::new(gw.addr(), (2..=9).map(loopback).collect(), 12);
        opts.duration = Duration::from_secs(30);
        let flood = IdleFlood::start(opts);
        assert!(
            flood.wait_open(32, Duration::from_secs(10)).await,
            "the flood holds the gateway's 32 slots"
        );
        // The table is full: the gateway has started cutting the flood's extra connections.
        eventually(
            Duration::from_secs(10),
            || {
                let c = flood.counts();
                (c.cuts.load(std::sync::atomic::Ordering::Relaxed) >= 50).then_some(())
            },
            || format!("the gateway cuts extra connections: {:?}", flood.counts()),
        )
        .await;

        let echo = TcpTarget::echo().await.unwrap();
        let spec = AgentSpec::new(gw.agent_args())
            .args(["--max-backoff", "1s"])
            .forward(&echo.addr().to_string());
        let started = Instant::now();
        let mut agent = Burrow::start(spec.command(bin())).unwrap();
        let login = wait_public(&mut agent, &spec.forwards, LOGIN_BOUND).await;
        let took = started.elapsed();
        let open_during = flood.open();
        let public = match login {
            Ok(p) => p[0],
            Err(e) => panic!(
                "the agent did not log in within {LOGIN_BOUND:?} under the flood ({:?}): {e}\n\
                 gateway: {:#?}",
                flood.counts(),
                gw.stderr_tail()
            ),
        };
        assert!(echo_once(public, b"through the flood").await.unwrap());
        let flooded_for = started.elapsed();
        let report = flood.stop().await;
        println!(
            "H2: agent logged in {took:?} after starting, under a flood of {report} from 8 \
             addresses ({open_during} open at login)"
        );
        assert!(
            report.cuts > 0 && open_during >= 16,
            "the flood was on: {report}"
        );
        // Both defences were at work, each said so: the per-address cap and the eviction of
        // connections that sent nothing.
        let capped = count_lines(&mut gw, "limits.max_preauth_per_source");
        let evicted = count_lines(&mut gw, "it had sent nothing");
        assert!(
            capped >= 1 && evicted >= 1,
            "{capped} lines about the per-source cap, {evicted} about evictions"
        );
        // Refusals and evictions are logged at most once a second each (plus the first).
        let secs = flooded_for.as_secs() as usize + 12;
        let warned = count_lines(&mut gw, "tunnel connection");
        assert!(
            warned <= 2 * secs,
            "{warned} warnings about tunnel connections in about {secs} s: throttle them"
        );
        assert!(gw.panics().is_empty(), "{:#?}", gw.panics());
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// H3

/// Clients of the flood of public connections.
const PUBLIC_CLIENTS: usize = 1_100;

/// Opens `n` connections to `public` (64 at a time), each echoing one byte; returns the
/// connections that echoed (held open) and how many were refused.
async fn open_clients(public: SocketAddr, n: usize) -> (Vec<TcpStream>, usize) {
    let mut held = Vec::new();
    let mut refused = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    for batch in 0..n.div_ceil(64) {
        assert!(Instant::now() < deadline, "1,100 connections within 60 s");
        let mut set = tokio::task::JoinSet::new();
        for _ in batch * 64..((batch + 1) * 64).min(n) {
            set.spawn(async move {
                let mut c = TcpStream::connect(public).await.ok()?;
                let echoed = tokio::time::timeout(Duration::from_secs(5), async {
                    c.write_all(b"x").await?;
                    let mut b = [0u8; 1];
                    c.read_exact(&mut b).await.map(|_| b[0] == b'x')
                })
                .await;
                matches!(echoed, Ok(Ok(true))).then_some(c)
            });
        }
        while let Some(r) = set.join_next().await {
            match r.unwrap() {
                Some(c) => held.push(c),
                None => refused += 1,
            }
        }
    }
    (held, refused)
}

/// A gateway with two tenants started with a soft open-file limit of 1024 (and a hard one of
/// 1024 if `hard_1024`); tenant `a` gets [`PUBLIC_CLIENTS`] clients, then tenant `b`'s agent
/// must log in within [`LOGIN_BOUND`].
async fn public_flood(hard_1024: bool) {
    let ours = raise_fd_limit();
    // This process holds both ends of every client's path (the client and the echo target).
    if ours < 8 * PUBLIC_CLIENTS as u64 {
        println!("H3: skipped: this process may open only {ours} files (need 8,800)");
        return;
    }
    let d = dirs();
    let (ka, kb) = (keygen(), keygen());
    let cfg = d.config(&format!(
        "[[agents]]\nname = \"a\"\nkey = \"{ka}\"\nports = [\"1024-65535\"]\n\n\
         [[agents]]\nname = \"b\"\nkey = \"{kb}\"\nports = [\"1024-65535\"]\n"
    ));
    let hard = hard_1024.then_some(1024);
    let mut gw = GatewaySpec::new(&d.state)
        .config(&cfg)
        .expect_agent_line(false)
        .open_files(1024, hard)
        .start(bin())
        .await
        .unwrap();
    let echo = TcpTarget::echo().await.unwrap();
    let a = AgentSpec::new(agent_args(&gw, &ka))
        .forward(&echo.addr().to_string())
        .start(bin())
        .await
        .unwrap();
    let base = gw.stats().unwrap();
    let started = Instant::now();
    let (held, refused) = open_clients(a.public(0), PUBLIC_CLIENTS).await;
    let flood_took = started.elapsed();
    let busy = gw.stats().unwrap();

    let echo_b = TcpTarget::echo().await.unwrap();
    let spec_b = AgentSpec::new(agent_args(&gw, &kb))
        .args(["--max-backoff", "1s"])
        .forward(&echo_b.addr().to_string());
    let t = Instant::now();
    let b = tokio::time::timeout(LOGIN_BOUND, spec_b.start(bin())).await;
    let took = t.elapsed();
    let which = if hard_1024 { "hard 1024" } else { "hard above" };
    println!(
        "H3 ({which}): {} of {PUBLIC_CLIENTS} public clients echoed, {refused} refused, in \
         {flood_took:?}; gateway fds {} -> {}; tenant b logged in after {took:?}",
        held.len(),
        base.fds,
        busy.fds
    );
    let b = match b {
        Ok(Ok(b)) => b,
        other => panic!(
            "tenant b's agent did not log in within {LOGIN_BOUND:?} while {} public \
             connections were open ({}); gateway: {:#?}",
            held.len(),
            match other {
                Ok(Err(e)) => e.to_string(),
                _ => "timed out".into(),
            },
            gw.stderr_tail()
        ),
    };
    let limit_line = gw.wait_stderr("open-file limit", WAIT).await.unwrap();
    let expect_soft = if hard_1024 { 1024 } else { ours };
    assert!(
        limit_line.contains(&format!("soft {expect_soft}")) && limit_line.contains("1024"),
        "the gateway logs its soft limit (was 1024, now {expect_soft}) and the hard one: \
         {limit_line}"
    );
    if hard_1024 {
        assert!(
            refused > 0 && busy.fds < 1024,
            "the caps refuse what the descriptors cannot carry ({refused} refused, {} fds)",
            busy.fds
        );
        // Refusals are counted and logged once a second, not once each.
        let lines = count_lines(&mut gw, "public connection refused");
        let secs = flood_took.as_secs() as usize + 2;
        assert!(
            (1..=secs).contains(&lines),
            "{lines} refusal lines for {refused} refusals in about {secs} s"
        );
    } else {
        assert_eq!(refused, 0, "with the limit raised, every client is served");
    }
    let accept_errors = count_lines(&mut gw, "accept on tunnel port failed");
    assert!(
        accept_errors <= 1,
        "{accept_errors} tunnel accept errors logged: the tunnel port was starved"
    );
    // Once the clients are gone, both tenants serve again.
    drop(held);
    assert!(
        eventually(
            Duration::from_secs(10),
            || (gw.stats().unwrap().fds <= base.fds + 4).then_some(true),
            || format!("gateway fds back to {}: {:?}", base.fds, gw.stats()),
        )
        .await
    );
    assert!(echo_once(b.public(0), b"tenant b").await.unwrap());
    assert!(echo_once(a.public(0), b"tenant a").await.unwrap());
    assert!(gw.panics().is_empty(), "{:#?}", gw.panics());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h3_public_flood_past_the_soft_fd_limit_leaves_room_for_agent_logins() {
    within("H3", public_flood(false)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h3_public_flood_with_a_hard_fd_limit_of_1024_leaves_room_for_agent_logins() {
    within("H3 hard", public_flood(true)).await;
}

// ---------------------------------------------------------------------------------------
// H5

fn listening(port: u16) -> bool {
    count_tcp_state(&[port], TcpState::Listen).unwrap() > 0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h5_replaced_sessions_ports_close_when_their_lease_runs_out() {
    within("H5", async {
        let d = dirs();
        let cfg = d.config("lease = \"1s\"\n");
        let mut gw = GatewaySpec::new(&d.state)
            .config(&cfg)
            .start(bin())
            .await
            .unwrap();
        // The first agent's host hangs (its tunnel freezes); the agent is restarted elsewhere
        // with the same key and without the first forward.
        let proxy = FaultProxy::start(gw.addr()).await.unwrap();
        let (old_target, new_target) = (
            TcpTarget::echo().await.unwrap(),
            TcpTarget::echo().await.unwrap(),
        );
        let first = AgentSpec::new(gw.agent_args_via(proxy.addr()))
            .forward(&format!("0={}", old_target.addr()))
            .start(bin())
            .await
            .unwrap();
        let old_port = first.public(0).port();
        assert!(echo_once(first.public(0), b"old").await.unwrap());
        let before = gw.stats().unwrap();
        proxy.control().freeze_all();
        let mut second = AgentSpec::new(gw.agent_args())
            .forward(&new_target.addr().to_string())
            .start(bin())
            .await
            .unwrap();
        gw.wait_stderr("replacing its previous session", WAIT)
            .await
            .unwrap();
        let replaced = gw.stats().unwrap();
        let t = Instant::now();
        assert!(listening(old_port), "the old port is kept for its lease");
        let closed_after = eventually(
            Duration::from_secs(4),
            || (!listening(old_port)).then(|| t.elapsed()),
            || format!("port {old_port} of the replaced session stops listening (lease 1 s)"),
        )
        .await;
        let after = eventually(
            Duration::from_secs(2),
            || {
                let s = gw.stats().unwrap();
                (s.fds < replaced.fds).then_some(s)
            },
            || {
                format!(
                    "the gateway lets the port's descriptor go: {:?}",
                    gw.stats()
                )
            },
        )
        .await;
        println!(
            "H5: replaced session's port closed {closed_after:?} after the takeover (lease 1 s); \
             gateway fds {} before, {} after the takeover, {} after the lease",
            before.fds, replaced.fds, after.fds
        );
        assert!(echo_once(second.public(0), b"new session lives")
            .await
            .unwrap());
        gw.wait_stderr("lease expired; public port closed", WAIT)
            .await
            .unwrap();
        assert_eq!(
            count_lines(&mut second, "reconnecting"),
            0,
            "the new session lived throughout: {:#?}",
            second.stderr_tail()
        );
        drop(first);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h5_one_agents_ports_are_bounded_across_takeovers() {
    within("H5 bound", async {
        let d = dirs();
        // Leases far longer than the test: only the bound keeps the ports in check.
        let cfg = d.config("lease = \"10m\"\n[limits]\nmax_ports_per_agent = 4\n");
        let mut gw = GatewaySpec::new(&d.state)
            .config(&cfg)
            .start(bin())
            .await
            .unwrap();
        let base = gw.stats().unwrap();
        let mut proxies = Vec::new();
        let mut agents = Vec::new();
        let mut targets = Vec::new();
        let mut fds = Vec::new();
        // Four takeovers, each with two new ports: eight ports asked for over time.
        for round in 0..4 {
            let proxy = FaultProxy::start(gw.addr()).await.unwrap();
            let mut spec = AgentSpec::new(gw.agent_args_via(proxy.addr()));
            for _ in 0..2 {
                let t = TcpTarget::echo().await.unwrap();
                spec = spec.forward(&t.addr().to_string());
                targets.push(t);
            }
            let agent = spec.start(bin()).await.unwrap();
            if round > 0 {
                gw.wait_stderr("replacing its previous session", WAIT)
                    .await
                    .unwrap();
            }
            for p in agent.public_addrs() {
                assert!(echo_once(*p, b"live").await.unwrap());
            }
            // The replaced session's socket goes; what stays is one session and the ports.
            let held = eventually(
                Duration::from_secs(5),
                || {
                    let s = gw.stats().unwrap();
                    (s.fds <= base.fds + 1 + 4).then_some(s.fds)
                },
                || {
                    format!(
                        "after takeover {round}: gateway holds at most 4 ports and one session \
                         ({} fds at start): {:?}",
                        base.fds,
                        gw.stats()
                    )
                },
            )
            .await;
            fds.push(held);
            // The next takeover happens while this agent's host hangs.
            proxy.control().freeze_all();
            proxies.push(proxy);
            agents.push(agent);
        }
        // One session asking for more than the bound gets the bound, and is told why.
        let mut spec = AgentSpec::new(gw.agent_args());
        for _ in 0..5 {
            let t = TcpTarget::echo().await.unwrap();
            spec = spec.forward(&t.addr().to_string());
            targets.push(t);
        }
        let mut last = Burrow::start(spec.command(bin())).unwrap();
        let mut granted = 0;
        let mut refused = Vec::new();
        for _ in 0..5 {
            let l = last
                .wait_stdout(|l| l.starts_with("forward "), WAIT)
                .await
                .unwrap();
            if l.contains(": public address ") {
                granted += 1;
            } else {
                refused.push(l);
            }
        }
        println!(
            "H5 bound: gateway fds {} at start, {fds:?} after each takeover (2 new ports each, \
             bound 4); a session asking for 5 got {granted}: {refused:?}",
            base.fds
        );
        assert_eq!(granted, 4, "{refused:?}");
        assert!(
            refused.len() == 1 && refused[0].contains("max_ports_per_agent"),
            "the refusal names the limit: {refused:?}"
        );
        // The last takeover closed the previous session: one session and four ports again.
        eventually(
            Duration::from_secs(5),
            || (gw.stats().unwrap().fds <= base.fds + 1 + 4).then_some(()),
            || format!("at most 4 ports and one session: {:?}", gw.stats()),
        )
        .await;
        assert!(gw.panics().is_empty(), "{:#?}", gw.panics());
    })
    .await;
}
