//! The TCP layer: the connection every transport starts from, straight to the gateway or
//! through a proxy ([`super::proxy`]).

use std::net::SocketAddr;

use tokio::io::BufReader;
use tokio::net::TcpStream;

use super::proxy::{self, ProxyUrl};
use super::url::GatewayUrl;
use super::{BoxIo, DialError};

/// Read buffer under the session. rustls asks the socket for at most 4 KiB per read, so a
/// 16 KiB record would cost several system calls; through this buffer one call fetches many
/// records. On plain TCP it lets the session read a frame header and its payload separately
/// without a system call for each.
const READ_BUFFER: usize = 256 * 1024;

/// A TCP connection with its read buffer.
pub(super) type Buffered = BufReader<TcpStream>;

/// The tunnel connection with its read buffer.
pub(super) fn buffered(tcp: TcpStream) -> Buffered {
    BufReader::with_capacity(READ_BUFFER, tcp)
}

/// Sets the socket options every tunnel and relayed connection wants.
pub fn tune(tcp: &TcpStream) {
    // Frames are batched by the writer; Nagle would only add latency on top.
    let _ = tcp.set_nodelay(true);
}

/// Connects to the gateway named by `url`, through `proxy` if one is given; returns the
/// buffered connection and its peer (the proxy, if there is one).
pub(super) async fn connect(
    url: &GatewayUrl,
    proxy: Option<&ProxyUrl>,
) -> Result<(BoxIo, SocketAddr), DialError> {
    if let Some(proxy) = proxy {
        return proxy::connect(proxy, url).await;
    }
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
