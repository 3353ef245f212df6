//! The agent role: dials the gateway, authenticates, asks for its public ports, and relays
//! each stream the gateway opens to the matching local target.
//!
//! The gateway only names a service id in each Open; the target comes from the agent's own
//! configuration, and only services the gateway granted accept streams. So whatever the
//! gateway asks, the agent connects nowhere else.
//!
//! Reconnection: after a session ends, the agent waits an exponentially growing, jittered
//! delay (capped by `max_backoff`) and dials again, forever. Only an error on the very first
//! attempt that retrying cannot fix (key refused, certificate mismatch, version mismatch)
//! stops the agent, so a typo is reported at once instead of retried silently.

use std::sync::Arc;
use std::time::Duration;

use burrow_proto::message::{Bind, BindResult, Protocol, Role};
use burrow_proto::mux::Side;
use burrow_proto::{ErrorCode, Kind};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::{watch, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn, Instrument};

mod admin;

use crate::admin::metrics::{Refused, SessionMeta, Tally, OTHER};
use crate::config::{AgentConfig, Forward, Target, Trust};
use crate::relay::{self, Local};
use crate::session::{self, handshake, Stream};
use crate::transport;

/// Errors that stop an agent, phrased for the user.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct AgentError(pub String);

/// What became of one forward.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ForwardStatus {
    /// Not answered yet.
    Pending,
    /// Granted: the public address clients use.
    Granted(String),
    /// Refused, with the reason.
    Refused(String),
}

/// The agent's view of its session, for status and tests.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AgentStatus {
    /// A session is up.
    pub connected: bool,
    /// Sessions established so far.
    pub sessions: u64,
    /// One entry per configured forward, in order.
    pub forwards: Vec<ForwardStatus>,
    /// The last error, if the agent is between sessions.
    pub last_error: Option<String>,
    /// Failed attempts since the last session (resets when a session is established).
    pub failed_attempts: u32,
    /// The pause before the next attempt, while the agent is waiting to reconnect.
    pub next_retry: Option<Duration>,
}

/// First reconnect delay.
pub const BACKOFF_BASE: Duration = Duration::from_millis(500);

/// The delay before reconnect attempt `attempt` (0-based): `base * 2^attempt` capped at
/// `max`, then scaled by `jitter` in `[0.5, 1.0]` so many agents do not return in lockstep.
pub fn backoff_delay(attempt: u32, base: Duration, max: Duration, jitter: f64) -> Duration {
    let exp = base.saturating_mul(1u32.checked_shl(attempt.min(20)).unwrap_or(u32::MAX));
    exp.min(max).mul_f64(jitter.clamp(0.5, 1.0))
}

/// An agent, ready to [`Agent::run`].
pub struct Agent {
    config: AgentConfig,
    status: watch::Sender<AgentStatus>,
    /// What the admin server shows beyond `status`.
    tally: Arc<Tally>,
}

impl Agent {
    /// An agent with `config`.
    pub fn new(config: AgentConfig) -> Agent {
        let status = AgentStatus {
            forwards: vec![ForwardStatus::Pending; config.forwards.len()],
            ..AgentStatus::default()
        };
        let (status, _) = watch::channel(status);
        Agent {
            config,
            status,
            tally: Arc::new(Tally::new("agent")),
        }
    }

    /// What the admin server ([`crate::admin`]) shows of this agent.
    pub fn report(&self) -> Arc<dyn crate::admin::Report> {
        Arc::new(admin::AgentReport {
            config: self.config.clone(),
            status: self.status.subscribe(),
            tally: self.tally.clone(),
        })
    }

    /// Watches the agent's status.
    pub fn status(&self) -> watch::Receiver<AgentStatus> {
        self.status.subscribe()
    }

