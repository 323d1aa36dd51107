//! Gateway side of runners (`commands.execute = "runners"`): commands run on
//! the backend hosts, by `portcullis runner` processes that dial in.
//!
//! Protocol (all under `/__runner__/`, `Authorization: Bearer <runner token>`;
//! runner tokens are accepted nowhere else and nothing else is accepted here):
//! - `POST /__runner__/poll` (body `{"version"}`): held until work or a cancel
//!   is there, at most `min(25 s, lease / 2)`; answers
//!   `{"jobs": [{"id","command","data"}], "cancel": [ids]}`. Every poll is
//!   the runner's lease renewal.
//! - `POST /__runner__/jobs/<id>/output` with `x-portcullis-offset: N`: appends
//!   the body when N is the gateway's current length; otherwise 416 with
//!   `{"length": <gateway's length>}` so the runner resyncs (a retried chunk
//!   that already arrived is never stored twice).
//! - `POST /__runner__/jobs/<id>/finish` `{"end","raw","reason","sent","output_bytes"}`:
//!   416 + length when output is still missing, else the job ends.
//! - `POST /__runner__/describe` `{"commands": {name: {"kind": "django",
//!   "info"|"error"} | {"kind": "custom"}}}`: the commands the runner's own
//!   rules allow, Django ones with the options its Django reported. A poll
//!   carries the SHA-256 of the last description sent (`"described"`); when
//!   the gateway holds another (a new runner, a restarted gateway) the poll
//!   answers at once with `"describe": true`, and the runner counts as
//!   connected only once it has described itself.
//!
//! A runner that has not polled for `commands.lease` is lost: its jobs end
//! `lost` and are never re-run.
//!
//! In cluster mode (`[cluster]`) a runner's requests may land on any
//! instance: see [`shared`] for what goes through Redis.
//!
//! Longer than the crate's 600-line guide on purpose: the runner registry and
//! the `/__runner__/` endpoints share each runner's state (lease, queue,
//! cancels, description) under one lock; split, that state would be open to a
//! second module.

use super::introspect::{forbidden_key, CommandInfo};
use super::jobs::{lock, Job};
use super::runner::End;
use crate::body::Body;
use crate::config::problems::Problems;
use crate::secret::Matcher;
use bytes::Bytes;
use http::{Method, Response, StatusCode};
use http_body_util::BodyExt;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::{oneshot, Notify};

mod shared;

/// Header carrying the byte offset of an output chunk.
pub const OFFSET_HEADER: &str = "x-portcullis-offset";
/// Largest output chunk or report body accepted from a runner.
const MAX_BODY: usize = 1 << 20;
/// Longest a poll is held.
const MAX_HOLD: Duration = Duration::from_secs(25);

/// One `[[runners]]` entry as written in TOML.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRunnerDef {
    name: String,
    token: String,
    #[serde(default)]
    groups: Vec<String>,
}

/// One `[[runners]]` entry: a runner allowed to dial in.
#[derive(Debug, Clone)]
pub struct RunnerDef {
    /// Its name, shown in job records.
    pub name: String,
    /// Its credential (kept as a digest).
    pub token: Matcher,
    /// Groups it serves (`[commands.rules.<cmd>] group`).
    pub groups: Vec<String>,
}

/// Validates `[[runners]]` against `[commands]`.
pub fn validate_runners(
    raw: &[RawRunnerDef],
    commands: Option<&super::config::CommandsConfig>,
    p: &mut Problems,
) -> Vec<RunnerDef> {
    let mut out: Vec<RunnerDef> = Vec::new();
    for (i, r) in raw.iter().enumerate() {
        let at = format!("runners[{i}]");
        if r.name.is_empty() || out.iter().any(|o| o.name == r.name) {
            p.push(format!("{at}.name"), "must be non-empty and unique");
        }
        match crate::secret::resolve(&r.token).and_then(|s| Matcher::from_secret(&s)) {
            Ok(token) => out.push(RunnerDef {
                name: r.name.clone(),
                token,
                groups: r.groups.clone(),
            }),
            Err(e) => p.push(format!("{at}.token"), e),
        }
    }
    let remote = commands.is_some_and(|c| c.execute == super::config::Execute::Runners);
    if !raw.is_empty() && !remote {
        p.push("runners", "[[runners]] need commands.execute = \"runners\"");
    }
    if remote && raw.is_empty() {
        p.push(
            "commands.execute",
            "\"runners\" needs at least one [[runners]] entry",
        );
    }
    out
}

