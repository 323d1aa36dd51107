//! `[cluster]`: the raw TOML table and its validation into [`ClusterConfig`].

use crate::config::{parse_duration, Problems};
use crate::secret::{self, Secret};
use serde::Deserialize;
use std::path::Path;
use std::time::Duration;

/// The shortest accepted `cluster.secret`, in bytes.
pub const MIN_SECRET: usize = 32;

/// `[cluster]` as written in the configuration file.
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct RawCluster {
    redis: Option<String>,
    name: Option<String>,
    secret: Option<String>,
    instance: Option<String>,
    degraded_ttl: Option<String>,
    timeout: Option<String>,
    ca: Option<String>,
    client_cert: Option<String>,
    client_key: Option<String>,
}

/// TLS material for a `rediss://` connection, read from the files named by
/// `cluster.ca`, `cluster.client_cert` and `cluster.client_key`.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisTls {
    /// PEM CA certificates: when set, only these are trusted for the Redis
    /// server's certificate (instead of the system store).
    pub ca_pem: Option<Vec<u8>>,
    /// PEM client certificate chain and private key, presented when Redis
    /// asks for one (`tls-auth-clients yes`).
    pub client: Option<(Vec<u8>, Secret)>,
}

impl std::fmt::Debug for RedisTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisTls")
            .field("ca", &self.ca_pem.is_some())
            .field("client_cert", &self.client.is_some())
            .finish()
    }
}

/// The validated `[cluster]` table.
#[derive(Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// The Redis URL (`redis://` or `rediss://`); may hold a password, so it
    /// never prints.
    pub redis: Secret,
    /// The namespace: every key and channel starts with `portcullis:<name>:`.
    pub name: String,
    /// The shared secret the key hashes and sealing keys derive from.
    pub secret: Secret,
    /// This instance's name (logs, metrics).
    pub instance: String,
    /// While Redis is unreachable, a locally cached session is trusted at
    /// most this long; also the longest any local entry lives unchecked.
    pub degraded_ttl: Duration,
    /// The deadline of every Redis call.
    pub timeout: Duration,
    /// A private CA and/or client certificate for `rediss://`; `None` means
    /// the system CA store and no client certificate.
    pub tls: Option<RedisTls>,
}

impl std::fmt::Debug for ClusterConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterConfig")
            .field("redis", &"***")
            .field("name", &self.name)
            .field("instance", &self.instance)
            .field("degraded_ttl", &self.degraded_ttl)
            .field("timeout", &self.timeout)
            .field("tls", &self.tls)
            .finish_non_exhaustive()
    }
}

/// Whether `s` is a usable name: 1 to 64 of `[A-Za-z0-9._-]`.
fn name_ok(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// This machine's host name, or `None`.
fn host_name() -> Option<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())?;
    let name = name.trim().to_owned();
    (!name.is_empty()).then_some(name)
}

/// Reads and checks `cluster.ca`, `cluster.client_cert` and
/// `cluster.client_key`; `tls_url` says whether `cluster.redis` is
/// `rediss://` (`None` when the URL itself was unusable). Problems name the
/// files, never their contents.
fn validate_tls(raw: &RawCluster, tls_url: Option<bool>, p: &mut Problems) -> Option<RedisTls> {
    if raw.ca.is_none() && raw.client_cert.is_none() && raw.client_key.is_none() {
        return None;
    }
    if tls_url == Some(false) {
        for (key, set) in [
            ("cluster.ca", raw.ca.is_some()),
            ("cluster.client_cert", raw.client_cert.is_some()),
            ("cluster.client_key", raw.client_key.is_some()),
        ] {
            if set {
                p.push(
                    key,
                    "only meaningful with a rediss:// (TLS) cluster.redis URL",
                );
            }
        }
        return None;
    }
    let ca_pem = match raw.ca.as_deref() {
        None => None,
        Some(path) => match read_ca(Path::new(path)) {
            Ok(pem) => Some(pem),
            Err(e) => {
                p.push("cluster.ca", e);
                return None;
            }
        },
    };
    let client = match (raw.client_cert.as_deref(), raw.client_key.as_deref()) {
        (None, None) => None,
        (Some(cert), Some(key)) => {
            let (cert, key) = (Path::new(cert), Path::new(key));
            // Parses both and checks that the key matches the certificate.
            if let Err(e) = crate::tls::load_certified_key(cert, key) {
                p.push("cluster.client_cert", e);
                return None;
            }
            match (std::fs::read(cert), std::fs::read(key)) {
                (Ok(c), Ok(k)) => Some((c, Secret::new(k))),
                (Err(e), _) => {
                    p.push(
                        "cluster.client_cert",
                        format!("cannot read {}: {e}", cert.display()),
                    );
                    return None;
                }
                (_, Err(e)) => {
                    p.push(
                        "cluster.client_key",
                        format!("cannot read {}: {e}", key.display()),
                    );
                    return None;
                }
            }
        }
        _ => {
            p.push(
                "cluster.client_cert",
                "client_cert and client_key go together",
            );
            return None;
        }
    };
    Some(RedisTls { ca_pem, client })
}

