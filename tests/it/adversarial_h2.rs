//! HTTP/2 abuse on the plain listener (h2c prior knowledge): streams beyond
//! `max_concurrent_streams`, rapid reset, CONTINUATION flood, empty-DATA
//! flood — each stays bounded (refused streams or GOAWAY, flat memory) and a
//! normal request still succeeds afterwards. Plus `Upgrade` requests that the
//! backend does not answer with 101: nothing is tunnelled.
//!
//! Attacks are written as raw frames (a tiny frame writer and HPACK literal
//! encoder below) so they can break the rules a real client library keeps.

use crate::support::*;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::TcpStream;

/// Memory-measuring tests run one at a time (they share this process).
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const GOAWAY: u8 = 0x7;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const ACK: u8 = 0x1;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = Vec::with_capacity(9 + payload.len());
    f.extend_from_slice(&len.to_be_bytes()[1..]);
    f.push(kind);
    f.push(flags);
    f.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// HPACK string literal, no Huffman.
fn hpack_string(out: &mut Vec<u8>, s: &[u8]) {
    hpack_int(out, 0x00, 7, s.len());
    out.extend_from_slice(s);
}

fn hpack_int(out: &mut Vec<u8>, first: u8, prefix: u32, mut v: usize) {
    let max = (1usize << prefix) - 1;
    if v < max {
        out.push(first | v as u8);
        return;
    }
    out.push(first | max as u8);
    v -= max;
    while v >= 128 {
        out.push((v % 128 + 128) as u8);
        v /= 128;
    }
    out.push(v as u8);
}

/// A header block: `method` and `path` with the test API key, literal
/// fields without indexing.
fn header_block(method: &str, path: &str) -> Vec<u8> {
    let mut b = Vec::new();
    for (name, value) in [
        (":method", method),
        (":scheme", "http"),
        (":authority", "gateway.test"),
        (":path", path),
        ("api-key", IOS_KEY),
    ] {
        b.push(0x00);
        hpack_string(&mut b, name.as_bytes());
        hpack_string(&mut b, value.as_bytes());
    }
    b
}

/// What the server sent on a raw h2 connection.
#[derive(Default, Debug)]
struct Seen {
    headers: usize,
    data_bytes: usize,
    rst: usize,
    refused: usize,
    goaway: Option<u32>,
    closed: bool,
}

/// A raw h2c connection: the reader runs in a task (ACKing the server's
/// SETTINGS through a channel), the test writes frames.
struct RawH2 {
    w: OwnedWriteHalf,
    seen: Arc<Mutex<Seen>>,
    reader: tokio::task::JoinHandle<()>,
}

impl RawH2 {
    async fn connect(addr: SocketAddr) -> RawH2 {
        let s = TcpStream::connect(addr).await.expect("connect");
        let (mut r, mut w) = s.into_split();
        w.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await
            .unwrap();
        w.write_all(&frame(SETTINGS, 0, 0, &[])).await.unwrap();
        let seen = Arc::new(Mutex::new(Seen::default()));
        let (settings_tx, settings_rx) = tokio::sync::oneshot::channel::<()>();
        let reader = {
            let seen = Arc::clone(&seen);
            tokio::spawn(async move {
                let mut settings_tx = Some(settings_tx);
                let mut buf = Vec::new();
                let mut tmp = vec![0u8; 65536];
                loop {
                    let n = match r.read(&mut tmp).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    buf.extend_from_slice(&tmp[..n]);
                    while buf.len() >= 9 {
                        let len = (usize::from(buf[0]) << 16)
                            | (usize::from(buf[1]) << 8)
                            | usize::from(buf[2]);
                        if buf.len() < 9 + len {
                            break;
                        }
                        let (kind, flags) = (buf[3], buf[4]);
                        let payload = buf[9..9 + len].to_vec();
                        buf.drain(..9 + len);
                        let mut s = seen.lock().unwrap();
                        match kind {
                            HEADERS => s.headers += 1,
                            DATA => s.data_bytes += len,
                            RST_STREAM => {
                                s.rst += 1;
                                if payload.get(..4) == Some(&[0, 0, 0, 7]) {
                                    s.refused += 1;
                                }
                            }
                            GOAWAY => {
                                let code = payload
                                    .get(4..8)
                                    .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
                                    .unwrap_or(u32::MAX);
                                s.goaway = Some(code);
                            }
                            SETTINGS if flags & ACK == 0 => {
                                if let Some(tx) = settings_tx.take() {
                                    let _ = tx.send(());
                                }
                            }
                            _ => {}
                        }
                    }
                }
                seen.lock().unwrap().closed = true;
            })
        };
        let mut conn = RawH2 { w, seen, reader };
        tokio::time::timeout(Duration::from_secs(5), settings_rx)
            .await
            .expect("server SETTINGS in time")
            .expect("server SETTINGS");
        conn.send(&frame(SETTINGS, ACK, 0, &[])).await;
        conn
    }

