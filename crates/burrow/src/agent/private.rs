//! What connectors reach through this agent: its private services, announced to the gateway
//! at the start of each session, and the targets its `allow` patterns match.
//!
//! The gateway checks every connector stream against the connector's `reach` before it
//! opens one here, but the agent does not rely on that: each stream's Dial is checked again
//! against this agent's own private services and `allow` patterns, and a stream that names
//! anything else is reset (`NoSuchService`, `TargetNotAllowed`) without any connection
//! being made. A target named by host name is allowed by a name pattern as written, or by
//! an address pattern for the addresses it resolves to, and then only those addresses are
//! connected to.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use burrow_proto::connect::{Announce, Dial, DialTarget};
use burrow_proto::message::BindResult;
use burrow_proto::ErrorCode;
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn, Instrument};

use crate::admin::metrics::{Refused, Tally};
use crate::config::{AgentConfig, Target, TARGETS};
use crate::relay::{self, Local};
use crate::session::{Session, Stream};
use crate::transport;

/// Service ids of private services start here, apart from the forwards' (0, 1, ...), so
/// the gateway's answers to Announces and Binds never mix.
pub(super) const PRIVATE_BASE: u32 = 0x8000_0000;

/// How long a probe waits for the connector's end of the stream after answering.
const PROBE_LINGER: Duration = Duration::from_secs(5);

/// Announces every private service to the gateway, which then refuses connector streams
/// for any other name early.
pub(super) fn announce(cfg: &AgentConfig, session: &Session) {
    for (i, s) in cfg.private.services.iter().enumerate() {
        let service = PRIVATE_BASE.saturating_add(u32::try_from(i).unwrap_or(u32::MAX));
        session.send_control(
            Announce {
                service,
                name: s.name.clone(),
            }
            .to_frame(),
        );
    }
}

/// Handles the gateway's answer if it is one to an Announce (then `true`).
pub(super) fn on_result(cfg: &AgentConfig, res: &BindResult) -> bool {
    let Some(idx) = res.service.checked_sub(PRIVATE_BASE) else {
        return false;
    };
    match cfg.private.services.get(idx as usize) {
        Some(s) if res.code == ErrorCode::Normal => {
            info!(service = %s.name, dest = %s.target, "private service announced: connectors whose reach includes it can use it");
        }
        Some(s) => {
            warn!(service = %s.name, "gateway refused the private service: {} ({})", res.text, res.code);
        }
        None => warn!(
            service = res.service,
            "gateway answered an announce we never sent; ignored"
        ),
    }
    true
}

/// Where an allowed connector stream goes.
enum Dest {
    /// A private service's target, and the PROXY protocol header it gets.
    Target(Target, Option<crate::proxy_protocol::ProxyProtocol>),
    /// A host name the allow list names: connected to by name.
    Name(String, u16),
    /// Addresses the allow list takes, in the resolver's order.
    Addrs(Vec<SocketAddr>),
}