/// A job handed to a runner, as the poll answer carries it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Dispatch {
    /// Job id.
    pub id: String,
    /// Command name.
    pub command: String,
    /// The operator's `data`, checked again by the runner's own rules.
    pub data: Map<String, Value>,
}

/// Most commands one description may name.
const MAX_DESCRIBED: usize = 5000;

/// What a runner says about one command its rules allow.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Described {
    /// A Django command: its options as the runner's Django reported them,
    /// or why they could not be read there.
    Django {
        /// The options.
        #[serde(default)]
        info: Option<CommandInfo>,
        /// Why they are unknown.
        #[serde(default)]
        error: Option<String>,
    },
    /// One of the runner's `[[commands.custom]]`.
    Custom,
}

/// The body of `POST /__runner__/describe`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Description {
    /// By command name.
    pub commands: BTreeMap<String, Described>,
}

impl Description {
    /// Drops what the gateway never accepts from a runner: invalid command
    /// names, and options `settings`/`pythonpath` (or a prefix of them).
    fn sanitized(mut self) -> Description {
        self.commands
            .retain(|name, _| super::config::valid_command_name(name));
        for d in self.commands.values_mut() {
            if let Described::Django {
                info: Some(info), ..
            } = d
            {
                info.options
                    .retain(|o| !o.keys.iter().any(|(k, _)| forbidden_key(k)));
            }
        }
        self
    }
}

/// How a runner reports the end of a job.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    /// `exited`, `timed_out`, `cancelled`, `spawn_failed` or `rejected`.
    pub end: String,
    /// Raw wait status for `exited`.
    #[serde(default)]
    pub raw: Option<i32>,
    /// Reason for the other ends.
    #[serde(default)]
    pub reason: Option<String>,
    /// Output bytes sent to the gateway.
    #[serde(default)]
    pub sent: u64,
    /// Output bytes the process wrote.
    #[serde(default)]
    pub output_bytes: u64,
}

struct Running {
    job: Arc<Job>,
    end: Option<oneshot::Sender<End>>,
}

#[derive(Default)]
struct SlotState {
    revoked: bool,
    /// Replaced by a slot with new groups (same runner, same token).
    moved: bool,
    last_seen: Option<Instant>,
    last_seen_wall: Option<SystemTime>,
    version: Option<String>,
    /// The runner's latest description and the SHA-256 of its body.
    described: Option<(String, Arc<Description>)>,
    queue: VecDeque<Dispatch>,
    cancels: Vec<String>,
    running: HashMap<String, Running>,
    /// Cluster mode: the jobs it runs for any instance, as last read from
    /// Redis.
    shared_jobs: Vec<String>,
    /// Cluster mode: its jobs are not declared lost before this (one lease
    /// after this instance could read Redis again).
    spared_until: Option<Instant>,
    /// Number of the latest poll. A runner holds one poll at a time, so an
    /// older poll still held is a dead process's (or a stale connection's):
    /// it is answered empty at once and work goes to the newest only.
    poll_seq: u64,
}

impl SlotState {
    /// Notes a poll (the runner is seen now, with `version` when given);
    /// the poll's number.
    fn polled(&mut self, version: Option<String>) -> u64 {
        self.last_seen = Some(Instant::now());
        self.last_seen_wall = Some(SystemTime::now());
        if version.is_some() {
            self.version = version;
        }
        self.poll_seq += 1;
        self.poll_seq
    }
}

