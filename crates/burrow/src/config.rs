//! Typed configuration for every role.
//!
//! Flags, environment variables (`BURROW_<FLAG>`) and the TOML file all end in these structs.
//! Each source is one *layer* of settings ([`GatewaySettings`], [`AgentSettings`]) whose unset
//! fields defer to the layer below: the CLI loads the file with [`load_gateway_file`] or
//! [`load_agent_file`], builds a layer from flags and environment (clap gives a flag
//! precedence over its variable), [`overlays`](GatewaySettings::overlay) it on the file's, and
//! turns the result into a [`GatewayConfig`] or [`AgentConfig`] with defaults filled in. So the
//! precedence is flag > environment > file > default.
//!
//! Files are read strictly: an unknown key or a bad value is an error that names the file, the
//! line and the key, e.g. `gateway.toml line 7, key agents[0].ports[1]: "70000" is not a port
//! or range (use 8080 or 9000-9100)`. Relative paths in a file (`state_dir`, `tls_cert`,
//! `tls_key`, `ca`, `key_file`) are taken relative to the file's directory; `unix:` targets are used as
//! written.
//!
//! The grammar of single values is shared by flags and files: [`parse_forward`],
//! [`Target::parse`], [`PortRange::parse`], [`parse_duration`], [`parse_gateway_addr`].

use std::fmt;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use burrow_proto::auth::{KeyHash, SecretKey};
use burrow_proto::flow::MAX_CREDIT;
use burrow_proto::frame::ABSOLUTE_MAX_PAYLOAD;
pub use burrow_proto::message::Protocol;
use burrow_proto::message::{SessionParams, StreamLimits};

pub use crate::proxy_protocol::ProxyProtocol;
use crate::transport::proxy::ProxyChoice;
use crate::transport::url::{GatewayUrl, Scheme};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};
use toml::Spanned;

mod connector;
mod ops;
mod print;
pub use connector::{
    check_service_name, load_connector_file, parse_connect_forward, parse_connector_file,
    parse_private, ConnectForward, ConnectorConfig, ConnectorGrant, ConnectorSettings, Listen,
    PrivateConfig, PrivateService, Reach, ReachWhat, TargetPattern, DEFAULT_CONNECTOR_SESSIONS,
    DEFAULT_CONNECTOR_STREAMS, TARGETS,
};
mod run;
pub use ops::{read_key_file, LogFormat};
pub use print::MASKED_KEY;
pub use run::{load_run_file, parse_run_file, Instance, InstanceSettings, Role, RunFile, ROLES};

use crate::admin::{AdminConfig, AdminToken};

/// The tunnel port a gateway listens on when none is given.
pub const DEFAULT_TUNNEL_PORT: u16 = 7443;

/// How agent and gateway talk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TransportKind {
    /// TLS 1.3 (the default).
    #[default]
    Tls,
    /// Plain TCP: only for a gateway behind a TLS-terminating proxy. Both sides must name it.
    Tcp,
}

/// Where an agent's stream goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// `host:port`.
    Tcp {
        /// Host name or IP.
        host: String,
        /// Port.
        port: u16,
    },
    /// `unix:/path/to.sock`.
    Unix(PathBuf),
}

/// An inclusive range of public ports of one protocol (`8080`, `9000-9100`, `5353/udp`;
/// a bare number or range is TCP). `Debug` shows the range as written.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    /// First port.
    pub start: u16,
    /// Last port (inclusive).
    pub end: u16,
    /// TCP or UDP.
    pub protocol: Protocol,
}

impl PortRange {
    /// Every TCP port from 1024 to 65535: with [`PortRange::UNPRIVILEGED_UDP`], the default
    /// grant of the generated key.
    pub const UNPRIVILEGED: PortRange = PortRange {
        start: 1024,
        end: 65535,
        protocol: Protocol::Tcp,
    };

    /// Every UDP port from 1024 to 65535.
    pub const UNPRIVILEGED_UDP: PortRange = PortRange {
        start: 1024,
        end: 65535,
        protocol: Protocol::Udp,
    };

    /// TCP ports `start` to `end`.
    pub fn tcp(start: u16, end: u16) -> PortRange {
        PortRange {
            start,
            end,
            protocol: Protocol::Tcp,
        }
    }

    /// Whether `port` is inside (whatever the protocol).
    pub fn contains(&self, port: u16) -> bool {
        (self.start..=self.end).contains(&port)
    }
}

/// A key as the gateway stores it: the key itself or its hash.
#[derive(Clone, PartialEq, Eq)]
pub enum KeySpec {
    /// `key = "bk_..."`.
    Key(SecretKey),
    /// `key_hash = "bkh_..."`.
    Hash(KeyHash),
}

impl KeySpec {
    /// The hash that identifies the agent.
    pub fn hash(&self) -> KeyHash {
        match self {
            KeySpec::Key(k) => k.hash(),
            KeySpec::Hash(h) => *h,
        }
    }
}

impl fmt::Debug for KeySpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeySpec::Key(_) => f.write_str("Key(****)"),
            KeySpec::Hash(h) => write!(f, "Hash({h})"),
        }
    }
}

/// One agent a gateway accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentGrant {
    /// A name for logs and status.
    pub name: String,
    /// Its key or key hash.
    pub key: KeySpec,
    /// Public ports it may bind.
    pub ports: Vec<PortRange>,
    /// Unix socket paths it may listen on as public endpoints (`paths`, none by default).
    pub paths: Vec<crate::paths::PathPattern>,
    /// Mode of the sockets it creates there (`socket_mode`, default 0660: the gateway's
    /// user and group may connect).
    pub socket_mode: u32,
}

/// Mode of a public unix socket unless the grant says otherwise: owner and group.
pub const DEFAULT_SOCKET_MODE: u32 = 0o660;

impl AgentGrant {
    /// Whether this agent may bind TCP `port` (0 = any port of its grant).
    pub fn allows(&self, port: u16) -> bool {
        self.allows_on(Protocol::Tcp, port)
    }

    /// Whether this agent may bind `port` of `protocol` (0 = any port of its grant for that
    /// protocol).
    pub fn allows_on(&self, protocol: Protocol, port: u16) -> bool {
        self.ports
            .iter()
            .filter(|r| r.protocol == protocol)
            .any(|r| port == 0 || r.contains(port))
    }
}

/// A group declared in the gateway's config (`[[groups]]`): the agents allowed to join it.
/// A group no `[[groups]]` entry names is open to every agent whose grant has its port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupGrant {
    /// The name agents' forwards give (`group=NAME`).
    pub name: String,
    /// The agents (`[[agents]] name`) allowed in it.
    pub agents: Vec<String>,
}

/// Limits on what a peer controls. Every field has a documented default.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Largest frame payload (default 64 KiB).
    pub max_frame: u32,
    /// Most concurrent streams in one session (default 16384).
    pub max_streams: u32,
    /// Most streams an agent is connecting to targets at once (default 256).
    pub max_pending_opens: u32,
    /// Most tunnel connections that have not yet authenticated (default 256).
    pub max_preauth: u32,
    /// Most of those from one source address, IPv6 by /64 (default 8). Not applied on the
    /// plain TCP transport, where every connection comes from the TLS-terminating proxy.
    pub max_preauth_per_source: u32,
    /// Most public client connections open at once on the whole gateway (default 32768).
    pub max_public_conns: u32,
    /// Most public client connections open at once to one agent's ports (default 16384, a
    /// session's default stream limit).
    pub max_public_conns_per_agent: u32,
    /// Most public ports one agent holds, bound by its session or reserved on lease
    /// (default 256).
    pub max_ports_per_agent: u32,
    /// Time a new tunnel connection has to finish TLS and authentication (default 10 s).
    pub handshake_timeout: Duration,
    /// Initial per-stream window (default 256 KiB).
    pub stream_window: u32,
    /// Per-stream window cap after auto-tuning (default 4 MiB).
    pub max_stream_window: u32,
    /// Session-wide receive window (default 32 MiB).
    pub session_window: u32,
}

impl Limits {
    /// The stream limits an agent offers when it authenticates.
    pub fn stream_limits(&self) -> StreamLimits {
        StreamLimits {
            max_payload: self.max_frame,
            max_streams: self.max_streams,
            stream_window: self.stream_window,
            max_stream_window: self.max_stream_window,
            session_window: self.session_window,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        let p = SessionParams::default();
        Limits {
            max_frame: p.max_payload,
            max_streams: p.max_streams,
            max_pending_opens: 256,
            max_preauth: 256,
            max_preauth_per_source: 8,
            max_public_conns: 32768,
            max_public_conns_per_agent: 16_384,
            max_ports_per_agent: 256,
            handshake_timeout: Duration::from_secs(10),
            stream_window: p.stream_window,
            max_stream_window: p.max_stream_window,
            session_window: p.session_window,
        }
    }
}

/// Heartbeat settings: a dead peer is detected within `interval * misses`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heartbeat {
    /// Time between pings (default 10 s).
    pub interval: Duration,
    /// Unanswered intervals before the session is declared dead (default 3).
    pub misses: u32,
}

impl Default for Heartbeat {
    fn default() -> Self {
        Heartbeat {
            interval: Duration::from_secs(10),
            misses: 3,
        }
    }
}

/// Everything a gateway needs.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// Tunnel listener (default `0.0.0.0:7443`).
    pub listen: SocketAddr,
    /// Address public ports bind to (default `0.0.0.0`).
    pub public_host: IpAddr,
    /// Host name printed in the agent command line and granted addresses (default: the
    /// listen address).
    pub public_name: Option<String>,
    /// Where the certificate and generated key live.
    pub state_dir: PathBuf,
    /// Use a state directory that others can change, with a warning, instead of refusing to
    /// start (default false; see [`crate::state::check_state_dir`]).
    pub allow_insecure_state: bool,
    /// TLS (default) or plain TCP.
    pub transport: TransportKind,
    /// A CA-signed certificate chain (PEM) to serve instead of the self-signed one.
    pub tls_cert: Option<PathBuf>,
    /// The private key (PEM) for `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// Agents accepted. Empty: the generated key from the state dir, granted ports 1024-65535.
    pub agents: Vec<AgentGrant>,
    /// Connectors accepted, and what each may reach (`[[connectors]]`; none by default).
    pub connectors: Vec<ConnectorGrant>,
    /// Groups declared with the agents allowed in each (`[[groups]]`; none by default).
    pub groups: Vec<GroupGrant>,
    /// Limits on peers.
    pub limits: Limits,
    /// Heartbeats.
    pub heartbeat: Heartbeat,
    /// How long a dropped agent's public ports stay reserved for it (default 60 s).
    pub lease: Duration,
    /// How long streams may drain at shutdown (default 10 s).
    pub grace: Duration,
    /// The path WebSocket upgrades are taken on, on the tunnel port and on `ws_listen`
    /// (default `/burrow`).
    pub ws_path: String,
    /// A plain-HTTP WebSocket listener meant to sit behind a TLS-terminating reverse proxy or
    /// CDN (off by default).
    pub ws_listen: Option<SocketAddr>,
    /// Whether agents may also dial over QUIC, on UDP (on by default; needs TLS).
    pub quic: bool,
    /// Where QUIC listens (default: the tunnel address, on UDP).
    pub quic_listen: Option<SocketAddr>,
    /// Proxies whose `X-Forwarded-For` names the agent's address on `ws_listen` (none by
    /// default: the TCP peer is the address).
    pub ws_trusted_proxies: Vec<ipnet::IpNet>,
    /// `[udp]`: UDP flows (timeouts, limits).
    pub udp: crate::udp::UdpSettings,
    /// The admin server (`admin`, `admin_token`; off by default).
    pub admin: AdminConfig,
}

impl GatewayConfig {
    /// The session parameters this gateway offers (before narrowing to an agent's limits).
    pub fn session_params(&self) -> SessionParams {
        let l = &self.limits;
        SessionParams {
            heartbeat_ms: u32::try_from(self.heartbeat.interval.as_millis())
                .unwrap_or(u32::MAX)
                .max(50),
            heartbeat_misses: self.heartbeat.misses.max(1),
            max_payload: l.max_frame,
            stream_window: l.stream_window,
            max_stream_window: l.max_stream_window.max(l.stream_window),
            session_window: l.session_window.max(l.stream_window),
            max_streams: l.max_streams,
        }
    }

    /// Defaults for everything, with `state_dir`.
    pub fn new(state_dir: PathBuf) -> Self {
        GatewayConfig {
            listen: SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), DEFAULT_TUNNEL_PORT),
            public_host: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            public_name: None,
            state_dir,
            allow_insecure_state: false,
            transport: TransportKind::Tls,
            tls_cert: None,
            tls_key: None,
            agents: Vec::new(),
            connectors: Vec::new(),
            groups: Vec::new(),
            limits: Limits::default(),
            heartbeat: Heartbeat::default(),
            lease: Duration::from_secs(60),
            ws_path: crate::transport::url::DEFAULT_WS_PATH.to_string(),
            ws_listen: None,
            quic: true,
            quic_listen: None,
            ws_trusted_proxies: Vec::new(),
            udp: crate::udp::UdpSettings::default(),
            grace: Duration::from_secs(10),
            admin: AdminConfig::default(),
        }
    }
}

