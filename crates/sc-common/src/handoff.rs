//! Same-host hand-off of accepted client connections from a balancer to a worker.
//!
//! A balancer that accepts a plain connection for a worker on its host does not proxy it: it
//! passes the socket itself to the worker over the worker's Unix socket (`SCM_RIGHTS`, as
//! Node's cluster module does) and forgets it, so every byte afterwards goes straight between
//! the client and the worker, with no second hop and no second process woken per message.
//!
//! The link is one Unix stream connection per (balancer, worker), opened by the balancer on the
//! worker's Unix socket (the one it would otherwise proxy to). It starts with a line each way:
//!
//! ```text
//! balancer -> worker:  "SC-HANDOFF/1 <balancer id>\n"
//! worker -> balancer:  "OK <worker id>\n"
//! ```
//!
//! and then carries little-endian records:
//! - balancer -> worker: an [`Offer`] per connection, with the connection's descriptor
//!   attached: a 24-byte head (the lease number; the milliseconds left until the balancer's
//!   `[balancer] upgrade_timeout`, 0 for none, which the worker enforces from then on; the
//!   length of what follows, 0 for a plain connection; 4 bytes kept at 0), then for a TLS
//!   connection whose handshake the balancer did, its [`TlsSession`]: the negotiated TLS 1.3
//!   suite and each direction's record sequence number, key and IV, with which the worker
//!   carries on the session itself;
//! - worker -> balancer: the lease number (8 bytes) of each handed-off connection that has
//!   closed, so the balancer can keep counting it against `[balancer] max_connections` until
//!   then.
//!
//! A descriptor rides on its record's bytes, and the kernel never merges a record carrying a
//! descriptor with the next one in one read, so a reader that asks for one head gets exactly
//! one head and its descriptor (a short read keeps the descriptor with the first part); the
//! session, sent in the same `sendmsg`, is read after it by length.
use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, OwnedFd};
use std::time::Duration;

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer, SendAncillaryMessage,
    SendFlags,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::UnixStream;

/// The first bytes a balancer sends on a hand-off link; a PROXY v2 header (the other use of
/// the worker's Unix socket) starts with `\r`. Version 2 added TLS sessions: a worker and a
/// balancer of different versions refuse each other's links, and the balancer proxies.
pub const MAGIC: &[u8] = b"SC-HANDOFF/2 ";

/// The size of an offer's head (balancer -> worker).
pub const OFFER: usize = 24;

/// The largest session an offer may carry (an encoded one is at most 105 bytes).
const MAX_SESSION: usize = 128;

/// The size of a close report (worker -> balancer).
pub const CLOSED: usize = 8;

/// A connection offered to a worker, besides its descriptor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Offer {
    /// The number the worker reports back when the connection closes.
    pub lease: u64,
    /// How long the connection has left to become a WebSocket; `None`: no deadline.
    pub upgrade_within: Option<Duration>,
    /// The TLS session the balancer negotiated with the client; `None`: a plain connection.
    pub tls: Option<TlsSession>,
}

/// A TLS 1.3 session after its handshake: what the worker needs to read and write its records.
/// The keys are the session's traffic keys, not the certificate's: the private key stays in
/// the balancer.
#[derive(Clone, PartialEq, Eq)]
pub struct TlsSession {
    /// The AEAD of the negotiated cipher suite.
    pub suite: TlsSuite,
    /// Server to client.
    pub send: TrafficKeys,
    /// Client to server.
    pub receive: TrafficKeys,
}

/// The AEAD algorithm of a TLS 1.3 cipher suite.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsSuite {
    /// TLS_AES_128_GCM_SHA256.
    Aes128Gcm = 1,
    /// TLS_AES_256_GCM_SHA384.
    Aes256Gcm = 2,
    /// TLS_CHACHA20_POLY1305_SHA256.
    Chacha20Poly1305 = 3,
}

/// One direction of a session: the next record's sequence number, the key and the IV.
#[derive(Clone, PartialEq, Eq)]
pub struct TrafficKeys {
    /// The sequence number of the next record in this direction.
    pub sequence: u64,
    /// The AEAD key (16 or 32 bytes, as the suite says).
    pub key: Vec<u8>,
    /// The 12-byte IV the record nonces are derived from.
    pub iv: [u8; 12],
}

impl std::fmt::Debug for TlsSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the keys.
        f.debug_struct("TlsSession").field("suite", &self.suite).finish_non_exhaustive()
    }
}

impl std::fmt::Debug for TrafficKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrafficKeys").field("sequence", &self.sequence).finish_non_exhaustive()
    }
}

impl Drop for TrafficKeys {
    fn drop(&mut self) {
        // Best effort: a copy may have been made on the way (the link's buffers).
        self.key.fill(0);
        self.iv.fill(0);
    }
}

