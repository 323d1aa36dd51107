//! `data` → argv: `"k": "v"` → `--k=v`, `true` → `--k`, `false`
//! omitted, a list → the option repeated, `"args": [...]` → positional
//! arguments after `--`. Values are always glued to their option with `=`, so a
//! value can never become an option of its own. Nothing here touches a shell.
//!
//! Over the crate's 600-line guide only with its unit tests, which sit beside
//! the code.

use super::config::{CommandsConfig, OptionSpec, OptionType, POSITIONAL};
use super::introspect::{forbidden_key, normalize, CommandInfo, DjangoOption, Kind, Repeat};
use serde_json::{Map, Value};

/// Longest single value accepted, in bytes.
const MAX_VALUE: usize = 8 * 1024;
/// Most options plus positional arguments in one run.
const MAX_ITEMS: usize = 256;

/// Why `data` was refused (answered 400; nothing runs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArgError(String);

impl ArgError {
    /// The message shown to the operator and written to the audit log. It
    /// names options, never their values.
    pub fn message(&self) -> &str {
        &self.0
    }
}

fn err(msg: impl Into<String>) -> ArgError {
    ArgError(msg.into())
}

/// A scalar rendered as an argument, or an error.
fn scalar(name: &str, v: &Value) -> Result<String, ArgError> {
    let s = match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(_) => {
            return Err(err(format!(
                "option {name:?}: booleans are only allowed as the whole value"
            )))
        }
        Value::Null => return Err(err(format!("option {name:?}: null is not a value"))),
        Value::Array(_) | Value::Object(_) => {
            return Err(err(format!(
                "option {name:?}: nested lists and objects are not allowed"
            )))
        }
    };
    if s.contains('\0') {
        return Err(err(format!("option {name:?}: NUL bytes are not allowed")));
    }
    if s.len() > MAX_VALUE {
        return Err(err(format!(
            "option {name:?}: value longer than {MAX_VALUE} bytes"
        )));
    }
    Ok(s)
}

fn check_spec(name: &str, spec: &OptionSpec, v: &Value) -> Result<(), ArgError> {
    let type_err = |t: &str| err(format!("option {name:?} must be {t}"));
    match spec.kind {
        OptionType::String if !v.is_string() => return Err(type_err("a string")),
        OptionType::Bool if !v.is_boolean() => return Err(type_err("true or false")),
        OptionType::List if !v.is_array() => return Err(type_err("a list")),
        OptionType::Int => {
            let n = v.as_i64().ok_or_else(|| type_err("an integer"))?;
            if spec.min.is_some_and(|m| n < m) || spec.max.is_some_and(|m| n > m) {
                return Err(err(format!("option {name:?} is out of range")));
            }
        }
        _ => {}
    }
    if let Some(re) = &spec.regex {
        let items: Vec<&Value> = match v {
            Value::Array(items) => items.iter().collect(),
            other => vec![other],
        };
        for item in items {
            let text = match item {
                Value::String(s) => s.clone(),
                Value::Number(n) => n.to_string(),
                _ => return Err(type_err("a list of strings")),
            };
            if !re.is_match(&text) {
                return Err(err(format!(
                    "option {name:?} has a value that is not allowed"
                )));
            }
        }
    }
    Ok(())
}

/// Why a key is never accepted, if it is one of those.
fn never(name: &str, key: &str) -> Option<ArgError> {
    forbidden_key(key).then(|| {
        err(format!(
            "option {name:?} is never accepted: --settings and --pythonpath (or anything argparse could expand into them) would let Django import any module on disk"
        ))
    })
}

/// The text of an int, float or string value, checked against the option's type.
fn typed(name: &str, kind: Kind, v: &Value) -> Result<String, ArgError> {
    let s = scalar(name, v)?;
    let ok = match kind {
        Kind::Int => s.parse::<i64>().is_ok(),
        Kind::Float => s.parse::<f64>().is_ok_and(f64::is_finite),
        _ => true,
    };
    if !ok {
        return Err(err(format!(
            "option {name:?} must be {}",
            if kind == Kind::Int {
                "an integer"
            } else {
                "a number"
            }
        )));
    }
    Ok(s)
}

