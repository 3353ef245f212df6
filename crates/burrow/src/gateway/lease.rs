//! Leases: the ports of a dropped session stay reserved for its agent, in memory and, for
//! the ports the gateway chose, in the state directory across restarts.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use burrow_proto::message::Protocol;
use tokio::net::TcpListener;
use tracing::{info, warn};

use super::groups::Routes;
use super::ports::{accept_public, listen_public_udp, serve_udp_port, Listener, PublicPort};
use super::{lock, AgentEntry, Hub, PortEntry};
use crate::config::AgentGrant;

/// Writes the lease file whenever it changed, until the gateway stops (then once more).
pub(super) async fn write_leases(hub: Arc<Hub>) {
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
pub(super) async fn restore_leases(hub: &Arc<Hub>) {
    let leases = lock(&hub.lease_book).leases();
    if leases.is_empty() {
        return;
    }
    let grants = hub.grants();
    let by_name: HashMap<&str, &Arc<AgentGrant>> =
        grants.values().map(|g| (g.name.as_str(), g)).collect();
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
        let route = Arc::new(Mutex::new(Routes::new(l.group.clone())));
        let cancel = hub.stop.child_token();
        {
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
                    path: None,
                },
            );
        }
        match listener {
            Listener::Tcp(listener) => {
                let port = PublicPort {
                    listener,
                    route,
                    cancel,
                    agent: l.agent.clone(),
                    service: l.service.clone(),
                    _fd: fd,
                };
                tokio::spawn(accept_public(hub.clone(), port));
            }
            Listener::Udp(socket) => {
                serve_udp_port(hub, socket, route, cancel, fd, &l.agent, &l.service)
            }
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

/// After a session ends: unroute the ports it still routes and start their leases.
pub(super) fn release(hub: &Arc<Hub>, name: &str, generation: u64) {
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
pub(super) fn start_lease(hub: &Arc<Hub>, name: &str, entry: &mut AgentEntry, generation: u64) {
    let lease_id = hub.leases.fetch_add(1, Ordering::Relaxed);
    let mut any = false;
    for port in entry.ports.values_mut() {
        if port.owner == Some(generation) {
            // It leaves the group at once; the others carry on serving the port.
            lock(&port.route).leave(name, generation);
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
pub(super) fn spawn_lease_timer(hub: &Arc<Hub>, name: &str, lease_id: u64) {
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
            entry.ports.retain(|(protocol, service), port| {
                if port.lease != Some(lease_id) {
                    return true;
                }
                if port.close() {
                    info!(agent = %name, addr = %port.shown(&hub), "lease expired; public port closed");
                } else {
                    info!(agent = %name, addr = %port.shown(&hub), "lease expired; the agent left the group, whose other members keep the port");
                }
                hub.forget_port(&name, *protocol, service, port);
                false
            });
        }
    });
}
