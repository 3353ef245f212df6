//! The outbound proxy hop through the real binary and real proxy servers from Debian's
//! packages: `dante-server` (danted, SOCKS5), `microsocks` (SOCKS5 with a user and password)
//! and `squid` (HTTP CONNECT with Basic authentication). Each test starts its own server
//! on a loopback port with a config written into a temporary directory; a missing server is
//! a failure that says which package to install (`.ci/run` installs them).
//!
//! - Traffic: 64 MiB each way and 100 parallel streams, byte-exact, for `tls://` through
//!   danted, `tls://` through microsocks with a password, `wss://` through squid with
//!   Basic auth; `socks5h://`, `tcp://` and `ws://` through a proxy once each.
//! - Refusals: a wrong SOCKS5 password, a wrong or missing HTTP password (407), a CONNECT the
//!   proxy's
//!   policy forbids (403): the agent names the proxy and the status and exits at once; a
//!   proxy that is not there is retried.
//! - The environment: `HTTPS_PROXY` is used, `NO_PROXY` that lists the gateway skips it,
//!   `--proxy none` ignores it; passwords are masked in `--print-config` and the logs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hash::{BuildHasher, Hasher};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use burrow_testkit::harness::within;
use burrow_testkit::targets::{echo_transfer, EchoOpts};
use burrow_testkit::{
    count_tcp_state, AgentProc, AgentSpec, Burrow, GatewaySpec, TcpState, TcpTarget,
};
use tokio::time::Instant;

/// Upper bound for a whole test, so a hang fails instead of blocking the run.
const TEST_LIMIT: Duration = Duration::from_secs(120);
/// How long a process gets to print what we wait for.
const WAIT: Duration = Duration::from_secs(30);
/// The big transfer, each way.
const BIG: u64 = 64 << 20;
/// Parallel streams, and the bytes each sends (and gets back).
const STREAMS: u64 = 100;
const STREAM_BYTES: u64 = 256 << 10;

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_burrow"))
}

// ---------------------------------------------------------------------------------------------
// Proxy servers.

/// The path of program `name` from Debian's package `package`. Not skipped when missing: CI
/// installs the package, so a missing one is a broken setup that must show.
fn need(name: &str, package: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs = std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/bin", "/sbin", "/bin"].map(PathBuf::from));
    for dir in dirs {
        let p = dir.join(name);
        if p.is_file() {
            return p;
        }
    }
    panic!(
        "`{name}` is not installed: install Debian's `{package}` package \
         (apt-get install {package}; .ci/run does)"
    );
}

/// A proxy server this test started; it and its children are stopped when dropped.
struct ProxyServer {
    proc: Burrow,
    addr: SocketAddr,
    dir: tempfile::TempDir,
}

