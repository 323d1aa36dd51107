//! The status codes the gateway raises itself: each one the core covers,
//! asserting status, envelope, headers and that the backend was (not) called.

use crate::support::*;
use std::time::{Duration, Instant};

const API_KEY_MSG: &str = "Received API KEY not found in server API KEYS set";

#[tokio::test]
async fn api_key_missing_or_unknown_is_403_and_nothing_reaches_the_backend() {
    let backend = Backend::start().await;
    let gw = Gateway::for_backend(&backend).await;

    let r = gw.req("GET", "/api/status").send().await;
    r.assert_gateway_error(403, API_KEY_MSG);

    let r = gw.req("GET", "/api/status").api_key("wrong").send().await;
    r.assert_gateway_error(403, API_KEY_MSG);

    // Keyless scanners learn nothing about which paths exist.
    let r = gw.req("GET", "/api/does-not-exist").send().await;
    r.assert_gateway_error(403, API_KEY_MSG);

    // The digest itself is not a key.
    let digest = sha256_hex(ANDROID_KEY.as_bytes());
    let r = gw.req("GET", "/api/status").api_key(&digest).send().await;
    r.assert_gateway_error(403, API_KEY_MSG);
    let r = gw
        .req("GET", "/api/status")
        .api_key(&format!("sha256:{digest}"))
        .send()
        .await;
    r.assert_gateway_error(403, API_KEY_MSG);

    assert!(backend.requests().is_empty(), "{:?}", backend.paths());

    // Both a plain and a `sha256:` configured key are accepted.
    let r = gw.get("/api/status").send().await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = gw
        .req("GET", "/api/status")
        .api_key(ANDROID_KEY)
        .send()
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        backend.last("/status").header("api-client"),
        Some("android-app")
    );
    gw.stop().await;
}

#[tokio::test]
async fn token_rules_on_public_and_private_routes() {
    let backend = Backend::start().await;
    let gw = Gateway::for_backend(&backend).await;

    let r = gw.get("/api/status").token("some-token").send().await;
    r.assert_gateway_error(400, "A public service cannot receive a user token");

    let r = gw.get("/api/profile").send().await;
    r.assert_gateway_error(400, "A private service requires a user token");

    // An empty header counts as missing.
    let r = gw.get("/api/profile").token("").send().await;
    r.assert_gateway_error(400, "A private service requires a user token");

    // /login refuses a token too.
    let r = gw
        .post("/login")
        .token("t")
        .json(serde_json::json!({"email": "a@b.c", "password": "x"}))
        .send()
        .await;
    r.assert_gateway_error(400, "A public service cannot receive a user token");

    assert!(backend.requests().is_empty(), "{:?}", backend.paths());
    gw.stop().await;
}

#[tokio::test]
async fn token_refused_by_validation_service_is_403_token_invalid() {
    let backend = Backend::start().await;
    backend.on(
        "/renew_session",
        Reply::json(
            403,
            serde_json::json!({"error": {"code": 403, "type": "SessionError", "message": "expired"}}),
        ),
    );
    let gw = Gateway::for_backend(&backend).await;
    let r = gw.get("/api/profile").token("expired-token").send().await;
    r.assert_gateway_error(403, "Token invalid");
    assert_eq!(backend.count("/renew_session"), 1);
    assert_eq!(backend.count("/profile"), 0);

    backend.on("/renew_session", Reply::status(401));
    let r = gw.get("/api/profile").token("other-token").send().await;
    r.assert_gateway_error(403, "Token invalid");
    gw.stop().await;
}

#[tokio::test]
async fn unknown_path_is_404_not_found() {
    let backend = Backend::start().await;
    let gw = Gateway::for_backend(&backend).await;
    for path in [
        "/",
        "/api",
        "/api/statusx",
        "/status",
        "/api/orders",
        "/admin",
    ] {
        let r = gw.get(path).send().await;
        r.assert_gateway_error(404, "Not found");
    }
    assert!(backend.requests().is_empty(), "{:?}", backend.paths());
    gw.stop().await;
}

