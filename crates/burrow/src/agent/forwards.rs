//! The forwards of one session: asking the gateway for their ports, retrying the refusals
//! that may pass, relaying each stream the gateway opens to its local target, and following
//! a reload: added forwards are bound, removed ones given back (`Unbind`, when the gateway
//! takes it) and their streams closed, the others left alone.
//!
//! Each forward has a service id for the session's life; a removed forward's id is not used
//! again, so a late frame for it is known for what it is.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use burrow_proto::message::{Bind, BindResult, Protocol, Unbind};
use burrow_proto::{ErrorCode, Kind};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::{watch, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn, Instrument};

use super::{backoff_delay, AgentStatus, Ended, ForwardStatus, BIND_RETRY_BASE};
use crate::admin::metrics::{Refused, Tally, OTHER};
use crate::config::{AgentConfig, Forward, Target};
use crate::relay::{self, Local};
use crate::session::{self, Session, SessionEnd, Stream};
use crate::transport;
use crate::udp;

/// What the agent knows of one forward in the current session.
#[derive(Debug, Clone, Default)]
pub(super) struct Binding {
    /// Refused for good (port not granted), with the gateway's reason.
    pub(super) refused_for_good: Option<String>,
    /// Refusals in a row for a reason that may pass.
    pub(super) refusals: u32,
    /// When to ask for it again.
    pub(super) retry_at: Option<Instant>,
}

/// One forward of the session, by service id.
struct Slot {
    fwd: Forward,
    binding: Binding,
    status: ForwardStatus,
    /// The pause before it is asked for again, for the status.
    retry: Option<Duration>,
    /// Still configured; a removed forward keeps its id.
    live: bool,
    /// Closes its streams when it is removed.
    close: CancellationToken,
}

