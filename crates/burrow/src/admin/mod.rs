//! The admin server (`--admin ADDR`): Prometheus metrics, the status as JSON, and a status
//! page, on a plain-HTTP listener of its own, off by default.
//!
//! - `GET /metrics`: the Prometheus text format (see [`metrics`]).
//! - `GET /api/status`: [`status::Status`] as JSON.
//! - `GET /`: a page that shows the status and refreshes itself every few seconds. It holds
//!   no data of its own (it fetches `/api/status`), loads nothing from anywhere else (its CSS
//!   and script are inline, and its `Content-Security-Policy` allows no other origin), and is
//!   served without the token: with a token set, it asks for it and sends it on each fetch.
//!
//! With `admin_token` set, `/metrics` and `/api/status` need `Authorization: Bearer TOKEN`
//! (others get 401). An address that is not loopback needs a token ([`AdminConfig::check`]):
//! the metrics name every agent, service and client count. What a client can hold is
//! bounded: [`MAX_CONNS`] connections, each with [`HEADER_TIMEOUT`] to send its request
//! headers and [`CONN_LIFETIME`] in all.

pub mod metrics;
pub mod status;

use std::convert::Infallible;
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// Admin connections served at once; more wait in the listen backlog.
pub const MAX_CONNS: usize = 32;
/// How long a client may take to send a request's headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one admin connection may stay open (a page that refreshes reconnects).
pub const CONN_LIFETIME: Duration = Duration::from_secs(300);
/// The shortest token accepted: long enough that guessing it over the network is hopeless.
pub const MIN_TOKEN_LEN: usize = 16;
/// The usual admin address, as documented.
pub const USUAL_ADDR: &str = "127.0.0.1:7444";

/// The page at `/`.
const PAGE: &str = include_str!("page.html");

/// The bearer token of the admin server. `Debug` and `Display` print a mask.
#[derive(Clone, PartialEq, Eq)]
pub struct AdminToken(String);

impl AdminToken {
    /// A token of at least [`MIN_TOKEN_LEN`] visible ASCII characters.
    pub fn parse(s: &str) -> Result<AdminToken, String> {
        let s = s.trim();
        if s.len() < MIN_TOKEN_LEN {
            return Err(format!(
                "the admin token is too short ({} characters): use at least {MIN_TOKEN_LEN}, e.g. the output of `burrow keygen` or `openssl rand -hex 24`",
                s.len()
            ));
        }
        if !s.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("the admin token may hold only visible ASCII characters (no spaces): it is sent in an HTTP header".into());
        }
        Ok(AdminToken(s.to_string()))
    }

    /// The token itself.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether `offered` is this token, compared in constant time (through digests, so the
    /// lengths do not show either).
    fn matches(&self, offered: &[u8]) -> bool {
        use ring::digest::{digest, SHA256};
        let a = digest(&SHA256, self.0.as_bytes());
        let b = digest(&SHA256, offered);
        a.as_ref()
            .iter()
            .zip(b.as_ref())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
    }
}

impl fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("****")
    }
}

impl fmt::Display for AdminToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("****")
    }
}

/// `admin` and `admin_token`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AdminConfig {
    /// Where the admin server listens; off when `None`.
    pub listen: Option<SocketAddr>,
    /// The bearer token `/metrics` and `/api/status` need.
    pub token: Option<AdminToken>,
}

impl AdminConfig {
    /// Refuses an admin address that is not loopback without a token: anyone who can reach
    /// it would read every agent's name, service and traffic.
    pub fn check(&self) -> Result<(), String> {
        match (self.listen, &self.token) {
            (Some(addr), None) if !addr.ip().is_loopback() => Err(format!(
                "the admin address {addr} is not loopback, so it needs a token: set --admin-token \
                 (BURROW_ADMIN_TOKEN, `admin_token`) to a secret of at least {MIN_TOKEN_LEN} \
                 characters, or listen on loopback (e.g. --admin {USUAL_ADDR})"
            )),
            _ => Ok(()),
        }
    }
}

/// What a role reports to its admin server.
pub trait Report: Send + Sync + 'static {
    /// The status now.
    fn status(&self) -> status::Status;
    /// The metrics now, in the Prometheus text format.
    fn metrics(&self) -> String;
}

/// A bound admin server, ready to [`AdminServer::run`].
pub struct AdminServer {
    listener: TcpListener,
    token: Option<AdminToken>,
    report: Arc<dyn Report>,
}

impl AdminServer {
    /// Binds `config.listen`; `None` when the admin server is off.
    pub async fn bind(
        config: &AdminConfig,
        report: Arc<dyn Report>,
    ) -> Result<Option<AdminServer>, String> {
        let Some(addr) = config.listen else {
            return Ok(None);
        };
        config.check()?;
        let listener = TcpListener::bind(addr).await.map_err(|e| {
            format!(
                "cannot listen on {addr} (admin): {e}{}",
                if e.kind() == std::io::ErrorKind::AddrInUse {
                    " (another process uses this port: stop it or pick another --admin)"
                } else {
                    ""
                }
            )
        })?;
        Ok(Some(AdminServer {
            listener,
            token: config.token.clone(),
            report,
        }))
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }

