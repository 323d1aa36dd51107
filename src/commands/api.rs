//! The `/__manage__` endpoints, as docs/remote-operations.md describes them.
//! Order for every request:
//! bearer token (401) → route (404/405) → permission (403) → body (400/413)
//! → arguments (400) → lock (409) → capacity (429) → audit + store (503) → run.
//!
//! Longer than the crate's 600-line guide on purpose: one table of endpoints,
//! read top to bottom in the order every request is checked; each handler is
//! short.

use super::clustered::Lookup;
use super::{lock, Core, Ctx, Job, Refusal, METADATA_ONLY_OUTPUT};
use crate::body::Body;
use crate::envelope;
use bytes::Bytes;
use http::header::{HeaderValue, ACCEPT, AUTHORIZATION, CACHE_CONTROL, CONTENT_TYPE, LOCATION};
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use serde_json::{json, Map, Value};
use std::convert::Infallible;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::mpsc;

/// Largest request body accepted on `/__manage__`.
const MAX_BODY: usize = 64 * 1024;
/// How long reading the request body may take.
const BODY_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest chunk sent per stream frame or SSE event.
pub(super) const CHUNK: usize = 16 * 1024;
/// SSE comment sent when a running job is quiet for this long.
pub(super) const KEEPALIVE: Duration = Duration::from_secs(15);

pub(super) fn json_response(status: StatusCode, value: &Value) -> Response<Body> {
    // Serializing a `Value` cannot fail.
    let bytes = serde_json::to_vec(value).unwrap_or_default();
    let mut resp = Response::new(Body::full(bytes));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// An error envelope; like every `/__manage__` answer, never cached.
fn envelope_no_store(
    core: &Core,
    status: StatusCode,
    message: &str,
    request_id: &str,
) -> Response<Body> {
    let mut resp = envelope::response(status, &core.error_type, message, request_id);
    resp.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

fn refusal_response(core: &Core, r: &Refusal, request_id: &str) -> Response<Body> {
    let mut resp = envelope_no_store(core, r.status, &r.message, request_id);
    if r.status == StatusCode::UNAUTHORIZED {
        resp.headers_mut().insert(
            http::header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"portcullis\""),
        );
    }
    if let Some(secs) = r.retry_after {
        resp.headers_mut()
            .insert(http::header::RETRY_AFTER, HeaderValue::from(secs));
    }
    resp
}

pub(super) fn error(
    core: &Core,
    status: StatusCode,
    message: &str,
    request_id: &str,
) -> Response<Body> {
    envelope_no_store(core, status, message, request_id)
}

fn method_not_allowed(core: &Core, allow: &'static str, request_id: &str) -> Response<Body> {
    let mut resp = error(
        core,
        StatusCode::METHOD_NOT_ALLOWED,
        "Method Not Allowed",
        request_id,
    );
    resp.headers_mut()
        .insert(http::header::ALLOW, HeaderValue::from_static(allow));
    resp
}

fn bearer(req: &Request<impl Sized>) -> Option<&[u8]> {
    let value = req.headers().get(AUTHORIZATION)?.as_bytes();
    let (scheme, token) = value.split_at(value.iter().position(|b| *b == b' ')?);
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        return None;
    }
    let token = token.trim_ascii();
    (!token.is_empty()).then_some(token)
}

