//! The admin server (`--admin ADDR`): Prometheus metrics, the status as JSON, and a status
//! page, on a plain-HTTP listener of its own, off by default.
//!
//! - `GET /metrics`: the Prometheus text format (see [`metrics`]).
//! - `GET /api/status`: [`status::Status`] as JSON.
//! - `GET /`: a page that shows the status and refreshes itself every few seconds. It holds
//!   no data of its own (it fetches `/api/status`), loads nothing from anywhere else (its CSS
//!   and script are inline, and its `Content-Security-Policy` allows no other origin), and is
//!   served without the token: with a token set, it asks for it and sends it on each fetch.
//! - `POST /api/reload`: reads the config file again and applies what can change without a
//!   restart ([`api::ReloadReport`] as JSON, or the error as text with a 4xx status).
//! - `GET /api/tokens`, `POST /api/tokens` ([`api::TokenRequest`]), `DELETE
//!   /api/tokens/NAME` (gateway): the tokens `burrow token` lists, makes and revokes.
//!
//! With `admin_token` set, everything but the page needs `Authorization: Bearer TOKEN`
//! (others get 401). Making and revoking tokens needs a token to be set at all (403
//! without): a loopback address is open to every local user, and a token is a login. An
//! address that is not loopback needs a token ([`AdminConfig::check`]): the metrics name
//! every agent, service and client count. What a client can hold is bounded: [`MAX_CONNS`]
//! connections, each with [`HEADER_TIMEOUT`] to send its request headers and
//! [`CONN_LIFETIME`] in all, and request bodies of [`MAX_BODY`] bytes.

pub mod api;
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
/// The largest request body read (`POST /api/tokens`).
pub const MAX_BODY: usize = 64 * 1024;

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
    /// `GET /api/tokens`: the tokens a gateway issued.
    fn tokens(&self) -> Result<Vec<api::TokenRow>, api::ApiError> {
        Err(not_a_gateway())
    }
    /// `POST /api/tokens`: a new token, with its key.
    fn create_token(&self, req: &api::TokenRequest) -> Result<api::CreatedToken, api::ApiError> {
        let _ = req;
        Err(not_a_gateway())
    }
    /// `DELETE /api/tokens/NAME`: revokes a token.
    fn revoke_token(&self, name: &str) -> Result<api::TokenRow, api::ApiError> {
        let _ = name;
        Err(not_a_gateway())
    }
}

fn not_a_gateway() -> api::ApiError {
    api::ApiError::new(
        404,
        "tokens are issued by a gateway: this admin server is an agent's (point --admin at the gateway's)",
    )
}

/// What `POST /api/reload` runs: reads the config file again and applies it.
pub type ReloadFn = Arc<dyn Fn() -> Result<api::ReloadReport, api::ApiError> + Send + Sync>;

/// A bound admin server, ready to [`AdminServer::run`].
pub struct AdminServer {
    listener: TcpListener,
    token: Option<AdminToken>,
    report: Arc<dyn Report>,
    reload: Option<ReloadFn>,
}

/// What every connection of one admin server shares.
struct Shared {
    token: Option<AdminToken>,
    report: Arc<dyn Report>,
    reload: Option<ReloadFn>,
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
            reload: None,
        }))
    }

    /// Serves `POST /api/reload` with `reload`.
    pub fn with_reload(mut self, reload: ReloadFn) -> AdminServer {
        self.reload = Some(reload);
        self
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
        let shared = Arc::new(Shared {
            token: self.token,
            report: self.report,
            reload: self.reload,
        });
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
                    async move { Ok::<_, Infallible>(answer(&shared, req).await) }
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

fn text(code: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    respond(code, "text/plain; charset=utf-8", body)
}

fn json(code: StatusCode, value: &impl serde::Serialize) -> Response<Full<Bytes>> {
    match serde_json::to_vec(value) {
        Ok(body) => respond(code, "application/json", body),
        Err(e) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot encode the answer: {e}\n"),
        ),
    }
}

fn failed(e: &api::ApiError) -> Response<Full<Bytes>> {
    let code = StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    text(code, format!("{}\n", e.message))
}

fn not_allowed(allow: &'static str) -> Response<Full<Bytes>> {
    let mut r = text(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("this path takes {allow}\n"),
    );
    r.headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allow));
    r
}

