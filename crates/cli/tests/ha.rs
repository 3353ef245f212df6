//! High availability through the real binary (issue "scale out"): several agents publish one
//! service in a group, and one agent keeps sessions with two gateways behind a real nginx
//! (Debian's package, `stream` module). `docs/testing.md` has the figures.
//!
//! - Two agents in one group: 400 connections spread 40-60% each; one agent killed, after
//!   the gateway notices (short heartbeats) no new connection fails and each is byte-exact;
//!   the agent restarted rejoins and gets new connections again.
//! - Group binds refused with a reason the agent prints (its grant lacks the port, another
//!   group's port, not a member of a declared group), the group unaffected.
//! - UDP in a group: each client's flow stays with one member.
//! - One agent on two gateways behind nginx's passive checks: byte-exact; one gateway killed,
//!   clients keep being served through the other, none hangs; the gateway restarted, the
//!   agent reconnects by itself. Its status names each gateway.
//! - The HAProxy example passes `haproxy -c`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use burrow_testkit::harness::{agent_args_with, keygen_with_hash, within};
use burrow_testkit::targets::{echo_bytes, Pattern};
use burrow_testkit::{AgentSpec, Burrow, GatewayProc, GatewaySpec, Nginx, Signal, TcpTarget};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UdpSocket;
use tokio::time::Instant;

/// Upper bound for a whole test, so a hang fails instead of blocking the run.
const TEST_LIMIT: Duration = Duration::from_secs(120);
/// How long a process gets to print what we wait for.
const WAIT: Duration = Duration::from_secs(30);
/// How long one client connection may take before it counts as hung.
const CLIENT_LIMIT: Duration = Duration::from_secs(10);
/// The gateways' heartbeat: a silent peer is dropped within 200 ms × 3 (+ one interval).
const HEARTBEAT: &str = "[heartbeat]\ninterval = \"200ms\"\nmisses = 3\n";
const HEARTBEAT_BOUND: Duration = Duration::from_millis(800);

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_burrow"))
}

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples")
}

/// The agent arguments for `key` against `gw`, retrying within a second.
fn agent_args(gw: &GatewayProc, key: &str) -> Vec<String> {
    agent_args_with(gw, key, &["--max-backoff", "1s"])
}

/// Starts an agent with `args` and forward `spec` and waits for its `forward NAME: refused`
/// line (the name is the spec without its options); returns the agent and the line.
async fn refused_forward(args: Vec<String>, spec: &str) -> (Burrow, String) {
    let mut p = Burrow::start(AgentSpec::new(args).forward(spec).command(bin())).unwrap();
    let name = spec.split('?').next().unwrap();
    let line = p
        .wait_stdout(|l| l.starts_with(&format!("forward {name}: refused")), WAIT)
        .await
        .unwrap();
    (p, line)
}

