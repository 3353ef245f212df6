//! Config files and value grammar: the examples load, and every mistake is reported with the
//! file, the line and the key.

use std::path::{Path, PathBuf};

use burrow::config::{
    load_agent_file, load_gateway_file, parse_agent_file, parse_forward, parse_gateway_file,
    AgentSettings, ConfigError, Forward, GatewaySetting, GatewaySettings, KeySpec, PortRange,
    Target, Trust,
};
use burrow::proto::auth::SecretKey;

const KEY: &str = "bk_zlpV87yiiQg6NJ7bgH5mrgoSwLSXRExx5Swq84TwkhA";
const KEY_HASH: &str = "bkh_tjpv6pJLLHVz98RUc4z1VaSnbUDW0Nm1UIIbnZ4xzos";

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples")
}

/// The error a gateway file with `text` gives; the path is only a name here.
fn gateway_err(text: &str) -> String {
    match parse_gateway_file(Path::new("conf/gw.toml"), text) {
        Ok(s) => panic!("accepted: {s:?}"),
        Err(e) => e.to_string(),
    }
}

fn agent_err(text: &str) -> String {
    match parse_agent_file(Path::new("conf/agent.toml"), text) {
        Ok(s) => panic!("accepted: {s:?}"),
        Err(e) => e.to_string(),
    }
}

/// Asserts the message names the file, the line and the key.
#[track_caller]
fn assert_at(msg: &str, file: &str, line: usize, key: &str) {
    let place = format!("{file} line {line}, key {key}:");
    assert!(msg.starts_with(&place), "expected `{place}` in: {msg}");
}

#[test]
fn every_example_loads_and_resolves() -> anyhow::Result<()> {
    let mut seen = 0;
    for entry in std::fs::read_dir(examples())? {
        let path = entry?.path();
        if path.extension().is_none_or(|e| e != "toml") {
            continue;
        }
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.starts_with("gateway") {
            load_gateway_file(&path)?.into_config()?;
        } else if name.starts_with("agent") {
            load_agent_file(&path)?.into_config()?;
        } else if name.starts_with("connect") {
            burrow::config::load_connector_file(&path)?.into_config()?;
        } else if name.starts_with("run") {
            let run = burrow::config::load_run_file(&path)?;
            assert!(run.instances.len() >= 2, "{name}: instances missing");
            for i in run.instances {
                match i.settings? {
                    burrow::config::InstanceSettings::Gateway(g) => drop(g.into_config()?),
                    burrow::config::InstanceSettings::Agent(a) => drop(a.into_config()?),
                    burrow::config::InstanceSettings::Connector(c) => drop(c.into_config()?),
                }
            }
        } else {
            panic!("{name}: example names start with gateway, agent, connect or run");
        }
        seen += 1;
    }
    assert!(seen >= 2, "examples missing");
    Ok(())
}

#[test]
fn gateway_example_has_what_it_says() -> anyhow::Result<()> {
    let c = load_gateway_file(&examples().join("gateway.toml"))?.into_config()?;
    assert_eq!(c.agents.len(), 2);
    let web = &c.agents[0];
    assert_eq!(
        web.key,
        KeySpec::Hash(burrow::proto::auth::KeyHash::parse(KEY_HASH)?)
    );
    assert_eq!(
        web.ports,
        vec![PortRange::tcp(8080, 8080), PortRange::tcp(9000, 9100)]
    );
    assert!(matches!(c.agents[1].key, KeySpec::Key(_)));
    assert_eq!(c.public_name.as_deref(), Some("gw.example.com"));
    Ok(())
}

#[test]
fn agent_example_matches_the_gateway_example() -> anyhow::Result<()> {
    let a = load_agent_file(&examples().join("agent.toml"))?.into_config()?;
    let g = load_gateway_file(&examples().join("gateway.toml"))?.into_config()?;
    assert_eq!(a.key.hash(), g.agents[0].key.hash());
    for f in &a.forwards {
        assert!(g.agents[0].allows(f.public_port), "{f:?}");
    }
    assert!(a
        .forwards
        .iter()
        .any(|f| matches!(f.target, Target::Unix(_))));
    assert!(matches!(a.trust, Trust::Fingerprint(_)));
    Ok(())
}

