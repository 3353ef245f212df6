//! `burrow-bench`: runs the real `burrow` gateway and agent as separate processes on loopback
//! and the same workloads through the tunnel, over a direct connection, and through a
//! reference of two plain TCP relays in separate processes (the same hops without encryption
//! or multiplexing), then prints one markdown table with medians, spread and the ratios to
//! direct and to the reference. Each transport (tls, wss, tcp, ws; by default tls and tcp) is
//! a tunnel of its own, measured round-robin with the others, and compared with the tls one;
//! a crypto-floor row (sealing and opening with the session's AEAD) turns TLS's extra CPU
//! over tcp into a multiple of the least encryption costs. With `--peers`, bore and rathole
//! run the same workloads in the same rounds when installed.
//! The connector path (client -> `burrow connect` -> gateway -> agent -> target) is measured
//! in the same rounds too, unless `--skip-connector`.
//! UDP (a UDP forward to a sink) is measured direct and through each tunnel: the most one
//! client gets through, and the loss at half the tls tunnel's maximum rate.
//!
//! ```text
//! cargo run --release -p burrow-bench                            # full run, a few minutes
//! cargo run --release -p burrow-bench -- --quick                 # CI smoke run, seconds
//! cargo run --release -p burrow-bench -- --transport tls,wss,tcp,ws
//! ```
//!
//! It is not a timed test: it exits non-zero only when a correctness check fails (bytes lost,
//! reordered or corrupted, a wrong echo, a workload error, streams left open), never on a
//! number.
//!
//! # Layout
//! - `options`: flags and their defaults (`--quick` picks the small ones).
//! - `procs`: finds or builds `burrow`, runs a gateway and agent pair over one transport,
//!   reads what they print.
//! - `targets`: echo, sink and source services inside the bench; `echo_proc`: an echo in a
//!   child process for the memory rows, so that 10,000 connections fit the open-file limit.
//! - `relay_proc`: the 2-hop reference, two forwarding child processes in a row.
//! - `peers`: bore and rathole, run like the tunnels when installed (`--peers`).
//! - `floor`: the crypto floor, sealing and opening with the TLS session's AEAD.
//! - `connector`: the connector path, a connector in front of a gateway and agent pair.
//! - `throughput`, `latency`, `memory`: the workloads; `udp`: the UDP sink and echo, and the
//!   client that sends datagrams at them.
//! - `lossy`: TLS against QUIC over a lossy, slow link made in a network namespace.
//! - `sys`: open-file limit, `/proc` readings, the machine.
//! - `stats`, `report`: medians and percentiles; the table and its targets;
//!   `side_by_side`: one line per route (Burrow beside the peers) and round 2's targets.

mod connector;
mod echo_proc;
mod floor;
mod latency;
mod lossy;
mod memory;
mod options;
mod pattern;
mod peers;
mod procs;
mod relay_proc;
mod report;
mod side_by_side;
mod stats;
mod sys;
mod targets;
mod throughput;
mod udp;

use std::collections::BTreeMap;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use clap::Parser as _;

use crate::echo_proc::EchoProcess;
use crate::memory::Rss;
use crate::options::Settings;
use crate::peers::PeerTunnel;
use crate::procs::{Transport, Tunnel};
use crate::relay_proc::RelayChain;
use crate::report::{Cpu, CpuUse, Latency, Results, Route, Throughput, Udp};
use crate::targets::Targets;
use crate::throughput::{Direction, Endpoints, Workload};
use crate::udp::UdpTargets;

