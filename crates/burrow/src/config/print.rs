//! The settings as a config file: what `--print-config` prints.
//!
//! The output is TOML that reads back as the same settings, keys masked: put the real key
//! where it says `bk_****` and it is a working config file. Paths are made absolute, since a
//! path in a file would be taken from the file's directory. Every struct is taken apart
//! field by field, so a new setting does not compile until it is printed too.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use burrow_proto::auth::KeyHash;
use burrow_proto::message::Protocol;

use crate::admin::AdminConfig;

use super::{
    forward_name, AgentConfig, AgentGrant, ConnectForward, ConnectorConfig, ConnectorGrant,
    Forward, GatewayConfig, GatewayEndpoint, GroupGrant, Heartbeat, KeySpec, Limits, PortRange,
    PrivateConfig, Trust,
};

/// What a masked key looks like in the output.
pub const MASKED_KEY: &str = "bk_****";

/// TOML being written, line by line.
#[derive(Default)]
struct Out(String);

impl Out {
    fn line(&mut self, text: &str) {
        self.0.push_str(text);
        self.0.push('\n');
    }

    fn value(&mut self, key: &str, value: impl Into<toml::Value>) {
        let _ = writeln!(self.0, "{key} = {}", value.into());
    }

    fn text(&mut self, key: &str, value: &str) {
        self.value(key, value);
    }

    fn duration(&mut self, key: &str, d: Duration) {
        self.text(key, &humantime::format_duration(d).to_string());
    }

    fn path(&mut self, key: &str, p: &Path) {
        let p = std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
        self.text(key, &p.to_string_lossy());
    }

    fn section(&mut self, header: &str) {
        self.line("");
        self.line(header);
    }
}

fn limits(out: &mut Out, l: &Limits) {
    let Limits {
        max_frame,
        max_streams,
        max_pending_opens,
        max_preauth,
        max_preauth_per_source,
        max_public_conns,
        max_public_conns_per_agent,
        max_ports_per_agent,
        handshake_timeout,
        stream_window,
        max_stream_window,
        session_window,
    } = l;
    out.section("[limits]");
    out.value("max_frame", i64::from(*max_frame));
    out.value("max_streams", i64::from(*max_streams));
    out.value("max_pending_opens", i64::from(*max_pending_opens));
    out.value("max_preauth", i64::from(*max_preauth));
    out.value("max_preauth_per_source", i64::from(*max_preauth_per_source));
    out.value("max_public_conns", i64::from(*max_public_conns));
    out.value(
        "max_public_conns_per_agent",
        i64::from(*max_public_conns_per_agent),
    );
    out.value("max_ports_per_agent", i64::from(*max_ports_per_agent));
    out.duration("handshake_timeout", *handshake_timeout);
    out.value("stream_window", i64::from(*stream_window));
    out.value("max_stream_window", i64::from(*max_stream_window));
    out.value("session_window", i64::from(*session_window));
}

fn udp(out: &mut Out, u: &crate::udp::UdpSettings) {
    let crate::udp::UdpSettings {
        idle,
        max_flows,
        max_datagram,
        queue,
    } = u;
    out.section("[udp]");
    out.duration("idle", *idle);
    out.value("max_flows", *max_flows as i64);
    out.value("max_datagram", *max_datagram as i64);
    out.value("queue", *queue as i64);
}

/// `admin` and `admin_token` (masked).
fn admin(out: &mut Out, a: &AdminConfig) {
    let AdminConfig { listen, token } = a;
    match listen {
        Some(addr) => out.text("admin", &addr.to_string()),
        None => out.line("# admin: not set (no admin server; e.g. admin = \"127.0.0.1:7444\")"),
    }
    if token.is_some() {
        out.text("admin_token", MASKED_TOKEN);
    }
}

/// What a masked admin token looks like in the output.
pub const MASKED_TOKEN: &str = "****";

fn ports(ranges: &[PortRange]) -> toml::Value {
    let items = ranges.iter().map(|r| {
        if r.start == r.end && r.protocol == Protocol::Tcp {
            toml::Value::Integer(i64::from(r.start))
        } else {
            toml::Value::String(r.to_string())
        }
    });
    toml::Value::Array(items.collect())
}

