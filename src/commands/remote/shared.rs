//! Runners in cluster mode: a runner's requests (poll, describe, output,
//! finish) may land on any instance, and operators may use any instance.
//! The instance that accepted a job owns it as for local jobs (audit lines,
//! record, lock, run slot); what passes between it and the runner goes
//! through Redis (see `crate::cluster::runners` for the keys):
//!
//! - presence and descriptions: every poll renews the runner's presence in
//!   Redis; every instance reads all runners' presence, running jobs and
//!   descriptions every [`SYNC_EVERY`] into its registry, which answers
//!   listings, option checks and the choice of a runner;
//! - jobs and cancels: the owner queues them for the runner; the instance
//!   holding the runner's newest poll takes the whole queue atomically
//!   (delivered once), checking every [`CHECK_EVERY`] while it holds it;
//! - output and the end report: stored by whichever instance received them,
//!   with the offset checked against what Redis holds (416 + length on a
//!   mismatch); the owner reads them into the job every [`CHECK_EVERY`];
//! - a runner whose presence lapsed (`commands.lease`) loses its jobs: only
//!   their owner declares them `lost`, once, never while it cannot read
//!   Redis, and only a lease after it could read it again.

use super::{
    end_of, lock, parse_description, poll_fields, reply, Description, Dispatch, End, Job, Refused,
    Registry, Report, Running, Slot, BAD_TOKEN, NO_SUCH_JOB,
};
use crate::body::Body;
use crate::cluster::runners::Landed;
use crate::cluster::Cluster;
use http::{Response, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::oneshot;

/// How often an instance reads the runners' state from Redis.
const SYNC_EVERY: Duration = Duration::from_millis(500);
/// How often a held poll looks for work and an owner for reports.
const CHECK_EVERY: Duration = Duration::from_millis(200);
/// How long job bindings, reported output and descriptions are kept at most.
const KEEP: Duration = Duration::from_secs(24 * 3600);
/// How often the owner stores a job's binding to its runner again (after a
/// Redis that restarted empty).
const REBIND_EVERY: Duration = Duration::from_secs(5);
/// How long after a cancel was queued the runner may take to report the
/// job's end (beyond one lease) before the job is declared lost.
const CANCEL_CONFIRM: Duration = Duration::from_secs(30);
/// Output chunks read per check.
const READ_BATCH: usize = 64;

/// The refusal of every runner request while Redis is unavailable.
pub(super) const UNAVAILABLE: Refused = (
    StatusCode::SERVICE_UNAVAILABLE,
    "Cluster state (Redis) unavailable: runner operations are paused",
);

/// One entry of a runner's queue in Redis.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Item {
    Job(Dispatch),
    Cancel(String),
}

/// A runner's presence as stored in Redis.
#[derive(Serialize, Deserialize)]
struct Presence {
    version: Option<String>,
    at: String,
}

fn presence(version: Option<String>) -> Vec<u8> {
    let at = humantime::format_rfc3339_millis(SystemTime::now()).to_string();
    serde_json::to_vec(&Presence { version, at }).unwrap_or_default()
}

/// Starts reading the runners' state from Redis (cluster mode only).
pub(super) fn spawn_sync(reg: &Arc<Registry>) {
    let Some(cl) = reg.cluster.clone() else {
        return;
    };
    let weak = Arc::downgrade(reg);
    tokio::spawn(async move {
        loop {
            let Some(reg) = weak.upgrade() else { return };
            let was_fresh = fresh(&reg);
            if cl.is_up() && sync(&reg, &cl).await.is_ok() {
                if !was_fresh {
                    spare(&reg);
                }
                *lock(&reg.synced) = Some(Instant::now());
            }
            drop(reg);
            tokio::time::sleep(SYNC_EVERY).await;
        }
    });
}

/// Whether this instance's view of the runners is recent enough to declare
/// jobs lost (always outside cluster mode).
pub(super) fn fresh(reg: &Registry) -> bool {
    match &reg.cluster {
        None => true,
        Some(cl) => cl.is_up() && lock(&reg.synced).is_some_and(|t| t.elapsed() < SYNC_EVERY * 4),
    }
}

