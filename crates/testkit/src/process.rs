//! The real `burrow` binary as a child process: start it, read its output, signal it, and
//! read back what it holds (memory, file descriptors, threads, TCP sockets).
//!
//! Output is read by one thread per pipe, so the child never blocks on a full pipe even when
//! nobody is waiting on it; lines reach the async side through an unbounded channel, bounded
//! in practice by what the process prints during a test.

use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::{Error, Result};

/// How many stderr lines an error message quotes.
const TAIL: usize = 30;

/// A signal to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// SIGTERM: graceful shutdown.
    Term,
    /// SIGINT: graceful shutdown, as Ctrl-C.
    Int,
    /// SIGKILL: the process dies at once; the kernel closes its sockets.
    Kill,
    /// SIGHUP: read the config file again.
    Hup,
}

impl Signal {
    fn raw(self) -> rustix::process::Signal {
        match self {
            Signal::Term => rustix::process::Signal::TERM,
            Signal::Int => rustix::process::Signal::INT,
            Signal::Kill => rustix::process::Signal::KILL,
            Signal::Hup => rustix::process::Signal::HUP,
        }
    }
}

/// A running `burrow` process. Its stdout and stderr lines are collected as they come;
/// SIGKILLed when dropped.
pub struct Burrow {
    child: Child,
    name: String,
    out_rx: mpsc::UnboundedReceiver<String>,
    err_rx: mpsc::UnboundedReceiver<String>,
    out: Vec<String>,
    err: Vec<String>,
    out_closed: bool,
    err_closed: bool,
    /// Lines before these indexes have been matched by a `wait_*` already.
    out_pos: usize,
    err_pos: usize,
    status: Option<ExitStatus>,
}

