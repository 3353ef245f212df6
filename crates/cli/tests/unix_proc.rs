//! Gateway public endpoints on unix sockets, through the real binary: a forward
//! `unix:PATH=TARGET` within the grant's `paths` carries bytes exactly; the socket is created
//! with the grant's mode, replaces only a stale socket, is kept for a dropped agent during
//! the lease, and is removed when the lease ends and when the gateway stops. A path outside
//! the grant is refused with the reason printed by the agent; the zero-config grant has no
//! paths at all.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::{FileTypeExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use burrow_testkit::harness::{agent_args_with, keygen};
use burrow_testkit::targets::Pattern;
use burrow_testkit::{AgentSpec, Burrow, GatewaySpec, Signal, TcpTarget};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_burrow"))
}

const WAIT: Duration = Duration::from_secs(30);

/// Waits until every one of `needles` is in some stdout line of `p`; returns those lines.
async fn wait_lines(p: &mut Burrow, needles: &[String]) -> Vec<String> {
    let deadline = Instant::now() + WAIT;
    loop {
        let lines = p.stdout_lines().to_vec();
        let found: Vec<String> = needles
            .iter()
            .filter_map(|n| lines.iter().find(|l| l.contains(n.as_str())).cloned())
            .collect();
        if found.len() == needles.len() {
            return found;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "stdout lacks one of {needles:?}: {lines:#?}"
        );
        let _ = p.wait_stdout(|_| true, left).await;
    }
}

/// Sends `len` bytes of a pattern through the unix socket at `path` to an echo and checks
/// every byte that comes back.
async fn echo_through(path: &Path, len: usize, seed: u64) -> Duration {
    let started = Instant::now();
    let mut data = vec![0u8; len];
    Pattern::new(seed).fill(0, &mut data);
    let conn = UnixStream::connect(path).await.unwrap();
    let (mut r, mut w) = conn.into_split();
    let sent = data.clone();
    let writer = tokio::spawn(async move {
        w.write_all(&sent).await.unwrap();
        w.shutdown().await.unwrap();
    });
    let mut back = Vec::with_capacity(len);
    tokio::time::timeout(WAIT, r.read_to_end(&mut back))
        .await
        .expect("the echo within 30 s")
        .unwrap();
    writer.await.unwrap();
    assert_eq!(back.len(), len, "as many bytes back as sent");
    assert!(back == data, "byte-exact through the unix endpoint");
    started.elapsed()
}

