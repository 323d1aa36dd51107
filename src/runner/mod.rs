//! `portcullis runner --config runner.toml`: runs commands on a backend host
//! for the gateway. Outbound only: it listens on nothing, dials the gateway
//! (HTTPS verified against `ca` or the webpki roots; `http://` only to a
//! loopback address), long-polls `/__runner__/poll` for work and applies its
//! own `[commands]` rules to every job before starting it.
//!
//! At start it reads its Django commands' options from its own Django
//! (`describe`) and tells the gateway what it runs; a job for a Django
//! command is checked against those options, exactly as in local mode.
//!
//! Output goes up in order with byte offsets; a 416 answer carries the
//! gateway's length and the runner resumes from there, so retries never
//! duplicate or lose bytes.
//!
//! Longer than the crate's 600-line guide on purpose: the runner is one client
//! loop (connect, describe, poll, run, report output, finish) over one state,
//! and reads top to bottom as the protocol's other side.

mod describe;

use crate::commands::introspect::{Known, Snapshot};
use crate::commands::remote::{Dispatch, Report, OFFSET_HEADER};
use crate::commands::{args, config as cmdcfg, runner as proc};
use crate::config::problems::Problems;
use crate::secret::Secret;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, watch, Semaphore};

/// `runner.toml` as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRunner {
    gateway: String,
    ca: Option<String>,
    name: String,
    token: String,
    #[serde(default)]
    groups: Vec<String>,
    commands: cmdcfg::RawCommands,
}

/// A validated runner configuration.
pub struct RunnerConfig {
    /// The runner's name (informational; the gateway knows it by its token).
    pub name: String,
    host: String,
    port: u16,
    tls: Option<crate::tls::BackendTls>,
    token: Secret,
    /// The runner's own `[commands]` rules.
    pub commands: cmdcfg::CommandsConfig,
}

impl std::fmt::Debug for RunnerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunnerConfig")
            .field("name", &self.name)
            .field("host", &self.host)
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

/// Loads and validates `runner.toml`; every problem is reported.
pub fn load(path: &Path) -> Result<RunnerConfig, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let raw: RawRunner = toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut p = Problems::default();
    let commands = cmdcfg::validate(&raw.commands, &mut p);
    if commands
        .as_ref()
        .is_some_and(|c| c.execute != cmdcfg::Execute::Local)
    {
        p.push(
            "commands.execute",
            "a runner runs its commands itself (\"local\")",
        );
    }
    let uri: http::Uri = match raw.gateway.parse() {
        Ok(u) => u,
        Err(_) => {
            p.push("gateway", "not a URL");
            http::Uri::from_static("http://127.0.0.1")
        }
    };
    let https = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => {
            p.push(
                "gateway",
                "must start with https:// (or http:// for loopback)",
            );
            false
        }
    };
    let host = uri.host().unwrap_or_default().to_owned();
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    if !https {
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let loopback = bare == "localhost"
            || bare
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        if !loopback {
            p.push(
                "gateway",
                "plain http:// is allowed only to a loopback address",
            );
        }
    }
    let tls = if https {
        match crate::tls::BackendTls::new(&host, raw.ca.as_deref().map(Path::new), None) {
            Ok(t) => Some(t),
            Err(e) => {
                p.push("ca", e);
                None
            }
        }
    } else {
        None
    };
    let token = match crate::secret::resolve(&raw.token) {
        Ok(t) => Some(t),
        Err(e) => {
            p.push("token", e);
            None
        }
    };
    if !p.0.is_empty() {
        return Err(format!("{}: invalid configuration:\n{p}", path.display()));
    }
    let (Some(commands), Some(token)) = (commands, token) else {
        return Err(format!("{}: invalid configuration", path.display()));
    };
    let _ = raw.groups;
    Ok(RunnerConfig {
        name: raw.name,
        host,
        port,
        tls,
        token,
        commands,
    })
}

/// The runner's HTTP client: one connection per request.
struct Client {
    cfg: Arc<RunnerConfig>,
}

