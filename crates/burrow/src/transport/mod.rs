//! Tunnel connections: dialing the gateway and accepting agents.
//!
//! Transports are layers that compose, each turning a connection into another one: TCP
//! (`tcp`, straight or through an outbound [`proxy`]), then TLS (`tls`), then a WebSocket
//! ([`ws`]), chosen in one place ([`dial`]) from the parsed gateway URL ([`url`]). Every stack ends in a [`Connected`]: an ordered byte
//! stream plus the channel bindings that authentication signs. The rest of the code does not
//! know which layers carried it.
//!
//! The gateway's tunnel port takes both the Burrow preamble and WebSocket upgrades (over TLS,
//! or plain with `--transport tcp`): [`accept`] looks at the first bytes to tell them apart,
//! and puts them back in front of the stream ([`Prefixed`]).

mod prefixed;
pub mod proxy;
pub mod quic;
mod tcp;
mod tls;
pub mod url;
pub mod ws;

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::net::TcpStream;

use crate::config::Trust;
pub use prefixed::Prefixed;
pub use proxy::{ProxyChoice, ProxyUrl};
pub use tcp::{host_part, tune};
pub use url::{GatewayUrl, Scheme};

/// An ordered, reliable byte stream.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

/// A boxed connection.
pub type BoxIo = Box<dyn Io>;

/// What a key proof may be bound to on one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Bindings {
    /// The connection's own binding: the TLS exporter, or zeros without TLS.
    pub connection: [u8; 32],
    /// On a WebSocket: [`burrow_proto::auth::proxied_binding`] of its host and path. At the
    /// agent, offered in case TLS ends at a proxy in front of the gateway; at the gateway, set
    /// when it does (a `--ws-listen` listener), and then the one the proof must use.
    pub proxied: Option<[u8; 32]>,
}

/// A connection ready for the handshake.
pub struct Connected {
    /// The byte stream.
    pub io: BoxIo,
    /// What the key proof is bound to.
    pub bindings: Bindings,
    /// The remote address: of the TCP connection (at the agent, the outbound proxy's when
    /// there is one), or the client a trusted proxy names.
    pub peer: SocketAddr,
    /// The session runs inside a WebSocket (`ws://`, `wss://`, or an upgrade the gateway
    /// took), for the status's transport column.
    pub websocket: bool,
    /// Set when QUIC carries the session: `io` is then its control stream, and the session's
    /// streams and datagrams are the connection's own.
    pub quic: Option<quic::Link>,
    /// An `auto://` session that fell back to TLS: how to try QUIC again while it is idle.
    pub retry_quic: Option<quic::RetryQuic>,
}

impl Connected {
    /// Starts the session on this authenticated connection (`leftover`: bytes the handshake
    /// read past its end): Burrow's mux over the byte stream, or QUIC's own streams.
    pub fn start(
        self,
        leftover: bytes::BytesMut,
        side: burrow_proto::mux::Side,
        params: burrow_proto::message::SessionParams,
        name: String,
    ) -> crate::session::Started {
        let started = match self.quic {
            None => crate::session::start(self.io, leftover, side, params, name),
            Some(link) => crate::session::quic::start(link, self.io, leftover, side, params, name),
        };
        if let Some(retry) = self.retry_quic {
            tokio::spawn(retry.watch(started.session.clone()));
        }
        started
    }

    /// Which transport carries the connection, for logs: `"quic"` or `"tcp"`.
    pub fn carrier(&self) -> &'static str {
        match self.quic {
            Some(_) => "quic",
            None => "tcp",
        }
    }
}

/// Why dialing failed. `fatal` errors will not fix themselves by retrying (a certificate
/// that does not match); the rest are network trouble.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct DialError {
    /// What went wrong and what to check.
    pub message: String,
    /// Whether retrying cannot help.
    pub fatal: bool,
}

