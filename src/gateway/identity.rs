//! Who is asking: the connection's [`Peer`] (its address, TLS, and the memo
//! of its last authenticated request) and the per-request [`RequestCtx`]
//! (request id, client address through trusted proxies only).

use super::state::State;
use super::{X_FORWARDED_FOR, X_REQUEST_ID};
use crate::request_id::request_id_at;
use crate::sessions::Session;
use http::header::{HeaderMap, HeaderValue};
use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

/// Per-request facts gathered before routing.
pub(super) struct RequestCtx {
    /// When the request arrived (route deadlines run from here).
    pub(super) start: Instant,
    pub(super) request_id: HeaderValue,
    pub(super) client_ip: IpAddr,
    pub(super) client_ip_header: HeaderValue,
    /// `X-Forwarded-For` to send upstream.
    pub(super) forwarded_for: HeaderValue,
    pub(super) proto: HeaderValue,
}

impl RequestCtx {
    pub(super) fn id(&self) -> &str {
        self.request_id.to_str().unwrap_or("-")
    }
}

/// The device end of a connection, worked out once per connection.
#[derive(Debug)]
pub struct Peer {
    pub(super) ip: IpAddr,
    pub(super) ip_header: HeaderValue,
    pub(super) tls: bool,
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
pub(super) struct Recalled {
    pub(super) api_key: Option<usize>,
    pub(super) session: Option<Session>,
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
    pub(super) fn recall(&self, state: &State, key: &[u8], token: Option<&[u8]>) -> Recalled {
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
    pub(super) fn remember(
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

pub(super) fn context(
    state: &State,
    headers: &HeaderMap,
    peer: &Peer,
    start: Instant,
) -> RequestCtx {
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
    RequestCtx {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::sessions;
    use std::time::Duration;

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
}
