//! Reaching the gateway: the agent's settings handed to [`crate::dial`], which the connector
//! dials through too.

use std::sync::Arc;

use burrow_proto::message::Role;

use crate::admin::metrics::Tally;
use crate::config::{AgentConfig, GatewayEndpoint};
use crate::dial::Peer;
use crate::session;
use crate::transport;

pub(super) use crate::dial::Failure;

/// Who this agent is to gateway `gw`.
fn peer<'a>(cfg: &'a AgentConfig, gw: &'a GatewayEndpoint) -> Peer<'a> {
    Peer {
        role: Role::Agent,
        gateway: &gw.gateway,
        key: &cfg.key,
        trust: &gw.trust,
        server_name: gw.server_name.as_deref(),
        limits: &cfg.limits,
    }
}

/// Dial (through `proxy`, if any), TLS, handshake: a live session and the features the
/// gateway offers ([`burrow_proto::message::AuthOk::features`]), or a described error.
pub(super) async fn connect(
    cfg: &AgentConfig,
    gw: &GatewayEndpoint,
    url: &transport::GatewayUrl,
    proxy: Option<&transport::ProxyUrl>,
    tls: Option<Arc<rustls::ClientConfig>>,
    tally: &Tally,
) -> Result<(session::Started, u32), Failure> {
    let c = crate::dial::connect(&peer(cfg, gw), url, proxy, tls).await?;
    tally.set_name(&gw.gateway, &c.name);
    Ok((c.started, c.features))
}

/// The gateway URL to dial (see [`crate::dial::gateway_url`]).
pub(super) fn gateway_url(gw: &GatewayEndpoint) -> Result<transport::GatewayUrl, Failure> {
    crate::dial::gateway_url(&gw.gateway, &gw.trust)
}
