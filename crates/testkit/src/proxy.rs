//! A TCP fault proxy: put it between agent and gateway (or client and gateway) and break the
//! link on command.
//!
//! Each accepted connection gets its own upstream connection and one task that pumps both
//! directions. A direction is a reader and a writer joined by a bounded queue of chunks, so
//! added delay is latency (each chunk is written `delay` after it was read) rather than a
//! pause per chunk; at most [`QUEUE_CHUNKS`] × [`CHUNK`] bytes are in flight per direction.
//!
//! Faults, all through the cloneable [`FaultControl`]:
//! - [`set_delay`](FaultControl::set_delay): latency added to every chunk, both directions.
//! - [`set_throttle`](FaultControl::set_throttle): bytes per second, per direction and
//!   connection.
//! - [`freeze_existing`](FaultControl::freeze_existing) / [`freeze_all`](FaultControl::freeze_all)
//!   / [`thaw`](FaultControl::thaw): a frozen connection neither reads nor writes, in either
//!   direction, so the bytes pile up in the kernel's buffers and the senders' writes stall, as
//!   on a dead link (a blackhole: nothing is delivered, nothing is closed, nothing is lost
//!   either: after a thaw everything flows on). Under `freeze_all`, connections accepted while
//!   frozen are not even connected upstream until the thaw.
//! - [`cut`](FaultControl::cut): closes every current connection cleanly: a FIN to both ends.
//! - [`reset`](FaultControl::reset): aborts every current connection: an RST to both ends.
//!
//! Dropping the [`FaultProxy`] stops the listener and closes every connection (as the kernel
//! does when a process dies). Every task ends on that cancellation.

use std::collections::HashMap;
use std::net::{Shutdown, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use socket2::SockRef;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, DropGuard};

/// Largest chunk read from a socket at once.
pub const CHUNK: usize = 64 * 1024;
/// Chunks queued per direction between reading and writing (the in-flight bound under delay).
pub const QUEUE_CHUNKS: usize = 16;
/// How long a cut connection is drained (read and discarded) while waiting for the peer's
/// FIN, so that unread bytes do not turn the close into an RST.
pub const CUT_DRAIN: Duration = Duration::from_secs(5);

/// A running fault proxy on `127.0.0.1:0` in front of one upstream address.
pub struct FaultProxy {
    addr: SocketAddr,
    control: FaultControl,
    _stop: DropGuard,
}

/// Commands for a [`FaultProxy`]; clones control the same proxy.
#[derive(Clone)]
pub struct FaultControl {
    shared: Arc<Shared>,
}

struct Shared {
    upstream: SocketAddr,
    settings: Mutex<Settings>,
    table: Mutex<Table>,
    next_id: AtomicU64,
    accepted: AtomicU64,
    stop: CancellationToken,
}

#[derive(Debug, Clone, Copy, Default)]
struct Settings {
    delay: Duration,
    throttle: Option<u64>,
}

#[derive(Default)]
struct Table {
    conns: HashMap<u64, ConnControl>,
    /// New connections start frozen (`freeze_all`).
    freeze_new: bool,
}

struct ConnControl {
    frozen: watch::Sender<bool>,
    end: watch::Sender<Option<End>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    Cut,
    Reset,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl FaultProxy {
    /// Starts a proxy on `127.0.0.1:0` that forwards every connection to `upstream`.
    pub async fn start(upstream: SocketAddr) -> std::io::Result<FaultProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let stop = CancellationToken::new();
        let shared = Arc::new(Shared {
            upstream,
            settings: Mutex::new(Settings::default()),
            table: Mutex::new(Table::default()),
            next_id: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
            stop: stop.clone(),
        });
        tokio::spawn(accept_loop(listener, shared.clone()));
        Ok(FaultProxy {
            addr,
            control: FaultControl { shared },
            _stop: stop.drop_guard(),
        })
    }

    /// The address to connect to instead of the upstream.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A handle that controls this proxy.
    pub fn control(&self) -> FaultControl {
        self.control.clone()
    }
}

impl std::ops::Deref for FaultProxy {
    type Target = FaultControl;
    fn deref(&self) -> &FaultControl {
        &self.control
    }
}