fn lines(r: impl Read + Send + 'static) -> mpsc::UnboundedReceiver<String> {
    let (tx, rx) = mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in BufReader::new(r).lines().map_while(std::result::Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

impl Burrow {
    /// A command for `bin` with `RUST_LOG` and the proxy variables an agent reads
    /// (`HTTPS_PROXY`, `ALL_PROXY`, `NO_PROXY`, either case) removed, so the parent's settings
    /// do not leak in, and no standard input; add arguments and environment, then
    /// [`Burrow::start`].
    pub fn command(bin: &Path) -> Command {
        let mut cmd = Command::new(bin);
        cmd.env_remove("RUST_LOG").stdin(Stdio::null());
        for var in [
            "https_proxy",
            "HTTPS_PROXY",
            "all_proxy",
            "ALL_PROXY",
            "no_proxy",
            "NO_PROXY",
            "BURROW_PROXY",
        ] {
            cmd.env_remove(var);
        }
        cmd
    }

    /// Starts `bin` with `args` (see [`Burrow::command`]).
    pub fn spawn<I, S>(bin: &Path, args: I) -> Result<Burrow>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = Self::command(bin);
        cmd.args(args);
        Self::start(cmd)
    }

    /// Starts `cmd` with its stdout and stderr captured.
    pub fn start(mut cmd: Command) -> Result<Burrow> {
        // `sh -c SCRIPT PROGRAM ARGS...` (see `GatewaySpec::open_files`) is named after PROGRAM.
        let words: Vec<String> = std::iter::once(cmd.get_program())
            .chain(cmd.get_args())
            .map(|w| w.to_string_lossy().into_owned())
            .collect();
        let skip = if words.len() > 3 && words[0] == "sh" && words[1] == "-c" {
            3
        } else {
            0
        };
        let name = format!(
            "{} {}",
            Path::new(words.get(skip).map_or("", String::as_str))
                .file_name()
                .unwrap_or_default()
                .to_string_lossy(),
            words.get(skip + 1).map_or("", String::as_str)
        );
        let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
        let out = child.stdout.take().map(lines);
        let err = child.stderr.take().map(lines);
        let (Some(out_rx), Some(err_rx)) = (out, err) else {
            return Err(Error::Unexpected("child without pipes".into()));
        };
        Ok(Burrow {
            child,
            name,
            out_rx,
            err_rx,
            out: Vec::new(),
            err: Vec::new(),
            out_closed: false,
            err_closed: false,
            out_pos: 0,
            err_pos: 0,
            status: None,
        })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Memory, descriptors and threads right now.
    pub fn stats(&self) -> Result<ProcStats> {
        ProcStats::of(self.pid())
    }

    /// Takes in the lines printed so far.
    fn collect(&mut self) {
        loop {
            match self.out_rx.try_recv() {
                Ok(l) => self.out.push(l),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    self.out_closed = true;
                    break;
                }
            }
        }
        loop {
            match self.err_rx.try_recv() {
                Ok(l) => self.err.push(l),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    self.err_closed = true;
                    break;
                }
            }
        }
    }

    /// Every stdout line so far.
    pub fn stdout_lines(&mut self) -> &[String] {
        self.collect();
        &self.out
    }

    /// Every stderr line so far.
    pub fn stderr_lines(&mut self) -> &[String] {
        self.collect();
        &self.err
    }

    /// The last stderr lines, for error messages.
    pub fn stderr_tail(&mut self) -> Vec<String> {
        self.collect();
        self.err[self.err.len().saturating_sub(TAIL)..].to_vec()
    }

    /// The next stdout line (after the last one a `wait_stdout` returned) that satisfies
    /// `pred`, within `timeout`.
    pub async fn wait_stdout(
        &mut self,
        pred: impl Fn(&str) -> bool,
        timeout: Duration,
    ) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            self.collect();
            if let Some(i) = self.out[self.out_pos..].iter().position(|l| pred(l)) {
                let i = self.out_pos + i;
                self.out_pos = i + 1;
                return Ok(self.out[i].clone());
            }
            self.out_pos = self.out.len();
            if self.out_closed {
                return Err(self.ended("a stdout line").await);
            }
            match tokio::time::timeout_at(deadline, self.out_rx.recv()).await {
                Ok(Some(l)) => self.out.push(l),
                Ok(None) => self.out_closed = true,
                Err(_) => {
                    return Err(Error::Timeout {
                        what: format!("{}: stdout line", self.name),
                        timeout,
                        tail: self.stderr_tail(),
                    })
                }
            }
        }
    }

    /// The next stderr line (after the last one a `wait_stderr` returned) containing
    /// `needle`, within `timeout`.
    pub async fn wait_stderr(&mut self, needle: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            self.collect();
            if let Some(i) = self.err[self.err_pos..]
                .iter()
                .position(|l| l.contains(needle))
            {
                let i = self.err_pos + i;
                self.err_pos = i + 1;
                return Ok(self.err[i].clone());
            }
            self.err_pos = self.err.len();
            if self.err_closed {
                return Err(self.ended(&format!("stderr line with {needle:?}")).await);
            }
            match tokio::time::timeout_at(deadline, self.err_rx.recv()).await {
                Ok(Some(l)) => self.err.push(l),
                Ok(None) => self.err_closed = true,
                Err(_) => {
                    return Err(Error::Timeout {
                        what: format!("{}: stderr line with {needle:?}", self.name),
                        timeout,
                        tail: self.stderr_tail(),
                    })
                }
            }
        }
    }

    /// The error for "the output ended while waiting for `what`".
    async fn ended(&mut self, what: &str) -> Error {
        let what = format!("{}: {what}", self.name);
        match self.wait_exit(Duration::from_secs(5)).await {
            Ok(status) => Error::Exited {
                what,
                status,
                tail: self.stderr_tail(),
            },
            Err(e) => e,
        }
    }

    /// Sends `sig` (unless the process has already been reaped).
    pub fn signal(&mut self, sig: Signal) -> Result<()> {
        if self.child.try_wait()?.is_some() {
            return Err(Error::Unexpected(format!(
                "{}: cannot send {sig:?}: the process has exited",
                self.name
            )));
        }
        let pid = rustix::process::Pid::from_raw(self.child.id() as i32)
            .ok_or_else(|| Error::Unexpected("pid 0".into()))?;
        rustix::process::kill_process(pid, sig.raw()).map_err(std::io::Error::from)?;
        Ok(())
    }

    /// SIGKILL, then the exit status.
    pub async fn kill(&mut self) -> Result<ExitStatus> {
        if self.status.is_none() && self.child.try_wait()?.is_none() {
            self.child.kill()?;
        }
        self.wait_exit(Duration::from_secs(10)).await
    }

    /// Waits up to `timeout` for the process to exit, then collects the rest of its output.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        if let Some(st) = self.status {
            return Ok(st);
        }
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(st) = self.child.try_wait()? {
                break st;
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout {
                    what: format!("{}: exit", self.name),
                    timeout,
                    tail: self.stderr_tail(),
                });
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        self.status = Some(status);
        // The pipes close with the process (unless it left children holding them).
        let drain = Instant::now() + Duration::from_secs(5);
        while !(self.out_closed && self.err_closed) && Instant::now() < drain {
            self.collect();
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(status)
    }

    /// Stderr lines that report a panic.
    pub fn panics(&mut self) -> Vec<String> {
        self.collect();
        self.err
            .iter()
            .filter(|l| l.contains("panicked"))
            .cloned()
            .collect()
    }
}

