//! The job engine behind [`super::Commands`]: refusals are audited, runs are
//! accepted (audit line fsynced, job record committed) before they start,
//! run in their own process group, and finish (audit line on disk) before
//! anyone sees them finished; jobs interrupted by a crash are recovered at
//! start.
//!
//! Longer than the crate's 600-line guide on purpose: a job's life from refusal
//! to finish is one sequence whose order is the invariant (audit line, then job
//! record, then run, then the finished line); the runner side already lives in
//! `remote_jobs`.

use super::config::CommandsConfig;
use super::introspect::{self, CommandInfo, Known};
use super::jobs::{lock, new_job_id, now_rfc3339, Ctx, Job, Op, Refusal, RunSink};
use super::store::{JobRecord, Status, Store};
use super::{args, config, remote, runner, store};
use crate::audit::{self, AuditLog, Event};
use arc_swap::ArcSwap;
use serde_json::{Map, Value};
use sha2::Digest;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tokio::sync::{watch, Notify, OwnedSemaphorePermit, Semaphore};

#[derive(Default)]
/// The jobs of this process: running ones by id, held locks, queued count.
pub(super) struct JobTable {
    pub(super) live: HashMap<String, Arc<Job>>,
    pub(super) locks: HashMap<String, String>,
    pub(super) pending: usize,
}

/// The engine: configuration, audit log, job store, run slots and job table.
pub(super) struct Core {
    /// The current `[commands]` (swapped on reload; the settings fixed at
    /// start keep their first values, see [`CommandsConfig::restart_needed`]).
    pub(super) cfg: ArcSwap<CommandsConfig>,
    /// The current operators (swapped on reload: a removed or changed token
    /// is refused from the next request on).
    pub(super) operators: ArcSwap<Vec<Op>>,
    /// What Django said about its commands.
    pub(super) intro: watch::Sender<introspect::Snapshot>,
    /// Bumped per introspection run; only the latest run's result is kept.
    pub(super) intro_gen: AtomicU64,
    pub(super) error_type: String,
    pub(super) audit: Arc<AuditLog>,
    pub(super) store: Arc<Store>,
    pub(super) slots: Arc<Semaphore>,
    pub(super) state: Mutex<JobTable>,
    pub(super) idle: Notify,
    pub(super) pid_dir: PathBuf,
    pub(super) shutting_down: AtomicBool,
    pub(super) shutdown_tx: watch::Sender<bool>,
    /// With `execute = "runners"`: the runners and the jobs they hold.
    pub(super) remote: Option<Arc<remote::Registry>>,
    /// Cluster mode: jobs, locks, run slots and schedules shared through
    /// Redis (see `clustered`).
    pub(super) cluster: Option<Arc<crate::cluster::Cluster>>,
}

/// The environment of every process: `commands.env` taken from the
/// gateway's own environment, nothing else.
fn env_of(cfg: &CommandsConfig) -> Vec<(String, String)> {
    cfg.env
        .iter()
        .filter_map(|k| std::env::var(k).ok().map(|v| (k.clone(), v)))
        .collect()
}

/// Deletes ended jobs older than `commands.job_retention`, at start and hourly.
pub(super) async fn prune_loop(core: Arc<Core>) {
    loop {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        let cutoff = now.saturating_sub(core.cfg().job_retention).as_millis() as u64;
        let floor = store::id_floor(cutoff);
        if let Some(cl) = core.cluster() {
            cl.job_prune(&floor).await;
        }
        match store::blocking(&core.store, move |s| s.prune(&floor)).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(jobs = n, "pruned ended jobs past commands.job_retention"),
            Err(err) => tracing::warn!(error = %err, "could not prune the job store"),
        }
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
}

/// The operators as the service keeps them.
pub(super) fn ops(operators: &[crate::config::Operator]) -> Vec<Op> {
    operators
        .iter()
        .map(|o| Op {
            name: o.name.clone(),
            token: o.token.clone(),
            commands: o.commands.clone(),
        })
        .collect()
}

