//! Rate limits for the whole cluster, and the count of live instances.
//!
//! - `portcullis:<name>:rl:<hash>`: one limit key's GCRA state (its
//!   theoretical arrival time, in microseconds of Redis's clock), updated by
//!   one Lua call per admitted-locally request; `<hash>` is keyed by the
//!   cluster secret, so neither API key names nor addresses reach Redis.
//! - `portcullis:<name>:members`: live instances (a sorted set scored by
//!   the last health check), counted for the degraded share of each limit.
//!
//! One Lua call per request was chosen over local shares synchronised in the
//! background: it is exact (the admitted rate is the configured one, however
//! traffic is spread), it costs a Redis round trip only on requests a limit
//! applies to and that the instance's own full-rate limiter admitted (a flood
//! on one instance is refused locally without reaching Redis), and the
//! cached-token path without limits makes no call at all (docs/cluster.md,
//! "Cost").

use super::Cluster;
use crate::config::Rate;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// GCRA in one call. KEYS[1]: the limit key; ARGV[1]: emission interval
/// (µs); ARGV[2]: burst tolerance (µs). Returns 0 when admitted, else the
/// wait in µs. Uses Redis's clock, so instances' clocks do not matter.
pub(super) const GCRA: &str = r#"
local t = redis.call("TIME")
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local tat = tonumber(redis.call("GET", KEYS[1])) or now
if tat < now then tat = now end
local wait = tat - now - tolerance
if wait > 0 then return math.ceil(wait) end
local new = tat + interval
redis.call("SET", KEYS[1], string.format("%.0f", new), "PX", math.ceil((new - now) / 1000) + 1)
return 0
"#;

/// Marks this instance alive and counts the live ones. KEYS[1]: the members
/// set; ARGV[1]: this instance; ARGV[2]: how long one stays counted (ms).
pub(super) const MEMBERS: &str = r#"
local t = redis.call("TIME")
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call("ZADD", KEYS[1], now, ARGV[1])
redis.call("ZREMRANGEBYSCORE", KEYS[1], "-inf", now - tonumber(ARGV[2]))
redis.call("PEXPIRE", KEYS[1], ARGV[2])
return redis.call("ZCARD", KEYS[1])
"#;

/// An instance not seen for this long is no longer counted.
pub(super) const MEMBER_TTL: Duration = Duration::from_secs(5);

impl Cluster {
    /// Checks one request against a limit for the whole cluster: `Some(Ok)`
    /// when admitted, `Some(Err(wait))` when refused, `None` when Redis
    /// failed or was late (the caller falls back to its local share).
    pub async fn rate_check(
        &self,
        scope: &str,
        key: &[u8],
        rate: Rate,
    ) -> Option<Result<(), Duration>> {
        if !self.is_up() {
            return None;
        }
        let count = u128::from(rate.count.max(1));
        let interval = (rate.per.as_micros() / count).max(1);
        let tolerance = interval * (count - 1);
        let hash = self.keys.limit_hash(scope, key);
        let redis_key = format!("{}rl:{}", self.prefix, crate::secret::hex(&hash));
        let mut call = self.gcra.key(redis_key);
        call.arg(u64::try_from(interval).unwrap_or(u64::MAX))
            .arg(u64::try_from(tolerance).unwrap_or(u64::MAX));
        let wait_us: i64 = self.invoke(&call).await?;
        Some(match u64::try_from(wait_us) {
            Ok(0) => Ok(()),
            Ok(us) => Err(Duration::from_micros(us)),
            // A negative answer cannot come from the script: admit.
            Err(_) => Ok(()),
        })
    }

    /// The live instances last counted (at least 1): while Redis is
    /// unavailable each instance enforces this share of every limit.
    pub fn instances(&self) -> u32 {
        self.members.load(Ordering::Relaxed).max(1)
    }

    /// The salt of login-name hashes, the same on every instance.
    pub fn login_salt(&self) -> u64 {
        self.keys.login_salt()
    }

    /// Marks this instance alive and refreshes the count of live ones
    /// (every health check); false when Redis failed.
    pub(super) async fn heartbeat(&self) -> bool {
        let mut call = self.members_script.key(format!("{}members", self.prefix));
        call.arg(&self.cfg.instance)
            .arg(u64::try_from(MEMBER_TTL.as_millis()).unwrap_or(u64::MAX));
        match self.invoke::<u32>(&call).await {
            Some(n) => {
                self.members.store(n.max(1), Ordering::Relaxed);
                self.metrics.instances.set(i64::from(n.max(1)));
                true
            }
            None => false,
        }
    }
}
