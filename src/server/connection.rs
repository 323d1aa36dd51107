//! One device connection served by hyper: the per-request service (each
//! request takes the state current when it arrives), the drain, and the idle
//! watchdog HTTP/2 connections need (HTTP/1.1's idle deadline is kept by
//! [`super::conn_io`]).

use super::live::Live;
use crate::body::Body;
use crate::gateway;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::TokioExecutor;
use hyper_util::server::conn::auto;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;
use tokio::sync::{mpsc, watch};

/// What one accepted connection needs.
pub(super) struct ConnContext {
    pub(super) builder: Arc<auto::Builder<TokioExecutor>>,
    /// Whether this connection needs the idle watchdog (HTTP/2 may).
    pub(super) watch_idle: bool,
    pub(super) live: Arc<Live>,
    pub(super) peer: SocketAddr,
    pub(super) tls: bool,
    pub(super) idle_timeout: Duration,
    pub(super) drain: watch::Receiver<bool>,
    pub(super) done: mpsc::Sender<()>,
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
    /// Serves HTTP/1.1 or HTTP/2 on `io` until the peer leaves, the
    /// connection stays idle past `limits.idle_timeout`, or the server drains
    /// (then in-flight requests finish first).
    pub(super) async fn serve<I>(self, io: I)
    where
        I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        let ConnContext {
            builder,
            watch_idle,
            live,
            peer,
            tls,
            idle_timeout,
            mut drain,
            done,
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
    }
}
