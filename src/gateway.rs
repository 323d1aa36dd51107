//! The request path, top to bottom:
//!
//! 1. request id (device's if sane, else generated) and client address
//!    (`X-Forwarded-For` only from trusted proxies);
//! 2. path normalization (400 on malformed or escaping paths);
//! 3. `/__manage__` → remote operations (operator tokens, never device keys);
//! 4. API key (403) — before routing, so keyless scanners learn nothing;
//! 5. `/login`, `/logout`;
//! 6. route lookup (404, 405 with `Allow`);
//! 7. user token rules (400) and session check (403, 502/504 when the
//!    validation service fails);
//! 8. request body rules (413, 400 for non-JSON on JSON routes, chunked
//!    bodies buffered and sent with a `Content-Length`);
//! 9. backend request: rewritten path, encrypted query values, headers
//!    rewritten (hop-by-hop stripped, spoofable headers overwritten);
//! 10. backend answer: 2xx streamed back, anything else normalized into the
//!     envelope; 401/403 on a private route evicts the token.
//!
//! Every failure is a [`GatewayError`] turned into the envelope in one place.

use crate::access_log::{AccessLog, LoggedBody, Pending};
use crate::body::{is_body_timeout, Body, BoxError, TimedBody};
use crate::config::{Config, EncryptQuery};
use crate::crypto::Keyring;
use crate::envelope::{self, GatewayError};
use crate::metrics::{Metrics, RouteName};
use crate::ratelimit::{self, RateLimiters};
use crate::readahead::ReadAhead;
use crate::routes::{self, Match, Router};
use crate::secret;
use crate::secret::Matcher;
use crate::sessions::{self, CheckError, Session, Sessions, Validation};
use crate::upstream::{strip_hop_by_hop, Upstream, UpstreamError};
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body::Body as _;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use ipnet::IpNet;
use percent_encoding::percent_decode;
use std::borrow::Cow;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

static API_KEY: HeaderName = HeaderName::from_static("api-key");
static API_CLIENT: HeaderName = HeaderName::from_static("api-client");
static USER_TOKEN: HeaderName = HeaderName::from_static("user-token");
static CLIENT_IP: HeaderName = HeaderName::from_static("client-ip");
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static FORWARDED: HeaderName = HeaderName::from_static("forwarded");
static X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");

/// Largest backend error body read for normalization; the rest is dropped.
const MAX_ERROR_BODY: usize = 64 << 10;
/// Largest `/login` answer accepted from the backend.
const MAX_LOGIN_ANSWER: usize = 1 << 20;

/// Everything the request path needs, built once from a validated config.
pub struct State {
    /// Unique per built state: what a connection's [`AuthMemo`] was made under.
    generation: u64,
    router: Router,
    api_keys: Vec<ApiKey>,
    rate_limits: Arc<RateLimiters>,
    login_salt: u64,
    sessions: Arc<Sessions>,
    upstream: Arc<Upstream>,
    /// Streamed (unbuffered) uploads in flight: at most half the backend
    /// pool, so slow senders of large bodies cannot take every connection.
    uploads: Arc<tokio::sync::Semaphore>,
    /// Read-ahead of large backend answers (`limits.response_buffer*`).
    read_ahead: Option<Arc<ReadAhead>>,
    keyring: Option<Keyring>,
    error_type: String,
    server_header: HeaderValue,
    host_header: HeaderValue,
    backend_api_key: Option<HeaderValue>,
    trusted_proxies: Vec<IpNet>,
    max_body: u64,
    backend_timeout: Duration,
    metrics: Arc<Metrics>,
    access_log: AccessLog,
    labels: Labels,
    /// Remote operations, once started ([`State::start_commands`]); a
    /// reloaded state inherits them.
    commands: std::sync::OnceLock<Arc<crate::commands::Commands>>,
    /// The configuration this state was built from.
    pub config: Config,
}

/// Route labels for requests that match no configured route.
struct Labels {
    unmatched: RouteName,
    login: RouteName,
    logout: RouteName,
    manage: RouteName,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State")
            .field("routes", &self.router.routes().len())
            .field("api_keys", &self.api_keys.len())
            .field("sessions", &self.sessions)
            .finish_non_exhaustive()
    }
}

impl State {
    /// Builds the serving state; fails with every route problem found.
    pub fn new(config: Config) -> Result<Arc<State>, Vec<String>> {
        State::build(config, None).map(|(state, _)| state)
    }

    /// Builds the state for a new configuration, keeping what must survive a
    /// reload: the session cache, and the backend pool while the backend is
    /// unchanged. Returns the settings that only take effect after a restart.
    pub fn reload(&self, config: Config) -> Result<(Arc<State>, Vec<String>), Vec<String>> {
        State::build(config, Some(self))
    }

