//! The binary confined to one CPU (a pinned process or a one-CPU container)
//! runs on the single-threaded scheduler: it must serve, validate sessions and
//! shut down exactly as on several CPUs.

mod common;

use common::*;
use std::net::SocketAddr;
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
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    std::fs::write(
        &config,
        GatewayConfig::new(backend.url())
            .server("access_log = \"off\"")
            .toml(listen),
    )
    .unwrap();
    let child = Command::new("taskset")
        .args(["-c", "0", env!("CARGO_BIN_EXE_portcullis"), "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start portcullis under taskset");
    let mut child = ChildGuard(Some(child));
    wait_listening(listen, &mut child).await;

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
    let pid = child.pid();
    assert!(Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap()
        .success());
    let status = tokio::task::spawn_blocking(move || child.child().wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status}");
}
