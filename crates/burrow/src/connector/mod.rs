//! The connector role: listens on this machine (TCP or unix sockets), and makes each local
//! connection a stream, through the gateway, to a private service of an agent (or a
//! `host:port` the agent allows). No public port is opened anywhere.
//!
//! [`Connector::bind`] binds every listener first, so their addresses are known (and
//! printed) before the gateway is reached, and they stay open for the connector's whole
//! life: across lost sessions and reconnects. A client that arrives while there is no
//! session is closed at once (reset), with a log line saying so; it is not held, so a client
//! never hangs on a connector that is still reconnecting.
//!
//! [`Connector::run`] dials the gateway as an agent does (every transport and proxy,
//! [`crate::dial`]), reconnects with the same exponential, jittered backoff, and stops at
//! once when the first attempt fails for a reason retrying cannot fix (a key the gateway
//! does not accept as a connector's, a certificate that does not match). With each new
//! session it asks, for every forward, whether the gateway and the agent would let a stream
//! through (a probe that connects nothing) and reports the answer; every real stream is
//! checked again by both, and a refused one is closed at once with the reason in the log.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use burrow_proto::connect::{Dial, DialTarget, DIAL_SERVICE};
use burrow_proto::message::{Open, Role};
use burrow_proto::ErrorCode;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn, Instrument};

use crate::agent::{backoff_delay, BACKOFF_BASE};
use crate::config::{ConnectForward, ConnectorConfig, Listen};
use crate::dial::Peer;
use crate::relay::{self, Local};
use crate::session::{Session, SessionEnd, Stream, StreamError};
use crate::transport;

/// Errors that stop a connector, phrased for the user.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConnectorError(pub String);

/// What the connector knows of one forward.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ForwardState {
    /// Listening; no answer from the gateway yet (no session, or the probe is on its way).
    Listening,
    /// The gateway and the agent let streams through.
    Ready,
    /// Refused, and why (by the gateway or by the agent).
    Refused(String),
}

/// The connector's view, for its command line and tests.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ConnectorStatus {
    /// A session is up.
    pub connected: bool,
    /// Sessions established so far.
    pub sessions: u64,
    /// One entry per forward, in order.
    pub forwards: Vec<ForwardState>,
    /// The last error, while between sessions.
    pub last_error: Option<String>,
}

/// How long a probe waits for its answer.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// One bound listener.
enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

/// A connector whose listeners are bound, ready to [`Connector::run`].
pub struct Connector {
    config: Arc<ConnectorConfig>,
    listeners: Vec<Listener>,
    status: watch::Sender<ConnectorStatus>,
}

/// What the listeners and the dial loop share.
struct Shared {
    config: Arc<ConnectorConfig>,
    /// The live session, if any.
    session: watch::Sender<Option<Session>>,
    status: watch::Sender<ConnectorStatus>,
    tracker: TaskTracker,
}

impl Connector {
    /// Binds a listener for every forward. A unix socket path that exists is taken over
    /// only when it is a socket nobody listens on (left by an earlier run).
    pub async fn bind(config: ConnectorConfig) -> Result<Connector, ConnectorError> {
        let mut listeners = Vec::with_capacity(config.forwards.len());
        for f in &config.forwards {
            listeners.push(bind_one(f).await?);
        }
        let status = ConnectorStatus {
            forwards: vec![ForwardState::Listening; config.forwards.len()],
            ..ConnectorStatus::default()
        };
        let (status, _) = watch::channel(status);
        Ok(Connector {
            config: Arc::new(config),
            listeners,
            status,
        })
    }

    /// Where each forward listens, in order: `ADDR:PORT` (with the port the system chose
    /// for port 0) or `unix:PATH`.
    pub fn local_addrs(&self) -> Vec<String> {
        self.listeners
            .iter()
            .map(|l| match l {
                Listener::Tcp(t) => t
                    .local_addr()
                    .map_or_else(|e| format!("? ({e})"), |a| a.to_string()),
                Listener::Unix(_, p) => format!("unix:{}", p.display()),
            })
            .collect()
    }

    /// Watches the connector's status.
    pub fn status(&self) -> watch::Receiver<ConnectorStatus> {
        self.status.subscribe()
    }

