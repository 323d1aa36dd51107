//! The configuration file's shape as serde reads it: every table rejects
//! unknown keys, every value is still text. [`super::validate`] turns it into
//! the typed model.

use serde::Deserialize;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    #[serde(default)]
    pub(super) server: RawServer,
    pub(super) backend: Option<RawBackend>,
    #[serde(default)]
    pub(super) api_keys: Vec<RawApiKey>,
    #[serde(default)]
    pub(super) sessions: RawSessions,
    pub(super) crypto: Option<RawCrypto>,
    #[serde(default)]
    pub(super) routes: Vec<RawRoute>,
    #[serde(default)]
    pub(super) limits: RawLimits,
    #[serde(default)]
    pub(super) rate_limits: RawRateLimits,
    #[serde(default)]
    pub(super) operators: Vec<RawOperator>,
    pub(super) commands: Option<crate::commands::config::RawCommands>,
    pub(super) cluster: Option<crate::cluster::config::RawCluster>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawServer {
    pub(super) listen: Option<String>,
    pub(super) tls: Option<RawTls>,
    pub(super) admin_listen: Option<String>,
    #[serde(default)]
    pub(super) trusted_proxies: Vec<String>,
    pub(super) max_body: Option<RawSize>,
    pub(super) error_type: Option<String>,
    pub(super) server_header: Option<String>,
    pub(super) drain_timeout: Option<String>,
    pub(super) access_log: Option<String>,
    #[serde(default)]
    pub(super) h2c: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTls {
    pub(super) cert: String,
    pub(super) key: String,
    pub(super) ocsp: Option<String>,
    pub(super) reload_interval: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBackend {
    pub(super) url: String,
    pub(super) api_key: Option<String>,
    pub(super) connect_timeout: Option<String>,
    pub(super) timeout: Option<String>,
    pub(super) max_connections: Option<usize>,
    pub(super) max_idle: Option<usize>,
    // TLS towards https:// backends (see `tls::BackendTls`).
    pub(super) ca: Option<String>,
    pub(super) client_cert: Option<String>,
    pub(super) client_key: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawApiKey {
    pub(super) name: String,
    pub(super) key: String,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSessions {
    pub(super) validate_method: Option<String>,
    pub(super) validate_path: Option<String>,
    pub(super) login_path: Option<String>,
    pub(super) logout_path: Option<String>,
    pub(super) max_entries: Option<u64>,
    pub(super) max_ttl: Option<String>,
    pub(super) negative_ttl: Option<String>,
    pub(super) stale_if_error: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCrypto {
    pub(super) active_key: u8,
    pub(super) keys: Vec<RawKey>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawKey {
    pub(super) id: u8,
    pub(super) key: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRoute {
    pub(super) path: String,
    pub(super) methods: Vec<String>,
    pub(super) backend_path: Option<String>,
    #[serde(default)]
    pub(super) public: bool,
    #[serde(default)]
    pub(super) encrypt_query: Vec<String>,
    pub(super) timeout: Option<String>,
    pub(super) max_body: Option<RawSize>,
    #[serde(default)]
    pub(super) stream_request_body: bool,
    #[serde(default)]
    pub(super) json_body: bool,
    pub(super) rate_limit: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLimits {
    pub(super) max_header_bytes: Option<RawSize>,
    pub(super) max_headers: Option<usize>,
    pub(super) header_read_timeout: Option<String>,
    pub(super) body_read_timeout: Option<String>,
    pub(super) send_timeout: Option<String>,
    pub(super) response_buffer: Option<RawSize>,
    pub(super) response_buffer_total: Option<RawSize>,
    pub(super) idle_timeout: Option<String>,
    pub(super) max_connections: Option<usize>,
    pub(super) h2_max_concurrent_streams: Option<u32>,
    pub(super) tls_handshake_timeout: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRateLimits {
    pub(super) per_api_key: Option<String>,
    pub(super) per_client_ip: Option<String>,
    pub(super) login: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawOperator {
    pub(super) name: String,
    pub(super) token: String,
    pub(super) commands: Option<Vec<String>>,
}

/// A size written as an integer (bytes) or a string such as `"1MiB"`.
#[derive(Deserialize, Clone)]
#[serde(untagged)]
pub(super) enum RawSize {
    Bytes(u64),
    Text(String),
}
