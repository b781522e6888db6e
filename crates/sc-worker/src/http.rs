//! The worker's HTTP side (hyper): the WebSocket upgrade on `[worker] path`, `/healthz` and
//! `/readyz`.
//!
//! Each accepted connection may start with a PROXY v2 header (the balancer sends one with the
//! real client address); then hyper serves HTTP/1.1 on it, and an upgrade request on the
//! configured path becomes a SocketCluster socket ([`crate::socket::run`]).
//!
//! Each socket runs in its own task, tracked so that a draining worker waits for every close
//! frame to go out. A panic in one socket's task is caught here: it is logged (and so reaches
//! the master's central log, with the panic hook's message and location) and ends that socket
//! only.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::FutureExt;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use sc_common::proxy_protocol;
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_util::task::TaskTracker;

use crate::socket::{self, Peer, Shared};

/// Largest accepted message, for now the stock default (issue: `[worker] max_payload`).
const MAX_MESSAGE: usize = 1024 * 1024;
/// The read buffer of an idle socket: small, since most sockets are idle most of the time.
const READ_BUFFER: usize = 4 * 1024;
/// Fault injection for the cross-daemon tests: with this variable set to `1`, a socket whose
/// upgrade URL carries `sc-test-panic` in its query panics shortly after it opens. Nothing
/// else reads it; it lets the tests prove that a panic ends one socket only.
pub const FAULTS_ENV: &str = "SC_TEST_FAULTS";

/// What the HTTP handler needs.
#[derive(Debug)]
pub struct Http {
    pub shared: Arc<Shared>,
    /// The WebSocket path without its trailing slash ("/socketcluster").
    pub path: String,
    /// This worker's id, sent as `x-sc-worker` on every response so that an operator (or a
    /// test) can see where the balancer sent a client.
    pub worker_id: HeaderValue,
    /// Every socket task, so that shutdown can wait for their close frames.
    pub sockets: TaskTracker,
    /// [`FAULTS_ENV`] was set.
    pub faults: bool,
}

impl Http {
    /// The WebSocket path, normalised so that it matches with and without a trailing slash.
    pub fn normalise_path(path: &str) -> String {
        let trimmed = path.trim_end_matches('/');
        if trimmed.is_empty() {
            "/".to_owned()
        } else {
            trimmed.to_owned()
        }
    }
}

/// Serves one accepted connection.
pub async fn serve_connection(http: Arc<Http>, mut stream: TcpStream, remote: SocketAddr) {
    let _ = stream.set_nodelay(true);
    let mut peer = Peer {
        addr: Some(remote),
        tls: false,
    };
    // A PROXY v2 header starts with "\r\n"; an HTTP request never does.
    let mut first = [0u8; 1];
    match stream.peek(&mut first).await {
        Ok(1) if first[0] == proxy_protocol::SIGNATURE[0] => {
            let read = proxy_protocol::read_header(&mut stream);
            match tokio::time::timeout(std::time::Duration::from_secs(5), read).await {
                Ok(Ok(header)) => {
                    peer.addr = header.source.or(peer.addr);
                    peer.tls = header.tls;
                }
                Ok(Err(e)) => {
                    tracing::debug!(%remote, error = %e, "bad PROXY header");
                    return;
                }
                Err(_) => return,
            }
        }
        Ok(_) => {}
        Err(_) => return,
    }
    let service = hyper::service::service_fn(move |request| {
        let http = http.clone();
        async move {
            let mut response = http.route(request, peer);
            response
                .headers_mut()
                .insert("x-sc-worker", http.worker_id.clone());
            Ok::<_, Infallible>(response)
        }
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    if let Err(e) = connection.await {
        tracing::debug!(%remote, error = %e, "http connection failed");
    }
}

impl Http {
    fn route(&self, request: Request<Incoming>, peer: Peer) -> Response<Full<Bytes>> {
        let path = request.uri().path();
        if Self::normalise_path(path) == self.path {
            return self.upgrade(request, peer);
        }
        match (request.method(), path) {
            (&Method::GET, "/healthz") => text(StatusCode::OK, "ok\n"),
            (&Method::GET, "/readyz") => {
                if self.shared.hub.pool().linked() > 0 {
                    text(StatusCode::OK, "ready\n")
                } else {
                    text(StatusCode::SERVICE_UNAVAILABLE, "no broker linked\n")
                }
            }
            _ => text(StatusCode::NOT_FOUND, "not found\n"),
        }
    }

    fn upgrade(&self, mut request: Request<Incoming>, peer: Peer) -> Response<Full<Bytes>> {
        let headers = request.headers();
        let is_upgrade = headers
            .get(header::UPGRADE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
        let version_ok = headers
            .get(header::SEC_WEBSOCKET_VERSION)
            .is_some_and(|v| v == "13");
        let key = headers.get(header::SEC_WEBSOCKET_KEY).cloned();
        let (true, true, Some(key)) = (is_upgrade, version_ok, key) else {
            return text(
                StatusCode::BAD_REQUEST,
                "expected a WebSocket upgrade (version 13)\n",
            );
        };
        if request.method() != Method::GET {
            return text(StatusCode::BAD_REQUEST, "expected GET\n");
        }
        let accept = derive_accept_key(key.as_bytes());
        let inject_panic = self.faults
            && request
                .uri()
                .query()
                .is_some_and(|q| q.contains("sc-test-panic"));
        let on_upgrade = hyper::upgrade::on(&mut request);
        let shared = self.shared.clone();
        let socket = async move {
            let upgraded = match on_upgrade.await {
                Ok(upgraded) => upgraded,
                Err(e) => {
                    tracing::debug!(error = %e, "upgrade failed");
                    return;
                }
            };
            let config = WebSocketConfig::default()
                .read_buffer_size(READ_BUFFER)
                .max_message_size(Some(MAX_MESSAGE))
                .max_frame_size(Some(MAX_MESSAGE))
                .max_write_buffer_size(4 * MAX_MESSAGE);
            let ws = WebSocketStream::from_raw_socket(
                TokioIo::new(upgraded),
                Role::Server,
                Some(config),
            )
            .await;
            if inject_panic {
                let run = socket::run(ws, shared, peer);
                tokio::select! {
                    _ = run => {}
                    _ = tokio::time::sleep(std::time::Duration::from_millis(200)) => {
                        panic!("injected socket panic ({FAULTS_ENV})");
                    }
                }
            } else {
                socket::run(ws, shared, peer).await;
            }
        };
        self.sockets.spawn(async move {
            // The socket's state is dropped with the panic; nothing shared is left half-updated
            // (the hub's locks recover from poisoning), so the worker carries on.
            if AssertUnwindSafe(socket).catch_unwind().await.is_err() {
                tracing::error!("socket task panicked; that socket was closed");
            }
        });
        let mut response = Response::new(Full::new(Bytes::new()));
        *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let headers = response.headers_mut();
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        if let Ok(accept) = HeaderValue::from_str(&accept) {
            headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
        }
        response
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_matches_with_and_without_slash() {
        assert_eq!(Http::normalise_path("/socketcluster/"), "/socketcluster");
        assert_eq!(Http::normalise_path("/socketcluster"), "/socketcluster");
        assert_eq!(Http::normalise_path("/"), "/");
    }
}