pub(super) fn valid_job_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Entry point from [`super::Commands::handle`].
pub(super) async fn handle<B>(
    core: &Arc<Core>,
    req: Request<B>,
    client_ip: IpAddr,
    request_id: &str,
) -> Response<Body>
where
    B: http_body::Body<Data = Bytes> + Send,
    B::Error: Into<crate::body::BoxError>,
{
    // The same normalization the gateway routed on (dot segments, percent
    // decoding of unreserved characters), so both agree on the path.
    let Ok(path) = crate::routes::normalize(req.uri().path()).map(String::from) else {
        return error(
            core,
            StatusCode::BAD_REQUEST,
            "Invalid request path",
            request_id,
        );
    };
    let Some(rest) = path.strip_prefix("/__manage__") else {
        return error(core, StatusCode::NOT_FOUND, "Not found", request_id);
    };
    let segments: Vec<&str> = rest
        .trim_start_matches('/')
        .split('/')
        .filter(|s| !s.is_empty())
        .collect();
    // The console's page and static files hold no data: served without a token.
    if segments.first() == Some(&"console") && matches!(*req.method(), Method::GET | Method::HEAD) {
        return super::console::serve(core, segments.get(1..).unwrap_or_default(), request_id);
    }
    let mut ctx = Ctx {
        operator: None,
        request_id: request_id.to_owned(),
        client: Some(client_ip.to_string()),
    };
    // The command named, for the audit line of a refused run.
    let run_target = match segments.as_slice() {
        [cmd] if *cmd != "jobs" && req.method() == Method::POST => Some(*cmd),
        _ => None,
    };

    let op = match bearer(&req).and_then(|t| core.find_operator(t)) {
        Some(op) => op,
        None => {
            let reason = if bearer(&req).is_some() {
                "invalid operator token"
            } else {
                "missing bearer token"
            };
            let mut r = core
                .reject(
                    &ctx,
                    run_target.map(clip),
                    None,
                    Refusal::new(StatusCode::UNAUTHORIZED, reason),
                )
                .await;
            if r.status == StatusCode::UNAUTHORIZED {
                r.message = "Operator token missing or invalid".into();
            }
            return refusal_response(core, &r, request_id);
        }
    };
    ctx.operator = Some(op.name.clone());

    match (segments.as_slice(), req.method()) {
        ([], &Method::GET) => list(core, &op).await,
        ([], _) => method_not_allowed(core, "GET", request_id),
        (["jobs"], &Method::GET) => {
            super::listing::jobs(core, &op, req.uri().query(), request_id).await
        }
        (["jobs"], _) => method_not_allowed(core, "GET", request_id),
        (["audit"], &Method::GET) => match &op.commands {
            // The log names every operator's runs: only operators who may
            // run everything read it.
            None => super::listing::audit(core, req.uri().query(), request_id).await,
            Some(_) => error(
                core,
                StatusCode::FORBIDDEN,
                "Reading the audit log needs an operator without a command list",
                request_id,
            ),
        },
        (["jobs", id], &Method::GET) => job_status(core, &op, id, request_id).await,
        (["jobs", _], _) => method_not_allowed(core, "GET", request_id),
        (["jobs", id, "output"], &Method::GET) => {
            let sse = req
                .headers()
                .get(ACCEPT)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.contains("text/event-stream"));
            let from = req
                .headers()
                .get("last-event-id")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(0);
            job_output(core, &op, id, sse, from, request_id).await
        }
        (["jobs", _, "output"], _) => method_not_allowed(core, "GET", request_id),
        (["jobs", id, "cancel"], &Method::POST) => cancel(core, &op, &ctx, id, request_id).await,
        (["jobs", _, "cancel"], _) => method_not_allowed(core, "POST", request_id),
        (["runners"], &Method::GET) => match &core.remote {
            Some(reg) => json_response(StatusCode::OK, &reg.list()),
            None => json_response(StatusCode::OK, &serde_json::json!({"runners": []})),
        },
        ([cmd], &Method::POST) if *cmd != "jobs" => run(core, &op, &ctx, cmd, req).await,
        ([cmd], _) if *cmd != "jobs" => method_not_allowed(core, "POST", request_id),
        _ => error(core, StatusCode::NOT_FOUND, "Not found", request_id),
    }
}

/// Command names from the URL are audited clipped, so a huge path cannot
/// blow up the log.
pub(super) fn clip(s: &str) -> &str {
    match s.char_indices().nth(100) {
        Some((i, _)) => s.get(..i).unwrap_or(s),
        None => s,
    }
}

async fn list(core: &Core, op: &super::Op) -> Response<Body> {
    // Right after start or a reload, give Django a moment to answer.
    core.introspection_settled().await;
    let cfg = core.cfg();
    let mut commands = Vec::new();
    for c in &cfg.custom {
        if core.may_see(op, &c.name) {
            commands.push(super::describe::custom(&cfg, &c.name));
        }
    }
    let mut any_other = false;
    if core.remote.is_some() {
        // Commands run on runners: described as the runners read them.
        let names: Vec<String> = match (&cfg.mode, &op.commands) {
            (super::config::Mode::Allowlist(list), _) => list.clone(),
            (super::config::Mode::Blocklist(_), Some(own)) => own.clone(),
            (super::config::Mode::Blocklist(_), None) => {
                any_other = true;
                core.runner_names()
            }
        };
        let names = names
            .into_iter()
            .filter(|n| cfg.custom(n).is_none() && core.may_see(op, n))
            .collect();
        commands.extend(core.runner_listing(&cfg, names));
    } else if cfg.django.is_some() {
        let names: Vec<String> = match (&cfg.mode, &op.commands) {
            (super::config::Mode::Allowlist(list), _) => list.clone(),
            (super::config::Mode::Blocklist(_), Some(own)) => own.clone(),
            (super::config::Mode::Blocklist(_), None) => {
                any_other = true;
                core.intro.borrow().names()
            }
        };
        for n in names {
            if cfg.custom(&n).is_none() && core.may_see(op, &n) {
                let known = core.intro.borrow().get(&n);
                commands.push(super::describe::django(&cfg, &n, &known));
            }
        }
    }
    let (mode, denied) = match &cfg.mode {
        super::config::Mode::Allowlist(_) => ("allowlist", Value::Null),
        super::config::Mode::Blocklist(d) => ("blocklist", json!(d)),
    };
    json_response(
        StatusCode::OK,
        &json!({
            "operator": op.name,
            "mode": mode,
            "commands": commands,
            "any_other_django_command": any_other,
            "denied": denied,
        }),
    )
}

