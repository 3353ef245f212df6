//! `burrow`: the command line of the Burrow reverse tunnel.
//!
//! - `burrow gateway` runs on a public host; agents dial in and it opens public ports for them.
//! - `burrow agent` runs next to a private service and publishes it through a gateway.
//! - `burrow connect` runs where a private service is wanted: it listens locally and reaches
//!   the service through the gateway.
//! - `burrow run --config FILE` runs every `[[gateway]]`, `[[agent]]` and `[[connector]]` of
//!   one file in one process.
//! - `burrow keygen` prints a new agent key and its key hash, or the hash of an existing key.
//! - `burrow status` shows a running gateway's or agent's status (from its admin server).
//! - `burrow token` makes, lists and revokes a running gateway's agent tokens (the same).
//! - `burrow completions SHELL` prints a shell completion script.
//!
//! This crate only parses flags and environment, sets up logging and handles signals; the
//! roles live in the `burrow` library.

mod agent;
mod connect;
mod gateway;
mod keygen;
mod multi;
mod notify;
mod run;
mod status;
mod token;

use std::process::ExitCode;

/// jemalloc instead of the system allocator. glibc hands freed memory of its per-thread
/// arenas back to the kernel at once, so the frame buffers that come and go under load cost
/// a page fault and a page of zeroing every 4 KiB: about 200,000 faults per GB through the
/// agent, measured. jemalloc keeps freed pages for reuse (about 2,000 faults per GB). mimalloc
/// cut the faults too, but on the AMD machine measured it made rustls's copy of each record
/// ten times slower (the copy's alignment), so it lost more than it won.
///
/// jemalloc's background thread is on (the crate's `background_threads` feature): without
/// it, freed pages are only returned while the process keeps allocating, so a gateway that
/// went idle after a burst held the burst's memory (68 MiB measured) indefinitely. With it,
/// they go back to the kernel within about ten seconds.
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use burrow::config::{LogFormat, LogLevel};
use clap::builder::{PossibleValuesParser, TypedValueParser};
use clap::error::{ContextKind, ContextValue, ErrorKind};
use clap::{CommandFactory as _, FromArgMatches as _, Parser, Subcommand};

/// Burrow: publish a private TCP service through a public gateway.
#[derive(Debug, Parser)]
#[command(name = "burrow", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a gateway on a public host: agents connect to it, clients use the public ports it
    /// opens for them.
    Gateway(gateway::Args),
    /// Run an agent next to a private service: it dials the gateway and publishes the service.
    Agent(agent::Args),
    /// Run a connector: it listens on this machine and reaches an agent's private services
    /// through the gateway, without any public port
    Connect(connect::Args),
    /// Run several gateways, agents and connectors from one file in one process: [[gateway]],
    /// [[agent]] and [[connector]] tables, each with a `name` and the keys of that role's own
    /// config file
    Run(multi::Args),
    /// Print a new agent key and its key hash: give the key to the agent, and `key_hash` to
    /// the gateway's `[[agents]]` entry. With --hash or --hash-file, print the key hash of an
    /// existing key.
    Keygen(keygen::Args),
    /// Show a running gateway's or agent's status as tables: agents, sessions, services,
    /// streams, bytes and recent errors (read from its admin server, --admin)
    Status(status::Args),
    /// Make, list and revoke agent keys a running gateway accepts beside its config's
    /// [[agents]], without a restart (through its admin server, --admin, with its token)
    Token(token::Args),
    /// Print a completion script for SHELL (bash, zsh, fish, elvish, powershell), e.g.
    /// `burrow completions bash > /etc/bash_completion.d/burrow`
    Completions {
        /// The shell.
        #[arg(value_name = "SHELL")]
        shell: clap_complete::Shell,
    },
}

/// Flags every role has.
#[derive(Debug, clap::Args)]
struct Common {
    /// TOML config file; flags and environment variables override its keys.
    #[arg(long, env = "BURROW_CONFIG", value_name = "FILE")]
    config: Option<std::path::PathBuf>,

    /// How much to log [default: info, or RUST_LOG when set]
    #[arg(long, env = "BURROW_LOG_LEVEL", value_name = "LEVEL", value_parser = log_level_parser())]
    log_level: Option<LogLevel>,

    /// Print the effective configuration as a config file (TOML, keys masked) and exit
    /// without starting.
    #[arg(long)]
    print_config: bool,

    /// Log format: text, or json (one object a line, for log shippers) [default: text]
    #[arg(long, env = "BURROW_LOG_FORMAT", value_name = "FORMAT", value_parser = log_format_parser())]
    log_format: Option<LogFormat>,

