//! Builders for the integration tests: a real HTTP test backend that records
//! what it received, a gateway started from a TOML config on an ephemeral
//! port, a small HTTP client (hyper, or raw bytes for malformed requests),
//! and guards for child processes (the compiled binary, Python servers).
//!
//! Everything binds `127.0.0.1:0`; everything started here is stopped on
//! drop, so a failing test leaves nothing running.

#![allow(dead_code)]

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use portcullis::body::Body;
use portcullis::config::Config;
use portcullis::crypto::{self, Keyring};
use portcullis::gateway::State;
use portcullis::secret::Secret;
use sha2::{Digest, Sha256};
use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

/// Upper bound for any single exchange in a test.
pub const TIMEOUT: Duration = Duration::from_secs(20);

/// The device API key `ios-app` (configured in plain text).
pub const IOS_KEY: &str = "ios-key-0123456789";
/// The device API key `android-app` (configured as its `sha256:` digest).
pub const ANDROID_KEY: &str = "android-key-9876543210";
/// The gateway's own credential towards the backend.
pub const BACKEND_CREDENTIAL: &str = "gateway-backend-credential";
/// The active parameter-encryption key (id 3).
pub const ACTIVE_KEY_B64: &str = "AwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwM=";
/// An older key kept for decryption (id 7, the SPEC test vector's key).
pub const OLD_KEY_B64: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

/// The keyring a backend would hold for the test gateway's keys.
pub fn backend_keyring() -> Keyring {
    let k3 = crypto::decode_key(&Secret::new(ACTIVE_KEY_B64)).expect("active key");
    let k7 = crypto::decode_key(&Secret::new(OLD_KEY_B64)).expect("old key");
    Keyring::new(3, &[(3, k3), (7, k7)]).expect("keyring")
}

pub fn sha256_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

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

// ------------------------------------------------------------------ backend

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

// ------------------------------------------------------------------ bodies

const PATTERN_CHUNK: usize = 251 * 261; // a multiple of 251, about 64 KiB

fn pattern_chunk() -> Bytes {
    static CHUNK: std::sync::OnceLock<Bytes> = std::sync::OnceLock::new();
    CHUNK
        .get_or_init(|| {
            Bytes::from(
                (0..PATTERN_CHUNK)
                    .map(|i| (i % 251) as u8)
                    .collect::<Vec<u8>>(),
            )
        })
        .clone()
}

/// The byte at offset `i` of a pattern body.
pub fn pattern_byte(i: u64) -> u8 {
    (i % 251) as u8
}

/// A body of `len` pattern bytes with an exact size (so it goes out with a
/// Content-Length), produced chunk by chunk without holding it in memory.
pub struct PatternBody {
    remaining: u64,
}

impl PatternBody {
    pub fn new(len: u64) -> PatternBody {
        PatternBody { remaining: len }
    }
}

impl HttpBody for PatternBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.remaining == 0 {
            return Poll::Ready(None);
        }
        let n = (PATTERN_CHUNK as u64).min(self.remaining) as usize;
        self.remaining -= n as u64;
        Poll::Ready(Some(Ok(Frame::data(pattern_chunk().slice(..n)))))
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}

/// Yields `first`, then stays pending forever.
struct StallingBody {
    first: Option<Bytes>,
}

impl HttpBody for StallingBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.first.take() {
            Some(b) => Poll::Ready(Some(Ok(Frame::data(b)))),
            None => Poll::Pending,
        }
    }
}

/// Length and SHA-256 of a pattern body of `len` bytes.
pub fn pattern_digest(len: u64) -> (u64, String) {
    let mut h = Sha256::new();
    let chunk = pattern_chunk();
    let mut left = len;
    while left > 0 {
        let n = (chunk.len() as u64).min(left) as usize;
        h.update(&chunk[..n]);
        left -= n as u64;
    }
    (len, hex(&h.finalize()))
}

/// A body sent chunked (no known length), one frame per chunk.
pub struct ChunkedBody {
    chunks: VecDeque<Bytes>,
}

impl ChunkedBody {
    pub fn new(chunks: Vec<Bytes>) -> ChunkedBody {
        ChunkedBody {
            chunks: chunks.into(),
        }
    }

