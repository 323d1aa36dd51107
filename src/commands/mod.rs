//! Remote operations (SPEC §5): operators run allow-listed commands through
//! `/__manage__`, every attempt goes to the audit log, jobs survive restarts.
//!
//! - [`config`]: `[commands]` raw shape → [`config::CommandsConfig`].
//! - [`args`]: `data` → argv, argument schemas, redaction.
//! - [`runner`]: one process in its own group; timeout, cancel, output pipe.
//! - [`store`]: the persistent job store (redb).
//! - `api`: the `/__manage__` endpoints.
//! - `scheduler`: cron schedules, run as operator `scheduler`.
//!
//! Invariants:
//! - Nothing runs unless its `accepted` audit line is on disk and its job
//!   record is committed; otherwise the caller gets 503.
//! - A run's `finished` audit line is on disk before anyone (inline response,
//!   status poll, output stream) sees it as finished.
//! - Locks and run slots are taken before the `accepted` line and released
//!   only after the `finished` line: a second run holding the same lock is
//!   refused with 409, never started.
//! - Output of metadata-only commands is counted, never stored.

mod api;
pub mod args;
pub mod config;
pub mod remote;
pub mod runner;
mod scheduler;
pub mod store;

use crate::audit::{self, AuditLog, Event};
use crate::body::Body;
use crate::secret::Matcher;
use config::CommandsConfig;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};
use store::{JobRecord, Status, Store};
use tokio::sync::{watch, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;

/// What `output` says for metadata-only commands (djangocommand's wording).
pub const METADATA_ONLY_OUTPUT: &str = "(metadata-only mode, no output captured)";
/// The operator name scheduled runs are audited as.
pub const SCHEDULER: &str = "scheduler";

/// An operator as the runner sees it.
#[derive(Debug, Clone)]
struct Op {
    name: String,
    token: Matcher,
    commands: Option<Vec<String>>,
}

/// Who is asking, for the audit log.
#[derive(Debug, Clone)]
struct Ctx {
    operator: Option<String>,
    request_id: String,
    client: Option<String>,
}

/// A refusal: the HTTP status and message an operator gets. It has already
/// been audited when it reaches the caller.
#[derive(Debug)]
struct Refusal {
    status: http::StatusCode,
    message: String,
    retry_after: Option<u64>,
}

impl Refusal {
    fn new(status: http::StatusCode, message: impl Into<String>) -> Refusal {
        Refusal {
            status,
            message: message.into(),
            retry_after: None,
        }
    }

    fn audit_unavailable() -> Refusal {
        Refusal::new(
            http::StatusCode::SERVICE_UNAVAILABLE,
            "Audit log unavailable: nothing was run",
        )
    }
}

/// Output captured so far.
struct OutBuf {
    /// Kept bytes (at most the cap; always empty for metadata-only).
    data: Vec<u8>,
    /// Bytes written by the process.
    total: u64,
    hasher: Option<Sha256>,
}

/// A job queued or running in this process (and, briefly, after it ended).
struct Job {
    id: String,
    command: String,
    metadata_only: bool,
    max_output: u64,
    record: Mutex<JobRecord>,
    out: Mutex<OutBuf>,
    /// Bumped on every output chunk and state change.
    version: watch::Sender<u64>,
    /// Set to a reason to cancel.
    cancel: watch::Sender<Option<String>>,
    /// The `finished` audit line could not be written.
    audit_failed: AtomicBool,
    /// Process group of the running process (0 before start and after exit).
    pgid: std::sync::atomic::AtomicU32,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these short critical sections leaves
    // plain data behind; keep serving with it.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

fn new_job_id() -> String {
    let millis = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    format!("{millis:012x}{:016x}", fastrand::u64(..))
}

impl Job {
    fn new(rec: JobRecord, metadata_only: bool, max_output: u64) -> Arc<Job> {
        let (version, _) = watch::channel(0);
        let (cancel, _) = watch::channel(None);
        Arc::new(Job {
            id: rec.id.clone(),
            command: rec.command.clone(),
            metadata_only,
            max_output,
            record: Mutex::new(rec),
            out: Mutex::new(OutBuf {
                data: Vec::new(),
                total: 0,
                hasher: (!metadata_only).then(Sha256::new),
            }),
            version,
            cancel,
            audit_failed: AtomicBool::new(false),
            pgid: std::sync::atomic::AtomicU32::new(0),
        })
    }

    /// Appends output (counted; kept up to the cap unless metadata-only).
    /// With `at`, only when the output so far is exactly that long, checked
    /// under the same lock: `Err(current length)` otherwise.
    fn append(&self, bytes: &[u8], at: Option<u64>) -> Result<u64, u64> {
        let total = {
            let mut out = lock(&self.out);
            if at.is_some_and(|at| at != out.total) {
                return Err(out.total);
            }
            out.total = out.total.saturating_add(bytes.len() as u64);
            if !self.metadata_only {
                if let Some(h) = out.hasher.as_mut() {
                    h.update(bytes);
                }
                let room = (self.max_output as usize).saturating_sub(out.data.len());
                let keep = bytes.len().min(room);
                out.data
                    .extend_from_slice(bytes.get(..keep).unwrap_or_default());
            }
            out.total
        };
        self.bump();
        Ok(total)
    }

    fn record(&self) -> JobRecord {
        lock(&self.record).clone()
    }

    fn bump(&self) {
        self.version.send_modify(|v| *v = v.wrapping_add(1));
    }

    fn is_final(&self) -> bool {
        lock(&self.record).status.is_final()
    }

    /// Waits until the job has ended or `wait` passed; true when ended.
    async fn wait_final(&self, wait: Duration) -> bool {
        let mut rx = self.version.subscribe();
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if self.is_final() {
                return true;
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                _ => return self.is_final(),
            }
        }
    }
}

struct RunSink {
    job: Arc<Job>,
    pid_file: PathBuf,
}

impl runner::Sink for RunSink {
    fn started(&self, pid: u32) {
        self.job.pgid.store(pid, Ordering::SeqCst);
        // Not fsynced on purpose: it only has to survive the gateway being
        // killed, not the machine (after a reboot the process is gone anyway).
        let start = runner::process_start_time(pid).unwrap_or(0);
        if let Err(err) = std::fs::write(&self.pid_file, format!("{pid} {start}\n")) {
            tracing::warn!(error = %err, "cannot record the pid of a command");
        }
    }

    fn output(&self, bytes: &[u8]) {
        let _ = self.job.append(bytes, None);
    }
}

#[derive(Default)]
struct State {
    live: HashMap<String, Arc<Job>>,
    locks: HashMap<String, String>,
    pending: usize,
}

struct Core {
    cfg: CommandsConfig,
    operators: Vec<Op>,
    error_type: String,
    audit: Arc<AuditLog>,
    store: Arc<Store>,
    slots: Arc<Semaphore>,
    state: Mutex<State>,
    idle: Notify,
    pid_dir: PathBuf,
    shutting_down: AtomicBool,
    shutdown_tx: watch::Sender<bool>,
    /// With `execute = "runners"`: the runners and the jobs they hold.
    remote: Option<Arc<remote::Registry>>,
}

/// The remote-operations service: owns the audit log, the job store, running
/// jobs and the scheduler.
pub struct Commands {
    core: Arc<Core>,
    scheduler: Mutex<Vec<JoinHandle<()>>>,
}

impl std::fmt::Debug for Commands {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Commands")
            .field("audit_log", &self.core.audit.path())
            .finish_non_exhaustive()
    }
}