/// Checks `value` against a Django option and appends its arguments.
fn django_option(
    name: &str,
    opt: &DjangoOption,
    flag: &str,
    value: &Value,
    argv: &mut Vec<String>,
) -> Result<(), ArgError> {
    if opt.kind == Kind::Bool {
        return match value {
            Value::Bool(true) => {
                argv.push(flag.to_owned());
                Ok(())
            }
            Value::Bool(false) => Ok(()),
            _ => Err(err(format!("option {name:?} is a flag: true or false"))),
        };
    }
    let one = |v: &Value| -> Result<String, ArgError> {
        let s = typed(name, opt.value_kind, v)?;
        if let Some(choices) = &opt.choices {
            let allowed = choices.iter().any(|c| match c {
                Value::String(c) => *c == s,
                Value::Number(n) => n.to_string() == s,
                _ => false,
            });
            if !allowed {
                return Err(err(format!(
                    "option {name:?} must be one of {}",
                    Value::Array(choices.clone())
                )));
            }
        }
        Ok(s)
    };
    match (value, opt.repeat) {
        (Value::Array(_), Repeat::No) => Err(err(format!("option {name:?} takes one value"))),
        (Value::Array(items), Repeat::Append) => {
            for item in items {
                argv.push(format!("{flag}={}", one(item)?));
            }
            Ok(())
        }
        (Value::Array(items), Repeat::Nargs { min, max }) => {
            if items.len() < min || max.is_some_and(|m| items.len() > m) {
                return Err(err(format!(
                    "option {name:?} takes {} values",
                    match max {
                        Some(m) if m == min => m.to_string(),
                        Some(m) => format!("{min} to {m}"),
                        None => format!("at least {min}"),
                    }
                )));
            }
            argv.push(flag.to_owned());
            for item in items {
                let s = one(item)?;
                // These follow the flag as separate arguments: one starting
                // with '-' would be read as an option.
                if s.is_empty() || s.starts_with('-') {
                    return Err(err(format!(
                        "option {name:?}: list values must not be empty or start with '-'"
                    )));
                }
                argv.push(s);
            }
            Ok(())
        }
        (other, _) => {
            argv.push(format!("{flag}={}", one(other)?));
            Ok(())
        }
    }
}

/// Builds the argument list (after the program and command name) for
/// running `command` with `data`.
///
/// - Django commands: `info` is what Django said about the command; a key is
///   accepted only when it is exactly (after `-`/`_` normalization) one of
///   its long options, with a value of the option's type, and also declared
///   in the command's schema when it has one. `info = None` for a Django
///   command is refused (its options are unknown).
/// - Custom commands take no arguments without a schema.
/// - `settings`, `pythonpath` and their prefixes are refused everywhere.
pub fn build(
    cfg: &CommandsConfig,
    command: &str,
    data: &Map<String, Value>,
    info: Option<&CommandInfo>,
) -> Result<Vec<String>, ArgError> {
    let custom = cfg.custom(command).is_some();
    if !custom && info.is_none() {
        return Err(err(format!("the options of {command:?} are not known")));
    }
    let mut argv = Vec::new();
    check(
        cfg,
        command,
        data,
        info.filter(|_| !custom),
        Some(&mut argv),
    )?;
    Ok(argv)
}

/// The checks of [`build`] that need no introspection, for configuration
/// time (`[[commands.schedules]]` data): names, the schema, never-accepted
/// keys. Django options and their types are checked when the run starts.
pub fn check_static(
    cfg: &CommandsConfig,
    command: &str,
    data: &Map<String, Value>,
) -> Result<(), ArgError> {
    check(cfg, command, data, None, None)
}

