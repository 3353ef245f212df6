//! The lossy-link rows: TLS against QUIC with 1% of the carrier's packets lost and each held
//! 20 ms, in the kernel, where QUIC's independent streams should show.
//!
//! This kernel has no `netem`, so the link is made of two netfilter rules in a network
//! namespace of the bench's own (a child of the bench re-run under `unshare --net`, so the
//! machine's network is never touched): on the `INPUT` hook, for the packets of each tunnel's
//! carrier only (TCP to and from the tls gateway's port, UDP to and from the quic
//! gateway's), `-m statistic --mode random --probability 0.01 -j DROP`, then `-j NFQUEUE`,
//! which hands each packet to [`Delayer`]: it gives the verdict (accept) 20 ms after the
//! packet arrived. The kernel's TCP and QUIC's UDP see the same loss and the same delay
//! end to end: what `tc qdisc add dev lo root netem delay 20ms loss 1%` does, restricted
//! to the carrier (on loopback every packet passes `INPUT` once, so each direction gets both,
//! and a round trip takes 40 ms more). Loopback runs with a 1,500-byte MTU and no
//! segmentation offload (`gso_max_segs 1`), so a "packet" is one 1,500-byte segment or one
//! QUIC datagram, as on a real link.
//!
//! The workload, per round and transport: 8 connections doing 64-byte request/responses
//! back to back (p50, p99 over all of them), first alone, then beside a bulk upload on a
//! ninth connection (its Mbit/s). Over TLS every stream shares one TCP connection, so a lost
//! segment holds all of them until it is retransmitted (head-of-line blocking); over QUIC
//! only the stream whose bytes were lost waits.
//!
//! `--quick` runs the request/responses alone only: beside the bulk upload, the upload's
//! bytes take many seconds to drain on this link.
//!
//! It needs root (a network namespace, netfilter rules) and `iptables` (Debian's package of
//! that name; `nft` cannot queue packets here, `CONFIG_NFT_QUEUE` is not set): without them
//! the rows are skipped with a note.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::latency::{fill, MESSAGE};
use crate::options::Settings;
use crate::procs::{Transport, Tunnel};
use crate::stats;
use crate::targets::Targets;
use crate::throughput::{self, Direction, Endpoints, Workload};

/// Share of the carrier's packets dropped, percent.
pub const LOSS_PERCENT: f64 = 1.0;
/// How long each of the carrier's packets is held.
pub const DELAY: Duration = Duration::from_millis(20);
/// Parallel request/response connections.
const STREAMS: usize = 8;
/// The netfilter queue the delayer reads.
const QUEUE: u16 = 7;
/// Longest one round trip may take before the workload fails.
const ROUND_TRIP_LIMIT: Duration = Duration::from_secs(20);
/// At most this many round trips per connection and run (the time bounds it first).
const MAX_TRIPS: usize = 200_000;

/// What the child measured, round by round, per transport.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Lossy {
    /// Why the rows were not measured, when they were not.
    pub skipped: Option<String>,
    pub rounds: Vec<Round>,
    /// The netfilter counters at the end: packets the loss rule dropped, packets delayed.
    pub counters: Vec<(String, u64, u64)>,
}

/// One round of one transport.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Round {
    /// `tls` or `quic`.
    pub transport: String,
    /// Milliseconds, 8 connections alone.
    pub alone_p50_ms: f64,
    pub alone_p99_ms: f64,
    /// Milliseconds, the same beside the bulk upload (`None` in the smoke run).
    pub beside_p50_ms: Option<f64>,
    pub beside_p99_ms: Option<f64>,
    /// The bulk upload beside them, Mbit/s.
    pub bulk_mbit: Option<f64>,
}

/// What the child process prints on stdout.
#[derive(Debug, Default, Serialize, Deserialize)]
struct ChildOut {
    lossy: Lossy,
    failures: Vec<String>,
    notes: Vec<String>,
}