/// A job found: running here, or its record (from this instance's store, or
/// in cluster mode from Redis: then `shared` is true).
struct Found {
    live: Option<Arc<Job>>,
    rec: super::store::JobRecord,
    shared: bool,
}

/// Finds a job this operator may see: live first, then the store, then (in
/// cluster mode) Redis.
async fn find_job(core: &Arc<Core>, op: &super::Op, id: &str) -> Result<Found, Lookup> {
    if !valid_job_id(id) {
        return Err(Lookup::Missing);
    }
    let found = match core.live(id) {
        Some(job) => {
            let rec = job.record();
            Found {
                live: Some(job),
                rec,
                shared: false,
            }
        }
        None => {
            let key = id.to_owned();
            let local = match super::store::blocking(&core.store, move |s| s.get(&key)).await {
                Ok(found) => found,
                Err(err) => {
                    tracing::error!(error = %err, "job store read failed");
                    None
                }
            };
            match (local, core.cluster()) {
                (Some(rec), _) => Found {
                    live: None,
                    rec,
                    shared: false,
                },
                // Another instance's job.
                (None, Some(cl)) => Found {
                    live: None,
                    rec: core.shared_record(cl, id).await?,
                    shared: true,
                },
                (None, None) => return Err(Lookup::Missing),
            }
        }
    };
    if !core.may_see(op, &found.rec.command) {
        return Err(Lookup::Missing);
    }
    Ok(found)
}

/// The answer when a job cannot be shown.
fn not_found(core: &Core, why: &Lookup, request_id: &str) -> Response<Body> {
    match why {
        Lookup::Missing => error(core, StatusCode::NOT_FOUND, "No such job", request_id),
        Lookup::Unavailable => refusal_response(core, &super::clustered::unavailable(), request_id),
    }
}

async fn job_status(
    core: &Arc<Core>,
    op: &super::Op,
    id: &str,
    request_id: &str,
) -> Response<Body> {
    match find_job(core, op, id).await {
        Ok(found) => json_response(StatusCode::OK, &json!(found.rec)),
        Err(why) => not_found(core, &why, request_id),
    }
}

fn result_json(rec: &super::store::JobRecord, output: &[u8]) -> Value {
    let output = if rec.metadata_only {
        METADATA_ONLY_OUTPUT.to_owned()
    } else {
        String::from_utf8_lossy(output).into_owned()
    };
    json!({
        "id": rec.id,
        "command": rec.command,
        "status": rec.status,
        "reason": rec.reason,
        "exit_code": rec.exit_code,
        "duration_ms": rec.duration_ms,
        "runner": rec.runner,
        "output": output,
        "output_bytes": rec.output_bytes,
        "output_truncated": rec.output_truncated,
    })
}

