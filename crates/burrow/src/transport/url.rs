//! The `--gateway` grammar: which transport layers to stack, and where to dial.
//!
//! A bare `HOST:PORT` is TLS, as before URLs existed. Otherwise the scheme picks the layers:
//! `tls://` and `tcp://` (plain, only behind a TLS-terminating proxy), `wss://` and `ws://`
//! (the session inside a WebSocket, over TLS or plain), each with an optional path for the
//! WebSocket forms.

use std::fmt;

/// The transport layers a gateway URL asks for, above TCP (and an optional proxy hop).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scheme {
    /// TLS 1.3 (the default, and what a bare `HOST:PORT` means).
    Tls,
    /// Plain TCP.
    Tcp,
    /// WebSocket over TLS.
    Wss,
    /// WebSocket over plain TCP.
    Ws,
    /// QUIC over UDP: the session's streams are QUIC streams, its datagrams QUIC datagrams.
    Quic,
    /// QUIC and TLS tried together: QUIC when UDP gets through, else TLS (see
    /// [`crate::transport::quic::AUTO_FALLBACK`]).
    Auto,
}

impl Scheme {
    /// Whether TLS runs over the TCP connection (to the gateway, or to a proxy in front).
    pub fn tls(self) -> bool {
        matches!(self, Scheme::Tls | Scheme::Wss | Scheme::Auto)
    }

    /// Whether the session runs inside a WebSocket.
    pub fn websocket(self) -> bool {
        matches!(self, Scheme::Ws | Scheme::Wss)
    }

    /// The URL scheme's name.
    pub fn name(self) -> &'static str {
        match self {
            Scheme::Tls => "tls",
            Scheme::Tcp => "tcp",
            Scheme::Wss => "wss",
            Scheme::Ws => "ws",
            Scheme::Quic => "quic",
            Scheme::Auto => "auto",
        }
    }

    fn default_port(self) -> Option<u16> {
        match self {
            Scheme::Wss => Some(443),
            Scheme::Ws => Some(80),
            Scheme::Tls | Scheme::Tcp | Scheme::Quic | Scheme::Auto => None,
        }
    }
}

/// The default WebSocket path on the gateway (`--ws-path`).
pub const DEFAULT_WS_PATH: &str = "/burrow";

/// A parsed `--gateway` value.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct GatewayUrl {
    /// Which layers.
    pub scheme: Scheme,
    /// Host name or IP address (IPv6 without brackets).
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// The WebSocket request path (`/burrow` when none is given); unused otherwise.
    pub path: String,
}

/// Why a gateway URL does not parse; the text says what is expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct UrlError(pub String);

impl GatewayUrl {
    /// Parses `HOST:PORT`, `tls://HOST:PORT`, `tcp://HOST:PORT`, `wss://HOST[:PORT][/PATH]`
    /// or `ws://HOST[:PORT][/PATH]`. IPv6 hosts go in brackets.
    pub fn parse(s: &str) -> Result<GatewayUrl, UrlError> {
        let s = s.trim();
        let (scheme, rest) = match s.split_once("://") {
            None => (Scheme::Tls, s),
            Some((name, rest)) => {
                let scheme = match name.to_ascii_lowercase().as_str() {
                    "tls" => Scheme::Tls,
                    "tcp" => Scheme::Tcp,
                    "wss" => Scheme::Wss,
                    "ws" => Scheme::Ws,
                    "quic" => Scheme::Quic,
                    "auto" => Scheme::Auto,
                    "https" => {
                        return Err(UrlError(format!(
                            "`{s}`: for a gateway behind an HTTPS proxy or CDN use `wss://` \
                             (the session runs inside a WebSocket)"
                        )))
                    }
                    "http" => {
                        return Err(UrlError(format!(
                            "`{s}`: use `ws://` for a WebSocket gateway without TLS"
                        )))
                    }
                    other => {
                        return Err(UrlError(format!(
                            "`{s}`: unknown scheme `{other}://`; use tls://, tcp://, wss://, \
                             ws://, quic:// or auto:// (or a bare HOST:PORT, which is TLS)"
                        )))
                    }
                };
                (scheme, rest)
            }
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if !path.is_empty() && !scheme.websocket() {
            return Err(UrlError(format!(
                "`{s}`: a path only makes sense for ws:// and wss:// gateways"
            )));
        }
        if authority.contains('@') {
            return Err(UrlError(format!(
                "`{s}`: the gateway URL takes no user name or password (the key authenticates; \
                 proxy credentials go in --proxy)"
            )));
        }
        let (host, port) =
            split_host_port(authority).map_err(|e| UrlError(format!("`{s}`: {e}")))?;
        let port = match (port, scheme.default_port()) {
            (Some(p), _) => p,
            (None, Some(p)) => p,
            (None, None) => {
                return Err(UrlError(format!(
                    "`{s}`: give the gateway's port, as in {}{host}:7443",
                    if rest.len() == s.len() {
                        String::new()
                    } else {
                        format!("{}://", scheme.name())
                    }
                )))
            }
        };
        let path = if path.is_empty() {
            DEFAULT_WS_PATH.to_string()
        } else {
            path.to_string()
        };
        Ok(GatewayUrl {
            scheme,
            host,
            port,
            path,
        })
    }

    /// `host:port` for a TCP connect (IPv6 in brackets).
    pub fn authority(&self) -> String {
        join_host_port(&self.host, self.port)
    }
}

impl fmt::Display for GatewayUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}", self.scheme.name(), self.authority())?;
        if self.scheme.websocket() {
            f.write_str(&self.path)?;
        }
        Ok(())
    }
}