/// The session's forwards: by service id, and in the order of the config.
pub(super) struct Table {
    slots: Vec<Slot>,
    order: Vec<u32>,
    /// Whether the gateway takes Unbind.
    unbind: bool,
    /// Services granted now, by id (shared with the UDP flows).
    granted: Arc<Mutex<Vec<bool>>>,
    /// The UDP forwards, by id (shared with the UDP flows).
    udp: udp::UdpServices,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Table {
    fn new(unbind: bool) -> Table {
        Table {
            slots: Vec::new(),
            order: Vec::new(),
            unbind,
            granted: Arc::default(),
            udp: Arc::default(),
        }
    }

    fn live(&self, id: u32) -> Option<&Slot> {
        self.slots.get(id as usize).filter(|s| s.live)
    }

    /// Adds `fwd` under a new service id and asks the gateway for its port.
    fn add(&mut self, fwd: &Forward, session: &Session, tally: &Tally) -> u32 {
        let id = self.slots.len() as u32;
        if let (Protocol::Udp, Target::Tcp { host, port }) = (fwd.protocol, &fwd.target) {
            lock(&self.udp).insert(
                id,
                udp::UdpService {
                    name: fwd.name.clone(),
                    host: host.clone(),
                    port: *port,
                    counters: tally.udp("", &fwd.name),
                    stop: CancellationToken::new(),
                },
            );
        }
        self.slots.push(Slot {
            fwd: fwd.clone(),
            binding: Binding::default(),
            status: ForwardStatus::Pending,
            retry: None,
            live: true,
            close: CancellationToken::new(),
        });
        lock(&self.granted).push(false);
        self.bind(id, session);
        id
    }

    fn bind(&self, id: u32, session: &Session) {
        let Some(slot) = self.live(id) else { return };
        let bind = Bind {
            service: id,
            protocol: slot.fwd.protocol,
            port: slot.fwd.public_port,
            name: slot.fwd.name.clone(),
            path: slot
                .fwd
                .public_path
                .as_ref()
                .map(|p| p.to_string_lossy().into_owned()),
            group: slot.fwd.group.clone(),
        };
        session.send_control(bind.to_frame());
    }

    /// Takes forward `id` out: its port is given back and its streams and flows closed.
    fn remove(&mut self, id: u32, session: &Session, gateway: &str) {
        let unbind = self.unbind;
        let Some(slot) = self.slots.get_mut(id as usize).filter(|s| s.live) else {
            return;
        };
        slot.live = false;
        slot.binding.retry_at = None;
        slot.close.cancel();
        if let Some(g) = lock(&self.granted).get_mut(id as usize) {
            *g = false;
        }
        if let Some(u) = lock(&self.udp).get(&id) {
            u.stop.cancel();
        }
        if unbind {
            session.send_control(Unbind { service: id }.to_frame());
            info!(forward = %slot.fwd.name, "forward removed: its public port is given back and its connections closed");
        } else {
            warn!(forward = %slot.fwd.name, "forward removed: its connections are closed, but gateway {gateway} is of an older version and cannot give its public port back within a session: the port stays open there (clients are refused) until this agent reconnects");
        }
    }

    /// Follows a new list of forwards.
    fn follow(&mut self, new: &[Forward], session: &Session, gateway: &str, tally: &Tally) {
        for id in self.order.clone() {
            let gone = self.live(id).is_some_and(|s| !new.contains(&s.fwd));
            if gone {
                self.remove(id, session, gateway);
            }
        }
        let mut order = Vec::with_capacity(new.len());
        for f in new {
            let kept = self
                .order
                .iter()
                .copied()
                .find(|&id| self.live(id).is_some_and(|s| s.fwd == *f));
            let id = match kept {
                Some(id) => id,
                None => {
                    info!(forward = %f.name, dest = %f.target, "forward added: asking the gateway for its port");
                    self.add(f, session, tally)
                }
            };
            order.push(id);
        }
        self.order = order;
    }

    /// Shows the forwards, in the config's order, in the status.
    fn publish(&self, status: &watch::Sender<AgentStatus>) {
        let slots: Vec<&Slot> = self
            .order
            .iter()
            .filter_map(|&id| self.slots.get(id as usize))
            .collect();
        status.send_modify(|s| {
            s.names = slots.iter().map(|s| s.fwd.name.clone()).collect();
            s.forwards = slots.iter().map(|s| s.status.clone()).collect();
            s.forward_retries = slots.iter().map(|s| s.retry).collect();
        });
    }
}

/// Serves one session: binds every forward, asks again for refused ones with backoff, relays
/// streams, follows reloads, until the session ends or `shutdown`.
#[allow(clippy::too_many_arguments)]
pub(super) async fn serve(
    cfg: &Arc<AgentConfig>,
    gateway: &str,
    started: session::Started,
    unbind: bool,
    forwards: &mut watch::Receiver<Arc<Vec<Forward>>>,
    status: &watch::Sender<AgentStatus>,
    tracker: &TaskTracker,
    shutdown: &CancellationToken,
    tally: &Arc<Tally>,
) -> Ended {
    let session::Started {
        session,
        mut incoming,
        mut control,
        datagrams,
    } = started;
    let mut table = Table::new(unbind);
    let list = forwards.borrow_and_update().clone();
    table.follow(&list, &session, gateway, tally);
    table.publish(status);
    super::private::announce(cfg, &session);
    // UDP flows, each with a socket toward the target. A datagram for a service that is not
    // a granted UDP forward is a protocol error.
    tracker.spawn(udp::serve_agent_flows(
        session.clone(),
        datagrams,
        table.udp.clone(),
        table.granted.clone(),
        cfg.udp,
    ));
    let pending = Arc::new(Semaphore::new(cfg.limits.max_pending_opens as usize));
    let mut reloads = true;
    loop {
        let next_retry = table.slots.iter().filter_map(|s| s.binding.retry_at).min();
        tokio::select! {
            _ = shutdown.cancelled() => return Ended::Session(SessionEnd {
                code: ErrorCode::Shutdown,
                detail: "shutdown".into(),
                by_peer: false,
                lost: false,
            }),
            end = session.closed() => return Ended::Session(end),
            _ = sleep_until(next_retry), if next_retry.is_some() => {
                let now = Instant::now();
                for id in 0..table.slots.len() as u32 {
                    let slot = &mut table.slots[id as usize];
                    if slot.binding.retry_at.is_some_and(|t| t <= now) {
                        slot.binding.retry_at = None;
                        slot.retry = None;
                        info!(forward = %slot.fwd.name, "asking the gateway again for the forward it refused");
                        table.bind(id, &session);
                    }
                }
                table.publish(status);
            }
            changed = forwards.changed(), if reloads => {
                if changed.is_err() {
                    reloads = false;
                    continue;
                }
                let list = forwards.borrow_and_update().clone();
                table.follow(&list, &session, gateway, tally);
                table.publish(status);
                if let Some(why) = nothing_to_publish(cfg, &table) {
                    return Ended::NothingToPublish(why);
                }
            }
            frame = control.recv() => {
                let Some(frame) = frame else { continue };
                if frame.header.kind != Kind::BindResult {
                    session.close(ErrorCode::Protocol, format!("unexpected {:?} from the gateway", frame.header.kind));
                    continue;
                }
                match BindResult::decode(&frame.payload) {
                    Ok(res) if super::private::on_result(cfg, &res) => {}
                    Ok(res) => {
                        on_bind_result(cfg, gateway, &res, &mut table);
                        table.publish(status);
                        if let Some(why) = nothing_to_publish(cfg, &table) {
                            return Ended::NothingToPublish(why);
                        }
                    }
                    Err(e) => session.close(e.code, e.detail),
                }
            }
            stream = incoming.recv() => {
                let Some(stream) = stream else { continue };
                if stream.dial().is_some() {
                    super::private::accept(cfg, stream, &pending, tracker, tally);
                    continue;
                }
                accept_stream(cfg, stream, &table, &pending, tracker, tally);
            }
        }
    }
}

pub(super) async fn sleep_until(at: Option<Instant>) {
    if let Some(at) = at {
        tokio::time::sleep_until(at).await;
    }
}

/// When every forward has been refused for good: why, for the agent's exit message.
fn nothing_to_publish(cfg: &AgentConfig, table: &Table) -> Option<String> {
    // Connectors may still use the private services and allowed targets.
    if !cfg.private.is_empty() {
        return None;
    }
    let live: Vec<&Slot> = table
        .order
        .iter()
        .filter_map(|&id| table.live(id))
        .collect();
    if live.is_empty() || live.iter().any(|s| s.binding.refused_for_good.is_none()) {
        return None;
    }
    let reasons: Vec<String> = live
        .iter()
        .map(|s| {
            format!(
                "forward {}: {}",
                s.fwd.name,
                s.binding.refused_for_good.as_deref().unwrap_or("")
            )
        })
        .collect();
    Some(format!(
        "nothing to publish: the gateway refused every forward, for reasons retrying cannot change ({}); ask the gateway's operator to grant the ports or unix socket paths (`ports`, `paths` of this agent's [[agents]] entry), or change --forward",
        reasons.join("; ")
    ))
}

fn on_bind_result(cfg: &AgentConfig, gateway: &str, res: &BindResult, table: &mut Table) {
    let id = res.service as usize;
    let Some(slot) = table.slots.get_mut(id) else {
        warn!(
            service = res.service,
            "gateway answered a bind we never asked for; ignored"
        );
        return;
    };
    if !slot.live {
        debug!(forward = %slot.fwd.name, "answer for a forward removed meanwhile; ignored");
        return;
    }
    let ok = res.code == ErrorCode::Normal;
    if let Some(g) = lock(&table.granted).get_mut(id) {
        *g = ok;
    }
    let fwd = &slot.fwd;
    let binding = &mut slot.binding;
    binding.retry_at = None;
    let mut retry = None;
    let new = if ok {
        binding.refusals = 0;
        let public = public_address(&res.text, gateway);
        info!(forward = %fwd.name, dest = %fwd.target, %public, "forward is live");
        ForwardStatus::Granted(public)
    } else {
        let why = format!("{} ({})", res.text, res.code);
        if res.code == ErrorCode::PortNotGranted {
            // The grant is the gateway's config: asking again changes nothing.
            warn!(forward = %fwd.name, "gateway refused the forward: {why}; not asking again in this session");
            binding.refused_for_good = Some(why.clone());
        } else {
            // A port in use may be freed, a limit may have room later.
            let delay = backoff_delay(
                binding.refusals,
                BIND_RETRY_BASE,
                cfg.max_backoff.max(BIND_RETRY_BASE),
                0.5 + fastrand::f64() / 2.0,
            );
            binding.refusals = binding.refusals.saturating_add(1);
            binding.retry_at = Some(Instant::now() + delay);
            retry = Some(delay);
            warn!(forward = %fwd.name, "gateway refused the forward: {why}; asking again in {delay:.1?}");
        }
        ForwardStatus::Refused(why)
    };
    slot.status = new;
    slot.retry = retry;
}

/// The address clients use: what the gateway granted, with a wildcard host (`0.0.0.0`,
/// `[::]`) replaced by the host this agent dialed, since that one is known to reach it.
pub(super) fn public_address(granted: &str, gateway: &str) -> String {
    match granted.parse::<std::net::SocketAddr>() {
        Ok(addr) if addr.ip().is_unspecified() => {
            let host = transport::host_part(gateway);
            if host.contains(':') {
                format!("[{host}]:{}", addr.port())
            } else {
                format!("{host}:{}", addr.port())
            }
        }
        _ => granted.to_string(),
    }
}

/// Checks a stream the gateway opened against our own configuration and relays it.
fn accept_stream(
    cfg: &Arc<AgentConfig>,
    stream: Stream,
    table: &Table,
    pending: &Arc<Semaphore>,
    tracker: &TaskTracker,
    tally: &Arc<Tally>,
) {
    let service = stream.info().service;
    let client = stream.info().client;
    let allowed = lock(&table.granted)
        .get(service as usize)
        .copied()
        .unwrap_or(false);
    let slot = table
        .live(service)
        .filter(|s| allowed && s.fwd.protocol == Protocol::Tcp);
    let Some((fwd, close)) = slot.map(|s| (s.fwd.clone(), s.close.clone())) else {
        let name = table
            .slots
            .get(service as usize)
            .map_or(OTHER, |s| s.fwd.name.as_str());
        tally.refused("", name, Refused::NotAllowed);
        warn!(
            service,
            "gateway opened a stream for a service that is not configured here; refused"
        );
        stream.reset(ErrorCode::TargetNotAllowed);
        return;
    };
    // At most `max_pending_opens` connects run at once; the rest wait for a permit inside
    // their task (bounded by the session's stream limit and `connect_timeout`), so a burst
    // of opens is queued, not refused.
    let pending = pending.clone();
    let timeout = cfg.connect_timeout;
    // The client's address as written (a field without a value is left out).
    let span = tracing::info_span!(
        "stream",
        forward = %fwd.name,
        client = client.map(tracing::field::display)
    );
    let meter = tally.stream("", &fwd.name);
    let tally = tally.clone();
    tracker.spawn(
        async move {
            let started = Instant::now();
            let connect = async {
                let permit = pending.acquire_owned().await;
                let mut local = connect_target(&fwd).await;
                // The PROXY header goes first, before any byte of the client's.
                if let (Ok(l), Some(version)) = (&mut local, fwd.proxy_protocol) {
                    if let Err(e) = crate::proxy_protocol::send(l, version, client).await {
                        local = Err(e);
                    }
                }
                (local, permit)
            };
            let mut local = match tokio::time::timeout(timeout, connect).await {
                Ok((Ok(local), permit)) => {
                    drop(permit);
                    local
                }
                Ok((Err(e), _)) => {
                    let (code, why) = super::connect_failure(&e);
                    tally.refused("", &fwd.name, why);
                    warn!(dest = %fwd.target, "cannot connect to target: {e}");
                    stream.reset(code);
                    return;
                }
                Err(_) => {
                    tally.refused("", &fwd.name, Refused::ConnectTimeout);
                    warn!(dest = %fwd.target, "connecting to target timed out after {timeout:?} (connect_timeout)");
                    stream.reset(ErrorCode::ConnectFailed);
                    return;
                }
            };
            debug!(dest = %fwd.target, "stream opened");
            let stats = tokio::select! {
                stats = relay::relay_metered(&stream, &mut local, Some(meter.meter(false))) => stats,
                _ = close.cancelled() => {
                    stream.reset(ErrorCode::TargetNotAllowed);
                    debug!("stream closed: its forward was removed");
                    return;
                }
            };
            relay::log_end(&fwd.name, client, &stats, started, relay::LocalIs::Target);
        }
        .instrument(span),
    );
}

pub(super) async fn connect_target(fwd: &Forward) -> std::io::Result<Local> {
    match &fwd.target {
        Target::Tcp { host, port } => {
            let tcp = TcpStream::connect((host.as_str(), *port)).await?;
            transport::tune(&tcp);
            Ok(Local::Tcp(tcp))
        }
        Target::Unix(path) => Ok(Local::Unix(UnixStream::connect(path).await?)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcard_public_host_becomes_the_gateway_host() {
        assert_eq!(
            public_address("0.0.0.0:4000", "gw.example.com:7443"),
            "gw.example.com:4000"
        );
        assert_eq!(
            public_address("[::]:4000", "[2001:db8::1]:7443"),
            "[2001:db8::1]:4000"
        );
        assert_eq!(
            public_address("192.0.2.1:4000", "gw:7443"),
            "192.0.2.1:4000"
        );
        assert_eq!(
            public_address("gw.example.com:4000", "x:1"),
            "gw.example.com:4000"
        );
    }
}