    /// Serves until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        if let Some(addr) = self.local_addr() {
            info!(listen = %addr, token = self.token.is_some(), "admin server listening (/metrics, /api/status, /)");
        }
        let conns = Arc::new(Semaphore::new(MAX_CONNS));
        let shared = Arc::new((self.token, self.report));
        loop {
            let permit = tokio::select! {
                _ = shutdown.cancelled() => return,
                p = conns.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => return,
                },
            };
            let (tcp, peer) = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = self.listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        debug!("admin accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let shared = shared.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let service = hyper::service::service_fn(move |req| {
                    let shared = shared.clone();
                    async move { Ok::<_, Infallible>(answer(&shared.0, &*shared.1, &req)) }
                });
                let mut http = hyper::server::conn::http1::Builder::new();
                http.timer(TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    .max_buf_size(64 * 1024);
                let conn = http.serve_connection(TokioIo::new(tcp), service);
                tokio::select! {
                    _ = shutdown.cancelled() => {}
                    r = tokio::time::timeout(CONN_LIFETIME, conn) => match r {
                        Ok(Err(e)) => debug!(%peer, "admin connection: {e}"),
                        Err(_) => debug!(%peer, "admin connection open for {CONN_LIFETIME:?}; closed"),
                        Ok(Ok(())) => {}
                    },
                }
            });
        }
    }
}

fn respond(
    code: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = code;
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    r
}

/// The page's policy: nothing from any other origin, no frames, no forms; fetches only to
/// this server.
pub const PAGE_CSP: &str = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

fn authorized(token: &Option<AdminToken>, req: &Request<Incoming>) -> bool {
    let Some(token) = token else {
        return true;
    };
    req.headers()
        .get_all(header::AUTHORIZATION)
        .iter()
        .any(|v| {
            let v = v.as_bytes();
            v.len() > 7
                && v[..7].eq_ignore_ascii_case(b"bearer ")
                && token.matches(v[7..].trim_ascii())
        })
}

fn answer(
    token: &Option<AdminToken>,
    report: &dyn Report,
    req: &Request<Incoming>,
) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = respond(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain; charset=utf-8",
            "only GET here\n",
        );
        r.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    let path = req.uri().path();
    if path == "/" || path == "/index.html" {
        let mut r = respond(StatusCode::OK, "text/html; charset=utf-8", PAGE);
        let h = r.headers_mut();
        h.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(PAGE_CSP),
        );
        h.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
        h.insert("x-frame-options", HeaderValue::from_static("DENY"));
        return r;
    }
    if !matches!(path, "/metrics" | "/api/status") {
        return respond(
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "not found: the admin server has /, /metrics and /api/status\n",
        );
    }
    if !authorized(token, req) {
        warn!("admin request for {path} without the right token; refused");
        let mut r = respond(
            StatusCode::UNAUTHORIZED,
            "text/plain; charset=utf-8",
            "401: this admin server needs `Authorization: Bearer TOKEN` (the gateway's or agent's admin_token)\n",
        );
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"burrow\""),
        );
        return r;
    }
    if path == "/metrics" {
        respond(StatusCode::OK, metrics::CONTENT_TYPE, report.metrics())
    } else {
        match serde_json::to_vec(&report.status()) {
            Ok(body) => respond(StatusCode::OK, "application/json", body),
            Err(e) => respond(
                StatusCode::INTERNAL_SERVER_ERROR,
                "text/plain; charset=utf-8",
                format!("cannot encode the status: {e}\n"),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_loopback_needs_a_token() {
        let public = AdminConfig {
            listen: Some("0.0.0.0:7444".parse().unwrap_or_else(|_| unreachable!())),
            token: None,
        };
        let err = public.check().err().unwrap_or_default();
        assert!(err.contains("needs a token"), "{err}");
        let with = AdminConfig {
            token: AdminToken::parse("0123456789abcdef0123").ok(),
            ..public.clone()
        };
        assert!(with.check().is_ok());
        let local = AdminConfig {
            listen: Some("127.0.0.1:7444".parse().unwrap_or_else(|_| unreachable!())),
            token: None,
        };
        assert!(local.check().is_ok());
        assert!(AdminConfig::default().check().is_ok());
    }

    #[test]
    fn tokens_are_checked_and_masked() {
        assert!(AdminToken::parse("short").is_err());
        assert!(AdminToken::parse("with a space inside it").is_err());
        let t = AdminToken::parse("0123456789abcdef").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(format!("{t:?} {t}"), "**** ****");
        assert!(t.matches(b"0123456789abcdef"));
        assert!(!t.matches(b"0123456789abcdeX"));
        assert!(!t.matches(b""));
    }
}
