//! The settings of the connector role, and what it adds to the other two: an agent's private
//! services (`--private`, `[[forwards]] public = false`) and `allow` patterns, a gateway's
//! `[[connectors]]`, and `burrow connect` itself (its `--forward LISTEN=AGENT/SERVICE`).
//!
//! The grammar of each value is here, shared by flags and files: [`parse_private`],
//! [`TargetPattern::parse`], [`Reach::parse`], [`parse_connect_forward`].

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use burrow_proto::auth::{KeyHash, SecretKey};
use burrow_proto::connect::DialTarget;
use serde::Deserialize;
use toml::Spanned;

use super::{
    inner, missing, port_number, read_key_file, resolve_trust, split_host_port, text, valid_host,
    Checked, ConfigError, Fingerprint, FromToml, GatewayAddr, KeySpec, Limits, LogFormat, LogLevel,
    Name, RawLimits, Source, Target, TransportKind, Trust, DEFAULT_GRACE, DEFAULT_MAX_BACKOFF,
};
use crate::transport::proxy::ProxyChoice;
use crate::transport::url::{GatewayUrl, Scheme};

// ---------------------------------------------------------------------------------------------
// Names.

/// The reach entry that lets a connector name targets on an agent directly (`office/targets`),
/// and so a name no private service may have.
pub const TARGETS: &str = "targets";

/// Checks the name of an agent or a private service as connectors write it: letters,
/// digits, `.`, `_` and `-`, at most 64 of them.
pub fn check_service_name(s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if !ok {
        return Err(format!(
            "{s:?} is not a service name (letters, digits, `.`, `_` and `-`, at most 64, as in \
             vnc or ssh-office)"
        ));
    }
    if s == TARGETS {
        return Err(format!(
            "`{TARGETS}` is taken: in a connector's reach, AGENT/{TARGETS} means naming \
             targets directly; call the service something else"
        ));
    }
    Ok(())
}

/// An agent's name as a connector writes it before the `/`: any name without `/`, spaces or
/// control characters.
fn check_agent_name(s: &str) -> Result<(), String> {
    if s.is_empty() || s.contains('/') || s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "{s:?} is not an agent name (the name of its [[agents]] entry on the gateway)"
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The agent: private services and allow patterns.

/// A service the agent offers to connectors only: a name, and where its streams go. It has
/// no public port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrivateService {
    /// What connectors call it (`AGENT/NAME`).
    pub name: String,
    /// Where its streams go.
    pub target: Target,
    /// The PROXY protocol header written to the target before a stream's first byte, with
    /// the address of the connector's client (`?proxy_protocol=v1|v2` after the spec,
    /// `proxy_protocol` in `[[forwards]]`; none by default).
    pub proxy_protocol: Option<crate::proxy_protocol::ProxyProtocol>,
}

/// Parses `--private NAME=TARGET[?proxy_protocol=v1|v2]`, TARGET being `host:port`,
/// `[ipv6]:port` or `unix:/path/to.sock`.
pub fn parse_private(spec: &str) -> Result<PrivateService, String> {
    let whole = spec.trim();
    let (spec, options) = super::split_options(whole);
    let mut proxy_protocol = None;
    for option in options
        .unwrap_or("")
        .split('&')
        .map(str::trim)
        .filter(|o| !o.is_empty())
    {
        match option.split_once('=') {
            Some(("proxy_protocol", v)) if !v.trim().is_empty() => {
                proxy_protocol = Some(
                    v.parse()
                        .map_err(|e| format!("private service {whole:?}: {e}"))?,
                );
            }
            _ => {
                return Err(format!(
                    "private service {whole:?}: unknown option `{option}` after `?` (known: \
                     proxy_protocol=v1|v2)"
                ))
            }
        }
    }
    let Some((name, target)) = spec.split_once('=') else {
        return Err(format!(
            "private service {spec:?}: write NAME=TARGET, e.g. vnc=127.0.0.1:5900 (connectors \
             reach it as AGENT/vnc)"
        ));
    };
    let name = name.trim();
    check_service_name(name).map_err(|why| format!("private service {spec:?}: {why}"))?;
    let target = Target::parse(target).map_err(|why| format!("private service {spec:?}: {why}"))?;
    Ok(PrivateService {
        name: name.to_string(),
        target,
        proxy_protocol,
    })
}

/// What an agent lets connectors reach: its private services, and the targets its `allow`
/// patterns match. Nothing by default.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PrivateConfig {
    /// `--private`, `private = [...]`, `[[forwards]]` with `public = false`.
    pub services: Vec<PrivateService>,
    /// `--allow`, `allow = [...]`.
    pub allow: Vec<TargetPattern>,
}

impl PrivateConfig {
    /// Whether connectors can reach anything here.
    pub fn is_empty(&self) -> bool {
        self.services.is_empty() && self.allow.is_empty()
    }

    /// The private service called `name`.
    pub fn service(&self, name: &str) -> Option<&PrivateService> {
        self.services.iter().find(|s| s.name == name)
    }
}

