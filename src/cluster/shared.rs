//! Sessions in Redis, behind each instance's local cache.
//!
//! - `portcullis:<name>:s:<hash>`: a token's sealed [`Stored`] record, with
//!   the session's (or the negative entry's) time to live.
//! - `portcullis:<name>:l:<hash>`: the single-flight lock of a token being
//!   validated (`SET NX PX`, released by its holder only).
//! - `portcullis:<name>:events`: revocations and "validation stored" news.

use super::seal::{Stored, TokenHash};
use super::Cluster;
use crate::sessions::CheckError;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// Deletes a lock only when it still holds the caller's value.
const RELEASE: &str = r#"if redis.call("GET", KEYS[1]) == ARGV[1] then return redis.call("DEL", KEYS[1]) else return 0 end"#;

/// Removes a token's waiter registration when its lookup ends.
struct Waiting<'a> {
    cluster: &'a Cluster,
    hash: TokenHash,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if let Ok(mut w) = self.cluster.waiters.lock() {
            w.remove(&self.hash);
        }
    }
}

impl Cluster {
    /// A token's record in Redis: `Ok(None)` when there is none (or it does
    /// not open under this cluster's key), `Err` when Redis failed.
    pub async fn fetch(&self, hash: &TokenHash) -> Result<Option<Stored>, ()> {
        let key = self.session_key(hash);
        let mut get = redis::cmd("GET");
        get.arg(&key);
        let blob: Option<Vec<u8>> = self.call(&get).await.ok_or(())?;
        Ok(blob
            .and_then(|b| self.keys.open(key.as_bytes(), &b))
            .and_then(|plain| Stored::decode(&plain)))
    }

    /// Stores a token's record until it ends (skipped while Redis is
    /// unavailable; false when it was not stored).
    pub async fn store(&self, hash: &TokenHash, stored: &Stored) -> bool {
        if !self.is_up() {
            return false;
        }
        let ttl = match stored.until().duration_since(SystemTime::now()) {
            Ok(left) if left >= Duration::from_millis(1) => left,
            _ => return false,
        };
        let key = self.session_key(hash);
        let blob = self.keys.seal(key.as_bytes(), &stored.encode());
        let mut set = redis::cmd("SET");
        set.arg(&key)
            .arg(blob)
            .arg("PX")
            .arg(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX));
        self.call::<String>(&set).await.is_some()
    }

    /// Stores a validation's outcome, and the rotated token's session too.
    async fn store_outcome(&self, hash: &TokenHash, stored: &Stored) {
        self.store(hash, stored).await;
        if let Stored::Valid {
            expires,
            rotated: Some(new),
        } = stored
        {
            let plain = Stored::Valid {
                expires: *expires,
                rotated: None,
            };
            self.store(&self.token_hash(new.as_bytes()), &plain).await;
        }
    }

    /// Answers a local cache miss: the record in Redis if another instance
    /// stored one, else one validation for the whole cluster (whoever takes
    /// the token's lock validates and stores the result; the others wait for
    /// its news, re-reading the record with growing pauses as a fallback).
    /// While Redis is unavailable (or fails midway) it validates directly:
    /// Redis never decides that a token is refused.
    pub async fn resolve<F, Fut>(&self, hash: &TokenHash, validate: F) -> Result<Stored, CheckError>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<Stored, CheckError>>,
    {
        let mut validate = Some(validate);
        let mut run = || {
            let v = validate.take();
            async move {
                match v {
                    Some(v) => v().await,
                    // Only one of the branches below calls it, once.
                    None => Err(CheckError::Unreachable),
                }
            }
        };
        if !self.is_up() {
            return run().await;
        }
        let news = Arc::clone(
            self.waiters
                .lock()
                .map_err(|_| CheckError::Unreachable)?
                .entry(*hash)
                .or_default(),
        );
        let _waiting = Waiting {
            cluster: self,
            hash: *hash,
        };
        let give_up = Instant::now() + self.lock_ttl;
        let mut pause = Duration::from_millis(10);
        loop {
            let notified = news.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            match self.fetch(hash).await {
                Ok(Some(found)) => {
                    self.metrics.shared_hits.inc();
                    return Ok(found);
                }
                Ok(None) => {}
                Err(()) => return run().await,
            }
            let lock_value = format!("{} {}", self.cfg.instance, fastrand::u64(..));
            let lock = self.lock_key(hash);
            let mut take = redis::cmd("SET");
            take.arg(&lock)
                .arg(&lock_value)
                .arg("NX")
                .arg("PX")
                .arg(u64::try_from(self.lock_ttl.as_millis()).unwrap_or(u64::MAX));
            match self.call::<Option<String>>(&take).await {
                None => return run().await,
                Some(Some(_)) => {
                    let outcome = run().await;
                    if let Ok(stored) = &outcome {
                        self.store_outcome(hash, stored).await;
                    }
                    let release = redis::Script::new(RELEASE);
                    let mut invocation = release.key(&lock);
                    invocation.arg(&lock_value);
                    self.invoke::<i64>(&invocation).await;
                    let mut publish = redis::cmd("PUBLISH");
                    publish
                        .arg(&self.channel)
                        .arg(format!("f {}", crate::secret::hex(hash)));
                    self.call::<i64>(&publish).await;
                    return outcome;
                }
                Some(None) => {}
            }
            if Instant::now() >= give_up {
                return run().await;
            }
            let _ = tokio::time::timeout(pause, notified).await;
            pause = (pause * 2).min(Duration::from_millis(200));
        }
    }

    /// Follows a rotation: the new token gets the old one's session and the
    /// old one's record forwards the new token; other instances re-read it.
    /// `fallback` is the expiry to use when Redis has no record of the old
    /// token.
    pub async fn rotate(&self, old: &TokenHash, new: &str, fallback: SystemTime) {
        if !self.is_up() {
            // Other instances keep the old token's session at most degraded_ttl.
            return;
        }
        let expires = match self.fetch(old).await {
            Ok(Some(Stored::Valid { expires, .. })) => expires,
            _ => fallback,
        };
        let plain = Stored::Valid {
            expires,
            rotated: None,
        };
        self.store(&self.token_hash(new.as_bytes()), &plain).await;
        let forward = Stored::Valid {
            expires,
            rotated: Some(new.to_owned()),
        };
        if self.store(old, &forward).await {
            let mut publish = redis::cmd("PUBLISH");
            publish.arg(&self.channel).arg(format!(
                "r {} {} {}",
                self.cfg.instance,
                super::now_micros(),
                crate::secret::hex(old)
            ));
            self.call::<i64>(&publish).await;
        }
    }
}
