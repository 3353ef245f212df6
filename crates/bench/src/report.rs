//! The results, the targets they are held against, and the markdown table.

use std::fmt::Write as _;

use serde::Serialize;

use crate::latency::Percentiles;
use crate::memory::{Level, Rss};
use crate::stats::{spread, Spread};
use crate::sys::Machine;

/// Everything one bench run measured, per round where there are rounds.
#[derive(Debug, Default, Serialize)]
pub struct Results {
    pub machine: Option<Machine>,
    pub settings: String,
    pub throughput: Vec<Throughput>,
    pub request_response: Latency,
    pub connect: Latency,
    pub idle: Option<Rss>,
    pub memory: Vec<Level>,
    pub cpu: Option<Cpu>,
    /// Whether the 2-hop relay reference was measured.
    pub relay: bool,
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
    pub tunnel: Vec<f64>,
    /// Empty when the reference was skipped.
    pub relay: Vec<f64>,
}

impl Throughput {
    /// The rounds of one route.
    pub fn side(&mut self, route: Route) -> &mut Vec<f64> {
        match route {
            Route::Direct => &mut self.direct,
            Route::Tunnel => &mut self.tunnel,
            Route::Relay => &mut self.relay,
        }
    }
}

/// One latency workload, percentiles per round.
#[derive(Debug, Default, Serialize)]
pub struct Latency {
    pub direct: Vec<Percentiles>,
    pub tunnel: Vec<Percentiles>,
    /// Empty when the reference was skipped.
    pub relay: Vec<Percentiles>,
}

impl Latency {
    /// The rounds of one route.
    pub fn side(&mut self, route: Route) -> &mut Vec<Percentiles> {
        match route {
            Route::Direct => &mut self.direct,
            Route::Tunnel => &mut self.tunnel,
            Route::Relay => &mut self.relay,
        }
    }
}

/// The ways from a client to a target that the bench compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// Straight to the target.
    Direct,
    /// Through the two plain TCP relays: the reference.
    Relay,
    /// Through the gateway and the agent.
    Tunnel,
}

impl Route {
    /// The name in failure messages.
    pub fn name(self) -> &'static str {
        match self {
            Route::Direct => "direct",
            Route::Relay => "relay",
            Route::Tunnel => "tunnel",
        }
    }
}

/// Gateway plus agent CPU over the throughput section, and the relays' over the same section.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Cpu {
    pub seconds: f64,
    pub tunnel_bytes: u64,
    /// `None` when the reference was skipped.
    pub relay: Option<RelayCpu>,
}

/// Relay 1 plus relay 2 CPU over the throughput section.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct RelayCpu {
    pub seconds: f64,
    /// Bytes the throughput workloads moved through the relays.
    pub bytes: u64,
}

/// Seconds per GB (10^9 bytes).
fn per_gb(seconds: f64, bytes: u64) -> f64 {
    seconds / (bytes as f64 / 1e9).max(1e-9)
}

/// The target ratio for single streams and for 8 parallel ones (tunnel / direct, at least).
pub const SINGLE_STREAM_RATIO: f64 = 0.30;
pub const EIGHT_STREAMS_RATIO: f64 = 0.40;
const RR_P50_RATIO: f64 = 2.5;
const RR_P99_RATIO: f64 = 3.0;
const CONNECT_P50_RATIO: f64 = 3.0;
const KIB_PER_CONN: f64 = 10.0;
const CPU_PER_GB: f64 = 1.0;

/// A target and whether it was met.
enum Goal {
    None,
    RatioAtLeast(f64),
    RatioAtMost(f64),
    AtMost(f64, &'static str),
    All,
}

impl Goal {
    fn text(&self) -> String {
        match self {
            Goal::None => "—".into(),
            Goal::RatioAtLeast(r) => format!("≥ {r:.2}x"),
            Goal::RatioAtMost(r) => format!("≤ {r:.1}x"),
            Goal::AtMost(v, unit) => format!("≤ {v} {unit}"),
            Goal::All => "all".into(),
        }
    }

