//! Command-line options and the settings they resolve to.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};

use crate::procs::Transport;

/// Runs the same workloads through a real `burrow` gateway and agent, over a direct loopback
/// connection, and through two plain TCP relays in separate processes (the cost of the two
/// extra hops alone), and prints one markdown table comparing them.
///
/// The `burrow` binary is `$BURROW_BIN` when set; under `cargo run` it is built first.
#[derive(Debug, Parser)]
#[command(name = "burrow-bench")]
pub struct Args {
    /// Small sizes and short runs for a CI smoke test (seconds, not minutes). Explicit
    /// options still override.
    #[arg(long)]
    quick: bool,

    /// Rounds of each throughput and latency workload [default: 5; quick: 1]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    rounds: Option<u32>,

    /// How long each throughput run writes, e.g. 3s or 500ms [default: 3s; quick: 300ms]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    duration: Option<Duration>,

    /// Parallel upload streams to measure besides the single ones [default: 8,64]
    #[arg(long, value_name = "N,...", value_delimiter = ',', value_parser = clap::value_parser!(u32).range(1..=4096))]
    streams: Option<Vec<u32>>,

    /// Size of each throughput write, KiB [default: 256]
    #[arg(long, value_name = "KIB", value_parser = clap::value_parser!(u32).range(1..=16384))]
    write_kib: Option<u32>,

    /// Request/response round trips per round [default: 20000; quick: 500]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    rr_iters: Option<u32>,

    /// Connect-and-first-byte attempts per round [default: 2000; quick: 100]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    connect_iters: Option<u32>,

    /// Concurrent idle connections to hold for the memory rows [default: 1000,10000; quick:
    /// 100,500]
    #[arg(long, value_name = "N,...", value_delimiter = ',', value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    conns: Option<Vec<u32>>,

    /// Tunnel transports to measure, each through a gateway and agent of its own, round-robin
    /// in the same rounds: tls, wss, tcp, ws, quic, or all (the first four) [default: tls,tcp;
    /// quick: tls,wss,tcp]. The memory rows use the first one.
    #[arg(long, value_name = "T,...", value_delimiter = ',')]
    transport: Option<Vec<TransportArg>>,

    /// Leave out the memory rows
    #[arg(long)]
    skip_memory: bool,

    /// Leave out the 2-hop relay reference (two plain TCP forwarders in separate processes)
    #[arg(long)]
    skip_relay: bool,

    /// Leave out the connector path (client -> burrow connect -> gateway -> agent -> target)
    #[arg(long)]
    skip_connector: bool,
    /// Leave out the UDP rows
    #[arg(long)]
    skip_udp: bool,

    /// Also run the workloads through bore and rathole (plain TCP), each one that is on PATH
    /// (`cargo install bore-cli`, `cargo install rathole`); a missing one is skipped with a note
    #[arg(long)]
    peers: bool,

    /// Bytes the crypto-floor row seals and opens, MB [default: 1000; quick: 64]
    #[arg(long, value_name = "MB", value_parser = clap::value_parser!(u32).range(1..=100_000))]
    floor_mb: Option<u32>,

    /// Only the UDP rows (no TCP throughput, latency, memory or relay), e.g. to compare
    /// `[udp]` settings given with --gateway-config and --agent-config
    #[arg(long, conflicts_with = "skip_udp")]
    only_udp: bool,

    /// Leave out the lossy-link rows (TLS against QUIC with 1% loss and 20 ms per packet, in
    /// a network namespace; they need root and iptables)
    #[arg(long)]
    skip_lossy: bool,
    /// Only the lossy-link rows
    #[arg(long, conflicts_with_all = ["skip_lossy", "only_udp"])]
    only_lossy: bool,
    /// Also write the raw results as JSON to FILE
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,

    /// Gateway config file (TOML) to pass as `--config`, e.g. to raise `[limits] max_streams`
    /// (the session gets the lower of the gateway's and the agent's limits)
    #[arg(long, value_name = "FILE")]
    gateway_config: Option<PathBuf>,

    /// Agent config file (TOML) to pass as `--config`, e.g. to raise `[limits] max_streams`
    #[arg(long, value_name = "FILE")]
    agent_config: Option<PathBuf>,

    /// Internal: run as the lossy-link rows' child, inside its own network namespace.
    #[arg(long = "lossy-child", hide = true)]
    pub lossy_child: bool,
    /// Internal: run as the echo child process of the memory rows.
    #[arg(long = "serve-echo", hide = true)]
    pub serve_echo: bool,

