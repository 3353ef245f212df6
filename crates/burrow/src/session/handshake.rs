//! The handshake before frames flow: preambles, challenge, proof, acceptance.
//!
//! Both functions read with a small frame limit (handshake messages are tiny) and return the
//! bytes they read past the handshake, which belong to the session. Callers put a deadline on
//! the whole exchange.

use std::time::Duration;

use burrow_proto::auth::{KeyHash, SecretKey};
use burrow_proto::message::{
    self, Auth, AuthOk, Challenge, GoAway, Role, SessionParams, StreamLimits,
};
use burrow_proto::{Decoder, ErrorCode, Frame, Kind, ProtocolError};
use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::transport::{Bindings, BoxIo};

/// Largest handshake frame accepted.
const HANDSHAKE_MAX_PAYLOAD: u32 = 4096;

/// Why a handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The connection failed.
    #[error("connection failed during handshake: {0}")]
    Io(#[from] std::io::Error),
    /// The peer broke the protocol.
    #[error("{0}")]
    Protocol(#[from] ProtocolError),
    /// The gateway refused us.
    #[error("gateway refused the session: {message} ({code})")]
    Rejected {
        /// Its reason code.
        code: ErrorCode,
        /// Its message.
        message: String,
    },
}

async fn read_preamble(io: &mut BoxIo, buf: &mut BytesMut) -> Result<(), HandshakeError> {
    while buf.len() < message::PREAMBLE_LEN {
        if io.read_buf(buf).await? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "peer closed the connection before the handshake",
            )
            .into());
        }
    }
    let raw = buf.split_to(message::PREAMBLE_LEN);
    let mut arr = [0u8; message::PREAMBLE_LEN];
    arr.copy_from_slice(&raw);
    message::parse_preamble(&arr)?;
    Ok(())
}

async fn read_frame(
    io: &mut BoxIo,
    buf: &mut BytesMut,
    dec: &mut Decoder,
) -> Result<Frame, HandshakeError> {
    loop {
        if let Some(f) = dec.decode(buf)? {
            return Ok(f);
        }
        if io.read_buf(buf).await? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "peer closed the connection during the handshake",
            )
            .into());
        }
    }
}

fn unexpected(kind: Kind, wanted: &str) -> HandshakeError {
    HandshakeError::Protocol(ProtocolError::new(
        ErrorCode::Protocol,
        format!("expected {wanted} during the handshake, got {kind:?}"),
    ))
}

async fn write_frames(io: &mut BoxIo, head: &[u8], frames: &[Frame]) -> std::io::Result<()> {
    let mut out = BytesMut::from(head);
    for f in frames {
        f.encode(&mut out);
    }
    io.write_all(&out).await?;
    io.flush().await
}

/// Refuses a client before any challenge: our preamble, then a GoAway saying why (for a
/// listener that cannot serve what the client speaks).
pub async fn refuse_early(io: &mut BoxIo, code: ErrorCode, message: &str) -> std::io::Result<()> {
    let ga = GoAway {
        code,
        message: message.to_string(),
    };
    write_frames(io, &message::preamble(), &[ga.to_frame()]).await?;
    let _ = io.shutdown().await;
    Ok(())
}

/// Client side: proves `key` as `role`, offering `limits`. Returns the gateway's acceptance
/// (whose parameters honour the limits) and leftover bytes.
pub async fn client(
    io: &mut BoxIo,
    key: &SecretKey,
    role: Role,
    binding: &[u8; 32],
    limits: Option<StreamLimits>,
) -> Result<(AuthOk, BytesMut), HandshakeError> {
    let bindings = Bindings {
        connection: *binding,
        proxied: None,
    };
    client_bound(io, key, role, &bindings, limits).await
}

