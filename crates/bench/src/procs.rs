//! The real `burrow` binary: finding (and building) it, and running a gateway and an agent as
//! child processes on loopback.

use std::ffi::OsStr;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use serde::Serialize;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::watch;

use crate::sys;

/// Longest the gateway or agent may take to print what the bench waits for.
const STARTUP_LIMIT: Duration = Duration::from_secs(30);
/// Stderr lines shown in a start-up error.
const KEPT_LINES: usize = 20;
/// Stderr lines of a child copied to the bench's stderr as they come.
const ECHOED_LINES: usize = 20;
/// What the gateway and agent warn at start on a plain transport, which the bench asked for:
/// not worth a note.
const PLAIN_WARNING: &str = "the tunnel is NOT encrypted";

/// The `burrow` binary to run: `$BURROW_BIN` if set; else, under cargo (`$CARGO` set), a
/// fresh release build in the same target directory as this bench; else an existing one there.
pub fn locate_binary() -> anyhow::Result<PathBuf> {
    if let Some(bin) = std::env::var_os("BURROW_BIN") {
        return Ok(PathBuf::from(bin));
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let target = target_dir(&root);
    let bin = target.join("release").join("burrow");
    match std::env::var_os("CARGO") {
        Some(cargo) => build(&cargo, &root, &target)?,
        None if bin.exists() => {}
        None => bail!(
            "no burrow binary at {}: build it (cargo build --release -p burrow-cli), run the \
             bench with `cargo run --release -p burrow-bench`, or set BURROW_BIN",
            bin.display()
        ),
    }
    Ok(bin)
}

/// The cargo target directory: the one this executable was built into (cargo marks it with
/// `CACHEDIR.TAG`, which covers any configured target-dir), else `$CARGO_TARGET_DIR`, else
/// the workspace's `target`.
fn target_dir(root: &Path) -> PathBuf {
    let built_into = std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.parent()?.to_path_buf()))
        .filter(|dir| dir.join("CACHEDIR.TAG").exists());
    built_into
        .or_else(|| std::env::var_os("CARGO_TARGET_DIR").map(|d| root.join(d)))
        .unwrap_or_else(|| root.join("target"))
}

fn build(cargo: &OsStr, root: &Path, target: &Path) -> anyhow::Result<()> {
    eprintln!("bench: building burrow (release)");
    let status = std::process::Command::new(cargo)
        .args(["build", "--release", "-p", "burrow-cli", "--bin", "burrow"])
        .arg("--target-dir")
        .arg(target)
        .current_dir(root)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .status()
        .context("cannot run cargo to build burrow")?;
    if !status.success() {
        bail!("building burrow failed ({status}); see cargo's output above");
    }
    Ok(())
}

/// What a child printed on one stream, and whether the stream has ended.
#[derive(Debug, Default)]
struct Output {
    lines: Vec<String>,
    closed: bool,
}

/// Reads `reader` line by line into a watch channel; with `echo`, copies each line to our
/// stderr under that prefix.
fn capture(
    reader: impl AsyncRead + Unpin + Send + 'static,
    echo: Option<&'static str>,
) -> watch::Receiver<Output> {
    let (tx, rx) = watch::channel(Output::default());
    tokio::spawn(async move {
        let mut lines = BufReader::new(reader).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            let seen = tx.borrow().lines.len();
            match echo {
                Some(name) if seen < ECHOED_LINES => eprintln!("[{name}] {line}"),
                Some(name) if seen == ECHOED_LINES => {
                    eprintln!("[{name}] (more lines: counted in the report, not shown)")
                }
                _ => {}
            }
            tx.send_modify(|out| out.lines.push(line));
        }
        tx.send_modify(|out| out.closed = true);
    });
    rx
}

/// A running `burrow` process; killed when dropped.
pub struct Proc {
    name: &'static str,
    child: Child,
    pid: u32,
    stdout: watch::Receiver<Output>,
    stderr: watch::Receiver<Output>,
    /// Stdout lines printed during start-up; later ones are worth reporting.
    startup_lines: usize,
    /// Held open for the child's life: a child that watches its stdin (the bench's relays)
    /// exits when it closes, so it never outlives the bench.
    _stdin: ChildStdin,
}