/// Dials the gateway at `url` and stacks the layers it names: TCP (through `proxy`, if
/// given), then TLS unless the scheme is plain, then a WebSocket for `ws://` and `wss://`.
/// TLS's server name and the WebSocket's host are the gateway's, proxy or not.
pub async fn dial(
    url: &GatewayUrl,
    proxy: Option<&ProxyUrl>,
    trust: &Trust,
    tls_config: Option<Arc<rustls::ClientConfig>>,
    server_name: Option<&str>,
) -> Result<Connected, DialError> {
    if url.scheme == Scheme::Auto {
        return Box::pin(quic::dial_auto(url, proxy, trust, tls_config, server_name)).await;
    }
    if url.scheme == Scheme::Quic {
        let Some(config) = tls_config else {
            return Err(DialError {
                message: format!("{url} needs TLS settings: give --fingerprint or --ca"),
                fatal: true,
            });
        };
        if proxy.is_some() {
            return Err(DialError {
                message: format!("{url}: QUIC runs over UDP and cannot go through --proxy; use tls:// or wss:// through a proxy"),
                fatal: true,
            });
        }
        let name = server_name.unwrap_or(&url.host);
        let params = burrow_proto::message::SessionParams::default();
        return quic::dial(url, config, name, trust, &params).await;
    }
    let (io, peer) = tcp::connect(url, proxy).await?;
    let (io, connection) = match (url.scheme.tls(), tls_config) {
        (true, Some(mut config)) => {
            if url.scheme.websocket() {
                // A WebSocket is HTTP/1.1 to whatever answers: a proxy in front refuses
                // Burrow's own ALPN (and the gateway's tunnel port takes both).
                let mut c = (*config).clone();
                c.alpn_protocols = vec![b"http/1.1".to_vec()];
                config = Arc::new(c);
            }
            let name = server_name.unwrap_or(&url.host);
            tls::client(io, url, config, name, trust).await?
        }
        (true, None) => {
            return Err(DialError {
                message: format!("{url} needs TLS settings: give --fingerprint or --ca"),
                fatal: true,
            })
        }
        (false, _) => (io, [0u8; 32]),
    };
    let (io, proxied) = if url.scheme.websocket() {
        let io = ws::client(io, url).await?;
        (
            io,
            Some(burrow_proto::auth::proxied_binding(&url.host, &url.path)),
        )
    } else {
        (io, None)
    };
    Ok(Connected {
        io,
        bindings: Bindings {
            connection,
            proxied,
        },
        peer,
        websocket: url.scheme.websocket(),
        quic: None,
        retry_quic: None,
    })
}

/// How the gateway takes tunnel connections on one listener.
#[derive(Clone)]
pub struct Acceptor {
    /// TLS, unless the listener is plain (`--transport tcp`, or `--ws-listen`).
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    /// WebSocket upgrades: on the tunnel port, taken beside the Burrow preamble; on a
    /// `--ws-listen` listener, the only thing taken.
    pub ws: ws::WsServer,
    /// Only WebSocket, behind a TLS-terminating proxy: proofs are bound to the request's host
    /// and path, since the agent's TLS ended at the proxy.
    pub ws_only: bool,
}

/// Why an accepted connection did not become a tunnel connection.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct AcceptError(pub String);

/// Takes one tunnel connection: TLS (unless plain), then, when the client's first bytes are an
/// HTTP request, the WebSocket upgrade.
pub async fn accept(
    tcp: TcpStream,
    peer: SocketAddr,
    acceptor: &Acceptor,
) -> Result<Connected, AcceptError> {
    tune(&tcp);
    let io: BoxIo = Box::new(tcp::buffered(tcp));
    let (mut io, connection) = match &acceptor.tls {
        Some(tls) => tls::server(io, tls)
            .await
            .map_err(|e| AcceptError(format!("TLS: {e}")))?,
        None => (io, [0u8; 32]),
    };
    // Both a Burrow client and a WebSocket client speak first: four bytes tell them apart.
    let mut first = [0u8; 4];
    io.read_exact(&mut first)
        .await
        .map_err(|e| AcceptError(format!("reading the first bytes: {e}")))?;
    let mut io: BoxIo = Box::new(Prefixed::new(Bytes::copy_from_slice(&first), io));
    if &first != b"GET " {
        if acceptor.ws_only {
            let why = "this gateway listener (ws_listen) takes WebSocket tunnels only: dial \
                       wss://HOST/PATH through the proxy in front of it";
            let _ = crate::session::handshake::refuse_early(
                &mut io,
                burrow_proto::ErrorCode::Protocol,
                why,
            )
            .await;
            return Err(AcceptError(format!("not a WebSocket upgrade: {why}")));
        }
        return Ok(Connected {
            io,
            bindings: Bindings {
                connection,
                proxied: None,
            },
            peer,
            websocket: false,
            quic: None,
            retry_quic: None,
        });
    }
    let up = ws::server(io, peer, &acceptor.ws)
        .await
        .map_err(|e| AcceptError(format!("WebSocket: {e}")))?;
    let proxied = acceptor
        .ws_only
        .then(|| burrow_proto::auth::proxied_binding(&up.host, &acceptor.ws.path));
    Ok(Connected {
        io: up.io,
        bindings: Bindings {
            connection,
            proxied,
        },
        peer: up.client,
        websocket: true,
        quic: None,
        retry_quic: None,
    })
}