impl FaultControl {
    /// Latency added to every chunk, in both directions, from now on (zero: none).
    pub fn set_delay(&self, delay: Duration) {
        lock(&self.shared.settings).delay = delay;
    }

    /// Caps each direction of each connection at `bytes_per_sec` (`None`: unlimited).
    pub fn set_throttle(&self, bytes_per_sec: Option<u64>) {
        lock(&self.shared.settings).throttle = bytes_per_sec.map(|r| r.max(1));
    }

    /// Freezes the connections open now; returns how many. New connections flow normally.
    pub fn freeze_existing(&self) -> usize {
        let t = lock(&self.shared.table);
        for c in t.conns.values() {
            c.frozen.send_replace(true);
        }
        t.conns.len()
    }

    /// Freezes the connections open now and every new one until [`thaw`](Self::thaw); new
    /// connections are accepted but not connected upstream. Returns how many were open.
    pub fn freeze_all(&self) -> usize {
        let mut t = lock(&self.shared.table);
        t.freeze_new = true;
        for c in t.conns.values() {
            c.frozen.send_replace(true);
        }
        t.conns.len()
    }

    /// Lets every connection flow again, including ones that waited under `freeze_all`.
    pub fn thaw(&self) {
        let mut t = lock(&self.shared.table);
        t.freeze_new = false;
        for c in t.conns.values() {
            c.frozen.send_replace(false);
        }
    }

    /// Closes every current connection with a FIN to both ends; returns how many.
    pub fn cut(&self) -> usize {
        self.end_all(End::Cut)
    }

    /// Aborts every current connection with an RST to both ends; returns how many.
    pub fn reset(&self) -> usize {
        self.end_all(End::Reset)
    }

    fn end_all(&self, how: End) -> usize {
        let t = lock(&self.shared.table);
        for c in t.conns.values() {
            c.end.send_replace(Some(how));
        }
        t.conns.len()
    }

    /// Connections open right now (including ones waiting under `freeze_all`).
    pub fn connections(&self) -> usize {
        lock(&self.shared.table).conns.len()
    }

    /// Connections accepted since the start.
    pub fn accepted(&self) -> u64 {
        self.shared.accepted.load(Ordering::Relaxed)
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let down = tokio::select! {
            _ = shared.stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(_) => {
                    // Out of descriptors and the like: try again shortly.
                    tokio::select! {
                        _ = shared.stop.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_millis(10)) => continue,
                    }
                }
            },
        };
        shared.accepted.fetch_add(1, Ordering::Relaxed);
        let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
        let (frozen_rx, end_rx) = {
            let mut t = lock(&shared.table);
            let (frozen, frozen_rx) = watch::channel(t.freeze_new);
            let (end, end_rx) = watch::channel(None);
            t.conns.insert(id, ConnControl { frozen, end });
            (frozen_rx, end_rx)
        };
        let shared2 = shared.clone();
        tokio::spawn(async move {
            serve(&shared2, down, frozen_rx, end_rx).await;
            lock(&shared2.table).conns.remove(&id);
        });
    }
}

/// Why a connection's pumping stopped.
enum Stop {
    /// Both directions saw EOF and passed it on.
    Done,
    /// A read or write failed: abort both ends.
    Failed,
    /// A command.
    Command(End),
    /// The proxy was dropped.
    Dropped,
}

async fn serve(
    shared: &Shared,
    down: TcpStream,
    mut frozen: watch::Receiver<bool>,
    mut end: watch::Receiver<Option<End>>,
) {
    // Under freeze_all a new connection waits here, not connected upstream.
    let up = tokio::select! {
        _ = shared.stop.cancelled() => return,
        e = wait_end(&mut end) => return finish(e, &down, None).await,
        r = async {
            let _ = frozen.wait_for(|f| !*f).await;
            TcpStream::connect(shared.upstream).await
        } => match r {
            Ok(up) => up,
            Err(_) => {
                // Upstream refused: pass that on as a reset.
                let _ = SockRef::from(&down).set_linger(Some(Duration::ZERO));
                return;
            }
        },
    };
    let _ = up.set_nodelay(true);
    let _ = down.set_nodelay(true);
    let stop = tokio::select! {
        _ = shared.stop.cancelled() => Stop::Dropped,
        e = wait_end(&mut end) => Stop::Command(e),
        r = async {
            tokio::try_join!(
                pipe(shared, &down, &up, frozen.clone()),
                pipe(shared, &up, &down, frozen.clone()),
            )
        } => if r.is_ok() { Stop::Done } else { Stop::Failed },
    };
    match stop {
        Stop::Done | Stop::Dropped => {}
        Stop::Failed => {
            abort(&down);
            abort(&up);
        }
        Stop::Command(e) => finish(e, &down, Some(&up)).await,
    }
}

