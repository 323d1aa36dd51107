//! `data` → argv (SPEC §5): `"k": "v"` → `--k=v`, `true` → `--k`, `false`
//! omitted, a list → the option repeated, `"args": [...]` → positional
//! arguments after `--`. Values are always glued to their option with `=`, so a
//! value can never become an option of its own. Nothing here touches a shell.

use super::config::{CommandsConfig, OptionSpec, OptionType, POSITIONAL};
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

/// Builds the argument list (after the program and command name) for
/// running `command` with `data`, applying the command's schema if it has one.
/// Custom commands without a schema take no arguments at all.
pub fn build(
    cfg: &CommandsConfig,
    command: &str,
    data: &Map<String, Value>,
) -> Result<Vec<String>, ArgError> {
    let schema = cfg.rules.get(command).and_then(|r| r.options.as_ref());
    if schema.is_none() && cfg.custom(command).is_some() && !data.is_empty() {
        return Err(err(format!(
            "{command:?} takes no arguments (declare [commands.rules.{command}].options to allow some)"
        )));
    }
    if data.len() > MAX_ITEMS {
        return Err(err("too many options"));
    }
    if let Some(schema) = schema {
        for (name, spec) in schema {
            if spec.required && !data.contains_key(name) {
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
        if let Some(schema) = schema {
            match schema.get(name) {
                Some(spec) => check_spec(name, spec, value)?,
                None => return Err(err(format!("unknown option {name:?}"))),
            }
        }
        if name == POSITIONAL {
            let Value::Array(items) = value else {
                return Err(err("\"args\" must be a list of positional arguments"));
            };
            for item in items {
                positional.push(scalar(name, item)?);
            }
            continue;
        }
        match value {
            Value::Bool(true) => argv.push(format!("--{name}")),
            Value::Bool(false) => {}
            Value::Array(items) => {
                for item in items {
                    argv.push(format!("--{name}={}", scalar(name, item)?));
                }
            }
            other => argv.push(format!("--{name}={}", scalar(name, other)?)),
        }
    }
    if argv.len() + positional.len() > MAX_ITEMS {
        return Err(err("too many arguments"));
    }
    if !positional.is_empty() {
        argv.push("--".to_owned());
        argv.extend(positional);
    }
    Ok(argv)
}

/// `data` as it may be written down: values of options named in
/// `commands.redact` (case-insensitive) replaced by `"***"`, or every value when
/// `all` (metadata-only commands).
pub fn redact(data: &Map<String, Value>, redact: &[String], all: bool) -> Value {
    let mut out = Map::new();
    for (k, v) in data {
        let hide = all || redact.iter().any(|r| r.eq_ignore_ascii_case(k));
        let v = if !hide {
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
            django = { python = "python3", manage_py = "manage.py" }
            [rules.migrate]
            options = { database = "string", plan = "bool", verbosity = { type = "int", max = 3 }, app = { type = "string", regex = "[a-z_]+" }, args = "list" }
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

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn mapping() {
        let c = cfg();
        let argv = build(
            &c,
            "check",
            &obj(json!({"database": "default", "plan": true, "dry": false, "tag": ["a", 2], "args": ["x", "-y"]})),
        )
        .unwrap();
        assert_eq!(
            argv,
            [
                "--database=default",
                "--plan",
                "--tag=a",
                "--tag=2",
                "--",
                "x",
                "-y"
            ]
        );
        let argv = build(&c, "check", &obj(json!({"deploy": "--fail-level=ERROR"}))).unwrap();
        assert_eq!(argv, ["--deploy=--fail-level=ERROR"]);
    }

    #[test]
    fn bad_inputs() {
        let c = cfg();
        for bad in [
            json!({"-x": "1"}),
            json!({"a b": "1"}),
            json!({"1a": "1"}),
            json!({"a\u{0}": "1"}),
            json!({"a": "v\u{0}"}),
            json!({"a": {"nested": 1}}),
            json!({"a": [[1]]}),
            json!({"a": [true]}),
            json!({"a": null}),
            json!({"args": "x"}),
        ] {
            assert!(build(&c, "check", &obj(bad.clone())).is_err(), "{bad}");
        }
    }

    #[test]
    fn schema() {
        let c = cfg();
        assert!(build(
            &c,
            "migrate",
            &obj(json!({"database": "x", "verbosity": 3}))
        )
        .is_ok());
        for bad in [
            json!({"unknown": "1"}),
            json!({"verbosity": 4}),
            json!({"verbosity": "1"}),
            json!({"plan": "yes"}),
            json!({"database": 1}),
            json!({"app": "Bad-App"}),
        ] {
            assert!(build(&c, "migrate", &obj(bad.clone())).is_err(), "{bad}");
        }
        assert!(build(&c, "du", &obj(json!({"a": "1"}))).is_err());
        assert_eq!(build(&c, "du", &Map::new()).unwrap(), Vec::<String>::new());
    }

    #[test]
    fn redaction() {
        let d = obj(json!({"password": "s3cret", "user": "bob", "Token": ["a", "b"]}));
        let r = redact(&d, &["password".into(), "token".into()], false);
        assert_eq!(
            r,
            json!({"password": "***", "user": "bob", "Token": ["***", "***"]})
        );
        let r = redact(&d, &[], true);
        assert_eq!(
            r,
            json!({"password": "***", "user": "***", "Token": ["***", "***"]})
        );
    }
}
