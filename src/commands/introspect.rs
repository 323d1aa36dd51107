//! Learns each Django command's real options from Django itself: the
//! configured python runs `manage.py` with `execute_from_command_line`
//! replaced by a reader (`introspect.py`, passed with `-c`) that loads every
//! command class, calls `create_parser` and prints its argparse actions as
//! JSON. No command runs.
//!
//! Invariants:
//! - Introspection runs in the background (at start and on every reload),
//!   through [`super::runner`]: cleared environment plus `commands.env`, its
//!   own process group, killed after [`TIMEOUT`].
//! - A Django command runs only with a [`CommandInfo`] read this way: while
//!   it is pending a request waits at most [`PENDING_WAIT`], then 503; a
//!   command whose introspection failed is refused with 503 until a reload
//!   reads it successfully.
//! - `--settings`, `--pythonpath`, `--help` and `--version` are never options
//!   (see [`forbidden_key`]).

use serde::Deserialize;
use serde_json::Value;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The reader run with `python -c`.
pub const SCRIPT: &str = include_str!("introspect.py");
/// How long one introspection run may take before its process group is killed.
pub const TIMEOUT: Duration = Duration::from_secs(60);
/// How long a request for a command whose options are still being read waits
/// before it is answered 503.
pub const PENDING_WAIT: Duration = Duration::from_secs(30);
/// The line prefix before the JSON result (anything the project prints is
/// ignored).
const MARK: &str = "@@portcullis-introspection@@";
/// Most output kept from one run.
const MAX_OUTPUT: usize = 16 << 20;

/// Normalizes a `data` key or long option for comparison: no leading `--`,
/// `-` → `_`.
pub fn normalize(key: &str) -> String {
    key.trim_start_matches("--").replace('-', "_")
}

/// Whether a (normalized) key may never be passed: `settings` and
/// `pythonpath` make Django import any module on disk, and any prefix of
/// them could be expanded into them by an argparse that allows abbreviations.
pub fn forbidden_key(normalized: &str) -> bool {
    !normalized.is_empty()
        && ["settings", "pythonpath"]
            .iter()
            .any(|f| f.starts_with(normalized))
}

/// What kind of value an option takes (the `kind` of `GET /__manage__/`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Any string.
    String,
    /// An integer (`type=int`).
    Int,
    /// A number (`type=float`).
    Float,
    /// A flag without a value (`store_true`, `store_false`, ...).
    Bool,
    /// One of `choices`.
    Choice,
}

impl Kind {
    /// The name shown to operators.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::String => "string",
            Kind::Int => "int",
            Kind::Float => "float",
            Kind::Bool => "bool",
            Kind::Choice => "choice",
        }
    }
}

/// How a list value is passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Repeat {
    /// One value only.
    No,
    /// `action="append"`/`"extend"`: `--flag=a --flag=b`.
    Append,
    /// `nargs="+"`/`"*"`/N: `--flag a b` (values may not start with `-`).
    Nargs {
        /// Fewest values.
        min: usize,
        /// Most values, if bounded.
        max: Option<usize>,
    },
}

/// One long option of a Django command.
#[derive(Debug, Clone)]
pub struct DjangoOption {
    /// Canonical data key: the first long option, `-` → `_`.
    pub name: String,
    /// That long option as Django spells it (`--no-color`).
    pub flag: String,
    /// Every accepted data key (normalized) with the flag it stands for.
    pub keys: Vec<(String, String)>,
    /// The argparse `dest`.
    pub dest: String,
    /// Its kind.
    pub kind: Kind,
    /// The value type under `choices` (int, float or string).
    pub value_kind: Kind,
    /// Whether and how a list is passed.
    pub repeat: Repeat,
    /// Help text.
    pub help: Option<String>,
    /// Allowed values, as Django lists them.
    pub choices: Option<Vec<Value>>,
    /// The default, as JSON (bool options: `false`).
    pub default: Value,
}

impl DjangoOption {
    /// Whether this option's value is redacted under `commands.redact`:
    /// any of its names or its `dest` listed (case-insensitive, `-` = `_`).
    pub fn redacted(&self, redact: &[String]) -> bool {
        redact.iter().any(|r| {
            let r = normalize(&r.to_ascii_lowercase());
            self.keys.iter().any(|(k, _)| k.eq_ignore_ascii_case(&r))
                || self.dest.eq_ignore_ascii_case(&r)
        })
    }
}

/// What Django says about one command.
#[derive(Debug, Clone)]
pub struct CommandInfo {
    /// The command's help text.
    pub help: Option<String>,
    /// Its long options (never `settings`, `pythonpath`, `help`, `version`).
    pub options: Vec<DjangoOption>,
    /// Usage of its positional arguments (`app_label [migration_name]`), if any.
    pub positional: Option<String>,
}

