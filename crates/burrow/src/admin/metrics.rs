//! What both roles count for `/metrics` and `/api/status`: per-service streams and bytes,
//! session ends by reason, authentication failures by reason, handshake and RTT histograms,
//! datagrams of sessions that have ended, and the last errors.
//!
//! The hot path only bumps atomics (a stream's counters are looked up once, when it opens);
//! `/metrics` reads them, with the role's own gauges, when it is scraped, and encodes them in
//! the Prometheus text format with `prometheus-client`.

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use burrow_proto::ErrorCode;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Unit;

use crate::relay::Meter;
use crate::session::{DatagramCounters, Session, SessionEnd};
use crate::udp::UdpCounters;

/// Most (agent, service) pairs counted apart; the streams of any further ones are counted
/// under the service name [`OTHER`], so agents naming ever new services cannot grow the
/// table (or a scrape) without bound.
pub const MAX_SERVICE_SERIES: usize = 1024;
/// The service name that counts the streams past [`MAX_SERVICE_SERIES`].
pub const OTHER: &str = "_other";
/// Errors kept for `/api/status`.
pub const RECENT_ERRORS: usize = 16;
/// Longest error text kept (the rest is cut).
const ERROR_TEXT: usize = 300;

/// Why a client connection or a stream did not get through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The session's stream limit (`max_streams`).
    StreamLimit,
    /// `max_public_conns`, `max_public_conns_per_agent` or the descriptors.
    PublicLimit,
    /// The port's agent has no session right now.
    NoSession,
    /// The agent got a stream for a service that is not granted or not configured.
    NotAllowed,
    /// The target refused the connection.
    ConnectRefused,
    /// Connecting to the target failed another way.
    ConnectFailed,
    /// Connecting to the target took longer than `connect_timeout`.
    ConnectTimeout,
}

impl Refused {
    const ALL: [Refused; 7] = [
        Refused::StreamLimit,
        Refused::PublicLimit,
        Refused::NoSession,
        Refused::NotAllowed,
        Refused::ConnectRefused,
        Refused::ConnectFailed,
        Refused::ConnectTimeout,
    ];

    fn label(self) -> &'static str {
        match self {
            Refused::StreamLimit => "stream_limit",
            Refused::PublicLimit => "public_limit",
            Refused::NoSession => "no_session",
            Refused::NotAllowed => "not_allowed",
            Refused::ConnectRefused => "connect_refused",
            Refused::ConnectFailed => "connect_failed",
            Refused::ConnectTimeout => "connect_timeout",
        }
    }
}

/// Why a tunnel connection did not become a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    /// The key is not one the gateway accepts.
    UnknownKey,
    /// A known key whose proof does not verify.
    BadProof,
    /// TLS, the preamble, the WebSocket upgrade or the messages failed (or the peer left).
    Handshake,
    /// The handshake took longer than `handshake_timeout`.
    Timeout,
    /// The source address had used up its budget of failed handshakes.
    RateLimited,
    /// A token's key that was revoked or has expired.
    Revoked,
}

impl AuthFailure {
    pub(crate) const ALL: [AuthFailure; 6] = [
        AuthFailure::UnknownKey,
        AuthFailure::BadProof,
        AuthFailure::Handshake,
        AuthFailure::Timeout,
        AuthFailure::RateLimited,
        AuthFailure::Revoked,
    ];

    fn label(self) -> &'static str {
        match self {
            AuthFailure::UnknownKey => "unknown_key",
            AuthFailure::BadProof => "bad_proof",
            AuthFailure::Handshake => "handshake",
            AuthFailure::Timeout => "timeout",
            AuthFailure::RateLimited => "rate_limited",
            AuthFailure::Revoked => "revoked",
        }
    }
}

/// One service's counters (on the gateway: one agent's service).
#[derive(Debug, Default)]
pub struct ServiceTally {
    /// Streams opened.
    pub streams_total: AtomicU64,
    /// Streams open now.
    pub streams_current: AtomicU64,
    /// Bytes from clients to the service.
    pub bytes_to_service: AtomicU64,
    /// Bytes from the service to clients.
    pub bytes_to_client: AtomicU64,
    refused: [AtomicU64; Refused::ALL.len()],
}

