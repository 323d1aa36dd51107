//! A hyper HTTP/1.1 client for tests: [`Req`] builds a request, [`Resp`] is
//! the whole answer as the device sees it, [`KeepAlive`] reuses one connection.

use super::TIMEOUT;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response};
use http_body::Body as HttpBody;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use portcullis::body::Body;
use std::net::SocketAddr;
use tokio::net::TcpStream;

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

    /// Asserts the gateway's 405 envelope and its `Allow` header.
    pub fn assert_method_not_allowed(&self, allow: &str) {
        self.assert_gateway_error(405, "Method Not Allowed");
        assert_eq!(self.header("allow"), Some(allow), "Allow of the 405");
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
