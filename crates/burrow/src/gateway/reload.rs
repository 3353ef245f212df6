//! A new set of agents while the gateway runs: from its config file again (SIGHUP,
//! `POST /api/reload`), or from its tokens (one made, revoked, or expired).
//!
//! Either way the whole set is swapped at once ([`Hub::grants`]), so a handshake sees the old
//! set or the new one, then the difference is applied agent by agent, by name: an agent that
//! is gone, or whose key changed, loses its session and its ports; one whose grant changed
//! loses the ports outside it (and their connections), and its session is told which; the
//! others are not touched. `[[connectors]]` reload the same way: an added connector is
//! accepted at once, a removed or re-keyed one loses its session, and one whose `reach`
//! narrowed has each new stream checked against the new reach. Only `[[agents]]` and
//! `[[connectors]]` reload: every other setting that differs from the one in force is
//! reported as needing a restart and left as it was.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use burrow_proto::auth::KeyHash;
use burrow_proto::message::{BindResult, Protocol};
use burrow_proto::ErrorCode;
use tracing::{info, warn};

use super::ports::{describe_ports, overlapping_grants};
use super::{lock, AgentEntry, Grants, Hub, PortEntry, DEFAULT_AGENT_NAME};
use crate::admin::api::{ApiError, CreatedToken, ReloadReport, TokenRequest, TokenRow};
use crate::config::{AgentGrant, GatewayConfig, KeySpec, PortRange};
use crate::tokens::{stamp, Token, TokenBook};

/// Changes a running gateway's agents: a reload of its config, its tokens.
#[derive(Clone)]
pub struct GatewayHandle {
    pub(super) hub: Arc<Hub>,
    pub(super) listen: SocketAddr,
    pub(super) fingerprint: Option<String>,
}

impl std::fmt::Debug for GatewayHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GatewayHandle")
    }
}

/// The agents of `config_agents` and the active tokens, by key; an error when a name or a
/// key is used twice.
pub(super) fn merge(
    config_agents: &[AgentGrant],
    tokens: &TokenBook,
    now: SystemTime,
) -> Result<Grants, String> {
    let mut grants = Grants::new();
    let mut names = HashSet::new();
    for g in config_agents {
        if !names.insert(g.name.as_str()) {
            return Err(format!(
                "two agents are named `{}`: names must differ",
                g.name
            ));
        }
        if let Some(prev) = grants.insert(g.key.hash(), Arc::new(g.clone())) {
            return Err(format!(
                "agents `{}` and `{}` share the same key: give each agent its own key (`burrow keygen`)",
                prev.name, g.name
            ));
        }
    }
    for t in tokens.active(now) {
        if !names.insert(t.name.as_str()) {
            return Err(format!(
                "the config's agent `{0}` has the name of a token: rename the agent, or revoke the token (`burrow token revoke {0}`)",
                t.name
            ));
        }
        if let Some(prev) = grants.insert(t.key_hash, Arc::new(t.grant())) {
            return Err(format!(
                "token `{}` has the key of the config's agent `{}`: remove one of them",
                t.name, prev.name
            ));
        }
    }
    Ok(grants)
}

/// The settings of `new` that differ from `old` and take a restart (all but `agents` and
/// `connectors`).
/// Every field is named, so that a new setting cannot be left out of this list unnoticed.
pub(super) fn restart_needed(old: &GatewayConfig, new: &GatewayConfig) -> Vec<String> {
    let GatewayConfig {
        listen,
        public_host,
        public_name,
        state_dir,
        allow_insecure_state,
        transport,
        tls_cert,
        tls_key,
        agents: _,
        connectors: _,
        groups,
        limits,
        heartbeat,
        lease,
        grace,
        ws_path,
        ws_listen,
        ws_trusted_proxies,
        udp,
        admin,
        quic,
        quic_listen,
    } = new;
    let mut out = Vec::new();
    let mut differs = |same: bool, key: &str| {
        if !same {
            out.push(key.to_string());
        }
    };
    differs(*listen == old.listen, "listen");
    differs(*public_host == old.public_host, "public_host");
    differs(*public_name == old.public_name, "public_name");
    differs(*state_dir == old.state_dir, "state_dir");
    differs(
        *allow_insecure_state == old.allow_insecure_state,
        "allow_insecure_state",
    );
    differs(*transport == old.transport, "transport");
    differs(*tls_cert == old.tls_cert, "tls_cert");
    differs(*tls_key == old.tls_key, "tls_key");
    differs(*groups == old.groups, "groups");
    differs(*limits == old.limits, "limits");
    differs(*heartbeat == old.heartbeat, "heartbeat");
    differs(*lease == old.lease, "lease");
    differs(*grace == old.grace, "grace");
    differs(*ws_path == old.ws_path, "ws_path");
    differs(*ws_listen == old.ws_listen, "ws_listen");
    differs(
        *ws_trusted_proxies == old.ws_trusted_proxies,
        "ws_trusted_proxies",
    );
    differs(*udp == old.udp, "udp");
    differs(*quic == old.quic, "quic");
    differs(*quic_listen == old.quic_listen, "quic_listen");
    differs(admin.listen == old.admin.listen, "admin");
    differs(admin.token == old.admin.token, "admin_token");
    out
}

