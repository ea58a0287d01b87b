//! `[telemetry]` and the standard `OTEL_*` variables: whether traces are exported, and what the
//! table contributes where no variable speaks. Variables win over the table; the OpenTelemetry
//! SDK reads the variables itself (endpoint, headers, timeout, sampler, batch sizes, resource),
//! so only what decides on or off, and what the SDK would silently get wrong, is checked here.

use std::collections::HashMap;

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
            sample_ratio: raw.sample_ratio.filter(|_| var("OTEL_TRACES_SAMPLER").is_none()),
        })
    }
}