/// How the agent checks the gateway's certificate. `Debug` shows a fingerprint as
/// `SHA256:<hex>`.
#[derive(Clone, PartialEq, Eq)]
pub enum Trust {
    /// `SHA256:<hex>` of the gateway's certificate (DER).
    Fingerprint([u8; 32]),
    /// A CA bundle (PEM) that signed the gateway's certificate.
    Ca(PathBuf),
    /// The system's trust store (`--ca system`): for a gateway behind a CDN or a proxy with a
    /// certificate from a public CA.
    System,
    /// Plain TCP: no TLS at all.
    Plain,
}

impl Trust {
    /// What `--ca VALUE` means: the system's store for `system`, else a PEM bundle.
    pub fn ca(value: PathBuf) -> Trust {
        if value.as_os_str() == "system" {
            Trust::System
        } else {
            Trust::Ca(value)
        }
    }
}

/// One service an agent publishes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forward {
    /// TCP (streams) or UDP (flows of datagrams).
    pub protocol: Protocol,
    /// Public port asked for; 0 lets the gateway choose.
    pub public_port: u16,
    /// Where streams go.
    pub target: Target,
    /// A label for logs (default: the spec as written).
    pub name: String,
    /// The group it joins on the gateway (`?group=NAME`, `group` in `[[forwards]]`): every
    /// agent whose forward names the group shares the public port, and new clients are spread
    /// over them.
    pub group: Option<String>,
    /// A PROXY protocol header with the client's address is written to the target before
    /// the stream's first byte (`proxy_protocol`, `?proxy_protocol=v2` after a spec; off by
    /// default).
    pub proxy_protocol: Option<ProxyProtocol>,
    /// A unix socket on the gateway as the public endpoint instead of a port (`public_path`,
    /// `unix:PATH=TARGET` as a spec); the gateway grants paths with `paths` in the agent's
    /// `[[agents]]` entry.
    pub public_path: Option<PathBuf>,
}

/// One gateway an agent keeps a session with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayEndpoint {
    /// `HOST:PORT`, or a URL whose scheme picks the transport.
    pub gateway: String,
    /// How its certificate is checked.
    pub trust: Trust,
    /// TLS server name to send (default: the host part of `gateway`).
    pub server_name: Option<String>,
}

/// A gateway as one layer of settings names it: its address, and (in a file's `gateways`
/// tables) its own fingerprint or CA and server name. What it leaves out comes from the
/// settings for every gateway (`fingerprint`, `ca`, `server_name`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewaySetting {
    /// `HOST:PORT` or a URL.
    pub url: String,
    /// Its own fingerprint or CA.
    pub trust: Option<Trust>,
    /// Its own TLS server name.
    pub server_name: Option<String>,
}

impl GatewaySetting {
    /// A gateway named by its address alone.
    pub fn new(url: impl Into<String>) -> GatewaySetting {
        GatewaySetting {
            url: url.into(),
            trust: None,
            server_name: None,
        }
    }
}

/// Everything an agent needs.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// `host:port` of the (first) gateway.
    pub gateway: String,
    /// The agent's key.
    pub key: SecretKey,
    /// How the gateway's certificate is checked.
    pub trust: Trust,
    /// TLS server name to send (default: the host part of `gateway`).
    pub server_name: Option<String>,
    /// The other gateways (`--gateway` given more than once, `gateways = [...]`): the agent
    /// keeps a session with each, as with `gateway`, and publishes the same forwards on each.
    pub extra_gateways: Vec<GatewayEndpoint>,
    /// The outbound proxy to reach the gateway through (default: as the environment says).
    pub proxy: ProxyChoice,
    /// Services.
    pub forwards: Vec<Forward>,
    /// Private services and the targets connectors may name (none by default).
    pub private: PrivateConfig,
    /// Limits on what the gateway may ask of us.
    pub limits: Limits,
    /// Longest pause between reconnect attempts (default 30 s).
    pub max_backoff: Duration,
    /// How long connecting to a target may take before the stream is given up (default
    /// 10 s). A stream waiting for its turn under `max_pending_opens` counts that time too.
    pub connect_timeout: Duration,
    /// How long streams may drain at shutdown (default 10 s).
    pub grace: Duration,
    /// `[udp]`: UDP flows (timeouts, limits).
    pub udp: crate::udp::UdpSettings,
    /// Where `key` was read from (`key_file`), if from a file.
    pub key_file: Option<PathBuf>,
    /// The admin server (`admin`, `admin_token`; off by default).
    pub admin: AdminConfig,
}

impl AgentConfig {
    /// Every gateway, `gateway` first.
    pub fn gateways(&self) -> Vec<GatewayEndpoint> {
        let first = GatewayEndpoint {
            gateway: self.gateway.clone(),
            trust: self.trust.clone(),
            server_name: self.server_name.clone(),
        };
        std::iter::once(first)
            .chain(self.extra_gateways.iter().cloned())
            .collect()
    }
}

/// How much a logger says: `error`, `warn`, `info`, `debug` or `trace`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogLevel {
    /// Only errors.
    Error,
    /// Errors and warnings.
    Warn,
    /// The default: start-up, sessions, grants.
    #[default]
    Info,
    /// Streams and retries.
    Debug,
    /// Everything, frames included.
    Trace,
}

impl LogLevel {
    /// Every level, quietest first.
    pub const ALL: [LogLevel; 5] = [
        LogLevel::Error,
        LogLevel::Warn,
        LogLevel::Info,
        LogLevel::Debug,
        LogLevel::Trace,
    ];

    /// The name as written in flags and files (and understood by `tracing` filters).
    pub fn as_str(self) -> &'static str {
        match self {
            LogLevel::Error => "error",
            LogLevel::Warn => "warn",
            LogLevel::Info => "info",
            LogLevel::Debug => "debug",
            LogLevel::Trace => "trace",
        }
    }
}

impl fmt::Display for LogLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for LogLevel {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        LogLevel::ALL
            .into_iter()
            .find(|l| l.as_str() == s.trim())
            .ok_or_else(|| {
                format!("{s:?} is not a log level (use error, warn, info, debug or trace)")
            })
    }
}

impl TransportKind {
    /// `tls` or `tcp`.
    pub fn as_str(self) -> &'static str {
        match self {
            TransportKind::Tls => "tls",
            TransportKind::Tcp => "tcp",
        }
    }
}

impl fmt::Display for TransportKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for TransportKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "tls" => Ok(TransportKind::Tls),
            "tcp" => Ok(TransportKind::Tcp),
            _ => Err(format!(
                "{s:?} is not a transport (use tls, or tcp behind a TLS-terminating proxy)"
            )),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Single values: the grammar shared by flags, environment and files.

/// A port from 1 to 65535.
fn port_number(s: &str) -> Option<u16> {
    s.trim().parse::<u16>().ok().filter(|p| *p != 0)
}

/// Whether `h` looks like a host name or an IPv4 address. A bare number (`8080`) is neither:
/// it is the first half of Docker's `8080:80`, which the resolver would read as 0.0.31.144.
fn valid_host(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 253
        && h.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
        && !h.bytes().all(|b| b.is_ascii_digit())
}

/// Splits `host:port` or `[ipv6]:port` (port 1-65535); the host comes back without brackets.
fn split_host_port(s: &str) -> Result<(String, u16), &'static str> {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (host, port) = rest
            .split_once("]:")
            .ok_or("an IPv6 address in brackets needs `:PORT` after the `]`")?;
        host.parse::<Ipv6Addr>()
            .map_err(|_| "the part in brackets is not an IPv6 address")?;
        (host, port)
    } else {
        let (host, port) = s.rsplit_once(':').ok_or("it has no `:PORT`")?;
        if host.contains(':') {
            return Err("IPv6 addresses go in brackets, as in [::1]:80");
        }
        if !valid_host(host) {
            return Err("the host is not a host name or IP address");
        }
        (host, port)
    };
    let port = port_number(port).ok_or("the port is not a number from 1 to 65535")?;
    Ok((host.to_string(), port))
}

impl Target {
    /// Parses `host:port`, `[ipv6]:port` or `unix:/path/to.sock`.
    pub fn parse(s: &str) -> Result<Target, String> {
        let s = s.trim();
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(format!("{s:?} has no socket path (use unix:/path/to.sock)"));
            }
            return Ok(Target::Unix(PathBuf::from(path)));
        }
        let (host, port) =
            split_host_port(s).map_err(|why| match target_hint(s, &|t| t.to_string()) {
                Some(hint) => format!("{s:?} is not a target: {hint}"),
                None => format!(
                    "{s:?} is not a target: {why} (use host:port, [ipv6]:port or \
                     unix:/path/to.sock)"
                ),
            })?;
        Ok(Target::Tcp { host, port })
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Tcp { host, port } if host.contains(':') => write!(f, "[{host}]:{port}"),
            Target::Tcp { host, port } => write!(f, "{host}:{port}"),
            Target::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

impl PortRange {
    /// Parses `8080` or `9000-9100`: ports from 1 to 65535, the first not above the last.
    pub fn parse(s: &str) -> Result<PortRange, String> {
        let bad =
            || format!("{s:?} is not a port or range (use 8080, 9000-9100, or 5353/udp for UDP)");
        let text = s.trim();
        let (text, protocol) = match text.rsplit_once('/') {
            Some((t, p)) if p.eq_ignore_ascii_case("udp") => (t, Protocol::Udp),
            Some((t, p)) if p.eq_ignore_ascii_case("tcp") => (t, Protocol::Tcp),
            Some(_) => return Err(bad()),
            None => (text, Protocol::Tcp),
        };
        let (first, last) = text.split_once('-').unwrap_or((text, text));
        let start = port_number(first).ok_or_else(bad)?;
        let end = port_number(last).ok_or_else(bad)?;
        if start > end {
            return Err(format!(
                "{s:?} runs backwards (write the lower port first: {end}-{start})"
            ));
        }
        Ok(PortRange {
            start,
            end,
            protocol,
        })
    }
}

impl fmt::Debug for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PortRange({self})")
    }
}

impl fmt::Debug for Trust {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Trust::Fingerprint(fp) => {
                write!(f, "Fingerprint({})", crate::tls::fingerprint_string(fp))
            }
            Trust::Ca(path) => f.debug_tuple("Ca").field(path).finish(),
            Trust::System => f.write_str("System"),
            Trust::Plain => f.write_str("Plain"),
        }
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.start == self.end {
            write!(f, "{}", self.start)?;
        } else {
            write!(f, "{}-{}", self.start, self.end)?;
        }
        if self.protocol == Protocol::Udp {
            f.write_str("/udp")?;
        }
        Ok(())
    }
}

/// Parses a forward spec, `[PUBLIC=]TARGET[?OPTION=VALUE[&...]]`.
///
/// TARGET is `host:port`, `[ipv6]:port` or `unix:/path/to.sock`; PUBLIC is a port (`0` or
/// absent lets the gateway choose) or `unix:/path` for a unix socket on the gateway. After a
/// `?` come options in the manner of a URL query (wstunnel writes `?proxy_protocol` the same
/// way), joined by `&`: `proxy_protocol=v1` or `v2`, and `group=NAME`, which puts the forward
/// in a group ([`Forward::group`]). The forward's name is the spec as written (trimmed),
/// without the options, so turning an option on keeps the name (and the port the gateway
/// keeps for it).
pub fn parse_forward(spec: &str) -> Result<Forward, String> {
    let spec = spec.trim();
    let (base, options) = split_options(spec);
    let mut forward = parse_forward_as_written(base).map_err(|why| {
        forward_hint(base).map_or(why, |hint| format!("forward {spec:?}: {hint}"))
    })?;
    if let Some(options) = options {
        forward_options(&mut forward, spec, options)?;
    }
    Ok(forward)
}

/// Most characters in a group name.
pub const MAX_GROUP_NAME: usize = 64;

/// Checks a group name: 1 to [`MAX_GROUP_NAME`] letters, digits, `.`, `_` or `-`.
pub fn parse_group(s: &str) -> Result<String, String> {
    let s = s.trim();
    let ok = !s.is_empty()
        && s.len() <= MAX_GROUP_NAME
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
    if ok {
        Ok(s.to_string())
    } else {
        Err(format!(
            "{s:?} is not a group name: use 1 to {MAX_GROUP_NAME} letters, digits, `.`, `_` or \
             `-` (e.g. ?group=web)"
        ))
    }
}

