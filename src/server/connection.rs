//! One device connection served by hyper: the per-request service (each
//! request takes the state current when it arrives), the drain, the parking
//! of idle HTTP/1.1 connections, and the idle watchdog HTTP/2 connections
//! need (HTTP/1.1's idle deadline is kept by [`super::conn_io`]).
//!
//! Parking: an HTTP/1.1 connection runs hyper's connection in a box of its
//! own. When the IO reports the park point ([`Quiet`]: idle since its last
//! answer for `Deadlines::park`, no byte of a new head, nothing in flight),
//! the task asks hyper for a graceful shutdown, which ends an idle hyper
//! connection at once without closing the socket; it takes back the IO, the
//! bytes hyper read ahead and the service, and drops the box (hyper's
//! buffers with it). The parked task holds the IO and waits for the socket
//! to be readable, the idle deadline or the drain; bytes start a fresh hyper
//! connection on the same IO and service (same peer, same request-id rules,
//! same limits). A hyper connection that is not idle when asked (a request
//! body still arriving after its answer) is left to finish and then closed,
//! as a graceful shutdown does.

use super::accept::Builders;
use super::conn_io::{ConnIo, DeviceIo, Quiet};
use super::live::Live;
use crate::body::Body;
use crate::gateway;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::sync::Mutex;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit};

/// What one accepted connection needs.
pub(super) struct ConnContext {
    pub(super) live: Arc<Live>,
    pub(super) peer: SocketAddr,
    pub(super) tls: bool,
    pub(super) idle_timeout: Duration,
    pub(super) drain: watch::Receiver<bool>,
    pub(super) done: mpsc::Sender<()>,
    /// The connection's place under `limits.max_connections`, held until it ends.
    pub(super) permit: OwnedSemaphorePermit,
}

/// Per-connection activity, for the idle timeout.
#[derive(Default)]
struct Activity {
    in_flight: AtomicUsize,
    last: Mutex<Option<tokio::time::Instant>>,
}

/// One request in progress on a watched connection: counted while it runs,
/// and its end marks the connection active.
struct InFlight(Arc<Activity>);

impl InFlight {
    fn new(activity: Arc<Activity>) -> InFlight {
        activity.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(activity)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
        if let Ok(mut last) = self.0.last.lock() {
            *last = Some(tokio::time::Instant::now());
        }
    }
}

/// An answer being sent on a parkable connection: counted from the service
/// call until hyper drops the answer's body (its end, or the connection's).
struct Answering(Arc<Quiet>);

impl Answering {
    fn new(quiet: &Arc<Quiet>) -> Answering {
        quiet.in_flight.fetch_add(1, Ordering::Relaxed);
        Answering(Arc::clone(quiet))
    }
}

impl Drop for Answering {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

pin_project_lite::pin_project! {
    /// An answer's body holding its [`Answering`] until dropped.
    struct Counted {
        #[pin]
        body: Body,
        answering: Answering,
    }
}

impl http_body::Body for Counted {
    type Data = bytes::Bytes;
    type Error = crate::body::BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        self.project().body.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

pin_project_lite::pin_project! {
    /// A parkable connection's answer future: the answer's body counted
    /// until it is dropped.
    struct CountedFuture<F> {
        #[pin]
        inner: F,
        answering: Option<Answering>,
    }
}

impl<F: Future<Output = Response<Body>>> Future for CountedFuture<F> {
    type Output = Result<Response<Counted>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let resp = std::task::ready!(this.inner.poll(cx));
        let Some(answering) = this.answering.take() else {
            // Polled after completion: hyper never does.
            return Poll::Pending;
        };
        Poll::Ready(Ok(resp.map(|body| Counted { body, answering })))
    }
}

/// Until the server drains (or is gone).
async fn drained(drain: &mut watch::Receiver<bool>) {
    let _ = drain.wait_for(|d| *d).await;
}

/// How a hyper connection on a parkable connection ended.
enum Ended {
    /// Closed (by the device, an error, a deadline, `connection: close`, the drain).
    Closed(hyper::Result<()>),
    /// Idle and handed back: park it.
    Parked,
}

/// A response future as the `Result` hyper's services answer with.
fn async_infallible<F: Future<Output = Response<Body>>>(
    f: F,
) -> impl Future<Output = Result<Response<Body>, Infallible>> {
    InfallibleFuture { inner: f }
}

pin_project_lite::pin_project! {
    struct InfallibleFuture<F> {
        #[pin]
        inner: F,
    }
}

impl<F: Future<Output = Response<Body>>> Future for InfallibleFuture<F> {
    type Output = Result<Response<Body>, Infallible>;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        self.project().inner.poll(cx).map(Ok)
    }
}

