//! HTTP `CONNECT` (RFC 9110 §9.3.6) with Basic authentication: a tunnel through an HTTP
//! proxy.
//!
//! Our own client, not a crate's: the exchange is one request and one response head, and
//! what matters is at its edges. The bytes a proxy sends right after its `200` reply belong
//! to the tunnel, and reading the head in chunks may take some of them along: with `tcp://`
//! the gateway speaks first, so its challenge can arrive in the same segment as the proxy's
//! answer. This client keeps whatever it read past the head and puts it back in front of the
//! stream ([`Prefixed`]), so no layer above can lose it. And a refusal's status, reason
//! phrase and `Proxy-Authenticate` schemes tell the user what to fix. A general HTTP client
//! (hyper) would bring far more code for this than the exchange itself. The head is parsed
//! by `httparse` (as the WebSocket upgrade is) and bounded in size.

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{printable, ProxyUrl};
use crate::transport::url::GatewayUrl;
use crate::transport::{BoxIo, DialError, Io, Prefixed};

/// Largest response head read from a proxy; a longer one is an error.
pub const MAX_HEAD: usize = 16 * 1024;
/// Most headers parsed in a proxy's response.
const MAX_HEADERS: usize = 64;

/// The `CONNECT` request for `target`.
fn request(proxy: &ProxyUrl, target: &GatewayUrl) -> String {
    use base64::Engine as _;
    let authority = target.authority();
    let mut req = format!(
        "CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: burrow/{}\r\n",
        env!("CARGO_PKG_VERSION")
    );
    if let Some(c) = &proxy.credentials {
        let token = base64::engine::general_purpose::STANDARD.encode(format!(
            "{}:{}",
            c.user,
            c.password()
        ));
        req.push_str(&format!("Proxy-Authorization: Basic {token}\r\n"));
    }
    req.push_str("\r\n");
    req
}

/// Asks the proxy at the other end of `io` for a tunnel to `target`; returns the tunnel.
pub async fn connect<S: Io>(
    mut io: S,
    proxy: &ProxyUrl,
    target: &GatewayUrl,
) -> Result<BoxIo, DialError> {
    let failed = |e: std::io::Error| DialError {
        message: format!("HTTP proxy {proxy}: CONNECT to {}: {e}", target.authority()),
        fatal: false,
    };
    io.write_all(request(proxy, target).as_bytes())
        .await
        .map_err(failed)?;
    io.flush().await.map_err(failed)?;
    let mut buf = BytesMut::with_capacity(4096);
    loop {
        if buf.len() >= MAX_HEAD {
            return Err(DialError {
                message: format!(
                    "HTTP proxy {proxy} sent a response head longer than {} KiB to CONNECT",
                    MAX_HEAD / 1024
                ),
                fatal: true,
            });
        }
        buf.reserve(4096.min(MAX_HEAD - buf.len()));
        let n = io.read_buf(&mut buf).await.map_err(failed)?;
        if n == 0 {
            return Err(DialError {
                message: format!(
                    "HTTP proxy {proxy} closed the connection without answering CONNECT: is it \
                     an HTTP proxy, and does it allow this client? (check {})",
                    proxy.origin.what_to_check()
                ),
                fatal: false,
            });
        }
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut resp = httparse::Response::new(&mut headers);
        match resp.parse(&buf) {
            Ok(httparse::Status::Partial) => continue,
            Ok(httparse::Status::Complete(len)) => {
                let code = resp.code.unwrap_or(0);
                if (200..300).contains(&code) {
                    let rest = buf.split_off(len).freeze();
                    return Ok(if rest.is_empty() {
                        Box::new(io)
                    } else {
                        Box::new(Prefixed::new(rest, io))
                    });
                }
                let reason = printable(resp.reason.unwrap_or(""));
                let schemes: Vec<String> = resp
                    .headers
                    .iter()
                    .filter(|h| h.name.eq_ignore_ascii_case("proxy-authenticate"))
                    .map(|h| {
                        let v = String::from_utf8_lossy(h.value);
                        printable(v.split_whitespace().next().unwrap_or(""))
                    })
                    .collect();
                return Err(refusal(proxy, target, code, &reason, &schemes));
            }
            Err(_) => {
                let start = Bytes::copy_from_slice(&buf[..buf.len().min(8)]);
                return Err(DialError {
                    message: format!(
                        "{proxy} does not answer like an HTTP proxy (it sent {:?}...): if it is \
                         a SOCKS5 proxy, use socks5:// or socks5h:// in {}",
                        String::from_utf8_lossy(&start),
                        proxy.origin.what_to_check()
                    ),
                    fatal: true,
                });
            }
        }
    }
}

