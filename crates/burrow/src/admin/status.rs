//! What `/api/status` answers: the same shape on gateway and agent (an agent is a gateway's
//! view of one agent, its forwards as services), so the status page and `burrow status`
//! read either.

use serde::{Deserialize, Serialize};

pub use super::metrics::Event;

/// The whole status of a gateway or an agent.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Status {
    /// `gateway` or `agent`.
    pub role: String,
    /// The burrow version.
    pub version: String,
    /// When the process started, in seconds since the Unix epoch.
    pub started: u64,
    /// Seconds since then.
    pub uptime_secs: u64,
    /// Gateway: the tunnel listener's address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen: Option<String>,
    /// Agent: the gateway it dials (several: all of them, comma-separated; each has its own
    /// row in `agents`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    /// Agent with one gateway: while it is between sessions, how it is retrying (with
    /// several, each row of `agents` has its own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reconnect: Option<Reconnect>,
    /// Gateway: every agent it knows (configured or seen); agent: itself.
    pub agents: Vec<AgentRow>,
    /// Sums over every service.
    pub totals: Totals,
    /// The last errors, oldest first.
    pub recent_errors: Vec<Event>,
}

/// An agent between sessions.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Reconnect {
    /// Failed attempts since the last session.
    pub failed_attempts: u32,
    /// Milliseconds until the next attempt, while waiting for it.
    pub next_retry_ms: Option<u64>,
}

/// One agent.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AgentRow {
    /// Its name (at the agent: the name the gateway knows it by, once connected).
    pub name: String,
    /// Its key hash, shortened (gateway only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// Whether it has a session now.
    pub connected: bool,
    /// The session it has now.
    pub session: Option<SessionRow>,
    /// Sessions established since the process started.
    pub sessions: u64,
    /// Its services (at the agent: its forwards).
    pub services: Vec<ServiceRow>,
    /// The last thing that went wrong for it.
    pub last_error: Option<Event>,
    /// Agent: the gateway this row is about (one row per gateway).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    /// Agent: while this gateway's session is down, how it is retrying.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reconnect: Option<Reconnect>,
    /// Agent: why it gave up on this gateway for good (it carries on with the others).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stopped: Option<String>,
    /// Agent: this gateway's state: `connecting` (no session yet), `connected`,
    /// `reconnecting` or `stopped`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    /// Agent: since when it is in that state, in seconds since the Unix epoch (for
    /// `connecting`, since the agent started).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_since: Option<u64>,
    /// Agent: the transport it dials this gateway with (`tls`, `tcp`, `ws`, `wss`, `quic`,
    /// `auto`), connected or not; while connected, the session's carrier (for `auto`, `quic`
    /// or `tls`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transport: Option<String>,
}

/// A live session.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SessionRow {
    /// `tls`, `tcp`, `ws`, `wss`, `quic`, or `ws-listen` (at the gateway: WebSocket behind a
    /// proxy); for an `auto://` agent, the carrier in use (`quic` or `tls`).
    pub transport: String,
    /// The peer's address (at the agent: the gateway's).
    pub address: String,
    /// When it was established, in seconds since the Unix epoch.
    pub since: u64,
    /// The last round-trip time measured, in milliseconds; none before the first heartbeat.
    pub rtt_ms: Option<f64>,
    /// Streams open in it now.
    pub streams: u64,
}

/// One service (at the agent: one forward).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ServiceRow {
    /// Its name.
    pub name: String,
    /// The public address clients use, once granted.
    pub public: Option<String>,
    /// Where the agent connects its streams (agent only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// Gateway: `bound` (a session routes it) or `leased` (reserved for the agent). Agent:
    /// `pending`, `granted` or `refused`.
    pub state: String,
    /// The group whose port it shares, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Gateway, a group's port: the sessions serving it now, over every agent of the group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub members: Option<u64>,
    /// Why it was refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Streams open now.
    pub streams_current: u64,
    /// Streams opened.
    pub streams_total: u64,
    /// Connections or streams that did not get through.
    pub streams_refused: u64,
    /// Bytes from clients to the service.
    pub bytes_to_service: u64,
    /// Bytes from the service to clients.
    pub bytes_to_client: u64,
    /// A UDP service's flows and datagrams (its streams fields stay 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub udp: Option<UdpRow>,
}

/// A UDP service's flows and datagrams, over its sessions.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct UdpRow {
    /// Flows open now.
    pub flows_current: u64,
    /// Flows opened.
    pub flows_total: u64,
    /// Datagrams of new flows dropped at the flow limit.
    pub flows_refused: u64,
    /// Datagrams from clients to the service.
    pub datagrams_to_service: u64,
    /// Datagrams from the service to clients.
    pub datagrams_to_client: u64,
    /// Their bytes, from clients to the service.
    pub bytes_to_service: u64,
    /// Their bytes, from the service to clients.
    pub bytes_to_client: u64,
    /// Datagrams dropped, both ways.
    pub dropped: u64,
}

/// The row of a UDP service's counters (all zero when it has none yet).
pub fn udp_row(c: Option<&std::sync::Arc<crate::udp::UdpCounters>>) -> UdpRow {
    use std::sync::atomic::Ordering::Relaxed;
    let Some(c) = c else {
        return UdpRow::default();
    };
    UdpRow {
        flows_current: c.flows_current.load(Relaxed),
        flows_total: c.flows.load(Relaxed),
        flows_refused: c.flows_refused.load(Relaxed),
        datagrams_to_service: c.datagrams_to_service.load(Relaxed),
        datagrams_to_client: c.datagrams_to_client.load(Relaxed),
        bytes_to_service: c.bytes_to_service.load(Relaxed),
        bytes_to_client: c.bytes_to_client.load(Relaxed),
        dropped: c.dropped.load(Relaxed),
    }
}

/// Sums over every service, and the failures that belong to no service.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Totals {
    /// Agents with a session now (at the agent: 1 while connected).
    pub agents_connected: u64,
    /// Sessions established.
    pub sessions: u64,
    /// Streams open now.
    pub streams_current: u64,
    /// Streams opened.
    pub streams_total: u64,
    /// Connections or streams that did not get through.
    pub streams_refused: u64,
    /// Bytes from clients to services.
    pub bytes_to_service: u64,
    /// Bytes from services to clients.
    pub bytes_to_client: u64,
    /// Tunnel connections that did not become a session (gateway).
    pub auth_failures: u64,
}

impl Totals {
    /// Adds one service's counters.
    pub fn add(&mut self, s: &ServiceRow) {
        self.streams_current += s.streams_current;
        self.streams_total += s.streams_total;
        self.streams_refused += s.streams_refused;
        self.bytes_to_service += s.bytes_to_service;
        self.bytes_to_client += s.bytes_to_client;
    }
}