fn grant(out: &mut Out, g: &AgentGrant) {
    let AgentGrant {
        name,
        key,
        ports: p,
        paths,
        socket_mode,
    } = g;
    out.section("[[agents]]");
    out.text("name", name);
    match key {
        KeySpec::Key(_) => out.text("key", MASKED_KEY),
        KeySpec::Hash(h) => out.text("key_hash", &h.to_string()),
    }
    if !p.is_empty() || paths.is_empty() {
        out.value("ports", ports(p));
    }
    if !paths.is_empty() {
        let list = paths.iter().map(|p| toml::Value::from(p.as_str()));
        out.value("paths", toml::Value::Array(list.collect()));
        out.line(&format!("socket_mode = 0o{socket_mode:03o}"));
    }
}

fn connector_grant(out: &mut Out, c: &ConnectorGrant) {
    let ConnectorGrant {
        name,
        key,
        reach,
        max_sessions,
        max_streams,
    } = c;
    out.section("[[connectors]]");
    out.text("name", name);
    match key {
        KeySpec::Key(_) => out.text("key", MASKED_KEY),
        KeySpec::Hash(h) => out.text("key_hash", &h.to_string()),
    }
    let reach = reach.iter().map(|r| toml::Value::from(r.to_string()));
    out.value("reach", toml::Value::Array(reach.collect()));
    out.value("max_sessions", i64::from(*max_sessions));
    out.value("max_streams", i64::from(*max_streams));
}

/// `private = [...]` and `allow = [...]` of an agent.
fn private(out: &mut Out, p: &PrivateConfig) {
    let PrivateConfig { services, allow } = p;
    if !services.is_empty() {
        let specs = services.iter().map(|s| match s.proxy_protocol {
            Some(v) => toml::Value::from(format!("{}={}?proxy_protocol={v}", s.name, s.target)),
            None => toml::Value::from(format!("{}={}", s.name, s.target)),
        });
        out.value("private", toml::Value::Array(specs.collect()));
    }
    if !allow.is_empty() {
        let patterns = allow.iter().map(|a| toml::Value::from(a.to_string()));
        out.value("allow", toml::Value::Array(patterns.collect()));
    }
}

/// The trust and transport keys, as both an agent and a connector file write them.
fn trust(out: &mut Out, trust: &Trust) {
    match trust {
        Trust::Fingerprint(fp) => {
            out.text("transport", "tls");
            out.text("fingerprint", &crate::tls::fingerprint_string(fp));
        }
        Trust::Ca(ca) => {
            out.text("transport", "tls");
            out.path("ca", ca);
        }
        Trust::System => {
            out.text("transport", "tls");
            out.text("ca", "system");
        }
        Trust::Plain => out.text("transport", "tcp"),
    }
}

/// `proxy`, the password masked.
fn proxy(out: &mut Out, proxy: &crate::transport::ProxyChoice) {
    match proxy {
        crate::transport::ProxyChoice::Environment => out.line(
            "# proxy: not set (HTTPS_PROXY, ALL_PROXY and NO_PROXY are followed, as curl does)",
        ),
        crate::transport::ProxyChoice::Direct => out.text("proxy", "none"),
        crate::transport::ProxyChoice::Url(url) => out.text("proxy", &url.to_string()),
    }
}

impl ConnectorConfig {
    /// These settings as a connector config file: TOML that reads back as the same
    /// settings, with the key masked as [`MASKED_KEY`] and paths made absolute.
    pub fn to_toml(&self) -> String {
        let ConnectorConfig {
            gateway,
            key: _,
            key_file,
            trust: t,
            server_name,
            proxy: p,
            forwards,
            limits: l,
            max_backoff,
            grace,
        } = self;
        let mut out = Out::default();
        out.line("# burrow connect: the effective settings (flags, environment, file, defaults).");
        out.line("# The key is masked: with the real one in its place, this is a config file.");
        out.text("gateway", gateway);
        match key_file {
            Some(path) => out.path("key_file", path),
            None => out.text("key", MASKED_KEY),
        }
        trust(&mut out, t);
        if let Some(name) = server_name {
            out.text("server_name", name);
        }
        proxy(&mut out, p);
        out.duration("max_backoff", *max_backoff);
        out.duration("grace", *grace);
        let compact = forwards
            .iter()
            .all(|f| super::parse_connect_forward(&f.name).as_ref() == Ok(f));
        if compact {
            let specs = forwards.iter().map(|f| toml::Value::from(f.name.as_str()));
            out.value("forward", toml::Value::Array(specs.collect()));
        }
        limits(&mut out, l);
        if !compact {
            for f in forwards {
                let ConnectForward {
                    listen,
                    agent,
                    target,
                    name,
                } = f;
                out.section("[[forwards]]");
                out.text("listen", &listen.to_string());
                out.text("agent", agent);
                match target {
                    burrow_proto::connect::DialTarget::Service(s) => out.text("service", s),
                    burrow_proto::connect::DialTarget::Address(a) => out.text("target", a),
                }
                out.text("name", name);
            }
        }
        out.0
    }
}

