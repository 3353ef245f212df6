//! What sources may hold of the gateway, in bounded memory: failed authentication per source
//! address and key ([`AuthLimiter`]), the slots of connections still in their handshake
//! ([`PreauthTable`]), and the process's open-file limit ([`raise_open_files`]).
//!
//! Failed handshakes are charged to their source address *and* the key hash it presented, so
//! one failing agent does not lock out the other agents behind the same address (a NAT, a
//! host running several containers). Every key the gateway knows has a budget of its own per
//! source; unknown key hashes, and failures before any key is presented (TLS, protocol,
//! timeouts), share one more budget per source. A source past that budget is still taken
//! through TLS and told, inside the session, that it is rate-limited and when to retry
//! ([`AuthLimiter::check`]); a valid proof of a known key is never refused for it. Only a
//! source failing far more often than any budget allows (a flood) is cut before TLS, where
//! it costs least ([`AuthLimiter::admit`]).
//!
//! IPv6 sources are grouped by /64, since one host usually owns a whole /64 and could
//! otherwise rotate addresses. Each table holds at most `max_entries` entries; when full, the
//! entry idle longest is evicted, so a flood from many addresses costs bounded memory (and at
//! worst forgets some offenders early).

use std::cmp::Reverse;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use burrow_proto::auth::KeyHash;

/// Defaults: 5 failures at once per source and key, one more every 10 s; 4096 entries
/// tracked per table.
pub const DEFAULT_BURST: u32 = 5;
/// See [`DEFAULT_BURST`].
pub const DEFAULT_REFILL: Duration = Duration::from_secs(10);
/// See [`DEFAULT_BURST`].
pub const DEFAULT_MAX_ENTRIES: usize = 4096;
/// Failed or refused attempts a source may make at once, whatever keys it presents, before
/// its connections are cut before TLS: twenty times the per-key budget, so only a flood gets
/// there.
pub const DEFAULT_SOURCE_BURST: u32 = 100;
/// The source budget refills one attempt per second: ten times the per-key rate.
pub const DEFAULT_SOURCE_REFILL: Duration = Duration::from_secs(1);

/// A token bucket.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn full(burst: u32, now: Instant) -> Bucket {
        Bucket {
            tokens: f64::from(burst),
            last: now,
        }
    }

    /// The bucket as it stands at `now`.
    fn refreshed(self, burst: u32, refill: Duration, now: Instant) -> Bucket {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        let gained = dt / refill.as_secs_f64().max(1e-9);
        Bucket {
            tokens: (self.tokens + gained).min(f64::from(burst)),
            last: now,
        }
    }

    fn take(&mut self) {
        self.tokens = (self.tokens - 1.0).max(0.0);
    }

    /// How long until a whole token is back.
    fn wait(&self, refill: Duration) -> Duration {
        refill.mul_f64((1.0 - self.tokens).clamp(0.0, 1.0))
    }
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    bucket: Bucket,
    /// A refusal has been reported for it since it last had its whole budget.
    warned: bool,
}

/// What a source presented: a key the gateway knows, or anything else (an unknown key hash,
/// or no key yet: TLS and protocol failures, timeouts).
type Class = Option<KeyHash>;

/// Whether a new tunnel connection may go on to TLS, from [`AuthLimiter::admit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Go on.
    Allowed,
    /// Cut it.
    Cut {
        /// Whether this is the first cut since the source's budget was last whole: the one
        /// worth a warning.
        first: bool,
    },
}

/// The failure budget tables.
#[derive(Debug)]
pub struct AuthLimiter {
    /// Per source and key class.
    keys: HashMap<(IpAddr, Class), Entry>,
    /// Per source, every attempt that failed or was refused.
    sources: HashMap<IpAddr, Entry>,
    max_entries: usize,
    burst: u32,
    refill: Duration,
    source_burst: u32,
    source_refill: Duration,
}

