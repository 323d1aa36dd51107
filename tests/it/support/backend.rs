//! A real HTTP/1.1 test backend on loopback: records every request it
//! receives and answers with scripted [`Reply`]s.

use super::bodies::{PatternBody, StallingBody};
use super::hex;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use portcullis::body::Body;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// A validation service's 200: the session is good for `d`.
pub fn renewal(d: Duration) -> Reply {
    Reply::json(
        200,
        serde_json::json!({"expiration-date": expiration_in(d)}),
    )
}

/// An `expiration-date` in django-proxy-server's format, `d` from now.
pub fn expiration_in(d: Duration) -> String {
    humantime::format_rfc3339_seconds(SystemTime::now() + d)
        .to_string()
        .replace('T', " ")
        .trim_end_matches('Z')
        .to_owned()
}

/// One request as the test backend received it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: Method,
    /// Path and query, exactly as received.
    pub uri: String,
    pub path: String,
    pub query: Option<String>,
    pub headers: HeaderMap,
    /// The body, kept up to [`KEEP_BODY`] bytes.
    pub body: Bytes,
    /// Length of the whole body as streamed.
    pub body_len: u64,
    /// SHA-256 (hex) of the whole body as streamed.
    pub body_sha256: String,
    /// The body ended with an error (e.g. a chunked body cut off), not cleanly.
    pub body_error: bool,
}

/// Bodies larger than this are hashed but not kept.
pub const KEEP_BODY: usize = 1 << 20;

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn header_all(&self, name: &str) -> Vec<String> {
        self.headers
            .get_all(name)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("backend received JSON")
    }
}

/// What the backend's body is made of.
#[derive(Clone)]
pub enum ReplyBody {
    Bytes(Bytes),
    /// `len` bytes of [`pattern`] streamed in chunks.
    Pattern(u64),
    /// These bytes, then nothing more, ever (the declared length is larger).
    StallAfter(Bytes),
}

/// A scripted backend answer.
#[derive(Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: ReplyBody,
    /// Wait this long before answering (cancelled when the backend stops).
    pub delay: Duration,
}

impl Reply {
    pub fn status(status: u16) -> Reply {
        Reply {
            status,
            headers: Vec::new(),
            body: ReplyBody::Bytes(Bytes::new()),
            delay: Duration::ZERO,
        }
    }

    pub fn json(status: u16, value: serde_json::Value) -> Reply {
        Reply::status(status)
            .header("content-type", "application/json")
            .body(value.to_string())
    }

    pub fn html(status: u16, html: &str) -> Reply {
        Reply::status(status)
            .header("content-type", "text/html; charset=utf-8")
            .body(html.to_owned())
    }

    /// A `len`-byte body of [`pattern`] bytes, streamed with a Content-Length.
    pub fn pattern(len: u64) -> Reply {
        Reply {
            body: ReplyBody::Pattern(len),
            ..Reply::status(200)
        }
        .header("content-type", "application/octet-stream")
    }

    /// Sends the head and `first` bytes of a longer body, then goes quiet.
    pub fn stall_mid_body(first: &'static [u8]) -> Reply {
        Reply {
            body: ReplyBody::StallAfter(Bytes::from_static(first)),
            ..Reply::status(200)
        }
        .header("content-length", &(first.len() + 1_000_000).to_string())
    }

    /// Never answers within any test's patience.
    pub fn stall() -> Reply {
        Reply::status(200).delay(Duration::from_secs(3600))
    }

