//! QUIC sessions in-process: the agent's UDP socket is rebound (`Endpoint::rebind`) in the
//! middle of a transfer, and the transfer completes byte-exact over the migrated connection;
//! opens racing for the last stream slots never pass `max_streams`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use burrow::config::Trust;
use burrow::proto::auth::SecretKey;
use burrow::proto::message::{Open, Role, SessionParams};
use burrow::proto::mux::Side;
use burrow::session::handshake::{self, Verdict};
use burrow::transport::{self, GatewayUrl};
use bytes::Bytes;

/// A gateway-side and an agent-side QUIC session over loopback, authenticated.
async fn quic_pair(dir: &std::path::Path) -> (burrow::session::Started, burrow::session::Started) {
    quic_pair_with(dir, SessionParams::default()).await
}

/// As [`quic_pair`], with the gateway's session parameters `params`.
async fn quic_pair_with(
    dir: &std::path::Path,
    params: SessionParams,
) -> (burrow::session::Started, burrow::session::Started) {
    let id = burrow::tls::load_or_create_identity(dir, &["127.0.0.1".into()]).unwrap();
    let server = quinn::Endpoint::server(
        transport::quic::server_config(id.server_config.clone(), &params).unwrap(),
        "127.0.0.1:0".parse().unwrap(),
    )
    .unwrap();
    let port = server.local_addr().unwrap().port();
    let trust = Trust::Fingerprint(id.fingerprint);
    let tls = burrow::tls::client_config(&trust).unwrap();
    let url = GatewayUrl::parse(&format!("quic://127.0.0.1:{port}")).unwrap();
    let key = SecretKey::generate();
    let hash = key.hash();
    let agent = async {
        let mut c = transport::dial(&url, None, &trust, Some(tls), None)
            .await
            .unwrap();
        let (ok, left) = handshake::client_bound(&mut c.io, &key, Role::Agent, &c.bindings, None)
            .await
            .unwrap();
        c.start(left, Side::Client, ok.params, "gw".into())
    };
    let gateway = async {
        let incoming = server.accept().await.unwrap();
        let mut c = transport::quic::accept(incoming).await.unwrap();
        let bindings = c.bindings;
        let acc = handshake::server_bound(&mut c.io, &bindings, |k, _| {
            assert_eq!(*k, hash);
            Verdict::Accept("agent".into(), params)
        })
        .await
        .unwrap();
        c.start(acc.leftover, Side::Gateway, acc.params, "agent".into())
    };
    let (a, g) = tokio::join!(agent, gateway);
    (g, a)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agents_socket_rebound_mid_transfer_and_the_transfer_completes() {
    let dir = tempfile::tempdir().unwrap();
    let (gw, mut ag) = tokio::time::timeout(Duration::from_secs(10), quic_pair(dir.path()))
        .await
        .unwrap();
    const LEN: usize = 16 << 20;
    let data: Vec<u8> = (0..LEN).map(|i| (i * 131 % 251) as u8).collect();
    let expect = data.clone();
    let open = Open {
        service: 0,
        client: None,
    };
    let sender = gw.session.open(&open).unwrap();
    let send = tokio::spawn(async move {
        for chunk in data.chunks(64 * 1024) {
            sender.send(Bytes::copy_from_slice(chunk)).await.unwrap();
        }
        sender.finish();
        sender
    });
    let stream = tokio::time::timeout(Duration::from_secs(10), ag.incoming.recv())
        .await
        .unwrap()
        .unwrap();
    let quic = ag.session.as_quic().expect("QUIC carries the session");
    let first = quinn_local_port(&ag);
    let mut got = Vec::with_capacity(LEN);
    let mut rebound = false;
    while let Some(chunk) = tokio::time::timeout(Duration::from_secs(30), stream.recv())
        .await
        .expect("data keeps coming")
        .unwrap()
    {
        got.extend_from_slice(&chunk);
        if !rebound && got.len() > LEN / 4 {
            let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            quic.rebind(socket).unwrap();
            rebound = true;
        }
    }
    assert!(rebound, "rebound mid-transfer");
    assert_ne!(quinn_local_port(&ag), first, "the agent's socket moved");
    assert_eq!(got.len(), LEN, "every byte arrived after the rebind");
    assert!(got == expect, "byte-exact across the rebind");
    drop(send.await.unwrap());
    assert!(!gw.session.is_closed(), "the session survived the rebind");
}

/// The agent endpoint's local port.
fn quinn_local_port(s: &burrow::session::Started) -> u16 {
    s.session
        .as_quic()
        .unwrap()
        .local_addr()
        .expect("the agent's endpoint")
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opens_racing_for_the_last_slots_never_pass_max_streams() {
    const MAX: u32 = 32;
    const THREADS: usize = 8;
    const TRIES: usize = 16;
    let dir = tempfile::tempdir().unwrap();
    let params = SessionParams {
        max_streams: MAX,
        ..SessionParams::default()
    };
    let (gw, _ag) =
        tokio::time::timeout(Duration::from_secs(10), quic_pair_with(dir.path(), params))
            .await
            .unwrap();
    let open = Open {
        service: 0,
        client: None,
    };
    // Eight threads try at once, released together; each keeps what it opened.
    let handle = tokio::runtime::Handle::current();
    let start = std::sync::Barrier::new(THREADS);
    let opened: usize = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..THREADS)
            .map(|_| {
                scope.spawn(|| {
                    let _rt = handle.enter();
                    start.wait();
                    (0..TRIES)
                        .filter_map(|_| gw.session.open(&open).ok())
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let held: Vec<Vec<_>> = workers.into_iter().map(|w| w.join().unwrap()).collect();
        let n = held.iter().map(Vec::len).sum();
        assert_eq!(
            gw.session.stream_count(),
            n,
            "the count is the streams held"
        );
        n
    });
    assert_eq!(
        opened, MAX as usize,
        "{THREADS} x {TRIES} opens racing for {MAX} slots opened {opened}"
    );
    assert_eq!(
        gw.session.stream_count(),
        0,
        "every dropped stream gave its slot back"
    );
}