/// The options a spec may carry after `?`.
const FORWARD_OPTIONS: &[&str] = &["proxy_protocol", "group"];

/// `SPEC?OPTIONS`, split at the last `?` when what follows starts with a known option (a `?`
/// in a unix path stays in the path).
fn split_options(spec: &str) -> (&str, Option<&str>) {
    match spec.rsplit_once('?') {
        Some((base, options)) if FORWARD_OPTIONS.iter().any(|o| options.starts_with(o)) => {
            (base.trim_end(), Some(options))
        }
        _ => (spec, None),
    }
}

/// Applies `key=value&...` options to a parsed forward.
fn forward_options(f: &mut Forward, spec: &str, options: &str) -> Result<(), String> {
    for option in options.split('&').map(str::trim).filter(|o| !o.is_empty()) {
        let (key, value) = option.split_once('=').unwrap_or((option, ""));
        match key.trim() {
            "proxy_protocol" if value.trim().is_empty() => {
                return Err(format!(
                    "forward {spec:?}: say which PROXY protocol version: ?proxy_protocol=v1 (text) \
                     or ?proxy_protocol=v2 (binary)"
                ))
            }
            "proxy_protocol" => {
                f.proxy_protocol = Some(
                    value
                        .parse()
                        .map_err(|e| format!("forward {spec:?}: {e}"))?,
                );
            }
            "group" => {
                if f.group.is_some() {
                    return Err(format!("forward {spec:?}: `group` is given twice"));
                }
                f.group =
                    Some(parse_group(value).map_err(|why| format!("forward {spec:?}: {why}"))?);
            }
            other => {
                return Err(format!(
                    "forward {spec:?}: unknown option `{other}` after `?` (known: \
                     proxy_protocol=v1|v2, group=NAME)"
                ))
            }
        }
    }
    if f.protocol == Protocol::Udp && f.proxy_protocol.is_some() {
        return Err(format!(
            "forward {spec:?}: a PROXY protocol header goes before a TCP stream; a UDP forward \
             cannot carry one"
        ));
    }
    if f.public_path.is_some() && f.group.is_some() {
        return Err(format!(
            "forward {spec:?}: a group shares a public port; a unix socket on the gateway cannot \
             join one (drop ?group= or give a port)"
        ));
    }
    Ok(())
}

/// `unix:PATH=TARGET`: the public socket's path and the target, when some `=` in `rest` has a
/// target after it (a target's own unix path may hold `=` too).
fn split_unix_public(rest: &str) -> Option<(PathBuf, &str)> {
    let after = rest.strip_prefix("unix:")?;
    after
        .match_indices('=')
        .map(|(i, _)| (&after[..i], &after[i + 1..]))
        .find(|(path, target)| !path.is_empty() && Target::parse(target).is_ok())
        .map(|(path, target)| (PathBuf::from(path), target))
}

fn parse_forward_as_written(spec: &str) -> Result<Forward, String> {
    let (protocol, rest) = match spec.strip_prefix("udp:") {
        Some(rest) => (Protocol::Udp, rest),
        None => (Protocol::Tcp, spec),
    };
    if let Some((path, target)) = split_unix_public(rest) {
        if protocol == Protocol::Udp {
            return Err(format!(
                "forward {spec:?}: a UDP forward's public end is a port, not a unix socket"
            ));
        }
        crate::paths::check_socket_path(&path).map_err(|why| format!("forward {spec:?}: {why}"))?;
        return Ok(Forward {
            protocol,
            public_port: 0,
            target: Target::parse(target)?,
            name: spec.to_string(),
            proxy_protocol: None,
            public_path: Some(path),
            group: None,
        });
    }
    let (public_port, target) = match rest.split_once('=') {
        Some((port, target)) if !spec.starts_with("unix:") => {
            let port = port.trim().parse::<u16>().map_err(|_| {
                format!(
                    "forward {spec:?}: {port:?} is not a public port \
                     (use 0-65535, 0 lets the gateway choose; e.g. 8080=127.0.0.1:80)"
                )
            })?;
            (port, target)
        }
        _ => (0, rest),
    };
    let target = Target::parse(target)?;
    if protocol == Protocol::Udp && matches!(target, Target::Unix(_)) {
        return Err(format!(
            "forward {spec:?}: a UDP forward goes to HOST:PORT, not a unix socket"
        ));
    }
    Ok(Forward {
        protocol,
        public_port,
        target,
        name: spec.to_string(),
        group: None,
        proxy_protocol: None,
        public_path: None,
    })
}

/// What a forward spec that does not parse was probably meant to be: the habits of Docker
/// and ssh (`8080:127.0.0.1:80`), the halves swapped, and the target mistakes of
/// [`target_hint`].
fn forward_hint(spec: &str) -> Option<String> {
    // `?proxy_protcol=v2`: an option misspelt reads as part of the target.
    if let Some((base, option)) = spec.rsplit_once('?') {
        if parse_forward_as_written(base).is_ok() {
            let key = option.split(['=', '&']).next().unwrap_or(option);
            return Some(format!(
                "unknown option `{key}` after `?` (known: proxy_protocol=v1|v2, group=NAME)"
            ));
        }
    }
    // `8080=127.0.0.1:80,group=web`: the comma made the option a forward of its own.
    if let Some(key) = FORWARD_OPTIONS
        .iter()
        .find(|o| spec.strip_prefix(**o).is_some_and(|r| r.starts_with('=')))
    {
        return Some(format!(
            "`{spec}` is an option, not a forward: options follow the spec after `?` and are \
             joined by `&` (e.g. '8080=127.0.0.1:80?{key}=…'); commas separate forwards"
        ));
    }
    let Some((port, target)) = spec.split_once('=').filter(|_| !spec.starts_with("unix:")) else {
        // Docker's `-p 8080:80` and ssh's `-R 8080:localhost:80`.
        if let Some((first, rest)) = spec.split_once(':') {
            if first.parse::<u16>().is_ok() && Target::parse(rest).is_ok() {
                return Some(format!(
                    "use `=` between the public port and the target, not `:` as for Docker or \
                     ssh: write {first}={rest}"
                ));
            }
            if let (Ok(_), Some(local)) = (first.parse::<u16>(), port_number(rest)) {
                return Some(format!(
                    "a target needs its host: to publish port {local} of this machine on \
                     public port {first}, write {first}=127.0.0.1:{local}"
                ));
            }
        }
        return target_hint(spec, &|t| t.to_string());
    };
    let (port, target) = (port.trim(), target.trim());
    // `127.0.0.1:80=8080`: the halves swapped.
    if port.parse::<u16>().is_err() && target.parse::<u16>().is_ok() && Target::parse(port).is_ok()
    {
        return Some(format!("the public port goes first: write {target}={port}"));
    }
    target_hint(target, &|t| format!("{port}={t}"))
}

/// What a target that does not parse was probably meant to be: a URL, a protocol prefix, a
/// missing host, or a public port in front. `with` turns a corrected target into the whole
/// corrected spec.
fn target_hint(target: &str, with: &dyn Fn(&str) -> String) -> Option<String> {
    let lower = target.to_ascii_lowercase();
    if let Some(bare) = target
        .strip_suffix("/udp")
        .or_else(|| target.strip_prefix("udp:"))
        .filter(|b| Target::parse(b).is_ok())
    {
        return Some(format!(
            "a UDP forward is written with `udp:` in front of it all: udp:{}",
            with(bare)
        ));
    }
    if let Some((scheme, rest)) = target.split_once("://") {
        let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
        let example = match Target::parse(authority) {
            Ok(t) => format!(": write {}", with(&t.to_string())),
            Err(_) => format!(", e.g. {}", with("127.0.0.1:80")),
        };
        return Some(format!(
            "no scheme: burrow forwards the bytes of a TCP connection, so the target is \
             host:port without `{scheme}://`{example}"
        ));
    }
    let bare = if lower.starts_with("tcp:") {
        target.get(4..)
    } else {
        target.strip_suffix("/tcp")
    };
    if let Some(bare) = bare.filter(|b| Target::parse(b).is_ok()) {
        return Some(format!(
            "drop the `tcp:` or `/tcp`: every host:port target is TCP (write {})",
            with(bare)
        ));
    }
    let (first, rest) = target.split_once(':')?;
    if first.is_empty() && port_number(rest).is_some() {
        return Some(format!(
            "a target needs its host: write {} (or localhost:{rest})",
            with(&format!("127.0.0.1:{rest}"))
        ));
    }
    if first.parse::<u16>().is_ok() && Target::parse(rest).is_ok() {
        return Some(format!(
            "that reads as PUBLIC_PORT:HOST:PORT; the target is {rest}, and the public port is \
             set apart (`public_port = {first}`, or `{first}=` in front of a compact spec)"
        ));
    }
    None
}

/// The name a forward gets when none is given: its spec in the compact form.
fn forward_name(
    protocol: Protocol,
    public_port: u16,
    public_path: Option<&Path>,
    target: &Target,
) -> String {
    let udp = if protocol == Protocol::Udp {
        "udp:"
    } else {
        ""
    };
    match public_path {
        Some(path) => format!("unix:{}={target}", path.display()),
        None if public_port == 0 => format!("{udp}{target}"),
        None => format!("{udp}{public_port}={target}"),
    }
}

/// Parses a duration such as `500ms`, `10s`, `5m` or `1h 30m`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim())
        .map_err(|_| format!("{s:?} is not a duration (use e.g. 500ms, 10s, 5m or 1h 30m)"))
}

/// Parses an agent key, `bk_...`. The error never repeats the text, and a masked key (as
/// `--print-config` and the gateway print them) is called so.
pub fn parse_key(s: &str) -> Result<SecretKey, String> {
    if s.contains("****") {
        return Err(format!(
            "this is a masked key ({MASKED_KEY}), not the key itself: put the real key here \
             (the gateway's state directory holds it in {}, and `burrow gateway \
             --print-agent-line` prints a line with it)",
            crate::state::AGENT_KEY_FILE
        ));
    }
    SecretKey::parse(s).map_err(|e| e.to_string())
}

/// Checks a gateway address, `HOST:PORT` or `[IPV6]:PORT`, and returns it trimmed.
pub fn parse_gateway_addr(s: &str) -> Result<String, String> {
    let s = s.trim();
    GatewayUrl::parse(s).map_err(|why| {
        format!(
            "{s:?} is not a gateway address: {why} (use HOST:PORT, e.g. gw.example.com:7443, or \
             a URL: tls://, tcp://, wss://HOST[:PORT][/PATH], ws://...)"
        )
    })?;
    Ok(s.to_string())
}

/// An address or network, as in `10.0.0.0/8`, `192.0.2.7` or `2001:db8::/32`.
pub fn parse_net(s: &str) -> Result<ipnet::IpNet, String> {
    let s = s.trim();
    s.parse::<ipnet::IpNet>()
        .or_else(|_| s.parse::<IpAddr>().map(ipnet::IpNet::from))
        .map_err(|_| {
            format!("{s:?} is not an address or network (use e.g. 10.0.0.0/8 or 192.0.2.7)")
        })
}

/// Checks that no two forwards ask for the same public port; on a clash, returns the index
/// of the later forward and what is wrong.
fn check_forwards(forwards: &[Forward]) -> Result<(), (usize, String)> {
    for (i, f) in forwards.iter().enumerate() {
        let earlier = forwards[..i]
            .iter()
            .find(|e| f.public_port != 0 && e.public_port == f.public_port);
        if let Some(e) = earlier {
            return Err((
                i,
                format!(
                    "public port {} is asked for by both `{}` and `{}`: give each its own port, \
                     or 0 to let the gateway choose",
                    f.public_port, e.name, f.name
                ),
            ));
        }
        let same_path = forwards[..i]
            .iter()
            .find(|e| f.public_path.is_some() && e.public_path == f.public_path);
        if let Some(e) = same_path {
            return Err((
                i,
                format!(
                    "public socket {} is asked for by both `{}` and `{}`: give each its own path",
                    f.public_path.as_deref().unwrap_or(Path::new("")).display(),
                    e.name,
                    f.name
                ),
            ));
        }
        // The gateway keeps a returning agent's ports by forward name, so names must differ.
        if forwards[..i].iter().any(|e| e.name == f.name) {
            return Err((
                i,
                format!(
                    "two forwards are named `{}`: give each a different name (or target)",
                    f.name
                ),
            ));
        }
    }
    Ok(())
}

/// The state directory used when none is configured: `/var/lib/burrow` when running as
/// root, else `$XDG_STATE_HOME/burrow`, else `$HOME/.local/state/burrow`, else
/// `burrow-state` in the working directory.
pub fn default_state_dir() -> PathBuf {
    state_dir_for(
        running_as_root(),
        std::env::var_os("XDG_STATE_HOME").map(PathBuf::from),
        std::env::var_os("HOME").map(PathBuf::from),
    )
}

