//! The worker's HTTP side (hyper): the WebSocket upgrade on `[worker] path`, `/healthz`,
//! `/readyz` and the static folder.
//!
//! Each accepted TCP connection may start with a PROXY v2 header (the balancer sends one with
//! the real client address and whether it came over TLS); a connection on the worker's Unix
//! socket (from a balancer on the same host) must. Then hyper serves HTTP/1.1 on it, and an
//! upgrade request on the configured path that passes the origin check and the app's `upgrade`
//! hook becomes a SocketCluster socket ([`crate::socket::run`]). `X-Forwarded-For` and
//! `X-Forwarded-Proto` count only from `[worker] trusted_proxies` ([`crate::proxies`]).
//!
//! Each socket runs in its own task, tracked so that a draining worker waits for every close
//! frame to go out. A panic in one socket's task is caught here: it is logged (and so reaches
//! the master's central log, with the panic hook's message and location) and ends that socket
//! only.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use sc_common::secret::constant_time_eq;
use sc_common::{handoff, proxy_protocol};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::net::{TcpStream, UnixStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::app::UpgradeRequest;
use crate::handle::Peer;
use crate::handoff::Lease;
use crate::origins::Origins;
use crate::proxies::ProxySources;
use crate::socket::{self, Context};
use crate::tls::TlsStream;
use sc_common::handoff::TlsSession;
use sc_common::per_ip::{Pending, PendingByIp};

/// The read buffer of a socket: small, since most sockets are idle most of the time and most
/// client messages are small (a larger frame grows it to the frame's size).
const READ_BUFFER: usize = 512;
/// How long a connection may take to send its PROXY header (or a hand-off link its magic).
const PROXY_HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// Fault injection for the cross-daemon tests: with this variable set to `1`, a socket whose
/// upgrade URL carries `sc-test-panic` in its query panics shortly after it opens. Nothing
/// else reads it; it lets the tests prove that a panic ends one socket only.
pub(crate) const FAULTS_ENV: &str = "SC_TEST_FAULTS";

/// What the HTTP handler needs.
#[derive(Debug)]
pub(crate) struct Http {
    pub(crate) context: Arc<Context>,
    /// The WebSocket path without its trailing slash ("/socketcluster").
    pub(crate) path: String,
    /// This worker's id, sent as `x-sc-worker` on every response so that an operator (or a
    /// test) can see where the balancer sent a client.
    pub(crate) worker_id: HeaderValue,
    pub(crate) origins: Origins,
    /// Who may send a PROXY header over TCP; its `[worker] trusted_proxies` are also the
    /// proxies whose `X-Forwarded-*` headers count.
    pub(crate) proxy_sources: Arc<ProxySources>,
    /// `[worker] max_payload`.
    pub(crate) max_payload: usize,
    /// `[worker] static_dir`, canonicalised.
    pub(crate) static_dir: Option<PathBuf>,
    /// `[worker] api_key`; empty: the HTTP API is off.
    pub(crate) api_key: String,
    /// The app's HTTP routes ([`crate::App::routes`]).
    pub(crate) routes: Option<axum::Router>,
    /// [`FAULTS_ENV`] was set.
    pub(crate) faults: bool,
    /// Connections per client IP before their SocketCluster handshake.
    pub(crate) pending: PendingByIp,
    /// `[worker] request_header_timeout`.
    pub(crate) header_timeout: std::time::Duration,
}

type Body = axum::body::Body;

impl Http {
    /// The WebSocket path, normalised so that it matches with and without a trailing slash.
    pub(crate) fn normalise_path(path: &str) -> String {
        let trimmed = path.trim_end_matches('/');
        if trimmed.is_empty() { "/".to_owned() } else { trimmed.to_owned() }
    }
}

/// Set when a socket's task completes; a task dropped before (it panicked) is reported.
struct Finished(bool);

impl Drop for Finished {
    fn drop(&mut self) {
        if !self.0 {
            tracing::error!("socket task panicked; that socket was closed");
        }
    }
}

/// The sizes a socket's WebSocket is configured with (kept small until the upgrade is done:
/// the whole config would sit in the task while the upgrade is awaited).
#[derive(Debug, Clone, Copy)]
struct Limits {
    /// `[worker] max_payload`.
    max_payload: usize,
    /// `[worker] max_outbound_bytes`.
    max_outbound: usize,
}

impl Limits {
    fn config(self) -> WebSocketConfig {
        WebSocketConfig::default()
            .read_buffer_size(READ_BUFFER)
            .max_message_size(Some(self.max_payload))
            .max_frame_size(Some(self.max_payload))
            // Past [worker] max_outbound_bytes the socket's loop closes the client (4100);
            // tungstenite's own cap sits above it, with room for one more whole message.
            .max_write_buffer_size(
                self.max_outbound.saturating_add(self.max_payload).saturating_add(64 * 1024),
            )
    }
}

/// One socket's task, from the end of its upgrade to its close: what every open socket holds
/// besides its buffers (see the budget test below). `lease` (a handed-off connection's) is
/// held until the socket closes. An `async move` block, not an `async fn`, which would hold
/// every argument twice.
#[allow(clippy::manual_async_fn)]
fn socket_task(
    on_upgrade: hyper::upgrade::OnUpgrade,
    context: Arc<Context>,
    peer: Peer,
    pending: Option<Pending>,
    lease: Option<Arc<Lease>>,
    limits: Limits,
    inject_panic: bool,
) -> impl Future<Output = ()> {
    async move {
        let upgraded = match on_upgrade.await {
            Ok(upgraded) => upgraded,
            Err(e) => {
                tracing::debug!(error = %e, "upgrade failed");
                return;
            }
        };
        let config = limits.config();
        // Reports a task that ends without finishing (a panic: tokio catches it and drops the
        // task, whose state is dropped with it: the socket leaves its channels, see
        // `Conversation`'s Drop, and the hub's locks recover from poisoning). A guard, not a
        // `catch_unwind` wrapper, which would store this whole future twice.
        let mut finished = Finished(false);
        // The connection itself, out of hyper's wrapper: no extra box and buffer per socket,
        // and its readiness tells the socket's loop when to read. TCP (accepted or handed off)
        // is the common case; the others run in their own task so that they do not grow every
        // socket's task. (The arms are spelled out: a shared generic helper holds the
        // WebSocket's set-up and the loop at once and costs each socket about 200 bytes more,
        // see the budget test.)
        match upgraded.downcast::<TokioIo<TcpStream>>() {
            Ok(parts) => {
                // Shared with the socket's outbox, which writes to an idle socket directly.
                let (shared, direct) = crate::direct::Shared::new(parts.io.into_inner());
                let ws = websocket(shared, parts.read_buf, config).await;
                if inject_panic {
                    Box::pin(run_panicking(ws, context, peer, pending)).await;
                } else {
                    socket::run(ws, context, peer, pending, Some(crate::direct::Direct::Tcp(direct))).await;
                }
                drop(lease);
            }
            // Its own task: boxed or awaited here, its future would sit beside the room this
            // task keeps for the TCP arm, about 2 KB more per such socket.
            Err(upgraded) => {
                let tasks = context.tasks.clone();
                tasks.spawn(run_other(upgraded, context, peer, pending, lease, config, inject_panic));
            }
        }
        finished.0 = true;
    }
}

/// The task of a socket over a connection that is not plain TCP: a TLS session handed off by
/// a balancer on this host, the worker's Unix socket (proxied by one), or a stream hyper keeps
/// opaque. `lease` is held until the socket closes. (Not an `async fn`, for the reason
/// [`socket_task`] gives.)
#[allow(clippy::manual_async_fn)]
fn run_other(
    upgraded: hyper::upgrade::Upgraded,
    context: Arc<Context>,
    peer: Peer,
    pending: Option<Pending>,
    lease: Option<Arc<Lease>>,
    config: WebSocketConfig,
    inject_panic: bool,
) -> impl Future<Output = ()> {
    async move {
        let _lease = lease;
        let mut finished = Finished(false);
        let upgraded = match upgraded.downcast::<TokioIo<TlsStream>>() {
            Ok(parts) => {
                // The session's send half is shared with the outbox, as a plain connection is.
                let stream = parts.io.into_inner();
                let direct = crate::direct::Direct::Tls(stream.sender());
                let ws = websocket(stream, parts.read_buf, config).await;
                if inject_panic {
                    Box::pin(run_panicking(ws, context, peer, pending)).await;
                } else {
                    socket::run(ws, context, peer, pending, Some(direct)).await;
                }
                finished.0 = true;
                return;
            }
            Err(upgraded) => upgraded,
        };
        match upgraded.downcast::<TokioIo<UnixStream>>() {
            Ok(parts) => {
                let ws = websocket(parts.io.into_inner(), parts.read_buf, config).await;
                if inject_panic {
                    Box::pin(run_panicking(ws, context, peer, pending)).await;
                } else {
                    socket::run(ws, context, peer, pending, None).await;
                }
            }
            Err(upgraded) => {
                let ws = websocket(TokioIo::new(upgraded), Bytes::new(), config).await;
                socket::run(ws, context, peer, pending, None).await;
            }
        }
        finished.0 = true;
    }
}

/// The WebSocket over an upgraded connection; `read` is what the HTTP side had read past the
/// upgrade request (a client may send its first frame right behind it).
async fn websocket<S>(io: S, read: Bytes, config: WebSocketConfig) -> WebSocketStream<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    if read.is_empty() {
        WebSocketStream::from_raw_socket(io, Role::Server, Some(config)).await
    } else {
        WebSocketStream::from_partially_read(io, read.to_vec(), Role::Server, Some(config)).await
    }
}

