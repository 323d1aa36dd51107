//! The backend client: a bounded pool of HTTP/1.1 keep-alive connections.
//!
//! Connection-level hyper clients (`hyper::client::conn::http1`) in a small
//! pool: a checkout is one uncontended mutex pop, a connection returns to the
//! pool when its response body has been read to the end, and a semaphore caps
//! the total so thousands of device connections never become thousands of
//! backend connections. Also here: the hop-by-hop header rules both ways.
//!
//! For an `https://` backend each new connection is TLS (rustls, ALPN
//! `http/1.1`, SNI from the URL's host); the pool logic is the same.

use crate::body::{Body, BoxError, ReadDeadline};
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName};
use http::{Request, Response};
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, TryAcquireError};

/// Why a request could not be forwarded.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("connect to backend failed: {0}")]
    Connect(std::io::Error),
    #[error("connect to backend timed out")]
    ConnectTimeout,
    #[error("backend TLS handshake failed: {0}")]
    Tls(std::io::Error),
    #[error("backend handshake failed: {0}")]
    Handshake(hyper::Error),
    #[error("backend request failed: {0}")]
    Request(hyper::Error),
}

/// A pooled connection; holding it holds one of the pool's connection permits.
struct Conn {
    sender: SendRequest<Body>,
    _permit: OwnedSemaphorePermit,
}

/// The pool of connections to one backend.
pub struct Upstream {
    address: String,
    tls: Option<(
        tokio_rustls::TlsConnector,
        rustls_pki_types::ServerName<'static>,
    )>,
    connect_timeout: Duration,
    idle: Mutex<Vec<Conn>>,
    max_idle: usize,
    permits: Arc<Semaphore>,
    /// Callers in [`Upstream::connect`] waiting for a permit while every
    /// connection is taken; [`Upstream::release`] tells them through
    /// `returned` when a connection comes back idle (it keeps its permit).
    waiting: AtomicUsize,
    returned: Notify,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("address", &self.address)
            .finish_non_exhaustive()
    }
}

impl Upstream {
    /// A pool for `address` (`host:port`) with at most `max_connections`
    /// connections open, `max_idle` of them kept idle; over TLS when `tls` is set.
    pub fn new(
        address: String,
        tls: Option<crate::tls::BackendTls>,
        connect_timeout: Duration,
        max_connections: usize,
        max_idle: usize,
    ) -> Arc<Upstream> {
        Arc::new(Upstream {
            address,
            tls: tls.map(|t| (tokio_rustls::TlsConnector::from(t.config), t.server_name)),
            connect_timeout,
            idle: Mutex::new(Vec::with_capacity(max_idle.min(1024))),
            max_idle,
            permits: Arc::new(Semaphore::new(max_connections)),
            waiting: AtomicUsize::new(0),
            returned: Notify::new(),
        })
    }