    fn build(
        config: Config,
        previous: Option<&State>,
    ) -> Result<(Arc<State>, Vec<String>), Vec<String>> {
        let router = Router::new(&config.routes)?;
        let keyring = match &config.crypto {
            Some(c) => Some(
                Keyring::new(c.active_key, &c.keys)
                    .ok_or_else(|| vec!["crypto: active key missing".to_owned()])?,
            ),
            None => None,
        };
        let backend_api_key = config.backend.api_key.as_ref().and_then(|k| {
            let mut v = HeaderValue::from_bytes(k.expose()).ok()?;
            v.set_sensitive(true);
            Some(v)
        });
        let b = &config.backend;
        let mut restart_needed = Vec::new();
        let same_backend = previous.is_some_and(|p| {
            let o = &p.config.backend;
            o.address == b.address
                && o.connect_timeout == b.connect_timeout
                && o.max_connections == b.max_connections
                && o.max_idle == b.max_idle
                // https:// backends get a fresh pool on reload: the CA or
                // client certificate files may have changed.
                && o.tls.is_none()
                && b.tls.is_none()
        });
        let upstream = match previous {
            Some(p) if same_backend => Arc::clone(&p.upstream),
            _ => Upstream::new(
                b.address.clone(),
                b.tls.clone(),
                b.connect_timeout,
                b.max_connections,
                b.max_idle,
            ),
        };
        let uploads = match previous {
            Some(p) if same_backend => Arc::clone(&p.uploads),
            _ => Arc::new(tokio::sync::Semaphore::new((b.max_connections / 2).max(1))),
        };
        let limits = &config.limits;
        let read_ahead = match previous {
            Some(p)
                if p.config.limits.response_buffer == limits.response_buffer
                    && p.config.limits.response_buffer_total == limits.response_buffer_total =>
            {
                p.read_ahead.clone()
            }
            _ => ReadAhead::new(limits.response_buffer, limits.response_buffer_total).map(Arc::new),
        };
        let metrics = match previous {
            Some(p) => Arc::clone(&p.metrics),
            None => Metrics::with_cluster(config.cluster.is_some()),
        };
        let access_log = match previous {
            Some(p) => {
                if p.config.server.access_log != config.server.access_log {
                    restart_needed.push("server.access_log".to_owned());
                }
                p.access_log.clone()
            }
            None => AccessLog::start(&config.server.access_log, Arc::clone(&metrics))
                .map_err(|e| vec![format!("server.access_log: {e}")])?,
        };
        let sessions = match previous {
            Some(p) => {
                let (o, n) = (&p.config.sessions, &config.sessions);
                if (o.max_entries, o.max_ttl, o.negative_ttl, o.stale_if_error)
                    != (n.max_entries, n.max_ttl, n.negative_ttl, n.stale_if_error)
                {
                    restart_needed.push("sessions cache settings (max_entries, max_ttl, negative_ttl, stale_if_error)".to_owned());
                }
                Arc::clone(&p.sessions)
            }
            None => match &config.cluster {
                None => Arc::new(Sessions::with_counters(
                    config.sessions.clone(),
                    metrics.session_hits.clone(),
                    metrics.session_misses.clone(),
                )),
                Some(c) => Arc::new(Sessions::with_cluster(
                    config.sessions.clone(),
                    metrics.session_hits.clone(),
                    metrics.session_misses.clone(),
                    Arc::new(
                        crate::cluster::Cluster::new(c.clone(), b.timeout, metrics.cluster.clone())
                            .map_err(|e| vec![e])?,
                    ),
                )),
            },
        };
        if let Some(p) = previous {
            if p.config.cluster != config.cluster {
                restart_needed.push("[cluster]".to_owned());
            }
        }
        if let Some(p) = previous {
            let (o, n) = (&p.config, &config);
            if o.server.listen != n.server.listen {
                restart_needed.push("server.listen".to_owned());
            }
            if o.server.tls != n.server.tls {
                // The files themselves are watched; their paths are read at start.
                restart_needed.push("server.tls".to_owned());
            }
            if o.server.admin_listen != n.server.admin_listen {
                restart_needed.push("server.admin_listen".to_owned());
            }
            if o.limits != n.limits {
                restart_needed.push("[limits]".to_owned());
            }
        }
        let api_keys = config
            .api_keys
            .iter()
            .map(|k| ApiKey {
                name: Arc::from(k.name.as_str()),
                header_value: k.header_value.clone(),
                matcher: k.matcher.clone(),
            })
            .collect();
        let rate_limits = match previous {
            Some(p) if p.config.rate_limits == config.rate_limits => Arc::clone(&p.rate_limits),
            _ => Arc::new(RateLimiters::new(&config.rate_limits)),
        };
        if let Some(p) = previous {
            // Remote operations keep running jobs across a reload; their
            // settings apply after a restart.
            if format!("{:?}", p.config.commands) != format!("{:?}", config.commands)
                || format!("{:?}", p.config.operators) != format!("{:?}", config.operators)
            {
                restart_needed.push("[commands] / [[operators]]".to_owned());
            }
        }
        static GENERATION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let state = Arc::new(State {
            generation: GENERATION.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            router,
            api_keys,
            rate_limits,
            login_salt: previous.map_or_else(|| fastrand::u64(..), |p| p.login_salt),
            sessions,
            upstream,
            uploads,
            read_ahead,
            keyring,
            error_type: config.server.error_type.clone(),
            server_header: config.server.server_header.clone(),
            host_header: b.host_header.clone(),
            backend_api_key,
            trusted_proxies: config.server.trusted_proxies.clone(),
            max_body: config.server.max_body,
            backend_timeout: b.timeout,
            metrics,
            access_log,
            labels: Labels {
                unmatched: RouteName::fixed("unmatched"),
                login: RouteName::fixed("/login"),
                logout: RouteName::fixed("/logout"),
                manage: RouteName::fixed("/__manage__"),
            },
            commands: match previous.and_then(|p| p.commands.get()) {
                Some(c) => std::sync::OnceLock::from(Arc::clone(c)),
                None => std::sync::OnceLock::new(),
            },
            config,
        });
        Ok((state, restart_needed))
    }

