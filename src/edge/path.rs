//! Request path normalisation for routing and access decisions, so that
//! `/socket.io/../x`, `//socket.io/`, percent-encoding and backslashes cannot make a
//! protected path look like another one.
//!
//! Pure functions. The request itself is forwarded with its original path; only
//! corral's own decisions use the normalised form.

use std::borrow::Cow;

/// The path as corral judges it: percent-decoded once (`%2F` included), `\` read as
/// `/`, empty and `.` segments dropped, `..` resolved (never above the root). `None`
/// for a path no decision should be made on (a NUL byte, or not UTF-8 once decoded).
pub fn normalise(raw: &str) -> Option<Cow<'_, str>> {
    if is_plain(raw) {
        return Some(Cow::Borrowed(raw));
    }
    normalise_slow(raw).map(Cow::Owned)
}

/// Already normal (the usual request, which then needs no copy): starts with '/', no
/// escapes, backslashes or NULs, no empty (but a trailing one), `.` or `..` segments.
fn is_plain(raw: &str) -> bool {
    let b = raw.as_bytes();
    if b.first() != Some(&b'/') || b.iter().any(|c| matches!(c, b'%' | b'\\' | 0)) {
        return false;
    }
    let rest = &raw[1..];
    if rest.is_empty() {
        return true;
    }
    let mut segments = rest.split('/').peekable();
    while let Some(seg) = segments.next() {
        let last = segments.peek().is_none();
        if seg == "." || seg == ".." || (seg.is_empty() && !last) {
            return false;
        }
    }
    true
}

fn normalise_slow(raw: &str) -> Option<String> {
    let decoded = percent_decode(raw.as_bytes());
    if decoded.contains(&0) {
        return None;
    }
    let text = String::from_utf8(decoded).ok()?.replace('\\', "/");
    let mut segments: Vec<&str> = Vec::new();
    let mut trailing = false;
    for seg in text.split('/') {
        trailing = false;
        match seg {
            "" => trailing = true,
            "." => trailing = true,
            ".." => {
                segments.pop();
                trailing = true;
            }
            s => segments.push(s),
        }
    }
    let mut out = String::with_capacity(text.len() + 1);
    for s in &segments {
        out.push('/');
        out.push_str(s);
    }
    if trailing || out.is_empty() {
        out.push('/');
    }
    Some(out)
}

/// Percent-decoded once; an invalid escape stays as it is.
fn percent_decode(b: &[u8]) -> Vec<u8> {
    percent_encoding::percent_decode(b).collect()
}

/// Whether `path` (normalised) is `prefix` or below it, segment-wise: `/health`
/// covers `/health` and `/health/x`, not `/healthz`.
pub fn under(path: &str, prefix: &str) -> bool {
    let p = prefix.trim_end_matches('/');
    if p.is_empty() {
        return true;
    }
    path == p
        || path
            .strip_prefix(p)
            .is_some_and(|rest| rest.starts_with('/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalises_tricks() {
        for (raw, want) in [
            ("/", "/"),
            ("", "/"),
            ("/socket.io/", "/socket.io/"),
            ("//socket.io/", "/socket.io/"),
            ("/x/../socket.io/", "/socket.io/"),
            ("/health/../socket.io", "/socket.io"),
            ("/health/..%2fsocket.io", "/socket.io"),
            ("/health%2F..%2Fsocket.io", "/socket.io"),
            ("/%2e%2e/%2E%2E/socket.io", "/socket.io"),
            ("/health\\..\\socket.io", "/socket.io"),
            ("/a/./b/.", "/a/b/"),
            ("/../../etc/passwd", "/etc/passwd"),
            ("/a/b/..", "/a/"),
            ("/%zz", "/%zz"),
            ("/%", "/%"),
            ("/%252e%252e/x", "/%2e%2e/x"),
        ] {
            assert_eq!(normalise(raw).as_deref(), Some(want), "{raw}");
        }
        assert_eq!(normalise("/a%00b"), None);
        assert_eq!(normalise("/%ff"), None);
    }

    #[test]
    fn fast_path_agrees_with_slow_path() {
        for raw in [
            "/",
            "/a",
            "/a/",
            "/a/b",
            "/a/b/",
            "//a",
            "/a//b",
            "/a/./b",
            "/a/..",
            "/.",
            "/..",
            "/a.b/c..d/.e",
            "/socket.io/",
            "/x/.../y",
        ] {
            assert_eq!(
                normalise(raw).map(Cow::into_owned),
                normalise_slow(raw),
                "{raw}"
            );
        }
        assert!(matches!(normalise("/a/b/"), Some(Cow::Borrowed(_))));
        assert!(matches!(normalise("/a//b"), Some(Cow::Owned(_))));
    }

    #[test]
    fn prefix_is_segment_wise() {
        assert!(under("/health", "/health"));
        assert!(under("/health/deep", "/health/"));
        assert!(!under("/healthz", "/health"));
        assert!(!under("/socket.io/", "/health"));
        assert!(under("/anything", "/"));
    }
}