impl Default for AuthLimiter {
    fn default() -> Self {
        AuthLimiter::new(DEFAULT_BURST, DEFAULT_REFILL, DEFAULT_MAX_ENTRIES)
            .with_source_budget(DEFAULT_SOURCE_BURST, DEFAULT_SOURCE_REFILL)
    }
}

/// The source a limit charges: the address itself for IPv4 (and IPv4-mapped IPv6), its /64
/// for IPv6.
pub fn source_of(ip: IpAddr) -> IpAddr {
    key(ip)
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

/// Inserts `entry` under `k`, first evicting the entry idle longest when `map` is full.
fn insert_bounded<K: std::hash::Hash + Eq + Copy>(
    map: &mut HashMap<K, Entry>,
    max: usize,
    k: K,
    entry: Entry,
) {
    if !map.contains_key(&k) && map.len() >= max {
        if let Some(oldest) = map
            .iter()
            .min_by_key(|(_, e)| e.bucket.last)
            .map(|(k, _)| *k)
        {
            map.remove(&oldest);
        }
    }
    map.insert(k, entry);
}

impl AuthLimiter {
    /// A limiter allowing `burst` failures per source and key, refilling one per `refill`,
    /// tracking at most `max_entries` in each table. The source budget is twenty times the
    /// burst, refilling ten times as fast (see [`AuthLimiter::with_source_budget`]).
    pub fn new(burst: u32, refill: Duration, max_entries: usize) -> Self {
        let burst = burst.max(1);
        AuthLimiter {
            keys: HashMap::new(),
            sources: HashMap::new(),
            max_entries: max_entries.max(1),
            burst,
            refill,
            source_burst: burst.saturating_mul(20),
            source_refill: refill / 10,
        }
    }

    /// Sets the source budget: `burst` failed or refused attempts at once, whatever the keys,
    /// one more per `refill`; past it, connections are cut before TLS.
    pub fn with_source_budget(mut self, burst: u32, refill: Duration) -> Self {
        self.source_burst = burst.max(1);
        self.source_refill = refill;
        self
    }

    fn key_entry(&self, k: &(IpAddr, Class), now: Instant) -> Option<Entry> {
        self.keys.get(k).map(|e| Entry {
            bucket: e.bucket.refreshed(self.burst, self.refill, now),
            warned: e.warned,
        })
    }

    fn source_entry(&self, src: IpAddr, now: Instant) -> Option<Entry> {
        self.sources.get(&src).map(|e| Entry {
            bucket: e
                .bucket
                .refreshed(self.source_burst, self.source_refill, now),
            warned: e.warned,
        })
    }

    /// Whether a new connection from `ip` may go on to TLS: cut only when its source is past
    /// the source budget (a flood).
    pub fn admit(&mut self, ip: IpAddr, now: Instant) -> Admit {
        let src = key(ip);
        let Some(mut e) = self.source_entry(src, now) else {
            return Admit::Allowed;
        };
        if e.bucket.tokens >= 1.0 {
            if e.bucket.tokens >= f64::from(self.source_burst) {
                // Whole again: nothing to remember (a later flood is worth a warning again).
                self.sources.remove(&src);
            }
            return Admit::Allowed;
        }
        let first = !e.warned;
        e.warned = true;
        // A cut costs the source too, so a flood stays cut while it goes on.
        e.bucket.take();
        self.sources.insert(src, e);
        Admit::Cut { first }
    }

    /// Whether `ip` may try again with `presented` (a known key's hash, or `None` for an
    /// unknown key or none yet): `None` if so, else how long until it may.
    pub fn check(&self, ip: IpAddr, presented: Option<&KeyHash>, now: Instant) -> Option<Duration> {
        let e = self.key_entry(&(key(ip), presented.copied()), now)?;
        (e.bucket.tokens < 1.0).then(|| e.bucket.wait(self.refill))
    }

    /// Records a failed attempt from `ip` with `presented`: charged to the source and key,
    /// and to the source as a whole. Returns whether it is worth a warning: while the budget
    /// lasts, and once more when it has run out; the rest is noise from a source already
    /// reported.
    pub fn failure(&mut self, ip: IpAddr, presented: Option<&KeyHash>, now: Instant) -> bool {
        let (within, e) = self.charge(ip, presented, now);
        let first = !e.warned;
        if !within {
            e.warned = true;
        }
        within || first
    }

    /// Records an attempt refused for being over budget (charged as a failure). Returns
    /// whether it is the first refusal of this source and key since their budget was last
    /// whole: the one worth a warning.
    pub fn refused(&mut self, ip: IpAddr, presented: Option<&KeyHash>, now: Instant) -> bool {
        let (_, e) = self.charge(ip, presented, now);
        let first = !e.warned;
        e.warned = true;
        first
    }

    /// Charges one failure; says whether the budget had room for it.
    fn charge(
        &mut self,
        ip: IpAddr,
        presented: Option<&KeyHash>,
        now: Instant,
    ) -> (bool, &mut Entry) {
        let src = key(ip);
        let mut s = self.source_entry(src, now).unwrap_or(Entry {
            bucket: Bucket::full(self.source_burst, now),
            warned: false,
        });
        s.bucket.take();
        insert_bounded(&mut self.sources, self.max_entries, src, s);
        let k = (src, presented.copied());
        let mut e = self.key_entry(&k, now).unwrap_or(Entry {
            bucket: Bucket::full(self.burst, now),
            warned: false,
        });
        if e.bucket.tokens >= f64::from(self.burst) {
            // Whole again since the last refusal: the next one is worth a warning again.
            e.warned = false;
        }
        let within = e.bucket.tokens >= 1.0;
        e.bucket.take();
        insert_bounded(&mut self.keys, self.max_entries, k, e);
        (within, self.keys.entry(k).or_insert(e))
    }

    /// Forgets the failures of `ip` with key `hash` after it authenticated. Other keys from
    /// the same source, and the source's own budget, keep theirs.
    pub fn success(&mut self, ip: IpAddr, hash: &KeyHash) {
        self.keys.remove(&(key(ip), Some(*hash)));
    }

    /// Entries tracked now (source and key entries together).
    pub fn len(&self) -> usize {
        self.keys.len() + self.sources.len()
    }

    /// Whether nothing is tracked.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty() && self.sources.is_empty()
    }
}

