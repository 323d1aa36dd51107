//! How `GET /__manage__/` describes one command: its help, whether it can
//! run now, and every `data` key it accepts with its kind (what the console
//! builds its forms from). The keys listed are exactly those
//! [`super::args::build`] accepts.

use super::config::{CommandsConfig, OptionSpec, OptionType, POSITIONAL};
use super::introspect::{normalize, DjangoOption, Known, Repeat};
use serde_json::{json, Value};

fn base(cfg: &CommandsConfig, name: &str, kind: &str) -> serde_json::Map<String, Value> {
    let rule = cfg.rules.get(name);
    let mut m = serde_json::Map::new();
    m.insert("name".into(), json!(name));
    m.insert("kind".into(), json!(kind));
    m.insert("help".into(), Value::Null);
    m.insert("metadata_only".into(), json!(cfg.is_metadata_only(name)));
    m.insert("lock".into(), json!(rule.and_then(|r| r.lock.clone())));
    m.insert("available".into(), json!(true));
    m.insert("error".into(), Value::Null);
    m
}

fn schema_bounds(spec: Option<&OptionSpec>) -> (Value, Value, Value) {
    match spec {
        Some(s) => (json!(s.min), json!(s.max), json!(s.pattern)),
        None => (Value::Null, Value::Null, Value::Null),
    }
}

/// A `[[commands.custom]]` command: only what its schema declares.
pub fn custom(cfg: &CommandsConfig, name: &str) -> Value {
    let mut m = base(cfg, name, "custom");
    let schema = cfg.rules.get(name).and_then(|r| r.options.as_ref());
    let mut options = Vec::new();
    let mut args = json!({"accepted": false, "help": null});
    for (key, spec) in schema.into_iter().flatten() {
        if key == POSITIONAL {
            args = json!({"accepted": true, "help": null});
            continue;
        }
        let (kind, repeatable) = match spec.kind {
            OptionType::String => ("string", false),
            OptionType::Bool => ("bool", false),
            OptionType::Int => ("int", false),
            OptionType::List => ("string", true),
        };
        let (min, max, pattern) = schema_bounds(Some(spec));
        options.push(json!({
            "name": key,
            "flag": format!("--{key}"),
            "kind": kind,
            "repeatable": repeatable,
            "help": null,
            "choices": null,
            "min": min,
            "max": max,
            "pattern": pattern,
            "default": null,
        }));
    }
    m.insert("options".into(), Value::Array(options));
    m.insert("args".into(), args);
    Value::Object(m)
}

fn django_option(o: &DjangoOption, name: &str, flag: &str, spec: Option<&OptionSpec>) -> Value {
    let (min, max, pattern) = schema_bounds(spec);
    json!({
        "name": name,
        "flag": flag,
        "kind": o.kind.as_str(),
        "repeatable": o.repeat != Repeat::No,
        "help": o.help,
        "choices": o.choices,
        "min": min,
        "max": max,
        "pattern": pattern,
        "default": o.default,
    })
}

/// A Django command, as Django described it (narrowed by its schema, if any).
pub fn django(cfg: &CommandsConfig, name: &str, known: &Known) -> Value {
    let mut m = base(cfg, name, "django");
    let schema = cfg.rules.get(name).and_then(|r| r.options.as_ref());
    let info = match known {
        Known::Ready(info) => info,
        Known::Failed(e) => {
            m.insert("available".into(), json!(false));
            m.insert("error".into(), json!(e));
            m.insert("options".into(), json!([]));
            m.insert("args".into(), json!({"accepted": false, "help": null}));
            return Value::Object(m);
        }
        Known::Pending => {
            m.insert("available".into(), json!(false));
            m.insert(
                "error".into(),
                json!("its options are still being read from Django"),
            );
            m.insert("options".into(), json!([]));
            m.insert("args".into(), json!({"accepted": false, "help": null}));
            return Value::Object(m);
        }
    };
    m.insert("help".into(), json!(info.help));
    let mut options = Vec::new();
    for o in &info.options {
        match schema {
            None => options.push(django_option(o, &o.name, &o.flag, None)),
            Some(schema) => {
                // Listed under the key the schema declares it by.
                let declared = schema.iter().find_map(|(k, spec)| {
                    let key = normalize(k);
                    o.keys
                        .iter()
                        .find(|(ok, _)| *ok == key)
                        .map(|(_, flag)| (key, flag, spec))
                });
                if let Some((key, flag, spec)) = declared {
                    options.push(django_option(o, &key, flag, Some(spec)));
                }
            }
        }
    }
    m.insert("options".into(), Value::Array(options));
    let accepted =
        info.positional.is_some() && schema.map_or(true, |s| s.keys().any(|k| k == POSITIONAL));
    m.insert(
        "args".into(),
        json!({"accepted": accepted, "help": if accepted { info.positional.clone() } else { None }}),
    );
    Value::Object(m)
}
