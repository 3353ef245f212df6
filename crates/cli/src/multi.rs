//! `burrow run --config FILE`: every instance of a run file in one process.
//!
//! Each instance runs on a tokio runtime of its own, on threads that have the instance's span
//! (`gateway{instance=edge}`, `agent{instance=office}`, `connector{instance=laptop}`) entered for their whole life, so
//! every event an instance logs, from any of its tasks, carries its name, and nothing in the
//! roles needs to pass a span along. Its own runtime also keeps instances apart: one that
//! fails (a bad setting, a port in use, a panic) ends alone, and the others serve on. Printed
//! lines (`gateway listening on …`, `forward …: public address …`) start with the
//! instance's name and a colon.
//!
//! SIGINT or SIGTERM cancels every instance; each drains for its own `grace`, and the
//! process exits 0 when all have stopped (a second signal: at once). Without a signal, the
//! process ends when every instance has ended: 0 if each ended cleanly, else 1.

use std::cell::RefCell;
use std::path::PathBuf;

use anyhow::{bail, Context as _};
use burrow::agent::Agent;
use burrow::config::{self, Instance, InstanceSettings, LogFormat, LogLevel, Role};
use burrow::connector::Connector;
use burrow::gateway::Gateway;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::run::{self, LOG_TARGET};

/// Flags of `burrow run`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The run file: [[gateway]], [[agent]] and [[connector]] tables, each with a `name` and
    /// the keys of that role's own config file
    #[arg(long, env = "BURROW_CONFIG", value_name = "FILE")]
    config: PathBuf,

    /// How much to log [default: the file's log_level, else info, or RUST_LOG when set]
    #[arg(long, env = "BURROW_LOG_LEVEL", value_name = "LEVEL", value_parser = crate::log_level_parser())]
    log_level: Option<LogLevel>,

    /// Log format: text, or json [default: the file's log_format, else text]
    #[arg(long, env = "BURROW_LOG_FORMAT", value_name = "FORMAT", value_parser = crate::log_format_parser())]
    log_format: Option<LogFormat>,
}

/// An instance ready to start: its name, how messages name it, its role's settings.
struct Ready {
    name: String,
    place: String,
    role: Role,
    config: RoleConfig,
}

enum RoleConfig {
    Gateway(Box<config::GatewayConfig>),
    Agent(Box<config::AgentConfig>),
    Connector(Box<config::ConnectorConfig>),
}

/// Runs `burrow run`.
pub fn main(args: Args) -> anyhow::Result<()> {
    let file = config::load_run_file(&args.config)?;
    let format = args.log_format.or(file.log_format).unwrap_or_default();
    run::init_logging(args.log_level, file.log_level, format)?;
    let path = file.path.clone();
    let mut ready = Vec::new();
    let mut failed = Vec::new();
    let mut has_key = false;
    for instance in file.instances {
        let place = instance.describe(&path);
        match settle(instance, &mut has_key) {
            Ok(r) => ready.push(Ready { place, ..r }),
            Err(e) => {
                error!(target: LOG_TARGET, "instance {place}: {e:#}; it does not start, the others do");
                failed.push(place);
            }
        }
    }
    if has_key {
        burrow::state::warn_if_readable_by_others(&path);
    }
    if ready.is_empty() {
        bail!(
            "no instance of {} can start: {} (see the errors above)",
            path.display(),
            failed.join(", ")
        );
    }
    let main = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    main.block_on(supervise(ready, failed))
}

