//! Cluster mode: a real `redis-server` on a loopback port ([`RedisServer`])
//! and compiled gateway processes sharing it ([`Node`]). Both are stopped on
//! drop. `scripts/test` installs `redis-server` when it is missing.

use super::gateway::{GatewayConfig, IOS_KEY};
use super::process::{
    binary, free_addr, free_port, send_signal, spawn_listening, wait_listening, ChildGuard,
};
use super::{Req, TIMEOUT};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// The shared secret every test node uses (40 bytes).
pub const CLUSTER_SECRET: &str = "cluster-secret-0123456789-0123456789-abc";

/// The password of the user [`RedisServer::acl_url`] makes.
const ACL_PASSWORD: &str = "acl-password-5e1f";

/// The `ACL SETUSER` command docs/cluster.md recommends, for the cluster
/// `name` and `password`, as arguments after `ACL`.
pub fn documented_acl(name: &str, password: &str) -> Vec<String> {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/cluster.md"))
        .expect("docs/cluster.md");
    let line = doc
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("ACL SETUSER portcullis "))
        .expect("an ACL SETUSER line in docs/cluster.md");
    line.replace("portcullis:prod:", &format!("portcullis:{name}:"))
        .replace(">CHANGE-ME", &format!(">{password}"))
        .split_whitespace()
        .skip(1)
        .map(str::to_owned)
        .collect()
}

/// A `redis-server` on an ephemeral loopback port, without persistence.
pub struct RedisServer {
    pub port: u16,
    guard: ChildGuard,
    dir: tempfile::TempDir,
    tls: Option<RedisTls>,
    /// The documented ACL user, once [`RedisServer::acl_url`] made it
    /// (made again by [`RedisServer::restart`]).
    acl: std::sync::Mutex<Option<Vec<String>>>,
}

/// The certificates of a TLS-only [`RedisServer`] (PEM files in its
/// directory): the CA that issued its certificate, and a client certificate
/// from that CA for when it demands one.
#[derive(Clone)]
pub struct RedisTls {
    pub ca: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    auth_clients: bool,
}

impl RedisServer {
    /// Starts one and waits until it answers.
    pub async fn start() -> RedisServer {
        let dir = tempfile::tempdir().expect("redis dir");
        let port = free_port();
        let guard = Self::spawn(port, dir.path(), None).await;
        RedisServer {
            port,
            guard,
            dir,
            tls: None,
            acl: std::sync::Mutex::default(),
        }
    }

