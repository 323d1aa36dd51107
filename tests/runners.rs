//! Runners as real processes: the compiled gateway over TLS (a dev CA) with
//! `execute = "runners"`, and `portcullis runner` processes on loopback that
//! dial in, running custom argv commands and the Django fixture project.

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use serde_json::Value;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

const ALICE: &str = "alice-token";

/// A child process, SIGKILLed and reaped when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Proc {
    fn pid(&self) -> u32 {
        self.0.id()
    }
}

struct Net {
    dir: tempfile::TempDir,
    addr: SocketAddr,
    admin: SocketAddr,
    ca: PathBuf,
    tls: portcullis::tls::BackendTls,
    config: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn net() -> Net {
    let dir = tempfile::tempdir().unwrap();
    let ca = portcullis::devcerts::DevCa::new("runner test CA").unwrap();
    let server = ca.issue_server(&["127.0.0.1", "localhost"]).unwrap();
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let ca_path = write("ca.crt", &ca.ca.cert_pem);
    let cert = write("server.crt", &server.cert_pem);
    let key = write("server.key", &server.key_pem);
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let tls = portcullis::tls::BackendTls::new("127.0.0.1", Some(&ca_path), None).unwrap();
    let config = dir.path().join("gateway.toml");
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    Net {
        dir,
        addr,
        admin,
        ca: ca_path,
        tls,
        config,
        cert,
        key,
    }
}

/// Gateway configuration: `commands` is the `[commands]` body, `runners` the
/// `[[runners]]` entries (name, token, groups).
fn write_gateway(n: &Net, commands: &str, runners: &[(&str, &str, &str)]) {
    let mut text = format!(
        r#"
[server]
listen = "{addr}"
admin_listen = "{admin}"
tls = {{ cert = {cert:?}, key = {key:?} }}

[backend]
url = "http://127.0.0.1:9"

[[api_keys]]
name = "app"
key = "device-key"

[[operators]]
name = "alice"
token = "{ALICE}"

[commands]
execute = "runners"
lease = "2s"
sync_wait = "0s"
state_dir = "{state}"
audit_log = "{audit}"
{commands}
"#,
        addr = n.addr,
        admin = n.admin,
        cert = n.cert,
        key = n.key,
        state = n.dir.path().join("state").display(),
        audit = n.dir.path().join("audit.jsonl").display(),
    );
    for (name, token, group) in runners {
        text.push_str(&format!(
            "\n[[runners]]\nname = \"{name}\"\ntoken = \"sha256:{}\"\ngroups = [\"{group}\"]\n",
            portcullis::secret::hex(&portcullis::secret::sha256(token.as_bytes()))
        ));
    }
    std::fs::write(&n.config, text).unwrap();
}

async fn start_gateway(n: &Net) -> Proc {
    let child = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["run", "--config"])
        .arg(&n.config)
        .env("PORTCULLIS_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let p = Proc(child);
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(n.addr).await.is_ok() {
            return p;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("the gateway did not start");
}

/// Starts `portcullis runner` with `commands` as its `[commands]` body.
fn start_runner(n: &Net, name: &str, token: &str, group: &str, commands: &str) -> Proc {
    let path = n.dir.path().join(format!("{name}.toml"));
    std::fs::write(
        &path,
        format!(
            r#"
gateway = "https://127.0.0.1:{port}"
ca = {ca:?}
name = "{name}"
token = "{token}"
groups = ["{group}"]

[commands]
kill_grace = "1s"
{commands}
"#,
            port = n.addr.port(),
            ca = n.ca,
        ),
    )
    .unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["runner", "--config"])
        .arg(&path)
        .env("PORTCULLIS_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    Proc(child)
}

struct Resp {
    status: StatusCode,
    body: Bytes,
}

impl Resp {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|_| panic!("not JSON: {:?}", String::from_utf8_lossy(&self.body)))
    }
}

async fn open(
    n: &Net,
    method: Method,
    path: &str,
    body: &str,
    headers: &[(&str, &str)],
) -> http::Response<hyper::body::Incoming> {
    let tcp = tokio::net::TcpStream::connect(n.addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::clone(&n.tls.config))
        .connect(n.tls.server_name.clone(), tcp)
        .await
        .unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "127.0.0.1")
        .header("authorization", format!("Bearer {ALICE}"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::new(Bytes::from(body.to_owned()))).unwrap();
    tokio::time::timeout(Duration::from_secs(30), sender.send_request(req))
        .await
        .expect("no answer in time")
        .unwrap()
}

