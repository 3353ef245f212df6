//! UDP forwarding: flows of datagrams through the session.
//!
//! At the gateway, each public UDP port reads datagrams from clients; each client address
//! (IP and port) is a *flow* with an id the gateway assigns per session. Datagrams travel
//! through the session tagged with their flow, and with the flow's origin (service and client
//! address) on every datagram, so the agent can open a flow from whichever datagram arrives
//! first. At the agent each flow gets its own UDP socket toward the target, so replies come
//! back on that flow and reach the right client.
//!
//! UDP stays UDP: nothing here waits for room. A datagram that finds a full queue (the
//! session's, a socket's) or a flow limit reached is dropped and counted. Flows end after
//! [`UdpSettings::idle`] without a datagram either way, on each side by its own clock; their
//! sockets and memory go with them, and each logs one line.
//!
//! The gateway's flow table ([`GatewayFlows`]) is plain data with time as an argument;
//! the tasks around them ([`serve_public`], [`dispatch_replies`], [`serve_agent_flows`]) do the
//! I/O.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use burrow_proto::message::{Datagram, Open, MAX_DATAGRAM};
use burrow_proto::ErrorCode;
use bytes::Bytes;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::session::Session;

/// `[udp]` settings (either role).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UdpSettings {
    /// A flow with no datagram either way for this long ends (default 60 s).
    pub idle: Duration,
    /// Most flows one service has at once; datagrams of new flows past it are dropped
    /// (default 4096).
    pub max_flows: usize,
    /// Largest datagram forwarded; larger ones are dropped (default 65,507, UDP's maximum).
    pub max_datagram: usize,
    /// Kernel receive and send buffer of each flow's socket at the agent, and of each public
    /// UDP socket at the gateway, in bytes (default 256 KiB): what queues for a flow before
    /// datagrams are dropped.
    pub queue: usize,
}

