//! Sessions: /login, /logout, validation with single flight, negative
//! caching, rotation, eviction on backend 401/403.

use crate::support::*;
use serde_json::json;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A login service issuing `token` for whatever user `response` describes.
fn login_reply(token: &str, user: serde_json::Value) -> Reply {
    Reply::json(
        200,
        json!({
            "user-token": token,
            "expiration-date": expiration_in(Duration::from_secs(3600)),
            "response": user,
        }),
    )
}

fn active_user() -> serde_json::Value {
    json!({"email": "ana@example.com", "name": "Ana", "is_active": true, "is_staff": false, "is_superuser": false})
}

#[tokio::test]
async fn login_private_call_logout_then_token_refused() {
    let backend = Backend::start().await;
    backend.on("/login", login_reply("tok-ana-1", active_user()));
    backend.on(
        "/renew_session",
        Reply::json(
            403,
            json!({"error": {"code": 403, "type": "SessionError", "message": "gone"}}),
        ),
    );
    backend.on(
        "/profile",
        Reply::json(200, json!({"email": "ana@example.com"})),
    );
    let gw = GatewayConfig::new(backend.url())
        .sessions("logout_path = \"/logout\"")
        .start()
        .await;

    let creds = json!({"email": "ana@example.com", "password": "s3cret"});
    let r = gw.post("/login").json(creds.clone()).send().await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("server"), Some("portcullis"));
    let body = r.json();
    assert_eq!(body["user-token"], "tok-ana-1");
    assert_eq!(body["response"]["email"], "ana@example.com");
    // The credentials reached the login service as sent, with the gateway's headers.
    let login = backend.last("/login");
    assert_eq!(login.method, "POST");
    assert_eq!(login.json(), creds);
    assert_eq!(login.header("api-key"), Some(BACKEND_CREDENTIAL));
    assert_eq!(login.header("api-client"), Some("ios-app"));

    // Private call: served from the cache, no validation call.
    gw.assert_served("/api/profile", "tok-ana-1", 1).await;
    assert_eq!(backend.count("/renew_session"), 0);
    assert_eq!(
        backend.last("/profile").header("user-token"),
        Some("tok-ana-1")
    );

    // Logout: 204, forwarded to the logout service with the token.
    let r = gw.post("/logout").token("tok-ana-1").send().await;
    assert_eq!(r.status, 204, "{}", r.text());
    assert!(r.body.is_empty());
    assert_eq!(
        backend.last("/logout").header("user-token"),
        Some("tok-ana-1")
    );

    // Same token: no longer cached; the backend refuses it → 403 Token invalid.
    let r = gw.get("/api/profile").token("tok-ana-1").send().await;
    r.assert_gateway_error(403, "Token invalid");
    assert_eq!(backend.count("/renew_session"), 1);
    assert_eq!(backend.count("/profile"), 1);
    gw.stop().await;
}

#[tokio::test]
async fn logout_without_token_is_400_and_needs_an_api_key() {
    let backend = Backend::start().await;
    let gw = Gateway::for_backend(&backend).await;
    let r = gw.post("/logout").send().await;
    r.assert_gateway_error(400, "A private service requires a user token");
    let r = gw.req("POST", "/logout").token("t").send().await;
    r.assert_gateway_error(403, "Received API KEY not found in server API KEYS set");
    let r = gw.get("/login").send().await;
    r.assert_method_not_allowed("POST");
    assert!(backend.requests().is_empty(), "{:?}", backend.paths());
    gw.stop().await;
}

