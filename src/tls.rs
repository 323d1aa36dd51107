//! TLS both ways, with rustls (ring provider, TLS 1.2 and 1.3 only).
//!
//! - Device side: [`ServerTls`] terminates TLS for the listener. Protocol
//!   versions are TLS 1.3 and 1.2; cipher suites are rustls's defaults for the
//!   ring provider, all AEAD with ephemeral (EC)DHE key exchange:
//!   TLS 1.3 AES-256-GCM, AES-128-GCM, ChaCha20-Poly1305; TLS 1.2
//!   ECDHE-{ECDSA,RSA} with AES-256-GCM, AES-128-GCM, ChaCha20-Poly1305. ALPN
//!   offers `h2` and `http/1.1`; stateless session tickets allow resumption.
//!   The certificate comes from [`CertReloader`],
//!   which re-reads the PEM files (and the DER OCSP response stapled to
//!   handshakes, `server.tls.ocsp`) when their contents change (polled, and on SIGHUP) and
//!   keeps the old certificate when the new files do not load.
//! - Backend side: [`BackendTls`] carries the client configuration for
//!   `https://` backends: the trust roots (`backend.ca`, or the public
//!   webpki roots when none is given), an optional client certificate (mTLS),
//!   ALPN `http/1.1` and the server name used for SNI and verification.
//!
//! Private keys are read into rustls's signing keys and never printed: error
//! messages name the file, never its contents.

use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

/// ALPN protocol ids offered to devices, in order of preference.
pub const SERVER_ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// The crypto provider used everywhere: ring, with its default (AEAD-only) suites.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Protocol versions accepted both ways: TLS 1.3 and TLS 1.2, nothing older.
pub const VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

/// `server.tls`: where the device-facing certificate chain and key live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// DER OCSP response stapled to handshakes (`server.tls.ocsp`), kept
    /// fresh by the operator's renewal job (e.g. `openssl ocsp -respout`).
    pub ocsp: Option<PathBuf>,
    /// How often the files are checked for changes.
    pub reload_interval: Duration,
}

/// Reads a PEM certificate chain (leaf first); fails on an empty file.
pub fn read_cert_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let chain = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: invalid PEM certificate: {e}", path.display()))?;
    if chain.is_empty() {
        return Err(format!("{}: no CERTIFICATE found", path.display()));
    }
    Ok(chain)
}

/// Reads a PEM private key. The error never quotes the file's contents.
pub fn read_private_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| match e {
        rustls_pki_types::pem::Error::NoItemsFound => {
            format!("{}: no PRIVATE KEY found", path.display())
        }
        _ => format!("{}: invalid PEM private key", path.display()),
    })
}

/// Loads a certificate chain and its key, checking that they parse and match.
pub fn load_certified_key(cert: &Path, key: &Path) -> Result<CertifiedKey, String> {
    let chain = read_cert_chain(cert)?;
    let key_der = read_private_key(key)?;
    CertifiedKey::from_der(chain, key_der, &provider()).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => format!(
            "{} does not match the certificate in {}",
            key.display(),
            cert.display()
        ),
        other => format!(
            "cannot use {} with {}: {other}",
            key.display(),
            cert.display()
        ),
    })
}

/// Largest OCSP response accepted for stapling (real ones are 1–4 KiB).
const MAX_OCSP: usize = 64 << 10;

/// Reads a DER OCSP response for stapling. Only the framing is checked (one
/// complete DER `SEQUENCE`, as `openssl ocsp -respout` writes): a PEM or
/// base64 file given by mistake is refused rather than sent to devices.
pub fn read_ocsp(path: &Path) -> Result<Vec<u8>, String> {
    let der = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if der.len() > MAX_OCSP {
        return Err(format!(
            "{}: OCSP response over {} KiB",
            path.display(),
            MAX_OCSP >> 10
        ));
    }
    if der_sequence_len(&der) != Some(der.len()) {
        return Err(format!(
            "{}: not a DER OCSP response (expected `openssl ocsp -respout` output)",
            path.display()
        ));
    }
    Ok(der)
}