/// `n` echo connections to `addr`, `parallel` at a time, of a few KiB each (sizes and
/// contents differ): every one must come back byte-exact within [`CLIENT_LIMIT`].
async fn clients(addr: SocketAddr, n: u64, parallel: usize, seed: u64) {
    // One pattern for all (making one costs a 1 MiB block), each connection its own slice.
    let pattern = Pattern::new(seed);
    let limit = Arc::new(tokio::sync::Semaphore::new(parallel));
    let mut tasks = Vec::new();
    for i in 0..n {
        let permit = limit.clone().acquire_owned().await.unwrap();
        let data = pattern.bytes(i * 7919, 1024 + (i as usize * 397) % 6000);
        tasks.push(tokio::spawn(async move {
            let _permit = permit;
            let r = tokio::time::timeout(CLIENT_LIMIT, echo_bytes(addr, &data)).await;
            match r {
                Ok(Ok(back)) if back == data => Ok(()),
                Ok(Ok(back)) => Err(format!(
                    "connection {i}: not byte-exact: {} bytes sent, {} back",
                    data.len(),
                    back.len()
                )),
                Ok(Err(e)) => Err(format!("connection {i}: {e}")),
                Err(_) => Err(format!("connection {i}: hung for {CLIENT_LIMIT:?}")),
            }
        }));
    }
    let mut failed = Vec::new();
    for t in tasks {
        if let Err(e) = t.await.unwrap() {
            failed.push(e);
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {n} connections failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
}

/// A gateway config granting each of `agents` (name, key) every unprivileged port, with
/// short heartbeats and `extra`.
fn gateway_config(dir: &Path, agents: &[(&str, &str)], extra: &str) -> PathBuf {
    let mut text = format!("lease = \"5s\"\n{HEARTBEAT}{extra}\n");
    for (name, key) in agents {
        text.push_str(&format!(
            "[[agents]]\nname = \"{name}\"\nkey = \"{key}\"\nports = [\"1024-65535\", \"1024-65535/udp\"]\n\n"
        ));
    }
    let p = dir.join("gateway.toml");
    std::fs::write(&p, text).unwrap();
    p
}

/// Waits until the gateway has logged the end of agent `name`'s session; returns the line.
async fn session_end_logged(gw: &mut Burrow, name: &str) -> String {
    let deadline = Instant::now() + WAIT;
    let span = format!("agent{{name={name}}}");
    loop {
        let found = gw
            .stderr_lines()
            .iter()
            .find(|l| {
                l.contains(&span) && (l.contains("connection lost") || l.contains("session ended"))
            })
            .cloned();
        if let Some(l) = found {
            return l;
        }
        assert!(
            Instant::now() < deadline,
            "the gateway did not log the end of {name}'s session: {:?}",
            gw.stderr_tail()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

// ---------------------------------------------------------------------------------------
// Several agents, one service

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_agents_in_a_group_share_the_load_and_fail_over() {
    within(TEST_LIMIT, "group", async {
        let tmp = tempfile::tempdir().unwrap();
        let (ka, _) = keygen_with_hash(bin());
        let (kb, _) = keygen_with_hash(bin());
        let cfg = gateway_config(tmp.path(), &[("a", &ka), ("b", &kb)], "");
        let mut gw = GatewaySpec::new(&tmp.path().join("state"))
            .config(&cfg)
            .args(["--admin", "127.0.0.1:0"])
            .expect_agent_line(false)
            .start(bin())
            .await
            .unwrap();
        let gw_admin = admin_addr(&mut gw).await;
        let (ea, eb) = (
            TcpTarget::echo().await.unwrap(),
            TcpTarget::echo().await.unwrap(),
        );
        // The first member lets the gateway choose the port; the second names it.
        let a = AgentSpec::new(agent_args(&gw, &ka))
            .forward(&format!("0={}?group=web", ea.addr()))
            .start(bin())
            .await
            .unwrap();
        let public = a.public(0);
        let b_spec = AgentSpec::new(agent_args(&gw, &kb)).forward(&format!(
            "{}={}?group=web",
            public.port(),
            eb.addr()
        ));
        let b = b_spec.start(bin()).await.unwrap();
        assert_eq!(b.public(0), public, "both members publish one port");
        gw.wait_stderr("joined (group `web`, 2 members)", WAIT)
            .await
            .unwrap();
        // The gateway's status shows the group's port served by two sessions, on each
        // member's row.
        let st = status_json(gw_admin);
        assert_eq!(
            group_rows(&st, "web"),
            [
                ("a".into(), "bound".into(), 2),
                ("b".into(), "bound".into(), 2)
            ],
            "{st}"
        );
        let table = status_table(gw_admin);
        assert!(table.contains("bound (group web, 2 sessions)"), "{table}");

        // 400 connections, 32 at a time: each agent gets 40-60%.
        let started = Instant::now();
        clients(public, 400, 32, 1).await;
        let (na, nb) = (ea.accepted(), eb.accepted());
        println!(
            "400 connections in {:?}: {na} to agent a, {nb} to agent b",
            started.elapsed()
        );
        assert_eq!(na + nb, 400);
        assert!((160..=240).contains(&na), "a got {na} of 400, b {nb}");

        // Agent b killed: once the gateway notices, every new connection goes to a.
        let mut b = b;
        let killed = Instant::now();
        b.kill().await.unwrap();
        let line = session_end_logged(&mut gw, "b").await;
        let noticed = killed.elapsed();
        println!("the gateway noticed b's end after {noticed:?}: {line}");
        assert!(
            noticed < HEARTBEAT_BOUND + Duration::from_millis(500),
            "noticed after {noticed:?}, past the heartbeat bound {HEARTBEAT_BOUND:?}"
        );
        clients(public, 200, 32, 1000).await;
        assert_eq!(ea.accepted(), na + 200, "every new connection went to a");
        assert_eq!(eb.accepted(), nb);
        // One session serves the port now; b's entry waits on lease.
        let st = status_json(gw_admin);
        assert_eq!(
            group_rows(&st, "web"),
            [
                ("a".into(), "bound".into(), 1),
                ("b".into(), "leased".into(), 1)
            ],
            "{st}"
        );

        // b restarted: it rejoins, and new connections are spread again.
        let b = b_spec.start(bin()).await.unwrap();
        assert_eq!(b.public(0), public);
        let (na, nb) = (ea.accepted(), eb.accepted());
        clients(public, 200, 32, 2000).await;
        let (da, db) = (ea.accepted() - na, eb.accepted() - nb);
        println!("after b rejoined: {da} to a, {db} to b");
        let st = status_json(gw_admin);
        assert_eq!(
            group_rows(&st, "web"),
            [
                ("a".into(), "bound".into(), 2),
                ("b".into(), "bound".into(), 2)
            ],
            "{st}"
        );
        assert!(
            (80..=120).contains(&db),
            "b got {db} of 200 after rejoining, a {da}"
        );
        drop(a);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_binds_refused_with_a_reason_leave_the_group_alone() {
    within(TEST_LIMIT, "refusals", async {
        let tmp = tempfile::tempdir().unwrap();
        let keys: Vec<(String, String)> = (0..5).map(|_| keygen_with_hash(bin())).collect();
        // c's grant has only port 1024, which the gateway will not choose for the group.
        let mut text = format!("{HEARTBEAT}[[groups]]\nname = \"web\"\nagents = [\"a\", \"b\", \"c\"]\n\n");
        for (name, (key, _)) in ["a", "b", "c", "d", "e"].iter().zip(&keys) {
            let ports = if *name == "c" { "[1024]" } else { "[\"1025-65535\"]" };
            text.push_str(&format!(
                "[[agents]]\nname = \"{name}\"\nkey = \"{key}\"\nports = {ports}\n\n"
            ));
        }
        let cfg = tmp.path().join("gateway.toml");
        std::fs::write(&cfg, text).unwrap();
        let gw = GatewaySpec::new(&tmp.path().join("state"))
            .config(&cfg)
            .expect_agent_line(false)
            .start(bin())
            .await
            .unwrap();
        let echoes: Vec<TcpTarget> = echoes(5).await;
        let key = |i: usize| keys[i].0.as_str();
        let a = AgentSpec::new(agent_args(&gw, key(0)))
            .forward(&format!("0={}?group=web", echoes[0].addr()))
            .start(bin())
            .await
            .unwrap();
        let port = a.public(0).port();
        let b = AgentSpec::new(agent_args(&gw, key(1)))
            .forward(&format!("0={}?group=web", echoes[1].addr()))
            .start(bin())
            .await
            .unwrap();
        assert_eq!(b.public(0).port(), port, "port 0 in a group takes the group's port");

        // c: its grant lacks the port, asked for by number or as the group's (port 0).
        let by_number = format!("{port}={}?group=web", echoes[2].addr());
        let as_group = format!("0={}?group=web", echoes[2].addr());
        // A forward's name is its spec without the options.
        let name = |spec: &str| spec.split('?').next().unwrap().to_string();
        let (by_number_name, as_group_name) = (name(&by_number), name(&as_group));
        let mut c = Burrow::start(
            AgentSpec::new(agent_args(&gw, key(2)))
                .forward(&by_number)
                .forward(&as_group)
                .command(bin()),
        )
        .unwrap();
        let st = c.wait_exit(WAIT).await.unwrap();
        assert!(!st.success(), "c publishes nothing and stops");
        let out = c.stdout_lines().join("\n");
        assert!(
            out.contains(&format!(
                "forward {by_number_name}: refused: TCP port {port} is not granted to agent `c` (granted: 1024)"
            )),
            "{out}"
        );
        assert!(
            out.contains(&format!(
                "forward {as_group_name}: refused: group `web` is on port {port} of this gateway: TCP port {port} is not granted to agent `c`"
            )),
            "{out}"
        );
        // d: another group's name on the port.
        let spec = format!("{port}={}?group=api", echoes[3].addr());
        let (d, line) = refused_forward(agent_args(&gw, key(3)), &spec).await;
        assert!(
            line.contains(&format!(
                "port {port} is the public port of group `web` on this gateway, and this forward is in group `api`: a forward joins a group only with the same group name"
            )),
            "{line}"
        );
        // e: a member of no declared group.
        let spec = format!("{port}={}?group=web", echoes[4].addr());
        let (e, line) = refused_forward(agent_args(&gw, key(4)), &spec).await;
        assert!(
            line.contains("agent `e` is not a member of group `web` on this gateway (its [[groups]] entry lets in a, b, c)"),
            "{line}"
        );

        // The group is unaffected: served by a and b only.
        clients(a.public(0), 60, 4, 7).await;
        let got: Vec<u64> = echoes.iter().map(TcpTarget::accepted).collect();
        println!("60 connections after the refusals: {got:?} (a, b, c, d, e)");
        assert_eq!(got[0] + got[1], 60, "{got:?}");
        assert!(got[0] > 0 && got[1] > 0, "{got:?}");
        assert_eq!(&got[2..], [0, 0, 0], "{got:?}");
        drop((b, d, e));
    })
    .await;
}

async fn echoes(n: usize) -> Vec<TcpTarget> {
    let mut v = Vec::new();
    for _ in 0..n {
        v.push(TcpTarget::echo().await.unwrap());
    }
    v
}

/// A UDP service answering each datagram with `tag` and the datagram.
async fn tagged_udp_echo(tag: &'static [u8]) -> SocketAddr {
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = sock.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 2048];
        while let Ok((n, from)) = sock.recv_from(&mut buf).await {
            let reply = [tag, &buf[..n]].concat();
            let _ = sock.send_to(&reply, from).await;
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_flows_in_a_group_stay_with_one_member() {
    within(TEST_LIMIT, "udp group", async {
        let tmp = tempfile::tempdir().unwrap();
        let (ka, _) = keygen_with_hash(bin());
        let (kb, _) = keygen_with_hash(bin());
        let cfg = gateway_config(tmp.path(), &[("a", &ka), ("b", &kb)], "");
        let gw = GatewaySpec::new(&tmp.path().join("state"))
            .config(&cfg)
            .expect_agent_line(false)
            .start(bin())
            .await
            .unwrap();
        let (ua, ub) = (tagged_udp_echo(b"A").await, tagged_udp_echo(b"B").await);
        let a = AgentSpec::new(agent_args(&gw, &ka))
            .forward(&format!("udp:0={ua}?group=dns"))
            .start(bin())
            .await
            .unwrap();
        let public = a.public(0);
        // One datagram from `sock` and its reply's tag (which member answered).
        let ask = |sock: Arc<UdpSocket>, msg: String| async move {
            let mut buf = vec![0u8; 2048];
            // UDP may drop: ask again a few times.
            for _ in 0..20 {
                sock.send_to(msg.as_bytes(), public).await.unwrap();
                if let Ok(Ok(n)) =
                    tokio::time::timeout(Duration::from_millis(250), sock.recv(&mut buf)).await
                {
                    assert_eq!(&buf[1..n], msg.as_bytes());
                    return buf[0];
                }
            }
            panic!("no reply to {msg}");
        };
        // 20 clients while a is the only member: their flows are a's.
        let mut early = Vec::new();
        for c in 0..20u32 {
            let sock = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
            assert_eq!(ask(sock.clone(), format!("early {c}")).await, b'A');
            early.push(sock);
        }
        let b = AgentSpec::new(agent_args(&gw, &kb))
            .forward(&format!("udp:{}={ub}?group=dns", public.port()))
            .start(bin())
            .await
            .unwrap();
        assert_eq!(b.public(0), public);
        // b joined: the flows that began stay with a.
        for (c, sock) in early.iter().enumerate() {
            for i in 0..3 {
                let tag = ask(sock.clone(), format!("early {c} again {i}")).await;
                assert_eq!(tag, b'A', "client {c}'s open flow moved to the member that joined");
            }
        }
        // 40 new clients, 5 datagrams each: every reply of a client comes from one member,
        // and both members have clients.
        let mut per_member = [0usize; 2];
        for c in 0..40u32 {
            let sock = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
            let mut tags = Vec::new();
            for i in 0..5u32 {
                tags.push(ask(sock.clone(), format!("client {c} datagram {i}")).await);
            }
            tags.dedup();
            assert_eq!(
                tags.len(),
                1,
                "client {c}'s flow moved between members: {tags:?}"
            );
            per_member[usize::from(tags[0] == b'B')] += 1;
        }
        println!(
            "UDP: 20 flows begun before b joined stayed with a; 40 new clients pinned, {} to a, {} to b",
            per_member[0], per_member[1]
        );
        assert!(per_member[0] > 0 && per_member[1] > 0, "{per_member:?}");
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// One agent, two gateways, nginx in front

/// The nginx example with its gateways' addresses replaced by `upstreams` and its listener by
/// the one nginx is handed: the body of its `stream {}` block.
fn nginx_example(upstreams: [SocketAddr; 2]) -> String {
    let text = std::fs::read_to_string(examples().join("nginx-stream.conf")).unwrap();
    let text = text
        .replace("203.0.113.10:8080", &upstreams[0].to_string())
        .replace("198.51.100.20:8080", &upstreams[1].to_string())
        .replace("listen 8080;", "listen {listen};");
    assert!(text.contains("{listen}") && text.contains(&upstreams[1].to_string()));
    let start = text.find("stream {").expect("a stream block") + "stream {".len();
    let end = text.rfind('}').unwrap();
    text[start..end].to_string()
}

/// Waits for the agent's `forward SPEC: public address ADDR (gateway G)` line for each of
/// `gateways` (in any order); returns the addresses in the order of `gateways`.
async fn public_on(agent: &mut Burrow, spec: &str, gateways: &[SocketAddr]) -> Vec<SocketAddr> {
    let prefix = format!("forward {spec}: public address ");
    let mut found: Vec<Option<SocketAddr>> = vec![None; gateways.len()];
    while found.iter().any(Option::is_none) {
        let line = agent
            .wait_stdout(|l| l.starts_with(&prefix), WAIT)
            .await
            .unwrap();
        let rest = &line[prefix.len()..];
        for (i, g) in gateways.iter().enumerate() {
            if let Some(addr) = rest.strip_suffix(&format!(" (gateway {g})")) {
                found[i] = Some(addr.parse().unwrap());
            }
        }
    }
    found.into_iter().flatten().collect()
}

/// A gateway for the agent `edge` with key hash `hash`, in `dir`.
fn edge_gateway(dir: &Path, hash: &str) -> GatewaySpec {
    let cfg = dir.join("gateway.toml");
    std::fs::write(
        &cfg,
        format!(
            "{HEARTBEAT}[[agents]]\nname = \"edge\"\nkey_hash = \"{hash}\"\nports = [\"1024-65535\"]\n"
        ),
    )
    .unwrap();
    GatewaySpec::new(&dir.join("state"))
        .config(&cfg)
        .expect_agent_line(false)
}

/// The agent's status as `burrow status --json` prints it.
fn status_json(admin: SocketAddr) -> serde_json::Value {
    let out = std::process::Command::new(bin())
        .args(["status", "--json", "--admin", &admin.to_string()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    serde_json::from_slice(&out.stdout).unwrap()
}

/// `burrow status` as text.
fn status_table(admin: SocketAddr) -> String {
    let out = std::process::Command::new(bin())
        .args(["status", "--admin", &admin.to_string()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The address in the process's `admin listening on http://ADDR` line.
async fn admin_addr(proc: &mut Burrow) -> SocketAddr {
    const PREFIX: &str = "admin listening on http://";
    let line = proc
        .wait_stdout(|l| l.starts_with(PREFIX), WAIT)
        .await
        .unwrap();
    line.trim_start_matches(PREFIX).trim().parse().unwrap()
}

/// At a gateway: the services in `group`, as (agent, state, sessions serving the port).
fn group_rows(st: &serde_json::Value, group: &str) -> Vec<(String, String, u64)> {
    let mut rows: Vec<(String, String, u64)> = st["agents"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|a| {
            let name = a["name"].as_str().unwrap().to_string();
            a["services"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|s| s["group"] == group)
                .map(move |s| {
                    (
                        name.clone(),
                        s["state"].as_str().unwrap().to_string(),
                        s["members"].as_u64().unwrap(),
                    )
                })
                .collect::<Vec<_>>()
        })
        .collect();
    rows.sort();
    rows
}

/// Each gateway's row: (gateway, connected).
fn gateway_rows(st: &serde_json::Value) -> Vec<(String, bool)> {
    st["agents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["gateway"].as_str().unwrap().to_string(),
                a["connected"].as_bool().unwrap(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_agent_on_two_gateways_behind_nginx() {
    within(TEST_LIMIT, "two gateways", async {
        let tmp = tempfile::tempdir().unwrap();
        let (key, hash) = keygen_with_hash(bin());
        let (d1, d2) = (tmp.path().join("gw1"), tmp.path().join("gw2"));
        std::fs::create_dir_all(&d1).unwrap();
        std::fs::create_dir_all(&d2).unwrap();
        let mut gw1 = edge_gateway(&d1, &hash).start(bin()).await.unwrap();
        let mut gw2 = edge_gateway(&d2, &hash).start(bin()).await.unwrap();
        let (g1, g2) = (gw1.addr(), gw2.addr());
        assert_ne!(
            gw1.fingerprint(),
            gw2.fingerprint(),
            "each has its own certificate"
        );
        let echo = TcpTarget::echo().await.unwrap();
        let spec = format!("0={}", echo.addr());
        let mut agent = Burrow::start(
            AgentSpec::new(
                [
                    "agent",
                    "--gateway",
                    &g1.to_string(),
                    "--gateway",
                    &g2.to_string(),
                    "--fingerprint",
                    gw1.fingerprint(),
                    "--fingerprint",
                    gw2.fingerprint(),
                    "--key",
                    &key,
                    "--max-backoff",
                    "1s",
                    "--admin",
                    "127.0.0.1:0",
                ]
                .map(String::from)
                .to_vec(),
            )
            .forward(&spec)
            .command(bin()),
        )
        .unwrap();
        let [p1, p2] = public_on(&mut agent, &spec, &[g1, g2]).await[..] else {
            unreachable!()
        };
        let admin: SocketAddr = agent
            .stdout_lines()
            .iter()
            .find_map(|l| l.strip_prefix("admin listening on http://"))
            .expect("the admin line comes first")
            .trim()
            .parse()
            .unwrap();
        let rows = gateway_rows(&status_json(admin));
        assert_eq!(rows, [(g1.to_string(), true), (g2.to_string(), true)]);

        let mut nginx = Nginx::start_stream(&nginx_example([p1, p2])).await.unwrap();
        let front = nginx.addr();

        // Through nginx, byte-exact, spread over both gateways.
        let started = Instant::now();
        clients(front, 100, 4, 1).await;
        let count = |gw: &mut Burrow| {
            gw.stderr_lines()
                .iter()
                .filter(|l| l.contains("stream closed"))
                .count()
        };
        let (s1, s2) = (count(&mut gw1), count(&mut gw2));
        println!(
            "100 connections through nginx in {:?}: {s1} via gateway 1, {s2} via gateway 2",
            started.elapsed()
        );
        assert!(s1 > 0 && s2 > 0, "nginx used both gateways: {s1}, {s2}");

        // An established stream through gateway 1 ends with it.
        let mut held = tokio::net::TcpStream::connect(p1).await.unwrap();
        held.write_all(b"x").await.unwrap();
        let mut one = [0u8; 1];
        held.read_exact(&mut one).await.unwrap();

        // Gateway 1 killed.
        let killed = Instant::now();
        gw1.kill().await.unwrap();
        let ended = tokio::time::timeout(CLIENT_LIMIT, held.read(&mut one)).await;
        assert!(
            matches!(ended, Ok(Ok(0)) | Ok(Err(_))),
            "the stream through the killed gateway ends: {ended:?}"
        );
        let lost = agent.wait_stderr("connection lost", WAIT).await.unwrap();
        println!(
            "agent noticed gateway 1 gone after {:?}: {lost}",
            killed.elapsed()
        );
        assert!(lost.contains(&g1.to_string()), "{lost}");
        // Clients through nginx keep being served, through gateway 2; none hangs.
        let started = Instant::now();
        clients(front, 100, 4, 500).await;
        println!(
            "100 connections through nginx with gateway 1 down: all served in {:?}",
            started.elapsed()
        );
        // nginx did try the dead gateway, and passed the client on.
        let log = nginx.log_text();
        assert!(
            log.contains("Connection refused") && log.contains("while connecting to upstream"),
            "{log}"
        );
        // Every agent line about the lost gateway names it, and none names the other.
        agent.wait_stderr("next attempt in", WAIT).await.unwrap();
        for l in agent.stderr_lines() {
            if l.contains("connection lost") || l.contains("next attempt in") {
                assert!(
                    l.contains(&g1.to_string()) && !l.contains(&g2.to_string()),
                    "{l}"
                );
            }
        }
        let st = status_json(admin);
        assert_eq!(
            gateway_rows(&st),
            [(g1.to_string(), false), (g2.to_string(), true)]
        );
        assert!(st["agents"][0]["reconnect"].is_object(), "{st}");
        // Each gateway's state: address, transport, connected or reconnecting, since when,
        // and the lost one's last error.
        let (r1, r2) = (&st["agents"][0], &st["agents"][1]);
        assert_eq!(
            (
                &r1["state"],
                &r1["transport"],
                &r2["state"],
                &r2["transport"]
            ),
            (
                &serde_json::json!("reconnecting"),
                &serde_json::json!("tls"),
                &serde_json::json!("connected"),
                &serde_json::json!("tls")
            ),
            "{st}"
        );
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let down_since = r1["state_since"].as_u64().unwrap();
        assert!(
            down_since <= now
                && down_since + 60 > now
                && down_since >= r2["state_since"].as_u64().unwrap(),
            "{st}"
        );
        let error = r1["last_error"]["text"].as_str().unwrap_or_default();
        assert!(!error.is_empty(), "the lost gateway's last error: {st}");
        assert!(r2["last_error"].is_null(), "{st}");
        let table = status_table(admin);
        println!("{table}");
        assert!(
            table.contains(&format!(
                "gateway {g1} (tls): not connected (reconnecting since"
            )),
            "{table}"
        );
        assert!(table.contains("; last error: "), "{table}");
        assert!(
            table.contains(&format!("gateway {g2} (tls): connected since")),
            "{table}"
        );

        // Gateway 1 restarted on its address and state: the agent comes back by itself, to
        // the same public port (the gateway chose it and kept it).
        let gw1 = edge_gateway(&d1, &hash)
            .listen(g1)
            .start(bin())
            .await
            .unwrap();
        let back = public_on(&mut agent, &spec, &[g1]).await;
        assert_eq!(back, [p1]);
        clients(p1, 20, 4, 900).await;
        clients(front, 50, 4, 1000).await;
        let st = status_json(admin);
        assert_eq!(
            gateway_rows(&st),
            [(g1.to_string(), true), (g2.to_string(), true)]
        );
        assert_eq!(st["agents"][0]["state"], "connected", "{st}");
        assert!(
            st["agents"][0]["state_since"].as_u64().unwrap() >= down_since,
            "{st}"
        );
        gw2.signal(Signal::Term).unwrap();
        drop(gw1);
        nginx.stop();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_that_fails_for_good_stops_only_its_own_session() {
    within(TEST_LIMIT, "one bad gateway", async {
        let tmp = tempfile::tempdir().unwrap();
        let gw = GatewaySpec::new(&tmp.path().join("state"))
            .start(bin())
            .await
            .unwrap();
        let key = gw.key().unwrap();
        let good = gw.addr().to_string();
        // The same gateway under another name, pinned to a certificate it does not have.
        let bad = format!("localhost:{}", gw.addr().port());
        let wrong = format!("SHA256:{}", "ab".repeat(32));
        let echo = TcpTarget::echo().await.unwrap();
        let spec = echo.addr().to_string();
        let args = |gateways: [&str; 2], fps: [&str; 2]| {
            AgentSpec::new(
                [
                    "agent",
                    "--gateway",
                    gateways[0],
                    "--gateway",
                    gateways[1],
                    "--fingerprint",
                    fps[0],
                    "--fingerprint",
                    fps[1],
                    "--key",
                    &key,
                ]
                .map(String::from)
                .to_vec(),
            )
            .forward(&spec)
        };
        // One good gateway, one that can never work: the agent serves through the good one.
        let mut agent =
            Burrow::start(args([&good, &bad], [gw.fingerprint(), &wrong]).command(bin())).unwrap();
        let line = agent
            .wait_stderr(
                "stops trying this gateway and carries on with the 1 others",
                WAIT,
            )
            .await
            .unwrap();
        assert!(
            line.contains(&format!("gateway{{gateway={bad}}}")),
            "{line}"
        );
        assert!(line.contains("fingerprint"), "{line}");
        let public = public_on(&mut agent, &spec, &[gw.addr()]).await[0];
        clients(public, 20, 4, 3).await;
        assert!(
            agent.wait_exit(Duration::from_millis(300)).await.is_err(),
            "still running"
        );
        // Two that can never work: it stops, naming both.
        let mut agent =
            Burrow::start(args([&good, &bad], [&wrong, &wrong]).command(bin())).unwrap();
        let st = agent.wait_exit(WAIT).await.unwrap();
        assert!(!st.success());
        let err = agent.stderr_lines().join("\n");
        assert!(
            err.contains(&format!("error: every gateway failed: gateway {good}: "))
                && err.contains(&format!("; gateway {bad}: ")),
            "{err}"
        );
    })
    .await;
}

#[test]
fn haproxy_example_is_valid() {
    let path = examples().join("haproxy.cfg");
    let out = std::process::Command::new("haproxy")
        .arg("-c")
        .arg("-f")
        .arg(&path)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run haproxy ({e}): install Debian's haproxy package (.ci/run does)")
        });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "haproxy -c refused {}: {text}",
        path.display()
    );
    assert!(text.contains("Configuration file is valid"), "{text}");
}

/// The forms a user writes: `BURROW_GATEWAY` and `BURROW_FINGERPRINT` comma-separated,
/// `--forward SPEC?group=NAME` (also inside a comma-separated list), as `--print-config` shows.
#[test]
fn several_gateways_and_groups_from_flags_and_environment() {
    const FP1: &str = "SHA256:415e49090663bd175c79524f06bcc79761d84319e3daf9c9c197b6787c6544a0";
    const FP2: &str = "SHA256:00000000000000000000000000000000000000000000000000000000000000aa";
    let (key, _) = keygen_with_hash(bin());
    let run = |args: &[&str], env: &[(&str, &str)]| {
        let mut cmd = Burrow::command(bin());
        cmd.args(["agent", "--print-config", "--key", &key])
            .args(args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (ok, out, err) = run(
        &["--forward", "8080=127.0.0.1:80?group=web,0=127.0.0.1:81"],
        &[
            ("BURROW_GATEWAY", "gw1.example:7443,gw2.example:7443"),
            ("BURROW_FINGERPRINT", &format!("{FP1},{FP2}")),
        ],
    );
    assert!(ok, "{err}");
    assert!(
        out.contains(&format!(
            "gateways = [{{ url = \"gw1.example:7443\", fingerprint = \"{FP1}\" }}, {{ url = \"gw2.example:7443\", fingerprint = \"{FP2}\" }}]"
        )),
        "{out}"
    );
    // A forward with an option is printed as a table (its name leaves the option out).
    assert!(
        out.contains(
            "[[forwards]]\npublic_port = 8080\ntarget = \"127.0.0.1:80\"\ngroup = \"web\"\n"
        ),
        "{out}"
    );
    assert!(
        out.contains("[[forwards]]\ntarget = \"127.0.0.1:81\"\n"),
        "{out}"
    );
    // Two fingerprints for three gateways, and an unknown option, are errors that say so.
    let (ok, _, err) = run(
        &["--gateway", "a:1", "--gateway", "b:2", "--gateway", "c:3"],
        &[("BURROW_FINGERPRINT", &format!("{FP1},{FP2}"))],
    );
    assert!(
        !ok && err.contains("2 fingerprints or CAs for 3 gateways"),
        "{err}"
    );
    let (ok, _, err) = run(
        &[
            "--gateway",
            "a:1",
            "--fingerprint",
            FP1,
            "--forward",
            "80=x:1?group=a&colour=red",
        ],
        &[],
    );
    assert!(!ok && err.contains("unknown option `colour`"), "{err}");
}

/// A reload of an agent with two gateways changes the forwards on both sessions: the added
/// one is bound on each, the removed one given back on each; a changed list of gateways is
/// reported as needing a restart and left as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_changes_the_forwards_on_every_gateway() {
    within(TEST_LIMIT, "reload on two gateways", async {
        let tmp = tempfile::tempdir().unwrap();
        let (key, hash) = keygen_with_hash(bin());
        let (d1, d2) = (tmp.path().join("gw1"), tmp.path().join("gw2"));
        std::fs::create_dir_all(&d1).unwrap();
        std::fs::create_dir_all(&d2).unwrap();
        let gw1 = edge_gateway(&d1, &hash).start(bin()).await.unwrap();
        let gw2 = edge_gateway(&d2, &hash).start(bin()).await.unwrap();
        let (g1, g2) = (gw1.addr(), gw2.addr());
        let (e1, e2) = (
            TcpTarget::echo().await.unwrap(),
            TcpTarget::echo().await.unwrap(),
        );
        let (keep, added) = (format!("0={}", e1.addr()), format!("0={}", e2.addr()));
        let file = tmp.path().join("agent.toml");
        let write = |gateways: &[(SocketAddr, &str)], forwards: &[&str]| {
            let gws: Vec<String> = gateways
                .iter()
                .map(|(g, fp)| format!("{{ url = \"{g}\", fingerprint = \"{fp}\" }}"))
                .collect();
            let fwd: Vec<String> = forwards.iter().map(|f| format!("{f:?}")).collect();
            std::fs::write(
                &file,
                format!(
                    "gateways = [{}]\nforward = [{}]\n",
                    gws.join(", "),
                    fwd.join(", ")
                ),
            )
            .unwrap();
        };
        let both = [(g1, gw1.fingerprint()), (g2, gw2.fingerprint())];
        write(&both, &[&keep]);
        let mut agent = Burrow::start(
            AgentSpec::new(
                [
                    "agent",
                    "--config",
                    file.to_str().unwrap(),
                    "--key",
                    &key,
                    "--max-backoff",
                    "1s",
                ]
                .map(String::from)
                .to_vec(),
            )
            .command(bin()),
        )
        .unwrap();
        let kept = public_on(&mut agent, &keep, &[g1, g2]).await;

        write(&both, &[&added]);
        agent.signal(Signal::Hup).unwrap();
        let fresh = public_on(&mut agent, &added, &[g1, g2]).await;
        for p in &fresh {
            clients(*p, 10, 2, 3).await;
        }
        // The removed forward's port is given back on each gateway (Unbind).
        for p in &kept {
            let deadline = Instant::now() + WAIT;
            while tokio::net::TcpStream::connect(p).await.is_ok() {
                assert!(
                    Instant::now() < deadline,
                    "{p} still listens after the reload"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }

        // One gateway fewer: a restart is needed, both sessions carry on.
        write(&both[..1], &[&added]);
        agent.signal(Signal::Hup).unwrap();
        agent
            .wait_stderr("`gateways` changed, but it needs a restart", WAIT)
            .await
            .unwrap();
        for p in &fresh {
            clients(*p, 4, 2, 4).await;
        }
    })
    .await;
}
