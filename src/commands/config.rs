//! `[commands]`: raw serde shape (unknown keys rejected) and its validation into
//! [`CommandsConfig`]. Every problem is reported through [`Problems`].
//!
//! Longer than the crate's 600-line guide on purpose: one table of settings —
//! each key's raw shape, typed value and validation side by side, so a key's
//! checks are found by its name — plus djangocommand's two default lists.

use crate::config::problems::Problems;
use crate::config::units::{parse_duration, parse_size};
use serde::Deserialize;
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

/// djangocommand-runner 0.1.0 `DEFAULT_ALLOWED_COMMANDS`: what
/// `"@djangocommand-defaults"` in `commands.allow` stands for.
pub const DEFAULT_ALLOWED_COMMANDS: &[&str] = &[
    "migrate",
    "showmigrations",
    "dbbackup",
    "createcachetable",
    "collectstatic",
    "findstatic",
    "clearsessions",
    "check",
    "diffsettings",
    "inspectdb",
    "sendtestemail",
    "sqlmigrate",
    "sqlsequencereset",
    "dumpdata",
    "compilemessages",
    "test",
    "show_urls",
    "validate_templates",
    "list_signals",
    "notes",
    "show_template_tags",
    "graph_models",
    "pipchecker",
    "clear_cache",
    "health_check",
    "silk_clear_request_log",
    "fixtree",
    "publish_scheduled",
    "rebuild_references_index",
    "search_garbage_collect",
    "update_index",
    "rebuild_index",
    "clear_index",
];

/// djangocommand-runner 0.1.0 `DEFAULT_DISALLOWED_COMMANDS` (blocklist mode's default `deny`).
pub const DEFAULT_DISALLOWED_COMMANDS: &[&str] = &[
    "flush",
    "sqlflush",
    "reset_db",
    "dbrestore",
    "loaddata",
    "shell",
    "shell_plus",
    "dbshell",
    "runserver",
    "runserver_plus",
    "testserver",
    "createsuperuser",
    "changepassword",
    "makemigrations",
    "squashmigrations",
    "drop_test_database",
    "delete_squashed_migrations",
    "clean_pyc",
];

/// Written in `commands.allow`, stands for [`DEFAULT_ALLOWED_COMMANDS`].
pub const DEFAULTS_MARKER: &str = "@djangocommand-defaults";

/// The option name that carries positional arguments (`"args": [...]`).
pub const POSITIONAL: &str = "args";

// ---------------------------------------------------------------- raw shape