async fn wait_end(end: &mut watch::Receiver<Option<End>>) -> End {
    let got = end.wait_for(Option::is_some).await.map(|e| *e);
    match got {
        Ok(e) => e.unwrap_or(End::Reset),
        // The control entry is gone: only happens after this connection ended.
        Err(_) => std::future::pending().await,
    }
}

fn abort(s: &TcpStream) {
    let _ = SockRef::from(s).set_linger(Some(Duration::ZERO));
}

/// Applies a cut or a reset; the streams are closed when the caller drops them.
async fn finish(how: End, down: &TcpStream, up: Option<&TcpStream>) {
    match how {
        End::Reset => {
            abort(down);
            if let Some(up) = up {
                abort(up);
            }
        }
        End::Cut => {
            let _ = SockRef::from(down).shutdown(Shutdown::Write);
            if let Some(up) = up {
                let _ = SockRef::from(up).shutdown(Shutdown::Write);
            }
            // Read until the peers close too: closing with unread bytes would send an RST.
            let _ = tokio::time::timeout(CUT_DRAIN, async {
                match up {
                    Some(up) => {
                        tokio::join!(discard(down), discard(up));
                    }
                    None => discard(down).await,
                }
            })
            .await;
        }
    }
}

/// Reads and drops bytes until EOF or an error.
async fn discard(s: &TcpStream) {
    let mut buf = vec![0u8; CHUNK];
    loop {
        if s.readable().await.is_err() {
            return;
        }
        match s.try_read(&mut buf) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => return,
        }
    }
}

enum Msg {
    Data(Vec<u8>, Instant),
    Eof,
}

/// One direction: reads `from`, writes `to`. `Ok` once EOF has been passed on.
async fn pipe(
    shared: &Shared,
    from: &TcpStream,
    to: &TcpStream,
    frozen: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let (tx, rx) = mpsc::channel(QUEUE_CHUNKS);
    tokio::try_join!(
        read_side(shared, from, tx, frozen.clone()),
        write_side(shared, to, rx, frozen),
    )?;
    Ok(())
}

/// Waits until the connection is not frozen.
async fn thawed(frozen: &mut watch::Receiver<bool>) {
    if frozen.wait_for(|f| !*f).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Waits until the connection is frozen.
async fn freezes(frozen: &mut watch::Receiver<bool>) {
    if frozen.wait_for(|f| *f).await.is_err() {
        std::future::pending::<()>().await;
    }
}

async fn read_side(
    shared: &Shared,
    from: &TcpStream,
    tx: mpsc::Sender<Msg>,
    mut frozen: watch::Receiver<bool>,
) -> std::io::Result<()> {
    loop {
        thawed(&mut frozen).await;
        let mut buf = vec![0u8; CHUNK];
        // Stop reading the moment a freeze starts: the bytes stay in the kernel.
        let n = tokio::select! {
            biased;
            _ = freezes(&mut frozen) => continue,
            r = read_some(from, &mut buf) => r?,
        };
        let msg = if n == 0 {
            Msg::Eof
        } else {
            buf.truncate(n);
            let delay = lock(&shared.settings).delay;
            Msg::Data(buf, Instant::now() + delay)
        };
        let eof = matches!(msg, Msg::Eof);
        if tx.send(msg).await.is_err() {
            return Ok(());
        }
        if eof {
            return Ok(());
        }
    }
}

async fn read_some(s: &TcpStream, buf: &mut [u8]) -> std::io::Result<usize> {
    loop {
        s.readable().await?;
        match s.try_read(buf) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            r => return r,
        }
    }
}

