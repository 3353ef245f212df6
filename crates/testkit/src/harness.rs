//! Scaffolding the process tests in `crates/cli/tests` share: a deadline for a whole test,
//! polling until a condition holds, keys from `burrow keygen`, a state directory with a
//! config file, agent arguments for a gateway that lists its agents, the admin address a
//! process prints, and a UDP echo server.
//!
//! The path of the binary stays in each test file (`env!("CARGO_BIN_EXE_burrow")` exists only
//! in the cli crate's tests); the helpers that run it take it as an argument.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::time::Instant;

use crate::{Burrow, GatewayProc};

/// Runs `f`, or panics naming `what` if it takes longer than `limit`: a hung test fails
/// instead of blocking the run.
pub async fn within<T>(limit: Duration, what: &str, f: impl Future<Output = T>) -> T {
    match tokio::time::timeout(limit, f).await {
        Ok(v) => v,
        Err(_) => panic!("{what}: did not finish within {limit:?}"),
    }
}

/// Polls `f` every `every` until it returns `Some`, or panics after `limit` with
/// `describe()` (what was seen last).
pub async fn eventually<T>(
    limit: Duration,
    every: Duration,
    mut f: impl FnMut() -> Option<T>,
    describe: impl Fn() -> String,
) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "not within {limit:?}: {}",
            describe()
        );
        tokio::time::sleep(every).await;
    }
}

/// A fresh key and its hash from `bin keygen` (its `key:` and `key_hash:` lines).
///
/// # Panics
/// If the binary does not run or prints no such lines.
pub fn keygen_with_hash(bin: &Path) -> (String, String) {
    let out = std::process::Command::new(bin)
        .arg("keygen")
        .output()
        .expect("burrow keygen runs");
    let text = String::from_utf8(out.stdout).expect("burrow keygen prints UTF-8");
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_else(|| panic!("no `{name}` line in burrow keygen's output: {text}"))
            .trim()
            .to_string()
    };
    (field("key:"), field("key_hash:"))
}

/// A fresh key from `bin keygen`.
///
/// # Panics
/// As [`keygen_with_hash`].
pub fn keygen(bin: &Path) -> String {
    keygen_with_hash(bin).0
}

/// The agent arguments for `key` against `gw` (`agent --gateway ADDR --key KEY
/// --fingerprint FP`), for a gateway whose config lists its agents.
pub fn agent_args(gw: &GatewayProc, key: &str) -> Vec<String> {
    [
        "agent",
        "--gateway",
        &gw.addr().to_string(),
        "--key",
        key,
        "--fingerprint",
        gw.fingerprint(),
    ]
    .map(String::from)
    .to_vec()
}

/// [`agent_args`] followed by `extra` (`&["--max-backoff", "1s"]`).
pub fn agent_args_with(gw: &GatewayProc, key: &str, extra: &[&str]) -> Vec<String> {
    let mut args = agent_args(gw, key);
    args.extend(extra.iter().map(|a| a.to_string()));
    args
}

/// A temporary directory with a state directory (`state`, not created) and a place for the
/// gateway's config file; removed when dropped.
pub struct Dirs {
    _tmp: tempfile::TempDir,
    /// The gateway's state directory.
    pub state: PathBuf,
    /// The temporary directory itself.
    pub root: PathBuf,
}

/// A fresh [`Dirs`].
///
/// # Panics
/// If no temporary directory can be made.
pub fn dirs() -> Dirs {
    let tmp = tempfile::tempdir().expect("a temporary directory");
    let root = tmp.path().to_path_buf();
    Dirs {
        state: root.join("state"),
        root,
        _tmp: tmp,
    }
}

impl Dirs {
    /// Writes `text` to `gateway.toml` in the directory and returns its path.
    ///
    /// # Panics
    /// If the file cannot be written.
    pub fn config(&self, text: &str) -> PathBuf {
        write_config(&self.root, text)
    }
}

/// Writes `text` to `dir/gateway.toml` and returns its path.
///
/// # Panics
/// If the file cannot be written.
pub fn write_config(dir: &Path, text: &str) -> PathBuf {
    let p = dir.join("gateway.toml");
    std::fs::write(&p, text).unwrap_or_else(|e| panic!("writing {}: {e}", p.display()));
    p
}

/// The address in the process's `admin listening on http://ADDR` line, waiting up to `wait`
/// for it.
///
/// # Panics
/// If no such line comes or its address does not parse.
pub async fn admin_addr(proc: &mut Burrow, wait: Duration) -> SocketAddr {
    const PREFIX: &str = "admin listening on http://";
    let seen = proc
        .stdout_lines()
        .iter()
        .find(|l| l.starts_with(PREFIX))
        .cloned();
    let line = match seen {
        Some(l) => l,
        None => proc
            .wait_stdout(|l| l.starts_with(PREFIX), wait)
            .await
            .expect("the process prints its admin address"),
    };
    line.trim_start_matches(PREFIX)
        .trim()
        .parse()
        .expect("the admin address parses")
}

/// A UDP echo server on `127.0.0.1:0`: every datagram goes back to its sender. It runs until
/// the runtime stops.
///
/// # Panics
/// If no UDP socket can be bound on loopback.
pub async fn udp_echo() -> SocketAddr {
    let s = tokio::net::UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("a UDP socket on loopback");
    let addr = s.local_addr().expect("its address");
    tokio::spawn(async move {
        let mut buf = vec![0u8; 70_000];
        loop {
            let Ok((n, from)) = s.recv_from(&mut buf).await else {
                return;
            };
            let _ = s.send_to(&buf[..n], from).await;
        }
    });
    addr
}

/// Sends `request` (a whole HTTP/1.1 request; it should say `Connection: close`) to `addr`
/// and reads the answer to its end: its head (status line and headers) and its body.
///
/// # Panics
/// If the connection fails or the answer is not UTF-8 text with a head and a body.
pub async fn http_exchange(addr: SocketAddr, request: &str) -> (String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("connecting to {addr}: {e}"));
    tcp.write_all(request.as_bytes())
        .await
        .unwrap_or_else(|e| panic!("sending to {addr}: {e}"));
    let mut raw = Vec::new();
    tcp.read_to_end(&mut raw)
        .await
        .unwrap_or_else(|e| panic!("reading from {addr}: {e}"));
    let text = String::from_utf8(raw).expect("an HTTP answer in UTF-8");
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no end of the head in {text:?}"));
    (head.to_string(), body.to_string())
}
