//! The gateway's state directory: its self-signed certificate (see [`crate::tls`]) and the
//! generated agent key.
//!
//! Files here hold secrets, so the directory is created `0700` and private files `0600`
//! (on Unix). Every file is written to a temporary name, synced and renamed into place, so a
//! crash never leaves a half-written key behind.
//!
//! Whoever can write to the directory or its files can plant a key of their own (and log in
//! as the default agent) or a certificate of their own, so before using an existing
//! directory the gateway checks it ([`check_state_dir`]): the directory and its files must
//! belong to this user (or root) and be writable by nobody else. If not, it refuses to start,
//! or with `allow_insecure_state` only warns. Files readable by others get a warning.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use burrow_proto::auth::SecretKey;

/// File name of the generated agent key inside the state directory.
pub const AGENT_KEY_FILE: &str = "agent.key";

/// The default state directory: `$BURROW_STATE_DIR` is handled by the CLI; this is the fallback.
pub fn default_state_dir() -> PathBuf {
    PathBuf::from("burrow-state")
}

/// Loads the generated agent key from `dir`, or makes and stores one. Returns the key and
/// whether it was created now.
///
/// The key lives in `dir/agent.key` in its `bk_...` text form, mode `0600`; `dir` is created
/// (`0700`) if missing. A file that cannot be read or does not hold a key is an error that
/// names the file and says what to do.
pub fn load_or_create_agent_key(dir: &Path) -> io::Result<(SecretKey, bool)> {
    let path = dir.join(AGENT_KEY_FILE);
    match fs::read_to_string(&path) {
        Ok(text) => {
            warn_if_readable_by_others(&path);
            let key = SecretKey::parse(&text).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "{}: {e}; delete the file to make a new key \
                         (agents will then need the new key)",
                        path.display()
                    ),
                )
            })?;
            Ok((key, false))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            ensure_private_dir(dir)?;
            let key = SecretKey::generate();
            write_private_file(&path, format!("{}\n", key.expose()).as_bytes())?;
            Ok((key, true))
        }
        Err(e) => Err(io::Error::new(
            e.kind(),
            format!("cannot read agent key {}: {e}", path.display()),
        )),
    }
}

/// The generated agent key in `dir`, if there is one, without making one (for
/// `--print-config`, which changes nothing).
pub fn read_agent_key(dir: &Path) -> io::Result<Option<SecretKey>> {
    let path = dir.join(AGENT_KEY_FILE);
    match fs::read_to_string(&path) {
        Ok(text) => SecretKey::parse(&text).map(Some).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: {e}", path.display()),
            )
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io::Error::new(
            e.kind(),
            format!("cannot read agent key {}: {e}", path.display()),
        )),
    }
}

/// Creates `dir` (and missing parents) with mode `0700` if it does not exist.
pub(crate) fn ensure_private_dir(dir: &Path) -> io::Result<()> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder.create(dir).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot create state directory {}: {e}", dir.display()),
        )
    })
}

/// Writes `contents` to `path` with mode `0600`: to a temporary file first, synced, then
/// renamed over `path`.
pub(crate) fn write_private_file(path: &Path, contents: &[u8]) -> io::Result<()> {
    let named =
        |e: io::Error| io::Error::new(e.kind(), format!("cannot write {}: {e}", path.display()));
    let file_name = path
        .file_name()
        .ok_or_else(|| named(io::Error::from(io::ErrorKind::InvalidInput)))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(file_name);
    tmp_name.push(format!(".tmp-{}", std::process::id()));
    let tmp = path.with_file_name(tmp_name);

    // A stale temporary file from a crashed run may have other permissions; start afresh.
    match fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(named(e)),
    }
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let result = (|| {
        let mut file = options.open(&tmp)?;
        file.write_all(contents)?;
        file.sync_all()?;
        drop(file);
        fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(named(e));
    }
    // Make the rename durable; not every platform can sync a directory, so this is best effort.
    if let Some(parent) = path.parent() {
        if let Ok(dir) = fs::File::open(parent) {
            let _ = dir.sync_all();
        }
    }
    Ok(())
}

/// Logs a warning when a file holding a secret can be read or written by group or others,
/// naming which.
pub fn warn_if_readable_by_others(path: &Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(meta) = fs::metadata(path) {
            let mode = meta.permissions().mode() & 0o777;
            let what = match (mode & 0o044 != 0, mode & 0o022 != 0) {
                (true, true) => "readable and writable",
                (true, false) => "readable",
                (false, true) => "writable",
                (false, false) => return,
            };
            tracing::warn!(
                file = %path.display(),
                mode = format_args!("{mode:o}"),
                "file with a secret is {what} by other users: run `chmod 600` on it"
            );
        }
    }
    #[cfg(not(unix))]
    let _ = path;
}

/// The files of a state directory.
const STATE_FILES: [&str; 3] = [AGENT_KEY_FILE, crate::tls::KEY_FILE, crate::tls::CERT_FILE];

