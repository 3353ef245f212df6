//! The `burrow` binary: keygen, configuration errors, flags over environment over file.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use burrow::proto::auth::{KeyHash, SecretKey};

const KEY: &str = "bk_zlpV87yiiQg6NJ7bgH5mrgoSwLSXRExx5Swq84TwkhA";

/// The binary with a clean environment, so nothing from the caller leaks in.
fn burrow(args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_burrow"));
    cmd.args(args).env_clear().env("HOME", "/nonexistent");
    cmd
}

fn run(cmd: &mut Command) -> anyhow::Result<(Output, String, String)> {
    let out = cmd.output()?;
    let stdout = String::from_utf8(out.stdout.clone())?;
    let stderr = String::from_utf8(out.stderr.clone())?;
    Ok((out, stdout, stderr))
}

#[test]
fn keygen_prints_a_key_and_its_hash() -> anyhow::Result<()> {
    let (out, stdout, _) = run(&mut burrow(&["keygen"]))?;
    assert!(out.status.success());
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    let key = lines[0].strip_prefix("key: ").expect("key line");
    let hash = lines[1].strip_prefix("key_hash: ").expect("key_hash line");
    assert_eq!(SecretKey::parse(key)?.hash(), KeyHash::parse(hash)?);
    Ok(())
}

#[test]
fn agent_without_gateway_says_what_to_set() -> anyhow::Result<()> {
    let (out, _, stderr) = run(&mut burrow(&["agent", "--key", KEY]))?;
    assert!(!out.status.success());
    assert!(stderr.contains("--gateway"), "{stderr}");
    assert!(stderr.contains("BURROW_GATEWAY"), "{stderr}");
    Ok(())
}

#[test]
fn config_typo_names_file_line_and_key() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("agent.toml");
    std::fs::write(&path, "gateway = \"gw:7443\"\n\nforwad = [\"a:1\"]\n")?;
    let path_text = path.display().to_string();
    let (out, _, stderr) = run(&mut burrow(&["agent", "--config", &path_text]))?;
    assert!(!out.status.success());
    assert!(
        stderr.contains(&format!("{path_text} line 3, key forwad")),
        "{stderr}"
    );
    assert!(stderr.contains("did you mean `forward`"), "{stderr}");
    Ok(())
}

#[test]
fn forwards_from_environment_are_comma_separated() -> anyhow::Result<()> {
    let (out, stdout, stderr) = run(burrow(&["agent", "--print-config"])
        .env("BURROW_GATEWAY", "gw.example.com:7443")
        .env("BURROW_KEY", KEY)
        .env("BURROW_TRANSPORT", "tcp")
        .env("BURROW_FORWARD", "8080=127.0.0.1:80,unix:/run/app.sock"))?;
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("\"8080=127.0.0.1:80\""), "{stdout}");
    assert!(stdout.contains("\"unix:/run/app.sock\""), "{stdout}");
    assert!(stdout.contains("transport = \"tcp\""), "{stdout}");
    assert!(!stdout.contains(&KEY[3..]), "key printed: {stdout}");
    Ok(())
}

#[test]
fn flag_beats_environment_beats_file() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("agent.toml");
    std::fs::write(
        &path,
        format!(
            "gateway = \"file:1\"\nkey = \"{KEY}\"\ntransport = \"tcp\"\nforward = [\"a:1\"]\n"
        ),
    )?;
    let path_text = path.display().to_string();
    let print = |extra: &[&str], env: Option<&str>| -> anyhow::Result<String> {
        let mut args = vec!["agent", "--print-config", "--config", &path_text];
        args.extend_from_slice(extra);
        let mut cmd = burrow(&args);
        if let Some(gw) = env {
            cmd.env("BURROW_GATEWAY", gw);
        }
        let (out, stdout, stderr) = run(&mut cmd)?;
        assert!(out.status.success(), "{stderr}");
        Ok(stdout)
    };
    assert!(print(&[], None)?.contains("\"file:1\""));
    assert!(print(&[], Some("env:2"))?.contains("\"env:2\""));
    assert!(print(&["--gateway", "flag:3"], Some("env:2"))?.contains("\"flag:3\""));
    Ok(())
}

