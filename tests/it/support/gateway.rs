//! The in-process gateway: a [`GatewayConfig`] builder rendered to TOML and
//! parsed with `Config::parse`, served on an ephemeral loopback port; and the
//! keys every test configuration holds.

use super::backend::Backend;
use super::client::Req;
use super::{sha256_hex, TIMEOUT};
use portcullis::config::Config;
use portcullis::crypto::{self, Keyring};
use portcullis::gateway::State;
use portcullis::secret::Secret;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// The device API key `ios-app` (configured in plain text).
pub const IOS_KEY: &str = "ios-key-0123456789";
/// The device API key `android-app` (configured as its `sha256:` digest).
pub const ANDROID_KEY: &str = "android-key-9876543210";
/// The gateway's own credential towards the backend.
pub const BACKEND_CREDENTIAL: &str = "gateway-backend-credential";
/// The active parameter-encryption key (id 3).
pub const ACTIVE_KEY_B64: &str = "AwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwM=";
/// An older key kept for decryption (id 7, the key of the reference test vector).
pub const OLD_KEY_B64: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

/// The keyring a backend would hold for the test gateway's keys.
pub fn backend_keyring() -> Keyring {
    let k3 = crypto::decode_key(&Secret::new(ACTIVE_KEY_B64)).expect("active key");
    let k7 = crypto::decode_key(&Secret::new(OLD_KEY_B64)).expect("old key");
    Keyring::new(3, &[(3, k3), (7, k7)]).expect("keyring")
}

/// A gateway configuration, rendered to TOML and parsed with `Config::parse`.
#[derive(Clone)]
pub struct GatewayConfig {
    pub backend_url: String,
    pub server: Vec<String>,
    pub backend: Vec<String>,
    pub sessions: Vec<String>,
    pub limits: Vec<String>,
    pub routes: Vec<String>,
    pub default_routes: bool,
    /// Raw TOML appended at the end (e.g. a `[rate_limits]` table).
    pub extra: Vec<String>,
}

/// The routes most tests use. Backend paths differ from device paths so a
/// test can see the rewrite.
pub const DEFAULT_ROUTES: &[&str] = &[
    r#"path = "/api/status"
methods = ["GET"]
backend_path = "/status"
public = true"#,
    r#"path = "/api/public/{*rest}"
methods = ["GET"]
backend_path = "/public/{rest}"
public = true"#,
    r#"path = "/api/profile"
methods = ["GET", "POST"]
backend_path = "/profile""#,
    r#"path = "/api/orders/{id}"
methods = ["GET", "PUT", "POST"]
backend_path = "/orders/{id}"
json_body = true"#,
    r#"path = "/api/search"
methods = ["GET"]
backend_path = "/search"
encrypt_query = ["username", "email"]"#,
    r#"path = "/api/upload"
methods = ["POST", "PUT"]
backend_path = "/upload"
public = true
max_body = "4KiB""#,
    r#"path = "/api/slow"
methods = ["GET"]
backend_path = "/slow"
public = true
timeout = "300ms""#,
    r#"path = "/api/echo"
methods = ["GET", "POST"]
backend_path = "/echo"
public = true"#,
];

impl GatewayConfig {
    pub fn new(backend_url: impl Into<String>) -> GatewayConfig {
        GatewayConfig {
            backend_url: backend_url.into(),
            server: Vec::new(),
            backend: Vec::new(),
            sessions: Vec::new(),
            limits: Vec::new(),
            routes: Vec::new(),
            default_routes: true,
            extra: Vec::new(),
        }
    }

    /// Adds a `key = value` line to `[server]`.
    pub fn server(mut self, line: &str) -> Self {
        self.server.push(line.to_owned());
        self
    }

    /// Adds a `key = value` line to `[backend]`.
    pub fn backend(mut self, line: &str) -> Self {
        self.backend.push(line.to_owned());
        self
    }

    /// Adds a `key = value` line to `[sessions]`.
    pub fn sessions(mut self, line: &str) -> Self {
        self.sessions.push(line.to_owned());
        self
    }

    /// Adds a `key = value` line to `[limits]`.
    pub fn limits(mut self, line: &str) -> Self {
        self.limits.push(line.to_owned());
        self
    }

    /// Adds a `[[routes]]` entry (its body lines).
    pub fn route(mut self, body: &str) -> Self {
        self.routes.push(body.to_owned());
        self
    }

    /// Appends raw TOML after everything else.
    pub fn extra(mut self, toml: &str) -> Self {
        self.extra.push(toml.to_owned());
        self
    }

    pub fn without_default_routes(mut self) -> Self {
        self.default_routes = false;
        self
    }

