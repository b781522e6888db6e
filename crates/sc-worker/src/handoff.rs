//! The worker's end of same-host hand-off links (`sc_common::handoff`): a balancer on this
//! host passes accepted client connections over the worker's Unix socket, plain ones and TLS
//! ones whose handshake it did (with the session's keys, see [`crate::tls`]), and the worker
//! serves each as if it had accepted it itself (the client address is the socket's own peer).
//!
//! Each handed-off connection holds a [`Lease`]; when the last holder drops it (the HTTP
//! connection ended without an upgrade, or the upgraded socket closed) its number goes back to
//! the balancer, which counts the connection against `[balancer] max_connections` until then.
//! A draining worker stops taking connections from its links (what a balancer sends after that
//! is closed with the link: those clients reconnect, to another worker) but keeps reporting
//! closes until its last lease is gone.

use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use sc_common::handoff::{self, TlsSession};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// A handed-off connection's claim on its balancer's connection count; its number is sent
/// back when the last clone is dropped.
#[derive(Debug)]
pub(crate) struct Lease {
    number: u64,
    closed: mpsc::UnboundedSender<u64>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        // The link is gone (its balancer restarted): nobody counts it any more.
        let _ = self.closed.send(self.number);
    }
}

/// How long a balancer may take over its greeting.
const GREETING_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves one hand-off link whose [`handoff::MAGIC`] has been read: the greeting, then
/// connections until the balancer closes the link or the worker drains. Each connection goes
/// to `serve` with its lease, its upgrade deadline (the balancer's `[balancer]
/// upgrade_timeout`, which it no longer sees) and its TLS session if it has one.
pub(crate) async fn serve_link<F>(
    mut link: UnixStream,
    worker_id: &str,
    shutdown: CancellationToken,
    mut serve: F,
) where
    F: FnMut(TcpStream, SocketAddr, Arc<Lease>, Option<Instant>, Option<TlsSession>),
{
    let balancer = match tokio::time::timeout(GREETING_TIMEOUT, handoff::accept(&mut link, worker_id)).await {
        Ok(Ok(balancer)) => balancer,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "bad hand-off greeting");
            return;
        }
        Err(_) => return,
    };
    tracing::debug!(%balancer, "hand-off link open");
    let (closed, mut closes) = mpsc::unbounded_channel();
    let mut taking = Some(closed);
    let mut receiver = handoff::Receiver::default();
    let mut out = Vec::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled(), if taking.is_some() => {
                // No new connections; report closes until every lease is gone.
                taking = None;
            }
            received = receiver.next(&link), if taking.is_some() => match received {
                Ok(Some((offer, fd))) => {
                    let Some(closed) = &taking else { continue };
                    let lease = Arc::new(Lease { number: offer.lease, closed: closed.clone() });
                    let upgrade_by = offer.upgrade_within.map(|within| Instant::now() + within);
                    if let Some((stream, remote)) = connection(fd) {
                        serve(stream, remote, lease, upgrade_by, offer.tls);
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(%balancer, error = %e, "hand-off link failed, closing it");
                    break;
                }
            },
            number = closes.recv() => {
                let Some(number) = number else { break };
                out.extend_from_slice(&number.to_le_bytes());
                while let Ok(number) = closes.try_recv() {
                    out.extend_from_slice(&number.to_le_bytes());
                }
                if write_all(&link, &out).await.is_err() {
                    break;
                }
                out.clear();
            }
        }
    }
    tracing::debug!(%balancer, "hand-off link closed");
}

/// A handed-off descriptor as a tokio TCP stream with its peer's address; `None` (and it is
/// closed) when it is not a connected socket.
fn connection(fd: OwnedFd) -> Option<(TcpStream, SocketAddr)> {
    let std = std::net::TcpStream::from(fd);
    let stream = match std.set_nonblocking(true).and_then(|()| TcpStream::from_std(std)) {
        Ok(stream) => stream,
        Err(e) => {
            tracing::debug!(error = %e, "handed-off descriptor unusable");
            return None;
        }
    };
    match stream.peer_addr() {
        Ok(remote) => Some((stream, remote)),
        Err(e) => {
            tracing::debug!(error = %e, "handed-off descriptor is not a connected socket");
            None
        }
    }
}

/// Writes `bytes` on the link (which the select loop also reads, so through `&UnixStream`).
async fn write_all(link: &UnixStream, mut bytes: &[u8]) -> std::io::Result<()> {
    while !bytes.is_empty() {
        link.writable().await?;
        match link.try_write(bytes) {
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
