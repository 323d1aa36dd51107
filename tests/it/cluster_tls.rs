//! Cluster mode over TLS to a real `redis-server` that speaks only TLS
//! (`--port 0 --tls-port`), with certificates from a private CA the test
//! makes. What a user sees: gateways trusting that CA (`cluster.ca`) share
//! sessions and revocations as over plain TCP; a gateway trusting another CA
//! never talks to that Redis, says so (`portcullis_cluster_up 0`, one log
//! line) and keeps serving devices; a Redis demanding client certificates
//! accepts the gateway that presents `cluster.client_cert`; `portcullis
//! check` reads and checks those files.

use crate::cluster::{login, refused_within, validations, Accounts, EMAIL};
use crate::support::cluster::*;
use crate::support::*;
use std::time::Duration;

/// The `[cluster]` line naming `path` as the CA.
fn ca_line(path: &std::path::Path) -> String {
    format!("ca = \"{}\"", path.display())
}

/// Waits (at most 15 s) until `node` logged that Redis is unavailable;
/// returns that line.
async fn wait_unavailable(node: &Node) -> String {
    let found = within(Duration::from_secs(15), || async {
        node.log_lines("cluster: Redis unavailable") > 0
    })
    .await;
    assert!(
        found.is_some(),
        "{} never said Redis was unavailable:\n{}",
        node.instance,
        node.log()
    );
    let log = node.log();
    let line = log
        .lines()
        .find(|l| l.contains("Redis unavailable"))
        .unwrap_or_default();
    eprintln!("{}: {line}", node.instance);
    line.to_owned()
}

/// A session key exists in Redis (read over TLS by the test itself).
async fn assert_session_in_redis(redis: &RedisServer, name: &str) {
    let keys: Vec<String> = redis.dump().await.into_iter().map(|(k, _)| k).collect();
    let prefix = format!("portcullis:{name}:s:");
    assert!(
        keys.iter().any(|k| k.starts_with(&prefix)),
        "no session record in Redis: {keys:?}"
    );
}

/// Asserts `node` serves `/api/profile` with `token` and that the backend has
/// now seen `validated` validation calls for it (`why` says what that shows).
async fn assert_serves(node: &Node, backend: &Backend, token: &str, validated: usize, why: &str) {
    let r = node.get("/api/profile", token).send().await;
    assert_eq!(r.status, 200, "{}: {}", node.instance, r.text());
    assert_eq!(r.json()["email"], EMAIL);
    assert_eq!(validations(backend, token), validated, "{why}");
}

