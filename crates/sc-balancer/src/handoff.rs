//! The balancer's end of same-host hand-off links (`sc_common::handoff`): a connection for a
//! worker on this host (plain, or TLS 1.3 after its handshake, with the session's keys) is
//! passed to it over the worker's Unix socket and forgotten, so its traffic never crosses the
//! balancer.
//!
//! One link per worker, opened on first use and kept while the worker keeps it open. Each
//! handed-off connection keeps its `[balancer] max_connections` permit in the link until the
//! worker reports it closed; a link that ends (the worker exited) releases all of its permits,
//! since its connections ended with it. A worker whose link cannot be opened (not on this host,
//! an old worker, a stale socket path) is not tried again for [`RETRY_AFTER`]: its connections
//! are proxied meanwhile.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use sc_common::handoff::{self, TlsSession};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;

use crate::Target;

/// How long a worker whose link failed is served by proxying before a link is tried again.
const RETRY_AFTER: Duration = Duration::from_secs(5);

/// A connection's `[balancer] max_connections` permit, if there is a limit.
pub(crate) type Permit = Option<OwnedSemaphorePermit>;

/// The hand-off links of one balancer, by worker id.
#[derive(Debug)]
pub(crate) struct Links {
    balancer_id: String,
    timeout: Duration,
    links: Mutex<HashMap<String, Entry>>,
}

#[derive(Debug)]
enum Entry {
    Open(Arc<Link>),
    /// Proxy until then.
    Failed(Instant),
}

#[derive(Debug)]
pub(crate) struct Link {
    stream: UnixStream,
    /// The worker's socket path when the link was opened (a replaced worker has a new one).
    path: String,
    next: AtomicU64,
    /// Permits of the connections handed off on this link and not yet reported closed.
    leases: Mutex<HashMap<u64, Permit>>,
    alive: AtomicBool,
}

impl Links {
    /// Links made by balancer `balancer_id`; `timeout` bounds opening one.
    pub(crate) fn new(balancer_id: String, timeout: Duration) -> Self {
        Self { balancer_id, timeout, links: Mutex::new(HashMap::new()) }
    }

    /// Connections handed off and still open, over every link.
    #[cfg(test)]
    pub(crate) fn open(&self) -> usize {
        let links = self.links.lock().unwrap_or_else(PoisonError::into_inner);
        links
            .values()
            .map(|entry| match entry {
                Entry::Open(link) => link.leases.lock().unwrap_or_else(PoisonError::into_inner).len(),
                Entry::Failed(_) => 0,
            })
            .sum()
    }

    /// Hands `client` to `target` when it has a hand-off link on this host; `Err` gives the
    /// connection and its permit back, to be proxied.
    pub(crate) async fn hand_off(
        self: &Arc<Self>,
        target: &Target,
        client: TcpStream,
        permit: Permit,
        upgrade_by: Option<Instant>,
    ) -> Result<(), (TcpStream, Permit)> {
        let Some(link) = self.link_to(target).await else { return Err((client, permit)) };
        self.send(&link, target, client, permit, upgrade_by, None).await
    }

    /// The link to `target` if it takes hand-offs on this host.
    pub(crate) async fn link_to(self: &Arc<Self>, target: &Target) -> Option<Arc<Link>> {
        if target.unix.is_empty() {
            return None;
        }
        self.link(target).await
    }

