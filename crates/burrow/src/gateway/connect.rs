//! Connectors at the gateway: their sessions, the private services agents announce, and each
//! connector stream checked against the connector's `reach` and joined to a stream of the
//! agent's session ([`crate::relay::streams`]).
//!
//! A connector's stream is refused here, before the agent hears of it, when what it names
//! is not in the connector's `reach` (`NotInReach`), its agent has no session
//! (`AgentUnavailable`), the agent announced no private service of that name
//! (`NoSuchService`), or the connector holds `max_streams` streams already
//! (`LimitExceeded`). The agent checks every stream that gets through once more itself.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use burrow_proto::auth::KeyHash;
use burrow_proto::connect::{Announce, Dial, DialTarget, DIAL_SERVICE};
use burrow_proto::message::{BindResult, Open, MAX_BINDS};
use burrow_proto::mux::Side;
use burrow_proto::{ErrorCode, Frame};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tracing::{debug, info, warn, Instrument};

use super::{lock, semaphore, Hub, LogThrottle};
use crate::config::{ConnectorGrant, TARGETS};
use crate::relay::streams;
use crate::session::{handshake, OpenError, Session, Stream};
use crate::stats::{bump, GaugeGuard};
use crate::transport;

/// What the gateway knows of connectors: their grants, what each holds, and the agents they
/// can reach.
pub(super) struct Connectors {
    /// The connectors in force: swapped whole by a reload ([`Connectors::reload`]).
    table: Mutex<Arc<Table>>,
    /// Agents with a session, by name.
    agents: Mutex<HashMap<String, AgentRoute>>,
    /// Live connector sessions, closed at shutdown or when their connector is removed or
    /// re-keyed; by a number of their own.
    sessions: Mutex<HashMap<u64, Live>>,
    next: std::sync::atomic::AtomicU64,
    /// Refused connector streams: one warning a second.
    refusals: Mutex<LogThrottle>,
}

/// The connectors of one config: by key, and the caps of each by name.
struct Table {
    grants: HashMap<KeyHash, Arc<ConnectorGrant>>,
    /// Per connector name: its session and stream caps.
    held: HashMap<String, Arc<Held>>,
}

/// A live connector session: whose, and its handle.
struct Live {
    name: String,
    key: KeyHash,
    session: Session,
}

/// The caps of one connector: sessions and streams at once.
struct Held {
    sessions: Arc<Semaphore>,
    streams: Arc<Semaphore>,
}

/// An agent's session and the private services it announced in it.
struct AgentRoute {
    generation: u64,
    session: Session,
    private: HashMap<String, u32>,
}

impl Table {
    /// The table for `grants`; an error names two connectors that share a key or a name.
    /// The caps of a connector whose caps did not change are `old`'s, so what its sessions
    /// and streams hold now still counts.
    fn new(grants: &[ConnectorGrant], old: Option<&Table>) -> Result<Table, String> {
        let mut by_key = HashMap::new();
        let mut held = HashMap::new();
        for g in grants {
            if let Some(prev) = by_key.insert(g.key.hash(), Arc::new(g.clone())) {
                return Err(format!(
                    "connectors `{}` and `{}` share the same key: give each connector its own (`burrow keygen`)",
                    prev.name, g.name
                ));
            }
            let kept = old.and_then(|t| {
                let was = t.grants.values().find(|w| w.name == g.name)?;
                (was.max_sessions == g.max_sessions && was.max_streams == g.max_streams)
                    .then(|| t.held.get(&g.name).cloned())
                    .flatten()
            });
            let caps = kept.unwrap_or_else(|| {
                Arc::new(Held {
                    sessions: Arc::new(semaphore(g.max_sessions)),
                    streams: Arc::new(semaphore(g.max_streams)),
                })
            });
            if held.insert(g.name.clone(), caps).is_some() {
                return Err(format!(
                    "two connectors are named `{}`: names must differ",
                    g.name
                ));
            }
        }
        Ok(Table {
            grants: by_key,
            held,
        })
    }
}

/// The connectors whose key is also an agent's, as lines for the log: such a key may act
/// as either.
pub(super) fn shared_keys(connectors: &[ConnectorGrant], agents: &super::Grants) -> Vec<String> {
    connectors
        .iter()
        .filter_map(|c| {
            agents.get(&c.key.hash()).map(|agent| {
                format!(
                    "connector `{}` has the key of agent `{}`: that key may act as either",
                    c.name, agent.name
                )
            })
        })
        .collect()
}