impl Default for UdpSettings {
    fn default() -> Self {
        UdpSettings {
            idle: Duration::from_secs(60),
            max_flows: 4096,
            max_datagram: MAX_DATAGRAM,
            queue: 256 * 1024,
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What one flow moved, for its closing log line and the service's counters.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct FlowCounts {
    /// Datagrams from the client toward the target.
    pub to_service: u64,
    /// Their bytes.
    pub bytes_to_service: u64,
    /// Datagrams from the target back to the client.
    pub to_client: u64,
    /// Their bytes.
    pub bytes_to_client: u64,
    /// Datagrams of this flow dropped (a full queue, too large).
    pub dropped: u64,
}

/// Counters of one UDP service, across its flows and sessions (for metrics and status).
#[derive(Debug, Default)]
pub struct UdpCounters {
    /// Flows opened.
    pub flows: AtomicU64,
    /// Flows open now.
    pub flows_current: AtomicU64,
    /// Datagrams of new flows dropped because the service's flow limit was reached.
    pub flows_refused: AtomicU64,
    /// Datagrams forwarded from clients toward the target.
    pub datagrams_to_service: AtomicU64,
    /// Their bytes.
    pub bytes_to_service: AtomicU64,
    /// Datagrams forwarded from the target back to clients.
    pub datagrams_to_client: AtomicU64,
    /// Their bytes.
    pub bytes_to_client: AtomicU64,
    /// Datagrams dropped, both ways (full queues, too large, no session, the flow limit).
    pub dropped: AtomicU64,
}

impl UdpCounters {
    fn to_service(&self, len: usize) {
        self.datagrams_to_service.fetch_add(1, Ordering::Relaxed);
        self.bytes_to_service
            .fetch_add(len as u64, Ordering::Relaxed);
    }

    fn to_client(&self, len: usize) {
        self.datagrams_to_client.fetch_add(1, Ordering::Relaxed);
        self.bytes_to_client
            .fetch_add(len as u64, Ordering::Relaxed);
    }

    fn drop_one(&self) {
        self.dropped.fetch_add(1, Ordering::Relaxed);
    }

    fn flow_opened(&self) {
        self.flows.fetch_add(1, Ordering::Relaxed);
        self.flows_current.fetch_add(1, Ordering::Relaxed);
    }

    fn flow_ended(&self) {
        self.flows_current.fetch_sub(1, Ordering::Relaxed);
    }
}

fn log_flow_end(service: &str, client: SocketAddr, c: &FlowCounts, started: Instant) {
    info!(
        service,
        client = %client,
        datagrams_to_service = c.to_service,
        bytes_to_service = c.bytes_to_service,
        datagrams_to_client = c.to_client,
        bytes_to_client = c.bytes_to_client,
        dropped = c.dropped,
        duration_ms = started.elapsed().as_millis() as u64,
        "flow closed"
    );
}

// ---------------------------------------------------------------------------------------------
// Gateway side.

/// One flow at the gateway.
#[derive(Debug)]
struct GatewayFlow {
    service: u32,
    name: String,
    client: SocketAddr,
    /// The public socket the client talks to; replies go out through it.
    socket: Arc<UdpSocket>,
    started: Instant,
    last: Instant,
    counts: FlowCounts,
    counters: Arc<UdpCounters>,
}

/// What to do with a reply datagram whose flow the gateway looked up.
#[derive(Debug)]
pub enum Reply {
    /// Send `data` to `client` through `socket`.
    Send {
        /// The public socket.
        socket: Arc<UdpSocket>,
        /// The client.
        client: SocketAddr,
    },
    /// The flow ended here already: drop the late datagram.
    Late,
    /// The agent named a flow the gateway never opened: a protocol violation.
    Unknown,
}

/// The flows of one session at the gateway, over all its UDP services. Flow ids are odd and
/// increase, so an id at or below the highest one issued that is no longer here is a late
/// datagram, and one above it was never issued.
#[derive(Debug, Default)]
pub struct GatewayFlows {
    by_id: HashMap<u32, GatewayFlow>,
    by_client: HashMap<(u32, SocketAddr), u32>,
    per_service: HashMap<u32, usize>,
    highest: u32,
}

impl GatewayFlows {
    /// Whether `client` has an open flow on `service` (one not expired yet).
    pub fn has_flow(&self, service: u32, client: SocketAddr) -> bool {
        self.by_client
            .get(&(service, client))
            .is_some_and(|id| self.by_id.contains_key(id))
    }

    /// The flow of `client` on `service`, opened now if new: `None` when the service already
    /// has `max_flows` (the datagram is dropped and counted).
    #[allow(clippy::too_many_arguments)]
    pub fn flow_for(
        &mut self,
        service: u32,
        name: &str,
        client: SocketAddr,
        socket: &Arc<UdpSocket>,
        counters: &Arc<UdpCounters>,
        max_flows: usize,
        now: Instant,
    ) -> Option<u32> {
        if let Some(&id) = self.by_client.get(&(service, client)) {
            if let Some(f) = self.by_id.get_mut(&id) {
                f.last = now;
                return Some(id);
            }
        }
        let open = self.per_service.entry(service).or_insert(0);
        if *open >= max_flows {
            counters.flows_refused.fetch_add(1, Ordering::Relaxed);
            counters.drop_one();
            return None;
        }
        *open += 1;
        let id = self.highest.checked_add(2).unwrap_or(1) | 1;
        self.highest = id;
        self.by_client.insert((service, client), id);
        self.by_id.insert(
            id,
            GatewayFlow {
                service,
                name: name.to_string(),
                client,
                socket: socket.clone(),
                started: now,
                last: now,
                counts: FlowCounts::default(),
                counters: counters.clone(),
            },
        );
        counters.flow_opened();
        Some(id)
    }

    /// Records a datagram of `len` bytes sent toward the service on `flow` (or dropped).
    pub fn note_to_service(&mut self, flow: u32, len: usize, sent: bool) {
        if let Some(f) = self.by_id.get_mut(&flow) {
            if sent {
                f.counts.to_service += 1;
                f.counts.bytes_to_service += len as u64;
                f.counters.to_service(len);
            } else {
                f.counts.dropped += 1;
                f.counters.drop_one();
            }
        }
    }

    /// Looks up the flow of a reply from the agent (the caller records it with
    /// [`GatewayFlows::note_reply`] once it is sent or dropped).
    pub fn reply(&mut self, flow: u32, now: Instant) -> Reply {
        match self.by_id.get_mut(&flow) {
            Some(f) => {
                f.last = now;
                Reply::Send {
                    socket: f.socket.clone(),
                    client: f.client,
                }
            }
            None if flow % 2 == 1 && flow <= self.highest => Reply::Late,
            None => Reply::Unknown,
        }
    }

    /// Records a reply of `len` bytes on `flow`, sent to its client or dropped (the socket's
    /// buffer was full).
    pub fn note_reply(&mut self, flow: u32, len: usize, sent: bool) {
        if let Some(f) = self.by_id.get_mut(&flow) {
            if sent {
                f.counts.to_client += 1;
                f.counts.bytes_to_client += len as u64;
                f.counters.to_client(len);
            } else {
                f.counts.dropped += 1;
                f.counters.drop_one();
            }
        }
    }

    /// Ends the flows idle for `idle` (every flow when `idle` is zero), logging each.
    pub fn expire(&mut self, now: Instant, idle: Duration) -> usize {
        let gone: Vec<u32> = self
            .by_id
            .iter()
            .filter(|(_, f)| now.saturating_duration_since(f.last) >= idle)
            .map(|(id, _)| *id)
            .collect();
        for id in &gone {
            if let Some(f) = self.by_id.remove(id) {
                self.by_client.remove(&(f.service, f.client));
                if let Some(n) = self.per_service.get_mut(&f.service) {
                    *n = n.saturating_sub(1);
                }
                f.counters.flow_ended();
                log_flow_end(&f.name, f.client, &f.counts, f.started);
            }
        }
        gone.len()
    }

    /// Ends every flow of `service` (its port closed), logging each.
    pub fn end_service(&mut self, service: u32) {
        let gone: Vec<u32> = self
            .by_id
            .iter()
            .filter(|(_, f)| f.service == service)
            .map(|(id, _)| *id)
            .collect();
        for id in gone {
            if let Some(f) = self.by_id.remove(&id) {
                self.by_client.remove(&(f.service, f.client));
                f.counters.flow_ended();
                log_flow_end(&f.name, f.client, &f.counts, f.started);
            }
        }
        self.per_service.remove(&service);
    }

    /// Flows open now.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// Whether no flow is open.
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }
}

/// Where a public UDP port sends its datagrams: the live session and the service id there.
#[derive(Clone)]
pub struct UdpRoute {
    /// The agent's session.
    pub session: Session,
    /// The service id from the agent's Bind.
    pub service: u32,
    /// The service's name, for logs.
    pub name: String,
    /// That session's flows.
    pub flows: Arc<Mutex<GatewayFlows>>,
}

/// Serves one public UDP port until `cancel`: each client datagram goes to the flow for that
/// client in the session `route` gives for the client (or is dropped and counted when there is
/// no session, the flow limit is reached, or the session's queue is full).
pub async fn serve_public(
    socket: Arc<UdpSocket>,
    route: impl Fn(SocketAddr) -> Option<UdpRoute>,
    settings: UdpSettings,
    counters: Arc<UdpCounters>,
    cancel: CancellationToken,
) {
    let mut buf = vec![0u8; MAX_DATAGRAM + 1];
    loop {
        let (n, client) = tokio::select! {
            _ = cancel.cancelled() => return,
            r = socket.recv_from(&mut buf) => match r {
                Ok(x) => x,
                Err(e) => {
                    // ICMP errors from earlier sends surface here on Linux; keep serving.
                    debug!("public UDP receive: {e}");
                    continue;
                }
            },
        };
        if n > settings.max_datagram {
            counters.drop_one();
            continue;
        }
        let Some(route) = route(client) else {
            counters.drop_one();
            continue;
        };
        let now = Instant::now();
        let flow = lock(&route.flows).flow_for(
            route.service,
            &route.name,
            client,
            &socket,
            &counters,
            settings.max_flows,
            now,
        );
        let Some(flow) = flow else {
            continue;
        };
        let d = Datagram {
            flow,
            origin: Some(Open {
                service: route.service,
                client: Some(client),
            }),
            data: Bytes::copy_from_slice(&buf[..n]),
        };
        let sent = route.session.send_datagram(&d);
        lock(&route.flows).note_to_service(flow, n, sent);
    }
}

/// At the gateway, for one session: sends each reply datagram from the agent to its client,
/// and ends idle flows. Returns when the session's datagrams end; a datagram for a flow never
/// opened closes the session (`Protocol`).
pub async fn dispatch_replies(
    session: Session,
    mut datagrams: mpsc::Receiver<Datagram>,
    flows: Arc<Mutex<GatewayFlows>>,
    idle: Duration,
) {
    let mut sweep = tokio::time::interval(sweep_period(idle));
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let d = tokio::select! {
            d = datagrams.recv() => match d {
                Some(d) => d,
                None => break,
            },
            _ = sweep.tick() => {
                lock(&flows).expire(Instant::now(), idle);
                continue;
            }
            _ = session.closed() => break,
        };
        let reply = lock(&flows).reply(d.flow, Instant::now());
        match reply {
            Reply::Send { socket, client } => {
                let sent = socket.try_send_to(&d.data, client).is_ok();
                lock(&flows).note_reply(d.flow, d.data.len(), sent);
            }
            Reply::Late => {}
            Reply::Unknown => {
                session.close(
                    ErrorCode::Protocol,
                    format!("datagram for flow {}, which was never opened", d.flow),
                );
                break;
            }
        }
    }
    lock(&flows).expire(Instant::now(), Duration::ZERO);
}

