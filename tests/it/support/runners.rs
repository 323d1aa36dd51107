//! Runners as real processes: the compiled gateway over TLS (a fresh dev CA)
//! with `execute = "runners"`, `portcullis runner` processes that dial in,
//! an operator client over TLS, and what the tests read back (job records,
//! output, `/metrics`, the audit log, a process's listening sockets).

use super::client::Resp;
use super::commands::{audit_lines, ALICE};
use super::process::{free_addr, wait_listening, ChildGuard, BIN};
use super::TIMEOUT;
use bytes::Bytes;
use http::{Method, Request};
use http_body_util::{BodyExt, Full};
use serde_json::Value;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

/// One gateway's files and addresses: its TLS certificate (issued by a dev
/// CA the runners trust through `ca`), config, state and audit log.
pub struct Net {
    pub dir: tempfile::TempDir,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    ca: PathBuf,
    tls: portcullis::tls::BackendTls,
    config: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

impl Net {
    pub fn new() -> Net {
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
        let tls = portcullis::tls::BackendTls::new("127.0.0.1", Some(&ca_path), None).unwrap();
        let config = dir.path().join("gateway.toml");
        Net {
            dir,
            addr: free_addr(),
            admin: free_addr(),
            ca: ca_path,
            tls,
            config,
            cert,
            key,
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Writes the gateway's config: `commands` is the body of `[commands]`
    /// (after `execute = "runners"`, `lease = "2s"`, `sync_wait = "0s"`),
    /// `runners` the `[[runners]]` entries as (name, token, groups).
    pub fn write_gateway(&self, commands: &str, runners: &[(&str, &str, &str)]) {
        self.write_gateway_with_lease("2s", commands, runners);
    }

    /// [`Net::write_gateway`] with another `commands.lease`.
    pub fn write_gateway_with_lease(
        &self,
        lease: &str,
        commands: &str,
        runners: &[(&str, &str, &str)],
    ) {
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
lease = "{lease}"
sync_wait = "0s"
state_dir = "{state}"
audit_log = "{audit}"
{commands}
"#,
            addr = self.addr,
            admin = self.admin,
            cert = self.cert,
            key = self.key,
            state = self.path("state").display(),
            audit = self.path("audit.jsonl").display(),
        );
        for (name, token, groups) in runners {
            text.push_str(&format!(
                "\n[[runners]]\nname = \"{name}\"\ntoken = \"sha256:{}\"\ngroups = [\"{groups}\"]\n",
                super::sha256_hex(token.as_bytes())
            ));
        }
        std::fs::write(&self.config, text).unwrap();
    }

    /// Starts `portcullis run` on the written config; waits until it listens.
    pub async fn start_gateway(&self) -> ChildGuard {
        let child = Command::new(BIN)
            .args(["run", "--config"])
            .arg(&self.config)
            .env("PORTCULLIS_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut guard = ChildGuard(Some(child));
        wait_listening(self.addr, &mut guard).await;
        // The admin listener is bound just after the main one.
        wait_listening(self.admin, &mut guard).await;
        guard
    }

    /// Starts `portcullis runner` named `name` with `commands` as the body of
    /// its own `[commands]` (after `kill_grace = "1s"`).
    pub fn start_runner(&self, name: &str, token: &str, group: &str, commands: &str) -> ChildGuard {
        let head = format!(
            "gateway = \"https://127.0.0.1:{}\"\nca = {:?}",
            self.addr.port(),
            self.ca
        );
        spawn_runner(
            &self.path(&format!("{name}.toml")),
            &head,
            (name, token, group),
            commands,
        )
    }

    /// Sends one request over TLS with `authorization` (or none) and returns
    /// the response with its body still streaming.
    pub async fn open_as(
        &self,
        authorization: Option<&str>,
        method: Method,
        path: &str,
        body: &str,
        headers: &[(&str, &str)],
    ) -> http::Response<hyper::body::Incoming> {
        let tcp = tokio::net::TcpStream::connect(self.addr).await.unwrap();
        let tls = tokio_rustls::TlsConnector::from(Arc::clone(&self.tls.config))
            .connect(self.tls.server_name.clone(), tcp)
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
            .header("host", "127.0.0.1");
        if let Some(a) = authorization {
            req = req.header("authorization", a);
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(Full::new(Bytes::from(body.to_owned()))).unwrap();
        tokio::time::timeout(TIMEOUT, sender.send_request(req))
            .await
            .expect("no answer in time")
            .unwrap()
    }

    /// [`Net::open_as`] as operator alice.
    pub async fn open(
        &self,
        method: Method,
        path: &str,
        body: &str,
        headers: &[(&str, &str)],
    ) -> http::Response<hyper::body::Incoming> {
        let bearer = format!("Bearer {ALICE}");
        self.open_as(Some(&bearer), method, path, body, headers)
            .await
    }

    /// One request as alice; the whole answer.
    pub async fn send(&self, method: Method, path: &str, body: &str) -> Resp {
        Resp::read(self.open(method, path, body, &[]).await).await
    }

    /// `POST /__manage__/<cmd>` with `{}`.
    pub async fn post(&self, cmd: &str) -> Resp {
        self.post_data(cmd, "{}").await
    }

    /// `POST /__manage__/<cmd>` with `body`.
    pub async fn post_data(&self, cmd: &str, body: &str) -> Resp {
        self.send(Method::POST, &format!("/__manage__/{cmd}"), body)
            .await
    }

    /// `POST /__manage__/<cmd>`, expecting 202; the job id.
    pub async fn start_job(&self, cmd: &str) -> String {
        let r = self.post(cmd).await;
        assert_eq!(r.status, 202, "{}", r.text());
        r.json()["id"].as_str().unwrap().to_owned()
    }

    /// `POST /__runner__/poll` as a runner would, with `authorization` (or
    /// none) and `headers`; the whole answer (held until work or the hold ends).
    pub async fn runner_poll(&self, authorization: Option<&str>, headers: &[(&str, &str)]) -> Resp {
        let resp = self
            .open_as(
                authorization,
                Method::POST,
                "/__runner__/poll",
                r#"{"version": "test"}"#,
                headers,
            )
            .await;
        Resp::read(resp).await
    }

    /// `GET /__manage__/jobs/<id>`.
    pub async fn job(&self, id: &str) -> Value {
        self.send(Method::GET, &format!("/__manage__/jobs/{id}"), "")
            .await
            .json()
    }

    /// Waits until job `id` has ended (at most 20 s); its record.
    pub async fn wait_end(&self, id: &str) -> Value {
        for _ in 0..400 {
            let rec = self.job(id).await;
            let s = rec["status"].as_str().unwrap_or_default().to_owned();
            if s != "running" && s != "queued" {
                return rec;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("job {id} did not end");
    }

    /// Waits for job `id` and asserts the runner refused it: `rejected`,
    /// a reason containing `needle`, and a `rejected` audit line for it.
    pub async fn assert_rejected_by_runner(&self, id: &str, needle: &str) -> Value {
        let rec = self.wait_end(id).await;
        assert_eq!(rec["status"], "rejected", "{rec}");
        let reason = rec["reason"].as_str().unwrap_or_default();
        assert!(reason.starts_with("runner "), "{rec}");
        assert!(reason.contains(needle), "{rec}");
        assert!(self
            .audit()
            .iter()
            .any(|l| l["job_id"] == id && l["status"] == "rejected"));
        rec
    }

    /// `GET /__manage__/jobs/<id>/output` as text.
    pub async fn output(&self, id: &str) -> String {
        self.send(Method::GET, &format!("/__manage__/jobs/{id}/output"), "")
            .await
            .text()
    }

    /// Reads the job's live output (SSE) until it contains `needle`.
    pub async fn wait_live(&self, id: &str, needle: &str) {
        let resp = self
            .open(
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

    /// `GET /__manage__/runners`.
    pub async fn runners(&self) -> Value {
        self.send(Method::GET, "/__manage__/runners", "")
            .await
            .json()
    }

    /// Waits until `names` are all connected.
    pub async fn wait_connected(&self, names: &[&str]) {
        for _ in 0..200 {
            let list = self.runners().await;
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
    pub async fn metrics(&self) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(self.admin).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    /// The audit log's lines, parsed.
    pub fn audit(&self) -> Vec<Value> {
        audit_lines(&self.path("audit.jsonl"))
    }
}

/// Writes a runner's config at `path` (`head`: its `gateway` and `ca`
/// lines; `commands`: the body of its `[commands]`, after
/// `kill_grace = "1s"`) and starts `portcullis runner` on it.
pub fn spawn_runner(
    path: &Path,
    head: &str,
    (name, token, group): (&str, &str, &str),
    commands: &str,
) -> ChildGuard {
    std::fs::write(
        path,
        format!(
            "{head}\nname = \"{name}\"\ntoken = \"{token}\"\ngroups = [\"{group}\"]\n\n[commands]\nkill_grace = \"1s\"\n{commands}\n"
        ),
    )
    .unwrap();
    let child = Command::new(BIN)
        .args(["runner", "--config"])
        .arg(path)
        .env("PORTCULLIS_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    ChildGuard(Some(child))
}

/// Socket inodes of `pid` that are listening TCP sockets.
pub fn listening_sockets(pid: u32) -> Vec<String> {
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

/// Whether process `pid` exists and is not a zombie.
pub fn pid_alive(pid: i32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    !stat.is_empty() && !stat.contains(") Z ")
}

/// Waits until a command wrote its pid to `path`.
pub async fn wait_pid(path: &Path) -> i32 {
    for _ in 0..250 {
        let pid = std::fs::read_to_string(path)
            .ok()
            .and_then(|t| t.trim().parse().ok());
        if let Some(pid) = pid {
            return pid;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the command did not start");
}

/// Sends `signal` to process `pid`.
pub fn signal(pid: u32, signal: i32) {
    // SAFETY: kill(2) with a pid this test started.
    let rc = unsafe { libc::kill(pid as i32, signal) };
    assert_eq!(rc, 0, "kill({pid}, {signal})");
}

/// The lines of the file at `path`, sorted.
pub fn sorted_lines(path: &Path) -> Vec<String> {
    let mut lines: Vec<String> = std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    lines.sort();
    lines
}