/// [`default_state_dir`] without the environment, for tests.
fn state_dir_for(root: bool, xdg_state_home: Option<PathBuf>, home: Option<PathBuf>) -> PathBuf {
    // XDG says relative values are invalid and must be ignored.
    let usable = |p: &PathBuf| p.is_absolute();
    if root {
        PathBuf::from("/var/lib/burrow")
    } else if let Some(xdg) = xdg_state_home.filter(usable) {
        xdg.join("burrow")
    } else if let Some(home) = home.filter(usable) {
        home.join(".local/state/burrow")
    } else {
        PathBuf::from("burrow-state")
    }
}

#[cfg(unix)]
fn running_as_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

#[cfg(not(unix))]
fn running_as_root() -> bool {
    false
}

// ---------------------------------------------------------------------------------------------
// Layers of settings.

/// One layer of gateway settings: a file, or flags and environment. Unset fields defer to
/// the layer below ([`GatewaySettings::overlay`]); [`GatewaySettings::into_config`] fills
/// in defaults and checks what only the whole can tell.
#[derive(Debug, Clone, Default)]
pub struct GatewaySettings {
    /// `listen`, `--listen`, `BURROW_LISTEN`.
    pub listen: Option<SocketAddr>,
    /// `public_host`.
    pub public_host: Option<IpAddr>,
    /// `public_name`.
    pub public_name: Option<String>,
    /// `state_dir`.
    pub state_dir: Option<PathBuf>,
    /// `allow_insecure_state`.
    pub allow_insecure_state: Option<bool>,
    /// `transport`.
    pub transport: Option<TransportKind>,
    /// `tls_cert`.
    pub tls_cert: Option<PathBuf>,
    /// `tls_key`.
    pub tls_key: Option<PathBuf>,
    /// `[[agents]]` (only files have them).
    pub agents: Option<Vec<AgentGrant>>,
    /// `[[connectors]]` (only files have them).
    pub connectors: Option<Vec<ConnectorGrant>>,
    /// `[[groups]]` (only files have them).
    pub groups: Option<Vec<GroupGrant>>,
    /// `[limits]`, complete with defaults for keys the file leaves out.
    pub limits: Option<Limits>,
    /// `[heartbeat]`, complete with defaults for keys the file leaves out.
    pub heartbeat: Option<Heartbeat>,
    /// `lease`.
    pub lease: Option<Duration>,
    /// `grace`.
    pub grace: Option<Duration>,
    /// `log_level`: not part of [`GatewayConfig`]; the CLI sets up logging with it.
    pub log_level: Option<LogLevel>,
    /// `ws_path`, `--ws-path`.
    pub ws_path: Option<String>,
    /// `ws_listen`, `--ws-listen`.
    pub ws_listen: Option<SocketAddr>,
    /// `quic`, `--no-quic`.
    pub quic: Option<bool>,
    /// `quic_listen`, `--quic-listen`.
    pub quic_listen: Option<SocketAddr>,
    /// `ws_trusted_proxies`, `--ws-trusted-proxy` (repeated).
    pub ws_trusted_proxies: Option<Vec<ipnet::IpNet>>,
    /// `[udp]`, complete with defaults for keys the file leaves out.
    pub udp: Option<crate::udp::UdpSettings>,
    /// `admin`, `--admin`.
    pub admin: Option<SocketAddr>,
    /// `admin_token`, `--admin-token`.
    pub admin_token: Option<AdminToken>,
    /// `log_format`: not part of [`GatewayConfig`]; the CLI sets up logging with it.
    pub log_format: Option<LogFormat>,
}

impl GatewaySettings {
    /// `over` on top of `self`: every field `over` sets wins.
    pub fn overlay(self, over: GatewaySettings) -> GatewaySettings {
        GatewaySettings {
            listen: over.listen.or(self.listen),
            public_host: over.public_host.or(self.public_host),
            public_name: over.public_name.or(self.public_name),
            state_dir: over.state_dir.or(self.state_dir),
            allow_insecure_state: over.allow_insecure_state.or(self.allow_insecure_state),
            transport: over.transport.or(self.transport),
            tls_cert: over.tls_cert.or(self.tls_cert),
            tls_key: over.tls_key.or(self.tls_key),
            agents: over.agents.or(self.agents),
            connectors: over.connectors.or(self.connectors),
            groups: over.groups.or(self.groups),
            limits: over.limits.or(self.limits),
            heartbeat: over.heartbeat.or(self.heartbeat),
            lease: over.lease.or(self.lease),
            grace: over.grace.or(self.grace),
            log_level: over.log_level.or(self.log_level),
            ws_path: over.ws_path.or(self.ws_path),
            ws_listen: over.ws_listen.or(self.ws_listen),
            quic: over.quic.or(self.quic),
            quic_listen: over.quic_listen.or(self.quic_listen),
            ws_trusted_proxies: over.ws_trusted_proxies.or(self.ws_trusted_proxies),
            udp: over.udp.or(self.udp),
            admin: over.admin.or(self.admin),
            admin_token: over.admin_token.or(self.admin_token),
            log_format: over.log_format.or(self.log_format),
        }
    }

    /// The final configuration: defaults for what no layer set (the state directory from
    /// [`default_state_dir`]), and the checks that need every layer.
    pub fn into_config(self) -> Result<GatewayConfig, ConfigError> {
        let transport = self.transport.unwrap_or_default();
        match (&self.tls_cert, &self.tls_key, transport) {
            (Some(_), None, _) | (None, Some(_), _) => {
                return Err(ConfigError::Value(
                    "tls_cert and tls_key go together: set both (--tls-cert and --tls-key, \
                     BURROW_TLS_CERT and BURROW_TLS_KEY, or `tls_cert` and `tls_key` in the \
                     config file), or neither for a self-signed certificate"
                        .into(),
                ))
            }
            (Some(_), Some(_), TransportKind::Tcp) => {
                return Err(ConfigError::Value(
                    "tls_cert and tls_key are set but the transport is tcp, which has no TLS: \
                     remove them or use transport tls"
                        .into(),
                ))
            }
            _ => {}
        }
        let mut c = GatewayConfig::new(self.state_dir.unwrap_or_else(default_state_dir));
        c.transport = transport;
        c.tls_cert = self.tls_cert;
        c.tls_key = self.tls_key;
        c.public_name = self.public_name;
        set(&mut c.allow_insecure_state, self.allow_insecure_state);
        c.agents = self.agents.unwrap_or_default();
        c.connectors = self.connectors.unwrap_or_default();
        c.groups = self.groups.unwrap_or_default();
        set(&mut c.listen, self.listen);
        set(&mut c.public_host, self.public_host);
        set(&mut c.limits, self.limits);
        set(&mut c.heartbeat, self.heartbeat);
        set(&mut c.lease, self.lease);
        set(&mut c.grace, self.grace);
        if let Some(path) = self.ws_path {
            if !path.starts_with('/') || path.contains(char::is_whitespace) {
                return Err(ConfigError::Value(format!(
                    "ws_path {path:?} is not a URL path: it starts with `/` and has no spaces \
                     (default /burrow)"
                )));
            }
            c.ws_path = path;
        }
        c.ws_listen = self.ws_listen;
        set(&mut c.quic, self.quic);
        c.quic_listen = self.quic_listen;
        set(&mut c.ws_trusted_proxies, self.ws_trusted_proxies);
        set(&mut c.udp, self.udp);
        c.admin = AdminConfig {
            listen: self.admin,
            token: self.admin_token,
        };
        c.admin.check().map_err(ConfigError::Value)?;
        Ok(c)
    }
}

/// One layer of agent settings: a file, or flags and environment. Unset fields defer to
/// the layer below ([`AgentSettings::overlay`]); [`AgentSettings::into_config`] fills in
/// defaults and says which required setting is missing.
#[derive(Debug, Clone, Default)]
pub struct AgentSettings {
    /// `gateway` or `gateways`, `--gateway` (repeated), `BURROW_GATEWAY` (comma-separated).
    pub gateways: Option<Vec<GatewaySetting>>,
    /// `key`.
    pub key: Option<SecretKey>,
    /// `fingerprint` or `ca`: one setting, the highest layer that names either wins. One
    /// entry is for every gateway; several are one per gateway, in order.
    pub trust: Option<Vec<Trust>>,
    /// `transport`; `tcp` means [`Trust::Plain`].
    pub transport: Option<TransportKind>,
    /// `server_name`.
    pub server_name: Option<String>,
    /// `proxy`: a proxy URL, or `none`.
    pub proxy: Option<ProxyChoice>,
    /// `forward` and `[[forwards]]` (files), `--forward` (flags): the highest layer that has
    /// any forwards replaces the lower layers' list.
    pub forwards: Option<Vec<Forward>>,
    /// `private` and `[[forwards]]` with `public = false` (files), `--private` (flags): the
    /// highest layer that has any replaces the lower layers' list.
    pub private: Option<Vec<PrivateService>>,
    /// `allow`, `--allow`: the highest layer that has any replaces the lower layers' list.
    pub allow: Option<Vec<TargetPattern>>,
    /// `[limits]`, complete with defaults for keys the file leaves out.
    pub limits: Option<Limits>,
    /// `max_backoff`.
    pub max_backoff: Option<Duration>,
    /// `connect_timeout`.
    pub connect_timeout: Option<Duration>,
    /// `grace`.
    pub grace: Option<Duration>,
    /// `log_level`: not part of [`AgentConfig`]; the CLI sets up logging with it.
    pub log_level: Option<LogLevel>,
    /// `[udp]`, complete with defaults for keys the file leaves out.
    pub udp: Option<crate::udp::UdpSettings>,
    /// `key_file`, `--key-file`: the key read from a file. With `key`, one setting: the
    /// highest layer that names either wins.
    pub key_file: Option<PathBuf>,
    /// `admin`, `--admin`.
    pub admin: Option<SocketAddr>,
    /// `admin_token`, `--admin-token`.
    pub admin_token: Option<AdminToken>,
    /// `log_format`: not part of [`AgentConfig`]; the CLI sets up logging with it.
    pub log_format: Option<LogFormat>,
}

impl AgentSettings {
    /// `over` on top of `self`: every field `over` sets wins.
    pub fn overlay(self, over: AgentSettings) -> AgentSettings {
        let (key, key_file) = if over.key.is_some() || over.key_file.is_some() {
            (over.key, over.key_file)
        } else {
            (self.key, self.key_file)
        };
        AgentSettings {
            gateways: over.gateways.or(self.gateways),
            key,
            key_file,
            admin: over.admin.or(self.admin),
            admin_token: over.admin_token.or(self.admin_token),
            log_format: over.log_format.or(self.log_format),
            trust: over.trust.or(self.trust),
            transport: over.transport.or(self.transport),
            server_name: over.server_name.or(self.server_name),
            proxy: over.proxy.or(self.proxy),
            forwards: over.forwards.or(self.forwards),
            private: over.private.or(self.private),
            allow: over.allow.or(self.allow),
            limits: over.limits.or(self.limits),
            max_backoff: over.max_backoff.or(self.max_backoff),
            connect_timeout: over.connect_timeout.or(self.connect_timeout),
            grace: over.grace.or(self.grace),
            log_level: over.log_level.or(self.log_level),
            udp: over.udp.or(self.udp),
        }
    }

