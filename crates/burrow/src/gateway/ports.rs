//! Public ports: binding them within the grant, the listeners and the public connections
//! they take.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use burrow_proto::message::{Bind, BindResult, Open, Protocol};
use burrow_proto::ErrorCode;
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

use super::groups::{Member, Routes};
use super::{lock, AgentEntry, Hub, LogThrottle, PortEntry, Route};
use crate::admin::metrics::Refused;
use crate::config::{AgentGrant, GroupGrant, PortRange};
use crate::limiter::FdPermit;
use crate::relay::{self, Local};
use crate::session::Session;
use crate::stats::{bump, GaugeGuard};
use crate::transport;
use crate::udp;

/// Makes room for one more port of this agent: at `max` ports, closes the one longest on
/// lease; if every port is bound by a session, says why not.
pub(super) fn make_room(
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
            info!(addr = %port.shown(hub), "public port on lease closed to make room for a new one (limits.max_ports_per_agent)");
            port.close();
            hub.forget_port(&grant.name, key.0, &key.1, &port);
        }
    }
    Ok(())
}

pub(super) fn public_text(hub: &Hub, addr: SocketAddr) -> String {
    match &hub.config.public_name {
        Some(name) => format!("{name}:{}", addr.port()),
        None => addr.to_string(),
    }
}

/// Whether `agent` may be in `group`: a group declared in `[[groups]]` takes only the agents
/// it lists; one that is not declared, every agent (whose grant has its port).
fn group_admits(hub: &Hub, group: &str, agent: &str) -> Result<(), String> {
    match hub.config.groups.iter().find(|g| g.name == group) {
        Some(g) if !g.agents.iter().any(|a| a == agent) => Err(format!(
            "agent `{agent}` is not a member of group `{group}` on this gateway (its [[groups]] entry lets in {}): ask the gateway's operator to add `{agent}` to the group's `agents`, or change the forward's group",
            g.agents.join(", ")
        )),
        _ => Ok(()),
    }
}

/// A port another agent holds that a bind asks for, or the port of the group it names.
struct Held {
    holder: String,
    addr: SocketAddr,
    route: Arc<Mutex<Routes>>,
    cancel: CancellationToken,
    on_lease: bool,
    /// Found by the group's name (rather than only by the port number).
    by_group: bool,
}

/// Of the ports other agents hold: the one `bind` asks for (by number), or the port of the
/// group it names (same protocol). The group's port wins.
fn held_by_others(agents: &HashMap<String, AgentEntry>, agent: &str, bind: &Bind) -> Option<Held> {
    let mut by_port = None;
    for (name, e) in agents.iter().filter(|(name, _)| **name != agent) {
        for ((protocol, _), p) in &e.ports {
            let same_protocol = *protocol == bind.protocol;
            let theirs = lock(&p.route).group.clone();
            let same_group = same_protocol && bind.group.is_some() && theirs == bind.group;
            // Grants may overlap (a warning at start says so): a port with the number asked
            // for is taken, of the same protocol only (TCP and UDP port P are two ports).
            let same_port = bind.port != 0 && p.addr.port() == bind.port && same_protocol;
            if !(same_group || same_port) {
                continue;
            }
            let held = Held {
                holder: name.clone(),
                addr: p.addr,
                route: p.route.clone(),
                cancel: p.cancel.clone(),
                on_lease: p.lease.is_some(),
                by_group: same_group,
            };
            if same_group {
                return Some(held);
            }
            by_port.get_or_insert(held);
        }
    }
    by_port
}

/// A refused Bind: logged, kept among the agent's recent errors, and answered with `code`.
pub(super) fn refuse_bind(
    hub: &Hub,
    grant: &AgentGrant,
    bind: &Bind,
    code: ErrorCode,
    text: String,
) -> BindResult {
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
}