/// As [`client`], over a transport that may also offer a [proxied
/// binding](burrow_proto::auth::proxied_binding) (a WebSocket): the gateway's challenge says
/// which one it can check.
pub async fn client_bound(
    io: &mut BoxIo,
    key: &SecretKey,
    role: Role,
    bindings: &Bindings,
    limits: Option<StreamLimits>,
) -> Result<(AuthOk, BytesMut), HandshakeError> {
    write_frames(io, &message::preamble(), &[]).await?;
    let mut buf = BytesMut::with_capacity(1024);
    read_preamble(io, &mut buf).await?;
    let mut dec = Decoder::new(HANDSHAKE_MAX_PAYLOAD);
    let first = read_frame(io, &mut buf, &mut dec).await?;
    let challenge = match first.header.kind {
        Kind::Challenge => Challenge::decode(&first.payload)?,
        Kind::GoAway => return Err(rejected(&first)?),
        other => return Err(unexpected(other, "a challenge")),
    };
    let binding = match (challenge.proxied, &bindings.proxied) {
        (false, _) => &bindings.connection,
        (true, Some(proxied)) => proxied,
        (true, None) => {
            return Err(HandshakeError::Protocol(ProtocolError::new(
                ErrorCode::Protocol,
                "the gateway expects a WebSocket through a TLS-terminating proxy, but this client did not dial one: use a wss:// gateway URL",
            )))
        }
    };
    let auth = Auth {
        role,
        public_key: key.hash().0,
        signature: key.prove(role, &challenge.nonce, binding),
        limits,
    };
    write_frames(io, &[], &[auth.to_frame()]).await?;
    let reply = read_frame(io, &mut buf, &mut dec).await?;
    match reply.header.kind {
        Kind::AuthOk => {
            let ok = AuthOk::decode(&reply.payload)?;
            if let Some(l) = limits {
                let p = &ok.params;
                if p.max_payload > l.max_payload.max(1024)
                    || p.max_streams > l.max_streams.max(1)
                    || p.stream_window > l.stream_window.max(1024)
                    || p.session_window > l.session_window.max(p.stream_window)
                {
                    return Err(HandshakeError::Protocol(ProtocolError::new(
                        ErrorCode::LimitExceeded,
                        "the gateway set session limits above the ones this agent asked for",
                    )));
                }
            }
            Ok((ok, buf))
        }
        Kind::GoAway => Err(rejected(&reply)?),
        other => Err(unexpected(other, "the gateway's answer")),
    }
}

fn rejected(frame: &Frame) -> Result<HandshakeError, HandshakeError> {
    let ga = GoAway::decode(&frame.payload)?;
    Ok(HandshakeError::Rejected {
        code: ga.code,
        message: ga.message,
    })
}

/// What the gateway decided about a client's proof.
pub enum Verdict {
    /// Accepted: the client's name and the session's parameters.
    Accept(String, SessionParams),
    /// Accepted as [`Verdict::Accept`] if the proof verifies; otherwise refused with this
    /// code and message instead of the usual `AuthFailed` (a known key over its failure
    /// budget: a valid proof is never refused for a rate limit).
    AcceptIfProven(String, SessionParams, ErrorCode, String),
    /// Refused with a code and a message for the client (never naming a secret).
    Refuse(ErrorCode, String),
    /// Refused with this code and message if the proof verifies (a revoked key: only its
    /// holder learns why); otherwise refused as an unknown key.
    RefuseIfProven(ErrorCode, String),
}

/// What the gateway learned from a successful handshake.
#[derive(Debug)]
pub struct Accepted {
    /// The client's name.
    pub name: String,
    /// Its key hash.
    pub key: KeyHash,
    /// The role it authenticated as.
    pub role: Role,
    /// Session parameters sent to it.
    pub params: SessionParams,
    /// Bytes read past the handshake.
    pub leftover: BytesMut,
}

/// Gateway side: challenges the client and checks its proof with `verify`, which gets the
/// claimed key hash and role and says whether that client is known; the signature itself is
/// checked here.
pub async fn server(
    io: &mut BoxIo,
    binding: &[u8; 32],
    verify: impl FnOnce(&KeyHash, Role) -> Verdict,
) -> Result<Accepted, HandshakeError> {
    let bindings = Bindings {
        connection: *binding,
        proxied: None,
    };
    server_bound(io, &bindings, verify).await
}

