//! The IO under hyper on every device connection: [`ConnIo`] keeps the
//! connection deadlines hyper lacks or keeps per request, and lets
//! [`super::parse_errors`] rewrite hyper's bare error answers.
//!
//! Read deadlines (HTTP/1; hyper's header timer is off):
//! `limits.idle_timeout` from the last byte written until a new head starts,
//! `limits.header_read_timeout` from a head's first byte until its end. One
//! timer per connection, re-armed lazily: a deadline that moved later only
//! re-arms the timer when the earlier one fires, so a busy keep-alive
//! connection costs one clock read per answer, not a timer per request. When
//! a deadline passes the read fails and hyper drops the connection.
//!
//! The wrapper follows where the connection is in reading a request head
//! (bytes read since the last answer, the blank line that ends a head not yet
//! seen): when the connection is dropped with a head half read (the header
//! deadline, a slowloris), it writes a 408 envelope without waiting before the
//! socket closes. An idle keep-alive connection that times out (no byte of a
//! new head) is closed silently. An interim `100 Continue` ends no head, so a
//! slow body after it is not cut here (bodies have their own deadline).
//!
//! The send deadline (`limits.send_timeout`): a device that accepts no byte
//! of its answer for that long gets its connection failed, which drops the
//! answer's body and with it the backend connection feeding it (a slow
//! reader cannot hold the backend pool).
//!
//! Parking (HTTP/1.1 only): the same timer first runs to the park point
//! ([`Deadlines::park`] after the last answer, no byte of a new head read, no
//! write waiting). There it raises [`Quiet::due`]; the connection task then
//! ends hyper's connection without closing the socket and keeps only this
//! wrapper ([`ConnIo::parked`] waits for the socket to be readable or the idle
//! deadline). Bytes hyper had read ahead are handed back and replayed to the
//! next hyper connection first ([`ConnIo::replay`]). The head state, the time
//! the wait began and the timer stay in the wrapper, so the idle and header
//! deadlines run across a park exactly as without it.
//!
//! Longer than the crate's 600-line guide on purpose: one IO type whose poll
//! methods drive the deadline state they share; split, the state machine would
//! be read in two places.

use super::parse_errors::{
    answer, is_interim, replacement, replacement_candidate, ErrorStyle, Replacement,
};
use crate::body::StallTimer;
use bytes::Bytes;
use http::StatusCode;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// A device connection's deadlines (from `[limits]`).
#[derive(Clone, Copy, Debug)]
pub struct Deadlines {
    /// `limits.idle_timeout`: from the last answer until a new request head starts.
    pub idle: Duration,
    /// `limits.header_read_timeout`: from a head's first byte until its end.
    pub header_read: Duration,
    /// `limits.send_timeout`: the longest a write may wait for the device.
    pub send: Duration,
    /// How long an HTTP/1.1 connection idles (after its last answer, no byte
    /// of a new head) before it is parked; see the module documentation.
    pub park: Duration,
}

/// Shared by a parkable connection's IO, its service and its task.
#[derive(Default, Debug)]
pub struct Quiet {
    /// Requests whose answer has not ended (counted from the service call
    /// until hyper drops the answer's body).
    pub in_flight: AtomicUsize,
    /// Raised by the IO at the park point; lowered by any byte read or written.
    pub due: AtomicBool,
}

impl Quiet {
    /// Whether the connection may be parked now: the park point passed and
    /// no answer is still being sent.
    pub fn ready_to_park(&self) -> bool {
        self.due.load(Ordering::Relaxed) && self.in_flight.load(Ordering::Relaxed) == 0
    }
}

/// Where a parkable connection is in its idle period.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Park {
    /// Not parkable (HTTP/2, h2c).
    Never,
    /// The park point is ahead (from the last answer).
    Armed,
    /// Passed (or given up) for this idle period: only the idle deadline is left.
    Passed,
}

