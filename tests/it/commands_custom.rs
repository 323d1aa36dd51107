//! Remote operations with fixed-argv commands (`[[commands.custom]]`), through
//! real sockets: argument mapping, limits (output cap, timeout, concurrency,
//! locks), cancel without orphans, streaming, metadata-only, redaction, and
//! every bad input refused with nothing run and one audit line written.

use crate::support::commands::*;
use http::Method;
use serde_json::Value;
use std::time::Duration;

/// The service with a `lines` command that prints `line1` .. `line<count>`,
/// one every 0.3 s.
async fn start_lines(count: usize) -> Env {
    let numbers: Vec<String> = (1..=count).map(|i| i.to_string()).collect();
    start_show(&format!(
        r#"
[[commands.custom]]
name = "lines"
argv = ["sh", "-c", "for i in {}; do echo line$i; sleep 0.3; done"]
"#,
        numbers.join(" ")
    ))
    .await
}

/// A job's output as server-sent events, resumed after `last_event_id` if any.
async fn job_events(env: &Env, id: &str, last_event_id: Option<&str>) -> Resp {
    let mut headers = vec![("accept", "text/event-stream")];
    if let Some(last) = last_event_id {
        headers.push(("last-event-id", last));
    }
    let path = format!("/__manage__/jobs/{id}/output");
    send(env.addr, Method::GET, &path, Some(ALICE), "", &headers).await
}

/// A config whose `show` command prints each argument on its own line and
/// touches `<dir>/ran`, so a test can tell whether anything ran.
fn show_config(dir: &std::path::Path, extra: &str) -> String {
    let sync = if extra.contains("sync_wait") {
        ""
    } else {
        "sync_wait = \"5s\""
    };
    format!(
        r#"
{sync}
kill_grace = "1s"
max_output = "1KiB"
env = ["PATH"]
redact = ["password"]
metadata_only = ["secret-report"]
{extra}

[commands.rules.show]
options = {{ name = "string", count = {{ type = "int", max = 3 }}, loud = "bool", tag = "list", args = "list", password = "string" }}

[commands.rules.secret-report]
options = {{ user = "string", password = "string" }}

[[commands.custom]]
name = "echo"
argv = ["echo", "hello"]

[[commands.custom]]
name = "show"
argv = ["sh", "-c", 'touch "$0"; for a in "$@"; do echo "[$a]"; done; echo "HOME=${{HOME-unset}} PWD=$PWD"', "{ran}"]
cwd = "{cwd}"

[[commands.custom]]
name = "secret-report"
argv = ["sh", "-c", 'echo TOPSECRET-OUTPUT "$@"', "x"]

[[commands.custom]]
name = "flood"
argv = ["sh", "-c", "head -c 100000 /dev/zero | tr '\\0' x; echo; echo done"]

[[commands.custom]]
name = "slow"
argv = ["sleep", "30.11"]
timeout = "1s"
"#,
        ran = dir.join("ran").display(),
        cwd = dir.display(),
    )
}

