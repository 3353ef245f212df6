//! The services the workloads talk to, run inside the bench on `127.0.0.1:0`:
//! - **echo** writes back what it reads and half-closes after the client does;
//! - **sink** reads the pattern to the end, checks it, then answers with the byte count;
//! - **source** reads an 8-byte duration (µs), writes the pattern that long, half-closes, then
//!   reads the client's 8-byte count and records in its [`Ledger`] whether it matches.
//!
//! Counts are big-endian `u64`; [`pattern::CORRUPT`] stands for "the pattern was broken".

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{bail, Context as _};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::pattern;

/// Read buffer of the sink and of download clients.
pub const READ_BUF: usize = 256 * 1024;

/// Echo buffer: small, since the memory rows hold thousands of echo connections.
const ECHO_BUF: usize = 4096;

/// One echo, one sink and one source, each on its own port.
pub struct Targets {
    pub echo: SocketAddr,
    pub sink: SocketAddr,
    pub source: SocketAddr,
    /// The source's verdicts.
    pub ledger: Arc<Ledger>,
}

impl Targets {
    /// Binds the three services and spawns their accept loops; the source writes `write_len`
    /// bytes at a time.
    pub async fn start(write_len: usize) -> anyhow::Result<Targets> {
        let ledger = Arc::new(Ledger::default());
        let chunk: Arc<[u8]> = pattern::buffer(write_len).into();
        let echo = start_echo(Arc::default()).await?;
        let sink = serve("sink", sink).await?;
        let source = serve("source", {
            let ledger = ledger.clone();
            move |s| source(s, chunk.clone(), ledger.clone())
        })
        .await?;
        Ok(Targets {
            echo,
            sink,
            source,
            ledger,
        })
    }
}

/// Starts an echo service that counts its open connections in `open`.
pub async fn start_echo(open: Arc<AtomicUsize>) -> anyhow::Result<SocketAddr> {
    serve("echo", move |s| echo(s, open.clone())).await
}

/// Binds `127.0.0.1:0` and spawns a loop that runs `handle` on each accepted connection in
/// its own task, until the runtime ends.
async fn serve<F, Fut>(name: &'static str, handle: F) -> anyhow::Result<SocketAddr>
where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .with_context(|| format!("cannot bind the {name} target"))?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    tokio::spawn(handle(stream));
                }
                Err(e) => {
                    // Out of file descriptors, most likely: the clients see it as timeouts.
                    eprintln!("bench: {name} target cannot accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    });
    Ok(addr)
}

/// Counts a connection as open while alive.
struct OpenGuard(Arc<AtomicUsize>);

impl OpenGuard {
    fn new(count: Arc<AtomicUsize>) -> OpenGuard {
        count.fetch_add(1, Ordering::SeqCst);
        OpenGuard(count)
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn echo(mut stream: TcpStream, open: Arc<AtomicUsize>) {
    let _open = OpenGuard::new(open);
    let mut buf = vec![0; ECHO_BUF];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) => {
                let _ = stream.shutdown().await;
                return;
            }
            Ok(n) => {
                if stream.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
            // The client reset: nothing to answer. Clients check what they get back.
            Err(_) => return,
        }
    }
}

async fn sink(mut stream: TcpStream) {
    // An I/O error shows at the client as a missing count.
    let _ = sink_inner(&mut stream).await;
}

async fn sink_inner(stream: &mut TcpStream) -> std::io::Result<()> {
    let mut buf = vec![0; READ_BUF];
    let (mut count, mut intact) = (0u64, true);
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        intact &= pattern::check(count, &buf[..n]);
        count += n as u64;
    }
    let reply = if intact { count } else { pattern::CORRUPT };
    stream.write_all(&reply.to_be_bytes()).await?;
    stream.shutdown().await
}

async fn source(mut stream: TcpStream, chunk: Arc<[u8]>, ledger: Arc<Ledger>) {
    let verdict = source_inner(&mut stream, &chunk).await;
    ledger.record(verdict);
}

async fn source_inner(stream: &mut TcpStream, chunk: &[u8]) -> anyhow::Result<()> {
    let micros = stream
        .read_u64()
        .await
        .context("source: no duration from the client")?;
    let deadline = Instant::now() + Duration::from_micros(micros);
    let mut written = 0u64;
    while Instant::now() < deadline {
        stream
            .write_all(chunk)
            .await
            .with_context(|| format!("source: write failed after {written} bytes"))?;
        written += chunk.len() as u64;
    }
    stream
        .shutdown()
        .await
        .context("source: cannot half-close")?;
    let received = stream
        .read_u64()
        .await
        .with_context(|| format!("source: wrote {written} bytes, the client sent no count"))?;
    match received {
        pattern::CORRUPT => bail!("download: the client received corrupted or reordered bytes"),
        n if n != written => bail!("download: source wrote {written} bytes, client received {n}"),
        _ => Ok(()),
    }
}

/// How many source connections have finished, and what went wrong in them.
#[derive(Default)]
pub struct Ledger {
    done: watch::Sender<u64>,
    errors: Mutex<Vec<String>>,
}

impl Ledger {
    fn record(&self, verdict: anyhow::Result<()>) {
        if let Err(e) = verdict {
            let mut errors = self.errors.lock().unwrap_or_else(PoisonError::into_inner);
            errors.push(format!("{e:#}"));
        }
        self.done.send_modify(|n| *n += 1);
    }

    /// Connections finished so far: take it before a run, then wait for it plus the run's
    /// connections.
    pub fn done(&self) -> u64 {
        *self.done.borrow()
    }

    /// Waits until `total` connections have finished (at most `limit`), then returns the
    /// errors recorded since the last call.
    pub async fn settle(&self, total: u64, limit: Duration) -> anyhow::Result<()> {
        let mut done = self.done.subscribe();
        let waited = tokio::time::timeout(limit, done.wait_for(|&n| n >= total)).await;
        let errors =
            std::mem::take(&mut *self.errors.lock().unwrap_or_else(PoisonError::into_inner));
        if let Some(first) = errors.first() {
            bail!("{first} ({} download streams failed)", errors.len());
        }
        match waited {
            Ok(Ok(_)) => Ok(()),
            _ => bail!(
                "download: the source finished {} of {total} streams within {limit:?}",
                self.done()
            ),
        }
    }
}
