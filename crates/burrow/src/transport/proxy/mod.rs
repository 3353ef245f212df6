//! The outbound proxy hop: the agent reaches the gateway through a SOCKS5 or HTTP proxy.
//!
//! The hop sits inside the TCP layer: the TCP connection goes to the proxy, the proxy's
//! handshake asks it for a connection to the gateway, and what comes back is a byte stream
//! to the gateway like any other. TLS, the WebSocket and the session run over it unchanged,
//! so every transport composes with every proxy; TLS's server name, the certificate check and
//! the WebSocket's `Host` stay the gateway's.
//!
//! - `socks5://[USER:PASS@]HOST:PORT`: the agent resolves the gateway's name and asks for an
//!   address, trying each address the name has; `socks5h://` hands the name to the proxy.
//!   The SOCKS5 client is `tokio-socks` ([`socks5`]).
//! - `http://[USER:PASS@]HOST:PORT`: HTTP `CONNECT`, with Basic authentication; our own
//!   small client ([`http`]; why there, in its docs).
//! - No `--proxy`: the environment, the way curl reads it ([`mod@env`]); `--proxy none` ignores
//!   it.
//!
//! Errors name the hop that failed (the proxy itself, its SOCKS5 reply, its HTTP status)
//! and what to check. Refusals that retrying cannot fix (credentials refused, a policy that
//! forbids the destination, a proxy that speaks another protocol) are `fatal`, so an agent
//! stops on its first attempt as it does for a wrong key.

pub mod env;
pub mod http;
pub mod socks5;

use std::fmt;
use std::net::SocketAddr;

use tokio::net::TcpStream;

use super::url::{join_host_port, split_host_port, GatewayUrl};
use super::{BoxIo, DialError};

/// The port a proxy URL without one means: 1080, as curl takes it for every kind of proxy.
pub const DEFAULT_PORT: u16 = 1080;

/// Which protocol the proxy speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProxyKind {
    /// SOCKS5; the agent resolves the gateway's name.
    Socks5,
    /// SOCKS5; the proxy resolves the gateway's name.
    Socks5h,
    /// HTTP `CONNECT`.
    Http,
}

impl ProxyKind {
    /// The URL scheme.
    pub fn scheme(self) -> &'static str {
        match self {
            ProxyKind::Socks5 => "socks5",
            ProxyKind::Socks5h => "socks5h",
            ProxyKind::Http => "http",
        }
    }
}

/// Where a proxy setting came from: named in errors, so the user knows what to fix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Origin {
    /// `--proxy`, `BURROW_PROXY` or `proxy` in the agent's config file.
    #[default]
    Setting,
    /// An environment variable such as `HTTPS_PROXY`.
    Env(&'static str),
}

impl Origin {
    /// What the user should look at.
    pub fn what_to_check(self) -> String {
        match self {
            Origin::Setting => "--proxy (BURROW_PROXY, `proxy` in the config file)".into(),
            Origin::Env(var) => {
                format!("{var} in the agent's environment (or run it with --proxy none)")
            }
        }
    }
}

/// A user name and password for the proxy. `Debug` masks the password.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Credentials {
    /// The user name.
    pub user: String,
    password: String,
}

impl Credentials {
    /// `user` with `password`.
    pub fn new(user: impl Into<String>, password: impl Into<String>) -> Credentials {
        Credentials {
            user: user.into(),
            password: password.into(),
        }
    }

    /// The password (never logged).
    pub fn password(&self) -> &str {
        &self.password
    }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .field("password", &"****")
            .finish()
    }
}

/// A parsed proxy URL. `Display` and `Debug` show it with the password masked
/// (`http://user:****@proxy:3128`).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct ProxyUrl {
    /// The protocol.
    pub kind: ProxyKind,
    /// Host name or IP address (IPv6 without brackets).
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// User name and password, if the URL has them.
    pub credentials: Option<Credentials>,
    /// Where the setting came from.
    pub origin: Origin,
}

