//! `burrow token`: agent keys a running gateway issues and revokes without a restart, through
//! its admin server (`--admin`, with its token).

use std::time::Duration;

use anyhow::Context as _;
use burrow::admin::api::{CreatedToken, TokenRequest, TokenRow};

use crate::run;
use crate::status::request;

/// Flags of `burrow token`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Command,

    /// The gateway's admin server: HOST:PORT or http://HOST:PORT, as given to its --admin
    #[arg(long, env = "BURROW_ADMIN", value_name = "ADDR", default_value = burrow::admin::USUAL_ADDR, global = true)]
    admin: String,

    /// The admin server's token (the gateway's admin_token: making and revoking tokens needs
    /// one)
    #[arg(
        long,
        env = "BURROW_ADMIN_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true,
        global = true
    )]
    admin_token: Option<String>,

    /// Print the JSON as the admin server sends it
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Make a token: prints its key once (the gateway keeps only the key's hash) and the
    /// `burrow agent` line that uses it; the agent is accepted at once
    Create {
        /// The agent's name (letters, digits, `-`, `_`, `.`, `@`), not one of the config's
        /// [[agents]]
        name: String,
        /// Ports it may bind, as in [[agents]] ports: 9000-9010, 8080, 5353/udp;
        /// comma-separated or repeated
        #[arg(long, value_name = "PORTS", required = true, value_delimiter = ',')]
        ports: Vec<String>,
        /// How long the key is accepted, e.g. 30d, 12h, 90s [default: for ever]
        #[arg(long, value_name = "DURATION", value_parser = burrow::config::parse_duration)]
        expires: Option<Duration>,
    },
    /// List the tokens: name, ports, state, created, expires, last seen
    List,
    /// Revoke a token: its agent's session is closed and its ports freed at once, and its
    /// key is refused from now on
    Revoke {
        /// The token's name
        name: String,
    },
}

/// Runs `burrow token`.
pub fn main(args: Args) -> anyhow::Result<()> {
    let token = args.admin_token.as_deref();
    match &args.command {
        Command::Create {
            name,
            ports,
            expires,
        } => {
            let expires_ms = match expires {
                Some(d) if d.is_zero() => anyhow::bail!("--expires must be more than 0"),
                Some(d) => Some(u64::try_from(d.as_millis()).context("--expires is too long")?),
                None => None,
            };
            let want = TokenRequest {
                name: name.clone(),
                ports: ports.clone(),
                expires_ms,
            };
            let body = serde_json::to_string(&want)?;
            let answer = request(&args.admin, token, "POST", "/api/tokens", Some(&body))?;
            if args.json {
                return run::print(answer.trim_end());
            }
            let made: CreatedToken = serde_json::from_str(&answer)
                .with_context(|| format!("{} did not answer with a token", args.admin))?;
            let t = &made.token;
            let mut out = format!(
                "token {} created: ports {}, expires {}\nkey (shown once: the gateway keeps only its hash {}): {}\n",
                t.name,
                t.ports.join(", "),
                t.expires.as_deref().unwrap_or("never"),
                t.key_hash,
                made.key
            );
            if let Some(line) = &made.agent_line {
                out.push_str(&format!(
                    "run this on the agent's host (add --forward for each service; prefer --key-file for the key):\n{line}\n"
                ));
            }
            run::print(out.trim_end())
        }
        Command::List => {
            let answer = request(&args.admin, token, "GET", "/api/tokens", None)?;
            if args.json {
                return run::print(answer.trim_end());
            }
            let rows: Vec<TokenRow> = serde_json::from_str(&answer)
                .with_context(|| format!("{} did not answer with tokens", args.admin))?;
            if rows.is_empty() {
                return run::print("no tokens (`burrow token create NAME --ports …` makes one)");
            }
            run::print(render(&rows).trim_end())
        }
        Command::Revoke { name } => {
            burrow::tokens::check_name(name).map_err(anyhow::Error::msg)?;
            let path = format!("/api/tokens/{name}");
            let answer = request(&args.admin, token, "DELETE", &path, None)?;
            if args.json {
                return run::print(answer.trim_end());
            }
            let row: TokenRow = serde_json::from_str(&answer)
                .with_context(|| format!("{} did not answer with a token", args.admin))?;
            run::print(&format!(
                "token {} revoked at {}: its agent's session is closed, its ports freed, and its key refused from now on",
                row.name,
                row.revoked.as_deref().unwrap_or("now")
            ))
        }
    }
}

/// The tokens as a table.
fn render(rows: &[TokenRow]) -> String {
    let cells: Vec<[String; 6]> = rows
        .iter()
        .map(|t| {
            [
                t.name.clone(),
                t.ports.join(","),
                t.state.clone(),
                t.created.clone(),
                t.expires.clone().unwrap_or_else(|| "never".into()),
                if t.connected {
                    "connected".into()
                } else {
                    t.last_seen.clone().unwrap_or_else(|| "-".into())
                },
            ]
        })
        .collect();
    let head = ["NAME", "PORTS", "STATE", "CREATED", "EXPIRES", "LAST SEEN"];
    let mut widths: Vec<usize> = head.iter().map(|h| h.len()).collect();
    for r in &cells {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: &[&str]| {
        let mut l = String::new();
        for (c, w) in cells.iter().zip(&widths) {
            l.push_str(&format!("{c:<w$}  "));
        }
        l.trim_end().to_string() + "\n"
    };
    let mut out = line(&head);
    for r in &cells {
        let r: Vec<&str> = r.iter().map(String::as_str).collect();
        out.push_str(&line(&r));
    }
    out
}