/// Checks that no two private services share a name; on a clash, the index of the later.
pub(super) fn check_private(services: &[PrivateService]) -> Result<(), (usize, String)> {
    for (i, s) in services.iter().enumerate() {
        if services[..i].iter().any(|e| e.name == s.name) {
            return Err((
                i,
                format!(
                    "two private services are named `{}`: connectors tell them apart by name",
                    s.name
                ),
            ));
        }
    }
    Ok(())
}

/// The host part of a [`TargetPattern`].
#[derive(Debug, Clone, PartialEq, Eq)]
enum PatternHost {
    /// A host name, lower case, matched as the connector writes it.
    Name(String),
    /// An address or network, matched against the address connected to.
    Net(ipnet::IpNet),
}

/// One `allow` pattern: `host:port`, `host:*`, `CIDR:port` or `CIDR:port-port` (an address
/// counts as a network of one; IPv6 goes in brackets, `[2001:db8::/32]:22`).
///
/// A host name matches the name a connector writes (case aside); the agent then connects to
/// whatever the name resolves to. An address or network matches the address the agent
/// connects to: a target given by name is resolved, and only its addresses inside the
/// network are used.
#[derive(Clone, PartialEq, Eq)]
pub struct TargetPattern {
    host: PatternHost,
    /// Inclusive.
    ports: (u16, u16),
    /// As written.
    text: String,
}

impl fmt::Debug for TargetPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TargetPattern({})", self.text)
    }
}

impl fmt::Display for TargetPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl TargetPattern {
    /// Parses a pattern (see the type).
    pub fn parse(s: &str) -> Result<TargetPattern, String> {
        let text = s.trim();
        let bad = |why: &str| {
            format!(
                "{text:?} is not a target pattern: {why} (use host:port, host:*, CIDR:port or \
                 CIDR:port-port, e.g. 10.0.0.0/24:22 or db.internal:5432)"
            )
        };
        let (host, ports) = if let Some(rest) = text.strip_prefix('[') {
            rest.split_once("]:")
                .ok_or_else(|| bad("an IPv6 address in brackets needs `:PORT` after the `]`"))?
        } else {
            let (host, ports) = text
                .rsplit_once(':')
                .ok_or_else(|| bad("it has no `:PORT`"))?;
            if host.contains(':') {
                return Err(bad("IPv6 addresses go in brackets, as in [::1]:22"));
            }
            (host, ports)
        };
        let ports = match ports.trim() {
            "*" => (1, 65535),
            p => {
                let (first, last) = p.split_once('-').unwrap_or((p, p));
                let first = port_number(first).ok_or_else(|| bad("the port is not 1-65535"))?;
                let last = port_number(last).ok_or_else(|| bad("the port is not 1-65535"))?;
                if first > last {
                    return Err(bad("the port range runs backwards"));
                }
                (first, last)
            }
        };
        let host = if host.contains('/') {
            PatternHost::Net(
                host.parse::<ipnet::IpNet>()
                    .map_err(|_| bad("the part before the port is not a network"))?
                    .trunc(),
            )
        } else if let Ok(ip) = host.parse::<IpAddr>() {
            PatternHost::Net(ipnet::IpNet::from(ip))
        } else if valid_host(host) {
            PatternHost::Name(host.trim_end_matches('.').to_ascii_lowercase())
        } else {
            return Err(bad("the host is not a host name, address or network"));
        };
        Ok(TargetPattern {
            host,
            ports,
            text: text.to_string(),
        })
    }

    fn port_ok(&self, port: u16) -> bool {
        (self.ports.0..=self.ports.1).contains(&port)
    }

    /// Whether this pattern names host `name` (a host name, not an address) and `port`.
    pub fn matches_name(&self, name: &str, port: u16) -> bool {
        match &self.host {
            PatternHost::Name(n) => {
                self.port_ok(port) && n.eq_ignore_ascii_case(name.trim_end_matches('.'))
            }
            PatternHost::Net(_) => false,
        }
    }

    /// Whether this pattern takes address `addr`.
    pub fn matches_addr(&self, addr: SocketAddr) -> bool {
        match &self.host {
            PatternHost::Net(net) => {
                self.port_ok(addr.port()) && net.contains(&canonical(addr.ip()))
            }
            PatternHost::Name(_) => false,
        }
    }

    /// Whether this is an address or network pattern that takes `port` (so a name on that
    /// port is worth resolving).
    pub fn is_net_for(&self, port: u16) -> bool {
        matches!(self.host, PatternHost::Net(_)) && self.port_ok(port)
    }
}

/// An IPv4-mapped IPv6 address as the IPv4 address it is, so `10.0.0.0/8` takes
/// `[::ffff:10.0.0.1]` too.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

// ---------------------------------------------------------------------------------------------
// The gateway: `[[connectors]]`.

/// What one `reach` entry lets a connector use on one agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReachWhat {
    /// `AGENT/SERVICE`: that private service.
    Service(String),
    /// `AGENT/*`: every private service of the agent.
    AllServices,
    /// `AGENT/targets`: targets named directly (the agent's `allow` decides which).
    Targets,
}