#[tokio::test]
async fn inactive_staff_and_superuser_are_refused_at_login() {
    let backend = Backend::start().await;
    let gw = Gateway::for_backend(&backend).await;
    let cases = [
        ("tok-inactive", json!({"email": "a@x", "is_active": false})),
        (
            "tok-staff",
            json!({"email": "b@x", "is_active": true, "is_staff": true}),
        ),
        (
            "tok-super",
            json!({"email": "c@x", "is_active": true, "is_superuser": true}),
        ),
    ];
    for (token, user) in cases {
        backend.on("/login", login_reply(token, user.clone()));
        let r = gw
            .post("/login")
            .json(json!({"email": "x", "password": "y"}))
            .send()
            .await;
        let (kind, _) = r.assert_envelope(403);
        assert_eq!(kind, "ProxyServerError");
        assert!(
            !r.text().contains(token),
            "refused login must not hand out the token"
        );

        // The refused token was not cached: using it goes to the validation service.
        backend.on("/renew_session", Reply::status(403));
        let before = backend.count("/renew_session");
        let r = gw.get("/api/profile").token(token).send().await;
        r.assert_gateway_error(403, "Token invalid");
        assert_eq!(backend.count("/renew_session"), before + 1, "{user}");
    }
    assert_eq!(backend.count("/profile"), 0);
    gw.stop().await;
}

/// A backend that keeps sessions: `/login` opens one, `/logout` ends the
/// one named by `user-token`, `/renew_session` accepts only open ones.
fn session_keeping_backend(backend: &Backend, token: &'static str, user: serde_json::Value) {
    let open = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let o = Arc::clone(&open);
    backend.on_fn("/login", move |_| {
        o.lock().unwrap().push(token.to_owned());
        login_reply(token, user.clone())
    });
    let o = Arc::clone(&open);
    backend.on_fn("/logout", move |r| {
        let t = r.header("user-token").unwrap_or_default().to_owned();
        o.lock().unwrap().retain(|open| *open != t);
        Reply::status(204)
    });
    backend.on_fn("/renew_session", move |r| {
        let t = r.header("user-token").unwrap_or_default();
        if open.lock().unwrap().iter().any(|o| o == t) {
            renewal(Duration::from_secs(3600))
        } else {
            Reply::status(403)
        }
    });
}

#[tokio::test]
async fn refused_login_ends_the_backend_session() {
    for (token, user) in [
        (
            "tok-inactive-2",
            json!({"email": "a@x", "is_active": false}),
        ),
        (
            "tok-staff-2",
            json!({"email": "b@x", "is_active": true, "is_staff": true}),
        ),
    ] {
        let backend = Backend::start().await;
        session_keeping_backend(&backend, token, user);
        backend.on("/profile", Reply::json(200, json!({"email": "x"})));
        let gw = GatewayConfig::new(backend.url())
            .sessions("logout_path = \"/logout\"")
            .start()
            .await;
        let r = gw
            .req("POST", "/login")
            .api_key(IOS_KEY)
            .json(json!({"email": "x", "password": "y"}))
            .send()
            .await;
        r.assert_envelope(403);
        assert!(!r.text().contains(token));
        // Ended at the backend before the 403 was sent, with that token.
        assert_eq!(backend.count("/logout"), 1);
        assert_eq!(backend.last("/logout").header("user-token"), Some(token));
        // Nobody can use it: not cached here, and gone at the backend.
        let r = gw.get("/api/profile").token(token).send().await;
        r.assert_gateway_error(403, "Token invalid");
        assert_eq!(backend.count("/profile"), 0);
        gw.stop().await;
    }
}

#[tokio::test]
async fn login_failure_from_backend_is_an_envelope() {
    let backend = Backend::start().await;
    backend.on(
        "/login",
        Reply::json(
            401,
            json!({"error": {"code": 401, "type": "AuthenticationFailed", "message": "Invalid email or password"}}),
        ),
    );
    let gw = Gateway::for_backend(&backend).await;
    let r = gw
        .post("/login")
        .json(json!({"email": "x", "password": "bad"}))
        .send()
        .await;
    let (kind, msg) = r.assert_envelope(401);
    assert_eq!(kind, "AuthenticationFailed");
    assert_eq!(msg, "Invalid email or password");
    gw.stop().await;
}

