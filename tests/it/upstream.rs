//! Backend non-2xx answers and the backend-facing contract:
//! error normalization, headers the backend receives, hop-by-hop rules,
//! request ids, path traversal, and graceful shutdown.

use crate::support::*;
use serde_json::json;
use std::time::{Duration, Instant};

const DJANGO_DEBUG_PAGE: &str = r#"<!DOCTYPE html>
<html lang="en"><head><title>ProgrammingError at /orders/1</title></head>
<body><div id="summary"><h1>ProgrammingError at /orders/1</h1>
<pre class="exception_value">relation "orders_order" does not exist</pre>
<table class="meta"><tr><th>Django Version:</th><td>4.2.7</td></tr>
<tr><th>Server:</th><td>db-primary.internal.example:5432</td></tr></table></div>
<div id="traceback"><h2>Traceback</h2><pre>Traceback (most recent call last):
  File "/srv/app/orders/views.py", line 42, in detail
SECRET_KEY = 'django-insecure-abc123'</pre></div></body></html>"#;

#[tokio::test]
async fn backend_html_500_becomes_an_envelope_without_html() {
    let backend = Backend::start().await;
    backend.on(
        "/status",
        Reply::html(500, DJANGO_DEBUG_PAGE).header("x-frame-options", "DENY"),
    );
    let gw = Gateway::for_backend(&backend).await;
    let r = gw.get("/api/status").send().await;
    let (kind, msg) = r.assert_envelope(500);
    assert_eq!(kind, "BackendError");
    assert_eq!(msg, "Internal Server Error");
    let text = r.text();
    for leak in [
        "<",
        "Traceback",
        "internal",
        "SECRET_KEY",
        "views.py",
        "Django",
    ] {
        assert!(!text.contains(leak), "{leak:?} leaked: {text}");
    }
    gw.stop().await;
}

#[tokio::test]
async fn backend_json_error_object_keeps_type_and_message() {
    let backend = Backend::start().await;
    backend.on(
        "/status",
        Reply::json(
            409,
            json!({"error": {"code": 1234, "type": "OrderLocked", "message": "Order 7 is being edited", "trace": "x"}}),
        ),
    );
    let gw = Gateway::for_backend(&backend).await;
    let r = gw.get("/api/status").send().await;
    let (kind, msg) = r.assert_envelope(409);
    assert_eq!(kind, "OrderLocked");
    assert_eq!(msg, "Order 7 is being edited");
    assert!(!r.text().contains("trace"), "{}", r.text());
    gw.stop().await;
}

#[tokio::test]
async fn backend_json_without_error_or_empty_is_backend_error() {
    let backend = Backend::start().await;
    let gw = Gateway::for_backend(&backend).await;
    let cases = [
        (
            Reply::json(422, json!({"detail": "bad field"})),
            422,
            "Unprocessable Entity",
        ),
        (Reply::status(404), 404, "Not Found"),
        (Reply::json(503, json!(["x"])), 503, "Service Unavailable"),
        (
            Reply::status(502)
                .header("content-type", "text/plain")
                .body("upstream db.internal down"),
            502,
            "Bad Gateway",
        ),
    ];
    for (reply, status, message) in cases {
        backend.on("/status", reply);
        let r = gw.get("/api/status").send().await;
        let (kind, msg) = r.assert_envelope(status);
        assert_eq!(kind, "BackendError");
        assert_eq!(msg, message);
        assert!(!r.text().contains("internal"));
    }
    gw.stop().await;
}

#[tokio::test]
async fn backend_retry_after_is_kept_on_429() {
    let backend = Backend::start().await;
    backend.on("/status", Reply::status(429).header("retry-after", "7"));
    let gw = Gateway::for_backend(&backend).await;
    let r = gw.get("/api/status").send().await;
    r.assert_envelope(429);
    assert_eq!(r.header("retry-after"), Some("7"));
    gw.stop().await;
}

