//! The gateway role: accepts agent sessions on the tunnel port and opens the public ports
//! their grants allow.
//!
//! Per agent (known by its key hash) the gateway keeps one live session and a table of
//! public ports. A newer session from the same agent replaces the old one. When a session
//! drops, its ports stay bound and reserved for the lease period, so the agent gets the same
//! ports back when it returns; clients arriving meanwhile are closed at once.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant as StdInstant;

use burrow_proto::auth::{KeyHash, SecretKey};
use burrow_proto::message::{Bind, BindResult, Open, Protocol, Role, SessionParams};
use burrow_proto::mux::Side;
use burrow_proto::{ErrorCode, Kind};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn, Instrument};

use crate::config::{AgentGrant, GatewayConfig, KeySpec, PortRange, TransportKind};
use crate::limiter::AuthLimiter;
use crate::relay::{self, Local};
use crate::session::{self, handshake, Session};
use crate::stats::{bump, GatewayStats, GaugeGuard};
use crate::tls::{self, GatewayIdentity};
use crate::transport;

/// Errors that stop a gateway, phrased for the user.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct GatewayError(pub String);

/// Name of the agent that uses the generated key.
pub const DEFAULT_AGENT_NAME: &str = "default";

/// A bound gateway, ready to [`Gateway::run`].
pub struct Gateway {
    listener: TcpListener,
    identity: Option<GatewayIdentity>,
    generated: Option<SecretKey>,
    /// Whether `generated` was made by this start (rather than read from the state).
    generated_now: bool,
    hub: Arc<Hub>,
}

/// State shared by the gateway's tasks.
struct Hub {
    config: GatewayConfig,
    params: SessionParams,
    grants: HashMap<KeyHash, Arc<AgentGrant>>,
    agents: Mutex<HashMap<String, AgentEntry>>,
    limiter: Mutex<AuthLimiter>,
    /// Relays and sessions; drained at shutdown.
    tracker: TaskTracker,
    /// Cancelled at shutdown: stops listeners.
    stop: CancellationToken,
    generation: std::sync::atomic::AtomicU64,
    stats: Arc<GatewayStats>,
}

#[derive(Default)]
struct AgentEntry {
    session: Option<(u64, Session)>,
    ports: HashMap<(Protocol, String), PortEntry>,
}

struct PortEntry {
    addr: SocketAddr,
    route: Arc<Mutex<Option<Route>>>,
    /// Stops this port's listener.
    cancel: CancellationToken,
}

#[derive(Clone)]
struct Route {
    session: Session,
    service: u32,
    name: String,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Gateway {
    /// Checks the state directory ([`crate::state::check_gateway_state`]), loads or creates
    /// the state (certificate, generated key), binds the tunnel listener.
    pub async fn bind(config: GatewayConfig) -> Result<Gateway, GatewayError> {
        crate::state::check_gateway_state(&config).map_err(|e| GatewayError(e.to_string()))?;
        let identity = match config.transport {
            TransportKind::Tcp => None,
            TransportKind::Tls => Some(load_identity(&config)?),
        };
        let mut agents = config.agents.clone();
        let mut generated = None;
        let mut generated_now = false;
        if agents.is_empty() {
            let (key, created) = crate::state::load_or_create_agent_key(&config.state_dir)
                .map_err(|e| GatewayError(e.to_string()))?;
            if created {
                info!(dir = %config.state_dir.display(), "generated a new agent key");
            }
            generated_now = created;
            agents.push(AgentGrant {
                name: DEFAULT_AGENT_NAME.into(),
                key: KeySpec::Key(key.clone()),
                ports: vec![PortRange::UNPRIVILEGED],
            });
            generated = Some(key);
        }
        let mut grants = HashMap::new();
        for grant in agents {
            let hash = grant.key.hash();
            if let Some(prev) = grants.insert(hash, Arc::new(grant)) {
                return Err(GatewayError(format!(
                    "agents `{}` and another entry share the same key: give each agent its own key (`burrow keygen`)",
                    prev.name
                )));
            }
        }
        let listener = TcpListener::bind(config.listen).await.map_err(|e| {
            GatewayError(format!(
                "cannot listen on {}: {e}{}",
                config.listen,
                if e.kind() == std::io::ErrorKind::AddrInUse {
                    " (another process uses this port: stop it or pass --listen with another port)"
                } else {
                    ""
                }
            ))
        })?;
        if config.transport == TransportKind::Tcp {
            warn!("plain TCP transport: the tunnel is NOT encrypted; use it only behind a TLS-terminating proxy");
        }
        let params = config.session_params();
        Ok(Gateway {
            listener,
            identity,
            generated,
            generated_now,
            hub: Arc::new(Hub {
                config,
                params,
                grants,
                agents: Mutex::new(HashMap::new()),
                limiter: Mutex::new(AuthLimiter::default()),
                tracker: TaskTracker::new(),
                stop: CancellationToken::new(),
                generation: std::sync::atomic::AtomicU64::new(0),
                stats: Arc::new(GatewayStats::default()),
            }),
        })
    }

    /// The gateway's counters (shared: they keep counting while it runs).
    pub fn stats(&self) -> Arc<GatewayStats> {
        self.hub.stats.clone()
    }

    /// The tunnel listener's address.
    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().unwrap_or(self.hub.config.listen)
    }

