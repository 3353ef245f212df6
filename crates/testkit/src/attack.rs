//! Raw attack clients: floods a hostile internet can send a gateway, bounded in count and time.
//!
//! - [`IdleFlood`]: from each of several source addresses (`127.0.0.2`, `127.0.0.3`, ... are all
//!   loopback on Linux), hold a number of TCP connections that never send a byte, and re-open
//!   each one as soon as the other side cuts it. Against the tunnel port this is the pre-auth
//!   flood: every connection waits in the TLS handshake until its deadline.
//!
//! Every flood stops by itself at its deadline or after `max_connects` connections, and when
//! [`IdleFlood::stop`] is called or the handle dropped.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::TcpSocket;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How an [`IdleFlood`] runs.
#[derive(Debug, Clone)]
pub struct FloodOpts {
    /// Where to connect.
    pub target: SocketAddr,
    /// Source addresses to bind the client sockets to.
    pub sources: Vec<IpAddr>,
    /// Connections held open from each source.
    pub per_source: usize,
    /// Pause before re-opening a connection that was cut (or failed to connect).
    pub reopen_after: Duration,
    /// The flood stops after this long.
    pub duration: Duration,
    /// The flood stops after this many connections in all.
    pub max_connects: u64,
}

impl FloodOpts {
    /// `per_source` idle connections from each of `sources` to `target`, re-opened 20 ms after
    /// each cut, for at most 60 s and 200,000 connections.
    pub fn new(target: SocketAddr, sources: Vec<IpAddr>, per_source: usize) -> FloodOpts {
        FloodOpts {
            target,
            sources,
            per_source,
            reopen_after: Duration::from_millis(20),
            duration: Duration::from_secs(60),
            max_connects: 200_000,
        }
    }
}

/// The loopback address `127.0.0.<last>`.
pub fn loopback(last: u8) -> IpAddr {
    IpAddr::from([127, 0, 0, last])
}

/// Counters of a flood, updated as it runs.
#[derive(Debug, Default)]
pub struct FloodCounts {
    /// Connections established.
    pub connects: AtomicU64,
    /// Connect attempts that failed.
    pub connect_errors: AtomicU64,
    /// Connections the other side closed (EOF or reset).
    pub cuts: AtomicU64,
    /// Connections open right now.
    pub open: AtomicU64,
}

/// What a flood did, when it ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FloodReport {
    /// Connections established.
    pub connects: u64,
    /// Connect attempts that failed.
    pub connect_errors: u64,
    /// Connections the other side closed.
    pub cuts: u64,
}

impl std::fmt::Display for FloodReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} connections ({} cut by the server, {} failed to connect)",
            self.connects, self.cuts, self.connect_errors
        )
    }
}

/// A running idle-connection flood (see the module docs). Stops when dropped.
pub struct IdleFlood {
    stop: CancellationToken,
    tasks: JoinSet<()>,
    counts: Arc<FloodCounts>,
}

impl IdleFlood {
    /// Starts the flood on the current runtime.
    pub fn start(opts: FloodOpts) -> IdleFlood {
        let stop = CancellationToken::new();
        let counts = Arc::new(FloodCounts::default());
        let deadline = Instant::now() + opts.duration;
        let mut tasks = JoinSet::new();
        for &source in &opts.sources {
            for _ in 0..opts.per_source {
                let stop = stop.clone();
                let counts = counts.clone();
                let opts = opts.clone();
                tasks.spawn(async move {
                    tokio::select! {
                        _ = stop.cancelled() => {}
                        _ = tokio::time::sleep_until(deadline) => {}
                        _ = hold(source, &opts, &counts) => {}
                    }
                });
            }
        }
        IdleFlood {
            stop,
            tasks,
            counts,
        }
    }

    /// The counters so far.
    pub fn counts(&self) -> &FloodCounts {
        &self.counts
    }

    /// Connections open right now.
    pub fn open(&self) -> u64 {
        self.counts.open.load(Ordering::Relaxed)
    }

    /// Waits (up to `timeout`) until at least `n` connections are open at once; returns
    /// whether they were.
    pub async fn wait_open(&self, n: u64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.open() < n {
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        true
    }

    /// Stops the flood, closes its connections, and says what it did.
    pub async fn stop(mut self) -> FloodReport {
        self.stop.cancel();
        while self.tasks.join_next().await.is_some() {}
        let c = &self.counts;
        FloodReport {
            connects: c.connects.load(Ordering::Relaxed),
            connect_errors: c.connect_errors.load(Ordering::Relaxed),
            cuts: c.cuts.load(Ordering::Relaxed),
        }
    }
}

impl Drop for IdleFlood {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// One slot of the flood: connect from `source`, read until the server cuts, pause, again.
async fn hold(source: IpAddr, opts: &FloodOpts, counts: &FloodCounts) {
    loop {
        if counts.connects.load(Ordering::Relaxed) + counts.connect_errors.load(Ordering::Relaxed)
            >= opts.max_connects
        {
            // Out of budget: stay quiet until the deadline or stop.
            std::future::pending::<()>().await;
        }
        match connect_from(source, opts.target).await {
            Ok(mut s) => {
                counts.connects.fetch_add(1, Ordering::Relaxed);
                counts.open.fetch_add(1, Ordering::Relaxed);
                let mut buf = [0u8; 256];
                // Never write; wait for the server to give up on us.
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {}
                    }
                }
                counts.open.fetch_sub(1, Ordering::Relaxed);
                counts.cuts.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => {
                counts.connect_errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        tokio::time::sleep(opts.reopen_after).await;
    }
}

/// A TCP connection to `target` from `source` (port 0).
pub async fn connect_from(
    source: IpAddr,
    target: SocketAddr,
) -> std::io::Result<tokio::net::TcpStream> {
    let socket = match source {
        IpAddr::V4(_) => TcpSocket::new_v4()?,
        IpAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.bind(SocketAddr::new(source, 0))?;
    socket.connect(target).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn holds_connections_from_each_source_and_reopens_them() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target = l.local_addr().unwrap();
        let sources = vec![loopback(2), loopback(3)];
        let flood = IdleFlood::start(FloodOpts::new(target, sources, 3));
        let mut seen = std::collections::HashSet::new();
        // Accept the six, then cut one: it comes back.
        let mut held = Vec::new();
        for _ in 0..6 {
            let (s, peer) = l.accept().await.unwrap();
            seen.insert(peer.ip());
            held.push(s);
        }
        assert!(flood.wait_open(6, Duration::from_secs(5)).await);
        assert_eq!(seen.len(), 2, "{seen:?}");
        drop(held.pop());
        let (_again, _) = tokio::time::timeout(Duration::from_secs(5), l.accept())
            .await
            .unwrap()
            .unwrap();
        // The server can accept before the flood's connect returns and counts it.
        let deadline = Instant::now() + Duration::from_secs(5);
        while flood.counts().connects.load(Ordering::Relaxed) < 7 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let report = flood.stop().await;
        assert_eq!(report.connects, 7, "{report}");
        assert_eq!(report.cuts, 1, "{report}");
    }
}