    /// `total` bytes of `fill` in chunks of `chunk` bytes.
    pub fn sized(total: usize, chunk: usize) -> (ChunkedBody, Vec<u8>) {
        let all: Vec<u8> = (0..total).map(|i| (i * 7 % 256) as u8).collect();
        let chunks = all
            .chunks(chunk.max(1))
            .map(Bytes::copy_from_slice)
            .collect();
        (ChunkedBody::new(chunks), all)
    }
}

impl HttpBody for ChunkedBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.chunks.pop_front().map(|c| Ok(Frame::data(c))))
    }

    fn is_end_stream(&self) -> bool {
        false
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

// ------------------------------------------------------------------ gateway

/// A gateway configuration, rendered to TOML and parsed with `Config::parse`.
#[derive(Clone)]
pub struct GatewayConfig {
    pub backend_url: String,
    pub server: Vec<String>,
    pub backend: Vec<String>,
    pub sessions: Vec<String>,
    pub limits: Vec<String>,
    pub routes: Vec<String>,
    pub default_routes: bool,
    /// Raw TOML appended at the end (e.g. a `[rate_limits]` table).
    pub extra: Vec<String>,
}

/// The routes most tests use. Backend paths differ from device paths so a
/// test can see the rewrite.
pub const DEFAULT_ROUTES: &[&str] = &[
    r#"path = "/api/status"
methods = ["GET"]
backend_path = "/status"
public = true"#,
    r#"path = "/api/public/{*rest}"
methods = ["GET"]
backend_path = "/public/{rest}"
public = true"#,
    r#"path = "/api/profile"
methods = ["GET", "POST"]
backend_path = "/profile""#,
    r#"path = "/api/orders/{id}"
methods = ["GET", "PUT", "POST"]
backend_path = "/orders/{id}"
json_body = true"#,
    r#"path = "/api/search"
methods = ["GET"]
backend_path = "/search"
encrypt_query = ["username", "email"]"#,
    r#"path = "/api/upload"
methods = ["POST", "PUT"]
backend_path = "/upload"
public = true
max_body = "4KiB""#,
    r#"path = "/api/slow"
methods = ["GET"]
backend_path = "/slow"
public = true
timeout = "300ms""#,
    r#"path = "/api/echo"
methods = ["GET", "POST"]
backend_path = "/echo"
public = true"#,
];

impl GatewayConfig {
    pub fn new(backend_url: impl Into<String>) -> GatewayConfig {
        GatewayConfig {
            backend_url: backend_url.into(),
            server: Vec::new(),
            backend: Vec::new(),
            sessions: Vec::new(),
            limits: Vec::new(),
            routes: Vec::new(),
            default_routes: true,
            extra: Vec::new(),
        }
    }

    /// Adds a `key = value` line to `[server]`.
    pub fn server(mut self, line: &str) -> Self {
        self.server.push(line.to_owned());
        self
    }

    /// Adds a `key = value` line to `[backend]`.
    pub fn backend(mut self, line: &str) -> Self {
        self.backend.push(line.to_owned());
        self
    }

    /// Adds a `key = value` line to `[sessions]`.
    pub fn sessions(mut self, line: &str) -> Self {
        self.sessions.push(line.to_owned());
        self
    }

    /// Adds a `key = value` line to `[limits]`.
    pub fn limits(mut self, line: &str) -> Self {
        self.limits.push(line.to_owned());
        self
    }

    /// Adds a `[[routes]]` entry (its body lines).
    pub fn route(mut self, body: &str) -> Self {
        self.routes.push(body.to_owned());
        self
    }

    /// Appends raw TOML after everything else.
    pub fn extra(mut self, toml: &str) -> Self {
        self.extra.push(toml.to_owned());
        self
    }

    pub fn without_default_routes(mut self) -> Self {
        self.default_routes = false;
        self
    }

    /// The TOML text, listening on `listen`.
    pub fn toml(&self, listen: SocketAddr) -> String {
        let android_digest = sha256_hex(ANDROID_KEY.as_bytes());
        let mut t = format!("[server]\nlisten = \"{listen}\"\n");
        if !self.server.iter().any(|l| l.starts_with("drain_timeout")) {
            t.push_str("drain_timeout = \"2s\"\n");
        }
        // The tests exercise HTTP/2 prior knowledge on the plain listener too.
        if !self.server.iter().any(|l| l.starts_with("h2c")) {
            t.push_str("h2c = true\n");
        }
        if !self.server.iter().any(|l| l.starts_with("access_log")) {
            t.push_str("access_log = \"off\"\n");
        }
        for l in &self.server {
            t.push_str(l);
            t.push('\n');
        }
        t.push_str(&format!(
            "\n[backend]\nurl = \"{}\"\napi_key = \"{BACKEND_CREDENTIAL}\"\n",
            self.backend_url
        ));
        if !self
            .backend
            .iter()
            .any(|l| l.starts_with("connect_timeout"))
        {
            t.push_str("connect_timeout = \"300ms\"\n");
        }
        if !self.backend.iter().any(|l| l.starts_with("timeout")) {
            t.push_str("timeout = \"5s\"\n");
        }
        for l in &self.backend {
            t.push_str(l);
            t.push('\n');
        }
        t.push_str(&format!(
            "\n[[api_keys]]\nname = \"ios-app\"\nkey = \"{IOS_KEY}\"\n\n[[api_keys]]\nname = \"android-app\"\nkey = \"sha256:{android_digest}\"\n"
        ));
        t.push_str("\n[sessions]\n");
        if !self.sessions.iter().any(|l| l.starts_with("negative_ttl")) {
            t.push_str("negative_ttl = \"10s\"\n");
        }
        for l in &self.sessions {
            t.push_str(l);
            t.push('\n');
        }
        t.push_str(&format!(
            "\n[crypto]\nactive_key = 3\nkeys = [{{ id = 3, key = \"{ACTIVE_KEY_B64}\" }}, {{ id = 7, key = \"{OLD_KEY_B64}\" }}]\n"
        ));
        t.push_str("\n[limits]\n");
        for l in &self.limits {
            t.push_str(l);
            t.push('\n');
        }
        let defaults = if self.default_routes {
            DEFAULT_ROUTES
        } else {
            &[]
        };
        for r in defaults
            .iter()
            .copied()
            .chain(self.routes.iter().map(String::as_str))
        {
            t.push_str("\n[[routes]]\n");
            t.push_str(r);
            t.push('\n');
        }
        for e in &self.extra {
            t.push('\n');
            t.push_str(e);
            t.push('\n');
        }
        t
    }

    /// Parses the config and serves it in-process on an ephemeral port.
    pub async fn start(&self) -> Gateway {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind gateway");
        let addr = listener.local_addr().expect("gateway addr");
        let text = self.toml(addr);
        let config = match Config::parse(&text) {
            Ok(c) => c,
            Err(p) => panic!("test config invalid:\n{p}\n{text}"),
        };
        let state = State::new(config).unwrap_or_else(|p| panic!("state: {p:?}"));
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(portcullis::server::serve(
            listener,
            Arc::clone(&state),
            async move {
                let _ = rx.await;
            },
        ));
        Gateway {
            addr,
            state,
            shutdown: Some(tx),
            task: Some(task),
        }
    }
}

/// A gateway serving in this process.
pub struct Gateway {
    pub addr: SocketAddr,
    pub state: Arc<State>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<std::io::Result<()>>>,
}

impl Gateway {
    /// Starts a gateway in front of `backend` with the default routes.
    pub async fn for_backend(backend: &Backend) -> Gateway {
        GatewayConfig::new(backend.url()).start().await
    }

    /// Triggers graceful shutdown without waiting.
    pub fn trigger_shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }

    /// Triggers graceful shutdown and waits for `serve` to return.
    pub async fn stop(mut self) {
        self.trigger_shutdown();
        if let Some(task) = self.task.take() {
            let r = tokio::time::timeout(TIMEOUT, task)
                .await
                .expect("gateway stops in time");
            r.expect("serve task").expect("serve result");
        }
    }

    /// Waits for `serve` to return after a triggered shutdown.
    pub async fn join(&mut self) -> std::io::Result<()> {
        let task = self.task.take().expect("gateway running");
        tokio::time::timeout(TIMEOUT, task)
            .await
            .expect("gateway stops in time")
            .expect("serve task")
    }

    /// A request builder for this gateway.
    pub fn req(&self, method: &str, path: &str) -> Req {
        Req::new(self.addr, method, path)
    }

    /// A GET with the `ios-app` API key.
    pub fn get(&self, path: &str) -> Req {
        self.req("GET", path).api_key(IOS_KEY)
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.trigger_shutdown();
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

// ------------------------------------------------------------------ client

/// A response as the device sees it.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("response is not JSON ({e}): {}", self.text()))
    }

    /// Asserts the error envelope: status, JSON shape, `code` == status,
    /// `request_id` == `X-Request-Id`, `Content-Type: application/json`,
    /// `Server: portcullis`. Returns `(type, message)`.
    pub fn assert_envelope(&self, status: u16) -> (String, String) {
        assert_eq!(self.status, status, "status; body: {}", self.text());
        assert_eq!(
            self.header("content-type"),
            Some("application/json"),
            "content-type of {status}"
        );
        assert_eq!(self.header("server"), Some("portcullis"));
        let v = self.json();
        let obj = v.as_object().expect("envelope is an object");
        assert_eq!(obj.len(), 1, "only `error` at top level: {v}");
        let e = v["error"].as_object().expect("error object");
        assert_eq!(e.len(), 4, "code, type, message, request_id: {v}");
        assert_eq!(e["code"].as_u64(), Some(u64::from(status)), "code: {v}");
        let rid = e["request_id"].as_str().expect("request_id string");
        assert!(!rid.is_empty());
        assert_eq!(Some(rid), self.header("x-request-id"), "request_id header");
        (
            e["type"].as_str().expect("type").to_owned(),
            e["message"].as_str().expect("message").to_owned(),
        )
    }

    /// Asserts a gateway-raised envelope with `message` (type ProxyServerError).
    pub fn assert_gateway_error(&self, status: u16, message: &str) {
        let (kind, msg) = self.assert_envelope(status);
        assert_eq!(kind, "ProxyServerError");
        assert_eq!(msg, message);
    }
}

