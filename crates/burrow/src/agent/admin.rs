//! What the agent shows its admin server: its session, each forward's state and counters,
//! and the metrics.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::SystemTime;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use tokio::sync::watch;

use super::{AgentStatus, ForwardStatus};
use crate::admin::metrics::{unix_secs, ServiceTally, Tally};
use crate::admin::status::{udp_row, AgentRow, Reconnect, ServiceRow, SessionRow, Status, Totals};
use crate::admin::Report;
use crate::config::{AgentConfig, Forward, Protocol};
use crate::udp::UdpCounters;

/// The agent's side of its admin server.
pub(super) struct AgentReport {
    pub(super) config: AgentConfig,
    /// One per gateway, in the order of [`AgentConfig::gateways`].
    pub(super) statuses: Vec<watch::Receiver<AgentStatus>>,
    pub(super) tally: Arc<Tally>,
    /// The forwards in force (after a reload, not the config's at start).
    pub(super) forwards: watch::Receiver<Arc<Vec<Forward>>>,
}

impl std::fmt::Debug for AgentReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AgentReport")
    }
}

fn row(name: &str, t: Option<&Arc<ServiceTally>>) -> ServiceRow {
    use std::sync::atomic::Ordering::Relaxed;
    let r =
        |f: fn(&ServiceTally) -> &std::sync::atomic::AtomicU64| t.map_or(0, |t| f(t).load(Relaxed));
    ServiceRow {
        name: name.to_string(),
        public: None,
        target: None,
        state: String::new(),
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

impl Report for AgentReport {
    fn status(&self) -> Status {
        let statuses: Vec<AgentStatus> = self.statuses.iter().map(|r| r.borrow().clone()).collect();
        let gateways = self.config.gateways();
        let services: HashMap<String, Arc<ServiceTally>> = self
            .tally
            .services()
            .into_iter()
            .map(|((_, s), t)| (s, t))
            .collect();
        let configured = self.forwards.borrow().clone();
        let udp: HashMap<String, Arc<UdpCounters>> = self
            .tally
            .udp_services()
            .into_iter()
            .map(|((_, s), c)| (s, c))
            .collect();
        let started = self.tally.started();
        // One row per gateway: the session with it and the forwards as it answered them (the
        // counters are the forward's, over every gateway).
        let rows: Vec<AgentRow> = gateways
            .iter()
            .zip(&statuses)
            .map(|(gw, st)| {
                let board = self.tally.board(&gw.gateway);
                let session = board
                    .session
                    .as_ref()
                    .filter(|_| st.connected)
                    .map(|m| SessionRow {
                        transport: m.transport.clone(),
                        address: m.peer.clone(),
                        since: unix_secs(m.since),
                        rtt_ms: m.rtt().map(|d| d.as_secs_f64() * 1000.0),
                        streams: m.session.stream_count() as u64,
                    });
                let forwards = st
                    .names
                    .iter()
                    .enumerate()
                    .map(|(i, name)| {
                        let mut r = row(name, services.get(name));
                        let f = configured.iter().find(|f| f.name == *name);
                        r.target = f.map(|f| f.target.to_string());
                        r.group = f.and_then(|f| f.group.clone());
                        if f.is_some_and(|f| f.protocol == Protocol::Udp) {
                            r.udp = Some(udp_row(udp.get(name)));
                        }
                        match st.forwards.get(i) {
                            Some(ForwardStatus::Granted(public)) => {
                                r.state = "granted".into();
                                r.public = Some(public.clone());
                            }
                            Some(ForwardStatus::Refused(why)) => {
                                r.state = "refused".into();
                                r.error = Some(why.clone());
                            }
                            Some(ForwardStatus::Pending) | None => r.state = "pending".into(),
                        }
                        r
                    })
                    .collect();
                let transport = session.as_ref().map(|s| s.transport.clone()).or_else(|| {
                    super::dial::gateway_url(gw)
                        .ok()
                        .map(|u| u.scheme.name().to_string())
                });
                AgentRow {
                    name: board.name.clone().unwrap_or_else(|| "this agent".into()),
                    key: Some(self.config.key.hash().short()),
                    connected: st.connected,
                    session,
                    sessions: st.sessions,
                    services: forwards,
                    last_error: board.last_error.clone(),
                    gateway: Some(gw.gateway.clone()),
                    reconnect: reconnect(st),
                    stopped: st.stopped.clone(),
                    state: Some(
                        match (st.connected, &st.stopped, st.sessions) {
                            (true, ..) => "connected",
                            (false, Some(_), _) => "stopped",
                            (false, None, 0) => "connecting",
                            (false, None, _) => "reconnecting",
                        }
                        .into(),
                    ),
                    state_since: Some(unix_secs(st.since.unwrap_or(started))),
                    // While connected, the session's carrier (for `auto://`, `quic` or `tls`).
                    transport,
                }
            })
            .collect();
        let mut totals = Totals {
            agents_connected: statuses.iter().filter(|s| s.connected).count() as u64,
            sessions: statuses.iter().map(|s| s.sessions).sum(),
            ..Totals::default()
        };
        for (name, t) in &services {
            totals.add(&row(name, Some(t)));
        }
        let names: Vec<&str> = gateways.iter().map(|g| g.gateway.as_str()).collect();
        Status {
            role: "agent".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            started: unix_secs(started),
            uptime_secs: SystemTime::now()
                .duration_since(started)
                .map_or(0, |d| d.as_secs()),
            listen: None,
            gateway: Some(names.join(", ")),
            reconnect: match statuses.as_slice() {
                [one] => reconnect(one),
                _ => None,
            },
            agents: rows,
            totals,
            recent_errors: self.tally.recent_errors(),
        }
    }

    fn metrics(&self) -> String {
        crate::admin::metrics::render(AgentReport {
            config: self.config.clone(),
            statuses: self.statuses.clone(),
            tally: self.tally.clone(),
            forwards: self.forwards.clone(),
        })
    }
}

/// How a gateway's session is being retried, while it is down.
fn reconnect(st: &AgentStatus) -> Option<Reconnect> {
    (!st.connected && st.stopped.is_none()).then(|| Reconnect {
        failed_attempts: st.failed_attempts,
        next_retry_ms: st
            .next_retry
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
    })
}

impl Collector for AgentReport {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let statuses: Vec<AgentStatus> = self.statuses.iter().map(|r| r.borrow().clone()).collect();
        self.tally
            .encode_common(&mut e, false, self.tally.datagrams())?;
        let m = e.encode_descriptor(
            "burrow_connected",
            "Gateways the agent has a session with now (with one gateway: 1 or 0)",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(statuses.iter().filter(|s| s.connected).count() as i64).encode(m)?;
        let m = e.encode_descriptor(
            "burrow_sessions",
            "Sessions established with the gateways",
            None,
            MetricType::Counter,
        )?;
        ConstCounter::new(statuses.iter().map(|s| s.sessions).sum::<u64>()).encode(m)?;
        let m = e.encode_descriptor(
            "burrow_connect_failures_current",
            "Failed attempts to reach the gateways since their last sessions",
            None,
            MetricType::Gauge,
        )?;
        let failures: u32 = statuses.iter().map(|s| s.failed_attempts).sum();
        ConstGauge::new(i64::from(failures)).encode(m)?;
        let mut m = e.encode_descriptor(
            "burrow_forwards",
            "Forwards by state, counted on each gateway: pending (not answered yet), granted, refused",
            None,
            MetricType::Gauge,
        )?;
        let mut counts = [0i64; 3];
        for f in statuses.iter().flat_map(|s| &s.forwards) {
            counts[match f {
                ForwardStatus::Pending => 0,
                ForwardStatus::Granted(_) => 1,
                ForwardStatus::Refused(_) => 2,
            }] += 1;
        }
        for (state, n) in ["pending", "granted", "refused"].iter().zip(counts) {
            ConstGauge::new(n).encode(m.encode_family(&[("state", *state)])?)?;
        }
        Ok(())
    }
}