/// An instance's settings made final, or why it cannot start.
fn settle(instance: Instance, has_key: &mut bool) -> anyhow::Result<Ready> {
    let Instance {
        name,
        role,
        settings,
        ..
    } = instance;
    let settings = settings.map_err(|e| anyhow::anyhow!(e.within_file()))?;
    let config = match settings {
        InstanceSettings::Gateway(s) => {
            warn_process_wide(s.log_level.is_some(), s.log_format.is_some(), &name);
            *has_key |= s
                .agents
                .iter()
                .flatten()
                .any(|a| matches!(a.key, config::KeySpec::Key(_)));
            RoleConfig::Gateway(Box::new(s.into_config()?))
        }
        InstanceSettings::Agent(s) => {
            warn_process_wide(s.log_level.is_some(), s.log_format.is_some(), &name);
            *has_key |= s.key.is_some();
            let c = s.into_config()?;
            if let Some(path) = &c.key_file {
                burrow::state::warn_if_readable_by_others(path);
            }
            RoleConfig::Agent(Box::new(c))
        }
        InstanceSettings::Connector(s) => {
            warn_process_wide(s.log_level.is_some(), s.log_format.is_some(), &name);
            *has_key |= s.key.is_some();
            let c = s.into_config()?;
            if let Some(path) = &c.key_file {
                burrow::state::warn_if_readable_by_others(path);
            }
            RoleConfig::Connector(Box::new(c))
        }
    };
    Ok(Ready {
        name,
        place: String::new(),
        role,
        config,
    })
}

fn warn_process_wide(level: bool, format: bool, name: &str) {
    if level || format {
        warn!(
            target: LOG_TARGET,
            "instance {name}: log_level and log_format are the whole process's in `burrow run`: \
             set them at the top of the file (ignored here)"
        );
    }
}

/// Starts every instance on its own runtime and waits for them, or for a signal.
async fn supervise(ready: Vec<Ready>, mut failed: Vec<String>) -> anyhow::Result<()> {
    let mut signals = run::Signals::install()?;
    // Reload is per role file for now: SIGHUP is logged and changes nothing here (its
    // default would end every instance).
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("cannot handle SIGHUP")?;
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            warn!(target: LOG_TARGET, "SIGHUP: `burrow run` does not reload its file yet; restart it to apply a change (`burrow gateway` and `burrow agent` reload theirs)");
        }
    });
    let shutdown = CancellationToken::new();
    let (done, mut ended) = tokio::sync::mpsc::channel(ready.len());
    let workers = workers_each(ready.len());
    let mut running = 0usize;
    let total = ready.len() + failed.len();
    for r in ready {
        let place = r.place.clone();
        match start(r, shutdown.clone(), workers, done.clone()) {
            Ok(()) => running += 1,
            Err(e) => {
                error!(target: LOG_TARGET, "instance {place}: {e:#}");
                failed.push(place);
            }
        }
    }
    drop(done);
    info!(target: LOG_TARGET, "{running} of {total} instances started");
    crate::notify::ready(&format!("{running} of {total} instances running"));
    crate::notify::spawn_watchdog();
    let mut signalled = false;
    while running > 0 {
        tokio::select! {
            end = ended.recv() => {
                let Some((place, result)) = end else { break };
                running -= 1;
                match result {
                    Ok(()) => info!(target: LOG_TARGET, "instance {place} stopped"),
                    Err(e) => {
                        error!(target: LOG_TARGET, "instance {place} stopped: {e:#}");
                        failed.push(place);
                    }
                }
            }
            sig = signals.recv() => {
                if signalled {
                    warn!(target: LOG_TARGET, "{sig} again: stopping now, without waiting for open streams");
                    return Ok(());
                }
                signalled = true;
                info!(target: LOG_TARGET, "{sig}: shutting down {running} instances; open streams get each instance's grace period to finish (signal again to stop now)");
                crate::notify::stopping();
                shutdown.cancel();
            }
        }
    }
    if signalled || failed.is_empty() {
        return Ok(());
    }
    bail!(
        "{} of {total} instances failed: {}",
        failed.len(),
        failed.join(", ")
    )
}

/// Worker threads per instance: the cores shared out, at least one each.
fn workers_each(instances: usize) -> usize {
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    cores.div_ceil(instances.max(1)).max(1)
}

