//! The `burrow agent ...` line a gateway prints: the address to dial, the key and how to
//! check the certificate, ready to paste on an agent's host.
//!
//! The address is the gateway's `public_name` when it has one. Without it, a listener on a
//! wildcard address (`0.0.0.0`, `[::]`, the default) says nothing an agent could dial, so the
//! line names this host's address on its default route (or its host name), and
//! [`AgentLine::guess`] says so: behind NAT or with DNS in front, only `public_name` gives
//! the right answer.
//!
//! The line holds a secret. The gateway prints it in full when it has just made the key, and
//! masked ([`AgentLine::masked`]) otherwise, so that the key does not land in every log of
//! every start; [`load`] builds it from the state directory for `--print-agent-line`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};

use burrow_proto::auth::SecretKey;

use crate::config::{GatewayConfig, TransportKind, MASKED_KEY};

/// What an agent needs to reach a gateway.
#[derive(Clone)]
pub struct AgentLine {
    /// `HOST:PORT` to dial.
    pub gateway: String,
    /// How the address was chosen, when it is a guess (no `public_name`, a wildcard listen
    /// address): a sentence for a warning.
    pub guess: Option<String>,
    /// `SHA256:...` of the certificate, or `None` on plain TCP.
    pub fingerprint: Option<String>,
    /// The path the tunnel port takes WebSocket upgrades on (`ws_path`).
    pub ws_path: String,
    /// The UDP port QUIC is served on, when it is.
    pub quic_port: Option<u16>,
    key: SecretKey,
}

impl std::fmt::Debug for AgentLine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.masked())
    }
}

impl AgentLine {
    /// The line for a gateway listening on `listen` (its bound address), named `public_name`
    /// if set.
    pub fn new(
        public_name: Option<&str>,
        listen: SocketAddr,
        key: SecretKey,
        fingerprint: Option<String>,
    ) -> AgentLine {
        let (host, guess) = match public_name {
            Some(name) => (name.to_string(), None),
            None => dialable_host(listen.ip()),
        };
        AgentLine {
            gateway: format!("{host}:{}", listen.port()),
            guess,
            fingerprint,
            ws_path: crate::transport::url::DEFAULT_WS_PATH.to_string(),
            quic_port: None,
            key,
        }
    }

    /// The same line with WebSocket upgrades on `path`.
    pub fn with_ws_path(mut self, path: &str) -> AgentLine {
        self.ws_path = path.to_string();
        self
    }

    /// The same line with QUIC served on UDP `port` (`None`: not served).
    pub fn with_quic_port(mut self, port: Option<u16>) -> AgentLine {
        self.quic_port = port;
        self
    }

    /// The line for QUIC (`quic://`), key included, when the gateway serves it.
    pub fn full_quic(&self) -> Option<String> {
        self.quic_with_key(&self.key.expose())
    }

    /// [`AgentLine::full_quic`] with the key masked.
    pub fn masked_quic(&self) -> Option<String> {
        self.quic_with_key(MASKED_KEY)
    }

    fn quic_with_key(&self, key: &str) -> Option<String> {
        let port = self.quic_port?;
        let fp = self.fingerprint.as_ref()?;
        let host = match self.gateway.rsplit_once(':') {
            Some((h, _)) => h,
            None => &self.gateway,
        };
        Some(format!(
            "burrow agent --gateway quic://{host}:{port} --key {key} --fingerprint {fp}"
        ))
    }

    /// The key in the line.
    pub fn key(&self) -> &SecretKey {
        &self.key
    }

    /// The whole line, key included.
    pub fn full(&self) -> String {
        self.with_key(&self.key.expose())
    }

    /// The line with the key masked (`bk_****`): safe for logs.
    pub fn masked(&self) -> String {
        self.with_key(MASKED_KEY)
    }

    /// The line for the session inside a WebSocket (`wss://`, or `ws://` on plain TCP), key
    /// included: for agents where only HTTP(S) gets out.
    pub fn full_ws(&self) -> String {
        self.ws_with_key(&self.key.expose())
    }

