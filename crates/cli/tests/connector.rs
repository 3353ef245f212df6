//! The connector role through the real binary: a gateway with `[[agents]]` and
//! `[[connectors]]`, an agent with private services and `--allow` patterns, and `burrow
//! connect` processes listening on loopback (and on a unix socket).
//!
//! - Traffic: 64 MiB each way byte-exact (every byte compared with what was sent; SHA-256
//!   of both for a unix socket and for the client whose address is checked), 100 parallel
//!   streams, half-close both ways, a client that stops reading next to a bulk
//!   transfer on the same service (the bulk finishes, memory stays bounded), two connectors
//!   on one service, one connector reaching two agents; the agent's log line names the
//!   connector and its client's address.
//! - Refusals: a service outside the connector's `reach`, a service the agent does not have,
//!   a target outside the agent's `allow`, an agent's key used as a connector (and a
//!   connector's as an agent): each with its cause in the connector's output, and no
//!   connection made to the target.
//! - A unix socket listener; the listeners kept through a gateway restart, serving again
//!   once the connector is back.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use burrow::proto::auth::SecretKey;
use burrow_testkit::harness::{admin_addr, http_exchange, within};
use burrow_testkit::targets::{echo_transfer, EchoOpts};
use burrow_testkit::{Burrow, GatewayProc, GatewaySpec, Pattern, Signal, TcpTarget};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpStream, UnixStream};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Upper bound for a whole test, so a hang fails instead of blocking the run.
const TEST_LIMIT: Duration = Duration::from_secs(240);
/// How long a process gets to print what we wait for.
const WAIT: Duration = Duration::from_secs(30);

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_burrow"))
}

/// One connector entry of the gateway's file.
struct Entry<'a> {
    name: &'a str,
    key: &'a SecretKey,
    reach: &'a [&'a str],
}

/// A gateway with agent `office` and the given connectors, its files in a temporary
/// directory.
struct World {
    dir: tempfile::TempDir,
    gw: GatewayProc,
    config: PathBuf,
    office: SecretKey,
    /// A second agent, `home`, for connectors that reach two.
    home: SecretKey,
    /// Agents dial `quic://` (else the bare address: TLS over TCP).
    agent_quic: bool,
    /// Connectors dial `quic://`.
    connector_quic: bool,
}