/// Total length (header included) of the DER `SEQUENCE` `der` starts with.
fn der_sequence_len(der: &[u8]) -> Option<usize> {
    let (&tag, rest) = der.split_first()?;
    let (&first, rest) = rest.split_first()?;
    if tag != 0x30 {
        return None;
    }
    if first < 0x80 {
        return Some(2 + usize::from(first));
    }
    let n = usize::from(first & 0x7f);
    if n == 0 || n > 3 {
        return None;
    }
    let len = rest
        .get(..n)?
        .iter()
        .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
    Some(2 + n + len)
}

/// Loads the device-facing certificate of `files`: chain, key and, when
/// configured, the OCSP response to staple.
pub fn load_server_key(files: &TlsFiles) -> Result<CertifiedKey, String> {
    let mut key = load_certified_key(&files.cert, &files.key)?;
    if let Some(ocsp) = &files.ocsp {
        key.ocsp = Some(read_ocsp(ocsp)?);
    }
    Ok(key)
}

/// What identifies one version of a file: the SHA-256 of its contents
/// (`None` while unreadable). Contents, not modification times: renewal tools
/// and Kubernetes secret volumes may keep or even move back a file's mtime, and
/// coarse timestamps miss a quick second write.
type Stamp = Option<[u8; 32]>;

fn stamp(path: &Path) -> Stamp {
    use sha2::Digest;
    let bytes = std::fs::read(path).ok()?;
    Some(sha2::Sha256::digest(&bytes).into())
}

fn stamps(files: &TlsFiles) -> [Stamp; 3] {
    [
        stamp(&files.cert),
        stamp(&files.key),
        files.ocsp.as_deref().and_then(stamp),
    ]
}

/// The device-facing certificate, swapped in place when its files change.
///
/// Handshakes read the current certificate under a read lock (an `Arc`
/// clone); [`CertReloader::reload_if_changed`] replaces it only after the new
/// chain and key loaded and matched, so a bad update never takes the
/// listener down: it is logged and the previous certificate keeps serving.
pub struct CertReloader {
    files: TlsFiles,
    current: RwLock<Arc<CertifiedKey>>,
    seen: Mutex<[Stamp; 3]>,
}

impl std::fmt::Debug for CertReloader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertReloader")
            .field("cert", &self.files.cert)
            .field("key", &self.files.key)
            .finish_non_exhaustive()
    }
}

impl CertReloader {
    /// Loads the files once; fails when they do not load (start-up refuses).
    pub fn new(files: TlsFiles) -> Result<CertReloader, String> {
        let seen = stamps(&files);
        let key = load_server_key(&files)?;
        Ok(CertReloader {
            files,
            current: RwLock::new(Arc::new(key)),
            seen: Mutex::new(seen),
        })
    }

    /// Re-reads the files if their contents changed.
    /// `Ok(true)` when a new certificate was swapped in; on `Err` the old
    /// one stays (and the same broken files are not retried until they change).
    pub fn reload_if_changed(&self) -> Result<bool, String> {
        let now = stamps(&self.files);
        {
            let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
            if *seen == now {
                return Ok(false);
            }
            *seen = now;
        }
        let key = load_server_key(&self.files)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(key);
        Ok(true)
    }

    /// The certificate new handshakes get.
    pub fn current(&self) -> Arc<CertifiedKey> {
        Arc::clone(&self.current.read().unwrap_or_else(|e| e.into_inner()))
    }

    fn check_and_log(&self) {
        match self.reload_if_changed() {
            Ok(true) => tracing::info!(
                cert = %self.files.cert.display(),
                "TLS certificate reloaded; new connections use it"
            ),
            Ok(false) => {}
            Err(e) => {
                tracing::error!("TLS certificate not reloaded, keeping the previous one: {e}")
            }
        }
    }
}