impl Drop for Burrow {
    fn drop(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// What a process holds, from `/proc/<pid>/status` and `/proc/<pid>/fd`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcStats {
    /// Resident memory (`VmRSS`), KiB.
    pub rss_kib: u64,
    /// Peak resident memory so far (`VmHWM`), KiB.
    pub peak_rss_kib: u64,
    /// Address space (`VmSize`), KiB: shows buffers that are allocated but not yet touched.
    pub vm_kib: u64,
    /// Open file descriptors.
    pub fds: u64,
    /// Threads.
    pub threads: u64,
}

impl ProcStats {
    /// Reads the numbers of process `pid`.
    pub fn of(pid: u32) -> Result<ProcStats> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let field = |name: &str| -> Result<u64> {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|n| n.parse().ok())
                .ok_or_else(|| Error::Unexpected(format!("/proc/{pid}/status: no {name}")))
        };
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))?.count() as u64;
        Ok(ProcStats {
            rss_kib: field("VmRSS:")?,
            peak_rss_kib: field("VmHWM:")?,
            vm_kib: field("VmSize:")?,
            fds,
            threads: field("Threads:")?,
        })
    }

    /// Resident memory in MiB.
    pub fn rss_mib(&self) -> f64 {
        self.rss_kib as f64 / 1024.0
    }
}

impl std::fmt::Display for ProcStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "rss {:.1} MiB (peak {:.1}), fds {}, threads {}",
            self.rss_mib(),
            self.peak_rss_kib as f64 / 1024.0,
            self.fds,
            self.threads
        )
    }
}

/// Raises this process's soft limit on open files to the hard limit (children inherit it);
/// returns the new soft limit. Thousands of connections need more than the usual 1024.
pub fn raise_fd_limit() -> u64 {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut lim = getrlimit(Resource::Nofile);
    if lim.current != lim.maximum {
        lim.current = lim.maximum;
        let _ = setrlimit(Resource::Nofile, lim);
    }
    getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX)
}

/// `cmd` run through `sh -c 'ulimit ...; exec ...'` with the open-file limits `soft` and,
/// if given, `hard` (the soft one first, as the hard one may not go below it).
fn with_open_files(cmd: Command, soft: u64, hard: Option<u64>) -> Command {
    let mut script = format!("ulimit -S -n {soft} || exit 111; ");
    if let Some(hard) = hard {
        script.push_str(&format!("ulimit -H -n {hard} || exit 111; "));
    }
    script.push_str("exec \"$0\" \"$@\"");
    let mut sh = Command::new("sh");
    sh.arg("-c")
        .arg(script)
        .arg(cmd.get_program())
        .args(cmd.get_args());
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => sh.env(k, v),
            None => sh.env_remove(k),
        };
    }
    sh.stdin(Stdio::null());
    sh
}

