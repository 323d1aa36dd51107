//! Remote operations in Redis: what every instance needs to see and share
//! about jobs, whichever instance runs them. Only primitives live here (bytes
//! in, bytes out); `commands::clustered` decides what to store.
//!
//! Keys (all under `portcullis:<name>:`, all with a time to live):
//! - `job:<id>`: the job's sealed record (retention of `commands.job_retention`);
//! - `jobs`: the ids of every job, a sorted set read newest first by id;
//! - `out:<id>`: a stream of sealed output chunks, each with the id
//!   `<byte offset after it>-0` (so `Last-Event-ID` maps to a stream id);
//! - `cancel:<id>`: a sealed cancel request for the owner to pick up;
//! - `lock:<hash>`: a `lock = "..."` held by a job (`SET NX PX`, renewed
//!   while the job runs, deleted by its holder only);
//! - `pending`, `running`: leased members (job ids, score = lease end in ms)
//!   of the jobs accepted and of those holding a run slot (`max_concurrent`);
//!   an instance that dies stops renewing and its members lapse;
//! - `sched:<hash>:<unix ms>`: the claim of one schedule tick, and
//!   `sched:<hash>:last`: the job id of the schedule's latest run.
//!
//! Lock and schedule names appear only as `<hash>`, a keyed hash (under
//! `cluster.secret`) of the name; job ids are a time and random bits.

use super::Cluster;
use std::time::Duration;

/// Takes a lock: "" when taken, else the current holder.
const LOCK_TAKE: &str = r#"
if redis.call("SET", KEYS[1], ARGV[1], "NX", "PX", ARGV[2]) then return "" end
return redis.call("GET", KEYS[1]) or "?"
"#;

/// Extends a lock's lease when the caller still holds it, and takes it
/// again when it vanished (a Redis restarted empty); 0 when another holds it.
const LOCK_RENEW: &str = r#"
local v = redis.call("GET", KEYS[1])
if v == ARGV[1] then return redis.call("PEXPIRE", KEYS[1], ARGV[2]) end
if not v then
  redis.call("SET", KEYS[1], ARGV[1], "PX", ARGV[2])
  return 1
end
return 0
"#;

/// Deletes a lock only when it still holds the caller's value.
const LOCK_RELEASE: &str = r#"if redis.call("GET", KEYS[1]) == ARGV[1] then return redis.call("DEL", KEYS[1]) else return 0 end"#;

/// Admits a job: KEYS = pending, running; ARGV = id, max running, max
/// accepted, lease ms. -1 = over capacity, 0 = queued, 1 = running.
/// A new job runs at once only when no other job is waiting.
const ADMIT: &str = r#"
local t = redis.call("TIME")
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call("ZREMRANGEBYSCORE", KEYS[1], "-inf", now)
redis.call("ZREMRANGEBYSCORE", KEYS[2], "-inf", now)
local lease = tonumber(ARGV[4])
local pending = redis.call("ZCARD", KEYS[1])
local running = redis.call("ZCARD", KEYS[2])
if pending >= tonumber(ARGV[3]) then return -1 end
redis.call("ZADD", KEYS[1], now + lease, ARGV[1])
redis.call("PEXPIRE", KEYS[1], lease * 2)
if running < tonumber(ARGV[2]) and pending <= running then
  redis.call("ZADD", KEYS[2], now + lease, ARGV[1])
  redis.call("PEXPIRE", KEYS[2], lease * 2)
  return 1
end
return 0
"#;

/// Takes a run slot for an admitted job: KEYS = running; ARGV = id, max
/// running, lease ms. 1 when taken.
const TAKE_SLOT: &str = r#"
local t = redis.call("TIME")
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call("ZREMRANGEBYSCORE", KEYS[1], "-inf", now)
local lease = tonumber(ARGV[3])
if redis.call("ZSCORE", KEYS[1], ARGV[1]) then return 1 end
if redis.call("ZCARD", KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call("ZADD", KEYS[1], now + lease, ARGV[1])
redis.call("PEXPIRE", KEYS[1], lease * 2)
return 1
"#;

/// Renews a live job's memberships (adding them again after a Redis that
/// restarted empty): KEYS = pending, running; ARGV = id, lease ms, "1" when
/// the job holds a run slot.
const RENEW: &str = r#"
local t = redis.call("TIME")
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[2])
local n = 1
if ARGV[3] == "1" then n = 2 end
for i = 1, n do
  redis.call("ZADD", KEYS[i], now + lease, ARGV[1])
  redis.call("PEXPIRE", KEYS[i], lease * 2)
end
return 1
"#;