/// An answer: status and body.
type Answer = (http::StatusCode, Bytes);

impl Client {
    async fn post(
        &self,
        path: &str,
        headers: &[(&str, String)],
        body: Bytes,
        timeout: Duration,
    ) -> Result<Answer, String> {
        tokio::time::timeout(timeout, self.post_inner(path, headers, body))
            .await
            .map_err(|_| "timed out".to_owned())?
    }

    async fn post_inner(
        &self,
        path: &str,
        headers: &[(&str, String)],
        body: Bytes,
    ) -> Result<Answer, String> {
        let cfg = &self.cfg;
        let host = cfg.host.trim_start_matches('[').trim_end_matches(']');
        let tcp = tokio::net::TcpStream::connect((host, cfg.port))
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let _ = tcp.set_nodelay(true);
        let authority = if cfg.host.contains(':') && !cfg.host.starts_with('[') {
            format!("[{}]:{}", cfg.host, cfg.port)
        } else {
            format!("{}:{}", cfg.host, cfg.port)
        };
        let mut req = http::Request::post(path)
            .header(http::header::HOST, authority)
            .header(
                http::header::AUTHORIZATION,
                format!("Bearer {}", cfg.token.expose_str().unwrap_or_default()),
            )
            .header(http::header::CONTENT_TYPE, "application/json");
        for (k, v) in headers {
            req = req.header(*k, v.as_str());
        }
        let req = req.body(Full::new(body)).map_err(|e| e.to_string())?;
        match &cfg.tls {
            Some(tls) => {
                let conn = tokio_rustls::TlsConnector::from(Arc::clone(&tls.config))
                    .connect(tls.server_name.clone(), tcp)
                    .await
                    .map_err(|e| format!("TLS: {e}"))?;
                send(conn, req).await
            }
            None => send(tcp, req).await,
        }
    }
}

async fn send<S>(io: S, req: http::Request<Full<Bytes>>) -> Result<Answer, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io))
            .await
            .map_err(|e| e.to_string())?;
    let driver = tokio::spawn(conn);
    let resp = sender.send_request(req).await.map_err(|e| e.to_string());
    let out = match resp {
        Ok(resp) => {
            let status = resp.status();
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| e.to_string())?
                .to_bytes();
            Ok((status, body))
        }
        Err(e) => Err(e),
    };
    driver.abort();
    out
}

/// Exponential backoff with full jitter: 100 ms doubling up to 10 s.
fn backoff(attempt: u32) -> Duration {
    let cap = 100u64.saturating_mul(1 << attempt.min(7)).min(10_000);
    Duration::from_millis(cap / 2 + fastrand::u64(0..=cap / 2))
}