/// A TLS-only Redis (demanding client certificates with `auth_clients`),
/// the backend whose `/login` opens `token`, and the gateway configuration.
async fn start(token: &str, auth_clients: bool) -> (RedisServer, Backend, Accounts, GatewayConfig) {
    let redis = RedisServer::start_tls(auth_clients).await;
    let backend = Backend::start().await;
    let accounts = Accounts::default();
    accounts.serve(&backend, token, Duration::ZERO);
    let cfg = GatewayConfig::new(backend.url()).sessions("logout_path = \"/logout\"");
    (redis, backend, accounts, cfg)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_share_sessions_over_tls_and_a_wrong_ca_degrades() {
    let token = "tok-tls-cluster-5d1e";
    let (redis, backend, accounts, cfg) = start(token, false).await;
    let ca = ca_line(&redis.tls().ca);
    let lines = [ca.as_str()];
    let (a, b) = tokio::join!(
        Node::start(&cfg, &redis, "tls", "gw-a", &lines),
        Node::start(&cfg, &redis, "tls", "gw-b", &lines),
    );

    assert_eq!(login(&a).await, token);
    let why = "B used the session A created without validating it";
    assert_serves(&b, &backend, token, 0, why).await;
    assert_session_in_redis(&redis, "tls").await;

    let r = a.req("POST", "/logout").token(token).send().await;
    assert_eq!(r.status, 204, "{}", r.text());
    let took = refused_within(&b, token, Duration::from_secs(2)).await;
    eprintln!("B refused the token {took:?} after the logout on A");

    // A third gateway trusting another CA: the handshake fails, so it runs
    // degraded and validates every token with the backend itself.
    let other_dir = tempfile::tempdir().unwrap();
    let other_ca = other_dir.path().join("other-ca.pem");
    let other = portcullis::devcerts::DevCa::new("not the redis CA").unwrap();
    std::fs::write(&other_ca, &other.ca.cert_pem).unwrap();
    let c = Node::spawn_url(&cfg, &redis.url(), "tls", "gw-c", &[&ca_line(&other_ca)]).await;
    let why = wait_unavailable(&c).await;
    assert!(
        why.contains("invalid peer certificate"),
        "the log does not say why: {why}"
    );
    // Still down after several reconnection attempts.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(c.metric("portcullis_cluster_up").await, Some(0.0));
    assert_eq!(
        c.metric("portcullis_cluster_shared_hits_total").await,
        Some(0.0)
    );
    let ready = Req::new(c.admin, "GET", "/readyz").send().await;
    assert_eq!(ready.status, 200, "{}", ready.text());

    let t2 = "tok-tls-degraded-8c2f";
    accounts.open(t2);
    assert_serves(
        &c,
        &backend,
        t2,
        1,
        "C validated the token with the backend",
    )
    .await;
    for node in [&a, &b] {
        assert_eq!(
            node.metric("portcullis_cluster_up").await,
            Some(1.0),
            "{}",
            node.instance
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_demanding_client_certificates_admits_the_gateway_that_has_one() {
    let token = "tok-mtls-cluster-93b0";
    let (redis, backend, _accounts, cfg) = start(token, true).await;
    let tls = redis.tls().clone();
    let ca = ca_line(&tls.ca);
    let cert = format!("client_cert = \"{}\"", tls.client_cert.display());
    let key = format!("client_key = \"{}\"", tls.client_key.display());

    let a = Node::start(&cfg, &redis, "mtls", "gw-a", &[&ca, &cert, &key]).await;
    assert_eq!(login(&a).await, token);
    assert_session_in_redis(&redis, "mtls").await;

    let b = Node::spawn_url(&cfg, &redis.url(), "mtls", "gw-b", &[&ca]).await;
    let why = wait_unavailable(&b).await;
    assert!(why.contains("CertificateRequired"), "{why}");
    assert_eq!(b.metric("portcullis_cluster_up").await, Some(0.0));
    let why = "B, without Redis, validated the token with the backend";
    assert_serves(&b, &backend, token, 1, why).await;
}

/// `portcullis check` of a gateway whose `[cluster]` uses `redis_url` and
/// `lines`: whether it accepted the file, and what it printed on stderr.
fn check(dir: &std::path::Path, redis_url: &str, lines: &[String]) -> (bool, String) {
    let mut table = format!(
        "[cluster]\nredis = \"{redis_url}\"\nname = \"prod\"\nsecret = \"{CLUSTER_SECRET}\"\ninstance = \"gw-1\"\n"
    );
    for l in lines {
        table.push_str(l);
        table.push('\n');
    }
    let text = GatewayConfig::new("http://127.0.0.1:9")
        .extra(&table)
        .toml(free_addr());
    let path = dir.join("portcullis.toml");
    std::fs::write(&path, text).unwrap();
    let out = check_with_secrets(&path);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!stderr.contains(CLUSTER_SECRET), "{stderr}");
    assert!(!stderr.contains("PRIVATE KEY"), "{stderr}");
    (out.status.success(), stderr)
}

#[test]
fn check_reads_the_redis_ca_and_client_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let ca = portcullis::devcerts::DevCa::new("redis CA").unwrap();
    let client = ca.issue_client("gateway").unwrap();
    let stranger = ca.issue_client("someone else").unwrap();
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    };
    let ca_pem = write("ca.pem", &ca.ca.cert_pem);
    let cert = write("client.pem", &client.cert_pem);
    let key = write("client.key", &client.key_pem);
    let wrong_key = write("stranger.key", &stranger.key_pem);
    let junk = write("junk.pem", "not a certificate\n");
    let tls = "rediss://redis.internal:6380/0";
    let line = |k: &str, v: &str| format!("{k} = \"{v}\"");

    let (ok, stderr) = check(
        dir.path(),
        tls,
        &[
            line("ca", &ca_pem),
            line("client_cert", &cert),
            line("client_key", &key),
        ],
    );
    assert!(ok, "{stderr}");

    for (url, lines, needles) in [
        (
            "redis://127.0.0.1:6379/0",
            vec![line("ca", &ca_pem)],
            vec!["cluster.ca", "rediss://"],
        ),
        (
            tls,
            vec![line("ca", &junk)],
            vec!["cluster.ca", "no CERTIFICATE found"],
        ),
        (
            tls,
            vec![line("ca", "/nonexistent/redis-ca.pem")],
            vec!["cluster.ca", "cannot read /nonexistent/redis-ca.pem"],
        ),
        (
            tls,
            vec![line("client_cert", &cert), line("client_key", &wrong_key)],
            vec!["cluster.client_cert", "does not match"],
        ),
        (
            tls,
            vec![line("client_cert", &cert)],
            vec!["cluster.client_cert", "go together"],
        ),
    ] {
        let (ok, stderr) = check(dir.path(), url, &lines);
        assert!(!ok, "check accepted {lines:?}");
        for n in needles {
            assert!(stderr.contains(n), "{lines:?}: {n:?} not in {stderr}");
        }
    }
}
