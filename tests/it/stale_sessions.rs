//! `sessions.stale_if_error`: a recently valid token keeps working while the
//! validation service fails; a refused token never does.

use crate::support::*;
use std::time::Duration;

#[tokio::test]
async fn recently_valid_tokens_survive_a_validation_outage() {
    let backend = Backend::start().await;
    let gw = GatewayConfig::new(backend.url())
        .sessions("max_ttl = \"200ms\"")
        .sessions("negative_ttl = \"100ms\"")
        .sessions("stale_if_error = \"5s\"")
        .start()
        .await;
    backend.on_fn("/renew_session", |r| {
        if r.header("user-token") == Some("refused-token") {
            Reply::status(403)
        } else {
            Reply::json(200, serde_json::json!({}))
        }
    });
    let call = |token: &'static str| gw.get("/api/profile").token(token).send();
    assert_eq!(call("good-token").await.status, 200);
    call("refused-token")
        .await
        .assert_gateway_error(403, "Token invalid");
    assert_eq!(backend.count("/renew_session"), 2);

    // The validation service goes down; both cache entries go past freshness.
    backend.on("/renew_session", Reply::status(503));
    tokio::time::sleep(Duration::from_millis(350)).await;

    // The good token is revalidated, the service fails, the stale session serves.
    assert_eq!(call("good-token").await.status, 200);
    assert!(
        backend.count("/renew_session") >= 3,
        "revalidation was attempted"
    );
    // The refused one is never resurrected: the outage is a 502, not a 200.
    call("refused-token")
        .await
        .assert_gateway_error(502, "Unknown response format");
    gw.stop().await;
}

#[tokio::test]
async fn without_stale_if_error_an_outage_is_a_502() {
    let backend = Backend::start().await;
    let gw = GatewayConfig::new(backend.url())
        .sessions("max_ttl = \"200ms\"")
        .start()
        .await;
    assert_eq!(gw.get("/api/profile").token("t1").send().await.status, 200);
    backend.on("/renew_session", Reply::status(503));
    tokio::time::sleep(Duration::from_millis(300)).await;
    gw.get("/api/profile")
        .token("t1")
        .send()
        .await
        .assert_gateway_error(502, "Unknown response format");
    gw.stop().await;
}
