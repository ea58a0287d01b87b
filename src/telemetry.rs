//! Tracing set-up: JSON or pretty lines on stdout, level from `RUST_LOG` or `log.level` (which a
//! configuration reload changes). The access log is the `sidecache::access` target at debug level.
//!
//! OpenTelemetry traces when configured ([`TelemetryConfig`]): the spans of the request path
//! (`request`, and inside one `upstream` and `redis`) also go to an OpenTelemetry layer, are
//! queued on span end (bounded, never waiting: a full queue drops spans and logs once) and
//! exported over OTLP/HTTP by the SDK's batch processor thread through a client on a runtime of
//! its own ([`export`]), so a slow or absent collector never reaches a request. When traces are
//! off no layer is installed: those spans stay the disabled debug spans they always were, and
//! [`enabled`] is false, so the request path does nothing more than before.

mod export;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use http::{HeaderMap, HeaderName, StatusCode};
use ipnet::IpNet;
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry::KeyValue;
use opentelemetry_http::{HeaderExtractor, HeaderInjector};
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::resource::{EnvResourceDetector, SdkProvidedResourceDetector, TelemetryResourceDetector};
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use opentelemetry_sdk::Resource;
use tracing::level_filters::LevelFilter;
use tracing::subscriber::Interest;
use tracing::Span;
use tracing_log::AsLog;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::{filter_fn, DynFilterFn, FilterExt};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Layer, Registry};

use crate::config::{LogConfig, LogFormat, TelemetryConfig};
use crate::ratelimit::client::client_ip;
use crate::upstream::headers::is_trusted;

/// Changes the log filter of the installed subscriber; unset while `RUST_LOG` decides.
static LEVEL: OnceLock<reload::Handle<EnvFilter, Registry>> = OnceLock::new();

/// Set once the OpenTelemetry layer is installed.
static ENABLED: AtomicBool = AtomicBool::new(false);

/// The spans that become OpenTelemetry spans. A `request` span is a root (or continues a trusted
/// caller's trace); the others only inside one: the Redis operations of the background loops
/// (generation refresh, breaker probe) are not traced. `cache.write` and `cache.refresh` are the
/// work a request leaves behind in tasks of their own, after its answer.
const REQUEST_SPAN: &str = "request";
const CHILD_SPANS: [&str; 4] = ["upstream", "redis", "cache.write", "cache.refresh"];

/// How long spans still queued at exit may take to leave (after the drain).
pub const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// W3C Trace Context (`traceparent`, `tracestate`).
static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
static TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

