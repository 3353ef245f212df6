//! The agent role: dials the gateway, authenticates, asks for its public ports, and relays
//! each stream the gateway opens to the matching local target.
//!
//! The gateway only names a service id in each Open; the target comes from the agent's own
//! configuration, and only services the gateway granted accept streams. So whatever the
//! gateway asks, the agent connects nowhere else.
//!
//! Reconnection: after a session ends, the agent waits an exponentially growing, jittered
//! delay (capped by `max_backoff`) and dials again, forever. An error on the very first
//! attempt that retrying cannot fix (key refused, rate-limited for earlier failures,
//! certificate mismatch, version mismatch) stops the agent, so a typo is reported at once
//! instead of retried silently; later, a rate-limited agent waits as long as the gateway asks.
//! Two more things stop it at any time: another agent with the same key taking its session
//! over [`MAX_REPLACED`] times in a row (each within [`REPLACED_WITHIN`] of connecting; it
//! backs off between them), and every forward refused for a reason that asking again cannot
//! change (port not granted).
//!
//! Forwards the gateway refuses for a reason that may pass (port in use, a limit) are asked
//! for again in the same session, after [`BIND_RETRY_BASE`] doubling up to `max_backoff`.

use std::collections::HashMap;
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
use crate::session::{self, handshake, SessionEnd, Stream};
use crate::transport;
use crate::udp;

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
    /// One entry per configured forward: for one the gateway refused for a reason that may
    /// pass (its port in use, a limit), the pause before it is asked for again.
    pub forward_retries: Vec<Option<Duration>>,
}

impl AgentStatus {
    /// How many forwards are published (granted) now.
    pub fn published(&self) -> usize {
        self.forwards
            .iter()
            .filter(|f| matches!(f, ForwardStatus::Granted(_)))
            .count()
    }
}