fn check(
    cfg: &CommandsConfig,
    command: &str,
    data: &Map<String, Value>,
    info: Option<&CommandInfo>,
    out: Option<&mut Vec<String>>,
) -> Result<(), ArgError> {
    let schema = cfg.rules.get(command).and_then(|r| r.options.as_ref());
    let custom = cfg.custom(command).is_some();
    if schema.is_none() && custom && !data.is_empty() {
        return Err(err(format!(
            "{command:?} takes no arguments (declare [commands.rules.{command}].options to allow some)"
        )));
    }
    if data.len() > MAX_ITEMS {
        return Err(err("too many options"));
    }
    if let Some(schema) = schema {
        for (name, spec) in schema {
            if spec.required && !data.keys().any(|k| normalize(k) == normalize(name)) {
                return Err(err(format!("option {name:?} is required")));
            }
        }
    }
    let mut argv = Vec::new();
    let mut positional = Vec::new();
    for (name, value) in data {
        if name.contains('\0') {
            return Err(err("option names must not contain NUL bytes"));
        }
        if !super::config::valid_option_name(name) {
            return Err(err(format!(
                "invalid option name {:?}: must match ^[A-Za-z][A-Za-z0-9_-]*$",
                name.chars().take(64).collect::<String>()
            )));
        }
        let key = normalize(name);
        if let Some(e) = never(name, &key) {
            return Err(e);
        }
        // The option as the schema spells it (custom commands get exactly that).
        let mut flag_name = name.as_str();
        if let Some(schema) = schema {
            match schema.iter().find(|(k, _)| normalize(k) == key) {
                Some((k, spec)) => {
                    check_spec(name, spec, value)?;
                    flag_name = k.as_str();
                }
                None => {
                    return Err(err(format!(
                        "unknown option {name:?}: not in [commands.rules.{command}].options"
                    )))
                }
            }
        }
        if key == POSITIONAL {
            let Value::Array(items) = value else {
                return Err(err("\"args\" must be a list of positional arguments"));
            };
            if info.is_some_and(|i| i.positional.is_none()) && !items.is_empty() {
                return Err(err(format!(
                    "{command:?} takes no positional arguments (\"args\")"
                )));
            }
            for item in items {
                positional.push(scalar(name, item)?);
            }
            continue;
        }
        if let Some(info) = info {
            let Some((opt, flag)) = info.find(&key) else {
                return Err(err(format!(
                    "unknown option {name:?}: not an option of {command:?} (options are accepted by their exact name only; GET /__manage__/ lists them)"
                )));
            };
            django_option(name, opt, flag, value, &mut argv)?;
            continue;
        }
        match value {
            Value::Bool(true) => argv.push(format!("--{flag_name}")),
            Value::Bool(false) => {}
            Value::Array(items) => {
                for item in items {
                    argv.push(format!("--{flag_name}={}", scalar(name, item)?));
                }
            }
            other => argv.push(format!("--{flag_name}={}", scalar(name, other)?)),
        }
    }
    if argv.len() + positional.len() > MAX_ITEMS {
        return Err(err("too many arguments"));
    }
    if !positional.is_empty() {
        argv.push("--".to_owned());
        argv.extend(positional);
    }
    if let Some(out) = out {
        *out = argv;
    }
    Ok(())
}