/// Why traces could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The exporter's runtime could not start.
    #[error("cannot start the OTLP export runtime")]
    Runtime(#[source] std::io::Error),
    /// The TLS client configuration of the exporter could not be built.
    #[error("cannot set up TLS for the OTLP exporter")]
    Tls(#[source] crate::tls::TlsError),
    /// The OTLP exporter refused its configuration.
    #[error("cannot build the OTLP exporter")]
    Exporter(#[source] opentelemetry_otlp::ExporterBuildError),
}

/// What [`init`] started: the trace pipeline, flushed by [`Telemetry::shutdown`].
pub struct Telemetry {
    traces: Option<(SdkTracerProvider, tokio::runtime::Runtime)>,
}

impl Telemetry {
    /// Export the spans still queued, for at most [`FLUSH_TIMEOUT`], and stop the exporter.
    pub fn shutdown(self) {
        let Some((provider, runtime)) = self.traces else { return };
        if let Err(e) = provider.shutdown_with_timeout(FLUSH_TIMEOUT) {
            tracing::warn!(error = %e, "traces not flushed at exit");
        }
        runtime.shutdown_background();
    }
}

/// Install the global subscriber, with the OpenTelemetry layer when `traces` is set. `RUST_LOG`,
/// when set and valid, wins over `log.level`.
pub fn init(log: &LogConfig, traces: Option<&TelemetryConfig>) -> Result<Telemetry, TelemetryError> {
    let from_env = std::env::var("RUST_LOG").ok().and_then(|v| EnvFilter::try_new(v).ok());
    let by_config = from_env.is_none();
    let (filter, level) = reload::Layer::new(from_env.unwrap_or_else(|| EnvFilter::new(&log.level)));
    let fmt = tracing_subscriber::fmt::layer().with_target(true);
    let fmt = match log.format {
        LogFormat::Json => fmt.json().flatten_event(true).with_current_span(true).with_span_list(false).boxed(),
        LogFormat::Pretty => fmt.boxed(),
    };
    // The log filter filters the log lines only (the OpenTelemetry layer has its own); a
    // disabled span or event still costs a comparison with the maximum level. That maximum is the
    // level filter's: a filter without a hint would raise it to TRACE, and then every `log` record
    // of a dependency (fred writes several per command) would go through the filters, about 2,600
    // instructions per Redis call.
    let export_failures = filter_fn(|meta| !is_export_failure(meta)).with_max_level_hint(LevelFilter::TRACE);
    let logs = fmt.with_filter(filter.and(export_failures));
    let Some(traces) = traces else {
        if tracing_subscriber::registry().with(logs).try_init().is_ok() && by_config {
            let _ = LEVEL.set(level);
        }
        return Ok(Telemetry { traces: None });
    };

    let (provider, runtime) = pipeline(traces)?;
    let otel = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("sidecache"))
        .with_location(false)
        .with_threads(false)
        .with_target(false)
        .with_tracked_inactivity(false)
        // Nothing reads the current OpenTelemetry context: children find their parent through
        // the current span, and `inject` takes the span's own context.
        .with_context_activation(false)
        .with_filter(
            DynFilterFn::new(|meta, cx| match exported(meta) {
                Exported::Always => true,
                Exported::InsideRequest => cx.lookup_current().is_some(),
                Exported::Never => false,
            })
            .with_callsite_filter(|meta| match exported(meta) {
                Exported::Always => Interest::always(),
                Exported::InsideRequest => Interest::sometimes(),
                Exported::Never => Interest::never(),
            })
            .with_max_level_hint(LevelFilter::DEBUG),
        );
    if tracing_subscriber::registry().with(logs).with(otel).try_init().is_ok() {
        ENABLED.store(true, Ordering::Relaxed);
        if by_config {
            let _ = LEVEL.set(level);
        }
        tracing::info!(
            endpoint = traces.traces_endpoint.as_deref().unwrap_or("from OTEL_EXPORTER_OTLP_*ENDPOINT"),
            service_name = traces.service_name.as_deref(),
            sample_ratio = traces.sample_ratio,
            sampler = std::env::var("OTEL_TRACES_SAMPLER").ok(),
            "exporting traces over OTLP"
        );
    }
    Ok(Telemetry { traces: Some((provider, runtime)) })
}

/// Which spans become OpenTelemetry spans.
enum Exported {
    /// A request's.
    Always,
    /// Redis's and the upstream's, inside a request (not those of the background loops).
    InsideRequest,
    /// Everything else.
    Never,
}

fn exported(meta: &tracing::Metadata<'_>) -> Exported {
    let ours = meta.is_span() && meta.target().starts_with("sidecache::");
    match meta.name() {
        REQUEST_SPAN if ours => Exported::Always,
        name if ours && CHILD_SPANS.contains(&name) => Exported::InsideRequest,
        _ => Exported::Never,
    }
}

/// The SDK's line per failed export (the transport logs the failing state once instead).
fn is_export_failure(meta: &tracing::Metadata<'_>) -> bool {
    meta.is_event() && (meta.name() == "BatchSpanProcessor.ExportError" || meta.name().starts_with("Export.Failed"))
}

/// Apply a new `log.level` (no effect while `RUST_LOG` decides, or before [`init`]).
pub fn set_level(level: &str) {
    if let (Some(handle), Ok(filter)) = (LEVEL.get(), EnvFilter::try_new(level)) {
        match handle.reload(filter) {
            // The reload recomputed the maximum level; `log` records keep their own copy.
            Ok(()) => tracing_log::log::set_max_level(LevelFilter::current().as_log()),
            Err(e) => tracing::warn!(error = %e, "log.level not changed"),
        }
    }
}

/// The tracer provider: the OTLP/HTTP exporter behind the SDK's batch processor (queue, batch
/// size, delay from `OTEL_BSP_*`), the resource, the sampler. What the `OTEL_*` variables say
/// is read by the SDK; `traces` only fills in where they are silent.
fn pipeline(traces: &TelemetryConfig) -> Result<(SdkTracerProvider, tokio::runtime::Runtime), TelemetryError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("sidecache-otlp")
        .enable_all()
        .build()
        .map_err(TelemetryError::Runtime)?;
    let mut exporter = opentelemetry_otlp::SpanExporter::builder().with_http().with_http_client(
        export::Transport::new(runtime.handle().clone(), traces.timeout, traces.ca_file.as_deref())
            .map_err(TelemetryError::Tls)?,
    );
    if let Some(endpoint) = &traces.traces_endpoint {
        exporter = exporter.with_endpoint(endpoint);
    }
    let exporter = exporter.build().map_err(TelemetryError::Exporter)?;

    // Ours first, so that OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES (the SDK's detectors)
    // win; the service name from the table or the default only where no variable gave one.
    let mut resource = Resource::builder_empty()
        .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
        .with_detectors(&[
            Box::new(SdkProvidedResourceDetector),
            Box::new(TelemetryResourceDetector),
            Box::new(EnvResourceDetector::new()),
        ]);
    if let Some(name) = &traces.service_name {
        resource = resource.with_service_name(name.clone());
    }
    let mut provider = SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource.build());
    if let Some(ratio) = traces.sample_ratio {
        provider = provider.with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(ratio))));
    }
    Ok((provider.build(), runtime))
}

