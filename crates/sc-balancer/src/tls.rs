//! TLS termination: the certificate and key from `[balancer] tls_cert` / `tls_key`, and their
//! reload on SIGHUP.
//!
//! The balancer holds one [`Certificates`]; each accepted connection takes the current
//! `rustls::ServerConfig` from it for its handshake (tokio-rustls), so a reload reaches new
//! connections at once while open ones keep the session they negotiated. Only ALPN http/1.1 is
//! offered: the worker speaks HTTP/1.1 and WebSocket upgrades need it. The crypto provider is
//! ring, given explicitly so that the library does not depend on a process-wide default.
//!
//! [`handshake`] reads the client record by record, so that it never takes from the socket
//! anything past the client's last handshake record: whoever carries on the session, the
//! balancer's forwarder or (after a hand-off, [`session`]) the worker, finds the rest there.

use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};

use rustls::crypto::cipher::{AeadKey, Iv};
use rustls::{ConnectionTrafficSecrets, ProtocolVersion, ServerConfig, ServerConnection};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use sc_common::handoff::{TlsSession, TlsSuite, TrafficKeys};
use tokio::io::Interest;
use tokio::net::TcpStream;

/// A TLS record's header: type, version, length.
const RECORD_HEADER: usize = 5;

/// What can go wrong with the certificate or key.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TlsError {
    /// The certificate file could not be read or holds no certificate.
    #[error("{path}: {reason}")]
    Cert { path: String, reason: String },
    /// The key file could not be read, holds no key, or holds an encrypted one.
    #[error("{path}: {reason}")]
    Key { path: String, reason: String },
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

impl TlsError {
    /// The configuration key to blame.
    pub(crate) fn config_key(&self) -> &'static str {
        match self {
            TlsError::Cert { .. } => "balancer.tls_cert",
            TlsError::Key { .. } => "balancer.tls_key",
            TlsError::Rustls(_) => "balancer.tls_cert, balancer.tls_key",
        }
    }
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
    let cert_error = |reason: String| TlsError::Cert { path: cert.display().to_string(), reason };
    let key_error = |reason: String| TlsError::Key { path: key.display().to_string(), reason };
    let chain = CertificateDer::pem_file_iter(cert)
        .map_err(|e| cert_error(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| cert_error(e.to_string()))?;
    if chain.is_empty() {
        return Err(cert_error("no CERTIFICATE block".into()));
    }
    let key_pem = std::fs::read(key).map_err(|e| key_error(e.to_string()))?;
    // Encrypted keys are refused by name: the PEM reader would skip their blocks and report
    // "no items found". They would need a passphrase in the configuration, which is no safer
    // than a plain key file readable by the service user only.
    if contains(&key_pem, b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
        || contains(&key_pem, b"Proc-Type: 4,ENCRYPTED")
    {
        return Err(key_error(format!(
            "encrypted private keys are not supported; decrypt it with `openssl pkey -in {} -out plain.pem` and keep plain.pem readable by this service only",
            key.display()
        )));
    }
    // PKCS#8, PKCS#1 (RSA) and SEC1 (EC) blocks are all accepted.
    let key_der = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| match e {
        rustls_pki_types::pem::Error::NoItemsFound => {
            key_error("no PRIVATE KEY block (PKCS#8, RSA or EC, unencrypted)".into())
        }
        e => key_error(e.to_string()),
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key_der)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    // For hand-offs ([`session`]); extraction needs the connection by value, so only code
    // that owns one after its handshake can do it.
    config.enable_secret_extraction = true;
    Ok(Arc::new(config))
}

/// The server side of a TLS handshake with `client`, written out to the last byte (session
/// tickets included). The caller bounds it in time.
pub(crate) async fn handshake(client: &TcpStream, config: Arc<ServerConfig>) -> io::Result<ServerConnection> {
    let mut tls = ServerConnection::new(config).map_err(io::Error::other)?;
    // The bytes of the current record that are still in the socket.
    let mut left = 0usize;
    loop {
        while tls.wants_write() {
            match tls.write_tls(&mut crate::forward::TryIo::new(client)) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => client.writable().await?,
                Err(e) => return Err(e),
            }
        }
        if !tls.is_handshaking() {
            return Ok(tls);
        }
        client.readable().await?;
        match client.try_io(Interest::READABLE, || read_within_record(client, &mut tls, &mut left)) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "client closed during the handshake",
                ));
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
        if let Err(e) = tls.process_new_packets() {
            // The alert rustls queued, if the socket takes it now.
            let _ = tls.write_tls(&mut crate::forward::TryIo::new(client));
            return Err(io::Error::new(io::ErrorKind::InvalidData, e));
        }
    }
}

