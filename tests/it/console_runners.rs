//! The operator console with live runners, in headless Chromium: the
//! compiled gateway over TLS with `commands.execute = "runners"` and two real
//! `portcullis runner` processes dialled in. What an operator sees: the
//! Runners view lists both with their state and the job each is running, a
//! job run from the console names the runner it ran on (in its result and in
//! the Jobs view, whose Runner filter finds it), and a stopped runner shows as
//! no longer connected once its lease has run out.

use crate::console::{browser_available, run_driver, text};
use crate::support::runners::Net;
use serde_json::Value;
use std::collections::BTreeMap;

/// The runners' own commands: `hello` says which runner ran it, `nap` says so
/// and sleeps (cancelled by the console).
fn runner_commands(name: &str) -> String {
    format!(
        r#"allow = []
[[commands.custom]]
name = "hello"
argv = ["sh", "-c", "echo hello from {name}"]
[[commands.custom]]
name = "nap"
argv = ["sh", "-c", "echo napping on {name}; exec sleep 30"]
"#
    )
}

/// The rows of a table the driver read, as {column: text}, by the column
/// named `key`.
fn rows_by(seen: &Value, field: &str, key: &str) -> BTreeMap<String, BTreeMap<String, String>> {
    seen[field]
        .as_array()
        .unwrap_or_else(|| panic!("{field} missing: {seen}"))
        .iter()
        .map(|row| {
            let cells: BTreeMap<String, String> = row
                .as_object()
                .unwrap()
                .iter()
                .map(|(k, v)| (k.clone(), text(v).to_owned()))
                .collect();
            (cells[key].clone(), cells)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_runners_view_follows_live_runners_and_jobs_name_theirs() {
    if !browser_available() {
        return;
    }
    let n = Net::new();
    n.write_gateway(
        "allow = [\"hello\", \"nap\"]\n[commands.rules.hello]\ngroup = \"web\"\n[commands.rules.nap]\ngroup = \"web\"",
        &[("web-1", "tok-web-1", "web"), ("web-2", "tok-web-2", "web")],
    );
    let _gw = n.start_gateway().await;
    let _web1 = n.start_runner("web-1", "tok-web-1", "web", &runner_commands("web-1"));
    let web2 = n.start_runner("web-2", "tok-web-2", "web", &runner_commands("web-2"));
    n.wait_connected(&["web-1", "web-2"]).await;

    let base = format!("https://{}", n.addr);
    let pid = web2.pid().to_string();
    let seen = run_driver(
        &base,
        &[
            ("CONSOLE_SCENARIO", "runners".as_ref()),
            ("CONSOLE_STOP_PID", pid.as_ref()),
            ("CONSOLE_STOP_NAME", "web-2".as_ref()),
        ],
    )
    .await;

    // Every request stayed on the gateway's origin and API.
    for url in seen["requests"].as_array().unwrap() {
        assert!(
            text(url).starts_with(&format!("{base}/__manage__/")),
            "request off the gateway's origin or API: {url}"
        );
    }
    assert_eq!(
        seen["unlabelled"]["runners"],
        serde_json::json!([]),
        "{seen}"
    );

    let width = seen["phone_widths"]["runners"].as_u64().unwrap_or(u64::MAX);
    assert!(width <= 390, "the Runners view at phone width: {width}");

    // Both runners listed, connected, with their group, version and last poll.
    let rows = rows_by(&seen, "runners_connected", "Name");
    assert_eq!(
        rows.keys().collect::<Vec<_>>(),
        ["web-1", "web-2"],
        "{seen}"
    );
    for (name, row) in &rows {
        assert_eq!(row["Groups"], "web", "{name}: {row:?}");
        assert_eq!(row["Connected"], "connected", "{name}: {row:?}");
        assert_eq!(row["Running jobs"], "none", "{name}: {row:?}");
        assert_ne!(row["Last seen"], "never", "{name}: {row:?}");
        assert_ne!(row["Version"], "—", "{name}: {row:?}");
    }

    // The long job ran on one runner: its result names it, its output comes
    // from it, and the Runners view lists the job on that runner's row only.
    let nap_job = text(&seen["nap_job"]);
    let nap_runner = text(&seen["nap_runner"]);
    assert!(
        text(&seen["nap_output"]).contains(&format!("napping on {nap_runner}")),
        "{seen}"
    );
    for (name, row) in rows_by(&seen, "runners_while_napping", "Name") {
        let expected = if name == nap_runner { nap_job } else { "none" };
        assert_eq!(row["Running jobs"], expected, "{name}: {row:?}");
    }
    assert_eq!(seen["nap_status"], "cancelled");

    // The short one: output and runner agree with the gateway's record.
    let hello_job = text(&seen["hello_job"]);
    let hello_runner = text(&seen["hello_runner"]);
    assert_eq!(
        text(&seen["hello_output"]).trim_end(),
        format!("hello from {hello_runner}")
    );
    let rec = n.job(hello_job).await;
    assert_eq!(rec["runner"], hello_runner, "{rec}");
    assert_eq!(rec["status"], "succeeded", "{rec}");

    // The Jobs view, newest first, with a Runner column; its filter.
    assert_eq!(seen["runner_column_visible"], true);
    assert_eq!(seen["jobs_ids"], serde_json::json!([hello_job, nap_job]));
    let jobs = rows_by(&seen, "jobs_rows", "Command");
    assert_eq!(jobs["hello"]["Runner"], hello_runner, "{jobs:?}");
    assert_eq!(jobs["hello"]["Status"], "succeeded", "{jobs:?}");
    assert_eq!(jobs["nap"]["Runner"], nap_runner, "{jobs:?}");
    assert_eq!(jobs["nap"]["Status"], "cancelled", "{jobs:?}");
    let filtered: Vec<&str> = seen["jobs_filtered_runner"]
        .as_array()
        .unwrap()
        .iter()
        .map(text)
        .collect();
    let mut expected = vec![hello_job];
    if nap_runner == hello_runner {
        expected.push(nap_job);
    }
    assert_eq!(filtered, expected);

    // web-2 stopped: shown as no longer connected, web-1 still connected.
    let after = rows_by(&seen, "runners_after_stop", "Name");
    assert_eq!(after["web-2"]["Connected"], "not connected", "{after:?}");
    assert_eq!(after["web-1"]["Connected"], "connected", "{after:?}");
}
