//! Other tunnels, run through the same workloads in the same rounds when they are installed
//! (`--peers`): bore (`cargo install bore-cli`; plaintext, one TCP connection per client
//! connection) and rathole (`cargo install rathole`; its plain TCP transport). Each gets
//! targets of its own behind a server and a client process on loopback, as Burrow's tunnels do,
//! so the table shows Burrow beside them as a user would compare them.
//!
//! Neither can be told to bind port 0 and say which port it got for everything: bore's server
//! listens on its fixed control port (7835, on 127.0.0.1 here), and rathole's config names its
//! ports, so the bench picks free loopback ports for rathole just before it starts (another
//! process may take one in between; then rathole fails to start and its rows say so). A peer
//! that is not on `PATH` is skipped with a note.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context as _};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::procs::Proc;
use crate::targets::Targets;

/// Longest a peer may take until its public ports echo.
const READY_LIMIT: Duration = Duration::from_secs(30);

/// A tunnel that is not Burrow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Peer {
    /// bore (`bore server` and one `bore local` per published port).
    Bore,
    /// rathole over its plain TCP transport.
    Rathole,
}

impl Peer {
    pub const ALL: [Peer; 2] = [Peer::Bore, Peer::Rathole];

    /// The executable's name.
    pub fn program(self) -> &'static str {
        match self {
            Peer::Bore => "bore",
            Peer::Rathole => "rathole",
        }
    }

    /// The name in the table and in failure messages.
    pub fn name(self) -> &'static str {
        match self {
            Peer::Bore => "bore (plaintext)",
            Peer::Rathole => "rathole tcp (plaintext)",
        }
    }

    /// How to install it, for the note when it is missing.
    fn install(self) -> &'static str {
        match self {
            Peer::Bore => "cargo install bore-cli",
            Peer::Rathole => "cargo install rathole",
        }
    }
}

/// `program` on `PATH`, if it is there.
fn on_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}

/// The peers installed, and a note for each one that is not.
pub fn find() -> (Vec<(Peer, PathBuf)>, Vec<String>) {
    let mut found = Vec::new();
    let mut notes = Vec::new();
    for peer in Peer::ALL {
        match on_path(peer.program()) {
            Some(bin) => found.push((peer, bin)),
            None => notes.push(format!(
                "--peers: `{}` is not on PATH, so the {} rows are skipped (`{}` installs it)",
                peer.program(),
                peer.name(),
                peer.install()
            )),
        }
    }
    (found, notes)
}

/// One peer tunnel publishing targets of its own.
pub struct PeerTunnel {
    pub peer: Peer,
    pub targets: Targets,
    procs: Vec<Proc>,
    /// The public addresses of the targets.
    pub echo: SocketAddr,
    pub sink: SocketAddr,
    pub source: SocketAddr,
    /// rathole's config files, removed when dropped.
    _configs: Vec<tempfile::NamedTempFile>,
}

impl PeerTunnel {
    /// Starts the targets, then the peer's server and client(s) publishing them, and waits
    /// until the echo answers through it.
    pub async fn start(peer: Peer, bin: &Path, write_len: usize) -> anyhow::Result<PeerTunnel> {
        let targets = Targets::start(write_len).await?;
        let inner = [targets.echo, targets.sink, targets.source];
        eprintln!("bench: starting {} ({})", peer.name(), bin.display());
        let (procs, public, configs) = match peer {
            Peer::Bore => start_bore(bin, &inner).await?,
            Peer::Rathole => start_rathole(bin, &inner)?,
        };
        let [echo, sink, source] = public[..] else {
            bail!(
                "{} published {} addresses, not 3",
                peer.name(),
                public.len()
            );
        };
        wait_echo(echo)
            .await
            .with_context(|| format!("{} did not start", peer.name()))?;
        Ok(PeerTunnel {
            peer,
            targets,
            procs,
            echo,
            sink,
            source,
            _configs: configs,
        })
    }

    /// CPU seconds its processes used so far, together.
    pub fn cpu_seconds(&self) -> anyhow::Result<f64> {
        self.procs.iter().map(Proc::cpu_seconds).sum()
    }

    /// Stops its processes; a note if one had exited on its own. (What they log is theirs:
    /// bore prints a line per connection.)
    pub async fn stop(self) -> Vec<String> {
        let mut notes = Vec::new();
        // Clients first: bore's exit by themselves once their server is gone.
        for p in self.procs.into_iter().rev() {
            notes.extend(
                p.stop()
                    .await
                    .into_iter()
                    .filter(|n| n.contains("exited during the bench")),
            );
        }
        notes
    }
}

type Started = (Vec<Proc>, Vec<SocketAddr>, Vec<tempfile::NamedTempFile>);

