//! Configuration: raw serde structs (unknown keys rejected) validated into typed
//! values. Validation reports every problem at once; `portcullis check` prints
//! them and exits 64.

use crate::secret::{self, Matcher, Secret};
use http::{HeaderValue, Method};
use ipnet::IpNet;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

/// Every problem found in a configuration, one line each.
#[derive(Debug, Default)]
pub struct Problems(pub Vec<String>);

impl Problems {
    /// Records a problem at `at` (a dotted key path).
    pub fn push(&mut self, at: impl AsRef<str>, msg: impl AsRef<str>) {
        self.0.push(format!("{}: {}", at.as_ref(), msg.as_ref()));
    }
}

impl std::fmt::Display for Problems {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for p in &self.0 {
            writeln!(f, "  - {p}")?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------- raw shape

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    server: RawServer,
    backend: Option<RawBackend>,
    #[serde(default)]
    api_keys: Vec<RawApiKey>,
    #[serde(default)]
    sessions: RawSessions,
    crypto: Option<RawCrypto>,
    #[serde(default)]
    routes: Vec<RawRoute>,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    rate_limits: RawRateLimits,
    #[serde(default)]
    operators: Vec<RawOperator>,
    commands: Option<crate::commands::config::RawCommands>,
    cluster: Option<crate::cluster::config::RawCluster>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: Option<String>,
    tls: Option<RawTls>,
    admin_listen: Option<String>,
    #[serde(default)]
    trusted_proxies: Vec<String>,
    max_body: Option<RawSize>,
    error_type: Option<String>,
    server_header: Option<String>,
    drain_timeout: Option<String>,
    access_log: Option<String>,
    #[serde(default)]
    h2c: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert: String,
    key: String,
    ocsp: Option<String>,
    reload_interval: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackend {
    url: String,
    api_key: Option<String>,
    connect_timeout: Option<String>,
    timeout: Option<String>,
    max_connections: Option<usize>,
    max_idle: Option<usize>,
    // TLS towards https:// backends (see `tls::BackendTls`).
    ca: Option<String>,
    client_cert: Option<String>,
    client_key: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawApiKey {
    name: String,
    key: String,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawSessions {
    validate_method: Option<String>,
    validate_path: Option<String>,
    login_path: Option<String>,
    logout_path: Option<String>,
    max_entries: Option<u64>,
    max_ttl: Option<String>,
    negative_ttl: Option<String>,
    stale_if_error: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCrypto {
    active_key: u8,
    keys: Vec<RawKey>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKey {
    id: u8,
    key: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    path: String,
    methods: Vec<String>,
    backend_path: Option<String>,
    #[serde(default)]
    public: bool,
    #[serde(default)]
    encrypt_query: Vec<String>,
    timeout: Option<String>,
    max_body: Option<RawSize>,
    #[serde(default)]
    stream_request_body: bool,
    #[serde(default)]
    json_body: bool,
    rate_limit: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_header_bytes: Option<RawSize>,
    max_headers: Option<usize>,
    header_read_timeout: Option<String>,
    body_read_timeout: Option<String>,
    send_timeout: Option<String>,
    response_buffer: Option<RawSize>,
    response_buffer_total: Option<RawSize>,
    idle_timeout: Option<String>,
    max_connections: Option<usize>,
    h2_max_concurrent_streams: Option<u32>,
    tls_handshake_timeout: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawRateLimits {
    per_api_key: Option<String>,
    per_client_ip: Option<String>,
    login: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOperator {
    name: String,
    token: String,
    commands: Option<Vec<String>>,
}

/// A size written as an integer (bytes) or a string such as `"1MiB"`.
#[derive(Deserialize, Clone)]
#[serde(untagged)]
enum RawSize {
    Bytes(u64),
    Text(String),
}

// ---------------------------------------------------------------- typed config

/// The validated configuration the gateway runs with.
#[derive(Debug)]
pub struct Config {
    pub server: ServerConfig,
    pub backend: BackendConfig,
    pub api_keys: Vec<ApiKey>,
    pub sessions: SessionsConfig,
    pub crypto: Option<CryptoConfig>,
    pub routes: Vec<RouteConfig>,
    pub limits: Limits,
    pub rate_limits: RateLimits,
    pub operators: Vec<Operator>,
    /// `[commands]`: remote operations, off when absent.
    pub commands: Option<crate::commands::config::CommandsConfig>,
    /// `[cluster]`: instances sharing state through Redis, off when absent.
    pub cluster: Option<crate::cluster::config::ClusterConfig>,
    /// Accepted settings this build does not act on yet; logged at start-up.
    pub warnings: Vec<String>,
}

/// `[server]`.
#[derive(Debug)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// `server.tls`: serve HTTPS with these files (validated at load).
    pub tls: Option<crate::tls::TlsFiles>,
    pub admin_listen: Option<SocketAddr>,
    pub trusted_proxies: Vec<IpNet>,
    pub max_body: u64,
    pub error_type: String,
    pub server_header: HeaderValue,
    pub drain_timeout: Duration,
    pub access_log: crate::access_log::Target,
    /// Serve HTTP/2 with prior knowledge (h2c) on a plain listener.
    pub h2c: bool,
}

/// `[backend]`: where exposed routes are forwarded.
#[derive(Debug)]
pub struct BackendConfig {
    /// `host:port` to connect to.
    pub address: String,
    /// Value of the `Host` header sent upstream.
    pub host_header: HeaderValue,
    /// The gateway's own credential, sent as `api-key`.
    pub api_key: Option<Secret>,
    pub connect_timeout: Duration,
    pub timeout: Duration,
    pub max_connections: usize,
    pub max_idle: usize,
    /// Set for `https://` backends: trust roots, client certificate, SNI name.
    pub tls: Option<crate::tls::BackendTls>,
}

/// One `[[api_keys]]` entry.
#[derive(Debug)]
pub struct ApiKey {
    pub name: String,
    pub header_value: HeaderValue,
    pub matcher: Matcher,
}

/// `[sessions]`.
#[derive(Debug, Clone)]
pub struct SessionsConfig {
    pub validate_method: Method,
    pub validate_path: String,
    pub login_path: String,
    pub logout_path: Option<String>,
    pub max_entries: u64,
    pub max_ttl: Duration,
    pub negative_ttl: Duration,
    pub stale_if_error: Option<Duration>,
}

/// `[crypto]`: AES-256-GCM keys for encrypted query parameters.
#[derive(Debug)]
pub struct CryptoConfig {
    pub active_key: u8,
    pub keys: Vec<(u8, Secret)>,
}

/// Which query parameters of a route are encrypted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EncryptQuery {
    None,
    All,
    Names(Vec<String>),
}

impl EncryptQuery {
    /// Whether parameter `name` is encrypted on this route.
    pub fn covers(&self, name: &str) -> bool {
        match self {
            EncryptQuery::None => false,
            EncryptQuery::All => true,
            EncryptQuery::Names(names) => names.iter().any(|n| n == name),
        }
    }
}

/// One `[[routes]]` entry.
#[derive(Debug, Clone)]
pub struct RouteConfig {
    pub path: String,
    pub methods: Vec<Method>,
    pub backend_path: String,
    pub public: bool,
    pub encrypt_query: EncryptQuery,
    pub timeout: Option<Duration>,
    pub max_body: Option<u64>,
    pub stream_request_body: bool,
    pub json_body: bool,
    pub rate_limit: Option<Rate>,
}

/// `[limits]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    pub max_header_bytes: usize,
    pub max_headers: usize,
    pub header_read_timeout: Duration,
    pub body_read_timeout: Duration,
    /// A device that accepts none of an answer's bytes for this long is
    /// disconnected (a slow reader would otherwise hold a backend connection).
    pub send_timeout: Duration,
    /// The most of one large backend answer read ahead of the device, so its
    /// backend connection is freed before a slow device has read it (0: off).
    pub response_buffer: u64,
    /// The most read ahead for all answers together.
    pub response_buffer_total: u64,
    pub idle_timeout: Duration,
    pub max_connections: usize,
    pub h2_max_concurrent_streams: u32,
    /// A TLS handshake not finished within this is dropped.
    pub tls_handshake_timeout: Duration,
}

/// A rate: `count` events per `per`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub count: u32,
    pub per: Duration,
}

/// `[rate_limits]`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RateLimits {
    pub per_api_key: Option<Rate>,
    pub per_client_ip: Option<Rate>,
    pub login: Option<Rate>,
}

/// One `[[operators]]` entry (remote operations).
#[derive(Debug)]
pub struct Operator {
    pub name: String,
    pub token: Matcher,
    pub commands: Option<Vec<String>>,
}

/// Methods a route may never expose.
const FORBIDDEN_METHODS: [&str; 2] = ["TRACE", "CONNECT"];

/// Parses a duration such as `"2s"`, `"12h"`, `"500ms"`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim()).map_err(|e| format!("invalid duration {s:?}: {e}"))
}

/// Parses a size such as `"1MiB"`, `"16KiB"`, `"100MB"` or `"512"` (bytes).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !c.is_ascii_digit() && c != '_')
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .replace('_', "")
        .parse()
        .map_err(|_| format!("invalid size {s:?}"))?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        other => return Err(format!("invalid size unit {other:?} in {s:?}")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("size {s:?} is too large"))
}

/// Parses a rate such as `"50/s"`, `"5/min"`, `"1000/h"`.
pub fn parse_rate(s: &str) -> Result<Rate, String> {
    let (count, unit) = s
        .split_once('/')
        .ok_or_else(|| format!("invalid rate {s:?}: expected N/s, N/min or N/h"))?;
    let count: u32 = count
        .trim()
        .parse()
        .map_err(|_| format!("invalid rate {s:?}"))?;
    let per = match unit.trim() {
        "s" | "sec" | "second" => Duration::from_secs(1),
        "m" | "min" | "minute" => Duration::from_secs(60),
        "h" | "hour" => Duration::from_secs(3600),
        other => return Err(format!("invalid rate unit {other:?} in {s:?}")),
    };
    if count == 0 {
        return Err(format!("rate {s:?} allows nothing"));
    }
    Ok(Rate { count, per })
}

fn size(raw: &Option<RawSize>, default: u64, at: &str, p: &mut Problems) -> u64 {
    match raw {
        None => default,
        Some(RawSize::Bytes(n)) => *n,
        Some(RawSize::Text(t)) => parse_size(t).unwrap_or_else(|e| {
            p.push(at, e);
            default
        }),
    }
}

fn duration(raw: &Option<String>, default: Duration, at: &str, p: &mut Problems) -> Duration {
    match raw {
        None => default,
        Some(t) => parse_duration(t).unwrap_or_else(|e| {
            p.push(at, e);
            default
        }),
    }
}

fn rate(raw: &Option<String>, at: &str, p: &mut Problems) -> Option<Rate> {
    raw.as_ref().and_then(|t| match parse_rate(t) {
        Ok(r) => Some(r),
        Err(e) => {
            p.push(at, e);
            None
        }
    })
}

fn backend_path_ok(path: &str) -> bool {
    path.starts_with('/') && !path.contains(['?', '#', ' ']) && !path.split('/').any(|s| s == "..")
}

impl Config {
    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<Config, Problems> {
        match std::fs::read_to_string(path) {
            Ok(text) => Config::parse(&text),
            Err(e) => Err(Problems(vec![format!("{}: {e}", path.display())])),
        }
    }

