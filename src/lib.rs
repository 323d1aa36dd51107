//! portcullis: an API gateway for DMZs.
//!
//! Module map (the request path reads top to bottom in [`gateway`]):
//! - [`server`]: listeners, connection cap, HTTP/1.1 + HTTP/2, the connection IO
//!   (read/send deadlines, hyper's bare error answers as envelopes), admin
//!   listener, SIGHUP reload, graceful drain.
//! - [`gateway`]: state and reload, the request path (request id → path → API
//!   key → route → session → body rules → upstream → response or envelope),
//!   peer identity, login/logout, forwarding rules.
//! - [`config`]: raw TOML → validated [`config::Config`], every problem reported;
//!   every default value named in [`config::defaults`].
//! - [`secret`]: secrets that never print; constant-time key matching.
//! - [`routes`]: path normalization and exposed-route lookup (radix tree).
//! - [`sessions`]: the token cache (moka): single-flight validation, negative
//!   entries, expiry, rotation, eviction.
//! - [`upstream`]: bounded keep-alive connection pool to the backend; hop-by-hop rules.
//! - [`envelope`]: the one place errors become `{"error": {...}}` responses.
//! - [`request_id`]: time-ordered request ids (a leaf: the connection layer and the gateway use it).
//! - [`crypto`]: AES-256-GCM encrypted query parameters.
//! - [`body`]: the body type flowing both ways.
//! - [`ratelimit`]: per API key, per client, per route and login rate limits (429).
//! - [`metrics`]: Prometheus metrics for the admin listener.
//! - [`access_log`]: one JSON line per request, written off the request path.
//! - [`tls`]: TLS termination (rustls, reloading certificates) and TLS to backends.
//! - [`dev`]: `portcullis demo` and `portcullis dev-certs` (development only).
//! - [`commands`]: remote operations (`/__manage__`): allow-listed commands, jobs, schedules;
//!   with runners, the gateway side of `/__runner__`.
//! - [`runner`]: `portcullis runner`, running commands on a backend host for the gateway.
//! - [`audit`]: the hash-chained audit log of remote operations and its verifier.
//! - [`cluster`]: cluster mode: sessions, revocations and single flight shared through Redis.

pub mod access_log;
pub mod audit;
pub mod body;
pub mod cluster;
pub mod coalesce;
pub mod commands;
pub mod config;
pub mod crypto;
pub mod dev;
pub mod envelope;
pub mod gateway;
pub mod metrics;
pub mod ratelimit;
pub mod readahead;
pub mod request_id;
pub mod routes;
pub mod runner;
pub mod secret;
pub mod server;
pub mod sessions;
pub mod tls;
pub mod upstream;

/// The old paths of [`dev::demo`] and [`dev::devcerts`], kept for embedders and tests.
pub use dev::{demo, devcerts};
