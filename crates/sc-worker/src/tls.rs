//! TLS sessions handed off by a balancer on this host: the balancer does the handshake (the
//! certificate and its private key stay there), then passes the client's socket with the
//! session's traffic keys (`sc_common::handoff::TlsSession`), and the worker reads and writes
//! the session's records itself, so that a wss message, like a plain one, crosses no second
//! process.
//!
//! Only TLS 1.3's record layer after the handshake (RFC 8446 section 5): application data,
//! and alerts (a close_notify ends the stream; any other alert is an error). Keys are never
//! updated, since that needs the traffic secrets and rustls gives only the keys: a client that
//! asks for a key update is cut (clients do that after billions of records, and then
//! reconnect), and so is a session whose AES-GCM send key has protected 2^24 records, short of
//! the RFC's 2^24.5 (16.7 million messages to one client). The AEAD is ring's, the one rustls
//! uses here.
//!
//! Memory: the keys are allocated once per connection; the read and write buffers exist only
//! while a record is partly read or partly written, so an idle connection holds none.
//!
//! Direct writes ([`crate::direct`]): the send half ([`Sender`]: the socket and the send keys)
//! is shared with the socket's outbox, which seals a lone frame for an idle socket into a
//! record and writes it itself, as it does for a plain connection. A sealed record has used its
//! sequence number, so whatever of it the kernel does not take is handed to the task as bytes
//! that must go first ([`TlsStream::write_first`]), never sealed again.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, ready};

use bytes::Bytes;

use ring::aead::{AES_128_GCM, AES_256_GCM, Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey};
use sc_common::handoff::{TlsSession, TlsSuite, TrafficKeys};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// A record's header: type, legacy version, length.
const HEADER: usize = 5;
/// The AEAD tag that ends every protected record.
const TAG: usize = 16;
/// The most plaintext a record carries.
const MAX_PLAINTEXT: usize = 16 * 1024;
/// The longest protected record a peer may send (RFC 8446 5.2: 2^14 + 256).
const MAX_CIPHERTEXT: usize = MAX_PLAINTEXT + 256;
/// Content types.
const ALERT: u8 = 21;
const HANDSHAKE: u8 = 22;
const APPLICATION_DATA: u8 = 23;
/// The alert that ends a stream cleanly.
const CLOSE_NOTIFY: u8 = 0;
/// A handshake message the client may send after the handshake.
const KEY_UPDATE: u8 = 24;
/// Buffers larger than this are released once empty rather than kept for the next record.
const KEEP: usize = 512;

/// A handed-off TLS connection: the client's TCP socket, and the session's records over it.
pub(crate) struct TlsStream {
    sender: Arc<Sender>,
    receive: Box<Direction>,
    /// Bytes read from the socket: records, the first of which may be decrypted in place
    /// (`plain`), the last of which may be partial.
    input: Vec<u8>,
    /// The unread plaintext of the first record of `input`, and where that record ends.
    plain: std::ops::Range<usize>,
    record_end: usize,
    /// Protected records not yet written, from `written` on.
    output: Vec<u8>,
    written: usize,
    /// The client sent close_notify (or closed its socket): reads end.
    read_closed: bool,
    /// close_notify was sent: nothing more may be written.
    write_closed: bool,
}

/// The socket and the send direction, shared by the socket's task and its outbox; whoever
/// writes holds the outbox's claim on the socket (see [`crate::outbox`]), so the lock is never
/// contended: it only makes the sharing sound.
pub(crate) struct Sender {
    io: TcpStream,
    send: Mutex<Direction>,
}

impl std::fmt::Debug for Sender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sender").field("io", &self.io).finish_non_exhaustive()
    }
}

/// One direction: its AEAD key, the IV its nonces come from and the next record's number.
struct Direction {
    key: LessSafeKey,
    iv: [u8; 12],
    sequence: u64,
    /// The first sequence number not to use.
    limit: u64,
}

/// How many records an AES-GCM key may protect (RFC 8446 5.5 allows 2^24.5 full-size records;
/// rustls then updates its keys). A handed-off session cannot update its keys, so the worker
/// closes it there instead (the client reconnects): after 16.7 million messages to one client.
const AES_GCM_SEND_LIMIT: u64 = 1 << 24;