impl Proc {
    /// Starts `bin` with `args` and `env`, with every other `BURROW_*` variable removed so the
    /// caller's environment cannot change the set-up.
    pub fn spawn(
        name: &'static str,
        bin: &Path,
        args: &[String],
        env: &[(&str, &str)],
    ) -> anyhow::Result<Proc> {
        let mut cmd = Command::new(bin);
        cmd.args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("BURROW_") {
                cmd.env_remove(key);
            }
        }
        cmd.envs(env.iter().copied());
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot start {} {name}", bin.display()))?;
        let pid = child
            .id()
            .with_context(|| format!("{name} exited at once"))?;
        let stdin = child.stdin.take().context("no stdin pipe")?;
        let stdout = child.stdout.take().context("no stdout pipe")?;
        let stderr = child.stderr.take().context("no stderr pipe")?;
        Ok(Proc {
            name,
            child,
            pid,
            stdout: capture(stdout, None),
            stderr: capture(stderr, Some(name)),
            startup_lines: 0,
            _stdin: stdin,
        })
    }

    /// Waits until `find` recognises what it needs in the stdout lines so far.
    pub async fn wait_stdout<T>(
        &mut self,
        what: &str,
        mut find: impl FnMut(&[String]) -> Option<T>,
    ) -> anyhow::Result<T> {
        let waited = tokio::time::timeout(
            STARTUP_LIMIT,
            self.stdout
                .wait_for(|out| out.closed || find(&out.lines).is_some()),
        )
        .await
        .map(|seen| seen.is_ok());
        let found = find(&self.stdout.borrow().lines);
        self.startup_lines = self.stdout.borrow().lines.len();
        match (found, waited) {
            (Some(found), _) => Ok(found),
            (None, Ok(_)) => bail!(
                "{} exited before printing {what}{}",
                self.name,
                self.stderr_tail()
            ),
            (None, Err(_)) => bail!(
                "{} did not print {what} within {STARTUP_LIMIT:?}{}",
                self.name,
                self.stderr_tail()
            ),
        }
    }

    /// Every stdout line so far.
    pub fn stdout_lines(&self) -> Vec<String> {
        self.stdout.borrow().lines.clone()
    }

    fn stderr_tail(&self) -> String {
        let err = self.stderr.borrow();
        match err.lines.len() {
            0 => String::new(),
            n => format!(
                "; its stderr:\n{}",
                err.lines[n.saturating_sub(KEPT_LINES)..].join("\n")
            ),
        }
    }

    /// Resident memory, KiB.
    pub fn rss_kib(&self) -> anyhow::Result<u64> {
        sys::rss_kib(self.pid).with_context(|| format!("{} (pid {})", self.name, self.pid))
    }

    /// CPU seconds used so far.
    pub fn cpu_seconds(&self) -> anyhow::Result<f64> {
        sys::cpu_seconds(self.pid).with_context(|| format!("{} (pid {})", self.name, self.pid))
    }

    /// What is worth a note: an early exit, stderr lines, stdout lines after start-up. Then
    /// kills the process.
    pub async fn stop(mut self) -> Vec<String> {
        let mut notes = Vec::new();
        if let Ok(Some(status)) = self.child.try_wait() {
            notes.push(format!("{} exited during the bench: {status}", self.name));
        }
        let _ = self.child.start_kill();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await;
        // Let the capture tasks read what the pipes still hold.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let err = self.stderr.borrow();
        let unexpected: Vec<&String> = (err.lines.iter())
            .filter(|l| !l.contains(PLAIN_WARNING))
            .collect();
        if let Some(first) = unexpected.first() {
            notes.push(format!(
                "{} wrote {} line(s) to stderr; the first: `{}`",
                self.name,
                unexpected.len(),
                redact_keys(first),
            ));
        }
        let out = self.stdout.borrow();
        if let Some(late) = out
            .lines
            .get(self.startup_lines..)
            .filter(|l| !l.is_empty())
        {
            notes.push(format!(
                "{} printed after start-up: {}",
                self.name,
                late.iter()
                    .take(5)
                    .map(|l| format!("`{}`", redact_keys(l)))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        notes
    }
}

/// `line` with every secret key (`bk_` and its base64url text) cut to its prefix: the notes
/// land in the printed report and in `--json` files that people paste into issues.
fn redact_keys(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut rest = line;
    while let Some(at) = rest.find("bk_") {
        out.push_str(&rest[..at]);
        out.push_str("bk_…");
        let key = &rest[at + 3..];
        let end = key
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '-'))
            .unwrap_or(key.len());
        rest = &key[end..];
    }
    out.push_str(rest);
    out
}