#[test]
fn debug_of_a_loaded_agent_config_hides_the_key() -> anyhow::Result<()> {
    let c = load_agent_file(&examples().join("agent.toml"))?.into_config()?;
    let secret = &KEY[3..];
    for text in [format!("{c:?}"), format!("{c:#?}")] {
        assert!(!text.contains(secret), "{text}");
    }
    let g = load_gateway_file(&examples().join("gateway.toml"))?.into_config()?;
    let text = format!("{g:?}");
    assert!(!text.contains("5JG9gAt6USx2Cm5GCBiq"), "{text}");
    Ok(())
}

#[test]
fn unknown_key_names_file_line_and_key_with_a_suggestion() {
    let msg = gateway_err("listen = \"0.0.0.0:7443\"\n\n[limits]\nmax_fram = 1\n");
    assert_at(&msg, "conf/gw.toml", 4, "limits.max_fram");
    assert!(msg.contains("did you mean `max_frame`"), "{msg}");

    let msg = gateway_err("lissen = \"0.0.0.0:7443\"\n");
    assert_at(&msg, "conf/gw.toml", 1, "lissen");

    let msg = agent_err("gateway = \"gw:7443\"\n\n[[forwards]]\ntarget = \"a:1\"\nport = 8080\n");
    assert_at(&msg, "conf/agent.toml", 5, "forwards[0].port");
}

#[test]
fn typo_in_a_real_file_names_its_path() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, "listen = \"0.0.0.0:7443\"\npublik_name = \"x\"\n")?;
    let msg = match load_gateway_file(&path) {
        Ok(s) => panic!("accepted: {s:?}"),
        Err(e) => e.to_string(),
    };
    assert_at(&msg, &path.display().to_string(), 2, "publik_name");
    Ok(())
}

#[test]
fn bad_port_names_the_element() {
    let text = format!(
        "[[agents]]\nname = \"a\"\nkey_hash = \"{KEY_HASH}\"\nports = [\n  8080,\n  \"70000\",\n]\n"
    );
    let msg = gateway_err(&text);
    assert_at(&msg, "conf/gw.toml", 6, "agents[0].ports[1]");
    assert!(msg.contains("\"70000\" is not a port or range"), "{msg}");

    let text = format!("[[agents]]\nname = \"a\"\nkey_hash = \"{KEY_HASH}\"\nports = [70000]\n");
    assert_at(&gateway_err(&text), "conf/gw.toml", 4, "agents[0].ports[0]");

    let msg = agent_err("[[forwards]]\npublic_port = 70000\ntarget = \"a:1\"\n");
    assert_at(&msg, "conf/agent.toml", 2, "forwards[0].public_port");
}

#[test]
fn bad_key_names_the_key_and_does_not_echo_it() {
    let msg = agent_err("gateway = \"gw:7443\"\nkey = \"bk_notakeyatallnotakey\"\n");
    assert_at(&msg, "conf/agent.toml", 2, "key");
    assert!(!msg.contains("notakeyatall"), "{msg}");

    let text = "\n[[agents]]\nname = \"a\"\nkey_hash = \"bk_wrongprefix\"\nports = [1]\n";
    assert_at(&gateway_err(text), "conf/gw.toml", 4, "agents[0].key_hash");
}

#[test]
fn key_and_key_hash_together_or_neither() {
    let text = format!(
        "[[agents]]\nname = \"a\"\nkey = \"{KEY}\"\nkey_hash = \"{KEY_HASH}\"\nports = [1]\n"
    );
    let msg = gateway_err(&text);
    assert_at(&msg, "conf/gw.toml", 4, "agents[0].key_hash");
    assert!(msg.contains("not both"), "{msg}");

    let msg = gateway_err("# agents\n[[agents]]\nname = \"a\"\nports = [1]\n");
    assert_at(&msg, "conf/gw.toml", 2, "agents[0]");
}

#[test]
fn same_key_twice_is_refused() {
    let text = format!(
        "[[agents]]\nname = \"a\"\nkey = \"{KEY}\"\nports = [1]\n\
         [[agents]]\nname = \"b\"\nkey_hash = \"{KEY_HASH}\"\nports = [2]\n"
    );
    assert_at(&gateway_err(&text), "conf/gw.toml", 7, "agents[1].key_hash");
}

