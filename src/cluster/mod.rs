//! Cluster mode: several instances sharing sessions through Redis.
//!
//! - [`config`]: the `[cluster]` table and its validation.
//! - [`seal`]: keyed token hashes and sealed values (what Redis holds).
//! - [`shared`]: sessions in Redis: lookup behind the local cache,
//!   cluster-wide single flight, revocation.
//! - [`jobs`]: remote operations' shared state (job records, output,
//!   cancel requests, locks, run slots, schedule claims).
//! - [`limits`]: rate limits for the whole cluster (GCRA in one Lua call)
//!   and the count of live instances.
//! - this module: the Redis connection, its supervisor (health checks,
//!   reconnection with backoff, the revocation subscription) and metrics.
//!
//! Invariants:
//! - Every Redis call has a deadline (`cluster.timeout`); a failed or late
//!   call is treated as "Redis unavailable", never as an answer about a token.
//! - While Redis is unavailable ([`Cluster::is_up`] false) the request path
//!   makes no Redis call at all, and local entries live at most
//!   `degraded_ttl` (as they always do in cluster mode).
//! - When the subscription (re)connects, the whole local session cache is
//!   dropped: what was missed while disconnected cannot be known.
//! - Every key and channel is under `portcullis:<name>:`.

pub mod config;
pub mod jobs;
pub mod limits;
pub mod runners;
pub mod seal;
pub mod shared;

use crate::sessions::Cached;
use config::ClusterConfig;
use futures_util::StreamExt;
use moka::future::Cache;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use seal::{Keys, TokenHash};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::Notify;

/// How often the supervisor checks that Redis answers.
const HEALTH_EVERY: Duration = Duration::from_millis(500);
/// Revocations remembered while Redis is unreachable (replayed on reconnect).
const MAX_PENDING: usize = 100_000;

/// Metrics of cluster mode (registered only when `[cluster]` is configured).
#[derive(Clone, Debug)]
pub struct ClusterMetrics {
    /// 1 while Redis is reachable and the revocation subscription is live.
    pub up: Gauge,
    /// Seconds from a revocation's publication to its arrival here.
    pub revocation_lag: Histogram,
    /// Local cache misses answered from Redis (no validation call).
    pub shared_hits: Counter,
    /// Redis calls that failed or missed their deadline.
    pub redis_errors: Counter,
    /// Live instances of this cluster, as last counted.
    pub instances: Gauge,
}

impl Default for ClusterMetrics {
    fn default() -> Self {
        ClusterMetrics {
            up: Gauge::default(),
            // 0.1 ms .. ~3.3 s
            revocation_lag: Histogram::new(exponential_buckets(0.000_1, 2.0, 16)),
            shared_hits: Counter::default(),
            redis_errors: Counter::default(),
            instances: Gauge::default(),
        }
    }
}

impl ClusterMetrics {
    /// Registers the metrics (as `portcullis_cluster_*`).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "cluster_up",
            "1 while Redis is reachable and revocations are received",
            self.up.clone(),
        );
        registry.register(
            "cluster_revocation_lag_seconds",
            "Time from a revocation published by another instance to its arrival here",
            self.revocation_lag.clone(),
        );
        registry.register(
            "cluster_shared_hits",
            "Local session cache misses answered from Redis",
            self.shared_hits.clone(),
        );
        registry.register(
            "cluster_redis_errors",
            "Redis calls that failed or missed their deadline",
            self.redis_errors.clone(),
        );
        registry.register(
            "cluster_instances",
            "Live instances of this cluster, as last counted (each enforces this share of a rate limit while Redis is unavailable)",
            self.instances.clone(),
        );
    }
}

/// The local session cache, as the cluster sees it: what to drop when
/// another instance revokes a token or the subscription reconnects.
pub struct Local {
    /// The sessions cache (keyed by [`Cluster::local_key`]).
    pub cache: Cache<u128, Cached>,
    /// Bumped after every change that may end a session (see
    /// [`crate::sessions::Sessions::generation`]).
    pub generation: Arc<AtomicU64>,
}

const STARTING: u8 = 0;
const UP: u8 = 1;
const DOWN: u8 = 2;

/// One instance's membership in a cluster.
pub struct Cluster {
    cfg: ClusterConfig,
    keys: Keys,
    prefix: String,
    channel: String,
    client: redis::Client,
    conn: OnceLock<ConnectionManager>,
    up: AtomicBool,
    state: AtomicU8,
    /// Woken when a request-path call failed: check Redis now.
    kick: Notify,
    started: AtomicBool,
    local: OnceLock<Local>,
    pending: Mutex<Vec<TokenHash>>,
    waiters: Mutex<HashMap<TokenHash, Arc<Notify>>>,
    lock_ttl: Duration,
    gcra: redis::Script,
    members_script: redis::Script,
    members: AtomicU32,
    /// Exported metrics.
    pub metrics: ClusterMetrics,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("name", &self.cfg.name)
            .field("instance", &self.cfg.instance)
            .field("up", &self.is_up())
            .finish_non_exhaustive()
    }
}

