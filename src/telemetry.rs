//! Tracing set-up: JSON or pretty lines on stdout, level from `RUST_LOG` or `log.level` (which a
//! configuration reload changes). The access log is the `sidecache::access` target at debug level.

use std::sync::OnceLock;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{fmt, reload, EnvFilter, Layer, Registry};

use crate::config::{LogConfig, LogFormat};

/// Changes the filter of the installed subscriber; unset while `RUST_LOG` decides.
static LEVEL: OnceLock<reload::Handle<EnvFilter, Registry>> = OnceLock::new();

/// Install the global subscriber. `RUST_LOG`, when set and valid, wins over `log.level`.
pub fn init(log: &LogConfig) {
    let from_env = std::env::var("RUST_LOG").ok().and_then(|v| EnvFilter::try_new(v).ok());
    let by_config = from_env.is_none();
    let (filter, handle) = reload::Layer::new(from_env.unwrap_or_else(|| EnvFilter::new(&log.level)));
    let lines = match log.format {
        LogFormat::Json => {
            fmt::layer().json().flatten_event(true).with_current_span(true).with_span_list(false).boxed()
        }
        LogFormat::Pretty => fmt::layer().boxed(),
    };
    if tracing_subscriber::registry().with(filter).with(lines).try_init().is_ok() && by_config {
        let _ = LEVEL.set(handle);
    }
}

/// Apply a new `log.level` (no effect while `RUST_LOG` decides, or before [`init`]).
pub fn set_level(level: &str) {
    if let (Some(handle), Ok(filter)) = (LEVEL.get(), EnvFilter::try_new(level)) {
        if let Err(e) = handle.reload(filter) {
            tracing::warn!(error = %e, "log.level not changed");
        }
    }
}