// ---------------------------------------------------------------------------------------------
// Pre-auth slots.

/// How far a tunnel connection has come in its handshake. Further along is costlier to fake
/// and closer to done, so a connection that has come further never gives way to a new one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stage {
    /// Connected; not a byte received yet.
    Silent,
    /// Bytes arrived: TLS is under way.
    Talking,
    /// TLS is done: authentication is under way.
    Secured,
}

/// Why a new tunnel connection got no slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Its source already holds `max_per_source` slots.
    Source,
    /// Every slot is taken by a connection that has made progress.
    Full,
}

/// A slot given to a new connection.
#[derive(Debug)]
pub struct Admitted<T> {
    /// The slot, for [`PreauthTable::advance`] and [`PreauthTable::remove`].
    pub id: u64,
    /// The handle of the connection that gave way to this one, if the table was full: close it.
    pub evicted: Option<T>,
}

#[derive(Debug)]
struct Slot<T> {
    source: IpAddr,
    stage: Stage,
    handle: T,
}

/// The slots of tunnel connections that have not authenticated yet, at most `max` in all and
/// at most `max_per_source` per source (IPv6 by /64).
///
/// When every slot is taken, a new connection takes the slot of a [`Stage::Silent`] one: of
/// the source holding the most slots, its oldest. An attacker holding idle connections thus
/// makes room for everyone else, and first among its own; a legitimate agent, which sends
/// its TLS hello at once, is past `Silent` before it could be chosen. Ids grow with arrival,
/// so no clock is needed. `T` is what the caller needs to close a connection (a
/// cancellation token).
#[derive(Debug)]
pub struct PreauthTable<T> {
    slots: HashMap<u64, Slot<T>>,
    per_source: HashMap<IpAddr, u32>,
    next_id: u64,
    max: usize,
    max_per_source: Option<u32>,
}

