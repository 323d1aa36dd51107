//! The compiled `portcullis` binary: serving with a temp config,
//! SIGTERM, `check`, `hash-secret`, `keygen`, `decrypt`, and bounded memory
//! while 100 MiB bodies stream through it both ways.

use crate::support::*;
use http_body_util::BodyExt;
use sha2::{Digest, Sha256};
use std::io::Write;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

/// Starts the binary with `toml` as its config file; returns the guard, the
/// address it listens on and the temp dir holding the config and its log.
async fn spawn_gateway(cfg: &GatewayConfig) -> (ChildGuard, SocketAddr, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let addr = free_addr();
    let path = dir.path().join("portcullis.toml");
    std::fs::write(&path, cfg.toml(addr)).unwrap();
    let log = std::fs::File::create(dir.path().join("stderr.log")).unwrap();
    let mut cmd = binary(&path);
    cmd.env("PORTCULLIS_LOG", "warn").stderr(log);
    (spawn_listening(cmd, addr).await, addr, dir)
}

fn run(args: &[&str], stdin: Option<&[u8]>) -> std::process::Output {
    let mut child = Command::new(BIN)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run portcullis");
    let mut input = child.stdin.take().unwrap();
    if let Some(data) = stdin {
        input.write_all(data).unwrap();
    }
    drop(input);
    child.wait_with_output().unwrap()
}

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_serves_with_a_temp_config_and_stops_on_sigterm() {
    let backend = Backend::start().await;
    backend.on("/status", serde_json_reply());
    let (mut guard, addr, dir) = spawn_gateway(&GatewayConfig::new(backend.url())).await;

    let r = Req::new(addr, "GET", "/api/status")
        .api_key(ANDROID_KEY)
        .send()
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["status"], "ok");
    assert_eq!(r.header("server"), Some("portcullis"));
    let rec = backend.last("/status");
    assert_eq!(rec.header("api-client"), Some("android-app"));
    assert_eq!(rec.header("api-key"), Some(BACKEND_CREDENTIAL));
    let r = Req::new(addr, "GET", "/api/status").send().await;
    r.assert_gateway_error(403, "Received API KEY not found in server API KEYS set");

    // SIGTERM: a clean exit, promptly.
    send_signal(&guard, "-TERM");
    let child = guard.child();
    let mut exited = None;
    for _ in 0..250 {
        if let Some(s) = child.try_wait().unwrap() {
            exited = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let log = std::fs::read_to_string(dir.path().join("stderr.log")).unwrap_or_default();
    let exited = exited.unwrap_or_else(|| panic!("no exit within 5s of SIGTERM; log:\n{log}"));
    assert!(exited.success(), "{exited}; log:\n{log}");
}

fn serde_json_reply() -> Reply {
    Reply::json(200, serde_json::json!({"status": "ok"}))
}

#[test]
fn check_lists_every_problem_and_exits_64() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        r#"
[server]
listen = "not-an-address"
max_body = "12 parsecs"

[backend]
url = "ftp://backend"
timeout = "soon"

[[api_keys]]
name = "ios"
key = "sha256:nothex"

[[routes]]
path = "/api/x"
methods = ["TRACE"]
encrypt_query = ["username"]
"#,
    )
    .unwrap();
    let out = run(&["check", "--config", bad.to_str().unwrap()], None);
    assert_eq!(
        out.status.code(),
        Some(64),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    let all = format!("{}{}", stdout(&out), stderr(&out));
    for needle in [
        "server.listen",
        "server.max_body",
        "backend.url",
        "backend.timeout",
        "api_keys[0].key",
        "routes[0].methods",
        "routes[0].encrypt_query",
    ] {
        assert!(all.contains(needle), "{needle} missing from:\n{all}");
    }

    // Unknown keys are errors too.
    std::fs::write(
        &bad,
        "[server]\nlisten = \"127.0.0.1:1\"\nlisten_typo = 1\n",
    )
    .unwrap();
    let out = run(&["check", "--config", bad.to_str().unwrap()], None);
    assert_eq!(out.status.code(), Some(64));
    assert!(stderr(&out).contains("listen_typo"), "{}", stderr(&out));

    // Unknown keys do not hide the other sections' problems, routes included
    // (a bad path, a conflict, a backend template), in one run.
    std::fs::write(
        &bad,
        r#"
bogus_section = 1

[server]
listen = "127.0.0.1:1"
listen_typo = 1

[backend]
url = "http://127.0.0.1:9"
timeout = "soon"

[[api_keys]]
name = "ios"
key = "k"

[[routes]]
path = "/ok"
methods = ["GET"]
typo = true

[[routes]]
path = "api/status"
methods = ["GET"]

[[routes]]
path = "/orders/{id}"
methods = ["GET"]
backend_path = "/orders/{order}"

[[routes]]
path = "/a/{x}"
methods = ["GET"]

[[routes]]
path = "/a/{y}"
methods = ["GET"]

[limits]
idle_timeout = "forever"
"#,
    )
    .unwrap();
    let out = run(&["check", "--config", bad.to_str().unwrap()], None);
    assert_eq!(out.status.code(), Some(64));
    let all = stderr(&out);
    for needle in [
        "bogus_section: unknown key",
        "server: unknown field `listen_typo`",
        "backend.timeout",
        "routes[0]: unknown field `typo`",
        "routes[1].path: invalid path \"api/status\": a path starts with '/'",
        "routes[2].backend_path: {order} is not a parameter",
        "routes[4].path",
        "limits.idle_timeout",
    ] {
        assert!(all.contains(needle), "{needle} missing from:\n{all}");
    }
    // Nothing about the unread [server] table beyond its own error.
    assert!(!all.contains("server.listen"), "{all}");

    // A missing file as well.
    let out = run(&["check", "--config", "/nonexistent/portcullis.toml"], None);
    assert_eq!(out.status.code(), Some(64));

    // A valid file: exit 0 and the routes listed.
    let good = dir.path().join("good.toml");
    std::fs::write(
        &good,
        GatewayConfig::new("http://127.0.0.1:9").toml("127.0.0.1:0".parse().unwrap()),
    )
    .unwrap();
    let out = run(&["check", "--config", good.to_str().unwrap()], None);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("/api/orders/{id}"), "{text}");
    assert!(text.contains("/orders/{id}"), "{text}");
    assert!(
        !text.contains(IOS_KEY),
        "check must not print secrets: {text}"
    );
}

