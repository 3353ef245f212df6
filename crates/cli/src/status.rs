//! `burrow status`: a running gateway's or agent's status, read from its admin server's
//! `/api/status` and shown as tables.

use std::io::{Read as _, Write as _};
use std::net::{TcpStream, ToSocketAddrs as _};
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context as _};
use burrow::admin::status::{ServiceRow, Status};

use crate::run;

/// Flags of `burrow status`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The admin server: HOST:PORT or http://HOST:PORT, as given to the gateway's or agent's
    /// --admin
    #[arg(long, env = "BURROW_ADMIN", value_name = "ADDR", default_value = burrow::admin::USUAL_ADDR)]
    admin: String,

    /// The admin server's token, if it has one
    #[arg(
        long,
        env = "BURROW_ADMIN_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    admin_token: Option<String>,

    /// Print the JSON as the admin server sends it, instead of tables
    #[arg(long)]
    json: bool,
}

/// How long connecting and each read may take.
const TIMEOUT: Duration = Duration::from_secs(5);
/// The most of a response read.
const MAX_RESPONSE: u64 = 16 << 20;

/// Runs `burrow status`.
pub fn main(args: Args) -> anyhow::Result<()> {
    let body = fetch(&args.admin, args.admin_token.as_deref(), "/api/status")?;
    if args.json {
        return run::print(body.trim_end());
    }
    let status: Status = serde_json::from_str(&body)
        .with_context(|| format!("{} did not answer with a burrow status", args.admin))?;
    run::print(render(&status, SystemTime::now()).trim_end())
}

/// `GET path` from the admin server at `addr`, the body if the answer is 200.
fn fetch(addr: &str, token: Option<&str>, path: &str) -> anyhow::Result<String> {
    request(addr, token, "GET", path, None)
}

/// `method path` (with a JSON `body`) to the admin server at `addr`: the body if the answer
/// is 200 or 201, else an error with the server's text.
pub fn request(
    addr: &str,
    token: Option<&str>,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> anyhow::Result<String> {
    let hostport = addr
        .strip_prefix("http://")
        .unwrap_or(addr)
        .trim_end_matches('/');
    if addr.starts_with("https://") {
        bail!("the admin server speaks plain HTTP: use --admin HOST:PORT (put it behind a TLS proxy for remote access)");
    }
    let target = hostport
        .to_socket_addrs()
        .with_context(|| format!("--admin {addr}: not a HOST:PORT"))?
        .next()
        .with_context(|| format!("--admin {addr}: the name has no address"))?;
    let mut tcp = TcpStream::connect_timeout(&target, TIMEOUT).with_context(|| {
        format!("cannot reach the admin server at {addr}: is the gateway or agent running with --admin {addr}?")
    })?;
    tcp.set_read_timeout(Some(TIMEOUT))?;
    tcp.set_write_timeout(Some(TIMEOUT))?;
    let auth = token.map_or_else(String::new, |t| {
        format!("Authorization: Bearer {}\r\n", t.trim())
    });
    let content = body.map_or_else(String::new, |b| {
        format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            b.len()
        )
    });
    write!(
        tcp,
        "{method} {path} HTTP/1.1\r\nHost: {hostport}\r\nAccept: application/json\r\n{auth}{content}Connection: close\r\n\r\n{}",
        body.unwrap_or("")
    )
    .context("cannot send the request to the admin server")?;
    let mut raw = Vec::new();
    tcp.take(MAX_RESPONSE)
        .read_to_end(&mut raw)
        .with_context(|| format!("cannot read the answer of {addr}"))?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .with_context(|| format!("{addr} did not answer in HTTP"))?;
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse::<u16>().ok())
        .with_context(|| format!("{addr} did not answer in HTTP"))?;
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_string()
    };
    match code {
        200 | 201 => Ok(body),
        401 if token.is_none() => bail!("the admin server at {addr} needs its token: pass --admin-token or set BURROW_ADMIN_TOKEN"),
        401 => bail!("the admin server at {addr} did not accept the token (--admin-token / BURROW_ADMIN_TOKEN)"),
        other => bail!("the admin server at {addr} answered {other}: {}", body.trim()),
    }
}

/// The body of a chunked response.
fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// `1.5 MiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i < UNITS.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[i])
    }
}