impl Connectors {
    /// The table for `grants`; an error names two connectors that share a key or a name.
    pub(super) fn new(grants: &[ConnectorGrant]) -> Result<Connectors, String> {
        Ok(Connectors {
            table: Mutex::new(Arc::new(Table::new(grants, None)?)),
            agents: Mutex::new(HashMap::new()),
            sessions: Mutex::new(HashMap::new()),
            next: std::sync::atomic::AtomicU64::new(0),
            refusals: Mutex::new(LogThrottle::default()),
        })
    }

    fn table(&self) -> Arc<Table> {
        lock(&self.table).clone()
    }

    /// The connector whose key this is, in the set in force now.
    pub(super) fn grant(&self, key: &KeyHash) -> Option<Arc<ConnectorGrant>> {
        self.table().grants.get(key).cloned()
    }

    /// How many connectors are configured.
    pub(super) fn len(&self) -> usize {
        self.table().grants.len()
    }

    /// Makes `new` the connectors in force: from now on handshakes and stream checks see
    /// it; then the sessions of a connector that is gone, or whose key changed, are closed.
    /// A connector whose `reach` narrowed keeps its session (and its open streams); its new
    /// streams are checked against the new reach. Returns the changes, for the log and the
    /// reload's answer, and how many connectors did not change.
    pub(super) fn reload(&self, new: &[ConnectorGrant]) -> Result<(Vec<String>, usize), String> {
        let old = self.table();
        let table = Arc::new(Table::new(new, Some(&old))?);
        let by_name = |t: &Table| -> HashMap<String, Arc<ConnectorGrant>> {
            t.grants
                .values()
                .map(|g| (g.name.clone(), g.clone()))
                .collect()
        };
        let (was, now) = (by_name(&old), by_name(&table));
        *lock(&self.table) = table;
        let mut changes = Vec::new();
        let mut unchanged = 0;
        for (name, w) in &was {
            match now.get(name) {
                None => changes.push(format!("connector `{name}` removed")),
                Some(n) if n.key.hash() != w.key.hash() => {
                    changes.push(format!("connector `{name}`: key changed"));
                }
                Some(n) if **n != **w => {
                    let reach = |g: &ConnectorGrant| {
                        g.reach
                            .iter()
                            .map(ToString::to_string)
                            .collect::<Vec<_>>()
                            .join(", ")
                    };
                    changes.push(format!(
                        "connector `{name}`: reach [{}] (was [{}]), max_sessions {}, max_streams {}",
                        reach(n),
                        reach(w),
                        n.max_sessions,
                        n.max_streams
                    ));
                }
                Some(_) => unchanged += 1,
            }
        }
        for name in now.keys().filter(|n| !was.contains_key(*n)) {
            changes.push(format!("connector `{name}` added"));
        }
        changes.sort();
        // A session whose connector is gone, or whose key is no longer that connector's.
        let ended: Vec<(Session, String)> = lock(&self.sessions)
            .values()
            .filter_map(|l| {
                let why = match now.get(&l.name) {
                    None => format!("connector `{}` was removed from the gateway's config", l.name),
                    Some(g) if g.key.hash() != l.key => format!(
                        "the key of connector `{}` changed in the gateway's config: log in with the new key",
                        l.name
                    ),
                    Some(_) => return None,
                };
                Some((l.session.clone(), why))
            })
            .collect();
        for (session, why) in ended {
            session.close(ErrorCode::AuthFailed, why);
        }
        Ok((changes, unchanged))
    }

    /// Agent `name` has a new session (it replaces the route of an older one).
    pub(super) fn agent_up(&self, name: &str, generation: u64, session: Session) {
        lock(&self.agents).insert(
            name.to_string(),
            AgentRoute {
                generation,
                session,
                private: HashMap::new(),
            },
        );
    }

    /// Session `generation` of agent `name` ended (a newer one's route stays).
    pub(super) fn agent_down(&self, name: &str, generation: u64) {
        let mut agents = lock(&self.agents);
        if agents.get(name).is_some_and(|r| r.generation == generation) {
            agents.remove(name);
        }
    }

    /// Closes every connector session (at shutdown).
    pub(super) fn close_all(&self, code: ErrorCode, why: &str) {
        let sessions: Vec<Session> = lock(&self.sessions)
            .values()
            .map(|l| l.session.clone())
            .collect();
        for s in sessions {
            s.close(code, why);
        }
    }
}