/// What changed between two operator lists, by name (tokens compared as
/// digests, never printed).
pub(super) fn operator_changes(old: &[Op], new: &[Op]) -> Vec<String> {
    let mut out = Vec::new();
    for o in old {
        match new.iter().find(|n| n.name == o.name) {
            None => out.push(format!("operator {:?} removed", o.name)),
            Some(n) => {
                if n.token != o.token {
                    out.push(format!("operator {:?}: token changed", o.name));
                }
                if n.commands != o.commands {
                    out.push(format!("operator {:?}: command list changed", o.name));
                }
            }
        }
    }
    for n in new {
        if !old.iter().any(|o| o.name == n.name) {
            out.push(format!("operator {:?} added", n.name));
        }
    }
    out
}

/// The introspection run `cfg` needs: the Django preset's python and
/// `manage.py` with the allowed Django commands (every command in blocklist
/// mode); `None` without the preset or with no Django command allowed.
pub fn introspection_job(cfg: &CommandsConfig) -> Option<introspect::Job> {
    let commands: Vec<String> = match &cfg.mode {
        config::Mode::Allowlist(list) => list
            .iter()
            .filter(|n| cfg.custom(n).is_none())
            .cloned()
            .collect(),
        config::Mode::Blocklist(_) => vec!["*".to_owned()],
    };
    let django = cfg.django.clone().filter(|_| !commands.is_empty())?;
    Some(introspect::Job {
        python: django.python.to_string_lossy().into_owned(),
        manage_py: django.manage_py.to_string_lossy().into_owned(),
        cwd: django.cwd,
        env: env_of(cfg),
        commands,
    })
}

/// The process to start for `command` with arguments `argv` under `cfg`
/// (`None` when `cfg` has neither a custom entry nor the Django preset).
pub fn plan_for(cfg: &CommandsConfig, command: &str, argv: Vec<String>) -> Option<runner::Plan> {
    let target = match cfg.custom(command) {
        Some(c) => Program::Custom(c.clone()),
        None if cfg.django.is_some() => Program::Django,
        None => return None,
    };
    Some(Core::plan(cfg, command, target, argv))
}

/// What runs a command, before arguments: `manage.py` or a custom argv.
pub(super) enum Program {
    Django,
    Custom(config::Custom),
}

impl Core {
    /// The current configuration.
    pub(super) fn cfg(&self) -> Arc<CommandsConfig> {
        self.cfg.load_full()
    }

    pub(super) fn find_operator(&self, token: &[u8]) -> Option<Op> {
        let ops = self.operators.load();
        crate::secret::find_match(ops.iter().map(|o| (&o.token, o)), token).cloned()
    }

    /// Starts reading the Django commands' options in the background (at
    /// start and on reload); requests for them wait for the result (at most
    /// [`introspect::PENDING_WAIT`]). Results of an older run are dropped.
    pub(super) fn introspect(self: &Arc<Self>) {
        let cfg = self.cfg();
        let generation = self.intro_gen.fetch_add(1, Ordering::SeqCst) + 1;
        let Some(job) = introspection_job(&cfg) else {
            self.intro
                .send_modify(|s| introspect::store(s, Ok(HashMap::new())));
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::error!("no runtime to read the Django commands' options on");
            return;
        };
        self.intro.send_modify(|s| s.running = true);
        let core = Arc::clone(self);
        runtime.spawn(async move {
            let result = introspect::run(&job).await;
            if core.intro_gen.load(Ordering::SeqCst) != generation {
                return; // a reload started a newer run
            }
            if let Ok(found) = &result {
                let ready = found.values().filter(|r| r.is_ok()).count();
                tracing::info!(
                    commands = ready,
                    failed = found.len() - ready,
                    "read the Django commands' options"
                );
            }
            core.intro.send_modify(|s| introspect::store(s, result));
        });
    }

    /// What Django said about `command`: waits while it is being read (at
    /// most [`introspect::PENDING_WAIT`]); 503 when unknown.
    pub(super) async fn django_info(&self, command: &str) -> Result<Arc<CommandInfo>, Refusal> {
        let mut rx = self.intro.subscribe();
        let deadline = tokio::time::Instant::now() + introspect::PENDING_WAIT;
        loop {
            let known = rx.borrow_and_update().get(command);
            match known {
                Known::Ready(info) => return Ok(info),
                Known::Failed(e) => {
                    return Err(Refusal::new(
                        http::StatusCode::SERVICE_UNAVAILABLE,
                        format!("Command unavailable: {e}"),
                    ))
                }
                Known::Pending => {}
            }
            if !matches!(
                tokio::time::timeout_at(deadline, rx.changed()).await,
                Ok(Ok(()))
            ) {
                return Err(Refusal {
                    status: http::StatusCode::SERVICE_UNAVAILABLE,
                    message: "Command unavailable: its options are still being read from Django; try again shortly".into(),
                    retry_after: Some(2),
                });
            }
        }
    }