    /// Parses and validates configuration text.
    pub fn parse(text: &str) -> Result<Config, Problems> {
        let raw: RawConfig = match toml::from_str(text) {
            Ok(raw) => raw,
            Err(e) => return Err(Problems(vec![e.to_string().trim().to_owned()])),
        };
        let mut p = Problems::default();
        let mut warnings = Vec::new();
        let cfg = validate(raw, &mut p, &mut warnings);
        if p.0.is_empty() {
            cfg.ok_or(p)
        } else {
            Err(p)
        }
    }
}

fn validate(raw: RawConfig, p: &mut Problems, warnings: &mut Vec<String>) -> Option<Config> {
    let server = validate_server(&raw.server, p);
    let backend = match &raw.backend {
        Some(b) => validate_backend(b, p),
        None => {
            p.push(
                "backend",
                "missing [backend] section (backend.url is required)",
            );
            None
        }
    };

    let mut api_keys = Vec::new();
    for (i, k) in raw.api_keys.iter().enumerate() {
        let at = format!("api_keys[{i}]");
        let header_value = match HeaderValue::from_str(&k.name) {
            Ok(v) if !k.name.is_empty() => Some(v),
            _ => {
                p.push(format!("{at}.name"), "must be non-empty printable ASCII");
                None
            }
        };
        if api_keys.iter().any(|a: &ApiKey| a.name == k.name) {
            p.push(
                format!("{at}.name"),
                format!("duplicate key name {:?}", k.name),
            );
        }
        let matcher = secret::resolve(&k.key).and_then(|s| Matcher::from_secret(&s));
        match (header_value, matcher) {
            (Some(header_value), Ok(matcher)) => api_keys.push(ApiKey {
                name: k.name.clone(),
                header_value,
                matcher,
            }),
            (_, Err(e)) => p.push(format!("{at}.key"), e),
            _ => {}
        }
    }
    if raw.api_keys.is_empty() {
        p.push(
            "api_keys",
            "no [[api_keys]] configured: no device could call the gateway",
        );
    }

    let sessions = validate_sessions(&raw.sessions, p);
    let crypto = raw.crypto.as_ref().and_then(|c| validate_crypto(c, p));

    let mut routes = Vec::new();
    for (i, r) in raw.routes.iter().enumerate() {
        if let Some(route) = validate_route(r, &format!("routes[{i}]"), crypto.is_some(), p) {
            routes.push(route);
        }
    }
    if raw.routes.is_empty() {
        warnings.push("no [[routes]] configured: only /login and /logout are exposed".into());
    }

    let limits = RawLimits::validate(&raw.limits, p);
    let rate_limits = RateLimits {
        per_api_key: rate(&raw.rate_limits.per_api_key, "rate_limits.per_api_key", p),
        per_client_ip: rate(
            &raw.rate_limits.per_client_ip,
            "rate_limits.per_client_ip",
            p,
        ),
        login: rate(&raw.rate_limits.login, "rate_limits.login", p),
    };

    let mut operators = Vec::new();
    for (i, o) in raw.operators.iter().enumerate() {
        let at = format!("operators[{i}]");
        if o.name.is_empty() || o.name == "scheduler" {
            p.push(
                format!("{at}.name"),
                "must be non-empty and not \"scheduler\"",
            );
        }
        match secret::resolve(&o.token).and_then(|s| Matcher::from_secret(&s)) {
            Ok(token) => operators.push(Operator {
                name: o.name.clone(),
                token,
                commands: o.commands.clone(),
            }),
            Err(e) => p.push(format!("{at}.token"), e),
        }
    }
    // commands: [commands] validation (remote operations).
    let commands = raw
        .commands
        .as_ref()
        .and_then(|c| crate::commands::config::validate(c, p));
    if let Some(c) = &commands {
        if operators.is_empty() {
            warnings
                .push("[commands] is configured but no [[operators]]: only schedules run".into());
        }
        for (i, o) in operators.iter().enumerate() {
            for (j, name) in o.commands.iter().flatten().enumerate() {
                if !c.allowed(name) {
                    p.push(
                        format!("operators[{i}].commands[{j}]"),
                        format!("{name:?} is not a command that may run under [commands]"),
                    );
                }
            }
        }
    } else if !raw.operators.is_empty() {
        warnings
            .push("[[operators]] are configured but [commands] is not: /__manage__ is off".into());
    }

    let cluster = raw
        .cluster
        .as_ref()
        .and_then(|c| crate::cluster::config::validate(c, p));
    if raw.cluster.is_some() && raw.commands.is_some() {
        p.push(
            "cluster",
            "[commands] cannot be combined with [cluster] yet: remote operations would not be shared between instances",
        );
    }

    Some(Config {
        server: server?,
        backend: backend?,
        api_keys,
        sessions: sessions?,
        crypto,
        routes,
        limits,
        rate_limits,
        operators,
        commands,
        cluster,
        warnings: std::mem::take(warnings),
    })
}

fn validate_server(s: &RawServer, p: &mut Problems) -> Option<ServerConfig> {
    let listen = s.listen.as_deref().unwrap_or("0.0.0.0:8080");
    let listen = match listen.parse::<SocketAddr>() {
        Ok(a) => Some(a),
        Err(_) => {
            p.push("server.listen", format!("invalid address {listen:?}"));
            None
        }
    };
    let admin_listen = s.admin_listen.as_ref().and_then(|a| match a.parse() {
        Ok(a) => Some(a),
        Err(_) => {
            p.push("server.admin_listen", format!("invalid address {a:?}"));
            None
        }
    });
    let tls = s.tls.as_ref().and_then(|t| validate_server_tls(t, p));
    let mut trusted_proxies = Vec::new();
    for (i, t) in s.trusted_proxies.iter().enumerate() {
        let parsed = t
            .parse::<IpNet>()
            .or_else(|_| t.parse::<std::net::IpAddr>().map(IpNet::from));
        match parsed {
            Ok(net) => trusted_proxies.push(net),
            Err(_) => p.push(
                format!("server.trusted_proxies[{i}]"),
                format!("invalid address or CIDR {t:?}"),
            ),
        }
    }
    let max_body = size(&s.max_body, 1 << 20, "server.max_body", p);
    let error_type = s
        .error_type
        .clone()
        .unwrap_or_else(|| "ProxyServerError".into());
    let server_header = s.server_header.as_deref().unwrap_or("portcullis");
    let server_header = match HeaderValue::from_str(server_header) {
        Ok(v) => Some(v),
        Err(_) => {
            p.push("server.server_header", "must be printable ASCII");
            None
        }
    };
    let drain_timeout = duration(
        &s.drain_timeout,
        Duration::from_secs(30),
        "server.drain_timeout",
        p,
    );
    let access_log = match s.access_log.as_deref() {
        None | Some("stdout") => crate::access_log::Target::Stdout,
        Some("off") => crate::access_log::Target::Off,
        Some(path) if !path.is_empty() => crate::access_log::Target::File(path.into()),
        Some(_) => {
            p.push(
                "server.access_log",
                "must be \"stdout\", \"off\" or a file path",
            );
            crate::access_log::Target::Off
        }
    };
    Some(ServerConfig {
        h2c: s.h2c,
        access_log,
        listen: listen?,
        tls,
        admin_listen,
        trusted_proxies,
        max_body,
        error_type,
        server_header: server_header?,
        drain_timeout,
    })
}

// ---------------------------------------------------------------- TLS (server.tls, backend https)

fn validate_server_tls(t: &RawTls, p: &mut Problems) -> Option<crate::tls::TlsFiles> {
    let reload_interval = duration(
        &t.reload_interval,
        Duration::from_secs(5),
        "server.tls.reload_interval",
        p,
    );
    let files = crate::tls::TlsFiles {
        cert: t.cert.clone().into(),
        key: t.key.clone().into(),
        ocsp: t.ocsp.clone().map(Into::into),
        reload_interval,
    };
    match crate::tls::load_server_key(&files) {
        Ok(_) => Some(files),
        Err(e) => {
            p.push("server.tls", e);
            None
        }
    }
}

fn validate_backend_tls(
    b: &RawBackend,
    https: bool,
    host: &str,
    p: &mut Problems,
) -> Option<crate::tls::BackendTls> {
    if !https {
        for (key, set) in [
            ("backend.ca", b.ca.is_some()),
            ("backend.client_cert", b.client_cert.is_some()),
            ("backend.client_key", b.client_key.is_some()),
        ] {
            if set {
                p.push(key, "only meaningful with an https:// backend.url");
            }
        }
        return None;
    }
    let client = match (&b.client_cert, &b.client_key) {
        (Some(c), Some(k)) => Some((Path::new(c.as_str()), Path::new(k.as_str()))),
        (None, None) => None,
        _ => {
            p.push(
                "backend.client_cert",
                "client_cert and client_key go together",
            );
            return None;
        }
    };
    let ca = b.ca.as_deref().map(Path::new);
    match crate::tls::BackendTls::new(host, ca, client) {
        Ok(t) => Some(t),
        Err(e) => {
            p.push("backend", e);
            None
        }
    }
}

fn validate_backend(b: &RawBackend, p: &mut Problems) -> Option<BackendConfig> {
    let uri = match b.url.parse::<http::Uri>() {
        Ok(u) => u,
        Err(e) => {
            p.push("backend.url", format!("invalid URL {:?}: {e}", b.url));
            return None;
        }
    };
    let https = match uri.scheme_str() {
        Some("http") => false,
        Some("https") => true,
        _ => {
            p.push("backend.url", "must start with http:// or https://");
            false
        }
    };
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        p.push(
            "backend.url",
            "must not carry a path or query (use routes[].backend_path)",
        );
    }
    let authority = uri.authority()?;
    let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
    let host = authority.host();
    let tls = validate_backend_tls(b, https, host, p);
    let address = format!("{}:{port}", host);
    let host_header = HeaderValue::from_str(authority.as_str()).ok()?;
    let api_key = match &b.api_key {
        None => None,
        Some(spec) => match secret::resolve(spec) {
            Ok(s) if HeaderValue::from_bytes(s.expose()).is_ok() => Some(s),
            Ok(_) => {
                p.push("backend.api_key", "must be printable ASCII");
                None
            }
            Err(e) => {
                p.push("backend.api_key", e);
                None
            }
        },
    };
    Some(BackendConfig {
        address,
        host_header,
        api_key,
        connect_timeout: duration(
            &b.connect_timeout,
            Duration::from_secs(2),
            "backend.connect_timeout",
            p,
        ),
        timeout: duration(&b.timeout, Duration::from_secs(15), "backend.timeout", p),
        max_connections: b.max_connections.unwrap_or(512).max(1),
        max_idle: b.max_idle.unwrap_or(256),
        tls,
    })
}