async fn write_some(s: &TcpStream, buf: &[u8]) -> std::io::Result<usize> {
    loop {
        s.writable().await?;
        match s.try_write(buf) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            r => return r,
        }
    }
}

async fn write_side(
    shared: &Shared,
    to: &TcpStream,
    mut rx: mpsc::Receiver<Msg>,
    mut frozen: watch::Receiver<bool>,
) -> std::io::Result<()> {
    // Throttle: the earliest time the next byte may go.
    let mut next_free = Instant::now();
    while let Some(msg) = rx.recv().await {
        let (data, due) = match msg {
            Msg::Data(d, due) => (d, due),
            Msg::Eof => {
                thawed(&mut frozen).await;
                SockRef::from(to).shutdown(Shutdown::Write)?;
                return Ok(());
            }
        };
        tokio::time::sleep_until(due).await;
        let mut off = 0;
        while off < data.len() {
            thawed(&mut frozen).await;
            let throttle = lock(&shared.settings).throttle;
            let piece = match throttle {
                // About 20 writes a second, so the rate is smooth at any setting.
                Some(rate) => (rate / 20).clamp(1, CHUNK as u64) as usize,
                None => CHUNK,
            }
            .min(data.len() - off);
            if throttle.is_some() && next_free > Instant::now() {
                tokio::select! {
                    _ = tokio::time::sleep_until(next_free) => {}
                    _ = freezes(&mut frozen) => continue,
                }
            }
            let n = tokio::select! {
                biased;
                _ = freezes(&mut frozen) => continue,
                r = write_some(to, &data[off..off + piece]) => r?,
            };
            off += n;
            if let Some(rate) = throttle {
                next_free =
                    next_free.max(Instant::now()) + Duration::from_secs_f64(n as f64 / rate as f64);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::targets::TcpTarget;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn roundtrip(addr: SocketAddr, msg: &[u8]) -> (Vec<u8>, Duration) {
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.set_nodelay(true).unwrap();
        // A first exchange so the upstream connection exists before timing.
        c.write_all(b"x").await.unwrap();
        let mut one = [0u8; 1];
        c.read_exact(&mut one).await.unwrap();
        let t = Instant::now();
        c.write_all(msg).await.unwrap();
        let mut got = vec![0u8; msg.len()];
        c.read_exact(&mut got).await.unwrap();
        (got, t.elapsed())
    }

    #[tokio::test]
    async fn passes_bytes_both_ways_and_half_close() {
        let echo = TcpTarget::echo().await.unwrap();
        let proxy = FaultProxy::start(echo.addr()).await.unwrap();
        let data = crate::Pattern::new(3).bytes(0, 3 << 20);
        let got = crate::targets::echo_bytes(proxy.addr(), &data)
            .await
            .unwrap();
        assert_eq!(crate::sha256(&got), crate::sha256(&data));
        // The connection ended on both sides once both FINs passed.
        tokio::time::timeout(Duration::from_secs(5), async {
            while proxy.connections() > 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn delay_is_measurable_in_both_directions() {
        let echo = TcpTarget::echo().await.unwrap();
        let proxy = FaultProxy::start(echo.addr()).await.unwrap();
        let (_, fast) = roundtrip(proxy.addr(), b"ping").await;
        proxy.set_delay(Duration::from_millis(100));
        let (got, slow) = roundtrip(proxy.addr(), b"ping").await;
        assert_eq!(got, b"ping");
        // 100 ms each way.
        assert!(slow >= Duration::from_millis(200), "{slow:?}");
        assert!(fast < Duration::from_millis(100), "{fast:?}");
    }

    #[tokio::test]
    async fn throttle_caps_the_rate() {
        let sink = TcpTarget::sink().await.unwrap();
        let proxy = FaultProxy::start(sink.addr()).await.unwrap();
        proxy.set_throttle(Some(400_000));
        let mut c = TcpStream::connect(proxy.addr()).await.unwrap();
        let t = Instant::now();
        c.write_all(&vec![7u8; 200_000]).await.unwrap();
        c.shutdown().await.unwrap();
        let mut rest = Vec::new();
        c.read_to_end(&mut rest).await.unwrap();
        let took = t.elapsed();
        assert_eq!(sink.bytes(), 200_000);
        // 200 kB at 400 kB/s: half a second, minus the first piece that goes at once.
        assert!(took >= Duration::from_millis(400), "{took:?}");
    }

    #[tokio::test]
    async fn freeze_is_a_blackhole_until_thawed() {
        let sink = TcpTarget::sink().await.unwrap();
        let proxy = FaultProxy::start(sink.addr()).await.unwrap();
        let mut c = TcpStream::connect(proxy.addr()).await.unwrap();
        c.write_all(b"before").await.unwrap();
        wait_until(|| sink.bytes() == 6).await;
        assert_eq!(proxy.freeze_existing(), 1);
        // Far more than the socket buffers hold: the writer stalls instead of finishing.
        let stalled = tokio::time::timeout(
            Duration::from_millis(500),
            c.write_all(&vec![1u8; 64 << 20]),
        )
        .await;
        assert!(stalled.is_err(), "writes into a frozen link must stall");
        assert_eq!(sink.bytes(), 6, "nothing passes a frozen link");
        assert_eq!(proxy.connections(), 1, "and nothing is closed");

        // freeze_all: a new connection is not even connected upstream.
        proxy.freeze_all();
        let _c2 = TcpStream::connect(proxy.addr()).await.unwrap();
        wait_until(|| proxy.accepted() == 2).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(sink.accepted(), 1);

        proxy.thaw();
        wait_until(|| sink.accepted() == 2).await;
        // The bytes piled up before the thaw arrive after it.
        wait_until(|| sink.bytes() > 6).await;
    }

    #[tokio::test]
    async fn cut_gives_eof_to_both_ends() {
        let echo = TcpTarget::echo().await.unwrap();
        let proxy = FaultProxy::start(echo.addr()).await.unwrap();
        let mut c = TcpStream::connect(proxy.addr()).await.unwrap();
        c.write_all(b"hello").await.unwrap();
        let mut buf = [0u8; 5];
        c.read_exact(&mut buf).await.unwrap();
        assert_eq!(proxy.cut(), 1);
        let mut rest = Vec::new();
        let n = tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut rest))
            .await
            .unwrap()
            .expect("a cut is a clean close, not an error");
        assert_eq!(n, 0);
        // The upstream side got a FIN too, so the echo target closed its connection.
        wait_until(|| echo.open() == 0).await;
    }

    #[tokio::test]
    async fn reset_gives_connection_reset() {
        let echo = TcpTarget::echo().await.unwrap();
        let proxy = FaultProxy::start(echo.addr()).await.unwrap();
        let mut c = TcpStream::connect(proxy.addr()).await.unwrap();
        c.write_all(b"hello").await.unwrap();
        let mut buf = [0u8; 5];
        c.read_exact(&mut buf).await.unwrap();
        assert_eq!(proxy.reset(), 1);
        let err = tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf))
            .await
            .unwrap()
            .expect_err("a reset is an error");
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset);
        wait_until(|| echo.open() == 0).await;
        // The proxy keeps accepting after a reset.
        let got = crate::targets::echo_bytes(proxy.addr(), b"again")
            .await
            .unwrap();
        assert_eq!(got, b"again");
    }

    #[tokio::test]
    async fn upstream_refusal_is_a_reset() {
        // A port nobody listens on: bind, read the port, close.
        let gone = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = gone.local_addr().unwrap();
        drop(gone);
        let proxy = FaultProxy::start(addr).await.unwrap();
        let mut c = TcpStream::connect(proxy.addr()).await.unwrap();
        let mut buf = [0u8; 1];
        let r = tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf))
            .await
            .unwrap();
        assert!(
            matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
            "{r:?}"
        );
    }

    async fn wait_until(cond: impl Fn() -> bool) {
        tokio::time::timeout(Duration::from_secs(10), async {
            while !cond() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("condition within 10 s");
    }
}
