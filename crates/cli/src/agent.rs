//! `burrow agent`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context as _};
use burrow::agent::{Agent, AgentStatus, ForwardStatus};
use burrow::config::{
    self, AgentSettings, Forward, PrivateService, TargetPattern, TransportKind, Trust,
};
use burrow::transport::ProxyChoice;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::run;

/// Flags of `burrow agent`; each also reads `BURROW_<FLAG>`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The gateway's tunnel address, HOST:PORT or a URL. Repeat it (or separate addresses
    /// with commas) to keep a session with each of several gateways and publish the same
    /// forwards on each
    #[arg(long, env = "BURROW_GATEWAY", value_name = "HOST:PORT", value_delimiter = ',', value_parser = config::parse_gateway_addr)]
    gateway: Vec<String>,

    /// The agent key, bk_... (the gateway prints one at its first start and with
    /// --print-agent-line; or `burrow keygen`). Prefer --key-file,
    /// BURROW_KEY or the config file: command lines are visible to other local users (`ps`)
    #[arg(long, env = "BURROW_KEY", value_name = "KEY", hide_env_values = true)]
    key: Option<String>,

    /// Read the agent key from FILE (just the key, bk_..., as `burrow keygen` prints it or
    /// the gateway keeps it in agent.key): keeps it out of `ps` and of the environment
    #[arg(long, env = "BURROW_KEY_FILE", value_name = "FILE")]
    key_file: Option<PathBuf>,

    /// Pin the gateway's certificate, SHA256:HEX (the gateway prints it at start). With
    /// several gateways: once for all, or once per gateway in the order of --gateway
    #[arg(long, env = "BURROW_FINGERPRINT", value_name = "SHA256:HEX", value_delimiter = ',', value_parser = parse_fingerprint)]
    fingerprint: Vec<[u8; 32]>,

    /// Trust a CA bundle (PEM) that signed the gateway's certificate, instead of
    /// --fingerprint; `system` for the system's store. With several gateways: once for all,
    /// or once per gateway in order
    #[arg(long, env = "BURROW_CA", value_name = "FILE", value_delimiter = ',')]
    ca: Vec<PathBuf>,

    /// Tunnel transport: tls, or tcp only when the gateway sits behind a TLS-terminating
    /// proxy (no --fingerprint or --ca then) [default: tls]
    #[arg(long, env = "BURROW_TRANSPORT", value_name = "TRANSPORT", value_parser = crate::gateway::transport_parser())]
    transport: Option<TransportKind>,

    // Help as an attribute: rustdoc would read `[ipv6]` as a link.
    #[arg(
        long = "forward",
        env = "BURROW_FORWARD",
        value_name = "SPEC",
        value_delimiter = ',',
        value_parser = parse_forward_entry,
        help = "A service to publish: [PUBLIC_PORT=]TARGET, where TARGET is host:port, \
                [ipv6]:port or unix:/path/to.sock and PUBLIC_PORT 0 or absent lets the gateway \
                choose; unix:/PATH=TARGET for a unix socket on the gateway (where its grant \
                allows the path); udp:[PUBLIC_PORT=]HOST:PORT for UDP. Add \
                '?proxy_protocol=v1' or 'v2' (quoted) to send the target a PROXY protocol \
                header with the client's address, '?group=NAME' to share the public port with \
                the other agents whose forward names the group (options combine with &). \
                Repeat the flag, or separate specs with commas (also in BURROW_FORWARD; empty \
                entries are skipped)"
    )]
    forwards: Vec<ForwardEntry>,

    #[arg(
        long = "private",
        env = "BURROW_PRIVATE",
        value_name = "NAME=TARGET",
        value_delimiter = ',',
        value_parser = parse_private_entry,
        help = "A private service: NAME=TARGET, TARGET as for --forward. It gets no public \
                port: connectors whose reach includes AGENT/NAME use it. Repeat the flag, or \
                separate entries with commas (also in BURROW_PRIVATE)"
    )]
    private: Vec<Entry<PrivateService>>,

    #[arg(
        long = "allow",
        env = "BURROW_ALLOW",
        value_name = "PATTERN",
        value_delimiter = ',',
        value_parser = parse_allow_entry,
        help = "A target connectors may name directly (AGENT/HOST:PORT): host:port, host:*, \
                CIDR:port or CIDR:port-port, e.g. 10.0.0.0/24:22 [default: none]. Repeat the \
                flag, or separate patterns with commas (also in BURROW_ALLOW)"
    )]
    allow: Vec<Entry<TargetPattern>>,

    /// TLS server name to send [default: the host of --gateway]
    #[arg(long, env = "BURROW_SERVER_NAME", value_name = "NAME")]
    server_name: Option<String>,

    /// Reach the gateway through a proxy: socks5://[USER:PASS@]HOST:PORT (the agent resolves
    /// the gateway's name), socks5h://... (the proxy does), http://[USER:PASS@]HOST:PORT (HTTP
    /// CONNECT), or none to ignore HTTPS_PROXY and ALL_PROXY [default: HTTPS_PROXY, ALL_PROXY
    /// and NO_PROXY, as curl reads them]
    #[arg(long, env = "BURROW_PROXY", value_name = "URL", hide_env_values = true)]
    proxy: Option<String>,

    /// Longest pause between reconnect attempts, e.g. 30s or 2m [default: 30s]
    #[arg(long, env = "BURROW_MAX_BACKOFF", value_name = "DURATION", value_parser = config::parse_duration)]
    max_backoff: Option<Duration>,

    /// How long connecting to a target may take before the client's connection is closed,
    /// e.g. 3s [default: 10s]
    #[arg(long, env = "BURROW_CONNECT_TIMEOUT", value_name = "DURATION", value_parser = parse_timeout)]
    connect_timeout: Option<Duration>,

    #[command(flatten)]
    common: crate::Common,
}