/// Which of ARGV's job ids still hold a live lease in KEYS[1] (1/0 each).
const ALIVE: &str = r#"
local t = redis.call("TIME")
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {}
for i, id in ipairs(ARGV) do
  local s = redis.call("ZSCORE", KEYS[1], id)
  if s and tonumber(s) > now then out[i] = 1 else out[i] = 0 end
end
return out
"#;

/// What admission decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// As many jobs are accepted as may run plus wait: refuse (429).
    Full,
    /// Accepted; waits for a run slot.
    Queued,
    /// Accepted with a run slot.
    Running,
}

pub(super) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

/// `Err(())` means Redis failed or was late (see [`Cluster::call`]).
pub type Shared<T> = Result<T, ()>;

impl Cluster {
    /// This instance's name (`cluster.instance`).
    pub fn instance(&self) -> &str {
        &self.cfg.instance
    }

    pub(super) fn key(&self, suffix: &str) -> String {
        format!("{}{suffix}", self.prefix)
    }

    /// The key of something named in the configuration (a lock, a
    /// schedule): `<kind>:<keyed hash of the name>`.
    pub(super) fn named(&self, kind: &str, name: &str) -> String {
        let hash = self
            .keys
            .limit_hash(&format!("ops {kind}"), name.as_bytes());
        self.key(&format!("{kind}:{}", crate::secret::hex(&hash)))
    }

    /// Seals `plain` under the Redis key `key` (full key, as stored).
    fn seal_for(&self, key: &str, plain: &[u8]) -> Vec<u8> {
        self.keys.seal(key.as_bytes(), plain)
    }

    /// Stores a job's record (sealed) and indexes its id, both for `ttl`.
    pub async fn job_put(&self, id: &str, plain: &[u8], ttl: Duration) -> Shared<()> {
        let key = self.key(&format!("job:{id}"));
        let index = self.key("jobs");
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("SET")
            .arg(&key)
            .arg(self.seal_for(&key, plain))
            .arg("PX")
            .arg(millis(ttl))
            .ignore()
            .cmd("ZADD")
            .arg(&index)
            .arg(0)
            .arg(id)
            .ignore()
            .cmd("PEXPIRE")
            .arg(&index)
            .arg(millis(ttl))
            .ignore();
        self.pipeline::<()>(&pipe).await
    }

