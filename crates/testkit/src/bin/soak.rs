//! `burrow-soak`: runs a real gateway and agent for a while under connection churn plus many
//! idle connections, and reports their memory and file descriptors at the start, every few
//! seconds, and at the end.
//!
//! Exits non-zero if any connection failed, an idle connection died, either process grew by
//! more than `--max-fd-growth` descriptors, or either did not exit 0 on SIGTERM.
//!
//! ```sh
//! cargo build --release -p burrow-cli -p burrow-testkit
//! target/release/burrow-soak --duration 10m --idle 1000
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use burrow_testkit::targets::echo_once;
use burrow_testkit::{
    AgentProc, AgentSpec, GatewayProc, GatewaySpec, ProcStats, Signal, TcpTarget,
};
use clap::Parser;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Soak test of the real burrow binaries: churn plus idle connections for a set time.
#[derive(Debug, Parser)]
#[command(name = "burrow-soak")]
struct Args {
    /// The burrow binary [default: $BURROW_BIN, else target/release/burrow, else
    /// target/debug/burrow under $CARGO_TARGET_DIR or the workspace]
    #[arg(long, env = "BURROW_BIN", value_name = "PATH")]
    burrow: Option<PathBuf>,

    /// How long to run the churn
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    duration: Duration,

    /// Connections opened at the start and held open (idle) to the end
    #[arg(long, default_value_t = 1000)]
    idle: usize,

    /// Clients making short connections (connect, 16-byte echo, close) back to back
    #[arg(long, default_value_t = 4)]
    churn_clients: usize,

    /// Interval between progress reports
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    report_every: Duration,

    /// Largest allowed growth of either process's open descriptors, start to end
    #[arg(long, default_value_t = 16)]
    max_fd_growth: u64,
}

/// One short connection's message.
const MSG: &[u8; 16] = b"burrow-soak-0123";

fn default_binary() -> Option<PathBuf> {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut dirs = Vec::new();
    if let Some(t) = std::env::var_os("CARGO_TARGET_DIR") {
        dirs.push(PathBuf::from(t));
    }
    dirs.push(workspace.join("target"));
    for profile in ["release", "debug"] {
        for d in &dirs {
            let p = d.join(profile).join("burrow");
            if p.is_file() {
                return Some(p);
            }
        }
    }
    None
}

