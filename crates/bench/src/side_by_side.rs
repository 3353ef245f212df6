//! Burrow beside the other tunnels, one line per route, and the targets of performance round
//! 2, all from one run: TLS's CPU over plaintext's as a multiple of the crypto floor,
//! request/response and connect latency against the plaintext peers, and many streams against
//! one.

use std::fmt::Write as _;

use crate::latency::Percentiles;
use crate::peers::Peer;
use crate::procs::Transport;
use crate::report::{CpuUse, Latency, Results, Route, Throughput};
use crate::stats::spread;

/// TLS's CPU per GB minus plaintext's, at most this multiple of the crypto floor.
pub const TLS_OVER_FLOOR: f64 = 1.15;
/// Request/response p50 with TLS, at most this multiple of bore's (plaintext).
pub const TLS_RR_VS_BORE: f64 = 1.10;
/// Connect + first byte p50 with TLS, at most this multiple of the best plaintext peer's.
pub const TLS_CONNECT_VS_PEER: f64 = 1.10;

/// Medians of one route, `None` where it has no rounds.
#[derive(Debug, Default, Clone, Copy)]
struct Line {
    up1: Option<f64>,
    down1: Option<f64>,
    up8: Option<f64>,
    up64: Option<f64>,
    rr50: Option<f64>,
    rr99: Option<f64>,
    connect50: Option<f64>,
    cpu: Option<f64>,
}

fn median(v: Option<&Vec<f64>>) -> Option<f64> {
    spread(v.map_or(&[][..], Vec::as_slice)).map(|s| s.median)
}

fn pick(l: &Latency, route: Route, f: fn(&Percentiles) -> f64) -> Option<f64> {
    let rounds = match route {
        Route::Direct => Some(&l.direct),
        Route::Relay => Some(&l.relay),
        Route::Tunnel(t) => l.tunnel.get(&t),
        Route::Peer(p) => l.peer.get(&p),
        Route::Connector => Some(&l.connector),
    };
    let values: Vec<f64> = rounds.into_iter().flatten().map(f).collect();
    spread(&values).map(|s| s.median)
}

impl Line {
    fn of(r: &Results, route: Route) -> Line {
        let rows = |dir: &str, streams: u32| -> Option<f64> {
            let w: &Throughput = r
                .throughput
                .iter()
                .find(|w| w.streams == streams && w.label.starts_with(dir))?;
            median(match route {
                Route::Direct => Some(&w.direct),
                Route::Relay => Some(&w.relay),
                Route::Tunnel(t) => w.tunnel.get(&t),
                Route::Peer(p) => w.peer.get(&p),
                Route::Connector => Some(&w.connector),
            })
        };
        let cpu = r.cpu.as_ref().and_then(|c| match route {
            // The connector path's processes are not counted.
            Route::Direct | Route::Connector => None,
            Route::Relay => c.relay,
            Route::Tunnel(t) => c.tunnel.get(&t).copied(),
            Route::Peer(p) => c.peer.get(&p).copied(),
        });
        Line {
            up1: rows("upload", 1),
            down1: rows("download", 1),
            up8: rows("upload", 8),
            up64: rows("upload", 64),
            rr50: pick(&r.request_response, route, |p| p.p50_us),
            rr99: pick(&r.request_response, route, |p| p.p99_us),
            connect50: pick(&r.connect, route, |p| p.p50_us),
            cpu: cpu.filter(|c| c.bytes > 0).map(CpuUse::per_gb),
        }
    }
}

fn cell(v: Option<f64>, decimals: usize) -> String {
    v.map_or_else(|| "—".into(), |v| format!("{v:.decimals$}"))
}