/// One `reach` entry: `office/vnc`, `office/*` or `office/targets`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reach {
    /// The agent, by its `[[agents]]` name.
    pub agent: String,
    /// What of it.
    pub what: ReachWhat,
}

impl Reach {
    /// Parses `AGENT/SERVICE`, `AGENT/*` or `AGENT/targets`.
    pub fn parse(s: &str) -> Result<Reach, String> {
        let s = s.trim();
        let Some((agent, what)) = s.split_once('/') else {
            return Err(format!(
                "{s:?} is not a reach entry: write AGENT/SERVICE, AGENT/* (every private \
                 service of the agent) or AGENT/{TARGETS} (targets named directly), e.g. \
                 office/vnc"
            ));
        };
        check_agent_name(agent).map_err(|why| format!("reach {s:?}: {why}"))?;
        let what = match what {
            "*" => ReachWhat::AllServices,
            TARGETS => ReachWhat::Targets,
            name => {
                check_service_name(name).map_err(|why| format!("reach {s:?}: {why}"))?;
                ReachWhat::Service(name.to_string())
            }
        };
        Ok(Reach {
            agent: agent.to_string(),
            what,
        })
    }

    /// Whether this entry takes `target` on `agent`.
    pub fn takes(&self, agent: &str, target: &DialTarget) -> bool {
        self.agent == agent
            && match (&self.what, target) {
                (ReachWhat::Service(s), DialTarget::Service(t)) => s == t,
                (ReachWhat::AllServices, DialTarget::Service(_)) => true,
                (ReachWhat::Targets, DialTarget::Address(_)) => true,
                _ => false,
            }
    }
}

impl fmt::Display for Reach {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.what {
            ReachWhat::Service(s) => write!(f, "{}/{s}", self.agent),
            ReachWhat::AllServices => write!(f, "{}/*", self.agent),
            ReachWhat::Targets => write!(f, "{}/{TARGETS}", self.agent),
        }
    }
}

/// Default `max_sessions` of a `[[connectors]]` entry.
pub const DEFAULT_CONNECTOR_SESSIONS: u32 = 16;
/// Default `max_streams` of a `[[connectors]]` entry.
pub const DEFAULT_CONNECTOR_STREAMS: u32 = 4096;

/// One connector a gateway accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectorGrant {
    /// A name for logs, and for the agents' logs (each stream names its connector).
    pub name: String,
    /// Its key or key hash.
    pub key: KeySpec,
    /// What it may use.
    pub reach: Vec<Reach>,
    /// Most sessions of this connector at once (default 16).
    pub max_sessions: u32,
    /// Most streams of this connector at once, over all its sessions (default 4096).
    pub max_streams: u32,
}

impl ConnectorGrant {
    /// Whether `reach` takes `target` on `agent`.
    pub fn reaches(&self, agent: &str, target: &DialTarget) -> bool {
        self.reach.iter().any(|r| r.takes(agent, target))
    }
}

// ---------------------------------------------------------------------------------------------
// `burrow connect`.

/// Where a connector listens for local clients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    /// A TCP address.
    Tcp(SocketAddr),
    /// A unix socket, made at this path.
    Unix(PathBuf),
}

impl fmt::Display for Listen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Listen::Tcp(a) => write!(f, "{a}"),
            Listen::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

impl Listen {
    /// Parses `PORT` (on 127.0.0.1), `HOST:PORT` (HOST an address or `localhost`),
    /// `[IPV6]:PORT` or `unix:/path/to.sock`.
    pub fn parse(s: &str) -> Result<Listen, String> {
        let s = s.trim();
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(format!("{s:?} has no socket path (use unix:/path/to.sock)"));
            }
            return Ok(Listen::Unix(PathBuf::from(path)));
        }
        if let Ok(port) = s.parse::<u16>() {
            return Ok(Listen::Tcp(SocketAddr::new(
                IpAddr::V4(Ipv4Addr::LOCALHOST),
                port,
            )));
        }
        if let Ok(addr) = s.parse::<SocketAddr>() {
            return Ok(Listen::Tcp(addr));
        }
        match s.rsplit_once(':') {
            Some((host, port)) if host.eq_ignore_ascii_case("localhost") => {
                let port = port
                    .parse::<u16>()
                    .map_err(|_| format!("{s:?}: the port is not a number from 0 to 65535"))?;
                Ok(Listen::Tcp(SocketAddr::new(
                    IpAddr::V4(Ipv4Addr::LOCALHOST),
                    port,
                )))
            }
            _ => Err(format!(
                "{s:?} is not a place to listen: use PORT (on 127.0.0.1), ADDRESS:PORT, \
                 [IPV6]:PORT or unix:/path/to.sock"
            )),
        }
    }
}

/// One forward of a connector: a local listener whose connections go to a service (or a
/// target) of an agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectForward {
    /// Where local clients connect.
    pub listen: Listen,
    /// The agent, by its name on the gateway.
    pub agent: String,
    /// Its private service, or a `host:port` it allows.
    pub target: DialTarget,
    /// A label for logs: the spec as written, or built from the parts.
    pub name: String,
}

