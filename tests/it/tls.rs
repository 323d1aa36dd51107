//! TLS on both sides, over real sockets on loopback with certificates made in
//! the test: device-facing HTTPS (name checks, old protocol versions refused,
//! HTTP/2 and HTTP/1.1 by ALPN, certificate reload) and https:// backends
//! (custom CA, mTLS, unknown CA → 502).

use crate::support::{self, Backend, GatewayConfig, Resp, IOS_KEY, TIMEOUT};
use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use portcullis::config::Config;
use portcullis::devcerts::{DevCa, Issued};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::client::TlsStream;

fn write(dir: &Path, name: &str, contents: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, contents).unwrap();
    p
}

fn roots(ca_pem: &str) -> RootCertStore {
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    roots
}

fn client_config(ca_pem: &str, alpn: &[&[u8]]) -> Arc<ClientConfig> {
    let mut c = ClientConfig::builder_with_provider(portcullis::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots(ca_pem))
        .with_no_client_auth();
    c.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(c)
}

async fn tls_connect(
    addr: SocketAddr,
    name: &str,
    ca_pem: &str,
    alpn: &[&[u8]],
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let connector = tokio_rustls::TlsConnector::from(client_config(ca_pem, alpn));
    let name = ServerName::try_from(name.to_owned()).unwrap();
    tokio::time::timeout(TIMEOUT, connector.connect(name, tcp))
        .await
        .expect("handshake in time")
}

async fn collect(resp: http::Response<hyper::body::Incoming>) -> Resp {
    let (parts, body) = resp.into_parts();
    Resp {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body: body.collect().await.unwrap().to_bytes(),
    }
}

async fn get_http1(stream: TlsStream<TcpStream>, path: &str) -> Resp {
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = Request::get(path)
        .header("host", "localhost")
        .header("api-key", IOS_KEY)
        .body(Empty::<Bytes>::new())
        .unwrap();
    collect(send.send_request(req).await.unwrap()).await
}

async fn get_http2(stream: TlsStream<TcpStream>, authority: &str, path: &str) -> Resp {
    get_http2_with_key(stream, authority, path, IOS_KEY).await
}

async fn get_http2_with_key(
    stream: TlsStream<TcpStream>,
    authority: &str,
    path: &str,
    api_key: &str,
) -> Resp {
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = Request::get(format!("https://{authority}{path}"))
        .header("api-key", api_key)
        .body(Empty::<Bytes>::new())
        .unwrap();
    collect(send.send_request(req).await.unwrap()).await
}

/// A gateway serving HTTPS for `localhost` (a fresh dev CA) in front of
/// `backend`, with one `[limits]` line; the CA and the files' directory too.
async fn https_gateway(
    backend: &Backend,
    limits: &str,
) -> (support::Gateway, DevCa, tempfile::TempDir) {
    let ca = DevCa::new("test CA").unwrap();
    let server = ca.issue_server(&["localhost"]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cert = write(dir.path(), "server.crt", &server.cert_pem);
    let key = write(dir.path(), "server.key", &server.key_pem);
    let gw = GatewayConfig::new(backend.url())
        .server(&format!("tls = {{ cert = {cert:?}, key = {key:?} }}"))
        .limits(limits)
        .start()
        .await;
    (gw, ca, dir)
}

/// A gateway serving HTTPS with `server` (issued by some CA) in front of `backend`.
struct TlsGateway {
    gw: support::Gateway,
    cert: PathBuf,
    key: PathBuf,
    _dir: tempfile::TempDir,
}

async fn tls_gateway(backend: &Backend, server: &Issued) -> TlsGateway {
    let dir = tempfile::tempdir().unwrap();
    let cert = write(dir.path(), "server.crt", &server.cert_pem);
    let key = write(dir.path(), "server.key", &server.key_pem);
    let gw = GatewayConfig::new(backend.url())
        .server(&format!(
            "tls = {{ cert = {:?}, key = {:?}, reload_interval = \"100ms\" }}",
            cert, key
        ))
        .start()
        .await;
    TlsGateway {
        gw,
        cert,
        key,
        _dir: dir,
    }
}

#[tokio::test]
async fn a_client_rejects_the_gateway_when_the_name_does_not_match() {
    let backend = Backend::start().await;
    let ca = DevCa::new("test CA").unwrap();
    let gw = tls_gateway(&backend, &ca.issue_server(&["api.example.com"]).unwrap()).await;
    let err = tls_connect(gw.gw.addr, "localhost", &ca.ca.cert_pem, &[b"http/1.1"])
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("not valid for name"),
        "unexpected error: {err}"
    );
    // The same CA and the right name: accepted.
    let ok = tls_connect(
        gw.gw.addr,
        "api.example.com",
        &ca.ca.cert_pem,
        &[b"http/1.1"],
    )
    .await
    .unwrap();
    assert_eq!(get_http1(ok, "/api/status").await.status, 200);
    // A client that does not trust the CA refuses as well.
    let other = DevCa::new("other CA").unwrap();
    let err = tls_connect(gw.gw.addr, "api.example.com", &other.ca.cert_pem, &[])
        .await
        .unwrap_err();
    assert!(err.to_string().contains("UnknownIssuer"), "{err}");
}

