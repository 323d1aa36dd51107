//! `[cluster]`: the raw TOML table and its validation into [`ClusterConfig`].

use crate::config::{parse_duration, Problems};
use crate::secret::{self, Secret};
use serde::Deserialize;
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
}

impl std::fmt::Debug for ClusterConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterConfig")
            .field("redis", &"***")
            .field("name", &self.name)
            .field("instance", &self.instance)
            .field("degraded_ttl", &self.degraded_ttl)
            .field("timeout", &self.timeout)
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
    Some(ClusterConfig {
        redis: redis?,
        name: name?,
        secret: secret?,
        instance: instance?,
        degraded_ttl,
        timeout,
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
