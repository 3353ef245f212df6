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
//! A key the gateway revoked (or whose token expired) stops the agent whenever it is told so.
//!
//! The forwards can change while it runs ([`AgentHandle::reload`]): the session binds the
//! added ones and gives the removed ones back, leaving the others alone.
//!
//! Private services (`--private NAME=TARGET`) have no public port: they are announced to the
//! gateway, and reached only by connectors. Every connector stream is checked here again,
//! against those services and the `allow` patterns, whatever the gateway asked.
//!
//! Several gateways: the agent keeps a session with each (its *uplinks*), publishes the same
//! forwards on each, and reconnects to each on its own, with its own backoff. Every log line
//! of an uplink is in a `gateway` span naming it, and each has its own [`AgentStatus`]. The
//! rules above that stop the agent stop one uplink; the agent stops when every uplink has
//! stopped so.
//!
//! The parts: `dial` (reaching the gateway and describing what failed), `forwards` (one
//! session's binds and streams, and reloads), `private` (private services, allowed targets,
//! and the connectors' streams) and `admin` (what the admin server reads).

use std::sync::Arc;
use std::time::Duration;

use burrow_proto::ErrorCode;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn, Instrument};

mod admin;
mod dial;
mod forwards;
mod private;

use dial::{connect, gateway_url};
use forwards::serve;

use crate::admin::api::ReloadReport;
use crate::admin::metrics::{SessionMeta, Tally};
use crate::config::{AgentConfig, Forward, GatewayEndpoint, Trust};
use crate::session::{self, SessionEnd};
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

/// The agent's view of its session with one gateway, for status and tests.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AgentStatus {
    /// A session is up.
    pub connected: bool,
    /// Sessions established so far.
    pub sessions: u64,
    /// One entry per configured forward, in order: its name.
    pub names: Vec<String>,
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
    /// Why the agent gave up on this gateway for good (it carries on with its others).
    pub stopped: Option<String>,
    /// When the session came up, went down or was given up on (none before the first).
    pub since: Option<std::time::SystemTime>,
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
    /// One per gateway, in the order of [`AgentConfig::gateways`].
    statuses: Vec<Arc<watch::Sender<AgentStatus>>>,
    /// What the admin server shows beyond the statuses.
    tally: Arc<Tally>,
    /// The forwards in force (a reload changes them).
    forwards: Arc<watch::Sender<Arc<Vec<Forward>>>>,
}

impl Agent {
    /// An agent with `config`.
    pub fn new(config: AgentConfig) -> Agent {
        let statuses = config
            .gateways()
            .iter()
            .map(|_| {
                let status = AgentStatus {
                    names: config.forwards.iter().map(|f| f.name.clone()).collect(),
                    forwards: vec![ForwardStatus::Pending; config.forwards.len()],
                    forward_retries: vec![None; config.forwards.len()],
                    ..AgentStatus::default()
                };
                Arc::new(watch::channel(status).0)
            })
            .collect();
        let (forwards, _) = watch::channel(Arc::new(config.forwards.clone()));
        Agent {
            config,
            statuses,
            tally: Arc::new(Tally::new("agent")),
            forwards: Arc::new(forwards),
        }
    }

    /// What the admin server ([`crate::admin`]) shows of this agent.
    pub fn report(&self) -> Arc<dyn crate::admin::Report> {
        Arc::new(admin::AgentReport {
            config: self.config.clone(),
            statuses: self.statuses(),
            tally: self.tally.clone(),
            forwards: self.forwards.subscribe(),
        })
    }

    /// A handle that changes the running agent's forwards ([`AgentHandle::reload`]), on
    /// every gateway.
    pub fn handle(&self) -> AgentHandle {
        AgentHandle {
            config: Arc::new(self.config.clone()),
            statuses: self.statuses.clone(),
            forwards: self.forwards.clone(),
        }
    }

    /// Watches the agent's status with its (first) gateway.
    pub fn status(&self) -> watch::Receiver<AgentStatus> {
        self.statuses[0].subscribe()
    }