#[tokio::test]
async fn success_passes_through_status_body_and_headers() {
    let backend = Backend::start().await;
    backend.on(
        "/orders/42",
        Reply::json(201, json!({"id": 42}))
            .header("location", "/orders/42")
            .header("x-custom", "kept")
            .header("set-cookie", "a=1")
            .header("set-cookie", "b=2"),
    );
    backend.on("/status", Reply::status(204));
    backend.on_fn("/renew_session", |_| Reply::json(200, json!({})));
    let gw = Gateway::for_backend(&backend).await;
    let r = gw
        .post("/api/orders/42?dry=1")
        .token("t")
        .json(json!({"qty": 1}))
        .send()
        .await;
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(r.json(), json!({"id": 42}));
    assert_eq!(r.header("location"), Some("/orders/42"));
    assert_eq!(r.header("x-custom"), Some("kept"));
    assert_eq!(r.headers.get_all("set-cookie").iter().count(), 2);
    assert_eq!(r.header("content-type"), Some("application/json"));
    let rec = backend.last("/orders/42");
    assert_eq!(rec.uri, "/orders/42?dry=1");
    assert_eq!(rec.method, "POST");
    assert_eq!(rec.json(), json!({"qty": 1}));

    let r = gw.get("/api/status").send().await;
    assert_eq!(r.status, 204);
    assert!(r.body.is_empty());
    gw.stop().await;
}

#[tokio::test]
async fn spoofed_identity_headers_never_reach_the_backend() {
    let backend = Backend::start().await;
    backend.on("/renew_session", renewal(Duration::from_secs(600)));
    let gw = Gateway::for_backend(&backend).await;
    let r = gw
        .get("/api/profile")
        .token("real-token")
        .header("api-client", "admin-console")
        .header("client-ip", "6.6.6.6")
        .header("X-Forwarded-For", "6.6.6.6, 7.7.7.7")
        .header("X-Real-IP", "6.6.6.6")
        .header("Forwarded", "for=6.6.6.6")
        .header("User-Token", "second-token-value")
        .send()
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    for rec in [backend.last("/renew_session"), backend.last("/profile")] {
        assert_eq!(
            rec.header_all("api-key"),
            [BACKEND_CREDENTIAL],
            "{}",
            rec.path
        );
        assert_eq!(rec.header_all("api-client"), ["ios-app"]);
        assert_eq!(rec.header_all("client-ip"), ["127.0.0.1"]);
        assert_eq!(rec.header_all("x-forwarded-for"), ["127.0.0.1"]);
        assert_eq!(rec.header_all("user-token"), ["real-token"]);
        assert_eq!(rec.header_all("x-forwarded-proto"), ["http"]);
        assert!(rec.header("x-real-ip").is_none());
        assert!(rec.header("forwarded").is_none());
        assert_eq!(rec.header("host"), Some(backend.addr.to_string().as_str()));
        for (name, value) in rec.headers.iter() {
            let v = String::from_utf8_lossy(value.as_bytes());
            assert!(!v.contains("6.6.6.6"), "{name}: {v}");
            assert!(!v.contains(IOS_KEY), "device key forwarded in {name}");
            assert!(!v.contains("admin-console"), "{name}: {v}");
        }
    }

    // On a public route, a device-sent api-key is replaced too (android key, sha256-configured).
    let r = gw
        .req("GET", "/api/status")
        .api_key(ANDROID_KEY)
        .header("api-client", "ios-app")
        .send()
        .await;
    assert_eq!(r.status, 200);
    let rec = backend.last("/status");
    assert_eq!(rec.header_all("api-key"), [BACKEND_CREDENTIAL]);
    assert_eq!(rec.header_all("api-client"), ["android-app"]);
    assert!(rec.header("user-token").is_none());
    gw.stop().await;
}

#[tokio::test]
async fn x_forwarded_for_is_trusted_only_from_trusted_proxies() {
    let backend = Backend::start().await;
    let gw = GatewayConfig::new(backend.url())
        .server("trusted_proxies = [\"127.0.0.0/8\"]")
        .start()
        .await;
    let r = gw
        .get("/api/status")
        .header("X-Forwarded-For", "203.0.113.9, 127.0.0.5")
        .send()
        .await;
    assert_eq!(r.status, 200);
    let rec = backend.last("/status");
    assert_eq!(rec.header("client-ip"), Some("203.0.113.9"));
    assert_eq!(
        rec.header("x-forwarded-for"),
        Some("203.0.113.9, 127.0.0.5, 127.0.0.1")
    );
    gw.stop().await;
}

