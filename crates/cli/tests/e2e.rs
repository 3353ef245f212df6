//! End to end through the real `burrow` binary: the zero-config gateway, the agent line it
//! prints, traffic through the tunnel, and the client address in the agent's log.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

/// A running `burrow` process whose stdout and stderr lines arrive on channels. Killed on drop.
struct Proc {
    child: Child,
    out: Receiver<String>,
    err: Receiver<String>,
    seen_out: Vec<String>,
    seen_err: Vec<String>,
}

fn lines(r: impl Read + Send + 'static) -> Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(r).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

impl Proc {
    fn start(args: &[String]) -> Proc {
        let mut child = Command::new(env!("CARGO_BIN_EXE_burrow"))
            .args(args)
            .env_remove("RUST_LOG")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("burrow starts");
        let out = lines(child.stdout.take().unwrap());
        let err = lines(child.stderr.take().unwrap());
        Proc {
            child,
            out,
            err,
            seen_out: Vec::new(),
            seen_err: Vec::new(),
        }
    }

    /// The first stdout line matching `pred`, within 30 s.
    fn stdout_line(&mut self, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.out.recv_timeout(left) {
                Ok(line) => {
                    self.seen_out.push(line.clone());
                    if pred(&line) {
                        return line;
                    }
                }
                Err(_) => break,
            }
        }
        self.seen_err.extend(self.err.try_iter());
        panic!("no such stdout line; stderr: {:#?}", self.seen_err);
    }

    /// Waits for a stderr line containing `needle`, within 30 s.
    fn stderr_line(&mut self, needle: &str) -> String {
        if let Some(l) = self.seen_err.iter().find(|l| l.contains(needle)) {
            return l.clone();
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.err.recv_timeout(left) {
                Ok(line) => {
                    self.seen_err.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(_) => break,
            }
        }
        panic!(
            "no stderr line with {needle:?}; stderr: {:#?}",
            self.seen_err
        );
    }

    /// Sends SIGTERM.
    fn sigterm(&self) {
        let ok = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
    }

    /// SIGTERM, then the exit status within 30 s.
    fn terminate(self) -> std::process::ExitStatus {
        self.sigterm();
        self.exit_within(Duration::from_secs(30))
    }

    /// The exit status within `limit`, after checking stderr for panics.
    fn exit_within(self, limit: Duration) -> std::process::ExitStatus {
        self.exit_with_output(limit).0
    }

    /// The exit status within `limit`, and every stdout and stderr line.
    fn exit_with_output(mut self, limit: Duration) -> (std::process::ExitStatus, Vec<String>) {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                // Wait for the reader threads to see the end of the output, then check it.
                while let Ok(line) = self.err.recv_timeout(Duration::from_secs(5)) {
                    self.seen_err.push(line);
                }
                self.seen_out.extend(self.out.try_iter());
                let panics: Vec<&String> = self
                    .seen_err
                    .iter()
                    .filter(|l| l.contains("panicked"))
                    .collect();
                assert!(panics.is_empty(), "process panicked: {:#?}", self.seen_err);
                let mut all = std::mem::take(&mut self.seen_out);
                all.append(&mut self.seen_err);
                return (st, all);
            }
            assert!(
                Instant::now() < deadline,
                "did not exit within {limit:?}; stderr: {:#?}",
                self.seen_err
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

fn echo_server() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(mut c) = conn else { return };
            std::thread::spawn(move || {
                let mut w = c.try_clone().unwrap();
                let _ = std::io::copy(&mut c, &mut w);
                let _ = w.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    addr
}

fn start_gateway(state: &str) -> (Proc, String) {
    start_gateway_on(state, "127.0.0.1:0")
}

fn start_gateway_on(state: &str, listen: &str) -> (Proc, String) {
    let mut gw = Proc::start(&s(&[
        "gateway",
        "--listen",
        listen,
        "--public-host",
        "127.0.0.1",
        "--state-dir",
        state,
    ]));
    let line = gw.stdout_line(|l| l.starts_with("burrow agent "));
    (gw, line)
}

/// The printed line as arguments, without the leading `burrow`.
fn agent_args(line: &str) -> Vec<String> {
    let mut words: Vec<String> = line.split_whitespace().map(str::to_string).collect();
    assert_eq!(words.remove(0), "burrow");
    words
}

/// Sends `data` through `addr`, half-closes, returns the sha256 of the echo and the local
/// address the client used.
fn echo_through(addr: &str, data: &[u8]) -> ([u8; 32], SocketAddr) {
    let mut c = TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let local = c.local_addr().unwrap();
    let mut w = c.try_clone().unwrap();
    let data = data.to_vec();
    let writer = std::thread::spawn(move || {
        w.write_all(&data).unwrap();
        w.shutdown(std::net::Shutdown::Write).unwrap();
    });
    let mut got = Vec::new();
    c.read_to_end(&mut got).unwrap();
    writer.join().unwrap();
    (Sha256::digest(&got).into(), local)
}

#[test]
fn printed_agent_line_works_as_printed_and_carries_traffic() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().display().to_string();
    let (gw, line) = start_gateway(&state);
    assert!(line.contains("--gateway 127.0.0.1:"), "{line}");
    assert!(line.contains("--key bk_"), "{line}");
    assert!(line.contains("--fingerprint SHA256:"), "{line}");

    // Exactly as printed: it connects and authenticates.
    let mut agent = Proc::start(&agent_args(&line));
    agent.stderr_line("connected to gateway");
    assert!(agent.terminate().success());

    // The same line plus a forward: traffic flows, byte-exact.
    let echo = echo_server();
    let mut args = agent_args(&line);
    args.extend(s(&["--forward", &format!("0=127.0.0.1:{}", echo.port())]));
    let mut agent = Proc::start(&args);
    let granted = agent.stdout_line(|l| l.contains(": public address "));
    let public = granted.rsplit(' ').next().unwrap().to_string();
    let data: Vec<u8> = (0..4u32 << 20).map(|i| (i * 7 + i / 251) as u8).collect();
    let (hash, client) = echo_through(&public, &data);
    assert_eq!(hash, <[u8; 32]>::from(Sha256::digest(&data)));

    // The agent logs the remote client's address with the stream, as an address (not
    // `Some(...)`), and a clean stream has no `error` field; the gateway's line likewise.
    let closed = agent.stderr_line("stream closed");
    assert!(closed.contains(&client.to_string()), "{closed}");
    let mut gw = gw;
    let gw_closed = gw.stderr_line("stream closed");
    for line in [&closed, &gw_closed] {
        assert!(!line.contains("Some("), "{line}");
        assert!(!line.contains("error="), "{line}");
        assert!(line.contains(&format!("client={client}")), "{line}");
    }

    assert!(agent.terminate().success(), "agent exits 0 on SIGTERM");
    assert!(gw.terminate().success(), "gateway exits 0 on SIGTERM");
}

/// The gateway also prints the line for the session inside a WebSocket; as printed, plus a
/// forward, it carries traffic byte-exact.
#[test]
fn printed_websocket_agent_line_works_as_printed() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().display().to_string();
    let (mut gw, _line) = start_gateway(&state);
    let ws_line = gw.stdout_line(|l| l.starts_with("burrow agent --gateway wss://"));
    assert!(ws_line.contains("/burrow --key bk_"), "{ws_line}");
    assert!(ws_line.contains("--fingerprint SHA256:"), "{ws_line}");
    let echo = echo_server();
    let mut args = agent_args(&ws_line);
    args.extend(s(&["--forward", &format!("0=127.0.0.1:{}", echo.port())]));
    let mut agent = Proc::start(&args);
    let granted = agent.stdout_line(|l| l.contains(": public address "));
    let public = granted.rsplit(' ').next().unwrap().to_string();
    let data: Vec<u8> = (0..2u32 << 20).map(|i| (i * 13 + i / 241) as u8).collect();
    let (hash, _) = echo_through(&public, &data);
    assert_eq!(hash, <[u8; 32]>::from(Sha256::digest(&data)));
    assert!(agent.terminate().success());
    assert!(gw.terminate().success());
}

/// The word after `flag` in an agent line.
fn flag_value(line: &str, flag: &str) -> String {
    let w: Vec<&str> = line.split_whitespace().collect();
    let i = w.iter().position(|x| *x == flag).unwrap();
    w[i + 1].to_string()
}

/// A restarted gateway keeps its key and certificate, and prints the key only masked (so it
/// stays out of journald and `docker logs`); `--print-agent-line` prints the whole line,
/// beside the running gateway, without binding anything.
#[test]
fn gateway_restart_reuses_key_and_certificate_and_masks_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().display().to_string();
    let (gw, first) = start_gateway(&state);
    assert!(gw.terminate().success());
    let key = flag_value(&first, "--key");
    assert!(key.starts_with("bk_") && !key.contains('*'), "{first}");
    let listen = flag_value(&first, "--gateway");

    // Restarted on the same port: the same line, the key masked, the key nowhere.
    let (gw, second) = start_gateway_on(&state, &listen);
    assert_eq!(second, first.replace(&key, "bk_****"));
    let out = Command::new(env!("CARGO_BIN_EXE_burrow"))
        .args(["gateway", "--print-agent-line", "--listen", &listen])
        .args(["--public-host", "127.0.0.1", "--state-dir", &state])
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8(out.stdout).unwrap().trim(), first);
    gw.sigterm();
    let (status, output) = gw.exit_with_output(Duration::from_secs(30));
    assert!(status.success());
    let secret = &key[3..];
    assert!(
        !output.iter().any(|l| l.contains(secret)),
        "the restarted gateway printed the key: {output:#?}"
    );
}