    /// Writes; false once the server has closed the connection.
    async fn send(&mut self, bytes: &[u8]) -> bool {
        self.w.write_all(bytes).await.is_ok()
    }

    fn seen(&self) -> std::sync::MutexGuard<'_, Seen> {
        self.seen.lock().unwrap()
    }

    /// Waits until `f(seen)` holds or `limit` passes.
    async fn wait(&self, limit: Duration, f: impl Fn(&Seen) -> bool) -> bool {
        let until = Instant::now() + limit;
        while Instant::now() < until {
            if f(&self.seen()) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        f(&self.seen())
    }
}

impl Drop for RawH2 {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// Resident memory of this process, in KiB.
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// One GET over a fresh h2c connection with the `h2` crate.
async fn h2_get(addr: SocketAddr, path: &str) -> u16 {
    let s = TcpStream::connect(addr).await.expect("connect");
    let (client, conn) = h2::client::handshake(s).await.expect("h2 handshake");
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut client = client.ready().await.expect("ready");
    let req = http::Request::builder()
        .uri(format!("http://gateway.test{path}"))
        .header("api-key", IOS_KEY)
        .body(())
        .unwrap();
    let (resp, _) = client.send_request(req, true).expect("send");
    let resp = tokio::time::timeout(Duration::from_secs(10), resp)
        .await
        .expect("h2 response in time")
        .expect("h2 response");
    let status = resp.status().as_u16();
    let mut body = resp.into_body();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.expect("body");
        let _ = body.flow_control().release_capacity(chunk.len());
    }
    driver.abort();
    status
}

/// Service is normal: an HTTP/1.1 and an HTTP/2 request both get 200 quickly.
async fn still_serving(gw: &Gateway) {
    let t = Instant::now();
    let r = gw.get("/api/status").send().await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(h2_get(gw.addr, "/api/status").await, 200);
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
}

/// A backend whose `/slow` records arrival times and answers after `delay`.
fn timed_backend(backend: &Backend, delay: Duration) -> Arc<Mutex<Vec<Instant>>> {
    let arrivals = Arc::new(Mutex::new(Vec::new()));
    let a = Arc::clone(&arrivals);
    backend.on_fn("/slow", move |_| {
        a.lock().unwrap().push(Instant::now());
        Reply::json(200, serde_json::json!({"ok": true})).delay(delay)
    });
    arrivals
}

