//! Listeners and connection lifecycle: accept, connection cap, TLS (when
//! `server.tls` is set: handshake under `limits.tls_handshake_timeout`, ALPN
//! `h2`/`http/1.1`, certificate reloaded when its files change), HTTP/1.1 and
//! HTTP/2 on one port, graceful drain with a deadline.

use crate::body::Body;
use crate::config::Config;
use crate::config::Limits;
use crate::envelope::{self, GatewayError};
use crate::gateway::{self, State};
use crate::parse_errors::{EnvelopeErrors, ErrorStyle};
use arc_swap::ArcSwap;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, Semaphore};

/// The state being served, swapped atomically when the configuration is
/// reloaded. Requests in flight keep the state they started with.
pub struct Live {
    current: ArcSwap<State>,
}

impl Live {
    /// Starts serving `state`.
    pub fn new(state: Arc<State>) -> Arc<Live> {
        Arc::new(Live {
            current: ArcSwap::new(state),
        })
    }

    /// The state new requests use.
    pub fn state(&self) -> Arc<State> {
        self.current.load_full()
    }

    /// Reads, validates and swaps in the configuration at `path`. On any
    /// problem the running configuration stays and the problems are returned.
    /// On success, returns the changed settings that need a restart.
    pub fn reload(&self, path: &Path) -> Result<Vec<String>, Vec<String>> {
        let config = Config::load(path).map_err(|p| p.0)?;
        let (state, restart_needed) = self.state().reload(config)?;
        self.current.store(state);
        Ok(restart_needed)
    }
}

/// Serves the gateway on `listener` until `shutdown` completes, then stops
/// accepting and lets in-flight requests finish for up to
/// `server.drain_timeout` before returning.
pub async fn serve(
    listener: TcpListener,
    state: Arc<State>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    serve_live(listener, Live::new(state), shutdown).await
}

/// [`serve`] with a reloadable state.
pub async fn serve_live(
    listener: TcpListener,
    live: Arc<Live>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let state = live.state();
    if let Some(cluster) = state.sessions().cluster() {
        cluster.start();
    }
    state
        .start_commands()
        .await
        .map_err(|e| std::io::Error::other(format!("remote operations: {e}")))?;
    let limits = state.config.limits.clone();
    let drain_timeout = state.config.server.drain_timeout;
    let _anchor = AbortOnDrop(tokio::spawn(timer_anchor()));
    let connections = Arc::new(Semaphore::new(limits.max_connections));
    let builders = Builders {
        http1: Arc::new(http_builder(&limits, Protocols::Http1)),
        http2: Arc::new(http_builder(&limits, Protocols::Http2)),
        both: Arc::new(http_builder(&limits, Protocols::Both)),
    };
    let h2c = live.state().config.server.h2c;
    // hyper's own answers to unparsable requests become envelopes too.
    let style = Arc::new(ErrorStyle {
        error_type: Arc::from(state.config.server.error_type.as_str()),
        server: state.config.server.server_header.clone(),
        send_timeout: limits.send_timeout,
        header_timeout: limits.header_read_timeout,
        idle_timeout: limits.idle_timeout,
    });
    let (drain_tx, drain_rx) = watch::channel(false);
    let (done_tx, mut done_rx) = mpsc::channel::<()>(1);
    // HTTPS: the certificate is loaded (and its files watched) while we serve.
    let tls = match &state.config.server.tls {
        Some(files) => Some(crate::tls::ServerTls::start(files).map_err(std::io::Error::other)?),
        None => None,
    };

    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off briefly.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Ok(permit) = Arc::clone(&connections).try_acquire_owned() else {
            match &tls {
                None => {
                    tokio::spawn(refuse_overloaded(stream, live.state()));
                }
                Some(tls) => {
                    // Over TLS the 503 needs a handshake first; bounded in time.
                    let (acceptor, state) = (tls.acceptor.clone(), live.state());
                    tokio::spawn(async move {
                        let refuse = async {
                            if let Ok(s) = acceptor.accept(stream).await {
                                refuse_overloaded(s, state).await;
                            }
                        };
                        let _ = tokio::time::timeout(Duration::from_secs(2), refuse).await;
                    });
                }
            }
            continue;
        };
        let _ = stream.set_nodelay(true);
        let conn = ConnContext {
            // Plain connections: HTTP/1.1, plus HTTP/2 prior knowledge when
            // `server.h2c` is on. TLS: switched to what ALPN chose below.
            builder: Arc::clone(if h2c && tls.is_none() {
                &builders.both
            } else {
                &builders.http1
            }),
            watch_idle: h2c && tls.is_none(),
            live: Arc::clone(&live),
            peer,
            tls: tls.is_some(),
            idle_timeout: limits.idle_timeout,
            drain: drain_rx.clone(),
            done: done_tx.clone(),
        };
        let style = Arc::clone(&style);
        match &tls {
            None => {
                tokio::spawn(async move {
                    conn.serve(TokioIo::new(EnvelopeErrors::new(stream, style)))
                        .await;
                    drop(permit);
                });
            }
            Some(tls) => {
                let acceptor = tls.acceptor.clone();
                let handshake_timeout = limits.tls_handshake_timeout;
                let http2 = Arc::clone(&builders.http2);
                tokio::spawn(async move {
                    let mut conn = conn;
                    match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
                        Ok(Ok(stream)) => {
                            let io = if stream.get_ref().1.alpn_protocol() == Some(b"h2") {
                                conn.builder = http2;
                                conn.watch_idle = true;
                                EnvelopeErrors::http2(stream, style)
                            } else {
                                EnvelopeErrors::new(stream, style)
                            };
                            conn.serve(TokioIo::new(io)).await
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                    drop(permit);
                });
            }
        }
    }
    drop(listener);
    if let Some(commands) = live.state().commands() {
        // Cancel running commands first so requests waiting on them finish.
        commands.shutdown().await;
    }
    tracing::info!("draining connections (deadline {drain_timeout:?})");
    let _ = drain_tx.send(true);
    drop(done_tx);
    // Every connection task holds a `done` sender: recv() ends when all are gone.
    if tokio::time::timeout(drain_timeout, done_rx.recv())
        .await
        .is_err()
    {
        tracing::warn!("drain deadline reached; closing remaining connections");
    }
    Ok(())
}