/// Whether traces are exported. Everything else in this module is only worth calling when so.
#[inline]
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// A request's span before it starts: the client address, and as its parent the caller's
/// `traceparent` when the peer is a trusted proxy. From anyone else the request starts a trace
/// of its own: a client cannot choose trace ids (nor sampling) for the backend's traces.
pub fn begin_request<B>(
    span: &Span,
    req: &http::Request<B>,
    route: Option<&str>,
    peer: std::net::IpAddr,
    trusted: &[IpNet],
) {
    let method = clip(req.method().as_str());
    // OpenTelemetry's span name: `{method} {http.route}`, or the method alone.
    match route {
        Some(route) => {
            span.record("otel.name", format!("{method} {route}"));
            span.record("http.route", route);
        }
        None => {
            span.record("otel.name", method);
        }
    }
    span.record("network.peer.address", tracing::field::display(peer));
    span.record("client.address", tracing::field::display(client_ip(peer, req.headers(), trusted)));
    if is_trusted(peer, trusted) {
        let parent = TraceContextPropagator::new().extract(&HeaderExtractor(req.headers()));
        if let Err(e) = span.set_parent(parent) {
            tracing::debug!(error = %e, "caller's trace not continued");
        }
    }
}

/// The W3C Trace Context of `span` on a request to the backend, replacing whatever the client
/// sent (continued as the request's parent, or not believed).
pub fn inject(span: &Span, headers: &mut HeaderMap) {
    headers.remove(&TRACEPARENT);
    headers.remove(&TRACESTATE);
    TraceContextPropagator::new().inject_context(&span.context(), &mut HeaderInjector(headers));
    if headers.get(&TRACESTATE).is_some_and(|v| v.is_empty()) {
        headers.remove(&TRACESTATE);
    }
}

/// Record an attribute on the current span (the request's): the cache outcome, the limiter's
/// decision. Nothing when traces are off.
#[inline]
pub fn record(field: &'static str, value: &'static str) {
    if enabled() {
        Span::current().record(field, value);
    }
}

/// `http.response.status_code`, and the error status from `error_from` up (500 for the
/// request's own span; 400 for the upstream's, as OpenTelemetry's HTTP conventions say).
pub fn record_status(span: &Span, status: StatusCode, error_from: u16) {
    span.record("http.response.status_code", status.as_u16());
    if status.as_u16() >= error_from {
        span.record("error.type", status.as_str());
        span.record("otel.status_code", "ERROR");
    }
}

/// Longest client-chosen value a span keeps (a path, a method): spans wait in the export queue,
/// and a client must not make them large.
pub const CLIP: usize = 512;

/// `value` cut to [`CLIP`] bytes at a character boundary.
pub fn clip(value: &str) -> &str {
    if value.len() <= CLIP {
        return value;
    }
    let mut end = CLIP;
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    &value[..end]
}

/// A failure without a response: `error.type` (the metric label of the failure) and the error
/// status.
pub fn record_error(span: &Span, kind: &'static str) {
    span.record("error.type", kind);
    span.record("otel.status_code", "ERROR");
}