impl TlsSuite {
    /// The key length of the suite's AEAD.
    pub fn key_len(self) -> usize {
        match self {
            TlsSuite::Aes128Gcm => 16,
            TlsSuite::Aes256Gcm | TlsSuite::Chacha20Poly1305 => 32,
        }
    }

    fn from_byte(byte: u8) -> Option<Self> {
        match byte {
            1 => Some(TlsSuite::Aes128Gcm),
            2 => Some(TlsSuite::Aes256Gcm),
            3 => Some(TlsSuite::Chacha20Poly1305),
            _ => None,
        }
    }
}

impl TlsSession {
    /// suite (1 byte), then each direction (send, receive): sequence (8), key (16 or 32), IV (12).
    fn encode(&self) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(MAX_SESSION);
        bytes.push(self.suite as u8);
        for keys in [&self.send, &self.receive] {
            bytes.extend_from_slice(&keys.sequence.to_le_bytes());
            bytes.extend_from_slice(&keys.key);
            bytes.extend_from_slice(&keys.iv);
        }
        bytes
    }

    fn decode(bytes: &[u8]) -> io::Result<Self> {
        let invalid = || io::Error::new(io::ErrorKind::InvalidData, "malformed TLS session in a hand-off");
        let (&suite, mut rest) = bytes.split_first().ok_or_else(invalid)?;
        let suite = TlsSuite::from_byte(suite).ok_or_else(invalid)?;
        let mut direction = || {
            let (sequence, after) = rest.split_first_chunk::<8>()?;
            let (key, after) = after.split_at_checked(suite.key_len())?;
            let (iv, after) = after.split_first_chunk::<12>()?;
            rest = after;
            Some(TrafficKeys { sequence: u64::from_le_bytes(*sequence), key: key.to_vec(), iv: *iv })
        };
        let send = direction().ok_or_else(invalid)?;
        let receive = direction().ok_or_else(invalid)?;
        if !rest.is_empty() {
            return Err(invalid());
        }
        Ok(Self { suite, send, receive })
    }
}

impl Offer {
    /// The head, and the session's bytes after it.
    fn encode(&self) -> ([u8; OFFER], Vec<u8>) {
        let session = self.tls.as_ref().map(TlsSession::encode).unwrap_or_default();
        let mut head = [0u8; OFFER];
        head[..8].copy_from_slice(&self.lease.to_le_bytes());
        // At least 1 ms: 0 means none.
        let millis =
            self.upgrade_within.map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1));
        head[8..16].copy_from_slice(&millis.to_le_bytes());
        // At most MAX_SESSION.
        head[16..20].copy_from_slice(&(session.len() as u32).to_le_bytes());
        (head, session)
    }

    /// The head's fields and the length of the session that follows it.
    fn decode(head: &[u8; OFFER]) -> (Self, usize) {
        let word = |at: usize| {
            let mut word = [0u8; 8];
            word.copy_from_slice(&head[at..at + 8]);
            u64::from_le_bytes(word)
        };
        let (lease, millis) = (word(0), word(8));
        let mut length = [0u8; 4];
        length.copy_from_slice(&head[16..20]);
        let offer =
            Self { lease, upgrade_within: (millis > 0).then(|| Duration::from_millis(millis)), tls: None };
        (offer, u32::from_le_bytes(length) as usize)
    }
}

/// The longest greeting line either side accepts.
const MAX_LINE: usize = 256;

/// Sends `fd` with its offer; `Err` gives the descriptor back (the caller serves the
/// connection another way). The call is one `sendmsg`, atomic on a Unix stream socket, so
/// several tasks may send on one link at once.
pub async fn send_fd(link: &UnixStream, offer: Offer, fd: OwnedFd) -> Result<(), (io::Error, OwnedFd)> {
    let (head, session) = offer.encode();
    let total = OFFER + session.len();
    let sent = link
        .async_io(Interest::WRITABLE, || {
            let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
            let mut control = SendAncillaryBuffer::new(&mut space);
            let fds = [fd.as_fd()];
            control.push(SendAncillaryMessage::ScmRights(&fds));
            let parts = [IoSlice::new(&head), IoSlice::new(&session)];
            rustix::net::sendmsg(link, &parts, &mut control, SendFlags::NOSIGNAL).map_err(io::Error::from)
        })
        .await;
    match sent {
        Ok(n) if n == total => Ok(()),
        // A stream socket may take part of a message only when it is full, and then the
        // descriptor went with the part: the link is unusable, and the connection with it.
        Ok(n) => Err((io::Error::other(format!("short hand-off write ({n} bytes)")), fd)),
        Err(e) => Err((e, fd)),
    }
}

