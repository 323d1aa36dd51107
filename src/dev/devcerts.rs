//! Local development certificates (`portcullis dev-certs`, `portcullis demo --tls`).
//!
//! A throw-away certificate authority and the certificates it issues, made
//! with rcgen (ECDSA P-256). For local work and tests only: production
//! certificates come from the operator's PKI or a public CA.

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use std::path::{Path, PathBuf};
use time::{Duration, OffsetDateTime};

/// The names the development server certificate is valid for.
pub const DEV_NAMES: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

/// A certificate with its private key, both PEM.
pub struct Issued {
    /// PEM certificate.
    pub cert_pem: String,
    /// PEM private key (PKCS#8). Never printed by `Debug`.
    pub key_pem: String,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued")
            .field("key_pem", &"***")
            .finish_non_exhaustive()
    }
}

/// A local certificate authority that issues server and client certificates.
pub struct DevCa {
    issuer: Issuer<'static, KeyPair>,
    /// The CA certificate and key, PEM.
    pub ca: Issued,
}

impl std::fmt::Debug for DevCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevCa").finish_non_exhaustive()
    }
}

fn validity(params: &mut CertificateParams, days: i64) {
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::days(1);
    params.not_after = now + Duration::days(days);
}

impl DevCa {
    /// A new CA named `common_name`, valid for ten years.
    pub fn new(common_name: &str) -> Result<DevCa, rcgen::Error> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        dn.push(DnType::OrganizationName, "portcullis development");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        validity(&mut params, 3650);
        let cert = params.self_signed(&key)?;
        let ca = Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        };
        Ok(DevCa {
            issuer: Issuer::new(params, key),
            ca,
        })
    }

    fn issue(
        &self,
        names: &[&str],
        common_name: &str,
        usage: ExtendedKeyUsagePurpose,
    ) -> Result<Issued, rcgen::Error> {
        let key = KeyPair::generate()?;
        let mut params =
            CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        params.distinguished_name = dn;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![usage];
        params.use_authority_key_identifier_extension = true;
        validity(&mut params, 365);
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// A server certificate for `names` (DNS names or IP addresses), valid a year.
    pub fn issue_server(&self, names: &[&str]) -> Result<Issued, rcgen::Error> {
        let cn = names.first().copied().unwrap_or("localhost");
        self.issue(names, cn, ExtendedKeyUsagePurpose::ServerAuth)
    }

    /// A client certificate (mTLS) for `common_name`, valid a year.
    pub fn issue_client(&self, common_name: &str) -> Result<Issued, rcgen::Error> {
        self.issue(&[], common_name, ExtendedKeyUsagePurpose::ClientAuth)
    }
}

/// The files [`write_dev_certs`] created.
#[derive(Debug, Clone)]
pub struct DevCertFiles {
    /// The CA certificate to trust (`ca.crt`).
    pub ca_cert: PathBuf,
    /// The CA key (`ca.key`, mode 0600): keep it, or delete it once done issuing.
    pub ca_key: PathBuf,
    /// The server certificate (`server.crt`) for [`DEV_NAMES`].
    pub server_cert: PathBuf,
    /// The server key (`server.key`, mode 0600).
    pub server_key: PathBuf,
}

fn write_file(path: &Path, contents: &str, private: bool) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create(true).truncate(true);
        if private {
            opts.mode(0o600);
        }
        let mut f = opts.open(path)?;
        f.write_all(contents.as_bytes())?;
        f.sync_all()
    }
    #[cfg(not(unix))]
    {
        let _ = private;
        std::fs::write(path, contents)
    }
}

/// Creates `out/` if needed and writes a new CA and a server certificate for
/// `localhost`, `127.0.0.1` and `::1` into it.
pub fn write_dev_certs(out: &Path) -> std::io::Result<DevCertFiles> {
    std::fs::create_dir_all(out)?;
    let ca = DevCa::new("portcullis development CA").map_err(std::io::Error::other)?;
    let server = ca.issue_server(&DEV_NAMES).map_err(std::io::Error::other)?;
    let files = DevCertFiles {
        ca_cert: out.join("ca.crt"),
        ca_key: out.join("ca.key"),
        server_cert: out.join("server.crt"),
        server_key: out.join("server.key"),
    };
    write_file(&files.ca_key, &ca.ca.key_pem, true)?;
    write_file(&files.server_key, &server.key_pem, true)?;
    write_file(&files.ca_cert, &ca.ca.cert_pem, false)?;
    write_file(&files.server_cert, &server.cert_pem, false)?;
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_certs_load_as_a_matching_pair() {
        let dir = tempfile::tempdir().unwrap();
        let files = write_dev_certs(dir.path()).unwrap();
        crate::tls::load_certified_key(&files.server_cert, &files.server_key).unwrap();
        // The CA's key does not match the server certificate.
        let err = crate::tls::load_certified_key(&files.server_cert, &files.ca_key).unwrap_err();
        assert!(err.contains("does not match"), "{err}");
        // An error about a key never quotes the key.
        std::fs::write(
            dir.path().join("bad.key"),
            "-----BEGIN PRIVATE KEY-----\nnot base64!\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        let err = crate::tls::load_certified_key(&files.server_cert, &dir.path().join("bad.key"))
            .unwrap_err();
        assert!(!err.contains("not base64"), "{err}");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&files.server_key)
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o077, 0);
        }
    }
}
