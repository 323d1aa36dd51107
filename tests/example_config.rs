//! The shipped, commented example configuration stays valid.

#[test]
fn shipped_example_config_passes_check() {
    let root = env!("CARGO_MANIFEST_DIR");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["check", "--config"])
        .arg(format!("{root}/config/portcullis.toml"))
        .env("PORTCULLIS_BACKEND_KEY", "backend-credential")
        .env("PORTCULLIS_WEB_KEY", "web-key")
        .env(
            "PORTCULLIS_PARAM_KEY",
            "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=",
        )
        .output()
        .expect("run portcullis check");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("/api/orders/{id}"), "{stdout}");
    // Without its secrets it is refused, listing each one, with exit 64.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["check", "--config"])
        .arg(format!("{root}/config/portcullis.toml"))
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
