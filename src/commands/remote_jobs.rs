//! The job engine's runner side (`execute = "runners"`): the options of a
//! command as the runners describe it, `target = "all"` fan-out, and runner
//! jobs a restarted gateway takes back.

use super::config::CommandsConfig;
use super::engine::Core;
use super::introspect::{CommandInfo, Known};
use super::jobs::{lock, Ctx, Job, Refusal};
use super::remote::Described;
use super::store::JobRecord;
use serde_json::{json, Map, Value};
use std::sync::Arc;

impl Core {
    /// The options of `command` as a connected runner of its group (`pin`
    /// when given; the first by name) read them from its Django: `None` for
    /// a custom command or one no connected runner describes (its runner's
    /// own check decides); 503 when that runner could not read them.
    pub(super) fn runner_info(
        &self,
        cfg: &CommandsConfig,
        command: &str,
        pin: Option<&str>,
    ) -> Result<Option<Arc<CommandInfo>>, Refusal> {
        let Some(reg) = &self.remote else {
            return Ok(None);
        };
        if cfg.custom(command).is_some() {
            return Ok(None);
        }
        let group = cfg.rules.get(command).and_then(|r| r.group.as_deref());
        match reg.described(command, group, pin).into_iter().next() {
            Some((_, Described::Django { info: Some(i), .. })) => Ok(Some(Arc::new(i))),
            Some((name, Described::Django { error, .. })) => Err(Refusal::new(
                http::StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "Command unavailable on runner {name}: {}",
                    error.unwrap_or_else(|| "its options could not be read".into())
                ),
            )),
            Some((_, Described::Custom)) | None => Ok(None),
        }
    }

    /// `GET /__manage__/` entries with runners: each command as the first
    /// connected runner of its group describes it (plus `runners`: every
    /// connected runner that offers it). Blocklist mode lists what the
    /// runners describe.
    pub(super) fn runner_listing(&self, cfg: &CommandsConfig, names: Vec<String>) -> Vec<Value> {
        let Some(reg) = &self.remote else {
            return Vec::new();
        };
        names
            .into_iter()
            .map(|name| {
                let group = cfg.rules.get(&name).and_then(|r| r.group.as_deref());
                let found = reg.described(&name, group, None);
                let runners: Vec<&str> = found.iter().map(|(n, _)| n.as_str()).collect();
                let mut entry = match found.first() {
                    Some((_, Described::Custom)) => super::describe::custom(cfg, &name),
                    Some((_, Described::Django { info: Some(i), .. })) => {
                        super::describe::django(cfg, &name, &Known::Ready(Arc::new(i.clone())))
                    }
                    Some((n, Described::Django { error, .. })) => super::describe::django(
                        cfg,
                        &name,
                        &Known::Failed(format!(
                            "runner {n}: {}",
                            error.clone().unwrap_or_default()
                        )),
                    ),
                    None => super::describe::django(
                        cfg,
                        &name,
                        &Known::Failed(match group {
                            Some(g) => format!("no connected runner of group {g:?} offers it"),
                            None => "no connected runner offers it".to_owned(),
                        }),
                    ),
                };
                if let Some(m) = entry.as_object_mut() {
                    m.insert("runners".into(), json!(runners));
                }
                entry
            })
            .collect()
    }

    /// Every command a connected runner describes (blocklist-mode listing).
    pub(super) fn runner_names(&self) -> Vec<String> {
        self.remote
            .as_ref()
            .map(|r| r.described_names(None))
            .unwrap_or_default()
    }

    /// `target = "all"`: one run per connected runner of the command's group
    /// (each audited and recorded on its own).
    pub(super) async fn submit_all(
        self: &Arc<Self>,
        ctx: &Ctx,
        command: &str,
        data: &Map<String, Value>,
    ) -> Result<Vec<Arc<Job>>, Refusal> {
        let group = self.cfg().rules.get(command).and_then(|r| r.group.clone());
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
        self.remote.is_some() && self.cfg().rules.get(command).is_some_and(|r| r.all)
    }

    /// Takes back a runner job left running by a previous gateway process.
    pub(super) fn adopt(self: &Arc<Self>, rec: JobRecord, runner: String) {
        let Some(reg) = self.remote.clone() else {
            return;
        };
        let cfg = self.cfg();
        let metadata_only = cfg.is_metadata_only(&rec.command);
        let rule = cfg.rules.get(&rec.command);
        let max_output = rule.and_then(|r| r.max_output).unwrap_or(cfg.max_output);
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
