//! The remote operations service (`/__manage__`) for the `commands_*` tests:
//! a temp config with two operators, the real gateway serving it on a
//! loopback port, requests as an operator, and audit-log readers.

use super::client::Req;
pub use super::client::Resp;
use super::gateway::Gateway;
use super::process::{free_addr, spawn_listening, BIN};
pub use super::process::{
    no_process_with, process_appears, process_with, zombie_children, ChildGuard,
};
use http::Method;
use portcullis::commands::Commands;
use portcullis::config::Config;
use serde_json::Value;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

/// Operator tokens used by the tests.
pub const ALICE: &str = "alice-token";
pub const BOB: &str = "bob-token";

/// A running remote-operations service on 127.0.0.1.
pub struct Env {
    pub dir: tempfile::TempDir,
    pub addr: SocketAddr,
    pub commands: Arc<Commands>,
    _gateway: Gateway,
}

impl Drop for Env {
    fn drop(&mut self) {
        // Nothing a test started may outlive it, even when it fails.
        self.commands.kill_all();
    }
}

/// The full configuration text for a test, with `commands` as the body of the
/// `[commands]` table (state and audit paths already set).
pub fn config_text(dir: &Path, commands: &str) -> String {
    format!(
        r#"
[backend]
url = "http://127.0.0.1:9"

[[api_keys]]
name = "app"
key = "device-key"

[[operators]]
name = "alice"
token = "{ALICE}"

[[operators]]
name = "bob"
token = "sha256:{bob}"
commands = ["echo"]

[commands]
state_dir = "{state}"
{audit}
{commands}
"#,
        bob = portcullis::secret::hex(&portcullis::secret::sha256(BOB.as_bytes())),
        state = dir.join("state").display(),
        audit = if commands.contains("audit_log") {
            String::new()
        } else {
            format!("audit_log = \"{}\"", dir.join("audit.jsonl").display())
        },
    )
}

/// Parses a test configuration, panicking with every problem.
pub fn config(dir: &Path, commands: &str) -> Config {
    match Config::parse(&config_text(dir, commands)) {
        Ok(c) => c,
        Err(p) => panic!("bad test config:\n{p}"),
    }
}

/// Starts the service for `commands` and serves `/__manage__` on a real socket.
pub async fn start(commands: &str) -> Env {
    let dir = tempfile::tempdir().unwrap();
    start_in(dir, commands).await
}