    /// Passes `client` (with its TLS session, if it has one) on `link`; `Err` gives the
    /// connection and its permit back.
    pub(crate) async fn send(
        self: &Arc<Self>,
        link: &Arc<Link>,
        target: &Target,
        client: TcpStream,
        permit: Permit,
        upgrade_by: Option<Instant>,
        tls: Option<TlsSession>,
    ) -> Result<(), (TcpStream, Permit)> {
        let number = link.next.fetch_add(1, Ordering::Relaxed);
        let fd: OwnedFd = match client.into_std() {
            Ok(std) => std.into(),
            // Deregistering failed; the stream is gone with it.
            Err(e) => {
                tracing::debug!(error = %e, "cannot detach the client socket");
                return Ok(());
            }
        };
        // Counted before it is sent: the worker may report it closed at once.
        link.leases().insert(number, permit);
        let upgrade_within = upgrade_by.map(|by| by.saturating_duration_since(Instant::now()));
        let offer = handoff::Offer { lease: number, upgrade_within, tls };
        match handoff::send_fd(&link.stream, offer, fd).await {
            Ok(()) => Ok(()),
            Err((e, fd)) => {
                tracing::debug!(worker = %target.id, error = %e, "hand-off failed, proxying");
                let permit = link.leases().remove(&number).flatten();
                self.forget(&target.id, link, Some(Instant::now() + RETRY_AFTER));
                let std = std::net::TcpStream::from(fd);
                match TcpStream::from_std(std) {
                    Ok(client) => Err((client, permit)),
                    Err(e) => {
                        tracing::debug!(error = %e, "cannot take the client socket back");
                        Ok(())
                    }
                }
            }
        }
    }

    /// The open link to `target`, opening one if there is none and none failed lately.
    async fn link(self: &Arc<Self>, target: &Target) -> Option<Arc<Link>> {
        {
            let links = self.links.lock().unwrap_or_else(PoisonError::into_inner);
            match links.get(&target.id) {
                Some(Entry::Open(link)) if link.path == target.unix && link.alive.load(Ordering::Acquire) => {
                    return Some(link.clone());
                }
                Some(Entry::Failed(until)) if Instant::now() < *until => return None,
                _ => {}
            }
        }
        let opened = tokio::time::timeout(self.timeout, async {
            let mut stream = UnixStream::connect(&target.unix).await?;
            handoff::greet(&mut stream, &self.balancer_id, &target.id).await?;
            Ok::<_, std::io::Error>(stream)
        })
        .await;
        let mut links = self.links.lock().unwrap_or_else(PoisonError::into_inner);
        let stream = match opened {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => {
                tracing::debug!(worker = %target.id, error = %e, "no hand-off link, proxying");
                links.insert(target.id.clone(), Entry::Failed(Instant::now() + RETRY_AFTER));
                return None;
            }
            Err(_) => {
                tracing::debug!(worker = %target.id, "hand-off link timed out, proxying");
                links.insert(target.id.clone(), Entry::Failed(Instant::now() + RETRY_AFTER));
                return None;
            }
        };
        // Another connection may have opened one meanwhile: use it (this one just closes).
        if let Some(Entry::Open(link)) = links.get(&target.id)
            && link.path == target.unix
            && link.alive.load(Ordering::Acquire)
        {
            return Some(link.clone());
        }
        let link = Arc::new(Link {
            stream,
            path: target.unix.clone(),
            next: AtomicU64::new(0),
            leases: Mutex::new(HashMap::new()),
            alive: AtomicBool::new(true),
        });
        links.insert(target.id.clone(), Entry::Open(link.clone()));
        drop(links);
        tracing::debug!(worker = %target.id, "hand-off link open");
        tokio::spawn(self.clone().read_closes(target.id.clone(), link.clone()));
        Some(link)
    }

    /// Releases the permits of connections the worker reports closed, until the link ends;
    /// then releases the rest.
    async fn read_closes(self: Arc<Self>, worker: String, link: Arc<Link>) {
        let mut buffer = [0u8; 64 * handoff::CLOSED];
        let mut filled = 0;
        loop {
            if link.stream.readable().await.is_err() {
                break;
            }
            let n = match link.stream.try_read(&mut buffer[filled..]) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(_) => break,
            };
            filled += n;
            let whole = filled - filled % handoff::CLOSED;
            {
                let mut leases = link.leases();
                for record in buffer[..whole].chunks_exact(handoff::CLOSED) {
                    let mut number = [0u8; handoff::CLOSED];
                    number.copy_from_slice(record);
                    leases.remove(&u64::from_le_bytes(number));
                }
            }
            buffer.copy_within(whole..filled, 0);
            filled -= whole;
        }
        self.forget(&worker, &link, None);
        let ended = std::mem::take(&mut *link.leases());
        tracing::debug!(%worker, open = ended.len(), "hand-off link closed");
    }

    /// Drops `link` from the map (if it is still the one there), marking the worker failed
    /// until `retry` when given.
    fn forget(&self, worker: &str, link: &Arc<Link>, retry: Option<Instant>) {
        link.alive.store(false, Ordering::Release);
        let mut links = self.links.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(Entry::Open(current)) = links.get(worker)
            && Arc::ptr_eq(current, link)
        {
            match retry {
                Some(until) => links.insert(worker.to_owned(), Entry::Failed(until)),
                None => links.remove(worker),
            };
        }
    }
}

