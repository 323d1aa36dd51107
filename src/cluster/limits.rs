//! Rate limits for the whole cluster, and the count of live instances.
//!
//! - `portcullis:<name>:rl:<hash>`: one limit key's GCRA state (its
//!   theoretical arrival time, in microseconds of Redis's clock), updated by
//!   one Lua call that leases cells to an instance
//!   ([`crate::ratelimit::Lease`]); `<hash>` is keyed by the cluster secret,
//!   so neither API key names nor addresses reach Redis.
//! - `portcullis:<name>:members`: live instances (a sorted set scored by
//!   the last health check), counted for the degraded share of each limit.
//!
//! Measured with `bench/cluster.sh` (docs/cluster.md, "Cost"): one Lua call
//! per limited request cost about 1.3–1.6× the CPU per request of a single
//! instance; leasing cells (GCRA still decides, in Redis, how many) brings
//! limited requests back to the cached-token cost, and the admitted rate
//! stays within the cluster's GCRA shifted by at most one lease period.

use super::Cluster;
use crate::config::Rate;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// GCRA in one call, taking up to ARGV[3] cells at once. KEYS[1]: the limit
/// key; ARGV[1]: emission interval (µs); ARGV[2]: burst tolerance (µs).
/// Returns {cells granted, 0}, or {0, wait in µs} when none is left. Uses
/// Redis's clock, so instances' clocks do not matter.
pub(super) const GCRA: &str = r#"
local t = redis.call("TIME")
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local want = tonumber(ARGV[3])
local tat = tonumber(redis.call("GET", KEYS[1])) or now
if tat < now then tat = now end
local room = math.floor((tolerance - (tat - now)) / interval) + 1
if room < 1 then return {0, math.ceil(tat - now - tolerance)} end
local granted = math.min(want, room)
local new = tat + granted * interval
redis.call("SET", KEYS[1], string.format("%.0f", new), "PX", math.ceil((new - now) / 1000) + 1)
return {granted, 0}
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
    /// Takes up to `want` cells of a limit for the whole cluster:
    /// `Some(Ok(granted))` (at least 1), `Some(Err(wait))` when none is
    /// left, `None` when Redis failed or was late (the caller falls back to
    /// its local share).
    pub async fn rate_check(
        &self,
        scope: &str,
        key: &[u8],
        rate: Rate,
        want: u32,
    ) -> Option<Result<u32, Duration>> {
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
            .arg(u64::try_from(tolerance).unwrap_or(u64::MAX))
            .arg(want.max(1));
        let (granted, wait_us): (i64, i64) = self.invoke(&call).await?;
        Some(match u32::try_from(granted) {
            Ok(g) if g > 0 => Ok(g),
            // None left: the wait (at least a microsecond).
            _ => Err(Duration::from_micros(
                u64::try_from(wait_us).unwrap_or(0).max(1),
            )),
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