    /// The TOML text, listening on `listen`.
    pub fn toml(&self, listen: SocketAddr) -> String {
        let android_digest = sha256_hex(ANDROID_KEY.as_bytes());
        let mut t = format!("[server]\nlisten = \"{listen}\"\n");
        // The tests exercise HTTP/2 prior knowledge on the plain listener too.
        let server_defaults = [
            ("drain_timeout", "\"2s\""),
            ("h2c", "true"),
            ("access_log", "\"off\""),
        ];
        push_lines(&mut t, &self.server, &server_defaults);
        t.push_str(&format!(
            "\n[backend]\nurl = \"{}\"\napi_key = \"{BACKEND_CREDENTIAL}\"\n",
            self.backend_url
        ));
        let backend_defaults = [("connect_timeout", "\"300ms\""), ("timeout", "\"5s\"")];
        push_lines(&mut t, &self.backend, &backend_defaults);
        t.push_str(&format!(
            "\n[[api_keys]]\nname = \"ios-app\"\nkey = \"{IOS_KEY}\"\n\n[[api_keys]]\nname = \"android-app\"\nkey = \"sha256:{android_digest}\"\n"
        ));
        t.push_str("\n[sessions]\n");
        push_lines(&mut t, &self.sessions, &[("negative_ttl", "\"10s\"")]);
        t.push_str(&format!(
            "\n[crypto]\nactive_key = 3\nkeys = [{{ id = 3, key = \"{ACTIVE_KEY_B64}\" }}, {{ id = 7, key = \"{OLD_KEY_B64}\" }}]\n"
        ));
        t.push_str("\n[limits]\n");
        push_lines(&mut t, &self.limits, &[]);
        let defaults = if self.default_routes {
            DEFAULT_ROUTES
        } else {
            &[]
        };
        for r in defaults
            .iter()
            .copied()
            .chain(self.routes.iter().map(String::as_str))
        {
            t.push_str("\n[[routes]]\n");
            t.push_str(r);
            t.push('\n');
        }
        for e in &self.extra {
            t.push('\n');
            t.push_str(e);
            t.push('\n');
        }
        t
    }

    /// Parses the config and serves it in-process on an ephemeral port.
    pub async fn start(&self) -> Gateway {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind gateway");
        let addr = listener.local_addr().expect("gateway addr");
        let text = self.toml(addr);
        let config = match Config::parse(&text) {
            Ok(c) => c,
            Err(p) => panic!("test config invalid:\n{p}\n{text}"),
        };
        let state = State::new(config).unwrap_or_else(|p| panic!("state: {p:?}"));
        Gateway::serve(listener, state)
    }
}

/// Appends `lines` to `t`, each `(key, value)` of `defaults` first unless a
/// line sets that key.
fn push_lines(t: &mut String, lines: &[String], defaults: &[(&str, &str)]) {
    for (key, value) in defaults {
        if !lines.iter().any(|l| l.starts_with(key)) {
            t.push_str(&format!("{key} = {value}\n"));
        }
    }
    for l in lines {
        t.push_str(l);
        t.push('\n');
    }
}

/// A gateway serving in this process.
pub struct Gateway {
    pub addr: SocketAddr,
    pub state: Arc<State>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<std::io::Result<()>>>,
}

impl Gateway {
    /// Serves `state` on `listener` in this process until stopped or dropped.
    pub fn serve(listener: TcpListener, state: Arc<State>) -> Gateway {
        let addr = listener.local_addr().expect("gateway addr");
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(portcullis::server::serve(
            listener,
            Arc::clone(&state),
            async move {
                let _ = rx.await;
            },
        ));
        Gateway {
            addr,
            state,
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    /// Starts a gateway in front of `backend` with the default routes.
    pub async fn for_backend(backend: &Backend) -> Gateway {
        GatewayConfig::new(backend.url()).start().await
    }

    /// Triggers graceful shutdown without waiting.
    pub fn trigger_shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }

    /// Triggers graceful shutdown and waits for `serve` to return.
    pub async fn stop(mut self) {
        self.trigger_shutdown();
        if let Some(task) = self.task.take() {
            let r = tokio::time::timeout(TIMEOUT, task)
                .await
                .expect("gateway stops in time");
            r.expect("serve task").expect("serve result");
        }
    }

    /// Waits for `serve` to return after a triggered shutdown.
    pub async fn join(&mut self) -> std::io::Result<()> {
        let task = self.task.take().expect("gateway running");
        tokio::time::timeout(TIMEOUT, task)
            .await
            .expect("gateway stops in time")
            .expect("serve task")
    }

    /// A request builder for this gateway.
    pub fn req(&self, method: &str, path: &str) -> Req {
        Req::new(self.addr, method, path)
    }

    /// A GET with the `ios-app` API key.
    pub fn get(&self, path: &str) -> Req {
        self.req("GET", path).api_key(IOS_KEY)
    }

    /// Sends `times` GETs of `path` with the `ios-app` key and session
    /// `token`, one after another, and asserts each is answered 200.
    pub async fn assert_served(&self, path: &str, token: &str, times: usize) {
        for i in 0..times {
            let r = self.get(path).token(token).send().await;
            assert_eq!(r.status, 200, "request {i}: {}", r.text());
        }
    }

    /// A POST with the `ios-app` API key.
    pub fn post(&self, path: &str) -> Req {
        self.req("POST", path).api_key(IOS_KEY)
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.trigger_shutdown();
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

/// A public route to the backend's `/download`, for large answers.
pub const DOWNLOAD_ROUTE: &str = r#"path = "/api/download"
methods = ["GET"]
backend_path = "/download"
public = true"#;