/// The section, or nothing when the run measured no TCP workloads.
pub fn render(r: &Results) -> String {
    if r.throughput.is_empty() && r.request_response.direct.is_empty() {
        return String::new();
    }
    let mut out = String::new();
    out.push_str(
        "\nside by side (medians; CPU = both processes of the route over the throughput \
         rounds):\n\n| route | upload 1 stream (Gbit/s) | download 1 stream | 8 streams | 64 \
         streams | RR p50 (µs) | RR p99 (µs) | connect p50 (µs) | CPU s/GB |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    let mut routes = vec![(Route::Direct, "direct".to_string())];
    if r.relay {
        routes.push((Route::Relay, "2-hop relay (plaintext)".into()));
    }
    routes.extend(
        r.peers
            .iter()
            .map(|&p| (Route::Peer(p), p.name().to_string())),
    );
    for &t in &r.transports {
        routes.push((Route::Tunnel(t), format!("Burrow, {}", t.name())));
    }
    if r.connector {
        routes.push((Route::Connector, "Burrow, tls, through a connector".into()));
    }
    for (route, name) in &routes {
        let l = Line::of(r, *route);
        let _ = writeln!(
            out,
            "| {name} | {} | {} | {} | {} | {} | {} | {} | {} |",
            cell(l.up1, 2),
            cell(l.down1, 2),
            cell(l.up8, 2),
            cell(l.up64, 2),
            cell(l.rr50, 1),
            cell(l.rr99, 1),
            cell(l.connect50, 1),
            cell(l.cpu, 2),
        );
    }
    if let Some(f) = r.floor {
        let _ = writeln!(
            out,
            "\ncrypto floor: {} (ring) sealing and opening {:.2} GB in 16 KiB records on one \
             core: {:.2} CPU s/GB",
            crate::floor::AEAD,
            f.bytes as f64 / 1e9,
            f.per_gb()
        );
    }
    out.push_str("\n| round-2 target | value | met? |\n|---|---|---|\n");
    for (target, value, met) in targets(r) {
        let met = match met {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "—",
        };
        let _ = writeln!(out, "| {target} | {value} | {met} |");
    }
    out
}

/// Each target: what it asks, the value measured, whether it was met (`None`: not measured).
fn targets(r: &Results) -> Vec<(String, String, Option<bool>)> {
    let tls = Line::of(r, Route::Tunnel(Transport::Tls));
    let tcp = Line::of(r, Route::Tunnel(Transport::Tcp));
    let bore = Line::of(r, Route::Peer(Peer::Bore));
    let rathole = Line::of(r, Route::Peer(Peer::Rathole));
    let mut out = Vec::new();
    let missing = |what: &str| (format!("— ({what} not measured)"), None);

    let floor = r.floor.map(|f| f.per_gb());
    let (value, met) = match (tls.cpu, tcp.cpu, floor) {
        (Some(a), Some(b), Some(f)) if f > 0.0 => {
            let x = (a - b) / f;
            (
                format!(
                    "{a:.2} − {b:.2} = {:.2} s/GB = {x:.2}x the floor ({f:.2})",
                    a - b
                ),
                Some(x <= TLS_OVER_FLOOR),
            )
        }
        _ => missing("tls, tcp or the floor"),
    };
    out.push((
        format!("TLS overhead (CPU s/GB tls − tcp) ≤ {TLS_OVER_FLOOR}x the crypto floor"),
        value,
        met,
    ));

    let vs = |a: Option<f64>, b: Option<f64>, limit: f64, what: &str| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => (
            format!("{a:.1} vs {b:.1} µs = {:.2}x", a / b),
            Some(a / b <= limit),
        ),
        _ => missing(what),
    };
    let (value, met) = vs(tls.rr50, bore.rr50, TLS_RR_VS_BORE, "tls or bore");
    out.push((
        format!("request/response p50, tls ≤ {TLS_RR_VS_BORE}x bore's"),
        value,
        met,
    ));
    let (value, met) = vs(tcp.rr50, bore.rr50, 1.0, "tcp or bore");
    out.push(("request/response p50, tcp ≤ bore's".into(), value, met));

    for (name, l) in [("tls", tls), ("tcp", tcp)] {
        for (n, many) in [(8, l.up8), (64, l.up64)] {
            let (value, met) = match (many, l.up1) {
                (Some(m), Some(one)) if one > 0.0 => (
                    format!("{m:.2} vs {one:.2} Gbit/s = {:.2}x", m / one),
                    Some(m >= one),
                ),
                _ => missing(&format!("{name} {n} streams")),
            };
            out.push((
                format!("{n} streams ≥ 1 stream (upload), {name}"),
                value,
                met,
            ));
        }
    }
    let (value, met) = match (tcp.up8, rathole.up8) {
        (Some(a), Some(b)) if b > 0.0 => (
            format!("{a:.2} vs {b:.2} Gbit/s = {:.2}x", a / b),
            Some(a >= b),
        ),
        _ => missing("tcp or rathole"),
    };
    out.push(("8 streams, tcp ≥ rathole's".into(), value, met));

    let best_peer = [bore.connect50, rathole.connect50]
        .into_iter()
        .flatten()
        .min_by(f64::total_cmp);
    let (value, met) = vs(
        tls.connect50,
        best_peer,
        TLS_CONNECT_VS_PEER,
        "tls or a plaintext peer",
    );
    out.push((
        format!("connect + first byte p50, tls ≤ {TLS_CONNECT_VS_PEER}x the best plaintext peer's"),
        value,
        met,
    ));
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::floor::Floor;
    use crate::report::Cpu;

    fn p(p50_us: f64) -> Vec<Percentiles> {
        vec![Percentiles {
            p50_us,
            p99_us: p50_us * 2.0,
        }]
    }

    #[test]
    fn holds_tls_against_the_floor_and_the_peers() {
        use Transport::{Tcp, Tls};
        let row = |label: &str, streams, tls: f64, tcp: f64, rathole: f64| Throughput {
            label: label.into(),
            streams,
            target_ratio: None,
            direct: vec![20.0],
            tunnel: [(Tls, vec![tls]), (Tcp, vec![tcp])].into(),
            relay: Vec::new(),
            peer: [(Peer::Rathole, vec![rathole])].into(),
            connector: Vec::new(),
        };
        let use_ = |seconds, gb: f64| CpuUse {
            seconds,
            bytes: (gb * 1e9) as u64,
        };
        let results = Results {
            transports: vec![Tls, Tcp],
            peers: vec![Peer::Bore, Peer::Rathole],
            throughput: vec![
                row("upload, 1 stream", 1, 5.0, 10.0, 6.0),
                row("upload, 8 streams", 8, 4.0, 9.0, 8.5),
            ],
            request_response: Latency {
                direct: p(20.0),
                tunnel: [(Tls, p(90.0)), (Tcp, p(80.0))].into(),
                relay: Vec::new(),
                peer: [(Peer::Bore, p(84.0)), (Peer::Rathole, p(100.0))].into(),
                connector: Vec::new(),
            },
            connect: Latency {
                direct: p(80.0),
                tunnel: [(Tls, p(429.0))].into(),
                relay: Vec::new(),
                peer: [(Peer::Bore, p(482.0)), (Peer::Rathole, p(358.0))].into(),
                connector: Vec::new(),
            },
            cpu: Some(Cpu {
                tunnel: [(Tls, use_(2.0, 1.0)), (Tcp, use_(1.0, 1.0))].into(),
                relay: None,
                peer: BTreeMap::new(),
            }),
            floor: Some(Floor {
                bytes: 1_000_000_000,
                seconds: 0.8,
            }),
            ..Results::default()
        };
        let text = render(&results);
        let rows = [
            "| Burrow, tls | 5.00 | — | 4.00 | — | 90.0 | 180.0 | 429.0 | 2.00 |",
            "| rathole tcp (plaintext) | 6.00 | — | 8.50 | — | 100.0 | 200.0 | 358.0 | — |",
            // (2 − 1) / 0.8 = 1.25x.
            "| TLS overhead (CPU s/GB tls − tcp) ≤ 1.15x the crypto floor | 2.00 − 1.00 = 1.00 s/GB = 1.25x the floor (0.80) | **no** |",
            "| request/response p50, tls ≤ 1.1x bore's | 90.0 vs 84.0 µs = 1.07x | yes |",
            "| request/response p50, tcp ≤ bore's | 80.0 vs 84.0 µs = 0.95x | yes |",
            "| 8 streams ≥ 1 stream (upload), tls | 4.00 vs 5.00 Gbit/s = 0.80x | **no** |",
            "| 64 streams ≥ 1 stream (upload), tcp | — (tcp 64 streams not measured) | — |",
            "| 8 streams, tcp ≥ rathole's | 9.00 vs 8.50 Gbit/s = 1.06x | yes |",
            // Against rathole's 358, the better of the two.
            "| connect + first byte p50, tls ≤ 1.1x the best plaintext peer's | 429.0 vs 358.0 µs = 1.20x | **no** |",
        ];
        for row in rows {
            assert!(text.contains(row), "no `{row}` in:\n{text}");
        }
        assert!(
            text.contains("crypto floor: AES-128-GCM (ring) sealing and opening 1.00 GB"),
            "{text}"
        );
    }
}
