//! The session inside a WebSocket: for networks that let out only HTTP(S), and for gateways
//! behind nginx or a CDN.
//!
//! Framing is tokio-tungstenite's; this module adds the two ends of the HTTP upgrade and
//! [`WsIo`], which turns binary messages into the byte stream the session expects. Each write
//! of the session (a batch of up to 256 KiB of frames plus their headers) becomes one binary
//! message, so the WebSocket framing costs a few bytes per batch, not per frame. Pings are answered by
//! tungstenite; a close frame is a clean end of stream.
//!
//! The gateway reads the HTTP request head itself rather than through tungstenite's server
//! handshake: a request that is not a valid upgrade on the right path must get a prompt HTTP
//! error (404, 426, 400) and be closed, which tungstenite's handshake does not send.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Bytes, BytesMut};
use futures_util::{Sink, Stream};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::WebSocketStream;

use super::prefixed::Prefixed;
use super::url::GatewayUrl;
use super::{BoxIo, DialError};

/// Largest WebSocket message (and frame) accepted. The session writes at most one batch
/// (256 KiB of frames plus headers) per message; a peer sending more is cut off rather than
/// buffered.
pub const MAX_MESSAGE: usize = 1 << 20;
/// Largest HTTP request head the gateway reads before answering 431.
const MAX_HEAD: usize = 8 * 1024;
/// Largest message we build from one vectored write: above the session's largest batch
/// (256 KiB plus frame headers), so each batch is one message.
const WRITE_MESSAGE: usize = 512 * 1024;

fn config() -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(MAX_MESSAGE))
        .max_frame_size(Some(MAX_MESSAGE))
        .write_buffer_size(0)
        // tungstenite zero-fills its read buffer up to this on every read: a TLS record's
        // worth, not its 128 KiB default, for every small message.
        .read_buffer_size(16 * 1024)
}

/// A WebSocket as a byte stream: binary messages in order, concatenated.
pub struct WsIo<S> {
    ws: WebSocketStream<S>,
    /// What is left of the message being read.
    reading: Bytes,
    eof: bool,
}

impl<S> WsIo<S> {
    fn new(ws: WebSocketStream<S>) -> Self {
        WsIo {
            ws,
            reading: Bytes::new(),
            eof: false,
        }
    }
}

fn ws_error(e: tungstenite::Error) -> io::Error {
    match e {
        tungstenite::Error::Io(e) => e,
        tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed => {
            io::ErrorKind::BrokenPipe.into()
        }
        other => io::Error::new(io::ErrorKind::InvalidData, format!("websocket: {other}")),
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WsIo<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            if !self.reading.is_empty() {
                let n = self.reading.len().min(buf.remaining());
                let chunk = self.reading.split_to(n);
                buf.put_slice(&chunk);
                return Poll::Ready(Ok(()));
            }
            if self.eof {
                return Poll::Ready(Ok(()));
            }
            match ready!(Pin::new(&mut self.ws).poll_next(cx)) {
                None => self.eof = true,
                Some(Ok(Message::Binary(b))) => self.reading = b,
                Some(Ok(Message::Close(_))) => self.eof = true,
                // Answered (pings) or meaningless (pongs) to a byte stream.
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                Some(Ok(Message::Text(_))) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "websocket: text message where the tunnel sends only binary",
                    )))
                }
                Some(Err(tungstenite::Error::ConnectionClosed)) => self.eof = true,
                Some(Err(e)) => return Poll::Ready(Err(ws_error(e))),
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WsIo<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        ready!(Pin::new(&mut self.ws).poll_ready(cx)).map_err(ws_error)?;
        let n = buf.len().min(WRITE_MESSAGE);
        Pin::new(&mut self.ws)
            .start_send(Message::Binary(Bytes::copy_from_slice(&buf[..n])))
            .map_err(ws_error)?;
        Poll::Ready(Ok(n))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        ready!(Pin::new(&mut self.ws).poll_ready(cx)).map_err(ws_error)?;
        // The whole batch as one message: framing per batch, not per slice.
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        let mut msg = BytesMut::with_capacity(total.min(WRITE_MESSAGE));
        for b in bufs {
            let room = WRITE_MESSAGE - msg.len();
            if room == 0 {
                break;
            }
            msg.extend_from_slice(&b[..b.len().min(room)]);
        }
        let n = msg.len();
        Pin::new(&mut self.ws)
            .start_send(Message::Binary(msg.freeze()))
            .map_err(ws_error)?;
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(Pin::new(&mut self.ws).poll_flush(cx)).map_err(ws_error)?;
        // tokio-tungstenite keeps the waker of the last flush and wakes it on read readiness
        // too: a stream task that flushed a request would be woken by its own response, on
        // the other thread, for nothing (a futex per round trip, in the bench). With nothing
        // left to write, a second flush returns at once and leaves a waker that does nothing.
        let mut quiet = Context::from_waker(std::task::Waker::noop());
        let _ = Pin::new(&mut self.ws).poll_flush(&mut quiet);
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match ready!(Pin::new(&mut self.ws).poll_close(cx)) {
            Ok(()) | Err(tungstenite::Error::ConnectionClosed) => Poll::Ready(Ok(())),
            Err(e) => Poll::Ready(Err(ws_error(e))),
        }
    }
}

