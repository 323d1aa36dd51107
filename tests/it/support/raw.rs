//! Raw bytes on a TCP connection, for requests a normal client would refuse
//! or normalise, and a parser for whatever comes back.

use super::client::Resp;
use super::gateway::IOS_KEY;
use super::TIMEOUT;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

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

/// Sends half a request head on `s` and asserts the gateway answers 408 and
/// closes once a `header_read_timeout` of 500 ms has passed (not before it,
/// nor as late as an idle timeout).
pub async fn assert_half_head_gets_408(s: &mut TcpStream) {
    let started = std::time::Instant::now();
    s.write_all(b"GET /api/sta").await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
        .await
        .expect("closed after the 408")
        .unwrap();
    let took = started.elapsed();
    let (responses, _) = parse_responses(&buf);
    assert_eq!(responses.len(), 1, "{}", String::from_utf8_lossy(&buf));
    responses[0].assert_envelope(408);
    assert!(took >= Duration::from_millis(400), "{took:?}");
    assert!(took < Duration::from_millis(2500), "{took:?}");
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