#[tokio::test]
async fn http2_and_http1_both_work_end_to_end() {
    let backend = Backend::start().await;
    let ca = DevCa::new("test CA").unwrap();
    let gw = tls_gateway(&backend, &ca.issue_server(&["localhost"]).unwrap()).await;

    let h2 = tls_connect(
        gw.gw.addr,
        "localhost",
        &ca.ca.cert_pem,
        &[b"h2", b"http/1.1"],
    )
    .await
    .unwrap();
    assert_eq!(h2.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    assert_eq!(
        h2.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    let resp = get_http2(h2, "localhost", "/api/status").await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(
        resp.header("strict-transport-security"),
        Some("max-age=31536000")
    );
    assert_eq!(resp.header("x-content-type-options"), Some("nosniff"));
    assert_eq!(resp.json()["path"], "/status");
    let seen = backend.last("/status");
    assert_eq!(seen.header("x-forwarded-proto"), Some("https"));
    assert_eq!(seen.header("api-client"), Some("ios-app"));

    let h1 = tls_connect(gw.gw.addr, "localhost", &ca.ca.cert_pem, &[b"http/1.1"])
        .await
        .unwrap();
    assert_eq!(h1.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let resp = get_http1(h1, "/api/status").await;
    assert_eq!(resp.status, 200);
    assert_eq!(backend.count("/status"), 2);
    assert_eq!(
        backend.last("/status").header("x-forwarded-proto"),
        Some("https")
    );

    // TLS 1.2 only, no ALPN at all: still served (HTTP/1.1).
    let mut c12 = ClientConfig::builder_with_provider(portcullis::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .with_root_certificates(roots(&ca.ca.cert_pem))
        .with_no_client_auth();
    c12.alpn_protocols.clear();
    let tcp = TcpStream::connect(gw.gw.addr).await.unwrap();
    let s = tokio_rustls::TlsConnector::from(Arc::new(c12))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    assert_eq!(
        s.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_2)
    );
    assert_eq!(get_http1(s, "/api/status").await.status, 200);

    // Plain HTTP on the TLS port gets nothing served.
    let mut raw = TcpStream::connect(gw.gw.addr).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    raw.write_all(b"GET /api/status HTTP/1.1\r\nhost: x\r\napi-key: k\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(TIMEOUT, raw.read_to_end(&mut buf)).await;
    assert!(!buf.starts_with(b"HTTP/1.1 200"));
    assert_eq!(backend.count("/status"), 3);
}

fn openssl_available() -> bool {
    std::process::Command::new("openssl")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// `openssl s_client` with one protocol version; true when the handshake completed.
fn openssl_handshake(addr: SocketAddr, version_flag: &str) -> (bool, String) {
    let out = std::process::Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &addr.to_string(),
            "-servername",
            "localhost",
            version_flag,
            "-cipher",
            "DEFAULT:@SECLEVEL=0",
        ])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let cipher_none = text.contains("Cipher is (NONE)");
    (out.status.success() && !cipher_none, text)
}

#[tokio::test]
async fn tls_1_0_and_1_1_handshakes_are_refused() {
    if !openssl_available() {
        eprintln!("skipped: the `openssl` command is not installed (apt-get install openssl)");
        return;
    }
    let backend = Backend::start().await;
    let ca = DevCa::new("test CA").unwrap();
    let gw = tls_gateway(&backend, &ca.issue_server(&["localhost"]).unwrap()).await;
    let addr = gw.gw.addr;
    let results = tokio::task::spawn_blocking(move || {
        ["-tls1", "-tls1_1", "-tls1_2", "-tls1_3"].map(|flag| (flag, openssl_handshake(addr, flag)))
    })
    .await
    .unwrap();
    for (flag, (ok, text)) in results {
        match flag {
            "-tls1" | "-tls1_1" => assert!(!ok, "{flag} must be refused:\n{text}"),
            _ => assert!(ok, "{flag} must be accepted:\n{text}"),
        }
    }
}

#[tokio::test]
async fn reload_swaps_the_certificate_for_new_connections() {
    let backend = Backend::start().await;
    let ca1 = DevCa::new("first CA").unwrap();
    let ca2 = DevCa::new("second CA").unwrap();
    let gw = tls_gateway(&backend, &ca1.issue_server(&["localhost"]).unwrap()).await;
    let addr = gw.gw.addr;

    // A connection opened before the swap keeps working after it.
    let before = tls_connect(addr, "localhost", &ca1.ca.cert_pem, &[b"http/1.1"])
        .await
        .unwrap();
    let (mut before, conn) = hyper::client::conn::http1::handshake(TokioIo::new(before))
        .await
        .unwrap();
    tokio::spawn(conn);

    // A broken update (certificate without its key) is refused; the old one keeps serving.
    let next = ca2.issue_server(&["localhost"]).unwrap();
    std::fs::write(&gw.cert, &next.cert_pem).unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    tls_connect(addr, "localhost", &ca1.ca.cert_pem, &[])
        .await
        .expect("old certificate still served after a mismatched update");

    // The key arrives: the next poll swaps the pair in.
    std::fs::write(&gw.key, &next.key_pem).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if tls_connect(addr, "localhost", &ca2.ca.cert_pem, &[])
            .await
            .is_ok()
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "new certificate not picked up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(tls_connect(addr, "localhost", &ca1.ca.cert_pem, &[])
        .await
        .is_err());
    let s = tls_connect(addr, "localhost", &ca2.ca.cert_pem, &[b"http/1.1"])
        .await
        .unwrap();
    assert_eq!(get_http1(s, "/api/status").await.status, 200);

    let req = Request::get("/api/status")
        .header("host", "localhost")
        .header("api-key", IOS_KEY)
        .body(Empty::<Bytes>::new())
        .unwrap();
    assert_eq!(before.send_request(req).await.unwrap().status(), 200);
}

// ------------------------------------------------------------------ https backends

/// A TLS backend: answers every request with 200 and what it saw of the client.
struct TlsBackend {
    addr: SocketAddr,
    sni: Arc<Mutex<Vec<Option<String>>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TlsBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn tls_backend(server: &Issued, client_ca: Option<&str>) -> TlsBackend {
    let provider = portcullis::tls::provider();
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .unwrap();
    let builder = match client_ca {
        Some(ca) => builder.with_client_cert_verifier(
            rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots(ca)),
                provider,
            )
            .build()
            .unwrap(),
        ),
        None => builder.with_no_client_auth(),
    };
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(server.cert_pem.as_bytes())
            .map(Result::unwrap)
            .collect();
    let key = PrivateKeyDer::from_pem_slice(server.key_pem.as_bytes()).unwrap();
    let mut config = builder.with_single_cert(chain, key).unwrap();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let sni = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&sni);
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let (acceptor, seen) = (acceptor.clone(), Arc::clone(&seen));
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let conn = tls.get_ref().1;
                seen.lock()
                    .unwrap()
                    .push(conn.server_name().map(str::to_owned));
                let alpn = conn
                    .alpn_protocol()
                    .map(|p| String::from_utf8_lossy(p).into_owned());
                let client_cert = conn.peer_certificates().is_some_and(|c| !c.is_empty());
                let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let body = serde_json::json!({
                        "path": req.uri().path(),
                        "alpn": alpn,
                        "client_cert": client_cert,
                        "api_key": req.headers().get("api-key").and_then(|v| v.to_str().ok()),
                    })
                    .to_string();
                    async move {
                        Ok::<_, std::convert::Infallible>(
                            http::Response::builder()
                                .header("content-type", "application/json")
                                .body(Full::new(Bytes::from(body)))
                                .unwrap(),
                        )
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    TlsBackend { addr, sni, task }
}

async fn gateway_to(url: String, backend_lines: &[String]) -> support::Gateway {
    let mut cfg = GatewayConfig::new(url);
    for l in backend_lines {
        cfg = cfg.backend(l);
    }
    cfg.backend("connect_timeout = \"2s\"").start().await
}

#[tokio::test]
async fn https_backend_with_a_custom_ca() {
    let dir = tempfile::tempdir().unwrap();
    let ca = DevCa::new("backend CA").unwrap();
    let backend = tls_backend(&ca.issue_server(&["localhost", "127.0.0.1"]).unwrap(), None).await;
    let ca_path = write(dir.path(), "backend-ca.pem", &ca.ca.cert_pem);
    let port = backend.addr.port();

    // By DNS name: SNI carries it, the pool reuses the connection.
    let gw = gateway_to(
        format!("https://localhost:{port}"),
        &[format!("ca = {ca_path:?}")],
    )
    .await;
    for _ in 0..3 {
        let resp = gw.get("/api/status").send().await;
        assert_eq!(resp.status, 200, "{}", resp.text());
        let v = resp.json();
        assert_eq!(v["path"], "/status");
        assert_eq!(v["alpn"], "http/1.1");
        assert_eq!(v["client_cert"], false);
        assert_eq!(v["api_key"], support::BACKEND_CREDENTIAL);
    }
    let sni = backend.sni.lock().unwrap().clone();
    assert_eq!(
        sni,
        vec![Some("localhost".to_owned())],
        "one pooled connection, SNI localhost"
    );

    // By IP address: verified against the IP SAN, no SNI sent.
    let gw = gateway_to(
        format!("https://127.0.0.1:{port}"),
        &[format!("ca = {ca_path:?}")],
    )
    .await;
    assert_eq!(gw.get("/api/status").send().await.status, 200);
}

#[tokio::test]
async fn https_backend_with_an_unknown_ca_is_a_502_envelope() {
    let dir = tempfile::tempdir().unwrap();
    let real = DevCa::new("backend CA").unwrap();
    let other = DevCa::new("some other CA").unwrap();
    let backend = tls_backend(&real.issue_server(&["localhost"]).unwrap(), None).await;
    let other_path = write(dir.path(), "other-ca.pem", &other.ca.cert_pem);
    let gw = gateway_to(
        format!("https://localhost:{}", backend.addr.port()),
        &[format!("ca = {other_path:?}")],
    )
    .await;
    let resp = gw.get("/api/status").send().await;
    resp.assert_gateway_error(502, "Could not connect to service");
    assert!(!resp.text().contains("localhost"));

    // Without `ca`, the public webpki roots do not know a private CA either.
    let gw = gateway_to(format!("https://localhost:{}", backend.addr.port()), &[]).await;
    gw.get("/api/status")
        .send()
        .await
        .assert_gateway_error(502, "Could not connect to service");
}

#[tokio::test]
async fn https_backend_with_mutual_tls() {
    let dir = tempfile::tempdir().unwrap();
    let ca = DevCa::new("backend CA").unwrap();
    let clients = DevCa::new("gateway clients CA").unwrap();
    let backend = tls_backend(
        &ca.issue_server(&["localhost"]).unwrap(),
        Some(&clients.ca.cert_pem),
    )
    .await;
    let url = format!("https://localhost:{}", backend.addr.port());
    let ca_line = format!("ca = {:?}", write(dir.path(), "ca.pem", &ca.ca.cert_pem));

    // No client certificate: the backend refuses the handshake → 502.
    let gw = gateway_to(url.clone(), std::slice::from_ref(&ca_line)).await;
    gw.get("/api/status")
        .send()
        .await
        .assert_gateway_error(502, "Could not connect to service");

    // With one issued by the CA the backend trusts: served.
    let client = clients.issue_client("portcullis-gateway").unwrap();
    let cert = write(dir.path(), "client.crt", &client.cert_pem);
    let key = write(dir.path(), "client.key", &client.key_pem);
    let gw = gateway_to(
        url,
        &[
            ca_line,
            format!("client_cert = {cert:?}"),
            format!("client_key = {key:?}"),
        ],
    )
    .await;
    let resp = gw.get("/api/status").send().await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.json()["client_cert"], true);
}

