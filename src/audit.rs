//! The tamper-evident audit log of remote operations: one JSON line per
//! attempt (accepted, rejected, finished, cancel requested), appended and
//! flushed to disk (`sync_data`) before the caller goes on.
//!
//! Every line carries:
//! - `seq`: its 1-based line number;
//! - `prev`: the SHA-256 (hex) of the previous line's bytes (64 zeros on line 1);
//! - `hash`: the SHA-256 of the line itself up to, not including, `,"hash":...`
//!   plus the closing `}`. It is always the last field.
//!
//! [`verify`] therefore tells an edited line (its `hash` does not match), a
//! deleted or reordered line (`seq` or `prev` does not follow) apart, and
//! reports the first line where the chain breaks. Deleting lines at the *end*
//! of the log cannot be detected from the file alone, so every append also
//! goes to the process log (an `audit record written` line with the record's
//! `seq` and `head`, the hash of the whole line): with the last anchor seen
//! there, [`verify`] tells a log cut short (or its last lines replaced).
//!
//! Over the crate's 600-line guide only with its unit tests, which sit beside
//! the code.

use crate::secret::{hex, sha256};
use serde::Serialize;
use serde_json::Value;
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

/// `prev` of the first line.
const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";
/// How far back from the end of the file the last line is looked for.
const TAIL_WINDOW: u64 = 1 << 20;

/// What happened, as written in the `event` field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Event {
    /// A run was accepted; the line is on disk before the process starts.
    Accepted,
    /// An attempt was refused (401, 403, 400, 409, 429); nothing ran.
    Rejected,
    /// A run ended (any final status).
    Finished,
    /// An operator asked for a run to be cancelled.
    CancelRequested,
}

/// One audit record, before `seq`, `prev`, `time` and `hash` are added.
#[derive(Debug, Clone, Serialize)]
pub struct Entry {
    /// What happened.
    pub event: Event,
    /// The request's id (`X-Request-Id`), or `scheduler-...` for scheduled runs.
    pub request_id: String,
    /// Operator name, `scheduler`, or `None` when unauthenticated.
    pub operator: Option<String>,
    /// Client address, `None` for scheduled runs.
    pub client: Option<String>,
    /// Command name as requested.
    pub command: Option<String>,
    /// Arguments with redacted values.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub args: Option<Value>,
    /// The job this line is about.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub job_id: Option<String>,
    /// `accepted`, `rejected`, or the run's final status.
    pub status: String,
    /// HTTP status answered, on rejections.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http_status: Option<u16>,
    /// Why it was rejected or how it ended.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Process exit code, on finished lines.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// Run time, on finished lines.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    /// Bytes the process wrote (including those dropped over the cap).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output_bytes: Option<u64>,
    /// SHA-256 of everything the process wrote (absent for metadata-only commands).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output_sha256: Option<String>,
}

impl Entry {
    /// A line with only the always-present fields set.
    pub fn new(event: Event, request_id: &str, status: &str) -> Entry {
        Entry {
            event,
            request_id: request_id.to_owned(),
            operator: None,
            client: None,
            command: None,
            args: None,
            job_id: None,
            status: status.to_owned(),
            http_status: None,
            reason: None,
            exit_code: None,
            duration_ms: None,
            output_bytes: None,
            output_sha256: None,
        }
    }
}

#[derive(Serialize)]
struct Line<'a> {
    seq: u64,
    time: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    instance: Option<&'a str>,
    #[serde(flatten)]
    entry: &'a Entry,
    prev: &'a str,
}

struct Tail {
    file: File,
    seq: u64,
    prev: String,
}

/// An open audit log. Appends are serialized; each is on disk when
/// [`AuditLog::append`] returns `Ok`.
pub struct AuditLog {
    path: PathBuf,
    tail: Mutex<Tail>,
    /// Cluster mode: this instance's name, in every line.
    instance: Option<String>,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
            .field("path", &self.path)
            .finish()
    }
}

/// Splits a line into its content (for `hash`) and the recorded hash.
fn split_hash(line: &[u8]) -> Option<(&[u8], &[u8])> {
    const KEY: &[u8] = b",\"hash\":\"";
    // `..."hash":"<64 hex>"}`
    let n = line.len();
    if n < KEY.len() + 64 + 2 || !line.ends_with(b"\"}") {
        return None;
    }
    let hash = line.get(n - 66..n - 2)?;
    let key_start = (n - 66).checked_sub(KEY.len())?;
    if line.get(key_start..n - 66)? != KEY {
        return None;
    }
    Some((line.get(..key_start)?, hash))
}