/// `AGENT/SERVICE` or `AGENT/HOST:PORT` as a Dial target: with a `:` after the `/` it is an
/// address, else a service name.
fn parse_remote(s: &str) -> Result<(String, DialTarget), String> {
    let s = s.trim();
    let Some((agent, what)) = s.split_once('/') else {
        return Err(format!(
            "{s:?} names no agent: write AGENT/SERVICE (a private service of the agent) or \
             AGENT/HOST:PORT (a target the agent allows), e.g. office/vnc"
        ));
    };
    check_agent_name(agent)?;
    let target = if what.contains(':') {
        let (host, port) = split_host_port(what).map_err(|why| {
            format!("{what:?} is not HOST:PORT: {why} (e.g. 10.0.0.5:22 or [2001:db8::5]:22)")
        })?;
        DialTarget::Address(if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        })
    } else {
        check_service_name(what)?;
        DialTarget::Service(what.to_string())
    };
    Ok((agent.to_string(), target))
}

/// Parses `LISTEN=AGENT/SERVICE` or `LISTEN=AGENT/HOST:PORT`; LISTEN as [`Listen::parse`].
/// The forward's name is the spec as written.
pub fn parse_connect_forward(spec: &str) -> Result<ConnectForward, String> {
    let spec = spec.trim();
    // The right side has no `=`; a unix path on the left might.
    let Some((listen, remote)) = spec.rsplit_once('=') else {
        return Err(format!(
            "forward {spec:?}: write LISTEN=AGENT/SERVICE, e.g. 5901=office/vnc (LISTEN is \
             PORT, HOST:PORT or unix:/path.sock)"
        ));
    };
    let listen = Listen::parse(listen).map_err(|why| format!("forward {spec:?}: {why}"))?;
    let (agent, target) = parse_remote(remote).map_err(|why| format!("forward {spec:?}: {why}"))?;
    Ok(ConnectForward {
        listen,
        agent,
        target,
        name: spec.to_string(),
    })
}

/// Checks that no two forwards listen in the same place; on a clash, the index of the later.
fn check_connect_forwards(forwards: &[ConnectForward]) -> Result<(), (usize, String)> {
    for (i, f) in forwards.iter().enumerate() {
        let clash = forwards[..i].iter().find(|e| {
            e.listen == f.listen && !matches!(&f.listen, Listen::Tcp(a) if a.port() == 0)
        });
        if let Some(e) = clash {
            return Err((
                i,
                format!(
                    "`{}` and `{}` both listen on {}: give each its own",
                    e.name, f.name, f.listen
                ),
            ));
        }
    }
    Ok(())
}

/// Everything a connector needs.
#[derive(Debug, Clone)]
pub struct ConnectorConfig {
    /// The gateway, as for an agent.
    pub gateway: String,
    /// The connector's key (that of its `[[connectors]]` entry on the gateway).
    pub key: SecretKey,
    /// Where `key` was read from (`key_file`), if from a file.
    pub key_file: Option<PathBuf>,
    /// How the gateway's certificate is checked.
    pub trust: Trust,
    /// TLS server name to send (default: the host part of `gateway`).
    pub server_name: Option<String>,
    /// The outbound proxy to reach the gateway through (default: as the environment says).
    pub proxy: ProxyChoice,
    /// Local listeners and where their connections go.
    pub forwards: Vec<ConnectForward>,
    /// What the gateway may make this connector hold.
    pub limits: Limits,
    /// Longest pause between reconnect attempts (default 30 s).
    pub max_backoff: Duration,
    /// How long streams may drain at shutdown (default 10 s).
    pub grace: Duration,
}

/// One layer of connector settings: a file, or flags and environment (see
/// [`super::AgentSettings`], which works the same way).
#[derive(Debug, Clone, Default)]
pub struct ConnectorSettings {
    /// `gateway`.
    pub gateway: Option<String>,
    /// `key`.
    pub key: Option<SecretKey>,
    /// `key_file`; with `key`, one setting.
    pub key_file: Option<PathBuf>,
    /// `fingerprint` or `ca`.
    pub trust: Option<Trust>,
    /// `transport`.
    pub transport: Option<TransportKind>,
    /// `server_name`.
    pub server_name: Option<String>,
    /// `proxy`.
    pub proxy: Option<ProxyChoice>,
    /// `forward` and `[[forwards]]`, `--forward`: the highest layer with any wins.
    pub forwards: Option<Vec<ConnectForward>>,
    /// `[limits]`.
    pub limits: Option<Limits>,
    /// `max_backoff`.
    pub max_backoff: Option<Duration>,
    /// `grace`.
    pub grace: Option<Duration>,
    /// `log_level`: the CLI sets up logging with it.
    pub log_level: Option<LogLevel>,
    /// `log_format`: the CLI sets up logging with it.
    pub log_format: Option<LogFormat>,
}

