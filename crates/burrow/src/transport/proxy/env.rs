//! The proxy from the environment, as curl reads it, for an agent started without `--proxy`.
//!
//! - The proxy: `https_proxy`, `HTTPS_PROXY`, `all_proxy`, `ALL_PROXY`, the first one set and
//!   not empty (lowercase first, as curl). The agent always asks the proxy for a tunnel and
//!   never sends it a plain HTTP request, so the HTTPS rules apply to every gateway URL,
//!   `ws://` and `tcp://` too; `HTTP_PROXY` is not read. A value without a scheme is an HTTP
//!   proxy, one without a port means port 1080 (curl's defaults).
//! - `no_proxy`, else `NO_PROXY`: hosts to reach directly ([`NoProxy`]).
//!
//! The matcher is ours, not hyper-util's (`client::proxy::matcher`): that one would bring in
//! hyper and its client stack for some fifty lines of string matching, and it does not know
//! about ports in `NO_PROXY`. Nothing here reads the process's environment: the caller
//! passes a lookup, so tests give a map.

use std::net::IpAddr;

use super::{Origin, ProxyUrl, ProxyUrlError};
use crate::transport::url::GatewayUrl;

/// The variables that name a proxy, in the order they are read.
pub const PROXY_VARS: [&str; 4] = ["https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"];
/// The variables that list hosts to reach directly, in the order they are read.
pub const NO_PROXY_VARS: [&str; 2] = ["no_proxy", "NO_PROXY"];

/// What the environment says about the way to the gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnvRoute {
    /// No proxy variable is set.
    Unset,
    /// This proxy (its [`Origin`] names the variable).
    Proxy(ProxyUrl),
    /// A proxy is set, but `NO_PROXY` lists the gateway.
    Bypassed {
        /// The proxy variable that was set.
        var: &'static str,
        /// `no_proxy` or `NO_PROXY`.
        no_proxy_var: &'static str,
        /// The entry that matched.
        entry: String,
    },
}

/// The first variable of `vars` that is set and not empty, with its value.
fn first(
    vars: &[&'static str],
    env: &impl Fn(&str) -> Option<String>,
) -> Option<(&'static str, String)> {
    vars.iter()
        .find_map(|&v| env(v).filter(|s| !s.trim().is_empty()).map(|s| (v, s)))
}

/// Reads the proxy for `gateway` from `env` (a lookup of variables by name).
pub fn select(
    gateway: &GatewayUrl,
    env: impl Fn(&str) -> Option<String>,
) -> Result<EnvRoute, ProxyUrlError> {
    let Some((var, value)) = first(&PROXY_VARS, &env) else {
        return Ok(EnvRoute::Unset);
    };
    if let Some((no_proxy_var, list)) = first(&NO_PROXY_VARS, &env) {
        if let Some(entry) = NoProxy::parse(&list).matching(&gateway.host, gateway.port) {
            return Ok(EnvRoute::Bypassed {
                var,
                no_proxy_var,
                entry: entry.to_string(),
            });
        }
    }
    let mut proxy = ProxyUrl::parse(&value).map_err(|e| {
        ProxyUrlError(format!(
            "{var}: {e}; fix it, or run the agent with --proxy none (or another --proxy)"
        ))
    })?;
    proxy.origin = Origin::Env(var);
    Ok(EnvRoute::Proxy(proxy))
}

/// One entry of a `NO_PROXY` list.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Entry {
    /// `*`: every host.
    All,
    /// A domain: the name itself and every name under it (`example.com`, `.example.com` and
    /// `*.example.com` all match `example.com` and `www.example.com`, not `myexample.com`).
    Domain(String, Option<u16>),
    /// An address or network (`10.0.0.0/8`); matches IP hosts only, names are not resolved.
    Net(ipnet::IpNet, Option<u16>),
}

/// A parsed `NO_PROXY` list: entries separated by commas (and blanks around them). An entry
/// is `*`, a domain, an IP address or a CIDR network, each optionally with `:PORT` (IPv6 in
/// brackets then: `[::1]:7443`), which limits it to that port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoProxy {
    entries: Vec<(String, Entry)>,
}

impl NoProxy {
    /// Parses a list; entries that make no sense are skipped, as curl does.
    pub fn parse(list: &str) -> NoProxy {
        let entries = list
            .split(|c: char| c == ',' || c.is_whitespace())
            .filter(|t| !t.is_empty())
            .filter_map(|t| Some((t.to_string(), entry(t)?)))
            .collect();
        NoProxy { entries }
    }

