//! Cluster mode over real sockets: one real `redis-server`, three compiled
//! gateway processes sharing it, one real HTTP test backend whose sessions
//! the test controls. What a user sees: a login on one instance works on the
//! others without a validation call, a logout or a backend refusal on one is
//! refused on all, one validation for a burst spread over the instances,
//! Redis never holds a token or readable user data, and a frozen Redis
//! neither stalls nor refuses requests.

use crate::support::cluster::*;
use crate::support::*;
use serde_json::json;
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub(crate) const EMAIL: &str = "ana.cluster@example.com";
const FULL_NAME: &str = "Ana Clusterova";

/// The backend's live sessions: a token in the set validates (200 with an
/// expiry an hour away) and may call `/profile`; any other is refused (403
/// on validation, 401 on `/profile`). `/logout` ends the caller's session,
/// `/login` opens `login_token`.
#[derive(Clone, Default)]
pub(crate) struct Accounts(Arc<Mutex<HashSet<String>>>);

impl Accounts {
    pub(crate) fn open(&self, token: &str) {
        self.0.lock().unwrap().insert(token.to_owned());
    }

    fn close(&self, token: &str) {
        self.0.lock().unwrap().remove(token);
    }

    fn alive(&self, r: &Recorded) -> bool {
        r.header("user-token")
            .is_some_and(|t| self.0.lock().unwrap().contains(t))
    }

    /// Scripts `backend` (validation answers wait `validation_delay`).
    pub(crate) fn serve(&self, backend: &Backend, login_token: &str, validation_delay: Duration) {
        let me = self.clone();
        backend.on_fn("/renew_session", move |r| {
            let reply = if me.alive(r) {
                renewal(Duration::from_secs(3600))
            } else {
                Reply::json(
                    403,
                    json!({"error": {"code": 403, "type": "SessionError", "message": "gone"}}),
                )
            };
            reply.delay(validation_delay)
        });
        let me = self.clone();
        backend.on_fn("/profile", move |r| {
            if me.alive(r) {
                Reply::json(200, json!({"email": EMAIL, "name": FULL_NAME}))
            } else {
                Reply::json(
                    401,
                    json!({"error": {"code": 401, "type": "SessionError", "message": "expired"}}),
                )
            }
        });
        let me = self.clone();
        backend.on_fn("/logout", move |r| {
            if let Some(t) = r.header("user-token") {
                me.close(t);
            }
            Reply::status(200)
        });
        let me = self.clone();
        let token = login_token.to_owned();
        backend.on_fn("/login", move |_| {
            me.open(&token);
            Reply::json(
                200,
                json!({
                    "user-token": token,
                    "expiration-date": expiration_in(Duration::from_secs(3600)),
                    "response": {"email": EMAIL, "name": FULL_NAME, "is_active": true,
                                 "is_staff": false, "is_superuser": false},
                }),
            )
        });
    }
}

/// Validation calls the backend received for `token`.
pub(crate) fn validations(backend: &Backend, token: &str) -> usize {
    backend
        .requests_to("/renew_session")
        .iter()
        .filter(|r| r.header("user-token") == Some(token))
        .count()
}

/// One cluster under test: its Redis, the backend and its sessions, and
/// three gateway processes (`gw-a`, `gw-b`, `gw-c`).
struct Cluster {
    redis: RedisServer,
    backend: Backend,
    accounts: Accounts,
    nodes: [Node; 3],
}

impl Cluster {
    /// Starts everything; the cluster is named `name`, `/login` opens
    /// `login_token`, validations take `validation_delay`, and
    /// `cluster_lines` go into every `[cluster]` table.
    async fn start(
        name: &str,
        login_token: &str,
        validation_delay: Duration,
        cluster_lines: &[&str],
    ) -> Cluster {
        Cluster::start_with(name, login_token, validation_delay, cluster_lines, "").await
    }

