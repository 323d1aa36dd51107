//! Remote operations in cluster mode, over real sockets: one real
//! `redis-server`, three compiled gateway processes sharing it (`gw-a`,
//! `gw-b`, `gw-c`), real commands. What an operator sees: a job started on
//! one instance is listed, read, followed (SSE with `Last-Event-ID`) and
//! cancelled from the others; locks and `max_concurrent` hold for the
//! cluster; a schedule runs once per tick; without Redis remote operations
//! answer 503 while devices are still served; every audit line names its
//! instance; Redis holds nothing readable and nothing without a TTL.

use crate::support::cluster::*;
use crate::support::commands::{audit_lines, no_process_with, process_appears, ALICE};
use crate::support::*;
use http_body_util::BodyExt;
use serde_json::Value;
use std::path::Path;
use std::time::Duration;

/// The `[commands]` of every node: `dir` is the node's own directory.
pub(crate) fn commands_toml(dir: &Path, extra: &str) -> String {
    format!(
        r#"
[[operators]]
name = "alice"
token = "{ALICE}"

[commands]
state_dir = "{state}"
audit_log = "{audit}"
sync_wait = "0s"
kill_grace = "1s"
env = ["PATH"]
redact = ["password"]
{extra}
"#,
        state = dir.join("state").display(),
        audit = dir.join("audit.jsonl").display(),
    )
}

/// A Redis, a backend, and three nodes of cluster `name` on them with
/// `extra` in every `[commands]`.
async fn three(name: &str, extra: &str) -> (RedisServer, Backend, [Node; 3]) {
    let redis = RedisServer::start().await;
    let backend = Backend::start().await;
    let cfg = GatewayConfig::new(backend.url());
    let lines = ["timeout = \"300ms\""];
    let local = |dir: &Path| commands_toml(dir, extra);
    let url = redis.acl_url(name).await;
    let (a, b, c) = tokio::join!(
        Node::spawn_with(&cfg, &url, name, "gw-a", &lines, local),
        Node::spawn_with(&cfg, &url, name, "gw-b", &lines, local),
        Node::spawn_with(&cfg, &url, name, "gw-c", &lines, local),
    );
    for n in [&a, &b, &c] {
        n.wait_metric("portcullis_cluster_up", 1.0).await;
    }
    (redis, backend, [a, b, c])
}

/// A request to `/__manage__…` on `node` as alice.
pub(crate) fn op(node: &Node, method: &str, path: &str) -> Req {
    Req::new(node.addr, method, path).header("authorization", &format!("Bearer {ALICE}"))
}

/// `POST /__manage__/<cmd>` with `body` on `node`.
pub(crate) async fn run(node: &Node, cmd: &str, body: &str) -> Resp {
    op(node, "POST", &format!("/__manage__/{cmd}"))
        .body(body.to_owned())
        .send()
        .await
}

/// The status record of job `id` as `node` shows it.
pub(crate) async fn status(node: &Node, id: &str) -> Value {
    let r = op(node, "GET", &format!("/__manage__/jobs/{id}"))
        .send()
        .await;
    assert_eq!(r.status, 200, "{}: {}", node.instance, r.text());
    r.json()
}