/// Fault injection ([`FAULTS_ENV`]): runs the socket and panics shortly after it opens.
async fn run_panicking<S>(ws: WebSocketStream<S>, context: Arc<Context>, peer: Peer, pending: Option<Pending>)
where
    S: AsyncRead + AsyncWrite + socket::ReadReady + Unpin,
{
    tokio::select! {
        _ = socket::run(ws, context, peer, pending, None) => {}
        _ = tokio::time::sleep(std::time::Duration::from_millis(200)) => {
            panic!("injected socket panic ({FAULTS_ENV})");
        }
    }
}

/// Serves one accepted TCP connection.
pub(crate) async fn serve_connection(http: Arc<Http>, mut stream: TcpStream, remote: SocketAddr) {
    let _ = stream.set_nodelay(true);
    let mut peer = Peer { addr: Some(remote), tls: false };
    // A PROXY v2 header starts with "\r\n"; an HTTP request never does.
    // A connection that sends nothing is closed after the header timeout, like one that sends
    // too little.
    let mut first = [0u8; 1];
    match tokio::time::timeout(http.header_timeout, stream.peek(&mut first)).await {
        Ok(Ok(1)) if first[0] == proxy_protocol::SIGNATURE[0] => {
            if !http.proxy_sources.allows(remote.ip()) {
                tracing::debug!(peer = %remote, "PROXY header from an address that is not a balancer, closing");
                return;
            }
            match read_proxy_header(&mut stream, peer).await {
                Some(from_header) => peer = from_header,
                None => return,
            }
        }
        Ok(Ok(_)) => {}
        Ok(Err(_)) | Err(_) => return,
    }
    let Some(pending) = admit(&http, peer) else { return };
    serve_http(http, stream, peer, pending, None).await;
}

