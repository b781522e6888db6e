//! TLS termination: the certificate and key from `[balancer] tls_cert` / `tls_key`, and their
//! reload on SIGHUP.
//!
//! The balancer holds one [`Certificates`]; each accepted connection takes the current
//! `rustls::ServerConfig` from it for its handshake (tokio-rustls), so a reload reaches new
//! connections at once while open ones keep the session they negotiated. Only ALPN http/1.1 is
//! offered: the worker speaks HTTP/1.1 and WebSocket upgrades need it. The crypto provider is
//! ring, given explicitly so that the library does not depend on a process-wide default.

use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};

use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// What can go wrong with the certificate or key.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TlsError {
    /// A PEM file could not be read or holds nothing usable.
    #[error("{path}: {reason}")]
    Pem { path: String, reason: String },
    /// rustls refused the pair (say, a key that does not match the certificate).
    #[error("certificate and key: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The files and the current server configuration built from them.
#[derive(Debug)]
pub(crate) struct Certificates {
    cert: PathBuf,
    key: PathBuf,
    /// std RwLock: read (an Arc clone) once per handshake, written on SIGHUP; never held
    /// across an await.
    current: RwLock<Arc<ServerConfig>>,
}

impl Certificates {
    /// Loads the pair; an error names the file.
    pub(crate) fn load(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let config = server_config(cert, key)?;
        Ok(Self { cert: cert.to_owned(), key: key.to_owned(), current: RwLock::new(config) })
    }

    /// The configuration for a new handshake.
    pub(crate) fn current(&self) -> Arc<ServerConfig> {
        self.current.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Reads the files again; on error the previous pair stays in use.
    pub(crate) fn reload(&self) -> Result<(), TlsError> {
        let config = server_config(&self.cert, &self.key)?;
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = config;
        Ok(())
    }
}

/// A rustls server configuration (ring provider, TLS 1.2 and 1.3, ALPN http/1.1) for the pair.
pub(crate) fn server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let pem = |path: &Path, reason: String| TlsError::Pem { path: path.display().to_string(), reason };
    let chain = CertificateDer::pem_file_iter(cert)
        .map_err(|e| pem(cert, e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem(cert, e.to_string()))?;
    if chain.is_empty() {
        return Err(pem(cert, "no CERTIFICATE block".into()));
    }
    // PKCS#8, PKCS#1 (RSA) and SEC1 (EC) blocks are all accepted.
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| pem(key, e.to_string()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key_der)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn reads_pkcs1_rsa_and_sec1_ec_keys() {
        let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/testdata");
        for (cert, key) in [("rsa.crt", "rsa-pkcs1.key"), ("ec.crt", "ec-sec1.key")] {
            let certificates = Certificates::load(&data.join(cert), &data.join(key));
            assert!(certificates.is_ok(), "{key}: {:?}", certificates.err());
        }
    }

    #[test]
    fn loads_a_pair_names_bad_files_and_keeps_the_old_pair_on_a_bad_reload() {
        let dir = tempfile::tempdir().unwrap();
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert =
            rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap().self_signed(&key).unwrap();
        let cert_path = write(dir.path(), "cert.pem", &cert.pem());
        let key_path = write(dir.path(), "key.pem", &key.serialize_pem());
        let certificates = Certificates::load(&cert_path, &key_path).unwrap();
        assert_eq!(certificates.current().alpn_protocols, [b"http/1.1".to_vec()]);

        let garbage = write(dir.path(), "garbage.pem", "not pem at all\n");
        let err = Certificates::load(&garbage, &key_path).unwrap_err().to_string();
        assert!(err.contains("garbage.pem"), "{err}");
        let err = Certificates::load(&cert_path, &garbage).unwrap_err().to_string();
        assert!(err.contains("garbage.pem"), "{err}");

        // A key of another pair is refused, and a failed reload keeps the old pair.
        let other = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        write(dir.path(), "key.pem", &other.serialize_pem());
        assert!(certificates.reload().is_err());
        assert_eq!(certificates.current().alpn_protocols, [b"http/1.1".to_vec()]);
    }
}