#[tokio::test]
async fn custom_login_path_is_used() {
    let backend = Backend::start().await;
    backend.on("/accounts/signin", login_reply("tok-x", active_user()));
    let gw = GatewayConfig::new(backend.url())
        .sessions("login_path = \"/accounts/signin\"")
        .start()
        .await;
    let r = gw
        .post("/login")
        .json(json!({"email": "x", "password": "y"}))
        .send()
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["user-token"], "tok-x");
    assert_eq!(backend.count("/accounts/signin"), 1);
    assert_eq!(backend.count("/login"), 0);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_unknown_token_is_validated_once() {
    let backend = Backend::start().await;
    backend.on(
        "/renew_session",
        renewal(Duration::from_secs(600)).delay(Duration::from_millis(200)),
    );
    // 200 backend connections open at once on a busy 2-core test machine:
    // give connects the production default rather than the tests' 300ms.
    let gw = GatewayConfig::new(backend.url())
        .backend("connect_timeout = \"5s\"")
        .start()
        .await;
    let mut tasks = Vec::new();
    for _ in 0..200 {
        let req = gw.get("/api/profile").token("same-unknown-token");
        tasks.push(tokio::spawn(async move { req.send().await.status }));
    }
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.unwrap());
    }
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert_eq!(backend.count("/renew_session"), 1, "single flight");
    assert_eq!(backend.count("/profile"), 200);
    let v = backend.last("/renew_session");
    assert_eq!(v.method, "POST");
    assert_eq!(v.header("user-token"), Some("same-unknown-token"));
    assert_eq!(v.header("api-key"), Some(BACKEND_CREDENTIAL));
    gw.stop().await;
}

#[tokio::test]
async fn refused_token_is_remembered_for_negative_ttl() {
    let backend = Backend::start().await;
    backend.on("/renew_session", Reply::status(401));
    let gw = GatewayConfig::new(backend.url())
        .sessions("negative_ttl = \"400ms\"")
        .start()
        .await;
    let r = gw.get("/api/profile").token("bad-token").send().await;
    r.assert_gateway_error(403, "Token invalid");
    let r = gw.get("/api/profile").token("bad-token").send().await;
    r.assert_gateway_error(403, "Token invalid");
    assert_eq!(
        backend.count("/renew_session"),
        1,
        "second refusal from cache"
    );

    // After negative_ttl the token is asked about again.
    tokio::time::sleep(Duration::from_millis(600)).await;
    backend.on("/renew_session", Reply::json(200, json!({})));
    gw.assert_served("/api/profile", "bad-token", 1).await;
    assert_eq!(backend.count("/renew_session"), 2);
    gw.stop().await;
}

#[tokio::test]
async fn validated_token_is_cached_and_validation_errors_are_not() {
    let backend = Backend::start().await;
    let calls = Arc::new(AtomicUsize::new(0));
    let c = Arc::clone(&calls);
    backend.on_fn("/renew_session", move |_| {
        if c.fetch_add(1, Ordering::SeqCst) == 0 {
            Reply::html(500, "<html>down</html>")
        } else {
            renewal(Duration::from_secs(600))
        }
    });
    let gw = Gateway::for_backend(&backend).await;
    // A broken validation service is a 502, and nothing is cached.
    let r = gw.get("/api/profile").token("t1").send().await;
    let (kind, _) = r.assert_envelope(502);
    assert_eq!(kind, "ProxyServerError");
    gw.assert_served("/api/profile", "t1", 3).await;
    assert_eq!(backend.count("/renew_session"), 2);
    gw.stop().await;
}

#[tokio::test]
async fn expired_expiration_date_is_token_invalid() {
    let backend = Backend::start().await;
    backend.on(
        "/renew_session",
        Reply::json(200, json!({"expiration-date": "2001-01-01 00:00:00"})),
    );
    let gw = Gateway::for_backend(&backend).await;
    let r = gw.get("/api/profile").token("old").send().await;
    r.assert_gateway_error(403, "Token invalid");
    assert_eq!(backend.count("/profile"), 0);
    gw.stop().await;
}

#[tokio::test]
async fn rotation_by_validation_service_reaches_backend_and_device() {
    let backend = Backend::start().await;
    backend.on(
        "/renew_session",
        Reply::json(
            200,
            json!({"user-token": "tok-new", "expiration-date": expiration_in(Duration::from_secs(600))}),
        ),
    );
    let gw = Gateway::for_backend(&backend).await;
    let r = gw.get("/api/profile").token("tok-old").send().await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("user-token"), Some("tok-new"));
    assert_eq!(
        backend.last("/profile").header_all("user-token"),
        ["tok-new"]
    );

    // The old token keeps forwarding the new one without a new validation.
    let r = gw.get("/api/profile").token("tok-old").send().await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("user-token"), Some("tok-new"));
    assert_eq!(
        backend.last("/profile").header("user-token"),
        Some("tok-new")
    );
    // The new token is a valid session of its own, no header needed.
    let r = gw.get("/api/profile").token("tok-new").send().await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("user-token"), None);
    assert_eq!(backend.count("/renew_session"), 1);
    gw.stop().await;
}

