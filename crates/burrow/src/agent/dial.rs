//! Reaching the gateway: dial through the transport the URL names, the handshake under its
//! deadline, and what went wrong said so that a user can fix it.

use std::sync::Arc;
use std::time::Duration;

use burrow_proto::message::Role;
use burrow_proto::mux::Side;
use burrow_proto::ErrorCode;
use tracing::info;

use crate::admin::metrics::Tally;
use crate::config::{AgentConfig, GatewayEndpoint, Trust};
use crate::session::{self, handshake};
use crate::transport;

/// Why an attempt to connect failed.
#[derive(Debug)]
pub(super) struct Failure {
    /// What went wrong and what to check.
    pub(super) message: String,
    /// Whether retrying cannot help (the agent stops when it never had a session).
    pub(super) fatal: bool,
    /// Whether retrying can never help, even after a session (a revoked key): the agent
    /// stops whenever it meets this.
    pub(super) for_good: bool,
    /// How long the gateway asked us to wait before trying again.
    pub(super) retry_after: Option<Duration>,
}

impl From<transport::DialError> for Failure {
    fn from(e: transport::DialError) -> Self {
        Failure {
            message: e.message,
            fatal: e.fatal,
            for_good: false,
            retry_after: None,
        }
    }
}

/// Dial (through `proxy`, if any), TLS, handshake: a live session and the features the
/// gateway offers ([`burrow_proto::message::AuthOk::features`]), or a described error.
pub(super) async fn connect(
    cfg: &AgentConfig,
    gw: &GatewayEndpoint,
    url: &transport::GatewayUrl,
    proxy: Option<&transport::ProxyUrl>,
    tls: Option<Arc<rustls::ClientConfig>>,
    tally: &Tally,
) -> Result<(session::Started, u32), Failure> {
    let handshake_deadline = cfg.limits.handshake_timeout;
    let attempt = async {
        let mut conn =
            transport::dial(url, proxy, &gw.trust, tls, gw.server_name.as_deref()).await?;
        let limits = cfg.limits.stream_limits();
        let (ok, leftover) = handshake::client_bound(
            &mut conn.io,
            &cfg.key,
            Role::Agent,
            &conn.bindings,
            Some(limits),
        )
        .await
        .map_err(|e| describe_handshake(gw, e))?;
        info!(gateway = %gw.gateway, name = %ok.name, carrier = conn.carrier(), "connected to gateway");
        tally.set_name(&gw.gateway, &ok.name);
        let started = conn.start(leftover, Side::Client, ok.params, gw.gateway.clone());
        Ok((started, ok.features))
    };
    tokio::time::timeout(handshake_deadline, attempt)
        .await
        .map_err(|_| Failure {
            message: format!(
                "gateway {}{} did not finish the handshake within {handshake_deadline:?}",
                gw.gateway,
                proxy.map_or(String::new(), |p| format!(" (through proxy {p})"))
            ),
            fatal: false,
            for_good: false,
            retry_after: None,
        })?
}

/// The gateway URL to dial: `gateway` as parsed, with the older `--transport tcp` turning a
/// bare `HOST:PORT` into plain TCP.
pub(super) fn gateway_url(gw: &GatewayEndpoint) -> Result<transport::GatewayUrl, Failure> {
    let mut url = transport::GatewayUrl::parse(&gw.gateway).map_err(|e| Failure {
        message: e.to_string(),
        fatal: true,
        for_good: false,
        retry_after: None,
    })?;
    if matches!(gw.trust, Trust::Plain) && url.scheme == transport::Scheme::Tls {
        url.scheme = transport::Scheme::Tcp;
    }
    Ok(url)
}

pub(super) fn describe_handshake(gw: &GatewayEndpoint, e: handshake::HandshakeError) -> Failure {
    use handshake::HandshakeError::*;
    let failure = |message: String, fatal: bool| Failure {
        message,
        fatal,
        for_good: false,
        retry_after: None,
    };
    match e {
        Rejected { code: ErrorCode::AuthFailed, message } => failure(
            format!(
                "gateway {} rejected the key ({message}): check --key / BURROW_KEY / `key` in the agent config; it must be a key the gateway accepts (`burrow gateway --print-agent-line` on the gateway's host prints a working `burrow agent` line, and `burrow keygen --hash` shows a key's hash for the gateway's `[[agents]]`)",
                gw.gateway
            ),
            true,
        ),
        // Stops a fresh agent like a rejected key (its earlier attempts failed); one that had
        // a session waits as long as the gateway asks.
        Rejected { code: ErrorCode::RateLimited, message } => Failure {
            retry_after: handshake::retry_after(&message),
            message: format!(
                "gateway {} refused the session: {message}; check --key / BURROW_KEY / `key` in the agent config",
                gw.gateway
            ),
            fatal: true,
            for_good: false,
        },
        // The gateway's operator ended this key: no attempt will ever succeed.
        Rejected { code: ErrorCode::KeyRevoked, message } => Failure {
            message: format!("gateway {} refused the key: {message}", gw.gateway),
            fatal: true,
            for_good: true,
            retry_after: None,
        },
        Rejected { code, message } => failure(
            format!("gateway {} refused the session: {message} ({code})", gw.gateway),
            // A wrong version or a transport the listener does not take (Protocol) is a
            // setting to fix, not a hiccup.
            matches!(code, ErrorCode::UnsupportedVersion | ErrorCode::Protocol),
        ),
        Protocol(p) => failure(
            format!("gateway {} broke the protocol: {p}; is it a burrow gateway of the same version?", gw.gateway),
            matches!(p.code, ErrorCode::UnsupportedVersion),
        ),
        Io(io) => failure(
            format!("connection to gateway {} failed during the handshake: {io}", gw.gateway),
            false,
        ),
    }
}
