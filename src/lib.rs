//! sidecache: a sidecar reverse proxy in front of one legacy HTTP backend, with a shared Redis
//! response cache and rate limits that a failing Redis can never turn into failed requests.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod admin;
pub mod app;
pub mod body;
pub mod cache;
pub mod clock;
pub mod config;
pub mod deadline;
pub mod metrics;
pub mod proxy;
pub mod ratelimit;
pub mod reload;
pub mod respond;
pub mod route;
pub mod server;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod upstream;

use std::future::Future;

pub use app::Sidecache;
pub use body::Body;
pub use clock::Clock;
pub use config::Config;
pub use server::StartError;

/// Bind, serve until `shutdown` resolves, drain, return.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), StartError> {
    Sidecache::bind(config).await?.run(shutdown).await
}