    /// The first entry that matches `host` (a name, or an IP address without brackets) on
    /// `port`, as written in the list.
    pub fn matching(&self, host: &str, port: u16) -> Option<&str> {
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        let ip = host.parse::<IpAddr>().ok();
        let name = host.trim_end_matches('.').to_ascii_lowercase();
        self.entries
            .iter()
            .find(|(_, e)| {
                let port_ok = |p: &Option<u16>| p.is_none_or(|p| p == port);
                match (e, ip) {
                    (Entry::All, _) => true,
                    (Entry::Net(net, p), Some(ip)) => port_ok(p) && net.contains(&ip),
                    (Entry::Domain(d, p), None) => {
                        port_ok(p)
                            && (name == *d
                                || name
                                    .strip_suffix(d.as_str())
                                    .is_some_and(|head| head.ends_with('.')))
                    }
                    _ => false,
                }
            })
            .map(|(text, _)| text.as_str())
    }
}

fn entry(t: &str) -> Option<Entry> {
    if t == "*" {
        return Some(Entry::All);
    }
    // `[v6]`, `[v6]:port`, `[v6/len]`.
    if let Some(rest) = t.strip_prefix('[') {
        let (inside, after) = rest.split_once(']')?;
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':')?.parse().ok()?),
        };
        return Some(Entry::Net(net(inside)?, port));
    }
    if let Some(n) = net(t) {
        return Some(Entry::Net(n, None));
    }
    let (host, port) = match t.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => (h, Some(p.parse::<u16>().ok()?)),
        Some(_) => return None,
        None => (t, None),
    };
    if let Some(n) = net(host) {
        return Some(Entry::Net(n, port));
    }
    let d = host
        .strip_prefix("*.")
        .or_else(|| host.strip_prefix('.'))
        .unwrap_or(host)
        .trim_end_matches('.')
        .to_ascii_lowercase();
    if d.is_empty() || d.contains(['/', '*', '[', ']']) {
        return None;
    }
    Some(Entry::Domain(d, port))
}