/// Microseconds since the Unix epoch.
fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

fn hex_decode32(s: &str) -> Option<TokenHash> {
    let b = s.as_bytes();
    if b.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (o, pair) in out.iter_mut().zip(b.chunks_exact(2)) {
        let hi = (char::from(*pair.first()?)).to_digit(16)?;
        let lo = (char::from(*pair.get(1)?)).to_digit(16)?;
        *o = u8::try_from(hi * 16 + lo).ok()?;
    }
    Some(out)
}

/// The Redis client for `cfg.redis`, with the private CA and client
/// certificate of `cluster.ca` / `cluster.client_cert` when configured.
/// Errors name the setting, never the URL (it may hold a password).
fn redis_client(cfg: &ClusterConfig) -> Result<redis::Client, String> {
    let url = cfg.redis.expose_str().unwrap_or("");
    let unusable =
        |e: redis::RedisError| format!("cluster.redis: not a usable Redis URL: {}", e.category());
    match &cfg.tls {
        None => redis::Client::open(url).map_err(unusable),
        Some(tls) => {
            let certs = redis::TlsCertificates {
                client_tls: tls
                    .client
                    .as_ref()
                    .map(|(cert, key)| redis::ClientTlsConfig {
                        client_cert: cert.clone(),
                        client_key: key.expose().to_vec(),
                    }),
                root_cert: tls.ca_pem.clone(),
            };
            redis::Client::build_with_tls(url, certs).map_err(|e| {
                format!(
                    "cluster.ca / cluster.client_cert: unusable for a TLS Redis connection: {}",
                    e.category()
                )
            })
        }
    }
}

/// What went wrong with a Redis call, for the log: the I/O or TLS reason
/// (e.g. "invalid peer certificate: UnknownIssuer"), else the error's
/// category. Never the URL (it may hold a password).
fn describe(e: &redis::RedisError) -> String {
    if e.is_io_error() {
        e.to_string()
    } else {
        e.category().to_owned()
    }
}

impl Cluster {
    /// A cluster member; nothing connects until [`Cluster::start`].
    /// `validation_deadline` bounds one validation call (the single-flight
    /// lock lives slightly longer).
    pub fn new(
        cfg: ClusterConfig,
        validation_deadline: Duration,
        metrics: ClusterMetrics,
    ) -> Result<Cluster, String> {
        let client = redis_client(&cfg)?;
        let prefix = format!("portcullis:{}:", cfg.name);
        Ok(Cluster {
            keys: Keys::new(&cfg.secret),
            channel: format!("{prefix}events"),
            prefix,
            client,
            conn: OnceLock::new(),
            up: AtomicBool::new(false),
            state: AtomicU8::new(STARTING),
            kick: Notify::new(),
            started: AtomicBool::new(false),
            local: OnceLock::new(),
            pending: Mutex::new(Vec::new()),
            waiters: Mutex::new(HashMap::new()),
            lock_ttl: validation_deadline + Duration::from_secs(1),
            gcra: redis::Script::new(limits::GCRA),
            members_script: redis::Script::new(limits::MEMBERS),
            members: AtomicU32::new(1),
            metrics,
            cfg,
        })
    }

    /// The configuration it runs with.
    pub fn config(&self) -> &ClusterConfig {
        &self.cfg
    }

    /// Whether Redis is reachable and revocations are being received.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    /// The keyed hash of a token.
    pub fn token_hash(&self, token: &[u8]) -> TokenHash {
        self.keys.token_hash(token)
    }

    /// The local cache key of a token hash: its first 16 bytes, so another
    /// instance's revocation (which carries the hash) finds the entry.
    pub fn local_key(hash: &TokenHash) -> u128 {
        let mut k = [0u8; 16];
        for (o, b) in k.iter_mut().zip(hash.iter()) {
            *o = *b;
        }
        u128::from_le_bytes(k)
    }

    /// Connects the local cache (once, by the sessions store).
    pub fn attach(&self, local: Local) {
        let _ = self.local.set(local);
    }

    /// Starts the supervisor (once; later calls do nothing). Must run inside
    /// the tokio runtime.
    pub fn start(self: &Arc<Self>) {
        if self.started.swap(true, Ordering::AcqRel) {
            return;
        }
        tokio::spawn(Arc::clone(self).supervise());
    }