/// Serves one connection on the worker's Unix socket: a hand-off link from a balancer on this
/// host (it starts with [`handoff::MAGIC`]) or a connection it proxies (a PROXY v2 header).
pub(crate) async fn serve_unix(
    http: Arc<Http>,
    mut stream: UnixStream,
    worker_id: String,
    connections: TaskTracker,
    shutdown: CancellationToken,
) {
    let mut first = [0u8; 1];
    match tokio::time::timeout(PROXY_HEADER_TIMEOUT, stream.read_exact(&mut first)).await {
        Ok(Ok(_)) => {}
        _ => return,
    }
    if first[0] != handoff::MAGIC[0] {
        return serve_unix_connection(http, stream, first[0]).await;
    }
    let mut magic = [0u8; handoff::MAGIC.len() - 1];
    match tokio::time::timeout(PROXY_HEADER_TIMEOUT, stream.read_exact(&mut magic)).await {
        Ok(Ok(_)) if magic == handoff::MAGIC[1..] => {}
        _ => {
            tracing::debug!("neither a PROXY header nor a hand-off link on the unix socket, closing");
            return;
        }
    }
    let serve = |stream, remote, lease, upgrade_by, tls| {
        connections.spawn(serve_handed_off(http.clone(), stream, remote, lease, upgrade_by, tls));
    };
    crate::handoff::serve_link(stream, &worker_id, shutdown, serve).await;
}