struct Slot {
    def: RunnerDef,
    st: Mutex<SlotState>,
    wake: Notify,
}

/// The runners known to the gateway and the jobs they hold.
pub(super) struct Registry {
    lease: Duration,
    slots: Mutex<Vec<Arc<Slot>>>,
    polls: AtomicU64,
    refused: AtomicU64,
    lost: AtomicU64,
    dispatched: AtomicU64,
    /// The gateway is shutting down: jobs on runners are left to the next
    /// gateway process, never declared lost by this one.
    stopping: std::sync::atomic::AtomicBool,
    /// Cluster mode: runners' presence, descriptions, queues and reports
    /// are shared through Redis.
    cluster: Option<Arc<crate::cluster::Cluster>>,
    /// When the runners' state was last read from Redis.
    synced: Mutex<Option<Instant>>,
}

impl Registry {
    /// A registry for `defs`, with its lease watcher running.
    pub(super) fn start(
        defs: &[RunnerDef],
        lease: Duration,
        cluster: Option<Arc<crate::cluster::Cluster>>,
    ) -> Arc<Registry> {
        let reg = Arc::new(Registry {
            lease,
            slots: Mutex::new(Vec::new()),
            polls: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            lost: AtomicU64::new(0),
            dispatched: AtomicU64::new(0),
            stopping: std::sync::atomic::AtomicBool::new(false),
            cluster,
            synced: Mutex::new(None),
        });
        reg.update(defs);
        shared::spawn_sync(&reg);
        let weak = Arc::downgrade(&reg);
        tokio::spawn(async move {
            let tick = (lease / 4).clamp(Duration::from_millis(100), Duration::from_secs(1));
            loop {
                tokio::time::sleep(tick).await;
                let Some(reg) = weak.upgrade() else { return };
                reg.expire();
            }
        });
        reg
    }

    /// Applies a reloaded `[[runners]]`: a removed runner or one whose token
    /// changed is refused at once, its held poll included.
    pub(super) fn update(&self, defs: &[RunnerDef]) {
        let mut slots = lock(&self.slots);
        let mut next = Vec::new();
        for d in defs {
            let keep = slots
                .iter()
                .find(|s| s.def.name == d.name && s.def.token.same_as(&d.token))
                .cloned();
            next.push(match keep {
                Some(s) if s.def.groups == d.groups => s,
                // Same runner, new groups: its state (lease, jobs) moves over.
                Some(s) => {
                    let st = {
                        let mut old = lock(&s.st);
                        let st = std::mem::take(&mut *old);
                        old.moved = true;
                        st
                    };
                    Arc::new(Slot {
                        def: d.clone(),
                        st: Mutex::new(st),
                        wake: Notify::new(),
                    })
                }
                None => Arc::new(Slot {
                    def: d.clone(),
                    st: Mutex::new(SlotState::default()),
                    wake: Notify::new(),
                }),
            });
        }
        for old in slots.iter() {
            let moved = next
                .iter()
                .any(|n| n.def.name == old.def.name && n.def.token.same_as(&old.def.token));
            if moved && !next.iter().any(|n| Arc::ptr_eq(n, old)) {
                // Its held poll ends empty; the next one finds the new slot.
                old.wake.notify_waiters();
                continue;
            }
            if !next.iter().any(|n| Arc::ptr_eq(n, old)) {
                lock(&old.st).revoked = true;
                old.wake.notify_waiters();
                // Its jobs are lost: the runner can no longer report them.
                let running: Vec<Running> = lock(&old.st).running.drain().map(|(_, r)| r).collect();
                for mut r in running {
                    if let Some(tx) = r.end.take() {
                        let _ = tx.send(End::Lost("runner removed from the configuration".into()));
                    }
                }
            }
        }
        *slots = next;
    }

    fn connected(&self, s: &SlotState) -> bool {
        !s.revoked && s.last_seen.is_some_and(|t| t.elapsed() < self.lease)
    }