/// Most arrivals within any window of `w`.
fn max_in_window(arrivals: &[Instant], w: Duration) -> usize {
    let mut a = arrivals.to_vec();
    a.sort();
    let mut best = 0;
    for (i, t) in a.iter().enumerate() {
        let n = a[i..]
            .iter()
            .take_while(|u| u.duration_since(*t) < w)
            .count();
        best = best.max(n);
    }
    best
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_beyond_max_concurrent_are_refused() {
    watch_panics();
    let _serial = SERIAL.lock().await;
    let backend = Backend::start().await;
    let arrivals = timed_backend(&backend, Duration::from_millis(800));
    let gw = GatewayConfig::new(backend.url())
        .limits("h2_max_concurrent_streams = 16")
        .route(
            "path = \"/api/h2slow\"\nmethods = [\"GET\"]\nbackend_path = \"/slow\"\npublic = true",
        )
        .start()
        .await;

    // A raw client that ignores the limit: 100 streams at once.
    let mut c = RawH2::connect(gw.addr).await;
    let block = header_block("GET", "/api/h2slow");
    let mut burst = Vec::new();
    for i in 0..100u32 {
        burst.extend(frame(HEADERS, END_HEADERS | END_STREAM, 1 + 2 * i, &block));
    }
    c.send(&burst).await;
    c.wait(Duration::from_secs(10), |s| {
        s.headers + s.rst >= 100 || s.closed
    })
    .await;
    let seen = format!("{:?}", *c.seen());
    let (answered, refused, goaway) = {
        let s = c.seen();
        (s.headers, s.rst, s.goaway)
    };
    eprintln!("100 streams over a limit of 16: {seen}");
    assert!(answered <= 16, "at most the limit was served: {seen}");
    assert!(
        refused >= 84 || goaway.is_some(),
        "the rest refused: {seen}"
    );
    let concurrent = max_in_window(&arrivals.lock().unwrap(), Duration::from_millis(700));
    assert!(concurrent <= 16, "backend saw {concurrent} at once");
    drop(c);

    // A well-behaved client (the h2 crate honours SETTINGS) queues instead:
    // 64 requests on one connection all succeed, 16 at a time.
    arrivals.lock().unwrap().clear();
    let s = TcpStream::connect(gw.addr).await.unwrap();
    let (client, conn) = h2::client::handshake(s).await.unwrap();
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    // One request first: once it is answered the server's SETTINGS are in
    // (a client may exceed the limit before it knows it, RFC 9113 §6.5.2).
    {
        let mut client = client.clone().ready().await.expect("ready");
        let req = http::Request::builder()
            .uri("http://gateway.test/api/status")
            .header("api-key", IOS_KEY)
            .body(())
            .unwrap();
        let (resp, _) = client.send_request(req, true).expect("send");
        assert_eq!(resp.await.expect("first response").status(), 200);
    }
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..64 {
        let mut client = client.clone();
        set.spawn(async move {
            client = client.ready().await.expect("ready");
            let req = http::Request::builder()
                .uri("http://gateway.test/api/h2slow")
                .header("api-key", IOS_KEY)
                .body(())
                .unwrap();
            let (resp, _) = client.send_request(req, true).expect("send");
            resp.await.expect("response").status().as_u16()
        });
    }
    let all = tokio::time::timeout(Duration::from_secs(30), async {
        let mut statuses = Vec::new();
        while let Some(r) = set.join_next().await {
            statuses.push(r.expect("task"));
        }
        statuses
    })
    .await
    .expect("64 queued requests finish");
    assert!(all.iter().all(|s| *s == 200), "{all:?}");
    let concurrent = max_in_window(&arrivals.lock().unwrap(), Duration::from_millis(700));
    eprintln!("64 queued streams: at most {concurrent} at the backend at once");
    assert!(concurrent <= 16, "backend saw {concurrent} at once");
    driver.abort();
    still_serving(&gw).await;
    gw.stop().await;
    assert_no_panics();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rapid_reset_is_bounded() {
    watch_panics();
    let _serial = SERIAL.lock().await;
    let backend = Backend::start().await;
    timed_backend(&backend, Duration::from_millis(200));
    let gw = GatewayConfig::new(backend.url())
        .route(
            "path = \"/api/h2slow\"\nmethods = [\"GET\"]\nbackend_path = \"/slow\"\npublic = true",
        )
        .start()
        .await;
    let before = rss_kib();
    let started = Instant::now();
    let mut c = RawH2::connect(gw.addr).await;
    let block = header_block("GET", "/api/h2slow");
    let mut sent = 0u32;
    // HEADERS then RST_STREAM(CANCEL), 20 000 times, in batches.
    'outer: for batch in 0..100u32 {
        let mut buf = Vec::new();
        for i in 0..200u32 {
            let id = 1 + 2 * (batch * 200 + i);
            buf.extend(frame(HEADERS, END_HEADERS | END_STREAM, id, &block));
            buf.extend(frame(RST_STREAM, 0, id, &8u32.to_be_bytes()));
        }
        if !c.send(&buf).await {
            break 'outer;
        }
        sent += 200;
        if c.seen().goaway.is_some() {
            break;
        }
    }
    c.wait(Duration::from_secs(5), |s| s.goaway.is_some() || s.closed)
        .await;
    let seen = format!("{:?}", *c.seen());
    let goaway = c.seen().goaway;
    drop(c);
    let after = rss_kib();
    let forwarded = backend.count("/slow");
    eprintln!(
        "rapid reset: {sent} HEADERS+RST sent in {:?}; server: {seen}; backend got {forwarded}; RSS {before} -> {after} KiB",
        started.elapsed()
    );
    assert!(goaway.is_some(), "GOAWAY for a reset flood: {seen}");
    assert!(
        sent < 20_000,
        "the connection was cut before the whole flood"
    );
    assert!(
        after < before + 64 * 1024,
        "RSS grew from {before} to {after} KiB"
    );
    still_serving(&gw).await;
    gw.stop().await;
    assert_no_panics();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn continuation_flood_is_cut() {
    watch_panics();
    let _serial = SERIAL.lock().await;
    let backend = Backend::start().await;
    let gw = GatewayConfig::new(backend.url()).start().await;
    let before = rss_kib();
    let mut c = RawH2::connect(gw.addr).await;
    // HEADERS without END_HEADERS, then CONTINUATION frames of 16 KiB of
    // literal fields, up to 64 MiB, never ending the block.
    let first = header_block("GET", "/api/status");
    c.send(&frame(HEADERS, END_STREAM, 1, &first)).await;
    let mut field = Vec::new();
    while field.len() < 16 << 10 {
        field.push(0x00);
        hpack_string(&mut field, b"x-flood");
        hpack_string(&mut field, &[b'a'; 100]);
    }
    let cont = frame(CONTINUATION, 0, 1, &field[..16 << 10]);
    let mut sent = 0usize;
    while sent < 64 << 20 {
        if !c.send(&cont).await {
            break;
        }
        sent += cont.len();
        if c.seen().closed || c.seen().goaway.is_some() {
            break;
        }
    }
    c.wait(Duration::from_secs(5), |s| s.goaway.is_some() || s.closed)
        .await;
    let seen = format!("{:?}", *c.seen());
    let cut = c.seen().goaway.is_some() || c.seen().closed;
    drop(c);
    let after = rss_kib();
    eprintln!(
        "CONTINUATION flood: {} KiB sent; server: {seen}; RSS {before} -> {after} KiB",
        sent >> 10
    );
    assert!(cut, "the server cuts an endless header block: {seen}");
    assert!(sent < 64 << 20, "cut before 64 MiB: sent {sent}");
    assert!(
        after < before + 64 * 1024,
        "RSS grew from {before} to {after} KiB"
    );
    assert_eq!(backend.requests().len(), 0);
    still_serving(&gw).await;
    gw.stop().await;
    assert_no_panics();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_data_flood_stays_bounded() {
    watch_panics();
    let _serial = SERIAL.lock().await;
    let backend = Backend::start().await;
    let gw = GatewayConfig::new(backend.url())
        .route("path = \"/api/h2stream\"\nmethods = [\"POST\"]\nbackend_path = \"/echo\"\npublic = true\nstream_request_body = true")
        .start()
        .await;
    let before = rss_kib();
    let started = Instant::now();
    let mut c = RawH2::connect(gw.addr).await;
    // Two open requests (buffered and streamed bodies), then 200 000 empty
    // DATA frames on each, no END_STREAM.
    c.send(&frame(
        HEADERS,
        END_HEADERS,
        1,
        &header_block("POST", "/api/echo"),
    ))
    .await;
    c.send(&frame(
        HEADERS,
        END_HEADERS,
        3,
        &header_block("POST", "/api/h2stream"),
    ))
    .await;
    let mut buf = Vec::new();
    for _ in 0..1000 {
        buf.extend(frame(DATA, 0, 1, &[]));
        buf.extend(frame(DATA, 0, 3, &[]));
    }
    let mut frames = 0usize;
    // While flooding, another client is served.
    let mut probe_worst = Duration::ZERO;
    for round in 0..200 {
        if !c.send(&buf).await {
            break;
        }
        frames += 2000;
        if round % 50 == 0 {
            let t = Instant::now();
            let r = gw.get("/api/status").send().await;
            assert_eq!(r.status, 200);
            probe_worst = probe_worst.max(t.elapsed());
        }
        if c.seen().closed || c.seen().goaway.is_some() {
            break;
        }
    }
    let seen = format!("{:?}", *c.seen());
    drop(c);
    let after = rss_kib();
    eprintln!(
        "empty DATA flood: {frames} frames in {:?}; server: {seen}; probe worst {probe_worst:?}; RSS {before} -> {after} KiB",
        started.elapsed()
    );
    assert!(
        after < before + 64 * 1024,
        "RSS grew from {before} to {after} KiB"
    );
    assert!(probe_worst < Duration::from_secs(2), "{probe_worst:?}");
    // Nothing was forwarded as a complete body.
    for r in backend.requests_to("/echo") {
        assert!(r.body_error || r.body_len == 0, "{r:?}");
    }
    still_serving(&gw).await;
    gw.stop().await;
    assert_no_panics();
}

/// `Upgrade: websocket` (and `h2c`) over HTTP/1.1: the backend never sees
/// the upgrade, the device gets the normal response, and bytes sent after
/// it are parsed as HTTP (refused), never tunnelled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_requests_tunnel_nothing() {
    watch_panics();
    let backend = Backend::start().await;
    let gw = Gateway::for_backend(&backend).await;
    for upgrade in ["websocket", "h2c", "TLS/1.2"] {
        let req = format!(
            "GET /api/public/ws HTTP/1.1\r\nHost: x\r\nApi-Key: {IOS_KEY}\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: {upgrade}\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        let mut bytes = req.into_bytes();
        // A websocket frame and raw h2 preface right behind the request.
        bytes.extend_from_slice(b"\x81\x05hello");
        bytes.extend_from_slice(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
        let out = raw_all(gw.addr, &bytes, Duration::from_millis(1500)).await;
        let first = out.responses.first().expect("a response");
        assert_eq!(first.status, 200, "{upgrade}: {}", first.text());
        assert!(first.header("upgrade").is_none(), "{upgrade}");
        for r in &out.responses[1..] {
            assert_eq!(
                r.status, 400,
                "{upgrade}: trailing bytes are refused as HTTP"
            );
        }
    }
    assert_eq!(backend.count("/public/ws"), 3, "{:?}", backend.paths());
    for r in backend.requests() {
        assert!(r.header("upgrade").is_none(), "Upgrade reached the backend");
        assert!(r.header("http2-settings").is_none());
        let conn = r
            .header("connection")
            .unwrap_or_default()
            .to_ascii_lowercase();
        assert!(!conn.contains("upgrade"), "Connection: {conn}");
    }
    gw.stop().await;
    assert_no_panics();
}

/// A backend that answers 101 anyway (it was never asked to upgrade): the
/// device gets a 502 envelope and nothing is relayed either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_101_is_not_relayed() {
    watch_panics();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n\x81\x05hello")
                    .await;
                tokio::time::sleep(Duration::from_secs(5)).await;
            });
        }
    });
    let gw = GatewayConfig::new(format!("http://{addr}")).start().await;
    let out = raw_all(
        gw.addr,
        format!("GET /api/public/ws HTTP/1.1\r\nHost: x\r\nApi-Key: {IOS_KEY}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n").as_bytes(),
        Duration::from_millis(1500),
    )
    .await;
    assert_eq!(out.responses.len(), 1, "{out:?}");
    out.responses[0].assert_envelope(502);
    assert!(
        !out.rest.windows(5).any(|w| w == b"hello"),
        "backend bytes relayed"
    );
    task.abort();
    gw.stop().await;
    assert_no_panics();
}