#[test]
fn bad_target_in_either_form() {
    let msg = agent_err("forward = [\n  \"8080=127.0.0.1:80\",\n  \"localhost\",\n]\n");
    assert_at(&msg, "conf/agent.toml", 3, "forward[1]");
    assert!(msg.contains("\"localhost\" is not a target"), "{msg}");

    let msg = agent_err("[[forwards]]\ntarget = \"::1:80\"\n");
    assert_at(&msg, "conf/agent.toml", 2, "forwards[0].target");
    assert!(msg.contains("brackets"), "{msg}");

    // The public port belongs in `public_port` in a table.
    let msg = agent_err("[[forwards]]\ntarget = \"8080:127.0.0.1:80\"\n");
    assert_at(&msg, "conf/agent.toml", 2, "forwards[0].target");
    assert!(msg.contains("public_port = 8080"), "{msg}");
}

#[test]
fn bad_values_of_other_kinds() {
    assert_at(
        &gateway_err("lease = \"soon\"\n"),
        "conf/gw.toml",
        1,
        "lease",
    );
    assert_at(
        &gateway_err("\n[heartbeat]\ninterval = \"1ms\"\n"),
        "conf/gw.toml",
        3,
        "heartbeat.interval",
    );
    assert_at(
        &gateway_err("[limits]\nmax_streams = \"many\"\n"),
        "conf/gw.toml",
        2,
        "limits.max_streams",
    );
    assert_at(
        &gateway_err("[limits]\nmax_stream_window = 1024\n"),
        "conf/gw.toml",
        2,
        "limits.max_stream_window",
    );
    for key in [
        "max_preauth_per_source",
        "max_public_conns",
        "max_public_conns_per_agent",
        "max_ports_per_agent",
    ] {
        let msg = gateway_err(&format!("[limits]\n{key} = 0\n"));
        assert_at(&msg, "conf/gw.toml", 2, &format!("limits.{key}"));
        assert!(msg.contains("at least 1"), "{msg}");
    }
    assert_at(
        &gateway_err("transport = \"udp\"\n"),
        "conf/gw.toml",
        1,
        "transport",
    );
    assert_at(
        &gateway_err("listen = \"7443\"\n"),
        "conf/gw.toml",
        1,
        "listen",
    );
    assert_at(
        &agent_err("fingerprint = \"SHA256:00\"\n"),
        "conf/agent.toml",
        1,
        "fingerprint",
    );
    assert_at(
        &agent_err("gateway = \"gw\"\n"),
        "conf/agent.toml",
        1,
        "gateway",
    );
    assert_at(
        &agent_err("max_backoff = \"0s\"\n"),
        "conf/agent.toml",
        1,
        "max_backoff",
    );
    let both = "fingerprint = \"SHA256:415e49090663bd175c79524f06bcc79761d84319e3daf9c9c197b6787c6544a0\"\nca = \"ca.pem\"\n";
    assert_at(&agent_err(both), "conf/agent.toml", 2, "ca");
}

#[test]
fn duplicate_public_ports_are_refused() {
    let msg =
        agent_err("forward = [\"80=a:1\"]\n[[forwards]]\npublic_port = 80\ntarget = \"b:2\"\n");
    assert_at(&msg, "conf/agent.toml", 2, "forwards[0]");
}

#[test]
fn duplicate_forward_names_are_refused() {
    let msg = agent_err("forward = [\"a:1\", \"a:1\"]\n");
    assert!(msg.contains("named `a:1`"), "{msg}");
    assert!(msg.contains("conf/agent.toml line 1"), "{msg}");
}

#[test]
fn relative_paths_are_relative_to_the_file() -> anyhow::Result<()> {
    let g = parse_gateway_file(
        Path::new("/etc/burrow/gateway.toml"),
        "state_dir = \"state\"\ntls_cert = \"/abs/cert.pem\"\ntls_key = \"key.pem\"\n",
    )?;
    assert_eq!(g.state_dir, Some(PathBuf::from("/etc/burrow/state")));
    assert_eq!(g.tls_cert, Some(PathBuf::from("/abs/cert.pem")));
    assert_eq!(g.tls_key, Some(PathBuf::from("/etc/burrow/key.pem")));
    Ok(())
}