impl<T> PreauthTable<T> {
    /// A table of `max` slots, `max_per_source` per source (`None`: no per-source cap).
    pub fn new(max: usize, max_per_source: Option<u32>) -> Self {
        PreauthTable {
            slots: HashMap::new(),
            per_source: HashMap::new(),
            next_id: 0,
            max: max.max(1),
            max_per_source: max_per_source.map(|m| m.max(1)),
        }
    }

    /// Gives a connection from `ip` a slot, or says why not.
    pub fn admit(&mut self, ip: IpAddr, handle: T) -> Result<Admitted<T>, Refusal> {
        self.admit_from(ip, handle, true)
    }

    /// As [`PreauthTable::admit`]; with `capped` false the per-source cap does not apply (a
    /// listener behind a proxy, whose connections all come from the proxy's address).
    pub fn admit_from(
        &mut self,
        ip: IpAddr,
        handle: T,
        capped: bool,
    ) -> Result<Admitted<T>, Refusal> {
        let source = key(ip);
        if let (Some(cap), true) = (self.max_per_source, capped) {
            if self.held(ip) >= cap {
                return Err(Refusal::Source);
            }
        }
        let mut evicted = None;
        if self.slots.len() >= self.max {
            let victim = self
                .slots
                .iter()
                .filter(|(_, s)| s.stage == Stage::Silent)
                .min_by_key(|(id, s)| {
                    let held = self.per_source.get(&s.source).copied().unwrap_or(0);
                    (Reverse(held), **id)
                })
                .map(|(id, _)| *id);
            match victim.and_then(|v| self.remove(v)) {
                Some(handle) => evicted = Some(handle),
                None => return Err(Refusal::Full),
            }
        }
        let id = self.next_id;
        self.next_id += 1;
        self.slots.insert(
            id,
            Slot {
                source,
                stage: Stage::Silent,
                handle,
            },
        );
        *self.per_source.entry(source).or_insert(0) += 1;
        Ok(Admitted { id, evicted })
    }

    /// Records that slot `id` reached `stage` (a slot never goes back).
    pub fn advance(&mut self, id: u64, stage: Stage) {
        if let Some(s) = self.slots.get_mut(&id) {
            s.stage = s.stage.max(stage);
        }
    }

    /// Frees slot `id`; returns its handle if it was still held.
    pub fn remove(&mut self, id: u64) -> Option<T> {
        let slot = self.slots.remove(&id)?;
        if let Some(n) = self.per_source.get_mut(&slot.source) {
            *n -= 1;
            if *n == 0 {
                self.per_source.remove(&slot.source);
            }
        }
        Some(slot.handle)
    }

    /// Slots held now.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether no slot is held.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Slots held by the source of `ip`.
    pub fn held(&self, ip: IpAddr) -> u32 {
        self.per_source.get(&key(ip)).copied().unwrap_or(0)
    }
}

// ---------------------------------------------------------------------------------------------
// Descriptors.

/// Descriptors kept for the tunnel port beyond the unauthenticated connections and sessions:
/// the runtime, the log, a listener being replaced, and the accept that is refused.
pub const RESERVE_MARGIN: u64 = 32;

/// Descriptors per agent that public connections leave to public listeners, so an agent
/// that logs in while public clients use every other descriptor still gets its ports.
pub const PORT_RESERVE_PER_AGENT: u64 = 8;

/// The open-file limit (`RLIMIT_NOFILE`) before and after [`raise_open_files`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenFiles {
    /// The soft limit at start.
    pub was: u64,
    /// The soft limit now: the number of descriptors the process may hold.
    pub soft: u64,
    /// The hard limit (`u64::MAX`: unlimited).
    pub hard: u64,
    /// Why raising failed, if it did.
    pub error: Option<String>,
}

