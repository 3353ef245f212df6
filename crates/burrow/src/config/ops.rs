//! The settings for running Burrow as a service: the admin server (`admin`,
//! `admin_token`), the log format, and the agent's `key_file`.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use burrow_proto::auth::SecretKey;

use super::{text, ConfigError, FromToml};
use crate::admin::AdminToken;

/// How log lines are written: `text` (for people) or `json` (one object a line, for log
/// shippers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// The default: human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

impl LogFormat {
    /// The name as written in flags and files.
    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

impl fmt::Display for LogFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            _ => Err(format!("{s:?} is not a log format (use text or json)")),
        }
    }
}

impl FromToml for LogFormat {
    fn from_toml(v: &toml::Value) -> Result<Self, String> {
        text(v)?.parse()
    }
}

impl FromToml for AdminToken {
    fn from_toml(v: &toml::Value) -> Result<Self, String> {
        AdminToken::parse(text(v)?)
    }
}

/// Reads the agent key from `path`: a file holding just the key (`bk_...`, as `burrow
/// keygen` prints it or the gateway keeps it in `agent.key`). Errors never repeat the text.
pub fn read_key_file(path: &Path) -> Result<SecretKey, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigError::Value(format!(
            "cannot read the key file {} (key_file, --key-file, BURROW_KEY_FILE): {e}",
            path.display()
        ))
    })?;
    SecretKey::parse(text.trim()).map_err(|_| {
        ConfigError::Value(format!(
            "the key file {} does not hold an agent key: it should contain only `bk_` \
             followed by 43 base64url characters (as `burrow keygen` prints it, or the \
             gateway's agent.key)",
            path.display()
        ))
    })
}
