//! `portcullis demo`: the gateway and a small demo backend on loopback, with
//! an embedded configuration and a printed curl session to try.
//!
//! The demo backend behaves like a Django app behind django-proxy-server:
//! `/login`, `/renew_session`, `/logout`, a private profile, a public status,
//! a search endpoint that shows the encrypted parameter it received (and
//! decrypts it, as a backend would), and an endpoint that fails with an HTML
//! debug page.

use crate::body::Body;
use crate::config::Config;
use crate::crypto::{self, Keyring};
use crate::gateway::State;
use crate::secret::Secret;
use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::json;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tokio::net::TcpListener;

/// The API key devices use in the demo.
pub const DEMO_API_KEY: &str = "demo-key";

/// The demo backend's state: issued tokens → user email.
#[derive(Default)]
struct DemoBackend {
    tokens: Mutex<HashMap<String, String>>,
    keyring: Option<Keyring>,
}

/// The embedded demo configuration for a backend at `backend` with AES key `key_b64`.
pub fn demo_config(listen: SocketAddr, backend: SocketAddr, key_b64: &str) -> String {
    format!(
        r#"
[server]
listen = "{listen}"

[backend]
url = "http://{backend}"
api_key = "demo-backend-credential"
connect_timeout = "1s"
timeout = "5s"

[[api_keys]]
name = "demo-app"
key = "{DEMO_API_KEY}"

[sessions]
max_ttl = "1h"
negative_ttl = "10s"
logout_path = "/logout"

[crypto]
active_key = 1
keys = [{{ id = 1, key = "{key_b64}" }}]

[[routes]]
path = "/api/profile"
methods = ["GET"]
backend_path = "/profile"

[[routes]]
path = "/api/status"
methods = ["GET"]
backend_path = "/status"
public = true

[[routes]]
path = "/api/search"
methods = ["GET"]
backend_path = "/search"
encrypt_query = ["username"]

[[routes]]
path = "/api/orders/{{id}}"
methods = ["GET", "PUT"]
backend_path = "/orders/{{id}}"
json_body = true

[[routes]]
path = "/api/boom"
methods = ["GET"]
backend_path = "/boom"
public = true
"#
    )
}