impl Direction {
    /// `sending`: the server's own direction, whose record count it must bound.
    fn new(suite: TlsSuite, keys: &TrafficKeys, sending: bool) -> io::Result<Self> {
        let algorithm = match suite {
            TlsSuite::Aes128Gcm => &AES_128_GCM,
            TlsSuite::Aes256Gcm => &AES_256_GCM,
            TlsSuite::Chacha20Poly1305 => &CHACHA20_POLY1305,
        };
        let limit = match suite {
            TlsSuite::Aes128Gcm | TlsSuite::Aes256Gcm if sending => AES_GCM_SEND_LIMIT,
            _ => u64::MAX,
        };
        let key = UnboundKey::new(algorithm, &keys.key).map_err(|_| invalid("bad TLS key length"))?;
        Ok(Self { key: LessSafeKey::new(key), iv: keys.iv, sequence: keys.sequence, limit })
    }

    /// The next record's nonce (the IV xor the sequence number, RFC 8446 5.3); the number moves
    /// on, and a session that would reuse one, or pass its key's limit, ends instead.
    fn next_nonce(&mut self) -> io::Result<Nonce> {
        if self.sequence >= self.limit {
            return Err(invalid(
                "TLS session at its key's record limit (a handed-off session cannot update its keys)",
            ));
        }
        let mut nonce = self.iv;
        for (byte, seq) in nonce[4..].iter_mut().zip(self.sequence.to_be_bytes()) {
            *byte ^= seq;
        }
        self.sequence += 1;
        Ok(Nonce::assume_unique_for_key(nonce))
    }
}

fn invalid(message: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message.to_owned())
}

/// Appends to `record` the protected record of `chunks` (at most [`MAX_PLAINTEXT`] bytes in
/// all) with inner content type `kind`, under `keys`.
fn seal_into(record: &mut Vec<u8>, keys: &mut Direction, kind: u8, chunks: &[&[u8]]) -> io::Result<()> {
    let length: usize = chunks.iter().map(|c| c.len()).sum();
    let protected = length + 1 + TAG;
    let header = [APPLICATION_DATA, 3, 3, (protected >> 8) as u8, protected as u8];
    let start = record.len();
    record.reserve_exact(HEADER + protected);
    record.extend_from_slice(&header);
    for chunk in chunks {
        record.extend_from_slice(chunk);
    }
    record.push(kind);
    let nonce = keys.next_nonce()?;
    let tag = keys
        .key
        .seal_in_place_separate_tag(nonce, Aad::from(header), &mut record[start + HEADER..])
        .map_err(|_| invalid("TLS record failed to encrypt"))?;
    record.extend_from_slice(tag.as_ref());
    Ok(())
}

impl Sender {
    fn keys(&self) -> std::sync::MutexGuard<'_, Direction> {
        self.send.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A direct write: `parts`, one frame, sealed into one record and written without waiting.
    /// `None` when not sealed (too long for one record, or the keys are used up: the task
    /// meets the same and closes); otherwise what the kernel did not take, empty when it took
    /// all. What it did not take is protected under this record's number: it must follow as
    /// is, before anything sealed after it.
    pub(crate) fn try_send(&self, parts: &[&[u8]]) -> Option<Bytes> {
        if parts.iter().map(|part| part.len()).sum::<usize>() > MAX_PLAINTEXT {
            return None;
        }
        let mut record = Vec::new();
        seal_into(&mut record, &mut self.keys(), APPLICATION_DATA, parts).ok()?;
        Some(match self.io.try_write(&record) {
            Ok(n) => Bytes::from(record).slice(n..),
            // WouldBlock, or an error the task will meet: the record goes through the task.
            Err(_) => Bytes::from(record),
        })
    }
}

impl std::fmt::Debug for TlsStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsStream").field("io", &self.sender.io).finish_non_exhaustive()
    }
}

impl TlsStream {
    /// Carries on `session` over `io`, the client's socket.
    pub(crate) fn new(io: TcpStream, session: &TlsSession) -> io::Result<Self> {
        let send = Mutex::new(Direction::new(session.suite, &session.send, true)?);
        let receive = Box::new(Direction::new(session.suite, &session.receive, false)?);
        Ok(Self {
            sender: Arc::new(Sender { io, send }),
            receive,
            input: Vec::new(),
            plain: 0..0,
            record_end: 0,
            output: Vec::new(),
            written: 0,
            read_closed: false,
            write_closed: false,
        })
    }

