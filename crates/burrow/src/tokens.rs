//! Tokens a running gateway issues (`burrow token create`): agent keys it accepts beside the
//! config's `[[agents]]`, each with a name, a port grant and perhaps an expiry, revocable
//! without a restart.
//!
//! The gateway makes the key, hands it out once and keeps only its hash, in `tokens.toml` in
//! the state directory (mode `0600`, rewritten atomically with [`crate::state`]'s
//! private-file writer). Revoked and expired tokens stay in the file, so that their key is
//! refused with a message saying so rather than as an unknown key, until room is needed: the
//! book holds at most [`MAX_TOKENS`] tokens, and a new one pushes out the revoked or expired
//! token that ended first. A file that cannot be read or parsed stops the gateway at start:
//! ignoring it would forget which keys were revoked.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use burrow_proto::auth::{KeyHash, SecretKey};
use serde::{Deserialize, Serialize};

use crate::config::{AgentGrant, KeySpec, PortRange};

/// File name inside the state directory.
pub const TOKEN_FILE: &str = "tokens.toml";
/// Most tokens kept, revoked and expired ones included.
pub const MAX_TOKENS: usize = 1024;
/// Largest token file read.
pub const MAX_FILE_BYTES: u64 = 1 << 20;
/// Longest token name.
pub const MAX_NAME: usize = 64;
/// Longest expiry: a hundred years (further dates are not written in RFC 3339's four digits).
pub const MAX_TTL: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// One token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    /// The agent's name, as in `[[agents]] name`.
    pub name: String,
    /// The hash of its key (the key itself is not kept).
    pub key_hash: KeyHash,
    /// Public ports it may bind.
    pub ports: Vec<PortRange>,
    /// When it was made.
    pub created: SystemTime,
    /// When it stops being accepted, if ever.
    pub expires: Option<SystemTime>,
    /// When it was revoked.
    pub revoked: Option<SystemTime>,
}

/// Where a token stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenState {
    /// Accepted.
    Active,
    /// Past its expiry.
    Expired,
    /// Revoked.
    Revoked,
}

impl TokenState {
    /// `active`, `expired` or `revoked`.
    pub fn as_str(self) -> &'static str {
        match self {
            TokenState::Active => "active",
            TokenState::Expired => "expired",
            TokenState::Revoked => "revoked",
        }
    }
}

impl Token {
    /// Where it stands at `now`.
    pub fn state(&self, now: SystemTime) -> TokenState {
        if self.revoked.is_some() {
            TokenState::Revoked
        } else if self.expires.is_some_and(|e| e <= now) {
            TokenState::Expired
        } else {
            TokenState::Active
        }
    }

    /// The grant the gateway accepts it with.
    pub fn grant(&self) -> AgentGrant {
        AgentGrant {
            name: self.name.clone(),
            key: KeySpec::Hash(self.key_hash),
            ports: self.ports.clone(),
            paths: Vec::new(),
            socket_mode: crate::config::DEFAULT_SOCKET_MODE,
        }
    }

    /// Why its key is refused at `now` (`None` while it is active), for the agent to read.
    pub fn refusal(&self, now: SystemTime) -> Option<String> {
        match self.state(now) {
            TokenState::Active => None,
            TokenState::Revoked => Some(format!(
                "this key (token `{}`) was revoked on the gateway at {}: ask the gateway's operator for a new one (`burrow token create`)",
                self.name,
                stamp(self.revoked.unwrap_or(now))
            )),
            TokenState::Expired => Some(format!(
                "this key (token `{}`) expired at {}: ask the gateway's operator for a new one (`burrow token create`)",
                self.name,
                stamp(self.expires.unwrap_or(now))
            )),
        }
    }

    /// When it stopped being accepted, if it has.
    fn ended(&self, now: SystemTime) -> Option<SystemTime> {
        match self.state(now) {
            TokenState::Active => None,
            TokenState::Revoked => self.revoked,
            TokenState::Expired => self.expires,
        }
    }
}

