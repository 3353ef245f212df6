//! The lease file in the gateway's state directory: the public port the gateway chose for
//! each agent's service (a forward asking for port 0), TCP or UDP, so that a restarted gateway
//! gives the same port back.
//!
//! The file (`leases.toml`) maps an agent name, a protocol and a service name to a port: a TCP
//! and a UDP port of the same number are two leases. `protocol` is left out for TCP, as files
//! written before UDP had it, so those read as they were. The gateway
//! rewrites it (atomically, with [`crate::state`]'s private-file writer) when it chooses a port
//! or closes one it had chosen; at start it binds each remembered port again and puts it on
//! lease, as if the agent had just dropped. It is bounded ([`MAX_LEASES`] entries, a file of at
//! most [`MAX_FILE_BYTES`]); a file that cannot be read or parsed is reported and ignored, never
//! fatal: the only loss is that agents get new ports.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burrow_proto::message::Protocol;
use serde::{Deserialize, Serialize};

/// File name inside the state directory.
pub const LEASE_FILE: &str = "leases.toml";
/// Most ports remembered; past it, newly chosen ports are not kept across a restart.
pub const MAX_LEASES: usize = 4096;
/// Largest lease file read; a bigger one is ignored.
pub const MAX_FILE_BYTES: u64 = 8 << 20;

/// One remembered port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The agent's name (`[[agents]] name`, or `default`).
    pub agent: String,
    /// A TCP or a UDP port.
    pub protocol: Protocol,
    /// The service's name (the forward as the agent wrote it).
    pub service: String,
    /// The port the gateway chose.
    pub port: u16,
    /// The group the port was chosen for, if any: its other members join it after a restart.
    pub group: Option<String>,
}

/// A lease as the file holds it.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    agent: String,
    /// Absent for TCP (files from before UDP leases have none).
    #[serde(default, skip_serializing_if = "Kind::is_tcp")]
    protocol: Kind,
    service: String,
    port: u16,
    /// The group the port was chosen for; absent outside a group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    group: Option<String>,
}

/// [`Protocol`] in the file, and in the book's keys (ordered, so the file is stable).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Kind {
    #[default]
    Tcp,
    Udp,
}

impl Kind {
    fn is_tcp(&self) -> bool {
        *self == Kind::Tcp
    }
}

impl From<Protocol> for Kind {
    fn from(p: Protocol) -> Kind {
        match p {
            Protocol::Tcp => Kind::Tcp,
            Protocol::Udp => Kind::Udp,
        }
    }
}

