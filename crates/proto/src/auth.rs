//! Keys and the challenge-response that proves one without sending it.
//!
//! A key is an Ed25519 seed (32 random bytes, written `bk_<base64url>`). What the gateway
//! stores may be the key itself or its one-way *key hash*, the Ed25519 public key
//! (`bkh_<base64url>`): like a hash, it cannot be turned back into the key, and unlike a
//! shared-secret hash it is not enough to log in with either. A leaked gateway config that
//! lists only key hashes lets nobody impersonate an agent.
//!
//! The proof is a signature over a transcript that contains the gateway's fresh nonce and,
//! over TLS, the TLS exporter value of this very connection. So a proof recorded on one
//! connection is worthless on any other (replay), and a man in the middle that terminates
//! TLS itself sees a different exporter value and cannot forward the proof.

use std::fmt;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ring::signature::{Ed25519KeyPair, KeyPair, UnparsedPublicKey, ED25519};

use crate::message::Role;

/// Prefix of an encoded secret key.
pub const KEY_PREFIX: &str = "bk_";
/// Prefix of an encoded key hash (public key).
pub const HASH_PREFIX: &str = "bkh_";
/// The channel binding when TLS ends at a proxy in front of the gateway: neither end knows
/// the other's TLS exporter, so the proof is bound to what both know, the WebSocket request's
/// host (the name the agent dialed, which reaches the gateway as the `Host` header) and path.
/// With the gateway's fresh nonce, a recorded proof is still useless later, and one relayed
/// through a host with another name does not verify.
pub fn proxied_binding(host: &str, path: &str) -> [u8; 32] {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(b"burrow proxied binding v1\0");
    ctx.update(host.to_ascii_lowercase().as_bytes());
    ctx.update(b"\0");
    ctx.update(path.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// Label the TLS exporter is asked for; both sides must use the same.
pub const EXPORTER_LABEL: &[u8] = b"EXPORTER-burrow-auth-v1";
/// Domain separation for the signed transcript.
const TRANSCRIPT_TAG: &[u8] = b"burrow auth v1\0";

/// Base64url without padding, as used in key strings.
pub fn encode_b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// Why a key string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// Missing prefix or bad base64.
    #[error("not a burrow key: expected `{prefix}` followed by 43 base64url characters (make one with `burrow keygen`)")]
    Format {
        /// The prefix expected.
        prefix: &'static str,
    },
}

fn decode_32(s: &str, prefix: &'static str) -> Result<[u8; 32], KeyError> {
    let body = s
        .trim()
        .strip_prefix(prefix)
        .ok_or(KeyError::Format { prefix })?;
    let raw = URL_SAFE_NO_PAD
        .decode(body)
        .map_err(|_| KeyError::Format { prefix })?;
    raw.try_into().map_err(|_| KeyError::Format { prefix })
}

/// A secret key. `Debug` and `Display` print a mask, never the key.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretKey {
    seed: [u8; 32],
}

impl SecretKey {
    /// A fresh random key.
    pub fn generate() -> Self {
        let rng = ring::rand::SystemRandom::new();
        let mut seed = [0u8; 32];
        // SystemRandom fails only when the OS has no randomness at all; nothing can go on then.
        ring::rand::SecureRandom::fill(&rng, &mut seed).expect("the OS random source failed");
        SecretKey { seed }
    }

    /// Parses `bk_...`.
    pub fn parse(s: &str) -> Result<Self, KeyError> {
        Ok(SecretKey {
            seed: decode_32(s, KEY_PREFIX)?,
        })
    }

    /// The key in its text form. Only for showing the user a key they just made.
    pub fn expose(&self) -> String {
        format!("{KEY_PREFIX}{}", encode_b64(&self.seed))
    }

    fn pair(&self) -> Ed25519KeyPair {
        // Any 32 bytes are a valid Ed25519 seed.
        Ed25519KeyPair::from_seed_unchecked(&self.seed).expect("32-byte seed is always valid")
    }