    /// Waits (at most [`introspect::PENDING_WAIT`]) until no introspection is running.
    pub(super) async fn introspection_settled(&self) {
        let mut rx = self.intro.subscribe();
        let _ = tokio::time::timeout(introspect::PENDING_WAIT, rx.wait_for(|s| !s.running)).await;
    }

    /// Why `op` may not run `command`, if it may not.
    pub(super) fn forbidden(&self, op: &Op, command: &str) -> Option<&'static str> {
        let cfg = self.cfg();
        if !config::valid_command_name(command) {
            return Some("invalid command name");
        }
        if !cfg.allowed(command) {
            return Some(if cfg.custom(command).is_none() && cfg.django.is_none() {
                "unknown command"
            } else {
                match cfg.mode {
                    config::Mode::Allowlist(_) => "not in the allowlist",
                    config::Mode::Blocklist(_) => "in the blocklist",
                }
            });
        }
        match &op.commands {
            Some(list) if !list.iter().any(|c| c == command) => {
                Some("not in this operator's command list")
            }
            _ => None,
        }
    }

    pub(super) fn may_see(&self, op: &Op, command: &str) -> bool {
        self.forbidden(op, command).is_none()
    }

    /// Writes a `rejected` line and returns the refusal to answer with (503
    /// instead when the line cannot be written).
    pub(super) async fn reject(
        &self,
        ctx: &Ctx,
        command: Option<&str>,
        args: Option<Value>,
        refusal: Refusal,
    ) -> Refusal {
        let mut e = audit::Entry::new(Event::Rejected, &ctx.request_id, Status::Rejected.as_str());
        e.operator = ctx.operator.clone();
        e.client = ctx.client.clone();
        e.command = command.map(str::to_owned);
        e.args = args;
        e.http_status = Some(refusal.status.as_u16());
        e.reason = Some(refusal.message.clone());
        match self.audit.append_async(e).await {
            Ok(()) => refusal,
            Err(err) => {
                tracing::error!(error = %err, "audit log write failed");
                Refusal::audit_unavailable()
            }
        }
    }

    pub(super) fn target(cfg: &CommandsConfig, command: &str) -> Option<Program> {
        match cfg.custom(command) {
            Some(c) => Some(Program::Custom(c.clone())),
            None if cfg.django.is_some() || cfg.execute == config::Execute::Runners => {
                Some(Program::Django)
            }
            None => None,
        }
    }

    pub(super) fn plan(
        cfg: &CommandsConfig,
        command: &str,
        target: Program,
        argv: Vec<String>,
    ) -> runner::Plan {
        let rule = cfg.rules.get(command);
        let mut env = env_of(cfg);
        let (program, args, cwd, timeout) = match target {
            Program::Custom(c) => {
                env.extend(c.env.iter().cloned());
                let mut full = c.argv.clone();
                full.extend(argv);
                let program = if full.is_empty() {
                    String::new()
                } else {
                    full.remove(0)
                };
                (program, full, c.cwd.clone(), c.timeout)
            }
            Program::Django => {
                // `target` returns Django only when it is configured.
                let d = cfg.django.clone().unwrap_or(config::Django {
                    python: PathBuf::new(),
                    manage_py: PathBuf::new(),
                    cwd: PathBuf::new(),
                });
                let mut args = vec![
                    d.manage_py.to_string_lossy().into_owned(),
                    command.to_owned(),
                ];
                args.extend(argv);
                (d.python.to_string_lossy().into_owned(), args, d.cwd, None)
            }
        };
        runner::Plan {
            program,
            args,
            cwd,
            env,
            timeout: rule
                .and_then(|r| r.timeout)
                .or(timeout)
                .unwrap_or(cfg.timeout),
            kill_grace: cfg.kill_grace,
        }
    }

    pub(super) fn release(&self, id: &str, lock_name: Option<&str>) {
        let mut st = lock(&self.state);
        st.pending = st.pending.saturating_sub(1);
        if let Some(l) = lock_name {
            if st.locks.get(l).is_some_and(|holder| holder == id) {
                st.locks.remove(l);
            }
        }
        st.live.remove(id);
        drop(st);
        self.idle.notify_waiters();
    }

    /// Validates, audits and starts a run. Permission must already be checked.
    pub(super) async fn submit(
        self: &Arc<Self>,
        ctx: &Ctx,
        command: &str,
        data: &Map<String, Value>,
    ) -> Result<Arc<Job>, Refusal> {
        self.submit_to(ctx, command, data, None).await
    }

    /// [`Core::submit`], on runner `pin` when given (`target = "all"`).
    pub(super) async fn submit_to(
        self: &Arc<Self>,
        ctx: &Ctx,
        command: &str,
        data: &Map<String, Value>,
        pin: Option<String>,
    ) -> Result<Arc<Job>, Refusal> {
        use http::StatusCode as S;
        let cfg = self.cfg();
        let metadata_only = cfg.is_metadata_only(command);
        let Some(target) = Core::target(&cfg, command) else {
            let redacted = args::redact(&cfg, command, data, true, None);
            let r = Refusal::new(S::FORBIDDEN, "unknown command");
            return Err(self.reject(ctx, Some(command), Some(redacted), r).await);
        };
        if let Some(reg) = &self.remote {
            let group = cfg.rules.get(command).and_then(|r| r.group.as_deref());
            if !reg.any_connected(group, pin.as_deref()) {
                let redacted = args::redact(&cfg, command, data, true, None);
                let r = Refusal::new(
                    S::SERVICE_UNAVAILABLE,
                    "no runner of the command's group is connected",
                );
                return Err(self.reject(ctx, Some(command), Some(redacted), r).await);
            }
        }
        // Django commands run only with their options read from Django: here,
        // or with runners, on the runners (as they reported them).
        let info = match (&self.remote, &target) {
            (Some(_), _) => self.runner_info(&cfg, command, pin.as_deref()),
            (None, Program::Custom(_)) => Ok(None),
            (None, Program::Django) => self.django_info(command).await.map(Some),
        };
        let info = match info {
            Ok(info) => info,
            Err(r) => {
                let redacted = args::redact(&cfg, command, data, true, None);
                return Err(self.reject(ctx, Some(command), Some(redacted), r).await);
            }
        };
        let redacted = args::redact(&cfg, command, data, metadata_only, info.as_deref());
        let argv = match (&self.remote, &info) {
            // A command no connected runner describes: the static checks
            // here, the exact ones on the runner that takes it.
            (Some(_), None) => args::check_static(&cfg, command, data).map(|()| Vec::new()),
            _ => args::build(&cfg, command, data, info.as_deref()),
        };
        let argv = match argv {
            Ok(a) => a,
            Err(e) => {
                let r = Refusal::new(S::BAD_REQUEST, e.message());
                return Err(self.reject(ctx, Some(command), Some(redacted), r).await);
            }
        };
        if self.shutting_down.load(Ordering::SeqCst) {
            let r = Refusal::new(S::SERVICE_UNAVAILABLE, "gateway shutting down");
            return Err(self.reject(ctx, Some(command), Some(redacted), r).await);
        }
        let plan = Core::plan(&cfg, command, target, argv);
        let rule = cfg.rules.get(command);
        let group = rule.and_then(|r| r.group.clone());
        let lock_name = rule.and_then(|r| r.lock.clone());
        let max_output = rule.and_then(|r| r.max_output).unwrap_or(cfg.max_output);
        let id = new_job_id();

        let refused = {
            let mut st = lock(&self.state);
            let holder = lock_name.as_ref().and_then(|l| st.locks.get(l).cloned());
            if let (Some(l), Some(holder)) = (&lock_name, holder) {
                Some(Refusal::new(
                    S::CONFLICT,
                    format!("lock {l:?} is held by job {holder}"),
                ))
            } else if st.pending >= cfg.max_concurrent + cfg.max_queued {
                Some(Refusal {
                    status: S::TOO_MANY_REQUESTS,
                    message: "too many runs queued; try again later".into(),
                    retry_after: Some(1),
                })
            } else {
                st.pending += 1;
                if let Some(l) = &lock_name {
                    st.locks.insert(l.clone(), id.clone());
                }
                None
            }
        };
        if let Some(r) = refused {
            return Err(self.reject(ctx, Some(command), Some(redacted), r).await);
        }
        // Cluster mode: the lock and a place are taken for the whole cluster.
        let mut shared_slot = None;
        if let Some(cl) = self.cluster() {
            match self.cluster_admit(cl, &id, lock_name.as_deref()).await {
                Ok(slot) => shared_slot = Some(slot),
                Err(r) => {
                    self.release(&id, lock_name.as_deref());
                    return Err(self.reject(ctx, Some(command), Some(redacted), r).await);
                }
            }
        }

        let operator = ctx.operator.clone().unwrap_or_default();
        let mut e = audit::Entry::new(Event::Accepted, &ctx.request_id, "accepted");
        e.operator = ctx.operator.clone();
        e.client = ctx.client.clone();
        e.command = Some(command.to_owned());
        e.args = Some(redacted.clone());
        e.job_id = Some(id.clone());
        let permit = match shared_slot {
            Some(false) => None,
            _ => Arc::clone(&self.slots).try_acquire_owned().ok(),
        };
        let rec = JobRecord {
            id: id.clone(),
            command: command.to_owned(),
            operator,
            request_id: ctx.request_id.clone(),
            args: redacted,
            status: if permit.is_some() {
                Status::Running
            } else {
                Status::Queued
            },
            reason: None,
            exit_code: None,
            created_at: now_rfc3339(),
            started_at: permit.as_ref().map(|_| now_rfc3339()),
            finished_at: None,
            duration_ms: None,
            output_bytes: 0,
            output_truncated: false,
            output_sha256: None,
            metadata_only,
            runner: None,
            instance: self.cluster().map(|c| c.instance().to_owned()),
        };
        // The accepted line and the job record go to disk concurrently; the
        // process starts only once both are durable.
        let put = rec.clone();
        let (audited, stored, shared) = tokio::join!(
            self.audit.append_async(e),
            store::blocking(&self.store, move |s| s.put(&put, None)),
            self.cluster_accept(&rec),
        );
        if audited.is_err() || stored.is_err() || shared.is_err() {
            // Not run: the record in Redis (if written) ends as rejected.
            self.cluster_abandon(&rec, shared.is_ok(), lock_name.as_deref())
                .await;
        }
        if let Err(err) = audited {
            tracing::error!(error = %err, "audit log write failed; refusing to run");
            if stored.is_ok() {
                let mut r = rec.clone();
                r.status = Status::Rejected;
                r.reason = Some("audit log unavailable; not run".into());
                r.finished_at = Some(now_rfc3339());
                let _ = store::blocking(&self.store, move |s| s.put(&r, None)).await;
            }
            self.release(&id, lock_name.as_deref());
            return Err(Refusal::audit_unavailable());
        }
        if let Err(err) = stored {
            tracing::error!(error = %err, "job store write failed; refusing to run");
            let mut e =
                audit::Entry::new(Event::Finished, &ctx.request_id, Status::Failed.as_str());
            e.operator = ctx.operator.clone();
            e.client = ctx.client.clone();
            e.command = Some(command.to_owned());
            e.job_id = Some(id.clone());
            e.reason = Some("job store unavailable; not run".into());
            let _ = self.audit.append_async(e).await;
            self.release(&id, lock_name.as_deref());
            return Err(Refusal::new(
                S::SERVICE_UNAVAILABLE,
                "Job store unavailable: nothing was run",
            ));
        }
        if shared.is_err() {
            tracing::error!(
                "cluster: the job record could not be stored in Redis; refusing to run"
            );
            let mut r = rec.clone();
            r.status = Status::Rejected;
            r.reason = Some("cluster state (Redis) unavailable; not run".into());
            r.finished_at = Some(now_rfc3339());
            let mut e = audit::Entry::new(Event::Finished, &ctx.request_id, r.status.as_str());
            e.operator = ctx.operator.clone();
            e.client = ctx.client.clone();
            e.command = Some(command.to_owned());
            e.job_id = Some(id.clone());
            e.reason = r.reason.clone();
            let _ = self.audit.append_async(e).await;
            let _ = store::blocking(&self.store, move |s| s.put(&r, None)).await;
            self.release(&id, lock_name.as_deref());
            return Err(super::clustered::unavailable());
        }

        let job = Job::new(rec, metadata_only, max_output);
        lock(&self.state).live.insert(id, Arc::clone(&job));
        self.cluster_mirror(&job, lock_name.clone());
        let core = Arc::clone(self);
        let run_job = Arc::clone(&job);
        let client = ctx.client.clone();
        let dispatch = self.remote.is_some().then(|| {
            (
                remote::Dispatch {
                    id: job.id.clone(),
                    command: command.to_owned(),
                    data: data.clone(),
                },
                group,
                pin,
            )
        });
        tokio::spawn(async move {
            core.run(run_job, plan, permit, lock_name, client, dispatch)
                .await;
        });
        Ok(job)
    }

    pub(super) async fn run(
        self: Arc<Self>,
        job: Arc<Job>,
        plan: runner::Plan,
        permit: Option<OwnedSemaphorePermit>,
        lock_name: Option<String>,
        client: Option<String>,
        dispatch: Option<(remote::Dispatch, Option<String>, Option<String>)>,
    ) {
        let _permit = match permit {
            Some(p) => p,
            None => {
                let mut cancel = job.cancel.subscribe();
                let acquired = tokio::select! {
                    p = self.slot_for(&job.id) => p,
                    _ = cancel.wait_for(Option::is_some) => None,
                };
                let Some(p) = acquired else {
                    let reason = job
                        .cancel
                        .borrow()
                        .clone()
                        .unwrap_or_else(|| "cancelled".into());
                    self.finish(
                        &job,
                        runner::End::Cancelled(reason),
                        None,
                        lock_name,
                        client,
                    )
                    .await;
                    return;
                };
                let rec = {
                    let mut r = lock(&job.record);
                    r.status = Status::Running;
                    r.started_at = Some(now_rfc3339());
                    r.clone()
                };
                job.bump();
                self.cluster_update(&job).await;
                if let Err(err) = store::blocking(&self.store, move |s| s.put(&rec, None)).await {
                    tracing::error!(error = %err, job = %job.id, "job store write failed");
                }
                p
            }
        };
        let started = tokio::time::Instant::now();
        let sink = RunSink {
            job: Arc::clone(&job),
            pid_file: self.pid_dir.join(&job.id),
        };
        let end = match (&self.remote, dispatch) {
            (Some(reg), Some((d, group, pin))) => {
                reg.run(&self.store, &job, d, group.as_deref(), pin.as_deref())
                    .await
            }
            _ => runner::run(&plan, &sink, job.cancel.subscribe()).await,
        };
        job.pgid.store(0, Ordering::SeqCst);
        let _ = std::fs::remove_file(&sink.pid_file);
        self.finish(&job, end, Some(started.elapsed()), lock_name, client)
            .await;
    }

    /// Records how a run ended: audit line first, then the job store, then
    /// (cluster mode) its output, lock, record and slot in Redis, then
    /// waiters are told; the local lock and slot are released last.
    pub(super) async fn finish(
        &self,
        job: &Arc<Job>,
        end: runner::End,
        elapsed: Option<Duration>,
        lock_name: Option<String>,
        client: Option<String>,
    ) {
        let (status, exit_code, reason) = match end {
            runner::End::Exited(st) => match st.code() {
                Some(0) => (Status::Succeeded, Some(0), None),
                Some(code) => (
                    Status::Failed,
                    Some(code),
                    Some(format!("exit code {code}")),
                ),
                None => {
                    use std::os::unix::process::ExitStatusExt;
                    let sig = st.signal().unwrap_or(0);
                    (
                        Status::Failed,
                        None,
                        Some(format!("killed by signal {sig}")),
                    )
                }
            },
            runner::End::TimedOut => (Status::TimedOut, None, Some("timeout".to_owned())),
            runner::End::Cancelled(r) => (Status::Cancelled, None, Some(r)),
            runner::End::SpawnFailed(r) => (Status::Failed, None, Some(r)),
            runner::End::Rejected(r) => (Status::Rejected, None, Some(r)),
            runner::End::Lost(r) => (Status::Lost, None, Some(r)),
        };
        let (output, total, sha) = {
            let mut out = lock(&job.out);
            let sha = out.hasher.take().map(|h| crate::secret::hex(&h.finalize()));
            (out.data.clone(), out.total, sha)
        };
        let truncated = !job.metadata_only && total > output.len() as u64;
        let rec = {
            let r = lock(&job.record);
            let mut r = r.clone();
            r.status = status;
            r.exit_code = exit_code;
            r.reason = reason.clone();
            r.finished_at = Some(now_rfc3339());
            r.duration_ms = elapsed.map(|d| d.as_millis() as u64);
            r.output_bytes = total;
            r.output_truncated = truncated;
            r.output_sha256 = sha.clone();
            r
        };

        let mut e = audit::Entry::new(Event::Finished, &rec.request_id, status.as_str());
        e.operator = Some(rec.operator.clone());
        e.client = client;
        e.command = Some(rec.command.clone());
        e.args = Some(rec.args.clone());
        e.job_id = Some(rec.id.clone());
        e.reason = reason;
        e.exit_code = exit_code;
        e.duration_ms = rec.duration_ms;
        e.output_bytes = Some(total);
        e.output_sha256 = sha;
        // Both durable before anyone sees the job as finished.
        let put = rec.clone();
        let keep = (!job.metadata_only).then_some(output);
        let (audited, stored) = tokio::join!(
            self.audit.append_async(e),
            store::blocking(&self.store, move |s| s.put(&put, keep.as_deref())),
        );
        if let Err(err) = audited {
            tracing::error!(error = %err, job = %job.id, "audit log write failed for a finished run");
            job.audit_failed.store(true, Ordering::SeqCst);
        }
        if let Err(err) = stored {
            tracing::error!(error = %err, job = %job.id, "job store write failed");
        }
        self.cluster_finish(job, &rec, lock_name.as_deref()).await;
        *lock(&job.record) = rec;
        job.bump();
        tracing::info!(job = %job.id, command = %job.command, status = status.as_str(), "command finished");
        self.release(&job.id, lock_name.as_deref());
    }

    /// Marks jobs a previous process left queued or running as failed
    /// ("gateway restarted"), killing what is left of their process groups.
    pub(super) async fn recover(self: &Arc<Self>) -> Result<(), String> {
        let active = store::blocking(&self.store, |s| s.active()).await?;
        let mut ended = Vec::new();
        for mut rec in active {
            // A job running on a runner goes on there: the runner reconnects
            // and reports the rest (lost after the lease if it does not).
            if let (Some(reg), Some(name)) = (&self.remote, rec.runner.clone()) {
                if rec.status == Status::Running && reg.knows(&name) {
                    self.adopt(rec, name);
                    continue;
                }
            }
            let pid_file = self.pid_dir.join(&rec.id);
            if let Ok(text) = std::fs::read_to_string(&pid_file) {
                let mut parts = text.split_whitespace();
                let pid = parts.next().and_then(|p| p.parse::<u32>().ok());
                let start = parts.next().and_then(|p| p.parse::<u64>().ok());
                if let (Some(pid), Some(start)) = (pid, start) {
                    if start != 0 && runner::process_start_time(pid) == Some(start) {
                        tracing::warn!(job = %rec.id, pid, "killing the process group of an interrupted job");
                        runner::signal_group(pid, libc::SIGKILL);
                    }
                }
                let _ = std::fs::remove_file(&pid_file);
            }
            rec.status = Status::Failed;
            rec.reason = Some("gateway restarted".into());
            rec.finished_at = Some(now_rfc3339());
            let mut e =
                audit::Entry::new(Event::Finished, &rec.request_id, Status::Failed.as_str());
            e.operator = Some(rec.operator.clone());
            e.command = Some(rec.command.clone());
            e.args = Some(rec.args.clone());
            e.job_id = Some(rec.id.clone());
            e.reason = rec.reason.clone();
            self.audit
                .append_async(e)
                .await
                .map_err(|e| format!("audit log: {e}"))?;
            let put = rec.clone();
            store::blocking(&self.store, move |s| s.put(&put, None)).await?;
            tracing::warn!(job = %rec.id, command = %rec.command, "job interrupted by a gateway restart marked failed");
            ended.push(rec);
        }
        self.cluster_republish(ended);
        Ok(())
    }

    /// A local run slot, after a cluster-wide one in cluster mode.
    async fn slot_for(&self, id: &str) -> Option<OwnedSemaphorePermit> {
        if let Some(cl) = self.cluster() {
            self.cluster_slot(cl, id).await;
        }
        Arc::clone(&self.slots).acquire_owned().await.ok()
    }

    pub(super) fn live(&self, id: &str) -> Option<Arc<Job>> {
        lock(&self.state).live.get(id).cloned()
    }
}