/// A time as RFC 3339 in UTC, to the second.
pub fn stamp(t: SystemTime) -> String {
    use std::fmt::Write as _;
    // humantime's formatter panics before 1970 and errs after 9999: neither is ever written.
    let mut out = String::new();
    if t < SystemTime::UNIX_EPOCH
        || write!(out, "{}", humantime::format_rfc3339_seconds(t)).is_err()
    {
        return "(out of range)".into();
    }
    out
}

/// Checks a token name: 1 to [`MAX_NAME`] letters, digits, `-`, `_`, `.` or `@`.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.@".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a token name: use 1 to {MAX_NAME} letters, digits, `-`, `_`, `.` or `@`"
        ))
    }
}

/// The tokens of a gateway, and the file that keeps them.
#[derive(Debug)]
pub struct TokenBook {
    path: PathBuf,
    tokens: Vec<Token>,
    /// When each token's agent last ended a session (kept in memory only).
    seen: std::collections::HashMap<String, SystemTime>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    token: Vec<RawToken>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawToken {
    name: String,
    key_hash: String,
    ports: Vec<String>,
    created: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    expires: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    revoked: Option<String>,
}

impl TokenBook {
    /// An empty book that would be kept in `dir`.
    pub fn empty(dir: &Path) -> TokenBook {
        TokenBook {
            path: dir.join(TOKEN_FILE),
            tokens: Vec::new(),
            seen: std::collections::HashMap::new(),
        }
    }

