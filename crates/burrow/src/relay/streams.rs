//! Stream to stream: how the gateway joins a connector's stream to the agent's.
//!
//! Nothing touches a socket here: bytes taken from one stream are queued on the other, and
//! only then is their credit given back to the first ([`Stream::release`]). The other
//! stream queues only within its own credit, so flow control runs end to end: a client of
//! the connector that stops reading stops the target at the agent, and what the gateway
//! holds for one joined stream is at most the window of each direction. No other stream is
//! slowed: each joined pair has its own task and its own windows.
//!
//! Half-close passes through (a FIN on one stream is a FIN on the other), and so does a
//! reset, with its reason code: an agent's refusal (`TargetNotAllowed`, `ConnectRefused`)
//! reaches the connector as that code.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;

use burrow_proto::ErrorCode;
use bytes::Bytes;

use super::Meter;
use crate::session::{Stream, StreamError};

/// Most bytes of received chunks taken from a stream at once (at most its window is there).
const GATHER: usize = 1024 * 1024;

/// What a joined pair moved and how it ended.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JoinStats {
    /// Bytes from the client's stream into the service's.
    pub to_service: u64,
    /// Bytes from the service's stream into the client's.
    pub to_client: u64,
    /// `None` when both directions finished cleanly; else what broke it.
    pub error: Option<String>,
}

/// Which stream of the pair an operation failed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Client,
    Service,
}

struct Broke {
    on: Side,
    error: StreamError,
}

/// Moves bytes from `from` into `to` until `from` finishes (then finishes `to`) or either
/// fails. `from_side` says which of the pair `from` is.
async fn pump(
    from: &Stream,
    to: &Stream,
    from_side: Side,
    count: &mut u64,
    meter: Option<&std::sync::atomic::AtomicU64>,
) -> Result<(), Broke> {
    let to_side = match from_side {
        Side::Client => Side::Service,
        Side::Service => Side::Client,
    };
    let mut chunks: VecDeque<Bytes> = VecDeque::new();
    loop {
        match from.recv_many(&mut chunks, GATHER).await {
            Ok(true) => {
                let n: usize = chunks.iter().map(Bytes::len).sum();
                while let Some(chunk) = chunks.pop_front() {
                    if let Err(error) = to.send(chunk).await {
                        return Err(Broke { on: to_side, error });
                    }
                }
                // Only now, with the bytes queued on the other stream (within its credit),
                // does their credit go back: the sender waits for the far reader.
                from.release(n);
                *count += n as u64;
                if let Some(m) = meter {
                    m.fetch_add(n as u64, Ordering::Relaxed);
                }
            }
            Ok(false) => {
                to.finish();
                return Ok(());
            }
            Err(error) => {
                return Err(Broke {
                    on: from_side,
                    error,
                })
            }
        }
    }
}

/// The code to reset the *other* stream with when one failed with `error`.
fn pass_on(on: Side, error: &StreamError) -> ErrorCode {
    match (error, on) {
        (StreamError::Reset(code), _) => *code,
        // The agent's session is gone: say so to the connector.
        (StreamError::SessionClosed, Side::Service) => ErrorCode::AgentUnavailable,
        (StreamError::SessionClosed, Side::Client) => ErrorCode::StreamReset,
        (StreamError::Finished, _) => ErrorCode::Internal,
    }
}

/// Joins `client` (a connector's stream) and `service` (the stream the gateway opened to
/// the agent for it) until both directions have finished or either fails. With `meter`,
/// adds the bytes as they move: `from_local` those toward the service, `to_local` those
/// toward the client.
pub async fn join(client: &Stream, service: &Stream, meter: Option<Meter<'_>>) -> JoinStats {
    let (mut to_service, mut to_client) = (0u64, 0u64);
    let up = pump(
        client,
        service,
        Side::Client,
        &mut to_service,
        meter.map(|m| m.from_local),
    );
    let down = pump(
        service,
        client,
        Side::Service,
        &mut to_client,
        meter.map(|m| m.to_local),
    );
    let outcome = tokio::try_join!(up, down);
    let error = match outcome {
        Ok(_) => None,
        Err(Broke { on, error }) => {
            let code = pass_on(on, &error);
            match on {
                Side::Client => service.reset(code),
                Side::Service => client.reset(code),
            }
            let whose = match on {
                Side::Client => "connector's stream",
                Side::Service => "agent's stream",
            };
            Some(format!("{whose}: {error}"))
        }
    };
    JoinStats {
        to_service,
        to_client,
        error,
    }
}
