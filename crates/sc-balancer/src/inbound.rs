//! Inbound PROXY protocol (`[balancer] accept_proxy_protocol`): the balancer behind a load
//! balancer that is not transparent (a cloud load balancer, HAProxy in TCP mode), which starts
//! every connection with a PROXY v1 or v2 header naming the real client.
//!
//! Right after accept, [`read_inbound_proxy`] reads that header (before TLS, bounded by
//! `[balancer] first_byte_timeout`) and [`serve_proxied`] then serves the connection as any
//! other, with the header's source address standing for the client: the rendezvous hash that
//! picks the worker, the per-IP budget of `[balancer] max_pending_per_ip` and the PROXY v2
//! header the worker gets all use it. A connection without a valid header is closed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use sc_common::membership::Membership;
use sc_common::proxy_protocol;
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, watch};

use crate::Shared;

/// Why a connection from the load balancer was refused.
#[derive(Debug, thiserror::Error)]
pub(crate) enum InboundError {
    /// No whole header within the deadline.
    #[error("no PROXY header within {0:?}")]
    Timeout(Duration),
    /// Something else than a PROXY header, or a broken one.
    #[error(transparent)]
    Parse(#[from] proxy_protocol::ParseError),
}

/// Reads the PROXY header (v1 or v2) at the start of `stream` within `within`, and nothing
/// after it: the client's own bytes (its HTTP request, its TLS ClientHello) stay in the socket.
/// `Some(address)`: the client's; `None`: the load balancer's own connection (a LOCAL or
/// UNKNOWN header: its health checks), which has no client address but its peer's.
pub(crate) async fn read_inbound_proxy(
    stream: &mut TcpStream,
    within: Duration,
) -> Result<Option<SocketAddr>, InboundError> {
    match tokio::time::timeout(within, proxy_protocol::read_v1_or_v2(stream)).await {
        Ok(header) => Ok(header?.source),
        Err(_) => Err(InboundError::Timeout(within)),
    }
}

/// One connection accepted with `[balancer] accept_proxy_protocol`: the header first, then the
/// per-IP budget of the client it names, then the TLS or plain path as usual.
///
/// The balancer has consumed the header by then, so the socket can no longer tell the worker
/// who the client is: these connections are always forwarded (the worker gets the address in
/// the balancer's own PROXY v2 header), never handed off.
pub(crate) async fn serve_proxied(
    mut client: TcpStream,
    peer: SocketAddr,
    workers: watch::Receiver<Membership>,
    shared: Arc<Shared>,
    tls: Option<Arc<rustls::ServerConfig>>,
    permit: Option<OwnedSemaphorePermit>,
) {
    let within = shared.first_byte_timeout.min(shared.upgrade_timeout);
    let remote = match read_inbound_proxy(&mut client, within).await {
        Ok(source) => source.unwrap_or(peer),
        Err(e) => {
            tracing::debug!(%peer, error = %e, "no valid PROXY header, closing");
            return;
        }
    };
    let Some(slot) = shared.pending.try_acquire(remote.ip()) else {
        tracing::debug!(%remote, %peer, "too many pending connections from one address, closing");
        return;
    };
    match tls {
        Some(config) => {
            Box::pin(crate::handle_tls(client, remote, workers, shared, config, slot, permit, false)).await;
        }
        None => Box::pin(crate::handle_plain(client, remote, workers, shared, slot, permit, false)).await,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A connected pair: what the test writes on the first end, the balancer reads on the second.
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (client, server)
    }

    #[tokio::test]
    async fn the_headers_source_is_the_client_and_its_bytes_stay_for_the_worker() {
        let (mut lb, mut accepted) = pair().await;
        lb.write_all(b"PROXY TCP4 203.0.113.7 10.0.0.1 51000 8000\r\nGET / HTTP/1.1\r\n").await.unwrap();
        let source = read_inbound_proxy(&mut accepted, Duration::from_secs(5)).await.unwrap();
        assert_eq!(source, Some("203.0.113.7:51000".parse().unwrap()));
        let mut rest = [0u8; 16];
        accepted.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest, b"GET / HTTP/1.1\r\n");

        let (mut lb, mut accepted) = pair().await;
        let header = proxy_protocol::encode(
            "[2001:db8::9]:4000".parse().unwrap(),
            "[::1]:8000".parse().unwrap(),
            false,
        );
        lb.write_all(&header).await.unwrap();
        let source = read_inbound_proxy(&mut accepted, Duration::from_secs(5)).await.unwrap();
        assert_eq!(source, Some("[2001:db8::9]:4000".parse().unwrap()));
    }

    #[tokio::test]
    async fn a_header_in_pieces_is_waited_for() {
        let (mut lb, mut accepted) = pair().await;
        let reading =
            tokio::spawn(async move { read_inbound_proxy(&mut accepted, Duration::from_secs(5)).await });
        for piece in [&b"PROXY TC"[..], b"P4 198.51.100.2 10.0.0.1", b" 1 2\r", b"\n"] {
            lb.write_all(piece).await.unwrap();
            tokio::task::yield_now().await;
        }
        assert_eq!(reading.await.unwrap().unwrap(), Some("198.51.100.2:1".parse().unwrap()));
    }

    #[tokio::test]
    async fn no_header_is_refused_and_silence_times_out() {
        let (mut lb, mut accepted) = pair().await;
        lb.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        let err = read_inbound_proxy(&mut accepted, Duration::from_secs(5)).await.unwrap_err();
        assert!(matches!(err, InboundError::Parse(proxy_protocol::ParseError::Signature)), "{err}");

        let (_lb, mut accepted) = pair().await;
        let err = read_inbound_proxy(&mut accepted, Duration::from_millis(100)).await.unwrap_err();
        assert!(matches!(err, InboundError::Timeout(_)), "{err}");

        // A header that starts well and then stalls is cut by the same deadline.
        let (mut lb, mut accepted) = pair().await;
        lb.write_all(b"PROXY TCP4 1.2.3.4").await.unwrap();
        let err = read_inbound_proxy(&mut accepted, Duration::from_millis(100)).await.unwrap_err();
        assert!(matches!(err, InboundError::Timeout(_)), "{err}");
    }

    #[tokio::test]
    async fn a_local_header_has_no_client_address() {
        let (mut lb, mut accepted) = pair().await;
        let mut local = proxy_protocol::SIGNATURE.to_vec();
        local.extend_from_slice(&[0x20, 0x00, 0, 0]);
        lb.write_all(&local).await.unwrap();
        assert_eq!(read_inbound_proxy(&mut accepted, Duration::from_secs(5)).await.unwrap(), None);
    }
}
