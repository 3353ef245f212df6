//! Round-trip latency against the echo target: 64-byte request/response on one connection,
//! and connect + first echoed byte on a new connection each time.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{ensure, Context as _};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::stats::percentile;

/// Size of one request/response message.
pub const MESSAGE: usize = 64;

/// Longest any single round trip may take before the workload fails.
const ROUND_TRIP_LIMIT: Duration = Duration::from_secs(10);

/// The 50th and 99th percentile of one run, in microseconds.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Percentiles {
    pub p50_us: f64,
    pub p99_us: f64,
}

impl Percentiles {
    fn of(mut samples: Vec<f64>) -> Percentiles {
        samples.sort_by(f64::total_cmp);
        Percentiles {
            p50_us: percentile(&samples, 50.0),
            p99_us: percentile(&samples, 99.0),
        }
    }
}

/// Request/response on one connection, run in slices so several routes can take turns within
/// a round (see [`crate::Bench`]'s latency rows): every route then meets the same moments of
/// a shared, noisy machine, and its p50 is not the luck of the seconds it happened to run in.
pub struct RequestResponse {
    stream: TcpStream,
    samples: Vec<f64>,
}

impl RequestResponse {
    /// Connects to the echo target at `addr`, room for `iters` round trips.
    pub async fn connect(addr: SocketAddr, iters: u32) -> anyhow::Result<RequestResponse> {
        let stream = TcpStream::connect(addr)
            .await
            .with_context(|| format!("request/response: cannot connect to {addr}"))?;
        stream.set_nodelay(true)?;
        Ok(RequestResponse {
            stream,
            samples: Vec::with_capacity(iters as usize),
        })
    }

    /// `iters` more round trips of a 64-byte message; each echo must match.
    pub async fn trips(&mut self, iters: u32) -> anyhow::Result<()> {
        let (mut out, mut back) = ([0u8; MESSAGE], [0u8; MESSAGE]);
        for _ in 0..iters {
            let i = self.samples.len();
            fill(&mut out, i as u64);
            let start = Instant::now();
            let stream = &mut self.stream;
            let trip = async {
                stream.write_all(&out).await?;
                stream.read_exact(&mut back).await
            };
            tokio::time::timeout(ROUND_TRIP_LIMIT, trip)
                .await
                .with_context(|| {
                    format!("request/response: round trip {i} took over {ROUND_TRIP_LIMIT:?}")
                })?
                .with_context(|| format!("request/response: round trip {i} failed"))?;
            self.samples.push(start.elapsed().as_secs_f64() * 1e6);
            ensure!(
                out == back,
                "request/response: echo {i} differs from the request"
            );
        }
        Ok(())
    }

    /// The percentiles of every round trip so far.
    pub fn percentiles(self) -> Percentiles {
        Percentiles::of(self.samples)
    }
}

/// `iters` round trips of a 64-byte message on one connection; each echo must match.
pub async fn request_response(addr: SocketAddr, iters: u32) -> anyhow::Result<Percentiles> {
    let mut rr = RequestResponse::connect(addr, iters).await?;
    rr.trips(iters).await?;
    Ok(rr.percentiles())
}

/// Connect + first byte, run in slices like [`RequestResponse`].
#[derive(Default)]
pub struct ConnectFirstByte {
    samples: Vec<f64>,
}

impl ConnectFirstByte {
    /// `iters` more times: connect to `addr`, send one byte, wait for it to come back, close.
    pub async fn attempts(&mut self, addr: SocketAddr, iters: u32) -> anyhow::Result<()> {
        for _ in 0..iters {
            let i = self.samples.len();
            let byte = (i % 256) as u8;
            let start = Instant::now();
            let trip = async {
                let mut stream = TcpStream::connect(addr).await?;
                stream.set_nodelay(true)?;
                stream.write_all(&[byte]).await?;
                stream.read_u8().await
            };
            let got = tokio::time::timeout(ROUND_TRIP_LIMIT, trip)
                .await
                .with_context(|| format!("connect: attempt {i} took over {ROUND_TRIP_LIMIT:?}"))?
                .with_context(|| format!("connect: attempt {i} to {addr} failed"))?;
            self.samples.push(start.elapsed().as_secs_f64() * 1e6);
            ensure!(
                got == byte,
                "connect: attempt {i} echoed {got}, sent {byte}"
            );
        }
        Ok(())
    }

    /// The percentiles of every attempt so far.
    pub fn percentiles(self) -> Percentiles {
        Percentiles::of(self.samples)
    }
}

/// Fills a message with its sequence number, repeated.
pub fn fill(message: &mut [u8; MESSAGE], seq: u64) {
    for (i, b) in message.iter_mut().enumerate() {
        *b = seq.to_be_bytes()[i % 8] ^ i as u8;
    }
}
