//! `burrow connect`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context as _};
use burrow::config::{
    self, ConnectForward, ConnectorSettings, LogFormat, LogLevel, TransportKind, Trust,
};
use burrow::connector::{Connector, ConnectorStatus, ForwardState};
use burrow::transport::ProxyChoice;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::run;

/// Flags of `burrow connect`; each also reads `BURROW_<FLAG>`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The gateway's tunnel address, HOST:PORT, or a URL as for `burrow agent`
    #[arg(long, env = "BURROW_GATEWAY", value_name = "HOST:PORT", value_parser = config::parse_gateway_addr)]
    gateway: Option<String>,

    /// The connector's key, bk_... (`burrow keygen`; its key_hash goes in the gateway's
    /// [[connectors]] entry). Prefer --key-file, BURROW_KEY or the config file: command lines
    /// are visible to other local users (`ps`)
    #[arg(long, env = "BURROW_KEY", value_name = "KEY", hide_env_values = true)]
    key: Option<String>,

    /// Read the connector's key from FILE (just the key, bk_...)
    #[arg(long, env = "BURROW_KEY_FILE", value_name = "FILE")]
    key_file: Option<PathBuf>,

    /// Pin the gateway's certificate, SHA256:HEX (the gateway prints it at start)
    #[arg(long, env = "BURROW_FINGERPRINT", value_name = "SHA256:HEX", value_parser = crate::agent::parse_fingerprint)]
    fingerprint: Option<[u8; 32]>,

    /// Trust a CA bundle (PEM) that signed the gateway's certificate, instead of
    /// --fingerprint (`system` for the system's store)
    #[arg(long, env = "BURROW_CA", value_name = "FILE")]
    ca: Option<PathBuf>,

    /// Tunnel transport: tls, or tcp only when the gateway sits behind a TLS-terminating
    /// proxy [default: tls]
    #[arg(long, env = "BURROW_TRANSPORT", value_name = "TRANSPORT", value_parser = crate::gateway::transport_parser())]
    transport: Option<TransportKind>,

    // Help as an attribute: rustdoc would read `[ipv6]` as a link.
    #[arg(
        long = "forward",
        env = "BURROW_FORWARD",
        value_name = "LISTEN=AGENT/SERVICE",
        value_delimiter = ',',
        value_parser = parse_forward_entry,
        help = "Listen on LISTEN and take each connection to SERVICE, a private service of \
                AGENT (its name on the gateway), or to HOST:PORT as AGENT/HOST:PORT where the \
                agent allows it. LISTEN is PORT (on 127.0.0.1), ADDRESS:PORT, [ipv6]:PORT or \
                unix:/path/to.sock. Repeat the flag, or separate specs with commas (also in \
                BURROW_FORWARD)"
    )]
    forwards: Vec<ForwardEntry>,

    /// TLS server name to send [default: the host of --gateway]
    #[arg(long, env = "BURROW_SERVER_NAME", value_name = "NAME")]
    server_name: Option<String>,

    /// Reach the gateway through a proxy, as for `burrow agent` (socks5://, socks5h://,
    /// http://, or none) [default: HTTPS_PROXY, ALL_PROXY and NO_PROXY, as curl reads them]
    #[arg(long, env = "BURROW_PROXY", value_name = "URL", hide_env_values = true)]
    proxy: Option<String>,

    /// Longest pause between reconnect attempts, e.g. 30s or 2m [default: 30s]
    #[arg(long, env = "BURROW_MAX_BACKOFF", value_name = "DURATION", value_parser = config::parse_duration)]
    max_backoff: Option<Duration>,

    /// TOML config file; flags and environment variables override its keys.
    #[arg(long, env = "BURROW_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,

    /// How much to log [default: info, or RUST_LOG when set]
    #[arg(long, env = "BURROW_LOG_LEVEL", value_name = "LEVEL", value_parser = crate::log_level_parser())]
    log_level: Option<LogLevel>,

    /// Log format: text, or json (one object a line, for log shippers) [default: text]
    #[arg(long, env = "BURROW_LOG_FORMAT", value_name = "FORMAT", value_parser = crate::log_format_parser())]
    log_format: Option<LogFormat>,

    /// Print the effective configuration as a config file (TOML, keys masked) and exit
    /// without starting.
    #[arg(long)]
    print_config: bool,
}

/// One `--forward` entry; nothing for an empty one (a trailing comma, `${X:-}`).
#[derive(Debug, Clone)]
struct ForwardEntry(Option<ConnectForward>);

fn parse_forward_entry(s: &str) -> Result<ForwardEntry, String> {
    match s.trim() {
        "" => Ok(ForwardEntry(None)),
        s => config::parse_connect_forward(s).map(|f| ForwardEntry(Some(f))),
    }
}