    /// `SHA256:<hex>` of the certificate, or `None` on plain TCP.
    pub fn fingerprint(&self) -> Option<String> {
        self.identity
            .as_ref()
            .map(|i| tls::fingerprint_string(&i.fingerprint))
    }

    /// The `burrow agent ...` line for the generated key, when the gateway uses one (see
    /// [`crate::agent_line`]).
    pub fn agent_line(&self) -> Option<crate::agent_line::AgentLine> {
        let key = self.generated.clone()?;
        let public_name = self.hub.config.public_name.as_deref();
        Some(crate::agent_line::AgentLine::new(
            public_name,
            self.local_addr(),
            key,
            self.fingerprint(),
        ))
    }

    /// Whether this start made the generated key (so nobody has seen it yet).
    pub fn key_created(&self) -> bool {
        self.generated_now
    }

    /// Serves until `shutdown` is cancelled; then stops accepting, lets streams drain for the
    /// grace period, and closes every session.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), GatewayError> {
        let hub = self.hub;
        let acceptor = self
            .identity
            .map(|i| tokio_rustls::TlsAcceptor::from(i.server_config));
        let preauth = Arc::new(Semaphore::new(hub.config.limits.max_preauth as usize));
        info!(listen = %self.listener.local_addr().map_err(|e| GatewayError(e.to_string()))?, "gateway listening for agents");
        loop {
            let (tcp, peer) = tokio::select! {
                _ = shutdown.cancelled() => break,
                r = self.listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        // Out of file descriptors and the like: back off briefly, keep serving.
                        warn!("accept on tunnel port failed: {e}");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            if !lock(&hub.limiter).allowed(peer.ip(), StdInstant::now()) {
                bump(&hub.stats.rate_limited);
                debug!(%peer, "refused: too many failed handshakes from this address");
                continue;
            }
            let Ok(permit) = preauth.clone().try_acquire_owned() else {
                bump(&hub.stats.preauth_refused);
                debug!(%peer, "refused: too many connections still in their handshake");
                continue;
            };
            let hub2 = hub.clone();
            let acceptor = acceptor.clone();
            hub.tracker.spawn(async move {
                let accepted = tokio::time::timeout(
                    hub2.config.limits.handshake_timeout,
                    handshake_agent(&hub2, tcp, peer, acceptor.as_ref()),
                )
                .await;
                drop(permit);
                match accepted {
                    Ok(Ok((conn, acc))) => serve_agent(hub2, conn, acc, peer).await,
                    Ok(Err(e)) => {
                        bump(&hub2.stats.handshake_failures);
                        lock(&hub2.limiter).failure(peer.ip(), StdInstant::now());
                        warn!(%peer, "tunnel handshake failed: {e}");
                    }
                    Err(_) => {
                        bump(&hub2.stats.handshake_failures);
                        lock(&hub2.limiter).failure(peer.ip(), StdInstant::now());
                        warn!(%peer, "tunnel handshake timed out after {:?}", hub2.config.limits.handshake_timeout);
                    }
                }
            });
        }
        drop(self.listener);
        info!(
            "shutting down: no new connections; draining streams for up to {:?}",
            hub.config.grace
        );
        hub.stop.cancel();
        hub.tracker.close();
        if tokio::time::timeout(hub.config.grace, wait_for_relays(&hub))
            .await
            .is_err()
        {
            warn!("grace period over; closing the remaining streams");
        }
        let sessions: Vec<Session> = lock(&hub.agents)
            .values()
            .filter_map(|a| a.session.as_ref().map(|(_, s)| s.clone()))
            .collect();
        for s in sessions {
            s.close(ErrorCode::Shutdown, "gateway shutting down");
        }
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), hub.tracker.wait()).await;
        Ok(())
    }
}