// ------------------------------------------------------------------ configuration

fn config_with(server_tls: &str, backend: &str) -> Result<Config, String> {
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n{server_tls}\n[backend]\n{backend}\n[[api_keys]]\nname = \"a\"\nkey = \"k\"\n"
    );
    Config::parse(&text).map_err(|p| p.to_string())
}

#[test]
fn tls_settings_are_validated_with_every_problem_reported() {
    let dir = tempfile::tempdir().unwrap();
    let ca = DevCa::new("CA").unwrap();
    let a = ca.issue_server(&["localhost"]).unwrap();
    let b = ca.issue_server(&["localhost"]).unwrap();
    let cert = write(dir.path(), "a.crt", &a.cert_pem);
    let key_a = write(dir.path(), "a.key", &a.key_pem);
    let key_b = write(dir.path(), "b.key", &b.key_pem);
    let garbage = write(dir.path(), "garbage.pem", "hello");

    let ok = config_with(
        &format!("tls = {{ cert = {cert:?}, key = {key_a:?} }}"),
        "url = \"https://localhost\"",
    )
    .unwrap();
    assert!(ok.server.tls.is_some());
    assert!(ok.backend.tls.is_some());
    assert_eq!(ok.backend.address, "localhost:443");
    assert_eq!(ok.limits.tls_handshake_timeout, Duration::from_secs(10));

    let err = config_with(
        &format!("tls = {{ cert = {cert:?}, key = {key_b:?} }}"),
        &format!("url = \"https://localhost\"\nca = {garbage:?}\nclient_cert = {cert:?}"),
    )
    .unwrap_err();
    assert!(
        err.contains("server.tls") && err.contains("does not match"),
        "{err}"
    );
    assert!(
        err.contains("client_cert and client_key go together"),
        "{err}"
    );
    // The key's contents never appear in a problem.
    assert!(!err.contains("PRIVATE KEY"), "{err}");

    let err = config_with(
        "tls = { cert = \"/nonexistent/c.pem\", key = \"/nonexistent/k.pem\" }",
        &format!("url = \"http://localhost\"\nca = {garbage:?}"),
    )
    .unwrap_err();
    assert!(err.contains("cannot read /nonexistent/c.pem"), "{err}");
    assert!(
        err.contains("backend.ca: only meaningful with an https://"),
        "{err}"
    );

    let err = config_with(
        "",
        &format!("url = \"https://localhost\"\nca = {garbage:?}"),
    )
    .unwrap_err();
    assert!(err.contains("no CERTIFICATE found"), "{err}");

    // An OCSP response must be DER (a PEM/base64 file given by mistake is refused).
    let err = config_with(
        &format!("tls = {{ cert = {cert:?}, key = {key_a:?}, ocsp = {garbage:?} }}"),
        "url = \"http://localhost\"",
    )
    .unwrap_err();
    assert!(
        err.contains("server.tls") && err.contains("not a DER OCSP response"),
        "{err}"
    );
}