/// Why a proxy URL does not parse. The text never holds the password.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ProxyUrlError(pub String);

impl ProxyUrl {
    /// Parses `socks5://`, `socks5h://` or `http://[USER[:PASS]@]HOST[:PORT][/]`; without a
    /// scheme, `http://`; without a port, [`DEFAULT_PORT`]. The user name and password may be
    /// percent-encoded (`p%40ss` for `p@ss`).
    pub fn parse(s: &str) -> Result<ProxyUrl, ProxyUrlError> {
        let s = s.trim();
        let shown = mask(s);
        let err = |why: &str| ProxyUrlError(format!("proxy `{shown}`: {why}"));
        let (kind, rest) = match s.split_once("://") {
            None => (ProxyKind::Http, s),
            Some((scheme, rest)) => {
                let kind =
                    match scheme.to_ascii_lowercase().as_str() {
                        "socks5" => ProxyKind::Socks5,
                        "socks5h" => ProxyKind::Socks5h,
                        "http" => ProxyKind::Http,
                        "https" => return Err(err(
                            "TLS to the proxy itself is not supported; use http:// (the tunnel \
                             inside is encrypted end to end anyway)",
                        )),
                        "socks" | "socks4" | "socks4a" => return Err(err(
                            "SOCKS4 is not supported; use socks5:// (the agent resolves names) \
                             or socks5h:// (the proxy does)",
                        )),
                        other => {
                            return Err(err(&format!(
                                "unknown scheme `{other}://`; use socks5://, socks5h:// or http://"
                            )))
                        }
                    };
                (kind, rest)
            }
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.contains('/') || rest.contains('?') || rest.contains('#') {
            return Err(err(
                "a proxy URL has no path; use SCHEME://[USER:PASS@]HOST:PORT",
            ));
        }
        let (userinfo, hostport) = match rest.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, rest),
        };
        let credentials = match userinfo {
            None => None,
            Some(u) => {
                let (user, password) = u.split_once(':').unwrap_or((u, ""));
                let user = percent_decode(user).ok_or_else(|| err("bad %-escape in the user"))?;
                let password =
                    percent_decode(password).ok_or_else(|| err("bad %-escape in the password"))?;
                if user.is_empty() {
                    return Err(err("the user name before `@` is empty"));
                }
                if matches!(kind, ProxyKind::Socks5 | ProxyKind::Socks5h)
                    && (user.len() > 255 || password.is_empty() || password.len() > 255)
                {
                    return Err(err(
                        "SOCKS5 needs a user name and a password of 1 to 255 bytes each",
                    ));
                }
                Some(Credentials { user, password })
            }
        };
        let (host, port) = split_host_port(hostport).map_err(|e| err(&e))?;
        Ok(ProxyUrl {
            kind,
            host,
            port: port.unwrap_or(DEFAULT_PORT),
            credentials,
            origin: Origin::Setting,
        })
    }

    /// `host:port` of the proxy (IPv6 in brackets).
    pub fn authority(&self) -> String {
        join_host_port(&self.host, self.port)
    }
}

impl fmt::Display for ProxyUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://", self.kind.scheme())?;
        if let Some(c) = &self.credentials {
            write!(f, "{}:****@", c.user)?;
        }
        f.write_str(&self.authority())
    }
}

impl fmt::Debug for ProxyUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")?;
        if let Origin::Env(var) = self.origin {
            write!(f, " (from {var})")?;
        }
        Ok(())
    }
}

/// `s` with whatever sits between `://` (or the start) and the last `@` after the first `:`
/// replaced by `****`: a URL that may not parse, fit for an error message.
pub fn mask(s: &str) -> String {
    let (scheme, rest) = match s.split_once("://") {
        Some((scheme, rest)) => (format!("{scheme}://"), rest),
        None => (String::new(), s),
    };
    match rest.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split(':').next().unwrap_or("");
            if userinfo.contains(':') {
                format!("{scheme}{user}:****@{host}")
            } else {
                format!("{scheme}{user}@{host}")
            }
        }
        None => s.to_string(),
    }
}

