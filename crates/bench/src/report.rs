//! The results, the targets they are held against, and the markdown table.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use crate::floor::Floor;
use crate::latency::Percentiles;
use crate::memory::{Level, Rss};
use crate::peers::Peer;
use crate::procs::Transport;
use crate::stats::{spread, Spread};
use crate::sys::Machine;

/// Everything one bench run measured, per round where there are rounds.
#[derive(Debug, Default, Serialize)]
pub struct Results {
    pub machine: Option<Machine>,
    pub settings: String,
    /// The tunnels measured, in the order each round ran them.
    pub transports: Vec<Transport>,
    pub throughput: Vec<Throughput>,
    pub request_response: Latency,
    pub connect: Latency,
    /// The tunnel the memory rows went through.
    pub memory_transport: Option<Transport>,
    pub idle: Option<Rss>,
    pub memory: Vec<Level>,
    pub cpu: Option<Cpu>,
    /// One entry per datagram size; empty when UDP was skipped.
    pub udp: Vec<Udp>,
    /// Whether the 2-hop relay reference was measured.
    pub relay: bool,
    /// The other tunnels measured (`--peers`), in the order each round ran them.
    pub peers: Vec<Peer>,
    /// The crypto floor: sealing and opening with the TLS session's AEAD.
    pub floor: Option<Floor>,
    /// Whether the connector path was measured.
    pub connector: bool,
    /// The lossy-link rows (TLS against QUIC), when run.
    pub lossy: Option<crate::lossy::Lossy>,
    /// Oddities worth a look that are not failures.
    pub notes: Vec<String>,
    /// Failed correctness checks: any makes the bench exit non-zero.
    pub failures: Vec<String>,
}

/// One throughput workload, Gbit/s per round.
#[derive(Debug, Serialize)]
pub struct Throughput {
    pub label: String,
    pub streams: u32,
    pub target_ratio: Option<f64>,
    pub direct: Vec<f64>,
    /// Each tunnel's rounds.
    pub tunnel: BTreeMap<Transport, Vec<f64>>,
    /// Empty when the reference was skipped.
    pub relay: Vec<f64>,
    /// Each peer's rounds (`--peers`).
    pub peer: BTreeMap<Peer, Vec<f64>>,
    /// Empty when the connector path was skipped.
    pub connector: Vec<f64>,
}

impl Throughput {
    /// The rounds of one route.
    pub fn side(&mut self, route: Route) -> &mut Vec<f64> {
        match route {
            Route::Direct => &mut self.direct,
            Route::Tunnel(t) => self.tunnel.entry(t).or_default(),
            Route::Relay => &mut self.relay,
            Route::Peer(p) => self.peer.entry(p).or_default(),
            Route::Connector => &mut self.connector,
        }
    }
}

/// One latency workload, percentiles per round.
#[derive(Debug, Default, Serialize)]
pub struct Latency {
    pub direct: Vec<Percentiles>,
    /// Each tunnel's rounds.
    pub tunnel: BTreeMap<Transport, Vec<Percentiles>>,
    /// Empty when the reference was skipped.
    pub relay: Vec<Percentiles>,
    /// Each peer's rounds (`--peers`).
    pub peer: BTreeMap<Peer, Vec<Percentiles>>,
    /// Empty when the connector path was skipped.
    pub connector: Vec<Percentiles>,
}

impl Latency {
    /// The rounds of one route.
    pub fn side(&mut self, route: Route) -> &mut Vec<Percentiles> {
        match route {
            Route::Direct => &mut self.direct,
            Route::Tunnel(t) => self.tunnel.entry(t).or_default(),
            Route::Relay => &mut self.relay,
            Route::Peer(p) => self.peer.entry(p).or_default(),
            Route::Connector => &mut self.connector,
        }
    }
}

/// Per-round values of the routes UDP takes: direct and each tunnel (the relay reference is
/// TCP only).
#[derive(Debug, Default, Serialize)]
pub struct RouteValues {
    pub direct: Vec<f64>,
    pub tunnel: BTreeMap<Transport, Vec<f64>>,
}

impl RouteValues {
    /// Adds one round's value of `route` (the relay and the connector path have none).
    pub fn push(&mut self, route: Route, value: f64) {
        match route {
            Route::Direct => self.direct.push(value),
            Route::Tunnel(t) => self.tunnel.entry(t).or_default().push(value),
            Route::Relay | Route::Peer(_) | Route::Connector => {}
        }
    }
}

/// The UDP rows of one datagram size: the most each route delivers with one client sending
/// as fast as it can, and the loss at a fixed rate (half the tls tunnel's median maximum).
#[derive(Debug, Default, Serialize)]
pub struct Udp {
    /// Bytes per datagram (UDP payload).
    pub len: usize,
    /// Datagrams delivered per second at full speed.
    pub max_per_s: RouteValues,
    /// The same in Gbit/s of UDP payload.
    pub max_gbit: RouteValues,
    /// Datagrams per second the client sent in those runs (in the JSON only).
    pub max_sent_per_s: RouteValues,
    /// Datagrams per second of the paced runs; `None` when no tunnel had a maximum.
    pub offered: Option<f64>,
    /// Percent of the paced runs' datagrams that never arrived.
    pub loss: RouteValues,
    /// Gateway + agent CPU over all runs of this size, and the bytes they delivered.
    pub cpu: BTreeMap<Transport, CpuUse>,
    /// Where the paced runs' datagrams were lost, summed over rounds, by route name.
    pub paced: BTreeMap<String, Losses>,
}

