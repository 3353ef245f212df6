//! A real nginx (Debian's package) in front of a gateway, started by a test on a loopback
//! port the test holds.
//!
//! nginx cannot be told to bind port 0 and report it, and probing for a free port and then
//! releasing it races with other tests. So the test binds `127.0.0.1:0` itself and hands the
//! listening socket to nginx the way nginx hands sockets to its own new binary on upgrade:
//! inherited, and named in the `NGINX` environment variable. The socket stays ours, so a
//! restart (stop, start again) comes back on the same port with nothing in between.

use std::net::{SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::{Error, Result};

/// Where Debian installs nginx.
const NGINX: &str = "/usr/sbin/nginx";
/// Where Debian's libnginx-mod-stream puts the `stream` module (not built in).
const STREAM_MODULE: &str = "/usr/lib/nginx/modules/ngx_stream_module.so";

/// A running nginx. Stopped when dropped.
pub struct Nginx {
    dir: tempfile::TempDir,
    listener: TcpListener,
    child: Option<Child>,
    starts: usize,
}

impl Nginx {
    /// nginx that answers every HTTP request with the client address the PROXY protocol
    /// header named: `addr=$proxy_protocol_addr port=$proxy_protocol_port remote=$remote_addr`
    /// (empty after `addr=` for a `PROXY UNKNOWN` or v2 `LOCAL` header). It listens with
    /// `proxy_protocol` on its TCP port ([`Nginx::addr`]) and on the unix socket
    /// [`Nginx::unix_socket`]; nginx reads v1 and v2 alike.
    pub async fn proxy_protocol_echo() -> Result<Nginx> {
        Nginx::start(
            "  server {\n    listen {listen} proxy_protocol;\n    \
             listen unix:{dir}/pp.sock proxy_protocol;\n    location / {\n      \
             default_type text/plain;\n      \
             return 200 \"addr=$proxy_protocol_addr port=$proxy_protocol_port remote=$remote_addr\\n\";\n    \
             }\n  }\n",
        )
        .await
    }

    /// The unix socket of [`Nginx::proxy_protocol_echo`].
    pub fn unix_socket(&self) -> PathBuf {
        self.dir.path().join("pp.sock")
    }

    /// Starts nginx with `http` as the body of its `http {}` block. `{listen}` in it stands
    /// for the address of the listening socket given to nginx (use it in one `listen`
    /// directive, e.g. `listen {listen} ssl;`), `{dir}` for its directory (where a unix
    /// socket may go: `listen unix:{dir}/app.sock;`).
    pub async fn start(http: &str) -> Result<Nginx> {
        Self::start_with("", |d| {
            format!(
                "http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  \
                 proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fcgi;\n  \
                 uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n{http}\n}}\n"
            )
        })
        .await
    }

    /// Starts nginx with `stream` as the body of its `stream {}` block (TCP proxying, the
    /// module of Debian's libnginx-mod-stream); `{listen}` as for [`Nginx::start`].
    pub async fn start_stream(stream: &str) -> Result<Nginx> {
        if !Path::new(STREAM_MODULE).exists() {
            return Err(Error::Unexpected(format!(
                "{STREAM_MODULE} not found: install Debian's libnginx-mod-stream package \
                 (`apt-get install libnginx-mod-stream`; .ci/run does)"
            )));
        }
        Self::start_with(&format!("load_module {STREAM_MODULE};\n"), |_| {
            format!("stream {{\n{stream}\n}}\n")
        })
        .await
    }

    /// Starts nginx with `top` before its main settings and the block `body` makes from the
    /// config directory after them.
    async fn start_with(top: &str, body: impl Fn(&str) -> String) -> Result<Nginx> {
        if !Path::new(NGINX).exists() {
            return Err(Error::Unexpected(format!(
                "{NGINX} not found: install Debian's nginx package (`apt-get install nginx`; \
                 .ci/run does)"
            )));
        }
        let listener = TcpListener::bind("127.0.0.1:0")
            .map_err(|e| Error::Unexpected(format!("bind a port for nginx: {e}")))?;
        // The child must inherit it: no close-on-exec.
        rustix::io::fcntl_setfd(&listener, rustix::io::FdFlags::empty())
            .map_err(|e| Error::Unexpected(format!("hand the socket to nginx: {e}")))?;
        let addr = listener
            .local_addr()
            .map_err(|e| Error::Unexpected(e.to_string()))?;
        let dir = tempfile::tempdir().map_err(|e| Error::Unexpected(e.to_string()))?;
        let d = dir.path().display();
        let conf = format!(
            "{top}daemon off;\nmaster_process on;\nworker_processes 1;\nerror_log {d}/error.log notice;\n\
             pid {d}/nginx.pid;\nevents {{ worker_connections 1024; }}\n{}",
            body(&d.to_string())
                .replace("{listen}", &addr.to_string())
                .replace("{dir}", &d.to_string())
        );
        std::fs::write(dir.path().join("nginx.conf"), conf)
            .map_err(|e| Error::Unexpected(e.to_string()))?;
        let mut n = Nginx {
            dir,
            listener,
            child: None,
            starts: 0,
        };
        n.spawn().await?;
        Ok(n)
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("listener has an address")
    }

    /// The directory holding its config, logs and any files the test puts there.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn log(&self) -> PathBuf {
        self.dir.path().join("error.log")
    }

    /// nginx's error log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.log()).unwrap_or_default()
    }

    async fn spawn(&mut self) -> Result<()> {
        let fd = self.listener.as_raw_fd();
        let child = Command::new(NGINX)
            .arg("-c")
            .arg(self.dir.path().join("nginx.conf"))
            .arg("-p")
            .arg(self.dir.path())
            .env("NGINX", format!("{fd};"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| Error::Unexpected(format!("start {NGINX}: {e}")))?;
        self.child = Some(child);
        self.starts += 1;
        // Ready once its worker runs (the log says so once per start).
        let want = self.starts;
        for _ in 0..200 {
            let text = self.log_text();
            if text.matches("start worker process ").count() >= want {
                return Ok(());
            }
            if let Some(st) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                return Err(Error::Unexpected(format!("nginx exited ({st}): {text}")));
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        Err(Error::Unexpected(format!(
            "nginx did not start within 5 s: {}",
            self.log_text()
        )))
    }

    /// Stops nginx at once (SIGKILL to the master and its worker): connections through it
    /// break. The listening socket stays ours.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Its workers first (they would finish their connections after the master goes).
            kill_children(child.id());
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops and starts nginx again on the same port.
    pub async fn restart(&mut self) -> Result<()> {
        self.stop();
        self.spawn().await
    }
}

/// SIGKILLs the direct children of `pid` (nginx's workers), found through `/proc`.
fn kill_children(pid: u32) {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return;
    };
    for e in entries.flatten() {
        let Ok(child) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else {
            continue;
        };
        // pid (comm) state ppid ...: the command may hold spaces, so split after the `)`.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(pid) {
            if let Some(p) = rustix::process::Pid::from_raw(child) {
                let _ = rustix::process::kill_process(p, rustix::process::Signal::KILL);
            }
        }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        self.stop();
    }
}
