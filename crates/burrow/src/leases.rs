//! The lease file in the gateway's state directory: the public port the gateway chose for
//! each agent's service (a forward asking for port 0), so that a restarted gateway gives the
//! same port back.
//!
//! The file (`leases.toml`) maps an agent name and a service name to a port. The gateway
//! rewrites it (atomically, with [`crate::state`]'s private-file writer) when it chooses a port
//! or closes one it had chosen; at start it binds each remembered port again and puts it on
//! lease, as if the agent had just dropped. It is bounded ([`MAX_LEASES`] entries, a file of at
//! most [`MAX_FILE_BYTES`]); a file that cannot be read or parsed is reported and ignored, never
//! fatal: the only loss is that agents get new ports.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// File name inside the state directory.
pub const LEASE_FILE: &str = "leases.toml";
/// Most ports remembered; past it, newly chosen ports are not kept across a restart.
pub const MAX_LEASES: usize = 4096;
/// Largest lease file read; a bigger one is ignored.
pub const MAX_FILE_BYTES: u64 = 8 << 20;

/// One remembered port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Lease {
    /// The agent's name (`[[agents]] name`, or `default`).
    pub agent: String,
    /// The service's name (the forward as the agent wrote it).
    pub service: String,
    /// The port the gateway chose.
    pub port: u16,
    /// The group the port was chosen for, if any: its other members join it after a restart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    lease: Vec<Lease>,
}

/// The remembered ports, and where they are kept.
#[derive(Debug)]
pub struct LeaseBook {
    path: PathBuf,
    ports: BTreeMap<(String, String), (u16, Option<String>)>,
    /// Changed since the last [`LeaseBook::render`].
    dirty: bool,
}

impl LeaseBook {
    /// Reads the lease file of state directory `dir`. A missing file is an empty book; one
    /// that cannot be read or parsed is an empty book and a warning to log.
    pub fn load(dir: &Path) -> (LeaseBook, Option<String>) {
        let path = dir.join(LEASE_FILE);
        let mut book = LeaseBook {
            path: path.clone(),
            ports: BTreeMap::new(),
            dirty: false,
        };
        let ignored = |why: String| {
            Some(format!(
                "lease file {} ignored: {why}; agents get new ports for forwards that let the gateway choose (the file is rewritten as ports are chosen)",
                path.display()
            ))
        };
        let text = match read_bounded(&path) {
            Ok(Some(text)) => text,
            Ok(None) => return (book, None),
            Err(why) => return (book, ignored(why)),
        };
        let file: File = match toml::from_str(&text) {
            Ok(f) => f,
            Err(e) => return (book, ignored(e.to_string().trim().replace('\n', " "))),
        };
        let mut skipped = 0usize;
        for l in file.lease {
            if l.port == 0 || book.ports.len() >= MAX_LEASES {
                skipped += 1;
                continue;
            }
            // A group name that is not one is dropped (the port is kept).
            let group = l.group.and_then(|g| crate::config::parse_group(&g).ok());
            book.ports.insert((l.agent, l.service), (l.port, group));
        }
        let warning = (skipped > 0).then(|| {
            format!(
                "lease file {}: {skipped} entries skipped (port 0, or more than {MAX_LEASES})",
                path.display()
            )
        });
        (book, warning)
    }

    /// Every remembered port, by agent and service.
    pub fn leases(&self) -> Vec<Lease> {
        self.ports
            .iter()
            .map(|((agent, service), (port, group))| Lease {
                agent: agent.clone(),
                service: service.clone(),
                port: *port,
                group: group.clone(),
            })
            .collect()
    }

    /// Remembers that `agent`'s `service` (of `group`, if any) got `port`. False when the
    /// book is full.
    pub fn set(&mut self, agent: &str, service: &str, port: u16, group: Option<&str>) -> bool {
        let key = (agent.to_string(), service.to_string());
        let value = (port, group.map(str::to_string));
        if self.ports.get(&key) == Some(&value) {
            return true;
        }
        if !self.ports.contains_key(&key) && self.ports.len() >= MAX_LEASES {
            return false;
        }
        self.ports.insert(key, value);
        self.dirty = true;
        true
    }

    /// Forgets `agent`'s `service`, if it is remembered with `port`.
    pub fn remove(&mut self, agent: &str, service: &str, port: u16) {
        let key = (agent.to_string(), service.to_string());
        if self.ports.get(&key).is_some_and(|(p, _)| *p == port) {
            self.ports.remove(&key);
            self.dirty = true;
        }
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file's new contents, if anything changed since the last call.
    pub fn render(&mut self) -> Option<String> {
        if !std::mem::take(&mut self.dirty) {
            return None;
        }
        let file = File {
            lease: self.leases(),
        };
        let body = toml::to_string(&file).unwrap_or_default();
        Some(format!(
            "# Public ports this gateway chose for its agents' services, so that they get the\n# same ones back after a restart. Written by burrow; deleting it only means new ports.\n\n{body}"
        ))
    }
}

/// The file's text, `None` if there is none, or why it cannot be used.
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

    #[test]
    fn round_trip_and_bounds() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut book, warning) = LeaseBook::load(tmp.path());
        assert!(warning.is_none());
        assert!(book.render().is_none(), "nothing changed");
        assert!(book.set("default", "127.0.0.1:80", 40000, None));
        assert!(book.set("b", "a \"quoted\" name", 40001, Some("web")));
        book.remove("b", "a \"quoted\" name", 1); // another port: kept
        let text = book.render().unwrap();
        std::fs::write(tmp.path().join(LEASE_FILE), &text).unwrap();
        let (back, warning) = LeaseBook::load(tmp.path());
        assert!(warning.is_none(), "{warning:?}");
        assert_eq!(back.leases(), book.leases());
        assert_eq!(back.leases().len(), 2);
        let grouped: Vec<_> = back.leases().into_iter().filter_map(|l| l.group).collect();
        assert_eq!(grouped, ["web"]);
        book.remove("default", "127.0.0.1:80", 40000);
        assert_eq!(book.leases().len(), 1);

        for i in 0..MAX_LEASES {
            book.set("x", &i.to_string(), 1000, None);
        }
        assert_eq!(book.leases().len(), MAX_LEASES);
        assert!(!book.set("x", "one more", 1000, None), "full");
    }

    #[test]
    fn corrupt_or_huge_file_is_reported_and_ignored() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join(LEASE_FILE);
        std::fs::write(&path, "[[lease]]\nagent = \"a\"\nport = \"x\"\n").unwrap();
        let (book, warning) = LeaseBook::load(tmp.path());
        assert!(book.leases().is_empty());
        let warning = warning.unwrap();
        assert!(warning.contains("leases.toml ignored"), "{warning}");
        std::fs::write(&path, vec![b'#'; (MAX_FILE_BYTES + 1) as usize]).unwrap();
        let (_, warning) = LeaseBook::load(tmp.path());
        assert!(warning.unwrap().contains("larger than 8 MiB"));
    }
}
