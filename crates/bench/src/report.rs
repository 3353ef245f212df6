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
}

/// One latency workload, percentiles per round.
#[derive(Debug, Default, Serialize)]
pub struct Latency {
    pub direct: Vec<Percentiles>,
    pub tunnel: Vec<Percentiles>,
}

impl Latency {
    /// The direct or the tunnel rounds.
    pub fn side(&mut self, direct: bool) -> &mut Vec<Percentiles> {
        if direct {
            &mut self.direct
        } else {
            &mut self.tunnel
        }
    }
}

/// Gateway plus agent CPU over the throughput section.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Cpu {
    pub seconds: f64,
    pub tunnel_bytes: u64,
}

impl Cpu {
    fn per_gb(&self) -> f64 {
        self.seconds / (self.tunnel_bytes as f64 / 1e9).max(1e-9)
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

struct Table(String);

impl Table {
    fn new() -> Table {
        Table(String::from(
            "| metric | direct | tunnel | ratio (or per-connection) | target | met? |\n\
             |---|---:|---:|---:|---|---|\n",
        ))
    }

    fn row(
        &mut self,
        metric: &str,
        direct: &str,
        tunnel: &str,
        ratio: &str,
        goal: &Goal,
        value: Option<f64>,
    ) {
        let _ = writeln!(
            self.0,
            "| {metric} | {direct} | {tunnel} | {ratio} | {} | {} |",
            goal.text(),
            goal.met(value)
        );
    }

    /// A direct/tunnel comparison of per-round values; `decimals` for the values.
    fn compare(
        &mut self,
        metric: &str,
        direct: &[f64],
        tunnel: &[f64],
        decimals: usize,
        goal: &Goal,
    ) {
        let (d, t) = (spread(direct), spread(tunnel));
        let ratio = match (d, t) {
            (Some(d), Some(t)) if d.median > 0.0 => Some(t.median / d.median),
            _ => None,
        };
        let ratio_text = ratio.map_or_else(|| "—".into(), |r| format!("{r:.2}x"));
        self.row(
            metric,
            &show(d, decimals),
            &show(t, decimals),
            &ratio_text,
            goal,
            ratio,
        );
    }
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
        if i > 0 && (digits.len() - i) % 3 == 0 {
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
        out.push_str("values: median over rounds (min–max); ratio = tunnel / direct; TLS on\n\n");
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
        let mut t = Table::new();
        for w in &self.throughput {
            let goal = w.target_ratio.map_or(Goal::None, Goal::RatioAtLeast);
            t.compare(
                &format!("throughput, {} (Gbit/s)", w.label),
                &w.direct,
                &w.tunnel,
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
            let per_gb = cpu.per_gb();
            t.row(
                "CPU, gateway + agent (s per GB through the tunnel)",
                "—",
                &format!("{per_gb:.2}"),
                &format!(
                    "{:.1} s / {:.1} GB",
                    cpu.seconds,
                    cpu.tunnel_bytes as f64 / 1e9
                ),
                &Goal::AtMost(CPU_PER_GB, "s/GB"),
                Some(per_gb),
            );
        }
        t.0
    }

    fn latency_rows(&self, t: &mut Table, name: &str, l: &Latency, p50: f64, p99: Option<f64>) {
        let p = |v: &[Percentiles], f: fn(&Percentiles) -> f64| v.iter().map(f).collect::<Vec<_>>();
        t.compare(
            &format!("{name}, p50 (µs)"),
            &p(&l.direct, |x| x.p50_us),
            &p(&l.tunnel, |x| x.p50_us),
            1,
            &Goal::RatioAtMost(p50),
        );
        t.compare(
            &format!("{name}, p99 (µs)"),
            &p(&l.direct, |x| x.p99_us),
            &p(&l.tunnel, |x| x.p99_us),
            1,
            &p99.map_or(Goal::None, Goal::RatioAtMost),
        );
    }

    fn memory_rows(&self, t: &mut Table) {
        if let Some(idle) = self.idle {
            for (who, kib) in [("gateway", idle.gateway_kib), ("agent", idle.agent_kib)] {
                t.row(
                    &format!("RSS idle, {who} (KiB)"),
                    "—",
                    &kib.to_string(),
                    "—",
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
                    "—",
                    why,
                    "—",
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
                        "—",
                        &kib.to_string(),
                        &format!("{per:.2} KiB/conn"),
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
                "—",
                &format!("{}/{}", level.succeeded, level.attempted),
                "—",
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
            }],
            failures: vec!["boom".into()],
            ..Results::default()
        };
        let text = results.render();
        assert!(text.contains("| throughput, upload, 1 stream (Gbit/s) | 11.00 (10.00–12.00) | 4.00 | 0.36x | ≥ 0.30x | yes |"), "{text}");
        assert!(text.contains("1 check(s) FAILED"));
    }
}