/// The receiving end of a link: records and their descriptors, in order. Cancel-safe: what a
/// dropped [`Receiver::next`] had read stays here for the next call.
#[derive(Debug, Default)]
pub struct Receiver {
    partial: Vec<u8>,
    fd: Option<OwnedFd>,
    /// The head read so far, with the length of its session.
    head: Option<(Offer, usize)>,
}

impl Receiver {
    /// The next connection: its offer and descriptor. `Ok(None)` when the balancer closed the
    /// link; an error for a record that came without a descriptor or with a malformed session.
    pub async fn next(&mut self, link: &UnixStream) -> io::Result<Option<(Offer, OwnedFd)>> {
        let invalid = |what: &str| io::Error::new(io::ErrorKind::InvalidData, format!("hand-off {what}"));
        loop {
            if let Some((_, length)) = &self.head
                && self.partial.len() == *length
            {
                let Some((mut offer, length)) = self.head.take() else { continue };
                if length > 0 {
                    offer.tls = Some(TlsSession::decode(&self.partial)?);
                    self.partial.fill(0);
                    self.partial.clear();
                }
                let fd = self.fd.take().ok_or_else(|| invalid("record without a descriptor"))?;
                return Ok(Some((offer, fd)));
            }
            let mut bytes = [0u8; MAX_SESSION];
            let want = match &self.head {
                None => OFFER - self.partial.len(),
                Some((_, length)) => length - self.partial.len(),
            };
            let received = link
                .async_io(Interest::READABLE, || {
                    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
                    let mut control = RecvAncillaryBuffer::new(&mut space);
                    let msg = rustix::net::recvmsg(
                        link,
                        &mut [IoSliceMut::new(&mut bytes[..want])],
                        &mut control,
                        RecvFlags::CMSG_CLOEXEC,
                    )
                    .map_err(io::Error::from)?;
                    let mut fds = Vec::new();
                    for message in control.drain() {
                        if let RecvAncillaryMessage::ScmRights(received) = message {
                            fds.extend(received);
                        }
                    }
                    Ok((msg.bytes, fds))
                })
                .await?;
            let (n, fds) = received;
            if n == 0 {
                return Ok(None);
            }
            // One descriptor per record, with its head; extra ones (a confused sender) are
            // closed here, and one that comes with a session's bytes means that the session
            // was shorter than its head said.
            for fd in fds {
                if self.head.is_some() {
                    return Err(invalid("session cut short by the next record"));
                }
                if self.fd.is_none() {
                    self.fd = Some(fd);
                }
            }
            self.partial.extend_from_slice(&bytes[..n]);
            bytes.fill(0);
            if self.head.is_none() && self.partial.len() == OFFER {
                let mut head = [0u8; OFFER];
                head.copy_from_slice(&self.partial);
                self.partial.clear();
                let (offer, length) = Offer::decode(&head);
                if length > MAX_SESSION {
                    return Err(invalid("session too long"));
                }
                self.head = Some((offer, length));
            }
        }
    }
}

/// Reads one greeting line (without its `\n`) of at most [`MAX_LINE`] bytes. Reads byte by
/// byte: nothing after the line may be consumed, since descriptors ride on what follows.
pub async fn read_line(stream: &mut UnixStream) -> io::Result<String> {
    let mut line = Vec::new();
    loop {
        let byte = stream.read_u8().await?;
        if byte == b'\n' {
            break;
        }
        if line.len() == MAX_LINE {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "hand-off greeting too long"));
        }
        line.push(byte);
    }
    String::from_utf8(line)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "hand-off greeting not UTF-8"))
}

/// The balancer's side of the greeting: sends its id, expects `OK <worker id>`; `Err` when the
/// worker answers with another id (a stale socket path) or not at all.
pub async fn greet(stream: &mut UnixStream, balancer: &str, worker: &str) -> io::Result<()> {
    let mut hello = MAGIC.to_vec();
    hello.extend_from_slice(balancer.as_bytes());
    hello.push(b'\n');
    stream.write_all(&hello).await?;
    let answer = read_line(stream).await?;
    match answer.strip_prefix("OK ") {
        Some(id) if id == worker => Ok(()),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("hand-off refused or wrong worker: {answer:?}"),
        )),
    }
}