/// Serves one connection a balancer on this host handed off ([`crate::handoff`]): the client
/// itself is the peer; `lease` goes back to the balancer when the connection (or the socket
/// it became) closes. One not upgraded to a WebSocket by `upgrade_by` is closed then. A TLS
/// connection comes with its session, whose records the worker carries on ([`crate::tls`]).
async fn serve_handed_off(
    http: Arc<Http>,
    stream: TcpStream,
    remote: SocketAddr,
    lease: Arc<Lease>,
    upgrade_by: Option<tokio::time::Instant>,
    tls: Option<TlsSession>,
) {
    let _ = stream.set_nodelay(true);
    let peer = Peer { addr: Some(remote), tls: tls.is_some() };
    let Some(pending) = admit(&http, peer) else { return };
    match tls {
        None => {
            let served = serve_http(http, stream, peer, pending, Some(lease));
            within_upgrade_deadline(served, upgrade_by, remote).await;
        }
        Some(session) => {
            let stream = match TlsStream::new(stream, &session) {
                Ok(stream) => stream,
                Err(e) => {
                    tracing::debug!(%remote, error = %e, "unusable TLS session from the balancer, closing");
                    return;
                }
            };
            drop(session);
            let served = Box::pin(serve_http(http, stream, peer, pending, Some(lease)));
            within_upgrade_deadline(served, upgrade_by, remote).await;
        }
    }
}

/// Runs an HTTP connection until it ends or is upgraded; one not upgraded to a WebSocket by
/// `upgrade_by` is closed then.
async fn within_upgrade_deadline(
    served: impl Future<Output = ()>,
    upgrade_by: Option<tokio::time::Instant>,
    remote: SocketAddr,
) {
    match upgrade_by {
        // An upgrade ends the HTTP connection's future (the socket runs in its own task).
        Some(by) => {
            if tokio::time::timeout_at(by, served).await.is_err() {
                tracing::debug!(%remote, "not upgraded within the balancer's upgrade_timeout, closing");
            }
        }
        None => served.await,
    }
}

/// Counts a new connection against its client's address; `None` (and the connection is
/// closed) when that address already has `[worker] max_pending_per_ip` connections that have
/// not completed their handshake.
fn admit(http: &Http, peer: Peer) -> Option<Option<Pending>> {
    let Some(ip) = peer.addr.map(|a| a.ip()) else { return Some(None) };
    match http.pending.try_acquire(ip) {
        Some(pending) => Some(Some(pending)),
        None => {
            tracing::debug!(%ip, "too many connections from one address before their handshake, closing");
            crate::metrics::get().refused(peer.tls, crate::metrics::Refused::PendingPerIp);
            None
        }
    }
}

/// Serves one connection accepted on the worker's Unix socket from a balancer on this host,
/// which starts with a PROXY v2 header (whose first byte, `first`, was read already).
async fn serve_unix_connection(http: Arc<Http>, mut stream: UnixStream, first: u8) {
    let first = [first];
    let mut header = (&first[..]).chain(&mut stream);
    let Some(peer) = read_proxy_header(&mut header, Peer { addr: None, tls: false }).await else { return };
    let Some(pending) = admit(&http, peer) else { return };
    serve_http(http, stream, peer, pending, None).await;
}

