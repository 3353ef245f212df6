//! Fault harness for Burrow: drives the real `burrow` binary and breaks the network between
//! its parts on command.
//!
//! Used by the process-level tests (`crates/cli/tests/faults_proc.rs`) and by the
//! `burrow-soak` command (`src/bin/soak.rs`). Everything listens on `127.0.0.1:0`; nothing
//! binds a fixed port, so tests run in parallel.
//!
//! # Layout
//! - [`proxy`]: [`FaultProxy`], a TCP proxy placed between agent and gateway (or client and
//!   gateway) that adds delay, throttles, freezes (a blackhole), cuts (FIN) and resets (RST)
//!   on command.
//! - [`udp_proxy`]: [`UdpFaultProxy`], the same for UDP (QUIC): drops a share of datagrams
//!   both ways, blackholes, or rebinds its upstream sockets (the agent's address changes).
//! - [`process`]: [`Burrow`], a running `burrow` process with its stdout and stderr lines;
//!   [`ProcStats`] (memory, file descriptors, threads from `/proc`); starting a zero-config
//!   gateway and an agent and reading back their addresses; TCP socket states from
//!   `/proc/net/tcp`.
//! - [`attack`]: raw attack clients, bounded in count and time ([`IdleFlood`]: idle
//!   connections from several loopback addresses, re-opened as they are cut).
//! - [`nginx`]: a real nginx on a port the test holds ([`Nginx`]), restartable in place
//!   (also one that answers with the address a PROXY protocol header named);
//!   [`haproxy`]: a real HAProxy reading the PROXY protocol ([`Haproxy`]); [`pki`]: a throwaway CA and `localhost` certificates for it ([`Pki`]).
//! - [`harness`]: the scaffolding the cli crate's process tests share ([`harness::within`],
//!   [`harness::eventually`], [`harness::keygen`], [`harness::dirs`], [`harness::admin_addr`], ...).
//! - [`targets`]: services to publish ([`TcpTarget`]: echo, sink, source), a fast
//!   deterministic [`Pattern`], SHA-256, and an echo client that checks every byte.
//!
//! # Example
//! ```no_run
//! # async fn demo() -> Result<(), burrow_testkit::Error> {
//! use burrow_testkit::{targets, FaultProxy, GatewaySpec};
//! use std::time::Duration;
//!
//! let bin = std::path::Path::new("target/debug/burrow");
//! let state = tempfile::tempdir()?;
//! let gw = GatewaySpec::new(state.path()).start(bin).await?;
//! // The agent reaches the gateway through a proxy we can break.
//! let proxy = FaultProxy::start(gw.addr()).await?;
//! let echo = targets::TcpTarget::echo().await?;
//! let agent = burrow_testkit::AgentSpec::new(gw.agent_args_via(proxy.addr()))
//!     .forward(&echo.addr().to_string())
//!     .start(bin)
//!     .await?;
//! proxy.control().set_delay(Duration::from_millis(20));
//! proxy.control().freeze_existing();
//! # drop(agent);
//! # Ok(())
//! # }
//! ```

pub mod attack;
pub mod dns;
pub mod haproxy;
pub mod harness;
pub mod nginx;
pub mod pki;
pub mod process;
pub mod proxy;
pub mod targets;
pub mod udp_proxy;

pub use attack::{FloodOpts, IdleFlood};
pub use dns::Dnsmasq;
pub use haproxy::Haproxy;
pub use nginx::Nginx;
pub use pki::Pki;
pub use process::{
    count_tcp_state, raise_fd_limit, tcp_entries, wait_public, AgentProc, AgentSpec, Burrow,
    GatewayProc, GatewaySpec, ProcStats, Signal, TcpEntry, TcpState,
};
pub use proxy::{FaultControl, FaultProxy};
pub use targets::{sha256, Pattern, TcpTarget};
pub use udp_proxy::{UdpFaultControl, UdpFaultProxy};

use std::time::Duration;

/// What went wrong in the harness, with enough context to diagnose a failed test.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Something expected did not happen in time.
    #[error("{what}: not within {timeout:?}{}", tail_text(.tail))]
    Timeout {
        /// What was awaited.
        what: String,
        /// How long we waited.
        timeout: Duration,
        /// The process's last stderr lines, if a process was involved.
        tail: Vec<String>,
    },
    /// The process ended while we waited for something else.
    #[error("{what}: the process exited ({status}){}", tail_text(.tail))]
    Exited {
        /// What was awaited.
        what: String,
        /// How it ended.
        status: std::process::ExitStatus,
        /// The process's last stderr lines.
        tail: Vec<String>,
    },
    /// A system call failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// Output did not look as expected.
    #[error("{0}")]
    Unexpected(String),
}

fn tail_text(tail: &[String]) -> String {
    if tail.is_empty() {
        String::new()
    } else {
        format!("; last stderr lines:\n  {}", tail.join("\n  "))
    }
}

/// The harness's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
