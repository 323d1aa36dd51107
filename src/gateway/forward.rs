//! What is forwarded to the backend: the request body rules, the rewritten
//! headers and the encrypted query parameters.

use super::identity::RequestCtx;
use super::state::{DeviceKey, State};
use super::{
    API_CLIENT, API_KEY, CLIENT_IP, FORWARDED, USER_TOKEN, X_FORWARDED_FOR, X_FORWARDED_PROTO,
    X_REAL_IP, X_REQUEST_ID,
};
use crate::body::{is_body_timeout, Body, TimedBody};
use crate::config::EncryptQuery;
use crate::crypto::Keyring;
use crate::envelope::GatewayError;
use crate::upstream::strip_hop_by_hop;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http_body::Body as _;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use percent_encoding::percent_decode;
use std::borrow::Cow;
use std::time::{Duration, Instant};

/// Bodies with a `Content-Length` up to this size are buffered before
/// forwarding; larger ones are streamed.
const BUFFER_BODIES_UP_TO: u64 = 64 << 10;

/// Applies the request body rules: a declared length over `limit` is 413;
/// JSON routes and small or (unless streamed) chunked bodies are read whole
/// and sent with a `Content-Length`; JSON bodies must be UTF-8 JSON nesting at
/// most [`MAX_JSON_DEPTH`] deep. A body read whole must arrive within
/// `body_timeout`, and `deadline` (the route's) is moved on by the time it
/// took; a streamed body travels within `deadline`. No read of any body may
/// wait longer than `body_timeout`.
pub(super) async fn request_body(
    headers: &mut HeaderMap,
    incoming: Incoming,
    limit: u64,
    stream_chunked: bool,
    json: bool,
    deadline: &mut Instant,
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
    // A body read whole must arrive within `limits.body_read_timeout` (as
    // must every read of any body): a trickle cannot hold the connection.
    // The route's deadline covers the backend exchange, so it is moved on by
    // the time the body took.
    let remaining = deadline.saturating_duration_since(Instant::now());
    let read = tokio::time::timeout(
        body_timeout,
        Limited::new(Body::boxed(timed), limit).collect(),
    );
    let bytes = match Box::pin(read).await {
        Err(_) => return Err(GatewayError::RequestTimeout),
        Ok(Ok(b)) => {
            *deadline = Instant::now() + remaining;
            b.to_bytes()
        }
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            return Err(GatewayError::PayloadTooLarge)
        }
        Ok(Err(e)) if is_body_timeout(&*e) => return Err(GatewayError::RequestTimeout),
        Ok(Err(_)) => return Err(GatewayError::BadRequest("Could not read request body")),
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

/// Rewrites the device's headers for the backend: hop-by-hop headers
/// stripped, identity headers set by the gateway only, the user token (or
/// its rotated value) passed as `user-token`.
pub(super) fn backend_headers(
    state: &State,
    headers: &mut HeaderMap,
    ctx: &RequestCtx,
    api_key: &DeviceKey,
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

/// Encrypts the values of the route's listed query parameters.
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::EncryptQuery;
    use crate::secret::Secret;

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