/// Redis is readable again after this instance could not read it: runners
/// answered 503 meanwhile and may be backing off, so each has one lease from
/// now to poll again before its jobs are declared lost.
fn spare(reg: &Registry) {
    let until = Instant::now() + reg.lease;
    for slot in lock(&reg.slots).iter() {
        lock(&slot.st).spared_until = Some(until);
    }
}

async fn sync(reg: &Registry, cl: &Cluster) -> Result<(), ()> {
    let slots: Vec<Arc<Slot>> = lock(&reg.slots).clone();
    let names: Vec<String> = slots.iter().map(|s| s.def.name.clone()).collect();
    let seen = cl.runners_seen(&names).await?;
    for (slot, seen) in slots.iter().zip(seen) {
        let stale = {
            let mut st = lock(&slot.st);
            if let Some(left) = seen.left {
                let age = reg.lease.saturating_sub(left);
                if let Some(at) = Instant::now().checked_sub(age) {
                    if st.last_seen.map_or(true, |l| l < at) {
                        st.last_seen = Some(at);
                    }
                }
                let p = seen
                    .presence
                    .and_then(|p| serde_json::from_slice::<Presence>(&p).ok());
                if let Some(p) = p {
                    let wall = humantime::parse_rfc3339(&p.at).ok();
                    if wall.is_some() && st.last_seen_wall.map_or(true, |w| Some(w) < wall) {
                        st.last_seen_wall = wall;
                        if p.version.is_some() {
                            st.version = p.version;
                        }
                    }
                }
            }
            st.shared_jobs = seen.jobs;
            seen.digest
                .filter(|d| st.described.as_ref().map(|(x, _)| x) != Some(d))
        };
        if let Some(digest) = stale {
            let blob = cl.runner_description(&slot.def.name).await?;
            if let Some(d) = blob.and_then(|b| serde_json::from_slice::<Description>(&b).ok()) {
                lock(&slot.st).described = Some((digest, Arc::new(d)));
            }
        }
    }
    Ok(())
}

/// The current slot of runner `name` (a reload may have replaced it).
fn current(reg: &Registry, name: &str) -> Option<Arc<Slot>> {
    lock(&reg.slots)
        .iter()
        .find(|s| s.def.name == name)
        .cloned()
}

/// Owner side: hands `d` to runner `slot` through Redis and waits for its end.
pub(super) async fn hand(
    reg: &Registry,
    cl: &Cluster,
    slot: &Arc<Slot>,
    job: &Arc<Job>,
    d: Dispatch,
    tx: oneshot::Sender<End>,
    rx: oneshot::Receiver<End>,
) -> End {
    let name = slot.def.name.clone();
    let item = serde_json::to_vec(&Item::Job(d)).unwrap_or_default();
    // Bound first: the instance delivering the job checks the binding.
    if cl.runner_bind(&job.id, &name, KEEP).await.is_err()
        || cl.runner_push(&name, &item, reg.lease).await.is_err()
    {
        let _ = cl.runner_unbind(&job.id, &name).await;
        return End::SpawnFailed("cluster state (Redis) unavailable; not run".into());
    }
    lock(&slot.st).running.insert(
        job.id.clone(),
        Running {
            job: Arc::clone(job),
            end: Some(tx),
        },
    );
    reg.dispatched.fetch_add(1, Ordering::Relaxed);
    slot.wake.notify_waiters();
    wait(reg, cl, job, &name, rx).await
}