/// Reads a PEM file of CA certificates, checking that each one is usable as
/// a trust anchor; returns the file's bytes.
fn read_ca(path: &Path) -> Result<Vec<u8>, String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in crate::tls::read_cert_chain(path)? {
        roots
            .add(cert)
            .map_err(|e| format!("{}: unusable CA certificate: {e}", path.display()))?;
    }
    std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

/// Validates `[cluster]`, pushing every problem into `p`.
pub fn validate(raw: &RawCluster, p: &mut Problems) -> Option<ClusterConfig> {
    let redis = match raw.redis.as_deref() {
        None => {
            p.push("cluster.redis", "required (redis://host:port/db)");
            None
        }
        Some(spec) => match secret::resolve(spec) {
            Err(e) => {
                p.push("cluster.redis", e);
                None
            }
            Ok(url) => {
                let text = url.expose_str().unwrap_or("");
                if !(text.starts_with("redis://") || text.starts_with("rediss://")) {
                    p.push(
                        "cluster.redis",
                        "must be a redis:// or rediss:// URL (or env:VAR / file:PATH holding one)",
                    );
                    None
                } else if let Err(e) = redis::Client::open(text) {
                    // redis-rs errors describe the problem, never the password.
                    p.push(
                        "cluster.redis",
                        format!("not a usable Redis URL: {}", e.category()),
                    );
                    None
                } else {
                    Some(url)
                }
            }
        },
    };
    let name = match raw.name.as_deref() {
        Some(n) if name_ok(n) => Some(n.to_owned()),
        Some(n) => {
            p.push(
                "cluster.name",
                format!("{n:?}: use 1 to 64 letters, digits, '.', '_' or '-'"),
            );
            None
        }
        None => {
            p.push("cluster.name", "required (the namespace of every key)");
            None
        }
    };
    let secret = match raw.secret.as_deref() {
        None => {
            p.push(
                "cluster.secret",
                format!("required (at least {MIN_SECRET} bytes, the same on every instance)"),
            );
            None
        }
        Some(spec) => match secret::resolve(spec) {
            Ok(s) if s.expose().len() >= MIN_SECRET => Some(s),
            Ok(s) => {
                p.push(
                    "cluster.secret",
                    format!(
                        "must be at least {MIN_SECRET} bytes, found {}",
                        s.expose().len()
                    ),
                );
                None
            }
            Err(e) => {
                p.push("cluster.secret", e);
                None
            }
        },
    };
    let instance = match raw.instance.as_deref() {
        Some(i) if name_ok(i) => Some(i.to_owned()),
        Some(i) => {
            p.push(
                "cluster.instance",
                format!("{i:?}: use 1 to 64 letters, digits, '.', '_' or '-'"),
            );
            None
        }
        None => match host_name() {
            Some(h) if name_ok(&h) => Some(h),
            _ => {
                p.push(
                    "cluster.instance",
                    "the host name is unusable as an instance name: set cluster.instance",
                );
                None
            }
        },
    };
    let mut duration = |key: &str, raw: &Option<String>, default: Duration| match raw {
        None => default,
        Some(s) => match parse_duration(s) {
            Ok(d) if !d.is_zero() => d,
            Ok(_) => {
                p.push(format!("cluster.{key}"), "must be more than 0");
                default
            }
            Err(e) => {
                p.push(format!("cluster.{key}"), e);
                default
            }
        },
    };
    let degraded_ttl = duration("degraded_ttl", &raw.degraded_ttl, Duration::from_secs(10));
    let timeout = duration("timeout", &raw.timeout, Duration::from_millis(250));
    let tls_url = redis
        .as_ref()
        .map(|u| u.expose_str().is_some_and(|t| t.starts_with("rediss://")));
    let tls = validate_tls(raw, tls_url, p);
    Some(ClusterConfig {
        redis: redis?,
        name: name?,
        secret: secret?,
        instance: instance?,
        degraded_ttl,
        timeout,
        tls,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(toml_text: &str) -> RawCluster {
        toml::from_str(toml_text).unwrap()
    }

    #[test]
    fn a_full_table_validates() {
        let mut p = Problems::default();
        let c = validate(
            &raw(r#"redis = "redis://127.0.0.1:6379/0"
name = "prod"
secret = "0123456789abcdef0123456789abcdef"
instance = "gw-1"
degraded_ttl = "5s""#),
            &mut p,
        )
        .unwrap();
        assert!(p.0.is_empty(), "{p}");
        assert_eq!(c.name, "prod");
        assert_eq!(c.instance, "gw-1");
        assert_eq!(c.degraded_ttl, Duration::from_secs(5));
        assert_eq!(c.timeout, Duration::from_millis(250));
        assert!(!format!("{c:?}").contains("0123456789abcdef"));
    }

    #[test]
    fn tls_urls_are_accepted() {
        let mut p = Problems::default();
        let c = validate(
            &raw(r#"redis = "rediss://user:pw@redis.internal:6380/2"
name = "prod"
secret = "0123456789abcdef0123456789abcdef"
instance = "gw-1""#),
            &mut p,
        );
        assert!(p.0.is_empty(), "{p}");
        assert!(c.is_some());
    }

    const BASE: &str = r#"name = "prod"
secret = "0123456789abcdef0123456789abcdef"
instance = "gw-1"
"#;

    fn check(lines: &str) -> (Option<ClusterConfig>, String) {
        let mut p = Problems::default();
        let c = validate(&raw(&format!("{BASE}{lines}")), &mut p);
        (c, p.to_string())
    }

    #[test]
    fn a_private_ca_and_client_certificate_are_read_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let ca = crate::devcerts::DevCa::new("test CA").unwrap();
        let client = ca.issue_client("gw").unwrap();
        let other = ca.issue_client("other").unwrap();
        let write = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            path.display().to_string()
        };
        let ca_path = write("ca.pem", &ca.ca.cert_pem);
        let cert = write("client.pem", &client.cert_pem);
        let key = write("client.key", &client.key_pem);
        let wrong_key = write("other.key", &other.key_pem);
        let not_pem = write("junk.pem", "not a certificate");
        let tls = "redis = \"rediss://redis.internal:6380/0\"\n";

        let (c, text) = check(&format!(
            "{tls}ca = \"{ca_path}\"\nclient_cert = \"{cert}\"\nclient_key = \"{key}\""
        ));
        assert!(text.is_empty(), "{text}");
        let t = c.unwrap().tls.unwrap();
        assert_eq!(t.ca_pem.as_deref(), Some(ca.ca.cert_pem.as_bytes()));
        assert!(t.client.is_some());
        assert!(!format!("{t:?}").contains("PRIVATE"));

        for (lines, key_name, needle) in [
            (
                format!("ca = \"{not_pem}\""),
                "cluster.ca",
                "no CERTIFICATE found",
            ),
            (
                "ca = \"/nonexistent/ca.pem\"".to_owned(),
                "cluster.ca",
                "cannot read /nonexistent/ca.pem",
            ),
            (
                format!("client_cert = \"{cert}\""),
                "cluster.client_cert",
                "go together",
            ),
            (
                format!("client_cert = \"{cert}\"\nclient_key = \"{wrong_key}\""),
                "cluster.client_cert",
                "does not match",
            ),
        ] {
            let (c, text) = check(&format!("{tls}{lines}"));
            assert!(c.is_none() || !text.is_empty(), "{lines}");
            assert!(text.contains(key_name), "{lines}: {text}");
            assert!(text.contains(needle), "{lines}: {text}");
            assert!(!text.contains("PRIVATE KEY-----"), "{text}");
        }

        let (_, text) = check(&format!(
            "redis = \"redis://127.0.0.1:6379/0\"\nca = \"{ca_path}\""
        ));
        assert!(
            text.contains("cluster.ca") && text.contains("rediss://"),
            "{text}"
        );
    }

    #[test]
    fn every_problem_is_reported() {
        let mut p = Problems::default();
        let c = validate(
            &raw(r#"redis = "http://x"
name = "a b"
secret = "short"
instance = ""
degraded_ttl = "0s""#),
            &mut p,
        );
        assert!(c.is_none());
        let text = p.to_string();
        for key in [
            "cluster.redis",
            "cluster.name",
            "cluster.secret",
            "cluster.instance",
            "cluster.degraded_ttl",
        ] {
            assert!(text.contains(key), "{key} missing in {text}");
        }
        assert!(!text.contains("short"), "the secret leaked: {text}");
    }

    #[test]
    fn secrets_and_urls_come_from_the_environment() {
        std::env::set_var("PORTCULLIS_TEST_CLUSTER_URL", "redis://:pw@127.0.0.1:1/0");
        let mut p = Problems::default();
        let c = validate(
            &raw(r#"redis = "env:PORTCULLIS_TEST_CLUSTER_URL"
name = "x"
secret = "env:PORTCULLIS_TEST_CLUSTER_SECRET_UNSET""#),
            &mut p,
        );
        assert!(c.is_none());
        let text = p.to_string();
        assert!(
            text.contains("PORTCULLIS_TEST_CLUSTER_SECRET_UNSET is not set"),
            "{text}"
        );
        assert!(!text.contains("cluster.redis"), "{text}");
    }
}