impl ConnContext {
    /// With `server.h2c`: reads the first bytes to choose, then serves
    /// HTTP/2 with prior knowledge or [`Self::serve_parkable`].
    pub(super) async fn serve_h2c<T>(
        self,
        builders: Arc<Builders>,
        mut io: ConnIo<T>,
        quiet: Arc<Quiet>,
    ) where
        T: AsyncRead + AsyncWrite + DeviceIo + Unpin + Send + 'static,
    {
        // Counted open while the protocol is not known yet.
        let metrics = Arc::clone(self.live.state().metrics());
        metrics.open_connections.inc();
        let sniffed = io.sniff_http2().await;
        metrics.open_connections.dec();
        match sniffed {
            // Boxed: HTTP/2's connection future is large.
            Ok(Some(true)) => {
                let io = TokioIo::new(io);
                Box::pin(self.serve(&builders.http2, true, io)).await;
            }
            Ok(Some(false)) => self.serve_parkable(builders, io, quiet).await,
            Ok(None) => {}
            Err(e) => {
                tracing::debug!(peer = %self.peer, error = %e, "connection ended with an error");
            }
        }
    }

    /// Serves HTTP/1.1 on `io` (made with [`ConnIo::parkable`] and `quiet`)
    /// until the peer leaves, the connection stays idle past
    /// `limits.idle_timeout`, or the server drains (then in-flight requests
    /// finish first); parked while idle (see the module documentation).
    ///
    /// The future returned is a plain connection's whole task, and what it
    /// keeps across a park is what an idle connection costs: it is built
    /// here, outside it, and holds only what the connection needs (an `async
    /// fn` would keep its arguments twice), and every part of it that is not
    /// kept while parked (hyper's connection, a shutdown) is boxed.
    pub(super) fn serve_parkable<T>(
        self,
        builders: Arc<Builders>,
        mut io: ConnIo<T>,
        quiet: Arc<Quiet>,
    ) -> impl Future<Output = ()> + Send
    where
        T: AsyncRead + AsyncWrite + DeviceIo + Unpin + Send + 'static,
    {
        let ConnContext {
            live,
            peer,
            tls,
            idle_timeout: _,
            mut drain,
            done,
            permit,
        } = self;
        let metrics = Arc::clone(live.state().metrics());
        metrics.open_connections.inc();
        let device = Arc::new(gateway::Peer::new(peer, tls));
        let mut service = {
            let quiet = Arc::clone(&quiet);
            hyper::service::service_fn(move |req: Request<Incoming>| {
                let answering = Some(Answering::new(&quiet));
                // Boxed, as in `serve`; the guard rides on the answer's body.
                let answer = gateway::handle(live.state(), req, Arc::clone(&device), ());
                Box::pin(CountedFuture {
                    inner: answer,
                    answering,
                })
            })
        };
        async move {
            let builder = &builders.http1;
            loop {
                // One hyper connection, in a box of its own that is freed
                // before the task parks: hyper's buffers and state (and the
                // box) are gone while parked, and its run adds nothing to the
                // size of this task. `None`: the connection was closed.
                //
                // In a block of its own: a binding of what the run hands back
                // still in scope across the park would be kept in the task
                // (248 bytes) though moved out.
                {
                    let ran = Box::pin(async {
                        let mut conn = builder.serve_connection(TokioIo::new(io), service);
                        let mut closing = false;
                        let ended = loop {
                            tokio::select! {
                                biased;
                                result = std::future::poll_fn(|cx| conn.poll_without_shutdown(cx)) => {
                                    break Ended::Closed(result);
                                }
                                () = drained(&mut drain), if !closing => {
                                    closing = true;
                                    Pin::new(&mut conn).graceful_shutdown();
                                }
                                () = std::future::poll_fn(|_| {
                                    // Raised by the IO's timer, which wakes this task.
                                    if quiet.ready_to_park() { Poll::Ready(()) } else { Poll::Pending }
                                }), if !closing => {
                                    // An idle hyper connection ends at once (without
                                    // closing the socket); a busy one finishes its
                                    // exchange and is closed.
                                    Pin::new(&mut conn).graceful_shutdown();
                                    let polled = std::future::poll_fn(|cx| {
                                        Poll::Ready(conn.poll_without_shutdown(cx))
                                    })
                                    .await;
                                match polled {
                                    Poll::Ready(Ok(())) => break Ended::Parked,
                                    Poll::Ready(Err(e)) => break Ended::Closed(Err(e)),
                                    Poll::Pending => closing = true,
                                }
                            }
                        }
                    };
                    match ended {
                        Ended::Closed(Err(e)) => {
                            tracing::debug!(%peer, error = %e, "connection ended with an error");
                            None
                        }
                        Ended::Closed(Ok(())) => {
                            // What hyper's own future does at its end.
                            let mut io = conn.into_parts().io.into_inner();
                            let _ = io.shutdown().await;
                            None
                        }
                        Ended::Parked => {
                            let parts = conn.into_parts();
                            Some((parts.io.into_inner(), parts.service, parts.read_buf))
                        }
                    }
                })
                .await;
                    match ran {
                        Some((back, kept, read_ahead)) => {
                            (io, service) = (back, kept);
                            // Bytes read ahead (pipelined) are never lost: a whole
                            // head is served at once by a fresh hyper connection,
                            // part of one waits parked for the rest (copied out of
                            // hyper's buffer).
                            if io.replay(read_ahead) {
                                continue;
                            }
                        }
                        None => break,
                    }
                }
                metrics.parked_connections.inc();
                let woken = tokio::select! {
                    biased;
                    result = io.parked() => Some(result.is_ok()),
                    () = drained(&mut drain) => None,
                };
                metrics.parked_connections.dec();
                match woken {
                    Some(true) => {}
                    // The idle deadline (closed without a word, as unparked).
                    Some(false) => break,
                    // Draining: closed as hyper closes an idle connection.
                    None => {
                        let _ = Box::pin(io.shutdown()).await;
                        break;
                    }
                }
            }
            metrics.open_connections.dec();
            drop(done);
            drop(permit);
        }
    }

