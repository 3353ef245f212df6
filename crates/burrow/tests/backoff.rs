//! The agent's reconnect schedule, on paused time: exponential, capped, jittered, forever.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use burrow::agent::{Agent, BACKOFF_BASE};
use burrow::config::{AgentConfig, Limits, Trust};
use burrow::proto::auth::SecretKey;
use tokio_util::sync::CancellationToken;

#[tokio::test(start_paused = true)]
async fn reconnect_delays_double_up_to_the_cap_with_jitter() {
    // A port that refuses connections: bound but not listening, and ours for the whole test.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = sock.local_addr().unwrap();
    let max = Duration::from_secs(8);
    let cfg = AgentConfig {
        gateway: addr.to_string(),
        key: SecretKey::generate(),
        trust: Trust::Plain,
        server_name: None,
        extra_gateways: Vec::new(),
        proxy: burrow::transport::ProxyChoice::Direct,
        forwards: Vec::new(),
        private: Default::default(),
        limits: Limits::default(),
        max_backoff: max,
        connect_timeout: burrow::config::DEFAULT_CONNECT_TIMEOUT,
        udp: Default::default(),
        grace: Duration::from_secs(1),
        key_file: None,
        admin: Default::default(),
    };
    let agent = Agent::new(cfg);
    let mut status = agent.status();
    let stop = CancellationToken::new();
    let task = tokio::spawn(agent.run(stop.clone()));

    let mut delays = Vec::new();
    while delays.len() < 12 {
        status.changed().await.unwrap();
        let st = status.borrow_and_update().clone();
        if let Some(d) = st.next_retry {
            assert_eq!(st.failed_attempts as usize, delays.len() + 1);
            assert!(!st.connected);
            assert!(st.last_error.is_some());
            delays.push(d);
        }
    }
    stop.cancel();
    task.await.unwrap().unwrap();

    for (n, d) in delays.iter().enumerate() {
        let ceiling = BACKOFF_BASE.saturating_mul(1 << n.min(20)).min(max);
        assert!(
            *d >= ceiling / 2 && *d <= ceiling,
            "attempt {n}: {d:?} not within [{:?}, {ceiling:?}]",
            ceiling / 2
        );
    }
    // Capped: the later delays never exceed the maximum.
    assert!(delays[8..].iter().all(|d| *d <= max));
    // Jittered: the delays at the cap are not all the same.
    let capped = &delays[6..];
    assert!(capped.iter().any(|d| *d != capped[0]), "{capped:?}");
}