    /// Serves until `shutdown`: accepts on every listener, dials the gateway and keeps a
    /// session up, reconnecting with backoff. Stops with an error only when the first
    /// attempt fails for a reason retrying cannot fix.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), ConnectorError> {
        let cfg = self.config;
        if matches!(cfg.trust, crate::config::Trust::Plain) {
            warn!("plain transport (tcp:// or ws://): the tunnel is NOT encrypted; use it only behind a TLS-terminating proxy");
        }
        let prepared =
            crate::dial::prepare(&cfg.gateway, &cfg.trust, &cfg.proxy).map_err(ConnectorError)?;
        info!(gateway = %prepared.url, "connecting {}", prepared.reason);
        let (session_tx, _) = watch::channel(None);
        let shared = Arc::new(Shared {
            config: cfg.clone(),
            session: session_tx,
            status: self.status,
            tracker: TaskTracker::new(),
        });
        let stop_listeners = shutdown.child_token();
        let mut accepting = Vec::new();
        for (i, listener) in self.listeners.into_iter().enumerate() {
            accepting.push(tokio::spawn(accept_loop(
                shared.clone(),
                i,
                listener,
                stop_listeners.clone(),
            )));
        }
        let peer = Peer {
            role: Role::Connector,
            gateway: &cfg.gateway,
            key: &cfg.key,
            trust: &cfg.trust,
            server_name: cfg.server_name.as_deref(),
            limits: &cfg.limits,
        };
        let mut attempt = 0u32;
        let mut ever_connected = false;
        let outcome = loop {
            let dialed = tokio::select! {
                _ = shutdown.cancelled() => break Ok(()),
                r = crate::dial::connect(&peer, &prepared.url, prepared.proxy.as_ref(), prepared.tls.clone()) => r,
            };
            let mut at_least = Duration::ZERO;
            let why = match dialed {
                Ok(crate::dial::Connected { started, name, .. }) => {
                    ever_connected = true;
                    attempt = 0;
                    let session = started.session;
                    // The gateway opens no streams toward a connector, and sends it no
                    // control frames or datagrams: dropping the receivers refuses them.
                    drop((started.incoming, started.control, started.datagrams));
                    info!(name = %name, "connector session up");
                    shared.status.send_modify(|s| {
                        s.connected = true;
                        s.sessions += 1;
                        s.last_error = None;
                    });
                    shared.session.send_replace(Some(session.clone()));
                    probe_all(&shared, &session);
                    let end = tokio::select! {
                        _ = shutdown.cancelled() => None,
                        end = session.closed() => Some(end),
                    };
                    shared.session.send_replace(None);
                    shared.status.send_modify(|s| {
                        s.connected = false;
                        s.forwards
                            .iter_mut()
                            .for_each(|f| *f = ForwardState::Listening);
                    });
                    let Some(end) = end else {
                        stop_listeners.cancel();
                        drain(&shared.tracker, cfg.grace).await;
                        session.close(ErrorCode::Shutdown, "connector shutting down");
                        let _ = tokio::time::timeout(Duration::from_millis(500), session.closed())
                            .await;
                        break Ok(());
                    };
                    let text = describe_end(&end);
                    shared
                        .status
                        .send_modify(|s| s.last_error = Some(text.clone()));
                    format!("session ended: {text}")
                }
                Err(e) => {
                    if e.fatal && (!ever_connected || e.for_good) {
                        break Err(ConnectorError(e.message));
                    }
                    if let Some(after) = e.retry_after {
                        at_least = after;
                    }
                    shared
                        .status
                        .send_modify(|s| s.last_error = Some(e.message.clone()));
                    e.message
                }
            };
            let delay = backoff_delay(
                attempt,
                BACKOFF_BASE,
                cfg.max_backoff,
                0.5 + fastrand::f64() / 2.0,
            )
            .max(at_least);
            attempt = attempt.saturating_add(1);
            let shown = Duration::from_millis(u64::try_from(delay.as_millis()).unwrap_or(u64::MAX));
            warn!(
                gateway = %cfg.gateway,
                "{why}; next attempt in {} (the listeners stay open; clients are closed until then)",
                humantime::format_duration(shown)
            );
            tokio::select! {
                _ = shutdown.cancelled() => break Ok(()),
                _ = tokio::time::sleep(delay) => {}
            }
        };
        stop_listeners.cancel();
        for a in accepting {
            let _ = a.await;
        }
        drain(&shared.tracker, cfg.grace).await;
        outcome
    }
}

