//! SOCKS5 (RFC 1928, with RFC 1929 user/password authentication), through `tokio-socks`.
//!
//! The handshake runs over the buffered connection to the proxy, and the stream handed on is
//! that same buffered connection: tokio-socks reads exactly the reply's length, and anything
//! past it stays in the buffer for the layer above.

use std::net::SocketAddr;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio_socks::tcp::Socks5Stream;
use tokio_socks::{Error as SocksError, TargetAddr};

use super::{ProxyKind, ProxyUrl};
use crate::transport::url::GatewayUrl;
use crate::transport::{BoxIo, DialError, Io};

/// What the proxy is asked to connect to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dest {
    /// An address the agent resolved (`socks5://`).
    Addr(SocketAddr),
    /// A name for the proxy to resolve (`socks5h://`), and the port.
    Name(String, u16),
}

/// Runs the SOCKS5 handshake over `io` (a connection to `proxy`) for a connection to `dest`,
/// one of `target`'s addresses or its name; returns the stream to the gateway.
pub async fn connect<S: Io>(
    io: S,
    proxy: &ProxyUrl,
    target: &GatewayUrl,
    dest: Dest,
) -> Result<BoxIo, DialError> {
    let stream = handshake(io, proxy, &dest)
        .await
        .map_err(|e| describe(e, proxy, target, &dest))?;
    Ok(Box::new(stream.into_inner()))
}

async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(
    io: S,
    proxy: &ProxyUrl,
    dest: &Dest,
) -> Result<Socks5Stream<S>, SocksError> {
    let dest = match dest {
        Dest::Addr(a) => TargetAddr::Ip(*a),
        Dest::Name(host, port) => TargetAddr::Domain(host.as_str().into(), *port),
    };
    match &proxy.credentials {
        Some(c) => {
            Socks5Stream::connect_with_password_and_socket(io, dest, &c.user, c.password()).await
        }
        None => Socks5Stream::connect_with_socket(io, dest).await,
    }
}