/// A request to the gateway.
pub struct Req {
    addr: SocketAddr,
    method: Method,
    path: String,
    headers: Vec<(String, String)>,
    body: Option<Body>,
}

impl Req {
    pub fn new(addr: SocketAddr, method: &str, path: &str) -> Req {
        Req {
            addr,
            method: Method::from_bytes(method.as_bytes()).expect("method"),
            path: path.to_owned(),
            headers: Vec::new(),
            body: None,
        }
    }

    pub fn header(mut self, name: &str, value: &str) -> Req {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    pub fn api_key(self, key: &str) -> Req {
        self.header("Api-Key", key)
    }

    pub fn token(self, token: &str) -> Req {
        self.header("User-Token", token)
    }

    /// A body sent with a Content-Length.
    pub fn body(mut self, body: impl Into<Bytes>) -> Req {
        self.body = Some(Body::full(body.into()));
        self
    }

    pub fn json(self, value: serde_json::Value) -> Req {
        self.header("content-type", "application/json")
            .body(value.to_string())
    }

    /// Any body (chunked unless its size is exact).
    pub fn body_stream<B>(mut self, body: B) -> Req
    where
        B: HttpBody<Data = Bytes> + Send + 'static,
        B::Error: Into<portcullis::body::BoxError>,
    {
        self.body = Some(Body::boxed(body));
        self
    }

    fn build(self) -> Request<Body> {
        let mut req = Request::new(self.body.unwrap_or(Body::Empty));
        *req.method_mut() = self.method;
        *req.uri_mut() = self.path.parse().expect("request path");
        let h = req.headers_mut();
        h.insert(http::header::HOST, HeaderValue::from_static("gateway.test"));
        for (k, v) in self.headers {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).expect("header name"),
                HeaderValue::from_str(&v).expect("header value"),
            );
        }
        req
    }

    /// Sends on a fresh connection; returns the head and the streaming body.
    pub async fn send_streaming(self) -> Response<Incoming> {
        let mut conn = KeepAlive::open(self.addr).await;
        conn.head(self).await
    }

    /// Sends on a fresh connection and reads the whole response.
    pub async fn send(self) -> Resp {
        Resp::read(self.send_streaming().await).await
    }

    /// Sends on `conn` (an open keep-alive connection) and reads the whole response.
    pub async fn send_on(self, conn: &mut KeepAlive) -> Resp {
        Resp::read(conn.head(self).await).await
    }
}

