//! The forwards of one session: asking the gateway for their ports, retrying the refusals
//! that may pass, and relaying each stream the gateway opens to its local target.

use std::collections::HashMap;
use std::sync::Arc;

use burrow_proto::message::{Bind, BindResult, Protocol};
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
use crate::session::{self, SessionEnd, Stream};
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

/// Serves one session: binds every forward, asks again for refused ones with backoff, relays
/// streams, until the session ends or `shutdown`.
pub(super) async fn serve(
    cfg: &Arc<AgentConfig>,
    started: session::Started,
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
    let bind = |i: usize| {
        let fwd = &cfg.forwards[i];
        let bind = Bind {
            service: i as u32,
            protocol: fwd.protocol,
            port: fwd.public_port,
            name: fwd.name.clone(),
        };
        session.send_control(bind.to_frame());
    };
    (0..cfg.forwards.len()).for_each(bind);
    super::private::announce(cfg, &session);
    let mut bindings = vec![Binding::default(); cfg.forwards.len()];
    let granted: Arc<std::sync::Mutex<Vec<bool>>> =
        Arc::new(std::sync::Mutex::new(vec![false; cfg.forwards.len()]));
    // UDP forwards: their flows, each with a socket toward the target. Without any, the
    // receiver is dropped and a datagram from the gateway is a protocol error.
    let udp_services: HashMap<u32, udp::UdpService> = cfg
        .forwards
        .iter()
        .enumerate()
        .filter(|(_, f)| f.protocol == Protocol::Udp)
        .filter_map(|(i, f)| match &f.target {
            Target::Tcp { host, port } => Some((
                i as u32,
                udp::UdpService {
                    name: f.name.clone(),
                    host: host.clone(),
                    port: *port,
                    counters: Arc::default(),
                },
            )),
            Target::Unix(_) => None,
        })
        .collect();
    if udp_services.is_empty() {
        drop(datagrams);
    } else {
        tracker.spawn(udp::serve_agent_flows(
            session.clone(),
            datagrams,
            udp_services,
            granted.clone(),
            cfg.udp,
        ));
    }
    let pending = Arc::new(Semaphore::new(cfg.limits.max_pending_opens as usize));
    loop {
        let next_retry = bindings.iter().filter_map(|b| b.retry_at).min();
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
                for (i, b) in bindings.iter_mut().enumerate() {
                    if b.retry_at.is_some_and(|t| t <= now) {
                        b.retry_at = None;
                        info!(forward = %cfg.forwards[i].name, "asking the gateway again for the forward it refused");
                        bind(i);
                    }
                }
                status.send_modify(|s| {
                    for (r, b) in s.forward_retries.iter_mut().zip(&bindings) {
                        if b.retry_at.is_none() {
                            *r = None;
                        }
                    }
                });
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
                        on_bind_result(cfg, &res, status, &granted, &mut bindings);
                        if let Some(why) = nothing_to_publish(cfg, &bindings) {
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
                accept_stream(cfg, stream, &granted, &pending, tracker, tally);
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
pub(super) fn nothing_to_publish(cfg: &AgentConfig, bindings: &[Binding]) -> Option<String> {
    // Connectors may still use the private services and allowed targets.
    if !cfg.private.is_empty() {
        return None;
    }
    if bindings.is_empty() || bindings.iter().any(|b| b.refused_for_good.is_none()) {
        return None;
    }
    let reasons: Vec<String> = cfg
        .forwards
        .iter()
        .zip(bindings)
        .map(|(f, b)| {
            format!(
                "forward {}: {}",
                f.name,
                b.refused_for_good.as_deref().unwrap_or("")
            )
        })
        .collect();
    Some(format!(
        "nothing to publish: the gateway refused every forward, for reasons retrying cannot change ({}); ask the gateway's operator to grant the ports (`ports` of this agent's [[agents]] entry), or change --forward",
        reasons.join("; ")
    ))
}

pub(super) fn on_bind_result(
    cfg: &AgentConfig,
    res: &BindResult,
    status: &watch::Sender<AgentStatus>,
    granted: &std::sync::Mutex<Vec<bool>>,
    bindings: &mut [Binding],
) {
    let idx = res.service as usize;
    let (Some(fwd), Some(binding)) = (cfg.forwards.get(idx), bindings.get_mut(idx)) else {
        warn!(
            service = res.service,
            "gateway answered a bind we never asked for; ignored"
        );
        return;
    };
    let ok = res.code == ErrorCode::Normal;
    if let Some(g) = granted
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get_mut(idx)
    {
        *g = ok;
    }
    binding.retry_at = None;
    let mut retry = None;
    let new = if ok {
        binding.refusals = 0;
        let public = public_address(&res.text, &cfg.gateway);
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
    status.send_modify(|s| {
        if let Some(f) = s.forwards.get_mut(idx) {
            *f = new;
        }
        if let Some(r) = s.forward_retries.get_mut(idx) {
            *r = retry;
        }
    });
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
pub(super) fn accept_stream(
    cfg: &Arc<AgentConfig>,
    stream: Stream,
    granted: &std::sync::Mutex<Vec<bool>>,
    pending: &Arc<Semaphore>,
    tracker: &TaskTracker,
    tally: &Arc<Tally>,
) {
    let service = stream.info().service as usize;
    let client = stream.info().client;
    let allowed = granted
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(service)
        .copied()
        .unwrap_or(false);
    let fwd = cfg
        .forwards
        .get(service)
        .filter(|f| allowed && f.protocol == Protocol::Tcp);
    let Some(fwd) = fwd.cloned() else {
        let name = cfg.forwards.get(service).map_or(OTHER, |f| f.name.as_str());
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
                (connect_target(&fwd).await, permit)
            };
            let mut local = match tokio::time::timeout(timeout, connect).await {
                Ok((Ok(local), permit)) => {
                    drop(permit);
                    local
                }
                Ok((Err(e), _)) => {
                    let (code, why) = if e.kind() == std::io::ErrorKind::ConnectionRefused {
                        (ErrorCode::ConnectRefused, Refused::ConnectRefused)
                    } else {
                        (ErrorCode::ConnectFailed, Refused::ConnectFailed)
                    };
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
            let stats = relay::relay_metered(&stream, &mut local, Some(meter.meter(false))).await;
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