/// Checks a connector's stream against this agent's own configuration and relays it.
pub(super) fn accept(
    cfg: &Arc<AgentConfig>,
    stream: Stream,
    pending: &Arc<Semaphore>,
    tracker: &TaskTracker,
    tally: &Arc<Tally>,
) {
    let Some(dial) = stream.dial().cloned() else {
        return;
    };
    let client = stream.info().client;
    // The metrics' service label: the private service, or one label for every direct target
    // (a label per target would let connectors grow the metrics without bound).
    let label = match &dial.target {
        DialTarget::Service(s) => s.clone(),
        DialTarget::Address(_) => TARGETS.to_string(),
    };
    let span = tracing::info_span!(
        "stream",
        connector = %dial.connector,
        forward = %dial.target,
        client = client.map(tracing::field::display)
    );
    let cfg = cfg.clone();
    let pending = pending.clone();
    let tally = tally.clone();
    tracker.spawn(
        async move {
            let started = Instant::now();
            let timeout = cfg.connect_timeout;
            let dest = match tokio::time::timeout(timeout, check(&cfg, &dial)).await {
                Ok(Ok(dest)) => dest,
                Ok(Err((code, why))) => {
                    if dial.probe {
                        info!("connector probe refused: {why}");
                    } else {
                        tally.refused("", &label, Refused::NotAllowed);
                        warn!("connector stream refused: {why}");
                    }
                    stream.reset(code);
                    return;
                }
                Err(_) => {
                    tally.refused("", &label, Refused::ConnectTimeout);
                    warn!("connector stream refused: resolving {} took longer than {timeout:?} (connect_timeout)", dial.target);
                    stream.reset(ErrorCode::ConnectFailed);
                    return;
                }
            };
            if dial.probe {
                // Allowed: say so with a clean end, connect nothing.
                debug!("connector probe: allowed");
                stream.finish();
                let _ = tokio::time::timeout(PROBE_LINGER, stream.recv()).await;
                return;
            }
            let connect = async {
                let permit = pending.acquire_owned().await;
                (connect(&dest).await, permit)
            };
            let mut local = match tokio::time::timeout(timeout, connect).await {
                Ok((Ok(local), permit)) => {
                    drop(permit);
                    local
                }
                Ok((Err(e), _)) => {
                    let (code, why) = super::connect_failure(&e);
                    tally.refused("", &label, why);
                    warn!("cannot connect to target: {e}");
                    stream.reset(code);
                    return;
                }
                Err(_) => {
                    tally.refused("", &label, Refused::ConnectTimeout);
                    warn!("connecting to target timed out after {timeout:?} (connect_timeout)");
                    stream.reset(ErrorCode::ConnectFailed);
                    return;
                }
            };
            // The connector's client, as the connector saw it, before the first byte.
            if let Dest::Target(_, Some(version)) = &dest {
                if let Err(e) = crate::proxy_protocol::send(&mut local, *version, client).await {
                    warn!("cannot write the PROXY protocol header to the target: {e}");
                    stream.reset(ErrorCode::ConnectFailed);
                    return;
                }
            }
            debug!("connector stream opened");
            let meter = tally.stream("", &label);
            let stats = relay::relay_metered(&stream, &mut local, Some(meter.meter(false))).await;
            relay::log_end(
                &dial.target.to_string(),
                client,
                &stats,
                started,
                relay::LocalIs::Target,
            );
        }
        .instrument(span),
    );
}

/// Whether this agent takes `dial`, and where it goes; else the reset code and why.
async fn check(cfg: &AgentConfig, dial: &Dial) -> Result<Dest, (ErrorCode, String)> {
    let address = match &dial.target {
        DialTarget::Service(name) => {
            return match cfg.private.service(name) {
                Some(s) => Ok(Dest::Target(s.target.clone(), s.proxy_protocol)),
                None => Err((
                    ErrorCode::NoSuchService,
                    format!("no private service named `{name}` here (--private NAME=TARGET)"),
                )),
            }
        }
        DialTarget::Address(a) => a,
    };
    let not_allowed = || {
        (
            ErrorCode::TargetNotAllowed,
            format!("{address} is not in this agent's allow list (--allow)"),
        )
    };
    let (host, port) = split(address).ok_or_else(|| {
        (
            ErrorCode::TargetNotAllowed,
            format!("{address:?} is not HOST:PORT"),
        )
    })?;
    let allow = &cfg.private.allow;
    if let Ok(ip) = host.parse::<IpAddr>() {
        let addr = SocketAddr::new(ip, port);
        return match allow.iter().any(|p| p.matches_addr(addr)) {
            true => Ok(Dest::Addrs(vec![addr])),
            false => Err(not_allowed()),
        };
    }
    if allow.iter().any(|p| p.matches_name(host, port)) {
        return Ok(Dest::Name(host.to_string(), port));
    }
    if !allow.iter().any(|p| p.is_net_for(port)) {
        return Err(not_allowed());
    }
    // Only networks could take it: what the name resolves to decides, and only the
    // addresses they take are used.
    let resolved = tokio::net::lookup_host((host, port)).await.map_err(|e| {
        (
            ErrorCode::ConnectFailed,
            format!("cannot resolve {host}: {e}"),
        )
    })?;
    let kept: Vec<SocketAddr> = resolved
        .filter(|a| allow.iter().any(|p| p.matches_addr(*a)))
        .collect();
    if kept.is_empty() {
        return Err((
            ErrorCode::TargetNotAllowed,
            format!("{address} resolves to no address in this agent's allow list (--allow)"),
        ));
    }
    Ok(Dest::Addrs(kept))
}