/// How a gateway is started: [`GatewaySpec::new`] gives the zero-config gateway on
/// `127.0.0.1:0` with public ports on `127.0.0.1`.
#[derive(Debug, Clone)]
pub struct GatewaySpec {
    /// `--listen`.
    pub listen: SocketAddr,
    /// `--public-host` (default `127.0.0.1`).
    pub public_host: std::net::IpAddr,
    /// `--state-dir`.
    pub state_dir: PathBuf,
    /// `--config`, if any.
    pub config: Option<PathBuf>,
    /// More arguments, e.g. `--log-level trace`.
    pub args: Vec<String>,
    /// Environment variables to set.
    pub env: Vec<(String, String)>,
    /// Whether to wait for the `burrow agent ...` line (only printed when the gateway uses
    /// its generated key, i.e. the config lists no `[[agents]]`).
    pub expect_agent_line: bool,
    /// Open-file limits (soft, and hard if set) the gateway starts with; see
    /// [`GatewaySpec::open_files`].
    pub open_files: Option<(u64, Option<u64>)>,
}

impl GatewaySpec {
    /// The zero-config gateway with its state in `state_dir`.
    pub fn new(state_dir: &Path) -> GatewaySpec {
        GatewaySpec {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            public_host: std::net::IpAddr::from([127, 0, 0, 1]),
            state_dir: state_dir.to_path_buf(),
            config: None,
            args: Vec::new(),
            env: Vec::new(),
            expect_agent_line: true,
            open_files: None,
        }
    }

    /// Starts the gateway with a soft open-file limit of `soft` (and a hard one of `hard`, if
    /// given; else it keeps ours), set by `sh` (`ulimit`) before it execs the binary, so the
    /// gateway starts with them as it would under a service manager.
    pub fn open_files(mut self, soft: u64, hard: Option<u64>) -> Self {
        self.open_files = Some((soft, hard));
        self
    }

    /// Whether the gateway prints the agent line: `false` when its config lists agents.
    pub fn expect_agent_line(mut self, expect: bool) -> Self {
        self.expect_agent_line = expect;
        self
    }

    /// Listens on `listen` instead (e.g. the port of a gateway being restarted).
    pub fn listen(mut self, listen: SocketAddr) -> Self {
        self.listen = listen;
        self
    }

    /// Binds public ports on `host` instead (e.g. `::1`).
    pub fn public_host(mut self, host: std::net::IpAddr) -> Self {
        self.public_host = host;
        self
    }

    /// Reads `path` as `--config`.
    pub fn config(mut self, path: &Path) -> Self {
        self.config = Some(path.to_path_buf());
        self
    }

    /// Adds arguments.
    pub fn args<I: IntoIterator<Item = S>, S: Into<String>>(mut self, args: I) -> Self {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Sets an environment variable.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// The command line, without starting it.
    pub fn command(&self, bin: &Path) -> Command {
        let mut cmd = Burrow::command(bin);
        cmd.arg("gateway")
            .arg("--listen")
            .arg(self.listen.to_string())
            .arg("--public-host")
            .arg(self.public_host.to_string())
            .arg("--state-dir")
            .arg(&self.state_dir);
        if let Some(c) = &self.config {
            cmd.arg("--config").arg(c);
        }
        cmd.args(&self.args);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        match self.open_files {
            Some((soft, hard)) => with_open_files(cmd, soft, hard),
            None => cmd,
        }
    }

    /// Starts the gateway and waits (30 s) for its address, fingerprint and agent line.
    ///
    /// The gateway prints the key in full only when it has just made it; on a restart the
    /// printed line has it masked, and the key is read from `agent.key` in the state
    /// directory instead, so [`GatewayProc::agent_line`] is the whole line either way.
    pub async fn start(&self, bin: &Path) -> Result<GatewayProc> {
        let mut proc = Burrow::start(self.command(bin))?;
        let wait = Duration::from_secs(30);
        let listening = proc
            .wait_stdout(|l| l.starts_with("gateway listening on "), wait)
            .await?;
        let addr = listening
            .trim_start_matches("gateway listening on ")
            .trim()
            .parse::<SocketAddr>()
            .map_err(|e| Error::Unexpected(format!("{listening:?}: {e}")))?;
        let fp_line = proc
            .wait_stdout(|l| l.starts_with("certificate fingerprint: "), wait)
            .await?;
        let fingerprint = fp_line
            .trim_start_matches("certificate fingerprint: ")
            .trim()
            .to_string();
        let agent_line = if self.expect_agent_line {
            let line = proc
                .wait_stdout(|l| l.starts_with("burrow agent "), wait)
                .await?;
            Some(self.unmasked(line)?)
        } else {
            None
        };
        Ok(GatewayProc {
            proc,
            addr,
            fingerprint,
            agent_line,
        })
    }
}

impl GatewaySpec {
    /// `line` with a masked key (`bk_****`) replaced by the key in the state directory.
    fn unmasked(&self, line: String) -> Result<String> {
        const MASK: &str = "bk_****";
        if !line.contains(MASK) {
            return Ok(line);
        }
        let file = self.state_dir.join("agent.key");
        let key = std::fs::read_to_string(&file)
            .map_err(|e| Error::Unexpected(format!("{}: {e}", file.display())))?;
        Ok(line.replace(MASK, key.trim()))
    }
}

/// A running gateway.
pub struct GatewayProc {
    /// The process.
    pub proc: Burrow,
    addr: SocketAddr,
    fingerprint: String,
    agent_line: Option<String>,
}

impl GatewayProc {
    /// The tunnel address agents dial.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `SHA256:...` of its certificate.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// The printed `burrow agent ...` line, if the gateway printed one, with the key in full
    /// (see [`GatewaySpec::start`]).
    pub fn agent_line(&self) -> Option<&str> {
        self.agent_line.as_deref()
    }