async fn answer(shared: &Shared, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let read_only = method == Method::GET || method == Method::HEAD;
    if path == "/" || path == "/index.html" {
        if !read_only {
            return not_allowed("GET, HEAD");
        }
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
    let token_name = path.strip_prefix("/api/tokens/").map(str::to_string);
    if !matches!(
        path.as_str(),
        "/metrics" | "/api/status" | "/api/reload" | "/api/tokens"
    ) && token_name.is_none()
    {
        return text(
            StatusCode::NOT_FOUND,
            "not found: the admin server has /, /metrics, /api/status, /api/reload and /api/tokens\n",
        );
    }
    if !authorized(&shared.token, &req) {
        warn!("admin request for {path} without the right token; refused");
        let mut r = text(
            StatusCode::UNAUTHORIZED,
            "401: this admin server needs `Authorization: Bearer TOKEN` (the gateway's or agent's admin_token)\n",
        );
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"burrow\""),
        );
        return r;
    }
    let report = &*shared.report;
    match (path.as_str(), token_name) {
        ("/metrics", _) if read_only => {
            respond(StatusCode::OK, metrics::CONTENT_TYPE, report.metrics())
        }
        ("/api/status", _) if read_only => json(StatusCode::OK, &report.status()),
        ("/metrics" | "/api/status", _) => not_allowed("GET, HEAD"),
        ("/api/reload", _) if method == Method::POST => match &shared.reload {
            None => text(
                StatusCode::CONFLICT,
                "nothing to reload: this process has no config file to read again\n",
            ),
            Some(reload) => {
                // It reads a file and may close sessions: off the runtime's threads.
                let reload = reload.clone();
                match tokio::task::spawn_blocking(move || reload()).await {
                    Ok(Ok(report)) => json(StatusCode::OK, &report),
                    Ok(Err(e)) => failed(&e),
                    Err(e) => text(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        format!("the reload failed: {e}\n"),
                    ),
                }
            }
        },
        ("/api/reload", _) => not_allowed("POST"),
        ("/api/tokens", _) if read_only => match report.tokens() {
            Ok(rows) => json(StatusCode::OK, &rows),
            Err(e) => failed(&e),
        },
        ("/api/tokens", _) if method == Method::POST => {
            if let Some(refused) = needs_token(shared) {
                return refused;
            }
            let body = match read_body(req).await {
                Ok(b) => b,
                Err(r) => return r,
            };
            let want: api::TokenRequest = match serde_json::from_slice(&body) {
                Ok(w) => w,
                Err(e) => {
                    return text(
                        StatusCode::BAD_REQUEST,
                        format!("not a token request ({{\"name\": …, \"ports\": […], \"expires_ms\": …}}): {e}\n"),
                    )
                }
            };
            match report.create_token(&want) {
                Ok(made) => json(StatusCode::CREATED, &made),
                Err(e) => failed(&e),
            }
        }
        ("/api/tokens", _) => not_allowed("GET, HEAD, POST"),
        (_, Some(name)) if method == Method::DELETE => {
            if let Some(refused) = needs_token(shared) {
                return refused;
            }
            match report.revoke_token(&name) {
                Ok(row) => json(StatusCode::OK, &row),
                Err(e) => failed(&e),
            }
        }
        _ => not_allowed("DELETE"),
    }
}

/// Refuses a request that makes or revokes a login when no admin token is set.
fn needs_token(shared: &Shared) -> Option<Response<Full<Bytes>>> {
    shared.token.is_none().then(|| {
        text(
            StatusCode::FORBIDDEN,
            "403: making and revoking tokens needs the admin server to have a token (--admin-token, BURROW_ADMIN_TOKEN, `admin_token`), since every local user can reach a loopback address\n",
        )
    })
}

/// A request's body, at most [`MAX_BODY`] bytes.
async fn read_body(req: Request<Incoming>) -> Result<Bytes, Response<Full<Bytes>>> {
    use http_body_util::BodyExt as _;
    match http_body_util::Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
    {
        Ok(b) => Ok(b.to_bytes()),
        Err(e) => Err(text(
            StatusCode::BAD_REQUEST,
            format!("cannot read the request body (at most {MAX_BODY} bytes): {e}\n"),
        )),
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