/// One `--forward` entry: a spec, or nothing for an empty entry (`BURROW_FORWARD=""`, what
/// `${X:-}` gives in a compose file, or a trailing comma).
#[derive(Debug, Clone)]
struct ForwardEntry(Option<Forward>);

/// One `--private` or `--allow` entry, or nothing for an empty one (as [`ForwardEntry`]).
#[derive(Debug, Clone)]
struct Entry<T>(Option<T>);

fn parse_private_entry(s: &str) -> Result<Entry<PrivateService>, String> {
    match s.trim() {
        "" => Ok(Entry(None)),
        s => config::parse_private(s).map(|p| Entry(Some(p))),
    }
}

fn parse_allow_entry(s: &str) -> Result<Entry<TargetPattern>, String> {
    match s.trim() {
        "" => Ok(Entry(None)),
        s => TargetPattern::parse(s).map(|p| Entry(Some(p))),
    }
}

/// The entries given, or `None` when there are none (so a lower layer's list stands).
fn entries<T: Clone>(list: &[Entry<T>]) -> Option<Vec<T>> {
    let v: Vec<T> = list.iter().filter_map(|e| e.0.clone()).collect();
    (!v.is_empty()).then_some(v)
}

fn parse_forward_entry(s: &str) -> Result<ForwardEntry, String> {
    if s.trim().is_empty() {
        return Ok(ForwardEntry(None));
    }
    config::parse_forward(s).map(|f| ForwardEntry(Some(f)))
}

/// A duration of more than zero.
fn parse_timeout(s: &str) -> Result<Duration, String> {
    match config::parse_duration(s)? {
        d if d.is_zero() => Err("must be more than 0".into()),
        d => Ok(d),
    }
}

pub(crate) fn parse_fingerprint(s: &str) -> Result<[u8; 32], String> {
    burrow::tls::parse_fingerprint(s).map_err(|e| e.to_string())
}

impl Args {
    /// The layer flags and environment make.
    fn settings(&self) -> anyhow::Result<AgentSettings> {
        // Parsed here rather than by clap, whose errors would echo the key.
        let key = match &self.key {
            Some(k) => Some(
                config::parse_key(k)
                    .map_err(anyhow::Error::msg)
                    .context("--key / BURROW_KEY")?,
            ),
            None => None,
        };
        let trust = match (self.fingerprint.as_slice(), self.ca.as_slice()) {
            ([_, ..], [_, ..]) => bail!(
                "--fingerprint (BURROW_FINGERPRINT) and --ca (BURROW_CA) are both set: use one \
                 (for gateways checked in different ways, give each its own in the config \
                 file's `gateways` tables)"
            ),
            ([], []) => None,
            (fps, []) => Some(fps.iter().map(|fp| Trust::Fingerprint(*fp)).collect()),
            ([], cas) => Some(cas.iter().map(|ca| Trust::ca(ca.clone())).collect()),
        };
        // Also outside clap, whose errors would echo a password in the URL.
        let proxy = match &self.proxy {
            Some(p) => Some(ProxyChoice::parse(p).context("--proxy / BURROW_PROXY")?),
            None => None,
        };
        Ok(AgentSettings {
            gateways: Some(
                self.gateway
                    .iter()
                    .map(config::GatewaySetting::new)
                    .collect(),
            )
            .filter(|g: &Vec<_>| !g.is_empty()),
            key,
            trust,
            transport: self.transport,
            server_name: self.server_name.clone(),
            proxy,
            forwards: Some(self.forwards.iter().filter_map(|f| f.0.clone()).collect())
                .filter(|f: &Vec<Forward>| !f.is_empty()),
            private: entries(&self.private),
            allow: entries(&self.allow),
            max_backoff: self.max_backoff,
            connect_timeout: self.connect_timeout,
            log_level: self.common.log_level,
            key_file: self.key_file.clone(),
            admin: self.common.admin,
            admin_token: self.common.admin_token()?,
            log_format: self.common.log_format,
            ..AgentSettings::default()
        })
    }
}