    /// The key in the agent line (`bk_...`).
    pub fn key(&self) -> Option<String> {
        let line = self.agent_line.as_deref()?;
        let mut words = line.split_whitespace();
        words.find(|w| *w == "--key")?;
        words.next().map(str::to_string)
    }

    /// The agent line's arguments without the leading `burrow` (so they start with `agent`).
    pub fn agent_args(&self) -> Vec<String> {
        match &self.agent_line {
            Some(l) => l.split_whitespace().skip(1).map(str::to_string).collect(),
            None => Vec::new(),
        }
    }

    /// [`agent_args`](Self::agent_args) with `--gateway` pointing at `via` (a
    /// [`FaultProxy`](crate::FaultProxy) in front of this gateway). The certificate is pinned
    /// by fingerprint, so the changed address does not matter to TLS.
    pub fn agent_args_via(&self, via: SocketAddr) -> Vec<String> {
        let mut args = self.agent_args();
        if let Some(i) = args.iter().position(|a| a == "--gateway") {
            if let Some(v) = args.get_mut(i + 1) {
                *v = via.to_string();
            }
        }
        args
    }

    /// [`agent_args`](Self::agent_args) with `--gateway SCHEME://ADDR` (e.g. `quic` and
    /// this gateway's address: it serves QUIC on UDP at the tunnel port's number).
    pub fn agent_args_url(&self, scheme: &str, addr: SocketAddr) -> Vec<String> {
        let mut args = self.agent_args();
        if let Some(i) = args.iter().position(|a| a == "--gateway") {
            if let Some(v) = args.get_mut(i + 1) {
                *v = format!("{scheme}://{addr}");
            }
        }
        args
    }

    /// See [`Burrow::stats`].
    pub fn stats(&self) -> Result<ProcStats> {
        self.proc.stats()
    }
}

impl std::ops::Deref for GatewayProc {
    type Target = Burrow;
    fn deref(&self) -> &Burrow {
        &self.proc
    }
}

impl std::ops::DerefMut for GatewayProc {
    fn deref_mut(&mut self) -> &mut Burrow {
        &mut self.proc
    }
}

/// How an agent is started: the gateway's agent arguments plus forwards.
#[derive(Debug, Clone)]
pub struct AgentSpec {
    /// Arguments starting with `agent` (e.g. [`GatewayProc::agent_args`]).
    pub args: Vec<String>,
    /// `--forward` specs, in order.
    pub forwards: Vec<String>,
    /// Environment variables to set.
    pub env: Vec<(String, String)>,
}

impl AgentSpec {
    /// An agent with `args` (starting with `agent`).
    pub fn new(args: Vec<String>) -> AgentSpec {
        AgentSpec {
            args,
            forwards: Vec::new(),
            env: Vec::new(),
        }
    }