fn json_response(status: StatusCode, value: serde_json::Value) -> Response<Body> {
    let mut resp = Response::new(Body::full(value.to_string()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    resp
}

fn expiration_in(d: Duration) -> String {
    let t = SystemTime::now() + d;
    // "YYYY-MM-DDTHH:MM:SSZ" → "YYYY-MM-DD HH:MM:SS", the django-proxy-server format.
    humantime::format_rfc3339_seconds(t)
        .to_string()
        .replace('T', " ")
        .trim_end_matches('Z')
        .to_owned()
}

impl DemoBackend {
    fn user_of(&self, req: &Request<Incoming>) -> Option<String> {
        let token = req.headers().get("user-token")?.to_str().ok()?;
        self.tokens.lock().ok()?.get(token).cloned()
    }

    async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        let path = req.uri().path().to_owned();
        let method = req.method().clone();
        match (method, path.as_str()) {
            (Method::POST, "/login") => {
                let body = req
                    .into_body()
                    .collect()
                    .await
                    .map(|c| c.to_bytes())
                    .unwrap_or_default();
                let creds: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                let email = creds
                    .get("email")
                    .and_then(|e| e.as_str())
                    .unwrap_or_default();
                let password = creds
                    .get("password")
                    .and_then(|e| e.as_str())
                    .unwrap_or_default();
                if password != "demo" {
                    return json_response(
                        StatusCode::UNAUTHORIZED,
                        json!({"error": {"code": 401, "type": "AuthenticationFailed", "message": "Invalid email or password"}}),
                    );
                }
                let token = format!("{:032x}", fastrand::u128(..));
                if let Ok(mut t) = self.tokens.lock() {
                    t.insert(token.clone(), email.to_owned());
                }
                json_response(
                    StatusCode::OK,
                    json!({
                        "user-token": token,
                        "expiration-date": expiration_in(Duration::from_secs(3600)),
                        "response": {
                            "email": email,
                            "name": "Demo User",
                            "is_active": true,
                            "is_staff": email.starts_with("staff"),
                            "is_superuser": false
                        }
                    }),
                )
            }
            (Method::POST, "/renew_session") => match self.user_of(&req) {
                Some(_) => json_response(
                    StatusCode::OK,
                    json!({"expiration-date": expiration_in(Duration::from_secs(3600))}),
                ),
                None => json_response(
                    StatusCode::FORBIDDEN,
                    json!({"error": {"code": 403, "type": "SessionError", "message": "Session expired"}}),
                ),
            },
            (Method::POST, "/logout") => {
                if let Some(token) = req
                    .headers()
                    .get("user-token")
                    .and_then(|t| t.to_str().ok())
                {
                    if let Ok(mut t) = self.tokens.lock() {
                        t.remove(token);
                    }
                }
                json_response(StatusCode::OK, json!({"logged_out": true}))
            }
            (Method::GET, "/profile") => {
                let header = |n: &str| {
                    req.headers()
                        .get(n)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_owned()
                };
                json_response(
                    StatusCode::OK,
                    json!({
                        "email": self.user_of(&req),
                        "seen_by_backend": {
                            "api-client": header("api-client"),
                            "client-ip": header("client-ip"),
                            "x-request-id": header("x-request-id"),
                        }
                    }),
                )
            }
            (Method::GET, "/status") => json_response(StatusCode::OK, json!({"status": "ok"})),
            (Method::GET, "/search") => {
                let query = req.uri().query().unwrap_or_default().to_owned();
                let encrypted = query
                    .split('&')
                    .find_map(|p| p.strip_prefix("username="))
                    .unwrap_or_default()
                    .to_owned();
                let decrypted = self
                    .keyring
                    .as_ref()
                    .and_then(|k| k.decrypt("username", &encrypted).ok())
                    .map(|v| String::from_utf8_lossy(&v).into_owned());
                json_response(
                    StatusCode::OK,
                    json!({"query_received": query, "username_decrypted_by_backend": decrypted}),
                )
            }
            (_, p) if p.starts_with("/orders/") => json_response(
                StatusCode::OK,
                json!({"order": &p["/orders/".len()..], "status": "shipped"}),
            ),
            (Method::GET, "/boom") => {
                let mut resp = Response::new(Body::full(Bytes::from_static(
                    b"<html><body><h1>Server Error</h1><pre>Traceback (most recent call last):\n  File \"/srv/app/views.py\", line 42</pre></body></html>",
                )));
                *resp.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
                resp.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static("text/html"),
                );
                resp
            }
            _ => json_response(
                StatusCode::NOT_FOUND,
                json!({"error": {"code": 404, "type": "NotFound", "message": "No such view"}}),
            ),
        }
    }
}