#[tokio::test]
async fn hop_by_hop_headers_are_stripped_both_ways() {
    let backend = Backend::start().await;
    backend.on(
        "/echo",
        Reply::json(200, json!({"ok": true}))
            .header("connection", "x-backend-hop")
            .header("x-backend-hop", "secret")
            .header("keep-alive", "timeout=5")
            .header("proxy-authenticate", "Basic realm=internal")
            .header("upgrade", "h2c")
            .header("server", "gunicorn/21.2.0")
            .header("x-kept", "yes"),
    );
    let gw = Gateway::for_backend(&backend).await;
    let r = gw
        .post("/api/echo")
        .header("Connection", "keep-alive, X-Device-Hop")
        .header("X-Device-Hop", "1")
        .header("Keep-Alive", "timeout=100")
        .header("TE", "trailers")
        .header("Upgrade", "websocket")
        .header("Proxy-Authorization", "Basic ZGV2aWNlOnB3")
        .header("X-Device-Kept", "1")
        .body("payload")
        .send()
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let rec = backend.last("/echo");
    for h in [
        "x-device-hop",
        "keep-alive",
        "te",
        "upgrade",
        "proxy-authorization",
        "transfer-encoding",
    ] {
        assert!(rec.header(h).is_none(), "{h} reached the backend");
    }
    assert!(
        rec.header_all("connection")
            .iter()
            .all(|v| !v.to_ascii_lowercase().contains("x-device-hop")),
        "{:?}",
        rec.header_all("connection")
    );
    assert_eq!(rec.header("x-device-kept"), Some("1"));
    assert_eq!(&rec.body[..], b"payload");

    for h in [
        "x-backend-hop",
        "keep-alive",
        "proxy-authenticate",
        "upgrade",
    ] {
        assert!(r.header(h).is_none(), "{h} reached the device");
    }
    assert_eq!(r.header("x-kept"), Some("yes"));
    assert_eq!(r.header("server"), Some("portcullis"));
    assert_eq!(r.headers.get_all("server").iter().count(), 1);
    gw.stop().await;
}

#[tokio::test]
async fn request_id_is_echoed_and_forwarded() {
    let backend = Backend::start().await;
    let gw = Gateway::for_backend(&backend).await;
    let r = gw
        .get("/api/status")
        .header("X-Request-Id", "support-4711-abc")
        .send()
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-request-id"), Some("support-4711-abc"));
    assert_eq!(
        backend.last("/status").header("x-request-id"),
        Some("support-4711-abc")
    );

    // Generated when absent: the same id for the device and the backend.
    let r = gw.get("/api/status").send().await;
    let id = r.header("x-request-id").expect("generated id").to_owned();
    assert_eq!(id.len(), 26, "{id}");
    assert_eq!(
        backend.last("/status").header("x-request-id"),
        Some(id.as_str())
    );

    // An unreasonable id is replaced, and the envelope names the one used.
    let r = gw
        .req("GET", "/api/status")
        .header("X-Request-Id", "<script>alert(1)</script>")
        .send()
        .await;
    r.assert_envelope(403);
    assert_ne!(r.header("x-request-id"), Some("<script>alert(1)</script>"));

    // Gateway errors also carry the device's id.
    let r = gw
        .get("/api/nothing")
        .header("X-Request-Id", "abc-123")
        .send()
        .await;
    r.assert_gateway_error(404, "Not found");
    assert_eq!(r.json()["error"]["request_id"], "abc-123");
    gw.stop().await;
}

/// Every path the backend received stays inside the exposed backend prefixes.
fn assert_inside_exposed(backend: &Backend) {
    for uri in backend.paths() {
        let path = uri.split('?').next().unwrap_or_default().to_owned();
        // Per raw segment: drop `;params` (servlet containers read `..;` as
        // `..`), decode once as a backend does, treat `\\` as a separator
        // (as some do), then resolve dot segments.
        let decoded: Vec<String> = path
            .split('/')
            .map(|s| s.split(';').next().unwrap_or_default())
            .map(|s| {
                percent_encoding::percent_decode_str(s)
                    .decode_utf8_lossy()
                    .replace('\\', "/")
            })
            .collect();
        let decoded = decoded.join("/");
        let mut segs: Vec<&str> = Vec::new();
        for s in decoded.split('/') {
            match s {
                "" | "." => {}
                ".." => {
                    segs.pop();
                }
                s => segs.push(s),
            }
        }
        assert!(
            segs.first() == Some(&"public") || segs.first() == Some(&"status"),
            "backend received {uri:?} (resolves to /{})",
            segs.join("/")
        );
        assert!(
            !decoded.split('/').any(|s| s == ".."),
            "backend received {uri:?}"
        );
    }
}