    /// The records of `ids` (`None` for a missing or unreadable one).
    pub async fn job_get_many(&self, ids: &[String]) -> Shared<Vec<Option<Vec<u8>>>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = ids
            .iter()
            .map(|id| self.key(&format!("job:{id}")))
            .collect();
        let mut mget = redis::cmd("MGET");
        mget.arg(&keys);
        let blobs: Vec<Option<Vec<u8>>> = self.call(&mget).await.ok_or(())?;
        Ok(blobs
            .into_iter()
            .zip(&keys)
            .map(|(b, k)| b.and_then(|b| self.keys.open(k.as_bytes(), &b)))
            .collect())
    }

    /// Up to `count` job ids older than `before` (all when `None`), newest first.
    pub async fn job_ids(&self, before: Option<&str>, count: usize) -> Shared<Vec<String>> {
        let mut cmd = redis::cmd("ZRANGE");
        cmd.arg(self.key("jobs"))
            .arg(before.map_or_else(|| "+".to_owned(), |b| format!("({b}")))
            .arg("-")
            .arg("BYLEX")
            .arg("REV")
            .arg("LIMIT")
            .arg(0)
            .arg(count);
        self.call(&cmd).await.ok_or(())
    }

    /// Forgets index entries of jobs older than `floor` (their records
    /// have expired on their own).
    pub async fn job_prune(&self, floor: &str) {
        let mut cmd = redis::cmd("ZREMRANGEBYLEX");
        cmd.arg(self.key("jobs")).arg("-").arg(format!("({floor}"));
        let _ = self.call::<i64>(&cmd).await;
    }

    /// Appends a chunk of a job's output ending at byte offset `end`.
    pub async fn out_append(&self, id: &str, end: u64, chunk: &[u8], ttl: Duration) -> Shared<()> {
        let key = self.key(&format!("out:{id}"));
        let entry = format!("{end}-0");
        let aad = format!("{key}/{end}");
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("XADD")
            .arg(&key)
            .arg(&entry)
            .arg("d")
            .arg(self.keys.seal(aad.as_bytes(), chunk))
            .ignore()
            .cmd("PEXPIRE")
            .arg(&key)
            .arg(millis(ttl))
            .ignore();
        self.pipeline::<()>(&pipe).await
    }

    /// The byte offset a job's stored output ends at (0 when none).
    pub async fn out_end(&self, id: &str) -> Shared<u64> {
        let mut cmd = redis::cmd("XREVRANGE");
        cmd.arg(self.key(&format!("out:{id}")))
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1);
        let last: Vec<(String, Vec<Vec<u8>>)> = self.call(&cmd).await.ok_or(())?;
        Ok(last.first().map_or(0, |(entry, _)| stream_offset(entry)))
    }

    /// Up to `count` output chunks ending after byte offset `after`, as
    /// `(end offset, bytes)`; a chunk that does not open ends the read.
    pub async fn out_read(
        &self,
        id: &str,
        after: u64,
        count: usize,
    ) -> Shared<Vec<(u64, Vec<u8>)>> {
        self.read_stream(&self.key(&format!("out:{id}")), after, count)
            .await
    }

    /// [`Cluster::out_read`] for the stream at `key` (full key).
    pub(super) async fn read_stream(
        &self,
        key: &str,
        after: u64,
        count: usize,
    ) -> Shared<Vec<(u64, Vec<u8>)>> {
        let mut cmd = redis::cmd("XRANGE");
        cmd.arg(key)
            .arg(format!("({after}-0"))
            .arg("+")
            .arg("COUNT")
            .arg(count);
        let entries: Vec<(String, Vec<Vec<u8>>)> = self.call(&cmd).await.ok_or(())?;
        let mut out = Vec::with_capacity(entries.len());
        for (entry, fields) in entries {
            let end = stream_offset(&entry);
            let aad = format!("{key}/{end}");
            let Some(plain) = fields
                .get(1)
                .and_then(|blob| self.keys.open(aad.as_bytes(), blob))
            else {
                break;
            };
            out.push((end, plain));
        }
        Ok(out)
    }

    /// Asks the job's owner to cancel it (`reason` is sealed).
    pub async fn cancel_request(&self, id: &str, reason: &str, ttl: Duration) -> Shared<()> {
        let key = self.key(&format!("cancel:{id}"));
        let mut set = redis::cmd("SET");
        set.arg(&key)
            .arg(self.seal_for(&key, reason.as_bytes()))
            .arg("PX")
            .arg(millis(ttl));
        self.call::<String>(&set).await.map(|_| ()).ok_or(())
    }

    /// The cancel request for `id`, if any.
    pub async fn cancel_requested(&self, id: &str) -> Shared<Option<String>> {
        let key = self.key(&format!("cancel:{id}"));
        let mut get = redis::cmd("GET");
        get.arg(&key);
        let blob: Option<Vec<u8>> = self.call(&get).await.ok_or(())?;
        Ok(blob
            .and_then(|b| self.keys.open(key.as_bytes(), &b))
            .map(|p| String::from_utf8_lossy(&p).into_owned()))
    }

    /// Takes lock `name` for `holder`: `Ok(None)` when taken, `Ok(Some(current
    /// holder))` when another holds it.
    pub async fn lock_take(
        &self,
        name: &str,
        holder: &str,
        lease: Duration,
    ) -> Shared<Option<String>> {
        let script = redis::Script::new(LOCK_TAKE);
        let mut inv = script.prepare_invoke();
        inv.key(self.named("lock", name))
            .arg(holder)
            .arg(millis(lease));
        let got: String = self.invoke(&inv).await.ok_or(())?;
        Ok((!got.is_empty()).then_some(got))
    }

    /// Extends `holder`'s lease on lock `name` (taking it again if it
    /// vanished); false when another job holds it now.
    pub async fn lock_renew(&self, name: &str, holder: &str, lease: Duration) -> Shared<bool> {
        let script = redis::Script::new(LOCK_RENEW);
        let mut inv = script.prepare_invoke();
        inv.key(self.named("lock", name))
            .arg(holder)
            .arg(millis(lease));
        self.invoke::<i64>(&inv).await.map(|n| n == 1).ok_or(())
    }

    /// Releases lock `name` if `holder` still holds it.
    pub async fn lock_release(&self, name: &str, holder: &str) -> Shared<()> {
        let script = redis::Script::new(LOCK_RELEASE);
        let mut inv = script.prepare_invoke();
        inv.key(self.named("lock", name)).arg(holder);
        self.invoke::<i64>(&inv).await.map(|_| ()).ok_or(())
    }

    /// Admits job `id` under the cluster-wide `max_running` and
    /// `max_running + max_queued`.
    pub async fn admit(
        &self,
        id: &str,
        max_running: usize,
        max_queued: usize,
        lease: Duration,
    ) -> Shared<Admission> {
        let script = redis::Script::new(ADMIT);
        let mut inv = script.prepare_invoke();
        inv.key(self.key("pending"))
            .key(self.key("running"))
            .arg(id)
            .arg(max_running)
            .arg(max_running.saturating_add(max_queued))
            .arg(millis(lease));
        Ok(match self.invoke::<i64>(&inv).await.ok_or(())? {
            1 => Admission::Running,
            0 => Admission::Queued,
            _ => Admission::Full,
        })
    }

    /// Takes a run slot for an admitted job; false while all are taken.
    pub async fn take_slot(&self, id: &str, max_running: usize, lease: Duration) -> Shared<bool> {
        let script = redis::Script::new(TAKE_SLOT);
        let mut inv = script.prepare_invoke();
        inv.key(self.key("running"))
            .arg(id)
            .arg(max_running)
            .arg(millis(lease));
        self.invoke::<i64>(&inv).await.map(|n| n == 1).ok_or(())
    }

    /// Renews a live job's leases: accepted, and its run slot when
    /// `running`. Only for jobs that have not ended (a renewal after
    /// [`Cluster::job_leave`] would hold their place again).
    pub async fn job_renew(&self, id: &str, lease: Duration, running: bool) -> Shared<()> {
        let script = redis::Script::new(RENEW);
        let mut inv = script.prepare_invoke();
        inv.key(self.key("pending"))
            .key(self.key("running"))
            .arg(id)
            .arg(millis(lease))
            .arg(if running { "1" } else { "0" });
        self.invoke::<i64>(&inv).await.map(|_| ()).ok_or(())
    }

    /// Gives back a job's leases (it ended).
    pub async fn job_leave(&self, id: &str) -> Shared<()> {
        let mut pipe = redis::pipe();
        pipe.cmd("ZREM")
            .arg(self.key("running"))
            .arg(id)
            .ignore()
            .cmd("ZREM")
            .arg(self.key("pending"))
            .arg(id)
            .ignore();
        self.pipeline::<()>(&pipe).await
    }

    /// For each of `ids`, whether its owner still renews its lease.
    pub async fn jobs_alive(&self, ids: &[&str]) -> Shared<Vec<bool>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let script = redis::Script::new(ALIVE);
        let mut inv = script.prepare_invoke();
        inv.key(self.key("pending"));
        for id in ids {
            inv.arg(*id);
        }
        let flags: Vec<i64> = self.invoke(&inv).await.ok_or(())?;
        Ok(flags.into_iter().map(|f| f == 1).collect())
    }

    /// Claims one tick (at `at_millis`) of schedule `schedule` for this
    /// instance: true for exactly one caller in the cluster until `ttl`.
    pub async fn claim_tick(&self, schedule: &str, at_millis: i64, ttl: Duration) -> Shared<bool> {
        let mut set = redis::cmd("SET");
        set.arg(format!("{}:{at_millis}", self.named("sched", schedule)))
            .arg(self.instance())
            .arg("NX")
            .arg("PX")
            .arg(millis(ttl));
        let got: Option<String> = self.call(&set).await.ok_or(())?;
        Ok(got.is_some())
    }

    /// The job id of schedule `schedule`'s latest run.
    pub async fn schedule_last(&self, schedule: &str) -> Shared<Option<String>> {
        let mut get = redis::cmd("GET");
        get.arg(format!("{}:last", self.named("sched", schedule)));
        self.call(&get).await.ok_or(())
    }

    /// Notes job `id` as schedule `schedule`'s latest run, for `ttl`.
    pub async fn set_schedule_last(&self, schedule: &str, id: &str, ttl: Duration) -> Shared<()> {
        let mut set = redis::cmd("SET");
        set.arg(format!("{}:last", self.named("sched", schedule)))
            .arg(id)
            .arg("PX")
            .arg(millis(ttl));
        self.call::<String>(&set).await.map(|_| ()).ok_or(())
    }

    /// Runs a pipeline under the deadline (see [`Cluster::call`]).
    pub(super) async fn pipeline<T: redis::FromRedisValue>(
        &self,
        pipe: &redis::Pipeline,
    ) -> Shared<T> {
        let mut conn = self.conn.get().ok_or(())?.clone();
        match tokio::time::timeout(self.cfg.timeout, pipe.query_async::<T>(&mut conn)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                self.metrics.redis_errors.inc();
                tracing::debug!(error = %e.category(), "cluster: Redis pipeline failed");
                if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() {
                    self.kick.notify_one();
                }
                Err(())
            }
            Err(_) => {
                self.metrics.redis_errors.inc();
                self.kick.notify_one();
                Err(())
            }
        }
    }
}

/// The byte offset of a stream entry id `<offset>-0`.
fn stream_offset(entry: &str) -> u64 {
    entry
        .split_once('-')
        .map_or(entry, |(ms, _)| ms)
        .parse()
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_ids_carry_offsets() {
        assert_eq!(stream_offset("1234-0"), 1234);
        assert_eq!(stream_offset("77"), 77);
        assert_eq!(stream_offset("x-0"), 0);
    }
}
