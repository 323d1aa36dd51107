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
//!
//! The same wrapper answers the whole-header deadline (slowloris) with a 408
//! envelope: hyper's deadline ends the connection without a word, so the
//! wrapper follows where the connection is in reading a request head (bytes
//! read since the last answer, the blank line that ends a head not yet seen)
//! and, when the connection is dropped with a head half read, writes the 408
//! without waiting before the socket closes. An idle keep-alive connection
//! that times out (no byte of a new head) is closed silently, as before.
//!
//! The wrapper keeps HTTP/1's read deadlines itself (hyper's header timer is
//! off): `limits.idle_timeout` from the last byte written until a new head
//! starts, `limits.header_read_timeout` from a head's first byte until its
//! end. One timer per connection, re-armed lazily: a deadline that moved
//! later only re-arms the timer when the earlier one fires, so a busy
//! keep-alive connection costs one clock read per answer, not a timer per
//! request. When a deadline passes the read fails and hyper drops the
//! connection (with the 408 above if a head was half read).
//!
//! It also keeps `limits.send_timeout`, which hyper lacks: a device that
//! accepts no byte of its answer for that long gets its connection failed,
//! which drops the answer's body and with it the backend connection feeding
//! it (a slow reader cannot hold the backend pool).

use crate::body::StallTimer;
use crate::envelope;
use http::{HeaderValue, StatusCode};
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// What the wrapper needs from the configuration.
#[derive(Clone, Debug)]
pub struct ErrorStyle {
    /// `server.error_type`.
    pub error_type: Arc<str>,
    /// `server.server_header`.
    pub server: HeaderValue,
    /// `limits.send_timeout`.
    pub send_timeout: Duration,
    /// `limits.header_read_timeout`.
    pub header_timeout: Duration,
    /// `limits.idle_timeout`.
    pub idle_timeout: Duration,
}

/// A replacement being written; `claimed` is the length of hyper's bytes
/// that it stands for (reported written once the replacement is out).
struct Pending {
    bytes: Vec<u8>,
    written: usize,
    claimed: usize,
}

/// Where the connection is in reading a request head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Head {
    /// The next byte read starts a new request head.
    Awaiting,
    /// Only empty lines so far (which hyper skips before a request line).
    Blank,
    /// Part of a head was read; the count is the line feeds seen in a row at
    /// its end so far (carriage returns aside), two ending the head.
    Partial(u8),
    /// The head is complete; what is read next is its body.
    Complete,
    /// Not HTTP/1 (HTTP/2 or a protocol hyper refused): never a 408.
    Off,
}

impl Head {
    /// The state after reading `data` (not empty).
    fn after(self, data: &[u8]) -> Head {
        let (data, mut feeds) = match self {
            Head::Complete | Head::Off => return self,
            Head::Awaiting if data.starts_with(b"PRI * HTTP/2") => return Head::Off,
            Head::Awaiting | Head::Blank => {
                let start = data.iter().position(|b| !matches!(b, b'\r' | b'\n'));
                match start {
                    None => return Head::Blank,
                    Some(i) => (&data[i..], 0),
                }
            }
            Head::Partial(n) => (data, n),
        };
        // The common case: a whole head (and no body) in one read.
        if data.ends_with(b"\n\r\n") || data.ends_with(b"\n\n") {
            return Head::Complete;
        }
        for &b in data {
            match b {
                b'\n' if feeds == 1 => return Head::Complete,
                b'\n' => feeds = 1,
                b'\r' => {}
                _ => feeds = 0,
            }
        }
        Head::Partial(feeds)
    }
}

/// IO wrapper that turns hyper's bare HTTP/1 error answers into envelopes
/// and a request head cut short by the header deadline into a 408.
pub struct EnvelopeErrors<T: WriteNow> {
    inner: T,
    /// Shared by every connection (one pointer each, not a copy).
    style: Arc<ErrorStyle>,
    pending: Option<Pending>,
    head: Head,
    /// The send deadline (from the first write that waits since the last
    /// progress).
    send: StallTimer,
    /// When the current read wait began: the last write (idle), or the
    /// first byte of a head.
    since: Instant,
    /// The read deadline timer (allocated at the first wait) and the
    /// deadline it is set to.
    wait: Option<(Pin<Box<tokio::time::Sleep>>, Instant)>,
}

impl<T: WriteNow> EnvelopeErrors<T> {
    /// Wraps a connection's (plaintext) IO carrying HTTP/1 (or, with
    /// `server.h2c`, possibly HTTP/2 with prior knowledge).
    pub fn new(inner: T, style: Arc<ErrorStyle>) -> EnvelopeErrors<T> {
        EnvelopeErrors {
            inner,
            style,
            pending: None,
            head: Head::Awaiting,
            send: StallTimer::default(),
            since: Instant::now(),
            wait: None,
        }
    }