    /// The session store (for metrics and tests).
    pub fn sessions(&self) -> &Sessions {
        &self.sessions
    }

    /// Bytes of backend answers read ahead of devices now.
    pub fn read_ahead_bytes(&self) -> usize {
        self.read_ahead.as_ref().map_or(0, |r| r.buffered())
    }

    /// The metrics (for the admin listener).
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Starts remote operations when `[commands]` is configured and they
    /// are not running yet (opens the audit log and job store, recovers jobs
    /// interrupted by a crash, starts the scheduler).
    pub async fn start_commands(&self) -> Result<(), String> {
        let Some(cfg) = &self.config.commands else {
            return Ok(());
        };
        if self.commands.get().is_some() {
            return Ok(());
        }
        let commands =
            crate::commands::Commands::start(cfg, &self.config.operators, &self.error_type).await?;
        let _ = self.commands.set(commands);
        Ok(())
    }

    /// Remote operations, if configured and started.
    pub fn commands(&self) -> Option<&Arc<crate::commands::Commands>> {
        self.commands.get()
    }

    /// The router (for `portcullis check`).
    pub fn router(&self) -> &Router {
        &self.router
    }
}

/// A device API key as the request path uses it.
struct ApiKey {
    name: Arc<str>,
    header_value: HeaderValue,
    matcher: Matcher,
}

/// Per-request facts gathered before routing.
struct Ctx {
    /// When the request arrived (route deadlines run from here).
    start: Instant,
    request_id: HeaderValue,
    client_ip: IpAddr,
    client_ip_header: HeaderValue,
    /// `X-Forwarded-For` to send upstream.
    forwarded_for: HeaderValue,
    proto: HeaderValue,
}

impl Ctx {
    fn id(&self) -> &str {
        self.request_id.to_str().unwrap_or("-")
    }
}

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
struct Info {
    route: Option<RouteName>,
    api_client: Option<HeaderValue>,
    upstream: Option<Duration>,
}

/// The device end of a connection, worked out once per connection.
#[derive(Debug)]
pub struct Peer {
    ip: IpAddr,
    ip_header: HeaderValue,
    tls: bool,
    /// The credentials of the connection's last authenticated request.
    memo: std::sync::Mutex<Option<AuthMemo>>,
}

/// What a connection remembers of its last authenticated request, so that
/// the next one presenting the same API key and user token (a device's
/// keep-alive connection nearly always does) skips hashing the key and the
/// session-cache lookup.
///
/// Invariants: presented values are compared in constant time; the memo is
/// used only under the configuration it was made with (API keys change with
/// a reload) and, for the session, while [`Sessions::generation`] is
/// unchanged (no logout, eviction or rotation anywhere since) and the
/// session is fresh. It lives and dies with the connection, and never prints.
struct AuthMemo {
    /// [`State::generation`] it was made under.
    config: u64,
    /// The matched key's index in [`State::api_keys`].
    api_key: usize,
    /// The presented API key's bytes, then the presented token's.
    secrets: Box<[u8]>,
    key_len: usize,
    /// The token's session and the sessions generation read before it was checked.
    session: Option<(u64, Session)>,
}