/// The datagrams of the paced runs on one route: sent, lost, and lost where the kernel
/// counts it (a full receive buffer; read from `/proc/net/udp`).
#[derive(Debug, Default, Clone, Copy, Serialize)]
pub struct Losses {
    pub sent: u64,
    pub lost: u64,
    /// At the gateway's public socket (none on the direct route).
    pub gateway_socket: u64,
    /// At the sink's socket.
    pub sink_socket: u64,
}

impl Losses {
    /// A note saying where the losses were, if there were any.
    pub fn note(&self, len: usize, route: &str) -> Option<String> {
        if self.lost == 0 {
            return None;
        }
        let inside = self
            .lost
            .saturating_sub(self.gateway_socket + self.sink_socket);
        Some(format!(
            "UDP {} B at the fixed rate, {route}: {} of {} datagrams lost; the kernel dropped \
             {} at the gateway's public socket and {} at the sink's (receive buffers full), \
             {inside} went elsewhere (inside the tunnel, or the agent's socket toward the sink)",
            thousands(len as u32),
            self.lost,
            self.sent,
            self.gateway_socket,
            self.sink_socket,
        ))
    }
}

/// The ways from a client to a target that the bench compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// Straight to the target.
    Direct,
    /// Through the two plain TCP relays: the reference.
    Relay,
    /// Through a gateway and an agent, over one transport.
    Tunnel(Transport),
    /// Through another tunnel (`--peers`).
    Peer(Peer),
    /// Through a connector, then a gateway and an agent over TLS (see
    /// [`crate::connector`]).
    Connector,
}

impl Route {
    /// The name in failure messages.
    pub fn name(self) -> &'static str {
        match self {
            Route::Direct => "direct",
            Route::Relay => "relay",
            Route::Tunnel(t) => t.route_name(),
            Route::Peer(p) => p.name(),
            Route::Connector => "connector",
        }
    }
}

/// CPU over the throughput section: each tunnel's gateway plus agent, and the relays'.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Cpu {
    pub tunnel: BTreeMap<Transport, CpuUse>,
    /// `None` when the reference was skipped.
    pub relay: Option<CpuUse>,
    /// Each peer's server and client processes (`--peers`).
    pub peer: BTreeMap<Peer, CpuUse>,
}

/// CPU seconds of a pair of processes, and the bytes the throughput workloads moved through
/// them.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct CpuUse {
    pub seconds: f64,
    pub bytes: u64,
}

impl CpuUse {
    /// Seconds per GB (10^9 bytes).
    pub fn per_gb(self) -> f64 {
        self.seconds / (self.bytes as f64 / 1e9).max(1e-9)
    }
}

/// The target ratio for single streams and for 8 parallel ones (tunnel / direct, at least).
pub const SINGLE_STREAM_RATIO: f64 = 0.30;
pub const EIGHT_STREAMS_RATIO: f64 = 0.40;
const RR_P50_RATIO: f64 = 2.5;
const RR_P99_RATIO: f64 = 3.0;
const CONNECT_P50_RATIO: f64 = 3.0;
const KIB_PER_CONN: f64 = 10.0;
const CPU_PER_GB: f64 = 1.0;
/// What a WebSocket inside TLS may cost against plain TLS in the same run: throughput (every
/// workload) at least this share of the tls tunnel's, request/response p50 at most this
/// multiple.
const WSS_THROUGHPUT_VS_TLS: f64 = 0.90;
const WSS_RR_P50_VS_TLS: f64 = 1.10;
/// UDP at 1,400 bytes: tunnel / direct datagram throughput at least this, with less than
/// this percent lost at half the tunnel's maximum rate.
pub const UDP_RATIO: f64 = 0.25;
const UDP_LOSS_PERCENT: f64 = 1.0;
/// The datagram size those targets are stated for.
const UDP_TARGET_LEN: usize = 1400;

/// A target and whether it was met.
#[derive(Debug, Clone, Copy)]
enum Goal {
    None,
    /// Against tunnel / direct.
    RatioAtLeast(f64),
    RatioAtMost(f64),
    /// Against this tunnel / the tls tunnel.
    VsTlsAtLeast(f64),
    VsTlsAtMost(f64),
    AtMost(f64, &'static str),
    /// Against the tunnel's own value.
    Below(f64, &'static str),
    All,
}

impl Goal {
    fn text(&self) -> String {
        match self {
            Goal::None => "—".into(),
            Goal::RatioAtLeast(r) => format!("≥ {r:.2}x"),
            Goal::RatioAtMost(r) => format!("≤ {r:.1}x"),
            Goal::VsTlsAtLeast(r) => format!("≥ {r:.2}x tls"),
            Goal::VsTlsAtMost(r) => format!("≤ {r:.2}x tls"),
            Goal::AtMost(v, unit) => format!("≤ {v} {unit}"),
            Goal::Below(v, unit) => format!("< {v}{unit}"),
            Goal::All => "all".into(),
        }
    }

    /// Whether `value` (a ratio, an amount, or 1.0 for "all succeeded") meets the goal.
    fn met(&self, value: Option<f64>) -> &'static str {
        let Some(v) = value else { return "—" };
        let ok = match *self {
            Goal::None => return "—",
            Goal::RatioAtLeast(r) | Goal::VsTlsAtLeast(r) => v >= r,
            Goal::RatioAtMost(r) | Goal::VsTlsAtMost(r) | Goal::AtMost(r, _) => v <= r,
            Goal::Below(r, _) => v < r,
            Goal::All => v >= 1.0,
        };
        if ok {
            "yes"
        } else {
            "**no**"
        }
    }

    /// Which value of a comparison row the goal is held against: a ratio, or the tunnel's
    /// own median.
    fn pick(
        &self,
        tunnel: Option<f64>,
        vs_direct: Option<f64>,
        vs_tls: Option<f64>,
    ) -> Option<f64> {
        match self {
            Goal::VsTlsAtLeast(_) | Goal::VsTlsAtMost(_) => vs_tls,
            Goal::AtMost(..) | Goal::Below(..) => tunnel,
            _ => vs_direct,
        }
    }
}

/// The targets of one comparison: for the tls tunnel (against direct) and for the wss one
/// (against tls).
#[derive(Debug, Clone, Copy)]
struct Goals {
    tls: Goal,
    wss: Goal,
}

impl Goals {
    fn tls(tls: Goal) -> Goals {
        Goals {
            tls,
            wss: Goal::None,
        }
    }