/// The peer as the PROXY v2 header at the start of `stream` tells it; `None` (and the
/// connection is dropped) for a bad or late header.
async fn read_proxy_header<S: AsyncRead + Unpin>(stream: &mut S, peer: Peer) -> Option<Peer> {
    match tokio::time::timeout(PROXY_HEADER_TIMEOUT, proxy_protocol::read_header(stream)).await {
        Ok(Ok(header)) => Some(Peer { addr: header.source.or(peer.addr), tls: header.tls }),
        Ok(Err(e)) => {
            tracing::debug!(peer = ?peer.addr, error = %e, "bad PROXY header");
            None
        }
        Err(_) => None,
    }
}

/// Serves HTTP on one connection; `_pending` counts it against its client's address until it
/// ends (an upgraded socket counts on its own until its handshake); a hand-off `lease` is held
/// by the connection and by the socket it becomes.
async fn serve_http<S>(
    http: Arc<Http>,
    stream: S,
    peer: Peer,
    _pending: Option<Pending>,
    lease: Option<Arc<Lease>>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let remote = peer.addr;
    let header_timeout = http.header_timeout;
    let service = hyper::service::service_fn(move |request| {
        let http = http.clone();
        let lease = lease.clone();
        async move {
            let mut response = http.route(request, peer, lease).await;
            response.headers_mut().insert("x-sc-worker", http.worker_id.clone());
            Ok::<_, Infallible>(response)
        }
    });
    // The header timeout runs from the start of each request head, and while a keep-alive
    // connection waits for its next request: slowloris and idle keep-alive are both closed.
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    if let Err(e) = connection.await {
        tracing::debug!(?remote, error = %e, "http connection failed");
    }
}

impl Http {
    async fn route(
        &self,
        request: Request<Incoming>,
        peer: Peer,
        lease: Option<Arc<Lease>>,
    ) -> Response<Body> {
        let peer = self.proxy_sources.configured().client(peer, request.headers());
        let path = request.uri().path();
        if Self::normalise_path(path) == self.path {
            return self.upgrade(request, peer, lease).await;
        }
        match (request.method(), path) {
            (&Method::GET, "/healthz") => text(StatusCode::OK, "ok\n"),
            (&Method::GET, "/readyz") => {
                if self.context.pool.linked() > 0 {
                    text(StatusCode::OK, "ready\n")
                } else {
                    text(StatusCode::SERVICE_UNAVAILABLE, "no broker linked\n")
                }
            }
            (_, path) if is_backend_api(path) => self.api(request).await,
            _ => self.app_route(request).await,
        }
    }

    /// A request for the static folder or the app's routes, in that order (a file that
    /// exists wins, as with `express.static` mounted first); other `/api/` paths fall back to
    /// the backend API's answer.
    async fn app_route(&self, request: Request<Incoming>) -> Response<Body> {
        if matches!(*request.method(), Method::GET | Method::HEAD) && self.static_dir.is_some() {
            let response = self.static_file(&request).await;
            if response.status() != StatusCode::NOT_FOUND || self.routes.is_none() {
                return response;
            }
        }
        match &self.routes {
            Some(routes) => {
                use tower::ServiceExt;
                match routes.clone().oneshot(request).await {
                    Ok(response) => response,
                    Err(infallible) => match infallible {},
                }
            }
            None if request.uri().path().starts_with("/api/") => self.api(request).await,
            None => text(StatusCode::NOT_FOUND, "not found\n"),
        }
    }