/// An address (a one-address network) or a CIDR network.
fn net(s: &str) -> Option<ipnet::IpNet> {
    s.parse::<ipnet::IpNet>()
        .ok()
        .or_else(|| s.parse::<IpAddr>().ok().map(ipnet::IpNet::from))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn gw(s: &str) -> GatewayUrl {
        GatewayUrl::parse(s).unwrap()
    }

    fn lookup(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    fn proxy_var(route: EnvRoute) -> Option<&'static str> {
        match route {
            EnvRoute::Proxy(p) => match p.origin {
                Origin::Env(v) => Some(v),
                Origin::Setting => None,
            },
            _ => None,
        }
    }

    #[test]
    fn which_variable_wins() {
        let g = gw("gw.example.com:7443");
        let sel = |pairs: &[(&str, &str)]| select(&g, lookup(pairs)).unwrap();
        assert_eq!(sel(&[]), EnvRoute::Unset);
        // Lowercase before uppercase, HTTPS before ALL; empty means unset.
        let all = [
            ("https_proxy", "http://a:1"),
            ("HTTPS_PROXY", "http://b:1"),
            ("all_proxy", "socks5://c:1"),
            ("ALL_PROXY", "socks5://d:1"),
        ];
        for skip in 0..4 {
            let mut pairs: Vec<(&str, &str)> = all[skip..].to_vec();
            pairs.push(("http_proxy", "http://ignored:1"));
            assert_eq!(proxy_var(sel(&pairs)), Some(PROXY_VARS[skip]));
        }
        assert_eq!(
            proxy_var(sel(&[("https_proxy", " "), ("ALL_PROXY", "http://d:1")])),
            Some("ALL_PROXY")
        );
        // HTTP_PROXY is for plain HTTP requests, which the agent never makes.
        assert_eq!(sel(&[("HTTP_PROXY", "http://p:1")]), EnvRoute::Unset);
        // curl's defaults: no scheme is HTTP, no port is 1080.
        match sel(&[("HTTPS_PROXY", "proxy.corp")]) {
            EnvRoute::Proxy(p) => {
                assert_eq!((p.kind, p.port), (super::super::ProxyKind::Http, 1080))
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn no_proxy_skips_the_proxy() {
        let g = gw("wss://gw.example.com/burrow");
        let r = select(
            &g,
            lookup(&[
                ("HTTPS_PROXY", "http://p:1"),
                ("NO_PROXY", "localhost, .example.com"),
            ]),
        )
        .unwrap();
        assert_eq!(
            r,
            EnvRoute::Bypassed {
                var: "HTTPS_PROXY",
                no_proxy_var: "NO_PROXY",
                entry: ".example.com".into()
            }
        );
        // no_proxy first; a broken proxy URL does not matter when the gateway is exempt.
        let r = select(
            &g,
            lookup(&[
                ("https_proxy", "gopher://p:1"),
                ("no_proxy", "gw.example.com"),
                ("NO_PROXY", "other"),
            ]),
        )
        .unwrap();
        assert!(matches!(
            r,
            EnvRoute::Bypassed {
                no_proxy_var: "no_proxy",
                ..
            }
        ));
        // Not exempt: the broken URL is an error naming the variable, without the password.
        let e = select(&g, lookup(&[("HTTPS_PROXY", "gopher://u:pw@p:1")])).unwrap_err();
        assert!(e.0.starts_with("HTTPS_PROXY: "), "{e}");
        assert!(e.0.contains("--proxy none") && !e.0.contains("pw@"), "{e}");
    }

    #[test]
    fn domains_match_themselves_and_below() {
        let n = NoProxy::parse("example.com");
        assert_eq!(n.matching("example.com", 1), Some("example.com"));
        assert_eq!(n.matching("WWW.Example.COM", 1), Some("example.com"));
        assert_eq!(n.matching("www.example.com.", 1), Some("example.com"));
        assert_eq!(n.matching("myexample.com", 1), None);
        assert_eq!(n.matching("example.com.evil", 1), None);
        for with_dot in [".example.com", "*.example.com", "example.com."] {
            let n = NoProxy::parse(with_dot);
            assert!(n.matching("example.com", 1).is_some(), "{with_dot}");
            assert!(n.matching("a.b.example.com", 1).is_some(), "{with_dot}");
            assert!(n.matching("notexample.com", 1).is_none(), "{with_dot}");
        }
        // A name is never resolved to match an address entry, and the reverse.
        assert_eq!(NoProxy::parse("127.0.0.1").matching("localhost", 1), None);
        assert_eq!(NoProxy::parse("localhost").matching("127.0.0.1", 1), None);
    }

    #[test]
    fn star_lists_blanks_and_junk() {
        assert_eq!(NoProxy::parse("*").matching("anything", 1), Some("*"));
        assert_eq!(NoProxy::parse("a.org, *").matching("::1", 1), Some("*"));
        let n = NoProxy::parse(" a.org ,,b.org  c.org,");
        for h in ["a.org", "b.org", "c.org"] {
            assert_eq!(n.matching(h, 1), Some(h));
        }
        let junk = NoProxy::parse("[::1, a:b:c, x:notaport, ,/, 10.0.0.0/99");
        assert_eq!(junk.entries, vec![]);
        assert_eq!(NoProxy::parse("").matching("a", 1), None);
    }

    #[test]
    fn addresses_and_networks() {
        let n = NoProxy::parse("192.168.0.0/16, 10.1.2.3, ::1, [fd00::]/8, [2001:db8::/32]");
        assert!(n.matching("192.168.44.1", 1).is_some());
        assert!(n.matching("192.169.0.1", 1).is_none());
        assert!(n.matching("10.1.2.3", 1).is_some());
        assert!(n.matching("10.1.2.4", 1).is_none());
        assert!(n.matching("::1", 1).is_some());
        assert!(n.matching("[::1]", 1).is_some());
        assert!(n.matching("2001:db8:1::5", 1).is_some());
        assert!(n.matching("2001:db9::5", 1).is_none());
        // `[fd00::]/8` is not a form curl knows; skipped, not guessed at.
        assert!(n.matching("fd00::1", 1).is_none());
        assert!(NoProxy::parse("fd00::/8").matching("fd12::1", 1).is_some());
    }

    #[test]
    fn ports_narrow_an_entry() {
        let n = NoProxy::parse("gw.example.com:7443, 127.0.0.1:9000, [::1]:8443");
        assert!(n.matching("gw.example.com", 7443).is_some());
        assert!(n.matching("gw.example.com", 443).is_none());
        assert!(n.matching("sub.gw.example.com", 7443).is_some());
        assert!(n.matching("127.0.0.1", 9000).is_some());
        assert!(n.matching("127.0.0.1", 9001).is_none());
        assert!(n.matching("::1", 8443).is_some());
        assert!(n.matching("::1", 8444).is_none());
        let g = gw("127.0.0.1:9000");
        let r = select(
            &g,
            lookup(&[
                ("ALL_PROXY", "socks5h://p:1"),
                ("no_proxy", "127.0.0.1:9000"),
            ]),
        )
        .unwrap();
        assert!(matches!(
            r,
            EnvRoute::Bypassed {
                var: "ALL_PROXY",
                ..
            }
        ));
    }
}
