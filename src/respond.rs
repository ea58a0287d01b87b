//! Every response the proxy writes itself, and the one place where typed errors become HTTP.

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::{Either, Full};

use crate::upstream::UpstreamError;
use crate::Body;

/// A short plain-text response.
pub fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut resp = Response::new(Either::Right(Full::new(Bytes::from_static(body.as_bytes()))));
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    resp
}

/// `405` with an `Allow` header naming what is accepted instead.
pub fn method_not_allowed(body: &'static str) -> Response<Body> {
    let mut resp = text(StatusCode::METHOD_NOT_ALLOWED, body);
    resp.headers_mut().insert(header::ALLOW, HeaderValue::from_static("GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"));
    resp
}

/// A JSON response.
pub fn json(status: StatusCode, body: String) -> Response<Body> {
    let mut resp = Response::new(Either::Right(Full::new(Bytes::from(body))));
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// The answer to a failed upstream exchange: 504 when a time budget ran out, 502 otherwise,
/// with a one-line reason (never the error's details: they can name internal hosts).
pub fn upstream_error(e: &UpstreamError) -> Response<Body> {
    match e {
        UpstreamError::Timeout => text(StatusCode::GATEWAY_TIMEOUT, "upstream did not respond in time\n"),
        UpstreamError::ConnectTimeout(_) => text(StatusCode::GATEWAY_TIMEOUT, "upstream connect timed out\n"),
        UpstreamError::Connect(_) => text(StatusCode::BAD_GATEWAY, "upstream unreachable\n"),
        UpstreamError::Protocol(_) => text(StatusCode::BAD_GATEWAY, "upstream closed the connection\n"),
    }
}