/// Records the OCSP response each handshake stapled, then verifies the
/// certificate as usual.
#[derive(Debug)]
struct StapleRecorder {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    stapled: Mutex<Vec<Vec<u8>>>,
}

impl rustls::client::danger::ServerCertVerifier for StapleRecorder {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        self.stapled.lock().unwrap().push(ocsp_response.to_vec());
        self.inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// What the gateway stapled to one handshake with `version`.
async fn stapled(
    addr: SocketAddr,
    ca_pem: &str,
    version: &'static rustls::SupportedProtocolVersion,
) -> Vec<u8> {
    let recorder = Arc::new(StapleRecorder {
        inner: rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots(ca_pem)),
            portcullis::tls::provider(),
        )
        .build()
        .unwrap(),
        stapled: Mutex::new(Vec::new()),
    });
    let config = ClientConfig::builder_with_provider(portcullis::tls::provider())
        .with_protocol_versions(&[version])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::clone(&recorder) as _)
        .with_no_client_auth();
    let tcp = TcpStream::connect(addr).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let name = ServerName::try_from("localhost").unwrap();
    tokio::time::timeout(TIMEOUT, connector.connect(name, tcp))
        .await
        .expect("handshake in time")
        .expect("handshake succeeds");
    let mut seen = recorder.stapled.lock().unwrap();
    assert_eq!(seen.len(), 1);
    seen.pop().unwrap_or_default()
}

