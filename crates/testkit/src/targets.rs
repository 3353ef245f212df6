//! Services to publish through a tunnel, deterministic test data, and clients that check it.
//!
//! - [`TcpTarget::echo`] sends back what it reads and half-closes after the client does.
//! - [`TcpTarget::sink`] reads and counts, never writes.
//! - [`TcpTarget::source`] writes a [`Pattern`] (a set length, or until the peer goes) and
//!   ignores what it reads.
//!
//! Every target listens on `127.0.0.1:0` and stops, closing its connections, when dropped.

use std::net::{Shutdown, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, DropGuard};

/// SHA-256 of `data`.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A deterministic, non-repeating-looking byte stream, cheap to produce at any offset: one
/// block of a prime length, generated once per seed and repeated. Use it to send gigabytes
/// and check them byte by byte on the other side.
#[derive(Clone)]
pub struct Pattern {
    block: Arc<[u8]>,
}

/// Length of [`Pattern`]'s block: a prime, so the pattern never lines up with buffer sizes.
const PATTERN_BLOCK: usize = 1_048_573;

impl Pattern {
    /// The pattern for `seed`.
    pub fn new(seed: u64) -> Pattern {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let block: Vec<u8> = (0..PATTERN_BLOCK)
            .map(|_| {
                // xorshift64*
                x ^= x >> 12;
                x ^= x << 25;
                x ^= x >> 27;
                (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 56) as u8
            })
            .collect();
        Pattern {
            block: block.into(),
        }
    }

    /// Fills `buf` with the bytes at `offset..offset + buf.len()`.
    pub fn fill(&self, offset: u64, buf: &mut [u8]) {
        let mut pos = (offset % PATTERN_BLOCK as u64) as usize;
        let mut done = 0;
        while done < buf.len() {
            let n = (PATTERN_BLOCK - pos).min(buf.len() - done);
            buf[done..done + n].copy_from_slice(&self.block[pos..pos + n]);
            done += n;
            pos = 0;
        }
    }

    /// The bytes at `offset..offset + len`.
    pub fn bytes(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.fill(offset, &mut v);
        v
    }

    /// Whether `buf` equals the bytes at `offset`.
    pub fn matches(&self, offset: u64, buf: &[u8]) -> bool {
        let mut pos = (offset % PATTERN_BLOCK as u64) as usize;
        let mut done = 0;
        while done < buf.len() {
            let n = (PATTERN_BLOCK - pos).min(buf.len() - done);
            if buf[done..done + n] != self.block[pos..pos + n] {
                return false;
            }
            done += n;
            pos = 0;
        }
        true
    }
}

/// What a target does with a connection.
#[derive(Clone)]
enum Behaviour {
    Echo,
    Sink,
    Source { len: Option<u64>, pattern: Pattern },
}

/// A TCP service on `127.0.0.1:0` with counters. Stops when dropped.
pub struct TcpTarget {
    addr: SocketAddr,
    counters: Arc<Counters>,
    _stop: DropGuard,
}

#[derive(Default)]
struct Counters {
    accepted: AtomicU64,
    open: AtomicU64,
    bytes: AtomicU64,
}

impl TcpTarget {
    /// Echoes every byte back; half-closes once the client has.
    pub async fn echo() -> std::io::Result<TcpTarget> {
        Self::start(Behaviour::Echo).await
    }

    /// Reads and counts everything, writes nothing; closes after the client's FIN.
    pub async fn sink() -> std::io::Result<TcpTarget> {
        Self::start(Behaviour::Sink).await
    }

    /// Writes `len` bytes of `Pattern::new(seed)` to each connection, then half-closes
    /// (`None`: writes until the peer goes away). Reads and discards what it receives.
    pub async fn source(len: Option<u64>, seed: u64) -> std::io::Result<TcpTarget> {
        Self::start(Behaviour::Source {
            len,
            pattern: Pattern::new(seed),
        })
        .await
    }