impl std::fmt::Debug for AuthMemo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AuthMemo(***)")
    }
}

/// What [`Peer::recall`] found.
#[derive(Default)]
struct Recalled {
    api_key: Option<usize>,
    session: Option<Session>,
}

impl Peer {
    /// The peer at `addr`, connected over TLS or not.
    pub fn new(addr: SocketAddr, tls: bool) -> Peer {
        let ip = addr.ip().to_canonical();
        Peer {
            ip,
            ip_header: ip_header(ip),
            tls,
            memo: std::sync::Mutex::new(None),
        }
    }

    /// The API key (and the session, for `token`) this connection's last
    /// request established, if this one presents the same values. Under
    /// HTTP/2 a concurrent stream holding the memo means no memo.
    fn recall(&self, state: &State, key: &[u8], token: Option<&[u8]>) -> Recalled {
        use subtle::ConstantTimeEq;
        let Ok(memo) = self.memo.try_lock() else {
            return Recalled::default();
        };
        let Some(m) = memo.as_ref() else {
            return Recalled::default();
        };
        let (memo_key, memo_token) = m.secrets.split_at(m.key_len);
        if m.config != state.generation || !bool::from(memo_key.ct_eq(key)) {
            return Recalled::default();
        }
        let session = match (token, &m.session) {
            (Some(t), Some((generation, s)))
                if *generation == state.sessions.generation()
                    && !s.fresh_until.passed()
                    && bool::from(memo_token.ct_eq(t)) =>
            {
                Some(s.clone())
            }
            _ => None,
        };
        Recalled {
            api_key: Some(m.api_key),
            session,
        }
    }

    /// Remembers the API key matched for `key`, and the session of `token`
    /// checked at sessions generation `session.0`.
    fn remember(
        &self,
        state: &State,
        key: &[u8],
        api_key: usize,
        session: Option<(&[u8], u64, &Session)>,
    ) {
        let Ok(mut memo) = self.memo.try_lock() else {
            return;
        };
        let token = session.map_or(&[][..], |(t, _, _)| t);
        let mut secrets = Vec::with_capacity(key.len() + token.len());
        secrets.extend_from_slice(key);
        secrets.extend_from_slice(token);
        *memo = Some(AuthMemo {
            config: state.generation,
            api_key,
            secrets: secrets.into_boxed_slice(),
            key_len: key.len(),
            session: session.map(|(_, generation, s)| (generation, s.clone())),
        });
    }
}

fn context(state: &State, headers: &HeaderMap, peer: &Peer, start: Instant) -> Ctx {
    let request_id = headers
        .get(&X_REQUEST_ID)
        .filter(|v| {
            let b = v.as_bytes();
            !b.is_empty()
                && b.len() <= 128
                && b.iter()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.' | b':'))
        })
        .cloned()
        .unwrap_or_else(|| request_id_at(start));
    let peer_ip = peer.ip;
    let trusted = |ip: &IpAddr| state.trusted_proxies.iter().any(|n| n.contains(ip));
    let peer_trusted = !state.trusted_proxies.is_empty() && trusted(&peer_ip);
    let device_xff = if peer_trusted {
        headers
            .get_all(&X_FORWARDED_FOR)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect::<Vec<_>>()
            .join(",")
    } else {
        String::new()
    };
    let (client_ip, forwarded_for) = if peer_trusted && !device_xff.is_empty() {
        // Walk the chain from the right: the first hop we don't trust is the client.
        let hops: Vec<IpAddr> = device_xff
            .split(',')
            .filter_map(|h| h.trim().parse::<IpAddr>().ok())
            .collect();
        let client = hops
            .iter()
            .rev()
            .find(|ip| !trusted(ip))
            .or(hops.first())
            .copied()
            .unwrap_or(peer_ip);
        let chain = format!("{device_xff}, {peer_ip}");
        (client, HeaderValue::from_str(&chain).ok())
    } else {
        (peer_ip, None)
    };
    let forwarded_for = forwarded_for.unwrap_or_else(|| peer.ip_header.clone());
    let client_ip_header = if client_ip == peer_ip {
        peer.ip_header.clone()
    } else {
        ip_header(client_ip)
    };
    Ctx {
        start,
        request_id,
        client_ip,
        client_ip_header,
        forwarded_for,
        proto: HeaderValue::from_static(if peer.tls { "https" } else { "http" }),
    }
}