/// The user's words for a CONNECT that did not get a 2xx.
fn refusal(
    proxy: &ProxyUrl,
    target: &GatewayUrl,
    code: u16,
    reason: &str,
    schemes: &[String],
) -> DialError {
    let gw = target.authority();
    let check = proxy.origin.what_to_check();
    let status = format!("HTTP {code} {reason}");
    let status = status.trim_end();
    let (hint, fatal) = match code {
        // A proxy should answer 407, but some small HTTP proxies say 401 to wrong credentials.
        401 | 407 => {
            let basic =
                schemes.is_empty() || schemes.iter().any(|s| s.eq_ignore_ascii_case("basic"));
            let hint = if !basic {
                format!(
                    "it asks for {}, and the agent speaks only Basic authentication",
                    schemes.join(", ")
                )
            } else if proxy.credentials.is_some() {
                format!("it refused the user name and password: check them in {check}")
            } else {
                format!(
                    "it wants a user name and password: give them as http://USER:PASS@{} in \
                     {check}",
                    proxy.authority()
                )
            };
            (hint, true)
        }
        403 => (
            format!(
                "its policy forbids a tunnel to {gw} (many proxies allow CONNECT only to port \
                 443): ask the proxy's administrator to allow it, or give the gateway's tunnel \
                 port one the proxy allows"
            ),
            true,
        ),
        400 | 405 | 501 => (
            "it does not take CONNECT requests: is it a forwarding HTTP proxy?".to_string(),
            true,
        ),
        502..=504 => (
            format!(
                "the proxy could not reach the gateway {gw}: check that the gateway runs and \
                 that the proxy can reach it and resolve its name"
            ),
            false,
        ),
        408 | 429 => ("it is busy or timed out; retrying".to_string(), false),
        400..=499 => (format!("check {check}"), true),
        _ => ("retrying".to_string(), false),
    };
    DialError {
        message: format!("HTTP proxy {proxy} refused CONNECT to {gw} with {status}: {hint}"),
        fatal,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::DuplexStream;

    fn target() -> GatewayUrl {
        GatewayUrl::parse("wss://gw.example.com:8443/burrow").unwrap()
    }

    /// Runs CONNECT against a proxy that reads the request head and answers `answer` in one
    /// write, then holds the pipe open until the client is done with it.
    async fn run(proxy: &str, answer: &'static [u8]) -> Result<BoxIo, DialError> {
        let proxy = ProxyUrl::parse(proxy).unwrap();
        let (a, mut b): (DuplexStream, DuplexStream) = tokio::io::duplex(64 * 1024);
        tokio::spawn(async move {
            let mut seen = Vec::new();
            let mut byte = [0u8; 1];
            while !seen.ends_with(b"\r\n\r\n") {
                b.read_exact(&mut byte).await.unwrap();
                seen.push(byte[0]);
            }
            b.write_all(answer).await.unwrap();
            let _ = b.read_to_end(&mut seen).await;
        });
        connect(a, &proxy, &target()).await
    }

    #[test]
    fn the_request_names_the_gateway_and_carries_basic_auth() {
        let p = ProxyUrl::parse("http://alice:p%40ss@proxy:3128").unwrap();
        let req = request(&p, &target());
        assert!(
            req.starts_with("CONNECT gw.example.com:8443 HTTP/1.1\r\n"),
            "{req}"
        );
        assert!(req.contains("\r\nHost: gw.example.com:8443\r\n"), "{req}");
        // base64("alice:p@ss")
        assert!(
            req.contains("\r\nProxy-Authorization: Basic YWxpY2U6cEBzcw==\r\n"),
            "{req}"
        );
        assert!(req.ends_with("\r\n\r\n"));
        let v6 = GatewayUrl::parse("[::1]:7443").unwrap();
        let req = request(&ProxyUrl::parse("http://p:1").unwrap(), &v6);
        assert!(req.starts_with("CONNECT [::1]:7443 HTTP/1.1\r\n"), "{req}");
        assert!(!req.contains("Proxy-Authorization"));
    }

    #[tokio::test]
    async fn bytes_right_after_the_200_are_kept() {
        let r = run(
            "http://p:1",
            b"HTTP/1.1 200 Connection established\r\nVia: x\r\n\r\nGATEWAY-SPEAKS-FIRST",
        )
        .await;
        let mut io = r.unwrap();
        let mut got = [0u8; 20];
        // Nothing more comes: lost bytes would show as a timeout, not a hang.
        tokio::time::timeout(std::time::Duration::from_secs(5), io.read_exact(&mut got))
            .await
            .expect("the bytes sent with the 200 were lost")
            .unwrap();
        assert_eq!(&got, b"GATEWAY-SPEAKS-FIRST");
    }

    #[tokio::test]
    async fn refusals_name_the_status_and_what_to_do() {
        let cases: [(&str, &[u8], &str, bool); 7] = [
            (
                "http://u:wrong@p:1",
                b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm=x\r\n\r\n",
                "HTTP 407 Proxy Authentication Required: it refused the user name and password",
                true,
            ),
            (
                "http://u:wrong@p:1",
                b"HTTP/1.0 401 Unauthorized\r\n\r\n",
                "HTTP 401 Unauthorized: it refused the user name and password",
                true,
            ),
            (
                "http://p:1",
                b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n",
                "give them as http://USER:PASS@p:1",
                true,
            ),
            (
                "http://u:pw@p:1",
                b"HTTP/1.1 407 Nope\r\nProxy-Authenticate: Negotiate\r\nProxy-Authenticate: NTLM\r\n\r\n",
                "it asks for Negotiate, NTLM",
                true,
            ),
            (
                "http://p:1",
                b"HTTP/1.0 403 Access violation\r\n\r\n",
                "HTTP 403 Access violation: its policy forbids a tunnel to gw.example.com:8443",
                true,
            ),
            (
                "http://p:1",
                b"HTTP/1.1 502 Bad Gateway\r\n\r\n",
                "HTTP 502 Bad Gateway: the proxy could not reach the gateway",
                false,
            ),
            (
                "http://p:1",
                b"HTTP/1.1 503 Service Unavailable\r\n\r\n",
                "HTTP 503 Service Unavailable",
                false,
            ),
        ];
        for (proxy, answer, text, fatal) in cases {
            let r = run(proxy, answer).await;
            let e = r.err().unwrap();
            assert!(e.message.contains("HTTP proxy http://"), "{e}");
            assert!(e.message.contains(text), "{e}");
            assert_eq!(e.fatal, fatal, "{e}");
            assert!(!e.message.contains("wrong"), "{e}");
        }
    }

    #[tokio::test]
    async fn not_an_http_proxy_or_a_head_without_end() {
        let r = run("http://p:1", b"\x05\x00garbage\r\n\r\n").await;
        let e = r.err().unwrap();
        assert!(e.fatal && e.message.contains("use socks5://"), "{e}");

        static ENDLESS: [u8; MAX_HEAD + 100] = {
            let mut b = [b'a'; MAX_HEAD + 100];
            let head = b"HTTP/1.1 200 OK\r\nX: ";
            let mut i = 0;
            while i < head.len() {
                b[i] = head[i];
                i += 1;
            }
            b
        };
        let r = run("http://p:1", &ENDLESS).await;
        let e = r.err().unwrap();
        assert!(e.fatal && e.message.contains("longer than 16 KiB"), "{e}");
    }
}