/// Decodes `%XX` escapes; `None` for a broken escape or bytes that are not UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The agent's proxy setting.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub enum ProxyChoice {
    /// No setting: follow `HTTPS_PROXY`, `ALL_PROXY` and `NO_PROXY` ([`mod@env`]).
    #[default]
    Environment,
    /// `none`: connect directly, whatever the environment says.
    Direct,
    /// This proxy.
    Url(ProxyUrl),
}

impl ProxyChoice {
    /// `none`, or a proxy URL ([`ProxyUrl::parse`]).
    pub fn parse(s: &str) -> Result<ProxyChoice, ProxyUrlError> {
        let s = s.trim();
        if s.eq_ignore_ascii_case("none") {
            return Ok(ProxyChoice::Direct);
        }
        if s.is_empty() {
            return Err(ProxyUrlError(
                "the proxy is empty: give socks5://, socks5h:// or http://HOST:PORT, or `none` \
                 to connect directly"
                    .into(),
            ));
        }
        ProxyUrl::parse(s).map(ProxyChoice::Url)
    }
}

/// How the agent reaches the gateway, and why: decided once at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// The proxy to go through, or `None` to connect directly.
    pub proxy: Option<ProxyUrl>,
    /// Why, for the start-up log (no password).
    pub reason: String,
}

