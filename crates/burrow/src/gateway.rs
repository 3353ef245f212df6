//! The gateway role. (Being written.)

use std::net::SocketAddr;

use tokio_util::sync::CancellationToken;

use crate::config::GatewayConfig;

/// Errors that stop a gateway, phrased for the user.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct GatewayError(pub String);

/// A bound gateway, ready to [`Gateway::run`].
pub struct Gateway {
    config: GatewayConfig,
}

impl Gateway {
    /// Loads or creates the state, binds the tunnel listener.
    pub async fn bind(config: GatewayConfig) -> Result<Gateway, GatewayError> {
        Ok(Gateway { config })
    }
    /// The tunnel listener's address.
    pub fn local_addr(&self) -> SocketAddr {
        self.config.listen
    }
    /// `SHA256:<hex>` of the certificate, or `None` on plain TCP.
    pub fn fingerprint(&self) -> Option<String> {
        None
    }
    /// The `burrow agent ...` line for the generated key, when the gateway uses one.
    pub fn agent_command(&self) -> Option<String> {
        None
    }
    /// Serves until `shutdown` is cancelled, then drains for the grace period.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), GatewayError> {
        shutdown.cancelled().await;
        Ok(())
    }
}
