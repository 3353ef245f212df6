//! Datagrams in the session, over an in-memory pipe: they arrive byte-exact in both
//! directions, a full queue drops and counts instead of waiting, a flood of them does not
//! stall a stream beside it, and a role that carries no UDP treats one as a protocol error.
//! An agent serving UDP flows closes the session with `Protocol`, which the gateway's end sees
//! as the reason, for a malformed datagram frame: one for a flow it never saw that does not
//! carry its origin, one larger than UDP carries, one naming a service not granted. (The
//! gateway's side, a reply for a flow it never opened or an oversized one, is `a10` and `a11`
//! in `abuse.rs`.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use burrow::proto::message::{Datagram, Open, SessionParams, MAX_DATAGRAM};
use burrow::proto::mux::Side;
use burrow::proto::ErrorCode;
use burrow::session::{self, Started};
use bytes::{Bytes, BytesMut};

fn pair() -> (Started, Started) {
    common::session_pair(SessionParams::default())
}

fn origin() -> Option<Open> {
    Some(Open {
        service: 1,
        client: Some("192.0.2.1:5353".parse().unwrap()),
    })
}

#[tokio::test]
async fn datagrams_of_every_size_arrive_byte_exact_both_ways() {
    let (gw, mut ag) = pair();
    let mut gw_in = gw.datagrams;
    for (i, len) in [1usize, 512, 1400, 8192, MAX_DATAGRAM]
        .into_iter()
        .enumerate()
    {
        let data = Bytes::from((0..len).map(|b| (b * 7 + i) as u8).collect::<Vec<u8>>());
        let out = Datagram {
            flow: 1 + 2 * i as u32,
            origin: origin(),
            data: data.clone(),
        };
        assert!(gw.session.send_datagram(&out));
        let got = tokio::time::timeout(Duration::from_secs(5), ag.datagrams.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got, out, "{len} bytes, gateway to agent");
        let back = Datagram {
            flow: out.flow,
            origin: None,
            data,
        };
        assert!(ag.session.send_datagram(&back));
        let got = tokio::time::timeout(Duration::from_secs(5), gw_in.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got, back, "{len} bytes, agent to gateway");
    }
    let c = gw.session.datagram_counters();
    assert_eq!(c.sent.load(Ordering::Relaxed), 5);
    assert_eq!(c.received.load(Ordering::Relaxed), 5);
}

#[tokio::test]
async fn a_full_queue_drops_and_counts_instead_of_waiting() {
    // A peer that does not read: nothing leaves the queue once the pipe is full.
    let (a, _b) = tokio::io::duplex(64 * 1024);
    let gw = session::start(
        Box::new(a),
        BytesMut::new(),
        Side::Gateway,
        SessionParams::default(),
        "gw".into(),
    );
    let d = Datagram {
        flow: 1,
        origin: origin(),
        data: Bytes::from(vec![0u8; 8192]),
    };
    let mut sent = 0u64;
    let mut dropped = 0u64;
    for _ in 0..1000 {
        if gw.session.send_datagram(&d) {
            sent += 1;
        } else {
            dropped += 1;
        }
    }
    tokio::task::yield_now().await;
    let c = gw.session.datagram_counters();
    assert!(dropped > 0, "some were dropped ({sent} queued)");
    assert!(
        sent * 8192 <= (session::DATAGRAM_QUEUE + 128 * 1024) as u64,
        "the queue holds about {} bytes, not {sent} datagrams",
        session::DATAGRAM_QUEUE
    );
    assert_eq!(c.dropped_out.load(Ordering::Relaxed), dropped);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_datagram_flood_does_not_stall_a_stream() {
    let (gw, mut ag) = pair();
    let flood = {
        let session = gw.session.clone();
        tokio::spawn(async move {
            let d = Datagram {
                flow: 1,
                origin: origin(),
                data: Bytes::from(vec![9u8; 1400]),
            };
            let start = tokio::time::Instant::now();
            let mut n = 0u64;
            while start.elapsed() < Duration::from_secs(2) && n < 2_000_000 {
                session.send_datagram(&d);
                n += 1;
                if n.is_multiple_of(64) {
                    tokio::task::yield_now().await;
                }
            }
            n
        })
    };
    let s = gw
        .session
        .open(&Open {
            service: 0,
            client: None,
        })
        .unwrap();
    let r = ag.incoming.recv().await.unwrap();
    let payload = Bytes::from(vec![3u8; 4 << 20]);
    let send = async {
        s.send(payload.clone()).await.unwrap();
        s.finish();
    };
    let recv = async {
        let mut got = 0usize;
        while let Some(chunk) = r.recv().await.unwrap() {
            assert!(chunk.iter().all(|&b| b == 3));
            got += chunk.len();
        }
        got
    };
    let (_, got) =
        tokio::time::timeout(Duration::from_secs(10), async { tokio::join!(send, recv) })
            .await
            .expect("the stream moved 4 MiB beside the flood");
    assert_eq!(got, 4 << 20);
    let n = flood.await.unwrap();
    let c = ag.session.datagram_counters();
    eprintln!(
        "{n} datagrams offered; agent received {} and dropped {}",
        c.received.load(Ordering::Relaxed),
        c.dropped_in.load(Ordering::Relaxed)
    );
    drop(ag.datagrams);
}

#[tokio::test]
async fn a_role_without_udp_treats_a_datagram_as_a_protocol_error() {
    let (gw, ag) = pair();
    drop(ag.datagrams);
    let d = Datagram {
        flow: 1,
        origin: origin(),
        data: Bytes::from_static(b"x"),
    };
    assert!(gw.session.send_datagram(&d));
    let end = tokio::time::timeout(Duration::from_secs(5), ag.session.closed())
        .await
        .unwrap();
    assert_eq!(end.code, ErrorCode::Protocol, "{end}");
}

/// A UDP echo on loopback.
async fn udp_echo() -> std::net::SocketAddr {
    let s = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = s.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 70_000];
        while let Ok((n, from)) = s.recv_from(&mut buf).await {
            let _ = s.send_to(&buf[..n], from).await;
        }
    });
    addr
}