    /// The goal of `transport`'s row. The wss target needs the tls tunnel measured beside it.
    fn of(&self, transport: Transport, tls_ran: bool) -> Goal {
        match transport {
            Transport::Tls => self.tls,
            Transport::Wss if tls_ran => self.wss,
            _ => Goal::None,
        }
    }
}

/// The cells of one row between the metric and the target.
struct Cells<'a> {
    /// Which tunnel the row is about.
    transport: &'a str,
    direct: &'a str,
    tunnel: &'a str,
    relay: &'a str,
    /// Tunnel / direct, or a per-connection amount.
    ratio: &'a str,
    /// Tunnel / relay.
    vs_relay: &'a str,
    /// This tunnel / the tls tunnel.
    vs_tls: &'a str,
}

impl<'a> Cells<'a> {
    /// A row about one tunnel alone.
    fn tunnel(transport: &'a str, tunnel: &'a str, ratio: &'a str) -> Cells<'a> {
        Cells {
            transport,
            direct: "—",
            tunnel,
            relay: "—",
            ratio,
            vs_relay: "—",
            vs_tls: "—",
        }
    }
}

/// Which columns a table has besides the ones every table has.
#[derive(Debug, Clone, Copy)]
struct Columns {
    /// The 2-hop relay and tunnel / relay.
    relay: bool,
    /// Which tunnel a row is about: shown unless the tls tunnel alone ran.
    transport: bool,
    /// This tunnel / the tls tunnel: when tls and another transport ran.
    vs_tls: bool,
}

struct Table {
    text: String,
    columns: Columns,
}

impl Table {
    fn new(columns: Columns) -> Table {
        let mut t = Table {
            text: String::new(),
            columns,
        };
        let head = Cells {
            transport: "transport",
            direct: "direct",
            tunnel: "tunnel",
            relay: "2-hop relay",
            ratio: "ratio (or per-connection)",
            vs_relay: "tunnel / relay",
            vs_tls: "tunnel / tls",
        };
        let head = t.cells("metric", &head, "target", "met?").join(" | ");
        let rule = Cells {
            transport: "---",
            direct: "---:",
            tunnel: "---:",
            relay: "---:",
            ratio: "---:",
            vs_relay: "---:",
            vs_tls: "---:",
        };
        let rule = t.cells("---", &rule, "---", "---").join("|");
        let _ = write!(t.text, "| {head} |\n|{rule}|\n");
        t
    }

    /// The cells of one line, in the columns the table has.
    fn cells<'c>(
        &self,
        metric: &'c str,
        cells: &Cells<'c>,
        goal: &'c str,
        met: &'c str,
    ) -> Vec<&'c str> {
        let Columns {
            relay,
            transport,
            vs_tls,
        } = self.columns;
        let mut line = vec![metric];
        if transport {
            line.push(cells.transport);
        }
        line.push(cells.direct);
        line.push(cells.tunnel);
        if relay {
            line.push(cells.relay);
        }
        line.push(cells.ratio);
        if relay {
            line.push(cells.vs_relay);
        }
        if vs_tls {
            line.push(cells.vs_tls);
        }
        line.extend([goal, met]);
        line
    }

    fn row(&mut self, metric: &str, cells: &Cells<'_>, goal: &Goal, value: Option<f64>) {
        let goal_text = goal.text();
        let line = self
            .cells(metric, cells, &goal_text, goal.met(value))
            .join(" | ");
        let _ = writeln!(self.text, "| {line} |");
    }

    /// A direct/tunnel/relay comparison of per-round values, one row per tunnel in `order`;
    /// `decimals` for the values. Without `ratios` (for a loss, where a ratio means nothing)
    /// the ratio columns stay empty.
    fn compare(
        &mut self,
        metric: &str,
        sides: Sides<'_, f64>,
        order: &[Transport],
        decimals: usize,
        goals: Goals,
        ratios: bool,
    ) {
        let d = spread(sides.direct);
        let r = sides.relay.and_then(spread);
        let relay_cell = match sides.relay {
            Some(_) => show(r, decimals),
            None => "—".into(),
        };
        let ratio = move |top, bottom| if ratios { ratio(top, bottom) } else { None };
        let of = |t: Transport| spread(sides.tunnel.get(&t).map_or(&[][..], Vec::as_slice));
        let tls = order.contains(&Transport::Tls).then(|| of(Transport::Tls));
        for &transport in order {
            let t = of(transport);
            let vs_direct = ratio(t, d);
            let vs_tls = match (transport, tls) {
                (Transport::Tls, _) | (_, None) => None,
                (_, Some(tls)) => ratio(t, tls),
            };
            let goal = goals.of(transport, tls.is_some());
            self.row(
                metric,
                &Cells {
                    transport: transport.name(),
                    direct: &show(d, decimals),
                    tunnel: &show(t, decimals),
                    relay: &relay_cell,
                    ratio: &show_ratio(vs_direct),
                    vs_relay: &show_ratio(ratio(t, r)),
                    vs_tls: &show_ratio(vs_tls),
                },
                &goal,
                goal.pick(t.map(|t| t.median), vs_direct, vs_tls),
            );
        }
        if let Some(connector) = sides.connector {
            // The connector path against direct, the relay and the public tls path.
            let c = spread(connector);
            self.row(
                metric,
                &Cells {
                    transport: CONNECTOR_ROW,
                    direct: &show(d, decimals),
                    tunnel: &show(c, decimals),
                    relay: &show(r, decimals),
                    ratio: &show_ratio(ratio(c, d)),
                    vs_relay: &show_ratio(ratio(c, r)),
                    vs_tls: &show_ratio(tls.and_then(|tls| ratio(c, tls))),
                },
                &Goal::None,
                None,
            );
        }
    }
}

