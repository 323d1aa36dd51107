//! Runners in cluster mode, over real sockets: one real `redis-server`, two
//! compiled gateway processes sharing it (`gw-a`, `gw-b`), real
//! `portcullis runner` processes dialling one instance or the other, and raw
//! `/__runner__/` requests spread over both, as a load balancer would.
//! What an operator sees: a job accepted on one instance runs on a runner
//! polling the other, is followed and cancelled from either; runners are
//! listed on both; a killed runner's job is `lost` once for the cluster; a
//! lock holds across instances; without Redis runner requests answer 503;
//! a restarted owner and a Redis restarted empty do not lose a running job.

use crate::cluster_ops::{accepted, commands_toml, ended, events, op, run, status};
use crate::support::cluster::*;
use crate::support::commands::{audit_lines, django_available, fixture, listed_command};
use crate::support::runners::{pid_alive, signal, sorted_lines, spawn_runner, wait_pid};
use crate::support::*;
use http_body_util::BodyExt;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A Redis, a backend and two nodes of cluster `name` with
/// `execute = "runners"` (`lease`), `commands` in their `[commands]` and
/// `runners` (name, token, group) as their `[[runners]]`.
async fn two(
    name: &str,
    lease: &str,
    commands: &str,
    runners: &[(&str, &str, &str)],
) -> (RedisServer, Backend, [Node; 2]) {
    let redis = RedisServer::start().await;
    let backend = Backend::start().await;
    let cfg = GatewayConfig::new(backend.url());
    let lines = ["timeout = \"300ms\""];
    let mut table = String::new();
    for (name, token, group) in runners {
        table.push_str(&format!(
            "\n[[runners]]\nname = \"{name}\"\ntoken = \"sha256:{}\"\ngroups = [\"{group}\"]\n",
            sha256_hex(token.as_bytes())
        ));
    }
    let extra = format!("execute = \"runners\"\nlease = \"{lease}\"\n{commands}\n");
    let local = |dir: &Path| commands_toml(dir, &extra) + &table;
    let url = redis.acl_url(name).await;
    let (a, b) = tokio::join!(
        Node::spawn_with(&cfg, &url, name, "gw-a", &lines, local),
        Node::spawn_with(&cfg, &url, name, "gw-b", &lines, local),
    );
    for n in [&a, &b] {
        n.wait_metric("portcullis_cluster_up", 1.0).await;
    }
    (redis, backend, [a, b])
}

/// Starts `portcullis runner` dialling `node` over plain HTTP (loopback),
/// with `commands` as the body of its `[commands]`; its config in `dir`.
fn start_runner(dir: &Path, node: &Node, runner: (&str, &str, &str), commands: &str) -> ChildGuard {
    let path = dir.join(format!("{}.toml", runner.0));
    spawn_runner(
        &path,
        &format!("gateway = \"http://{}\"", node.addr),
        runner,
        commands,
    )
}

/// A runner's `[commands]` body: only `scripts` (name, `sh -c` script), as
/// custom commands.
fn scripts(scripts: &[(&str, &str)]) -> String {
    let mut out = String::from("allow = []\n");
    for (name, script) in scripts {
        out.push_str(&format!(
            "[[commands.custom]]\nname = \"{name}\"\nargv = [\"sh\", \"-c\", {script:?}]\n"
        ));
    }
    out
}

/// The entry of `command` in `GET /__manage__/` on `node`.
async fn menu_entry(node: &Node, command: &str) -> Value {
    listed_command(
        &op(node, "GET", "/__manage__/").send().await.json(),
        command,
    )
}

/// `GET /__manage__/runners` on `node`: the entry of runner `name`.
async fn listed(node: &Node, name: &str) -> Value {
    let r = op(node, "GET", "/__manage__/runners").send().await;
    assert_eq!(r.status, 200, "{}: {}", node.instance, r.text());
    r.json()["runners"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|r| r["name"] == name)
        .cloned()
        .unwrap_or(Value::Null)
}

