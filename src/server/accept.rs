//! The accept loop: connection cap (a 503 envelope past it), TLS handshake
//! under `limits.tls_handshake_timeout` with ALPN `h2`/`http/1.1`, one hyper
//! connection builder per protocol choice, and the graceful drain.

use super::conn_io::{ConnIo, ConnSettings, Deadlines, Quiet};
use super::connection::ConnContext;
use super::live::Live;
use super::parse_errors::ErrorStyle;
use crate::body::Body;
use crate::config::Limits;
use crate::envelope::{self, GatewayError};
use crate::gateway::State;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch, Semaphore};

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
    let builders = Arc::new(Builders {
        http1: http1_builder(&limits),
        http2: http2_builder(&limits),
    });
    let h2c = live.state().config.server.h2c;
    // hyper's own answers to unparsable requests become envelopes too.
    let settings = Arc::new(ConnSettings {
        errors: ErrorStyle {
            error_type: Arc::from(state.config.server.error_type.as_str()),
            server: state.config.server.server_header.clone(),
        },
        deadlines: Deadlines {
            idle: limits.idle_timeout,
            header_read: limits.header_read_timeout,
            send: limits.send_timeout,
            park: park_after(limits.idle_timeout),
        },
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
            live: Arc::clone(&live),
            peer,
            tls: tls.is_some(),
            idle_timeout: limits.idle_timeout,
            drain: drain_rx.clone(),
            done: done_tx.clone(),
            permit,
        };
        let settings = Arc::clone(&settings);
        let builders = Arc::clone(&builders);
        match &tls {
            // Plain connections: HTTP/1.1 (parked while idle), or HTTP/1.1
            // and HTTP/2 prior knowledge when `server.h2c` is on. The
            // connection's future is the whole task (no wrapping block that
            // would keep copies of its arguments).
            None => {
                let quiet = Arc::new(Quiet::default());
                let io = ConnIo::parkable(stream, settings, Arc::clone(&quiet));
                if h2c {
                    tokio::spawn(conn.serve_h2c(builders, io, quiet));
                } else {
                    tokio::spawn(conn.serve_parkable(builders, io, quiet));
                }
            }
            // TLS: what ALPN chose.
            Some(tls) => {
                let acceptor = tls.acceptor.clone();
                let handshake_timeout = limits.tls_handshake_timeout;
                let task = async move {
                    match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
                        Ok(Ok(stream)) => {
                            if stream.get_ref().1.alpn_protocol() == Some(b"h2") {
                                let io = TokioIo::new(ConnIo::http2(stream, settings));
                                Box::pin(conn.serve(&builders.http2, true, io)).await;
                            } else {
                                let quiet = Arc::new(Quiet::default());
                                let io = ConnIo::parkable(stream, settings, Arc::clone(&quiet));
                                conn.serve_parkable(builders, io, quiet).await;
                            }
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                };
                tokio::spawn(task);
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

/// One builder per protocol: HTTP/1.1 uses hyper's HTTP/1 connection
/// directly (it can hand its IO back to be parked); with `server.h2c` the
/// connection task reads the first bytes itself to choose.
pub(super) struct Builders {
    pub(super) http1: http1::Builder,
    pub(super) http2: auto::Builder<TokioExecutor>,
}

/// How long an HTTP/1.1 connection idles before it is parked: a second, or
/// half the idle timeout when that is shorter. Parking and waking cost about
/// what a new hyper connection costs, so a connection busy with requests
/// less than this apart is never parked.
fn park_after(idle_timeout: Duration) -> Duration {
    Duration::from_secs(1).min(idle_timeout / 2)
}

/// hyper's HTTP/1 connection builder with the `[limits]` applied. The idle
/// and header deadlines are kept by the IO wrapper under hyper
/// (`conn_io`): one lazily re-armed timer per connection instead of
/// hyper's timer per request, and the two limits apart.
fn http1_builder(limits: &Limits) -> http1::Builder {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(None)
        // A client that shuts down its sending side after a complete
        // request (`nc`) still gets the answer.
        .half_close(true)
        .max_buf_size(limits.max_header_bytes.max(8192))
        .max_headers(limits.max_headers);
    builder
}

/// The HTTP/2 connection builder with the `[limits]` applied.
fn http2_builder(limits: &Limits) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new()).http2_only();
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

/// Over the connection cap: a short 503 envelope and close, never a pile-up.
async fn refuse_overloaded<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S, state: Arc<State>) {
    let id = crate::request_id::new_request_id();
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
