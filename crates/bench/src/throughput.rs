//! Bulk transfer: streams that upload to the sink or download from the source for a fixed
//! time, all started together; the result is the bytes delivered over the time until the last
//! stream's receiver confirmed its count.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Context as _};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::pattern;
use crate::targets::{Ledger, Targets, READ_BUF};

/// Which way the bytes go, seen from the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Upload,
    Download,
}

/// One workload: a direction and a number of parallel streams.
#[derive(Debug, Clone, Copy)]
pub struct Workload {
    pub direction: Direction,
    pub streams: u32,
}

impl Workload {
    /// A short name for the table.
    pub fn label(&self) -> String {
        let dir = match self.direction {
            Direction::Upload => "upload",
            Direction::Download => "download",
        };
        match self.streams {
            1 => format!("{dir}, 1 stream"),
            n => format!("{dir}, {n} streams"),
        }
    }
}

/// Bytes moved and the time it took.
#[derive(Debug, Clone, Copy)]
pub struct Transfer {
    pub bytes: u64,
    pub elapsed: Duration,
}

impl Transfer {
    /// Gbit/s (10^9 bits per second).
    pub fn gbit_per_s(&self) -> f64 {
        self.bytes as f64 * 8.0 / self.elapsed.as_secs_f64().max(1e-9) / 1e9
    }
}

/// Where one run of workloads goes: the sink and source addresses (direct or public) and the
/// ledger of the source behind them.
pub struct Endpoints<'a> {
    pub sink: SocketAddr,
    pub source: SocketAddr,
    pub ledger: &'a Ledger,
}

impl<'a> Endpoints<'a> {
    /// The targets themselves.
    pub fn direct(targets: &'a Targets) -> Endpoints<'a> {
        Endpoints {
            sink: targets.sink,
            source: targets.source,
            ledger: &targets.ledger,
        }
    }
}

/// Longest wait for the source's verdicts after the clients finished.
const VERDICT_WAIT: Duration = Duration::from_secs(10);

/// Runs `work` for `duration` with `chunk` as each write; fails on any I/O error or count
/// mismatch.
pub async fn run(
    to: &Endpoints<'_>,
    work: Workload,
    duration: Duration,
    chunk: &Arc<[u8]>,
) -> anyhow::Result<Transfer> {
    let addr = match work.direction {
        Direction::Upload => to.sink,
        Direction::Download => to.source,
    };
    let streams = connect_all(addr, work.streams).await?;
    let verdicts = to.ledger.done() + u64::from(work.streams);
    let start = Instant::now();
    let mut tasks = JoinSet::new();
    for stream in streams {
        match work.direction {
            Direction::Upload => tasks.spawn(upload(stream, start + duration, chunk.clone())),
            Direction::Download => tasks.spawn(download(stream, duration)),
        };
    }
    let (mut bytes, mut end) = (0, start);
    while let Some(joined) = tasks.join_next().await {
        let (n, finished) = joined.context("a transfer task panicked")??;
        bytes += n;
        end = end.max(finished);
    }
    if work.direction == Direction::Download {
        to.ledger.settle(verdicts, VERDICT_WAIT).await?;
    }
    Ok(Transfer {
        bytes,
        elapsed: end - start,
    })
}

async fn connect_all(addr: SocketAddr, n: u32) -> anyhow::Result<Vec<TcpStream>> {
    let mut streams = Vec::with_capacity(n as usize);
    for _ in 0..n {
        let stream = TcpStream::connect(addr)
            .await
            .with_context(|| format!("cannot connect to {addr}"))?;
        stream.set_nodelay(true)?;
        streams.push(stream);
    }
    Ok(streams)
}

/// Writes until `deadline`, half-closes, and checks the sink's count. Returns the bytes
/// written and when the count arrived.
async fn upload(
    mut stream: TcpStream,
    deadline: Instant,
    chunk: Arc<[u8]>,
) -> anyhow::Result<(u64, Instant)> {
    let mut written = 0u64;
    while Instant::now() < deadline {
        stream
            .write_all(&chunk)
            .await
            .with_context(|| format!("upload: write failed after {written} bytes"))?;
        written += chunk.len() as u64;
    }
    stream
        .shutdown()
        .await
        .context("upload: cannot half-close")?;
    let received = stream
        .read_u64()
        .await
        .with_context(|| format!("upload: wrote {written} bytes, the sink sent no count"))?;
    let end = Instant::now();
    ensure!(
        received != pattern::CORRUPT,
        "upload: the sink received corrupted or reordered bytes"
    );
    ensure!(
        received == written,
        "upload: wrote {written} bytes, the sink received {received}"
    );
    Ok((written, end))
}

/// Asks the source for `duration` of data, reads and checks it to the end, then reports the
/// count back. Returns the bytes received and when the last arrived.
async fn download(mut stream: TcpStream, duration: Duration) -> anyhow::Result<(u64, Instant)> {
    let micros = u64::try_from(duration.as_micros()).unwrap_or(u64::MAX);
    stream
        .write_u64(micros)
        .await
        .context("download: cannot send the request")?;
    let mut buf = vec![0; READ_BUF];
    let (mut count, mut intact) = (0u64, true);
    loop {
        let n = stream
            .read(&mut buf)
            .await
            .with_context(|| format!("download: read failed after {count} bytes"))?;
        if n == 0 {
            break;
        }
        intact &= pattern::check(count, &buf[..n]);
        count += n as u64;
    }
    let end = Instant::now();
    let report = if intact { count } else { pattern::CORRUPT };
    stream
        .write_u64(report)
        .await
        .context("download: cannot send the count back")?;
    stream.shutdown().await.context("download: cannot close")?;
    ensure!(intact, "download: received corrupted or reordered bytes");
    Ok((count, end))
}