impl ProxyServer {
    fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Checks that the agent's tunnel runs through this server: both ends of a connection
    /// to its port are established (the agent's socket and the server's). `/proc/net/tcp`
    /// is not read atomically and can miss an entry while other sockets come and go, so a
    /// few reads within a second decide.
    async fn assert_carries_the_tunnel(&self) {
        let deadline = Instant::now() + Duration::from_secs(1);
        loop {
            let n = count_tcp_state(&[self.port()], TcpState::Established).unwrap();
            if n >= 2 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "no established connection through the proxy on port {}",
                self.port()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for ProxyServer {
    fn drop(&mut self) {
        // The server runs in its own process group (danted forks helpers): stop them all.
        if let Some(pid) = rustix::process::Pid::from_raw(self.proc.pid() as i32) {
            let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
        }
    }
}

/// A port that is free now and outside the kernel's ephemeral range, for servers that
/// cannot bind port 0 and tell us the port (danted, squid): no outgoing connection of
/// another test takes it meanwhile, and a clash with another such server is retried.
fn spare_port() -> u16 {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .unwrap_or_else(|_| "32768 60999".into());
    let low: u16 = range
        .split_whitespace()
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or(32768);
    let (from, to) = if low > 12_000 {
        (low - 10_000, low)
    } else {
        (61_000, 65_000)
    };
    loop {
        let r = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        let port = from + (r % u64::from(to - from)) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// Where a server says it is ready.
enum Ready {
    /// A line on stderr.
    Stderr(&'static str),
    /// A line in a log file in the server's directory.
    Log(&'static str, &'static str),
}

impl ProxyServer {
    /// Waits for a line of the server's log file `file` that contains `needle`.
    async fn wait_log(&mut self, file: &str, needle: &str) -> String {
        let path = self.dir.path().join(file);
        match wait_file_line(&path, needle, &mut self.proc).await {
            Ok(line) => line,
            Err(e) => panic!("{e}"),
        }
    }
}

/// Polls `path` (bounded by [`WAIT`]) for a line containing `needle`; fails early if `proc`
/// exits.
async fn wait_file_line(
    path: &Path,
    needle: &str,
    proc: &mut Burrow,
) -> Result<String, burrow_testkit::Error> {
    let deadline = Instant::now() + WAIT;
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if let Some(line) = text.lines().find(|l| l.contains(needle)) {
            return Ok(line.to_string());
        }
        if Instant::now() >= deadline {
            return Err(burrow_testkit::Error::Timeout {
                what: format!("{}: a line with {needle:?}", path.display()),
                timeout: WAIT,
                tail: text.lines().rev().take(10).map(str::to_string).collect(),
            });
        }
        // An exit shows as such (with its status), so a clash on the port can be retried.
        proc.wait_exit(Duration::from_millis(20))
            .await
            .map_or(Ok(()), |status| {
                Err(burrow_testkit::Error::Exited {
                    what: format!("{}: a line with {needle:?}", path.display()),
                    status,
                    tail: text.lines().rev().take(10).map(str::to_string).collect(),
                })
            })?;
    }
}

/// Starts a server on a spare port (`make` writes its config into the directory and gives
/// the command), waiting for its ready line; another port if that one was taken.
async fn start_on_spare_port(
    name: &str,
    ready: Ready,
    make: impl Fn(u16, &Path) -> Command,
) -> ProxyServer {
    let mut last = String::new();
    for _ in 0..5 {
        let dir = tempfile::tempdir().unwrap();
        let port = spare_port();
        let mut cmd = make(port, dir.path());
        cmd.process_group(0).env("TMPDIR", dir.path());
        let mut proc = Burrow::start(cmd).unwrap();
        let up = match ready {
            Ready::Stderr(needle) => proc.wait_stderr(needle, WAIT).await.map(drop),
            Ready::Log(file, needle) => wait_file_line(&dir.path().join(file), needle, &mut proc)
                .await
                .map(drop),
        };
        match up {
            Ok(()) => {
                return ProxyServer {
                    proc,
                    addr: SocketAddr::from(([127, 0, 0, 1], port)),
                    dir,
                }
            }
            // Most likely the port was taken after all: try another.
            Err(e @ burrow_testkit::Error::Exited { .. }) => last = e.to_string(),
            Err(e) => panic!("{name} did not start: {e}"),
        }
    }
    panic!("{name} did not start on any of 5 ports: {last}");
}

/// danted: SOCKS5 without authentication, logging each connection to stderr.
async fn danted() -> ProxyServer {
    let danted = need("danted", "dante-server");
    start_on_spare_port("danted", Ready::Stderr("running"), |port, dir| {
        let conf = dir.join("danted.conf");
        std::fs::write(
            &conf,
            format!(
                "logoutput: stderr\n\
                 internal: 127.0.0.1 port = {port}\n\
                 external: 127.0.0.1\n\
                 socksmethod: none\n\
                 clientmethod: none\n\
                 user.privileged: root\n\
                 user.unprivileged: nobody\n\
                 client pass {{\n  from: 127.0.0.0/8 to: 0.0.0.0/0\n}}\n\
                 socks pass {{\n  from: 127.0.0.0/8 to: 0.0.0.0/0\n  command: connect\n  \
                 log: connect error\n}}\n"
            ),
        )
        .unwrap();
        let mut cmd = Command::new(&danted);
        cmd.arg("-f")
            .arg(&conf)
            .arg("-p")
            .arg(dir.join("danted.pid"));
        cmd
    })
    .await
}

/// squid: HTTP CONNECT, with Basic authentication for `auth` (user, password) if given, and
/// only to port 443 if `only_443`. `cache.log` says when it is ready; `access.log` has a line
/// for each tunnel once it ends.
async fn squid(auth: Option<(&str, &str)>, only_443: bool) -> ProxyServer {
    let squid = need("squid", "squid");
    start_on_spare_port(
        "squid",
        Ready::Log("cache.log", "Accepting HTTP Socket connections"),
        |port, dir| {
            // Squid runs as its own user when started as root: it must write here.
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777)).unwrap();
            let d = dir.display();
            let mut conf = format!(
                "http_port 127.0.0.1:{port}\n\
                 pid_filename {d}/squid.pid\n\
                 cache_log {d}/cache.log\n\
                 access_log stdio:{d}/access.log\n\
                 netdb_filename none\n\
                 coredump_dir {d}\n\
                 cache deny all\n\
                 cache_mem 8 MB\n\
                 pinger_enable off\n\
                 shutdown_lifetime 0 seconds\n\
                 acl CONNECT method CONNECT\n\
                 acl SSL_ports port 443\n"
            );
            if only_443 {
                conf.push_str("http_access deny CONNECT !SSL_ports\n");
            }
            if let Some((user, pass)) = auth {
                // A Basic auth helper: reads `user password` lines, answers OK or ERR.
                let helper = dir.join("auth.sh");
                std::fs::write(
                    &helper,
                    format!(
                        "#!/bin/sh\nwhile read -r u p; do\n  \
                         if [ \"$u\" = '{user}' ] && [ \"$p\" = '{pass}' ]; then echo OK; \
                         else echo ERR; fi\ndone\n"
                    ),
                )
                .unwrap();
                std::fs::set_permissions(&helper, std::fs::Permissions::from_mode(0o755)).unwrap();
                conf.push_str(&format!(
                    "auth_param basic program {}\n\
                     auth_param basic children 1\n\
                     acl authed proxy_auth REQUIRED\n\
                     http_access allow authed\n",
                    helper.display()
                ));
            } else {
                conf.push_str("http_access allow all\n");
            }
            conf.push_str("http_access deny all\n");
            let path = dir.join("squid.conf");
            std::fs::write(&path, conf).unwrap();
            let mut cmd = Command::new(&squid);
            // Foreground, and a service name of its own so parallel squids share nothing.
            cmd.arg("-N")
                .arg("-n")
                .arg(format!("burrowtest{port}"))
                .arg("-f")
                .arg(&path);
            cmd
        },
    )
    .await
}

/// microsocks: SOCKS5 with a user name and password. It binds port 0; the port is read
/// back from its listening socket in `/proc`.
async fn microsocks(user: &str, pass: &str) -> ProxyServer {
    let microsocks = need("microsocks", "microsocks");
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(microsocks);
    cmd.args(["-i", "127.0.0.1", "-p", "0", "-u", user, "-P", pass])
        .process_group(0);
    let mut proc = Burrow::start(cmd).unwrap();
    let deadline = Instant::now() + WAIT;
    let port = loop {
        if let Some(port) = listening_port(proc.pid()) {
            break port;
        }
        assert!(
            Instant::now() < deadline,
            "microsocks did not listen within {WAIT:?}: {:?}",
            proc.stderr_tail()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    ProxyServer {
        proc,
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
        dir,
    }
}

/// The port of the IPv4 socket process `pid` listens on, if it has one yet.
fn listening_port(pid: u32) -> Option<u16> {
    let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()?
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|l| {
            let l = l.to_string_lossy().into_owned();
            Some(l.strip_prefix("socket:[")?.strip_suffix(']')?.to_string())
        })
        .collect();
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() > 9 && f[3] == "0A" && inodes.iter().any(|i| i == f[9]) {
            u16::from_str_radix(f[1].rsplit(':').next()?, 16).ok()
        } else {
            None
        }
    })
}

/// A listener that accepts connections and never answers: a proxy the agent must not use.
struct Tarpit {
    addr: SocketAddr,
    accepted: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Tarpit {
    async fn start() -> Tarpit {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let accepted = Arc::new(AtomicU64::new(0));
        let count = accepted.clone();
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((c, _)) = l.accept().await {
                count.fetch_add(1, Ordering::Relaxed);
                held.push(c);
            }
        });
        Tarpit {
            addr,
            accepted,
            task,
        }
    }
}

impl Drop for Tarpit {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ---------------------------------------------------------------------------------------------
// Gateway, agent, traffic.

/// A zero-config gateway (started by hand rather than by `GatewaySpec::start`, which
/// waits for a certificate fingerprint a plain gateway does not print) and an echo service.
struct Setup {
    _state: tempfile::TempDir,
    _gw: Burrow,
    addr: SocketAddr,
    /// The printed `burrow agent ...` line, from `agent` on.
    agent_line: Vec<String>,
    echo: TcpTarget,
}

async fn gateway(args: &[&str]) -> Setup {
    let state = tempfile::tempdir().unwrap();
    let spec = GatewaySpec::new(state.path()).args(args.iter().copied());
    let mut gw = Burrow::start(spec.command(bin())).unwrap();
    let listening = gw
        .wait_stdout(|l| l.starts_with("gateway listening on "), WAIT)
        .await
        .unwrap();
    let addr = listening
        .trim_start_matches("gateway listening on ")
        .parse()
        .unwrap();
    let line = gw
        .wait_stdout(|l| l.starts_with("burrow agent "), WAIT)
        .await
        .unwrap();
    Setup {
        _state: state,
        _gw: gw,
        addr,
        agent_line: line
            .split_whitespace()
            .skip(1)
            .map(str::to_string)
            .collect(),
        echo: TcpTarget::echo().await.unwrap(),
    }
}

impl Setup {
    /// The gateway's agent arguments with `--gateway` set to `gateway` (`{port}` replaced by
    /// the tunnel port), the certificate pinned as printed.
    fn agent_args(&self, gateway: &str, more: &[&str]) -> Vec<String> {
        let gateway = gateway.replace("{port}", &self.addr.port().to_string());
        let mut args = self.agent_line.clone();
        let i = args.iter().position(|a| a == "--gateway").unwrap();
        args[i + 1] = gateway;
        if args.iter().any(|a| a == "--fingerprint")
            && (args[i + 1].starts_with("tcp://") || args[i + 1].starts_with("ws://"))
        {
            // A plain gateway: no certificate to pin.
            let j = args.iter().position(|a| a == "--fingerprint").unwrap();
            args.drain(j..j + 2);
        }
        args.extend(more.iter().map(|s| s.to_string()));
        args
    }