#[test]
fn wrong_key_fails_fast_naming_gateway_and_flag() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().display().to_string();
    let (gw, line) = start_gateway(&state);
    let keygen = Command::new(env!("CARGO_BIN_EXE_burrow"))
        .arg("keygen")
        .output()
        .unwrap();
    let stdout = String::from_utf8(keygen.stdout).unwrap();
    let other = stdout
        .lines()
        .find_map(|l| l.strip_prefix("key: "))
        .unwrap()
        .to_string();
    let mut args = agent_args(&line);
    let i = args.iter().position(|a| a == "--key").unwrap();
    args[i + 1] = other;
    let gateway = args[args.iter().position(|a| a == "--gateway").unwrap() + 1].clone();
    let out = Command::new(env!("CARGO_BIN_EXE_burrow"))
        .args(&args)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains(&gateway), "{stderr}");
    assert!(stderr.contains("--key"), "{stderr}");
    drop(gw);
}

#[test]
fn agent_killed_and_restarted_gets_its_public_port_back() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().display().to_string();
    let (gw, line) = start_gateway(&state);
    let echo = echo_server();
    let mut args = agent_args(&line);
    args.extend(s(&["--forward", &format!("127.0.0.1:{}", echo.port())]));
    let public_of = |agent: &mut Proc| {
        let l = agent.stdout_line(|l| l.contains(": public address "));
        l.rsplit(' ').next().unwrap().to_string()
    };
    let mut agent = Proc::start(&args);
    let first = public_of(&mut agent);
    // SIGKILL: no goodbye; the gateway learns from the closed connection and keeps the lease.
    agent.child.kill().unwrap();
    agent.child.wait().unwrap();
    let mut agent = Proc::start(&args);
    let second = public_of(&mut agent);
    assert_eq!(first, second, "same public port after restart");
    let data: Vec<u8> = (0..1u32 << 20).map(|i| (i % 253) as u8).collect();
    let (hash, _) = echo_through(&second, &data);
    assert_eq!(hash, <[u8; 32]>::from(Sha256::digest(&data)));
    assert!(agent.terminate().success());
    assert!(gw.terminate().success());
}

