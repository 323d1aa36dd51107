//! The binary confined to one CPU (a pinned process or a one-CPU container)
//! runs on the single-threaded scheduler: it must serve, validate sessions and
//! shut down exactly as on several CPUs.

use crate::support::*;
use std::process::{Command, Stdio};

#[tokio::test(flavor = "multi_thread")]
async fn serves_when_confined_to_one_cpu() {
    if Command::new("taskset").arg("-V").output().is_err() {
        eprintln!("taskset (util-linux) missing: cannot pin the binary; skipping");
        return;
    }
    let backend = Backend::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("portcullis.toml");
    let listen = free_addr();
    std::fs::write(
        &config,
        GatewayConfig::new(backend.url())
            .server("access_log = \"off\"")
            .toml(listen),
    )
    .unwrap();
    let mut pinned = Command::new("taskset");
    pinned
        .args(["-c", "0", BIN, "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut child = spawn_listening(pinned, listen).await;

    // Concurrent requests with one unknown token: one validation, all served.
    let mut tasks = Vec::new();
    for _ in 0..50 {
        tasks.push(tokio::spawn(
            Req::new(listen, "GET", "/api/profile")
                .api_key(IOS_KEY)
                .token("single-cpu-token")
                .send(),
        ));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap().status, 200);
    }
    assert_eq!(backend.count("/renew_session"), 1);
    Req::new(listen, "GET", "/api/nothing")
        .api_key(IOS_KEY)
        .send()
        .await
        .assert_gateway_error(404, "Not found");

    // SIGTERM: drains and exits cleanly.
    send_signal(&child, "-TERM");
    let status = tokio::task::spawn_blocking(move || child.child().wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status}");
}
