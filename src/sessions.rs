//! User sessions: the token cache, validation of unknown tokens with
//! single flight and negative caching, expiry, rotation and eviction.
//!
//! Invariants:
//! - The cache is keyed by a keyed hash of the token (a random per-process
//!   salt), never by the token itself; no token is ever logged.
//! - Concurrent requests for the same uncached token make exactly one
//!   validation call (moka's `try_get_with` coalesces them); they all share
//!   its outcome, a failure included.
//! - A refused token is remembered for `negative_ttl` and never served from
//!   `stale_if_error`.
//!
//! Over the crate's 600-line guide only with its unit tests, which sit beside
//! the code.

use crate::cluster::seal::Stored;
use crate::cluster::{Cluster, Local};
use crate::config::SessionsConfig;
use moka::future::Cache;
use prometheus_client::metrics::counter::Counter;
use sha2::{Digest, Sha256};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime};

/// A point in time as milliseconds since the process's first use of it:
/// 8 bytes per cached session instead of an `Instant`'s 16, which matters
/// with a million sessions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Deadline(u64);

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

impl Deadline {
    /// Now.
    pub fn now() -> Deadline {
        Deadline(u64::try_from(epoch().elapsed().as_millis()).unwrap_or(u64::MAX))
    }

    /// This deadline moved `d` later.
    pub fn plus(self, d: Duration) -> Deadline {
        Deadline(
            self.0
                .saturating_add(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        )
    }

    /// Whether the deadline is reached.
    pub fn passed(self) -> bool {
        Deadline::now() >= self
    }

    /// The time left until the deadline (zero once passed).
    pub fn left(self) -> Duration {
        Duration::from_millis(self.0.saturating_sub(Deadline::now().0))
    }
}

/// A cached answer about one token.
#[derive(Clone, Debug)]
pub enum Cached {
    /// A valid session.
    Valid(Session),
    /// Refused by the validation service (negative entry), until then.
    Invalid { until: Deadline },
}

/// A valid session.
#[derive(Clone, Debug)]
pub struct Session {
    /// Served without a backend call until then.
    pub fresh_until: Deadline,
    /// The token to forward when the backend rotated it.
    pub rotated: Option<Arc<str>>,
}

/// What the validation service said, as the caller classifies it.
#[derive(Debug)]
pub enum Validation {
    /// 200, with the expiry it gave (if any) and a rotated token (if any).
    Valid {
        expires: Option<SystemTime>,
        rotated: Option<String>,
    },
    /// 401/403.
    Refused,
}

/// Why a token could not be checked (nothing is cached for these).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CheckError {
    #[error("token invalid")]
    Invalid,
    #[error("validation service unreachable")]
    Unreachable,
    #[error("validation service timed out")]
    Timeout,
    #[error("validation service answered something unusable")]
    BadResponse,
}

/// The session store.
pub struct Sessions {
    cache: Cache<u128, Cached>,
    hits: Counter,
    misses: Counter,
    salt: [u8; 32],
    cfg: SessionsConfig,
    /// Bumped after every eviction and rotation (see [`Sessions::generation`]).
    generation: Arc<AtomicU64>,
    /// Cluster mode: Redis behind the cache, revocations shared.
    cluster: Option<Arc<Cluster>>,
}

impl std::fmt::Debug for Sessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sessions")
            .field("entries", &self.cache.entry_count())
            .finish_non_exhaustive()
    }
}

impl Sessions {
    /// An empty store bounded by `cfg.max_entries`.
    pub fn new(cfg: SessionsConfig) -> Sessions {
        Sessions::with_counters(cfg, Counter::default(), Counter::default())
    }

    /// An empty store that counts cache hits and misses into the given counters.
    pub fn with_counters(cfg: SessionsConfig, hits: Counter, misses: Counter) -> Sessions {
        Sessions::build(cfg, hits, misses, None)
    }