/// Waits until no session carries a stream.
async fn wait_for_relays(hub: &Hub) {
    loop {
        let busy: usize = lock(&hub.agents)
            .values()
            .filter_map(|a| a.session.as_ref())
            .map(|(_, s)| s.stream_count())
            .sum();
        if busy == 0 {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

fn load_identity(config: &GatewayConfig) -> Result<GatewayIdentity, GatewayError> {
    match (&config.tls_cert, &config.tls_key) {
        (Some(cert), Some(key)) => {
            tls::load_identity_files(cert, key).map_err(|e| GatewayError(e.to_string()))
        }
        (None, None) => {
            let mut names = vec![config.listen.ip().to_string()];
            if let Some(n) = &config.public_name {
                names.push(n.clone());
            }
            tls::load_or_create_identity(&config.state_dir, &names)
                .map_err(|e| GatewayError(e.to_string()))
        }
        _ => Err(GatewayError(
            "tls_cert and tls_key go together: set both, or neither for a self-signed certificate"
                .into(),
        )),
    }
}

async fn handshake_agent(
    hub: &Hub,
    tcp: TcpStream,
    peer: SocketAddr,
    acceptor: Option<&tokio_rustls::TlsAcceptor>,
) -> Result<(transport::Connected, handshake::Accepted), String> {
    let mut conn = transport::accept(tcp, peer, acceptor)
        .await
        .map_err(|e| format!("TLS: {e}"))?;
    let binding = conn.binding;
    let accepted = handshake::server(&mut conn.io, &binding, |key, role| {
        match (hub.grants.get(key), role) {
            (Some(grant), Role::Agent) => {
                handshake::Verdict::Accept(grant.name.clone(), hub.params)
            }
            (Some(_), Role::Connector) => handshake::Verdict::Refuse(
                ErrorCode::AuthFailed,
                "this key is an agent key; connectors are not enabled on this gateway".into(),
            ),
            (None, _) => handshake::Verdict::Refuse(
                ErrorCode::AuthFailed,
                "key not accepted by this gateway".into(),
            ),
        }
    })
    .await
    .map_err(|e| match e {
        handshake::HandshakeError::Rejected { message, .. } => {
            format!("authentication failed: {message}")
        }
        other => other.to_string(),
    })?;
    Ok((conn, accepted))
}

async fn serve_agent(
    hub: Arc<Hub>,
    conn: transport::Connected,
    acc: handshake::Accepted,
    peer: SocketAddr,
) {
    lock(&hub.limiter).success(peer.ip());
    let Some(grant) = hub.grants.get(&acc.key).cloned() else {
        return;
    };
    let name = acc.name.clone();
    let span = tracing::info_span!("agent", name = %name);
    async move {
        let started = session::start(conn.io, acc.leftover, Side::Gateway, acc.params, name.clone());
        let session = started.session;
        // This version opens streams only from the gateway; agent-opened streams are refused.
        drop(started.incoming);
        let generation = hub
            .generation
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let old = lock(&hub.agents)
            .entry(name.clone())
            .or_default()
            .session
            .replace((generation, session.clone()));
        if let Some((_, old)) = old {
            info!("agent reconnected; replacing its previous session");
            old.close(ErrorCode::Replaced, "replaced by a newer session of the same agent");
        }
        bump(&hub.stats.sessions);
        let _live = GaugeGuard::new(&hub.stats.active_sessions);
        info!(%peer, key = %acc.key.short(), "agent connected");
        let mut control = started.control;
        // Ports are kept across sessions by service name; one session may use a name once.
        let mut bound_names = std::collections::HashSet::new();
        let mut binds_seen = 0usize;
        loop {
            tokio::select! {
                frame = control.recv() => match frame {
                    Some(f) if f.header.kind == Kind::Bind => {
                        match Bind::decode(&f.payload) {
                            Ok(_) if { binds_seen += 1; binds_seen > burrow_proto::message::MAX_BINDS } => {
                                session.close(ErrorCode::LimitExceeded, format!("more than {} bind requests in one session", burrow_proto::message::MAX_BINDS));
                            }
                            Ok(bind) if !bound_names.insert(bind.name.clone()) => {
                                let text = format!("another service of this agent is already named `{}`", bind.name);
                                warn!(service = %bind.name, "bind refused: {text}");
                                session.send_control(BindResult { service: bind.service, code: ErrorCode::PortInUse, text }.to_frame());
                            }
                            Ok(bind) => {
                                let result = bind_port(&hub, &grant, &session, &bind).await;
                                session.send_control(result.to_frame());
                            }
                            Err(e) => session.close(e.code, e.detail),
                        }
                    }
                    Some(f) => session.close(ErrorCode::Protocol, format!("unexpected {:?} from an agent", f.header.kind)),
                    None => break,
                },
                _ = session.closed() => break,
            }
        }
        let end = session.closed().await;
        if !end.by_peer
            && matches!(
                end.code,
                ErrorCode::Protocol | ErrorCode::FrameTooLarge | ErrorCode::FlowControl | ErrorCode::LimitExceeded
            )
        {
            bump(&hub.stats.protocol_errors);
        }
        info!(reason = %end, "agent session ended");
        release(&hub, &name, generation);
    }
    .instrument(span)
    .await
}

/// After a session ends: unroute its ports and start their leases.
fn release(hub: &Arc<Hub>, name: &str, generation: u64) {
    let mut agents = lock(&hub.agents);
    let Some(entry) = agents.get_mut(name) else {
        return;
    };
    if !matches!(entry.session, Some((g, _)) if g == generation) {
        // A newer session already took over.
        return;
    }
    entry.session = None;
    for port in entry.ports.values() {
        *lock(&port.route) = None;
    }
    let hub = hub.clone();
    let name = name.to_string();
    let lease = hub.config.lease;
    tokio::spawn(async move {
        tokio::select! {
            _ = tokio::time::sleep(lease) => {}
            _ = hub.stop.cancelled() => return,
        }
        let mut agents = lock(&hub.agents);
        if let Some(entry) = agents.get_mut(&name) {
            if entry.session.is_none() {
                for (_, port) in entry.ports.drain() {
                    info!(agent = %name, addr = %port.addr, "lease expired; public port closed");
                    port.cancel.cancel();
                }
            }
        }
    });
}

fn public_text(hub: &Hub, addr: SocketAddr) -> String {
    match &hub.config.public_name {
        Some(name) => format!("{name}:{}", addr.port()),
        None => addr.to_string(),
    }
}

async fn bind_port(
    hub: &Arc<Hub>,
    grant: &AgentGrant,
    session: &Session,
    bind: &Bind,
) -> BindResult {
    let refuse = |code: ErrorCode, text: String| {
        warn!(service = %bind.name, "bind refused: {text}");
        BindResult {
            service: bind.service,
            code,
            text,
        }
    };
    if bind.protocol != Protocol::Tcp {
        return refuse(
            ErrorCode::PortNotGranted,
            "UDP services are not supported by this gateway version".into(),
        );
    }
    if !grant.allows(bind.port) {
        return refuse(
            ErrorCode::PortNotGranted,
            format!(
                "port {} is not granted to agent `{}` (granted: {})",
                bind.port,
                grant.name,
                describe_ports(&grant.ports)
            ),
        );
    }
    let route = Route {
        session: session.clone(),
        service: bind.service,
        name: bind.name.clone(),
    };
    let key = (bind.protocol, bind.name.clone());
    // A leased port for the same service comes back as it was.
    {
        let mut agents = lock(&hub.agents);
        let entry = agents.entry(grant.name.clone()).or_default();
        if let Some(existing) = entry.ports.get(&key) {
            if bind.port == 0 || bind.port == existing.addr.port() {
                *lock(&existing.route) = Some(route);
                let text = public_text(hub, existing.addr);
                info!(service = %bind.name, public = %text, "public port granted (kept from lease)");
                return BindResult {
                    service: bind.service,
                    code: ErrorCode::Normal,
                    text,
                };
            }
            if let Some(old) = entry.ports.remove(&key) {
                old.cancel.cancel();
            }
        }
        if bind.port != 0 && entry.ports.values().any(|p| p.addr.port() == bind.port) {
            return refuse(
                ErrorCode::PortInUse,
                format!(
                    "port {} is already used by another service of this agent",
                    bind.port
                ),
            );
        }
    }
    let listener = match listen_public(hub.config.public_host, bind.port, grant).await {
        Ok(l) => l,
        Err(text) => {
            let code = if text.contains("in use") {
                ErrorCode::PortInUse
            } else {
                ErrorCode::PortNotGranted
            };
            return refuse(code, text);
        }
    };
    let addr = match listener.local_addr() {
        Ok(a) => a,
        Err(e) => return refuse(ErrorCode::Internal, e.to_string()),
    };
    let route = Arc::new(Mutex::new(Some(route)));
    let cancel = hub.stop.child_token();
    lock(&hub.agents)
        .entry(grant.name.clone())
        .or_default()
        .ports
        .insert(
            key,
            PortEntry {
                addr,
                route: route.clone(),
                cancel: cancel.clone(),
            },
        );
    tokio::spawn(
        accept_public(hub.clone(), listener, route, cancel).instrument(tracing::Span::current()),
    );
    let text = public_text(hub, addr);
    info!(service = %bind.name, public = %text, "public port granted");
    BindResult {
        service: bind.service,
        code: ErrorCode::Normal,
        text,
    }
}

fn describe_ports(ports: &[PortRange]) -> String {
    let parts: Vec<String> = ports
        .iter()
        .map(|r| {
            if r.start == r.end {
                r.start.to_string()
            } else {
                format!("{}-{}", r.start, r.end)
            }
        })
        .collect();
    if parts.is_empty() {
        "none".into()
    } else {
        parts.join(", ")
    }
}

/// Binds a public port: the one asked for, or for port 0 one inside the agent's grant.
async fn listen_public(host: IpAddr, port: u16, grant: &AgentGrant) -> Result<TcpListener, String> {
    let in_use = |p: u16| {
        format!(
            "port {p} on {host} is in use on the gateway: pick another port or stop what uses it"
        )
    };
    if port != 0 {
        return TcpListener::bind((host, port)).await.map_err(|e| {
            if e.kind() == std::io::ErrorKind::AddrInUse {
                in_use(port)
            } else {
                format!("cannot bind {host}:{port}: {e}")
            }
        });
    }
    // Let the OS pick when that lands inside the grant (the usual case: the default grant
    // covers the whole ephemeral range).
    if let Ok(l) = TcpListener::bind((host, 0)).await {
        if l.local_addr().is_ok_and(|a| grant.allows(a.port())) {
            return Ok(l);
        }
    }
    let mut tried = 0;
    for range in &grant.ports {
        for p in range.start.max(1)..=range.end {
            if tried >= 4096 {
                break;
            }
            tried += 1;
            if let Ok(l) = TcpListener::bind((host, p)).await {
                return Ok(l);
            }
        }
    }
    Err(format!(
        "no free port in the agent's grant ({}) on {host}",
        describe_ports(&grant.ports)
    ))
}

async fn accept_public(
    hub: Arc<Hub>,
    listener: TcpListener,
    route: Arc<Mutex<Option<Route>>>,
    cancel: CancellationToken,
) {
    let mut refusals = LogThrottle::default();
    loop {
        let (tcp, client) = tokio::select! {
            _ = cancel.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    warn!("accept on public port failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Some(route) = lock(&route).clone() else {
            bump(&hub.stats.no_session);
            debug!(%client, "no agent session for this port right now; closing the connection");
            continue;
        };
        transport::tune(&tcp);
        let open = Open {
            service: route.service,
            client: Some(client),
        };
        let stream = match route.session.open(&open) {
            Ok(s) => s,
            Err(e) => {
                bump(&hub.stats.streams_refused);
                if let Some(skipped) = refusals.allow(Instant::now()) {
                    warn!(%client, service = %route.name, similar_since_last = skipped, "connection refused: {e}");
                }
                let _ = socket2::SockRef::from(&tcp).set_linger(Some(std::time::Duration::ZERO));
                continue;
            }
        };
        bump(&hub.stats.streams);
        let hub2 = hub.clone();
        hub.tracker.spawn(
            async move {
                let _live = GaugeGuard::new(&hub2.stats.active_streams);
                let started = Instant::now();
                let mut local = Local::Tcp(tcp);
                let stats = relay::relay(&stream, &mut local).await;
                relay::log_end(
                    &route.name,
                    Some(client),
                    &stats,
                    started,
                    relay::LocalIs::Client,
                );
            }
            .instrument(tracing::Span::current()),
        );
    }
}

/// Lets a repeating warning through at most once a second, counting the ones held back, so
/// a burst of refusals is one log line, not thousands.
#[derive(Debug, Default)]
struct LogThrottle {
    last: Option<Instant>,
    held_back: u64,
}

impl LogThrottle {
    /// `Some(n)` when this one may be logged, `n` being how many were held back since.
    fn allow(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(last)
                if now.saturating_duration_since(last) < std::time::Duration::from_secs(1) =>
            {
                self.held_back += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.held_back))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttle_lets_one_through_per_second_and_counts_the_rest() {
        let t0 = Instant::now();
        let mut t = LogThrottle::default();
        assert_eq!(t.allow(t0), Some(0));
        for _ in 0..5 {
            assert_eq!(t.allow(t0), None);
        }
        assert_eq!(t.allow(t0 + std::time::Duration::from_secs(1)), Some(5));
    }
}
