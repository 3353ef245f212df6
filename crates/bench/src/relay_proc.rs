//! The reference path: two plain TCP forwarders chained in two child processes
//! (client → relay 1 → relay 2 → target).
//!
//! It has the same processes and socket hops as gateway + agent, but no encryption and no
//! multiplexing: one upstream connection per client connection, bytes copied as they come. So
//! it shows what any user-space tunnel pays on this machine for the two extra hops alone, and
//! the tunnel's numbers can be judged against that ceiling rather than against a direct
//! connection no tunnel can reach.
//!
//! Each relay is this same executable run with `--serve-relay UPSTREAM...`. For each upstream
//! in order it listens on `127.0.0.1:0` and prints `relay ADDR`; it copies each accepted
//! connection to a new connection to that upstream, and exits when its stdin closes, so it
//! never outlives the bench.

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context as _};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, ChildStdin, Command};

use crate::sys;

/// The flag that makes this executable a relay child.
pub const FLAG: &str = "--serve-relay";

/// Copy buffer of each direction of each connection: the size of the bench's writes and the
/// sink's reads, so a relay does not split them more than the kernel does.
const COPY_BUF: usize = 256 * 1024;

/// Longest a relay child may take to print its addresses.
const STARTUP_LIMIT: Duration = Duration::from_secs(10);

/// The child's side: relays to each of `upstreams` until stdin closes.
pub fn serve(upstreams: &[SocketAddr]) -> anyhow::Result<()> {
    // Multi-threaded like the gateway and agent, so the reference is not held back by a
    // single thread where the tunnel is not.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        let mut out = tokio::io::stdout();
        for &upstream in upstreams {
            let addr = listen(upstream).await?;
            out.write_all(format!("relay {addr}\n").as_bytes()).await?;
        }
        out.flush().await?;
        // Nothing is ever sent on stdin: it only tells when the bench is gone.
        let mut stdin = tokio::io::stdin();
        let mut buf = [0u8; 64];
        while stdin.read(&mut buf).await? > 0 {}
        Ok(())
    })
}

