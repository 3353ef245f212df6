//! What both roles share: logging set-up, the config file, the runtime and signal handling.

use std::fmt::Display;
use std::future::Future;
use std::io::{IsTerminal as _, Write as _};
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context as _};
use burrow::config::{ConfigError, LogFormat, LogLevel};
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use tracing_subscriber::EnvFilter;

/// Log target of the CLI's own events (the binary's crate is also called `burrow`).
pub const LOG_TARGET: &str = "burrow::cli";

/// Writes lines to stdout. An error (a closed pipe) is returned, not a panic as with
/// `println!`.
pub fn print(text: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{text}")
        .and_then(|()| out.flush())
        .context("cannot write to stdout")
}

/// Writes a line to stdout for a running role, which goes on if nobody reads it.
pub fn say(text: &str) {
    let _ = print(text);
}

/// Loads the config file, or an empty layer when there is none.
pub fn load_file<T: Default>(
    path: Option<&Path>,
    load: fn(&Path) -> Result<T, ConfigError>,
) -> anyhow::Result<T> {
    match path {
        Some(p) => Ok(load(p)?),
        None => Ok(T::default()),
    }
}

/// Sets up logging to stderr: `--log-level`/`BURROW_LOG_LEVEL`, else `RUST_LOG`, else the
/// file's `log_level`, else info; as text, or as one JSON object a line (`format`).
pub fn init_logging(
    flag: Option<LogLevel>,
    file: Option<LogLevel>,
    format: LogFormat,
) -> anyhow::Result<()> {
    let rust_log = std::env::var("RUST_LOG")
        .ok()
        .filter(|v| !v.trim().is_empty());
    let filter = match (flag, rust_log) {
        (Some(level), _) => EnvFilter::new(level.as_str()),
        (None, Some(directives)) => EnvFilter::try_new(&directives).with_context(|| {
            format!("RUST_LOG={directives:?} is not a valid filter: fix it, or unset it and use --log-level")
        })?,
        (None, None) => EnvFilter::new(file.unwrap_or_default().as_str()),
    };
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => logs.with_ansi(std::io::stderr().is_terminal()).init(),
        // Fields at the top level, beside `timestamp`, `level`, `target` and `message`; the
        // spans (agent, stream) as `span` and `spans`.
        LogFormat::Json => logs.json().flatten_event(true).with_ansi(false).init(),
    }
    Ok(())
}

/// Serves the admin server, if there is one, for as long as the process runs, and prints its
/// address (`admin listening on http://ADDR`, after `prefix`: an instance's name in `burrow
/// run`); `POST /api/reload` runs `reload`.
pub fn start_admin(
    admin: Option<burrow::admin::AdminServer>,
    reload: Option<burrow::admin::ReloadFn>,
    prefix: &str,
) {
    let Some(mut admin) = admin else {
        return;
    };
    if let Some(reload) = reload {
        admin = admin.with_reload(reload);
    }
    if let Some(addr) = admin.local_addr() {
        say(&format!("{prefix}admin listening on http://{addr}"));
    }
    tokio::spawn(admin.run(CancellationToken::new()));
}

/// Reads the config file again on each SIGHUP and applies it with `reload` (which logs what
/// it did). Installed before the role reports ready: SIGHUP's default would end the process.
pub fn reload_on_sighup(reload: Option<burrow::admin::ReloadFn>) -> anyhow::Result<()> {
    let mut hup = signal(SignalKind::hangup()).context("cannot handle SIGHUP")?;
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            match &reload {
                Some(reload) => {
                    info!(target: LOG_TARGET, "SIGHUP: reading the config file again");
                    let reload = reload.clone();
                    let _ = tokio::task::spawn_blocking(move || reload()).await;
                }
                None => warn!(
                    target: LOG_TARGET,
                    "SIGHUP: no config file to read again (started without --config); nothing changed"
                ),
            }
        }
    });
    Ok(())
}

/// What a reload of `path` does: reads the file, makes the settings (`apply` overlays the
/// flags and environment the process started with and applies them), logs the outcome. A
/// file with an error changes nothing: the error (file, line, key) is logged and answered.
pub fn reloader<T: 'static>(
    path: Option<std::path::PathBuf>,
    load: fn(&Path) -> Result<T, ConfigError>,
    apply: impl Fn(T) -> Result<burrow::admin::api::ReloadReport, String> + Send + Sync + 'static,
) -> Option<burrow::admin::ReloadFn> {
    use burrow::admin::api::ApiError;
    let path = path?;
    let reload = move || {
        let outcome = load(&path)
            .map_err(|e| e.to_string())
            .and_then(&apply)
            .map(|mut r| {
                r.file = path.display().to_string();
                r
            });
        match outcome {
            Ok(report) => {
                info!(target: LOG_TARGET, "{report}");
                for key in &report.restart_needed {
                    warn!(target: LOG_TARGET, "{}: `{key}` changed, but it needs a restart: left as it was", path.display());
                }
                Ok(report)
            }
            Err(e) => {
                let text = format!("config not reloaded, the one in force stays: {e}");
                tracing::error!(target: LOG_TARGET, "{text}");
                Err(ApiError::new(422, text))
            }
        }
    };
    Some(std::sync::Arc::new(reload))
}

/// A multi-threaded tokio runtime.
pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// SIGINT and SIGTERM.
pub struct Signals {
    int: Signal,
    term: Signal,
}

impl Signals {
    /// Installs the handlers; from now on these signals no longer kill the process.
    pub fn install() -> anyhow::Result<Signals> {
        let int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
        let term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
        Ok(Signals { int, term })
    }

    /// The next signal's name.
    pub async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.int.recv() => "SIGINT",
            _ = self.term.recv() => "SIGTERM",
        }
    }
}

/// Runs a role until it ends by itself or a signal arrives; then cancels `shutdown` and
/// waits for the role to drain. A second signal stops at once, without waiting: that is a
/// stop asked for, not a failure, so it too ends in exit status 0 (systemd and container
/// runtimes read anything else as a crash).
pub async fn until_signal<E: Display + Send + 'static>(
    role: impl Future<Output = Result<(), E>> + Send + 'static,
    shutdown: CancellationToken,
    mut signals: Signals,
    grace: Duration,
) -> anyhow::Result<()> {
    let mut task = tokio::spawn(role);
    tokio::select! {
        ended = &mut task => return finished(ended),
        sig = signals.recv() => info!(
            target: LOG_TARGET,
            "{sig}: shutting down; open streams get up to {grace:?} to finish (signal again to stop now)"
        ),
    }
    crate::notify::stopping();
    shutdown.cancel();
    tokio::select! {
        ended = &mut task => finished(ended),
        sig = signals.recv() => {
            warn!(target: LOG_TARGET, "{sig} again: stopping now, without waiting for open streams");
            Ok(())
        }
    }
}

fn finished<E: Display>(
    ended: Result<Result<(), E>, tokio::task::JoinError>,
) -> anyhow::Result<()> {
    match ended {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => bail!("{e}"),
        Err(e) => bail!("internal error: {e}"),
    }
}