/// Waits (at most `secs`) until `node` shows job `id` as ended.
pub(crate) async fn ended(node: &Node, id: &str, secs: u64) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        let rec = status(node, id).await;
        if !matches!(rec["status"].as_str(), Some("queued" | "running")) {
            return rec;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "job {id} still {} on {}",
            rec["status"],
            node.instance
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The id of a 202 answer.
pub(crate) fn accepted(r: &Resp) -> String {
    assert_eq!(r.status, 202, "{}", r.text());
    r.json()["id"].as_str().expect("job id").to_owned()
}

/// The `(id, data)` events of an SSE text, and whether it ended.
pub(crate) fn events(text: &str) -> (Vec<(u64, String)>, bool) {
    let mut out = Vec::new();
    for block in text.split("\n\n") {
        let mut id = None;
        let mut data = Vec::new();
        for line in block.lines() {
            if let Some(v) = line.strip_prefix("id: ") {
                id = v.parse::<u64>().ok();
            } else if let Some(v) = line.strip_prefix("data: ") {
                data.push(v);
            }
        }
        if let Some(id) = id {
            out.push((id, data.join("\n")));
        }
    }
    (out, text.contains("event: end"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_started_on_one_instance_is_followed_and_cancelled_on_the_others() {
    let extra = r#"
[commands.rules.count]
options = { password = "string" }
[[commands.custom]]
name = "count"
argv = ["sh", "-c", 'for i in 1 2 3 4 5 6; do echo "OUTPUT-MARK-$i"; sleep 0.3; done']
[[commands.custom]]
name = "hang"
argv = ["sh", "-c", "sleep 41.17 & sleep 41.18; wait"]
[[commands.custom]]
name = "report"
argv = ["sh", "-c", "sleep 0.5; echo REPORT-MARK"]
"#;
    let extra = format!("metadata_only = [\"report\"]\n{extra}");
    let (redis, _backend, [a, b, c]) = three("ops", &extra).await;

    // Started on A, with an argument marked secret.
    let r = run(&a, "count", r#"{"data": {"password": "ARG-SECRET-77"}}"#).await;
    let id = accepted(&r);
    let rec = status(&b, &id).await;
    assert_eq!(rec["command"], "count");
    assert_eq!(rec["instance"], "gw-a");
    assert!(
        matches!(rec["status"].as_str(), Some("running" | "queued")),
        "{rec}"
    );
    assert_eq!(rec["args"]["password"], "***", "{rec}");

    // Followed live on B: read the first event, drop the stream, resume
    // from its id on B with Last-Event-ID.
    let resp = op(&b, "GET", &format!("/__manage__/jobs/{id}/output"))
        .header("accept", "text/event-stream")
        .send_streaming()
        .await;
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut body = resp.into_body();
    let mut first = String::new();
    while !first.contains("\n\n") {
        let frame = tokio::time::timeout(Duration::from_secs(10), body.frame())
            .await
            .expect("an event within 10 s")
            .expect("stream open")
            .expect("frame");
        if let Ok(data) = frame.into_data() {
            first.push_str(&String::from_utf8_lossy(&data));
        }
    }
    drop(body);
    let (seen, done) = events(&first);
    assert!(!done, "{first}");
    let (last_id, first_data) = seen.last().cloned().expect("an event");
    assert!(first_data.starts_with("OUTPUT-MARK-1"), "{first}");
    assert!(status(&c, &id).await["status"] == "running");
    let rest = op(&b, "GET", &format!("/__manage__/jobs/{id}/output"))
        .header("accept", "text/event-stream")
        .header("last-event-id", &last_id.to_string())
        .send()
        .await;
    let (more, done) = events(&rest.text());
    assert!(done, "{}", rest.text());
    assert!(
        rest.text().ends_with(
            "event: end\ndata: {\"exit_code\":0,\"reason\":null,\"status\":\"succeeded\"}\n\n"
        ),
        "{}",
        rest.text()
    );
    let mut all: String = seen.iter().map(|(_, d)| d.clone() + "\n").collect();
    for (_, d) in &more {
        all.push_str(d);
        all.push('\n');
    }
    let expected: String = (1..=6).map(|i| format!("OUTPUT-MARK-{i}\n")).collect();
    // Events split at line ends here; joined, they are the whole output.
    assert_eq!(
        all.replace("\n\n", "\n"),
        expected,
        "{first}{}",
        rest.text()
    );
    let ids: Vec<u64> = seen.iter().chain(&more).map(|(i, _)| *i).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    assert_eq!(*ids.last().unwrap(), expected.len() as u64);

    // The same status everywhere, and in C's listing.
    let done_a = ended(&a, &id, 10).await;
    let done_c = ended(&c, &id, 10).await;
    assert_eq!(done_a["status"], "succeeded");
    assert_eq!(done_c["status"], "succeeded");
    assert_eq!(done_c["output_bytes"], expected.len());
    let plain = op(&c, "GET", &format!("/__manage__/jobs/{id}/output"))
        .send()
        .await;
    assert_eq!(plain.text(), expected);

    // Started on A, cancelled on C: the whole process group goes.
    let h = accepted(&run(&a, "hang", "").await);
    assert!(process_appears("sleep 41.17").await);
    let listed = op(&c, "GET", "/__manage__/jobs?command=hang").send().await;
    assert_eq!(listed.status, 200, "{}", listed.text());
    assert_eq!(listed.json()["jobs"][0]["id"], h.as_str());
    assert_eq!(listed.json()["jobs"][0]["status"], "running");
    let all_jobs = op(&b, "GET", "/__manage__/jobs").send().await.json();
    let listed_ids: Vec<&str> = all_jobs["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_str().unwrap())
        .collect();
    assert_eq!(listed_ids, [h.as_str(), id.as_str()], "newest first");
    let older = op(&b, "GET", &format!("/__manage__/jobs?before={h}"))
        .send()
        .await
        .json();
    assert_eq!(older["jobs"][0]["id"], id.as_str());
    let first_page = op(&c, "GET", "/__manage__/jobs?limit=1")
        .send()
        .await
        .json();
    assert_eq!(first_page["jobs"].as_array().unwrap().len(), 1);
    assert_eq!(first_page["next"], h.as_str(), "{first_page}");
    let running = op(&c, "GET", "/__manage__/jobs?status=running&operator=alice")
        .send()
        .await
        .json();
    assert_eq!(running["jobs"].as_array().unwrap().len(), 1, "{running}");
    let cancel = op(&c, "POST", &format!("/__manage__/jobs/{h}/cancel"))
        .send()
        .await;
    assert_eq!(cancel.status, 202, "{}", cancel.text());
    let rec = ended(&b, &h, 10).await;
    assert_eq!(rec["status"], "cancelled", "{rec}");
    assert_eq!(rec["reason"], "cancelled by alice");
    assert!(no_process_with("sleep 41.17").await);
    assert!(no_process_with("sleep 41.18").await);
    let again = op(&b, "POST", &format!("/__manage__/jobs/{h}/cancel"))
        .send()
        .await;
    assert_eq!(again.status, 409, "{}", again.text());

    // Every audit line names its instance; C audited the cancel it took.
    for node in [&a, &b, &c] {
        let lines = audit_lines(&node.dir().join("audit.jsonl"));
        for l in &lines {
            assert_eq!(l["instance"], node.instance.as_str(), "{l}");
        }
        let text = std::fs::read_to_string(node.dir().join("audit.jsonl")).unwrap_or_default();
        assert!(!text.contains("ARG-SECRET-77"));
    }
    let c_lines = audit_lines(&c.dir().join("audit.jsonl"));
    assert!(
        c_lines
            .iter()
            .any(|l| l["event"] == "cancel_requested" && l["job_id"] == h.as_str()),
        "{c_lines:?}"
    );
    let a_lines = audit_lines(&a.dir().join("audit.jsonl"));
    assert_eq!(
        a_lines.iter().filter(|l| l["event"] == "finished").count(),
        2,
        "{a_lines:?}"
    );

    // A metadata-only run on C, followed on A: the placeholder, then its end.
    let m = accepted(&run(&c, "report", "").await);
    let events_text = op(&a, "GET", &format!("/__manage__/jobs/{m}/output"))
        .header("accept", "text/event-stream")
        .send()
        .await
        .text();
    assert!(
        events_text.starts_with("id: 0\ndata: (metadata-only mode, no output captured)\n\n"),
        "{events_text}"
    );
    assert!(events_text.contains("event: end"), "{events_text}");
    assert!(!events_text.contains("REPORT-MARK"));
    let m_rec = status(&b, &m).await;
    assert_eq!(m_rec["status"], "succeeded");
    assert_eq!(m_rec["metadata_only"], true);

    // Redis: only this cluster's keys, nothing readable, everything expires.
    let dump = redis.dump().await;
    assert!(dump.iter().any(|(k, _)| k.contains(&format!("job:{id}"))));
    assert!(dump.iter().any(|(k, _)| k.contains(&format!("out:{id}"))));
    assert!(
        !dump.iter().any(|(k, _)| k.contains(&format!("out:{m}"))),
        "output of a metadata-only run reached Redis"
    );
    assert_sealed_and_expiring(
        &redis,
        "portcullis:ops:",
        &[
            "OUTPUT-MARK",
            "ARG-SECRET-77",
            ALICE,
            "alice",
            "count",
            "hang",
            "REPORT-MARK",
        ],
    )
    .await;
}

/// Every key in `redis` is under `prefix`, holds none of `secrets` in its
/// name or readable in its value, and expires.
pub(crate) async fn assert_sealed_and_expiring(
    redis: &RedisServer,
    prefix: &str,
    secrets: &[&str],
) {
    let dump = redis.dump().await;
    for (key, value) in &dump {
        assert!(key.starts_with(prefix), "{key}");
        for secret in secrets {
            assert!(!key.contains(secret), "{key}");
            assert!(
                !value.windows(secret.len()).any(|w| w == secret.as_bytes()),
                "{key} holds {secret:?}"
            );
        }
    }
    let mut conn = redis.connection().await;
    for (key, _) in &dump {
        let ttl: i64 = redis::cmd("PTTL")
            .arg(key)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(ttl > 0, "{key} never expires ({ttl})");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locks_and_run_slots_hold_for_the_whole_cluster() {
    let extra = r#"
max_concurrent = 1
max_queued = 1
[commands.rules.mig]
lock = "schema"
[commands.rules.mig2]
lock = "schema"
[[commands.custom]]
name = "mig"
argv = ["sleep", "1.43"]
[[commands.custom]]
name = "mig2"
argv = ["true"]
[[commands.custom]]
name = "nap"
argv = ["sleep", "0.61"]
"#;
    let (redis, _backend, [a, b, c]) = three("locks", extra).await;

    let m = accepted(&run(&a, "mig", "").await);
    let second = run(&b, "mig", "").await;
    assert_eq!(second.status, 409, "{}", second.text());
    second.assert_envelope(409);
    assert!(second.text().contains(&m), "{}", second.text());
    let other = run(&c, "mig2", "").await;
    assert_eq!(other.status, 409, "{}", other.text());
    // One running (mig, on A), one may wait: a nap on B is queued, a third
    // run anywhere is over capacity.
    let queued = accepted(&run(&b, "nap", "").await);
    assert_eq!(status(&c, &queued).await["status"], "queued");
    let third = run(&c, "nap", "").await;
    assert_eq!(third.status, 429, "{}", third.text());
    assert_eq!(third.headers["retry-after"], "1");
    let b_lines = audit_lines(&b.dir().join("audit.jsonl"));
    assert!(b_lines
        .iter()
        .any(|l| l["event"] == "rejected" && l["http_status"] == 409));

    // The lock is in Redis under a keyed hash of its name.
    let keys: Vec<String> = redis.dump().await.into_iter().map(|(k, _)| k).collect();
    assert!(keys.iter().any(|k| k.contains(":lock:")), "{keys:?}");
    assert!(
        keys.iter()
            .all(|k| !k.contains("schema") && !k.contains("mig")),
        "{keys:?}"
    );
    assert_eq!(ended(&c, &m, 10).await["status"], "succeeded");
    // The lock is free once the holder ended, on every instance.
    let after = run(&c, "mig2", "").await;
    let after_id = accepted(&after);
    let rec = ended(&a, &queued, 10).await;
    assert_eq!(rec["status"], "succeeded", "{rec}");
    assert_eq!(ended(&b, &after_id, 10).await["status"], "succeeded");
    // Never two at once: the queued nap started after mig ended.
    let mig = status(&b, &m).await;
    assert!(
        rec["started_at"].as_str().unwrap() >= mig["finished_at"].as_str().unwrap(),
        "{rec} {mig}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_schedule_tick_runs_once_in_the_cluster() {
    let shared = tempfile::tempdir().unwrap();
    let ticks = shared.path().join("ticks");
    let extra = format!(
        r#"
[[commands.custom]]
name = "tick"
argv = ["sh", "-c", "date +%s >> {ticks}"]
[[commands.schedules]]
command = "tick"
cron = "* * * * * *"
[[commands.custom]]
name = "slow"
argv = ["sleep", "1.6"]
[[commands.schedules]]
command = "slow"
cron = "* * * * * *"
"#,
        ticks = ticks.display()
    );
    let (redis, _backend, nodes) = three("sched", &extra).await;
    tokio::time::sleep(Duration::from_millis(4500)).await;
    let keys: Vec<String> = redis.dump().await.into_iter().map(|(k, _)| k).collect();
    assert!(keys.iter().any(|k| k.contains(":sched:")), "{keys:?}");
    assert!(keys.iter().all(|k| !k.contains("tick")), "{keys:?}");
    // Each run's accepted line, from every instance: the second it was
    // accepted in (the tick it ran for).
    let mut ticks_seen = Vec::new();
    let mut slow = Vec::new();
    for n in &nodes {
        let all = audit_lines(&n.dir().join("audit.jsonl"));
        assert!(all.iter().all(|l| l["operator"] == "scheduler"), "{all:?}");
        let (lines, others): (Vec<Value>, Vec<Value>) =
            all.into_iter().partition(|l| l["command"] == "tick");
        slow.extend(others);
        assert!(lines.iter().all(|l| l["event"] != "rejected"), "{lines:?}");
        for l in lines.iter().filter(|l| l["event"] == "accepted") {
            let time = l["time"].as_str().unwrap();
            ticks_seen.push(time.get(..19).unwrap().to_owned());
        }
    }
    assert!(ticks_seen.len() >= 3, "{ticks_seen:?}");
    let mut sorted = ticks_seen.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(
        sorted.len(),
        ticks_seen.len(),
        "a tick ran twice: {ticks_seen:?}"
    );
    // None missed between the first and the last run seen.
    let secs: Vec<i64> = sorted
        .iter()
        .map(|t| {
            humantime::parse_rfc3339(&format!("{t}Z"))
                .unwrap()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs() as i64
        })
        .collect();
    assert_eq!(
        (secs[secs.len() - 1] - secs[0] + 1) as usize,
        secs.len(),
        "a tick was missed: {sorted:?}"
    );
    // A run of 1.6 s every second: the ticks during a run, wherever it
    // runs, are skipped and audited; never two at once in the cluster.
    assert!(
        slow.iter()
            .any(|l| l["event"] == "rejected"
                && l["reason"].as_str().unwrap().contains("still running")),
        "{slow:?}"
    );
    let mut changes: Vec<(String, i32)> = slow
        .iter()
        .filter_map(|l| match l["event"].as_str() {
            Some("accepted") => Some((l["time"].as_str().unwrap().to_owned(), 1)),
            Some("finished") => Some((l["time"].as_str().unwrap().to_owned(), -1)),
            _ => None,
        })
        .collect();
    changes.sort();
    let mut running = 0;
    for (time, change) in &changes {
        running += change;
        assert!(
            running <= 1,
            "two scheduled runs at once at {time}: {slow:?}"
        );
    }
    // Every accepted run ran (the last one may still be writing).
    let ran = std::fs::read_to_string(&ticks)
        .unwrap_or_default()
        .lines()
        .count();
    assert!(
        ran + 1 >= ticks_seen.len() && ran <= ticks_seen.len(),
        "{ran} ran, {} accepted",
        ticks_seen.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_redis_remote_operations_answer_503_and_devices_are_served() {
    let extra = r#"
[[commands.custom]]
name = "hello"
argv = ["echo", "hello"]
"#;
    let (mut redis, backend, [a, b, _c]) = three("down", extra).await;
    backend.on("/status", Reply::json(200, serde_json::json!({"ok": true})));
    let id = accepted(&run(&a, "hello", "").await);
    assert_eq!(ended(&b, &id, 10).await["status"], "succeeded");

    redis.pause();
    let started = std::time::Instant::now();
    let r = run(&b, "hello", "").await;
    assert_eq!(r.status, 503, "{}", r.text());
    r.assert_envelope(503);
    let seen = op(&b, "GET", &format!("/__manage__/jobs/{id}"))
        .send()
        .await;
    assert_eq!(seen.status, 503, "{}", seen.text());
    let listed = op(&b, "GET", "/__manage__/jobs").send().await;
    assert_eq!(listed.status, 503, "{}", listed.text());
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "answers waited for Redis: {:?}",
        started.elapsed()
    );
    // Devices are still served, on every instance.
    for node in [&a, &b] {
        let r = node.req("GET", "/api/status").send().await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    // Nothing ran: B refused before its accepted line.
    let b_lines = audit_lines(&b.dir().join("audit.jsonl"));
    assert!(
        b_lines.iter().all(|l| l["event"] != "accepted"),
        "{b_lines:?}"
    );
    assert!(b_lines
        .iter()
        .any(|l| l["event"] == "rejected" && l["http_status"] == 503));

    redis.resume();
    b.wait_metric("portcullis_cluster_up", 1.0).await;
    let id2 = accepted(&run(&b, "hello", "").await);
    assert_eq!(ended(&a, &id2, 10).await["status"], "succeeded");

    // Redis stopped (connections refused): the same.
    redis.stop();
    b.wait_metric("portcullis_cluster_up", 0.0).await;
    let r = run(&b, "hello", "").await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.headers["retry-after"], "1");
    // A's job is not readable on B; B's own job is, from its job store.
    let seen = op(&b, "GET", &format!("/__manage__/jobs/{id}"))
        .send()
        .await;
    assert_eq!(seen.status, 503, "{}", seen.text());
    assert_eq!(status(&b, &id2).await["status"], "succeeded");
    assert_eq!(a.req("GET", "/api/status").send().await.status, 200);
    redis.restart().await;
    a.wait_metric("portcullis_cluster_up", 1.0).await;
    let id3 = accepted(&run(&a, "hello", "").await);
    assert_eq!(ended(&b, &id3, 10).await["status"], "succeeded");
}

#[test]
fn check_accepts_local_commands_and_runners_in_a_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = format!(
        "\n[cluster]\nredis = \"redis://127.0.0.1:6379/0\"\nname = \"prod\"\nsecret = \"{CLUSTER_SECRET}\"\ninstance = \"gw-1\"\n"
    );
    let write = |commands: &str, tail: &str| {
        let text = format!(
            "{}{tail}{cluster}",
            crate::support::commands::config_text(dir.path(), commands)
        );
        let path = dir.path().join("portcullis.toml");
        std::fs::write(&path, text).unwrap();
        std::process::Command::new(BIN)
            .args(["check", "--config"])
            .arg(&path)
            .output()
            .unwrap()
    };
    let local = write(
        "[[commands.custom]]\nname = \"echo\"\nargv = [\"echo\"]\n",
        "",
    );
    assert!(
        local.status.success(),
        "{}",
        String::from_utf8_lossy(&local.stderr)
    );
    let runner = "\n[[runners]]\nname = \"web-1\"\ntoken = \"sha256:0000000000000000000000000000000000000000000000000000000000000000\"\ngroups = [\"web\"]\n";
    let runners = write("execute = \"runners\"\nallow = [\"echo\"]\n", runner);
    let stderr = String::from_utf8_lossy(&runners.stderr);
    assert!(runners.status.success(), "{stderr}");
    assert!(!stderr.contains(CLUSTER_SECRET), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_instance_leaves_its_jobs_lost_and_its_lock_free() {
    let extra = r#"
[commands.rules.hold]
lock = "deploy"
[commands.rules.after]
lock = "deploy"
[[commands.custom]]
name = "hold"
argv = ["sh", "-c", "echo $$; exec sleep 44.71"]
[[commands.custom]]
name = "after"
argv = ["echo", "free"]
"#;
    let (_redis, _backend, [mut a, b, c]) = three("dies", extra).await;
    let id = accepted(&run(&a, "hold", "").await);
    // The job's process group, from its first output line (read on B).
    let resp = op(&b, "GET", &format!("/__manage__/jobs/{id}/output"))
        .send_streaming()
        .await;
    let mut body = resp.into_body();
    let frame = tokio::time::timeout(Duration::from_secs(10), body.frame())
        .await
        .expect("output within 10 s")
        .expect("stream open")
        .expect("frame")
        .into_data()
        .expect("data");
    drop(body);
    let pgid: u32 = String::from_utf8_lossy(&frame).trim().parse().expect("pid");
    /// Kills what the dead instance left behind (its own process group).
    struct Reap(u32);
    impl Drop for Reap {
        fn drop(&mut self) {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", self.0)])
                .status();
        }
    }
    let _reap = Reap(pgid);
    assert_eq!(run(&b, "after", "").await.status, 409);

    // A dies without a word: its lease lapses within 15 s.
    a.kill();
    let started = std::time::Instant::now();
    let lost = loop {
        let rec = status(&c, &id).await;
        if rec["status"] != "running" {
            break rec;
        }
        assert!(
            started.elapsed() < Duration::from_secs(25),
            "still running after {:?}",
            started.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert_eq!(lost["status"], "lost", "{lost}");
    assert!(lost["reason"].as_str().unwrap().contains("gw-a"), "{lost}");
    assert_eq!(status(&b, &id).await["status"], "lost");
    let cancel = op(&b, "POST", &format!("/__manage__/jobs/{id}/cancel"))
        .send()
        .await;
    assert_eq!(cancel.status, 409, "{}", cancel.text());
    // The lock went with the lease.
    let r = run(&b, "after", "").await;
    let after = accepted(&r);
    assert_eq!(ended(&c, &after, 10).await["status"], "succeeded");
    let listed = op(&c, "GET", "/__manage__/jobs?status=lost")
        .send()
        .await
        .json();
    assert_eq!(listed["jobs"][0]["id"], id.as_str(), "{listed}");

    // A starts again: it kills what its run left, marks it failed in its
    // own audit log and store, and tells the cluster.
    a.restart().await;
    assert!(no_process_with("sleep 44.71").await);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let rec = loop {
        let rec = status(&b, &id).await;
        if rec["status"] != "lost" || tokio::time::Instant::now() > deadline {
            break rec;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(rec["status"], "failed", "{rec}");
    assert_eq!(rec["reason"], "gateway restarted");
    let a_lines = audit_lines(&a.dir().join("audit.jsonl"));
    let last = a_lines.last().unwrap();
    assert_eq!(last["event"], "finished");
    assert_eq!(last["job_id"], id.as_str());
    assert_eq!(last["instance"], "gw-a");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restarted_empty_gets_running_jobs_and_their_locks_back() {
    let extra = r#"
[commands.rules.mig]
lock = "schema"
[[commands.custom]]
name = "mig"
argv = ["sleep", "7.93"]
"#;
    let (mut redis, _backend, [a, b, c]) = three("empty", extra).await;
    let id = accepted(&run(&a, "mig", "").await);
    assert_eq!(run(&b, "mig", "").await.status, 409);

    redis.restart().await;
    for n in [&a, &b, &c] {
        n.wait_metric("portcullis_cluster_up", 1.0).await;
    }
    // Within one renewal (5 s) the record and the lock are back.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(7);
    loop {
        let r = op(&b, "GET", &format!("/__manage__/jobs/{id}"))
            .send()
            .await;
        if r.status == 200 {
            assert_eq!(r.json()["status"], "running", "{}", r.text());
            break;
        }
        assert_eq!(r.status, 404, "{}", r.text());
        assert!(
            tokio::time::Instant::now() < deadline,
            "the record did not come back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let second = run(&c, "mig", "").await;
    assert_eq!(second.status, 409, "{}", second.text());
    assert!(second.text().contains(&id), "{}", second.text());
    assert_eq!(ended(&b, &id, 10).await["status"], "succeeded");
}
