//! `/login` and `/logout`: the two endpoints the gateway answers itself
//! (with the backend's help), creating and ending cached sessions.

use super::forward::{backend_headers, request_body};
use super::identity::RequestCtx;
use super::request::{backend_answer, limited, read_limited, send, Info, MAX_ERROR_BODY};
use super::state::{DeviceKey, State};
use super::{header_str, MAX_LOGIN_ANSWER, USER_TOKEN};
use crate::body::Body;
use crate::envelope::GatewayError;
use crate::ratelimit;
use crate::sessions;
use crate::upstream::strip_hop_by_hop;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri};
use hyper::body::Incoming;
use std::time::Instant;

pub(super) async fn login(
    state: &State,
    req: Request<Incoming>,
    ctx: &RequestCtx,
    api_key: &DeviceKey,
    info: &mut Info,
) -> Result<Response<Body>, GatewayError> {
    if req.method() != Method::POST {
        return Err(GatewayError::MethodNotAllowed(vec![Method::POST]));
    }
    if header_str(req.headers(), &USER_TOKEN).is_some() {
        return Err(GatewayError::TokenOnPublic);
    }
    let mut deadline = Instant::now() + state.backend_timeout;
    let (mut parts, incoming) = req.into_parts();
    let body = request_body(
        &mut parts.headers,
        incoming,
        state.max_body,
        false,
        true,
        &mut deadline,
        state.config.limits.body_read_timeout,
    )
    .await?;
    if let Some(limit) = &state.rate_limits.login {
        // Attempts per (client address, login name): stops credential stuffing
        // against one account and password spraying from one address alike.
        let name = match &body {
            Body::Full(Some(bytes)) => login_name(bytes),
            _ => String::new(),
        };
        let key = (
            ratelimit::client_key(ctx.client_ip),
            ratelimit::login_key(&name, state.login_salt),
        );
        limited(state, limit, &key, "login")?;
    }
    // Credentials must be remembered for nothing but this one forward.
    parts.uri = Uri::try_from(state.config.sessions.login_path.as_str())
        .map_err(|_| GatewayError::BadBackendResponse)?;
    parts.version = http::Version::HTTP_11;
    backend_headers(state, &mut parts.headers, ctx, api_key, None);
    let sent = Instant::now();
    let resp = send(state, Request::from_parts(parts, body), deadline).await?;
    info.upstream = Some(sent.elapsed());
    if !resp.status().is_success() {
        return backend_answer(state, resp, ctx, deadline, state.backend_timeout).await;
    }
    let (mut parts, body) = resp.into_parts();
    let bytes = read_limited(body, MAX_LOGIN_ANSWER, deadline)
        .await
        .map_err(|_| GatewayError::BadBackendResponse)?;
    let json: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|_| GatewayError::BadBackendResponse)?;
    let token = json
        .get("user-token")
        .and_then(|t| t.as_str())
        .filter(|t| !t.is_empty() && HeaderValue::from_str(t).is_ok())
        .ok_or(GatewayError::BadBackendResponse)?;
    let user = json.get("response");
    let flag = |name: &str| user.and_then(|u| u.get(name)).and_then(|v| v.as_bool());
    let refused = if flag("is_active") == Some(false) {
        Some("User account is not active")
    } else if flag("is_staff") == Some(true) || flag("is_superuser") == Some(true) {
        Some("Staff and superuser accounts cannot log in through the gateway")
    } else {
        None
    };
    if let Some(why) = refused {
        // The backend has issued a session nobody will use: end it there
        // before answering; it is never cached here.
        Box::pin(backend_logout(state, ctx, api_key, token)).await;
        return Err(GatewayError::Forbidden(why));
    }
    let expires = json
        .get("expiration-date")
        .and_then(|d| d.as_str())
        .and_then(sessions::parse_expiration);
    if !state.sessions.insert_login(token, expires).await {
        return Err(GatewayError::BadBackendResponse);
    }
    strip_hop_by_hop(&mut parts.headers);
    parts.headers.remove(header::CONTENT_LENGTH);
    Ok(Response::from_parts(parts, Body::full(bytes)))
}

/// The login name in a `/login` body (`email`, `username` or `login`).
fn login_name(body: &[u8]) -> String {
    let json: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    ["email", "username", "login"]
        .iter()
        .find_map(|k| json.get(*k).and_then(|v| v.as_str()))
        .unwrap_or_default()
        .to_owned()
}

pub(super) async fn logout(
    state: &State,
    req: Request<Incoming>,
    ctx: &RequestCtx,
    api_key: &DeviceKey,
) -> Result<Response<Body>, GatewayError> {
    if req.method() != Method::POST {
        return Err(GatewayError::MethodNotAllowed(vec![Method::POST]));
    }
    let token = header_str(req.headers(), &USER_TOKEN)
        .ok_or(GatewayError::TokenRequired)?
        .to_owned();
    state.sessions.evict(&token).await;
    backend_logout(state, ctx, api_key, &token).await;
    let mut resp = Response::new(Body::Empty);
    *resp.status_mut() = StatusCode::NO_CONTENT;
    Ok(resp)
}

/// Ends `token`'s session at the backend (`sessions.logout_path`, when
/// configured), within `backend.timeout`. A failure is logged, never the
/// token.
async fn backend_logout(state: &State, ctx: &RequestCtx, api_key: &DeviceKey, token: &str) {
    let Some(path) = &state.config.sessions.logout_path else {
        return;
    };
    let Ok(uri) = Uri::try_from(path.as_str()) else {
        tracing::warn!(
            request_id = ctx.id(),
            "sessions.logout_path is not a valid path"
        );
        return;
    };
    let mut fwd = Request::new(Body::Empty);
    *fwd.method_mut() = Method::POST;
    *fwd.uri_mut() = uri;
    backend_headers(state, fwd.headers_mut(), ctx, api_key, Some(token));
    fwd.headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
    let deadline = Instant::now() + state.backend_timeout;
    match send(state, fwd, deadline).await {
        Ok(resp) => {
            // Drain so the connection can be reused.
            let _ = read_limited(resp.into_body(), MAX_ERROR_BODY, deadline).await;
        }
        Err(e) => {
            tracing::warn!(request_id = ctx.id(), error = %e, "backend logout failed; session ended here anyway")
        }
    }
}