impl Args {
    /// The layer flags and environment make.
    fn settings(&self) -> anyhow::Result<ConnectorSettings> {
        // Parsed here rather than by clap, whose errors would echo the key.
        let key = match &self.key {
            Some(k) => Some(
                config::parse_key(k)
                    .map_err(anyhow::Error::msg)
                    .context("--key / BURROW_KEY")?,
            ),
            None => None,
        };
        let trust = match (self.fingerprint, &self.ca) {
            (Some(_), Some(_)) => bail!(
                "--fingerprint (BURROW_FINGERPRINT) and --ca (BURROW_CA) are both set: use one"
            ),
            (Some(fp), None) => Some(Trust::Fingerprint(fp)),
            (None, Some(ca)) => Some(Trust::ca(ca.clone())),
            (None, None) => None,
        };
        let proxy = match &self.proxy {
            Some(p) => Some(ProxyChoice::parse(p).context("--proxy / BURROW_PROXY")?),
            None => None,
        };
        let forwards: Vec<ConnectForward> =
            self.forwards.iter().filter_map(|f| f.0.clone()).collect();
        Ok(ConnectorSettings {
            gateway: self.gateway.clone(),
            key,
            key_file: self.key_file.clone(),
            trust,
            transport: self.transport,
            server_name: self.server_name.clone(),
            proxy,
            forwards: (!forwards.is_empty()).then_some(forwards),
            max_backoff: self.max_backoff,
            log_level: self.log_level,
            log_format: self.log_format,
            ..ConnectorSettings::default()
        })
    }
}

/// Runs `burrow connect`.
pub fn main(args: Args) -> anyhow::Result<()> {
    let file = run::load_file(args.config.as_deref(), config::load_connector_file)?;
    let file_level = file.log_level;
    let log_format = args.log_format.or(file.log_format).unwrap_or_default();
    let file_has_key = file.key.is_some();
    let config = file.overlay(args.settings()?).into_config()?;
    if args.print_config {
        return run::print(config.to_toml().trim_end());
    }
    run::init_logging(args.log_level, file_level, log_format)?;
    if let Some(path) = &config.key_file {
        burrow::state::warn_if_readable_by_others(path);
    }
    if let Some(path) = args.config.as_deref().filter(|_| file_has_key) {
        burrow::state::warn_if_readable_by_others(path);
    }
    info!(target: run::LOG_TARGET, ?config, "connector settings");
    let grace = config.grace;
    let names: Vec<String> = config.forwards.iter().map(|f| f.name.clone()).collect();
    let gateway = config.gateway.clone();
    run::runtime()?.block_on(async move {
        let signals = run::Signals::install()?;
        // No reload here: SIGHUP is logged (its default would end the process).
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .context("cannot handle SIGHUP")?;
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                warn!(target: run::LOG_TARGET, "SIGHUP: `burrow connect` does not reload its settings; restart it to apply a change");
            }
        });
        let connector = Connector::bind(config)
            .await
            .map_err(anyhow::Error::msg)
            .context("cannot start the connector")?;
        announce(&connector, &names, "");
        tokio::spawn(print_forwards(connector.status(), names, String::new()));
        crate::notify::ready(&format!("connecting to {gateway}"));
        crate::notify::spawn_watchdog();
        let shutdown = CancellationToken::new();
        run::until_signal(connector.run(shutdown.clone()), shutdown, signals, grace).await
    })
}

/// Prints the address each forward listens on, each line starting with `prefix`.
pub(crate) fn announce(connector: &Connector, names: &[String], prefix: &str) {
    for (name, addr) in names.iter().zip(connector.local_addrs()) {
        run::say(&format!("{prefix}forward {name}: listening on {addr}"));
    }
}

/// Prints each forward's state whenever it becomes ready or refused, each line starting
/// with `prefix`.
pub(crate) async fn print_forwards(
    mut status: watch::Receiver<ConnectorStatus>,
    names: Vec<String>,
    prefix: String,
) {
    let mut shown: Vec<ForwardState> = Vec::new();
    loop {
        let now = status.borrow_and_update().forwards.clone();
        for (i, st) in now.iter().enumerate() {
            if shown.get(i) == Some(st) {
                continue;
            }
            let name = names.get(i).map_or("?", String::as_str);
            match st {
                ForwardState::Ready => run::say(&format!("{prefix}forward {name}: ready")),
                ForwardState::Refused(why) => run::say(&format!("{prefix}forward {name}: {why}")),
                ForwardState::Listening => {}
            }
        }
        shown = now;
        if status.changed().await.is_err() {
            return;
        }
    }
}