    /// The final configuration, or an error naming the flag, variable and file key of the
    /// first required setting that is missing.
    pub fn into_config(self) -> Result<AgentConfig, ConfigError> {
        let gateways = self.gateways.filter(|g| !g.is_empty()).ok_or_else(|| {
            missing(
                "no gateway address",
                "--gateway HOST:PORT",
                "BURROW_GATEWAY",
                "gateway",
            )
        })?;
        let key = match (self.key, &self.key_file) {
            (Some(_), Some(file)) => {
                return Err(ConfigError::Value(format!(
                    "both a key (--key, BURROW_KEY) and a key file ({}) are set: use one",
                    file.display()
                )))
            }
            (Some(key), None) => key,
            (None, Some(file)) => read_key_file(file)?,
            (None, None) => {
                return Err(missing(
                    "no agent key (the gateway prints one at its first start and with \
                     `burrow gateway --print-agent-line`, or make one with `burrow keygen`)",
                    "--key-file FILE or --key",
                    "BURROW_KEY_FILE or BURROW_KEY (both keep it out of `ps`)",
                    "key_file` or `key",
                ))
            }
        };
        let admin = AdminConfig {
            listen: self.admin,
            token: self.admin_token,
        };
        admin.check().map_err(ConfigError::Value)?;
        let trusts = self.trust.unwrap_or_default();
        if trusts.len() > 1 && trusts.len() != gateways.len() {
            return Err(ConfigError::Value(format!(
                "{} fingerprints or CAs for {} gateways: give one for every gateway, or one per \
                 gateway in the order of --gateway (BURROW_GATEWAY, `gateways`)",
                trusts.len(),
                gateways.len()
            )));
        }
        let several = gateways.len() > 1;
        let mut endpoints: Vec<GatewayEndpoint> = Vec::with_capacity(gateways.len());
        for (i, g) in gateways.into_iter().enumerate() {
            if endpoints.iter().any(|e| e.gateway == g.url) {
                return Err(ConfigError::Value(format!(
                    "gateway {} is listed twice: list each gateway once",
                    g.url
                )));
            }
            let named = |e: ConfigError| match e {
                ConfigError::Value(m) if several => {
                    ConfigError::Value(format!("gateway {}: {m}", g.url))
                }
                other => other,
            };
            let url = GatewayUrl::parse(&g.url).map_err(|e| ConfigError::Value(e.to_string()))?;
            let transport = match (url.scheme, self.transport) {
                (Scheme::Wss, Some(TransportKind::Tcp)) => {
                    return Err(named(ConfigError::Value(format!(
                        "the gateway {url} is wss://, which runs over TLS, but the transport is \
                         set to tcp: remove --transport tcp (BURROW_TRANSPORT, `transport`), or \
                         use ws://"
                    ))))
                }
                // The URL says it: tcp:// and ws:// carry no TLS of their own.
                (Scheme::Tcp | Scheme::Ws, _) => Some(TransportKind::Tcp),
                (Scheme::Tls | Scheme::Wss, t) => t,
                // QUIC always runs TLS 1.3 inside it.
                (Scheme::Quic | Scheme::Auto, Some(TransportKind::Tcp)) => {
                    return Err(named(ConfigError::Value(format!(
                        "the gateway {url} runs TLS inside QUIC, but the transport is set to \
                         tcp: remove --transport tcp (BURROW_TRANSPORT, `transport`), or use \
                         tcp://"
                    ))))
                }
                (Scheme::Quic | Scheme::Auto, t) => t,
            };
            // One fingerprint or CA for several gateways is for those that run TLS.
            let shared = match trusts.as_slice() {
                [_] if several && transport == Some(TransportKind::Tcp) => None,
                [one] => Some(one.clone()),
                many => many.get(i).cloned(),
            };
            let trust = resolve_trust(transport, g.trust.or(shared)).map_err(named)?;
            endpoints.push(GatewayEndpoint {
                gateway: g.url,
                trust,
                server_name: g.server_name.or_else(|| self.server_name.clone()),
            });
        }
        if several && !trusts.is_empty() && endpoints.iter().all(|e| e.trust == Trust::Plain) {
            return Err(ConfigError::Value(
                "a fingerprint or CA is set but every gateway is plain (tcp:// or ws://), \
                 which has no TLS to check: remove one of them"
                    .into(),
            ));
        }
        let mut endpoints = endpoints.into_iter();
        let Some(first) = endpoints.next() else {
            return Err(missing(
                "no gateway address",
                "--gateway HOST:PORT",
                "BURROW_GATEWAY",
                "gateway",
            ));
        };
        // No forwards is allowed: the agent then only checks that it can connect and
        // authenticate (the gateway prints such a line), and warns that it publishes nothing.
        let forwards = self.forwards.unwrap_or_default();
        check_forwards(&forwards).map_err(|(_, why)| ConfigError::Value(why))?;
        let private = PrivateConfig {
            services: self.private.unwrap_or_default(),
            allow: self.allow.unwrap_or_default(),
        };
        connector::check_private(&private.services).map_err(|(_, why)| ConfigError::Value(why))?;
        Ok(AgentConfig {
            gateway: first.gateway,
            key,
            trust: first.trust,
            server_name: first.server_name,
            extra_gateways: endpoints.collect(),
            proxy: self.proxy.unwrap_or_default(),
            forwards,
            private,
            limits: self.limits.unwrap_or_default(),
            max_backoff: self.max_backoff.unwrap_or(DEFAULT_MAX_BACKOFF),
            connect_timeout: self.connect_timeout.unwrap_or(DEFAULT_CONNECT_TIMEOUT),
            grace: self.grace.unwrap_or(DEFAULT_GRACE),
            udp: self.udp.unwrap_or_default(),
            key_file: self.key_file,
            admin,
        })
    }
}

/// Default longest pause between an agent's reconnect attempts.
pub const DEFAULT_MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Default time an agent's connect to a target may take.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default time streams may drain at shutdown.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(10);

fn set<T>(dst: &mut T, value: Option<T>) {
    if let Some(v) = value {
        *dst = v;
    }
}

fn missing(what: &str, flag: &str, env: &str, key: &str) -> ConfigError {
    ConfigError::Value(format!(
        "{what}: pass {flag}, set {env}, or set `{key}` in the config file (--config)"
    ))
}

/// Combines the transport and the trust setting into the agent's [`Trust`].
fn resolve_trust(
    transport: Option<TransportKind>,
    trust: Option<Trust>,
) -> Result<Trust, ConfigError> {
    match (transport.unwrap_or_default(), trust) {
        (TransportKind::Tls, Some(Trust::Plain)) => Err(ConfigError::Value(
            "plain TCP trust needs transport tcp".into(),
        )),
        (TransportKind::Tls, Some(trust)) => Ok(trust),
        (TransportKind::Tls, None) => Err(ConfigError::Value(
            "no way to verify the gateway: pass --fingerprint SHA256:HEX (the gateway prints it \
             at start) or --ca FILE, set BURROW_FINGERPRINT or BURROW_CA, or set `fingerprint` \
             or `ca` in the config file; use transport tcp only when the gateway sits behind a \
             TLS-terminating proxy"
                .into(),
        )),
        (TransportKind::Tcp, None | Some(Trust::Plain)) => Ok(Trust::Plain),
        (TransportKind::Tcp, Some(_)) => Err(ConfigError::Value(
            "a fingerprint or CA is set but the transport is tcp, which has no TLS to check: \
             remove one of them"
                .into(),
        )),
    }
}

// ---------------------------------------------------------------------------------------------
// Errors.

/// A configuration error, phrased for the user.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path} (check --config / BURROW_CONFIG)")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid: `<file> line <n>, key <key>: <what is wrong>`.
    #[error("{path} line {line}{}: {message}", key_part(.key))]
    Invalid {
        /// The file.
        path: PathBuf,
        /// 1-based line of the offending key or value.
        line: usize,
        /// Dotted path of the key, as in `agents[0].ports[1]`; empty when the file does not
        /// parse far enough to tell.
        key: String,
        /// What is wrong and what to do.
        message: String,
    },
    /// A flag or environment value is not valid, or a required setting is missing.
    #[error("{0}")]
    Value(String),
}

fn key_part(key: &str) -> String {
    if key.is_empty() {
        String::new()
    } else {
        format!(", key {key}")
    }
}

// ---------------------------------------------------------------------------------------------
// Files.

/// Reads a gateway config file.
pub fn load_gateway_file(path: &Path) -> Result<GatewaySettings, ConfigError> {
    let text = read(path)?;
    parse_gateway_file(path, &text)
}

/// Reads an agent config file.
pub fn load_agent_file(path: &Path) -> Result<AgentSettings, ConfigError> {
    let text = read(path)?;
    parse_agent_file(path, &text)
}

/// Parses the text of a gateway config file; `path` names it in errors and anchors its
/// relative paths.
pub fn parse_gateway_file(path: &Path, text: &str) -> Result<GatewaySettings, ConfigError> {
    let src = Source { path, text };
    let raw: RawGateway = src.deserialize()?;
    src.gateway(raw)
}

/// Parses the text of an agent config file; `path` names it in errors and anchors its
/// relative paths.
pub fn parse_agent_file(path: &Path, text: &str) -> Result<AgentSettings, ConfigError> {
    let src = Source { path, text };
    let raw: RawAgent = src.deserialize()?;
    src.agent(raw)
}

fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// A value that checks itself while the file is read, so its errors carry key and line.
trait FromToml: Sized {
    fn from_toml(v: &toml::Value) -> Result<Self, String>;
}

/// Reads a `T` through [`FromToml`].
struct Checked<T>(T);

impl<'de, T: FromToml> Deserialize<'de> for Checked<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = toml::Value::deserialize(d)?;
        T::from_toml(&v)
            .map(Checked)
            .map_err(serde::de::Error::custom)
    }
}

fn inner<T>(v: Option<Checked<T>>) -> Option<T> {
    v.map(|c| c.0)
}

fn text(v: &toml::Value) -> Result<&str, String> {
    v.as_str()
        .ok_or_else(|| format!("expected a string, found {} {v}", v.type_str()))
}

/// A label: not empty, no control characters.
struct Name(String);
/// A checked `gateway` address.
struct GatewayAddr(String);
/// A `SHA256:...` certificate fingerprint.
struct Fingerprint([u8; 32]);
/// A public port: 0 (the gateway chooses) to 65535.
struct PublicPort(u16);
/// A group name ([`parse_group`]).
struct Group(String);

macro_rules! from_text {
    ($($ty:ty => $parse:expr),* $(,)?) => {$(
        impl FromToml for $ty {
            fn from_toml(v: &toml::Value) -> Result<Self, String> {
                ($parse)(text(v)?)
            }
        }
    )*};
}

from_text! {
    SocketAddr => |s: &str| s.trim().parse().map_err(|_| {
        format!("{s:?} is not an address (use IP:PORT, e.g. 0.0.0.0:7443 or [::]:7443)")
    }),
    IpAddr => |s: &str| s.trim().parse().map_err(|_| {
        format!("{s:?} is not an IP address (use e.g. 0.0.0.0, :: or 203.0.113.5)")
    }),
    Duration => parse_duration,
    ipnet::IpNet => parse_net,
    Protocol => |s: &str| match s.trim().to_ascii_lowercase().as_str() {
        "tcp" => Ok(Protocol::Tcp),
        "udp" => Ok(Protocol::Udp),
        _ => Err(format!("{s:?} is not a protocol (use \"tcp\" or \"udp\")")),
    },
    SecretKey => parse_key,
    KeyHash => |s: &str| KeyHash::parse(s).map_err(|e| e.to_string()),
    Target => Target::parse,
    TransportKind => str::parse,
    LogLevel => str::parse,
    ProxyChoice => |s: &str| ProxyChoice::parse(s).map_err(|e| e.to_string()),
    GatewayAddr => |s: &str| parse_gateway_addr(s).map(GatewayAddr),
    Group => |s: &str| parse_group(s).map(Group),
    Fingerprint => |s: &str| {
        crate::tls::parse_fingerprint(s).map(Fingerprint).map_err(|e| e.to_string())
    },
    PathBuf => |s: &str| if s.is_empty() {
        Err("the path is empty".to_string())
    } else {
        Ok(PathBuf::from(s))
    },
    Name => |s: &str| if s.trim().is_empty() || s.chars().any(char::is_control) {
        Err(format!("{s:?} is not a usable name (not empty, no control characters)"))
    } else {
        Ok(Name(s.to_string()))
    },
}

impl FromToml for PortRange {
    fn from_toml(v: &toml::Value) -> Result<Self, String> {
        match v {
            toml::Value::String(s) => PortRange::parse(s),
            toml::Value::Integer(i) => u16::try_from(*i)
                .ok()
                .filter(|p| *p != 0)
                .map(|p| PortRange::tcp(p, p))
                .ok_or_else(|| format!("{i} is not a port (use 1-65535)")),
            other => Err(format!(
                "{other} is not a port or range (use 8080 or \"9000-9100\")"
            )),
        }
    }
}

impl FromToml for ProxyProtocol {
    fn from_toml(v: &toml::Value) -> Result<Self, String> {
        match v {
            toml::Value::Integer(1) => Ok(ProxyProtocol::V1),
            toml::Value::Integer(2) => Ok(ProxyProtocol::V2),
            toml::Value::String(s) => s.parse(),
            other => Err(format!(
                "{other} is not a PROXY protocol version (use \"v1\" or \"v2\")"
            )),
        }
    }
}

impl FromToml for crate::paths::PathPattern {
    fn from_toml(v: &toml::Value) -> Result<Self, String> {
        crate::paths::PathPattern::parse(text(v)?)
    }
}

/// A socket's mode: an octal integer (`0o660`) or the same as a string (`"0660"`), with no
/// bits past `0o777` (no setuid, setgid or sticky bit) and not readable or writable by others
/// unless asked for.
fn socket_mode(v: &toml::Value) -> Result<u32, String> {
    let mode = match v {
        toml::Value::Integer(i) => u32::try_from(*i).ok(),
        toml::Value::String(s) => u32::from_str_radix(s.trim().trim_start_matches("0o"), 8).ok(),
        _ => None,
    };
    mode.filter(|m| *m <= 0o777).ok_or_else(|| {
        format!("{v} is not a socket mode (write it in octal: socket_mode = 0o660 or \"0660\")")
    })
}