impl From<Kind> for Protocol {
    fn from(k: Kind) -> Protocol {
        match k {
            Kind::Tcp => Protocol::Tcp,
            Kind::Udp => Protocol::Udp,
        }
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    lease: Vec<Entry>,
}

/// Agent, protocol and service: what one port is remembered by.
type Key = (String, Kind, String);

fn key(agent: &str, protocol: Protocol, service: &str) -> Key {
    (agent.to_string(), protocol.into(), service.to_string())
}

/// The remembered ports, and where they are kept.
#[derive(Debug)]
pub struct LeaseBook {
    path: PathBuf,
    ports: BTreeMap<Key, (u16, Option<String>)>,
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
            book.ports
                .insert((l.agent, l.protocol, l.service), (l.port, group));
        }
        let warning = (skipped > 0).then(|| {
            format!(
                "lease file {}: {skipped} entries skipped (port 0, or more than {MAX_LEASES})",
                path.display()
            )
        });
        (book, warning)
    }

    /// Every remembered port, by agent, protocol and service.
    pub fn leases(&self) -> Vec<Lease> {
        self.ports
            .iter()
            .map(|((agent, protocol, service), (port, group))| Lease {
                agent: agent.clone(),
                protocol: (*protocol).into(),
                service: service.clone(),
                port: *port,
                group: group.clone(),
            })
            .collect()
    }

    /// Remembers that `agent`'s `service` (of `group`, if any) got `port` of `protocol`.
    /// False when the book is full.
    pub fn set(
        &mut self,
        agent: &str,
        protocol: Protocol,
        service: &str,
        port: u16,
        group: Option<&str>,
    ) -> bool {
        let key = key(agent, protocol, service);
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

    /// Forgets `agent`'s `service` of `protocol`, if it is remembered with `port`.
    pub fn remove(&mut self, agent: &str, protocol: Protocol, service: &str, port: u16) {
        let key = key(agent, protocol, service);
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
            lease: (self.ports.iter())
                .map(|((agent, protocol, service), (port, group))| Entry {
                    agent: agent.clone(),
                    protocol: *protocol,
                    service: service.clone(),
                    port: *port,
                    group: group.clone(),
                })
                .collect(),
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
        assert!(book.set("default", Protocol::Tcp, "127.0.0.1:80", 40000, None));
        assert!(book.set("b", Protocol::Tcp, "a \"quoted\" name", 40001, Some("web")));
        book.remove("b", Protocol::Tcp, "a \"quoted\" name", 1); // another port: kept
        let text = book.render().unwrap();
        std::fs::write(tmp.path().join(LEASE_FILE), &text).unwrap();
        let (back, warning) = LeaseBook::load(tmp.path());
        assert!(warning.is_none(), "{warning:?}");
        assert_eq!(back.leases(), book.leases());
        assert_eq!(back.leases().len(), 2);
        let grouped: Vec<_> = back.leases().into_iter().filter_map(|l| l.group).collect();
        assert_eq!(grouped, ["web"]);
        book.remove("default", Protocol::Tcp, "127.0.0.1:80", 40000);
        assert_eq!(book.leases().len(), 1);

        for i in 0..MAX_LEASES {
            book.set("x", Protocol::Tcp, &i.to_string(), 1000, None);
        }
        assert_eq!(book.leases().len(), MAX_LEASES);
        assert!(
            !book.set("x", Protocol::Tcp, "one more", 1000, None),
            "full"
        );
        assert!(
            !book.set("x", Protocol::Udp, "one more", 1000, None),
            "full for UDP too"
        );
    }

    #[test]
    fn a_tcp_and_a_udp_lease_of_one_name_and_port_are_two() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut book, _) = LeaseBook::load(tmp.path());
        assert!(book.set("a", Protocol::Tcp, "svc", 40000, None));
        assert!(book.set("a", Protocol::Udp, "svc", 40000, None));
        assert!(book.set("a", Protocol::Udp, "dns", 40001, None));
        let text = book.render().unwrap();
        assert_eq!(text.matches("protocol = \"udp\"").count(), 2, "{text}");
        assert!(
            !text.contains("\"tcp\""),
            "TCP entries as before UDP: {text}"
        );
        std::fs::write(tmp.path().join(LEASE_FILE), &text).unwrap();
        let (mut back, warning) = LeaseBook::load(tmp.path());
        assert!(warning.is_none(), "{warning:?}");
        assert_eq!(back.leases(), book.leases());
        let protocols: Vec<Protocol> = back.leases().iter().map(|l| l.protocol).collect();
        assert_eq!(protocols, [Protocol::Tcp, Protocol::Udp, Protocol::Udp]);
        // Closing the UDP port forgets only the UDP lease.
        back.remove("a", Protocol::Udp, "svc", 40000);
        let left: Vec<(Protocol, String)> = (back.leases().into_iter())
            .map(|l| (l.protocol, l.service))
            .collect();
        assert_eq!(
            left,
            [(Protocol::Tcp, "svc".into()), (Protocol::Udp, "dns".into())]
        );
    }

    #[test]
    fn a_file_from_before_udp_leases_reads_as_tcp() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(
            tmp.path().join(LEASE_FILE),
            "# old\n\n[[lease]]\nagent = \"default\"\nservice = \"127.0.0.1:80\"\nport = 40000\n",
        )
        .unwrap();
        let (book, warning) = LeaseBook::load(tmp.path());
        assert!(warning.is_none(), "{warning:?}");
        assert_eq!(
            book.leases(),
            [Lease {
                agent: "default".into(),
                protocol: Protocol::Tcp,
                service: "127.0.0.1:80".into(),
                port: 40000,
                group: None,
            }]
        );
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
