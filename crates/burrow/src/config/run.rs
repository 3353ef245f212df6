//! `burrow run --config FILE`: one file, several instances of the roles, one process.
//!
//! ```toml
//! log_level = "info"            # the process's (one log for all instances)
//!
//! [[gateway]]
//! name = "edge"                 # every instance has a name, unique in the file
//! listen = "0.0.0.0:7443"       # ... then the keys of a gateway's own file
//! [[gateway.agents]]
//! name = "office"
//! key_hash = "bkh_..."
//! ports = [8080]
//!
//! [[agent]]
//! name = "office"
//! gateway = "gw.example.com:7443"
//! fingerprint = "SHA256:..."
//! forward = ["8080=127.0.0.1:80"]
//! ```
//!
//! Each `[[gateway]]`, `[[agent]]` and `[[connector]]` table takes exactly the keys of that role's own file
//! (its subtables as `[gateway.limits]`, `[[gateway.agents]]`, `[[agent.forwards]]`), plus
//! `name`. A mistake inside one instance's table makes only that instance an error, which
//! names it and the line; the others are read as usual, so they can run. A mistake outside
//! any instance (TOML syntax, an unknown top-level key) is an error for the whole file.
//!
//! The kinds of table are [`ROLES`]: `[[gateway]]`, `[[agent]]` and `[[connector]]` (its
//! forwards as `[[connector.forwards]]`).

use std::path::{Path, PathBuf};

use super::{
    edit_distance, ConfigError, FromToml as _, LogFormat, LogLevel, Name, RawAgent, RawGateway,
    Source,
};
use super::{AgentSettings, GatewaySettings};

/// The role of an instance: which table it came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `[[gateway]]`.
    Gateway,
    /// `[[agent]]`.
    Agent,
    /// `[[connector]]`.
    Connector,
}

impl Role {
    /// The table's name, as in `[[gateway]]`.
    pub fn table(self) -> &'static str {
        match self {
            Role::Gateway => "gateway",
            Role::Agent => "agent",
            Role::Connector => "connector",
        }
    }
}

/// The kinds of instance table a run file may hold.
pub const ROLES: [Role; 3] = [Role::Gateway, Role::Agent, Role::Connector];

/// One instance's settings, as its role's own file would give them.
#[derive(Debug, Clone)]
pub enum InstanceSettings {
    /// A gateway.
    Gateway(GatewaySettings),
    /// An agent.
    Agent(AgentSettings),
    /// A connector.
    Connector(super::ConnectorSettings),
}

/// One instance of a run file.
#[derive(Debug)]
pub struct Instance {
    /// Its `name` (for an instance without one, `#N`, its place among its role's tables).
    pub name: String,
    /// Its table's kind.
    pub role: Role,
    /// The line of its table's header.
    pub line: usize,
    /// Its settings, or what is wrong with them.
    pub settings: Result<InstanceSettings, ConfigError>,
}

impl Instance {
    /// `[[agent]] office (run.toml line 9)`: how messages name it.
    pub fn describe(&self, file: &Path) -> String {
        format!(
            "[[{}]] {} ({} line {})",
            self.role.table(),
            self.name,
            file.display(),
            self.line
        )
    }
}

impl ConfigError {
    /// The error without the file's name, for a message that named the file already (`line
    /// 27, key connect_timeout: must be more than 0`).
    pub fn within_file(&self) -> String {
        match self {
            ConfigError::Invalid {
                line, key, message, ..
            } => format!("line {line}{}: {message}", super::key_part(key)),
            other => other.to_string(),
        }
    }
}

/// A run file: the process's own settings and its instances, in file order.
#[derive(Debug)]
pub struct RunFile {
    /// The file.
    pub path: PathBuf,
    /// `log_level` at the top of the file.
    pub log_level: Option<LogLevel>,
    /// `log_format` at the top of the file.
    pub log_format: Option<LogFormat>,
    /// The instances.
    pub instances: Vec<Instance>,
}

/// Reads a run file.
pub fn load_run_file(path: &Path) -> Result<RunFile, ConfigError> {
    let text = super::read(path)?;
    parse_run_file(path, &text)
}

/// Keys a run file has outside its instances.
const TOP_KEYS: [&str; 2] = ["log_level", "log_format"];