#[tokio::test]
async fn the_ocsp_response_is_stapled_and_reloaded() {
    // Two minimal, well-formed OCSPResponse values (responseStatus only).
    const FIRST: [u8; 5] = [0x30, 0x03, 0x0a, 0x01, 0x06];
    const SECOND: [u8; 5] = [0x30, 0x03, 0x0a, 0x01, 0x05];
    let backend = Backend::start().await;
    let ca = DevCa::new("OCSP CA").unwrap();
    let server = ca.issue_server(&["localhost"]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cert = write(dir.path(), "server.crt", &server.cert_pem);
    let key = write(dir.path(), "server.key", &server.key_pem);
    let ocsp = dir.path().join("server.ocsp");
    std::fs::write(&ocsp, FIRST).unwrap();
    let gw = GatewayConfig::new(backend.url())
        .server(&format!(
            "tls = {{ cert = {cert:?}, key = {key:?}, ocsp = {ocsp:?}, reload_interval = \"100ms\" }}"
        ))
        .start()
        .await;
    let ca_pem = &ca.ca.cert_pem;
    for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
        assert_eq!(stapled(gw.addr, ca_pem, version).await, FIRST);
    }

    // A renewed response is picked up by the next poll.
    std::fs::write(&ocsp, SECOND).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while stapled(gw.addr, ca_pem, &rustls::version::TLS13).await != SECOND {
        assert!(
            tokio::time::Instant::now() < deadline,
            "new OCSP response not stapled"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        stapled(gw.addr, ca_pem, &rustls::version::TLS12).await,
        SECOND
    );

    // A broken one is refused: the last good response keeps being stapled.
    std::fs::write(&ocsp, "-----BEGIN OCSP RESPONSE-----\n").unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        stapled(gw.addr, ca_pem, &rustls::version::TLS13).await,
        SECOND
    );
    let s = tls_connect(gw.addr, "localhost", ca_pem, &[b"http/1.1"])
        .await
        .unwrap();
    assert_eq!(get_http1(s, "/api/status").await.status, 200);
}

