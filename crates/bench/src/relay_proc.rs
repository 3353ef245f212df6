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
use std::time::Duration;

use anyhow::Context as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::procs::Proc;

/// The flag that makes this executable a relay child.
pub const FLAG: &str = "--serve-relay";

/// Copy buffer of each direction of each connection: the size of the bench's writes and the
/// sink's reads, so a relay does not split them more than the kernel does.
const COPY_BUF: usize = 256 * 1024;

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
    proc: Proc,
    /// Where it listens, one address per upstream, in the same order.
    addrs: Vec<SocketAddr>,
}

impl RelayProcess {
    /// Starts a relay child forwarding to `upstreams` and reads its addresses.
    async fn start(name: &'static str, upstreams: &[SocketAddr]) -> anyhow::Result<RelayProcess> {
        let exe = std::env::current_exe().context("cannot find the bench's own executable")?;
        let mut args = vec![FLAG.to_string()];
        args.extend(upstreams.iter().map(SocketAddr::to_string));
        let mut proc = Proc::spawn(name, &exe, &args, &[])?;
        let addrs = proc
            .wait_stdout("its addresses", |lines| {
                let relays: Vec<&String> =
                    lines.iter().filter(|l| l.starts_with("relay ")).collect();
                (relays.len() >= upstreams.len()).then(|| {
                    relays
                        .iter()
                        .map(|l| parse_relay(l))
                        .collect::<anyhow::Result<Vec<_>>>()
                })
            })
            .await?
            .with_context(|| format!("{name}'s addresses"))?;
        Ok(RelayProcess { proc, addrs })
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
        Ok(self.first.proc.cpu_seconds()? + self.second.proc.cpu_seconds()?)
    }

    /// Stops both relays; returns what is worth a note about them.
    pub async fn stop(self) -> Vec<String> {
        let mut notes = self.first.proc.stop().await;
        notes.extend(self.second.proc.stop().await);
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