#[test]
fn parse_forward_cases() -> Result<(), String> {
    let tcp = |host: &str, port| Target::Tcp {
        host: host.into(),
        port,
    };
    let f = parse_forward("8080=127.0.0.1:80")?;
    assert_eq!(
        f,
        Forward {
            protocol: burrow::config::Protocol::Tcp,
            public_port: 8080,
            target: tcp("127.0.0.1", 80),
            name: "8080=127.0.0.1:80".into(),
            proxy_protocol: None,
            public_path: None,
            group: None,
        }
    );
    assert_eq!(parse_forward("localhost:3000")?.public_port, 0);
    assert_eq!(parse_forward("0=localhost:3000")?.public_port, 0);
    assert_eq!(parse_forward("[::1]:80")?.target, tcp("::1", 80));
    assert_eq!(parse_forward("9000=[::1]:80")?.public_port, 9000);
    assert_eq!(
        parse_forward("unix:/var/run/docker.sock")?.target,
        Target::Unix("/var/run/docker.sock".into())
    );
    assert_eq!(
        parse_forward("2375=unix:/var/run/docker.sock")?.target,
        Target::Unix("/var/run/docker.sock".into())
    );
    // An `=` inside a socket path is part of the path.
    assert_eq!(
        parse_forward("unix:/tmp/a=b.sock")?.target,
        Target::Unix("/tmp/a=b.sock".into())
    );
    for bad in [
        "",
        "localhost",
        "70000=a:1",
        "x=a:1",
        "a:0",
        "a:70000",
        "::1:80",
        "[::1]80",
        "[nope]:80",
        "unix:",
        "8080=",
        "bad host:80",
        // A bare number is not a host: `8080:80` is Docker's PUBLIC:PORT.
        "8080:80",
    ] {
        assert!(parse_forward(bad).is_err(), "accepted {bad:?}");
    }
    Ok(())
}

#[test]
fn targets_and_ranges_print_as_written() -> Result<(), String> {
    for s in [
        "127.0.0.1:80",
        "[::1]:80",
        "unix:/run/a.sock",
        "example.com:443",
    ] {
        assert_eq!(Target::parse(s)?.to_string(), s);
    }
    assert_eq!(PortRange::parse("9000-9100")?, PortRange::tcp(9000, 9100));
    assert_eq!(PortRange::parse("8080")?.to_string(), "8080");
    assert_eq!(PortRange::parse("9000-9100")?.to_string(), "9000-9100");
    for bad in ["0", "70000", "9100-9000", "1-", "-1", "a-b", ""] {
        assert!(PortRange::parse(bad).is_err(), "accepted {bad:?}");
    }
    Ok(())
}

#[test]
fn layers_overlay_field_by_field() -> anyhow::Result<()> {
    let file = parse_agent_file(
        Path::new("agent.toml"),
        &format!(
            "gateway = \"file:1\"\nkey = \"{KEY}\"\ntransport = \"tcp\"\nforward = [\"a:1\"]\n"
        ),
    )?;
    let flags = AgentSettings {
        gateways: Some(vec![GatewaySetting::new("flag:2")]),
        ..AgentSettings::default()
    };
    let c = file.overlay(flags).into_config()?;
    assert_eq!(c.gateway, "flag:2");
    assert_eq!(c.trust, Trust::Plain);
    assert_eq!(c.forwards.len(), 1);
    assert_eq!(c.key, SecretKey::parse(KEY)?);

    let g = GatewaySettings {
        state_dir: Some("/s".into()),
        ..GatewaySettings::default()
    }
    .into_config()?;
    assert_eq!(g.listen.port(), burrow::config::DEFAULT_TUNNEL_PORT);
    Ok(())
}

#[test]
fn missing_settings_name_flag_env_and_key() {
    let err = |s: AgentSettings| match s.into_config() {
        Ok(c) => panic!("accepted {c:?}"),
        Err(ConfigError::Value(m)) => m,
        Err(e) => panic!("unexpected {e}"),
    };
    let m = err(AgentSettings::default());
    assert!(
        m.contains("--gateway") && m.contains("BURROW_GATEWAY") && m.contains("`gateway`"),
        "{m}"
    );
    let with_gateway = AgentSettings {
        gateways: Some(vec![GatewaySetting::new("gw:1")]),
        ..AgentSettings::default()
    };
    let m = err(with_gateway.clone());
    assert!(m.contains("--key") && m.contains("BURROW_KEY"), "{m}");
    let with_key = AgentSettings {
        key: Some(SecretKey::generate()),
        ..with_gateway
    };
    let m = err(with_key.clone());
    assert!(m.contains("--fingerprint") && m.contains("--ca"), "{m}");
    // With gateway, key and trust, no forward is needed: the agent connects and warns.
    let cfg = AgentSettings {
        trust: Some(vec![Trust::Ca("ca.pem".into())]),
        ..with_key
    }
    .into_config()
    .expect("an agent without forwards is valid");
    assert!(cfg.forwards.is_empty());
}