fn main() -> ExitCode {
    let args = options::Args::parse();
    if let Some(upstreams) = &args.serve_relay {
        return match relay_proc::serve(upstreams) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("burrow-bench relay child: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    if args.lossy_child {
        return lossy::child_main(&args.settings());
    }
    if args.serve_echo {
        return match echo_proc::serve() {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("burrow-bench echo child: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    match run(&args.settings()) {
        Ok(results) if results.failures.is_empty() => ExitCode::SUCCESS,
        Ok(_) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("burrow-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Sets the process up, runs the bench, prints the report.
fn run(settings: &Settings) -> anyhow::Result<Results> {
    // Before any child starts, so they inherit it: each process holds one descriptor per held
    // connection, plus slack.
    let most = settings.conns.iter().copied().max().unwrap_or(0);
    let fd_limit = sys::raise_fd_limit(u64::from(most) + 4096);
    let bin = procs::locate_binary()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let results = runtime.block_on(bench(settings, &bin, fd_limit))?;
    print!("{}", results.render());
    if let Some(path) = &settings.json {
        let json = serde_json::to_string_pretty(&results)?;
        std::fs::write(path, json).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(results)
}

/// One tunnel: targets of its own (so its downloads have their own ledger) behind a gateway
/// and agent pair over one transport.
struct Tunnelled {
    transport: Transport,
    targets: Targets,
    tunnel: Tunnel,
    /// The public addresses of the targets.
    echo: SocketAddr,
    sink: SocketAddr,
    source: SocketAddr,
    /// The public addresses of the UDP sink and echo, when UDP is measured.
    udp: Option<(SocketAddr, SocketAddr)>,
    /// The public address of the memory rows' echo child, on the tunnel they go through.
    held: Option<SocketAddr>,
}

impl Tunnelled {
    /// Starts the targets, then the gateway and agent publishing them, the UDP sink and echo
    /// (shared by every route, when UDP is measured) and `held` (the echo child of the memory
    /// rows, when they go through this tunnel).
    async fn start(
        settings: &Settings,
        bin: &Path,
        transport: Transport,
        gateway_config: Option<&Path>,
        (udp, held): (Option<&UdpTargets>, Option<SocketAddr>),
    ) -> anyhow::Result<Tunnelled> {
        let targets = Targets::start(settings.write_len).await?;
        let mut published: Vec<String> = [targets.echo, targets.sink, targets.source]
            .iter()
            .map(SocketAddr::to_string)
            .collect();
        if let Some(u) = udp {
            published.extend([format!("udp:{}", u.sink), format!("udp:{}", u.echo)]);
        }
        published.extend(held.map(|h| h.to_string()));
        eprintln!(
            "bench: starting {} gateway and agent over {}",
            bin.display(),
            transport.name()
        );
        let tunnel = Tunnel::start(
            bin,
            transport,
            &published,
            gateway_config,
            settings.agent_config.as_deref(),
        )
        .await
        .with_context(|| format!("the {} tunnel did not start", transport.name()))?;
        let [echo, sink, source, ..] = tunnel.public[..] else {
            bail!(
                "the agent printed {} addresses, not {}",
                tunnel.public.len(),
                published.len()
            );
        };
        let udp = match (udp, tunnel.public.get(3..5)) {
            (Some(_), Some(&[sink, echo])) => Some((sink, echo)),
            _ => None,
        };
        let held_at = if udp.is_some() { 5 } else { 3 };
        Ok(Tunnelled {
            transport,
            udp,
            held: tunnel.public.get(held_at).copied(),
            targets,
            tunnel,
            echo,
            sink,
            source,
        })
    }
}

/// The reference path: targets of its own (so its downloads have their own ledger, as the
/// tunnel's do) behind two relay processes.
struct Relayed {
    targets: Targets,
    chain: RelayChain,
    /// Where clients connect, at relay 1, for each target.
    echo: SocketAddr,
    sink: SocketAddr,
    source: SocketAddr,
}

impl Relayed {
    /// Starts the targets, then relay 2 towards them and relay 1 towards relay 2.
    async fn start(write_len: usize) -> anyhow::Result<Relayed> {
        let targets = Targets::start(write_len).await?;
        let chain = RelayChain::start(&[targets.echo, targets.sink, targets.source]).await?;
        let [echo, sink, source] = chain.entry[..] else {
            bail!("relay 1 printed {} addresses, not 3", chain.entry.len());
        };
        Ok(Relayed {
            targets,
            chain,
            echo,
            sink,
            source,
        })
    }
}

/// One route to the targets, ready for the workloads.
struct Way<'a> {
    route: Route,
    to: Endpoints<'a>,
    echo: SocketAddr,
}

/// Starts the targets, the relay reference and a tunnel per transport, runs every section,
/// and stops the tunnels and the relays.
async fn bench(settings: &Settings, bin: &Path, fd_limit: u64) -> anyhow::Result<Results> {
    let mut results = Results {
        machine: Some(sys::Machine::describe(fd_limit)),
        settings: describe(settings),
        transports: settings.transports.clone(),
        relay: settings.relay,
        connector: settings.connector,
        ..Results::default()
    };
    if settings.only_lossy {
        let (failures, notes) = (&mut results.failures, &mut results.notes);
        results.lossy = Some(lossy::run(settings, bin, failures, notes).await);
        return Ok(results);
    }
    if settings.tcp {
        eprintln!(
            "bench: crypto floor, sealing and opening {} MB",
            settings.floor_bytes / 1_000_000
        );
        let bytes = settings.floor_bytes;
        match tokio::task::spawn_blocking(move || floor::measure(bytes)).await? {
            Ok(f) => results.floor = Some(f),
            Err(e) => results.failures.push(format!("crypto floor: {e:#}")),
        }
    }
    let mut peer_tunnels = Vec::new();
    if settings.peers {
        let (found, notes) = peers::find();
        results.notes.extend(notes);
        for (peer, path) in found {
            match PeerTunnel::start(peer, &path, settings.write_len).await {
                Ok(t) => peer_tunnels.push(t),
                Err(e) => results
                    .notes
                    .push(format!("{}: skipped, it did not start: {e:#}", peer.name())),
            }
        }
        results.peers = peer_tunnels.iter().map(|t| t.peer).collect();
    }
    let direct = Targets::start(settings.write_len).await?;
    let udp = if settings.udp {
        Some(UdpTargets::start().await?)
    } else {
        None
    };
    let relayed = if settings.relay {
        eprintln!("bench: starting the 2-hop relay reference");
        Some(Relayed::start(settings.write_len).await?)
    } else {
        None
    };
    let mut held = if settings.conns.is_empty() {
        None
    } else {
        Some(EchoProcess::start().await?)
    };
    let own_config = match held_limit(settings) {
        Some(limit) => Some(held_config(limit)?),
        None => None,
    };
    let gateway_config = (settings.gateway_config.as_deref())
        .or_else(|| own_config.as_ref().map(tempfile::NamedTempFile::path));
    // The memory rows go through the first tunnel.
    let mut tunnels = Vec::new();
    for (i, &transport) in settings.transports.iter().enumerate() {
        let held = held.as_ref().filter(|_| i == 0).map(|h| h.addr);
        let published = (udp.as_ref(), held);
        let started = Tunnelled::start(settings, bin, transport, gateway_config, published).await?;
        tunnels.push(started);
    }
    let connector = if settings.connector {
        Some(connector::ConnectorPath::start(bin, settings.write_len).await?)
    } else {
        None
    };
    let bench = Bench {
        settings,
        direct: &direct,
        udp: udp.as_ref(),
        tunnels: &tunnels,
        relayed: relayed.as_ref(),
        peers: &peer_tunnels,
        connector: connector.as_ref(),
        fd_limit,
    };
    let outcome = bench.sections(&mut results, held.as_mut()).await;
    for t in tunnels {
        results.notes.extend(t.tunnel.stop().await);
    }
    if let Some(c) = connector {
        results.notes.extend(c.stop().await);
    }
    if let Some(relayed) = relayed {
        results.notes.extend(relayed.chain.stop().await);
    }
    for p in peer_tunnels {
        results.notes.extend(p.stop().await);
    }
    outcome?;
    // Last, in a network namespace of its own, with the other tunnels stopped.
    if settings.lossy {
        let (failures, notes) = (&mut results.failures, &mut results.notes);
        results.lossy = Some(lossy::run(settings, bin, failures, notes).await);
    }
    Ok(results)
}

/// What every section needs.
struct Bench<'a> {
    settings: &'a Settings,
    direct: &'a Targets,
    /// The UDP sink and echo; `None` when UDP is skipped.
    udp: Option<&'a UdpTargets>,
    /// One per transport, in the order of `--transport`; never empty.
    tunnels: &'a [Tunnelled],
    /// `None` when the reference is skipped.
    relayed: Option<&'a Relayed>,
    /// The other tunnels (`--peers`) that started.
    peers: &'a [PeerTunnel],
    /// `None` when the connector path is skipped.
    connector: Option<&'a connector::ConnectorPath>,
    fd_limit: u64,
}

impl Bench<'_> {
    async fn sections(
        &self,
        results: &mut Results,
        held: Option<&mut EchoProcess>,
    ) -> anyhow::Result<()> {
        if self.settings.tcp {
            self.warm_up(results).await;
            self.throughput(results).await?;
            self.latency(results).await;
        }
        if let (Some(held), Some(via)) = (held, self.tunnels.first()) {
            if let Some(addr) = via.held {
                self.memory(results, held, via, addr).await?;
            }
        }
        // Last: its flows stay open at both ends for the idle timeout, and would be in the
        // memory rows' readings.
        if let Some(udp) = self.udp {
            self.udp(results, udp).await?;
        }
        Ok(())
    }

    /// Every route measured, in the order each workload runs them: direct, the relay
    /// reference, each peer, each tunnel, then the connector path.
    fn ways(&self) -> Vec<Way<'_>> {
        let mut ways = vec![Way {
            route: Route::Direct,
            to: Endpoints::direct(self.direct),
            echo: self.direct.echo,
        }];
        if let Some(relayed) = self.relayed {
            ways.push(Way {
                route: Route::Relay,
                to: Endpoints {
                    sink: relayed.sink,
                    source: relayed.source,
                    ledger: &relayed.targets.ledger,
                },
                echo: relayed.echo,
            });
        }
        ways.extend(self.peers.iter().map(|p| Way {
            route: Route::Peer(p.peer),
            to: Endpoints {
                sink: p.sink,
                source: p.source,
                ledger: &p.targets.ledger,
            },
            echo: p.echo,
        }));
        ways.extend(self.tunnels.iter().map(|t| Way {
            route: Route::Tunnel(t.transport),
            to: Endpoints {
                sink: t.sink,
                source: t.source,
                ledger: &t.targets.ledger,
            },
            echo: t.echo,
        }));
        if let Some(c) = self.connector {
            ways.push(Way {
                route: Route::Connector,
                to: Endpoints {
                    sink: c.sink,
                    source: c.source,
                    ledger: &c.targets.ledger,
                },
                echo: c.echo,
            });
        }
        ways
    }

    /// Proves every path works and lets the session settle before anything is measured.
    async fn warm_up(&self, results: &mut Results) {
        eprintln!("bench: warm-up");
        let chunk: Arc<[u8]> = pattern::buffer(self.settings.write_len).into();
        let short = Duration::from_millis(100);
        for way in self.ways() {
            let name = way.route.name();
            for direction in [Direction::Upload, Direction::Download] {
                let work = Workload {
                    direction,
                    streams: 1,
                };
                if let Err(e) = throughput::run(&way.to, work, short, &chunk).await {
                    results
                        .failures
                        .push(format!("warm-up, {}, {name}: {e:#}", work.label()));
                }
            }
            if let Err(e) = latency::request_response(way.echo, 100).await {
                results
                    .failures
                    .push(format!("warm-up, echo, {name}: {e:#}"));
            }
        }
    }

    /// Every throughput workload on every route (direct, relay, each tunnel), round after
    /// round; and the CPU time of each gateway and agent pair, and of the relays, over the
    /// whole section.
    async fn throughput(&self, results: &mut Results) -> anyhow::Result<()> {
        let s = self.settings;
        let chunk: Arc<[u8]> = pattern::buffer(s.write_len).into();
        let mut workloads = vec![
            Workload {
                direction: Direction::Upload,
                streams: 1,
            },
            Workload {
                direction: Direction::Download,
                streams: 1,
            },
        ];
        workloads.extend(s.streams.iter().map(|&streams| Workload {
            direction: Direction::Upload,
            streams,
        }));
        let mut rows: Vec<Throughput> = workloads
            .iter()
            .map(|w| Throughput {
                label: w.label(),
                streams: w.streams,
                target_ratio: match w.streams {
                    1 => Some(report::SINGLE_STREAM_RATIO),
                    8 => Some(report::EIGHT_STREAMS_RATIO),
                    _ => None,
                },
                direct: Vec::new(),
                tunnel: Default::default(),
                relay: Vec::new(),
                peer: Default::default(),
                connector: Vec::new(),
            })
            .collect();
        let ways = self.ways();
        let relay_cpu = || self.relayed.map(|r| r.chain.cpu_seconds()).transpose();
        let tunnel_cpu = || -> anyhow::Result<Vec<f64>> {
            self.tunnels
                .iter()
                .map(|t| t.tunnel.cpu_seconds())
                .collect()
        };
        let peer_cpu = || -> anyhow::Result<Vec<f64>> {
            self.peers.iter().map(PeerTunnel::cpu_seconds).collect()
        };
        let cpu_before = tunnel_cpu()?;
        let relay_cpu_before = relay_cpu()?;
        let peer_cpu_before = peer_cpu()?;
        let mut tunnel_bytes = BTreeMap::<Transport, u64>::new();
        let mut peer_bytes = BTreeMap::<peers::Peer, u64>::new();
        let mut relay_bytes = 0;
        for round in 1..=s.rounds {
            eprintln!("bench: throughput, round {round}/{}", s.rounds);
            for (work, row) in workloads.iter().zip(&mut rows) {
                for way in &ways {
                    match throughput::run(&way.to, *work, s.duration, &chunk).await {
                        Ok(t) => {
                            row.side(way.route).push(t.gbit_per_s());
                            match way.route {
                                Route::Direct | Route::Connector => {}
                                Route::Relay => relay_bytes += t.bytes,
                                Route::Peer(p) => *peer_bytes.entry(p).or_default() += t.bytes,
                                Route::Tunnel(transport) => {
                                    *tunnel_bytes.entry(transport).or_default() += t.bytes;
                                }
                            }
                        }
                        Err(e) => results.failures.push(format!(
                            "{}, {}, round {round}: {e:#}",
                            row.label,
                            way.route.name()
                        )),
                    }
                }
            }
        }
        let tunnel = (self.tunnels.iter())
            .zip(tunnel_cpu()?.into_iter().zip(cpu_before))
            .map(|(t, (after, before))| {
                let seconds = after - before;
                let bytes = tunnel_bytes.get(&t.transport).copied().unwrap_or_default();
                (t.transport, CpuUse { seconds, bytes })
            })
            .collect();
        let relay = match (relay_cpu()?, relay_cpu_before) {
            (Some(after), Some(before)) => Some(CpuUse {
                seconds: after - before,
                bytes: relay_bytes,
            }),
            _ => None,
        };
        let peer = (self.peers.iter())
            .zip(peer_cpu()?.into_iter().zip(peer_cpu_before))
            .map(|(p, (after, before))| {
                let bytes = peer_bytes.get(&p.peer).copied().unwrap_or_default();
                (
                    p.peer,
                    CpuUse {
                        seconds: after - before,
                        bytes,
                    },
                )
            })
            .collect();
        results.cpu = Some(Cpu {
            tunnel,
            relay,
            peer,
        });
        results.throughput = rows;
        Ok(())
    }

    /// Request/response and connect + first byte on every route (direct, relay, each tunnel),
    /// round after round. Within a round the routes take turns in [`LATENCY_SLICES`] slices
    /// of the round's attempts, each on one connection kept open, so that they all meet the
    /// same moments of a shared machine: on a VM whose idle cores wake slowly, one route's
    /// run of 20,000 round trips could otherwise land on a quiet second and another's on a
    /// busy one, and the ratios between routes would measure that.
    async fn latency(&self, results: &mut Results) {
        let s = self.settings;
        let (mut rr, mut connect) = (Latency::default(), Latency::default());
        let ways = self.ways();
        for round in 1..=s.rounds {
            eprintln!("bench: latency, round {round}/{}", s.rounds);
            let mut runs = Vec::with_capacity(ways.len());
            for way in &ways {
                let opened = latency::RequestResponse::connect(way.echo, s.rr_iters).await;
                runs.push((opened, latency::ConnectFirstByte::default(), Ok(())));
            }
            for k in 0..LATENCY_SLICES {
                for (way, (trips, attempts, tried)) in ways.iter().zip(&mut runs) {
                    if let Ok(run) = trips {
                        if let Err(e) = run.trips(latency_turn(s.rr_iters, k)).await {
                            *trips = Err(e);
                        }
                    }
                    if tried.is_ok() {
                        *tried = attempts
                            .attempts(way.echo, latency_turn(s.connect_iters, k))
                            .await;
                    }
                }
            }
            for (way, (trips, attempts, tried)) in ways.iter().zip(runs) {
                let name = way.route.name();
                match trips {
                    Ok(run) => rr.side(way.route).push(run.percentiles()),
                    Err(e) => results
                        .failures
                        .push(format!("{name}, round {round}: {e:#}")),
                }
                match tried {
                    Ok(()) => connect.side(way.route).push(attempts.percentiles()),
                    Err(e) => results
                        .failures
                        .push(format!("{name}, round {round}: {e:#}")),
                }
            }
        }
        results.request_response = rr;
        results.connect = connect;
    }

    /// Idle memory of tunnel `via`, then each number of held connections to `addr`, the
    /// public address there of the echo child `held`.
    async fn memory(
        &self,
        results: &mut Results,
        held: &mut EchoProcess,
        via: &Tunnelled,
        addr: SocketAddr,
    ) -> anyhow::Result<()> {
        let tunnel = &via.tunnel;
        results.memory_transport = Some(via.transport);
        results.idle = Some(Rss::settled(tunnel).await?);
        for &n in &self.settings.conns {
            eprintln!("bench: memory, {n} idle connections");
            match memory::level(addr, n, tunnel, held, self.fd_limit).await {
                Ok(level) => {
                    let held = report::thousands(n);
                    for (why, count) in &level.failures {
                        let note = format!("{held} idle connections: {count} failed: {why}");
                        results.notes.push(note);
                    }
                    results.memory.push(level);
                }
                Err(e) => results.failures.push(format!("{e:#}")),
            }
        }
        Ok(())
    }
}

/// A route UDP takes: where the client sends, where the echo answers, and the tunnel whose
/// CPU it costs.
struct UdpWay<'a> {
    route: Route,
    sink: SocketAddr,
    echo: SocketAddr,
    tunnel: Option<&'a Tunnelled>,
}

impl Bench<'_> {
    /// Direct, then each tunnel that publishes the UDP targets.
    fn udp_ways<'a>(&'a self, targets: &UdpTargets) -> Vec<UdpWay<'a>> {
        let mut ways = vec![UdpWay {
            route: Route::Direct,
            sink: targets.sink,
            echo: targets.echo,
            tunnel: None,
        }];
        ways.extend(self.tunnels.iter().filter_map(|t| {
            let (sink, echo) = t.udp?;
            Some(UdpWay {
                route: Route::Tunnel(t.transport),
                sink,
                echo,
                tunnel: Some(t),
            })
        }));
        ways
    }

    /// For each datagram size: rounds of one client sending as fast as it can on every route,
    /// then rounds at half the tls tunnel's median maximum (the first tunnel's without tls),
    /// and each tunnel's CPU over both.
    async fn udp(&self, results: &mut Results, targets: &UdpTargets) -> anyhow::Result<()> {
        let s = self.settings;
        let ways = self.udp_ways(targets);
        eprintln!("bench: UDP warm-up");
        for way in &ways {
            if let Err(e) = udp::echo_check(way.echo, 1400, 20).await {
                let name = way.route.name();
                results.failures.push(format!("UDP warm-up, {name}: {e:#}"));
            }
        }
        let reference = (self.tunnels.iter().map(|t| t.transport))
            .find(|&t| t == Transport::Tls)
            .or_else(|| self.tunnels.first().map(|t| t.transport));
        for len in options::UDP_SIZES {
            let mut row = Udp {
                len,
                ..Udp::default()
            };
            for round in 1..=s.rounds {
                eprintln!("bench: UDP {len} B, full speed, round {round}/{}", s.rounds);
                for way in &ways {
                    match self.udp_run(targets, way, len, None, &mut row).await {
                        Ok(r) => {
                            row.max_per_s.push(way.route, r.per_second());
                            row.max_gbit.push(way.route, r.gbit_per_s());
                            row.max_sent_per_s.push(way.route, r.offered());
                        }
                        Err(e) => results.failures.push(format!(
                            "UDP {len} B, full speed, {}, round {round}: {e:#}",
                            way.route.name()
                        )),
                    }
                }
            }
            let max = reference
                .and_then(|t| row.max_per_s.tunnel.get(&t))
                .and_then(|v| stats::spread(v));
            row.offered = max.map(|m| m.median / 2.0).filter(|&r| r >= 1.0);
            if let Some(rate) = row.offered {
                for round in 1..=s.rounds {
                    eprintln!(
                        "bench: UDP {len} B at {:.0} datagrams/s, round {round}/{}",
                        rate, s.rounds
                    );
                    for way in &ways {
                        // The kernel's drop counts of the gateway's public socket and the sink's.
                        let tunnelled = way.tunnel.is_some();
                        let drops = || {
                            let at_gateway = if tunnelled {
                                sys::udp_drops(way.sink.port())
                            } else {
                                Some(0)
                            };
                            at_gateway.zip(sys::udp_drops(targets.sink.port()))
                        };
                        let before = drops();
                        match self.udp_run(targets, way, len, Some(rate), &mut row).await {
                            Ok(r) => {
                                let losses = row.paced.entry(way.route.name().into()).or_default();
                                losses.sent += r.sent;
                                losses.lost += r.sent - r.received;
                                if let (Some(b), Some(a)) = (before, drops()) {
                                    losses.gateway_socket += a.0.saturating_sub(b.0);
                                    losses.sink_socket += a.1.saturating_sub(b.1);
                                }
                                if r.offered() < rate * 0.95 {
                                    results.notes.push(format!(
                                        "UDP {len} B, {}, round {round}: the client sent {:.0} \
                                         datagrams/s of the {rate:.0} asked for",
                                        way.route.name(),
                                        r.offered()
                                    ));
                                }
                                row.loss.push(way.route, r.loss_percent());
                            }
                            Err(e) => results.failures.push(format!(
                                "UDP {len} B at a fixed rate, {}, round {round}: {e:#}",
                                way.route.name()
                            )),
                        }
                    }
                }
            }
            for (route, losses) in &row.paced {
                results.notes.extend(losses.note(len, route));
            }
            results.udp.push(row);
        }
        Ok(())
    }

    /// One UDP run on `way`, its tunnel's CPU and delivered bytes added to `row`.
    async fn udp_run(
        &self,
        targets: &UdpTargets,
        way: &UdpWay<'_>,
        len: usize,
        rate: Option<f64>,
        row: &mut Udp,
    ) -> anyhow::Result<udp::UdpRun> {
        let cpu = || way.tunnel.map(|t| t.tunnel.cpu_seconds()).transpose();
        let before = cpu()?;
        let run = udp::run(targets, way.sink, len, self.settings.duration, rate).await?;
        if let (Some(t), Some(before), Some(after)) = (way.tunnel, before, cpu()?) {
            let used = row.cpu.entry(t.transport).or_default();
            used.seconds += after - before;
            used.bytes += run.bytes;
        }
        Ok(run)
    }
}

