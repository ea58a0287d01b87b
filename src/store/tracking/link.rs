//! The invalidation links: one RESP3 connection per Redis primary that asks for
//! `CLIENT TRACKING ON BCAST` on the tracked prefixes and applies what Redis sends to the
//! [`Shared`] trust state; `PING`s prove it alive. Followed across failovers and topology changes.

use std::collections::HashMap;
use std::sync::Weak;
use std::time::Duration;

use bytes::BytesMut;
use redis_protocol::resp3::decode::complete::decode_bytes_mut;
use redis_protocol::resp3::types::{BytesFrame, Resp3Frame as _};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::{Flush, Node, Shared};
use crate::store::redis::RedisStore;

/// A `PING` is sent on a link this often...
const PING_EVERY: Duration = Duration::from_millis(250);
/// ...and a link whose `PING` goes unanswered this long is lost: the bound on how long a silent
/// break (a partition, a hung server) leaves the tier trusting what it holds.
const PING_TIMEOUT: Duration = Duration::from_millis(750);
/// Connecting and the handshake, each.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Reconnect backoff: from this, doubling up to `RETRY_MAX`.
const RETRY_MIN: Duration = Duration::from_millis(50);
/// See `RETRY_MIN`.
const RETRY_MAX: Duration = Duration::from_secs(1);
/// How often a server that cannot track (no RESP3, no BCAST: Dragonfly, Redis before 6) is asked again.
const UNSUPPORTED_RETRY: Duration = Duration::from_secs(30);
/// A frame larger than this ends the link (invalidation messages are a few key names).
const MAX_FRAME: usize = 64 << 20;
/// How often the set of primaries is compared with fred's view when nothing signals a change.
const TOPOLOGY_EVERY: Duration = Duration::from_secs(1);

/// Follows the primaries fred sends commands to, with one link task each.
pub(super) async fn manage(shared: Weak<Shared>, store: RedisStore) {
    let changed = store.changes();
    let mut links: HashMap<Node, AbortOnDrop> = HashMap::new();
    let mut current: Vec<Node> = Vec::new();
    loop {
        let mut nodes = store.primaries();
        nodes.sort();
        nodes.dedup();
        if nodes != current {
            let Some(s) = shared.upgrade() else { return };
            for gone in current.iter().filter(|n| !nodes.contains(n)) {
                links.remove(gone);
                s.up_gauge(gone).set(0.0);
            }
            if !current.is_empty() || nodes.is_empty() {
                tracing::debug!(client = s.client, from = ?current, to = ?nodes, "redis primaries changed");
            }
            s.want(nodes.clone());
            for node in &nodes {
                if !links.contains_key(node) {
                    s.up_gauge(node).set(0.0);
                    let task = tokio::spawn(link(shared.clone(), node.clone(), store.clone()));
                    links.insert(node.clone(), AbortOnDrop(task));
                }
            }
            current = nodes;
        }
        tokio::select! {
            _ = changed.notified() => {}
            _ = tokio::time::sleep(TOPOLOGY_EVERY) => {}
        }
    }
}

struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// How a link ended.
#[derive(Debug)]
enum Ended {
    /// The server cannot track this way; asking again soon is pointless.
    Unsupported(String),
    /// Anything else: reconnect with backoff. Whether it had been tracking.
    Failed(String, bool),
}

