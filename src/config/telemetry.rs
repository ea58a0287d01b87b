//! `[telemetry]` and the standard `OTEL_*` variables: whether traces are exported, and what the
//! table contributes where no variable speaks. Variables win over the table; the OpenTelemetry
//! SDK reads the variables itself (endpoint, headers, timeout, sampler, batch sizes, resource),
//! so only what decides on or off, and what the SDK would silently get wrong, is checked here.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use http::Uri;

use super::raw::RawTelemetry;
use super::validate::Validator;
use super::FieldError;

/// Base URL of the collector, as in `OTEL_EXPORTER_OTLP_ENDPOINT`.
const ENDPOINT: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";
/// Full URL of the collector's traces endpoint.
const TRACES_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT";
/// The only OTLP encoding this build sends.
const HTTP_PROTOBUF: &str = "http/protobuf";
/// The service name when neither a variable nor the table gives one.
const DEFAULT_SERVICE_NAME: &str = "sidecache";
/// OTLP's default time budget of one export.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// The samplers the SDK offers (`OTEL_TRACES_SAMPLER`); it would silently take another for a
/// name it does not know.
const SAMPLERS: [&str; 6] = [
    "always_on",
    "always_off",
    "traceidratio",
    "parentbased_always_on",
    "parentbased_always_off",
    "parentbased_traceidratio",
];

/// Traces are exported: `[telemetry] otlp_endpoint` or an `OTEL_EXPORTER_OTLP_*ENDPOINT` is set,
/// and neither `OTEL_SDK_DISABLED=true` nor `OTEL_TRACES_EXPORTER=none` turns them off.
#[derive(Debug, Clone, PartialEq)]
pub struct TelemetryConfig {
    /// The traces URL from `[telemetry] otlp_endpoint` (`/v1/traces` appended); `None` when an
    /// `OTEL_EXPORTER_OTLP_*ENDPOINT` variable is set, which the exporter reads itself.
    pub traces_endpoint: Option<String>,
    /// `service.name`: `[telemetry] service_name`, default `sidecache`; `None` when
    /// `OTEL_SERVICE_NAME` or `service.name` in `OTEL_RESOURCE_ATTRIBUTES` names it (the SDK's
    /// resource detectors read those).
    pub service_name: Option<String>,
    /// `[telemetry] sample_ratio`: sample this share of new traces and follow the caller's
    /// decision on continued ones (`parentbased_traceidratio`); `None` when `OTEL_TRACES_SAMPLER`
    /// is set (the SDK reads it) or no ratio is configured (the SDK default: every trace).
    pub sample_ratio: Option<f64>,
    /// One export attempt's time budget: `OTEL_EXPORTER_OTLP_TRACES_TIMEOUT` or
    /// `OTEL_EXPORTER_OTLP_TIMEOUT` (milliseconds), default 10 s.
    pub timeout: Duration,
    /// PEM CA certificates trusted for an `https://` collector besides the public web roots:
    /// `OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE` or `OTEL_EXPORTER_OTLP_CERTIFICATE`.
    pub ca_file: Option<PathBuf>,
}

/// `http://` or `https://` with a host: what the exporter can post to.
fn check_endpoint(s: &str) -> Result<(), String> {
    let uri: Uri = s.parse().map_err(|e| format!("{s:?} is not a URL: {e}"))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) {
        return Err(format!("{s:?} must start with http:// or https:// (OTLP over HTTP)"));
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(format!("{s:?} has no host"));
    }
    Ok(())
}

