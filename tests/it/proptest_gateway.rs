//! Property tests (proptest, a bounded number of cases) for the code that
//! reads untrusted input: path normalization and route matching, backend
//! error normalization, parameter decryption, query rewriting and
//! configuration parsing. Each must never panic and must keep its invariant
//! for every input the strategies produce.

use crate::support::*;
use http::{Method, StatusCode};
use percent_encoding::percent_decode_str;
use portcullis::config::{Config, EncryptQuery};
use portcullis::crypto::Keyring;
use portcullis::envelope;
use portcullis::routes::{self, Match, Router};
use portcullis::secret::Secret;
use proptest::prelude::*;
use std::sync::OnceLock;

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        // No regression files written next to the sources in CI.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// The test suite's default routes, parsed from TOML like the gateway does.
fn router() -> &'static (Router, Vec<(String, String)>) {
    static ROUTER: OnceLock<(Router, Vec<(String, String)>)> = OnceLock::new();
    ROUTER.get_or_init(|| {
        let text = GatewayConfig::new("http://127.0.0.1:9")
            .route("path = \"/api/files/{dir}/{name}\"\nmethods = [\"GET\"]\nbackend_path = \"/store/{dir}/x/{name}\"\npublic = true")
            .toml("127.0.0.1:1".parse().unwrap());
        let cfg = Config::parse(&text).unwrap_or_else(|p| panic!("{p}"));
        let prefixes = cfg
            .routes
            .iter()
            .map(|r| {
                let prefix = r.backend_path.split('{').next().unwrap_or("").to_owned();
                (r.path.clone(), prefix)
            })
            .collect();
        (Router::new(&cfg.routes).expect("router"), prefixes)
    })
}

/// Path pieces an attacker would combine.
fn segment() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("api".to_owned()),
        Just("public".to_owned()),
        Just("files".to_owned()),
        Just("orders".to_owned()),
        Just("status".to_owned()),
        Just("".to_owned()),
        Just(".".to_owned()),
        Just("..".to_owned()),
        Just("%2e".to_owned()),
        Just("%2e%2e".to_owned()),
        Just("%2E%2e".to_owned()),
        Just(".%2e".to_owned()),
        Just("%252e%252e".to_owned()),
        Just("%2f".to_owned()),
        Just("%2F".to_owned()),
        Just("%252f".to_owned()),
        Just("%5c".to_owned()),
        Just("..%2f".to_owned()),
        Just("..;".to_owned()),
        Just("%00".to_owned()),
        Just("%0a".to_owned()),
        Just("%".to_owned()),
        Just("%z".to_owned()),
        Just("%ff".to_owned()),
        Just("%c3%a9".to_owned()),
        Just("%c0%ae".to_owned()),
        Just("\\".to_owned()),
        Just("é".to_owned()),
        Just("a b".to_owned()),
        Just("?x=1".to_owned()),
        Just("#f".to_owned()),
        Just("{x}".to_owned()),
        Just("*".to_owned()),
        "[a-z0-9._~%-]{1,8}",
        "\\PC{1,4}",
    ]
}

fn attack_path() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::collection::vec(segment(), 0..10).prop_map(|s| format!("/{}", s.join("/"))),
        1 => "\\PC{0,64}",
        1 => "/[ -~]{0,64}",
    ]
}

fn has_encoded_separator(p: &str) -> bool {
    let l = p.to_ascii_lowercase();
    l.contains("%2f") || l.contains("%5c")
}

