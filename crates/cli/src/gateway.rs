//! `burrow gateway`.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use anyhow::Context as _;
use burrow::agent_line;
use burrow::config::{self, GatewaySettings, TransportKind};
use burrow::gateway::Gateway;
use clap::builder::{PossibleValuesParser, TypedValueParser};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::run;

/// Flags of `burrow gateway`; each also reads `BURROW_<FLAG>`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Address the tunnel listener binds [default: 0.0.0.0:7443]
    #[arg(long, env = "BURROW_LISTEN", value_name = "ADDR")]
    listen: Option<SocketAddr>,

    /// IP address the public ports bind to [default: 0.0.0.0]
    #[arg(long, env = "BURROW_PUBLIC_HOST", value_name = "IP")]
    public_host: Option<IpAddr>,

    /// Host name agents and clients use to reach this machine, shown in the agent command line
    /// and in granted addresses [default: the listen address; for a wildcard, this host's
    /// address on its default route]
    #[arg(long, env = "BURROW_PUBLIC_NAME", value_name = "NAME")]
    public_name: Option<String>,

    /// Directory for the certificate and the generated agent key [default: /var/lib/burrow as
    /// root, else $XDG_STATE_HOME/burrow or ~/.local/state/burrow]
    #[arg(long, env = "BURROW_STATE_DIR", value_name = "DIR")]
    state_dir: Option<PathBuf>,

    /// Use a state directory that other users can change (its files could be replaced by
    /// theirs), with a warning, instead of refusing to start [default: false]
    #[arg(
        long,
        env = "BURROW_ALLOW_INSECURE_STATE",
        value_name = "BOOL",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    allow_insecure_state: Option<bool>,

    /// Tunnel transport: tls, or tcp only behind a TLS-terminating proxy [default: tls]
    #[arg(long, env = "BURROW_TRANSPORT", value_name = "TRANSPORT", value_parser = transport_parser())]
    transport: Option<TransportKind>,

    /// CA-signed certificate chain (PEM) to serve instead of the self-signed one
    #[arg(long, env = "BURROW_TLS_CERT", value_name = "FILE")]
    tls_cert: Option<PathBuf>,

    /// Private key (PEM) of --tls-cert
    #[arg(long, env = "BURROW_TLS_KEY", value_name = "FILE")]
    tls_key: Option<PathBuf>,

    /// Path on which the tunnel port (and --ws-listen) takes WebSocket upgrades
    /// [default: /burrow]
    #[arg(long, env = "BURROW_WS_PATH", value_name = "PATH")]
    ws_path: Option<String>,

    /// Also listen for WebSocket tunnels over plain HTTP here, to sit behind a TLS-terminating
    /// reverse proxy or CDN (agents dial wss://PUBLIC-NAME/PATH and check the proxy's
    /// certificate)
    #[arg(long, env = "BURROW_WS_LISTEN", value_name = "ADDR")]
    ws_listen: Option<SocketAddr>,

    /// A proxy (address or network) in front of --ws-listen whose X-Forwarded-For names the
    /// agent's address; repeat for several
    #[arg(long = "ws-trusted-proxy", env = "BURROW_WS_TRUSTED_PROXIES", value_name = "NET",
          value_delimiter = ',', value_parser = config::parse_net)]
    ws_trusted_proxies: Vec<ipnet::IpNet>,

    /// Do not serve QUIC (agents' quic:// and auto://); by default the gateway serves it on
    /// UDP at the tunnel port's number
    #[arg(long, env = "BURROW_NO_QUIC")]
    no_quic: bool,

    /// Serve QUIC on this UDP address instead of the tunnel port's [default: --listen, on UDP]
    #[arg(long, env = "BURROW_QUIC_LISTEN", value_name = "ADDR")]
    quic_listen: Option<SocketAddr>,
    /// Print the `burrow agent ...` line for the generated key, key included, and exit: the
    /// running gateway masks the key after its first start. Give the same settings as the
    /// gateway (state directory, listen port, public name); nothing is bound or created
    #[arg(long)]
    print_agent_line: bool,

    #[command(flatten)]
    common: crate::Common,
}

/// `tls` or `tcp`, with the possible values shown in help and errors.
pub fn transport_parser() -> impl TypedValueParser<Value = TransportKind> {
    PossibleValuesParser::new(["tls", "tcp"]).try_map(|s| s.parse::<TransportKind>())
}