    /// [`Cluster::start`] with `extra_toml` appended to every configuration.
    async fn start_with(
        name: &str,
        login_token: &str,
        validation_delay: Duration,
        cluster_lines: &[&str],
        extra_toml: &str,
    ) -> Cluster {
        let redis = RedisServer::start().await;
        let backend = Backend::start().await;
        let accounts = Accounts::default();
        accounts.serve(&backend, login_token, validation_delay);
        let cfg = GatewayConfig::new(backend.url())
            .sessions("logout_path = \"/logout\"")
            .extra(extra_toml);
        let (a, b, c) = tokio::join!(
            Node::start(&cfg, &redis, name, "gw-a", cluster_lines),
            Node::start(&cfg, &redis, name, "gw-b", cluster_lines),
            Node::start(&cfg, &redis, name, "gw-c", cluster_lines),
        );
        Cluster {
            redis,
            backend,
            accounts,
            nodes: [a, b, c],
        }
    }
}

pub(crate) async fn login(node: &Node) -> String {
    let r = node
        .req("POST", "/login")
        .json(json!({"email": EMAIL, "password": "s3cret"}))
        .send()
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()["user-token"].as_str().expect("token").to_owned()
}

/// Waits (at most `bound`) until `node` refuses `token` with 403 on
/// `/api/profile`; returns how long that took.
pub(crate) async fn refused_within(node: &Node, token: &str, bound: Duration) -> Duration {
    refused_on_within(node, "/api/profile", token, bound).await
}

/// Waits until each of `nodes` has received one revocation from another
/// instance. Probing earlier races the message: a node that still holds the
/// session forwards the call, gets the backend's own 401 and validates the
/// token again, which is right but not what these tests count.
async fn revocation_arrived(nodes: &[&Node]) {
    for node in nodes {
        node.wait_metric("portcullis_cluster_revocation_lag_seconds_count", 1.0)
            .await;
    }
}

/// [`refused_within`] on a private route of `path`.
async fn refused_on_within(node: &Node, path: &str, token: &str, bound: Duration) -> Duration {
    let took = within(bound, || async {
        let r = node.get(path, token).send().await;
        match r.status {
            200 => false,
            _ => {
                r.assert_gateway_error(403, "Token invalid");
                true
            }
        }
    })
    .await;
    took.unwrap_or_else(|| panic!("{} still serves the token after {bound:?}", node.instance))
}