proptest! {
    #![proptest_config(config(512))]

    /// A normalized path is absolute, has no empty, `.` or `..` segment, no
    /// backslash or control character, and it has no encoded separator
    /// unless the device double-encoded one (then it is literal text that
    /// the backend path re-encodes, below).
    #[test]
    fn normalized_paths_are_clean(raw in attack_path()) {
        if let Ok(p) = routes::normalize(&raw) {
            prop_assert!(p.starts_with('/'), "{raw:?} -> {p:?}");
            prop_assert!(!p.contains("//"), "{raw:?} -> {p:?}");
            for seg in p.split('/').skip(1) {
                prop_assert!(seg != ".." && seg != ".", "{raw:?} -> {p:?}");
            }
            prop_assert!(!p.contains('\\'), "{raw:?} -> {p:?}");
            prop_assert!(!p.chars().any(|c| c.is_control()), "{raw:?} -> {p:?}");
            if has_encoded_separator(&p) {
                prop_assert!(raw.to_ascii_lowercase().contains("%25"), "{raw:?} -> {p:?}");
            }
            // Without escapes left, normalizing again changes nothing.
            if !p.contains('%') {
                prop_assert_eq!(routes::normalize(&p), Ok(p.clone()));
            }
        }
    }

    /// A matched route's backend path starts with that route's literal
    /// prefix, and decoded once (as a backend would) it has no `..`/`.`
    /// segment, no empty segment inside, no backslash and no encoded slash
    /// left to decode into a separator.
    #[test]
    fn backend_paths_stay_inside_their_template(raw in attack_path()) {
        let (router, prefixes) = router();
        let Ok(p) = routes::normalize(&raw) else { return Ok(()) };
        if let Match::Found(route, params) = router.lookup(&p, &Method::GET) {
            let backend = route.backend_path(&params);
            let prefix = prefixes
                .iter()
                .find(|(path, _)| *path == route.config.path)
                .map(|(_, prefix)| prefix.as_str())
                .unwrap_or("");
            prop_assert!(backend.starts_with(prefix), "{raw:?} -> {backend:?} (prefix {prefix:?})");
            prop_assert!(!has_encoded_separator(&backend), "{raw:?} -> {backend:?}");
            let once = percent_decode_str(&backend).decode_utf8_lossy().into_owned();
            prop_assert!(!once.contains('\\'), "{raw:?} -> {backend:?}");
            let segs: Vec<&str> = once.split('/').skip(1).collect();
            for (i, seg) in segs.iter().enumerate() {
                prop_assert!(*seg != ".." && *seg != ".", "{raw:?} -> {backend:?}");
                prop_assert!(!seg.is_empty() || i + 1 == segs.len(), "{raw:?} -> {backend:?}");
            }
            prop_assert!(!backend.contains('?') && !backend.contains('#'), "{raw:?} -> {backend:?}");
            prop_assert!(backend.parse::<http::Uri>().is_ok(), "{raw:?} -> {backend:?}");
        }
    }
}

/// Backend error bodies: JSON envelopes with odd fields, HTML, binary.
fn backend_body() -> impl Strategy<Value = Vec<u8>> {
    let text = prop_oneof![
        "\\PC{0,40}",
        Just("<html><body>Traceback (most recent call last)</body></html>".to_owned()),
        "[\\u{0}-\\u{10ffff}]{0,20}",
        Just("x".repeat(5000)),
    ];
    let value = prop_oneof![
        text.clone().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        Just(serde_json::Value::Null),
        Just(serde_json::json!([1, {"a": "b"}])),
        Just(serde_json::json!({"nested": {"message": "m"}})),
    ];
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..512),
        text.prop_map(String::into_bytes),
        (value.clone(), value.clone(), any::<bool>()).prop_map(|(t, m, wrap)| {
            let inner = serde_json::json!({"type": t, "message": m, "code": 1});
            let v = if wrap {
                serde_json::json!({"error": inner})
            } else {
                inner
            };
            v.to_string().into_bytes()
        }),
        value.prop_map(|v| serde_json::json!({"error": v}).to_string().into_bytes()),
    ]
}

proptest! {
    #![proptest_config(config(512))]

    /// `from_backend` never panics; fields stay bounded; a body that is not a
    /// JSON `error` object yields the generic type and the reason phrase, so
    /// HTML or text never reaches a device; the envelope built from it is
    /// one JSON object with the four fields.
    #[test]
    fn backend_errors_normalize_safely(status in 400u16..1000, body in backend_body()) {
        let status = StatusCode::from_u16(status).expect("400..1000 is a status");
        let e = envelope::from_backend(status, &body);
        prop_assert!(e.kind.chars().count() <= 1024);
        prop_assert!(e.message.chars().count() <= 1024);
        prop_assert!(!e.kind.is_empty());
        let parsed: Option<serde_json::Value> = serde_json::from_slice(&body).ok();
        let has_error_object = parsed
            .as_ref()
            .and_then(|v| v.get("error"))
            .is_some_and(|e| e.is_object());
        if !has_error_object {
            prop_assert_eq!(&e.kind, "BackendError");
            prop_assert_eq!(e.message.as_str(), status.canonical_reason().unwrap_or("Error"));
        }
        let resp = envelope::response(status, &e.kind, &e.message, "rid");
        prop_assert_eq!(resp.status(), status);
        prop_assert_eq!(resp.headers()["content-type"].to_str().ok(), Some("application/json"));
    }
}