    /// Wraps a connection that speaks HTTP/2 (ALPN `h2`): no 408 on drop.
    pub fn http2(inner: T, style: Arc<ErrorStyle>) -> EnvelopeErrors<T> {
        let mut io = EnvelopeErrors::new(inner, style);
        io.head = Head::Off;
        io
    }

    /// Something was written: any answer but an interim one (`100
    /// Continue`, after which the body follows) ends the head being read,
    /// and the idle deadline runs from here. hyper may not read again before
    /// the device sends something, so the timer is armed from here too: when
    /// it fires, hyper's next read sees the error.
    fn wrote(&mut self, n: usize, interim: bool, cx: &mut Context<'_>) {
        self.send.progress();
        if n > 0 && !interim && self.head != Head::Off {
            self.head = Head::Awaiting;
            self.since = Instant::now();
            if self.read_deadline(cx).is_ready() {
                cx.waker().wake_by_ref();
            }
        }
    }

    /// A read has to wait: runs the idle or header deadline, an error once
    /// it passed. Bodies (and HTTP/2) have deadlines of their own elsewhere.
    fn read_deadline(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let limit = match self.head {
            Head::Awaiting => self.style.idle_timeout,
            Head::Blank | Head::Partial(_) => self.style.header_timeout,
            Head::Complete | Head::Off => return Poll::Pending,
        };
        let deadline = self.since + limit;
        let (timer, at) = self.wait.get_or_insert_with(|| {
            (
                Box::pin(tokio::time::sleep_until(deadline.into())),
                deadline,
            )
        });
        // Only an earlier deadline re-arms now; a later one waits for the
        // timer to fire at the old one.
        if *at > deadline {
            timer.as_mut().reset(deadline.into());
            *at = deadline;
        }
        loop {
            if timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            if *at >= deadline {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    match self.head {
                        Head::Awaiting => "idle keep-alive connection timed out",
                        _ => "request head not received in time",
                    },
                )));
            }
            timer.as_mut().reset(deadline.into());
            *at = deadline;
        }
    }

    /// A write had to wait: runs the send deadline, an error once it passed.
    fn waiting<R>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<R>> {
        ready!(self.send.poll_expired(self.style.send_timeout, cx));
        tracing::debug!("device stopped reading its answer: disconnected");
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "send timeout: the device stopped reading",
        )))
    }
}

impl<T: WriteNow> Drop for EnvelopeErrors<T> {
    fn drop(&mut self) {
        // Dropped with a head half read and nothing answered: the header
        // deadline fired (or the device gave up; then nobody reads this).
        if let Head::Blank | Head::Partial(_) = self.head {
            if self.pending.is_none() {
                let id = crate::request_id::new_request_id();
                let id = id.to_str().unwrap_or("-");
                tracing::debug!(request_id = id, "request head not received in time: 408");
                if let Some(bytes) = answer(
                    StatusCode::REQUEST_TIMEOUT,
                    "Request timeout",
                    id,
                    &self.style,
                ) {
                    self.inner.write_now(&bytes);
                }
            }
        }
    }
}

/// A last write that must not wait: what fits in the socket's buffer goes,
/// the rest is dropped with the connection.
pub trait WriteNow {
    /// Whether small vectored writes are best joined into one before
    /// reaching this stream ([`crate::coalesce`]); TLS joins them itself.
    const COALESCE: bool;

    /// Writes what `buf` can without blocking.
    fn write_now(&mut self, buf: &[u8]);
}

impl WriteNow for TcpStream {
    const COALESCE: bool = true;

    fn write_now(&mut self, mut buf: &[u8]) {
        while !buf.is_empty() {
            match self.try_write(buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf = &buf[n..],
            }
        }
    }
}

impl WriteNow for tokio_rustls::server::TlsStream<TcpStream> {
    const COALESCE: bool = false;