/// As [`server`]; when `bindings.proxied` is set (TLS ended at a proxy in front), the
/// challenge asks for, and the proof is checked against, that binding instead.
pub async fn server_bound(
    io: &mut BoxIo,
    bindings: &Bindings,
    verify: impl FnOnce(&KeyHash, Role) -> Verdict,
) -> Result<Accepted, HandshakeError> {
    let binding = bindings.proxied.as_ref().unwrap_or(&bindings.connection);
    let nonce = burrow_proto::auth::random_nonce();
    write_frames(
        io,
        &message::preamble(),
        &[Challenge {
            nonce,
            proxied: bindings.proxied.is_some(),
        }
        .to_frame()],
    )
    .await?;
    let mut buf = BytesMut::with_capacity(1024);
    if let Err(e) = read_preamble(io, &mut buf).await {
        if let HandshakeError::Protocol(p) = &e {
            let _ = refuse(io, p.code, &p.detail).await;
        }
        return Err(e);
    }
    let mut dec = Decoder::new(HANDSHAKE_MAX_PAYLOAD);
    let frame = read_frame(io, &mut buf, &mut dec).await?;
    if frame.header.kind != Kind::Auth {
        return Err(unexpected(frame.header.kind, "auth"));
    }
    let auth = Auth::decode(&frame.payload)?;
    let key = KeyHash(auth.public_key);
    // The signature is checked for every claimed key, known or not, so timing does not tell
    // which keys the gateway knows.
    let proof_ok = key.verify(auth.role, &nonce, binding, &auth.signature);
    match (proof_ok, verify(&key, auth.role)) {
        (true, Verdict::Accept(name, params) | Verdict::AcceptIfProven(name, params, ..)) => {
            let params = match &auth.limits {
                Some(l) => params.narrowed(l),
                None => params,
            };
            let ok = AuthOk {
                name: name.clone(),
                params,
                features: message::FEATURES,
            };
            write_frames(io, &[], &[ok.to_frame()]).await?;
            Ok(Accepted {
                name,
                key,
                role: auth.role,
                params,
                leftover: buf,
            })
        }
        (_, Verdict::Refuse(code, message))
        | (false, Verdict::AcceptIfProven(_, _, code, message))
        | (true, Verdict::RefuseIfProven(code, message)) => {
            refuse(io, code, &message).await?;
            Err(HandshakeError::Rejected { code, message })
        }
        (false, Verdict::RefuseIfProven(..)) => {
            let message = "key not accepted by this gateway".to_string();
            refuse(io, ErrorCode::AuthFailed, &message).await?;
            Err(HandshakeError::Rejected {
                code: ErrorCode::AuthFailed,
                message,
            })
        }
        (false, Verdict::Accept(..)) => {
            let message = "key proof does not verify".to_string();
            refuse(io, ErrorCode::AuthFailed, &message).await?;
            Err(HandshakeError::Rejected {
                code: ErrorCode::AuthFailed,
                message,
            })
        }
    }
}

/// The message of a `RateLimited` refusal (`why`: what failed before, e.g. "key not accepted
/// by this gateway"). It says when to retry, in whole seconds, in the form
/// [`retry_after`] reads back.
pub fn rate_limited_message(retry_after: Duration, why: &str) -> String {
    let secs = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
    format!(
        "rate-limited: too many failed attempts from your address, retry in {} s ({why})",
        secs.max(1)
    )
}

/// The pause a [`rate_limited_message`] asks for, if `message` is one.
pub fn retry_after(message: &str) -> Option<Duration> {
    let rest = &message[message.find("retry in ")? + "retry in ".len()..];
    let digits = rest.split(' ').next()?;
    rest[digits.len()..]
        .starts_with(" s")
        .then(|| digits.parse().ok().map(Duration::from_secs))?
}

async fn refuse(io: &mut BoxIo, code: ErrorCode, message: &str) -> std::io::Result<()> {
    let ga = GoAway {
        code,
        message: message.to_string(),
    };
    write_frames(io, &[], &[ga.to_frame()]).await?;
    let _ = io.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limited_message_says_when_to_retry() {
        let m = rate_limited_message(Duration::from_millis(9_200), "key not accepted");
        assert_eq!(
            m,
            "rate-limited: too many failed attempts from your address, retry in 10 s (key not accepted)"
        );
        assert_eq!(retry_after(&m), Some(Duration::from_secs(10)));
        assert_eq!(
            retry_after(&rate_limited_message(Duration::ZERO, "x")),
            Some(Duration::from_secs(1))
        );
        assert_eq!(retry_after("key not accepted by this gateway"), None);
        assert_eq!(retry_after("retry in soon s"), None);
        assert_eq!(retry_after("retry in 5"), None);
    }
}