/// Owner side: reads what runner `name` reports for `job` (output, end),
/// passes cancels on, and returns its end (or `lost`, decided by the lease
/// watcher).
pub(super) async fn wait(
    reg: &Registry,
    cl: &Cluster,
    job: &Arc<Job>,
    name: &str,
    mut rx: oneshot::Receiver<End>,
) -> End {
    let mut cancel = job.cancel.subscribe();
    let mut cancel_due = false;
    let mut cancel_sent: Option<Instant> = None;
    let mut tick = tokio::time::interval(CHECK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut bound_at, mut was_up) = (Instant::now(), true);
    let end = loop {
        tokio::select! {
            end = &mut rx => break end.unwrap_or_else(|_| End::Lost("runner gone".into())),
            changed = cancel.changed(), if !cancel_due && cancel_sent.is_none() => {
                if changed.is_err() || cancel.borrow().is_some() {
                    cancel_due = true;
                }
            }
            _ = tick.tick() => {
                let up = cl.is_up();
                if up && (!was_up || bound_at.elapsed() >= REBIND_EVERY)
                    && cl.runner_bind(&job.id, name, KEEP).await.is_ok()
                {
                    bound_at = Instant::now();
                }
                was_up = up;
                if cancel_due {
                    let item = serde_json::to_vec(&Item::Cancel(job.id.clone())).unwrap_or_default();
                    if cl.runner_push(name, &item, reg.lease).await.is_ok() {
                        cancel_due = false;
                        cancel_sent = Some(Instant::now());
                        if let Some(s) = current(reg, name) {
                            s.wake.notify_waiters();
                        }
                    }
                }
                let mut end = pull(cl, job, name).await;
                // A runner that never confirms a cancel (it lost the job
                // while Redis restarted empty): the outcome is unknown.
                if end.is_none()
                    && cancel_sent.is_some_and(|t| t.elapsed() > reg.lease + CANCEL_CONFIRM)
                {
                    end = Some(End::Lost(format!("runner {name} did not confirm the cancel")));
                }
                if let Some(end) = end {
                    // The lease watcher may have ended it meanwhile: then
                    // its verdict stands.
                    let mine = current(reg, name)
                        .is_some_and(|s| lock(&s.st).running.remove(&job.id).is_some());
                    if mine {
                        break end;
                    }
                    break rx.await.unwrap_or_else(|_| End::Lost("runner gone".into()));
                }
            }
        }
    };
    let _ = cl.runner_unbind(&job.id, name).await;
    end
}

/// Reads the output runner `name` reported for `job` into it; its end once
/// the report is there (`None` while it runs or Redis fails).
async fn pull(cl: &Cluster, job: &Job, name: &str) -> Option<End> {
    // The report first: once it is stored, all of the output is.
    let report = cl.runner_report(&job.id).await.ok()?;
    loop {
        let mut have = lock(&job.out).total;
        let chunks = cl.runner_read(&job.id, have, READ_BATCH).await.ok()?;
        if chunks.is_empty() {
            break;
        }
        for (end, bytes) in chunks {
            let start = end.saturating_sub(bytes.len() as u64);
            if end <= have {
                continue;
            }
            let skip = usize::try_from(have.saturating_sub(start)).unwrap_or(usize::MAX);
            let _ = job.append(bytes.get(skip..).unwrap_or_default(), Some(have));
            have = end;
        }
    }
    let report = report?;
    let Ok(rep) = serde_json::from_slice::<Report>(&report) else {
        return Some(End::SpawnFailed(format!(
            "runner {name} sent an unreadable report"
        )));
    };
    {
        let mut out = lock(&job.out);
        out.total = out.total.max(rep.output_bytes);
    }
    Some(end_of(rep, name))
}

/// `POST /__runner__/poll` in cluster mode.
pub(super) async fn poll(
    reg: &Registry,
    cl: &Cluster,
    slot: &Slot,
    body: &[u8],
) -> Result<Response<Body>, Refused> {
    reg.polls.fetch_add(1, Ordering::Relaxed);
    let (version, described) = poll_fields(body);
    let name = &slot.def.name;
    let seq = match cl
        .runner_poll(
            name,
            described.as_deref().unwrap_or_default(),
            &presence(version.clone()),
            reg.lease,
        )
        .await
    {
        Err(()) => return Err(UNAVAILABLE),
        // Not connected until it has told what it runs.
        Ok(None) => {
            return Ok(reply(
                StatusCode::OK,
                &json!({"jobs": [], "cancel": [], "describe": true}),
            ))
        }
        Ok(Some(n)) => n,
    };
    let me = lock(&slot.st).polled(version);
    slot.wake.notify_waiters();
    let empty = || Ok(reply(StatusCode::OK, &json!({"jobs": [], "cancel": []})));
    let superseded = || {
        Ok(reply(
            StatusCode::OK,
            &json!({"jobs": [], "cancel": [], "superseded": true}),
        ))
    };
    let deadline = tokio::time::Instant::now() + reg.hold();
    loop {
        let notified = slot.wake.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        {
            let st = lock(&slot.st);
            if st.revoked {
                return Err(BAD_TOKEN);
            }
            if st.moved {
                return empty();
            }
            if st.poll_seq != me {
                return superseded();
            }
        }
        match cl.runner_claim(name, seq).await {
            Ok(None) => return superseded(),
            Ok(Some(items)) if !items.is_empty() => {
                let (jobs, cancel) = deliverable(cl, name, &items).await;
                if !jobs.is_empty() || !cancel.is_empty() {
                    return Ok(reply(
                        StatusCode::OK,
                        &json!({"jobs": jobs, "cancel": cancel}),
                    ));
                }
            }
            _ => {}
        }
        tokio::select! {
            _ = &mut notified => {}
            _ = tokio::time::sleep(CHECK_EVERY) => {}
            _ = tokio::time::sleep_until(deadline) => return empty(),
        }
    }
}