    /// Adds a `--forward SPEC` (e.g. `127.0.0.1:8080` or `0=127.0.0.1:8080`).
    pub fn forward(mut self, spec: &str) -> Self {
        self.forwards.push(spec.to_string());
        self
    }

    /// Adds arguments.
    pub fn args<I: IntoIterator<Item = S>, S: Into<String>>(mut self, args: I) -> Self {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Sets an environment variable.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// The command line, without starting it.
    pub fn command(&self, bin: &Path) -> Command {
        let mut cmd = Burrow::command(bin);
        cmd.args(&self.args);
        for f in &self.forwards {
            cmd.arg("--forward").arg(f);
        }
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd
    }

    /// Starts the agent and waits (30 s) for every forward's public address.
    pub async fn start(&self, bin: &Path) -> Result<AgentProc> {
        let mut proc = Burrow::start(self.command(bin))?;
        let public = wait_public(&mut proc, &self.forwards, Duration::from_secs(30)).await?;
        Ok(AgentProc {
            proc,
            forwards: self.forwards.clone(),
            public,
        })
    }
}

/// Waits for the agent's next `forward SPEC: public address ADDR` line of each spec (after
/// the lines already matched), and returns the addresses in the order of `specs`. A refused
/// forward is an error. (An agent with several gateways prints a line per gateway, ending in
/// `(gateway G)`: this takes the first of each spec.)
pub async fn wait_public(
    proc: &mut Burrow,
    specs: &[String],
    timeout: Duration,
) -> Result<Vec<SocketAddr>> {
    let deadline = Instant::now() + timeout;
    let mut found: Vec<Option<SocketAddr>> = vec![None; specs.len()];
    while found.iter().any(Option::is_none) {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = proc
            .wait_stdout(|l| l.starts_with("forward "), left)
            .await?;
        for (i, spec) in specs.iter().enumerate() {
            // The forward's name is its spec without the `?` options.
            let name = spec.split_once('?').map_or(spec.as_str(), |(name, _)| name);
            let Some(rest) = line.strip_prefix(&format!("forward {name}: ")) else {
                continue;
            };
            if let Some(addr) = rest.strip_prefix("public address ") {
                // With several gateways, `ADDR (gateway G)`.
                let addr = addr
                    .split_whitespace()
                    .next()
                    .unwrap_or_default()
                    .parse()
                    .map_err(|e| Error::Unexpected(format!("{line:?}: {e}")))?;
                found[i] = Some(addr);
            } else {
                return Err(Error::Unexpected(format!("forward refused: {line}")));
            }
        }
    }
    Ok(found.into_iter().flatten().collect())
}

/// A running agent.
pub struct AgentProc {
    /// The process.
    pub proc: Burrow,
    forwards: Vec<String>,
    public: Vec<SocketAddr>,
}

impl AgentProc {
    /// The public address of forward `i` (in the order given).
    pub fn public(&self, i: usize) -> SocketAddr {
        self.public[i]
    }

    /// Every public address, in the order of the forwards.
    pub fn public_addrs(&self) -> &[SocketAddr] {
        &self.public
    }

    /// Waits for the forwards to be granted again (after a reconnect); updates and returns
    /// the public addresses.
    pub async fn wait_regranted(&mut self, timeout: Duration) -> Result<Vec<SocketAddr>> {
        self.public = wait_public(&mut self.proc, &self.forwards, timeout).await?;
        Ok(self.public.clone())
    }

