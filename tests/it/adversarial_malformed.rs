//! Malformed input: oversized or too many headers, invalid UTF-8 and bad
//! percent-encoding in paths and queries, huge and deeply nested JSON bodies,
//! invalid method tokens, absolute-form and CONNECT requests, garbage and
//! other protocol versions. Each gets the right status, nothing odd reaches
//! the backend, and no panic happens anywhere in the process (gateway tasks
//! run in-process; a panic hook records them from every thread).

use crate::support::*;
use std::time::Duration;

const QUIET: Duration = Duration::from_millis(1500);

/// One raw request and the statuses it may get. Every 4xx/5xx must be the
/// JSON envelope (hyper's own parse-error answers are rewritten into it);
/// with `close_ok`, a connection closed without an answer is accepted too.
struct Probe {
    name: String,
    bytes: Vec<u8>,
    statuses: &'static [u16],
    close_ok: bool,
    quiet: Duration,
}

fn probe(name: impl Into<String>, bytes: impl Into<Vec<u8>>, statuses: &'static [u16]) -> Probe {
    Probe {
        name: name.into(),
        bytes: bytes.into(),
        statuses,
        close_ok: false,
        quiet: QUIET,
    }
}

impl Probe {
    /// Refused by hyper's parser before the gateway sees a request: an
    /// envelope, or (for a header deadline) a close.
    fn parser(mut self) -> Probe {
        self.close_ok = true;
        self
    }

    /// Waits up to `d` for an answer (for the header deadline).
    fn patient(mut self, d: Duration) -> Probe {
        self.quiet = d;
        self
    }
}

fn get(target: &str, extra: &str) -> Vec<u8> {
    format!("GET {target} HTTP/1.1\r\nHost: x\r\nApi-Key: {IOS_KEY}\r\n{extra}Connection: close\r\n\r\n")
        .into_bytes()
}