#[tokio::test]
async fn hash_secret_output_is_a_usable_api_key() {
    let out = run(&["hash-secret"], Some(b"my device key\n"));
    assert!(out.status.success(), "{}", stderr(&out));
    let line = stdout(&out).trim().to_owned();
    let expected = format!("sha256:{}", hex(&Sha256::digest(b"my device key")));
    assert_eq!(line, expected);

    // Empty input is refused.
    let out = run(&["hash-secret"], Some(b""));
    assert!(!out.status.success());

    // The printed form works as a configured key.
    let backend = Backend::start().await;
    let mut cfg = GatewayConfig::new(backend.url());
    cfg.server.clear();
    let listener_addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let text = cfg.toml(listener_addr).replace(
        &format!("key = \"{IOS_KEY}\""),
        &format!("key = \"{line}\""),
    );
    let config = portcullis::config::Config::parse(&text).expect("config with hashed key");
    let state = portcullis::gateway::State::new(config).unwrap();
    let listener = tokio::net::TcpListener::bind(listener_addr).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(portcullis::server::serve(listener, state, async move {
        let _ = rx.await;
    }));
    let r = Req::new(addr, "GET", "/api/status")
        .api_key("my device key")
        .send()
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = Req::new(addr, "GET", "/api/status")
        .api_key(IOS_KEY)
        .send()
        .await;
    assert_eq!(r.status, 403);
    let _ = tx.send(());
    tokio::time::timeout(TIMEOUT, task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

#[test]
fn keygen_prints_fresh_usable_keys() {
    use base64::Engine;
    let a = run(&["keygen"], None);
    let b = run(&["keygen"], None);
    assert!(a.status.success() && b.status.success());
    let (a, b) = (stdout(&a).trim().to_owned(), stdout(&b).trim().to_owned());
    assert_ne!(a, b);
    for k in [&a, &b] {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(k)
            .unwrap_or_else(|e| panic!("{k}: {e}"));
        assert_eq!(bytes.len(), 32);
    }
    // A generated key decrypts what it encrypted, through the CLI.
    let key = portcullis::crypto::decode_key(&portcullis::secret::Secret::new(a.clone())).unwrap();
    let ring = portcullis::crypto::Keyring::new(9, &[(9, key)]).unwrap();
    let value = ring.encrypt("email", b"x@example.com");
    let out = run(&["decrypt", "--key", &a, "--param", "email", &value], None);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out).trim(), "x@example.com");
}

