//! Remote operations in cluster mode (`[cluster]` with `[commands]`): the
//! engine's shared side. The instance that accepts a run owns it (runs the
//! process, writes its audit lines and redb record) and mirrors it to Redis
//! (see `crate::cluster::jobs` for the keys); every instance reads jobs,
//! follows output and asks for cancels through Redis.
//!
//! - Admission: the lock (`SET NX PX`) then the cluster-wide capacity (leased
//!   members of `pending`/`running`) are taken before the `accepted` line;
//!   the sealed record is in Redis before the process starts. Redis
//!   unavailable → 503, nothing runs.
//! - While a job lives, its mirror task renews its leases, forwards output
//!   chunks and picks up cancel requests made on other instances.
//! - At the end (after the `finished` line): the rest of the output, then
//!   the lock is released, then the final record is stored, then the places
//!   are given back; only then do local waiters see the result.
//! - A live job renews its leases and lock and stores its record again every
//!   [`RENEW_EVERY`], which also takes them back after Redis restarted empty.
//! - A job whose record says queued/running but whose lease lapsed (its
//!   instance died) is shown as `lost`.

use super::api::{sse_end, sse_event, utf8_end, CHUNK, KEEPALIVE};
use super::engine::Core;
use super::jobs::{lock, Job, Mirrored, Refusal};
use super::store::{JobRecord, Status};
use super::METADATA_ONLY_OUTPUT;
use crate::cluster::jobs::Admission;
use crate::cluster::Cluster;
use bytes::Bytes;
use http::StatusCode;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// How long a job's leases (lock, accepted, run slot) last without renewal:
/// what an instance that dies holds for at most.
pub(super) const LEASE: Duration = Duration::from_secs(15);
/// How often a live job's leases are renewed.
const RENEW_EVERY: Duration = Duration::from_secs(5);
/// How often the owner looks for cancel requests, queued jobs for a run
/// slot, and followers on other instances for output.
const POLL: Duration = Duration::from_millis(200);
/// Chunks read per output poll.
const READ_BATCH: usize = 64;
/// How long a cancel request waits for its owner to pick it up.
const CANCEL_TTL: Duration = Duration::from_secs(600);
/// How long a schedule tick's claim is kept (longer than any clock skew).
const CLAIM_TTL: Duration = Duration::from_secs(300);
/// How long finishing a record in Redis is retried after a failure.
const FINISH_RETRY: Duration = Duration::from_secs(600);

/// The refusal of every remote operation while Redis is unavailable.
pub(super) fn unavailable() -> Refusal {
    Refusal {
        status: StatusCode::SERVICE_UNAVAILABLE,
        message: "Cluster state (Redis) unavailable: remote operations are paused".into(),
        retry_after: Some(1),
    }
}

/// What finding a job in the cluster said.
pub(super) enum Lookup {
    /// No such job (or not readable under this cluster's key).
    Missing,
    /// Redis failed or was late.
    Unavailable,
}

/// What a schedule tick's claim said.
pub(super) enum Claim {
    /// This instance runs the tick.
    Mine,
    /// Another instance took it.
    Taken,
    /// Redis failed: nobody runs it.
    Unavailable,
}

impl Core {
    /// The cluster, when remote operations are shared.
    pub(super) fn cluster(&self) -> Option<&Arc<Cluster>> {
        self.cluster.as_ref()
    }

    /// Takes the lock (when the command has one) and a cluster-wide place:
    /// `Ok(true)` with a run slot, `Ok(false)` queued. Nothing is held when
    /// it fails.
    pub(super) async fn cluster_admit(
        &self,
        cl: &Cluster,
        id: &str,
        lock_name: Option<&str>,
    ) -> Result<bool, Refusal> {
        if !cl.is_up() {
            return Err(unavailable());
        }
        let cfg = self.cfg();
        if let Some(l) = lock_name {
            match cl.lock_take(l, id, LEASE).await {
                Err(()) => return Err(unavailable()),
                Ok(Some(holder)) => {
                    return Err(Refusal::new(
                        StatusCode::CONFLICT,
                        format!("lock {l:?} is held by job {holder}"),
                    ))
                }
                Ok(None) => {}
            }
        }
        let admitted = cl
            .admit(id, cfg.max_concurrent, cfg.max_queued, LEASE)
            .await;
        let refusal = match admitted {
            Ok(Admission::Running) => return Ok(true),
            Ok(Admission::Queued) => return Ok(false),
            Ok(Admission::Full) => Refusal {
                status: StatusCode::TOO_MANY_REQUESTS,
                message: "too many runs queued; try again later".into(),
                retry_after: Some(1),
            },
            Err(()) => unavailable(),
        };
        self.cluster_undo(cl, id, lock_name).await;
        Err(refusal)
    }