async fn send(n: &Net, method: Method, path: &str, body: &str) -> Resp {
    let resp = open(n, method, path, body, &[]).await;
    let status = resp.status();
    let body = tokio::time::timeout(Duration::from_secs(30), resp.into_body().collect())
        .await
        .unwrap()
        .unwrap()
        .to_bytes();
    Resp { status, body }
}

async fn post(n: &Net, cmd: &str) -> Resp {
    send(n, Method::POST, &format!("/__manage__/{cmd}"), "{}").await
}

async fn job(n: &Net, id: &str) -> Value {
    send(n, Method::GET, &format!("/__manage__/jobs/{id}"), "")
        .await
        .json()
}

/// Waits until job `id` has ended; returns its record.
async fn wait_end(n: &Net, id: &str) -> Value {
    for _ in 0..400 {
        let rec = job(n, id).await;
        let s = rec["status"].as_str().unwrap_or_default().to_owned();
        if s != "running" && s != "queued" {
            return rec;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("job {id} did not end");
}

async fn output(n: &Net, id: &str) -> String {
    let r = send(n, Method::GET, &format!("/__manage__/jobs/{id}/output"), "").await;
    String::from_utf8_lossy(&r.body).into_owned()
}

/// Waits until `names` are all connected (`GET /__manage__/runners`).
async fn wait_connected(n: &Net, names: &[&str]) {
    for _ in 0..200 {
        let list = send(n, Method::GET, "/__manage__/runners", "").await.json();
        let up = |name: &str| {
            list["runners"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|r| r["name"] == name && r["connected"] == true)
        };
        if names.iter().all(|x| up(x)) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("runners {names:?} did not connect");
}

/// The admin listener's `/metrics` text.
async fn metrics(n: &Net) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(n.admin).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

/// Audit lines, parsed.
fn audit(n: &Net) -> Vec<Value> {
    std::fs::read_to_string(n.dir.path().join("audit.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Socket inodes of `pid` that are listening TCP sockets.
fn listening_sockets(pid: u32) -> Vec<String> {
    let mut inodes = Vec::new();
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
    {
        if let Ok(target) = std::fs::read_link(fd.path()) {
            let t = target.to_string_lossy().into_owned();
            if let Some(inode) = t.strip_prefix("socket:[").and_then(|s| s.strip_suffix(']')) {
                inodes.push(inode.to_owned());
            }
        }
    }
    let mut listening = Vec::new();
    for table in ["tcp", "tcp6"] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            // Columns: sl local rem st ... inode (10th).
            if cols.get(3) == Some(&"0A") {
                if let Some(inode) = cols.get(9) {
                    if inodes.iter().any(|i| i == inode) {
                        listening.push(inode.to_string());
                    }
                }
            }
        }
    }
    listening
}

fn pid_alive(pid: i32) -> bool {
    // Signal 0: only checks the process exists (a zombie counts as gone).
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    !stat.is_empty() && !stat.contains(") Z ")
}

fn read_pid(path: &Path) -> Option<i32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Waits until the command wrote its pid to `path`.
async fn wait_pid(path: &Path) -> i32 {
    for _ in 0..250 {
        if let Some(pid) = read_pid(path) {
            return pid;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the command did not start");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_runs_on_a_runner_over_tls_and_the_runner_listens_on_nothing() {
    let n = net();
    write_gateway(
        &n,
        "allow = [\"hello\", \"touch\"]\n[commands.rules.hello]\ngroup = \"web\"\n[commands.rules.touch]\ngroup = \"web\"",
        &[("web-1", "tok-web-1", "web"), ("db-1", "tok-db-1", "db")],
    );
    let _gw = start_gateway(&n).await;
    let marker = n.dir.path().join("touched");
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
    let web = start_runner(&n, "web-1", "tok-web-1", "web", &runner_cmds);
    // A runner whose token the gateway does not know gets no work.
    let _impostor = start_runner(&n, "db-1", "wrong-token", "db", &runner_cmds);
    wait_connected(&n, &["web-1"]).await;

    let r = post(&n, "hello").await;
    assert_eq!(
        r.status,
        StatusCode::ACCEPTED,
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    let id = r.json()["id"].as_str().unwrap().to_owned();
    let rec = wait_end(&n, &id).await;
    assert_eq!(rec["status"], "succeeded", "{rec}");
    assert_eq!(rec["runner"], "web-1");
    assert_eq!(rec["exit_code"], 0);
    assert_eq!(output(&n, &id).await, "hello from the backend host\n");

    // The runner process holds no listening socket.
    assert!(listening_sockets(web.pid()).is_empty());

    let list = send(&n, Method::GET, "/__manage__/runners", "")
        .await
        .json();
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
    let narrow = start_runner(
        &n,
        "web-1",
        "tok-web-1",
        "web",
        "allow = []\n[[commands.custom]]\nname = \"hello\"\nargv = [\"true\"]\n",
    );
    drop(web);
    wait_connected(&n, &["web-1"]).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = post(&n, "touch").await;
    let id = r.json()["id"].as_str().unwrap().to_owned();
    let rec = wait_end(&n, &id).await;
    assert_eq!(rec["status"], "rejected", "{rec}");
    assert!(
        rec["reason"]
            .as_str()
            .unwrap()
            .contains("not allowed on this runner"),
        "{rec}"
    );
    assert!(!marker.exists(), "the refused command ran");
    let lines = audit(&n);
    assert!(lines
        .iter()
        .any(|l| l["job_id"] == id.as_str() && l["status"] == "rejected"));
    drop(narrow);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_output_cancel_and_a_lost_runner() {
    let n = net();
    write_gateway(
        &n,
        "allow = [\"slow\", \"sleepy\"]\n[commands.rules.slow]\ngroup = \"web\"\n[commands.rules.sleepy]\ngroup = \"web\"",
        &[("web-1", "tok-web-1", "web")],
    );
    let _gw = start_gateway(&n).await;
    let pidfile = n.dir.path().join("pid");
    let runs = n.dir.path().join("runs");
    let runner_cmds = format!(
        r#"allow = []
[[commands.custom]]
name = "slow"
argv = ["sh", "-c", "echo first; echo $$ > {pid}; exec sleep 60"]
[[commands.custom]]
name = "sleepy"
argv = ["sh", "-c", "echo run >> {runs}; echo $$ > {pid}; exec sleep 60"]
"#,
        pid = pidfile.display(),
        runs = runs.display(),
    );
    let runner = start_runner(&n, "web-1", "tok-web-1", "web", &runner_cmds);
    wait_connected(&n, &["web-1"]).await;

    // Live output before the job ends (SSE), then cancel kills it there.
    let r = post(&n, "slow").await;
    let id = r.json()["id"].as_str().unwrap().to_owned();
    let resp = open(
        &n,
        Method::GET,
        &format!("/__manage__/jobs/{id}/output"),
        "",
        &[("accept", "text/event-stream")],
    )
    .await;
    let mut body = resp.into_body();
    let mut seen = String::new();
    while !seen.contains("first") {
        let frame = tokio::time::timeout(Duration::from_secs(10), body.frame())
            .await
            .expect("no live output")
            .unwrap()
            .unwrap();
        if let Ok(d) = frame.into_data() {
            seen.push_str(&String::from_utf8_lossy(&d));
        }
    }
    assert_eq!(job(&n, &id).await["status"], "running");
    let pid = wait_pid(&pidfile).await;
    assert!(pid_alive(pid));
    let c = send(
        &n,
        Method::POST,
        &format!("/__manage__/jobs/{id}/cancel"),
        "",
    )
    .await;
    assert!(
        c.status.is_success(),
        "{}",
        String::from_utf8_lossy(&c.body)
    );
    let rec = wait_end(&n, &id).await;
    assert_eq!(rec["status"], "cancelled", "{rec}");
    assert!(!pid_alive(pid), "the process survived the cancel");
    std::fs::remove_file(&pidfile).unwrap();

    // SIGKILL of the runner mid-job: lost after the lease, never re-run.
    let r = post(&n, "sleepy").await;
    let id = r.json()["id"].as_str().unwrap().to_owned();
    let orphan = wait_pid(&pidfile).await;
    drop(runner);
    let rec = wait_end(&n, &id).await;
    assert_eq!(rec["status"], "lost", "{rec}");
    assert_eq!(rec["runner"], "web-1");
    let m = metrics(&n).await;
    assert!(m.contains("portcullis_runner_jobs_lost_total 1"), "{m}");
    assert!(
        m.contains("portcullis_runner_connected{runner=\"web-1\"} 0"),
        "{m}"
    );
    assert!(m.trim_end().ends_with("# EOF"), "{m}");
    // No runner of the group: refused 503, audited.
    let r = post(&n, "sleepy").await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(audit(&n)
        .iter()
        .any(|l| l["status"] == "rejected" && l["http_status"] == 503));
    // A runner comes back: the lost job is not re-run.
    let _back = start_runner(&n, "web-1", "tok-web-1", "web", &runner_cmds);
    wait_connected(&n, &["web-1"]).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(job(&n, &id).await["status"], "lost");
    assert_eq!(std::fs::read_to_string(&runs).unwrap(), "run\n");
    unsafe {
        libc::kill(orphan, libc::SIGKILL);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_removing_a_runner_refuses_it_at_once() {
    let n = net();
    let commands = "allow = [\"hello\"]\n[commands.rules.hello]\ngroup = \"web\"";
    write_gateway(
        &n,
        commands,
        &[("web-1", "tok-web-1", "web"), ("web-2", "tok-web-2", "web")],
    );
    let gw = start_gateway(&n).await;
    let cmds = "allow = []\n[[commands.custom]]\nname = \"hello\"\nargv = [\"echo\", \"hi\"]\n";
    let _r1 = start_runner(&n, "web-1", "tok-web-1", "web", cmds);
    let _r2 = start_runner(&n, "web-2", "tok-web-2", "web", cmds);
    wait_connected(&n, &["web-1", "web-2"]).await;

    // web-1 removed; web-2 stays with one more group (its lease and jobs carry over).
    write_gateway(&n, commands, &[("web-2", "tok-web-2", "web\", \"db")]);
    unsafe {
        libc::kill(gw.pid() as i32, libc::SIGHUP);
    }
    // web-1 is gone from the list; every further job goes to web-2.
    let mut gone = false;
    for _ in 0..100 {
        let list = send(&n, Method::GET, "/__manage__/runners", "")
            .await
            .json();
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
    let list = send(&n, Method::GET, "/__manage__/runners", "")
        .await
        .json();
    assert_eq!(
        list["runners"][0]["groups"],
        serde_json::json!(["web", "db"])
    );
    assert_eq!(list["runners"][0]["connected"], true, "{list}");
    // Its open poll was answered 401 and its next ones are refused.
    let mut refused = false;
    for _ in 0..100 {
        if !metrics(&n)
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
        let r = post(&n, "hello").await;
        let id = r.json()["id"].as_str().unwrap().to_owned();
        let rec = wait_end(&n, &id).await;
        assert_eq!(rec["status"], "succeeded", "{rec}");
        assert_eq!(rec["runner"], "web-2");
    }
}

fn django_available() -> bool {
    let ok = Command::new("python3")
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn django_commands_run_on_the_runner_host() {
    if !django_available() {
        return;
    }
    let n = net();
    write_gateway(
        &n,
        "allow = [\"check\", \"migrate\"]",
        &[("app-1", "tok-app-1", "app")],
    );
    let _gw = start_gateway(&n).await;
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/django");
    let _runner = start_runner(
        &n,
        "app-1",
        "tok-app-1",
        "app",
        &format!(
            "allow = [\"check\"]\ndjango = {{ python = \"python3\", manage_py = \"{}\", cwd = \"{}\" }}\nenv = [\"PATH\", \"PYTHONPATH\", \"HOME\"]\n",
            root.join("manage.py").display(),
            root.display()
        ),
    );
    wait_connected(&n, &["app-1"]).await;
    let r = post(&n, "check").await;
    let id = r.json()["id"].as_str().unwrap().to_owned();
    let rec = wait_end(&n, &id).await;
    assert_eq!(rec["status"], "succeeded", "{rec}");
    assert_eq!(rec["runner"], "app-1");
    assert!(output(&n, &id)
        .await
        .contains("System check identified no issues"));
    // The gateway allows migrate; this runner does not.
    let r = post(&n, "migrate").await;
    let id = r.json()["id"].as_str().unwrap().to_owned();
    let rec = wait_end(&n, &id).await;
    assert_eq!(rec["status"], "rejected", "{rec}");
}

/// Reads the job's live output (SSE) until it contains `needle`.
async fn wait_live(n: &Net, id: &str, needle: &str) {
    let resp = open(
        n,
        Method::GET,
        &format!("/__manage__/jobs/{id}/output"),
        "",
        &[("accept", "text/event-stream")],
    )
    .await;
    let mut body = resp.into_body();
    let mut seen = String::new();
    while !seen.contains(needle) {
        let frame = tokio::time::timeout(Duration::from_secs(10), body.frame())
            .await
            .expect("no live output")
            .unwrap()
            .unwrap();
        if let Ok(d) = frame.into_data() {
            seen.push_str(&String::from_utf8_lossy(&d));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_restarts_during_a_job_and_its_output_is_complete() {
    let n = net();
    write_gateway(
        &n,
        "allow = [\"steps\"]\n[commands.rules.steps]\nlock = \"steps\"",
        &[("web-1", "tok-web-1", "web")],
    );
    let gw = start_gateway(&n).await;
    let _runner = start_runner(
        &n,
        "web-1",
        "tok-web-1",
        "web",
        "allow = []\n[[commands.custom]]\nname = \"steps\"\nargv = [\"sh\", \"-c\", \"echo one; sleep 1.5; echo two; sleep 1.5; echo three\"]\n",
    );
    wait_connected(&n, &["web-1"]).await;
    let r = post(&n, "steps").await;
    let id = r.json()["id"].as_str().unwrap().to_owned();
    wait_live(&n, &id, "one").await;

    // A graceful restart: the job goes on on the runner.
    unsafe {
        libc::kill(gw.pid() as i32, libc::SIGTERM);
    }
    let mut gw = gw;
    let _ = gw.0.wait();
    let gw = start_gateway(&n).await;
    wait_live(&n, &id, "two").await;
    // The taken-back job still holds its lock.
    assert_eq!(post(&n, "steps").await.status, StatusCode::CONFLICT);

    // A crash: the same.
    drop(gw);
    let _gw = start_gateway(&n).await;
    let rec = wait_end(&n, &id).await;
    assert_eq!(rec["status"], "succeeded", "{rec}");
    assert_eq!(rec["runner"], "web-1");
    assert_eq!(output(&n, &id).await, "one\ntwo\nthree\n");
    assert_eq!(rec["output_bytes"], 14);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_all_runs_once_per_connected_runner() {
    let n = net();
    write_gateway(
        &n,
        "allow = [\"stamp\"]\n[commands.rules.stamp]\ntarget = \"all\"\ngroup = \"web\"",
        &[
            ("web-1", "tok-web-1", "web"),
            ("web-2", "tok-web-2", "web"),
            ("web-3", "tok-web-3", "web"),
            ("db-1", "tok-db-1", "db"),
        ],
    );
    let _gw = start_gateway(&n).await;
    let stamps = n.dir.path().join("stamps");
    let mut runners = Vec::new();
    for (name, token, group) in [
        ("web-1", "tok-web-1", "web"),
        ("web-2", "tok-web-2", "web"),
        ("web-3", "tok-web-3", "web"),
        ("db-1", "tok-db-1", "db"),
    ] {
        runners.push(start_runner(
            &n,
            name,
            token,
            group,
            &format!(
                "allow = []\n[[commands.custom]]\nname = \"stamp\"\nargv = [\"sh\", \"-c\", \"echo {name} >> {}\"]\n",
                stamps.display()
            ),
        ));
    }
    wait_connected(&n, &["web-1", "web-2", "web-3", "db-1"]).await;
    let r = post(&n, "stamp").await;
    assert_eq!(
        r.status,
        StatusCode::ACCEPTED,
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    let jobs = r.json()["jobs"].as_array().unwrap().clone();
    assert_eq!(jobs.len(), 3, "{jobs:?}");
    let mut names = Vec::new();
    for j in &jobs {
        let rec = wait_end(&n, j["id"].as_str().unwrap()).await;
        assert_eq!(rec["status"], "succeeded", "{rec}");
        names.push(rec["runner"].as_str().unwrap().to_owned());
    }
    names.sort();
    assert_eq!(names, ["web-1", "web-2", "web-3"]);
    let mut lines: Vec<String> = std::fs::read_to_string(&stamps)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    lines.sort();
    assert_eq!(lines, ["web-1", "web-2", "web-3"]);
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
    assert!(
        p.contains("commands.execute = \\\"runners\\\"") || p.contains("execute"),
        "{p}"
    );
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
    let n = net();
    write_gateway(&n, "allow = [\"slow\"]", &[("web-1", "tok-web-1", "web")]);
    let _gw = start_gateway(&n).await;
    let pidfile = n.dir.path().join("pid");
    let mut runner = start_runner(
        &n,
        "web-1",
        "tok-web-1",
        "web",
        &format!(
            "allow = []\n[[commands.custom]]\nname = \"slow\"\nargv = [\"sh\", \"-c\", \"echo $$ > {}; exec sleep 60\"]\n",
            pidfile.display()
        ),
    );
    wait_connected(&n, &["web-1"]).await;
    let r = post(&n, "slow").await;
    let id = r.json()["id"].as_str().unwrap().to_owned();
    let pid = wait_pid(&pidfile).await;
    unsafe {
        libc::kill(runner.pid() as i32, libc::SIGTERM);
    }
    let rec = wait_end(&n, &id).await;
    assert_eq!(rec["status"], "cancelled", "{rec}");
    assert_eq!(rec["reason"], "runner shutting down");
    assert!(!pid_alive(pid));
    let status = runner.0.wait().unwrap();
    assert!(status.success(), "{status}");
}
