//! Tunnel connections: dialing the gateway and accepting agents, over TCP or TLS.
//!
//! Every transport ends in a [`Connected`]: an ordered byte stream plus the channel-binding
//! value that authentication signs (the TLS exporter, or zeros on plain TCP). The rest of the
//! code does not know which transport carried it, so WebSocket or proxied transports slot in
//! here later without touching the session.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite, BufReader};
use tokio::net::TcpStream;

use crate::config::Trust;
use crate::tls;

/// An ordered, reliable byte stream.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

/// A boxed connection.
pub type BoxIo = Box<dyn Io>;

/// A connection ready for the handshake.
pub struct Connected {
    /// The byte stream.
    pub io: BoxIo,
    /// Channel binding for the key proof (TLS exporter, or zeros on plain TCP).
    pub binding: [u8; 32],
    /// The remote address of the TCP connection.
    pub peer: SocketAddr,
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

/// Read buffer under the session. rustls asks the socket for at most 4 KiB per read, so a
/// 16 KiB record would cost several system calls; through this buffer one call fetches many
/// records. On plain TCP it lets the session read a frame header and its payload separately
/// without a system call for each.
const READ_BUFFER: usize = 256 * 1024;
/// Encrypted bytes rustls may hold before a write must reach the socket. Its default of
/// 64 KiB splits each of the session writer's batches (up to 256 KiB) into four system calls.
const TLS_SEND_BUFFER: usize = 256 * 1024;

/// The tunnel connection with its read buffer.
fn buffered(tcp: TcpStream) -> BufReader<TcpStream> {
    BufReader::with_capacity(READ_BUFFER, tcp)
}

/// Sets the socket options every tunnel and relayed connection wants.
pub fn tune(tcp: &TcpStream) {
    // Frames are batched by the writer; Nagle would only add latency on top.
    let _ = tcp.set_nodelay(true);
}

/// Dials the gateway at `addr` and, unless `trust` is plain, runs TLS over it.
pub async fn dial(
    addr: &str,
    trust: &Trust,
    tls_config: Option<Arc<rustls::ClientConfig>>,
    server_name: Option<&str>,
) -> Result<Connected, DialError> {
    let tcp = TcpStream::connect(addr).await.map_err(|e| DialError {
        message: format!("cannot reach gateway {addr}: {e}"),
        fatal: false,
    })?;
    tune(&tcp);
    let peer = tcp.peer_addr().map_err(|e| DialError {
        message: format!("gateway {addr}: {e}"),
        fatal: false,
    })?;
    let Some(config) = tls_config else {
        debug_assert!(matches!(trust, Trust::Plain));
        return Ok(Connected {
            io: Box::new(buffered(tcp)),
            binding: [0u8; 32],
            peer,
        });
    };
    let name = server_name
        .map(str::to_string)
        .unwrap_or_else(|| host_part(addr).to_string());
    let name = tls::server_name(&name).map_err(|e| DialError {
        message: format!("{e}: set --server-name"),
        fatal: true,
    })?;
    let connector = tokio_rustls::TlsConnector::from(config);
    let mut stream = connector.connect(name, buffered(tcp)).await.map_err(|e| {
        let fatal = e.kind() == std::io::ErrorKind::InvalidData;
        DialError {
            message: format!(
                "TLS with gateway {addr} failed: {}",
                tls::describe_handshake_error(&e, trust)
            ),
            fatal,
        }
    })?;
    stream.get_mut().1.set_buffer_limit(Some(TLS_SEND_BUFFER));
    let binding = tls::channel_binding_client(&stream).map_err(|e| DialError {
        message: format!("TLS with gateway {addr}: {e}"),
        fatal: true,
    })?;
    Ok(Connected {
        io: Box::new(stream),
        binding,
        peer,
    })
}

/// The host part of `host:port` (without brackets for IPv6).
pub fn host_part(addr: &str) -> &str {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']')
}

/// Accepts TLS (or nothing, on plain TCP) on an accepted tunnel connection.
pub async fn accept(
    tcp: TcpStream,
    peer: SocketAddr,
    acceptor: Option<&tokio_rustls::TlsAcceptor>,
) -> std::io::Result<Connected> {
    tune(&tcp);
    let Some(acceptor) = acceptor else {
        return Ok(Connected {
            io: Box::new(buffered(tcp)),
            binding: [0u8; 32],
            peer,
        });
    };
    let mut stream = acceptor.accept(buffered(tcp)).await?;
    stream.get_mut().1.set_buffer_limit(Some(TLS_SEND_BUFFER));
    let binding =
        tls::channel_binding_server(&stream).map_err(|e| std::io::Error::other(e.to_string()))?;
    Ok(Connected {
        io: Box::new(stream),
        binding,
        peer,
    })
}
