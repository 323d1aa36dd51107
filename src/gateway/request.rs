//! The request path: [`handle`] and `dispatch` read top to bottom, one check
//! after another (the list is in the module documentation of [`super`]).
//! Rare branches (login, logout, remote operations, session misses, buffered
//! bodies) are boxed so the common request future stays small.

use super::forward::{backend_headers, request_body, rewrite_query};
use super::identity::{context, Peer, RequestCtx};
use super::login::{login, logout};
use super::state::{DeviceKey, State};
use super::{header_str, value_str, API_KEY, MAX_LOGIN_ANSWER, USER_TOKEN, X_REQUEST_ID};
use crate::access_log::{LoggedBody, Pending};
use crate::body::{is_body_timeout, Body, BoxError, TimedBody};
use crate::envelope::{self, GatewayError};
use crate::metrics::RouteName;
use crate::ratelimit;
use crate::routes::{self, Match};
use crate::secret;
use crate::sessions::{self, CheckError, Session, Validation};
use crate::upstream::{strip_hop_by_hop, UpstreamError};
use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body::Body as _;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

/// Largest backend error body read for normalization; the rest is dropped.
pub(super) const MAX_ERROR_BODY: usize = 64 << 10;

/// Handles one device request. Never fails: every error is an envelope.
/// `guard` is held until the response (head) is ready.
pub async fn handle<G>(
    state: Arc<State>,
    req: Request<Incoming>,
    peer: Arc<Peer>,
    _guard: G,
) -> Response<Body> {
    let (state, peer) = (&*state, &*peer);
    let start = Instant::now();
    let ctx = context(state, req.headers(), peer, start);
    let method = req.method().clone();
    let log_path = state
        .access_log
        .enabled()
        .then(|| req.uri().path().to_owned());
    let mut info = Info::default();
    // Awaited through a pinned local: a plain `.await` would keep the
    // (large) future twice in this one's state (rustc lays out the awaited
    // temporary and the awaitee apart), doubling at every level.
    let mut resp = match std::pin::pin!(dispatch(state, req, &ctx, peer, &mut info)).await {
        Ok(resp) => resp,
        Err(err) => {
            if err.status().is_server_error() {
                tracing::warn!(request_id = ctx.id(), error = %err, "request failed");
            }
            envelope::gateway_error(&err, &state.error_type, ctx.id())
        }
    };
    let headers = resp.headers_mut();
    // Room for what is added below at once, rather than a regrowth midway.
    headers.reserve(if peer.tls { 4 } else { 2 });
    headers.insert(header::SERVER, state.server_header.clone());
    headers.insert(X_REQUEST_ID.clone(), ctx.request_id.clone());
    if peer.tls {
        crate::tls::add_security_headers(headers);
    }
    let route = info.route.unwrap_or_else(|| state.labels.unmatched.clone());
    let status = resp.status().as_u16();
    state
        .metrics
        .request(&route, &method, status, start.elapsed().as_secs_f64());
    match log_path {
        None => resp,
        Some(path) => {
            let pending = Pending {
                log: state.access_log.clone(),
                request_id: ctx.request_id,
                client: ctx.client_ip,
                api_client: info.api_client,
                route,
                method,
                path,
                status,
                start,
                upstream: info.upstream,
            };
            resp.map(|body| Body::boxed(LoggedBody::new(body, pending)))
        }
    }
}

/// What the request path learned, for metrics and the access log.
#[derive(Default)]
pub(super) struct Info {
    pub(super) route: Option<RouteName>,
    pub(super) api_client: Option<HeaderValue>,
    pub(super) upstream: Option<Duration>,
}

