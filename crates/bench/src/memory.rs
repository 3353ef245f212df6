//! Memory per idle connection: open many connections through the tunnel, prove each carries
//! an echo end to end, hold them idle, and compare the gateway's and agent's resident memory
//! with the idle baseline.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::echo_proc::EchoProcess;
use crate::latency::{fill, MESSAGE};
use crate::procs::Tunnel;

/// Connections being opened at once.
const IN_FLIGHT: usize = 256;
/// Longest one connection may take to open and echo.
const OPEN_LIMIT: Duration = Duration::from_secs(10);
/// How often resident memory is sampled while waiting for it to settle.
const SETTLE_SAMPLE: Duration = Duration::from_secs(1);
/// Samples in a row that must stay within `SETTLE_SLACK_KIB` of each other.
const SETTLE_SAMPLES: usize = 4;
/// Change between samples small enough to call memory settled, KiB.
const SETTLE_SLACK_KIB: u64 = 256;
/// Longest to wait for memory to settle; the allocator returns freed pages over about 10 s.
const SETTLE_LIMIT: Duration = Duration::from_secs(25);
/// Longest the target may keep connections after the clients closed theirs.
const CLOSE_LIMIT: Duration = Duration::from_secs(30);
/// File descriptors the bench, gateway or agent need besides one or two per connection.
const FD_SLACK: u64 = 512;

/// Resident memory of the gateway and the agent, KiB.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Rss {
    pub gateway_kib: u64,
    pub agent_kib: u64,
}

impl Rss {
    /// Reads both now.
    pub fn of(tunnel: &Tunnel) -> anyhow::Result<Rss> {
        Ok(Rss {
            gateway_kib: tunnel.gateway.rss_kib()?,
            agent_kib: tunnel.agent.rss_kib()?,
        })
    }

    /// Reads both once they stop moving. Right after a throughput run, or after opening
    /// thousands of connections, the allocator still holds freed pages it hands back over
    /// several seconds; a reading taken then counts garbage as the cost of a connection (or,
    /// when the baseline holds it, makes the cost negative). Gives the last reading after
    /// `SETTLE_LIMIT` if memory never settles.
    pub async fn settled(tunnel: &Tunnel) -> anyhow::Result<Rss> {
        let deadline = tokio::time::Instant::now() + SETTLE_LIMIT;
        let mut last = Rss::of(tunnel)?;
        let mut steady = 1;
        while steady < SETTLE_SAMPLES && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(SETTLE_SAMPLE).await;
            let now = Rss::of(tunnel)?;
            steady = if now.within(&last, SETTLE_SLACK_KIB) {
                steady + 1
            } else {
                1
            };
            last = now;
        }
        Ok(last)
    }

    /// Whether both readings are within `slack` KiB of `other`'s.
    fn within(&self, other: &Rss, slack: u64) -> bool {
        self.gateway_kib.abs_diff(other.gateway_kib) <= slack
            && self.agent_kib.abs_diff(other.agent_kib) <= slack
    }
}

/// One row of the memory section.
#[derive(Debug, Clone, Serialize)]
pub struct Level {
    pub attempted: u32,
    pub succeeded: u32,
    /// Memory right before opening, and while all were open.
    pub idle: Option<Rss>,
    pub with: Option<Rss>,
    /// Why the level did not run.
    pub skipped: Option<String>,
    /// Each distinct reason a connection failed, with how often.
    pub failures: BTreeMap<String, u32>,
}

impl Level {
    /// KiB per connection for the gateway and the agent (growth over the connections held).
    pub fn per_connection(&self) -> Option<(f64, f64)> {
        let (idle, with) = (self.idle?, self.with?);
        let n = f64::from(self.succeeded.max(1));
        let per = |a: u64, b: u64| (b as f64 - a as f64) / n;
        Some((
            per(idle.gateway_kib, with.gateway_kib),
            per(idle.agent_kib, with.agent_kib),
        ))
    }
}