/// A target whose connects never complete: a listener with a backlog of 0 and its one queue
/// place taken, so the kernel drops further SYNs. Keep both values alive.
fn unanswered_target() -> (socket2::Socket, TcpStream) {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    s.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    s.listen(0).unwrap();
    let addr = s.local_addr().unwrap().as_socket().unwrap();
    let filler = TcpStream::connect(addr).unwrap();
    // Nothing is accepted: the next connect hangs in SYN_SENT.
    let probe = TcpStream::connect_timeout(&addr, Duration::from_millis(300));
    assert!(probe.is_err(), "the backlog trick does not work here");
    (s, filler)
}

/// `--connect-timeout` bounds the agent's connect to a target: the client's connection is
/// closed after it, and the log says so (the default is 10 s).
#[test]
fn connect_timeout_bounds_the_connect_to_a_target() {
    let dir = tempfile::tempdir().unwrap();
    let (gw, line) = start_gateway(&dir.path().display().to_string());
    let (target, _filler) = unanswered_target();
    let port = target.local_addr().unwrap().as_socket().unwrap().port();
    let mut args = agent_args(&line);
    args.extend(s(&[
        "--connect-timeout",
        "300ms",
        "--forward",
        &format!("127.0.0.1:{port}"),
    ]));
    let mut agent = Proc::start(&args);
    let granted = agent.stdout_line(|l| l.contains(": public address "));
    let public = granted.rsplit(' ').next().unwrap().to_string();

    let started = Instant::now();
    let mut c = TcpStream::connect(&public).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut buf = [0u8; 16];
    // EOF or a reset: either way the connection is given up.
    let _ = c.read(&mut buf);
    let took = started.elapsed();
    let logged = agent.stderr_line("timed out");
    assert!(logged.contains("300ms"), "{logged}");
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(5),
        "the client waited {took:?} (connect_timeout 300ms)"
    );
    assert!(agent.terminate().success());
    assert!(gw.terminate().success());
}