impl GatewayConfig {
    /// These settings as a gateway config file: TOML that reads back as the same settings,
    /// with each key masked as [`MASKED_KEY`] and paths made absolute. With no `[[agents]]`,
    /// a comment shows the agent the gateway then accepts: the key it keeps in its state
    /// directory, by `generated`'s hash when that key exists already.
    pub fn to_toml(&self, generated: Option<&KeyHash>) -> String {
        let GatewayConfig {
            listen,
            public_host,
            public_name,
            state_dir,
            allow_insecure_state,
            transport,
            tls_cert,
            tls_key,
            agents,
            connectors,
            groups,
            limits: l,
            heartbeat,
            lease,
            grace,
            ws_path,
            ws_listen,
            quic,
            quic_listen,
            ws_trusted_proxies,
            udp: u,
            admin,
        } = self;
        let mut out = Out::default();
        out.line("# burrow gateway: the effective settings (flags, environment, file, defaults).");
        out.line("# Keys are masked: with the real ones in their place, this is a config file.");
        out.text("listen", &listen.to_string());
        out.text("public_host", &public_host.to_string());
        match public_name {
            Some(name) => out.text("public_name", name),
            None => out.line("# public_name: not set (agents are told this host's address)"),
        }
        out.path("state_dir", state_dir);
        out.value("allow_insecure_state", *allow_insecure_state);
        out.text("transport", transport.as_str());
        if let Some(p) = tls_cert {
            out.path("tls_cert", p);
        }
        if let Some(p) = tls_key {
            out.path("tls_key", p);
        }
        out.duration("lease", *lease);
        out.duration("grace", *grace);
        out.text("ws_path", ws_path);
        match ws_listen {
            Some(addr) => out.text("ws_listen", &addr.to_string()),
            None => out.line("# ws_listen: not set (no plain-HTTP WebSocket listener)"),
        }
        out.value("quic", *quic);
        match quic_listen {
            Some(addr) => out.text("quic_listen", &addr.to_string()),
            None => out.line("# quic_listen: not set (QUIC on UDP at the listen address)"),
        }
        let proxies = ws_trusted_proxies
            .iter()
            .map(|n| toml::Value::from(n.to_string()));
        out.value("ws_trusted_proxies", toml::Value::Array(proxies.collect()));
        self::admin(&mut out, admin);
        let Heartbeat { interval, misses } = heartbeat;
        out.section("[heartbeat]");
        out.duration("interval", *interval);
        out.value("misses", i64::from(*misses));
        limits(&mut out, l);
        udp(&mut out, u);
        if agents.is_empty() {
            let key_file = state_dir.join(crate::state::AGENT_KEY_FILE);
            out.line("");
            out.line(&format!(
                "# No [[agents]]: the gateway accepts the key in {} (made at the first start),",
                key_file.display()
            ));
            out.line("# as if this file said:");
            out.line("#   [[agents]]");
            out.line(&format!(
                "#   name = \"{}\"",
                crate::gateway::DEFAULT_AGENT_NAME
            ));
            match generated {
                Some(h) => out.line(&format!("#   key_hash = \"{h}\"")),
                None => out.line("#   key_hash = (of the key made at the first start)"),
            }
            out.line(&format!(
                "#   ports = {}",
                ports(&[PortRange::UNPRIVILEGED, PortRange::UNPRIVILEGED_UDP])
            ));
        }
        for g in agents {
            grant(&mut out, g);
        }
        for g in groups {
            let GroupGrant { name, agents } = g;
            out.section("[[groups]]");
            out.text("name", name);
            let names = agents.iter().map(|a| toml::Value::from(a.as_str()));
            out.value("agents", toml::Value::Array(names.collect()));
        }
        for c in connectors {
            connector_grant(&mut out, c);
        }
        out.0
    }
}