/// One HTTP/1.1 keep-alive connection to the gateway, for requests in turn.
pub struct KeepAlive(hyper::client::conn::http1::SendRequest<Body>);

impl KeepAlive {
    pub async fn open(addr: SocketAddr) -> KeepAlive {
        tokio::time::timeout(TIMEOUT, async move {
            let stream = TcpStream::connect(addr).await.expect("connect gateway");
            let (sender, conn) =
                hyper::client::conn::http1::handshake::<_, Body>(TokioIo::new(stream))
                    .await
                    .expect("handshake");
            tokio::spawn(conn);
            KeepAlive(sender)
        })
        .await
        .expect("connected in time")
    }

    /// Sends `req` once the connection is ready; returns the head and the streaming body.
    async fn head(&mut self, req: Req) -> Response<Incoming> {
        let req = req.build();
        tokio::time::timeout(TIMEOUT, async {
            self.0.ready().await.expect("connection still open");
            self.0.send_request(req).await.expect("send request")
        })
        .await
        .expect("response head in time")
    }
}

impl Resp {
    /// Reads the whole of `resp`.
    pub async fn read(resp: Response<Incoming>) -> Resp {
        let (parts, body) = resp.into_parts();
        let body = tokio::time::timeout(TIMEOUT, body.collect())
            .await
            .expect("response body in time")
            .expect("response body")
            .to_bytes();
        Resp {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body,
        }
    }
}

