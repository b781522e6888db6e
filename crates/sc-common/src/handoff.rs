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
//! - balancer -> worker: an [`Offer`] per connection (16 bytes: the lease number, then the
//!   milliseconds left until the balancer's `[balancer] upgrade_timeout`, 0 for none), with the
//!   connection's descriptor attached; the worker enforces that deadline from then on;
//! - worker -> balancer: the lease number (8 bytes) of each handed-off connection that has
//!   closed, so the balancer can keep counting it against `[balancer] max_connections` until
//!   then.
//!
//! A descriptor rides on its record's bytes, and the kernel never merges a record carrying a
//! descriptor with the next one in one read, so a reader that asks for one record gets exactly
//! one record and its descriptor (a short read keeps the descriptor with the first part).

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
/// the worker's Unix socket) starts with `\r`.
pub const MAGIC: &[u8] = b"SC-HANDOFF/1 ";

/// The size of an offer (balancer -> worker).
pub const OFFER: usize = 16;

/// The size of a close report (worker -> balancer).
pub const CLOSED: usize = 8;

/// A connection offered to a worker, besides its descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Offer {
    /// The number the worker reports back when the connection closes.
    pub lease: u64,
    /// How long the connection has left to become a WebSocket; `None`: no deadline.
    pub upgrade_within: Option<Duration>,
}

impl Offer {
    fn encode(&self) -> [u8; OFFER] {
        let mut bytes = [0u8; OFFER];
        bytes[..8].copy_from_slice(&self.lease.to_le_bytes());
        // At least 1 ms: 0 means none.
        let millis =
            self.upgrade_within.map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1));
        bytes[8..].copy_from_slice(&millis.to_le_bytes());
        bytes
    }

    fn decode(bytes: &[u8; OFFER]) -> Self {
        let mut word = [0u8; 8];
        word.copy_from_slice(&bytes[..8]);
        let lease = u64::from_le_bytes(word);
        word.copy_from_slice(&bytes[8..]);
        let millis = u64::from_le_bytes(word);
        Self { lease, upgrade_within: (millis > 0).then(|| Duration::from_millis(millis)) }
    }
}

/// The longest greeting line either side accepts.
const MAX_LINE: usize = 256;

/// Sends `fd` with its offer; `Err` gives the descriptor back (the caller serves the
/// connection another way). The call is one `sendmsg`, atomic on a Unix stream socket, so
/// several tasks may send on one link at once.
pub async fn send_fd(link: &UnixStream, offer: Offer, fd: OwnedFd) -> Result<(), (io::Error, OwnedFd)> {
    let bytes = offer.encode();
    let sent = link
        .async_io(Interest::WRITABLE, || {
            let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
            let mut control = SendAncillaryBuffer::new(&mut space);
            let fds = [fd.as_fd()];
            control.push(SendAncillaryMessage::ScmRights(&fds));
            rustix::net::sendmsg(link, &[IoSlice::new(&bytes)], &mut control, SendFlags::NOSIGNAL)
                .map_err(io::Error::from)
        })
        .await;
    match sent {
        Ok(n) if n == OFFER => Ok(()),
        // A stream socket may take part of a message only when it is full, and then the
        // descriptor went with the part: the link is unusable, and the connection with it.
        Ok(n) => Err((io::Error::other(format!("short hand-off write ({n} bytes)")), fd)),
        Err(e) => Err((e, fd)),
    }
}

/// The receiving end of a link: records and their descriptors, in order.
#[derive(Debug, Default)]
pub struct Receiver {
    partial: Vec<u8>,
    fd: Option<OwnedFd>,
}

impl Receiver {
    /// The next connection: its offer and descriptor. `Ok(None)` when the balancer closed the
    /// link; an error for a record that came without a descriptor.
    pub async fn next(&mut self, link: &UnixStream) -> io::Result<Option<(Offer, OwnedFd)>> {
        loop {
            let mut bytes = [0u8; OFFER];
            let want = OFFER - self.partial.len();
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
            // One descriptor per record; extra ones (a confused sender) are closed here.
            for fd in fds {
                if self.fd.is_none() {
                    self.fd = Some(fd);
                }
            }
            self.partial.extend_from_slice(&bytes[..n]);
            if self.partial.len() == OFFER {
                let mut record = [0u8; OFFER];
                record.copy_from_slice(&self.partial);
                self.partial.clear();
                let fd = self.fd.take().ok_or_else(|| {
                    io::Error::new(io::ErrorKind::InvalidData, "hand-off record without a descriptor")
                })?;
                return Ok(Some((Offer::decode(&record), fd)));
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
            let offer =
                Offer { lease, upgrade_within: (lease > 1).then(|| Duration::from_millis(lease * 1000)) };
            send_fd(&balancer, offer, OwnedFd::from(b)).await.map_err(|(e, _)| e).unwrap();
        }
        let mut receiver = Receiver::default();
        for (lease, mut a) in (1..=3u64).zip(near) {
            let (got, fd) = receiver.next(&worker).await.unwrap().unwrap();
            assert_eq!(got.lease, lease);
            assert_eq!(got.upgrade_within, (lease > 1).then(|| Duration::from_millis(lease * 1000)));
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
