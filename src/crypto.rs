//! Encrypted query parameters.
//!
//! A value `v` of parameter `n` becomes
//! `base64url_nopad(0x01 || key_id || nonce(12) || AES-256-GCM(key, nonce, v, aad = n))`.
//! The gateway encrypts with the active key and a fresh random nonce per value;
//! backends decrypt with [`Keyring::decrypt`], `portcullis decrypt`, or the
//! Python snippet in the README.

use crate::secret::Secret;
use aes_gcm::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use std::fmt;

/// Format version byte at the start of every encrypted value.
pub const VERSION: u8 = 0x01;
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
/// version + key id + nonce + tag: the smallest valid blob (empty plaintext).
const MIN_BLOB: usize = 2 + NONCE_LEN + TAG_LEN;

/// Why a value could not be decrypted. Deliberately coarse: a caller learns
/// nothing that would help forge a value.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecryptError {
    #[error("value is not base64url")]
    Encoding,
    #[error("value is too short or has an unknown version")]
    Format,
    #[error("no key with id {0}")]
    UnknownKey(u8),
    #[error("value does not authenticate (wrong key, parameter name, or tampered)")]
    Authentication,
}

/// Decodes a configured AES key: 32 bytes, written as standard or URL-safe base64.
pub fn decode_key(secret: &Secret) -> Result<Secret, String> {
    let text = secret
        .expose_str()
        .ok_or_else(|| "key must be base64 text".to_owned())?
        .trim();
    let bytes = STANDARD
        .decode(text)
        .or_else(|_| URL_SAFE_NO_PAD.decode(text.trim_end_matches('=')))
        .map_err(|_| "key is not valid base64".to_owned())?;
    if bytes.len() != 32 {
        return Err(format!("key must be 32 bytes, found {}", bytes.len()));
    }
    Ok(Secret::new(bytes))
}

/// A new random key, base64-encoded, as `portcullis keygen` prints it.
pub fn generate_key() -> String {
    STANDARD.encode(Aes256Gcm::generate_key(OsRng))
}

/// The key id carried inside an encrypted value, if it is well-formed.
pub fn key_id_of(value: &str) -> Option<u8> {
    let blob = URL_SAFE_NO_PAD.decode(value.trim_end_matches('=')).ok()?;
    (blob.len() >= MIN_BLOB && blob[0] == VERSION).then(|| blob[1])
}

/// The configured keys: one active for encryption, all usable for decryption.
pub struct Keyring {
    active: u8,
    keys: Vec<(u8, Aes256Gcm)>,
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ids: Vec<u8> = self.keys.iter().map(|(id, _)| *id).collect();
        f.debug_struct("Keyring")
            .field("active", &self.active)
            .field("key_ids", &ids)
            .finish()
    }
}

impl Keyring {
    /// Builds a keyring from 32-byte keys. `None` when `active` is not among them
    /// or a key has the wrong length (validated config never does that).
    pub fn new(active: u8, keys: &[(u8, Secret)]) -> Option<Keyring> {
        let mut ring = Vec::with_capacity(keys.len());
        for (id, key) in keys {
            ring.push((*id, Aes256Gcm::new_from_slice(key.expose()).ok()?));
        }
        ring.iter()
            .any(|(id, _)| *id == active)
            .then_some(Keyring { active, keys: ring })
    }

    fn cipher(&self, id: u8) -> Option<&Aes256Gcm> {
        self.keys.iter().find(|(k, _)| *k == id).map(|(_, c)| c)
    }

    /// Encrypts `value` of parameter `name` with the active key and a fresh nonce.
    pub fn encrypt(&self, name: &str, value: &[u8]) -> String {
        let nonce = Aes256Gcm::generate_nonce(OsRng);
        self.encrypt_with_nonce(name, value, nonce.into())
    }