impl CommandInfo {
    /// The option a (normalized) key names exactly, with the flag to pass.
    pub fn find(&self, normalized: &str) -> Option<(&DjangoOption, &str)> {
        self.options.iter().find_map(|o| {
            o.keys
                .iter()
                .find(|(k, _)| k == normalized)
                .map(|(_, f)| (o, f.as_str()))
        })
    }
}

// ---------------------------------------------------------------- raw JSON

#[derive(Deserialize)]
struct RawReport {
    commands: HashMap<String, RawCommand>,
}

#[derive(Deserialize)]
struct RawCommand {
    ok: bool,
    error: Option<String>,
    error_type: Option<String>,
    help: Option<String>,
    #[serde(default)]
    actions: Vec<RawAction>,
}

#[derive(Deserialize)]
struct RawAction {
    option_strings: Vec<String>,
    dest: String,
    action: String,
    nargs: Option<Value>,
    #[serde(rename = "type")]
    ty: Option<String>,
    choices: Option<Vec<Value>>,
    help: Option<String>,
    default: Option<Value>,
    usage: Option<String>,
}

/// Builds a command's description from its argparse actions.
fn command_info(raw: RawCommand) -> CommandInfo {
    let mut options: Vec<DjangoOption> = Vec::new();
    let mut positional: Vec<String> = Vec::new();
    for a in raw.actions {
        if matches!(a.action.as_str(), "help" | "version" | "subparsers") {
            continue;
        }
        if a.option_strings.is_empty() {
            positional.push(a.usage.unwrap_or(a.dest));
            continue;
        }
        let keys: Vec<(String, String)> = a
            .option_strings
            .iter()
            .filter(|s| s.starts_with("--") && s.len() > 2)
            .map(|s| (normalize(s), s.clone()))
            .filter(|(k, _)| !forbidden_key(k) && k != super::config::POSITIONAL)
            .collect();
        let Some((name, flag)) = keys.first().cloned() else {
            continue; // short options only: not reachable from `data`
        };
        let nargs = a.nargs.as_ref();
        let takes_value = !matches!(nargs, Some(Value::Number(n)) if n.as_u64() == Some(0))
            && !matches!(
                a.action.as_str(),
                "store_true"
                    | "store_false"
                    | "store_const"
                    | "append_const"
                    | "count"
                    | "boolean_optional"
            );
        let value_kind = match a.ty.as_deref() {
            Some("int") => Kind::Int,
            Some("float") => Kind::Float,
            _ => Kind::String,
        };
        let kind = if !takes_value {
            Kind::Bool
        } else if a.choices.is_some() {
            Kind::Choice
        } else {
            value_kind
        };
        let repeat = if !takes_value {
            Repeat::No
        } else if matches!(a.action.as_str(), "append" | "extend") {
            Repeat::Append
        } else {
            match nargs {
                Some(Value::String(s)) if s == "+" => Repeat::Nargs { min: 1, max: None },
                Some(Value::String(s)) if s == "*" => Repeat::Nargs { min: 0, max: None },
                Some(Value::Number(n)) => match n.as_u64().and_then(|n| usize::try_from(n).ok()) {
                    Some(n) if n > 1 => Repeat::Nargs {
                        min: n,
                        max: Some(n),
                    },
                    _ => Repeat::No,
                },
                _ => Repeat::No,
            }
        };
        options.push(DjangoOption {
            name,
            flag,
            keys,
            dest: a.dest,
            kind,
            value_kind,
            repeat,
            help: a.help,
            choices: if kind == Kind::Choice {
                a.choices
            } else {
                None
            },
            default: if kind == Kind::Bool {
                Value::Bool(false)
            } else {
                a.default.unwrap_or(Value::Null)
            },
        });
    }
    CommandInfo {
        help: raw.help,
        options,
        positional: (!positional.is_empty()).then(|| positional.join(" ")),
    }
}

/// A command's description from its JSON as the reader prints it (tests).
#[cfg(test)]
pub(crate) fn info_from_json(v: Value) -> CommandInfo {
    command_info(serde_json::from_value(v).expect("command JSON"))
}

// ---------------------------------------------------------------- state

/// What is known about one command.
#[derive(Debug, Clone)]
pub enum Known {
    /// Being read.
    Pending,
    /// Read.
    Ready(Arc<CommandInfo>),
    /// Could not be read: the reason (no secrets; details are logged).
    Failed(String),
}