fn validate_sessions(s: &RawSessions, p: &mut Problems) -> Option<SessionsConfig> {
    let method = s.validate_method.as_deref().unwrap_or("POST");
    let validate_method = match Method::from_bytes(method.as_bytes()) {
        Ok(m) => Some(m),
        Err(_) => {
            p.push(
                "sessions.validate_method",
                format!("invalid method {method:?}"),
            );
            None
        }
    };
    let mut path = |key: &str, v: Option<&str>, default: &str| -> String {
        let v = v.unwrap_or(default);
        if !backend_path_ok(v) {
            p.push(
                format!("sessions.{key}"),
                format!("invalid backend path {v:?}"),
            );
        }
        v.to_owned()
    };
    let validate_path = path(
        "validate_path",
        s.validate_path.as_deref(),
        "/renew_session",
    );
    let login_path = path("login_path", s.login_path.as_deref(), "/login");
    let logout_path = s
        .logout_path
        .as_deref()
        .map(|v| path("logout_path", Some(v), v));
    let max_entries = s.max_entries.unwrap_or(1_000_000);
    if max_entries == 0 {
        p.push("sessions.max_entries", "must be at least 1");
    }
    Some(SessionsConfig {
        validate_method: validate_method?,
        validate_path,
        login_path,
        logout_path,
        max_entries,
        max_ttl: duration(
            &s.max_ttl,
            Duration::from_secs(12 * 3600),
            "sessions.max_ttl",
            p,
        ),
        negative_ttl: duration(
            &s.negative_ttl,
            Duration::from_secs(30),
            "sessions.negative_ttl",
            p,
        ),
        stale_if_error: s.stale_if_error.as_ref().map(|v| {
            duration(
                &Some(v.clone()),
                Duration::ZERO,
                "sessions.stale_if_error",
                p,
            )
        }),
    })
}

