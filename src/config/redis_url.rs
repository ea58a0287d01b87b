//! `redis.url`: the scheme picks the topology and whether TLS is used, the userinfo gives the
//! credentials, the path the database (or, for Sentinel, the service name).
//!
//! ```text
//! redis://[user[:password]@]host[:6379][/db]              rediss://...  (TLS)
//! redis-sentinel://[user[:password]@]host[:26379][,host[:26379]...]/service[/db]   rediss-sentinel://
//! redis-cluster://[user[:password]@]host[:6379][,host[:6379]...]                    rediss-cluster://
//! ```
//!
//! The credentials are the Redis server's (for Sentinel: the master's and replicas'); Sentinel's
//! own credentials, if it has any, come from the environment (see `validate`).

/// One server (or Sentinel) address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisNode {
    /// Host name or IP address (IPv6 without brackets).
    pub host: String,
    /// TCP port.
    pub port: u16,
}

impl std::fmt::Display for RedisNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// How the Redis deployment is reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisTopology {
    /// One server.
    Standalone(RedisNode),
    /// The current master of `service`, as the Sentinels report it; followed across failovers.
    Sentinel {
        /// The monitored master's name (`sentinel monitor <name> ...`).
        service: String,
        /// The Sentinels to ask.
        sentinels: Vec<RedisNode>,
    },
    /// A Redis Cluster: the seeds are asked for the slot map, which names every node.
    Cluster {
        /// Where discovery starts.
        seeds: Vec<RedisNode>,
    },
}

impl RedisTopology {
    /// `standalone`, `sentinel` or `cluster`: the `mode` in `/status` and the metrics.
    pub fn mode(&self) -> &'static str {
        match self {
            Self::Standalone(_) => "standalone",
            Self::Sentinel { .. } => "sentinel",
            Self::Cluster { .. } => "cluster",
        }
    }
}

/// A parsed `redis.url`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisUrl {
    /// Where the servers are.
    pub topology: RedisTopology,
    /// `rediss*://`: connect with TLS.
    pub tls: bool,
    /// ACL user name (Redis 6+).
    pub username: Option<String>,
    /// Password (`AUTH`).
    pub password: Option<String>,
    /// `SELECT`ed database; never set for a cluster (it only has database 0).
    pub database: Option<u8>,
}

const SCHEMES: [&str; 6] = ["redis", "rediss", "redis-sentinel", "rediss-sentinel", "redis-cluster", "rediss-cluster"];

/// Parse a Redis URL; the error says what is wrong (the caller adds the field and the value).
pub fn parse(url: &str) -> Result<RedisUrl, String> {
    let (scheme, rest) = url.split_once("://").ok_or("is not a URL (example: \"redis://127.0.0.1:6379/0\")")?;
    if !SCHEMES.contains(&scheme) {
        return Err(format!("has scheme {scheme:?}; expected one of {}", SCHEMES.join(", ")));
    }
    if rest.contains(['?', '#']) {
        return Err("has query parameters; TLS, timeouts and Sentinel credentials are [redis] settings".into());
    }
    let tls = scheme.starts_with("rediss");
    let kind = scheme.split_once('-').map_or("", |(_, k)| k);
    let (userinfo, after) = match rest.rsplit_once('@') {
        Some((userinfo, after)) => (Some(userinfo), after),
        None => (None, rest),
    };
    let (hosts, path) = after.split_once('/').map_or((after, ""), |(h, p)| (h, p));
    let default_port = if kind == "sentinel" { 26379 } else { 6379 };
    let nodes = hosts.split(',').map(|h| parse_node(h, default_port)).collect::<Result<Vec<_>, _>>()?;
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();

    let (topology, database) = match kind {
        "sentinel" => {
            let (service, db) = match segments.as_slice() {
                [service] => (service, None),
                [service, db] => (service, Some(parse_db(db)?)),
                _ => {
                    return Err(
                        "needs the master's service name as its path: redis-sentinel://host:26379/mymaster".into()
                    )
                }
            };
            (RedisTopology::Sentinel { service: service.to_string(), sentinels: nodes }, db)
        }
        "cluster" => {
            if !matches!(segments.as_slice(), [] | ["0"]) {
                return Err("has a database; a Redis Cluster only has database 0".into());
            }
            (RedisTopology::Cluster { seeds: nodes }, None)
        }
        _ => {
            let [node] = <[RedisNode; 1]>::try_from(nodes)
                .map_err(|_| "names several hosts; use redis-sentinel:// or redis-cluster:// for those")?;
            let db = match segments.as_slice() {
                [] => None,
                [db] => Some(parse_db(db)?),
                _ => return Err("has a path that is not a database number".into()),
            };
            (RedisTopology::Standalone(node), db)
        }
    };
    let (username, password) = match userinfo {
        None => (None, None),
        Some(info) => {
            let (user, password) = info.split_once(':').map_or((info, None), |(u, p)| (u, Some(p)));
            (non_empty(percent_decode(user)?), password.map(percent_decode).transpose()?.and_then(non_empty))
        }
    };
    Ok(RedisUrl { topology, tls, username, password, database })
}