/// Like [`start`], in a given directory: the real gateway
/// (`gateway::State` + `server::serve`) on 127.0.0.1:0.
pub async fn start_in(dir: tempfile::TempDir, commands: &str) -> Env {
    let cfg = config(dir.path(), commands);
    let state = portcullis::gateway::State::new(cfg).unwrap();
    state.start_commands().await.unwrap();
    let cmds = Arc::clone(state.commands().unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let gateway = Gateway::serve(listener, state);
    Env {
        dir,
        addr: gateway.addr,
        commands: cmds,
        _gateway: gateway,
    }
}

/// A request to the service, as operator `token` (a bearer token) if any.
fn request(
    addr: SocketAddr,
    method: Method,
    path: &str,
    token: Option<&str>,
    body: &str,
    headers: &[(&str, &str)],
) -> Req {
    let mut req = Req::new(addr, method.as_str(), path).body(body.to_owned());
    if let Some(t) = token {
        req = req.header("authorization", &format!("Bearer {t}"));
    }
    for (k, v) in headers {
        req = req.header(k, v);
    }
    req
}

/// Sends one request (fresh connection) and reads the whole answer.
pub async fn send(
    addr: SocketAddr,
    method: Method,
    path: &str,
    token: Option<&str>,
    body: &str,
    headers: &[(&str, &str)],
) -> Resp {
    request(addr, method, path, token, body, headers)
        .send()
        .await
}

/// Sends one request and returns the response with its body still streaming.
pub async fn open(
    addr: SocketAddr,
    method: Method,
    path: &str,
    token: Option<&str>,
    body: &str,
    headers: &[(&str, &str)],
) -> http::Response<hyper::body::Incoming> {
    request(addr, method, path, token, body, headers)
        .send_streaming()
        .await
}

/// `POST /__manage__/<cmd>` as alice.
pub async fn run(env: &Env, cmd: &str, body: &str) -> Resp {
    send(
        env.addr,
        Method::POST,
        &format!("/__manage__/{cmd}"),
        Some(ALICE),
        body,
        &[],
    )
    .await
}

/// [`run`] in a task of its own, for a job that outlives `sync_wait` or
/// that the test acts on while the request is still open.
pub fn run_in_background(env: &Env, cmd: &str, body: &str) -> tokio::task::JoinHandle<Resp> {
    let (addr, path, body) = (env.addr, format!("/__manage__/{cmd}"), body.to_owned());
    tokio::spawn(async move { send(addr, Method::POST, &path, Some(ALICE), &body, &[]).await })
}

/// The id of the first job the audit log shows accepted and the job store
/// holds (waits up to 5 s).
pub async fn accepted_job_id(env: &Env) -> String {
    for _ in 0..250 {
        // The line may not be written yet.
        let id = env
            .audit()
            .iter()
            .find_map(|line| line["job_id"].as_str().map(str::to_owned));
        // The `accepted` line is fsynced before the job record is committed:
        // wait until the job itself can be read too.
        if let Some(id) = id {
            if get(env, &format!("/__manage__/jobs/{id}")).await.status == 200 {
                return id;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("no job was accepted");
}

/// `POST /__manage__/jobs/<id>/cancel` as alice.
pub async fn cancel(env: &Env, id: &str) -> Resp {
    run(env, &format!("jobs/{id}/cancel"), "").await
}

/// `GET path` as alice.
pub async fn get(env: &Env, path: &str) -> Resp {
    send(env.addr, Method::GET, path, Some(ALICE), "", &[]).await
}

/// Polls a job until it has a final status (at most `secs` seconds).
pub async fn wait_job(env: &Env, id: &str, secs: u64) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        let r = get(env, &format!("/__manage__/jobs/{id}")).await;
        assert_eq!(r.status, 200, "{}", r.text());
        let v = r.json();
        let st = v["status"].as_str().unwrap().to_owned();
        if st != "queued" && st != "running" {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "job {id} still {st} after {secs}s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The audit log's complete lines, parsed (a line the gateway is writing
/// right now, without its newline yet, is left out).
pub fn audit_lines(path: &Path) -> Vec<Value> {
    match std::fs::read_to_string(path) {
        Ok(t) => t
            .split_inclusive('\n')
            .filter(|l| l.ends_with('\n'))
            .map(|l| serde_json::from_str(l.trim_end()).unwrap())
            .collect(),
        Err(_) => Vec::new(),
    }
}

impl Env {
    pub fn audit_path(&self) -> PathBuf {
        self.dir.path().join("audit.jsonl")
    }

    pub fn audit(&self) -> Vec<Value> {
        audit_lines(&self.audit_path())
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

// ------------------------------------------------ the compiled binary

/// A configuration file in `dir` with `commands`, listening on a free
/// loopback port.
pub fn binary_config(dir: &Path, commands: &str) -> (PathBuf, SocketAddr) {
    let addr = free_addr();
    let text = config_text(dir, commands).replace(
        "[backend]",
        &format!("[server]\nlisten = \"{addr}\"\n\n[backend]"),
    );
    let config = dir.join("portcullis.toml");
    std::fs::write(&config, text).unwrap();
    (config, addr)
}

/// The compiled binary running `config`, once it listens on `addr`.
pub async fn start_binary(config: &Path, addr: SocketAddr) -> ChildGuard {
    start_binary_logging(config, addr, Stdio::inherit()).await
}

/// [`start_binary`] with its process log (at `PORTCULLIS_LOG=warn`) to `stderr`.
pub async fn start_binary_logging(config: &Path, addr: SocketAddr, stderr: Stdio) -> ChildGuard {
    let mut cmd = Command::new(BIN);
    cmd.args(["run", "--config"])
        .arg(config)
        .env("PORTCULLIS_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr);
    spawn_listening(cmd, addr).await
}

/// The Django project the remote-operations tests drive.
pub fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/django")
}

/// Whether Django is importable by `python3`. Without it the Django tests
/// say so and pass, unless `CI` is set, where they fail.
pub fn django_available() -> bool {
    let ok = std::process::Command::new("python3")
        .args(["-c", "import django"])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        assert!(
            std::env::var_os("CI").is_none(),
            "Django is not installed: run scripts/test"
        );
        eprintln!("SKIPPED: Django is not installed (scripts/test installs it)");
    }
    ok
}

/// The `[commands]` body for the Django fixture: `head` first (mode, allow),
/// the preset, `extra` (rules and the like), then the custom command `echo`
/// (bob's only command).
pub fn django_commands(head: &str, extra: &str) -> String {
    let root = fixture();
    format!(
        r#"
{head}
django = {{ python = "python3", manage_py = "{manage}", cwd = "{root}" }}
sync_wait = "20s"
kill_grace = "2s"
env = ["PATH", "PYTHONPATH", "HOME"]
{extra}

[[commands.custom]]
name = "echo"
argv = ["echo", "hi"]
"#,
        manage = root.join("manage.py").display(),
        root = root.display(),
    )
}

/// The entry of command `name` in a `GET /__manage__/` answer.
pub fn listed_command(listing: &Value, name: &str) -> Value {
    listing["commands"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["name"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("{name} not listed: {listing}"))
}