/// Runs the rows in a child process in a network namespace of its own; the failures and notes
/// go to `failures` and `notes`.
pub async fn run(
    settings: &Settings,
    bin: &Path,
    failures: &mut Vec<String>,
    notes: &mut Vec<String>,
) -> Lossy {
    let skip = |why: String| {
        eprintln!("bench: lossy-link rows skipped: {why}");
        Lossy {
            skipped: Some(why),
            ..Lossy::default()
        }
    };
    if let Err(why) = prerequisites() {
        return skip(why);
    }
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => return skip(format!("cannot find the bench's own executable: {e}")),
    };
    eprintln!("bench: lossy-link rows (1% loss, 20 ms per packet) in a network namespace");
    let mut cmd = tokio::process::Command::new("unshare");
    cmd.arg("--net")
        .arg("--")
        .arg(exe)
        .arg("--lossy-child")
        .arg("--rounds")
        .arg(settings.rounds.to_string())
        .arg("--duration")
        .arg(format!("{}ms", settings.duration.as_millis()))
        .args(settings.quick.then_some("--quick"))
        .env("BURROW_BIN", bin)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    // Four runs per round, plus start-up and the bulk upload's drain.
    let limit = settings.duration * 4 * settings.rounds * 3 + Duration::from_secs(120);
    // Not `output()`, which would capture stderr too: the child's progress goes to ours.
    let child = match cmd.spawn() {
        Ok(child) => child,
        Err(e) => return skip(format!("cannot run unshare: {e}")),
    };
    let out = match tokio::time::timeout(limit, child.wait_with_output()).await {
        Ok(Ok(out)) => out,
        Ok(Err(e)) => return skip(format!("waiting for the child failed: {e}")),
        Err(_) => {
            failures.push(format!(
                "lossy-link rows: the child did not finish within {limit:?}"
            ));
            return Lossy::default();
        }
    };
    match serde_json::from_slice::<ChildOut>(&out.stdout) {
        Ok(child) => {
            if let Some(why) = &child.lossy.skipped {
                eprintln!("bench: lossy-link rows skipped: {why}");
            }
            failures.extend(child.failures);
            notes.extend(child.notes);
            child.lossy
        }
        Err(e) => {
            failures.push(format!(
                "lossy-link rows: the child ({}) printed no result: {e}",
                out.status
            ));
            Lossy::default()
        }
    }
}

/// Root, `unshare`, `ip` and `iptables`, or why not.
fn prerequisites() -> Result<(), String> {
    if !rustix::process::geteuid().is_root() {
        return Err("they need root (a network namespace and netfilter rules of their own)".into());
    }
    for (tool, package) in [
        ("unshare", "util-linux"),
        ("ip", "iproute2"),
        ("iptables", "iptables"),
    ] {
        let found = std::process::Command::new(tool)
            .arg(if tool == "ip" { "-V" } else { "--version" })
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            return Err(format!(
                "they need `{tool}` (Debian package {package}); install it to measure them"
            ));
        }
    }
    let ns = std::process::Command::new("unshare")
        .args(["--net", "true"])
        .stderr(Stdio::null())
        .status();
    if !ns.is_ok_and(|s| s.success()) {
        return Err(
            "`unshare --net` failed: this container may not make network namespaces".into(),
        );
    }
    Ok(())
}