    /// The key's public half, which the gateway may store instead of the key.
    pub fn hash(&self) -> KeyHash {
        let mut out = [0u8; 32];
        out.copy_from_slice(self.pair().public_key().as_ref());
        KeyHash(out)
    }

    /// Signs the transcript for `role`, `nonce` and `binding`.
    pub fn prove(&self, role: Role, nonce: &[u8; 32], binding: &[u8; 32]) -> [u8; 64] {
        let pair = self.pair();
        let msg = transcript(role, nonce, binding, pair.public_key().as_ref());
        let sig = pair.sign(&msg);
        let mut out = [0u8; 64];
        out.copy_from_slice(sig.as_ref());
        out
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretKey(****)")
    }
}

impl fmt::Display for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("bk_****")
    }
}

/// The public half of a key ("key hash"): identifies an agent, verifies its proofs.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyHash(pub [u8; 32]);

impl KeyHash {
    /// Parses `bkh_...`.
    pub fn parse(s: &str) -> Result<Self, KeyError> {
        Ok(KeyHash(decode_32(s, HASH_PREFIX)?))
    }

    /// Checks a proof made by [`SecretKey::prove`].
    pub fn verify(&self, role: Role, nonce: &[u8; 32], binding: &[u8; 32], sig: &[u8; 64]) -> bool {
        let msg = transcript(role, nonce, binding, &self.0);
        UnparsedPublicKey::new(&ED25519, &self.0)
            .verify(&msg, sig)
            .is_ok()
    }

    /// A short form for logs (first 8 characters of the encoding).
    pub fn short(&self) -> String {
        let full = encode_b64(&self.0);
        format!("{HASH_PREFIX}{}…", &full[..8])
    }
}

impl fmt::Display for KeyHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{HASH_PREFIX}{}", encode_b64(&self.0))
    }
}

impl fmt::Debug for KeyHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyHash({self})")
    }
}

fn transcript(role: Role, nonce: &[u8; 32], binding: &[u8; 32], public: &[u8]) -> Vec<u8> {
    let mut msg = Vec::with_capacity(TRANSCRIPT_TAG.len() + 1 + 32 + 32 + 32);
    msg.extend_from_slice(TRANSCRIPT_TAG);
    msg.push(role as u8);
    msg.extend_from_slice(nonce);
    msg.extend_from_slice(binding);
    msg.extend_from_slice(public);
    msg
}

/// 32 fresh random bytes (nonces).
pub fn random_nonce() -> [u8; 32] {
    let rng = ring::rand::SystemRandom::new();
    let mut n = [0u8; 32];
    ring::rand::SecureRandom::fill(&rng, &mut n).expect("the OS random source failed");
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proof_verifies_only_for_same_nonce_binding_role_and_key() {
        let key = SecretKey::generate();
        let hash = key.hash();
        let nonce = random_nonce();
        let binding = [7u8; 32];
        let sig = key.prove(Role::Agent, &nonce, &binding);
        assert!(hash.verify(Role::Agent, &nonce, &binding, &sig));
        assert!(!hash.verify(Role::Connector, &nonce, &binding, &sig));
        assert!(!hash.verify(Role::Agent, &random_nonce(), &binding, &sig));
        assert!(!hash.verify(Role::Agent, &nonce, &[8u8; 32], &sig));
        let other = SecretKey::generate().hash();
        assert!(!other.verify(Role::Agent, &nonce, &binding, &sig));
    }

    #[test]
    fn text_forms_roundtrip_and_debug_masks() {
        let key = SecretKey::generate();
        let text = key.expose();
        assert!(text.starts_with("bk_"));
        assert_eq!(SecretKey::parse(&text).unwrap(), key);
        let hash = key.hash();
        assert_eq!(KeyHash::parse(&hash.to_string()).unwrap(), hash);
        let dbg = format!("{key:?} {key}");
        assert!(!dbg.contains(&text[3..]), "{dbg}");
        assert!(SecretKey::parse("bk_short").is_err());
        assert!(SecretKey::parse(&hash.to_string()).is_err());
        assert!(KeyHash::parse(&text).is_err());
    }
}