    /// Serve /metrics (Prometheus), /api/status (JSON) and a status page at / on this address,
    /// usually 127.0.0.1:7444 [default: off]
    #[arg(long, env = "BURROW_ADMIN", value_name = "ADDR")]
    admin: Option<std::net::SocketAddr>,

    /// Token the admin server asks for (`Authorization: Bearer TOKEN`), at least 16
    /// characters; required when --admin is not a loopback address
    #[arg(
        long,
        env = "BURROW_ADMIN_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    admin_token: Option<String>,
}

impl Common {
    /// `--admin-token`, checked (the error never repeats the token).
    fn admin_token(&self) -> anyhow::Result<Option<burrow::admin::AdminToken>> {
        use anyhow::Context as _;
        self.admin_token
            .as_deref()
            .map(|t| {
                burrow::admin::AdminToken::parse(t)
                    .map_err(anyhow::Error::msg)
                    .context("--admin-token / BURROW_ADMIN_TOKEN")
            })
            .transpose()
    }
}

fn log_format_parser() -> impl TypedValueParser<Value = LogFormat> {
    PossibleValuesParser::new(["text", "json"]).try_map(|s| s.parse::<LogFormat>())
}

fn log_level_parser() -> impl TypedValueParser<Value = LogLevel> {
    PossibleValuesParser::new(LogLevel::ALL.map(LogLevel::as_str))
        .try_map(|s| s.parse::<LogLevel>())
}

fn main() -> ExitCode {
    let cli = match parse() {
        Ok(cli) => cli,
        Err(e) => return e,
    };
    let result = match cli.command {
        Command::Gateway(args) => gateway::main(args),
        Command::Agent(args) => agent::main(args),
        Command::Connect(args) => connect::main(args),
        Command::Run(args) => multi::main(args),
        Command::Keygen(args) => keygen::main(args),
        Command::Status(args) => status::main(args),
        Command::Token(args) => token::main(args),
        Command::Completions { shell } => {
            let mut command = Cli::command();
            clap_complete::generate(shell, &mut command, "burrow", &mut std::io::stdout());
            Ok(())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Parses the command line and the `BURROW_*` variables. A variable that is set but empty
/// (what `${X:-}` gives in a compose file) counts as unset, and an error about a value that
/// came from a variable names the variable, not only the flag.
fn parse() -> Result<Cli, ExitCode> {
    let mut command = Cli::command();
    for role in ["gateway", "agent", "connect", "run", "status", "token"] {
        command = command.mut_subcommand(role, |mut sub| {
            let empty: Vec<clap::Id> = sub
                .get_arguments()
                .filter(|a| {
                    a.get_env()
                        .and_then(std::env::var_os)
                        .is_some_and(|v| v.to_string_lossy().trim().is_empty())
                })
                .map(|a| a.get_id().clone())
                .collect();
            for id in empty {
                sub = sub.mut_arg(id, |a| a.env(None));
            }
            sub
        });
    }
    let parsed = command
        .clone()
        .try_get_matches()
        .and_then(|m| Cli::from_arg_matches(&m));
    parsed.map_err(|e| {
        let Some(text) = from_variable(&command, &e) else {
            e.exit()
        };
        eprint!("{text}");
        ExitCode::from(2)
    })
}

/// `e` reworded to name the variable, when it is about a bad value that came from a
/// `BURROW_*` variable rather than from the command line.
fn from_variable(command: &clap::Command, e: &clap::Error) -> Option<String> {
    if !matches!(
        e.kind(),
        ErrorKind::ValueValidation | ErrorKind::InvalidValue
    ) {
        return None;
    }
    let Some(ContextValue::String(arg)) = e.get(ContextKind::InvalidArg) else {
        return None;
    };
    let long = arg.split_whitespace().next()?.strip_prefix("--")?;
    let on_command_line = std::env::args_os().skip(1).any(|a| {
        let a = a.to_string_lossy();
        a.strip_prefix("--")
            .is_some_and(|a| a == long || a.starts_with(&format!("{long}=")))
    });
    if on_command_line {
        return None;
    }
    let var = command
        .get_subcommands()
        .flat_map(|sub| sub.get_arguments())
        .find(|a| a.get_long() == Some(long))?
        .get_env()?
        .to_string_lossy()
        .into_owned();
    std::env::var_os(&var)?;
    let text = e.render().to_string();
    Some(text.replacen(
        &format!("for '{arg}'"),
        &format!("in {var} (the variable of --{long})"),
        1,
    ))
}