fn validate_crypto(c: &RawCrypto, p: &mut Problems) -> Option<CryptoConfig> {
    let mut keys = Vec::new();
    for (i, k) in c.keys.iter().enumerate() {
        let at = format!("crypto.keys[{i}]");
        if keys.iter().any(|(id, _)| *id == k.id) {
            p.push(format!("{at}.id"), format!("duplicate key id {}", k.id));
        }
        match secret::resolve(&k.key).and_then(|s| crate::crypto::decode_key(&s)) {
            Ok(key) => keys.push((k.id, key)),
            Err(e) => p.push(format!("{at}.key"), e),
        }
    }
    if !c.keys.iter().any(|k| k.id == c.active_key) {
        p.push(
            "crypto.active_key",
            format!("no key with id {} in crypto.keys", c.active_key),
        );
    }
    Some(CryptoConfig {
        active_key: c.active_key,
        keys,
    })
}

fn validate_route(
    r: &RawRoute,
    at: &str,
    have_crypto: bool,
    p: &mut Problems,
) -> Option<RouteConfig> {
    let before = p.0.len();
    if !r.path.starts_with('/') || r.path.contains(['?', '#']) {
        p.push(format!("{at}.path"), format!("invalid path {:?}", r.path));
    }
    if r.path.split('/').any(|s| s == ".." || s == ".") {
        p.push(format!("{at}.path"), "must not contain . or .. segments");
    }
    if r.path.starts_with("/__manage__") || r.path == "/login" || r.path == "/logout" {
        p.push(
            format!("{at}.path"),
            format!("{:?} is reserved by the gateway", r.path),
        );
    }
    let mut methods = Vec::new();
    for m in &r.methods {
        let upper = m.to_ascii_uppercase();
        if FORBIDDEN_METHODS.contains(&upper.as_str()) {
            p.push(
                format!("{at}.methods"),
                format!("{upper} may never be exposed"),
            );
            continue;
        }
        match Method::from_bytes(upper.as_bytes()) {
            Ok(m) if !methods.contains(&m) => methods.push(m),
            Ok(_) => {}
            Err(_) => p.push(format!("{at}.methods"), format!("invalid method {m:?}")),
        }
    }
    if r.methods.is_empty() {
        p.push(format!("{at}.methods"), "at least one method is required");
    }
    let backend_path = r.backend_path.clone().unwrap_or_else(|| r.path.clone());
    if !backend_path_ok(&backend_path) {
        p.push(
            format!("{at}.backend_path"),
            format!("invalid backend path {backend_path:?}"),
        );
    }
    let encrypt_query = if r.encrypt_query.is_empty() {
        EncryptQuery::None
    } else if r.encrypt_query.iter().any(|n| n == "*") {
        EncryptQuery::All
    } else {
        EncryptQuery::Names(r.encrypt_query.clone())
    };
    if encrypt_query != EncryptQuery::None && !have_crypto {
        p.push(
            format!("{at}.encrypt_query"),
            "needs a [crypto] section with at least one key",
        );
    }
    let timeout = r.timeout.as_ref().map(|t| {
        parse_duration(t).unwrap_or_else(|e| {
            p.push(format!("{at}.timeout"), e);
            Duration::ZERO
        })
    });
    let max_body = r
        .max_body
        .as_ref()
        .map(|m| size(&Some(m.clone()), 0, &format!("{at}.max_body"), p));
    let rate_limit = rate(&r.rate_limit, &format!("{at}.rate_limit"), p);
    if p.0.len() != before {
        return None;
    }
    Some(RouteConfig {
        path: r.path.clone(),
        methods,
        backend_path,
        public: r.public,
        encrypt_query,
        timeout,
        max_body,
        stream_request_body: r.stream_request_body,
        json_body: r.json_body,
        rate_limit,
    })
}