#[tokio::test]
async fn rotation_by_backend_answer_is_followed() {
    let backend = Backend::start().await;
    backend.on("/login", login_reply("tok-a", active_user()));
    backend.on("/renew_session", Reply::status(403));
    backend.on(
        "/profile",
        Reply::json(200, json!({"ok": true})).header("user-token", "tok-b"),
    );
    let gw = Gateway::for_backend(&backend).await;
    let r = gw
        .post("/login")
        .json(json!({"email": "x", "password": "y"}))
        .send()
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = gw.get("/api/profile").token("tok-a").send().await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("user-token"), Some("tok-b"));

    // The new token is now a cached session.
    backend.on("/profile", Reply::json(200, json!({"ok": true})));
    gw.assert_served("/api/profile", "tok-b", 1).await;
    assert_eq!(backend.last("/profile").header("user-token"), Some("tok-b"));
    // And the old one forwards the new one.
    let r = gw.get("/api/profile").token("tok-a").send().await;
    assert_eq!(r.status, 200);
    assert_eq!(backend.last("/profile").header("user-token"), Some("tok-b"));
    assert_eq!(r.header("user-token"), Some("tok-b"));
    assert_eq!(backend.count("/renew_session"), 0);
    gw.stop().await;
}

#[tokio::test]
async fn backend_401_or_403_on_private_route_evicts_the_token() {
    for status in [401u16, 403] {
        let backend = Backend::start().await;
        backend.on("/login", login_reply("tok-e", active_user()));
        backend.on("/renew_session", renewal(Duration::from_secs(600)));
        let gw = Gateway::for_backend(&backend).await;
        let r = gw
            .post("/login")
            .json(json!({"email": "x", "password": "y"}))
            .send()
            .await;
        assert_eq!(r.status, 200);
        gw.assert_served("/api/profile", "tok-e", 1).await;
        assert_eq!(backend.count("/renew_session"), 0, "cached by login");

        backend.on(
            "/profile",
            Reply::json(
                status,
                json!({"error": {"code": status, "type": "PermissionDenied", "message": "no"}}),
            ),
        );
        let r = gw.get("/api/profile").token("tok-e").send().await;
        let (kind, msg) = r.assert_envelope(status);
        assert_eq!((kind.as_str(), msg.as_str()), ("PermissionDenied", "no"));

        // Evicted: the next request validates again.
        backend.on("/profile", Reply::json(200, json!({})));
        gw.assert_served("/api/profile", "tok-e", 1).await;
        assert_eq!(
            backend.count("/renew_session"),
            1,
            "re-validated after {status}"
        );
        gw.stop().await;
    }
}

#[tokio::test]
async fn backend_403_on_public_route_does_not_touch_sessions() {
    let backend = Backend::start().await;
    backend.on("/status", Reply::status(403));
    let gw = Gateway::for_backend(&backend).await;
    let r = gw.get("/api/status").send().await;
    let (kind, msg) = r.assert_envelope(403);
    assert_eq!(kind, "BackendError");
    assert_eq!(msg, "Forbidden");
    gw.stop().await;
}

#[tokio::test]
async fn max_ttl_caps_the_returned_expiration() {
    let backend = Backend::start().await;
    backend.on("/renew_session", renewal(Duration::from_secs(3600)));
    let gw = GatewayConfig::new(backend.url())
        .sessions("max_ttl = \"300ms\"")
        .start()
        .await;
    gw.assert_served("/api/profile", "t-cap", 2).await;
    assert_eq!(backend.count("/renew_session"), 1, "cached within max_ttl");
    tokio::time::sleep(Duration::from_millis(450)).await;
    gw.assert_served("/api/profile", "t-cap", 1).await;
    assert_eq!(
        backend.count("/renew_session"),
        2,
        "re-validated after max_ttl"
    );
    gw.stop().await;
}