#[test]
fn dev_certs_command_writes_a_usable_ca_and_server_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("certs");
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["dev-certs", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(run.status.success());
    let text = String::from_utf8_lossy(&run.stdout);
    assert!(text.contains("tls = { cert = "), "{text}");
    assert!(text.contains("--cacert"), "{text}");
    assert!(!text.contains("PRIVATE KEY"));
    portcullis::tls::load_certified_key(&out.join("server.crt"), &out.join("server.key")).unwrap();
    let ca_pem = std::fs::read_to_string(out.join("ca.crt")).unwrap();
    // The server certificate verifies against the CA for all three names.
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(out.join("server.crt"))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    use rustls::client::danger::ServerCertVerifier;
    let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots(&ca_pem)),
        portcullis::tls::provider(),
    )
    .build()
    .unwrap();
    for name in ["localhost", "127.0.0.1", "::1"] {
        verifier
            .verify_server_cert(
                &chain[0],
                &[],
                &ServerName::try_from(name).unwrap(),
                &[],
                rustls::pki_types::UnixTime::now(),
            )
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}

#[tokio::test]
async fn a_client_that_never_finishes_its_handshake_is_dropped() {
    let backend = Backend::start().await;
    let (gw, ca, _dir) = https_gateway(&backend, "tls_handshake_timeout = \"300ms\"").await;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let started = std::time::Instant::now();
    let mut silent = TcpStream::connect(gw.addr).await.unwrap();
    // Half a ClientHello record header, then nothing.
    silent.write_all(&[0x16, 0x03, 0x01]).await.unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(TIMEOUT, silent.read(&mut buf))
        .await
        .expect("closed by the gateway")
        .unwrap_or(0);
    assert_eq!(n, 0, "nothing is sent before the handshake");
    assert!(started.elapsed() >= Duration::from_millis(250));
    assert!(started.elapsed() < Duration::from_secs(5));
    // Others are served meanwhile.
    let ok = tls_connect(gw.addr, "localhost", &ca.ca.cert_pem, &[b"http/1.1"])
        .await
        .unwrap();
    assert_eq!(get_http1(ok, "/api/status").await.status, 200);
}

