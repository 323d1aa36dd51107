//! The configuration file's shape as serde reads it: every table rejects
//! unknown keys, every value is still text. [`super::validate`] turns it into
//! the typed model.

use super::problems::Problems;
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

/// Which parts of the file could not be read, so their validation problems
/// (which would only repeat that) are left out and the rest keep the
/// indices of the file.
#[derive(Default)]
pub(super) struct Unread {
    /// Top-level tables that could not be read at all.
    sections: Vec<&'static str>,
    /// Arrays of tables with an element that could not be read: the array's
    /// name and, for each element kept, its index in the file.
    arrays: Vec<(&'static str, Vec<usize>)>,
}

impl Unread {
    /// Drops problems of unread parts and renumbers array elements as in the file.
    pub(super) fn apply(&self, problems: Vec<String>) -> Vec<String> {
        problems
            .into_iter()
            .filter_map(|problem| {
                let path = problem.split(": ").next().unwrap_or_default();
                let top_end = path.find(['.', '[']).unwrap_or(path.len());
                let top = path.get(..top_end).unwrap_or_default();
                if self.sections.contains(&top) {
                    return None;
                }
                let Some((_, kept)) = self.arrays.iter().find(|(name, _)| *name == top) else {
                    return Some(problem);
                };
                if path == top {
                    return None; // "no [[api_keys]]" and the like
                }
                let rest = problem.get(top_end..).unwrap_or_default();
                let Some(close) = rest.strip_prefix('[').and_then(|r| r.find(']')) else {
                    return Some(problem);
                };
                let index = rest.get(1..=close).and_then(|n| n.parse::<usize>().ok());
                match index.and_then(|n| kept.get(n)) {
                    Some(original) => Some(format!(
                        "{top}[{original}]{}",
                        rest.get(close + 2..).unwrap_or_default()
                    )),
                    None => Some(problem),
                }
            })
            .collect()
    }
}

fn error_text(e: toml::de::Error) -> String {
    e.message().trim().to_owned()
}

fn one<T: serde::de::DeserializeOwned>(
    value: toml::Value,
    at: &'static str,
    p: &mut Problems,
    unread: &mut Unread,
) -> Option<T> {
    match value.try_into::<T>() {
        Ok(t) => Some(t),
        Err(e) => {
            p.push(at, error_text(e));
            unread.sections.push(at);
            None
        }
    }
}

fn many<T: serde::de::DeserializeOwned>(
    value: toml::Value,
    at: &'static str,
    p: &mut Problems,
    unread: &mut Unread,
) -> Vec<T> {
    let toml::Value::Array(items) = value else {
        p.push(at, format!("must be an array of tables ([[{at}]])"));
        unread.sections.push(at);
        return Vec::new();
    };
    let mut out = Vec::new();
    let mut kept = Vec::new();
    let total = items.len();
    for (i, item) in items.into_iter().enumerate() {
        match item.try_into::<T>() {
            Ok(t) => {
                out.push(t);
                kept.push(i);
            }
            Err(e) => p.push(format!("{at}[{i}]"), error_text(e)),
        }
    }
    if kept.len() != total {
        unread.arrays.push((at, kept));
    }
    out
}

/// Reads every top-level table on its own, so an unknown key or a wrong
/// type in one is reported together with the problems of all the others.
pub(super) fn read(table: toml::Table, p: &mut Problems) -> (RawConfig, Unread) {
    let mut raw = RawConfig::default();
    let mut unread = Unread::default();
    let u = &mut unread;
    for (key, value) in table {
        match key.as_str() {
            "server" => raw.server = one(value, "server", p, u).unwrap_or_default(),
            "backend" => raw.backend = one(value, "backend", p, u),
            "api_keys" => raw.api_keys = many(value, "api_keys", p, u),
            "sessions" => raw.sessions = one(value, "sessions", p, u).unwrap_or_default(),
            "crypto" => raw.crypto = one(value, "crypto", p, u),
            "routes" => raw.routes = many(value, "routes", p, u),
            "limits" => raw.limits = one(value, "limits", p, u).unwrap_or_default(),
            "rate_limits" => raw.rate_limits = one(value, "rate_limits", p, u).unwrap_or_default(),
            "operators" => raw.operators = many(value, "operators", p, u),
            "commands" => raw.commands = one(value, "commands", p, u),
            other => p.push(
                other,
                "unknown key (expected server, backend, api_keys, sessions, crypto, routes, limits, rate_limits, operators or commands)",
            ),
        }
    }
    (raw, unread)
}