/// Why `n` connections cannot be held under an open-file limit of `limit`, if they cannot:
/// the bench, the echo child, the gateway and the agent each hold one descriptor per
/// connection.
pub fn fd_shortfall(n: u32, limit: u64) -> Option<String> {
    let need = u64::from(n) + FD_SLACK;
    (need > limit).then(|| format!("skipped: needs ~{need} open files, the limit is {limit}"))
}

/// Holds `n` idle connections to `addr` (the tunnelled `echo` child) and measures memory. Fails only
/// on a wrong echo or a target that keeps connections after the clients closed them; failed
/// connections are counted in the level.
pub async fn level(
    addr: SocketAddr,
    n: u32,
    tunnel: &Tunnel,
    echo: &mut EchoProcess,
    fd_limit: u64,
) -> anyhow::Result<Level> {
    let mut level = Level {
        attempted: n,
        succeeded: 0,
        idle: None,
        with: None,
        skipped: fd_shortfall(n, fd_limit),
        failures: BTreeMap::new(),
    };
    if level.skipped.is_some() {
        return Ok(level);
    }
    wait_closed(echo).await?;
    level.idle = Some(Rss::settled(tunnel).await?);
    let conns = open_idle(addr, n, &mut level.failures).await?;
    level.succeeded = u32::try_from(conns.len())?;
    level.with = Some(Rss::settled(tunnel).await?);
    drop(conns);
    wait_closed(echo).await?;
    Ok(level)
}

/// Opens `n` connections, `IN_FLIGHT` at a time, each proven by one echo.
async fn open_idle(
    addr: SocketAddr,
    n: u32,
    failures: &mut BTreeMap<String, u32>,
) -> anyhow::Result<Vec<TcpStream>> {
    let gate = Arc::new(Semaphore::new(IN_FLIGHT));
    let mut tasks = JoinSet::new();
    for i in 0..n {
        let permit = gate.clone().acquire_owned().await?;
        tasks.spawn(async move {
            let opened = tokio::time::timeout(OPEN_LIMIT, open_one(addr, i)).await;
            drop(permit);
            opened.unwrap_or(Err(Failure::Io(format!("timed out after {OPEN_LIMIT:?}"))))
        });
    }
    let mut conns = Vec::with_capacity(n as usize);
    while let Some(joined) = tasks.join_next().await {
        match joined.context("an open task panicked")? {
            Ok(stream) => conns.push(stream),
            Err(Failure::Io(why)) => *failures.entry(why).or_default() += 1,
            Err(Failure::WrongEcho(i)) => bail!("memory: connection {i} echoed wrong bytes"),
        }
    }
    Ok(conns)
}

enum Failure {
    Io(String),
    WrongEcho(u32),
}

/// Maps an I/O error at `stage` to a failure.
fn io(stage: &'static str) -> impl Fn(std::io::Error) -> Failure {
    move |e| Failure::Io(format!("{stage}: {e}"))
}

async fn open_one(addr: SocketAddr, i: u32) -> Result<TcpStream, Failure> {
    let mut stream = TcpStream::connect(addr).await.map_err(io("connect"))?;
    let (mut out, mut back) = ([0u8; MESSAGE], [0u8; MESSAGE]);
    fill(&mut out, u64::from(i));
    stream.write_all(&out).await.map_err(io("write"))?;
    stream.read_exact(&mut back).await.map_err(io("echo"))?;
    if out != back {
        return Err(Failure::WrongEcho(i));
    }
    Ok(stream)
}

/// Waits until the echo target has no connection left.
async fn wait_closed(echo: &mut EchoProcess) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + CLOSE_LIMIT;
    loop {
        let open = echo.open().await?;
        if open == 0 {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!(
                "memory: {open} target connections still open {CLOSE_LIMIT:?} after the \
                 clients closed theirs"
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readings_within_slack_count_as_settled() {
        let a = Rss {
            gateway_kib: 10_000,
            agent_kib: 20_000,
        };
        let near = Rss {
            gateway_kib: 10_200,
            agent_kib: 19_800,
        };
        let far = Rss {
            gateway_kib: 10_000,
            agent_kib: 25_000,
        };
        assert!(a.within(&near, SETTLE_SLACK_KIB));
        assert!(!a.within(&far, SETTLE_SLACK_KIB));
    }
}
