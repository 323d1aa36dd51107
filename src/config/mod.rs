//! Configuration: raw serde structs (unknown keys rejected) validated into typed
//! values. Validation reports every problem at once; `portcullis check` prints
//! them and exits 64.
//!
//! - [`raw`]: the file's shape as serde reads it;
//! - [`model`]: the typed, validated configuration ([`Config`]);
//! - [`validate`]: raw → model, every problem recorded;
//! - [`units`] and [`problems`]: the vocabulary `[commands]` shares (leaf modules);
//! - [`defaults`]: every default value, in one place.

pub mod defaults;
mod model;
pub mod problems;
mod raw;
pub mod units;
mod validate;

pub use model::*;
pub use problems::Problems;
pub use units::{parse_duration, parse_rate, parse_size, Rate};

use std::path::Path;

impl Config {
    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<Config, Problems> {
        match std::fs::read_to_string(path) {
            Ok(text) => Config::parse(&text),
            Err(e) => Err(Problems(vec![format!("{}: {e}", path.display())])),
        }
    }

    /// Parses and validates configuration text.
    pub fn parse(text: &str) -> Result<Config, Problems> {
        // Syntax errors stop everything; anything else is reported together.
        let table: toml::Table = match toml::from_str(text) {
            Ok(t) => t,
            Err(e) => return Err(Problems(vec![e.to_string().trim().to_owned()])),
        };
        let mut p = Problems::default();
        let (raw, unread) = raw::read(table, &mut p);
        let mut checked = Problems::default();
        let mut warnings = Vec::new();
        let cfg = validate::validate(raw, &mut checked, &mut warnings);
        p.0.extend(unread.apply(checked.0));
        if p.0.is_empty() {
            cfg.ok_or(p)
        } else {
            Err(p)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Method;
    use std::time::Duration;

    const MINIMAL: &str = r#"
        [backend]
        url = "http://127.0.0.1:8000"
        [[api_keys]]
        name = "ios"
        key = "k1"
        [[routes]]
        path = "/api/orders/{id}"
        methods = ["GET", "post"]
    "#;

    #[test]
    fn minimal_config_gets_defaults() {
        let c = Config::parse(MINIMAL).unwrap();
        assert_eq!(c.server.max_body, 1 << 20);
        assert_eq!(c.routes[0].methods, vec![Method::GET, Method::POST]);
        assert_eq!(c.routes[0].backend_path, "/api/orders/{id}");
        assert_eq!(c.backend.address, "127.0.0.1:8000");
        assert_eq!(c.sessions.validate_path, "/renew_session");
    }

    #[test]
    fn every_problem_is_reported() {
        let text = r#"
            bogus = 1
        "#;
        let e = Config::parse(text).unwrap_err();
        assert!(e.0[0].contains("bogus: unknown key"), "{e}");

        let text = r#"
            [server]
            listen = "nope"
            max_body = "12 parsecs"
            [backend]
            url = "ftp://x"
            [[api_keys]]
            name = "a"
            key = "sha256:zz"
            [[routes]]
            path = "/x"
            methods = ["TRACE"]
            encrypt_query = ["u"]
        "#;
        let e = Config::parse(text).unwrap_err();
        let all = e.to_string();
        for needle in [
            "server.listen",
            "server.max_body",
            "backend.url",
            "api_keys[0].key",
            "routes[0].methods",
            "routes[0].encrypt_query",
        ] {
            assert!(all.contains(needle), "{needle} missing from\n{all}");
        }
    }

    #[test]
    fn unknown_keys_do_not_hide_other_problems() {
        let text = r#"
            [server]
            listen = "127.0.0.1:1"
            typo = 1
            [backend]
            url = "http://127.0.0.1:9"
            [[api_keys]]
            name = "a"
            key = "k"
            [[routes]]
            path = "/a"
            methods = ["GET"]
            bogus = 1
            [[routes]]
            path = "b"
            methods = ["GET"]
            [[routes]]
            path = "/c/{x}"
            methods = ["GET"]
            backend_path = "/c/{y}"
            [limits]
            idle_timeout = "never"
        "#;
        let e = Config::parse(text).unwrap_err();
        let all = e.to_string();
        for needle in [
            "server: unknown field `typo`",
            "routes[0]: unknown field `bogus`",
            "routes[1].path: invalid path \"b\": a path starts with '/'",
            "routes[2].backend_path: {y} is not a parameter",
            "limits.idle_timeout",
        ] {
            assert!(all.contains(needle), "{needle} missing from\n{all}");
        }
        // (the bad path is also the default backend path)
        assert_eq!(e.0.len(), 6, "{all}");
    }

    #[test]
    fn sizes_durations_rates() {
        assert_eq!(parse_size("1MiB").unwrap(), 1 << 20);
        assert_eq!(parse_size("16KiB").unwrap(), 16 << 10);
        assert_eq!(parse_size("100").unwrap(), 100);
        assert!(parse_size("1XB").is_err());
        assert_eq!(parse_duration("2s").unwrap(), Duration::from_secs(2));
        assert_eq!(
            parse_rate("5/min").unwrap(),
            Rate {
                count: 5,
                per: Duration::from_secs(60)
            }
        );
        assert!(parse_rate("0/s").is_err());
    }

    #[test]
    fn response_read_ahead_limits() {
        let c = Config::parse(MINIMAL).unwrap();
        assert_eq!(c.limits.response_buffer, 1 << 20);
        assert_eq!(c.limits.response_buffer_total, 64 << 20);
        let off = format!("{MINIMAL}\n[limits]\nresponse_buffer = 0\n");
        assert_eq!(Config::parse(&off).unwrap().limits.response_buffer, 0);
        let bad = format!(
            "{MINIMAL}\n[limits]\nresponse_buffer = \"8MiB\"\nresponse_buffer_total = \"4MiB\"\n"
        );
        let e = Config::parse(&bad).unwrap_err().to_string();
        assert!(
            e.contains("limits.response_buffer") && e.contains("larger than"),
            "{e}"
        );
    }

    #[test]
    fn the_minimal_example_config_is_valid() {
        let c = Config::parse(include_str!("../../examples/minimal.toml"))
            .unwrap_or_else(|p| panic!("{p}"));
        assert_eq!(c.routes.len(), 2);
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
    }
}