    fn agent(&self, args: Vec<String>) -> AgentSpec {
        AgentSpec::new(args).forward(&self.echo.addr().to_string())
    }
}

/// 64 MiB each way through one stream, then 100 streams in parallel, all byte-exact.
async fn heavy_traffic(agent: &AgentProc, label: &str) {
    let public = agent.public(0);
    let big = echo_transfer(public, &EchoOpts::new(BIG, 1)).await.unwrap();
    assert!(
        big.exact,
        "{label}: 64 MiB echo not byte-exact ({} of {} bytes back)",
        big.received, big.bytes
    );
    let started = Instant::now();
    let streams: Vec<_> = (0..STREAMS)
        .map(|i| {
            tokio::spawn(async move {
                echo_transfer(public, &EchoOpts::new(STREAM_BYTES, 100 + i)).await
            })
        })
        .collect();
    for (i, s) in streams.into_iter().enumerate() {
        let t = s.await.unwrap().unwrap();
        assert!(t.exact, "{label}: stream {i} of {STREAMS} not byte-exact");
    }
    println!(
        "{label}: 64 MiB each way in {:.2} s ({:.0} MiB/s); {STREAMS} parallel streams of {} KiB \
         each way in {:.2} s",
        big.elapsed.as_secs_f64(),
        big.mib_per_sec(),
        STREAM_BYTES >> 10,
        started.elapsed().as_secs_f64()
    );
}

/// One 1 MiB echo, byte-exact.
async fn light_traffic(agent: &AgentProc, label: &str) {
    let t = echo_transfer(agent.public(0), &EchoOpts::new(1 << 20, 7))
        .await
        .unwrap();
    assert!(t.exact, "{label}: 1 MiB echo not byte-exact");
}

// ---------------------------------------------------------------------------------------------
// Traffic through each proxy.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_through_danted_socks5() {
    within(TEST_LIMIT, "tls through danted", async {
        let mut socks = danted().await;
        let s = gateway(&[]).await;
        // A name: with socks5:// the agent resolves it and hands the proxy an address.
        let proxy = format!("socks5://127.0.0.1:{}", socks.port());
        let args = s.agent_args("tls://localhost:{port}", &["--proxy", &proxy]);
        let mut agent = s.agent(args).start(bin()).await.unwrap();
        agent
            .wait_stderr(&format!("connecting through proxy {proxy} (--proxy)"), WAIT)
            .await
            .unwrap();
        heavy_traffic(&agent, "tls:// through danted").await;
        socks.assert_carries_the_tunnel().await;
        // The tunnel really went through danted, to the gateway's tunnel port.
        let gw_port = s.addr.port();
        socks
            .proc
            .wait_stderr(&format!(" 127.0.0.1.{gw_port}"), WAIT)
            .await
            .unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_through_microsocks_with_a_password() {
    within(TEST_LIMIT, "tls through microsocks", async {
        let socks = microsocks("alice", "s3cret").await;
        let s = gateway(&[]).await;
        let proxy = format!("socks5://alice:s3cret@127.0.0.1:{}", socks.port());
        // A bare HOST:PORT is TLS.
        let args = s.agent_args("127.0.0.1:{port}", &["--proxy", &proxy]);
        let mut agent = s.agent(args).start(bin()).await.unwrap();
        let line = agent
            .wait_stderr("connecting through proxy socks5://alice:****@", WAIT)
            .await
            .unwrap();
        heavy_traffic(&agent, "tls:// through microsocks (user/password)").await;
        socks.assert_carries_the_tunnel().await;
        assert!(!line.contains("s3cret"));
        assert!(
            !agent.stderr_lines().iter().any(|l| l.contains("s3cret")),
            "the proxy password is in the agent's log"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wss_through_squid_connect_with_basic_auth() {
    within(TEST_LIMIT, "wss through squid", async {
        let mut http = squid(Some(("bob", "pa55word")), false).await;
        let s = gateway(&[]).await;
        let proxy = format!("http://bob:pa55word@127.0.0.1:{}", http.port());
        // The gateway's TLS tunnel port answers WebSocket upgrades on /burrow.
        let args = s.agent_args("wss://127.0.0.1:{port}/burrow", &["--proxy", &proxy]);
        let mut agent = s.agent(args).start(bin()).await.unwrap();
        heavy_traffic(&agent, "wss:// through squid (Basic auth)").await;
        http.assert_carries_the_tunnel().await;
        // Squid logs a tunnel when it ends.
        agent.kill().await.unwrap();
        let gw_port = s.addr.port();
        let line = http
            .wait_log("access.log", &format!("CONNECT 127.0.0.1:{gw_port} bob "))
            .await;
        assert!(line.contains("TCP_TUNNEL/200"), "{line}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socks5h_lets_the_proxy_resolve_the_name() {
    within(TEST_LIMIT, "socks5h through danted", async {
        let socks = danted().await;
        let s = gateway(&[]).await;
        let proxy = format!("socks5h://127.0.0.1:{}", socks.port());
        let args = s.agent_args("tls://localhost:{port}", &["--proxy", &proxy]);
        let agent = s.agent(args).start(bin()).await.unwrap();
        light_traffic(&agent, "socks5h://").await;
        socks.assert_carries_the_tunnel().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_tcp_and_ws_through_proxies() {
    within(TEST_LIMIT, "tcp:// and ws:// through proxies", async {
        let http = squid(None, false).await;
        let socks = microsocks("u", "p").await;
        let s = gateway(&["--transport", "tcp"]).await;
        let via_http = format!("http://127.0.0.1:{}", http.port());
        let args = s.agent_args("tcp://127.0.0.1:{port}", &["--proxy", &via_http]);
        let mut a = s.agent(args).start(bin()).await.unwrap();
        light_traffic(&a, "tcp:// through squid").await;
        http.assert_carries_the_tunnel().await;
        // Both agents have the gateway's one key: the second would take over the first's
        // session, and the first take it back, in turn.
        a.kill().await.unwrap();
        let via_socks = format!("socks5://u:p@127.0.0.1:{}", socks.port());
        let args = s.agent_args("ws://127.0.0.1:{port}", &["--proxy", &via_socks]);
        let b = s.agent(args).start(bin()).await.unwrap();
        light_traffic(&b, "ws:// through microsocks").await;
        socks.assert_carries_the_tunnel().await;
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Refusals.

/// Runs an agent that must stop on its first attempt; returns its stderr. Checks that it
/// exits non-zero, promptly, without a retry, and that `secret` appears nowhere.
async fn stops_at_once(spec: AgentSpec, secret: &str) -> String {
    let started = Instant::now();
    let mut agent = Burrow::start(spec.command(bin())).unwrap();
    let status = agent.wait_exit(Duration::from_secs(10)).await.unwrap();
    let elapsed = started.elapsed();
    let err = agent.stderr_lines().join("\n");
    assert!(!status.success(), "the agent should fail: {err}");
    assert!(
        !err.contains("waiting before reconnecting") && !err.contains(" WARN "),
        "the agent retried instead of stopping: {err}"
    );
    assert!(
        !err.contains(secret),
        "the password is in the agent's output: {err}"
    );
    let line = err.lines().find(|l| l.starts_with("error: ")).unwrap_or("");
    println!("stopped in {:.2} s: {line}", elapsed.as_secs_f64());
    err
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_socks5_password_stops_the_agent() {
    within(TEST_LIMIT, "wrong socks5 password", async {
        let socks = microsocks("alice", "right").await;
        let s = gateway(&[]).await;
        let proxy = format!("socks5://alice:wrong-one@127.0.0.1:{}", socks.port());
        let args = s.agent_args("127.0.0.1:{port}", &["--proxy", &proxy]);
        let err = stops_at_once(s.agent(args), "wrong-one").await;
        let want = format!(
            "error: SOCKS5 proxy socks5://alice:****@127.0.0.1:{} refused the user name and \
             password",
            socks.port()
        );
        assert!(err.contains(&want), "{err}");
        assert!(err.contains("check them in --proxy"), "{err}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_http_password_stops_the_agent() {
    within(TEST_LIMIT, "wrong http password", async {
        let http = squid(Some(("bob", "right")), false).await;
        let s = gateway(&[]).await;
        let proxy = format!("http://bob:wrong-one@127.0.0.1:{}", http.port());
        let args = s.agent_args("wss://127.0.0.1:{port}/burrow", &["--proxy", &proxy]);
        let err = stops_at_once(s.agent(args), "wrong-one").await;
        let want = format!(
            "error: HTTP proxy http://bob:****@127.0.0.1:{} refused CONNECT to 127.0.0.1:{} \
             with HTTP 407 Proxy Authentication Required: it refused the user name and password",
            http.port(),
            s.addr.port()
        );
        assert!(err.contains(&want), "{err}");

        // No credentials at all.
        let proxy = format!("http://127.0.0.1:{}", http.port());
        let args = s.agent_args("wss://127.0.0.1:{port}/burrow", &["--proxy", &proxy]);
        let err = stops_at_once(s.agent(args), "no secret here").await;
        let want = format!(
            "with HTTP 407 Proxy Authentication Required: it wants a user name and password: \
             give them as http://USER:PASS@127.0.0.1:{} in --proxy",
            http.port()
        );
        assert!(err.contains(&want), "{err}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_forbidden_by_the_proxys_policy_stops_the_agent() {
    within(TEST_LIMIT, "connect forbidden", async {
        // Only port 443 may be tunnelled to; the gateway is elsewhere.
        let http = squid(None, true).await;
        let s = gateway(&[]).await;
        let proxy = format!("http://127.0.0.1:{}", http.port());
        let args = s.agent_args("127.0.0.1:{port}", &["--proxy", &proxy]);
        let err = stops_at_once(s.agent(args), "no secret here").await;
        let gw = format!("127.0.0.1:{}", s.addr.port());
        let want = format!(
            "error: HTTP proxy {proxy} refused CONNECT to {gw} with HTTP 403 Forbidden: its \
             policy forbids a tunnel to {gw}"
        );
        assert!(err.contains(&want), "{err}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_that_is_not_there_is_retried() {
    within(TEST_LIMIT, "proxy unreachable", async {
        let s = gateway(&[]).await;
        // Bound, not listening: connections to it are refused.
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let proxy = format!("socks5://{}", sock.local_addr().unwrap());
        let args = s.agent_args("127.0.0.1:{port}", &["--proxy", &proxy]);
        let mut agent = Burrow::start(s.agent(args).command(bin())).unwrap();
        let want = format!("cannot reach proxy {proxy}: ");
        let first = agent.wait_stderr(&want, WAIT).await.unwrap();
        assert!(
            first.contains(" WARN ") && first.contains("check that it runs"),
            "{first}"
        );
        // A second attempt follows the first after the backoff: the agent keeps trying.
        let deadline = Instant::now() + Duration::from_secs(5);
        while agent
            .stderr_lines()
            .iter()
            .filter(|l| l.contains(&want))
            .count()
            < 2
        {
            assert!(Instant::now() < deadline, "no second attempt within 5 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        agent.signal(burrow_testkit::Signal::Term).unwrap();
        let status = agent.wait_exit(Duration::from_secs(10)).await.unwrap();
        assert!(status.success(), "{status}");
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// The environment.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_proxy_in_the_environment_is_used() {
    within(TEST_LIMIT, "HTTPS_PROXY used", async {
        let mut http = squid(Some(("carol", "env-secret")), false).await;
        let s = gateway(&[]).await;
        let args = s.agent_args("127.0.0.1:{port}", &[]);
        let proxy = format!("http://carol:env-secret@127.0.0.1:{}", http.port());
        let mut agent = s
            .agent(args)
            .env("HTTPS_PROXY", &proxy)
            .start(bin())
            .await
            .unwrap();
        let line = agent
            .wait_stderr("connecting through proxy http://carol:****@", WAIT)
            .await
            .unwrap();
        assert!(line.contains("(from HTTPS_PROXY)"), "{line}");
        light_traffic(&agent, "HTTPS_PROXY").await;
        http.assert_carries_the_tunnel().await;
        agent.kill().await.unwrap();
        let gw_port = s.addr.port();
        http.wait_log("access.log", &format!("CONNECT 127.0.0.1:{gw_port} carol "))
            .await;
        assert!(!agent
            .stderr_lines()
            .iter()
            .any(|l| l.contains("env-secret")));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_proxy_listing_the_gateway_skips_the_proxy() {
    within(TEST_LIMIT, "NO_PROXY", async {
        let tarpit = Tarpit::start().await;
        let s = gateway(&[]).await;
        let args = s.agent_args("127.0.0.1:{port}", &[]);
        let mut agent = s
            .agent(args)
            .env("HTTPS_PROXY", &format!("http://{}", tarpit.addr))
            .env("NO_PROXY", "example.com, 127.0.0.0/8")
            .start(bin())
            .await
            .unwrap();
        let line = agent
            .wait_stderr("connecting directly", WAIT)
            .await
            .unwrap();
        assert!(
            line.contains("HTTPS_PROXY is set, but NO_PROXY entry `127.0.0.0/8` matches"),
            "{line}"
        );
        light_traffic(&agent, "NO_PROXY").await;
        assert_eq!(tarpit.accepted.load(Ordering::Relaxed), 0);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_none_ignores_the_environment() {
    within(TEST_LIMIT, "--proxy none", async {
        let tarpit = Tarpit::start().await;
        let s = gateway(&[]).await;
        let args = s.agent_args("127.0.0.1:{port}", &["--proxy", "none"]);
        let mut agent = s
            .agent(args)
            .env("https_proxy", &format!("http://{}", tarpit.addr))
            .env("ALL_PROXY", &format!("socks5h://{}", tarpit.addr))
            .start(bin())
            .await
            .unwrap();
        let line = agent
            .wait_stderr("connecting directly", WAIT)
            .await
            .unwrap();
        assert!(
            line.contains("--proxy none: ignoring https_proxy, ALL_PROXY"),
            "{line}"
        );
        light_traffic(&agent, "--proxy none").await;
        assert_eq!(tarpit.accepted.load(Ordering::Relaxed), 0);
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Settings.

/// `burrow agent --print-config` with `args` and `env`: (success, stdout, stderr).
fn print_config(args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let mut cmd = Command::new(bin());
    cmd.args(["agent", "--print-config", "--key"])
        .arg(test_key())
        .args(["--fingerprint", &format!("SHA256:{}", "ab".repeat(32))])
        .args(args)
        .env_remove("BURROW_PROXY")
        .env_remove("BURROW_KEY");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn test_key() -> String {
    let out = Command::new(bin()).arg("keygen").output().unwrap();
    String::from_utf8(out.stdout)
        .unwrap()
        .split_whitespace()
        .find(|w| w.starts_with("bk_"))
        .unwrap()
        .to_string()
}

#[test]
fn the_proxy_setting_from_flag_env_and_file_with_the_password_masked() {
    let (ok, out, err) = print_config(
        &[
            "--gateway",
            "gw:7443",
            "--proxy",
            "socks5h://u:hunter2@p:1080",
        ],
        &[],
    );
    assert!(ok, "{err}");
    assert!(out.contains("proxy = \"socks5h://u:****@p:1080\""), "{out}");
    assert!(!out.contains("hunter2"), "{out}");

    let (ok, out, err) = print_config(
        &["--gateway", "gw:7443"],
        &[("BURROW_PROXY", "http://u:hunter2@p:3128")],
    );
    assert!(ok, "{err}");
    assert!(out.contains("http://u:****@p:3128"), "{out}");
    assert!(!out.contains("hunter2"), "{out}");

    let (ok, out, _) = print_config(&["--gateway", "gw:7443", "--proxy", "NONE"], &[]);
    assert!(ok && out.contains("proxy = \"none\""), "{out}");
    let (ok, out, _) = print_config(&["--gateway", "gw:7443"], &[]);
    assert!(ok && out.contains("# proxy: not set"), "{out}");

    // The file key, and the flag over it.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("agent.toml");
    std::fs::write(
        &file,
        "gateway = \"gw:7443\"\nproxy = \"http://f:hunter2@fp:8080\"\n",
    )
    .unwrap();
    let file = file.to_str().unwrap();
    let (ok, out, err) = print_config(&["--config", file], &[]);
    assert!(ok && out.contains("http://f:****@fp:8080"), "{out}{err}");
    let (ok, out, _) = print_config(&["--config", file, "--proxy", "none"], &[]);
    assert!(ok && out.contains("proxy = \"none\""), "{out}");

    // Mistakes name the setting and never echo the password.
    let (ok, _, err) = print_config(
        &["--gateway", "gw:7443", "--proxy", "socks4://u:hunter2@p:1"],
        &[],
    );
    assert!(
        !ok && err.contains("--proxy / BURROW_PROXY") && err.contains("SOCKS4"),
        "{err}"
    );
    assert!(!err.contains("hunter2"), "{err}");
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "gateway = \"gw:7443\"\n\nproxy = \"ftp://u:hunter2@p:1\"\n",
    )
    .unwrap();
    let (ok, _, err) = print_config(&["--config", bad.to_str().unwrap()], &[]);
    assert!(
        !ok && err.contains("line 3, key proxy") && err.contains("unknown scheme"),
        "{err}"
    );
    assert!(!err.contains("hunter2"), "{err}");
}
