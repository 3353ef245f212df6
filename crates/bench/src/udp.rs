//! UDP: a sink and an echo on `127.0.0.1:0`, and a client that sends datagrams of one size
//! at one flow, as fast as it can or at a set rate, for a fixed time.
//!
//! Every datagram starts with a 12-byte header (the run's number and the datagram's
//! sequence number, big-endian), and the rest is the bench's byte pattern from an offset set
//! by the sequence number. The sink, on a thread of its own, checks every byte, counts what
//! belongs to the current run and notes when the last one came; datagrams of an earlier run
//! (still on their way when the next began) are not counted. Loss is what the client sent and
//! the sink never counted; a corrupted datagram, or more arriving than were sent, is a failure.
//!
//! The client is a thread of its own with a blocking socket connected to where it sends, so
//! the direct route is the fastest this machine sends and receives UDP; paced runs send what
//! is due every millisecond.

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _};

use crate::pattern;

/// The datagram header: run number (4 bytes), then sequence number (8 bytes).
pub const HEADER: usize = 12;
/// The sink's receive buffer (the kernel may give less, up to `net.core.rmem_max`): the
/// target should not be what limits a route.
const SINK_BUFFER: usize = 4 << 20;
/// After the client's last datagram, the run is over once nothing new has arrived for this
/// long (or after [`SETTLE_LIMIT`]).
const SETTLE_QUIET: Duration = Duration::from_millis(150);
const SETTLE_LIMIT: Duration = Duration::from_secs(3);
/// How often a paced client sends what is due.
const TICK: Duration = Duration::from_millis(1);

/// What the sink counted for the current run.
#[derive(Default)]
struct Counts {
    run: AtomicU32,
    received: AtomicU64,
    bytes: AtomicU64,
    corrupt: AtomicU64,
    /// Nanoseconds after `Sink::epoch` of the last datagram of the run.
    last_ns: AtomicU64,
}

/// The UDP sink and echo targets.
pub struct UdpTargets {
    pub sink: SocketAddr,
    pub echo: SocketAddr,
    counts: Arc<Counts>,
    epoch: Instant,
    /// Numbers runs; 0 is never used, so a datagram of no run is never counted.
    next_run: AtomicU32,
    stop: Arc<AtomicBool>,
}

impl Drop for UdpTargets {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl UdpTargets {
    /// Binds the sink (on a thread of its own) and the echo (a task), both on `127.0.0.1:0`.
    pub async fn start() -> anyhow::Result<UdpTargets> {
        let socket = UdpSocket::bind("127.0.0.1:0").context("cannot bind the UDP sink")?;
        let _ = socket2::SockRef::from(&socket).set_recv_buffer_size(SINK_BUFFER);
        socket.set_read_timeout(Some(Duration::from_millis(100)))?;
        let sink = socket.local_addr()?;
        let counts = Arc::new(Counts::default());
        let stop = Arc::new(AtomicBool::new(false));
        let epoch = Instant::now();
        {
            let (counts, stop) = (counts.clone(), stop.clone());
            std::thread::Builder::new()
                .name("udp-sink".into())
                .spawn(move || sink_loop(&socket, &counts, &stop, epoch))
                .context("cannot start the UDP sink thread")?;
        }
        let echo = tokio::net::UdpSocket::bind("127.0.0.1:0")
            .await
            .context("cannot bind the UDP echo")?;
        let echo_addr = echo.local_addr()?;
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65_536];
            while let Ok((n, from)) = echo.recv_from(&mut buf).await {
                let _ = echo.send_to(&buf[..n], from).await;
            }
        });
        Ok(UdpTargets {
            sink,
            echo: echo_addr,
            counts,
            epoch,
            next_run: AtomicU32::new(1),
            stop,
        })
    }

    /// Starts counting a new run; returns its number.
    fn begin(&self) -> u32 {
        let run = self.next_run.fetch_add(1, Ordering::Relaxed);
        let c = &self.counts;
        c.run.store(0, Ordering::SeqCst);
        for n in [&c.received, &c.bytes, &c.corrupt, &c.last_ns] {
            n.store(0, Ordering::SeqCst);
        }
        c.run.store(run, Ordering::SeqCst);
        run
    }

    /// Waits until nothing new has arrived for [`SETTLE_QUIET`], then reads the counts.
    async fn settle(&self) -> (u64, u64, u64, Option<Instant>) {
        let c = &self.counts;
        let start = tokio::time::Instant::now();
        let mut seen = c.received.load(Ordering::SeqCst);
        let mut quiet_since = tokio::time::Instant::now();
        while start.elapsed() < SETTLE_LIMIT {
            tokio::time::sleep(Duration::from_millis(10)).await;
            let now = c.received.load(Ordering::SeqCst);
            if now != seen {
                seen = now;
                quiet_since = tokio::time::Instant::now();
            } else if quiet_since.elapsed() >= SETTLE_QUIET {
                break;
            }
        }
        let last = match c.last_ns.load(Ordering::SeqCst) {
            0 => None,
            ns => Some(self.epoch + Duration::from_nanos(ns)),
        };
        (
            c.received.load(Ordering::SeqCst),
            c.bytes.load(Ordering::SeqCst),
            c.corrupt.load(Ordering::SeqCst),
            last,
        )
    }
}