fn ip_header(ip: IpAddr) -> HeaderValue {
    // An IP address's text form is always a valid header value.
    HeaderValue::from_str(&ip.to_string()).unwrap_or(HeaderValue::from_static("unknown"))
}

/// A 26-character, time-ordered request id (ULID layout: 48-bit milliseconds,
/// 80 random bits, Crockford base32).
pub fn new_request_id() -> HeaderValue {
    request_id_at(Instant::now())
}

/// [`new_request_id`] for a request that arrived at `at`: the wall-clock
/// milliseconds come from one reading at start-up plus the monotonic time
/// since, so no second clock reading per request.
fn request_id_at(at: Instant) -> HeaderValue {
    const ALPHABET: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
    static ANCHOR: std::sync::OnceLock<(u64, Instant)> = std::sync::OnceLock::new();
    let (wall, mono) = *ANCHOR.get_or_init(|| {
        let wall = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(0))
            .unwrap_or(0);
        (wall, Instant::now())
    });
    let since = u64::try_from(at.saturating_duration_since(mono).as_millis()).unwrap_or(0);
    let ms = wall.saturating_add(since);
    let mut out = [0u8; 26];
    // 10 characters of milliseconds (the top two bits of the first are 0),
    // then 16 of randomness: 12 from one 64-bit draw, 4 from a 32-bit one.
    let (time, random) = out.split_at_mut(10);
    for (i, c) in time.iter_mut().enumerate() {
        *c = ALPHABET[((ms >> (45 - 5 * i)) & 31) as usize];
    }
    let mut draws = [fastrand::u64(..), u64::from(fastrand::u32(..))];
    for (i, c) in random.iter_mut().enumerate() {
        let draw = &mut draws[usize::from(i >= 12)];
        *c = ALPHABET[(*draw & 31) as usize];
        *draw >>= 5;
    }
    // Base32 characters are always a valid header value.
    HeaderValue::from_bytes(&out).unwrap_or(HeaderValue::from_static("0"))
}

fn header_str<'a>(headers: &'a HeaderMap, name: &HeaderName) -> Option<&'a str> {
    headers.get(name).and_then(value_str)
}

/// A header value as text, if it is visible ASCII and not empty.
fn value_str(v: &HeaderValue) -> Option<&str> {
    v.to_str().ok().filter(|v| !v.is_empty())
}