/// Which protocols a connection builder speaks.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Protocols {
    Http1,
    Http2,
    Both,
}

/// One builder per protocol choice: an HTTP/1.1-only connection skips the
/// HTTP/2 preface detection and its buffers, which is most of an idle
/// connection's memory beyond hyper's own.
struct Builders {
    http1: Arc<auto::Builder<TokioExecutor>>,
    http2: Arc<auto::Builder<TokioExecutor>>,
    both: Arc<auto::Builder<TokioExecutor>>,
}

/// A connection builder with the `[limits]` applied.
fn http_builder(limits: &Limits, protocols: Protocols) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder = match protocols {
        Protocols::Http1 => builder.http1_only(),
        Protocols::Http2 => builder.http2_only(),
        Protocols::Both => builder,
    };
    // HTTP/1.1's idle and header deadlines are kept by the IO wrapper under
    // hyper (`parse_errors`): one lazily re-armed timer per connection
    // instead of hyper's timer per request, and the two limits apart.
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(None)
        .max_buf_size(limits.max_header_bytes.max(8192))
        .max_headers(limits.max_headers);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.h2_max_concurrent_streams)
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        // Rapid-reset and error-reset floods: GOAWAY past these counts.
        .max_pending_accept_reset_streams(Some(64))
        .max_local_error_reset_streams(Some(256))
        .keep_alive_interval(Some(limits.idle_timeout))
        .keep_alive_timeout(Duration::from_secs(20));
    builder
}

/// What one accepted connection needs.
pub struct ConnContext {
    builder: Arc<auto::Builder<TokioExecutor>>,
    /// Whether this connection needs the idle watchdog (HTTP/2 may).
    watch_idle: bool,
    live: Arc<Live>,
    peer: SocketAddr,
    tls: bool,
    idle_timeout: Duration,
    drain: watch::Receiver<bool>,
    done: mpsc::Sender<()>,
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
    async fn serve<I>(self, io: I)
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

/// Over the connection cap: a short 503 envelope and close, never a pile-up.
async fn refuse_overloaded<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S, state: Arc<State>) {
    let id = gateway::new_request_id();
    let resp = envelope::gateway_error(
        &GatewayError::Unavailable,
        &state.config.server.error_type,
        id.to_str().unwrap_or("-"),
    );
    let body = match resp.into_body() {
        Body::Full(Some(b)) => b,
        _ => bytes::Bytes::new(),
    };
    let head = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\nserver: {}\r\nx-request-id: {}\r\n\r\n",
        body.len(),
        state
            .config
            .server
            .server_header
            .to_str()
            .unwrap_or("portcullis"),
        id.to_str().unwrap_or("-")
    );
    let write = async {
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(&body).await?;
        stream.shutdown().await?;
        // Lingering close: drain what the client sent (its request) until it
        // closes, so closing with unread data does not reset the connection
        // and destroy the 503 before the client read it. Bounded by the timeout.
        let mut sink = [0u8; 2048];
        while stream.read(&mut sink).await? > 0 {}
        Ok::<(), std::io::Error>(())
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), write).await;
}