async fn run<B>(
    core: &Arc<Core>,
    op: &super::Op,
    ctx: &Ctx,
    command: &str,
    req: Request<B>,
) -> Response<Body>
where
    B: http_body::Body<Data = Bytes> + Send,
    B::Error: Into<crate::body::BoxError>,
{
    let request_id = ctx.request_id.as_str();
    if let Some(reason) = core.forbidden(op, command) {
        let r = Refusal::new(
            StatusCode::FORBIDDEN,
            format!("Command not permitted: {reason}"),
        );
        let r = core.reject(ctx, Some(clip(command)), None, r).await;
        return refusal_response(core, &r, request_id);
    }
    // `Prefer: respond-async` (RFC 7240; the console sends it to follow the
    // output live): answer 202 at once instead of waiting `sync_wait`.
    let sync_wait = if prefers_async(&req) {
        Duration::ZERO
    } else {
        core.cfg().sync_wait
    };
    let data = match read_data(req).await {
        Ok(d) => d,
        Err(r) => {
            let r = core.reject(ctx, Some(command), None, r).await;
            return refusal_response(core, &r, request_id);
        }
    };
    if core.fans_out(command) {
        return run_all(core, ctx, command, &data).await;
    }
    let job = match core.submit(ctx, command, &data).await {
        Ok(job) => job,
        Err(r) => return refusal_response(core, &r, request_id),
    };
    let location = format!("/__manage__/jobs/{}", job.id);
    if job.wait_final(sync_wait).await {
        if job.audit_failed.load(std::sync::atomic::Ordering::SeqCst) {
            return error(
                core,
                StatusCode::SERVICE_UNAVAILABLE,
                "The command ran but its result could not be written to the audit log",
                request_id,
            );
        }
        let rec = job.record();
        let out = lock(&job.out).data.clone();
        let mut resp = json_response(StatusCode::OK, &result_json(&rec, &out));
        if let Ok(v) = HeaderValue::from_str(&location) {
            resp.headers_mut().insert(http::header::CONTENT_LOCATION, v);
        }
        resp
    } else {
        let rec = job.record();
        let mut resp = json_response(
            StatusCode::ACCEPTED,
            &json!({"id": job.id, "command": job.command, "status": rec.status, "location": location}),
        );
        if let Ok(v) = HeaderValue::from_str(&location) {
            resp.headers_mut().insert(LOCATION, v);
        }
        resp
    }
}

/// Whether the request carries `Prefer: respond-async`.
fn prefers_async<B>(req: &Request<B>) -> bool {
    req.headers().get_all("prefer").iter().any(|v| {
        v.to_str().is_ok_and(|v| {
            v.split(',')
                .any(|p| p.trim().eq_ignore_ascii_case("respond-async"))
        })
    })
}

/// `target = "all"`: one job per connected runner. Within `sync_wait`,
/// 200 `{"command", "jobs": [results]}`; else 202 `{"command", "jobs": [{id, runner, location}]}`.
async fn run_all(
    core: &Arc<Core>,
    ctx: &Ctx,
    command: &str,
    data: &Map<String, Value>,
) -> Response<Body> {
    let jobs = match core.submit_all(ctx, command, data).await {
        Ok(j) => j,
        Err(r) => return refusal_response(core, &r, &ctx.request_id),
    };
    let deadline = tokio::time::Instant::now() + core.cfg().sync_wait;
    let mut done = true;
    for job in &jobs {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        done &= job.wait_final(left).await;
    }
    if done {
        let results: Vec<Value> = jobs
            .iter()
            .map(|j| result_json(&j.record(), &lock(&j.out).data))
            .collect();
        json_response(
            StatusCode::OK,
            &json!({"command": command, "jobs": results}),
        )
    } else {
        let list: Vec<Value> = jobs
            .iter()
            .map(|j| {
                json!({"id": j.id, "runner": j.record().runner, "location": format!("/__manage__/jobs/{}", j.id)})
            })
            .collect();
        json_response(
            StatusCode::ACCEPTED,
            &json!({"command": command, "jobs": list}),
        )
    }
}

/// Reads `{"data": {...}}` (an empty body means no data).
async fn read_data<B>(req: Request<B>) -> Result<Map<String, Value>, Refusal>
where
    B: http_body::Body<Data = Bytes> + Send,
    B::Error: Into<crate::body::BoxError>,
{
    let bad = |m: &str| Refusal::new(StatusCode::BAD_REQUEST, m);
    let limited = http_body_util::Limited::new(req.into_body(), MAX_BODY);
    let bytes = match tokio::time::timeout(BODY_TIMEOUT, limited.collect()).await {
        Err(_) => {
            return Err(Refusal::new(
                StatusCode::REQUEST_TIMEOUT,
                "request body too slow",
            ))
        }
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            return Err(Refusal::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "request body too large",
            ))
        }
        Ok(Err(_)) => return Err(bad("could not read the request body")),
        Ok(Ok(c)) => c.to_bytes(),
    };
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(Map::new());
    }
    let value: Value =
        serde_json::from_slice(&bytes).map_err(|_| bad("body must be JSON: {\"data\": {...}}"))?;
    let Value::Object(mut top) = value else {
        return Err(bad("body must be a JSON object: {\"data\": {...}}"));
    };
    let data = top.remove("data");
    if !top.is_empty() {
        return Err(bad("unknown field in body; only \"data\" is accepted"));
    }
    match data {
        None | Some(Value::Null) => Ok(Map::new()),
        Some(Value::Object(m)) => Ok(m),
        Some(_) => Err(bad("\"data\" must be an object")),
    }
}

