//! [`Socket`]: the handle an app (and the worker's fan-out) holds on one client socket, and
//! [`Sockets`]: every open socket of the worker by id.
//!
//! It depends on nothing of the socket's task ([`crate::socket`]): what it needs of the worker
//! (signing tokens, the ack timeout, the exchange) comes in one shared [`Services`].
//!
//! The socket's task owns the WebSocket; everything else reaches the client through this handle,
//! which queues frames and requests in the socket's [`Outbox`]. Auth state lives here, behind a
//! mutex, so `set_auth_token` takes effect at once (as in the stock server), whichever task calls
//! it. Server-to-client invokes wait on a oneshot that the socket's task completes when the
//! client's response (`rid`) arrives.

use std::any::{Any, TypeId};
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use serde_json::Value;
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::auth::{AuthEngine, AuthToken};
use crate::exchange::Exchange;
use crate::hub::SocketKey;
use crate::outbox::{Event, Outbound, Outbox};
use crate::protocol::{self, ErrorObject, Protocol};

/// What every socket handle of a worker shares.
pub(crate) struct Services {
    /// Signs the tokens of `set_auth_token` (and verifies client tokens, in the socket task).
    pub(crate) auth: AuthEngine,
    /// `[worker] ack_timeout`: how long a server-to-client invoke waits.
    pub(crate) ack_timeout: Duration,
    /// The worker's exchange, for the app.
    pub(crate) exchange: Exchange,
    /// The worker's open sockets, for the app.
    pub(crate) sockets: Sockets,
    /// The app has event hooks ([`crate::Handler::has_event_hooks`]): schedule them.
    pub(crate) events: bool,
    /// `[worker] outbound_queue`: the items a socket's outbox holds at most.
    pub(crate) outbound_queue: usize,
}

/// Who is on the other end, as far as the worker knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Peer {
    /// The client's address (from the PROXY header when behind the balancer).
    pub(crate) addr: Option<SocketAddr>,
    /// The client connected over TLS (terminated before the worker).
    pub(crate) tls: bool,
}

/// A handle on one client socket; cheap to clone.
#[derive(Clone)]
pub struct Socket(pub(crate) Arc<State>);

/// The socket's shared state: every open socket holds one, so what most sockets never use
/// (a token, server-to-client invokes, the app's values) is boxed, allocated on first use.
pub(crate) struct State {
    pub(crate) key: SocketKey,
    id: SocketId,
    peer: Peer,
    pub(crate) outbox: Outbox,
    services: Arc<Services>,
    /// The protocol, encoded by [`encode_version`]: 0 while not known (auto mode before the
    /// first pong), then locked.
    version: AtomicU8,
    /// The client's invokes being handled (their answers not queued yet).
    invokes: AtomicU32,
    /// std Mutex: read or swapped, never held across await.
    auth: Mutex<Option<Box<AuthToken>>>,
    /// std Mutex: server-to-client invokes waiting for their answers; never held across await.
    pending: Mutex<Option<Box<Pending>>>,
    /// The app's per-socket state by type ([`Socket::insert`]); unallocated until used.
    state: Mutex<Option<Box<StateMap>>>,
}

/// A socket id, inline (ids are 20 characters: no allocation of their own).
#[derive(Clone, Copy)]
struct SocketId {
    len: u8,
    bytes: [u8; SocketId::MAX],
}

/// The app's values on one socket, one per type.
type StateMap = HashMap<TypeId, Arc<dyn Any + Send + Sync>>;

impl SocketId {
    const MAX: usize = 23;

    /// `id`, cut to [`SocketId::MAX`] bytes (at a character boundary) if longer.
    fn new(id: &str) -> Self {
        let mut end = id.len().min(Self::MAX);
        while !id.is_char_boundary(end) {
            end -= 1;
        }
        let mut bytes = [0u8; Self::MAX];
        bytes[..end].copy_from_slice(&id.as_bytes()[..end]);
        Self { len: end as u8, bytes }
    }