fn content_hash(content: &[u8]) -> String {
    let mut buf = Vec::with_capacity(content.len() + 1);
    buf.extend_from_slice(content);
    buf.push(b'}');
    hex(&sha256(&buf))
}

impl AuditLog {
    /// Opens (creating if needed) the log at `path` and reads where the chain
    /// stands. A trailing partial line (a crash mid-write, never acknowledged)
    /// is cut off. Fails when the last complete line is not a valid record.
    pub fn open(path: &Path) -> io::Result<AuditLog> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)?;
        let meta = file.metadata()?;
        let mut seq = 0;
        let mut prev = GENESIS.to_owned();
        if meta.is_file() && meta.len() > 0 {
            let len = meta.len();
            let start = len.saturating_sub(TAIL_WINDOW);
            file.seek(SeekFrom::Start(start))?;
            let mut buf = Vec::new();
            Read::by_ref(&mut file)
                .take(len - start)
                .read_to_end(&mut buf)?;
            if buf.last() != Some(&b'\n') {
                // A partial line: the write was never acknowledged.
                let keep = buf.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
                let new_len = start + keep as u64;
                tracing::warn!(
                    path = %path.display(),
                    "audit log ends with a partial line (crash mid-write); truncating it"
                );
                file.set_len(new_len)?;
                file.sync_data()?;
                buf.truncate(keep);
            }
            if let Some(body) = buf.strip_suffix(b"\n") {
                let line_start = body.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
                let line = body.get(line_start..).unwrap_or_default();
                if !line.is_empty() {
                    let value: Value = serde_json::from_slice(line).map_err(|_| {
                        io::Error::new(
                            io::ErrorKind::InvalidData,
                            "the last line of the audit log is not an audit record; run `portcullis audit verify`",
                        )
                    })?;
                    seq = value.get("seq").and_then(Value::as_u64).ok_or_else(|| {
                        io::Error::new(
                            io::ErrorKind::InvalidData,
                            "the last line of the audit log has no seq; run `portcullis audit verify`",
                        )
                    })?;
                    prev = hex(&sha256(line));
                }
            }
        }
        Ok(AuditLog {
            path: path.to_path_buf(),
            tail: Mutex::new(Tail { file, seq, prev }),
            instance: None,
        })
    }

    /// Names `instance` (cluster mode's `cluster.instance`) in every line
    /// appended from now on.
    pub fn with_instance(mut self, instance: Option<String>) -> AuditLog {
        self.instance = instance;
        self
    }

    /// The log's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one line and flushes it to disk. On error nothing is
    /// acknowledged and the chain stays where it was (a partially written line
    /// is cut off at the next start).
    pub fn append(&self, entry: &Entry) -> io::Result<Anchor> {
        let mut tail = self
            .tail
            .lock()
            .map_err(|_| io::Error::other("audit log lock poisoned"))?;
        let seq = tail.seq + 1;
        let line = Line {
            seq,
            time: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            instance: self.instance.as_deref(),
            entry,
            prev: &tail.prev,
        };
        let mut text = serde_json::to_vec(&line).map_err(io::Error::other)?;
        // `text` ends with `}`: hash what precedes it, then append the hash.
        text.pop();
        let hash = content_hash(&text);
        text.extend_from_slice(b",\"hash\":\"");
        text.extend_from_slice(hash.as_bytes());
        text.extend_from_slice(b"\"}");
        let line_hash = hex(&sha256(&text));
        text.push(b'\n');
        tail.file.write_all(&text)?;
        tail.file.sync_data()?;
        // The anchor leaves the file: the process log keeps a copy.
        tracing::info!(
            target: "portcullis::audit",
            seq,
            head = %line_hash,
            event = ?entry.event,
            "audit record written"
        );
        let anchor = Anchor {
            seq,
            head: line_hash.clone(),
        };
        tail.seq = seq;
        tail.prev = line_hash;
        Ok(anchor)
    }

    /// [`AuditLog::append`] on the blocking pool.
    pub async fn append_async(self: &Arc<Self>, entry: Entry) -> io::Result<()> {
        let log = Arc::clone(self);
        match tokio::task::spawn_blocking(move || log.append(&entry)).await {
            Ok(r) => r.map(drop),
            Err(e) => Err(io::Error::other(e)),
        }
    }
}

