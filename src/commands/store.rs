//! The persistent job store (redb, one file `jobs.redb` in `commands.state_dir`).
//!
//! Tables: `jobs` (id → [`JobRecord`] as JSON), `active` (ids of jobs queued or
//! running, so start-up finds interrupted jobs without a scan), `output`
//! (id → captured output, written when the job ends; never for
//! metadata-only commands). Every commit is durable (redb's default
//! `Durability::Immediate`), so a job acknowledged to an operator survives
//! `kill -9`.

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::Path;
use std::sync::Arc;

const JOBS: TableDefinition<&str, &[u8]> = TableDefinition::new("jobs");
const ACTIVE: TableDefinition<&str, ()> = TableDefinition::new("active");
const OUTPUT: TableDefinition<&str, &[u8]> = TableDefinition::new("output");

/// The states of a job; every job ends in exactly one of the final ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Accepted, waiting for a run slot.
    Queued,
    /// The process is running.
    Running,
    /// Exited with status 0.
    Succeeded,
    /// Exited non-zero, killed by a signal, could not start, or interrupted
    /// by a gateway restart.
    Failed,
    /// Killed after its timeout.
    TimedOut,
    /// Cancelled by an operator or by gateway shutdown.
    Cancelled,
    /// Refused before running.
    Rejected,
    /// Its runner vanished (missed its lease); never re-run.
    Lost,
}

impl Status {
    /// Whether the job has ended.
    pub fn is_final(self) -> bool {
        !matches!(self, Status::Queued | Status::Running)
    }

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Queued => "queued",
            Status::Running => "running",
            Status::Succeeded => "succeeded",
            Status::Failed => "failed",
            Status::TimedOut => "timed_out",
            Status::Cancelled => "cancelled",
            Status::Rejected => "rejected",
            Status::Lost => "lost",
        }
    }
}

/// Everything known about a job, as stored and as `GET /__manage__/jobs/<id>` shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobRecord {
    /// Job id.
    pub id: String,
    /// Command name.
    pub command: String,
    /// Operator who started it (`scheduler` for scheduled runs).
    pub operator: String,
    /// The request that started it.
    pub request_id: String,
    /// Arguments with redacted values.
    pub args: Value,
    /// Current status.
    pub status: Status,
    /// Why it failed, was cancelled, etc.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Process exit code.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// RFC 3339 time of acceptance.
    pub created_at: String,
    /// RFC 3339 time the process started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    /// RFC 3339 time it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
    /// Run time of the process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    /// Bytes the process wrote.
    #[serde(default)]
    pub output_bytes: u64,
    /// Whether output beyond the cap was dropped.
    #[serde(default)]
    pub output_truncated: bool,
    /// The runner that ran it (`execute = "runners"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runner: Option<String>,
    /// SHA-256 of everything written (absent for metadata-only commands).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_sha256: Option<String>,
    /// Output is never captured for this command.
    #[serde(default)]
    pub metadata_only: bool,
    /// The cluster instance that runs it (`cluster.instance`; cluster mode only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
}

/// Errors from the store, described without secrets.
pub type StoreError = String;

fn e(err: impl std::fmt::Display) -> StoreError {
    format!("job store: {err}")
}

/// The open job store.
pub struct Store {
    db: Database,
}