/// The agent's warning about a lost gateway says when it tries again.
#[test]
fn reconnect_warning_says_when_the_next_attempt_is() {
    // A "gateway" that hangs up at once.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in l.incoming() {
            drop(conn);
        }
    });
    let mut agent = Proc::start(&s(&[
        "agent",
        "--gateway",
        &addr.to_string(),
        "--transport",
        "tcp",
        "--key",
        "bk_zlpV87yiiQg6NJ7bgH5mrgoSwLSXRExx5Swq84TwkhA",
    ]));
    let warning = agent.stderr_line("next attempt in ");
    assert!(warning.contains("WARN"), "{warning}");
    // "... next attempt in 1s 234ms gateway=...": the fields follow the message.
    let rest = warning.rsplit("next attempt in ").next().unwrap();
    let when = rest.split(" gateway=").next().unwrap().trim();
    assert!(
        humantime::parse_duration(when).is_ok_and(|d| d <= Duration::from_secs(1)),
        "the first retry is within 0.5 s: {warning}"
    );
    assert!(agent.terminate().success());
}

/// A second SIGTERM stops at once, without waiting for streams, and that is still exit 0:
/// a stop that was asked for (systemd reads any other status as a failure).
#[test]
fn second_sigterm_stops_at_once_with_status_zero() {
    let dir = tempfile::tempdir().unwrap();
    let (mut gw, line) = start_gateway(&dir.path().display().to_string());
    let echo = echo_server();
    let mut args = agent_args(&line);
    args.extend(s(&["--forward", &format!("127.0.0.1:{}", echo.port())]));
    let mut agent = Proc::start(&args);
    let granted = agent.stdout_line(|l| l.contains(": public address "));
    let public = granted.rsplit(' ').next().unwrap().to_string();
    // A stream in flight keeps the gateway draining for its 10 s grace period.
    let mut client = TcpStream::connect(&public).unwrap();
    client.write_all(b"hello").unwrap();
    let mut buf = [0u8; 5];
    client.read_exact(&mut buf).unwrap();

    gw.sigterm();
    gw.stderr_line("shutting down");
    let started = Instant::now();
    gw.sigterm();
    gw.stderr_line("stopping now");
    let status = gw.exit_within(Duration::from_secs(5));
    assert!(status.success(), "second SIGTERM: {status:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
    drop(client);
    assert!(agent.terminate().success());
}

/// A config file with a key that other users can read gets the warning the state files get;
/// one without a key (or a private one) does not.
#[test]
fn config_file_with_a_key_readable_by_others_is_warned_about() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in l.incoming() {
            drop(conn);
        }
    });
    let file = dir.path().join("agent.toml");
    std::fs::write(
        &file,
        format!(
            "gateway = \"{addr}\"\ntransport = \"tcp\"\n\
             key = \"bk_zlpV87yiiQg6NJ7bgH5mrgoSwLSXRExx5Swq84TwkhA\"\n"
        ),
    )
    .unwrap();
    let run = |mode: u32| {
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode)).unwrap();
        let mut agent = Proc::start(&s(&["agent", "--config", &file.display().to_string()]));
        // Logged after the settings and before the first attempt's warning.
        agent.stderr_line("next attempt in");
        let warned = agent
            .seen_err
            .iter()
            .any(|l| l.contains("readable by other users") && l.contains("agent.toml"));
        assert!(agent.terminate().success());
        warned
    };
    assert!(run(0o644), "no warning for a key file readable by others");
    assert!(!run(0o600), "a warning for a private file");
}

/// With the default listen address (a wildcard) and no public name, the agent line names a
/// host agents can dial (this host's address or name), not `0.0.0.0`, and a warning says to
/// pass --public-name. `--print-agent-line` binds nothing, so the default address is usable
/// here.
#[test]
fn agent_line_of_a_wildcard_listener_names_a_dialable_host() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().display().to_string();
    let (gw, _) = start_gateway(&state);
    assert!(gw.terminate().success());
    let print = |extra: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_burrow"))
            .args(["gateway", "--print-agent-line", "--state-dir", &state])
            .args(extra)
            .env_remove("RUST_LOG")
            .output()
            .unwrap();
        let stdout = String::from_utf8(out.stdout).unwrap();
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert!(out.status.success(), "{extra:?}: {stderr}");
        (stdout.trim().to_string(), stderr)
    };
    for listen in [&[][..], &["--listen", "[::]:7443"]] {
        let (line, stderr) = print(listen);
        let host = flag_value(&line, "--gateway");
        assert!(host.ends_with(":7443"), "{line}");
        assert!(
            stderr.contains("WARN") && stderr.contains("--public-name"),
            "{stderr}"
        );
        // Only a host with neither an address nor a name keeps the wildcard, and says so.
        let wildcard = host == "0.0.0.0:7443" || host == "[::]:7443";
        assert!(
            !wildcard || stderr.contains("no agent can dial"),
            "{line}\n{stderr}"
        );
        assert!(
            !host.starts_with("127.") && !host.starts_with("[::1]"),
            "{line}"
        );
    }
    let (line, stderr) = print(&["--public-name", "gw.example.com"]);
    assert_eq!(flag_value(&line, "--gateway"), "gw.example.com:7443");
    assert!(!stderr.contains("--public-name"), "{stderr}");
}
