//! `burrow run --config FILE` through the real binary: a gateway and an agent from one file
//! carry traffic end to end in one process, and so do a gateway, an agent and a connector
//! (client -> connector -> gateway -> agent -> target), every log line of an instance carries its name,
//! an instance with a bad setting is reported by name and line while the others serve, and
//! SIGTERM stops them all.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use burrow_testkit::harness::keygen;
use burrow_testkit::targets::{echo_transfer, EchoOpts};
use burrow_testkit::{Burrow, Pki, Signal, TcpTarget};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_burrow"))
}

const WAIT: Duration = Duration::from_secs(30);

/// A TCP relay on a port known now to an upstream known later: the agent in the file must
/// name its gateway's address before the gateway (on port 0) has one. Each connection waits
/// for the upstream, then is copied both ways.
async fn deferred_relay() -> (SocketAddr, watch::Sender<Option<SocketAddr>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = watch::channel(None::<SocketAddr>);
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            let mut rx = rx.clone();
            tokio::spawn(async move {
                let Ok(up) = rx.wait_for(Option::is_some).await.map(|u| u.unwrap()) else {
                    return;
                };
                if let Ok(mut server) = TcpStream::connect(up).await {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                }
            });
        }
    });
    (addr, tx)
}

/// A stdout line of `p` that satisfies `pred`, printed already or within [`WAIT`].
async fn printed(p: &mut Burrow, pred: impl Fn(&str) -> bool) -> String {
    if let Some(l) = p.stdout_lines().iter().find(|l| pred(l)) {
        return l.clone();
    }
    p.wait_stdout(pred, WAIT).await.unwrap()
}

fn after<'a>(line: &'a str, prefix: &str) -> &'a str {
    line.strip_prefix(prefix).unwrap().trim()
}

/// Writes `text` to `dir/run.toml`, readable by its owner only (it holds keys).
fn write_run_file(dir: &Path, text: &str) -> PathBuf {
    let file = dir.join("run.toml");
    std::fs::write(&file, text).unwrap();
    std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    file
}

/// `burrow run --config FILE`, once its gateway `edge` listens (and `upstream`, the relay
/// the file's agent dials, points at it).
async fn start_run(file: &Path, upstream: &watch::Sender<Option<SocketAddr>>) -> Burrow {
    let mut p = Burrow::spawn(bin(), ["run", "--config", file.to_str().unwrap()]).unwrap();
    let line = p
        .wait_stdout(|l| l.starts_with("edge: gateway listening on "), WAIT)
        .await
        .unwrap();
    let gw: SocketAddr = after(&line, "edge: gateway listening on ").parse().unwrap();
    upstream.send(Some(gw)).unwrap();
    p
}