    /// Gives back what [`Core::cluster_admit`] took (the run did not start).
    pub(super) async fn cluster_undo(&self, cl: &Cluster, id: &str, lock_name: Option<&str>) {
        if let Some(l) = lock_name {
            let _ = cl.lock_release(l, id).await;
        }
        let _ = cl.job_leave(id).await;
    }

    /// Stores an accepted job's record in Redis; `Ok` without a cluster.
    pub(super) async fn cluster_accept(&self, rec: &JobRecord) -> Result<(), ()> {
        match self.cluster() {
            Some(cl) => self.cluster_put(cl, rec).await,
            None => Ok(()),
        }
    }

    /// An admitted run that will not start: its lock and place are given
    /// back, and its record, if already stored, ends as `rejected`.
    pub(super) async fn cluster_abandon(
        &self,
        rec: &JobRecord,
        stored: bool,
        lock_name: Option<&str>,
    ) {
        let Some(cl) = self.cluster() else {
            return;
        };
        if stored {
            let mut r = rec.clone();
            r.status = Status::Rejected;
            r.reason = Some("not run".into());
            r.finished_at = Some(super::jobs::now_rfc3339());
            let _ = self.cluster_put(cl, &r).await;
        }
        self.cluster_undo(cl, &rec.id, lock_name).await;
    }

    /// Stores a local job's current record in Redis unless its end is
    /// already being recorded (best effort: renewals store it again).
    pub(super) async fn cluster_update(&self, job: &Job) {
        let Some(cl) = self.cluster() else {
            return;
        };
        let st = job.shared.lock().await;
        if !st.ended && cl.is_up() {
            let _ = self.cluster_put(cl, &job.record()).await;
        }
        drop(st);
    }

    /// Stores a job's record in Redis (sealed).
    pub(super) async fn cluster_put(&self, cl: &Cluster, rec: &JobRecord) -> Result<(), ()> {
        let plain = serde_json::to_vec(rec).map_err(|_| ())?;
        cl.job_put(&rec.id, &plain, self.cfg().job_retention).await
    }

