//! Burrow: a reverse tunnel. Gateway, agent, transports, configuration and the session driver.
//!
//! # Layout
//! - [`config`]: typed settings for every role, loaded from flags, environment and TOML.
//! - [`tls`]: the gateway's certificate (self-signed and kept, or CA-signed), fingerprints,
//!   and the agent's verifiers (pinned fingerprint or CA).
//! - [`state`]: the gateway's state directory (certificate, generated agent key).
//! - [`leases`]: the ports the gateway chose for agents, kept in the state directory across
//!   restarts.
//! - [`transport`]: dialing and accepting tunnel connections (TCP or TLS).
//! - [`session`]: the multiplexed session over one connection: handshake, driver task and
//!   stream handles.
//! - [`relay`]: copying bytes between a stream and a local socket, with half-close; and
//!   [`relay::streams`], between two streams (the gateway's half of a connector's stream).
//! - [`paths`]: unix socket paths as public endpoints, and the patterns that grant them.
//! - [`proxy_protocol`]: the PROXY protocol header an agent writes to a target first.
//! - [`udp`]: UDP flows through the session: public UDP ports, per-flow sockets at the
//!   agent.
//! - [`gateway`], [`agent`], [`connector`]: the roles, each with `bind`/`run(shutdown)` style
//!   entry points.
//! - [`dial`]: how an agent or a connector reaches the gateway (transport, TLS, handshake).
//! - [`agent_line`]: the `burrow agent ...` line a gateway prints for its generated key.
//! - [`limiter`]: bounded-memory rate limiting of failed authentication per source address.
//! - [`stats`]: counters of what the gateway served and refused.
//! - [`admin`]: the admin server: Prometheus metrics, the status as JSON, a status page.

pub mod admin;
pub mod agent;
pub mod agent_line;
pub mod config;
pub mod connector;
pub mod dial;
pub mod gateway;
mod gather;
pub mod leases;
pub mod limiter;
pub mod paths;
pub mod proxy_protocol;
pub mod relay;
pub mod session;
pub mod state;
pub mod stats;
pub mod tls;
pub mod tokens;
pub mod transport;
pub mod udp;

pub use burrow_proto as proto;
