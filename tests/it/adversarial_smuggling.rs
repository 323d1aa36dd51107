//! Request smuggling over raw TCP: ambiguous framing (CL+TE, duplicate or
//! conflicting Content-Length, obfuscated Transfer-Encoding, bare LF, obs-fold,
//! invalid chunk sizes) and requests hidden in bodies.
//!
//! The invariant, counted at the recording backend: the backend never sees
//! two requests where the device sent one, never sees the hidden request, and
//! the device gets a 400 envelope (hyper's own answers to heads it cannot
//! parse are rewritten into envelopes by `server::parse_errors`) or a closed
//! connection.

use crate::support::*;
use std::time::Duration;

/// How long a raw exchange waits for more bytes before giving up.
const QUIET: Duration = Duration::from_millis(1500);

/// A complete second request; its path must never reach the backend.
fn smuggled() -> String {
    format!("GET /api/public/SMUGGLED HTTP/1.1\r\nHost: x\r\nApi-Key: {IOS_KEY}\r\n\r\n")
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Expect {
    /// Refused before anything is forwarded: 4xx or a closed connection.
    Refused,
    /// One request at most is forwarded (the framing is unambiguous once
    /// parsed, or the gateway re-frames it).
    AtMostOne,
}

struct Case {
    name: &'static str,
    bytes: Vec<u8>,
    expect: Expect,
}

fn case(name: &'static str, bytes: impl Into<Vec<u8>>, expect: Expect) -> Case {
    Case {
        name,
        bytes: bytes.into(),
        expect,
    }
}

fn head(extra: &str) -> String {
    format!("POST /api/echo HTTP/1.1\r\nHost: x\r\nApi-Key: {IOS_KEY}\r\n{extra}")
}

fn cases() -> Vec<Case> {
    use Expect::*;
    let s = smuggled();
    let zero_then = format!("0\r\n\r\n{s}");
    vec![
        // --- CL and TE together (both orders, CL covering or not the rest).
        case(
            "cl-te: CL 4 + TE chunked, request after the last chunk",
            format!(
                "{}Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n{zero_then}",
                head("")
            ),
            AtMostOne,
        ),
        case(
            "te-cl: TE chunked then CL covering the hidden request",
            format!(
                "{}Transfer-Encoding: chunked\r\nContent-Length: {}\r\n\r\n{zero_then}",
                head(""),
                zero_then.len()
            ),
            AtMostOne,
        ),
        case(
            "cl-te: body is a chunk holding the hidden request",
            format!(
                "{}Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{s}\r\n0\r\n\r\n",
                head(""),
                s.len()
            ),
            AtMostOne,
        ),
        // --- Content-Length games.
        case(
            "duplicate conflicting Content-Length",
            format!(
                "{}Content-Length: 5\r\nContent-Length: {}\r\n\r\nhello{s}",
                head(""),
                5 + s.len()
            ),
            Refused,
        ),
        case(
            "Content-Length list with different values",
            format!("{}Content-Length: 5, 6\r\n\r\nhello{s}", head("")),
            Refused,
        ),
        case(
            "signed Content-Length",
            format!("{}Content-Length: +5\r\n\r\nhello{s}", head("")),
            Refused,
        ),
        case(
            "negative Content-Length",
            format!("{}Content-Length: -1\r\n\r\nhello{s}", head("")),
            Refused,
        ),
        case(
            "hex Content-Length",
            format!("{}Content-Length: 0x5\r\n\r\nhello{s}", head("")),
            Refused,
        ),
        case(
            "overflowing Content-Length",
            format!(
                "{}Content-Length: 99999999999999999999999\r\n\r\nhello{s}",
                head("")
            ),
            Refused,
        ),
        case(
            "duplicate equal Content-Length, hidden request after the body",
            format!("{}Content-Length: 5\r\nContent-Length: 5\r\n\r\nhello", head("")),
            AtMostOne,
        ),
        // --- Obfuscated Transfer-Encoding.
        case(
            "TE xchunked",
            format!("{}Transfer-Encoding: xchunked\r\n\r\n{zero_then}", head("")),
            Refused,
        ),
        case(
            "TE chunked, identity",
            format!(
                "{}Transfer-Encoding: chunked, identity\r\nContent-Length: 5\r\n\r\nhello{s}",
                head("")
            ),
            Refused,
        ),
        case(
            "TE chunked then a second TE identity",
            format!(
                "{}Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n{zero_then}",
                head("")
            ),
            Refused,
        ),
        case(
            "TE with trailing space",
            format!(
                "{}Transfer-Encoding: chunked \r\nContent-Length: 5\r\n\r\n{zero_then}",
                head("")
            ),
            AtMostOne,
        ),
        case(
            "TE with a leading tab",
            format!(
                "{}Transfer-Encoding: \tchunked\r\nContent-Length: 5\r\n\r\n{zero_then}",
                head("")
            ),
            AtMostOne,
        ),
        case(
            "TE with a space before the colon",
            format!(
                "{}Transfer-Encoding : chunked\r\nContent-Length: 5\r\n\r\nhello{s}",
                head("")
            ),
            Refused,
        ),
        case(
            "TE with a vertical tab",
            format!(
                "{}Transfer-Encoding:\x0bchunked\r\nContent-Length: 5\r\n\r\nhello{s}",
                head("")
            ),
            Refused,
        ),
        case(
            "TE on HTTP/1.0",
            format!(
                "POST /api/echo HTTP/1.0\r\nHost: x\r\nApi-Key: {IOS_KEY}\r\nTransfer-Encoding: chunked\r\n\r\n{zero_then}"
            ),
            Refused,
        ),
        // --- Line endings and folding.
        case(
            "bare LF line endings with CL",
            format!(
                "POST /api/echo HTTP/1.1\nHost: x\nApi-Key: {IOS_KEY}\nContent-Length: 5\n\nhello"
            ),
            AtMostOne,
        ),
        case(
            "bare LF in the TE header line, hidden request after",
            format!(
                "{}Transfer-Encoding: chunked\nContent-Length: 5\r\n\r\n{zero_then}",
                head("")
            ),
            AtMostOne,
        ),
        case(
            "bare CR as a line ending",
            format!("{}Content-Length: 5\rX: y\r\n\r\nhello{s}", head("")),
            Refused,
        ),
        case(
            "obs-fold continuation line",
            format!(
                "{}X-Folded: a\r\n b\r\nContent-Length: 5\r\n\r\nhello{s}",
                head("")
            ),
            Refused,
        ),
        case(
            "obs-fold hiding chunked",
            format!(
                "{}Transfer-Encoding: identity\r\n chunked\r\nContent-Length: 5\r\n\r\nhello{s}",
                head("")
            ),
            Refused,
        ),
        // --- Invalid chunk sizes (the head is fine; the body is not).
        case(
            "chunk size -1",
            format!("{}Transfer-Encoding: chunked\r\n\r\n-1\r\nx\r\n0\r\n\r\n{s}", head("")),
            Refused,
        ),
        case(
            "chunk size 0x10",
            format!(
                "{}Transfer-Encoding: chunked\r\n\r\n0x10\r\n0123456789abcdef\r\n0\r\n\r\n{s}",
                head("")
            ),
            Refused,
        ),
        case(
            "chunk size overflowing u64",
            format!(
                "{}Transfer-Encoding: chunked\r\n\r\nfffffffffffffffffffff\r\nx\r\n0\r\n\r\n{s}",
                head("")
            ),
            Refused,
        ),
        case(
            "chunk size with garbage",
            format!("{}Transfer-Encoding: chunked\r\n\r\n5g\r\nhello\r\n0\r\n\r\n{s}", head("")),
            Refused,
        ),
        // --- A request hidden in a well-framed body is just body bytes.
        case(
            "hidden request as a Content-Length body",
            format!("{}Content-Length: {}\r\n\r\n{s}", head(""), s.len()),
            AtMostOne,
        ),
        case(
            "hidden request as a chunk",
            format!(
                "{}Transfer-Encoding: chunked\r\n\r\n{:x}\r\n{s}\r\n0\r\n\r\n",
                head(""),
                s.len()
            ),
            AtMostOne,
        ),
    ]
}

/// What one case did, for the summary printed at the end.
struct Seen {
    name: &'static str,
    statuses: Vec<u16>,
    closed: bool,
    forwarded: usize,
}

async fn run_case(c: Case) -> Seen {
    let backend = Backend::start().await;
    let gw = GatewayConfig::new(backend.url())
        .limits("body_read_timeout = \"1s\"")
        .start()
        .await;
    let out = raw_all(gw.addr, &c.bytes, QUIET).await;
    // Let anything the gateway forwarded land at the backend.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let recorded = backend.requests();
    let name = c.name;
    assert!(
        recorded.iter().all(|r| !r.uri.contains("SMUGGLED")),
        "{name}: the hidden request reached the backend: {:?}",
        backend.paths()
    );
    assert!(
        recorded.len() <= 1,
        "{name}: the backend saw {} requests for one device request: {:?}",
        recorded.len(),
        backend.paths()
    );
    assert!(
        out.responses.len() <= 1,
        "{name}: the device got {} responses for one request: {:?}",
        out.responses.len(),
        out.responses.iter().map(|r| r.status).collect::<Vec<_>>()
    );
    // Every refusal is the envelope — hyper's own answers to heads it cannot
    // parse included (rewritten by `server::parse_errors`).
    for r in &out.responses {
        if r.status >= 400 {
            r.assert_envelope(r.status);
        }
    }
    match c.expect {
        Expect::Refused => {
            assert!(
                recorded.is_empty(),
                "{name}: forwarded {:?}",
                backend.paths()
            );
            assert!(
                out.responses.iter().all(|r| r.status == 400)
                    && (out.closed || !out.responses.is_empty()),
                "{name}: expected a 400 or a closed connection, got {:?} closed={}",
                out.responses
                    .iter()
                    .map(|r| (r.status, r.text()))
                    .collect::<Vec<_>>(),
                out.closed
            );
        }
        Expect::AtMostOne => {
            for r in &out.responses {
                assert!(
                    matches!(r.status, 200 | 400),
                    "{name}: status {} {}",
                    r.status,
                    r.text()
                );
            }
            assert!(
                !out.responses.is_empty() || out.closed,
                "{name}: neither an answer nor a close"
            );
        }
    }
    // Every forwarded request was answered.
    assert!(
        out.responses.len() >= recorded.len(),
        "{name}: forwarded without answering"
    );
    gw.stop().await;
    Seen {
        name,
        statuses: out.responses.iter().map(|r| r.status).collect(),
        closed: out.closed,
        forwarded: recorded.len(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ambiguous_framing_never_smuggles_a_second_request() {
    watch_panics();
    let mut set = tokio::task::JoinSet::new();
    for c in cases() {
        set.spawn(run_case(c));
    }
    let mut seen = Vec::new();
    while let Some(r) = set.join_next().await {
        match r {
            Ok(s) => seen.push(s),
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => panic!("case task: {e}"),
        }
    }
    seen.sort_by_key(|s| s.name);
    for s in &seen {
        eprintln!(
            "{:<60} responses={:?} closed={} forwarded={}",
            s.name, s.statuses, s.closed, s.forwarded
        );
    }
    assert_no_panics();
}

/// Control for the counting above: two honest pipelined requests are two
/// backend requests and two answers, in order.
#[tokio::test]
async fn pipelined_requests_are_counted_one_for_one() {
    watch_panics();
    let backend = Backend::start().await;
    let gw = Gateway::for_backend(&backend).await;
    let req = format!(
        "GET /api/public/one HTTP/1.1\r\nHost: x\r\nApi-Key: {IOS_KEY}\r\n\r\nGET /api/public/two HTTP/1.1\r\nHost: x\r\nApi-Key: {IOS_KEY}\r\nConnection: close\r\n\r\n"
    );
    let out = raw_all(gw.addr, req.as_bytes(), QUIET).await;
    assert_eq!(
        out.responses.iter().map(|r| r.status).collect::<Vec<_>>(),
        vec![200, 200]
    );
    assert_eq!(backend.paths(), vec!["/public/one", "/public/two"]);
    gw.stop().await;
    assert_no_panics();
}

/// A CL+TE request is answered and the connection closed (RFC 9112 §6.1),
/// so bytes after it are never read as a request — even an honest one.
#[tokio::test]
async fn cl_and_te_together_close_the_connection() {
    watch_panics();
    let backend = Backend::start().await;
    let gw = Gateway::for_backend(&backend).await;
    let req = format!(
        "{}Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n{}",
        head(""),
        smuggled()
    );
    let out = raw_all(gw.addr, req.as_bytes(), QUIET).await;
    assert!(out.closed, "connection closed after a CL+TE request");
    assert!(out.responses.len() <= 1);
    let recorded = backend.requests();
    assert!(recorded.len() <= 1, "{:?}", backend.paths());
    if let Some(r) = recorded.first() {
        // Forwarded as chunked-decoded, re-framed with a Content-Length.
        assert_eq!(&r.body[..], b"hello");
        assert_eq!(r.header("content-length"), Some("5"));
        assert!(r.header("transfer-encoding").is_none());
    }
    gw.stop().await;
    assert_no_panics();
}

/// The body a backend receives is exactly what the gateway framed: a
/// request-looking body arrives as body bytes with a matching length.
#[tokio::test]
async fn request_in_body_reaches_the_backend_as_body_bytes() {
    watch_panics();
    let backend = Backend::start().await;
    let gw = Gateway::for_backend(&backend).await;
    let s = smuggled();
    let req = format!(
        "{}Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n{:x}\r\n{s}\r\n0\r\n\r\n",
        head(""),
        s.len()
    );
    let out = raw_all(gw.addr, req.as_bytes(), QUIET).await;
    assert_eq!(
        out.responses.iter().map(|r| r.status).collect::<Vec<_>>(),
        vec![200]
    );
    let recorded = backend.requests();
    assert_eq!(recorded.len(), 1, "{:?}", backend.paths());
    assert_eq!(recorded[0].path, "/echo");
    assert_eq!(&recorded[0].body[..], s.as_bytes());
    assert_eq!(
        recorded[0].header("content-length"),
        Some(s.len().to_string().as_str())
    );
    gw.stop().await;
    assert_no_panics();
}