thread_local! {
    /// The instance span a runtime thread keeps entered for its whole life.
    static ENTERED: RefCell<Option<tracing::span::EnteredSpan>> = const { RefCell::new(None) };
}

/// Starts one instance on a thread and runtime of its own; its outcome goes to `done`.
fn start(
    r: Ready,
    shutdown: CancellationToken,
    workers: usize,
    done: tokio::sync::mpsc::Sender<(String, anyhow::Result<()>)>,
) -> anyhow::Result<()> {
    let span = match r.role {
        Role::Gateway => tracing::info_span!(parent: None, "gateway", instance = %r.name),
        Role::Agent => tracing::info_span!(parent: None, "agent", instance = %r.name),
        Role::Connector => tracing::info_span!(parent: None, "connector", instance = %r.name),
    };
    let on_start = span.clone();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .thread_name(format!("burrow-{}", r.name))
        .on_thread_start(move || {
            ENTERED.with(|e| *e.borrow_mut() = Some(on_start.clone().entered()));
        })
        .on_thread_stop(|| ENTERED.with(|e| drop(e.borrow_mut().take())))
        .enable_all()
        .build()
        .context("cannot start the instance's runtime")?;
    let place = r.place.clone();
    std::thread::Builder::new()
        .name(format!("burrow-{}", r.name))
        .spawn(move || {
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let _entered = span.enter();
                runtime.block_on(serve(r, shutdown))
            }))
            .unwrap_or_else(|_| Err(anyhow::anyhow!("internal error: the instance panicked")));
            let _ = done.blocking_send((place, outcome));
        })
        .context("cannot start the instance's thread")?;
    Ok(())
}

/// Serves one instance until it ends or `shutdown`.
async fn serve(r: Ready, shutdown: CancellationToken) -> anyhow::Result<()> {
    let prefix = format!("{}: ", r.name);
    match r.config {
        RoleConfig::Gateway(config) => {
            info!(target: LOG_TARGET, ?config, "gateway settings");
            let admin = config.admin.clone();
            let gateway = Gateway::bind(*config)
                .await
                .context("cannot start the gateway")?;
            let admin = burrow::admin::AdminServer::bind(&admin, gateway.report())
                .await
                .map_err(anyhow::Error::msg)
                .context("cannot start the gateway")?;
            crate::gateway::announce(&gateway, &prefix);
            run::start_admin(admin, None, &prefix);
            gateway.run(shutdown).await?;
        }
        RoleConfig::Agent(config) => {
            info!(target: LOG_TARGET, ?config, "agent settings");
            let admin = config.admin.clone();
            let agent_gateways: Vec<String> =
                config.gateways().into_iter().map(|g| g.gateway).collect();
            let agent = Agent::new(*config);
            let admin = burrow::admin::AdminServer::bind(&admin, agent.report())
                .await
                .map_err(anyhow::Error::msg)
                .context("cannot start the agent")?;
            run::start_admin(admin, None, &prefix);
            // With several gateways, each line names the gateway it is about.
            let gateways = agent.statuses().len();
            for (status, gw) in agent.statuses().into_iter().zip(agent_gateways) {
                let label = (gateways > 1).then_some(gw);
                tokio::spawn(crate::agent::print_forwards(status, prefix.clone(), label));
            }
            agent.run(shutdown).await?;
        }
        RoleConfig::Connector(config) => {
            info!(target: LOG_TARGET, ?config, "connector settings");
            let names: Vec<String> = config.forwards.iter().map(|f| f.name.clone()).collect();
            let connector = Connector::bind(*config)
                .await
                .map_err(anyhow::Error::msg)
                .context("cannot start the connector")?;
            crate::connect::announce(&connector, &names, &prefix);
            tokio::spawn(crate::connect::print_forwards(
                connector.status(),
                names,
                prefix,
            ));
            connector.run(shutdown).await?;
        }
    }
    Ok(())
}