/// The gateway's file: agents `office` and `home`, and `connectors`.
fn gateway_text(office: &SecretKey, home: &SecretKey, connectors: &[Entry<'_>]) -> String {
    let mut text = String::new();
    for (name, key) in [("office", office), ("home", home)] {
        text.push_str(&format!(
            "[[agents]]\nname = \"{name}\"\nkey_hash = \"{}\"\nports = [\"1024-65535\"]\n\n",
            key.hash()
        ));
    }
    for c in connectors {
        let reach: Vec<String> = c.reach.iter().map(|r| format!("{r:?}")).collect();
        text.push_str(&format!(
            "\n[[connectors]]\nname = \"{}\"\nkey_hash = \"{}\"\nreach = [{}]\n",
            c.name,
            c.key.hash(),
            reach.join(", ")
        ));
    }
    text
}

impl World {
    async fn start(connectors: &[Entry<'_>]) -> World {
        Self::start_with(connectors, &[]).await
    }

    /// [`World::start`] with one connector, `laptop` (a fresh key), reaching `reach`.
    async fn with_laptop(reach: &[&str]) -> (World, SecretKey) {
        let laptop = SecretKey::generate();
        let w = World::start(&[Entry {
            name: "laptop",
            key: &laptop,
            reach,
        }])
        .await;
        (w, laptop)
    }

    /// As [`World::start`], with more gateway flags.
    async fn start_with(connectors: &[Entry<'_>], args: &[&str]) -> World {
        let dir = tempfile::tempdir().unwrap();
        let (office, home) = (SecretKey::generate(), SecretKey::generate());
        let text = gateway_text(&office, &home, connectors);
        let config = dir.path().join("gateway.toml");
        std::fs::write(&config, text).unwrap();
        let gw = Self::spec(dir.path(), &config)
            .args(args.iter().copied())
            .start(bin())
            .await
            .unwrap();
        World {
            dir,
            gw,
            config,
            office,
            home,
            agent_quic: false,
            connector_quic: false,
        }
    }

    /// Writes the gateway's file again with `connectors` (the agents as they were).
    fn rewrite(&self, connectors: &[Entry<'_>]) {
        std::fs::write(
            &self.config,
            gateway_text(&self.office, &self.home, connectors),
        )
        .unwrap();
    }

    fn spec(dir: &Path, config: &Path) -> GatewaySpec {
        GatewaySpec::new(&dir.join("state"))
            .config(config)
            .expect_agent_line(false)
    }

    /// Restarts the gateway (killed first) on the same port, state and config.
    async fn restart_gateway(&mut self) {
        let addr = self.gw.addr();
        self.gw.kill().await.unwrap();
        self.gw = Self::spec(self.dir.path(), &self.config)
            .listen(addr)
            .start(bin())
            .await
            .unwrap();
    }

    /// The flags every agent and connector needs, without the key: the gateway's address,
    /// as `quic://` with `quic`.
    fn dial_args(&self, quic: bool) -> Vec<String> {
        let gateway = match quic {
            true => format!("quic://{}", self.gw.addr()),
            false => self.gw.addr().to_string(),
        };
        vec![
            "--gateway".into(),
            gateway,
            "--fingerprint".into(),
            self.gw.fingerprint().to_string(),
            "--max-backoff".into(),
            "1s".into(),
        ]
    }

    /// Agent `office` with `args` (`--private`, `--allow`); waits until it has announced
    /// `private` services (or, with none, is connected).
    async fn agent(&self, args: &[String], private: usize) -> Burrow {
        self.agent_with(&self.office, args, private).await
    }

    /// As [`World::agent`], with another agent's key.
    async fn agent_with(&self, key: &SecretKey, args: &[String], private: usize) -> Burrow {
        let mut cmd = Burrow::command(bin());
        cmd.arg("agent")
            .args(self.dial_args(self.agent_quic))
            .args(args)
            .env("BURROW_KEY", key.expose());
        let mut agent = Burrow::start(cmd).unwrap();
        if private == 0 {
            agent
                .wait_stderr("connected to gateway", WAIT)
                .await
                .unwrap();
        }
        for _ in 0..private {
            agent
                .wait_stderr("private service announced", WAIT)
                .await
                .unwrap();
        }
        agent
    }

    /// `burrow connect` with `key` and `forwards`; waits for every listening address.
    async fn connector(&self, key: &SecretKey, forwards: &[&str]) -> Connector {
        let mut cmd = Burrow::command(bin());
        cmd.arg("connect")
            .args(self.dial_args(self.connector_quic))
            .env("BURROW_KEY", key.expose());
        for f in forwards {
            cmd.arg("--forward").arg(f);
        }
        let mut proc = Burrow::start(cmd).unwrap();
        let mut listen = Vec::new();
        for f in forwards {
            let prefix = format!("forward {f}: listening on ");
            let line = proc
                .wait_stdout(|l| l.starts_with(&prefix), WAIT)
                .await
                .unwrap();
            listen.push(line[prefix.len()..].trim().to_string());
        }
        Connector {
            proc,
            forwards: forwards.iter().map(|f| f.to_string()).collect(),
            listen,
            seen: vec![0; forwards.len()],
        }
    }
}

/// A running connector and where its forwards listen.
struct Connector {
    proc: Burrow,
    forwards: Vec<String>,
    listen: Vec<String>,
    /// Verdict lines of each forward returned so far.
    seen: Vec<usize>,
}

impl Connector {
    /// The TCP address forward `i` listens on.
    fn addr(&self, i: usize) -> SocketAddr {
        self.listen[i].parse().unwrap()
    }

    /// Waits for forward `i`'s next verdict line (after the ones already returned):
    /// `ready`, or the refusal.
    async fn verdict(&mut self, i: usize) -> String {
        let prefix = format!("forward {}: ", self.forwards[i]);
        let deadline = Instant::now() + WAIT;
        loop {
            let found = self
                .proc
                .stdout_lines()
                .iter()
                .filter_map(|l| l.strip_prefix(&prefix))
                .filter(|rest| !rest.starts_with("listening on"))
                .nth(self.seen[i])
                .map(str::to_string);
            if let Some(v) = found {
                self.seen[i] += 1;
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "no verdict for forward {}; stderr: {:#?}",
                self.forwards[i],
                self.proc.stderr_tail()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until forward `i` is ready, whatever refusals come first (the agent may be
    /// back after the connector).
    async fn ready_eventually(&mut self, i: usize) {
        let deadline = Instant::now() + WAIT;
        while self.verdict(i).await != "ready" {
            assert!(
                Instant::now() < deadline,
                "forward {} never ready",
                self.forwards[i]
            );
        }
    }

    async fn ready(&mut self, i: usize) {
        let v = self.verdict(i).await;
        assert_eq!(v, "ready", "forward {}", self.forwards[i]);
    }
}

/// SIGTERM, exit 0 within 30 s, and no panic in the log.
async fn stop_cleanly(p: &mut Burrow, who: &str) {
    p.signal(Signal::Term).unwrap();
    let st = p.wait_exit(WAIT).await.unwrap();
    assert!(
        st.success(),
        "{who} exits 0 on SIGTERM, got {st}: {:#?}",
        p.stderr_tail()
    );
    assert!(p.panics().is_empty(), "{who} panicked: {:#?}", p.panics());
}

/// [`stop_cleanly`] for the connector, then the agent.
async fn stop_both(c: &mut Connector, agent: &mut Burrow) {
    stop_cleanly(&mut c.proc, "connector").await;
    stop_cleanly(agent, "agent").await;
}

fn private(name: &str, target: SocketAddr) -> [String; 2] {
    ["--private".into(), format!("{name}={target}")]
}

/// Sends `len` pattern bytes through `c` (an echo), half-closes, and returns the SHA-256 of
/// what was sent and of what came back before EOF.
async fn hashed_echo<S>(c: S, len: u64, seed: u64) -> ([u8; 32], [u8; 32], u64)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let (mut r, mut w) = tokio::io::split(c);
    let pattern = Pattern::new(seed);
    let write = async {
        let mut sent = Sha256::new();
        let mut buf = vec![0u8; 64 * 1024];
        let mut off = 0u64;
        while off < len {
            let n = (len - off).min(buf.len() as u64) as usize;
            pattern.fill(off, &mut buf[..n]);
            sent.update(&buf[..n]);
            w.write_all(&buf[..n]).await.unwrap();
            off += n as u64;
        }
        w.shutdown().await.unwrap();
        sent.finalize()
    };
    let read = async {
        let mut got = Sha256::new();
        let mut buf = vec![0u8; 64 * 1024];
        let mut total = 0u64;
        loop {
            let n = r.read(&mut buf).await.unwrap();
            if n == 0 {
                return (got.finalize(), total);
            }
            got.update(&buf[..n]);
            total += n as u64;
        }
    };
    let (sent, (got, total)) = tokio::join!(write, read);
    (sent.into(), got.into(), total)
}

/// Waits (up to 30 s) until some stderr line of `p` satisfies `pred`, whenever it came.
async fn some_line(p: &mut Burrow, pred: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(l) = p.stderr_lines().iter().find(|l| pred(l)) {
            return l.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no such stderr line; the last ones: {:#?}",
            p.stderr_tail()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A client of `addr` that pushes `len` bytes of `Pattern::new(7)` and reads nothing back:
/// its read half, and the task pushing (it ends with the write half).
async fn stalled_client(addr: SocketAddr, len: u64) -> (OwnedReadHalf, JoinHandle<OwnedWriteHalf>) {
    let stalled = TcpStream::connect(addr).await.unwrap();
    let (stalled_r, mut stalled_w) = stalled.into_split();
    let pusher = tokio::spawn(async move {
        let pattern = Pattern::new(7);
        let mut buf = vec![0u8; 64 * 1024];
        let mut off = 0u64;
        while off < len {
            pattern.fill(off, &mut buf);
            if stalled_w.write_all(&buf).await.is_err() {
                break;
            }
            off += buf.len() as u64;
        }
        stalled_w
    });
    (stalled_r, pusher)
}

/// Waits (60 s at most) until `bytes()` has grown and then not changed for a second; returns
/// it: how far a stalled stream went.
async fn until_it_stops(bytes: impl Fn() -> u64) -> u64 {
    let mut last = (0u64, Instant::now());
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let now = bytes();
        if now != last.0 {
            last = (now, Instant::now());
        } else if now > 0 && last.1.elapsed() >= Duration::from_secs(1) {
            return now;
        }
        assert!(
            Instant::now() < deadline,
            "the stalled stream never stopped ({now} bytes)"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Reads `len` bytes of a [`stalled_client`]'s echo and checks each against the pattern.
async fn reads_on(stalled_r: &mut OwnedReadHalf, len: u64) {
    let pattern = Pattern::new(7);
    let mut buf = vec![0u8; 64 * 1024];
    let mut off = 0u64;
    while off < len {
        let n = stalled_r.read(&mut buf).await.unwrap();
        assert!(n > 0, "the stalled stream ended early at {off}");
        assert!(
            pattern.matches(off, &buf[..n]),
            "the stalled stream differs at {off}"
        );
        off += n as u64;
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

// ---------------------------------------------------------------------------------------
// Traffic

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_mib_each_way_byte_exact_and_the_client_address_reaches_the_agent() {
    within(TEST_LIMIT, "64 MiB", async {
        const LEN: u64 = 64 << 20;
        let (w, laptop) = World::with_laptop(&["office/echo"]).await;
        let echo = TcpTarget::echo().await.unwrap();
        let mut agent = w.agent(&private("echo", echo.addr()), 1).await;
        let mut c = w.connector(&laptop, &["0=office/echo"]).await;
        c.ready(0).await;
        let addr = c.addr(0);

        // Every byte is compared with what was sent (a pattern at its offset), which is a
        // hash's check and more: it says where a difference is.
        let t = echo_transfer(addr, &EchoOpts::new(LEN, 1)).await.unwrap();
        assert!(t.exact, "{t:?}");
        assert_eq!(t.received, LEN);
        assert_eq!(echo.bytes(), LEN);
        println!(
            "64 MiB each way through the connector in {:?} ({:.1} MiB/s each way)",
            t.elapsed,
            t.mib_per_sec()
        );
        // A second connection whose address we know: the agent's line for it names the
        // connector and the client's address as the connector saw it.
        let conn = TcpStream::connect(addr).await.unwrap();
        let client = conn.local_addr().unwrap();
        let (sent, got, total) = hashed_echo(conn, 1 << 20, 2).await;
        assert_eq!((sent, total), (got, 1 << 20));
        // The agent's line for the stream names the connector and the client's address as
        // the connector saw it.
        let line = agent
            .wait_stderr(&format!("client={client}"), WAIT)
            .await
            .unwrap();
        assert!(line.contains("connector=laptop"), "{line}");
        assert!(line.contains("bytes_to_service=1048576"), "{line}");
        stop_both(&mut c, &mut agent).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_parallel_streams() {
    within(TEST_LIMIT, "100 streams", async {
        const STREAMS: u64 = 100;
        const LEN: u64 = 128 * 1024;
        let (w, laptop) = World::with_laptop(&["office/*"]).await;
        let echo = TcpTarget::echo().await.unwrap();
        let mut agent = w.agent(&private("echo", echo.addr()), 1).await;
        let mut c = w.connector(&laptop, &["0=office/echo"]).await;
        c.ready(0).await;
        let addr = c.addr(0);
        let started = Instant::now();
        let tasks: Vec<_> = (0..STREAMS)
            .map(|i| tokio::spawn(async move { echo_transfer(addr, &EchoOpts::new(LEN, i)).await }))
            .collect();
        for t in tasks {
            let t = t.await.unwrap().unwrap();
            assert!(t.exact, "{t:?}");
        }
        println!(
            "{STREAMS} parallel streams of {} KiB each way through the connector in {:?}",
            LEN / 1024,
            started.elapsed()
        );
        assert_eq!(echo.accepted(), STREAMS, "one target connection per stream");
        stop_both(&mut c, &mut agent).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_passes_through_both_ways() {
    within(TEST_LIMIT, "half-close", async {
        let (w, laptop) = World::with_laptop(&["office/*"]).await;
        let echo = TcpTarget::echo().await.unwrap();
        // Writes 100,000 bytes, half-closes, and stays until the client closes.
        let source = TcpTarget::source(Some(100_000), 3).await.unwrap();
        let mut args = private("echo", echo.addr()).to_vec();
        args.extend(private("source", source.addr()));
        let mut agent = w.agent(&args, 2).await;
        let mut c = w
            .connector(&laptop, &["0=office/echo", "0=office/source"])
            .await;
        c.ready(0).await;
        c.ready(1).await;

        // The client half-closes first: the echo still answers everything, then ends.
        let mut e = TcpStream::connect(c.addr(0)).await.unwrap();
        e.write_all(b"half a conversation").await.unwrap();
        e.shutdown().await.unwrap();
        let mut back = Vec::new();
        e.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"half a conversation");

        // The target half-closes first: the client reads to the end and can still write.
        let mut s = TcpStream::connect(c.addr(1)).await.unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, Pattern::new(3).bytes(0, 100_000));
        s.write_all(b"still open this way").await.unwrap();
        s.shutdown().await.unwrap();
        // The source closes once the client has: no reset on the way.
        let mut rest = [0u8; 1];
        let n = tokio::time::timeout(WAIT, s.read(&mut rest)).await.unwrap();
        assert_eq!(n.unwrap(), 0);
        stop_both(&mut c, &mut agent).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_client_holds_its_window_and_a_bulk_stream_on_the_same_service_finishes() {
    within(TEST_LIMIT, "stalled", async {
        const PUSHED: u64 = 256 << 20;
        const BULK: u64 = 64 << 20;
        let (w, laptop) = World::with_laptop(&["office/echo"]).await;
        let echo = TcpTarget::echo().await.unwrap();
        let mut agent = w.agent(&private("echo", echo.addr()), 1).await;
        let mut c = w.connector(&laptop, &["0=office/echo"]).await;
        c.ready(0).await;
        let addr = c.addr(0);
        let (gw0, agent0, conn0) = (
            w.gw.stats().unwrap(),
            agent.stats().unwrap(),
            c.proc.stats().unwrap(),
        );

        // A client that pushes 256 MiB into the echo and reads nothing back: the echo stops
        // reading once it cannot write, and everything in between fills up and stops.
        let (mut stalled_r, pusher) = stalled_client(addr, PUSHED).await;
        let held = until_it_stops(|| echo.bytes()).await;
        let (gw1, agent1, conn1) = (
            w.gw.stats().unwrap(),
            agent.stats().unwrap(),
            c.proc.stats().unwrap(),
        );
        // The bulk stream: the same forward, the same service, the same sessions.
        let started = Instant::now();
        let bulk = echo_transfer(addr, &EchoOpts::new(BULK, 2)).await.unwrap();
        assert!(bulk.exact, "{bulk:?}");
        let took = started.elapsed();
        let (gw2, agent2, conn2) = (
            w.gw.stats().unwrap(),
            agent.stats().unwrap(),
            c.proc.stats().unwrap(),
        );
        println!(
            "stalled: the echo took {:.1} MiB of 256 MiB from a client that reads nothing, \
             then everything stopped; a 64 MiB echo on the same service took {took:?} \
             ({:.1} MiB/s); rss (start, stalled, peak): gateway {:.1}, {:.1}, {:.1} MiB; \
             agent {:.1}, {:.1}, {:.1} MiB; connector {:.1}, {:.1}, {:.1} MiB",
            mib(held),
            bulk.mib_per_sec(),
            gw0.rss_mib(),
            gw1.rss_mib(),
            gw2.peak_rss_kib as f64 / 1024.0,
            agent0.rss_mib(),
            agent1.rss_mib(),
            agent2.peak_rss_kib as f64 / 1024.0,
            conn0.rss_mib(),
            conn1.rss_mib(),
            conn2.peak_rss_kib as f64 / 1024.0,
        );
        // Windows (at most 4 MiB per stream and direction, at the gateway, the agent and the
        // connector) and socket buffers hold the stalled stream: it is not read to the end.
        assert!(held < 64 << 20, "the stalled stream went {held} bytes far");
        for (who, a, b) in [
            ("gateway", &gw0, &gw1),
            ("agent", &agent0, &agent1),
            ("connector", &conn0, &conn1),
        ] {
            let grew = b.rss_kib.saturating_sub(a.rss_kib);
            assert!(
                grew < 32 * 1024,
                "{who} rss grew {grew} KiB with a stalled client (budget 32 MiB)"
            );
        }
        assert!(took < Duration::from_secs(120), "the bulk took {took:?}");

        // The stalled stream was only paused: it reads on, byte-exact.
        reads_on(&mut stalled_r, 16 << 20).await;
        pusher.abort();
        drop(stalled_r);
        stop_both(&mut c, &mut agent).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_connectors_use_one_service_at_once() {
    within(TEST_LIMIT, "two connectors", async {
        const LEN: u64 = 8 << 20;
        let (laptop, desk) = (SecretKey::generate(), SecretKey::generate());
        let w = World::start(&[
            Entry {
                name: "laptop",
                key: &laptop,
                reach: &["office/echo"],
            },
            Entry {
                name: "desk",
                key: &desk,
                reach: &["office/*"],
            },
        ])
        .await;
        let echo = TcpTarget::echo().await.unwrap();
        let mut agent = w.agent(&private("echo", echo.addr()), 1).await;
        let mut a = w.connector(&laptop, &["0=office/echo"]).await;
        let mut b = w.connector(&desk, &["0=office/echo"]).await;
        a.ready(0).await;
        b.ready(0).await;
        let (pa, pb) = (a.addr(0), b.addr(0));
        let (oa, ob) = (EchoOpts::new(LEN, 11), EchoOpts::new(LEN, 12));
        let (ta, tb) = tokio::join!(echo_transfer(pa, &oa), echo_transfer(pb, &ob));
        let (ta, tb) = (ta.unwrap(), tb.unwrap());
        assert!(ta.exact && tb.exact, "{ta:?} {tb:?}");
        assert_eq!(echo.bytes(), 2 * LEN);
        for who in ["laptop", "desk"] {
            let needle = format!("connector={who}");
            some_line(&mut agent, |l| {
                l.contains(&needle) && l.contains("stream closed")
            })
            .await;
        }
        stop_cleanly(&mut a.proc, "connector laptop").await;
        stop_cleanly(&mut b.proc, "connector desk").await;
        stop_cleanly(&mut agent, "agent").await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_connector_reaches_services_on_two_agents() {
    within(TEST_LIMIT, "two agents", async {
        let (w, laptop) = World::with_laptop(&["office/echo", "home/*"]).await;
        let (at_office, at_home) = (
            TcpTarget::echo().await.unwrap(),
            TcpTarget::echo().await.unwrap(),
        );
        let mut office = w.agent(&private("echo", at_office.addr()), 1).await;
        let mut home = w
            .agent_with(&w.home, &private("echo", at_home.addr()), 1)
            .await;
        let mut c = w
            .connector(&laptop, &["0=office/echo", "0=home/echo"])
            .await;
        c.ready(0).await;
        c.ready(1).await;
        let (o1, o2) = (EchoOpts::new(2 << 20, 21), EchoOpts::new(2 << 20, 22));
        let (a, b) = tokio::join!(echo_transfer(c.addr(0), &o1), echo_transfer(c.addr(1), &o2));
        assert!(a.unwrap().exact && b.unwrap().exact);
        // Each went to its own agent's service.
        assert_eq!((at_office.bytes(), at_home.bytes()), (2 << 20, 2 << 20));
        stop_cleanly(&mut c.proc, "connector").await;
        stop_cleanly(&mut office, "agent office").await;
        stop_cleanly(&mut home, "agent home").await;
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// Refusals

/// A local client of a refused forward: accepted (the listener is there: not "connection
/// refused"), then closed promptly (a reset, even one that beats the connect's own
/// completion, or EOF within 5 s), with nothing read.
async fn refused_promptly(addr: SocketAddr) -> Duration {
    let started = Instant::now();
    let mut c = match TcpStream::connect(addr).await {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return started.elapsed(),
        Err(e) => panic!("connecting to the connector's listener {addr}: {e}"),
    };
    let _ = c.write_all(b"hello?").await;
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf))
        .await
        .expect("a refused client is closed within 5 s");
    assert!(
        !matches!(read, Ok(n) if n > 0),
        "a refused client read {read:?}"
    );
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_say_why_and_connect_nothing() {
    within(TEST_LIMIT, "refusals", async {
        let (mut w, laptop) =
            World::with_laptop(&["office/echo", "office/missing", "office/targets"]).await;
        let echo = TcpTarget::echo().await.unwrap();
        // A private service the connector's reach leaves out, a target the agent allows and
        // one it does not: none of them may see a connection from a refused stream.
        let secret = TcpTarget::echo().await.unwrap();
        let allowed = TcpTarget::echo().await.unwrap();
        let forbidden = TcpTarget::echo().await.unwrap();
        let mut args = private("echo", echo.addr()).to_vec();
        args.extend(private("secret", secret.addr()));
        args.extend(["--allow".to_string(), allowed.addr().to_string()]);
        let mut agent = w.agent(&args, 2).await;
        let forwards = [
            "0=office/echo".to_string(),
            "0=office/secret".to_string(),
            "0=office/missing".to_string(),
            format!("0=office/{}", forbidden.addr()),
            format!("0=office/{}", allowed.addr()),
        ];
        let specs: Vec<&str> = forwards.iter().map(String::as_str).collect();
        let mut c = w.connector(&laptop, &specs).await;
        let causes = [
            (1, "`office/secret` is not in this connector's reach"),
            (2, "agent `office` has no private service `missing`"),
            (
                3,
                &*format!(
                    "refused by agent `office`: {} is not in its allow list",
                    forbidden.addr()
                ),
            ),
        ];
        c.ready(0).await;
        c.ready(4).await;
        for (i, cause) in causes {
            let v = c.verdict(i).await;
            assert!(v.contains(cause), "forward {}: {v}", c.forwards[i]);
        }
        // Each refused client is closed at once, and the reason is in the connector's log.
        for (i, cause) in causes {
            let took = refused_promptly(c.addr(i)).await;
            some_line(&mut c.proc, |l| {
                l.contains("connection closed") && l.contains(cause)
            })
            .await;
            println!("refused ({cause}): closed {took:?} after connecting");
        }
        // The gateway said why too; the agent heard of the target it refused, and of nothing
        // the gateway refused.
        some_line(&mut w.gw.proc, |l| {
            l.contains("is not in the reach of connector `laptop`")
        })
        .await;
        let forbidden_text = forbidden.addr().to_string();
        some_line(&mut agent, |l| {
            l.contains("connector stream refused") && l.contains(&forbidden_text)
        })
        .await;
        assert!(!agent
            .stderr_lines()
            .iter()
            .any(|l| l.contains("secret") && l.contains("refused")));
        // The allowed ones work.
        let t = echo_transfer(c.addr(0), &EchoOpts::new(1 << 20, 1))
            .await
            .unwrap();
        assert!(t.exact);
        let t = echo_transfer(c.addr(4), &EchoOpts::new(1 << 20, 2))
            .await
            .unwrap();
        assert!(t.exact);
        assert_eq!(
            secret.accepted(),
            0,
            "a service outside the reach was connected to"
        );
        assert_eq!(
            forbidden.accepted(),
            0,
            "a target outside allow was connected to"
        );
        assert_eq!(allowed.accepted(), 1);
        assert_eq!(echo.accepted(), 1);
        stop_both(&mut c, &mut agent).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agents_key_cannot_act_as_a_connector_nor_the_reverse() {
    within(TEST_LIMIT, "keys and roles", async {
        let (w, laptop) = World::with_laptop(&["office/*"]).await;
        let echo = TcpTarget::echo().await.unwrap();
        let mut agent = w.agent(&private("echo", echo.addr()), 1).await;

        let mut c = w.connector(&w.office, &["0=office/echo"]).await;
        let st = c.proc.wait_exit(WAIT).await.unwrap();
        assert!(!st.success(), "a connector with an agent's key stops: {st}");
        let err = c.proc.stderr_lines().join("\n");
        assert!(
            err.contains("this key belongs to agent `office` and cannot act as a connector"),
            "{err}"
        );
        assert_eq!(echo.accepted(), 0);

        // The connector's key used by an agent.
        let mut cmd = Burrow::command(bin());
        cmd.arg("agent")
            .args(w.dial_args(false))
            .args(private("echo", echo.addr()))
            .env("BURROW_KEY", laptop.expose());
        let mut wrong = Burrow::start(cmd).unwrap();
        let st = wrong.wait_exit(WAIT).await.unwrap();
        assert!(!st.success());
        let err = wrong.stderr_lines().join("\n");
        assert!(
            err.contains("this key belongs to connector `laptop` and cannot act as an agent"),
            "{err}"
        );
        stop_cleanly(&mut agent, "agent").await;
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// Listeners

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connector_listens_on_a_unix_socket() {
    within(TEST_LIMIT, "unix", async {
        let (w, laptop) = World::with_laptop(&["office/echo"]).await;
        let echo = TcpTarget::echo().await.unwrap();
        let mut agent = w.agent(&private("echo", echo.addr()), 1).await;
        let sock = w.dir.path().join("echo.sock");
        let spec = format!("unix:{}=office/echo", sock.display());
        let mut c = w.connector(&laptop, &[&spec]).await;
        assert_eq!(c.listen[0], format!("unix:{}", sock.display()));
        c.ready(0).await;
        let (sent, got, total) =
            hashed_echo(UnixStream::connect(&sock).await.unwrap(), 4 << 20, 5).await;
        assert_eq!(total, 4 << 20);
        assert_eq!(sent, got);
        // A unix client has no address: the agent's line says so.
        let line = agent.wait_stderr("stream closed", WAIT).await.unwrap();
        assert!(
            line.contains("connector=laptop") && line.contains("client=-"),
            "{line}"
        );
        stop_cleanly(&mut c.proc, "connector").await;
        assert!(!sock.exists(), "the socket file is removed at exit");
        stop_cleanly(&mut agent, "agent").await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listeners_stay_open_through_a_gateway_restart() {
    within(TEST_LIMIT, "restart", async {
        let (mut w, laptop) = World::with_laptop(&["office/echo"]).await;
        let echo = TcpTarget::echo().await.unwrap();
        let mut agent = w.agent(&private("echo", echo.addr()), 1).await;
        let mut c = w.connector(&laptop, &["0=office/echo"]).await;
        c.ready(0).await;
        let addr = c.addr(0);
        assert!(
            echo_transfer(addr, &EchoOpts::new(1 << 20, 1))
                .await
                .unwrap()
                .exact
        );

        let killed = Instant::now();
        w.gw.proc.signal(Signal::Kill).unwrap();
        c.proc.wait_stderr("next attempt in", WAIT).await.unwrap();
        // The listener is still there: a client is accepted and closed at once, not refused.
        let took = refused_promptly(addr).await;
        c.proc
            .wait_stderr("no session with the gateway yet", WAIT)
            .await
            .unwrap();

        w.restart_gateway().await;
        // Whichever of the agent and the connector is back first, the connector says the
        // forward is ready once both are (it asks again while the agent is missing).
        c.ready_eventually(0).await;
        let back = killed.elapsed();
        let t = echo_transfer(addr, &EchoOpts::new(1 << 20, 2))
            .await
            .unwrap();
        assert!(t.exact, "{t:?}");
        println!(
            "restart: a client while the gateway was down was closed {took:?} after \
             connecting; the same listener served again {back:?} after the gateway was killed"
        );
        stop_both(&mut c, &mut agent).await;
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// Settings

/// Runs `burrow ARGS` with `env` to its end; its exit status and stdout.
async fn run_to_end(
    args: &[&str],
    env: &[(&str, &str)],
) -> (std::process::ExitStatus, String, String) {
    let mut cmd = Burrow::command(bin());
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut p = Burrow::start(cmd).unwrap();
    let st = p.wait_exit(WAIT).await.unwrap();
    let out = p.stdout_lines().join("\n");
    let err = p.stderr_lines().join("\n");
    (st, out, err)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_come_from_flags_environment_and_file() {
    within(TEST_LIMIT, "settings", async {
        let key = SecretKey::generate();
        let k = key.expose();
        // The agent: --private and --allow, or BURROW_PRIVATE and BURROW_ALLOW (empty
        // entries skipped).
        let base = ["agent", "--gateway", "tcp://127.0.0.1:1", "--print-config"];
        let (st, out, _) = run_to_end(
            &base,
            &[
                ("BURROW_KEY", &k),
                ("BURROW_PRIVATE", "vnc=127.0.0.1:5900,,ssh=127.0.0.1:22"),
                ("BURROW_ALLOW", "10.0.0.0/8:22,"),
            ],
        )
        .await;
        assert!(st.success(), "{out}");
        assert!(
            out.contains(r#"private = ["vnc=127.0.0.1:5900", "ssh=127.0.0.1:22"]"#),
            "{out}"
        );
        assert!(out.contains(r#"allow = ["10.0.0.0/8:22"]"#), "{out}");
        let mut flags = base.to_vec();
        flags.extend(["--private", "db=127.0.0.1:5432", "--allow", "nas:*"]);
        let (_, out, _) = run_to_end(
            &flags,
            &[("BURROW_KEY", &k), ("BURROW_PRIVATE", "vnc=127.0.0.1:5900")],
        )
        .await;
        assert!(
            out.contains(r#"private = ["db=127.0.0.1:5432"]"#),
            "the flag wins: {out}"
        );
        assert!(out.contains(r#"allow = ["nas:*"]"#), "{out}");
        let (st, _, err) =
            run_to_end(&base, &[("BURROW_KEY", &k), ("BURROW_ALLOW", "10.0.0.0/8")]).await;
        assert!(!st.success());
        assert!(
            err.contains("BURROW_ALLOW") && err.contains("is not a target pattern"),
            "{err}"
        );

        // The connector: the flag beats the variable beats the file; the key is masked.
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("connect.toml");
        std::fs::write(
            &file,
            format!(
                "gateway = \"tcp://127.0.0.1:1\"\nkey = \"{k}\"\nforward = [\"1001=office/a\"]\n"
            ),
        )
        .unwrap();
        let file = file.display().to_string();
        let connect = ["connect", "--config", &file, "--print-config"];
        let (st, out, err) = run_to_end(&connect, &[]).await;
        assert!(st.success(), "{err}");
        assert!(out.contains(r#"forward = ["1001=office/a"]"#), "{out}");
        assert!(
            out.contains("key = \"bk_****\"") && !out.contains(&k[3..]),
            "{out}"
        );
        let (_, out, _) = run_to_end(&connect, &[("BURROW_FORWARD", "1002=office/b,")]).await;
        assert!(out.contains(r#"forward = ["1002=office/b"]"#), "{out}");
        let mut with_flag = connect.to_vec();
        with_flag.extend(["--forward", "unix:/tmp/x.sock=office/10.0.0.5:22"]);
        let (_, out, _) = run_to_end(&with_flag, &[("BURROW_FORWARD", "1002=office/b")]).await;
        assert!(
            out.contains(r#"forward = ["unix:/tmp/x.sock=office/10.0.0.5:22"]"#),
            "{out}"
        );
        let (st, _, err) = run_to_end(&connect, &[("BURROW_FORWARD", "1002:office/b")]).await;
        assert!(!st.success());
        assert!(err.contains("BURROW_FORWARD"), "{err}");
    })
    .await;
}

/// The connector's session and the agent's carried by different transports (one over QUIC,
/// the other TLS over TCP): 16 MiB each way byte-exact and a 4 MiB echo whose SHA-256 is
/// compared; then a client that reads nothing beside a bulk stream on the same service: the
/// stalled stream stops within its windows at the gateway's stream-to-stream join, the bulk
/// finishes byte-exact, and the stalled stream then reads on byte-exact.
async fn across_carriers(connector_quic: bool, agent_quic: bool) {
    const LEN: u64 = 16 << 20;
    const PUSHED: u64 = 128 << 20;
    const BULK: u64 = 16 << 20;
    let (mut w, laptop) = World::with_laptop(&["office/echo"]).await;
    w.agent_quic = agent_quic;
    w.connector_quic = connector_quic;
    let echo = TcpTarget::echo().await.unwrap();
    let mut agent = w.agent(&private("echo", echo.addr()), 1).await;
    let mut c = w.connector(&laptop, &["0=office/echo"]).await;
    c.ready(0).await;
    // Each side says what carries its session.
    let carrier = |quic: bool| if quic { "quic" } else { "tcp" };
    for (who, p, quic) in [
        ("agent", &mut agent, agent_quic),
        ("connector", &mut c.proc, connector_quic),
    ] {
        let line = some_line(p, |l| l.contains("connected to gateway")).await;
        assert!(
            line.contains(&format!("carrier={}", carrier(quic)))
                || line.contains(&format!("carrier=\"{}\"", carrier(quic))),
            "the {who}'s session is not over {}: {line}",
            carrier(quic)
        );
    }
    let addr = c.addr(0);

    let t = echo_transfer(addr, &EchoOpts::new(LEN, 3)).await.unwrap();
    assert!(t.exact, "{t:?}");
    assert_eq!(t.received, LEN);
    let conn = TcpStream::connect(addr).await.unwrap();
    let (sent, got, total) = hashed_echo(conn, 4 << 20, 4).await;
    assert_eq!(total, 4 << 20);
    assert_eq!(
        sent, got,
        "the SHA-256 of what came back differs from what was sent"
    );
    let bulk_rate = t.mib_per_sec();

    // The stalled client.
    let before = echo.bytes();
    let (mut stalled_r, pusher) = stalled_client(addr, PUSHED).await;
    let held = until_it_stops(|| echo.bytes() - before).await;
    let gw_stalled = w.gw.stats().unwrap();
    let started = Instant::now();
    let bulk = echo_transfer(addr, &EchoOpts::new(BULK, 5)).await.unwrap();
    assert!(bulk.exact, "{bulk:?}");
    let took = started.elapsed();
    println!(
        "connector over {}, agent over {}: 16 MiB each way at {bulk_rate:.1} MiB/s; a client \
         that reads nothing stopped after {:.1} MiB of 128 MiB (gateway rss {:.1} MiB then); \
         a 16 MiB echo beside it took {took:?}",
        carrier(connector_quic),
        carrier(agent_quic),
        mib(held),
        gw_stalled.rss_mib(),
    );
    // Windows and socket buffers hold it, end to end, whatever carries each side.
    assert!(held < 64 << 20, "the stalled stream went {held} bytes far");
    reads_on(&mut stalled_r, 4 << 20).await;
    pusher.abort();
    drop(stalled_r);
    stop_both(&mut c, &mut agent).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connector_over_quic_agent_over_tls_byte_exact_with_flow_control() {
    within(
        TEST_LIMIT,
        "connector over quic",
        across_carriers(true, false),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_over_quic_connector_over_tls_byte_exact_with_flow_control() {
    within(TEST_LIMIT, "agent over quic", across_carriers(false, true)).await;
}

/// `POST /api/reload` on the gateway's admin server: the answer's `changes`.
async fn reload_gateway(gw: &mut GatewayProc) -> Vec<String> {
    let admin = admin_addr(gw, WAIT).await;
    let (head, body) = http_exchange(
        admin,
        &format!("POST /api/reload HTTP/1.1\r\nHost: {admin}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"),
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}\n{body}");
    let report: serde_json::Value = serde_json::from_str(&body).unwrap();
    report["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap().to_string())
        .collect()
}

/// One echo round trip of `data` on an open connection.
async fn round_trip(c: &mut TcpStream, data: &[u8]) {
    c.write_all(data).await.unwrap();
    let mut back = vec![0u8; data.len()];
    c.read_exact(&mut back).await.unwrap();
    assert_eq!(back, data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_reload_adds_removes_rekeys_and_narrows_connectors() {
    within(TEST_LIMIT, "connector reload", async {
        let (laptop, desk, old, new, fresh) = (
            SecretKey::generate(),
            SecretKey::generate(),
            SecretKey::generate(),
            SecretKey::generate(),
            SecretKey::generate(),
        );
        let mut w = World::start_with(
            &[
                Entry {
                    name: "laptop",
                    key: &laptop,
                    reach: &["office/echo", "office/other"],
                },
                Entry {
                    name: "desk",
                    key: &desk,
                    reach: &["office/echo"],
                },
                Entry {
                    name: "rekey",
                    key: &old,
                    reach: &["office/echo"],
                },
            ],
            &["--admin", "127.0.0.1:0"],
        )
        .await;
        let (echo, other) = (
            TcpTarget::echo().await.unwrap(),
            TcpTarget::echo().await.unwrap(),
        );
        let args: Vec<String> = private("echo", echo.addr())
            .into_iter()
            .chain(private("other", other.addr()))
            .collect();
        let mut agent = w.agent(&args, 2).await;
        let mut c_laptop = w
            .connector(&laptop, &["0=office/echo", "0=office/other"])
            .await;
        let mut c_desk = w.connector(&desk, &["0=office/echo"]).await;
        let mut c_rekey = w.connector(&old, &["0=office/echo"]).await;
        c_laptop.ready(0).await;
        c_laptop.ready(1).await;
        c_desk.ready(0).await;
        c_rekey.ready(0).await;
        // A stream through `laptop` to `other`, open across the reload that narrows its reach.
        let mut held = TcpStream::connect(c_laptop.addr(1)).await.unwrap();
        round_trip(&mut held, b"before the reload").await;
        let other_before = other.accepted();

        // `desk` removed, `rekey` with a new key, `laptop` without `office/other`, `fresh`
        // added.
        w.rewrite(&[
            Entry {
                name: "laptop",
                key: &laptop,
                reach: &["office/echo"],
            },
            Entry {
                name: "rekey",
                key: &new,
                reach: &["office/echo"],
            },
            Entry {
                name: "fresh",
                key: &fresh,
                reach: &["office/echo"],
            },
        ]);
        let started = Instant::now();
        let changes = reload_gateway(&mut w.gw).await;
        println!("reload answered in {:?}: {changes:#?}", started.elapsed());
        let has = |needle: &str| changes.iter().any(|c| c.contains(needle));
        assert!(has("connector `desk` removed"), "{changes:?}");
        assert!(has("connector `rekey`: key changed"), "{changes:?}");
        assert!(
            has("connector `laptop`: reach [office/echo] (was [office/echo, office/other])"),
            "{changes:?}"
        );
        assert!(has("connector `fresh` added"), "{changes:?}");

        // The removed and the re-keyed connectors lose their sessions, told why.
        c_desk
            .proc
            .wait_stderr(
                "connector `desk` was removed from the gateway's config",
                WAIT,
            )
            .await
            .unwrap();
        c_rekey
            .proc
            .wait_stderr(
                "the key of connector `rekey` changed in the gateway's config",
                WAIT,
            )
            .await
            .unwrap();
        // Their clients are closed from now on (the key is no longer accepted).
        refused_promptly(c_desk.addr(0)).await;
        // The added one is accepted at once.
        let mut c_fresh = w.connector(&fresh, &["0=office/echo"]).await;
        c_fresh.ready(0).await;
        let (sent, got, total) = hashed_echo(
            TcpStream::connect(c_fresh.addr(0)).await.unwrap(),
            1 << 20,
            8,
        )
        .await;
        assert_eq!((sent, total), (got, 1 << 20));
        // The narrowed one: its open stream carries on, a new one outside the reach is
        // refused with the cause (and reaches no target), one inside it works.
        round_trip(&mut held, b"after the reload").await;
        let took = refused_promptly(c_laptop.addr(1)).await;
        c_laptop
            .proc
            .wait_stderr("`office/other` is not in this connector's reach", WAIT)
            .await
            .unwrap();
        assert_eq!(
            other.accepted(),
            other_before,
            "no connection to the target outside the reach"
        );
        let (sent, got, total) = hashed_echo(
            TcpStream::connect(c_laptop.addr(0)).await.unwrap(),
            1 << 20,
            9,
        )
        .await;
        assert_eq!((sent, total), (got, 1 << 20));
        println!("after the reload a stream outside the narrowed reach was closed in {took:?}");
        drop(held);
        for (p, who) in [
            (&mut c_laptop.proc, "laptop"),
            (&mut c_fresh.proc, "fresh"),
            (&mut agent, "agent"),
        ] {
            stop_cleanly(p, who).await;
        }
    })
    .await;
}
