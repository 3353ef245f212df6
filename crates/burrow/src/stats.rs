//! Counters a gateway keeps about what it refused and why, for tests, logs and (later) metrics.

use std::sync::atomic::{AtomicU64, Ordering};

/// Monotonic counters, updated with relaxed atomics (they are statistics, not synchronisation).
#[derive(Debug, Default)]
pub struct GatewayStats {
    /// Agent sessions established.
    pub sessions: AtomicU64,
    /// Handshakes that failed (TLS, protocol, bad key) or timed out.
    pub handshake_failures: AtomicU64,
    /// Tunnel connections turned away for too many failed handshakes: refused inside TLS as
    /// rate-limited (their source and key over budget), or cut before TLS (a flood).
    pub rate_limited: AtomicU64,
    /// Tunnel connections dropped because every pre-auth slot was held by a connection that
    /// had made progress.
    pub preauth_refused: AtomicU64,
    /// Tunnel connections dropped because their source held `max_preauth_per_source` slots.
    pub preauth_source_refused: AtomicU64,
    /// Tunnel connections that had sent nothing, closed to make room for a newer one.
    pub preauth_evicted: AtomicU64,
    /// Sessions closed because the peer broke the protocol or a limit.
    pub protocol_errors: AtomicU64,
    /// Client streams relayed.
    pub streams: AtomicU64,
    /// Client connections refused because the session's stream limit was reached.
    pub streams_refused: AtomicU64,
    /// Client connections closed because the port's agent was not connected.
    pub no_session: AtomicU64,
    /// Client connections refused by `max_public_conns_per_agent`, `max_public_conns` or the
    /// descriptors kept for the tunnel port.
    pub public_refused: AtomicU64,
    /// Streams being relayed right now (a gauge).
    pub active_streams: AtomicU64,
    /// Agent sessions up right now (a gauge).
    pub active_sessions: AtomicU64,
}

/// A copy of the counters at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// See [`GatewayStats::sessions`].
    pub sessions: u64,
    /// See [`GatewayStats::handshake_failures`].
    pub handshake_failures: u64,
    /// See [`GatewayStats::rate_limited`].
    pub rate_limited: u64,
    /// See [`GatewayStats::preauth_refused`].
    pub preauth_refused: u64,
    /// See [`GatewayStats::preauth_source_refused`].
    pub preauth_source_refused: u64,
    /// See [`GatewayStats::preauth_evicted`].
    pub preauth_evicted: u64,
    /// See [`GatewayStats::protocol_errors`].
    pub protocol_errors: u64,
    /// See [`GatewayStats::streams`].
    pub streams: u64,
    /// See [`GatewayStats::streams_refused`].
    pub streams_refused: u64,
    /// See [`GatewayStats::no_session`].
    pub no_session: u64,
    /// See [`GatewayStats::public_refused`].
    pub public_refused: u64,
    /// See [`GatewayStats::active_streams`].
    pub active_streams: u64,
    /// See [`GatewayStats::active_sessions`].
    pub active_sessions: u64,
}

/// Adds one to a counter.
pub(crate) fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// Holds a gauge up by one while alive.
pub(crate) struct GaugeGuard<'a>(&'a AtomicU64);

impl<'a> GaugeGuard<'a> {
    pub(crate) fn new(g: &'a AtomicU64) -> Self {
        g.fetch_add(1, Ordering::Relaxed);
        GaugeGuard(g)
    }
}

impl Drop for GaugeGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl GatewayStats {
    /// Reads every counter.
    pub fn snapshot(&self) -> StatsSnapshot {
        let r = |c: &AtomicU64| c.load(Ordering::Relaxed);
        StatsSnapshot {
            sessions: r(&self.sessions),
            handshake_failures: r(&self.handshake_failures),
            rate_limited: r(&self.rate_limited),
            preauth_refused: r(&self.preauth_refused),
            preauth_source_refused: r(&self.preauth_source_refused),
            preauth_evicted: r(&self.preauth_evicted),
            protocol_errors: r(&self.protocol_errors),
            streams: r(&self.streams),
            streams_refused: r(&self.streams_refused),
            no_session: r(&self.no_session),
            public_refused: r(&self.public_refused),
            active_streams: r(&self.active_streams),
            active_sessions: r(&self.active_sessions),
        }
    }
}