    /// Runs until `shutdown`, reconnecting forever once a session has succeeded.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), AgentError> {
        let cfg = Arc::new(self.config);
        let tls = match &cfg.trust {
            Trust::Plain => {
                warn!("plain transport (tcp:// or ws://): the tunnel is NOT encrypted; use it only behind a TLS-terminating proxy");
                None
            }
            trust => Some(crate::tls::client_config(trust).map_err(|e| AgentError(e.to_string()))?),
        };
        if cfg.forwards.is_empty() {
            warn!("no forwards configured: the agent will connect but publish nothing (add --forward [PORT=]TARGET)");
        }
        let tracker = TaskTracker::new();
        let mut attempt = 0u32;
        let mut ever_connected = false;
        loop {
            let dialing = Instant::now();
            let dialed = tokio::select! {
                _ = shutdown.cancelled() => break,
                r = connect(&cfg, tls.clone(), &self.tally) => r,
            };
            let why = match dialed {
                Ok(started) => {
                    let session = started.session.clone();
                    self.tally.handshake_took(dialing.elapsed());
                    let generation = self.status.borrow().sessions;
                    let scheme = gateway_url(&cfg).map_or("?", |u| u.scheme.name());
                    let meta = SessionMeta::new(generation, &cfg.gateway, scheme, session.clone());
                    self.tally.session_up("", meta);
                    ever_connected = true;
                    attempt = 0;
                    self.status.send_modify(|s| {
                        s.connected = true;
                        s.sessions += 1;
                        s.last_error = None;
                        s.failed_attempts = 0;
                        s.next_retry = None;
                    });
                    let end = serve(
                        &cfg,
                        started,
                        &self.status,
                        &tracker,
                        &shutdown,
                        &self.tally,
                    )
                    .await;
                    let ended = session.end().unwrap_or_else(|| session::SessionEnd {
                        code: ErrorCode::Shutdown,
                        detail: end.clone(),
                        by_peer: false,
                    });
                    self.tally.session_down("", generation, &ended);
                    self.status.send_modify(|s| {
                        s.connected = false;
                        s.forwards
                            .iter_mut()
                            .for_each(|f| *f = ForwardStatus::Pending);
                    });
                    if shutdown.is_cancelled() {
                        drain(&tracker, cfg.grace).await;
                        session.close(ErrorCode::Shutdown, "agent shutting down");
                        // Give the GoAway a moment to leave.
                        let _ = tokio::time::timeout(Duration::from_millis(500), session.closed())
                            .await;
                        return Ok(());
                    }
                    self.status
                        .send_modify(|s| s.last_error = Some(end.clone()));
                    format!("session ended: {end}")
                }
                Err(e) => {
                    if e.fatal && !ever_connected {
                        return Err(AgentError(e.message));
                    }
                    self.status
                        .send_modify(|s| s.last_error = Some(e.message.clone()));
                    self.tally.agent_error("", &e.message);
                    e.message
                }
            };
            let delay = backoff_delay(
                attempt,
                BACKOFF_BASE,
                cfg.max_backoff,
                0.5 + fastrand::f64() / 2.0,
            );
            attempt = attempt.saturating_add(1);
            // Whole milliseconds: "next attempt in 1s 234ms", not in nanoseconds.
            let shown = Duration::from_millis(u64::try_from(delay.as_millis()).unwrap_or(u64::MAX));
            warn!(
                gateway = %cfg.gateway,
                "{why}; next attempt in {}",
                humantime::format_duration(shown)
            );
            debug!(?delay, attempt, "waiting before reconnecting");
            self.status.send_modify(|s| {
                s.failed_attempts = attempt;
                s.next_retry = Some(delay);
            });
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(delay) => {}
            }
            self.status.send_modify(|s| s.next_retry = None);
        }
        drain(&tracker, cfg.grace).await;
        Ok(())
    }
}

async fn drain(tracker: &TaskTracker, grace: Duration) {
    tracker.close();
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        warn!("grace period over; closing the remaining streams");
    }
}

/// Dial, TLS, handshake: a live session or a described error.
async fn connect(
    cfg: &AgentConfig,
    tls: Option<Arc<rustls::ClientConfig>>,
    tally: &Tally,
) -> Result<session::Started, transport::DialError> {
    let handshake_deadline = cfg.limits.handshake_timeout;
    let attempt = async {
        let url = gateway_url(cfg)?;
        let mut conn = transport::dial(&url, &cfg.trust, tls, cfg.server_name.as_deref()).await?;
        let limits = cfg.limits.stream_limits();
        let (ok, leftover) = handshake::client_bound(
            &mut conn.io,
            &cfg.key,
            Role::Agent,
            &conn.bindings,
            Some(limits),
        )
        .await
        .map_err(|e| describe_handshake(cfg, e))?;
        info!(gateway = %cfg.gateway, name = %ok.name, "connected to gateway");
        tally.set_name("", &ok.name);
        let started = session::start(
            conn.io,
            leftover,
            Side::Client,
            ok.params,
            cfg.gateway.clone(),
        );
        Ok(started)
    };
    tokio::time::timeout(handshake_deadline, attempt)
        .await
        .map_err(|_| transport::DialError {
            message: format!(
                "gateway {} did not finish the handshake within {handshake_deadline:?}",
                cfg.gateway
            ),
            fatal: false,
        })?
}

/// The gateway URL to dial: `gateway` as parsed, with the older `--transport tcp` turning a
/// bare `HOST:PORT` into plain TCP.
fn gateway_url(cfg: &AgentConfig) -> Result<transport::GatewayUrl, transport::DialError> {
    let mut url = transport::GatewayUrl::parse(&cfg.gateway).map_err(|e| transport::DialError {
        message: e.to_string(),
        fatal: true,
    })?;
    if matches!(cfg.trust, Trust::Plain) && url.scheme == transport::Scheme::Tls {
        url.scheme = transport::Scheme::Tcp;
    }
    Ok(url)
}

