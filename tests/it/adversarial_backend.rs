//! Backend faults: refused connections, resets mid-response, garbage,
//! answers slower than the route timeout, a body that stalls, and a backend
//! flapping up and down under load. Every device request gets an answer
//! (502/503/504 envelope, or 200 while the backend is up) within its
//! timeout, none hangs, and the gateway recovers by itself.

use crate::support::*;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::task::JoinSet;

/// What a raw backend does with each connection.
#[derive(Clone)]
enum Behave {
    /// Reads the request head, writes these bytes, then closes (FIN).
    WriteThenClose(&'static [u8]),
    /// Reads the request head, writes these bytes, then resets (RST).
    WriteThenReset(&'static [u8]),
    /// Reads the request head, writes these bytes, then holds the connection.
    WriteThenStall(&'static [u8]),
    /// Closes as soon as it accepts.
    CloseAtOnce,
    /// A minimal keep-alive HTTP/1.1 server answering 200 JSON.
    Ok,
}

/// A TCP backend that misbehaves on purpose. Stops (listener and every
/// connection) on drop.
struct RawBackend {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl RawBackend {
    async fn start(behave: Behave) -> RawBackend {
        RawBackend::on(listen("127.0.0.1:0".parse().unwrap()), behave)
    }

    fn on(listener: TcpListener, behave: Behave) -> RawBackend {
        let addr = listener.local_addr().expect("addr");
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&accepted);
        let task = tokio::spawn(async move {
            // Dropping the set (when this task is aborted) aborts every connection.
            let mut conns = JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                count.fetch_add(1, Ordering::SeqCst);
                conns.spawn(serve_raw(stream, behave.clone()));
                while conns.try_join_next().is_some() {}
            }
        });
        RawBackend {
            addr,
            accepted,
            task,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for RawBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Binds with SO_REUSEADDR so a flapping backend can come back on its port.
fn listen(addr: SocketAddr) -> TcpListener {
    let socket = TcpSocket::new_v4().expect("socket");
    socket.set_reuseaddr(true).expect("reuseaddr");
    socket.bind(addr).expect("bind raw backend");
    socket.listen(1024).expect("listen")
}

async fn read_head(s: &mut TcpStream) -> bool {
    let mut buf = Vec::new();
    let mut tmp = [0u8; 4096];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut tmp).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => buf.extend_from_slice(&tmp[..n]),
        }
    }
    true
}

async fn serve_raw(mut s: TcpStream, behave: Behave) {
    match behave {
        Behave::CloseAtOnce => {}
        Behave::WriteThenClose(bytes) => {
            if read_head(&mut s).await {
                let _ = s.write_all(bytes).await;
                let _ = s.shutdown().await;
            }
        }
        Behave::WriteThenReset(bytes) => {
            if read_head(&mut s).await {
                let _ = s.write_all(bytes).await;
                let _ = s.flush().await;
                tokio::time::sleep(Duration::from_millis(20)).await;
                #[allow(deprecated)]
                let _ = s.set_linger(Some(Duration::ZERO));
            }
        }
        Behave::WriteThenStall(bytes) => {
            if read_head(&mut s).await {
                let _ = s.write_all(bytes).await;
                tokio::time::sleep(Duration::from_secs(3600)).await;
            }
        }
        Behave::Ok => {
            // GET requests only: no bodies to skip.
            while read_head(&mut s).await {
                let body = br#"{"up":true}"#;
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                    body.len()
                );
                if s.write_all(head.as_bytes()).await.is_err() || s.write_all(body).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// A GET through the gateway that must finish within `limit`, head and body.
/// Returns the status and whether the body ended cleanly.
async fn bounded_get(
    gw: &Gateway,
    path: &str,
    limit: Duration,
) -> (u16, Result<bytes::Bytes, String>) {
    use http_body_util::BodyExt;
    let started = Instant::now();
    let req = gw.get(path);
    let res = tokio::time::timeout(limit, async move {
        let resp = req.send_streaming().await;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp
            .into_body()
            .collect()
            .await
            .map(|c| c.to_bytes())
            .map_err(|e| e.to_string());
        (status, headers, body)
    })
    .await;
    let Ok((status, headers, body)) = res else {
        panic!("GET {path} hung: no complete answer within {limit:?}");
    };
    if status >= 400 {
        let body = body.clone().expect("error bodies are complete");
        let r = Resp {
            status,
            headers,
            body,
        };
        r.assert_envelope(status);
    }
    let _ = started;
    (status, body)
}

const LIMIT: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_connections_are_502_quickly() {
    watch_panics();
    let port = free_port();
    let gw = GatewayConfig::new(format!("http://127.0.0.1:{port}"))
        .start()
        .await;
    for _ in 0..5 {
        let t = Instant::now();
        let (status, _) = bounded_get(&gw, "/api/status", LIMIT).await;
        assert_eq!(status, 502);
        assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    }
    gw.stop().await;
    assert_no_panics();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_resets_and_truncated_heads_are_502() {
    watch_panics();
    // An answer head well over the 64 KiB the backend side reads for one
    // (hyper checks the size between reads, so a head may pass it by one read).
    let huge_head: &'static [u8] = Box::leak(
        format!(
            "HTTP/1.1 200 OK\r\nx-big: {}\r\ncontent-length: 2\r\n\r\n{{}}",
            "a".repeat(200 << 10)
        )
        .into_bytes()
        .into_boxed_slice(),
    );
    let cases: Vec<(&str, Behave)> = vec![
        ("head of 200 KiB", Behave::WriteThenStall(huge_head)),
        ("garbage", Behave::WriteThenClose(b"HELLO\r\n\r\n")),
        ("closed at once", Behave::CloseAtOnce),
        ("closed after reading", Behave::WriteThenClose(b"")),
        (
            "head cut short then FIN",
            Behave::WriteThenClose(b"HTTP/1.1 200 OK\r\nContent-"),
        ),
        (
            "head cut short then RST",
            Behave::WriteThenReset(b"HTTP/1.1 200 OK\r\nContent-"),
        ),
        ("reset before answering", Behave::WriteThenReset(b"")),
        (
            "binary noise",
            Behave::WriteThenClose(b"\x00\x01\x02\xff\xfe\r\n\r\n\x00"),
        ),
        (
            "only an interim response",
            Behave::WriteThenClose(b"HTTP/1.1 100 Continue\r\n\r\n"),
        ),
        (
            "invalid status line",
            Behave::WriteThenClose(b"HTTP/1.1 2OO OK\r\ncontent-length: 0\r\n\r\n"),
        ),
        (
            "conflicting lengths",
            Behave::WriteThenClose(
                b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nabc",
            ),
        ),
        (
            "smuggled second response",
            Behave::WriteThenClose(
                b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\ntransfer-encoding: chunked\r\n\r\nHTTP/1.1 200 OK\r\n\r\n",
            ),
        ),
    ];
    for (name, behave) in cases {
        let backend = RawBackend::start(behave).await;
        let gw = GatewayConfig::new(backend.url()).start().await;
        let (status, body) = bounded_get(&gw, "/api/status", LIMIT).await;
        match status {
            502 => {}
            // hyper may read a CL+TE answer as chunked (and then it is cut short).
            200 if name == "smuggled second response" => {
                assert!(
                    body.is_err() || body.as_ref().is_ok_and(|b| b.is_empty()),
                    "{name}: {body:?}"
                );
            }
            _ => panic!("{name}: status {status}"),
        }
        assert!(backend.accepted.load(Ordering::SeqCst) >= 1, "{name}");
        gw.stop().await;
    }
    assert_no_panics();
}

/// A 2xx whose body breaks off: the device already has the head, so it must
/// see the body end in an error — never a clean, silently shorter body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_mid_body_is_a_broken_body_not_a_short_one() {
    watch_panics();
    for (name, behave) in [
        (
            "FIN mid-body",
            Behave::WriteThenClose(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\npartial"),
        ),
        (
            "RST mid-body",
            Behave::WriteThenReset(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\npartial"),
        ),
        (
            "chunked cut",
            Behave::WriteThenClose(
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n7\r\npartial\r\n",
            ),
        ),
    ] {
        let backend = RawBackend::start(behave).await;
        let gw = GatewayConfig::new(backend.url()).start().await;
        let (status, body) = bounded_get(&gw, "/api/status", LIMIT).await;
        assert_eq!(status, 200, "{name}: the head was already good");
        assert!(body.is_err(), "{name}: body ended cleanly: {body:?}");
        // And the gateway serves the next request (a fresh connection).
        drop(backend);
        gw.stop().await;
    }
    assert_no_panics();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_backends_are_504_within_the_route_timeout() {
    watch_panics();
    // Never answers.
    let backend = RawBackend::start(Behave::WriteThenStall(b"")).await;
    let gw = GatewayConfig::new(backend.url())
        .backend("timeout = \"1s\"")
        .start()
        .await;
    let t = Instant::now();
    let (status, _) = bounded_get(&gw, "/api/slow", LIMIT).await;
    assert_eq!(status, 504);
    let took = t.elapsed();
    assert!(took >= Duration::from_millis(290), "{took:?}");
    assert!(
        took < Duration::from_secs(3),
        "route timeout 300ms, took {took:?}"
    );
    let (status, _) = bounded_get(&gw, "/api/status", LIMIT).await;
    assert_eq!(status, 504, "backend timeout 1s");
    // Half a head, then silence: still 504.
    drop(backend);
    gw.stop().await;
    let backend = RawBackend::start(Behave::WriteThenStall(b"HTTP/1.1 200 OK\r\ncontent-")).await;
    let gw = GatewayConfig::new(backend.url()).start().await;
    let (status, _) = bounded_get(&gw, "/api/slow", LIMIT).await;
    assert_eq!(status, 504);
    gw.stop().await;
    assert_no_panics();
}

/// A 2xx head, a few bytes, then nothing: the device must not wait forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_body_does_not_hang_the_device() {
    watch_panics();
    let backend = RawBackend::start(Behave::WriteThenStall(
        b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\npartial",
    ))
    .await;
    let gw = GatewayConfig::new(backend.url())
        .backend("timeout = \"1s\"")
        .start()
        .await;
    let t = Instant::now();
    let (status, body) = bounded_get(&gw, "/api/slow", LIMIT).await;
    assert_eq!(status, 200);
    assert!(body.is_err(), "a stalled body ends in an error: {body:?}");
    eprintln!("stalled body cut after {:?}", t.elapsed());
    gw.stop().await;
    assert_no_panics();
}

/// The backend goes up and down every few hundred milliseconds while four
/// clients keep sending: every request is answered within its bound, with
/// 200 or a 502/503/504 envelope, and once the backend stays up the very
/// next request is a 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flapping_backend_under_load() {
    watch_panics();
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let gw = GatewayConfig::new(format!("http://{addr}"))
        .backend("timeout = \"1s\"")
        .start()
        .await;
    let gw = Arc::new(gw);

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let flapper = tokio::spawn(async move {
        let mut cycles = 0;
        while !*stop_rx.borrow() {
            let up = RawBackend::on(listen(addr), Behave::Ok);
            tokio::time::sleep(Duration::from_millis(250)).await;
            drop(up);
            tokio::time::sleep(Duration::from_millis(150)).await;
            cycles += 1;
        }
        cycles
    });

    let mut clients = JoinSet::new();
    let until = Instant::now() + Duration::from_secs(5);
    for _ in 0..4 {
        let gw = Arc::clone(&gw);
        clients.spawn(async move {
            let mut seen = std::collections::BTreeMap::<u16, usize>::new();
            while Instant::now() < until {
                let (status, body) = bounded_get(&gw, "/api/status", Duration::from_secs(5)).await;
                assert!(matches!(status, 200 | 502 | 503 | 504), "status {status}");
                if status == 200 {
                    // A 200 body can be cut when the backend drops mid-answer.
                    if let Ok(b) = &body {
                        assert_eq!(&b[..], br#"{"up":true}"#);
                    }
                }
                *seen.entry(status).or_default() += 1;
            }
            seen
        });
    }
    let mut total = std::collections::BTreeMap::<u16, usize>::new();
    while let Some(r) = clients.join_next().await {
        match r {
            Ok(seen) => {
                for (k, v) in seen {
                    *total.entry(k).or_default() += v;
                }
            }
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => panic!("{e}"),
        }
    }
    let _ = stop_tx.send(true);
    let cycles = tokio::time::timeout(LIMIT, flapper)
        .await
        .expect("flapper stops")
        .expect("flapper task");
    eprintln!("flapping: {cycles} down/up cycles, statuses {total:?}");
    assert!(
        total.get(&200).copied().unwrap_or(0) > 0,
        "some requests succeeded: {total:?}"
    );

    // Recovery: the backend stays up; the next request is a 200 on the first try.
    let up = RawBackend::on(listen(addr), Behave::Ok);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (status, body) = bounded_get(&gw, "/api/status", LIMIT).await;
    assert_eq!(status, 200, "recovered by itself");
    assert_eq!(&body.expect("clean body")[..], br#"{"up":true}"#);
    for _ in 0..10 {
        let (status, _) = bounded_get(&gw, "/api/status", LIMIT).await;
        assert_eq!(status, 200);
    }
    drop(up);
    match Arc::try_unwrap(gw) {
        Ok(gw) => gw.stop().await,
        Err(_) => panic!("gateway still shared"),
    }
    assert_no_panics();
}
