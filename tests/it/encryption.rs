//! Encrypted query parameters: what the backend receives decrypts (Rust
//! keyring, and the Python snippet of docs/encryption.md) to what the device sent.

use crate::support::*;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde_json::json;
use std::collections::HashMap;
use std::path::PathBuf;

async fn gateway_with_session() -> (Backend, Gateway) {
    let backend = Backend::start().await;
    backend.on("/renew_session", Reply::json(200, json!({})));
    let gw = Gateway::for_backend(&backend).await;
    (backend, gw)
}

/// The query the backend received, as `(name, raw value)` pairs in order.
fn pairs(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (k.to_owned(), v.to_owned())
        })
        .collect()
}

async fn search(gw: &Gateway, backend: &Backend, query: &str) -> HashMap<String, String> {
    let r = gw
        .get(&format!("/api/search?{query}"))
        .token("tok")
        .send()
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let rec = backend.last("/search");
    pairs(rec.query.as_deref().unwrap_or_default())
        .into_iter()
        .collect()
}

#[tokio::test]
async fn listed_parameters_arrive_encrypted_and_decrypt_to_the_original() {
    let (backend, gw) = gateway_with_session().await;
    let q = search(
        &gw,
        &backend,
        "username=alice%20smith&page=2&email=ana%40example.com&sort=-date&x=a%2Bb",
    )
    .await;
    let ring = backend_keyring();

    let user = &q["username"];
    assert_ne!(user, "alice%20smith");
    assert!(!user.contains("alice"));
    assert_eq!(crypto_key_id(user), 3, "active key encrypts");
    assert_eq!(ring.decrypt("username", user).unwrap(), b"alice smith");
    assert_eq!(
        ring.decrypt("email", &q["email"]).unwrap(),
        b"ana@example.com"
    );

    // AAD = parameter name: a value moved to another parameter does not decrypt.
    assert!(ring.decrypt("email", user).is_err());

    // Not listed: unchanged, byte for byte, in order.
    let rec = backend.last("/search");
    let order: Vec<String> = pairs(rec.query.as_deref().unwrap())
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(order, ["username", "page", "email", "sort", "x"]);
    assert_eq!(q["page"], "2");
    assert_eq!(q["sort"], "-date");
    assert_eq!(q["x"], "a%2Bb");
    gw.stop().await;
}

fn crypto_key_id(value: &str) -> u8 {
    portcullis::crypto::key_id_of(value).expect("well-formed value")
}

#[tokio::test]
async fn identical_requests_give_different_ciphertexts() {
    let (backend, gw) = gateway_with_session().await;
    let a = search(&gw, &backend, "username=bob").await["username"].clone();
    let b = search(&gw, &backend, "username=bob").await["username"].clone();
    assert_ne!(a, b, "a fresh nonce per value");
    let ring = backend_keyring();
    assert_eq!(ring.decrypt("username", &a).unwrap(), b"bob");
    assert_eq!(ring.decrypt("username", &b).unwrap(), b"bob");

    // Format: 0x01 || key id || 12-byte nonce || ciphertext || 16-byte tag, base64url without padding.
    let blob = URL_SAFE_NO_PAD.decode(&a).unwrap();
    assert_eq!(blob[0], 0x01);
    assert_eq!(blob[1], 3);
    assert_eq!(blob.len(), 2 + 12 + 3 + 16);
    assert!(!a.contains('=') && !a.contains('+') && !a.contains('/'));
    gw.stop().await;
}

#[tokio::test]
async fn tampered_values_fail_to_decrypt() {
    let (backend, gw) = gateway_with_session().await;
    let v = search(&gw, &backend, "username=carol").await["username"].clone();
    let ring = backend_keyring();
    let blob = URL_SAFE_NO_PAD.decode(&v).unwrap();
    for i in [2usize, 10, 14, blob.len() - 1] {
        let mut t = blob.clone();
        t[i] ^= 0x01;
        let t = URL_SAFE_NO_PAD.encode(&t);
        assert!(ring.decrypt("username", &t).is_err(), "byte {i} flipped");
    }
    // Truncated, key id changed, garbage.
    assert!(ring.decrypt("username", &v[..v.len() - 4]).is_err());
    let mut other_key = blob.clone();
    other_key[1] = 7;
    assert!(ring
        .decrypt("username", &URL_SAFE_NO_PAD.encode(&other_key))
        .is_err());
    assert!(ring.decrypt("username", "not-a-value").is_err());
    gw.stop().await;
}