/// One primary's link, kept up for as long as the node is wanted.
async fn link(shared: Weak<Shared>, node: Node, store: RedisStore) {
    let mut delay = RETRY_MIN;
    let mut logged = false;
    loop {
        let ended = run(&shared, &node, &store).await;
        let Some(s) = shared.upgrade() else { return };
        s.tracking(&node, false);
        let wait = match ended {
            Ended::Unsupported(why) => {
                if !logged {
                    tracing::warn!(client = s.client, %node, reason = why, "redis cannot track invalidations (RESP3 and CLIENT TRACKING BCAST need Redis 6 or later; Dragonfly has no BCAST): in-process entries are kept for hot_ttl at most");
                    logged = true;
                }
                UNSUPPORTED_RETRY
            }
            Ended::Failed(why, was_tracking) => {
                if was_tracking {
                    (delay, logged) = (RETRY_MIN, false);
                }
                if !logged {
                    tracing::debug!(client = s.client, %node, reason = why, "redis invalidation link failed; retrying");
                    logged = true;
                }
                let wait = delay;
                delay = (delay * 2).min(RETRY_MAX);
                wait
            }
        };
        drop(s);
        tokio::time::sleep(wait).await;
    }
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Connect, ask for tracking, then apply invalidations until the link breaks or goes silent.
async fn run(shared: &Weak<Shared>, node: &Node, store: &RedisStore) -> Ended {
    let fail = |why: String| Ended::Failed(why, false);
    let mut io = match tokio::time::timeout(CONNECT_TIMEOUT, connect(node, store)).await {
        Ok(Ok(io)) => io,
        Ok(Err(e)) => return fail(e),
        Err(_) => return fail("connect timed out".into()),
    };
    let mut buf = BytesMut::with_capacity(4096);
    let config = store.config();
    let mut hello: Vec<&[u8]> = vec![b"HELLO", b"3"];
    if let Some(password) = &config.password {
        hello.extend([
            b"AUTH".as_slice(),
            config.username.as_deref().unwrap_or("default").as_bytes(),
            password.as_bytes(),
        ]);
    }
    hello.extend([b"SETNAME".as_slice(), b"sidecache-tracking"]);
    let mut tracking: Vec<&[u8]> = vec![b"CLIENT", b"TRACKING", b"ON", b"BCAST"];
    let Some(s) = shared.upgrade() else { return fail("stopped".into()) };
    let prefixes = s.prefixes.clone();
    drop(s);
    for prefix in &prefixes {
        tracking.extend([b"PREFIX".as_slice(), prefix.as_bytes()]);
    }
    for (command, unsupported) in [(&hello, "HELLO 3"), (&tracking, "CLIENT TRACKING BCAST")] {
        let reply = async {
            io.write_all(&encode(command)).await.map_err(|e| e.to_string())?;
            read_frame(&mut io, &mut buf).await
        };
        match tokio::time::timeout(CONNECT_TIMEOUT, reply).await {
            Ok(Ok(BytesFrame::SimpleError { data, .. })) => return refused(&data, unsupported),
            Ok(Ok(BytesFrame::BlobError { data, .. })) => return refused(&String::from_utf8_lossy(&data), unsupported),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return fail(e),
            Err(_) => return fail(format!("{unsupported} timed out")),
        }
    }
    let Some(s) = shared.upgrade() else { return fail("stopped".into()) };
    s.tracking(node, true);
    drop(s);

    let mut awaiting_pong: Option<Instant> = None;
    let mut next_ping = Instant::now() + PING_EVERY;
    loop {
        let frame = match tokio::time::timeout_at(next_ping, read_frame(&mut io, &mut buf)).await {
            Ok(Ok(frame)) => frame,
            Ok(Err(e)) => return Ended::Failed(e, true),
            Err(_) => {
                let now = Instant::now();
                if awaiting_pong.is_some_and(|sent| now.duration_since(sent) >= PING_TIMEOUT) {
                    return Ended::Failed("PING unanswered".into(), true);
                }
                if awaiting_pong.is_none() {
                    let ping = tokio::time::timeout(PING_TIMEOUT, io.write_all(b"*1\r\n$4\r\nPING\r\n")).await;
                    if !matches!(ping, Ok(Ok(()))) {
                        return Ended::Failed("PING not sent".into(), true);
                    }
                    awaiting_pong = Some(now);
                }
                next_ping = now + PING_EVERY;
                continue;
            }
        };
        let Some(s) = shared.upgrade() else { return fail("stopped".into()) };
        match frame {
            BytesFrame::Push { data, .. } => match data.as_slice() {
                [kind, keys] if kind.as_bytes() == Some(b"invalidate".as_slice()) => match keys {
                    BytesFrame::Array { data: keys, .. } => {
                        for key in keys {
                            if let Some(key) = key.as_bytes() {
                                s.invalidated(key);
                            }
                        }
                    }
                    BytesFrame::Null => {
                        tracing::info!(client = s.client, %node, "redis flushed its keys: in-process entries dropped");
                        s.flush(&mut s.links(), Flush::Flushall);
                    }
                    _ => {}
                },
                _ => {}
            },
            BytesFrame::SimpleError { data, .. } => return Ended::Failed(data.to_string(), true),
            _ => awaiting_pong = None,
        }
    }
}

/// A handshake step refused: unsupported, or another failure (authentication, ...).
fn refused(error: &str, step: &str) -> Ended {
    let unsupported = error.starts_with("NOPROTO")
        || error.contains("unknown command")
        || error.contains("unknown subcommand")
        || (step.starts_with("CLIENT") && error.contains("syntax"));
    match unsupported {
        true => Ended::Unsupported(format!("{step}: {error}")),
        false => Ended::Failed(format!("{step}: {error}"), false),
    }
}

async fn connect(node: &Node, store: &RedisStore) -> Result<Box<dyn Io>, String> {
    let tcp = TcpStream::connect((node.host.as_str(), node.port)).await.map_err(|e| e.to_string())?;
    tcp.set_nodelay(true).map_err(|e| e.to_string())?;
    match store.tls() {
        None => Ok(Box::new(tcp)),
        Some(tls) => {
            let name = rustls::pki_types::ServerName::try_from(node.tls_name.clone()).map_err(|e| e.to_string())?;
            let stream = tokio_rustls::TlsConnector::from(tls).connect(name, tcp).await.map_err(|e| e.to_string())?;
            Ok(Box::new(stream))
        }
    }
}

/// A command as a RESP array of bulk strings.
fn encode(parts: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", parts.len()).into_bytes();
    for part in parts {
        out.extend_from_slice(format!("${}\r\n", part.len()).as_bytes());
        out.extend_from_slice(part);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// The next whole frame, reading as needed.
async fn read_frame(io: &mut Box<dyn Io>, buf: &mut BytesMut) -> Result<BytesFrame, String> {
    loop {
        if !buf.is_empty() {
            match decode_bytes_mut(buf) {
                Ok(Some((frame, _, _))) => return Ok(frame),
                Ok(None) if buf.len() > MAX_FRAME => return Err("frame too large".into()),
                Ok(None) => {}
                Err(e) => return Err(format!("protocol error: {e:?}")),
            }
        }
        if io.read_buf(buf).await.map_err(|e| e.to_string())? == 0 {
            return Err("closed by the server".into());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_are_arrays_of_bulk_strings() {
        assert_eq!(encode(&[b"PING"]), b"*1\r\n$4\r\nPING\r\n");
        assert_eq!(encode(&[b"A", b""]), b"*2\r\n$1\r\nA\r\n$0\r\n\r\n");
    }

    #[test]
    fn unsupported_servers_are_told_from_failures() {
        assert!(matches!(refused("NOPROTO sorry", "HELLO 3"), Ended::Unsupported(_)));
        assert!(matches!(refused("ERR unknown command 'HELLO'", "HELLO 3"), Ended::Unsupported(_)));
        assert!(matches!(refused("ERR syntax error", "CLIENT TRACKING BCAST"), Ended::Unsupported(_)));
        assert!(matches!(refused("WRONGPASS invalid username-password pair", "HELLO 3"), Ended::Failed(_, false)));
    }
}
