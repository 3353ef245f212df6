//! The TCP layer: the connection every transport starts from.

use std::net::SocketAddr;

use tokio::io::BufReader;
use tokio::net::TcpStream;

use super::url::GatewayUrl;
use super::{BoxIo, DialError};

/// Read buffer under the session. rustls asks the socket for at most 4 KiB per read, so a
/// 16 KiB record would cost several system calls; through this buffer one call fetches many
/// records. On plain TCP it lets the session read a frame header and its payload separately
/// without a system call for each.
const READ_BUFFER: usize = 256 * 1024;

/// The tunnel connection with its read buffer.
pub(super) fn buffered(tcp: TcpStream) -> BufReader<TcpStream> {
    BufReader::with_capacity(READ_BUFFER, tcp)
}

/// Sets the socket options every tunnel and relayed connection wants.
pub fn tune(tcp: &TcpStream) {
    // Frames are batched by the writer; Nagle would only add latency on top.
    let _ = tcp.set_nodelay(true);
}

/// Connects to the gateway named by `url`; returns the buffered connection and its peer.
pub(super) async fn connect(url: &GatewayUrl) -> Result<(BoxIo, SocketAddr), DialError> {
    let addr = url.authority();
    let tcp = TcpStream::connect(&addr).await.map_err(|e| DialError {
        message: format!("cannot reach gateway {addr}: {e}"),
        fatal: false,
    })?;
    tune(&tcp);
    let peer = tcp.peer_addr().map_err(|e| DialError {
        message: format!("gateway {addr}: {e}"),
        fatal: false,
    })?;
    Ok((Box::new(buffered(tcp)), peer))
}

/// The host part of `host:port` (without brackets for IPv6), or of a gateway URL.
pub fn host_part(addr: &str) -> &str {
    let addr = addr.split_once("://").map_or(addr, |(_, rest)| rest);
    let addr = addr.split('/').next().unwrap_or(addr);
    if let Some(rest) = addr.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    addr.rsplit_once(':').map_or(addr, |(h, _)| h)
}