    async fn start(behaviour: Behaviour) -> std::io::Result<TcpTarget> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let stop = CancellationToken::new();
        let counters = Arc::new(Counters::default());
        let (s, c) = (stop.clone(), counters.clone());
        tokio::spawn(async move {
            loop {
                let conn = tokio::select! {
                    _ = s.cancelled() => return,
                    r = listener.accept() => match r {
                        Ok((conn, _)) => conn,
                        Err(_) => {
                            tokio::select! {
                                _ = s.cancelled() => return,
                                _ = tokio::time::sleep(Duration::from_millis(10)) => continue,
                            }
                        }
                    },
                };
                c.accepted.fetch_add(1, Ordering::Relaxed);
                c.open.fetch_add(1, Ordering::Relaxed);
                let (s2, c2, b) = (s.clone(), c.clone(), behaviour.clone());
                tokio::spawn(async move {
                    tokio::select! {
                        _ = s2.cancelled() => {}
                        _ = serve(conn, &b, &c2.bytes) => {}
                    }
                    c2.open.fetch_sub(1, Ordering::Relaxed);
                });
            }
        });
        Ok(TcpTarget {
            addr,
            counters,
            _stop: stop.drop_guard(),
        })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.counters.accepted.load(Ordering::Relaxed)
    }

    /// Connections open now.
    pub fn open(&self) -> u64 {
        self.counters.open.load(Ordering::Relaxed)
    }

    /// Bytes received (echo, sink) or sent (source) over all connections, updated as they go.
    pub fn bytes(&self) -> u64 {
        self.counters.bytes.load(Ordering::Relaxed)
    }
}

async fn serve(mut conn: TcpStream, behaviour: &Behaviour, bytes: &AtomicU64) {
    let _ = conn.set_nodelay(true);
    let mut buf = vec![0u8; 64 * 1024];
    match behaviour {
        Behaviour::Echo => loop {
            match conn.read(&mut buf).await {
                Ok(0) => {
                    let _ = conn.shutdown().await;
                    return;
                }
                Ok(n) => {
                    bytes.fetch_add(n as u64, Ordering::Relaxed);
                    if conn.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
                Err(_) => return,
            }
        },
        Behaviour::Sink => loop {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    bytes.fetch_add(n as u64, Ordering::Relaxed);
                }
            }
        },
        Behaviour::Source { len, pattern } => {
            let (mut r, mut w) = conn.split();
            let write = async {
                let mut off = 0u64;
                while len.is_none_or(|l| off < l) {
                    let n = len.map_or(buf.len() as u64, |l| (l - off).min(buf.len() as u64));
                    let chunk = &mut buf[..n as usize];
                    pattern.fill(off, chunk);
                    if w.write_all(chunk).await.is_err() {
                        return;
                    }
                    off += n;
                    bytes.fetch_add(n, Ordering::Relaxed);
                }
                let _ = w.shutdown().await;
                // Stay until the peer closes.
                std::future::pending::<()>().await;
            };
            let read = async {
                let mut sink = vec![0u8; 16 * 1024];
                while let Ok(n) = r.read(&mut sink).await {
                    if n == 0 {
                        break;
                    }
                }
            };
            tokio::select! {
                _ = write => {}
                _ = read => {}
            }
        }
    }
}

/// Sends `data` to `addr`, half-closes, and returns everything read back until EOF.
pub async fn echo_bytes(addr: SocketAddr, data: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut c = TcpStream::connect(addr).await?;
    let (mut r, mut w) = c.split();
    let write = async {
        w.write_all(data).await?;
        w.shutdown().await
    };
    let mut got = Vec::with_capacity(data.len());
    let read = r.read_to_end(&mut got);
    tokio::try_join!(write, read)?;
    Ok(got)
}

/// How an echo transfer went.
#[derive(Debug, Clone, Copy)]
pub struct Transfer {
    /// Bytes sent (and, when `exact`, received back).
    pub bytes: u64,
    /// Bytes received back before EOF.
    pub received: u64,
    /// Every byte came back, in order, and then EOF.
    pub exact: bool,
    /// From connect to EOF.
    pub elapsed: Duration,
}