/// Where the log stood after one append: the record's `seq` and `head`, the
/// SHA-256 (hex) of its whole line (what the next record's `prev` holds).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Anchor {
    /// The record's line number.
    pub seq: u64,
    /// SHA-256 of the record's line, in hex.
    pub head: String,
}

impl std::str::FromStr for Anchor {
    type Err = String;

    /// `SEQ:HEAD`, as the process log's `seq` and `head` fields give them.
    fn from_str(s: &str) -> Result<Anchor, String> {
        let (seq, head) = s
            .split_once(':')
            .ok_or_else(|| format!("{s:?}: expected SEQ:HASH"))?;
        let seq = seq
            .trim()
            .parse::<u64>()
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| format!("{seq:?}: not a sequence number"))?;
        let head = head.trim().to_ascii_lowercase();
        if head.len() != 64 || !head.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!("{head:?}: not a SHA-256 in hex"));
        }
        Ok(Anchor { seq, head })
    }
}

/// The result of [`verify`].
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Every line checks out.
    Intact {
        /// Number of lines.
        lines: u64,
    },
    /// The first line where the chain breaks.
    Broken {
        /// 1-based line number in the file.
        line: u64,
        /// What is wrong with it.
        problem: String,
    },
}

/// Checks an audit log's hash chain and reports the first line that was
/// edited, deleted or reordered.
pub fn verify(path: &Path) -> io::Result<Verdict> {
    verify_anchored(path, None)
}

/// [`verify`], and, with an `anchor` taken from the process log, that the
/// log still holds that record unchanged: a log cut short after it, or whose
/// last lines were replaced, is broken too.
pub fn verify_anchored(path: &Path, anchor: Option<&Anchor>) -> io::Result<Verdict> {
    walk(path, anchor, u64::MAX)
}

/// The verification of [`verify_anchored`] over the first `upto` lines.
fn walk(path: &Path, anchor: Option<&Anchor>, upto: u64) -> io::Result<Verdict> {
    let reader = io::BufReader::new(File::open(path)?);
    let mut prev = GENESIS.to_owned();
    let mut n = 0u64;
    for line in reader.split(b'\n') {
        if n >= upto {
            break;
        }
        let line = line?;
        n += 1;
        let broken = |problem: &str| Verdict::Broken {
            line: n,
            problem: problem.to_owned(),
        };
        let Ok(value) = serde_json::from_slice::<Value>(&line) else {
            return Ok(broken(
                "not a JSON audit record: edited, truncated or inserted",
            ));
        };
        let Some((content, recorded)) = split_hash(&line) else {
            return Ok(broken("has no trailing hash field: edited or inserted"));
        };
        if content_hash(content).as_bytes() != recorded {
            return Ok(broken("edited: its content does not match its hash"));
        }
        match value.get("seq").and_then(Value::as_u64) {
            Some(seq) if seq == n => {}
            Some(seq) if seq > n => {
                return Ok(Verdict::Broken {
                    line: n,
                    problem: format!(
                        "has sequence number {seq}, expected {n}: a line before it was deleted (or lines were reordered)"
                    ),
                })
            }
            Some(seq) => {
                return Ok(Verdict::Broken {
                    line: n,
                    problem: format!(
                        "has sequence number {seq}, expected {n}: lines were reordered or duplicated"
                    ),
                })
            }
            None => return Ok(broken("has no sequence number")),
        }
        if value.get("prev").and_then(Value::as_str) != Some(prev.as_str()) {
            return Ok(broken(
                "does not follow the previous line (prev hash mismatch): a line was replaced, deleted or reordered",
            ));
        }
        prev = hex(&sha256(&line));
        if let Some(a) = anchor.filter(|a| a.seq == n) {
            if prev != a.head {
                return Ok(broken(
                    "does not match the anchor from the process log: the record written as this line was replaced",
                ));
            }
        }
    }
    if let Some(a) = anchor.filter(|a| a.seq > n) {
        return Ok(Verdict::Broken {
            line: n + 1,
            problem: format!(
                "missing: the log ends after line {n}, but record {} was written (anchor from the process log): lines at the end were deleted",
                a.seq
            ),
        });
    }
    Ok(Verdict::Intact { lines: n })
}

/// Recent lines of the log and the verdict on its chain: what the operator
/// console's audit view shows.
#[derive(Debug)]
pub struct Recent {
    /// Up to the requested number of lines before the cursor, newest first,
    /// as they are in the file (lossy UTF-8).
    pub lines: Vec<String>,
    /// The `seq` to ask for next (`before`), when older lines exist.
    pub next: Option<u64>,
    /// The chain over every line up to the newest record this process wrote.
    pub verdict: Verdict,
}