/// The jobs (still handed to this runner) and cancels among `items`.
async fn deliverable(cl: &Cluster, name: &str, items: &[Vec<u8>]) -> (Vec<Dispatch>, Vec<String>) {
    let mut jobs = Vec::new();
    let mut cancel = Vec::new();
    for item in items {
        match serde_json::from_slice::<Item>(item) {
            Ok(Item::Job(d)) => jobs.push(d),
            Ok(Item::Cancel(id)) => cancel.push(id),
            Err(_) => {}
        }
    }
    let ids: Vec<String> = jobs.iter().map(|d| d.id.clone()).collect();
    // A job that ended while queued (its runner was lost) never runs; when
    // Redis cannot say, the job is kept (its owner still waits for it).
    if let Ok(bound) = cl.runner_bound(name, &ids).await {
        let mut keep = bound.into_iter();
        jobs.retain(|_| keep.next().unwrap_or(false));
    }
    (jobs, cancel)
}

/// `POST /__runner__/describe` in cluster mode.
pub(super) async fn describe(
    reg: &Registry,
    cl: &Cluster,
    slot: &Slot,
    body: &[u8],
) -> Result<Response<Body>, Refused> {
    let (digest, d) = parse_description(slot, body)?;
    let plain = serde_json::to_vec(&d).map_err(|_| UNAVAILABLE)?;
    let version = lock(&slot.st).version.clone();
    cl.runner_describe(
        &slot.def.name,
        &digest,
        &plain,
        &presence(version),
        reg.lease,
        KEEP,
    )
    .await
    .map_err(|()| UNAVAILABLE)?;
    let mut st = lock(&slot.st);
    st.described = Some((digest, Arc::new(d)));
    st.last_seen = Some(Instant::now());
    st.last_seen_wall = Some(SystemTime::now());
    Ok(reply(StatusCode::OK, &json!({"ok": true})))
}

/// The answer to a runner's output or report: `ok(length)` when stored.
fn answer(l: Landed, ok: impl FnOnce(u64) -> Value) -> Result<Response<Body>, Refused> {
    match l {
        Landed::Stored(n) => Ok(reply(StatusCode::OK, &ok(n))),
        Landed::Length(n) => Ok(reply(
            StatusCode::RANGE_NOT_SATISFIABLE,
            &json!({ "length": n }),
        )),
        Landed::NoJob => Err(NO_SUCH_JOB),
    }
}

/// `POST /__runner__/jobs/<id>/output` in cluster mode.
pub(super) async fn output(
    cl: &Cluster,
    slot: &Slot,
    id: &str,
    offset: u64,
    bytes: &[u8],
) -> Result<Response<Body>, Refused> {
    let l = cl
        .runner_output(id, &slot.def.name, offset, bytes, KEEP)
        .await
        .map_err(|()| UNAVAILABLE)?;
    answer(l, |n| json!({ "length": n }))
}

/// `POST /__runner__/jobs/<id>/finish` in cluster mode.
pub(super) async fn finish(
    cl: &Cluster,
    slot: &Slot,
    id: &str,
    rep: &Report,
) -> Result<Response<Body>, Refused> {
    let plain = serde_json::to_vec(rep).map_err(|_| UNAVAILABLE)?;
    let l = cl
        .runner_finish(id, &slot.def.name, rep.sent, &plain, KEEP)
        .await
        .map_err(|()| UNAVAILABLE)?;
    answer(l, |_| json!({"ok": true}))
}