impl Validator {
    /// `[telemetry]` with the environment; `None` when traces are off.
    pub(super) fn telemetry(&mut self, raw: RawTelemetry, env: &HashMap<String, String>) -> Option<TelemetryConfig> {
        let mut err = |field: &str, message: String| self.errors.push(FieldError { field: field.into(), message });
        let endpoint =
            raw.otlp_endpoint.filter(|e| check_endpoint(e).map_err(|m| err("telemetry.otlp_endpoint", m)).is_ok());
        if let Some(name) = raw.service_name.as_deref().filter(|n| n.trim().is_empty()) {
            err("telemetry.service_name", format!("{name:?} must not be empty"));
        }
        if let Some(ratio) = raw.sample_ratio.filter(|r| !(0.0..=1.0).contains(r)) {
            err("telemetry.sample_ratio", format!("{ratio} is not a ratio from 0 to 1"));
        }

        let var = |name: &str| env.get(name).map(|v| v.trim()).filter(|v| !v.is_empty());
        // OTEL_SDK_DISABLED: only "true" disables (the specification's boolean).
        let disabled = var("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true"));
        let exporter = var("OTEL_TRACES_EXPORTER");
        let from_env = var(TRACES_ENDPOINT).is_some() || var(ENDPOINT).is_some();
        if disabled || exporter == Some("none") || !(from_env || endpoint.is_some()) {
            return None;
        }
        if let Some(other) = exporter.filter(|e| *e != "otlp") {
            err("OTEL_TRACES_EXPORTER", format!("{other:?} is not supported (otlp, none)"));
        }
        for name in [TRACES_ENDPOINT, ENDPOINT] {
            if let Some(Err(msg)) = var(name).map(check_endpoint) {
                err(name, msg);
            }
        }
        // Without this check the exporter would fall back to http/protobuf with a warning and post
        // to a gRPC port.
        for name in ["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"] {
            if let Some(other) = var(name).filter(|p| *p != HTTP_PROTOBUF) {
                err(name, format!("{other:?} is not supported ({HTTP_PROTOBUF})"));
            }
        }

        // The sampler and its argument, which the SDK would replace by its default with a warning
        // that nobody sees (it runs before logging starts).
        let sampler = var("OTEL_TRACES_SAMPLER");
        if let Some(other) = sampler.filter(|s| !SAMPLERS.contains(s)) {
            err("OTEL_TRACES_SAMPLER", format!("{other:?} is not supported ({})", SAMPLERS.join(", ")));
        }
        if let Some(arg) =
            var("OTEL_TRACES_SAMPLER_ARG").filter(|_| sampler.is_some_and(|s| s.ends_with("traceidratio")))
        {
            if !arg.parse::<f64>().is_ok_and(|r| (0.0..=1.0).contains(&r)) {
                err("OTEL_TRACES_SAMPLER_ARG", format!("{arg:?} is not a ratio from 0 to 1"));
            }
        }
        let mut timeout = DEFAULT_TIMEOUT;
        for name in ["OTEL_EXPORTER_OTLP_TIMEOUT", "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT"] {
            match var(name).map(|v| v.parse::<u64>()) {
                Some(Ok(ms)) if ms > 0 => timeout = Duration::from_millis(ms),
                Some(_) => err(name, format!("{:?} is not a number of milliseconds above 0", var(name).unwrap_or(""))),
                None => {}
            }
        }
        let ca_file =
            var("OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE").or(var("OTEL_EXPORTER_OTLP_CERTIFICATE")).map(PathBuf::from);
        for name in [
            "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE",
            "OTEL_EXPORTER_OTLP_CLIENT_KEY",
            "OTEL_EXPORTER_OTLP_TRACES_CLIENT_CERTIFICATE",
            "OTEL_EXPORTER_OTLP_TRACES_CLIENT_KEY",
        ] {
            if var(name).is_some() {
                err(name, "client certificates for the collector are not supported".into());
            }
        }

        let names_service = var("OTEL_SERVICE_NAME").is_some()
            || var("OTEL_RESOURCE_ATTRIBUTES").is_some_and(|attributes| {
                attributes.split(',').any(|kv| kv.split_once('=').is_some_and(|(k, _)| k.trim() == "service.name"))
            });
        Some(TelemetryConfig {
            traces_endpoint: if from_env {
                None
            } else {
                endpoint.map(|e| format!("{}/v1/traces", e.trim_end_matches('/')))
            },
            service_name: (!names_service).then(|| raw.service_name.unwrap_or_else(|| DEFAULT_SERVICE_NAME.into())),
            sample_ratio: raw.sample_ratio.filter(|_| sampler.is_none()),
            timeout,
            ca_file,
        })
    }
}