/// Waits (at most 15 s) until every node lists `names` as connected.
async fn wait_connected(nodes: &[&Node], names: &[&str]) {
    for node in nodes {
        for name in names {
            let mut up = false;
            for _ in 0..300 {
                if listed(node, name).await["connected"] == true {
                    up = true;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            assert!(up, "{}: runner {name} not connected", node.instance);
        }
    }
}

/// The audit lines of `node` about job `id` with `event` and `status`.
fn audited(node: &Node, id: &str, event: &str, status: &str) -> usize {
    audit_lines(&node.dir().join("audit.jsonl"))
        .iter()
        .filter(|l| l["job_id"] == id && l["event"] == event && l["status"] == status)
        .count()
}

/// Reads `node`'s SSE output of job `id` (from `last_id` when given) until
/// its text contains `needle`; the events read.
async fn follow_until(
    node: &Node,
    id: &str,
    last_id: Option<u64>,
    needle: &str,
) -> Vec<(u64, String)> {
    let mut req = op(node, "GET", &format!("/__manage__/jobs/{id}/output"))
        .header("accept", "text/event-stream");
    if let Some(l) = last_id {
        req = req.header("last-event-id", &l.to_string());
    }
    let resp = req.send_streaming().await;
    assert_eq!(resp.status(), 200, "{}", node.instance);
    let mut body = resp.into_body();
    let mut text = String::new();
    while !text.contains(needle) {
        let frame = tokio::time::timeout(Duration::from_secs(10), body.frame())
            .await
            .unwrap_or_else(|_| panic!("{}: no {needle:?} within 10 s: {text}", node.instance))
            .expect("stream open")
            .expect("frame");
        if let Ok(d) = frame.into_data() {
            text.push_str(&String::from_utf8_lossy(&d));
        }
    }
    events(&text).0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runner_polling_one_instance_runs_jobs_accepted_on_the_other() {
    let gateway = "allow = [\"hello\", \"slow\"]\n[commands.rules.hello]\ngroup = \"web\"\n[commands.rules.slow]\ngroup = \"web\"\nlock = \"deploy\"";
    let web = ("web-1", "tok-web-1", "web");
    let (_redis, _backend, [a, b]) = two("run1", "2s", gateway, &[web]).await;
    let files = tempfile::tempdir().unwrap();
    let (pidfile, childfile) = (files.path().join("pid"), files.path().join("child"));
    let slow = format!(
        "echo first-mark; sleep 0.5; echo second-mark; sleep 60 & echo $! > {}; echo $$ > {}; wait",
        childfile.display(),
        pidfile.display()
    );
    let runner_cmds = scripts(&[
        ("hello", "echo hello from the backend host"),
        ("slow", &slow),
    ]);
    let _runner = start_runner(files.path(), &a, web, &runner_cmds);
    // Listed on both instances, though it polls only A.
    wait_connected(&[&a, &b], &["web-1"]).await;
    let on_b = listed(&b, "web-1").await;
    assert_eq!(on_b["groups"], json!(["web"]), "{on_b}");
    assert!(
        on_b["version"].is_string() && on_b["last_seen"].is_string(),
        "{on_b}"
    );
    // B lists what the runner described to A.
    let hello = menu_entry(&b, "hello").await;
    assert_eq!(hello["runners"], json!(["web-1"]), "{hello}");

    // Accepted on B, run by the runner polling A; the same record on both.
    let id = accepted(&run(&b, "hello", "{}").await);
    for node in [&a, &b] {
        let rec = ended(node, &id, 15).await;
        assert_eq!(rec["status"], "succeeded", "{rec}");
        assert_eq!(rec["runner"], "web-1");
        assert_eq!(rec["instance"], "gw-b");
        let out = op(node, "GET", &format!("/__manage__/jobs/{id}/output"))
            .send()
            .await;
        assert_eq!(out.text(), "hello from the backend host\n");
    }

    // A long job accepted on B: followed live on A, resumed on B with
    // Last-Event-ID, its lock held for the cluster, cancelled from A.
    let id = accepted(&run(&b, "slow", "{}").await);
    let first = follow_until(&a, &id, None, "first-mark").await;
    let (last_id, data) = first.last().cloned().expect("an event");
    assert!(data.starts_with("first-mark"), "{first:?}");
    let rest = follow_until(&b, &id, Some(last_id), "second-mark").await;
    assert!(rest.iter().all(|(i, _)| *i > last_id), "{rest:?}");
    assert!(
        rest.iter().any(|(_, d)| d.contains("second-mark")),
        "{rest:?}"
    );
    let conflict = run(&a, "slow", "{}").await;
    assert_eq!(conflict.status, 409, "{}", conflict.text());
    assert!(conflict.text().contains(&id), "{}", conflict.text());
    assert_eq!(listed(&a, "web-1").await["running_jobs"], json!([id]));
    let (pid, child) = (wait_pid(&pidfile).await, wait_pid(&childfile).await);
    assert!(pid_alive(pid) && pid_alive(child));
    let c = op(&a, "POST", &format!("/__manage__/jobs/{id}/cancel"))
        .send()
        .await;
    assert!((200..300).contains(&c.status), "{}", c.text());
    for node in [&a, &b] {
        let rec = ended(node, &id, 15).await;
        assert_eq!(rec["status"], "cancelled", "{rec}");
    }
    assert!(!pid_alive(pid), "the process survived the cancel");
    assert!(!pid_alive(child), "its child survived the cancel");
    // The lock is free again, for either instance.
    let next = accepted(&run(&a, "slow", "{}").await);
    let c = op(&b, "POST", &format!("/__manage__/jobs/{next}/cancel"))
        .send()
        .await;
    assert!((200..300).contains(&c.status), "{}", c.text());
    assert_eq!(ended(&a, &next, 15).await["status"], "cancelled");

    // The owner audited the run, naming itself; the other did not.
    assert_eq!(audited(&b, &id, "accepted", "accepted"), 1);
    assert_eq!(audited(&b, &id, "finished", "cancelled"), 1);
    assert_eq!(audited(&a, &id, "finished", "cancelled"), 0);
    for node in [&a, &b] {
        for l in audit_lines(&node.dir().join("audit.jsonl")) {
            assert_eq!(l["instance"], node.instance.as_str(), "{l}");
        }
    }
}

/// A raw runner request to `node` with runner token `token`.
fn raw(node: &Node, token: &str, path: &str, body: &str) -> Req {
    Req::new(node.addr, "POST", path)
        .header("authorization", &format!("Bearer {token}"))
        .body(body.to_owned())
}

/// A raw output chunk at `offset` of job `id`.
async fn chunk(node: &Node, token: &str, id: &str, offset: u64, text: &str) -> Resp {
    raw(node, token, &format!("/__runner__/jobs/{id}/output"), text)
        .header("x-portcullis-offset", &offset.to_string())
        .send()
        .await
}

/// A raw poll (held up to half the lease) with `described`; its answer.
async fn poll(node: &Node, token: &str, described: &str) -> Value {
    let body = json!({"version": "raw", "described": described}).to_string();
    let r = raw(node, token, "/__runner__/poll", &body).send().await;
    assert_eq!(r.status, 200, "{}: {}", node.instance, r.text());
    r.json()
}

/// Polls `node` until the answer carries a job or a cancel (at most 10 s).
async fn poll_work(node: &Node, token: &str, described: &str) -> Value {
    for _ in 0..20 {
        let v = poll(node, token, described).await;
        let empty = |k: &str| v[k].as_array().map_or(true, Vec::is_empty);
        if !empty("jobs") || !empty("cancel") {
            return v;
        }
    }
    panic!("{}: no work for the runner", node.instance);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runner_requests_may_land_on_either_instance() {
    let gateway = "allow = [\"hello\"]\n[commands.rules.hello]\ngroup = \"web\"";
    let (mut redis, _backend, [a, b]) =
        two("raw1", "2s", gateway, &[("raw-1", "tok-raw-1", "web")]).await;
    let tok = "tok-raw-1";
    // Described on A, polled on B: connected for the cluster.
    let description = r#"{"commands": {"hello": {"kind": "custom"}}}"#;
    let digest = sha256_hex(description.as_bytes());
    let stale = poll(&b, tok, "").await;
    assert_eq!(stale["describe"], true, "{stale}");
    let d = raw(&a, tok, "/__runner__/describe", description)
        .send()
        .await;
    assert_eq!(d.status, 200, "{}", d.text());
    assert_eq!(poll(&b, tok, &digest).await["jobs"], json!([]));
    wait_connected(&[&a, &b], &["raw-1"]).await;

    // Accepted on A, taken by a poll held on B.
    let held = {
        let b_addr = b.addr;
        let digest = digest.clone();
        tokio::spawn(async move {
            let body = json!({"version": "raw", "described": digest}).to_string();
            Req::new(b_addr, "POST", "/__runner__/poll")
                .header("authorization", "Bearer tok-raw-1")
                .body(body)
                .send()
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let id = accepted(&run(&a, "hello", "{}").await);
    let got = held.await.unwrap();
    let got = if got.json()["jobs"].as_array().is_some_and(|j| !j.is_empty()) {
        got.json()
    } else {
        poll_work(&b, tok, &digest).await
    };
    assert_eq!(got["jobs"][0]["id"], id.as_str(), "{got}");
    assert_eq!(got["jobs"][0]["command"], "hello", "{got}");
    // Delivered once: the next poll, on either instance, has nothing.
    assert_eq!(poll(&a, tok, &digest).await["jobs"], json!([]));

    // Output over both instances, offsets kept for the cluster: a retried
    // chunk gets 416 with the length, not a second copy.
    let r = chunk(&a, tok, &id, 0, "part one\n").await;
    assert_eq!((r.status, r.json()["length"].clone()), (200, json!(9)));
    let r = chunk(&b, tok, &id, 0, "part one\n").await;
    assert_eq!((r.status, r.json()["length"].clone()), (416, json!(9)));
    let r = chunk(&b, tok, &id, 9, "part two\n").await;
    assert_eq!((r.status, r.json()["length"].clone()), (200, json!(18)));
    let report = |sent: u64| {
        json!({"end": "exited", "raw": 0, "sent": sent, "output_bytes": sent}).to_string()
    };
    let fin = |node: &Node, sent: u64| {
        raw(
            node,
            tok,
            &format!("/__runner__/jobs/{id}/finish"),
            &report(sent),
        )
    };
    let r = fin(&a, 27).send().await;
    assert_eq!((r.status, r.json()["length"].clone()), (416, json!(18)));
    let r = fin(&b, 18).send().await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = chunk(&a, tok, &id, 18, "late\n").await;
    assert_eq!(r.status, 404, "{}", r.text());
    for node in [&a, &b] {
        let rec = ended(node, &id, 10).await;
        assert_eq!(rec["status"], "succeeded", "{rec}");
        assert_eq!(rec["runner"], "raw-1");
        assert_eq!(rec["output_bytes"], 18);
        let out = op(node, "GET", &format!("/__manage__/jobs/{id}/output"))
            .send()
            .await;
        assert_eq!(out.text(), "part one\npart two\n");
    }

    // Accepted on B, cancelled on A: the cancel reaches the runner's next
    // poll on B.
    let id = accepted(&run(&b, "hello", "{}").await);
    let got = poll_work(&a, tok, &digest).await;
    assert_eq!(got["jobs"][0]["id"], id.as_str(), "{got}");
    let c = op(&a, "POST", &format!("/__manage__/jobs/{id}/cancel"))
        .send()
        .await;
    assert!((200..300).contains(&c.status), "{}", c.text());
    let got = poll_work(&b, tok, &digest).await;
    assert_eq!(got["cancel"], json!([id]), "{got}");
    let cancelled =
        json!({"end": "cancelled", "reason": "cancelled by alice", "sent": 0}).to_string();
    let r = raw(
        &a,
        tok,
        &format!("/__runner__/jobs/{id}/finish"),
        &cancelled,
    )
    .send()
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(ended(&a, &id, 10).await["status"], "cancelled");

    // Redis: nothing readable (output, names, tokens), everything expires.
    crate::cluster_ops::assert_sealed_and_expiring(
        &redis,
        "portcullis:raw1:",
        &[
            "part one",
            "part two",
            "tok-raw-1",
            "raw-1",
            "hello",
            "alice",
        ],
    )
    .await;

    // Without Redis, runner requests are answered 503 (the runner backs
    // off and retries), and so is a run.
    redis.stop();
    a.wait_metric("portcullis_cluster_up", 0.0).await;
    let r = raw(&a, tok, "/__runner__/poll", "{}").send().await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(run(&a, "hello", "{}").await.status, 503);
    // A wrong token is still refused as such.
    let r = raw(&a, "nope", "/__runner__/poll", "{}").send().await;
    assert_eq!(r.status, 401, "{}", r.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runners_on_both_instances_share_the_work() {
    let gateway = "allow = [\"stamp\", \"hello\"]\n[commands.rules.stamp]\ntarget = \"all\"\ngroup = \"web\"\n[commands.rules.hello]\ngroup = \"web\"";
    let (w1, w2) = (("web-1", "tok-web-1", "web"), ("web-2", "tok-web-2", "web"));
    let (_redis, _backend, [a, b]) = two("share1", "2s", gateway, &[w1, w2]).await;
    let files = tempfile::tempdir().unwrap();
    let stamps = files.path().join("stamps");
    let cmds = |name: &str| {
        let stamp = format!("echo {name} >> {}", stamps.display());
        scripts(&[
            ("stamp", &stamp),
            ("hello", &format!("echo hello from {name}")),
        ])
    };
    let _r1 = start_runner(files.path(), &a, w1, &cmds("web-1"));
    let _r2 = start_runner(files.path(), &b, w2, &cmds("web-2"));
    wait_connected(&[&a, &b], &["web-1", "web-2"]).await;

    // target = "all" from A: once on each runner, whichever instance it polls.
    let r = run(&a, "stamp", "{}").await;
    assert_eq!(r.status, 202, "{}", r.text());
    let jobs = r.json()["jobs"].as_array().cloned().unwrap_or_default();
    assert_eq!(jobs.len(), 2, "{jobs:?}");
    let mut names = Vec::new();
    for j in &jobs {
        let rec = ended(&b, j["id"].as_str().unwrap_or_default(), 15).await;
        assert_eq!(rec["status"], "succeeded", "{rec}");
        names.push(rec["runner"].as_str().unwrap_or_default().to_owned());
    }
    names.sort();
    assert_eq!(names, ["web-1", "web-2"]);
    assert_eq!(sorted_lines(&stamps), ["web-1", "web-2"]);

    // One-runner jobs from both instances all run, each once, with its
    // runner's output.
    let mut ids = Vec::new();
    for node in [&a, &b, &a, &b] {
        ids.push(accepted(&run(node, "hello", "{}").await));
    }
    for id in &ids {
        let rec = ended(&a, id, 15).await;
        assert_eq!(rec["status"], "succeeded", "{rec}");
        let runner = rec["runner"].as_str().unwrap_or_default().to_owned();
        let out = op(&b, "GET", &format!("/__manage__/jobs/{id}/output"))
            .send()
            .await;
        assert_eq!(out.text(), format!("hello from {runner}\n"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_runner_s_job_is_lost_once_for_the_cluster() {
    let gateway = "allow = [\"sleepy\"]\n[commands.rules.sleepy]\ngroup = \"web\"";
    let web = ("web-1", "tok-web-1", "web");
    let (_redis, _backend, [a, b]) = two("lost1", "2s", gateway, &[web]).await;
    let files = tempfile::tempdir().unwrap();
    let (pidfile, runs) = (files.path().join("pid"), files.path().join("runs"));
    let runner = start_runner(
        files.path(),
        &a,
        web,
        &scripts(&[(
            "sleepy",
            &format!(
                "echo run >> {}; echo $$ > {}; exec sleep 60",
                runs.display(),
                pidfile.display()
            ),
        )]),
    );
    wait_connected(&[&a, &b], &["web-1"]).await;
    let id = accepted(&run(&b, "sleepy", "{}").await);
    let pid = wait_pid(&pidfile).await;
    assert_eq!(status(&a, &id).await["status"], "running");
    signal(runner.pid(), libc::SIGKILL);
    for node in [&a, &b] {
        let rec = ended(node, &id, 15).await;
        assert_eq!(rec["status"], "lost", "{}: {rec}", node.instance);
        assert!(
            rec["reason"].as_str().unwrap_or_default().contains("web-1"),
            "{rec}"
        );
    }
    // Declared once, by the instance that accepted it.
    assert_eq!(audited(&b, &id, "finished", "lost"), 1);
    assert_eq!(audited(&a, &id, "finished", "lost"), 0);
    // Disconnected on both; the next job is refused on both.
    for node in [&a, &b] {
        assert_eq!(listed(node, "web-1").await["connected"], false);
        let r = run(node, "sleepy", "{}").await;
        assert_eq!(r.status, 503, "{}: {}", node.instance, r.text());
    }
    // Never re-run: the orphaned process is the only run.
    signal(u32::try_from(pid).unwrap_or_default(), libc::SIGKILL);
    let lines = std::fs::read_to_string(&runs).unwrap_or_default();
    assert_eq!(lines.lines().count(), 1, "{lines}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn options_a_runner_described_are_checked_on_every_instance() {
    if !django_available() {
        return;
    }
    let app = ("app-1", "tok-app-1", "app");
    let (_redis, _backend, [a, b]) = two("opts1", "2s", "allow = [\"ops_report\"]", &[app]).await;
    let files = tempfile::tempdir().unwrap();
    let root: PathBuf = fixture();
    let _runner = start_runner(
        files.path(),
        &a,
        app,
        &format!(
            "allow = [\"ops_report\"]\ndjango = {{ python = \"python3\", manage_py = \"{}\", cwd = \"{}\" }}\nenv = [\"PATH\", \"PYTHONPATH\", \"HOME\"]\n",
            root.join("manage.py").display(),
            root.display()
        ),
    );
    wait_connected(&[&a, &b], &["app-1"]).await;
    // B never saw the runner: it knows the options its Django reported.
    let report = menu_entry(&b, "ops_report").await;
    assert_eq!(report["available"], true, "{report}");
    let level = report["options"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|o| o["name"] == "level")
        .cloned()
        .unwrap_or(Value::Null);
    assert_eq!(level["choices"], json!(["low", "high"]), "{report}");
    let r = run(&b, "ops_report", r#"{"data": {"nme": "x"}}"#).await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("nme"), "{}", r.text());
    let id = accepted(&run(&b, "ops_report", r#"{"data": {"level": "high"}}"#).await);
    let rec = ended(&a, &id, 30).await;
    assert_eq!(rec["status"], "succeeded", "{rec}");
    assert_eq!(rec["runner"], "app-1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_token_and_sighup_refuse_a_held_poll_on_that_instance() {
    let gateway = "allow = [\"hello\"]\n[commands.rules.hello]\ngroup = \"web\"";
    // Lease 10 s: a poll is held up to 5 s.
    let (_redis, _backend, [a, b]) =
        two("hup1", "10s", gateway, &[("raw-1", "tok-raw-1", "web")]).await;
    let description = r#"{"commands": {"hello": {"kind": "custom"}}}"#;
    let digest = sha256_hex(description.as_bytes());
    let d = raw(&a, "tok-raw-1", "/__runner__/describe", description)
        .send()
        .await;
    assert_eq!(d.status, 200, "{}", d.text());
    let held = {
        let a_addr = a.addr;
        tokio::spawn(async move {
            let body = json!({"version": "raw", "described": digest}).to_string();
            let started = tokio::time::Instant::now();
            let r = Req::new(a_addr, "POST", "/__runner__/poll")
                .header("authorization", "Bearer tok-raw-1")
                .body(body)
                .send()
                .await;
            (r, started.elapsed())
        })
    };
    // The poll is held on A (counted), then the runner's token changes in
    // A's configuration and A reloads.
    a.wait_metric("portcullis_runner_polls_total", 1.0).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let path = a.dir().join("portcullis.toml");
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace(&sha256_hex(b"tok-raw-1"), &sha256_hex(b"tok-raw-2"));
    std::fs::write(&path, text).unwrap();
    signal(a.pid(), libc::SIGHUP);
    let (r, took) = held.await.unwrap();
    assert_eq!(r.status, 401, "{}", r.text());
    // Refused at once, not when its hold (5 s) ended.
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_millis(4500),
        "held for {took:?}"
    );
    let old = raw(&a, "tok-raw-1", "/__runner__/describe", description)
        .send()
        .await;
    assert_eq!(old.status, 401, "{}", old.text());
    let new = raw(&a, "tok-raw-2", "/__runner__/describe", description)
        .send()
        .await;
    assert_eq!(new.status, 200, "{}", new.text());
    // B has not reloaded yet: it still knows the old token.
    let on_b = raw(&b, "tok-raw-1", "/__runner__/describe", description)
        .send()
        .await;
    assert_eq!(on_b.status, 200, "{}", on_b.text());
}

/// Output of job `id` on every node of `nodes`, each ending `succeeded`
/// with `text` as its whole output (at most `secs` s to end).
async fn succeeded_everywhere(nodes: &[&Node], id: &str, secs: u64, text: &str) {
    for node in nodes {
        let rec = ended(node, id, secs).await;
        assert_eq!(rec["status"], "succeeded", "{}: {rec}", node.instance);
        let out = op(node, "GET", &format!("/__manage__/jobs/{id}/output"))
            .send()
            .await;
        assert_eq!(out.text(), text, "{}", node.instance);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_owner_takes_back_its_runner_job() {
    let gateway = "allow = [\"marked\"]\n[commands.rules.marked]\ngroup = \"web\"";
    let web = ("web-1", "tok-web-1", "web");
    let (_redis, _backend, [a, mut b]) = two("own1", "2s", gateway, &[web]).await;
    let files = tempfile::tempdir().unwrap();
    let runs = files.path().join("runs");
    let script = format!(
        "echo run >> {}; echo first-mark; sleep 4; echo second-mark",
        runs.display()
    );
    let _runner = start_runner(files.path(), &a, web, &scripts(&[("marked", &script)]));
    wait_connected(&[&a, &b], &["web-1"]).await;
    // Accepted on B (its owner), run by the runner polling A.
    let id = accepted(&run(&b, "marked", "{}").await);
    follow_until(&a, &id, None, "first-mark").await;
    // The owner crashes and starts again while the job runs.
    b.kill();
    b.restart().await;
    assert_eq!(status(&b, &id).await["status"], "running");
    succeeded_everywhere(&[&a, &b], &id, 20, "first-mark\nsecond-mark\n").await;
    // Audited finished once, in the owner's log; never re-run.
    assert_eq!(audited(&b, &id, "finished", "succeeded"), 1);
    assert_eq!(audited(&a, &id, "finished", "succeeded"), 0);
    let lines = std::fs::read_to_string(&runs).unwrap_or_default();
    assert_eq!(lines.lines().count(), 1, "{lines}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runner_job_survives_redis_restarted_empty() {
    let gateway = "allow = [\"marked\"]\n[commands.rules.marked]\ngroup = \"web\"";
    let web = ("web-1", "tok-web-1", "web");
    let (mut redis, _backend, [a, b]) = two("empty1", "2s", gateway, &[web]).await;
    let files = tempfile::tempdir().unwrap();
    let runs = files.path().join("runs");
    // Silent for 8 s after its first line: longer than the rebind (5 s), so
    // by the docs nothing it sends is refused.
    let script = format!(
        "echo run >> {}; echo first-mark; sleep 8; echo second-mark",
        runs.display()
    );
    let _runner = start_runner(files.path(), &a, web, &scripts(&[("marked", &script)]));
    wait_connected(&[&a, &b], &["web-1"]).await;
    let id = accepted(&run(&b, "marked", "{}").await);
    follow_until(&a, &id, None, "first-mark").await;
    redis.restart().await;
    // Reads answer 503 until an instance reads Redis again, and 404 on the
    // other until the owner stores the running job's record again (its
    // renewal, within 5 s).
    for node in [&a, &b] {
        let mut back = false;
        for _ in 0..200 {
            let r = op(node, "GET", &format!("/__manage__/jobs/{id}"))
                .send()
                .await;
            if r.status == 200 {
                back = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(back, "{}: job not back within 10 s", node.instance);
    }
    // docs/cluster.md: the job is bound to its runner again within 5 s and
    // its record stored again; it ends `succeeded` on both instances. The
    // owner shows its whole output; the other instance only what the job
    // wrote after Redis came back (the shared copy went with Redis).
    succeeded_everywhere(&[&b], &id, 25, "first-mark\nsecond-mark\n").await;
    succeeded_everywhere(&[&a], &id, 25, "second-mark\n").await;
    assert_eq!(audited(&b, &id, "finished", "succeeded"), 1);
    let lines = std::fs::read_to_string(&runs).unwrap_or_default();
    assert_eq!(lines.lines().count(), 1, "{lines}");
}