/// Decides the route to `gateway` for `choice`, reading the environment through `env` (a
/// lookup such as `|k| std::env::var(k).ok()`) when the choice is
/// [`ProxyChoice::Environment`].
pub fn route(
    choice: &ProxyChoice,
    gateway: &GatewayUrl,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Route, ProxyUrlError> {
    match choice {
        ProxyChoice::Url(p) => Ok(Route {
            proxy: Some(p.clone()),
            reason: format!("through proxy {p} (--proxy)"),
        }),
        ProxyChoice::Direct => {
            let ignored: Vec<&str> = env::PROXY_VARS
                .iter()
                .copied()
                .filter(|v| env(v).is_some_and(|s| !s.trim().is_empty()))
                .collect();
            let reason = if ignored.is_empty() {
                "directly (--proxy none)".to_string()
            } else {
                format!("directly (--proxy none: ignoring {})", ignored.join(", "))
            };
            Ok(Route {
                proxy: None,
                reason,
            })
        }
        ProxyChoice::Environment => match env::select(gateway, env)? {
            env::EnvRoute::Unset => Ok(Route {
                proxy: None,
                reason: "directly (no --proxy, and no HTTPS_PROXY or ALL_PROXY)".into(),
            }),
            env::EnvRoute::Proxy(p) => {
                let var = match p.origin {
                    Origin::Env(v) => v,
                    Origin::Setting => "the environment",
                };
                Ok(Route {
                    reason: format!("through proxy {p} (from {var})"),
                    proxy: Some(p),
                })
            }
            env::EnvRoute::Bypassed {
                var,
                no_proxy_var,
                entry,
            } => Ok(Route {
                proxy: None,
                reason: format!(
                    "directly ({var} is set, but {no_proxy_var} entry `{entry}` matches the \
                     gateway {})",
                    gateway.host
                ),
            }),
        },
    }
}

/// Connects to `target` through `proxy`; returns the stream (buffered, as a direct
/// connection's) and the proxy's address.
pub(super) async fn connect(
    proxy: &ProxyUrl,
    target: &GatewayUrl,
) -> Result<(BoxIo, SocketAddr), DialError> {
    match proxy.kind {
        ProxyKind::Http => {
            let (io, peer) = to_proxy(proxy).await?;
            Ok((http::connect(io, proxy, target).await?, peer))
        }
        ProxyKind::Socks5h => {
            let (io, peer) = to_proxy(proxy).await?;
            let dest = socks5::Dest::Name(target.host.clone(), target.port);
            Ok((socks5::connect(io, proxy, target, dest).await?, peer))
        }
        ProxyKind::Socks5 => {
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host(target.authority())
                .await
                .map_err(|e| DialError {
                    message: format!(
                        "cannot resolve the gateway's name {}: {e} (with a socks5:// proxy the \
                         agent resolves names itself; socks5h:// lets the proxy resolve them)",
                        target.host
                    ),
                    fatal: false,
                })?
                .collect();
            let mut last = None;
            for addr in addrs {
                let (io, peer) = to_proxy(proxy).await?;
                match socks5::connect(io, proxy, target, socks5::Dest::Addr(addr)).await {
                    Ok(io) => return Ok((io, peer)),
                    Err(e) if e.fatal => return Err(e),
                    Err(e) => last = Some(e),
                }
            }
            Err(last.unwrap_or_else(|| DialError {
                message: format!("the gateway's name {} has no address", target.host),
                fatal: false,
            }))
        }
    }
}

/// The TCP connection to the proxy, tuned and buffered like a direct one.
async fn to_proxy(proxy: &ProxyUrl) -> Result<(super::tcp::Buffered, SocketAddr), DialError> {
    let addr = proxy.authority();
    let unreachable = |e: std::io::Error| DialError {
        message: format!(
            "cannot reach proxy {proxy}: {e}; check that it runs there, and {}",
            proxy.origin.what_to_check()
        ),
        fatal: false,
    };
    let tcp = TcpStream::connect(&addr).await.map_err(unreachable)?;
    super::tune(&tcp);
    let peer = tcp.peer_addr().map_err(unreachable)?;
    Ok((super::tcp::buffered(tcp), peer))
}

/// Text from the network fit for a log line: printable ASCII, at most 100 characters.
fn printable(s: &str) -> String {
    s.chars()
        .filter(|c| c.is_ascii_graphic() || *c == ' ')
        .take(100)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(s: &str) -> ProxyUrl {
        ProxyUrl::parse(s).unwrap()
    }

    #[test]
    fn schemes_credentials_and_default_port() {
        let p = url("socks5://alice:s3cr%40t@proxy.example:1081");
        assert_eq!(p.kind, ProxyKind::Socks5);
        assert_eq!((p.host.as_str(), p.port), ("proxy.example", 1081));
        let c = p.credentials.as_ref().unwrap();
        assert_eq!((c.user.as_str(), c.password()), ("alice", "s3cr@t"));
        assert_eq!(url("SOCKS5H://[::1]:9050").kind, ProxyKind::Socks5h);
        assert_eq!(url("[::1]:9050").authority(), "[::1]:9050");
        let p = url("proxy.corp:3128");
        assert_eq!((p.kind, p.port), (ProxyKind::Http, 3128));
        assert_eq!(url("http://proxy.corp/").port, DEFAULT_PORT);
        // An HTTP user may have no password; `@` in a password may be left unescaped.
        assert_eq!(url("http://bob@p:1").credentials.unwrap().password(), "");
        assert_eq!(
            url("http://bob:a@b@p:1").credentials.unwrap().password(),
            "a@b"
        );
    }

    #[test]
    fn passwords_never_show() {
        let p = url("http://alice:hunter2@proxy:3128");
        assert_eq!(p.to_string(), "http://alice:****@proxy:3128");
        assert!(!format!("{p:?}").contains("hunter2"));
        assert!(!format!("{:?}", ProxyChoice::Url(p.clone())).contains("hunter2"));
        assert!(!format!("{:?}", p.credentials).contains("hunter2"));
        for bad in [
            "ftp://alice:hunter2@proxy:1",
            "http://alice:hunter2@proxy:99999",
            "socks4://alice:hunter2@proxy:1",
            "http://alice:hunter2@proxy:1/path",
            "http://alice:hun%zzter2@proxy:1",
        ] {
            let e = ProxyUrl::parse(bad).unwrap_err().0;
            assert!(!e.contains("hunter2") && !e.contains("hun%zz"), "{e}");
            assert!(e.contains("alice:****@proxy"), "{e}");
        }
    }

    #[test]
    fn mistakes_get_a_hint() {
        let e = |s: &str| ProxyChoice::parse(s).unwrap_err().0;
        assert!(e("https://p:1").contains("http://"));
        assert!(e("socks4://p:1").contains("socks5://"));
        assert!(e("gopher://p:1").contains("unknown scheme"));
        assert!(e("socks5://u@p:1").contains("1 to 255"));
        assert!(e("").contains("none"));
        assert!(e("http://:pw@p:1").contains("user name"));
        assert_eq!(ProxyChoice::parse(" None ").unwrap(), ProxyChoice::Direct);
    }

    /// A SOCKS5 server on loopback that refuses every connect (reply 5) and reports the
    /// address type of each request.
    async fn refusing_socks5() -> (
        SocketAddr,
        tokio::sync::mpsc::UnboundedReceiver<u8>,
        tokio::task::JoinHandle<()>,
    ) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            while let Ok((mut c, _)) = l.accept().await {
                let mut hello = [0u8; 3];
                c.read_exact(&mut hello).await.unwrap();
                c.write_all(&[5, 0]).await.unwrap();
                let mut req = [0u8; 4];
                c.read_exact(&mut req).await.unwrap();
                let _ = tx.send(req[3]);
                c.write_all(&[5, 5, 0, 1, 0, 0, 0, 0, 0, 0]).await.unwrap();
            }
        });
        (addr, rx, task)
    }

    #[tokio::test]
    async fn socks5_sends_addresses_and_socks5h_the_name() {
        // `localhost` resolves here; with socks5:// the agent sends each of its addresses
        // (type 1 or 4), with socks5h:// the name (type 3).
        let target = GatewayUrl::parse("localhost:7443").unwrap();
        for (scheme, want) in [("socks5", &[1u8, 4][..]), ("socks5h", &[3u8][..])] {
            let (addr, mut types, server) = refusing_socks5().await;
            let proxy = ProxyUrl::parse(&format!("{scheme}://{addr}")).unwrap();
            let e = connect(&proxy, &target).await.err().unwrap();
            assert!(!e.fatal && e.message.contains("reply 5"), "{e}");
            server.abort();
            let mut seen = Vec::new();
            while let Ok(t) = types.try_recv() {
                seen.push(t);
            }
            assert!(
                !seen.is_empty() && seen.iter().all(|t| want.contains(t)),
                "{scheme}: {seen:?}"
            );
            if scheme == "socks5h" {
                assert_eq!(seen.len(), 1);
            }
        }
    }

    #[test]
    fn network_text_is_tamed() {
        assert_eq!(printable("Forbidden\x1b[31m\r\nX"), "Forbidden[31mX");
        assert_eq!(printable(&"a".repeat(500)).len(), 100);
    }

    #[test]
    fn the_route_says_why() {
        let gw = GatewayUrl::parse("gw.example.com:7443").unwrap();
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        let set = env(&[("HTTPS_PROXY", "http://u:pw@p:3128")]);
        let r = route(&ProxyChoice::Environment, &gw, set).unwrap();
        assert_eq!(r.proxy.unwrap().origin, Origin::Env("HTTPS_PROXY"));
        assert_eq!(
            r.reason,
            "through proxy http://u:****@p:3128 (from HTTPS_PROXY)"
        );
        let r = route(&ProxyChoice::Direct, &gw, set).unwrap();
        assert_eq!(r.proxy, None);
        assert!(r.reason.contains("ignoring HTTPS_PROXY"), "{}", r.reason);
        let fixed = ProxyChoice::parse("socks5h://q:1080").unwrap();
        let r = route(&fixed, &gw, set).unwrap();
        assert_eq!(r.proxy.unwrap().kind, ProxyKind::Socks5h);
        let r = route(&ProxyChoice::Environment, &gw, env(&[])).unwrap();
        assert_eq!(r.proxy, None);
    }
}