    fn set_up(&self) {
        let before = self.state.swap(UP, Ordering::AcqRel);
        self.up.store(true, Ordering::Release);
        self.metrics.up.set(1);
        match before {
            DOWN => tracing::info!(
                instance = %self.cfg.instance,
                "cluster: Redis reachable again; sessions, revocations and single flight are shared again"
            ),
            STARTING => tracing::info!(
                instance = %self.cfg.instance,
                cluster = %self.cfg.name,
                "cluster: connected to Redis"
            ),
            _ => {}
        }
    }

    fn set_down(&self, why: &str) {
        self.up.store(false, Ordering::Release);
        self.metrics.up.set(0);
        if self.state.swap(DOWN, Ordering::AcqRel) != DOWN {
            tracing::warn!(
                instance = %self.cfg.instance,
                degraded_ttl = ?self.cfg.degraded_ttl,
                "cluster: Redis unavailable ({why}); serving in degraded mode: cached sessions trusted at most degraded_ttl, unknown tokens validated with the backend"
            );
        }
    }

    /// Runs one Redis command under the deadline. `None` when Redis failed
    /// or was late; the supervisor is then asked to check the connection.
    async fn call<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Option<T> {
        let mut conn = self.conn.get()?.clone();
        match tokio::time::timeout(self.cfg.timeout, cmd.query_async::<T>(&mut conn)).await {
            Ok(Ok(v)) => Some(v),
            Ok(Err(e)) => {
                self.metrics.redis_errors.inc();
                tracing::debug!(error = %e.category(), "cluster: Redis call failed");
                if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() {
                    self.kick.notify_one();
                }
                None
            }
            Err(_) => {
                self.metrics.redis_errors.inc();
                self.kick.notify_one();
                None
            }
        }
    }

    /// Runs a Lua script under the deadline (see [`Cluster::call`]).
    async fn invoke<T: redis::FromRedisValue>(
        &self,
        script: &redis::ScriptInvocation<'_>,
    ) -> Option<T> {
        let mut conn = self.conn.get()?.clone();
        match tokio::time::timeout(self.cfg.timeout, script.invoke_async::<T>(&mut conn)).await {
            Ok(Ok(v)) => Some(v),
            Ok(Err(e)) => {
                self.metrics.redis_errors.inc();
                if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() {
                    self.kick.notify_one();
                }
                None
            }
            Err(_) => {
                self.metrics.redis_errors.inc();
                self.kick.notify_one();
                None
            }
        }
    }

    async fn ping(&self) -> bool {
        self.call::<String>(&redis::cmd("PING")).await.is_some()
    }

    async fn supervise(self: Arc<Self>) {
        let mut backoff = Duration::from_millis(100);
        loop {
            let connect_deadline = (self.cfg.timeout * 4).max(Duration::from_secs(1));
            match tokio::time::timeout(connect_deadline, self.connect()).await {
                Ok(Ok(stream)) => {
                    if self.replay_pending().await {
                        backoff = Duration::from_millis(100);
                        self.drop_local();
                        self.set_up();
                        let why = self.serve(stream).await;
                        self.set_down(why);
                        continue;
                    }
                    self.set_down("revocations made during the outage could not be replayed");
                }
                Ok(Err(e)) => self.set_down(&e),
                Err(_) => self.set_down("connecting timed out"),
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    async fn connect(&self) -> Result<redis::aio::PubSubStream, String> {
        if self.conn.get().is_none() {
            // One plain attempt first: the connection manager retries on
            // its own, so a refused TLS handshake (wrong `cluster.ca`, no
            // client certificate) would otherwise only show as a timeout.
            self.client
                .get_multiplexed_async_connection()
                .await
                .map_err(|e| format!("connecting: {}", describe(&e)))?;
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(self.cfg.timeout.max(Duration::from_millis(500)))
                .set_response_timeout(self.cfg.timeout)
                .set_number_of_retries(2)
                .set_max_delay(1000);
            let manager = ConnectionManager::new_with_config(self.client.clone(), config)
                .await
                .map_err(|e| format!("connecting: {}", e.category()))?;
            let _ = self.conn.set(manager);
        }
        if !self.heartbeat().await {
            return Err("no answer".into());
        }
        let mut pubsub = self
            .client
            .get_async_pubsub()
            .await
            .map_err(|e| format!("subscribing: {}", e.category()))?;
        pubsub
            .subscribe(&self.channel)
            .await
            .map_err(|e| format!("subscribing: {}", e.category()))?;
        Ok(pubsub.into_on_message())
    }

    /// Receives events until the subscription or Redis fails; says why.
    async fn serve(&self, mut stream: redis::aio::PubSubStream) -> &'static str {
        let mut health = tokio::time::interval(HEALTH_EVERY);
        health.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                msg = stream.next() => match msg {
                    Some(msg) => self.on_event(msg.get_payload_bytes()).await,
                    None => return "subscription lost",
                },
                _ = health.tick() => {
                    if !self.heartbeat().await {
                        return "no answer to the health check";
                    }
                }
                () = self.kick.notified() => {
                    if !self.ping().await {
                        return "a call failed and PING did not answer";
                    }
                }
            }
        }
    }

