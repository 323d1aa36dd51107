//! The one body type that flows through the gateway in both directions.
//!
//! An enum rather than a boxed trait object, so the hot path (a device body
//! streamed to the backend, a backend body streamed to the device) allocates
//! nothing per request for the body itself.

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::Incoming;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

/// Errors a body can fail with.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A request or response body.
pub enum Body {
    /// No body.
    Empty,
    /// A body held in memory (an envelope, a buffered chunked upload).
    Full(Option<Bytes>),
    /// A body streamed from a peer (device request, backend response).
    Incoming(Incoming),
    /// A backend response body on a pooled connection (with its own
    /// between-reads deadline, so the hot path boxes nothing).
    Pooled(crate::upstream::PooledBody),
    /// Anything else (streams produced by other modules).
    Boxed(UnsyncBoxBody<Bytes, BoxError>),
}

impl Body {
    /// A body from bytes in memory.
    pub fn full(bytes: impl Into<Bytes>) -> Body {
        let bytes = bytes.into();
        if bytes.is_empty() {
            Body::Empty
        } else {
            Body::Full(Some(bytes))
        }
    }

    /// Boxes any body with compatible types.
    pub fn boxed<B>(body: B) -> Body
    where
        B: HttpBody<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        use http_body_util::BodyExt;
        Body::Boxed(body.map_err(Into::into).boxed_unsync())
    }
}

impl HttpBody for Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            Body::Empty => Poll::Ready(None),
            Body::Full(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            Body::Incoming(inner) => Pin::new(inner).poll_frame(cx).map_err(Into::into),
            Body::Pooled(inner) => Pin::new(inner).poll_frame(cx),
            Body::Boxed(inner) => Pin::new(inner).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Body::Empty => true,
            Body::Full(data) => data.is_none(),
            Body::Incoming(inner) => inner.is_end_stream(),
            Body::Pooled(inner) => inner.is_end_stream(),
            Body::Boxed(inner) => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Empty => SizeHint::with_exact(0),
            Body::Full(data) => SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64)),
            Body::Incoming(inner) => inner.size_hint(),
            Body::Pooled(inner) => inner.size_hint(),
            Body::Boxed(inner) => inner.size_hint(),
        }
    }
}

/// A device body that went quiet for longer than `limits.body_read_timeout`.
#[derive(Debug, thiserror::Error)]
#[error("request body read timed out")]
pub struct BodyTimeout;

/// Whether `err` (or anything in its source chain) is a [`BodyTimeout`].
pub fn is_body_timeout(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if e.is::<BodyTimeout>() {
            return true;
        }
        cur = e.source();
    }
    false
}

/// A body whose reads must each complete within a deadline (hyper has no
/// between-reads timeout): slow-body attacks end with [`BodyTimeout`]
/// instead of holding a connection and a backend slot, and a backend that
/// stalls mid-answer cannot hold a device forever. Only time spent waiting
/// for the inner body counts, not time the reader took to ask again.
pub struct TimedBody {
    inner: Body,
    deadline: ReadDeadline,
}

impl TimedBody {
    /// Wraps `inner`; each frame must arrive within `timeout` of the previous one.
    pub fn new(inner: Body, timeout: std::time::Duration) -> TimedBody {
        TimedBody {
            inner,
            deadline: ReadDeadline::new(timeout),
        }
    }
}

/// "No progress for too long": the timer runs from the first wait since the
/// last progress, and only while waiting. Its sleep is allocated at the
/// first wait ever: what never waits (the common case for small bodies and
/// answers) never touches the timer.
#[derive(Default)]
pub struct StallTimer {
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    armed: bool,
}

impl StallTimer {
    /// Progress was made: the next wait starts a new period.
    pub fn progress(&mut self) {
        self.armed = false;
    }

    /// Whether a wait is running (no progress since it began).
    pub fn waiting(&self) -> bool {
        self.armed
    }

    /// A wait: `Ready` once `timeout` has passed since the first wait after
    /// the last progress.
    pub fn poll_expired(&mut self, timeout: std::time::Duration, cx: &mut Context<'_>) -> Poll<()> {
        let sleep = match &mut self.sleep {
            Some(sleep) => {
                if !self.armed {
                    sleep.as_mut().reset(tokio::time::Instant::now() + timeout);
                }
                sleep
            }
            None => self.sleep.insert(Box::pin(tokio::time::sleep(timeout))),
        };
        self.armed = true;
        sleep.as_mut().poll(cx)
    }
}

/// A between-reads deadline for a body.
pub struct ReadDeadline {
    timeout: std::time::Duration,
    stall: StallTimer,
}

impl ReadDeadline {
    /// A deadline of `timeout` between frames.
    pub fn new(timeout: std::time::Duration) -> ReadDeadline {
        ReadDeadline {
            timeout,
            stall: StallTimer::default(),
        }
    }

    /// What to answer for an inner poll: a frame disarms the deadline; a
    /// `Pending` arms it, and becomes a [`BodyTimeout`] once it has passed.
    pub fn check<E: From<BodyTimeout>>(
        &mut self,
        polled: Poll<Option<Result<Frame<Bytes>, E>>>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, E>>> {
        if polled.is_ready() {
            self.stall.progress();
            return polled;
        }
        self.stall
            .poll_expired(self.timeout, cx)
            .map(|()| Some(Err(BodyTimeout.into())))
    }
}

impl HttpBody for TimedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        this.deadline.check(polled, cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
