//! The validated configuration the gateway runs with: typed values, defaults
//! filled in (see [`super::defaults`]).

use super::units::Rate;
use crate::secret::{Matcher, Secret};
use http::{HeaderValue, Method};
use ipnet::IpNet;
use std::net::SocketAddr;
use std::time::Duration;

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
    /// `[[runners]]`: runners allowed to dial in (`commands.execute = "runners"`).
    pub runners: Vec<crate::commands::remote::RunnerDef>,
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
