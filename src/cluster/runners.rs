//! Runners in Redis: what lets a runner's requests land on any instance.
//! Only primitives live here (bytes in, bytes out); `commands::remote`
//! decides what to store.
//!
//! Keys (all under `portcullis:<name>:`, all with a time to live; `<r>` is a
//! keyed hash of the runner's configured name):
//! - `rseen:<r>`: the runner's presence (sealed version and time of its last
//!   poll), expiring after `commands.lease`: present means connected;
//! - `rdig:<r>`, `rdesc:<r>`: the digest of its latest description, and the
//!   description (sealed);
//! - `rpoll:<r>`: the number of its latest poll (only the newest held poll,
//!   on whichever instance, may take work);
//! - `rq:<r>`: its queue of sealed jobs and cancels, taken whole by the
//!   instance holding its newest poll;
//! - `rjobs:<r>`: the ids of the jobs it runs;
//! - `rrun:<id>`: the runner a job was handed to;
//! - `rout:<id>`: the output the runner reported (a stream like `out:<id>`,
//!   each entry's id the byte offset after it), read by the job's owner;
//! - `rfin:<id>`: the runner's sealed end-of-job report.

use super::jobs::{millis, Shared};
use super::Cluster;
use std::time::Duration;

/// Starts a poll: KEYS = rdig, rseen, rpoll; ARGV = digest, sealed
/// presence, lease ms. -1 when the description differs, else the poll's
/// number.
const POLL_START: &str = r#"
if redis.call("GET", KEYS[1]) ~= ARGV[1] then return -1 end
redis.call("SET", KEYS[2], ARGV[2], "PX", ARGV[3])
local n = redis.call("INCR", KEYS[3])
redis.call("PEXPIRE", KEYS[3], tonumber(ARGV[3]) * 2)
return n
"#;

/// Takes a runner's queue for poll number ARGV[1]: KEYS = rpoll, rq.
/// `{"superseded"}` when a newer poll exists, else `{"ok", items...}`.
const CLAIM: &str = r#"
if redis.call("GET", KEYS[1]) ~= ARGV[1] then return {"superseded"} end
local items = redis.call("LRANGE", KEYS[2], 0, -1)
if #items > 0 then redis.call("DEL", KEYS[2]) end
table.insert(items, 1, "ok")
return items
"#;

/// The length of stream KEYS[1] (the offset in its last entry id).
const STREAM_LEN: &str = r#"
local function len(key)
  local last = redis.call("XREVRANGE", key, "+", "-", "COUNT", 1)
  if #last == 0 then return 0 end
  return tonumber(string.match(last[1][1], "^(%d+)")) or 0
end
"#;

/// Appends output: KEYS = rrun, rout; ARGV = runner, offset, end, sealed
/// chunk, ttl ms. `{2, 0}` no such job for this runner, `{1, length}` the
/// offset is not the length, `{0, length}` appended.
const APPEND: &str = r#"
if redis.call("GET", KEYS[1]) ~= ARGV[1] then return {2, 0} end
local have = len(KEYS[2])
if have ~= tonumber(ARGV[2]) then return {1, have} end
if tonumber(ARGV[3]) > have then
  redis.call("XADD", KEYS[2], ARGV[3] .. "-0", "d", ARGV[4])
  redis.call("PEXPIRE", KEYS[2], ARGV[5])
  have = tonumber(ARGV[3])
end
return {0, have}
"#;

/// Ends a job: KEYS = rrun, rout, rfin; ARGV = runner, bytes sent, sealed
/// report, ttl ms. Codes as [`APPEND`]'s.
const FINISH: &str = r#"
if redis.call("GET", KEYS[1]) ~= ARGV[1] then return {2, 0} end
local have = len(KEYS[2])
if have < tonumber(ARGV[2]) then return {1, have} end
redis.call("SET", KEYS[3], ARGV[3], "PX", ARGV[4])
redis.call("DEL", KEYS[1])
return {0, have}
"#;

/// What an output chunk or a report from a runner met.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Landed {
    /// Stored; the output is this long now.
    Stored(u64),
    /// The output is this long, not what the runner said.
    Length(u64),
    /// The job is not (or no longer) running on this runner.
    NoJob,
}

/// A runner's state as one instance reads it from Redis.
#[derive(Debug, Default)]
pub struct Seen {
    /// Milliseconds left of its presence (`None`: not connected).
    pub left: Option<Duration>,
    /// Its sealed presence.
    pub presence: Option<Vec<u8>>,
    /// Digest of its latest description.
    pub digest: Option<String>,
    /// Ids of the jobs it runs.
    pub jobs: Vec<String>,
}

impl Cluster {
    fn runner_key(&self, kind: &str, runner: &str) -> String {
        self.named(kind, runner)
    }