    /// Watches the agent's status with each gateway, in the order of
    /// [`AgentConfig::gateways`].
    pub fn statuses(&self) -> Vec<watch::Receiver<AgentStatus>> {
        self.statuses.iter().map(|s| s.subscribe()).collect()
    }

    /// Runs until `shutdown`, reconnecting to each gateway forever once a session with it has
    /// succeeded, except when nothing can be published there or another agent with the same
    /// key keeps taking over (see the module docs). Stops with an error when every gateway has
    /// failed for good.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), AgentError> {
        let cfg = Arc::new(self.config);
        if cfg.forwards.is_empty() && cfg.private.is_empty() {
            warn!("no forwards configured: the agent will connect but publish nothing (add --forward [PORT=]TARGET)");
        }
        let gateways = cfg.gateways();
        let several = gateways.len() > 1;
        // Uplinks still running, for the message of one that gives up.
        let running = &std::sync::atomic::AtomicUsize::new(gateways.len());
        let uplinks = gateways.into_iter().zip(&self.statuses).map(|(gw, status)| {
            let span = tracing::info_span!("gateway", gateway = %gw.gateway);
            let link = Uplink {
                cfg: cfg.clone(),
                gw,
                status,
                tally: &self.tally,
                forwards: &self.forwards,
                tracker: TaskTracker::new(),
            };
            let shutdown = shutdown.clone();
            async move {
                let ended = link.run(&shutdown).await;
                let left = running.fetch_sub(1, std::sync::atomic::Ordering::Relaxed) - 1;
                if let Err(e) = &ended {
                    link.status.send_modify(|s| {
                        s.stopped = Some(e.0.clone());
                        s.since = Some(std::time::SystemTime::now());
                    });
                    if several && left > 0 {
                        error!("{e}; the agent stops trying this gateway and carries on with the {left} others");
                    }
                }
                ended.map_err(|e| (link.gw.gateway, e))
            }
            .instrument(span)
        });
        let ended = futures_util::future::join_all(uplinks).await;
        let failed: Vec<(String, AgentError)> = ended.into_iter().filter_map(Result::err).collect();
        match failed.len() {
            0 => Ok(()),
            // Stopped by a signal, or some still ran until then.
            n if n < cfg.gateways().len() => Ok(()),
            1 => Err(failed
                .into_iter()
                .next()
                .map_or(AgentError(String::new()), |(_, e)| e)),
            _ => Err(AgentError(format!(
                "every gateway failed: {}",
                failed
                    .iter()
                    .map(|(g, e)| format!("gateway {g}: {e}"))
                    .collect::<Vec<_>>()
                    .join("; ")
            ))),
        }
    }
}

/// The agent's session with one gateway, and what it needs to keep it.
struct Uplink<'a> {
    cfg: Arc<AgentConfig>,
    gw: GatewayEndpoint,
    status: &'a watch::Sender<AgentStatus>,
    tally: &'a Arc<Tally>,
    /// The forwards in force, which every uplink follows.
    forwards: &'a watch::Sender<Arc<Vec<Forward>>>,
    /// Its streams, drained when it stops.
    tracker: TaskTracker,
}

