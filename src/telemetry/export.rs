//! The OTLP exporter's HTTP transport: hyper-util's pooled client with rustls (ring), the stack
//! the proxy already uses for its upstream, running on a runtime of its own. The SDK's batch
//! processor calls it from its own thread; each attempt is spawned on that runtime (hyper needs
//! one) and bounded in time, so neither a request nor shutdown can wait on a collector.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use opentelemetry_http::{HttpClient, HttpError, Request, Response};

use crate::tls::{self, TlsError};

/// One export attempt at most: OTLP's default timeout. The exporter's own
/// `OTEL_EXPORTER_OTLP_TIMEOUT` bounds its retries around the attempts.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
/// A collector's answer is a small status message; a larger one is not read.
const MAX_RESPONSE_BYTES: usize = 64 * 1024;
/// TCP connect budget to the collector.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Posts export requests to the collector (`http://`, or `https://` verified against the public
/// web roots).
pub(super) struct Transport {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    runtime: tokio::runtime::Handle,
}

impl Transport {
    /// A client whose connections live on `runtime`.
    pub(super) fn new(runtime: tokio::runtime::Handle) -> Result<Transport, TlsError> {
        let mut http = HttpConnector::new();
        http.set_connect_timeout(Some(CONNECT_TIMEOUT));
        http.set_nodelay(true);
        http.enforce_http(false);
        let connector = HttpsConnectorBuilder::new()
            .with_tls_config(tls::upstream_client_config(None)?)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_max_idle_per_host(2)
            .build(connector);
        Ok(Transport { client, runtime })
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
            let body = Limited::new(body, MAX_RESPONSE_BYTES).collect().await?.to_bytes();
            Ok::<_, HttpError>(Response::from_parts(parts, body))
        };
        // The timer, like the connection, belongs to the export runtime: the caller has none.
        let attempt = async move { tokio::time::timeout(ATTEMPT_TIMEOUT, exchange).await };
        match self.runtime.spawn(attempt).await? {
            Ok(answer) => answer,
            Err(_) => Err("OTLP export timed out".into()),
        }
    }
}