/// Connections the bench itself may hold through one agent besides the memory rows' (warm-up,
/// workloads, a level's stragglers).
const HELD_SLACK: u32 = 1024;
/// Turns the routes take within a round of the latency rows (see [`Bench::latency`]).
const LATENCY_SLICES: u32 = 10;

/// How many of a round's `total` attempts turn `k` (of [`LATENCY_SLICES`]) makes: all of them
/// over the turns, the first turns taking one more when they do not divide evenly.
fn latency_turn(total: u32, k: u32) -> u32 {
    total / LATENCY_SLICES + u32::from(k < total % LATENCY_SLICES)
}

/// The public connection limit per agent (`[limits] max_public_conns_per_agent`) the bench
/// gives its gateways so the memory rows' largest level fits: when those rows run and the
/// caller gave no gateway config. The gateway's default (8192) is below the full run's 10,000.
fn held_limit(s: &Settings) -> Option<u32> {
    let most = s.conns.iter().copied().max()?;
    s.gateway_config
        .is_none()
        .then(|| most.saturating_add(HELD_SLACK))
}

/// A gateway config file that raises the per-agent public connection limit to `limit`.
fn held_config(limit: u32) -> anyhow::Result<tempfile::NamedTempFile> {
    let mut file = tempfile::Builder::new()
        .prefix("burrow-bench-gateway")
        .suffix(".toml")
        .tempfile()
        .context("cannot create the gateway config file")?;
    writeln!(
        file,
        "# burrow-bench: the memory rows hold this many connections through one agent.\n\
         [limits]\nmax_public_conns_per_agent = {limit}"
    )
    .context("cannot write the gateway config file")?;
    Ok(file)
}