#[test]
fn gateway_print_config_reads_environment() -> anyhow::Result<()> {
    let (out, stdout, stderr) = run(burrow(&["gateway", "--print-config"])
        .env("BURROW_LISTEN", "127.0.0.1:9443")
        .env("BURROW_STATE_DIR", "/srv/burrow"))?;
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("127.0.0.1:9443"), "{stdout}");
    assert!(stdout.contains("\"/srv/burrow\""), "{stdout}");
    Ok(())
}

#[test]
fn bad_flag_values_are_refused() -> anyhow::Result<()> {
    for args in [
        &["agent", "--forward", "localhost"][..],
        &["agent", "--gateway", "nohost"],
        &["gateway", "--transport", "udp"],
        &["gateway", "--log-level", "loud"],
    ] {
        let (out, _, stderr) = run(&mut burrow(args))?;
        assert!(!out.status.success(), "{args:?} accepted");
        assert!(stderr.contains("invalid value"), "{args:?}: {stderr}");
    }
    let (out, _, stderr) = run(&mut burrow(&["agent", "--key", "bk_secretbutbroken"]))?;
    assert!(!out.status.success());
    assert!(stderr.contains("BURROW_KEY"), "{stderr}");
    assert!(!stderr.contains("secretbutbroken"), "key echoed: {stderr}");
    Ok(())
}

/// Starts a plain-TCP gateway on a free port, reads what it prints, stops it with SIGTERM.
#[test]
fn gateway_prints_its_address_and_stops_on_sigterm() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let state = dir.path().display().to_string();
    let mut child = burrow(&[
        "gateway",
        "--listen",
        "127.0.0.1:0",
        "--transport",
        "tcp",
        "--state-dir",
        &state,
        "--log-level",
        "warn",
    ])
    .stdout(Stdio::piped())
    .stderr(Stdio::null())
    .spawn()?;
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut lines = Vec::new();
    while let Ok(line) = rx.recv_timeout(Duration::from_secs(20)) {
        let done = line.starts_with("burrow agent ");
        lines.push(line);
        if done {
            break;
        }
    }
    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()?;
    assert!(kill.success());
    let status = child.wait()?;
    let listen = lines
        .iter()
        .find_map(|l| l.strip_prefix("gateway listening on "));
    assert!(
        listen.is_some_and(|a| a.starts_with("127.0.0.1:") && !a.ends_with(":0")),
        "{lines:?}"
    );
    assert!(
        lines.iter().any(|l| l.starts_with("burrow agent ")),
        "{lines:?}"
    );
    assert!(status.success(), "exit {status:?}");
    Ok(())
}

/// `burrow agent --print-config` with a working gateway, key and transport, plus `args`.
fn agent_with(args: &[&str]) -> anyhow::Result<(Output, String, String)> {
    let mut all = vec![
        "agent",
        "--print-config",
        "--gateway",
        "gw.example.com:7443",
        "--transport",
        "tcp",
    ];
    all.extend_from_slice(args);
    run(burrow(&all).env("BURROW_KEY", KEY))
}

/// The usual ways of getting a forward wrong each get their own hint, never the IPv6 one.
#[test]
fn forward_mistakes_get_a_hint_of_their_own() -> anyhow::Result<()> {
    for (spec, hints) in [
        // Docker's and ssh's PORT:HOST:PORT.
        ("8080:127.0.0.1:80", &["use `=`", "8080=127.0.0.1:80"][..]),
        ("8080:[::1]:80", &["use `=`", "8080=[::1]:80"]),
        ("8080:80", &["8080=127.0.0.1:80"]),
        // A URL instead of host:port.
        (
            "8080=http://127.0.0.1:80",
            &["no scheme", "8080=127.0.0.1:80"],
        ),
        (
            "https://example.com:443/x",
            &["no scheme", "example.com:443"],
        ),
        // UDP is written with `udp:` in front.
        ("5353=udp:127.0.0.1:53", &["udp:5353=127.0.0.1:53"]),
        ("127.0.0.1:53/udp", &["udp:127.0.0.1:53"]),
        // Other slips.
        ("tcp:127.0.0.1:80", &["`tcp:`", "127.0.0.1:80"]),
        (
            "127.0.0.1:80=8080",
            &["public port goes first", "8080=127.0.0.1:80"],
        ),
        (":80", &["127.0.0.1:80"]),
    ] {
        let (out, _, stderr) = agent_with(&["--forward", spec])?;
        assert!(!out.status.success(), "{spec} accepted");
        for hint in hints {
            assert!(stderr.contains(hint), "{spec}: no {hint:?} in: {stderr}");
        }
        assert!(!stderr.contains("IPv6"), "{spec}: IPv6 hint: {stderr}");
    }
    // Real IPv6 mistakes keep their hint.
    let (_, _, stderr) = agent_with(&["--forward", "::1:80"])?;
    assert!(stderr.contains("brackets"), "{stderr}");
    Ok(())
}