fn describe_handshake(cfg: &AgentConfig, e: handshake::HandshakeError) -> transport::DialError {
    use handshake::HandshakeError::*;
    match e {
        Rejected { code: ErrorCode::AuthFailed, message } => transport::DialError {
            message: format!(
                "gateway {} rejected the key ({message}): check --key / BURROW_KEY / `key` in the agent config; it must be a key the gateway accepts (`burrow gateway --print-agent-line` on the gateway's host prints a working `burrow agent` line, and `burrow keygen --hash` shows a key's hash for the gateway's `[[agents]]`)",
                cfg.gateway
            ),
            fatal: true,
        },
        Rejected { code, message } => transport::DialError {
            message: format!("gateway {} refused the session: {message} ({code})", cfg.gateway),
            // A wrong version or a transport the listener does not take (Protocol) is a
            // setting to fix, not a hiccup.
            fatal: matches!(code, ErrorCode::UnsupportedVersion | ErrorCode::Protocol),
        },
        Protocol(p) => transport::DialError {
            message: format!("gateway {} broke the protocol: {p}; is it a burrow gateway of the same version?", cfg.gateway),
            fatal: matches!(p.code, ErrorCode::UnsupportedVersion),
        },
        Io(io) => transport::DialError {
            message: format!("connection to gateway {} failed during the handshake: {io}", cfg.gateway),
            fatal: false,
        },
    }
}

/// Serves one session: binds every forward, relays streams, until the session ends or
/// `shutdown`. Returns why the session ended.
async fn serve(
    cfg: &Arc<AgentConfig>,
    started: session::Started,
    status: &watch::Sender<AgentStatus>,
    tracker: &TaskTracker,
    shutdown: &CancellationToken,
    tally: &Arc<Tally>,
) -> String {
    // No UDP services yet: `datagrams` is dropped, so a datagram is a protocol error.
    let session::Started {
        session,
        mut incoming,
        mut control,
        ..
    } = started;
    for (i, fwd) in cfg.forwards.iter().enumerate() {
        let bind = Bind {
            service: i as u32,
            protocol: Protocol::Tcp,
            port: fwd.public_port,
            name: fwd.name.clone(),
        };
        session.send_control(bind.to_frame());
    }
    let granted: Arc<std::sync::Mutex<Vec<bool>>> =
        Arc::new(std::sync::Mutex::new(vec![false; cfg.forwards.len()]));
    let pending = Arc::new(Semaphore::new(cfg.limits.max_pending_opens as usize));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return "shutdown".into(),
            end = session.closed() => return end.to_string(),
            frame = control.recv() => {
                let Some(frame) = frame else { continue };
                if frame.header.kind != Kind::BindResult {
                    session.close(ErrorCode::Protocol, format!("unexpected {:?} from the gateway", frame.header.kind));
                    continue;
                }
                match BindResult::decode(&frame.payload) {
                    Ok(res) => on_bind_result(cfg, &res, status, &granted),
                    Err(e) => session.close(e.code, e.detail),
                }
            }
            stream = incoming.recv() => {
                let Some(stream) = stream else { continue };
                accept_stream(cfg, stream, &granted, &pending, tracker, tally);
            }
        }
    }
}

fn on_bind_result(
    cfg: &AgentConfig,
    res: &BindResult,
    status: &watch::Sender<AgentStatus>,
    granted: &std::sync::Mutex<Vec<bool>>,
) {
    let idx = res.service as usize;
    let Some(fwd) = cfg.forwards.get(idx) else {
        warn!(
            service = res.service,
            "gateway answered a bind we never asked for; ignored"
        );
        return;
    };
    let ok = res.code == ErrorCode::Normal;
    if let Some(g) = granted
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get_mut(idx)
    {
        *g = ok;
    }
    let new = if ok {
        let public = public_address(&res.text, &cfg.gateway);
        info!(forward = %fwd.name, dest = %fwd.target, %public, "forward is live");
        ForwardStatus::Granted(public)
    } else {
        warn!(forward = %fwd.name, "gateway refused the forward: {} ({})", res.text, res.code);
        ForwardStatus::Refused(format!("{} ({})", res.text, res.code))
    };
    status.send_modify(|s| {
        if let Some(f) = s.forwards.get_mut(idx) {
            *f = new;
        }
    });
}