/// `to_toml` of each example, with the real keys in place of the masks, parses back as the
/// same settings.
#[test]
fn printed_settings_parse_back_the_same() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("printed.toml");

    let gateway = load_gateway_file(&examples().join("gateway.toml"))?.into_config()?;
    let mut text = gateway.to_toml(None);
    for grant in &gateway.agents {
        if let KeySpec::Key(k) = &grant.key {
            text = text.replacen(burrow::config::MASKED_KEY, &k.expose(), 1);
        }
    }
    let again = parse_gateway_file(&file, &text)?.into_config()?;
    assert_eq!(format!("{again:?}"), format!("{gateway:?}"), "{text}");
    assert_eq!(again.agents, gateway.agents, "{text}");

    let agent = load_agent_file(&examples().join("agent.toml"))?.into_config()?;
    let text = agent
        .to_toml()
        .replace(burrow::config::MASKED_KEY, &agent.key.expose());
    let again = parse_agent_file(&file, &text)?.into_config()?;
    assert_eq!(format!("{again:?}"), format!("{agent:?}"), "{text}");
    assert_eq!(again.key, agent.key);
    Ok(())
}

#[test]
fn forward_options_name_a_group() -> Result<(), String> {
    use burrow::config::ProxyProtocol;
    let f = parse_forward("8080=127.0.0.1:80?group=web")?;
    assert_eq!(f.group.as_deref(), Some("web"));
    assert_eq!(f.public_port, 8080);
    // The name leaves the options out, as for ?proxy_protocol.
    assert_eq!(f.name, "8080=127.0.0.1:80");
    assert_eq!(
        parse_forward("udp:5353=127.0.0.1:53?group=dns")?
            .group
            .as_deref(),
        Some("dns")
    );
    // Options combine with `&`, in either order.
    for spec in [
        "8080=127.0.0.1:80?group=web&proxy_protocol=v2",
        "8080=127.0.0.1:80?proxy_protocol=v2&group=web",
    ] {
        let f = parse_forward(spec)?;
        assert_eq!(
            (f.group.as_deref(), f.proxy_protocol),
            (Some("web"), Some(ProxyProtocol::V2)),
            "{spec}"
        );
    }
    // A comma in a socket path stays in the path.
    assert_eq!(
        parse_forward("unix:/run/a,b.sock?group=g")?.target,
        Target::Unix("/run/a,b.sock".into())
    );
    for (bad, says) in [
        ("8080=a:1?group=", "not a group name"),
        ("8080=a:1?group=a b", "not a group name"),
        ("8080=a:1?group=x&colour=red", "unknown option `colour`"),
        ("8080=a:1?group=x&group=y", "given twice"),
        ("unix:/run/x.sock=127.0.0.1:80?group=g", "cannot join one"),
        // What `--forward 8080=a:1,group=web` leaves after the comma.
        ("group=web", "is an option, not a forward"),
    ] {
        let e = parse_forward(bad).expect_err(bad);
        assert!(e.contains(says), "{bad}: {e}");
    }
    let file = parse_agent_file(
        Path::new("agent.toml"),
        &format!(
            "gateway = \"gw:1\"\nkey = \"{KEY}\"\ntransport = \"tcp\"\nforward = [\"8080=a:1?group=web\"]\n\
             [[forwards]]\npublic_port = 9000\ntarget = \"b:2\"\ngroup = \"api\"\n"
        ),
    )
    .map_err(|e| e.to_string())?;
    let c = file.into_config().map_err(|e| e.to_string())?;
    let groups: Vec<_> = c.forwards.iter().map(|f| f.group.as_deref()).collect();
    assert_eq!(groups, [Some("web"), Some("api")]);
    let msg = agent_err("[[forwards]]\ntarget = \"b:2\"\ngroup = \"no good\"\n");
    assert_at(&msg, "conf/agent.toml", 3, "forwards[0].group");
    let msg = agent_err(
        "[[forwards]]\npublic_path = \"/run/a.sock\"\ntarget = \"b:2\"\ngroup = \"web\"\n",
    );
    assert_at(&msg, "conf/agent.toml", 1, "forwards[0].group");
    Ok(())
}