    /// The length of the first record in `input` when it is whole.
    fn whole_record(&self) -> io::Result<Option<usize>> {
        let Some(header) = self.input.first_chunk::<HEADER>() else { return Ok(None) };
        let length = usize::from(u16::from_be_bytes([header[3], header[4]]));
        if length > MAX_CIPHERTEXT {
            return Err(invalid("TLS record too long"));
        }
        Ok((self.input.len() >= HEADER + length).then_some(HEADER + length))
    }

    /// Decrypts the first record of `input` (whole, `end` bytes long) in place: application
    /// data becomes `plain`; a close_notify ends the reads.
    fn open_record(&mut self, end: usize) -> io::Result<()> {
        let (header, body) = self.input[..end].split_at_mut(HEADER);
        if header[0] != APPLICATION_DATA || body.len() < TAG {
            return Err(invalid("unexpected TLS record"));
        }
        let nonce = self.receive.next_nonce()?;
        let opened = self
            .receive
            .key
            .open_in_place(nonce, Aad::from(&*header), body)
            .map_err(|_| invalid("TLS record failed to decrypt"))?;
        // The content type is the last byte that is not padding.
        let Some(typed) = opened.iter().rposition(|&b| b != 0) else {
            return Err(invalid("TLS record without a content type"));
        };
        match opened[typed] {
            APPLICATION_DATA => {
                self.plain = HEADER..HEADER + typed;
                self.record_end = end;
                Ok(())
            }
            ALERT if typed == 2 && opened[1] == CLOSE_NOTIFY => {
                self.read_closed = true;
                self.input.clear();
                Ok(())
            }
            ALERT => Err(io::Error::new(io::ErrorKind::ConnectionAborted, "TLS alert from the client")),
            HANDSHAKE if opened.first() == Some(&KEY_UPDATE) => {
                Err(invalid("the client asked for a TLS key update, which a handed-off session does not do"))
            }
            _ => Err(invalid("unexpected TLS message after the handshake")),
        }
    }

    /// Drops the record whose plaintext has been read.
    fn consume_record(&mut self) {
        self.input.drain(..self.record_end);
        self.plain = 0..0;
        self.record_end = 0;
        if self.input.is_empty() && self.input.capacity() > KEEP {
            self.input = Vec::new();
        }
    }

    /// The send half, for the outbox's direct writes.
    pub(crate) fn sender(&self) -> Arc<Sender> {
        self.sender.clone()
    }

    /// Protects `chunks` as one record of `kind` into `output`, which must be empty.
    fn seal(&mut self, kind: u8, chunks: &[&[u8]]) -> io::Result<()> {
        debug_assert!(self.output.is_empty());
        seal_into(&mut self.output, &mut self.sender.keys(), kind, chunks)?;
        self.written = 0;
        Ok(())
    }