/// What [`ConnIo`] needs from the configuration; one per server, shared by
/// every connection (one pointer each, not a copy).
#[derive(Clone, Debug)]
pub struct ConnSettings {
    /// How its own answers look.
    pub errors: ErrorStyle,
    /// Its deadlines.
    pub deadlines: Deadlines,
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

/// A device connection's IO: read and send deadlines, hyper's bare HTTP/1
/// error answers turned into envelopes, and a request head cut short by the
/// header deadline answered with a 408.
pub struct ConnIo<T: DeviceIo> {
    inner: T,
    /// Shared by every connection (one pointer each, not a copy).
    settings: Arc<ConnSettings>,
    /// One of hyper's answers being replaced by [`super::parse_errors`]
    /// (rare: boxed, so that every connection does not carry its room).
    pending: Option<Box<Replacement>>,
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
    park: Park,
    /// Parkable connections: shared with the service and the task.
    quiet: Option<Arc<Quiet>>,
    /// Bytes hyper had read ahead when it was parked: read again first.
    replay: Bytes,
}

impl<T: DeviceIo> ConnIo<T> {
    /// Wraps a connection's (plaintext) IO carrying HTTP/1 (or, with
    /// `server.h2c`, possibly HTTP/2 with prior knowledge).
    pub fn new(inner: T, settings: Arc<ConnSettings>) -> ConnIo<T> {
        ConnIo {
            inner,
            settings,
            pending: None,
            head: Head::Awaiting,
            send: StallTimer::default(),
            since: Instant::now(),
            wait: None,
            park: Park::Never,
            quiet: None,
            replay: Bytes::new(),
        }
    }

    /// Wraps a connection carrying HTTP/1 only, which may be parked when
    /// idle: `quiet` is shared with its service and task.
    pub fn parkable(inner: T, settings: Arc<ConnSettings>, quiet: Arc<Quiet>) -> ConnIo<T> {
        let mut io = ConnIo::new(inner, settings);
        io.park = Park::Armed;
        io.quiet = Some(quiet);
        io
    }

    /// Hands `bytes` (read ahead by the hyper connection just ended) to the
    /// next reads, before anything from the socket; they were seen when first
    /// read, so the head state does not change. Returns whether they hold a
    /// whole head, to be served at once; otherwise (none, or part of a
    /// pipelined head) they are kept in a buffer of their own while parked.
    pub fn replay(&mut self, bytes: Bytes) -> bool {
        if bytes.is_empty() {
            // Dropped here: an empty `Bytes` from hyper still holds its buffer.
            return false;
        }
        let whole = Head::Awaiting.after(&bytes) == Head::Complete;
        self.replay = if whole {
            self.unpark();
            bytes
        } else {
            Bytes::copy_from_slice(&bytes)
        };
        whole
    }

    /// With `server.h2c`, before any protocol is chosen: reads until the
    /// bytes read either are HTTP/2's connection preface or cannot be
    /// (under the idle, then the header deadline), and keeps them to be read
    /// again by the connection chosen. `Ok(None)`: closed before a byte.
    pub async fn sniff_http2(&mut self) -> io::Result<Option<bool>>
    where
        T: AsyncRead + Unpin,
    {
        const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
        let mut buf = [0u8; 24];
        let mut filled = 0;
        let http2 = loop {
            let n = tokio::io::AsyncReadExt::read(self, &mut buf[filled..]).await?;
            if n == 0 && filled == 0 {
                return Ok(None);
            }
            filled += n;
            let read = buf.get(..filled).unwrap_or_default();
            if n == 0 || !PREFACE.starts_with(read) {
                break false;
            }
            if filled == PREFACE.len() {
                break true;
            }
        };
        self.replay = Bytes::copy_from_slice(buf.get(..filled).unwrap_or_default());
        if http2 {
            self.head = Head::Off;
            self.park = Park::Never;
            self.quiet = None;
        }
        Ok(Some(http2))
    }

    /// Waits, parked, for the device: `Ok` when the socket is readable, an
    /// error when the idle deadline passes (or the socket failed).
    pub async fn parked(&mut self) -> io::Result<()> {
        std::future::poll_fn(|cx| match self.inner.poll_read_ready(cx) {
            Poll::Ready(result) => Poll::Ready(result),
            Poll::Pending => self.read_deadline(cx),
        })
        .await?;
        self.unpark();
        Ok(())
    }