async fn dispatch(
    state: &State,
    req: Request<Incoming>,
    ctx: &RequestCtx,
    peer: &Peer,
    info: &mut Info,
) -> Result<Response<Body>, GatewayError> {
    if let Some(limit) = &state.rate_limits.per_client_ip {
        limited(
            state,
            limit,
            &ratelimit::client_key(ctx.client_ip),
            "client_ip",
        )?;
    }
    // RFC 9112 §3.2: an HTTP/1.1 request needs exactly one Host (hyper does
    // not check); ambiguous ones are refused rather than guessed at.
    if req.version() == http::Version::HTTP_11
        && req.headers().get_all(header::HOST).iter().count() != 1
    {
        return Err(GatewayError::BadRequest("Missing or repeated Host header"));
    }
    // CONNECT to a host (authority form) is never tunnelled; CONNECT to a
    // path goes through the checks below and gets the route's `Allow`.
    if req.method() == Method::CONNECT && !req.uri().path().starts_with('/') {
        return Err(GatewayError::MethodNotAllowed(Vec::new()));
    }
    let path = routes::normalize(req.uri().path())
        .map_err(|_| GatewayError::BadRequest("Invalid request path"))?;

    if path == "/__manage__" || path.starts_with("/__manage__/") {
        info.route = Some(state.labels.manage.clone());
        // commands: operator tokens only; device API keys never reach here.
        return match state.commands.get() {
            Some(commands) => Ok(Box::pin(commands.handle(req, ctx.client_ip, ctx.id())).await),
            None => Err(GatewayError::NotFound),
        };
    }

    // Header values are kept (a reference count, not a copy of the secret).
    let presented_key = req
        .headers()
        .get(&API_KEY)
        .cloned()
        .ok_or(GatewayError::ApiKey)?;
    let device_value = req.headers().get(&USER_TOKEN).cloned();
    let recalled = peer.recall(
        state,
        presented_key.as_bytes(),
        device_value.as_ref().map(HeaderValue::as_bytes),
    );
    let remembered_key = recalled
        .api_key
        .and_then(|i| Some((i, state.api_keys.get(i)?)));
    let (key_index, api_key) = match remembered_key {
        Some(found) => found,
        None => {
            let found = secret::find_match(
                state
                    .api_keys
                    .iter()
                    .enumerate()
                    .map(|(i, k)| (&k.matcher, (i, k))),
                presented_key.as_bytes(),
            )
            .ok_or(GatewayError::ApiKey)?;
            peer.remember(state, presented_key.as_bytes(), found.0, None);
            found
        }
    };
    info.api_client = Some(api_key.header_value.clone());
    if let Some(limit) = &state.rate_limits.per_api_key {
        limited(state, limit, &api_key.name, "api_key")?;
    }

    match &*path {
        "/login" => {
            info.route = Some(state.labels.login.clone());
            // Rare paths are boxed so the common request future stays small.
            return Box::pin(login(state, req, ctx, api_key, info)).await;
        }
        "/logout" => {
            info.route = Some(state.labels.logout.clone());
            return Box::pin(logout(state, req, ctx, api_key)).await;
        }
        _ => {}
    }

    let (route, params) = match state.router.lookup(&path, req.method()) {
        Match::Found(route, params) => (route, params),
        Match::MethodNotAllowed(route) => {
            info.route = Some(route.label.clone());
            return Err(GatewayError::MethodNotAllowed(route.allow.clone()));
        }
        Match::NotFound => return Err(GatewayError::NotFound),
    };
    info.route = Some(route.label.clone());
    if let Some(limit) = &route.rate_limit {
        limited(state, limit, &api_key.name, "route")?;
    }
    let cfg = &route.config;
    let mut deadline = ctx.start + cfg.timeout.unwrap_or(state.backend_timeout);

    let device_token = device_value.as_ref().and_then(value_str);
    let session = match (cfg.public, device_token) {
        (true, Some(_)) => return Err(GatewayError::TokenOnPublic),
        (false, None) => return Err(GatewayError::TokenRequired),
        (true, None) => None,
        (false, Some(token)) => Some(match recalled.session {
            Some(session) => {
                state.sessions.count_hit();
                session
            }
            None => {
                let generation = state.sessions.generation();
                let session = check_token(state, token, ctx, api_key).await?;
                peer.remember(
                    state,
                    presented_key.as_bytes(),
                    key_index,
                    Some((token.as_bytes(), generation, &session)),
                );
                session
            }
        }),
    };
    let forwarded_token: Option<&str> = match &session {
        Some(Session {
            rotated: Some(new), ..
        }) => Some(new),
        _ => device_token,
    };

    let uri = match (route.fixed_path(), req.uri().query()) {
        (Some(fixed), None) => Uri::from(fixed.clone()),
        (_, query) => {
            let mut path_and_query = route.backend_path(&params);
            if let Some(query) = query {
                let query = rewrite_query(state.keyring.as_ref(), &cfg.encrypt_query, query)?;
                if !query.is_empty() {
                    path_and_query.push('?');
                    path_and_query.push_str(&query);
                }
            }
            Uri::try_from(path_and_query)
                .map_err(|_| GatewayError::BadRequest("Invalid request path"))?
        }
    };

    let (mut parts, incoming) = req.into_parts();
    let limit = cfg.max_body.unwrap_or(state.max_body);
    let body = request_body(
        &mut parts.headers,
        incoming,
        limit,
        cfg.stream_request_body,
        cfg.json_body,
        &mut deadline,
        state.config.limits.body_read_timeout,
    )
    .await?;
    parts.uri = uri;
    parts.version = http::Version::HTTP_11;
    backend_headers(state, &mut parts.headers, ctx, api_key, forwarded_token);

    // A streamed upload takes one of the upload permits (half the backend
    // pool) until the backend answers; waiting counts against the deadline.
    let upload = match &body {
        Body::Boxed(_) | Body::Incoming(_) => Some(
            tokio::time::timeout_at(
                tokio::time::Instant::from_std(deadline),
                Arc::clone(&state.uploads).acquire_owned(),
            )
            .await
            .map_err(|_| GatewayError::Unavailable)?
            .map_err(|_| GatewayError::Unavailable)?,
        ),
        _ => None,
    };
    let sent = Instant::now();
    let resp = std::pin::pin!(send(state, Request::from_parts(parts, body), deadline)).await?;
    drop(upload);
    let took = sent.elapsed();
    info.upstream = Some(took);
    state.metrics.upstream(&route.label, took.as_secs_f64());
    let status = resp.status();
    if let (Some(device), false) = (device_token, cfg.public) {
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            Box::pin(state.sessions.evict(device)).await;
        } else if let Some(new) = header_str(resp.headers(), &USER_TOKEN) {
            if Some(new) != forwarded_token {
                let new = new.to_owned();
                Box::pin(state.sessions.rotate(device, &new)).await;
            }
        }
    }
    let idle = cfg.timeout.unwrap_or(state.backend_timeout);
    let mut resp = backend_answer(state, resp, ctx, deadline, idle).await?;
    if let (Some(new), Some(device)) = (forwarded_token, device_token) {
        if new != device && !resp.headers().contains_key(&USER_TOKEN) {
            if let Ok(v) = HeaderValue::from_str(new) {
                resp.headers_mut().insert(USER_TOKEN.clone(), v);
            }
        }
    }
    Ok(resp)
}