/// `bore server` on 127.0.0.1, then a `bore local` per target; each prints the public port it
/// was given.
async fn start_bore(bin: &Path, inner: &[SocketAddr]) -> anyhow::Result<Started> {
    let args = |items: &[&str]| items.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let env = [("NO_COLOR", "1"), ("RUST_LOG", "info")];
    let mut server = Proc::spawn(
        "bore server",
        bin,
        &args(&["server", "--bind-addr", "127.0.0.1"]),
        &env,
    )?;
    server
        .wait_stdout("`server listening`", |lines| {
            lines
                .iter()
                .any(|l| l.contains("server listening"))
                .then_some(())
        })
        .await?;
    let mut procs = vec![server];
    let mut public = Vec::new();
    for target in inner {
        let port = target.port().to_string();
        let mut client = Proc::spawn(
            "bore local",
            bin,
            &args(&[
                "local",
                &port,
                "--local-host",
                "127.0.0.1",
                "--to",
                "127.0.0.1",
            ]),
            &env,
        )?;
        let addr = client
            .wait_stdout("`listening at HOST:PORT`", |lines| {
                lines.iter().find_map(|l| listening_at(l))
            })
            .await?;
        public.push(addr);
        procs.push(client);
    }
    Ok((procs, public, Vec::new()))
}

/// The address in bore's `listening at 127.0.0.1:PORT` line.
fn listening_at(line: &str) -> Option<SocketAddr> {
    let rest = &line[line.find("listening at ")? + "listening at ".len()..];
    let end = rest
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == ':'))
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// A loopback port free at this moment (see the module docs for the race).
fn free_port() -> anyhow::Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("cannot find a free loopback port")?;
    Ok(l.local_addr()?.port())
}

/// rathole's server and client, one service per target, from config files of their own.
fn start_rathole(bin: &Path, inner: &[SocketAddr]) -> anyhow::Result<Started> {
    let control = free_port()?;
    let public = (0..inner.len())
        .map(|_| free_port().map(|p| SocketAddr::from(([127, 0, 0, 1], p))))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let token = "burrow-bench";
    let mut server =
        format!("[server]\nbind_addr = \"127.0.0.1:{control}\"\ndefault_token = \"{token}\"\n\n");
    let mut client =
        format!("[client]\nremote_addr = \"127.0.0.1:{control}\"\ndefault_token = \"{token}\"\n\n");
    for (i, (inner, public)) in inner.iter().zip(&public).enumerate() {
        server.push_str(&format!(
            "[server.services.s{i}]\nbind_addr = \"{public}\"\n\n"
        ));
        client.push_str(&format!(
            "[client.services.s{i}]\nlocal_addr = \"{inner}\"\n\n"
        ));
    }
    let write = |text: &str| -> anyhow::Result<tempfile::NamedTempFile> {
        let mut f = tempfile::Builder::new()
            .prefix("burrow-bench-rathole")
            .suffix(".toml")
            .tempfile()
            .context("cannot create a rathole config file")?;
        std::io::Write::write_all(&mut f, text.as_bytes())?;
        Ok(f)
    };
    let (server_file, client_file) = (write(&server)?, write(&client)?);
    let env = [("NO_COLOR", "1"), ("RUST_LOG", "warn")];
    let path = |f: &tempfile::NamedTempFile| f.path().display().to_string();
    let server = Proc::spawn(
        "rathole server",
        bin,
        &["--server".to_string(), path(&server_file)],
        &env,
    )?;
    let client = Proc::spawn(
        "rathole client",
        bin,
        &["--client".to_string(), path(&client_file)],
        &env,
    )?;
    Ok((vec![server, client], public, vec![server_file, client_file]))
}

/// Waits until a byte sent to the echo at `addr` comes back (the peer's client may connect
/// to its server after the public port is up).
async fn wait_echo(addr: SocketAddr) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + READY_LIMIT;
    let mut last = None;
    while tokio::time::Instant::now() < deadline {
        let attempt = async {
            let mut s = TcpStream::connect(addr).await?;
            s.write_all(b"x").await?;
            let mut b = [0u8; 1];
            s.read_exact(&mut b).await?;
            anyhow::ensure!(&b == b"x", "the echo answered {b:?}");
            Ok(())
        };
        match tokio::time::timeout(Duration::from_secs(2), attempt).await {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(e)) => last = Some(e),
            Err(_) => last = Some(anyhow::anyhow!("no echo within 2 s")),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!(
        "no echo through {addr} within {READY_LIMIT:?}: {}",
        last.map_or_else(String::new, |e| format!("{e:#}"))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_bores_public_address() {
        let line = "2026-12-02T02:00:00Z  INFO bore_cli::client: listening at 127.0.0.1:41234";
        assert_eq!(listening_at(line), Some("127.0.0.1:41234".parse().unwrap()));
        let coloured = "\u{1b}[2m..\u{1b}[0m listening at 127.0.0.1:5000\u{1b}[0m";
        assert_eq!(
            listening_at(coloured),
            Some("127.0.0.1:5000".parse().unwrap())
        );
        assert_eq!(listening_at("connected to server"), None);
    }
}