    fn pop_idle(&self) -> Option<Conn> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        while let Some(conn) = idle.pop() {
            if !conn.sender.is_closed() {
                return Some(conn);
            }
        }
        None
    }

    fn release(&self, conn: Conn) {
        if conn.sender.is_closed() {
            return;
        }
        {
            let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
            if idle.len() >= self.max_idle {
                // Dropped: its permit goes back to the semaphore.
                return;
            }
            idle.push(conn);
        }
        if self.waiting.load(Ordering::Acquire) > 0 {
            self.returned.notify_one();
        }
    }

    async fn connect(&self) -> Result<Conn, UpstreamError> {
        // Waiting counts against the caller's route timeout. While every
        // connection is taken, one coming back idle serves as well as a
        // permit for a new one (idle connections keep their permits).
        let permit = match Arc::clone(&self.permits).try_acquire_owned() {
            Ok(permit) => permit,
            Err(TryAcquireError::Closed) => return Err(UpstreamError::ConnectTimeout),
            Err(TryAcquireError::NoPermits) => {
                self.waiting.fetch_add(1, Ordering::AcqRel);
                let _waiting = Waiting(&self.waiting);
                loop {
                    if let Some(conn) = self.pop_idle() {
                        return Ok(conn);
                    }
                    tokio::select! {
                        permit = Arc::clone(&self.permits).acquire_owned() => {
                            break permit.map_err(|_| UpstreamError::ConnectTimeout)?;
                        }
                        () = self.returned.notified() => {}
                    }
                }
            }
        };
        // A connection may have come back meanwhile.
        if let Some(conn) = self.pop_idle() {
            return Ok(conn);
        }
        // TCP connect and, for https://, the TLS handshake share connect_timeout.
        let sender = tokio::time::timeout(self.connect_timeout, async {
            let stream = TcpStream::connect(&self.address)
                .await
                .map_err(UpstreamError::Connect)?;
            let _ = stream.set_nodelay(true);
            match &self.tls {
                None => handshake(stream).await,
                Some((connector, name)) => {
                    let stream = connector
                        .connect(name.clone(), stream)
                        .await
                        .map_err(UpstreamError::Tls)?;
                    handshake(stream).await
                }
            }
        })
        .await
        .map_err(|_| UpstreamError::ConnectTimeout)??;
        Ok(Conn {
            sender,
            _permit: permit,
        })
    }

    /// Sends a request (origin-form URI, headers already rewritten) and
    /// returns the backend's response head with a streaming body. A pooled
    /// connection the backend closed in the meantime is retried once on a
    /// fresh one, as long as the request was not written.
    pub async fn send(
        self: &Arc<Self>,
        req: Request<Body>,
    ) -> Result<Response<Body>, UpstreamError> {
        // The common case, kept apart so the future every request carries
        // stays small: an idle connection whose task is waiting for work.
        let mut conn = match self.pop_idle() {
            Some(conn) if conn.sender.is_ready() => conn,
            conn => return Box::pin(self.send_slow(req, conn, 2)).await,
        };
        let unsent = match conn.sender.try_send_request(req).await {
            Ok(resp) => return Ok(self.wrap(resp, conn)),
            Err(mut e) => match e.take_message() {
                Some(req) => req,
                None => return Err(UpstreamError::Request(e.into_error())),
            },
        };
        // The failed connection is not kept across the retry.
        drop(conn);
        Box::pin(self.send_slow(unsent, None, 1)).await
    }

    /// [`Upstream::send`] when no connection is ready at once: waits for one
    /// (or opens one) and makes up to `tries` attempts.
    async fn send_slow(
        self: &Arc<Self>,
        mut req: Request<Body>,
        conn: Option<Conn>,
        tries: u32,
    ) -> Result<Response<Body>, UpstreamError> {
        let mut conn = match conn {
            Some(c) => c,
            None => self.connect().await?,
        };
        for attempt in 1..=tries {
            if conn.sender.ready().await.is_err() {
                conn = self.connect().await?;
            }
            match conn.sender.try_send_request(req).await {
                Ok(resp) => return Ok(self.wrap(resp, conn)),
                Err(mut e) => match e.take_message() {
                    Some(back) if attempt < tries => {
                        req = back;
                        conn = self.connect().await?;
                    }
                    _ => return Err(UpstreamError::Request(e.into_error())),
                },
            }
        }
        // Unreachable in practice: the loop returns on every path of its last turn.
        Err(UpstreamError::ConnectTimeout)
    }

    fn wrap(self: &Arc<Self>, resp: Response<Incoming>, conn: Conn) -> Response<Body> {
        let (parts, incoming) = resp.into_parts();
        if incoming.is_end_stream() {
            self.release(conn);
            return Response::from_parts(parts, Body::Incoming(incoming));
        }
        let body = PooledBody {
            inner: incoming,
            conn: Some((conn, Arc::clone(self))),
            deadline: None,
        };
        Response::from_parts(parts, Body::Pooled(body))
    }
}

/// Counts one caller in [`Upstream::connect`]'s wait while it lives.
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// HTTP/1.1 handshake on a fresh connection; the connection task runs detached.
async fn handshake<T>(io: T) -> Result<SendRequest<Body>, UpstreamError>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    // Requests are flattened into hyper's write buffer: one `send` for a
    // head and a small body, cheaper than `writev` (and than coalescing
    // below hyper). That buffer keeps the capacity of the largest request
    // it carried, so it is capped, as is the read buffer: with
    // `max_buf_size`, at most about 80 KiB per pooled connection.
    let (sender, connection) = http1::Builder::new()
        .writev(false)
        .max_buf_size(64 << 10)
        .handshake(TokioIo::new(io))
        .await
        .map_err(UpstreamError::Handshake)?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "backend connection ended");
        }
    });
    Ok(sender)
}