async fn cancel(
    core: &Arc<Core>,
    op: &super::Op,
    ctx: &Ctx,
    id: &str,
    request_id: &str,
) -> Response<Body> {
    let Found { live, rec, shared } = match find_job(core, op, id).await {
        Ok(found) => found,
        Err(why) => return not_found(core, &why, request_id),
    };
    let job = live.filter(|j| !j.is_final());
    // Running on another instance: its owner picks the request up.
    let elsewhere = shared && !rec.status.is_final();
    if job.is_none() && !elsewhere {
        return error(
            core,
            StatusCode::CONFLICT,
            &format!("job already ended ({})", rec.status.as_str()),
            request_id,
        );
    }
    let mut e = crate::audit::Entry::new(
        crate::audit::Event::CancelRequested,
        request_id,
        rec.status.as_str(),
    );
    e.operator = ctx.operator.clone();
    e.client = ctx.client.clone();
    e.command = Some(rec.command.clone());
    e.job_id = Some(rec.id.clone());
    if let Err(err) = core.audit.append_async(e).await {
        tracing::error!(error = %err, "audit log write failed; not cancelling");
        return error(
            core,
            StatusCode::SERVICE_UNAVAILABLE,
            "Audit log unavailable: nothing was done",
            request_id,
        );
    }
    let who = format!("cancelled by {}", op.name);
    let Some(job) = job else {
        let asked = match core.cluster() {
            Some(cl) => core.cluster_cancel(cl, &rec.id, &who).await,
            None => Err(()),
        };
        return match asked {
            Ok(()) => json_response(
                StatusCode::ACCEPTED,
                &json!({"id": rec.id, "status": "cancelling"}),
            ),
            Err(()) => refusal_response(core, &super::clustered::unavailable(), request_id),
        };
    };
    job.cancel.send_if_modified(|r| {
        if r.is_none() {
            *r = Some(who);
            true
        } else {
            false
        }
    });
    json_response(
        StatusCode::ACCEPTED,
        &json!({"id": rec.id, "status": "cancelling"}),
    )
}

/// A body fed by a channel (live output streams).
struct ChannelBody {
    rx: mpsc::Receiver<Bytes>,
}

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
        self.rx
            .poll_recv(cx)
            .map(|o| o.map(|b| Ok(http_body::Frame::data(b))))
    }
}

/// Where a chunk of output may end so it does not split a UTF-8 character
/// (only matters for SSE, which is text).
pub(super) fn utf8_end(bytes: &[u8]) -> usize {
    match std::str::from_utf8(bytes) {
        Ok(_) => bytes.len(),
        Err(e) if e.error_len().is_none() => e.valid_up_to(),
        Err(_) => bytes.len(),
    }
}

/// One SSE event carrying `bytes`, with `id` = the byte offset after them.
pub(super) fn sse_event(id: u64, bytes: &[u8]) -> Bytes {
    let text = String::from_utf8_lossy(bytes)
        .replace("\r\n", "\n")
        .replace('\r', "\n");
    let mut ev = format!("id: {id}\n");
    for line in text.split('\n') {
        ev.push_str("data: ");
        ev.push_str(line);
        ev.push('\n');
    }
    ev.push('\n');
    Bytes::from(ev)
}

pub(super) fn sse_end(rec: &super::store::JobRecord) -> Bytes {
    let data = json!({"status": rec.status, "exit_code": rec.exit_code, "reason": rec.reason});
    Bytes::from(format!("event: end\ndata: {data}\n\n"))
}

fn stream_response(rx: mpsc::Receiver<Bytes>, sse: bool) -> Response<Body> {
    let mut resp = Response::new(Body::boxed(ChannelBody { rx }));
    let ct = if sse {
        "text/event-stream"
    } else {
        "text/plain; charset=utf-8"
    };
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static(ct));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    resp
}