/// Raises the soft open-file limit to the hard limit: every public connection and every
/// tunnel connection holds a descriptor, and the usual soft limit of 1024 is far below what a
/// gateway serves.
pub fn raise_open_files() -> OpenFiles {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let before = getrlimit(Resource::Nofile);
    let was = before.current.unwrap_or(u64::MAX);
    let hard = before.maximum.unwrap_or(u64::MAX);
    let mut error = None;
    if was < hard {
        let mut want = before;
        // Linux refuses an unlimited RLIMIT_NOFILE; its ceiling is fs.nr_open (1 Mi by default).
        want.current = Some(before.maximum.unwrap_or(1 << 20));
        if let Err(e) = setrlimit(Resource::Nofile, want) {
            error = Some(std::io::Error::from(e).to_string());
        }
    }
    let soft = getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX);
    OpenFiles {
        was,
        soft,
        hard,
        error,
    }
}

/// Descriptors this process holds now (from `/proc/self/fd`), if the system says.
pub fn open_descriptors() -> Option<u64> {
    let dir = std::fs::read_dir("/proc/self/fd")
        .or_else(|_| std::fs::read_dir("/dev/fd"))
        .ok()?;
    // The directory being read holds one itself.
    Some((dir.count() as u64).saturating_sub(1))
}

/// How the open-file limit is shared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shares {
    /// For public listeners and public connections together.
    pub public: u64,
    /// Of `public`, what public connections leave to listeners.
    pub ports: u64,
    /// Kept for the tunnel port: never used by anything public.
    pub tunnel: u64,
}

/// Shares out the open-file limit `limit` of a process holding `in_use` descriptors, for a
/// gateway with `max_preauth` pre-auth slots and `agents` agents.
///
/// The tunnel port keeps one descriptor for every unauthenticated connection it admits, two
/// per agent (a live session and one being replaced) and [`RESERVE_MARGIN`], but at most half
/// the limit. Public listeners and public connections share the rest; connections leave
/// [`PORT_RESERVE_PER_AGENT`] per agent (at most a quarter of it) to listeners.
pub fn share_descriptors(limit: u64, in_use: u64, max_preauth: u32, agents: usize) -> Shares {
    let agents = agents as u64;
    let tunnel = (u64::from(max_preauth) + 2 * agents + RESERVE_MARGIN).min(limit / 2);
    let public = limit.saturating_sub(in_use).saturating_sub(tunnel);
    let ports = (PORT_RESERVE_PER_AGENT * agents).min(public / 4);
    Shares {
        public,
        ports,
        tunnel,
    }
}

/// A count of descriptors in use against a total, taken one at a time.
#[derive(Debug)]
pub struct FdBudget {
    total: u64,
    used: AtomicU64,
}

/// One descriptor of an [`FdBudget`], given back when dropped.
#[derive(Debug)]
pub struct FdPermit(Arc<FdBudget>);

impl FdBudget {
    /// A budget of `total` descriptors.
    pub fn new(total: u64) -> Arc<FdBudget> {
        Arc::new(FdBudget {
            total,
            used: AtomicU64::new(0),
        })
    }

    /// One descriptor, if taking it leaves at least `keep` of the total unused.
    pub fn try_take(self: &Arc<Self>, keep: u64) -> Option<FdPermit> {
        let max = self.total.saturating_sub(keep);
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                (u < max).then_some(u + 1)
            })
            .ok()
            .map(|_| FdPermit(self.clone()))
    }

    /// Descriptors taken now.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Acquire)
    }
}

