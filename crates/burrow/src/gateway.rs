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
use crate::leases::LeaseBook;
use crate::limiter::{self, Admit, AuthLimiter, FdBudget, FdPermit, PreauthTable, Refusal, Stage};
use crate::relay::{self, Local};
use crate::session::{self, handshake, Session};
use crate::stats::{bump, GatewayStats, GaugeGuard};
use crate::tls::{self, GatewayIdentity};
use crate::transport;
use crate::udp;

/// Errors that stop a gateway, phrased for the user.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct GatewayError(pub String);

/// The shortest pause between two requests of one session for a service the gateway refused
/// (agents retry refused forwards with backoff, starting at a second).
pub const REBIND_INTERVAL: std::time::Duration = std::time::Duration::from_millis(250);

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
    /// The ports the gateway chose, kept in the state directory; `lease_dirty` wakes the
    /// task that writes them.
    lease_book: Mutex<LeaseBook>,
    lease_dirty: tokio::sync::Notify,
    stats: Arc<GatewayStats>,
    /// What the admin server shows beyond `stats`.
    tally: Arc<Tally>,
}

struct AgentEntry {
    /// The live session: its generation, handle and the agent's address.
    session: Option<(u64, Session, SocketAddr)>,
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
    /// The gateway chose it (a bind for port 0): kept in the lease file across restarts.
    chosen: bool,
}

#[derive(Clone)]
struct Route {
    session: Session,
    service: u32,
    name: String,
    /// The session's UDP flows (shared by its UDP services).
    flows: Arc<Mutex<udp::GatewayFlows>>,
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
                ports: vec![PortRange::UNPRIVILEGED, PortRange::UNPRIVILEGED_UDP],
            });
            generated = Some(key);
        }
        for warning in overlapping_grants(&agents) {
            warn!("{warning}");
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
        let (book, warning) = LeaseBook::load(&config.state_dir);
        if let Some(w) = warning {
            warn!("{w}");
        }
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
                lease_book: Mutex::new(book),
                lease_dirty: tokio::sync::Notify::new(),
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
        // Before any agent is served: a returning agent finds its port on lease.
        restore_leases(&hub).await;
        let lease_writer = tokio::spawn(write_leases(hub.clone()));
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
            .filter_map(|a| a.session.as_ref().map(|(_, s, _)| s.clone()))
            .collect();
        for s in sessions {
            s.close(ErrorCode::Shutdown, "gateway shutting down");
        }
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), hub.tracker.wait()).await;
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), lease_writer).await;
        Ok(())
    }
}

impl Hub {
    /// Keeps the port the gateway chose for `agent`'s `service` across restarts.
    fn remember_port(&self, agent: &str, protocol: Protocol, service: &str, port: u16) {
        if !lock(&self.lease_book).set(agent, protocol, service, port) {
            debug!(
                agent,
                service,
                port,
                "lease file full ({} ports): this port is not kept across a restart",
                crate::leases::MAX_LEASES
            );
        }
        self.lease_dirty.notify_one();
    }

    /// Forgets a closed port in the lease file, if the gateway had chosen it.
    fn forget_port(&self, agent: &str, (protocol, service): &(Protocol, String), port: &PortEntry) {
        if port.chosen {
            lock(&self.lease_book).remove(agent, *protocol, service, port.addr.port());
            self.lease_dirty.notify_one();
        }
    }
}

/// Writes the lease file whenever it changed, until the gateway stops (then once more).
async fn write_leases(hub: Arc<Hub>) {
    let mut last_error = None;
    loop {
        let stopping = tokio::select! {
            _ = hub.lease_dirty.notified() => false,
            _ = hub.stop.cancelled() => true,
        };
        let (path, text) = {
            let mut book = lock(&hub.lease_book);
            (book.path().to_path_buf(), book.render())
        };
        if let Some(text) = text {
            let dir = hub.config.state_dir.clone();
            let written = tokio::task::spawn_blocking(move || {
                crate::state::ensure_private_dir(&dir)?;
                crate::state::write_private_file(&path, text.as_bytes())
            })
            .await;
            match written {
                Ok(Ok(())) => last_error = None,
                Ok(Err(e)) => {
                    let e = e.to_string();
                    if last_error.as_ref() != Some(&e) {
                        warn!("cannot keep the chosen public ports for a restart: {e}");
                    }
                    last_error = Some(e);
                }
                Err(_) => {}
            }
        }
        if stopping {
            return;
        }
    }
}

