//! The operator console: one static page, its script and its stylesheet,
//! embedded in the binary (`assets/console/`) and served at
//! `GET /__manage__/console` without a token (they hold no data). The script
//! signs in with the operator token, keeps it in the tab's `sessionStorage`
//! and sends it as a bearer header on every `/__manage__` call; no cookie is
//! ever set, so no other site's request carries it.

use super::Core;
use crate::body::Body;
use http::header::{HeaderName, HeaderValue, CONTENT_TYPE};
use http::{Response, StatusCode};

/// Only this origin's script, style, images and API; no forms posted
/// anywhere, no framing, no plugins, no `<base>`.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
img-src 'self'; connect-src 'self'; form-action 'none'; frame-ancestors 'none'; \
base-uri 'none'";

/// `(path below /__manage__/console, content type, bytes)`.
const ASSETS: [(&str, &str, &[u8]); 4] = [
    (
        "",
        "text/html; charset=utf-8",
        include_bytes!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/assets/console/index.html"
        )),
    ),
    (
        "console.js",
        "text/javascript; charset=utf-8",
        include_bytes!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/assets/console/console.js"
        )),
    ),
    (
        "console.css",
        "text/css; charset=utf-8",
        include_bytes!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/assets/console/console.css"
        )),
    ),
    (
        "icon.svg",
        "image/svg+xml",
        include_bytes!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/assets/console/icon.svg"
        )),
    ),
];

/// The headers every console file is sent with.
const HEADERS: [(&str, &str); 7] = [
    ("content-security-policy", CSP),
    ("x-frame-options", "DENY"),
    ("x-content-type-options", "nosniff"),
    ("referrer-policy", "no-referrer"),
    ("cross-origin-opener-policy", "same-origin"),
    ("cross-origin-resource-policy", "same-origin"),
    ("cache-control", "no-store"),
];

/// Serves `GET`/`HEAD /__manage__/console/<rest>`.
pub(super) fn serve(core: &Core, rest: &[&str], request_id: &str) -> Response<Body> {
    let name = match rest {
        [] => "",
        [one] => one,
        _ => "\0",
    };
    let Some((_, content_type, bytes)) = ASSETS.iter().find(|(n, _, _)| *n == name) else {
        return super::api::error(core, StatusCode::NOT_FOUND, "Not found", request_id);
    };
    let mut resp = Response::new(Body::full(bytes::Bytes::from_static(bytes)));
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    for (k, v) in HEADERS {
        h.insert(HeaderName::from_static(k), HeaderValue::from_static(v));
    }
    resp
}