    /// Waits for a cluster-wide run slot (queued jobs), polling.
    pub(super) async fn cluster_slot(&self, cl: &Cluster, id: &str) {
        loop {
            let max = self.cfg().max_concurrent;
            if cl.is_up() && cl.take_slot(id, max, LEASE).await == Ok(true) {
                return;
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Starts the task that keeps a local job's leases, output and cancel
    /// requests in step with Redis until it ends.
    pub(super) fn cluster_mirror(self: &Arc<Self>, job: &Arc<Job>, lock_name: Option<String>) {
        let Some(cl) = self.cluster.clone() else {
            return;
        };
        let job = Arc::clone(job);
        let ttl = self.cfg().job_retention;
        tokio::spawn(async move {
            let mut changed = job.version.subscribe();
            let mut renew = tokio::time::interval(RENEW_EVERY);
            let mut poll = tokio::time::interval(POLL);
            renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            while !job.is_final() {
                tokio::select! {
                    c = changed.changed() => {
                        if c.is_err() {
                            return;
                        }
                        if cl.is_up() {
                            let mut st = job.shared.lock().await;
                            if !st.ended {
                                forward_output(&cl, &job, &mut st, ttl).await;
                            }
                        }
                    }
                    _ = renew.tick(), if cl.is_up() => {
                        renew_live(&cl, &job, lock_name.as_deref(), ttl).await;
                    }
                    _ = poll.tick() => {
                        if !cl.is_up() {
                            continue;
                        }
                        // Output a failed write left behind goes out now.
                        let mut st = job.shared.lock().await;
                        if !st.ended {
                            forward_output(&cl, &job, &mut st, ttl).await;
                        }
                        drop(st);
                        if let Ok(Some(reason)) = cl.cancel_requested(&job.id).await {
                            job.cancel.send_if_modified(|r| {
                                if r.is_none() {
                                    *r = Some(reason);
                                    true
                                } else {
                                    false
                                }
                            });
                        }
                    }
                }
            }
        });
    }

    /// Records a local job's end in Redis: the rest of its output, then the
    /// lock is released, then the final record with the run slot given back.
    /// Retried in the background while Redis fails.
    pub(super) async fn cluster_finish(
        &self,
        job: &Arc<Job>,
        rec: &JobRecord,
        lock_name: Option<&str>,
    ) {
        let Some(cl) = self.cluster.clone() else {
            return;
        };
        let ttl = self.cfg().job_retention;
        let Ok(plain) = serde_json::to_vec(rec) else {
            return;
        };
        if cl.is_up() && finish_once(&cl, job, &plain, lock_name, ttl).await {
            return;
        }
        tracing::warn!(job = %job.id, "cluster: could not record the end of a job in Redis; retrying");
        let job = Arc::clone(job);
        let lock_name = lock_name.map(str::to_owned);
        tokio::spawn(async move {
            let until = tokio::time::Instant::now() + FINISH_RETRY;
            while tokio::time::Instant::now() < until {
                tokio::time::sleep(Duration::from_secs(1)).await;
                if cl.is_up() && finish_once(&cl, &job, &plain, lock_name.as_deref(), ttl).await {
                    return;
                }
            }
            tracing::warn!(job = %job.id, "cluster: gave up recording the end of a job in Redis; other instances will show it as lost");
        });
    }

    /// Stores the records of jobs ended at start-up (interrupted by a
    /// restart) once Redis answers, and frees their locks and places.
    pub(super) fn cluster_republish(self: &Arc<Self>, recs: Vec<JobRecord>) {
        let Some(cl) = self.cluster.clone() else {
            return;
        };
        if recs.is_empty() {
            return;
        }
        let core = Arc::clone(self);
        tokio::spawn(async move {
            let until = tokio::time::Instant::now() + FINISH_RETRY;
            let mut left = recs;
            while !left.is_empty() && tokio::time::Instant::now() < until {
                let mut failed = Vec::new();
                for rec in left {
                    if !cl.is_up() || core.cluster_put(&cl, &rec).await.is_err() {
                        failed.push(rec);
                    } else {
                        // What the interrupted run held is free at once,
                        // not only when its lease lapses.
                        let cfg = core.cfg();
                        let lock_name = cfg.rules.get(&rec.command).and_then(|r| r.lock.as_deref());
                        core.cluster_undo(&cl, &rec.id, lock_name).await;
                    }
                }
                left = failed;
                if !left.is_empty() {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        });
    }

    /// A job's record as the cluster knows it (a queued or running job whose
    /// instance stopped renewing its lease is shown as `lost`).
    pub(super) async fn shared_record(&self, cl: &Cluster, id: &str) -> Result<JobRecord, Lookup> {
        let ids = [id.to_owned()];
        let mut recs = self
            .shared_records(cl, &ids)
            .await
            .map_err(|()| Lookup::Unavailable)?;
        recs.pop().flatten().ok_or(Lookup::Missing)
    }

    /// The records of `ids` in Redis, in order (see [`Core::shared_record`]).
    async fn shared_records(
        &self,
        cl: &Cluster,
        ids: &[String],
    ) -> Result<Vec<Option<JobRecord>>, ()> {
        // Whose owner still renews its lease, asked before the records are
        // read: an owner gives its lease back only after storing the final
        // record, so a record still open after its lease was seen missing is
        // lost (never a job that just ended). It shows as running again if
        // its owner renews after an outage of its own.
        if !cl.is_up() {
            return Err(());
        }
        let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
        let alive = cl.jobs_alive(&refs).await?;
        let blobs = cl.job_get_many(ids).await?;
        let mut recs: Vec<Option<JobRecord>> = blobs
            .into_iter()
            .map(|b| b.and_then(|b| serde_json::from_slice(&b).ok()))
            .collect();
        let dead: Vec<String> = recs
            .iter()
            .zip(&alive)
            .filter_map(|(r, alive)| r.as_ref().filter(|_| !alive))
            .filter(|r| !r.status.is_final() && self.live(&r.id).is_none())
            .map(|r| r.id.clone())
            .collect();
        for rec in recs.iter_mut().flatten() {
            if dead.contains(&rec.id) {
                rec.status = Status::Lost;
                rec.reason = Some(format!(
                    "instance {} stopped renewing the job's lease (it stopped or lost Redis)",
                    rec.instance.as_deref().unwrap_or("?")
                ));
            }
        }
        Ok(recs)
    }

    /// `GET /__manage__/jobs` in cluster mode: the cluster's jobs, newest
    /// first, as [`super::store::Store::list`] pages them.
    pub(super) async fn shared_list(
        &self,
        cl: &Cluster,
        before: Option<String>,
        limit: usize,
        scan: usize,
        keep: impl Fn(&JobRecord) -> bool,
    ) -> Result<(Vec<JobRecord>, Option<String>), ()> {
        if !cl.is_up() {
            return Err(());
        }
        let mut out = Vec::new();
        let mut cursor = before;
        let mut looked = 0usize;
        loop {
            let ids = cl.job_ids(cursor.as_deref(), 100).await?;
            if ids.is_empty() {
                return Ok((out, None));
            }
            let recs = self.shared_records(cl, &ids).await?;
            for (id, rec) in ids.into_iter().zip(recs) {
                if out.len() >= limit || looked >= scan {
                    return Ok((out, cursor));
                }
                looked += 1;
                cursor = Some(id);
                if let Some(rec) = rec.filter(|r| keep(r)) {
                    out.push(rec);
                }
            }
        }
    }

    /// Asks the instance running `id` to cancel it.
    pub(super) async fn cluster_cancel(
        &self,
        cl: &Cluster,
        id: &str,
        reason: &str,
    ) -> Result<(), ()> {
        if !cl.is_up() {
            return Err(());
        }
        cl.cancel_request(id, reason, CANCEL_TTL).await
    }

    /// Claims one tick of schedule `index` (at `at_millis`) for this instance.
    pub(super) async fn claim_tick(
        &self,
        cl: &Cluster,
        index: usize,
        command: &str,
        at_millis: i64,
    ) -> Claim {
        if !cl.is_up() {
            return Claim::Unavailable;
        }
        match cl
            .claim_tick(&format!("{index}:{command}"), at_millis, CLAIM_TTL)
            .await
        {
            Ok(true) => Claim::Mine,
            Ok(false) => Claim::Taken,
            Err(()) => Claim::Unavailable,
        }
    }

    /// The latest run of schedule `index` anywhere in the cluster, while it
    /// still goes on.
    pub(super) async fn schedule_running(
        &self,
        cl: &Cluster,
        index: usize,
        command: &str,
    ) -> Option<String> {
        let last = cl
            .schedule_last(&format!("{index}:{command}"))
            .await
            .ok()
            .flatten()?;
        match self.shared_record(cl, &last).await {
            Ok(rec) if !rec.status.is_final() => Some(last),
            _ => None,
        }
    }

    /// Notes the latest run of schedule `index`.
    pub(super) async fn schedule_started(
        &self,
        cl: &Cluster,
        index: usize,
        command: &str,
        id: &str,
    ) {
        let ttl = self.cfg().job_retention;
        let _ = cl
            .set_schedule_last(&format!("{index}:{command}"), id, ttl)
            .await;
    }
}

/// Renews a live job's leases and lock, and stores its record again: after a
/// Redis that restarted empty, within [`RENEW_EVERY`] the job holds its lock
/// and place again and is seen by the other instances again.
async fn renew_live(cl: &Cluster, job: &Job, lock_name: Option<&str>, ttl: Duration) {
    let st = job.shared.lock().await;
    if st.ended {
        return;
    }
    let rec = job.record();
    let running = rec.status == Status::Running;
    let _ = cl.job_renew(&job.id, LEASE, running).await;
    if let Some(l) = lock_name {
        if cl.lock_renew(l, &job.id, LEASE).await == Ok(false) {
            tracing::warn!(job = %job.id, lock = l, "cluster: another job took this running job's lock (its lease lapsed while Redis was unavailable)");
        }
    }
    if let Ok(plain) = serde_json::to_vec(&rec) {
        let _ = cl.job_put(&job.id, &plain, ttl).await;
    }
    drop(st);
}

/// Sends the output not yet in Redis (never for metadata-only commands);
/// `st` is the job's held [`Job::shared`].
async fn forward_output(cl: &Cluster, job: &Job, st: &mut Mirrored, ttl: Duration) -> bool {
    if job.metadata_only {
        return true;
    }
    let sent = &mut st.sent;
    loop {
        let piece = {
            let out = lock(&job.out);
            let from = usize::try_from(*sent)
                .unwrap_or(usize::MAX)
                .min(out.data.len());
            let avail = out.data.get(from..).unwrap_or_default();
            avail
                .get(..avail.len().min(CHUNK))
                .unwrap_or_default()
                .to_vec()
        };
        if piece.is_empty() {
            return true;
        }
        let end = *sent + piece.len() as u64;
        if cl.out_append(&job.id, end, &piece, ttl).await.is_err() {
            // A write that landed but whose answer was lost: start from
            // what Redis has.
            if let Ok(have) = cl.out_end(&job.id).await {
                *sent = have;
            }
            return false;
        }
        *sent = end;
    }
}

/// One attempt at [`Core::cluster_finish`]; true when all of it is done.
async fn finish_once(
    cl: &Cluster,
    job: &Job,
    plain: &[u8],
    lock_name: Option<&str>,
    ttl: Duration,
) -> bool {
    let mut st = job.shared.lock().await;
    st.ended = true;
    if !forward_output(cl, job, &mut st, ttl).await {
        return false;
    }
    if let Some(l) = lock_name {
        if cl.lock_release(l, &job.id).await.is_err() {
            return false;
        }
    }
    if cl.job_put(&job.id, plain, ttl).await.is_err() {
        return false;
    }
    cl.job_leave(&job.id).await.is_ok()
}

/// Waits one poll period; false when this gateway is shutting down.
async fn pause(shutdown: &mut tokio::sync::watch::Receiver<bool>) -> bool {
    tokio::select! {
        () = tokio::time::sleep(POLL) => true,
        _ = shutdown.wait_for(|s| *s) => false,
    }
}

/// Streams the output of a job run by another instance from Redis until it
/// ends (SSE: then an `end` event). When Redis fails, or this gateway shuts
/// down, the stream ends without an `end` event; the client resumes with
/// `Last-Event-ID`.
pub(super) async fn follow(
    core: Arc<Core>,
    cl: Arc<Cluster>,
    id: String,
    tx: mpsc::Sender<Bytes>,
    sse: bool,
    from: u64,
    metadata_only: bool,
) {
    // Like a live stream of a job on a runner, it does not hold the
    // shutdown's drain: it ends without an `end` event (resume elsewhere).
    let mut shutdown = core.shutdown_tx.subscribe();
    if metadata_only {
        let first = if sse {
            sse_event(0, METADATA_ONLY_OUTPUT.as_bytes())
        } else {
            Bytes::from(format!("{METADATA_ONLY_OUTPUT}\n"))
        };
        if tx.send(first).await.is_err() {
            return;
        }
        while let Ok(rec) = core.shared_record(&cl, &id).await {
            if rec.status.is_final() {
                if sse {
                    let _ = tx.send(sse_end(&rec)).await;
                }
                return;
            }
            if tx.is_closed() {
                return;
            }
            if !pause(&mut shutdown).await {
                return;
            }
        }
        return;
    }
    // `offset`: bytes sent so far (the SSE id); `have`: read up to here.
    let mut offset = if sse { from } else { 0 };
    let mut have = offset;
    let mut buf: Vec<u8> = Vec::new();
    let mut quiet = tokio::time::Instant::now();
    loop {
        // The state before the output: a job recorded as ended has all of
        // its output in Redis already.
        let Ok(rec) = core.shared_record(&cl, &id).await else {
            return;
        };
        let done = rec.status.is_final();
        let Ok(chunks) = cl.out_read(&id, have, READ_BATCH).await else {
            return;
        };
        let more = chunks.len() == READ_BATCH;
        for (end, bytes) in chunks {
            let start = end.saturating_sub(bytes.len() as u64);
            if end <= have {
                continue;
            }
            let skip = usize::try_from(have.saturating_sub(start)).unwrap_or(usize::MAX);
            buf.extend_from_slice(bytes.get(skip..).unwrap_or_default());
            have = end;
        }
        let last = done && !more;
        while !buf.is_empty() {
            let take = buf.len().min(CHUNK);
            let slice = buf.get(..take).unwrap_or_default();
            let cut = if sse && !(last && take == buf.len()) {
                utf8_end(slice)
            } else {
                slice.len()
            };
            if cut == 0 {
                break;
            }
            offset += cut as u64;
            let frame = if sse {
                sse_event(offset, slice.get(..cut).unwrap_or_default())
            } else {
                Bytes::copy_from_slice(slice.get(..cut).unwrap_or_default())
            };
            if tx.send(frame).await.is_err() {
                return;
            }
            buf.drain(..cut);
            quiet = tokio::time::Instant::now();
        }
        if last {
            if sse {
                let _ = tx.send(sse_end(&rec)).await;
            }
            return;
        }
        if more {
            continue;
        }
        if sse && quiet.elapsed() >= KEEPALIVE {
            if tx
                .send(Bytes::from_static(b": keepalive\n\n"))
                .await
                .is_err()
            {
                return;
            }
            quiet = tokio::time::Instant::now();
        }
        if tx.is_closed() {
            return;
        }
        if !pause(&mut shutdown).await {
            return;
        }
    }
}