/// Runs `burrow agent`.
pub fn main(args: Args) -> anyhow::Result<()> {
    let file = run::load_file(args.common.config.as_deref(), config::load_agent_file)?;
    let file_level = file.log_level;
    let log_format = args
        .common
        .log_format
        .or(file.log_format)
        .unwrap_or_default();
    let file_has_key = file.key.is_some();
    let layer = args.settings()?;
    let file_logs = (file.log_level, file.log_format);
    let config = file.overlay(layer.clone()).into_config()?;
    if args.common.print_config {
        return run::print(config.to_toml().trim_end());
    }
    run::init_logging(args.common.log_level, file_level, log_format)?;
    if let Some(path) = &config.key_file {
        burrow::state::warn_if_readable_by_others(path);
    }
    if let Some(path) = args.common.config.as_deref().filter(|_| file_has_key) {
        burrow::state::warn_if_readable_by_others(path);
    }
    info!(target: run::LOG_TARGET, ?config, "agent settings");
    let grace = config.grace;
    run::runtime()?.block_on(async move {
        let signals = run::Signals::install()?;
        let gateways: Vec<String> = config.gateways().into_iter().map(|g| g.gateway).collect();
        let admin = config.admin.clone();
        let agent = Agent::new(config);
        let admin = burrow::admin::AdminServer::bind(&admin, agent.report())
            .await
            .map_err(anyhow::Error::msg)
            .context("cannot start the agent")?;
        let handle = agent.handle();
        let reload = run::reloader(
            args.common.config.clone(),
            config::load_agent_file,
            move |file: AgentSettings| {
                let logs = (file.log_level, file.log_format);
                let config = file
                    .overlay(layer.clone())
                    .into_config()
                    .map_err(|e| e.to_string())?;
                let mut report = handle.reload(config)?;
                if logs.0 != file_logs.0 {
                    report.restart_needed.push("log_level".into());
                }
                if logs.1 != file_logs.1 {
                    report.restart_needed.push("log_format".into());
                }
                Ok(report)
            },
        );
        run::reload_on_sighup(reload.clone())?;
        run::start_admin(admin, reload, "");
        // With several gateways, each line names the gateway it is about.
        let several = gateways.len() > 1;
        let printers: Vec<_> = agent
            .statuses()
            .into_iter()
            .zip(&gateways)
            .map(|(status, gateway)| {
                let label = several.then(|| gateway.clone());
                tokio::spawn(print_forwards(status, String::new(), label))
            })
            .collect();
        crate::notify::ready(&format!("connecting to {}", gateways.join(", ")));
        crate::notify::spawn_agent_status(agent.statuses(), gateways);
        crate::notify::spawn_watchdog();
        let shutdown = CancellationToken::new();
        let ended = run::until_signal(agent.run(shutdown.clone()), shutdown, signals, grace).await;
        // An agent that stopped by itself has dropped its statuses, so the printers end: let
        // them print its last answers first, such as the refusals it stops on.
        if ended.is_err() {
            let printed = futures_util::future::join_all(printers);
            let _ = tokio::time::timeout(Duration::from_secs(1), printed).await;
        }
        ended
    })
}

/// Prints each forward's status with one gateway whenever it changes to granted or refused,
/// each line after `prefix` (an instance's name in `burrow run`); `gateway` names the gateway
/// in each line (for an agent with several).
pub(crate) async fn print_forwards(
    mut status: watch::Receiver<AgentStatus>,
    prefix: String,
    gateway: Option<String>,
) {
    let on = gateway.map_or_else(String::new, |g| format!(" (gateway {g})"));
    let mut shown: std::collections::HashMap<String, ForwardStatus> = Default::default();
    loop {
        let (names, now) = {
            let s = status.borrow_and_update();
            (s.names.clone(), s.forwards.clone())
        };
        for (name, st) in names.iter().zip(&now) {
            if shown.get(name) == Some(st) {
                continue;
            }
            match st {
                ForwardStatus::Granted(addr) => run::say(&format!(
                    "{prefix}forward {name}: public address {addr}{on}"
                )),
                ForwardStatus::Refused(why) => {
                    run::say(&format!("{prefix}forward {name}: refused{on}: {why}"))
                }
                ForwardStatus::Pending => {}
            }
        }
        shown = names.into_iter().zip(now).collect();
        if status.changed().await.is_err() {
            return;
        }
    }
}