fn main() -> ExitCode {
    let args = Args::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(soak(args)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[derive(Default)]
struct Counts {
    ok: AtomicU64,
    failed: AtomicU64,
}

fn line(t: Duration, gw: &GatewayProc, agent: &AgentProc, counts: &Counts) -> String {
    let s = |r: burrow_testkit::Result<ProcStats>| match r {
        Ok(s) => s.to_string(),
        Err(e) => format!("({e})"),
    };
    format!(
        "t={:>4}s  gateway: {}  |  agent: {}  |  connections {} ok, {} failed",
        t.as_secs(),
        s(gw.stats()),
        s(agent.stats()),
        counts.ok.load(Ordering::Relaxed),
        counts.failed.load(Ordering::Relaxed)
    )
}

async fn soak(args: Args) -> anyhow::Result<bool> {
    let bin = match args.burrow.clone().or_else(default_binary) {
        Some(b) => b,
        None => bail!(
            "no burrow binary: build one (cargo build --release -p burrow-cli) or pass --burrow PATH"
        ),
    };
    if !bin.is_file() {
        bail!("{} is not a file: pass --burrow PATH", bin.display());
    }
    let limit = burrow_testkit::raise_fd_limit();
    println!(
        "burrow-soak: {} for {:?}, {} idle connections, {} churn clients (fd limit {limit})",
        bin.display(),
        args.duration,
        args.idle,
        args.churn_clients
    );

    let state = tempfile::tempdir()?;
    let echo = TcpTarget::echo().await?;
    let mut gw = GatewaySpec::new(state.path())
        .start(&bin)
        .await
        .context("starting the gateway")?;
    let mut agent = AgentSpec::new(gw.agent_args())
        .forward(&echo.addr().to_string())
        .start(&bin)
        .await
        .context("starting the agent")?;
    let public = agent.public(0);
    if !echo_once(public, MSG).await? {
        bail!("the first echo through {public} came back wrong");
    }
    let started = Instant::now();
    let counts = Arc::new(Counts::default());
    let gw0 = gw.stats()?;
    let agent0 = agent.stats()?;
    println!("start     gateway: {gw0}  |  agent: {agent0}");

    // Idle connections: each proves it works once, then stays open.
    let mut idle = Vec::with_capacity(args.idle);
    for _ in 0..args.idle {
        match open_idle(public).await {
            Ok(c) => idle.push(c),
            Err(e) => {
                counts.failed.fetch_add(1, Ordering::Relaxed);
                eprintln!("idle connection failed: {e}");
            }
        }
    }
    println!(
        "{}  ({} idle open)",
        line(started.elapsed(), &gw, &agent, &counts),
        idle.len()
    );

    // Churn.
    let deadline = Instant::now() + args.duration;
    let first_errors = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let mut workers = Vec::new();
    for _ in 0..args.churn_clients {
        let (counts, errors) = (counts.clone(), first_errors.clone());
        workers.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                match tokio::time::timeout(Duration::from_secs(10), echo_once(public, MSG)).await {
                    Ok(Ok(true)) => {
                        counts.ok.fetch_add(1, Ordering::Relaxed);
                    }
                    other => {
                        counts.failed.fetch_add(1, Ordering::Relaxed);
                        let why = match other {
                            Ok(Ok(_)) => "echo differed".to_string(),
                            Ok(Err(e)) => e.to_string(),
                            Err(_) => "no echo within 10 s".to_string(),
                        };
                        let mut v = errors.lock().unwrap_or_else(|p| p.into_inner());
                        if v.len() < 10 {
                            v.push(why);
                        }
                    }
                }
            }
        }));
    }
    let mut next_report = Instant::now() + args.report_every;
    while Instant::now() < deadline {
        tokio::time::sleep_until(next_report.min(deadline)).await;
        if Instant::now() >= next_report {
            println!("{}", line(started.elapsed(), &gw, &agent, &counts));
            next_report += args.report_every;
        }
    }
    for w in workers {
        w.await?;
    }
    let churned = counts.ok.load(Ordering::Relaxed);
    println!(
        "{}  (churn over: {:.0} connections/s)",
        line(started.elapsed(), &gw, &agent, &counts),
        churned as f64 / args.duration.as_secs_f64().max(1e-9)
    );

    // The idle connections must have survived.
    let mut dead = 0u64;
    for c in &mut idle {
        if echo_on(c).await.is_err() {
            dead += 1;
        }
    }
    drop(idle);

    // Let both processes close what the clients closed.
    let settle = Instant::now() + Duration::from_secs(15);
    let (mut gw1, mut agent1) = (gw.stats()?, agent.stats()?);
    while (gw1.fds > gw0.fds + args.max_fd_growth || agent1.fds > agent0.fds + args.max_fd_growth)
        && Instant::now() < settle
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
        (gw1, agent1) = (gw.stats()?, agent.stats()?);
    }
    println!("end       gateway: {gw1}  |  agent: {agent1}");

    agent.signal(Signal::Term)?;
    let agent_exit = agent.wait_exit(Duration::from_secs(20)).await?;
    gw.signal(Signal::Term)?;
    let gw_exit = gw.wait_exit(Duration::from_secs(20)).await?;
    let panics: Vec<String> = gw.panics().into_iter().chain(agent.panics()).collect();

    let failed = counts.failed.load(Ordering::Relaxed);
    let growth = |a: &ProcStats, b: &ProcStats| b.fds as i64 - a.fds as i64;
    println!(
        "summary: {} connections ok, {failed} failed, {dead} of {} idle died; fds gateway {:+}, agent {:+}; \
         rss gateway {:+.1} MiB, agent {:+.1} MiB; exits: gateway {gw_exit}, agent {agent_exit}",
        churned + args.idle as u64,
        args.idle,
        growth(&gw0, &gw1),
        growth(&agent0, &agent1),
        gw1.rss_mib() - gw0.rss_mib(),
        agent1.rss_mib() - agent0.rss_mib(),
    );
    let errors = first_errors
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    for e in &errors {
        println!("  failure: {e}");
    }
    for p in &panics {
        println!("  panic: {p}");
    }
    let ok = failed == 0
        && dead == 0
        && growth(&gw0, &gw1) <= args.max_fd_growth as i64
        && growth(&agent0, &agent1) <= args.max_fd_growth as i64
        && gw_exit.success()
        && agent_exit.success()
        && panics.is_empty();
    println!("{}", if ok { "PASS" } else { "FAIL" });
    Ok(ok)
}

async fn open_idle(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let mut c = TcpStream::connect(addr).await?;
    echo_on(&mut c).await?;
    Ok(c)
}

/// One 16-byte echo on an open connection.
async fn echo_on(c: &mut TcpStream) -> std::io::Result<()> {
    tokio::time::timeout(Duration::from_secs(10), async {
        c.write_all(MSG).await?;
        let mut got = [0u8; 16];
        c.read_exact(&mut got).await?;
        if &got != MSG {
            return Err(std::io::Error::other("echo differed"));
        }
        Ok(())
    })
    .await
    .map_err(|_| std::io::Error::other("no echo within 10 s"))?
}