/// Upgrades `io` (TCP or TLS to the gateway, or to the proxy in front of it) to a WebSocket
/// on `url`'s host and path.
pub async fn client(io: BoxIo, url: &GatewayUrl) -> Result<BoxIo, DialError> {
    let scheme = if url.scheme.tls() { "wss" } else { "ws" };
    let uri = format!("{scheme}://{}{}", url.authority(), url.path);
    let (ws, _response) = tokio_tungstenite::client_async_with_config(uri, io, Some(config()))
        .await
        .map_err(|e| describe_refusal(url, e))?;
    Ok(Box::new(WsIo::new(ws)))
}

/// The agent's words for a failed upgrade: which status, and what to check.
fn describe_refusal(url: &GatewayUrl, e: tungstenite::Error) -> DialError {
    match e {
        tungstenite::Error::Http(resp) => {
            let status = resp.status();
            let hint = match status.as_u16() {
                404 => format!(
                    "nothing answers WebSocket upgrades on path `{}` there: check the path \
                     (the gateway's --ws-path, default /burrow) and the proxy's location",
                    url.path
                ),
                400 | 426 => "the upgrade did not reach the gateway intact: a proxy in between \
                              may strip the `Upgrade` and `Connection` headers (nginx needs \
                              `proxy_http_version 1.1` and `proxy_set_header Upgrade \
                              $http_upgrade; proxy_set_header Connection \"upgrade\"`)"
                    .to_string(),
                502..=504 => "the proxy in front could not reach the gateway: check that the \
                              gateway runs and the proxy points at its --ws-listen address"
                    .to_string(),
                _ => "check the gateway URL and what listens there".to_string(),
            };
            DialError {
                message: format!("WebSocket upgrade to {url} refused with HTTP {status}: {hint}"),
                // A wrong path or a proxy that strips headers will not fix itself; a gateway
                // that is down behind its proxy may come back.
                fatal: matches!(status.as_u16(), 400 | 404 | 426),
            }
        }
        other => DialError {
            message: format!("WebSocket upgrade to {url} failed: {}", ws_error(other)),
            fatal: false,
        },
    }
}

/// What the gateway's side of a WebSocket listener needs to know.
#[derive(Debug, Clone)]
pub struct WsServer {
    /// The path upgrades are accepted on.
    pub path: String,
    /// Proxies whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<ipnet::IpNet>,
}

