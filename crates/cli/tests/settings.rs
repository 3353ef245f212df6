//! Every documented setting takes effect, through the real `burrow` binary.
//!
//! - [`FLAGS`]: each flag and its `BURROW_<FLAG>` variable, read back with `--print-config`
//!   (which prints the settings as a config file); the flag beats the variable, which beats
//!   the file.
//! - [`FILE_KEYS`]: each key of the config files, read back with `--print-config --config`;
//!   [`every_example_key_is_in_the_table`] keeps the table in step with `examples/*.toml`.
//! - [`LOG_LEVELS`]: `--log-level`, `BURROW_LOG_LEVEL`, `log_level` and `RUST_LOG`, which
//!   `--print-config` does not show, seen in what a short run logs.
//! - Relative paths in a file are taken from the file's directory.
//! - Limits seen at work: the gateway's and the agent's `max_streams` on live streams.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

use Expect::{Refused, Shows};

const KEY: &str = "bk_zlpV87yiiQg6NJ7bgH5mrgoSwLSXRExx5Swq84TwkhA";
const KEY2: &str = "bk_5JG9gAt6USx2Cm5GCBiq-AdRjUxOI2NSRKwsBWYJGSU";
/// The secret part of every key used here: none may ever be printed.
const SECRETS: [&str; 3] = [
    "zlpV87yiiQg6NJ7bgH5mrgoSwLSXRExx5Swq84TwkhA",
    "5JG9gAt6USx2Cm5GCBiq-AdRjUxOI2NSRKwsBWYJGSU",
    "wyF-RYt70WD3DeY9UiPlXg2JrHKDRphcc1kFZA-5dXI",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Gateway,
    Agent,
    /// A file key both roles have (`[limits]`).
    Both,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Role::Gateway => "gateway",
            Role::Agent => "agent",
            Role::Both => unreachable!("expanded by the caller"),
        }
    }

    fn expand(self) -> &'static [Role] {
        match self {
            Role::Gateway => &[Role::Gateway],
            Role::Agent => &[Role::Agent],
            Role::Both => &[Role::Gateway, Role::Agent],
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Running `--print-config`.

/// What a run should give.
#[derive(Debug, Clone, Copy)]
enum Expect {
    /// Exit 0, and the printed config has these whole lines, one after the other.
    Shows(&'static str),
    /// Exit non-zero, and stderr contains this.
    Refused(&'static str),
}

struct Outcome {
    ok: bool,
    /// stdout: the settings as TOML.
    config: String,
    stderr: String,
}

impl Outcome {
    fn matches(&self, e: Expect) -> bool {
        match e {
            Expect::Shows(s) => self.ok && self.shows(s),
            Expect::Refused(s) => !self.ok && self.stderr.contains(s),
        }
    }

    /// Whether `lines` are whole lines of the printed config, in a row.
    fn shows(&self, lines: &str) -> bool {
        format!("\n{}\n", self.config).contains(&format!("\n{lines}\n"))
    }

    fn describe(&self) -> String {
        if self.ok {
            format!("printed {}", self.config)
        } else {
            format!("refused: {}", self.stderr.trim())
        }
    }
}

/// The binary with a clean environment, so nothing from the caller leaks in.
fn burrow() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_burrow"));
    cmd.env_clear().env("HOME", "/nonexistent");
    cmd
}

/// `burrow <role> --print-config ARGS` with `env`; checks that no key is printed.
fn print_config(role: Role, args: &[String], env: &[(&str, String)]) -> Outcome {
    let out = burrow()
        .arg(role.name())
        .arg("--print-config")
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .expect("burrow runs");
    let stdout = String::from_utf8(out.stdout).unwrap();
    let stderr = String::from_utf8(out.stderr).unwrap();
    for secret in SECRETS {
        assert!(
            !stdout.contains(secret) && !stderr.contains(secret),
            "a key was printed by {role:?} {args:?} {env:?}:\n{stdout}\n{stderr}"
        );
    }
    Outcome {
        ok: out.status.success(),
        config: stdout,
        stderr,
    }
}

// ---------------------------------------------------------------------------------------------
// Flags and environment variables.

/// One flag and its variable, with two values, each with what it should give.
struct Flag {
    role: Role,
    flag: &'static str,
    env: &'static str,
    /// Lines of a config file under both (none if empty), setting the same thing where it
    /// can, so the variable is seen to beat the file. `{dir}` in values is a directory holding
    /// the files of [`write_config_choices`].
    file: &'static [&'static str],
    a: (&'static str, Expect),
    b: (&'static str, Expect),
}

/// Enough of an agent file for `--print-config` to succeed.
const AGENT_FILE: &str = "gateway = \"file.example:7443\"\n\
    key = \"bk_zlpV87yiiQg6NJ7bgH5mrgoSwLSXRExx5Swq84TwkhA\"\n\
    fingerprint = \"SHA256:1111111111111111111111111111111111111111111111111111111111111111\"\n";
/// The same without a way to check the gateway.
const AGENT_FILE_NO_TRUST: &str = "gateway = \"file.example:7443\"\n\
    key = \"bk_zlpV87yiiQg6NJ7bgH5mrgoSwLSXRExx5Swq84TwkhA\"\n";
/// The same with a CA instead of a fingerprint.
const AGENT_FILE_CA: &str = "gateway = \"file.example:7443\"\n\
    key = \"bk_zlpV87yiiQg6NJ7bgH5mrgoSwLSXRExx5Swq84TwkhA\"\n\
    ca = \"/file/ca.pem\"\n";
const FP_A: &str = "SHA256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
const FP_B: &str = "SHA256:bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

/// Every flag of the README's tables. `--log-level` is in [`LOG_LEVELS`]: `--print-config`
/// does not show it.
const FLAGS: &[Flag] = &[
    // Gateway.
    Flag {
        role: Role::Gateway,
        flag: "--admin",
        env: "BURROW_ADMIN",
        file: &["admin = \"127.0.0.1:7000\""],
        a: ("127.0.0.1:4444", Shows("admin = \"127.0.0.1:4444\"")),
        b: ("[::1]:5555", Shows("admin = \"[::1]:5555\"")),
    },
    // The token is masked, so the other value is one that is refused.
    Flag {
        role: Role::Gateway,
        flag: "--admin-token",
        env: "BURROW_ADMIN_TOKEN",
        file: &[],
        a: ("a-long-enough-admin-token", Shows("admin_token = \"****\"")),
        b: ("short", Refused("the admin token is too short")),
    },
    Flag {
        role: Role::Gateway,
        flag: "--listen",
        env: "BURROW_LISTEN",
        file: &["listen = \"127.0.0.1:7000\""],
        a: ("127.0.0.1:4567", Shows("listen = \"127.0.0.1:4567\"")),
        b: ("[::1]:5678", Shows("listen = \"[::1]:5678\"")),
    },
    Flag {
        role: Role::Gateway,
        flag: "--public-host",
        env: "BURROW_PUBLIC_HOST",
        file: &["public_host = \"127.0.0.9\""],
        a: ("127.0.0.2", Shows("public_host = \"127.0.0.2\"")),
        b: ("::1", Shows("public_host = \"::1\"")),
    },
    Flag {
        role: Role::Gateway,
        flag: "--public-name",
        env: "BURROW_PUBLIC_NAME",
        file: &["public_name = \"file.example\""],
        a: ("env.example", Shows("public_name = \"env.example\"")),
        b: ("flag.example", Shows("public_name = \"flag.example\"")),
    },
    Flag {
        role: Role::Gateway,
        flag: "--state-dir",
        env: "BURROW_STATE_DIR",
        file: &["state_dir = \"/srv/file\""],
        a: ("/srv/a", Shows("state_dir = \"/srv/a\"")),
        b: ("/srv/b", Shows("state_dir = \"/srv/b\"")),
    },
    Flag {
        role: Role::Gateway,
        flag: "--transport",
        env: "BURROW_TRANSPORT",
        file: &["transport = \"tls\""],
        a: ("tcp", Shows("transport = \"tcp\"")),
        b: ("tls", Shows("transport = \"tls\"")),
    },
    Flag {
        role: Role::Gateway,
        flag: "--tls-cert",
        env: "BURROW_TLS_CERT",
        file: &[
            "tls_cert = \"/file/cert.pem\"",
            "tls_key = \"/file/key.pem\"",
        ],
        a: ("/a/cert.pem", Shows("tls_cert = \"/a/cert.pem\"")),
        b: ("/b/cert.pem", Shows("tls_cert = \"/b/cert.pem\"")),
    },
    Flag {
        role: Role::Gateway,
        flag: "--tls-key",
        env: "BURROW_TLS_KEY",
        file: &[
            "tls_cert = \"/file/cert.pem\"",
            "tls_key = \"/file/key.pem\"",
        ],
        a: ("/a/key.pem", Shows("tls_key = \"/a/key.pem\"")),
        b: ("/b/key.pem", Shows("tls_key = \"/b/key.pem\"")),
    },
    Flag {
        role: Role::Gateway,
        flag: "--config",
        env: "BURROW_CONFIG",
        file: &[],
        a: ("{dir}/gateway-a.toml", Shows("listen = \"127.0.0.1:1111\"")),
        b: ("{dir}/gateway-b.toml", Shows("listen = \"127.0.0.1:2222\"")),
    },
    // Agent.
    Flag {
        role: Role::Agent,
        flag: "--gateway",
        env: "BURROW_GATEWAY",
        file: &[AGENT_FILE],
        a: ("env.example:7443", Shows("gateway = \"env.example:7443\"")),
        b: ("[::1]:7443", Shows("gateway = \"[::1]:7443\"")),
    },
    Flag {
        role: Role::Agent,
        flag: "--admin",
        env: "BURROW_ADMIN",
        file: &[AGENT_FILE, "admin = \"127.0.0.1:7000\""],
        a: ("127.0.0.1:4444", Shows("admin = \"127.0.0.1:4444\"")),
        b: ("[::1]:5555", Shows("admin = \"[::1]:5555\"")),
    },
    // The token is masked, so the other value is one that is refused.
    Flag {
        role: Role::Agent,
        flag: "--admin-token",
        env: "BURROW_ADMIN_TOKEN",
        file: &[AGENT_FILE],
        a: ("a-long-enough-admin-token", Shows("admin_token = \"****\"")),
        b: ("short", Refused("the admin token is too short")),
    },
    // The key is masked, so the other value is one that is refused.
    Flag {
        role: Role::Agent,
        flag: "--key",
        env: "BURROW_KEY",
        file: &["gateway = \"gw.example:7443\"", "ca = \"/ca.pem\""],
        a: (KEY2, Shows("key = \"bk_****\"")),
        b: ("bk_notakey", Refused("--key / BURROW_KEY")),
    },
    // `fingerprint` and `ca` are one setting: the highest layer naming either wins.
    Flag {
        role: Role::Agent,
        flag: "--fingerprint",
        env: "BURROW_FINGERPRINT",
        file: &[AGENT_FILE_CA],
        a: (FP_A, Shows(FINGERPRINT_A)),
        b: (FP_B, Shows(FINGERPRINT_B)),
    },
    Flag {
        role: Role::Agent,
        flag: "--ca",
        env: "BURROW_CA",
        file: &[AGENT_FILE],
        a: ("/a/ca.pem", Shows("ca = \"/a/ca.pem\"")),
        b: ("/b/ca.pem", Shows("ca = \"/b/ca.pem\"")),
    },
    Flag {
        role: Role::Agent,
        flag: "--server-name",
        env: "BURROW_SERVER_NAME",
        file: &[AGENT_FILE, "server_name = \"file.example\""],
        a: ("a.example", Shows("server_name = \"a.example\"")),
        b: ("b.example", Shows("server_name = \"b.example\"")),
    },
    // The password is masked; `none` is a setting of its own (ignore the environment).
    Flag {
        role: Role::Agent,
        flag: "--proxy",
        env: "BURROW_PROXY",
        file: &[AGENT_FILE, "proxy = \"http://f:pw@file.example:3128\""],
        a: (
            "socks5h://u:hunter2@a.example:1080",
            Shows("proxy = \"socks5h://u:****@a.example:1080\""),
        ),
        b: ("none", Shows("proxy = \"none\"")),
    },
    // Commas separate specs, in the variable and in the flag; either replaces the file's list.
    Flag {
        role: Role::Agent,
        flag: "--forward",
        env: "BURROW_FORWARD",
        file: &[FILE_FORWARD],
        a: ("8080=127.0.0.1:80,unix:/run/app.sock", Shows(TWO_FORWARDS)),
        b: ("9000=[::1]:3000", Shows(ONE_FORWARD)),
    },
    // tls needs a fingerprint or a CA, which this file lacks.
    Flag {
        role: Role::Agent,
        flag: "--transport",
        env: "BURROW_TRANSPORT",
        file: &[AGENT_FILE_NO_TRUST, "transport = \"tls\""],
        a: ("tcp", Shows("transport = \"tcp\"")),
        b: ("tls", Refused("no way to verify the gateway")),
    },
    Flag {
        role: Role::Agent,
        flag: "--max-backoff",
        env: "BURROW_MAX_BACKOFF",
        file: &[AGENT_FILE, "max_backoff = \"45s\""],
        a: ("2m", Shows("max_backoff = \"2m\"")),
        b: ("1500ms", Shows("max_backoff = \"1s 500ms\"")),
    },
    Flag {
        role: Role::Agent,
        flag: "--connect-timeout",
        env: "BURROW_CONNECT_TIMEOUT",
        file: &[AGENT_FILE, "connect_timeout = \"45s\""],
        a: ("3s", Shows("connect_timeout = \"3s\"")),
        b: ("0s", Refused("must be more than 0")),
    },
    Flag {
        role: Role::Agent,
        flag: "--private",
        env: "BURROW_PRIVATE",
        file: &[FILE_PRIVATE],
        a: (
            "vnc=127.0.0.1:5900,ssh=127.0.0.1:22",
            Shows("private = [\"vnc=127.0.0.1:5900\", \"ssh=127.0.0.1:22\"]"),
        ),
        b: (
            "docker=unix:/run/docker.sock",
            Shows("private = [\"docker=unix:/run/docker.sock\"]"),
        ),
    },
    Flag {
        role: Role::Agent,
        flag: "--allow",
        env: "BURROW_ALLOW",
        file: &[FILE_PRIVATE],
        a: (
            "10.0.0.0/8:22,nas:*",
            Shows("allow = [\"10.0.0.0/8:22\", \"nas:*\"]"),
        ),
        b: (
            "[2001:db8::/32]:1-2",
            Shows("allow = [\"[2001:db8::/32]:1-2\"]"),
        ),
    },
    Flag {
        role: Role::Agent,
        flag: "--config",
        env: "BURROW_CONFIG",
        file: &[],
        a: ("{dir}/agent-a.toml", Shows("gateway = \"a.example:1\"")),
        b: ("{dir}/agent-b.toml", Shows("gateway = \"b.example:2\"")),
    },
];

/// An agent file with a forward, which `--forward` and `BURROW_FORWARD` replace.
const FILE_FORWARD: &str = "gateway = \"gw.example:7443\"\n\
    key = \"bk_zlpV87yiiQg6NJ7bgH5mrgoSwLSXRExx5Swq84TwkhA\"\n\
    ca = \"/ca.pem\"\n\
    forward = [\"127.0.0.1:1\"]";
/// An agent file with a private service and an allow pattern, which `--private`, `--allow`
/// and their variables replace.
const FILE_PRIVATE: &str = "gateway = \"gw.example:7443\"\n\
    key = \"bk_zlpV87yiiQg6NJ7bgH5mrgoSwLSXRExx5Swq84TwkhA\"\n\
    ca = \"/ca.pem\"\n\
    private = [\"file=127.0.0.1:1\"]\n\
    allow = [\"file.example:1\"]";
const TWO_FORWARDS: &str = "forward = [\"8080=127.0.0.1:80\", \"unix:/run/app.sock\"]";
const ONE_FORWARD: &str = "forward = [\"9000=[::1]:3000\"]";
const FINGERPRINT_A: &str =
    "fingerprint = \"SHA256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\"";
const FINGERPRINT_B: &str =
    "fingerprint = \"SHA256:bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb\"";

/// The files the `--config` rows name.
fn write_config_choices(dir: &Path) {
    let files = [
        (
            "gateway-a.toml",
            "listen = \"127.0.0.1:1111\"\n".to_string(),
        ),
        (
            "gateway-b.toml",
            "listen = \"127.0.0.1:2222\"\n".to_string(),
        ),
        (
            "agent-a.toml",
            AGENT_FILE.replace("file.example:7443", "a.example:1"),
        ),
        (
            "agent-b.toml",
            AGENT_FILE.replace("file.example:7443", "b.example:2"),
        ),
    ];
    for (name, text) in files {
        std::fs::write(dir.join(name), text).unwrap();
    }
}

#[test]
fn every_flag_and_variable_takes_effect_and_the_flag_wins() {
    let dir = tempfile::tempdir().unwrap();
    write_config_choices(dir.path());
    let here = dir.path().display().to_string();
    let mut failures = Vec::new();
    for (i, row) in FLAGS.iter().enumerate() {
        // The README's rule: the variable is BURROW_ and the flag in capitals.
        let named = format!(
            "BURROW_{}",
            row.flag.trim_start_matches("--").replace('-', "_")
        )
        .to_uppercase();
        assert_eq!(row.env, named, "{} {}", row.role.name(), row.flag);

        let file = dir.path().join(format!("base-{i}.toml"));
        let mut base = Vec::new();
        if !row.file.is_empty() {
            std::fs::write(&file, format!("{}\n", row.file.join("\n"))).unwrap();
            base = vec!["--config".to_string(), file.display().to_string()];
        }
        let value = |v: &str| v.replace("{dir}", &here);
        let run = |env: Option<&str>, flag: Option<&str>| {
            let mut args = base.clone();
            if let Some(v) = flag {
                args.extend([row.flag.to_string(), value(v)]);
            }
            let env: Vec<(&str, String)> = env.map(|v| (row.env, value(v))).into_iter().collect();
            print_config(row.role, &args, &env)
        };
        let ((va, ea), (vb, eb)) = (row.a, row.b);
        // Without either, the first value's effect is absent: the test can tell.
        let none = run(None, None);
        if none.matches(ea) {
            failures.push(format!(
                "{} {}: {ea:?} already without the setting",
                row.role.name(),
                row.flag
            ));
        }
        let mut check = |what: String, got: Outcome, want: Expect, not: Option<Expect>| {
            if !got.matches(want) || not.is_some_and(|n| got.matches(n)) {
                failures.push(format!(
                    "{} {what}: expected {want:?}, {}",
                    row.role.name(),
                    got.describe()
                ));
            }
        };
        for (v, e, other) in [(va, ea, eb), (vb, eb, ea)] {
            check(
                format!("{}={v}", row.env),
                run(Some(v), None),
                e,
                Some(other),
            );
            check(
                format!("{} {v}", row.flag),
                run(None, Some(v)),
                e,
                Some(other),
            );
        }
        check(
            format!("{}={va} {} {vb}", row.env, row.flag),
            run(Some(va), Some(vb)),
            eb,
            Some(ea),
        );
        check(
            format!("{}={vb} {} {va}", row.env, row.flag),
            run(Some(vb), Some(va)),
            ea,
            Some(eb),
        );
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// `--allow-insecure-state` is a switch: no value on the command line; `true` or `false` in
/// the variable and the file.
#[test]
fn allow_insecure_state_from_flag_environment_and_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("gateway.toml");
    std::fs::write(&file, "allow_insecure_state = true\n").unwrap();
    let with_file = vec!["--config".to_string(), file.display().to_string()];
    let flag = vec!["--allow-insecure-state".to_string()];
    let env = |v: &str| vec![("BURROW_ALLOW_INSECURE_STATE", v.to_string())];
    for (args, env, on) in [
        (vec![], vec![], false),
        (flag.clone(), vec![], true),
        (vec![], env("true"), true),
        (vec![], env("false"), false),
        (with_file.clone(), vec![], true),
        (with_file.clone(), env("false"), false),
        ([with_file, flag].concat(), env("false"), true),
    ] {
        let got = print_config(Role::Gateway, &args, &env);
        let want = format!("allow_insecure_state = {on}");
        assert!(
            got.ok && got.shows(&want),
            "{args:?} {env:?}: {}",
            got.describe()
        );
    }
}

/// The variable beats the file, key by key: the file's other keys stay.
#[test]
fn environment_beats_the_file_and_keeps_its_other_keys() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("gateway.toml");
    std::fs::write(
        &file,
        "listen = \"127.0.0.1:1111\"\npublic_name = \"file.example\"\nlease = \"5m\"\n",
    )
    .unwrap();
    let got = print_config(
        Role::Gateway,
        &["--config".into(), file.display().to_string()],
        &[("BURROW_LISTEN", "127.0.0.1:2222".into())],
    );
    for want in [
        "listen = \"127.0.0.1:2222\"",
        "public_name = \"file.example\"",
        "lease = \"5m\"",
    ] {
        assert!(got.matches(Shows(want)), "{want}: {}", got.describe());
    }
}

/// `BURROW_KEY` is read, and masked: the key text never appears, its mask does.
#[test]
fn key_from_the_environment_is_masked() {
    let got = print_config(
        Role::Agent,
        &[],
        &[
            ("BURROW_GATEWAY", "gw.example:7443".into()),
            ("BURROW_KEY", KEY.into()),
            ("BURROW_FINGERPRINT", FP_A.into()),
        ],
    );
    assert!(
        got.matches(Shows("key = \"bk_****\"")),
        "{}",
        got.describe()
    );
    assert!(!got.config.contains(&KEY[3..]), "{}", got.config);
}

// ---------------------------------------------------------------------------------------------
// Config file keys.

/// `[[agents]]` entries for the gateway's `agents.*` rows.
const ALICE: &str = "[[agents]]\nname = \"alice\"\n\
    key_hash = \"bkh_tjpv6pJLLHVz98RUc4z1VaSnbUDW0Nm1UIIbnZ4xzos\"\nports = [8080, \"9000-9100\"]";
const BOB: &str = "[[agents]]\nname = \"bob\"\n\
    key = \"bk_5JG9gAt6USx2Cm5GCBiq-AdRjUxOI2NSRKwsBWYJGSU\"\nports = [5432]";
const TLS_PAIR: &str = "tls_cert = \"/tls/c.pem\"\ntls_key = \"/tls/k.pem\"";
const FP_A_KEY: &str =
    "fingerprint = \"SHA256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\"";
const API: &str = "[[forwards]]\npublic_port = 9000\ntarget = \"[::1]:3000\"\nname = \"api\"";
/// A `[[connectors]]` entry (the gateway's agent, without `[[agents]]`, is `default`).
const LAPTOP: &str = "[[connectors]]\nname = \"laptop\"\n\
    key_hash = \"bkh_xIvc78jG85Th98wi3bgWH1Iyu3Pimn3Zv5xCyPFpqWA\"\n\
    reach = [\"default/vnc\", \"default/*\", \"default/targets\"]\nmax_sessions = 3\nmax_streams = 99";
const DESK: &str = "[[connectors]]\nname = \"desk\"\n\
    key = \"bk_wyF-RYt70WD3DeY9UiPlXg2JrHKDRphcc1kFZA-5dXI\"\nreach = [\"default/ssh\"]";
const VNC: &str = "[[forwards]]\nname = \"vnc\"\ntarget = \"127.0.0.1:5900\"\npublic = false";
const API_GROUP: &str =
    "[[forwards]]\npublic_port = 9000\ntarget = \"[::1]:3000\"\ngroup = \"web\"";
const WEB_GROUP: &str = "[[agents]]\nname = \"alice\"\n\
    key_hash = \"bkh_tjpv6pJLLHVz98RUc4z1VaSnbUDW0Nm1UIIbnZ4xzos\"\nports = [8080]\n\
    [[groups]]\nname = \"web\"\nagents = [\"alice\"]";
const TWO_GATEWAYS: &str = "gateways = [\"gw1.example:7443\", \
    { url = \"gw2.example:7443\", fingerprint = \"SHA256:bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb\" }]";

/// Every key of the config files: (role, key, TOML, what `--print-config` then shows). The
/// TOML makes the whole gateway file; an agent file also gets the lines of [`AGENT_FILE`]
/// whose keys the TOML leaves unset. `log_level` is in [`LOG_LEVELS`].
#[rustfmt::skip]
const FILE_KEYS: &[(Role, &str, &str, &str)] = &[
    (Role::Gateway, "listen", "listen = \"127.0.0.1:4567\"", "listen = \"127.0.0.1:4567\""),
    (Role::Gateway, "public_host", "public_host = \"127.0.0.2\"", "public_host = \"127.0.0.2\""),
    (Role::Gateway, "public_name", "public_name = \"gw.example\"", "public_name = \"gw.example\""),
    (Role::Gateway, "state_dir", "state_dir = \"/srv/burrow-file\"", "state_dir = \"/srv/burrow-file\""),
    (Role::Gateway, "allow_insecure_state", "allow_insecure_state = true", "allow_insecure_state = true"),
    (Role::Gateway, "transport", "transport = \"tcp\"", "transport = \"tcp\""),
    (Role::Gateway, "tls_cert", TLS_PAIR, "tls_cert = \"/tls/c.pem\""),
    (Role::Gateway, "tls_key", TLS_PAIR, "tls_key = \"/tls/k.pem\""),
    (Role::Gateway, "lease", "lease = \"90s\"", "lease = \"1m 30s\""),
    (Role::Gateway, "grace", "grace = \"2s\"", "grace = \"2s\""),
    (Role::Gateway, "ws_path", "ws_path = \"/t/x\"", "ws_path = \"/t/x\""),
    (Role::Gateway, "ws_listen", "ws_listen = \"127.0.0.1:4568\"", "ws_listen = \"127.0.0.1:4568\""),
    (Role::Gateway, "ws_trusted_proxies", "ws_trusted_proxies = [\"10.0.0.0/8\"]", "ws_trusted_proxies = [\"10.0.0.0/8\"]"),
    (Role::Gateway, "heartbeat.interval", "[heartbeat]\ninterval = \"250ms\"", "[heartbeat]\ninterval = \"250ms\""),
    (Role::Gateway, "heartbeat.misses", "[heartbeat]\nmisses = 7", "misses = 7"),
    (Role::Both, "limits.max_frame", "[limits]\nmax_frame = 131072", "[limits]\nmax_frame = 131072"),
    (Role::Both, "limits.max_streams", "[limits]\nmax_streams = 77", "max_streams = 77"),
    (Role::Both, "limits.max_pending_opens", "[limits]\nmax_pending_opens = 33", "max_pending_opens = 33"),
    (Role::Both, "limits.max_preauth", "[limits]\nmax_preauth = 44", "max_preauth = 44"),
    (Role::Both, "limits.max_preauth_per_source", "[limits]\nmax_preauth_per_source = 5", "max_preauth_per_source = 5"),
    (Role::Both, "limits.max_public_conns", "[limits]\nmax_public_conns = 1234", "max_public_conns = 1234"),
    (Role::Both, "limits.max_public_conns_per_agent", "[limits]\nmax_public_conns_per_agent = 321", "max_public_conns_per_agent = 321"),
    (Role::Both, "limits.max_ports_per_agent", "[limits]\nmax_ports_per_agent = 12", "max_ports_per_agent = 12"),
    (Role::Both, "limits.handshake_timeout", "[limits]\nhandshake_timeout = \"3s\"", "handshake_timeout = \"3s\""),
    (Role::Both, "limits.stream_window", "[limits]\nstream_window = 100000", "stream_window = 100000"),
    (Role::Both, "limits.max_stream_window", "[limits]\nmax_stream_window = 8388608", "max_stream_window = 8388608"),
    (Role::Both, "limits.session_window", "[limits]\nsession_window = 67108864", "session_window = 67108864"),
    (Role::Gateway, "agents.name", ALICE, "[[agents]]\nname = \"alice\""),
    (Role::Gateway, "agents.key_hash", ALICE, "key_hash = \"bkh_tjpv6pJLLHVz98RUc4z1VaSnbUDW0Nm1UIIbnZ4xzos\""),
    (Role::Gateway, "agents.key", BOB, "name = \"bob\"\nkey = \"bk_****\""),
    (Role::Gateway, "agents.ports", ALICE, "ports = [8080, \"9000-9100\"]"),
    (Role::Gateway, "connectors.name", LAPTOP, "[[connectors]]\nname = \"laptop\""),
    (Role::Gateway, "connectors.key_hash", LAPTOP, "key_hash = \"bkh_xIvc78jG85Th98wi3bgWH1Iyu3Pimn3Zv5xCyPFpqWA\""),
    (Role::Gateway, "connectors.key", DESK, "name = \"desk\"\nkey = \"bk_****\""),
    (Role::Gateway, "connectors.reach", LAPTOP, "reach = [\"default/vnc\", \"default/*\", \"default/targets\"]"),
    (Role::Gateway, "connectors.max_sessions", LAPTOP, "max_sessions = 3"),
    (Role::Gateway, "connectors.max_streams", LAPTOP, "max_streams = 99"),
    (Role::Gateway, "groups.name", WEB_GROUP, "[[groups]]\nname = \"web\""),
    (Role::Gateway, "groups.agents", WEB_GROUP, "agents = [\"alice\"]"),
    (Role::Both, "admin", "admin = \"127.0.0.1:4569\"", "admin = \"127.0.0.1:4569\""),
    (Role::Both, "admin_token", "admin_token = \"a-long-enough-admin-token\"", "admin_token = \"****\""),
    (Role::Agent, "gateway", "gateway = \"gw.example:9443\"", "gateway = \"gw.example:9443\""),
    (Role::Agent, "gateways", TWO_GATEWAYS, "gateways = [{ url = \"gw1.example:7443\", fingerprint = \"SHA256:1111111111111111111111111111111111111111111111111111111111111111\" }, { url = \"gw2.example:7443\", fingerprint = \"SHA256:bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb\" }]"),
    (Role::Agent, "key", "key = \"bk_5JG9gAt6USx2Cm5GCBiq-AdRjUxOI2NSRKwsBWYJGSU\"", "key = \"bk_****\""),
    (Role::Agent, "fingerprint", FP_A_KEY, FINGERPRINT_A),
    (Role::Agent, "ca", "ca = \"/etc/ssl/ca.pem\"", "ca = \"/etc/ssl/ca.pem\""),
    (Role::Agent, "server_name", "server_name = \"sni.example\"", "server_name = \"sni.example\""),
    (Role::Agent, "transport", "transport = \"tcp\"", "transport = \"tcp\""),
    (Role::Agent, "max_backoff", "max_backoff = \"2m\"", "max_backoff = \"2m\""),
    (Role::Agent, "grace", "grace = \"3s\"", "grace = \"3s\""),
    (Role::Agent, "connect_timeout", "connect_timeout = \"2500ms\"", "connect_timeout = \"2s 500ms\""),
    (Role::Agent, "proxy", "proxy = \"socks5://u:pw@sx.example:1081\"", "proxy = \"socks5://u:****@sx.example:1081\""),
    (Role::Agent, "forward", "forward = [\"8080=127.0.0.1:80\", \"unix:/run/app.sock\"]", TWO_FORWARDS),
    (Role::Agent, "forwards.public_port", API, "[[forwards]]\npublic_port = 9000"),
    (Role::Agent, "forwards.target", API, "target = \"[::1]:3000\""),
    (Role::Agent, "forwards.name", API, "name = \"api\""),
    (Role::Agent, "forwards.public", VNC, "private = [\"vnc=127.0.0.1:5900\"]"),
    (Role::Agent, "private", "private = [\"vnc=127.0.0.1:5900\"]", "private = [\"vnc=127.0.0.1:5900\"]"),
    (Role::Agent, "allow", "allow = [\"10.0.5.0/24:22\", \"nas.internal:*\"]", "allow = [\"10.0.5.0/24:22\", \"nas.internal:*\"]"),
    (Role::Agent, "forwards.group", API_GROUP, "group = \"web\""),
];

/// Keys tested elsewhere: `log_level` in [`LOG_LEVELS`]; `log_format` and `key_file` in
/// `ops.rs` (JSON logs, the key file), since `--print-config` cannot show them statically.
const KEYS_TESTED_ELSEWHERE: &[&str] = &["log_level", "log_format", "key_file"];

/// The file for `role` with `toml`: agents get the lines of [`AGENT_FILE`] whose key `toml`
/// leaves unset (no fingerprint when it sets `ca` or `transport`).
fn file_text(role: Role, toml: &str) -> String {
    if role == Role::Gateway {
        return format!("{toml}\n");
    }
    let top: Vec<&str> = toml
        .lines()
        .take_while(|l| !l.trim_start().starts_with('['))
        .filter_map(|l| l.split_once('=').map(|(k, _)| k.trim()))
        .collect();
    let trust_set = top
        .iter()
        .any(|k| ["fingerprint", "ca", "transport"].contains(k));
    let mut text = String::new();
    for line in AGENT_FILE.lines() {
        let key = line.split_once('=').map_or("", |(k, _)| k.trim());
        let gateway_set = key == "gateway" && top.contains(&"gateways");
        if top.contains(&key) || (key == "fingerprint" && trust_set) || gateway_set {
            continue;
        }
        text.push_str(line);
        text.push('\n');
    }
    // The base has no tables, so any tables of `toml` may follow it.
    format!("{text}{toml}\n")
}

#[test]
fn every_file_key_takes_effect() {
    let dir = tempfile::tempdir().unwrap();
    let mut failures = Vec::new();
    for (i, &(role, key, toml, shows)) in FILE_KEYS.iter().enumerate() {
        for &role in role.expand() {
            // The same file without the key must not show it: the key, not a default, did it.
            let with = dir.path().join(format!("{i}-{}.toml", role.name()));
            let without = dir.path().join(format!("{i}-{}-without.toml", role.name()));
            std::fs::write(&with, file_text(role, toml)).unwrap();
            std::fs::write(&without, file_text(role, toml).replace(toml, "")).unwrap();
            let run =
                |p: &Path| print_config(role, &["--config".into(), p.display().to_string()], &[]);
            let got = run(&with);
            if !got.matches(Shows(shows)) {
                failures.push(format!(
                    "{} {key}: expected {shows:?}, {}",
                    role.name(),
                    got.describe()
                ));
            }
            if run(&without).matches(Shows(shows)) {
                failures.push(format!(
                    "{} {key}: {shows:?} shows without the key",
                    role.name()
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The keys of an example file, as `section.key` (commented-out keys count: they document
/// the key too).
fn example_keys(name: &str) -> Vec<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../examples")
        .join(name);
    let text = std::fs::read_to_string(&path).unwrap();
    let mut section = String::new();
    let mut keys = Vec::new();
    for line in text.lines() {
        let line = line.trim_start_matches(|c: char| c == '#' || c.is_whitespace());
        let is_word =
            |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_lowercase() || b == b'_');
        let header = line.trim_start_matches('[').trim_end_matches(']');
        if line.starts_with('[') && is_word(header) {
            section = header.to_string();
        } else if let Some((key, _)) = line.split_once('=') {
            let key = key.trim();
            if is_word(key) {
                keys.push(if section.is_empty() {
                    key.to_string()
                } else {
                    format!("{section}.{key}")
                });
            }
        }
    }
    keys.dedup();
    keys
}

#[test]
fn every_example_key_is_in_the_table() {
    for (file, role) in [("gateway.toml", Role::Gateway), ("agent.toml", Role::Agent)] {
        let keys = example_keys(file);
        assert!(keys.len() > 10, "{file}: {keys:?}");
        for key in keys {
            let tested = KEYS_TESTED_ELSEWHERE.contains(&key.as_str())
                || FILE_KEYS
                    .iter()
                    .any(|(r, k, _, _)| *k == key && r.expand().contains(&role));
            assert!(
                tested,
                "examples/{file} documents `{key}` but FILE_KEYS has no {role:?} row for it"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Relative paths.

/// `state_dir`, `tls_cert`, `tls_key` and `ca` in a file are relative to the file's directory,
/// wherever the process runs; absolute paths and flags are used as written.
#[test]
fn relative_paths_in_a_file_are_relative_to_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("conf");
    std::fs::create_dir(&conf).unwrap();
    let gw = conf.join("gateway.toml");
    std::fs::write(
        &gw,
        "state_dir = \"state\"\ntls_cert = \"tls/cert.pem\"\ntls_key = \"/abs/key.pem\"\n",
    )
    .unwrap();
    let agent = conf.join("agent.toml");
    std::fs::write(&agent, format!("{AGENT_FILE_NO_TRUST}ca = \"../ca.pem\"\n")).unwrap();
    let c = conf.display().to_string();
    let config = |p: &Path| vec!["--config".to_string(), p.display().to_string()];

    let got = print_config(Role::Gateway, &config(&gw), &[]);
    for want in [
        format!("state_dir = \"{c}/state\""),
        format!("tls_cert = \"{c}/tls/cert.pem\""),
        "tls_key = \"/abs/key.pem\"".to_string(),
    ] {
        assert!(got.ok && got.shows(&want), "{want}: {}", got.describe());
    }
    let got = print_config(Role::Agent, &config(&agent), &[]);
    let want = format!("ca = \"{c}/../ca.pem\"");
    assert!(got.ok && got.shows(&want), "{want}: {}", got.describe());

    // A flag or variable is used as written, relative to the working directory; printed, it
    // is made absolute, so that the printed file means the same wherever it is put.
    let out = burrow()
        .current_dir(dir.path())
        .args(["gateway", "--print-config"])
        .args(config(&gw))
        .env("BURROW_STATE_DIR", "here")
        .output()
        .unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    let want = format!("state_dir = \"{}/here\"", dir.path().display());
    assert!(
        out.status.success() && stdout.lines().any(|l| l == want),
        "{want}: {stdout}"
    );
}

// ---------------------------------------------------------------------------------------------
// Log levels: not in `--print-config`, so seen in what a short run logs.

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Level {
    Warn,
    Info,
    Debug,
}

/// How the level is set, and the level that should result.
struct LogCase {
    flag: Option<&'static str>,
    env: &'static [(&'static str, &'static str)],
    /// `log_level` in the config file.
    file: Option<&'static str>,
    level: Level,
}

const fn case(
    flag: Option<&'static str>,
    env: &'static [(&'static str, &'static str)],
    file: Option<&'static str>,
    level: Level,
) -> LogCase {
    LogCase {
        flag,
        env,
        file,
        level,
    }
}

/// Flag, then `BURROW_LOG_LEVEL`, then `RUST_LOG`, then the file's `log_level`, then info.
#[rustfmt::skip]
const LOG_LEVELS: &[LogCase] = &[
    case(None, &[], None, Level::Info),
    case(Some("warn"), &[], None, Level::Warn),
    case(Some("debug"), &[], None, Level::Debug),
    case(None, &[("BURROW_LOG_LEVEL", "warn")], None, Level::Warn),
    case(None, &[("BURROW_LOG_LEVEL", "debug")], None, Level::Debug),
    case(None, &[], Some("warn"), Level::Warn),
    case(None, &[], Some("debug"), Level::Debug),
    case(
        Some("warn"),
        &[("BURROW_LOG_LEVEL", "debug")],
        None,
        Level::Warn,
    ),
    case(
        Some("debug"),
        &[("BURROW_LOG_LEVEL", "warn")],
        None,
        Level::Debug,
    ),
    case(
        None,
        &[("BURROW_LOG_LEVEL", "debug")],
        Some("warn"),
        Level::Debug,
    ),
    case(
        None,
        &[("BURROW_LOG_LEVEL", "warn")],
        Some("debug"),
        Level::Warn,
    ),
    case(None, &[("RUST_LOG", "warn")], None, Level::Warn),
    case(
        None,
        &[("RUST_LOG", "warn"), ("BURROW_LOG_LEVEL", "debug")],
        None,
        Level::Debug,
    ),
    case(None, &[("RUST_LOG", "warn")], Some("debug"), Level::Warn),
];

/// A running `burrow` whose stdout and stderr lines arrive on channels. Killed on drop.
struct Proc {
    child: Child,
    out: Receiver<String>,
    err: Receiver<String>,
}

fn lines(r: impl Read + Send + 'static) -> Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(r).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

impl Proc {
    fn start(mut cmd: Command) -> Proc {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("burrow starts");
        let out = lines(child.stdout.take().unwrap());
        let err = lines(child.stderr.take().unwrap());
        Proc { child, out, err }
    }

    /// The first stdout line containing `needle`, within 30 s.
    fn stdout_line(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.out.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return line,
                Ok(_) => {}
                Err(_) => break,
            }
        }
        let err: Vec<String> = self.err.try_iter().collect();
        panic!("no stdout line with {needle:?}; stderr: {err:#?}");
    }

    /// SIGTERM; the exit status and every stderr line.
    fn terminate(mut self) -> (ExitStatus, Vec<String>) {
        let ok = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                break st;
            }
            assert!(Instant::now() < deadline, "did not exit after SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        };
        // The reader thread ends at the end of stderr.
        let mut err = Vec::new();
        while let Ok(line) = self.err.recv_timeout(Duration::from_secs(10)) {
            err.push(line);
        }
        (status, err)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `role` with `case` until it has logged what tells the level, stops it, and returns
/// what is wrong, if anything.
fn check_log_level(role: Role, case: &LogCase) -> Option<String> {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = burrow();
    cmd.arg(role.name());
    if let Some(level) = case.flag {
        cmd.args(["--log-level", level]);
    }
    if let Some(level) = case.file {
        let file = dir.path().join("burrow.toml");
        std::fs::write(&file, format!("log_level = \"{level}\"\n")).unwrap();
        cmd.arg("--config").arg(&file);
    }
    cmd.envs(case.env.iter().copied());
    // Plain TCP: no certificate to make; the warning it logs is harmless here.
    cmd.args(["--transport", "tcp"]);
    let (status, err) = match role {
        Role::Gateway => {
            cmd.args(["--listen", "127.0.0.1:0", "--state-dir"]);
            cmd.arg(dir.path().join("state"));
            let mut p = Proc::start(cmd);
            // Printed after the settings are logged.
            p.stdout_line("gateway listening on");
            p.terminate()
        }
        _ => {
            // A "gateway" that hangs up at once: the agent retries, logging at debug before
            // each pause. Two connections mean the first pause has been logged.
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = listener.local_addr().unwrap();
            let (tx, rx) = mpsc::channel();
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    drop(conn);
                    if tx.send(()).is_err() {
                        return;
                    }
                }
            });
            cmd.args(["--gateway", &addr.to_string(), "--key", KEY]);
            let p = Proc::start(cmd);
            for _ in 0..2 {
                rx.recv_timeout(Duration::from_secs(30))
                    .expect("the agent dials");
            }
            p.terminate()
        }
    };
    let has = |needle: &str| err.iter().any(|l| l.contains(needle));
    let settings = format!("{} settings", role.name());
    let mut wrong = Vec::new();
    if !status.success() {
        wrong.push(format!("exit {status:?}"));
    }
    if has(&settings) != (case.level >= Level::Info) {
        wrong.push(format!("INFO `{settings}` logged: {}", has(&settings)));
    }
    if role == Role::Agent && has("waiting before reconnecting") != (case.level >= Level::Debug) {
        wrong.push(format!(
            "DEBUG `waiting before reconnecting` logged: {}",
            has("waiting before reconnecting")
        ));
    }
    if SECRETS.iter().any(|s| has(s)) {
        wrong.push("the key was logged".into());
    }
    (!wrong.is_empty()).then(|| {
        format!(
            "{} --log-level {:?}, env {:?}, file log_level {:?}: expected {:?}: {}; \
             stderr: {err:#?}",
            role.name(),
            case.flag,
            case.env,
            case.file,
            case.level,
            wrong.join(", ")
        )
    })
}

#[test]
fn log_level_from_flag_environment_and_file() {
    let failures: Vec<String> = std::thread::scope(|s| {
        let runs: Vec<_> = [Role::Gateway, Role::Agent]
            .into_iter()
            .flat_map(|role| LOG_LEVELS.iter().map(move |case| (role, case)))
            .map(|(role, case)| s.spawn(move || check_log_level(role, case)))
            .collect();
        runs.into_iter().filter_map(|r| r.join().unwrap()).collect()
    });
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

// ---------------------------------------------------------------------------------------------
// Limits at work.

fn echo_server() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(mut c) = conn else { return };
            std::thread::spawn(move || {
                let mut w = c.try_clone().unwrap();
                let _ = std::io::copy(&mut c, &mut w);
            });
        }
    });
    addr
}

/// Whether `msg` comes back through `c` within 5 s.
fn echoes(c: &mut TcpStream, msg: &[u8]) -> bool {
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    if c.write_all(msg).is_err() {
        return false;
    }
    let mut got = vec![0; msg.len()];
    c.read_exact(&mut got).is_ok() && got == msg
}

/// Gateway and agent with these `[limits]`, one forward to an echo server: whether a second
/// client is served while the first holds its stream open.
fn second_concurrent_client_served(gateway_limits: &str, agent_limits: &str) -> bool {
    let dir = tempfile::tempdir().unwrap();
    let gw_file = dir.path().join("gateway.toml");
    let agent_file = dir.path().join("agent.toml");
    std::fs::write(&gw_file, format!("[limits]\n{gateway_limits}\n")).unwrap();
    std::fs::write(&agent_file, format!("[limits]\n{agent_limits}\n")).unwrap();

    let mut cmd = burrow();
    cmd.args([
        "gateway",
        "--listen",
        "127.0.0.1:0",
        "--public-host",
        "127.0.0.1",
    ])
    .arg("--state-dir")
    .arg(dir.path().join("state"))
    .arg("--config")
    .arg(&gw_file);
    let mut gw = Proc::start(cmd);
    let line = gw.stdout_line("burrow agent ");

    let echo = echo_server();
    let mut cmd = burrow();
    cmd.args(line.split_whitespace().skip(1))
        .arg("--config")
        .arg(&agent_file)
        .args(["--forward", &format!("127.0.0.1:{}", echo.port())]);
    let mut agent = Proc::start(cmd);
    let granted = agent.stdout_line(": public address ");
    let public = granted.rsplit(' ').next().unwrap().to_string();

    let mut first = TcpStream::connect(&public).unwrap();
    assert!(echoes(&mut first, b"first"), "the first client is served");
    let mut second = TcpStream::connect(&public).unwrap();
    let served = echoes(&mut second, b"second");
    drop((first, second));
    let _ = agent.terminate();
    let _ = gw.terminate();
    served
}

/// The control for the next test: the gateway's `max_streams` refuses the second client.
#[test]
fn gateway_max_streams_refuses_the_second_client() {
    assert!(!second_concurrent_client_served("max_streams = 1", ""));
}

/// The agent's `[limits]` are documented "as for the gateway", and `max_streams` there guards
/// against "stream floods in one session". An agent with `max_streams = 1` must not carry two
/// streams at once, whatever the gateway's limit.
#[test]
fn agent_max_streams_refuses_the_second_client() {
    assert!(
        !second_concurrent_client_served("", "max_streams = 1"),
        "the agent's [limits] max_streams = 1 did not take effect: two concurrent streams carried \
         (the session uses the gateway's limits only)"
    );
}
