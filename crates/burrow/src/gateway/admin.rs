//! What the gateway shows its admin server: the status of every agent, session and public
//! port, and the metrics (read from the gateway's tables and counters when asked).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;

use super::{lock, GatewayHandle, Hub};
use crate::admin::api::{ApiError, CreatedToken, TokenRequest, TokenRow};
use crate::admin::metrics::{unix_secs, AuthFailure, ServiceTally};
use crate::admin::status::{udp_row, AgentRow, ServiceRow, SessionRow, Status, Totals};
use crate::admin::Report;
use crate::session::Session;
use crate::udp::UdpCounters;
use burrow_proto::message::Protocol;

/// The gateway's side of its admin server.
pub(super) struct GatewayReport {
    pub(super) hub: Arc<Hub>,
    /// The tunnel listener's address.
    pub(super) listen: std::net::SocketAddr,
    /// Its certificate's, for the agent line of a new token.
    pub(super) fingerprint: Option<String>,
}

impl GatewayReport {
    fn handle(&self) -> GatewayHandle {
        GatewayHandle {
            hub: self.hub.clone(),
            listen: self.listen,
            fingerprint: self.fingerprint.clone(),
        }
    }
}

impl std::fmt::Debug for GatewayReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GatewayReport")
    }
}

/// A service's row from its counters (all zero when it has none yet).
pub(crate) fn row(
    name: &str,
    public: Option<String>,
    state: &str,
    t: Option<&Arc<ServiceTally>>,
) -> ServiceRow {
    let r = |f: fn(&ServiceTally) -> &AtomicU64| t.map_or(0, |t| f(t).load(Ordering::Relaxed));
    ServiceRow {
        name: name.to_string(),
        public,
        target: None,
        state: state.to_string(),
        group: None,
        members: None,
        error: None,
        streams_current: r(|t| &t.streams_current),
        streams_total: r(|t| &t.streams_total),
        streams_refused: t.map_or(0, |t| t.refused_total()),
        bytes_to_service: r(|t| &t.bytes_to_service),
        bytes_to_client: r(|t| &t.bytes_to_client),
        udp: None,
    }
}

impl GatewayReport {
    fn live_sessions(&self) -> Vec<Session> {
        lock(&self.hub.agents)
            .values()
            .filter_map(|a| a.session.as_ref().map(|(_, s, _)| s.clone()))
            .collect()
    }
}

impl Report for GatewayReport {
    fn status(&self) -> Status {
        let hub = &self.hub;
        let tally = &hub.tally;
        let services: HashMap<(String, String), Arc<ServiceTally>> =
            tally.services().into_iter().collect();
        let udp: HashMap<(String, String), Arc<UdpCounters>> =
            tally.udp_services().into_iter().collect();
        let mut names: Vec<(String, Option<String>)> = hub
            .grants()
            .iter()
            .map(|(hash, g)| (g.name.clone(), Some(hash.short())))
            .collect();
        names.sort();
        let agents_table = lock(&hub.agents);
        let mut rows = Vec::new();
        let mut connected = 0;
        for (name, key) in names {
            let board = tally.board(&name);
            let entry = agents_table.get(&name);
            let session = entry
                .and_then(|e| e.session.as_ref())
                .map(|(generation, s, _)| {
                    let meta = board
                        .session
                        .as_ref()
                        .filter(|m| m.generation == *generation);
                    SessionRow {
                        transport: meta.map_or_else(|| "?".into(), |m| m.transport.clone()),
                        address: meta.map_or_else(|| "?".into(), |m| m.peer.to_string()),
                        since: meta.map_or(0, |m| unix_secs(m.since)),
                        rtt_ms: meta.and_then(|m| m.rtt()).map(|d| d.as_secs_f64() * 1000.0),
                        streams: s.stream_count() as u64,
                    }
                });
            if session.is_some() {
                connected += 1;
            }
            let mut svc: Vec<ServiceRow> = entry
                .map(|e| {
                    e.ports
                        .iter()
                        .map(|((protocol, svc), port)| {
                            let state = if port.owner.is_some() {
                                "bound"
                            } else {
                                "leased"
                            };
                            let key = (name.clone(), svc.clone());
                            let mut r = row(svc, Some(port.shown(hub)), state, services.get(&key));
                            {
                                let routes = lock(&port.route);
                                r.group = routes.group.clone();
                                r.members = r.group.is_some().then(|| routes.len() as u64);
                            }
                            if *protocol == Protocol::Udp {
                                r.udp = Some(udp_row(udp.get(&key)));
                            }
                            r
                        })
                        .collect()
                })
                .unwrap_or_default();
            svc.sort_by(|a, b| a.name.cmp(&b.name));
            rows.push(AgentRow {
                name: name.clone(),
                key,
                connected: session.is_some(),
                session,
                sessions: board.sessions,
                services: svc,
                last_error: board.last_error,
                gateway: None,
                reconnect: None,
                stopped: None,
                state: None,
                state_since: None,
                transport: None,
            });
        }
        drop(agents_table);
        let mut totals = Totals {
            agents_connected: connected,
            sessions: hub.stats.sessions.load(Ordering::Relaxed),
            auth_failures: AuthFailure::ALL
                .iter()
                .map(|w| tally.auth_failures(*w))
                .sum(),
            ..Totals::default()
        };
        for ((_, name), t) in &services {
            totals.add(&row(name, None, "", Some(t)));
        }
        let started = tally.started();
        Status {
            role: "gateway".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            started: unix_secs(started),
            uptime_secs: SystemTime::now()
                .duration_since(started)
                .map_or(0, |d| d.as_secs()),
            listen: Some(self.listen.to_string()),
            gateway: None,
            reconnect: None,
            agents: rows,
            totals,
            recent_errors: tally.recent_errors(),
        }
    }