    /// Writes what `output` holds; ready once all of it is written.
    fn poll_output(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.written < self.output.len() {
            match self.sender.io.try_write(&self.output[self.written..]) {
                Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Ok(n) => self.written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    ready!(self.sender.io.poll_write_ready(cx))?;
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        self.written = 0;
        if self.output.capacity() > KEEP {
            self.output = Vec::new();
        } else {
            self.output.clear();
        }
        Poll::Ready(Ok(()))
    }

    /// Plaintext, or the end of the stream, can be read without waiting for the socket.
    fn has_buffered(&self) -> bool {
        !self.plain.is_empty() || self.read_closed || matches!(self.whole_record(), Ok(Some(_)) | Err(_))
    }

    /// The vectored write: everything given, up to one record's worth, as one record.
    fn poll_write_chunks(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        ready!(self.poll_output(cx))?;
        if self.write_closed {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        let mut chunks: Vec<&[u8]> = Vec::with_capacity(bufs.len().min(64));
        let mut taken = 0;
        for buf in bufs {
            let take = buf.len().min(MAX_PLAINTEXT - taken);
            if take > 0 {
                chunks.push(&buf[..take]);
                taken += take;
            }
            if taken == MAX_PLAINTEXT || chunks.len() == 64 {
                break;
            }
        }
        if taken == 0 {
            return Poll::Ready(Ok(0));
        }
        self.seal(APPLICATION_DATA, &chunks)?;
        // The record is this write's: the bytes are taken even if the socket has no room now
        // (the next write or flush sends the rest first).
        match self.poll_output(cx) {
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            _ => Poll::Ready(Ok(taken)),
        }
    }
}

impl AsyncRead for TlsStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if !this.plain.is_empty() {
                let take = this.plain.len().min(buf.remaining());
                buf.put_slice(&this.input[this.plain.start..this.plain.start + take]);
                this.plain.start += take;
                if this.plain.is_empty() {
                    this.consume_record();
                }
                return Poll::Ready(Ok(()));
            }
            if this.record_end > 0 {
                // An empty record.
                this.consume_record();
            }
            if this.read_closed {
                return Poll::Ready(Ok(()));
            }
            if let Some(end) = this.whole_record()? {
                this.open_record(end)?;
                continue;
            }
            // More of the socket: at least the rest of this record, in one read if it came.
            let wanted = match this.input.first_chunk::<HEADER>() {
                Some(header) => HEADER + usize::from(u16::from_be_bytes([header[3], header[4]])),
                None => 2048,
            };
            let room = wanted.max(this.input.len() + 1024).min(HEADER + MAX_CIPHERTEXT) - this.input.len();
            this.input.reserve(room);
            match this.sender.io.try_read_buf(&mut this.input) {
                Ok(0) if this.input.is_empty() => {
                    // The client closed without close_notify: the end all the same (the
                    // WebSocket has its own close).
                    this.read_closed = true;
                }
                Ok(0) => return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into())),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if this.input.is_empty() && this.input.capacity() > KEEP {
                        this.input = Vec::new();
                    }
                    ready!(this.sender.io.poll_read_ready(cx))?;
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for TlsStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.get_mut().poll_write_chunks(cx, &[io::IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().poll_write_chunks(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().poll_output(cx)
    }

    /// close_notify, then the socket's write side.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_output(cx))?;
        if !this.write_closed {
            this.write_closed = true;
            this.seal(ALERT, &[&[1, CLOSE_NOTIFY]])?;
            ready!(this.poll_output(cx))?;
        }
        Poll::Ready(
            rustix::net::shutdown(&this.sender.io, rustix::net::Shutdown::Write).map_err(io::Error::from),
        )
    }
}

impl TlsStream {
    /// Ready when a read may make progress: a record already here, data, end of stream or an
    /// error.
    pub(crate) fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.has_buffered() {
            return Poll::Ready(Ok(()));
        }
        self.sender.io.poll_read_ready(cx)
    }

    /// The rest of a record a direct write sealed: already protected, it goes out as is, after
    /// what is already waiting (sealed earlier).
    pub(crate) fn write_first(&mut self, bytes: Bytes) {
        self.output.extend_from_slice(&bytes);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::io::{Read, Write};
    use std::sync::Arc;

    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
    use rustls::{ClientConnection, ConnectionTrafficSecrets, ServerConnection};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// A client and a server session with their handshake done in memory (the server's
    /// tickets delivered), as a balancer leaves them; the server's side as a hand-off.
    fn sessions(suite: rustls::SupportedCipherSuite) -> (ClientConnection, TlsSession) {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert =
            rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap().self_signed(&key).unwrap();
        let provider = rustls::crypto::CryptoProvider {
            cipher_suites: vec![suite],
            ..rustls::crypto::ring::default_provider()
        };
        let provider = Arc::new(provider);
        let mut server_config = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![CertificateDer::from(cert.der().to_vec())],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            )
            .unwrap();
        server_config.enable_secret_extraction = true;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(CertificateDer::from(cert.der().to_vec())).unwrap();
        let client_config = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let mut client =
            ClientConnection::new(Arc::new(client_config), ServerName::try_from("localhost").unwrap())
                .unwrap();
        let mut server = ServerConnection::new(Arc::new(server_config)).unwrap();
        let mut wire = Vec::new();
        while client.is_handshaking() || server.is_handshaking() || server.wants_write() {
            wire.clear();
            while client.wants_write() {
                client.write_tls(&mut wire).unwrap();
            }
            server.read_tls(&mut &wire[..]).unwrap();
            server.process_new_packets().unwrap();
            wire.clear();
            while server.wants_write() {
                server.write_tls(&mut wire).unwrap();
            }
            client.read_tls(&mut &wire[..]).unwrap();
            client.process_new_packets().unwrap();
        }
        let secrets = server.dangerous_extract_secrets().unwrap();
        let keys = |(sequence, secrets): (u64, ConnectionTrafficSecrets)| {
            let (suite, key, iv) = match secrets {
                ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (TlsSuite::Aes128Gcm, key, iv),
                ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (TlsSuite::Aes256Gcm, key, iv),
                ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                    (TlsSuite::Chacha20Poly1305, key, iv)
                }
                _ => unreachable!(),
            };
            (suite, TrafficKeys { sequence, key: key.as_ref().to_vec(), iv: iv.as_ref().try_into().unwrap() })
        };
        let (suite, send) = keys(secrets.tx);
        let (_, receive) = keys(secrets.rx);
        assert!(send.sequence > 0, "the tickets went out under the send keys");
        (client, TlsSession { suite, send, receive })
    }

