//! The connector path: client -> `burrow connect` -> gateway -> agent -> target, each part a
//! process of its own, measured with the same workloads and in the same rounds as the
//! direct and public paths.
//!
//! It has targets of its own (so its downloads have their own ledger), a gateway and agent
//! pair over TLS of its own (started like the public path's, with a `[[connectors]]` entry
//! for the connector's key, and the targets as the agent's private services), and the
//! connector listening on loopback. `--gateway-config` and `--agent-config` do not apply to
//! it: its gateway and agent run with the defaults.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::Path;

use anyhow::{anyhow, Context as _};

use crate::procs::{Invite, Proc, Transport, Tunnel};
use crate::targets::Targets;

/// The services, by the name the agent gives them and the connector asks for.
const SERVICES: [&str; 3] = ["echo", "sink", "source"];
/// The name a zero-config gateway gives the agent of its generated key.
const AGENT: &str = "default";

/// A running connector path.
pub struct ConnectorPath {
    pub targets: Targets,
    tunnel: Tunnel,
    connector: Proc,
    /// Where clients connect, at the connector, for each target.
    pub echo: SocketAddr,
    pub sink: SocketAddr,
    pub source: SocketAddr,
    _files: [tempfile::NamedTempFile; 2],
}

impl ConnectorPath {
    /// Starts the targets, the gateway and agent, then the connector, and waits until every
    /// forward is ready.
    pub async fn start(bin: &Path, write_len: usize) -> anyhow::Result<ConnectorPath> {
        let targets = Targets::start(write_len).await?;
        let (key, key_hash) = keygen(bin)?;
        let gateway_config = temp_toml(
            "burrow-bench-gateway-connector",
            &format!(
                "# burrow-bench: the connector path's gateway.\n[[connectors]]\nname = \"bench\"\nkey_hash = \"{key_hash}\"\nreach = [\"{AGENT}/*\"]\n"
            ),
        )?;
        let private: Vec<String> = SERVICES
            .iter()
            .zip([targets.echo, targets.sink, targets.source])
            .map(|(name, addr)| format!("\"{name}={addr}\""))
            .collect();
        let agent_config = temp_toml(
            "burrow-bench-agent-connector",
            &format!(
                "# burrow-bench: the connector path's agent.\nprivate = [{}]\n",
                private.join(", ")
            ),
        )?;
        eprintln!("bench: starting the connector path (gateway, agent, connector)");
        let tunnel = Tunnel::start(
            bin,
            Transport::Tls,
            &[],
            Some(gateway_config.path()),
            Some(agent_config.path()),
        )
        .await
        .context("the connector path's gateway and agent did not start")?;
        let invite = tunnel
            .gateway
            .stdout_lines()
            .iter()
            .find_map(|l| l.strip_prefix("burrow agent "))
            .map(Invite::parse)
            .ok_or_else(|| anyhow!("the connector path's gateway printed no agent line"))??;
        let fingerprint = invite
            .fingerprint
            .ok_or_else(|| anyhow!("the connector path's gateway printed no fingerprint"))?;
        let specs: Vec<String> = SERVICES
            .iter()
            .map(|s| format!("127.0.0.1:0={AGENT}/{s}"))
            .collect();
        let mut args: Vec<String> = [
            "connect",
            "--log-level",
            "error",
            "--gateway",
            &invite.gateway,
            "--fingerprint",
            &fingerprint,
            "--max-backoff",
            "1s",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        for spec in &specs {
            args.extend(["--forward".to_string(), spec.clone()]);
        }
        let mut connector = Proc::spawn("connector", bin, &args, &[("BURROW_KEY", &key)])?;
        // The agent may connect after the connector: a forward is ready once both are there
        // (the connector asks again meanwhile).
        let listen = connector
            .wait_stdout("every forward listening and ready", |lines| {
                specs
                    .iter()
                    .map(|spec| {
                        let prefix = format!("forward {spec}: ");
                        let mine = || lines.iter().filter_map(|l| l.strip_prefix(&prefix));
                        mine().any(|rest| rest == "ready").then_some(())?;
                        mine()
                            .find_map(|rest| rest.strip_prefix("listening on "))
                            .map(|a| a.trim().parse::<SocketAddr>())
                    })
                    .collect::<Option<Result<Vec<_>, _>>>()
            })
            .await?
            .context("the connector printed an address that is not IP:PORT")?;
        let [echo, sink, source] = listen[..] else {
            return Err(anyhow!(
                "the connector printed {} addresses, not 3",
                listen.len()
            ));
        };
        Ok(ConnectorPath {
            targets,
            tunnel,
            connector,
            echo,
            sink,
            source,
            _files: [gateway_config, agent_config],
        })
    }

    /// Stops the three processes; returns what is worth a note about them.
    pub async fn stop(self) -> Vec<String> {
        let mut notes = self.connector.stop().await;
        notes.extend(self.tunnel.stop().await);
        notes
            .into_iter()
            .map(|n| format!("connector path: {n}"))
            .collect()
    }
}

/// A new key and its hash, from `burrow keygen`.
fn keygen(bin: &Path) -> anyhow::Result<(String, String)> {
    let out = std::process::Command::new(bin)
        .arg("keygen")
        .output()
        .with_context(|| format!("cannot run {} keygen", bin.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_string())
            .ok_or_else(|| anyhow!("`burrow keygen` printed no `{name}` line"))
    };
    Ok((field("key:")?, field("key_hash:")?))
}

fn temp_toml(prefix: &str, text: &str) -> anyhow::Result<tempfile::NamedTempFile> {
    let mut file = tempfile::Builder::new()
        .prefix(prefix)
        .suffix(".toml")
        .tempfile()
        .context("cannot create a config file")?;
    file.write_all(text.as_bytes())
        .context("cannot write a config file")?;
    Ok(file)
}
