//! Compiled path patterns and path normalization: what a route matches.
//!
//! Patterns are `/exact/path`, `{param}` segments that match one non-empty segment, and a trailing
//! `/*` that matches the prefix itself and everything below it. Matching runs on a normalized path
//! (duplicate slashes collapsed, `.`/`..` resolved, unreserved `%XX` decoded) so that `//login` or
//! `/a/../login` cannot dodge a route's rate limit; the request itself is forwarded unchanged.

use std::borrow::Cow;

/// A compiled path pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    source: String,
    segments: Vec<Segment>,
    prefix: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    Param,
}

impl Pattern {
    /// Compile a pattern, or say why it is invalid.
    pub fn parse(s: &str) -> Result<Pattern, String> {
        if !s.starts_with('/') {
            return Err("must start with /".into());
        }
        let (body, prefix) = match s.strip_suffix("/*") {
            Some(body) => (body, true),
            None => (s, false),
        };
        let mut segments = Vec::new();
        // "/" and "/*" have no segments; otherwise every segment between slashes must be non-empty.
        if !body.is_empty() && body != "/" {
            for seg in body[1..].split('/') {
                segments.push(match seg {
                    "" => return Err("has an empty segment (//)".into()),
                    "." | ".." => return Err("must not contain . or .. segments".into()),
                    s if s.contains('*') => return Err("may only use * as the whole last segment (/prefix/*)".into()),
                    s if s.starts_with('{') && s.ends_with('}') && s.len() > 2 => {
                        let name = &s[1..s.len() - 1];
                        if !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                            return Err(format!("has an invalid parameter name {name:?}"));
                        }
                        Segment::Param
                    }
                    s if s.contains(['{', '}']) => return Err("must use {name} as a whole segment".into()),
                    s if s.contains(['?', '#', ' ']) => return Err("must be a path without query or spaces".into()),
                    s => Segment::Literal(s.to_string()),
                });
            }
        } else if body == "/" && prefix {
            return Err("has an empty segment (//)".into());
        }
        Ok(Pattern { source: s.to_string(), segments, prefix })
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// Whether a normalized path matches.
    pub fn matches(&self, path: &str) -> bool {
        let rest = match path.strip_prefix('/') {
            Some(rest) => rest,
            None => return false,
        };
        if self.segments.is_empty() {
            return self.prefix || rest.is_empty();
        }
        let mut parts = rest.split('/');
        for seg in &self.segments {
            match (seg, parts.next()) {
                (Segment::Literal(lit), Some(part)) if lit == part => {}
                (Segment::Param, Some(part)) if !part.is_empty() => {}
                _ => return false,
            }
        }
        // Exact patterns need the path to end here; prefix patterns accept anything below.
        self.prefix || parts.next().is_none()
    }
}

/// Normalize a request path for matching (RFC 3986 5.2.4 dot segments, 6.2.2.2 percent-encoding
/// of unreserved characters) and collapse duplicate slashes. Allocates only when needed.
pub fn normalize(path: &str) -> Cow<'_, str> {
    let needs_work = path.contains("//") || path.contains("/.") || path.contains('%');
    if !needs_work {
        return Cow::Borrowed(path);
    }
    let decoded = decode_unreserved(path);
    let mut out: Vec<&str> = Vec::new();
    let trailing = decoded.ends_with('/') || decoded.ends_with("/.") || decoded.ends_with("/..");
    for seg in decoded.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s),
        }
    }
    let mut s = String::with_capacity(decoded.len());
    for seg in &out {
        s.push('/');
        s.push_str(seg);
    }
    if trailing || out.is_empty() {
        s.push('/');
    }
    Cow::Owned(s)
}

fn decode_unreserved(path: &str) -> String {
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok().and_then(|h| u8::from_str_radix(h, 16).ok());
            if let Some(b) = hex.filter(|b| b.is_ascii_alphanumeric() || b"-._~".contains(b)) {
                out.push(b as char);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i] as char);
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(pattern: &str, path: &str) -> bool {
        Pattern::parse(pattern).unwrap().matches(&normalize(path))
    }

    #[test]
    fn exact() {
        assert!(m("/health", "/health"));
        assert!(!m("/health", "/health/"));
        assert!(!m("/health", "/healthz"));
        assert!(!m("/health", "/"));
        assert!(m("/", "/"));
        assert!(!m("/", "/a"));
    }

    #[test]
    fn prefix() {
        assert!(m("/api/models/*", "/api/models"));
        assert!(m("/api/models/*", "/api/models/"));
        assert!(m("/api/models/*", "/api/models/7/versions"));
        assert!(!m("/api/models/*", "/api/modelsx"));
        assert!(!m("/api/models/*", "/api"));
        assert!(m("/*", "/"));
        assert!(m("/*", "/anything/at/all"));
    }

    #[test]
    fn params() {
        assert!(m("/users/{id}", "/users/42"));
        assert!(!m("/users/{id}", "/users/"));
        assert!(!m("/users/{id}", "/users/42/posts"));
        assert!(m("/users/{id}/posts/*", "/users/42/posts/9"));
        assert!(!m("/users/{id}/posts/*", "/users/42/comments"));
    }

    #[test]
    fn normalization_cannot_dodge_a_route() {
        assert!(m("/login", "//login"));
        assert!(m("/login", "/./login"));
        assert!(m("/login", "/x/../login"));
        assert!(m("/login", "/%6Cogin"));
        assert!(m("/login", "/../../login"));
        assert!(!m("/login", "/login%2Fx"), "encoded slash is not a separator");
        assert_eq!(normalize("/plain/path"), Cow::Borrowed("/plain/path"));
        assert_eq!(normalize("/a/b/.."), "/a/");
        assert_eq!(normalize("/a%"), "/a%");
        assert_eq!(normalize("/a%4"), "/a%4");
    }

    #[test]
    fn invalid_patterns() {
        for bad in ["api", "/a//b", "/a/*/b", "/a*", "/a/{}", "/a/{x", "/a/x{y}", "/a/{b-c}", "/a/./b", "/a?x=1", "//*"]
        {
            assert!(Pattern::parse(bad).is_err(), "{bad}");
        }
    }
}