/// One gateway of several as an inline `gateways` table: `url`, its trust, its server name
/// (in that order: toml's own tables would sort the keys). A plain one is written `tcp://` (or
/// `ws://`) so that it reads back as plain without `transport`.
fn gateway_table(g: &GatewayEndpoint) -> String {
    let url = match (&g.trust, g.gateway.split_once("://")) {
        (Trust::Plain, None) => format!("tcp://{}", g.gateway),
        (Trust::Plain, Some(("tls", rest))) => format!("tcp://{rest}"),
        _ => g.gateway.clone(),
    };
    let mut fields = vec![("url", url)];
    match &g.trust {
        Trust::Fingerprint(fp) => fields.push(("fingerprint", crate::tls::fingerprint_string(fp))),
        Trust::Ca(ca) => {
            let ca = std::path::absolute(ca).unwrap_or_else(|_| ca.clone());
            fields.push(("ca", ca.to_string_lossy().into_owned()));
        }
        Trust::System => fields.push(("ca", "system".into())),
        Trust::Plain => {}
    }
    if let Some(name) = &g.server_name {
        fields.push(("server_name", name.clone()));
    }
    let fields: Vec<String> = fields
        .into_iter()
        .map(|(k, v)| format!("{k} = {}", toml::Value::from(v)))
        .collect();
    format!("{{ {} }}", fields.join(", "))
}

impl AgentConfig {
    /// These settings as an agent config file: TOML that reads back as the same settings,
    /// with the key masked as [`MASKED_KEY`] and paths made absolute.
    pub fn to_toml(&self) -> String {
        let AgentConfig {
            gateway,
            key: _,
            trust,
            server_name,
            extra_gateways,
            forwards,
            private: p,
            limits: l,
            max_backoff,
            connect_timeout,
            grace,
            udp: u,
            proxy,
            key_file,
            admin,
        } = self;
        let mut out = Out::default();
        out.line("# burrow agent: the effective settings (flags, environment, file, defaults).");
        out.line("# The key is masked: with the real one in its place, this is a config file.");
        if !extra_gateways.is_empty() {
            // Each gateway as a table with its own trust, which reads back as the same.
            let first = GatewayEndpoint {
                gateway: gateway.clone(),
                trust: trust.clone(),
                server_name: server_name.clone(),
            };
            let tables: Vec<String> = std::iter::once(&first)
                .chain(extra_gateways)
                .map(gateway_table)
                .collect();
            out.line(&format!("gateways = [{}]", tables.join(", ")));
        } else {
            out.text("gateway", gateway);
        }
        match key_file {
            Some(p) => out.path("key_file", p),
            None => out.text("key", MASKED_KEY),
        }
        if extra_gateways.is_empty() {
            self::trust(&mut out, trust);
        }
        if let Some(name) = server_name.as_ref().filter(|_| extra_gateways.is_empty()) {
            out.text("server_name", name);
        }
        // The password is masked, like the key.
        self::proxy(&mut out, proxy);
        out.duration("max_backoff", *max_backoff);
        out.duration("connect_timeout", *connect_timeout);
        out.duration("grace", *grace);
        self::admin(&mut out, admin);
        // The compact form when every name is a spec that reads back as its forward (the
        // name of a compact spec is the spec); tables otherwise, which keep any name.
        let compact = forwards
            .iter()
            .all(|f| super::parse_forward(&f.name).as_ref() == Ok(f));
        if compact {
            let specs = forwards.iter().map(|f| toml::Value::from(f.name.as_str()));
            out.value("forward", toml::Value::Array(specs.collect()));
        }
        private(&mut out, p);
        limits(&mut out, l);
        udp(&mut out, u);
        if !compact {
            for f in forwards {
                let Forward {
                    protocol,
                    public_port,
                    target,
                    name,
                    group,
                    proxy_protocol,
                    public_path,
                } = f;
                out.section("[[forwards]]");
                if *protocol == Protocol::Udp {
                    out.text("protocol", "udp");
                }
                if *public_port != 0 {
                    out.value("public_port", i64::from(*public_port));
                }
                if let Some(path) = public_path {
                    out.text("public_path", &path.to_string_lossy());
                }
                out.text("target", &target.to_string());
                if *name != forward_name(*protocol, *public_port, public_path.as_deref(), target) {
                    out.text("name", name);
                }
                if let Some(group) = group {
                    out.text("group", group);
                }
                if let Some(pp) = proxy_protocol {
                    out.text("proxy_protocol", pp.as_str());
                }
            }
        }
        out.0
    }
}
