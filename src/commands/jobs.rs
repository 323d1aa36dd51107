//! Jobs as this process holds them: the [`Job`] (record, captured output,
//! cancel and version signals), who asked ([`Ctx`], [`Op`]) and why a run was
//! refused ([`Refusal`]).

use super::runner;
use super::store::JobRecord;
use crate::secret::Matcher;
use sha2::{Digest, Sha256};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};
use tokio::sync::watch;

/// An operator as the runner sees it.
#[derive(Debug, Clone)]
pub(super) struct Op {
    pub(super) name: String,
    pub(super) token: Matcher,
    pub(super) commands: Option<Vec<String>>,
}

/// Who is asking, for the audit log.
#[derive(Debug, Clone)]
pub(super) struct Ctx {
    pub(super) operator: Option<String>,
    pub(super) request_id: String,
    pub(super) client: Option<String>,
}

/// A refusal: the HTTP status and message an operator gets. It has already
/// been audited when it reaches the caller.
#[derive(Debug)]
pub(super) struct Refusal {
    pub(super) status: http::StatusCode,
    pub(super) message: String,
    pub(super) retry_after: Option<u64>,
}

impl Refusal {
    pub(super) fn new(status: http::StatusCode, message: impl Into<String>) -> Refusal {
        Refusal {
            status,
            message: message.into(),
            retry_after: None,
        }
    }

    pub(super) fn audit_unavailable() -> Refusal {
        Refusal::new(
            http::StatusCode::SERVICE_UNAVAILABLE,
            "Audit log unavailable: nothing was run",
        )
    }
}

/// Output captured so far.
pub(super) struct OutBuf {
    /// Kept bytes (at most the cap; always empty for metadata-only).
    pub(super) data: Vec<u8>,
    /// Bytes written by the process.
    pub(super) total: u64,
    pub(super) hasher: Option<Sha256>,
}

/// A job queued or running in this process (and, briefly, after it ended).
pub(super) struct Job {
    pub(super) id: String,
    pub(super) command: String,
    pub(super) metadata_only: bool,
    pub(super) max_output: u64,
    pub(super) record: Mutex<JobRecord>,
    pub(super) out: Mutex<OutBuf>,
    /// Bumped on every output chunk and state change.
    pub(super) version: watch::Sender<u64>,
    /// Set to a reason to cancel.
    pub(super) cancel: watch::Sender<Option<String>>,
    /// The `finished` audit line could not be written.
    pub(super) audit_failed: AtomicBool,
    /// Process group of the running process (0 before start and after exit).
    pub(super) pgid: std::sync::atomic::AtomicU32,
    /// Cluster mode: what Redis has of this job (held while writing there).
    pub(super) shared: tokio::sync::Mutex<Mirrored>,
}

/// Cluster mode: what Redis has of a job run here.
#[derive(Default)]
pub(super) struct Mirrored {
    /// Bytes of output already in Redis.
    pub(super) sent: u64,
    /// Its end is being (or was) recorded: no more renewals.
    pub(super) ended: bool,
}

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these short critical sections leaves
    // plain data behind; keep serving with it.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub(super) fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

pub(super) fn new_job_id() -> String {
    let millis = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    format!("{millis:012x}{:016x}", fastrand::u64(..))
}

impl Job {
    pub(super) fn new(rec: JobRecord, metadata_only: bool, max_output: u64) -> Arc<Job> {
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
            shared: tokio::sync::Mutex::new(Mirrored::default()),
        })
    }

    /// Appends output (counted; kept up to the cap unless metadata-only).
    /// With `at`, only when the output so far is exactly that long, checked
    /// under the same lock: `Err(current length)` otherwise.
    pub(super) fn append(&self, bytes: &[u8], at: Option<u64>) -> Result<u64, u64> {
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

    pub(super) fn record(&self) -> JobRecord {
        lock(&self.record).clone()
    }

    pub(super) fn bump(&self) {
        self.version.send_modify(|v| *v = v.wrapping_add(1));
    }

    pub(super) fn is_final(&self) -> bool {
        lock(&self.record).status.is_final()
    }

    /// Waits until the job has ended or `wait` passed; true when ended.
    pub(super) async fn wait_final(&self, wait: Duration) -> bool {
        let mut rx = self.version.subscribe();
        // `Duration::MAX` (wait for the end) has no deadline: adding it to
        // an instant would overflow.
        let deadline = tokio::time::Instant::now().checked_add(wait);
        loop {
            if self.is_final() {
                return true;
            }
            let changed = match deadline {
                Some(at) => tokio::time::timeout_at(at, rx.changed()).await.ok(),
                None => Some(rx.changed().await),
            };
            match changed {
                Some(Ok(())) => {}
                _ => return self.is_final(),
            }
        }
    }
}

pub(super) struct RunSink {
    pub(super) job: Arc<Job>,
    pub(super) pid_file: PathBuf,
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