    /// Back in hyper's hands: the park point of this idle period has been
    /// used; the next answer arms a new one.
    fn unpark(&mut self) {
        if let Some(quiet) = &self.quiet {
            quiet.due.store(false, Ordering::Relaxed);
            self.park = Park::Passed;
        }
    }

    /// Any byte read or written: a new park point follows the next answer.
    fn active(&mut self) {
        if self.park == Park::Passed {
            self.park = Park::Armed;
            if let Some(quiet) = &self.quiet {
                quiet.due.store(false, Ordering::Relaxed);
            }
        }
    }

    /// Wraps a connection that speaks HTTP/2 (ALPN `h2`): no 408 on drop.
    pub fn http2(inner: T, settings: Arc<ConnSettings>) -> ConnIo<T> {
        let mut io = ConnIo::new(inner, settings);
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
        self.active();
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
        let idle = self.settings.deadlines.idle;
        let mut parking = self.head == Head::Awaiting && self.park == Park::Armed;
        let limit = match self.head {
            Head::Awaiting if parking => self.settings.deadlines.park.min(idle),
            Head::Awaiting => idle,
            Head::Blank | Head::Partial(_) => self.settings.deadlines.header_read,
            Head::Complete | Head::Off => return Poll::Pending,
        };
        let mut deadline = self.since + limit;
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
            if *at >= deadline && parking && limit < idle {
                // The park point: tell the task (woken by this timer, it
                // looks right after polling hyper), then on to the idle
                // deadline. Not while a write waits: hyper is not idle then,
                // and that write's progress arms a new park point.
                self.park = Park::Passed;
                parking = false;
                if !self.send.waiting() {
                    if let Some(quiet) = &self.quiet {
                        quiet.due.store(true, Ordering::Relaxed);
                    }
                }
                deadline = self.since + idle;
            } else if *at >= deadline {
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
        ready!(self.send.poll_expired(self.settings.deadlines.send, cx));
        tracing::debug!("device stopped reading its answer: disconnected");
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "send timeout: the device stopped reading",
        )))
    }
}

impl<T: DeviceIo> Drop for ConnIo<T> {
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
                    &self.settings.errors,
                ) {
                    self.inner.write_now(&bytes);
                }
            }
        }
    }
}

/// What [`ConnIo`] needs of a device stream beyond reading and writing.
pub trait DeviceIo {
    /// Whether small vectored writes are best joined into one before
    /// reaching this stream ([`crate::coalesce`]); TLS joins them itself.
    const COALESCE: bool;

    /// A last write that must not wait: what fits in the socket's buffer
    /// goes, the rest is dropped with the connection.
    fn write_now(&mut self, buf: &[u8]);

    /// `Ready` once the socket underneath has something to read (or failed).
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
}

impl DeviceIo for TcpStream {
    const COALESCE: bool = true;

    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        TcpStream::poll_read_ready(self, cx)
    }

    fn write_now(&mut self, mut buf: &[u8]) {
        while !buf.is_empty() {
            match self.try_write(buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf = &buf[n..],
            }
        }
    }
}

impl DeviceIo for tokio_rustls::server::TlsStream<TcpStream> {
    const COALESCE: bool = false;

    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_ref().0.poll_read_ready(cx)
    }

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

impl<T: AsyncWrite + DeviceIo + Unpin> ConnIo<T> {
    /// Passes a vectored write to the stream, small buffers joined into one
    /// where the stream gains from it ([`DeviceIo::COALESCE`]).
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

impl<T: AsyncRead + DeviceIo + Unpin> AsyncRead for ConnIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if !this.replay.is_empty() {
            let n = this.replay.len().min(buf.remaining());
            buf.put_slice(&this.replay.split_to(n));
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Pending => this.read_deadline(cx),
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Ready(Ok(())) => {
                if let Some(read) = buf.filled().get(before..).filter(|r| !r.is_empty()) {
                    this.active();
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

impl<T: AsyncWrite + DeviceIo + Unpin> AsyncWrite for ConnIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.pending.is_none() {
            match replacement(buf, &this.settings.errors) {
                Some(bytes) => {
                    this.pending = Some(Box::new(Replacement {
                        bytes,
                        written: 0,
                        claimed: buf.len(),
                    }))
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