/// The result of the latest introspection run plus whether one is running.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Per command, from the latest finished run.
    commands: HashMap<String, Result<Arc<CommandInfo>, String>>,
    /// The whole latest run failed (python could not start, timed out...).
    failed: Option<String>,
    /// Whether a run finished since start.
    done: bool,
    /// Whether a run is in progress.
    pub running: bool,
}

impl Snapshot {
    /// Every command the latest run reported, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.commands.keys().cloned().collect();
        names.sort();
        names
    }

    /// What is known about `command` now.
    pub fn get(&self, command: &str) -> Known {
        match self.commands.get(command) {
            Some(Ok(info)) => Known::Ready(Arc::clone(info)),
            Some(Err(e)) if !self.running => Known::Failed(e.clone()),
            _ if self.running || !self.done => Known::Pending,
            _ => Known::Failed(match &self.failed {
                Some(e) => e.clone(),
                None => format!("introspection failed: Django has no command named {command:?}"),
            }),
        }
    }
}

/// What one introspection run needs.
#[derive(Debug, Clone)]
pub struct Job {
    /// The interpreter.
    pub python: String,
    /// `manage.py`.
    pub manage_py: String,
    /// Working directory.
    pub cwd: std::path::PathBuf,
    /// The complete environment.
    pub env: Vec<(String, String)>,
    /// Commands to read; `["*"]` for every command Django knows.
    pub commands: Vec<String>,
}

struct Collect {
    out: Mutex<Vec<u8>>,
}

impl super::runner::Sink for Collect {
    fn started(&self, _pid: u32) {}

    fn output(&self, bytes: &[u8]) {
        let mut out = super::lock(&self.out);
        let room = MAX_OUTPUT.saturating_sub(out.len());
        out.extend_from_slice(bytes.get(..bytes.len().min(room)).unwrap_or_default());
    }
}

/// The last lines of `text`, clipped, for a log line.
fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let start = lines.len().saturating_sub(5);
    let joined = lines.get(start..).unwrap_or_default().join(" | ");
    joined.chars().take(1000).collect()
}

/// Runs one introspection. Returns per-command results, or why the whole run
/// failed. Everything worth knowing is logged.
pub async fn run(job: &Job) -> Result<HashMap<String, Result<Arc<CommandInfo>, String>>, String> {
    let mut args = vec!["-c".to_owned(), SCRIPT.to_owned(), job.manage_py.clone()];
    args.extend(job.commands.iter().cloned());
    let plan = super::runner::Plan {
        program: job.python.clone(),
        args,
        cwd: job.cwd.clone(),
        env: job.env.clone(),
        timeout: TIMEOUT,
        kill_grace: Duration::from_secs(2),
    };
    let sink = Collect {
        out: Mutex::new(Vec::new()),
    };
    // Nobody cancels an introspection; the sender lives as long as the run.
    let (_cancel_tx, cancel_rx) = tokio::sync::watch::channel(None);
    let end = super::runner::run(&plan, &sink, cancel_rx).await;
    let out = std::mem::take(&mut *super::lock(&sink.out));
    let text = String::from_utf8_lossy(&out);
    let fail = |why: String| {
        tracing::error!(python = %job.python, manage_py = %job.manage_py, output = %tail(&text), "Django introspection failed: {why}; those commands are refused (503) until a reload reads them");
        Err(format!("introspection failed: {why}"))
    };
    match end {
        super::runner::End::Exited(st) if st.success() => {}
        super::runner::End::Exited(st) => {
            return fail(match st.code() {
                Some(c) => format!("python exited with status {c}"),
                None => "python was killed by a signal".to_owned(),
            })
        }
        super::runner::End::TimedOut => {
            return fail(format!(
                "no answer from python within {}s",
                TIMEOUT.as_secs()
            ))
        }
        super::runner::End::Cancelled(r) | super::runner::End::SpawnFailed(r) => return fail(r),
    }
    let Some(json) = text
        .rfind(MARK)
        .and_then(|i| text.get(i + MARK.len()..))
        .and_then(|rest| rest.lines().next())
    else {
        return fail("python printed no result".to_owned());
    };
    let report: RawReport = match serde_json::from_str(json) {
        Ok(r) => r,
        Err(e) => return fail(format!("unreadable result: {e}")),
    };
    let mut out = HashMap::new();
    for (name, raw) in report.commands {
        if raw.ok {
            out.insert(name, Ok(Arc::new(command_info(raw))));
            continue;
        }
        let detail = raw.error.unwrap_or_default();
        let shown = match raw.error_type.as_deref() {
            None | Some("unknown") => detail.clone(),
            Some(t) => format!("{t} while loading the command (details in the gateway log)"),
        };
        tracing::error!(command = %name, error = %detail.chars().take(1000).collect::<String>(), "Django introspection failed for this command; it is refused (503)");
        out.insert(name, Err(format!("introspection failed: {shown}")));
    }
    Ok(out)
}

