//! sidecache: a sidecar reverse proxy in front of one legacy HTTP backend, with a shared Redis
//! response cache and rate limits that a failing Redis can never turn into failed requests.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod admin;
pub mod cache;
pub mod config;
pub mod metrics;
pub mod proxy;
pub mod ratelimit;
pub mod respond;
pub mod route;
pub mod server;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod upstream;

use std::future::Future;

use bytes::Bytes;
use http_body_util::{Either, Full};

pub use config::Config;
pub use server::{Sidecache, StartError};

/// Every body the proxy sends or receives: streamed from a peer (and perhaps recorded for the
/// cache), or written whole by the proxy. An enum rather than a boxed body, so pass-through costs
/// no allocation for it.
pub type Body = Either<cache::body::RecordingBody, Full<Bytes>>;

/// Bind, serve until `shutdown` resolves, drain, return.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), StartError> {
    Sidecache::bind(config).await?.run(shutdown).await
}
