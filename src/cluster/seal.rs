//! What the cluster keeps in Redis about a token, and how it is protected.
//!
//! - A token is named by `HMAC-SHA256(token)` under a key derived from
//!   `cluster.secret`; Redis never sees the token.
//! - A value is sealed with AES-256-GCM under another key derived from the
//!   secret, with the Redis key it is stored under as associated data (a value
//!   copied to another key does not open): `0x01 || nonce(12) || ciphertext`.

use crate::secret::Secret;
use aes_gcm::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const VERSION: u8 = 0x01;
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;

/// The keyed hash of a token (32 bytes).
pub type TokenHash = [u8; 32];

/// Keys derived from `cluster.secret`.
pub struct Keys {
    token_mac: Hmac<Sha256>,
    limit_mac: Hmac<Sha256>,
    login_salt: u64,
    seal: Aes256Gcm,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Keys(***)")
    }
}

fn derive(secret: &Secret, label: &[u8]) -> [u8; 32] {
    // HMAC-SHA256 keyed by the secret over a fixed label: one independent
    // key per purpose (HKDF's expand step with a single block).
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret.expose())
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    mac.update(label);
    mac.update(&[1]);
    mac.finalize().into_bytes().into()
}

impl Keys {
    /// Derives the token-hash and sealing keys from the shared secret.
    pub fn new(secret: &Secret) -> Keys {
        let mac_key = derive(secret, b"portcullis cluster v1 token hash");
        let seal_key = derive(secret, b"portcullis cluster v1 seal");
        let limit_key = derive(secret, b"portcullis cluster v1 rate limit");
        let [s0, s1, s2, s3, s4, s5, s6, s7, ..] =
            derive(secret, b"portcullis cluster v1 login salt");
        Keys {
            token_mac: <Hmac<Sha256> as Mac>::new_from_slice(&mac_key)
                .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length")),
            limit_mac: <Hmac<Sha256> as Mac>::new_from_slice(&limit_key)
                .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length")),
            login_salt: u64::from_le_bytes([s0, s1, s2, s3, s4, s5, s6, s7]),
            seal: Aes256Gcm::new(&seal_key.into()),
        }
    }

    /// The keyed hash of a token.
    pub fn token_hash(&self, token: &[u8]) -> TokenHash {
        let mut mac = self.token_mac.clone();
        mac.update(token);
        mac.finalize().into_bytes().into()
    }

    /// The keyed hash of a rate-limit key (`scope` is the limit's kind or
    /// route, `key` what it counts: an API key name, an address).
    pub fn limit_hash(&self, scope: &str, key: &[u8]) -> TokenHash {
        let mut mac = self.limit_mac.clone();
        mac.update(scope.as_bytes());
        mac.update(&[0]);
        mac.update(key);
        mac.finalize().into_bytes().into()
    }

    /// The salt of login-name hashes, the same on every instance (so the
    /// login rate limit counts one name once for the cluster).
    pub fn login_salt(&self) -> u64 {
        self.login_salt
    }

    /// Seals `plain` for storage under the Redis key `aad`.
    pub fn seal(&self, aad: &[u8], plain: &[u8]) -> Vec<u8> {
        let nonce = Aes256Gcm::generate_nonce(&mut OsRng);
        let mut out = Vec::with_capacity(1 + NONCE_LEN + plain.len() + TAG_LEN);
        out.push(VERSION);
        out.extend_from_slice(&nonce);
        // Encryption with a valid key and nonce cannot fail for in-memory sizes.
        if let Ok(ct) = self.seal.encrypt(&nonce, Payload { msg: plain, aad }) {
            out.extend_from_slice(&ct);
        }
        out
    }

    /// Opens a value sealed under the Redis key `aad`; `None` when it is
    /// malformed, of another version, under another key or tampered with.
    pub fn open(&self, aad: &[u8], blob: &[u8]) -> Option<Vec<u8>> {
        if blob.len() < 1 + NONCE_LEN + TAG_LEN || blob.first() != Some(&VERSION) {
            return None;
        }
        let nonce = Nonce::from_slice(blob.get(1..1 + NONCE_LEN)?);
        self.seal
            .decrypt(
                nonce,
                Payload {
                    msg: blob.get(1 + NONCE_LEN..)?,
                    aad,
                },
            )
            .ok()
    }
}