/// `host:port` or `[ipv6]:port`, the host without brackets.
fn split(s: &str) -> Option<(&str, u16)> {
    let (host, port) = match s.strip_prefix('[') {
        Some(rest) => rest.split_once("]:")?,
        None => s.rsplit_once(':')?,
    };
    let port = port.parse::<u16>().ok().filter(|p| *p != 0)?;
    (!host.is_empty()).then_some((host, port))
}

async fn connect(dest: &Dest) -> std::io::Result<Local> {
    let tcp = match dest {
        Dest::Target(Target::Unix(path), _) => {
            return Ok(Local::Unix(UnixStream::connect(path).await?))
        }
        Dest::Target(Target::Tcp { host, port }, _) => {
            TcpStream::connect((host.as_str(), *port)).await?
        }
        Dest::Name(host, port) => TcpStream::connect((host.as_str(), *port)).await?,
        Dest::Addrs(addrs) => TcpStream::connect(&addrs[..]).await?,
    };
    transport::tune(&tcp);
    Ok(Local::Tcp(tcp))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{PrivateConfig, TargetPattern};

    fn cfg(allow: &[&str]) -> AgentConfig {
        let mut c = crate::config::AgentSettings {
            gateways: Some(vec![crate::config::GatewaySetting::new("127.0.0.1:1")]),
            key: Some(burrow_proto::auth::SecretKey::generate()),
            transport: Some(crate::config::TransportKind::Tcp),
            ..Default::default()
        }
        .into_config()
        .unwrap();
        c.private = PrivateConfig {
            services: vec![crate::config::parse_private("vnc=127.0.0.1:5900").unwrap()],
            allow: allow
                .iter()
                .map(|p| TargetPattern::parse(p).unwrap())
                .collect(),
        };
        c
    }

    fn dial(target: DialTarget) -> Dial {
        Dial {
            agent: "office".into(),
            target,
            connector: "laptop".into(),
            probe: false,
        }
    }

    #[tokio::test]
    async fn every_dial_is_checked_against_the_agents_own_lists() {
        let c = cfg(&["127.0.0.0/8:22", "localhost:8000-8010", "[::1]:*"]);
        let svc = |s: &str| dial(DialTarget::Service(s.into()));
        let addr = |s: &str| dial(DialTarget::Address(s.into()));
        assert!(matches!(
            check(&c, &svc("vnc")).await,
            Ok(Dest::Target(_, None))
        ));
        assert_eq!(
            check(&c, &svc("ssh")).await.err().unwrap().0,
            ErrorCode::NoSuchService
        );
        assert!(
            matches!(check(&c, &addr("127.0.0.9:22")).await, Ok(Dest::Addrs(a)) if a.len() == 1)
        );
        assert!(matches!(
            check(&c, &addr("[::1]:5")).await,
            Ok(Dest::Addrs(_))
        ));
        for refused in [
            "127.0.0.9:23",
            "10.0.0.1:22",
            "[::2]:5",
            "localhost:8011",
            "nohost",
        ] {
            assert_eq!(
                check(&c, &addr(refused)).await.err().unwrap().0,
                ErrorCode::TargetNotAllowed,
                "{refused}"
            );
        }
        assert!(matches!(
            check(&c, &addr("LOCALHOST:8005")).await,
            Ok(Dest::Name(h, 8005)) if h == "LOCALHOST"
        ));
        // A name no name pattern takes is resolved, and only addresses a network takes are
        // kept: localhost is 127.0.0.1 (and perhaps ::1).
        match check(&c, &addr("localhost:22")).await {
            Ok(Dest::Addrs(a)) => assert!(a.iter().all(|a| a.ip().is_loopback())),
            other => panic!("{:?}", other.err()),
        }
        // Nothing allowed at all: every address is refused.
        let none = cfg(&[]);
        assert_eq!(
            check(&none, &addr("127.0.0.1:22")).await.err().unwrap().0,
            ErrorCode::TargetNotAllowed
        );
    }
}
