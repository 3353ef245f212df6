//! [`UdpFaultProxy`]: a UDP relay between agent and gateway (for QUIC) that drops a share of
//! the datagrams both ways, blackholes everything, or rebinds its upstream sockets (the
//! gateway then sees the agent's address change, as behind a NAT that rebinds) on command.
//!
//! Each client address gets its own upstream socket, so replies find their way back; at most
//! [`MAX_CLIENTS`] clients are relayed, and every task stops when the proxy is dropped.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

/// Most client addresses the proxy relays for; datagrams from more are dropped.
pub const MAX_CLIENTS: usize = 64;

/// Commands and counts shared with the relay tasks.
#[derive(Debug, Default)]
pub struct UdpFaultControl {
    /// Per mille of datagrams dropped, each way.
    loss_per_mille: AtomicU32,
    blackhole: AtomicBool,
    /// Bumped to make every client's upstream socket be replaced.
    epoch: AtomicU64,
    rng: AtomicU64,
    /// Datagrams relayed and dropped (both ways).
    pub relayed: AtomicU64,
    /// Datagrams dropped (loss or blackhole).
    pub dropped: AtomicU64,
    /// Upstream sockets made (one per client, and one more per client at each rebind).
    pub upstreams: AtomicU64,
}

impl UdpFaultControl {
    /// Drops `percent` % of datagrams in each direction (0 to stop).
    pub fn set_loss(&self, percent: f64) {
        let pm = (percent * 10.0).clamp(0.0, 1000.0) as u32;
        self.loss_per_mille.store(pm, Ordering::Relaxed);
    }

    /// Drops every datagram (`true`) or none of them for this reason (`false`).
    pub fn set_blackhole(&self, on: bool) {
        self.blackhole.store(on, Ordering::Relaxed);
    }

    /// Replaces every client's upstream socket with a new one (a new source port): the
    /// upstream sees each client move to another address.
    pub fn rebind(&self) {
        self.epoch.fetch_add(1, Ordering::Relaxed);
    }

    /// Whether to drop the next datagram.
    fn drop_now(&self) -> bool {
        if self.blackhole.load(Ordering::Relaxed) {
            return true;
        }
        let pm = self.loss_per_mille.load(Ordering::Relaxed);
        if pm == 0 {
            return false;
        }
        // xorshift64*: deterministic enough, no dependency.
        let mut x = self.rng.load(Ordering::Relaxed) | 1;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng.store(x, Ordering::Relaxed);
        (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 33) % 1000 < u64::from(pm)
    }

    fn pass(&self) -> bool {
        if self.drop_now() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            false
        } else {
            self.relayed.fetch_add(1, Ordering::Relaxed);
            true
        }
    }
}

/// A running UDP fault proxy.
pub struct UdpFaultProxy {
    addr: SocketAddr,
    control: Arc<UdpFaultControl>,
    stop: CancellationToken,
}

impl UdpFaultProxy {
    /// Relays datagrams arriving on `listen` (e.g. `127.0.0.1:0`) to `upstream`.
    pub async fn start(listen: SocketAddr, upstream: SocketAddr) -> std::io::Result<Self> {
        let front = Arc::new(UdpSocket::bind(listen).await?);
        let addr = front.local_addr()?;
        let control = Arc::new(UdpFaultControl {
            rng: AtomicU64::new(0x9e37_79b9_7f4a_7c15),
            ..UdpFaultControl::default()
        });
        let stop = CancellationToken::new();
        tokio::spawn(relay_front(front, upstream, control.clone(), stop.clone()));
        Ok(UdpFaultProxy {
            addr,
            control,
            stop,
        })
    }

    /// The address clients send to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its commands and counts.
    pub fn control(&self) -> &UdpFaultControl {
        &self.control
    }
}

impl Drop for UdpFaultProxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// One client's upstream socket and the epoch it was made in.
type Clients = Arc<Mutex<HashMap<SocketAddr, (Arc<UdpSocket>, u64, CancellationToken)>>>;

async fn relay_front(
    front: Arc<UdpSocket>,
    upstream: SocketAddr,
    control: Arc<UdpFaultControl>,
    stop: CancellationToken,
) {
    let clients: Clients = Arc::default();
    let mut buf = vec![0u8; 65_536];
    loop {
        let (n, from) = tokio::select! {
            _ = stop.cancelled() => break,
            r = front.recv_from(&mut buf) => match r {
                Ok(x) => x,
                Err(_) => continue,
            },
        };
        let epoch = control.epoch.load(Ordering::Relaxed);
        let existing = {
            let map = clients.lock().unwrap_or_else(|p| p.into_inner());
            map.get(&from).filter(|c| c.1 == epoch).map(|c| c.0.clone())
        };
        let sock = match existing {
            Some(s) => s,
            None => {
                let Ok(s) = UdpSocket::bind(("127.0.0.1", 0)).await else {
                    continue;
                };
                let s = Arc::new(s);
                control.upstreams.fetch_add(1, Ordering::Relaxed);
                let token = stop.child_token();
                let mut map = clients.lock().unwrap_or_else(|p| p.into_inner());
                if !map.contains_key(&from) && map.len() >= MAX_CLIENTS {
                    continue;
                }
                if let Some((_, _, old)) = map.insert(from, (s.clone(), epoch, token.clone())) {
                    old.cancel();
                }
                tokio::spawn(relay_back(
                    s.clone(),
                    front.clone(),
                    from,
                    control.clone(),
                    token,
                ));
                s
            }
        };
        if control.pass() {
            let _ = sock.send_to(&buf[..n], upstream).await;
        }
    }
}

async fn relay_back(
    sock: Arc<UdpSocket>,
    front: Arc<UdpSocket>,
    client: SocketAddr,
    control: Arc<UdpFaultControl>,
    stop: CancellationToken,
) {
    let mut buf = vec![0u8; 65_536];
    loop {
        let n = tokio::select! {
            _ = stop.cancelled() => return,
            r = sock.recv_from(&mut buf) => match r {
                Ok((n, _)) => n,
                Err(_) => continue,
            },
        };
        if control.pass() {
            let _ = front.send_to(&buf[..n], client).await;
        }
    }
}
