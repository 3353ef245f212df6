//! Rate limiting of failed authentication per source address, in bounded memory.
//!
//! Each source gets a small budget of failures that refills slowly; a source past its budget
//! is turned away before TLS. IPv6 sources are grouped by /64, since one host usually owns a
//! whole /64 and could otherwise rotate addresses. The table holds at most `max_entries`
//! sources; when full, the entry idle longest is evicted, so a flood from many addresses costs
//! bounded memory (and at worst forgets some offenders early).

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Defaults: 5 failures at once, one more every 10 s, 4096 sources tracked.
pub const DEFAULT_BURST: u32 = 5;
/// See [`DEFAULT_BURST`].
pub const DEFAULT_REFILL: Duration = Duration::from_secs(10);
/// See [`DEFAULT_BURST`].
pub const DEFAULT_MAX_ENTRIES: usize = 4096;

#[derive(Debug, Clone, Copy)]
struct Entry {
    tokens: f64,
    last: Instant,
}

/// The failure budget table.
#[derive(Debug)]
pub struct AuthLimiter {
    entries: HashMap<IpAddr, Entry>,
    max_entries: usize,
    burst: u32,
    refill: Duration,
}

impl Default for AuthLimiter {
    fn default() -> Self {
        AuthLimiter::new(DEFAULT_BURST, DEFAULT_REFILL, DEFAULT_MAX_ENTRIES)
    }
}

fn key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

impl AuthLimiter {
    /// A limiter allowing `burst` failures, refilling one per `refill`, tracking at most
    /// `max_entries` sources.
    pub fn new(burst: u32, refill: Duration, max_entries: usize) -> Self {
        AuthLimiter {
            entries: HashMap::new(),
            max_entries: max_entries.max(1),
            burst: burst.max(1),
            refill,
        }
    }

    fn refreshed(&self, e: Entry, now: Instant) -> Entry {
        let dt = now.saturating_duration_since(e.last).as_secs_f64();
        let gained = dt / self.refill.as_secs_f64().max(1e-9);
        Entry {
            tokens: (e.tokens + gained).min(f64::from(self.burst)),
            last: now,
        }
    }

    /// Whether `ip` may try now.
    pub fn allowed(&self, ip: IpAddr, now: Instant) -> bool {
        match self.entries.get(&key(ip)) {
            Some(e) => self.refreshed(*e, now).tokens >= 1.0,
            None => true,
        }
    }

    /// Records a failure from `ip`.
    pub fn failure(&mut self, ip: IpAddr, now: Instant) {
        let k = key(ip);
        let e = match self.entries.get(&k) {
            Some(e) => self.refreshed(*e, now),
            None => {
                if self.entries.len() >= self.max_entries {
                    self.evict();
                }
                Entry {
                    tokens: f64::from(self.burst),
                    last: now,
                }
            }
        };
        self.entries.insert(
            k,
            Entry {
                tokens: (e.tokens - 1.0).max(0.0),
                last: now,
            },
        );
    }

    /// Forgets `ip` after a success.
    pub fn success(&mut self, ip: IpAddr) {
        self.entries.remove(&key(ip));
    }

    /// Sources tracked now.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no source is tracked.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn evict(&mut self) {
        if let Some(oldest) = self
            .entries
            .iter()
            .min_by_key(|(_, e)| e.last)
            .map(|(k, _)| *k)
        {
            self.entries.remove(&oldest);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_runs_out_and_refills() {
        let t0 = Instant::now();
        let mut l = AuthLimiter::new(3, Duration::from_secs(10), 10);
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        for _ in 0..3 {
            assert!(l.allowed(ip, t0));
            l.failure(ip, t0);
        }
        assert!(!l.allowed(ip, t0));
        assert!(l.allowed(ip, t0 + Duration::from_secs(10)));
        l.success(ip);
        assert!(l.is_empty());
    }

    #[test]
    fn memory_is_bounded_and_v6_grouped_by_64() {
        let t0 = Instant::now();
        let mut l = AuthLimiter::new(1, Duration::from_secs(60), 100);
        for i in 0..10_000u32 {
            let ip = IpAddr::V4(std::net::Ipv4Addr::from(i));
            l.failure(ip, t0 + Duration::from_millis(u64::from(i)));
        }
        assert_eq!(l.len(), 100);
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2::ffff".parse().unwrap();
        let mut l = AuthLimiter::new(1, Duration::from_secs(60), 100);
        l.failure(a, t0);
        assert!(!l.allowed(b, t0));
    }
}