#[tokio::test]
async fn rfc3339_expiration_is_accepted() {
    let backend = Backend::start().await;
    let in_an_hour =
        humantime::format_rfc3339_seconds(std::time::SystemTime::now() + Duration::from_secs(3600))
            .to_string();
    backend.on(
        "/renew_session",
        Reply::json(200, json!({"expiration-date": in_an_hour})),
    );
    let gw = Gateway::for_backend(&backend).await;
    gw.assert_served("/api/profile", "t-rfc", 3).await;
    assert_eq!(backend.count("/renew_session"), 1);
    gw.stop().await;
}

#[tokio::test]
async fn stale_if_error_serves_recent_sessions_but_never_refused_tokens() {
    let backend = Backend::start().await;
    backend.on("/renew_session", Reply::json(200, json!({})));
    let gw = GatewayConfig::new(backend.url())
        .sessions("max_ttl = \"200ms\"")
        .sessions("stale_if_error = \"10s\"")
        .sessions("negative_ttl = \"200ms\"")
        .start()
        .await;
    gw.assert_served("/api/profile", "t-good", 1).await;
    backend.on("/renew_session", Reply::status(403));
    let r = gw.get("/api/profile").token("t-bad").send().await;
    r.assert_gateway_error(403, "Token invalid");

    // The validation service goes down; freshness has passed for both.
    backend.on("/renew_session", Reply::html(503, "<h1>down</h1>"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = backend.count("/renew_session");
    let r = gw.get("/api/profile").token("t-good").send().await;
    assert_eq!(r.status, 200, "recently valid session kept: {}", r.text());
    assert_eq!(
        backend.count("/renew_session"),
        before + 1,
        "it tried to revalidate"
    );
    let r = gw.get("/api/profile").token("t-bad").send().await;
    assert_ne!(r.status, 200, "a refused token is never served stale");
    r.assert_envelope(r.status);
    let r = gw.get("/api/profile").token("t-never-seen").send().await;
    r.assert_envelope(502);
    gw.stop().await;
}

#[tokio::test]
async fn logout_of_a_rotated_token_ends_both() {
    let backend = Backend::start().await;
    backend.on(
        "/renew_session",
        Reply::json(200, json!({"user-token": "tok-r2"})),
    );
    let gw = Gateway::for_backend(&backend).await;
    let r = gw.get("/api/profile").token("tok-r1").send().await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("user-token"), Some("tok-r2"));
    let r = gw.post("/logout").token("tok-r1").send().await;
    assert_eq!(r.status, 204);
    // Without a logout_path nothing is forwarded.
    assert_eq!(backend.count("/logout"), 0);
    backend.on("/renew_session", Reply::status(401));
    for t in ["tok-r1", "tok-r2"] {
        let r = gw.get("/api/profile").token(t).send().await;
        r.assert_gateway_error(403, "Token invalid");
    }
    assert_eq!(backend.count("/renew_session"), 3);
    gw.stop().await;
}

#[tokio::test]
async fn unusable_login_answers_are_502_without_leaking_them() {
    let backend = Backend::start().await;
    let gw = Gateway::for_backend(&backend).await;
    let cases = [
        Reply::html(200, "<html>Welcome, internal-host-7</html>"),
        Reply::json(200, json!({"response": {"email": "x"}})),
        Reply::json(200, json!({"user-token": "", "response": {}})),
        Reply::json(200, json!({"user-token": "bad\ntoken"})),
        Reply::status(204),
    ];
    for reply in cases {
        backend.on("/login", reply);
        let r = gw
            .post("/login")
            .json(json!({"email": "x", "password": "y"}))
            .send()
            .await;
        r.assert_gateway_error(502, "Unknown response format");
        assert!(!r.text().contains("internal-host"));
    }
    // A login body that is not JSON never reaches the login service.
    let before = backend.count("/login");
    let r = gw.post("/login").body("email=x&password=y").send().await;
    r.assert_envelope(400);
    assert_eq!(backend.count("/login"), before);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_share_a_failed_validation_and_nothing_is_cached() {
    let backend = Backend::start().await;
    backend.on(
        "/renew_session",
        Reply::html(500, "<h1>boom</h1>").delay(Duration::from_millis(200)),
    );
    let gw = GatewayConfig::new(backend.url())
        .backend("connect_timeout = \"5s\"")
        .start()
        .await;
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let req = gw.get("/api/profile").token("tok-flaky");
        tasks.push(tokio::spawn(async move { req.send().await }));
    }
    for t in tasks {
        let r = t.await.unwrap();
        r.assert_envelope(502);
        assert!(!r.text().contains("boom"));
    }
    assert_eq!(
        backend.count("/renew_session"),
        1,
        "single flight on failure too"
    );
    assert_eq!(backend.count("/profile"), 0);

    backend.on("/renew_session", Reply::json(200, json!({})));
    let r = gw.get("/api/profile").token("tok-flaky").send().await;
    assert_eq!(r.status, 200, "failure was not cached: {}", r.text());
    assert_eq!(backend.count("/renew_session"), 2);
    gw.stop().await;
}

/// A keep-alive connection remembers its last API key and session (so the
/// next request skips the hashing and the cache lookup), but never past a
/// logout elsewhere, a backend's 401, a different key or a different token.
#[tokio::test]
async fn keep_alive_connections_forget_ended_sessions() {
    let backend = Backend::start().await;
    backend.on("/renew_session", renewal(Duration::from_secs(600)));
    backend.on("/profile", Reply::json(200, json!({})));
    backend.on("/logout", Reply::status(204));
    let gw = GatewayConfig::new(backend.url())
        .sessions("logout_path = \"/logout\"")
        .start()
        .await;
    let mut conn = KeepAlive::open(gw.addr).await;
    let profile = |token: &str| gw.get("/api/profile").token(token);

    for _ in 0..3 {
        let r = profile("tok-k").send_on(&mut conn).await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    assert_eq!(backend.count("/renew_session"), 1, "validated once");
    assert_eq!(backend.connections(), 1, "one backend connection reused");
    let hits = gw.state.metrics().session_hits.get();
    assert!(hits >= 2, "memo hits count as cache hits: {hits}");

    // A wrong key on the same connection is refused; another valid key and
    // another token are checked in full (the token validated once more).
    let r = gw
        .req("GET", "/api/profile")
        .api_key("ios-key-0123456780")
        .token("tok-k")
        .send_on(&mut conn)
        .await;
    r.assert_gateway_error(403, "Received API KEY not found in server API KEYS set");
    let r = gw
        .req("GET", "/api/profile")
        .api_key(ANDROID_KEY)
        .token("tok-k")
        .send_on(&mut conn)
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        backend.last("/profile").header("api-client"),
        Some("android-app")
    );
    let r = profile("tok-other").send_on(&mut conn).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(backend.count("/renew_session"), 2);
    let r = profile("tok-k").send_on(&mut conn).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(backend.count("/renew_session"), 2, "tok-k still cached");

    // Logout on another connection ends the session on this one too.
    let r = gw.post("/logout").token("tok-k");
    assert_eq!(r.send().await.status, 204);
    backend.on("/renew_session", Reply::status(403));
    let r = profile("tok-k").send_on(&mut conn).await;
    r.assert_gateway_error(403, "Token invalid");
    assert_eq!(
        backend.count("/renew_session"),
        3,
        "asked again after logout"
    );

    // A backend 401 for the remembered token evicts it for this connection too.
    backend.on("/renew_session", renewal(Duration::from_secs(600)));
    let r = profile("tok-2").send_on(&mut conn).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(backend.count("/renew_session"), 4);
    backend.on("/profile", Reply::status(401));
    let r = profile("tok-2").send_on(&mut conn).await;
    assert_eq!(r.status, 401, "{}", r.text());
    backend.on("/profile", Reply::json(200, json!({})));
    let r = profile("tok-2").send_on(&mut conn).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        backend.count("/renew_session"),
        5,
        "re-validated after the 401"
    );
    gw.stop().await;
}
