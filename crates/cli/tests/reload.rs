//! Reloading a running gateway's and agent's config, through the real binary: `POST
//! /api/reload` and SIGHUP. On the gateway an agent is added, one removed, one's key changed
//! and one's grant narrowed in one reload, while a transfer on an unchanged agent is held
//! half done across it and then finished byte-exact; a reload that changes nothing changes
//! nothing; a broken file keeps the old config and its error names file, line and key. On
//! the agent a forward is added and one removed while another carries a transfer.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use burrow_testkit::harness::{admin_addr, agent_args, http_exchange, keygen_with_hash, within};
use burrow_testkit::targets::Pattern;
use burrow_testkit::{
    sha256, wait_public, AgentProc, AgentSpec, Burrow, GatewaySpec, Signal, TcpTarget,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::time::Instant;

/// What one test may take in all.
const TEST_LIMIT: Duration = Duration::from_secs(120);
/// How long a process gets to print or do what we wait for.
const WAIT: Duration = Duration::from_secs(30);

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_burrow"))
}

/// `method path` over HTTP/1.1 with `Connection: close`: the status and the body.
async fn http(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    let (head, body) = http_exchange(
        addr,
        &format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"),
    )
    .await;
    let code = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (code, body)
}

async fn reload(admin: SocketAddr) -> serde_json::Value {
    let (code, body) = http(admin, "POST", "/api/reload").await;
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

async fn status(admin: SocketAddr) -> serde_json::Value {
    let (code, body) = http(admin, "GET", "/api/status").await;
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// The gateway's row of agent `name`.
fn agent<'a>(st: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    st["agents"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"] == name)
        .unwrap_or_else(|| panic!("no agent {name} in {st:#}"))
}

/// An agent with `args`, its config `file` (to reload) and an admin server on loopback.
fn agent_from_file(args: Vec<String>, file: &Path) -> Burrow {
    Burrow::start(
        AgentSpec::new(args)
            .args(["--config", file.to_str().unwrap(), "--admin", "127.0.0.1:0"])
            .command(bin()),
    )
    .unwrap()
}

/// An `[[agents]]` entry.
fn entry(name: &str, hash: &str, ports: &[String]) -> String {
    let ports: Vec<String> = ports.iter().map(|p| format!("{p:?}")).collect();
    format!(
        "[[agents]]\nname = \"{name}\"\nkey_hash = \"{hash}\"\nports = [{}]\n\n",
        ports.join(", ")
    )
}

fn all_ports() -> Vec<String> {
    vec!["1024-65535".into()]
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
}

/// Waits (5 s at most) until nothing listens on `addr` any more.
async fn until_closed(addr: SocketAddr, what: &str) -> Duration {
    let start = Instant::now();
    loop {
        match TcpStream::connect(addr).await {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return start.elapsed(),
            _ if start.elapsed() > Duration::from_secs(5) => {
                panic!("{what}: {addr} still listens after 5 s")
            }
            _ => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

/// Echoes `len` bytes through `public` and checks every byte.
async fn echo(public: SocketAddr, len: usize, seed: u64) {
    let data = Pattern::new(seed).bytes(0, len);
    let back = burrow_testkit::targets::echo_bytes(public, &data)
        .await
        .unwrap();
    assert!(
        back == data,
        "echo of {len} bytes through {public} came back different"
    );
}

/// A transfer through an echo that is held half done: the first half goes through and comes
/// back, then it waits for `go` before it sends the rest. It ends with the SHA-256 of what
/// it sent and of what came back.
struct Held {
    go: oneshot::Sender<()>,
    done: tokio::task::JoinHandle<([u8; 32], [u8; 32], usize)>,
}

async fn held_transfer(public: SocketAddr, len: usize, seed: u64) -> Held {
    let data = Pattern::new(seed).bytes(0, len);
    let half = len / 2;
    let mut tcp = TcpStream::connect(public).await.unwrap();
    tcp.write_all(&data[..half]).await.unwrap();
    let mut back = vec![0u8; half];
    tcp.read_exact(&mut back).await.unwrap();
    let (go, wait) = oneshot::channel();
    let done = tokio::spawn(async move {
        wait.await.unwrap();
        let (mut r, mut w) = tcp.split();
        let write = async {
            w.write_all(&data[half..]).await.unwrap();
            w.shutdown().await.unwrap();
        };
        let read = async {
            let mut rest = Vec::new();
            r.read_to_end(&mut rest).await.unwrap();
            rest
        };
        let ((), rest) = tokio::join!(write, read);
        back.extend_from_slice(&rest);
        (sha256(&data), sha256(&back), back.len())
    });
    Held { go, done }
}

impl Held {
    async fn finish(self, what: &str) -> usize {
        self.go.send(()).unwrap();
        let (sent, got, len) = self.done.await.unwrap();
        assert_eq!(
            sent, got,
            "{what}: the transfer came back different ({len} bytes)"
        );
        len
    }
}

async fn start_agent(args: Vec<String>, forwards: &[&str]) -> AgentProc {
    let mut spec = AgentSpec::new(args);
    for f in forwards {
        spec = spec.forward(f);
    }
    spec.start(bin()).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_reload_adds_removes_rekeys_and_narrows_and_leaves_the_rest_alone() {
    within(TEST_LIMIT, "gateway reload", async {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("gateway.toml");
        let (keep_key, keep) = keygen_with_hash(bin());
        let (gone_key, gone) = keygen_with_hash(bin());
        let (narrow_key, narrow) = keygen_with_hash(bin());
        let (old_key, old) = keygen_with_hash(bin());
        let (new_key, new) = keygen_with_hash(bin());
        let (fresh_key, fresh) = keygen_with_hash(bin());
        let v1 = [
            entry("keep", &keep, &all_ports()),
            entry("gone", &gone, &all_ports()),
            entry("narrow", &narrow, &all_ports()),
            entry("rekey", &old, &all_ports()),
        ]
        .concat();
        write(&file, &v1);
        let mut gw = GatewaySpec::new(&dir.path().join("state"))
            .config(&file)
            .args(["--admin", "127.0.0.1:0"])
            .expect_agent_line(false)
            .start(bin())
            .await
            .unwrap();
        let admin = admin_addr(&mut gw, WAIT).await;
        let target = TcpTarget::echo().await.unwrap();
        let spec = target.addr().to_string();
        let other = format!("0={spec}");
        let mut a_keep = start_agent(agent_args(&gw, &keep_key), &[&spec]).await;
        let mut a_gone = start_agent(agent_args(&gw, &gone_key), &[&spec]).await;
        let mut a_narrow = start_agent(agent_args(&gw, &narrow_key), &[&spec, &other]).await;
        let a_rekey = start_agent(agent_args(&gw, &old_key), &[&spec]).await;
        let (kept_port, closed_port) = (a_narrow.public(0), a_narrow.public(1));
        let before = status(admin).await;
        let keep_since = agent(&before, "keep")["session"]["since"].clone();

        // 8 MiB through `keep`, held half done across the reload; and a connection to the
        // port the narrowed grant leaves out.
        let held = held_transfer(a_keep.public(0), 8 << 20, 1).await;
        let mut outside = TcpStream::connect(closed_port).await.unwrap();
        outside.write_all(b"ping").await.unwrap();
        let mut four = [0u8; 4];
        outside.read_exact(&mut four).await.unwrap();

        // `gone` removed, `rekey` with a new key, `narrow` without its second port,
        // `fresh` added, `keep` as it was; and a setting that takes a restart.
        let q = closed_port.port();
        let narrowed = vec![format!("1024-{}", q - 1), format!("{}-65535", q + 1)];
        let v2 = [
            "lease = \"30s\"\n\n".to_string(),
            entry("keep", &keep, &all_ports()),
            entry("narrow", &narrow, &narrowed),
            entry("rekey", &new, &all_ports()),
            entry("fresh", &fresh, &all_ports()),
        ]
        .concat();
        write(&file, &v2);
        let started = Instant::now();
        let report = reload(admin).await;
        println!("reload answered in {:?}: {report:#}", started.elapsed());
        let changes: Vec<&str> = report["changes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_str().unwrap())
            .collect();
        let has = |needle: &str| changes.iter().any(|c| c.contains(needle));
        assert!(has("agent `gone` removed"), "{changes:?}");
        assert!(has("agent `rekey`: key changed"), "{changes:?}");
        assert!(
            has("agent `narrow`: ports") && has(&format!("closed: {q}")),
            "{changes:?}"
        );
        assert!(has("agent `fresh` added"), "{changes:?}");
        assert_eq!(changes.len(), 4, "{changes:?}");
        assert_eq!(report["unchanged"], 1, "only keep is unchanged");
        assert_eq!(report["restart_needed"], serde_json::json!(["lease"]));

        // The removed agent's and the old key's ports are freed; so is the narrowed one.
        let t_gone = until_closed(a_gone.public(0), "gone's port").await;
        let t_rekey = until_closed(a_rekey.public(0), "rekey's port").await;
        let t_narrow = until_closed(closed_port, "narrow's second port").await;
        println!("ports closed {t_gone:?}, {t_rekey:?}, {t_narrow:?} after the answer");
        // That port's connection is closed too (EOF or a reset), not left to hang.
        let mut rest = [0u8; 1];
        let ended = tokio::time::timeout(Duration::from_secs(5), outside.read(&mut rest))
            .await
            .expect("the connection to the port outside the grant was closed");
        assert!(!matches!(ended, Ok(n) if n > 0), "{ended:?}");
        a_gone
            .wait_stderr("was removed from the gateway's config", WAIT)
            .await
            .unwrap();
        let told = a_narrow
            .wait_stdout(
                |l| l.starts_with(&format!("forward {other}: refused:")),
                WAIT,
            )
            .await
            .unwrap();
        assert!(
            told.contains(&format!("port {q} is no longer granted")),
            "{told}"
        );
        // The narrowed agent's other port, and the new and the re-keyed agents, carry on.
        echo(kept_port, 100_000, 2).await;
        let a_fresh = start_agent(agent_args(&gw, &fresh_key), &[&spec]).await;
        echo(a_fresh.public(0), 100_000, 3).await;
        let a_new = start_agent(agent_args(&gw, &new_key), &[&spec]).await;
        echo(a_new.public(0), 100_000, 4).await;

        // The held transfer finishes byte-exact on the session it began on.
        let len = held.finish("keep across the reload").await;
        assert_eq!(len, 8 << 20);
        let after = status(admin).await;
        let names: Vec<&str> = after["agents"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["fresh", "keep", "narrow", "rekey"]);
        for name in ["keep", "narrow"] {
            let a = agent(&after, name);
            assert_eq!(a["sessions"], 1, "{name} kept its session: {a:#}");
            assert_eq!(a["connected"], true);
        }
        assert_eq!(agent(&after, "keep")["session"]["since"], keep_since);
        assert!(
            !a_keep
                .stderr_lines()
                .iter()
                .any(|l| l.contains("session ended")),
            "keep's session never ended"
        );

        // A reload that changes nothing changes nothing.
        let same = reload(admin).await;
        assert_eq!(same["changes"], serde_json::json!([]), "{same:#}");
        assert_eq!(same["unchanged"], 4);
        let again = status(admin).await;
        for name in ["fresh", "keep", "narrow", "rekey"] {
            assert_eq!(
                agent(&again, name)["session"]["since"],
                agent(&after, name)["session"]["since"],
                "{name}'s session is the same"
            );
        }
        echo(a_keep.public(0), 100_000, 5).await;
        gw.signal(Signal::Term).unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_config_keeps_the_old_one_and_names_file_line_and_key() {
    within(TEST_LIMIT, "broken reload", async {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("gateway.toml");
        let (key, hash) = keygen_with_hash(bin());
        let (late_key, late) = keygen_with_hash(bin());
        write(&file, &entry("a", &hash, &all_ports()));
        let mut gw = GatewaySpec::new(&dir.path().join("state"))
            .config(&file)
            .args(["--admin", "127.0.0.1:0"])
            .expect_agent_line(false)
            .start(bin())
            .await
            .unwrap();
        let admin = admin_addr(&mut gw, WAIT).await;
        let target = TcpTarget::echo().await.unwrap();
        let a = start_agent(agent_args(&gw, &key), &[&target.addr().to_string()]).await;

        // Line 9 asks for port 70000, in an entry that would also add an agent.
        let broken = [
            entry("a", &hash, &all_ports()),
            entry("late", &late, &["70000".to_string()]),
        ]
        .concat();
        assert!(broken.lines().nth(8).unwrap().contains("70000"));
        write(&file, &broken);
        let where_ = format!("{} line 9, key agents[1].ports[0]", file.display());
        gw.signal(Signal::Hup).unwrap();
        let logged = gw
            .wait_stderr("config not reloaded, the one in force stays", WAIT)
            .await
            .unwrap();
        assert!(logged.contains(&where_), "{logged}");
        let (code, body) = http(admin, "POST", "/api/reload").await;
        assert_eq!(code, 422, "{body}");
        assert!(body.contains(&where_), "{body}");
        assert!(body.contains("70000"), "{body}");

        // The old config is in force: `a` carries on, `late` is not accepted.
        echo(a.public(0), 100_000, 1).await;
        let st = status(admin).await;
        assert_eq!(agent(&st, "a")["sessions"], 1);
        assert_eq!(st["agents"].as_array().unwrap().len(), 1);
        let mut refused = Burrow::spawn(bin(), agent_args(&gw, &late_key)).unwrap();
        assert!(!refused.wait_exit(WAIT).await.unwrap().success());
        assert!(
            refused
                .stderr_lines()
                .iter()
                .any(|l| l.contains("rejected the key")),
            "{:?}",
            refused.stderr_tail()
        );

        // Fixed, the file applies; SIGHUP does it as POST does.
        write(
            &file,
            &[
                entry("a", &hash, &all_ports()),
                entry("late", &late, &all_ports()),
            ]
            .concat(),
        );
        gw.signal(Signal::Hup).unwrap();
        let logged = gw.wait_stderr("config reloaded from", WAIT).await.unwrap();
        assert!(logged.contains("agent `late` added"), "{logged}");
        start_agent(agent_args(&gw, &late_key), &[&target.addr().to_string()]).await;
        echo(a.public(0), 100_000, 2).await;
    })
    .await;
}

/// The agent's config file: its forwards only (gateway, key and fingerprint come as flags).
fn agent_file(dir: &Path, forwards: &[&str]) -> PathBuf {
    let path = dir.join("agent.toml");
    let list: Vec<String> = forwards.iter().map(|f| format!("{f:?}")).collect();
    write(&path, &format!("forward = [{}]\n", list.join(", ")));
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_reload_binds_added_forwards_and_gives_removed_ones_back() {
    within(TEST_LIMIT, "agent reload", async {
        let dir = tempfile::tempdir().unwrap();
        let gw = GatewaySpec::new(&dir.path().join("state"))
            .start(bin())
            .await
            .unwrap();
        let (t1, t2, t3) = (
            TcpTarget::echo().await.unwrap(),
            TcpTarget::echo().await.unwrap(),
            TcpTarget::echo().await.unwrap(),
        );
        let keep = t1.addr().to_string();
        let gone = t2.addr().to_string();
        let added = t3.addr().to_string();
        let file = agent_file(dir.path(), &[&keep, &gone]);
        let mut agent = agent_from_file(gw.agent_args(), &file);
        let public = wait_public(&mut agent, &[keep.clone(), gone.clone()], WAIT)
            .await
            .unwrap();
        let admin = admin_addr(&mut agent, WAIT).await;
        let held = held_transfer(public[0], 8 << 20, 7).await;

        agent_file(dir.path(), &[&keep, &added]);
        let report = reload(admin).await;
        assert_eq!(
            report["changes"],
            serde_json::json!([
                format!("forward {gone} removed"),
                format!("forward {added} added")
            ]),
            "{report:#}"
        );
        assert_eq!(report["unchanged"], 1);
        assert_eq!(report["restart_needed"], serde_json::json!([]));
        let fresh = wait_public(&mut agent, std::slice::from_ref(&added), WAIT)
            .await
            .unwrap();
        echo(fresh[0], 100_000, 8).await;
        // Given back at the gateway (Unbind): nothing listens there any more.
        let t = until_closed(public[1], "the removed forward's port").await;
        println!("removed forward's port closed {t:?} after the answer");
        assert_eq!(held.finish("the unchanged forward").await, 8 << 20);
        let st = status(admin).await;
        assert_eq!(
            st["totals"]["sessions"], 1,
            "one session throughout: {st:#}"
        );
        let names: Vec<&str> = st["agents"][0]["services"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, [keep.as_str(), added.as_str()]);

        // SIGHUP does the same: the added one goes again.
        agent_file(dir.path(), &[&keep]);
        agent.signal(Signal::Hup).unwrap();
        agent
            .wait_stderr(&format!("forward {added} removed"), WAIT)
            .await
            .unwrap();
        until_closed(fresh[0], "the forward removed by SIGHUP").await;
        echo(public[0], 100_000, 9).await;
        let st = status(admin).await;
        assert_eq!(st["totals"]["sessions"], 1);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_reload_over_quic_gives_a_removed_forward_back_in_the_same_session() {
    within(TEST_LIMIT, "agent reload over quic", async {
        let dir = tempfile::tempdir().unwrap();
        let gw = GatewaySpec::new(&dir.path().join("state"))
            .start(bin())
            .await
            .unwrap();
        let (t1, t2) = (
            TcpTarget::echo().await.unwrap(),
            TcpTarget::echo().await.unwrap(),
        );
        let keep = t1.addr().to_string();
        let gone = t2.addr().to_string();
        let file = agent_file(dir.path(), &[&keep, &gone]);
        let mut agent = agent_from_file(gw.agent_args_url("quic", gw.addr()), &file);
        let public = wait_public(&mut agent, &[keep.clone(), gone.clone()], WAIT)
            .await
            .unwrap();
        let admin = admin_addr(&mut agent, WAIT).await;
        agent_file(dir.path(), &[&keep]);
        let report = reload(admin).await;
        assert_eq!(
            report["changes"],
            serde_json::json!([format!("forward {gone} removed")]),
            "{report:#}"
        );
        // The Unbind travels on QUIC's control stream: the port closes, the session stays.
        let t = until_closed(public[1], "the removed forward's port").await;
        println!("over quic: removed forward's port closed {t:?} after the answer");
        echo(public[0], 100_000, 3).await;
        let st = status(admin).await;
        assert_eq!(
            st["totals"]["sessions"], 1,
            "one session throughout: {st:#}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_reload_says_private_services_and_allow_need_a_restart() {
    within(TEST_LIMIT, "agent reload of private", async {
        let dir = tempfile::tempdir().unwrap();
        let gw = GatewaySpec::new(&dir.path().join("state"))
            .start(bin())
            .await
            .unwrap();
        let target = TcpTarget::echo().await.unwrap();
        let path = dir.path().join("agent.toml");
        write(&path, &format!("private = [\"echo={}\"]\n", target.addr()));
        let mut agent = agent_from_file(gw.agent_args(), &path);
        agent
            .wait_stderr("private service announced", WAIT)
            .await
            .unwrap();
        let admin = admin_addr(&mut agent, WAIT).await;
        write(
            &path,
            &format!(
                "private = [\"echo={}\", \"ssh=127.0.0.1:22\"]\nallow = [\"127.0.0.1:*\"]\n",
                target.addr()
            ),
        );
        let report = reload(admin).await;
        assert_eq!(
            report["restart_needed"],
            serde_json::json!(["private", "allow"]),
            "{report:#}"
        );
        assert_eq!(report["changes"], serde_json::json!([]), "{report:#}");
    })
    .await;
}