#[test]
fn the_demo_runs_over_tls() {
    use std::io::{BufRead, BufReader};
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .arg("demo")
        .env("PORTCULLIS_DEMO_TLS", "1")
        .env("PORTCULLIS_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let stdout = child.stdout.take().unwrap();
    let pid = i32::try_from(child.id()).unwrap();
    let mut guard = Kill(child);
    let mut port = None;
    let mut ca = None;
    let mut lines = BufReader::new(stdout).lines();
    for line in lines.by_ref() {
        let line = line.unwrap();
        if let Some(rest) = line.split("https://localhost:").nth(1) {
            port = port.or_else(|| {
                rest.split(|c: char| !c.is_ascii_digit())
                    .next()
                    .and_then(|p| p.parse::<u16>().ok())
            });
        }
        if let Some(rest) = line.split("--cacert ").nth(1) {
            ca = ca.or_else(|| rest.split_whitespace().next().map(str::to_owned));
        }
        if line.contains("Press Ctrl-C") {
            break;
        }
    }
    let (port, ca) = (
        port.expect("https URL printed"),
        ca.expect("--cacert printed"),
    );
    let ca_pem = std::fs::read_to_string(&ca).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let s = tls_connect(addr, "localhost", &ca_pem, &[b"h2"])
            .await
            .unwrap();
        let resp = get_http2_with_key(
            s,
            "localhost",
            "/api/status",
            portcullis::demo::DEMO_API_KEY,
        )
        .await;
        assert_eq!(resp.status, 200, "{}", resp.text());
    });
    // SIGTERM: a graceful stop removes the demo's temporary certificates.
    // SAFETY: kill(2) on the child we spawned and still own.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let status = guard.0.wait().unwrap();
    assert!(status.success(), "{status:?}");
    assert!(!std::path::Path::new(&ca).exists(), "{ca} left behind");
}

#[tokio::test]
async fn returning_clients_resume_their_session() {
    let backend = Backend::start().await;
    let ca = DevCa::new("test CA").unwrap();
    let gw = tls_gateway(&backend, &ca.issue_server(&["localhost"]).unwrap()).await;
    // One client config (and so one session cache) for both connections.
    let config = client_config(&ca.ca.cert_pem, &[b"http/1.1"]);
    let connector = tokio_rustls::TlsConnector::from(config);
    let mut kinds = Vec::new();
    for _ in 0..2 {
        let tcp = TcpStream::connect(gw.gw.addr).await.unwrap();
        let s = connector
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .unwrap();
        kinds.push(s.get_ref().1.handshake_kind());
        // The tickets arrive after the handshake: make a request to read them.
        assert_eq!(get_http1(s, "/api/status").await.status, 200);
    }
    assert_eq!(
        kinds,
        vec![
            Some(rustls::HandshakeKind::Full),
            Some(rustls::HandshakeKind::Resumed)
        ]
    );
}

#[tokio::test]
async fn over_the_connection_cap_a_tls_client_gets_the_503_envelope() {
    let backend = Backend::start().await;
    let (gw, ca, _dir) = https_gateway(&backend, "max_connections = 1").await;
    let first = tls_connect(gw.addr, "localhost", &ca.ca.cert_pem, &[b"http/1.1"])
        .await
        .unwrap();
    let (mut first, conn) = hyper::client::conn::http1::handshake(TokioIo::new(first))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = || {
        Request::get("/api/status")
            .header("host", "localhost")
            .header("api-key", IOS_KEY)
            .body(Empty::<Bytes>::new())
            .unwrap()
    };
    assert_eq!(first.send_request(req()).await.unwrap().status(), 200);
    // The cap is taken by `first`: the next one is refused, in an envelope, over TLS.
    let second = tls_connect(gw.addr, "localhost", &ca.ca.cert_pem, &[b"http/1.1"])
        .await
        .unwrap();
    let (mut second, conn) = hyper::client::conn::http1::handshake(TokioIo::new(second))
        .await
        .unwrap();
    tokio::spawn(conn);
    let resp = collect(second.send_request(req()).await.unwrap()).await;
    let (kind, _) = resp.assert_envelope(503);
    assert_eq!(kind, "ProxyServerError");
    assert_eq!(first.send_request(req()).await.unwrap().status(), 200);
}