impl Args {
    /// The layer flags and environment make.
    fn settings(&self) -> anyhow::Result<GatewaySettings> {
        Ok(GatewaySettings {
            listen: self.listen,
            public_host: self.public_host,
            public_name: self.public_name.clone(),
            state_dir: self.state_dir.clone(),
            allow_insecure_state: self.allow_insecure_state,
            transport: self.transport,
            tls_cert: self.tls_cert.clone(),
            tls_key: self.tls_key.clone(),
            log_level: self.common.log_level,
            ws_path: self.ws_path.clone(),
            ws_listen: self.ws_listen,
            quic: self.no_quic.then_some(false),
            quic_listen: self.quic_listen,
            ws_trusted_proxies: (!self.ws_trusted_proxies.is_empty())
                .then(|| self.ws_trusted_proxies.clone()),
            admin: self.common.admin,
            admin_token: self.common.admin_token()?,
            log_format: self.common.log_format,
            ..GatewaySettings::default()
        })
    }
}

/// Runs `burrow gateway`.
pub fn main(args: Args) -> anyhow::Result<()> {
    let file = run::load_file(args.common.config.as_deref(), config::load_gateway_file)?;
    let file_level = file.log_level;
    let log_format = args
        .common
        .log_format
        .or(file.log_format)
        .unwrap_or_default();
    let file_has_key = file
        .agents
        .iter()
        .flatten()
        .any(|a| matches!(a.key, config::KeySpec::Key(_)));
    let layer = args.settings()?;
    let file_logs = (file.log_level, file.log_format);
    let config = file.overlay(layer.clone()).into_config()?;
    if args.common.print_config {
        // The generated key's hash, when the gateway has made one; unreadable is no reason
        // not to print the rest.
        let generated = burrow::state::read_agent_key(&config.state_dir)
            .ok()
            .flatten()
            .map(|k| k.hash());
        return run::print(config.to_toml(generated.as_ref()).trim_end());
    }
    run::init_logging(args.common.log_level, file_level, log_format)?;
    if let Some(path) = args.common.config.as_deref().filter(|_| file_has_key) {
        burrow::state::warn_if_readable_by_others(path);
    }
    if args.print_agent_line {
        let line = agent_line::load(&config).map_err(anyhow::Error::msg)?;
        if let Some(why) = &line.guess {
            warn!(target: run::LOG_TARGET, "{why}");
        }
        return run::print(&line.full());
    }
    info!(target: run::LOG_TARGET, ?config, "gateway settings");
    let grace = config.grace;
    let admin = config.admin.clone();
    run::runtime()?.block_on(async move {
        let signals = run::Signals::install()?;
        let gateway = Gateway::bind(config)
            .await
            .context("cannot start the gateway")?;
        let admin = burrow::admin::AdminServer::bind(&admin, gateway.report())
            .await
            .map_err(anyhow::Error::msg)
            .context("cannot start the gateway")?;
        announce(&gateway, "");
        let handle = gateway.handle();
        let reload = run::reloader(
            args.common.config.clone(),
            config::load_gateway_file,
            move |file: GatewaySettings| {
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
        crate::notify::ready(&format!("listening for agents on {}", gateway.local_addr()));
        crate::notify::spawn_watchdog();
        let shutdown = CancellationToken::new();
        run::until_signal(gateway.run(shutdown.clone()), shutdown, signals, grace).await
    })
}

/// Prints what an operator needs to connect agents, each line after `prefix` (an
/// instance's name in `burrow run`).
pub(crate) fn announce(gateway: &Gateway, prefix: &str) {
    let say = |text: &str| {
        for line in text.lines() {
            run::say(&format!("{prefix}{line}"));
        }
    };
    say(&format!("gateway listening on {}", gateway.local_addr()));
    if let Some(addr) = gateway.quic_local_addr() {
        say(&format!("gateway listening for QUIC on UDP {addr}"));
    }
    if let Some(fp) = gateway.fingerprint() {
        say(&format!("certificate fingerprint: {fp}"));
    }
    let Some(line) = gateway.agent_line() else {
        return;
    };
    if let Some(why) = &line.guess {
        warn!(target: run::LOG_TARGET, "{why}");
    }
    // The key in full only when it is new: every later start would copy it into the logs
    // that stdout ends up in (journald, `docker logs`).
    if gateway.key_created() {
        say(&format!(
            "run this on the agent's host (add --forward for each service):\n{}",
            line.full()
        ));
        say(&format!(
            "or, where only HTTP(S) gets out, the same session inside a WebSocket:\n{}",
            line.full_ws()
        ));
        if let Some(quic) = line.full_quic() {
            say(&format!(
                "or over QUIC (UDP; better on lossy links and when the agent's address changes):\n{quic}"
            ));
        }
    } else {
        say(&format!(
            "run this on the agent's host (add --forward for each service; the key is masked: \
             `burrow gateway --print-agent-line` with this gateway's settings prints it):\n{}",
            line.masked()
        ));
        say(&format!(
            "or, where only HTTP(S) gets out, the same session inside a WebSocket:\n{}",
            line.masked_ws()
        ));
        if let Some(quic) = line.masked_quic() {
            run::say(&format!(
                "or over QUIC (UDP; better on lossy links and when the agent's address changes):\n{quic}"
            ));
        }
    }
}