impl FromToml for PublicPort {
    fn from_toml(v: &toml::Value) -> Result<Self, String> {
        v.as_integer()
            .and_then(|i| u16::try_from(i).ok())
            .map(PublicPort)
            .ok_or_else(|| {
                format!("{v} is not a port (use 1-65535, or 0 to let the gateway choose)")
            })
    }
}

/// `[[agents]]` as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGrant {
    name: Spanned<Checked<Name>>,
    key: Option<Spanned<Checked<SecretKey>>>,
    key_hash: Option<Spanned<Checked<KeyHash>>>,
    ports: Option<Spanned<Vec<Spanned<toml::Value>>>>,
    paths: Option<Vec<Spanned<Checked<crate::paths::PathPattern>>>>,
    socket_mode: Option<Spanned<toml::Value>>,
}

/// `[[groups]]` as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGroup {
    name: Spanned<Checked<Group>>,
    agents: Spanned<Vec<Spanned<Checked<Name>>>>,
}

/// `[heartbeat]` as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHeartbeat {
    interval: Option<Spanned<Checked<Duration>>>,
    misses: Option<Spanned<u32>>,
}

/// `[limits]` as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_frame: Option<Spanned<u32>>,
    max_streams: Option<Spanned<u32>>,
    max_pending_opens: Option<Spanned<u32>>,
    max_preauth: Option<Spanned<u32>>,
    max_preauth_per_source: Option<Spanned<u32>>,
    max_public_conns: Option<Spanned<u32>>,
    max_public_conns_per_agent: Option<Spanned<u32>>,
    max_ports_per_agent: Option<Spanned<u32>>,
    handshake_timeout: Option<Spanned<Checked<Duration>>>,
    stream_window: Option<Spanned<u32>>,
    max_stream_window: Option<Spanned<u32>>,
    session_window: Option<Spanned<u32>>,
}

/// A gateway file as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGateway {
    listen: Option<Checked<SocketAddr>>,
    public_host: Option<Checked<IpAddr>>,
    public_name: Option<Checked<Name>>,
    state_dir: Option<Checked<PathBuf>>,
    allow_insecure_state: Option<bool>,
    transport: Option<Checked<TransportKind>>,
    tls_cert: Option<Checked<PathBuf>>,
    tls_key: Option<Checked<PathBuf>>,
    lease: Option<Checked<Duration>>,
    grace: Option<Checked<Duration>>,
    log_level: Option<Checked<LogLevel>>,
    heartbeat: Option<RawHeartbeat>,
    limits: Option<RawLimits>,
    agents: Option<Vec<Spanned<RawGrant>>>,
    connectors: Option<Vec<Spanned<connector::RawConnectorGrant>>>,
    groups: Option<Vec<Spanned<RawGroup>>>,
    ws_path: Option<Checked<Name>>,
    ws_listen: Option<Checked<SocketAddr>>,
    quic: Option<bool>,
    quic_listen: Option<Checked<SocketAddr>>,
    ws_trusted_proxies: Option<Vec<Checked<ipnet::IpNet>>>,
    udp: Option<RawUdp>,
    admin: Option<Checked<SocketAddr>>,
    admin_token: Option<Checked<AdminToken>>,
    log_format: Option<Checked<LogFormat>>,
}

/// `[udp]` as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUdp {
    idle: Option<Spanned<Checked<Duration>>>,
    max_flows: Option<Spanned<u32>>,
    max_datagram: Option<Spanned<u32>>,
    queue: Option<Spanned<u32>>,
}

/// `[[forwards]]` as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawForward {
    protocol: Option<Checked<Protocol>>,
    public_port: Option<Spanned<Checked<PublicPort>>>,
    target: Checked<Target>,
    name: Option<Checked<Name>>,
    /// `false`: a private service (no public port; connectors name it).
    public: Option<bool>,
    group: Option<Checked<Group>>,
    proxy_protocol: Option<Spanned<Checked<ProxyProtocol>>>,
    public_path: Option<Spanned<Checked<PathBuf>>>,
}

/// An agent file as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgent {
    gateway: Option<Checked<GatewayAddr>>,
    gateways: Option<Spanned<Vec<Spanned<GatewayEntry>>>>,
    key: Option<Checked<SecretKey>>,
    fingerprint: Option<Spanned<Checked<Fingerprint>>>,
    ca: Option<Spanned<Checked<PathBuf>>>,
    server_name: Option<Checked<Name>>,
    proxy: Option<Checked<ProxyChoice>>,
    transport: Option<Spanned<Checked<TransportKind>>>,
    max_backoff: Option<Spanned<Checked<Duration>>>,
    connect_timeout: Option<Spanned<Checked<Duration>>>,
    grace: Option<Checked<Duration>>,
    log_level: Option<Checked<LogLevel>>,
    limits: Option<RawLimits>,
    udp: Option<RawUdp>,
    forward: Option<Vec<Spanned<toml::Value>>>,
    forwards: Option<Vec<Spanned<ForwardTable>>>,
    private: Option<Vec<Spanned<toml::Value>>>,
    allow: Option<Vec<Checked<TargetPattern>>>,
    key_file: Option<Spanned<Checked<PathBuf>>>,
    admin: Option<Checked<SocketAddr>>,
    admin_token: Option<Checked<AdminToken>>,
    log_format: Option<Checked<LogFormat>>,
}

/// One entry of `gateways`: an address, or a table with `url` and the gateway's own
/// `fingerprint` or `ca` and `server_name`.
enum GatewayEntry {
    Addr(String),
    Table(RawGatewayTable),
}

/// A `gateways` table as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGatewayTable {
    url: Checked<GatewayAddr>,
    fingerprint: Option<Spanned<Checked<Fingerprint>>>,
    ca: Option<Spanned<Checked<PathBuf>>>,
    server_name: Option<Checked<Name>>,
}

impl<'de> Deserialize<'de> for GatewayEntry {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Entry;
        impl<'de> serde::de::Visitor<'de> for Entry {
            type Value = GatewayEntry;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(
                    "a gateway address, or a table with `url` (and `fingerprint` or `ca`, \
                     `server_name` if wanted)",
                )
            }

            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<GatewayEntry, E> {
                parse_gateway_addr(s)
                    .map(GatewayEntry::Addr)
                    .map_err(E::custom)
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<GatewayEntry, A::Error> {
                RawGatewayTable::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(GatewayEntry::Table)
            }
        }
        d.deserialize_any(Entry)
    }
}

/// One `[[forwards]]` entry: a table. A string here is a compact spec in the wrong key, one
/// letter away from `forward`, and is told so.
struct ForwardTable(RawForward);

impl<'de> Deserialize<'de> for ForwardTable {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Entry;
        impl<'de> serde::de::Visitor<'de> for Entry {
            type Value = ForwardTable;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a table with `target` (and `public_port`, `name`, `group` if wanted)")
            }

            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<ForwardTable, E> {
                Err(E::custom(format!(
                    "{s:?} is a compact spec, and those go in `forward = [...]` (did you mean \
                     `forward`?); a [[forwards]] entry is a table with `target = ...`"
                )))
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<ForwardTable, A::Error> {
                RawForward::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(ForwardTable)
            }
        }
        d.deserialize_any(Entry)
    }
}

/// The file being read: names it in errors and turns byte offsets into lines.
struct Source<'a> {
    path: &'a Path,
    text: &'a str,
}