#[test]
fn groups_in_the_gateway_file() -> anyhow::Result<()> {
    let other = SecretKey::generate().hash();
    let agents = format!(
        "[[agents]]\nname = \"a\"\nkey = \"{KEY}\"\nports = [8080]\n\
         [[agents]]\nname = \"b\"\nkey_hash = \"{other}\"\nports = [8080]\n"
    );
    let text = format!("{agents}[[groups]]\nname = \"web\"\nagents = [\"a\", \"b\"]\n");
    let c = parse_gateway_file(Path::new("gw.toml"), &text)?.into_config()?;
    assert_eq!(c.groups.len(), 1);
    assert_eq!(c.groups[0].name, "web");
    assert_eq!(c.groups[0].agents, ["a", "b"]);

    let msg = gateway_err(&format!(
        "{agents}[[groups]]\nname = \"web\"\nagents = [\"a\", \"c\"]\n"
    ));
    assert_at(&msg, "conf/gw.toml", 11, "groups[0].agents[1]");
    assert!(msg.contains("no agent is named \"c\""), "{msg}");
    let msg = gateway_err(&format!(
        "{agents}[[groups]]\nname = \"web\"\nagents = [\"a\"]\n[[groups]]\nname = \"web\"\nagents = [\"b\"]\n"
    ));
    assert_at(&msg, "conf/gw.toml", 13, "groups[1].name");
    let msg = gateway_err(&format!(
        "{agents}[[groups]]\nname = \"web\"\nagents = []\n"
    ));
    assert_at(&msg, "conf/gw.toml", 11, "groups[0].agents");
    // Without [[agents]], the generated key's agent is `default`.
    parse_gateway_file(
        Path::new("gw.toml"),
        "[[groups]]\nname = \"web\"\nagents = [\"default\"]\n",
    )?;

    // --print-config reads back as the same groups.
    let mut printed = c.to_toml(None);
    printed = printed.replacen(burrow::config::MASKED_KEY, KEY, 1);
    let again = parse_gateway_file(Path::new("gw.toml"), &printed)?.into_config()?;
    assert_eq!(again.groups, c.groups, "{printed}");
    Ok(())
}

#[test]
fn several_gateways_each_with_its_trust() -> anyhow::Result<()> {
    const FP1: &str = "SHA256:415e49090663bd175c79524f06bcc79761d84319e3daf9c9c197b6787c6544a0";
    const FP2: &str = "SHA256:00000000000000000000000000000000000000000000000000000000000000aa";
    let fp = |s: &str| Trust::Fingerprint(burrow::tls::parse_fingerprint(s).unwrap());
    let settings = |gateways: &[&str], trust: Vec<Trust>| AgentSettings {
        gateways: Some(gateways.iter().map(|g| GatewaySetting::new(*g)).collect()),
        key: Some(SecretKey::generate()),
        trust: Some(trust),
        ..AgentSettings::default()
    };
    // One fingerprint for every gateway, or one each in order.
    let c = settings(&["a:1", "b:2"], vec![fp(FP1)]).into_config()?;
    assert_eq!(c.gateway, "a:1");
    assert_eq!(c.extra_gateways.len(), 1);
    assert_eq!(c.extra_gateways[0].gateway, "b:2");
    assert_eq!(c.extra_gateways[0].trust, fp(FP1));
    let c = settings(&["a:1", "b:2"], vec![fp(FP1), fp(FP2)]).into_config()?;
    let trusts: Vec<Trust> = c.gateways().into_iter().map(|g| g.trust).collect();
    assert_eq!(trusts, [fp(FP1), fp(FP2)]);
    // A plain gateway among them takes no fingerprint.
    let c = settings(&["a:1", "tcp://b:2"], vec![fp(FP1)]).into_config()?;
    assert_eq!(c.extra_gateways[0].trust, Trust::Plain);
    let err = |s: AgentSettings| match s.into_config() {
        Ok(c) => panic!("accepted {c:?}"),
        Err(e) => e.to_string(),
    };
    let m = err(settings(&["a:1", "b:2", "c:3"], vec![fp(FP1), fp(FP2)]));
    assert!(m.contains("2 fingerprints or CAs for 3 gateways"), "{m}");
    let m = err(settings(&["a:1", "a:1"], vec![fp(FP1)]));
    assert!(m.contains("listed twice"), "{m}");
    let m = err(settings(&["a:1", "tcp://b:2"], vec![fp(FP1), fp(FP2)]));
    assert!(m.starts_with("gateway tcp://b:2: "), "{m}");

    // The file: addresses, or tables with a gateway's own trust; `gateway` and `gateways`
    // do not go together.
    let text = format!(
        "key = \"{KEY}\"\nfingerprint = \"{FP1}\"\ngateways = [\"a:1\", {{ url = \"b:2\", fingerprint = \"{FP2}\", server_name = \"b.example\" }}, \"ws://c:3/burrow\"]\n"
    );
    let c = parse_agent_file(Path::new("agent.toml"), &text)?.into_config()?;
    let gws = c.gateways();
    assert_eq!(gws.len(), 3);
    assert_eq!(gws[0].trust, fp(FP1));
    assert_eq!(gws[1].trust, fp(FP2));
    assert_eq!(gws[1].server_name.as_deref(), Some("b.example"));
    assert_eq!(gws[2].trust, Trust::Plain);
    // --print-config reads back as the same gateways.
    let printed = c.to_toml().replace(burrow::config::MASKED_KEY, KEY);
    let again = parse_agent_file(Path::new("agent.toml"), &printed)?.into_config()?;
    assert_eq!(again.gateways(), gws, "{printed}");
    let msg = agent_err("gateway = \"a:1\"\ngateways = [\"b:2\"]\n");
    assert_at(&msg, "conf/agent.toml", 2, "gateways");
    let msg = agent_err("gateways = []\n");
    assert_at(&msg, "conf/agent.toml", 1, "gateways");
    let msg = agent_err("gateways = [{ url = \"b:2\", colour = 1 }]\n");
    assert!(msg.contains("colour"), "{msg}");
    Ok(())
}