impl Link {
    fn leases(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Permit>> {
        self.leases.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, UnixListener};
    use tokio::sync::Semaphore;

    /// A fake worker on a Unix socket: takes one link, returns its end and the receiver.
    async fn worker_link(listener: &UnixListener) -> UnixStream {
        let (mut link, _) = listener.accept().await.unwrap();
        let mut magic = vec![0u8; handoff::MAGIC.len()];
        link.read_exact(&mut magic).await.unwrap();
        handoff::accept(&mut link, "worker-1").await.unwrap();
        link
    }

    async fn tcp_pair(listener: &TcpListener) -> (TcpStream, TcpStream) {
        let client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        (client, accepted)
    }

    #[tokio::test]
    async fn a_permit_is_held_until_the_worker_reports_the_close_or_the_link_ends() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("worker-1.sock");
        let unix = UnixListener::bind(&path).unwrap();
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target = Target { id: "worker-1".into(), addr: String::new(), unix: path.display().to_string() };
        let links = Arc::new(Links::new("balancer-1".into(), Duration::from_secs(2)));
        let limit = Arc::new(Semaphore::new(2));

        let (mut client, accepted) = tcp_pair(&tcp).await;
        let permit = limit.clone().try_acquire_owned().ok();
        let (handed, link) =
            tokio::join!(links.hand_off(&target, accepted, permit, None), worker_link(&unix));
        assert!(handed.is_ok());
        let mut receiver = handoff::Receiver::default();
        let (offer, fd) = receiver.next(&link).await.unwrap().unwrap();
        // The worker holds the client's connection now: bytes go straight to it.
        let mut served = TcpStream::from_std(std::net::TcpStream::from(fd)).unwrap();
        client.write_all(b"hi").await.unwrap();
        let mut got = [0u8; 2];
        served.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hi");
        assert_eq!((links.open(), limit.available_permits()), (1, 1));

        // The worker reports it closed: the permit comes back.
        let mut link = link;
        link.write_all(&offer.lease.to_le_bytes()).await.unwrap();
        tokio::time::timeout(Duration::from_secs(2), async {
            while limit.available_permits() != 2 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .unwrap();
        assert_eq!(links.open(), 0);

        // Another one on the same link; the worker exits (the link ends): released too.
        let (_client, accepted) = tcp_pair(&tcp).await;
        let permit = limit.clone().try_acquire_owned().ok();
        assert!(links.hand_off(&target, accepted, permit, None).await.is_ok());
        assert_eq!(limit.available_permits(), 1);
        drop(link);
        drop(receiver);
        tokio::time::timeout(Duration::from_secs(2), async {
            while limit.available_permits() != 2 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn a_worker_without_a_link_gets_the_connection_back() {
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let links = Arc::new(Links::new("balancer-1".into(), Duration::from_secs(2)));
        let (_client, accepted) = tcp_pair(&tcp).await;
        let nowhere = Target { id: "w".into(), addr: String::new(), unix: "/nonexistent/w.sock".into() };
        let (back, _permit) = links.hand_off(&nowhere, accepted, None, None).await.unwrap_err();
        assert!(back.peer_addr().is_ok(), "the connection comes back usable");
    }
}