fn parse_node(s: &str, default_port: u16) -> Result<RedisNode, String> {
    let (host, port) = if let Some(v6) = s.strip_prefix('[') {
        let (host, after) = v6.split_once(']').ok_or("has an IPv6 address without its closing ]")?;
        (host, after.strip_prefix(':'))
    } else {
        match s.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (s, None),
        }
    };
    if host.is_empty() || host.contains(['/', '@', ' ']) {
        return Err("has an empty or malformed host".into());
    }
    if host.contains(':') && !s.starts_with('[') {
        return Err("has an IPv6 address without brackets: [::1]:6379".into());
    }
    let port = match port {
        None => default_port,
        Some(p) => p.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(|| format!("has a bad port {p:?}"))?,
    };
    Ok(RedisNode { host: host.to_string(), port })
}

fn parse_db(s: &str) -> Result<u8, String> {
    s.parse::<u8>().map_err(|_| format!("has database {s:?}; expected a number from 0 to 255"))
}

fn non_empty(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

/// `%XX` escapes of the userinfo (a password may hold `@`, `:` or `/` that way).
fn percent_decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3).and_then(|h| u8::from_str_radix(h, 16).ok());
            out.push(hex.ok_or("has a bad %-escape in its credentials")?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "has credentials that are not UTF-8".to_string())
}

/// The URL with any password replaced, for logs, `--check` and `/status`.
pub fn redact(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) if rest.contains('@') => {
            let (userinfo, hosts) = rest.rsplit_once('@').unwrap_or(("", rest));
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{scheme}://{user}:***@{hosts}")
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(host: &str, port: u16) -> RedisNode {
        RedisNode { host: host.into(), port }
    }

    #[test]
    fn standalone() {
        let u = parse("redis://127.0.0.1:6379/0").unwrap();
        assert_eq!(u.topology, RedisTopology::Standalone(node("127.0.0.1", 6379)));
        assert_eq!((u.tls, u.database, u.username, u.password), (false, Some(0), None, None));
        let u = parse("rediss://app:s%40cr%3At@redis.example").unwrap();
        assert_eq!(u.topology, RedisTopology::Standalone(node("redis.example", 6379)));
        assert_eq!((u.tls, u.username.as_deref(), u.password.as_deref()), (true, Some("app"), Some("s@cr:t")));
        let u = parse("redis://:only-password@[::1]:7000/").unwrap();
        assert_eq!(u.topology, RedisTopology::Standalone(node("::1", 7000)));
        assert_eq!((u.username, u.password.as_deref(), u.database), (None, Some("only-password"), None));
        assert_eq!(node("::1", 7000).to_string(), "[::1]:7000");
    }

    #[test]
    fn sentinel_and_cluster() {
        let u = parse("redis-sentinel://a:26380,b/mymaster/2").unwrap();
        let sentinels = vec![node("a", 26380), node("b", 26379)];
        assert_eq!(u.topology, RedisTopology::Sentinel { service: "mymaster".into(), sentinels });
        assert_eq!((u.database, u.topology.mode()), (Some(2), "sentinel"));
        let u = parse("rediss-cluster://u:p@a:7000,b:7001").unwrap();
        assert_eq!(u.topology, RedisTopology::Cluster { seeds: vec![node("a", 7000), node("b", 7001)] });
        assert_eq!((u.tls, u.topology.mode(), u.password.as_deref()), (true, "cluster", Some("p")));
    }

    #[test]
    fn rejects_with_a_reason() {
        for (bad, why) in [
            ("localhost:6379", "is not a URL"),
            ("http://x", "has scheme"),
            ("redis://", "malformed host"),
            ("redis://a,b", "several hosts"),
            ("redis://a:0", "bad port"),
            ("redis://a:x", "bad port"),
            ("redis://a/300", "database"),
            ("redis://a/0/1", "path"),
            ("redis://a?ssl=true", "query"),
            ("redis-sentinel://a:26379", "service name"),
            ("redis-cluster://a,,b", "malformed host"),
            ("redis-cluster://a/1", "database 0"),
            ("redis://u:%zz@a", "%-escape"),
            ("redis://[::1:6379", "IPv6"),
            ("redis://::1", "brackets"),
        ] {
            let err = parse(bad).expect_err(bad);
            assert!(err.contains(why), "{bad}: {err}");
        }
    }

    #[test]
    fn redaction() {
        assert_eq!(redact("rediss://user:secret@h:6380/0"), "rediss://user:***@h:6380/0");
        assert_eq!(redact("redis://h:6379"), "redis://h:6379");
    }
}
