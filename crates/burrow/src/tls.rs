//! TLS for the tunnel: the gateway's identity and the agent's verifiers. (Being written.)

use std::path::Path;
use std::sync::Arc;

use crate::config::Trust;

/// Errors loading or making certificates, phrased for the user.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TlsError(pub String);

/// What the gateway serves: its rustls config and the fingerprint of its certificate.
#[derive(Clone)]
pub struct GatewayIdentity {
    /// Ready-made rustls server config (TLS 1.3 only).
    pub server_config: Arc<rustls::ServerConfig>,
    /// SHA-256 of the leaf certificate (DER).
    pub fingerprint: [u8; 32],
}

/// `SHA256:<64 lowercase hex>`.
pub fn fingerprint_string(fp: &[u8; 32]) -> String {
    let hex: String = fp.iter().map(|b| format!("{b:02x}")).collect();
    format!("SHA256:{hex}")
}

/// Parses `SHA256:<hex>` (case-insensitive, colons between bytes allowed).
pub fn parse_fingerprint(s: &str) -> Result<[u8; 32], TlsError> {
    let _ = s;
    Err(TlsError("not yet".into()))
}

/// Loads the self-signed certificate from `state_dir`, or makes and stores one.
pub fn load_or_create_identity(state_dir: &Path, names: &[String]) -> Result<GatewayIdentity, TlsError> {
    let _ = (state_dir, names);
    Err(TlsError("not yet".into()))
}

/// Loads a CA-signed certificate chain and its key (PEM files).
pub fn load_identity_files(cert: &Path, key: &Path) -> Result<GatewayIdentity, TlsError> {
    let _ = (cert, key);
    Err(TlsError("not yet".into()))
}

/// The agent's rustls client config for `trust` (not for [`Trust::Plain`]).
pub fn client_config(trust: &Trust) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let _ = trust;
    Err(TlsError("not yet".into()))
}