pub(super) async fn bind_port(
    hub: &Arc<Hub>,
    grant: &AgentGrant,
    (session, flows): (&Session, &Arc<Mutex<udp::GatewayFlows>>),
    generation: u64,
    bind: &Bind,
) -> BindResult {
    let refuse = |code: ErrorCode, text: String| refuse_bind(hub, grant, bind, code, text);
    if bind.path.is_some() {
        if bind.group.is_some() {
            return refuse(
                ErrorCode::PortNotGranted,
                "a group shares a public port; a unix socket endpoint cannot join one (drop the \
                 forward's ?group= or give it a port)"
                    .into(),
            );
        }
        return super::unix::bind_path(hub, grant, session, generation, bind).await;
    }
    let proto = match bind.protocol {
        Protocol::Tcp => "TCP",
        Protocol::Udp => "UDP",
    };
    let not_granted = |port: u16| {
        let port = if port == 0 {
            "no port".to_string()
        } else {
            format!("port {port}")
        };
        format!(
            "{proto} {port} is not granted to agent `{}` (granted: {}){}",
            grant.name,
            describe_ports(&grant.ports),
            if bind.protocol == Protocol::Udp {
                "; UDP ports are granted with /udp, as in ports = [\"5353/udp\"]"
            } else {
                ""
            }
        )
    };
    if !grant.allows_on(bind.protocol, bind.port) {
        return refuse(ErrorCode::PortNotGranted, not_granted(bind.port));
    }
    let group = bind.group.as_deref();
    if let Some(group) = group {
        // What an agent sends: names as the agent's config takes them, nothing longer.
        if crate::config::parse_group(group).as_deref() != Ok(group) {
            return refuse(
                ErrorCode::PortNotGranted,
                format!(
                    "that is not a group name: use 1 to {} letters, digits, `.`, `_` or `-`",
                    crate::config::MAX_GROUP_NAME
                ),
            );
        }
        if let Err(text) = group_admits(hub, group, &grant.name) {
            return refuse(ErrorCode::PortNotGranted, text);
        }
    }
    let route = Route {
        session: session.clone(),
        service: bind.service,
        name: bind.name.clone(),
        flows: flows.clone(),
    };
    let key = (bind.protocol, bind.name.clone());
    let max_ports = hub.config.limits.max_ports_per_agent;
    let in_group = |n: usize| match group {
        Some(g) => format!(" (group `{g}`, {n} members)"),
        None => String::new(),
    };
    // A leased port for the same service comes back as it was; a group's port is joined.
    {
        let mut agents = lock(&hub.agents);
        let held = held_by_others(&agents, &grant.name, bind);
        if let Some(h) = &held {
            let theirs = lock(&h.route).group.clone();
            let joins = h.by_group && (bind.port == 0 || bind.port == h.addr.port());
            if !joins {
                let port = h.addr.port();
                let text = match (theirs.as_deref(), group) {
                    (Some(g), Some(mine)) if g == mine => format!(
                        "group `{g}` has port {port} on this gateway, and this forward asks for port {}: give every member of a group the same port (or 0 to take the group's)",
                        bind.port
                    ),
                    (Some(g), Some(mine)) => format!(
                        "port {port} is the public port of group `{g}` on this gateway, and this forward is in group `{mine}`: a forward joins a group only with the same group name"
                    ),
                    (Some(g), None) => format!(
                        "port {port} is the public port of group `{g}` on this gateway (agents {}): to share it, put this forward in the group too (?group={g} after the spec, or group = \"{g}\" in [[forwards]])",
                        lock(&h.route).agents().join(", ")
                    ),
                    (None, _) => format!(
                        "port {port} is held by agent `{}`{} on this gateway (both agents' grants include it){}: ask the gateway's operator to give each agent its own ports, or pick another port",
                        h.holder,
                        if h.on_lease { " (reserved for it on lease)" } else { "" },
                        if group.is_some() { ", outside any group" } else { "" }
                    ),
                };
                return refuse(ErrorCode::PortInUse, text);
            }
            if !grant.allows_on(bind.protocol, h.addr.port()) {
                return refuse(
                    ErrorCode::PortNotGranted,
                    format!(
                        "group `{}` is on port {} of this gateway: {}",
                        group.unwrap_or_default(),
                        h.addr.port(),
                        not_granted(h.addr.port())
                    ),
                );
            }
        }
        let entry = agents
            .entry(grant.name.clone())
            .or_insert_with(|| AgentEntry::new(&hub.config.limits));
        let member = Member::new(&grant.name, generation, route.clone(), entry.conns.clone());
        if let Some(existing) = entry.ports.get_mut(&key) {
            let same_port = bind.port == 0 || bind.port == existing.addr.port();
            // A group found elsewhere is another port: this one is given up for it.
            let same_listener = held
                .as_ref()
                .is_none_or(|h| Arc::ptr_eq(&h.route, &existing.route));
            // A port shared with a group stays the group's: a bind naming another group (or
            // none) gives it up; one this agent holds alone takes the group the bind names.
            let fits = {
                let routes = lock(&existing.route);
                routes.group == bind.group || !routes.shared()
            };
            if same_port && same_listener && fits && existing.path.is_none() {
                let members = {
                    let mut routes = lock(&existing.route);
                    routes.group = bind.group.clone();
                    routes.join(member);
                    routes.len()
                };
                existing.owner = Some(generation);
                existing.lease = None;
                let text = public_text(hub, existing.addr);
                info!(service = %bind.name, public = %text, "public port granted (kept from lease){}", in_group(members));
                return BindResult {
                    service: bind.service,
                    code: ErrorCode::Normal,
                    text,
                };
            }
            if let Some(old) = entry.ports.remove(&key) {
                old.close();
                hub.forget_port(&grant.name, bind.protocol, &bind.name, &old);
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
        if let Some(h) = held {
            // Join the group's port: no listener of its own.
            let members = {
                let mut routes = lock(&h.route);
                routes.hold();
                routes.join(member);
                routes.len()
            };
            entry.ports.insert(
                key,
                PortEntry {
                    addr: h.addr,
                    route: h.route,
                    cancel: h.cancel,
                    owner: Some(generation),
                    lease: None,
                    chosen: false,
                    path: None,
                },
            );
            let text = public_text(hub, h.addr);
            info!(service = %bind.name, public = %text, "public port granted: joined{}", in_group(members));
            return BindResult {
                service: bind.service,
                code: ErrorCode::Normal,
                text,
            };
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
    let cancel = hub.stop.child_token();
    let route = {
        let mut agents = lock(&hub.agents);
        // Another member of the group may have bound its port meanwhile (both asked for port
        // 0): this one asks again, and joins it then.
        if group.is_some() {
            if let Some(h) = held_by_others(&agents, &grant.name, bind).filter(|h| h.by_group) {
                return refuse(
                    ErrorCode::PortInUse,
                    format!(
                        "group `{}` got port {} from another member meanwhile: asking again joins it",
                        group.unwrap_or_default(),
                        h.addr.port()
                    ),
                );
            }
        }
        let entry = agents
            .entry(grant.name.clone())
            .or_insert_with(|| AgentEntry::new(&hub.config.limits));
        // The session may have ended, or its agent been removed (a reload), meanwhile.
        if !matches!(entry.session, Some((g, ..)) if g == generation) {
            return refuse(
                ErrorCode::Replaced,
                "this session ended before its port was bound".into(),
            );
        }
        // Another session of this agent may have bound meanwhile.
        if let Err(text) = make_room(hub, entry, grant, max_ports) {
            return refuse(ErrorCode::LimitExceeded, text);
        }
        // The lease file keeps chosen ports, TCP and UDP, across a restart.
        let chosen = bind.port == 0;
        if chosen {
            hub.remember_port(&grant.name, bind.protocol, &bind.name, addr.port(), group);
        }
        let first = Member::new(&grant.name, generation, route, entry.conns.clone());
        let (port, route) =
            PortEntry::routed(addr, None, bind.group.clone(), first, &cancel, chosen);
        entry.ports.insert(key, port);
        route
    };
    match listener {
        Listener::Tcp(listener) => {
            let port = PublicPort {
                listener,
                route,
                cancel,
                agent: grant.name.clone(),
                service: bind.name.clone(),
                _fd: fd,
            };
            tokio::spawn(accept_public(hub.clone(), port).instrument(tracing::Span::current()));
        }
        Listener::Udp(socket) => {
            serve_udp_port(hub, socket, route, cancel, fd, &grant.name, &bind.name)
        }
    }
    let text = public_text(hub, addr);
    info!(service = %bind.name, public = %text, "public port granted{}", in_group(1));
    BindResult {
        service: bind.service,
        code: ErrorCode::Normal,
        text,
    }
}

/// Warnings for agents whose grants share ports: whichever binds a shared port first gets it,
/// and the other is refused (unless both are in a group). Agents declared in one group are
/// meant to share ports and are not named. At most 16 pairs are named.
pub(super) fn overlapping_grants(agents: &[AgentGrant], groups: &[GroupGrant]) -> Vec<String> {
    const MAX_NAMED: usize = 16;
    let mut out = Vec::new();
    let mut more = 0usize;
    let grouped = |a: &str, b: &str| {
        groups
            .iter()
            .any(|g| g.agents.iter().any(|x| x == a) && g.agents.iter().any(|x| x == b))
    };
    for (i, a) in agents.iter().enumerate() {
        for b in agents[i + 1..]
            .iter()
            .filter(|b| !grouped(&a.name, &b.name))
        {
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
                "agents `{}` and `{}` are both granted ports {}: whichever binds one first holds it, and the other is refused (unless both forwards name one group); give each agent its own ports",
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

pub(super) fn describe_ports(ports: &[PortRange]) -> String {
    let parts: Vec<String> = ports.iter().map(PortRange::to_string).collect();
    if parts.is_empty() {
        "none".into()
    } else {
        parts.join(", ")
    }
}

/// Binds a public port: the one asked for, or for port 0 one inside the agent's grant.
pub(super) async fn listen_public(
    host: IpAddr,
    port: u16,
    grant: &AgentGrant,
) -> Result<TcpListener, String> {
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

/// Serves a public UDP port of `agent`'s `service` until `cancel`, to the sessions `route`
/// names (a client's flow stays with one member, see `groups`); its descriptor permit `fd`
/// goes with it.
pub(super) fn serve_udp_port(
    hub: &Hub,
    socket: tokio::net::UdpSocket,
    route: Arc<Mutex<Routes>>,
    cancel: CancellationToken,
    fd: FdPermit,
    agent: &str,
    service: &str,
) {
    let routing = move |client: SocketAddr| {
        lock(&route).pin(client).map(|m| udp::UdpRoute {
            session: m.route.session.clone(),
            service: m.route.service,
            name: m.route.name.clone(),
            flows: m.route.flows.clone(),
        })
    };
    let counters = hub.tally.udp(agent, service);
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
pub(super) enum Listener {
    Tcp(TcpListener),
    Udp(tokio::net::UdpSocket),
}

impl Listener {
    pub(super) fn local_addr(&self) -> std::io::Result<SocketAddr> {
        match self {
            Listener::Tcp(l) => l.local_addr(),
            Listener::Udp(s) => s.local_addr(),
        }
    }
}

/// Binds a public UDP port: the one asked for, or for port 0 one inside the agent's UDP grant.
pub(super) async fn listen_public_udp(
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
pub(super) struct PublicPort {
    pub(super) listener: TcpListener,
    pub(super) route: Arc<Mutex<Routes>>,
    pub(super) cancel: CancellationToken,
    /// The agent that bound it (a group's clients count against the agent they go to).
    pub(super) agent: String,
    /// The service's name, as first bound (for metrics).
    pub(super) service: String,
    /// The listener's descriptor in the public budget.
    pub(super) _fd: FdPermit,
}

/// Why a public connection or port is refused near the open-file limit.
pub(super) fn near_fd_limit(hub: &Hub) -> String {
    format!(
        "the gateway is near its open-file limit ({} descriptors are kept for agent logins): raise the limit (`ulimit -Hn`, LimitNOFILE=) or lower limits.max_public_conns",
        hub.fds.tunnel
    )
}

/// The permits one public connection holds: the agent's, the gateway's, a descriptor.
type PublicPermits = (OwnedSemaphorePermit, OwnedSemaphorePermit, FdPermit);

/// Takes the permits for one more public connection to an agent with `conns`, or says which
/// limit refuses it.
pub(super) fn take_public(
    hub: &Hub,
    conns: &Arc<Semaphore>,
    agent: &str,
) -> Result<PublicPermits, String> {
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

pub(super) async fn accept_public(hub: Arc<Hub>, port: PublicPort) {
    let mut refusals = LogThrottle::default();
    let mut accept_errors = LogThrottle::default();
    let end = Endpoint {
        route: &port.route,
        agent: &port.agent,
        service: &port.service,
    };
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
        transport::tune(&tcp);
        serve_public_conn(
            &hub,
            &end,
            &mut refusals,
            Local::Tcp(tcp),
            Some(client),
            &client,
            tracing::Span::current(),
        );
    }
}

/// What a public endpoint (a TCP port or a unix socket) gives each of its connections.
pub(super) struct Endpoint<'a> {
    /// The sessions routing it (one, or a group's members).
    pub(super) route: &'a Mutex<Routes>,
    /// The agent that bound it and its service, for the metrics of a connection no session
    /// takes (one a member takes counts against the member's agent).
    pub(super) agent: &'a str,
    pub(super) service: &'a str,
}

/// One accepted public connection: a session routing its endpoint (in a group, the live
/// member with the fewest streams through it, ties in turn), that agent's connection limits, a
/// stream in that session, then the relay, in a tracked task. `client` travels in the Open;
/// `peer` names the client in log lines; `span` is the relay's.
pub(super) fn serve_public_conn(
    hub: &Arc<Hub>,
    end: &Endpoint<'_>,
    refusals: &mut LogThrottle,
    local: Local,
    client: Option<std::net::SocketAddr>,
    peer: &dyn std::fmt::Display,
    span: tracing::Span,
) {
    let picked = lock(end.route).pick();
    let Some((member, active)) = picked else {
        bump(&hub.stats.no_session);
        hub.tally
            .refused(end.agent, end.service, Refused::NoSession);
        debug!(%peer, "no agent session for this endpoint right now; closing the connection");
        return;
    };
    let (agent, route) = (member.agent.as_str(), &member.route);
    let permits = match take_public(hub, &member.conns, agent) {
        Ok(p) => p,
        Err(why) => {
            bump(&hub.stats.public_refused);
            hub.tally.refused(agent, &route.name, Refused::PublicLimit);
            if let Some(skipped) = lock(&hub.public_log).allow(Instant::now()) {
                warn!(%peer, service = %route.name, similar_since_last = skipped, "public connection refused: {why}");
            }
            reset(local);
            return;
        }
    };
    let open = Open {
        service: route.service,
        client,
    };
    let stream = match route.session.open(&open) {
        Ok(s) => s,
        Err(e) => {
            bump(&hub.stats.streams_refused);
            hub.tally.refused(agent, &route.name, Refused::StreamLimit);
            if let Some(skipped) = refusals.allow(Instant::now()) {
                warn!(%peer, service = %route.name, similar_since_last = skipped, "connection refused: {e}");
            }
            reset(local);
            return;
        }
    };
    bump(&hub.stats.streams);
    let meter = hub.tally.stream(agent, &route.name);
    let hub2 = hub.clone();
    let close = member.close.clone();
    let route = member.route.clone();
    let peer = peer.to_string();
    hub.tracker.spawn(
        async move {
            let _permits = permits;
            let _active = active;
            let _live = GaugeGuard::new(&hub2.stats.active_streams);
            let started = Instant::now();
            let mut local = local;
            let stats = tokio::select! {
                stats = relay::relay_metered(&stream, &mut local, Some(meter.meter(true))) => stats,
                _ = close.cancelled() => {
                    stream.reset(ErrorCode::PortNotGranted);
                    debug!(%peer, service = %route.name, "connection closed: its endpoint is no longer granted");
                    return;
                }
            };
            relay::log_end(&route.name, client, &stats, started, relay::LocalIs::Client);
        }
        .instrument(span),
    );
}

/// Drops a refused connection; a TCP one with a reset, so the client knows at once.
fn reset(local: Local) {
    if let Local::Tcp(tcp) = &local {
        let _ = socket2::SockRef::from(tcp).set_linger(Some(std::time::Duration::ZERO));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::KeySpec;
    use burrow_proto::auth::SecretKey;

    #[test]
    fn overlapping_grants_are_named() {
        let grant = |name: &str, ports: &[(u16, u16)]| AgentGrant {
            name: name.into(),
            key: KeySpec::Key(SecretKey::generate()),
            ports: ports
                .iter()
                .map(|&(start, end)| PortRange::tcp(start, end))
                .collect(),
            paths: Vec::new(),
            socket_mode: crate::config::DEFAULT_SOCKET_MODE,
        };
        let agents = [
            grant("a", &[(8080, 8080), (9000, 9100)]),
            grant("b", &[(9050, 9200)]),
            grant("c", &[(8081, 8089)]),
            grant("d", &[(8080, 8080), (9200, 9200)]),
        ];
        let w = overlapping_grants(&agents, &[]);
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
        let w = overlapping_grants(&many, &[]);
        assert_eq!(w.len(), 17);
        assert_eq!(w[16], "29 more pairs of agents share ports");
        // Agents declared in one group share ports on purpose.
        let web = GroupGrant {
            name: "web".into(),
            agents: vec!["a".into(), "d".into()],
        };
        let w = overlapping_grants(&agents, &[web]);
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(!w.iter().any(|w| w.contains("`a` and `d`")), "{w:?}");
    }
}