    async fn upgrade(
        &self,
        mut request: Request<Incoming>,
        peer: Peer,
        lease: Option<Arc<Lease>>,
    ) -> Response<Body> {
        let headers = request.headers();
        let is_upgrade = headers
            .get(header::UPGRADE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
        let version_ok = headers.get(header::SEC_WEBSOCKET_VERSION).is_some_and(|v| v == "13");
        let key = headers.get(header::SEC_WEBSOCKET_KEY).cloned();
        let (true, true, Some(key), &Method::GET) = (is_upgrade, version_ok, key, request.method()) else {
            return text(StatusCode::BAD_REQUEST, "expected a WebSocket upgrade (GET, version 13)\n");
        };
        let origin = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok());
        if !self.origins.allows(origin) {
            let message = format!(
                "Failed to authorize socket handshake - Invalid origin: {}",
                origin.unwrap_or("null")
            );
            crate::metrics::get().refused(peer.tls, crate::metrics::Refused::Origin);
            return owned_text(StatusCode::FORBIDDEN, message);
        }
        let upgrade = UpgradeRequest {
            remote_addr: peer.addr,
            tls: peer.tls,
            uri: request.uri().to_string(),
            headers: request.headers().clone(),
        };
        if let Err(rejection) = self.context.handler.upgrade(&upgrade).await {
            let status = StatusCode::from_u16(rejection.status).unwrap_or(StatusCode::UNAUTHORIZED);
            crate::metrics::get().refused(peer.tls, crate::metrics::Refused::App);
            return owned_text(status, rejection.message);
        }
        let accept = derive_accept_key(key.as_bytes());
        let inject_panic = self.faults && request.uri().query().is_some_and(|q| q.contains("sc-test-panic"));
        let on_upgrade = hyper::upgrade::on(&mut request);
        let context = self.context.clone();
        // The socket counts against its client's address until its handshake.
        let pending = peer.addr.map(|a| self.pending.acquire(a.ip()));
        let max_payload = self.max_payload;
        let max_outbound = self.context.settings.max_outbound_bytes;
        let limits = Limits { max_payload, max_outbound };
        let socket = socket_task(on_upgrade, context, peer, pending, lease, limits, inject_panic);
        self.context.tasks.spawn(socket);
        let mut response = Response::new(Body::empty());
        *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let headers = response.headers_mut();
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        if let Ok(accept) = HeaderValue::from_str(&accept) {
            headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
        }
        response
    }