/// How the agent reaches the gateway: each is a gateway and agent pair of its own in one run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// TLS 1.3 straight to the tunnel port (a bare `HOST:PORT`): the default.
    Tls,
    /// A WebSocket inside TLS, to the same tunnel port (`wss://HOST:PORT/burrow`).
    Wss,
    /// Plain TCP (`tcp://`); the gateway runs `--transport tcp`.
    Tcp,
    /// A WebSocket over plain TCP (`ws://HOST:PORT/burrow`); the gateway runs
    /// `--transport tcp`.
    Ws,
    /// QUIC (`quic://`) to the gateway's UDP port of the tunnel port's number.
    Quic,
}

/// The WebSocket path the bench's gateways answer on (passed as `--ws-path`).
const WS_PATH: &str = "/burrow";

impl Transport {
    /// Every transport, in the order `all` measures them.
    pub const ALL: [Transport; 4] = [
        Transport::Tls,
        Transport::Wss,
        Transport::Tcp,
        Transport::Ws,
    ];

    /// The name on the command line and in the table.
    pub fn name(self) -> &'static str {
        match self {
            Transport::Tls => "tls",
            Transport::Wss => "wss",
            Transport::Tcp => "tcp",
            Transport::Ws => "ws",
            Transport::Quic => "quic",
        }
    }

    /// The route's name in failure messages.
    pub fn route_name(self) -> &'static str {
        match self {
            Transport::Tls => "tunnel (tls)",
            Transport::Wss => "tunnel (wss)",
            Transport::Tcp => "tunnel (tcp)",
            Transport::Ws => "tunnel (ws)",
            Transport::Quic => "tunnel (quic)",
        }
    }

    /// The names of this pair's processes, in notes and in front of their stderr lines.
    fn process_names(self) -> (&'static str, &'static str) {
        match self {
            Transport::Tls => ("tls gateway", "tls agent"),
            Transport::Wss => ("wss gateway", "wss agent"),
            Transport::Tcp => ("tcp gateway", "tcp agent"),
            Transport::Ws => ("ws gateway", "ws agent"),
            Transport::Quic => ("quic gateway", "quic agent"),
        }
    }

    /// Whether the session runs over TLS (so the gateway has a certificate to pin).
    fn tls(self) -> bool {
        matches!(self, Transport::Tls | Transport::Wss | Transport::Quic)
    }

    /// The gateway's flags for this transport.
    fn gateway_args(self) -> Vec<String> {
        let mut args = Vec::new();
        if !self.tls() {
            args.extend(strings(["--transport", "tcp"]));
        }
        if matches!(self, Transport::Wss | Transport::Ws) {
            args.extend(strings(["--ws-path", WS_PATH]));
        }
        args
    }

    /// What the agent dials, from the `HOST:PORT` the gateway printed.
    fn agent_url(self, host_port: &str) -> String {
        match self {
            Transport::Tls => host_port.to_string(),
            Transport::Wss => format!("wss://{host_port}{WS_PATH}"),
            Transport::Tcp => format!("tcp://{host_port}"),
            Transport::Ws => format!("ws://{host_port}{WS_PATH}"),
            Transport::Quic => format!("quic://{host_port}"),
        }
    }
}

/// A gateway and an agent publishing some targets, each in its own process.
pub struct Tunnel {
    pub gateway: Proc,
    pub agent: Proc,
    /// The public address of each forward, in the order given.
    pub public: Vec<SocketAddr>,
    /// The `HOST:PORT` the agent dials (its tunnel port; QUIC is on UDP at the same number).
    pub gateway_addr: String,
    /// The gateway's state directory, removed when dropped.
    _state: tempfile::TempDir,
}