    /// An empty store in cluster mode: sessions are shared through Redis,
    /// and every local entry is checked again at least every
    /// `cluster.degraded_ttl`.
    pub fn with_cluster(
        cfg: SessionsConfig,
        hits: Counter,
        misses: Counter,
        cluster: Arc<Cluster>,
    ) -> Sessions {
        Sessions::build(cfg, hits, misses, Some(cluster))
    }

    fn build(
        cfg: SessionsConfig,
        hits: Counter,
        misses: Counter,
        cluster: Option<Arc<Cluster>>,
    ) -> Sessions {
        let mut salt = [0u8; 32];
        {
            use aes_gcm::aead::rand_core::RngCore;
            aes_gcm::aead::OsRng.fill_bytes(&mut salt);
        }
        // One time-to-live for the whole cache instead of per-entry expiry
        // (which costs a timer-wheel node per entry): every entry carries its
        // own deadline, checked on each read, and none can outlive this.
        let stale_window = cfg.stale_if_error.unwrap_or(Duration::ZERO);
        let cache = Cache::builder()
            .max_capacity(cfg.max_entries)
            .time_to_live((cfg.max_ttl + stale_window).max(cfg.negative_ttl))
            .build();
        let generation = Arc::new(AtomicU64::new(0));
        if let Some(c) = &cluster {
            c.attach(Local {
                cache: cache.clone(),
                generation: Arc::clone(&generation),
            });
        }
        Sessions {
            cache,
            hits,
            misses,
            salt,
            cfg,
            generation,
            cluster,
        }
    }

    /// The cluster this store shares sessions with, in cluster mode.
    pub fn cluster(&self) -> Option<&Arc<Cluster>> {
        self.cluster.as_ref()
    }

    /// A number that changes whenever a session may have ended or been
    /// rotated (logout, a backend's 401/403, a rotation): bumped *after* the
    /// cache changed. A session read from [`Sessions::check`] after reading
    /// the generation stays good to reuse for as long as the generation is
    /// unchanged and the session is fresh; connections memoize on that.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Counts a session served from a connection's memo as a cache hit.
    pub fn count_hit(&self) {
        self.hits.inc();
    }