/// Applies one rate limit: 429 with `Retry-After` when exceeded.
pub(super) fn limited<K: std::hash::Hash + Eq + Clone>(
    state: &State,
    limit: &ratelimit::Limiter<K>,
    key: &K,
    kind: &'static str,
) -> Result<(), GatewayError> {
    limit.check(key).map_err(|wait| {
        state.metrics.rate_limited(kind);
        GatewayError::TooManyRequests {
            retry_after_secs: ratelimit::retry_after_secs(wait),
        }
    })
}

pub(super) async fn check_token(
    state: &State,
    token: &str,
    ctx: &RequestCtx,
    api_key: &DeviceKey,
) -> Result<Session, GatewayError> {
    let validate = || validate_remote(state, token, ctx, api_key);
    state
        .sessions
        .check(token, validate)
        .await
        .map_err(|e| match e {
            CheckError::Invalid => GatewayError::TokenInvalid,
            CheckError::Unreachable => GatewayError::BackendUnreachable,
            CheckError::Timeout => GatewayError::BackendTimeout,
            CheckError::BadResponse => GatewayError::BadBackendResponse,
        })
}

/// One call to the validation service (`sessions.validate_method/path`).
async fn validate_remote(
    state: &State,
    token: &str,
    ctx: &RequestCtx,
    api_key: &DeviceKey,
) -> Result<Validation, CheckError> {
    let cfg = &state.config.sessions;
    state.metrics.validation_calls.inc();
    let mut req = Request::new(Body::Empty);
    *req.method_mut() = cfg.validate_method.clone();
    *req.uri_mut() =
        Uri::try_from(cfg.validate_path.as_str()).map_err(|_| CheckError::BadResponse)?;
    backend_headers(state, req.headers_mut(), ctx, api_key, Some(token));
    if cfg.validate_method != Method::GET && cfg.validate_method != Method::HEAD {
        req.headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
    }
    let deadline = Instant::now() + state.backend_timeout;
    let resp = match send(state, req, deadline).await {
        Ok(r) => r,
        Err(GatewayError::BackendTimeout) => return Err(CheckError::Timeout),
        Err(_) => return Err(CheckError::Unreachable),
    };
    let status = resp.status();
    if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
        return Ok(Validation::Refused);
    }
    if !status.is_success() {
        tracing::warn!(request_id = ctx.id(), %status, "validation service answered an error");
        return Err(CheckError::BadResponse);
    }
    let header_token = header_str(resp.headers(), &USER_TOKEN).map(str::to_owned);
    let body = read_limited(resp.into_body(), MAX_LOGIN_ANSWER, deadline)
        .await
        .map_err(|_| CheckError::BadResponse)?;
    let json: Option<serde_json::Value> = serde_json::from_slice(&body).ok();
    let field = |name: &str| {
        json.as_ref()
            .and_then(|j| j.get(name))
            .and_then(|v| v.as_str())
            .map(str::to_owned)
    };
    let expires = field("expiration-date").and_then(|d| sessions::parse_expiration(&d));
    let rotated = field("user-token").or(header_token);
    Ok(Validation::Valid { expires, rotated })
}