/// An agent's Announce in session `generation`: records the private service and answers.
pub(super) fn announce(hub: &Hub, agent: &str, generation: u64, session: &Session, frame: &Frame) {
    let a = match Announce::decode(&frame.payload) {
        Ok(a) => a,
        Err(e) => {
            session.close(e.code, e.detail);
            return;
        }
    };
    let answer = |code: ErrorCode, text: String| {
        session.send_control(
            BindResult {
                service: a.service,
                code,
                text,
            }
            .to_frame(),
        );
    };
    if let Err(why) = crate::config::check_service_name(&a.name) {
        warn!(service = %a.name, "private service refused: {why}");
        answer(ErrorCode::Protocol, why);
        return;
    }
    let mut agents = lock(&hub.connectors.agents);
    let Some(route) = agents.get_mut(agent).filter(|r| r.generation == generation) else {
        return;
    };
    if route.private.contains_key(&a.name) {
        drop(agents);
        answer(
            ErrorCode::Protocol,
            format!(
                "another private service of this agent is named `{}`",
                a.name
            ),
        );
        return;
    }
    if route.private.len() >= MAX_BINDS {
        drop(agents);
        session.close(
            ErrorCode::LimitExceeded,
            format!("more than {MAX_BINDS} private services in one session"),
        );
        return;
    }
    route.private.insert(a.name.clone(), a.service);
    drop(agents);
    info!(service = %a.name, "private service announced");
    answer(ErrorCode::Normal, "private".into());
}

/// Serves one connector's session: each stream it opens is checked and joined to the
/// agent's, until the session ends.
pub(super) async fn serve_connector(
    hub: Arc<Hub>,
    conn: transport::Connected,
    acc: handshake::Accepted,
    peer: SocketAddr,
) {
    let Some(grant) = hub.connectors.grant(&acc.key) else {
        return;
    };
    let Some(held) = hub.connectors.table().held.get(&grant.name).cloned() else {
        return;
    };
    let span = tracing::info_span!("connector", name = %grant.name);
    async move {
        let started =
            conn.start(acc.leftover, Side::Gateway, acc.params, grant.name.clone());
        let session = started.session;
        // Connectors carry no UDP: a datagram from one is a protocol error.
        drop(started.datagrams);
        let Ok(_slot) = held.sessions.clone().try_acquire_owned() else {
            let why = format!(
                "connector `{}` already has {} sessions (max_sessions of its [[connectors]] entry)",
                grant.name, grant.max_sessions
            );
            warn!(%peer, "connector session refused: {why}");
            session.close(ErrorCode::LimitExceeded, why);
            let _ = session.closed().await;
            return;
        };
        let id = hub
            .connectors
            .next
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        lock(&hub.connectors.sessions).insert(
            id,
            Live {
                name: grant.name.clone(),
                key: acc.key,
                session: session.clone(),
            },
        );
        info!(%peer, key = %acc.key.short(), "connector connected");
        let mut incoming = started.incoming;
        let mut control = started.control;
        loop {
            tokio::select! {
                stream = incoming.recv() => match stream {
                    // Each stream is checked against the connector as configured now (a
                    // reload may have narrowed its reach).
                    Some(stream) => match hub.connectors.grant(&acc.key).filter(|g| g.name == grant.name) {
                        Some(now) => route(&hub, &now, &held, stream),
                        None => {
                            stream.reset(ErrorCode::NotInReach);
                            session.close(ErrorCode::AuthFailed, format!("connector `{}` is no longer accepted with this key", grant.name));
                        }
                    },
                    None => break,
                },
                frame = control.recv() => {
                    if let Some(f) = frame {
                        session.close(ErrorCode::Protocol, format!("unexpected {:?} from a connector", f.header.kind));
                    }
                }
                _ = session.closed() => break,
            }
        }
        let end = session.closed().await;
        lock(&hub.connectors.sessions).remove(&id);
        if end.lost {
            warn!(%peer, "connector connection lost: {}", end.detail);
        } else if matches!(end.code, ErrorCode::Normal | ErrorCode::Shutdown) {
            info!(%peer, reason = %end, "connector session ended");
        } else {
            warn!(%peer, reason = %end, "connector session ended");
        }
    }
    .instrument(span)
    .await
}

/// Why a connector stream is refused here.
struct Refusal {
    code: ErrorCode,
    why: String,
}