fn describe_end(end: &SessionEnd) -> String {
    end.to_string()
}

async fn drain(tracker: &TaskTracker, grace: Duration) {
    tracker.close();
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        warn!("grace period over; closing the remaining streams");
    }
}

async fn bind_one(f: &ConnectForward) -> Result<Listener, ConnectorError> {
    let fail = |e: std::io::Error| {
        let hint = if e.kind() == std::io::ErrorKind::AddrInUse {
            ": another process uses it; stop it or pick another LISTEN"
        } else {
            ""
        };
        ConnectorError(format!(
            "forward {}: cannot listen on {}: {e}{hint}",
            f.name, f.listen
        ))
    };
    match &f.listen {
        Listen::Tcp(addr) => Ok(Listener::Tcp(TcpListener::bind(addr).await.map_err(fail)?)),
        Listen::Unix(path) => {
            take_over_stale_socket(path).map_err(|why| {
                ConnectorError(format!(
                    "forward {}: cannot listen on {}: {why}",
                    f.name, f.listen
                ))
            })?;
            let l = UnixListener::bind(path).map_err(fail)?;
            Ok(Listener::Unix(l, path.clone()))
        }
    }
}

/// Removes a socket file at `path` that nobody listens on (left by a connector that did not
/// stop cleanly); refuses anything else that is there.
fn take_over_stale_socket(path: &std::path::Path) -> Result<(), String> {
    use std::os::unix::fs::FileTypeExt as _;
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    if !meta.file_type().is_socket() {
        return Err(
            "a file that is not a socket is in the way: remove it, or pick another path".into(),
        );
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => {
            Err("another process listens on this socket: stop it, or pick another path".into())
        }
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            std::fs::remove_file(path).map_err(|e| format!("cannot remove the stale socket: {e}"))
        }
        Err(e) => Err(format!("cannot tell whether the socket is in use: {e}")),
    }
}

/// Accepts local clients of forward `i` until `stop`; each becomes a stream of the current
/// session, or is closed at once when there is none.
async fn accept_loop(shared: Arc<Shared>, i: usize, listener: Listener, stop: CancellationToken) {
    let fwd = shared.config.forwards[i].clone();
    let span = tracing::info_span!("forward", name = %fwd.name);
    async {
        let mut no_session_log = LogOnce::default();
        loop {
            let accepted = tokio::select! {
                _ = stop.cancelled() => break,
                a = accept(&listener) => a,
            };
            let (local, client) = match accepted {
                Ok(x) => x,
                Err(e) => {
                    warn!("accept failed: {e}");
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_millis(50)) => continue,
                    }
                }
            };
            let current = shared.session.borrow().clone();
            let Some(session) = current.filter(|s| !s.is_closed()) else {
                if no_session_log.allow() {
                    warn!(
                        client = client.map(tracing::field::display),
                        "no session with the gateway yet (connecting): closing the connection"
                    );
                }
                abort(local);
                continue;
            };
            no_session_log = LogOnce::default();
            let open = Open {
                service: DIAL_SERVICE,
                client,
            };
            let dial = Dial {
                agent: fwd.agent.clone(),
                target: fwd.target.clone(),
                connector: String::new(),
                probe: false,
            };
            let stream = match session.open_dial(&open, &dial) {
                Ok(s) => s,
                Err(e) => {
                    warn!(
                        client = client.map(tracing::field::display),
                        "connection closed: {e}"
                    );
                    abort(local);
                    continue;
                }
            };
            let shared2 = shared.clone();
            let fwd2 = fwd.clone();
            shared
                .tracker
                .spawn(serve_client(shared2, i, fwd2, stream, local, client).in_current_span());
        }
        if let Listener::Unix(_, path) = &listener {
            let _ = std::fs::remove_file(path);
        }
    }
    .instrument(span)
    .await
}

/// Lets one warning through until reset: a stream of clients while there is no session is
/// one line, not one a client.
#[derive(Default)]
struct LogOnce {
    last: Option<Instant>,
}

impl LogOnce {
    fn allow(&mut self) -> bool {
        match self.last {
            Some(t) if t.elapsed() < Duration::from_secs(1) => false,
            _ => {
                self.last = Some(Instant::now());
                true
            }
        }
    }
}