    fn write_now(&mut self, buf: &[u8]) {
        use std::io::Write;
        /// The socket as a `std::io::Write` that never blocks.
        struct NoWait<'a>(&'a TcpStream);
        impl Write for NoWait<'_> {
            fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
                self.0.try_write(buf)
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let (tcp, tls) = self.get_mut();
        if tls.writer().write_all(buf).is_err() {
            return;
        }
        tls.send_close_notify();
        while tls.wants_write() {
            match tls.write_tls(&mut NoWait(tcp)) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
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
fn answer(status: StatusCode, message: &str, id: &str, style: &ErrorStyle) -> Option<Vec<u8>> {
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

impl<T: AsyncWrite + WriteNow + Unpin> EnvelopeErrors<T> {
    /// Passes a vectored write to the stream, small buffers joined into one
    /// where the stream gains from it ([`WriteNow::COALESCE`]).
    fn write_vectored_inner(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let inner = Pin::new(&mut self.inner);
        if T::COALESCE {
            crate::coalesce::poll_write(inner, cx, bufs)
        } else {
            inner.poll_write_vectored(cx, bufs)
        }
    }

    /// Writes the pending replacement; `Ready(Ok(claimed))` once it is out.
    fn drive(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        while let Some(p) = self.pending.as_mut() {
            if p.written == p.bytes.len() {
                let claimed = p.claimed;
                self.pending = None;
                return Poll::Ready(Ok(claimed));
            }
            match Pin::new(&mut self.inner).poll_write(cx, &p.bytes[p.written..]) {
                Poll::Pending => return self.waiting(cx),
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => {
                    p.written += n;
                    self.send.progress();
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            }
        }
        Poll::Ready(Ok(0))
    }
}

impl<T: AsyncRead + WriteNow + Unpin> AsyncRead for EnvelopeErrors<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Pending => this.read_deadline(cx),
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Ready(Ok(())) => {
                if let Some(read) = buf.filled().get(before..).filter(|r| !r.is_empty()) {
                    let was = this.head;
                    this.head = was.after(read);
                    if was == Head::Awaiting && matches!(this.head, Head::Blank | Head::Partial(_))
                    {
                        // The header deadline runs from a head's first byte.
                        this.since = Instant::now();
                    }
                }
                Poll::Ready(Ok(()))
            }
        }
    }
}

impl<T: AsyncWrite + WriteNow + Unpin> AsyncWrite for EnvelopeErrors<T> {
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
                None => {
                    return match Pin::new(&mut this.inner).poll_write(cx, buf) {
                        Poll::Pending => this.waiting(cx),
                        Poll::Ready(result) => {
                            let n = result?;
                            this.wrote(n, is_interim(buf), cx);
                            Poll::Ready(Ok(n))
                        }
                    };
                }
            }
        }
        let n = ready!(this.drive(cx))?;
        this.wrote(n, false, cx);
        Poll::Ready(Ok(n))
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
            _ => match this.write_vectored_inner(cx, bufs) {
                Poll::Pending => this.waiting(cx),
                Poll::Ready(result) => {
                    let n = result?;
                    this.wrote(n, first.is_some_and(|b| is_interim(b)), cx);
                    Poll::Ready(Ok(n))
                }
            },
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.drive(cx))?;
        match Pin::new(&mut self.inner).poll_flush(cx) {
            Poll::Pending => self.waiting(cx),
            Poll::Ready(result) => {
                self.send.progress();
                Poll::Ready(result)
            }
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.drive(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Whether a write is an interim (1xx) answer such as `100 Continue`.
fn is_interim(buf: &[u8]) -> bool {
    buf.starts_with(b"HTTP/1.1 1")
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
            send_timeout: Duration::from_secs(60),
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
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
    fn head_tracking_finds_the_end_of_a_head() {
        let whole = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
        assert_eq!(Head::Awaiting.after(whole), Head::Complete);
        assert_eq!(
            Head::Awaiting.after(b"GET / HTTP/1.1\nHost: x\n\n"),
            Head::Complete
        );
        // Split anywhere, even inside the blank line.
        for cut in 1..whole.len() {
            let first = Head::Awaiting.after(&whole[..cut]);
            assert!(matches!(first, Head::Partial(_)), "cut {cut}: {first:?}");
            assert_eq!(first.after(&whole[cut..]), Head::Complete, "cut {cut}");
        }
        // A body after the head, in the same read or later, changes nothing.
        let with_body = b"POST / HTTP/1.1\r\nContent-Length: 4\r\n\r\nab";
        assert_eq!(Head::Awaiting.after(with_body), Head::Complete);
        assert_eq!(Head::Complete.after(b"cd"), Head::Complete);
        // HTTP/2 prior knowledge is never tracked.
        assert_eq!(
            Head::Awaiting.after(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
            Head::Off
        );
        assert_eq!(Head::Off.after(b"GET / HTTP/1.1\r\n"), Head::Off);
        // Empty lines before a request line are skipped, not a head's end.
        assert_eq!(Head::Awaiting.after(b"\r\n\r\n\r\n"), Head::Blank);
        assert_eq!(Head::Blank.after(b"\r\n"), Head::Blank);
        assert_eq!(Head::Blank.after(b"GET / HTTP/1.1\r\n\r\n"), Head::Complete);
        assert_eq!(
            Head::Awaiting.after(b"\r\nGET / HTTP/1.1\r\n"),
            Head::Partial(1)
        );
        // A lone line feed in a header line is not the end.
        assert_eq!(
            Head::Awaiting.after(b"GET / HTTP/1.1\r\nA: b\r\n"),
            Head::Partial(1)
        );
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
