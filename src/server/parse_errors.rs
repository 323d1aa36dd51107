//! hyper's automatic HTTP/1 error answers, rewritten as envelopes.
//!
//! When hyper cannot parse a request head (bad method, header syntax,
//! conflicting `Content-Length`, obfuscated `Transfer-Encoding`, headers too
//! large…) it answers by itself — `400`/`431`/`414`/`505` with an empty body —
//! and closes the connection, before the gateway sees a request. hyper offers
//! no hook for this, so [`super::conn_io::ConnIo`] watches what hyper writes
//! and replaces exactly those answers (a bare status head with no body and no
//! `x-request-id`, which every gateway response carries) with the JSON error
//! envelope. Everything else passes through untouched. The 408 for a request
//! head cut short by the header deadline is written from here too.

use crate::envelope;
use http::{HeaderValue, StatusCode};
use std::sync::Arc;

/// How the connection layer's own answers look (from `[server]`).
#[derive(Clone, Debug)]
pub struct ErrorStyle {
    /// `server.error_type`.
    pub error_type: Arc<str>,
    /// `server.server_header`.
    pub server: HeaderValue,
}

/// A replacement being written; `claimed` is the length of hyper's bytes
/// that it stands for (reported written once the replacement is out).
pub(super) struct Replacement {
    pub(super) bytes: Vec<u8>,
    pub(super) written: usize,
    pub(super) claimed: usize,
}

/// The envelope for `buf` if it is one of hyper's automatic error answers.
pub(super) fn replacement(buf: &[u8], style: &ErrorStyle) -> Option<Vec<u8>> {
    let rest = buf.strip_prefix(b"HTTP/1.1 ")?;
    let code = rest.get(..3)?;
    if !matches!(code[0], b'4' | b'5') {
        return None;
    }
    // The whole write is one head with nothing after it.
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    if end != buf.len() {
        return None;
    }
    let head = std::str::from_utf8(&buf[..end]).ok()?.to_ascii_lowercase();
    if head.contains("\r\nx-request-id:")
        || !head.contains("\r\ncontent-length: 0\r\n")
        || head.contains("\r\ntransfer-encoding:")
    {
        return None;
    }
    let status = StatusCode::from_bytes(code).ok()?;
    let id = crate::request_id::new_request_id();
    let id = id.to_str().unwrap_or("-");
    let message = match status {
        StatusCode::BAD_REQUEST => "Malformed HTTP request",
        s => s.canonical_reason().unwrap_or("Malformed HTTP request"),
    };
    tracing::debug!(
        request_id = id,
        status = status.as_u16(),
        "request refused by the HTTP parser"
    );
    answer(status, message, id, style)
}

/// A whole HTTP/1.1 answer carrying the envelope; the connection closes after it.
pub(super) fn answer(
    status: StatusCode,
    message: &str,
    id: &str,
    style: &ErrorStyle,
) -> Option<Vec<u8>> {
    let resp = envelope::response(status, &style.error_type, message, id);
    let body = match resp.into_body() {
        crate::body::Body::Full(Some(b)) => b,
        _ => return None,
    };
    let mut out = format!(
        "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\nx-request-id: {id}\r\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        body.len(),
    )
    .into_bytes();
    out.extend_from_slice(b"server: ");
    out.extend_from_slice(style.server.as_bytes());
    out.extend_from_slice(b"\r\n\r\n");
    out.extend_from_slice(&body);
    Some(out)
}

/// Whether a write is an interim (1xx) answer such as `100 Continue`.
pub(super) fn is_interim(buf: &[u8]) -> bool {
    buf.starts_with(b"HTTP/1.1 1")
}

/// Cheap pre-check for the vectored path (the full check runs in `poll_write`).
pub(super) fn replacement_candidate(buf: &[u8]) -> bool {
    buf.starts_with(b"HTTP/1.1 4") || buf.starts_with(b"HTTP/1.1 5")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn style() -> ErrorStyle {
        ErrorStyle {
            error_type: Arc::from("ProxyServerError"),
            server: HeaderValue::from_static("portcullis"),
        }
    }

    #[test]
    fn hypers_bare_answers_become_envelopes() {
        let bare = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\ndate: Tue, 24 Nov 2026 09:00:00 GMT\r\n\r\n";
        let out = replacement(bare, &style()).expect("replaced");
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{text}");
        assert!(text.contains("content-type: application/json\r\n"));
        assert!(text.contains("server: portcullis\r\n"));
        let body = text.split("\r\n\r\n").nth(1).unwrap();
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["error"]["code"], 400);
        assert_eq!(v["error"]["type"], "ProxyServerError");
        let id = v["error"]["request_id"].as_str().unwrap();
        assert!(text.contains(&format!("x-request-id: {id}\r\n")));
        let big = b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\n\r\n";
        assert!(replacement(big, &style()).is_some());
    }

    #[test]
    fn gateway_answers_pass_untouched() {
        for buf in [
            &b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nx-request-id: 1\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
            b"HTTP/1.1 404 Not Found\r\ncontent-length: 2\r\n\r\n{}",
            b"HTTP/1.1 400 Bad Request\r\ncontent-length: 10\r\n\r\n",
            b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n",
            b"\x00\x00\x12\x04\x00\x00\x00\x00\x00",
        ] {
            assert!(replacement(buf, &style()).is_none(), "{buf:?}");
        }
    }
}