impl Source<'_> {
    fn error(
        &self,
        span: Range<usize>,
        key: impl Into<String>,
        message: impl Into<String>,
    ) -> ConfigError {
        let end = span.start.min(self.text.len());
        let line = 1 + self.text.as_bytes()[..end]
            .iter()
            .filter(|b| **b == b'\n')
            .count();
        ConfigError::Invalid {
            path: self.path.to_path_buf(),
            line,
            key: key.into(),
            message: message.into(),
        }
    }

    /// Reads the raw structs; a serde error keeps the key path and the span.
    fn deserialize<T: DeserializeOwned>(&self) -> Result<T, ConfigError> {
        serde_path_to_error::deserialize(toml::Deserializer::new(self.text)).map_err(|e| {
            let key = key_path(e.path());
            let inner = e.into_inner();
            let span = inner.span().unwrap_or(0..0);
            let key = if key.is_empty() {
                self.key_on_line(span.start)
            } else {
                key
            };
            let message = explain(&key, inner.message());
            self.error(span, key, message)
        })
    }

    /// For syntax errors, where serde knows no path: the bare key on the line, if any.
    fn key_on_line(&self, offset: usize) -> String {
        let start = self.text[..offset.min(self.text.len())]
            .rfind('\n')
            .map_or(0, |i| i + 1);
        let line = self.text[start..].lines().next().unwrap_or("");
        let key = line.split_once('=').map_or("", |(k, _)| k.trim());
        let bare = key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b));
        if bare {
            key.to_string()
        } else {
            String::new()
        }
    }

    /// A path from the file, relative to the file's directory.
    fn resolve(&self, p: PathBuf) -> PathBuf {
        match self.path.parent() {
            Some(dir) if p.is_relative() => dir.join(p),
            _ => p,
        }
    }

    fn gateway(&self, raw: RawGateway) -> Result<GatewaySettings, ConfigError> {
        let agents = raw.agents.map(|a| self.agents(a)).transpose()?;
        // Connectors reach agents by name: the [[agents]] here, or the generated key's.
        let names: Vec<String> = match &agents {
            Some(a) if !a.is_empty() => a.iter().map(|g| g.name.clone()).collect(),
            _ => vec![crate::gateway::DEFAULT_AGENT_NAME.to_string()],
        };
        let connectors = raw
            .connectors
            .map(|c| self.connectors(c, &names))
            .transpose()?;
        let groups = raw
            .groups
            .map(|g| self.groups(g, agents.as_deref()))
            .transpose()?;
        Ok(GatewaySettings {
            listen: inner(raw.listen),
            public_host: inner(raw.public_host),
            public_name: inner(raw.public_name).map(|n| n.0),
            state_dir: inner(raw.state_dir).map(|p| self.resolve(p)),
            allow_insecure_state: raw.allow_insecure_state,
            transport: inner(raw.transport),
            tls_cert: inner(raw.tls_cert).map(|p| self.resolve(p)),
            tls_key: inner(raw.tls_key).map(|p| self.resolve(p)),
            agents,
            connectors,
            groups,
            limits: raw.limits.map(|l| self.limits(l)).transpose()?,
            heartbeat: raw.heartbeat.map(|h| self.heartbeat(h)).transpose()?,
            udp: raw.udp.map(|u| self.udp(u)).transpose()?,
            lease: inner(raw.lease),
            grace: inner(raw.grace),
            log_level: inner(raw.log_level),
            ws_path: inner(raw.ws_path).map(|n| n.0),
            ws_listen: inner(raw.ws_listen),
            quic: raw.quic,
            quic_listen: inner(raw.quic_listen),
            ws_trusted_proxies: raw
                .ws_trusted_proxies
                .map(|v| v.into_iter().map(|c| c.0).collect()),
            admin: inner(raw.admin),
            admin_token: inner(raw.admin_token),
            log_format: inner(raw.log_format),
        })
    }

    fn agents(&self, raw: Vec<Spanned<RawGrant>>) -> Result<Vec<AgentGrant>, ConfigError> {
        let mut out: Vec<AgentGrant> = Vec::with_capacity(raw.len());
        for (i, raw) in raw.into_iter().enumerate() {
            let at = format!("agents[{i}]");
            let name_span = raw.get_ref().name.span();
            let (grant, key_span, key_name) = self.grant(&at, raw)?;
            if let Some(j) = out.iter().position(|g| g.name == grant.name) {
                return Err(self.error(
                    name_span,
                    format!("{at}.name"),
                    format!(
                        "agents[{j}] already has the name {:?}: names must differ",
                        grant.name
                    ),
                ));
            }
            if let Some(j) = out.iter().position(|g| g.key.hash() == grant.key.hash()) {
                return Err(self.error(
                    key_span,
                    format!("{at}.{key_name}"),
                    format!(
                        "agents[{j}] ({:?}) has the same key: give each agent its own \
                         (`burrow keygen`)",
                        out[j].name
                    ),
                ));
            }
            out.push(grant);
        }
        Ok(out)
    }

    /// `[[groups]]`: names differ, and each agent named is one `agents` accepts (with no
    /// `[[agents]]`, the generated key's `default`).
    fn groups(
        &self,
        raw: Vec<Spanned<RawGroup>>,
        agents: Option<&[AgentGrant]>,
    ) -> Result<Vec<GroupGrant>, ConfigError> {
        let known: Vec<&str> = match agents {
            Some(a) => a.iter().map(|g| g.name.as_str()).collect(),
            None => vec![crate::gateway::DEFAULT_AGENT_NAME],
        };
        let mut out: Vec<GroupGrant> = Vec::with_capacity(raw.len());
        for (i, raw) in raw.into_iter().enumerate() {
            let at = format!("groups[{i}]");
            let raw = raw.into_inner();
            let name_span = raw.name.span();
            let name = raw.name.into_inner().0 .0;
            if let Some(j) = out.iter().position(|g| g.name == name) {
                return Err(self.error(
                    name_span,
                    format!("{at}.name"),
                    format!("groups[{j}] already has the name {name:?}: names must differ"),
                ));
            }
            let list_span = raw.agents.span();
            let mut members = Vec::new();
            for (j, a) in raw.agents.into_inner().into_iter().enumerate() {
                let span = a.span();
                let agent = a.into_inner().0 .0;
                if !known.contains(&agent.as_str()) {
                    return Err(self.error(
                        span,
                        format!("{at}.agents[{j}]"),
                        format!(
                            "no agent is named {agent:?} (the agents here: {})",
                            known.join(", ")
                        ),
                    ));
                }
                if !members.contains(&agent) {
                    members.push(agent);
                }
            }
            if members.is_empty() {
                return Err(self.error(
                    list_span,
                    format!("{at}.agents"),
                    "list the agents allowed in the group, e.g. agents = [\"web-1\", \"web-2\"]",
                ));
            }
            out.push(GroupGrant {
                name,
                agents: members,
            });
        }
        Ok(out)
    }

    /// One grant, with the span and name of its key field.
    fn grant(
        &self,
        at: &str,
        raw: Spanned<RawGrant>,
    ) -> Result<(AgentGrant, Range<usize>, &'static str), ConfigError> {
        let table = raw.span();
        let raw = raw.into_inner();
        let (key, key_span, key_name) = match (raw.key, raw.key_hash) {
            (Some(k), None) => (KeySpec::Key(k.get_ref().0.clone()), k.span(), "key"),
            (None, Some(h)) => (KeySpec::Hash(h.get_ref().0), h.span(), "key_hash"),
            (Some(_), Some(h)) => {
                return Err(self.error(
                    h.span(),
                    format!("{at}.key_hash"),
                    "set `key` or `key_hash`, not both (key_hash is safer to store: it cannot \
                     be used to log in)",
                ))
            }
            (None, None) => return Err(self.error(
                table,
                at,
                "set `key_hash` (`burrow keygen` makes a key and its hash; `burrow keygen --hash` \
                     gives the hash of an existing key) or the agent's `key`",
            )),
        };
        let paths: Vec<_> = raw
            .paths
            .unwrap_or_default()
            .into_iter()
            .map(|p| p.into_inner().0)
            .collect();
        let ports =
            match raw.ports {
                Some(ports) => self.ports(&format!("{at}.ports"), ports)?,
                None if !paths.is_empty() => Vec::new(),
                None => return Err(self.error(
                    table,
                    at,
                    "missing key `ports`: grant at least one port (ports = [8080, \"9000-9100\"]) \
                     or unix socket path (paths = [\"/run/burrow/*.sock\"])",
                )),
            };
        let socket_mode = match raw.socket_mode {
            None => DEFAULT_SOCKET_MODE,
            Some(v) => socket_mode(v.get_ref())
                .map_err(|why| self.error(v.span(), format!("{at}.socket_mode"), why))?,
        };
        let grant = AgentGrant {
            name: raw.name.into_inner().0 .0,
            key,
            ports,
            paths,
            socket_mode,
        };
        Ok((grant, key_span, key_name))
    }

    fn ports(
        &self,
        at: &str,
        raw: Spanned<Vec<Spanned<toml::Value>>>,
    ) -> Result<Vec<PortRange>, ConfigError> {
        if raw.get_ref().is_empty() {
            return Err(self.error(
                raw.span(),
                at,
                "grant at least one port, e.g. ports = [8080, \"9000-9100\"]",
            ));
        }
        raw.into_inner()
            .into_iter()
            .enumerate()
            .map(|(j, v)| {
                PortRange::from_toml(v.get_ref())
                    .map_err(|why| self.error(v.span(), format!("{at}[{j}]"), why))
            })
            .collect()
    }

    fn heartbeat(&self, raw: RawHeartbeat) -> Result<Heartbeat, ConfigError> {
        let mut h = Heartbeat::default();
        if let Some(v) = raw.interval {
            h.interval = v.get_ref().0;
            let ms = h.interval.as_millis();
            if !(50..=u128::from(u32::MAX)).contains(&ms) {
                return Err(self.error(
                    v.span(),
                    "heartbeat.interval",
                    "must be from 50ms to 49 days (default 10s)",
                ));
            }
        }
        if let Some(v) = raw.misses {
            h.misses = *v.get_ref();
            if h.misses == 0 {
                return Err(self.error(
                    v.span(),
                    "heartbeat.misses",
                    "must be at least 1 (default 3)",
                ));
            }
        }
        Ok(h)
    }

    fn limits(&self, raw: RawLimits) -> Result<Limits, ConfigError> {
        let mut l = Limits::default();
        let mut spans: Vec<(&str, Range<usize>)> = Vec::new();
        let mut take = |name, dst: &mut u32, v: Option<Spanned<u32>>| {
            if let Some(v) = v {
                spans.push((name, v.span()));
                *dst = v.into_inner();
            }
        };
        take("max_frame", &mut l.max_frame, raw.max_frame);
        take("max_streams", &mut l.max_streams, raw.max_streams);
        take(
            "max_pending_opens",
            &mut l.max_pending_opens,
            raw.max_pending_opens,
        );
        take("max_preauth", &mut l.max_preauth, raw.max_preauth);
        take(
            "max_preauth_per_source",
            &mut l.max_preauth_per_source,
            raw.max_preauth_per_source,
        );
        take(
            "max_public_conns",
            &mut l.max_public_conns,
            raw.max_public_conns,
        );
        take(
            "max_public_conns_per_agent",
            &mut l.max_public_conns_per_agent,
            raw.max_public_conns_per_agent,
        );
        take(
            "max_ports_per_agent",
            &mut l.max_ports_per_agent,
            raw.max_ports_per_agent,
        );
        take("stream_window", &mut l.stream_window, raw.stream_window);
        take(
            "max_stream_window",
            &mut l.max_stream_window,
            raw.max_stream_window,
        );
        take("session_window", &mut l.session_window, raw.session_window);
        if let Some(v) = raw.handshake_timeout {
            spans.push(("handshake_timeout", v.span()));
            l.handshake_timeout = v.get_ref().0;
        }
        for (keys, ok, why) in limit_rules(&l) {
            if ok {
                continue;
            }
            // A rule breaks only when the file changed one of its keys: defaults are sound.
            let (key, span) = keys
                .iter()
                .find_map(|k| spans.iter().find(|(n, _)| n == k))
                .cloned()
                .unwrap_or(("", 0..0));
            return Err(self.error(span, format!("limits.{key}"), why));
        }
        Ok(l)
    }

    fn agent(&self, raw: RawAgent) -> Result<AgentSettings, ConfigError> {
        let transport = raw.transport.map(|t| t.into_inner().0);
        let trust = self.trust(raw.fingerprint, raw.ca, transport)?;
        for (key, value, default) in [
            ("max_backoff", &raw.max_backoff, "30s"),
            ("connect_timeout", &raw.connect_timeout, "10s"),
        ] {
            if let Some(v) = value.as_ref().filter(|v| v.get_ref().0.is_zero()) {
                return Err(self.error(
                    v.span(),
                    key,
                    format!("must be more than 0 (default {default})"),
                ));
            }
        }
        if let (Some(_), Some(file)) = (&raw.key, &raw.key_file) {
            return Err(self.error(
                file.span(),
                "key_file",
                "set `key` or `key_file`, not both (key_file keeps the key out of this file)",
            ));
        }
        let (forwards, mut private) = self.forwards(raw.forward, raw.forwards)?;
        if let Some(compact) = raw.private {
            let mut list = Vec::new();
            for (i, v) in compact.into_iter().enumerate() {
                let p = text(v.get_ref())
                    .and_then(parse_private)
                    .map_err(|why| self.error(v.span(), format!("private[{i}]"), why))?;
                list.push((p, (format!("private[{i}]"), v.span())));
            }
            // The compact ones first, then the [[forwards]] tables, as written.
            list.append(&mut private);
            private = list;
        }
        let private = if private.is_empty() {
            None
        } else {
            if let Err((i, why)) = connector::check_private(
                &private.iter().map(|(p, _)| p.clone()).collect::<Vec<_>>(),
            ) {
                let (key, span) = private.swap_remove(i).1;
                return Err(self.error(span, key, why));
            }
            Some(private.into_iter().map(|(p, _)| p).collect())
        };
        let gateways = match (raw.gateway, raw.gateways) {
            (Some(_), Some(list)) => {
                return Err(self.error(
                    list.span(),
                    "gateways",
                    "set `gateway` or `gateways`, not both (`gateways` lists every gateway)",
                ))
            }
            (Some(g), None) => Some(vec![GatewaySetting::new(g.0 .0)]),
            (None, Some(list)) => Some(self.gateways(list)?),
            (None, None) => None,
        };
        Ok(AgentSettings {
            gateways,
            key: inner(raw.key),
            private,
            allow: raw.allow.map(|v| v.into_iter().map(|c| c.0).collect()),
            key_file: raw.key_file.map(|f| self.resolve(f.into_inner().0)),
            admin: inner(raw.admin),
            admin_token: inner(raw.admin_token),
            log_format: inner(raw.log_format),
            trust: trust.map(|t| vec![t]),
            transport,
            server_name: inner(raw.server_name).map(|n| n.0),
            proxy: inner(raw.proxy),
            forwards,
            limits: raw.limits.map(|l| self.limits(l)).transpose()?,
            max_backoff: raw.max_backoff.map(|v| v.into_inner().0),
            connect_timeout: raw.connect_timeout.map(|v| v.into_inner().0),
            grace: inner(raw.grace),
            log_level: inner(raw.log_level),
            udp: raw.udp.map(|u| self.udp(u)).transpose()?,
        })
    }

    /// `gateways = [...]`: addresses, or tables with a gateway's own trust and server name.
    fn gateways(
        &self,
        list: Spanned<Vec<Spanned<GatewayEntry>>>,
    ) -> Result<Vec<GatewaySetting>, ConfigError> {
        if list.get_ref().is_empty() {
            return Err(self.error(
                list.span(),
                "gateways",
                "list at least one gateway, e.g. gateways = [\"gw1.example.com:7443\", \
                 \"gw2.example.com:7443\"]",
            ));
        }
        let mut out = Vec::new();
        for entry in list.into_inner() {
            out.push(match entry.into_inner() {
                GatewayEntry::Addr(url) => GatewaySetting::new(url),
                GatewayEntry::Table(t) => GatewaySetting {
                    url: t.url.0 .0,
                    trust: self.trust(t.fingerprint, t.ca, None)?,
                    server_name: inner(t.server_name).map(|n| n.0),
                },
            });
        }
        Ok(out)
    }

    /// `[udp]`, each key checked against its range.
    fn udp(&self, raw: RawUdp) -> Result<crate::udp::UdpSettings, ConfigError> {
        let mut u = crate::udp::UdpSettings::default();
        if let Some(v) = raw.idle {
            u.idle = v.get_ref().0;
            if u.idle < Duration::from_millis(100) {
                return Err(self.error(
                    v.span(),
                    "udp.idle",
                    "must be at least 100ms (default 60s)",
                ));
            }
        }
        let ranged = |v: Option<Spanned<u32>>, key: &str, lo: u32, hi: u32, default: &str| match v {
            None => Ok(None),
            Some(v) if (lo..=hi).contains(v.get_ref()) => Ok(Some(*v.get_ref() as usize)),
            Some(v) => Err(self.error(
                v.span(),
                key,
                format!("must be from {lo} to {hi} (default {default})"),
            )),
        };
        if let Some(n) = ranged(raw.max_flows, "udp.max_flows", 1, 1_000_000, "4096")? {
            u.max_flows = n;
        }
        let max = burrow_proto::message::MAX_DATAGRAM as u32;
        if let Some(n) = ranged(raw.max_datagram, "udp.max_datagram", 1, max, "65507")? {
            u.max_datagram = n;
        }
        if let Some(n) = ranged(raw.queue, "udp.queue", 4096, 64 << 20, "262144")? {
            u.queue = n;
        }
        Ok(u)
    }

    fn trust(
        &self,
        fingerprint: Option<Spanned<Checked<Fingerprint>>>,
        ca: Option<Spanned<Checked<PathBuf>>>,
        transport: Option<TransportKind>,
    ) -> Result<Option<Trust>, ConfigError> {
        let (trust, span, key) = match (fingerprint, ca) {
            (Some(_), Some(ca)) => {
                return Err(self.error(ca.span(), "ca", "set `fingerprint` or `ca`, not both"))
            }
            (Some(fp), None) => (
                Trust::Fingerprint(fp.get_ref().0 .0),
                fp.span(),
                "fingerprint",
            ),
            (None, Some(ca)) => {
                let span = ca.span();
                let path = ca.into_inner().0;
                let trust = match Trust::ca(path) {
                    Trust::Ca(path) => Trust::Ca(self.resolve(path)),
                    system => system,
                };
                (trust, span, "ca")
            }
            (None, None) => return Ok(None),
        };
        if transport == Some(TransportKind::Tcp) {
            return Err(self.error(
                span,
                key,
                format!("transport = \"tcp\" has no TLS to check: remove `{key}` or the transport"),
            ));
        }
        Ok(Some(trust))
    }

    /// `forward = [...]` then `[[forwards]]`, in file order; `[[forwards]]` with
    /// `public = false` are private services, returned apart with their key and span.
    #[allow(clippy::type_complexity)]
    fn forwards(
        &self,
        compact: Option<Vec<Spanned<toml::Value>>>,
        tables: Option<Vec<Spanned<ForwardTable>>>,
    ) -> Result<
        (
            Option<Vec<Forward>>,
            Vec<(PrivateService, (String, Range<usize>))>,
        ),
        ConfigError,
    > {
        let mut private = Vec::new();
        if compact.is_none() && tables.is_none() {
            return Ok((None, private));
        }
        let has_compact = compact.is_some();
        let mut out = Vec::new();
        let mut at = Vec::new();
        for (i, v) in compact.unwrap_or_default().into_iter().enumerate() {
            let key = format!("forward[{i}]");
            let f = match v.get_ref() {
                toml::Value::Table(_) => Err(
                    "a table belongs in [[forwards]] (did you mean `forwards`?); `forward` takes \
                     strings such as \"8080=127.0.0.1:80\""
                        .to_string(),
                ),
                other => text(other).and_then(parse_forward),
            }
            .map_err(|why| self.error(v.span(), key.as_str(), why))?;
            out.push(f);
            at.push((key, v.span()));
        }
        for (i, v) in tables.unwrap_or_default().into_iter().enumerate() {
            let span = v.span();
            let raw = v.into_inner().0;
            if raw.public == Some(false) {
                let p = self.private_table(i, span.clone(), raw)?;
                private.push((p, (format!("forwards[{i}]"), span)));
                continue;
            }
            let protocol = inner(raw.protocol).unwrap_or(Protocol::Tcp);
            let public_port = raw.public_port.as_ref().map_or(0, |p| p.get_ref().0 .0);
            let target = raw.target.0;
            if protocol == Protocol::Udp && matches!(target, Target::Unix(_)) {
                return Err(self.error(
                    span,
                    format!("forwards[{i}].target"),
                    "a UDP forward goes to HOST:PORT, not a unix socket",
                ));
            }
            let proxy_protocol =
                match raw.proxy_protocol {
                    Some(pp) if protocol == Protocol::Udp => return Err(self.error(
                        pp.span(),
                        format!("forwards[{i}].proxy_protocol"),
                        "a PROXY protocol header goes before a TCP stream; a UDP forward cannot \
                         carry one",
                    )),
                    pp => pp.map(|p| p.into_inner().0),
                };
            let public_path = match raw.public_path {
                None => None,
                Some(p) => {
                    let key = format!("forwards[{i}].public_path");
                    let why = if protocol == Protocol::Udp {
                        Some("a UDP forward's public end is a port, not a unix socket".to_string())
                    } else if raw.public_port.is_some() {
                        Some(
                            "set `public_port` or `public_path`, not both: the public end is a \
                             port or a unix socket on the gateway"
                                .to_string(),
                        )
                    } else {
                        crate::paths::check_socket_path(&p.get_ref().0).err()
                    };
                    if let Some(why) = why {
                        return Err(self.error(p.span(), key, why));
                    }
                    Some(p.into_inner().0)
                }
            };
            let group = inner(raw.group).map(|g| g.0);
            if public_path.is_some() && group.is_some() {
                return Err(self.error(
                    span,
                    format!("forwards[{i}].group"),
                    "a group shares a public port; a unix socket on the gateway cannot join one \
                     (drop `group` or `public_path`)",
                ));
            }
            let name = inner(raw.name).map_or_else(
                || forward_name(protocol, public_port, public_path.as_deref(), &target),
                |n| n.0,
            );
            out.push(Forward {
                protocol,
                public_port,
                target,
                name,
                group,
                proxy_protocol,
                public_path,
            });
            at.push((format!("forwards[{i}]"), span));
        }
        if let Err((i, why)) = check_forwards(&out) {
            let (key, span) = at.swap_remove(i);
            return Err(self.error(span, key, why));
        }
        if out.is_empty() && !has_compact {
            // Only private services: the file sets no public forwards.
            return Ok((None, private));
        }
        Ok((Some(out), private))
    }

    /// A `[[forwards]]` entry with `public = false`: a private service.
    fn private_table(
        &self,
        i: usize,
        span: Range<usize>,
        raw: RawForward,
    ) -> Result<PrivateService, ConfigError> {
        let at = format!("forwards[{i}]");
        if raw.public_port.is_some() {
            return Err(self.error(
                span,
                format!("{at}.public_port"),
                "a private service (public = false) has no public port: remove one of the two",
            ));
        }
        if inner(raw.protocol) == Some(Protocol::Udp) {
            return Err(self.error(
                span,
                format!("{at}.protocol"),
                "private services are TCP: connectors carry streams, not datagrams",
            ));
        }
        let Some(name) = inner(raw.name) else {
            return Err(self.error(
                span,
                format!("{at}.name"),
                "a private service (public = false) needs a `name`: connectors reach it as \
                 AGENT/NAME",
            ));
        };
        check_service_name(&name.0)
            .map_err(|why| self.error(span.clone(), format!("{at}.name"), why))?;
        if let Some(p) = raw.public_path {
            return Err(self.error(
                p.span(),
                format!("{at}.public_path"),
                "a private service (public = false) has no public end: remove one of the two",
            ));
        }
        Ok(PrivateService {
            name: name.0,
            target: raw.target.0,
            proxy_protocol: raw.proxy_protocol.map(|p| p.into_inner().0),
        })
    }
}