impl Commands {
    /// Opens the audit log and job store, marks jobs left running by a
    /// previous process as failed ("gateway restarted", killing what is left
    /// of their process groups), and starts the scheduler.
    pub async fn start(
        cfg: &CommandsConfig,
        operators: &[crate::config::Operator],
        runners: &[remote::RunnerDef],
        error_type: &str,
    ) -> Result<Arc<Commands>, String> {
        let audit_path = cfg.audit_log.clone();
        let audit = tokio::task::spawn_blocking(move || AuditLog::open(&audit_path))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("audit log {}: {e}", cfg.audit_log.display()))?;
        let state_dir = cfg.state_dir.clone();
        let store = tokio::task::spawn_blocking(move || Store::open(&state_dir))
            .await
            .map_err(|e| e.to_string())??;
        let pid_dir = cfg.state_dir.join("running");
        std::fs::create_dir_all(&pid_dir).map_err(|e| format!("{}: {e}", pid_dir.display()))?;
        let (shutdown_tx, _) = watch::channel(false);
        let core = Arc::new(Core {
            cfg: cfg.clone(),
            operators: operators
                .iter()
                .map(|o| Op {
                    name: o.name.clone(),
                    token: o.token.clone(),
                    commands: o.commands.clone(),
                })
                .collect(),
            error_type: error_type.to_owned(),
            audit: Arc::new(audit),
            store: Arc::new(store),
            slots: Arc::new(Semaphore::new(cfg.max_concurrent)),
            state: Mutex::new(State::default()),
            idle: Notify::new(),
            pid_dir,
            shutting_down: AtomicBool::new(false),
            shutdown_tx,
            remote: (cfg.execute == config::Execute::Runners)
                .then(|| remote::Registry::start(runners, cfg.lease)),
        });
        core.recover().await?;
        let mut scheduler = scheduler::spawn_all(&core);
        scheduler.push(tokio::spawn(prune_loop(Arc::clone(&core))));
        Ok(Arc::new(Commands {
            core,
            scheduler: Mutex::new(scheduler),
        }))
    }

    /// Handles every request whose normalized path is `/__manage__` or starts
    /// with `/__manage__/`. Never fails: every problem is an envelope.
    pub async fn handle(
        &self,
        req: http::Request<hyper::body::Incoming>,
        client_ip: IpAddr,
        request_id: &str,
    ) -> http::Response<Body> {
        api::handle(&self.core, req, client_ip, request_id).await
    }

    /// Handles `/__runner__/…` (runner tokens only); 404 unless
    /// `execute = "runners"`.
    pub async fn handle_runner(
        &self,
        req: http::Request<hyper::body::Incoming>,
    ) -> http::Response<Body> {
        match &self.core.remote {
            Some(reg) => remote::handle(reg, req).await,
            None => crate::envelope::response(
                http::StatusCode::NOT_FOUND,
                &self.core.error_type,
                "Not found",
                "",
            ),
        }
    }

    /// Runner metrics (OpenMetrics text, no `# EOF`); empty unless
    /// `execute = "runners"`.
    pub fn runner_metrics(&self) -> String {
        self.core
            .remote
            .as_ref()
            .map(|r| r.metrics())
            .unwrap_or_default()
    }

    /// Applies a reloaded `[[runners]]` (SIGHUP): removed runners and changed
    /// tokens are refused at once.
    pub fn update_runners(&self, runners: &[remote::RunnerDef]) {
        if let Some(reg) = &self.core.remote {
            reg.update(runners);
        }
    }

    /// Stops the scheduler, refuses new runs (503), cancels queued and running
    /// jobs (SIGTERM to their groups, SIGKILL after `kill_grace`; they end as
    /// `cancelled`, reason "gateway shutting down") and waits for them to be
    /// recorded, at most `kill_grace` + 5 s.
    pub async fn shutdown(&self) {
        let core = &self.core;
        core.shutting_down.store(true, Ordering::SeqCst);
        core.shutdown_tx.send_replace(true);
        let handles = std::mem::take(&mut *lock(&self.scheduler));
        for h in handles {
            h.abort();
        }
        let deadline = tokio::time::Instant::now() + core.cfg.kill_grace + Duration::from_secs(5);
        loop {
            let notified = core.idle.notified();
            let mut jobs: Vec<Arc<Job>> = lock(&core.state).live.values().cloned().collect();
            // Jobs on runners go on there; the next gateway process takes
            // their reports.
            jobs.retain(|j| lock(&j.record).runner.is_none());
            if jobs.is_empty() {
                return;
            }
            for job in &jobs {
                job.cancel.send_if_modified(|r| {
                    if r.is_none() {
                        *r = Some("gateway shutting down".into());
                        true
                    } else {
                        false
                    }
                });
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                tracing::warn!(
                    jobs = jobs.len(),
                    "commands still running at shutdown deadline"
                );
                return;
            }
        }
    }
}