    /// The worker's end (a [`TlsStream`] over a loopback socket) and the client's (a blocking
    /// socket with the rustls client session over it).
    async fn pair(suite: rustls::SupportedCipherSuite) -> (TlsStream, ClientConnection, std::net::TcpStream) {
        let (client, session) = sessions(suite);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let connecting = tokio::task::spawn_blocking(move || std::net::TcpStream::connect(address).unwrap());
        let (server, _) = listener.accept().await.unwrap();
        let socket = connecting.await.unwrap();
        (TlsStream::new(server, &session).unwrap(), client, socket)
    }

    #[tokio::test]
    async fn records_go_both_ways_for_every_suite_and_a_close_notify_ends_the_stream() {
        use rustls::crypto::ring::cipher_suite as suites;
        for suite in [
            suites::TLS13_AES_128_GCM_SHA256,
            suites::TLS13_AES_256_GCM_SHA384,
            suites::TLS13_CHACHA20_POLY1305_SHA256,
        ] {
            let (mut server, client, socket) = pair(suite).await;
            // Larger than a record each way: several records, read across record boundaries.
            let big: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
            let expected = big.clone();
            let client_side = tokio::task::spawn_blocking(move || {
                let (mut client, mut socket) = (client, socket);
                let mut stream = rustls::Stream::new(&mut client, &mut socket);
                stream.write_all(b"hello ").unwrap();
                stream.write_all(&big).unwrap();
                stream.flush().unwrap();
                let mut back = vec![0u8; big.len()];
                stream.read_exact(&mut back).unwrap();
                assert_eq!(back, big, "the worker's records decrypt to what it wrote");
                client.send_close_notify();
                client.write_tls(&mut socket).unwrap();
                // The worker's close_notify, then the end of the socket.
                let mut rest = Vec::new();
                let mut stream = rustls::Stream::new(&mut client, &mut socket);
                stream.read_to_end(&mut rest).unwrap();
                assert!(rest.is_empty());
            });
            let mut got = vec![0u8; 6 + expected.len()];
            server.read_exact(&mut got).await.unwrap();
            assert_eq!(&got[..6], b"hello ");
            assert_eq!(&got[6..], &expected[..]);
            assert!(server.input.capacity() <= KEEP, "the read buffer is released once read");
            // Written in pieces that straddle records: at most 16 KiB each.
            for piece in expected.chunks(30_000) {
                server.write_all(piece).await.unwrap();
            }
            server.flush().await.unwrap();
            assert!(server.output.capacity() <= KEEP, "the write buffer is released once written");
            let mut after = Vec::new();
            server.read_to_end(&mut after).await.unwrap();
            assert!(after.is_empty(), "close_notify ends the stream");
            server.shutdown().await.unwrap();
            drop(server);
            client_side.await.unwrap();
        }
    }

    #[tokio::test]
    async fn a_tampered_record_and_a_key_update_end_the_connection_with_an_error() {
        use rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256 as SUITE;
        // One bit flipped in a record: it does not decrypt.
        let (mut server, mut client, mut socket) = pair(SUITE).await;
        client.writer().write_all(b"GET / HTTP/1.1\r\n").unwrap();
        let mut wire = Vec::new();
        client.write_tls(&mut wire).unwrap();
        let last = wire.len() - 1;
        wire[last] ^= 1;
        socket.write_all(&wire).unwrap();
        let mut buffer = [0u8; 64];
        let error = server.read(&mut buffer).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidData, "{error}");

