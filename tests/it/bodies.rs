//! Request bodies: chunked bodies are forwarded with a
//! Content-Length (a WSGI backend reading only CONTENT_LENGTH gets every
//! byte), over the limit is a 413 and never an empty or truncated body.

use crate::support::*;
use bytes::Bytes;
use serde_json::json;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::pin::Pin;
use std::process::{Command, Stdio};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

/// A WSGI app on wsgiref that, like Django, reads exactly CONTENT_LENGTH
/// bytes of `wsgi.input` and ignores Transfer-Encoding.
const WSGI_APP: &str = r#"
import hashlib, json, sys
from wsgiref.simple_server import make_server, WSGIRequestHandler

uploads = []

class Quiet(WSGIRequestHandler):
    def log_message(self, *args):
        pass

def app(environ, start_response):
    if environ["PATH_INFO"] == "/stats":
        body = json.dumps({"uploads": uploads}).encode()
    else:
        n = int(environ.get("CONTENT_LENGTH") or 0)
        data = environ["wsgi.input"].read(n) if n > 0 else b""
        seen = {
            "len": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "content_length": environ.get("CONTENT_LENGTH"),
            "transfer_encoding": environ.get("HTTP_TRANSFER_ENCODING"),
        }
        uploads.append(seen)
        body = json.dumps(seen).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]

server = make_server("127.0.0.1", 0, app, handler_class=Quiet)
print(server.server_port, flush=True)
server.serve_forever()
"#;