/// A backend response body that hands its connection back to the pool once
/// read to the end. Dropped early, the connection is closed instead. It can
/// keep a between-reads deadline itself (see [`PooledBody::read_timeout`]),
/// so a streamed answer needs no further wrapper.
pub struct PooledBody {
    inner: Incoming,
    conn: Option<(Conn, Arc<Upstream>)>,
    deadline: Option<ReadDeadline>,
}

impl PooledBody {
    /// Each frame must arrive within `timeout` of the previous one (time
    /// spent waiting on the backend only); past it the body fails with
    /// [`crate::body::BodyTimeout`].
    pub fn read_timeout(&mut self, timeout: Duration) {
        self.deadline = Some(ReadDeadline::new(timeout));
    }
}

impl HttpBody for PooledBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner)
            .poll_frame(cx)
            .map_err(BoxError::from);
        let polled = match &mut this.deadline {
            Some(deadline) => deadline.check(polled, cx),
            None => polled,
        };
        match &polled {
            Poll::Ready(None) => {
                if let Some((conn, pool)) = this.conn.take() {
                    pool.release(conn);
                }
            }
            Poll::Ready(Some(Err(_))) => {
                this.conn = None;
            }
            _ => {
                if this.inner.is_end_stream() {
                    if let Some((conn, pool)) = this.conn.take() {
                        pool.release(conn);
                    }
                }
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Headers that describe one hop and are never forwarded (RFC 9110 §7.6.1).
pub const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// The position of `name` in [`HOP_BY_HOP`]: one string match (lengths
/// first) instead of a comparison with each entry.
fn hop_by_hop_index(name: &HeaderName) -> Option<usize> {
    Some(match name.as_str() {
        "connection" => 0,
        "keep-alive" => 1,
        "proxy-authenticate" => 2,
        "proxy-authorization" => 3,
        "te" => 4,
        "trailer" => 5,
        "transfer-encoding" => 6,
        "upgrade" => 7,
        _ => return None,
    })
}

/// Removes hop-by-hop headers, including every header named in `Connection`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the (few) headers present, noting which hop-by-hop
    // names occur: most messages carry none, or only `Connection`.
    let mut present = 0u8;
    for k in headers.keys() {
        if let Some(i) = hop_by_hop_index(k) {
            present |= 1 << i;
        }
    }
    if present == 0 {
        return;
    }
    // `Connection` (bit 0) may name more headers; the usual
    // `Connection: keep-alive` names only a hop-by-hop one (removed below).
    let only_keep_alive = || {
        headers
            .get_all(header::CONNECTION)
            .iter()
            .all(|v| v.as_bytes().eq_ignore_ascii_case(b"keep-alive"))
    };
    if present & 1 != 0 && !only_keep_alive() {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            // The hop-by-hop names (`keep-alive`, …) go below anyway.
            .filter(|name| {
                !HOP_BY_HOP
                    .iter()
                    .any(|h| h.as_str().eq_ignore_ascii_case(name))
            })
            .filter_map(|name| HeaderName::from_bytes(name.as_bytes()).ok())
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) != 0 {
            headers.remove(name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_index_matches_the_list() {
        for (i, name) in HOP_BY_HOP.iter().enumerate() {
            assert_eq!(hop_by_hop_index(name), Some(i), "{name}");
        }
        for other in [header::HOST, header::CONTENT_LENGTH, header::TE.clone()] {
            assert_eq!(
                hop_by_hop_index(&other),
                HOP_BY_HOP.iter().position(|h| *h == other)
            );
        }
        assert_eq!(hop_by_hop_index(&HeaderName::from_static("x-te")), None);
    }

    #[test]
    fn hop_by_hop_and_connection_named_headers_go() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, "close, x-secret-hop".parse().unwrap());
        h.insert("x-secret-hop", "1".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert(header::TRANSFER_ENCODING, "chunked".parse().unwrap());
        h.insert(header::UPGRADE, "websocket".parse().unwrap());
        h.insert("x-kept", "1".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-kept"));

        // `Connection: keep-alive` alone; a named header listed in a second value.
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, "keep-alive".parse().unwrap());
        h.insert("x-kept", "1".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        let mut h = HeaderMap::new();
        h.append(header::CONNECTION, "close".parse().unwrap());
        h.append(header::CONNECTION, "X-Hop , keep-alive".parse().unwrap());
        h.insert("x-hop", "1".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert(header::TE, "trailers".parse().unwrap());
        h.insert("x-kept", "1".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("x-kept"));
    }
}