/// First reconnect delay.
pub const BACKOFF_BASE: Duration = Duration::from_millis(500);
/// First pause before a refused forward is asked for again; it doubles up to `max_backoff`.
pub const BIND_RETRY_BASE: Duration = Duration::from_secs(1);
/// Takeovers in a row by another agent with the same key after which the agent stops.
pub const MAX_REPLACED: u32 = 3;
/// A takeover counts toward [`MAX_REPLACED`] when it comes this soon after the session began;
/// a session that lasted longer starts the count again.
pub const REPLACED_WITHIN: Duration = Duration::from_secs(60);

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
            forward_retries: vec![None; config.forwards.len()],
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

    /// Runs until `shutdown`, reconnecting forever once a session has succeeded, except when
    /// nothing can be published or another agent with the same key keeps taking over (see
    /// the module docs).
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
        // The way to the gateway is decided once: the environment is read at start, as the
        // process was given it.
        let url = gateway_url(&cfg).map_err(|e| AgentError(e.message))?;
        let route = transport::proxy::route(&cfg.proxy, &url, |k| std::env::var(k).ok())
            .map_err(|e| AgentError(e.to_string()))?;
        info!(gateway = %url, "connecting {}", route.reason);
        let proxy = route.proxy;
        let tracker = TaskTracker::new();
        let mut attempt = 0u32;
        let mut ever_connected = false;
        // Sessions in a row that another agent with our key took over soon after they began.
        let mut replaced = 0u32;
        loop {
            let dialing = Instant::now();
            let dialed = tokio::select! {
                _ = shutdown.cancelled() => break,
                r = connect(&cfg, &url, proxy.as_ref(), tls.clone(), &self.tally) => r,
            };
            // At least this long before the next attempt (what a rate limit asks for).
            let mut at_least = Duration::ZERO;
            let why = match dialed {
                Ok(started) => {
                    let session = started.session.clone();
                    let began = Instant::now();
                    self.tally.handshake_took(dialing.elapsed());
                    let generation = self.status.borrow().sessions;
                    let meta = SessionMeta::new(
                        generation,
                        &cfg.gateway,
                        url.scheme.name(),
                        session.clone(),
                    );
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
                    let ended = serve(
                        &cfg,
                        started,
                        &self.status,
                        &tracker,
                        &shutdown,
                        &self.tally,
                    )
                    .await;
                    let for_tally = session.end().unwrap_or_else(|| session::SessionEnd {
                        code: ErrorCode::Shutdown,
                        detail: "agent stopping".into(),
                        by_peer: false,
                        lost: false,
                    });
                    self.tally.session_down("", generation, &for_tally);
                    self.status.send_modify(|s| {
                        s.connected = false;
                        s.forwards
                            .iter_mut()
                            .for_each(|f| *f = ForwardStatus::Pending);
                        s.forward_retries.iter_mut().for_each(|r| *r = None);
                    });
                    if shutdown.is_cancelled() {
                        drain(&tracker, cfg.grace).await;
                        session.close(ErrorCode::Shutdown, "agent shutting down");
                        // Give the GoAway a moment to leave.
                        let _ = tokio::time::timeout(Duration::from_millis(500), session.closed())
                            .await;
                        return Ok(());
                    }
                    let end = match ended {
                        Ended::Session(end) => end,
                        Ended::NothingToPublish(why) => {
                            session.close(
                                ErrorCode::Normal,
                                "agent stopping: every forward was refused",
                            );
                            let _ =
                                tokio::time::timeout(Duration::from_millis(500), session.closed())
                                    .await;
                            drain(&tracker, cfg.grace).await;
                            self.status
                                .send_modify(|s| s.last_error = Some(why.clone()));
                            return Err(AgentError(why));
                        }
                    };
                    let text = end.to_string();
                    let by = (end.by_peer && end.code == ErrorCode::Replaced)
                        .then(|| replaced_by(&end.detail));
                    match by {
                        Some(by) if began.elapsed() < REPLACED_WITHIN => {
                            replaced += 1;
                            let by = by.unwrap_or("an unknown address").to_string();
                            if replaced >= MAX_REPLACED {
                                let why = format!(
                                    "another agent with this key is connected from {by}: it took over this agent's session {replaced} times in a row, so this agent stops. Stop the other agent (a stale copy, an old container), or give each agent its own key (`burrow keygen`, and an [[agents]] entry on the gateway)"
                                );
                                self.status
                                    .send_modify(|s| s.last_error = Some(why.clone()));
                                drain(&tracker, cfg.grace).await;
                                return Err(AgentError(why));
                            }
                            // Back off as after failures, so two agents with one key do not
                            // take the session from each other several times a second.
                            attempt = replaced;
                            self.status
                                .send_modify(|s| s.last_error = Some(text.clone()));
                            format!("session taken over by another agent with this key, connected from {by} ({replaced} of {MAX_REPLACED} in a row before this agent stops)")
                        }
                        _ => {
                            replaced = 0;
                            self.status
                                .send_modify(|s| s.last_error = Some(text.clone()));
                            // A lost connection reads "connection lost: what happened".
                            format!("session ended: {text}")
                        }
                    }
                }
                Err(e) => {
                    if e.fatal && !ever_connected {
                        return Err(AgentError(e.message));
                    }
                    if let Some(after) = e.retry_after {
                        at_least = after;
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
            )
            .max(at_least);
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

/// How a served session ended.
enum Ended {
    /// The session is over (or `shutdown` was cancelled).
    Session(SessionEnd),
    /// Every forward was refused for good: the agent stops with this message.
    NothingToPublish(String),
}

/// The text of the GoAway a session gets when another agent with its key takes over,
/// naming the newcomer's address, which the replaced agent reads back for its message.
pub fn replaced_message(by: std::net::SocketAddr) -> String {
    format!("another agent with this key connected from {by} and took over this session")
}

/// The address a [`replaced_message`] names.
fn replaced_by(detail: &str) -> Option<&str> {
    let rest = &detail[detail.find(" connected from ")? + " connected from ".len()..];
    rest.split_whitespace().next()
}

async fn drain(tracker: &TaskTracker, grace: Duration) {
    tracker.close();
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        warn!("grace period over; closing the remaining streams");
    }
}

/// Why an attempt to connect failed.
#[derive(Debug)]
struct Failure {
    /// What went wrong and what to check.
    message: String,
    /// Whether retrying cannot help (the agent stops when it never had a session).
    fatal: bool,
    /// How long the gateway asked us to wait before trying again.
    retry_after: Option<Duration>,
}

impl From<transport::DialError> for Failure {
    fn from(e: transport::DialError) -> Self {
        Failure {
            message: e.message,
            fatal: e.fatal,
            retry_after: None,
        }
    }
}

/// Dial (through `proxy`, if any), TLS, handshake: a live session or a described error.
async fn connect(
    cfg: &AgentConfig,
    url: &transport::GatewayUrl,
    proxy: Option<&transport::ProxyUrl>,
    tls: Option<Arc<rustls::ClientConfig>>,
    tally: &Tally,
) -> Result<session::Started, Failure> {
    let handshake_deadline = cfg.limits.handshake_timeout;
    let attempt = async {
        let mut conn =
            transport::dial(url, proxy, &cfg.trust, tls, cfg.server_name.as_deref()).await?;
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
        .map_err(|_| Failure {
            message: format!(
                "gateway {}{} did not finish the handshake within {handshake_deadline:?}",
                cfg.gateway,
                proxy.map_or(String::new(), |p| format!(" (through proxy {p})"))
            ),
            fatal: false,
            retry_after: None,
        })?
}

/// The gateway URL to dial: `gateway` as parsed, with the older `--transport tcp` turning a
/// bare `HOST:PORT` into plain TCP.
fn gateway_url(cfg: &AgentConfig) -> Result<transport::GatewayUrl, Failure> {
    let mut url = transport::GatewayUrl::parse(&cfg.gateway).map_err(|e| Failure {
        message: e.to_string(),
        fatal: true,
        retry_after: None,
    })?;
    if matches!(cfg.trust, Trust::Plain) && url.scheme == transport::Scheme::Tls {
        url.scheme = transport::Scheme::Tcp;
    }
    Ok(url)
}

fn describe_handshake(cfg: &AgentConfig, e: handshake::HandshakeError) -> Failure {
    use handshake::HandshakeError::*;
    let failure = |message: String, fatal: bool| Failure {
        message,
        fatal,
        retry_after: None,
    };
    match e {
        Rejected { code: ErrorCode::AuthFailed, message } => failure(
            format!(
                "gateway {} rejected the key ({message}): check --key / BURROW_KEY / `key` in the agent config; it must be a key the gateway accepts (`burrow gateway --print-agent-line` on the gateway's host prints a working `burrow agent` line, and `burrow keygen --hash` shows a key's hash for the gateway's `[[agents]]`)",
                cfg.gateway
            ),
            true,
        ),
        // Stops a fresh agent like a rejected key (its earlier attempts failed); one that had
        // a session waits as long as the gateway asks.
        Rejected { code: ErrorCode::RateLimited, message } => Failure {
            retry_after: handshake::retry_after(&message),
            message: format!(
                "gateway {} refused the session: {message}; check --key / BURROW_KEY / `key` in the agent config",
                cfg.gateway
            ),
            fatal: true,
        },
        Rejected { code, message } => failure(
            format!("gateway {} refused the session: {message} ({code})", cfg.gateway),
            // A wrong version or a transport the listener does not take (Protocol) is a
            // setting to fix, not a hiccup.
            matches!(code, ErrorCode::UnsupportedVersion | ErrorCode::Protocol),
        ),
        Protocol(p) => failure(
            format!("gateway {} broke the protocol: {p}; is it a burrow gateway of the same version?", cfg.gateway),
            matches!(p.code, ErrorCode::UnsupportedVersion),
        ),
        Io(io) => failure(
            format!("connection to gateway {} failed during the handshake: {io}", cfg.gateway),
            false,
        ),
    }
}

/// What the agent knows of one forward in the current session.
#[derive(Debug, Clone, Default)]
struct Binding {
    /// Refused for good (port not granted), with the gateway's reason.
    refused_for_good: Option<String>,
    /// Refusals in a row for a reason that may pass.
    refusals: u32,
    /// When to ask for it again.
    retry_at: Option<Instant>,
}

/// Serves one session: binds every forward, asks again for refused ones with backoff, relays
/// streams, until the session ends or `shutdown`.
async fn serve(
    cfg: &Arc<AgentConfig>,
    started: session::Started,
    status: &watch::Sender<AgentStatus>,
    tracker: &TaskTracker,
    shutdown: &CancellationToken,
    tally: &Arc<Tally>,
) -> Ended {
    let session::Started {
        session,
        mut incoming,
        mut control,
        datagrams,
    } = started;
    let bind = |i: usize| {
        let fwd = &cfg.forwards[i];
        let bind = Bind {
            service: i as u32,
            protocol: fwd.protocol,
            port: fwd.public_port,
            name: fwd.name.clone(),
        };
        session.send_control(bind.to_frame());
    };
    (0..cfg.forwards.len()).for_each(bind);
    let mut bindings = vec![Binding::default(); cfg.forwards.len()];
    let granted: Arc<std::sync::Mutex<Vec<bool>>> =
        Arc::new(std::sync::Mutex::new(vec![false; cfg.forwards.len()]));
    // UDP forwards: their flows, each with a socket toward the target. Without any, the
    // receiver is dropped and a datagram from the gateway is a protocol error.
    let udp_services: HashMap<u32, udp::UdpService> = cfg
        .forwards
        .iter()
        .enumerate()
        .filter(|(_, f)| f.protocol == Protocol::Udp)
        .filter_map(|(i, f)| match &f.target {
            Target::Tcp { host, port } => Some((
                i as u32,
                udp::UdpService {
                    name: f.name.clone(),
                    host: host.clone(),
                    port: *port,
                    counters: Arc::default(),
                },
            )),
            Target::Unix(_) => None,
        })
        .collect();
    if udp_services.is_empty() {
        drop(datagrams);
    } else {
        tracker.spawn(udp::serve_agent_flows(
            session.clone(),
            datagrams,
            udp_services,
            granted.clone(),
            cfg.udp,
        ));
    }
    let pending = Arc::new(Semaphore::new(cfg.limits.max_pending_opens as usize));
    loop {
        let next_retry = bindings.iter().filter_map(|b| b.retry_at).min();
        tokio::select! {
            _ = shutdown.cancelled() => return Ended::Session(SessionEnd {
                code: ErrorCode::Shutdown,
                detail: "shutdown".into(),
                by_peer: false,
                lost: false,
            }),
            end = session.closed() => return Ended::Session(end),
            _ = sleep_until(next_retry), if next_retry.is_some() => {
                let now = Instant::now();
                for (i, b) in bindings.iter_mut().enumerate() {
                    if b.retry_at.is_some_and(|t| t <= now) {
                        b.retry_at = None;
                        info!(forward = %cfg.forwards[i].name, "asking the gateway again for the forward it refused");
                        bind(i);
                    }
                }
                status.send_modify(|s| {
                    for (r, b) in s.forward_retries.iter_mut().zip(&bindings) {
                        if b.retry_at.is_none() {
                            *r = None;
                        }
                    }
                });
            }
            frame = control.recv() => {
                let Some(frame) = frame else { continue };
                if frame.header.kind != Kind::BindResult {
                    session.close(ErrorCode::Protocol, format!("unexpected {:?} from the gateway", frame.header.kind));
                    continue;
                }
                match BindResult::decode(&frame.payload) {
                    Ok(res) => {
                        on_bind_result(cfg, &res, status, &granted, &mut bindings);
                        if let Some(why) = nothing_to_publish(cfg, &bindings) {
                            return Ended::NothingToPublish(why);
                        }
                    }
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

async fn sleep_until(at: Option<Instant>) {
    if let Some(at) = at {
        tokio::time::sleep_until(at).await;
    }
}

/// When every forward has been refused for good: why, for the agent's exit message.
fn nothing_to_publish(cfg: &AgentConfig, bindings: &[Binding]) -> Option<String> {
    if bindings.is_empty() || bindings.iter().any(|b| b.refused_for_good.is_none()) {
        return None;
    }
    let reasons: Vec<String> = cfg
        .forwards
        .iter()
        .zip(bindings)
        .map(|(f, b)| {
            format!(
                "forward {}: {}",
                f.name,
                b.refused_for_good.as_deref().unwrap_or("")
            )
        })
        .collect();
    Some(format!(
        "nothing to publish: the gateway refused every forward, for reasons retrying cannot change ({}); ask the gateway's operator to grant the ports (`ports` of this agent's [[agents]] entry), or change --forward",
        reasons.join("; ")
    ))
}

fn on_bind_result(
    cfg: &AgentConfig,
    res: &BindResult,
    status: &watch::Sender<AgentStatus>,
    granted: &std::sync::Mutex<Vec<bool>>,
    bindings: &mut [Binding],
) {
    let idx = res.service as usize;
    let (Some(fwd), Some(binding)) = (cfg.forwards.get(idx), bindings.get_mut(idx)) else {
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
    binding.retry_at = None;
    let mut retry = None;
    let new = if ok {
        binding.refusals = 0;
        let public = public_address(&res.text, &cfg.gateway);
        info!(forward = %fwd.name, dest = %fwd.target, %public, "forward is live");
        ForwardStatus::Granted(public)
    } else {
        let why = format!("{} ({})", res.text, res.code);
        if res.code == ErrorCode::PortNotGranted {
            // The grant is the gateway's config: asking again changes nothing.
            warn!(forward = %fwd.name, "gateway refused the forward: {why}; not asking again in this session");
            binding.refused_for_good = Some(why.clone());
        } else {
            // A port in use may be freed, a limit may have room later.
            let delay = backoff_delay(
                binding.refusals,
                BIND_RETRY_BASE,
                cfg.max_backoff.max(BIND_RETRY_BASE),
                0.5 + fastrand::f64() / 2.0,
            );
            binding.refusals = binding.refusals.saturating_add(1);
            binding.retry_at = Some(Instant::now() + delay);
            retry = Some(delay);
            warn!(forward = %fwd.name, "gateway refused the forward: {why}; asking again in {delay:.1?}");
        }
        ForwardStatus::Refused(why)
    };
    status.send_modify(|s| {
        if let Some(f) = s.forwards.get_mut(idx) {
            *f = new;
        }
        if let Some(r) = s.forward_retries.get_mut(idx) {
            *r = retry;
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
    let fwd = cfg
        .forwards
        .get(service)
        .filter(|f| allowed && f.protocol == Protocol::Tcp);
    let Some(fwd) = fwd.cloned() else {
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