/// `forward` takes strings and `[[forwards]]` tables, one letter apart: using one for the
/// other says so, in the file's words (no internal type names).
#[test]
fn forward_and_forwards_mixed_up_in_a_file() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    for (toml, hint) in [
        (
            "forwards = [\"8080=127.0.0.1:80\"]",
            "did you mean `forward`",
        ),
        (
            "forward = [{ target = \"127.0.0.1:80\" }]",
            "did you mean `forwards`",
        ),
        (
            "[[forward]]\ntarget = \"127.0.0.1:80\"",
            "did you mean `forwards`",
        ),
        (
            "forward = \"8080=127.0.0.1:80\"",
            "forward = [\"8080=127.0.0.1:80\"]",
        ),
        ("[forwards]\ntarget = \"127.0.0.1:80\"", "[[forwards]]"),
        ("limits = 5", "a table"),
    ] {
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, format!("{toml}\n"))?;
        let (out, _, stderr) = agent_with(&["--config", &path.display().to_string()])?;
        assert!(!out.status.success(), "{toml} accepted");
        assert!(stderr.contains(hint), "{toml}: no {hint:?} in: {stderr}");
        assert!(
            !stderr.contains("Raw"),
            "{toml}: internal name in: {stderr}"
        );
    }
    Ok(())
}

/// An empty variable is what `${X:-}` gives in a compose file: it counts as unset, and empty
/// entries in BURROW_FORWARD (a trailing comma) are skipped.
#[test]
fn empty_environment_values_count_as_unset() -> anyhow::Result<()> {
    let (out, _, stderr) = run(burrow(&["agent", "--print-config"])
        .env("BURROW_GATEWAY", "gw.example.com:7443")
        .env("BURROW_KEY", KEY)
        .env("BURROW_TRANSPORT", "tcp")
        .env("BURROW_FORWARD", ""))?;
    assert!(out.status.success(), "BURROW_FORWARD=\"\": {stderr}");

    let (out, stdout, stderr) = run(burrow(&["agent", "--print-config"])
        .env("BURROW_GATEWAY", "gw.example.com:7443")
        .env("BURROW_KEY", KEY)
        .env("BURROW_TRANSPORT", "tcp")
        .env("BURROW_FORWARD", "8080=127.0.0.1:80, ,unix:/run/app.sock,"))?;
    assert!(out.status.success(), "trailing comma: {stderr}");
    assert!(stdout.contains("8080=127.0.0.1:80"), "{stdout}");
    assert!(stdout.contains("unix:/run/app.sock"), "{stdout}");

    // An empty variable defers to the file, as an unset one does.
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, "listen = \"127.0.0.1:1111\"\n")?;
    let (out, stdout, stderr) = run(burrow(&["gateway", "--print-config", "--config"])
        .arg(&path)
        .env("BURROW_LISTEN", "")
        .env("BURROW_PUBLIC_NAME", "")
        .env("BURROW_LOG_LEVEL", ""))?;
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("127.0.0.1:1111"), "{stdout}");
    Ok(())
}

