//! What the admin server's write requests take and answer: `POST /api/reload` and the
//! tokens (`GET`, `POST /api/tokens`, `DELETE /api/tokens/NAME`). The same shapes on the
//! server and in `burrow token`.

use serde::{Deserialize, Serialize};

/// An answer other than success: an HTTP status and what went wrong, for the user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// The HTTP status (4xx: the request or the config file; 5xx: the server).
    pub status: u16,
    /// What is wrong and what to do.
    pub message: String,
}

impl ApiError {
    /// An error with `status`.
    pub fn new(status: u16, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// What a reload changed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReloadReport {
    /// The file read again.
    pub file: String,
    /// What changed, one line each (`agent `b` added`, `forward web removed`).
    pub changes: Vec<String>,
    /// Agents (gateway) or forwards (agent) left as they were.
    pub unchanged: usize,
    /// Settings that changed in the file but take a restart; they were left as they were.
    pub restart_needed: Vec<String>,
}

impl std::fmt::Display for ReloadReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "config reloaded from {}: ", self.file)?;
        if self.changes.is_empty() {
            f.write_str("nothing changed")?;
        } else {
            f.write_str(&self.changes.join("; "))?;
        }
        write!(f, "; {} unchanged", self.unchanged)?;
        if !self.restart_needed.is_empty() {
            write!(
                f,
                "; needs a restart, left as it was: {}",
                self.restart_needed.join(", ")
            )?;
        }
        Ok(())
    }
}

/// `POST /api/tokens`: a token to make.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRequest {
    /// The agent's name.
    pub name: String,
    /// The ports it may bind, as in `[[agents]] ports` (`9000-9010`, `5353/udp`).
    pub ports: Vec<String>,
    /// How long it is accepted, in milliseconds; for ever without.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_ms: Option<u64>,
}

/// One token, as `GET /api/tokens` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRow {
    /// The agent's name.
    pub name: String,
    /// Its key's hash (the key is not kept).
    pub key_hash: String,
    /// The ports it may bind.
    pub ports: Vec<String>,
    /// When it was made (RFC 3339).
    pub created: String,
    /// When it expires (RFC 3339), if ever.
    pub expires: Option<String>,
    /// When it was revoked (RFC 3339).
    pub revoked: Option<String>,
    /// `active`, `expired` or `revoked`.
    pub state: String,
    /// Whether its agent has a session now.
    pub connected: bool,
    /// When its agent's last session ended (RFC 3339), since the gateway started.
    pub last_seen: Option<String>,
}

/// `POST /api/tokens`'s answer: the token and its key, shown this once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreatedToken {
    /// The token.
    pub token: TokenRow,
    /// Its key (`bk_…`): the gateway does not keep it.
    pub key: String,
    /// The `burrow agent …` line with the key.
    pub agent_line: Option<String>,
}