async fn job_output(
    core: &Arc<Core>,
    op: &super::Op,
    id: &str,
    sse: bool,
    from: u64,
    request_id: &str,
) -> Response<Body> {
    let Found { live, rec, shared } = match find_job(core, op, id).await {
        Ok(found) => found,
        Err(why) => return not_found(core, &why, request_id),
    };
    let (tx, rx) = mpsc::channel::<Bytes>(8);
    if let (true, Some(cl)) = (shared, core.cluster()) {
        tokio::spawn(super::clustered::follow(
            Arc::clone(core),
            Arc::clone(cl),
            rec.id.clone(),
            tx,
            sse,
            from,
            rec.metadata_only,
        ));
        return stream_response(rx, sse);
    }
    if rec.metadata_only {
        let msg = format!("{METADATA_ONLY_OUTPUT}\n");
        let live_job = live.clone();
        tokio::spawn(async move {
            let _ = if sse {
                tx.send(sse_event(0, METADATA_ONLY_OUTPUT.as_bytes())).await
            } else {
                tx.send(Bytes::from(msg)).await
            };
            if let Some(job) = live_job {
                job.wait_final(Duration::MAX).await;
                if sse {
                    let _ = tx.send(sse_end(&job.record())).await;
                }
            } else if sse {
                let _ = tx.send(sse_end(&rec)).await;
            }
        });
        return stream_response(rx, sse);
    }
    match live {
        Some(job) => {
            let shutdown = core.shutdown_tx.subscribe();
            tokio::spawn(stream_live(job, tx, sse, from, shutdown));
        }
        None => {
            let id = rec.id.clone();
            let output = match super::store::blocking(&core.store, move |s| s.output(&id)).await {
                Ok(o) => o.unwrap_or_default(),
                Err(err) => {
                    tracing::error!(error = %err, "job store read failed");
                    return error(
                        core,
                        StatusCode::SERVICE_UNAVAILABLE,
                        "Job store unavailable",
                        request_id,
                    );
                }
            };
            tokio::spawn(async move {
                let mut offset = if sse {
                    from.min(output.len() as u64) as usize
                } else {
                    0
                };
                while offset < output.len() {
                    let end = (offset + CHUNK).min(output.len());
                    let slice = output.get(offset..end).unwrap_or_default();
                    let cut = if sse && end < output.len() {
                        utf8_end(slice).max(1)
                    } else {
                        slice.len()
                    };
                    let piece = slice.get(..cut).unwrap_or_default();
                    offset += cut;
                    let frame = if sse {
                        sse_event(offset as u64, piece)
                    } else {
                        Bytes::copy_from_slice(piece)
                    };
                    if tx.send(frame).await.is_err() {
                        return;
                    }
                }
                if sse {
                    let _ = tx.send(sse_end(&rec)).await;
                }
            });
        }
    }
    stream_response(rx, sse)
}

/// Streams a running job's output as it arrives, then ends (SSE: with an
/// `end` event carrying the final status).
/// Streams a live job's output until it ends. A job on a runner goes on
/// when this gateway process stops: its stream ends then without an `end`
/// event (the client resumes from the next process with `Last-Event-ID`),
/// so it does not hold the shutdown's drain.
async fn stream_live(
    job: Arc<Job>,
    tx: mpsc::Sender<Bytes>,
    sse: bool,
    from: u64,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let mut rx = job.version.subscribe();
    let mut offset = if sse { from as usize } else { 0 };
    loop {
        // Read the state before the output so nothing written before the
        // job ended is missed.
        let done = job.is_final();
        let piece = {
            let out = lock(&job.out);
            let avail = out
                .data
                .get(offset.min(out.data.len())..)
                .unwrap_or_default();
            let take = avail.len().min(CHUNK);
            let slice = avail.get(..take).unwrap_or_default();
            let cut = if sse && !(done && take == avail.len()) {
                utf8_end(slice)
            } else {
                slice.len()
            };
            slice.get(..cut).unwrap_or_default().to_vec()
        };
        if !piece.is_empty() {
            offset += piece.len();
            let frame = if sse {
                sse_event(offset as u64, &piece)
            } else {
                Bytes::from(piece)
            };
            if tx.send(frame).await.is_err() {
                return;
            }
            continue;
        }
        if done {
            if sse {
                let _ = tx.send(sse_end(&job.record())).await;
            }
            return;
        }
        let on_runner = lock(&job.record).runner.is_some();
        let changed = tokio::select! {
            c = tokio::time::timeout(KEEPALIVE, rx.changed()) => c,
            _ = shutdown.wait_for(|s| *s), if on_runner => return,
        };
        match changed {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return,
            Err(_) if sse => {
                if tx
                    .send(Bytes::from_static(b": keepalive\n\n"))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            Err(_) => {}
        }
    }
}