/// For each (needle, want): the first of `logs` that contains `needle` also contains `want`.
fn assert_logged(logs: &[String], checks: &[(&str, &str)]) {
    for (needle, want) in checks {
        let line = logs
            .iter()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no log line with {needle:?}: {logs:#?}"));
        assert!(line.contains(want), "{line}");
    }
}

/// Asserts that `err` says each instance (name, line of `file`) stopped.
fn assert_stopped(err: &str, file: &Path, instances: &[(&str, usize)]) {
    for (name, line) in instances {
        let want = format!("instance {name} ({} line {line}) stopped", file.display());
        assert!(err.contains(&want), "{want}: {err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_and_an_agent_in_one_file_serve_while_a_bad_instance_is_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let pki = Pki::new("run").unwrap();
    let (cert, key_pem) = pki.issue("gateway").unwrap();
    let echo = TcpTarget::echo().await.unwrap();
    let (relay, upstream) = deferred_relay().await;
    let key = keygen(bin());
    // Line numbers matter: the bad instance's setting is on line 27.
    let text = format!(
        r#"log_level = "info"

[[gateway]]
name = "edge"
listen = "127.0.0.1:0"
public_host = "127.0.0.1"
state_dir = "state"
tls_cert = "{cert}"
tls_key = "{tls_key}"
grace = "2s"

[[gateway.agents]]
name = "office"
key = "{key}"
ports = ["1024-65535"]

[[agent]]
name = "office"
gateway = "127.0.0.1:{relay_port}"
ca = "{ca}"
key = "{key}"
max_backoff = "1s"
forward = ["0=127.0.0.1:{echo_port}"]

[[agent]]
name = "broken"
connect_timeout = "0s"
gateway = "127.0.0.1:1"
"#,
        cert = cert.display(),
        tls_key = key_pem.display(),
        ca = pki.ca_file().display(),
        relay_port = relay.port(),
        echo_port = echo.addr().port(),
    );
    assert_eq!(text.lines().nth(26), Some("connect_timeout = \"0s\""));
    let file = write_run_file(dir, &text);
    let started = Instant::now();
    let mut p = start_run(&file, &upstream).await;
    let want = format!(
        "office: forward 0=127.0.0.1:{}: public address ",
        echo.addr().port()
    );
    let line = p.wait_stdout(|l| l.starts_with(&want), WAIT).await.unwrap();
    let public: SocketAddr = after(&line, &want).parse().unwrap();
    let up = started.elapsed();
    let t = echo_transfer(public, &EchoOpts::new(8 << 20, 3))
        .await
        .unwrap();
    assert!(
        t.exact,
        "8 MiB byte-exact through the gateway and agent of one process"
    );

    // Each instance's log lines carry its name, from whichever of its tasks they come.
    p.wait_stderr("stream closed", WAIT).await.unwrap();
    let logs = p.stderr_lines().to_vec();
    assert_logged(
        &logs,
        &[
            ("agent connected", "gateway{instance=edge}"),
            ("connected to gateway", "agent{instance=office}"),
            ("public port granted", "gateway{instance=edge}"),
            // The bad instance: named, with its file line; the others serve regardless.
            (
                "instance [[agent]] broken",
                &format!(
                    "instance [[agent]] broken ({} line 25): line 27, key connect_timeout: must be more than 0",
                    file.display()
                ),
            ),
        ],
    );

    // SIGTERM drains and stops every instance; exit 0.
    p.signal(Signal::Term).unwrap();
    let stopping = Instant::now();
    let st = p.wait_exit(WAIT).await.unwrap();
    assert!(st.success(), "{st:?}");
    let err = p.stderr_lines().join("\n");
    assert_stopped(
        &err,
        &file,
        &[("[[gateway]] edge", 3), ("[[agent]] office", 17)],
    );
    assert!(
        TcpStream::connect(public).await.is_err(),
        "the public port is closed"
    );
    println!(
        "burrow run: gateway and agent up and the forward granted {up:?} after start; 8 MiB echo at {:.0} MiB/s; stopped {:?} after SIGTERM",
        8.0 / t.elapsed.as_secs_f64(),
        stopping.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_where_no_instance_can_start_fails_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("run.toml");
    std::fs::write(
        &file,
        "[[agent]]\nname = \"a\"\nforward = [\"8080:80\"]\n\n[[connector]]\nname = \"c\"\n",
    )
    .unwrap();
    let mut p = Burrow::spawn(bin(), ["run", "--config", file.to_str().unwrap()]).unwrap();
    let st = p.wait_exit(WAIT).await.unwrap();
    assert!(!st.success());
    let err = p.stderr_lines().join("\n");
    let f = file.display();
    assert!(
        err.contains(&format!(
            "instance [[agent]] a ({f} line 1): line 3, key forward[0]"
        )),
        "{err}"
    );
    // A connector is read as its own file would be: this one names no gateway.
    assert!(
        err.contains(&format!("instance [[connector]] c ({f} line 5): "))
            && err.contains("no gateway"),
        "{err}"
    );
    assert!(err.contains("no instance of"), "{err}");
    // A mistake outside every instance stops the whole file, with its line.
    std::fs::write(
        &file,
        "[[agent]]\nname = \"a\"\n\n[[gatway]]\nname = \"g\"\n",
    )
    .unwrap();
    let mut p = Burrow::spawn(bin(), ["run", "--config", file.to_str().unwrap()]).unwrap();
    let st = p.wait_exit(WAIT).await.unwrap();
    assert!(!st.success());
    let err = p.stderr_lines().join("\n");
    assert!(
        err.contains("line 4, key gatway: unknown key `gatway`: did you mean `gateway`?"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_an_agent_and_a_connector_in_one_file_carry_traffic_while_a_bad_connector_is_reported(
) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let pki = Pki::new("run").unwrap();
    let (cert, key_pem) = pki.issue("gateway").unwrap();
    let echo = TcpTarget::echo().await.unwrap();
    let (relay, upstream) = deferred_relay().await;
    let (agent_key, connector_key) = (keygen(bin()), keygen(bin()));
    // Line numbers matter: the bad connector's setting is on line 41.
    let text = format!(
        r#"log_level = "info"

[[gateway]]
name = "edge"
listen = "127.0.0.1:0"
public_host = "127.0.0.1"
state_dir = "state"
tls_cert = "{cert}"
tls_key = "{tls_key}"
grace = "2s"

[[gateway.agents]]
name = "office"
key = "{agent_key}"
ports = ["1024-65535"]

[[gateway.connectors]]
name = "laptop"
key = "{connector_key}"
reach = ["office/echo"]

[[agent]]
name = "office"
gateway = "127.0.0.1:{relay_port}"
ca = "{ca}"
key = "{agent_key}"
max_backoff = "1s"
private = ["echo=127.0.0.1:{echo_port}"]

[[connector]]
name = "laptop"
gateway = "127.0.0.1:{relay_port}"
ca = "{ca}"
key = "{connector_key}"
max_backoff = "1s"
forward = ["0=office/echo"]

[[connector]]
name = "broken"
gateway = "127.0.0.1:{relay_port}"
max_backoff = "0s"
forward = ["0=office/echo"]
"#,
        cert = cert.display(),
        tls_key = key_pem.display(),
        ca = pki.ca_file().display(),
        relay_port = relay.port(),
        echo_port = echo.addr().port(),
    );
    assert_eq!(text.lines().nth(40), Some("max_backoff = \"0s\""));
    let file = write_run_file(dir, &text);
    let started = Instant::now();
    let mut p = start_run(&file, &upstream).await;
    // The instances start at once: the connector may print before the gateway.
    let want = "laptop: forward 0=office/echo: listening on ";
    let line = printed(&mut p, |l| l.starts_with(want)).await;
    let local: SocketAddr = after(&line, want).parse().unwrap();
    printed(&mut p, |l| l == "laptop: forward 0=office/echo: ready").await;
    let up = started.elapsed();
    // client -> connector -> gateway -> agent -> target, all in one process.
    let t = echo_transfer(local, &EchoOpts::new(8 << 20, 5))
        .await
        .unwrap();
    assert!(
        t.exact && t.received == 8 << 20,
        "8 MiB byte-exact through the connector, gateway and agent of one process: {t:?}"
    );
    assert_eq!(echo.accepted(), 1, "one connection at the target");

    p.wait_stderr("connector stream closed", WAIT)
        .await
        .unwrap();
    let logs = p.stderr_lines().to_vec();
    assert_logged(
        &logs,
        &[
            ("connector session up", "connector{instance=laptop}"),
            ("connector stream closed", "gateway{instance=edge}"),
            (
                "private service announced: connectors",
                "agent{instance=office}",
            ),
            // The bad connector: named, with its file line; the others serve regardless.
            (
                "instance [[connector]] broken",
                &format!(
                    "instance [[connector]] broken ({} line 38): line 41, key max_backoff: must be more than 0",
                    file.display()
                ),
            ),
        ],
    );

    p.signal(Signal::Term).unwrap();
    let st = p.wait_exit(WAIT).await.unwrap();
    assert!(st.success(), "{st:?}");
    let err = p.stderr_lines().join("\n");
    assert_stopped(
        &err,
        &file,
        &[
            ("[[gateway]] edge", 3),
            ("[[agent]] office", 22),
            ("[[connector]] laptop", 30),
        ],
    );
    assert!(
        TcpStream::connect(local).await.is_err(),
        "the connector's listener is closed"
    );
    println!(
        "burrow run with a connector: its forward ready {up:?} after start; 8 MiB echo through connector, gateway and agent at {:.0} MiB/s",
        8.0 / t.elapsed.as_secs_f64()
    );
}