async fn dispatch(
    state: &State,
    req: Request<Incoming>,
    ctx: &Ctx,
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
    let deadline = ctx.start + cfg.timeout.unwrap_or(state.backend_timeout);

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
        deadline,
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
fn limited<K: std::hash::Hash + Eq + Clone>(
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

async fn check_token(
    state: &State,
    token: &str,
    ctx: &Ctx,
    api_key: &ApiKey,
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
    ctx: &Ctx,
    api_key: &ApiKey,
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
fn send<'a>(
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
    struct Forward<'a, F> {
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
fn upstream_outcome(
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
/// limit (a streamed chunked body, SPEC §2 "Request bodies").
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
async fn read_limited(body: Body, limit: usize, deadline: Instant) -> Result<Bytes, BoxError> {
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
async fn backend_answer(
    state: &State,
    resp: Response<Body>,
    ctx: &Ctx,
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

/// Bodies with a `Content-Length` up to this size are buffered before
/// forwarding; larger ones are streamed.
const BUFFER_BODIES_UP_TO: u64 = 64 << 10;

/// Applies the body rules of SPEC §2 "Request bodies".
async fn request_body(
    headers: &mut HeaderMap,
    incoming: Incoming,
    limit: u64,
    stream_chunked: bool,
    json: bool,
    deadline: Instant,
    body_timeout: Duration,
) -> Result<Body, GatewayError> {
    let declared = match headers.get(header::CONTENT_LENGTH) {
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|s| s.parse::<u64>().ok())
                .ok_or(GatewayError::BadRequest("Invalid Content-Length"))?,
        ),
        None => None,
    };
    if declared.is_some_and(|n| n > limit) {
        return Err(GatewayError::PayloadTooLarge);
    }
    if incoming.is_end_stream() && declared.unwrap_or(0) == 0 {
        return Ok(Body::Empty);
    }
    // Small bodies are read whole before a backend connection is taken
    // (nginx's request buffering): a device sending slowly then holds only
    // its own connection, never one of the backend pool's.
    let must_buffer = json
        || (declared.is_none() && !stream_chunked)
        || declared.is_some_and(|n| n <= BUFFER_BODIES_UP_TO);
    let timed = TimedBody::new(Body::Incoming(incoming), body_timeout);
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    if !must_buffer {
        return Ok(if declared.is_some() {
            Body::boxed(timed)
        } else {
            Body::boxed(Limited::new(timed, limit))
        });
    }
    let bytes = match Box::pin(read_limited(Body::boxed(timed), limit, deadline)).await {
        Ok(b) => b,
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            return Err(GatewayError::PayloadTooLarge)
        }
        Err(e) if is_body_timeout(&*e) => return Err(GatewayError::RequestTimeout),
        Err(e) if e.to_string().contains("timed out") => return Err(GatewayError::RequestTimeout),
        Err(_) => return Err(GatewayError::BadRequest("Could not read request body")),
    };
    // JSON is UTF-8 (RFC 8259 §8.1); serde_json skips ignored strings
    // without checking their encoding, so check it first.
    if json
        && (std::str::from_utf8(&bytes).is_err()
            || serde_json::from_slice::<serde::de::IgnoredAny>(&bytes).is_err())
    {
        return Err(GatewayError::BadRequest("Request body is not valid JSON"));
    }
    // Valid but absurdly nested JSON would crash recursive parsers behind us.
    if json && !json_depth_within(&bytes, MAX_JSON_DEPTH) {
        return Err(GatewayError::BadRequest(
            "Request body is nested too deeply",
        ));
    }
    headers.remove(header::TRANSFER_ENCODING);
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
    Ok(Body::full(bytes))
}

/// Deepest array/object nesting accepted in a JSON request body (serde_json's
/// own recursion limit; Python's `json` fails near 1000).
const MAX_JSON_DEPTH: usize = 128;

/// Whether the arrays and objects of a JSON text nest at most `max` deep.
/// One pass over the bytes, skipping strings; no recursion.
fn json_depth_within(bytes: &[u8], max: usize) -> bool {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for &b in bytes {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > max {
                    return false;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    true
}

/// Identity headers only the gateway may set, and `Expect` (hyper's server
/// side answered it already): never forwarded as a device sent them. One
/// string match (lengths first) rather than a comparison with each name.
fn gateway_only(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "api-client" | "client-ip" | "forwarded" | "x-real-ip" | "expect"
    )
}

/// Rewrites the device's headers for the backend (SPEC §4).
fn backend_headers(
    state: &State,
    headers: &mut HeaderMap,
    ctx: &Ctx,
    api_key: &ApiKey,
    token: Option<&str>,
) {
    strip_hop_by_hop(headers);
    // Up to seven headers are added below: one regrowth at most.
    headers.reserve(7);
    // Checked in one pass first: devices rarely send any of them.
    if headers.keys().any(gateway_only) {
        for name in [&API_CLIENT, &CLIENT_IP, &FORWARDED, &X_REAL_IP] {
            headers.remove(name);
        }
        headers.remove(header::EXPECT);
    }
    headers.insert(header::HOST, state.host_header.clone());
    match &state.backend_api_key {
        Some(k) => headers.insert(API_KEY.clone(), k.clone()),
        None => headers.remove(&API_KEY),
    };
    headers.insert(API_CLIENT.clone(), api_key.header_value.clone());
    match token {
        // The device's own header already carries it (no rotation): keep
        // that value instead of copying the token into a new one.
        Some(t)
            if {
                let mut sent = headers.get_all(&USER_TOKEN).iter();
                matches!((sent.next(), sent.next()), (Some(v), None) if v.as_bytes() == t.as_bytes())
            } =>
        {
            if let Some(v) = headers.get_mut(&USER_TOKEN) {
                v.set_sensitive(true);
            }
        }
        Some(t) => match HeaderValue::from_str(t) {
            Ok(mut t) => {
                t.set_sensitive(true);
                headers.insert(USER_TOKEN.clone(), t);
            }
            Err(_) => {
                headers.remove(&USER_TOKEN);
            }
        },
        None => {
            headers.remove(&USER_TOKEN);
        }
    }
    headers.insert(CLIENT_IP.clone(), ctx.client_ip_header.clone());
    headers.insert(X_FORWARDED_FOR.clone(), ctx.forwarded_for.clone());
    headers.insert(X_FORWARDED_PROTO.clone(), ctx.proto.clone());
    headers.insert(X_REQUEST_ID.clone(), ctx.request_id.clone());
}

fn decode_component(raw: &str) -> Result<Cow<'_, [u8]>, GatewayError> {
    let bytes = raw.as_bytes();
    // Validate escapes: percent_decode passes malformed ones through silently.
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let ok = bytes
                .get(i + 1..i + 3)
                .is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit));
            if !ok {
                return Err(GatewayError::BadRequest("Invalid query string"));
            }
            i += 3;
        } else {
            i += 1;
        }
    }
    if raw.contains('+') {
        let spaced = raw.replace('+', " ");
        return Ok(Cow::Owned(percent_decode(spaced.as_bytes()).collect()));
    }
    Ok(percent_decode(bytes).into())
}

