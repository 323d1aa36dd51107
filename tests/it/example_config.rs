//! The configuration users read about is the configuration the code runs:
//! the shipped example passes `portcullis check`, the README's minimal Django
//! configuration does too (with and without its remote-operations addition,
//! whose `allow` list is required), every key of the example and every default of
//! `config::defaults` is in the reference (docs/configuration.md), and every
//! default the reference states is the one the code applies.

use crate::support::check_with_secrets;
use portcullis::config::Config;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repo_file(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn read(path: &str) -> String {
    let path = repo_file(path);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `portcullis check --config FILE` with the given environment.
fn check(config: &Path, env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_portcullis"));
    cmd.args(["check", "--config"]).arg(config);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run portcullis check")
}

#[test]
fn shipped_example_config_passes_check() {
    let config = repo_file("config/portcullis.toml");
    let out = check_with_secrets(&config);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("/api/orders/{id}"), "{stdout}");
    // Without its secrets it is refused, listing each one, with exit 64.
    let out = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["check", "--config"])
        .arg(&config)
        .env_remove("PORTCULLIS_BACKEND_KEY")
        .env_remove("PORTCULLIS_WEB_KEY")
        .env_remove("PORTCULLIS_PARAM_KEY")
        .output()
        .expect("run portcullis check");
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    for var in [
        "PORTCULLIS_BACKEND_KEY",
        "PORTCULLIS_WEB_KEY",
        "PORTCULLIS_PARAM_KEY",
    ] {
        assert!(stderr.contains(var), "{stderr}");
    }
}

/// The first fenced block of `lang` after `marker` in `text`.
fn block_after(text: &str, marker: &str, lang: &str) -> String {
    let after = text
        .split_once(marker)
        .unwrap_or_else(|| panic!("no {marker} marker"))
        .1;
    let fence = format!("```{lang}\n");
    let start = after.find(&fence).expect("a fenced block after the marker") + fence.len();
    let len = after[start..].find("\n```").expect("end of the block");
    after[start..start + len].to_owned()
}

#[test]
fn readme_minimal_django_config_passes_check() {
    let text = block_after(&read("README.md"), "<!-- minimal-config -->", "toml");
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("minimal.toml");
    std::fs::write(&config, &text).expect("write config");
    let out = check(
        &config,
        &[
            ("PORTCULLIS_BACKEND_KEY", "backend-credential"),
            ("PORTCULLIS_IOS_KEY", "ios-key"),
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("/orders/{id}/"), "{stdout}");

    // With the README's remote-operations addition, still valid; without its
    // `allow` list, refused with the way to write one.
    let readme = read("README.md");
    let commands = block_after(&readme, "<!-- minimal-commands -->", "toml");
    let env = [
        ("PORTCULLIS_BACKEND_KEY", "backend-credential"),
        ("PORTCULLIS_IOS_KEY", "ios-key"),
        ("PORTCULLIS_ALICE_TOKEN", "operator-token"),
    ];
    std::fs::write(&config, format!("{text}\n{commands}\n")).expect("write config");
    let out = check(&config, &env);
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let without_allow: String = commands
        .lines()
        .filter(|l| !l.starts_with("allow"))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&config, format!("{text}\n{without_allow}")).expect("write config");
    let out = check(&config, &env);
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("commands.allow") && stderr.contains("@djangocommand-defaults"),
        "{stderr}"
    );
}

