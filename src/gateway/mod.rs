//! The gateway: what happens to a device request between the connection
//! layer ([`crate::server`]) and the backend pool ([`crate::upstream`]).
//!
//! - `state`: [`State`], built once per configuration (and on reload);
//! - `request`: [`handle`] and `dispatch`, the request path;
//! - `identity`: the connection's [`Peer`] (and its memo of the last
//!   authenticated request) and each request's id and client address;
//! - `login`: `/login` and `/logout`;
//! - `forward`: request body rules, headers and encrypted query parameters
//!   sent to the backend.
//!
//! The request path, in the order `request::dispatch` runs it:
//!
//! 1. request id (the device's if sane, else generated) and client address
//!    (`X-Forwarded-For` only from trusted proxies);
//! 2. per-client rate limit (429);
//! 3. exactly one `Host` on HTTP/1.1, no authority-form `CONNECT`, path
//!    normalization (400 on malformed or escaping paths);
//! 4. `/__manage__` → remote operations (operator tokens, never device keys);
//! 5. API key (403), before routing so keyless scanners learn nothing; then
//!    the per-API-key rate limit (429);
//! 6. `/login`, `/logout`;
//! 7. route lookup (404, 405 with `Allow`), per-route rate limit (429);
//! 8. user token rules (400) and session check (403, 502/504 when the
//!    validation service fails);
//! 9. backend path and query (encrypted values);
//! 10. request body rules (413; 400 for non-JSON on JSON routes; small and
//!     chunked bodies buffered and sent with a `Content-Length`);
//! 11. headers rewritten (hop-by-hop stripped, spoofable headers overwritten);
//! 12. a streamed upload waits for an upload permit (503 past the deadline);
//! 13. the backend pool, within the route's deadline (502/504);
//! 14. a backend 401/403 on a private route evicts the token; a new
//!     `user-token` rotates it;
//! 15. backend answer: 2xx (and 304) streamed back, anything else normalized
//!     into the envelope.
//!
//! Every failure is a [`crate::envelope::GatewayError`] turned into the
//! envelope in one place ([`handle`]).

mod forward;
mod identity;
mod login;
mod request;
mod state;

pub use crate::request_id::new_request_id;
pub use forward::rewrite_query;
pub use identity::Peer;
pub use request::handle;
pub use state::State;

use http::header::{HeaderMap, HeaderName, HeaderValue};

static API_KEY: HeaderName = HeaderName::from_static("api-key");
static API_CLIENT: HeaderName = HeaderName::from_static("api-client");
static USER_TOKEN: HeaderName = HeaderName::from_static("user-token");
static CLIENT_IP: HeaderName = HeaderName::from_static("client-ip");
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static FORWARDED: HeaderName = HeaderName::from_static("forwarded");
static X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");

/// Largest `/login` answer accepted from the backend.
const MAX_LOGIN_ANSWER: usize = 1 << 20;

fn header_str<'a>(headers: &'a HeaderMap, name: &HeaderName) -> Option<&'a str> {
    headers.get(name).and_then(value_str)
}

/// A header value as text, if it is visible ASCII and not empty.
fn value_str(v: &HeaderValue) -> Option<&str> {
    v.to_str().ok().filter(|v| !v.is_empty())
}
