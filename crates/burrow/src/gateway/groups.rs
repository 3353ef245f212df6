//! Groups: one public port shared by the sessions of several agents, and how its clients are
//! spread over them.
//!
//! Every public port has one [`Routes`]: the sessions that route it now (its members) and the
//! agents' port entries that hold it. A port outside any group has at most one member. A
//! group's port is held by each member's entry; it stays bound while any entry holds it (a
//! member routes it, or its lease has not run out), and its listener closes with the last.
//!
//! A new TCP client goes to the live member with the fewest streams open through this port,
//! ties in turn (round robin). A UDP flow stays with the member that carries it while both
//! live (a member joining takes no flow that has begun); a new flow goes to the member its
//! client address picks (rendezvous hashing over the members' agent names), so a client comes
//! back to the same member; when a member leaves, only its flows move.

use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::Route;

/// Where a public port's clients go, and who holds the port.
pub(super) struct Routes {
    /// The group sharing the port, if it is a group's.
    pub(super) group: Option<String>,
    members: Vec<Member>,
    /// Where the round robin among equally loaded members goes on.
    next: usize,
    /// Agents' port entries holding the port (routing it or on lease); the listener closes
    /// when the last lets go.
    holders: usize,
}

/// A session routing a port.
#[derive(Clone)]
pub(super) struct Member {
    /// The agent's name.
    pub(super) agent: String,
    /// The session's generation.
    pub(super) generation: u64,
    pub(super) route: Route,
    /// The agent's public connections (`max_public_conns_per_agent`).
    pub(super) conns: Arc<Semaphore>,
    /// Closes this member's public connections through the port (its grant narrowed, its
    /// agent removed or its forward unbound); not cancelled at shutdown, where they drain.
    pub(super) close: CancellationToken,
    /// Streams open through this port to this member.
    active: Arc<AtomicUsize>,
}

impl Member {
    pub(super) fn new(agent: &str, generation: u64, route: Route, conns: Arc<Semaphore>) -> Self {
        Member {
            agent: agent.to_string(),
            generation,
            route,
            conns,
            close: CancellationToken::new(),
            active: Arc::default(),
        }
    }
}

/// One stream counted against its member until dropped.
pub(super) struct Active(Arc<AtomicUsize>);

impl Drop for Active {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Routes {
    /// A port held by one entry, routed by nobody yet.
    pub(super) fn new(group: Option<String>) -> Routes {
        Routes {
            group,
            members: Vec::new(),
            next: 0,
            holders: 1,
        }
    }

    /// Another agent's entry holds the port too.
    pub(super) fn hold(&mut self) {
        self.holders += 1;
    }

    /// Whether entries of other agents hold the port too (members of its group).
    pub(super) fn shared(&self) -> bool {
        self.holders > 1
    }

    /// An entry lets go of the port: true when it was the last (close the listener).
    pub(super) fn release(&mut self) -> bool {
        self.holders = self.holders.saturating_sub(1);
        self.holders == 0
    }

    /// `member` routes the port, in place of any earlier session of its agent.
    pub(super) fn join(&mut self, member: Member) {
        match self.members.iter_mut().find(|m| m.agent == member.agent) {
            Some(m) => *m = member,
            None => self.members.push(member),
        }
    }

    /// Session `generation` of `agent` routes the port no more.
    pub(super) fn leave(&mut self, agent: &str, generation: u64) {
        self.members
            .retain(|m| !(m.agent == agent && m.generation == generation));
    }

    /// Takes `agent`'s member out (whichever its session), to close what it carries.
    pub(super) fn take(&mut self, agent: &str) -> Option<Member> {
        let i = self.members.iter().position(|m| m.agent == agent)?;
        Some(self.members.remove(i))
    }

    /// The member of `agent`, if one of its sessions routes the port.
    pub(super) fn member(&self, agent: &str) -> Option<&Member> {
        self.members.iter().find(|m| m.agent == agent)
    }

    /// Sessions routing the port now.
    pub(super) fn len(&self) -> usize {
        self.members.len()
    }

    /// The members' agents, for messages.
    pub(super) fn agents(&self) -> Vec<String> {
        self.members.iter().map(|m| m.agent.clone()).collect()
    }

    /// The member a new TCP client goes to: of the live ones, one with the fewest streams
    /// open through this port, ties in turn. The stream counts until the [`Active`] drops.
    pub(super) fn pick(&mut self) -> Option<(Member, Active)> {
        let live = |m: &Member| !m.route.session.is_closed();
        let fewest = self
            .members
            .iter()
            .filter(|m| live(m))
            .map(|m| m.active.load(Ordering::Relaxed))
            .min()?;
        let n = self.members.len();
        let i = (0..n).map(|k| (self.next + k) % n).find(|&i| {
            let m = &self.members[i];
            live(m) && m.active.load(Ordering::Relaxed) == fewest
        })?;
        self.next = i + 1;
        let m = self.members[i].clone();
        m.active.fetch_add(1, Ordering::Relaxed);
        let active = Active(m.active.clone());
        Some((m, active))
    }