/// Stores the result of a run into `snapshot`.
pub fn store(
    snapshot: &mut Snapshot,
    result: Result<HashMap<String, Result<Arc<CommandInfo>, String>>, String>,
) {
    snapshot.done = true;
    snapshot.running = false;
    match result {
        Ok(commands) => {
            snapshot.commands = commands;
            snapshot.failed = None;
        }
        Err(e) => {
            snapshot.commands.clear();
            snapshot.failed = Some(e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn forbidden_keys_and_prefixes() {
        for k in ["settings", "pythonpath", "settin", "s", "py", "pythonp"] {
            assert!(forbidden_key(k), "{k}");
        }
        for k in ["settingsx", "database", "verbosity", "x", ""] {
            assert!(!forbidden_key(k), "{k}");
        }
    }

    #[test]
    fn actions_become_options() {
        let raw: RawCommand = serde_json::from_value(json!({
            "ok": true, "help": "Migrates.",
            "actions": [
                {"option_strings": ["-h", "--help"], "dest": "help", "action": "help", "nargs": 0},
                {"option_strings": ["--settings"], "dest": "settings", "action": "store"},
                {"option_strings": ["-v", "--verbosity"], "dest": "verbosity", "action": "store", "type": "int", "choices": [0, 1, 2, 3], "default": 1},
                {"option_strings": [], "dest": "app_label", "action": "store", "nargs": "?", "usage": "[app_label]"},
                {"option_strings": ["--noinput", "--no-input"], "dest": "interactive", "action": "store_false", "nargs": 0, "default": true},
                {"option_strings": ["--tag", "-t"], "dest": "tags", "action": "append"},
                {"option_strings": ["-e"], "dest": "e", "action": "store"},
                {"option_strings": ["--pair"], "dest": "pair", "action": "store", "nargs": 2},
                {"option_strings": ["--count"], "dest": "count", "action": "store", "type": "float"}
            ]
        }))
        .unwrap();
        let info = command_info(raw);
        let names: Vec<&str> = info.options.iter().map(|o| o.name.as_str()).collect();
        assert_eq!(names, ["verbosity", "noinput", "tag", "pair", "count"]);
        assert_eq!(info.positional.as_deref(), Some("[app_label]"));
        let (o, flag) = info.find("no_input").unwrap();
        assert_eq!(
            (o.name.as_str(), flag, o.kind),
            ("noinput", "--no-input", Kind::Bool)
        );
        assert_eq!(o.default, json!(false));
        let (v, _) = info.find("verbosity").unwrap();
        assert_eq!((v.kind, v.value_kind), (Kind::Choice, Kind::Int));
        assert_eq!(info.find("tag").unwrap().0.repeat, Repeat::Append);
        assert_eq!(
            info.find("pair").unwrap().0.repeat,
            Repeat::Nargs {
                min: 2,
                max: Some(2)
            }
        );
        assert_eq!(info.find("count").unwrap().0.kind, Kind::Float);
        assert!(info.find("settings").is_none());
        assert!(info.find("verb").is_none());
        assert!(info.find("app_label").is_none());
        assert!(o.redacted(&["INTERACTIVE".into()]));
        assert!(o.redacted(&["no-input".into()]));
        assert!(!o.redacted(&["input".into()]));
    }

    #[test]
    fn snapshot_states() {
        let mut s = Snapshot {
            running: true,
            ..Snapshot::default()
        };
        assert!(matches!(s.get("check"), Known::Pending));
        let mut m = HashMap::new();
        m.insert(
            "check".to_owned(),
            Ok(Arc::new(CommandInfo {
                help: None,
                options: vec![],
                positional: None,
            })),
        );
        m.insert("bad".to_owned(), Err("introspection failed: x".to_owned()));
        store(&mut s, Ok(m));
        assert!(matches!(s.get("check"), Known::Ready(_)));
        assert!(matches!(s.get("bad"), Known::Failed(_)));
        assert!(matches!(s.get("other"), Known::Failed(e) if e.contains("no command named")));
        s.running = true;
        assert!(matches!(s.get("check"), Known::Ready(_)));
        assert!(matches!(s.get("bad"), Known::Pending));
        store(
            &mut s,
            Err("introspection failed: python exited with status 1".into()),
        );
        assert!(matches!(s.get("check"), Known::Failed(e) if e.contains("status 1")));
    }
}