/// Gives rustls at most the rest of the current record (`left` bytes; a new record's length
/// comes from a peek at its header). `WouldBlock` while a header is incomplete.
fn read_within_record(client: &TcpStream, tls: &mut ServerConnection, left: &mut usize) -> io::Result<usize> {
    if *left == 0 {
        let mut header = [0u8; RECORD_HEADER];
        let peeked = rustix::net::recv(client, &mut header, rustix::net::RecvFlags::PEEK)?.0;
        match peeked {
            0 => return Ok(0),
            n if n < RECORD_HEADER => return Err(io::ErrorKind::WouldBlock.into()),
            _ => *left = RECORD_HEADER + usize::from(u16::from_be_bytes([header[3], header[4]])),
        }
    }
    struct Within<'a>(&'a TcpStream, &'a mut usize);
    impl Read for Within<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let room = buf.len().min(*self.1);
            let n = rustix::net::recv(self.0, &mut buf[..room], rustix::net::RecvFlags::empty())?.0;
            *self.1 -= n;
            Ok(n)
        }
    }
    tls.read_tls(&mut Within(client, left))
}

/// Why a session cannot be handed off.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SessionError {
    /// Only TLS 1.3 records are carried on by workers.
    #[error("not TLS 1.3")]
    Version,
    /// rustls would not give the secrets, or gave ones of an unknown suite.
    #[error("secrets: {0}")]
    Secrets(String),
}

/// Whether `tls` can be carried on by a worker ([`session`]).
pub(crate) fn can_hand_off(tls: &ServerConnection) -> bool {
    tls.protocol_version() == Some(ProtocolVersion::TLSv1_3) && !tls.is_handshaking() && !tls.wants_write()
}

/// The session of a connection whose handshake is done and written out, for its worker: the
/// suite and each direction's next sequence number, key and IV. The connection is consumed:
/// from here only the worker may write records, or sequence numbers would repeat.
pub(crate) fn session(tls: ServerConnection) -> Result<TlsSession, SessionError> {
    if !can_hand_off(&tls) {
        return Err(SessionError::Version);
    }
    let secrets = tls.dangerous_extract_secrets().map_err(|e| SessionError::Secrets(e.to_string()))?;
    let (send_suite, send) = traffic_keys(secrets.tx)?;
    let (receive_suite, receive) = traffic_keys(secrets.rx)?;
    if send_suite != receive_suite {
        return Err(SessionError::Secrets("different suites each way".into()));
    }
    Ok(TlsSession { suite: send_suite, send, receive })
}