/// The child: inside the new namespace, sets up the link, measures, prints JSON.
pub fn child_main(settings: &Settings) -> ExitCode {
    let mut out = ChildOut::default();
    if let Err(e) = child(settings, &mut out) {
        out.failures.push(format!("lossy-link rows: {e:#}"));
    }
    match serde_json::to_string(&out) {
        Ok(json) => {
            println!("{json}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("burrow-bench lossy child: {e}");
            ExitCode::FAILURE
        }
    }
}

fn sh(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = std::process::Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("cannot run {program}"))?;
    ensure!(
        out.status.success(),
        "`{program} {}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// What makes the link; an error here skips the rows (the kernel or the container lacks
/// something), it is no failed check.
fn link() -> anyhow::Result<Delayer> {
    sh("ip", &["link", "set", "lo", "up", "mtu", "1500"])?;
    sh("ip", &["link", "set", "lo", "gso_max_segs", "1"])?;
    // The rules' matches and targets, tried once on a port nothing uses.
    let probe = [
        "-p",
        "tcp",
        "-m",
        "multiport",
        "--ports",
        "9",
        "-m",
        "statistic",
    ];
    let mut rule = vec!["-A", "INPUT"];
    rule.extend(probe);
    rule.extend(["--mode", "random", "--probability", "0.01", "-j", "NFQUEUE"]);
    sh("iptables", &rule)?;
    rule[0] = "-D";
    sh("iptables", &rule)?;
    Delayer::start(QUEUE, DELAY)
}

fn child(settings: &Settings, out: &mut ChildOut) -> anyhow::Result<()> {
    let bin = crate::procs::locate_binary()?;
    let delayer = match link() {
        Ok(d) => d,
        Err(e) => {
            out.lossy.skipped = Some(format!("cannot make the lossy link here: {e:#}"));
            return Ok(());
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let result = runtime.block_on(measure(settings, &bin, out));
    let (delayed, overflowed) = delayer.stop();
    if overflowed > 0 {
        out.notes.push(format!(
            "lossy-link rows: the delayer's queue overflowed {overflowed} time(s) (packets lost \
             beyond the 1%)"
        ));
    }
    eprintln!("bench: lossy-link rows: {delayed} packets delayed");
    result
}

async fn measure(settings: &Settings, bin: &Path, out: &mut ChildOut) -> anyhow::Result<()> {
    let targets = Targets::start(settings.write_len).await?;
    let published = [targets.echo.to_string(), targets.sink.to_string()];
    let mut tunnels = Vec::new();
    for transport in [Transport::Tls, Transport::Quic] {
        let tunnel = Tunnel::start(bin, transport, &published, None, None)
            .await
            .with_context(|| format!("the {} tunnel did not start", transport.name()))?;
        tunnels.push((transport, tunnel));
    }
    for (transport, tunnel) in &tunnels {
        let port = tunnel
            .gateway_addr
            .rsplit_once(':')
            .map(|(_, p)| p)
            .context("the gateway's address has no port")?;
        let proto = match transport {
            Transport::Quic => "udp",
            _ => "tcp",
        };
        let rule = ["-p", proto, "-m", "multiport", "--ports", port];
        let probability = format!("{}", LOSS_PERCENT / 100.0);
        let mut drop = vec!["-A", "INPUT"];
        drop.extend(rule);
        drop.extend(["-m", "statistic", "--mode", "random", "--probability"]);
        drop.extend([probability.as_str(), "-j", "DROP"]);
        sh("iptables", &drop)?;
        let queue = QUEUE.to_string();
        let mut delay = vec!["-A", "INPUT"];
        delay.extend(rule);
        delay.extend(["-j", "NFQUEUE", "--queue-num", queue.as_str()]);
        sh("iptables", &delay)?;
    }
    let chunk: Arc<[u8]> = crate::pattern::buffer(settings.write_len).into();
    for round in 1..=settings.rounds {
        for (transport, tunnel) in &tunnels {
            let name = transport.name();
            eprintln!(
                "bench: lossy-link, {name}, round {round}/{}",
                settings.rounds
            );
            let (echo, sink) = (tunnel.public[0], tunnel.public[1]);
            let alone = match request_responses(echo, settings.duration).await {
                Ok(p) => p,
                Err(e) => {
                    out.failures
                        .push(format!("lossy-link, {name}, round {round}, alone: {e:#}"));
                    continue;
                }
            };
            // The smoke run stops here: the bulk upload drains for many seconds on this link
            // (QUIC's stream window of data at about 2 Mbit/s).
            if settings.quick {
                out.lossy.rounds.push(Round {
                    transport: name.to_string(),
                    alone_p50_ms: alone.0,
                    alone_p99_ms: alone.1,
                    beside_p50_ms: None,
                    beside_p99_ms: None,
                    bulk_mbit: None,
                });
                continue;
            }
            let to = Endpoints {
                sink,
                source: targets.source,
                ledger: &targets.ledger,
            };
            let bulk = Workload {
                direction: Direction::Upload,
                streams: 1,
            };
            let (beside, upload) = tokio::join!(
                request_responses(echo, settings.duration),
                throughput::run(&to, bulk, settings.duration, &chunk)
            );
            match (beside, upload) {
                (Ok(beside), Ok(upload)) => out.lossy.rounds.push(Round {
                    transport: name.to_string(),
                    alone_p50_ms: alone.0,
                    alone_p99_ms: alone.1,
                    beside_p50_ms: Some(beside.0),
                    beside_p99_ms: Some(beside.1),
                    bulk_mbit: Some(upload.gbit_per_s() * 1000.0),
                }),
                (Err(e), _) | (_, Err(e)) => out.failures.push(format!(
                    "lossy-link, {name}, round {round}, beside the upload: {e:#}"
                )),
            }
        }
    }
    out.lossy.counters = counters().unwrap_or_default();
    for (_, tunnel) in tunnels {
        out.notes.extend(tunnel.stop().await);
    }
    Ok(())
}

/// Per rule pair (its ports): packets the loss rule dropped and packets the delay rule
/// queued, from `iptables -L INPUT -v -n -x`.
fn counters() -> anyhow::Result<Vec<(String, u64, u64)>> {
    let listing = sh("iptables", &["-L", "INPUT", "-v", "-n", "-x"])?;
    let mut pairs: Vec<(String, u64, u64)> = Vec::new();
    for line in listing.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        let Some(packets) = words.first().and_then(|w| w.parse::<u64>().ok()) else {
            continue;
        };
        let Some(ports) = line.split("ports ").nth(1) else {
            continue;
        };
        let proto = if line.contains(" udp ") || words.get(3) == Some(&"17") {
            "udp"
        } else {
            "tcp"
        };
        let what = format!("{proto} {}", ports.split_whitespace().next().unwrap_or("?"));
        if line.contains("DROP") {
            pairs.push((what, packets, 0));
        } else if let Some(pair) = pairs.iter_mut().find(|p| p.0 == what) {
            pair.2 = packets;
        }
    }
    Ok(pairs)
}

/// [`STREAMS`] connections doing 64-byte request/responses back to back for `duration`;
/// p50 and p99 over all their round trips, milliseconds (each connection's first round trip,
/// which opens its stream, left out).
async fn request_responses(echo: SocketAddr, duration: Duration) -> anyhow::Result<(f64, f64)> {
    let mut conns = Vec::new();
    for _ in 0..STREAMS {
        let c = TcpStream::connect(echo)
            .await
            .with_context(|| format!("cannot connect to {echo}"))?;
        c.set_nodelay(true)?;
        conns.push(c);
    }
    let end = tokio::time::Instant::now() + duration;
    let mut tasks = tokio::task::JoinSet::new();
    for (n, mut c) in conns.into_iter().enumerate() {
        tasks.spawn(async move {
            let (mut msg, mut back) = ([0u8; MESSAGE], [0u8; MESSAGE]);
            let mut samples = Vec::new();
            for i in 0..MAX_TRIPS {
                if i > 0 && tokio::time::Instant::now() >= end {
                    break;
                }
                fill(&mut msg, (n * MAX_TRIPS + i) as u64);
                let start = tokio::time::Instant::now();
                let trip = async {
                    c.write_all(&msg).await?;
                    c.read_exact(&mut back).await
                };
                tokio::time::timeout(ROUND_TRIP_LIMIT, trip)
                    .await
                    .with_context(|| format!("a round trip took over {ROUND_TRIP_LIMIT:?}"))??;
                ensure!(msg == back, "echo {i} on connection {n} differs");
                if i > 0 {
                    samples.push(start.elapsed().as_secs_f64() * 1000.0);
                }
            }
            anyhow::Ok(samples)
        });
    }
    let mut all = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        all.extend(joined.context("a request/response task panicked")??);
    }
    if all.is_empty() {
        bail!("no round trip finished");
    }
    all.sort_by(f64::total_cmp);
    Ok((stats::percentile(&all, 50.0), stats::percentile(&all, 99.0)))
}

/// Holds each packet of a netfilter queue for a fixed time, then accepts it: a thread reading
/// the queue's netlink socket (`nfnetlink_queue`, metadata only) and giving verdicts.
struct Delayer {
    stop: Arc<AtomicBool>,
    delayed: Arc<AtomicU64>,
    overflowed: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

// nfnetlink_queue's constants (linux/netfilter/nfnetlink_queue.h).
const NFNL_SUBSYS_QUEUE: u16 = 3;
const NFQNL_MSG_PACKET: u16 = 0;
const NFQNL_MSG_VERDICT_BATCH: u16 = 3;
const NFQNL_MSG_CONFIG: u16 = 2;
const NFQA_CFG_CMD: u16 = 1;
const NFQA_CFG_PARAMS: u16 = 2;
const NFQA_CFG_QUEUE_MAXLEN: u16 = 3;
const NFQA_PACKET_HDR: u16 = 1;
const NFQA_VERDICT_HDR: u16 = 2;
const NFQNL_CFG_CMD_BIND: u8 = 1;
const NFQNL_COPY_META: u8 = 1;
const NF_ACCEPT: u32 = 1;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLMSG_ERROR: u16 = 2;
const AF_INET: u16 = 2;

/// One netlink message of the queue subsystem: header, `nfgenmsg`, attributes.
fn message(kind: u16, flags: u16, seq: u32, queue: u16, attrs: &[(u16, Vec<u8>)]) -> Vec<u8> {
    let mut body = vec![0u8, 0]; // nfgenmsg: AF_UNSPEC, version 0
    body.extend(queue.to_be_bytes());
    for (kind, data) in attrs {
        body.extend(((4 + data.len()) as u16).to_ne_bytes());
        body.extend(kind.to_ne_bytes());
        body.extend(data);
        while body.len() % 4 != 0 {
            body.push(0);
        }
    }
    let mut msg = Vec::with_capacity(16 + body.len());
    msg.extend(((16 + body.len()) as u32).to_ne_bytes());
    msg.extend(((NFNL_SUBSYS_QUEUE << 8) | kind).to_ne_bytes());
    msg.extend((flags | NLM_F_REQUEST).to_ne_bytes());
    msg.extend(seq.to_ne_bytes());
    msg.extend(0u32.to_ne_bytes());
    msg.extend(body);
    msg
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// Each netlink message in `buf`: (type, payload after the 16-byte header).
fn messages(buf: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    let mut at = 0;
    while let (Some(len), Some(kind)) = (u32_at(buf, at), u16_at(buf, at + 4)) {
        let len = len as usize;
        if len < 16 || at + len > buf.len() {
            break;
        }
        out.push((kind, &buf[at + 16..at + len]));
        at += (len + 3) & !3;
    }
    out
}

/// The packet id of a queued packet's payload (after `nfgenmsg`).
fn packet_id(payload: &[u8]) -> Option<u32> {
    let mut at = 4;
    while let (Some(len), Some(kind)) = (u16_at(payload, at), u16_at(payload, at + 2)) {
        let len = len as usize;
        if len < 4 {
            return None;
        }
        if kind & 0x3fff == NFQA_PACKET_HDR {
            let id = payload.get(at + 4..at + 8)?;
            return Some(u32::from_be_bytes(id.try_into().ok()?));
        }
        at += (len + 3) & !3;
    }
    None
}

impl Delayer {
    /// Binds queue `queue` and starts the thread.
    fn start(queue: u16, delay: Duration) -> anyhow::Result<Delayer> {
        use rustix::net::{self, netlink, AddressFamily, SocketType};
        let fd = net::socket(
            AddressFamily::NETLINK,
            SocketType::RAW,
            Some(netlink::NETFILTER),
        )
        .context("cannot open a netfilter netlink socket")?;
        let kernel = netlink::SocketAddrNetlink::new(0, 0);
        net::bind(&fd, &netlink::SocketAddrNetlink::new(0, 0)).context("netlink bind")?;
        let _ = net::sockopt::set_socket_recv_buffer_size_force(&fd, 16 << 20);
        let send = move |fd: &rustix::fd::OwnedFd, msg: &[u8]| {
            net::sendto(fd, msg, net::SendFlags::empty(), &kernel)
        };
        let mut cmd = vec![NFQNL_CFG_CMD_BIND, 0];
        cmd.extend(AF_INET.to_be_bytes());
        let mut params = 0xffffu32.to_be_bytes().to_vec();
        params.push(NFQNL_COPY_META);
        let config = [
            vec![(NFQA_CFG_CMD, cmd)],
            vec![(NFQA_CFG_PARAMS, params)],
            vec![(NFQA_CFG_QUEUE_MAXLEN, 200_000u32.to_be_bytes().to_vec())],
        ];
        let mut buf = vec![0u8; 1 << 16];
        for (seq, attrs) in config.iter().enumerate() {
            let msg = message(NFQNL_MSG_CONFIG, NLM_F_ACK, seq as u32 + 1, queue, attrs);
            send(&fd, &msg).context("netlink: configuring the queue")?;
            let (n, _) = net::recv(&fd, &mut buf[..], net::RecvFlags::empty())
                .context("netlink: no answer to the queue's configuration")?;
            for (kind, payload) in messages(&buf[..n]) {
                let errno = payload
                    .get(..4)
                    .map(|e| i32::from_ne_bytes([e[0], e[1], e[2], e[3]]));
                if kind == NLMSG_ERROR && errno != Some(0) {
                    bail!("netlink: the kernel refused the queue's configuration ({errno:?})");
                }
            }
        }
        net::sockopt::set_socket_timeout(
            &fd,
            net::sockopt::Timeout::Recv,
            Some(Duration::from_millis(1)),
        )
        .context("netlink: receive timeout")?;
        let stop = Arc::new(AtomicBool::new(false));
        let delayed = Arc::new(AtomicU64::new(0));
        let overflowed = Arc::new(AtomicU64::new(0));
        let (stop2, delayed2, overflowed2) = (stop.clone(), delayed.clone(), overflowed.clone());
        let thread = std::thread::spawn(move || {
            let mut held: VecDeque<(Instant, u32)> = VecDeque::new();
            let mut seq = 100u32;
            while !stop2.load(Ordering::Relaxed) || !held.is_empty() {
                match net::recv(&fd, &mut buf[..], net::RecvFlags::empty()) {
                    Ok((n, _)) => {
                        let now = Instant::now();
                        for (kind, payload) in messages(&buf[..n]) {
                            if kind == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET {
                                if let Some(id) = packet_id(payload) {
                                    held.push_back((now + delay, id));
                                    delayed2.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                        }
                    }
                    Err(rustix::io::Errno::NOBUFS) => {
                        overflowed2.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => {}
                }
                // Ids grow in arrival order and every packet waits the same time: one batch
                // verdict accepts every id up to the last one due.
                let now = Instant::now();
                let mut last = None;
                while held.front().is_some_and(|&(due, _)| due <= now) {
                    last = held.pop_front().map(|(_, id)| id);
                }
                if let Some(id) = last {
                    let mut hdr = NF_ACCEPT.to_be_bytes().to_vec();
                    hdr.extend(id.to_be_bytes());
                    seq = seq.wrapping_add(1);
                    let msg = message(
                        NFQNL_MSG_VERDICT_BATCH,
                        0,
                        seq,
                        queue,
                        &[(NFQA_VERDICT_HDR, hdr)],
                    );
                    let _ = send(&fd, &msg);
                }
            }
        });
        Ok(Delayer {
            stop,
            delayed,
            overflowed,
            thread: Some(thread),
        })
    }

    /// Stops the thread once every held packet is let through; returns the packets delayed
    /// and the times the queue overflowed.
    fn stop(mut self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        (
            self.delayed.load(Ordering::Relaxed),
            self.overflowed.load(Ordering::Relaxed),
        )
    }
}

impl Lossy {
    /// The section of the report: a table of medians over rounds (min–max), TLS against QUIC.
    pub fn render(&self) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        if let Some(why) = &self.skipped {
            let _ = writeln!(
                out,
                "\nlossy-link rows (1% loss, 20 ms per packet): skipped: {why}"
            );
            return out;
        }
        if self.rounds.is_empty() {
            return out;
        }
        let _ = writeln!(
            out,
            "\nlossy link: {LOSS_PERCENT}% of the carrier's packets dropped and each held \
             {} ms (both ways, in the kernel), TLS against QUIC; {STREAMS} connections of \
             64-byte request/responses, alone and beside a bulk upload\n",
            DELAY.as_millis()
        );
        out.push_str("| metric | tls | quic | quic / tls |\n|---|---:|---:|---:|\n");
        type Pick = fn(&Round) -> Option<f64>;
        let rows: [(&str, Pick); 5] = [
            ("request/response, 8 streams, p50 (ms)", |r| {
                Some(r.alone_p50_ms)
            }),
            ("request/response, 8 streams, p99 (ms)", |r| {
                Some(r.alone_p99_ms)
            }),
            ("request/response beside a bulk upload, p50 (ms)", |r| {
                r.beside_p50_ms
            }),
            ("request/response beside a bulk upload, p99 (ms)", |r| {
                r.beside_p99_ms
            }),
            ("bulk upload beside them (Mbit/s)", |r| r.bulk_mbit),
        ];
        for (label, pick) in rows {
            let of = |t: Transport| {
                let v: Vec<f64> = (self.rounds.iter())
                    .filter(|r| r.transport == t.name())
                    .filter_map(pick)
                    .collect();
                stats::spread(&v)
            };
            let (tls, quic) = (of(Transport::Tls), of(Transport::Quic));
            let cell = |s: &Option<stats::Spread>| match s {
                Some(s) => format!("{:.1} ({:.1}–{:.1})", s.median, s.min, s.max),
                None => "—".into(),
            };
            let ratio = match (&tls, &quic) {
                (Some(t), Some(q)) if t.median > 0.0 => format!("{:.2}x", q.median / t.median),
                _ => "—".into(),
            };
            let _ = writeln!(
                out,
                "| {label} | {} | {} | {ratio} |",
                cell(&tls),
                cell(&quic)
            );
        }
        for (what, dropped, delayed) in &self.counters {
            let seen = dropped + delayed;
            let share = *dropped as f64 * 100.0 / (seen as f64).max(1.0);
            let _ = writeln!(
                out,
                "\n{what}: {dropped} of {seen} packets dropped ({share:.2}%), {delayed} delayed"
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netlink_messages_round_trip() {
        let msg = message(
            NFQNL_MSG_CONFIG,
            NLM_F_ACK,
            9,
            7,
            &[(NFQA_CFG_CMD, vec![1, 0, 0, 2])],
        );
        assert_eq!(msg.len(), 16 + 4 + 8);
        let parsed = messages(&msg);
        assert_eq!(parsed.len(), 1);
        assert_eq!(parsed[0].0, (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_CONFIG);
        // A packet message: nfgenmsg, then NFQA_PACKET_HDR with id 0x01020304.
        let mut payload = vec![0, 0, 0, 7];
        payload.extend(8u16.to_ne_bytes());
        payload.extend(NFQA_PACKET_HDR.to_ne_bytes());
        payload.extend([1, 2, 3, 4]);
        assert_eq!(packet_id(&payload), Some(0x0102_0304));
        assert_eq!(packet_id(&payload[..6]), None);
        assert!(messages(&[1, 2, 3]).is_empty());
    }
}