/// The user's words for a failed handshake: the proxy, the reply, and what to check.
fn describe(e: SocksError, proxy: &ProxyUrl, target: &GatewayUrl, dest: &Dest) -> DialError {
    use SocksError::*;
    let check = proxy.origin.what_to_check();
    let to = match dest {
        Dest::Addr(a) if a.to_string() != target.authority() => {
            format!("the gateway {} ({a})", target.authority())
        }
        _ => format!("the gateway {}", target.authority()),
    };
    let refused = |code: u8, what: &str| -> String {
        format!("SOCKS5 proxy {proxy} could not connect to {to}: reply {code}, {what}")
    };
    let (message, fatal) = match e {
        Io(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => (
            format!(
                "SOCKS5 proxy {proxy} closed the connection during the handshake: is it a \
                 SOCKS5 proxy, and does it allow this client? (check {check})"
            ),
            false,
        ),
        Io(io) => (
            format!("SOCKS5 proxy {proxy}: the handshake failed: {io}"),
            false,
        ),
        InvalidResponseVersion => (
            format!(
                "{proxy} does not answer like a SOCKS5 proxy: if it is an HTTP proxy, use \
                 http://; SOCKS4 is not supported (check {check})"
            ),
            true,
        ),
        NoAcceptableAuthMethods if proxy.credentials.is_some() => (
            format!(
                "SOCKS5 proxy {proxy} accepts neither no authentication nor a user name and \
                 password (it may want GSSAPI, which the agent does not speak)"
            ),
            true,
        ),
        NoAcceptableAuthMethods | AuthorizationRequired => (
            format!(
                "SOCKS5 proxy {proxy} wants a user name and password: give them as \
                 {}://USER:PASS@{} in {check}",
                proxy.kind.scheme(),
                proxy.authority()
            ),
            true,
        ),
        PasswordAuthFailure(code) => (
            format!(
                "SOCKS5 proxy {proxy} refused the user name and password (status {code}): \
                 check them in {check}"
            ),
            true,
        ),
        ConnectionNotAllowedByRuleset => (
            format!(
                "SOCKS5 proxy {proxy} does not allow a connection to {to}: reply 2, not \
                 allowed by its rules; ask the proxy's administrator to allow it"
            ),
            true,
        ),
        GeneralSocksServerFailure => (refused(1, "general failure"), false),
        NetworkUnreachable => (
            refused(3, "network unreachable; check the gateway's address"),
            false,
        ),
        HostUnreachable => (
            refused(
                4,
                &format!(
                    "host unreachable; check the gateway's address{}",
                    if proxy.kind == ProxyKind::Socks5h {
                        " and that the proxy can resolve its name"
                    } else {
                        ""
                    }
                ),
            ),
            false,
        ),
        ConnectionRefused => (
            refused(
                5,
                "connection refused; check that the gateway runs and listens on that port",
            ),
            false,
        ),
        TtlExpired => (refused(6, "TTL expired"), false),
        CommandNotSupported => (
            format!("SOCKS5 proxy {proxy} does not support CONNECT (reply 7)"),
            true,
        ),
        AddressTypeNotSupported => (
            format!(
                "SOCKS5 proxy {proxy} does not take this kind of address (reply 8){}",
                if proxy.kind == ProxyKind::Socks5h {
                    ": it may not resolve names; use socks5:// so the agent resolves the gateway"
                } else {
                    ""
                }
            ),
            true,
        ),
        InvalidTargetAddress(why) => (
            format!("the gateway address cannot be sent to SOCKS5 proxy {proxy}: {why}"),
            true,
        ),
        InvalidAuthValues(why) => (
            format!("the credentials for SOCKS5 proxy {proxy} cannot be sent: {why}"),
            true,
        ),
        other => (
            format!("SOCKS5 proxy {proxy} broke the protocol: {other}"),
            true,
        ),
    };
    DialError { message, fatal }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A scripted SOCKS5 server on the other end of a pipe: reads the method selection,
    /// answers `method`; if that is user/password, reads the request and answers `auth`;
    /// then reads the connect request and answers `reply`, followed by `extra` bytes.
    async fn scripted(
        mut io: tokio::io::DuplexStream,
        method: u8,
        auth: u8,
        reply: u8,
        extra: &'static [u8],
    ) -> Vec<u8> {
        let mut head = [0u8; 2];
        io.read_exact(&mut head).await.unwrap();
        let mut methods = vec![0u8; head[1] as usize];
        io.read_exact(&mut methods).await.unwrap();
        io.write_all(&[5, method]).await.unwrap();
        if method == 0xff {
            return methods;
        }
        if method == 2 {
            let mut v = [0u8; 2];
            io.read_exact(&mut v).await.unwrap();
            let mut user = vec![0u8; v[1] as usize];
            io.read_exact(&mut user).await.unwrap();
            let mut n = [0u8; 1];
            io.read_exact(&mut n).await.unwrap();
            let mut pass = vec![0u8; n[0] as usize];
            io.read_exact(&mut pass).await.unwrap();
            io.write_all(&[1, auth]).await.unwrap();
            if auth != 0 {
                return [user, b":".to_vec(), pass].concat();
            }
        }
        let mut req = [0u8; 4];
        io.read_exact(&mut req).await.unwrap();
        let mut rest = match req[3] {
            1 => vec![0u8; 6],
            4 => vec![0u8; 18],
            _ => {
                let mut n = [0u8; 1];
                io.read_exact(&mut n).await.unwrap();
                vec![0u8; n[0] as usize + 2]
            }
        };
        io.read_exact(&mut rest).await.unwrap();
        let mut answer = vec![5, reply, 0, 1, 127, 0, 0, 1, 0, 80];
        answer.extend_from_slice(extra);
        io.write_all(&answer).await.unwrap();
        rest
    }

    async fn run(
        proxy: &str,
        method: u8,
        auth: u8,
        reply: u8,
        extra: &'static [u8],
    ) -> (Result<BoxIo, DialError>, Vec<u8>) {
        let proxy = ProxyUrl::parse(proxy).unwrap();
        let target = GatewayUrl::parse("gw.example.com:7443").unwrap();
        let dest = match proxy.kind {
            ProxyKind::Socks5h => Dest::Name(target.host.clone(), target.port),
            _ => Dest::Addr("192.0.2.1:7443".parse().unwrap()),
        };
        let (a, b) = tokio::io::duplex(1024);
        let server = tokio::spawn(scripted(b, method, auth, reply, extra));
        let r = connect(a, &proxy, &target, dest).await;
        (r, server.await.unwrap())
    }

    #[tokio::test]
    async fn bytes_after_the_reply_reach_the_layer_above() {
        let (r, seen) = run("socks5h://127.0.0.1:1", 0, 0, 0, b"hello").await;
        let mut io = r.unwrap();
        let mut got = [0u8; 5];
        tokio::time::timeout(std::time::Duration::from_secs(5), io.read_exact(&mut got))
            .await
            .expect("the bytes sent with the reply were lost")
            .unwrap();
        assert_eq!(&got, b"hello");
        // The name went to the proxy, then the port.
        assert_eq!(&seen[..seen.len() - 2], b"gw.example.com");
        assert_eq!(&seen[seen.len() - 2..], &7443u16.to_be_bytes());
    }

    #[tokio::test]
    async fn reply_codes_name_the_hop_and_whether_to_retry() {
        let cases: [(u8, &str, bool); 6] = [
            (1, "reply 1, general failure", false),
            (2, "not allowed by its rules", true),
            (4, "reply 4, host unreachable", false),
            (5, "reply 5, connection refused", false),
            (7, "does not support CONNECT", true),
            (8, "this kind of address", true),
        ];
        for (code, text, fatal) in cases {
            let (r, _) = run("socks5://127.0.0.1:1", 0, 0, code, b"").await;
            let e = r.err().unwrap();
            assert!(
                e.message.contains("SOCKS5 proxy socks5://127.0.0.1:1"),
                "{e}"
            );
            assert!(e.message.contains(text), "{code}: {e}");
            assert_eq!(e.fatal, fatal, "{code}: {e}");
            if !fatal {
                assert!(
                    e.message.contains("gw.example.com:7443 (192.0.2.1:7443)"),
                    "{e}"
                );
            }
        }
    }

    #[tokio::test]
    async fn credentials_refused_or_missing_are_fatal() {
        let (r, seen) = run("socks5://alice:wrong@127.0.0.1:1", 2, 1, 0, b"").await;
        assert_eq!(seen, b"alice:wrong");
        let e = r.err().unwrap();
        assert!(
            e.fatal && e.message.contains("refused the user name and password"),
            "{e}"
        );
        assert!(
            !e.message.contains("wrong") && e.message.contains("--proxy"),
            "{e}"
        );

        let (r, offered) = run("socks5://127.0.0.1:1", 0xff, 0, 0, b"").await;
        assert_eq!(offered, [0]);
        let e = r.err().unwrap();
        assert!(
            e.fatal && e.message.contains("wants a user name and password"),
            "{e}"
        );
        assert!(e.message.contains("socks5://USER:PASS@127.0.0.1:1"), "{e}");
    }

    #[tokio::test]
    async fn an_http_proxy_is_told_apart() {
        let proxy = ProxyUrl::parse("socks5://127.0.0.1:1").unwrap();
        let target = GatewayUrl::parse("gw:7443").unwrap();
        let (a, mut b) = tokio::io::duplex(1024);
        tokio::spawn(async move {
            let mut buf = [0u8; 3];
            b.read_exact(&mut buf).await.unwrap();
            b.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n")
                .await
                .unwrap();
        });
        let dest = Dest::Addr("192.0.2.1:7443".parse().unwrap());
        let e = connect(a, &proxy, &target, dest).await.err().unwrap();
        assert!(e.fatal && e.message.contains("use http://"), "{e}");
    }
}
