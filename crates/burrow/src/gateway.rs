//! The gateway role: accepts agent sessions on the tunnel port and opens the public ports
//! their grants allow.
//!
//! Per agent (known by its key hash) the gateway keeps one live session and a table of
//! public ports. A newer session from the same agent replaces the old one. When a session
//! drops or is replaced, its ports stay bound and reserved for the lease period, so the agent
//! gets the same ports back when it returns; clients arriving meanwhile are closed at once.
//! A port that no session has bound again when its lease runs out is closed, whether or not
//! the agent has a session by then. One agent holds at most `max_ports_per_agent` ports,
//! bound or on lease; a new bind past that closes the port longest on lease.
//!
//! What an unauthenticated source can hold is bounded: a slot in the pre-auth table (at most
//! `max_preauth`, `max_preauth_per_source` per address), which a connection that has sent
//! nothing gives up to a newcomer when the table is full ([`PreauthTable`]). Public
//! connections are capped per agent and per gateway, and together with the public listeners
//! they may use only the descriptors left after a reserve for the tunnel port, so agents can
//! always log in ([`limiter::share_descriptors`]).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant as StdInstant;

use burrow_proto::auth::{KeyHash, SecretKey};
use burrow_proto::message::{Bind, BindResult, Open, Protocol, Role, SessionParams};
use burrow_proto::mux::Side;
use burrow_proto::{ErrorCode, Kind};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn, Instrument};

mod admin;

use crate::admin::metrics::{AuthFailure, Refused, SessionMeta, Tally};
use crate::config::{AgentGrant, GatewayConfig, KeySpec, PortRange, TransportKind};
use crate::limiter::{self, AuthLimiter, FdBudget, FdPermit, PreauthTable, Refusal, Stage};
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
    /// `ws_listen`: WebSocket only, plain HTTP, behind a TLS-terminating proxy.
    ws_listener: Option<TcpListener>,
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
    /// Connections in their handshake; the token closes one that has to give way.
    preauth: Mutex<PreauthTable<(CancellationToken, SocketAddr)>>,
    /// Public connections on the whole gateway (`max_public_conns`).
    public_conns: Arc<Semaphore>,
    /// Descriptors public connections and public listeners may use: the open-file limit less
    /// what the process held at start and the reserve for the tunnel port.
    public_fds: Arc<FdBudget>,
    /// How the open-file limit is shared (see [`limiter::share_descriptors`]).
    fds: limiter::Shares,
    /// Refused public connections, refused and evicted tunnel connections: one warning a
    /// second each.
    public_log: Mutex<LogThrottle>,
    preauth_log: Mutex<LogThrottle>,
    evict_log: Mutex<LogThrottle>,
    /// Relays and sessions; drained at shutdown.
    tracker: TaskTracker,
    /// Cancelled at shutdown: stops listeners.
    stop: CancellationToken,
    generation: AtomicU64,
    /// Ids of leases, in the order they started.
    leases: AtomicU64,
    stats: Arc<GatewayStats>,
    /// What the admin server shows beyond `stats`.
    tally: Arc<Tally>,
}

struct AgentEntry {
    session: Option<(u64, Session)>,
    ports: HashMap<(Protocol, String), PortEntry>,
    /// Public connections to this agent's ports (`max_public_conns_per_agent`).
    conns: Arc<Semaphore>,
}

impl AgentEntry {
    fn new(limits: &crate::config::Limits) -> Self {
        AgentEntry {
            session: None,
            ports: HashMap::new(),
            conns: Arc::new(semaphore(limits.max_public_conns_per_agent)),
        }
    }
}