    /// Internal: run as a relay child process of the 2-hop reference, forwarding to each
    /// UPSTREAM in turn.
    #[arg(long = "serve-relay", hide = true, value_name = "UPSTREAM", num_args = 1..)]
    pub serve_relay: Option<Vec<SocketAddr>>,
}

/// A `--transport` item.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum TransportArg {
    /// TLS 1.3 to the tunnel port
    Tls,
    /// WebSocket inside TLS, to the same port
    Wss,
    /// Plain TCP (the gateway runs --transport tcp)
    Tcp,
    /// WebSocket over plain TCP (the gateway runs --transport tcp)
    Ws,
    /// QUIC over UDP to the tunnel port's number (not in `all`)
    Quic,
    /// All four: tls,wss,tcp,ws
    All,
}

/// The transports `items` name, in their order, each once.
fn transports(items: &[TransportArg]) -> Vec<Transport> {
    let mut list = Vec::new();
    for item in items {
        let named: &[Transport] = match item {
            TransportArg::Tls => &[Transport::Tls],
            TransportArg::Wss => &[Transport::Wss],
            TransportArg::Tcp => &[Transport::Tcp],
            TransportArg::Ws => &[Transport::Ws],
            TransportArg::Quic => &[Transport::Quic],
            TransportArg::All => &Transport::ALL,
        };
        for t in named {
            if !list.contains(t) {
                list.push(*t);
            }
        }
    }
    list
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    match humantime::parse_duration(s.trim()) {
        Ok(d) if !d.is_zero() => Ok(d),
        Ok(_) => Err("the duration must be above zero".to_string()),
        Err(_) => Err(format!("{s:?} is not a duration (use e.g. 3s or 500ms)")),
    }
}

/// The datagram sizes of the UDP rows, bytes: a full Ethernet-sized payload, and a small one
/// where the cost per datagram dominates.
pub const UDP_SIZES: [usize; 2] = [1400, 64];

/// What to run, with every default filled in.
#[derive(Debug, Clone)]
pub struct Settings {
    pub quick: bool,
    pub rounds: u32,
    pub duration: Duration,
    pub streams: Vec<u32>,
    pub write_len: usize,
    pub rr_iters: u32,
    pub connect_iters: u32,
    /// Empty when the memory rows are skipped.
    pub conns: Vec<u32>,
    /// Whether to measure the 2-hop relay reference.
    pub relay: bool,
    /// Whether to measure the connector path.
    pub connector: bool,
    /// Whether to measure UDP (datagrams of each of [`UDP_SIZES`] bytes).
    pub udp: bool,
    /// Whether to measure the TCP workloads (throughput, latency).
    pub tcp: bool,
    /// The tunnels to measure, in order, each once; never empty.
    pub transports: Vec<Transport>,
    /// Whether to measure bore and rathole too.
    pub peers: bool,
    /// Bytes for the crypto floor (sealed and opened once each).
    pub floor_bytes: u64,
    /// Whether to measure the lossy-link rows (`lossy`); with `only_lossy`, nothing else.
    pub lossy: bool,
    pub only_lossy: bool,
    pub json: Option<PathBuf>,
    pub gateway_config: Option<PathBuf>,
    pub agent_config: Option<PathBuf>,
}