    /// Starts a poll of `runner` whose description has `digest`: `Some(n)`
    /// (the poll's number, its presence renewed) or `None` when Redis holds
    /// another description.
    pub async fn runner_poll(
        &self,
        runner: &str,
        digest: &str,
        presence: &[u8],
        lease: Duration,
    ) -> Shared<Option<u64>> {
        let seen = self.runner_key("rseen", runner);
        let script = redis::Script::new(POLL_START);
        let mut inv = script.prepare_invoke();
        inv.key(self.runner_key("rdig", runner))
            .key(&seen)
            .key(self.runner_key("rpoll", runner))
            .arg(digest)
            .arg(self.keys.seal(seen.as_bytes(), presence))
            .arg(millis(lease));
        let n: i64 = self.invoke(&inv).await.ok_or(())?;
        Ok(u64::try_from(n).ok())
    }

    /// Takes `runner`'s queue for its poll number `poll`: `None` when a
    /// newer poll exists, else the items (unreadable ones dropped).
    pub async fn runner_claim(&self, runner: &str, poll: u64) -> Shared<Option<Vec<Vec<u8>>>> {
        let queue = self.runner_key("rq", runner);
        let script = redis::Script::new(CLAIM);
        let mut inv = script.prepare_invoke();
        inv.key(self.runner_key("rpoll", runner))
            .key(&queue)
            .arg(poll);
        let got: Vec<Vec<u8>> = self.invoke(&inv).await.ok_or(())?;
        let mut it = got.into_iter();
        if it.next().as_deref() != Some(b"ok".as_slice()) {
            return Ok(None);
        }
        Ok(Some(
            it.filter_map(|b| self.keys.open(queue.as_bytes(), &b))
                .collect(),
        ))
    }

    /// Queues `item` (sealed) for `runner`'s next poll.
    pub async fn runner_push(&self, runner: &str, item: &[u8], ttl: Duration) -> Shared<()> {
        let queue = self.runner_key("rq", runner);
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("RPUSH")
            .arg(&queue)
            .arg(self.keys.seal(queue.as_bytes(), item))
            .ignore()
            .cmd("PEXPIRE")
            .arg(&queue)
            .arg(millis(ttl))
            .ignore();
        self.pipeline::<()>(&pipe).await
    }

    /// Stores `runner`'s description (sealed) and its digest, and renews
    /// its presence.
    pub async fn runner_describe(
        &self,
        runner: &str,
        digest: &str,
        description: &[u8],
        presence: &[u8],
        lease: Duration,
        ttl: Duration,
    ) -> Shared<()> {
        let desc = self.runner_key("rdesc", runner);
        let seen = self.runner_key("rseen", runner);
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("SET")
            .arg(&desc)
            .arg(self.keys.seal(desc.as_bytes(), description))
            .arg("PX")
            .arg(millis(ttl))
            .ignore()
            .cmd("SET")
            .arg(self.runner_key("rdig", runner))
            .arg(digest)
            .arg("PX")
            .arg(millis(ttl))
            .ignore()
            .cmd("SET")
            .arg(&seen)
            .arg(self.keys.seal(seen.as_bytes(), presence))
            .arg("PX")
            .arg(millis(lease))
            .ignore();
        self.pipeline::<()>(&pipe).await
    }

    /// `runner`'s description, opened.
    pub async fn runner_description(&self, runner: &str) -> Shared<Option<Vec<u8>>> {
        let desc = self.runner_key("rdesc", runner);
        let mut get = redis::cmd("GET");
        get.arg(&desc);
        let blob: Option<Vec<u8>> = self.call(&get).await.ok_or(())?;
        Ok(blob.and_then(|b| self.keys.open(desc.as_bytes(), &b)))
    }

    /// What Redis holds about each of `runners`, in order.
    pub async fn runners_seen(&self, runners: &[String]) -> Shared<Vec<Seen>> {
        if runners.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for r in runners {
            let seen = self.runner_key("rseen", r);
            pipe.cmd("PTTL")
                .arg(&seen)
                .cmd("GET")
                .arg(&seen)
                .cmd("GET")
                .arg(self.runner_key("rdig", r))
                .cmd("SMEMBERS")
                .arg(self.runner_key("rjobs", r));
        }
        type Row = (i64, Option<Vec<u8>>, Option<String>, Vec<String>);
        let rows: Vec<Row> = {
            let flat: Vec<redis::Value> = self.pipeline(&pipe).await?;
            let mut rows = Vec::with_capacity(runners.len());
            let mut it = flat.into_iter();
            while let (Some(a), Some(b), Some(c), Some(d)) =
                (it.next(), it.next(), it.next(), it.next())
            {
                let row: Row = (
                    redis::from_redis_value(&a).map_err(|_| ())?,
                    redis::from_redis_value(&b).map_err(|_| ())?,
                    redis::from_redis_value(&c).map_err(|_| ())?,
                    redis::from_redis_value(&d).map_err(|_| ())?,
                );
                rows.push(row);
            }
            rows
        };
        Ok(rows
            .into_iter()
            .zip(runners)
            .map(|((ttl, presence, digest, jobs), r)| {
                let seen = self.runner_key("rseen", r);
                Seen {
                    left: u64::try_from(ttl)
                        .ok()
                        .filter(|t| *t > 0)
                        .map(Duration::from_millis),
                    presence: presence.and_then(|b| self.keys.open(seen.as_bytes(), &b)),
                    digest,
                    jobs,
                }
            })
            .collect())
    }