    fn as_str(&self) -> &str {
        // Cut at a character boundary when made: always UTF-8.
        std::str::from_utf8(&self.bytes[..usize::from(self.len)]).unwrap_or_default()
    }
}

#[derive(Default)]
struct Pending {
    next_cid: u64,
    waiting: HashMap<u64, oneshot::Sender<Result<Value, ErrorObject>>>,
}

impl std::fmt::Debug for Socket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Socket").field("id", &self.id()).field("peer", &self.0.peer).finish_non_exhaustive()
    }
}

impl Socket {
    pub(crate) fn new(
        services: Arc<Services>,
        key: SocketKey,
        id: &str,
        peer: Peer,
        version: Option<Protocol>,
        direct: Option<crate::direct::Direct>,
    ) -> Self {
        Self(Arc::new(State {
            key,
            id: SocketId::new(id),
            peer,
            outbox: Outbox::new(direct),
            services,
            version: AtomicU8::new(encode_version(version)),
            invokes: AtomicU32::new(0),
            auth: Mutex::new(None),
            pending: Mutex::new(None),
            state: Mutex::new(None),
        }))
    }

    /// The socket id sent to the client in the handshake (20 URL-safe base64 characters).
    pub fn id(&self) -> &str {
        self.0.id.as_str()
    }

    /// The client's address (from the balancer's PROXY header when behind it).
    pub fn remote_addr(&self) -> Option<SocketAddr> {
        self.0.peer.addr
    }

    /// Whether the client connected over TLS (terminated by the balancer).
    pub fn is_tls(&self) -> bool {
        self.0.peer.tls
    }

    /// The protocol the socket speaks, or `None` while not known yet (auto mode before the
    /// client's first pong).
    pub fn protocol_version(&self) -> Option<Protocol> {
        match self.0.version.load(Ordering::Relaxed) {
            1 => Some(Protocol::V1),
            2 => Some(Protocol::V2),
            _ => None,
        }
    }

    /// Whether the socket is known to speak `protocol` (false while not known).
    pub(crate) fn speaks(&self, protocol: Protocol) -> bool {
        self.protocol_version() == Some(protocol)
    }

    /// The payload of the socket's valid auth token, if authenticated.
    pub fn auth_token(&self) -> Option<Value> {
        self.auth().as_ref().map(|t| t.payload.clone())
    }

    /// Whether the socket holds a valid auth token.
    pub fn is_authenticated(&self) -> bool {
        self.auth().is_some()
    }

    /// Signs `payload` into a token (adding `iat` and a default `exp`), authenticates the socket
    /// with it at once and sends it to the client (`#setAuthToken`).
    pub fn set_auth_token(&self, payload: Value) -> Result<String, ErrorObject> {
        let token = self.0.services.auth.sign(payload)?;
        let signed = token.signed.clone();
        let frame = protocol::encode_set_auth_token(&signed);
        *self.auth() = Some(Box::new(token));
        self.push_frame(frame);
        self.event(Event::Authenticated);
        Ok(signed)
    }

    /// Removes the socket's token and tells the client (`#removeAuthToken`).
    pub fn deauthenticate(&self) {
        let had = self.auth().take().is_some();
        self.push_frame(protocol::encode_remove_auth_token(self.speaks(Protocol::V2)));
        if had {
            self.event(Event::Deauthenticated);
        }
    }

    /// Sends an event to the client, no answer expected.
    pub fn transmit(&self, event: &str, data: &Value) {
        self.push_frame(protocol::encode_event(event, Some(&data.to_string()), None));
    }