impl Tunnel {
    /// Starts a zero-config gateway on loopback for `transport`, then an agent that dials it
    /// that way and publishes `forwards` (`--forward` values: `HOST:PORT` for TCP,
    /// `udp:HOST:PORT`), and waits until every forward is granted.
    pub async fn start(
        bin: &Path,
        transport: Transport,
        forwards: &[String],
        gateway_config: Option<&Path>,
        agent_config: Option<&Path>,
    ) -> anyhow::Result<Tunnel> {
        let (gateway_name, agent_name) = transport.process_names();
        let state = tempfile::tempdir().context("cannot create a state directory")?;
        let mut args = strings([
            "gateway",
            "--listen",
            "127.0.0.1:0",
            "--public-host",
            "127.0.0.1",
            "--log-level",
            "warn",
            "--state-dir",
        ]);
        args.push(state.path().display().to_string());
        args.extend(transport.gateway_args());
        if let Some(config) = gateway_config {
            args.extend(["--config".to_string(), config.display().to_string()]);
        }
        let mut gateway = Proc::spawn(gateway_name, bin, &args, &[])?;
        let invite = gateway
            .wait_stdout("a `burrow agent ...` line", |lines| {
                lines
                    .iter()
                    .find_map(|l| l.strip_prefix("burrow agent "))
                    .map(Invite::parse)
            })
            .await??;

        let url = transport.agent_url(&invite.gateway);
        let mut args = strings(["agent", "--log-level", "warn", "--gateway", &url]);
        match (&invite.fingerprint, transport.tls()) {
            (Some(fingerprint), true) => {
                args.extend(["--fingerprint".to_string(), fingerprint.clone()]);
            }
            (None, true) => bail!(
                "the {gateway_name} printed no certificate fingerprint, so it runs plain TCP \
                 (`transport = \"tcp\"` in --gateway-config?): measure plain TCP with \
                 --transport tcp or ws instead"
            ),
            (_, false) => {}
        }
        let specs = forwards;
        for spec in specs {
            args.extend(["--forward".to_string(), spec.clone()]);
        }
        if let Some(config) = agent_config {
            args.extend(["--config".to_string(), config.display().to_string()]);
        }
        // The key goes in the environment, where other local users cannot see it.
        let mut agent = Proc::spawn(agent_name, bin, &args, &[("BURROW_KEY", &invite.key)])?;
        let public = agent
            .wait_stdout("a public address for every forward", |lines| {
                specs
                    .iter()
                    .map(|spec| lines.iter().find_map(|l| parse_forward(l, spec)))
                    .collect::<Option<anyhow::Result<Vec<_>>>>()
            })
            .await??;
        Ok(Tunnel {
            gateway,
            agent,
            public,
            gateway_addr: invite.gateway.clone(),
            _state: state,
        })
    }

    /// CPU seconds the gateway and agent used so far, together.
    pub fn cpu_seconds(&self) -> anyhow::Result<f64> {
        Ok(self.gateway.cpu_seconds()? + self.agent.cpu_seconds()?)
    }

    /// Stops both processes; returns what is worth a note about them.
    pub async fn stop(self) -> Vec<String> {
        let mut notes = self.agent.stop().await;
        notes.extend(self.gateway.stop().await);
        notes
    }
}

fn strings<const N: usize>(items: [&str; N]) -> Vec<String> {
    items.into_iter().map(str::to_string).collect()
}

/// What the gateway's `burrow agent ...` line tells an agent.
pub(crate) struct Invite {
    pub(crate) gateway: String,
    key: String,
    /// `None` when the gateway runs plain TCP.
    pub(crate) fingerprint: Option<String>,
}

impl Invite {
    /// Reads the flags of the line after `burrow agent `.
    pub(crate) fn parse(flags: &str) -> anyhow::Result<Invite> {
        let mut words = flags.split_whitespace();
        let (mut gateway, mut key, mut fingerprint) = (None, None, None);
        while let Some(word) = words.next() {
            let (flag, inline) = match word.split_once('=') {
                Some((flag, value)) => (flag, Some(value.to_string())),
                None => (word, None),
            };
            let slot = match flag {
                "--gateway" => &mut gateway,
                "--key" => &mut key,
                "--fingerprint" => &mut fingerprint,
                _ => continue,
            };
            *slot = inline.or_else(|| words.next().map(str::to_string));
        }
        let missing =
            |flag: &str| anyhow!("the gateway's `burrow agent` line has no {flag}: `{flags}`");
        Ok(Invite {
            gateway: gateway.ok_or_else(|| missing("--gateway"))?,
            key: key.ok_or_else(|| missing("--key"))?,
            fingerprint,
        })
    }
}

