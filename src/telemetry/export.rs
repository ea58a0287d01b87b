//! The OTLP exporter's HTTP transport: hyper-util's pooled client with rustls (ring), the stack
//! the proxy already uses for its upstream, running on a runtime of its own. The SDK's batch
//! processor calls it from its own thread; each attempt is spawned on that runtime (hyper needs
//! one) and bounded in time, so neither a request nor shutdown can wait on a collector. A
//! failing collector is logged once when the exports start failing and once when they succeed
//! again (the SDK's own line per failed batch is filtered out of the log).

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use opentelemetry_http::{HttpClient, HttpError, Request, Response, ResponseBodyTooLarge};

use crate::tls::{self, TlsError};

/// A collector's answer is a small status message; a larger one is not read.
const MAX_RESPONSE_BYTES: usize = 64 * 1024;
/// TCP connect budget to the collector.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Posts export requests to the collector (`http://`, or `https://` verified against the public
/// web roots and the configured CA certificates).
pub(super) struct Transport {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    runtime: tokio::runtime::Handle,
    /// One attempt at most (`OTEL_EXPORTER_OTLP_TIMEOUT`).
    timeout: Duration,
    /// Whether the last attempt failed (the state logged).
    failing: AtomicBool,
}

impl Transport {
    /// A client whose connections live on `runtime`.
    pub(super) fn new(
        runtime: tokio::runtime::Handle,
        timeout: Duration,
        ca_file: Option<&Path>,
    ) -> Result<Transport, TlsError> {
        let connector = tls::https_connector("OTEL_EXPORTER_OTLP_CERTIFICATE", ca_file, CONNECT_TIMEOUT)?;
        let client = Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_max_idle_per_host(2)
            .build(connector);
        Ok(Transport { client, runtime, timeout, failing: AtomicBool::new(false) })
    }

    /// Log a change between exporting and failing, once.
    fn note(&self, failure: Option<String>) {
        match failure {
            Some(error) if !self.failing.swap(true, Ordering::Relaxed) => {
                tracing::warn!(error, "exporting traces failed; spans are dropped until the collector answers");
            }
            None if self.failing.swap(false, Ordering::Relaxed) => tracing::info!("exporting traces again"),
            _ => {}
        }
    }
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Transport")
    }
}

#[async_trait::async_trait]
impl HttpClient for Transport {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let client = self.client.clone();
        let exchange = async move {
            let response = client.request(request.map(Full::new)).await?;
            let (parts, body) = response.into_parts();
            // An answer too large is the collector's, and sending the batch again would not help.
            let body = Limited::new(body, MAX_RESPONSE_BYTES)
                .collect()
                .await
                .map_err(|e| -> HttpError {
                    if e.is::<LengthLimitError>() {
                        Box::new(ResponseBodyTooLarge::new())
                    } else {
                        e
                    }
                })?
                .to_bytes();
            Ok::<_, HttpError>(Response::from_parts(parts, body))
        };
        // The timer, like the connection, belongs to the export runtime: the caller has none.
        let timeout = self.timeout;
        let attempt = async move { tokio::time::timeout(timeout, exchange).await };
        let answer = match self.runtime.spawn(attempt).await? {
            Ok(answer) => answer,
            Err(_) => Err("OTLP export timed out".into()),
        };
        self.note(match &answer {
            Ok(response) if response.status().is_success() => None,
            Ok(response) => Some(format!("the collector answered {}", response.status())),
            Err(e) => Some(e.to_string()),
        });
        answer
    }
}