impl AuditLog {
    /// Where the chain stands now: the newest record's `seq` and line hash.
    pub fn head(&self) -> io::Result<Anchor> {
        let tail = self
            .tail
            .lock()
            .map_err(|_| io::Error::other("audit log lock poisoned"))?;
        Ok(Anchor {
            seq: tail.seq,
            head: tail.prev.clone(),
        })
    }

    /// The `limit` lines before line `before` (1-based, exclusive; `None`:
    /// the newest), newest first, and whether the whole chain up to the
    /// current head verifies, the head itself included (so a log cut short or
    /// rewritten under the running process is reported). Lines appended while
    /// reading are left for the next call. Reads the whole file: run it on
    /// the blocking pool.
    pub fn recent(&self, before: Option<u64>, limit: usize) -> io::Result<Recent> {
        let head = self.head()?;
        let anchor = (head.seq > 0).then_some(&head);
        let before = before.unwrap_or(u64::MAX);
        let mut window = std::collections::VecDeque::with_capacity(limit.min(1024));
        let mut older = false;
        let verdict = walk(&self.path, anchor, head.seq)?;
        // A second pass: the verdict stops at the first broken line, the
        // listing goes on past it.
        let reader = io::BufReader::new(File::open(&self.path)?);
        for (n, line) in (1..=head.seq.min(before.saturating_sub(1))).zip(reader.split(b'\n')) {
            let line = line?;
            if limit > 0 {
                if window.len() == limit {
                    window.pop_front();
                    older = true;
                }
                window.push_back((n, String::from_utf8_lossy(&line).into_owned()));
            }
        }
        let next = window.front().map(|(n, _)| *n).filter(|_| older);
        Ok(Recent {
            lines: window.into_iter().rev().map(|(_, l)| l).collect(),
            next,
            verdict,
        })
    }
}

