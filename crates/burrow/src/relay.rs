//! Copies bytes between a stream and a local socket (TCP or unix), both ways, with half-close.
//!
//! Flow control reaches into the sockets: a relay reads from its socket only the credit it
//! has reserved on the stream, and gives back the credit of received bytes once it has
//! written them, so what a session's connections hold together is bounded by its windows.
//!
//! Reads wait for readiness before taking a buffer, and a read that drains the socket lets
//! the buffer go, so an idle connection holds no buffer at all; small reads are copied into
//! right-sized chunks so queued data does not pin large allocations. A reset on either side
//! is passed on as a reset on the other (an RST to the local peer), so nothing hangs.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::Poll;

use burrow_proto::ErrorCode;
use bytes::{BufMut, Bytes, BytesMut};
use socket2::SockRef;
use tokio::net::{tcp, unix, TcpStream, UnixStream};
use tokio_util::io::poll_read_buf;

use crate::gather;
use crate::session::{Stream, StreamError};

pub mod streams;

/// Largest single read from a local socket.
const READ_CHUNK: usize = 256 * 1024;
/// The buffer is topped up to `READ_CHUNK` when less than this is left in it.
const SMALL_READ: usize = 4096;
/// A read that drained the socket and is smaller than this is copied into a chunk of its own
/// size and the read buffer let go: the connection may now stay idle, and a small chunk must
/// not pin a 256 KiB buffer while it waits in a queue.
const COPY_BELOW: usize = 64 * 1024;
/// Most bytes of received chunks handed to the local socket in one vectored write.
const WRITE_GATHER: usize = 1024 * 1024;

/// A local connection: a client on the gateway's public port, or a target at the agent.
#[derive(Debug)]
pub enum Local {
    /// TCP.
    Tcp(TcpStream),
    /// A unix socket.
    Unix(UnixStream),
}

impl Local {
    /// The two directions, borrowed separately so one task can read and write at once.
    fn halves(&mut self) -> (LocalRead<'_>, LocalWrite<'_>) {
        match self {
            Local::Tcp(s) => {
                let (r, w) = s.split();
                (LocalRead::Tcp(r), LocalWrite::Tcp(w))
            }
            Local::Unix(s) => {
                let (r, w) = s.split();
                (LocalRead::Unix(r), LocalWrite::Unix(w))
            }
        }
    }
}

/// The reading direction of a [`Local`].
enum LocalRead<'a> {
    Tcp(tcp::ReadHalf<'a>),
    Unix(unix::ReadHalf<'a>),
}

impl LocalRead<'_> {
    async fn readable(&self) -> io::Result<()> {
        match self {
            LocalRead::Tcp(s) => s.readable().await,
            LocalRead::Unix(s) => s.readable().await,
        }
    }

    /// Reads at most `limit` bytes of what is there into `buf`, in one poll: `None` when the
    /// readiness was stale (nothing to read after all; the buffer is let go and the socket is
    /// registered for the next data). Else the count and whether the read drained the socket
    /// (it did not fill the room it had). The read goes through `AsyncRead`, whose short read
    /// tells tokio the socket is drained: the next wait needs no system call that would only
    /// say "would block".
    async fn read_some(
        &mut self,
        buf: &mut BytesMut,
        limit: usize,
    ) -> io::Result<Option<(usize, bool)>> {
        if buf.capacity() - buf.len() < SMALL_READ.min(limit) {
            buf.reserve(READ_CHUNK.min(limit));
        }
        let room = (buf.capacity() - buf.len()).min(limit);
        let polled = std::future::poll_fn(|cx| {
            let mut limited = (&mut *buf).limit(room);
            Poll::Ready(match self {
                LocalRead::Tcp(s) => poll_read_buf(Pin::new(s), cx, &mut limited),
                LocalRead::Unix(s) => poll_read_buf(Pin::new(s), cx, &mut limited),
            })
        })
        .await;
        match polled {
            Poll::Ready(n) => {
                let n = n?;
                Ok(Some((n, n < room)))
            }
            Poll::Pending => {
                *buf = BytesMut::new();
                Ok(None)
            }
        }
    }
}

/// The writing direction of a [`Local`].
enum LocalWrite<'a> {
    Tcp(tcp::WriteHalf<'a>),
    Unix(unix::WriteHalf<'a>),
}

impl LocalWrite<'_> {
    async fn writable(&self) -> io::Result<()> {
        match self {
            LocalWrite::Tcp(s) => s.writable().await,
            LocalWrite::Unix(s) => s.writable().await,
        }
    }

    fn try_write_vectored(&self, data: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            LocalWrite::Tcp(s) => s.try_write_vectored(data),
            LocalWrite::Unix(s) => s.try_write_vectored(data),
        }
    }

    fn sock(&self) -> SockRef<'_> {
        match self {
            LocalWrite::Tcp(s) => SockRef::from(s.as_ref()),
            LocalWrite::Unix(s) => SockRef::from(s.as_ref()),
        }
    }

    /// Writes all of `chunks`, as few system calls as the socket allows, and empties it.
    async fn write_all(&self, chunks: &mut VecDeque<Bytes>) -> io::Result<()> {
        while !chunks.is_empty() {
            match gather::with_slices(chunks, |slices| self.try_write_vectored(slices)) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => gather::consume(chunks, n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.writable().await?,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Half-closes our sending side (FIN to the local peer).
    fn shutdown_write(&self) {
        let _ = self.sock().shutdown(std::net::Shutdown::Write);
    }

    /// Makes the close an abort: the local peer gets RST, not FIN, when the socket is dropped.
    fn abort(&self) {
        if let LocalWrite::Tcp(_) = self {
            let _ = self.sock().set_linger(Some(std::time::Duration::ZERO));
        }
    }
}

/// What a relay moved and how it ended.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RelayStats {
    /// Bytes read from the local socket and sent into the stream.
    pub from_local: u64,
    /// Bytes received from the stream and written to the local socket.
    pub to_local: u64,
    /// `None` when both directions finished cleanly; else what broke it.
    pub error: Option<String>,
}

enum Broke {
    Local(io::Error),
    Stream(StreamError),
}

/// Counters a relay adds its bytes to as they move (for metrics), besides its [`RelayStats`].
#[derive(Debug, Clone, Copy)]
pub struct Meter<'a> {
    /// Bytes read from the local socket.
    pub from_local: &'a AtomicU64,
    /// Bytes written to the local socket.
    pub to_local: &'a AtomicU64,
}

