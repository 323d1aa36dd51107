//! The job engine's runner side (`execute = "runners"`): `target = "all"`
//! fan-out, and runner jobs a restarted gateway takes back.

use super::engine::Core;
use super::jobs::{lock, Ctx, Job, Refusal};
use super::store::JobRecord;
use serde_json::{Map, Value};
use std::sync::Arc;

impl Core {
    /// `target = "all"`: one run per connected runner of the command's group
    /// (each audited and recorded on its own).
    pub(super) async fn submit_all(
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
            // No runner: the one submission is refused (503) and audited.
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
    pub(super) fn fans_out(&self, command: &str) -> bool {
        self.remote.is_some() && self.cfg.rules.get(command).is_some_and(|r| r.all)
    }

    /// Takes back a runner job left running by a previous gateway process.
    pub(super) fn adopt(self: &Arc<Self>, rec: JobRecord, runner: String) {
        let Some(reg) = self.remote.clone() else {
            return;
        };
        let metadata_only = self.cfg.is_metadata_only(&rec.command);
        let rule = self.cfg.rules.get(&rec.command);
        let max_output = rule
            .and_then(|r| r.max_output)
            .unwrap_or(self.cfg.max_output);
        let lock_name = rule.and_then(|r| r.lock.clone());
        tracing::info!(job = %rec.id, runner = %runner, "waiting for the runner to report a job begun before the restart");
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
}