/// What Redis says about one token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stored {
    /// A valid session until `expires`; `rotated` is the token to forward
    /// instead when the backend rotated it.
    Valid {
        expires: SystemTime,
        rotated: Option<String>,
    },
    /// Refused by the validation service, remembered until `until`.
    Refused { until: SystemTime },
}

fn millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Stored {
    /// The plain bytes: kind (1 valid, 0 refused), expiry in Unix
    /// milliseconds (8 bytes, little endian), then the rotated token.
    pub fn encode(&self) -> Vec<u8> {
        let (kind, at, rotated) = match self {
            Stored::Valid { expires, rotated } => (1u8, *expires, rotated.as_deref()),
            Stored::Refused { until } => (0u8, *until, None),
        };
        let mut out = Vec::with_capacity(9 + rotated.map_or(0, str::len));
        out.push(kind);
        out.extend_from_slice(&millis(at).to_le_bytes());
        if let Some(r) = rotated {
            out.extend_from_slice(r.as_bytes());
        }
        out
    }

    /// The inverse of [`Stored::encode`]; `None` for anything else.
    pub fn decode(plain: &[u8]) -> Option<Stored> {
        let kind = *plain.first()?;
        let at: [u8; 8] = plain.get(1..9)?.try_into().ok()?;
        let at = UNIX_EPOCH.checked_add(Duration::from_millis(u64::from_le_bytes(at)))?;
        let rest = plain.get(9..)?;
        match kind {
            1 => Some(Stored::Valid {
                expires: at,
                rotated: if rest.is_empty() {
                    None
                } else {
                    Some(std::str::from_utf8(rest).ok()?.to_owned())
                },
            }),
            0 if rest.is_empty() => Some(Stored::Refused { until: at }),
            _ => None,
        }
    }

    /// When Redis should forget it.
    pub fn until(&self) -> SystemTime {
        match self {
            Stored::Valid { expires, .. } => *expires,
            Stored::Refused { until } => *until,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(s: &str) -> Keys {
        Keys::new(&Secret::new(s.as_bytes()))
    }

    #[test]
    fn sealed_values_open_only_with_the_same_key_and_name() {
        let k = keys("0123456789abcdef0123456789abcdef");
        let blob = k.seal(b"portcullis:p:s:aa", b"hello");
        assert_eq!(
            k.open(b"portcullis:p:s:aa", &blob).as_deref(),
            Some(&b"hello"[..])
        );
        // Another Redis key (AAD), another secret, a flipped bit, truncation.
        assert!(k.open(b"portcullis:p:s:ab", &blob).is_none());
        assert!(keys("another secret of at least 32 bytes!")
            .open(b"portcullis:p:s:aa", &blob)
            .is_none());
        for i in 0..blob.len() {
            let mut bad = blob.clone();
            bad[i] ^= 0x40;
            assert!(
                k.open(b"portcullis:p:s:aa", &bad).is_none(),
                "bit flip at {i}"
            );
        }
        for n in 0..blob.len() {
            assert!(k.open(b"portcullis:p:s:aa", &blob[..n]).is_none());
        }
        assert!(!blob.windows(5).any(|w| w == b"hello"));
    }

    #[test]
    fn token_hashes_are_keyed() {
        let a = keys("0123456789abcdef0123456789abcdef");
        let b = keys("0123456789abcdef0123456789abcdeF");
        assert_eq!(a.token_hash(b"t"), a.token_hash(b"t"));
        assert_ne!(a.token_hash(b"t"), b.token_hash(b"t"));
        assert_ne!(a.token_hash(b"t"), a.token_hash(b"u"));
    }

    #[test]
    fn stored_round_trips() {
        let at = UNIX_EPOCH + Duration::from_millis(1_900_000_000_123);
        for s in [
            Stored::Valid {
                expires: at,
                rotated: None,
            },
            Stored::Valid {
                expires: at,
                rotated: Some("new-token".into()),
            },
            Stored::Refused { until: at },
        ] {
            assert_eq!(Stored::decode(&s.encode()), Some(s));
        }
        assert_eq!(Stored::decode(&[]), None);
        assert_eq!(Stored::decode(&[2, 0, 0, 0, 0, 0, 0, 0, 0]), None);
        assert_eq!(Stored::decode(&[0, 0, 0, 0, 0, 0, 0, 0, 0, b'x']), None);
    }
}
