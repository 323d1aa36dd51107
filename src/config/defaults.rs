//! Every default value of the gateway's configuration, in one place. The
//! validation code reads these constants; [`table`] lists them under their
//! TOML keys so the documentation and the sample configuration can be checked
//! against the code.
//!
//! `[commands]` keeps its defaults beside its own validation
//! (`commands::config`).

use std::time::Duration;

const SECOND: u64 = 1;
const MINUTE: u64 = 60 * SECOND;
const HOUR: u64 = 60 * MINUTE;
const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

/// `[server]`.
pub mod server {
    use super::*;
    /// `server.listen`.
    pub const LISTEN: &str = "0.0.0.0:8080";
    /// `server.max_body`: largest device request body, in bytes.
    pub const MAX_BODY: u64 = MIB;
    /// `server.error_type`: the `type` of every error envelope.
    pub const ERROR_TYPE: &str = "ProxyServerError";
    /// `server.server_header`: the `Server` header of every answer.
    pub const SERVER_HEADER: &str = "portcullis";
    /// `server.drain_timeout`: how long in-flight requests get on shutdown.
    pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30 * SECOND);
    /// `server.access_log`.
    pub const ACCESS_LOG: &str = "stdout";
    /// `server.tls.reload_interval`: how often certificate files are polled.
    pub const TLS_RELOAD_INTERVAL: Duration = Duration::from_secs(5 * SECOND);
}

/// `[backend]`.
pub mod backend {
    use super::*;
    /// `backend.connect_timeout`: TCP connect plus TLS handshake.
    pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2 * SECOND);
    /// `backend.timeout`: a request's deadline, unless its route sets one.
    pub const TIMEOUT: Duration = Duration::from_secs(15 * SECOND);
    /// `backend.max_connections`: the pool's size.
    pub const MAX_CONNECTIONS: usize = 512;
    /// `backend.max_idle`: idle connections kept.
    pub const MAX_IDLE: usize = 256;
}

/// `[sessions]`.
pub mod sessions {
    use super::*;
    /// `sessions.validate_method`.
    pub const VALIDATE_METHOD: &str = "POST";
    /// `sessions.validate_path`.
    pub const VALIDATE_PATH: &str = "/renew_session";
    /// `sessions.login_path`.
    pub const LOGIN_PATH: &str = "/login";
    /// `sessions.max_entries`: sessions cached at most.
    pub const MAX_ENTRIES: u64 = 1_000_000;
    /// `sessions.max_ttl`: the longest a session is cached.
    pub const MAX_TTL: Duration = Duration::from_secs(12 * HOUR);
    /// `sessions.negative_ttl`: how long a refused token stays refused.
    pub const NEGATIVE_TTL: Duration = Duration::from_secs(30 * SECOND);
}

/// `[limits]`.
pub mod limits {
    use super::*;
    /// `limits.max_header_bytes`.
    pub const MAX_HEADER_BYTES: u64 = 16 * KIB;
    /// The smallest `limits.max_header_bytes` accepted.
    pub const MIN_HEADER_BYTES: u64 = 8 * KIB;
    /// `limits.max_headers`.
    pub const MAX_HEADERS: usize = 100;
    /// `limits.header_read_timeout`: from a request head's first byte to its end.
    pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10 * SECOND);
    /// `limits.body_read_timeout`: the longest pause inside a device's body,
    /// and the longest a body the gateway reads whole may take.
    pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(30 * SECOND);
    /// `limits.send_timeout`: the longest a device may accept no bytes.
    pub const SEND_TIMEOUT: Duration = Duration::from_secs(MINUTE);
    /// `limits.response_buffer`: read-ahead of one backend answer.
    pub const RESPONSE_BUFFER: u64 = MIB;
    /// `limits.response_buffer_total`: read-ahead of all answers together.
    pub const RESPONSE_BUFFER_TOTAL: u64 = 64 * MIB;
    /// `limits.idle_timeout`: an idle keep-alive connection is closed after this.
    pub const IDLE_TIMEOUT: Duration = Duration::from_secs(MINUTE);
    /// `limits.max_connections`: device connections at once.
    pub const MAX_CONNECTIONS: usize = 10_000;
    /// `limits.h2_max_concurrent_streams`.
    pub const H2_MAX_CONCURRENT_STREAMS: u32 = 128;
    /// `limits.tls_handshake_timeout`.
    pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10 * SECOND);
}