/// Sends raw bytes on a fresh connection and reads until the peer closes
/// (or one response with Content-Length has arrived). For requests a normal
/// client would refuse or normalize.
pub async fn raw(addr: SocketAddr, request: &[u8]) -> Resp {
    tokio::time::timeout(TIMEOUT, async {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(request).await.expect("write raw request");
        read_raw_response(&mut s).await
    })
    .await
    .expect("raw response in time")
}

/// Reads one HTTP/1.1 response (Content-Length or until EOF) from `s`.
pub async fn read_raw_response(s: &mut TcpStream) -> Resp {
    let mut buf = Vec::new();
    let mut tmp = [0u8; 8192];
    loop {
        if let Some(end) = find(&buf, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            let mut lines = head.split("\r\n");
            let status_line = lines.next().unwrap_or_default();
            let status: u16 = status_line
                .split(' ')
                .nth(1)
                .and_then(|s| s.parse().ok())
                .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
            let mut headers = HeaderMap::new();
            for l in lines {
                if let Some((k, v)) = l.split_once(':') {
                    headers.append(
                        http::HeaderName::from_bytes(k.trim().as_bytes()).expect("name"),
                        HeaderValue::from_str(v.trim()).expect("value"),
                    );
                }
            }
            let len = headers
                .get("content-length")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<usize>().ok());
            let body_start = end + 4;
            loop {
                if let Some(len) = len {
                    if buf.len() >= body_start + len {
                        let body = Bytes::copy_from_slice(&buf[body_start..body_start + len]);
                        return Resp {
                            status,
                            headers,
                            body,
                        };
                    }
                }
                let n = s.read(&mut tmp).await.unwrap_or(0);
                if n == 0 {
                    let body = Bytes::copy_from_slice(&buf[body_start.min(buf.len())..]);
                    return Resp {
                        status,
                        headers,
                        body,
                    };
                }
                buf.extend_from_slice(&tmp[..n]);
            }
        }
        let n = s.read(&mut tmp).await.expect("read response");
        assert!(n > 0, "connection closed before a response head: {buf:?}");
        buf.extend_from_slice(&tmp[..n]);
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

// ------------------------------------------------------------------ processes

/// Kills and reaps a child process when dropped (also on panic).
pub struct ChildGuard(pub Option<std::process::Child>);

impl ChildGuard {
    pub fn pid(&self) -> u32 {
        self.0.as_ref().map(|c| c.id()).expect("child running")
    }

    pub fn child(&mut self) -> &mut std::process::Child {
        self.0.as_mut().expect("child running")
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// Waits until something accepts connections on `addr`.
pub async fn wait_listening(addr: SocketAddr, child: &mut ChildGuard) {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        if TcpStream::connect(addr).await.is_ok() {
            return;
        }
        if let Ok(Some(status)) = child.child().try_wait() {
            panic!("process exited before listening on {addr}: {status}");
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "nothing listening on {addr}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Fails with a clear message when `python3` or its `cryptography` package is missing.
pub fn require_python(with_cryptography: bool) {
    let check = if with_cryptography {
        "import cryptography"
    } else {
        "import sys"
    };
    let out = std::process::Command::new("python3")
        .args(["-c", check])
        .output();
    match out {
        Ok(o) if o.status.success() => {}
        Ok(o) => panic!(
            "python3 cannot `{check}`: {}\nrun the tests with scripts/test, which installs it (python3 -m pip install 'cryptography>=41')",
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => panic!("python3 is required by this test and could not be started: {e}"),
    }
}

/// The peak resident set size (`VmHWM`) of a process, in KiB.
pub fn vm_hwm_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/<pid>/status")
}

/// As curl sends a POST over 1 KiB: the head of a `len`-byte upload to
/// `/api/upload` with `Expect: 100-continue`, then the `100 Continue` read
/// back. The connection is returned for the body.
pub async fn upload_after_100_continue(addr: SocketAddr, len: usize) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(
        format!(
            "POST /api/upload HTTP/1.1\r\nHost: x\r\nApi-Key: {IOS_KEY}\r\nContent-Length: {len}\r\nExpect: 100-continue\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .expect("write the head");
    let mut interim = [0u8; 25];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut interim))
        .await
        .expect("100 Continue in time")
        .expect("read 100 Continue");
    assert_eq!(&interim, b"HTTP/1.1 100 Continue\r\n\r\n");
    s
}

/// A public route to the backend's `/download`, for large answers.
pub const DOWNLOAD_ROUTE: &str = r#"path = "/api/download"
methods = ["GET"]
backend_path = "/download"
public = true"#;

// ------------------------------------------------------------------ adversarial helpers

/// What came back on a raw connection: every complete response, and whether
/// the gateway closed the connection (EOF or reset) before `quiet` passed.
#[derive(Debug)]
pub struct RawOutcome {
    pub responses: Vec<Resp>,
    pub closed: bool,
    /// Bytes after the last complete response (a truncated one, or garbage).
    pub rest: Vec<u8>,
}

/// Writes `request` on a fresh connection (a write error after the peer
/// closed is not an error here) and reads until the peer closes or nothing
/// arrives for `quiet`. Never panics on what the peer does.
pub async fn raw_all(addr: SocketAddr, request: &[u8], quiet: Duration) -> RawOutcome {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let _ = s.write_all(request).await;
    let mut buf = Vec::new();
    let mut tmp = [0u8; 16384];
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    let closed = loop {
        if tokio::time::Instant::now() >= deadline {
            break false;
        }
        match tokio::time::timeout(quiet, s.read(&mut tmp)).await {
            Err(_) => break false,
            Ok(Ok(0)) | Ok(Err(_)) => break true,
            Ok(Ok(n)) => buf.extend_from_slice(&tmp[..n]),
        }
    };
    let (responses, rest) = parse_responses(&buf);
    RawOutcome {
        responses,
        closed,
        rest,
    }
}

/// Splits a byte stream into HTTP/1.1 responses (Content-Length, chunked, or
/// no body for 1xx/204/304). Returns the responses and the unparsed rest.
pub fn parse_responses(mut buf: &[u8]) -> (Vec<Resp>, Vec<u8>) {
    let mut out = Vec::new();
    while let Some(end) = find(buf, b"\r\n\r\n") {
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        let mut lines = head.split("\r\n");
        let Some(status) = lines
            .next()
            .and_then(|l| l.split(' ').nth(1))
            .and_then(|s| s.parse::<u16>().ok())
        else {
            break;
        };
        let mut headers = HeaderMap::new();
        for l in lines {
            if let Some((k, v)) = l.split_once(':') {
                if let (Ok(k), Ok(v)) = (
                    http::HeaderName::from_bytes(k.trim().as_bytes()),
                    HeaderValue::from_str(v.trim()),
                ) {
                    headers.append(k, v);
                }
            }
        }
        let body_start = end + 4;
        let chunked = headers
            .get("transfer-encoding")
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"chunked"));
        let len = headers
            .get("content-length")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok());
        let (body, used) = if status < 200 || status == 204 || status == 304 {
            (Bytes::new(), 0)
        } else if chunked {
            let mut body = Vec::new();
            let mut at = body_start;
            let mut done = None;
            while let Some(line_end) = find(&buf[at..], b"\r\n") {
                let size_text = String::from_utf8_lossy(&buf[at..at + line_end]).into_owned();
                let Ok(size) =
                    usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
                else {
                    break;
                };
                let data = at + line_end + 2;
                if size == 0 {
                    // Trailers end with an empty line.
                    if let Some(t) = find(&buf[data..], b"\r\n") {
                        done = Some(data + t + 2 - body_start);
                    }
                    break;
                }
                if buf.len() < data + size + 2 {
                    break;
                }
                body.extend_from_slice(&buf[data..data + size]);
                at = data + size + 2;
            }
            match done {
                Some(used) => (Bytes::from(body), used),
                None => break,
            }
        } else if let Some(len) = len {
            if buf.len() < body_start + len {
                break;
            }
            (
                Bytes::copy_from_slice(&buf[body_start..body_start + len]),
                len,
            )
        } else {
            // Delimited by close.
            (
                Bytes::copy_from_slice(&buf[body_start..]),
                buf.len() - body_start,
            )
        };
        out.push(Resp {
            status,
            headers,
            body,
        });
        buf = &buf[body_start + used..];
    }
    (out, buf.to_vec())
}

/// Panics seen outside the test files (gateway tasks, hyper, h2, tokio).
static FOREIGN_PANICS: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Installs (once per test binary) a panic hook that records every panic
/// raised outside `tests/` — from any thread, including the gateway's own
/// tasks, which tokio would otherwise swallow — and then runs the default
/// hook. Test assertions (located in `tests/`) are not recorded.
pub fn watch_panics() {
    static INSTALLED: std::sync::Once = std::sync::Once::new();
    INSTALLED.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let file = info.location().map(|l| l.file()).unwrap_or("");
            if !file.starts_with("tests/") && !file.contains("/tests/") {
                let thread = std::thread::current()
                    .name()
                    .unwrap_or("unnamed")
                    .to_owned();
                if let Ok(mut p) = FOREIGN_PANICS.lock() {
                    p.push(format!("thread {thread}: {info}"));
                }
            }
            previous(info);
        }));
    });
}

