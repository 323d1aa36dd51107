//! Secrets: values that must never be printed, and the constant-time matchers
//! that check device API keys and operator tokens against configured ones.
//!
//! A secret in the configuration is written literally, as `env:VAR` (read from
//! the environment) or as `file:/path` (read from a file, trailing newline
//! trimmed). A *matcher* may additionally be given as `sha256:<hex>`, so the
//! plain key never has to be written down anywhere the gateway runs.

use sha2::{Digest, Sha256};
use std::fmt;
use subtle::ConstantTimeEq;

/// A secret value. `Debug` and `Display` print `***`; the bytes are reachable
/// only through [`Secret::expose`], which makes every use greppable.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Box<[u8]>);

impl Secret {
    /// Wraps raw bytes.
    pub fn new(bytes: impl Into<Vec<u8>>) -> Self {
        Secret(bytes.into().into_boxed_slice())
    }

    /// The secret's bytes. Callers must not log or echo them.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    /// The secret as UTF-8 text, if it is.
    pub fn expose_str(&self) -> Option<&str> {
        std::str::from_utf8(&self.0).ok()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// Resolves a secret specification (`env:VAR`, `file:/path` or a literal).
/// The error message names the source, never the value.
pub fn resolve(spec: &str) -> Result<Secret, String> {
    if let Some(var) = spec.strip_prefix("env:") {
        match std::env::var(var) {
            Ok(v) if !v.is_empty() => Ok(Secret::new(v)),
            Ok(_) => Err(format!("environment variable {var} is empty")),
            Err(_) => Err(format!("environment variable {var} is not set")),
        }
    } else if let Some(path) = spec.strip_prefix("file:") {
        match std::fs::read(path) {
            Ok(mut bytes) => {
                while matches!(bytes.last(), Some(b'\n' | b'\r')) {
                    bytes.pop();
                }
                if bytes.is_empty() {
                    Err(format!("secret file {path} is empty"))
                } else {
                    Ok(Secret::new(bytes))
                }
            }
            Err(e) => Err(format!("cannot read secret file {path}: {e}")),
        }
    } else if spec.is_empty() {
        Err("secret is empty".to_owned())
    } else {
        Ok(Secret::new(spec.as_bytes()))
    }
}

/// SHA-256 of `bytes`.
pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// The `sha256:<hex>` form of a secret, as `portcullis hash-secret` prints it.
pub fn hash_form(secret: &[u8]) -> String {
    format!("sha256:{}", hex(&sha256(secret)))
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    use fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        // Writing to a String cannot fail.
        let _ = write!(s, "{b:02x}");
    }
    s
}

fn parse_hex32(s: &str) -> Option<[u8; 32]> {
    let bytes = s.as_bytes();
    if bytes.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in bytes.chunks_exact(2).enumerate() {
        let hi = (pair[0] as char).to_digit(16)?;
        let lo = (pair[1] as char).to_digit(16)?;
        out[i] = (hi * 16 + lo) as u8;
    }
    Some(out)
}

/// Checks a presented credential against one configured key. Keys are kept
/// only as SHA-256 digests, so a plain and a `sha256:` key behave the same and
/// the comparison of digests is constant-time.
#[derive(Clone)]
pub struct Matcher {
    digest: [u8; 32],
}

impl Matcher {
    /// Builds a matcher from a resolved secret: `sha256:<64 hex>` or a plain key.
    pub fn from_secret(secret: &Secret) -> Result<Self, String> {
        let text = secret.expose_str();
        if let Some(hex) = text.and_then(|t| t.strip_prefix("sha256:")) {
            return parse_hex32(hex.trim())
                .map(|digest| Matcher { digest })
                .ok_or_else(|| "sha256: must be followed by 64 hex digits".to_owned());
        }
        Ok(Matcher {
            digest: sha256(secret.expose()),
        })
    }

    /// Constant-time check of a presented credential's digest.
    pub fn matches_digest(&self, presented: &[u8; 32]) -> bool {
        self.digest.ct_eq(presented).into()
    }
}

/// Two matchers are equal when they accept the same credential (their
/// digests compared in constant time): how a reload tells a changed token.
impl PartialEq for Matcher {
    fn eq(&self, other: &Self) -> bool {
        self.digest.ct_eq(&other.digest).into()
    }
}

impl Eq for Matcher {}

impl fmt::Debug for Matcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Matcher(***)")
    }
}

/// Finds which of `keys` matches `presented`, comparing against every key so
/// the time taken does not depend on which one (if any) matched.
pub fn find_match<'a, T>(
    keys: impl IntoIterator<Item = (&'a Matcher, T)>,
    presented: &[u8],
) -> Option<T> {
    let digest = sha256(presented);
    let mut found = None;
    for (matcher, value) in keys {
        if matcher.matches_digest(&digest) && found.is_none() {
            found = Some(value);
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_prints_the_value() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?} {s}"), "Secret(***) ***");
        let m = Matcher::from_secret(&s).unwrap();
        assert!(!format!("{m:?}").contains("hunter2"));
    }

    #[test]
    fn plain_and_hashed_keys_match_the_same_input() {
        let plain = Matcher::from_secret(&Secret::new("test")).unwrap();
        let hashed = Matcher::from_secret(&Secret::new(
            "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
        ))
        .unwrap();
        let keys = [(&plain, 1), (&hashed, 2)];
        assert_eq!(
            find_match(keys.iter().map(|(m, v)| (*m, *v)), b"test"),
            Some(1)
        );
        assert_eq!(find_match([(&hashed, 2)], b"test"), Some(2));
        assert_eq!(find_match([(&hashed, 2)], b"tesT"), None);
        assert_eq!(
            hash_form(b"test"),
            format!("sha256:{}", hex(&hashed.digest))
        );
    }

    #[test]
    fn bad_digest_is_refused() {
        assert!(Matcher::from_secret(&Secret::new("sha256:abc")).is_err());
    }

    #[test]
    fn env_and_file_sources() {
        std::env::set_var("PORTCULLIS_TEST_SECRET_X", "from-env");
        assert_eq!(
            resolve("env:PORTCULLIS_TEST_SECRET_X").unwrap().expose(),
            b"from-env"
        );
        assert!(resolve("env:PORTCULLIS_TEST_SECRET_UNSET").is_err());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        std::fs::write(&path, "from-file\n").unwrap();
        let spec = format!("file:{}", path.display());
        assert_eq!(resolve(&spec).unwrap().expose(), b"from-file");
    }
}
