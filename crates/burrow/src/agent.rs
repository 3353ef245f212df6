//! The agent role. (Being written.)

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::AgentConfig;

/// Errors that stop an agent, phrased for the user.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct AgentError(pub String);

/// What became of one forward.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ForwardStatus {
    /// Not answered yet.
    Pending,
    /// Granted: the public address clients use.
    Granted(String),
    /// Refused, with the reason.
    Refused(String),
}

/// The agent's view of its session, for status and tests.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AgentStatus {
    /// A session is up.
    pub connected: bool,
    /// Sessions established so far.
    pub sessions: u64,
    /// One entry per configured forward, in order.
    pub forwards: Vec<ForwardStatus>,
}

/// An agent, ready to [`Agent::run`].
pub struct Agent {
    config: AgentConfig,
    status: watch::Sender<AgentStatus>,
}

impl Agent {
    /// An agent with `config`.
    pub fn new(config: AgentConfig) -> Agent {
        let (status, _) = watch::channel(AgentStatus::default());
        Agent { config, status }
    }
    /// Watches the agent's status.
    pub fn status(&self) -> watch::Receiver<AgentStatus> {
        self.status.subscribe()
    }
    /// Runs until `shutdown`, reconnecting forever after the first successful session.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), AgentError> {
        let _ = &self.config;
        shutdown.cancelled().await;
        Ok(())
    }
}
