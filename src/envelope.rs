//! The one place errors become responses: `{"error": {"code", "type", "message", "request_id"}}`.
//!
//! Every refusal the gateway raises is a [`GatewayError`]; every non-2xx answer
//! from a backend goes through [`from_backend`]. Nothing else writes an error
//! body, so no device ever sees HTML, a stack trace or an internal host name.

use crate::body::Body;
use bytes::Bytes;
use http::header::{HeaderValue, ALLOW, CONTENT_TYPE, RETRY_AFTER};
use http::{Method, Response, StatusCode};
use serde::Serialize;

/// The errors the gateway raises itself. Messages of the first rows are those
/// of django-proxy-server, which device apps already match on.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("Received API KEY not found in server API KEYS set")]
    ApiKey,
    #[error("A public service cannot receive a user token")]
    TokenOnPublic,
    #[error("A private service requires a user token")]
    TokenRequired,
    #[error("Token invalid")]
    TokenInvalid,
    #[error("Not found")]
    NotFound,
    #[error("Method Not Allowed")]
    MethodNotAllowed(Vec<Method>),
    #[error("Bad request: {0}")]
    BadRequest(&'static str),
    #[error("Request body too large")]
    PayloadTooLarge,
    #[error("Request timeout")]
    RequestTimeout,
    #[error("Too many requests")]
    TooManyRequests { retry_after_secs: u64 },
    #[error("{0}")]
    Forbidden(&'static str),
    #[error("Could not connect to service")]
    BackendUnreachable,
    #[error("Unknown response format")]
    BadBackendResponse,
    #[error("Service did not answer in time")]
    BackendTimeout,
    #[error("Service unavailable")]
    Unavailable,
}

impl GatewayError {
    /// The HTTP status this error is answered with.
    pub fn status(&self) -> StatusCode {
        use GatewayError::*;
        match self {
            ApiKey | TokenInvalid | Forbidden(_) => StatusCode::FORBIDDEN,
            TokenOnPublic | TokenRequired | BadRequest(_) => StatusCode::BAD_REQUEST,
            NotFound => StatusCode::NOT_FOUND,
            MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            BackendUnreachable | BadBackendResponse => StatusCode::BAD_GATEWAY,
            BackendTimeout => StatusCode::GATEWAY_TIMEOUT,
            Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

#[derive(Serialize)]
struct Envelope<'a> {
    error: Inner<'a>,
}

#[derive(Serialize)]
struct Inner<'a> {
    code: u16,
    #[serde(rename = "type")]
    kind: &'a str,
    message: &'a str,
    request_id: &'a str,
}

/// Builds an envelope response with the given status, type and message.
pub fn response(status: StatusCode, kind: &str, message: &str, request_id: &str) -> Response<Body> {
    let envelope = Envelope {
        error: Inner {
            code: status.as_u16(),
            kind,
            message,
            request_id,
        },
    };
    // Serializing a struct of strings and an integer cannot fail.
    let json = serde_json::to_vec(&envelope).unwrap_or_default();
    let mut resp = Response::new(Body::full(json));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// The response for an error the gateway raised.
pub fn gateway_error(err: &GatewayError, error_type: &str, request_id: &str) -> Response<Body> {
    let message = err.to_string();
    let mut resp = response(err.status(), error_type, &message, request_id);
    match err {
        GatewayError::MethodNotAllowed(methods) => {
            let allow = methods
                .iter()
                .map(Method::as_str)
                .collect::<Vec<_>>()
                .join(", ");
            if let Ok(v) = HeaderValue::from_str(&allow) {
                resp.headers_mut().insert(ALLOW, v);
            }
        }
        GatewayError::TooManyRequests { retry_after_secs } => {
            resp.headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from(*retry_after_secs));
        }
        _ => {}
    }
    resp
}

/// What a backend's non-2xx body turned into.
#[derive(Debug, PartialEq, Eq)]
pub struct BackendError {
    pub kind: String,
    pub message: String,
}

/// Longest `type`/`message` copied from a backend's error object.
const MAX_FIELD: usize = 1024;

fn clip(s: &str) -> String {
    match s.char_indices().nth(MAX_FIELD) {
        Some((i, _)) => s[..i].to_owned(),
        None => s.to_owned(),
    }
}

/// Normalizes a backend's non-2xx body:
/// an `error` object keeps its `type` and `message`; other JSON or an empty body
/// becomes `BackendError` with the reason phrase; anything else (HTML, text)
/// gets a generic message and is never passed on.
pub fn from_backend(status: StatusCode, body: &[u8]) -> BackendError {
    let reason = status.canonical_reason().unwrap_or("Error").to_owned();
    let generic = BackendError {
        kind: "BackendError".into(),
        message: reason,
    };
    if body.iter().all(u8::is_ascii_whitespace) {
        return generic;
    }
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(body) else {
        return generic;
    };
    let Some(err) = value.get("error").and_then(|e| e.as_object()) else {
        return generic;
    };
    let kind = err
        .get("type")
        .and_then(|t| t.as_str())
        .filter(|t| !t.is_empty())
        .map(clip)
        .unwrap_or(generic.kind);
    let message = err
        .get("message")
        .and_then(|m| m.as_str())
        .map(clip)
        .unwrap_or(generic.message);
    BackendError { kind, message }
}

/// Truncates a backend body for a debug log line.
pub fn log_excerpt(body: &Bytes) -> String {
    String::from_utf8_lossy(&body[..body.len().min(512)]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_error_object_is_kept() {
        let e = from_backend(
            StatusCode::CONFLICT,
            br#"{"error": {"code": 1, "type": "OrderLocked", "message": "locked"}}"#,
        );
        assert_eq!(e.kind, "OrderLocked");
        assert_eq!(e.message, "locked");
    }

    #[test]
    fn other_bodies_are_generic() {
        for body in [
            &b""[..],
            b"{\"detail\": 1}",
            b"<html>Traceback</html>",
            b"\xff\xfe",
        ] {
            let e = from_backend(StatusCode::INTERNAL_SERVER_ERROR, body);
            assert_eq!(e.kind, "BackendError");
            assert_eq!(e.message, "Internal Server Error");
        }
    }

    #[test]
    fn envelope_shape() {
        let r = gateway_error(
            &GatewayError::MethodNotAllowed(vec![Method::GET]),
            "ProxyServerError",
            "r1",
        );
        assert_eq!(r.status(), 405);
        assert_eq!(r.headers()[ALLOW], "GET");
    }
}
