//! The real `portcullis` binary: a crash (SIGKILL) in the middle of a run
//! loses no acknowledged audit line and the interrupted job reads `failed`
//! ("gateway restarted") after a restart; `portcullis audit verify` points at
//! the first edited, deleted or reordered line, and with the anchor the
//! process logged (`--anchor`) also at records deleted from the end.

use crate::support::commands::*;
use crate::support::{check_with_secrets, free_addr, send_signal, spawn_listening, BIN};
use http::Method;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// A configuration file in `dir` with `commands`, listening on a free
/// loopback port.
fn binary_config(dir: &Path, commands: &str) -> (PathBuf, SocketAddr) {
    let addr = free_addr();
    let text = config_text(dir, commands).replace(
        "[backend]",
        &format!("[server]\nlisten = \"{addr}\"\n\n[backend]"),
    );
    let config = dir.join("portcullis.toml");
    std::fs::write(&config, text).unwrap();
    (config, addr)
}

async fn start_binary(config: &Path, addr: SocketAddr) -> ChildGuard {
    start_binary_logging(config, addr, Stdio::inherit()).await
}

/// [`start_binary`] with its process log (at `PORTCULLIS_LOG=warn`) to `stderr`.
async fn start_binary_logging(config: &Path, addr: SocketAddr, stderr: Stdio) -> ChildGuard {
    let mut cmd = Command::new(BIN);
    cmd.args(["run", "--config"])
        .arg(config)
        .env("PORTCULLIS_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr);
    spawn_listening(cmd, addr).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_mid_run_then_restart_marks_the_job_failed() {
    let dir = tempfile::tempdir().unwrap();
    let (config, addr) = binary_config(
        dir.path(),
        r#"
sync_wait = "0s"
[[commands.custom]]
name = "echo"
argv = ["echo", "hello"]
[[commands.custom]]
name = "long"
argv = ["sleep", "37.71"]
"#,
    );
    let audit_path = dir.path().join("audit.jsonl");

    let mut gw = start_binary(&config, addr).await;
    let r = send(addr, Method::POST, "/__manage__/long", Some(ALICE), "", &[]).await;
    assert_eq!(r.status, 202, "{}", r.text());
    let id = r.json()["id"].as_str().unwrap().to_owned();
    // Running, and its pid recorded (written right after spawn) so the
    // restarted gateway can find what is left of it.
    let pid_file = dir.path().join("state/running").join(&id);
    let mut running = false;
    for _ in 0..100 {
        if process_with("sleep 37.71") && pid_file.exists() {
            running = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(running);
    // The accepted line was acknowledged (202): it must be on disk.
    let before = audit_lines(&audit_path);
    assert_eq!(before.len(), 1);
    assert_eq!(before[0]["event"], "accepted");

    gw.child().kill().unwrap(); // SIGKILL
    gw.child().wait().unwrap();
    drop(gw);

    let _gw = start_binary(&config, addr).await;
    let job = send(
        addr,
        Method::GET,
        &format!("/__manage__/jobs/{id}"),
        Some(ALICE),
        "",
        &[],
    )
    .await;
    assert_eq!(job.status, 200, "{}", job.text());
    let job = job.json();
    assert_eq!(job["status"], "failed");
    assert_eq!(job["reason"], "gateway restarted");
    // The orphaned process group was killed on restart.
    let gone = no_process_with("sleep 37.71").await;
    if !gone {
        let ps = Command::new("ps")
            .args(["-eo", "pid,ppid,pgid,stat,cmd"])
            .output()
            .unwrap();
        panic!(
            "process left behind:\n{}",
            String::from_utf8_lossy(&ps.stdout)
        );
    }

    let after = audit_lines(&audit_path);
    assert_eq!(after.len(), 2, "{after:?}");
    assert_eq!(after[0], before[0]);
    assert_eq!(after[1]["event"], "finished");
    assert_eq!(after[1]["status"], "failed");
    assert_eq!(after[1]["reason"], "gateway restarted");
    assert_eq!(after[1]["job_id"], id.as_str());

    // The restarted gateway keeps working and the chain stays intact.
    let r = send(addr, Method::POST, "/__manage__/echo", Some(ALICE), "", &[]).await;
    assert!(r.status == 200 || r.status == 202, "{}", r.text());
    let out = verify_cli(&audit_path);
    assert_eq!(out.0, 0, "{}", out.1);
    assert!(out.1.contains("OK"), "{}", out.1);
}

/// The process log's audit anchors survive a quiet log level, and with the
/// last one `audit verify --anchor` catches lines deleted at the end of the
/// log, which the hash chain alone cannot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn process_log_anchor_catches_a_log_cut_short() {
    let dir = tempfile::tempdir().unwrap();
    let (config, addr) = binary_config(
        dir.path(),
        r#"
[[commands.custom]]
name = "echo"
argv = ["echo", "hello"]
"#,
    );
    let audit_path = dir.path().join("audit.jsonl");
    let stderr_path = dir.path().join("stderr.log");

    let log = std::fs::File::create(&stderr_path).unwrap();
    let gw = start_binary_logging(&config, addr, log.into()).await;
    for _ in 0..2 {
        let r = send(addr, Method::POST, "/__manage__/echo", Some(ALICE), "", &[]).await;
        assert!(r.status == 200 || r.status == 202, "{}", r.text());
    }
    // Two runs: accepted and finished each.
    let mut lines = Vec::new();
    for _ in 0..100 {
        lines = audit_lines(&audit_path);
        if lines.len() >= 4 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(lines.len(), 4, "{lines:?}");
    let mut anchor = None;
    for _ in 0..100 {
        let log = std::fs::read_to_string(&stderr_path).unwrap();
        anchor = log
            .lines()
            .rev()
            .find(|l| l.contains("audit record written"))
            .and_then(|l| {
                let field = |name: &str| {
                    l.split_whitespace()
                        .find_map(|w| w.strip_prefix(name))
                        .map(str::to_owned)
                };
                Some(format!("{}:{}", field("seq=")?, field("head=")?))
            })
            .filter(|a| a.starts_with("4:"));
        if anchor.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(gw);
    let anchor = anchor.expect("an anchor for record 4 in the process log");

    let (code, out) = verify_anchored_cli(&audit_path, &anchor);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("OK, 4 lines"), "{out}");

    // The last two records deleted: the chain alone still looks intact.
    let text = std::fs::read_to_string(&audit_path).unwrap();
    let kept: Vec<&str> = text.lines().take(2).collect();
    std::fs::write(&audit_path, kept.join("\n") + "\n").unwrap();
    let (code, out) = verify_cli(&audit_path);
    assert_eq!(code, 0, "{out}");
    let (code, out) = verify_anchored_cli(&audit_path, &anchor);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("line 3:") && out.contains("deleted"), "{out}");

    // A malformed anchor is a usage error, not a verdict.
    let (code, _) = verify_anchored_cli(&audit_path, "four:abc");
    assert_eq!(code, 2);
}

fn verify_anchored_cli(path: &Path, anchor: &str) -> (i32, String) {
    run_verify(path, &["--anchor", anchor])
}

fn verify_cli(path: &Path) -> (i32, String) {
    run_verify(path, &[])
}

/// `portcullis audit verify [OPTIONS] FILE`: exit code and stdout.
fn run_verify(path: &Path, options: &[&str]) -> (i32, String) {
    let out = Command::new(BIN)
        .args(["audit", "verify"])
        .args(options)
        .arg(path)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

fn write_log(dir: &Path, n: usize) -> (PathBuf, Vec<String>) {
    let path = dir.join("audit.jsonl");
    let log = portcullis::audit::AuditLog::open(&path).unwrap();
    for i in 0..n {
        let mut e = portcullis::audit::Entry::new(
            portcullis::audit::Event::Accepted,
            &format!("req-{i}"),
            "accepted",
        );
        e.operator = Some("alice".into());
        e.command = Some("migrate".into());
        log.append(&e).unwrap();
    }
    let lines = std::fs::read_to_string(&path)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    (path, lines)
}

#[test]
fn audit_verify_points_at_the_tampered_line() {
    let dir = tempfile::tempdir().unwrap();
    let (path, orig) = write_log(dir.path(), 6);
    let (code, out) = verify_cli(&path);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("6 lines"), "{out}");

    let copy = dir.path().join("copy.jsonl");
    let write = |lines: &[String]| std::fs::write(&copy, lines.join("\n") + "\n").unwrap();

    // Edited: line 4's operator changed.
    let mut edited = orig.clone();
    edited[3] = edited[3].replace("\"alice\"", "\"mallory\"");
    write(&edited);
    let (code, out) = verify_cli(&copy);
    assert_eq!(code, 1);
    assert!(out.contains("line 4:") && out.contains("edited"), "{out}");

    // Deleted: line 3 removed.
    let mut deleted = orig.clone();
    deleted.remove(2);
    write(&deleted);
    let (code, out) = verify_cli(&copy);
    assert_eq!(code, 1);
    assert!(out.contains("line 3:") && out.contains("deleted"), "{out}");

    // Reordered: lines 5 and 6 swapped.
    let mut swapped = orig.clone();
    swapped.swap(4, 5);
    write(&swapped);
    let (code, out) = verify_cli(&copy);
    assert_eq!(code, 1);
    assert!(out.contains("line 5:"), "{out}");

    // Unreadable file.
    let (code, _) = verify_cli(&dir.path().join("missing.jsonl"));
    assert_eq!(code, 2);
}

/// The commented `[commands]` example in `config/portcullis.toml`, once
/// uncommented, passes `portcullis check` (the docs cannot drift from the code).
#[test]
fn commented_commands_example_passes_check() {
    let root = env!("CARGO_MANIFEST_DIR");
    let text = std::fs::read_to_string(format!("{root}/config/portcullis.toml")).unwrap();
    let marker = "# [[operators]]";
    let start = text.find(marker).expect("commented [commands] example");
    let dir = tempfile::tempdir().unwrap();
    let uncommented: String = text[start..]
        .lines()
        .map(|l| match l.strip_prefix("# ") {
            Some(rest) if !rest.starts_with('#') => rest.to_owned(),
            _ if l == "#" => String::new(),
            _ => l.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("\n")
        .replace(
            "sha256:<hex>",
            &portcullis::secret::hash_form(b"operator-token"),
        )
        .replace("/var/lib/portcullis", &dir.path().display().to_string())
        .replace(
            "/var/log/portcullis/audit.jsonl",
            &dir.path().join("audit.jsonl").display().to_string(),
        );
    let config = dir.path().join("portcullis.toml");
    std::fs::write(&config, format!("{}{uncommented}\n", &text[..start])).unwrap();
    let out = check_with_secrets(&config);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("remote operations: 1 operators, django preset on, allowlist (3 names), 1 custom commands, 1 schedules"),
        "{stdout}"
    );
}

/// A leaked operator token is revoked by editing the file and SIGHUP: the
/// old token is refused (401) from the next request on, the new one works,
/// a changed command list applies too, and a setting only a restart applies
/// is named in the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changed_operator_token_applies_on_sighup() {
    let dir = tempfile::tempdir().unwrap();
    let commands = r#"
[[commands.custom]]
name = "echo"
argv = ["echo", "hello"]

[[commands.custom]]
name = "date"
argv = ["date"]
"#;
    let (config, addr) = binary_config(dir.path(), commands);
    let log = dir.path().join("gateway.log");
    let gw = start_binary_logging(
        &config,
        addr,
        Stdio::from(std::fs::File::create(&log).unwrap()),
    )
    .await;
    let post = |token: &'static str, cmd: &'static str| async move {
        send(
            addr,
            Method::POST,
            &format!("/__manage__/{cmd}"),
            Some(token),
            "",
            &[],
        )
        .await
        .status
    };
    assert_eq!(post(ALICE, "echo").await, 200);
    assert_eq!(post(BOB, "echo").await, 200);
    assert_eq!(post(BOB, "date").await, 403);

    // alice's token replaced, bob may now run date, max_concurrent changed.
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace(
            &format!("token = \"{ALICE}\""),
            "token = \"alice-new-token\"",
        )
        .replace("commands = [\"echo\"]", "commands = [\"echo\", \"date\"]")
        .replace("[commands]\n", "[commands]\nmax_concurrent = 2\n");
    std::fs::write(&config, text).unwrap();
    send_signal(&gw, "-HUP");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while post(ALICE, "echo").await != 401 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "old token still accepted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(post("alice-new-token", "echo").await, 200);
    assert_eq!(post(BOB, "date").await, 200);
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        logged.contains("commands.max_concurrent takes effect only after a restart"),
        "{logged}"
    );
    assert!(
        !logged.contains("alice-new-token") && !logged.contains(ALICE),
        "{logged}"
    );
}

/// The Django preset has no implicit allow list: `portcullis check` says how
/// to write one; the djangocommand list is there when asked for by name.
#[test]
fn django_preset_without_allow_fails_check() {
    let dir = tempfile::tempdir().unwrap();
    let check = |commands: &str| {
        let (config, _) = binary_config(dir.path(), commands);
        let out = check_with_secrets(&config);
        let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&out.stderr));
        (out.status.code(), text)
    };
    let preset = r#"django = { python = "python3", manage_py = "/srv/app/manage.py" }
[[commands.custom]]
name = "echo"
argv = ["echo", "hi"]"#;
    let (code, text) = check(preset);
    assert_eq!(code, Some(64), "{text}");
    assert!(
        text.contains("commands.allow")
            && text.contains(r#"allow = ["check", "migrate"]"#)
            && text.contains("@djangocommand-defaults"),
        "{text}"
    );
    let (code, text) = check(&format!("allow = [\"@djangocommand-defaults\"]\n{preset}"));
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("allowlist (33 names)"), "{text}");
}
