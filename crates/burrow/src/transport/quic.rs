//! QUIC (quinn, rustls on ring): dialing the gateway over UDP, taking agents' connections,
//! and Burrow's limits as QUIC's own.
//!
//! A QUIC connection ends in a [`Connected`] like any other transport: its `io` is the first
//! bidirectional stream (opened by the agent), which carries the handshake and then control
//! frames, and its binding is the QUIC connection's TLS exporter. [`Connected::start`] then
//! runs the session on the connection itself ([`crate::session::quic`]).
//!
//! Limits, from the session parameters:
//! - streams: `max_streams` concurrent bidirectional streams, no unidirectional ones;
//! - windows: a stream may have `max_stream_window` (capped at `session_window`) unread, the
//!   connection `session_window` across all its streams, so streams x window never exceeds
//!   the session budget; the send window is the same;
//! - liveness: a keep-alive every heartbeat interval, an idle timeout of interval x misses;
//! - datagrams: [`crate::session::DATAGRAM_QUEUE`] bytes queued each way;
//! - before authentication: one stream (the control stream) and a [`PREAUTH_WINDOW`]
//!   connection window, raised to the above once the key proof checks out.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use burrow_proto::message::SessionParams;
use burrow_proto::ErrorCode;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::VarInt;

use super::url::GatewayUrl;
use super::{Bindings, BoxIo, Connected, DialError};
use crate::config::Trust;
use crate::session::DATAGRAM_QUEUE;

/// With `auto://` on TLS, how often the agent checks whether QUIC passes again (while the
/// session has no open stream); `BURROW_AUTO_RETRY_QUIC` (a duration such as `30s`) changes it.
pub const AUTO_RETRY_QUIC: Duration = Duration::from_secs(60);
/// The CONNECTION_CLOSE reason of a probe (the gateway counts no failure for it).
const PROBE_REASON: &[u8] = b"auto:// probe";

/// What [`accept`] says of an `auto://` agent's probe (a QUIC handshake it closes at once,
/// to learn whether UDP passes): not a failed handshake.
pub const PROBE: &str = "an auto:// agent checked that QUIC passes";

/// How to dial QUIC again from an `auto://` session that fell back to TLS.
#[derive(Clone)]
pub struct RetryQuic {
    url: GatewayUrl,
    trust: Trust,
    tls: Arc<rustls::ClientConfig>,
    server_name: Option<String>,
    every: Duration,
}

impl std::fmt::Debug for RetryQuic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RetryQuic").field("url", &self.url).finish()
    }
}

impl RetryQuic {
    /// While `session` (over TLS) lives: every [`AUTO_RETRY_QUIC`], if no stream is open,
    /// completes a QUIC handshake with the gateway (no authentication) and, when it works,
    /// closes the session so that the agent's reconnect comes up over QUIC. Open streams are
    /// never cut for it.
    pub(crate) async fn watch(self, session: crate::session::Session) {
        loop {
            tokio::select! {
                _ = session.closed() => return,
                _ = tokio::time::sleep(self.every) => {}
            }
            if session.stream_count() > 0 {
                continue;
            }
            let name = self.server_name.as_deref().unwrap_or(&self.url.host);
            let params = SessionParams::default();
            let probe = dial(&self.url, self.tls.clone(), name, &self.trust, &params);
            let Ok(Ok(c)) = tokio::time::timeout(AUTO_FALLBACK, probe).await else {
                tracing::debug!(gateway = %self.url, "auto://: QUIC still does not pass; staying on TLS");
                continue;
            };
            if let Some(link) = &c.quic {
                link.conn
                    .close(VarInt::from_u32(ErrorCode::Normal as u32), PROBE_REASON);
            }
            if session.stream_count() == 0 {
                tracing::info!(gateway = %self.url, "auto://: QUIC passes again: ending the idle TLS session to reconnect over QUIC");
                session.close(
                    ErrorCode::Normal,
                    "auto://: QUIC passes again, reconnecting over it",
                );
                return;
            }
        }
    }
}

/// A QUIC connection, and at the agent the endpoint (UDP socket) it runs on.
#[derive(Debug, Clone)]
pub struct Link {
    /// The connection.
    pub conn: quinn::Connection,
    /// The agent's endpoint, which [`crate::session::quic::Session::rebind`] moves to
    /// another socket; `None` at the gateway (one endpoint serves every agent).
    pub endpoint: Option<quinn::Endpoint>,
}