#[tokio::test]
async fn path_traversal_never_reaches_an_unexposed_backend_path() {
    let backend = Backend::start().await;
    let gw = Gateway::for_backend(&backend).await;
    let attempts = [
        "/api/public/../admin",
        "/api/public/../../admin",
        "/api/public/../../../../admin",
        "/api/public/x/../../../admin",
        "/api/public/%2e%2e/admin",
        "/api/public/%2E%2E/%2e%2e/admin",
        "/api/public/.%2e/admin",
        "/api/public/%2e%2e%2fadmin",
        "/api/public/..%2fadmin",
        "/api/public/..%2Fadmin",
        "/api/public/%2f..%2f..%2fadmin",
        "/api/public/%252e%252e/admin",
        "/api/public/%252e%252e%252fadmin",
        "//api/public/../../admin",
        "/api/public//../../admin",
        "/api/public/..\\admin",
        "/api/public/..%5cadmin",
        "/api/public/%5c..%5c..%5cadmin",
        "/api/public/%c0%ae%c0%ae/admin",
        "/api/public/..;/admin",
        "/api/status/../../admin",
        "/api/public/%00/../admin",
        "/api/public/a/..",
        "/api/public/./../admin",
        "http://gateway.test/api/public/../admin",
        "/api/public/%2e%2e/%2e%2e/admin?x=/../admin",
    ];
    for target in attempts {
        let req = format!(
            "GET {target} HTTP/1.1\r\nHost: gateway.test\r\nApi-Key: {IOS_KEY}\r\nConnection: close\r\n\r\n"
        );
        let r = raw(gw.addr, req.as_bytes()).await;
        assert!(
            matches!(r.status, 200 | 400 | 404),
            "{target}: {} {}",
            r.status,
            r.text()
        );
        if r.status != 200 {
            let (kind, _) = r.assert_envelope(r.status);
            assert_eq!(kind, "ProxyServerError", "{target}");
        }
    }
    assert_inside_exposed(&backend);
    assert!(
        backend.paths().iter().all(|p| !p.starts_with("/admin")),
        "{:?}",
        backend.paths()
    );

    // A legitimate deep path still works and is rewritten under the prefix.
    let r = gw.get("/api/public/docs/a%20b/./c").send().await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        backend.last_path_prefix("/public/docs"),
        "/public/docs/a%20b/c"
    );
    gw.stop().await;
}

trait LastPrefix {
    fn last_path_prefix(&self, prefix: &str) -> String;
}

impl LastPrefix for Backend {
    fn last_path_prefix(&self, prefix: &str) -> String {
        self.paths()
            .into_iter()
            .rev()
            .find(|p| p.starts_with(prefix))
            .unwrap_or_else(|| panic!("nothing under {prefix}: {:?}", self.paths()))
    }
}

#[tokio::test]
async fn path_parameters_cannot_inject_segments_or_queries() {
    let backend = Backend::start().await;
    backend.on_fn("/renew_session", |_| Reply::json(200, json!({})));
    let gw = Gateway::for_backend(&backend).await;
    for id in ["..", "%2e%2e", "7%3Fadmin=1", "7%23frag", "%2fadmin"] {
        let _ = gw.get(&format!("/api/orders/{id}")).token("t").send().await;
    }
    for uri in backend.paths() {
        if uri == "/renew_session" {
            continue;
        }
        assert!(uri.starts_with("/orders/"), "{uri}");
        assert!(!uri.contains('?') && !uri.contains('#'), "{uri}");
        assert_eq!(uri.matches('/').count(), 2, "{uri}");
    }
    gw.stop().await;
}