    fn changed(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// The cache key of a token: a keyed hash, so the token itself is never stored.
    pub fn key(&self, token: &[u8]) -> u128 {
        if let Some(c) = &self.cluster {
            return Cluster::local_key(&c.token_hash(token));
        }
        let digest = Sha256::new()
            .chain_update(self.salt)
            .chain_update(token)
            .finalize();
        let mut k = [0u8; 16];
        k.copy_from_slice(&digest[..16]);
        u128::from_le_bytes(k)
    }

    fn session_from(&self, expires: Option<SystemTime>, rotated: Option<String>) -> Cached {
        let now = Deadline::now();
        let ttl = match expires {
            None => self.cfg.max_ttl,
            Some(at) => match at.duration_since(SystemTime::now()) {
                Ok(left) => left.min(self.cfg.max_ttl),
                Err(_) => {
                    return Cached::Invalid {
                        until: now.plus(self.cfg.negative_ttl),
                    }
                }
            },
        };
        Cached::Valid(Session {
            fresh_until: now.plus(self.local_ttl(ttl)),
            rotated: rotated.map(Arc::from),
        })
    }

    /// How long an entry may live locally: in cluster mode at most
    /// `degraded_ttl`, so a missed revocation cannot outlive it.
    fn local_ttl(&self, ttl: Duration) -> Duration {
        match &self.cluster {
            Some(c) => ttl.min(c.config().degraded_ttl),
            None => ttl,
        }
    }

    /// A validation's outcome as the cluster stores it.
    fn stored_from(&self, v: Validation, token: &str) -> Stored {
        let now = SystemTime::now();
        let refused = Stored::Refused {
            until: now + self.cfg.negative_ttl,
        };
        match v {
            Validation::Valid { expires, rotated } => {
                let left = match expires {
                    None => self.cfg.max_ttl,
                    Some(at) => match at.duration_since(now) {
                        Ok(left) => left.min(self.cfg.max_ttl),
                        Err(_) => return refused,
                    },
                };
                Stored::Valid {
                    expires: now + left,
                    rotated: rotated.filter(|r| r != token),
                }
            }
            Validation::Refused => refused,
        }
    }

    /// A record from the cluster as a local entry (at most `degraded_ttl`).
    fn entry_from_stored(&self, s: &Stored) -> Cached {
        let now = SystemTime::now();
        let left = |at: SystemTime| at.duration_since(now).unwrap_or(Duration::ZERO);
        match s {
            Stored::Valid { expires, rotated } => {
                if left(*expires).is_zero() {
                    return Cached::Invalid {
                        until: Deadline::now().plus(self.local_ttl(self.cfg.negative_ttl)),
                    };
                }
                Cached::Valid(Session {
                    fresh_until: Deadline::now()
                        .plus(self.local_ttl(left(*expires).min(self.cfg.max_ttl))),
                    rotated: rotated.as_deref().map(Arc::from),
                })
            }
            Stored::Refused { until } => Cached::Invalid {
                until: Deadline::now().plus(self.local_ttl(left(*until))),
            },
        }
    }

    /// The miss path in cluster mode: Redis, else one validation for the
    /// whole cluster.
    async fn resolve_shared<F, Fut>(
        &self,
        cluster: &Cluster,
        token: &str,
        validate: F,
    ) -> Result<Cached, CheckError>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<Validation, CheckError>>,
    {
        let hash = cluster.token_hash(token.as_bytes());
        let stored = cluster
            .resolve(&hash, || async {
                Ok(self.stored_from(validate().await?, token))
            })
            .await?;
        let entry = self.entry_from_stored(&stored);
        if let (
            Cached::Valid(s),
            Stored::Valid {
                rotated: Some(new), ..
            },
        ) = (&entry, &stored)
        {
            let plain = Session {
                fresh_until: s.fresh_until,
                rotated: None,
            };
            self.cache
                .insert(self.key(new.as_bytes()), Cached::Valid(plain))
                .await;
        }
        Ok(entry)
    }

    /// Checks a token: from the cache when fresh, otherwise through `validate`
    /// (called at most once however many requests wait on the same token).
    pub async fn check<F, Fut>(&self, token: &str, validate: F) -> Result<Session, CheckError>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<Validation, CheckError>>,
    {
        let key = self.key(token.as_bytes());
        let stale = match self.cache.get(&key).await {
            Some(Cached::Valid(s)) if !s.fresh_until.passed() => {
                self.hits.inc();
                return Ok(s);
            }
            Some(Cached::Invalid { until }) if !until.passed() => {
                self.hits.inc();
                return Err(CheckError::Invalid);
            }
            // Past its freshness (kept for stale_if_error): revalidate.
            Some(Cached::Valid(s)) => Some(Some(s)),
            // A negative entry past its time: ask again.
            Some(Cached::Invalid { .. }) => Some(None),
            None => None,
        };
        // The miss path is boxed: its future (validation call included) is
        // large, and the hit path should not carry it.
        Box::pin(self.miss(key, token, stale, validate)).await
    }

    async fn miss<F, Fut>(
        &self,
        key: u128,
        token: &str,
        outdated: Option<Option<Session>>,
        validate: F,
    ) -> Result<Session, CheckError>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<Validation, CheckError>>,
    {
        // An outdated entry would be returned as is by `try_get_with`.
        if outdated.is_some() {
            self.cache.invalidate(&key).await;
        }
        let stale = outdated.flatten();
        self.misses.inc();
        let init = async {
            if let Some(c) = &self.cluster {
                return self.resolve_shared(c, token, validate).await;
            }
            match validate().await? {
                Validation::Valid { expires, rotated } => {
                    let rotated = rotated.filter(|r| r != token);
                    let entry = self.session_from(expires, rotated.clone());
                    if let (Cached::Valid(s), Some(new)) = (&entry, &rotated) {
                        let plain = Session {
                            fresh_until: s.fresh_until,
                            rotated: None,
                        };
                        self.cache
                            .insert(self.key(new.as_bytes()), Cached::Valid(plain))
                            .await;
                    }
                    Ok(entry)
                }
                Validation::Refused => Ok(Cached::Invalid {
                    until: Deadline::now().plus(self.cfg.negative_ttl),
                }),
            }
        };
        match self.cache.try_get_with(key, init).await {
            Ok(Cached::Valid(s)) => Ok(s),
            Ok(Cached::Invalid { .. }) => Err(CheckError::Invalid),
            Err(e) => match (stale, self.cfg.stale_if_error) {
                (Some(s), Some(window)) if !s.fresh_until.plus(window).passed() => {
                    tracing::warn!(
                        "validation service failing ({e}); serving a recently valid session"
                    );
                    self.cache.insert(key, Cached::Valid(s.clone())).await;
                    Ok(s)
                }
                _ => Err(*e),
            },
        }
    }

    /// Caches a session established by `/login`. Returns false (and caches
    /// nothing) when the expiry is already past.
    pub async fn insert_login(&self, token: &str, expires: Option<SystemTime>) -> bool {
        if let Some(c) = &self.cluster {
            let stored = self.stored_from(
                Validation::Valid {
                    expires,
                    rotated: None,
                },
                token,
            );
            if !matches!(stored, Stored::Valid { .. }) {
                return false;
            }
            let hash = c.token_hash(token.as_bytes());
            let entry = self.entry_from_stored(&stored);
            self.cache.insert(Cluster::local_key(&hash), entry).await;
            c.store(&hash, &stored).await;
            return true;
        }
        let entry = self.session_from(expires, None);
        let valid = matches!(entry, Cached::Valid(_));
        if valid {
            self.cache.insert(self.key(token.as_bytes()), entry).await;
        }
        valid
    }

    /// Follows a rotation announced by a backend answer: the new token gets
    /// the old one's session, and the old one forwards the new token.
    pub async fn rotate(&self, old: &str, new: &str) {
        if old == new {
            return;
        }
        let old_key = self.key(old.as_bytes());
        if let Some(Cached::Valid(s)) = self.cache.get(&old_key).await {
            let fresh_until = s.fresh_until;
            self.cache
                .insert(
                    self.key(new.as_bytes()),
                    Cached::Valid(Session {
                        fresh_until,
                        rotated: None,
                    }),
                )
                .await;
            self.cache
                .insert(
                    old_key,
                    Cached::Valid(Session {
                        fresh_until,
                        rotated: Some(Arc::from(new)),
                    }),
                )
                .await;
            self.changed();
            if let Some(c) = &self.cluster {
                let fallback = SystemTime::now() + fresh_until.left();
                c.rotate(&c.token_hash(old.as_bytes()), new, fallback).await;
            }
        }
    }

    /// Forgets a token (logout, or the backend answered 401/403 for it),
    /// together with the token it was rotated to.
    pub async fn evict(&self, token: &str) {
        let mut rotated = None;
        if let Some(Cached::Valid(s)) = self.cache.remove(&self.key(token.as_bytes())).await {
            if let Some(new) = s.rotated {
                self.cache.invalidate(&self.key(new.as_bytes())).await;
                rotated = Some(new);
            }
        }
        self.changed();
        if let Some(c) = &self.cluster {
            let mut hashes = vec![c.token_hash(token.as_bytes())];
            hashes.extend(rotated.map(|new| c.token_hash(new.as_bytes())));
            c.revoke(&hashes).await;
        }
    }

    /// Entries currently cached (after applying pending cache maintenance).
    pub async fn entry_count(&self) -> u64 {
        self.cache.run_pending_tasks().await;
        self.cache.entry_count()
    }
}

/// Parses `expiration-date`: `YYYY-MM-DD HH:MM:SS` (UTC) or RFC 3339.
pub fn parse_expiration(s: &str) -> Option<SystemTime> {
    let s = s.trim();
    humantime::parse_rfc3339_weak(s)
        .ok()
        .or_else(|| parse_rfc3339_offset(s))
}

/// RFC 3339 with a numeric offset (`+02:00`), which humantime does not take.
fn parse_rfc3339_offset(s: &str) -> Option<SystemTime> {
    let (base, sign, off) = match s.get(19..) {
        Some(rest) => {
            let idx = rest.rfind(['+', '-'])? + 19;
            (&s[..idx], &s[idx..idx + 1], &s[idx + 1..])
        }
        None => return None,
    };
    let (h, m) = off.split_once(':')?;
    let secs = h.parse::<u64>().ok()? * 3600 + m.parse::<u64>().ok()? * 60;
    let t = humantime::parse_rfc3339_weak(base).ok()?;
    let d = Duration::from_secs(secs);
    if sign == "+" {
        t.checked_sub(d)
    } else {
        t.checked_add(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn cfg() -> SessionsConfig {
        SessionsConfig {
            validate_method: http::Method::POST,
            validate_path: "/renew_session".into(),
            login_path: "/login".into(),
            logout_path: None,
            max_entries: 1000,
            max_ttl: Duration::from_secs(3600),
            negative_ttl: Duration::from_secs(30),
            stale_if_error: None,
        }
    }

    #[test]
    fn expiration_formats() {
        let a = parse_expiration("2030-01-02 03:04:05").unwrap();
        let b = parse_expiration("2030-01-02T03:04:05Z").unwrap();
        let c = parse_expiration("2030-01-02T05:04:05+02:00").unwrap();
        assert_eq!(a, b);
        assert_eq!(a, c);
        assert!(parse_expiration("tomorrow").is_none());
    }

    #[tokio::test]
    async fn negative_entries_are_remembered() {
        let s = Sessions::new(cfg());
        let calls = AtomicUsize::new(0);
        for _ in 0..3 {
            let r = s
                .check("bad", || async {
                    calls.fetch_add(1, Ordering::SeqCst);
                    Ok(Validation::Refused)
                })
                .await;
            assert_eq!(r.unwrap_err(), CheckError::Invalid);
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn errors_are_not_cached_and_expired_logins_refused() {
        let s = Sessions::new(cfg());
        let r = s
            .check("t", || async { Err(CheckError::Unreachable) })
            .await;
        assert_eq!(r.unwrap_err(), CheckError::Unreachable);
        let r = s
            .check("t", || async {
                Ok(Validation::Valid {
                    expires: None,
                    rotated: None,
                })
            })
            .await;
        assert!(r.is_ok());
        let past = SystemTime::now() - Duration::from_secs(10);
        assert!(!s.insert_login("old", Some(past)).await);
    }

    #[tokio::test]
    async fn rotation_and_eviction() {
        let s = Sessions::new(cfg());
        assert!(s.insert_login("a", None).await);
        s.rotate("a", "b").await;
        let fail = || async { Err(CheckError::Unreachable) };
        let a = s.check("a", fail).await.unwrap();
        assert_eq!(a.rotated.as_deref(), Some("b"));
        assert!(s.check("b", fail).await.is_ok());
        s.evict("a").await;
        assert!(s.check("a", fail).await.is_err());
        assert!(s.check("b", fail).await.is_err());
    }

    #[tokio::test]
    async fn keys_do_not_reveal_tokens() {
        let s = Sessions::new(cfg());
        assert_ne!(s.key(b"x"), Sessions::new(cfg()).key(b"x"));
    }
}