#[test]
fn proxy_protocol_after_a_spec_and_in_a_table() -> Result<(), String> {
    use burrow::config::ProxyProtocol;
    let f = parse_forward("8080=127.0.0.1:80?proxy_protocol=v2")?;
    assert_eq!(f.proxy_protocol, Some(ProxyProtocol::V2));
    assert_eq!(f.public_port, 8080);
    // The name leaves the options out: turning one on keeps the port the gateway keeps.
    assert_eq!(f.name, "8080=127.0.0.1:80");
    let f = parse_forward("unix:/run/app.sock?proxy_protocol=v1")?;
    assert_eq!(f.target, Target::Unix("/run/app.sock".into()));
    assert_eq!(f.proxy_protocol, Some(ProxyProtocol::V1));
    // A `?` that starts no option stays in a unix path.
    let f = parse_forward("unix:/tmp/odd?name.sock")?;
    assert_eq!(f.target, Target::Unix("/tmp/odd?name.sock".into()));
    assert_eq!(f.proxy_protocol, None);
    for (spec, says) in [
        (
            "127.0.0.1:80?proxy_protocol",
            "say which PROXY protocol version",
        ),
        (
            "127.0.0.1:80?proxy_protocol=v3",
            "is not a PROXY protocol version",
        ),
        (
            "127.0.0.1:80?proxy_protcol=v2",
            "unknown option `proxy_protcol`",
        ),
        (
            "udp:127.0.0.1:53?proxy_protocol=v2",
            "a UDP forward cannot carry one",
        ),
    ] {
        let e = parse_forward(spec).unwrap_err();
        assert!(e.contains(says), "{spec}: {e}");
    }
    let s = parse_agent_file(
        Path::new("a.toml"),
        "[[forwards]]\ntarget = \"127.0.0.1:80\"\nproxy_protocol = \"v1\"\n\n\
         [[forwards]]\ntarget = \"unix:/run/app.sock\"\nproxy_protocol = 2\n",
    )
    .map_err(|e| e.to_string())?;
    let pp: Vec<_> = s
        .forwards
        .unwrap()
        .iter()
        .map(|f| f.proxy_protocol)
        .collect();
    assert_eq!(pp, [Some(ProxyProtocol::V1), Some(ProxyProtocol::V2)]);
    let e = agent_err("[[forwards]]\ntarget = \"127.0.0.1:80\"\nproxy_protocol = \"v9\"\n");
    assert_at(&e, "conf/agent.toml", 3, "forwards[0].proxy_protocol");
    let e = agent_err(
        "[[forwards]]\nprotocol = \"udp\"\ntarget = \"127.0.0.1:53\"\nproxy_protocol = \"v1\"\n",
    );
    assert_at(&e, "conf/agent.toml", 4, "forwards[0].proxy_protocol");
    Ok(())
}