/// A bad value from the environment names the variable it came from; from a flag, the flag.
#[test]
fn bad_environment_values_name_the_variable() -> anyhow::Result<()> {
    for (role, var, value) in [
        ("agent", "BURROW_FORWARD", "8080:127.0.0.1:80"),
        ("agent", "BURROW_GATEWAY", "nohost"),
        ("agent", "BURROW_MAX_BACKOFF", "soon"),
        ("gateway", "BURROW_LISTEN", "7443"),
        ("gateway", "BURROW_TRANSPORT", "udp"),
        ("gateway", "BURROW_LOG_LEVEL", "loud"),
    ] {
        let (out, _, stderr) = run(burrow(&[role]).env(var, value))?;
        assert!(!out.status.success(), "{var}={value} accepted");
        assert!(stderr.contains(var), "{var}={value}: {stderr}");
    }
    let (out, _, stderr) = run(&mut burrow(&["agent", "--forward", "8080:127.0.0.1:80"]))?;
    assert!(!out.status.success());
    assert!(stderr.contains("--forward"), "{stderr}");
    assert!(!stderr.contains("BURROW_FORWARD"), "{stderr}");
    Ok(())
}

/// `burrow keygen --hash` gives the hash of a key that already exists: from the command line,
/// from standard input or from a file (the last two keep it out of shell history).
#[test]
fn keygen_hash_of_an_existing_key() -> anyhow::Result<()> {
    use std::io::Write as _;
    let want = format!("key_hash: {}\n", SecretKey::parse(KEY)?.hash());
    let (out, stdout, stderr) = run(&mut burrow(&["keygen", "--hash", KEY]))?;
    assert!(out.status.success(), "{stderr}");
    assert_eq!(stdout, want);

    for args in [&["keygen", "--hash", "-"][..], &["keygen", "--hash"]] {
        let mut child = burrow(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        child
            .stdin
            .take()
            .expect("piped stdin")
            .write_all(format!("{KEY}\n").as_bytes())?;
        let out = child.wait_with_output()?;
        assert!(out.status.success(), "{args:?}: {out:?}");
        assert_eq!(String::from_utf8(out.stdout)?, want, "{args:?}");
    }

    let dir = tempfile::tempdir()?;
    let key_file = dir.path().join("agent.key");
    std::fs::write(&key_file, format!("{KEY}\n"))?;
    let agent_file = dir.path().join("agent.toml");
    std::fs::write(
        &agent_file,
        format!("gateway = \"gw.example.com:7443\"\nkey = \"{KEY}\"\n"),
    )?;
    for file in [&key_file, &agent_file] {
        let (out, stdout, stderr) = run(burrow(&["keygen", "--hash-file"]).arg(file))?;
        assert!(out.status.success(), "{}: {stderr}", file.display());
        assert_eq!(stdout, want, "{}", file.display());
    }

    // A broken key is refused without being echoed.
    let (out, stdout, stderr) = run(&mut burrow(&["keygen", "--hash", "bk_secretbutbroken"]))?;
    assert!(!out.status.success());
    assert!(stderr.contains("not a burrow key"), "{stderr}");
    assert!(
        !(stdout + &stderr).contains("secretbutbroken"),
        "key echoed"
    );
    Ok(())
}

/// `--print-config` prints a config file: TOML that, with the real key in place of the mask,
/// reads back as the same settings (printed again, it is the same text).
#[test]
fn print_config_reads_back_as_the_same_settings() -> anyhow::Result<()> {
    const KEY2: &str = "bk_5JG9gAt6USx2Cm5GCBiq-AdRjUxOI2NSRKwsBWYJGSU";
    let dir = tempfile::tempdir()?;
    let gateway_file = dir.path().join("gateway.toml");
    std::fs::write(
        &gateway_file,
        format!(
            "listen = \"127.0.0.1:9443\"\npublic_name = \"gw.example.com\"\n\
             state_dir = \"state\"\ntls_cert = \"c.pem\"\ntls_key = \"k.pem\"\n\
             lease = \"90s\"\ngrace = \"1500ms\"\n\
             [heartbeat]\ninterval = \"250ms\"\nmisses = 5\n\
             [limits]\nmax_streams = 77\nhandshake_timeout = \"3s\"\n\
             [[agents]]\nname = \"web\"\nkey = \"{KEY2}\"\nports = [8080, \"9000-9100\"]\n\
             [[agents]]\nname = \"db\"\nkey_hash = \"{}\"\nports = [5432]\n",
            SecretKey::parse(KEY)?.hash()
        ),
    )?;
    let agent_file = dir.path().join("agent.toml");
    std::fs::write(
        &agent_file,
        "[limits]\nmax_frame = 131072\n[[forwards]]\ntarget = \"[::1]:3000\"\nname = \"api\"\n",
    )?;
    let cases: [(&str, Vec<String>, &str); 3] = [
        (
            "gateway",
            vec![
                "--config".into(),
                gateway_file.display().to_string(),
                "--public-host".into(),
                "127.0.0.2".into(),
            ],
            KEY2,
        ),
        (
            "agent",
            vec![
                "--gateway".into(),
                "gw.example.com:7443".into(),
                "--fingerprint".into(),
                format!("SHA256:{}", "ab".repeat(32)),
                "--server-name".into(),
                "sni.example".into(),
                "--forward".into(),
                "0=localhost:5000".into(),
                "--forward".into(),
                "unix:/run/app.sock".into(),
            ],
            KEY,
        ),
        (
            "agent",
            vec![
                "--config".into(),
                agent_file.display().to_string(),
                "--gateway".into(),
                "[::1]:7443".into(),
                "--ca".into(),
                "ca.pem".into(),
                "--max-backoff".into(),
                "2m".into(),
            ],
            KEY,
        ),
    ];
    for (i, (role, args, key)) in cases.iter().enumerate() {
        let mut first = burrow(&[role, "--print-config"]);
        first
            .args(args)
            .env("BURROW_KEY", KEY)
            .current_dir(dir.path());
        let (out, printed, stderr) = run(&mut first)?;
        assert!(out.status.success(), "{role} {args:?}: {stderr}");
        assert!(printed.contains("\"bk_****\""), "{printed}");
        assert!(!printed.contains('{'), "not TOML: {printed}");
        let file = dir.path().join(format!("printed-{i}.toml"));
        std::fs::write(&file, printed.replace("bk_****", key))?;
        let (out, again, stderr) = run(burrow(&[role, "--print-config", "--config"]).arg(&file))?;
        assert!(
            out.status.success(),
            "{role}: the printed file is refused: {stderr}\n{printed}"
        );
        assert_eq!(again, printed, "{role} {args:?}: read back differently");
    }
    Ok(())
}

/// Zero configuration: `--print-config` shows the agent the gateway accepts, with the hash of
/// the key it made, which it does not print.
#[test]
fn print_config_shows_the_generated_agent() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let state = dir.path().join("state");
    let print = || -> anyhow::Result<String> {
        let (out, stdout, stderr) =
            run(burrow(&["gateway", "--print-config", "--state-dir"]).arg(&state))?;
        assert!(out.status.success(), "{stderr}");
        Ok(stdout)
    };
    let before = print()?;
    assert!(before.contains("first start"), "{before}");
    assert!(!state.exists(), "--print-config made the state directory");
    std::fs::create_dir(&state)?;
    std::fs::write(state.join("agent.key"), format!("{KEY}\n"))?;
    let after = print()?;
    let hash = SecretKey::parse(KEY)?.hash().to_string();
    assert!(
        after.contains(&format!("#   key_hash = \"{hash}\"")),
        "{after}"
    );
    assert!(after.contains("#   name = \"default\""), "{after}");
    assert!(!after.contains(&KEY[3..]), "key printed: {after}");
    Ok(())
}

