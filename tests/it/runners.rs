//! Runners as real processes: the compiled gateway over TLS with
//! `execute = "runners"`, and `portcullis runner` processes on loopback that
//! dial in, running custom argv commands and the Django fixture project.

use crate::support::commands::{django_available, fixture, listed_command, ALICE};
use crate::support::runners::{listening_sockets, pid_alive, signal, sorted_lines, wait_pid, Net};
use crate::support::Resp;
use http::Method;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_runs_on_a_runner_over_tls_and_the_runner_listens_on_nothing() {
    let n = Net::new();
    n.write_gateway(
        "allow = [\"hello\", \"touch\"]\n[commands.rules.hello]\ngroup = \"web\"\n[commands.rules.touch]\ngroup = \"web\"",
        &[("web-1", "tok-web-1", "web"), ("db-1", "tok-db-1", "db")],
    );
    let _gw = n.start_gateway().await;
    let marker = n.path("touched");
    let runner_cmds = format!(
        r#"allow = []
[[commands.custom]]
name = "hello"
argv = ["sh", "-c", "echo hello from the backend host"]
[[commands.custom]]
name = "touch"
argv = ["touch", "{}"]
"#,
        marker.display()
    );
    let web = n.start_runner("web-1", "tok-web-1", "web", &runner_cmds);
    // A runner whose token the gateway does not know gets no work.
    let _impostor = n.start_runner("db-1", "wrong-token", "db", &runner_cmds);
    n.wait_connected(&["web-1"]).await;

    let id = n.start_job("hello").await;
    let rec = n.wait_end(&id).await;
    assert_eq!(rec["status"], "succeeded", "{rec}");
    assert_eq!(rec["runner"], "web-1");
    assert_eq!(rec["exit_code"], 0);
    assert_eq!(n.output(&id).await, "hello from the backend host\n");

    // The runner process holds no listening socket.
    assert!(listening_sockets(web.pid()).is_empty());

    let list = n.runners().await;
    let runners = list["runners"].as_array().unwrap();
    let db = runners.iter().find(|r| r["name"] == "db-1").unwrap();
    assert_eq!(db["connected"], false, "{list}");
    let w = runners.iter().find(|r| r["name"] == "web-1").unwrap();
    assert_eq!(w["groups"], serde_json::json!(["web"]));
    assert!(
        w["version"].is_string() && w["last_seen"].is_string(),
        "{list}"
    );

    // The runner's own rules refuse what the gateway allows: `touch` is not
    // in this runner's table. Rejected, audited, nothing ran.
    drop(web);
    let narrow = n.start_runner(
        "web-1",
        "tok-web-1",
        "web",
        "allow = []\n[[commands.custom]]\nname = \"hello\"\nargv = [\"true\"]\n",
    );
    n.wait_connected(&["web-1"]).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let id = n.start_job("touch").await;
    n.assert_rejected_by_runner(&id, "not allowed on this runner")
        .await;
    assert!(!marker.exists(), "the refused command ran");
    drop(narrow);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_output_cancel_and_a_lost_runner() {
    let n = Net::new();
    n.write_gateway(
        "allow = [\"slow\", \"sleepy\"]\n[commands.rules.slow]\ngroup = \"web\"\n[commands.rules.sleepy]\ngroup = \"web\"",
        &[("web-1", "tok-web-1", "web")],
    );
    let _gw = n.start_gateway().await;
    let pidfile = n.path("pid");
    let childfile = n.path("child");
    let runs = n.path("runs");
    let runner_cmds = format!(
        r#"allow = []
[[commands.custom]]
name = "slow"
argv = ["sh", "-c", "echo first; sleep 60 & echo $! > {child}; echo $$ > {pid}; wait"]
[[commands.custom]]
name = "sleepy"
argv = ["sh", "-c", "echo run >> {runs}; echo $$ > {pid}; exec sleep 60"]
"#,
        pid = pidfile.display(),
        child = childfile.display(),
        runs = runs.display(),
    );
    let runner = n.start_runner("web-1", "tok-web-1", "web", &runner_cmds);
    n.wait_connected(&["web-1"]).await;

    // Live output before the job ends (SSE), then cancel kills its whole
    // process group there (the shell and the `sleep` it started).
    let id = n.start_job("slow").await;
    n.wait_live(&id, "first").await;
    assert_eq!(n.job(&id).await["status"], "running");
    let pid = wait_pid(&pidfile).await;
    let child = wait_pid(&childfile).await;
    assert!(pid_alive(pid) && pid_alive(child));
    let c = n
        .send(Method::POST, &format!("/__manage__/jobs/{id}/cancel"), "")
        .await;
    assert!((200..300).contains(&c.status), "{}", c.text());
    let rec = n.wait_end(&id).await;
    assert_eq!(rec["status"], "cancelled", "{rec}");
    assert!(!pid_alive(pid), "the process survived the cancel");
    assert!(!pid_alive(child), "its child survived the cancel");
    std::fs::remove_file(&pidfile).unwrap();

    // SIGKILL of the runner mid-job: lost after the lease, never re-run.
    let id = n.start_job("sleepy").await;
    let orphan = wait_pid(&pidfile).await;
    drop(runner);
    let rec = n.wait_end(&id).await;
    assert_eq!(rec["status"], "lost", "{rec}");
    assert_eq!(rec["runner"], "web-1");
    let m = n.metrics().await;
    assert!(m.contains("portcullis_runner_jobs_lost_total 1"), "{m}");
    assert!(
        m.contains("portcullis_runner_connected{runner=\"web-1\"} 0"),
        "{m}"
    );
    assert!(m.trim_end().ends_with("# EOF"), "{m}");
    // No runner of the group: refused 503, audited.
    let r = n.post("sleepy").await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(n
        .audit()
        .iter()
        .any(|l| l["status"] == "rejected" && l["http_status"] == 503));
    // A runner comes back: the lost job is not re-run.
    let _back = n.start_runner("web-1", "tok-web-1", "web", &runner_cmds);
    n.wait_connected(&["web-1"]).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(n.job(&id).await["status"], "lost");
    assert_eq!(std::fs::read_to_string(&runs).unwrap(), "run\n");
    signal(orphan as u32, libc::SIGKILL);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_removing_a_runner_refuses_it_at_once() {
    let n = Net::new();
    let commands = "allow = [\"hello\"]\n[commands.rules.hello]\ngroup = \"web\"";
    n.write_gateway(
        commands,
        &[("web-1", "tok-web-1", "web"), ("web-2", "tok-web-2", "web")],
    );
    let gw = n.start_gateway().await;
    let cmds = "allow = []\n[[commands.custom]]\nname = \"hello\"\nargv = [\"echo\", \"hi\"]\n";
    let _r1 = n.start_runner("web-1", "tok-web-1", "web", cmds);
    let _r2 = n.start_runner("web-2", "tok-web-2", "web", cmds);
    n.wait_connected(&["web-1", "web-2"]).await;

    // web-1 removed; web-2 stays with one more group (its lease and jobs carry over).
    n.write_gateway(commands, &[("web-2", "tok-web-2", "web\", \"db")]);
    signal(gw.pid(), libc::SIGHUP);
    // web-1 is gone from the list; every further job goes to web-2.
    let mut gone = false;
    for _ in 0..100 {
        let list = n.runners().await;
        if !list["runners"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["name"] == "web-1")
        {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(gone, "web-1 still listed after SIGHUP");
    let list = n.runners().await;
    assert_eq!(
        list["runners"][0]["groups"],
        serde_json::json!(["web", "db"])
    );
    assert_eq!(list["runners"][0]["connected"], true, "{list}");
    // Its open poll was answered 401 and its next ones are refused.
    let mut refused = false;
    for _ in 0..100 {
        if !n
            .metrics()
            .await
            .contains("portcullis_runner_refused_total 0")
        {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(refused, "the removed runner was not refused");
    for _ in 0..4 {
        let id = n.start_job("hello").await;
        let rec = n.wait_end(&id).await;
        assert_eq!(rec["status"], "succeeded", "{rec}");
        assert_eq!(rec["runner"], "web-2");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn django_commands_run_on_the_runner_host_with_the_options_its_django_reports() {
    if !django_available() {
        return;
    }
    let n = Net::new();
    // The gateway has no Django project: it learns the options from the runner.
    n.write_gateway(
        "allow = [\"check\", \"ops_report\", \"migrate\", \"broken_cmd\"]",
        &[("app-1", "tok-app-1", "app")],
    );
    let _gw = n.start_gateway().await;
    let root = fixture();
    let _runner = n.start_runner(
        "app-1",
        "tok-app-1",
        "app",
        &format!(
            "allow = [\"check\", \"ops_report\", \"broken_cmd\"]\ndjango = {{ python = \"python3\", manage_py = \"{}\", cwd = \"{}\" }}\nenv = [\"PATH\", \"PYTHONPATH\", \"HOME\"]\n[commands.rules.ops_report]\noptions = {{ name = \"string\", args = \"list\" }}\n",
            root.join("manage.py").display(),
            root.display()
        ),
    );
    n.wait_connected(&["app-1"]).await;

    // GET /__manage__/ lists the options the runner host's Django reported.
    let listing = n.send(Method::GET, "/__manage__/", "").await.json();
    let entry = |name: &str| listed_command(&listing, name);
    let report = entry("ops_report");
    assert_eq!(report["available"], true, "{report}");
    assert_eq!(report["runners"], serde_json::json!(["app-1"]));
    let level = report["options"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["name"] == "level")
        .cloned()
        .unwrap_or_else(|| panic!("no level option: {report}"));
    assert_eq!(level["choices"], serde_json::json!(["low", "high"]));
    assert_eq!(level["help"], "How much to report.");
    assert!(
        !report.to_string().contains("\"settings\""),
        "settings is never an option: {report}"
    );
    // The runner does not allow migrate: listed as unavailable.
    let migrate = entry("migrate");
    assert_eq!(migrate["available"], false, "{migrate}");
    // broken_cmd cannot be loaded on the runner host: unavailable, and
    // refused (503, audited) rather than run blind.
    let broken = entry("broken_cmd");
    assert_eq!(broken["available"], false, "{broken}");
    let r = n.post("broken_cmd").await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(
        r.text().contains("Command unavailable on runner app-1"),
        "{}",
        r.text()
    );
    assert!(n
        .audit()
        .iter()
        .any(|l| l["command"] == "broken_cmd" && l["http_status"] == 503));

    // An option ops_report does not have, an abbreviation, a wrong type and
    // --settings: 400 at the gateway naming the key, audited, nothing runs.
    for (data, key) in [
        (r#"{"data": {"nme": "x"}}"#, "nme"),
        (r#"{"data": {"coun": 2}}"#, "coun"),
        (r#"{"data": {"count": "two"}}"#, "count"),
        (r#"{"data": {"level": "max"}}"#, "level"),
        (r#"{"data": {"settings": "evil"}}"#, "settings"),
    ] {
        let r = n.post_data("ops_report", data).await;
        assert_eq!(r.status, 400, "{data}: {}", r.text());
        assert!(r.text().contains(key), "{data}: {}", r.text());
    }
    let refused = n
        .audit()
        .iter()
        .filter(|l| l["status"] == "rejected" && l["http_status"] == 400)
        .count();
    assert_eq!(refused, 5);

    // An option Django has and the runner's own schema leaves out: the
    // gateway passes it, the runner refuses it (its reason, audited).
    let r = n
        .post_data("ops_report", r#"{"data": {"name": "n1", "count": 2}}"#)
        .await;
    assert_eq!(r.status, 202, "{}", r.text());
    let id = r.json()["id"].as_str().unwrap().to_owned();
    n.assert_rejected_by_runner(&id, "runner app-1: unknown option \"count\"")
        .await;

    // What both allow runs there.
    let r = n
        .post_data("ops_report", r#"{"data": {"name": "n1", "args": ["p1"]}}"#)
        .await;
    let id = r.json()["id"].as_str().unwrap().to_owned();
    let rec = n.wait_end(&id).await;
    assert_eq!(rec["status"], "succeeded", "{rec}");
    assert_eq!(rec["runner"], "app-1");
    assert!(
        n.output(&id)
            .await
            .contains(r#""items": ["p1"], "loud": false, "name": "n1""#),
        "{}",
        n.output(&id).await
    );
    let id = n.start_job("check").await;
    let rec = n.wait_end(&id).await;
    assert_eq!(rec["status"], "succeeded", "{rec}");
    assert!(n
        .output(&id)
        .await
        .contains("System check identified no issues"));
    // The gateway allows migrate; this runner does not.
    let id = n.start_job("migrate").await;
    n.assert_rejected_by_runner(&id, "not allowed on this runner")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_restarts_during_a_job_and_its_output_is_complete() {
    let n = Net::new();
    n.write_gateway(
        "allow = [\"steps\"]\n[commands.rules.steps]\nlock = \"steps\"",
        &[("web-1", "tok-web-1", "web")],
    );
    let mut gw = n.start_gateway().await;
    let _runner = n.start_runner(
        "web-1",
        "tok-web-1",
        "web",
        "allow = []\n[[commands.custom]]\nname = \"steps\"\nargv = [\"sh\", \"-c\", \"echo one; sleep 1.5; echo two; sleep 1.5; echo three\"]\n",
    );
    n.wait_connected(&["web-1"]).await;
    let id = n.start_job("steps").await;
    n.wait_live(&id, "one").await;

    // A graceful restart: the job goes on on the runner.
    signal(gw.pid(), libc::SIGTERM);
    let _ = gw.child().wait();
    let gw = n.start_gateway().await;
    n.wait_live(&id, "two").await;
    // The taken-back job still holds its lock.
    assert_eq!(n.post("steps").await.status, 409);

    // A crash: the same.
    drop(gw);
    let _gw = n.start_gateway().await;
    let rec = n.wait_end(&id).await;
    assert_eq!(rec["status"], "succeeded", "{rec}");
    assert_eq!(rec["runner"], "web-1");
    assert_eq!(n.output(&id).await, "one\ntwo\nthree\n");
    assert_eq!(rec["output_bytes"], 14);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_all_runs_once_per_connected_runner() {
    let n = Net::new();
    let all = [
        ("web-1", "tok-web-1", "web"),
        ("web-2", "tok-web-2", "web"),
        ("web-3", "tok-web-3", "web"),
        ("db-1", "tok-db-1", "db"),
    ];
    n.write_gateway(
        "allow = [\"stamp\"]\n[commands.rules.stamp]\ntarget = \"all\"\ngroup = \"web\"",
        &all,
    );
    let _gw = n.start_gateway().await;
    let stamps = n.path("stamps");
    let mut runners = Vec::new();
    for (name, token, group) in all {
        runners.push(n.start_runner(
            name,
            token,
            group,
            &format!(
                "allow = []\n[[commands.custom]]\nname = \"stamp\"\nargv = [\"sh\", \"-c\", \"echo {name} >> {}\"]\n",
                stamps.display()
            ),
        ));
    }
    n.wait_connected(&["web-1", "web-2", "web-3", "db-1"]).await;
    let r = n.post("stamp").await;
    assert_eq!(r.status, 202, "{}", r.text());
    let jobs = r.json()["jobs"].as_array().unwrap().clone();
    assert_eq!(jobs.len(), 3, "{jobs:?}");
    let mut names = Vec::new();
    for j in &jobs {
        let rec = n.wait_end(j["id"].as_str().unwrap()).await;
        assert_eq!(rec["status"], "succeeded", "{rec}");
        names.push(rec["runner"].as_str().unwrap().to_owned());
    }
    names.sort();
    assert_eq!(names, ["web-1", "web-2", "web-3"]);
    assert_eq!(sorted_lines(&stamps), ["web-1", "web-2", "web-3"]);
    // The job listing filters by the runner a job ran on.
    let r = n
        .send(Method::GET, "/__manage__/jobs?runner=web-2", "")
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let listed = r.json()["jobs"].as_array().unwrap().clone();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["runner"], "web-2");
    let r = n
        .send(Method::GET, "/__manage__/jobs?runner=db-1", "")
        .await;
    assert_eq!(r.json()["jobs"].as_array().map(Vec::len), Some(0));
}

#[test]
fn runner_settings_are_validated() {
    let base = |commands: &str, runners: &str| {
        format!(
            "[backend]\nurl = \"http://127.0.0.1:9\"\n[[api_keys]]\nname = \"app\"\nkey = \"device-key\"\n[[operators]]\nname = \"alice\"\ntoken = \"{ALICE}\"\n[commands]\nstate_dir = \"/tmp/x\"\n{commands}\n{runners}"
        )
    };
    let problems = |text: String| match portcullis::config::Config::parse(&text) {
        Ok(_) => String::new(),
        Err(p) => p.to_string(),
    };
    let ok = base(
        "execute = \"runners\"\nallow = [\"x\"]\n[commands.rules.x]\ntarget = \"all\"\ngroup = \"web\"",
        "[[runners]]\nname = \"w\"\ntoken = \"runner-token\"\ngroups = [\"web\"]",
    );
    assert_eq!(problems(ok), "");
    // The operator's token reused as a runner token.
    let p = problems(base(
        "execute = \"runners\"\nallow = [\"x\"]",
        &format!("[[runners]]\nname = \"w\"\ntoken = \"{ALICE}\""),
    ));
    assert!(p.contains("runners[0].token"), "{p}");
    // [[runners]] without execute = "runners"; target/group in local mode.
    let p = problems(base(
        "[[commands.custom]]\nname = \"x\"\nargv = [\"true\"]\n[commands.rules.x]\ntarget = \"all\"",
        "[[runners]]\nname = \"w\"\ntoken = \"runner-token\"",
    ));
    assert!(p.contains("execute"), "{p}");
    assert!(p.contains("commands.rules.x"), "{p}");
    // execute = "runners" with no runner; an unknown target.
    let p = problems(base(
        "execute = \"runners\"\nallow = [\"x\"]\n[commands.rules.x]\ntarget = \"some\"",
        "",
    ));
    assert!(p.contains("at least one [[runners]]"), "{p}");
    assert!(p.contains("commands.rules.x.target"), "{p}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_of_a_runner_cancels_its_job_and_kills_the_process() {
    let n = Net::new();
    n.write_gateway("allow = [\"slow\"]", &[("web-1", "tok-web-1", "web")]);
    let _gw = n.start_gateway().await;
    let pidfile = n.path("pid");
    let mut runner = n.start_runner(
        "web-1",
        "tok-web-1",
        "web",
        &format!(
            "allow = []\n[[commands.custom]]\nname = \"slow\"\nargv = [\"sh\", \"-c\", \"echo $$ > {}; exec sleep 60\"]\n",
            pidfile.display()
        ),
    );
    n.wait_connected(&["web-1"]).await;
    let id = n.start_job("slow").await;
    let pid = wait_pid(&pidfile).await;
    signal(runner.pid(), libc::SIGTERM);
    let rec = n.wait_end(&id).await;
    assert_eq!(rec["status"], "cancelled", "{rec}");
    assert_eq!(rec["reason"], "runner shutting down");
    assert!(!pid_alive(pid));
    let status = runner.child().wait().unwrap();
    assert!(status.success(), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runner_tokens_open_only_the_runner_endpoints_and_nothing_else_opens_them() {
    let n = Net::new();
    n.write_gateway("allow = [\"hello\"]", &[("web-1", "tok-web-1", "web")]);
    let _gw = n.start_gateway().await;
    // Operator tokens, device keys (as a bearer or as Api-Key) and nothing.
    let alice = format!("Bearer {ALICE}");
    for (auth, headers) in [
        (Some(alice.as_str()), &[][..]),
        (Some("Bearer device-key"), &[][..]),
        (None, &[("api-key", "device-key")][..]),
        (None, &[][..]),
    ] {
        n.runner_poll(auth, headers)
            .await
            .assert_gateway_error(401, "Runner token missing or invalid");
    }
    // The runner's token opens the poll (an empty answer after the hold)...
    let r = n.runner_poll(Some("Bearer tok-web-1"), &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["jobs"], serde_json::json!([]));
    // ...and nothing else: not the operator API, not device routes.
    for path in ["/__manage__/", "/__manage__/runners", "/__manage__/jobs"] {
        let r = Resp::read(
            n.open_as(Some("Bearer tok-web-1"), Method::GET, path, "", &[])
                .await,
        )
        .await;
        assert_eq!(r.status, 401, "{path}: {}", r.text());
    }
    let r = Resp::read(
        n.open_as(
            None,
            Method::GET,
            "/api/orders/1",
            "",
            &[("api-key", "tok-web-1")],
        )
        .await,
    )
    .await;
    r.assert_envelope(403);
    // Every refused runner request was counted.
    let m = n.metrics().await;
    assert!(m.contains("portcullis_runner_refused_total 4"), "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_changed_by_sighup_ends_the_held_poll_and_the_new_token_takes_over() {
    let n = Net::new();
    let commands = "allow = [\"hello\"]";
    // A long lease: a poll is held for 25 s unless something ends it.
    n.write_gateway_with_lease("60s", commands, &[("web-1", "tok-old", "web")]);
    let gw = n.start_gateway().await;
    let held = n.runner_poll(Some("Bearer tok-old"), &[]);
    let reload = async {
        n.wait_connected(&["web-1"]).await;
        n.write_gateway_with_lease("60s", commands, &[("web-1", "tok-new", "web")]);
        signal(gw.pid(), libc::SIGHUP);
    };
    let (r, ()) = tokio::time::timeout(Duration::from_secs(15), async {
        tokio::join!(held, reload)
    })
    .await
    .expect("the held poll was not ended by the reload");
    r.assert_gateway_error(401, "Runner token missing or invalid");

    // The old token gets nothing more; a runner with the new one runs jobs.
    let _new = n.start_runner(
        "web-1",
        "tok-new",
        "web",
        "allow = []\n[[commands.custom]]\nname = \"hello\"\nargv = [\"echo\", \"hi\"]\n",
    );
    n.wait_connected(&["web-1"]).await;
    let id = n.start_job("hello").await;
    assert_eq!(n.wait_end(&id).await["status"], "succeeded");
    assert_eq!(n.output(&id).await, "hi\n");
    n.runner_poll(Some("Bearer tok-old"), &[])
        .await
        .assert_gateway_error(401, "Runner token missing or invalid");
}