impl Store {
    /// Opens or creates `<dir>/jobs.redb`. Fails if another process holds it.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        std::fs::create_dir_all(dir).map_err(|err| e(format!("{}: {err}", dir.display())))?;
        let db = Database::create(dir.join("jobs.redb")).map_err(e)?;
        let txn = db.begin_write().map_err(e)?;
        {
            txn.open_table(JOBS).map_err(e)?;
            txn.open_table(ACTIVE).map_err(e)?;
            txn.open_table(OUTPUT).map_err(e)?;
        }
        txn.commit().map_err(e)?;
        Ok(Store { db })
    }

    /// Writes a record (and, when it has ended, its captured output) in one
    /// durable commit, keeping the `active` index in step.
    pub fn put(&self, rec: &JobRecord, output: Option<&[u8]>) -> Result<(), StoreError> {
        let json = serde_json::to_vec(rec).map_err(e)?;
        let txn = self.db.begin_write().map_err(e)?;
        {
            let mut jobs = txn.open_table(JOBS).map_err(e)?;
            jobs.insert(rec.id.as_str(), json.as_slice()).map_err(e)?;
            let mut active = txn.open_table(ACTIVE).map_err(e)?;
            if rec.status.is_final() {
                active.remove(rec.id.as_str()).map_err(e)?;
            } else {
                active.insert(rec.id.as_str(), ()).map_err(e)?;
            }
            if let Some(out) = output {
                let mut table = txn.open_table(OUTPUT).map_err(e)?;
                table.insert(rec.id.as_str(), out).map_err(e)?;
            }
        }
        txn.commit().map_err(e)
    }

    /// The record of job `id`.
    pub fn get(&self, id: &str) -> Result<Option<JobRecord>, StoreError> {
        let txn = self.db.begin_read().map_err(e)?;
        let jobs = txn.open_table(JOBS).map_err(e)?;
        match jobs.get(id).map_err(e)? {
            Some(v) => serde_json::from_slice(v.value()).map(Some).map_err(e),
            None => Ok(None),
        }
    }

    /// The captured output of an ended job.
    pub fn output(&self, id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let txn = self.db.begin_read().map_err(e)?;
        let table = txn.open_table(OUTPUT).map_err(e)?;
        Ok(table.get(id).map_err(e)?.map(|v| v.value().to_vec()))
    }

    /// Deletes ended jobs whose id sorts before `cutoff` (ids start with
    /// their creation time in fixed-width hex milliseconds, so this is "created
    /// before"). Returns how many were deleted.
    pub fn prune(&self, cutoff: &str) -> Result<usize, StoreError> {
        let txn = self.db.begin_write().map_err(e)?;
        let mut n = 0;
        {
            let mut jobs = txn.open_table(JOBS).map_err(e)?;
            let active = txn.open_table(ACTIVE).map_err(e)?;
            let mut output = txn.open_table(OUTPUT).map_err(e)?;
            let mut old = Vec::new();
            for item in jobs.range::<&str>(..cutoff).map_err(e)? {
                let (id, _) = item.map_err(e)?;
                let id = id.value().to_owned();
                if active.get(id.as_str()).map_err(e)?.is_none() {
                    old.push(id);
                }
            }
            for id in old {
                jobs.remove(id.as_str()).map_err(e)?;
                output.remove(id.as_str()).map_err(e)?;
                n += 1;
            }
        }
        txn.commit().map_err(e)?;
        Ok(n)
    }

    /// Up to `limit` records, newest first, with ids before `before` (all when
    /// `None`) that `keep` accepts. Looks at most `scan` records; the second
    /// value is where the next page starts (the last id looked at) when more
    /// may follow.
    pub fn list(
        &self,
        before: Option<&str>,
        limit: usize,
        scan: usize,
        mut keep: impl FnMut(&JobRecord) -> bool,
    ) -> Result<(Vec<JobRecord>, Option<String>), StoreError> {
        let txn = self.db.begin_read().map_err(e)?;
        let jobs = txn.open_table(JOBS).map_err(e)?;
        let range = match before {
            Some(b) => jobs.range::<&str>(..b).map_err(e)?,
            None => jobs.range::<&str>(..).map_err(e)?,
        };
        let mut out = Vec::new();
        let mut last = None;
        for (looked, item) in range.rev().enumerate() {
            let (id, value) = item.map_err(e)?;
            if out.len() >= limit || looked >= scan {
                // Something older exists: the page ends at the last id seen.
                return Ok((out, last));
            }
            last = Some(id.value().to_owned());
            // A record this version cannot read is skipped, not fatal.
            if let Ok(rec) = serde_json::from_slice::<JobRecord>(value.value()) {
                if keep(&rec) {
                    out.push(rec);
                }
            }
        }
        Ok((out, None))
    }

    /// Jobs that were queued or running when the store was last written.
    pub fn active(&self) -> Result<Vec<JobRecord>, StoreError> {
        let txn = self.db.begin_read().map_err(e)?;
        let active = txn.open_table(ACTIVE).map_err(e)?;
        let jobs = txn.open_table(JOBS).map_err(e)?;
        let mut out = Vec::new();
        for item in active.iter().map_err(e)? {
            let (id, _) = item.map_err(e)?;
            if let Some(v) = jobs.get(id.value()).map_err(e)? {
                if let Ok(rec) = serde_json::from_slice::<JobRecord>(v.value()) {
                    out.push(rec);
                }
            }
        }
        Ok(out)
    }
}

