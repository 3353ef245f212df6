//! The tunnel port: the limiter, the pre-auth table and the handshake of each connection.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant as StdInstant;

use burrow_proto::auth::KeyHash;
use burrow_proto::message::Role;
use burrow_proto::ErrorCode;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::serve::serve_agent;
use super::{lock, Hub, LogThrottle};
use crate::admin::metrics::AuthFailure;
use crate::limiter::{self, Admit, Refusal, Stage};
use crate::session::handshake;
use crate::stats::bump;
use crate::transport;

/// Takes tunnel connections on one listener until `shutdown`: the limiter, the pre-auth
/// table, then the handshake under its deadline, each connection in a task of its own.
pub(super) async fn accept_loop(
    hub: Arc<Hub>,
    listener: TcpListener,
    acceptor: transport::Acceptor,
    shutdown: CancellationToken,
) {
    let acceptor = Arc::new(acceptor);
    let mut accept_errors = LogThrottle::default();
    loop {
        let (tcp, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors and the like: the connection waits in the
                    // backlog; pause instead of spinning on it, and say so once a second.
                    if let Some(skipped) = accept_errors.allow(Instant::now()) {
                        warn!(similar_since_last = skipped, "accept on tunnel port failed: {e}");
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // Behind a proxy (ws_listen) the TCP peer is the proxy: one agent's failures would
        // lock out every agent behind it, so the per-address failure budget applies only where
        // the peer is the client itself.
        let by_address = !acceptor.ws_only;
        let cut = match by_address {
            true => match lock(&hub.limiter).admit(peer.ip(), StdInstant::now()) {
                Admit::Cut { first } => Some(first),
                _ => None,
            },
            false => None,
        };
        if let Some(first) = cut {
            bump(&hub.stats.rate_limited);
            hub.tally.auth_failure(AuthFailure::RateLimited, peer, "");
            if first {
                warn!(%peer, "flood of failed handshakes from this address (over {} at once, then more than one every {:?}): closing its tunnel connections before TLS until it slows down (logged once)", limiter::DEFAULT_SOURCE_BURST, limiter::DEFAULT_SOURCE_REFILL);
            } else {
                debug!(%peer, "tunnel connection closed before TLS: too many failed handshakes from this address");
            }
            continue;
        }
        let evict = CancellationToken::new();
        // Behind a proxy every connection comes from its address: no per-source cap there.
        let admitted =
            lock(&hub.preauth).admit_from(peer.ip(), (evict.clone(), peer), !acceptor.ws_only);
        let id = match admitted {
            Ok(a) => {
                if let Some((victim, victim_peer)) = a.evicted {
                    bump(&hub.stats.preauth_evicted);
                    victim.cancel();
                    if let Some(skipped) = lock(&hub.evict_log).allow(Instant::now()) {
                        warn!(peer = %victim_peer, similar_since_last = skipped, "tunnel connection closed: it had sent nothing and all {} pre-auth slots were taken (limits.max_preauth)", hub.config.limits.max_preauth);
                    }
                }
                a.id
            }
            Err(why) => {
                let (counter, text) = match why {
                    Refusal::Source => (
                        &hub.stats.preauth_source_refused,
                        format!(
                            "this address already has {} connections in their handshake (limits.max_preauth_per_source)",
                            hub.config.limits.max_preauth_per_source
                        ),
                    ),
                    Refusal::Full => (
                        &hub.stats.preauth_refused,
                        format!(
                            "all {} pre-auth slots are held by connections in their handshake (limits.max_preauth)",
                            hub.config.limits.max_preauth
                        ),
                    ),
                };
                bump(counter);
                if let Some(skipped) = lock(&hub.preauth_log).allow(Instant::now()) {
                    warn!(%peer, similar_since_last = skipped, "tunnel connection refused: {text}");
                }
                continue;
            }
        };
        let slot = PreauthSlot {
            hub: hub.clone(),
            id,
        };
        let hub2 = hub.clone();
        let acceptor = acceptor.clone();
        hub.tracker.spawn(async move {
            let accepted_at = Instant::now();
            let accepted = tokio::select! {
                _ = evict.cancelled() => {
                    // Not charged to the source: giving way is not a failure.
                    debug!(%peer, "tunnel connection closed: it had sent nothing and the pre-auth table is full");
                    return;
                }
                r = tokio::time::timeout(
                    hub2.config.limits.handshake_timeout,
                    handshake_agent(&hub2, tcp, peer, &acceptor, &slot),
                ) => r,
            };
            drop(slot);
            match accepted {
                Ok(Ok((conn, acc))) => {
                    lock(&hub2.limiter).success(peer.ip(), &acc.key);
                    let peer = conn.peer;
                    // What carried the session: a WebSocket upgrade on the tunnel port is
                    // `wss` (or `ws` on a plain tunnel port), not the port's transport.
                    let transport = match (acceptor.ws_only, conn.websocket, acceptor.tls.is_some()) {
                        (true, ..) => "ws-listen",
                        (false, true, true) => "wss",
                        (false, true, false) => "ws",
                        (false, false, _) => hub2.config.transport.as_str(),
                    };
                    hub2.tally.handshake_took(accepted_at.elapsed());
                    match acc.role {
                        Role::Agent => serve_agent(hub2, conn, acc, peer, transport).await,
                        Role::Connector => super::connect::serve_connector(hub2, conn, acc, peer).await,
                    }
                }
                Ok(Err(failed)) if failed.rate_limited => {
                    bump(&hub2.stats.handshake_failures);
                    bump(&hub2.stats.rate_limited);
                    hub2.tally.auth_failure(AuthFailure::RateLimited, peer, &failed.why);
                    let key = failed.presented.as_ref();
                    if lock(&hub2.limiter).refused(peer.ip(), key, StdInstant::now()) {
                        let whose = match key {
                            Some(k) => format!("with key {}", k.short()),
                            None => "with unknown keys".into(),
                        };
                        warn!(%peer, "too many failed handshakes from this address {whose} (over {} at once, then 1 every {:?}): refusing them as rate-limited for now; other keys from this address still get in (logged once)", limiter::DEFAULT_BURST, limiter::DEFAULT_REFILL);
                    } else {
                        debug!(%peer, "tunnel handshake refused: {}", failed.why);
                    }
                }
                Ok(Err(failed)) => {
                    bump(&hub2.stats.handshake_failures);
                    hub2.tally.auth_failure(failed.kind, peer, &format!("tunnel handshake failed: {}", failed.why));
                    if by_address {
                        log_failure(&hub2, peer, failed.presented.as_ref(), &failed.why);
                    } else {
                        warn!(%peer, "tunnel handshake failed: {}", failed.why);
                    }
                }
                Err(_) => {
                    bump(&hub2.stats.handshake_failures);
                    let why = format!("timed out after {:?}", hub2.config.limits.handshake_timeout);
                    hub2.tally.auth_failure(AuthFailure::Timeout, peer, "tunnel handshake timed out");
                    if by_address {
                        log_failure(&hub2, peer, None, &why);
                    } else {
                        warn!(%peer, "tunnel handshake failed: {why}");
                    }
                }
            }
        });
    }
}

/// Charges a failed handshake and logs it: at warn while the source's budget lasts and once
/// past it, then at debug.
pub(super) fn log_failure(hub: &Hub, peer: SocketAddr, presented: Option<&KeyHash>, why: &str) {
    let now = StdInstant::now();
    let mut limiter = lock(&hub.limiter);
    if !limiter.failure(peer.ip(), presented, now) {
        debug!(%peer, "tunnel handshake failed: {why}");
    } else if limiter.check(peer.ip(), presented, now).is_some() {
        warn!(%peer, "tunnel handshake failed: {why} (this address has used up its failure budget for now)");
    } else {
        warn!(%peer, "tunnel handshake failed: {why}");
    }
}

/// A connection's slot in the pre-auth table, given back when dropped.
pub(super) struct PreauthSlot {
    hub: Arc<Hub>,
    id: u64,
}

impl PreauthSlot {
    pub(super) fn new(hub: Arc<Hub>, id: u64) -> Self {
        PreauthSlot { hub, id }
    }

    pub(super) fn advance(&self, stage: Stage) {
        lock(&self.hub.preauth).advance(self.id, stage);
    }
}

impl Drop for PreauthSlot {
    fn drop(&mut self) {
        lock(&self.hub.preauth).remove(self.id);
    }
}

/// Why a tunnel handshake failed, and what to charge it to.
pub(super) struct Failed {
    pub(super) why: String,
    /// What kind of failure, for the metrics.
    pub(super) kind: AuthFailure,
    /// The key presented, when the gateway knows it (`None`: unknown, or none yet).
    pub(super) presented: Option<KeyHash>,
    /// Refused for being over the failure budget.
    pub(super) rate_limited: bool,
}

impl From<String> for Failed {
    fn from(why: String) -> Self {
        Failed {
            why,
            kind: AuthFailure::Handshake,
            presented: None,
            rate_limited: false,
        }
    }
}

pub(super) async fn handshake_agent(
    hub: &Hub,
    tcp: TcpStream,
    peer: SocketAddr,
    acceptor: &transport::Acceptor,
    slot: &PreauthSlot,
) -> Result<(transport::Connected, handshake::Accepted), Failed> {
    // Every client speaks first (a TLS hello, a Burrow preamble, an HTTP request): until a
    // byte arrives, this connection has made no progress and gives way to a newcomer when the
    // table is full.
    match tcp.peek(&mut [0u8; 1]).await {
        Ok(0) => return Err(String::from("closed before sending anything").into()),
        Ok(_) => {}
        Err(e) => return Err(e.to_string().into()),
    }
    slot.advance(Stage::Talking);
    let conn = transport::accept(tcp, peer, acceptor)
        .await
        .map_err(|e| Failed::from(e.to_string()))?;
    slot.advance(Stage::Secured);
    authenticate(hub, conn, peer).await
}

/// The key proof over a secured connection (TLS, WebSocket or QUIC's control stream).
pub(super) async fn authenticate(
    hub: &Hub,
    mut conn: transport::Connected,
    peer: SocketAddr,
) -> Result<(transport::Connected, handshake::Accepted), Failed> {
    let bindings = conn.bindings;
    // Failures are charged to the source and the key it presents, so one failing agent does
    // not lock out the others behind the same address; past the budget the refusal says so,
    // inside TLS, where the agent can read it.
    let mut presented = None;
    let verdict = |key: &KeyHash, role: Role| {
        // A token's key that was revoked or has expired is refused as such (to whoever proves
        // it: to anyone else it is an unknown key).
        let ended = lock(&hub.tokens)
            .by_hash(key)
            .and_then(|t| t.refusal(std::time::SystemTime::now()));
        let grant = hub.grants().get(key).filter(|_| ended.is_none()).cloned();
        // A key is an agent's, a connector's, or (listed in both tables) both; it acts only
        // in a role its entries give it.
        let connector = hub.connectors.grant(key);
        presented = (grant.is_some() || connector.is_some()).then_some(*key);
        let limited = lock(&hub.limiter).check(peer.ip(), presented.as_ref(), StdInstant::now());
        let limited = |why: &str| limited.map(|after| handshake::rate_limited_message(after, why));
        if let Some(text) = ended {
            return match limited("key not accepted by this gateway") {
                None => handshake::Verdict::RefuseIfProven(ErrorCode::KeyRevoked, text),
                Some(text) => handshake::Verdict::Refuse(ErrorCode::RateLimited, text),
            };
        }
        let name = match role {
            Role::Agent => grant.as_ref().map(|g| g.name.clone()),
            Role::Connector => connector.as_ref().map(|c| c.name.clone()),
        };
        match (name, grant, connector) {
            (Some(name), ..) => match limited("key proof does not verify") {
                None => handshake::Verdict::Accept(name, hub.params),
                Some(text) => handshake::Verdict::AcceptIfProven(
                    name,
                    hub.params,
                    ErrorCode::RateLimited,
                    text,
                ),
            },
            (None, Some(agent), _) => handshake::Verdict::RefuseIfProven(ErrorCode::AuthFailed, format!(
                "this key belongs to agent `{}` and cannot act as a connector: give the connector a key of its own in a [[connectors]] entry (`burrow keygen`), or list this key in [[connectors]] too",
                agent.name
            )),
            (None, None, Some(c)) => handshake::Verdict::RefuseIfProven(ErrorCode::AuthFailed, format!(
                "this key belongs to connector `{}` and cannot act as an agent: give the agent a key of its own in an [[agents]] entry (`burrow keygen`), or list this key in [[agents]] too",
                c.name
            )),
            (None, None, None) => match limited("key not accepted by this gateway") {
                None => handshake::Verdict::Refuse(
                    ErrorCode::AuthFailed,
                    "key not accepted by this gateway".into(),
                ),
                Some(text) => handshake::Verdict::Refuse(ErrorCode::RateLimited, text),
            },
        }
    };
    let accepted = handshake::server_bound(&mut conn.io, &bindings, verdict).await;
    let accepted = accepted.map_err(|e| match e {
        handshake::HandshakeError::Rejected { code, message } => Failed {
            why: format!("authentication failed: {message}"),
            kind: match code {
                ErrorCode::RateLimited => AuthFailure::RateLimited,
                ErrorCode::KeyRevoked => AuthFailure::Revoked,
                _ if presented.is_none() => AuthFailure::UnknownKey,
                ErrorCode::AuthFailed => AuthFailure::BadProof,
                _ => AuthFailure::Handshake,
            },
            presented,
            rate_limited: code == ErrorCode::RateLimited,
        },
        other => Failed {
            why: other.to_string(),
            kind: AuthFailure::Handshake,
            presented,
            rate_limited: false,
        },
    })?;
    Ok((conn, accepted))
}