    /// Whether `value` (a ratio, an amount, or 1.0 for "all succeeded") meets the goal.
    fn met(&self, value: Option<f64>) -> &'static str {
        let Some(v) = value else { return "—" };
        let ok = match *self {
            Goal::None => return "—",
            Goal::RatioAtLeast(r) => v >= r,
            Goal::RatioAtMost(r) | Goal::AtMost(r, _) => v <= r,
            Goal::All => v >= 1.0,
        };
        if ok {
            "yes"
        } else {
            "**no**"
        }
    }
}

/// The cells of one row between the metric and the target.
struct Cells<'a> {
    direct: &'a str,
    tunnel: &'a str,
    relay: &'a str,
    /// Tunnel / direct, or a per-connection amount.
    ratio: &'a str,
    /// Tunnel / relay.
    vs_relay: &'a str,
}

impl<'a> Cells<'a> {
    /// A row about the tunnel alone.
    fn tunnel(tunnel: &'a str, ratio: &'a str) -> Cells<'a> {
        Cells {
            direct: "—",
            tunnel,
            relay: "—",
            ratio,
            vs_relay: "—",
        }
    }
}

struct Table {
    text: String,
    /// Whether the relay columns are shown.
    relay: bool,
}

impl Table {
    fn new(relay: bool) -> Table {
        let text = if relay {
            "| metric | direct | tunnel | 2-hop relay | ratio (or per-connection) | tunnel / relay \
             | target | met? |\n|---|---:|---:|---:|---:|---:|---|---|\n"
        } else {
            "| metric | direct | tunnel | ratio (or per-connection) | target | met? |\n\
             |---|---:|---:|---:|---|---|\n"
        };
        Table {
            text: text.into(),
            relay,
        }
    }

    fn row(&mut self, metric: &str, cells: &Cells<'_>, goal: &Goal, value: Option<f64>) {
        let Cells {
            direct,
            tunnel,
            relay,
            ratio,
            vs_relay,
        } = cells;
        let (goal, met) = (goal.text(), goal.met(value));
        let _ = if self.relay {
            writeln!(
                self.text,
                "| {metric} | {direct} | {tunnel} | {relay} | {ratio} | {vs_relay} | {goal} | \
                 {met} |"
            )
        } else {
            writeln!(
                self.text,
                "| {metric} | {direct} | {tunnel} | {ratio} | {goal} | {met} |"
            )
        };
    }