    fn metrics(&self) -> String {
        crate::admin::metrics::render(GatewayReport {
            hub: self.hub.clone(),
            listen: self.listen,
            fingerprint: None,
        })
    }

    fn tokens(&self) -> Result<Vec<TokenRow>, ApiError> {
        Ok(self.handle().tokens())
    }

    fn create_token(&self, req: &TokenRequest) -> Result<CreatedToken, ApiError> {
        self.handle().create_token(req)
    }

    fn revoke_token(&self, name: &str) -> Result<TokenRow, ApiError> {
        self.handle().revoke_token(name)
    }
}

impl Collector for GatewayReport {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let hub = &self.hub;
        let s = hub.stats.snapshot();
        let sessions = self.live_sessions();
        hub.tally
            .encode_common(&mut e, true, hub.tally.datagrams())?;
        let (bound, leased) = {
            let agents = lock(&hub.agents);
            let mut bound = 0i64;
            let mut leased = 0i64;
            for p in agents.values().flat_map(|a| a.ports.values()) {
                if p.owner.is_some() {
                    bound += 1;
                } else {
                    leased += 1;
                }
            }
            (bound, leased)
        };
        let gauge = |e: &mut DescriptorEncoder, name: &str, help: &str, v: i64| {
            let m = e.encode_descriptor(name, help, None, MetricType::Gauge)?;
            ConstGauge::new(v).encode(m)
        };
        let counter = |e: &mut DescriptorEncoder, name: &str, help: &str, v: u64| {
            let m = e.encode_descriptor(name, help, None, MetricType::Counter)?;
            ConstCounter::new(v).encode(m)
        };
        gauge(
            &mut e,
            "burrow_sessions_current",
            "Agent sessions up now",
            s.active_sessions as i64,
        )?;
        counter(
            &mut e,
            "burrow_sessions",
            "Agent sessions established",
            s.sessions,
        )?;
        gauge(
            &mut e,
            "burrow_agents_connected",
            "Agents with a session now",
            sessions.len() as i64,
        )?;
        gauge(
            &mut e,
            "burrow_agents_configured",
            "Agents the gateway accepts",
            hub.grants().len() as i64,
        )?;
        let mut m = e.encode_descriptor(
            "burrow_public_ports",
            "Public ports: bound (a session routes them) or leased (kept for their agent)",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(bound).encode(m.encode_family(&[("state", "bound")])?)?;
        ConstGauge::new(leased).encode(m.encode_family(&[("state", "leased")])?)?;
        let mut m = e.encode_descriptor(
            "burrow_tunnel_refused",
            "Tunnel connections refused or closed before their handshake: pre-auth table full, per-source cap, or closed to make room",
            None,
            MetricType::Counter,
        )?;
        for (why, v) in [
            ("preauth_full", s.preauth_refused),
            ("preauth_per_source", s.preauth_source_refused),
            ("evicted", s.preauth_evicted),
        ] {
            ConstCounter::new(v).encode(m.encode_family(&[("reason", why)])?)?;
        }
        counter(
            &mut e,
            "burrow_protocol_errors",
            "Sessions closed because the agent broke the protocol or a limit",
            s.protocol_errors,
        )?;
        Ok(())
    }
}
