//! Tokens a running gateway issues, through the real binary and `burrow token`: one is
//! made, used, listed and revoked (its session closed within a second, its port freed, its
//! key refused afterwards with a message that says so); one expires (its live session ends
//! when it does); the state directory holds no key; the tokens and the revocation survive a
//! restart; a name the config uses is refused; without an admin token, none is made.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use burrow_testkit::harness::{admin_addr, within};
use burrow_testkit::targets::{echo_bytes, Pattern};
use burrow_testkit::{AgentProc, AgentSpec, Burrow, GatewayProc, GatewaySpec, Signal, TcpTarget};
use tokio::net::TcpStream;
use tokio::time::Instant;

const TEST_LIMIT: Duration = Duration::from_secs(120);
const WAIT: Duration = Duration::from_secs(30);
const TOKEN: &str = "a-long-enough-admin-token-for-tests";

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_burrow"))
}

/// `burrow token ARGS` against `admin`: exit success, stdout, stderr.
async fn token(admin: SocketAddr, with_token: bool, args: &[&str]) -> (bool, String, String) {
    let mut cmd = tokio::process::Command::new(bin());
    cmd.arg("token")
        .args(args)
        .arg("--admin")
        .arg(admin.to_string())
        .env_remove("BURROW_ADMIN_TOKEN");
    if with_token {
        cmd.env("BURROW_ADMIN_TOKEN", TOKEN);
    }
    let out = cmd.output().await.unwrap();
    (
        out.status.success(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

/// Makes token `name` and returns its key and its `burrow agent ...` line's arguments.
async fn create(admin: SocketAddr, name: &str, extra: &[&str]) -> (String, Vec<String>) {
    let mut args = vec!["create", name, "--ports", "1024-65535"];
    args.extend_from_slice(extra);
    let (ok, out, err) = token(admin, true, &args).await;
    assert!(ok, "token create {name}: {err}");
    assert!(
        out.starts_with(&format!("token {name} created: ports 1024-65535")),
        "{out}"
    );
    let key = out
        .lines()
        .find_map(|l| l.strip_prefix("key (shown once"))
        .and_then(|l| l.rsplit(' ').next())
        .unwrap()
        .to_string();
    assert!(key.starts_with("bk_"), "{out}");
    let line = out
        .lines()
        .find(|l| l.starts_with("burrow agent "))
        .unwrap();
    assert!(line.contains(&key), "{line}");
    let args = line.split_whitespace().skip(1).map(String::from).collect();
    (key, args)
}

async fn gateway(state: &Path, listen: Option<SocketAddr>) -> (GatewayProc, SocketAddr) {
    let mut spec = GatewaySpec::new(state).args(["--admin", "127.0.0.1:0", "--admin-token", TOKEN]);
    if let Some(addr) = listen {
        spec = spec.listen(addr);
    }
    let mut gw = spec.start(bin()).await.unwrap();
    let admin = admin_addr(&mut gw, WAIT).await;
    (gw, admin)
}

async fn echo(public: SocketAddr, seed: u64) {
    let data = Pattern::new(seed).bytes(0, 100_000);
    assert!(echo_bytes(public, &data).await.unwrap() == data);
}

async fn until_closed(addr: SocketAddr) -> Duration {
    let start = Instant::now();
    loop {
        match TcpStream::connect(addr).await {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return start.elapsed(),
            _ if start.elapsed() > Duration::from_secs(5) => panic!("{addr} still listens"),
            _ => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
}

async fn use_key(args: Vec<String>, target: &TcpTarget) -> AgentProc {
    AgentSpec::new(args)
        .forward(&target.addr().to_string())
        .start(bin())
        .await
        .unwrap()
}

/// An agent with `args` that must be refused: its stderr.
async fn refused(args: Vec<String>) -> String {
    let mut a = Burrow::spawn(bin(), &args).unwrap();
    let status = a.wait_exit(WAIT).await.unwrap();
    assert!(!status.success());
    a.stderr_lines().join("\n")
}

/// Every file under `dir`, with its contents.
fn files(dir: &Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(files(&p));
        } else {
            out.push((p.clone(), std::fs::read(&p).unwrap()));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_is_made_used_listed_revoked_and_refused_afterwards() {
    within(TEST_LIMIT, "tokens", async {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let (mut gw, admin) = gateway(&state, None).await;
        let target = TcpTarget::echo().await.unwrap();
        let (key, args) = create(admin, "ci", &[]).await;
        let mut ci = use_key(args.clone(), &target).await;
        echo(ci.public(0), 1).await;
        let (ok, out, _) = token(admin, true, &["list"]).await;
        assert!(ok);
        let row = out.lines().find(|l| l.starts_with("ci ")).unwrap();
        assert!(row.contains("1024-65535") && row.contains("active") && row.contains("connected"), "{out}");
        let st: serde_json::Value = serde_json::from_str(&token(admin, true, &["list", "--json"]).await.1).unwrap();
        assert_eq!(st[0]["name"], "ci");
        assert_eq!(st[0]["expires"], serde_json::Value::Null);

        // Only the key's hash is kept, in a file only this user can read.
        for (path, bytes) in files(&state) {
            let text = String::from_utf8_lossy(&bytes);
            assert!(!text.contains(&key), "{} holds the key", path.display());
        }
        let file = state.join("tokens.toml");
        let text = std::fs::read_to_string(&file).unwrap();
        assert!(text.contains("name = \"ci\"") && text.contains("key_hash = \"bkh_"), "{text}");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);

        // Revoked: the session is closed within a second, the port freed, the agent stops.
        let public = ci.public(0);
        let started = Instant::now();
        let (ok, out, err) = token(admin, true, &["revoke", "ci"]).await;
        assert!(ok, "{err}");
        assert!(out.starts_with("token ci revoked at "), "{out}");
        let status = ci.wait_exit(Duration::from_secs(5)).await.unwrap();
        let stopped = started.elapsed();
        until_closed(public).await;
        let freed = started.elapsed();
        println!("revoke: the agent stopped {stopped:?} and its port was free {freed:?} after `burrow token revoke` started");
        assert!(!status.success());
        assert!(stopped < Duration::from_secs(1), "{stopped:?}");
        assert!(freed < Duration::from_secs(1), "{freed:?}");
        let said = ci.stderr_lines().join("\n");
        assert!(said.contains("token `ci`) was revoked"), "{said}");
        // And its key is refused from now on, saying why.
        let again = refused(args.clone()).await;
        assert!(again.contains("was revoked on the gateway"), "{again}");
        let (_, out, _) = token(admin, true, &["list"]).await;
        assert!(out.lines().any(|l| l.starts_with("ci ") && l.contains("revoked")), "{out}");

        // A name the config uses (the generated key's `default`) is refused; so is revoking
        // a token that is not there.
        let (ok, _, err) = token(admin, true, &["create", "default", "--ports", "9000"]).await;
        assert!(!ok && err.contains("an agent named `default` is in the gateway's config"), "{err}");
        let (ok, _, err) = token(admin, true, &["revoke", "nobody"]).await;
        assert!(!ok && err.contains("no token named `nobody`"), "{err}");

        // A token made now, the revocation and the tokens file survive a restart.
        let (_, kept) = create(admin, "kept", &[]).await;
        gw.signal(Signal::Term).unwrap();
        assert!(gw.wait_exit(WAIT).await.unwrap().success());
        let (_gw, admin) = gateway(&state, Some(gw.addr())).await;
        let a = use_key(kept, &target).await;
        echo(a.public(0), 2).await;
        let again = refused(args).await;
        assert!(again.contains("was revoked on the gateway"), "after the restart: {again}");
        let (_, out, _) = token(admin, true, &["list"]).await;
        assert!(out.lines().any(|l| l.starts_with("kept ") && l.contains("connected")), "{out}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_token_ends_its_session_and_is_refused() {
    within(TEST_LIMIT, "expiry", async {
        let dir = tempfile::tempdir().unwrap();
        let (_gw, admin) = gateway(&dir.path().join("state"), None).await;
        let target = TcpTarget::echo().await.unwrap();
        let made = Instant::now();
        let (_, args) = create(admin, "short", &["--expires", "2s"]).await;
        let (_, out, _) = token(admin, true, &["list", "--json"]).await;
        let rows: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert!(rows[0]["expires"].is_string(), "{rows:#}");
        let mut a = use_key(args.clone(), &target).await;
        echo(a.public(0), 3).await;
        let public = a.public(0);
        // The live session ends when the token expires, and the agent stops.
        let status = a.wait_exit(Duration::from_secs(10)).await.unwrap();
        let ended = made.elapsed();
        until_closed(public).await;
        println!("a 2 s token's session ended {ended:?} after `burrow token create` started");
        assert!(!status.success());
        assert!(
            ended >= Duration::from_millis(1900) && ended < Duration::from_secs(4),
            "{ended:?}"
        );
        let said = a.stderr_lines().join("\n");
        assert!(said.contains("token `short`) expired at"), "{said}");
        let again = refused(args).await;
        assert!(again.contains("expired at"), "{again}");
        let (_, out, _) = token(admin, true, &["list"]).await;
        assert!(
            out.lines()
                .any(|l| l.starts_with("short ") && l.contains("expired")),
            "{out}"
        );
    })
    .await;
}

#[tokio::test]
async fn tokens_need_the_admin_token() {
    within(TEST_LIMIT, "admin token", async {
        let dir = tempfile::tempdir().unwrap();
        // With a token set, a request without it is refused (401).
        let (_gw, admin) = gateway(&dir.path().join("a"), None).await;
        let (ok, _, err) = token(admin, false, &["create", "x", "--ports", "9000"]).await;
        assert!(!ok && err.contains("needs its token"), "{err}");
        // Without one set at all, tokens are not made (403): every local user reaches it.
        let mut open = GatewaySpec::new(&dir.path().join("b"))
            .args(["--admin", "127.0.0.1:0"])
            .start(bin())
            .await
            .unwrap();
        let admin = admin_addr(&mut open, WAIT).await;
        let (ok, _, err) = token(admin, false, &["create", "x", "--ports", "9000"]).await;
        assert!(!ok && err.contains("403"), "{err}");
        assert!(!dir.path().join("b/tokens.toml").exists());
        let (ok, out, _) = token(admin, false, &["list"]).await;
        assert!(ok && out.contains("no tokens"), "{out}");
    })
    .await;
}