/// Binds again, at start, the ports the lease file remembers, each on lease for its agent as
/// if the agent had just dropped: a returning agent gets the same port. Ports no longer
/// granted, or taken meanwhile, are forgotten.
async fn restore_leases(hub: &Arc<Hub>) {
    let leases = lock(&hub.lease_book).leases();
    if leases.is_empty() {
        return;
    }
    let by_name: HashMap<&str, &Arc<AgentGrant>> =
        hub.grants.values().map(|g| (g.name.as_str(), g)).collect();
    let lease_id = hub.leases.fetch_add(1, Ordering::Relaxed);
    let mut restored = 0usize;
    let mut agents = std::collections::HashSet::new();
    for l in leases {
        let forget = |why: &str| {
            info!(agent = %l.agent, service = %l.service, port = l.port, "port chosen before the restart not kept: {why}");
            lock(&hub.lease_book).remove(&l.agent, l.protocol, &l.service, l.port);
            hub.lease_dirty.notify_one();
        };
        let Some(grant) = by_name.get(l.agent.as_str()) else {
            forget("no such agent in the config now");
            continue;
        };
        if !grant.allows_on(l.protocol, l.port) {
            forget("the port is no longer in the agent's grant");
            continue;
        }
        let full = lock(&hub.agents)
            .get(&l.agent)
            .is_some_and(|e| e.ports.len() >= hub.config.limits.max_ports_per_agent as usize);
        if full {
            forget("the agent has limits.max_ports_per_agent ports already");
            continue;
        }
        let Some(fd) = hub.public_fds.try_take(0) else {
            forget("the gateway is near its open-file limit");
            continue;
        };
        let bound = match l.protocol {
            Protocol::Tcp => TcpListener::bind((hub.config.public_host, l.port))
                .await
                .map(Listener::Tcp)
                .map_err(|e| e.to_string()),
            Protocol::Udp => listen_public_udp(hub, l.port, grant)
                .await
                .map(Listener::Udp),
        };
        let listener = match bound {
            Ok(listener) => listener,
            Err(e) => {
                forget(&format!("cannot bind it again: {e}"));
                continue;
            }
        };
        let Ok(addr) = listener.local_addr() else {
            continue;
        };
        let route = Arc::new(Mutex::new(None));
        let cancel = hub.stop.child_token();
        let conns = {
            let mut agents = lock(&hub.agents);
            let entry = agents
                .entry(l.agent.clone())
                .or_insert_with(|| AgentEntry::new(&hub.config.limits));
            entry.ports.insert(
                (l.protocol, l.service.clone()),
                PortEntry {
                    addr,
                    route: route.clone(),
                    cancel: cancel.clone(),
                    owner: None,
                    lease: Some(lease_id),
                    chosen: true,
                },
            );
            entry.conns.clone()
        };
        match listener {
            Listener::Tcp(listener) => {
                let port = PublicPort {
                    listener,
                    route,
                    cancel,
                    agent: l.agent.clone(),
                    service: l.service.clone(),
                    conns,
                    _fd: fd,
                };
                tokio::spawn(accept_public(hub.clone(), port));
            }
            Listener::Udp(socket) => serve_udp_port(hub, socket, route, cancel, fd),
        }
        restored += 1;
        agents.insert(l.agent.clone());
    }
    for agent in agents {
        spawn_lease_timer(hub, &agent, lease_id);
    }
    if restored > 0 {
        info!(
            "{restored} public ports chosen before the restart bound again, on lease for {:?} until their agents bind them",
            hub.config.lease
        );
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
        let cut = match by_address {
            true => match lock(&hub.limiter).admit(peer.ip(), StdInstant::now()) {
                Admit::Cut { first } => Some(first),
                _ => None,
            },
            false => None,
        };
        if let Some(first) = cut {
            bump(&hub.stats.rate_limited);
            hub.tally.auth_failure(AuthFailure::RateLimited, peer, "");
            if first {
                warn!(%peer, "flood of failed handshakes from this address (over {} at once, then more than one every {:?}): closing its tunnel connections before TLS until it slows down (logged once)", limiter::DEFAULT_SOURCE_BURST, limiter::DEFAULT_SOURCE_REFILL);
            } else {
                debug!(%peer, "tunnel connection closed before TLS: too many failed handshakes from this address");
            }
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
                    lock(&hub2.limiter).success(peer.ip(), &acc.key);
                    let peer = conn.peer;
                    hub2.tally.handshake_took(accepted_at.elapsed());
                    serve_agent(hub2, conn, acc, peer, transport).await
                }
                Ok(Err(failed)) if failed.rate_limited => {
                    bump(&hub2.stats.handshake_failures);
                    bump(&hub2.stats.rate_limited);
                    hub2.tally.auth_failure(AuthFailure::RateLimited, peer, &failed.why);
                    let key = failed.presented.as_ref();
                    if lock(&hub2.limiter).refused(peer.ip(), key, StdInstant::now()) {
                        let whose = match key {
                            Some(k) => format!("with key {}", k.short()),
                            None => "with unknown keys".into(),
                        };
                        warn!(%peer, "too many failed handshakes from this address {whose} (over {} at once, then 1 every {:?}): refusing them as rate-limited for now; other keys from this address still get in (logged once)", limiter::DEFAULT_BURST, limiter::DEFAULT_REFILL);
                    } else {
                        debug!(%peer, "tunnel handshake refused: {}", failed.why);
                    }
                }
                Ok(Err(failed)) => {
                    bump(&hub2.stats.handshake_failures);
                    hub2.tally.auth_failure(failed.kind, peer, &format!("tunnel handshake failed: {}", failed.why));
                    if by_address {
                        log_failure(&hub2, peer, failed.presented.as_ref(), &failed.why);
                    } else {
                        warn!(%peer, "tunnel handshake failed: {}", failed.why);
                    }
                }
                Err(_) => {
                    bump(&hub2.stats.handshake_failures);
                    let why = format!("timed out after {:?}", hub2.config.limits.handshake_timeout);
                    hub2.tally.auth_failure(AuthFailure::Timeout, peer, "tunnel handshake timed out");
                    if by_address {
                        log_failure(&hub2, peer, None, &why);
                    } else {
                        warn!(%peer, "tunnel handshake failed: {why}");
                    }
                }
            }
        });
    }
}

