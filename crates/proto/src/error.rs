//! Reason codes carried by Reset and GoAway frames, and the protocol error type.

use std::fmt;

/// Why a stream was reset or a session closed. Sent on the wire as a `u32`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum ErrorCode {
    /// Orderly close, no error.
    Normal = 0,
    /// The peer broke a protocol rule (bad frame, unknown stream, bad state).
    Protocol = 1,
    /// A frame exceeded the negotiated maximum size.
    FrameTooLarge = 2,
    /// The peer sent more than its flow-control window allowed, or a window overflowed.
    FlowControl = 3,
    /// Too many streams, pending opens or control frames.
    LimitExceeded = 4,
    /// Authentication failed (unknown key or bad proof).
    AuthFailed = 5,
    /// The peers speak different protocol versions.
    UnsupportedVersion = 6,
    /// The handshake did not finish in time, or heartbeats went unanswered.
    Timeout = 7,
    /// The target refused the connection.
    ConnectRefused = 8,
    /// The target is not in the agent's configuration, or the service is unknown.
    TargetNotAllowed = 9,
    /// The connection to the target failed for another reason (unreachable, reset).
    ConnectFailed = 10,
    /// The local end of the stream was reset (client or target sent RST).
    StreamReset = 11,
    /// The sender is shutting down.
    Shutdown = 12,
    /// A newer session of the same agent replaced this one.
    Replaced = 13,
    /// Something failed inside the sender.
    Internal = 14,
    /// The port asked for is not granted to this agent.
    PortNotGranted = 15,
    /// The port asked for is in use on the gateway.
    PortInUse = 16,
    /// Too many failed attempts from this address; try later.
    RateLimited = 17,
    /// The key was revoked, or has expired, on the gateway: it will not be accepted again.
    KeyRevoked = 18,
    /// The gateway refused a connector's stream: the service or target is not in the
    /// connector's `reach`.
    NotInReach = 19,
    /// The agent has no private service of the name a connector asked for.
    NoSuchService = 20,
    /// The agent a connector asked for has no session with the gateway now.
    AgentUnavailable = 21,
}

impl ErrorCode {
    /// Decodes a wire value; unknown values map to [`ErrorCode::Internal`] so a newer peer's
    /// codes never break an older one.
    pub fn from_u32(v: u32) -> Self {
        use ErrorCode::*;
        match v {
            0 => Normal,
            1 => Protocol,
            2 => FrameTooLarge,
            3 => FlowControl,
            4 => LimitExceeded,
            5 => AuthFailed,
            6 => UnsupportedVersion,
            7 => Timeout,
            8 => ConnectRefused,
            9 => TargetNotAllowed,
            10 => ConnectFailed,
            11 => StreamReset,
            12 => Shutdown,
            13 => Replaced,
            15 => PortNotGranted,
            16 => PortInUse,
            17 => RateLimited,
            18 => KeyRevoked,
            19 => NotInReach,
            20 => NoSuchService,
            21 => AgentUnavailable,
            _ => Internal,
        }
    }

    /// A short human description.
    pub fn describe(self) -> &'static str {
        use ErrorCode::*;
        match self {
            Normal => "closed normally",
            Protocol => "protocol violation",
            FrameTooLarge => "frame too large",
            FlowControl => "flow-control violation",
            LimitExceeded => "limit exceeded",
            AuthFailed => "authentication failed",
            UnsupportedVersion => "unsupported protocol version",
            Timeout => "timed out",
            ConnectRefused => "target refused the connection",
            TargetNotAllowed => "target not allowed",
            ConnectFailed => "could not connect to the target",
            StreamReset => "connection reset",
            Shutdown => "shutting down",
            Replaced => "replaced by a newer session",
            Internal => "internal error",
            PortNotGranted => "port not granted",
            PortInUse => "port in use",
            RateLimited => "rate limited",
            KeyRevoked => "key revoked or expired",
            NotInReach => "not in the connector's reach",
            NoSuchService => "no such service on the agent",
            AgentUnavailable => "agent not connected",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.describe())
    }
}

/// A violation of the protocol by the peer: the session closes with `code`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {detail}")]
pub struct ProtocolError {
    /// The code sent to the peer in the GoAway frame.
    pub code: ErrorCode,
    /// What exactly was wrong, for the log.
    pub detail: String,
}

impl ProtocolError {
    /// A protocol error with a code and a detail message.
    pub fn new(code: ErrorCode, detail: impl Into<String>) -> Self {
        ProtocolError {
            code,
            detail: detail.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_roundtrip_and_unknown_is_internal() {
        for v in 0..=21u32 {
            let c = ErrorCode::from_u32(v);
            if v != 14 {
                assert_eq!(c as u32, v);
            }
        }
        assert_eq!(ErrorCode::from_u32(9999), ErrorCode::Internal);
    }
}