        // A key update the worker cannot follow: refused rather than misread.
        let (mut server, mut client, mut socket) = pair(SUITE).await;
        client.refresh_traffic_keys().unwrap();
        client.write_tls(&mut socket).unwrap();
        let error = server.read(&mut buffer).await.unwrap_err();
        assert!(error.to_string().contains("key update"), "{error}");
    }

    /// Direct writes until the kernel takes no more: each frame is a record; the one sealed
    /// but not taken goes out first through the stream, then the stream's own writes follow,
    /// and the client reads every frame, in order, under one sequence of record numbers.
    #[tokio::test]
    async fn direct_writes_and_the_streams_writes_share_one_record_sequence() {
        use crate::direct::Sent;
        use rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256 as SUITE;
        let (mut server, client, socket) = pair(SUITE).await;
        let sender = crate::direct::Direct::Tls(server.sender());
        let frame = |i: u32| format!("{i:0>1000}");
        let mut sent = 0u32;
        let rest = loop {
            match sender.send_text(frame(sent).as_bytes()) {
                Sent::All => sent += 1,
                Sent::Part(rest) => break rest,
                Sent::Nothing => panic!("a sealed frame must not come back as nothing"),
            }
            assert!(sent < 100_000, "the socket never filled");
        };
        sent += 1;
        let total = sent + 10;
        let reader = tokio::task::spawn_blocking(move || {
            let (mut client, mut socket) = (client, socket);
            let mut stream = rustls::Stream::new(&mut client, &mut socket);
            for i in 0..total {
                let mut header = [0u8; 4];
                stream.read_exact(&mut header).unwrap();
                assert_eq!(header, [0x81, 126, (1000u16 >> 8) as u8, 1000u16 as u8]);
                let mut payload = vec![0u8; 1000];
                stream.read_exact(&mut payload).unwrap();
                assert_eq!(String::from_utf8(payload).unwrap(), format!("{i:0>1000}"), "frame {i}");
            }
        });
        server.write_first(rest);
        for i in sent..total {
            let mut bytes = vec![0x81, 126, (1000u16 >> 8) as u8, 1000u16 as u8];
            bytes.extend_from_slice(frame(i).as_bytes());
            server.write_all(&bytes).await.unwrap();
        }
        server.flush().await.unwrap();
        reader.await.unwrap();
        assert!(sent > 10, "{sent} direct writes before the socket filled");
    }

    #[test]
    fn a_key_is_not_used_past_its_limit_nor_a_nonce_twice() {
        let keys = |sequence: u64| TrafficKeys { sequence, key: vec![1; 16], iv: [0; 12] };
        let mut send = Direction::new(TlsSuite::Aes128Gcm, &keys(AES_GCM_SEND_LIMIT - 1), true).unwrap();
        assert!(send.next_nonce().is_ok());
        let Err(error) = send.next_nonce() else { panic!("a nonce past the limit") };
        assert!(error.to_string().contains("record limit"), "{error}");
        assert!(send.next_nonce().is_err(), "and it stays refused");
        let mut receive = Direction::new(TlsSuite::Aes128Gcm, &keys(u64::MAX - 1), false).unwrap();
        assert!(receive.next_nonce().is_ok());
        assert!(receive.next_nonce().is_err(), "the last sequence number is never reached twice");
        // The nonce is the IV xor the sequence number, big-endian in the last 8 bytes.
        let mut direction = Direction::new(
            TlsSuite::Chacha20Poly1305,
            &TrafficKeys { sequence: 0x0102, key: vec![1; 32], iv: [0xff; 12] },
            true,
        )
        .unwrap();
        let nonce = direction.next_nonce().unwrap();
        let mut expected = [0xff; 12];
        expected[10] ^= 0x01;
        expected[11] ^= 0x02;
        assert_eq!(nonce.as_ref(), &expected);
    }

    #[test]
    fn a_streams_own_state_stays_small() {
        // The per-connection cost besides the socket: the boxed keys.
        let size = std::mem::size_of::<TlsStream>();
        let keys = std::mem::size_of::<Sender>() + std::mem::size_of::<Direction>();
        eprintln!("TlsStream {size} bytes, its keys and socket {keys} bytes (allocated)");
        assert!(size <= 160, "TlsStream is {size} bytes");
        assert!(keys <= 1300, "the keys and socket are {keys} bytes");
    }
}