async fn accept(listener: &Listener) -> std::io::Result<(Local, Option<std::net::SocketAddr>)> {
    match listener {
        Listener::Tcp(l) => {
            let (tcp, peer) = l.accept().await?;
            transport::tune(&tcp);
            Ok((Local::Tcp(tcp), Some(peer)))
        }
        Listener::Unix(l, _) => {
            let (unix, _) = l.accept().await?;
            Ok((Local::Unix(unix), None))
        }
    }
}

/// Closes a local connection at once: an RST for TCP, so the client sees a refusal rather
/// than an empty answer.
fn abort(local: Local) {
    if let Local::Tcp(t) = &local {
        let _ = socket2::SockRef::from(t).set_linger(Some(Duration::ZERO));
    }
    drop(local);
}

/// Relays one local client; a refusal is logged with its reason.
async fn serve_client(
    shared: Arc<Shared>,
    i: usize,
    fwd: ConnectForward,
    stream: Stream,
    mut local: Local,
    client: Option<std::net::SocketAddr>,
) {
    let started = Instant::now();
    let stats = relay::relay_metered(&stream, &mut local, None).await;
    // A refusal comes before any byte from the agent; a reset after some (the agent's session
    // ending mid-stream, say) is a stream that broke, logged as such.
    let refused = stream
        .reset_code()
        .filter(|c| is_refusal(*c) && stats.to_local == 0);
    match refused {
        Some(code) => {
            let why = describe_refusal(code, &fwd);
            warn!(
                client = client.map(tracing::field::display),
                "connection closed: {why}"
            );
            set_state(&shared, i, ForwardState::Refused(why));
        }
        None => {
            if stats.error.is_none() {
                set_state(&shared, i, ForwardState::Ready);
            }
            relay::log_end(&fwd.name, client, &stats, started, relay::LocalIs::Client);
        }
    }
}

fn set_state(shared: &Shared, i: usize, state: ForwardState) {
    shared
        .status
        .send_if_modified(|s| match s.forwards.get_mut(i) {
            Some(f) if *f != state => {
                *f = state;
                true
            }
            _ => false,
        });
}