    /// Notes job `id` as handed to `runner`.
    pub async fn runner_bind(&self, id: &str, runner: &str, ttl: Duration) -> Shared<()> {
        let jobs = self.runner_key("rjobs", runner);
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("SET")
            .arg(self.key(&format!("rrun:{id}")))
            .arg(self.runner_key("r", runner))
            .arg("PX")
            .arg(millis(ttl))
            .ignore()
            .cmd("SADD")
            .arg(&jobs)
            .arg(id)
            .ignore()
            .cmd("PEXPIRE")
            .arg(&jobs)
            .arg(millis(ttl))
            .ignore();
        self.pipeline::<()>(&pipe).await
    }

    /// Forgets job `id` on `runner` and what the runner reported for it.
    pub async fn runner_unbind(&self, id: &str, runner: &str) -> Shared<()> {
        let mut pipe = redis::pipe();
        pipe.cmd("DEL")
            .arg(self.key(&format!("rrun:{id}")))
            .arg(self.key(&format!("rout:{id}")))
            .arg(self.key(&format!("rfin:{id}")))
            .ignore()
            .cmd("SREM")
            .arg(self.runner_key("rjobs", runner))
            .arg(id)
            .ignore();
        self.pipeline::<()>(&pipe).await
    }

    /// For each of `ids`, whether it is still handed to `runner` (a job
    /// that ended while queued is never delivered).
    pub async fn runner_bound(&self, runner: &str, ids: &[String]) -> Shared<Vec<bool>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = ids
            .iter()
            .map(|id| self.key(&format!("rrun:{id}")))
            .collect();
        let mut mget = redis::cmd("MGET");
        mget.arg(&keys);
        let got: Vec<Option<String>> = self.call(&mget).await.ok_or(())?;
        let me = self.runner_key("r", runner);
        Ok(got
            .into_iter()
            .map(|g| g.as_deref() == Some(me.as_str()))
            .collect())
    }

    fn landed(code: &[i64]) -> Landed {
        let len = code
            .get(1)
            .and_then(|n| u64::try_from(*n).ok())
            .unwrap_or(0);
        match code.first() {
            Some(0) => Landed::Stored(len),
            Some(1) => Landed::Length(len),
            _ => Landed::NoJob,
        }
    }

    /// Appends `chunk`, reported by `runner` at byte `offset` of job `id`.
    pub async fn runner_output(
        &self,
        id: &str,
        runner: &str,
        offset: u64,
        chunk: &[u8],
        ttl: Duration,
    ) -> Shared<Landed> {
        let key = self.key(&format!("rout:{id}"));
        let end = offset.saturating_add(chunk.len() as u64);
        let aad = format!("{key}/{end}");
        let script = redis::Script::new(&format!("{STREAM_LEN}{APPEND}"));
        let mut inv = script.prepare_invoke();
        inv.key(self.key(&format!("rrun:{id}")))
            .key(&key)
            .arg(self.runner_key("r", runner))
            .arg(offset)
            .arg(end)
            .arg(self.keys.seal(aad.as_bytes(), chunk))
            .arg(millis(ttl));
        let code: Vec<i64> = self.invoke(&inv).await.ok_or(())?;
        Ok(Self::landed(&code))
    }

    /// Stores `runner`'s end-of-job `report` for job `id`, once `sent`
    /// bytes of output are there.
    pub async fn runner_finish(
        &self,
        id: &str,
        runner: &str,
        sent: u64,
        report: &[u8],
        ttl: Duration,
    ) -> Shared<Landed> {
        let fin = self.key(&format!("rfin:{id}"));
        let script = redis::Script::new(&format!("{STREAM_LEN}{FINISH}"));
        let mut inv = script.prepare_invoke();
        inv.key(self.key(&format!("rrun:{id}")))
            .key(self.key(&format!("rout:{id}")))
            .key(&fin)
            .arg(self.runner_key("r", runner))
            .arg(sent)
            .arg(self.keys.seal(fin.as_bytes(), report))
            .arg(millis(ttl));
        let code: Vec<i64> = self.invoke(&inv).await.ok_or(())?;
        Ok(Self::landed(&code))
    }

    /// The output a runner reported for job `id` after byte `after`.
    pub async fn runner_read(
        &self,
        id: &str,
        after: u64,
        count: usize,
    ) -> Shared<Vec<(u64, Vec<u8>)>> {
        self.read_stream(&self.key(&format!("rout:{id}")), after, count)
            .await
    }

    /// The runner's end-of-job report for job `id`, once there.
    pub async fn runner_report(&self, id: &str) -> Shared<Option<Vec<u8>>> {
        let fin = self.key(&format!("rfin:{id}"));
        let mut get = redis::cmd("GET");
        get.arg(&fin);
        let blob: Option<Vec<u8>> = self.call(&get).await.ok_or(())?;
        Ok(blob.and_then(|b| self.keys.open(fin.as_bytes(), &b)))
    }
}
