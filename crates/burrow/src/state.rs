//! The gateway's state directory. (Being written.)

use std::path::{Path, PathBuf};

use burrow_proto::auth::SecretKey;

/// The default state directory: `$BURROW_STATE_DIR` is handled by the CLI; this is the fallback.
pub fn default_state_dir() -> PathBuf {
    PathBuf::from("burrow-state")
}

/// Loads the generated agent key from `dir`, or makes and stores one. Returns the key and
/// whether it was created now.
pub fn load_or_create_agent_key(dir: &Path) -> std::io::Result<(SecretKey, bool)> {
    let _ = dir;
    Ok((SecretKey::generate(), true))
}