/// Runs a store operation on the blocking pool.
pub async fn blocking<T, F>(store: &Arc<Store>, f: F) -> Result<T, StoreError>
where
    T: Send + 'static,
    F: FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
{
    let store = Arc::clone(store);
    tokio::task::spawn_blocking(move || f(&store))
        .await
        .map_err(e)?
}

/// The smallest job id created at `millis` (see `new_job_id`).
pub fn id_floor(millis: u64) -> String {
    format!("{millis:012x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: &str, status: Status) -> JobRecord {
        JobRecord {
            id: id.to_owned(),
            command: "c".into(),
            operator: "o".into(),
            request_id: "r".into(),
            args: Value::Null,
            status,
            reason: None,
            exit_code: None,
            created_at: String::new(),
            started_at: None,
            finished_at: None,
            duration_ms: None,
            output_bytes: 0,
            output_truncated: false,
            output_sha256: None,
            metadata_only: false,
            instance: None,
            runner: None,
        }
    }

    #[test]
    fn records_active_index_output_and_pruning() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let old_done = format!("{}{:016x}", id_floor(1_000), 1);
        let old_running = format!("{}{:016x}", id_floor(2_000), 2);
        let new_done = format!("{}{:016x}", id_floor(9_000), 3);
        store
            .put(&rec(&old_done, Status::Succeeded), Some(b"out"))
            .unwrap();
        store
            .put(&rec(&old_running, Status::Running), None)
            .unwrap();
        store
            .put(&rec(&new_done, Status::Failed), Some(b"x"))
            .unwrap();
        assert_eq!(store.active().unwrap().len(), 1);
        assert_eq!(store.output(&old_done).unwrap().unwrap(), b"out");
        assert_eq!(store.prune(&id_floor(5_000)).unwrap(), 1);
        assert!(store.get(&old_done).unwrap().is_none());
        assert!(store.output(&old_done).unwrap().is_none());
        assert!(store.get(&old_running).unwrap().is_some());
        assert!(store.get(&new_done).unwrap().is_some());
        drop(store);
        // Reopening finds the same state.
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.active().unwrap()[0].id, old_running);
    }

    #[test]
    fn lists_newest_first_in_pages_with_a_filter() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let ids: Vec<String> = (1..=5u64)
            .map(|i| format!("{}{:016x}", id_floor(i * 1_000), i))
            .collect();
        for (i, id) in ids.iter().enumerate() {
            let status = if i % 2 == 0 {
                Status::Succeeded
            } else {
                Status::Failed
            };
            store.put(&rec(id, status), None).unwrap();
        }
        let (page, next) = store.list(None, 2, 100, |_| true).unwrap();
        let got: Vec<&str> = page.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(got, [ids[4].as_str(), ids[3].as_str()]);
        assert_eq!(next.as_deref(), Some(ids[3].as_str()));
        let (page, next) = store.list(next.as_deref(), 10, 100, |_| true).unwrap();
        assert_eq!(page.len(), 3);
        assert_eq!(next, None);
        let (page, _) = store
            .list(None, 10, 100, |r| r.status == Status::Failed)
            .unwrap();
        let got: Vec<&str> = page.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(got, [ids[3].as_str(), ids[1].as_str()]);
        // The scan cap ends a page early and says where to go on.
        let (page, next) = store
            .list(None, 10, 2, |r| r.status == Status::Succeeded)
            .unwrap();
        assert_eq!(page.len(), 1);
        assert_eq!(next.as_deref(), Some(ids[3].as_str()));
    }
}