impl Uplink<'_> {
    /// Dials, serves and redials this gateway until `shutdown`, or an error that retrying
    /// cannot fix.
    async fn run(&self, shutdown: &CancellationToken) -> Result<(), AgentError> {
        let cfg = &self.cfg;
        let gw = &self.gw;
        let tally = self.tally;
        let tracker = &self.tracker;
        let mut forwards = self.forwards.subscribe();
        let tls = match &gw.trust {
            Trust::Plain => {
                warn!("plain transport (tcp:// or ws://): the tunnel is NOT encrypted; use it only behind a TLS-terminating proxy");
                None
            }
            trust => Some(crate::tls::client_config(trust).map_err(|e| AgentError(e.to_string()))?),
        };
        // The way to the gateway is decided once: the environment is read at start, as the
        // process was given it.
        let url = gateway_url(gw).map_err(|e| AgentError(e.message))?;
        let route = transport::proxy::route(&cfg.proxy, &url, |k| std::env::var(k).ok())
            .map_err(|e| AgentError(e.to_string()))?;
        info!("connecting {}", route.reason);
        let proxy = route.proxy;
        let mut attempt = 0u32;
        let mut ever_connected = false;
        // Sessions in a row that another agent with our key took over soon after they began.
        let mut replaced = 0u32;
        loop {
            let dialing = Instant::now();
            let dialed = tokio::select! {
                _ = shutdown.cancelled() => break,
                r = connect(cfg, gw, &url, proxy.as_ref(), tls.clone(), tally) => r,
            };
            // At least this long before the next attempt (what a rate limit asks for).
            let mut at_least = Duration::ZERO;
            let why = match dialed {
                Ok((started, features)) => {
                    let session = started.session.clone();
                    let began = Instant::now();
                    tally.handshake_took(dialing.elapsed());
                    let generation = self.status.borrow().sessions;
                    let meta = SessionMeta::new(
                        generation,
                        &gw.gateway,
                        carried_by(url.scheme, &session),
                        session.clone(),
                    );
                    tally.session_up(&gw.gateway, meta);
                    ever_connected = true;
                    attempt = 0;
                    self.status.send_modify(|s| {
                        s.connected = true;
                        s.since = Some(std::time::SystemTime::now());
                        s.sessions += 1;
                        s.last_error = None;
                        s.failed_attempts = 0;
                        s.next_retry = None;
                    });
                    let ended = serve(
                        cfg,
                        &gw.gateway,
                        started,
                        features & burrow_proto::message::FEATURE_UNBIND != 0,
                        &mut forwards,
                        self.status,
                        tracker,
                        shutdown,
                        tally,
                    )
                    .await;
                    let for_tally = session.end().unwrap_or_else(|| session::SessionEnd {
                        code: ErrorCode::Shutdown,
                        detail: "agent stopping".into(),
                        by_peer: false,
                        lost: false,
                    });
                    tally.session_down(&gw.gateway, generation, &for_tally);
                    self.status.send_modify(|s| {
                        s.connected = false;
                        s.since = Some(std::time::SystemTime::now());
                        // The refusals it stops on stay: they are its last answer.
                        if !matches!(ended, Ended::NothingToPublish(_)) {
                            s.forwards
                                .iter_mut()
                                .for_each(|f| *f = ForwardStatus::Pending);
                        }
                        s.forward_retries.iter_mut().for_each(|r| *r = None);
                    });
                    if shutdown.is_cancelled() {
                        drain(tracker, cfg.grace).await;
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
                            drain(tracker, cfg.grace).await;
                            self.status
                                .send_modify(|s| s.last_error = Some(why.clone()));
                            return Err(AgentError(why));
                        }
                    };
                    if end.by_peer && end.code == ErrorCode::KeyRevoked {
                        let why =
                            format!("gateway {} closed the session: {}", gw.gateway, end.detail);
                        self.status
                            .send_modify(|s| s.last_error = Some(why.clone()));
                        drain(tracker, cfg.grace).await;
                        return Err(AgentError(why));
                    }
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
                                drain(tracker, cfg.grace).await;
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
                    if e.fatal && (!ever_connected || e.for_good) {
                        self.status
                            .send_modify(|s| s.last_error = Some(e.message.clone()));
                        tally.agent_error(&gw.gateway, &e.message);
                        return Err(AgentError(e.message));
                    }
                    if let Some(after) = e.retry_after {
                        at_least = after;
                    }
                    self.status
                        .send_modify(|s| s.last_error = Some(e.message.clone()));
                    tally.agent_error(&gw.gateway, &e.message);
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
        drain(tracker, cfg.grace).await;
        Ok(())
    }
}

/// Changes a running agent's forwards.
#[derive(Clone)]
pub struct AgentHandle {
    /// The settings it started with.
    config: Arc<AgentConfig>,
    /// One per gateway: a reload changes the forwards on each.
    statuses: Vec<Arc<watch::Sender<AgentStatus>>>,
    forwards: Arc<watch::Sender<Arc<Vec<Forward>>>>,
}

impl std::fmt::Debug for AgentHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AgentHandle")
    }
}

