//! The agent's own check of every connector stream, against a gateway that asks for
//! anything: the library's session on the gateway side, played by the test, opening streams
//! with Dials no honest gateway would send.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use burrow::config::{parse_private, AgentConfig, Limits, PrivateConfig, TargetPattern, Trust};
use burrow::proto::auth::SecretKey;
use burrow::proto::connect::{Announce, Dial, DialTarget, DIAL_SERVICE};
use burrow::proto::message::{Bind, BindResult, Open, SessionParams};
use burrow::proto::mux::Side;
use burrow::proto::{ErrorCode, Kind};
use burrow::session::{self, handshake, StreamError};
use burrow::transport::BoxIo;
use common::{forward_named, start_agent, within};
use tokio::net::TcpListener;

/// A listener that counts the connections it accepts (and holds them open).
async fn counting_listener() -> (SocketAddr, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let c = count.clone();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = l.accept().await {
            c.fetch_add(1, Ordering::SeqCst);
            held.push(s);
        }
    });
    (addr, count)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rogue_gateway_cannot_make_the_agent_connect_outside_its_private_services_and_allow() {
    let rogue = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (vnc, vnc_count) = counting_listener().await;
    let (allowed, allowed_count) = counting_listener().await;
    let (forbidden, forbidden_count) = counting_listener().await;
    let (public, public_count) = counting_listener().await;
    // The address named as the connector's client: never dialed.
    let (named, named_count) = counting_listener().await;

    let cfg = AgentConfig {
        gateway: rogue.local_addr().unwrap().to_string(),
        key: SecretKey::generate(),
        trust: Trust::Plain,
        server_name: None,
        extra_gateways: Vec::new(),
        proxy: burrow::transport::ProxyChoice::Direct,
        forwards: vec![forward_named(
            0,
            burrow::config::Target::Tcp {
                host: public.ip().to_string(),
                port: public.port(),
            },
            "web",
        )],
        private: PrivateConfig {
            services: vec![parse_private(&format!("vnc={vnc}")).unwrap()],
            allow: vec![TargetPattern::parse(&allowed.to_string()).unwrap()],
        },
        limits: Limits::default(),
        max_backoff: Duration::from_millis(500),
        connect_timeout: burrow::config::DEFAULT_CONNECT_TIMEOUT,
        udp: Default::default(),
        grace: Duration::from_secs(1),
        key_file: None,
        admin: Default::default(),
    };
    let agent = start_agent(cfg);

    let (tcp, _) = within(Duration::from_secs(10), "agent dials", rogue.accept())
        .await
        .unwrap();
    let mut io: BoxIo = Box::new(tcp);
    let acc = handshake::server(&mut io, &[0; 32], |_, _| {
        handshake::Verdict::Accept("victim".into(), SessionParams::default())
    })
    .await
    .unwrap();
    let started = session::start(io, acc.leftover, Side::Gateway, acc.params, "rogue".into());
    let session = started.session;
    let mut control = started.control;
    // Grant the public forward and take the announce.
    let mut announced = Vec::new();
    while announced.len() < 2 {
        let f = within(Duration::from_secs(5), "bind and announce", control.recv())
            .await
            .unwrap();
        let (service, name) = match f.header.kind {
            Kind::Bind => {
                let b = Bind::decode(&f.payload).unwrap();
                (b.service, b.name)
            }
            Kind::Announce => {
                let a = Announce::decode(&f.payload).unwrap();
                (a.service, a.name)
            }
            other => panic!("unexpected {other:?}"),
        };
        session.send_control(
            BindResult {
                service,
                code: ErrorCode::Normal,
                text: "127.0.0.1:1".into(),
            }
            .to_frame(),
        );
        announced.push((f.header.kind, name));
    }
    assert!(
        announced.contains(&(Kind::Announce, "vnc".into())),
        "{announced:?}"
    );

    let open = Open {
        service: DIAL_SERVICE,
        client: Some(named),
    };
    let dial = |target: DialTarget, probe: bool| Dial {
        agent: "victim".into(),
        target,
        connector: "rogue's friend".into(),
        probe,
    };
    let refused = |target: DialTarget| {
        let s = session.open_dial(&open, &dial(target, false)).unwrap();
        async move {
            let r = within(Duration::from_secs(5), "a refusal", s.recv()).await;
            match r {
                Err(StreamError::Reset(code)) => code,
                other => panic!("not refused: {other:?}"),
            }
        }
    };
    // A service the agent does not offer, a public forward named as if it were private, a
    // target outside allow (by address and by name), and an Open with the dial service id
    // but no Dial.
    assert_eq!(
        refused(DialTarget::Service("nope".into())).await,
        ErrorCode::NoSuchService
    );
    assert_eq!(
        refused(DialTarget::Service("web".into())).await,
        ErrorCode::NoSuchService
    );
    assert_eq!(
        refused(DialTarget::Address(forbidden.to_string())).await,
        ErrorCode::TargetNotAllowed
    );
    assert_eq!(
        refused(DialTarget::Address(format!(
            "localhost:{}",
            forbidden.port()
        )))
        .await,
        ErrorCode::TargetNotAllowed
    );
    assert_eq!(
        refused(DialTarget::Address("not an address".into())).await,
        ErrorCode::TargetNotAllowed
    );
    let bare = session.open(&open).unwrap();
    assert_eq!(
        within(Duration::from_secs(5), "bare open", bare.recv())
            .await
            .unwrap_err(),
        StreamError::Reset(ErrorCode::TargetNotAllowed)
    );

    // A probe of an allowed target is answered with a clean end, and connects nothing.
    let probe = session
        .open_dial(&open, &dial(DialTarget::Address(allowed.to_string()), true))
        .unwrap();
    probe.finish();
    let answer = within(Duration::from_secs(5), "probe", probe.recv()).await;
    assert_eq!(answer, Ok(None), "allowed");
    assert_eq!(allowed_count.load(Ordering::SeqCst), 0, "a probe connected");

    // Control: what is allowed does connect, so the counters would have seen anything else.
    let _vnc = session
        .open_dial(&open, &dial(DialTarget::Service("vnc".into()), false))
        .unwrap();
    let _allowed = session
        .open_dial(
            &open,
            &dial(DialTarget::Address(allowed.to_string()), false),
        )
        .unwrap();
    within(Duration::from_secs(5), "allowed streams connect", async {
        while vnc_count.load(Ordering::SeqCst) == 0 || allowed_count.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert_eq!(
        forbidden_count.load(Ordering::SeqCst),
        0,
        "a target outside allow was dialed"
    );
    assert_eq!(
        public_count.load(Ordering::SeqCst),
        0,
        "a public forward was reached by name"
    );
    assert_eq!(
        named_count.load(Ordering::SeqCst),
        0,
        "the client's address was dialed"
    );
    assert!(!session.is_closed(), "refusals do not end the session");
    agent.stop.cancel();
    let _ = within(Duration::from_secs(10), "agent stops", agent.task).await;
}