/// The settings line of the report.
fn describe(s: &Settings) -> String {
    if s.only_lossy {
        return format!(
            "lossy-link rows only (tls and quic); {} round(s) of {:?} per run",
            s.rounds, s.duration
        );
    }
    let list = |items: &[u32]| {
        items
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(",")
    };
    let mut line = format!(
        "{}{}transports {}; {} round(s); throughput runs of {:?} with {} KiB writes, parallel \
         streams {}; {} request/response round trips and {} connects per round; idle \
         connections {}",
        if s.quick { "quick; " } else { "" },
        if s.tcp { "" } else { "UDP only; " },
        s.transports
            .iter()
            .map(|t| t.name())
            .collect::<Vec<_>>()
            .join(","),
        s.rounds,
        s.duration,
        s.write_len / 1024,
        list(&s.streams),
        s.rr_iters,
        s.connect_iters,
        if s.conns.is_empty() {
            "skipped".into()
        } else {
            list(&s.conns)
        },
    );
    if !s.relay {
        line.push_str("; 2-hop relay reference skipped");
    }
    if s.peers {
        line.push_str("; peers: bore and rathole (tcp) where installed");
    }
    if s.tcp {
        line.push_str(&format!(
            "; crypto floor over {} MB",
            s.floor_bytes / 1_000_000
        ));
    }
    if !s.connector {
        line.push_str("; connector path skipped");
    }
    if s.udp {
        line.push_str(&format!(
            "; UDP: one client, datagrams of {} bytes, runs of {:?} at full speed, then at \
             half the tunnel's median maximum",
            options::UDP_SIZES.map(|n| n.to_string()).join(" and "),
            s.duration
        ));
    } else {
        line.push_str("; UDP skipped");
    }
    if let Some(limit) = held_limit(s) {
        line.push_str(&format!(
            "; gateways run with [limits] max_public_conns_per_agent = {limit}"
        ));
    }
    for (who, config) in [("gateway", &s.gateway_config), ("agent", &s.agent_config)] {
        if let Some(path) = config {
            line.push_str(&format!("; {who} config {}", path.display()));
        }
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_turns_make_every_attempt_of_a_round() {
        for total in [0, 1, 9, 10, 11, 500, 2_000, 20_003] {
            let turns: Vec<u32> = (0..LATENCY_SLICES)
                .map(|k| latency_turn(total, k))
                .collect();
            assert_eq!(turns.iter().sum::<u32>(), total, "{total}: {turns:?}");
            let (min, max) = (turns.iter().min().unwrap(), turns.iter().max().unwrap());
            assert!(max - min <= 1, "{total}: {turns:?}");
        }
    }

    fn settings(args: &[&str]) -> Settings {
        options::Args::parse_from(std::iter::once("b").chain(args.iter().copied())).settings()
    }

    #[test]
    fn the_memory_rows_fit_the_gateways_connection_limit() {
        // The full run holds 10,000 connections through one agent.
        assert_eq!(held_limit(&settings(&[])), Some(10_000 + HELD_SLACK));
        assert_eq!(
            held_limit(&settings(&["--conns", "20,5"])),
            Some(20 + HELD_SLACK)
        );
        // The caller's config is theirs to size; no memory rows, no limit to raise.
        assert_eq!(held_limit(&settings(&["--gateway-config", "g.toml"])), None);
        assert_eq!(held_limit(&settings(&["--skip-memory"])), None);
        let file = held_config(123).unwrap();
        let text = std::fs::read_to_string(file.path()).unwrap();
        assert!(
            text.contains("[limits]\nmax_public_conns_per_agent = 123\n"),
            "{text}"
        );
    }
}