/// Checks that nobody but this user (or root) can change the state directory `dir` or its
/// files, before they are trusted: a key or certificate planted there would be used. A
/// directory that does not exist yet passes (it is created `0700`).
///
/// What is wrong makes an error that says what to do, unless `allow_insecure` is set: then
/// each problem is a warning. (Secret files that others can only read are warned about
/// where they are read.)
pub fn check_state_dir(dir: &Path, allow_insecure: bool) -> io::Result<()> {
    let problems = state_dir_problems(dir)?;
    if problems.is_empty() {
        return Ok(());
    }
    if allow_insecure {
        for p in &problems {
            tracing::warn!(
                "state directory not private: {p} (used anyway: allow_insecure_state is set)"
            );
        }
        return Ok(());
    }
    Err(io::Error::new(
        io::ErrorKind::PermissionDenied,
        format!(
            "refusing to use state directory {dir}: {}, so another user could plant a key or \
             certificate there. Give it to this user and make it private (`chown -R $(id -un) \
             {dir} && chmod 700 {dir} && chmod 600 {dir}/*`), choose another --state-dir, or \
             pass --allow-insecure-state to use it anyway",
            problems.join("; "),
            dir = dir.display()
        ),
    ))
}

/// [`check_state_dir`] on the gateway's state directory, when `config` uses it: for the
/// self-signed certificate (TLS without `tls_cert`) or the generated key (no `[[agents]]`).
pub fn check_gateway_state(config: &crate::config::GatewayConfig) -> io::Result<()> {
    let self_signed =
        config.transport == crate::config::TransportKind::Tls && config.tls_cert.is_none();
    if self_signed || config.agents.is_empty() {
        check_state_dir(&config.state_dir, config.allow_insecure_state)?;
    }
    Ok(())
}

/// What is wrong with `dir` and its files, one sentence each.
#[cfg(unix)]
fn state_dir_problems(dir: &Path) -> io::Result<Vec<String>> {
    use std::os::unix::fs::MetadataExt;
    let meta = match fs::metadata(dir) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(io::Error::new(
                e.kind(),
                format!("cannot look at state directory {}: {e}", dir.display()),
            ))
        }
    };
    if !meta.is_dir() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "state directory {} is not a directory: pass --state-dir with a directory",
                dir.display()
            ),
        ));
    }
    let me = effective_uid();
    let mut problems = Vec::new();
    let mut judge = |what: &str, meta: &fs::Metadata| {
        let mode = meta.mode() & 0o777;
        if let Some(me) = me {
            if meta.uid() != me && meta.uid() != 0 {
                problems.push(format!(
                    "{what} belongs to user {}, not to this user ({me})",
                    meta.uid()
                ));
            }
        }
        let writers = match (mode & 0o020 != 0, mode & 0o002 != 0) {
            (_, true) => Some("all users"),
            (true, false) => Some("its group"),
            (false, false) => None,
        };
        if let Some(writers) = writers {
            problems.push(format!(
                "{what} can be written by {writers} (mode {mode:o})"
            ));
        }
    };
    judge("the directory", &meta);
    for name in STATE_FILES {
        let path = dir.join(name);
        match fs::metadata(&path) {
            // Secret files that others can read are warned about where they are read.
            Ok(meta) => judge(name, &meta),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("cannot look at {}: {e}", path.display()),
                ))
            }
        }
    }
    Ok(problems)
}

#[cfg(not(unix))]
fn state_dir_problems(_dir: &Path) -> io::Result<Vec<String>> {
    Ok(Vec::new())
}

/// This process's effective user id: the owner of `/proc/self` (Linux). `None` where that
/// cannot be told; ownership is then not checked.
#[cfg(unix)]
fn effective_uid() -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    fs::metadata("/proc/self").ok().map(|m| m.uid())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_key_is_created_once_and_reused() -> io::Result<()> {
        let tmp = tempfile::tempdir()?;
        let dir = tmp.path().join("state");
        let (first, created) = load_or_create_agent_key(&dir)?;
        assert!(created);
        let (second, created) = load_or_create_agent_key(&dir)?;
        assert!(!created);
        assert_eq!(first, second);
        let text = fs::read_to_string(dir.join(AGENT_KEY_FILE))?;
        assert_eq!(text.trim(), first.expose());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let key_mode = fs::metadata(dir.join(AGENT_KEY_FILE))?.permissions().mode();
            assert_eq!(key_mode & 0o777, 0o600);
            let dir_mode = fs::metadata(&dir)?.permissions().mode();
            assert_eq!(dir_mode & 0o777, 0o700);
        }
        // No temporary files left behind.
        assert_eq!(fs::read_dir(&dir)?.count(), 1);
        Ok(())
    }

    #[test]
    fn corrupt_agent_key_names_the_file() -> io::Result<()> {
        let tmp = tempfile::tempdir()?;
        let path = tmp.path().join(AGENT_KEY_FILE);
        fs::write(&path, "garbage\n")?;
        let err = match load_or_create_agent_key(tmp.path()) {
            Ok(_) => panic!("a corrupt key file was accepted"),
            Err(e) => e,
        };
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        let text = err.to_string();
        assert!(text.contains(&path.display().to_string()), "{text}");
        assert!(text.contains("delete"), "{text}");
        // The file is left alone for the user to look at.
        assert_eq!(fs::read_to_string(&path)?, "garbage\n");
        Ok(())
    }
}
