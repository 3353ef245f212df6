//! The connector's settings in files: an agent's private services and `allow`, a gateway's
//! `[[connectors]]`, a connector's own file. Each mistake names the file, the line and the
//! key; `--print-config`'s TOML reads back as the same settings.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use burrow::config::{
    load_agent_file, load_connector_file, load_gateway_file, parse_agent_file,
    parse_connector_file, parse_gateway_file, Listen, ReachWhat, Target,
};
use burrow::proto::auth::SecretKey;
use burrow::proto::connect::DialTarget;

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples")
}

#[track_caller]
fn assert_at(msg: &str, file: &str, line: usize, key: &str) {
    let place = format!("{file} line {line}, key {key}:");
    assert!(msg.starts_with(&place), "expected `{place}` in: {msg}");
}

fn gateway_err(text: &str) -> String {
    match parse_gateway_file(Path::new("gw.toml"), text) {
        Ok(s) => panic!("accepted: {s:?}"),
        Err(e) => e.to_string(),
    }
}

fn agent_err(text: &str) -> String {
    match parse_agent_file(Path::new("agent.toml"), text) {
        Ok(s) => panic!("accepted: {s:?}"),
        Err(e) => e.to_string(),
    }
}

fn connector_err(text: &str) -> String {
    match parse_connector_file(Path::new("connect.toml"), text) {
        Ok(s) => panic!("accepted: {s:?}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn the_examples_fit_together() -> anyhow::Result<()> {
    let g = load_gateway_file(&examples().join("gateway.toml"))?.into_config()?;
    let a = load_agent_file(&examples().join("agent.toml"))?.into_config()?;
    let c = load_connector_file(&examples().join("connect.toml"))?.into_config()?;
    let laptop = &g.connectors[0];
    assert_eq!(laptop.key.hash(), c.key.hash());
    assert_eq!(a.key.hash(), g.agents[0].key.hash());
    // Every forward of the connector is in its reach, and every service it names is one
    // the agent offers.
    for f in &c.forwards {
        assert!(laptop.reaches(&f.agent, &f.target), "{f:?}");
        if let (DialTarget::Service(s), "web") = (&f.target, f.agent.as_str()) {
            assert!(a.private.service(s).is_some(), "{s}");
        }
    }
    assert_eq!(a.private.services.len(), 2);
    assert_eq!(a.private.allow.len(), 2);
    assert!(matches!(c.forwards[1].listen, Listen::Unix(_)));
    assert_eq!(c.forwards[2].name, "db-ssh");
    Ok(())
}

#[test]
fn private_services_and_allow_in_an_agent_file() {
    let text = "gateway = \"gw:7443\"\nallow = [\"10.0.0.0/8:22\"]\nprivate = [\"vnc=127.0.0.1:5900\"]\n\n[[forwards]]\nname = \"docker\"\ntarget = \"unix:/var/run/docker.sock\"\npublic = false\n\n[[forwards]]\ntarget = \"127.0.0.1:80\"\n";
    let s = parse_agent_file(Path::new("agent.toml"), text).unwrap();
    let private = s.private.unwrap();
    assert_eq!(
        private.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(),
        ["vnc", "docker"]
    );
    assert_eq!(
        private[1].target,
        Target::Unix(PathBuf::from("/var/run/docker.sock"))
    );
    assert_eq!(
        s.forwards.unwrap().len(),
        1,
        "the public one stays a forward"
    );
    assert_eq!(s.allow.unwrap()[0].to_string(), "10.0.0.0/8:22");

    // A private [[forwards]] entry needs a name, has no public port, and is TCP.
    let no_name = "gateway = \"gw:7443\"\n[[forwards]]\ntarget = \"127.0.0.1:1\"\npublic = false\n";
    let msg = agent_err(no_name);
    assert_at(&msg, "agent.toml", 2, "forwards[0].name");
    assert!(msg.contains("needs a `name`"), "{msg}");
    let port =
        "[[forwards]]\nname = \"x\"\npublic_port = 80\ntarget = \"127.0.0.1:1\"\npublic = false\n";
    assert_at(&agent_err(port), "agent.toml", 1, "forwards[0].public_port");
    let udp = "[[forwards]]\nname = \"x\"\nprotocol = \"udp\"\ntarget = \"127.0.0.1:1\"\npublic = false\n";
    assert_at(&agent_err(udp), "agent.toml", 1, "forwards[0].protocol");
    let reserved = "[[forwards]]\nname = \"targets\"\ntarget = \"127.0.0.1:1\"\npublic = false\n";
    assert!(agent_err(reserved).contains("`targets` is taken"));
    let twice = "private = [\"a=127.0.0.1:1\"]\n[[forwards]]\nname = \"a\"\ntarget = \"127.0.0.1:2\"\npublic = false\n";
    let msg = agent_err(twice);
    assert_at(&msg, "agent.toml", 2, "forwards[0]");
    assert!(msg.contains("two private services are named `a`"), "{msg}");
    let bad_allow = "gateway = \"gw:7443\"\nallow = [\"10.0.0.0/8\"]\n";
    let msg = agent_err(bad_allow);
    assert_at(&msg, "agent.toml", 2, "allow[0]");
    assert!(msg.contains("is not a target pattern"), "{msg}");
    let bad_private = "\n\nprivate = [\"vnc\"]\n";
    assert_at(&agent_err(bad_private), "agent.toml", 3, "private[0]");
}

fn gateway_text(connectors: &str) -> String {
    let agent = SecretKey::generate().hash();
    format!("[[agents]]\nname = \"office\"\nkey_hash = \"{agent}\"\nports = [8080]\n\n{connectors}")
}

#[test]
fn connectors_in_a_gateway_file() {
    let (k1, k2) = (SecretKey::generate(), SecretKey::generate());
    let ok = gateway_text(&format!(
        "[[connectors]]\nname = \"laptop\"\nkey_hash = \"{}\"\nreach = [\"office/vnc\", \"office/*\", \"office/targets\"]\nmax_sessions = 2\n\n[[connectors]]\nname = \"desk\"\nkey = \"{}\"\nreach = [\"office/ssh\"]\n",
        k1.hash(),
        k2.expose()
    ));
    let g = parse_gateway_file(Path::new("gw.toml"), &ok)
        .unwrap()
        .into_config()
        .unwrap();
    assert_eq!(g.connectors.len(), 2);
    let laptop = &g.connectors[0];
    assert_eq!(
        laptop.reach.iter().map(|r| &r.what).collect::<Vec<_>>(),
        [
            &ReachWhat::Service("vnc".into()),
            &ReachWhat::AllServices,
            &ReachWhat::Targets
        ]
    );
    assert_eq!((laptop.max_sessions, laptop.max_streams), (2, 4096));
    assert_eq!(g.connectors[1].max_sessions, 16);

    // An agent the gateway does not know, by file line and key.
    let unknown = gateway_text(&format!(
        "[[connectors]]\nname = \"laptop\"\nkey_hash = \"{}\"\nreach = [\n  \"office/vnc\",\n  \"ofice/ssh\",\n]\n",
        k1.hash()
    ));
    let msg = gateway_err(&unknown);
    assert_at(&msg, "gw.toml", 11, "connectors[0].reach[1]");
    assert!(msg.contains("no agent is named `ofice`"), "{msg}");
    assert!(msg.contains("(agents: office)"), "{msg}");
    // Without [[agents]], the generated key's agent is `default`.
    let default = format!(
        "[[connectors]]\nname = \"laptop\"\nkey_hash = \"{}\"\nreach = [\"default/vnc\"]\n",
        k1.hash()
    );
    parse_gateway_file(Path::new("gw.toml"), &default).unwrap();

    let bad_reach = gateway_text(&format!(
        "[[connectors]]\nname = \"laptop\"\nkey_hash = \"{}\"\nreach = [\"office\"]\n",
        k1.hash()
    ));
    let msg = gateway_err(&bad_reach);
    assert_at(&msg, "gw.toml", 9, "connectors[0].reach[0]");
    assert!(msg.contains("AGENT/SERVICE"), "{msg}");
    let empty = gateway_text(&format!(
        "[[connectors]]\nname = \"laptop\"\nkey_hash = \"{}\"\nreach = []\n",
        k1.hash()
    ));
    assert_at(&gateway_err(&empty), "gw.toml", 9, "connectors[0].reach");
    let zero = gateway_text(&format!(
        "[[connectors]]\nname = \"laptop\"\nkey_hash = \"{}\"\nreach = [\"office/*\"]\nmax_streams = 0\n",
        k1.hash()
    ));
    assert_at(
        &gateway_err(&zero),
        "gw.toml",
        10,
        "connectors[0].max_streams",
    );
    let shared = gateway_text(&format!(
        "[[connectors]]\nname = \"a\"\nkey_hash = \"{h}\"\nreach = [\"office/*\"]\n\n[[connectors]]\nname = \"b\"\nkey_hash = \"{h}\"\nreach = [\"office/*\"]\n",
        h = k1.hash()
    ));
    let msg = gateway_err(&shared);
    assert_at(&msg, "gw.toml", 13, "connectors[1].key_hash");
    let typo = gateway_text(&format!(
        "[[connectors]]\nname = \"a\"\nkey_hash = \"{}\"\nreach = [\"office/*\"]\nreatch = 1\n",
        k1.hash()
    ));
    let msg = gateway_err(&typo);
    assert_at(&msg, "gw.toml", 10, "connectors[0].reatch");
    assert!(msg.contains("did you mean `reach`"), "{msg}");
}

#[test]
fn a_connector_file() {
    let key = SecretKey::generate();
    let text = format!(
        "gateway = \"gw:7443\"\nkey = \"{}\"\ntransport = \"tcp\"\nforward = [\"5901=office/vnc\"]\n\n[[forwards]]\nlisten = 2222\nagent = \"office\"\ntarget = \"10.0.0.5:22\"\n\n[[forwards]]\nlisten = \"unix:/tmp/d.sock\"\nagent = \"office\"\nservice = \"docker\"\n",
        key.expose()
    );
    let c = parse_connector_file(Path::new("connect.toml"), &text)
        .unwrap()
        .into_config()
        .unwrap();
    assert_eq!(c.forwards.len(), 3);
    assert_eq!(c.forwards[0].target, DialTarget::Service("vnc".into()));
    assert_eq!(
        c.forwards[1].listen,
        Listen::Tcp("127.0.0.1:2222".parse().unwrap())
    );
    assert_eq!(
        c.forwards[1].target,
        DialTarget::Address("10.0.0.5:22".into())
    );
    assert_eq!(c.forwards[1].name, "127.0.0.1:2222=office/10.0.0.5:22");
    assert_eq!(c.forwards[2].listen, Listen::Unix("/tmp/d.sock".into()));

    let bad =
        "gateway = \"gw:7443\"\n\nforward = [\n  \"5901=office/vnc\",\n  \"5902:office/vnc\",\n]\n";
    let msg = connector_err(bad);
    assert_at(&msg, "connect.toml", 5, "forward[1]");
    let both = "[[forwards]]\nlisten = 1\nagent = \"a\"\nservice = \"s\"\ntarget = \"h:1\"\n";
    let msg = connector_err(both);
    assert_at(&msg, "connect.toml", 1, "forwards[0]");
    assert!(msg.contains("one of them"), "{msg}");
    let service_as_target = "[[forwards]]\nlisten = 1\nagent = \"a\"\ntarget = \"vnc\"\n";
    assert_at(
        &connector_err(service_as_target),
        "connect.toml",
        1,
        "forwards[0].target",
    );
    let twice = "forward = [\"5901=a/x\", \"127.0.0.1:5901=a/y\"]\n";
    let msg = connector_err(twice);
    assert_at(&msg, "connect.toml", 1, "forward[1]");
    assert!(msg.contains("both listen on 127.0.0.1:5901"), "{msg}");
    // Nothing to connect is said so, with every place the forwards can come from.
    let none = format!(
        "gateway = \"gw:7443\"\nkey = \"{}\"\ntransport = \"tcp\"\n",
        key.expose()
    );
    let err = parse_connector_file(Path::new("connect.toml"), &none)
        .unwrap()
        .into_config()
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("--forward LISTEN=AGENT/SERVICE") && err.contains("BURROW_FORWARD"),
        "{err}"
    );
}

#[test]
fn print_config_reads_back_as_the_same_settings() {
    // The agent, with private services and allow patterns.
    let a = load_agent_file(&examples().join("agent.toml"))
        .unwrap()
        .into_config()
        .unwrap();
    let text = a.to_toml().replace("bk_****", &a.key.expose());
    let back = parse_agent_file(Path::new("p.toml"), &text)
        .unwrap()
        .into_config()
        .unwrap();
    assert_eq!(back.private, a.private, "{text}");
    assert_eq!(back.forwards, a.forwards);

    // The gateway, with its connectors.
    let g = load_gateway_file(&examples().join("gateway.toml"))
        .unwrap()
        .into_config()
        .unwrap();
    let text = g.to_toml(None);
    assert!(text.contains("[[connectors]]"), "{text}");
    // Keys are masked; the example's keyed agent is put back.
    let db_key = "bk_5JG9gAt6USx2Cm5GCBiq-AdRjUxOI2NSRKwsBWYJGSU";
    let back = parse_gateway_file(Path::new("p.toml"), &text.replace("bk_****", db_key))
        .unwrap()
        .into_config()
        .unwrap();
    assert_eq!(back.connectors, g.connectors, "{text}");

    // The connector, in both the compact and the table form.
    let c = load_connector_file(&examples().join("connect.toml"))
        .unwrap()
        .into_config()
        .unwrap();
    let text = c.to_toml();
    assert!(
        !text.contains(&c.key.expose()[3..]),
        "the key is masked: {text}"
    );
    let back = parse_connector_file(
        Path::new("p.toml"),
        &text.replace("bk_****", &c.key.expose()),
    )
    .unwrap()
    .into_config()
    .unwrap();
    assert_eq!(back.forwards, c.forwards, "{text}");
    assert_eq!(back.gateway, c.gateway);
    assert_eq!(back.trust, c.trust);
    assert_eq!(back.max_backoff, c.max_backoff);
}
