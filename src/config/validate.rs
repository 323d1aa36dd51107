//! Validation: raw serde values → the typed model. Every problem is
//! recorded (not only the first); defaults come from [`super::defaults`].
//!
//! Longer than the crate's 600-line guide on purpose: one validator per TOML
//! section, in file order, so a setting's checks are found by its key.

use super::defaults;
use super::model::*;
use super::problems::Problems;
use super::raw::*;
use super::units::{parse_duration, parse_rate, parse_size, Rate};
use crate::secret::{self, Matcher};
use http::{HeaderValue, Method};
use ipnet::IpNet;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

/// Methods a route may never expose.
const FORBIDDEN_METHODS: [&str; 2] = ["TRACE", "CONNECT"];

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

pub(super) fn validate(
    raw: RawConfig,
    p: &mut Problems,
    warnings: &mut Vec<String>,
) -> Option<Config> {
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
    let mut route_index = Vec::new();
    for (i, r) in raw.routes.iter().enumerate() {
        if let Some(route) = validate_route(r, &format!("routes[{i}]"), crypto.is_some(), p) {
            routes.push(route);
            route_index.push(i);
        }
    }
    // Conflicts and backend templates too, in the same run as the rest.
    if let Err(problems) =
        crate::routes::Router::numbered(&routes, |n| route_index.get(n).copied().unwrap_or(n))
    {
        p.0.extend(problems);
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

    let runners = crate::commands::remote::validate_runners(&raw.runners, commands.as_ref(), p);
    // A runner token must be usable only by its runner.
    for (i, r) in runners.iter().enumerate() {
        if operators.iter().any(|o| o.token.same_as(&r.token))
            || api_keys.iter().any(|k| k.matcher.same_as(&r.token))
        {
            p.push(
                format!("runners[{i}].token"),
                "must differ from every operator token and API key",
            );
        }
    }
    let cluster = raw
        .cluster
        .as_ref()
        .and_then(|c| crate::cluster::config::validate(c, p));

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
        runners,
        commands,
        cluster,
        warnings: std::mem::take(warnings),
    })
}

fn validate_server(s: &RawServer, p: &mut Problems) -> Option<ServerConfig> {
    let listen = s.listen.as_deref().unwrap_or(defaults::server::LISTEN);
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
    let max_body = size(
        &s.max_body,
        defaults::server::MAX_BODY,
        "server.max_body",
        p,
    );
    let error_type = s
        .error_type
        .clone()
        .unwrap_or_else(|| defaults::server::ERROR_TYPE.into());
    let server_header = s
        .server_header
        .as_deref()
        .unwrap_or(defaults::server::SERVER_HEADER);
    let server_header = match HeaderValue::from_str(server_header) {
        Ok(v) => Some(v),
        Err(_) => {
            p.push("server.server_header", "must be printable ASCII");
            None
        }
    };
    let drain_timeout = duration(
        &s.drain_timeout,
        defaults::server::DRAIN_TIMEOUT,
        "server.drain_timeout",
        p,
    );
    let access_log = match s.access_log.as_deref() {
        None | Some(defaults::server::ACCESS_LOG) => crate::access_log::Target::Stdout,
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
        defaults::server::TLS_RELOAD_INTERVAL,
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
            defaults::backend::CONNECT_TIMEOUT,
            "backend.connect_timeout",
            p,
        ),
        timeout: duration(&b.timeout, defaults::backend::TIMEOUT, "backend.timeout", p),
        max_connections: b
            .max_connections
            .unwrap_or(defaults::backend::MAX_CONNECTIONS)
            .max(1),
        max_idle: b.max_idle.unwrap_or(defaults::backend::MAX_IDLE),
        tls,
    })
}

fn validate_sessions(s: &RawSessions, p: &mut Problems) -> Option<SessionsConfig> {
    let method = s
        .validate_method
        .as_deref()
        .unwrap_or(defaults::sessions::VALIDATE_METHOD);
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
        defaults::sessions::VALIDATE_PATH,
    );
    let login_path = path(
        "login_path",
        s.login_path.as_deref(),
        defaults::sessions::LOGIN_PATH,
    );
    let logout_path = s
        .logout_path
        .as_deref()
        .map(|v| path("logout_path", Some(v), v));
    let max_entries = s.max_entries.unwrap_or(defaults::sessions::MAX_ENTRIES);
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
            defaults::sessions::MAX_TTL,
            "sessions.max_ttl",
            p,
        ),
        negative_ttl: duration(
            &s.negative_ttl,
            defaults::sessions::NEGATIVE_TTL,
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
        p.push(
            format!("{at}.path"),
            format!(
                "invalid path {:?}: a path starts with '/' and has no '?' or '#'",
                r.path
            ),
        );
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
        let max_header_bytes = size(
            &l.max_header_bytes,
            defaults::limits::MAX_HEADER_BYTES,
            "limits.max_header_bytes",
            p,
        );
        if max_header_bytes < defaults::limits::MIN_HEADER_BYTES {
            p.push("limits.max_header_bytes", "must be at least 8KiB");
        }
        let response_buffer = size(
            &l.response_buffer,
            defaults::limits::RESPONSE_BUFFER,
            "limits.response_buffer",
            p,
        );
        let response_buffer_total = size(
            &l.response_buffer_total,
            defaults::limits::RESPONSE_BUFFER_TOTAL,
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
            max_headers: l.max_headers.unwrap_or(defaults::limits::MAX_HEADERS),
            header_read_timeout: duration(
                &l.header_read_timeout,
                defaults::limits::HEADER_READ_TIMEOUT,
                "limits.header_read_timeout",
                p,
            ),
            body_read_timeout: duration(
                &l.body_read_timeout,
                defaults::limits::BODY_READ_TIMEOUT,
                "limits.body_read_timeout",
                p,
            ),
            send_timeout: duration(
                &l.send_timeout,
                defaults::limits::SEND_TIMEOUT,
                "limits.send_timeout",
                p,
            ),
            response_buffer,
            response_buffer_total,
            idle_timeout: duration(
                &l.idle_timeout,
                defaults::limits::IDLE_TIMEOUT,
                "limits.idle_timeout",
                p,
            ),
            max_connections: l
                .max_connections
                .unwrap_or(defaults::limits::MAX_CONNECTIONS)
                .max(1),
            h2_max_concurrent_streams: l
                .h2_max_concurrent_streams
                .unwrap_or(defaults::limits::H2_MAX_CONCURRENT_STREAMS)
                .max(1),
            tls_handshake_timeout: duration(
                &l.tls_handshake_timeout,
                defaults::limits::TLS_HANDSHAKE_TIMEOUT,
                "limits.tls_handshake_timeout",
                p,
            ),
        }
    }
}