fn sink_loop(socket: &UdpSocket, counts: &Counts, stop: &AtomicBool, epoch: Instant) {
    let expected = pattern::buffer(65_536 + 256);
    let mut buf = vec![0u8; 65_536];
    while !stop.load(Ordering::Relaxed) {
        let n = match socket.recv(&mut buf) {
            Ok(n) => n,
            // The read timeout, so that `stop` is seen.
            Err(_) => continue,
        };
        let Some((run, seq)) = header(&buf[..n]) else {
            continue;
        };
        if run == 0 || run != counts.run.load(Ordering::Relaxed) {
            continue;
        }
        if buf[HEADER..n] == expected[body_offset(seq)..][..n - HEADER] {
            counts.received.fetch_add(1, Ordering::Relaxed);
            counts.bytes.fetch_add(n as u64, Ordering::Relaxed);
        } else {
            counts.corrupt.fetch_add(1, Ordering::Relaxed);
        }
        let ns = u64::try_from(epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
        counts.last_ns.store(ns.max(1), Ordering::Relaxed);
    }
}

fn header(d: &[u8]) -> Option<(u32, u64)> {
    let run = u32::from_be_bytes(d.get(..4)?.try_into().ok()?);
    let seq = u64::from_be_bytes(d.get(4..HEADER)?.try_into().ok()?);
    Some((run, seq))
}

/// Where in the pattern the body of datagram `seq` starts: a datagram whose header and body
/// were mixed with another's no longer matches.
fn body_offset(seq: u64) -> usize {
    (seq % 251) as usize
}

/// One run: what was sent, and what the sink counted.
#[derive(Debug, Clone, Copy)]
pub struct UdpRun {
    pub sent: u64,
    pub received: u64,
    /// Bytes of the datagrams received (headers included: the whole UDP payload).
    pub bytes: u64,
    /// From the first send to the last datagram received (or the last sent, if later).
    pub elapsed: Duration,
    /// How long the client sent.
    pub sending: Duration,
}

impl UdpRun {
    /// Datagrams delivered per second.
    pub fn per_second(&self) -> f64 {
        self.received as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Gbit/s of UDP payload delivered.
    pub fn gbit_per_s(&self) -> f64 {
        self.bytes as f64 * 8.0 / self.elapsed.as_secs_f64().max(1e-9) / 1e9
    }

    /// The share of sent datagrams that never arrived, in percent.
    pub fn loss_percent(&self) -> f64 {
        if self.sent == 0 {
            return 0.0;
        }
        100.0 * self.sent.saturating_sub(self.received) as f64 / self.sent as f64
    }

    /// Datagrams sent per second.
    pub fn offered(&self) -> f64 {
        self.sent as f64 / self.sending.as_secs_f64().max(1e-9)
    }
}

/// Sends `len`-byte datagrams to `to` for `duration`, as fast as the client can or at `rate`
/// datagrams a second, then waits for the sink (behind `to`) to settle and reads its counts.
pub async fn run(
    targets: &UdpTargets,
    to: SocketAddr,
    len: usize,
    duration: Duration,
    rate: Option<f64>,
) -> anyhow::Result<UdpRun> {
    ensure!(
        (HEADER..=65_507).contains(&len),
        "a datagram of {len} bytes"
    );
    let run = targets.begin();
    let client = tokio::task::spawn_blocking(move || send(to, run, len, duration, rate));
    let (sent, errors, start, end) = client.await.context("the UDP client panicked")??;
    let (received, bytes, corrupt, last) = targets.settle().await;
    if corrupt > 0 {
        bail!("{corrupt} datagrams of {len} bytes arrived corrupted (of {received} intact)");
    }
    if received > sent {
        bail!("{received} datagrams arrived, {sent} were sent: some came twice");
    }
    if sent == 0 {
        bail!("no datagram could be sent to {to} ({errors} send errors)");
    }
    let until = last.map_or(end, |l| l.max(end));
    Ok(UdpRun {
        sent,
        received,
        bytes,
        elapsed: until - start,
        sending: end - start,
    })
}

/// The client thread: returns datagrams sent, send errors, and when sending began and ended.
fn send(
    to: SocketAddr,
    run: u32,
    len: usize,
    duration: Duration,
    rate: Option<f64>,
) -> anyhow::Result<(u64, u64, Instant, Instant)> {
    let socket = UdpSocket::bind("127.0.0.1:0").context("cannot bind the UDP client")?;
    socket
        .connect(to)
        .with_context(|| format!("cannot connect the UDP client to {to}"))?;
    let pattern = pattern::buffer(65_536 + 256);
    let mut buf = vec![0u8; len];
    buf[..4].copy_from_slice(&run.to_be_bytes());
    let (mut sent, mut errors) = (0u64, 0u64);
    let mut one = |seq: u64| {
        buf[4..HEADER].copy_from_slice(&seq.to_be_bytes());
        let body = len - HEADER;
        buf[HEADER..].copy_from_slice(&pattern[body_offset(seq)..][..body]);
        // A refusal (ICMP from an earlier datagram, the port not there yet) loses this one.
        socket.send(&buf).is_ok()
    };
    let start = Instant::now();
    let deadline = start + duration;
    match rate {
        None => 'blast: loop {
            for _ in 0..64 {
                if one(sent) {
                    sent += 1;
                } else {
                    errors += 1;
                }
            }
            if Instant::now() >= deadline {
                break 'blast;
            }
        },
        Some(rate) => loop {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            let due = (rate * (now - start).as_secs_f64()) as u64;
            let mut seq = sent + errors;
            while seq < due {
                if one(seq) {
                    sent += 1;
                } else {
                    errors += 1;
                }
                seq += 1;
            }
            std::thread::sleep(TICK);
        },
    }
    Ok((sent, errors, start, Instant::now()))
}

/// Echoes `count` datagrams of `len` bytes, one at a time, through `to` (the echo target or
/// its public address): each must come back byte-exact. UDP may drop one, so each is sent up
/// to three times.
pub async fn echo_check(to: SocketAddr, len: usize, count: u32) -> anyhow::Result<()> {
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
    socket.connect(to).await?;
    let mut back = vec![0u8; 65_536];
    let pattern = pattern::buffer(len + 251);
    for i in 0..count {
        let data = &pattern[i as usize % 251..][..len];
        let mut answered = false;
        for _ in 0..3 {
            socket.send(data).await?;
            match tokio::time::timeout(Duration::from_secs(1), socket.recv(&mut back)).await {
                Ok(Ok(n)) => {
                    ensure!(
                        back[..n] == *data,
                        "UDP echo through {to}: datagram {i} came back different"
                    );
                    answered = true;
                    break;
                }
                Ok(Err(e)) => bail!("UDP echo through {to}: {e}"),
                Err(_) => {}
            }
        }
        ensure!(answered, "UDP echo through {to}: no answer to datagram {i}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn counts_a_run_and_ignores_the_one_before() {
        let t = UdpTargets::start().await.unwrap();
        echo_check(t.echo, 1400, 3).await.unwrap();
        let paced = run(&t, t.sink, 64, Duration::from_millis(100), Some(10_000.0))
            .await
            .unwrap();
        assert!(paced.sent > 500 && paced.sent <= 1_010, "{paced:?}");
        assert!(paced.loss_percent() < 5.0, "{paced:?}");
        assert_eq!(paced.bytes, paced.received * 64);
        // A datagram of an earlier run, or a corrupted one of this run.
        let stale = UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut d = vec![0u8; 64];
        d[..4].copy_from_slice(&1u32.to_be_bytes());
        stale.send_to(&d, t.sink).unwrap();
        let run_no = t.begin();
        d[..4].copy_from_slice(&run_no.to_be_bytes());
        stale.send_to(&d, t.sink).unwrap();
        let (received, _, corrupt, _) = t.settle().await;
        assert_eq!((received, corrupt), (0, 1));
    }
}