impl ConnectorSettings {
    /// `over` on top of `self`: every field `over` sets wins.
    pub fn overlay(self, over: ConnectorSettings) -> ConnectorSettings {
        let (key, key_file) = if over.key.is_some() || over.key_file.is_some() {
            (over.key, over.key_file)
        } else {
            (self.key, self.key_file)
        };
        ConnectorSettings {
            gateway: over.gateway.or(self.gateway),
            key,
            key_file,
            trust: over.trust.or(self.trust),
            transport: over.transport.or(self.transport),
            server_name: over.server_name.or(self.server_name),
            proxy: over.proxy.or(self.proxy),
            forwards: over.forwards.or(self.forwards),
            limits: over.limits.or(self.limits),
            max_backoff: over.max_backoff.or(self.max_backoff),
            grace: over.grace.or(self.grace),
            log_level: over.log_level.or(self.log_level),
            log_format: over.log_format.or(self.log_format),
        }
    }

    /// The final configuration, or an error naming the first required setting missing.
    pub fn into_config(self) -> Result<ConnectorConfig, ConfigError> {
        let gateway = self.gateway.ok_or_else(|| {
            missing(
                "no gateway address",
                "--gateway HOST:PORT",
                "BURROW_GATEWAY",
                "gateway",
            )
        })?;
        let key =
            match (self.key, &self.key_file) {
                (Some(_), Some(file)) => {
                    return Err(ConfigError::Value(format!(
                        "both a key (--key, BURROW_KEY) and a key file ({}) are set: use one",
                        file.display()
                    )))
                }
                (Some(key), None) => key,
                (None, Some(file)) => read_key_file(file)?,
                (None, None) => return Err(missing(
                    "no connector key (make one with `burrow keygen`, and give its key_hash to \
                     the gateway's [[connectors]] entry)",
                    "--key-file FILE or --key",
                    "BURROW_KEY_FILE or BURROW_KEY (both keep it out of `ps`)",
                    "key_file` or `key",
                )),
            };
        let url = GatewayUrl::parse(&gateway).map_err(|e| ConfigError::Value(e.to_string()))?;
        let transport = match (url.scheme, self.transport) {
            (Scheme::Wss, Some(TransportKind::Tcp)) => {
                return Err(ConfigError::Value(format!(
                    "the gateway {url} is wss://, which runs over TLS, but the transport is set \
                     to tcp: remove --transport tcp (BURROW_TRANSPORT, `transport`), or use ws://"
                )))
            }
            (Scheme::Tcp | Scheme::Ws, _) => Some(TransportKind::Tcp),
            (Scheme::Tls | Scheme::Wss, t) => t,
            // QUIC always runs TLS 1.3 inside it.
            (Scheme::Quic | Scheme::Auto, Some(TransportKind::Tcp)) => {
                return Err(ConfigError::Value(format!(
                    "the gateway {url} runs TLS inside QUIC, but the transport is set to tcp: \
                     remove --transport tcp (BURROW_TRANSPORT, `transport`), or use tcp://"
                )))
            }
            (Scheme::Quic | Scheme::Auto, t) => t,
        };
        let trust = resolve_trust(transport, self.trust)?;
        let forwards = self.forwards.unwrap_or_default();
        if forwards.is_empty() {
            return Err(missing(
                "nothing to connect: no forwards",
                "--forward LISTEN=AGENT/SERVICE (e.g. 5901=office/vnc)",
                "BURROW_FORWARD",
                "forward",
            ));
        }
        check_connect_forwards(&forwards).map_err(|(_, why)| ConfigError::Value(why))?;
        Ok(ConnectorConfig {
            gateway,
            key,
            key_file: self.key_file,
            trust,
            server_name: self.server_name,
            proxy: self.proxy.unwrap_or_default(),
            forwards,
            limits: self.limits.unwrap_or_default(),
            max_backoff: self.max_backoff.unwrap_or(DEFAULT_MAX_BACKOFF),
            grace: self.grace.unwrap_or(DEFAULT_GRACE),
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Files.

impl FromToml for TargetPattern {
    fn from_toml(v: &toml::Value) -> Result<Self, String> {
        TargetPattern::parse(text(v)?)
    }
}

impl FromToml for Reach {
    fn from_toml(v: &toml::Value) -> Result<Self, String> {
        Reach::parse(text(v)?)
    }
}

impl FromToml for Listen {
    fn from_toml(v: &toml::Value) -> Result<Self, String> {
        match v {
            toml::Value::Integer(i) => u16::try_from(*i)
                .map(|p| Listen::Tcp(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), p)))
                .map_err(|_| format!("{i} is not a port (use 0-65535)")),
            other => Listen::parse(text(other)?),
        }
    }
}

/// A service name in a file.
pub(super) struct ServiceName(pub(super) String);

impl FromToml for ServiceName {
    fn from_toml(v: &toml::Value) -> Result<Self, String> {
        let s = text(v)?;
        check_service_name(s).map(|()| ServiceName(s.to_string()))
    }
}

/// `[[connectors]]` as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConnectorGrant {
    name: Spanned<Checked<Name>>,
    key: Option<Spanned<Checked<SecretKey>>>,
    key_hash: Option<Spanned<Checked<KeyHash>>>,
    reach: Spanned<Vec<Spanned<Checked<Reach>>>>,
    max_sessions: Option<Spanned<u32>>,
    max_streams: Option<Spanned<u32>>,
}

/// `[[forwards]]` of a connector file as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConnectForward {
    listen: Checked<Listen>,
    agent: Checked<Name>,
    service: Option<Checked<ServiceName>>,
    target: Option<String>,
    name: Option<Checked<Name>>,
}