/// Sends a request upstream within `deadline` and maps failures.
///
/// A plain future rather than an `async fn`: one more state machine around
/// the upstream one would keep its own copy of the request, and this future
/// is part of every request's state.
pub(super) fn send<'a>(
    state: &'a State,
    req: Request<Body>,
    deadline: Instant,
) -> Forward<'a, impl Future<Output = Result<Response<Body>, UpstreamError>> + 'a> {
    let deadline = tokio::time::Instant::from_std(deadline);
    Forward {
        state,
        inner: tokio::time::timeout_at(deadline, state.upstream.send(req)),
    }
}

pin_project_lite::pin_project! {
    /// The future of [`send`].
    pub(super) struct Forward<'a, F> {
        state: &'a State,
        #[pin]
        inner: tokio::time::Timeout<F>,
    }
}

impl<F> Future for Forward<'_, F>
where
    F: Future<Output = Result<Response<Body>, UpstreamError>>,
{
    type Output = Result<Response<Body>, GatewayError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let outcome = std::task::ready!(this.inner.poll(cx));
        Poll::Ready(upstream_outcome(this.state, outcome))
    }
}

/// Maps what the upstream pool answered (or its timeout) to the device's view.
pub(super) fn upstream_outcome(
    state: &State,
    outcome: Result<Result<Response<Body>, UpstreamError>, tokio::time::error::Elapsed>,
) -> Result<Response<Body>, GatewayError> {
    match outcome {
        Err(_) => {
            state.metrics.upstream_error("timeout");
            Err(GatewayError::BackendTimeout)
        }
        Ok(Ok(resp)) => Ok(resp),
        // A streamed device body went over its limit: the device's fault, 413.
        Ok(Err(UpstreamError::Request(e))) if body_over_limit(&e) => {
            Err(GatewayError::PayloadTooLarge)
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "backend request failed");
            Err(match e {
                UpstreamError::Request(e) if is_body_timeout(&e) => GatewayError::RequestTimeout,
                UpstreamError::Request(e) if e.is_parse() || e.is_parse_status() => {
                    state.metrics.upstream_error("protocol");
                    GatewayError::BadBackendResponse
                }
                _ => {
                    state.metrics.upstream_error("connect");
                    GatewayError::BackendUnreachable
                }
            })
        }
    }
}

/// Whether a failed forward was caused by the device's body exceeding its
/// limit (a streamed chunked body).
fn body_over_limit(e: &hyper::Error) -> bool {
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if s.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        source = s.source();
    }
    false
}

/// Reads at most `limit` bytes of a body before `deadline`.
pub(super) async fn read_limited(
    body: Body,
    limit: usize,
    deadline: Instant,
) -> Result<Bytes, BoxError> {
    let deadline = tokio::time::Instant::from_std(deadline);
    let collected = tokio::time::timeout_at(deadline, Limited::new(body, limit).collect())
        .await
        .map_err(|_| "timed out reading body")??;
    Ok(collected.to_bytes())
}

/// Turns a backend response into the device's: 2xx (and 304) streamed as is
/// minus hop-by-hop headers, each body read bounded by `idle` so a backend
/// that stalls mid-body cannot hold the device forever; anything else
/// becomes an envelope.
pub(super) async fn backend_answer(
    state: &State,
    resp: Response<Body>,
    ctx: &RequestCtx,
    deadline: Instant,
    idle: Duration,
) -> Result<Response<Body>, GatewayError> {
    let status = resp.status();
    if status.is_success() || status == StatusCode::NOT_MODIFIED {
        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        let body = match body {
            Body::Pooled(mut pooled) => {
                pooled.read_timeout(idle);
                match &state.read_ahead {
                    Some(read_ahead) => read_ahead.wrap(Body::Pooled(pooled)),
                    None => Body::Pooled(pooled),
                }
            }
            body if body.is_end_stream() => body,
            body => Body::boxed(TimedBody::new(body, idle)),
        };
        return Ok(Response::from_parts(parts, body));
    }
    if status.is_informational() {
        return Err(GatewayError::BadBackendResponse);
    }
    let (parts, body) = resp.into_parts();
    // Read what the error says, within the remaining time and a size cap; an
    // unreadable or huge body still yields an envelope with the status kept.
    let bytes = Box::pin(read_limited(body, MAX_ERROR_BODY, deadline))
        .await
        .unwrap_or_default();
    let err = envelope::from_backend(status, &bytes);
    if err.kind == "BackendError" && !bytes.is_empty() {
        tracing::debug!(request_id = ctx.id(), %status, body = %envelope::log_excerpt(&bytes), "backend error body dropped");
    }
    let mut out = envelope::response(status, &err.kind, &err.message, ctx.id());
    if let Some(v) = parts.headers.get(header::RETRY_AFTER) {
        out.headers_mut().insert(header::RETRY_AFTER, v.clone());
    }
    Ok(out)
}