/// Relays until both directions have finished or either side fails.
pub async fn relay(stream: &Stream, local: &mut Local) -> RelayStats {
    relay_metered(stream, local, None).await
}

/// [`relay`], adding the bytes to `meter` as they move.
pub async fn relay_metered(
    stream: &Stream,
    local: &mut Local,
    meter: Option<Meter<'_>>,
) -> RelayStats {
    let (mut reader, writer) = local.halves();
    let mut from_local = 0u64;
    let mut to_local = 0u64;
    let up = async {
        let mut buf = BytesMut::new();
        loop {
            // Data first, then credit, then the read: an idle connection holds neither a
            // buffer nor credit, and no connection holds a buffer while it waits for credit
            // (it reads only what the stream may send at once).
            reader.readable().await.map_err(Broke::Local)?;
            let credit = stream.reserve(READ_CHUNK).await.map_err(Broke::Stream)?;
            let Some((n, drained)) = reader
                .read_some(&mut buf, credit)
                .await
                .map_err(Broke::Local)?
            else {
                stream
                    .send_reserved(Bytes::new())
                    .await
                    .map_err(Broke::Stream)?;
                // A stale readiness (the socket is now registered for the next data), or
                // tokio's cooperative budget for this task spent: `readable()` does not
                // consult that budget, so looping straight back would spin. Hand the task
                // back to the scheduler first.
                tokio::task::yield_now().await;
                continue;
            };
            if n == 0 {
                stream
                    .send_reserved(Bytes::new())
                    .await
                    .map_err(Broke::Stream)?;
                stream.finish();
                return Ok::<(), Broke>(());
            }
            from_local += n as u64;
            if let Some(m) = meter {
                m.from_local.fetch_add(n as u64, Ordering::Relaxed);
            }
            // While the socket keeps filling the buffer, chunks are cut from it and the rest
            // is read into next. Once a read drains the socket, the connection may stay idle
            // for hours: it must not keep the buffer (with thousands of idle connections
            // that would be most of the memory), so what is left of it goes.
            let chunk = if drained && n < COPY_BELOW {
                let c = Bytes::copy_from_slice(&buf[..n]);
                buf = BytesMut::new();
                c
            } else {
                let c = buf.split().freeze();
                if drained {
                    buf = BytesMut::new();
                }
                c
            };
            stream.send_reserved(chunk).await.map_err(Broke::Stream)?;
        }
    };
    let down = async {
        let mut chunks = VecDeque::new();
        loop {
            match stream.recv_many(&mut chunks, WRITE_GATHER).await {
                Ok(true) => {
                    let n: usize = chunks.iter().map(Bytes::len).sum();
                    let written = writer.write_all(&mut chunks).await;
                    // Credit goes back once the bytes are in the socket, not when they were
                    // taken: a client that does not read holds its stream's window here and
                    // no more, so a session's clients together hold at most its window.
                    stream.release(n);
                    written.map_err(Broke::Local)?;
                    to_local += n as u64;
                    if let Some(m) = meter {
                        m.to_local.fetch_add(n as u64, Ordering::Relaxed);
                    }
                }
                Ok(false) => {
                    writer.shutdown_write();
                    return Ok::<(), Broke>(());
                }
                Err(e) => return Err(Broke::Stream(e)),
            }
        }
    };
    let outcome = tokio::try_join!(up, down);
    let error = match outcome {
        Ok(_) => None,
        Err(Broke::Local(e)) => {
            stream.reset(ErrorCode::StreamReset);
            Some(format!("local connection: {e}"))
        }
        Err(Broke::Stream(e)) => {
            writer.abort();
            Some(e.to_string())
        }
    };
    RelayStats {
        from_local,
        to_local,
        error,
    }
}

/// Which end of the service the local socket of a relay is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LocalIs {
    /// The remote client (at the gateway).
    Client,
    /// The target service (at the agent).
    Target,
}

/// Logs the one info line per finished stream: service, client, bytes each way, duration.
pub fn log_end(
    service: &str,
    client: Option<std::net::SocketAddr>,
    stats: &RelayStats,
    started: tokio::time::Instant,
    local: LocalIs,
) {
    let (to_service, to_client) = match local {
        LocalIs::Client => (stats.from_local, stats.to_local),
        LocalIs::Target => (stats.to_local, stats.from_local),
    };
    let client = client.map_or_else(|| "-".to_string(), |c| c.to_string());
    let duration_ms = started.elapsed().as_millis() as u64;
    // `None` leaves the field out: no `error=""` on every clean stream.
    let error = stats.error.as_deref();
    tracing::info!(
        service,
        client = %client,
        bytes_to_service = to_service,
        bytes_to_client = to_client,
        duration_ms,
        error,
        "stream closed"
    );
}