/// Runs the runner until the process is stopped.
pub async fn run(cfg: RunnerConfig) {
    let cfg = Arc::new(cfg);
    let client = Arc::new(Client {
        cfg: Arc::clone(&cfg),
    });
    let slots = Arc::new(Semaphore::new(cfg.commands.max_concurrent));
    let jobs: Arc<Mutex<HashMap<String, watch::Sender<Option<String>>>>> = Arc::default();
    let offer = describe::read(&cfg.commands).await;
    let intro = Arc::new(offer.intro);
    let body = Bytes::from(
        serde_json::to_vec(
            &json!({"version": env!("CARGO_PKG_VERSION"), "described": offer.digest}),
        )
        .unwrap_or_default(),
    );
    let active = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut attempt = 0u32;
    let mut redescribe = false;
    let mut stop = std::pin::pin!(stop_signal());
    tracing::info!(runner = %cfg.name, "runner started");
    loop {
        let answer = tokio::select! {
            a = client.post("/__runner__/poll", &[], body.clone(), Duration::from_secs(40)) => a,
            () = &mut stop => break,
        };
        let value = match answer {
            Ok((status, bytes)) if status.is_success() => {
                serde_json::from_slice::<Value>(&bytes).unwrap_or(Value::Null)
            }
            Ok((status, _)) => {
                tracing::warn!(status = status.as_u16(), "the gateway refused the poll");
                tokio::time::sleep(backoff(attempt)).await;
                attempt = attempt.saturating_add(1);
                continue;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot reach the gateway");
                tokio::time::sleep(backoff(attempt)).await;
                attempt = attempt.saturating_add(1);
                continue;
            }
        };
        if value.get("superseded").and_then(Value::as_bool) == Some(true) {
            // A newer poll with this runner's token is held by the gateway:
            // another process uses it. Back off rather than take turns.
            tracing::warn!("the gateway holds a newer poll for this runner: is a second runner using its token?");
            tokio::time::sleep(backoff(attempt)).await;
            attempt = attempt.saturating_add(1);
            continue;
        }
        if value.get("describe").and_then(Value::as_bool) == Some(true) {
            // The gateway does not hold this runner's description (yet).
            // Asked again right after describing: another process uses this
            // runner's token; back off rather than take turns at full speed.
            if redescribe {
                tracing::warn!("the gateway holds another description for this runner: is a second runner using its token?");
                tokio::time::sleep(backoff(attempt)).await;
                attempt = attempt.saturating_add(1);
            }
            redescribe = true;
            let sent = client
                .post(
                    "/__runner__/describe",
                    &[],
                    offer.body.clone(),
                    Duration::from_secs(30),
                )
                .await;
            if !matches!(&sent, Ok((s, _)) if s.is_success()) {
                tracing::warn!(answer = ?sent.map(|(s, _)| s.as_u16()), "the gateway did not take this runner's description");
                tokio::time::sleep(backoff(attempt)).await;
                attempt = attempt.saturating_add(1);
                continue;
            }
        } else {
            redescribe = false;
            attempt = 0;
        }
        for id in value
            .get("cancel")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
        {
            if let Some(tx) = lock(&jobs).get(id) {
                tx.send_replace(Some("cancelled by operator".into()));
            }
        }
        for d in value
            .get("jobs")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let Ok(d) = serde_json::from_value::<Dispatch>(d.clone()) else {
                continue;
            };
            let (tx, rx) = watch::channel(None);
            lock(&jobs).insert(d.id.clone(), tx);
            let (cfg, client, slots, jobs, active, intro) = (
                Arc::clone(&cfg),
                Arc::clone(&client),
                Arc::clone(&slots),
                Arc::clone(&jobs),
                Arc::clone(&active),
                Arc::clone(&intro),
            );
            active.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                let id = d.id.clone();
                let (report, up) = run_job(&cfg, &client, &slots, &intro, d, rx).await;
                lock(&jobs).remove(&id);
                let up = up.unwrap_or(Upload {
                    client,
                    id,
                    buf: Vec::new(),
                    acked: 0,
                    gone: false,
                });
                deliver(up, &report).await;
                active.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
            });
        }
    }
    // SIGTERM / SIGINT: cancel what runs (process groups get SIGTERM, then
    // SIGKILL after kill_grace), report it, then exit.
    for tx in lock(&jobs).values() {
        tx.send_replace(Some("runner shutting down".into()));
    }
    let deadline = tokio::time::Instant::now() + cfg.commands.kill_grace + Duration::from_secs(10);
    while active.load(std::sync::atomic::Ordering::SeqCst) > 0
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tracing::info!(runner = %cfg.name, "runner stopped");
}

/// Resolves on SIGTERM or SIGINT.
async fn stop_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => std::future::pending().await,
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn rejected(reason: String) -> Report {
    Report {
        end: "rejected".into(),
        raw: None,
        reason: Some(reason),
        sent: 0,
        output_bytes: 0,
    }
}

