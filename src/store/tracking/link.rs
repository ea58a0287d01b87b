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
/// ...and a link whose `PING` goes unanswered this long is lost. A silent break (a partition, a
/// hung server) is noticed within `2 × PING_EVERY + PING_TIMEOUT` (1.25 s): the bound on how
/// long it leaves the tier trusting what it holds.
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
            let fresh: Vec<Node> = nodes.iter().filter(|n| !links.contains_key(*n)).cloned().collect();
            for (node, id) in s.want(nodes.clone(), &fresh) {
                s.up_gauge(&node).set(0.0);
                let task = tokio::spawn(link(shared.clone(), node.clone(), id, store.clone()));
                links.insert(node, AbortOnDrop(task));
            }
            current = nodes;
        }
        // A reconnection may have reached another server behind the same name (a failover
        // behind a DNS name or a load balancer): every link is made again.
        let reconnected = tokio::select! {
            _ = changed.notified() => true,
            _ = tokio::time::sleep(TOPOLOGY_EVERY) => false,
        };
        if reconnected {
            links.clear();
            current.clear();
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
    /// Anything else: reconnect with backoff. Whether it had tracked for `STABLE` at least.
    Failed(String, bool),
}

/// One primary's link, kept up for as long as the node is wanted.
async fn link(shared: Weak<Shared>, node: Node, id: u64, store: RedisStore) {
    let mut delay = RETRY_MIN;
    let mut logged = false;
    loop {
        let ended = run(&shared, &node, id, &store).await;
        let Some(s) = shared.upgrade() else { return };
        s.tracking(&node, id, false);
        let wait = match ended {
            Ended::Unsupported(why) => {
                if !logged {
                    tracing::warn!(client = s.client, %node, reason = why, "redis cannot track invalidations (RESP3 and CLIENT TRACKING BCAST need Redis 6 or later; Dragonfly has no BCAST): in-process entries are kept for hot_ttl at most");
                    logged = true;
                }
                UNSUPPORTED_RETRY
            }
            Ended::Failed(why, stable) => {
                if stable {
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
async fn run(shared: &Weak<Shared>, node: &Node, id: u64, store: &RedisStore) -> Ended {
    let fail = |why: String| Ended::Failed(why, false);
    let mut io = match tokio::time::timeout(CONNECT_TIMEOUT, connect(node, store)).await {
        Ok(Ok(io)) => io,
        Ok(Err(e)) => return fail(e),
        Err(_) => return fail("connect timed out".into()),
    };
    let (mut buf, mut scan) = (BytesMut::with_capacity(4096), Scan::default());
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
            read_frame(&mut io, &mut buf, &mut scan).await
        };
        match tokio::time::timeout(CONNECT_TIMEOUT, reply).await {
            Ok(Ok(BytesFrame::SimpleError { data, .. })) => return refused(&data, unsupported),
            Ok(Ok(BytesFrame::BlobError { data, .. })) => return refused(&String::from_utf8_lossy(&data), unsupported),
            // A server (or a proxy in front of it) that answers HELLO 3 but stays on RESP2 would
            // never send a push: the link would look alive and report no change.
            Ok(Ok(reply)) if command == &hello && !matches!(reply, BytesFrame::Map { .. }) => {
                return Ended::Unsupported("HELLO 3: the reply is not RESP3".into());
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return fail(e),
            Err(_) => return fail(format!("{unsupported} timed out")),
        }
    }
    let Some(s) = shared.upgrade() else { return fail("stopped".into()) };
    s.tracking(node, id, true);
    drop(s);
    let tracked = Instant::now();
    let lost = |why: String| Ended::Failed(why, tracked.elapsed() >= super::STABLE);

    let mut awaiting_pong: Option<Instant> = None;
    let mut next_ping = Instant::now() + PING_EVERY;
    loop {
        let frame = match tokio::time::timeout_at(next_ping, read_frame(&mut io, &mut buf, &mut scan)).await {
            Ok(Ok(frame)) => frame,
            Ok(Err(e)) => return lost(e),
            Err(_) => {
                let now = Instant::now();
                if awaiting_pong.is_some_and(|sent| now.duration_since(sent) >= PING_TIMEOUT) {
                    return lost("PING unanswered".into());
                }
                if awaiting_pong.is_none() {
                    let ping = tokio::time::timeout(PING_TIMEOUT, io.write_all(b"*1\r\n$4\r\nPING\r\n")).await;
                    if !matches!(ping, Ok(Ok(()))) {
                        return lost("PING not sent".into());
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
            BytesFrame::SimpleError { data, .. } => return lost(data.to_string()),
            BytesFrame::BlobError { data, .. } => return lost(String::from_utf8_lossy(&data).into_owned()),
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

/// The next whole frame, reading as needed. The decoder parses a buffer from its start, so it
/// is only called once [`Scan`] has seen the whole frame arrive: a push of many keys that comes
/// in many reads is then parsed once, not once per read.
async fn read_frame(io: &mut Box<dyn Io>, buf: &mut BytesMut, scan: &mut Scan) -> Result<BytesFrame, String> {
    loop {
        if scan.whole(buf)? {
            *scan = Scan::default();
            return match decode_bytes_mut(buf) {
                Ok(Some((frame, _, _))) => Ok(frame),
                Ok(None) => Err("protocol error: frame cut short".into()),
                Err(e) => Err(format!("protocol error: {e:?}")),
            };
        }
        if buf.len() > MAX_FRAME {
            return Err("frame too large".into());
        }
        if io.read_buf(buf).await.map_err(|e| e.to_string())? == 0 {
            return Err("closed by the server".into());
        }
    }
}

/// Where the first RESP3 frame of a buffer ends, found by walking its elements' headers and
/// skipping their payloads by length; resumed where the last look stopped, so every byte is
/// looked at about once however many reads the frame takes.
#[derive(Default)]
struct Scan {
    /// The start of the next element's header.
    at: usize,
    /// Where to look on for the end of that header's line.
    searched: usize,
    /// Per open aggregate, the elements still to come.
    open: Vec<usize>,
}

impl Scan {
    /// Whether `buf` holds the whole first frame.
    fn whole(&mut self, buf: &[u8]) -> Result<bool, String> {
        loop {
            let from = self.searched.max(self.at);
            let Some(eol) = buf.get(from..).and_then(|rest| rest.windows(2).position(|w| w == b"\r\n")) else {
                self.searched = buf.len().saturating_sub(1).max(self.at);
                return Ok(false);
            };
            let eol = from + eol;
            let (kind, arg) = match &buf[self.at..eol] {
                [kind, arg @ ..] => (*kind, arg),
                [] => return Err("protocol error: empty line".into()),
            };
            let count = || -> Result<usize, String> {
                let n: i64 =
                    std::str::from_utf8(arg).ok().and_then(|a| a.parse().ok()).ok_or("protocol error: bad length")?;
                Ok(n.max(0) as usize)
            };
            let (mut next, children) = (
                eol + 2,
                match kind {
                    b'$' | b'!' | b'=' => 0,
                    b'*' | b'~' | b'>' => count()?,
                    b'%' => count()?.saturating_mul(2),
                    // Attributes: their pairs, then the element they describe.
                    b'|' => count()?.saturating_mul(2).saturating_add(1),
                    b'+' | b'-' | b':' | b'_' | b'#' | b',' | b'(' => 0,
                    _ => return Err(format!("protocol error: unknown type {kind:?}")),
                },
            );
            if matches!(kind, b'$' | b'!' | b'=') && !arg.starts_with(b"-") {
                next = next.saturating_add(count()?).saturating_add(2);
                if next > buf.len() {
                    // The payload is still arriving: look at this header again next time.
                    self.searched = self.at;
                    return Ok(false);
                }
            }
            (self.at, self.searched) = (next, next);
            if children > 0 {
                self.open.push(children);
                continue;
            }
            // An element ended: so may the aggregates it closes.
            loop {
                match self.open.last_mut() {
                    None => return Ok(true),
                    Some(left) => {
                        *left -= 1;
                        if *left > 0 {
                            break;
                        }
                        self.open.pop();
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frame_is_whole_only_once_all_of_it_has_arrived_however_it_is_split() {
        let push = b">2\r\n$10\r\ninvalidate\r\n*2\r\n$5\r\nsc:c:\r\n$3\r\na\r\n\r\n+PONG\r\n";
        let first = push.len() - b"+PONG\r\n".len();
        for split in 0..push.len() {
            let mut scan = Scan::default();
            let whole = scan.whole(&push[..split]).unwrap();
            assert_eq!(whole, split >= first, "split at {split}");
            // Resumed with the rest: it ends where the first frame does.
            assert!(whole || scan.whole(&push[..]).unwrap(), "split at {split}");
            assert_eq!(scan.at, first, "split at {split}");
        }
        for other in [&b"_\r\n"[..], b"%1\r\n+a\r\n:1\r\n", b"|1\r\n+k\r\n+v\r\n+OK\r\n", b"*0\r\n", b"$-1\r\n"] {
            assert!(Scan::default().whole(other).unwrap(), "{other:?}");
            assert!(!Scan::default().whole(&other[..other.len() - 1]).unwrap(), "{other:?} cut short");
        }
        assert!(Scan::default().whole(b"?3\r\n").is_err());
    }

    #[tokio::test]
    async fn a_push_of_many_keys_arriving_in_many_reads_is_decoded_whole() {
        let keys = 40_000;
        let mut push = format!(">2\r\n$10\r\ninvalidate\r\n*{keys}\r\n").into_bytes();
        for i in 0..keys {
            let key = format!("sc:c:route:0:g:/some/long/path/{i:08}");
            push.extend(format!("${}\r\n{key}\r\n", key.len()).into_bytes());
        }
        push.extend(b"+PONG\r\n");
        let (client, mut server) = tokio::io::duplex(16 * 1024);
        let writer = tokio::spawn(async move {
            for chunk in push.chunks(16 * 1024) {
                server.write_all(chunk).await.unwrap();
            }
            server
        });
        let mut io: Box<dyn Io> = Box::new(client);
        let (mut buf, mut scan) = (BytesMut::new(), Scan::default());
        let BytesFrame::Push { data, .. } = read_frame(&mut io, &mut buf, &mut scan).await.unwrap() else {
            panic!("a push")
        };
        assert!(matches!(&data[1], BytesFrame::Array { data, .. } if data.len() == keys));
        assert!(matches!(read_frame(&mut io, &mut buf, &mut scan).await.unwrap(), BytesFrame::SimpleString { .. }));
        drop(writer.await.unwrap());
    }

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