impl ResolvesServerCert for CertReloader {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

/// The listener's TLS side: an acceptor plus the task that reloads its certificate.
pub struct ServerTls {
    /// Performs the handshakes.
    pub acceptor: tokio_rustls::TlsAcceptor,
    /// The certificate in use (exposed for tests and diagnostics).
    pub reloader: Arc<CertReloader>,
    watch: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("reloader", &self.reloader)
            .finish_non_exhaustive()
    }
}

impl Drop for ServerTls {
    fn drop(&mut self) {
        self.watch.abort();
    }
}

impl ServerTls {
    /// Loads the certificate and starts watching its files (every
    /// `files.reload_interval`, and on SIGHUP). Must run inside a tokio runtime.
    pub fn start(files: &TlsFiles) -> Result<ServerTls, String> {
        let reloader = Arc::new(CertReloader::new(files.clone())?);
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(VERSIONS)
            .map_err(|e| format!("TLS setup: {e}"))?
            .with_no_client_auth()
            .with_cert_resolver(Arc::clone(&reloader) as Arc<dyn ResolvesServerCert>);
        config.alpn_protocols = SERVER_ALPN.iter().map(|p| p.to_vec()).collect();
        // The server's suite order (AES-256-GCM first), not the client's.
        config.ignore_client_order = true;
        // Stateless session tickets (keys rotated every 6 hours, kept in memory
        // only): returning devices resume without a full handshake, however
        // many there are. TLS 1.3 resumption still runs an ECDHE exchange.
        config.ticketer =
            rustls::crypto::ring::Ticketer::new().map_err(|e| format!("TLS setup: {e}"))?;
        let watch = tokio::spawn(watch_files(Arc::clone(&reloader), files.reload_interval));
        Ok(ServerTls {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
            reloader,
            watch,
        })
    }
}