/// `portcullis audit verify FILE`: prints the verdict; exit status 0 when
/// intact, 1 when broken, 2 when the file cannot be read.
pub fn verify_command(path: &Path, anchor: Option<&Anchor>) -> u8 {
    match verify_anchored(path, anchor) {
        Ok(Verdict::Intact { lines }) => {
            println!("{}: OK, {lines} lines, hash chain intact", path.display());
            0
        }
        Ok(Verdict::Broken { line, problem }) => {
            println!("{}: BROKEN at line {line}: {problem}", path.display());
            1
        }
        Err(e) => {
            eprintln!("{}: cannot read: {e}", path.display());
            2
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(i: usize) -> Entry {
        let mut e = Entry::new(Event::Accepted, &format!("r{i}"), "accepted");
        e.command = Some("check".into());
        e.operator = Some("alice".into());
        e
    }

    fn write_log(dir: &Path, n: usize) -> PathBuf {
        let path = dir.join("audit.jsonl");
        let log = AuditLog::open(&path).unwrap();
        for i in 0..n {
            log.append(&entry(i)).unwrap();
        }
        path
    }

    fn lines(path: &Path) -> Vec<String> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    fn write_lines(path: &Path, lines: &[String]) {
        std::fs::write(path, lines.join("\n") + "\n").unwrap();
    }

    #[test]
    fn recent_pages_newest_first_and_reports_the_chain() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let log = AuditLog::open(&path).unwrap();
        for i in 0..5 {
            log.append(&entry(i)).unwrap();
        }
        let file = lines(&path);
        let page = log.recent(None, 2).unwrap();
        assert_eq!(page.lines, [file[4].clone(), file[3].clone()]);
        assert_eq!(page.next, Some(4));
        assert_eq!(page.verdict, Verdict::Intact { lines: 5 });
        let page = log.recent(page.next, 10).unwrap();
        assert_eq!(page.lines.len(), 3);
        assert_eq!(page.lines[0], file[2]);
        assert_eq!(page.next, None);
        // A log edited under the running process no longer verifies.
        let mut edited = file.clone();
        edited[1] = edited[1].replace("alice", "mallory");
        write_lines(&path, &edited);
        let page = log.recent(None, 10).unwrap();
        assert!(matches!(page.verdict, Verdict::Broken { line: 2, .. }));
        // And one cut short after the newest record is reported too.
        write_lines(&path, &file[..4]);
        let page = log.recent(None, 10).unwrap();
        assert!(matches!(page.verdict, Verdict::Broken { line: 5, .. }));
    }

    #[test]
    fn anchors_catch_a_cut_or_rewritten_end() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let log = AuditLog::open(&path).unwrap();
        let anchors: Vec<Anchor> = (0..4).map(|i| log.append(&entry(i)).unwrap()).collect();
        drop(log);
        assert_eq!(anchors[3].seq, 4);
        let intact = Verdict::Intact { lines: 4 };
        for a in &anchors {
            assert_eq!(verify_anchored(&path, Some(a)).unwrap(), intact);
        }
        let orig = lines(&path);

        // Cut after line 2: the chain alone cannot tell.
        write_lines(&path, &orig[..2]);
        assert_eq!(verify(&path).unwrap(), Verdict::Intact { lines: 2 });
        match verify_anchored(&path, Some(&anchors[3])).unwrap() {
            Verdict::Broken { line: 3, problem } => {
                assert!(problem.contains("deleted"), "{problem}")
            }
            v => panic!("{v:?}"),
        }
        // An anchor within what is left still holds.
        assert_eq!(
            verify_anchored(&path, Some(&anchors[1])).unwrap(),
            Verdict::Intact { lines: 2 }
        );

        // Cut, then two other records appended with a valid chain: the
        // anchored record is not the one there now.
        let log = AuditLog::open(&path).unwrap();
        log.append(&entry(7)).unwrap();
        log.append(&entry(8)).unwrap();
        drop(log);
        assert_eq!(verify(&path).unwrap(), intact);
        match verify_anchored(&path, Some(&anchors[3])).unwrap() {
            Verdict::Broken { line: 4, problem } => {
                assert!(problem.contains("replaced"), "{problem}")
            }
            v => panic!("{v:?}"),
        }

        // The `SEQ:HASH` form of the process log.
        let text = format!("4:{}", anchors[3].head.to_ascii_uppercase());
        assert_eq!(text.parse::<Anchor>(), Ok(anchors[3].clone()));
        for bad in [
            "4",
            "0:00",
            "x:00",
            "4:abc",
            &format!("4:{}", "g".repeat(64)),
        ] {
            assert!(bad.parse::<Anchor>().is_err(), "{bad}");
        }
    }

    #[test]
    fn an_instance_is_named_in_every_line_and_the_chain_holds() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_log(dir.path(), 2);
        let log = AuditLog::open(&path)
            .unwrap()
            .with_instance(Some("gw-2".into()));
        log.append(&entry(7)).unwrap();
        log.append(&entry(8)).unwrap();
        let file = lines(&path);
        let named: Vec<Option<&str>> = file
            .iter()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .map(|v| v.get("instance").and_then(Value::as_str).map(|_| "named"))
            .collect();
        assert_eq!(named, [None, None, Some("named"), Some("named")]);
        assert!(file[3].contains("\"instance\":\"gw-2\""), "{}", file[3]);
        assert_eq!(verify(&path).unwrap(), Verdict::Intact { lines: 4 });
    }

    #[test]
    fn chain_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_log(dir.path(), 3);
        let log = AuditLog::open(&path).unwrap();
        log.append(&entry(9)).unwrap();
        assert_eq!(verify(&path).unwrap(), Verdict::Intact { lines: 4 });
    }

    #[test]
    fn partial_trailing_line_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_log(dir.path(), 2);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"seq\":3,\"ti").unwrap();
        let log = AuditLog::open(&path).unwrap();
        log.append(&entry(3)).unwrap();
        assert_eq!(verify(&path).unwrap(), Verdict::Intact { lines: 3 });
    }

    #[test]
    fn tampering_is_located() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_log(dir.path(), 5);
        let orig = lines(&path);

        let mut edited = orig.clone();
        edited[2] = edited[2].replace("alice", "mallory");
        write_lines(&path, &edited);
        assert!(matches!(
            verify(&path).unwrap(),
            Verdict::Broken { line: 3, .. }
        ));

        let mut deleted = orig.clone();
        deleted.remove(1);
        write_lines(&path, &deleted);
        assert!(matches!(
            verify(&path).unwrap(),
            Verdict::Broken { line: 2, .. }
        ));

        let mut swapped = orig.clone();
        swapped.swap(3, 4);
        write_lines(&path, &swapped);
        assert!(matches!(
            verify(&path).unwrap(),
            Verdict::Broken { line: 4, .. }
        ));

        write_lines(&path, &orig);
        assert_eq!(verify(&path).unwrap(), Verdict::Intact { lines: 5 });
    }
}
