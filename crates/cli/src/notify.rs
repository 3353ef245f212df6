//! systemd's readiness protocol (`Type=notify`): `READY=1` once the role listens,
//! `STOPPING=1` when it begins to shut down, `STATUS=` lines, and `WATCHDOG=1` pings when the
//! unit sets `WatchdogSec=`. Each is one datagram to the unix socket `NOTIFY_SOCKET` names
//! (a path, or `@name` for an abstract socket); without it, nothing is sent.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use burrow::agent::{AgentStatus, ForwardStatus};
use tokio::sync::watch;
use tracing::{debug, warn};

use crate::run::LOG_TARGET;

/// Sends `state` (lines such as `READY=1`) to systemd, if it is listening.
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET").filter(|p| !p.is_empty()) else {
        return;
    };
    let sent = UnixDatagram::unbound().and_then(|sock| {
        let path = path.to_string_lossy();
        match path.strip_prefix('@') {
            Some(name) => {
                use std::os::linux::net::SocketAddrExt as _;
                let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
                sock.send_to_addr(state.as_bytes(), &addr)
            }
            None => sock.send_to(state.as_bytes(), &*path),
        }
    });
    match sent {
        Ok(_) => debug!(target: LOG_TARGET, state, "notified systemd"),
        Err(e) => warn!(target: LOG_TARGET, "cannot notify systemd through NOTIFY_SOCKET: {e}"),
    }
}

/// The role is up: `READY=1` and what it is doing.
pub fn ready(status: &str) {
    notify(&format!("READY=1\nSTATUS={status}"));
}

/// The role is shutting down.
pub fn stopping() {
    notify("STOPPING=1\nSTATUS=shutting down: draining streams");
}

/// With `WATCHDOG_USEC` set (systemd's `WatchdogSec=`) for this process, pings the watchdog
/// at half the interval from a task on the runtime, so a wedged runtime stops the pings and
/// systemd restarts the service.
pub fn spawn_watchdog() {
    let Some(usec) = std::env::var("WATCHDOG_USEC")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|u| *u > 0)
    else {
        return;
    };
    if let Some(pid) = std::env::var("WATCHDOG_PID")
        .ok()
        .and_then(|v| v.trim().parse::<u32>().ok())
    {
        if pid != std::process::id() {
            return;
        }
    }
    let every = Duration::from_micros(usec / 2).max(Duration::from_millis(10));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            notify("WATCHDOG=1");
        }
    });
}

/// Keeps systemd's status line (`systemctl status`) up to date with the agent's sessions and
/// forwards: one part per gateway, in the order given.
pub fn spawn_agent_status(mut statuses: Vec<watch::Receiver<AgentStatus>>, gateways: Vec<String>) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    tokio::spawn(async move {
        let mut last = String::new();
        loop {
            let parts: Vec<String> = statuses
                .iter_mut()
                .zip(&gateways)
                .map(|(status, gateway)| {
                    let s = status.borrow_and_update();
                    if s.connected {
                        let live = s
                            .forwards
                            .iter()
                            .filter(|f| matches!(f, ForwardStatus::Granted(_)))
                            .count();
                        format!(
                            "connected to {gateway}; {live} of {} forwards live",
                            s.forwards.len()
                        )
                    } else {
                        match (&s.stopped, &s.last_error) {
                            (Some(e), _) => format!("gave up on {gateway}: {e}"),
                            (None, Some(e)) => format!("reconnecting to {gateway}: {e}"),
                            (None, None) => format!("connecting to {gateway}"),
                        }
                    }
                })
                .collect();
            let line = parts.join(" | ");
            if line != last {
                // One line: systemd shows STATUS= as written.
                notify(&format!("STATUS={}", line.replace('\n', " ")));
                last = line;
            }
            let changes = statuses.iter_mut().map(|s| Box::pin(s.changed()));
            if futures_util::future::select_all(changes).await.0.is_err() {
                return;
            }
        }
    });
}