    pub fn header(mut self, name: &str, value: &str) -> Reply {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    pub fn body(mut self, body: impl Into<Bytes>) -> Reply {
        self.body = ReplyBody::Bytes(body.into());
        self
    }

    pub fn delay(mut self, d: Duration) -> Reply {
        self.delay = d;
        self
    }
}

type Handler = Arc<dyn Fn(&Recorded) -> Reply + Send + Sync>;

#[derive(Default)]
struct BackendState {
    records: Mutex<Vec<Recorded>>,
    handlers: Mutex<HashMap<String, Handler>>,
    connections: std::sync::atomic::AtomicUsize,
}

/// A real HTTP/1.1 server on loopback that records every request and
/// answers per-path scripted replies (default: 200 `{"ok": true, ...}`).
pub struct Backend {
    pub addr: SocketAddr,
    state: Arc<BackendState>,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

impl Backend {
    pub async fn start() -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind backend");
        let addr = listener.local_addr().expect("backend addr");
        let state = Arc::new(BackendState::default());
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(accept_loop(listener, Arc::clone(&state), stop_rx));
        Backend {
            addr,
            state,
            stop,
            task: Some(task),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Answers requests for `path` (without query) with `reply`.
    pub fn on(&self, path: &str, reply: Reply) -> &Backend {
        self.on_fn(path, move |_| reply.clone())
    }

    /// Answers requests for `path` (without query) with whatever `f` says.
    pub fn on_fn(
        &self,
        path: &str,
        f: impl Fn(&Recorded) -> Reply + Send + Sync + 'static,
    ) -> &Backend {
        self.state
            .handlers
            .lock()
            .unwrap()
            .insert(path.to_owned(), Arc::new(f));
        self
    }

    /// Every request received so far, in arrival order.
    pub fn requests(&self) -> Vec<Recorded> {
        self.state.records.lock().unwrap().clone()
    }

    /// Requests received for `path` (without query).
    pub fn requests_to(&self, path: &str) -> Vec<Recorded> {
        self.requests()
            .into_iter()
            .filter(|r| r.path == path)
            .collect()
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> usize {
        self.state
            .connections
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn count(&self, path: &str) -> usize {
        self.requests_to(path).len()
    }

    /// The last request received for `path`.
    pub fn last(&self, path: &str) -> Recorded {
        self.requests_to(path)
            .pop()
            .unwrap_or_else(|| panic!("backend received nothing for {path}"))
    }

    /// The paths (with query) received, in order.
    pub fn paths(&self) -> Vec<String> {
        self.requests().into_iter().map(|r| r.uri).collect()
    }

    pub fn stop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn accept_loop(listener: TcpListener, state: Arc<BackendState>, stop: watch::Receiver<bool>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        state
            .connections
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let state = Arc::clone(&state);
        let mut stop = stop.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let state = Arc::clone(&state);
                async move { Ok::<_, Infallible>(backend_handle(&state, req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc);
            tokio::select! {
                _ = conn => {}
                _ = stop.wait_for(|s| *s) => {}
            }
        });
    }
}

async fn backend_handle(state: &BackendState, req: Request<Incoming>) -> Response<Body> {
    let (parts, mut incoming) = req.into_parts();
    let mut kept = Vec::new();
    let mut len = 0u64;
    let mut hasher = Sha256::new();
    let mut body_error = false;
    while let Some(frame) = incoming.frame().await {
        let Ok(frame) = frame else {
            body_error = true;
            break;
        };
        if let Ok(data) = frame.into_data() {
            len += data.len() as u64;
            hasher.update(&data);
            if kept.len() < KEEP_BODY {
                let room = KEEP_BODY - kept.len();
                kept.extend_from_slice(&data[..data.len().min(room)]);
            }
        }
    }
    let rec = Recorded {
        method: parts.method.clone(),
        uri: parts
            .uri
            .path_and_query()
            .map(|p| p.as_str().to_owned())
            .unwrap_or_default(),
        path: parts.uri.path().to_owned(),
        query: parts.uri.query().map(str::to_owned),
        headers: parts.headers.clone(),
        body: Bytes::from(kept),
        body_len: len,
        body_sha256: hex(&hasher.finalize()),
        body_error,
    };
    state.records.lock().unwrap().push(rec.clone());
    let handler = state.handlers.lock().unwrap().get(&rec.path).cloned();
    let reply = match handler {
        Some(h) => h(&rec),
        None => Reply::json(
            200,
            serde_json::json!({"ok": true, "path": rec.path, "method": rec.method.as_str()}),
        ),
    };
    if !reply.delay.is_zero() {
        tokio::time::sleep(reply.delay).await;
    }
    let body = match reply.body {
        ReplyBody::Bytes(b) => Body::full(b),
        ReplyBody::Pattern(n) => Body::boxed(PatternBody::new(n)),
        ReplyBody::StallAfter(first) => Body::boxed(StallingBody { first: Some(first) }),
    };
    let mut resp = Response::new(body);
    *resp.status_mut() = StatusCode::from_u16(reply.status).expect("scripted status");
    for (k, v) in reply.headers {
        resp.headers_mut().append(
            http::HeaderName::from_bytes(k.as_bytes()).expect("header name"),
            HeaderValue::from_str(&v).expect("header value"),
        );
    }
    resp
}