impl Transfer {
    /// Bytes per second, both directions counted once (the echo's payload rate).
    pub fn rate(&self) -> f64 {
        self.received as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Payload rate in MiB/s.
    pub fn mib_per_sec(&self) -> f64 {
        self.rate() / (1024.0 * 1024.0)
    }
}

/// Options of [`echo_transfer`].
#[derive(Debug, Clone)]
pub struct EchoOpts {
    /// Bytes to send.
    pub len: u64,
    /// Seed of the [`Pattern`].
    pub seed: u64,
    /// Largest read: small reads make a slow-ish client.
    pub read_size: usize,
    /// Counts bytes received so far, for watching progress from outside.
    pub progress: Option<Arc<AtomicU64>>,
}

impl EchoOpts {
    /// `len` bytes of pattern `seed`, 64 KiB reads.
    pub fn new(len: u64, seed: u64) -> EchoOpts {
        EchoOpts {
            len,
            seed,
            read_size: 64 * 1024,
            progress: None,
        }
    }
}

/// Streams `opts.len` pattern bytes through an echo at `addr`, half-closes, and checks that
/// exactly the same bytes come back before EOF. A connection error is an `Err`; a short or
/// wrong echo is `exact: false`.
pub async fn echo_transfer(addr: SocketAddr, opts: &EchoOpts) -> std::io::Result<Transfer> {
    let pattern = Pattern::new(opts.seed);
    let started = Instant::now();
    let mut c = TcpStream::connect(addr).await?;
    let _ = c.set_nodelay(true);
    let (mut r, mut w) = c.split();
    let len = opts.len;
    let write = async {
        let mut buf = vec![0u8; 64 * 1024];
        let mut off = 0u64;
        while off < len {
            let n = (len - off).min(buf.len() as u64) as usize;
            pattern.fill(off, &mut buf[..n]);
            w.write_all(&buf[..n]).await?;
            off += n as u64;
        }
        w.shutdown().await
    };
    let read = async {
        let mut buf = vec![0u8; opts.read_size.max(1)];
        let mut got = 0u64;
        let mut exact = true;
        loop {
            let n = r.read(&mut buf).await?;
            if n == 0 {
                return Ok::<_, std::io::Error>((got, exact));
            }
            if exact && (got + n as u64 > len || !pattern.matches(got, &buf[..n])) {
                exact = false;
            }
            got += n as u64;
            if let Some(p) = &opts.progress {
                p.store(got, Ordering::Relaxed);
            }
        }
    };
    let ((), (received, exact)) = tokio::try_join!(write, read)?;
    Ok(Transfer {
        bytes: len,
        received,
        exact: exact && received == len,
        elapsed: started.elapsed(),
    })
}

/// Connects, sends `msg`, reads it back, and closes; `Ok(false)` if the echo differed.
pub async fn echo_once(addr: SocketAddr, msg: &[u8]) -> std::io::Result<bool> {
    let mut c = TcpStream::connect(addr).await?;
    let _ = c.set_nodelay(true);
    c.write_all(msg).await?;
    let mut got = vec![0u8; msg.len()];
    c.read_exact(&mut got).await?;
    // Half-close and wait for the echo's FIN, so neither side is left half-open.
    socket2::SockRef::from(&c).shutdown(Shutdown::Write)?;
    let mut rest = [0u8; 1];
    let n = c.read(&mut rest).await?;
    Ok(got == msg && n == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_is_consistent_at_any_offset() {
        let p = Pattern::new(9);
        let all = p.bytes(0, 3 * PATTERN_BLOCK + 17);
        for off in [
            0usize,
            1,
            4095,
            PATTERN_BLOCK - 1,
            PATTERN_BLOCK,
            2 * PATTERN_BLOCK + 5,
        ] {
            assert_eq!(p.bytes(off as u64, 1000), all[off..off + 1000]);
            assert!(p.matches(off as u64, &all[off..off + 1000]));
        }
        assert!(!p.matches(1, &all[0..1000]));
        assert_ne!(Pattern::new(1).bytes(0, 64), Pattern::new(2).bytes(0, 64));
        // Not trivially periodic inside a block.
        assert_ne!(all[0..4096], all[4096..8192]);
    }

    #[tokio::test]
    async fn targets_count_and_echo() {
        let echo = TcpTarget::echo().await.unwrap();
        let t = echo_transfer(echo.addr(), &EchoOpts::new(5 << 20, 1))
            .await
            .unwrap();
        assert!(t.exact);
        assert_eq!(echo.bytes(), 5 << 20);
        assert!(echo_once(echo.addr(), b"0123456789abcdef").await.unwrap());

        let source = TcpTarget::source(Some(100_000), 4).await.unwrap();
        let mut c = TcpStream::connect(source.addr()).await.unwrap();
        let mut got = Vec::new();
        c.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, Pattern::new(4).bytes(0, 100_000));

        let sink = TcpTarget::sink().await.unwrap();
        echo_bytes(sink.addr(), &[1u8; 12345]).await.unwrap();
        assert_eq!(sink.bytes(), 12345);
        assert_eq!(hex(&[0xab, 0x01]), "ab01");
    }
}