/// Why this runner's rules refuse `d`, or its process plan. A Django
/// command runs only with the options this host's Django reported.
fn check(
    cfg: &cmdcfg::CommandsConfig,
    intro: &Snapshot,
    d: &Dispatch,
) -> Result<proc::Plan, String> {
    if !cmdcfg::valid_command_name(&d.command) || !cfg.allowed(&d.command) {
        return Err(format!("{:?} is not allowed on this runner", d.command));
    }
    let info = match (cfg.custom(&d.command), &cfg.django) {
        (None, Some(_)) => match intro.get(&d.command) {
            Known::Ready(info) => Some(info),
            Known::Failed(e) => return Err(format!("Command unavailable: {e}")),
            Known::Pending => return Err("Command unavailable: its options are not read".into()),
        },
        _ => None,
    };
    let argv = args::build(cfg, &d.command, &d.data, info.as_deref())
        .map_err(|e| e.message().to_owned())?;
    crate::commands::plan_for(cfg, &d.command, argv)
        .ok_or_else(|| format!("{:?} is not configured on this runner", d.command))
}

struct UpSink {
    tx: mpsc::UnboundedSender<Vec<u8>>,
    metadata_only: bool,
    max_output: u64,
    total: std::sync::atomic::AtomicU64,
}

impl proc::Sink for UpSink {
    fn started(&self, _pid: u32) {}

    fn output(&self, bytes: &[u8]) {
        use std::sync::atomic::Ordering;
        let before = self.total.fetch_add(bytes.len() as u64, Ordering::SeqCst);
        if self.metadata_only {
            return;
        }
        let room = self.max_output.saturating_sub(before) as usize;
        let keep = bytes.len().min(room);
        if keep > 0 {
            let _ = self.tx.send(bytes.get(..keep).unwrap_or_default().to_vec());
        }
    }
}

async fn run_job(
    cfg: &RunnerConfig,
    client: &Arc<Client>,
    slots: &Arc<Semaphore>,
    intro: &Snapshot,
    d: Dispatch,
    cancel: watch::Receiver<Option<String>>,
) -> (Report, Option<Upload>) {
    let c = &cfg.commands;
    let plan = match check(c, intro, &d) {
        Ok(p) => p,
        Err(reason) => {
            tracing::warn!(job = %d.id, command = %d.command, %reason, "job refused by this runner's rules");
            return (rejected(reason), None);
        }
    };
    let Ok(_permit) = Arc::clone(slots).acquire_owned().await else {
        return (rejected("runner shutting down".into()), None);
    };
    if let Some(reason) = cancel.borrow().clone() {
        let report = Report {
            end: "cancelled".into(),
            raw: None,
            reason: Some(reason),
            sent: 0,
            output_bytes: 0,
        };
        return (report, None);
    }
    let max_output = c
        .rules
        .get(&d.command)
        .and_then(|r| r.max_output)
        .unwrap_or(c.max_output);
    let (tx, rx) = mpsc::unbounded_channel();
    let sink = UpSink {
        tx,
        metadata_only: c.is_metadata_only(&d.command),
        max_output,
        total: Default::default(),
    };
    let up = Upload {
        client: Arc::clone(client),
        id: d.id.clone(),
        buf: Vec::new(),
        acked: 0,
        gone: false,
    };
    let uploader = tokio::spawn(upload(up, rx));
    tracing::info!(job = %d.id, command = %d.command, "job started");
    let end = proc::run(&plan, &sink, cancel).await;
    let output_bytes = sink.total.load(std::sync::atomic::Ordering::SeqCst);
    drop(sink);
    let up = match uploader.await {
        Ok(up) => up,
        Err(_) => Upload {
            client: Arc::clone(client),
            id: d.id.clone(),
            buf: Vec::new(),
            acked: 0,
            gone: true,
        },
    };
    let sent = up.buf.len() as u64;
    let (end, raw, reason) = match end {
        proc::End::Exited(st) => {
            use std::os::unix::process::ExitStatusExt;
            ("exited", Some(st.into_raw()), None)
        }
        proc::End::TimedOut => ("timed_out", None, None),
        proc::End::Cancelled(r) => ("cancelled", None, Some(r)),
        proc::End::SpawnFailed(r) | proc::End::Lost(r) => ("spawn_failed", None, Some(r)),
        proc::End::Rejected(r) => ("rejected", None, Some(r)),
    };
    (
        Report {
            end: end.into(),
            raw,
            reason,
            sent,
            output_bytes,
        },
        Some(up),
    )
}