impl Args {
    /// Fills in the defaults, the smaller ones under `--quick`.
    pub fn settings(self) -> Settings {
        let quick = self.quick;
        let pick = |full, small| if quick { small } else { full };
        let conns = match (
            self.skip_memory || self.only_udp || self.only_lossy,
            self.conns,
        ) {
            (true, _) => Vec::new(),
            (false, Some(list)) => list,
            (false, None) if quick => vec![100, 500],
            (false, None) => vec![1_000, 10_000],
        };
        Settings {
            quick: self.quick,
            rounds: self.rounds.unwrap_or(pick(5, 1)),
            duration: self.duration.unwrap_or(if quick {
                Duration::from_millis(300)
            } else {
                Duration::from_secs(3)
            }),
            streams: self.streams.unwrap_or_else(|| vec![8, 64]),
            write_len: self.write_kib.unwrap_or(256) as usize * 1024,
            rr_iters: self.rr_iters.unwrap_or(pick(20_000, 500)),
            connect_iters: self.connect_iters.unwrap_or(pick(2_000, 100)),
            conns,
            relay: !self.skip_relay && !self.only_udp && !self.only_lossy,
            udp: !self.skip_udp && !self.only_lossy,
            tcp: !self.only_udp && !self.only_lossy,
            connector: !self.skip_connector && !self.only_udp && !self.only_lossy,
            lossy: !self.skip_lossy && !self.only_udp,
            only_lossy: self.only_lossy,
            transports: match self.transport {
                Some(items) => transports(&items),
                // TLS and plaintext side by side, so the TLS overhead is read from one run; the
                // quick run is CI's smoke test, so it goes through the WebSocket path too.
                None if quick => vec![Transport::Tls, Transport::Wss, Transport::Tcp],
                None => vec![Transport::Tls, Transport::Tcp],
            },
            peers: self.peers && !self.only_udp,
            floor_bytes: u64::from(self.floor_mb.unwrap_or(pick(1000, 64))) * 1_000_000,
            json: self.json,
            gateway_config: self.gateway_config,
            agent_config: self.agent_config,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quick_defaults_and_overrides() {
        let s = Args::parse_from(["b", "--quick", "--rounds", "2"]).settings();
        assert_eq!((s.rounds, s.rr_iters), (2, 500));
        assert_eq!(s.conns, vec![100, 500]);
        let s = Args::parse_from(["b", "--skip-memory", "--conns", "5"]).settings();
        assert!(s.conns.is_empty());
        assert_eq!(s.duration, Duration::from_secs(3));
    }

    #[test]
    fn lists_and_durations_parse() {
        let s = Args::parse_from(["b", "--conns", "10,20", "--duration", "250ms"]).settings();
        assert_eq!(s.conns, vec![10, 20]);
        assert_eq!(s.duration, Duration::from_millis(250));
        assert!(Args::try_parse_from(["b", "--duration", "0s"]).is_err());
        assert!(Args::try_parse_from(["b", "--rounds", "0"]).is_err());
    }

    #[test]
    fn transport_lists() {
        use Transport::{Tcp, Tls, Ws, Wss};
        assert_eq!(
            Args::parse_from(["b"]).settings().transports,
            vec![Tls, Tcp]
        );
        assert_eq!(
            Args::parse_from(["b", "--quick"]).settings().transports,
            vec![Tls, Wss, Tcp]
        );
        let s = Args::parse_from(["b", "--quick", "--transport", "ws"]).settings();
        assert_eq!(s.transports, vec![Ws]);
        let s = Args::parse_from(["b", "--transport", "wss,tls,wss"]).settings();
        assert_eq!(s.transports, vec![Wss, Tls]);
        let s = Args::parse_from(["b", "--transport", "tcp", "--transport", "all"]).settings();
        assert_eq!(s.transports, vec![Tcp, Tls, Wss, Ws]);
        let s = Args::parse_from(["b", "--transport", "tls,quic"]).settings();
        assert_eq!(s.transports, vec![Tls, Transport::Quic]);
        assert!(Args::try_parse_from(["b", "--transport", "h3"]).is_err());
        assert!(Args::try_parse_from(["b", "--transport", ""]).is_err());
    }

    #[test]
    fn relay_flags() {
        assert!(Args::parse_from(["b"]).settings().relay);
        assert!(!Args::parse_from(["b", "--skip-relay"]).settings().relay);
        // The connector path is measured unless left out, in the quick run too (it adds about
        // a second there).
        assert!(Args::parse_from(["b", "--quick"]).settings().connector);
        assert!(
            !Args::parse_from(["b", "--skip-connector"])
                .settings()
                .connector
        );
        assert!(
            Args::parse_from(["b", "--quick"]).settings().udp,
            "CI's run has UDP rows"
        );
        assert!(!Args::parse_from(["b", "--skip-udp"]).settings().udp);
        let s = Args::parse_from(["b", "--only-udp", "--peers"]).settings();
        assert!(s.udp && !s.tcp && !s.relay && !s.peers && s.conns.is_empty());
        let s = Args::parse_from(["b", "--quick", "--peers"]).settings();
        assert!(s.peers && s.floor_bytes == 64_000_000);
        assert_eq!(
            Args::parse_from(["b"]).settings().floor_bytes,
            1_000_000_000
        );
        assert!(Args::try_parse_from(["b", "--only-udp", "--skip-udp"]).is_err());
        let a = Args::parse_from(["b", "--serve-relay", "127.0.0.1:1", "127.0.0.1:2"]);
        let want: Vec<SocketAddr> = vec![
            "127.0.0.1:1".parse().unwrap(),
            "127.0.0.1:2".parse().unwrap(),
        ];
        assert_eq!(a.serve_relay, Some(want));
        assert!(Args::try_parse_from(["b", "--serve-relay"]).is_err());
        assert!(Args::try_parse_from(["b", "--serve-relay", "localhost:1"]).is_err());
    }
}
