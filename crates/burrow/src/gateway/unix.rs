//! Public endpoints on unix sockets: an agent's forward asks for a path (`unix:PATH=TARGET`)
//! instead of a port, for a gateway that serves local clients only.
//!
//! - **Grant**: the path must match one of the grant's `paths` patterns ([`crate::paths`]);
//!   the zero-config grant has none. A refusal says so and is final (`PortNotGranted`).
//! - **Creating the socket**: it is bound under a temporary name in the same directory,
//!   given the grant's `socket_mode` (0660 by default), then renamed into place, so the path
//!   never exists with looser permissions than asked for. The directory must exist; the
//!   gateway creates none.
//! - **What may be replaced**: an existing file at the path is replaced only when it is a
//!   socket nobody listens on (a connect is refused: left behind by a process that was
//!   killed). A listening socket is "in use"; anything that is not a socket is left alone and
//!   the bind refused.
//! - **Removal**: the socket file goes when its listener closes (its lease ran out, room was
//!   made for another port, or the gateway stops), and only if the path still names the
//!   socket this gateway made (same device and inode), so a file someone put there since is
//!   never removed.
//! - **Leases**: like a port, the path of a dropped agent stays bound and reserved for it
//!   during the lease; clients meanwhile are closed at once. Paths are not kept across
//!   gateway restarts (the agent's next bind makes the socket again).

use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use burrow_proto::message::{Bind, BindResult, Protocol};
use burrow_proto::ErrorCode;
use tokio::net::UnixListener;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

use super::groups::{Member, Routes};
use super::ports::refuse_bind;
use super::ports::{make_room, serve_public_conn, Endpoint};
use super::{lock, AgentEntry, Hub, LogThrottle, PortEntry, Route};
use crate::config::AgentGrant;
use crate::paths;
use crate::relay::Local;
use crate::session::Session;