    /// Drops every local session (the subscription (re)connected).
    fn drop_local(&self) {
        if let Some(local) = self.local.get() {
            local.cache.invalidate_all();
            local.generation.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// Handles one message on the events channel:
    /// `r <instance> <unix-micros> <hash-hex>...` (revoked) or
    /// `f <hash-hex>` (a validation result was stored).
    async fn on_event(&self, payload: &[u8]) {
        let Ok(text) = std::str::from_utf8(payload) else {
            return;
        };
        let mut parts = text.split(' ');
        match parts.next() {
            Some("r") => {
                let origin = parts.next().unwrap_or("");
                let sent = parts.next().and_then(|t| t.parse::<u64>().ok());
                let mut any = false;
                if let Some(local) = self.local.get() {
                    for hash in parts.filter_map(hex_decode32) {
                        local.cache.invalidate(&Self::local_key(&hash)).await;
                        any = true;
                    }
                    if any {
                        local.generation.fetch_add(1, Ordering::AcqRel);
                    }
                }
                if let (true, Some(sent)) = (any && origin != self.cfg.instance, sent) {
                    let lag = now_micros().saturating_sub(sent);
                    // Precision loss is irrelevant for a latency in seconds.
                    #[allow(clippy::cast_precision_loss)]
                    self.metrics.revocation_lag.observe(lag as f64 / 1e6);
                }
            }
            Some("f") => {
                if let Some(hash) = parts.next().and_then(hex_decode32) {
                    let waiter = self.waiters.lock().ok().and_then(|w| w.get(&hash).cloned());
                    if let Some(n) = waiter {
                        n.notify_one();
                    }
                }
            }
            _ => {}
        }
    }

    /// Deletes revoked sessions in Redis and tells every instance; while
    /// Redis is unavailable they are kept and replayed on reconnect.
    pub async fn revoke(&self, hashes: &[TokenHash]) {
        if hashes.is_empty() {
            return;
        }
        if !(self.is_up() && self.publish_revocation(hashes).await) {
            if let Ok(mut p) = self.pending.lock() {
                if p.len() + hashes.len() <= MAX_PENDING {
                    p.extend_from_slice(hashes);
                } else {
                    tracing::warn!("cluster: too many revocations during the outage; some are only enforced by degraded_ttl");
                }
            }
        }
    }

    async fn publish_revocation(&self, hashes: &[TokenHash]) -> bool {
        let mut del = redis::cmd("DEL");
        let mut msg = format!("r {} {}", self.cfg.instance, now_micros());
        for h in hashes {
            del.arg(self.session_key(h));
            msg.push(' ');
            msg.push_str(&crate::secret::hex(h));
        }
        if self.call::<i64>(&del).await.is_none() {
            return false;
        }
        let mut publish = redis::cmd("PUBLISH");
        publish.arg(&self.channel).arg(msg);
        self.call::<i64>(&publish).await.is_some()
    }

    /// Replays the revocations made while Redis was unavailable; false when
    /// Redis failed again.
    async fn replay_pending(&self) -> bool {
        let pending = match self.pending.lock() {
            Ok(mut p) => std::mem::take(&mut *p),
            Err(_) => return true,
        };
        for (i, chunk) in pending.chunks(256).enumerate() {
            if !self.publish_revocation(chunk).await {
                if let Ok(mut p) = self.pending.lock() {
                    p.extend_from_slice(pending.get(i * 256..).unwrap_or(&[]));
                }
                return false;
            }
        }
        true
    }

    /// The Redis key of a token's session.
    fn session_key(&self, hash: &TokenHash) -> String {
        format!("{}s:{}", self.prefix, crate::secret::hex(hash))
    }

    /// The Redis key of a token's single-flight lock.
    fn lock_key(&self, hash: &TokenHash) -> String {
        format!("{}l:{}", self.prefix, crate::secret::hex(hash))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_round_trip_through_hex() {
        let h: TokenHash = std::array::from_fn(|i| u8::try_from(i * 7 % 256).unwrap());
        assert_eq!(hex_decode32(&crate::secret::hex(&h)), Some(h));
        assert_eq!(hex_decode32("zz"), None);
        assert_eq!(hex_decode32(&"g".repeat(64)), None);
    }
}