/// Fails if any panic was recorded by [`watch_panics`] in this test binary.
pub fn assert_no_panics() {
    let seen = FOREIGN_PANICS
        .lock()
        .map(|p| p.clone())
        .unwrap_or_else(|e| e.into_inner().clone());
    assert!(seen.is_empty(), "panics outside the tests: {seen:#?}");
}

/// Raises this process's soft open-files limit to `want` (capped by the hard
/// limit); returns the soft limit in force afterwards.
// `rlim_t` is `u64` on Linux but not on every platform.
#[allow(clippy::unnecessary_cast)]
pub fn raise_open_files(want: u64) -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 0;
        }
        if (lim.rlim_cur as u64) < want {
            let new = libc::rlimit {
                rlim_cur: want.min(lim.rlim_max as u64) as libc::rlim_t,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &new) == 0 {
                lim = new;
            }
        }
    }
    lim.rlim_cur as u64
}

/// The soft limit on open files of this process (`ulimit -n` of a child shell).
pub fn open_files_limit() -> u64 {
    std::process::Command::new("sh")
        .args(["-c", "ulimit -n"])
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(u64::MAX)
}

/// The `q` quantile (0..=1) of `samples` (sorted in place).
pub fn quantile(samples: &mut [Duration], q: f64) -> Duration {
    if samples.is_empty() {
        return Duration::ZERO;
    }
    samples.sort();
    let i = ((samples.len() as f64 - 1.0) * q).round() as usize;
    samples[i.min(samples.len() - 1)]
}