/// `3m 12s`.
fn span(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m {}s", s / 60, s % 60),
        s if s < 86_400 => format!("{}h {}m", s / 3600, (s % 3600) / 60),
        s => format!("{}d {}h", s / 86_400, (s % 86_400) / 3600),
    }
}

fn ago(now: SystemTime, at: u64) -> String {
    let now = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    format!("{} ago", span(now.saturating_sub(at)))
}

/// Rows as columns padded to their widest cell, two spaces apart.
fn table(head: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = head.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut l = String::new();
        for (i, (c, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                l.push_str(c);
            } else {
                l.push_str(&format!("{c:<w$}  "));
            }
        }
        l.trim_end().to_string() + "\n"
    };
    let mut out = line(head.to_vec());
    for r in rows {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    out
}

/// The status as text: a summary line, the agents (or the agent's session), the services
/// and the recent errors.
pub fn render(st: &Status, now: SystemTime) -> String {
    let mut out = String::new();
    let t = &st.totals;
    let mut title = format!(
        "burrow {} {} · up {}",
        st.role,
        st.version,
        span(st.uptime_secs)
    );
    if let Some(l) = &st.listen {
        title.push_str(&format!(" · tunnel {l}"));
    }
    if let Some(g) = &st.gateway {
        title.push_str(&format!(" · gateway {g}"));
    }
    out.push_str(&title);
    out.push('\n');
    let agents = if st.role == "gateway" {
        format!(
            "agents {}/{} connected · ",
            t.agents_connected,
            st.agents.len()
        )
    } else {
        String::new()
    };
    out.push_str(&format!(
        "{agents}sessions {} · streams {} open, {} total, {} refused · {} to services, {} to clients{}\n",
        t.sessions,
        t.streams_current,
        t.streams_total,
        t.streams_refused,
        bytes(t.bytes_to_service),
        bytes(t.bytes_to_client),
        if st.role == "gateway" {
            format!(" · auth failures {}", t.auth_failures)
        } else {
            String::new()
        }
    ));
    if let Some(r) = &st.reconnect {
        out.push_str(&format!(
            "not connected: {} failed attempts{}\n",
            r.failed_attempts,
            r.next_retry_ms.map_or_else(String::new, |ms| format!(
                ", next in {}",
                span(ms.div_ceil(1000))
            ))
        ));
    }
    // An agent with several gateways: a row each, named by its gateway.
    let per_gateway = st.role == "agent" && st.agents.len() > 1;
    for a in st.agents.iter().filter(|_| per_gateway) {
        let gateway = a.gateway.as_deref().unwrap_or("?");
        let how = a
            .transport
            .as_ref()
            .map_or_else(String::new, |t| format!(" ({t})"));
        let since = a
            .state_since
            .map_or_else(String::new, |at| format!(" since {}", ago(now, at)));
        if let Some(why) = &a.stopped {
            out.push_str(&format!("gateway {gateway}{how}: gave up{since}: {why}\n"));
        } else if let Some(r) = &a.reconnect {
            out.push_str(&format!(
                "gateway {gateway}{how}: not connected ({}{since}): {} failed attempts{}{}\n",
                a.state.as_deref().unwrap_or("reconnecting"),
                r.failed_attempts,
                r.next_retry_ms.map_or_else(String::new, |ms| format!(
                    ", next in {}",
                    span(ms.div_ceil(1000))
                )),
                a.last_error
                    .as_ref()
                    .map_or_else(String::new, |e| format!("; last error: {}", e.text))
            ));
        } else if a.connected {
            out.push_str(&format!("gateway {gateway}{how}: connected{since}\n"));
        }
    }
    out.push('\n');
    let rows: Vec<Vec<String>> = st
        .agents
        .iter()
        .map(|a| {
            let s = a.session.as_ref();
            let state = match (a.connected, &a.stopped) {
                (true, _) => "connected",
                (false, Some(_)) => "stopped",
                (false, None) => "disconnected",
            };
            let gateway = a.gateway.clone().unwrap_or_default();
            let row = vec![
                a.name.clone(),
                state.into(),
                s.map_or("-".into(), |s| s.transport.clone()),
                s.map_or("-".into(), |s| s.address.clone()),
                s.map_or("-".into(), |s| ago(now, s.since)),
                s.and_then(|s| s.rtt_ms)
                    .map_or("-".into(), |ms| format!("{ms:.2} ms")),
                s.map_or("-".into(), |s| s.streams.to_string()),
                a.sessions.to_string(),
            ];
            match per_gateway {
                true => std::iter::once(gateway).chain(row).collect(),
                false => row,
            }
        })
        .collect();
    let head = [
        "AGENT",
        "STATE",
        "TRANSPORT",
        "ADDRESS",
        "SINCE",
        "RTT",
        "STREAMS",
        "SESSIONS",
    ];
    let head: Vec<&str> = match per_gateway {
        true => std::iter::once("GATEWAY").chain(head).collect(),
        false => head.to_vec(),
    };
    out.push_str(&table(&head, &rows));
    let gateway = st.role == "gateway";
    let mut rows = Vec::new();
    for a in &st.agents {
        for s in &a.services {
            let who = if gateway {
                a.name.clone()
            } else {
                s.target.clone().unwrap_or_default()
            };
            let row = service_row(s, who);
            rows.push(match per_gateway {
                true => std::iter::once(a.gateway.clone().unwrap_or_default())
                    .chain(row)
                    .collect(),
                false => row,
            });
        }
    }
    if !rows.is_empty() {
        out.push('\n');
        let head = [
            "SERVICE",
            if gateway { "AGENT" } else { "TARGET" },
            "PUBLIC",
            "STATE",
            "OPEN",
            "TOTAL",
            "REFUSED",
            "TO SERVICE",
            "TO CLIENT",
        ];
        let head: Vec<&str> = match per_gateway {
            true => std::iter::once("GATEWAY").chain(head).collect(),
            false => head.to_vec(),
        };
        out.push_str(&table(&head, &rows));
    }
    let problems: Vec<String> = st
        .agents
        .iter()
        .flat_map(|a| {
            let on = match (per_gateway, &a.gateway) {
                (true, Some(g)) => format!(" by gateway {g}"),
                _ => String::new(),
            };
            let refused = a.services.iter().filter_map(move |s| {
                s.error
                    .as_ref()
                    .map(|e| format!("{}: refused{on}: {e}", s.name))
            });
            let who = match (per_gateway, &a.gateway) {
                (true, Some(g)) => format!("{} on gateway {g}", a.name),
                _ => a.name.clone(),
            };
            let last = a
                .last_error
                .iter()
                .map(move |e| format!("{who}: last error {}: {}", ago(now, e.at), e.text));
            refused.chain(last).collect::<Vec<_>>()
        })
        .collect();
    if !problems.is_empty() {
        out.push('\n');
        for p in problems {
            out.push_str(&p);
            out.push('\n');
        }
    }
    if !st.recent_errors.is_empty() {
        out.push_str("\nRECENT ERRORS\n");
        let rows: Vec<Vec<String>> = st
            .recent_errors
            .iter()
            .rev()
            .map(|e| vec![ago(now, e.at), e.about.clone(), e.text.clone()])
            .collect();
        out.push_str(&table(&["WHEN", "ABOUT", "WHAT"], &rows));
    }
    out
}