impl Drop for FdPermit {
    fn drop(&mut self) {
        self.0.used.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_runs_out_and_refills_per_source_and_key() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut l = AuthLimiter::new(3, s(10), 10);
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let known = KeyHash([7; 32]);
        for _ in 0..3 {
            assert_eq!(l.check(ip, None, t0), None);
            assert!(
                l.failure(ip, None, t0),
                "within the budget: worth a warning"
            );
        }
        // Unknown keys from this source are refused now, and told when to retry.
        assert_eq!(l.check(ip, None, t0), Some(s(10)));
        assert!(
            l.refused(ip, None, t0),
            "the first refusal is worth a warning"
        );
        assert_eq!(l.check(ip, None, t0 + s(4)), Some(s(6)));
        assert!(!l.refused(ip, None, t0 + s(4)), "later ones are not");
        // Nor are failures past the budget, once reported.
        assert!(!l.failure(ip, None, t0 + s(4)));
        // A known key from the same address is not refused.
        assert_eq!(l.check(ip, Some(&known), t0), None);
        // Nor is the address cut before TLS: its source budget is far larger.
        assert_eq!(l.admit(ip, t0), Admit::Allowed);
        assert_eq!(l.check(ip, None, t0 + s(14)), None);
        // Once the budget is whole again, the first failure past it warns again, and then
        // nothing more.
        for i in 0..5 {
            assert_eq!(l.failure(ip, None, t0 + s(60)), i < 4, "failure {i}");
        }
        assert!(l.check(ip, None, t0 + s(60)).is_some());
        assert!(!l.refused(ip, None, t0 + s(60)));
        // A success forgets that key's failures only.
        l.failure(ip, Some(&known), t0);
        l.success(ip, &known);
        assert!(l.keys.contains_key(&(ip, None)));
        assert!(!l.keys.contains_key(&(ip, Some(known))));
    }

    #[test]
    fn only_a_flood_is_cut_before_tls() {
        let t0 = Instant::now();
        let mut l = AuthLimiter::new(5, Duration::from_secs(10), 10)
            .with_source_budget(20, Duration::from_secs(1));
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        for _ in 0..20 {
            assert_eq!(l.admit(ip, t0), Admit::Allowed);
            l.failure(ip, None, t0);
        }
        assert_eq!(l.admit(ip, t0), Admit::Cut { first: true });
        assert_eq!(l.admit(ip, t0), Admit::Cut { first: false });
        // The cuts are charged too: the source must stay quiet to get a token back.
        assert_eq!(
            l.admit(ip, t0 + Duration::from_millis(500)),
            Admit::Cut { first: false }
        );
        assert_eq!(l.admit(ip, t0 + Duration::from_secs(2)), Admit::Allowed);
        // Another address is not affected.
        assert_eq!(l.admit("192.0.2.2".parse().unwrap(), t0), Admit::Allowed);
    }