fn sweep_period(idle: Duration) -> Duration {
    (idle / 4).clamp(Duration::from_millis(10), Duration::from_secs(5))
}

// ---------------------------------------------------------------------------------------------
// Agent side.

/// A UDP service the agent publishes.
#[derive(Debug, Clone)]
pub struct UdpService {
    /// Its name, for logs.
    pub name: String,
    /// The target's host.
    pub host: String,
    /// The target's port.
    pub port: u16,
    /// Its counters.
    pub counters: Arc<UdpCounters>,
    /// Cancelled when the forward is removed (a reload): its flows end, and datagrams that
    /// still arrive for it are dropped.
    pub stop: CancellationToken,
}

/// The UDP services of one session at the agent, by service id; a removed one stays, stopped.
pub type UdpServices = Arc<Mutex<HashMap<u32, UdpService>>>;

/// One flow at the agent: a socket connected to the target, and the task reading replies.
struct AgentFlow {
    service: u32,
    client: SocketAddr,
    socket: Arc<UdpSocket>,
    stop: CancellationToken,
    /// What the dispatcher sends on the flow, shared with the flow's task.
    out: Arc<FlowOut>,
}

/// The datagrams toward the target of one flow at the agent: the dispatcher sends them, the
/// flow's task logs them and keeps the flow open while they come.
#[derive(Debug)]
struct FlowOut {
    started: Instant,
    datagrams: AtomicU64,
    bytes: AtomicU64,
    dropped: AtomicU64,
    /// Nanoseconds after `started` of the last datagram sent toward the target.
    last_ns: AtomicU64,
}