/// Charges a failed handshake and logs it: at warn while the source's budget lasts and once
/// past it, then at debug.
fn log_failure(hub: &Hub, peer: SocketAddr, presented: Option<&KeyHash>, why: &str) {
    let now = StdInstant::now();
    let mut limiter = lock(&hub.limiter);
    if !limiter.failure(peer.ip(), presented, now) {
        debug!(%peer, "tunnel handshake failed: {why}");
    } else if limiter.check(peer.ip(), presented, now).is_some() {
        warn!(%peer, "tunnel handshake failed: {why} (this address has used up its failure budget for now)");
    } else {
        warn!(%peer, "tunnel handshake failed: {why}");
    }
}

/// Waits until no session carries a stream.
async fn wait_for_relays(hub: &Hub) {
    loop {
        let busy: usize = lock(&hub.agents)
            .values()
            .filter_map(|a| a.session.as_ref())
            .map(|(_, s, _)| s.stream_count())
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

/// Why a tunnel handshake failed, and what to charge it to.
struct Failed {
    why: String,
    /// What kind of failure, for the metrics.
    kind: AuthFailure,
    /// The key presented, when the gateway knows it (`None`: unknown, or none yet).
    presented: Option<KeyHash>,
    /// Refused for being over the failure budget.
    rate_limited: bool,
}

impl From<String> for Failed {
    fn from(why: String) -> Self {
        Failed {
            why,
            kind: AuthFailure::Handshake,
            presented: None,
            rate_limited: false,
        }
    }
}

async fn handshake_agent(
    hub: &Hub,
    tcp: TcpStream,
    peer: SocketAddr,
    acceptor: &transport::Acceptor,
    slot: &PreauthSlot,
) -> Result<(transport::Connected, handshake::Accepted), Failed> {
    // Every client speaks first (a TLS hello, a Burrow preamble, an HTTP request): until a
    // byte arrives, this connection has made no progress and gives way to a newcomer when the
    // table is full.
    match tcp.peek(&mut [0u8; 1]).await {
        Ok(0) => return Err(String::from("closed before sending anything").into()),
        Ok(_) => {}
        Err(e) => return Err(e.to_string().into()),
    }
    slot.advance(Stage::Talking);
    let mut conn = transport::accept(tcp, peer, acceptor)
        .await
        .map_err(|e| Failed::from(e.to_string()))?;
    slot.advance(Stage::Secured);
    let bindings = conn.bindings;
    // Failures are charged to the source and the key it presents, so one failing agent does
    // not lock out the others behind the same address; past the budget the refusal says so,
    // inside TLS, where the agent can read it.
    let mut presented = None;
    let verdict = |key: &KeyHash, role: Role| {
        let grant = hub.grants.get(key);
        presented = grant.map(|_| *key);
        let limited = lock(&hub.limiter).check(peer.ip(), presented.as_ref(), StdInstant::now());
        let limited = |why: &str| limited.map(|after| handshake::rate_limited_message(after, why));
        match (grant, role) {
            (Some(grant), Role::Agent) => match limited("key proof does not verify") {
                None => handshake::Verdict::Accept(grant.name.clone(), hub.params),
                Some(text) => handshake::Verdict::AcceptIfProven(
                    grant.name.clone(),
                    hub.params,
                    ErrorCode::RateLimited,
                    text,
                ),
            },
            (Some(_), Role::Connector) => handshake::Verdict::Refuse(
                ErrorCode::AuthFailed,
                "this key is an agent key; connectors are not enabled on this gateway".into(),
            ),
            (None, _) => match limited("key not accepted by this gateway") {
                None => handshake::Verdict::Refuse(
                    ErrorCode::AuthFailed,
                    "key not accepted by this gateway".into(),
                ),
                Some(text) => handshake::Verdict::Refuse(ErrorCode::RateLimited, text),
            },
        }
    };
    let accepted = handshake::server_bound(&mut conn.io, &bindings, verdict).await;
    let accepted = accepted.map_err(|e| match e {
        handshake::HandshakeError::Rejected { code, message } => Failed {
            why: format!("authentication failed: {message}"),
            kind: match code {
                ErrorCode::RateLimited => AuthFailure::RateLimited,
                _ if presented.is_none() => AuthFailure::UnknownKey,
                ErrorCode::AuthFailed => AuthFailure::BadProof,
                _ => AuthFailure::Handshake,
            },
            presented,
            rate_limited: code == ErrorCode::RateLimited,
        },
        other => Failed {
            why: other.to_string(),
            kind: AuthFailure::Handshake,
            presented,
            rate_limited: false,
        },
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
        // Replies of UDP flows: to their clients, through the public sockets. A datagram for
        // a flow the gateway never opened is a protocol error.
        let flows = Arc::new(Mutex::new(udp::GatewayFlows::default()));
        tokio::spawn(
            udp::dispatch_replies(
                session.clone(),
                started.datagrams,
                flows.clone(),
                hub.config.udp.idle,
            )
            .in_current_span(),
        );
        let generation = hub.generation.fetch_add(1, Ordering::Relaxed);
        let old = {
            let mut agents = lock(&hub.agents);
            let entry = agents
                .entry(name.clone())
                .or_insert_with(|| AgentEntry::new(&hub.config.limits));
            let old = entry.session.replace((generation, session.clone(), peer));
            if let Some((old_generation, ..)) = &old {
                // Its ports go on lease now: the new session binds again what it still wants.
                start_lease(&hub, &name, entry, *old_generation);
            }
            old
        };
        if let Some((_, old, old_peer)) = old {
            // Both addresses: two agents sharing a key take the session from each other, and
            // each is told who the other is.
            info!(%peer, previous = %old_peer, "agent connected while a session of its key from {old_peer} was up: replacing its previous session");
            old.close(ErrorCode::Replaced, crate::agent::replaced_message(peer));
        }
        bump(&hub.stats.sessions);
        hub.tally.session_up(&name, SessionMeta::new(generation, peer, transport, session.clone()));
        let _live = GaugeGuard::new(&hub.stats.active_sessions);
        info!(%peer, key = %acc.key.short(), "agent connected");
        let mut control = started.control;
        // Ports are kept across sessions by service name; one session may use a name once.
        // A refused name may be asked for again (the agent retries with backoff), but not
        // sooner than REBIND_INTERVAL after its last refusal. `None`: granted.
        let mut names: HashMap<String, Option<Instant>> = HashMap::new();
        loop {
            tokio::select! {
                frame = control.recv() => match frame {
                    Some(f) if f.header.kind == Kind::Bind => {
                        let bind = match Bind::decode(&f.payload) {
                            Ok(bind) => bind,
                            Err(e) => {
                                session.close(e.code, e.detail);
                                continue;
                            }
                        };
                        let refuse = |code: ErrorCode, text: String| {
                            warn!(service = %bind.name, "bind refused: {text}");
                            session.send_control(BindResult { service: bind.service, code, text }.to_frame());
                        };
                        match names.get(&bind.name) {
                            Some(None) => {
                                refuse(ErrorCode::PortInUse, format!("another service of this agent is already named `{}`", bind.name));
                                continue;
                            }
                            Some(Some(at)) if at.elapsed() < REBIND_INTERVAL => {
                                refuse(ErrorCode::LimitExceeded, format!("service `{}` asked for again within {REBIND_INTERVAL:?} of its last refusal", bind.name));
                                continue;
                            }
                            Some(Some(_)) => {}
                            None if names.len() >= burrow_proto::message::MAX_BINDS => {
                                session.close(ErrorCode::LimitExceeded, format!("more than {} services in one session", burrow_proto::message::MAX_BINDS));
                                continue;
                            }
                            None => {}
                        }
                        let result = bind_port(&hub, &grant, (&session, &flows), generation, &bind).await;
                        let refused = (result.code != ErrorCode::Normal).then(Instant::now);
                        names.insert(bind.name.clone(), refused);
                        session.send_control(result.to_frame());
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
        if end.lost {
            warn!(%peer, "agent connection lost: {}", end.detail);
        } else if matches!(end.code, ErrorCode::Normal | ErrorCode::Shutdown | ErrorCode::Replaced) {
            info!(%peer, reason = %end, "agent session ended");
        } else {
            warn!(%peer, reason = %end, "agent session ended");
        }
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
    if matches!(entry.session, Some((g, ..)) if g == generation) {
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
    if any {
        spawn_lease_timer(hub, name, lease_id);
    }
}

/// Closes the ports still on lease `lease_id` when the lease runs out.
fn spawn_lease_timer(hub: &Arc<Hub>, name: &str, lease_id: u64) {
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
            entry.ports.retain(|key, port| {
                if port.lease != Some(lease_id) {
                    return true;
                }
                info!(agent = %name, addr = %port.addr, "lease expired; public port closed");
                port.cancel.cancel();
                hub.forget_port(&name, key, port);
                false
            });
        }
    });
}

/// Makes room for one more port of this agent: at `max` ports, closes the one longest on
/// lease; if every port is bound by a session, says why not.
fn make_room(
    hub: &Hub,
    entry: &mut AgentEntry,
    grant: &AgentGrant,
    max: u32,
) -> Result<(), String> {
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
            hub.forget_port(&grant.name, &key, &port);
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
    (session, flows): (&Session, &Arc<Mutex<udp::GatewayFlows>>),
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
    let proto = match bind.protocol {
        Protocol::Tcp => "TCP",
        Protocol::Udp => "UDP",
    };
    if !grant.allows_on(bind.protocol, bind.port) {
        let port = if bind.port == 0 {
            "no port".to_string()
        } else {
            format!("port {}", bind.port)
        };
        return refuse(
            ErrorCode::PortNotGranted,
            format!(
                "{proto} {port} is not granted to agent `{}` (granted: {}){}",
                grant.name,
                describe_ports(&grant.ports),
                if bind.protocol == Protocol::Udp {
                    "; UDP ports are granted with /udp, as in ports = [\"5353/udp\"]"
                } else {
                    ""
                }
            ),
        );
    }
    let route = Route {
        session: session.clone(),
        service: bind.service,
        name: bind.name.clone(),
        flows: flows.clone(),
    };
    let key = (bind.protocol, bind.name.clone());
    let max_ports = hub.config.limits.max_ports_per_agent;
    // A leased port for the same service comes back as it was.
    {
        let mut agents = lock(&hub.agents);
        // Grants may overlap (a warning at start says so): name the agent holding the port.
        let holder = agents
            .iter()
            .filter(|(name, _)| **name != grant.name)
            .find_map(|(name, e)| {
                // Of the same protocol: TCP and UDP port P are two ports.
                e.ports
                    .iter()
                    .find(|((proto, _), p)| {
                        *proto == bind.protocol && bind.port != 0 && p.addr.port() == bind.port
                    })
                    .map(|(_, p)| (name.clone(), p.lease.is_some()))
            });
        if let Some((holder, on_lease)) = holder {
            return refuse(
                ErrorCode::PortInUse,
                format!(
                    "port {} is held by agent `{holder}`{} on this gateway (both agents' grants include it): ask the gateway's operator to give each agent its own ports, or pick another port",
                    bind.port,
                    if on_lease { " (reserved for it on lease)" } else { "" }
                ),
            );
        }
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
                hub.forget_port(&grant.name, &key, &old);
            }
        }
        let taken = entry
            .ports
            .iter()
            .any(|((p, _), e)| *p == bind.protocol && e.addr.port() == bind.port);
        if bind.port != 0 && taken {
            return refuse(
                ErrorCode::PortInUse,
                format!(
                    "port {} is already used by another service of this agent",
                    bind.port
                ),
            );
        }
        if let Err(text) = make_room(hub, entry, grant, max_ports) {
            return refuse(ErrorCode::LimitExceeded, text);
        }
    }
    // A listener holds a descriptor: it may not eat into what agent logins need.
    let Some(fd) = hub.public_fds.try_take(0) else {
        return refuse(ErrorCode::LimitExceeded, near_fd_limit(hub));
    };
    let bound = match bind.protocol {
        Protocol::Tcp => listen_public(hub.config.public_host, bind.port, grant)
            .await
            .map(Listener::Tcp),
        Protocol::Udp => listen_public_udp(hub, bind.port, grant)
            .await
            .map(Listener::Udp),
    };
    let listener = match bound {
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
        if let Err(text) = make_room(hub, entry, grant, max_ports) {
            return refuse(ErrorCode::LimitExceeded, text);
        }
        // The lease file keeps chosen ports, TCP and UDP, across a restart.
        let chosen = bind.port == 0;
        if chosen {
            hub.remember_port(&grant.name, bind.protocol, &bind.name, addr.port());
        }
        entry.ports.insert(
            key,
            PortEntry {
                addr,
                route: route.clone(),
                cancel: cancel.clone(),
                owner: Some(generation),
                lease: None,
                chosen,
            },
        );
        entry.conns.clone()
    };
    match listener {
        Listener::Tcp(listener) => {
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
        }
        Listener::Udp(socket) => serve_udp_port(hub, socket, route, cancel, fd),
    }
    let text = public_text(hub, addr);
    info!(service = %bind.name, public = %text, "public port granted");
    BindResult {
        service: bind.service,
        code: ErrorCode::Normal,
        text,
    }
}

/// Warnings for agents whose grants share ports: whichever binds a shared port first gets it,
/// and the other is refused. At most 16 pairs are named.
fn overlapping_grants(agents: &[AgentGrant]) -> Vec<String> {
    const MAX_NAMED: usize = 16;
    let mut out = Vec::new();
    let mut more = 0usize;
    for (i, a) in agents.iter().enumerate() {
        for b in &agents[i + 1..] {
            let shared: Vec<PortRange> = a
                .ports
                .iter()
                .flat_map(|ra| {
                    b.ports.iter().filter_map(move |rb| {
                        let (start, end) = (ra.start.max(rb.start), ra.end.min(rb.end));
                        (start <= end && ra.protocol == rb.protocol).then_some(PortRange {
                            start,
                            end,
                            protocol: ra.protocol,
                        })
                    })
                })
                .collect();
            if shared.is_empty() {
                continue;
            }
            if out.len() == MAX_NAMED {
                more += 1;
                continue;
            }
            out.push(format!(
                "agents `{}` and `{}` are both granted ports {}: whichever binds one first holds it, and the other is refused; give each agent its own ports",
                a.name,
                b.name,
                describe_ports(&shared)
            ));
        }
    }
    if more > 0 {
        out.push(format!("{more} more pairs of agents share ports"));
    }
    out
}

fn describe_ports(ports: &[PortRange]) -> String {
    let parts: Vec<String> = ports.iter().map(PortRange::to_string).collect();
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

/// Serves a public UDP port until `cancel`, to whichever session `route` names; its
/// descriptor permit `fd` goes with it.
fn serve_udp_port(
    hub: &Hub,
    socket: tokio::net::UdpSocket,
    route: Arc<Mutex<Option<Route>>>,
    cancel: CancellationToken,
    fd: FdPermit,
) {
    let routing = move || {
        lock(&route).clone().map(|r| udp::UdpRoute {
            session: r.session,
            service: r.service,
            name: r.name,
            flows: r.flows,
        })
    };
    let counters = Arc::new(udp::UdpCounters::default());
    let settings = hub.config.udp;
    tokio::spawn(
        async move {
            udp::serve_public(Arc::new(socket), routing, settings, counters, cancel).await;
            drop(fd);
        }
        .instrument(tracing::Span::current()),
    );
}

/// A bound public port, TCP or UDP.
enum Listener {
    Tcp(TcpListener),
    Udp(tokio::net::UdpSocket),
}

impl Listener {
    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        match self {
            Listener::Tcp(l) => l.local_addr(),
            Listener::Udp(s) => s.local_addr(),
        }
    }
}

/// Binds a public UDP port: the one asked for, or for port 0 one inside the agent's UDP grant.
async fn listen_public_udp(
    hub: &Hub,
    port: u16,
    grant: &AgentGrant,
) -> Result<tokio::net::UdpSocket, String> {
    let host = hub.config.public_host;
    let bind = |p: u16| async move {
        let s = tokio::net::UdpSocket::bind((host, p)).await?;
        let sock = socket2::SockRef::from(&s);
        let _ = sock.set_recv_buffer_size(hub.config.udp.queue);
        let _ = sock.set_send_buffer_size(hub.config.udp.queue);
        Ok::<_, std::io::Error>(s)
    };
    if port != 0 {
        return bind(port).await.map_err(|e| {
            if e.kind() == std::io::ErrorKind::AddrInUse {
                format!(
                    "UDP port {port} on {host} is in use on the gateway: pick another port or \
                     stop what uses it"
                )
            } else {
                format!("cannot bind UDP {host}:{port}: {e}")
            }
        });
    }
    if let Ok(s) = bind(0).await {
        if s.local_addr()
            .is_ok_and(|a| grant.allows_on(Protocol::Udp, a.port()))
        {
            return Ok(s);
        }
    }
    let mut tried = 0;
    for range in grant.ports.iter().filter(|r| r.protocol == Protocol::Udp) {
        for p in range.start.max(1)..=range.end {
            if tried >= 4096 {
                break;
            }
            tried += 1;
            if let Ok(s) = bind(p).await {
                return Ok(s);
            }
        }
    }
    Err(format!(
        "no free UDP port in the agent's grant ({}) on {host}",
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
    fn overlapping_grants_are_named() {
        let grant = |name: &str, ports: &[(u16, u16)]| AgentGrant {
            name: name.into(),
            key: KeySpec::Key(SecretKey::generate()),
            ports: ports
                .iter()
                .map(|&(start, end)| PortRange::tcp(start, end))
                .collect(),
        };
        let agents = [
            grant("a", &[(8080, 8080), (9000, 9100)]),
            grant("b", &[(9050, 9200)]),
            grant("c", &[(8081, 8089)]),
            grant("d", &[(8080, 8080), (9200, 9200)]),
        ];
        let w = overlapping_grants(&agents);
        assert_eq!(w.len(), 3, "{w:?}");
        assert!(
            w[0].starts_with("agents `a` and `b` are both granted ports 9050-9100:"),
            "{w:?}"
        );
        assert!(
            w[1].starts_with("agents `a` and `d` are both granted ports 8080:"),
            "{w:?}"
        );
        assert!(
            w[2].starts_with("agents `b` and `d` are both granted ports 9200:"),
            "{w:?}"
        );
        let many: Vec<AgentGrant> = (0..10).map(|i| grant(&i.to_string(), &[(1, 2)])).collect();
        let w = overlapping_grants(&many);
        assert_eq!(w.len(), 17);
        assert_eq!(w[16], "29 more pairs of agents share ports");
    }

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