#[tokio::test]
async fn a_head_cut_short_over_tls_gets_the_408_envelope() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let backend = Backend::start().await;
    let (gw, ca, _dir) = https_gateway(&backend, "header_read_timeout = \"1s\"").await;
    let mut s = tls_connect(gw.addr, "localhost", &ca.ca.cert_pem, &[b"http/1.1"])
        .await
        .unwrap();
    s.write_all(b"GET /api/status HTTP/1.1\r\nHost: localhost\r\nApi-")
        .await
        .unwrap();
    let mut buf = Vec::new();
    // The gateway closes after its answer; a missing close_notify is fine here.
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
        .await
        .expect("closed by the header deadline");
    let (responses, _) = support::parse_responses(&buf);
    assert_eq!(responses.len(), 1, "{}", String::from_utf8_lossy(&buf));
    responses[0].assert_envelope(408);
}

/// An idle HTTPS/1.1 connection is parked like a plain one (the TLS session
/// kept with the socket) and serves its next request when woken.
#[tokio::test]
async fn an_idle_https_connection_is_parked_and_served_again() {
    use tokio::io::AsyncWriteExt;
    let backend = Backend::start().await;
    let (gw, ca, _dir) = https_gateway(&backend, "idle_timeout = \"3s\"").await;
    let mut s = tls_connect(gw.addr, "localhost", &ca.ca.cert_pem, &[b"http/1.1"])
        .await
        .unwrap();
    let request =
        format!("GET /api/status HTTP/1.1\r\nHost: localhost\r\nApi-Key: {IOS_KEY}\r\n\r\n");
    for round in 0..3 {
        s.write_all(request.as_bytes()).await.unwrap();
        let resp = read_tls_response(&mut s).await;
        assert_eq!(resp.status, 200, "round {round}: {}", resp.text());
        // Parked a second after the answer.
        let started = std::time::Instant::now();
        while gw.state.metrics().parked_connections.get() != 1 {
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "round {round}: not parked"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    assert_eq!(backend.count("/status"), 3);
}

/// Reads one HTTP/1.1 answer with a Content-Length from a TLS stream.
async fn read_tls_response(s: &mut TlsStream<TcpStream>) -> Resp {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(TIMEOUT, s.read(&mut chunk))
            .await
            .expect("answer in time")
            .unwrap();
        assert!(n > 0, "closed before a whole answer");
        buf.extend_from_slice(&chunk[..n]);
        let (mut responses, _) = support::parse_responses(&buf);
        if let Some(resp) = responses.pop() {
            return resp;
        }
    }
}

/// Over TLS too, a client that closes its sending side (close_notify and a
/// TCP half-close) right after a complete request gets the answer.
#[tokio::test]
async fn half_closed_tls_client_gets_its_answer() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let backend = Backend::start().await;
    let ca = DevCa::new("test CA").unwrap();
    let gw = tls_gateway(&backend, &ca.issue_server(&["localhost"]).unwrap()).await;
    let mut s = tls_connect(gw.gw.addr, "localhost", &ca.ca.cert_pem, &[b"http/1.1"])
        .await
        .unwrap();
    s.write_all(
        format!("GET /api/status HTTP/1.1\r\nHost: localhost\r\nApi-Key: {IOS_KEY}\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    s.shutdown().await.unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(TIMEOUT, s.read_to_end(&mut buf)).await;
    let text = String::from_utf8_lossy(&buf);
    assert!(text.starts_with("HTTP/1.1 200"), "{text:?}");
    assert_eq!(backend.count("/status"), 1);
}