/// A connector file as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConnector {
    gateway: Option<Checked<GatewayAddr>>,
    key: Option<Checked<SecretKey>>,
    key_file: Option<Spanned<Checked<PathBuf>>>,
    fingerprint: Option<Spanned<Checked<Fingerprint>>>,
    ca: Option<Spanned<Checked<PathBuf>>>,
    server_name: Option<Checked<Name>>,
    proxy: Option<Checked<ProxyChoice>>,
    transport: Option<Spanned<Checked<TransportKind>>>,
    max_backoff: Option<Spanned<Checked<Duration>>>,
    grace: Option<Checked<Duration>>,
    log_level: Option<Checked<LogLevel>>,
    log_format: Option<Checked<LogFormat>>,
    limits: Option<RawLimits>,
    forward: Option<Vec<Spanned<toml::Value>>>,
    forwards: Option<Vec<Spanned<RawConnectForward>>>,
}

/// Reads a connector config file.
pub fn load_connector_file(path: &Path) -> Result<ConnectorSettings, ConfigError> {
    let text = super::read(path)?;
    parse_connector_file(path, &text)
}

/// Parses the text of a connector config file; `path` names it in errors and anchors its
/// relative paths.
pub fn parse_connector_file(path: &Path, text: &str) -> Result<ConnectorSettings, ConfigError> {
    let src = Source { path, text };
    let raw: RawConnector = src.deserialize()?;
    src.connector(raw)
}