impl Commands {
    /// Emergency stop: SIGKILLs the process group of every running command
    /// at once, without waiting (their jobs then end as `failed`, "killed by
    /// signal 9", and are recorded as usual). Synchronous, so it can run from
    /// `Drop` (test teardown) or a panic path.
    pub fn kill_all(&self) {
        let jobs: Vec<Arc<Job>> = lock(&self.core.state).live.values().cloned().collect();
        for job in jobs {
            let pgid = job.pgid.load(Ordering::SeqCst);
            if pgid != 0 {
                runner::signal_group(pgid, libc::SIGKILL);
            }
        }
    }
}

/// Deletes ended jobs older than `commands.job_retention`, at start and hourly.
async fn prune_loop(core: Arc<Core>) {
    loop {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        let cutoff = now.saturating_sub(core.cfg.job_retention).as_millis() as u64;
        let floor = store::id_floor(cutoff);
        match store::blocking(&core.store, move |s| s.prune(&floor)).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(jobs = n, "pruned ended jobs past commands.job_retention"),
            Err(err) => tracing::warn!(error = %err, "could not prune the job store"),
        }
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
}

/// The process to start for `command` with arguments `argv` under `cfg`
/// (`None` when `cfg` has neither a custom entry nor the Django preset).
pub fn plan_for(cfg: &CommandsConfig, command: &str, argv: Vec<String>) -> Option<runner::Plan> {
    let target = match cfg.custom(command) {
        Some(c) => Target::Custom(c.clone()),
        None if cfg.django.is_some() => Target::Django,
        None => return None,
    };
    Some(plan(cfg, command, target, argv))
}

