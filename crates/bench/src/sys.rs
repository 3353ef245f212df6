//! What the bench reads from and asks of the operating system: the open-file limit, a
//! process's memory and CPU time from `/proc`, and a description of the machine.

use std::time::SystemTime;

use anyhow::Context as _;
use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
use serde::Serialize;

/// Raises this process's open-file limit (children inherit it): to `want` if that is allowed
/// (it is as root), else to the hard limit. Returns the limit now in force.
pub fn raise_fd_limit(want: u64) -> u64 {
    let old = getrlimit(Resource::Nofile);
    let hard = old.maximum.unwrap_or(u64::MAX);
    if want > hard {
        let raised = Rlimit {
            current: Some(want),
            maximum: Some(want),
        };
        if setrlimit(Resource::Nofile, raised).is_ok() {
            return want;
        }
    }
    let to_hard = Rlimit {
        current: old.maximum,
        maximum: old.maximum,
    };
    if setrlimit(Resource::Nofile, to_hard).is_ok() {
        return hard;
    }
    old.current.unwrap_or(u64::MAX)
}

/// Resident memory of process `pid` in KiB (`VmRSS` in `/proc/<pid>/status`).
pub fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    parse_rss_kib(&status).with_context(|| format!("no VmRSS line in {path}"))
}

fn parse_rss_kib(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// User plus system CPU time of process `pid` in seconds (`/proc/<pid>/stat`).
pub fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    let ticks = parse_cpu_ticks(&stat).with_context(|| format!("cannot parse {path}"))?;
    Ok(ticks as f64 / clock_ticks() as f64)
}

/// utime + stime, fields 14 and 15. Field 2, the command name, is in parentheses and may
/// hold spaces, so counting starts after its closing parenthesis (with field 3).
fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(14 - 3);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// Datagrams the kernel dropped so far at the UDP sockets bound to local `port` (the last
/// column of `/proc/net/udp` and `udp6`: a full receive buffer, mostly); `None` if those
/// files cannot be read.
pub fn udp_drops(port: u16) -> Option<u64> {
    let mut total = None;
    for path in ["/proc/net/udp", "/proc/net/udp6"] {
        let Ok(table) = std::fs::read_to_string(path) else {
            continue;
        };
        total = Some(total.unwrap_or(0) + parse_udp_drops(&table, port));
    }
    total
}

fn parse_udp_drops(table: &str, port: u16) -> u64 {
    let wanted = format!(":{port:04X}");
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let local = fields.nth(1)?;
            let drops = fields.last()?;
            local
                .ends_with(&wanted)
                .then(|| drops.parse::<u64>().ok())?
        })
        .sum()
}

/// Clock ticks per second, the unit of `/proc/<pid>/stat` times; 100 if unknown.
fn clock_ticks() -> u64 {
    match rustix::param::clock_ticks_per_second() {
        0 => 100,
        n => n,
    }
}

/// The machine the numbers come from.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub cores: usize,
    pub cpu: String,
    pub kernel: String,
    pub date: String,
    pub fd_limit: u64,
    /// The kernel's default TCP congestion control, which every socket of the bench uses.
    /// With `bbr` the kernel paces each connection with a timer of its own, and the timer
    /// interrupts and the sends they make are CPU time of whichever process they land in:
    /// part of every route's CPU s/GB, and not the same part of each (see "Why sealing looked
    /// slower than the floor" in `docs/benchmarks.md`).
    pub congestion: String,
}

impl Machine {
    /// Describes this machine; what cannot be read shows as `unknown`.
    pub fn describe(fd_limit: u64) -> Machine {
        let read = |path: &str| std::fs::read_to_string(path).ok();
        let cpu = read("/proc/cpuinfo")
            .and_then(|info| {
                let line = info.lines().find(|l| l.starts_with("model name"))?;
                Some(line.split_once(':')?.1.trim().to_string())
            })
            .unwrap_or_else(|| "unknown".into());
        Machine {
            cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
            cpu,
            kernel: read("/proc/sys/kernel/osrelease")
                .map_or_else(|| "unknown".into(), |k| k.trim().to_string()),
            date: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
            fd_limit,
            congestion: read("/proc/sys/net/ipv4/tcp_congestion_control")
                .map_or_else(|| "unknown".into(), |c| c.trim().to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_status_and_stat() {
        let status = "Name:\tburrow\nVmPeak:\t  9 kB\nVmRSS:\t   12345 kB\n";
        assert_eq!(parse_rss_kib(status), Some(12345));
        let stat = "42 (bur row) S 1 42 42 0 -1 4194560 100 0 0 0 7 3 0 0 20 0 4 0";
        assert_eq!(parse_cpu_ticks(stat), Some(10));
        assert_eq!(parse_cpu_ticks("garbage"), None);
        let udp = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops\n\
                   \x20 12: 0100007F:B6BA 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 41 2 0000000000000000 541698\n\
                   \x20 13: 0100007F:99AD 0100007F:B6BA 01 00000000:00000000 00:00000000 00000000     0        0 42 2 0000000000000000 7\n";
        assert_eq!(parse_udp_drops(udp, 0xB6BA), 541_698);
        assert_eq!(parse_udp_drops(udp, 0x99AD), 7);
        assert_eq!(parse_udp_drops(udp, 1), 0);
    }

    #[test]
    fn reads_this_process() {
        let pid = std::process::id();
        assert!(rss_kib(pid).unwrap() > 0);
        assert!(cpu_seconds(pid).unwrap() >= 0.0);
    }
}
