//! The read-only listings behind the operator console:
//! `GET /__manage__/jobs` (jobs newest first, filtered, paged by a job-id
//! cursor) and `GET /__manage__/audit` (recent audit lines as they are in the
//! file, with the hash chain's verdict).

use super::store::{self, JobRecord};
use super::{Core, Op};
use crate::audit::Verdict;
use crate::body::Body;
use http::{Response, StatusCode};
use percent_encoding::percent_decode_str;
use serde_json::{json, Value};
use std::sync::Arc;

/// Page size when `limit` is not given.
const DEFAULT_LIMIT: usize = 50;
/// Largest page.
const MAX_LIMIT: usize = 200;
/// Most job records looked at for one page: a filter matching little ends
/// the page early, with `next` saying where to go on.
const SCAN: usize = 5_000;

/// The decoded query parameters, or the name of the one that is malformed.
fn query_pairs(query: Option<&str>) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    for pair in query
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
    {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let decode = |s: &str| {
            percent_decode_str(&s.replace('+', " "))
                .decode_utf8()
                .map(|c| c.into_owned())
        };
        let key = decode(k).map_err(|_| "query parameter".to_owned())?;
        let value = decode(v).map_err(|_| format!("query parameter {key:?}"))?;
        out.push((key, value));
    }
    Ok(out)
}

fn bad(core: &Core, message: &str, request_id: &str) -> Response<Body> {
    super::api::error(core, StatusCode::BAD_REQUEST, message, request_id)
}

/// 503 after `what` failed to read (the cause is logged, not sent).
fn unavailable(
    core: &Core,
    what: &str,
    err: &dyn std::fmt::Display,
    request_id: &str,
) -> Response<Body> {
    tracing::error!(error = %err, "{what} read failed");
    let message = format!("{what} unavailable");
    super::api::error(core, StatusCode::SERVICE_UNAVAILABLE, &message, request_id)
}

fn limit_of(value: &str) -> Result<usize, &'static str> {
    match value.parse::<usize>() {
        Ok(n) if (1..=MAX_LIMIT).contains(&n) => Ok(n),
        _ => Err("\"limit\" must be a whole number from 1 to 200"),
    }
}

/// What `GET /__manage__/jobs` filters on (empty values mean "any").
#[derive(Default)]
struct JobFilter {
    command: Option<String>,
    status: Option<String>,
    operator: Option<String>,
    runner: Option<String>,
}

impl JobFilter {
    fn keeps(&self, rec: &JobRecord) -> bool {
        let is = |want: &Option<String>, have: Option<&str>| {
            want.as_deref().map_or(true, |w| Some(w) == have)
        };
        is(&self.command, Some(&rec.command))
            && is(&self.status, Some(rec.status.as_str()))
            && is(&self.operator, Some(&rec.operator))
            && is(&self.runner, rec.runner.as_deref())
    }
}

const STATUSES: [&str; 8] = [
    "queued",
    "running",
    "succeeded",
    "failed",
    "timed_out",
    "cancelled",
    "rejected",
    "lost",
];