/// Parses the text of a run file; `path` names it in errors and anchors relative paths.
pub fn parse_run_file(path: &Path, text: &str) -> Result<RunFile, ConfigError> {
    let src = Source { path, text };
    let doc = toml_edit::ImDocument::parse(text.to_string()).map_err(|e| {
        let span = e.span().unwrap_or(0..0);
        let key = src.key_on_line(span.start);
        src.error(span, key, e.message().trim().to_string())
    })?;
    let mut run = RunFile {
        path: path.to_path_buf(),
        log_level: None,
        log_format: None,
        instances: Vec::new(),
    };
    for (key, item) in doc.as_table().iter() {
        let span = item_span(item);
        match key {
            "log_level" | "log_format" => {
                let value = item
                    .as_str()
                    .map(|v| toml::Value::String(v.to_string()))
                    .ok_or_else(|| src.error(span.clone(), key, "expected a string"))?;
                if key == "log_level" {
                    run.log_level =
                        Some(LogLevel::from_toml(&value).map_err(|why| src.error(span, key, why))?);
                } else {
                    run.log_format = Some(
                        LogFormat::from_toml(&value).map_err(|why| src.error(span, key, why))?,
                    );
                }
            }
            _ => {
                let Some(role) = ROLES.into_iter().find(|r| r.table() == key) else {
                    return Err(src.error(span, key, unknown_top_key(key)));
                };
                let Some(tables) = item.as_array_of_tables() else {
                    return Err(src.error(
                        span,
                        key,
                        format!("each instance is a [[{key}]] table (two brackets), with a `name`"),
                    ));
                };
                for (i, table) in tables.iter().enumerate() {
                    run.instances.push(instance(&src, role, i, table));
                }
            }
        }
    }
    if run.instances.is_empty() {
        return Err(src.error(
            0..0,
            "",
            "no instances: add [[gateway]], [[agent]] or [[connector]] tables, each with a `name` and the \
             keys of that role's own config file",
        ));
    }
    // Names are how logs and messages tell instances apart.
    run.instances.sort_by_key(|i| i.line);
    for i in 1..run.instances.len() {
        let (earlier, rest) = run.instances.split_at_mut(i);
        let this = &mut rest[0];
        if this.settings.is_err() {
            continue;
        }
        if let Some(e) = earlier.iter().find(|e| e.name == this.name) {
            this.settings = Err(ConfigError::Value(format!(
                "the name `{}` is taken by the [[{}]] at line {}: give each instance its own name",
                this.name,
                e.role.table(),
                e.line
            )));
        }
    }
    Ok(run)
}

fn unknown_top_key(key: &str) -> String {
    let known: Vec<&str> = ROLES.iter().map(|r| r.table()).chain(TOP_KEYS).collect();
    match known.iter().min_by_key(|k| edit_distance(key, k)) {
        Some(best) if edit_distance(key, best) <= 2 => {
            format!("unknown key `{key}`: did you mean `{best}`?")
        }
        _ => format!(
            "unknown key `{key}` (a run file holds [[gateway]], [[agent]] and [[connector]] \
             tables, and {})",
            TOP_KEYS.join(", ")
        ),
    }
}

fn item_span(item: &toml_edit::Item) -> std::ops::Range<usize> {
    match item {
        toml_edit::Item::Value(v) => v.span(),
        toml_edit::Item::Table(t) => t.span(),
        toml_edit::Item::ArrayOfTables(a) => a.span(),
        toml_edit::Item::None => None,
    }
    .unwrap_or(0..0)
}

/// One instance table: its name, then the rest as the role's own file.
fn instance(src: &Source<'_>, role: Role, index: usize, table: &toml_edit::Table) -> Instance {
    let span = table.span().unwrap_or(0..0);
    let line = src.line(span.start);
    let mut table = table.clone();
    let name_item = table.remove("name");
    let placeholder = format!("#{}", index + 1);
    let at = format!("{}[{index}]", role.table());
    let name = match &name_item {
        None => Err(src.error(
            span,
            at.clone(),
            format!(
                "missing key `name`: every [[{}]] needs one, unique in the file (it names the \
                 instance in logs and messages)",
                role.table()
            ),
        )),
        Some(item) => {
            let value = item
                .as_str()
                .map(|s| toml::Value::String(s.to_string()))
                .unwrap_or(toml::Value::Boolean(false));
            Name::from_toml(&value)
                .map(|n| n.0)
                .map_err(|why| src.error(item_span(item), format!("{at}.name"), why))
        }
    };
    let (name, settings) = match name {
        Ok(name) => (name, parse_instance(src, role, table)),
        Err(e) => (placeholder, Err(e)),
    };
    Instance {
        name,
        role,
        line,
        settings,
    }
}

/// The extension point for each role: the table is read with that role's own file reader,
/// so a run file takes exactly the keys of the role's file.
fn parse_instance(
    src: &Source<'_>,
    role: Role,
    table: toml_edit::Table,
) -> Result<InstanceSettings, ConfigError> {
    match role {
        Role::Gateway => {
            let raw: RawGateway = src.deserialize_table(table)?;
            src.gateway(raw).map(InstanceSettings::Gateway)
        }
        Role::Agent => {
            let raw: RawAgent = src.deserialize_table(table)?;
            src.agent(raw).map(InstanceSettings::Agent)
        }
        Role::Connector => {
            let raw: super::connector::RawConnector = src.deserialize_table(table)?;
            src.connector(raw).map(InstanceSettings::Connector)
        }
    }
}

