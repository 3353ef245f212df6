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

/// `iters` round trips of a 64-byte message on one connection; each echo must match.
pub async fn request_response(addr: SocketAddr, iters: u32) -> anyhow::Result<Percentiles> {
    let mut stream = TcpStream::connect(addr)
        .await
        .with_context(|| format!("request/response: cannot connect to {addr}"))?;
    stream.set_nodelay(true)?;
    let mut samples = Vec::with_capacity(iters as usize);
    let (mut out, mut back) = ([0u8; MESSAGE], [0u8; MESSAGE]);
    for i in 0..iters {
        fill(&mut out, u64::from(i));
        let start = Instant::now();
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
        samples.push(start.elapsed().as_secs_f64() * 1e6);
        ensure!(
            out == back,
            "request/response: echo {i} differs from the request"
        );
    }
    Ok(Percentiles::of(samples))
}

/// `iters` times: connect, send one byte, wait for it to come back, close.
pub async fn connect_first_byte(addr: SocketAddr, iters: u32) -> anyhow::Result<Percentiles> {
    let mut samples = Vec::with_capacity(iters as usize);
    for i in 0..iters {
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
        samples.push(start.elapsed().as_secs_f64() * 1e6);
        ensure!(
            got == byte,
            "connect: attempt {i} echoed {got}, sent {byte}"
        );
    }
    Ok(Percentiles::of(samples))
}

/// Fills a message with its sequence number, repeated.
pub fn fill(message: &mut [u8; MESSAGE], seq: u64) {
    for (i, b) in message.iter_mut().enumerate() {
        *b = seq.to_be_bytes()[i % 8] ^ i as u8;
    }
}