/// An accepted upgrade.
pub struct WsAccepted {
    /// The session's byte stream.
    pub io: BoxIo,
    /// The `Host` the client asked for (what it dialed), without the port.
    pub host: String,
    /// The client's address: the TCP peer, or the last `X-Forwarded-For` entry when the peer
    /// is a trusted proxy.
    pub client: SocketAddr,
}

/// Why an HTTP request was not upgraded (it has had its HTTP answer already).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

/// Serves the HTTP upgrade on an accepted connection whose first bytes are an HTTP request:
/// answers 101 and returns the WebSocket, or answers an error status and closes.
pub async fn server(
    mut io: BoxIo,
    peer: SocketAddr,
    settings: &WsServer,
) -> Result<WsAccepted, Refused> {
    let mut head = BytesMut::with_capacity(1024);
    let end = loop {
        if let Some(i) = find_head_end(&head) {
            break i;
        }
        if head.len() >= MAX_HEAD {
            return Err(answer(&mut io, 431, "Request Header Fields Too Large", "").await);
        }
        let mut chunk = [0u8; 1024];
        match io.read(&mut chunk).await {
            Ok(0) => return Err(Refused("connection closed in the HTTP request".into())),
            Ok(n) => head.extend_from_slice(&chunk[..n]),
            Err(e) => return Err(Refused(format!("reading the HTTP request: {e}"))),
        }
    };
    let rest = head.split_off(end).freeze();
    let request = match parse(&head) {
        Ok(r) => r,
        Err(why) => return Err(answer(&mut io, 400, "Bad Request", &why).await),
    };
    let path = request.path.split('?').next().unwrap_or_default();
    if path != settings.path {
        return Err(answer(&mut io, 404, "Not Found", "no tunnel on this path").await);
    }
    let upgrade = request
        .header("upgrade")
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    let connection = request.header("connection").is_some_and(|v| {
        v.split(',')
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
    });
    if request.method != "GET" || !upgrade || !connection {
        return Err(answer(
            &mut io,
            426,
            "Upgrade Required",
            "this is a Burrow tunnel endpoint: it speaks WebSocket only",
        )
        .await);
    }
    let Some(key) = request.header("sec-websocket-key") else {
        return Err(answer(&mut io, 400, "Bad Request", "no Sec-WebSocket-Key").await);
    };
    if request.header("sec-websocket-version") != Some("13") {
        return Err(answer(
            &mut io,
            426,
            "Upgrade Required",
            "WebSocket version 13 only",
        )
        .await);
    }
    let host = request
        .header("host")
        .map(|h| {
            super::url::split_host_port(h)
                .map(|(h, _)| h)
                .unwrap_or_else(|_| h.to_string())
        })
        .unwrap_or_default();
    let client = forwarded_client(peer, request.header("x-forwarded-for"), settings);
    let accept = derive_accept_key(key.as_bytes());
    let response = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {accept}\r\n\r\n"
    );
    if let Err(e) = io.write_all(response.as_bytes()).await {
        return Err(Refused(format!("writing the upgrade response: {e}")));
    }
    if let Err(e) = io.flush().await {
        return Err(Refused(format!("writing the upgrade response: {e}")));
    }
    let io = Prefixed::new(rest, io);
    let ws = WebSocketStream::from_raw_socket(io, Role::Server, Some(config())).await;
    Ok(WsAccepted {
        io: Box::new(WsIo::new(ws)),
        host,
        client,
    })
}

/// The client's address for logs and limits: believe `X-Forwarded-For` (its last entry, the
/// one the trusted proxy added) only when the TCP peer is a trusted proxy.
fn forwarded_client(peer: SocketAddr, xff: Option<&str>, settings: &WsServer) -> SocketAddr {
    if !settings
        .trusted_proxies
        .iter()
        .any(|n| n.contains(&peer.ip()))
    {
        return peer;
    }
    xff.and_then(|v| v.rsplit(',').next())
        .and_then(|last| last.trim().parse::<IpAddr>().ok())
        .map_or(peer, |ip| SocketAddr::new(ip, 0))
}

fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

struct Request {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

fn parse(head: &[u8]) -> Result<Request, String> {
    let mut headers = [httparse::EMPTY_HEADER; 48];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Err("incomplete request".into()),
        Err(e) => return Err(format!("malformed request: {e}")),
    }
    Ok(Request {
        method: req.method.unwrap_or_default().to_string(),
        path: req.path.unwrap_or_default().to_string(),
        headers: req
            .headers
            .iter()
            .map(|h| {
                (
                    h.name.to_string(),
                    String::from_utf8_lossy(h.value).trim().to_string(),
                )
            })
            .collect(),
    })
}

/// Sends a short HTTP error and closes; returns why, for the log.
async fn answer(io: &mut BoxIo, status: u16, reason: &str, body: &str) -> Refused {
    let upgrade = if status == 426 {
        "Upgrade: websocket\r\n"
    } else {
        ""
    };
    let text = format!(
        "HTTP/1.1 {status} {reason}\r\n{upgrade}Content-Type: text/plain\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}\n",
        body.len() + 1
    );
    let _ = io.write_all(text.as_bytes()).await;
    let _ = io.shutdown().await;
    Refused(format!("HTTP {status} {reason}: {body}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(trusted: &[&str]) -> WsServer {
        WsServer {
            path: "/burrow".into(),
            trusted_proxies: trusted.iter().map(|s| s.parse().unwrap()).collect(),
        }
    }

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_proxies() {
        let peer: SocketAddr = "10.0.0.5:4000".parse().unwrap();
        let xff = Some("198.51.100.1, 203.0.113.9");
        assert_eq!(forwarded_client(peer, xff, &settings(&[])), peer);
        let got = forwarded_client(peer, xff, &settings(&["10.0.0.0/8"]));
        assert_eq!(got.ip(), "203.0.113.9".parse::<IpAddr>().unwrap());
        assert_eq!(
            forwarded_client(peer, Some("junk"), &settings(&["10.0.0.0/8"])),
            peer
        );
    }

    /// A flush must not leave its waker with tokio-tungstenite: it wakes the last writer's
    /// waker whenever the socket turns readable, so the task that sent a request would be
    /// woken again by its own response.
    #[tokio::test]
    async fn a_flush_leaves_no_waker_for_the_reply_to_wake() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::Arc;
        use std::task::{Wake, Waker};

        struct Count(AtomicUsize);
        impl Wake for Count {
            fn wake(self: Arc<Self>) {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        let (a, mut b) = tokio::io::duplex(64 * 1024);
        let ws = WebSocketStream::from_raw_socket(a, Role::Client, Some(config())).await;
        let mut io = WsIo::new(ws);
        // The session's reader: waiting on the socket.
        let mut buf = [0u8; 64];
        let mut read_buf = ReadBuf::new(&mut buf);
        let mut reader = Context::from_waker(Waker::noop());
        assert!(Pin::new(&mut io)
            .poll_read(&mut reader, &mut read_buf)
            .is_pending());
        // A stream task writes a request and flushes it.
        let writes = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(writes.clone());
        let mut writer = Context::from_waker(&waker);
        assert!(matches!(
            Pin::new(&mut io).poll_write(&mut writer, b"ping"),
            Poll::Ready(Ok(4))
        ));
        assert!(matches!(
            Pin::new(&mut io).poll_flush(&mut writer),
            Poll::Ready(Ok(()))
        ));
        // The response arrives: a binary frame from the server (unmasked).
        b.write_all(&[0x82, 4, b'p', b'o', b'n', b'g'])
            .await
            .unwrap();
        assert_eq!(
            writes.0.load(Ordering::SeqCst),
            0,
            "the writer was woken by the reply"
        );
        let mut got = [0u8; 64];
        let mut got_buf = ReadBuf::new(&mut got);
        assert!(matches!(
            Pin::new(&mut io).poll_read(&mut reader, &mut got_buf),
            Poll::Ready(Ok(()))
        ));
        assert_eq!(got_buf.filled(), b"pong");
    }

    async fn ask(request: &str) -> String {
        let (a, mut b) = tokio::io::duplex(16 * 1024);
        b.write_all(request.as_bytes()).await.unwrap();
        let peer = "127.0.0.1:1".parse().unwrap();
        let r = server(Box::new(a), peer, &settings(&[])).await;
        assert!(r.is_err());
        let mut out = String::new();
        b.read_to_string(&mut out).await.unwrap();
        out
    }

    /// A client WebSocket on one end of a pipe and our server-side [`WsIo`] on the other.
    async fn pair() -> (
        WebSocketStream<tokio::io::DuplexStream>,
        WsIo<tokio::io::DuplexStream>,
    ) {
        let (a, b) = tokio::io::duplex(4 * MAX_MESSAGE);
        let client = WebSocketStream::from_raw_socket(a, Role::Client, None).await;
        let server = WebSocketStream::from_raw_socket(b, Role::Server, Some(config())).await;
        (client, WsIo::new(server))
    }

    #[tokio::test]
    async fn bytes_pings_and_close() {
        use futures_util::{SinkExt, StreamExt};
        let (mut client, mut server) = pair().await;
        client
            .send(Message::Ping(Bytes::from_static(b"p")))
            .await
            .unwrap();
        client
            .send(Message::Binary(Bytes::from_static(b"hello ")))
            .await
            .unwrap();
        client
            .send(Message::Binary(Bytes::from_static(b"world")))
            .await
            .unwrap();
        let mut got = [0u8; 11];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello world", "messages make one byte stream");
        // The ping was answered (flushed with our next write).
        server.write_all(b"x").await.unwrap();
        server.flush().await.unwrap();
        assert_eq!(
            client.next().await.unwrap().unwrap(),
            Message::Pong(Bytes::from_static(b"p"))
        );
        assert_eq!(
            client.next().await.unwrap().unwrap(),
            Message::Binary(Bytes::from_static(b"x"))
        );
        // A close frame is the end of the stream.
        client.close(None).await.unwrap();
        let mut rest = Vec::new();
        server.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
    }

    #[tokio::test]
    async fn a_message_over_the_limit_is_an_error_not_a_buffer() {
        use futures_util::SinkExt;
        let (mut client, mut server) = pair().await;
        let big = Bytes::from(vec![0u8; MAX_MESSAGE + 1]);
        client.send(Message::Binary(big)).await.unwrap();
        let mut buf = [0u8; 16];
        let err = server.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
    }

    #[tokio::test]
    async fn a_vectored_write_is_one_message() {
        use futures_util::StreamExt;
        let (mut client, mut server) = pair().await;
        let parts = [io::IoSlice::new(b"head"), io::IoSlice::new(b"er+payload")];
        let n = server.write_vectored(&parts).await.unwrap();
        server.flush().await.unwrap();
        assert_eq!(n, 14);
        assert_eq!(
            client.next().await.unwrap().unwrap(),
            Message::Binary(Bytes::from_static(b"header+payload"))
        );
    }

    #[tokio::test]
    async fn requests_that_are_not_upgrades_get_a_prompt_status() {
        let get = ask("GET /burrow HTTP/1.1\r\nHost: gw\r\n\r\n").await;
        assert!(get.starts_with("HTTP/1.1 426 "), "{get}");
        let wrong = ask("GET / HTTP/1.1\r\nHost: gw\r\nUpgrade: websocket\r\n\r\n").await;
        assert!(wrong.starts_with("HTTP/1.1 404 "), "{wrong}");
        let junk = ask("BLAH\r\n\r\n").await;
        assert!(junk.starts_with("HTTP/1.1 400 "), "{junk}");
    }
}