fn keyring() -> &'static Keyring {
    static RING: OnceLock<Keyring> = OnceLock::new();
    RING.get_or_init(backend_keyring)
}

const B64URL: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

proptest! {
    #![proptest_config(config(256))]

    /// Arbitrary input never panics `decrypt` and never decrypts.
    #[test]
    fn decrypt_of_arbitrary_input_fails_cleanly(
        name in "\\PC{0,16}",
        value in prop_oneof!["\\PC{0,200}", "[A-Za-z0-9_-]{0,120}={0,3}", "AQ[A-Za-z0-9_-]{40,80}", "AQc[A-Za-z0-9_-]{40,80}"],
    ) {
        prop_assert!(keyring().decrypt(&name, &value).is_err(), "{name:?} {value:?}");
    }

    /// The genuine ciphertext decrypts to the value; any substituted
    /// character, truncation, extension or other parameter name does not.
    #[test]
    fn only_the_genuine_ciphertext_decrypts(
        name in "[a-z_]{1,12}",
        value in prop::collection::vec(any::<u8>(), 0..64),
        at in any::<prop::sample::Index>(),
        with in any::<prop::sample::Index>(),
        cut in any::<prop::sample::Index>(),
        other in "[a-z_]{1,12}",
    ) {
        let ring = keyring();
        let ct = ring.encrypt(&name, &value);
        prop_assert_eq!(ring.decrypt(&name, &ct).ok(), Some(value.clone()));
        // Substitute one character with a different base64url character.
        let mut bytes = ct.clone().into_bytes();
        let i = at.index(bytes.len());
        let mut c = B64URL[with.index(B64URL.len())];
        if c == bytes[i] {
            c = if c == b'A' { b'B' } else { b'A' };
        }
        bytes[i] = c;
        let tampered = String::from_utf8(bytes).expect("ascii");
        prop_assert!(ring.decrypt(&name, &tampered).is_err(), "{ct} -> {tampered}");
        // Truncated and extended.
        let n = cut.index(ct.len());
        prop_assert!(ring.decrypt(&name, &ct[..n]).is_err());
        let longer = format!("{ct}A");
        let longest = format!("{ct}AAAA");
        prop_assert!(ring.decrypt(&name, &longer).is_err());
        prop_assert!(ring.decrypt(&name, &longest).is_err());
        if other != name {
            prop_assert!(ring.decrypt(&other, &ct).is_err());
        }
    }

    /// Query rewriting never panics; on an encrypting route every covered
    /// value decrypts back to its percent-decoded text and other pairs pass
    /// byte for byte.
    #[test]
    fn query_rewrite_is_total_and_faithful(
        pairs in prop::collection::vec(
            (prop_oneof![Just("username".to_owned()), Just("page".to_owned()), "[a-z%0-9+]{0,6}"],
             prop_oneof!["[a-zA-Z0-9%+ ._~-]{0,12}", "\\PC{0,6}"]),
            0..6),
        raw in "\\PC{0,60}",
    ) {
        let ring = keyring();
        let spec = EncryptQuery::Names(vec!["username".into()]);
        let _ = portcullis::gateway::rewrite_query(Some(ring), &spec, &raw);
        let _ = portcullis::gateway::rewrite_query(Some(ring), &EncryptQuery::All, &raw);
        let query: String = pairs
            .iter()
            .map(|(n, v)| format!("{n}={v}"))
            .collect::<Vec<_>>()
            .join("&");
        if let Ok(out) = portcullis::gateway::rewrite_query(Some(ring), &spec, &query) {
            let sent: Vec<&str> = query.split('&').filter(|p| !p.is_empty()).collect();
            let got: Vec<&str> = out.split('&').filter(|p| !p.is_empty()).collect();
            prop_assert_eq!(sent.len(), got.len(), "{} -> {}", query, out);
            for (s, g) in sent.iter().zip(&got) {
                let (n, v) = s.split_once('=').unwrap_or((s, ""));
                if n == "username" {
                    let enc = g.strip_prefix("username=").expect("name kept");
                    let plain: Vec<u8> = percent_decode_str(&v.replace('+', " ")).collect();
                    prop_assert_eq!(ring.decrypt("username", enc).ok(), Some(plain));
                } else {
                    prop_assert_eq!(s, g);
                }
            }
        }
    }
}