/// The agent's line about forward `spec`, if `line` is one: `forward SPEC: public address
/// ADDR` gives the address, anything else (a refusal) an error.
fn parse_forward(line: &str, spec: &str) -> Option<anyhow::Result<SocketAddr>> {
    let rest = line
        .strip_prefix("forward ")?
        .strip_prefix(spec)?
        .strip_prefix(": ")?;
    Some(match rest.strip_prefix("public address ") {
        Some(addr) => addr
            .trim()
            .parse()
            .with_context(|| format!("the agent printed an address that is not IP:PORT: `{line}`")),
        None => Err(anyhow!(
            "the agent's forward {spec} was not granted: `{line}`"
        )),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notes_never_carry_a_whole_key() {
        let line =
            "burrow agent --gateway quic://h:1 --key bk_msBbh5Pt-u_LA7 --fingerprint SHA256:41";
        assert_eq!(
            redact_keys(line),
            "burrow agent --gateway quic://h:1 --key bk_… --fingerprint SHA256:41"
        );
        assert_eq!(redact_keys("a bk_x, bk_y"), "a bk_…, bk_…");
        assert_eq!(redact_keys("no key here"), "no key here");
        assert_eq!(redact_keys("ends with bk_"), "ends with bk_…");
    }

    #[test]
    fn reads_the_invite() {
        let line = "--gateway 127.0.0.1:4000 --key bk_abc --fingerprint SHA256:00ff";
        let invite = Invite::parse(line).unwrap();
        assert_eq!(invite.gateway, "127.0.0.1:4000");
        assert_eq!(invite.key, "bk_abc");
        assert_eq!(invite.fingerprint.as_deref(), Some("SHA256:00ff"));
        assert!(Invite::parse("--gateway=h:1 --key=k --fingerprint=f").is_ok());
        // A plain-TCP gateway prints no fingerprint; a line without a key is still an error.
        let plain = Invite::parse("--gateway h:1 --key k --transport tcp").unwrap();
        assert_eq!(plain.fingerprint, None);
        assert!(Invite::parse("--gateway h:1 --transport tcp").is_err());
    }

    #[test]
    fn each_transport_dials_its_own_way() {
        let hp = "127.0.0.1:4000";
        assert_eq!(Transport::Tls.agent_url(hp), "127.0.0.1:4000");
        assert_eq!(Transport::Wss.agent_url(hp), "wss://127.0.0.1:4000/burrow");
        assert_eq!(Transport::Tcp.agent_url(hp), "tcp://127.0.0.1:4000");
        assert_eq!(Transport::Ws.agent_url(hp), "ws://127.0.0.1:4000/burrow");
        // Only the plain ones need the gateway on plain TCP; only the WebSocket ones a path.
        assert!(Transport::Tls.gateway_args().is_empty());
        assert_eq!(Transport::Wss.gateway_args(), ["--ws-path", "/burrow"]);
        assert_eq!(Transport::Tcp.gateway_args(), ["--transport", "tcp"]);
        assert_eq!(
            Transport::Ws.gateway_args(),
            ["--transport", "tcp", "--ws-path", "/burrow"]
        );
    }

    #[test]
    fn reads_forward_lines() {
        let spec = "127.0.0.1:9";
        let ok = parse_forward("forward 127.0.0.1:9: public address 127.0.0.1:5000", spec);
        assert_eq!(ok.unwrap().unwrap(), "127.0.0.1:5000".parse().unwrap());
        assert!(
            parse_forward("forward 127.0.0.1:9: refused: port taken", spec)
                .unwrap()
                .is_err()
        );
        assert!(parse_forward("forward 127.0.0.1:90: public address 1.2.3.4:5", spec).is_none());
        assert!(parse_forward("listening", spec).is_none());
    }
}