#[tokio::test]
async fn wildcard_and_empty_and_repeated_parameters() {
    let backend = Backend::start().await;
    let gw = GatewayConfig::new(backend.url())
        .route(
            r#"path = "/api/all"
methods = ["GET"]
backend_path = "/all"
public = true
encrypt_query = ["*"]"#,
        )
        .start()
        .await;
    let r = gw
        .get("/api/all?a=1&b=&a=2&c=%C3%A9t%C3%A9&flag")
        .send()
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let rec = backend.last("/all");
    let ring = backend_keyring();
    let got: Vec<(String, Vec<u8>)> = pairs(rec.query.as_deref().unwrap())
        .into_iter()
        .map(|(k, v)| {
            let plain = ring
                .decrypt(&k, &v)
                .unwrap_or_else(|e| panic!("{k}={v}: {e}"));
            (k, plain)
        })
        .collect();
    assert_eq!(
        got,
        [
            ("a".to_owned(), b"1".to_vec()),
            ("b".to_owned(), b"".to_vec()),
            ("a".to_owned(), b"2".to_vec()),
            ("c".to_owned(), "été".as_bytes().to_vec()),
            ("flag".to_owned(), b"".to_vec()),
        ]
    );

    // A malformed escape in an encrypted parameter is refused, not forwarded.
    let before = backend.count("/all");
    let r = gw.get("/api/all?a=%zz").send().await;
    r.assert_envelope(400);
    assert_eq!(backend.count("/all"), before);
    gw.stop().await;
}

#[tokio::test]
async fn routes_without_encrypt_query_pass_the_query_unchanged() {
    let backend = Backend::start().await;
    let gw = Gateway::for_backend(&backend).await;
    let r = gw
        .get("/api/status?username=alice&x=%zz&y=a+b")
        .send()
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        backend.last("/status").uri,
        "/status?username=alice&x=%zz&y=a+b"
    );
    gw.stop().await;
}

/// The ```python block following `<!-- decrypt-snippet -->` in docs/encryption.md.
fn documented_snippet() -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs/encryption.md");
    let readme =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let after = readme
        .split_once("<!-- decrypt-snippet -->")
        .unwrap_or_else(|| panic!("docs/encryption.md has no `<!-- decrypt-snippet -->` marker"))
        .1;
    let start = after
        .find("```python\n")
        .expect("a ```python block after the marker")
        + "```python\n".len();
    let len = after[start..]
        .find("\n```")
        .expect("end of the python block");
    after[start..start + len].to_owned()
}

/// Runs the documented snippet's `decrypt(key, param, value)` with python3.
fn python_decrypt(key_b64: &str, param: &str, value: &str) -> Result<String, String> {
    let script = format!(
        "{}\n\nimport sys\nsys.stdout.write(decrypt(sys.argv[1], sys.argv[2], sys.argv[3]))\n",
        documented_snippet()
    );
    let out = std::process::Command::new("python3")
        .args(["-c", &script, key_b64, param, value])
        .output()
        .expect("run python3");
    if out.status.success() {
        Ok(String::from_utf8(out.stdout).expect("utf-8 output"))
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

#[tokio::test]
async fn readme_python_snippet_decrypts_what_the_gateway_produced() {
    require_python(true);
    // The documented test vector first.
    assert_eq!(
        python_decrypt(
            OLD_KEY_B64,
            "username",
            "AQcAAQIDBAUGBwgJCgs3cLljvLqxfv838vnuiBwA6rjbPbngMD-Da_BcG3bydRB7"
        )
        .unwrap(),
        "proxy_server_admin"
    );

    let (backend, gw) = gateway_with_session().await;
    let q = search(
        &gw,
        &backend,
        "username=Jos%C3%A9%20%C3%81lvarez&email=jose%2Btag%40example.com",
    )
    .await;
    assert_eq!(
        python_decrypt(ACTIVE_KEY_B64, "username", &q["username"]).unwrap(),
        "José Álvarez"
    );
    assert_eq!(
        python_decrypt(ACTIVE_KEY_B64, "email", &q["email"]).unwrap(),
        "jose+tag@example.com"
    );
    // Wrong parameter name or wrong key: the snippet raises.
    assert!(python_decrypt(ACTIVE_KEY_B64, "email", &q["username"]).is_err());
    assert!(python_decrypt(OLD_KEY_B64, "username", &q["username"]).is_err());
    gw.stop().await;
}

#[tokio::test]
async fn an_encoded_parameter_name_is_still_encrypted() {
    let (backend, gw) = gateway_with_session().await;
    // `user%6Eame` is `username` to any backend that decodes names.
    let q = search(&gw, &backend, "user%6Eame=mallory&e%6Dail=m%40x.io").await;
    let ring = backend_keyring();
    assert_eq!(
        ring.decrypt("username", &q["user%6Eame"]).unwrap(),
        b"mallory"
    );
    assert_eq!(ring.decrypt("email", &q["e%6Dail"]).unwrap(), b"m@x.io");
    let rec = backend.last("/search");
    assert!(!rec.uri.contains("mallory"), "{}", rec.uri);
    gw.stop().await;
}