/// Checks one connector stream and, if it passes, joins it to a new stream in the agent's
/// session in a task of its own. A refusal resets it with the reason code.
fn route(hub: &Arc<Hub>, grant: &Arc<ConnectorGrant>, held: &Held, stream: Stream) {
    let client = stream.info().client;
    let routed = open_to_agent(hub, grant, held, &stream);
    let (agent_stream, permit, dial) = match routed {
        Ok(x) => x,
        Err(Refusal { code, why }) => {
            // A probe is the connector asking about a forward (at each session, and again
            // while the answer may change): said once, without a warning.
            if stream.dial().is_some_and(|d| d.probe) {
                info!("connector probe refused: {why}");
            } else if let Some(skipped) = lock(&hub.connectors.refusals).allow(Instant::now()) {
                warn!(
                    client = client.map(tracing::field::display),
                    similar_since_last = skipped,
                    "connector stream refused: {why}"
                );
            } else {
                debug!("connector stream refused: {why}");
            }
            stream.reset(code);
            return;
        }
    };
    bump(&hub.stats.streams);
    let label = match &dial.target {
        DialTarget::Service(s) => s.clone(),
        DialTarget::Address(_) => TARGETS.to_string(),
    };
    let meter = hub.tally.stream(&dial.agent, &label);
    let hub2 = hub.clone();
    hub.tracker.spawn(
        async move {
            let _permit = permit;
            let _live = GaugeGuard::new(&hub2.stats.active_streams);
            let started = Instant::now();
            let stats = streams::join(&stream, &agent_stream, Some(meter.meter(true))).await;
            if dial.probe {
                debug!(service = %format!("{}/{}", dial.agent, dial.target), error = stats.error.as_deref(), "connector probe answered");
                return;
            }
            let client = client.map_or_else(|| "-".to_string(), |c| c.to_string());
            info!(
                service = %format!("{}/{}", dial.agent, dial.target),
                client = %client,
                bytes_to_service = stats.to_service,
                bytes_to_client = stats.to_client,
                duration_ms = started.elapsed().as_millis() as u64,
                error = stats.error.as_deref(),
                "connector stream closed"
            );
        }
        .instrument(tracing::Span::current()),
    );
}

/// The checks, then the stream to the agent: it, the connector's stream permit, and the
/// Dial as sent to the agent.
fn open_to_agent(
    hub: &Hub,
    grant: &ConnectorGrant,
    held: &Held,
    stream: &Stream,
) -> Result<(Stream, tokio::sync::OwnedSemaphorePermit, Dial), Refusal> {
    let refuse = |code, why: String| Refusal { code, why };
    let Some(dial) = stream.dial() else {
        return Err(refuse(
            ErrorCode::TargetNotAllowed,
            "the stream names no agent (an Open without a Dial)".into(),
        ));
    };
    let what = format!("{}/{}", dial.agent, dial.target);
    if !grant.reaches(&dial.agent, &dial.target) {
        let reach: Vec<String> = grant.reach.iter().map(ToString::to_string).collect();
        return Err(refuse(
            ErrorCode::NotInReach,
            format!(
                "`{what}` is not in the reach of connector `{}` (reach = [{}])",
                grant.name,
                reach.join(", ")
            ),
        ));
    }
    let permit = held.streams.clone().try_acquire_owned().map_err(|_| {
        refuse(
            ErrorCode::LimitExceeded,
            format!(
                "connector `{}` has {} streams open (max_streams of its [[connectors]] entry)",
                grant.name, grant.max_streams
            ),
        )
    })?;
    let session = {
        let agents = lock(&hub.connectors.agents);
        let Some(route) = agents.get(&dial.agent) else {
            return Err(refuse(
                ErrorCode::AgentUnavailable,
                format!("agent `{}` is not connected", dial.agent),
            ));
        };
        if let DialTarget::Service(name) = &dial.target {
            if !route.private.contains_key(name) {
                let mut known: Vec<&str> = route.private.keys().map(String::as_str).collect();
                known.sort_unstable();
                return Err(refuse(
                    ErrorCode::NoSuchService,
                    format!(
                        "agent `{}` has no private service `{name}` (it announced: {})",
                        dial.agent,
                        if known.is_empty() {
                            "none".to_string()
                        } else {
                            known.join(", ")
                        }
                    ),
                ));
            }
        }
        route.session.clone()
    };
    // The agent learns who asked from the gateway, never from the connector.
    let dial = Dial {
        connector: grant.name.clone(),
        ..dial.clone()
    };
    let open = Open {
        service: DIAL_SERVICE,
        client: stream.info().client,
    };
    let agent_stream = session.open_dial(&open, &dial).map_err(|e| match e {
        OpenError::Closed(_) => refuse(
            ErrorCode::AgentUnavailable,
            format!(
                "agent `{}` is not connected (its session just ended)",
                dial.agent
            ),
        ),
        OpenError::Limit(n) => refuse(
            ErrorCode::LimitExceeded,
            format!("agent `{}`'s session has {n} streams open", dial.agent),
        ),
    })?;
    Ok((agent_stream, permit, dial))
}