#[test]
fn decrypt_matches_the_reference_test_vector() {
    const VALUE: &str = "AQcAAQIDBAUGBwgJCgs3cLljvLqxfv838vnuiBwA6rjbPbngMD-Da_BcG3bydRB7";
    let out = run(
        &[
            "decrypt",
            "--key",
            OLD_KEY_B64,
            "--param",
            "username",
            VALUE,
        ],
        None,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "proxy_server_admin\n");

    // Wrong parameter name (AAD), tampered value, wrong key: failures, no plaintext.
    let mut tampered = VALUE.to_owned();
    tampered.replace_range(30..31, if &VALUE[30..31] == "A" { "B" } else { "A" });
    for (key, param, value) in [
        (OLD_KEY_B64, "email", VALUE),
        (OLD_KEY_B64, "username", tampered.as_str()),
        (ACTIVE_KEY_B64, "username", VALUE),
    ] {
        let out = run(&["decrypt", "--key", key, "--param", param, value], None);
        assert!(!out.status.success(), "{param} {value}");
        assert!(!stdout(&out).contains("proxy_server_admin"));
    }
    // A key from the environment.
    let out = Command::new(BIN)
        .args([
            "decrypt",
            "--key",
            "env:PC_TEST_KEY",
            "--param",
            "username",
            VALUE,
        ])
        .env("PC_TEST_KEY", OLD_KEY_B64)
        .output()
        .unwrap();
    assert_eq!(stdout(&out), "proxy_server_admin\n", "{}", stderr(&out));
}

const BIG: u64 = 100 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_mib_both_ways_with_bounded_gateway_memory() {
    let backend = Backend::start().await;
    backend.on("/download", Reply::pattern(BIG));
    let cfg = GatewayConfig::new(backend.url())
        .route(
            r#"path = "/api/download"
methods = ["GET"]
backend_path = "/download"
public = true
timeout = "60s""#,
        )
        .route(
            r#"path = "/api/upload-big"
methods = ["POST"]
backend_path = "/upload-big"
public = true
max_body = "200MiB"
timeout = "60s""#,
        );
    let (guard, addr, _dir) = spawn_gateway(&cfg).await;
    let baseline = vm_hwm_kib(guard.pid());

    // 100 MiB response, streamed and hashed on arrival.
    let resp = Req::new(addr, "GET", "/api/download")
        .api_key(IOS_KEY)
        .send_streaming()
        .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers().get("content-length").map(|v| v.as_bytes()),
        Some(BIG.to_string().as_bytes()),
        "Content-Length passed through"
    );
    let mut body = resp.into_body();
    let mut hasher = Sha256::new();
    let mut len = 0u64;
    let read = async {
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame.expect("body frame").into_data() {
                len += data.len() as u64;
                hasher.update(&data);
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(120), read)
        .await
        .expect("download in time");
    let expected = pattern_digest(BIG);
    assert_eq!((len, hex(&hasher.finalize())), expected, "response intact");

    // 100 MiB request body with a Content-Length.
    let r = tokio::time::timeout(
        Duration::from_secs(120),
        Req::new(addr, "POST", "/api/upload-big")
            .api_key(IOS_KEY)
            .header("content-length", &BIG.to_string())
            .header("content-type", "application/octet-stream")
            .body_stream(PatternBody::new(BIG))
            .send(),
    )
    .await
    .expect("upload in time");
    assert_eq!(r.status, 200, "{}", r.text());
    let rec = backend.last("/upload-big");
    assert_eq!(
        (rec.body_len, rec.body_sha256.clone()),
        expected,
        "request intact"
    );
    assert_eq!(rec.header("content-length"), Some(BIG.to_string().as_str()));
    assert!(rec.header("transfer-encoding").is_none());

    let peak = vm_hwm_kib(guard.pid());
    eprintln!("gateway VmHWM: baseline {baseline} KiB, after 2 x 100 MiB {peak} KiB");
    assert!(
        peak < 60 * 1024,
        "gateway peak RSS {peak} KiB: bodies are being buffered"
    );
    drop(guard);
}