/// Connection-wide receive window before the agent has authenticated: enough for the
/// handshake on the control stream, so a client that never authenticates holds little.
pub const PREAUTH_WINDOW: u32 = 64 * 1024;
/// With `auto://`, how long QUIC has to connect before the agent settles for TLS (which it
/// dials [`AUTO_TLS_AFTER`] into the attempt, beside QUIC).
pub const AUTO_FALLBACK: Duration = Duration::from_secs(2);
/// With `auto://`, QUIC's head start before TLS is dialled beside it: a path where UDP gets
/// through answers QUIC within a round trip, so TLS is then never dialled (a TLS connection
/// dropped unauthenticated would count as a failed handshake at the gateway).
pub const AUTO_TLS_AFTER: Duration = Duration::from_millis(250);

/// The QUIC transport settings for sessions with `params`, at their pre-authentication
/// limits (see the module docs).
pub fn transport_config(params: &SessionParams) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    let heartbeat = Duration::from_millis(u64::from(params.heartbeat_ms.max(100)));
    let idle = heartbeat * params.heartbeat_misses.max(1);
    t.max_concurrent_bidi_streams(VarInt::from_u32(1))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .stream_receive_window(VarInt::from_u32(
            params
                .max_stream_window
                .min(params.session_window)
                .max(1024),
        ))
        .receive_window(VarInt::from_u32(PREAUTH_WINDOW))
        .send_window(u64::from(params.session_window))
        .keep_alive_interval(Some(heartbeat))
        .max_idle_timeout(quinn::IdleTimeout::try_from(idle).ok())
        .datagram_receive_buffer_size(Some(DATAGRAM_QUEUE))
        .datagram_send_buffer_size(DATAGRAM_QUEUE);
    t
}

/// Raises an authenticated connection's limits from the pre-authentication ones.
pub(crate) fn open_limits(conn: &quinn::Connection, params: &SessionParams) {
    conn.set_max_concurrent_bi_streams(VarInt::from_u32(params.max_streams));
    conn.set_receive_window(VarInt::from_u32(params.session_window));
}

/// The gateway's QUIC server settings over its TLS settings (certificate, ALPN).
pub fn server_config(
    tls: Arc<rustls::ServerConfig>,
    params: &SessionParams,
) -> Result<quinn::ServerConfig, String> {
    let crypto = QuicServerConfig::try_from(tls)
        .map_err(|e| format!("the TLS settings cannot serve QUIC: {e}"))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(Arc::new(transport_config(params)));
    // An agent whose address changes (a new network, a NAT rebinding) keeps its session.
    config.migration(true);
    Ok(config)
}

/// The channel binding of a QUIC connection: its TLS exporter for
/// [`burrow_proto::auth::EXPORTER_LABEL`] (as over TLS).
pub fn binding(conn: &quinn::Connection) -> Result<[u8; 32], String> {
    let mut out = [0u8; 32];
    conn.export_keying_material(&mut out, burrow_proto::auth::EXPORTER_LABEL, b"")
        .map_err(|_| "cannot derive the QUIC connection's channel binding".to_string())?;
    Ok(out)
}

/// The control stream as a byte stream.
fn control_io(send: quinn::SendStream, recv: quinn::RecvStream) -> BoxIo {
    Box::new(tokio::io::join(recv, send))
}