/// The worker's side of the greeting, after it has read [`MAGIC`]: reads the balancer's id and
/// answers with its own.
pub async fn accept(stream: &mut UnixStream, worker: &str) -> io::Result<String> {
    let balancer = read_line(stream).await?;
    stream.write_all(format!("OK {worker}\n").as_bytes()).await?;
    Ok(balancer)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use std::io::{Read, Write};

    #[tokio::test]
    async fn descriptors_arrive_with_their_records_in_order() {
        let (mut balancer, mut worker) = UnixStream::pair().unwrap();
        let greeting = tokio::spawn(async move {
            let id = accept_after_magic(&mut worker).await;
            (worker, id)
        });
        greet(&mut balancer, "balancer-1", "worker-1").await.unwrap();
        let (worker, id) = greeting.await.unwrap();
        assert_eq!(id, "balancer-1");

        // Three connected socket pairs: the far ends go over the link.
        let mut near = Vec::new();
        for lease in 1..=3u64 {
            let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
            near.push(a);
            let upgrade_within = (lease > 1).then(|| Duration::from_millis(lease * 1000));
            let offer = Offer { lease, upgrade_within, tls: (lease == 2).then(session) };
            send_fd(&balancer, offer, OwnedFd::from(b)).await.map_err(|(e, _)| e).unwrap();
        }
        let mut receiver = Receiver::default();
        for (lease, mut a) in (1..=3u64).zip(near) {
            let (got, fd) = receiver.next(&worker).await.unwrap().unwrap();
            assert_eq!(got.lease, lease);
            assert_eq!(got.upgrade_within, (lease > 1).then(|| Duration::from_millis(lease * 1000)));
            assert_eq!(got.tls, (lease == 2).then(session));
            // The received descriptor is the other end of `a`.
            let mut b = std::os::unix::net::UnixStream::from(fd);
            a.write_all(&[lease as u8]).unwrap();
            let mut byte = [0u8; 1];
            b.read_exact(&mut byte).unwrap();
            assert_eq!(byte[0], lease as u8);
        }
        drop(balancer);
        assert!(receiver.next(&worker).await.unwrap().is_none(), "a closed link ends the records");
    }

    fn session() -> TlsSession {
        TlsSession {
            suite: TlsSuite::Aes256Gcm,
            send: TrafficKeys { sequence: 2, key: vec![7; 32], iv: [1; 12] },
            receive: TrafficKeys { sequence: 0, key: vec![9; 32], iv: [3; 12] },
        }
    }

    #[test]
    fn a_session_round_trips_and_a_malformed_one_is_refused() {
        for suite in [TlsSuite::Aes128Gcm, TlsSuite::Aes256Gcm, TlsSuite::Chacha20Poly1305] {
            let key = vec![5; suite.key_len()];
            let session = TlsSession {
                suite,
                send: TrafficKeys { sequence: u64::MAX - 1, key: key.clone(), iv: [2; 12] },
                receive: TrafficKeys { sequence: 1, key, iv: [4; 12] },
            };
            let bytes = session.encode();
            assert!(bytes.len() <= MAX_SESSION);
            assert_eq!(TlsSession::decode(&bytes).unwrap(), session);
            assert!(TlsSession::decode(&bytes[..bytes.len() - 1]).is_err(), "short");
            let mut longer = bytes.clone();
            longer.push(0);
            assert!(TlsSession::decode(&longer).is_err(), "trailing bytes");
        }
        assert!(TlsSession::decode(&[9; 57]).is_err(), "unknown suite");
        assert!(TlsSession::decode(&[]).is_err());
        // The keys never show in logs.
        assert!(!format!("{:?}", session()).contains('7'));
    }

    #[tokio::test]
    async fn a_session_longer_than_its_limit_is_an_error() {
        let (balancer, worker) = UnixStream::pair().unwrap();
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let offer = Offer { lease: 1, upgrade_within: None, tls: None };
        let (mut head, _) = offer.encode();
        head[16..20].copy_from_slice(&(MAX_SESSION as u32 + 1).to_le_bytes());
        balancer
            .async_io(Interest::WRITABLE, || {
                let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
                let mut control = SendAncillaryBuffer::new(&mut space);
                let fds = [a.as_fd()];
                control.push(SendAncillaryMessage::ScmRights(&fds));
                rustix::net::sendmsg(&balancer, &[IoSlice::new(&head)], &mut control, SendFlags::NOSIGNAL)
                    .map_err(io::Error::from)
            })
            .await
            .unwrap();
        let error = Receiver::default().next(&worker).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidData);
    }

    #[tokio::test]
    async fn a_record_without_a_descriptor_is_an_error() {
        let (mut balancer, worker) = UnixStream::pair().unwrap();
        balancer.write_all(&[7u8; OFFER]).await.unwrap();
        let error = Receiver::default().next(&worker).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidData);
    }

    #[tokio::test]
    async fn a_stale_path_answering_with_another_id_is_refused() {
        let (mut balancer, mut worker) = UnixStream::pair().unwrap();
        tokio::spawn(async move { accept_after_magic(&mut worker).await });
        assert!(greet(&mut balancer, "balancer-1", "worker-2").await.is_err());
    }

    async fn accept_after_magic(worker: &mut UnixStream) -> String {
        let mut magic = vec![0u8; MAGIC.len()];
        worker.read_exact(&mut magic).await.unwrap();
        assert_eq!(magic, MAGIC);
        accept(worker, "worker-1").await.unwrap()
    }
}