impl ServiceTally {
    /// Connections or streams refused, all reasons together.
    pub fn refused_total(&self) -> u64 {
        self.refused.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }
}

/// Holds one stream in its service's counters: counted when made, `streams_current` lowered
/// when dropped.
#[derive(Debug)]
pub struct StreamMeter {
    tally: Arc<ServiceTally>,
}

impl StreamMeter {
    /// The byte counters for [`crate::relay::relay_metered`], for a relay whose local socket is
    /// the client (`local_is_client`, at the gateway) or the target (at the agent).
    pub fn meter(&self, local_is_client: bool) -> Meter<'_> {
        let t = &self.tally;
        if local_is_client {
            Meter {
                from_local: &t.bytes_to_service,
                to_local: &t.bytes_to_client,
            }
        } else {
            Meter {
                from_local: &t.bytes_to_client,
                to_local: &t.bytes_to_service,
            }
        }
    }
}

impl Drop for StreamMeter {
    fn drop(&mut self) {
        self.tally.streams_current.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Something that went wrong, for `/api/status`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Event {
    /// Seconds since the Unix epoch.
    pub at: u64,
    /// Who or what it was about: an agent's name, a peer address.
    pub about: String,
    /// What happened.
    pub text: String,
}

/// The session an agent (or, at the agent, this process) has now.
#[derive(Debug, Clone)]
pub struct SessionMeta {
    /// Which session of the agent.
    pub generation: u64,
    /// The peer's address.
    pub peer: String,
    /// `tls`, `tcp`, `ws`, `wss`.
    pub transport: String,
    /// When it was established.
    pub since: SystemTime,
    /// The handle, for its stream count.
    pub session: Session,
    /// The last RTT measured, in microseconds; 0 until the first heartbeat's answer.
    pub rtt_us: Arc<AtomicU64>,
}

impl SessionMeta {
    /// A session with no RTT measured yet.
    pub fn new(generation: u64, peer: impl ToString, transport: &str, session: Session) -> Self {
        SessionMeta {
            generation,
            peer: peer.to_string(),
            transport: transport.to_string(),
            since: SystemTime::now(),
            session,
            rtt_us: Arc::default(),
        }
    }

    /// The last RTT measured, if any.
    pub fn rtt(&self) -> Option<Duration> {
        match self.rtt_us.load(Ordering::Relaxed) {
            0 => None,
            us => Some(Duration::from_micros(us)),
        }
    }
}

/// What is known of one agent (at the agent: of this process) beyond the role's own tables.
#[derive(Debug, Clone, Default)]
pub struct Board {
    /// At the agent: the name the gateway knows it by.
    pub name: Option<String>,
    /// The session up now.
    pub session: Option<SessionMeta>,
    /// Sessions established.
    pub sessions: u64,
    /// The last error: a session that ended other than by shutdown, a refused bind.
    pub last_error: Option<Event>,
}

#[derive(Debug, Default)]
struct Datagrams {
    live: BTreeMap<(String, u64), Session>,
    ended: [u64; 4],
}

fn datagram_counts(s: &Session) -> [u64; 4] {
    let c: &DatagramCounters = s.datagram_counters();
    [&c.sent, &c.dropped_out, &c.received, &c.dropped_in].map(|v| v.load(Ordering::Relaxed))
}

/// The counters one role keeps for its admin server.
#[derive(Debug)]
pub struct Tally {
    role: &'static str,
    started: SystemTime,
    services: Mutex<BTreeMap<(String, String), Arc<ServiceTally>>>,
    /// UDP services' counters, by (agent, service), capped as `services` is.
    udp: Mutex<BTreeMap<(String, String), Arc<UdpCounters>>>,
    ends: Mutex<BTreeMap<(String, &'static str), u64>>,
    auth: [AtomicU64; AuthFailure::ALL.len()],
    handshake: Histogram,
    rtt: Histogram,
    /// Datagram counts: the sessions up now, and the sums of those that have ended (sent,
    /// dropped out, received, dropped in), under one lock so a session that ends is never
    /// counted twice or not at all.
    dgrams: Mutex<Datagrams>,
    errors: Mutex<VecDeque<Event>>,
    boards: Mutex<BTreeMap<String, Board>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Seconds since the Unix epoch.
pub fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn cut(text: &str) -> String {
    if text.len() <= ERROR_TEXT {
        return text.to_string();
    }
    let mut end = ERROR_TEXT;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

/// `LimitExceeded` as `limit_exceeded`.
fn snake(code: ErrorCode) -> String {
    let mut out = String::new();
    for (i, c) in format!("{code:?}").chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

impl Tally {
    /// Counters for a role (`gateway` or `agent`), started now.
    pub fn new(role: &'static str) -> Tally {
        Tally {
            role,
            started: SystemTime::now(),
            services: Mutex::new(BTreeMap::new()),
            udp: Mutex::new(BTreeMap::new()),
            ends: Mutex::new(BTreeMap::new()),
            auth: Default::default(),
            // 1 ms to 10 s: loopback to a slow satellite link, TLS included.
            handshake: Histogram::new([
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
            rtt: Histogram::new([
                0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            ]),
            dgrams: Mutex::default(),
            errors: Mutex::new(VecDeque::new()),
            boards: Mutex::new(BTreeMap::new()),
        }
    }

    /// When the role started.
    pub fn started(&self) -> SystemTime {
        self.started
    }

    /// The counters of `service` of `agent` (at the agent, `agent` is empty).
    pub fn service(&self, agent: &str, service: &str) -> Arc<ServiceTally> {
        let mut map = lock(&self.services);
        let key = (agent.to_string(), service.to_string());
        if let Some(t) = map.get(&key) {
            return t.clone();
        }
        let key = if map.len() >= MAX_SERVICE_SERIES {
            (agent.to_string(), OTHER.to_string())
        } else {
            key
        };
        map.entry(key).or_default().clone()
    }

    /// The counters of UDP `service` of `agent` (at the agent, `agent` is empty); past
    /// [`MAX_SERVICE_SERIES`] services, they are shared under [`OTHER`].
    pub fn udp(&self, agent: &str, service: &str) -> Arc<UdpCounters> {
        let mut map = lock(&self.udp);
        let key = (agent.to_string(), service.to_string());
        if let Some(t) = map.get(&key) {
            return t.clone();
        }
        let key = if map.len() >= MAX_SERVICE_SERIES {
            (agent.to_string(), OTHER.to_string())
        } else {
            key
        };
        map.entry(key).or_default().clone()
    }

    /// Every UDP service's counters, by (agent, service).
    pub fn udp_services(&self) -> Vec<((String, String), Arc<UdpCounters>)> {
        lock(&self.udp)
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Counts a stream of `service` of `agent` that opens now.
    pub fn stream(&self, agent: &str, service: &str) -> StreamMeter {
        let tally = self.service(agent, service);
        tally.streams_total.fetch_add(1, Ordering::Relaxed);
        tally.streams_current.fetch_add(1, Ordering::Relaxed);
        StreamMeter { tally }
    }

    /// Counts a client connection or stream of `service` that did not get through.
    pub fn refused(&self, agent: &str, service: &str, why: Refused) {
        let t = self.service(agent, service);
        t.refused[why as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a failed handshake, and keeps it among the last errors.
    pub fn auth_failure(&self, why: AuthFailure, peer: SocketAddr, text: &str) {
        self.auth[why as usize].fetch_add(1, Ordering::Relaxed);
        if why != AuthFailure::RateLimited {
            self.error(&peer.to_string(), text);
        }
    }

    /// Failed handshakes for one reason.
    pub fn auth_failures(&self, why: AuthFailure) -> u64 {
        self.auth[why as usize].load(Ordering::Relaxed)
    }

    /// Records how long a handshake that succeeded took.
    pub fn handshake_took(&self, d: Duration) {
        self.handshake.observe(d.as_secs_f64());
    }

    /// A session came up: `name`'s board gets it, and its RTT samples go to the histogram.
    pub fn session_up(self: &Arc<Self>, name: &str, meta: SessionMeta) {
        let weak = Arc::downgrade(self);
        let last = meta.rtt_us.clone();
        meta.session.on_rtt(Box::new(move |rtt| {
            let us = u64::try_from(rtt.as_micros()).unwrap_or(u64::MAX).max(1);
            last.store(us, Ordering::Relaxed);
            if let Some(t) = weak.upgrade() {
                t.rtt.observe(rtt.as_secs_f64());
            }
        }));
        lock(&self.dgrams)
            .live
            .insert((name.to_string(), meta.generation), meta.session.clone());
        let mut boards = lock(&self.boards);
        let board = boards.entry(name.to_string()).or_default();
        board.sessions += 1;
        board.session = Some(meta);
    }

    /// Session `generation` of `name` ended: counted by reason, its datagram counts kept,
    /// and unless it was a shutdown or a takeover, kept as the agent's last error.
    pub fn session_down(&self, name: &str, generation: u64, end: &SessionEnd) {
        let by = if end.by_peer { "peer" } else { "local" };
        *lock(&self.ends).entry((snake(end.code), by)).or_default() += 1;
        {
            let mut d = lock(&self.dgrams);
            if let Some(s) = d.live.remove(&(name.to_string(), generation)) {
                for (sum, n) in d.ended.iter_mut().zip(datagram_counts(&s)) {
                    *sum += n;
                }
            }
        }
        let mut boards = lock(&self.boards);
        let board = boards.entry(name.to_string()).or_default();
        board.session.take_if(|m| m.generation == generation);
        if !matches!(
            end.code,
            ErrorCode::Normal | ErrorCode::Shutdown | ErrorCode::Replaced
        ) {
            let event = self.event(name, &format!("session ended: {end}"));
            board.last_error = Some(event.clone());
            drop(boards);
            self.push(event);
        }
    }

    /// Sets the name `key`'s board shows (at the agent: the name the gateway gave it).
    pub fn set_name(&self, key: &str, name: &str) {
        lock(&self.boards).entry(key.to_string()).or_default().name = Some(cut(name));
    }

    /// Keeps `text` as `name`'s last error (and among the last errors).
    pub fn agent_error(&self, name: &str, text: &str) {
        let event = self.event(name, text);
        lock(&self.boards)
            .entry(name.to_string())
            .or_default()
            .last_error = Some(event.clone());
        self.push(event);
    }

    /// Keeps `text` among the last errors.
    pub fn error(&self, about: &str, text: &str) {
        let event = self.event(about, text);
        self.push(event);
    }

    fn event(&self, about: &str, text: &str) -> Event {
        Event {
            at: unix_secs(SystemTime::now()),
            about: cut(about),
            text: cut(text),
        }
    }

    fn push(&self, event: Event) {
        let mut errors = lock(&self.errors);
        if errors.len() >= RECENT_ERRORS {
            errors.pop_front();
        }
        errors.push_back(event);
    }

    /// The last errors, oldest first.
    pub fn recent_errors(&self) -> Vec<Event> {
        lock(&self.errors).iter().cloned().collect()
    }

    /// A copy of one agent's board.
    pub fn board(&self, name: &str) -> Board {
        lock(&self.boards).get(name).cloned().unwrap_or_default()
    }

    /// Every service's counters, by (agent, service).
    pub fn services(&self) -> Vec<((String, String), Arc<ServiceTally>)> {
        lock(&self.services)
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Datagrams of every session, up or ended: sent, dropped on the way out, received,
    /// dropped on arrival.
    pub fn datagrams(&self) -> [u64; 4] {
        let d = lock(&self.dgrams);
        let mut out = d.ended;
        for s in d.live.values() {
            for (o, n) in out.iter_mut().zip(datagram_counts(s)) {
                *o += n;
            }
        }
        out
    }

    /// The metrics both roles have, written to `e`: build info, per-service streams, bytes and
    /// refusals, session ends, authentication failures (`with_auth`), the histograms and the
    /// datagrams (`dgrams` from [`Tally::datagrams`]).
    pub fn encode_common(
        &self,
        e: &mut DescriptorEncoder,
        with_auth: bool,
        dgrams: [u64; 4],
    ) -> std::fmt::Result {
        let version = env!("CARGO_PKG_VERSION");
        let mut m = e.encode_descriptor(
            "burrow_build_info",
            "Build of this burrow process (always 1)",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(1i64)
            .encode(m.encode_family(&[("version", version), ("role", self.role)])?)?;
        let uptime = SystemTime::now()
            .duration_since(self.started)
            .unwrap_or_default()
            .as_secs_f64();
        let m = e.encode_descriptor(
            "burrow_uptime",
            "Time since the process started",
            Some(&Unit::Seconds),
            MetricType::Gauge,
        )?;
        ConstGauge::new(uptime).encode(m)?;

        let services = self.services();
        let labels = |agent: &str, service: &str| -> Vec<(String, String)> {
            let mut l = Vec::with_capacity(2);
            if self.role == "gateway" {
                l.push(("agent".into(), agent.to_string()));
            }
            l.push(("service".into(), service.to_string()));
            l
        };
        let mut m = e.encode_descriptor(
            "burrow_streams",
            "Streams opened, by service",
            None,
            MetricType::Counter,
        )?;
        for ((a, s), t) in &services {
            ConstCounter::new(t.streams_total.load(Ordering::Relaxed))
                .encode(m.encode_family(&labels(a, s))?)?;
        }
        let mut m = e.encode_descriptor(
            "burrow_streams_current",
            "Streams open now, by service",
            None,
            MetricType::Gauge,
        )?;
        for ((a, s), t) in &services {
            ConstGauge::new(t.streams_current.load(Ordering::Relaxed) as i64)
                .encode(m.encode_family(&labels(a, s))?)?;
        }
        let mut m = e.encode_descriptor(
            "burrow_streams_refused",
            "Client connections or streams that did not get through, by service and reason",
            None,
            MetricType::Counter,
        )?;
        for ((a, s), t) in &services {
            for why in Refused::ALL {
                let n = t.refused[why as usize].load(Ordering::Relaxed);
                if n == 0 {
                    continue;
                }
                let mut l = labels(a, s);
                l.push(("reason".into(), why.label().into()));
                ConstCounter::new(n).encode(m.encode_family(&l)?)?;
            }
        }
        let mut m = e.encode_descriptor(
            "burrow_stream",
            "Bytes relayed, by service and direction (to_service: from clients to the service)",
            Some(&Unit::Bytes),
            MetricType::Counter,
        )?;
        for ((a, s), t) in &services {
            for (dir, c) in [
                ("to_service", &t.bytes_to_service),
                ("to_client", &t.bytes_to_client),
            ] {
                let mut l = labels(a, s);
                l.push(("direction".into(), dir.into()));
                ConstCounter::new(c.load(Ordering::Relaxed)).encode(m.encode_family(&l)?)?;
            }
        }
        let ends: Vec<_> = lock(&self.ends)
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        let mut m = e.encode_descriptor(
            "burrow_session_ends",
            "Sessions that ended, by reason and by which side ended them",
            None,
            MetricType::Counter,
        )?;
        for ((reason, by), n) in ends {
            ConstCounter::new(n)
                .encode(m.encode_family(&[("reason", reason.as_str()), ("by", by)])?)?;
        }
        if with_auth {
            let mut m = e.encode_descriptor(
                "burrow_auth_failures",
                "Tunnel connections that did not become a session, by reason",
                None,
                MetricType::Counter,
            )?;
            for why in AuthFailure::ALL {
                ConstCounter::new(self.auth_failures(why))
                    .encode(m.encode_family(&[("reason", why.label())])?)?;
            }
        }
        let m = e.encode_descriptor(
            "burrow_handshake_duration",
            "Time from connection to an authenticated session (TLS included)",
            Some(&Unit::Seconds),
            self.handshake.metric_type(),
        )?;
        self.handshake.encode(m)?;
        let m = e.encode_descriptor(
            "burrow_session_rtt",
            "Round-trip time of sessions, measured by each heartbeat",
            Some(&Unit::Seconds),
            self.rtt.metric_type(),
        )?;
        self.rtt.encode(m)?;
        let mut m = e.encode_descriptor(
            "burrow_datagrams",
            "UDP datagrams through sessions: sent and received, and dropped each way (queue full, over budget, too large, the role not keeping up)",
            None,
            MetricType::Counter,
        )?;
        for (i, (dir, what)) in [
            ("out", "sent"),
            ("out", "dropped"),
            ("in", "received"),
            ("in", "dropped"),
        ]
        .iter()
        .enumerate()
        {
            ConstCounter::new(dgrams[i])
                .encode(m.encode_family(&[("direction", *dir), ("outcome", *what)])?)?;
        }
        self.encode_udp(e, &labels)
    }

    /// The UDP services' flows, datagrams, bytes and drops.
    fn encode_udp(&self, e: &mut DescriptorEncoder, labels: &Labels<'_>) -> std::fmt::Result {
        let udp = self.udp_services();
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        type Field = fn(&UdpCounters) -> &AtomicU64;
        let one: [(&str, &str, MetricType, Field); 4] = [
            (
                "burrow_udp_flows",
                "UDP flows opened, by service",
                MetricType::Counter,
                |c| &c.flows,
            ),
            (
                "burrow_udp_flows_current",
                "UDP flows open now, by service",
                MetricType::Gauge,
                |c| &c.flows_current,
            ),
            (
                "burrow_udp_flows_refused",
                "Datagrams of new UDP flows dropped at the service's flow limit (udp.max_flows), by service",
                MetricType::Counter,
                |c| &c.flows_refused,
            ),
            (
                "burrow_udp_dropped",
                "UDP datagrams of a service dropped, both ways: full queues, too large, no session, the flow limit",
                MetricType::Counter,
                |c| &c.dropped,
            ),
        ];
        for (name, help, kind, field) in one {
            let mut m = e.encode_descriptor(name, help, None, kind)?;
            for ((a, s), c) in &udp {
                let v = load(field(c));
                let l = labels(a, s);
                match kind {
                    MetricType::Gauge => ConstGauge::new(v as i64).encode(m.encode_family(&l)?)?,
                    _ => ConstCounter::new(v).encode(m.encode_family(&l)?)?,
                }
            }
        }
        let two: [(&str, &str, Option<Unit>, Field, Field); 2] = [
            (
                "burrow_udp_datagrams",
                "UDP datagrams forwarded, by service and direction (to_service: from clients to the service)",
                None,
                |c| &c.datagrams_to_service,
                |c| &c.datagrams_to_client,
            ),
            (
                "burrow_udp",
                "UDP payload bytes forwarded, by service and direction",
                Some(Unit::Bytes),
                |c| &c.bytes_to_service,
                |c| &c.bytes_to_client,
            ),
        ];
        for (name, help, unit, up, down) in two {
            let mut m = e.encode_descriptor(name, help, unit.as_ref(), MetricType::Counter)?;
            for ((a, s), c) in &udp {
                for (dir, f) in [("to_service", up), ("to_client", down)] {
                    let mut l = labels(a, s);
                    l.push(("direction".into(), dir.into()));
                    ConstCounter::new(load(f(c))).encode(m.encode_family(&l)?)?;
                }
            }
        }
        Ok(())
    }
}

/// The labels of one (agent, service) series.
type Labels<'a> = dyn Fn(&str, &str) -> Vec<(String, String)> + 'a;

/// Writes the metrics of `collector` in the Prometheus text format (version 0.0.4).
pub fn render(collector: impl prometheus_client::collector::Collector) -> String {
    let mut registry = prometheus_client::registry::Registry::default();
    registry.register_collector(Box::new(collector));
    let mut out = String::new();
    if prometheus_client::encoding::prometheus_text::encode(&mut out, &registry).is_err() {
        out.clear();
        let _ = writeln!(out, "# encoding the metrics failed");
    }
    out
}

/// Content type of [`render`]'s output.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_become_snake_case_labels() {
        assert_eq!(snake(ErrorCode::LimitExceeded), "limit_exceeded");
        assert_eq!(snake(ErrorCode::Timeout), "timeout");
    }

    #[test]
    fn services_past_the_cap_share_one_series() {
        let t = Tally::new("gateway");
        for i in 0..MAX_SERVICE_SERIES + 10 {
            drop(t.stream("a", &format!("s{i}")));
        }
        let services = t.services();
        assert_eq!(services.len(), MAX_SERVICE_SERIES + 1);
        let other = services
            .iter()
            .find(|((_, s), _)| s == OTHER)
            .map(|(_, t)| t.streams_total.load(Ordering::Relaxed));
        assert_eq!(other, Some(10));
    }

    #[test]
    fn error_texts_are_cut_on_a_char_boundary() {
        let long = "é".repeat(400);
        let c = cut(&long);
        assert!(c.len() <= ERROR_TEXT + "…".len());
    }
}
