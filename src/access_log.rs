//! Structured access log: one JSON line per request, written by a dedicated
//! thread so the request path never blocks on I/O.
//!
//! Invariant: a line carries no key, token, password, query string or body:
//! only the request id, client address, API client *name*, route template,
//! method, path, status, byte count and timings.

use crate::metrics::Metrics;
use serde::Serialize;
use std::io::Write;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;

/// Lines buffered before the writer is considered behind (then lines are dropped and counted).
const QUEUE: usize = 65_536;

/// Where access-log lines go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Standard output (the default; diagnostics go to standard error).
    Stdout,
    /// Appended to a file.
    File(std::path::PathBuf),
    /// No access log.
    Off,
}

/// One access-log record.
#[derive(Serialize, Debug)]
pub struct Record<'a> {
    pub time: String,
    pub request_id: &'a str,
    pub client: String,
    pub api_client: &'a str,
    pub route: &'a str,
    pub method: &'a str,
    pub path: &'a str,
    pub status: u16,
    pub bytes: u64,
    pub duration_ms: f64,
    pub upstream_ms: Option<f64>,
}

/// A handle for writing lines; cheap to clone.
#[derive(Clone)]
pub struct AccessLog {
    tx: Option<SyncSender<Vec<u8>>>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for AccessLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessLog")
            .field("enabled", &self.tx.is_some())
            .finish()
    }
}

impl AccessLog {
    /// Starts the writer thread for `target`.
    pub fn start(target: &Target, metrics: Arc<Metrics>) -> std::io::Result<AccessLog> {
        let out: Box<dyn Write + Send> = match target {
            Target::Off => return Ok(AccessLog { tx: None, metrics }),
            Target::Stdout => Box::new(std::io::stdout()),
            Target::File(path) => Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)?,
            ),
        };
        let (tx, rx) = sync_channel(QUEUE);
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || write_lines(rx, out))?;
        Ok(AccessLog {
            tx: Some(tx),
            metrics,
        })
    }

    /// Whether lines are written at all.
    pub fn enabled(&self) -> bool {
        self.tx.is_some()
    }

    /// Queues one record; never blocks (a full queue drops the line and counts it).
    pub fn write(&self, record: &Record<'_>) {
        let Some(tx) = &self.tx else { return };
        let mut line = Vec::with_capacity(256);
        if serde_json::to_writer(&mut line, record).is_err() {
            return;
        }
        line.push(b'\n');
        match tx.try_send(line) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                self.metrics.access_log_dropped.inc();
            }
            Err(TrySendError::Disconnected(_)) => {}
        }
    }
}

fn write_lines(rx: Receiver<Vec<u8>>, out: Box<dyn Write + Send>) {
    let mut out = std::io::BufWriter::with_capacity(64 << 10, out);
    // Block only while the log is quiet. Under load the thread drains in
    // batches and sleeps between them, so request threads never pay for
    // waking it (one wake-up per burst, not per line).
    while let Ok(line) = rx.recv() {
        let _ = out.write_all(&line);
        loop {
            let mut wrote = false;
            while let Ok(line) = rx.try_recv() {
                let _ = out.write_all(&line);
                wrote = true;
            }
            let _ = out.flush();
            if !wrote {
                break;
            }
            std::thread::sleep(BATCH_PAUSE);
        }
    }
}

/// How long the writer waits between batches while lines keep coming.
const BATCH_PAUSE: std::time::Duration = std::time::Duration::from_millis(20);

/// The current time as RFC 3339 with milliseconds.
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

/// What is known about a request when its response head is ready; the line
/// is written when the response body ends (or is dropped), with the bytes sent.
#[derive(Debug)]
pub struct Pending {
    pub log: AccessLog,
    pub request_id: http::HeaderValue,
    pub client: std::net::IpAddr,
    pub api_client: Option<http::HeaderValue>,
    pub route: crate::metrics::RouteName,
    pub method: http::Method,
    pub path: String,
    pub status: u16,
    pub start: std::time::Instant,
    pub upstream: Option<std::time::Duration>,
}

impl Pending {
    fn emit(&self, bytes: u64) {
        let api_client = self
            .api_client
            .as_ref()
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-");
        self.log.write(&Record {
            time: now_rfc3339(),
            request_id: self.request_id.to_str().unwrap_or("-"),
            client: self.client.to_string(),
            api_client,
            route: self.route.as_str(),
            method: self.method.as_str(),
            path: &self.path,
            status: self.status,
            bytes,
            duration_ms: self.start.elapsed().as_secs_f64() * 1e3,
            upstream_ms: self.upstream.map(|d| d.as_secs_f64() * 1e3),
        });
    }
}

/// A response body that writes the access-log line when it ends.
pub struct LoggedBody {
    inner: crate::body::Body,
    bytes: u64,
    pending: Option<Box<Pending>>,
}

impl LoggedBody {
    /// Wraps `inner`.
    pub fn new(inner: crate::body::Body, pending: Pending) -> LoggedBody {
        LoggedBody {
            inner,
            bytes: 0,
            pending: Some(Box::new(pending)),
        }
    }
}

impl http_body::Body for LoggedBody {
    type Data = bytes::Bytes;
    type Error = crate::body::BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
        let this = &mut *self;
        let polled = std::pin::Pin::new(&mut this.inner).poll_frame(cx);
        if let std::task::Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(data) = frame.data_ref() {
                this.bytes += data.len() as u64;
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for LoggedBody {
    fn drop(&mut self) {
        if let Some(p) = self.pending.take() {
            p.emit(self.bytes);
        }
    }
}