#[tokio::test]
async fn method_not_allowed_lists_allow_including_trace_connect_and_unknown() {
    let backend = Backend::start().await;
    let gw = Gateway::for_backend(&backend).await;

    for method in ["POST", "DELETE", "TRACE", "FOO", "PATCH", "OPTIONS"] {
        let r = gw.req(method, "/api/status").api_key(IOS_KEY).send().await;
        r.assert_gateway_error(405, "Method Not Allowed");
        assert_eq!(r.header("allow"), Some("GET"), "{method}");
    }
    let r = gw
        .req("DELETE", "/api/orders/12")
        .api_key(IOS_KEY)
        .send()
        .await;
    r.assert_method_not_allowed("GET, PUT, POST");

    // TRACE over a raw socket, as a scanner would send it.
    let r = raw(
        gw.addr,
        format!(
            "TRACE /api/status HTTP/1.1\r\nHost: x\r\nApi-Key: {IOS_KEY}\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .await;
    r.assert_method_not_allowed("GET");

    // CONNECT: refused, never tunnelled. To an exposed path, with its Allow.
    let connect = |target: &str| {
        format!(
            "CONNECT {target} HTTP/1.1\r\nHost: backend.internal:443\r\nApi-Key: {IOS_KEY}\r\nConnection: close\r\n\r\n"
        )
    };
    let r = raw(gw.addr, connect("/api/status").as_bytes()).await;
    r.assert_method_not_allowed("GET");
    let r = raw(gw.addr, connect("backend.internal:443").as_bytes()).await;
    r.assert_gateway_error(405, "Method Not Allowed");
    assert!(r.headers.contains_key("allow"), "405 carries Allow");
    let r = raw(gw.addr, connect("/api/nothing").as_bytes()).await;
    r.assert_gateway_error(404, "Not found");
    assert!(backend.requests().is_empty(), "{:?}", backend.paths());
    gw.stop().await;
}

#[tokio::test]
async fn body_over_limit_is_413_with_content_length_and_chunked() {
    let backend = Backend::start().await;
    let gw = Gateway::for_backend(&backend).await;

    // Declared length over the route's 4 KiB.
    let r = gw.post("/api/upload").body(vec![b'x'; 5000]).send().await;
    let (kind, _) = r.assert_envelope(413);
    assert_eq!(kind, "ProxyServerError");

    // Chunked, over the limit.
    let (body, _) = ChunkedBody::sized(6000, 1000);
    let r = gw.post("/api/upload").body_stream(body).send().await;
    r.assert_envelope(413);

    // A Content-Length far over the limit is refused before any body is sent.
    let r = raw(
        gw.addr,
        format!(
            "POST /api/upload HTTP/1.1\r\nHost: x\r\nApi-Key: {IOS_KEY}\r\nContent-Length: 104857600\r\n\r\n"
        )
        .as_bytes(),
    )
    .await;
    r.assert_envelope(413);

    // The server-wide max_body (default 1 MiB) applies to routes without their own.
    let r = gw
        .post("/api/echo")
        .body(vec![b'y'; (1 << 20) + 1])
        .send()
        .await;
    r.assert_envelope(413);

    assert!(backend.requests().is_empty(), "{:?}", backend.paths());

    // At the limit exactly, it goes through.
    let r = gw.post("/api/upload").body(vec![b'z'; 4096]).send().await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(backend.last("/upload").body_len, 4096);
    gw.stop().await;
}

#[tokio::test]
async fn non_json_body_on_json_route_is_400() {
    let backend = Backend::start().await;
    backend.on("/renew_session", Reply::json(200, serde_json::json!({})));
    let gw = Gateway::for_backend(&backend).await;
    for body in [&b"not json"[..], b"{\"a\": ", b"<xml/>"] {
        let r = gw
            .req("PUT", "/api/orders/7")
            .api_key(IOS_KEY)
            .token("tok")
            .header("content-type", "application/json")
            .body(body.to_vec())
            .send()
            .await;
        let (kind, _) = r.assert_envelope(400);
        assert_eq!(kind, "ProxyServerError");
    }
    assert_eq!(backend.count("/orders/7"), 0);

    let r = gw
        .req("PUT", "/api/orders/7")
        .api_key(IOS_KEY)
        .token("tok")
        .json(serde_json::json!({"qty": 2}))
        .send()
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(backend.last("/orders/7").json()["qty"], 2);
    gw.stop().await;
}

#[tokio::test]
async fn backend_down_is_502_within_the_connect_timeout() {
    let port = free_port();
    let gw = GatewayConfig::new(format!("http://127.0.0.1:{port}"))
        .backend("connect_timeout = \"300ms\"")
        .start()
        .await;
    let started = Instant::now();
    let r = gw.get("/api/status").send().await;
    let took = started.elapsed();
    r.assert_gateway_error(502, "Could not connect to service");
    assert!(took < Duration::from_millis(1500), "took {took:?}");

    // The validation service being down is a 502 too, not a 403.
    let r = gw.get("/api/profile").token("t").send().await;
    r.assert_gateway_error(502, "Could not connect to service");
    gw.stop().await;
}

#[tokio::test]
async fn backend_not_accepting_is_502_at_the_connect_timeout() {
    // A listener whose accept queue is full: the kernel drops further SYNs,
    // so connecting hangs until the gateway's connect timeout.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(1).unwrap();
    let addr = listener.local_addr().unwrap();
    let mut fillers = Vec::new();
    for _ in 0..4 {
        if let Ok(Ok(s)) = tokio::time::timeout(
            Duration::from_millis(200),
            tokio::net::TcpStream::connect(addr),
        )
        .await
        {
            fillers.push(s);
        }
    }
    let gw = GatewayConfig::new(format!("http://{addr}"))
        .backend("connect_timeout = \"300ms\"")
        .start()
        .await;
    let started = Instant::now();
    let r = gw.get("/api/status").send().await;
    let took = started.elapsed();
    r.assert_gateway_error(502, "Could not connect to service");
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_millis(2000),
        "connect_timeout is 300ms, took {took:?}"
    );
    gw.stop().await;
    drop((fillers, listener));
}

#[tokio::test]
async fn backend_stalling_past_route_timeout_is_504() {
    let backend = Backend::start().await;
    backend.on("/slow", Reply::stall());
    let gw = Gateway::for_backend(&backend).await;
    let started = Instant::now();
    let r = gw.get("/api/slow").send().await;
    let took = started.elapsed();
    let (kind, _) = r.assert_envelope(504);
    assert_eq!(kind, "ProxyServerError");
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(3),
        "route timeout is 300ms, took {took:?}"
    );

    // A backend slower than the route timeout but not stalled: same.
    backend.on(
        "/slow",
        Reply::status(200).delay(Duration::from_millis(700)),
    );
    let r = gw.get("/api/slow").send().await;
    r.assert_envelope(504);

    // Within the timeout it is a normal answer.
    backend.on(
        "/slow",
        Reply::json(200, serde_json::json!({"late": false})).delay(Duration::from_millis(50)),
    );
    let r = gw.get("/api/slow").send().await;
    assert_eq!(r.status, 200, "{}", r.text());
    gw.stop().await;
}

#[tokio::test]
async fn over_max_connections_is_503_envelope() {
    let backend = Backend::start().await;
    let gw = GatewayConfig::new(backend.url())
        .limits("max_connections = 1")
        .start()
        .await;
    // Hold the only connection slot open.
    let holder = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    // Let the gateway accept it.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let r = raw(
        gw.addr,
        format!("GET /api/status HTTP/1.1\r\nHost: x\r\nApi-Key: {IOS_KEY}\r\n\r\n").as_bytes(),
    )
    .await;
    let (kind, _) = r.assert_envelope(503);
    assert_eq!(kind, "ProxyServerError");
    assert!(backend.requests().is_empty());

    // Once the slot frees up, requests are served again.
    drop(holder);
    let mut ok = false;
    for _ in 0..50 {
        let r = raw(
            gw.addr,
            format!(
                "GET /api/status HTTP/1.1\r\nHost: x\r\nApi-Key: {IOS_KEY}\r\nConnection: close\r\n\r\n"
            )
            .as_bytes(),
        )
        .await;
        if r.status == 200 {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(ok, "served again after the held connection closed");
    gw.stop().await;
}
