//! The operator console (`/__manage__/console`) and the listings it reads:
//! the real binary driven by headless Chromium (Playwright for Python,
//! `tests/fixtures/console/drive_console.py`) against the Django fixture project, and
//! `GET /__manage__/jobs` / `GET /__manage__/audit` over HTTP.
//!
//! The browser test needs `/usr/bin/chromium`, Playwright for Python and
//! Django (`scripts/test` installs them). Without them it says so and passes,
//! unless `CI` is set, where it fails. With `PORTCULLIS_CONSOLE_SCREENSHOTS`
//! set to a directory it also writes screenshots of the main views there
//! (`scripts/console-screenshots` regenerates `docs/images/`).

use crate::support::commands::*;
use http::Method;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// Whether the browser test can run here; in CI it must.
pub(crate) fn browser_available() -> bool {
    let python_ok = |module: &str| {
        Command::new("python3")
            .args(["-c", &format!("import {module}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    let missing: Vec<&str> = [
        (!Path::new("/usr/bin/chromium").exists()).then_some("chromium"),
        (!python_ok("playwright")).then_some("playwright"),
        (!python_ok("django")).then_some("django"),
    ]
    .into_iter()
    .flatten()
    .collect();
    if missing.is_empty() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "missing {missing:?}: run scripts/test"
    );
    eprintln!("SKIPPED: {missing:?} not installed (scripts/test installs them)");
    false
}

/// Commands of the console's test gateway: the Django fixture project
/// (`check`; `ops_report`, whose form is built from the options Django
/// reports; `broken_cmd`, which Django cannot load), the custom `echo` and a
/// metadata-only custom command.
fn console_commands() -> String {
    django_commands(
        r#"allow = ["ops_report", "check", "broken_cmd"]
metadata_only = ["secret_dump"]"#,
        r#"
[[commands.custom]]
name = "secret_dump"
argv = ["python3", "-c", "import time; print('top-secret', flush=True); time.sleep(0.5)"]
"#,
    )
}

/// The binary serving [`console_commands`], its log in `dir/gateway.log`.
async fn start_console_binary(dir: &Path) -> (ChildGuard, std::net::SocketAddr) {
    let (config, addr) = binary_config(dir, &console_commands());
    let log = std::fs::File::create(dir.join("gateway.log")).unwrap();
    (start_binary_logging(&config, addr, log.into()).await, addr)
}

/// Runs the Playwright script against `base`; its observations.
async fn drive(base: &str, needle: &str, audit: &Path) -> Value {
    run_driver(
        base,
        &[
            ("CONSOLE_NEEDLE", needle.as_ref()),
            ("CONSOLE_AUDIT", audit.as_os_str()),
        ],
    )
    .await
}

/// Runs the Playwright script against `base`, signing in as alice, with
/// `envs` (its scenario and what that needs); its observations.
pub(crate) async fn run_driver(base: &str, envs: &[(&str, &std::ffi::OsStr)]) -> Value {
    let script =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/console/drive_console.py");
    let mut cmd = tokio::process::Command::new("python3");
    cmd.arg(script)
        .env("CONSOLE_BASE", base)
        .env("CONSOLE_TOKEN", ALICE)
        .envs(envs.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if let Some(dir) = std::env::var_os("PORTCULLIS_CONSOLE_SCREENSHOTS") {
        cmd.env("CONSOLE_SHOTS", dir);
    }
    let child = cmd.spawn().expect("python3");
    let out = tokio::time::timeout(Duration::from_secs(240), child.wait_with_output())
        .await
        .expect("the browser script took longer than 240 s")
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "browser script failed ({}):\n{stderr}\nobserved so far: {stdout}",
        out.status
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|_| panic!("not JSON: {stdout}"))
}

/// `GET path` as alice from the compiled binary at `addr`, as JSON.
async fn alice_get(addr: std::net::SocketAddr, path: &str) -> Value {
    send(addr, Method::GET, path, Some(ALICE), "", &[])
        .await
        .json()
}

pub(crate) fn text(v: &Value) -> &str {
    v.as_str().unwrap_or_else(|| panic!("not a string: {v}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_signs_in_runs_follows_cancels_and_lists() {
    if !browser_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (_gw, addr) = start_console_binary(dir.path()).await;
    let base = format!("http://{addr}");
    let needle = format!("console-long-{:016x}", fastrand::u64(..));
    let audit_file = dir.path().join("audit.jsonl");
    let seen = drive(&base, &needle, &audit_file).await;
    // The gateway logged no panic while the console drove it.
    let log = std::fs::read_to_string(dir.path().join("gateway.log")).unwrap();
    assert!(!log.contains("panicked"), "gateway log:\n{log}");

    // The page and every request it made stayed on the gateway's origin.
    let requests = seen["requests"].as_array().unwrap();
    assert!(requests.len() > 10, "{seen}");
    for url in requests {
        assert!(
            text(url).starts_with(&format!("{base}/__manage__/")),
            "request off the gateway's origin or API: {url}"
        );
    }
    // Nothing the page fetched (files, command list, job records, output
    // streams, listings) may be cached.
    let responses = seen["responses"].as_array().unwrap();
    assert!(responses.len() > 10, "{seen}");
    for r in responses {
        assert_eq!(r[2], "no-store", "cacheable answer: {r}");
    }
    // Strict headers on the page.
    let h = &seen["page_headers"];
    assert_eq!(seen["page_status"], 200);
    let csp = text(&h["content-security-policy"]);
    for part in [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "connect-src 'self'",
        "frame-ancestors 'none'",
        "form-action 'none'",
    ] {
        assert!(csp.contains(part), "CSP {csp:?} lacks {part:?}");
    }
    assert!(!csp.contains("unsafe"), "{csp}");
    assert_eq!(h["x-frame-options"], "DENY");
    assert_eq!(h["x-content-type-options"], "nosniff");
    assert_eq!(h["referrer-policy"], "no-referrer");
    assert_eq!(h["cache-control"], "no-store");

    // Signed in by typing the token and pressing Enter; no cookie.
    assert_eq!(seen["signed_in_as"], "alice");
    assert_eq!(seen["token_in_session_storage"], true);
    assert_eq!(seen["cookies"], serde_json::json!([]));
    let listed: Vec<&str> = seen["commands_listed"]
        .as_array()
        .unwrap()
        .iter()
        .map(text)
        .collect();
    assert_eq!(
        listed,
        ["secret_dump", "echo", "ops_report", "check", "broken_cmd"]
    );
    // A command Django could not describe is shown unavailable, without a form.
    let broken = text(&seen["broken_detail"]);
    assert!(
        broken.contains("Unavailable: introspection failed"),
        "{broken}"
    );
    assert_eq!(seen["broken_has_form"], false);
    // No runners configured: neither their view nor their filter.
    assert_eq!(seen["runners_view_hidden"], true);
    assert_eq!(seen["runner_filter_hidden"], true);
    // Every visible control of every view has a label (or a text).
    for (view, missing) in seen["unlabelled"].as_object().unwrap() {
        assert_eq!(missing, &serde_json::json!([]), "unlabelled in {view}");
    }
    assert_eq!(seen["unlabelled"].as_object().unwrap().len(), 4);

    // The Django command's form, generated from the options Django reports
    // for it: a labelled field per option, of the option's kind.
    let labels: Vec<&str> = seen["form_labels"]
        .as_array()
        .unwrap()
        .iter()
        .map(text)
        .collect();
    for l in [
        "name",
        "count",
        "loud",
        "tag",
        "sleep",
        "level",
        "verbosity",
        "Positional arguments",
    ] {
        assert!(labels.contains(&l), "{l:?} not in {labels:?}");
    }
    // Django's own `--settings` and `--pythonpath` are never offered.
    assert!(!labels.contains(&"settings") && !labels.contains(&"pythonpath"));
    let fields = &seen["form_fields"];
    assert_eq!(
        fields["name"],
        serde_json::json!(["input", "text", null, null])
    );
    assert_eq!(
        fields["count"],
        serde_json::json!(["input", "number", "1", null])
    );
    assert_eq!(
        fields["sleep"],
        serde_json::json!(["input", "number", "any", null])
    );
    assert_eq!(
        fields["loud"],
        serde_json::json!(["input", "checkbox", null, null])
    );
    assert_eq!(fields["tag"][0], "textarea", "{fields}");
    assert_eq!(
        fields["level"],
        serde_json::json!(["select", "select-one", null, ["", "low", "high"]])
    );
    assert_eq!(seen["run_status"], "succeeded");
    assert_eq!(seen["run_exit"], "0");
    assert!(text(&seen["run_duration"]).ends_with('s'), "{seen}");
    let output = text(&seen["run_output"]);
    assert!(
        output.contains(
            r#"received {"count": 2, "items": ["alpha", "beta"], "level": "high", "loud": true, "name": "console-run", "tag": []}"#
        ) && output.contains("done"),
        "{output}"
    );

    // Only what was filled in was sent: Django applied its own defaults.
    let ran = text(&seen["run_job"]);
    let job = alice_get(addr, &format!("/__manage__/jobs/{ran}")).await;
    assert_eq!(
        job["args"],
        serde_json::json!({"args": ["alpha", "beta"], "count": 2, "level": "high", "loud": true, "name": "console-run"})
    );

    // The long run: followed live, then cancelled; its process is gone.
    assert!(text(&seen["long_output_live"]).contains("working 3"));
    assert_eq!(seen["long_alive_before_cancel"], true);
    // The other origin's cancel attempts left it running.
    assert_eq!(seen["long_status_after_cross_origin"], "running");
    assert_eq!(seen["long_alive_after_cross_origin"], true);
    assert_eq!(seen["long_status"], "cancelled");
    assert_eq!(seen["cancel_button_hidden"], true);
    assert!(
        no_process_with(&needle).await,
        "the cancelled command is still running"
    );
    let long = text(&seen["long_job"]);
    let job = alice_get(addr, &format!("/__manage__/jobs/{long}")).await;
    assert_eq!(job["status"], "cancelled");
    assert_eq!(job["reason"], "cancelled by alice");

    // Keyboard alone ran the custom command and opened the Jobs view, with
    // a visible focus ring at every stop.
    assert_eq!(seen["keyboard_output"], "hi\n");
    assert_eq!(seen["focus_rings"], serde_json::json!([true, true, true]));

    // A metadata-only run says so, shows no output, in place and in Jobs.
    for (notice, output) in [
        ("metadata_notice", "metadata_output"),
        ("job_detail_metadata_notice", "job_detail_metadata_output"),
    ] {
        assert!(
            text(&seen[notice]).contains("Metadata-only"),
            "{}",
            seen[notice]
        );
        assert!(!text(&seen[output]).contains("top-secret"), "{seen}");
    }

    // Jobs view: newest first as the API lists them; filters; any output.
    let api = alice_get(addr, "/__manage__/jobs").await;
    let api_ids: Vec<&str> = api["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| text(&j["id"]))
        .collect();
    let shown: Vec<&str> = seen["jobs_rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(text)
        .collect();
    assert_eq!(shown.len(), 4);
    assert_eq!(shown, api_ids);
    assert_eq!(
        seen["jobs_statuses"],
        serde_json::json!(["succeeded", "succeeded", "cancelled", "succeeded"])
    );
    assert_eq!(seen["jobs_filtered_bob"], 0);
    assert_eq!(seen["jobs_filtered_cancelled"], serde_json::json!([long]));
    assert_eq!(
        seen["jobs_filtered_command"],
        serde_json::json!([long, text(&seen["run_job"])])
    );
    assert!(text(&seen["job_detail_output"]).contains("done"));

    // Audit view: the chain verified, lines exactly as in the file.
    assert!(text(&seen["audit_verdict"]).starts_with("Hash chain verified."));
    // After the driver edited the newest line, the view names that line.
    let edited = seen["edited_line"].as_u64().unwrap();
    let verdict = text(&seen["audit_verdict_edited"]);
    assert!(
        verdict.starts_with("Hash chain BROKEN.") && verdict.contains(&format!("line {edited}:")),
        "{verdict}"
    );
    let file = std::fs::read_to_string(&audit_file).unwrap();
    let mut file_lines: Vec<&str> = file.lines().collect();
    // The view showed that line before the edit.
    let slot = file_lines
        .get_mut(usize::try_from(edited).unwrap() - 1)
        .unwrap();
    assert_ne!(*slot, text(&seen["edited_original"]));
    *slot = text(&seen["edited_original"]);
    let shown_lines: Vec<&str> = seen["audit_raw_lines"]
        .as_array()
        .unwrap()
        .iter()
        .map(text)
        .collect();
    assert!(shown_lines.len() >= 6, "{shown_lines:?}");
    let expected: Vec<&str> = file_lines
        .iter()
        .take(shown_lines.len())
        .rev()
        .copied()
        .collect();
    assert_eq!(shown_lines, expected);

    // Phone width: no view is wider than the screen.
    let widths = seen["phone_widths"].as_object().unwrap();
    assert_eq!(widths.len(), 3, "{widths:?}");
    for (view, width) in widths {
        assert!(
            width.as_u64().unwrap() <= 390,
            "{view} at phone width: {width}"
        );
    }

    // Another origin could not run anything while the operator was signed
    // in: its requests arrived without the token and were refused; the only
    // run of `echo` is the console's own.
    let results: Vec<&str> = seen["cross_origin_results"]
        .as_array()
        .unwrap()
        .iter()
        .map(text)
        .collect();
    assert_eq!(
        results,
        [
            "cancel-cors:blocked",
            "cancel-no-cors:opaque:0",
            "cors:blocked",
            "no-cors:opaque:0",
            "read:blocked"
        ]
    );
    let echo_jobs = alice_get(addr, "/__manage__/jobs?command=echo").await;
    assert_eq!(
        echo_jobs["jobs"].as_array().unwrap().len(),
        1,
        "{echo_jobs}"
    );
    let audit = audit_lines(&dir.path().join("audit.jsonl"));
    let accepted_echo = audit
        .iter()
        .filter(|l| l["event"] == "accepted" && l["command"] == "echo")
        .count();
    assert_eq!(accepted_echo, 1);
    let refused_echo = audit
        .iter()
        .filter(|l| l["command"] == "echo" && l["http_status"] == 401)
        .count();
    assert!(refused_echo >= 1, "the cross-site post never arrived");

    // Signing out forgets the token, also across a reload.
    assert_eq!(seen["token_after_sign_out"], Value::Null);
    assert_eq!(seen["signed_in_after_reload"], false);
    assert_eq!(seen["nav_visible_after_reload"], false);
}

fn listing_commands() -> &'static str {
    r#"
sync_wait = "20s"
[[commands.custom]]
name = "echo"
argv = ["echo", "hi"]
[[commands.custom]]
name = "fail"
argv = ["false"]
"#
}

async fn list(env: &Env, token: &str, query: &str) -> Resp {
    send(
        env.addr,
        Method::GET,
        &format!("/__manage__/jobs{query}"),
        Some(token),
        "",
        &[],
    )
    .await
}

fn ids(v: &Value) -> Vec<String> {
    v["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_listing_pages_newest_first_and_filters() {
    let env = start(listing_commands()).await;
    let mut started = Vec::new();
    for (cmd, token) in [
        ("echo", ALICE),
        ("fail", ALICE),
        ("echo", BOB),
        ("echo", ALICE),
        ("echo", ALICE),
    ] {
        let r = send(
            env.addr,
            Method::POST,
            &format!("/__manage__/{cmd}"),
            Some(token),
            "",
            &[],
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text());
        started.push(r.json()["id"].as_str().unwrap().to_owned());
        // Ids order by creation time in milliseconds.
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    let newest_first: Vec<String> = started.iter().rev().cloned().collect();

    let r = list(&env, ALICE, "?limit=2").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.headers["cache-control"], "no-store");
    assert!(r.headers.get("access-control-allow-origin").is_none());
    let page = r.json();
    assert_eq!(ids(&page), newest_first[..2]);
    assert_eq!(page["jobs"][0]["status"], "succeeded");
    assert_eq!(page["jobs"][0]["command"], "echo");
    let next = page["next"].as_str().unwrap();
    assert_eq!(next, newest_first[1]);
    let page = list(&env, ALICE, &format!("?limit=2&before={next}"))
        .await
        .json();
    assert_eq!(ids(&page), newest_first[2..4]);
    let next = page["next"].as_str().unwrap();
    let page = list(&env, ALICE, &format!("?before={next}")).await.json();
    assert_eq!(ids(&page), newest_first[4..]);
    assert_eq!(page["next"], Value::Null);

    let page = list(&env, ALICE, "?status=failed").await.json();
    assert_eq!(ids(&page), [started[1].clone()]);
    assert_eq!(page["jobs"][0]["exit_code"], 1);
    let page = list(&env, ALICE, "?command=echo&operator=bob").await.json();
    assert_eq!(ids(&page), [started[2].clone()]);
    let page = list(&env, ALICE, "?command=echo").await.json();
    assert_eq!(page["jobs"].as_array().unwrap().len(), 4);
    // Every job runs on the gateway's host: no runner matches.
    let page = list(&env, ALICE, "?runner=db1").await.json();
    assert_eq!(ids(&page), Vec::<String>::new());
    // bob may run only echo: he sees only echo jobs, everyone's.
    let page = list(&env, BOB, "").await.json();
    assert_eq!(page["jobs"].as_array().unwrap().len(), 4);
    assert!(page["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .all(|j| j["command"] == "echo"));

    for bad in [
        "?status=done",
        "?limit=0",
        "?limit=201",
        "?limit=x",
        "?before=../x",
        "?color=red",
        "?command=%ff",
    ] {
        let r = list(&env, ALICE, bad).await;
        assert_eq!(r.status, 400, "{bad}: {}", r.text());
        assert!(r.json()["error"]["message"].is_string());
    }
    let r = send(env.addr, Method::GET, "/__manage__/jobs", None, "", &[]).await;
    assert_eq!(r.status, 401);
    let r = send(
        env.addr,
        Method::DELETE,
        "/__manage__/jobs",
        Some(ALICE),
        "",
        &[],
    )
    .await;
    assert_eq!(r.status, 405);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_listing_shows_file_lines_and_the_chain_verdict() {
    let env = start(listing_commands()).await;
    for _ in 0..3 {
        let r = run(&env, "echo", "").await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let file = std::fs::read_to_string(env.audit_path()).unwrap();
    let lines: Vec<&str> = file.lines().collect();
    assert_eq!(lines.len(), 6);

    let r = get(&env, "/__manage__/audit?limit=4").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.headers["cache-control"], "no-store");
    let page = r.json();
    assert_eq!(page["verified"], true);
    assert_eq!(page["verify_error"], Value::Null);
    let shown: Vec<&str> = page["lines"].as_array().unwrap().iter().map(text).collect();
    assert_eq!(shown, [lines[5], lines[4], lines[3], lines[2]]);
    assert_eq!(page["next"], 3);
    let page = get(&env, "/__manage__/audit?before=3").await.json();
    let shown: Vec<&str> = page["lines"].as_array().unwrap().iter().map(text).collect();
    assert_eq!(shown, [lines[1], lines[0]]);
    assert_eq!(page["next"], Value::Null);

    // An operator limited to some commands may not read everyone's trail.
    let r = send(
        env.addr,
        Method::GET,
        "/__manage__/audit",
        Some(BOB),
        "",
        &[],
    )
    .await;
    assert_eq!(r.status, 403, "{}", r.text());
    for bad in ["?before=0", "?before=x", "?limit=500", "?x=1"] {
        let r = get(&env, &format!("/__manage__/audit{bad}")).await;
        assert_eq!(r.status, 400, "{bad}: {}", r.text());
    }

    // A line edited on disk: the listing says the chain is broken, and where.
    let mut edited: Vec<String> = lines.iter().map(|l| (*l).to_owned()).collect();
    edited[1] = edited[1].replace("\"alice\"", "\"mallory\"");
    std::fs::write(env.audit_path(), edited.join("\n") + "\n").unwrap();
    let page = get(&env, "/__manage__/audit").await.json();
    assert_eq!(page["verified"], false);
    let why = page["verify_error"]
        .as_str()
        .unwrap_or_else(|| panic!("{page}"));
    assert!(why.starts_with("line 2: edited"), "{why}");
    assert!(page["lines"][4].as_str().unwrap().contains("mallory"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_files_need_no_token_and_the_api_allows_no_other_origin() {
    let env = start(listing_commands()).await;
    for (path, kind) in [
        ("/__manage__/console", "text/html; charset=utf-8"),
        ("/__manage__/console/", "text/html; charset=utf-8"),
        (
            "/__manage__/console/console.js",
            "text/javascript; charset=utf-8",
        ),
        ("/__manage__/console/console.css", "text/css; charset=utf-8"),
        ("/__manage__/console/icon.svg", "image/svg+xml"),
    ] {
        let r = send(env.addr, Method::GET, path, None, "", &[]).await;
        assert_eq!(r.status, 200, "{path}");
        assert_eq!(r.headers["content-type"], kind, "{path}");
        let csp = r.headers["content-security-policy"].to_str().unwrap();
        assert!(csp.contains("default-src 'none'") && csp.contains("frame-ancestors 'none'"));
        assert_eq!(r.headers["x-frame-options"], "DENY");
        assert_eq!(r.headers["x-content-type-options"], "nosniff");
        assert_eq!(r.headers["cache-control"], "no-store", "{path}");
        assert!(!r.body.is_empty());
    }
    let page = send(env.addr, Method::GET, "/__manage__/console", None, "", &[]).await;
    let html = page.text();
    // No inline script or style, nothing from another host.
    assert!(!html.contains("<script>") && !html.contains("<style") && !html.contains("style="));
    assert!(!html.contains("http://") && !html.contains("https://") && !html.contains("//cdn"));
    let r = send(
        env.addr,
        Method::GET,
        "/__manage__/console/nope.js",
        None,
        "",
        &[],
    )
    .await;
    assert_eq!(r.status, 404);
    // Serving the page writes nothing to the audit log.
    assert!(env.audit().is_empty());

    // A preflight from another origin gets no CORS permission, and a
    // cross-site form post (no bearer) runs nothing.
    let r = send(
        env.addr,
        Method::OPTIONS,
        "/__manage__/echo",
        None,
        "",
        &[
            ("origin", "http://127.0.0.1:1"),
            ("access-control-request-method", "POST"),
            ("access-control-request-headers", "authorization"),
        ],
    )
    .await;
    assert!(r
        .headers
        .keys()
        .all(|k| !k.as_str().starts_with("access-control-")));
    let r = send(
        env.addr,
        Method::POST,
        "/__manage__/echo",
        None,
        "data=1",
        &[
            ("origin", "http://127.0.0.1:1"),
            ("content-type", "application/x-www-form-urlencoded"),
        ],
    )
    .await;
    assert_eq!(r.status, 401);
    assert!(r.headers.get("access-control-allow-origin").is_none());
    assert!(env
        .audit()
        .iter()
        .all(|l| l["event"] == "rejected" && l["http_status"] == 401));
    let jobs = get(&env, "/__manage__/jobs").await.json();
    assert_eq!(jobs["jobs"], serde_json::json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefer_respond_async_answers_202_at_once() {
    let env = start(
        r#"
sync_wait = "20s"
[[commands.custom]]
name = "nap"
argv = ["sleep", "0.4"]
[[commands.custom]]
name = "echo"
argv = ["echo", "hi"]
"#,
    )
    .await;
    // Without the preference the caller waits for the result (sync_wait).
    let r = send(
        env.addr,
        Method::POST,
        "/__manage__/nap",
        Some(ALICE),
        "",
        &[],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["status"], "succeeded");
    // With it, 202 and where to follow the job, while it still runs.
    let r = send(
        env.addr,
        Method::POST,
        "/__manage__/nap",
        Some(ALICE),
        "",
        &[("prefer", "respond-async, wait=100")],
    )
    .await;
    assert_eq!(r.status, 202, "{}", r.text());
    let id = r.json()["id"].as_str().unwrap().to_owned();
    let location = format!("/__manage__/jobs/{id}");
    assert_eq!(r.headers["location"], location.as_str());
    let job = get(&env, &location).await.json();
    assert!(
        job["status"] == "running" || job["status"] == "queued",
        "{job}"
    );
}
