//! Reaching a gateway, as an agent or a connector: dial through the transport the URL names
//! (and the proxy, if any), TLS, the handshake under its deadline, and what went wrong said
//! so that a user can fix it. Both roles dial exactly this way, so every transport and proxy
//! works for both.

use std::sync::Arc;
use std::time::Duration;

use burrow_proto::auth::SecretKey;
use burrow_proto::message::Role;
use burrow_proto::mux::Side;
use burrow_proto::ErrorCode;
use tracing::info;

use crate::config::{Limits, Trust};
use crate::session::{self, handshake};
use crate::transport;

/// Who dials, and how: what an agent's or a connector's settings say about the gateway.
#[derive(Debug, Clone, Copy)]
pub struct Peer<'a> {
    /// [`Role::Agent`] or [`Role::Connector`].
    pub role: Role,
    /// The gateway as configured (`HOST:PORT` or a URL).
    pub gateway: &'a str,
    /// The key to prove.
    pub key: &'a SecretKey,
    /// How the gateway's certificate is checked.
    pub trust: &'a Trust,
    /// TLS server name to send, if not the gateway's host.
    pub server_name: Option<&'a str>,
    /// The limits offered to the gateway, and the handshake deadline.
    pub limits: &'a Limits,
}

impl Peer<'_> {
    fn noun(&self) -> &'static str {
        match self.role {
            Role::Agent => "agent",
            Role::Connector => "connector",
        }
    }
}

