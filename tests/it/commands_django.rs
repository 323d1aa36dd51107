//! Remote operations against a real Django project (`tests/fixtures/django`),
//! through the gateway: `check`, option mapping into a custom management
//! command, allowlist/blocklist refusals, cancel and timeout.
//!
//! Needs Django importable by `python3` (`scripts/test` installs it). Without
//! it the tests say so and pass, unless `CI` is set, where they fail.

use crate::support::commands::*;
use http::Method;
use std::time::Duration;

fn django_config(mode: &str, extra: &str) -> String {
    django_commands(
        mode,
        &format!(
            r#"{extra}

[commands.rules.ops_report]
options = {{ name = "string", count = {{ type = "int", max = 5 }}, loud = "bool", tag = "list", sleep = "int", fail = "bool", args = "list" }}
"#
        ),
    )
}

async fn start_django(mode: &str) -> Env {
    start(&django_config(mode, "")).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_succeeds_with_its_output() {
    if !django_available() {
        return;
    }
    let env = start_django(r#"allow = ["check"]"#).await;
    let r = run(&env, "check", "").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["status"], "succeeded", "{v}");
    assert_eq!(v["exit_code"], 0);
    assert!(
        v["output"]
            .as_str()
            .unwrap()
            .contains("System check identified no issues"),
        "{v}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custom_management_command_receives_mapped_options() {
    if !django_available() {
        return;
    }
    let env = start_django(r#"allow = ["check", "ops_report"]"#).await;
    let r = run(
        &env,
        "ops_report",
        r#"{"data": {"name": "--not-an-option", "count": 2, "loud": true, "tag": ["a", "b"], "args": ["p1", "-x"]}}"#,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["status"], "succeeded", "{v}");
    let out = v["output"].as_str().unwrap();
    assert!(
        out.contains(r#"received {"count": 2, "items": ["p1", "-x"], "loud": true, "name": "--not-an-option", "tag": ["a", "b"]}"#),
        "{out}"
    );
    // A failing run reports its exit code, stderr included in the output.
    let r = run(&env, "ops_report", r#"{"data": {"fail": true}}"#).await;
    let v = r.json();
    assert_eq!(v["status"], "failed");
    assert_eq!(v["exit_code"], 3);
    assert!(v["output"].as_str().unwrap().contains("failing as asked"));
    // Schema: unknown options never reach Django.
    let r = run(&env, "ops_report", r#"{"data": {"settings": "evil"}}"#).await;
    assert_eq!(r.status, 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flush_is_refused_in_allowlist_and_blocklist_modes() {
    if !django_available() {
        return;
    }
    for mode in [r#"allow = ["check"]"#, r#"mode = "blocklist""#] {
        let env = start_django(mode).await;
        let r = run(&env, "flush", r#"{"data": {"noinput": true}}"#).await;
        assert_eq!(r.status, 403, "{mode}: {}", r.text());
        assert_eq!(r.json()["error"]["code"], 403);
        let audit = env.audit();
        assert_eq!(audit.len(), 1);
        assert_eq!(audit[0]["event"], "rejected");
        assert_eq!(audit[0]["command"], "flush");
        assert!(!process_with("manage.py flush"));
    }
    // Blocklist mode lets other commands run.
    let env = start_django(r#"mode = "blocklist""#).await;
    let r = run(&env, "ops_report", r#"{"data": {"name": "blk"}}"#).await;
    assert_eq!(r.json()["status"], "succeeded", "{}", r.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_run_is_cancelled_and_leaves_no_process() {
    if !django_available() {
        return;
    }
    let config = django_config(r#"allow = ["ops_report"]"#, "")
        .replace("sync_wait = \"20s\"", "sync_wait = \"0s\"");
    let env = start(&config).await;
    let r = run(
        &env,
        "ops_report",
        r#"{"data": {"name": "cancel-me-4711", "sleep": 60}}"#,
    )
    .await;
    assert_eq!(r.status, 202, "{}", r.text());
    let id = r.json()["id"].as_str().unwrap().to_owned();
    // Wait for the command to be working (its progress shows in the output).
    let mut working = false;
    for _ in 0..100 {
        if process_with("cancel-me-4711") {
            working = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(working);
    let c = cancel(&env, &id).await;
    assert_eq!(c.status, 202);
    let done = wait_job(&env, &id, 10).await;
    assert_eq!(done["status"], "cancelled");
    assert!(no_process_with("cancel-me-4711").await);
    assert_eq!(zombie_children(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_past_its_timeout_ends_timed_out() {
    if !django_available() {
        return;
    }
    let config = django_config(r#"allow = ["ops_report"]"#, "").replace(
        "[commands.rules.ops_report]\n",
        "[commands.rules.ops_report]\ntimeout = \"4s\"\n",
    );
    let env = start(&config).await;
    let r = run(
        &env,
        "ops_report",
        r#"{"data": {"name": "timeout-4712", "sleep": 60}}"#,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["status"], "timed_out");
    assert!(v["output"].as_str().unwrap().contains("working 1"), "{v}");
    assert!(no_process_with("timeout-4712").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_keys_never_authorize_manage_and_operator_tokens_no_device_routes() {
    let env = start(
        r#"
[[commands.custom]]
name = "echo"
argv = ["echo", "hi"]
"#,
    )
    .await;
    let r = send(
        env.addr,
        Method::POST,
        "/__manage__/echo",
        None,
        "",
        &[("api-key", "device-key")],
    )
    .await;
    assert_eq!(r.status, 401);
    let r = send(
        env.addr,
        Method::POST,
        "/__manage__/echo",
        Some("device-key"),
        "",
        &[],
    )
    .await;
    assert_eq!(r.status, 401);
    // An operator token on a device route is not an API key.
    let r = send(
        env.addr,
        Method::POST,
        "/login",
        None,
        "{}",
        &[("api-key", ALICE)],
    )
    .await;
    assert_eq!(r.status, 403);
    assert_eq!(
        r.json()["error"]["message"],
        "Received API KEY not found in server API KEYS set"
    );
    // The gateway sets its headers on /__manage__ answers too.
    let r = run(&env, "echo", "").await;
    assert_eq!(r.status, 200);
    assert!(r.headers.contains_key("x-request-id"));
    assert_eq!(
        env.audit()[2]["request_id"],
        r.headers["x-request-id"].to_str().unwrap()
    );
}