    /// Invokes a procedure on the client and waits for its answer, up to `[worker] ack_timeout`
    /// (then a TimeoutError).
    pub async fn invoke(&self, event: &str, data: &Value) -> Result<Value, ErrorObject> {
        let (tx, rx) = oneshot::channel();
        let cid = {
            let mut pending = self.pending();
            let pending = pending.get_or_insert_with(Box::default);
            pending.next_cid += 1;
            let cid = pending.next_cid;
            pending.waiting.insert(cid, tx);
            cid
        };
        self.push_frame(protocol::encode_event(event, Some(&data.to_string()), Some(cid)));
        let timeout = self.0.services.ack_timeout;
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(_)) => {
                Err(ErrorObject::new("BadConnectionError", "Socket closed before the client answered"))
            }
            Err(_) => {
                if let Some(pending) = self.pending().as_mut() {
                    pending.waiting.remove(&cid);
                }
                Err(ErrorObject::new("TimeoutError", format!("Event response for {event:?} timed out")))
            }
        }
    }

    /// Unsubscribes the socket from `channel` and tells the client (`#kickOut`).
    pub fn kick_out(&self, channel: &str, message: &Value) {
        self.push_item(Outbound::KickOut { channel: channel.to_owned(), message: message.to_string() });
    }

    /// Closes the socket with `code` (4500 and up: the stock clients do not reconnect).
    pub fn disconnect(&self, code: u16, reason: &str) {
        self.push_item(Outbound::Close { code, reason: reason.to_owned() });
    }

    /// Keeps `value` on this socket for as long as it is open, one value per type (the
    /// stock server's custom socket properties, typed); returns the value it replaces. Use a
    /// `Mutex` or atomics inside for state that changes.
    pub fn insert<T: Send + Sync + 'static>(&self, value: T) -> Option<Arc<T>> {
        let mut state = self.state_map();
        let old = state.get_or_insert_with(Box::default).insert(TypeId::of::<T>(), Arc::new(value));
        old.and_then(|old| old.downcast().ok())
    }

    /// The value of type `T` kept on this socket by [`Socket::insert`].
    pub fn state<T: Send + Sync + 'static>(&self) -> Option<Arc<T>> {
        let state = self.state_map();
        let value = state.as_ref()?.get(&TypeId::of::<T>())?.clone();
        value.downcast().ok()
    }

    /// Removes the value of type `T` from this socket and returns it.
    pub fn remove_state<T: Send + Sync + 'static>(&self) -> Option<Arc<T>> {
        let mut state = self.state_map();
        state.as_mut()?.remove(&TypeId::of::<T>())?.downcast().ok()
    }

    /// The worker's exchange (publish and subscribe from server code).
    pub fn exchange(&self) -> Exchange {
        self.0.services.exchange.clone()
    }

    pub(crate) fn key(&self) -> SocketKey {
        self.0.key
    }

    pub(crate) fn outbox(&self) -> &Outbox {
        &self.0.outbox
    }

    /// Locks the protocol on the first pong (auto mode); later pongs change nothing.
    pub(crate) fn lock_version(&self, version: Protocol) {
        let locked = encode_version(Some(version));
        let _ = self.0.version.compare_exchange(0, locked, Ordering::Relaxed, Ordering::Relaxed);
    }

    /// Replaces the auth state (the socket's own task, after verifying a token).
    /// Returns whether the socket was authenticated before.
    pub(crate) fn set_verified(&self, token: Option<AuthToken>) -> bool {
        std::mem::replace(&mut *self.auth(), token.map(Box::new)).is_some()
    }

    /// Drops an expired token; returns its `exp` if it had expired.
    pub(crate) fn expire_token(&self) -> Option<Option<f64>> {
        let mut auth = self.auth();
        if auth.as_deref().is_some_and(AuthToken::is_expired) {
            return auth.take().map(|t| t.exp);
        }
        None
    }

    /// Completes a server-to-client invoke with the client's answer.
    pub(crate) fn answer(&self, cid: u64, answer: Result<Value, ErrorObject>) {
        let waiting = self.pending().as_mut().and_then(|pending| pending.waiting.remove(&cid));
        if let Some(tx) = waiting {
            let _ = tx.send(answer);
        }
    }

    /// Fails every waiting server-to-client invoke (the socket closed).
    pub(crate) fn fail_pending(&self) {
        self.pending().take();
    }

    /// The client's invokes being handled.
    pub(crate) fn invokes_in_flight(&self) -> usize {
        self.0.invokes.load(Ordering::Relaxed) as usize
    }

    /// Counts one of the client's invokes as being handled until the guard is dropped.
    pub(crate) fn invoke_started(&self) -> InvokeGuard {
        self.0.invokes.fetch_add(1, Ordering::Relaxed);
        InvokeGuard(self.clone())
    }

    /// Queues one of the app's event hooks, to run in the socket's task after what is queued.
    pub(crate) fn event(&self, event: Event) {
        if self.0.services.events {
            self.push_item(Outbound::Event(event));
        }
    }

    pub(crate) fn push_frame(&self, frame: String) {
        self.push_item(Outbound::Frame(Utf8Bytes::from(frame)));
    }

    /// Queues an item in the socket's outbox, under `[worker] outbound_queue`.
    pub(crate) fn push_item(&self, item: Outbound) -> bool {
        self.0.outbox.push_item(item, self.0.services.outbound_queue)
    }

    /// A frame of the fan-out: written at once if the socket is idle ([`Outbox::push_direct`]).
    pub(crate) fn push_direct(&self, frame: Utf8Bytes) -> bool {
        self.0.outbox.push_direct(frame, self.0.services.outbound_queue)
    }

    fn auth(&self) -> MutexGuard<'_, Option<Box<AuthToken>>> {
        self.0.auth.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn state_map(&self) -> MutexGuard<'_, Option<Box<StateMap>>> {
        self.0.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn pending(&self) -> MutexGuard<'_, Option<Box<Pending>>> {
        self.0.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One of the client's invokes being handled; dropped after its answer is queued.