/// Why an attempt to connect failed.
#[derive(Debug)]
pub struct Failure {
    /// What went wrong and what to check.
    pub message: String,
    /// Whether retrying cannot help (a role stops when it never had a session).
    pub fatal: bool,
    /// Whether retrying can never help, even after a session (a revoked key): the role
    /// stops whenever it meets this.
    pub for_good: bool,
    /// How long the gateway asked us to wait before trying again.
    pub retry_after: Option<Duration>,
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

/// What a successful [`connect`] hands back.
pub struct Connected {
    /// The live session.
    pub started: session::Started,
    /// The name the gateway knows us by.
    pub name: String,
    /// The features the gateway offers ([`burrow_proto::message::AuthOk::features`]).
    pub features: u32,
}

/// Dial (through `proxy`, if any), TLS, handshake: a live session (over Burrow's multiplexer
/// or QUIC, whichever the URL's transport carries), or a described error.
pub async fn connect(
    peer: &Peer<'_>,
    url: &transport::GatewayUrl,
    proxy: Option<&transport::ProxyUrl>,
    tls: Option<Arc<rustls::ClientConfig>>,
) -> Result<Connected, Failure> {
    let handshake_deadline = peer.limits.handshake_timeout;
    let attempt = async {
        let mut conn = transport::dial(url, proxy, peer.trust, tls, peer.server_name).await?;
        let limits = peer.limits.stream_limits();
        let (ok, leftover) = handshake::client_bound(
            &mut conn.io,
            peer.key,
            peer.role,
            &conn.bindings,
            Some(limits),
        )
        .await
        .map_err(|e| describe_handshake(peer, e))?;
        info!(gateway = %peer.gateway, name = %ok.name, carrier = conn.carrier(), "connected to gateway");
        let started = conn.start(leftover, Side::Client, ok.params, peer.gateway.to_string());
        Ok(Connected {
            started,
            name: ok.name,
            features: ok.features,
        })
    };
    tokio::time::timeout(handshake_deadline, attempt)
        .await
        .map_err(|_| Failure {
            message: format!(
                "gateway {}{} did not finish the handshake within {handshake_deadline:?}",
                peer.gateway,
                proxy.map_or(String::new(), |p| format!(" (through proxy {p})"))
            ),
            fatal: false,
            for_good: false,
            retry_after: None,
        })?
}

/// The gateway URL to dial: `gateway` as parsed, with the older `--transport tcp` (plain
/// trust) turning a bare `HOST:PORT` into plain TCP.
pub fn gateway_url(gateway: &str, trust: &Trust) -> Result<transport::GatewayUrl, Failure> {
    let mut url = transport::GatewayUrl::parse(gateway).map_err(|e| Failure {
        message: e.to_string(),
        fatal: true,
        for_good: false,
        retry_after: None,
    })?;
    if matches!(trust, Trust::Plain) && url.scheme == transport::Scheme::Tls {
        url.scheme = transport::Scheme::Tcp;
    }
    Ok(url)
}

/// What a failed handshake means, and whether retrying can help.
pub fn describe_handshake(peer: &Peer<'_>, e: handshake::HandshakeError) -> Failure {
    use handshake::HandshakeError::*;
    let failure = |message: String, fatal: bool| Failure {
        message,
        fatal,
        for_good: false,
        retry_after: None,
    };
    let (gateway, noun) = (peer.gateway, peer.noun());
    match e {
        Rejected { code: ErrorCode::AuthFailed, message } => {
            let hint = match peer.role {
                Role::Agent => "it must be a key the gateway accepts (`burrow gateway --print-agent-line` on the gateway's host prints a working `burrow agent` line, and `burrow keygen --hash` shows a key's hash for the gateway's `[[agents]]`)",
                Role::Connector => "it must be the key of one of the gateway's `[[connectors]]` entries (`burrow keygen --hash` shows a key's hash for its `key_hash`)",
            };
            failure(
                format!(
                    "gateway {gateway} rejected the key ({message}): check --key / BURROW_KEY / `key` in the {noun} config; {hint}"
                ),
                true,
            )
        }
        // Stops a fresh agent like a rejected key (its earlier attempts failed); one that had
        // a session waits as long as the gateway asks.
        Rejected { code: ErrorCode::RateLimited, message } => Failure {
            retry_after: handshake::retry_after(&message),
            message: format!(
                "gateway {gateway} refused the session: {message}; check --key / BURROW_KEY / `key` in the {noun} config"
            ),
            fatal: true,
            for_good: false,
        },
        // The gateway's operator ended this key: no attempt will ever succeed.
        Rejected { code: ErrorCode::KeyRevoked, message } => Failure {
            message: format!("gateway {gateway} refused the key: {message}"),
            fatal: true,
            for_good: true,
            retry_after: None,
        },
        Rejected { code, message } => failure(
            format!("gateway {gateway} refused the session: {message} ({code})"),
            // A wrong version or a transport the listener does not take (Protocol) is a
            // setting to fix, not a hiccup.
            matches!(code, ErrorCode::UnsupportedVersion | ErrorCode::Protocol),
        ),
        Protocol(p) => failure(
            format!("gateway {gateway} broke the protocol: {p}; is it a burrow gateway of the same version?"),
            matches!(p.code, ErrorCode::UnsupportedVersion),
        ),
        Io(io) => failure(
            format!("connection to gateway {gateway} failed during the handshake: {io}"),
            false,
        ),
    }
}

/// Everything decided once before the first attempt: the URL, the TLS settings and the way
/// to the gateway (directly or through which proxy, and why).
pub struct Prepared {
    /// The gateway's URL.
    pub url: transport::GatewayUrl,
    /// TLS settings; `None` on a plain transport.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// The proxy to go through, if any.
    pub proxy: Option<transport::ProxyUrl>,
    /// Why this way, for the start-up log (no password).
    pub reason: String,
}

/// Reads the URL, builds the TLS settings and decides on the proxy (the environment is read
/// now, as the process was given it).
pub fn prepare(
    gateway: &str,
    trust: &Trust,
    proxy: &transport::ProxyChoice,
) -> Result<Prepared, String> {
    let tls = match trust {
        Trust::Plain => None,
        trust => Some(crate::tls::client_config(trust).map_err(|e| e.to_string())?),
    };
    let url = gateway_url(gateway, trust).map_err(|e| e.message)?;
    let route = transport::proxy::route(proxy, &url, |k| std::env::var(k).ok())
        .map_err(|e| e.to_string())?;
    Ok(Prepared {
        url,
        tls,
        proxy: route.proxy,
        reason: route.reason,
    })
}
