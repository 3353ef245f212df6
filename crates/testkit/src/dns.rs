//! A real DNS server (Debian's dnsmasq) answering a test zone on a free loopback UDP port, and
//! `dig` to ask it.
//!
//! dnsmasq takes a port number, not an inherited socket: the kernel is asked for a free one
//! and dnsmasq started on it, again (a few times) if something took the port meanwhile.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use crate::{Error, Result};

/// Where Debian installs dnsmasq (`dnsmasq-base`) and dig (`dnsutils`).
pub const DNSMASQ: &str = "/usr/sbin/dnsmasq";
/// See [`DNSMASQ`].
pub const DIG: &str = "/usr/bin/dig";

/// The name dnsmasq answers, and its address.
pub const NAME: &str = "www.tunnel.test";
/// See [`NAME`].
pub const ADDRESS: &str = "192.0.2.53";

/// A running dnsmasq answering [`NAME`] with [`ADDRESS`]. Stopped when dropped.
pub struct Dnsmasq {
    _child: tokio::process::Child,
    port: u16,
}

impl Dnsmasq {
    /// Starts dnsmasq on a free port of 127.0.0.1; the error says what to install.
    pub async fn start() -> Result<Dnsmasq> {
        for tool in [DNSMASQ, DIG] {
            if !Path::new(tool).exists() {
                return Err(Error::Unexpected(format!(
                    "{tool} missing: install Debian's dnsmasq-base and dnsutils (.ci/run does)"
                )));
            }
        }
        let mut last_error = String::new();
        for _ in 0..5 {
            let port = std::net::UdpSocket::bind("127.0.0.1:0")?
                .local_addr()?
                .port();
            let mut child = tokio::process::Command::new(DNSMASQ)
                .args([
                    "--keep-in-foreground",
                    "--conf-file=/dev/null",
                    "--no-resolv",
                    "--no-hosts",
                    "--bind-interfaces",
                    "--listen-address=127.0.0.1",
                    "--pid-file=",
                    "--log-facility=-",
                    &format!("--port={port}"),
                    &format!("--address=/tunnel.test/{ADDRESS}"),
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .kill_on_drop(true)
                .spawn()?;
            // Up once it has not died; gone at once when the port was taken.
            tokio::time::sleep(Duration::from_millis(300)).await;
            if child.try_wait()?.is_none() {
                return Ok(Dnsmasq {
                    _child: child,
                    port,
                });
            }
            let out = child.wait_with_output().await?;
            last_error = String::from_utf8_lossy(&out.stderr).into_owned();
        }
        Err(Error::Unexpected(format!(
            "dnsmasq did not start on a free port: {last_error}"
        )))
    }

    /// The UDP port it answers on (at 127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }
}

/// Asks `server` for [`NAME`]'s A record with dig; returns dig's short answer (trimmed) and
/// its error output.
pub async fn dig(server: SocketAddr) -> Result<(String, String)> {
    let out = tokio::process::Command::new(DIG)
        .args([
            &format!("@{}", server.ip()),
            "-p",
            &server.port().to_string(),
            "+short",
            "+tries=5",
            "+time=1",
            NAME,
            "A",
        ])
        .output()
        .await?;
    Ok((
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}
