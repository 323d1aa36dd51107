//! Rate limits (per client address, per API key, per route, login attempts)
//! and the between-reads request body deadline.

use crate::support::*;
use std::time::{Duration, Instant};

/// A gateway with the common config plus `extra` TOML at the end.
async fn start(cfg: GatewayConfig, extra: &str) -> Gateway {
    cfg.extra(extra).start().await
}

fn assert_429(resp: &Resp) {
    resp.assert_envelope(429);
    let retry: u64 = resp
        .header("retry-after")
        .expect("Retry-After")
        .parse()
        .expect("seconds");
    assert!(retry >= 1, "Retry-After {retry}");
}

#[tokio::test]
async fn per_client_address() {
    let backend = Backend::start().await;
    let gw = start(
        GatewayConfig::new(backend.url()),
        "[rate_limits]\nper_client_ip = \"3/min\"",
    )
    .await;
    for _ in 0..3 {
        let r = gw.get("/api/status").send().await;
        assert_eq!(r.status, 200);
    }
    // Refused before the API key is even looked at.
    let r = gw.req("GET", "/api/status").send().await;
    assert_429(&r);
    assert_eq!(backend.count("/status"), 3);
}

#[tokio::test]
async fn per_api_key_and_per_route() {
    let backend = Backend::start().await;
    let cfg = GatewayConfig::new(backend.url()).route(
        r#"path = "/api/limited"
methods = ["GET"]
backend_path = "/limited"
public = true
rate_limit = "1/min""#,
    );
    let gw = start(cfg, "[rate_limits]\nper_api_key = \"3/min\"").await;
    for _ in 0..3 {
        let r = gw.get("/api/status").send().await;
        assert_eq!(r.status, 200);
    }
    assert_429(&gw.get("/api/status").send().await);
    // Another key has its own budget.
    let r = gw
        .req("GET", "/api/limited")
        .api_key(ANDROID_KEY)
        .send()
        .await;
    assert_eq!(r.status, 200);
    // ...and the route allows it one call per minute.
    assert_429(
        &gw.req("GET", "/api/limited")
            .api_key(ANDROID_KEY)
            .send()
            .await,
    );
    assert_eq!(backend.count("/limited"), 1);
}

#[tokio::test]
async fn login_attempts_per_address_and_name() {
    let backend = Backend::start().await;
    backend.on(
        "/login",
        Reply::json(
            401,
            serde_json::json!({"error": {"type": "AuthError", "message": "bad credentials"}}),
        ),
    );
    let gw = start(
        GatewayConfig::new(backend.url()),
        "[rate_limits]\nlogin = \"2/min\"",
    )
    .await;
    let attempt = |email: &'static str| {
        gw.post("/login")
            .json(serde_json::json!({"email": email, "password": "guess"}))
            .send()
    };
    assert_eq!(attempt("victim@example.com").await.status, 401);
    assert_eq!(attempt("Victim@Example.com").await.status, 401);
    assert_429(&attempt("victim@example.com").await);
    assert_eq!(
        backend.count("/login"),
        2,
        "the third attempt never reached the backend"
    );
    assert_eq!(attempt("other@example.com").await.status, 401);
}

#[tokio::test]
async fn slow_request_bodies_get_408() {
    let backend = Backend::start().await;
    let gw = start(
        GatewayConfig::new(backend.url()).limits("body_read_timeout = \"200ms\""),
        "",
    )
    .await;
    // Content-Length body that stalls after two bytes (streamed to the backend).
    let started = Instant::now();
    let resp = raw(
        gw.addr,
        format!(
            "POST /api/upload HTTP/1.1\r\nHost: x\r\nApi-Key: {IOS_KEY}\r\nContent-Length: 10\r\n\r\nab"
        )
        .as_bytes(),
    )
    .await;
    resp.assert_envelope(408);
    assert!(started.elapsed() < Duration::from_secs(3));

    // Chunked body that stalls (buffered by the gateway, so nothing is sent on).
    // The backend records the aborted streamed request when its read fails.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let streamed = backend.count("/upload");
    let resp = raw(
        gw.addr,
        format!(
            "POST /api/upload HTTP/1.1\r\nHost: x\r\nApi-Key: {IOS_KEY}\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n"
        )
        .as_bytes(),
    )
    .await;
    resp.assert_envelope(408);
    assert_eq!(
        backend.count("/upload"),
        streamed,
        "nothing partial reached the backend"
    );
}

#[tokio::test]
async fn idle_keep_alive_connections_are_closed() {
    let backend = Backend::start().await;
    // HTTP/1.1 only (the IO wrapper's idle deadline closes idle connections)
    // and with h2c on (the same, and the idle watchdog once HTTP/2).
    for h2c in ["h2c = false", "h2c = true"] {
        idle_connection_closes(&backend, h2c).await;
    }
}

