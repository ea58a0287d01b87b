//! OpenTelemetry traces from the real binary to a real OTLP/HTTP receiver started by each test
//! (a hyper server decoding `ExportTraceServiceRequest`s): the request span and its children,
//! W3C trace context to the backend, trusted and untrusted callers, off by default, a collector
//! that never answers, and the flush at SIGTERM.

mod support;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use prost::Message;
use support::redis::TestRedis;
use support::*;
use tokio::net::TcpListener;
use tokio::time::Instant;

/// OTLP span kinds and status codes (opentelemetry-proto's enums, as numbers on the wire).
const SERVER: i32 = 2;
const CLIENT: i32 = 3;
const STATUS_UNSET: i32 = 0;
const STATUS_ERROR: i32 = 2;

/// A span as the collector received it: ids in hex, attributes as text.
#[derive(Debug, Clone)]
struct Exported {
    service: String,
    trace_id: String,
    span_id: String,
    parent_id: String,
    name: String,
    kind: i32,
    status: i32,
    attrs: HashMap<String, String>,
}

impl Exported {
    fn attr(&self, key: &str) -> &str {
        self.attrs.get(key).map_or("", String::as_str)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn text(attributes: &[KeyValue]) -> HashMap<String, String> {
    attributes
        .iter()
        .map(|kv| {
            let value = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                Some(Value::StringValue(s)) => s.clone(),
                Some(Value::IntValue(i)) => i.to_string(),
                Some(Value::BoolValue(b)) => b.to_string(),
                Some(Value::DoubleValue(d)) => d.to_string(),
                other => format!("{other:?}"),
            };
            (kv.key.clone(), value)
        })
        .collect()
}

/// An OTLP/HTTP trace receiver on 127.0.0.1:0: `POST /v1/traces` with protobuf.
struct Collector {
    addr: SocketAddr,
    spans: Arc<Mutex<Vec<Exported>>>,
    resources: Arc<Mutex<Vec<HashMap<String, String>>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Collector {
    async fn start() -> Collector {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let spans = Arc::new(Mutex::new(Vec::new()));
        let resources = Arc::new(Mutex::new(Vec::new()));
        let (s, r) = (spans.clone(), resources.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let (s, r) = (s.clone(), r.clone());
                tokio::spawn(async move {
                    let service = service_fn(move |req| receive(req, s.clone(), r.clone()));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Collector { addr, spans, resources, task }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn spans(&self) -> Vec<Exported> {
        self.spans.lock().unwrap().clone()
    }

    /// Polls (at most 10 s) until `done` holds for the spans received so far.
    async fn until(&self, what: &str, done: impl Fn(&[Exported]) -> bool) -> Vec<Exported> {
        let started = Instant::now();
        loop {
            let spans = self.spans();
            if done(&spans) {
                return spans;
            }
            assert!(started.elapsed() < Duration::from_secs(10), "never received {what}: {spans:#?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn receive(
    req: Request<Incoming>,
    spans: Arc<Mutex<Vec<Exported>>>,
    resources: Arc<Mutex<Vec<HashMap<String, String>>>>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    assert_eq!((req.method(), req.uri().path()), (&Method::POST, "/v1/traces"));
    assert_eq!(req.headers()["content-type"], "application/x-protobuf");
    let body = req.into_body().collect().await.unwrap().to_bytes();
    let export = ExportTraceServiceRequest::decode(body).expect("an OTLP protobuf export");
    for rs in export.resource_spans {
        let resource = text(&rs.resource.map(|r| r.attributes).unwrap_or_default());
        let service = resource.get("service.name").cloned().unwrap_or_default();
        resources.lock().unwrap().push(resource);
        for span in rs.scope_spans.into_iter().flat_map(|s| s.spans) {
            spans.lock().unwrap().push(Exported {
                service: service.clone(),
                trace_id: hex(&span.trace_id),
                span_id: hex(&span.span_id),
                parent_id: hex(&span.parent_span_id),
                name: span.name,
                kind: span.kind,
                status: span.status.map_or(STATUS_UNSET, |s| s.code),
                attrs: text(&span.attributes),
            });
        }
    }
    let answer = ExportTraceServiceResponse::default().encode_to_vec();
    Ok(Response::builder().header("content-type", "application/x-protobuf").body(Full::new(answer.into())).unwrap())
}

/// The request span with this path (and cache outcome, when given).
fn request<'a>(spans: &'a [Exported], path: &str, outcome: Option<&str>) -> Option<&'a Exported> {
    spans.iter().find(|s| {
        s.kind == SERVER && s.attr("url.path") == path && outcome.is_none_or(|o| s.attr("sidecache.cache.outcome") == o)
    })
}

/// Whether `span` is an upstream exchange (a client span that is not Redis's).
fn is_upstream(span: &Exported) -> bool {
    span.kind == CLIENT && span.attr("db.system.name").is_empty()
}

/// The spans whose parent is `parent`, in the same trace.
fn children<'a>(spans: &'a [Exported], parent: &Exported) -> Vec<&'a Exported> {
    spans.iter().filter(|s| s.parent_id == parent.span_id && s.trace_id == parent.trace_id).collect()
}

/// The `traceparent` the backend received for `target` (the only request it saw for it).
fn traceparent(upstream: &TestUpstream, target: &str) -> Option<String> {
    let seen = upstream.seen(target);
    assert_eq!(seen.len(), 1, "{target}");
    assert!(seen[0].get_all("traceparent").iter().count() <= 1, "one traceparent at most");
    seen[0].get("traceparent").map(|v| v.to_str().unwrap().to_string())
}

/// Waits until the binary's log has a line with `needle`, at most 10 s.
async fn logged(proxy: &BinaryProxy, needle: &str) -> usize {
    let started = Instant::now();
    loop {
        let n = proxy.log.lock().unwrap().iter().filter(|l| l.contains(needle)).count();
        if n > 0 {
            return n;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "never logged {needle}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

const ROUTES: &str = r#"
[[route]]
name = "cached"
path = "/gen/c/*"
cache = { ttl = "60s" }

[[route]]
name = "limited"
path = "/gen/l/*"
rate_limit = { burst = 100, rate = "100/1m" }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_spans_carry_route_outcome_and_limit_with_redis_and_upstream_children() {
    let collector = Collector::start().await;
    let upstream = TestUpstream::spawn().await;
    let redis = TestRedis::start();
    let toml = config_text(
        upstream.addr,
        &format!("{ROUTES}\n[cache]\nhot_ttl = \"0s\"\n[redis]\nurl = \"{}\"\nop_timeout = \"500ms\"\n", redis.url()),
    );
    let proxy = BinaryProxy::spawn_with_env(
        &toml,
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &collector.url()),
            ("OTEL_BSP_SCHEDULE_DELAY", "50"),
            ("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment.name=test"),
        ],
    );
    let admin = format!("http://{}", proxy.admin);
    until_redis_ready(&admin).await;

    assert_eq!(get(&proxy.url("/gen/c/item")).await.headers["x-cache"], "MISS");
    stored_at(&admin, "cached", 1.0).await;
    assert_eq!(get(&proxy.url("/gen/c/item")).await.headers["x-cache"], "HIT");
    assert_eq!(get(&proxy.url("/gen/l/item")).await.status, StatusCode::OK);
    assert_eq!(get(&proxy.url("/status/503")).await.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(get(&proxy.url("/status/404")).await.status, StatusCode::NOT_FOUND);
    let long = format!("/gen/{}", "a".repeat(8000));
    assert_eq!(get(&proxy.url(&long)).await.status, StatusCode::OK);

    let spans = collector
        .until("every request with its children", |spans| {
            spans.iter().filter(|s| s.kind == SERVER).count() == 6
                && request(spans, "/gen/c/item", Some("miss")).is_some_and(|r| children(spans, r).len() == 3)
                && spans.iter().any(|s| s.name == "hset")
        })
        .await;
    let resource = &collector.resources.lock().unwrap()[0];
    assert_eq!(resource["service.name"], "sidecache", "the default service name");
    assert_eq!(resource["deployment.environment.name"], "test", "OTEL_RESOURCE_ATTRIBUTES");

    // The miss: a root span with the request's attributes; the lookup, the upstream exchange and
    // the background write are its children, in its trace.
    let miss = request(&spans, "/gen/c/item", Some("miss")).expect("the miss");
    assert_eq!((miss.kind, miss.parent_id.as_str(), miss.status), (SERVER, "", STATUS_UNSET));
    assert_eq!(miss.attr("http.request.method"), "GET");
    assert_eq!((miss.name.as_str(), miss.attr("http.route")), ("GET /gen/c/*", "/gen/c/*"));
    assert_eq!((miss.attr("sidecache.route"), miss.attr("url.scheme")), ("cached", "http"));
    assert_eq!(miss.attr("network.peer.address"), "127.0.0.1");
    assert_eq!(miss.attr("http.response.status_code"), "200");
    assert_eq!(miss.attr("client.address"), "127.0.0.1");
    let mut names: Vec<&str> = children(&spans, miss).iter().map(|s| s.name.as_str()).collect();
    names.sort();
    assert_eq!(names, ["GET", "cache.write", "hget"]);
    let write = children(&spans, miss).into_iter().find(|s| s.name == "cache.write").unwrap();
    let names: Vec<&str> = children(&spans, write).iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["hset"], "the write's own Redis operation");
    let lookup = children(&spans, miss).into_iter().find(|s| s.name == "hget").unwrap();
    assert_eq!((lookup.kind, lookup.attr("db.system.name")), (CLIENT, "redis"));
    assert_eq!((lookup.attr("db.operation.name"), lookup.attr("sidecache.redis.client")), ("hget", "cache"));
    let exchange = children(&spans, miss).into_iter().find(|s| is_upstream(s)).unwrap();
    assert_eq!((exchange.kind, exchange.attr("server.address")), (CLIENT, "127.0.0.1"));
    assert_eq!(exchange.attr("server.port"), upstream.addr.port().to_string());
    assert_eq!(exchange.attr("http.response.status_code"), "200");

    // The backend was told the upstream span's context: same trace, that span as the parent.
    let sent = traceparent(&upstream, "/gen/c/item").expect("a traceparent to the backend");
    assert_eq!(sent, format!("00-{}-{}-01", miss.trace_id, exchange.span_id));

    // The hit: answered from Redis, no upstream exchange.
    let hit = request(&spans, "/gen/c/item", Some("hit")).expect("the hit");
    assert_ne!(hit.trace_id, miss.trace_id, "each request is a trace of its own");
    let names: Vec<&str> = children(&spans, hit).iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["hget"]);

    // The rate-limited route: the limiter's decision and its script.
    let limited = request(&spans, "/gen/l/item", None).expect("the limited route's request");
    assert_eq!((limited.attr("http.route"), limited.attr("sidecache.ratelimit.result")), ("/gen/l/*", "allowed"));
    assert_eq!(limited.attr("sidecache.cache.outcome"), "", "no cache on this route");
    let script = children(&spans, limited);
    assert_eq!(script.len(), 2, "{script:#?}");
    assert!(script.iter().any(|s| s.name == "token_bucket" && s.attr("sidecache.redis.client") == "ratelimit"));

    // Errors: a 5xx is an error of the request; a 4xx only of the upstream exchange.
    let failed = request(&spans, "/status/503", None).unwrap();
    assert_eq!(
        (failed.status, failed.attr("http.route"), failed.attr("http.response.status_code")),
        (STATUS_ERROR, "", "503")
    );
    assert_eq!((failed.name.as_str(), failed.attr("sidecache.route"), failed.attr("error.type")), ("GET", "-", "503"));
    assert_eq!(children(&spans, failed)[0].status, STATUS_ERROR);
    // What a client chooses is clipped: a span waiting for export stays small.
    let clipped = spans.iter().find(|s| s.kind == SERVER && s.attr("url.path").starts_with("/gen/aaa")).unwrap();
    assert_eq!(clipped.attr("url.path"), &long[..512]);
    let missing = request(&spans, "/status/404", None).unwrap();
    assert_eq!((missing.status, children(&spans, missing)[0].status), (STATUS_UNSET, STATUS_ERROR));
}

/// A client's trace context, sent from 127.0.0.1.
const CALLER_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";

async fn traced_call(proxy: &BinaryProxy, target: &str) {
    let traceparent = format!("00-{CALLER_TRACE}-{CALLER_SPAN}-01");
    let answer = send(
        Method::GET,
        &proxy.url(target),
        &[("traceparent", traceparent.as_str()), ("tracestate", "caller=1")],
        Bytes::new(),
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trusted_callers_trace_is_continued_an_untrusted_ones_is_replaced() {
    let collector = Collector::start().await;
    let upstream = TestUpstream::spawn().await;
    let env = |service: &'static str| {
        [
            ("OTEL_EXPORTER_OTLP_ENDPOINT", collector.url()),
            ("OTEL_BSP_SCHEDULE_DELAY", "50".into()),
            ("OTEL_SERVICE_NAME", service.into()),
        ]
    };
    let spawn = |server: &str, service| {
        let env = env(service);
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        BinaryProxy::spawn_with_env(&config_text(upstream.addr, server), &env)
    };
    let trusting = spawn("trusted_proxies = [\"127.0.0.1/32\"]", "trusting");
    let untrusting = spawn("", "untrusting");
    traced_call(&trusting, "/gen/trusted").await;
    traced_call(&untrusting, "/gen/untrusted").await;

    let spans = collector
        .until("both requests with their upstream spans", |spans| {
            spans.iter().filter(|s| is_upstream(s)).count() == 2
                && spans.iter().filter(|s| s.kind == SERVER).count() == 2
        })
        .await;
    let of = |service: &str, server: bool| {
        spans
            .iter()
            .find(|s| s.service == service && if server { s.kind == SERVER } else { is_upstream(s) })
            .unwrap()
            .clone()
    };

    // Trusted: the request continues the caller's trace, and so does the backend.
    let (request, exchange) = (of("trusting", true), of("trusting", false));
    assert_eq!((request.trace_id.as_str(), request.parent_id.as_str()), (CALLER_TRACE, CALLER_SPAN));
    assert_eq!((exchange.trace_id.as_str(), exchange.parent_id.as_str()), (CALLER_TRACE, request.span_id.as_str()));
    assert_eq!(traceparent(&upstream, "/gen/trusted").unwrap(), format!("00-{CALLER_TRACE}-{}-01", exchange.span_id));
    assert_eq!(upstream.seen("/gen/trusted")[0]["tracestate"], "caller=1", "the caller's tracestate goes on");

    // Untrusted: a trace of our own; the client chose neither the backend's trace id nor state.
    let (request, exchange) = (of("untrusting", true), of("untrusting", false));
    assert_ne!(request.trace_id, CALLER_TRACE);
    assert_eq!(request.parent_id, "", "a root span");
    assert_eq!(
        traceparent(&upstream, "/gen/untrusted").unwrap(),
        format!("00-{}-{}-01", request.trace_id, exchange.span_id)
    );
    assert!(upstream.seen("/gen/untrusted")[0].get("tracestate").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn off_by_default_the_proxy_is_transparent_to_trace_context_and_exports_nothing() {
    let collector = Collector::start().await;
    let upstream = TestUpstream::spawn().await;
    // Off: no configuration at all, and an endpoint with the SDK disabled.
    let plain = BinaryProxy::spawn(&config_text(upstream.addr, ""));
    let endpoint = collector.url();
    let disabled = BinaryProxy::spawn_with_env(
        &config_text(upstream.addr, ""),
        &[("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint), ("OTEL_SDK_DISABLED", "true"), ("OTEL_BSP_SCHEDULE_DELAY", "50")],
    );
    traced_call(&plain, "/gen/plain").await;
    traced_call(&disabled, "/gen/disabled").await;
    for target in ["/gen/plain", "/gen/disabled"] {
        assert_eq!(traceparent(&upstream, target).unwrap(), format!("00-{CALLER_TRACE}-{CALLER_SPAN}-01"), "{target}");
        assert_eq!(upstream.seen(target)[0]["tracestate"], "caller=1", "{target}");
    }

    // On, through the [telemetry] table alone, to the same collector: once its span arrived, one
    // from the disabled proxy (sent earlier, with the same batch delay) would have too.
    let table = format!("[telemetry]\notlp_endpoint = \"{endpoint}\"\nservice_name = \"from-table\"\n");
    let on = BinaryProxy::spawn_with_env(&config_text(upstream.addr, &table), &[("OTEL_BSP_SCHEDULE_DELAY", "50")]);
    traced_call(&on, "/gen/on").await;
    let spans = collector.until("the span of the proxy that traces", |spans| !spans.is_empty()).await;
    assert!(spans.iter().all(|s| s.service == "from-table"), "{spans:#?}");
    logged(&on, "exporting traces over OTLP").await;
    for off in [&plain, &disabled] {
        assert!(!off.log.lock().unwrap().iter().any(|l| l.contains("exporting traces")), "no exporter when off");
    }
}

/// 200 requests through a proxy exporting to `endpoint`; none may wait on the collector.
async fn requests_stay_fast(endpoint: &str) -> BinaryProxy {
    let upstream = TestUpstream::spawn().await;
    let toml = config_text(upstream.addr, "shutdown_grace = \"1s\"");
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint),
        ("OTEL_BSP_SCHEDULE_DELAY", "10"),
        ("OTEL_BSP_MAX_QUEUE_SIZE", "16"),
        ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "8"),
    ];
    let proxy = BinaryProxy::spawn_with_env(&toml, &env);
    let started = Instant::now();
    let mut slowest = Duration::ZERO;
    for i in 0..200 {
        let t = Instant::now();
        assert_eq!(get(&proxy.url(&format!("/gen/{i}"))).await.status, StatusCode::OK);
        slowest = slowest.max(t.elapsed());
    }
    // An export attempt hangs for 10 s against a silent collector: a request that waited on one
    // would show it.
    assert!(slowest < Duration::from_secs(3), "slowest request {slowest:?} with {endpoint}");
    assert!(started.elapsed() < Duration::from_secs(10), "200 requests took {:?}", started.elapsed());
    proxy
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_that_never_answers_or_is_not_there_slows_no_request() {
    // Accepts connections and never answers.
    let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_url = format!("http://{}", silent.local_addr().unwrap());
    let held = tokio::spawn(async move {
        let mut connections = Vec::new();
        while let Ok((stream, _)) = silent.accept().await {
            connections.push(stream);
        }
    });
    let mut proxy = requests_stay_fast(&silent_url).await;
    // The queue is bounded: spans beyond it are dropped, and that is logged once.
    assert_eq!(logged(&proxy, "BatchSpanProcessor.SpanDroppingStarted").await, 1);
    // SIGTERM while an export hangs: the drain (1 s) and the flush bound (5 s), then exit 0.
    proxy.signal("TERM");
    let status = proxy.wait_exit(Duration::from_secs(10)).expect("exited despite the hung collector");
    assert!(status.success(), "{status:?}");
    held.abort();

    let nobody = format!("http://127.0.0.1:{}", support::redis::free_port());
    let proxy = requests_stay_fast(&nobody).await;
    // Every batch fails at once: the failing state is logged once, not each failed export.
    logged(&proxy, "exporting traces failed").await;
    let exports = |needle: &str| proxy.log.lock().unwrap().iter().filter(|l| l.contains(needle)).count();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !proxy.log.lock().unwrap().iter().any(|l| l.contains("SpanDroppingStarted")) {
        assert!(Instant::now() < deadline, "the queue never filled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(exports("exporting traces failed"), 1);
    assert_eq!(exports("ExportError") + exports("Export.Failed"), 0, "the SDK's line per failure is not logged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_still_queued_are_flushed_at_sigterm() {
    let collector = Collector::start().await;
    let upstream = TestUpstream::spawn().await;
    // A batch delay far beyond the test: only the flush at exit can send the span.
    let env = [("OTEL_EXPORTER_OTLP_ENDPOINT", collector.url()), ("OTEL_BSP_SCHEDULE_DELAY", "600000".to_string())];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut proxy = BinaryProxy::spawn_with_env(&config_text(upstream.addr, "shutdown_grace = \"1s\""), &env);
    assert_eq!(get(&proxy.url("/gen/last")).await.status, StatusCode::OK);
    assert!(collector.spans().is_empty());
    proxy.signal("TERM");
    let status = proxy.wait_exit(Duration::from_secs(10)).expect("exited");
    assert!(status.success(), "{status:?}");
    let spans = collector.spans();
    assert!(request(&spans, "/gen/last", None).is_some(), "{spans:#?}");
}
