//! Remote operations: operators run allow-listed commands through
//! `/__manage__`, every attempt goes to the audit log, jobs survive restarts.
//!
//! - this module: [`Commands`], the public face (start, handle, shutdown);
//! - `engine`: the job engine (refuse, submit, run, finish, recover);
//! - `jobs`: a job as this process holds it, who asked, refusals;
//! - [`config`]: `[commands]` raw shape → [`config::CommandsConfig`];
//! - [`args`]: `data` → argv, argument schemas, redaction;
//! - [`introspect`]: each Django command's options, read from Django;
//! - [`runner`]: one process in its own group; timeout, cancel, output pipe;
//! - [`store`]: the persistent job store (redb);
//! - `api`: the `/__manage__` endpoints; `describe`: how `GET /__manage__/`
//!   describes a command and its options; `listing`: the job and audit
//!   listings; `console`: the operator console's embedded page;
//! - [`remote`]: runners (`execute = "runners"`): registry, `/__runner__` protocol;
//! - `remote_jobs`: the engine's runner side (fan-out, jobs taken back after a restart);
//! - `scheduler`: cron schedules, run as operator `scheduler`;
//! - `clustered`: cluster mode: jobs, output, cancels, locks, run slots and
//!   schedule ticks shared through Redis (`crate::cluster::jobs`).
//!
//! `config` and `args` import each other on purpose: a schedule's `data` is
//! checked at load with the same [`args::build`] that builds argv at run
//! time, so a schedule never fails on its arguments later. `api` and `config`
//! are longer than this crate's 600-line guide: each reads top to bottom as
//! one table (of endpoints, of settings) that splitting would scatter.
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
//! - A Django command runs only with its options read from Django
//!   ([`introspect`]), and only with `data` keys that are exactly its own
//!   long options; `settings` and `pythonpath` never.
//! - A reload swaps operators and `[commands]` for every later request;
//!   running jobs keep what they started with.

mod api;
pub mod args;
mod clustered;
pub mod config;
mod console;
mod describe;
mod engine;
pub mod introspect;
mod jobs;
mod listing;
pub mod remote;
mod remote_jobs;
pub mod runner;
mod scheduler;
pub mod store;

use crate::audit::AuditLog;
use crate::body::Body;
use arc_swap::ArcSwap;
use config::CommandsConfig;
pub use engine::{introspection_job, plan_for};
use engine::{ops, prune_loop, Core, JobTable};
use jobs::{lock, Ctx, Job, Op, Refusal};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use store::Store;
use tokio::sync::{watch, Notify, Semaphore};
use tokio::task::JoinHandle;

/// What `output` says for metadata-only commands (djangocommand's wording).
pub const METADATA_ONLY_OUTPUT: &str = "(metadata-only mode, no output captured)";
/// The operator name scheduled runs are audited as.
pub const SCHEDULER: &str = "scheduler";

/// The remote-operations service: owns the audit log, the job store, running
/// jobs and the scheduler.
pub struct Commands {
    core: Arc<Core>,
    scheduler: Mutex<Vec<JoinHandle<()>>>,
    prune: Mutex<Option<JoinHandle<()>>>,
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
    /// of their process groups), and starts the scheduler. With `cluster`,
    /// jobs, locks, run slots and schedules are shared with the other
    /// instances and every audit line names this instance.
    pub async fn start(
        cfg: &CommandsConfig,
        operators: &[crate::config::Operator],
        runners: &[remote::RunnerDef],
        error_type: &str,
        cluster: Option<Arc<crate::cluster::Cluster>>,
    ) -> Result<Arc<Commands>, String> {
        let audit_path = cfg.audit_log.clone();
        let instance = cluster.as_ref().map(|c| c.instance().to_owned());
        let audit = tokio::task::spawn_blocking(move || {
            AuditLog::open(&audit_path).map(|a| a.with_instance(instance))
        })
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
        let (intro, _) = watch::channel(introspect::Snapshot::default());
        let core = Arc::new(Core {
            cfg: ArcSwap::from_pointee(cfg.clone()),
            operators: ArcSwap::from_pointee(ops(operators)),
            intro,
            intro_gen: AtomicU64::new(0),
            error_type: error_type.to_owned(),
            audit: Arc::new(audit),
            store: Arc::new(store),
            slots: Arc::new(Semaphore::new(cfg.max_concurrent)),
            state: Mutex::new(JobTable::default()),
            idle: Notify::new(),
            pid_dir,
            shutting_down: AtomicBool::new(false),
            shutdown_tx,
            remote: (cfg.execute == config::Execute::Runners)
                .then(|| remote::Registry::start(runners, cfg.lease, cluster.clone())),
            cluster,
        });
        core.recover().await?;
        core.introspect();
        let scheduler = scheduler::spawn_all(&core, &cfg.schedules);
        let prune = tokio::spawn(prune_loop(Arc::clone(&core)));
        Ok(Arc::new(Commands {
            core,
            scheduler: Mutex::new(scheduler),
            prune: Mutex::new(Some(prune)),
        }))
    }

    /// Replaces the operators (tokens and command lists) for every request
    /// that arrives after this call; logs what changed, by name.
    pub fn set_operators(&self, operators: &[crate::config::Operator]) {
        let new_ops = ops(operators);
        for change in engine::operator_changes(&self.core.operators.load(), &new_ops) {
            tracing::info!("reload: {change}");
        }
        self.core.operators.store(Arc::new(new_ops));
    }

    /// Applies a reloaded configuration to every request that arrives after
    /// it: operators (tokens and command lists), allow/deny lists, rules,
    /// schemas, redaction, limits, custom commands, the Django preset
    /// (whose commands are read again from Django) and schedules. Returns
    /// the changed settings that only a restart applies (they keep their
    /// values until then). Running jobs are not touched.
    pub fn reload(
        &self,
        cfg: &CommandsConfig,
        operators: &[crate::config::Operator],
    ) -> Vec<String> {
        let core = &self.core;
        let old = core.cfg();
        let restart = old.restart_needed(cfg);
        let new = Arc::new(old.keep_fixed(cfg.clone()));
        self.set_operators(operators);
        core.cfg.store(Arc::clone(&new));
        core.introspect();
        if !old.same_schedules(&new) && !core.shutting_down.load(Ordering::SeqCst) {
            let mut handles = lock(&self.scheduler);
            for h in handles.drain(..) {
                h.abort();
            }
            *handles = scheduler::spawn_all(core, &new.schedules);
            tracing::info!(schedules = handles.len(), "reload: schedules replaced");
        }
        restart
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
        request_id: &str,
    ) -> http::Response<Body> {
        match &self.core.remote {
            Some(reg) => remote::handle(reg, req, &self.core.error_type, request_id).await,
            None => crate::envelope::response(
                http::StatusCode::NOT_FOUND,
                &self.core.error_type,
                "Not found",
                request_id,
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
        if let Some(reg) = &core.remote {
            reg.stop();
        }
        let handles = std::mem::take(&mut *lock(&self.scheduler));
        for h in handles.into_iter().chain(lock(&self.prune).take()) {
            h.abort();
        }
        let deadline = tokio::time::Instant::now() + core.cfg().kill_grace + Duration::from_secs(5);
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