/// Starts the WSGI app; returns its guard and address.
fn start_wsgi() -> (ChildGuard, SocketAddr) {
    require_python(false);
    let child = Command::new("python3")
        .args(["-u", "-c", WSGI_APP])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start python3");
    let mut guard = ChildGuard(Some(child));
    let out = guard.child().stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(out).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the WSGI server prints its port");
    let port: u16 = line
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("port line {line:?}"));
    (guard, SocketAddr::from(([127, 0, 0, 1], port)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_upload_arrives_byte_for_byte_at_a_wsgi_backend() {
    let (wsgi, wsgi_addr) = start_wsgi();
    let gw = GatewayConfig::new(format!("http://{wsgi_addr}"))
        .without_default_routes()
        .route(
            r#"path = "/api/upload"
methods = ["POST"]
backend_path = "/upload"
public = true
max_body = "64KiB""#,
        )
        .start()
        .await;

    // 50,000 bytes in uneven chunks, no Content-Length.
    let (body, sent) = ChunkedBody::sized(50_000, 777);
    let r = gw.post("/api/upload").body_stream(body).send().await;
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = r.json();
    assert_eq!(seen["len"], 50_000, "{seen}");
    assert_eq!(seen["sha256"], sha256_hex(&sent));
    assert_eq!(seen["content_length"], "50000");
    assert_eq!(seen["transfer_encoding"], serde_json::Value::Null);

    // With a Content-Length, through the same (reconnecting) pool.
    let r = gw.post("/api/upload").body(sent.clone()).send().await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["sha256"], sha256_hex(&sent));

    // Over the limit, chunked: 413, and nothing (in particular no empty body) reached the app.
    let (body, _) = ChunkedBody::sized(100_000, 4096);
    let r = gw.post("/api/upload").body_stream(body).send().await;
    r.assert_envelope(413);

    let stats = Req::new(wsgi_addr, "GET", "/stats").send().await.json();
    let uploads = stats["uploads"].as_array().expect("uploads").clone();
    assert_eq!(uploads.len(), 2, "{stats}");
    assert!(uploads.iter().all(|u| u["len"] == 50_000), "{stats}");
    gw.stop().await;
    drop(wsgi);
}

#[tokio::test]
async fn chunked_body_is_forwarded_with_a_content_length() {
    let backend = Backend::start().await;
    let gw = Gateway::for_backend(&backend).await;
    let chunks = vec![
        Bytes::from_static(b"hello "),
        Bytes::from_static(b""),
        Bytes::from_static(b"chunked "),
        Bytes::from_static(b"world"),
    ];
    let r = gw
        .post("/api/echo")
        .body_stream(ChunkedBody::new(chunks))
        .send()
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let rec = backend.last("/echo");
    assert_eq!(&rec.body[..], b"hello chunked world");
    assert_eq!(rec.header("content-length"), Some("19"));
    assert!(rec.header("transfer-encoding").is_none());

    // JSON route, chunked JSON: validated and forwarded with a length.
    backend.on("/renew_session", Reply::json(200, json!({})));
    let r = gw
        .post("/api/orders/5")
        .token("t")
        .header("content-type", "application/json")
        .body_stream(ChunkedBody::new(vec![
            Bytes::from_static(b"{\"qty\":"),
            Bytes::from_static(b" 3}"),
        ]))
        .send()
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let rec = backend.last("/orders/5");
    assert_eq!(rec.json(), json!({"qty": 3}));
    assert_eq!(rec.header("content-length"), Some("10"));
    gw.stop().await;
}

#[tokio::test]
async fn content_length_bodies_stream_through_intact() {
    let backend = Backend::start().await;
    let gw = Gateway::for_backend(&backend).await;
    let body: Vec<u8> = (0..(512 * 1024)).map(|i| (i * 31 % 256) as u8).collect();
    let r = gw.post("/api/echo").body(body.clone()).send().await;
    assert_eq!(r.status, 200, "{}", r.text());
    let rec = backend.last("/echo");
    assert_eq!(rec.body_len, body.len() as u64);
    assert_eq!(rec.body_sha256, sha256_hex(&body));
    assert_eq!(rec.header("content-length"), Some("524288"));

    // Empty bodies stay empty, with or without a Content-Length: 0.
    let r = gw
        .post("/api/echo")
        .header("content-length", "0")
        .send()
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(backend.last("/echo").body_len, 0);

    // An invalid Content-Length is refused by the server before the gateway.
    let r = raw(
        gw.addr,
        format!(
            "POST /api/echo HTTP/1.1\r\nHost: x\r\nApi-Key: {IOS_KEY}\r\nContent-Length: abc\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .await;
    assert_eq!(r.status, 400);
    gw.stop().await;
}

#[tokio::test]
async fn streamed_chunked_route_forwards_and_still_enforces_the_limit() {
    let backend = Backend::start().await;
    let gw = GatewayConfig::new(backend.url())
        .route(
            r#"path = "/api/stream"
methods = ["POST"]
backend_path = "/stream"
public = true
max_body = "8KiB"
stream_request_body = true"#,
        )
        .start()
        .await;
    let (body, sent) = ChunkedBody::sized(8000, 1000);
    let r = gw.post("/api/stream").body_stream(body).send().await;
    assert_eq!(r.status, 200, "{}", r.text());
    let rec = backend.last("/stream");
    assert_eq!(rec.body_sha256, sha256_hex(&sent));

    // Over the limit: refused, never a silently truncated body.
    let (body, _) = ChunkedBody::sized(20_000, 1000);
    let r = gw.post("/api/stream").body_stream(body).send().await;
    r.assert_envelope(413);
    // Whatever reached the backend of the refused body must not look complete.
    for rec in backend.requests_to("/stream").iter().skip(1) {
        assert!(
            rec.body_error,
            "backend got a cleanly ended, truncated body of {} bytes",
            rec.body_len
        );
    }
    gw.stop().await;
}

/// Sends one chunk, then never another.
struct StallingBody {
    sent: bool,
}

impl http_body::Body for StallingBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        if self.sent {
            Poll::Pending
        } else {
            self.sent = true;
            Poll::Ready(Some(Ok(http_body::Frame::data(Bytes::from_static(
                b"partial",
            )))))
        }
    }
}

#[tokio::test]
async fn stalled_chunked_body_is_408_at_body_read_timeout() {
    let backend = Backend::start().await;
    // The route's own timeout is shorter: it does not cut the body.
    let gw = GatewayConfig::new(backend.url())
        .limits("body_read_timeout = \"600ms\"")
        .route(
            r#"path = "/api/slow-upload"
methods = ["POST"]
backend_path = "/slow-upload"
public = true
timeout = "300ms""#,
        )
        .start()
        .await;
    let started = Instant::now();
    let r = gw
        .post("/api/slow-upload")
        .body_stream(StallingBody { sent: false })
        .send()
        .await;
    let took = started.elapsed();
    r.assert_envelope(408);
    assert!(
        took >= Duration::from_millis(550) && took < Duration::from_secs(3),
        "{took:?}"
    );
    assert_eq!(
        backend.count("/slow-upload"),
        0,
        "no partial body forwarded"
    );
    gw.stop().await;
}

#[tokio::test]
async fn expect_100_continue_uploads_work_and_oversized_ones_are_refused_first() {
    use tokio::io::AsyncWriteExt;
    let backend = Backend::start().await;
    let gw = Gateway::for_backend(&backend).await;

    // As curl sends a POST over 1 KiB: head, wait for 100 Continue, then the body.
    let mut s = upload_after_100_continue(gw.addr, 3000).await;
    s.write_all(&[b'c'; 3000]).await.unwrap();
    let r = read_raw_response(&mut s).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let rec = backend.last("/upload");
    assert_eq!(rec.body_len, 3000);
    assert!(rec.header("expect").is_none(), "Expect is hop-level");

    // Over the limit: the 413 comes instead of 100 Continue, no body needed.
    let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(
        format!(
            "POST /api/upload HTTP/1.1\r\nHost: x\r\nApi-Key: {IOS_KEY}\r\nContent-Length: 50000\r\nExpect: 100-continue\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let r = read_raw_response(&mut s).await;
    r.assert_envelope(413);
    assert_eq!(backend.count("/upload"), 1);
    gw.stop().await;
}
