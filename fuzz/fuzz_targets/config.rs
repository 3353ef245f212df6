//! The TOML config parsers of the `burrow` crate, and the single-value parsers that flags,
//! environment and files share, on arbitrary UTF-8.
//!
//! Checks, besides "no panic" (error messages are rendered too: they compute line numbers
//! and key names from spans):
//! - a gateway file that parses and turns into a `GatewayConfig` yields session parameters
//!   (`GatewayConfig::session_params`, what the gateway offers in AuthOk) that a peer accepts
//!   (`SessionParams::validate`);
//! - an agent file that becomes an `AgentConfig` offers limits (`Limits::stream_limits`, what
//!   the agent sends in Auth) that the gateway's parameters (from the same text when it is
//!   also a valid gateway file, else the defaults) narrow to valid ones;
//! - a connector file parses (or not) and its errors render;
//! - single values round-trip: a parsed `Target`, `PortRange` or forward, a connector's
//!   forward, a `reach` entry, an `allow` pattern and a private service print to text that
//!   parses to the same value; `parse_gateway_addr` is idempotent.
#![no_main]

use std::path::Path;

use burrow::config::{
    parse_agent_file, parse_connect_forward, parse_connector_file, parse_duration, parse_forward,
    parse_gateway_addr, parse_gateway_file, parse_private, PortRange, Reach, Target, TargetPattern,
    TransportKind,
};
use burrow_proto::message::SessionParams;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // Never read: the path only names the file in errors and anchors relative paths.
    let path = Path::new("/nonexistent/burrow-fuzz/burrow.toml");

    // A file with only keys both roles share (`[limits]`, `grace`, ...) is both a gateway and
    // an agent file: then the agent's limits narrow this gateway's parameters.
    let mut gateway = SessionParams::default();
    match parse_gateway_file(path, text) {
        Ok(settings) => match settings.into_config() {
            Ok(config) => {
                let p = config.session_params();
                gateway = p;
                if let Err(e) = p.validate() {
                    panic!("gateway config accepted, but peers refuse its session parameters: {e}\n{p:?}");
                }
            }
            Err(e) => drop(e.to_string()),
        },
        Err(e) => drop(e.to_string()),
    }
    match parse_agent_file(path, text) {
        Ok(settings) => match settings.into_config() {
            Ok(config) => {
                // What the agent offers in Auth, narrowed by the gateway.
                let offered = config.limits.stream_limits();
                let p = gateway.narrowed(&offered);
                if let Err(e) = p.validate() {
                    panic!("agent limits narrow the session to invalid parameters: {e}\n{p:?}");
                }
            }
            Err(e) => drop(e.to_string()),
        },
        Err(e) => drop(e.to_string()),
    }

    // The connector's file, and the values the connector role adds.
    match parse_connector_file(path, text) {
        Ok(settings) => drop(settings.into_config().map_err(|e| e.to_string())),
        Err(e) => drop(e.to_string()),
    }
    if let Ok(f) = parse_connect_forward(text) {
        assert_eq!(
            parse_connect_forward(&f.name),
            Ok(f),
            "a connector forward does not round-trip"
        );
    }
    if let Ok(r) = Reach::parse(text) {
        assert_eq!(
            Reach::parse(&r.to_string()),
            Ok(r),
            "a reach entry does not round-trip"
        );
    }
    if let Ok(p) = TargetPattern::parse(text) {
        assert_eq!(
            TargetPattern::parse(&p.to_string()),
            Ok(p),
            "a pattern does not round-trip"
        );
    }
    if let Ok(p) = parse_private(text) {
        let printed = format!("{}={}", p.name, p.target);
        assert_eq!(
            parse_private(&printed),
            Ok(p),
            "a private service does not round-trip"
        );
    }

    if let Ok(t) = Target::parse(text) {
        let printed = t.to_string();
        assert_eq!(
            Target::parse(&printed),
            Ok(t),
            "target {printed:?} does not round-trip"
        );
    }
    if let Ok(r) = PortRange::parse(text) {
        assert!(r.start >= 1 && r.start <= r.end);
        let printed = r.to_string();
        assert_eq!(
            PortRange::parse(&printed),
            Ok(r),
            "range {printed:?} does not round-trip"
        );
    }
    if let Ok(f) = parse_forward(text) {
        assert_eq!(
            parse_forward(&f.name).as_ref(),
            Ok(&f),
            "forward named {:?} does not parse back",
            f.name
        );
        assert_eq!(Target::parse(&f.target.to_string()), Ok(f.target.clone()));
    }
    if let Ok(a) = parse_gateway_addr(text) {
        assert_eq!(parse_gateway_addr(&a).as_ref(), Ok(&a));
    }
    let _ = parse_duration(text);
    let _ = text.parse::<TransportKind>();
});