impl RawLimits {
    fn validate(l: &RawLimits, p: &mut Problems) -> Limits {
        let max_header_bytes = size(&l.max_header_bytes, 16 << 10, "limits.max_header_bytes", p);
        if max_header_bytes < 8192 {
            p.push("limits.max_header_bytes", "must be at least 8KiB");
        }
        let response_buffer = size(&l.response_buffer, 1 << 20, "limits.response_buffer", p);
        let response_buffer_total = size(
            &l.response_buffer_total,
            64 << 20,
            "limits.response_buffer_total",
            p,
        );
        if response_buffer > response_buffer_total {
            p.push(
                "limits.response_buffer",
                "larger than limits.response_buffer_total",
            );
        }
        Limits {
            max_header_bytes: usize::try_from(max_header_bytes).unwrap_or(usize::MAX),
            max_headers: l.max_headers.unwrap_or(100),
            header_read_timeout: duration(
                &l.header_read_timeout,
                Duration::from_secs(10),
                "limits.header_read_timeout",
                p,
            ),
            body_read_timeout: duration(
                &l.body_read_timeout,
                Duration::from_secs(30),
                "limits.body_read_timeout",
                p,
            ),
            send_timeout: duration(
                &l.send_timeout,
                Duration::from_secs(60),
                "limits.send_timeout",
                p,
            ),
            response_buffer,
            response_buffer_total,
            idle_timeout: duration(
                &l.idle_timeout,
                Duration::from_secs(60),
                "limits.idle_timeout",
                p,
            ),
            max_connections: l.max_connections.unwrap_or(10_000).max(1),
            h2_max_concurrent_streams: l.h2_max_concurrent_streams.unwrap_or(128).max(1),
            tls_handshake_timeout: duration(
                &l.tls_handshake_timeout,
                Duration::from_secs(10),
                "limits.tls_handshake_timeout",
                p,
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        [backend]
        url = "http://127.0.0.1:8000"
        [[api_keys]]
        name = "ios"
        key = "k1"
        [[routes]]
        path = "/api/orders/{id}"
        methods = ["GET", "post"]
    "#;

    #[test]
    fn minimal_config_gets_defaults() {
        let c = Config::parse(MINIMAL).unwrap();
        assert_eq!(c.server.max_body, 1 << 20);
        assert_eq!(c.routes[0].methods, vec![Method::GET, Method::POST]);
        assert_eq!(c.routes[0].backend_path, "/api/orders/{id}");
        assert_eq!(c.backend.address, "127.0.0.1:8000");
        assert_eq!(c.sessions.validate_path, "/renew_session");
    }

    #[test]
    fn every_problem_is_reported() {
        let text = r#"
            bogus = 1
        "#;
        let e = Config::parse(text).unwrap_err();
        assert!(e.0[0].contains("unknown field"), "{e}");

        let text = r#"
            [server]
            listen = "nope"
            max_body = "12 parsecs"
            [backend]
            url = "ftp://x"
            [[api_keys]]
            name = "a"
            key = "sha256:zz"
            [[routes]]
            path = "/x"
            methods = ["TRACE"]
            encrypt_query = ["u"]
        "#;
        let e = Config::parse(text).unwrap_err();
        let all = e.to_string();
        for needle in [
            "server.listen",
            "server.max_body",
            "backend.url",
            "api_keys[0].key",
            "routes[0].methods",
            "routes[0].encrypt_query",
        ] {
            assert!(all.contains(needle), "{needle} missing from\n{all}");
        }
    }

    #[test]
    fn sizes_durations_rates() {
        assert_eq!(parse_size("1MiB").unwrap(), 1 << 20);
        assert_eq!(parse_size("16KiB").unwrap(), 16 << 10);
        assert_eq!(parse_size("100").unwrap(), 100);
        assert!(parse_size("1XB").is_err());
        assert_eq!(parse_duration("2s").unwrap(), Duration::from_secs(2));
        assert_eq!(
            parse_rate("5/min").unwrap(),
            Rate {
                count: 5,
                per: Duration::from_secs(60)
            }
        );
        assert!(parse_rate("0/s").is_err());
    }

    #[test]
    fn response_read_ahead_limits() {
        let c = Config::parse(MINIMAL).unwrap();
        assert_eq!(c.limits.response_buffer, 1 << 20);
        assert_eq!(c.limits.response_buffer_total, 64 << 20);
        let off = format!("{MINIMAL}\n[limits]\nresponse_buffer = 0\n");
        assert_eq!(Config::parse(&off).unwrap().limits.response_buffer, 0);
        let bad = format!(
            "{MINIMAL}\n[limits]\nresponse_buffer = \"8MiB\"\nresponse_buffer_total = \"4MiB\"\n"
        );
        let e = Config::parse(&bad).unwrap_err().to_string();
        assert!(
            e.contains("limits.response_buffer") && e.contains("larger than"),
            "{e}"
        );
    }
}