    /// Serves HTTP/2, or HTTP/1.1 and HTTP/2 (`server.h2c`), on `io` until
    /// the peer leaves, the connection stays idle past `limits.idle_timeout`,
    /// or the server drains (then in-flight requests finish first).
    pub(super) async fn serve<I>(
        self,
        builder: &auto::Builder<TokioExecutor>,
        watch_idle: bool,
        io: I,
    ) where
        I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        let ConnContext {
            live,
            peer,
            tls,
            idle_timeout,
            mut drain,
            done,
            permit,
        } = self;
        let metrics = Arc::clone(live.state().metrics());
        metrics.open_connections.inc();
        // Only connections that need the idle watchdog track activity.
        let activity = watch_idle.then(|| Arc::new(Activity::default()));
        let device = Arc::new(gateway::Peer::new(peer, tls));
        // hyper's own `service_fn`: called by reference, so nothing is cloned
        // per request, and hyper's per-connection slot for the in-flight
        // future holds only the box below (tower's adapter kept a clone of
        // the service and the request there: about 270 B more per connection).
        let service = {
            let activity = activity.clone();
            hyper::service::service_fn(move |req: Request<Incoming>| {
                // Each request takes the state current when it arrives.
                let in_flight = activity.as_ref().map(|a| InFlight::new(Arc::clone(a)));
                // Boxed: the request future is large, and hyper keeps the
                // in-flight future inside the connection; boxing keeps idle
                // connections small and avoids copying the state machine.
                // `handle` is the whole future (no wrapping `async` block,
                // which would hold its own copy of the request).
                let answer = gateway::handle(live.state(), req, Arc::clone(&device), in_flight);
                Box::pin(async_infallible(answer))
            })
        };
        let conn = builder.serve_connection(io, service);
        tokio::pin!(conn);
        let started = tokio::time::Instant::now();
        let mut closing = false;
        let mut tick = activity
            .as_ref()
            .map(|_| tokio::time::interval((idle_timeout / 4).max(Duration::from_millis(50))));
        if let Some(t) = tick.as_mut() {
            t.tick().await;
        }
        loop {
            let next_tick = async {
                match tick.as_mut() {
                    Some(t) => {
                        t.tick().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            // Biased: the connection (polled on every wake-up) first, and no
            // random branch order to draw on each poll.
            tokio::select! {
                biased;
                result = conn.as_mut() => {
                    if let Err(e) = result {
                        tracing::debug!(%peer, error = %e, "connection ended with an error");
                    }
                    break;
                }
                _ = drain.wait_for(|d| *d), if !closing => {
                    closing = true;
                    conn.as_mut().graceful_shutdown();
                }
                () = next_tick, if !closing => {
                    let Some(activity) = &activity else { continue };
                    let idle_since = activity
                        .last
                        .lock()
                        .ok()
                        .and_then(|l| *l)
                        .unwrap_or(started);
                    if activity.in_flight.load(Ordering::Relaxed) == 0
                        && idle_since.elapsed() >= idle_timeout
                    {
                        closing = true;
                        conn.as_mut().graceful_shutdown();
                    }
                }
            }
        }
        metrics.open_connections.dec();
        drop(done);
        drop(permit);
    }
}