    /// [`AgentLine::full_ws`] with the key masked.
    pub fn masked_ws(&self) -> String {
        self.ws_with_key(MASKED_KEY)
    }

    fn with_key(&self, key: &str) -> String {
        let trust = match &self.fingerprint {
            Some(fp) => format!("--fingerprint {fp}"),
            None => "--transport tcp".to_string(),
        };
        format!(
            "burrow agent --gateway {} --key {key} {trust}",
            self.gateway
        )
    }

    fn ws_with_key(&self, key: &str) -> String {
        let (scheme, trust) = match &self.fingerprint {
            Some(fp) => ("wss", format!(" --fingerprint {fp}")),
            None => ("ws", String::new()),
        };
        format!(
            "burrow agent --gateway {scheme}://{}{} --key {key}{trust}",
            self.gateway, self.ws_path
        )
    }
}

/// The host to put in an agent line for a listener on `ip`, and a warning when it is a
/// guess: `ip` itself unless it is a wildcard; then this host's address on its default route,
/// else its host name, else the wildcard as it is.
pub fn dialable_host(ip: IpAddr) -> (String, Option<String>) {
    let bracket = |ip: IpAddr| match ip {
        IpAddr::V6(v6) => format!("[{v6}]"),
        v4 => v4.to_string(),
    };
    if !ip.is_unspecified() {
        return (bracket(ip), None);
    }
    // A `[::]` listener usually takes IPv4 too; `0.0.0.0` only IPv4.
    let families: &[bool] = if ip.is_ipv6() {
        &[true, false]
    } else {
        &[false]
    };
    if let Some(found) = families.iter().find_map(|v6| default_route_address(*v6)) {
        let host = bracket(found);
        let why = format!(
            "no public name is set, so agents are told {host}, this host's address on its \
             default route; if they reach this host by another name or address (DNS, NAT, a \
             cloud's public IP), pass --public-name NAME (or set BURROW_PUBLIC_NAME or \
             `public_name`)"
        );
        return (host, Some(why));
    }
    if let Some(name) = host_name() {
        let why = format!(
            "no public name is set and no address of this host was found, so agents are told \
             its host name {name}; if that does not resolve where they are, pass \
             --public-name NAME (or set BURROW_PUBLIC_NAME or `public_name`)"
        );
        return (name, Some(why));
    }
    let host = bracket(ip);
    let why = format!(
        "no public name is set and this host's address could not be found, so the line says \
         {host}, which no agent can dial: pass --public-name NAME (or set BURROW_PUBLIC_NAME \
         or `public_name`)"
    );
    (host, Some(why))
}

