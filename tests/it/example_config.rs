//! The shipped, commented example configuration stays valid.

use crate::support::{check_with_secrets, BIN};
use std::path::Path;

#[test]
fn shipped_example_config_passes_check() {
    let root = env!("CARGO_MANIFEST_DIR");
    let config = Path::new(root).join("config/portcullis.toml");
    let out = check_with_secrets(&config);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("/api/orders/{id}"), "{stdout}");
    // Without its secrets it is refused, listing each one, with exit 64.
    let out = std::process::Command::new(BIN)
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