/// Binds the unix socket a Bind asks for, within the grant's `paths`.
pub(super) async fn bind_path(
    hub: &Arc<Hub>,
    grant: &AgentGrant,
    session: &Session,
    generation: u64,
    bind: &Bind,
) -> BindResult {
    let refuse = |code: ErrorCode, text: String| refuse_bind(hub, grant, bind, code, text);
    let Some(path) = bind.path.as_deref() else {
        return refuse(ErrorCode::Protocol, "no path in a unix bind".into());
    };
    if bind.protocol != Protocol::Tcp || bind.port != 0 {
        return refuse(
            ErrorCode::PortNotGranted,
            format!("unix socket {path}: a unix endpoint carries streams (TCP), with no port"),
        );
    }
    if let Err(why) = paths::check_socket_path(Path::new(path)) {
        return refuse(ErrorCode::PortNotGranted, why);
    }
    if paths::granted(&grant.paths, path).is_none() {
        return refuse(
            ErrorCode::PortNotGranted,
            format!(
                "unix socket {path} is not granted to agent `{}` (granted paths: {}; the \
                 gateway's operator grants them with paths = [\"/run/burrow/*.sock\"] in this \
                 agent's [[agents]] entry)",
                grant.name,
                paths::describe(&grant.paths)
            ),
        );
    }
    let path = PathBuf::from(path);
    let route = Route {
        session: session.clone(),
        service: bind.service,
        name: bind.name.clone(),
        flows: Arc::default(),
    };
    let key = (Protocol::Tcp, bind.name.clone());
    let max_ports = hub.config.limits.max_ports_per_agent;
    {
        let mut agents = lock(&hub.agents);
        let holder = agents
            .iter()
            .filter(|(name, _)| **name != grant.name)
            .find_map(|(name, e)| {
                e.ports
                    .values()
                    .find(|p| p.path.as_ref() == Some(&path))
                    .map(|p| (name.clone(), p.lease.is_some()))
            });
        if let Some((holder, on_lease)) = holder {
            return refuse(
                ErrorCode::PortInUse,
                format!(
                    "unix socket {} is held by agent `{holder}`{} on this gateway: ask the \
                     gateway's operator to give each agent its own paths, or pick another",
                    path.display(),
                    if on_lease {
                        " (reserved for it on lease)"
                    } else {
                        ""
                    }
                ),
            );
        }
        let entry = agents
            .entry(grant.name.clone())
            .or_insert_with(|| AgentEntry::new(&hub.config.limits));
        if let Some(existing) = entry.ports.get_mut(&key) {
            if existing.path.as_ref() == Some(&path) {
                let member = Member::new(&grant.name, generation, route, entry.conns.clone());
                lock(&existing.route).join(member);
                existing.owner = Some(generation);
                existing.lease = None;
                let text = existing.shown(hub);
                info!(service = %bind.name, public = %text, "public unix socket granted (kept from lease)");
                return BindResult {
                    service: bind.service,
                    code: ErrorCode::Normal,
                    text,
                };
            }
            if let Some(old) = entry.ports.remove(&key) {
                old.close();
                hub.forget_port(&grant.name, bind.protocol, &bind.name, &old);
            }
        }
        if entry.ports.values().any(|p| p.path.as_ref() == Some(&path)) {
            return refuse(
                ErrorCode::PortInUse,
                format!(
                    "unix socket {} is already used by another service of this agent",
                    path.display()
                ),
            );
        }
        if let Err(text) = make_room(hub, entry, grant, max_ports) {
            return refuse(ErrorCode::LimitExceeded, text);
        }
    }
    let Some(fd) = hub.public_fds.try_take(0) else {
        return refuse(ErrorCode::LimitExceeded, super::ports::near_fd_limit(hub));
    };
    let (listener, file) = match listen(&path, grant.socket_mode) {
        Ok(bound) => bound,
        Err((code, text)) => return refuse(code, text),
    };
    let cancel = hub.stop.child_token();
    let route = {
        let mut agents = lock(&hub.agents);
        let entry = agents
            .entry(grant.name.clone())
            .or_insert_with(|| AgentEntry::new(&hub.config.limits));
        if let Err(text) = make_room(hub, entry, grant, max_ports) {
            return refuse(ErrorCode::LimitExceeded, text);
        }
        let first = Member::new(&grant.name, generation, route, entry.conns.clone());
        let unused = std::net::SocketAddr::from(([0, 0, 0, 0], 0));
        let (port, route) =
            PortEntry::routed(unused, Some(path.clone()), None, first, &cancel, false);
        entry.ports.insert(key, port);
        route
    };
    let port = UnixPort {
        listener,
        _file: file,
        route,
        cancel,
        agent: grant.name.clone(),
        service: bind.name.clone(),
        _fd: fd,
    };
    // Tracked, so the gateway waits for the socket file to be removed before it exits.
    hub.tracker
        .spawn(accept_unix(hub.clone(), port).instrument(tracing::Span::current()));
    let text = format!("unix:{}", path.display());
    info!(service = %bind.name, public = %text, mode = %format!("{:03o}", grant.socket_mode), "public unix socket granted");
    BindResult {
        service: bind.service,
        code: ErrorCode::Normal,
        text,
    }
}

/// A socket file this gateway made: removed when dropped, if the path still names it.
struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        let ours = std::fs::symlink_metadata(&self.path)
            .is_ok_and(|m| m.dev() == self.dev && m.ino() == self.ino);
        if ours {
            match std::fs::remove_file(&self.path) {
                Ok(()) => debug!(path = %self.path.display(), "public unix socket removed"),
                Err(e) => {
                    warn!(path = %self.path.display(), "cannot remove the public unix socket: {e}")
                }
            }
        }
    }
}

/// Temporary names in one process differ by this counter.
static TEMP: AtomicU64 = AtomicU64::new(0);