/// Binds `addr` and serves until SIGINT/SIGTERM. With a configuration path,
/// SIGHUP reloads it: a valid new configuration is swapped in atomically
/// (sessions and in-flight requests survive), an invalid one is refused with
/// its problems logged and the running one keeps serving.
pub async fn run(
    state: Arc<State>,
    addr: SocketAddr,
    config_path: Option<PathBuf>,
) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    tracing::info!(listen = %listener.local_addr()?, "portcullis serving");
    let live = Live::new(state);
    let (admin_stop, admin_stopped) = tokio::sync::oneshot::channel::<()>();
    if let Some(admin) = live.state().config.server.admin_listen {
        let admin_listener = TcpListener::bind(admin).await?;
        tracing::info!(listen = %admin_listener.local_addr()?, "admin endpoints (/metrics, /healthz, /readyz)");
        tokio::spawn(serve_admin(admin_listener, Arc::clone(&live), async {
            let _ = admin_stopped.await;
        }));
    }
    if let Some(path) = config_path {
        tokio::spawn(reload_on_sighup(Arc::clone(&live), path));
    }
    let result = serve_live(listener, live, shutdown_signal()).await;
    let _ = admin_stop.send(());
    result
}

/// Keeps a timer due within the second, so that the timer driver's next
/// planned wake-up is never further away. tokio interrupts its event loop
/// (an `eventfd` write and one more turn of the loop) whenever a timer is
/// armed earlier than that wake-up; without this, a request's deadline armed
/// while only long idle timers were pending did so (about one request in
/// 23 under load). With it, only deadlines under a second can.
async fn timer_anchor() {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Serves the admin endpoints until `shutdown`: `/metrics` (Prometheus),
/// `/healthz` (the process is up), `/readyz` (a configuration is loaded and
/// the backend accepts connections). Bind it to a private address.
pub async fn serve_admin(
    listener: TcpListener,
    live: Arc<Live>,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((s, _)) => s,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
            () = &mut shutdown => return,
        };
        let live = Arc::clone(&live);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let live = Arc::clone(&live);
                async move { Ok::<_, Infallible>(admin(&live, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn admin(live: &Live, req: Request<Incoming>) -> Response<Body> {
    let state = live.state();
    let text = |status: http::StatusCode, ctype: &'static str, body: String| {
        let mut r = Response::new(Body::full(body));
        *r.status_mut() = status;
        r.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static(ctype),
        );
        r
    };
    if req.method() != http::Method::GET {
        return envelope::gateway_error(
            &GatewayError::MethodNotAllowed(vec![http::Method::GET]),
            &state.config.server.error_type,
            "-",
        );
    }
    match req.uri().path() {
        "/metrics" => {
            let metrics = state.metrics();
            metrics
                .session_entries
                .set(i64::try_from(state.sessions().entry_count().await).unwrap_or(i64::MAX));
            metrics
                .response_buffer_bytes
                .set(i64::try_from(state.read_ahead_bytes()).unwrap_or(i64::MAX));
            text(
                http::StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                metrics.encode(),
            )
        }
        "/healthz" => text(
            http::StatusCode::OK,
            "application/json",
            r#"{"status":"ok"}"#.into(),
        ),
        "/readyz" => {
            let address = &state.config.backend.address;
            let reachable = tokio::time::timeout(
                state.config.backend.connect_timeout,
                TcpStream::connect(address.as_str()),
            )
            .await
            .is_ok_and(|r| r.is_ok());
            if reachable {
                text(
                    http::StatusCode::OK,
                    "application/json",
                    r#"{"status":"ready"}"#.into(),
                )
            } else {
                envelope::response(
                    http::StatusCode::SERVICE_UNAVAILABLE,
                    &state.config.server.error_type,
                    "Backend not reachable",
                    "-",
                )
            }
        }
        _ => envelope::gateway_error(
            &GatewayError::NotFound,
            &state.config.server.error_type,
            "-",
        ),
    }
}

async fn reload_on_sighup(live: Arc<Live>, path: PathBuf) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            tracing::warn!("cannot listen for SIGHUP; configuration reload disabled");
            return;
        };
        while hup.recv().await.is_some() {
            match live.reload(&path) {
                Ok(restart_needed) => {
                    tracing::info!(config = %path.display(), "configuration reloaded");
                    for w in &live.state().config.warnings {
                        tracing::warn!("{w}");
                    }
                    for key in restart_needed {
                        tracing::warn!("changed setting {key} takes effect only after a restart");
                    }
                }
                Err(problems) => {
                    tracing::error!(config = %path.display(), "configuration reload refused; still serving the previous one");
                    for p in problems {
                        tracing::error!("  {p}");
                    }
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = (live, path);
    }
}

/// Completes on SIGINT (Ctrl-C) or SIGTERM.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let term = async {
            match signal(SignalKind::terminate()) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {},
            () = term => {},
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
    tracing::info!("shutdown signal received");
}