    fn in_group(slot: &Slot, group: Option<&str>) -> bool {
        group.map_or(true, |g| slot.def.groups.iter().any(|x| x == g))
    }

    /// Whether a runner of `group` (any group when `None`) is connected.
    /// With `pin`, only that runner counts.
    pub(super) fn any_connected(&self, group: Option<&str>, pin: Option<&str>) -> bool {
        lock(&self.slots).iter().any(|s| {
            Self::in_group(s, group)
                && pin.map_or(true, |p| s.def.name == p)
                && self.connected(&lock(&s.st))
        })
    }

    /// Names of the connected runners of `group`.
    pub(super) fn connected_names(&self, group: Option<&str>) -> Vec<String> {
        lock(&self.slots)
            .iter()
            .filter(|s| Self::in_group(s, group) && self.connected(&lock(&s.st)))
            .map(|s| s.def.name.clone())
            .collect()
    }

    /// What the connected runners of `group` (only `pin`, when given) say
    /// about `command`, by runner name.
    pub(super) fn described(
        &self,
        command: &str,
        group: Option<&str>,
        pin: Option<&str>,
    ) -> Vec<(String, Described)> {
        let mut out: Vec<(String, Described)> = lock(&self.slots)
            .iter()
            .filter(|s| Self::in_group(s, group) && pin.map_or(true, |p| s.def.name == p))
            .filter_map(|s| {
                let st = lock(&s.st);
                if !self.connected(&st) {
                    return None;
                }
                let (_, d) = st.described.as_ref()?;
                d.commands
                    .get(command)
                    .map(|c| (s.def.name.clone(), c.clone()))
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Every command some connected runner of `group` describes, sorted.
    pub(super) fn described_names(&self, group: Option<&str>) -> Vec<String> {
        let mut names: Vec<String> = lock(&self.slots)
            .iter()
            .filter(|s| Self::in_group(s, group))
            .flat_map(|s| {
                let st = lock(&s.st);
                match (&st.described, self.connected(&st)) {
                    (Some((_, d)), true) => d.commands.keys().cloned().collect(),
                    _ => Vec::new(),
                }
            })
            .collect();
        names.sort();
        names.dedup();
        names
    }

    /// Stops declaring jobs lost: this gateway process is shutting down
    /// (while it drains, runners cannot reach it).
    pub(super) fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
    }

    /// Ends the jobs of runners silent past the lease as `lost`.
    fn expire(&self) {
        if self.stopping.load(Ordering::SeqCst) || !shared::fresh(self) {
            return;
        }
        let slots: Vec<Arc<Slot>> = lock(&self.slots).clone();
        for slot in slots {
            let lost: Vec<Running> = {
                let mut st = lock(&slot.st);
                if self.connected(&st)
                    || st.running.is_empty()
                    || st.spared_until.is_some_and(|t| t > Instant::now())
                {
                    continue;
                }
                st.queue.clear();
                st.cancels.clear();
                st.running.drain().map(|(_, r)| r).collect()
            };
            self.lost.fetch_add(lost.len() as u64, Ordering::Relaxed);
            for mut r in lost {
                tracing::warn!(runner = %slot.def.name, job = %r.job.id, "runner missed its lease; job lost");
                if let Some(tx) = r.end.take() {
                    let _ = tx.send(End::Lost(format!(
                        "runner {} missed its lease",
                        slot.def.name
                    )));
                }
            }
        }
    }

    /// Hands `d` to one connected runner of `group` (the least busy) and
    /// waits for its end; cancels are passed on.
    /// The record naming the runner is committed before the runner can see
    /// the job, so a restarted gateway knows where it runs.
    pub(super) async fn run(
        &self,
        store: &Arc<super::store::Store>,
        job: &Arc<Job>,
        d: Dispatch,
        group: Option<&str>,
        pin: Option<&str>,
    ) -> End {
        let (tx, rx) = oneshot::channel();
        let slot = {
            let slots = lock(&self.slots);
            let mut best: Option<(usize, Arc<Slot>)> = None;
            for s in slots
                .iter()
                .filter(|s| Self::in_group(s, group) && pin.map_or(true, |p| s.def.name == p))
            {
                let st = lock(&s.st);
                // In cluster mode it may run jobs of other instances too.
                let load = st.running.len().max(st.shared_jobs.len());
                if self.connected(&st) && best.as_ref().map_or(true, |(n, _)| load < *n) {
                    best = Some((load, Arc::clone(s)));
                }
            }
            match best {
                Some((_, s)) => s,
                None => return End::SpawnFailed("no runner of the group is connected".into()),
            }
        };
        let rec = {
            let mut r = lock(&job.record);
            r.runner = Some(slot.def.name.clone());
            r.clone()
        };
        job.bump();
        if let Err(err) = super::store::blocking(store, move |s| s.put(&rec, None)).await {
            tracing::error!(error = %err, job = %job.id, "job store write failed; not dispatched");
            return End::SpawnFailed("job store unavailable; not run".into());
        }
        if let Some(cl) = &self.cluster {
            return shared::hand(self, cl, &slot, job, d, tx, rx).await;
        }
        {
            let mut st = lock(&slot.st);
            st.running.insert(
                d.id.clone(),
                Running {
                    job: Arc::clone(job),
                    end: Some(tx),
                },
            );
            st.queue.push_back(d);
        }
        self.dispatched.fetch_add(1, Ordering::Relaxed);
        slot.wake.notify_waiters();
        Self::wait(job, &slot, rx).await
    }

    /// Whether a runner of this name is configured.
    pub(super) fn knows(&self, name: &str) -> bool {
        lock(&self.slots).iter().any(|s| s.def.name == name)
    }

    /// Waits for the end of `job`, begun on runner `name` before a gateway
    /// restart. The runner has one lease from now to come back.
    pub(super) async fn adopt(&self, job: &Arc<Job>, name: &str) -> End {
        let (tx, rx) = oneshot::channel();
        let slot = lock(&self.slots)
            .iter()
            .find(|s| s.def.name == name)
            .cloned();
        let Some(slot) = slot else {
            return End::Lost(format!("runner {name} is no longer configured"));
        };
        {
            let mut st = lock(&slot.st);
            st.last_seen.get_or_insert_with(Instant::now);
            st.running.insert(
                job.id.clone(),
                Running {
                    job: Arc::clone(job),
                    end: Some(tx),
                },
            );
        }
        if let Some(cl) = &self.cluster {
            return shared::wait(self, cl, job, &slot.def.name, rx).await;
        }
        Self::wait(job, &slot, rx).await
    }

    async fn wait(job: &Arc<Job>, slot: &Slot, mut rx: oneshot::Receiver<End>) -> End {
        let mut cancel = job.cancel.subscribe();
        let mut cancel_sent = false;
        loop {
            tokio::select! {
                end = &mut rx => {
                    return end.unwrap_or_else(|_| End::Lost("runner gone".into()));
                }
                changed = cancel.changed(), if !cancel_sent => {
                    if changed.is_err() || cancel.borrow().is_some() {
                        cancel_sent = true;
                        lock(&slot.st).cancels.push(job.id.clone());
                        slot.wake.notify_waiters();
                    }
                }
            }
        }
    }

    /// `GET /__manage__/runners`.
    pub(super) fn list(&self) -> Value {
        let slots = lock(&self.slots);
        let runners: Vec<Value> = slots
            .iter()
            .map(|s| {
                let st = lock(&s.st);
                let mut running: Vec<&String> =
                    st.running.keys().chain(&st.shared_jobs).collect();
                running.sort();
                running.dedup();
                json!({
                    "name": s.def.name,
                    "groups": s.def.groups,
                    "connected": self.connected(&st),
                    "last_seen": st.last_seen_wall.map(|t| humantime::format_rfc3339_millis(t).to_string()),
                    "running_jobs": running,
                    "version": st.version,
                })
            })
            .collect();
        json!({ "runners": runners })
    }

    /// OpenMetrics text for the admin listener's `/metrics` (label values
    /// are configured runner names only).
    pub(super) fn metrics(&self) -> String {
        let mut out = String::new();
        let slots: Vec<Arc<Slot>> = lock(&self.slots).clone();
        let _ = writeln!(
            out,
            "# HELP portcullis_runner_connected Whether the runner polled within the lease."
        );
        let _ = writeln!(out, "# TYPE portcullis_runner_connected gauge");
        for s in &slots {
            let st = lock(&s.st);
            let _ = writeln!(
                out,
                "portcullis_runner_connected{{runner=\"{}\"}} {}",
                s.def.name.escape_default(),
                u8::from(self.connected(&st))
            );
        }
        let _ = writeln!(
            out,
            "# HELP portcullis_runner_jobs_running Jobs a runner holds."
        );
        let _ = writeln!(out, "# TYPE portcullis_runner_jobs_running gauge");
        for s in &slots {
            let n = lock(&s.st).running.len();
            let _ = writeln!(
                out,
                "portcullis_runner_jobs_running{{runner=\"{}\"}} {n}",
                s.def.name.escape_default()
            );
        }
        for (name, help, v) in [
            (
                "portcullis_runner_polls",
                "Polls answered to runners.",
                &self.polls,
            ),
            (
                "portcullis_runner_refused",
                "Runner requests refused for a missing, unknown or revoked token.",
                &self.refused,
            ),
            (
                "portcullis_runner_jobs_dispatched",
                "Jobs handed to runners.",
                &self.dispatched,
            ),
            (
                "portcullis_runner_jobs_lost",
                "Jobs ended lost (their runner missed its lease).",
                &self.lost,
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name}_total {}",
                v.load(Ordering::Relaxed)
            );
        }
        out
    }

    fn find(&self, token: &[u8]) -> Option<Arc<Slot>> {
        let slots = lock(&self.slots);
        crate::secret::find_match(slots.iter().map(|s| (&s.def.token, s)), token).cloned()
    }

    fn hold(&self) -> Duration {
        (self.lease / 2).min(MAX_HOLD)
    }
}

fn reply(status: StatusCode, value: &Value) -> Response<Body> {
    let bytes = serde_json::to_vec(value).unwrap_or_default();
    let mut resp = Response::new(Body::full(bytes));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    resp
}

/// A refusal: its status and message, answered as the error envelope.
type Refused = (StatusCode, &'static str);

const BAD_TOKEN: Refused = (StatusCode::UNAUTHORIZED, "Runner token missing or invalid");
const NO_SUCH_JOB: Refused = (StatusCode::NOT_FOUND, "no such running job for this runner");

async fn read_body(req: http::Request<hyper::body::Incoming>) -> Result<Bytes, Refused> {
    let limited = http_body_util::Limited::new(req.into_body(), MAX_BODY);
    match limited.collect().await {
        Ok(b) => Ok(b.to_bytes()),
        Err(_) => Err((
            StatusCode::PAYLOAD_TOO_LARGE,
            "body too large or unreadable",
        )),
    }
}

/// Handles `/__runner__/…`. Never fails: every problem is an error envelope.
pub(super) async fn handle(
    reg: &Registry,
    req: http::Request<hyper::body::Incoming>,
    error_type: &str,
    request_id: &str,
) -> Response<Body> {
    match route(reg, req).await {
        Ok(r) => r,
        Err((status, message)) => {
            crate::envelope::response(status, error_type, message, request_id)
        }
    }
}

async fn route(
    reg: &Registry,
    req: http::Request<hyper::body::Incoming>,
) -> Result<Response<Body>, Refused> {
    let token = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|t| t.trim().as_bytes().to_vec());
    let Some(slot) = token.and_then(|t| reg.find(&t)) else {
        reg.refused.fetch_add(1, Ordering::Relaxed);
        tracing::warn!("runner request with a missing or unknown token refused");
        return Err(BAD_TOKEN);
    };
    if lock(&slot.st).revoked {
        reg.refused.fetch_add(1, Ordering::Relaxed);
        return Err(BAD_TOKEN);
    }
    if let Some(cl) = &reg.cluster {
        if !cl.is_up() {
            return Err(shared::UNAVAILABLE);
        }
    }
    let path = req.uri().path().to_owned();
    let segments: Vec<&str> = path
        .trim_start_matches("/__runner__")
        .split('/')
        .filter(|s| !s.is_empty())
        .collect();
    let method = req.method().clone();
    match (segments.as_slice(), &method) {
        (["poll"], &Method::POST) => {
            let body = read_body(req).await?;
            match &reg.cluster {
                Some(cl) => shared::poll(reg, cl, &slot, &body).await,
                None => poll(reg, &slot, &body).await,
            }
        }
        (["describe"], &Method::POST) => {
            let body = read_body(req).await?;
            match &reg.cluster {
                Some(cl) => shared::describe(reg, cl, &slot, &body).await,
                None => describe(&slot, &body),
            }
        }
        (["jobs", id, "output"], &Method::POST) => {
            let offset = req
                .headers()
                .get(OFFSET_HEADER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok());
            let id = id.to_string();
            let body = read_body(req).await?;
            let Some(offset) = offset else {
                return Err((StatusCode::BAD_REQUEST, "missing x-portcullis-offset"));
            };
            match &reg.cluster {
                Some(cl) => shared::output(cl, &slot, &id, offset, &body).await,
                None => output(&slot, &id, offset, &body),
            }
        }
        (["jobs", id, "finish"], &Method::POST) => {
            let id = id.to_string();
            let body = read_body(req).await?;
            match serde_json::from_slice::<Report>(&body) {
                Ok(rep) => match &reg.cluster {
                    Some(cl) => shared::finish(cl, &slot, &id, &rep).await,
                    None => finish(&slot, &id, rep),
                },
                Err(_) => Err((StatusCode::BAD_REQUEST, "invalid report")),
            }
        }
        _ => Err((StatusCode::NOT_FOUND, "Not found")),
    }
}

/// Stores a runner's description; it counts as a renewal of its lease.
fn describe(slot: &Slot, body: &[u8]) -> Result<Response<Body>, Refused> {
    let (digest, d) = parse_description(slot, body)?;
    let mut st = lock(&slot.st);
    st.described = Some((digest, Arc::new(d)));
    st.last_seen = Some(Instant::now());
    st.last_seen_wall = Some(SystemTime::now());
    Ok(reply(StatusCode::OK, &json!({"ok": true})))
}

/// A description's digest (of the body as sent) and its sanitized content.
fn parse_description(slot: &Slot, body: &[u8]) -> Result<(String, Description), Refused> {
    let Ok(d) = serde_json::from_slice::<Description>(body) else {
        return Err((StatusCode::BAD_REQUEST, "invalid description"));
    };
    if d.commands.len() > MAX_DESCRIBED {
        return Err((StatusCode::BAD_REQUEST, "too many commands described"));
    }
    let digest = crate::secret::hex(&crate::secret::sha256(body));
    let d = d.sanitized();
    tracing::info!(runner = %slot.def.name, commands = d.commands.len(), "runner described its commands");
    Ok((digest, d))
}

/// The `version` and `described` fields of a poll's body.
fn poll_fields(body: &[u8]) -> (Option<String>, Option<String>) {
    let body = serde_json::from_slice::<Value>(body).unwrap_or(Value::Null);
    let field = |name: &str| {
        body.get(name)
            .and_then(Value::as_str)
            .map(|v| v.chars().take(64).collect::<String>())
    };
    (field("version"), field("described"))
}

async fn poll(reg: &Registry, slot: &Slot, body: &[u8]) -> Result<Response<Body>, Refused> {
    reg.polls.fetch_add(1, Ordering::Relaxed);
    let (version, described) = poll_fields(body);
    let me = {
        let mut st = lock(&slot.st);
        if st.described.as_ref().map(|(d, _)| d) != described.as_ref() {
            // Not connected until it has told what it runs.
            return Ok(reply(
                StatusCode::OK,
                &json!({"jobs": [], "cancel": [], "describe": true}),
            ));
        }
        st.polled(version)
    };
    // Older polls of this runner give way to this one.
    slot.wake.notify_waiters();
    let deadline = tokio::time::Instant::now() + reg.hold();
    loop {
        let notified = slot.wake.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        {
            let mut st = lock(&slot.st);
            if st.revoked {
                return Err(BAD_TOKEN);
            }
            if st.moved {
                return Ok(reply(StatusCode::OK, &json!({"jobs": [], "cancel": []})));
            }
            if st.poll_seq != me {
                return Ok(reply(
                    StatusCode::OK,
                    &json!({"jobs": [], "cancel": [], "superseded": true}),
                ));
            }
            if !st.queue.is_empty() || !st.cancels.is_empty() {
                let jobs: Vec<Dispatch> = st.queue.drain(..).collect();
                let cancel: Vec<String> = std::mem::take(&mut st.cancels);
                return Ok(reply(
                    StatusCode::OK,
                    &json!({"jobs": jobs, "cancel": cancel}),
                ));
            }
        }
        tokio::select! {
            _ = &mut notified => {}
            _ = tokio::time::sleep_until(deadline) => {
                return Ok(reply(StatusCode::OK, &json!({"jobs": [], "cancel": []})));
            }
        }
    }
}

fn output(slot: &Slot, id: &str, offset: u64, bytes: &[u8]) -> Result<Response<Body>, Refused> {
    let job = match lock(&slot.st).running.get(id) {
        Some(r) => Arc::clone(&r.job),
        None => return Err(NO_SUCH_JOB),
    };
    Ok(match job.append(bytes, Some(offset)) {
        Ok(total) => reply(StatusCode::OK, &json!({ "length": total })),
        Err(total) => reply(
            StatusCode::RANGE_NOT_SATISFIABLE,
            &json!({ "length": total }),
        ),
    })
}

fn finish(slot: &Slot, id: &str, rep: Report) -> Result<Response<Body>, Refused> {
    let mut st = lock(&slot.st);
    let Some(r) = st.running.get(id) else {
        return Err(NO_SUCH_JOB);
    };
    let total = lock(&r.job.out).total;
    if total < rep.sent {
        return Ok(reply(
            StatusCode::RANGE_NOT_SATISFIABLE,
            &json!({"length": total}),
        ));
    }
    let Some(mut r) = st.running.remove(id) else {
        return Err(NO_SUCH_JOB);
    };
    drop(st);
    {
        let mut out = lock(&r.job.out);
        out.total = out.total.max(rep.output_bytes);
    }
    if let Some(tx) = r.end.take() {
        let _ = tx.send(end_of(rep, &slot.def.name));
    }
    Ok(reply(StatusCode::OK, &json!({"ok": true})))
}

/// How a job ended, as runner `runner` reported it.
fn end_of(rep: Report, runner: &str) -> End {
    match rep.end.as_str() {
        "exited" => {
            use std::os::unix::process::ExitStatusExt;
            End::Exited(std::process::ExitStatus::from_raw(rep.raw.unwrap_or(0)))
        }
        "timed_out" => End::TimedOut,
        "cancelled" => End::Cancelled(rep.reason.unwrap_or_else(|| "cancelled".into())),
        "rejected" => End::Rejected(format!(
            "runner {runner}: {}",
            rep.reason.unwrap_or_default()
        )),
        _ => End::SpawnFailed(rep.reason.unwrap_or_else(|| "could not start".into())),
    }
}
