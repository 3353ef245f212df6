//! End-to-end behaviour of gateway and agent through the library, on loopback.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_64mib_each_way_is_byte_exact() {
    let dir = tempfile::tempdir().unwrap();
    let gw = start_gateway(gateway_config(dir.path())).await;
    let echo = echo_server().await;
    let mut agent = start_agent(agent_config(&gw, vec![forward(0, echo)]));
    let public = granted(&mut agent.status).await[0];
    let data = pattern(64 << 20, 1);
    assert_eq!(echo_roundtrip(public, &data).await, sha(&data));
}
