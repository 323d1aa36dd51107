//! hyper's automatic HTTP/1 error answers, rewritten as envelopes.
//!
//! When hyper cannot parse a request head (bad method, header syntax,
//! conflicting `Content-Length`, obfuscated `Transfer-Encoding`, headers too
//! large…) it answers by itself — `400`/`431`/`414`/`505` with an empty body —
//! and closes the connection, before the gateway sees a request. hyper offers
//! no hook for this, so [`EnvelopeErrors`] wraps the connection's IO and
//! replaces exactly those answers (a bare status head with no body and no
//! `x-request-id`, which every gateway response carries) with the JSON
//! envelope of SPEC §2. Everything else passes through untouched.

use crate::envelope;
use http::{HeaderValue, StatusCode};
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// What the replacement needs from the configuration.
#[derive(Clone, Debug)]
pub struct ErrorStyle {
    /// `server.error_type`.
    pub error_type: Arc<str>,
    /// `server.server_header`.
    pub server: HeaderValue,
}

/// A replacement being written; `claimed` is the length of hyper's bytes
/// that it stands for (reported written once the replacement is out).
struct Pending {
    bytes: Vec<u8>,
    written: usize,
    claimed: usize,
}

/// IO wrapper that turns hyper's bare HTTP/1 error answers into envelopes.
pub struct EnvelopeErrors<T> {
    inner: T,
    style: ErrorStyle,
    pending: Option<Pending>,
}

impl<T> EnvelopeErrors<T> {
    /// Wraps a connection's (plaintext) IO.
    pub fn new(inner: T, style: ErrorStyle) -> EnvelopeErrors<T> {
        EnvelopeErrors {
            inner,
            style,
            pending: None,
        }
    }
}

/// The envelope for `buf` if it is one of hyper's automatic error answers.
fn replacement(buf: &[u8], style: &ErrorStyle) -> Option<Vec<u8>> {
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
    let id = crate::gateway::new_request_id();
    let id = id.to_str().unwrap_or("-");
    let message = match status {
        StatusCode::BAD_REQUEST => "Malformed HTTP request",
        s => s.canonical_reason().unwrap_or("Malformed HTTP request"),
    };
    let resp = envelope::response(status, &style.error_type, message, id);
    let body = match resp.into_body() {
        crate::body::Body::Full(Some(b)) => b,
        _ => return None,
    };
    tracing::debug!(
        request_id = id,
        status = status.as_u16(),
        "request refused by the HTTP parser"
    );
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

impl<T: AsyncWrite + Unpin> EnvelopeErrors<T> {
    /// Writes the pending replacement; `Ready(Ok(claimed))` once it is out.
    fn drive(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        while let Some(p) = self.pending.as_mut() {
            if p.written == p.bytes.len() {
                let claimed = p.claimed;
                self.pending = None;
                return Poll::Ready(Ok(claimed));
            }
            match ready!(Pin::new(&mut self.inner).poll_write(cx, &p.bytes[p.written..])) {
                Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Ok(n) => p.written += n,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        Poll::Ready(Ok(0))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for EnvelopeErrors<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for EnvelopeErrors<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.pending.is_none() {
            match replacement(buf, &this.style) {
                Some(bytes) => {
                    this.pending = Some(Pending {
                        bytes,
                        written: 0,
                        claimed: buf.len(),
                    })
                }
                None => return Pin::new(&mut this.inner).poll_write(cx, buf),
            }
        }
        this.drive(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let first = bufs.iter().find(|b| !b.is_empty());
        let intercept = this.pending.is_some()
            || (bufs.iter().filter(|b| !b.is_empty()).count() == 1
                && first.is_some_and(|b| replacement_candidate(b)));
        match first {
            Some(b) if intercept => Pin::new(this).poll_write(cx, b),
            _ => Pin::new(&mut this.inner).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.drive(cx))?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.drive(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Cheap pre-check for the vectored path (the full check runs in `poll_write`).
fn replacement_candidate(buf: &[u8]) -> bool {
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