/// Largest output chunk sent at once.
const CHUNK: usize = 256 << 10;

/// A job's output on its way to the gateway. Everything sent is kept (it is
/// within the output cap) so the runner can resend from whatever length the
/// gateway reports, e.g. after a gateway restart lost what it had in memory.
struct Upload {
    client: Arc<Client>,
    id: String,
    buf: Vec<u8>,
    acked: usize,
    /// The gateway no longer takes this job.
    gone: bool,
}

impl Upload {
    /// Sends what the gateway does not have yet, in order, retrying with
    /// backoff; a 416 answer moves the offset to the gateway's length.
    async fn flush(&mut self) {
        let path = format!("/__runner__/jobs/{}/output", self.id);
        let mut attempt = 0u32;
        while !self.gone && self.acked < self.buf.len() {
            let end = (self.acked + CHUNK).min(self.buf.len());
            let chunk = Bytes::copy_from_slice(self.buf.get(self.acked..end).unwrap_or_default());
            let answer = self
                .client
                .post(
                    &path,
                    &[(OFFSET_HEADER, self.acked.to_string())],
                    chunk,
                    Duration::from_secs(30),
                )
                .await;
            match answer {
                Ok((s, _)) if s.is_success() => {
                    self.acked = end;
                    attempt = 0;
                }
                Ok((s, body)) if s == http::StatusCode::RANGE_NOT_SATISFIABLE => {
                    self.resync(&body);
                }
                Ok((s, _))
                    if s == http::StatusCode::NOT_FOUND || s == http::StatusCode::UNAUTHORIZED =>
                {
                    tracing::warn!(job = %self.id, status = s.as_u16(), "the gateway no longer takes this job's output");
                    self.gone = true;
                }
                _ => {
                    tokio::time::sleep(backoff(attempt)).await;
                    attempt = attempt.saturating_add(1);
                }
            }
        }
    }

    /// Moves the offset to the length a 416 answer carries.
    fn resync(&mut self, body: &[u8]) {
        let theirs = serde_json::from_slice::<Value>(body)
            .ok()
            .and_then(|v| v.get("length").and_then(Value::as_u64));
        match theirs {
            Some(n) if n as usize <= self.buf.len() => self.acked = n as usize,
            _ => {
                tracing::warn!(job = %self.id, "the gateway holds output this runner never sent");
                self.gone = true;
            }
        }
    }
}

/// Sends output chunks in order as they come.
async fn upload(mut up: Upload, mut rx: mpsc::UnboundedReceiver<Vec<u8>>) -> Upload {
    while let Some(b) = rx.recv().await {
        up.buf.extend_from_slice(&b);
        while let Ok(b) = rx.try_recv() {
            up.buf.extend_from_slice(&b);
        }
        up.flush().await;
    }
    up
}

/// Reports the end of a job until the gateway takes it (or says it no
/// longer knows the job); output it is missing is sent again first.
async fn deliver(mut up: Upload, report: &Report) {
    let path = format!("/__runner__/jobs/{}/finish", up.id);
    let body = Bytes::from(serde_json::to_vec(report).unwrap_or_default());
    let id = up.id.clone();
    for attempt in 0..60u32 {
        match up
            .client
            .post(&path, &[], body.clone(), Duration::from_secs(30))
            .await
        {
            Ok((s, _)) if s.is_success() => {
                tracing::info!(job = %id, end = %report.end, "job reported");
                return;
            }
            Ok((s, _))
                if s == http::StatusCode::NOT_FOUND || s == http::StatusCode::UNAUTHORIZED =>
            {
                tracing::warn!(job = %id, status = s.as_u16(), "the gateway no longer takes this job");
                return;
            }
            Ok((s, b)) if s == http::StatusCode::RANGE_NOT_SATISFIABLE => {
                up.resync(&b);
                up.flush().await;
            }
            _ => tokio::time::sleep(backoff(attempt)).await,
        }
    }
    tracing::error!(job = %id, "gave up reporting the end of a job");
}