/// One service's row; a UDP service's counts are of flows, and its bytes its datagrams'.
fn service_row(s: &ServiceRow, who: String) -> Vec<String> {
    let (open, total, refused, up, down) = match &s.udp {
        Some(u) => (
            u.flows_current,
            u.flows_total,
            u.flows_refused,
            u.bytes_to_service,
            u.bytes_to_client,
        ),
        None => (
            s.streams_current,
            s.streams_total,
            s.streams_refused,
            s.bytes_to_service,
            s.bytes_to_client,
        ),
    };
    vec![
        s.name.clone(),
        who,
        s.public.clone().unwrap_or_else(|| "-".into()),
        match (&s.group, s.members) {
            (Some(g), Some(n)) => format!(
                "{} (group {g}, {n} session{})",
                s.state,
                if n == 1 { "" } else { "s" }
            ),
            (Some(g), None) => format!("{} (group {g})", s.state),
            (None, _) => s.state.clone(),
        },
        open.to_string(),
        total.to_string(),
        refused.to_string(),
        bytes(up),
        bytes(down),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_spans_read_well() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(span(59), "59s");
        assert_eq!(span(3725), "1h 2m");
    }

    #[test]
    fn chunked_bodies_are_joined() {
        assert_eq!(dechunk("3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"), "abcde");
    }

    #[test]
    fn columns_line_up() {
        let t = table(&["A", "BB"], &[vec!["xxx".into(), "y".into()]]);
        assert_eq!(t, "A    BB\nxxx  y\n");
    }
}