/// What one change of agents did, for the log and the reload's answer.
#[derive(Debug, Default)]
pub(super) struct Applied {
    pub(super) changes: Vec<String>,
    pub(super) unchanged: usize,
}

/// Makes `new` the agents in force: swaps the set, then closes what it no longer grants.
/// `why(name, key)` is the code and message a removed agent's session is closed with. The
/// caller holds `hub.changing`.
pub(super) fn apply(
    hub: &Arc<Hub>,
    new: Grants,
    why: &dyn Fn(&str, &KeyHash) -> (ErrorCode, String),
) -> Applied {
    let by_name = |g: &Grants| -> BTreeMap<String, Arc<AgentGrant>> {
        g.values().map(|a| (a.name.clone(), a.clone())).collect()
    };
    let old = by_name(&hub.grants());
    let now = by_name(&new);
    // From here on handshakes see the new set; a session registered under the old one is
    // found in the table below (see serve_agent).
    *lock(&hub.grants) = Arc::new(new);
    let mut applied = Applied::default();
    let mut agents = lock(&hub.agents);
    for (name, was) in &old {
        match now.get(name) {
            None => {
                let (code, text) = why(name, &was.key.hash());
                let what = drop_agent(hub, &mut agents, name, code, &text);
                applied
                    .changes
                    .push(format!("agent `{name}` removed{what}"));
            }
            Some(is) if is.key.hash() != was.key.hash() => {
                let text = format!(
                    "the key of agent `{name}` changed in the gateway's config: log in with the new key"
                );
                let what = drop_agent(hub, &mut agents, name, ErrorCode::AuthFailed, &text);
                applied
                    .changes
                    .push(format!("agent `{name}`: key changed{what}"));
            }
            Some(is) if is.ports != was.ports || is.paths != was.paths => {
                let closed = narrow(hub, &mut agents, name, is);
                let closed = if closed.is_empty() {
                    String::new()
                } else {
                    format!(" (closed: {})", closed.join(", "))
                };
                applied.changes.push(format!(
                    "agent `{name}`: ports {} (were {}), paths {} (were {}){closed}",
                    describe_ports(&is.ports),
                    describe_ports(&was.ports),
                    crate::paths::describe(&is.paths),
                    crate::paths::describe(&was.paths)
                ));
            }
            Some(_) => applied.unchanged += 1,
        }
    }
    for name in now.keys().filter(|n| !old.contains_key(*n)) {
        applied.changes.push(format!("agent `{name}` added"));
    }
    applied
}

/// Closes `name`'s session with `code` and `text`, and its ports; says what it closed.
fn drop_agent(
    hub: &Arc<Hub>,
    agents: &mut std::collections::HashMap<String, AgentEntry>,
    name: &str,
    code: ErrorCode,
    text: &str,
) -> String {
    let Some(entry) = agents.remove(name) else {
        return String::new();
    };
    let had_session = entry.session.is_some();
    if let Some((_, session, _)) = &entry.session {
        session.close(code, text);
    }
    let ports = entry.ports.len();
    for ((protocol, service), port) in entry.ports {
        close_port(hub, name, protocol, &service, &port, None);
    }
    match (had_session, ports) {
        (false, 0) => String::new(),
        (true, 0) => " (its session closed)".into(),
        (s, n) => format!(
            " ({}{n} public port{} closed)",
            if s { "its session and " } else { "" },
            if n == 1 { "" } else { "s" }
        ),
    }
}

