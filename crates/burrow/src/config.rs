//! Typed configuration for every role.
//!
//! Flags, environment variables (`BURROW_<FLAG>`) and the TOML file all end in these structs:
//! the CLI parses flags and environment with clap, loads the file with [`load_file`], and
//! overlays the flags on the file. Unknown keys and bad values are rejected with the file,
//! line and key named.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use burrow_proto::auth::{KeyHash, SecretKey};
use burrow_proto::message::SessionParams;
use serde::Deserialize;

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

/// An inclusive range of public ports (`8080` or `9000-9100`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    /// First port.
    pub start: u16,
    /// Last port (inclusive).
    pub end: u16,
}

impl PortRange {
    /// Every port from 1024 to 65535: the default grant of the generated key.
    pub const UNPRIVILEGED: PortRange = PortRange {
        start: 1024,
        end: 65535,
    };

    /// Whether `port` is inside.
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
}

impl AgentGrant {
    /// Whether this agent may bind `port` (0 = any port of its grant).
    pub fn allows(&self, port: u16) -> bool {
        port == 0 || self.ports.iter().any(|r| r.contains(port))
    }
}

/// Limits on what a peer controls. Every field has a documented default.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Largest frame payload (default 64 KiB).
    pub max_frame: u32,
    /// Most concurrent streams in one session (default 4096).
    pub max_streams: u32,
    /// Most streams an agent is connecting to targets at once (default 256).
    pub max_pending_opens: u32,
    /// Most tunnel connections that have not yet authenticated (default 256).
    pub max_preauth: u32,
    /// Time a new tunnel connection has to finish TLS and authentication (default 10 s).
    pub handshake_timeout: Duration,
    /// Initial per-stream window (default 256 KiB).
    pub stream_window: u32,
    /// Per-stream window cap after auto-tuning (default 4 MiB).
    pub max_stream_window: u32,
    /// Session-wide receive window (default 32 MiB).
    pub session_window: u32,
}

impl Default for Limits {
    fn default() -> Self {
        let p = SessionParams::default();
        Limits {
            max_frame: p.max_payload,
            max_streams: p.max_streams,
            max_pending_opens: 256,
            max_preauth: 256,
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
    /// TLS (default) or plain TCP.
    pub transport: TransportKind,
    /// A CA-signed certificate chain (PEM) to serve instead of the self-signed one.
    pub tls_cert: Option<PathBuf>,
    /// The private key (PEM) for `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// Agents accepted. Empty: the generated key from the state dir, granted ports 1024-65535.
    pub agents: Vec<AgentGrant>,
    /// Limits on peers.
    pub limits: Limits,
    /// Heartbeats.
    pub heartbeat: Heartbeat,
    /// How long a dropped agent's public ports stay reserved for it (default 60 s).
    pub lease: Duration,
    /// How long streams may drain at shutdown (default 10 s).
    pub grace: Duration,
}

impl GatewayConfig {
    /// Defaults for everything, with `state_dir`.
    pub fn new(state_dir: PathBuf) -> Self {
        GatewayConfig {
            listen: SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), DEFAULT_TUNNEL_PORT),
            public_host: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            public_name: None,
            state_dir,
            transport: TransportKind::Tls,
            tls_cert: None,
            tls_key: None,
            agents: Vec::new(),
            limits: Limits::default(),
            heartbeat: Heartbeat::default(),
            lease: Duration::from_secs(60),
            grace: Duration::from_secs(10),
        }
    }
}

/// How the agent checks the gateway's certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trust {
    /// `SHA256:<hex>` of the gateway's certificate (DER).
    Fingerprint([u8; 32]),
    /// A CA bundle (PEM) that signed the gateway's certificate.
    Ca(PathBuf),
    /// Plain TCP: no TLS at all.
    Plain,
}

/// One service an agent publishes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forward {
    /// Public port asked for; 0 lets the gateway choose.
    pub public_port: u16,
    /// Where streams go.
    pub target: Target,
    /// A label for logs (default: the spec as written).
    pub name: String,
}

/// Everything an agent needs.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// `host:port` of the gateway.
    pub gateway: String,
    /// The agent's key.
    pub key: SecretKey,
    /// How the gateway's certificate is checked.
    pub trust: Trust,
    /// TLS server name to send (default: the host part of `gateway`).
    pub server_name: Option<String>,
    /// Services.
    pub forwards: Vec<Forward>,
    /// Limits on what the gateway may ask of us.
    pub limits: Limits,
    /// Longest pause between reconnect attempts (default 30 s).
    pub max_backoff: Duration,
    /// How long streams may drain at shutdown (default 10 s).
    pub grace: Duration,
}

/// A configuration error, phrased for the user.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid, with file, line and key.
    #[error("{path}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Line, key and what is wrong.
        message: String,
    },
    /// A flag or environment value is not valid.
    #[error("{0}")]
    Value(String),
}

/// Placeholder until the loader lands; returns an error naming the file.
pub fn load_file(path: &Path) -> Result<toml::Table, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    text.parse::<toml::Table>()
        .map_err(|e| ConfigError::Invalid {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
}