/// The checks on `[limits]`: the keys involved (the first set in the file is blamed), whether
/// the rule holds, and what to do. They mirror what peers enforce on session parameters.
fn limit_rules(l: &Limits) -> Vec<(&'static [&'static str], bool, String)> {
    let credit = u32::try_from(MAX_CREDIT).unwrap_or(u32::MAX);
    vec![
        (
            &["max_frame"],
            (1024..=ABSOLUTE_MAX_PAYLOAD).contains(&l.max_frame),
            format!("must be from 1024 to {ABSOLUTE_MAX_PAYLOAD} (default 65536)"),
        ),
        (
            &["max_streams"],
            l.max_streams >= 1,
            "must be at least 1 (default 16384)".into(),
        ),
        (
            &["max_pending_opens"],
            l.max_pending_opens >= 1,
            "must be at least 1 (default 256)".into(),
        ),
        (
            &["max_preauth"],
            l.max_preauth >= 1,
            "must be at least 1 (default 256)".into(),
        ),
        (
            &["max_preauth_per_source"],
            l.max_preauth_per_source >= 1,
            "must be at least 1 (default 8; more than max_preauth acts as max_preauth)".into(),
        ),
        (
            &["max_public_conns"],
            l.max_public_conns >= 1,
            "must be at least 1 (default 32768)".into(),
        ),
        (
            &["max_public_conns_per_agent"],
            l.max_public_conns_per_agent >= 1,
            "must be at least 1 (default 16384)".into(),
        ),
        (
            &["max_ports_per_agent"],
            l.max_ports_per_agent >= 1,
            "must be at least 1 (default 256)".into(),
        ),
        (
            &["handshake_timeout"],
            !l.handshake_timeout.is_zero(),
            "must be more than 0 (default 10s)".into(),
        ),
        (
            &["stream_window"],
            (1024..=credit).contains(&l.stream_window),
            format!("must be from 1024 to {credit} (default 262144)"),
        ),
        (
            &["max_stream_window", "stream_window"],
            (l.stream_window..=credit).contains(&l.max_stream_window),
            format!(
                "max_stream_window ({}) must be from stream_window ({}) to {credit}",
                l.max_stream_window, l.stream_window
            ),
        ),
        (
            &["session_window", "stream_window"],
            (l.stream_window..=credit).contains(&l.session_window),
            format!(
                "session_window ({}) must be from stream_window ({}) to {credit}",
                l.session_window, l.stream_window
            ),
        ),
    ]
}

/// `agents[0].ports[1]` from serde's path, without `Spanned`'s private fields.
fn key_path(path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    let mut out = String::new();
    for segment in path.iter() {
        match segment {
            Segment::Seq { index } => {
                let _ = write!(out, "[{index}]");
            }
            Segment::Map { key } | Segment::Enum { variant: key } => {
                if key.starts_with("$__serde_spanned") {
                    continue;
                }
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(key);
            }
            Segment::Unknown => {}
        }
    }
    out
}

/// serde's wording, in the words of a config file, with a suggestion for a misspelt key and
/// for a value of the wrong shape. `key` is the path of the key at fault.
fn explain(key: &str, message: &str) -> String {
    if let Some(rest) = message.strip_prefix("missing field ") {
        return format!("missing key {rest}");
    }
    if let Some(rest) = message.strip_prefix("invalid type: ") {
        // "string \"x\", expected a sequence": what was found, then what was expected.
        let (found, expected) = rest.rsplit_once(", expected ").unwrap_or((rest, ""));
        let shape = if expected.starts_with("struct ") {
            "a table".to_string()
        } else if expected == "a sequence" {
            "a list in brackets".to_string()
        } else {
            expected.to_string()
        };
        let hint = match (key, shape.as_str()) {
            ("forward", "a list in brackets") => {
                let example = found
                    .strip_prefix("string ")
                    .unwrap_or("\"8080=127.0.0.1:80\"");
                format!(": write forward = [{example}]")
            }
            ("forwards", "a list in brackets") => {
                ": each entry is a [[forwards]] table (two brackets), or use forward = [...]"
                    .to_string()
            }
            (_, "a table") => format!(": write it as a [{key}] section"),
            _ => String::new(),
        };
        return format!("expected {shape}, found {found}{hint}");
    }
    let Some(rest) = message.strip_prefix("unknown field ") else {
        return message.to_string();
    };
    // "`bad`, expected one of `a`, `b`": the quoted words are the key, then the known ones.
    let quoted: Vec<&str> = rest.split('`').skip(1).step_by(2).collect();
    let Some((unknown, known)) = quoted.split_first() else {
        return message.replace("field", "key");
    };
    match known.iter().min_by_key(|k| edit_distance(unknown, k)) {
        Some(best) if edit_distance(unknown, best) <= 2 => {
            format!("unknown key `{unknown}`: did you mean `{best}`?")
        }
        Some(_) => format!("unknown key `{unknown}` (known here: {})", known.join(", ")),
        None => format!("unknown key `{unknown}`"),
    }
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let replace = prev[j] + usize::from(ca != *cb);
            cur[j + 1] = replace.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_dir_prefers_root_then_xdg_then_home() {
        let p = |s: &str| Some(PathBuf::from(s));
        assert_eq!(
            state_dir_for(true, p("/x"), p("/h")),
            PathBuf::from("/var/lib/burrow")
        );
        assert_eq!(
            state_dir_for(false, p("/x"), p("/h")),
            PathBuf::from("/x/burrow")
        );
        assert_eq!(
            state_dir_for(false, p("relative"), p("/h")),
            PathBuf::from("/h/.local/state/burrow")
        );
        assert_eq!(
            state_dir_for(false, None, p("/h")),
            PathBuf::from("/h/.local/state/burrow")
        );
        assert_eq!(
            state_dir_for(false, None, None),
            PathBuf::from("burrow-state")
        );
    }

    #[test]
    fn explain_suggests_the_closest_key() {
        assert_eq!(
            explain(
                "limits",
                "unknown field `max_fram`, expected one of `max_frame`, `max_streams`"
            ),
            "unknown key `max_fram`: did you mean `max_frame`?"
        );
        assert_eq!(
            explain("agents[0]", "unknown field `zzz`, expected `name`"),
            "unknown key `zzz` (known here: name)"
        );
        assert_eq!(
            explain("forwards[0]", "missing field `target`"),
            "missing key `target`"
        );
    }

    #[test]
    fn edit_distance_counts_edits() {
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("", "ab"), 2);
        assert_eq!(edit_distance("same", "same"), 0);
    }
}