    /// Encryption with a caller-chosen nonce: only for the test vector.
    fn encrypt_with_nonce(&self, name: &str, value: &[u8], nonce: [u8; NONCE_LEN]) -> String {
        let mut blob = Vec::with_capacity(MIN_BLOB + value.len());
        blob.push(VERSION);
        blob.push(self.active);
        blob.extend_from_slice(&nonce);
        // The active key is always in the ring (checked in `new`), and AES-GCM
        // encryption of an in-memory buffer has no failure mode but length
        // overflow (> 64 GiB), which a query parameter cannot reach.
        if let Some(cipher) = self.cipher(self.active) {
            let payload = Payload {
                msg: value,
                aad: name.as_bytes(),
            };
            if let Ok(ct) = cipher.encrypt(Nonce::from_slice(&nonce), payload) {
                blob.extend_from_slice(&ct);
            }
        }
        URL_SAFE_NO_PAD.encode(blob)
    }

    /// Decrypts a value produced for parameter `name`.
    pub fn decrypt(&self, name: &str, value: &str) -> Result<Vec<u8>, DecryptError> {
        let blob = URL_SAFE_NO_PAD
            .decode(value.trim_end_matches('='))
            .map_err(|_| DecryptError::Encoding)?;
        if blob.len() < MIN_BLOB || blob[0] != VERSION {
            return Err(DecryptError::Format);
        }
        let key_id = blob[1];
        let cipher = self
            .cipher(key_id)
            .ok_or(DecryptError::UnknownKey(key_id))?;
        let (nonce, ct) = blob[2..].split_at(NONCE_LEN);
        cipher
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: ct,
                    aad: name.as_bytes(),
                },
            )
            .map_err(|_| DecryptError::Authentication)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VECTOR_KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
    const VECTOR_OUT: &str = "AQcAAQIDBAUGBwgJCgs3cLljvLqxfv838vnuiBwA6rjbPbngMD-Da_BcG3bydRB7";

    fn ring() -> Keyring {
        let key = decode_key(&Secret::new(VECTOR_KEY)).unwrap();
        Keyring::new(7, &[(7, key)]).unwrap()
    }

    #[test]
    fn spec_test_vector() {
        let nonce: [u8; 12] = core::array::from_fn(|i| i as u8);
        let out = ring().encrypt_with_nonce("username", b"proxy_server_admin", nonce);
        assert_eq!(out, VECTOR_OUT);
        assert_eq!(
            ring().decrypt("username", VECTOR_OUT).unwrap(),
            b"proxy_server_admin"
        );
    }

    #[test]
    fn fresh_nonce_per_value() {
        let r = ring();
        let a = r.encrypt("username", b"alice");
        let b = r.encrypt("username", b"alice");
        assert_ne!(a, b);
        assert_eq!(r.decrypt("username", &a).unwrap(), b"alice");
        assert_eq!(r.decrypt("username", &b).unwrap(), b"alice");
    }

    #[test]
    fn tampering_wrong_name_wrong_key_truncation_fail() {
        let r = ring();
        assert_eq!(
            r.decrypt("email", VECTOR_OUT),
            Err(DecryptError::Authentication)
        );
        let mut blob = URL_SAFE_NO_PAD.decode(VECTOR_OUT).unwrap();
        let last = blob.len() - 1;
        blob[last] ^= 1;
        let tampered = URL_SAFE_NO_PAD.encode(&blob);
        assert_eq!(
            r.decrypt("username", &tampered),
            Err(DecryptError::Authentication)
        );
        assert_eq!(
            r.decrypt("username", &VECTOR_OUT[..20]),
            Err(DecryptError::Format)
        );
        assert_eq!(r.decrypt("username", "!!!"), Err(DecryptError::Encoding));
        let other = Keyring::new(7, &[(7, Secret::new([9u8; 32]))]).unwrap();
        assert_eq!(
            other.decrypt("username", VECTOR_OUT),
            Err(DecryptError::Authentication)
        );
        let other_id = Keyring::new(1, &[(1, Secret::new([9u8; 32]))]).unwrap();
        assert_eq!(
            other_id.decrypt("username", VECTOR_OUT),
            Err(DecryptError::UnknownKey(7))
        );
    }

    #[test]
    fn generated_keys_decode() {
        let k = generate_key();
        assert_eq!(decode_key(&Secret::new(k)).unwrap().expose().len(), 32);
        assert!(decode_key(&Secret::new("c2hvcnQ=")).is_err());
    }
}
