//! The PROXY protocol header an agent writes to a target before the first byte of a stream,
//! so the target learns the remote client's address (HAProxy's specification, versions 1 and
//! 2; nginx reads it with `listen … proxy_protocol`, HAProxy with `accept-proxy`).
//!
//! The header is built by the `ppp` crate (maintained, no dependencies of its own beyond
//! `thiserror`, and the parser half is what the tests read the header back with).
//!
//! What goes in it, for a stream whose origin names `client`:
//! - **source**: `client`, the address the gateway (or, for a connector stream, the connector)
//!   saw. An IPv4 address carried as IPv4-mapped IPv6 (a gateway listening on `[::]`) is
//!   written as IPv4, as the client really is.
//! - **destination**: the target's own address as this agent reached it (a TCP target's
//!   address), so the header describes the connection as if the client had dialed the
//!   target; for a unix-socket target, or a target of the other family, the unspecified
//!   address of the client's family with port 0 (v2 needs one family for both). The agent
//!   does not know the public address as an IP: the gateway grants a name, or a wildcard.
//! - **no client address** (a client on a gateway's unix-socket endpoint): v1 `PROXY
//!   UNKNOWN`, v2 the `LOCAL` command, both of which tell the target to use the connection's
//!   own addresses.
//!
//! Only the stream's origin decides the address, so every kind of stream the agent connects
//! (a public client's, a connector's) gets the same header from the same code.

use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;

use tokio::io::AsyncWriteExt as _;

use crate::relay::Local;

/// Which version of the header to write (`proxy_protocol = "v1"` or `"v2"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProxyProtocol {
    /// The text header, `PROXY TCP4 src dst sport dport\r\n`.
    V1,
    /// The binary header (12-byte signature, then the addresses).
    V2,
}

impl ProxyProtocol {
    /// `v1` or `v2`, as written in a spec or a file.
    pub fn as_str(self) -> &'static str {
        match self {
            ProxyProtocol::V1 => "v1",
            ProxyProtocol::V2 => "v2",
        }
    }
}

impl fmt::Display for ProxyProtocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ProxyProtocol {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "v1" | "1" => Ok(ProxyProtocol::V1),
            "v2" | "2" => Ok(ProxyProtocol::V2),
            _ => Err(format!(
                "{s:?} is not a PROXY protocol version (use v1, the text header, or v2, the \
                 binary one)"
            )),
        }
    }
}

/// The header for a stream from `client` to a target at `target` (`None`: a unix socket).
pub fn header(
    version: ProxyProtocol,
    client: Option<SocketAddr>,
    target: Option<SocketAddr>,
) -> Vec<u8> {
    let addresses = client.map(|c| {
        let source = canonical(c);
        (source, destination(source, target.map(canonical)))
    });
    match version {
        ProxyProtocol::V1 => {
            let a = addresses.map_or(ppp::v1::Addresses::Unknown, ppp::v1::Addresses::from);
            a.to_string().into_bytes()
        }
        ProxyProtocol::V2 => {
            let (command, a) = match addresses {
                Some(pair) => (ppp::v2::Command::Proxy, ppp::v2::Addresses::from(pair)),
                None => (ppp::v2::Command::Local, ppp::v2::Addresses::Unspecified),
            };
            // Both address families are fixed-size (at most 36 bytes), far below the u16
            // length the builder checks, so building cannot fail.
            ppp::v2::Builder::with_addresses(
                ppp::v2::Version::Two | command,
                ppp::v2::Protocol::Stream,
                a,
            )
            .build()
            .unwrap_or_default()
        }
    }
}

/// Writes the header for a stream from `client` to `local`, a target just connected.
pub async fn send(
    local: &mut Local,
    version: ProxyProtocol,
    client: Option<SocketAddr>,
) -> io::Result<()> {
    match local {
        Local::Tcp(s) => {
            let target = s.peer_addr().ok();
            s.write_all(&header(version, client, target)).await
        }
        Local::Unix(s) => s.write_all(&header(version, client, None)).await,
    }
}