    /// See [`Burrow::stats`].
    pub fn stats(&self) -> Result<ProcStats> {
        self.proc.stats()
    }
}

impl std::ops::Deref for AgentProc {
    type Target = Burrow;
    fn deref(&self) -> &Burrow {
        &self.proc
    }
}

impl std::ops::DerefMut for AgentProc {
    fn deref_mut(&mut self) -> &mut Burrow {
        &mut self.proc
    }
}

/// A TCP socket state, as numbered in `/proc/net/tcp`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TcpState {
    /// 01
    Established,
    /// 02
    SynSent,
    /// 03
    SynRecv,
    /// 04
    FinWait1,
    /// 05
    FinWait2,
    /// 06
    TimeWait,
    /// 07
    Close,
    /// 08: the peer closed and this side has not: a leak if it stays.
    CloseWait,
    /// 09
    LastAck,
    /// 0A
    Listen,
    /// 0B
    Closing,
    /// Anything else.
    Other(u8),
}

impl TcpState {
    fn from_code(c: u8) -> TcpState {
        match c {
            0x01 => TcpState::Established,
            0x02 => TcpState::SynSent,
            0x03 => TcpState::SynRecv,
            0x04 => TcpState::FinWait1,
            0x05 => TcpState::FinWait2,
            0x06 => TcpState::TimeWait,
            0x07 => TcpState::Close,
            0x08 => TcpState::CloseWait,
            0x09 => TcpState::LastAck,
            0x0A => TcpState::Listen,
            0x0B => TcpState::Closing,
            o => TcpState::Other(o),
        }
    }
}

/// One line of `/proc/net/tcp` or `/proc/net/tcp6` (ports only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpEntry {
    /// Local port.
    pub local_port: u16,
    /// Remote port.
    pub remote_port: u16,
    /// State.
    pub state: TcpState,
}

impl TcpEntry {
    /// Whether either end uses one of `ports`.
    pub fn involves(&self, ports: &[u16]) -> bool {
        ports.contains(&self.local_port) || ports.contains(&self.remote_port)
    }
}

/// Every TCP socket of this network namespace (IPv4 and IPv6).
pub fn tcp_entries() -> Result<Vec<TcpEntry>> {
    let mut v = Vec::new();
    for file in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = match std::fs::read_to_string(file) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e.into()),
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 4 {
                continue;
            }
            let port = |s: &str| {
                s.rsplit(':')
                    .next()
                    .and_then(|p| u16::from_str_radix(p, 16).ok())
            };
            let (Some(local_port), Some(remote_port), Ok(state)) =
                (port(f[1]), port(f[2]), u8::from_str_radix(f[3], 16))
            else {
                continue;
            };
            v.push(TcpEntry {
                local_port,
                remote_port,
                state: TcpState::from_code(state),
            });
        }
    }
    Ok(v)
}

/// How many sockets touching `ports` are in `state`.
pub fn count_tcp_state(ports: &[u16], state: TcpState) -> Result<usize> {
    Ok(tcp_entries()?
        .iter()
        .filter(|e| e.state == state && e.involves(ports))
        .count())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_stats() {
        let s = ProcStats::of(std::process::id()).unwrap();
        assert!(s.rss_kib > 0 && s.fds >= 3 && s.threads >= 1, "{s}");
        assert!(s.peak_rss_kib >= s.rss_kib);
    }

    #[test]
    fn sees_a_listening_socket() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        assert_eq!(count_tcp_state(&[port], TcpState::Listen).unwrap(), 1);
        assert!(raise_fd_limit() >= 1024);
    }

    #[tokio::test]
    async fn open_files_are_set_before_exec() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo soft $(ulimit -S -n) hard $(ulimit -H -n)"]);
        let mut p = Burrow::start(with_open_files(cmd, 1000, Some(1001))).unwrap();
        let l = p
            .wait_stdout(|l| l.starts_with("soft"), Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(l, "soft 1000 hard 1001");
        assert_eq!(p.name, "sh -c");
    }

    #[tokio::test]
    async fn runs_a_process_and_reads_its_lines() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo one; echo two >&2; echo three; exec sleep 30"]);
        let mut p = Burrow::start(cmd).unwrap();
        let l = p
            .wait_stdout(|l| l.starts_with("th"), Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(l, "three");
        p.wait_stderr("two", Duration::from_secs(10)).await.unwrap();
        let err = p
            .wait_stderr("never", Duration::from_millis(100))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Timeout { .. }), "{err}");
        assert!(p.stats().unwrap().fds >= 3);
        p.signal(Signal::Term).unwrap();
        let st = p.wait_exit(Duration::from_secs(10)).await.unwrap();
        assert!(!st.success());
        assert!(p.signal(Signal::Term).is_err());
    }
}