    /// Reads the token file of state directory `dir` (none: an empty book), or says why it
    /// cannot be used.
    pub fn load(dir: &Path) -> Result<TokenBook, String> {
        let mut book = TokenBook::empty(dir);
        let path = book.path.clone();
        let bad = |why: String| {
            format!(
                "token file {} cannot be used: {why}. It lists the tokens `burrow token create` made and the ones revoked, so the gateway does not start without it: restore it from a backup, or move it away to drop every token",
                path.display()
            )
        };
        let text = match read_bounded(&path) {
            Ok(Some(text)) => text,
            Ok(None) => return Ok(book),
            Err(why) => return Err(bad(why)),
        };
        let file: File =
            toml::from_str(&text).map_err(|e| bad(e.to_string().trim().replace('\n', " ")))?;
        if file.token.len() > MAX_TOKENS {
            return Err(bad(format!("more than {MAX_TOKENS} tokens")));
        }
        for (i, raw) in file.token.into_iter().enumerate() {
            let at =
                |what: &str, e: String| bad(format!("token[{i}] ({:?}) {what}: {e}", raw.name));
            let time = |s: &str| humantime::parse_rfc3339_weak(s).map_err(|e| e.to_string());
            let token = Token {
                key_hash: KeyHash::parse(&raw.key_hash)
                    .map_err(|e| at("key_hash", e.to_string()))?,
                ports: raw
                    .ports
                    .iter()
                    .map(|p| PortRange::parse(p))
                    .collect::<Result<_, _>>()
                    .map_err(|e| at("ports", e))?,
                created: time(&raw.created).map_err(|e| at("created", e))?,
                expires: raw
                    .expires
                    .as_deref()
                    .map(time)
                    .transpose()
                    .map_err(|e| at("expires", e))?,
                revoked: raw
                    .revoked
                    .as_deref()
                    .map(time)
                    .transpose()
                    .map_err(|e| at("revoked", e))?,
                name: raw.name,
            };
            check_name(&token.name).map_err(|e| bad(format!("token[{i}]: {e}")))?;
            book.tokens.push(token);
        }
        Ok(book)
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every token, oldest first.
    pub fn tokens(&self) -> &[Token] {
        &self.tokens
    }

    /// The tokens accepted at `now`.
    pub fn active(&self, now: SystemTime) -> impl Iterator<Item = &Token> {
        self.tokens
            .iter()
            .filter(move |t| t.state(now) == TokenState::Active)
    }

    /// The token of key `hash`, if the gateway issued it.
    pub fn by_hash(&self, hash: &KeyHash) -> Option<&Token> {
        self.tokens.iter().rev().find(|t| t.key_hash == *hash)
    }

    /// Notes that the agent `name`, if it is a token's, was connected until `at`.
    pub fn seen(&mut self, name: &str, at: SystemTime) {
        if self.tokens.iter().any(|t| t.name == name) {
            self.seen.insert(name.to_string(), at);
        }
    }

    /// When the agent `name` last ended a session, since the gateway started.
    pub fn last_seen(&self, name: &str) -> Option<SystemTime> {
        self.seen.get(name).copied()
    }

    /// The next moment an active token expires.
    pub fn next_expiry(&self, now: SystemTime) -> Option<SystemTime> {
        self.active(now).filter_map(|t| t.expires).min()
    }

    /// Makes a token `name` for `ports`, valid for `ttl` (for ever without one), unless the
    /// name is taken (`taken`: by the config's agents; here: by an active token). Returns its
    /// key, which is not kept. The caller writes the book ([`TokenBook::render`]).
    pub fn create(
        &mut self,
        name: &str,
        ports: Vec<PortRange>,
        ttl: Option<Duration>,
        now: SystemTime,
        taken: impl Fn(&str) -> bool,
    ) -> Result<(SecretKey, Token), String> {
        check_name(name)?;
        if ports.is_empty() {
            return Err("a token needs ports (e.g. --ports 9000-9010 or 5353/udp)".into());
        }
        if taken(name) {
            return Err(format!(
                "an agent named `{name}` is in the gateway's config ([[agents]]): pick another name"
            ));
        }
        if self.active(now).any(|t| t.name == name) {
            return Err(format!(
                "a token named `{name}` exists: revoke it first (`burrow token revoke {name}`) or pick another name"
            ));
        }
        if ttl.is_some_and(|t| t.is_zero()) {
            return Err("--expires must be more than 0".into());
        }
        if ttl.is_some_and(|t| t > MAX_TTL) {
            return Err(
                "--expires may be at most 100 years (leave it out for a token that does not expire)"
                    .into(),
            );
        }
        let expires = ttl.and_then(|t| now.checked_add(t));
        if self.tokens.len() >= MAX_TOKENS {
            // Room goes to the new one at the cost of the token that ended first.
            let oldest = self
                .tokens
                .iter()
                .enumerate()
                .filter_map(|(i, t)| t.ended(now).map(|e| (e, i)))
                .min()
                .map(|(_, i)| i);
            match oldest {
                Some(i) => {
                    let gone = self.tokens.remove(i);
                    if self.tokens.iter().all(|t| t.name != gone.name) {
                        self.seen.remove(&gone.name);
                    }
                }
                None => {
                    return Err(format!(
                        "the gateway has {MAX_TOKENS} active tokens, the most it keeps: revoke some first"
                    ))
                }
            }
        }
        let key = SecretKey::generate();
        let token = Token {
            name: name.to_string(),
            key_hash: key.hash(),
            ports,
            created: now,
            expires,
            revoked: None,
        };
        // A revoked or expired token of that name steps aside: its key is then unknown.
        self.tokens.retain(|t| t.name != name);
        self.seen.remove(name);
        self.tokens.push(token.clone());
        Ok((key, token))
    }

    /// Revokes the active token `name`.
    pub fn revoke(&mut self, name: &str, now: SystemTime) -> Result<Token, String> {
        let Some(t) = self
            .tokens
            .iter_mut()
            .rev()
            .find(|t| t.name == name && t.revoked.is_none())
        else {
            return Err(format!(
                "no token named `{name}` (`burrow token list` shows them)"
            ));
        };
        t.revoked = Some(now);
        Ok(t.clone())
    }

    /// Takes back the token `name` just made (it could not be kept).
    pub fn forget(&mut self, name: &str) {
        if let Some(i) = self.tokens.iter().rposition(|t| t.name == name) {
            self.tokens.remove(i);
        }
    }

    /// Takes back the revocation of `name` just made (it could not be kept).
    pub fn unrevoke(&mut self, name: &str) {
        if let Some(t) = self.tokens.iter_mut().rev().find(|t| t.name == name) {
            t.revoked = None;
        }
    }

    /// The file's contents.
    pub fn render(&self) -> String {
        let file = File {
            token: self
                .tokens
                .iter()
                .map(|t| RawToken {
                    name: t.name.clone(),
                    key_hash: t.key_hash.to_string(),
                    ports: t.ports.iter().map(PortRange::to_string).collect(),
                    created: stamp(t.created),
                    expires: t.expires.map(stamp),
                    revoked: t.revoked.map(stamp),
                })
                .collect(),
        };
        let body = toml::to_string(&file).unwrap_or_default();
        format!(
            "# Agent tokens issued by `burrow token create`: their key hashes, never the keys.\n# Written by burrow; revoked tokens are kept so that their key is refused as revoked.\n\n{body}"
        )
    }

    /// Writes the file (mode `0600`, atomically).
    pub fn save(&self) -> std::io::Result<()> {
        if let Some(dir) = self.path.parent() {
            crate::state::ensure_private_dir(dir)?;
        }
        crate::state::write_private_file(&self.path, self.render().as_bytes())
    }
}

/// The file's text, `None` if there is none, or why it cannot be read.
fn read_bounded(path: &Path) -> Result<Option<String>, String> {
    use std::io::Read as _;
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.to_string()),
    };
    let mut text = String::new();
    file.take(MAX_FILE_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(|e| e.to_string())?;
    if text.len() as u64 > MAX_FILE_BYTES {
        return Err(format!("larger than {} MiB", MAX_FILE_BYTES >> 20));
    }
    Ok(Some(text))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ports() -> Vec<PortRange> {
        vec![PortRange::tcp(9000, 9010)]
    }

    #[test]
    fn create_revoke_expire_and_read_back() {
        let tmp = tempfile::tempdir().unwrap();
        let mut book = TokenBook::load(tmp.path()).unwrap();
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let (key, t) = book.create("ci", ports(), None, now, |_| false).unwrap();
        assert_eq!(t.key_hash, key.hash());
        let err = book
            .create("ci", ports(), None, now, |_| false)
            .unwrap_err();
        assert!(err.contains("exists"), "{err}");
        let err = book
            .create("web", ports(), None, now, |n| n == "web")
            .unwrap_err();
        assert!(err.contains("in the gateway's config"), "{err}");
        assert!(book
            .create("bad name", ports(), None, now, |_| false)
            .is_err());
        assert!(book.create("x", vec![], None, now, |_| false).is_err());
        let far = Some(Duration::from_secs(u64::MAX / 4));
        let err = book
            .create("far", ports(), far, now, |_| false)
            .unwrap_err();
        assert!(err.contains("at most 100 years"), "{err}");
        let (_, short) = book
            .create("short", ports(), Some(Duration::from_secs(2)), now, |_| {
                false
            })
            .unwrap();
        assert_eq!(book.next_expiry(now), short.expires);
        let later = now + Duration::from_secs(2);
        assert_eq!(short.state(later), TokenState::Expired);
        assert!(short.refusal(later).unwrap().contains("expired"));
        assert_eq!(book.active(later).count(), 1);
        book.revoke("ci", later).unwrap();
        assert!(book.revoke("ci", later).is_err(), "revoked already");
        let ci = book.by_hash(&key.hash()).unwrap();
        assert!(ci.refusal(later).unwrap().contains("was revoked"));

        std::fs::write(book.path(), book.render()).unwrap();
        let back = TokenBook::load(tmp.path()).unwrap();
        assert_eq!(back.tokens(), book.tokens());
        assert!(!book.render().contains(&key.expose()), "no key in the file");
    }

    #[test]
    fn full_book_drops_the_token_that_ended_first() {
        let tmp = tempfile::tempdir().unwrap();
        let mut book = TokenBook::empty(tmp.path());
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        for i in 0..MAX_TOKENS {
            book.create(&format!("t{i}"), ports(), None, now, |_| false)
                .unwrap();
        }
        let err = book
            .create("more", ports(), None, now, |_| false)
            .unwrap_err();
        assert!(err.contains("revoke some first"), "{err}");
        book.revoke("t5", now).unwrap();
        book.create("more", ports(), None, now, |_| false).unwrap();
        assert_eq!(book.tokens().len(), MAX_TOKENS);
        assert!(book.tokens().iter().all(|t| t.name != "t5"));
    }

    #[test]
    fn corrupt_file_is_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join(TOKEN_FILE), "[[token]]\nname = 1\n").unwrap();
        let err = TokenBook::load(tmp.path()).unwrap_err();
        assert!(err.contains("tokens.toml cannot be used"), "{err}");
    }
}