/// Asks, for every forward, whether streams would get through, and records the answers.
/// A forward refused for a reason that may pass (its agent not connected yet, a service not
/// announced yet, a limit) is asked about again, after [`REPROBE_BASE`] doubling up to
/// `max_backoff`, for as long as the session lasts.
fn probe_all(shared: &Arc<Shared>, session: &Session) {
    for (i, fwd) in shared.config.forwards.iter().enumerate() {
        let shared2 = shared.clone();
        let fwd = fwd.clone();
        let session = session.clone();
        shared.tracker.spawn(async move {
            let mut attempt = 0u32;
            let mut said: Option<ForwardState> = None;
            loop {
                let (state, again) = match probe(&session, &fwd).await {
                    Probe::Allowed => (ForwardState::Ready, false),
                    Probe::Refused(code) => (
                        ForwardState::Refused(describe_refusal(code, &fwd)),
                        may_pass(code),
                    ),
                    Probe::NoAnswer => (
                        ForwardState::Refused(format!(
                            "no answer from the gateway within {PROBE_TIMEOUT:?}"
                        )),
                        true,
                    ),
                    Probe::Gone => return,
                };
                if said.as_ref() != Some(&state) {
                    match &state {
                        ForwardState::Ready => info!(forward = %fwd.name, "forward ready"),
                        ForwardState::Refused(why) => {
                            warn!(forward = %fwd.name, "forward refused: {why}")
                        }
                        ForwardState::Listening => {}
                    }
                    said = Some(state.clone());
                }
                set_state(&shared2, i, state);
                if !again {
                    return;
                }
                let delay = backoff_delay(
                    attempt,
                    REPROBE_BASE,
                    shared2.config.max_backoff.max(REPROBE_BASE),
                    0.5 + fastrand::f64() / 2.0,
                );
                attempt = attempt.saturating_add(1);
                debug!(forward = %fwd.name, ?delay, "asking again");
                tokio::select! {
                    _ = session.closed() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        });
    }
}

/// First pause before a forward refused for a reason that may pass is asked about again.
pub const REPROBE_BASE: Duration = Duration::from_secs(1);

/// What a probe learned.
enum Probe {
    /// The gateway and the agent would let a stream through.
    Allowed,
    /// Refused, with this code.
    Refused(ErrorCode),
    /// No answer in time.
    NoAnswer,
    /// The session is over.
    Gone,
}

/// One probe: a stream that asks, and connects nothing.
async fn probe(session: &Session, fwd: &ConnectForward) -> Probe {
    let dial = Dial {
        agent: fwd.agent.clone(),
        target: fwd.target.clone(),
        connector: String::new(),
        probe: true,
    };
    let open = Open {
        service: DIAL_SERVICE,
        client: None,
    };
    let Ok(stream) = session.open_dial(&open, &dial) else {
        return Probe::Gone;
    };
    stream.finish();
    match tokio::time::timeout(PROBE_TIMEOUT, stream.recv()).await {
        Ok(Ok(_)) => Probe::Allowed,
        Ok(Err(StreamError::Reset(code))) => Probe::Refused(code),
        Ok(Err(_)) => Probe::Gone,
        Err(_) => Probe::NoAnswer,
    }
}

/// Whether a refusal with `code` may pass without anyone changing a setting.
fn may_pass(code: ErrorCode) -> bool {
    matches!(
        code,
        ErrorCode::AgentUnavailable | ErrorCode::NoSuchService | ErrorCode::LimitExceeded
    )
}

/// Whether a reset with `code` is a refusal by the gateway or the agent (rather than the
/// stream breaking later).
fn is_refusal(code: ErrorCode) -> bool {
    matches!(
        code,
        ErrorCode::NotInReach
            | ErrorCode::NoSuchService
            | ErrorCode::AgentUnavailable
            | ErrorCode::TargetNotAllowed
            | ErrorCode::ConnectRefused
            | ErrorCode::ConnectFailed
            | ErrorCode::LimitExceeded
    )
}

/// What a refusal with `code` means for `fwd`, and what to do.
pub fn describe_refusal(code: ErrorCode, fwd: &ConnectForward) -> String {
    let agent = &fwd.agent;
    let target = &fwd.target;
    match (code, target) {
        (ErrorCode::NotInReach, _) => format!(
            "refused by the gateway: `{agent}/{target}` is not in this connector's reach (`reach` of its [[connectors]] entry on the gateway)"
        ),
        (ErrorCode::AgentUnavailable, _) => {
            format!("refused by the gateway: agent `{agent}` is not connected to it")
        }
        (ErrorCode::NoSuchService, _) => format!(
            "refused: agent `{agent}` has no private service `{target}` (`--private {target}=HOST:PORT` on the agent)"
        ),
        (ErrorCode::TargetNotAllowed, DialTarget::Address(_)) => format!(
            "refused by agent `{agent}`: {target} is not in its allow list (`--allow` on the agent)"
        ),
        (ErrorCode::TargetNotAllowed, DialTarget::Service(_)) => format!(
            "refused by agent `{agent}`: it does not offer `{target}` to connectors"
        ),
        (ErrorCode::ConnectRefused, _) => format!(
            "agent `{agent}` could not connect to `{target}`: the target refused the connection (is the service running?)"
        ),
        (ErrorCode::ConnectFailed, _) => format!(
            "agent `{agent}` could not connect to `{target}` (unreachable, or slower than its connect_timeout)"
        ),
        (ErrorCode::LimitExceeded, _) => "refused: a limit was reached (this connector's max_streams on the gateway, or a session's stream limit)".to_string(),
        (other, _) => format!("closed: {other}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_say_who_refused_and_what_to_change() {
        let fwd = crate::config::parse_connect_forward("1=office/vnc").unwrap();
        let t = crate::config::parse_connect_forward("1=office/10.0.0.5:22").unwrap();
        assert!(
            describe_refusal(ErrorCode::NotInReach, &fwd).contains("not in this connector's reach")
        );
        assert!(
            describe_refusal(ErrorCode::NoSuchService, &fwd).contains("no private service `vnc`")
        );
        assert!(describe_refusal(ErrorCode::TargetNotAllowed, &t)
            .contains("10.0.0.5:22 is not in its allow list"));
        assert!(describe_refusal(ErrorCode::AgentUnavailable, &t)
            .contains("agent `office` is not connected"));
        assert!(is_refusal(ErrorCode::NotInReach) && !is_refusal(ErrorCode::StreamReset));
    }
}