fn traffic_keys(
    (sequence, secrets): (u64, ConnectionTrafficSecrets),
) -> Result<(TlsSuite, TrafficKeys), SessionError> {
    let keys = |key: AeadKey, iv: Iv| -> Result<TrafficKeys, SessionError> {
        let iv =
            iv.as_ref().try_into().map_err(|_| SessionError::Secrets("IV of an unexpected length".into()))?;
        Ok(TrafficKeys { sequence, key: key.as_ref().to_vec(), iv })
    };
    match secrets {
        ConnectionTrafficSecrets::Aes128Gcm { key, iv } => Ok((TlsSuite::Aes128Gcm, keys(key, iv)?)),
        ConnectionTrafficSecrets::Aes256Gcm { key, iv } => Ok((TlsSuite::Aes256Gcm, keys(key, iv)?)),
        ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
            Ok((TlsSuite::Chacha20Poly1305, keys(key, iv)?))
        }
        _ => Err(SessionError::Secrets("a cipher suite workers do not carry".into())),
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    /// A client that writes its request in the same flight as its handshake's end: after
    /// [`handshake`] the request is still in the socket (for the worker), none of it in rustls,
    /// and the session can be handed off with the tickets already counted in its sequence.
    #[tokio::test]
    async fn the_handshake_leaves_what_follows_it_in_the_socket() {
        use tokio::io::AsyncWriteExt;
        let dir = tempfile::tempdir().unwrap();
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert =
            rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap().self_signed(&key).unwrap();
        let cert_path = write(dir.path(), "cert.pem", &cert.pem());
        let key_path = write(dir.path(), "key.pem", &key.serialize_pem());
        let config = server_config(&cert_path, &key_path).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert.der().clone()).unwrap();
        let client_config =
            rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let client = tokio::spawn(async move {
            let socket = TcpStream::connect(address).await.unwrap();
            let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
            let connector = tokio_rustls::TlsConnector::from(Arc::new(client_config));
            let mut stream = connector.connect(name, socket).await.unwrap();
            stream.write_all(b"GET /socketcluster/ HTTP/1.1\r\n\r\n").await.unwrap();
            stream.flush().await.unwrap();
            // Held open until the server is done looking.
            tokio::time::sleep(std::time::Duration::from_secs(5)).await;
        });
        let (server, _) = listener.accept().await.unwrap();
        let mut tls = handshake(&server, config).await.unwrap();
        // The request's record arrives: it is in the socket, not in rustls.
        let mut peeked = [0u8; 5];
        let n = server.peek(&mut peeked).await.unwrap();
        assert_eq!(n, 5);
        assert_eq!(peeked[0], 23, "an application data record waits in the socket");
        let state = tls.process_new_packets().unwrap();
        assert_eq!(state.plaintext_bytes_to_read(), 0);
        assert!(can_hand_off(&tls));
        let session = session(tls).unwrap();
        assert!(session.send.sequence >= 1, "the session tickets went out first");
        assert_eq!(session.receive.sequence, 0, "the request is the client's first record");
        client.abort();
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
        let err = Certificates::load(&garbage, &key_path).unwrap_err();
        assert_eq!(err.config_key(), "balancer.tls_cert");
        assert!(err.to_string().contains("garbage.pem"), "{err}");
        let err = Certificates::load(&cert_path, &garbage).unwrap_err();
        assert_eq!(err.config_key(), "balancer.tls_key");
        assert!(
            err.to_string().contains("garbage.pem") && err.to_string().contains("no PRIVATE KEY"),
            "{err}"
        );

        // A key of another pair is refused, and a failed reload keeps the old pair.
        let other = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        write(dir.path(), "key.pem", &other.serialize_pem());
        assert!(certificates.reload().is_err());
        assert_eq!(certificates.current().alpn_protocols, [b"http/1.1".to_vec()]);
    }

    #[test]
    fn an_encrypted_key_is_named_as_such() {
        let dir = tempfile::tempdir().unwrap();
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert =
            rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap().self_signed(&key).unwrap();
        let cert_path = write(dir.path(), "cert.pem", &cert.pem());
        // The shapes of `openssl pkcs8 -topk8 -v2 aes-256-cbc` and of legacy `openssl ec -aes256`.
        let encrypted = [
            "-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIHsMFcGCSqGSIb3DQEFDTBKMCkGCSqGSIb3DQEFDDAcBAh=\n-----END ENCRYPTED PRIVATE KEY-----\n",
            "-----BEGIN EC PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\nDEK-Info: AES-256-CBC,07A581E0CD9B70F849F61DD7CF22DF67\n\nAAAA\n-----END EC PRIVATE KEY-----\n",
        ];
        for text in encrypted {
            let key_path = write(dir.path(), "key.pem", text);
            let err = Certificates::load(&cert_path, &key_path).unwrap_err();
            assert_eq!(err.config_key(), "balancer.tls_key");
            let err = err.to_string();
            assert!(
                err.contains("encrypted private keys are not supported") && err.contains("openssl pkey"),
                "{err}"
            );
        }
    }
}