async fn idle_connection_closes(backend: &Backend, h2c: &str) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let gw = start(
        GatewayConfig::new(backend.url())
            .server(h2c)
            .limits("idle_timeout = \"300ms\""),
        "",
    )
    .await;
    let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(
        format!("GET /api/status HTTP/1.1\r\nHost: x\r\nApi-Key: {IOS_KEY}\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let resp = read_raw_response(&mut s).await;
    assert_eq!(resp.status, 200);
    // Kept alive, then closed by the gateway once idle past the timeout.
    let started = Instant::now();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("gateway closes the idle connection")
        .unwrap_or(0);
    assert_eq!(n, 0, "connection closed without data");
    assert!(started.elapsed() >= Duration::from_millis(150), "{h2c}");
}

/// The idle deadline and the header deadline are apart: a keep-alive
/// connection may idle longer than `header_read_timeout`, and a head cut
/// short still gets the 408 at `header_read_timeout`.
#[tokio::test]
async fn idle_and_header_deadlines_are_apart() {
    use tokio::io::AsyncWriteExt;
    let backend = Backend::start().await;
    let gw = start(
        GatewayConfig::new(backend.url())
            .limits("header_read_timeout = \"500ms\"")
            .limits("idle_timeout = \"3s\""),
        "",
    )
    .await;
    let request = format!("GET /api/status HTTP/1.1\r\nHost: x\r\nApi-Key: {IOS_KEY}\r\n\r\n");
    let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    assert_eq!(read_raw_response(&mut s).await.status, 200);
    // Idle for three header deadlines: still open.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    s.write_all(request.as_bytes()).await.unwrap();
    assert_eq!(read_raw_response(&mut s).await.status, 200);
    // Half a head: 408 after the header deadline, well before the idle one.
    assert_half_head_gets_408(&mut s).await;
}

/// `100 Continue` is not an answer: a body that takes longer than the
/// header deadline to upload after it is not cut by that deadline.
#[tokio::test]
async fn a_slow_body_after_100_continue_is_not_cut_by_the_header_deadline() {
    use tokio::io::AsyncWriteExt;
    let backend = Backend::start().await;
    let gw = start(
        GatewayConfig::new(backend.url())
            .limits("header_read_timeout = \"500ms\"")
            .limits("body_read_timeout = \"3s\""),
        "",
    )
    .await;
    let mut s = upload_after_100_continue(gw.addr, 3000).await;
    // Six parts, 300 ms apart: 1.5 s in all, three header deadlines.
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        s.write_all(&[b'a'; 500]).await.unwrap();
    }
    let resp = read_raw_response(&mut s).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(backend.count("/upload"), 1);
}

/// A body the gateway reads whole is cut by `limits.body_read_timeout`
/// (between reads), not by the route's timeout: a pause longer than the
/// route timeout but shorter than the body deadline is fine, and the route
/// timeout then still gives the backend its full time.
#[tokio::test]
async fn slow_body_is_cut_at_body_read_timeout_not_the_route_timeout() {
    use tokio::io::AsyncWriteExt;
    let backend = Backend::start().await;
    backend.on("/slowbody", Reply::status(200).body("ok"));
    let gw = GatewayConfig::new(backend.url())
        .limits("body_read_timeout = \"1500ms\"")
        .route(
            r#"path = "/api/slowbody"
methods = ["POST"]
backend_path = "/slowbody"
public = true
timeout = "300ms""#,
        )
        .start()
        .await;
    let head = "POST /api/slowbody HTTP/1.1\r\nHost: x\r\nApi-Key: k\r\nContent-Length: 4\r\n\r\n"
        .replace("k\r\n", &format!("{IOS_KEY}\r\n"));
    // Pauses of 600 ms (twice the route timeout) between parts: answered.
    let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(format!("{head}ab").as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    s.write_all(b"c").await.unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    s.write_all(b"d").await.unwrap();
    let resp = read_raw_response(&mut s).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(backend.last("/slowbody").body.as_ref(), b"abcd");
    // A stall past body_read_timeout: 408, not the route's 504.
    let started = Instant::now();
    let resp = raw(gw.addr, format!("{head}ab").as_bytes()).await;
    resp.assert_envelope(408);
    assert!(started.elapsed() >= Duration::from_millis(1400));
    assert_eq!(backend.count("/slowbody"), 1);
}

/// A client that shuts down its write side right after a complete request
/// (`nc`'s default) still gets the answer.
#[tokio::test]
async fn half_closed_client_gets_its_answer() {
    use tokio::io::AsyncWriteExt;
    let backend = Backend::start().await;
    backend.on("/status", Reply::status(200).body("up"));
    let gw = Gateway::for_backend(&backend).await;
    let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(
        format!("GET /api/status HTTP/1.1\r\nHost: x\r\nApi-Key: {IOS_KEY}\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    s.shutdown().await.unwrap();
    let resp = tokio::time::timeout(TIMEOUT, read_raw_response(&mut s))
        .await
        .expect("answer in time");
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.text(), "up");
}