async fn watch_files(reloader: Arc<CertReloader>, every: Duration) {
    #[cfg(unix)]
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    let every = every.max(Duration::from_millis(50));
    loop {
        #[cfg(unix)]
        {
            let hangup = async {
                match hup.as_mut() {
                    Some(h) => {
                        h.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                () = tokio::time::sleep(every) => {},
                () = hangup => {},
            }
        }
        #[cfg(not(unix))]
        tokio::time::sleep(every).await;
        let r = Arc::clone(&reloader);
        let _ = tokio::task::spawn_blocking(move || r.check_and_log()).await;
    }
}

/// `Strict-Transport-Security` sent on HTTPS responses: one year, no
/// `includeSubDomains` (the gateway cannot speak for sibling hosts).
pub const HSTS: http::HeaderValue = http::HeaderValue::from_static("max-age=31536000");

/// Adds `Strict-Transport-Security` and `X-Content-Type-Options: nosniff` to
/// a response served over TLS, unless the backend already set them.
pub fn add_security_headers(headers: &mut http::HeaderMap) {
    headers
        .entry(http::header::STRICT_TRANSPORT_SECURITY)
        .or_insert(HSTS);
    headers
        .entry(http::header::X_CONTENT_TYPE_OPTIONS)
        .or_insert(http::HeaderValue::from_static("nosniff"));
}

/// TLS towards an `https://` backend.
#[derive(Clone)]
pub struct BackendTls {
    /// rustls client configuration (roots, optional client certificate, ALPN `http/1.1`).
    pub config: Arc<ClientConfig>,
    /// Sent as SNI (DNS names) and verified against the backend's certificate.
    pub server_name: ServerName<'static>,
}

impl std::fmt::Debug for BackendTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackendTls")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl BackendTls {
    /// Builds the client side for backend host `host` (a DNS name or an IP
    /// address, IPv6 with or without brackets). With `ca`, only the
    /// certificates in that PEM file are trusted (private PKI); without, the
    /// public webpki roots are. `client` is a (certificate chain, key) pair
    /// presented when the backend asks for one (mTLS).
    pub fn new(
        host: &str,
        ca: Option<&Path>,
        client: Option<(&Path, &Path)>,
    ) -> Result<BackendTls, String> {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let server_name = ServerName::try_from(host.to_owned())
            .map_err(|_| format!("{host:?} is not a valid TLS server name"))?;
        let mut roots = RootCertStore::empty();
        match ca {
            Some(ca) => {
                for cert in read_cert_chain(ca)? {
                    roots
                        .add(cert)
                        .map_err(|e| format!("{}: unusable CA certificate: {e}", ca.display()))?;
                }
            }
            None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        }
        let builder = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(VERSIONS)
            .map_err(|e| format!("TLS setup: {e}"))?
            .with_root_certificates(roots);
        let mut config = match client {
            Some((cert, key)) => {
                let chain = read_cert_chain(cert)?;
                let key_der = read_private_key(key)?;
                // Checks that the key parses and matches before handing it over.
                load_certified_key(cert, key)?;
                builder
                    .with_client_auth_cert(chain, key_der)
                    .map_err(|e| format!("{}: unusable client certificate: {e}", cert.display()))?
            }
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(BackendTls {
            config: Arc::new(config),
            server_name,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ocsp_files_must_be_one_der_sequence() {
        assert_eq!(der_sequence_len(&[0x30, 0x03, 0x0a, 0x01, 0x06]), Some(5));
        assert_eq!(der_sequence_len(&[0x30, 0x82, 0x01, 0x00]), Some(260));
        for bad in [
            &b""[..],
            &[0x30],
            &[0x31, 0x00],
            &[0x30, 0x80],
            &[0x30, 0x84, 1, 0, 0, 0],
            &[0x30, 0x82, 0x01],
            b"-----BEGIN",
        ] {
            assert!(
                der_sequence_len(bad).is_none_or(|n| n != bad.len()),
                "{bad:?}"
            );
        }
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("ok.der");
        std::fs::write(&good, [0x30, 0x03, 0x0a, 0x01, 0x06]).unwrap();
        assert_eq!(read_ocsp(&good).unwrap().len(), 5);
        let truncated = dir.path().join("cut.der");
        std::fs::write(&truncated, [0x30, 0x05, 0x0a, 0x01]).unwrap();
        assert!(read_ocsp(&truncated)
            .unwrap_err()
            .contains("not a DER OCSP response"));
        assert!(read_ocsp(&dir.path().join("missing"))
            .unwrap_err()
            .contains("cannot read"));
    }

    #[test]
    fn a_replaced_pair_is_picked_up_even_with_the_old_mtime() {
        let dir = tempfile::tempdir().unwrap();
        let ca = crate::dev::devcerts::DevCa::new("CA").unwrap();
        let (a, b) = (
            ca.issue_server(&["localhost"]).unwrap(),
            ca.issue_server(&["localhost"]).unwrap(),
        );
        let files = TlsFiles {
            cert: dir.path().join("c.pem"),
            key: dir.path().join("k.pem"),
            ocsp: None,
            reload_interval: Duration::from_secs(5),
        };
        std::fs::write(&files.cert, &a.cert_pem).unwrap();
        std::fs::write(&files.key, &a.key_pem).unwrap();
        let mtime = std::fs::metadata(&files.cert).unwrap().modified().unwrap();
        let r = CertReloader::new(files.clone()).unwrap();
        let first = r.current();
        assert!(!r.reload_if_changed().unwrap(), "nothing changed");

        // A certificate that does not match the key: refused, old one kept, not retried.
        std::fs::write(&files.cert, &b.cert_pem).unwrap();
        assert!(r
            .reload_if_changed()
            .unwrap_err()
            .contains("does not match"));
        assert!(Arc::ptr_eq(&first, &r.current()));
        assert!(!r.reload_if_changed().unwrap());

        // Its key arrives; both files get their old modification time back.
        std::fs::write(&files.key, &b.key_pem).unwrap();
        for p in [&files.cert, &files.key] {
            std::fs::File::options()
                .write(true)
                .open(p)
                .unwrap()
                .set_modified(mtime)
                .unwrap();
        }
        assert!(r.reload_if_changed().unwrap());
        assert!(!Arc::ptr_eq(&first, &r.current()));
        assert_ne!(first.cert, r.current().cert);
    }
}