    /// Starts one that speaks only TLS (`--port 0 --tls-port <port>`), with
    /// a certificate for 127.0.0.1 issued by a CA made for it. With
    /// `auth_clients`, it refuses clients without a certificate from that CA.
    pub async fn start_tls(auth_clients: bool) -> RedisServer {
        let dir = tempfile::tempdir().expect("redis dir");
        let ca = portcullis::devcerts::DevCa::new("redis test CA").expect("CA");
        let server = ca.issue_server(&["127.0.0.1"]).expect("server cert");
        let client = ca.issue_client("gateway").expect("client cert");
        let write = |name: &str, text: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, text).expect("write a certificate");
            p
        };
        let tls = RedisTls {
            ca: write("ca.pem", &ca.ca.cert_pem),
            server_cert: write("redis.pem", &server.cert_pem),
            server_key: write("redis.key", &server.key_pem),
            client_cert: write("client.pem", &client.cert_pem),
            client_key: write("client.key", &client.key_pem),
            auth_clients,
        };
        let port = free_port();
        let guard = Self::spawn(port, dir.path(), Some(&tls)).await;
        RedisServer {
            port,
            guard,
            dir,
            tls: Some(tls),
            acl: std::sync::Mutex::default(),
        }
    }

    /// The certificates of a server started with [`RedisServer::start_tls`].
    pub fn tls(&self) -> &RedisTls {
        self.tls.as_ref().expect("a TLS redis")
    }

    async fn spawn(port: u16, dir: &Path, tls: Option<&RedisTls>) -> ChildGuard {
        assert!(
            which("redis-server"),
            "redis-server is required by the cluster tests: run them with scripts/test, which installs it (apt-get install redis-server)"
        );
        let mut cmd = Command::new("redis-server");
        match tls {
            None => cmd.args(["--port", &port.to_string()]),
            Some(t) => cmd
                .args(["--port", "0", "--tls-port", &port.to_string()])
                .arg("--tls-cert-file")
                .arg(&t.server_cert)
                .arg("--tls-key-file")
                .arg(&t.server_key)
                .arg("--tls-ca-cert-file")
                .arg(&t.ca)
                .args([
                    "--tls-auth-clients",
                    if t.auth_clients { "yes" } else { "no" },
                ]),
        };
        cmd.args(["--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        spawn_listening(cmd, addr).await
    }

    /// `redis://127.0.0.1:<port>/0` (`rediss://` when it speaks TLS).
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        format!("{scheme}://127.0.0.1:{}/0", self.port)
    }

    /// Freezes the server (SIGSTOP): connections stay open, nothing answers.
    pub fn pause(&self) {
        send_signal(&self.guard, "-STOP");
    }

    /// Thaws a paused server (SIGCONT).
    pub fn resume(&self) {
        send_signal(&self.guard, "-CONT");
    }

    /// Kills the server (connections are refused until [`RedisServer::restart`]).
    pub fn stop(&mut self) {
        self.guard.kill_now();
    }

    /// Kills the server (if running) and starts an empty one on the same port.
    pub async fn restart(&mut self) {
        self.stop();
        self.guard = Self::spawn(self.port, self.dir.path(), self.tls.as_ref()).await;
        let acl = self.acl.lock().expect("acl").clone();
        if let Some(acl) = acl {
            self.set_acl(&acl).await;
        }
    }

    /// Makes the user docs/cluster.md recommends for cluster `name` (only
    /// its own keys and channel, only the commands listed there) and returns
    /// a URL that connects as that user: gateways on it fail wherever the
    /// documented ACL misses a command they use.
    pub async fn acl_url(&self, name: &str) -> String {
        let acl = documented_acl(name, ACL_PASSWORD);
        self.set_acl(&acl).await;
        *self.acl.lock().expect("acl") = Some(acl);
        format!(
            "redis://portcullis:{ACL_PASSWORD}@127.0.0.1:{}/0",
            self.port
        )
    }

    async fn set_acl(&self, acl: &[String]) {
        let mut admin = self.connection().await;
        let mut cmd = redis::cmd("ACL");
        for arg in acl {
            cmd.arg(arg);
        }
        let () = cmd
            .query_async(&mut admin)
            .await
            .expect("the documented ACL");
    }

    /// A connection for the test itself (trusting the server's CA and
    /// presenting the client certificate when it speaks TLS).
    pub async fn connection(&self) -> redis::aio::MultiplexedConnection {
        let client = match &self.tls {
            None => redis::Client::open(self.url()),
            Some(t) => {
                let read = |p: &PathBuf| std::fs::read(p).expect("read a certificate");
                redis::Client::build_with_tls(
                    self.url(),
                    redis::TlsCertificates {
                        client_tls: Some(redis::ClientTlsConfig {
                            client_cert: read(&t.client_cert),
                            client_key: read(&t.client_key),
                        }),
                        root_cert: Some(read(&t.ca)),
                    },
                )
            }
        };
        client
            .expect("redis url")
            .get_multiplexed_async_connection()
            .await
            .expect("connect to the test redis")
    }

    /// Every key with its value's bytes (strings) or its members (other
    /// types, joined), as Redis holds them right now.
    pub async fn dump(&self) -> Vec<(String, Vec<u8>)> {
        let mut conn = self.connection().await;
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg("*")
            .query_async(&mut conn)
            .await
            .expect("KEYS");
        let mut out = Vec::new();
        for key in keys {
            let kind: String = redis::cmd("TYPE")
                .arg(&key)
                .query_async(&mut conn)
                .await
                .expect("TYPE");
            let value: Vec<u8> = match kind.as_str() {
                "string" => redis::cmd("GET")
                    .arg(&key)
                    .query_async::<Option<Vec<u8>>>(&mut conn)
                    .await
                    .expect("GET")
                    .unwrap_or_default(),
                "none" => continue,
                other => {
                    // Streams, hashes, sets: their whole content as text.
                    let dump: Option<Vec<u8>> = redis::cmd("DUMP")
                        .arg(&key)
                        .query_async(&mut conn)
                        .await
                        .expect("DUMP");
                    let mut v = other.as_bytes().to_vec();
                    v.extend(dump.unwrap_or_default());
                    v
                }
            };
            out.push((key, value));
        }
        out
    }
}

