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
//!
//! Connectors (`[[connectors]]`) log in on the tunnel port too, with keys of their own; each
//! stream a connector opens is checked against its `reach` and joined to a stream in the
//! agent's session (`connect`).
//!
//! Agents may share a public port in a group (their binds name the same group): new clients
//! are spread over the group's live sessions, and the port stays bound while any member holds
//! it (`groups.rs`).
//!
//! The agents and connectors it accepts can change while it runs: a reload of the config
//! file or a token made or revoked swaps the whole set at once, then closes what is no longer
//! granted and only that (`reload`).
//!
//! The parts: `accept` (the tunnel port, up to an authenticated session), `serve` (one
//! session: its binds and its end), `ports` (public listeners and their connections),
//! `groups` (who a port's clients go to), `lease` (ports kept for a dropped agent, and across
//! restarts), `connect` (connectors and their streams), `reload` (a new set of agents and
//! connectors: from the config file, or from the tokens) and `admin` (what the admin server
//! reads).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, MutexGuard};

use burrow_proto::auth::{KeyHash, SecretKey};
use burrow_proto::message::{Protocol, SessionParams};
use burrow_proto::ErrorCode;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

mod accept;
mod admin;
mod connect;
mod groups;
mod lease;
mod ports;
mod quic;
mod reload;
mod serve;
mod unix;

use accept::accept_loop;
use lease::{restore_leases, write_leases};
use ports::{overlapping_grants, public_text};
pub use reload::GatewayHandle;

use crate::admin::metrics::Tally;
use crate::config::{AgentGrant, GatewayConfig, KeySpec, PortRange, TransportKind};
use crate::leases::LeaseBook;
use crate::limiter::{self, AuthLimiter, FdBudget, PreauthTable};
use crate::session::Session;
use crate::stats::GatewayStats;
use crate::tls::{self, GatewayIdentity};
use crate::tokens::TokenBook;
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
    /// QUIC on UDP (on unless `quic = false` or plain TCP).
    quic: Option<quinn::Endpoint>,
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
    /// The agents accepted now, by key: the config's (or the generated key's) and the active
    /// tokens'. Swapped whole by a reload or a token change; read through [`Hub::grants`].
    grants: Mutex<Arc<Grants>>,
    /// The config's agents in force (or the generated key's), for the next reload.
    config_agents: Mutex<Vec<AgentGrant>>,
    /// Tokens issued at run time (`burrow token create`).
    tokens: Mutex<TokenBook>,
    /// Wakes the task that ends tokens when they expire.
    tokens_changed: tokio::sync::Notify,
    /// Held while the set of agents changes, so that changes apply one after the other.
    changing: Mutex<()>,
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
    /// Connectors: their grants and sessions, and the agents' private services.
    connectors: connect::Connectors,
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

/// The agents a gateway accepts, by key hash.
type Grants = HashMap<KeyHash, Arc<AgentGrant>>;

struct PortEntry {
    addr: SocketAddr,
    /// The sessions its clients go to; shared with the other members' entries in a group.
    route: Arc<Mutex<groups::Routes>>,
    /// Stops this port's listener (shared in a group, like `route`).
    cancel: CancellationToken,
    /// The generation of the session that bound it, while one routes it.
    owner: Option<u64>,
    /// The lease it is on while no session routes it (ids grow: the smallest is the oldest).
    lease: Option<u64>,
    /// The gateway chose it (a bind for port 0): kept in the lease file across restarts.
    chosen: bool,
    /// A unix socket endpoint (`addr` is then unused): its path.
    path: Option<std::path::PathBuf>,
}

impl PortEntry {
    /// The entry of a port a session has just bound, routed by that session (`first`) alone
    /// until others join its group; returns it with its route table, which the listener's
    /// task shares.
    fn routed(
        addr: SocketAddr,
        path: Option<std::path::PathBuf>,
        group: Option<String>,
        first: groups::Member,
        cancel: &CancellationToken,
        chosen: bool,
    ) -> (PortEntry, Arc<Mutex<groups::Routes>>) {
        let owner = Some(first.generation);
        let mut routes = groups::Routes::new(group);
        routes.join(first);
        let route = Arc::new(Mutex::new(routes));
        let entry = PortEntry {
            addr,
            route: route.clone(),
            cancel: cancel.clone(),
            owner,
            lease: None,
            chosen,
            path,
        };
        (entry, route)
    }