impl Source<'_> {
    /// Reads a raw struct from one table of the file; errors carry the file's lines.
    fn deserialize_table<T: serde::de::DeserializeOwned>(
        &self,
        table: toml_edit::Table,
    ) -> Result<T, ConfigError> {
        let de = toml_edit::de::Deserializer::from(toml_edit::DocumentMut::from(table));
        serde_path_to_error::deserialize(de).map_err(|e| {
            let key = super::key_path(e.path());
            let inner = e.into_inner();
            let span = inner.span().unwrap_or(0..0);
            let message = super::explain(&key, inner.message());
            self.error(span, key, message)
        })
    }

    /// The 1-based line of byte `offset`.
    fn line(&self, offset: usize) -> usize {
        let end = offset.min(self.text.len());
        1 + self.text.as_bytes()[..end]
            .iter()
            .filter(|b| **b == b'\n')
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "bk_zlpV87yiiQg6NJ7bgH5mrgoSwLSXRExx5Swq84TwkhA";

    fn run(text: &str) -> RunFile {
        parse_run_file(Path::new("conf/run.toml"), text).expect("the file parses")
    }

    #[test]
    fn instances_take_their_roles_keys_and_a_name() {
        let r = run(&format!(
            "log_level = \"debug\"\n\n[[gateway]]\nname = \"edge\"\nlisten = \"127.0.0.1:7443\"\n\
             [gateway.limits]\nmax_streams = 10\n[[gateway.agents]]\nname = \"office\"\n\
             key = \"{KEY}\"\nports = [8080]\n\n[[agent]]\nname = \"office\"\n\
             gateway = \"127.0.0.1:7443\"\nkey = \"{KEY}\"\ntransport = \"tcp\"\n\
             [[agent.forwards]]\ntarget = \"127.0.0.1:80\"\npublic_port = 8080\n"
        ));
        assert_eq!(r.log_level, Some(LogLevel::Debug));
        assert_eq!(r.instances.len(), 2);
        let gw = &r.instances[0];
        assert_eq!(
            (gw.name.as_str(), gw.role, gw.line),
            ("edge", Role::Gateway, 3)
        );
        let Ok(InstanceSettings::Gateway(g)) = &gw.settings else {
            panic!("{:?}", gw.settings)
        };
        assert_eq!(g.limits.as_ref().map(|l| l.max_streams), Some(10));
        assert_eq!(g.agents.as_ref().map(Vec::len), Some(1));
        let agent = &r.instances[1];
        assert_eq!((agent.name.as_str(), agent.line), ("office", 13));
        let Ok(InstanceSettings::Agent(a)) = &agent.settings else {
            panic!("{:?}", agent.settings)
        };
        assert_eq!(a.forwards.as_ref().map(|f| f[0].public_port), Some(8080));
    }

    #[test]
    fn a_bad_instance_is_an_error_of_its_own_with_its_line() {
        let r = run(
            "[[agent]]\nname = \"good\"\ngateway = \"127.0.0.1:7443\"\n\n[[agent]]\n\
             name = \"bad\"\ngateway = \"127.0.0.1:7443\"\nforward = [\"127.0.0.1:99999\"]\n\n\
             [[agent]]\ngatway = \"x:1\"\n\n[[connector]]\nname = \"later\"\nforwad = []\n\n\
             [[agent]]\nname = \"good\"\n",
        );
        assert!(r.instances[0].settings.is_ok());
        let bad = r.instances[1].settings.as_ref().unwrap_err().to_string();
        assert!(
            bad.starts_with("conf/run.toml line 8, key forward[0]: "),
            "{bad}"
        );
        assert_eq!(
            r.instances[1].describe(Path::new("run.toml")),
            "[[agent]] bad (run.toml line 5)"
        );
        let unnamed = &r.instances[2];
        assert_eq!(unnamed.name, "#3");
        let e = unnamed.settings.as_ref().unwrap_err().to_string();
        assert!(
            e.contains("line 10") && e.contains("missing key `name`"),
            "{e}"
        );
        let connector = r.instances[3].settings.as_ref().unwrap_err().to_string();
        assert!(
            connector.starts_with("conf/run.toml line 15, key forwad: ")
                && connector.contains("did you mean `forward`"),
            "{connector}"
        );
        let twice = r.instances[4].settings.as_ref().unwrap_err().to_string();
        assert!(
            twice.contains("the name `good` is taken by the [[agent]] at line 1"),
            "{twice}"
        );
    }

    #[test]
    fn mistakes_outside_instances_stop_the_file() {
        let e = |t: &str| {
            parse_run_file(Path::new("r.toml"), t)
                .unwrap_err()
                .to_string()
        };
        assert!(e("[[agents]]\nname = \"x\"\n").contains("did you mean `agent`?"));
        assert!(e("[gateway]\nname = \"x\"\n").contains("[[gateway]] table (two brackets)"));
        assert!(e("log_level = \"loud\"\n[[agent]]\nname = \"a\"\n")
            .starts_with("r.toml line 1, key log_level:"));
        assert!(e("log_level = \"info\"\n").contains("no instances"));
        let syntax = e("[[agent]]\nname = \"a\"\nforward = [\n");
        assert!(syntax.starts_with("r.toml line "), "{syntax}");
    }
}