/// Binds `127.0.0.1:0` and spawns a loop that relays each accepted connection to `upstream`,
/// until the runtime ends.
async fn listen(upstream: SocketAddr) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .with_context(|| format!("cannot bind a relay to {upstream}"))?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((client, _)) => {
                    tokio::spawn(relay(client, upstream));
                }
                Err(e) => {
                    // Out of file descriptors, most likely: the clients see it as timeouts.
                    eprintln!("bench relay: cannot accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    });
    Ok(addr)
}

/// Copies both ways between `client` and a new connection to `upstream`. An EOF from one
/// side shuts down the write side of the other; both sockets close when both directions are
/// done.
async fn relay(mut client: TcpStream, upstream: SocketAddr) {
    let mut server = match TcpStream::connect(upstream).await {
        Ok(server) => server,
        Err(e) => {
            // The client sees its connection closed and fails its check; this says why.
            eprintln!("bench relay: cannot connect to {upstream}: {e}");
            return;
        }
    };
    // Like the gateway and agent, and like the bench's own sockets: small messages go out
    // at once.
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    // An error (a reset) ends both directions; the clients check what arrived.
    let _ = tokio::io::copy_bidirectional_with_sizes(&mut client, &mut server, COPY_BUF, COPY_BUF)
        .await;
}

/// The bench's side: one running relay child; killed when dropped.
struct RelayProcess {
    name: &'static str,
    child: Child,
    pid: u32,
    /// Held open: the child exits when it closes.
    _stdin: ChildStdin,
    /// Where it listens, one address per upstream, in the same order.
    addrs: Vec<SocketAddr>,
}

impl RelayProcess {
    /// Starts a relay child forwarding to `upstreams` and reads its addresses.
    async fn start(name: &'static str, upstreams: &[SocketAddr]) -> anyhow::Result<RelayProcess> {
        let exe = std::env::current_exe().context("cannot find the bench's own executable")?;
        let mut child = Command::new(exe)
            .arg(FLAG)
            .args(upstreams.iter().map(SocketAddr::to_string))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start the {name} child process"))?;
        let pid = child
            .id()
            .with_context(|| format!("{name} exited at once"))?;
        let stdin = child.stdin.take().context("no stdin pipe")?;
        let stdout = child.stdout.take().context("no stdout pipe")?;
        let mut lines = BufReader::new(stdout).lines();
        let mut addrs = Vec::with_capacity(upstreams.len());
        while addrs.len() < upstreams.len() {
            let line = match tokio::time::timeout(STARTUP_LIMIT, lines.next_line()).await {
                Ok(Ok(Some(line))) => line,
                Ok(Ok(None)) => bail!("{name} exited before printing its addresses"),
                Ok(Err(e)) => bail!("cannot read from {name}: {e}"),
                Err(_) => bail!("{name} did not print its addresses within {STARTUP_LIMIT:?}"),
            };
            addrs.push(parse_relay(&line).context(name)?);
        }
        Ok(RelayProcess {
            name,
            child,
            pid,
            _stdin: stdin,
            addrs,
        })
    }

    /// CPU seconds used so far.
    fn cpu_seconds(&self) -> anyhow::Result<f64> {
        sys::cpu_seconds(self.pid).with_context(|| format!("{} (pid {})", self.name, self.pid))
    }

    /// A note if the child exited early; then kills it.
    async fn stop(mut self) -> Option<String> {
        let note = match self.child.try_wait() {
            Ok(Some(status)) => Some(format!("{} exited during the bench: {status}", self.name)),
            _ => None,
        };
        let _ = self.child.start_kill();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await;
        note
    }
}

/// Reads a relay child's `relay ADDR` line.
fn parse_relay(line: &str) -> anyhow::Result<SocketAddr> {
    line.strip_prefix("relay ")
        .and_then(|addr| addr.trim().parse().ok())
        .with_context(|| format!("printed `{line}`, not `relay IP:PORT`"))
}

/// Two relay processes in a row, the way a gateway and an agent sit between a client and a
/// target: relay 1 is the one clients connect to, relay 2 connects to the targets.
pub struct RelayChain {
    first: RelayProcess,
    second: RelayProcess,
    /// Where clients connect for each target, in the order given.
    pub entry: Vec<SocketAddr>,
}

impl RelayChain {
    /// Starts relay 2 towards `targets`, then relay 1 towards relay 2.
    pub async fn start(targets: &[SocketAddr]) -> anyhow::Result<RelayChain> {
        let second = RelayProcess::start("relay 2", targets).await?;
        let first = RelayProcess::start("relay 1", &second.addrs).await?;
        let entry = first.addrs.clone();
        Ok(RelayChain {
            first,
            second,
            entry,
        })
    }

    /// CPU seconds both relays used so far, together.
    pub fn cpu_seconds(&self) -> anyhow::Result<f64> {
        Ok(self.first.cpu_seconds()? + self.second.cpu_seconds()?)
    }

    /// Stops both relays; returns what is worth a note about them.
    pub async fn stop(self) -> Vec<String> {
        let mut notes = Vec::new();
        notes.extend(self.first.stop().await);
        notes.extend(self.second.stop().await);
        notes
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::targets;

    #[test]
    fn reads_relay_lines() {
        let addr = parse_relay("relay 127.0.0.1:5000").unwrap();
        assert_eq!(addr, "127.0.0.1:5000".parse().unwrap());
        assert!(parse_relay("relay [::1]:7 ").is_ok());
        assert!(parse_relay("relay localhost:5000").is_err());
        assert!(parse_relay("echo 127.0.0.1:5000").is_err());
        assert!(parse_relay("").is_err());
    }

    /// Two relays in a row carry bytes both ways and pass the client's half-close on: the echo
    /// target ends its side only after it saw the client's EOF.
    #[tokio::test]
    async fn relays_with_half_close() {
        let echo = targets::start_echo(Arc::default()).await.unwrap();
        let second = listen(echo).await.unwrap();
        let first = listen(second).await.unwrap();
        let mut stream = TcpStream::connect(first).await.unwrap();
        let sent: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let (mut read, mut write) = stream.split();
        let writing = async {
            write.write_all(&sent).await?;
            write.shutdown().await
        };
        let mut back = Vec::new();
        let (written, read) = tokio::join!(writing, read.read_to_end(&mut back));
        written.unwrap();
        read.unwrap();
        assert_eq!(back, sent);
    }
}