    /// The HTTP API for backends: publish, and the exchange's get/set/remove.
    async fn api(&self, request: Request<Incoming>) -> Response<Body> {
        if self.api_key.is_empty() {
            return text(StatusCode::NOT_FOUND, "the HTTP API is off (set [worker] api_key)\n");
        }
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if !constant_time_eq(given.as_bytes(), self.api_key.as_bytes()) {
            return json_response(StatusCode::UNAUTHORIZED, r#"{"error":"missing or wrong API key"}"#.into());
        }
        let method = request.method().clone();
        let path = request.uri().path().to_owned();
        let exchange = crate::exchange::Exchange::new(self.context.hub.clone(), self.context.pool.clone());
        match (&method, path.as_str()) {
            (&Method::POST, "/api/publish") => {
                let body = match self.read_json(request).await {
                    Ok(body) => body,
                    Err(response) => return response,
                };
                let Some(channel) = body.get("channel").and_then(|c| c.as_str()) else {
                    return json_response(
                        StatusCode::BAD_REQUEST,
                        r#"{"error":"channel must be a string"}"#.into(),
                    );
                };
                if channel.len() > self.context.settings.max_channel_name {
                    return json_error(
                        StatusCode::BAD_REQUEST,
                        "channel name longer than [worker] max_channel_name",
                    );
                }
                let data = body.get("data").map(|d| Bytes::from(d.to_string())).unwrap_or_default();
                match exchange.publish_raw(channel, data).await {
                    Ok(()) => json_response(StatusCode::OK, r#"{"ok":true}"#.into()),
                    Err(e) => error_response(&e),
                }
            }
            (_, path) if path.starts_with("/api/exchange/") => {
                let Some(key) = percent_decode(&path["/api/exchange/".len()..]).filter(|k| !k.is_empty())
                else {
                    return json_response(StatusCode::BAD_REQUEST, r#"{"error":"bad key"}"#.into());
                };
                let outcome = match method {
                    Method::GET => exchange.get(&key).await.map(|v| match v {
                        Some(value) => json_response(StatusCode::OK, value.to_string()),
                        None => json_response(StatusCode::NOT_FOUND, r#"{"error":"no such key"}"#.into()),
                    }),
                    Method::PUT => {
                        let value = match self.read_json(request).await {
                            Ok(value) => value,
                            Err(response) => return response,
                        };
                        exchange
                            .set(&key, &value)
                            .await
                            .map(|()| json_response(StatusCode::OK, r#"{"ok":true}"#.into()))
                    }
                    Method::DELETE => exchange.remove(&key).await.map(|v| match v {
                        Some(value) => {
                            json_response(StatusCode::OK, serde_json::json!({ "value": value }).to_string())
                        }
                        None => json_response(StatusCode::NOT_FOUND, r#"{"error":"no such key"}"#.into()),
                    }),
                    _ => return json_error(StatusCode::METHOD_NOT_ALLOWED, "use GET, PUT or DELETE"),
                };
                outcome.unwrap_or_else(|e| error_response(&e))
            }
            (&Method::GET, path) if path.starts_with("/api/presence/") => {
                match percent_decode(&path["/api/presence/".len()..]).filter(|c| !c.is_empty()) {
                    Some(channel) => match exchange.presence(&channel).await {
                        Ok(presence) => {
                            json_response(StatusCode::OK, serde_json::json!(presence).to_string())
                        }
                        Err(e) => error_response(&e),
                    },
                    None => json_error(StatusCode::BAD_REQUEST, "bad channel"),
                }
            }
            _ => json_error(StatusCode::NOT_FOUND, "no such API call"),
        }
    }

    /// Reads a JSON body of at most `max_payload` bytes.
    async fn read_json(&self, request: Request<Incoming>) -> Result<serde_json::Value, Response<Body>> {
        use http_body_util::BodyExt;
        let limited = http_body_util::Limited::new(request.into_body(), self.max_payload);
        let bytes = match limited.collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(_) => return Err(json_error(StatusCode::PAYLOAD_TOO_LARGE, "body too large or unreadable")),
        };
        serde_json::from_slice(&bytes)
            .map_err(|e| json_error(StatusCode::BAD_REQUEST, &format!("bad JSON: {e}")))
    }

    /// A file from the static folder; `/` and folders serve their index.html.
    async fn static_file(&self, request: &Request<Incoming>) -> Response<Body> {
        let Some(root) = &self.static_dir else { return text(StatusCode::NOT_FOUND, "not found\n") };
        let Some(path) = resolve(root, request.uri().path()) else {
            return text(StatusCode::NOT_FOUND, "not found\n");
        };
        let path = if path.is_dir() { path.join("index.html") } else { path };
        // Symlinks may not lead out of the folder.
        match tokio::fs::canonicalize(&path).await {
            Ok(real) if real.starts_with(root) => {}
            _ => return text(StatusCode::NOT_FOUND, "not found\n"),
        }
        match tokio::fs::read(&path).await {
            Ok(bytes) => {
                let length = bytes.len();
                let body = if request.method() == Method::HEAD { Bytes::new() } else { Bytes::from(bytes) };
                let mut response = Response::new(Body::from(body));
                let headers = response.headers_mut();
                headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type(&path)));
                headers.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
                response
            }
            Err(_) => text(StatusCode::NOT_FOUND, "not found\n"),
        }
    }
}

/// The worker's own HTTP API: paths an app's routes cannot take.
fn is_backend_api(path: &str) -> bool {
    path == "/api/publish" || path.starts_with("/api/exchange/") || path.starts_with("/api/presence/")
}

/// Maps a URL path to a file under `root`, refusing anything that is not a plain relative path.
fn resolve(root: &Path, url_path: &str) -> Option<PathBuf> {
    let decoded = percent_decode(url_path)?;
    let mut path = root.to_path_buf();
    for component in Path::new(decoded.trim_start_matches('/')).components() {
        match component {
            Component::Normal(part) => path.push(part),
            Component::CurDir => {}
            _ => return None,
        }
    }
    Some(path)
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    let decoded = String::from_utf8(out).ok()?;
    (!decoded.contains('\0')).then_some(decoded)
}

fn content_type(path: &Path) -> &'static str {
    match path.extension().and_then(|e| e.to_str()).unwrap_or("") {
        "html" | "htm" => "text/html; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "json" => "application/json",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "ico" => "image/x-icon",
        "txt" => "text/plain; charset=utf-8",
        "wasm" => "application/wasm",
        _ => "application/octet-stream",
    }
}

fn json_response(status: StatusCode, body: String) -> Response<Body> {
    let mut response = respond(status, Bytes::from(body));
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn json_error(status: StatusCode, message: &str) -> Response<Body> {
    json_response(status, serde_json::json!({ "error": message }).to_string())
}

/// A worker error as the HTTP API answers it: its status, its message and its code.
fn error_response(error: &crate::error::Error) -> Response<Body> {
    let body = serde_json::json!({ "error": error.to_string(), "code": error.code() });
    json_response(error.http_status(), body.to_string())
}

fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    respond(status, Bytes::from_static(body.as_bytes()))
}

fn owned_text(status: StatusCode, body: String) -> Response<Body> {
    respond(status, Bytes::from(body))
}

fn respond(status: StatusCode, body: Bytes) -> Response<Body> {
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The whole task of an open socket (upgrade, WebSocket, the loop), as spawned: with the
    /// socket's buffers (read buffer, [`READ_BUFFER`]) it is what an idle connection costs the
    /// worker. Keep it inside its budget: docs/architecture.md, "Memory per connection".
    #[tokio::test]
    async fn a_sockets_whole_task_stays_inside_its_memory_budget() {
        const BUDGET: usize = 1280;
        let mut request = Request::new(());
        let on_upgrade = hyper::upgrade::on(&mut request);
        let limits = Limits { max_payload: 1 << 20, max_outbound: 1 << 20 };
        let peer = Peer { addr: None, tls: false };
        let task = socket_task(on_upgrade, socket::tests::context(), peer, None, None, limits, false);
        let size = std::mem::size_of_val(&task);
        eprintln!("socket task: {size} bytes (budget {BUDGET})");
        assert!(size <= BUDGET, "a socket's task is {size} bytes, over its budget of {BUDGET}");
    }

    /// The task of a socket over a handed-off TLS session (or the worker's Unix socket): its
    /// own task, with its own budget; the session's keys are allocated apart.
    #[tokio::test]
    async fn an_other_sockets_task_stays_inside_its_memory_budget() {
        const BUDGET: usize = 1792;
        /// The size of what `make` returns, without a value to call it with (an `Upgraded`
        /// comes only from a real upgrade).
        fn returned_size<A, F>(_make: impl FnOnce(A) -> F) -> usize {
            std::mem::size_of::<F>()
        }
        let peer = Peer { addr: None, tls: true };
        let config = Limits { max_payload: 1 << 20, max_outbound: 1 << 20 }.config();
        let context = socket::tests::context();
        let size = returned_size(|upgraded| run_other(upgraded, context, peer, None, None, config, false));
        eprintln!("other socket task: {size} bytes (budget {BUDGET})");
        assert!(size <= BUDGET, "a socket's task is {size} bytes, over its budget of {BUDGET}");
    }

    #[test]
    fn path_matches_with_and_without_slash() {
        assert_eq!(Http::normalise_path("/socketcluster/"), "/socketcluster");
        assert_eq!(Http::normalise_path("/socketcluster"), "/socketcluster");
        assert_eq!(Http::normalise_path("/"), "/");
    }

    #[test]
    fn static_paths_stay_inside_the_root() {
        let root = Path::new("/srv/www");
        assert_eq!(resolve(root, "/index.html"), Some(PathBuf::from("/srv/www/index.html")));
        assert_eq!(resolve(root, "/a/./b.js"), Some(PathBuf::from("/srv/www/a/b.js")));
        assert_eq!(resolve(root, "/"), Some(PathBuf::from("/srv/www")));
        assert_eq!(resolve(root, "/../etc/passwd"), None);
        assert_eq!(resolve(root, "/a/%2e%2e/%2e%2e/etc/passwd"), None);
        assert_eq!(resolve(root, "/%00"), None);
        assert_eq!(resolve(root, "/%zz"), None);
    }
}