/// Closes the ports of `name` outside `grant`, and tells its session; returns them.
fn narrow(
    hub: &Arc<Hub>,
    agents: &mut std::collections::HashMap<String, AgentEntry>,
    name: &str,
    grant: &AgentGrant,
) -> Vec<String> {
    let Some(entry) = agents.get_mut(name) else {
        return Vec::new();
    };
    let mut closed = Vec::new();
    entry.ports.retain(|(protocol, service), port| {
        if let Some(path) = &port.path {
            let text = path.to_string_lossy();
            if crate::paths::granted(&grant.paths, &text).is_some() {
                return true;
            }
            let why = format!(
                "unix endpoint {text} is no longer granted to agent `{name}` (the gateway's config changed; paths granted now: {})",
                crate::paths::describe(&grant.paths)
            );
            info!(agent = %name, %service, path = %text, "unix endpoint outside the agent's new grant: closed, with its connections");
            close_port(hub, name, *protocol, service, port, Some(why));
            closed.push(format!("unix:{text}"));
            return false;
        }
        let number = port.addr.port();
        if grant.allows_on(*protocol, number) {
            return true;
        }
        let shown = PortRange {
            start: number,
            end: number,
            protocol: *protocol,
        }
        .to_string();
        let text = format!(
            "port {shown} is no longer granted to agent `{name}` (the gateway's config changed; granted now: {})",
            describe_ports(&grant.ports)
        );
        info!(agent = %name, %service, port = %shown, "port outside the agent's new grant: closed, with its connections");
        close_port(hub, name, *protocol, service, port, Some(text));
        closed.push(shown);
        false
    });
    closed
}

/// Closes a port that has been taken out of its agent's table: the agent's connections (and
/// UDP flows) through it, its line in the lease file, and the listener unless other members
/// of its group still hold it. With `tell`, the session that routes it is told the port is
/// refused now, with that text.
pub(super) fn close_port(
    hub: &Hub,
    agent: &str,
    protocol: Protocol,
    service: &str,
    port: &PortEntry,
    tell: Option<String>,
) {
    let member = lock(&port.route).take(agent);
    port.close();
    hub.forget_port(agent, protocol, service, port);
    if let Some(member) = member {
        member.close.cancel();
        let route = member.route;
        lock(&route.flows).end_service(route.service);
        if let Some(text) = tell {
            route.session.send_control(
                BindResult {
                    service: route.service,
                    code: ErrorCode::PortNotGranted,
                    text,
                }
                .to_frame(),
            );
        }
    }
}

/// An agent's Unbind: closes the port its session `generation` bound for `service`.
pub(super) fn unbind_port(hub: &Hub, name: &str, generation: u64, service: u32) -> bool {
    let mut agents = lock(&hub.agents);
    let Some(entry) = agents.get_mut(name) else {
        return false;
    };
    let key = entry
        .ports
        .iter()
        .find(|(_, p)| {
            p.owner == Some(generation)
                && lock(&p.route)
                    .member(name)
                    .is_some_and(|m| m.generation == generation && m.route.service == service)
        })
        .map(|(k, _)| k.clone());
    let Some(key) = key else {
        return false;
    };
    if let Some(port) = entry.ports.remove(&key) {
        close_port(hub, name, key.0, &key.1, &port, None);
    }
    true
}

/// How the session of a token's agent that is no longer accepted ends, by its key.
fn token_reasons(
    tokens: &TokenBook,
    now: SystemTime,
) -> std::collections::HashMap<KeyHash, String> {
    tokens
        .tokens()
        .iter()
        .filter_map(|t| t.refusal(now).map(|why| (t.key_hash, why)))
        .collect()
}

/// The reason a removed agent's session gets: its token's end, or the config.
fn removal(
    reasons: &std::collections::HashMap<KeyHash, String>,
) -> impl Fn(&str, &KeyHash) -> (ErrorCode, String) + '_ {
    move |name: &str, key: &KeyHash| match reasons.get(key) {
        Some(why) => (ErrorCode::KeyRevoked, why.clone()),
        None => (
            ErrorCode::AuthFailed,
            format!("agent `{name}` was removed from the gateway's config"),
        ),
    }
}

/// Applies the tokens as they are now (one made, revoked or expired) to the agents in force.
fn refresh_tokens(hub: &Arc<Hub>) -> Result<Applied, String> {
    let now = SystemTime::now();
    let (grants, reasons) = {
        let tokens = lock(&hub.tokens);
        let grants = merge(&lock(&hub.config_agents), &tokens, now)?;
        (grants, token_reasons(&tokens, now))
    };
    let applied = apply(hub, grants, &removal(&reasons));
    for c in &applied.changes {
        info!("{c}");
    }
    Ok(applied)
}