impl Source<'_> {
    pub(super) fn connector(&self, raw: RawConnector) -> Result<ConnectorSettings, ConfigError> {
        let transport = raw.transport.map(|t| t.into_inner().0);
        let trust = self.trust(raw.fingerprint, raw.ca, transport)?;
        if let Some(v) = raw.max_backoff.as_ref().filter(|v| v.get_ref().0.is_zero()) {
            return Err(self.error(v.span(), "max_backoff", "must be more than 0 (default 30s)"));
        }
        if let (Some(_), Some(file)) = (&raw.key, &raw.key_file) {
            return Err(self.error(
                file.span(),
                "key_file",
                "set `key` or `key_file`, not both (key_file keeps the key out of this file)",
            ));
        }
        Ok(ConnectorSettings {
            gateway: inner(raw.gateway).map(|g| g.0),
            key: inner(raw.key),
            key_file: raw.key_file.map(|f| self.resolve(f.into_inner().0)),
            trust,
            transport,
            server_name: inner(raw.server_name).map(|n| n.0),
            proxy: inner(raw.proxy),
            forwards: self.connect_forwards(raw.forward, raw.forwards)?,
            limits: raw.limits.map(|l| self.limits(l)).transpose()?,
            max_backoff: raw.max_backoff.map(|v| v.into_inner().0),
            grace: inner(raw.grace),
            log_level: inner(raw.log_level),
            log_format: inner(raw.log_format),
        })
    }

    /// `forward = [...]` then `[[forwards]]` of a connector file, in file order.
    fn connect_forwards(
        &self,
        compact: Option<Vec<Spanned<toml::Value>>>,
        tables: Option<Vec<Spanned<RawConnectForward>>>,
    ) -> Result<Option<Vec<ConnectForward>>, ConfigError> {
        if compact.is_none() && tables.is_none() {
            return Ok(None);
        }
        let mut out = Vec::new();
        let mut at = Vec::new();
        for (i, v) in compact.unwrap_or_default().into_iter().enumerate() {
            let key = format!("forward[{i}]");
            let f = text(v.get_ref())
                .and_then(parse_connect_forward)
                .map_err(|why| self.error(v.span(), key.as_str(), why))?;
            out.push(f);
            at.push((key, v.span()));
        }
        for (i, v) in tables.unwrap_or_default().into_iter().enumerate() {
            let span = v.span();
            let key = format!("forwards[{i}]");
            let raw = v.into_inner();
            let agent = raw.agent.0 .0;
            check_agent_name(&agent)
                .map_err(|why| self.error(span.clone(), format!("{key}.agent"), why))?;
            let target = match (raw.service, raw.target) {
                (Some(s), None) => DialTarget::Service(s.0 .0),
                (None, Some(t)) => match parse_remote(&format!("{agent}/{t}")) {
                    Ok((_, target @ DialTarget::Address(_))) => target,
                    Ok(_) => {
                        return Err(self.error(
                            span,
                            format!("{key}.target"),
                            format!("{t:?} is not HOST:PORT; a private service goes in `service`"),
                        ))
                    }
                    Err(why) => return Err(self.error(span, format!("{key}.target"), why)),
                },
                _ => {
                    return Err(self.error(
                        span,
                        key,
                        "set `service` (a private service of the agent) or `target` (a \
                         HOST:PORT the agent allows), one of them",
                    ))
                }
            };
            let listen = raw.listen.0;
            let name =
                inner(raw.name).map_or_else(|| format!("{listen}={agent}/{target}"), |n| n.0);
            out.push(ConnectForward {
                listen,
                agent,
                target,
                name,
            });
            at.push((key, span));
        }
        if let Err((i, why)) = check_connect_forwards(&out) {
            let (key, span) = at.swap_remove(i);
            return Err(self.error(span, key, why));
        }
        Ok(Some(out))
    }

    /// `[[connectors]]`, checked against the agents the gateway knows (`agents`: the names
    /// of its `[[agents]]`, or the generated key's agent when there are none).
    pub(super) fn connectors(
        &self,
        raw: Vec<Spanned<RawConnectorGrant>>,
        agents: &[String],
    ) -> Result<Vec<ConnectorGrant>, ConfigError> {
        let mut out: Vec<ConnectorGrant> = Vec::with_capacity(raw.len());
        for (i, raw) in raw.into_iter().enumerate() {
            let at = format!("connectors[{i}]");
            let table = raw.span();
            let raw = raw.into_inner();
            let name_span = raw.name.span();
            let name = raw.name.into_inner().0 .0;
            let (key, key_span, key_name) = match (raw.key, raw.key_hash) {
                (Some(k), None) => (KeySpec::Key(k.get_ref().0.clone()), k.span(), "key"),
                (None, Some(h)) => (KeySpec::Hash(h.get_ref().0), h.span(), "key_hash"),
                (Some(_), Some(h)) => {
                    return Err(self.error(
                        h.span(),
                        format!("{at}.key_hash"),
                        "set `key` or `key_hash`, not both (key_hash is safer to store: it \
                         cannot be used to log in)",
                    ))
                }
                (None, None) => {
                    return Err(self.error(
                        table,
                        at,
                        "set `key_hash` (`burrow keygen` makes a key and its hash) or the \
                         connector's `key`",
                    ))
                }
            };
            let reach_span = raw.reach.span();
            let reach: Vec<(Reach, std::ops::Range<usize>)> = raw
                .reach
                .into_inner()
                .into_iter()
                .map(|r| {
                    let span = r.span();
                    (r.into_inner().0, span)
                })
                .collect();
            if reach.is_empty() {
                return Err(self.error(
                    reach_span,
                    format!("{at}.reach"),
                    "give the connector something to reach, e.g. reach = [\"office/vnc\"]",
                ));
            }
            for (j, (r, span)) in reach.iter().enumerate() {
                if !agents.contains(&r.agent) {
                    return Err(self.error(
                        span.clone(),
                        format!("{at}.reach[{j}]"),
                        format!(
                            "no agent is named `{}` here (agents: {}): reach names agents by \
                             their [[agents]] name",
                            r.agent,
                            agents.join(", ")
                        ),
                    ));
                }
            }
            let limit = |v: Option<Spanned<u32>>, key: &str, default: u32| match v {
                None => Ok(default),
                Some(v) if *v.get_ref() >= 1 => Ok(v.into_inner()),
                Some(v) => Err(self.error(
                    v.span(),
                    format!("{at}.{key}"),
                    format!("must be at least 1 (default {default})"),
                )),
            };
            let max_sessions = limit(raw.max_sessions, "max_sessions", DEFAULT_CONNECTOR_SESSIONS)?;
            let max_streams = limit(raw.max_streams, "max_streams", DEFAULT_CONNECTOR_STREAMS)?;
            if let Some(j) = out.iter().position(|c| c.name == name) {
                return Err(self.error(
                    name_span,
                    format!("{at}.name"),
                    format!("connectors[{j}] already has the name {name:?}: names must differ"),
                ));
            }
            if let Some(j) = out.iter().position(|c| c.key.hash() == key.hash()) {
                return Err(self.error(
                    key_span,
                    format!("{at}.{key_name}"),
                    format!(
                        "connectors[{j}] ({:?}) has the same key: give each connector its own \
                         (`burrow keygen`)",
                        out[j].name
                    ),
                ));
            }
            out.push(ConnectorGrant {
                name,
                key,
                reach: reach.into_iter().map(|(r, _)| r).collect(),
                max_sessions,
                max_streams,
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn patterns_match_names_addresses_and_networks() {
        let p = TargetPattern::parse("db.Internal:5432").unwrap();
        assert!(p.matches_name("db.internal", 5432));
        assert!(p.matches_name("DB.internal.", 5432));
        assert!(!p.matches_name("db.internal", 5433));
        assert!(!p.matches_name("other", 5432));
        assert!(
            !p.matches_addr(addr("10.0.0.1:5432")),
            "a name is no address"
        );

        let any_port = TargetPattern::parse("nas:*").unwrap();
        assert!(any_port.matches_name("nas", 1) && any_port.matches_name("nas", 65535));

        let net = TargetPattern::parse("10.0.0.0/24:22").unwrap();
        assert!(net.matches_addr(addr("10.0.0.77:22")));
        assert!(net.matches_addr(addr("[::ffff:10.0.0.77]:22")), "mapped");
        assert!(!net.matches_addr(addr("10.0.1.1:22")));
        assert!(!net.matches_addr(addr("10.0.0.1:23")));
        assert!(
            !net.matches_name("10.0.0.1", 22),
            "names match name patterns only"
        );
        assert!(net.is_net_for(22) && !net.is_net_for(23));

        let range = TargetPattern::parse("192.0.2.7:8000-8099").unwrap();
        assert!(range.matches_addr(addr("192.0.2.7:8000")));
        assert!(range.matches_addr(addr("192.0.2.7:8099")));
        assert!(!range.matches_addr(addr("192.0.2.7:8100")));
        assert!(!range.matches_addr(addr("192.0.2.8:8000")));

        let v6 = TargetPattern::parse("[2001:db8::/32]:22").unwrap();
        assert!(v6.matches_addr(addr("[2001:db8:1::5]:22")));
        assert!(!v6.matches_addr(addr("[2001:db9::5]:22")));
        // A network written with host bits set means the network.
        let loose = TargetPattern::parse("10.0.0.5/24:22").unwrap();
        assert!(loose.matches_addr(addr("10.0.0.200:22")));

        for bad in [
            "",
            "host",
            "host:0",
            "host:70000",
            "10.0.0.0/33:22",
            "::1:22",
            "[::1]",
            "host:9-1",
            "a b:22",
            "host:x",
        ] {
            let e = TargetPattern::parse(bad).unwrap_err();
            assert!(e.contains("is not a target pattern"), "{bad}: {e}");
        }
    }

    #[test]
    fn reach_takes_what_it_names() {
        let svc = DialTarget::Service("vnc".into());
        let other = DialTarget::Service("ssh".into());
        let target = DialTarget::Address("10.0.0.5:22".into());
        let one = Reach::parse("office/vnc").unwrap();
        assert!(one.takes("office", &svc));
        assert!(!one.takes("office", &other));
        assert!(!one.takes("home", &svc));
        assert!(!one.takes("office", &target));
        let all = Reach::parse("office/*").unwrap();
        assert!(all.takes("office", &svc) && all.takes("office", &other));
        assert!(!all.takes("office", &target), "* is services only");
        let targets = Reach::parse("office/targets").unwrap();
        assert!(targets.takes("office", &target));
        assert!(!targets.takes("office", &svc));
        assert_eq!(targets.to_string(), "office/targets");
        for bad in ["office", "/vnc", "office/", "office/a/b", "office/v n c"] {
            assert!(Reach::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn values_print_back_as_they_parse() {
        for r in ["office/vnc", "office/*", "office/targets", "a.b-c_d/x"] {
            assert_eq!(Reach::parse(r).unwrap().to_string(), r);
        }
        for p in ["db:5432", "10.0.0.0/8:22", "[2001:db8::/32]:1-2", "NAS:*"] {
            let parsed = TargetPattern::parse(p).unwrap();
            assert_eq!(TargetPattern::parse(&parsed.to_string()).unwrap(), parsed);
        }
        for s in ["vnc=127.0.0.1:5900", "v6=[::1]:22", "d=unix:/run/d.sock"] {
            let p = parse_private(s).unwrap();
            assert_eq!(format!("{}={}", p.name, p.target), s);
        }
    }

    #[test]
    fn forwards_and_private_services_parse() {
        let f = parse_connect_forward("5901=office/vnc").unwrap();
        assert_eq!(f.listen, Listen::Tcp(addr("127.0.0.1:5901")));
        assert_eq!(f.agent, "office");
        assert_eq!(f.target, DialTarget::Service("vnc".into()));
        assert_eq!(f.name, "5901=office/vnc");
        let f = parse_connect_forward("0.0.0.0:2222=office/10.0.0.5:22").unwrap();
        assert_eq!(f.listen, Listen::Tcp(addr("0.0.0.0:2222")));
        assert_eq!(f.target, DialTarget::Address("10.0.0.5:22".into()));
        let f = parse_connect_forward("localhost:1=office/[2001:db8::5]:22").unwrap();
        assert_eq!(f.target, DialTarget::Address("[2001:db8::5]:22".into()));
        let f = parse_connect_forward("unix:/run/a=b.sock=office/docker").unwrap();
        assert_eq!(f.listen, Listen::Unix(PathBuf::from("/run/a=b.sock")));
        for bad in [
            "5901",
            "5901=office",
            "5901=office/",
            "5901=office/targets",
            "x=office/vnc",
            "unix:=office/vnc",
            "5901=office/host:0",
        ] {
            assert!(parse_connect_forward(bad).is_err(), "{bad}");
        }
        let p = parse_private("vnc=127.0.0.1:5900").unwrap();
        assert_eq!(p.name, "vnc");
        assert_eq!(
            p.target,
            Target::Tcp {
                host: "127.0.0.1".into(),
                port: 5900
            }
        );
        assert!(parse_private("docker=unix:/var/run/docker.sock").is_ok());
        for bad in [
            "vnc",
            "=127.0.0.1:1",
            "targets=127.0.0.1:1",
            "a/b=127.0.0.1:1",
        ] {
            assert!(parse_private(bad).is_err(), "{bad}");
        }
    }
}