/// `data` as it may be written down: values of options named in
/// `commands.redact` replaced by `"***"`, or every value when `all`
/// (metadata-only commands). A key is matched by every name of the option it
/// resolves to (`info`: a Django command's options; case-insensitive, `-` =
/// `_`). The value of a key that is no option of the command (an
/// abbreviation, a typo, a key outside the schema: refused anyway) is never
/// written either.
pub fn redact(
    cfg: &CommandsConfig,
    command: &str,
    data: &Map<String, Value>,
    all: bool,
    info: Option<&CommandInfo>,
) -> Value {
    let schema = cfg.rules.get(command).and_then(|r| r.options.as_ref());
    let custom = cfg.custom(command).is_some();
    let mut out = Map::new();
    for (k, v) in data {
        let key = normalize(k);
        let listed = cfg
            .redact
            .iter()
            .any(|r| normalize(r).eq_ignore_ascii_case(&key));
        let outside_schema = match schema {
            Some(s) => !s.keys().any(|n| normalize(n) == key),
            None => custom,
        };
        let django = match info {
            Some(info) if key != POSITIONAL => info
                .find(&key)
                .map_or(true, |(o, _)| o.redacted(&cfg.redact)),
            _ => false,
        };
        let v = if !(all || listed || outside_schema || django) {
            v.clone()
        } else if let Value::Array(items) = v {
            Value::Array(items.iter().map(|_| Value::from("***")).collect())
        } else {
            Value::from("***")
        };
        out.insert(k.clone(), v);
    }
    Value::Object(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::commands::config::{validate, RawCommands};
    use serde_json::json;

    fn cfg() -> CommandsConfig {
        let raw: RawCommands = toml::from_str(
            r#"
            allow = ["check", "migrate", "createuser"]
            django = { python = "python3", manage_py = "manage.py" }
            redact = ["password"]
            [rules.migrate]
            options = { database = "string", plan = "bool", verbosity = { type = "int", max = 2 }, app = { type = "string", regex = "[a-z_]+" }, args = "list" }
            [[custom]]
            name = "du"
            argv = ["du", "-sh", "/"]
            "#,
        )
        .unwrap();
        let mut p = crate::config::Problems::default();
        let c = validate(&raw, &mut p).unwrap();
        assert!(p.0.is_empty(), "{p}");
        c
    }

    /// What Django reports for a command with these actions (besides the
    /// globals every command has).
    fn info(extra: Value) -> CommandInfo {
        let mut actions = vec![
            json!({"option_strings": ["-h", "--help"], "dest": "help", "action": "help", "nargs": 0}),
            json!({"option_strings": ["-v", "--verbosity"], "dest": "verbosity", "action": "store", "type": "int", "choices": [0, 1, 2, 3], "default": 1}),
            json!({"option_strings": ["--settings"], "dest": "settings", "action": "store"}),
            json!({"option_strings": ["--pythonpath"], "dest": "pythonpath", "action": "store"}),
            json!({"option_strings": ["--no-color"], "dest": "no_color", "action": "store_true", "nargs": 0}),
        ];
        actions.extend(extra.as_array().unwrap().iter().cloned());
        crate::commands::introspect::info_from_json(json!({"ok": true, "actions": actions}))
    }

    fn check_info() -> CommandInfo {
        info(json!([
            {"option_strings": [], "dest": "args", "action": "store", "nargs": "*", "usage": "[app_label ...]"},
            {"option_strings": ["--tag", "-t"], "dest": "tags", "action": "append"},
            {"option_strings": ["--deploy"], "dest": "deploy", "action": "store_true", "nargs": 0},
            {"option_strings": ["--fail-level"], "dest": "fail_level", "action": "store", "choices": ["ERROR", "WARNING"]},
            {"option_strings": ["--database"], "dest": "database", "action": "store"},
            {"option_strings": ["--count"], "dest": "count", "action": "store", "type": "int"},
            {"option_strings": ["--ratio"], "dest": "ratio", "action": "store", "type": "float"},
            {"option_strings": ["--apps"], "dest": "apps", "action": "store", "nargs": "+"},
            {"option_strings": ["--password"], "dest": "password", "action": "store"}
        ]))
    }

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn mapping() {
        let c = cfg();
        let i = check_info();
        let argv = build(
            &c,
            "check",
            &obj(json!({"database": "default", "deploy": true, "no-color": false, "tag": ["a", 2], "args": ["x", "-y"], "fail_level": "ERROR", "verbosity": "2", "count": 3, "ratio": 0.5, "apps": ["a", "b"]})),
            Some(&i),
        )
        .unwrap();
        assert_eq!(
            argv,
            [
                "--apps",
                "a",
                "b",
                "--count=3",
                "--database=default",
                "--deploy",
                "--fail-level=ERROR",
                "--ratio=0.5",
                "--tag=a",
                "--tag=2",
                "--verbosity=2",
                "--",
                "x",
                "-y"
            ]
        );
        // A value is glued to its option: it never becomes an option.
        let argv = build(
            &c,
            "check",
            &obj(json!({"database": "--settings=x"})),
            Some(&i),
        )
        .unwrap();
        assert_eq!(argv, ["--database=--settings=x"]);
        // Django commands never run with unknown options.
        assert!(build(&c, "check", &Map::new(), None).is_err());
    }

    #[test]
    fn only_exact_options_of_the_right_type() {
        let c = cfg();
        let i = check_info();
        for bad in [
            json!({"settings": "evil"}),
            json!({"pythonpath": "/tmp"}),
            json!({"settin": "evil"}),
            json!({"python-path": "/tmp"}),
            json!({"data": "x"}),
            json!({"databas": "x"}),
            json!({"passw": "x"}),
            json!({"app_label": "x"}),
            json!({"help": true}),
            json!({"version": true}),
            json!({"count": "abc"}),
            json!({"count": 1.5}),
            json!({"count": true}),
            json!({"ratio": "nan"}),
            json!({"deploy": "yes"}),
            json!({"deploy": 1}),
            json!({"fail_level": "LOUD"}),
            json!({"verbosity": 4}),
            json!({"database": ["a", "b"]}),
            json!({"apps": ["-x"]}),
            json!({"apps": []}),
            json!({"-x": "1"}),
            json!({"a b": "1"}),
            json!({"1a": "1"}),
            json!({"database": "v\u{0}"}),
            json!({"database": {"nested": 1}}),
            json!({"tag": [[1]]}),
            json!({"tag": [true]}),
            json!({"database": null}),
            json!({"args": "x"}),
        ] {
            assert!(
                build(&c, "check", &obj(bad.clone()), Some(&i)).is_err(),
                "{bad}"
            );
        }
        // A command without positional arguments takes no "args".
        let none = info(json!([]));
        assert!(build(&c, "check", &obj(json!({"args": ["x"]})), Some(&none)).is_err());
        let e = build(&c, "check", &obj(json!({"settin": "x"})), Some(&i)).unwrap_err();
        assert!(e.message().contains("\"settin\""), "{}", e.message());
    }

    #[test]
    fn schema_narrows_django_options() {
        let c = cfg();
        let i = info(json!([
            {"option_strings": [], "dest": "app_label", "action": "store", "nargs": "?", "usage": "[app_label]"},
            {"option_strings": ["--database"], "dest": "database", "action": "store"},
            {"option_strings": ["--plan"], "dest": "plan", "action": "store_true", "nargs": 0},
            {"option_strings": ["--fake"], "dest": "fake", "action": "store_true", "nargs": 0}
        ]));
        assert_eq!(
            build(
                &c,
                "migrate",
                &obj(json!({"database": "x", "verbosity": 2})),
                Some(&i)
            )
            .unwrap(),
            ["--database=x", "--verbosity=2"]
        );
        for bad in [
            json!({"fake": true}),
            json!({"verbosity": 3}),
            json!({"verbosity": "1"}),
            json!({"plan": "yes"}),
            json!({"database": 1}),
            json!({"app": "x"}),
        ] {
            assert!(
                build(&c, "migrate", &obj(bad.clone()), Some(&i)).is_err(),
                "{bad}"
            );
        }
        assert!(build(&c, "du", &obj(json!({"a": "1"})), None).is_err());
        assert_eq!(
            build(&c, "du", &Map::new(), None).unwrap(),
            Vec::<String>::new()
        );
        assert!(check_static(&c, "migrate", &obj(json!({"unknown": 1}))).is_err());
        assert!(check_static(&c, "check", &obj(json!({"settings": "x"}))).is_err());
        assert!(check_static(&c, "check", &obj(json!({"anything": "x"}))).is_ok());
    }

    #[test]
    fn redaction() {
        let c = cfg();
        let d = obj(json!({"password": "s3cret", "user": "bob", "Pass-Word": ["a", "b"]}));
        let r = redact(&c, "check", &d, false, None);
        assert_eq!(
            r,
            json!({"password": "***", "user": "bob", "Pass-Word": ["a", "b"]})
        );
        let r = redact(&c, "check", &d, true, None);
        assert_eq!(
            r,
            json!({"password": "***", "user": "***", "Pass-Word": ["***", "***"]})
        );
        // Outside a schema, or any data of a custom command without one.
        let r = redact(
            &c,
            "migrate",
            &obj(json!({"database": "d", "db": "x"})),
            false,
            None,
        );
        assert_eq!(r, json!({"database": "d", "db": "***"}));
        let r = redact(&c, "du", &obj(json!({"a": "1"})), false, None);
        assert_eq!(r, json!({"a": "***"}));
        // Django: by the option a key resolves to; keys that resolve to
        // nothing (abbreviations) are never written.
        let i = info(json!([
            {"option_strings": ["--pass", "--password"], "dest": "secret", "action": "store"},
            {"option_strings": ["--database"], "dest": "database", "action": "store"}
        ]));
        let d = obj(json!({"pass": "a", "passw": "b", "database": "c", "args": ["d"]}));
        assert_eq!(
            redact(&c, "check", &d, false, Some(&i)),
            json!({"pass": "***", "passw": "***", "database": "c", "args": ["d"]})
        );
    }
}