/// Encrypts the values of the route's listed query parameters (SPEC §4).
/// Other parameters pass through byte for byte.
pub fn rewrite_query<'q>(
    keyring: Option<&Keyring>,
    spec: &EncryptQuery,
    query: &'q str,
) -> Result<Cow<'q, str>, GatewayError> {
    let Some(keyring) = keyring.filter(|_| *spec != EncryptQuery::None) else {
        return Ok(Cow::Borrowed(query));
    };
    let mut out = String::with_capacity(query.len() * 2);
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        if !out.is_empty() {
            out.push('&');
        }
        let (raw_name, raw_value) = pair.split_once('=').unwrap_or((pair, ""));
        let name = decode_component(raw_name)?;
        let name = std::str::from_utf8(&name)
            .map_err(|_| GatewayError::BadRequest("Invalid query string"))?;
        if spec.covers(name) {
            let value = decode_component(raw_value)?;
            out.push_str(raw_name);
            out.push('=');
            out.push_str(&keyring.encrypt(name, &value));
        } else {
            out.push_str(pair);
        }
    }
    Ok(Cow::Owned(out))
}

async fn login(
    state: &State,
    req: Request<Incoming>,
    ctx: &Ctx,
    api_key: &ApiKey,
    info: &mut Info,
) -> Result<Response<Body>, GatewayError> {
    if req.method() != Method::POST {
        return Err(GatewayError::MethodNotAllowed(vec![Method::POST]));
    }
    if header_str(req.headers(), &USER_TOKEN).is_some() {
        return Err(GatewayError::TokenOnPublic);
    }
    let deadline = Instant::now() + state.backend_timeout;
    let (mut parts, incoming) = req.into_parts();
    let body = request_body(
        &mut parts.headers,
        incoming,
        state.max_body,
        false,
        true,
        deadline,
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
    if flag("is_active") == Some(false) {
        return Err(GatewayError::Forbidden("User account is not active"));
    }
    if flag("is_staff") == Some(true) || flag("is_superuser") == Some(true) {
        return Err(GatewayError::Forbidden(
            "Staff and superuser accounts cannot log in through the gateway",
        ));
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

async fn logout(
    state: &State,
    req: Request<Incoming>,
    ctx: &Ctx,
    api_key: &ApiKey,
) -> Result<Response<Body>, GatewayError> {
    if req.method() != Method::POST {
        return Err(GatewayError::MethodNotAllowed(vec![Method::POST]));
    }
    let token = header_str(req.headers(), &USER_TOKEN)
        .ok_or(GatewayError::TokenRequired)?
        .to_owned();
    state.sessions.evict(&token).await;
    if let Some(path) = &state.config.sessions.logout_path {
        let mut fwd = Request::new(Body::Empty);
        *fwd.method_mut() = Method::POST;
        *fwd.uri_mut() =
            Uri::try_from(path.as_str()).map_err(|_| GatewayError::BadBackendResponse)?;
        backend_headers(state, fwd.headers_mut(), ctx, api_key, Some(&token));
        fwd.headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
        let deadline = Instant::now() + state.backend_timeout;
        match send(state, fwd, deadline).await {
            Ok(resp) => {
                // Drain so the connection can be reused.
                let _ = read_limited(resp.into_body(), MAX_ERROR_BODY, deadline).await;
            }
            Err(e) => {
                tracing::warn!(request_id = ctx.id(), error = %e, "backend logout failed; session evicted anyway")
            }
        }
    }
    let mut resp = Response::new(Body::Empty);
    *resp.status_mut() = StatusCode::NO_CONTENT;
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::Secret;

    fn config_with_keys(keys: &[(&str, &str)]) -> Config {
        let mut toml = String::from(
            "[server]\nlisten = \"127.0.0.1:0\"\naccess_log = \"off\"\n\n[backend]\nurl = \"http://127.0.0.1:9\"\n",
        );
        for (name, key) in keys {
            toml.push_str(&format!(
                "\n[[api_keys]]\nname = \"{name}\"\nkey = \"{key}\"\n"
            ));
        }
        Config::parse(&toml).unwrap_or_else(|p| panic!("{p}"))
    }

    #[tokio::test]
    async fn connection_memo_holds_only_under_its_configuration_and_session() {
        let keys = [("a", "key-a-0123456789"), ("b", "key-b-0123456789")];
        let state = State::new(config_with_keys(&keys)).unwrap_or_else(|p| panic!("{p:?}"));
        let peer = Peer::new(SocketAddr::from(([127, 0, 0, 1], 1)), false);
        let remember_until = |fresh_until: sessions::Deadline| {
            let session = Session {
                fresh_until,
                rotated: None,
            };
            let generation = state.sessions.generation();
            let token: &[u8] = b"tok";
            peer.remember(
                &state,
                b"key-b-0123456789",
                1,
                Some((token, generation, &session)),
            );
        };
        remember_until(sessions::Deadline::now().plus(Duration::from_secs(60)));
        assert!(!format!("{peer:?}").contains("key-b"), "memo never prints");

        let same = peer.recall(&state, b"key-b-0123456789", Some(b"tok"));
        assert_eq!(same.api_key, Some(1));
        assert!(same.session.is_some());
        let other_token = peer.recall(&state, b"key-b-0123456789", Some(b"tok2"));
        assert_eq!(other_token.api_key, Some(1));
        assert!(other_token.session.is_none());
        assert!(peer
            .recall(&state, b"key-a-0123456789", Some(b"tok"))
            .api_key
            .is_none());
        assert!(peer
            .recall(&state, b"key-b-012345678", None)
            .api_key
            .is_none());

        // A reloaded configuration (key `b` may be gone) ignores the memo.
        let (reloaded, _) = state
            .reload(config_with_keys(&keys))
            .unwrap_or_else(|p| panic!("{p:?}"));
        let after = peer.recall(&reloaded, b"key-b-0123456789", Some(b"tok"));
        assert!(after.api_key.is_none() && after.session.is_none());

        // Any eviction ends remembered sessions; so does their freshness.
        state.sessions.evict("unrelated").await;
        let evicted = peer.recall(&state, b"key-b-0123456789", Some(b"tok"));
        assert_eq!(evicted.api_key, Some(1));
        assert!(evicted.session.is_none());
        remember_until(sessions::Deadline::now());
        assert!(peer
            .recall(&state, b"key-b-0123456789", Some(b"tok"))
            .session
            .is_none());
    }

    #[test]
    fn gateway_only_names_are_the_ones_removed() {
        for name in [
            &API_CLIENT,
            &CLIENT_IP,
            &FORWARDED,
            &X_REAL_IP,
            &header::EXPECT,
        ] {
            assert!(gateway_only(name), "{name}");
        }
        for name in [&API_KEY, &USER_TOKEN, &header::HOST, &X_REQUEST_ID] {
            assert!(!gateway_only(name), "{name}");
        }
    }

    #[test]
    fn request_ids_are_ulid_shaped() {
        let a = new_request_id();
        let b = new_request_id();
        assert_eq!(a.len(), 26);
        assert_ne!(a, b);
        // The first 10 characters are the wall-clock milliseconds.
        let ms = a.as_bytes()[..10].iter().fold(0u128, |acc, c| {
            let digit = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ"
                .iter()
                .position(|x| x == c)
                .unwrap() as u128;
            (acc << 5) | digit
        });
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis();
        assert!(now.abs_diff(ms) < 5_000, "id time {ms}, now {now}");
    }

    #[test]
    fn json_depth_counts_nesting_outside_strings() {
        assert!(json_depth_within(br#"{"a": [1, {"b": "[[[["}]}"#, 3));
        assert!(!json_depth_within(br#"{"a": [1, {"b": 2}]}"#, 2));
        assert!(json_depth_within(br#"["\"[[["]"#, 1));
        assert!(!json_depth_within(
            "[".repeat(200).as_bytes(),
            MAX_JSON_DEPTH
        ));
    }

    #[test]
    fn query_rewrite_encrypts_only_listed_names() {
        let key = Secret::new([3u8; 32]);
        let ring = Keyring::new(1, &[(1, key)]).unwrap();
        let spec = EncryptQuery::Names(vec!["username".into()]);
        let out = rewrite_query(Some(&ring), &spec, "page=2&username=al%20ice&x").unwrap();
        let parts: Vec<&str> = out.split('&').collect();
        assert_eq!(parts[0], "page=2");
        assert_eq!(parts[2], "x");
        let enc = parts[1].strip_prefix("username=").unwrap();
        assert_eq!(ring.decrypt("username", enc).unwrap(), b"al ice");
        assert!(rewrite_query(Some(&ring), &spec, "username=%zz").is_err());
        assert_eq!(
            rewrite_query(Some(&ring), &EncryptQuery::None, "a=%zz").unwrap(),
            "a=%zz"
        );
    }
}