/// Every default above as `(TOML key, value as written in the file)`.
pub fn table() -> Vec<(&'static str, String)> {
    let d = |d: Duration| humantime::format_duration(d).to_string();
    vec![
        ("server.listen", server::LISTEN.to_owned()),
        ("server.max_body", size(server::MAX_BODY)),
        ("server.error_type", server::ERROR_TYPE.to_owned()),
        ("server.server_header", server::SERVER_HEADER.to_owned()),
        ("server.drain_timeout", d(server::DRAIN_TIMEOUT)),
        ("server.access_log", server::ACCESS_LOG.to_owned()),
        ("server.tls.reload_interval", d(server::TLS_RELOAD_INTERVAL)),
        ("backend.connect_timeout", d(backend::CONNECT_TIMEOUT)),
        ("backend.timeout", d(backend::TIMEOUT)),
        (
            "backend.max_connections",
            backend::MAX_CONNECTIONS.to_string(),
        ),
        ("backend.max_idle", backend::MAX_IDLE.to_string()),
        (
            "sessions.validate_method",
            sessions::VALIDATE_METHOD.to_owned(),
        ),
        ("sessions.validate_path", sessions::VALIDATE_PATH.to_owned()),
        ("sessions.login_path", sessions::LOGIN_PATH.to_owned()),
        ("sessions.max_entries", sessions::MAX_ENTRIES.to_string()),
        ("sessions.max_ttl", d(sessions::MAX_TTL)),
        ("sessions.negative_ttl", d(sessions::NEGATIVE_TTL)),
        ("limits.max_header_bytes", size(limits::MAX_HEADER_BYTES)),
        ("limits.max_headers", limits::MAX_HEADERS.to_string()),
        ("limits.header_read_timeout", d(limits::HEADER_READ_TIMEOUT)),
        ("limits.body_read_timeout", d(limits::BODY_READ_TIMEOUT)),
        ("limits.send_timeout", d(limits::SEND_TIMEOUT)),
        ("limits.response_buffer", size(limits::RESPONSE_BUFFER)),
        (
            "limits.response_buffer_total",
            size(limits::RESPONSE_BUFFER_TOTAL),
        ),
        ("limits.idle_timeout", d(limits::IDLE_TIMEOUT)),
        (
            "limits.max_connections",
            limits::MAX_CONNECTIONS.to_string(),
        ),
        (
            "limits.h2_max_concurrent_streams",
            limits::H2_MAX_CONCURRENT_STREAMS.to_string(),
        ),
        (
            "limits.tls_handshake_timeout",
            d(limits::TLS_HANDSHAKE_TIMEOUT),
        ),
    ]
}

/// A size as written in the file: the largest binary unit that divides it.
fn size(bytes: u64) -> String {
    for (unit, name) in [(1 << 30, "GiB"), (MIB, "MiB"), (KIB, "KiB")] {
        if bytes >= unit && bytes % unit == 0 {
            return format!("{}{name}", bytes / unit);
        }
    }
    bytes.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{parse_duration, parse_size};

    #[test]
    fn the_table_reads_back_as_the_constants() {
        let table = table();
        let get = |key: &str| {
            table
                .iter()
                .find(|(k, _)| *k == key)
                .map(|(_, v)| v.clone())
                .unwrap_or_default()
        };
        assert_eq!(parse_size(&get("server.max_body")), Ok(server::MAX_BODY));
        assert_eq!(
            parse_size(&get("limits.response_buffer_total")),
            Ok(limits::RESPONSE_BUFFER_TOTAL)
        );
        assert_eq!(
            parse_duration(&get("sessions.max_ttl")),
            Ok(sessions::MAX_TTL)
        );
        assert_eq!(
            parse_duration(&get("limits.send_timeout")),
            Ok(limits::SEND_TIMEOUT)
        );
    }
}