/// Ends each token when it expires (and its agent's session, and frees its ports), until the
/// gateway stops.
pub(super) async fn expire_tokens(hub: Arc<Hub>) {
    loop {
        let next = lock(&hub.tokens).next_expiry(SystemTime::now());
        let wait = next.map(|t| {
            t.duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO)
        });
        tokio::select! {
            _ = hub.stop.cancelled() => return,
            _ = hub.tokens_changed.notified() => continue,
            _ = tokio::time::sleep(wait.unwrap_or(Duration::MAX)), if wait.is_some() => {}
        }
        let _changing = lock(&hub.changing);
        if let Err(e) = refresh_tokens(&hub) {
            warn!("cannot apply the tokens: {e}");
        }
    }
}

impl Hub {
    /// Notes that `name`'s session ended now (for `burrow token list`).
    pub(super) fn seen(&self, name: &str) {
        lock(&self.tokens).seen(name, SystemTime::now());
    }

    fn token_row(&self, t: &Token, now: SystemTime) -> TokenRow {
        let connected = t.state(now) == crate::tokens::TokenState::Active
            && lock(&self.agents)
                .get(&t.name)
                .is_some_and(|e| e.session.is_some());
        TokenRow {
            name: t.name.clone(),
            key_hash: t.key_hash.to_string(),
            ports: t.ports.iter().map(PortRange::to_string).collect(),
            created: stamp(t.created),
            expires: t.expires.map(stamp),
            revoked: t.revoked.map(stamp),
            state: t.state(now).as_str().to_string(),
            connected,
            last_seen: lock(&self.tokens).last_seen(&t.name).map(stamp),
        }
    }
}

impl GatewayHandle {
    /// Makes `new`'s `[[agents]]` the agents in force (with no `[[agents]]`, the generated
    /// key's), and its `[[connectors]]` the connectors; reports the other settings that changed as needing a restart. The tokens stay.
    pub fn reload(&self, new: GatewayConfig) -> Result<ReloadReport, String> {
        let hub = &self.hub;
        let _changing = lock(&hub.changing);
        let mut agents = new.agents.clone();
        if agents.is_empty() {
            let (key, _) = crate::state::load_or_create_agent_key(&hub.config.state_dir)
                .map_err(|e| e.to_string())?;
            agents.push(AgentGrant {
                name: DEFAULT_AGENT_NAME.into(),
                key: KeySpec::Key(key),
                ports: vec![PortRange::UNPRIVILEGED, PortRange::UNPRIVILEGED_UDP],
                paths: Vec::new(),
                socket_mode: crate::config::DEFAULT_SOCKET_MODE,
            });
        }
        let now = SystemTime::now();
        let (grants, reasons) = {
            let tokens = lock(&hub.tokens);
            (merge(&agents, &tokens, now)?, token_reasons(&tokens, now))
        };
        for warning in overlapping_grants(&agents, &hub.config.groups) {
            warn!("{warning}");
        }
        for line in super::connect::shared_keys(&new.connectors, &grants) {
            info!("{line}");
        }
        // The connectors first: a mistake there leaves everything as it was.
        let (connector_changes, connectors_unchanged) = hub.connectors.reload(&new.connectors)?;
        let mut applied = apply(hub, grants, &removal(&reasons));
        *lock(&hub.config_agents) = agents;
        applied.changes.extend(connector_changes);
        Ok(ReloadReport {
            file: String::new(),
            changes: applied.changes,
            unchanged: applied.unchanged + connectors_unchanged,
            restart_needed: restart_needed(&hub.config, &new),
        })
    }

    /// Every token, oldest first.
    pub fn tokens(&self) -> Vec<TokenRow> {
        let now = SystemTime::now();
        let all: Vec<Token> = lock(&self.hub.tokens).tokens().to_vec();
        all.iter().map(|t| self.hub.token_row(t, now)).collect()
    }