/// `GET /__manage__/jobs?command=&status=&operator=&runner=&before=&limit=`:
/// `{"jobs": [...], "next": id | null}`, newest first; only jobs of commands
/// this operator may run.
pub(super) async fn jobs(
    core: &Arc<Core>,
    op: &Op,
    query: Option<&str>,
    request_id: &str,
) -> Response<Body> {
    let pairs = match query_pairs(query) {
        Ok(p) => p,
        Err(what) => return bad(core, &format!("malformed {what}"), request_id),
    };
    let mut filter = JobFilter::default();
    let mut before = None;
    let mut limit = DEFAULT_LIMIT;
    for (key, value) in pairs {
        let value = (!value.is_empty()).then_some(value);
        match (key.as_str(), value) {
            (_, None) => {}
            ("command", v) => filter.command = v,
            ("status", Some(v)) if STATUSES.contains(&v.as_str()) => filter.status = Some(v),
            ("status", Some(_)) => {
                return bad(
                    core,
                    "\"status\" must be one of queued, running, succeeded, failed, timed_out, cancelled, rejected, lost",
                    request_id,
                )
            }
            ("operator", v) => filter.operator = v,
            ("runner", v) => filter.runner = v,
            ("before", Some(v)) if super::api::valid_job_id(&v) => before = Some(v),
            ("before", Some(_)) => return bad(core, "\"before\" must be a job id", request_id),
            ("limit", Some(v)) => match limit_of(&v) {
                Ok(n) => limit = n,
                Err(m) => return bad(core, m, request_id),
            },
            (other, Some(_)) => {
                let other = super::api::clip(other);
                return bad(core, &format!("unknown query parameter {other:?}"), request_id);
            }
        }
    }
    if let Some(cl) = core.cluster() {
        // Cluster mode: every instance's jobs, from Redis.
        let keep = |rec: &JobRecord| filter.keeps(rec) && core.may_see(op, &rec.command);
        return match core.shared_list(cl, before, limit, SCAN, keep).await {
            Ok((records, next)) => page(core, records, next),
            Err(()) => unavailable(
                core,
                "Cluster state (Redis)",
                &"Redis failed or was late",
                request_id,
            ),
        };
    }
    let see = Arc::clone(core);
    let seer = op.clone();
    let listed = store::blocking(&core.store, move |s| {
        s.list(before.as_deref(), limit, SCAN, |rec| {
            filter.keeps(rec) && see.may_see(&seer, &rec.command)
        })
    })
    .await;
    match listed {
        Ok((records, next)) => page(core, records, next),
        Err(err) => unavailable(core, "Job store", &err, request_id),
    }
}

/// One page of `GET /__manage__/jobs`.
fn page(core: &Core, records: Vec<JobRecord>, next: Option<String>) -> Response<Body> {
    // A job running here has fresher figures than its stored record.
    let jobs: Vec<Value> = records
        .into_iter()
        .map(|rec| match core.live(&rec.id) {
            Some(job) => json!(job.record()),
            None => json!(rec),
        })
        .collect();
    super::api::json_response(StatusCode::OK, &json!({"jobs": jobs, "next": next}))
}

/// `GET /__manage__/audit?before=&limit=`: `{"lines": [...], "next": seq |
/// null, "verified": bool, "verify_error": null | "..."}`, newest first.
pub(super) async fn audit(
    core: &Arc<Core>,
    query: Option<&str>,
    request_id: &str,
) -> Response<Body> {
    let pairs = match query_pairs(query) {
        Ok(p) => p,
        Err(what) => return bad(core, &format!("malformed {what}"), request_id),
    };
    let mut before = None;
    let mut limit = DEFAULT_LIMIT;
    for (key, value) in pairs {
        match (key.as_str(), value.as_str()) {
            (_, "") => {}
            ("before", v) => match v.parse::<u64>() {
                Ok(n) if n > 0 => before = Some(n),
                _ => return bad(core, "\"before\" must be a line number (seq)", request_id),
            },
            ("limit", v) => match limit_of(v) {
                Ok(n) => limit = n,
                Err(m) => return bad(core, m, request_id),
            },
            (other, _) => {
                let other = super::api::clip(other);
                return bad(
                    core,
                    &format!("unknown query parameter {other:?}"),
                    request_id,
                );
            }
        }
    }
    let log = Arc::clone(&core.audit);
    let read = tokio::task::spawn_blocking(move || log.recent(before, limit)).await;
    match read {
        Ok(Ok(recent)) => {
            let (verified, verify_error) = match recent.verdict {
                Verdict::Intact { .. } => (true, None),
                Verdict::Broken { line, problem } => {
                    (false, Some(format!("line {line}: {problem}")))
                }
            };
            super::api::json_response(
                StatusCode::OK,
                &json!({
                    "lines": recent.lines,
                    "next": recent.next,
                    "verified": verified,
                    "verify_error": verify_error,
                }),
            )
        }
        Ok(Err(err)) => unavailable(core, "Audit log", &err, request_id),
        Err(err) => unavailable(core, "Audit log", &err, request_id),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_percent_decoded() {
        let pairs = query_pairs(Some("command=a%20b&status=failed&x")).unwrap();
        assert_eq!(
            pairs,
            [
                ("command".to_owned(), "a b".to_owned()),
                ("status".to_owned(), "failed".to_owned()),
                ("x".to_owned(), String::new()),
            ]
        );
        assert!(query_pairs(Some("command=%ff")).is_err());
    }
}