/// The raw `[commands]` table as written in TOML.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawCommands {
    mode: Option<String>,
    allow: Option<Vec<String>>,
    deny: Option<Vec<String>>,
    django: Option<RawDjango>,
    #[serde(default)]
    metadata_only: Vec<String>,
    #[serde(default)]
    redact: Vec<String>,
    timeout: Option<String>,
    sync_wait: Option<String>,
    kill_grace: Option<String>,
    max_concurrent: Option<usize>,
    max_queued: Option<usize>,
    max_output: Option<RawSize>,
    env: Option<Vec<String>>,
    state_dir: Option<String>,
    audit_log: Option<String>,
    job_retention: Option<String>,
    #[serde(default)]
    rules: BTreeMap<String, RawRule>,
    #[serde(default)]
    custom: Vec<RawCustom>,
    #[serde(default)]
    schedules: Vec<RawSchedule>,
    execute: Option<String>,
    lease: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDjango {
    python: String,
    manage_py: String,
    cwd: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    options: Option<BTreeMap<String, RawOption>>,
    lock: Option<String>,
    timeout: Option<String>,
    max_output: Option<RawSize>,
    target: Option<String>,
    group: Option<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawOption {
    Type(String),
    Spec(RawOptionSpec),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOptionSpec {
    #[serde(rename = "type")]
    kind: String,
    min: Option<i64>,
    max: Option<i64>,
    regex: Option<String>,
    #[serde(default)]
    required: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCustom {
    name: String,
    argv: Vec<String>,
    cwd: Option<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    timeout: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSchedule {
    command: String,
    cron: String,
    #[serde(default)]
    data: Map<String, Value>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawSize {
    Bytes(u64),
    Text(String),
}

// ---------------------------------------------------------------- typed

/// Which Django commands may run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// Only these names run (with the Django preset the list must be
    /// written; `"@djangocommand-defaults"` adds [`DEFAULT_ALLOWED_COMMANDS`]).
    Allowlist(Vec<String>),
    /// Everything but these names runs (default: [`DEFAULT_DISALLOWED_COMMANDS`]).
    Blocklist(Vec<String>),
}

/// The Django preset: `python manage.py <command> ...`.
#[derive(Debug, Clone)]
pub struct Django {
    /// The interpreter to run.
    pub python: PathBuf,
    /// Path to `manage.py`.
    pub manage_py: PathBuf,
    /// Working directory (default: the directory of `manage.py`).
    pub cwd: PathBuf,
}

/// One `[[commands.custom]]` command: a fixed argv, never a shell.
#[derive(Debug, Clone)]
pub struct Custom {
    /// The name operators call it by.
    pub name: String,
    /// Program and its fixed arguments.
    pub argv: Vec<String>,
    /// Working directory (default `/`).
    pub cwd: PathBuf,
    /// Fixed variables added to the cleared environment.
    pub env: Vec<(String, String)>,
    /// Overrides `commands.timeout`.
    pub timeout: Option<Duration>,
}

/// The type of a declared option.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OptionType {
    /// A JSON string, passed as `--name=value`.
    String,
    /// `true` → `--name`, `false` → omitted.
    Bool,
    /// A JSON integer within `min..=max`.
    Int,
    /// A list of strings or numbers, the option repeated.
    List,
}

/// One declared option of an argument schema.
#[derive(Debug, Clone)]
pub struct OptionSpec {
    /// Its type.
    pub kind: OptionType,
    /// Smallest accepted integer (`int` only).
    pub min: Option<i64>,
    /// Largest accepted integer (`int` only).
    pub max: Option<i64>,
    /// Every value (each item of a list) must match this, anchored.
    pub regex: Option<regex_lite::Regex>,
    /// The regex as written.
    pub pattern: Option<String>,
    /// The option must be present.
    pub required: bool,
}

/// `[commands.rules.<name>]`: per-command rules.
#[derive(Debug, Clone, Default)]
pub struct Rule {
    /// Argument schema; when present, unknown options are refused.
    pub options: Option<BTreeMap<String, OptionSpec>>,
    /// Runs sharing a lock name never overlap (a second one gets 409).
    pub lock: Option<String>,
    /// Overrides `commands.timeout`.
    pub timeout: Option<Duration>,
    /// Overrides `commands.max_output`.
    pub max_output: Option<u64>,
    /// `group`: with `execute = "runners"`, only runners of this group run
    /// it (any group when absent).
    pub group: Option<String>,
    /// `target = "all"`: one job per connected runner of the group.
    pub all: bool,
}

/// `commands.execute`: where commands run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Execute {
    /// On the gateway host (the default).
    #[default]
    Local,
    /// On runners that dial in from the backend hosts (`[[runners]]`).
    Runners,
}

/// One `[[commands.schedules]]` entry.
#[derive(Debug, Clone)]
pub struct Schedule {
    /// Command to run.
    pub command: String,
    /// The cron expression as written (5 or 6 fields, UTC).
    pub cron_text: String,
    /// The parsed expression.
    pub cron: croner::Cron,
    /// The `data` passed, as an operator would send it.
    pub data: Map<String, Value>,
}

/// The validated `[commands]` section.
#[derive(Debug, Clone)]
pub struct CommandsConfig {
    /// Allowlist or blocklist of Django commands.
    pub mode: Mode,
    /// The Django preset, if configured.
    pub django: Option<Django>,
    /// Fixed-argv commands.
    pub custom: Vec<Custom>,
    /// Commands whose output is never captured and whose argument values are redacted.
    pub metadata_only: Vec<String>,
    /// Option names whose values are redacted in the audit log, job store and logs.
    pub redact: Vec<String>,
    /// Default run time limit.
    pub timeout: Duration,
    /// How long `POST` waits for a run before answering 202.
    pub sync_wait: Duration,
    /// Time between SIGTERM and SIGKILL on cancel or timeout.
    pub kill_grace: Duration,
    /// Runs at once.
    pub max_concurrent: usize,
    /// Runs waiting for a slot; beyond, 429.
    pub max_queued: usize,
    /// Bytes of output kept per run; the rest is counted and dropped.
    pub max_output: u64,
    /// Environment variables passed through from the gateway's environment.
    pub env: Vec<String>,
    /// Where the job store lives.
    pub state_dir: PathBuf,
    /// The audit log file.
    pub audit_log: PathBuf,
    /// Ended jobs (records and output) older than this are deleted from the
    /// job store (at start and hourly). The audit log is never pruned.
    pub job_retention: Duration,
    /// Per-command rules.
    pub rules: BTreeMap<String, Rule>,
    /// Cron schedules.
    pub schedules: Vec<Schedule>,
    /// `execute`: on the gateway host or on runners.
    pub execute: Execute,
    /// `lease`: a runner silent this long is lost (its running jobs end `lost`).
    pub lease: Duration,
}

/// Whether `name` is a valid option name: `^[A-Za-z][A-Za-z0-9_-]*$`.
pub fn valid_option_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// Whether `name` is a valid command name (same alphabet as options, plus
/// digits first, at most 100 characters).
pub fn valid_command_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 100
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

impl CommandsConfig {
    /// Whether output of `command` is never captured.
    pub fn is_metadata_only(&self, command: &str) -> bool {
        self.metadata_only.iter().any(|c| c == command)
    }

    /// The custom command called `name`, if any.
    pub fn custom(&self, name: &str) -> Option<&Custom> {
        self.custom.iter().find(|c| c.name == name)
    }

    /// Whether the mode rules let `name` run at all (before operator lists).
    pub fn allowed(&self, name: &str) -> bool {
        if !valid_command_name(name) {
            return false;
        }
        if self.custom(name).is_some() {
            return true;
        }
        if self.django.is_none() && self.execute == Execute::Local {
            return false;
        }
        match &self.mode {
            Mode::Allowlist(list) => list.iter().any(|c| c == name),
            Mode::Blocklist(list) => !list.iter().any(|c| c == name),
        }
    }
}

impl CommandsConfig {
    /// The settings fixed when remote operations start (the job store, the
    /// audit log, the run slots) that differ in `new`, for the reload's
    /// "restart needed" report. Everything else applies on reload.
    pub fn restart_needed(&self, new: &CommandsConfig) -> Vec<String> {
        let mut out = Vec::new();
        if self.state_dir != new.state_dir {
            out.push("commands.state_dir".to_owned());
        }
        if self.audit_log != new.audit_log {
            out.push("commands.audit_log".to_owned());
        }
        if self.max_concurrent != new.max_concurrent {
            out.push("commands.max_concurrent".to_owned());
        }
        if self.execute != new.execute {
            out.push("commands.execute".to_owned());
        }
        if self.lease != new.lease {
            out.push("commands.lease".to_owned());
        }
        out
    }

    /// `new` with the settings fixed at start (see [`Self::restart_needed`])
    /// kept from `self`.
    pub fn keep_fixed(&self, mut new: CommandsConfig) -> CommandsConfig {
        new.state_dir = self.state_dir.clone();
        new.audit_log = self.audit_log.clone();
        new.max_concurrent = self.max_concurrent;
        new.execute = self.execute;
        new.lease = self.lease;
        new
    }

    /// Whether both have the same schedules (command, expression, data).
    pub fn same_schedules(&self, other: &CommandsConfig) -> bool {
        self.schedules.len() == other.schedules.len()
            && self.schedules.iter().zip(&other.schedules).all(|(a, b)| {
                a.command == b.command && a.cron_text == b.cron_text && a.data == b.data
            })
    }
}

fn size(raw: &Option<RawSize>, default: u64, at: &str, p: &mut Problems) -> u64 {
    match raw {
        None => default,
        Some(RawSize::Bytes(n)) => *n,
        Some(RawSize::Text(t)) => parse_size(t).unwrap_or_else(|e| {
            p.push(at, e);
            default
        }),
    }
}

fn duration(raw: &Option<String>, at: &str, p: &mut Problems) -> Option<Duration> {
    raw.as_ref().and_then(|t| match parse_duration(t) {
        Ok(d) if d.is_zero() => {
            p.push(at, "must be greater than zero");
            None
        }
        Ok(d) => Some(d),
        Err(e) => {
            p.push(at, e);
            None
        }
    })
}

fn names(list: &[String], at: &str, p: &mut Problems) -> Vec<String> {
    for (i, n) in list.iter().enumerate() {
        if !valid_command_name(n) {
            p.push(format!("{at}[{i}]"), format!("invalid command name {n:?}"));
        }
    }
    list.to_vec()
}

/// `commands.allow`: names, with [`DEFAULTS_MARKER`] expanded.
fn allow_list(list: &[String], p: &mut Problems) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for (i, n) in list.iter().enumerate() {
        if n == DEFAULTS_MARKER {
            out.extend(DEFAULT_ALLOWED_COMMANDS.iter().map(|s| s.to_string()));
        } else if n.starts_with('@') {
            p.push(
                format!("commands.allow[{i}]"),
                format!("unknown list {n:?} (the only one is {DEFAULTS_MARKER:?})"),
            );
        } else if !valid_command_name(n) {
            p.push(
                format!("commands.allow[{i}]"),
                format!("invalid command name {n:?}"),
            );
        } else {
            out.push(n.clone());
        }
    }
    let mut seen = std::collections::HashSet::new();
    out.retain(|n| seen.insert(n.clone()));
    out
}

fn parse_cron(text: &str) -> Result<croner::Cron, String> {
    croner::parser::CronParser::builder()
        .seconds(croner::parser::Seconds::Optional)
        .build()
        .parse(text)
        .map_err(|e| format!("invalid cron expression {text:?}: {e}"))
}

fn validate_rule(name: &str, r: &RawRule, p: &mut Problems) -> Rule {
    let at = format!("commands.rules.{name}");
    let all = match r.target.as_deref() {
        None | Some("one") => false,
        Some("all") => true,
        Some(other) => {
            p.push(
                format!("{at}.target"),
                format!("must be \"one\" or \"all\", not {other:?}"),
            );
            false
        }
    };
    let options = r.options.as_ref().map(|opts| {
        let mut out = BTreeMap::new();
        for (opt, raw) in opts {
            let oat = format!("{at}.options.{opt}");
            if !valid_option_name(opt) {
                p.push(&oat, "invalid option name");
                continue;
            }
            if super::introspect::forbidden_key(&super::introspect::normalize(opt)) {
                p.push(
                    &oat,
                    "never accepted from data: --settings and --pythonpath (or a prefix argparse could expand into them) would let Django import any module on disk",
                );
                continue;
            }
            let (kind, min, max, regex, required) = match raw {
                RawOption::Type(t) => (t.as_str(), None, None, None, false),
                RawOption::Spec(s) => (
                    s.kind.as_str(),
                    s.min,
                    s.max,
                    s.regex.as_deref(),
                    s.required,
                ),
            };
            let kind = match kind {
                "string" | "str" => OptionType::String,
                "bool" | "boolean" => OptionType::Bool,
                "int" | "integer" => OptionType::Int,
                "list" => OptionType::List,
                other => {
                    p.push(
                        &oat,
                        format!("unknown type {other:?} (string, bool, int or list)"),
                    );
                    continue;
                }
            };
            if opt == POSITIONAL && kind != OptionType::List {
                p.push(
                    &oat,
                    "\"args\" (positional arguments) must have type \"list\"",
                );
            }
            if (min.is_some() || max.is_some()) && kind != OptionType::Int {
                p.push(&oat, "min/max apply to int options only");
            }
            if regex.is_some() && !matches!(kind, OptionType::String | OptionType::List) {
                p.push(&oat, "regex applies to string and list options only");
            }
            let pattern = regex.map(str::to_owned);
            let regex = regex.and_then(|re| match regex_lite::Regex::new(&format!("^(?:{re})$")) {
                Ok(r) => Some(r),
                Err(e) => {
                    p.push(&oat, format!("invalid regex: {e}"));
                    None
                }
            });
            out.insert(
                opt.clone(),
                OptionSpec {
                    kind,
                    min,
                    max,
                    regex,
                    pattern,
                    required,
                },
            );
        }
        out
    });
    if let Some(lock) = &r.lock {
        if lock.is_empty() {
            p.push(format!("{at}.lock"), "must not be empty");
        }
    }
    Rule {
        options,
        lock: r.lock.clone(),
        timeout: duration(&r.timeout, &format!("{at}.timeout"), p),
        max_output: r
            .max_output
            .as_ref()
            .map(|m| size(&Some(clone_size(m)), 0, &format!("{at}.max_output"), p)),
        group: r.group.clone(),
        all,
    }
}

fn clone_size(s: &RawSize) -> RawSize {
    match s {
        RawSize::Bytes(n) => RawSize::Bytes(*n),
        RawSize::Text(t) => RawSize::Text(t.clone()),
    }
}

/// Validates the raw `[commands]` table. Returns `None` only when nothing
/// usable could be built; problems are pushed to `p` either way.
pub fn validate(raw: &RawCommands, p: &mut Problems) -> Option<CommandsConfig> {
    let mode = match raw.mode.as_deref().unwrap_or("allowlist") {
        "allowlist" => {
            if raw.deny.is_some() {
                p.push("commands.deny", "only used with mode = \"blocklist\"");
            }
            Mode::Allowlist(match &raw.allow {
                Some(list) => allow_list(list, p),
                None => {
                    if raw.django.is_some() || raw.execute.as_deref() == Some("runners") {
                        p.push(
                            "commands.allow",
                            format!(
                                "required with commands.django (and with execute = \"runners\"): list the Django commands operators may run, \
                                 e.g. allow = [\"check\", \"migrate\"]; {DEFAULTS_MARKER:?} stands for \
                                 djangocommand's default list, which includes dumpdata and diffsettings \
                                 (they reveal the database and SECRET_KEY)"
                            ),
                        );
                    }
                    Vec::new()
                }
            })
        }
        "blocklist" => {
            if raw.allow.is_some() {
                p.push("commands.allow", "only used with mode = \"allowlist\"");
            }
            Mode::Blocklist(match &raw.deny {
                Some(list) => names(list, "commands.deny", p),
                None => DEFAULT_DISALLOWED_COMMANDS
                    .iter()
                    .map(|s| s.to_string())
                    .collect(),
            })
        }
        other => {
            p.push(
                "commands.mode",
                format!("must be \"allowlist\" or \"blocklist\", not {other:?}"),
            );
            Mode::Allowlist(Vec::new())
        }
    };

    let django = raw.django.as_ref().map(|d| {
        if d.python.is_empty() {
            p.push("commands.django.python", "must not be empty");
        }
        if d.manage_py.is_empty() {
            p.push("commands.django.manage_py", "must not be empty");
        }
        let manage_py = PathBuf::from(&d.manage_py);
        let cwd = match &d.cwd {
            Some(c) => PathBuf::from(c),
            None => manage_py
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .map(|p| p.to_path_buf())
                .unwrap_or_else(|| PathBuf::from(".")),
        };
        Django {
            python: PathBuf::from(&d.python),
            manage_py,
            cwd,
        }
    });

    let mut custom: Vec<Custom> = Vec::new();
    for (i, c) in raw.custom.iter().enumerate() {
        let at = format!("commands.custom[{i}]");
        if !valid_command_name(&c.name) {
            p.push(
                format!("{at}.name"),
                format!("invalid command name {:?}", c.name),
            );
        }
        if custom.iter().any(|o| o.name == c.name) {
            p.push(
                format!("{at}.name"),
                format!("duplicate command {:?}", c.name),
            );
        }
        if !matches!(c.argv.first(), Some(a) if !a.is_empty()) {
            p.push(format!("{at}.argv"), "must name a program");
        }
        if c.argv.iter().any(|a| a.contains('\0')) {
            p.push(format!("{at}.argv"), "must not contain NUL bytes");
        }
        let mut env = Vec::new();
        for (k, v) in &c.env {
            if k.is_empty() || k.contains(['=', '\0']) || v.contains('\0') {
                p.push(format!("{at}.env.{k}"), "invalid environment variable");
            } else {
                env.push((k.clone(), v.clone()));
            }
        }
        custom.push(Custom {
            name: c.name.clone(),
            argv: c.argv.clone(),
            cwd: PathBuf::from(c.cwd.as_deref().unwrap_or("/")),
            env,
            timeout: duration(&c.timeout, &format!("{at}.timeout"), p),
        });
    }
    let execute = match raw.execute.as_deref() {
        None | Some("local") => Execute::Local,
        Some("runners") => Execute::Runners,
        Some(other) => {
            p.push(
                "commands.execute",
                format!("must be \"local\" or \"runners\", not {other:?}"),
            );
            Execute::Local
        }
    };
    if django.is_none() && custom.is_empty() && execute == Execute::Local {
        p.push(
            "commands",
            "neither commands.django nor [[commands.custom]] is configured: nothing could run",
        );
    }

    let mut rules = BTreeMap::new();
    for (name, r) in &raw.rules {
        if !valid_command_name(name) {
            p.push(format!("commands.rules.{name}"), "invalid command name");
        }
        if execute == Execute::Local && (r.target.as_deref() == Some("all") || r.group.is_some()) {
            p.push(
                format!("commands.rules.{name}"),
                "target = \"all\" and group need commands.execute = \"runners\"",
            );
        }
        rules.insert(name.clone(), validate_rule(name, r, p));
    }

    let env = raw.env.clone().unwrap_or_else(|| vec!["PATH".to_owned()]);
    for (i, e) in env.iter().enumerate() {
        if e.is_empty() || e.contains(['=', '\0']) {
            p.push(
                format!("commands.env[{i}]"),
                format!("invalid variable name {e:?}"),
            );
        }
    }
    let max_concurrent = raw.max_concurrent.unwrap_or(4);
    if max_concurrent == 0 {
        p.push("commands.max_concurrent", "must be at least 1");
    }
    let state_dir = PathBuf::from(raw.state_dir.as_deref().unwrap_or("/var/lib/portcullis"));
    let audit_log = raw
        .audit_log
        .as_deref()
        .map(PathBuf::from)
        .unwrap_or_else(|| state_dir.join("audit.jsonl"));

    let mut cfg = CommandsConfig {
        mode,
        django,
        custom,
        metadata_only: names(&raw.metadata_only, "commands.metadata_only", p),
        redact: raw.redact.clone(),
        timeout: duration(&raw.timeout, "commands.timeout", p).unwrap_or(Duration::from_secs(600)),
        sync_wait: match &raw.sync_wait {
            // Zero is allowed here: always answer 202.
            Some(t) => parse_duration(t).unwrap_or_else(|e| {
                p.push("commands.sync_wait", e);
                Duration::from_secs(10)
            }),
            None => Duration::from_secs(10),
        },
        kill_grace: duration(&raw.kill_grace, "commands.kill_grace", p)
            .unwrap_or(Duration::from_secs(10)),
        max_concurrent: max_concurrent.max(1),
        max_queued: raw.max_queued.unwrap_or(16),
        max_output: size(&raw.max_output, 4 << 20, "commands.max_output", p),
        env,
        state_dir,
        audit_log,
        job_retention: duration(&raw.job_retention, "commands.job_retention", p)
            .unwrap_or(Duration::from_secs(30 * 24 * 3600)),
        rules,
        schedules: Vec::new(),
        execute,
        lease: duration(&raw.lease, "commands.lease", p).unwrap_or(Duration::from_secs(30)),
    };

    for (i, s) in raw.schedules.iter().enumerate() {
        let at = format!("commands.schedules[{i}]");
        if !cfg.allowed(&s.command) {
            p.push(
                format!("{at}.command"),
                format!("{:?} is not a command that may run", s.command),
            );
        }
        let cron = match parse_cron(&s.cron) {
            Ok(c) => Some(c),
            Err(e) => {
                p.push(format!("{at}.cron"), e);
                None
            }
        };
        if cfg.allowed(&s.command) {
            if let Err(e) = super::args::check_static(&cfg, &s.command, &s.data) {
                p.push(format!("{at}.data"), e.message());
            }
        }
        if let Some(cron) = cron {
            cfg.schedules.push(Schedule {
                command: s.command.clone(),
                cron_text: s.cron.clone(),
                cron,
                data: s.data.clone(),
            });
        }
    }
    Some(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<CommandsConfig, Problems> {
        let raw: RawCommands = toml::from_str(text).map_err(|e| Problems(vec![e.to_string()]))?;
        let mut p = Problems::default();
        let cfg = validate(&raw, &mut p);
        if p.0.is_empty() {
            Ok(cfg.unwrap())
        } else {
            Err(p)
        }
    }

    #[test]
    fn django_preset_needs_an_explicit_allow_list() {
        let e = parse(
            r#"
            django = { python = "python3", manage_py = "/srv/app/manage.py" }
            "#,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("commands.allow") && e.contains("allow = [\"check\", \"migrate\"]"),
            "{e}"
        );
        assert!(e.contains("@djangocommand-defaults"), "{e}");
        let c = parse(
            r#"
            allow = ["@djangocommand-defaults", "ops_report", "check"]
            django = { python = "python3", manage_py = "/srv/app/manage.py" }
            "#,
        )
        .unwrap();
        assert!(c.allowed("migrate") && c.allowed("dumpdata") && c.allowed("ops_report"));
        assert!(!c.allowed("flush"));
        assert!(!c.allowed("../x"));
        let Mode::Allowlist(list) = &c.mode else {
            panic!("allowlist expected")
        };
        assert_eq!(list.len(), DEFAULT_ALLOWED_COMMANDS.len() + 1);
        assert_eq!(c.django.unwrap().cwd, PathBuf::from("/srv/app"));
        let e = parse(
            r#"
            allow = ["@everything"]
            django = { python = "python3", manage_py = "manage.py" }
            [rules.check]
            options = { settings = "string", set = "string", pythonpath = "string" }
            "#,
        )
        .unwrap_err()
        .to_string();
        for needle in [
            "commands.allow[0]",
            "options.settings",
            "options.set",
            "options.pythonpath",
        ] {
            assert!(e.contains(needle), "{needle} missing from\n{e}");
        }
        // Blocklist mode keeps djangocommand's deny list as its default.
        let c = parse(
            r#"
            mode = "blocklist"
            django = { python = "python3", manage_py = "manage.py" }
            "#,
        )
        .unwrap();
        assert!(c.allowed("anything_else"));
        assert!(!c.allowed("flush"));
        assert!(!c.allowed("shell"));
    }

    #[test]
    fn every_problem_is_reported() {
        let e = parse(
            r#"
            mode = "maybe"
            timeout = "soon"
            max_concurrent = 0
            [rules.migrate]
            options = { verbosity = { type = "float" }, "bad name" = "string", name = { type = "string", regex = "(" } }
            [[custom]]
            name = "x y"
            argv = []
            [[schedules]]
            command = "nope"
            cron = "61 * * * *"
            "#,
        )
        .unwrap_err();
        let all = e.to_string();
        for needle in [
            "commands.mode",
            "commands.timeout",
            "commands.max_concurrent",
            "options.verbosity",
            "options.bad name",
            "options.name",
            "custom[0].name",
            "custom[0].argv",
            "schedules[0].command",
            "schedules[0].cron",
        ] {
            assert!(all.contains(needle), "{needle} missing from\n{all}");
        }
    }

    #[test]
    fn unknown_keys_are_refused() {
        assert!(parse("bogus = 1").is_err());
        assert!(parse("[rules.x]\nwhatever = 1").is_err());
    }
}