/// `host:port`, with brackets around an IPv6 host.
pub fn join_host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// Splits `host[:port]` (`[v6][:port]`), checking the port.
pub fn split_host_port(s: &str) -> Result<(String, Option<u16>), String> {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let Some((h, after)) = rest.split_once(']') else {
            return Err("an IPv6 address needs its closing `]`".into());
        };
        match after {
            "" => (h, None),
            p if p.starts_with(':') => (h, Some(&p[1..])),
            _ => return Err("expected `:PORT` after `]`".into()),
        }
    } else {
        match s.rsplit_once(':') {
            Some((h, _)) if h.contains(':') => {
                return Err("IPv6 addresses go in brackets, as in [::1]:7443".into())
            }
            Some((h, p)) => (h, Some(p)),
            None => (s, None),
        }
    };
    if host.is_empty() {
        return Err("the host is missing".into());
    }
    let port = match port {
        None => None,
        Some(p) => Some(
            p.parse::<u16>()
                .ok()
                .filter(|&p| p != 0)
                .ok_or_else(|| format!("`{p}` is not a port (1-65535)"))?,
        ),
    };
    Ok((host.to_string(), port))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(s: &str) -> GatewayUrl {
        GatewayUrl::parse(s).unwrap()
    }

    #[test]
    fn bare_host_port_is_tls() {
        let u = url("gw.example.com:7443");
        assert_eq!(
            (u.scheme, u.host.as_str(), u.port),
            (Scheme::Tls, "gw.example.com", 7443)
        );
        assert_eq!(u.to_string(), "tls://gw.example.com:7443");
        assert_eq!(url("[::1]:7443").authority(), "[::1]:7443");
    }

    #[test]
    fn schemes_and_websocket_paths() {
        assert_eq!(url("tcp://127.0.0.1:9").scheme, Scheme::Tcp);
        let u = url("wss://gw.example.com/tunnel/x");
        assert_eq!((u.port, u.path.as_str()), (443, "/tunnel/x"));
        let u = url("ws://gw:9000");
        assert_eq!(
            (u.scheme, u.port, u.path.as_str()),
            (Scheme::Ws, 9000, "/burrow")
        );
        assert_eq!(url("WSS://[::1]:8443/b").to_string(), "wss://[::1]:8443/b");
        assert_eq!(url("quic://gw:7443").scheme, Scheme::Quic);
        assert_eq!(url("auto://gw:7443").to_string(), "auto://gw:7443");
    }

    #[test]
    fn mistakes_get_a_hint() {
        let e = |s: &str| GatewayUrl::parse(s).unwrap_err().0;
        assert!(e("https://gw").contains("wss://"));
        assert!(e("ftp://gw:1").contains("unknown scheme"));
        assert!(e("gw.example.com").contains("port"));
        assert!(e("tls://gw:7443/x").contains("path"));
        assert!(e("::1:7443").contains("brackets"));
        assert!(e("gw:0").contains("not a port"));
        assert!(e("wss://user:pw@gw").contains("no user name"));
    }
}