/// What a gateway on `state` did within 20 s: `Some(status)` when it exited, `None` when it
/// started listening (it is then stopped); and its stderr.
fn gateway_on(
    state: &std::path::Path,
    extra: &[&str],
) -> anyhow::Result<(Option<ExitStatus>, String)> {
    let mut child = burrow(&["gateway", "--listen", "127.0.0.1:0", "--log-level", "warn"])
        .arg("--state-dir")
        .arg(state)
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let stdout = child.stdout.take().expect("piped stdout");
    let stderr = child.stderr.take().expect("piped stderr");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.starts_with("gateway listening on ") && tx.send(()).is_err() {
                break;
            }
        }
    });
    let err = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut BufReader::new(stderr), &mut text);
        text
    });
    let status = match rx.recv_timeout(Duration::from_secs(20)) {
        Ok(()) => {
            child.kill()?;
            child.wait()?;
            None
        }
        Err(_) => Some(child.wait()?),
    };
    let err = err.join().expect("stderr reader");
    Ok((status, err))
}

fn chmod(path: &std::path::Path, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    Ok(std::fs::set_permissions(
        path,
        std::fs::Permissions::from_mode(mode),
    )?)
}

/// A state directory or state file that another user can write (or that belongs to one) is
/// refused, naming the problem; `--allow-insecure-state` turns that into a warning. A key file
/// others can only read is a warning, and says "readable".
#[test]
fn state_directory_others_can_change_is_refused() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let state = dir.path().join("state");
    // A first start makes the state.
    let (status, stderr) = gateway_on(&state, &[])?;
    assert!(status.is_none(), "fresh state refused: {stderr}");
    let key = state.join("agent.key");

    chmod(&state, 0o777)?;
    let (status, stderr) = gateway_on(&state, &[])?;
    assert!(
        status.is_some_and(|s| !s.success()),
        "mode 777 accepted: {stderr}"
    );
    assert!(
        stderr.contains("can be written by all users (mode 777)"),
        "{stderr}"
    );
    assert!(stderr.contains("--allow-insecure-state"), "{stderr}");

    let (status, stderr) = gateway_on(&state, &["--allow-insecure-state"])?;
    assert!(status.is_none(), "--allow-insecure-state refused: {stderr}");
    assert!(
        stderr.contains("WARN") && stderr.contains("mode 777"),
        "{stderr}"
    );
    chmod(&state, 0o700)?;

    // A planted key: a file others can write is refused, and said to be writable.
    chmod(&key, 0o666)?;
    let (status, stderr) = gateway_on(&state, &[])?;
    assert!(
        status.is_some_and(|s| !s.success()),
        "agent.key 666 accepted: {stderr}"
    );
    assert!(
        stderr.contains("agent.key can be written by all users"),
        "{stderr}"
    );
    chmod(&key, 0o620)?;
    let (status, stderr) = gateway_on(&state, &[])?;
    assert!(
        status.is_some_and(|s| !s.success()),
        "agent.key 620 accepted: {stderr}"
    );
    assert!(
        stderr.contains("agent.key can be written by its group"),
        "{stderr}"
    );

    // Readable only: a warning that says so, and the gateway starts.
    chmod(&key, 0o644)?;
    let (status, stderr) = gateway_on(&state, &[])?;
    assert!(status.is_none(), "agent.key 644 refused: {stderr}");
    assert!(stderr.contains("is readable by other users"), "{stderr}");
    chmod(&key, 0o600)?;

    // Another user's directory (only root can make one here).
    if std::fs::metadata("/proc/self").is_ok_and(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0) {
        std::os::unix::fs::chown(&state, Some(65534), None)?;
        let (status, stderr) = gateway_on(&state, &[])?;
        assert!(
            status.is_some_and(|s| !s.success()),
            "foreign owner accepted: {stderr}"
        );
        assert!(stderr.contains("belongs to user 65534"), "{stderr}");
    }
    Ok(())
}

/// What Cargo.toml promises ships with the source: the licences it names, and a release
/// profile without debug info (56 MB of it made the binary hard to ship; 8 MB without).
#[test]
fn licences_named_in_cargo_toml_exist_and_the_release_profile_is_lean() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let manifest = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
    let manifest: toml::Value = manifest.parse().unwrap();
    let licence = manifest["workspace"]["package"]["license"]
        .as_str()
        .unwrap();
    assert_eq!(licence, "MIT OR Apache-2.0");
    for (file, needle) in [
        ("LICENSE-MIT", "Permission is hereby granted"),
        ("LICENSE-APACHE", "Apache License"),
    ] {
        let text = std::fs::read_to_string(root.join(file))
            .unwrap_or_else(|e| panic!("{file}: {e} (Cargo.toml names this licence)"));
        assert!(text.contains(needle), "{file} holds the licence text");
    }
    let release = &manifest["profile"]["release"];
    assert_eq!(release["debug"].as_bool(), Some(false), "{release:?}");
    assert_eq!(release["strip"].as_str(), Some("debuginfo"), "{release:?}");
}
