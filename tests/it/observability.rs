//! The compiled binary's operator-facing side: the admin listener
//! (`/metrics`, `/healthz`, `/readyz`), the JSON access log (and that it never
//! carries a key, a token or a query value), and live reload on SIGHUP.

use crate::support::*;
use std::net::SocketAddr;

use std::time::Duration;

const TOKEN: &str = "tok-SECRET-0123456789";

async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let resp = Req::new(addr, "GET", path).send().await;
    (resp.status, resp.text())
}

async fn wait_until<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while tokio::time::Instant::now() < deadline {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test(flavor = "multi_thread")]
async fn admin_endpoints_access_log_and_reload() {
    let mut backend = Backend::start().await;
    let dir = tempfile::tempdir().unwrap();
    let access_log = dir.path().join("access.jsonl");
    let config_path = dir.path().join("portcullis.toml");
    let listen: SocketAddr = free_addr();
    let admin: SocketAddr = free_addr();
    let base = GatewayConfig::new(backend.url())
        .server(&format!("admin_listen = \"{admin}\""))
        .server(&format!("access_log = \"{}\"", access_log.display()));
    std::fs::write(&config_path, base.toml(listen)).unwrap();

    let stderr_path = dir.path().join("stderr.log");
    let mut cmd = binary(&config_path);
    cmd.stderr(std::fs::File::create(&stderr_path).unwrap());
    let child = cmd.spawn().expect("start portcullis");
    let child = ChildGuard(Some(child));
    let log_so_far = stderr_path.clone();
    wait_until("admin listener", || {
        let log_so_far = log_so_far.clone();
        async move {
            let text = std::fs::read_to_string(&log_so_far).unwrap_or_default();
            assert!(!text.contains("invalid configuration"), "{text}");
            tokio::net::TcpStream::connect(admin).await.is_ok()
        }
    })
    .await;

    // Traffic: a public call, a private call (one validation), an encrypted query.
    let public = Req::new(listen, "GET", "/api/status")
        .api_key(IOS_KEY)
        .send()
        .await;
    assert_eq!(public.status, 200);
    for _ in 0..2 {
        let private = Req::new(listen, "GET", "/api/profile")
            .api_key(IOS_KEY)
            .token(TOKEN)
            .send()
            .await;
        assert_eq!(private.status, 200);
    }
    let search = Req::new(listen, "GET", "/api/search?username=alice-secret&page=2")
        .api_key(IOS_KEY)
        .token(TOKEN)
        .send()
        .await;
    assert_eq!(search.status, 200);
    let refused = Req::new(listen, "GET", "/api/status")
        .api_key("wrong-key")
        .send()
        .await;
    assert_eq!(refused.status, 403);
    assert_eq!(backend.count("/renew_session"), 1);

    // Metrics.
    let (status, metrics) = http_get(admin, "/metrics").await;
    assert_eq!(status, 200);
    for needle in [
        r#"portcullis_requests_total{route="/api/status",method="GET",status="200"} 1"#,
        r#"portcullis_requests_total{route="/api/profile",method="GET",status="200"} 2"#,
        r#"portcullis_requests_total{route="unmatched",method="GET",status="403"} 1"#,
        "portcullis_validation_calls_total 1",
        "portcullis_session_cache_hits_total 2",
        "portcullis_session_cache_misses_total 1",
        "portcullis_session_cache_entries 1",
        "portcullis_request_duration_seconds_bucket",
        "portcullis_upstream_duration_seconds_bucket",
        "portcullis_open_connections",
    ] {
        assert!(metrics.contains(needle), "missing {needle} in\n{metrics}");
    }
    assert!(!metrics.contains(TOKEN) && !metrics.contains(IOS_KEY));

    // Health and readiness.
    assert_eq!(http_get(admin, "/healthz").await.0, 200);
    assert_eq!(http_get(admin, "/readyz").await.0, 200);

    // Access log: one JSON line per request, nothing secret in it.
    wait_until("access log lines", || {
        let path = access_log.clone();
        async move {
            std::fs::read_to_string(&path)
                .map(|t| t.lines().count() >= 5)
                .unwrap_or(false)
        }
    })
    .await;
    let log = std::fs::read_to_string(&access_log).unwrap();
    for secret in [TOKEN, IOS_KEY, "alice-secret", "page=2", BACKEND_CREDENTIAL] {
        assert!(!log.contains(secret), "access log leaks {secret}:\n{log}");
    }
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    let profile = lines
        .iter()
        .find(|l| l["route"] == "/api/profile")
        .expect("profile line");
    for field in [
        "time",
        "request_id",
        "client",
        "api_client",
        "method",
        "path",
        "status",
        "bytes",
        "duration_ms",
        "upstream_ms",
    ] {
        assert!(!profile[field].is_null(), "{field} missing in {profile}");
    }
    assert_eq!(profile["api_client"], "ios-app");
    assert_eq!(profile["client"], "127.0.0.1");
    assert!(profile["bytes"].as_u64().unwrap() > 0);

    // Reload: a new route appears, the cached session survives.
    let with_new_route = base.clone().route(
        r#"path = "/api/new"
methods = ["GET"]
backend_path = "/new"
public = true"#,
    );
    std::fs::write(&config_path, with_new_route.toml(listen)).unwrap();
    send_signal(&child, "-HUP");
    wait_until("new route after SIGHUP", || async {
        Req::new(listen, "GET", "/api/new")
            .api_key(IOS_KEY)
            .send()
            .await
            .status
            == 200
    })
    .await;
    let private = Req::new(listen, "GET", "/api/profile")
        .api_key(IOS_KEY)
        .token(TOKEN)
        .send()
        .await;
    assert_eq!(private.status, 200);
    assert_eq!(backend.count("/renew_session"), 1, "session lost on reload");

    // An invalid config is refused and the running one keeps serving.
    std::fs::write(&config_path, "[server]\nlisten = \"nope\"\nbogus = 1\n").unwrap();
    send_signal(&child, "-HUP");
    wait_until("reload refusal logged", || {
        let path = stderr_path.clone();
        async move {
            std::fs::read_to_string(&path)
                .map(|t| t.contains("reload refused"))
                .unwrap_or(false)
        }
    })
    .await;
    let still = Req::new(listen, "GET", "/api/new")
        .api_key(IOS_KEY)
        .send()
        .await;
    assert_eq!(still.status, 200);

    // Readiness follows the backend.
    backend.stop();
    wait_until("readyz 503 with backend down", || async {
        http_get(admin, "/readyz").await.0 == 503
    })
    .await;
    let stderr = std::fs::read_to_string(&stderr_path).unwrap();
    assert!(!stderr.contains(TOKEN) && !stderr.contains(IOS_KEY));
    drop(child);
}
