//! Compiled path patterns and path normalization: what a route matches.
//!
//! Patterns are `/exact/path`, `{param}` segments that match one non-empty segment, and a trailing
//! `/*` that matches the prefix itself and everything below it. Matching runs on a normalized path
//! (see [`normalize`]) so that `//login`, `/a/../login` or `/login;jsessionid=x` cannot dodge a
//! route's rate limit, and, unless the route says otherwise, a trailing slash matches the same
//! route; the request itself is forwarded unchanged.

use std::borrow::Cow;

/// A compiled path pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    source: String,
    segments: Vec<Segment>,
    prefix: bool,
    /// `/login/` matches `/login` (`route.trailing_slash = "same"`).
    trailing_slash_same: bool,
    /// Literal segments match whatever the case of their ASCII letters (`route.case_insensitive`).
    case_insensitive: bool,
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
        Ok(Pattern { source: s.to_string(), segments, prefix, trailing_slash_same: true, case_insensitive: false })
    }

    /// How a path is compared: whether a trailing slash matches the same route (the default), and
    /// whether letters' case is ignored (not by default).
    pub fn matching(mut self, trailing_slash_same: bool, case_insensitive: bool) -> Pattern {
        self.trailing_slash_same = trailing_slash_same;
        self.case_insensitive = case_insensitive;
        self
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// Whether a normalized path matches.
    pub fn matches(&self, path: &str) -> bool {
        let Some(mut rest) = path.strip_prefix('/') else { return false };
        if self.trailing_slash_same {
            rest = rest.strip_suffix('/').unwrap_or(rest);
        }
        if self.segments.is_empty() {
            return self.prefix || rest.is_empty();
        }
        let mut parts = rest.split('/');
        for seg in &self.segments {
            match (seg, parts.next()) {
                (Segment::Literal(lit), Some(part))
                    if lit == part || (self.case_insensitive && lit.eq_ignore_ascii_case(part)) => {}
                (Segment::Param, Some(part)) if !part.is_empty() => {}
                _ => return false,
            }
        }
        // Exact patterns need the path to end here; prefix patterns accept anything below.
        self.prefix || parts.next().is_none()
    }
}