fn which(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// One compiled gateway process in cluster mode.
pub struct Node {
    /// The device listener.
    pub addr: SocketAddr,
    /// The admin listener (`/metrics`, `/readyz`).
    pub admin: SocketAddr,
    pub instance: String,
    guard: ChildGuard,
    dir: tempfile::TempDir,
}

impl Node {
    /// Starts `portcullis` with `cfg` plus `[cluster]` (namespace `name`,
    /// this `instance`, and `cluster_lines`) and waits until its Redis
    /// connection is up.
    pub async fn start(
        cfg: &GatewayConfig,
        redis: &RedisServer,
        name: &str,
        instance: &str,
        cluster_lines: &[&str],
    ) -> Node {
        Node::start_url(cfg, &redis.url(), name, instance, cluster_lines).await
    }

    /// [`Node::start`] with any Redis URL (e.g. one naming an ACL user).
    pub async fn start_url(
        cfg: &GatewayConfig,
        redis_url: &str,
        name: &str,
        instance: &str,
        cluster_lines: &[&str],
    ) -> Node {
        let node = Node::spawn_url(cfg, redis_url, name, instance, cluster_lines).await;
        node.wait_metric("portcullis_cluster_up", 1.0).await;
        node
    }

    /// [`Node::start_url`] without waiting for Redis: returns once the
    /// gateway's listeners accept connections.
    pub async fn spawn_url(
        cfg: &GatewayConfig,
        redis_url: &str,
        name: &str,
        instance: &str,
        cluster_lines: &[&str],
    ) -> Node {
        Node::spawn_with(cfg, redis_url, name, instance, cluster_lines, |_| {
            String::new()
        })
        .await
    }

    /// [`Node::spawn_url`] with `local(dir)` appended to the configuration,
    /// `dir` being this node's own directory (for its audit log and state).
    pub async fn spawn_with(
        cfg: &GatewayConfig,
        redis_url: &str,
        name: &str,
        instance: &str,
        cluster_lines: &[&str],
        local: impl Fn(&std::path::Path) -> String,
    ) -> Node {
        let dir = tempfile::tempdir().expect("node dir");
        let cfg = cfg.clone().extra(&local(dir.path()));
        let addr = free_addr();
        let admin = free_addr();
        let mut table = format!(
            "[cluster]\nredis = \"{redis_url}\"\nname = \"{name}\"\nsecret = \"{CLUSTER_SECRET}\"\ninstance = \"{instance}\"\n"
        );
        for l in cluster_lines {
            table.push_str(l);
            table.push('\n');
        }
        let cfg = cfg
            .clone()
            .server(&format!("admin_listen = \"{admin}\""))
            .extra(&table);
        std::fs::write(dir.path().join("portcullis.toml"), cfg.toml(addr)).expect("write config");
        let guard = Node::spawn(dir.path(), addr, admin).await;
        Node {
            addr,
            admin,
            instance: instance.to_owned(),
            guard,
            dir,
        }
    }

    /// Starts the process on `dir/portcullis.toml` (logging to
    /// `dir/stderr.log`, appended) and waits for both listeners.
    async fn spawn(dir: &std::path::Path, addr: SocketAddr, admin: SocketAddr) -> ChildGuard {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("stderr.log"))
            .expect("log file");
        let mut cmd = binary(&dir.join("portcullis.toml"));
        cmd.env("PORTCULLIS_LOG", "info").stderr(log);
        let mut guard = spawn_listening(cmd, addr).await;
        // The admin listener is bound just after the main one.
        wait_listening(admin, &mut guard).await;
        guard
    }

    /// Kills the process at once (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        self.guard.kill_now();
    }

    /// Starts the process again (after [`Node::kill`]) with the same
    /// configuration and directory, and waits until Redis is up. It listens
    /// on new ports: the old ones may have been taken by other sockets since.
    pub async fn restart(&mut self) {
        use futures_util::FutureExt;
        self.kill();
        let path = self.dir.path().join("portcullis.toml");
        let (addr, admin) = (free_addr(), free_addr());
        let text = std::fs::read_to_string(&path)
            .expect("read config")
            .replace(&self.addr.to_string(), &addr.to_string())
            .replace(&self.admin.to_string(), &admin.to_string());
        std::fs::write(&path, text).expect("write config");
        (self.addr, self.admin) = (addr, admin);
        let spawned =
            std::panic::AssertUnwindSafe(Node::spawn(self.dir.path(), self.addr, self.admin))
                .catch_unwind()
                .await;
        self.guard = match spawned {
            Ok(guard) => guard,
            Err(panic) => {
                eprintln!("{} did not start again:\n{}", self.instance, self.log());
                std::panic::resume_unwind(panic)
            }
        };
        self.wait_metric("portcullis_cluster_up", 1.0).await;
    }

    /// The gateway process's id.
    pub fn pid(&self) -> u32 {
        self.guard.pid()
    }

    /// This node's own directory.
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// Everything the process logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default()
    }

    /// Log lines containing `needle`.
    pub fn log_lines(&self, needle: &str) -> usize {
        self.log().lines().filter(|l| l.contains(needle)).count()
    }

    /// A metric's value from `/metrics` on the admin listener (the sum over
    /// its label sets), or `None` when absent.
    pub async fn metric(&self, name: &str) -> Option<f64> {
        let text = Req::new(self.admin, "GET", "/metrics").send().await.text();
        let mut found = None;
        for line in text.lines() {
            let Some(rest) = line.strip_prefix(name) else {
                continue;
            };
            if !(rest.starts_with(' ') || rest.starts_with('{')) {
                continue;
            }
            if let Some(v) = rest.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) {
                *found.get_or_insert(0.0) += v;
            }
        }
        found
    }

    /// Waits (at most 15 s) until `name` reads `value`.
    pub async fn wait_metric(&self, name: &str, value: f64) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            let now = self.metric(name).await;
            if now == Some(value) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{}: {name} is {now:?}, waited for {value}\n{}",
                self.instance,
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A request to this node with the `ios-app` key.
    pub fn req(&self, method: &str, path: &str) -> Req {
        Req::new(self.addr, method, path).api_key(IOS_KEY)
    }

    /// A GET of `path` with the session `token`.
    pub fn get(&self, path: &str, token: &str) -> Req {
        self.req("GET", path).token(token)
    }
}

/// Retries `f` every 10 ms until it returns true, at most `within`; returns
/// how long it took, or `None` when it never did.
pub async fn within<F, Fut>(within: Duration, mut f: F) -> Option<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = tokio::time::Instant::now();
    loop {
        if f().await {
            return Some(start.elapsed());
        }
        if start.elapsed() >= within.min(TIMEOUT) {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