/// Listens on `path` with `mode` (see the module docs), or why not.
fn listen(path: &Path, mode: u32) -> Result<(UnixListener, SocketFile), (ErrorCode, String)> {
    let shown = path.display();
    let dir = path.parent().unwrap_or(Path::new("/"));
    match std::fs::symlink_metadata(path) {
        Ok(m) if !m.file_type().is_socket() => {
            return Err((
                ErrorCode::PortInUse,
                format!(
                    "{shown} exists on the gateway and is not a socket: the gateway replaces \
                     only a stale socket; remove the file or pick another path"
                ),
            ))
        }
        Ok(_) => match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => {
                return Err((
                    ErrorCode::PortInUse,
                    format!(
                        "unix socket {shown} is in use on the gateway (a process listens on it): \
                         stop it or pick another path"
                    ),
                ))
            }
            // Left behind by a process that is gone: replaced below.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                info!(path = %shown, "replacing a stale unix socket nobody listens on");
            }
            Err(e) => {
                return Err((
                    ErrorCode::PortInUse,
                    format!("unix socket {shown} exists and cannot be checked: {e}"),
                ))
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err((ErrorCode::PortInUse, format!("cannot use {shown}: {e}")));
        }
    }
    let name = path
        .file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
    let temp = dir.join(format!(
        ".{name}.burrow-{}-{}",
        std::process::id(),
        TEMP.fetch_add(1, Ordering::Relaxed)
    ));
    let failed = |e: std::io::Error| {
        let _ = std::fs::remove_file(&temp);
        let hint = match e.kind() {
            std::io::ErrorKind::NotFound => format!(
                " (the directory {} must exist: the gateway creates none)",
                dir.display()
            ),
            std::io::ErrorKind::PermissionDenied => format!(
                " (the gateway's user cannot create files in {})",
                dir.display()
            ),
            _ => String::new(),
        };
        (
            ErrorCode::PortNotGranted,
            format!("cannot listen on unix socket {shown}: {e}{hint}"),
        )
    };
    let listener = UnixListener::bind(&temp).map_err(failed)?;
    std::fs::set_permissions(&temp, std::fs::Permissions::from_mode(mode)).map_err(failed)?;
    std::fs::rename(&temp, path).map_err(failed)?;
    let meta = std::fs::symlink_metadata(path).map_err(failed)?;
    let file = SocketFile {
        path: path.to_path_buf(),
        dev: meta.dev(),
        ino: meta.ino(),
    };
    Ok((listener, file))
}

/// What a unix endpoint's accept loop holds: dropping it closes the socket and removes its
/// file.
struct UnixPort {
    listener: UnixListener,
    _file: SocketFile,
    /// Its one member at most (a unix endpoint is in no group); the member's `close` ends
    /// its connections (its path is no longer granted).
    route: Arc<Mutex<Routes>>,
    cancel: CancellationToken,
    agent: String,
    service: String,
    _fd: crate::limiter::FdPermit,
}

async fn accept_unix(hub: Arc<Hub>, port: UnixPort) {
    let mut refusals = LogThrottle::default();
    let mut accept_errors = LogThrottle::default();
    let end = Endpoint {
        route: &port.route,
        agent: &port.agent,
        service: &port.service,
    };
    loop {
        let conn = tokio::select! {
            _ = port.cancel.cancelled() => return,
            r = port.listener.accept() => match r {
                Ok((conn, _)) => conn,
                Err(e) => {
                    if let Some(skipped) = accept_errors.allow(Instant::now()) {
                        warn!(similar_since_last = skipped, "accept on public unix socket failed: {e}");
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // Who connected, for the stream's log line (a unix client has no address).
        let peer = conn
            .peer_cred()
            .map(|c| format!("uid {} pid {}", c.uid(), c.pid().unwrap_or(0)))
            .unwrap_or_default();
        let span = tracing::info_span!("unix_client", peer = %peer);
        serve_public_conn(
            &hub,
            &end,
            &mut refusals,
            Local::Unix(conn),
            None,
            &peer,
            span,
        );
    }
}