impl FlowOut {
    fn new(started: Instant) -> FlowOut {
        FlowOut {
            started,
            datagrams: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            last_ns: AtomicU64::new(0),
        }
    }

    /// Records a datagram of `len` bytes sent toward the target (or dropped) at `now`.
    fn note(&self, len: usize, sent: bool, now: Instant) {
        if sent {
            self.datagrams.fetch_add(1, Ordering::Relaxed);
            self.bytes.fetch_add(len as u64, Ordering::Relaxed);
            let ns = now.saturating_duration_since(self.started).as_nanos();
            self.last_ns
                .fetch_max(u64::try_from(ns).unwrap_or(u64::MAX), Ordering::Relaxed);
        } else {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// When the last datagram went toward the target (the start, if none did).
    fn last(&self) -> Instant {
        self.started + Duration::from_nanos(self.last_ns.load(Ordering::Relaxed))
    }
}

/// Serves the flows of one session at the agent: each datagram from the gateway goes out on
/// its flow's socket (opened on the first one, up to `max_flows` per service); replies from
/// the target come back on the flow. Returns when the session's datagrams end; a datagram
/// naming no service the gateway granted, or an unknown flow without its origin, closes the
/// session (`Protocol`). One for a service removed meanwhile is dropped.
pub async fn serve_agent_flows(
    session: Session,
    mut datagrams: mpsc::Receiver<Datagram>,
    services: UdpServices,
    granted: Arc<Mutex<Vec<bool>>>,
    settings: UdpSettings,
) {
    let mut flows: HashMap<u32, AgentFlow> = HashMap::new();
    // A flow's task cancels its token when the flow ends; the sweep then frees its socket.
    // (A channel of ended flows, bounded, lost some when many ended at once: their sockets
    // stayed open for the session's life.)
    let mut sweep = tokio::time::interval(sweep_period(settings.idle));
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let d = tokio::select! {
            d = datagrams.recv() => match d {
                Some(d) => d,
                None => break,
            },
            _ = sweep.tick() => {
                flows.retain(|_, f| !f.stop.is_cancelled());
                continue;
            }
            _ = session.closed() => break,
        };
        if d.data.len() > settings.max_datagram {
            continue;
        }
        // A flow that ended since the last sweep: its datagram opens it again.
        if flows.get(&d.flow).is_some_and(|f| f.stop.is_cancelled()) {
            flows.remove(&d.flow);
        }
        if let Some(f) = flows.get(&d.flow) {
            let Some(service) = lock(&services).get(&f.service).cloned() else {
                continue;
            };
            if service.stop.is_cancelled() {
                continue;
            }
            let sent = f.socket.try_send(&d.data).is_ok();
            if sent {
                service.counters.to_service(d.data.len());
            } else {
                service.counters.drop_one();
            }
            f.out.note(d.data.len(), sent, Instant::now());
            continue;
        }
        let Some(origin) = d.origin else {
            session.close(
                ErrorCode::Protocol,
                format!("datagram for flow {} without its origin", d.flow),
            );
            break;
        };
        let is_granted = lock(&granted)
            .get(origin.service as usize)
            .copied()
            .unwrap_or(false);
        let known = lock(&services).get(&origin.service).cloned();
        if known.as_ref().is_some_and(|s| s.stop.is_cancelled()) {
            continue;
        }
        let Some(service) = known.filter(|_| is_granted) else {
            session.close(
                ErrorCode::Protocol,
                format!(
                    "datagram for service {}, which is not a granted UDP service of this agent",
                    origin.service
                ),
            );
            break;
        };
        let open = flows
            .values()
            .filter(|f| f.service == origin.service && !f.stop.is_cancelled())
            .count();
        if open >= settings.max_flows {
            service
                .counters
                .flows_refused
                .fetch_add(1, Ordering::Relaxed);
            service.counters.drop_one();
            continue;
        }
        let client = origin.client.unwrap_or_else(|| ([0, 0, 0, 0], 0).into());
        let socket = match connect_target(&service, settings.queue).await {
            Ok(s) => Arc::new(s),
            Err(e) => {
                warn!(service = %service.name, "UDP target {}:{}: {e}", service.host, service.port);
                service.counters.drop_one();
                continue;
            }
        };
        service.counters.flow_opened();
        let out = Arc::new(FlowOut::new(Instant::now()));
        // Awaited, not `try_send`: a socket this new has no readiness from the runtime yet,
        // so `try_send` would refuse the flow's first datagram. A UDP send does not wait.
        let sent = socket.send(&d.data).await.is_ok();
        if sent {
            service.counters.to_service(d.data.len());
        } else {
            service.counters.drop_one();
        }
        out.note(d.data.len(), sent, Instant::now());
        let stop = service.stop.child_token();
        let flow = ReplyFlow {
            session: session.clone(),
            flow: d.flow,
            client,
            socket: socket.clone(),
            service: service.clone(),
            idle: settings.idle,
            out: out.clone(),
        };
        tokio::spawn(agent_flow(flow, stop.clone()));
        flows.insert(
            d.flow,
            AgentFlow {
                service: origin.service,
                client,
                socket,
                stop,
                out,
            },
        );
    }
    for f in flows.values() {
        debug!(client = %f.client, "session over: flow closed");
        f.stop.cancel();
    }
}

async fn connect_target(service: &UdpService, buffer: usize) -> std::io::Result<UdpSocket> {
    let target = tokio::net::lookup_host((service.host.as_str(), service.port))
        .await?
        .next()
        .ok_or_else(|| std::io::Error::other("the name resolves to no address"))?;
    let local: SocketAddr = if target.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = UdpSocket::bind(local).await?;
    let sock = socket2::SockRef::from(&socket);
    let _ = sock.set_recv_buffer_size(buffer);
    let _ = sock.set_send_buffer_size(buffer);
    socket.connect(target).await?;
    Ok(socket)
}

/// What a flow's task needs: where replies go, and the flow's datagrams the other way.
struct ReplyFlow {
    session: Session,
    flow: u32,
    client: SocketAddr,
    socket: Arc<UdpSocket>,
    service: UdpService,
    idle: Duration,
    out: Arc<FlowOut>,
}

/// One flow's replies: target to gateway, until the flow has been idle both ways for `idle`
/// (no reply from the target, and no datagram toward it). Then it logs the flow's line.
async fn agent_flow(f: ReplyFlow, stop: CancellationToken) {
    let mut counts = FlowCounts::default();
    // The flow's end, however the task ends.
    struct Open(Arc<UdpCounters>);
    impl Drop for Open {
        fn drop(&mut self) {
            self.0.flow_ended();
        }
    }
    let _open = Open(f.service.counters.clone());
    let mut buf = vec![0u8; MAX_DATAGRAM + 1];
    let mut last_reply = f.out.started;
    let mut deadline = f.out.started + f.idle;
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep_until(deadline) => {
                let last = last_reply.max(f.out.last());
                if Instant::now().saturating_duration_since(last) >= f.idle {
                    break;
                }
                deadline = last + f.idle;
            }
            r = f.socket.recv(&mut buf) => match r {
                Err(e) => {
                    // ICMP port unreachable and the like: the target is not there (yet).
                    debug!(service = %f.service.name, "UDP target: {e}");
                }
                Ok(n) if n > MAX_DATAGRAM => {
                    counts.dropped += 1;
                    f.service.counters.drop_one();
                }
                Ok(n) => {
                    last_reply = Instant::now();
                    let d = Datagram {
                        flow: f.flow,
                        origin: None,
                        data: Bytes::copy_from_slice(&buf[..n]),
                    };
                    if f.session.send_datagram(&d) {
                        counts.to_client += 1;
                        counts.bytes_to_client += n as u64;
                        f.service.counters.to_client(n);
                    } else {
                        counts.dropped += 1;
                        f.service.counters.drop_one();
                    }
                }
            },
        }
    }
    // Tells the dispatcher this flow is over (and stops nothing else: the loop is done).
    stop.cancel();
    counts.to_service = f.out.datagrams.load(Ordering::Relaxed);
    counts.bytes_to_service = f.out.bytes.load(Ordering::Relaxed);
    counts.dropped += f.out.dropped.load(Ordering::Relaxed);
    log_flow_end(&f.service.name, f.client, &counts, f.out.started);
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn socket() -> Arc<UdpSocket> {
        Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap())
    }

    #[tokio::test]
    async fn flows_per_client_limit_and_expiry() {
        let s = socket().await;
        let c = Arc::new(UdpCounters::default());
        let mut t = GatewayFlows::default();
        let now = Instant::now();
        let a: SocketAddr = "192.0.2.1:1000".parse().unwrap();
        let b: SocketAddr = "192.0.2.2:1000".parse().unwrap();
        let fa = t.flow_for(7, "dns", a, &s, &c, 2, now).unwrap();
        assert_eq!(
            t.flow_for(7, "dns", a, &s, &c, 2, now),
            Some(fa),
            "same client, same flow"
        );
        let fb = t.flow_for(7, "dns", b, &s, &c, 2, now).unwrap();
        assert_ne!(fa, fb);
        assert_eq!(fa % 2, 1, "gateway flow ids are odd");
        let third: SocketAddr = "192.0.2.3:1000".parse().unwrap();
        assert_eq!(t.flow_for(7, "dns", third, &s, &c, 2, now), None, "limit");
        assert_eq!(c.flows_refused.load(Ordering::Relaxed), 1);
        // Another service has its own limit.
        assert!(t.flow_for(8, "ntp", third, &s, &c, 2, now).is_some());
        assert!(matches!(t.reply(fa, now), Reply::Send { client, .. } if client == a));
        t.note_reply(fa, 10, true);
        assert_eq!(c.datagrams_to_client.load(Ordering::Relaxed), 1);
        assert_eq!(c.bytes_to_client.load(Ordering::Relaxed), 10);
        assert_eq!(c.flows_current.load(Ordering::Relaxed), 3);
        // Idle flows end; a late reply is dropped, a never-issued flow is a violation.
        let later = now + Duration::from_secs(61);
        assert_eq!(t.expire(later, Duration::from_secs(60)), 3);
        assert!(t.is_empty());
        assert_eq!(c.flows_current.load(Ordering::Relaxed), 0);
        assert!(matches!(t.reply(fa, later), Reply::Late));
        assert!(matches!(t.reply(999, later), Reply::Unknown));
        assert!(
            matches!(t.reply(2, later), Reply::Unknown),
            "even ids are never ours"
        );
        // The limit counts only live flows.
        assert!(t.flow_for(7, "dns", third, &s, &c, 2, later).is_some());
    }
}
