//! `burrow keygen`: a new agent key and its hash, or the hash of an existing key.

use std::io::Read as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use burrow::config;
use burrow::proto::auth::SecretKey;

use crate::run;

/// Flags of `burrow keygen`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Print only the key hash of an existing key: KEY itself, or `-` (or nothing) to read it
    /// from standard input, which keeps it out of shell history
    #[arg(
        long,
        value_name = "KEY|-",
        num_args = 0..=1,
        default_missing_value = "-",
        conflicts_with = "hash_file"
    )]
    hash: Option<String>,

    /// Print only the key hash of the key in FILE: a file holding just the key (such as the
    /// gateway's agent.key) or an agent config file with `key = ...`
    #[arg(long, value_name = "FILE")]
    hash_file: Option<PathBuf>,
}

/// Runs `burrow keygen`.
pub fn main(args: Args) -> anyhow::Result<()> {
    let key = match (args.hash, args.hash_file) {
        (Some(key), _) if key == "-" => {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .context("cannot read the key from standard input")?;
            parse(&text).context("the key on standard input")?
        }
        (Some(key), _) => parse(&key).context("--hash")?,
        (None, Some(file)) => from_file(&file)?,
        (None, None) => {
            let key = SecretKey::generate();
            return run::print(&format!("key: {}\nkey_hash: {}", key.expose(), key.hash()));
        }
    };
    run::print(&format!("key_hash: {}", key.hash()))
}

/// A key on its own (surrounding white space ignored). The error never repeats the text.
fn parse(text: &str) -> anyhow::Result<SecretKey> {
    Ok(SecretKey::parse(text.trim())?)
}

/// The key in `file`: the file's whole text, or the `key` of an agent config file.
fn from_file(file: &Path) -> anyhow::Result<SecretKey> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    if let Ok(key) = parse(&text) {
        return Ok(key);
    }
    match config::parse_agent_file(file, &text) {
        Ok(settings) => match settings.key {
            Some(key) => Ok(key),
            None => bail!("{} is an agent config file without `key`", file.display()),
        },
        // Text that looks like a key but is not one: say so, not what TOML makes of it.
        Err(_) if text.trim_start().starts_with("bk_") => {
            bail!(
                "{}: not a burrow key: expected `bk_` followed by 43 base64url characters",
                file.display()
            )
        }
        Err(e) => bail!(
            "{} holds neither a key (bk_...) nor an agent config file with `key`: {e}",
            file.display()
        ),
    }
}