/// A valid configuration with every section, to mutate.
fn base_config() -> &'static str {
    static TEXT: OnceLock<String> = OnceLock::new();
    TEXT.get_or_init(|| {
        GatewayConfig::new("http://127.0.0.1:9")
            .server("trusted_proxies = [\"10.0.0.0/8\"]")
            .limits("max_connections = 100")
            .sessions("max_entries = 1000")
            .toml("127.0.0.1:1".parse().unwrap())
    })
}

/// Fragments that are syntactically interesting in TOML or to the validator.
fn fragment() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("[[routes]]\n".to_owned()),
        Just("[server]\n".to_owned()),
        Just("path = \"/{a}/{a}\"\n".to_owned()),
        Just("backend_path = \"/{nope}\"\n".to_owned()),
        Just("methods = [\"CONNECT\", \"TRACE\", \"\"]\n".to_owned()),
        Just("timeout = \"-1s\"\n".to_owned()),
        Just("max_body = \"99999999999999999999GiB\"\n".to_owned()),
        Just("max_body = -1\n".to_owned()),
        Just("listen = \"[::1]:99999\"\n".to_owned()),
        Just("url = \"http://[::1\"\n".to_owned()),
        Just("key = \"sha256:zz\"\n".to_owned()),
        Just("active_key = 300\n".to_owned()),
        Just("keys = [{ id = 1, key = \"AAAA\" }]\n".to_owned()),
        Just("trusted_proxies = [\"999.0.0.0/99\"]\n".to_owned()),
        Just("per_api_key = \"0/0s\"\n".to_owned()),
        Just("a = { b = { c = [[[[]]]] } }\n".to_owned()),
        Just("\"\"\"\n".to_owned()),
        Just("= =\n".to_owned()),
        Just("\u{0}\u{feff}\n".to_owned()),
        "[ -~\n]{0,30}",
        "\\PC{0,10}",
    ]
}

proptest! {
    #![proptest_config(config(512))]

    /// Parsing never panics, whatever the text: mutations of a valid config
    /// (cuts, insertions, duplicated lines) and arbitrary text. A config that
    /// parses also builds a router without panicking.
    #[test]
    fn config_parse_is_total(
        cut_at in any::<prop::sample::Index>(),
        cut_len in 0usize..64,
        insert_at in any::<prop::sample::Index>(),
        insert in fragment(),
        dup in any::<prop::sample::Index>(),
        arbitrary in "\\PC{0,200}",
    ) {
        let base = base_config();
        let mut text: Vec<u8> = base.as_bytes().to_vec();
        let start = cut_at.index(text.len());
        let end = (start + cut_len).min(text.len());
        text.drain(start..end);
        let at = insert_at.index(text.len() + 1);
        text.splice(at..at, insert.into_bytes());
        let mutated = String::from_utf8_lossy(&text).into_owned();
        let lines: Vec<&str> = mutated.lines().collect();
        let mut with_dup = mutated.clone();
        if !lines.is_empty() {
            with_dup.push('\n');
            with_dup.push_str(lines[dup.index(lines.len())]);
            with_dup.push('\n');
        }
        for t in [mutated.as_str(), with_dup.as_str(), arbitrary.as_str()] {
            if let Ok(cfg) = Config::parse(t) {
                let _ = Router::new(&cfg.routes);
            }
        }
    }
}

/// The double-encoded case the path properties allow: literal `%2f` text in
/// a segment reaches the backend re-encoded (`%252f`), never as a separator.
#[test]
fn double_encoded_separators_stay_literal() {
    let (router, _) = router();
    let p = routes::normalize("/api/public/a%252fb/%252e%252e").expect("normalizes");
    assert_eq!(p, "/api/public/a%2fb/%2e%2e");
    match router.lookup(&p, &Method::GET) {
        Match::Found(route, params) => {
            assert_eq!(route.backend_path(&params), "/public/a%252fb/%252e%252e")
        }
        _ => panic!("no match for {p}"),
    }
}

/// The keyring used for decryption properties holds the test keys; a
/// keyring built from a garbage key is refused, not a panic.
#[test]
fn keyrings_from_bad_keys_are_refused() {
    assert!(Keyring::new(1, &[(1, Secret::new([0u8; 31]))]).is_none());
    assert!(Keyring::new(2, &[(1, Secret::new([0u8; 32]))]).is_none());
    assert!(portcullis::crypto::decode_key(&Secret::new("not base64!")).is_err());
}