fn bytes_get(target: &[u8]) -> Vec<u8> {
    let mut v = b"GET ".to_vec();
    v.extend_from_slice(target);
    v.extend_from_slice(
        format!(" HTTP/1.1\r\nHost: x\r\nApi-Key: {IOS_KEY}\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    );
    v
}

/// Runs `probes` against `gw`; returns the names answered by a close.
async fn run(gw: &Gateway, probes: Vec<Probe>) -> Vec<String> {
    let mut bare = Vec::new();
    for p in probes {
        let out = raw_all(gw.addr, &p.bytes, p.quiet).await;
        let name = &p.name;
        assert!(
            out.responses.len() <= 1,
            "{name}: {} responses",
            out.responses.len()
        );
        match out.responses.first() {
            None => {
                assert!(
                    p.close_ok && out.closed,
                    "{name}: no response (closed={}, rest={:?})",
                    out.closed,
                    String::from_utf8_lossy(&out.rest)
                );
                bare.push(format!("{name}: closed without a response"));
            }
            Some(r) => {
                assert!(
                    p.statuses.contains(&r.status),
                    "{name}: status {} not in {:?}: {}",
                    r.status,
                    p.statuses,
                    r.text()
                );
                // Every refusal is an envelope, hyper's parse errors included.
                if r.status >= 400 {
                    r.assert_envelope(r.status);
                }
            }
        }
    }
    bare
}

async fn token_backend() -> Backend {
    let backend = Backend::start().await;
    backend.on("/renew_session", renewal(Duration::from_secs(600)));
    backend
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_too_many_headers() {
    watch_panics();
    let backend = Backend::start().await;
    let gw = GatewayConfig::new(backend.url())
        .limits("max_header_bytes = \"16KiB\"")
        .limits("max_headers = 50")
        .start()
        .await;
    let big = "a".repeat(20 << 10);
    let many: String = (0..60).map(|i| format!("X-H{i}: v\r\n")).collect();
    let many_big: String = (0..400)
        .map(|i| format!("X-H{i}: {}\r\n", "b".repeat(100)))
        .collect();
    let long_uri = format!("/api/public/{}", "u".repeat(40 << 10));
    let probes = vec![
        probe(
            "one 20 KiB header",
            get("/api/status", &format!("X-Big: {big}\r\n")),
            &[431],
        )
        .parser(),
        probe(
            "60 headers over max_headers 50",
            get("/api/status", &many),
            &[431],
        )
        .parser(),
        probe(
            "400 headers of 100 bytes",
            get("/api/status", &many_big),
            &[431],
        )
        .parser(),
        probe("40 KiB URI", get(&long_uri, ""), &[414, 431]).parser(),
        probe(
            "header name of 20 KiB",
            get("/api/status", &format!("{big}: v\r\n")),
            &[431],
        )
        .parser(),
    ];
    let bare = run(&gw, probes).await;
    for b in &bare {
        eprintln!("{b}");
    }
    // Under the limits, the same gateway still serves.
    let ok = gw
        .get("/api/status")
        .header("X-Big", &"c".repeat(8 << 10))
        .send()
        .await;
    assert_eq!(ok.status, 200, "{}", ok.text());
    assert!(backend.requests().len() == 1, "{:?}", backend.paths());
    gw.stop().await;
    assert_no_panics();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_paths_and_queries() {
    watch_panics();
    let backend = token_backend().await;
    let gw = Gateway::for_backend(&backend).await;
    let token = "User-Token: tok-malformed\r\n";
    let mut probes = vec![
        // Percent-decoding to invalid UTF-8, malformed escapes, encoded separators.
        probe("path %ff", get("/api/public/%ff", ""), &[400]),
        probe("path %c3%28", get("/api/public/%c3%28", ""), &[400]),
        probe(
            "path overlong %c0%af",
            get("/api/public/%c0%af", ""),
            &[400],
        ),
        probe("path %zz", get("/api/public/%zz", ""), &[400]),
        probe("path trailing %", get("/api/public/a%", ""), &[400]),
        probe("path %2f", get("/api/public/a%2fb", ""), &[400]),
        probe("path %5c", get("/api/public/a%5Cb", ""), &[400]),
        probe("path %00", get("/api/public/a%00b", ""), &[400]),
        probe("path %0d%0a", get("/api/public/a%0d%0aX:%20y", ""), &[400]),
        probe(
            "path escaping root",
            get("/api/../../etc/passwd", ""),
            &[400],
        ),
        probe(
            "path %2e%2e escaping root",
            get("/%2e%2e/%2e%2e/etc", ""),
            &[400],
        ),
        // Raw bytes a parser must refuse.
        probe("raw 0xff in path", bytes_get(b"/api/public/\xff"), &[400]).parser(),
        probe(
            "raw UTF-8 in path",
            bytes_get("/api/public/café".as_bytes()),
            &[200, 400],
        )
        .parser(),
        probe("raw NUL in path", bytes_get(b"/api/public/a\0b"), &[400]).parser(),
        probe(
            "raw 0xff in query",
            bytes_get(b"/api/public/x?a=\xff"),
            &[400],
        )
        .parser(),
        probe("raw space in path", bytes_get(b"/api/public/a b"), &[400]).parser(),
        probe("path not starting with /", get("api/status", ""), &[400]).parser(),
        probe("asterisk-form", get("*", ""), &[400, 404]).parser(),
        // Encrypted-query route: names and values are decoded, so bad ones are 400.
        probe(
            "query value %zz",
            get("/api/search?username=%zz", token),
            &[400],
        ),
        probe(
            "query value trailing %",
            get("/api/search?username=a%", token),
            &[400],
        ),
        probe("query name %ff", get("/api/search?%ff=1", token), &[400]),
        probe("query name %zz", get("/api/search?%zz=1", token), &[400]),
    ];
    // On a pass-through route, the query goes byte for byte or is refused.
    probes.push(probe(
        "pass-through query %zz",
        get("/api/public/q?a=%zz", ""),
        &[200, 400],
    ));
    let bare = run(&gw, probes).await;
    for b in &bare {
        eprintln!("{b}");
    }
    // Nothing but well-formed requests reached the backend.
    for r in backend.requests() {
        if r.path == "/renew_session" {
            continue;
        }
        assert!(
            r.path.starts_with("/public/") || r.path == "/search",
            "unexpected backend path {:?}",
            r.uri
        );
        assert!(
            !r.path.contains("..") && !r.path.contains("//"),
            "backend path {:?}",
            r.path
        );
        if r.path == "/public/q" {
            assert_eq!(r.query.as_deref(), Some("a=%zz"), "passed byte for byte");
        }
    }
    assert_eq!(backend.count("/search"), 0, "bad queries never forwarded");
    gw.stop().await;
    assert_no_panics();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_and_deeply_nested_json_bodies() {
    watch_panics();
    let backend = token_backend().await;
    let gw = Gateway::for_backend(&backend).await;
    let post = |body: Vec<u8>| {
        gw.post("/api/orders/1")
            .token("tok-json")
            .header("content-type", "application/json")
            .body(body)
    };

    // 100k-deep arrays and objects: refused as not JSON (serde_json's depth
    // limit), without overflowing any stack.
    for (name, body) in [
        ("[[[…", "[".repeat(100_000).into_bytes()),
        (
            "[[[…]]] balanced",
            format!("{}{}", "[".repeat(100_000), "]".repeat(100_000)).into_bytes(),
        ),
        ("{\"a\":{\"a\":…", "{\"a\":".repeat(100_000).into_bytes()),
        (
            "mixed 50k",
            format!("{}1{}", "[{\"k\":".repeat(50_000), "}]".repeat(50_000)).into_bytes(),
        ),
    ] {
        let r = post(body).send().await;
        let (kind, msg) = r.assert_envelope(400);
        assert_eq!(kind, "ProxyServerError", "{name}");
        assert!(
            msg.contains("not valid JSON") || msg.contains("nested too deeply"),
            "{name}: {msg}"
        );
    }
    // Nesting just over the cap, balanced and valid: refused as too deep.
    let deep = format!("{}{}", "[".repeat(129), "]".repeat(129));
    let (_, msg) = post(deep.into_bytes()).send().await.assert_envelope(400);
    assert!(msg.contains("nested too deeply"), "{msg}");

    // Over max_body (default 1 MiB): 413 whether declared or chunked.
    let huge = format!("[{}1]", "1,".repeat(600_000)).into_bytes();
    assert!(huge.len() > 1 << 20);
    post(huge.clone()).send().await.assert_envelope(413);
    let chunks = huge
        .chunks(64 << 10)
        .map(bytes::Bytes::copy_from_slice)
        .collect();
    let r = gw
        .post("/api/orders/1")
        .token("tok-json")
        .header("content-type", "application/json")
        .body_stream(ChunkedBody::new(chunks))
        .send()
        .await;
    r.assert_envelope(413);
    // A declared length far beyond, with no body sent: refused at once.
    let out = raw_all(
        gw.addr,
        format!(
            "POST /api/orders/1 HTTP/1.1\r\nHost: x\r\nApi-Key: {IOS_KEY}\r\nUser-Token: tok-json\r\nContent-Length: 10000000000\r\n\r\n"
        )
        .as_bytes(),
        QUIET,
    )
    .await;
    assert_eq!(out.responses.len(), 1);
    out.responses[0].assert_envelope(413);

    // Invalid UTF-8 and other non-JSON: 400.
    for body in [
        &b"\xff\xfe{}"[..],
        b"{\"a\": \"\xff\"}",
        b"",
        b"nul",
        b"{} {}",
    ] {
        let r = post(body.to_vec()).send().await;
        if body.is_empty() {
            // An empty body is no body; the backend decides.
            assert!(matches!(r.status, 200 | 400), "{}", r.text());
        } else {
            r.assert_envelope(400);
        }
    }

    // A moderately nested valid document still goes through.
    let ok = format!("{}1{}", "[".repeat(100), "]".repeat(100));
    let r = post(ok.clone().into_bytes()).send().await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(backend.last("/orders/1").body, ok.as_bytes());
    gw.stop().await;
    assert_no_panics();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn methods_absolute_form_connect_and_garbage() {
    watch_panics();
    let backend = Backend::start().await;
    let gw = GatewayConfig::new(backend.url())
        .limits("header_read_timeout = \"1s\"")
        .start()
        .await;
    let key = format!("Api-Key: {IOS_KEY}\r\n");
    let line = |l: &str| format!("{l}\r\nHost: x\r\n{key}Connection: close\r\n\r\n").into_bytes();
    let probes = vec![
        // Invalid method tokens never reach the gateway; valid unknown ones are 405.
        probe("method with (", line("G(T /api/status HTTP/1.1"), &[400]).parser(),
        probe("method with NUL", line("G\0T /api/status HTTP/1.1"), &[400]).parser(),
        probe(
            "method 0xff",
            {
                let mut v = b"G\xffT".to_vec();
                v.extend(line(" /api/status HTTP/1.1"));
                v
            },
            &[400],
        )
        .parser(),
        probe("empty method", line(" /api/status HTTP/1.1"), &[400]).parser(),
        probe("lower-case get", line("get /api/status HTTP/1.1"), &[405]),
        probe("unknown token", line("BREW /api/status HTTP/1.1"), &[405]),
        probe(
            "long token",
            line(&format!("{} /api/status HTTP/1.1", "X".repeat(2000))),
            &[405],
        ),
        probe("TRACE", line("TRACE /api/status HTTP/1.1"), &[405]),
        // Absolute form: the authority never picks the backend.
        probe(
            "absolute-form to /",
            line("GET http://evil/ HTTP/1.1"),
            &[404, 400],
        ),
        probe(
            "absolute-form to a route",
            line("GET http://evil.example/api/status HTTP/1.1"),
            &[200, 400],
        ),
        probe(
            "absolute-form https with port",
            line("GET https://evil:8443/api/public/x HTTP/1.1"),
            &[200, 400],
        ),
        probe(
            "absolute-form with userinfo",
            line("GET http://user:pw@evil/api/status HTTP/1.1"),
            &[200, 400],
        )
        .parser(),
        // CONNECT, in every form: never tunnelled.
        probe(
            "CONNECT authority",
            line("CONNECT evil:443 HTTP/1.1"),
            &[405, 400],
        )
        .parser(),
        probe(
            "CONNECT origin",
            line("CONNECT /api/status HTTP/1.1"),
            &[405, 400],
        )
        .parser(),
        probe(
            "CONNECT absolute",
            line("CONNECT http://evil/ HTTP/1.1"),
            // A CONNECT to a path is routed like any method: 404 for `/`.
            &[405, 404, 400],
        )
        .parser(),
        // Versions and garbage.
        probe("HTTP/1.2", line("GET /api/status HTTP/1.2"), &[400, 505]).parser(),
        probe(
            "HTTP/2.0 in an h1 line",
            line("GET /api/status HTTP/2.0"),
            &[400, 505],
        )
        .parser(),
        probe("HTTP/0.9", b"GET /api/status\r\n\r\n".to_vec(), &[400]).parser(),
        probe("no version", line("GET /api/status"), &[400]).parser(),
        probe(
            "TLS ClientHello on the plain port",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03".repeat(20),
            &[400],
        )
        .parser(),
        probe(
            "binary noise",
            (0..2048u32)
                .map(|i| (i * 7919 % 251) as u8)
                .collect::<Vec<u8>>(),
            &[400],
        )
        .parser(),
        // Leading empty lines are skipped (RFC 9112 §2.2); then the header
        // deadline drops the connection.
        probe(
            "empty lines only",
            b"\r\n\r\n\r\n\r\n".to_vec(),
            &[400, 408],
        )
        .parser()
        .patient(Duration::from_secs(6)),
        probe(
            "header without colon",
            get("/api/status", "NoColonHere\r\n"),
            &[400],
        )
        .parser(),
        probe(
            "header with NUL value",
            get("/api/status", "X-A: a\0b\r\n"),
            &[400],
        )
        .parser(),
        probe(
            "header name with space",
            get("/api/status", "X A: b\r\n"),
            &[400],
        )
        .parser(),
        probe(
            "Host missing",
            format!("GET /api/status HTTP/1.1\r\n{key}Connection: close\r\n\r\n").into_bytes(),
            &[400],
        ),
        probe(
            "two Host headers",
            get("/api/status", "Host: evil\r\n"),
            &[400],
        ),
        probe(
            "HTTP/1.0 without Host",
            format!("GET /api/status HTTP/1.0\r\n{key}\r\n").into_bytes(),
            &[200],
        ),
        probe(
            "Expect 100-continue without body",
            get("/api/status", "Expect: 100-continue\r\n"),
            &[200, 417],
        ),
    ];
    let bare = run(&gw, probes).await;
    for b in &bare {
        eprintln!("{b}");
    }
    for r in backend.requests() {
        assert!(
            r.path == "/status" || r.path == "/public/x",
            "backend saw {:?}",
            r.uri
        );
        let host = r.header("host").unwrap_or_default();
        assert!(!host.contains("evil"), "Host forwarded: {host}");
        assert_eq!(r.method, http::Method::GET);
    }
    gw.stop().await;
    assert_no_panics();
}

/// Half a request, then silence or a close: the connection is dropped within
/// the header deadline and the gateway keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_requests_are_dropped() {
    watch_panics();
    let backend = Backend::start().await;
    let gw = GatewayConfig::new(backend.url())
        .limits("header_read_timeout = \"1s\"")
        .limits("body_read_timeout = \"1s\"")
        .limits("idle_timeout = \"2s\"")
        .start()
        .await;
    // Head cut in the middle, then nothing: a 408 envelope when the header
    // deadline fires, then the connection is closed.
    let started = std::time::Instant::now();
    let out = raw_all(gw.addr, b"GET /api/sta", Duration::from_secs(5)).await;
    assert!(out.closed, "connection dropped");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(out.responses.len(), 1, "one answer");
    out.responses[0].assert_envelope(408);
    // The same after a first request on a keep-alive connection.
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
        let first = format!("GET /api/status HTTP/1.1\r\nHost: x\r\nApi-Key: {IOS_KEY}\r\n\r\n");
        s.write_all(first.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        let mut tmp = [0u8; 4096];
        while parse_responses(&buf).0.is_empty() {
            let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut tmp))
                .await
                .expect("first answer in time")
                .unwrap();
            assert!(n > 0, "closed before the first answer");
            buf.extend_from_slice(&tmp[..n]);
        }
        s.write_all(b"GET /api/st").await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
            .await
            .expect("closed by the header deadline")
            .unwrap();
        let (responses, _) = parse_responses(&buf);
        let statuses: Vec<u16> = responses.iter().map(|r| r.status).collect();
        assert_eq!(statuses, [200, 408]);
        responses[1].assert_envelope(408);
    }
    // An idle keep-alive connection is closed without a word.
    let out = raw_all(
        gw.addr,
        format!("GET /api/status HTTP/1.1\r\nHost: x\r\nApi-Key: {IOS_KEY}\r\n\r\n").as_bytes(),
        Duration::from_secs(5),
    )
    .await;
    assert!(out.closed, "idle connection closed");
    let statuses: Vec<u16> = out.responses.iter().map(|r| r.status).collect();
    assert_eq!(statuses, [200]);
    // Body shorter than its Content-Length: 408 envelope (or close) after the body deadline.
    let out = raw_all(
        gw.addr,
        format!("POST /api/echo HTTP/1.1\r\nHost: x\r\nApi-Key: {IOS_KEY}\r\nContent-Length: 100\r\n\r\nshort").as_bytes(),
        Duration::from_secs(5),
    )
    .await;
    for r in &out.responses {
        assert!(matches!(r.status, 408 | 400 | 502), "{}", r.text());
        r.assert_envelope(r.status);
    }
    // Client goes away mid-body: nothing breaks.
    {
        let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
        use tokio::io::AsyncWriteExt;
        s.write_all(
            format!("POST /api/echo HTTP/1.1\r\nHost: x\r\nApi-Key: {IOS_KEY}\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel").as_bytes(),
        )
        .await
        .unwrap();
    }
    let r = gw.get("/api/status").send().await;
    assert_eq!(r.status, 200);
    // The body cut short never reaches the backend as if complete.
    for r in backend.requests_to("/echo") {
        // Streamed with its Content-Length: the backend sees the body end
        // in an error, never a complete request.
        assert!(
            r.body_error,
            "a truncated body was forwarded as complete: {r:?}"
        );
    }
    gw.stop().await;
    assert_no_panics();
}