struct PortEntry {
    addr: SocketAddr,
    route: Arc<Mutex<Option<Route>>>,
    /// Stops this port's listener.
    cancel: CancellationToken,
    /// The generation of the session that bound it, while one routes it.
    owner: Option<u64>,
    /// The lease it is on while no session routes it (ids grow: the smallest is the oldest).
    lease: Option<u64>,
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

/// A semaphore of `permits` (at most what tokio allows).
fn semaphore(permits: u32) -> Semaphore {
    Semaphore::new(
        usize::try_from(permits).map_or(Semaphore::MAX_PERMITS, |p| p.min(Semaphore::MAX_PERMITS)),
    )
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
        let ws_listener = match config.ws_listen {
            Some(addr) => Some(TcpListener::bind(addr).await.map_err(|e| {
                GatewayError(format!(
                    "cannot listen on {addr} (ws_listen): {e}{}",
                    if e.kind() == std::io::ErrorKind::AddrInUse {
                        " (another process uses this port: stop it or pick another --ws-listen)"
                    } else {
                        ""
                    }
                ))
            })?),
            None => None,
        };
        if config.transport == TransportKind::Tcp {
            warn!("plain TCP transport: the tunnel is NOT encrypted; use it only behind a TLS-terminating proxy");
        }
        let params = config.session_params();
        let limits = &config.limits;
        let files = limiter::raise_open_files();
        let hard = if files.hard == u64::MAX {
            "unlimited".to_string()
        } else {
            files.hard.to_string()
        };
        match (&files.error, files.soft > files.was) {
            (Some(e), _) => warn!(
                "open-file limit: soft {}, hard {hard}; raising the soft limit failed: {e}",
                files.soft
            ),
            (None, true) => info!(
                "open-file limit: soft {} (raised from {}), hard {hard}",
                files.soft, files.was
            ),
            (None, false) => info!("open-file limit: soft {}, hard {hard}", files.soft),
        }
        // What the process holds now (the runtime, the log, the listener) stays held.
        let in_use = limiter::open_descriptors().unwrap_or(64);
        let fds = limiter::share_descriptors(files.soft, in_use, limits.max_preauth, grants.len());
        info!(
            "descriptors: {} for public connections and ports ({} of them kept for ports), {} kept for agent logins, {in_use} in use",
            fds.public, fds.ports, fds.tunnel
        );
        if fds.public < 256 {
            warn!(
                "only {} descriptors left for public connections and ports (open-file limit {}): raise the hard limit (`ulimit -Hn`, or LimitNOFILE= in a systemd unit)",
                fds.public, files.soft
            );
        }
        // In TCP mode every connection comes from the TLS-terminating proxy: no per-source cap.
        let per_source = match config.transport {
            TransportKind::Tls => Some(limits.max_preauth_per_source),
            TransportKind::Tcp => None,
        };
        let preauth = PreauthTable::new(limits.max_preauth as usize, per_source);
        let public_conns = semaphore(limits.max_public_conns);
        let agents = grants
            .values()
            .map(|g| (g.name.clone(), AgentEntry::new(limits)))
            .collect();
        Ok(Gateway {
            listener,
            ws_listener,
            identity,
            generated,
            generated_now,
            hub: Arc::new(Hub {
                params,
                grants,
                agents: Mutex::new(agents),
                limiter: Mutex::new(AuthLimiter::default()),
                preauth: Mutex::new(preauth),
                public_conns: Arc::new(public_conns),
                public_fds: FdBudget::new(fds.public),
                fds,
                public_log: Mutex::new(LogThrottle::default()),
                preauth_log: Mutex::new(LogThrottle::default()),
                evict_log: Mutex::new(LogThrottle::default()),
                tracker: TaskTracker::new(),
                stop: CancellationToken::new(),
                generation: AtomicU64::new(0),
                leases: AtomicU64::new(0),
                stats: Arc::new(GatewayStats::default()),
                tally: Arc::new(Tally::new("gateway")),
                config,
            }),
        })
    }

    /// The gateway's counters (shared: they keep counting while it runs).
    pub fn stats(&self) -> Arc<GatewayStats> {
        self.hub.stats.clone()
    }

    /// What the admin server ([`crate::admin`]) shows of this gateway.
    pub fn report(&self) -> Arc<dyn crate::admin::Report> {
        Arc::new(admin::GatewayReport(self.hub.clone(), self.local_addr()))
    }