    /// The member a UDP client's datagrams go to: the live one that carries the client's
    /// open flow, if one does (a member joining does not take flows that have begun);
    /// otherwise, for a new flow, the live member whose agent name hashes highest with the
    /// client's address, so the same client comes back to the same member.
    pub(super) fn pin(&self, client: SocketAddr) -> Option<&Member> {
        let live = || self.members.iter().filter(|m| !m.route.session.is_closed());
        if let Some(m) =
            live().find(|m| super::lock(&m.route.flows).has_flow(m.route.service, client))
        {
            return Some(m);
        }
        live().max_by_key(|m| {
            // Fixed keys: the same choice for the same client every time.
            let mut h = std::hash::DefaultHasher::new();
            m.agent.hash(&mut h);
            client.hash(&mut h);
            h.finish()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burrow_proto::message::SessionParams;
    use burrow_proto::mux::Side;

    /// A session over an in-memory pipe whose other end stays open (kept in the returned
    /// list).
    fn session(keep: &mut Vec<tokio::io::DuplexStream>) -> crate::session::Session {
        let (a, b) = tokio::io::duplex(1 << 16);
        keep.push(b);
        let started = crate::session::start(
            Box::new(a),
            bytes::BytesMut::new(),
            Side::Gateway,
            SessionParams::default(),
            "test".into(),
        );
        started.session
    }

    fn member(agent: &str, session: crate::session::Session) -> Member {
        let route = Route {
            session,
            service: 0,
            name: "svc".into(),
            flows: Arc::default(),
        };
        Member::new(agent, 1, route, Arc::new(Semaphore::new(10)))
    }

    #[tokio::test]
    async fn fewest_streams_then_round_robin_and_closed_sessions_skipped() {
        let mut keep = Vec::new();
        let mut r = Routes::new(Some("web".into()));
        for a in ["a", "b", "c"] {
            r.join(member(a, session(&mut keep)));
        }
        // All idle: in turn.
        let mut held = Vec::new();
        let mut order = Vec::new();
        for _ in 0..3 {
            let (m, active) = r.pick().unwrap();
            order.push(m.agent);
            held.push(active);
        }
        assert_eq!(order, ["a", "b", "c"]);
        // `a` and `b` finish their streams: the next two go to them, not to busy `c`.
        held.remove(0);
        held.remove(0);
        let (m1, _x) = r.pick().unwrap();
        let (m2, _y) = r.pick().unwrap();
        let mut two = [m1.agent, m2.agent];
        two.sort();
        assert_eq!(two, ["a", "b"]);
        // A closed session is passed over at once, before its end is handled.
        let closed = r.members.iter().find(|m| m.agent == "a").unwrap();
        closed
            .route
            .session
            .close(burrow_proto::ErrorCode::Normal, "gone");
        for _ in 0..6 {
            let (m, _) = r.pick().unwrap();
            assert_ne!(m.agent, "a");
        }
        // Leaving is by session: a newer session of `b` is not removed by the older's end.
        r.join(Member {
            generation: 2,
            ..member("b", session(&mut keep))
        });
        r.leave("b", 1);
        assert_eq!(r.len(), 3);
        r.leave("b", 2);
        assert_eq!(r.agents(), ["a", "c"]);
    }

    #[tokio::test]
    async fn udp_clients_stay_with_their_member() {
        let mut keep = Vec::new();
        let mut r = Routes::new(Some("dns".into()));
        for a in ["a", "b", "c"] {
            r.join(member(a, session(&mut keep)));
        }
        let clients: Vec<SocketAddr> = (0..300u16)
            .map(|p| SocketAddr::from(([192, 0, 2, (p % 200) as u8], 1000 + p)))
            .collect();
        let first: Vec<String> = clients
            .iter()
            .map(|c| r.pin(*c).unwrap().agent.clone())
            .collect();
        // Stable, and spread.
        for (c, a) in clients.iter().zip(&first) {
            assert_eq!(&r.pin(*c).unwrap().agent, a);
        }
        for a in ["a", "b", "c"] {
            let n = first.iter().filter(|x| *x == a).count();
            assert!((50..=150).contains(&n), "{a}: {n} of 300");
        }
        // `b` leaves: only its clients move; it returns: they come back.
        r.leave("b", 1);
        for (c, a) in clients.iter().zip(&first) {
            let now = &r.pin(*c).unwrap().agent;
            if a != "b" {
                assert_eq!(now, a);
            } else {
                assert_ne!(now, "b");
            }
        }
        r.join(member("b", session(&mut keep)));
        for (c, a) in clients.iter().zip(&first) {
            assert_eq!(&r.pin(*c).unwrap().agent, a);
        }
        // Holders: the listener closes with the last.
        r.hold();
        assert!(!r.release());
        assert!(r.release());
    }
}