pub(crate) struct InvokeGuard(Socket);

impl Drop for InvokeGuard {
    fn drop(&mut self) {
        self.0.0.invokes.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The atomic form of a socket's protocol: 0 unknown, 1 or 2.
fn encode_version(version: Option<Protocol>) -> u8 {
    match version {
        None => 0,
        Some(Protocol::V1) => 1,
        Some(Protocol::V2) => 2,
    }
}

// The worker's open sockets by id, for server code: look one up, count them, or go over all of
// them (the stock server's `clients` and `clientsCount`). A socket is listed from its accepted
// handshake until it closes. Only this worker's sockets: the cluster-wide view of who is where
// is presence, through the brokers.

/// The open sockets of this worker; cheap to clone.
#[derive(Clone, Default)]
pub struct Sockets(Arc<Mutex<HashSet<Socket>>>);

/// A socket in [`Sockets`] is known by its id: the set needs no separate key per socket.
impl PartialEq for Socket {
    fn eq(&self, other: &Self) -> bool {
        self.id() == other.id()
    }
}

impl Eq for Socket {}

impl std::hash::Hash for Socket {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.id().hash(state);
    }
}

impl std::borrow::Borrow<str> for Socket {
    fn borrow(&self) -> &str {
        self.id()
    }
}

impl std::fmt::Debug for Sockets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sockets").field("open", &self.len()).finish()
    }
}

impl Sockets {
    /// The open socket with this id, if it is on this worker.
    pub fn get(&self, id: &str) -> Option<Socket> {
        self.lock().get(id).cloned()
    }

    /// How many sockets are open (handshake done) on this worker.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no socket is open.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// Every open socket, as of now (a copy: sockets that open or close meanwhile do not
    /// change it).
    pub fn all(&self) -> Vec<Socket> {
        self.lock().iter().cloned().collect()
    }

    pub(crate) fn insert(&self, socket: &Socket) {
        self.lock().insert(socket.clone());
    }

    pub(crate) fn remove(&self, socket: &Socket) {
        self.lock().remove(socket.id());
    }

    /// std Mutex: held for one set operation, never across await.
    fn lock(&self) -> MutexGuard<'_, HashSet<Socket>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}