/// Dials the gateway over QUIC: resolves the host, binds a UDP socket of the same family,
/// runs the QUIC handshake (the certificate checked as over TLS) and opens the control
/// stream.
pub async fn dial(
    url: &GatewayUrl,
    tls: Arc<rustls::ClientConfig>,
    server_name: &str,
    trust: &Trust,
    params: &SessionParams,
) -> Result<Connected, DialError> {
    let authority = url.authority();
    let net = |message: String| DialError {
        message,
        fatal: false,
    };
    let remote = tokio::net::lookup_host(&authority)
        .await
        .map_err(|e| net(format!("cannot resolve gateway {authority}: {e}")))?
        .next()
        .ok_or_else(|| net(format!("gateway {authority} resolves to no address")))?;
    let local: SocketAddr = match remote {
        SocketAddr::V4(_) => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let endpoint = quinn::Endpoint::client(local)
        .map_err(|e| net(format!("cannot open a UDP socket for QUIC: {e}")))?;
    let crypto = QuicClientConfig::try_from(tls).map_err(|e| DialError {
        message: format!("the TLS settings cannot dial QUIC: {e}"),
        fatal: true,
    })?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(Arc::new(transport_config(params)));
    let name = crate::tls::server_name(server_name)
        .map(|n| n.to_str().into_owned())
        .map_err(|e| DialError {
            message: format!("{e}: set --server-name"),
            fatal: true,
        })?;
    let connecting = endpoint
        .connect_with(config, remote, &name)
        .map_err(|e| DialError {
            message: format!("QUIC to {authority}: {e}"),
            fatal: true,
        })?;
    let conn = connecting
        .await
        .map_err(|e| describe_connect_error(&authority, &e, trust))?;
    let (send, recv) = conn
        .open_bi()
        .await
        .map_err(|e| net(format!("QUIC with {authority}: {e}")))?;
    let connection = binding(&conn).map_err(|e| DialError {
        message: format!("QUIC with {authority}: {e}"),
        fatal: true,
    })?;
    Ok(Connected {
        io: control_io(send, recv),
        bindings: Bindings {
            connection,
            proxied: None,
        },
        peer: remote,
        quic: Some(Link {
            conn,
            endpoint: Some(endpoint),
        }),
        retry_quic: None,
        websocket: false,
    })
}

/// `auto://`: QUIC, with TLS dialled beside it after [`AUTO_TLS_AFTER`]; QUIC if it connects
/// within [`AUTO_FALLBACK`], else TLS. Through an outbound proxy, TLS only (QUIC is UDP).
/// Every connect tries QUIC again, so a session that fell back to TLS comes back over QUIC
/// at its next reconnect once UDP passes.
pub(super) async fn dial_auto(
    url: &GatewayUrl,
    proxy: Option<&super::ProxyUrl>,
    trust: &Trust,
    tls: Option<Arc<rustls::ClientConfig>>,
    server_name: Option<&str>,
) -> Result<Connected, DialError> {
    let with = |scheme| GatewayUrl {
        scheme,
        ..url.clone()
    };
    let (quic_url, tls_url) = (with(super::Scheme::Quic), with(super::Scheme::Tls));
    let retry = tls.clone().map(|tls| RetryQuic {
        url: quic_url.clone(),
        trust: trust.clone(),
        tls,
        server_name: server_name.map(str::to_string),
        every: std::env::var("BURROW_AUTO_RETRY_QUIC")
            .ok()
            .and_then(|v| humantime::parse_duration(&v).ok())
            .unwrap_or(AUTO_RETRY_QUIC),
    });
    let on_tls = |mut c: Connected| {
        c.retry_quic = retry.clone();
        c
    };
    if proxy.is_some() {
        tracing::info!(gateway = %url, "auto://: through an outbound proxy, so TLS (QUIC runs over UDP, which a proxy does not carry)");
        return super::dial(&tls_url, proxy, trust, tls, server_name).await;
    }
    let started = tokio::time::Instant::now();
    let quic = super::dial(&quic_url, None, trust, tls.clone(), server_name);
    let tls_dial = async {
        tokio::time::sleep(AUTO_TLS_AFTER).await;
        super::dial(&tls_url, None, trust, tls, server_name).await
    };
    let fallback = tokio::time::sleep(AUTO_FALLBACK);
    tokio::pin!(quic, tls_dial, fallback);
    let mut quic_failed: Option<DialError> = None;
    let mut tls_ready: Option<Connected> = None;
    let mut tls_failed: Option<DialError> = None;
    loop {
        tokio::select! {
            r = &mut quic, if quic_failed.is_none() => match r {
                Ok(c) => {
                    tracing::info!(gateway = %url, "auto://: QUIC connected in {:?}: the session runs over QUIC", started.elapsed());
                    return Ok(c);
                }
                Err(e) if e.fatal => return Err(e),
                Err(e) => {
                    if let Some(c) = tls_ready.take() {
                        tracing::info!(gateway = %url, "auto://: QUIC failed ({}): the session runs over TLS; QUIC is tried again at the next connect, and while the session is idle", e.message);
                        return Ok(on_tls(c));
                    }
                    if let Some(t) = tls_failed.take() {
                        return Err(DialError { message: format!("{} (and over QUIC: {})", t.message, e.message), fatal: t.fatal });
                    }
                    quic_failed = Some(e);
                }
            },
            r = &mut tls_dial, if tls_ready.is_none() && tls_failed.is_none() => match r {
                Ok(c) => {
                    if let Some(e) = &quic_failed {
                        tracing::info!(gateway = %url, "auto://: QUIC failed ({}): the session runs over TLS; QUIC is tried again at the next connect, and while the session is idle", e.message);
                        return Ok(on_tls(c));
                    }
                    if fallback.is_elapsed() {
                        tracing::info!(gateway = %url, "auto://: no QUIC answer within {AUTO_FALLBACK:?} (is UDP blocked?): the session runs over TLS; QUIC is tried again at the next connect, and while the session is idle");
                        return Ok(on_tls(c));
                    }
                    tls_ready = Some(c);
                }
                Err(e) => {
                    if let Some(q) = quic_failed.take() {
                        return Err(DialError { message: format!("{} (and over QUIC: {})", e.message, q.message), fatal: e.fatal });
                    }
                    tls_failed = Some(e);
                }
            },
            () = &mut fallback, if tls_ready.is_some() => {
                tracing::info!(gateway = %url, "auto://: no QUIC answer within {AUTO_FALLBACK:?} (is UDP blocked?): the session runs over TLS; QUIC is tried again at the next connect, and while the session is idle");
                if let Some(c) = tls_ready.take() {
                    return Ok(on_tls(c));
                }
            }
        }
    }
}

/// A failed QUIC handshake in words for the user; certificate failures are fatal, as over
/// TLS, and a fingerprint mismatch reads as it does there.
fn describe_connect_error(authority: &str, e: &quinn::ConnectionError, trust: &Trust) -> DialError {
    let text = e.to_string();
    if let quinn::ConnectionError::TransportError(t) = e {
        if let Some(at) = t.reason.find("gateway certificate fingerprint") {
            let why = t.reason[at..].trim_end_matches(')').to_string();
            return DialError {
                message: format!("QUIC with {authority} failed: {why}"),
                fatal: true,
            };
        }
        if t.reason.contains("certificate") {
            let hint = match trust {
                Trust::Fingerprint(_) => "check --fingerprint",
                _ => "check --ca and --server-name",
            };
            return DialError {
                message: format!("QUIC with {authority} failed: {}: {hint}", t.reason),
                fatal: true,
            };
        }
    }
    let hint = match e {
        quinn::ConnectionError::TimedOut => {
            ": no answer over UDP (is UDP to the gateway's port blocked? try tls:// or auto://)"
        }
        _ => "",
    };
    DialError {
        message: format!("QUIC with {authority} failed: {text}{hint}"),
        fatal: false,
    }
}

/// The gateway's side: completes the QUIC handshake of an incoming connection and takes
/// its control stream. The caller bounds the time it may take.
pub async fn accept(incoming: quinn::Incoming) -> Result<Connected, super::AcceptError> {
    let peer = incoming.remote_address();
    let err = |e: String| super::AcceptError(format!("QUIC: {e}"));
    let conn = incoming
        .accept()
        .map_err(|e| err(e.to_string()))?
        .await
        .map_err(|e| err(e.to_string()))?;
    let (send, recv) = conn.accept_bi().await.map_err(|e| match &e {
        quinn::ConnectionError::ApplicationClosed(c) if c.reason.as_ref() == PROBE_REASON => {
            super::AcceptError(PROBE.into())
        }
        _ => err(e.to_string()),
    })?;
    let connection = binding(&conn).map_err(err)?;
    Ok(Connected {
        io: control_io(send, recv),
        bindings: Bindings {
            connection,
            proxied: None,
        },
        peer,
        quic: Some(Link {
            conn,
            endpoint: None,
        }),
        retry_quic: None,
        websocket: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The session parameters become QUIC's limits: before the key proof one stream and a
    /// small connection window; a stream window within the session's; liveness from the
    /// heartbeat; the datagram queues.
    #[test]
    fn session_limits_become_quics_own() {
        let params = SessionParams {
            heartbeat_ms: 2_000,
            heartbeat_misses: 4,
            max_stream_window: 8 << 20,
            session_window: 1 << 20,
            ..SessionParams::default()
        };
        let shown = format!("{:?}", transport_config(&params));
        for want in [
            "max_concurrent_bidi_streams: 1,".to_string(),
            "max_concurrent_uni_streams: 0,".to_string(),
            // The stream window is capped at the session's.
            format!("stream_receive_window: {},", 1 << 20),
            format!("receive_window: {PREAUTH_WINDOW},"),
            format!("send_window: {},", 1 << 20),
            "keep_alive_interval: Some(2s)".to_string(),
            // interval x misses, in milliseconds
            "max_idle_timeout: Some(8000)".to_string(),
            format!("datagram_receive_buffer_size: Some({DATAGRAM_QUEUE})"),
            format!("datagram_send_buffer_size: {DATAGRAM_QUEUE}"),
        ] {
            assert!(shown.contains(&want), "{want} in {shown}");
        }
    }
}