async fn serve_backend(listener: TcpListener, backend: Arc<DemoBackend>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let backend = Arc::clone(&backend);
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let backend = Arc::clone(&backend);
                async move { Ok::<_, std::convert::Infallible>(backend.handle(req).await) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn curl_session(gw: SocketAddr, ca: Option<&std::path::Path>) -> String {
    let (base, curl) = match ca {
        Some(ca) => (
            format!("https://localhost:{}", gw.port()),
            format!("curl --cacert {}", ca.display()),
        ),
        None => (format!("http://{gw}"), "curl".to_owned()),
    };
    let k = DEMO_API_KEY;
    let session = format!(
        r#"
portcullis demo: gateway on {base}, demo backend behind it. Try (copy-paste into a shell):

  # 1. log in: the gateway forwards the credentials to the backend and caches the session
  TOKEN=$(curl -s -X POST {base}/login -H 'Api-Key: {k}' -H 'Content-Type: application/json' \
      -d '{{"email": "demo@example.com", "password": "demo"}}' | sed -E 's/.*"user-token": ?"([^"]+)".*/\1/'); echo "token: $TOKEN"

  # 2. a private route with the token (the backend sees api-client, client-ip, x-request-id set by the gateway)
  curl -s {base}/api/profile -H 'Api-Key: {k}' -H "User-Token: $TOKEN"; echo

  # 3. a public route refuses a token (400), and takes the request without one
  curl -s {base}/api/status -H 'Api-Key: {k}' -H "User-Token: $TOKEN"; echo
  curl -s {base}/api/status -H 'Api-Key: {k}'; echo

  # 4. an encrypted parameter: the backend receives username AES-256-GCM encrypted, page as is
  curl -s '{base}/api/search?username=alice&page=2' -H 'Api-Key: {k}' -H "User-Token: $TOKEN"; echo

  # 5. errors are one JSON envelope: a wrong key, an unknown path, a backend HTML 500
  curl -s {base}/api/status -H 'Api-Key: wrong'; echo
  curl -s {base}/api/nothing-here -H 'Api-Key: {k}'; echo
  curl -s {base}/api/boom -H 'Api-Key: {k}'; echo

  # 6. log out (204), then the same token is refused (403 Token invalid)
  curl -s -o /dev/null -w '%{{http_code}}\n' -X POST {base}/logout -H 'Api-Key: {k}' -H "User-Token: $TOKEN"
  curl -s {base}/api/profile -H 'Api-Key: {k}' -H "User-Token: $TOKEN"; echo

Press Ctrl-C to stop.
"#
    );
    // Every command of the session goes through the same curl invocation.
    session.replace("curl -s", &format!("{curl} -s"))
}

/// Runs the demo until Ctrl-C / SIGTERM; over HTTPS with fresh development
/// certificates (in a temporary directory, removed on exit) when `tls`.
pub async fn run(tls: bool) -> std::io::Result<()> {
    let backend_listener = TcpListener::bind("127.0.0.1:0").await?;
    let backend_addr = backend_listener.local_addr()?;
    let gw_listener = match TcpListener::bind("127.0.0.1:8080").await {
        Ok(l) => l,
        Err(_) => TcpListener::bind("127.0.0.1:0").await?,
    };
    let gw_addr = gw_listener.local_addr()?;
    let key = crypto::generate_key();
    let mut text = demo_config(gw_addr, backend_addr, &key);
    let cert_dir = if tls {
        let dir = std::env::temp_dir().join(format!("portcullis-demo-{}", std::process::id()));
        let files = crate::dev::devcerts::write_dev_certs(&dir)?;
        text = text.replacen(
            "[server]\n",
            &format!(
                "[server]\ntls = {{ cert = {:?}, key = {:?} }}\n",
                files.server_cert, files.server_key
            ),
            1,
        );
        Some((dir, files.ca_cert))
    } else {
        None
    };
    let config = Config::parse(&text)
        .map_err(|p| std::io::Error::other(format!("embedded demo config invalid:\n{p}")))?;
    let backend = Arc::new(DemoBackend {
        tokens: Mutex::default(),
        keyring: crypto::decode_key(&Secret::new(key))
            .ok()
            .and_then(|k| Keyring::new(1, &[(1, k)])),
    });
    let state = State::new(config).map_err(|p| std::io::Error::other(p.join("; ")))?;
    let backend_task = tokio::spawn(serve_backend(backend_listener, backend));
    println!(
        "{}",
        curl_session(gw_addr, cert_dir.as_ref().map(|(_, ca)| ca.as_path()))
    );
    let result = crate::server::serve(gw_listener, state, crate::server::shutdown_signal()).await;
    backend_task.abort();
    if let Some((dir, _)) = cert_dir {
        let _ = std::fs::remove_dir_all(dir);
    }
    result
}
