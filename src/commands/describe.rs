//! What `GET /__manage__/` says about one command: its kind, help, locks and
//! the options the gateway accepts for it, in the shape the operator console
//! builds its forms from (`options` as a list, `args` for positional
//! arguments). Options come from the command's configured schema; a Django
//! command without one takes free-form options (`free_form: true`).

use super::config::{CommandsConfig, OptionSpec, OptionType, POSITIONAL};
use serde_json::{json, Value};

/// One option of a configured schema, as listed.
fn option(name: &str, spec: &OptionSpec) -> Value {
    let (kind, repeatable) = match spec.kind {
        OptionType::String => ("string", false),
        OptionType::Bool => ("bool", false),
        OptionType::Int => ("int", false),
        OptionType::List => ("string", true),
    };
    json!({
        "name": name,
        "flag": format!("--{name}"),
        "kind": kind,
        "repeatable": repeatable,
        "help": null,
        "choices": null,
        "min": spec.min,
        "max": spec.max,
        "pattern": spec.regex.as_ref().map(|r| r.as_str()),
        "default": null,
        "required": spec.required,
    })
}

/// The description of `name` (`kind` is `"django"` or `"custom"`).
pub(super) fn command(cfg: &CommandsConfig, name: &str, kind: &str) -> Value {
    let rule = cfg.rules.get(name);
    let schema = rule.and_then(|r| r.options.as_ref());
    let options: Vec<Value> = schema
        .map(|s| {
            s.iter()
                .filter(|(k, _)| k.as_str() != POSITIONAL)
                .map(|(k, spec)| option(k, spec))
                .collect()
        })
        .unwrap_or_default();
    // Positional arguments: those a schema declares; any for a Django command
    // without a schema; none for a custom command without one.
    let args_accepted = match schema {
        Some(s) => s.contains_key(POSITIONAL),
        None => kind == "django",
    };
    json!({
        "name": name,
        "kind": kind,
        "help": null,
        "metadata_only": cfg.is_metadata_only(name),
        "lock": rule.and_then(|r| r.lock.clone()),
        "available": true,
        "error": null,
        "options": options,
        "args": {"accepted": args_accepted, "help": null},
        "free_form": schema.is_none() && kind == "django",
    })
}