/// The address clients use: what the gateway granted, with a wildcard host (`0.0.0.0`,
/// `[::]`) replaced by the host this agent dialed, since that one is known to reach it.
fn public_address(granted: &str, gateway: &str) -> String {
    match granted.parse::<std::net::SocketAddr>() {
        Ok(addr) if addr.ip().is_unspecified() => {
            let host = transport::host_part(gateway);
            if host.contains(':') {
                format!("[{host}]:{}", addr.port())
            } else {
                format!("{host}:{}", addr.port())
            }
        }
        _ => granted.to_string(),
    }
}

/// Checks a stream the gateway opened against our own configuration and relays it.
fn accept_stream(
    cfg: &Arc<AgentConfig>,
    stream: Stream,
    granted: &std::sync::Mutex<Vec<bool>>,
    pending: &Arc<Semaphore>,
    tracker: &TaskTracker,
    tally: &Arc<Tally>,
) {
    let service = stream.info().service as usize;
    let client = stream.info().client;
    let allowed = granted
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(service)
        .copied()
        .unwrap_or(false);
    let Some(fwd) = cfg.forwards.get(service).filter(|_| allowed).cloned() else {
        let name = cfg.forwards.get(service).map_or(OTHER, |f| f.name.as_str());
        tally.refused("", name, Refused::NotAllowed);
        warn!(
            service,
            "gateway opened a stream for a service that is not configured here; refused"
        );
        stream.reset(ErrorCode::TargetNotAllowed);
        return;
    };
    // At most `max_pending_opens` connects run at once; the rest wait for a permit inside
    // their task (bounded by the session's stream limit and `connect_timeout`), so a burst
    // of opens is queued, not refused.
    let pending = pending.clone();
    let timeout = cfg.connect_timeout;
    // The client's address as written (a field without a value is left out).
    let span = tracing::info_span!(
        "stream",
        forward = %fwd.name,
        client = client.map(tracing::field::display)
    );
    let meter = tally.stream("", &fwd.name);
    let tally = tally.clone();
    tracker.spawn(
        async move {
            let started = Instant::now();
            let connect = async {
                let permit = pending.acquire_owned().await;
                (connect_target(&fwd).await, permit)
            };
            let mut local = match tokio::time::timeout(timeout, connect).await {
                Ok((Ok(local), permit)) => {
                    drop(permit);
                    local
                }
                Ok((Err(e), _)) => {
                    let (code, why) = if e.kind() == std::io::ErrorKind::ConnectionRefused {
                        (ErrorCode::ConnectRefused, Refused::ConnectRefused)
                    } else {
                        (ErrorCode::ConnectFailed, Refused::ConnectFailed)
                    };
                    tally.refused("", &fwd.name, why);
                    warn!(dest = %fwd.target, "cannot connect to target: {e}");
                    stream.reset(code);
                    return;
                }
                Err(_) => {
                    tally.refused("", &fwd.name, Refused::ConnectTimeout);
                    warn!(dest = %fwd.target, "connecting to target timed out after {timeout:?} (connect_timeout)");
                    stream.reset(ErrorCode::ConnectFailed);
                    return;
                }
            };
            debug!(dest = %fwd.target, "stream opened");
            let stats = relay::relay_metered(&stream, &mut local, Some(meter.meter(false))).await;
            relay::log_end(&fwd.name, client, &stats, started, relay::LocalIs::Target);
        }
        .instrument(span),
    );
}

async fn connect_target(fwd: &Forward) -> std::io::Result<Local> {
    match &fwd.target {
        Target::Tcp { host, port } => {
            let tcp = TcpStream::connect((host.as_str(), *port)).await?;
            transport::tune(&tcp);
            Ok(Local::Tcp(tcp))
        }
        Target::Unix(path) => Ok(Local::Unix(UnixStream::connect(path).await?)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcard_public_host_becomes_the_gateway_host() {
        assert_eq!(
            public_address("0.0.0.0:4000", "gw.example.com:7443"),
            "gw.example.com:4000"
        );
        assert_eq!(
            public_address("[::]:4000", "[2001:db8::1]:7443"),
            "[2001:db8::1]:4000"
        );
        assert_eq!(
            public_address("192.0.2.1:4000", "gw:7443"),
            "192.0.2.1:4000"
        );
        assert_eq!(
            public_address("gw.example.com:4000", "x:1"),
            "gw.example.com:4000"
        );
    }

    #[test]
    fn backoff_grows_caps_and_jitters() {
        let base = Duration::from_millis(500);
        let max = Duration::from_secs(30);
        assert_eq!(backoff_delay(0, base, max, 1.0), base);
        assert_eq!(backoff_delay(3, base, max, 1.0), Duration::from_secs(4));
        assert_eq!(backoff_delay(30, base, max, 1.0), max);
        assert_eq!(backoff_delay(30, base, max, 0.5), max / 2);
        // Jitter outside [0.5, 1] is clamped.
        assert_eq!(backoff_delay(0, base, max, 0.0), base / 2);
    }
}