/// The local address the kernel would use to reach the internet: a UDP socket connected to
/// a documentation address (nothing is sent). Loopback and wildcard answers do not count.
fn default_route_address(v6: bool) -> Option<IpAddr> {
    let (local, remote): (SocketAddr, SocketAddr) = if v6 {
        (
            (Ipv6Addr::UNSPECIFIED, 0).into(),
            ("2001:db8::1".parse::<Ipv6Addr>().ok()?, 9).into(),
        )
    } else {
        (
            (Ipv4Addr::UNSPECIFIED, 0).into(),
            (Ipv4Addr::new(192, 0, 2, 1), 9).into(),
        )
    };
    let socket = UdpSocket::bind(local).ok()?;
    socket.connect(remote).ok()?;
    let ip = socket.local_addr().ok()?.ip();
    (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
}

/// This host's name, unless it is empty or `localhost`.
fn host_name() -> Option<String> {
    ["/proc/sys/kernel/hostname", "/etc/hostname"]
        .iter()
        .find_map(|p| std::fs::read_to_string(p).ok())
        .map(|n| n.trim().to_string())
        .filter(|n| !n.is_empty() && !n.eq_ignore_ascii_case("localhost"))
}

/// The line of a gateway with `config`, from its state directory and certificate, without
/// binding anything or making any state: for `burrow gateway --print-agent-line`, which may
/// run beside the gateway. The state directory is checked as the gateway checks it.
pub fn load(config: &GatewayConfig) -> Result<AgentLine, String> {
    if !config.agents.is_empty() {
        return Err(
            "this gateway's config lists [[agents]], so it has no generated key: each agent \
             uses its own key (`burrow keygen` makes one), with --gateway HOST:PORT and \
             --fingerprint as the gateway prints them at start"
                .into(),
        );
    }
    if config.listen.port() == 0 {
        return Err(
            "the listen port is 0, chosen anew at each start: the running gateway printed its \
             port; give the same --listen (or BURROW_LISTEN, `listen`) as the gateway, with \
             a fixed port"
                .into(),
        );
    }
    crate::state::check_gateway_state(config).map_err(|e| e.to_string())?;
    let dir = &config.state_dir;
    let not_started = |what: &str| {
        format!(
            "no {what} in {} yet: start the gateway once (it makes it), or give the gateway's \
             --state-dir (or BURROW_STATE_DIR, `state_dir`)",
            dir.display()
        )
    };
    let key = crate::state::read_agent_key(dir)
        .map_err(|e| e.to_string())?
        .ok_or_else(|| not_started("agent key"))?;
    crate::state::warn_if_readable_by_others(&dir.join(crate::state::AGENT_KEY_FILE));
    let fingerprint = match (config.transport, &config.tls_cert) {
        (TransportKind::Tcp, _) => None,
        (TransportKind::Tls, Some(cert)) => Some(
            crate::tls::fingerprint_of_file(cert)
                .map(|fp| crate::tls::fingerprint_string(&fp))
                .map_err(|e| e.to_string())?,
        ),
        (TransportKind::Tls, None) => {
            let cert = dir.join(crate::tls::CERT_FILE);
            if !cert.exists() {
                return Err(not_started("certificate"));
            }
            Some(
                crate::tls::fingerprint_of_file(&cert)
                    .map(|fp| crate::tls::fingerprint_string(&fp))
                    .map_err(|e| e.to_string())?,
            )
        }
    };
    Ok(AgentLine::new(
        config.public_name.as_deref(),
        config.listen,
        key,
        fingerprint,
    )
    .with_ws_path(&config.ws_path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_specific_address_or_name_is_used_as_it_is() {
        let key = SecretKey::generate();
        let at = |s: &str| {
            s.parse::<SocketAddr>()
                .unwrap_or_else(|e| panic!("{s}: {e}"))
        };
        let line = AgentLine::new(None, at("192.0.2.7:7443"), key.clone(), None);
        assert_eq!(line.gateway, "192.0.2.7:7443");
        assert!(line.guess.is_none());
        let line = AgentLine::new(None, at("[2001:db8::7]:7443"), key.clone(), None);
        assert_eq!(line.gateway, "[2001:db8::7]:7443");
        let line = AgentLine::new(Some("gw.example.com"), at("0.0.0.0:7443"), key, None);
        assert_eq!(line.gateway, "gw.example.com:7443");
        assert!(line.guess.is_none());
        assert!(line.masked().contains("--key bk_**** --transport tcp"));
        assert!(!line.masked().contains(&line.key().expose()));
        assert!(line.full().contains(&line.key().expose()));
        assert!(line
            .masked_ws()
            .contains("--gateway ws://gw.example.com:7443/burrow --key bk_****"));
        let tls = line.with_ws_path("/t").clone();
        let tls = AgentLine {
            fingerprint: Some("SHA256:ab".into()),
            ..tls
        };
        assert!(tls.full_ws().ends_with(&format!(
            "--gateway wss://gw.example.com:7443/t --key {} --fingerprint SHA256:ab",
            tls.key().expose()
        )));
    }

    #[test]
    fn a_wildcard_is_replaced_and_the_guess_said() {
        let (host, guess) = dialable_host(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        let guess = guess.unwrap_or_default();
        assert!(guess.contains("--public-name"), "{guess}");
        // On a host with neither a route nor a name, the wildcard stays, and the warning
        // says that it cannot work.
        assert!(
            host != "0.0.0.0" || guess.contains("no agent can dial"),
            "{host}: {guess}"
        );
    }
}
