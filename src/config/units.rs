//! Parsers for the value types of `proxy.toml`: durations, rates, addresses, URLs.
//! Each returns the reason a value is rejected; the caller adds the field and the value.

use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::time::Duration;

use http::Uri;
use ipnet::IpNet;

/// A refill rate: `tokens` every `per` (`"100/1m"`, `"10/s"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Tokens added per period.
    pub tokens: NonZeroU32,
    /// The period.
    pub per: Duration,
}

impl Rate {
    /// Parse `N/DURATION`, where the duration's number may be left out (`10/s` = `10/1s`).
    pub fn parse(s: &str) -> Result<Rate, String> {
        const SHAPE: &str = "is not a rate like \"100/1m\" or \"10/s\"";
        let (n, per) = s.split_once('/').ok_or(SHAPE)?;
        let tokens = n.trim().parse::<u32>().ok().and_then(NonZeroU32::new).ok_or(SHAPE)?;
        let per = per.trim();
        let per = if per.starts_with(|c: char| c.is_ascii_digit()) { per.to_string() } else { format!("1{per}") };
        let per = parse_duration(&per).map_err(|_| SHAPE)?;
        Ok(Rate { tokens, per })
    }
}

/// A positive duration such as `"50ms"`, `"5m"`, `"1h 30m"`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    match parse_duration_or_zero(s)? {
        d if d.is_zero() => Err("must be greater than zero".into()),
        d => Ok(d),
    }
}

/// A duration that may be zero (`"0s"` turns a window off).
pub fn parse_duration_or_zero(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim())
        .map_err(|_| "is not a duration (examples: \"50ms\", \"30s\", \"5m\", \"1h\")".into())
}

/// A socket address such as `"0.0.0.0:8080"` or `"[::]:8080"`.
pub fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    s.parse().map_err(|_| "is not an address with a port (example: \"0.0.0.0:8080\")".into())
}

/// Only for compile-time constant defaults.
pub fn addr(s: &str) -> SocketAddr {
    s.parse().expect("default address constant parses")
}

/// A CIDR network (`"10.0.0.0/8"`) or a single address (`"10.1.2.3"`).
pub fn parse_net(s: &str) -> Result<IpNet, String> {
    s.parse::<IpNet>()
        .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
        .map_err(|_| "is not an IP network (examples: \"10.0.0.0/8\", \"10.1.2.3\")".into())
}

/// `http://` or `https://` with a host, no path beyond `/`, no query, no credentials.
pub fn parse_upstream_url(s: &str) -> Result<Uri, String> {
    let uri: Uri = s.parse().map_err(|e| format!("is not a URL: {e}"))?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        _ => return Err("must start with http:// or https://".into()),
    }
    let authority = uri.authority().ok_or("has no host")?;
    if authority.host().is_empty() {
        return Err("has no host".into());
    }
    if authority.as_str().contains('@') {
        return Err("must not contain credentials".into());
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err("must not have a path or query (requests keep their own path)".into());
    }
    Uri::builder()
        .scheme(uri.scheme_str().unwrap_or("http"))
        .authority(authority.as_str())
        .path_and_query("/")
        .build()
        .map_err(|e| format!("is not a URL: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates() {
        assert_eq!(Rate::parse("100/1m").unwrap().per, Duration::from_secs(60));
        assert_eq!(
            Rate::parse("10/s").unwrap(),
            Rate { tokens: NonZeroU32::new(10).unwrap(), per: Duration::from_secs(1) }
        );
        assert_eq!(Rate::parse("5 / 250ms").unwrap().per, Duration::from_millis(250));
        for bad in ["", "100", "0/1s", "-1/1s", "10/", "10/0s", "x/1s", "10/1x"] {
            assert!(Rate::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("50ms"), Ok(Duration::from_millis(50)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert!(parse_duration("0s").is_err());
        assert_eq!(parse_duration_or_zero("0s"), Ok(Duration::ZERO));
        assert!(parse_duration("5x").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn upstream_urls() {
        assert_eq!(parse_upstream_url("http://127.0.0.1:3000").unwrap().to_string(), "http://127.0.0.1:3000/");
        assert_eq!(parse_upstream_url("https://backend/").unwrap().to_string(), "https://backend/");
        for bad in
            ["ftp://x", "127.0.0.1:3000", "http://", "http://u:p@x", "http://x/base", "http://x/?a=1", "not a url"]
        {
            assert!(parse_upstream_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn networks() {
        assert_eq!(parse_net("10.0.0.0/8").unwrap().to_string(), "10.0.0.0/8");
        assert_eq!(parse_net("10.1.2.3").unwrap().to_string(), "10.1.2.3/32");
        assert_eq!(parse_net("::1").unwrap().to_string(), "::1/128");
        assert!(parse_net("10.0.0.0/33").is_err());
    }
}
