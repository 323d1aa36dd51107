//! Builders shared by the `commands_*` tests: a temp config, the remote
//! operations service behind a real HTTP listener, a tiny HTTP client, and
//! audit-log readers.
#![allow(dead_code)]

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use portcullis::commands::Commands;
use portcullis::config::Config;
use serde_json::Value;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;

/// Operator tokens used by the tests.
pub const ALICE: &str = "alice-token";
pub const BOB: &str = "bob-token";

/// A running remote-operations service on 127.0.0.1.
pub struct Env {
    pub dir: tempfile::TempDir,
    pub addr: SocketAddr,
    pub commands: Arc<Commands>,
    server: tokio::task::JoinHandle<()>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl Drop for Env {
    fn drop(&mut self) {
        // Nothing a test started may outlive it, even when it fails.
        self.commands.kill_all();
        self.server.abort();
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
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        let _ = portcullis::server::serve(listener, state, async {
            let _ = stopped.await;
        })
        .await;
    });
    Env {
        dir,
        addr,
        commands: cmds,
        server,
        _stop: stop,
    }
}

/// A response as a test sees it.
#[derive(Debug)]
pub struct Resp {
    pub status: StatusCode,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Resp {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|_| panic!("not JSON: {:?}", String::from_utf8_lossy(&self.body)))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
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
    let resp = open(addr, method, path, token, body, headers).await;
    let (parts, body) = resp.into_parts();
    let body = tokio::time::timeout(Duration::from_secs(30), body.collect())
        .await
        .expect("response body took too long")
        .unwrap()
        .to_bytes();
    Resp {
        status: parts.status,
        headers: parts.headers,
        body,
    }
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
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "gw");
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::new(Bytes::from(body.to_owned()))).unwrap();
    tokio::time::timeout(Duration::from_secs(30), sender.send_request(req))
        .await
        .expect("no response in time")
        .unwrap()
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

/// Whether any process on the machine has `needle` in its command line.
pub fn process_with(needle: &str) -> bool {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return false;
    };
    for entry in dir.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|s| s.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        if let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) {
            let text = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if text.contains(needle) {
                // Zombies have an empty cmdline, so this is a live process.
                return true;
            }
        }
    }
    false
}

/// Zombie children of this test process.
pub fn zombie_children() -> usize {
    let me = std::process::id().to_string();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0;
    };
    dir.flatten()
        .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
        .filter(|stat| {
            let Some(rest) = stat.rfind(')').and_then(|i| stat.get(i + 1..)) else {
                return false;
            };
            let mut f = rest.split_whitespace();
            f.next() == Some("Z") && f.next() == Some(me.as_str())
        })
        .count()
}

/// Waits until no process has `needle` in its command line (at most 5 s).
pub async fn no_process_with(needle: &str) -> bool {
    for _ in 0..100 {
        if !process_with(needle) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
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
