//! An echo target in a child process, for the memory rows.
//!
//! Each held connection costs the bench two file descriptors when the target lives inside it
//! (client and target side), so 10,000 connections would need more than a common hard limit
//! of 20,000. A child has its own limit: with the target there, every process needs about one
//! descriptor per connection.
//!
//! The child is this same executable run with `--serve-echo`. It prints `echo ADDR`, then
//! answers each `open?` line on stdin with the number of echo connections open, and exits
//! when stdin closes.

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

use crate::targets;

/// The flag that makes this executable the echo child.
pub const FLAG: &str = "--serve-echo";

/// Longest the child may take to answer.
const ANSWER_LIMIT: Duration = Duration::from_secs(10);

/// The child's side: serves echo until stdin closes.
pub fn serve() -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        let open = Arc::new(AtomicUsize::new(0));
        let addr = targets::start_echo(open.clone()).await?;
        let mut out = tokio::io::stdout();
        out.write_all(format!("echo {addr}\n").as_bytes()).await?;
        out.flush().await?;
        let mut lines = BufReader::new(tokio::io::stdin()).lines();
        while let Some(line) = lines.next_line().await? {
            if line.trim() == "open?" {
                let count = open.load(Ordering::SeqCst);
                out.write_all(format!("{count}\n").as_bytes()).await?;
                out.flush().await?;
            }
        }
        Ok(())
    })
}

/// The bench's side: a running echo child; killed when dropped.
pub struct EchoProcess {
    pub addr: SocketAddr,
    _child: Child,
    stdin: ChildStdin,
    stdout: Lines<BufReader<ChildStdout>>,
}

impl EchoProcess {
    /// Starts the child and reads its address.
    pub async fn start() -> anyhow::Result<EchoProcess> {
        let exe = std::env::current_exe().context("cannot find the bench's own executable")?;
        let mut child = Command::new(exe)
            .arg(FLAG)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("cannot start the echo child process")?;
        let stdin = child.stdin.take().context("no stdin pipe")?;
        let stdout = child.stdout.take().context("no stdout pipe")?;
        let mut stdout = BufReader::new(stdout).lines();
        let line = answer(&mut stdout).await?;
        let addr = line
            .strip_prefix("echo ")
            .and_then(|a| a.parse().ok())
            .with_context(|| format!("the echo child printed `{line}`, not `echo ADDR`"))?;
        Ok(EchoProcess {
            addr,
            _child: child,
            stdin,
            stdout,
        })
    }

    /// Echo connections open in the child right now.
    pub async fn open(&mut self) -> anyhow::Result<usize> {
        self.stdin
            .write_all(b"open?\n")
            .await
            .context("the echo child is gone")?;
        let line = answer(&mut self.stdout).await?;
        line.parse()
            .with_context(|| format!("the echo child answered `{line}`, not a count"))
    }
}

async fn answer(stdout: &mut Lines<BufReader<ChildStdout>>) -> anyhow::Result<String> {
    match tokio::time::timeout(ANSWER_LIMIT, stdout.next_line()).await {
        Ok(Ok(Some(line))) => Ok(line),
        Ok(Ok(None)) => bail!("the echo child exited"),
        Ok(Err(e)) => bail!("cannot read from the echo child: {e}"),
        Err(_) => bail!("the echo child did not answer within {ANSWER_LIMIT:?}"),
    }
}
