//! Cron schedules (`[[commands.schedules]]`): each runs its command as
//! operator `scheduler`, audited like any other run. A schedule never
//! overlaps itself: when its previous run is still going at the next tick,
//! that tick is skipped and audited as `rejected`. Expressions are evaluated
//! in UTC; 6 fields means the first is seconds. In cluster mode every
//! instance wakes at each tick and exactly one claims it in Redis; the
//! previous run is looked up cluster-wide.

use super::clustered::Claim;
use super::config::Schedule;
use super::{Core, Ctx, Refusal, SCHEDULER};
use std::sync::Arc;
use std::time::SystemTime;
use tokio::task::JoinHandle;

fn now_naive() -> Option<chrono::NaiveDateTime> {
    let d = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .ok()?;
    let secs = i64::try_from(d.as_secs()).ok()?;
    chrono::DateTime::from_timestamp(secs, d.subsec_nanos()).map(|t| t.naive_utc())
}

/// Starts one task per schedule.
pub(super) fn spawn_all(core: &Arc<Core>, schedules: &[Schedule]) -> Vec<JoinHandle<()>> {
    schedules
        .iter()
        .enumerate()
        .map(|(i, s)| tokio::spawn(run_schedule(Arc::clone(core), i, s.clone())))
        .collect()
}

async fn run_schedule(core: Arc<Core>, index: usize, schedule: Schedule) {
    let mut shutdown = core.shutdown_tx.subscribe();
    let mut last: Option<Arc<super::Job>> = None;
    let mut tick = 0u64;
    loop {
        let Some(now) = now_naive() else { return };
        let next = match schedule.cron.find_next_occurrence(&now, false) {
            Ok(n) => n,
            Err(err) => {
                tracing::error!(cron = %schedule.cron_text, error = %err, "schedule has no next occurrence; stopping it");
                return;
            }
        };
        let wait = (next - now).to_std().unwrap_or_default();
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        tick += 1;
        let ctx = Ctx {
            operator: Some(SCHEDULER.to_owned()),
            request_id: format!("scheduler-{index}-{tick}"),
            client: None,
        };
        // Cluster mode: one instance takes the tick, and the previous run
        // may be anywhere in the cluster.
        let mut running = last
            .as_ref()
            .filter(|j| !j.is_final())
            .map(|j| j.id.clone());
        if let Some(cl) = core.cluster() {
            let at = next.and_utc().timestamp_millis();
            match core.claim_tick(cl, index, &schedule.command, at).await {
                Claim::Mine => {}
                Claim::Taken => continue,
                Claim::Unavailable => {
                    tracing::warn!(command = %schedule.command, "schedule tick skipped: cluster state (Redis) unavailable");
                    continue;
                }
            }
            if running.is_none() {
                running = core.schedule_running(cl, index, &schedule.command).await;
            }
        }
        if let Some(prev) = running {
            let r = Refusal::new(
                http::StatusCode::CONFLICT,
                format!("previous scheduled run {prev} is still running"),
            );
            core.reject(&ctx, Some(&schedule.command), None, r).await;
            continue;
        }
        match core.submit(&ctx, &schedule.command, &schedule.data).await {
            Ok(job) => {
                tracing::info!(command = %schedule.command, job = %job.id, "scheduled run started");
                if let Some(cl) = core.cluster() {
                    core.schedule_started(cl, index, &schedule.command, &job.id)
                        .await;
                }
                last = Some(job);
            }
            Err(r) => {
                tracing::warn!(command = %schedule.command, status = r.status.as_u16(), reason = %r.message, "scheduled run refused");
            }
        }
    }
}