/// An IPv4-mapped IPv6 address as the IPv4 address it is.
fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

/// The target's address when it is of the source's family, else the unspecified address of
/// that family (port 0): both halves of a header are of one family.
fn destination(source: SocketAddr, target: Option<SocketAddr>) -> SocketAddr {
    match target {
        Some(t) if t.is_ipv4() == source.is_ipv4() => t,
        _ => {
            let ip = match source.ip() {
                IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            };
            SocketAddr::new(ip, 0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("an address")
    }

    #[test]
    fn v1_names_client_and_target() {
        let h = header(
            ProxyProtocol::V1,
            Some(addr("198.51.100.7:50312")),
            Some(addr("127.0.0.1:80")),
        );
        assert_eq!(h, b"PROXY TCP4 198.51.100.7 127.0.0.1 50312 80\r\n");
        let h = header(
            ProxyProtocol::V1,
            Some(addr("[2001:db8::1]:4433")),
            Some(addr("[::1]:8080")),
        );
        assert_eq!(h, b"PROXY TCP6 2001:db8::1 ::1 4433 8080\r\n");
    }

    #[test]
    fn mapped_ipv4_is_written_as_ipv4_and_a_unix_target_as_unspecified() {
        let h = header(
            ProxyProtocol::V1,
            Some(addr("[::ffff:192.0.2.9]:1000")),
            None,
        );
        assert_eq!(h, b"PROXY TCP4 192.0.2.9 0.0.0.0 1000 0\r\n");
        // An IPv6 client of an IPv4 target: one family in the header.
        let h = header(
            ProxyProtocol::V1,
            Some(addr("[2001:db8::2]:7")),
            Some(addr("127.0.0.1:80")),
        );
        assert_eq!(h, b"PROXY TCP6 2001:db8::2 :: 7 0\r\n");
    }

    #[test]
    fn no_client_is_unknown_or_local() {
        assert_eq!(header(ProxyProtocol::V1, None, None), b"PROXY UNKNOWN\r\n");
        let h = header(ProxyProtocol::V2, None, Some(addr("127.0.0.1:80")));
        let parsed = ppp::v2::Header::try_from(h.as_slice()).expect("a v2 header");
        assert_eq!(parsed.command, ppp::v2::Command::Local);
        assert_eq!(parsed.addresses, ppp::v2::Addresses::Unspecified);
    }

    #[test]
    fn v2_reads_back_as_the_same_addresses() {
        for (client, target, len) in [
            ("198.51.100.7:50312", Some("127.0.0.1:80"), 16 + 12),
            ("[2001:db8::1]:4433", Some("[::1]:8080"), 16 + 36),
            ("198.51.100.7:1", None, 16 + 12),
        ] {
            let h = header(ProxyProtocol::V2, Some(addr(client)), target.map(addr));
            assert_eq!(h.len(), len);
            assert_eq!(&h[..12], b"\r\n\r\n\0\r\nQUIT\n", "the v2 signature");
            let parsed = ppp::v2::Header::try_from(h.as_slice()).expect("a v2 header");
            assert_eq!(parsed.command, ppp::v2::Command::Proxy);
            assert_eq!(parsed.protocol, ppp::v2::Protocol::Stream);
            let want = (addr(client), target.map_or_else(|| addr("0.0.0.0:0"), addr));
            assert_eq!(parsed.addresses, ppp::v2::Addresses::from(want));
        }
    }

    #[test]
    fn versions_parse_as_written() {
        assert_eq!("v1".parse(), Ok(ProxyProtocol::V1));
        assert_eq!(" V2 ".parse(), Ok(ProxyProtocol::V2));
        assert_eq!("2".parse(), Ok(ProxyProtocol::V2));
        assert!("v3".parse::<ProxyProtocol>().is_err());
    }
}