fn plan(cfg: &CommandsConfig, command: &str, target: Target, argv: Vec<String>) -> runner::Plan {
    let rule = cfg.rules.get(command);
    let mut env: Vec<(String, String)> = cfg
        .env
        .iter()
        .filter_map(|k| std::env::var(k).ok().map(|v| (k.clone(), v)))
        .collect();
    let (program, args, cwd, timeout) = match target {
        Target::Custom(c) => {
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
        Target::Django => {
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

/// Which plan runs `command`, before arguments.
enum Target {
    Django,
    Custom(config::Custom),
}

impl Core {
    fn find_operator(&self, token: &[u8]) -> Option<&Op> {
        crate::secret::find_match(self.operators.iter().map(|o| (&o.token, o)), token)
    }

    /// Why `op` may not run `command`, if it may not.
    fn forbidden(&self, op: &Op, command: &str) -> Option<&'static str> {
        if !config::valid_command_name(command) {
            return Some("invalid command name");
        }
        if !self.cfg.allowed(command) {
            return Some(
                if self.cfg.custom(command).is_none() && self.cfg.django.is_none() {
                    "unknown command"
                } else {
                    match self.cfg.mode {
                        config::Mode::Allowlist(_) => "not in the allowlist",
                        config::Mode::Blocklist(_) => "in the blocklist",
                    }
                },
            );
        }
        match &op.commands {
            Some(list) if !list.iter().any(|c| c == command) => {
                Some("not in this operator's command list")
            }
            _ => None,
        }
    }

    fn may_see(&self, op: &Op, command: &str) -> bool {
        self.forbidden(op, command).is_none()
    }

    /// Writes a `rejected` line and returns the refusal to answer with (503
    /// instead when the line cannot be written).
    async fn reject(
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

    fn target(&self, command: &str) -> Option<Target> {
        match self.cfg.custom(command) {
            Some(c) => Some(Target::Custom(c.clone())),
            None if self.cfg.django.is_some() || self.cfg.execute == config::Execute::Runners => {
                Some(Target::Django)
            }
            None => None,
        }
    }

    fn plan(&self, command: &str, target: Target, argv: Vec<String>) -> runner::Plan {
        plan(&self.cfg, command, target, argv)
    }
    fn release(&self, id: &str, lock_name: Option<&str>) {
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
    async fn submit(
        self: &Arc<Self>,
        ctx: &Ctx,
        command: &str,
        data: &Map<String, Value>,
    ) -> Result<Arc<Job>, Refusal> {
        self.submit_to(ctx, command, data, None).await
    }

    /// `target = "all"`: one run per connected runner of the command's group
    /// (each audited and recorded on its own).
    async fn submit_all(
        self: &Arc<Self>,
        ctx: &Ctx,
        command: &str,
        data: &Map<String, Value>,
    ) -> Result<Vec<Arc<Job>>, Refusal> {
        let group = self.cfg.rules.get(command).and_then(|r| r.group.clone());
        let names = self
            .remote
            .as_ref()
            .map(|r| r.connected_names(group.as_deref()))
            .unwrap_or_default();
        if names.is_empty() {
            return self
                .submit_to(ctx, command, data, None)
                .await
                .map(|j| vec![j]);
        }
        let mut jobs = Vec::new();
        for name in names {
            match self.submit_to(ctx, command, data, Some(name)).await {
                Ok(j) => jobs.push(j),
                Err(r) if jobs.is_empty() => return Err(r),
                Err(_) => {}
            }
        }
        Ok(jobs)
    }

    /// Whether `command` fans out to every runner of its group.
    fn fans_out(&self, command: &str) -> bool {
        self.remote.is_some() && self.cfg.rules.get(command).is_some_and(|r| r.all)
    }

    async fn submit_to(
        self: &Arc<Self>,
        ctx: &Ctx,
        command: &str,
        data: &Map<String, Value>,
        pin: Option<String>,
    ) -> Result<Arc<Job>, Refusal> {
        use http::StatusCode as S;
        let metadata_only = self.cfg.is_metadata_only(command);
        let redacted = args::redact(data, &self.cfg.redact, metadata_only);
        let argv = match args::build(&self.cfg, command, data) {
            Ok(a) => a,
            Err(e) => {
                let r = Refusal::new(S::BAD_REQUEST, e.message());
                return Err(self.reject(ctx, Some(command), Some(redacted), r).await);
            }
        };
        let Some(target) = self.target(command) else {
            let r = Refusal::new(S::FORBIDDEN, "unknown command");
            return Err(self.reject(ctx, Some(command), Some(redacted), r).await);
        };
        if self.shutting_down.load(Ordering::SeqCst) {
            let r = Refusal::new(S::SERVICE_UNAVAILABLE, "gateway shutting down");
            return Err(self.reject(ctx, Some(command), Some(redacted), r).await);
        }
        let plan = self.plan(command, target, argv);
        let rule = self.cfg.rules.get(command);
        let group = rule.and_then(|r| r.group.clone());
        if let Some(reg) = &self.remote {
            if !reg.any_connected(group.as_deref(), pin.as_deref()) {
                let r = Refusal::new(
                    S::SERVICE_UNAVAILABLE,
                    "no runner of the command's group is connected",
                );
                return Err(self.reject(ctx, Some(command), Some(redacted), r).await);
            }
        }
        let lock_name = rule.and_then(|r| r.lock.clone());
        let max_output = rule
            .and_then(|r| r.max_output)
            .unwrap_or(self.cfg.max_output);
        let id = new_job_id();

        let refused = {
            let mut st = lock(&self.state);
            let holder = lock_name.as_ref().and_then(|l| st.locks.get(l).cloned());
            if let (Some(l), Some(holder)) = (&lock_name, holder) {
                Some(Refusal::new(
                    S::CONFLICT,
                    format!("lock {l:?} is held by job {holder}"),
                ))
            } else if st.pending >= self.cfg.max_concurrent + self.cfg.max_queued {
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

        let operator = ctx.operator.clone().unwrap_or_default();
        let mut e = audit::Entry::new(Event::Accepted, &ctx.request_id, "accepted");
        e.operator = ctx.operator.clone();
        e.client = ctx.client.clone();
        e.command = Some(command.to_owned());
        e.args = Some(redacted.clone());
        e.job_id = Some(id.clone());
        let permit = Arc::clone(&self.slots).try_acquire_owned().ok();
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
        };
        // The accepted line and the job record go to disk concurrently; the
        // process starts only once both are durable.
        let put = rec.clone();
        let (audited, stored) = tokio::join!(
            self.audit.append_async(e),
            store::blocking(&self.store, move |s| s.put(&put, None)),
        );
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

        let job = Job::new(rec, metadata_only, max_output);
        lock(&self.state).live.insert(id, Arc::clone(&job));
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

    async fn run(
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
                    p = Arc::clone(&self.slots).acquire_owned() => p.ok(),
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
    /// waiters are told; the lock and slot are released last.
    async fn finish(
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
        *lock(&job.record) = rec;
        job.bump();
        tracing::info!(job = %job.id, command = %job.command, status = status.as_str(), "command finished");
        self.release(&job.id, lock_name.as_deref());
    }

    /// Marks jobs a previous process left queued or running as failed
    /// ("gateway restarted"), killing what is left of their process groups.
    async fn recover(self: &Arc<Self>) -> Result<(), String> {
        let active = store::blocking(&self.store, |s| s.active()).await?;
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
        }
        Ok(())
    }

    /// Takes back a runner job left running by a previous gateway process.
    fn adopt(self: &Arc<Self>, rec: JobRecord, runner: String) {
        let Some(reg) = self.remote.clone() else {
            return;
        };
        let metadata_only = self.cfg.is_metadata_only(&rec.command);
        let max_output = self
            .cfg
            .rules
            .get(&rec.command)
            .and_then(|r| r.max_output)
            .unwrap_or(self.cfg.max_output);
        tracing::info!(job = %rec.id, runner = %runner, "waiting for the runner to report a job begun before the restart");
        let lock_name = self
            .cfg
            .rules
            .get(&rec.command)
            .and_then(|r| r.lock.clone());
        let job = Job::new(rec, metadata_only, max_output);
        {
            let mut st = lock(&self.state);
            st.pending += 1;
            // It still holds its lock: no second `migrate` while it runs.
            if let Some(l) = &lock_name {
                st.locks.entry(l.clone()).or_insert_with(|| job.id.clone());
            }
            st.live.insert(job.id.clone(), Arc::clone(&job));
        }
        let core = Arc::clone(self);
        tokio::spawn(async move {
            let end = reg.adopt(&job, &runner).await;
            core.finish(&job, end, None, lock_name, None).await;
        });
    }

    fn live(&self, id: &str) -> Option<Arc<Job>> {
        lock(&self.state).live.get(id).cloned()
    }
}
