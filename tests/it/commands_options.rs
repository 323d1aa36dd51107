//! Django commands take only their own options, as Django itself reports
//! them (the fixture project in `tests/fixtures/django`): `--settings` and
//! `--pythonpath` never reach Django, abbreviations and unknown keys are
//! refused (400, audited `rejected`, nothing runs), values are checked
//! against the option's type and choices, redaction follows the option a key
//! names, a command Django cannot describe is refused (503), and
//! `GET /__manage__/` lists every accepted option.

use crate::support::commands::*;
use serde_json::Value;

/// A directory with `evil_settings.py`, which writes `marker` when imported.
fn evil_module(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let evil = dir.join("evil");
    std::fs::create_dir_all(&evil).unwrap();
    let marker = dir.join("imported.marker");
    std::fs::write(
        evil.join("evil_settings.py"),
        format!(
            "open({:?}, 'w').write('imported')\nSECRET_KEY = 'x'\n",
            marker.display().to_string()
        ),
    )
    .unwrap();
    (evil, marker)
}

/// Sends `data` to `cmd`: 400, the message naming `key`, audited `rejected`.
async fn refused_naming(env: &Env, cmd: &str, data: &str, key: &str) {
    let r = run(env, cmd, &format!(r#"{{"data": {data}}}"#)).await;
    assert_eq!(r.status, 400, "{data}: {}", r.text());
    let message = r.json()["error"]["message"].as_str().unwrap().to_owned();
    assert!(message.contains(&format!("{key:?}")), "{message}");
    assert_eq!(last_rejected(env)["http_status"], 400);
}

fn last_rejected(env: &Env) -> Value {
    let audit = env.audit();
    let last = audit.last().expect("an audit line").clone();
    assert_eq!(last["event"], "rejected", "{last}");
    last
}

/// No `accepted` line: nothing ran.
fn nothing_ran(env: &Env) {
    assert!(
        env.audit().iter().all(|l| l["event"] != "accepted"),
        "{:?}",
        env.audit()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_and_pythonpath_never_reach_django() {
    if !django_available() {
        return;
    }
    let env = start(&django_commands(r#"allow = ["check"]"#, "")).await;
    let (evil, marker) = evil_module(env.dir.path());
    let evil = evil.display().to_string();
    for data in [
        serde_json::json!({"pythonpath": evil, "settings": "evil_settings"}),
        serde_json::json!({"settings": "evil_settings"}),
        serde_json::json!({"python-path": evil}),
        serde_json::json!({"settin": "evil_settings"}),
        serde_json::json!({"pythonp": evil, "verbosity": 1}),
    ] {
        let body = serde_json::json!({ "data": data }).to_string();
        let r = run(&env, "check", &body).await;
        assert_eq!(r.status, 400, "{data}: {}", r.text());
        let msg = r.json()["error"]["message"].as_str().unwrap().to_owned();
        let named = data
            .as_object()
            .unwrap()
            .keys()
            .any(|k| msg.contains(&format!("{k:?}")));
        assert!(named, "{msg}");
        let line = last_rejected(&env);
        assert_eq!(line["command"], "check");
        assert_eq!(line["http_status"], 400);
    }
    nothing_ran(&env);
    assert!(!marker.exists(), "evil_settings.py was imported");
    // The same options given exactly to a command that really has them
    // still never reach it, whatever a schema would say: `check` runs
    // normally with its own options.
    let r = run(
        &env,
        "check",
        r#"{"data": {"deploy": false, "fail_level": "ERROR"}}"#,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["status"], "succeeded");
    assert!(!marker.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abbreviations_and_unknown_keys_are_refused_and_never_written() {
    if !django_available() {
        return;
    }
    let env = start(&django_commands(
        r#"allow = ["ops_report"]
redact = ["password"]"#,
        "",
    ))
    .await;
    for (data, key) in [
        (r#"{"passw": "hunter2"}"#, "passw"),
        (r#"{"nam": "x"}"#, "nam"),
        (r#"{"name": "x", "items": "a"}"#, "items"),
        (r#"{"help": true}"#, "help"),
        (r#"{"unknown_option": "x"}"#, "unknown_option"),
    ] {
        refused_naming(&env, "ops_report", data, key).await;
        let line = last_rejected(&env);
        assert_eq!(line["args"][key], "***", "{line}");
    }
    nothing_ran(&env);
    let audit = std::fs::read_to_string(env.audit_path()).unwrap();
    assert!(!audit.contains("hunter2"), "{audit}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exact_options_run_and_wrong_types_are_refused() {
    if !django_available() {
        return;
    }
    let env = start(&django_commands(r#"allow = ["ops_report"]"#, "")).await;
    let r = run(
        &env,
        "ops_report",
        r#"{"data": {"name": "exact", "count": "2", "loud": true, "no_color": true, "verbosity": 0, "level": "high", "tag": ["a", "b"], "args": ["p1"]}}"#,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["status"], "succeeded", "{v}");
    assert!(
        v["output"].as_str().unwrap().contains(
            r#"received {"count": 2, "items": ["p1"], "level": "high", "loud": true, "name": "exact", "tag": ["a", "b"]}"#
        ),
        "{v}"
    );
    let before = env.audit().len();
    for (data, key) in [
        (r#"{"count": "abc"}"#, "count"),
        (r#"{"count": 1.5}"#, "count"),
        (r#"{"loud": "yes"}"#, "loud"),
        (r#"{"sleep": "soon"}"#, "sleep"),
        (r#"{"level": "medium"}"#, "level"),
        (r#"{"verbosity": 7}"#, "verbosity"),
        (r#"{"name": ["a", "b"]}"#, "name"),
    ] {
        refused_naming(&env, "ops_report", data, key).await;
    }
    // Only rejected lines since the run.
    assert!(env.audit()[before..]
        .iter()
        .all(|l| l["event"] == "rejected"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redaction_follows_the_option_a_key_names() {
    if !django_available() {
        return;
    }
    // `--pass` and `--password` are one option (dest "secret"); listing
    // either name, or its dest, hides the value under every name.
    for listed in ["password", "pass", "secret"] {
        let env = start(&django_commands(
            &format!("allow = [\"ops_report\"]\nredact = [\"{listed}\"]"),
            "",
        ))
        .await;
        for key in ["pass", "password"] {
            let r = run(
                &env,
                "ops_report",
                &format!(r#"{{"data": {{"{key}": "hunter2-secret", "name": "n"}}}}"#),
            )
            .await;
            assert_eq!(r.status, 200, "{}", r.text());
            let v = r.json();
            assert!(
                v["output"]
                    .as_str()
                    .unwrap()
                    .contains("\"secret_length\": 14"),
                "{v}"
            );
            let id = v["id"].as_str().unwrap();
            let job = get(&env, &format!("/__manage__/jobs/{id}")).await.json();
            assert_eq!(job["args"][key], "***", "{job}");
            assert_eq!(job["args"]["name"], "n");
        }
        let audit = std::fs::read_to_string(env.audit_path()).unwrap();
        assert!(!audit.contains("hunter2"), "{listed}: {audit}");
        assert!(audit.contains("\"name\":\"n\""), "{audit}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_django_cannot_describe_is_refused() {
    if !django_available() {
        return;
    }
    // broken_cmd raises at import: only it is refused.
    let env = start(&django_commands(
        r#"allow = ["check", "broken_cmd", "not_a_command"]"#,
        "",
    ))
    .await;
    for cmd in ["broken_cmd", "not_a_command"] {
        let r = run(&env, cmd, "").await;
        assert_eq!(r.status, 503, "{}", r.text());
        let msg = r.json()["error"]["message"].as_str().unwrap().to_owned();
        assert!(msg.contains("introspection failed"), "{msg}");
        assert_eq!(last_rejected(&env)["http_status"], 503);
    }
    nothing_ran(&env);
    let list = get(&env, "/__manage__/").await.json();
    let broken = find(&list, "broken_cmd");
    assert_eq!(broken["available"], false);
    assert!(
        broken["error"].as_str().unwrap().contains("ImportError"),
        "{broken}"
    );
    assert_eq!(find(&list, "not_a_command")["available"], false);
    assert_eq!(find(&list, "check")["available"], true);
    let r = run(&env, "check", "").await;
    assert_eq!(r.json()["status"], "succeeded", "{}", r.text());

    // The whole introspection failing (no such interpreter) refuses every
    // Django command; custom commands still run.
    let config = django_commands(r#"allow = ["check"]"#, "")
        .replace("python = \"python3\"", "python = \"/nonexistent/python3\"");
    let env = start(&config).await;
    let r = run(&env, "check", r#"{"data": {"deploy": true}}"#).await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("introspection failed"));
    // Arguments of a refused run are not written (nothing knows what they are).
    assert_eq!(last_rejected(&env)["args"]["deploy"], "***");
    assert_eq!(run(&env, "echo", "").await.status, 200);
}

fn find<'a>(list: &'a Value, name: &str) -> &'a Value {
    list["commands"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("{name} not listed: {list}"))
}

fn option<'a>(cmd: &'a Value, name: &str) -> Option<&'a Value> {
    cmd["options"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["name"] == name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_shows_each_commands_options() {
    if !django_available() {
        return;
    }
    let env = start(&django_commands(
        r#"allow = ["ops_report", "migrate"]"#,
        r#"
[commands.rules.migrate]
options = { database = "string", plan = "bool", verbosity = { type = "int", max = 2 } }
lock = "schema"

[commands.rules.echo]
options = { who = { type = "string", regex = "[a-z]+" } }
"#,
    ))
    .await;
    let r = get(&env, "/__manage__/").await;
    assert_eq!(r.status, 200);
    let list = r.json();
    assert_eq!(list["operator"], "alice");
    assert_eq!(list["mode"], "allowlist");

    let ops = find(&list, "ops_report");
    assert_eq!(ops["kind"], "django");
    assert_eq!(ops["available"], true);
    assert_eq!(ops["error"], Value::Null);
    assert!(ops["help"]
        .as_str()
        .unwrap()
        .starts_with("Print the options received"));
    let count = option(ops, "count").unwrap();
    assert_eq!(count["kind"], "int");
    assert_eq!(count["flag"], "--count");
    assert_eq!(count["default"], 0);
    assert_eq!(option(ops, "loud").unwrap()["kind"], "bool");
    assert_eq!(option(ops, "sleep").unwrap()["kind"], "float");
    let tag = option(ops, "tag").unwrap();
    assert_eq!(
        (tag["kind"].clone(), tag["repeatable"].clone()),
        ("string".into(), true.into())
    );
    let level = option(ops, "level").unwrap();
    assert_eq!(level["kind"], "choice");
    assert_eq!(level["choices"], serde_json::json!(["low", "high"]));
    assert_eq!(level["help"], "How much to report.");
    let verbosity = option(ops, "verbosity").unwrap();
    assert_eq!(verbosity["choices"], serde_json::json!([0, 1, 2, 3]));
    let pass = option(ops, "pass").unwrap();
    assert_eq!(pass["flag"], "--pass");
    assert_eq!(option(ops, "no_color").unwrap()["flag"], "--no-color");
    for never in ["settings", "pythonpath", "help", "version", "items"] {
        assert!(option(ops, never).is_none(), "{never} listed");
    }
    assert_eq!(
        ops["args"],
        serde_json::json!({"accepted": true, "help": "[items ...]"})
    );
    for key in [
        "name",
        "flag",
        "kind",
        "repeatable",
        "help",
        "choices",
        "min",
        "max",
        "pattern",
        "default",
    ] {
        assert!(count.get(key).is_some(), "{key} missing: {count}");
    }

    // A schema narrows Django's list and adds its bounds.
    let migrate = find(&list, "migrate");
    assert_eq!(migrate["lock"], "schema");
    let names: Vec<&str> = migrate["options"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["verbosity", "database", "plan"]);
    assert_eq!(option(migrate, "verbosity").unwrap()["max"], 2);
    assert_eq!(migrate["args"]["accepted"], false);

    let echo = find(&list, "echo");
    assert_eq!(echo["kind"], "custom");
    assert_eq!(echo["available"], true);
    let who = option(echo, "who").unwrap();
    assert_eq!(
        (who["kind"].clone(), who["pattern"].clone()),
        ("string".into(), "[a-z]+".into())
    );
    assert_eq!(echo["args"]["accepted"], false);

    // What is listed is what runs: every listed option of ops_report accepted.
    let r = run(
        &env,
        "ops_report",
        r#"{"data": {"pass": "p", "password": "q", "no-color": true, "force_color": false, "traceback": true, "skip_checks": true, "sleep": 0}}"#,
    )
    .await;
    assert_eq!(r.json()["status"], "succeeded", "{}", r.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn djangocommand_defaults_are_an_explicit_choice() {
    if !django_available() {
        return;
    }
    let env = start(&django_commands(
        r#"allow = ["@djangocommand-defaults"]"#,
        "",
    ))
    .await;
    let list = get(&env, "/__manage__/").await.json();
    for name in ["check", "migrate", "dumpdata", "diffsettings"] {
        assert_eq!(find(&list, name)["available"], true, "{name}");
    }
    // Commands of the default list this project does not have are listed
    // as unavailable, and refused.
    assert_eq!(find(&list, "dbbackup")["available"], false);
    assert!(list["commands"]
        .as_array()
        .unwrap()
        .iter()
        .all(|c| c["name"] != "flush" && c["name"] != "ops_report"));
    assert_eq!(run(&env, "dbbackup", "").await.status, 503);
    assert_eq!(run(&env, "ops_report", "").await.status, 403);
    let r = run(&env, "check", "").await;
    assert_eq!(r.json()["status"], "succeeded", "{}", r.text());
}