/// Waits (5 s) until `path` is gone; how long that took.
async fn gone(path: &Path) -> Duration {
    let started = Instant::now();
    while path.exists() {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{} still there after 5 s",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unix_endpoint_within_the_grant_carries_bytes_and_is_cleaned_up() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_path_buf();
    let public = root.join("pub");
    std::fs::create_dir(&public).unwrap();
    let echo_sock = public.join("echo.sock");
    // Left behind by a killed process: replaced.
    let stale = public.join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    // Not a socket: never touched.
    let file = public.join("file.sock");
    std::fs::write(&file, "keep me").unwrap();
    let outside = root.join("outside.sock");
    let key = keygen(bin());
    let conf = root.join("gateway.toml");
    std::fs::write(
        &conf,
        format!(
            "lease = \"1s\"\n\n[[agents]]\nname = \"local\"\nkey = \"{key}\"\nports = [\"1024-65535\"]\n\
             paths = [\"{}/*.sock\"]\n",
            public.display()
        ),
    )
    .unwrap();
    let mut gw = GatewaySpec::new(&root.join("state"))
        .config(&conf)
        .expect_agent_line(false)
        .start(bin())
        .await
        .unwrap();
    let echo = TcpTarget::echo().await.unwrap();
    let target = echo.addr();
    let forwards: Vec<String> = [&echo_sock, &stale, &file, &outside]
        .iter()
        .map(|p| format!("unix:{}={target}", p.display()))
        .collect();
    let spec = forwards
        .iter()
        .fold(AgentSpec::new(agent_args(&gw, &key)), |s, f| s.forward(f));
    let mut agent = Burrow::start(spec.command(bin())).unwrap();
    let lines = wait_lines(
        &mut agent,
        &[
            format!(
                "forward {}: public address unix:{}",
                forwards[0],
                echo_sock.display()
            ),
            format!(
                "forward {}: public address unix:{}",
                forwards[1],
                stale.display()
            ),
            format!("forward {}: refused:", forwards[2]),
            format!("forward {}: refused:", forwards[3]),
        ],
    )
    .await;
    assert!(
        lines[2].contains("exists on the gateway and is not a socket"),
        "{}",
        lines[2]
    );
    assert!(
        lines[3].contains("is not granted to agent `local`")
            && lines[3].contains(&format!("granted paths: {}/*.sock", public.display())),
        "{}",
        lines[3]
    );
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep me");
    assert!(!outside.exists(), "nothing made outside the grant");
    for sock in [&echo_sock, &stale] {
        let meta = std::fs::symlink_metadata(sock).unwrap();
        assert!(meta.file_type().is_socket(), "{}", sock.display());
        assert_eq!(
            meta.permissions().mode() & 0o7777,
            0o660,
            "{}",
            sock.display()
        );
    }
    let took = echo_through(&echo_sock, 8 << 20, 7).await;
    echo_through(&stale, 64 << 10, 8).await;
    // Parallel streams through one socket.
    let started = Instant::now();
    let streams: Vec<_> = (0..20)
        .map(|i| {
            let p = echo_sock.clone();
            tokio::spawn(async move { echo_through(&p, 256 << 10, 100 + i).await })
        })
        .collect();
    for s in streams {
        s.await.unwrap();
    }
    let parallel = started.elapsed();

    // The agent dies: the sockets stay, reserved, and clients are closed at once.
    agent.kill().await.unwrap();
    gw.wait_stderr("agent connection lost", WAIT).await.unwrap();
    assert!(echo_sock.exists(), "kept during the lease");
    let mut c = UnixStream::connect(&echo_sock).await.unwrap();
    let mut buf = [0u8; 1];
    let n = tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf))
        .await
        .expect("closed at once while no session routes it");
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    let lease_end = gone(&echo_sock).await;
    gone(&stale).await;

    // A new session binds again; a stop of the gateway removes the files.
    let spec = AgentSpec::new(agent_args(&gw, &key)).forward(&forwards[0]);
    let mut agent = Burrow::start(spec.command(bin())).unwrap();
    wait_lines(
        &mut agent,
        &[format!("forward {}: public address", forwards[0])],
    )
    .await;
    echo_through(&echo_sock, 64 << 10, 9).await;
    gw.signal(Signal::Term).unwrap();
    let st = gw.wait_exit(WAIT).await.unwrap();
    assert!(st.success(), "{st:?}");
    assert!(!echo_sock.exists(), "removed when the gateway stops");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep me");
    println!(
        "unix endpoint: 8 MiB echo in {took:?}, 20 parallel 256 KiB echoes in {parallel:?}; \
         socket gone {lease_end:?} after the agent's session was lost (lease 1 s)"
    );
    drop(agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_zero_config_grant_has_no_paths() {
    let tmp = tempfile::tempdir().unwrap();
    let gw = GatewaySpec::new(&tmp.path().join("state"))
        .start(bin())
        .await
        .unwrap();
    let sock: PathBuf = tmp.path().join("x.sock");
    let forward = format!("unix:{}=127.0.0.1:9", sock.display());
    let mut agent = Burrow::start(
        AgentSpec::new(gw.agent_args())
            .forward(&forward)
            .command(bin()),
    )
    .unwrap();
    // Refused for good, and it was the only forward: the agent stops and says why.
    let st = agent.wait_exit(WAIT).await.unwrap();
    assert!(!st.success());
    let err = agent.stderr_lines().join("\n");
    assert!(
        err.contains("nothing to publish")
            && err.contains("is not granted to agent `default` (granted paths: none"),
        "{err}"
    );
    assert!(!sock.exists());
}

/// The agent arguments for `key` against `gw`, retrying within a second.
fn agent_args(gw: &burrow_testkit::GatewayProc, key: &str) -> Vec<String> {
    agent_args_with(gw, key, &["--max-backoff", "1s"])
}