async fn start_show(extra: &str) -> Env {
    let dir = tempfile::tempdir().unwrap();
    let text = show_config(dir.path(), extra);
    start_in(dir, &text).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_runs_inline_and_is_audited() {
    let env = start_show("").await;
    let r = run(&env, "echo", "").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["status"], "succeeded");
    assert_eq!(v["exit_code"], 0);
    assert_eq!(v["output"], "hello\n");
    assert!(v["duration_ms"].as_u64().is_some());
    let id = v["id"].as_str().unwrap().to_owned();

    let audit = env.audit();
    assert_eq!(audit.len(), 2, "{audit:?}");
    assert_eq!(audit[0]["event"], "accepted");
    assert_eq!(audit[0]["operator"], "alice");
    assert_eq!(audit[0]["client"], "127.0.0.1");
    assert_eq!(audit[1]["event"], "finished");
    assert_eq!(audit[1]["status"], "succeeded");
    assert_eq!(audit[1]["exit_code"], 0);
    assert_eq!(audit[1]["output_bytes"], 6);
    assert_eq!(
        audit[1]["output_sha256"],
        portcullis::secret::hex(&portcullis::secret::sha256(b"hello\n"))
    );
    assert_eq!(audit[1]["job_id"], id.as_str());
    assert_eq!(
        portcullis::audit::verify(&env.audit_path()).unwrap(),
        portcullis::audit::Verdict::Intact { lines: 2 }
    );

    // The job and its output stay available.
    let job = get(&env, &format!("/__manage__/jobs/{id}")).await.json();
    assert_eq!(job["status"], "succeeded");
    assert_eq!(job["operator"], "alice");
    let out = get(&env, &format!("/__manage__/jobs/{id}/output")).await;
    assert_eq!(out.text(), "hello\n");

    // Dot segments are resolved the same way the gateway routed them.
    let r = run(&env, "./x/../echo", "").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["output"], "hello\n");
    // Unknown endpoints and wrong methods.
    let r = get(&env, "/__manage__/jobs").await;
    assert_eq!(r.status, 404);
    let r = get(&env, "/__manage__/echo").await;
    assert_eq!(r.status, 405);
    assert_eq!(r.headers["allow"], "POST");
    let r = get(&env, "/__manage__/jobs/not-hex").await;
    assert_eq!(r.status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_maps_to_argv_env_is_cleared_cwd_is_fixed() {
    let env = start_show("").await;
    let r = run(
        &env,
        "show",
        r#"{"data": {"name": "--evil=1; rm -rf /", "count": 2, "loud": true, "tag": ["a", "b"], "args": ["-x", "pos"], "password": "hunter2"}}"#,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let out = r.json()["output"].as_str().unwrap().to_owned();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines,
        [
            "[--count=2]",
            "[--loud]",
            "[--name=--evil=1; rm -rf /]",
            "[--password=hunter2]",
            "[--tag=a]",
            "[--tag=b]",
            "[--]",
            "[-x]",
            "[pos]",
            &format!("HOME=unset PWD={}", env.dir.path().display()),
        ]
    );
    // The redacted value is in no audit line and not in the job record.
    let text = std::fs::read_to_string(env.audit_path()).unwrap();
    assert!(!text.contains("hunter2"));
    assert_eq!(env.audit()[0]["args"]["password"], "***");
    assert_eq!(env.audit()[0]["args"]["name"], "--evil=1; rm -rf /");
    let id = r.json()["id"].as_str().unwrap().to_owned();
    let job = get(&env, &format!("/__manage__/jobs/{id}")).await;
    assert!(!job.text().contains("hunter2"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_over_the_cap_is_counted_and_dropped() {
    let env = start_show("").await;
    let r = run(&env, "flood", "").await;
    assert_eq!(r.status, 200);
    let v = r.json();
    assert_eq!(v["status"], "succeeded");
    assert_eq!(v["output"].as_str().unwrap().len(), 1024);
    assert_eq!(v["output_bytes"], 100_006);
    assert_eq!(v["output_truncated"], true);
    assert_eq!(env.audit()[1]["output_bytes"], 100_006);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_ends_timed_out_and_kills_the_group() {
    let env = start_show("").await;
    let r = run(&env, "slow", "").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["status"], "timed_out");
    assert!(v["duration_ms"].as_u64().unwrap() < 4000);
    assert!(no_process_with("sleep 30.11").await);
    assert_eq!(env.audit()[1]["status"], "timed_out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_kills_grandchildren_that_hold_the_pipe() {
    let env = start_show(
        r#"
[[commands.custom]]
name = "tree"
argv = ["sh", "-c", "sleep 33.31 & sleep 33.32 & echo started; wait"]
"#,
    )
    .await;
    // sync_wait is 5 s: ask for the job from another task and cancel it.
    let post = run_in_background(&env, "tree", "");
    let id = accepted_job_id(&env).await;
    assert!(process_appears("sleep 33.31").await);
    let c = cancel(&env, &id).await;
    assert_eq!(c.status, 202, "{}", c.text());
    let r = post.await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["status"], "cancelled");
    assert_eq!(r.json()["reason"], "cancelled by alice");
    assert!(no_process_with("sleep 33.31").await);
    assert!(no_process_with("sleep 33.32").await);
    assert_eq!(zombie_children(), 0);
    let events: Vec<Value> = env.audit().iter().map(|l| l["event"].clone()).collect();
    assert_eq!(events, ["accepted", "cancel_requested", "finished"]);
    // A second cancel: the job has ended.
    let c = cancel(&env, &id).await;
    assert_eq!(c.status, 409);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grandchild_holding_the_pipe_does_not_hold_the_job() {
    let env = start_show(
        r#"
[[commands.custom]]
name = "bg"
argv = ["sh", "-c", "sleep 34.51 & echo bye"]
"#,
    )
    .await;
    let started = std::time::Instant::now();
    let r = run(&env, "bg", "").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["status"], "succeeded");
    assert_eq!(r.json()["output"], "bye\n");
    assert!(started.elapsed() < Duration::from_secs(3));
    assert!(no_process_with("sleep 34.51").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_limit_queues_then_refuses() {
    let env = start_show(
        r#"
max_concurrent = 1
max_queued = 1
[[commands.custom]]
name = "nap"
argv = ["sleep", "1.27"]
"#,
    )
    .await;
    // sync_wait is 5 s in this config; post from tasks.
    let mut first = Vec::new();
    for _ in 0..2 {
        first.push(run_in_background(&env, "nap", ""));
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    let third = run(&env, "nap", "").await;
    assert_eq!(third.status, 429, "{}", third.text());
    assert_eq!(third.headers["retry-after"], "1");
    let mut results = Vec::new();
    for t in first {
        let r = t.await.unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        results.push(r.json());
    }
    assert!(results.iter().all(|v| v["status"] == "succeeded"));
    let audit = env.audit();
    let rejected: Vec<&Value> = audit.iter().filter(|l| l["event"] == "rejected").collect();
    assert_eq!(rejected.len(), 1);
    assert_eq!(rejected[0]["http_status"], 429);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_refuses_a_second_run_with_409() {
    let env = start_show(
        r#"
sync_wait = "0s"
[commands.rules.mig]
lock = "schema"
[commands.rules.mig2]
lock = "schema"
[[commands.custom]]
name = "mig"
argv = ["sleep", "1.31"]
[[commands.custom]]
name = "mig2"
argv = ["true"]
"#,
    )
    .await;
    let a = run(&env, "mig", "").await;
    assert_eq!(a.status, 202, "{}", a.text());
    let id = a.json()["id"].as_str().unwrap().to_owned();
    assert_eq!(
        a.headers["location"],
        format!("/__manage__/jobs/{id}").as_str()
    );
    let b = run(&env, "mig", "").await;
    assert_eq!(b.status, 409, "{}", b.text());
    let c = run(&env, "mig2", "").await;
    assert_eq!(c.status, 409);
    let done = wait_job(&env, &id, 10).await;
    assert_eq!(done["status"], "succeeded");
    let d = run(&env, "mig2", "").await;
    assert_eq!(d.status, 202);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_streams_live_and_sse_resumes() {
    let env = start_lines(4).await;
    let post = run_in_background(&env, "lines", "");
    let id = accepted_job_id(&env).await;

    // Plain text, live: the first line arrives while the job still runs.
    let resp = open(
        env.addr,
        Method::GET,
        &format!("/__manage__/jobs/{id}/output"),
        Some(ALICE),
        "",
        &[],
    )
    .await;
    assert_eq!(resp.headers()["content-type"], "text/plain; charset=utf-8");
    let mut body = resp.into_body();
    use http_body_util::BodyExt;
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert!(first.starts_with(b"line1"), "{first:?}");
    let job = get(&env, &format!("/__manage__/jobs/{id}")).await.json();
    assert_eq!(job["status"], "running");
    let rest = body.collect().await.unwrap().to_bytes();
    let mut all = first.to_vec();
    all.extend_from_slice(&rest);
    assert_eq!(all, b"line1\nline2\nline3\nline4\n");
    assert_eq!(post.await.unwrap().json()["status"], "succeeded");

    // SSE from the start, then resumed after the first event.
    let sse = job_events(&env, &id, None).await;
    assert_eq!(sse.headers["content-type"], "text/event-stream");
    let text = sse.text();
    assert!(text.starts_with("id: "), "{text}");
    assert!(text.contains("data: line4"), "{text}");
    assert!(text.contains("event: end"), "{text}");
    let resumed = job_events(&env, &id, Some("12")).await;
    let text = resumed.text();
    assert!(!text.contains("line1") && !text.contains("line2"), "{text}");
    assert!(text.contains("data: line3"), "{text}");
    assert!(text.contains("id: 24"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_streams_a_running_job_with_increasing_ids() {
    let env = start_lines(5).await;
    let _post = run_in_background(&env, "lines", "");
    let id = accepted_job_id(&env).await;
    let sse = job_events(&env, &id, None).await;
    let text = sse.text();
    let ids: Vec<u64> = text
        .lines()
        .filter_map(|l| l.strip_prefix("id: "))
        .map(|n| n.parse().unwrap())
        .collect();
    assert!(ids.len() >= 2, "{text}");
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    assert_eq!(*ids.last().unwrap(), 30);
    assert!(
        text.ends_with(
            "event: end\ndata: {\"exit_code\":0,\"reason\":null,\"status\":\"succeeded\"}\n\n"
        ),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_only_output_is_never_captured() {
    let env = start_show("").await;
    let r = run(
        &env,
        "secret-report",
        r#"{"data": {"user": "bob-the-user", "password": "pw-value"}}"#,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["status"], "succeeded");
    assert_eq!(v["output"], "(metadata-only mode, no output captured)");
    let id = v["id"].as_str().unwrap();
    let out = get(&env, &format!("/__manage__/jobs/{id}/output")).await;
    assert_eq!(out.text(), "(metadata-only mode, no output captured)\n");
    let job = get(&env, &format!("/__manage__/jobs/{id}")).await;
    for leak in ["TOPSECRET", "bob-the-user", "pw-value"] {
        assert!(!job.text().contains(leak));
        let audit = std::fs::read(env.audit_path()).unwrap();
        assert!(
            !String::from_utf8_lossy(&audit).contains(leak),
            "{leak} in audit"
        );
        let store = std::fs::read(env.path("state/jobs.redb")).unwrap();
        assert!(
            !store.windows(leak.len()).any(|w| w == leak.as_bytes()),
            "{leak} in job store"
        );
    }
    let fin = &env.audit()[1];
    assert_eq!(fin["args"]["user"], "***");
    assert!(fin["output_bytes"].as_u64().unwrap() > 0);
    assert!(fin.get("output_sha256").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_shows_what_each_operator_may_run() {
    let env = start_show("").await;
    let a = get(&env, "/__manage__/").await.json();
    assert_eq!(a["operator"], "alice");
    let names: Vec<&str> = a["commands"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert!(
        names.contains(&"echo") && names.contains(&"show"),
        "{names:?}"
    );
    let b = send(env.addr, Method::GET, "/__manage__", Some(BOB), "", &[])
        .await
        .json();
    assert_eq!(b["commands"].as_array().unwrap().len(), 1);
    assert_eq!(b["commands"][0]["name"], "echo");
}

/// Sends a bad request and checks: the expected status and envelope, the
/// marker file was not created, and exactly one (rejected) audit line was added.
async fn refused(env: &Env, token: Option<&str>, path: &str, body: &str, status: u16) -> Value {
    let before = env.audit().len();
    let r = send(env.addr, Method::POST, path, token, body, &[]).await;
    assert_eq!(r.status, status, "{path} {body}: {}", r.text());
    let v = r.json();
    assert_eq!(v["error"]["code"], status);
    assert_eq!(v["error"]["type"], "ProxyServerError");
    assert!(v["error"]["request_id"].as_str().is_some());
    assert!(!env.path("ran").exists(), "{path} {body}: something ran");
    let after = env.audit();
    assert_eq!(after.len(), before + 1, "{path} {body}: {after:?}");
    let line = after.last().unwrap().clone();
    assert_eq!(line["event"], "rejected");
    assert_eq!(line["status"], "rejected");
    assert_eq!(line["http_status"], status);
    assert!(line["reason"].as_str().is_some());
    line
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_input_is_refused_audited_and_runs_nothing() {
    let env = start_show("").await;
    let line = refused(&env, None, "/__manage__/show", "", 401).await;
    assert_eq!(line["reason"], "missing bearer token");
    assert!(line["operator"].is_null());
    let line = refused(&env, Some("wrong"), "/__manage__/show", "", 401).await;
    assert_eq!(line["reason"], "invalid operator token");
    refused(&env, Some("device-key"), "/__manage__/show", "", 401).await;
    let line = refused(&env, Some(ALICE), "/__manage__/flush", "", 403).await;
    assert_eq!(line["command"], "flush");
    refused(&env, Some(ALICE), "/__manage__/nope", "", 403).await;
    refused(&env, Some(BOB), "/__manage__/show", "", 403).await;
    for body in [
        r#"{"data": {"-x": "1"}}"#,
        r#"{"data": {"a b": "1"}}"#,
        r#"{"data": {"name": "a\u0000b"}}"#,
        r#"{"data": {"na\u0000me": "a"}}"#,
        r#"{"data": {"name": {"nested": 1}}}"#,
        r#"{"data": {"tag": [["x"]]}}"#,
        r#"{"data": {"unknown": "x"}}"#,
        r#"{"data": {"count": 4}}"#,
        r#"{"data": {"count": "2"}}"#,
        r#"{"data": {"loud": "yes"}}"#,
        r#"{"data": ["x"]}"#,
        r#"{"data": {}, "extra": 1}"#,
        r#"not json"#,
        r#"[1, 2]"#,
    ] {
        refused(&env, Some(ALICE), "/__manage__/show", body, 400).await;
    }
    // Custom commands without a schema take no data at all.
    refused(
        &env,
        Some(ALICE),
        "/__manage__/echo",
        r#"{"data": {"x": "1"}}"#,
        400,
    )
    .await;
    assert_eq!(
        portcullis::audit::verify(&env.audit_path()).unwrap(),
        portcullis::audit::Verdict::Intact {
            lines: env.audit().len() as u64
        }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unwritable_audit_log_fails_closed_with_503() {
    let dir = tempfile::tempdir().unwrap();
    let text = show_config(dir.path(), "audit_log = \"/dev/full\"");
    let env = start_in(dir, &text).await;
    let r = run(&env, "show", "").await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], 503);
    assert!(!env.path("ran").exists());
    // Rejections cannot be audited either: still 503, not the 4xx.
    let r = send(env.addr, Method::POST, "/__manage__/show", None, "", &[]).await;
    assert_eq!(r.status, 503);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schedules_run_as_scheduler_and_never_overlap() {
    let dir = tempfile::tempdir().unwrap();
    let text = show_config(
        dir.path(),
        &format!(
            r#"
[[commands.custom]]
name = "tick"
argv = ["sh", "-c", "echo tick >> {ticks}; sleep 1.6"]
[[commands.schedules]]
command = "tick"
cron = "* * * * * *"
"#,
            ticks = dir.path().join("ticks").display()
        ),
    );
    let env = start_in(dir, &text).await;
    tokio::time::sleep(Duration::from_millis(3600)).await;
    env.commands.shutdown().await;
    let audit = env.audit();
    let sched: Vec<&Value> = audit
        .iter()
        .filter(|l| l["operator"] == "scheduler")
        .collect();
    assert!(sched.iter().any(|l| l["event"] == "accepted"), "{audit:?}");
    assert!(
        sched
            .iter()
            .any(|l| l["event"] == "rejected"
                && l["reason"].as_str().unwrap().contains("still running")),
        "{audit:?}"
    );
    // Between an accepted line and its finished line, no other accepted line.
    let mut running = false;
    for l in &sched {
        match l["event"].as_str().unwrap() {
            "accepted" => {
                assert!(!running, "overlapping scheduled runs: {audit:?}");
                running = true;
            }
            "finished" => running = false,
            _ => {}
        }
    }
    assert!(l_all_have_no_client(&sched));
}

fn l_all_have_no_client(lines: &[&Value]) -> bool {
    lines.iter().all(|l| l["client"].is_null())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_cancels_running_jobs() {
    let env = start_show(
        r#"
[[commands.custom]]
name = "long"
argv = ["sleep", "36.61"]
"#,
    )
    .await;
    let post = run_in_background(&env, "long", "");
    assert!(process_appears("sleep 36.61").await);
    env.commands.shutdown().await;
    let r = post.await.unwrap();
    assert_eq!(r.json()["status"], "cancelled");
    assert_eq!(r.json()["reason"], "gateway shutting down");
    assert!(no_process_with("sleep 36.61").await);
    let r = run(&env, "echo", "").await;
    assert_eq!(r.status, 503);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_all_stops_every_running_command() {
    let env = start_show(
        r#"
sync_wait = "0s"
[[commands.custom]]
name = "long"
argv = ["sleep", "39.91"]
"#,
    )
    .await;
    let r = run(&env, "long", "").await;
    assert_eq!(r.status, 202);
    let id = r.json()["id"].as_str().unwrap().to_owned();
    for _ in 0..100 {
        if process_with("sleep 39.91") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The pid is recorded right after spawn; retry until the kill lands.
    for _ in 0..100 {
        env.commands.kill_all();
        if !process_with("sleep 39.91") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let job = wait_job(&env, &id, 5).await;
    assert_eq!(job["status"], "failed");
    assert_eq!(job["reason"], "killed by signal 9");
    assert!(no_process_with("sleep 39.91").await);
}