#[tokio::test]
async fn graceful_shutdown_lets_in_flight_requests_finish() {
    let backend = Backend::start().await;
    backend.on(
        "/echo",
        Reply::json(200, json!({"slow": true})).delay(Duration::from_millis(500)),
    );
    let mut gw = Gateway::for_backend(&backend).await;
    let addr = gw.addr;
    let in_flight = tokio::spawn(gw.get("/api/echo").send());
    // Let the request reach the backend.
    for _ in 0..100 {
        if backend.count("/echo") == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(backend.count("/echo"), 1);
    gw.trigger_shutdown();
    let r = in_flight.await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json(), json!({"slow": true}));
    gw.join().await.expect("serve returns cleanly");
    // No longer accepting.
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

#[tokio::test]
async fn drain_deadline_bounds_shutdown() {
    let backend = Backend::start().await;
    backend.on("/echo", Reply::stall());
    let mut gw = GatewayConfig::new(backend.url())
        .server("drain_timeout = \"300ms\"")
        .backend("timeout = \"30s\"")
        .start()
        .await;
    let stuck = tokio::spawn(gw.get("/api/echo").send_streaming());
    for _ in 0..100 {
        if backend.count("/echo") == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let started = std::time::Instant::now();
    gw.trigger_shutdown();
    gw.join().await.expect("serve returns");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    stuck.abort();
}

#[tokio::test]
async fn one_keep_alive_connection_serves_errors_and_successes_in_turn() {
    use http_body_util::BodyExt;
    use hyper_util::rt::TokioIo;
    let backend = Backend::start().await;
    let gw = Gateway::for_backend(&backend).await;
    let stream = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake::<_, portcullis::body::Body>(TokioIo::new(stream))
            .await
            .unwrap();
    let conn = tokio::spawn(conn);
    let steps: [(&str, Option<&str>, u16); 6] = [
        ("/api/nothing", Some(IOS_KEY), 404),
        ("/api/status", Some(IOS_KEY), 200),
        ("/api/status", None, 403),
        ("/api/status", Some(ANDROID_KEY), 200),
        ("/api/profile", Some(IOS_KEY), 400),
        ("/api/status", Some(IOS_KEY), 200),
    ];
    for (i, (path, key, status)) in steps.into_iter().enumerate() {
        sender.ready().await.expect("connection still usable");
        let mut req = http::Request::get(path)
            .header("host", "gateway.test")
            .header("x-request-id", format!("step-{i}"));
        if let Some(k) = key {
            req = req.header("api-key", k);
        }
        let resp = sender
            .send_request(req.body(portcullis::body::Body::Empty).unwrap())
            .await
            .expect("response");
        assert_eq!(resp.status(), status, "step {i}: {path}");
        assert_eq!(
            resp.headers().get("x-request-id").unwrap(),
            format!("step-{i}").as_str()
        );
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        if status != 200 {
            assert_eq!(v["error"]["code"], status);
            assert_eq!(v["error"]["request_id"], format!("step-{i}"));
        } else {
            assert_eq!(v["path"], "/status");
        }
    }
    assert_eq!(backend.count("/status"), 3);
    drop(sender);
    let _ = tokio::time::timeout(TIMEOUT, conn).await;
    gw.stop().await;
}

#[tokio::test]
async fn http2_prior_knowledge_is_served_with_the_same_rules() {
    use http_body_util::BodyExt;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let backend = Backend::start().await;
    let gw = Gateway::for_backend(&backend).await;
    let stream = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake::<_, _, portcullis::body::Body>(
        TokioExecutor::new(),
        TokioIo::new(stream),
    )
    .await
    .expect("h2 handshake");
    let conn = tokio::spawn(conn);
    let send = |path: &str, key: Option<&str>| {
        let mut req = http::Request::get(format!("http://gateway.test{path}"));
        if let Some(k) = key {
            req = req.header("api-key", k);
        }
        req.body(portcullis::body::Body::Empty).unwrap()
    };
    let resp = sender
        .send_request(send("/api/status", Some(IOS_KEY)))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers().get("server").unwrap(), "portcullis");
    let _ = resp.into_body().collect().await.unwrap();
    let rec = backend.last("/status");
    assert_eq!(rec.header("api-client"), Some("ios-app"));
    assert_eq!(rec.header("api-key"), Some(BACKEND_CREDENTIAL));

    let resp = sender
        .send_request(send("/api/status", None))
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
    assert_eq!(
        resp.headers().get("content-type").unwrap(),
        "application/json"
    );
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        v["error"]["message"],
        "Received API KEY not found in server API KEYS set"
    );
    drop(sender);
    let _ = tokio::time::timeout(TIMEOUT, conn).await;
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_closing_connections_after_each_answer_is_handled() {
    let backend = Backend::start().await;
    backend.on(
        "/status",
        Reply::json(200, json!({"ok": 1})).header("connection", "close"),
    );
    let gw = Gateway::for_backend(&backend).await;
    for i in 0..20 {
        let r = gw.get("/api/status").send().await;
        assert_eq!(r.status, 200, "request {i}: {}", r.text());
        assert_ne!(r.header("connection"), Some("close"));
    }
    let mut tasks = Vec::new();
    for _ in 0..30 {
        let req = gw.get("/api/status");
        tasks.push(tokio::spawn(async move { req.send().await.status }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    assert_eq!(backend.count("/status"), 50);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_going_away_do_not_leak_backend_connections() {
    let backend = Backend::start().await;
    backend.on(
        "/echo",
        Reply::json(200, json!({"slow": true})).delay(Duration::from_millis(300)),
    );
    backend.on("/download", Reply::pattern(8 << 20));
    let gw = GatewayConfig::new(backend.url())
        .backend("max_connections = 1")
        .route(DOWNLOAD_ROUTE)
        .start()
        .await;

    // A device that hangs up while the backend is still thinking.
    for _ in 0..3 {
        let req = gw.get("/api/echo");
        let t = tokio::spawn(async move { req.send().await });
        tokio::time::sleep(Duration::from_millis(80)).await;
        t.abort();
        let _ = t.await;
    }
    // A device that hangs up in the middle of a large response.
    for _ in 0..3 {
        let resp = gw.get("/api/download").send_streaming().await;
        assert_eq!(resp.status(), 200);
        drop(resp);
    }
    // The single backend connection slot is free again every time.
    backend.on("/echo", Reply::json(200, json!({"slow": false})));
    for i in 0..5 {
        let r = gw.get("/api/echo").send().await;
        assert_eq!(r.status, 200, "request {i}: {}", r.text());
    }
    gw.stop().await;
}

/// With every backend connection taken, waiting requests are served by
/// connections coming back to the pool, not only by ones that close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_queued_on_a_full_pool_get_returned_connections() {
    let backend = Backend::start().await;
    backend.on(
        "/echo",
        Reply::json(200, json!({"ok": true})).delay(Duration::from_millis(100)),
    );
    let gw = GatewayConfig::new(backend.url())
        .backend("max_connections = 2")
        .backend("timeout = \"5s\"")
        .start()
        .await;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let req = gw.get("/api/echo");
        tasks.push(tokio::spawn(async move { req.send().await }));
    }
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
    }
    // Eight answers of 100 ms over two connections: about 400 ms, and the
    // backend never saw more than the two connections.
    let took = started.elapsed();
    assert!(took < Duration::from_secs(3), "took {took:?}");
    assert!(
        backend.connections() <= 2,
        "{} connections",
        backend.connections()
    );
    gw.stop().await;
}

#[tokio::test]
async fn backend_stalling_mid_body_cannot_hold_the_device() {
    use http_body_util::BodyExt;
    let backend = Backend::start().await;
    backend.on("/slow", Reply::stall_mid_body(b"{\"partial\": "));
    let gw = Gateway::for_backend(&backend).await;
    let started = Instant::now();
    let resp = gw.get("/api/slow").send_streaming().await;
    assert_eq!(resp.status(), 200, "the head was already on its way");
    let body = tokio::time::timeout(Duration::from_secs(5), resp.into_body().collect())
        .await
        .expect("the gateway ends a stalled body, the device is not held");
    assert!(body.is_err(), "a cut-off body must not look complete");
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(3),
        "route timeout is 300ms, took {took:?}"
    );

    // The gateway keeps serving.
    let r = gw.get("/api/status").send().await;
    assert_eq!(r.status, 200);
    gw.stop().await;
}

#[tokio::test]
async fn shutdown_does_not_wait_for_idle_keep_alive_connections() {
    use http_body_util::BodyExt;
    use hyper_util::rt::TokioIo;
    let backend = Backend::start().await;
    let mut gw = GatewayConfig::new(backend.url())
        .server("drain_timeout = \"10s\"")
        .start()
        .await;
    // A device that made one request and keeps its connection open.
    let stream = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake::<_, portcullis::body::Body>(TokioIo::new(stream))
            .await
            .unwrap();
    let conn = tokio::spawn(conn);
    let req = http::Request::get("/api/status")
        .header("host", "gateway.test")
        .header("api-key", IOS_KEY)
        .body(portcullis::body::Body::Empty)
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let _ = resp.into_body().collect().await.unwrap();

    let started = Instant::now();
    gw.trigger_shutdown();
    gw.join().await.expect("serve returns");
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(2),
        "an idle keep-alive connection held shutdown for {took:?}"
    );
    // The device's connection was closed by the gateway.
    let closed = tokio::time::timeout(Duration::from_secs(2), conn).await;
    assert!(closed.is_ok(), "idle connection closed on shutdown");
    drop(sender);
}