/// The per-round values of every route for one metric.
struct Sides<'a, T> {
    direct: &'a [T],
    tunnel: &'a BTreeMap<Transport, Vec<T>>,
    /// `None` for a metric the relay reference does not take part in.
    relay: Option<&'a [T]>,
    /// `None` when the connector path was not measured (or takes no part in the metric).
    connector: Option<&'a [T]>,
}

impl<'a> Sides<'a, f64> {
    /// A UDP metric: direct and the tunnels.
    fn udp(values: &'a RouteValues) -> Sides<'a, f64> {
        Sides {
            direct: &values.direct,
            tunnel: &values.tunnel,
            relay: None,
            connector: None,
        }
    }
}

/// The transport cell of the connector path's rows.
const CONNECTOR_ROW: &str = "tls, connector";

/// The ratio of two medians, when both exist and the divisor is above zero.
fn ratio(top: Option<Spread>, bottom: Option<Spread>) -> Option<f64> {
    match (top, bottom) {
        (Some(t), Some(b)) if b.median > 0.0 => Some(t.median / b.median),
        _ => None,
    }
}

/// `1.23x`, or `—` for none.
fn show_ratio(ratio: Option<f64>) -> String {
    ratio.map_or_else(|| "—".into(), |r| format!("{r:.2}x"))
}

/// `median (min–max)`, or just the value for one round, or `failed` for none.
fn show(s: Option<Spread>, decimals: usize) -> String {
    match s {
        None => "failed".into(),
        Some(s) if s.min == s.max => format!("{:.*}", decimals, s.median),
        Some(s) => format!(
            "{:.*} ({:.*}–{:.*})",
            decimals, s.median, decimals, s.min, decimals, s.max
        ),
    }
}

/// A count with thousands separators: 10000 -> 10,000.
pub fn thousands(n: u32) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

impl Results {
    /// The whole report: machine, settings, the table, notes and the correctness verdict.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Some(m) = &self.machine {
            let _ = writeln!(
                out,
                "machine: {} cores ({}), kernel {}, {}; open-file limit {}; TCP congestion control {}",
                m.cores, m.cpu, m.kernel, m.date, m.fd_limit, m.congestion
            );
        }
        let _ = writeln!(out, "settings: {}", self.settings);
        out.push_str("values: median over rounds (min–max); ratio = tunnel / direct");
        if self.columns().transport {
            out.push_str(
                "; transport = how the agent reaches the gateway, each through a gateway and \
                 agent of its own, measured in the same rounds (tls: TLS 1.3; wss: WebSocket \
                 inside TLS; tcp: plain TCP; ws: WebSocket over plain TCP)",
            );
            if self.columns().vs_tls {
                out.push_str("; tunnel / tls = against the tls tunnel's median");
            }
            if let Some(t) = self.memory_transport.filter(|_| !self.memory.is_empty()) {
                let _ = write!(out, "; memory rows through the {} tunnel", t.name());
            }
        } else {
            out.push_str("; TLS on");
        }
        if self.relay {
            out.push_str(
                "; 2-hop relay = two plain TCP forwarders in separate processes, no encryption, \
                 no multiplexing: the cost of the two extra hops alone",
            );
        }
        if self.connector {
            out.push_str(
                "; tls, connector = client -> burrow connect -> gateway -> agent -> target, \
                 each a process of its own (its gateway and agent apart from the public \
                 path's), in the same rounds",
            );
            if self.order().contains(&Transport::Tls) {
                out.push_str(" (tunnel / tls: against the public tls path)");
            }
        }
        if !self.udp.is_empty() {
            out.push_str(
                "; UDP max = datagrams one client gets through to a sink while sending as fast \
                 as it can; loss = share of the datagrams sent at the fixed rate that never \
                 arrived; CPU per GB delivered counts every run of that size",
            );
        }
        out.push_str("\n\n");
        // With only the lossy-link rows there is nothing for the main table.
        let lossy_only = self.throughput.is_empty() && self.udp.is_empty() && self.idle.is_none();
        if !(lossy_only && self.lossy.is_some()) {
            out.push_str(&self.table());
            out.push_str(&crate::side_by_side::render(self));
        }
        if let Some(lossy) = &self.lossy {
            out.push_str(&lossy.render());
        }
        if !self.notes.is_empty() {
            out.push_str("\nnotes:\n");
            for note in &self.notes {
                let _ = writeln!(out, "- {note}");
            }
        }
        match self.failures.len() {
            0 => out.push_str("\ncorrectness: every check passed\n"),
            n => {
                let _ = writeln!(out, "\ncorrectness: {n} check(s) FAILED:");
                for failure in &self.failures {
                    let _ = writeln!(out, "- {failure}");
                }
            }
        }
        out
    }

    /// The tunnels to show: those measured, or (in a results value built by hand) tls.
    fn order(&self) -> &[Transport] {
        if self.transports.is_empty() {
            &[Transport::Tls]
        } else {
            &self.transports
        }
    }

    fn columns(&self) -> Columns {
        let order = self.order();
        let tls = order.contains(&Transport::Tls);
        Columns {
            relay: self.relay,
            transport: order != [Transport::Tls] || self.connector,
            vs_tls: (order.len() > 1 || self.connector) && tls,
        }
    }

    fn table(&self) -> String {
        let mut t = Table::new(self.columns());
        let order = self.order();
        for w in &self.throughput {
            let goals = Goals {
                tls: w.target_ratio.map_or(Goal::None, Goal::RatioAtLeast),
                wss: Goal::VsTlsAtLeast(WSS_THROUGHPUT_VS_TLS),
            };
            let sides = Sides {
                direct: &w.direct,
                tunnel: &w.tunnel,
                relay: Some(&w.relay),
                connector: self.connector.then_some(&w.connector[..]),
            };
            let metric = format!("throughput, {} (Gbit/s)", w.label);
            t.compare(&metric, sides, order, 2, goals, true);
        }
        let rr = Goals {
            tls: Goal::RatioAtMost(RR_P50_RATIO),
            wss: Goal::VsTlsAtMost(WSS_RR_P50_VS_TLS),
        };
        let rr99 = Goals::tls(Goal::RatioAtMost(RR_P99_RATIO));
        let name = "request/response 64 B";
        self.latency_rows(&mut t, name, &self.request_response, rr, rr99);
        let connect = Goals::tls(Goal::RatioAtMost(CONNECT_P50_RATIO));
        let none = Goals::tls(Goal::None);
        self.latency_rows(&mut t, "connect + first byte", &self.connect, connect, none);
        self.memory_rows(&mut t);
        if let Some(cpu) = &self.cpu {
            self.cpu_rows(&mut t, cpu);
        }
        for u in &self.udp {
            self.udp_rows(&mut t, u);
        }
        t.text
    }

    /// The UDP rows of one datagram size: the maximum in datagrams/s and Gbit/s, the loss at
    /// the fixed rate, and each tunnel's CPU per GB.
    fn udp_rows(&self, t: &mut Table, u: &Udp) {
        let order = self.order();
        let size = format!("UDP {} B", thousands(u.len as u32));
        let held = u.len == UDP_TARGET_LEN;
        let none = Goals::tls(Goal::None);
        let metric = format!("{size}, max (thousand datagrams/s)");
        let per_s = RouteValues {
            direct: u.max_per_s.direct.iter().map(|v| v / 1e3).collect(),
            tunnel: (u.max_per_s.tunnel.iter())
                .map(|(&k, v)| (k, v.iter().map(|v| v / 1e3).collect()))
                .collect(),
        };
        t.compare(&metric, Sides::udp(&per_s), order, 1, none, true);
        let ratio = Goals::tls(if held {
            Goal::RatioAtLeast(UDP_RATIO)
        } else {
            Goal::None
        });
        let metric = format!("{size}, max (Gbit/s)");
        t.compare(&metric, Sides::udp(&u.max_gbit), order, 2, ratio, true);
        if let Some(rate) = u.offered {
            let loss = Goals::tls(if held {
                Goal::Below(UDP_LOSS_PERCENT, "%")
            } else {
                Goal::None
            });
            let metric = format!(
                "{size}, loss at {:.1} thousand datagrams/s, half the tunnel's max (%)",
                rate / 1e3
            );
            t.compare(&metric, Sides::udp(&u.loss), order, 2, loss, false);
        }
        let metric = format!("CPU, gateway + agent, {size} (s per GB delivered)");
        let tls = u.cpu.get(&Transport::Tls).map(|c| c.per_gb());
        for &transport in order {
            let Some(&used) = u.cpu.get(&transport) else {
                continue;
            };
            let per_gb = used.per_gb();
            let vs_tls = tls
                .filter(|&o| o > 0.0 && transport != Transport::Tls)
                .map_or_else(|| "—".into(), |o| format!("{:.2}x", per_gb / o));
            t.row(
                &metric,
                &Cells {
                    vs_tls: &vs_tls,
                    ..Cells::tunnel(
                        transport.name(),
                        &format!("{per_gb:.2}"),
                        &format!("{:.1} s / {:.2} GB", used.seconds, used.bytes as f64 / 1e9),
                    )
                },
                &Goal::None,
                None,
            );
        }
    }

    /// Each tunnel's gateway and agent CPU per GB, next to the relays' when they ran.
    fn cpu_rows(&self, t: &mut Table, cpu: &Cpu) {
        let relay = cpu.relay.map(CpuUse::per_gb);
        let metric = if self.relay {
            "CPU, gateway + agent; relay 1 + 2 (s per GB through each)"
        } else {
            "CPU, gateway + agent (s per GB through the tunnel)"
        };
        let tls = cpu.tunnel.get(&Transport::Tls).map(|c| c.per_gb());
        for &transport in self.order() {
            let Some(&used) = cpu.tunnel.get(&transport) else {
                continue;
            };
            let tunnel = used.per_gb();
            let by = |other: Option<f64>| {
                other
                    .filter(|&o| o > 0.0)
                    .map_or_else(|| "—".into(), |o| format!("{:.2}x", tunnel / o))
            };
            // The target is the tls tunnel's, the default.
            let goal = match transport {
                Transport::Tls => Goal::AtMost(CPU_PER_GB, "s/GB"),
                _ => Goal::None,
            };
            t.row(
                metric,
                &Cells {
                    transport: transport.name(),
                    direct: "—",
                    tunnel: &format!("{tunnel:.2}"),
                    relay: &relay.map_or_else(|| "—".into(), |r| format!("{r:.2}")),
                    ratio: &format!("{:.1} s / {:.1} GB", used.seconds, used.bytes as f64 / 1e9),
                    vs_relay: &by(relay),
                    vs_tls: &by(tls.filter(|_| transport != Transport::Tls)),
                },
                &goal,
                Some(tunnel),
            );
        }
    }

    fn latency_rows(&self, t: &mut Table, name: &str, l: &Latency, p50: Goals, p99: Goals) {
        type Pick = fn(&Percentiles) -> f64;
        let (at_50, at_99): (Pick, Pick) = (|x| x.p50_us, |x| x.p99_us);
        for (label, pick, goals) in [("p50", at_50, p50), ("p99", at_99, p99)] {
            let values = |v: &[Percentiles]| v.iter().map(pick).collect::<Vec<_>>();
            let tunnel = l
                .tunnel
                .iter()
                .map(|(&t, v)| (t, values(v)))
                .collect::<BTreeMap<_, _>>();
            let relay = values(&l.relay);
            let connector = values(&l.connector);
            let sides = Sides {
                direct: &values(&l.direct),
                tunnel: &tunnel,
                relay: Some(&relay),
                connector: self.connector.then_some(&connector[..]),
            };
            let metric = format!("{name}, {label} (µs)");
            t.compare(&metric, sides, self.order(), 1, goals, true);
        }
    }

    fn memory_rows(&self, t: &mut Table) {
        let via = self.memory_transport.unwrap_or(Transport::Tls).name();
        if let Some(idle) = self.idle {
            for (who, kib) in [("gateway", idle.gateway_kib), ("agent", idle.agent_kib)] {
                t.row(
                    &format!("RSS idle, {who} (KiB)"),
                    &Cells::tunnel(via, &kib.to_string(), "—"),
                    &Goal::None,
                    None,
                );
            }
        }
        let goal = Goal::AtMost(KIB_PER_CONN, "KiB/conn");
        for level in &self.memory {
            let n = thousands(level.attempted);
            if let Some(why) = &level.skipped {
                t.row(
                    &format!("{n} idle connections"),
                    &Cells::tunnel(via, why, "—"),
                    &Goal::None,
                    None,
                );
                continue;
            }
            if let (Some(with), Some((gw, ag))) = (level.with, level.per_connection()) {
                for (who, kib, per) in [
                    ("gateway", with.gateway_kib, gw),
                    ("agent", with.agent_kib, ag),
                ] {
                    t.row(
                        &format!("RSS with {n} idle connections, {who} (KiB)"),
                        &Cells::tunnel(via, &kib.to_string(), &format!("{per:.2} KiB/conn")),
                        &goal,
                        Some(per),
                    );
                }
            }
            let all = if level.succeeded == level.attempted {
                1.0
            } else {
                0.0
            };
            t.row(
                &format!("{n} idle connections established"),
                &Cells::tunnel(
                    via,
                    &format!("{}/{}", level.succeeded, level.attempted),
                    "—",
                ),
                &Goal::All,
                Some(all),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values for the tls tunnel alone.
    fn tls<T>(v: T) -> BTreeMap<Transport, T> {
        BTreeMap::from([(Transport::Tls, v)])
    }

    #[test]
    fn formats_numbers() {
        assert_eq!(thousands(10_000), "10,000");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1_000_000), "1,000,000");
        let s = spread(&[1.0, 2.0, 4.0]);
        assert_eq!(show(s, 1), "2.0 (1.0–4.0)");
        assert_eq!(show(spread(&[3.0]), 2), "3.00");
        assert_eq!(show(None, 2), "failed");
    }

    #[test]
    fn goals() {
        assert_eq!(Goal::RatioAtLeast(0.3).met(Some(0.31)), "yes");
        assert_eq!(Goal::RatioAtMost(2.5).met(Some(2.6)), "**no**");
        assert_eq!(Goal::All.met(Some(0.0)), "**no**");
        assert_eq!(Goal::None.met(Some(1.0)), "—");
        assert_eq!(Goal::AtMost(1.0, "s").met(None), "—");
    }

    #[test]
    fn renders_a_table() {
        let results = Results {
            throughput: vec![Throughput {
                label: "upload, 1 stream".into(),
                streams: 1,
                target_ratio: Some(SINGLE_STREAM_RATIO),
                direct: vec![10.0, 12.0],
                tunnel: tls(vec![4.0]),
                relay: Vec::new(),
                peer: BTreeMap::new(),
                connector: Vec::new(),
            }],
            failures: vec!["boom".into()],
            ..Results::default()
        };
        let text = results.render();
        assert!(text.contains("| throughput, upload, 1 stream (Gbit/s) | 11.00 (10.00–12.00) | 4.00 | 0.36x | ≥ 0.30x | yes |"), "{text}");
        assert!(text.contains("1 check(s) FAILED"));
        assert!(!text.contains("relay"), "{text}");
        // The tls tunnel alone: no transport column, no ratio to tls.
        assert!(
            text.contains("| metric | direct | tunnel | ratio (or per-connection) | target | met? |\n|---|---:|---:|---:|---|---|\n"),
            "{text}"
        );
        assert!(text.contains("TLS on"), "{text}");
    }

    #[test]
    fn renders_the_relay_columns() {
        let results = Results {
            throughput: vec![Throughput {
                label: "upload, 1 stream".into(),
                streams: 1,
                target_ratio: Some(SINGLE_STREAM_RATIO),
                direct: vec![10.0],
                tunnel: tls(vec![4.0]),
                relay: vec![8.0],
                peer: BTreeMap::new(),
                connector: Vec::new(),
            }],
            cpu: Some(Cpu {
                tunnel: tls(CpuUse {
                    seconds: 2.0,
                    bytes: 4_000_000_000,
                }),
                relay: Some(CpuUse {
                    seconds: 0.5,
                    bytes: 5_000_000_000,
                }),
                peer: BTreeMap::new(),
            }),
            idle: Some(Rss {
                gateway_kib: 100,
                agent_kib: 200,
            }),
            relay: true,
            ..Results::default()
        };
        let text = results.render();
        assert!(
            text.contains("2-hop relay = two plain TCP forwarders"),
            "{text}"
        );
        assert!(text.contains("| metric | direct | tunnel | 2-hop relay | ratio (or per-connection) | tunnel / relay | target | met? |"), "{text}");
        assert!(text.contains("| throughput, upload, 1 stream (Gbit/s) | 10.00 | 4.00 | 8.00 | 0.40x | 0.50x | ≥ 0.30x | yes |"), "{text}");
        assert!(
            text.contains("| 0.50 | 0.10 | 2.0 s / 4.0 GB | 5.00x | ≤ 1 s/GB | yes |"),
            "{text}"
        );
        assert!(
            text.contains("| RSS idle, gateway (KiB) | — | 100 | — | — | — | — | — |"),
            "{text}"
        );
        // A relay that failed every round shows as such, without a ratio.
        let mut results = results;
        results.throughput[0].relay.clear();
        let text = results.render();
        assert!(
            text.contains("| 10.00 | 4.00 | failed | 0.40x | — |"),
            "{text}"
        );
    }

    #[test]
    fn renders_the_connector_rows_beside_the_public_path() {
        let results = Results {
            throughput: vec![Throughput {
                label: "upload, 1 stream".into(),
                streams: 1,
                target_ratio: Some(SINGLE_STREAM_RATIO),
                direct: vec![10.0],
                tunnel: tls(vec![4.0]),
                relay: Vec::new(),
                peer: BTreeMap::new(),
                connector: vec![2.0],
            }],
            connect: Latency {
                direct: percentiles(100.0),
                tunnel: tls(percentiles(300.0)),
                relay: Vec::new(),
                peer: BTreeMap::new(),
                connector: percentiles(450.0),
            },
            connector: true,
            ..Results::default()
        };
        let text = results.render();
        for row in [
            "| metric | transport | direct | tunnel | ratio (or per-connection) | tunnel / tls | target | met? |",
            "| throughput, upload, 1 stream (Gbit/s) | tls | 10.00 | 4.00 | 0.40x | — | ≥ 0.30x | yes |",
            "| throughput, upload, 1 stream (Gbit/s) | tls, connector | 10.00 | 2.00 | 0.20x | 0.50x | — | — |",
            "| connect + first byte, p50 (µs) | tls, connector | 100.0 | 450.0 | 4.50x | 1.50x | — | — |",
            // No rounds of it: shown as failed.
            "| request/response 64 B, p50 (µs) | tls, connector | failed | failed | — | — | — | — |",
        ] {
            assert!(text.contains(row), "no `{row}` in:\n{text}");
        }
        assert!(
            text.contains("tls, connector = client -> burrow connect"),
            "{text}"
        );
        // Skipped: no such rows.
        let mut results = results;
        results.connector = false;
        assert!(!results.render().contains("connector"));
    }

    #[test]
    fn renders_the_udp_rows_with_their_targets() {
        let values = |direct: f64, tunnel: f64| RouteValues {
            direct: vec![direct],
            tunnel: tls(vec![tunnel]),
        };
        let udp = |len, loss| Udp {
            len,
            max_per_s: values(100_000.0, 40_000.0),
            max_gbit: values(1.12, 0.448),
            max_sent_per_s: values(100_000.0, 90_000.0),
            offered: Some(20_000.0),
            loss: values(0.0, loss),
            cpu: tls(CpuUse {
                seconds: 3.0,
                bytes: 2_000_000_000,
            }),
            paced: BTreeMap::new(),
        };
        let results = Results {
            udp: vec![udp(1400, 0.5), udp(64, 7.0)],
            relay: true,
            ..Results::default()
        };
        let text = results.render();
        let rows = [
            "| UDP 1,400 B, max (thousand datagrams/s) | 100.0 | 40.0 | — | 0.40x | — | — | — |",
            "| UDP 1,400 B, max (Gbit/s) | 1.12 | 0.45 | — | 0.40x | — | ≥ 0.25x | yes |",
            // A loss has no ratio; the target is on the tunnel's own value.
            "| UDP 1,400 B, loss at 20.0 thousand datagrams/s, half the tunnel's max (%) | 0.00 | 0.50 | — | — | — | < 1% | yes |",
            "| CPU, gateway + agent, UDP 1,400 B (s per GB delivered) | — | 1.50 | — | 3.0 s / 2.00 GB | — | — | — |",
            // The targets are stated for 1,400 bytes only.
            "| UDP 64 B, max (Gbit/s) | 1.12 | 0.45 | — | 0.40x | — | — | — |",
            "| UDP 64 B, loss at 20.0 thousand datagrams/s, half the tunnel's max (%) | 0.00 | 7.00 | — | — | — | — | — |",
        ];
        for row in rows {
            assert!(text.contains(row), "no `{row}` in:\n{text}");
        }
        assert_eq!(Goal::Below(1.0, "%").met(Some(1.0)), "**no**");
        let losses = Losses {
            sent: 1000,
            lost: 10,
            gateway_socket: 7,
            sink_socket: 0,
        };
        let note = losses.note(1400, "tunnel (tls)").unwrap();
        assert!(note.contains("10 of 1000 datagrams lost; the kernel dropped 7 at the gateway's public socket and 0 at the sink's"), "{note}");
        assert!(note.contains("3 went elsewhere"), "{note}");
        assert!(Losses::default().note(64, "direct").is_none());
    }

    /// Per-round values of one workload for several tunnels.
    fn tunnels(values: &[(Transport, &[f64])]) -> BTreeMap<Transport, Vec<f64>> {
        values.iter().map(|(t, v)| (*t, v.to_vec())).collect()
    }

    fn percentiles(p50_us: f64) -> Vec<Percentiles> {
        vec![Percentiles {
            p50_us,
            p99_us: p50_us * 2.0,
        }]
    }

    #[test]
    fn renders_a_row_per_transport_with_the_ratio_to_tls() {
        use Transport::{Tcp, Tls, Wss};
        let results = Results {
            transports: vec![Tls, Wss, Tcp],
            throughput: vec![Throughput {
                label: "upload, 1 stream".into(),
                streams: 1,
                target_ratio: Some(SINGLE_STREAM_RATIO),
                direct: vec![10.0],
                tunnel: tunnels(&[(Tls, &[4.0]), (Wss, &[3.0]), (Tcp, &[5.0])]),
                relay: Vec::new(),
                peer: BTreeMap::new(),
                connector: Vec::new(),
            }],
            request_response: Latency {
                direct: percentiles(100.0),
                tunnel: [(Tls, percentiles(200.0)), (Wss, percentiles(210.0))].into(),
                relay: Vec::new(),
                peer: BTreeMap::new(),
                connector: Vec::new(),
            },
            memory_transport: Some(Tls),
            idle: Some(Rss {
                gateway_kib: 100,
                agent_kib: 200,
            }),
            cpu: Some(Cpu {
                tunnel: [
                    (
                        Tls,
                        CpuUse {
                            seconds: 2.0,
                            bytes: 4_000_000_000,
                        },
                    ),
                    (
                        Wss,
                        CpuUse {
                            seconds: 3.0,
                            bytes: 4_000_000_000,
                        },
                    ),
                ]
                .into(),
                relay: None,
                peer: BTreeMap::new(),
            }),
            ..Results::default()
        };
        let text = results.render();
        assert!(text.contains("| metric | transport | direct | tunnel | ratio (or per-connection) | tunnel / tls | target | met? |"), "{text}");
        // tls is held against direct; wss against tls (3/4 = 0.75x, short of 0.90x); tcp has
        // no target of its own.
        let rows = [
            "| throughput, upload, 1 stream (Gbit/s) | tls | 10.00 | 4.00 | 0.40x | — | ≥ 0.30x | yes |",
            "| throughput, upload, 1 stream (Gbit/s) | wss | 10.00 | 3.00 | 0.30x | 0.75x | ≥ 0.90x tls | **no** |",
            "| throughput, upload, 1 stream (Gbit/s) | tcp | 10.00 | 5.00 | 0.50x | 1.25x | — | — |",
            // 210/200 = 1.05x, within 1.10x; p99 has no wss target.
            "| request/response 64 B, p50 (µs) | wss | 100.0 | 210.0 | 2.10x | 1.05x | ≤ 1.10x tls | yes |",
            "| request/response 64 B, p99 (µs) | wss | 200.0 | 420.0 | 2.10x | 1.05x | — | — |",
            // tcp ran no latency rounds here: it shows as failed, without ratios.
            "| request/response 64 B, p50 (µs) | tcp | 100.0 | failed | — | — | — | — |",
            "| RSS idle, gateway (KiB) | tls | — | 100 | — | — | — | — |",
            "| CPU, gateway + agent (s per GB through the tunnel) | wss | — | 0.75 | 3.0 s / 4.0 GB | 1.50x | — | — |",
        ];
        for row in rows {
            assert!(text.contains(row), "no `{row}` in:\n{text}");
        }
        assert!(
            text.contains("tunnel / tls = against the tls tunnel"),
            "{text}"
        );

        // Without tls there is nothing to hold wss against.
        let mut results = results;
        results.transports = vec![Wss];
        let text = results.render();
        assert!(!text.contains("tunnel / tls"), "{text}");
        assert!(
            text.contains(
                "| throughput, upload, 1 stream (Gbit/s) | wss | 10.00 | 3.00 | 0.30x | — | — |"
            ),
            "{text}"
        );
    }
}