    /// What clients reach: `unix:PATH`, or the public address.
    fn shown(&self, hub: &Hub) -> String {
        match &self.path {
            Some(p) => format!("unix:{}", p.display()),
            None => public_text(hub, self.addr),
        }
    }

    /// Lets go of the port after the entry was taken out of its agent's table: closes the
    /// listener unless another member of its group still holds it. True when closed.
    fn close(&self) -> bool {
        let last = lock(&self.route).release();
        if last {
            self.cancel.cancel();
        }
        last
    }
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
                // No unix socket paths: a zero-config gateway creates no files.
                paths: Vec::new(),
                socket_mode: crate::config::DEFAULT_SOCKET_MODE,
            });
            generated = Some(key);
        }
        let config_agents = agents.clone();
        for warning in overlapping_grants(&agents, &config.groups) {
            warn!("{warning}");
        }
        let tokens = TokenBook::load(&config.state_dir).map_err(GatewayError)?;
        let grants =
            reload::merge(&agents, &tokens, std::time::SystemTime::now()).map_err(GatewayError)?;
        let connectors = connect::Connectors::new(&config.connectors).map_err(GatewayError)?;
        for warning in connect::shared_keys(&config.connectors, &grants) {
            info!("{warning}");
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
        let quic = match (&identity, config.quic) {
            (Some(id), true) => Some(quic::bind(
                config
                    .quic_listen
                    .unwrap_or_else(|| listener.local_addr().unwrap_or(config.listen)),
                id.server_config.clone(),
                &params,
            )?),
            _ => None,
        };
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
        // A connector's sessions log in on the tunnel port as agents do.
        let logins = grants.len() + connectors.len();
        let fds = limiter::share_descriptors(files.soft, in_use, limits.max_preauth, logins);
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
            quic,
            identity,
            generated,
            generated_now,
            hub: Arc::new(Hub {
                params,
                grants: Mutex::new(Arc::new(grants)),
                config_agents: Mutex::new(config_agents),
                tokens: Mutex::new(tokens),
                tokens_changed: tokio::sync::Notify::new(),
                changing: Mutex::new(()),
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
                connectors,
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
        Arc::new(admin::GatewayReport {
            hub: self.hub.clone(),
            listen: self.local_addr(),
            fingerprint: self.fingerprint(),
        })
    }

    /// A handle that changes the running gateway's agents: a reload of its config, tokens.
    pub fn handle(&self) -> GatewayHandle {
        GatewayHandle {
            hub: self.hub.clone(),
            listen: self.local_addr(),
            fingerprint: self.fingerprint(),
        }
    }

    /// The tunnel listener's address.
    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().unwrap_or(self.hub.config.listen)
    }

    /// The UDP address QUIC is served on, if it is.
    pub fn quic_local_addr(&self) -> Option<SocketAddr> {
        self.quic.as_ref().and_then(|e| e.local_addr().ok())
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
            .with_ws_path(&self.hub.config.ws_path)
            .with_quic_port(self.quic_local_addr().map(|a| a.port())),
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
        tokio::spawn(reload::expire_tokens(hub.clone()));
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
        let on_quic = async {
            if let Some(endpoint) = self.quic {
                quic::accept_loop(hub.clone(), endpoint, shutdown.clone()).await;
            }
        };
        tokio::join!(on_tunnel_port, on_ws_listener, on_quic);
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
        hub.connectors
            .close_all(ErrorCode::Shutdown, "gateway shutting down");
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), hub.tracker.wait()).await;
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), lease_writer).await;
        Ok(())
    }
}

impl Hub {
    /// The agents accepted now.
    fn grants(&self) -> Arc<Grants> {
        lock(&self.grants).clone()
    }

    /// Keeps the port the gateway chose for `agent`'s `service` (of `group`) across restarts.
    fn remember_port(
        &self,
        agent: &str,
        protocol: Protocol,
        service: &str,
        port: u16,
        group: Option<&str>,
    ) {
        if !lock(&self.lease_book).set(agent, protocol, service, port, group) {
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
    fn forget_port(&self, agent: &str, protocol: Protocol, service: &str, port: &PortEntry) {
        if port.chosen {
            lock(&self.lease_book).remove(agent, protocol, service, port.addr.port());
            self.lease_dirty.notify_one();
        }
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
