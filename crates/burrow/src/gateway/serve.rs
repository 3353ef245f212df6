//! One authenticated session: its binds, its public streams and its end.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use burrow_proto::message::{Bind, BindResult, Unbind};
use burrow_proto::mux::Side;
use burrow_proto::{ErrorCode, Kind};
use tokio::time::Instant;
use tracing::{debug, info, warn, Instrument};

use super::lease::{release, start_lease};
use super::ports::bind_port;
use super::reload::unbind_port;
use super::{lock, AgentEntry, Hub, REBIND_INTERVAL};
use crate::admin::metrics::SessionMeta;
use crate::session::handshake;
use crate::stats::{bump, GaugeGuard};
use crate::transport;
use crate::udp;

pub(super) async fn serve_agent(
    hub: Arc<Hub>,
    conn: transport::Connected,
    acc: handshake::Accepted,
    peer: SocketAddr,
    transport: &'static str,
) {
    if !hub.grants().contains_key(&acc.key) {
        return;
    }
    let name = acc.name.clone();
    let span = tracing::info_span!("agent", name = %name);
    async move {
        let started = conn.start(acc.leftover, Side::Gateway, acc.params, name.clone());
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
            // Checked again under the lock a change of agents takes after swapping them: the
            // key may have been removed (or its token revoked) since the handshake.
            if hub.grants().get(&acc.key).is_none_or(|g| g.name != name) {
                drop(agents);
                session.close(ErrorCode::AuthFailed, "this key is no longer accepted by the gateway");
                return;
            }
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
        hub.connectors.agent_up(&name, generation, session.clone());
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
        // The name each service id of this session was bound under (for Unbind).
        let mut ids: HashMap<u32, String> = HashMap::new();
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
                        // The grant as it is now: a reload may have changed it since the handshake.
                        let Some(grant) = hub.grants().get(&acc.key).cloned() else {
                            refuse(ErrorCode::AuthFailed, "this key is no longer accepted by the gateway".into());
                            continue;
                        };
                        let result = bind_port(&hub, &grant, (&session, &flows), generation, &bind).await;
                        let refused = (result.code != ErrorCode::Normal).then(Instant::now);
                        names.insert(bind.name.clone(), refused);
                        if ids.len() < burrow_proto::message::MAX_BINDS || ids.contains_key(&bind.service) {
                            ids.insert(bind.service, bind.name.clone());
                        }
                        session.send_control(result.to_frame());
                    }
                    Some(f) if f.header.kind == Kind::Announce => {
                        super::connect::announce(&hub, &name, generation, &session, &f);
                    }
                    Some(f) if f.header.kind == Kind::Unbind => {
                        let unbind = match Unbind::decode(&f.payload) {
                            Ok(u) => u,
                            Err(e) => {
                                session.close(e.code, e.detail);
                                continue;
                            }
                        };
                        let Some(service) = ids.remove(&unbind.service) else {
                            debug!(service = unbind.service, "unbind of a service this session never bound; ignored");
                            continue;
                        };
                        // The name is free again: the agent may bind it anew (a changed forward).
                        names.remove(&service);
                        if unbind_port(&hub, &name, generation, unbind.service) {
                            info!(%service, "the agent removed this service: public port closed");
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
        if end.lost {
            warn!(%peer, "agent connection lost: {}", end.detail);
        } else if matches!(end.code, ErrorCode::Normal | ErrorCode::Shutdown | ErrorCode::Replaced) {
            info!(%peer, reason = %end, "agent session ended");
        } else {
            warn!(%peer, reason = %end, "agent session ended");
        }
        hub.tally.session_down(&name, generation, &end);
        hub.connectors.agent_down(&name, generation);
        hub.seen(&name);
        release(&hub, &name, generation);
    }
    .instrument(span)
    .await
}
