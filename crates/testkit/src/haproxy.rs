//! A real HAProxy (Debian's package) that reads the PROXY protocol (`accept-proxy`) and
//! answers each HTTP request with the client address the header named.
//!
//! As with [`crate::Nginx`], the test binds `127.0.0.1:0` itself and hands the socket over:
//! HAProxy takes an inherited, bound socket as `bind fd@N`. It also listens on a unix socket
//! in its directory, for targets that are unix sockets.

use std::net::{SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::{Error, Result};

/// Where Debian installs HAProxy.
pub const HAPROXY: &str = "/usr/sbin/haproxy";

/// A running HAProxy. Stopped when dropped.
pub struct Haproxy {
    dir: tempfile::TempDir,
    listener: TcpListener,
    child: Child,
}

impl Haproxy {
    /// Whether Debian's haproxy is installed.
    pub fn installed() -> bool {
        Path::new(HAPROXY).exists()
    }

    /// Starts HAProxy answering `addr=SRC port=SRC_PORT` (`%[src]` and `%[src_port]`, which
    /// `accept-proxy` sets from the header) on its TCP port ([`Haproxy::addr`]) and its unix
    /// socket ([`Haproxy::unix_socket`]), and waits (10 s) until it accepts.
    pub async fn proxy_protocol_echo() -> Result<Haproxy> {
        if !Haproxy::installed() {
            return Err(Error::Unexpected(format!(
                "{HAPROXY} not found: install Debian's haproxy package (`apt-get install \
                 haproxy`; .ci/run does)"
            )));
        }
        let listener = TcpListener::bind("127.0.0.1:0")
            .map_err(|e| Error::Unexpected(format!("bind a port for haproxy: {e}")))?;
        rustix::io::fcntl_setfd(&listener, rustix::io::FdFlags::empty())
            .map_err(|e| Error::Unexpected(format!("hand the socket to haproxy: {e}")))?;
        let dir = tempfile::tempdir().map_err(|e| Error::Unexpected(e.to_string()))?;
        let sock = dir.path().join("hap.sock");
        let conf = format!(
            "global\n  maxconn 256\n\ndefaults\n  mode http\n  timeout connect 5s\n  \
             timeout client 10s\n  timeout server 10s\n\nfrontend pp\n  \
             bind fd@{fd} accept-proxy\n  bind unix@{sock} accept-proxy mode 600\n  \
             http-request return status 200 content-type text/plain lf-string \
             \"addr=%[src] port=%[src_port]\\n\"\n",
            fd = listener.as_raw_fd(),
            sock = sock.display()
        );
        let conf_path = dir.path().join("haproxy.cfg");
        std::fs::write(&conf_path, conf).map_err(|e| Error::Unexpected(e.to_string()))?;
        let log = std::fs::File::create(dir.path().join("haproxy.log"))
            .map_err(|e| Error::Unexpected(e.to_string()))?;
        let child = Command::new(HAPROXY)
            .arg("-db")
            .arg("-f")
            .arg(&conf_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| Error::Unexpected(format!("start {HAPROXY}: {e}")))?;
        let mut h = Haproxy {
            dir,
            listener,
            child,
        };
        // Ready once its unix socket accepts (the TCP socket is ours and would queue).
        for _ in 0..400 {
            if std::os::unix::net::UnixStream::connect(h.unix_socket()).is_ok() {
                return Ok(h);
            }
            if let Ok(Some(st)) = h.child.try_wait() {
                return Err(Error::Unexpected(format!(
                    "haproxy exited ({st}): {}",
                    h.log_text()
                )));
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        Err(Error::Unexpected(format!(
            "haproxy did not start within 10 s: {}",
            h.log_text()
        )))
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("listener has an address")
    }

    /// Its unix socket.
    pub fn unix_socket(&self) -> PathBuf {
        self.dir.path().join("hap.sock")
    }

    /// What HAProxy wrote to stderr so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("haproxy.log")).unwrap_or_default()
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