    #[test]
    fn memory_is_bounded_and_v6_grouped_by_64() {
        let t0 = Instant::now();
        let mut l = AuthLimiter::new(1, Duration::from_secs(60), 100);
        for i in 0..10_000u32 {
            let ip = IpAddr::V4(std::net::Ipv4Addr::from(i));
            let hash = KeyHash([(i % 251) as u8; 32]);
            l.failure(ip, Some(&hash), t0 + Duration::from_millis(u64::from(i)));
        }
        assert_eq!(l.len(), 200, "100 key entries and 100 sources");
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2::ffff".parse().unwrap();
        let mut l = AuthLimiter::new(1, Duration::from_secs(60), 100);
        l.failure(a, None, t0);
        assert!(l.check(b, None, t0).is_some());
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn preauth_caps_each_source() {
        let mut t = PreauthTable::new(100, Some(2));
        assert!(t.admit(ip("192.0.2.1"), ()).is_ok());
        assert!(t.admit(ip("192.0.2.1"), ()).is_ok());
        assert_eq!(t.admit(ip("192.0.2.1"), ()).unwrap_err(), Refusal::Source);
        assert!(t.admit(ip("192.0.2.2"), ()).is_ok());
        // One /64 is one source.
        assert!(t.admit(ip("2001:db8:1:2::1"), ()).is_ok());
        assert!(t.admit(ip("2001:db8:1:2::2"), ()).is_ok());
        assert_eq!(
            t.admit(ip("2001:db8:1:2::3"), ()).unwrap_err(),
            Refusal::Source
        );
        assert_eq!(t.held(ip("2001:db8:1:2::ffff")), 2);
        let mut open = PreauthTable::new(100, None);
        for _ in 0..50 {
            assert!(open.admit(ip("192.0.2.1"), ()).is_ok());
        }
    }

    #[test]
    fn full_table_evicts_a_silent_slot_of_the_busiest_source_oldest_first() {
        let mut t = PreauthTable::new(4, Some(3));
        let a0 = t.admit(ip("192.0.2.1"), "a0").unwrap().id;
        let _a1 = t.admit(ip("192.0.2.1"), "a1").unwrap();
        let legit = t.admit(ip("192.0.2.9"), "legit").unwrap().id;
        let _b0 = t.admit(ip("192.0.2.2"), "b0").unwrap();
        // Full: the busiest source (192.0.2.1, two slots) gives way, oldest first.
        let next = t.admit(ip("192.0.2.3"), "c0").unwrap();
        assert_eq!(next.evicted, Some("a0"));
        assert!(t.remove(a0).is_none(), "the evicted slot is gone");
        assert_eq!(t.len(), 4);
        // Now every source holds one: the oldest silent one goes, and that is the legit
        // agent's only if it is still silent.
        t.advance(legit, Stage::Talking);
        let next = t.admit(ip("192.0.2.4"), "d0").unwrap();
        assert_eq!(next.evicted, Some("a1"));
        // Nobody silent: refused.
        let mut busy = PreauthTable::new(2, None);
        let x = busy.admit(ip("192.0.2.1"), ()).unwrap().id;
        let y = busy.admit(ip("192.0.2.2"), ()).unwrap().id;
        busy.advance(x, Stage::Talking);
        busy.advance(y, Stage::Secured);
        busy.advance(y, Stage::Silent);
        assert_eq!(busy.admit(ip("192.0.2.3"), ()).unwrap_err(), Refusal::Full);
        assert!(busy.remove(x).is_some());
        assert!(busy.admit(ip("192.0.2.3"), ()).is_ok());
        assert_eq!(busy.held(ip("192.0.2.1")), 0);
    }

    #[test]
    fn descriptors_keep_a_reserve_for_the_tunnel_port() {
        let shares = |public, ports, tunnel| Shares {
            public,
            ports,
            tunnel,
        };
        // 1024 descriptors, 20 in use, 256 pre-auth slots and 2 agents.
        assert_eq!(
            share_descriptors(1024, 20, 256, 2),
            shares(1024 - 20 - 292, 16, 292)
        );
        // A small limit keeps at most half for the tunnel, a quarter of the rest for ports.
        assert_eq!(share_descriptors(256, 20, 256, 2), shares(108, 16, 128));
        assert_eq!(share_descriptors(256, 20, 256, 20), shares(108, 27, 128));
        assert_eq!(share_descriptors(10, 20, 256, 2), shares(0, 0, 5));

        let budget = FdBudget::new(3);
        let a = budget.try_take(1).unwrap();
        let b = budget.try_take(1).unwrap();
        assert!(budget.try_take(1).is_none(), "one is kept");
        let c = budget.try_take(0).unwrap();
        assert!(budget.try_take(0).is_none());
        drop((a, b));
        assert_eq!(budget.used(), 1);
        drop(c);
        assert_eq!(budget.used(), 0);
        let files = raise_open_files();
        assert!(files.soft >= files.was, "{files:?}");
        assert!(
            files.soft == files.hard || files.error.is_some(),
            "{files:?}"
        );
        assert!(open_descriptors().is_some_and(|n| n >= 3));
    }
}