/// The agent's end of a session pair serving one UDP service (id 1, toward a UDP echo),
/// granted or not; the gateway's end is returned to play the gateway by hand.
async fn agent_serving_udp(granted: bool) -> Started {
    let (gw, ag) = pair();
    let target = udp_echo().await;
    let service = burrow::udp::UdpService {
        name: "udp:echo".into(),
        host: target.ip().to_string(),
        port: target.port(),
        counters: Default::default(),
        stop: Default::default(),
    };
    tokio::spawn(burrow::udp::serve_agent_flows(
        ag.session.clone(),
        ag.datagrams,
        std::sync::Arc::new(std::sync::Mutex::new([(1, service)].into())),
        std::sync::Arc::new(std::sync::Mutex::new(vec![false, granted])),
        burrow::udp::UdpSettings::default(),
    ));
    // Keep the agent's end alive as long as the gateway's.
    let session = ag.session;
    let gw_session = gw.session.clone();
    tokio::spawn(async move {
        gw_session.closed().await;
        drop(session);
    });
    gw
}

/// What the gateway's end sees when the agent closes the session.
async fn closed_by_agent(gw: &Started) -> burrow::session::SessionEnd {
    let end = tokio::time::timeout(Duration::from_secs(5), gw.session.closed())
        .await
        .expect("the agent closed the session");
    assert!(end.by_peer, "closed by the agent: {end}");
    end
}

#[tokio::test]
async fn a_flow_the_agent_never_saw_without_its_origin_closes_the_session_with_protocol() {
    let mut gw = agent_serving_udp(true).await;
    // A proper flow first: it echoes, tagged with its flow and no origin.
    let hello = Datagram {
        flow: 1,
        origin: origin(),
        data: Bytes::from_static(b"hello"),
    };
    assert!(gw.session.send_datagram(&hello));
    let back = tokio::time::timeout(Duration::from_secs(5), gw.datagrams.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (back.flow, back.origin, &back.data[..]),
        (1, None, &b"hello"[..])
    );
    // Flow 3 was never opened, and this datagram does not say where it belongs.
    let stray = Datagram {
        flow: 3,
        origin: None,
        data: Bytes::from_static(b"stray"),
    };
    assert!(gw.session.send_datagram(&stray));
    let end = closed_by_agent(&gw).await;
    assert_eq!(end.code, ErrorCode::Protocol, "{end}");
    assert!(end.detail.contains("flow 3 without its origin"), "{end}");
}

#[tokio::test]
async fn an_oversized_datagram_from_the_gateway_closes_the_session_with_protocol() {
    let gw = agent_serving_udp(true).await;
    let big = Datagram {
        flow: 1,
        origin: origin(),
        data: Bytes::from(vec![7u8; MAX_DATAGRAM + 1]),
    };
    assert!(gw.session.send_datagram(&big), "it fits a frame");
    let end = closed_by_agent(&gw).await;
    assert_eq!(end.code, ErrorCode::Protocol, "{end}");
    assert!(end.detail.contains("more than UDP's 65507"), "{end}");
}

#[tokio::test]
async fn a_datagram_for_a_service_not_granted_closes_the_session_with_protocol() {
    let gw = agent_serving_udp(false).await;
    let d = Datagram {
        flow: 1,
        origin: origin(),
        data: Bytes::from_static(b"x"),
    };
    assert!(gw.session.send_datagram(&d));
    let end = closed_by_agent(&gw).await;
    assert_eq!(end.code, ErrorCode::Protocol, "{end}");
    assert!(end.detail.contains("not a granted UDP service"), "{end}");
}