/// Normalize a request path for matching, the way the backends behind it may read it:
/// unreserved `%XX` decoded (RFC 3986 6.2.2.2), and so are `%2F` and `%5C` (a WSGI server or an
/// nginx in front decodes them) and IIS's `%u00XX` forms of these; `\` read as `/` (IIS);
/// `;params` cut from each segment (Tomcat, Jetty, Spring: `/login;jsessionid=x` is `/login`,
/// `/a/..;/b` is `/b`); dot segments resolved (RFC 3986 5.2.4) and duplicate slashes
/// collapsed. A trailing slash stays: the route decides. Allocates only when there is work to do.
pub fn normalize(path: &str) -> Cow<'_, str> {
    let bytes = path.as_bytes();
    let needs_work = bytes.iter().enumerate().any(|(i, &b)| {
        matches!(b, b'%' | b';' | b'\\') || (b == b'/' && matches!(bytes.get(i + 1), Some(b'/' | b'.')))
    });
    if !needs_work {
        return Cow::Borrowed(path);
    }
    let decoded = decode_unreserved(path).replace('\\', "/");
    let mut out: Vec<&str> = Vec::new();
    let mut trailing = false;
    for seg in decoded.split('/') {
        let seg = seg.split_once(';').map_or(seg, |(name, _params)| name);
        trailing = matches!(seg, "" | "." | "..");
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

/// Whether a path is already in normal form: one that is not could name, on the backend, another
/// resource than the route it matched ([`normalize`] reads it like the most lenient backend).
pub fn is_normal(path: &str) -> bool {
    normalize(path) == path
}

/// `%XX` (and IIS's `%u00XX`) of unreserved characters, `/` and `\` decoded, once (a backend
/// decodes once: `%2561` is `%61`).
fn decode_unreserved(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    let mut rest = path;
    while let Some(at) = rest.find('%') {
        out.push_str(&rest[..at]);
        let hex = |from: usize, len: usize| {
            rest.get(at + from..at + from + len)
                .filter(|h| h.bytes().all(|b| b.is_ascii_hexdigit()))
                .and_then(|h| u32::from_str_radix(h, 16).ok())
        };
        let decoded = match rest.as_bytes().get(at + 1) {
            Some(b'u' | b'U') => hex(2, 4).map(|c| (c, 6)),
            _ => hex(1, 2).map(|c| (c, 3)),
        };
        let decoded = decoded
            .and_then(|(c, len)| Some((u8::try_from(c).ok()?, len)))
            .filter(|(b, _)| b.is_ascii_alphanumeric() || b"-._~/\\".contains(b));
        match decoded {
            Some((b, len)) => {
                out.push(char::from(b));
                rest = &rest[at + len..];
            }
            None => {
                out.push('%');
                rest = &rest[at + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(pattern: &str, path: &str) -> bool {
        Pattern::parse(pattern).unwrap().matches(&normalize(path))
    }

    fn distinct(pattern: &str, path: &str) -> bool {
        Pattern::parse(pattern).unwrap().matching(false, false).matches(&normalize(path))
    }

    fn any_case(pattern: &str, path: &str) -> bool {
        Pattern::parse(pattern).unwrap().matching(true, true).matches(&normalize(path))
    }

    #[test]
    fn exact() {
        assert!(m("/health", "/health"));
        assert!(m("/health", "/health/"), "a trailing slash is the same route by default");
        assert!(!distinct("/health", "/health/"));
        assert!(distinct("/health", "/health"));
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
        assert!(m("/users/{id}", "/users/42/"));
        assert!(!distinct("/users/{id}", "/users/42/"));
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
        // Servers in front of WSGI apps, and IIS, decode these before routing.
        for encoded in ["/x%2F..%2Flogin", "/x%5c..%5clogin", "/%u006Cogin", "/x%u002f..%U005Clogin"] {
            assert!(m("/login", encoded), "{encoded}");
        }
        // What the review got through a POST /login route.
        for dodge in ["/login/", "/login;jsessionid=x", "/login/.", "/login/;x", "/a/..;/login", "/login\\", "\\login"]
        {
            assert!(m("/login", dodge), "{dodge}");
        }
        assert!(!m("/login", "/Login"));
        assert!(any_case("/login", "/Login") && any_case("/login", "/LOGIN/") && any_case("/api/*", "/API/x"));
        assert!(!any_case("/login", "/logins"));
        assert!(m("/users/{id}", "/users/42;v=1"));
        assert!(!m("/users/{id}", "/users/;v=1"), "a segment that is only params is empty");
        assert_eq!(normalize("/a;x/b;y=1,2/c"), "/a/b/c");
        assert_eq!(normalize("/a/b;x/..;y"), "/a/");
        assert_eq!(normalize("/plain/path"), Cow::Borrowed("/plain/path"));
        assert_eq!(normalize("/a/b/.."), "/a/");
        assert_eq!(normalize("/a%"), "/a%");
        // Found by fuzzing: non-ASCII was read byte by byte as Latin-1 (`ю` became `Ñ\u{8e}`).
        assert_eq!(normalize("/.-%//-a(юz/"), "/.-%/-a(юz/");
        assert_eq!(normalize("/%D1%8E/%25%36%31"), "/%D1%8E/%2561", "decoded once, unreserved only");
        assert_eq!(normalize("/%u0041%u00e9%u"), "/A%u00e9%u");
        assert!(is_normal("/api/models/7") && is_normal("/a%20b") && is_normal("/login/"));
        assert!(!is_normal("/api/x/..%2F..%2Fadmin") && !is_normal("/a;p") && !is_normal("//a"));
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