#[test]
fn unix_public_endpoints_in_specs_tables_and_grants() -> Result<(), String> {
    let f = parse_forward("unix:/run/burrow/docker.sock=unix:/var/run/docker.sock")?;
    assert_eq!(f.public_path, Some("/run/burrow/docker.sock".into()));
    assert_eq!(f.target, Target::Unix("/var/run/docker.sock".into()));
    assert_eq!(
        f.name,
        "unix:/run/burrow/docker.sock=unix:/var/run/docker.sock"
    );
    let f = parse_forward("unix:/run/burrow/web.sock=127.0.0.1:80?proxy_protocol=v2")?;
    assert_eq!(f.public_path, Some("/run/burrow/web.sock".into()));
    assert_eq!(f.public_port, 0);
    // A target whose own path holds `=` is still a target.
    let f = parse_forward("unix:/tmp/a=b.sock")?;
    assert_eq!(
        (f.public_path, f.target),
        (None, Target::Unix("/tmp/a=b.sock".into()))
    );
    for (spec, says) in [
        ("unix:run/x.sock=127.0.0.1:80", "write it absolute"),
        ("unix:/run/../x.sock=127.0.0.1:80", "`..` component"),
        (
            "udp:unix:/run/x.sock=127.0.0.1:53",
            "a UDP forward's public end is a port",
        ),
    ] {
        let e = parse_forward(spec).unwrap_err();
        assert!(e.contains(says), "{spec}: {e}");
    }
    let s = parse_agent_file(
        Path::new("a.toml"),
        "[[forwards]]\npublic_path = \"/run/burrow/app.sock\"\ntarget = \"127.0.0.1:80\"\n",
    )
    .map_err(|e| e.to_string())?;
    let f = &s.forwards.unwrap()[0];
    assert_eq!(f.public_path, Some("/run/burrow/app.sock".into()));
    assert_eq!(f.name, "unix:/run/burrow/app.sock=127.0.0.1:80");
    let e = agent_err(
        "[[forwards]]\npublic_port = 80\npublic_path = \"/run/a.sock\"\ntarget = \"127.0.0.1:80\"\n",
    );
    assert_at(&e, "conf/agent.toml", 3, "forwards[0].public_path");
    let e = agent_err(
        "forward = [\"unix:/run/a.sock=127.0.0.1:80\", \"unix:/run/a.sock=127.0.0.1:81\"]\n",
    );
    assert!(
        e.contains("public socket /run/a.sock is asked for by both"),
        "{e}"
    );

    let g = parse_gateway_file(
        Path::new("gw.toml"),
        &format!(
            "[[agents]]\nname = \"a\"\nkey = \"{KEY}\"\npaths = [\"/run/burrow/*.sock\"]\n\
             socket_mode = 0o600\n"
        ),
    )
    .map_err(|e| e.to_string())?;
    let grant = &g.agents.unwrap()[0];
    assert!(grant.ports.is_empty(), "paths alone are a grant");
    assert_eq!(grant.paths[0].as_str(), "/run/burrow/*.sock");
    assert_eq!(grant.socket_mode, 0o600);
    let e = gateway_err(&format!(
        "[[agents]]\nname = \"a\"\nkey = \"{KEY}\"\nports = [80]\npaths = [\"run/*.sock\"]\n"
    ));
    assert_at(&e, "conf/gw.toml", 5, "agents[0].paths[0]");
    assert!(e.contains("it must be absolute"), "{e}");
    let e = gateway_err(&format!(
        "[[agents]]\nname = \"a\"\nkey = \"{KEY}\"\npaths = [\"/run/*.sock\"]\nsocket_mode = \"4777\"\n"
    ));
    assert_at(&e, "conf/gw.toml", 5, "agents[0].socket_mode");
    let e = gateway_err(&format!("[[agents]]\nname = \"a\"\nkey = \"{KEY}\"\n"));
    assert!(e.contains("grant at least one port"), "{e}");
    Ok(())
}