impl AgentHandle {
    /// Makes `new`'s forwards the ones in force: the session binds the added ones and gives
    /// the removed ones back (a changed forward is both); reports the other settings that
    /// changed as needing a restart, and leaves them as they were.
    pub fn reload(&self, new: AgentConfig) -> Result<ReloadReport, String> {
        let old = self.forwards.borrow().clone();
        let mut changes = Vec::new();
        for f in old.iter().filter(|f| !new.forwards.contains(f)) {
            changes.push(format!("forward {} removed", f.name));
        }
        for f in new.forwards.iter().filter(|f| !old.contains(f)) {
            changes.push(format!("forward {} added", f.name));
        }
        let unchanged = old.iter().filter(|f| new.forwards.contains(f)).count();
        if *old != new.forwards {
            let list = Arc::new(new.forwards.clone());
            self.forwards.send_replace(list.clone());
            // Every gateway's session follows the list. A session shows the new list itself
            // once it follows it; between sessions, show it now.
            for status in &self.statuses {
                status.send_modify(|s| {
                    if s.connected {
                        return;
                    }
                    s.names = list.iter().map(|f| f.name.clone()).collect();
                    s.forwards = vec![ForwardStatus::Pending; list.len()];
                    s.forward_retries = vec![None; list.len()];
                });
            }
        }
        Ok(ReloadReport {
            file: String::new(),
            changes,
            unchanged,
            restart_needed: restart_needed(&self.config, &new),
        })
    }
}

/// The settings of `new` that differ from `old` and take a restart (all but the forwards;
/// private services and `allow` among them).
/// Every field is named, so that a new setting cannot be left out of this list unnoticed.
fn restart_needed(old: &AgentConfig, new: &AgentConfig) -> Vec<String> {
    let AgentConfig {
        gateway,
        key,
        trust,
        server_name,
        extra_gateways,
        proxy,
        forwards: _,
        limits,
        max_backoff,
        connect_timeout,
        grace,
        udp,
        key_file,
        admin,
        private,
    } = new;
    let mut out = Vec::new();
    let mut differs = |same: bool, key: &str| {
        if !same {
            out.push(key.to_string());
        }
    };
    differs(*gateway == old.gateway, "gateway");
    differs(key.hash() == old.key.hash(), "key");
    differs(*key_file == old.key_file, "key_file");
    differs(*trust == old.trust, "fingerprint/ca");
    differs(*server_name == old.server_name, "server_name");
    differs(*extra_gateways == old.extra_gateways, "gateways");
    differs(*proxy == old.proxy, "proxy");
    differs(*limits == old.limits, "limits");
    differs(*max_backoff == old.max_backoff, "max_backoff");
    differs(*connect_timeout == old.connect_timeout, "connect_timeout");
    differs(*grace == old.grace, "grace");
    differs(*udp == old.udp, "udp");
    // Private services are announced once per session, and every connector stream is
    // checked against the list the agent started with.
    differs(private.services == old.private.services, "private");
    differs(private.allow == old.private.allow, "allow");
    differs(admin.listen == old.admin.listen, "admin");
    differs(admin.token == old.admin.token, "admin_token");
    out
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
/// The transport the status shows for a session dialled with `scheme`: for `auto://`, the
/// carrier it settled on (`quic`, or `tls` after falling back), not `auto`.
fn carried_by(scheme: transport::Scheme, session: &session::Session) -> &'static str {
    match (scheme, session.as_quic()) {
        (transport::Scheme::Auto, Some(_)) => "quic",
        (transport::Scheme::Auto, None) => "tls",
        (scheme, _) => scheme.name(),
    }
}

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

/// How a failed connect to a target is answered to the gateway and counted: refused by the
/// target's host, or failed (unreachable, timed out, ...).
fn connect_failure(
    e: &std::io::Error,
) -> (burrow_proto::ErrorCode, crate::admin::metrics::Refused) {
    use crate::admin::metrics::Refused;
    use burrow_proto::ErrorCode;
    if e.kind() == std::io::ErrorKind::ConnectionRefused {
        (ErrorCode::ConnectRefused, Refused::ConnectRefused)
    } else {
        (ErrorCode::ConnectFailed, Refused::ConnectFailed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