    /// Makes a token: its key is in the answer only, its hash in the state directory. Its
    /// agent is accepted at once.
    pub fn create_token(&self, req: &TokenRequest) -> Result<CreatedToken, ApiError> {
        let hub = &self.hub;
        let ports = req
            .ports
            .iter()
            .flat_map(|p| p.split(','))
            .filter(|p| !p.trim().is_empty())
            .map(PortRange::parse)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| ApiError::new(400, e))?;
        let ttl = req.expires_ms.map(Duration::from_millis);
        let _changing = lock(&hub.changing);
        let now = SystemTime::now();
        let (key, token) = {
            let configured: HashSet<String> = lock(&hub.config_agents)
                .iter()
                .map(|g| g.name.clone())
                .collect();
            let mut tokens = lock(&hub.tokens);
            let made = tokens
                .create(&req.name, ports, ttl, now, |n| configured.contains(n))
                .map_err(|e| ApiError::new(409, e))?;
            if let Err(e) = tokens.save() {
                tokens.forget(&req.name);
                return Err(ApiError::new(
                    500,
                    format!(
                        "cannot keep the token in the state directory, so it was not made: {e}"
                    ),
                ));
            }
            made
        };
        hub.tokens_changed.notify_one();
        refresh_tokens(hub).map_err(|e| ApiError::new(500, e))?;
        info!(
            token = %token.name,
            ports = %describe_ports(&token.ports),
            expires = %token.expires.map_or_else(|| "never".into(), stamp),
            "token created: its agent is accepted now"
        );
        let agent_line = crate::agent_line::AgentLine::new(
            hub.config.public_name.as_deref(),
            self.listen,
            key.clone(),
            self.fingerprint.clone(),
        )
        .with_ws_path(&hub.config.ws_path)
        .full();
        Ok(CreatedToken {
            token: hub.token_row(&token, now),
            key: key.expose(),
            agent_line: Some(agent_line),
        })
    }

    /// Revokes the token `name`: its agent's session is closed and its ports freed now, and
    /// its key is refused as revoked from now on (also after a restart).
    pub fn revoke_token(&self, name: &str) -> Result<TokenRow, ApiError> {
        let hub = &self.hub;
        let _changing = lock(&hub.changing);
        let now = SystemTime::now();
        let token = {
            let mut tokens = lock(&hub.tokens);
            let token = tokens
                .revoke(name, now)
                .map_err(|e| ApiError::new(404, e))?;
            if let Err(e) = tokens.save() {
                tokens.unrevoke(name);
                return Err(ApiError::new(
                    500,
                    format!("cannot write the revocation to the state directory, so the token stays active: {e}"),
                ));
            }
            token
        };
        hub.tokens_changed.notify_one();
        refresh_tokens(hub).map_err(|e| ApiError::new(500, e))?;
        warn!(token = %name, "token revoked: its agent's session is closed and its key refused");
        Ok(hub.token_row(&token, now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burrow_proto::auth::SecretKey;

    fn grant(name: &str, key: &SecretKey) -> AgentGrant {
        AgentGrant {
            name: name.into(),
            key: KeySpec::Hash(key.hash()),
            ports: vec![PortRange::tcp(9000, 9010)],
            paths: Vec::new(),
            socket_mode: crate::config::DEFAULT_SOCKET_MODE,
        }
    }

    #[test]
    fn tokens_and_config_agents_may_not_share_a_name_or_a_key() {
        let dir = tempfile::tempdir().unwrap();
        let mut tokens = TokenBook::empty(dir.path());
        let now = SystemTime::now();
        let (key, _) = tokens
            .create("ci", vec![PortRange::tcp(9000, 9000)], None, now, |_| false)
            .unwrap();
        let web = SecretKey::generate();
        let grants = merge(&[grant("web", &web)], &tokens, now).unwrap();
        assert_eq!(grants.len(), 2);
        assert_eq!(grants[&key.hash()].name, "ci");
        let err = merge(&[grant("ci", &SecretKey::generate())], &tokens, now).unwrap_err();
        assert!(err.contains("has the name of a token"), "{err}");
        let err = merge(&[grant("other", &key)], &tokens, now).unwrap_err();
        assert!(err.contains("has the key of the config's agent"), "{err}");
        let err = merge(&[grant("a", &web), grant("b", &web)], &tokens, now).unwrap_err();
        assert!(err.contains("share the same key"), "{err}");
        // A revoked token is not accepted, and its name is free for the config.
        tokens.revoke("ci", now).unwrap();
        let grants = merge(&[grant("ci", &SecretKey::generate())], &tokens, now).unwrap();
        assert_eq!(grants.len(), 1);
    }
}
