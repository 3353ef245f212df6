//! QUIC on UDP: the same admission as the tunnel port (the failure limiter, the pre-auth
//! table), the QUIC handshake and the key proof under the handshake deadline, then the
//! session served as any other.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant as StdInstant;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::accept::{authenticate, log_failure, Failed, PreauthSlot};
use super::serve::serve_agent;
use super::{lock, GatewayError, Hub};
use crate::admin::metrics::AuthFailure;
use crate::limiter::{Admit, Stage};
use crate::stats::bump;
use crate::transport;
use burrow_proto::message::Role;

/// Binds the QUIC endpoint for `listen` with the gateway's certificate.
pub(super) fn bind(
    listen: SocketAddr,
    tls: Arc<rustls::ServerConfig>,
    params: &burrow_proto::message::SessionParams,
) -> Result<quinn::Endpoint, GatewayError> {
    let config = transport::quic::server_config(tls, params).map_err(GatewayError)?;
    quinn::Endpoint::server(config, listen).map_err(|e| {
        GatewayError(format!(
            "cannot listen for QUIC on UDP {listen}: {e}{}",
            if e.kind() == std::io::ErrorKind::AddrInUse {
                " (another process uses this UDP port: pass --quic-listen with another \
                 address, or --no-quic)"
            } else {
                ""
            }
        ))
    })
}

/// Takes QUIC connections until `shutdown`.
pub(super) async fn accept_loop(
    hub: Arc<Hub>,
    endpoint: quinn::Endpoint,
    shutdown: CancellationToken,
) {
    if let Ok(addr) = endpoint.local_addr() {
        info!(listen = %addr, "gateway listening for agents over QUIC (UDP)");
    }
    loop {
        let incoming = tokio::select! {
            _ = shutdown.cancelled() => break,
            i = endpoint.accept() => match i {
                Some(i) => i,
                None => break,
            },
        };
        let peer = incoming.remote_address();
        if let Admit::Cut { .. } = lock(&hub.limiter).admit(peer.ip(), StdInstant::now()) {
            bump(&hub.stats.rate_limited);
            hub.tally.auth_failure(AuthFailure::RateLimited, peer, "");
            debug!(%peer, "QUIC connection refused: too many failed handshakes from this address");
            incoming.refuse();
            continue;
        }
        let evict = CancellationToken::new();
        let id = match lock(&hub.preauth).admit_from(peer.ip(), (evict.clone(), peer), true) {
            Ok(a) => {
                if let Some((victim, _)) = a.evicted {
                    bump(&hub.stats.preauth_evicted);
                    victim.cancel();
                }
                a.id
            }
            Err(_) => {
                bump(&hub.stats.preauth_refused);
                if let Some(skipped) = lock(&hub.preauth_log).allow(Instant::now()) {
                    warn!(%peer, similar_since_last = skipped, "QUIC connection refused: the pre-auth table is full (limits.max_preauth, limits.max_preauth_per_source)");
                }
                incoming.refuse();
                continue;
            }
        };
        let slot = PreauthSlot::new(hub.clone(), id);
        let hub2 = hub.clone();
        hub.tracker.spawn(async move {
            let accepted_at = Instant::now();
            let deadline = hub2.config.limits.handshake_timeout;
            let attempt = async {
                let conn = transport::quic::accept(incoming)
                    .await
                    .map_err(|e| Failed::from(e.to_string()))?;
                slot.advance(Stage::Secured);
                let quic = conn.quic.as_ref().map(|l| l.conn.clone());
                match authenticate(&hub2, conn, peer).await {
                    Ok(x) => Ok(x),
                    Err(failed) => {
                        // Let the refusal on the control stream reach the agent, which
                        // closes the connection once it has read it.
                        if let Some(q) = quic {
                            let _ =
                                tokio::time::timeout(std::time::Duration::from_secs(2), q.closed())
                                    .await;
                        }
                        Err(failed)
                    }
                }
            };
            let accepted = tokio::select! {
                _ = evict.cancelled() => {
                    debug!(%peer, "QUIC connection closed: the pre-auth table is full");
                    return;
                }
                r = tokio::time::timeout(deadline, attempt) => r,
            };
            drop(slot);
            match accepted {
                Ok(Ok((conn, acc))) => {
                    lock(&hub2.limiter).success(peer.ip(), &acc.key);
                    hub2.tally.handshake_took(accepted_at.elapsed());
                    match acc.role {
                        Role::Agent => serve_agent(hub2, conn, acc, peer, "quic").await,
                        Role::Connector => {
                            super::connect::serve_connector(hub2, conn, acc, peer).await
                        }
                    }
                }
                Ok(Err(failed)) if failed.why == transport::quic::PROBE => {
                    debug!(%peer, "{}", failed.why);
                }
                Ok(Err(failed)) => {
                    bump(&hub2.stats.handshake_failures);
                    hub2.tally.auth_failure(
                        failed.kind,
                        peer,
                        &format!("QUIC handshake failed: {}", failed.why),
                    );
                    log_failure(&hub2, peer, failed.presented.as_ref(), &failed.why);
                }
                Err(_) => {
                    bump(&hub2.stats.handshake_failures);
                    hub2.tally
                        .auth_failure(AuthFailure::Timeout, peer, "QUIC handshake timed out");
                    log_failure(
                        &hub2,
                        peer,
                        None,
                        &format!("QUIC handshake timed out after {deadline:?}"),
                    );
                }
            }
        });
    }
    // Sessions already up stay until the gateway closes them after its grace period.
}