    /// The tunnel listener's address.
    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().unwrap_or(self.hub.config.listen)
    }

    /// The address the `ws_listen` listener is bound to, if there is one.
    pub fn ws_local_addr(&self) -> Option<SocketAddr> {
        self.ws_listener.as_ref().and_then(|l| l.local_addr().ok())
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
        Some(
            crate::agent_line::AgentLine::new(
                public_name,
                self.local_addr(),
                key,
                self.fingerprint(),
            )
            .with_ws_path(&self.hub.config.ws_path),
        )
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
        info!(listen = %self.listener.local_addr().map_err(|e| GatewayError(e.to_string()))?, "gateway listening for agents");
        let ws = transport::ws::WsServer {
            path: hub.config.ws_path.clone(),
            trusted_proxies: hub.config.ws_trusted_proxies.clone(),
        };
        let tunnel = transport::Acceptor {
            tls: acceptor,
            ws: ws.clone(),
            ws_only: false,
        };
        let on_tunnel_port = accept_loop(hub.clone(), self.listener, tunnel, shutdown.clone());
        let on_ws_listener = async {
            if let Some(listener) = self.ws_listener {
                if let Ok(addr) = listener.local_addr() {
                    info!(listen = %addr, path = %ws.path, "gateway listening for WebSocket tunnels behind a TLS-terminating proxy");
                }
                let acceptor = transport::Acceptor {
                    tls: None,
                    ws,
                    ws_only: true,
                };
                accept_loop(hub.clone(), listener, acceptor, shutdown.clone()).await;
            }
        };
        tokio::join!(on_tunnel_port, on_ws_listener);
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

/// Takes tunnel connections on one listener until `shutdown`: the limiter, the pre-auth
/// table, then the handshake under its deadline, each connection in a task of its own.
async fn accept_loop(
    hub: Arc<Hub>,
    listener: TcpListener,
    acceptor: transport::Acceptor,
    shutdown: CancellationToken,
) {
    let acceptor = Arc::new(acceptor);
    let mut accept_errors = LogThrottle::default();
    loop {
        let (tcp, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors and the like: the connection waits in the
                    // backlog; pause instead of spinning on it, and say so once a second.
                    if let Some(skipped) = accept_errors.allow(Instant::now()) {
                        warn!(similar_since_last = skipped, "accept on tunnel port failed: {e}");
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // Behind a proxy (ws_listen) the TCP peer is the proxy: one agent's failures would
        // lock out every agent behind it, so the per-address failure budget applies only where
        // the peer is the client itself.
        let by_address = !acceptor.ws_only;
        if by_address && !lock(&hub.limiter).allowed(peer.ip(), StdInstant::now()) {
            bump(&hub.stats.rate_limited);
            hub.tally.auth_failure(AuthFailure::RateLimited, peer, "");
            debug!(%peer, "refused: too many failed handshakes from this address");
            continue;
        }
        let evict = CancellationToken::new();
        // Behind a proxy every connection comes from its address: no per-source cap there.
        let admitted =
            lock(&hub.preauth).admit_from(peer.ip(), (evict.clone(), peer), !acceptor.ws_only);
        let id = match admitted {
            Ok(a) => {
                if let Some((victim, victim_peer)) = a.evicted {
                    bump(&hub.stats.preauth_evicted);
                    victim.cancel();
                    if let Some(skipped) = lock(&hub.evict_log).allow(Instant::now()) {
                        warn!(peer = %victim_peer, similar_since_last = skipped, "tunnel connection closed: it had sent nothing and all {} pre-auth slots were taken (limits.max_preauth)", hub.config.limits.max_preauth);
                    }
                }
                a.id
            }
            Err(why) => {
                let (counter, text) = match why {
                    Refusal::Source => (
                        &hub.stats.preauth_source_refused,
                        format!(
                            "this address already has {} connections in their handshake (limits.max_preauth_per_source)",
                            hub.config.limits.max_preauth_per_source
                        ),
                    ),
                    Refusal::Full => (
                        &hub.stats.preauth_refused,
                        format!(
                            "all {} pre-auth slots are held by connections in their handshake (limits.max_preauth)",
                            hub.config.limits.max_preauth
                        ),
                    ),
                };
                bump(counter);
                if let Some(skipped) = lock(&hub.preauth_log).allow(Instant::now()) {
                    warn!(%peer, similar_since_last = skipped, "tunnel connection refused: {text}");
                }
                continue;
            }
        };
        let slot = PreauthSlot {
            hub: hub.clone(),
            id,
        };
        let hub2 = hub.clone();
        let acceptor = acceptor.clone();
        let transport = if acceptor.ws_only {
            "ws-listen"
        } else {
            hub.config.transport.as_str()
        };
        hub.tracker.spawn(async move {
            let accepted_at = Instant::now();
            let accepted = tokio::select! {
                _ = evict.cancelled() => {
                    // Not charged to the source: giving way is not a failure.
                    debug!(%peer, "tunnel connection closed: it had sent nothing and the pre-auth table is full");
                    return;
                }
                r = tokio::time::timeout(
                    hub2.config.limits.handshake_timeout,
                    handshake_agent(&hub2, tcp, peer, &acceptor, &slot),
                ) => r,
            };
            drop(slot);
            match accepted {
                Ok(Ok((conn, acc))) => {
                    let peer = conn.peer;
                    hub2.tally.handshake_took(accepted_at.elapsed());
                    serve_agent(hub2, conn, acc, peer, transport).await
                }
                Ok(Err((why, e))) => {
                    bump(&hub2.stats.handshake_failures);
                    hub2.tally.auth_failure(why, peer, &format!("tunnel handshake failed: {e}"));
                    if by_address {
                        lock(&hub2.limiter).failure(peer.ip(), StdInstant::now());
                    }
                    warn!(%peer, "tunnel handshake failed: {e}");
                }
                Err(_) => {
                    bump(&hub2.stats.handshake_failures);
                    hub2.tally.auth_failure(AuthFailure::Timeout, peer, "tunnel handshake timed out");
                    if by_address {
                        lock(&hub2.limiter).failure(peer.ip(), StdInstant::now());
                    }
                    warn!(%peer, "tunnel handshake timed out after {:?}", hub2.config.limits.handshake_timeout);
                }
            }
        });
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

/// A connection's slot in the pre-auth table, given back when dropped.
struct PreauthSlot {
    hub: Arc<Hub>,
    id: u64,
}

impl PreauthSlot {
    fn advance(&self, stage: Stage) {
        lock(&self.hub.preauth).advance(self.id, stage);
    }
}

impl Drop for PreauthSlot {
    fn drop(&mut self) {
        lock(&self.hub.preauth).remove(self.id);
    }
}

async fn handshake_agent(
    hub: &Hub,
    tcp: TcpStream,
    peer: SocketAddr,
    acceptor: &transport::Acceptor,
    slot: &PreauthSlot,
) -> Result<(transport::Connected, handshake::Accepted), (AuthFailure, String)> {
    let failed = |e: String| (AuthFailure::Handshake, e);
    // Every client speaks first (a TLS hello, a Burrow preamble, an HTTP request): until a
    // byte arrives, this connection has made no progress and gives way to a newcomer when the
    // table is full.
    match tcp.peek(&mut [0u8; 1]).await {
        Ok(0) => return Err(failed("closed before sending anything".into())),
        Ok(_) => {}
        Err(e) => return Err(failed(e.to_string())),
    }
    slot.advance(Stage::Talking);
    let mut conn = transport::accept(tcp, peer, acceptor)
        .await
        .map_err(|e| failed(e.to_string()))?;
    slot.advance(Stage::Secured);
    let bindings = conn.bindings;
    let mut unknown = false;
    let accepted = handshake::server_bound(&mut conn.io, &bindings, |key, role| {
        unknown = !hub.grants.contains_key(key);
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
        handshake::HandshakeError::Rejected { code, message } => {
            let why = match code {
                _ if unknown => AuthFailure::UnknownKey,
                ErrorCode::AuthFailed => AuthFailure::BadProof,
                _ => AuthFailure::Handshake,
            };
            (why, format!("authentication failed: {message}"))
        }
        other => failed(other.to_string()),
    })?;
    Ok((conn, accepted))
}

async fn serve_agent(
    hub: Arc<Hub>,
    conn: transport::Connected,
    acc: handshake::Accepted,
    peer: SocketAddr,
    transport: &'static str,
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
        // No UDP services yet: a datagram from the agent is then a protocol error.
        drop(started.datagrams);
        let generation = hub.generation.fetch_add(1, Ordering::Relaxed);
        let old = {
            let mut agents = lock(&hub.agents);
            let entry = agents
                .entry(name.clone())
                .or_insert_with(|| AgentEntry::new(&hub.config.limits));
            let old = entry.session.replace((generation, session.clone()));
            if let Some((old_generation, _)) = &old {
                // Its ports go on lease now: the new session binds again what it still wants.
                start_lease(&hub, &name, entry, *old_generation);
            }
            old
        };
        if let Some((_, old)) = old {
            info!("agent reconnected; replacing its previous session");
            old.close(ErrorCode::Replaced, "replaced by a newer session of the same agent");
        }
        bump(&hub.stats.sessions);
        hub.tally.session_up(&name, SessionMeta::new(generation, peer, transport, session.clone()));
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
                                let result = bind_port(&hub, &grant, &session, generation, &bind).await;
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
        hub.tally.session_down(&name, generation, &end);
        release(&hub, &name, generation);
    }
    .instrument(span)
    .await
}

/// After a session ends: unroute the ports it still routes and start their leases.
fn release(hub: &Arc<Hub>, name: &str, generation: u64) {
    let mut agents = lock(&hub.agents);
    let Some(entry) = agents.get_mut(name) else {
        return;
    };
    if matches!(entry.session, Some((g, _)) if g == generation) {
        entry.session = None;
    }
    // After a takeover the newer session owns what it bound again; this finds nothing left.
    start_lease(hub, name, entry, generation);
}

/// Puts the ports session `generation` routes on one lease: unrouted now, closed when the
/// lease runs out unless a session binds them again meanwhile.
fn start_lease(hub: &Arc<Hub>, name: &str, entry: &mut AgentEntry, generation: u64) {
    let lease_id = hub.leases.fetch_add(1, Ordering::Relaxed);
    let mut any = false;
    for port in entry.ports.values_mut() {
        if port.owner == Some(generation) {
            *lock(&port.route) = None;
            port.owner = None;
            port.lease = Some(lease_id);
            any = true;
        }
    }
    if !any {
        return;
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
            entry.ports.retain(|_, port| {
                if port.lease != Some(lease_id) {
                    return true;
                }
                info!(agent = %name, addr = %port.addr, "lease expired; public port closed");
                port.cancel.cancel();
                false
            });
        }
    });
}

/// Makes room for one more port of this agent: at `max` ports, closes the one longest on
/// lease; if every port is bound by a session, says why not.
fn make_room(entry: &mut AgentEntry, grant: &AgentGrant, max: u32) -> Result<(), String> {
    while entry.ports.len() >= max as usize {
        let oldest = entry
            .ports
            .iter()
            .filter_map(|(k, p)| p.lease.map(|l| (l, k)))
            .min_by_key(|(l, _)| *l)
            .map(|(_, k)| k.clone());
        let Some(key) = oldest else {
            return Err(format!(
                "agent `{}` already holds {} public ports, the most one agent may hold (limits.max_ports_per_agent on the gateway)",
                grant.name,
                entry.ports.len()
            ));
        };
        if let Some(port) = entry.ports.remove(&key) {
            info!(addr = %port.addr, "public port on lease closed to make room for a new one (limits.max_ports_per_agent)");
            port.cancel.cancel();
        }
    }
    Ok(())
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
    generation: u64,
    bind: &Bind,
) -> BindResult {
    let refuse = |code: ErrorCode, text: String| {
        warn!(service = %bind.name, "bind refused: {text}");
        hub.tally.agent_error(
            &grant.name,
            &format!("bind of {} refused: {text}", bind.name),
        );
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
    let max_ports = hub.config.limits.max_ports_per_agent;
    // A leased port for the same service comes back as it was.
    {
        let mut agents = lock(&hub.agents);
        let entry = agents
            .entry(grant.name.clone())
            .or_insert_with(|| AgentEntry::new(&hub.config.limits));
        if let Some(existing) = entry.ports.get_mut(&key) {
            if bind.port == 0 || bind.port == existing.addr.port() {
                *lock(&existing.route) = Some(route);
                existing.owner = Some(generation);
                existing.lease = None;
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
        if let Err(text) = make_room(entry, grant, max_ports) {
            return refuse(ErrorCode::LimitExceeded, text);
        }
    }
    // A listener holds a descriptor: it may not eat into what agent logins need.
    let Some(fd) = hub.public_fds.try_take(0) else {
        return refuse(ErrorCode::LimitExceeded, near_fd_limit(hub));
    };
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
    let conns = {
        let mut agents = lock(&hub.agents);
        let entry = agents
            .entry(grant.name.clone())
            .or_insert_with(|| AgentEntry::new(&hub.config.limits));
        // Another session of this agent may have bound meanwhile.
        if let Err(text) = make_room(entry, grant, max_ports) {
            return refuse(ErrorCode::LimitExceeded, text);
        }
        entry.ports.insert(
            key,
            PortEntry {
                addr,
                route: route.clone(),
                cancel: cancel.clone(),
                owner: Some(generation),
                lease: None,
            },
        );
        entry.conns.clone()
    };
    let port = PublicPort {
        listener,
        route,
        cancel,
        agent: grant.name.clone(),
        service: bind.name.clone(),
        conns,
        _fd: fd,
    };
    tokio::spawn(accept_public(hub.clone(), port).instrument(tracing::Span::current()));
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

/// What a public port's accept loop holds: dropping it closes the port.
struct PublicPort {
    listener: TcpListener,
    route: Arc<Mutex<Option<Route>>>,
    cancel: CancellationToken,
    /// The agent's name and its public connections.
    agent: String,
    /// The service's name, as first bound (for metrics).
    service: String,
    conns: Arc<Semaphore>,
    /// The listener's descriptor in the public budget.
    _fd: FdPermit,
}

/// Why a public connection or port is refused near the open-file limit.
fn near_fd_limit(hub: &Hub) -> String {
    format!(
        "the gateway is near its open-file limit ({} descriptors are kept for agent logins): raise the limit (`ulimit -Hn`, LimitNOFILE=) or lower limits.max_public_conns",
        hub.fds.tunnel
    )
}

/// The permits one public connection holds: the agent's, the gateway's, a descriptor.
type PublicPermits = (OwnedSemaphorePermit, OwnedSemaphorePermit, FdPermit);

/// Takes the permits for one more public connection to an agent with `conns`, or says which
/// limit refuses it.
fn take_public(hub: &Hub, conns: &Arc<Semaphore>, agent: &str) -> Result<PublicPermits, String> {
    let l = &hub.config.limits;
    let per_agent = conns.clone().try_acquire_owned().map_err(|_| {
        format!(
            "agent `{agent}` has {} public connections open (limits.max_public_conns_per_agent)",
            l.max_public_conns_per_agent
        )
    })?;
    let gateway = hub.public_conns.clone().try_acquire_owned().map_err(|_| {
        format!(
            "the gateway has {} public connections open (limits.max_public_conns)",
            l.max_public_conns
        )
    })?;
    let fd = hub
        .public_fds
        .try_take(hub.fds.ports)
        .ok_or_else(|| near_fd_limit(hub))?;
    Ok((per_agent, gateway, fd))
}

async fn accept_public(hub: Arc<Hub>, port: PublicPort) {
    let mut refusals = LogThrottle::default();
    let mut accept_errors = LogThrottle::default();
    loop {
        let (tcp, client) = tokio::select! {
            _ = port.cancel.cancelled() => return,
            r = port.listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    if let Some(skipped) = accept_errors.allow(Instant::now()) {
                        warn!(similar_since_last = skipped, "accept on public port failed: {e}");
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Some(route) = lock(&port.route).clone() else {
            bump(&hub.stats.no_session);
            hub.tally
                .refused(&port.agent, &port.service, Refused::NoSession);
            debug!(%client, "no agent session for this port right now; closing the connection");
            continue;
        };
        let permits = match take_public(&hub, &port.conns, &port.agent) {
            Ok(p) => p,
            Err(why) => {
                bump(&hub.stats.public_refused);
                hub.tally
                    .refused(&port.agent, &route.name, Refused::PublicLimit);
                if let Some(skipped) = lock(&hub.public_log).allow(Instant::now()) {
                    warn!(%client, service = %route.name, similar_since_last = skipped, "public connection refused: {why}");
                }
                let _ = socket2::SockRef::from(&tcp).set_linger(Some(std::time::Duration::ZERO));
                continue;
            }
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
                hub.tally
                    .refused(&port.agent, &route.name, Refused::StreamLimit);
                if let Some(skipped) = refusals.allow(Instant::now()) {
                    warn!(%client, service = %route.name, similar_since_last = skipped, "connection refused: {e}");
                }
                let _ = socket2::SockRef::from(&tcp).set_linger(Some(std::time::Duration::ZERO));
                continue;
            }
        };
        bump(&hub.stats.streams);
        let meter = hub.tally.stream(&port.agent, &route.name);
        let hub2 = hub.clone();
        hub.tracker.spawn(
            async move {
                let _permits = permits;
                let _live = GaugeGuard::new(&hub2.stats.active_streams);
                let started = Instant::now();
                let mut local = Local::Tcp(tcp);
                let stats =
                    relay::relay_metered(&stream, &mut local, Some(meter.meter(true))).await;
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