/// Asserts Redis holds only keys under `portcullis:<name>:` and that no key
/// or value contains any of `secrets`.
async fn assert_redis_holds_nothing_readable(redis: &RedisServer, name: &str, secrets: &[&str]) {
    let dump = redis.dump().await;
    assert!(!dump.is_empty(), "Redis holds nothing at all");
    let prefix = format!("portcullis:{name}:");
    for (key, value) in &dump {
        assert!(key.starts_with(&prefix), "key outside the namespace: {key}");
        for s in secrets {
            let needle = s.as_bytes();
            assert!(!key.contains(s), "{key} contains {s:?}");
            assert!(
                !value.windows(needle.len()).any(|w| w == needle),
                "the value of {key} contains {s:?}"
            );
            // Neither in hex nor lower-cased.
            let hexed = hex(needle);
            assert!(!key.contains(&hexed), "{key} contains {s:?} in hex");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_on_one_serves_on_all_and_logout_refuses_on_all() {
    let token = "tok-ana-cluster-7f3a9c";
    let Cluster {
        redis,
        backend,
        accounts: _accounts,
        nodes: [a, b, c],
    } = Cluster::start("login", token, Duration::ZERO, &[]).await;

    assert_eq!(login(&a).await, token);
    for node in [&b, &c, &a] {
        let r = node.get("/api/profile", token).send().await;
        assert_eq!(r.status, 200, "{}: {}", node.instance, r.text());
        assert_eq!(r.json()["email"], EMAIL);
    }
    assert_eq!(
        backend.count("/renew_session"),
        0,
        "B and C used the session A created without validating it"
    );
    assert_eq!(backend.count("/profile"), 3);
    let keys: Vec<String> = redis.dump().await.into_iter().map(|(k, _)| k).collect();
    assert!(
        keys.iter().any(|k| k.starts_with("portcullis:login:s:")),
        "no session record in Redis: {keys:?}"
    );
    assert_redis_holds_nothing_readable(&redis, "login", &[token, EMAIL, FULL_NAME, "Clusterova"])
        .await;

    let r = a.req("POST", "/logout").token(token).send().await;
    assert_eq!(r.status, 204, "{}", r.text());
    let logged_out = Instant::now();
    revocation_arrived(&[&b, &c]).await;
    let on_b = refused_within(&b, token, Duration::from_secs(2)).await;
    let on_c = refused_within(&c, token, Duration::from_secs(2)).await;
    eprintln!(
        "refused after logout: B {on_b:?}, C {on_c:?} ({:?} since the 204)",
        logged_out.elapsed()
    );
    refused_within(&a, token, Duration::ZERO).await;
    // B validated once and was refused; C and A learned the refusal from Redis.
    assert_eq!(validations(&backend, token), 1, "{:?}", backend.paths());
    for node in [&b, &c] {
        let seen = node
            .metric("portcullis_cluster_revocation_lag_seconds_count")
            .await;
        assert!(
            seen >= Some(1.0),
            "{}: revocation lag not measured: {seen:?}",
            node.instance
        );
    }
    assert_redis_holds_nothing_readable(&redis, "login", &[token, EMAIL, FULL_NAME]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_validation_for_a_burst_over_three_and_refusals_are_shared() {
    let Cluster {
        redis,
        backend,
        accounts,
        nodes,
    } = Cluster::start("burst", "unused", Duration::from_millis(300), &[]).await;
    let nodes = Arc::new(nodes);

    let good = "tok-burst-good-51c2";
    let bad = "tok-burst-bad-9e04";
    accounts.open(good);
    for (token, status) in [(good, 200), (bad, 403)] {
        let mut tasks = Vec::new();
        for i in 0..30 {
            let nodes = Arc::clone(&nodes);
            tasks.push(tokio::spawn(async move {
                let node = &nodes[i % 3];
                node.get("/api/profile", token).send().await.status
            }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap(), status, "{token}");
        }
        assert_eq!(
            validations(&backend, token),
            1,
            "30 concurrent requests over 3 instances, one validation call for {token}"
        );
    }

    // A refusal seen by A is known to B and C without asking the backend.
    let refused = "tok-refused-once-3b7d";
    let [a, b, c] = &*nodes;
    a.get("/api/profile", refused)
        .send()
        .await
        .assert_gateway_error(403, "Token invalid");
    for node in [b, c] {
        node.get("/api/profile", refused)
            .send()
            .await
            .assert_gateway_error(403, "Token invalid");
    }
    assert_eq!(validations(&backend, refused), 1);
    assert_redis_holds_nothing_readable(&redis, "burst", &[good, bad, refused]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_401_on_one_instance_evicts_on_all() {
    // Every part is bound: an unbound one would be dropped (stopped) here.
    let Cluster {
        redis: _redis,
        backend,
        accounts,
        nodes: [a, b, c],
    } = Cluster::start("evict", "unused", Duration::ZERO, &[]).await;
    let token = "tok-evicted-6d1e";
    accounts.open(token);
    for node in [&a, &b, &c] {
        assert_eq!(node.get("/api/profile", token).send().await.status, 200);
    }
    assert_eq!(validations(&backend, token), 1);

    // The backend ends the session on its own; A learns it from a 401.
    accounts.close(token);
    let r = a.get("/api/profile", token).send().await;
    assert_eq!(r.status, 401, "{}", r.text());
    revocation_arrived(&[&b, &c]).await;
    let on_b = refused_within(&b, token, Duration::from_secs(2)).await;
    let on_c = refused_within(&c, token, Duration::from_secs(2)).await;
    eprintln!("refused after the backend's 401: B {on_b:?}, C {on_c:?}");
    assert_eq!(validations(&backend, token), 2, "{:?}", backend.paths());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_redis_neither_stalls_nor_refuses_and_sharing_resumes() {
    let t1 = "tok-before-outage-11aa";
    let lines = ["timeout = \"200ms\"", "degraded_ttl = \"30s\""];
    let Cluster {
        mut redis,
        backend,
        accounts,
        nodes: [a, b, c],
    } = Cluster::start("outage", t1, Duration::ZERO, &lines).await;
    assert_eq!(login(&a).await, t1);
    assert_eq!(b.get("/api/profile", t1).send().await.status, 200);
    assert_eq!(validations(&backend, t1), 0);

    redis.pause();
    let t2 = "tok-during-outage-22bb";
    accounts.open(t2);
    let mut slowest = Duration::ZERO;
    let mut served = 0;
    // About two seconds of traffic while Redis does not answer: the cached
    // token, a token C never saw (validated with the backend), a new token.
    let outage = Instant::now();
    while outage.elapsed() < Duration::from_secs(2) {
        for (node, token) in [(&a, t1), (&b, t1), (&c, t1), (&b, t2)] {
            let start = Instant::now();
            let r = node.get("/api/profile", token).send().await;
            let took = start.elapsed();
            assert_eq!(r.status, 200, "{} {token}: {}", node.instance, r.text());
            slowest = slowest.max(took);
            served += 1;
        }
    }
    eprintln!("{served} requests served while Redis was frozen, slowest {slowest:?}");
    assert!(
        slowest < Duration::from_millis(2500),
        "a request waited {slowest:?} for a frozen Redis (deadline 200ms)"
    );
    assert!(
        validations(&backend, t1) >= 1,
        "C validated t1 with the backend"
    );
    for node in [&a, &b, &c] {
        node.wait_metric("portcullis_cluster_up", 0.0).await;
        let r = Req::new(node.admin, "GET", "/readyz").send().await;
        assert_eq!(r.status, 200, "{} not ready: {}", node.instance, r.text());
    }
    // A logout during the outage (B and C keep their cached copy, at most
    // degraded_ttl, until Redis is back).
    let r = a.req("POST", "/logout").token(t1).send().await;
    assert_eq!(r.status, 204, "{}", r.text());
    let t2_validations = validations(&backend, t2);
    assert!(t2_validations >= 1);

    redis.resume();
    for node in [&a, &b, &c] {
        node.wait_metric("portcullis_cluster_up", 1.0).await;
        assert_eq!(
            node.log_lines("cluster: Redis unavailable"),
            1,
            "{}: one line when the outage starts\n{}",
            node.instance,
            node.log()
        );
        assert_eq!(
            node.log_lines("cluster: Redis reachable again"),
            1,
            "{}: one line when it ends\n{}",
            node.instance,
            node.log()
        );
    }
    // B dropped its local sessions on reconnection: t2 (cached for 30 s, never
    // stored in Redis) is validated again, then shared with C.
    assert_eq!(b.get("/api/profile", t2).send().await.status, 200);
    assert_eq!(validations(&backend, t2), t2_validations + 1);
    assert_eq!(c.get("/api/profile", t2).send().await.status, 200);
    assert_eq!(validations(&backend, t2), t2_validations + 1);
    // The logout made during the outage now holds everywhere.
    for node in [&b, &c] {
        refused_within(node, t1, Duration::from_secs(2)).await;
    }
    assert_redis_holds_nothing_readable(&redis, "outage", &[t1, t2, EMAIL]).await;

    // Redis restarted empty: every instance notices, reconnects, drops its
    // local sessions and shares again.
    redis.restart().await;
    for node in [&a, &b, &c] {
        let back = within(Duration::from_secs(15), || async {
            node.log_lines("cluster: Redis reachable again") == 2
        })
        .await;
        assert!(
            back.is_some(),
            "{} did not reconnect\n{}",
            node.instance,
            node.log()
        );
        node.wait_metric("portcullis_cluster_up", 1.0).await;
    }
    let t3 = "tok-after-restart-33cc";
    accounts.open(t3);
    for node in [&c, &a, &b] {
        assert_eq!(node.get("/api/profile", t3).send().await.status, 200);
    }
    assert_eq!(
        validations(&backend, t3),
        1,
        "t3 validated once for the cluster"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_logout_during_an_outage_holds_everywhere_after_degraded_ttl() {
    let token = "tok-outage-logout-44dd";
    let lines = ["timeout = \"200ms\"", "degraded_ttl = \"1s\""];
    let Cluster {
        redis,
        backend: _backend,
        accounts: _accounts,
        nodes: [a, b, c],
    } = Cluster::start("late", token, Duration::ZERO, &lines).await;
    assert_eq!(login(&a).await, token);
    for node in [&b, &c] {
        assert_eq!(node.get("/api/profile", token).send().await.status, 200);
    }
    redis.pause();
    let r = a.req("POST", "/logout").token(token).send().await;
    assert_eq!(r.status, 204, "{}", r.text());
    // B and C cannot hear of it; their copies end within degraded_ttl (1 s),
    // then the validation service refuses the token. (`/orders` does not
    // check sessions itself, so only the gateway can refuse there.)
    for node in [&b, &c] {
        let took = refused_on_within(node, "/api/orders/1", token, Duration::from_secs(3)).await;
        eprintln!(
            "{} refused the token {took:?} after the logout",
            node.instance
        );
    }
    redis.resume();
}

/// Floods `nodes` with public GETs for `time` over `per_node` keep-alive
/// connections each (at most 10,000 requests per connection); returns
/// (admitted, refused with 429, elapsed).
async fn flood(nodes: &[&Node], per_node: usize, time: Duration) -> (usize, usize, Duration) {
    let start = Instant::now();
    let mut tasks = Vec::new();
    for node in nodes {
        for _ in 0..per_node {
            let addr = node.addr;
            tasks.push(tokio::spawn(async move {
                let mut conn = KeepAlive::open(addr).await;
                let (mut ok, mut limited) = (0, 0);
                for _ in 0..10_000 {
                    if start.elapsed() >= time {
                        break;
                    }
                    let r = Req::new(addr, "GET", "/api/status")
                        .api_key(IOS_KEY)
                        .send_on(&mut conn)
                        .await;
                    match r.status {
                        200 => ok += 1,
                        429 => {
                            assert!(r.header("retry-after").is_some());
                            limited += 1;
                        }
                        other => panic!("{other}: {}", r.text()),
                    }
                }
                (ok, limited)
            }));
        }
    }
    let (mut ok, mut limited) = (0, 0);
    for t in tasks {
        let (o, l) = t.await.unwrap();
        ok += o;
        limited += l;
    }
    (ok, limited, start.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limit_holds_for_the_cluster_and_splits_without_redis() {
    const RATE: f64 = 50.0;
    let Cluster {
        redis,
        backend: _backend,
        accounts: _accounts,
        nodes: [a, b, c],
    } = Cluster::start_with(
        "limits",
        "unused",
        Duration::ZERO,
        &["timeout = \"200ms\""],
        "[rate_limits]\nper_api_key = \"50/s\"",
    )
    .await;
    for node in [&a, &b, &c] {
        node.wait_metric("portcullis_cluster_instances", 3.0).await;
    }

    // Three instances, one limit: 50/s with a burst of 50 for the cluster.
    let (ok, limited, took) = flood(&[&a, &b, &c], 4, Duration::from_secs(2)).await;
    let secs = took.as_secs_f64();
    eprintln!(
        "cluster: {ok} admitted, {limited} refused in {took:?} (limit {RATE}/s + burst {RATE})"
    );
    assert!(
        (ok + limited) as f64 > 1.5 * (RATE * secs + RATE),
        "the test did not offer enough load to measure the limit: {}",
        ok + limited
    );
    assert!(
        (ok as f64) <= 1.1 * RATE * secs + RATE,
        "{ok} admitted in {secs:.2}s: more than 10% + one burst over {RATE}/s"
    );
    assert!(
        (ok as f64) >= 0.9 * RATE * secs,
        "{ok} admitted in {secs:.2}s: more than 10% under {RATE}/s"
    );
    assert_redis_holds_nothing_readable(&redis, "limits", &["ios-app", IOS_KEY, "127.0.0.1"]).await;

    // Redis frozen: each instance enforces a third of the limit on its own.
    redis.pause();
    for node in [&a, &b, &c] {
        node.wait_metric("portcullis_cluster_up", 0.0).await;
    }
    let (ok, limited, took) = flood(&[&a], 2, Duration::from_secs(2)).await;
    let share = RATE / 3.0;
    let secs = took.as_secs_f64();
    eprintln!(
        "degraded, one instance: {ok} admitted, {limited} refused in {took:?} (share {share:.1}/s)"
    );
    assert!(
        (ok as f64) <= 1.1 * share * secs + share,
        "{ok} admitted by one instance in {secs:.2}s, its share is {share:.1}/s"
    );
    assert!(
        (ok as f64) >= 0.9 * share * secs - share,
        "{ok} admitted by one instance in {secs:.2}s, its share is {share:.1}/s"
    );
    redis.resume();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_documented_redis_acl_is_all_the_gateways_need() {
    let redis = RedisServer::start().await;
    let mut admin = redis.connection().await;
    let backend = Backend::start().await;
    let accounts = Accounts::default();
    let token = "tok-acl-login-77ee";
    accounts.serve(&backend, token, Duration::from_millis(100));
    let cfg = GatewayConfig::new(backend.url())
        .sessions("logout_path = \"/logout\"")
        .extra("[rate_limits]\nper_api_key = \"1000/s\"");
    let url = redis.acl_url("acl").await;
    let (a, b) = tokio::join!(
        Node::start_url(&cfg, &url, "acl", "gw-a", &[]),
        Node::start_url(&cfg, &url, "acl", "gw-b", &[]),
    );
    // Sessions, single flight, rate limits, revocation: everything once.
    assert_eq!(login(&a).await, token);
    assert_eq!(b.get("/api/profile", token).send().await.status, 200);
    let fresh = "tok-acl-fresh-88ff";
    accounts.open(fresh);
    let (ra, rb) = tokio::join!(
        a.get("/api/profile", fresh).send(),
        b.get("/api/profile", fresh).send()
    );
    assert_eq!((ra.status, rb.status), (200, 200));
    assert_eq!(validations(&backend, fresh), 1);
    let r = a.req("POST", "/logout").token(token).send().await;
    assert_eq!(r.status, 204);
    refused_within(&b, token, Duration::from_secs(2)).await;

    let denied: Vec<redis::Value> = redis::cmd("ACL")
        .arg("LOG")
        .query_async(&mut admin)
        .await
        .expect("ACL LOG");
    assert!(denied.is_empty(), "Redis denied the gateways: {denied:?}");
    for node in [&a, &b] {
        assert_eq!(
            node.metric("portcullis_cluster_redis_errors_total").await,
            Some(0.0),
            "{}",
            node.log()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_on_one_instance_is_followed_by_all() {
    let Cluster {
        redis: _redis,
        backend,
        accounts,
        nodes: [a, b, c],
    } = Cluster::start("rotate", "unused", Duration::ZERO, &[]).await;
    let (old, new) = ("tok-rotate-old-1a2b", "tok-rotate-new-3c4d");
    accounts.open(old);
    for node in [&a, &b, &c] {
        assert_eq!(node.get("/api/profile", old).send().await.status, 200);
    }
    // The backend rotates the session on a call through A.
    let rotating = accounts.clone();
    backend.on_fn("/orders/1", move |r| {
        if r.header("user-token") == Some(old) {
            rotating.open(new);
        }
        Reply::json(200, json!({"id": 1})).header("user-token", new)
    });
    let r = a.get("/api/orders/1", old).send().await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("user-token"), Some(new));

    // B and C forward the old token's calls with the new token and hand it
    // to the device; the new token works everywhere without a validation.
    for node in [&b, &c] {
        let followed = within(Duration::from_secs(2), || async {
            let r = node.get("/api/profile", old).send().await;
            assert_eq!(r.status, 200, "{}", r.text());
            r.header("user-token") == Some(new)
        })
        .await;
        assert!(
            followed.is_some(),
            "{} did not follow the rotation",
            node.instance
        );
        assert_eq!(backend.last("/profile").header("user-token"), Some(new));
    }
    for node in [&c, &b, &a] {
        assert_eq!(node.get("/api/profile", new).send().await.status, 200);
    }
    assert_eq!(validations(&backend, new), 0);
    assert_eq!(validations(&backend, old), 1);
}
