//! Unix socket paths as public endpoints: which paths a grant allows (`paths =
//! ["/run/burrow/*.sock"]`) and which paths may be asked for at all.
//!
//! A pattern is an absolute path in which `*` stands for any run of characters other than
//! `/` and `?` for one such character; everything else is literal. So `*` never crosses a
//! directory, and a path asked for must be absolute and plain (no `.` or `..` component, no
//! empty one, no NUL), so no spelling of a path reaches outside what the pattern names.
//! Written by hand: the grammar is two wildcards, and a glob crate's richer syntax (`**`,
//! classes, braces) would only widen what an operator's pattern grants by surprise.

use std::fmt;
use std::path::{Component, Path};

/// Longest path a unix socket address holds (`sun_path` is 108 bytes with its NUL).
pub const MAX_SOCKET_PATH: usize = 107;

/// A pattern of unix socket paths one agent may ask for as public endpoints.
#[derive(Clone, PartialEq, Eq)]
pub struct PathPattern(String);

impl PathPattern {
    /// Parses a pattern: an absolute path, each component plain, `*` and `?` allowed.
    pub fn parse(s: &str) -> Result<PathPattern, String> {
        let bad = |why: &str| {
            format!("{s:?} is not a socket path pattern: {why} (e.g. \"/run/burrow/*.sock\")")
        };
        if !s.starts_with('/') {
            return Err(bad("it must be absolute"));
        }
        if s.len() > MAX_SOCKET_PATH {
            return Err(bad(&format!(
                "longer than the {MAX_SOCKET_PATH} bytes a socket path may have"
            )));
        }
        plain_components(s).map_err(|why| bad(&why))?;
        if s.ends_with('/') {
            return Err(bad(
                "it names a directory; add the file part, as in /run/burrow/*.sock",
            ));
        }
        Ok(PathPattern(s.to_string()))
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `path` matches.
    pub fn matches(&self, path: &str) -> bool {
        glob(self.0.as_bytes(), path.as_bytes())
    }
}

impl fmt::Display for PathPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for PathPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PathPattern({})", self.0)
    }
}

/// Checks a path asked for as a public endpoint: absolute, plain, short enough for a socket
/// address, and free of wildcards.
pub fn check_socket_path(p: &Path) -> Result<(), String> {
    let s = p.to_str().ok_or_else(|| {
        format!(
            "the socket path {} is not UTF-8: use a plain path",
            p.display()
        )
    })?;
    let bad = |why: &str| format!("the socket path {s:?} {why}");
    if !s.starts_with('/') {
        return Err(bad(
            "is relative: a public socket is a path on the gateway, so write it absolute \
             (e.g. unix:/run/burrow/app.sock)",
        ));
    }
    if s.len() > MAX_SOCKET_PATH {
        return Err(bad(&format!(
            "is longer than the {MAX_SOCKET_PATH} bytes a socket path may have"
        )));
    }
    if s.contains(['*', '?']) {
        return Err(bad("has a wildcard: name one socket"));
    }
    if s.ends_with('/') {
        return Err(bad("names a directory"));
    }
    plain_components(s).map_err(|why| bad(&why))
}

/// Each component of `s` is a plain name: no `.`, `..`, empty components or NUL.
fn plain_components(s: &str) -> Result<(), String> {
    if s.contains('\0') {
        return Err("has a NUL byte".into());
    }
    if s.contains("//") {
        return Err("has an empty component (`//`)".into());
    }
    for c in Path::new(s).components() {
        match c {
            Component::RootDir | Component::Normal(_) => {}
            _ => return Err("has a `.` or `..` component: write the plain path".into()),
        }
    }
    // `Path::components` drops a trailing `/.`; look at the text too.
    if s.split('/').any(|c| c == "." || c == "..") {
        return Err("has a `.` or `..` component: write the plain path".into());
    }
    Ok(())
}

/// `*` matches any run of bytes other than `/`, `?` one such byte; the rest is literal.
fn glob(pattern: &[u8], text: &[u8]) -> bool {
    // Iterative matching with one backtrack point per `*` (the classic wildcard algorithm):
    // linear in practice, never exponential.
    let (mut p, mut t) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        match pattern.get(p) {
            Some(b'*') => {
                star = Some((p, t));
                p += 1;
                continue;
            }
            Some(b'?') if text[t] != b'/' => {
                p += 1;
                t += 1;
                continue;
            }
            Some(&c) if c == text[t] && c != b'*' && c != b'?' => {
                p += 1;
                t += 1;
                continue;
            }
            _ => {}
        }
        // Mismatch: let the last `*` take one more byte, unless that byte is a `/`.
        match star {
            Some((sp, st)) if text[st] != b'/' => {
                star = Some((sp, st + 1));
                p = sp + 1;
                t = st + 1;
            }
            _ => return false,
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

/// The first of `patterns` that `path` matches.
pub fn granted<'a>(patterns: &'a [PathPattern], path: &str) -> Option<&'a PathPattern> {
    patterns.iter().find(|p| p.matches(path))
}

/// The patterns as a list for messages (`none` when there are none).
pub fn describe(patterns: &[PathPattern]) -> String {
    if patterns.is_empty() {
        "none".into()
    } else {
        patterns
            .iter()
            .map(PathPattern::as_str)
            .collect::<Vec<_>>()
            .join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pat(s: &str) -> PathPattern {
        PathPattern::parse(s).expect("a pattern")
    }

    #[test]
    fn star_stays_inside_one_directory() {
        let p = pat("/run/burrow/*.sock");
        assert!(p.matches("/run/burrow/docker.sock"));
        assert!(p.matches("/run/burrow/.sock"));
        assert!(!p.matches("/run/burrow/a/b.sock"), "`*` crosses no `/`");
        assert!(!p.matches("/run/burrow/docker.sock2"));
        assert!(!p.matches("/run/burrow2/docker.sock"));
        assert!(!p.matches("/run/burrow/docker"));
        let q = pat("/run/*/app-?.sock");
        assert!(q.matches("/run/x/app-1.sock"));
        assert!(!q.matches("/run/x/app-12.sock"));
        assert!(!q.matches("/run/x/y/app-1.sock"));
        assert!(pat("/tmp/exact.sock").matches("/tmp/exact.sock"));
        assert!(!pat("/tmp/exact.sock").matches("/tmp/exact.soc"));
        assert!(pat("/tmp/*").matches("/tmp/anything"));
        assert!(!pat("/tmp/*").matches("/tmp/a/b"));
        assert!(pat("/tmp/*a*b*").matches("/tmp/xxaxxbxx"));
        assert!(!pat("/tmp/*a*b*").matches("/tmp/xxbxxaxx"));
    }

    #[test]
    fn patterns_and_paths_must_be_plain_and_absolute() {
        for bad in [
            "run/*.sock",
            "/run/../etc/*.sock",
            "/run//x.sock",
            "/run/./x",
            "/run/",
        ] {
            assert!(PathPattern::parse(bad).is_err(), "{bad}");
        }
        for bad in [
            "x.sock",
            "/run/burrow/../x.sock",
            "/run/burrow/./x.sock",
            "/run//x.sock",
            "/run/burrow/*.sock",
            "/run/burrow/",
        ] {
            assert!(check_socket_path(Path::new(bad)).is_err(), "{bad}");
        }
        let long = format!("/{}", "a".repeat(MAX_SOCKET_PATH));
        assert!(check_socket_path(Path::new(&long)).is_err());
        check_socket_path(Path::new("/run/burrow/docker.sock")).expect("plain");
    }
}
