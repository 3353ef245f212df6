//! The TLS layer over any connection (see [`crate::tls`] for certificates and verifiers).

use std::sync::Arc;

use super::url::GatewayUrl;
use super::{BoxIo, DialError};
use crate::config::Trust;

/// Encrypted bytes rustls may hold before a write must reach the socket. Its default of
/// 64 KiB splits each of the session writer's batches (up to 256 KiB plus frame headers) into
/// several system calls; 512 KiB takes a whole batch (and its WebSocket header) in one.
const TLS_SEND_BUFFER: usize = 512 * 1024;

/// Runs the client side of TLS over `io` to `server_name`; returns the stream and its
/// channel binding.
pub(super) async fn client(
    io: BoxIo,
    url: &GatewayUrl,
    config: Arc<rustls::ClientConfig>,
    server_name: &str,
    trust: &Trust,
) -> Result<(BoxIo, [u8; 32]), DialError> {
    let name = crate::tls::server_name(server_name).map_err(|e| DialError {
        message: format!("{e}: set --server-name"),
        fatal: true,
    })?;
    let connector = tokio_rustls::TlsConnector::from(config);
    let mut stream = connector.connect(name, io).await.map_err(|e| {
        let fatal = e.kind() == std::io::ErrorKind::InvalidData;
        DialError {
            message: format!(
                "TLS with {} failed: {}",
                url.authority(),
                crate::tls::describe_handshake_error(&e, trust)
            ),
            fatal,
        }
    })?;
    stream.get_mut().1.set_buffer_limit(Some(TLS_SEND_BUFFER));
    let binding = crate::tls::channel_binding_client(&stream).map_err(|e| DialError {
        message: format!("TLS with {}: {e}", url.authority()),
        fatal: true,
    })?;
    Ok((Box::new(stream), binding))
}

/// Runs the server side of TLS over `io`; returns the stream and its channel binding.
pub(super) async fn server(
    io: BoxIo,
    acceptor: &tokio_rustls::TlsAcceptor,
) -> std::io::Result<(BoxIo, [u8; 32])> {
    let mut stream = acceptor.accept(io).await?;
    stream.get_mut().1.set_buffer_limit(Some(TLS_SEND_BUFFER));
    let binding = crate::tls::channel_binding_server(&stream)
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    Ok((Box::new(stream), binding))
}