    /// A direct/tunnel/relay comparison of per-round values; `decimals` for the values. The
    /// goal is held against tunnel / direct.
    fn compare(&mut self, metric: &str, rounds: [&[f64]; 3], decimals: usize, goal: &Goal) {
        let [d, t, r] = rounds.map(spread);
        let ratio = ratio(t, d);
        self.row(
            metric,
            &Cells {
                direct: &show(d, decimals),
                tunnel: &show(t, decimals),
                relay: &show(r, decimals),
                ratio: &show_ratio(ratio),
                vs_relay: &show_ratio(self::ratio(t, r)),
            },
            goal,
            ratio,
        );
    }
}

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
                "machine: {} cores ({}), kernel {}, {}; open-file limit {}",
                m.cores, m.cpu, m.kernel, m.date, m.fd_limit
            );
        }
        let _ = writeln!(out, "settings: {}", self.settings);
        out.push_str("values: median over rounds (min–max); ratio = tunnel / direct; TLS on");
        if self.relay {
            out.push_str(
                "; 2-hop relay = two plain TCP forwarders in separate processes, no encryption, \
                 no multiplexing: the cost of the two extra hops alone",
            );
        }
        out.push_str("\n\n");
        out.push_str(&self.table());
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

    fn table(&self) -> String {
        let mut t = Table::new(self.relay);
        for w in &self.throughput {
            let goal = w.target_ratio.map_or(Goal::None, Goal::RatioAtLeast);
            t.compare(
                &format!("throughput, {} (Gbit/s)", w.label),
                [&w.direct, &w.tunnel, &w.relay],
                2,
                &goal,
            );
        }
        self.latency_rows(
            &mut t,
            "request/response 64 B",
            &self.request_response,
            RR_P50_RATIO,
            Some(RR_P99_RATIO),
        );
        self.latency_rows(
            &mut t,
            "connect + first byte",
            &self.connect,
            CONNECT_P50_RATIO,
            None,
        );
        self.memory_rows(&mut t);
        if let Some(cpu) = self.cpu {
            self.cpu_row(&mut t, cpu);
        }
        t.text
    }

    /// The gateway's and agent's CPU per GB, next to the relays' when they ran.
    fn cpu_row(&self, t: &mut Table, cpu: Cpu) {
        let tunnel = per_gb(cpu.seconds, cpu.tunnel_bytes);
        let relay = cpu.relay.map(|r| per_gb(r.seconds, r.bytes));
        let metric = if self.relay {
            "CPU, gateway + agent; relay 1 + 2 (s per GB through each)"
        } else {
            "CPU, gateway + agent (s per GB through the tunnel)"
        };
        t.row(
            metric,
            &Cells {
                direct: "—",
                tunnel: &format!("{tunnel:.2}"),
                relay: &relay.map_or_else(|| "—".into(), |r| format!("{r:.2}")),
                ratio: &format!(
                    "{:.1} s / {:.1} GB",
                    cpu.seconds,
                    cpu.tunnel_bytes as f64 / 1e9
                ),
                vs_relay: &relay
                    .filter(|&r| r > 0.0)
                    .map_or_else(|| "—".into(), |r| format!("{:.1}x", tunnel / r)),
            },
            &Goal::AtMost(CPU_PER_GB, "s/GB"),
            Some(tunnel),
        );
    }

    fn latency_rows(&self, t: &mut Table, name: &str, l: &Latency, p50: f64, p99: Option<f64>) {
        let p = |v: &[Percentiles], f: fn(&Percentiles) -> f64| v.iter().map(f).collect::<Vec<_>>();
        let p50s = |v: &[Percentiles]| p(v, |x| x.p50_us);
        let p99s = |v: &[Percentiles]| p(v, |x| x.p99_us);
        t.compare(
            &format!("{name}, p50 (µs)"),
            [&p50s(&l.direct), &p50s(&l.tunnel), &p50s(&l.relay)],
            1,
            &Goal::RatioAtMost(p50),
        );
        t.compare(
            &format!("{name}, p99 (µs)"),
            [&p99s(&l.direct), &p99s(&l.tunnel), &p99s(&l.relay)],
            1,
            &p99.map_or(Goal::None, Goal::RatioAtMost),
        );
    }

    fn memory_rows(&self, t: &mut Table) {
        if let Some(idle) = self.idle {
            for (who, kib) in [("gateway", idle.gateway_kib), ("agent", idle.agent_kib)] {
                t.row(
                    &format!("RSS idle, {who} (KiB)"),
                    &Cells::tunnel(&kib.to_string(), "—"),
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
                    &Cells::tunnel(why, "—"),
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
                        &Cells::tunnel(&kib.to_string(), &format!("{per:.2} KiB/conn")),
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
                &Cells::tunnel(&format!("{}/{}", level.succeeded, level.attempted), "—"),
                &Goal::All,
                Some(all),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
                tunnel: vec![4.0],
                relay: Vec::new(),
            }],
            failures: vec!["boom".into()],
            ..Results::default()
        };
        let text = results.render();
        assert!(text.contains("| throughput, upload, 1 stream (Gbit/s) | 11.00 (10.00–12.00) | 4.00 | 0.36x | ≥ 0.30x | yes |"), "{text}");
        assert!(text.contains("1 check(s) FAILED"));
        assert!(!text.contains("relay"), "{text}");
    }

    #[test]
    fn renders_the_relay_columns() {
        let results = Results {
            throughput: vec![Throughput {
                label: "upload, 1 stream".into(),
                streams: 1,
                target_ratio: Some(SINGLE_STREAM_RATIO),
                direct: vec![10.0],
                tunnel: vec![4.0],
                relay: vec![8.0],
            }],
            cpu: Some(Cpu {
                seconds: 2.0,
                tunnel_bytes: 4_000_000_000,
                relay: Some(RelayCpu {
                    seconds: 0.5,
                    bytes: 5_000_000_000,
                }),
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
            text.contains("| 0.50 | 0.10 | 2.0 s / 4.0 GB | 5.0x | ≤ 1 s/GB | yes |"),
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
}