/// Whether `s` looks like a configuration key (`max_idle`, `h2c`).
fn is_key(s: &str) -> bool {
    s.starts_with(|c: char| c.is_ascii_lowercase())
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

/// One row of a key table in docs/configuration.md.
struct Row {
    /// The TOML table it belongs to (`server`, `commands.rules.<name>`, …).
    section: String,
    key: String,
    /// The default cell when it is a single code span: a TOML value.
    default: Option<String>,
}

/// The key tables of docs/configuration.md: rows whose first cell is a
/// backticked key, under the nearest heading naming a `[table]`.
fn reference_rows() -> Vec<Row> {
    let mut rows = Vec::new();
    let mut section: Option<String> = None;
    for line in read("docs/configuration.md").lines() {
        if line.starts_with('#') {
            section = line
                .split('`')
                .nth(1)
                .filter(|s| s.starts_with('['))
                .map(|s| s.trim_matches(|c| c == '[' || c == ']').to_owned());
            continue;
        }
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let (Some(section), [_, key, default, ..]) = (&section, cells.as_slice()) else {
            continue;
        };
        let Some(key) = key.strip_prefix('`').and_then(|k| k.strip_suffix('`')) else {
            continue;
        };
        if !is_key(key) {
            continue;
        }
        let default = default
            .strip_prefix('`')
            .and_then(|d| d.strip_suffix('`'))
            .filter(|d| !d.contains('`'))
            .map(str::to_owned);
        rows.push(Row {
            section: section.clone(),
            key: key.to_owned(),
            default,
        });
    }
    rows
}

/// A configuration with every table of the reference, each header once and
/// only its required keys set, so one more key can go right under a header.
fn base_config(certs: &Path) -> String {
    format!(
        r#"
[server]
[server.tls]
cert = "{certs}/server.crt"
key = "{certs}/server.key"
[backend]
url = "http://127.0.0.1:8000"
[[api_keys]]
name = "ios-app"
key = "device-key"
[sessions]
[crypto]
active_key = 7
keys = [{{ id = 7, key = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=" }}]
[[routes]]
path = "/api/orders/{{id}}"
methods = ["GET"]
[limits]
[rate_limits]
[[operators]]
name = "alice"
token = "operator-token"
[commands]
allow = ["check", "migrate", "clearsessions"]
django = {{ python = "python3", manage_py = "/srv/app/manage.py" }}
[commands.rules.migrate]
[[commands.custom]]
name = "disk-usage"
argv = ["du", "-sh", "/"]
[[commands.schedules]]
command = "clearsessions"
cron = "0 3 * * *"
"#,
        certs = certs.display()
    )
}

/// `base` with `key = value` added to the table `section`.
fn with_key(base: &str, section: &str, key: &str, value: &str) -> Option<String> {
    let section = section.replace("<name>", "migrate");
    let headers = [format!("[{section}]"), format!("[[{section}]]")];
    let at = base
        .lines()
        .position(|l| headers.iter().any(|h| h == l.trim()))?;
    let mut lines: Vec<String> = base.lines().map(str::to_owned).collect();
    lines.insert(at + 1, format!("{key} = {value}"));
    Some(lines.join("\n"))
}

/// The part of `a` around its first difference from `b` (Debug output of a
/// whole configuration is long).
fn around_difference(a: &str, b: &str) -> String {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    let at = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    let window = &a[at.saturating_sub(60)..(at + 60).min(a.len())];
    format!("`…{}…`", window.iter().collect::<String>())
}

#[test]
fn reference_defaults_are_the_ones_the_code_applies() {
    // server.tls needs a real certificate and key.
    let certs = tempfile::tempdir().expect("temp dir");
    let out = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["dev-certs", "--out"])
        .arg(certs.path())
        .output()
        .expect("run portcullis dev-certs");
    assert!(out.status.success(), "{out:?}");

    let base = base_config(certs.path());
    let expected = match Config::parse(&base) {
        Ok(c) => format!("{c:?}"),
        Err(p) => panic!("the test's base configuration is invalid:\n{p}"),
    };
    let mut checked = 0;
    for row in reference_rows() {
        let Some(default) = &row.default else {
            continue;
        };
        let at = format!("{}.{} = {default}", row.section, row.key);
        let text = with_key(&base, &row.section, &row.key, default).unwrap_or_else(|| {
            panic!(
                "{at}: no [{}] in this test's base configuration",
                row.section
            )
        });
        match Config::parse(&text) {
            Ok(c) => {
                let got = format!("{c:?}");
                assert!(
                    got == expected,
                    "docs/configuration.md says {at} is the default, but setting it gives {} \
                     where the default gives {}",
                    around_difference(&got, &expected),
                    around_difference(&expected, &got),
                );
            }
            Err(p) => {
                panic!("docs/configuration.md states {at} as a default, which is refused:\n{p}")
            }
        }
        checked += 1;
    }
    // The tables were found and read (about 50 defaults are stated).
    assert!(
        checked >= 40,
        "only {checked} defaults found in docs/configuration.md"
    );
}

#[test]
fn every_default_of_the_code_is_in_the_reference() {
    let stated: BTreeSet<String> = reference_rows()
        .into_iter()
        .filter(|r| r.default.is_some())
        .map(|r| format!("{}.{}", r.section, r.key))
        .collect();
    let missing: Vec<&str> = portcullis::config::defaults::table()
        .into_iter()
        .map(|(key, _)| key)
        .filter(|key| !stated.contains(*key))
        .collect();
    assert!(
        missing.is_empty(),
        "defaults of the code without a stated default in docs/configuration.md: {missing:?}"
    );
}

#[test]
fn every_key_of_the_example_is_in_the_reference() {
    let documented: BTreeSet<String> = reference_rows().into_iter().map(|r| r.key).collect();
    let mut example = BTreeSet::new();
    // Keys set, or shown commented out, at the start of a line.
    for line in read("config/portcullis.toml").lines() {
        let line = line.trim_start_matches(|c: char| c == '#' || c.is_whitespace());
        let Some((key, _)) = line.split_once('=') else {
            continue;
        };
        let key = key.trim();
        if is_key(key) {
            example.insert(key.to_owned());
        }
    }
    for key in [
        "listen",
        "tls",
        "h2c",
        "max_ttl",
        "per_api_key",
        "job_retention",
    ] {
        assert!(example.contains(key), "{key} not read from the example");
    }
    let missing: Vec<_> = example.difference(&documented).collect();
    assert!(
        missing.is_empty(),
        "keys of config/portcullis.toml missing from docs/configuration.md: {missing:?}"
    );
}
