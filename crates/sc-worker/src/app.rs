//! The low-level app API: the [`Handler`] trait, one method per hook.
//!
//! Most apps do not implement it themselves: [`crate::App`] registers typed procedures, events
//! and hooks by name and implements it for them (see docs/app-guide.md). `Handler` stays for
//! what the typed form does not cover (a raw frame hook, one `match` over every event). Every
//! hook has a default, so an implementation overrides only what it needs; it runs in the
//! stock-compatible worker through [`crate::Worker::bind_with`].
//!
//! Middleware (may refuse, reference section 7): `upgrade` is HANDSHAKE_WS (reject = HTTP
//! status), `handshake` is HANDSHAKE_SC (reject = close code), `subscribe`, `publish_in` and
//! `authenticate` are the INBOUND actions of the same names, `publish_out` is OUTBOUND, `invoke`
//! and `transmit` are procedures and receivers.
//!
//! Events (after the fact): `connected` (handshake accepted), `subscribed`, `unsubscribed` (by
//! request, kick-out or disconnect), `authenticated`, `deauthenticated` (by the client, the
//! server or expiry) and `disconnected`.
//!
//! Ordering: the middleware and the event hooks of one socket run in its own task, in the order
//! things happened (so a client's publishes keep their order, and `unsubscribed` never comes
//! before its `subscribed`); they may publish and use the exchange, but must not wait on the
//! same client (for example `socket.invoke(...)`), which cannot answer until they return.
//! `invoke` and `transmit` run in their own tasks and may do anything. `publish_out` runs once
//! per recipient on the fan-out path and must be cheap.

use std::net::SocketAddr;

use serde_json::Value;
use serde_json::value::RawValue;

use crate::handle::Socket;
use crate::protocol::ErrorObject;

/// The HTTP upgrade request, as `upgrade` sees it.
#[derive(Debug, Clone)]
pub struct UpgradeRequest {
    /// The client's address (from the balancer's PROXY header, or the TCP peer).
    pub remote_addr: Option<SocketAddr>,
    /// The client connection came over TLS (terminated by the balancer).
    pub tls: bool,
    /// Path and query, e.g. `/socketcluster/?token=x`.
    pub uri: String,
    /// The request headers.
    pub headers: http::HeaderMap,
}

/// An HTTP-level refusal of a WebSocket upgrade.
#[derive(Debug, Clone)]
pub struct HttpRejection {
    /// 401 for the stock server's handshake middleware.
    pub status: u16,
    /// The response body.
    pub message: String,
}

/// What `publish_in` decides about a client's publish.
#[derive(Debug)]
pub enum PublishIn {
    /// Publish as sent.
    Allow,
    /// Publish this data (JSON) instead.
    Rewrite(Value),
}

/// What `publish_out` decides for one recipient.
#[derive(Debug)]
pub enum PublishOut {
    /// Deliver the shared frame.
    Allow,
    /// Do not deliver to this socket.
    Block,
    /// Deliver this data (JSON) to this socket instead.
    Rewrite(Value),
}

/// An app's hooks. Every method has a default that behaves like the stock server with no
/// middleware and no procedures.
#[async_trait::async_trait]
pub trait Handler: Send + Sync + 'static {
    /// Before the WebSocket upgrade; an error answers the HTTP request with its status.
    async fn upgrade(&self, _request: &UpgradeRequest) -> Result<(), HttpRejection> {
        Ok(())
    }

    /// After the `#handshake` (and its token, if any) was processed. An error rejects the
    /// handshake: the client gets it and the socket closes with `statusCode` (4008 if unset).
    async fn handshake(&self, _socket: &Socket) -> Result<(), ErrorObject> {
        Ok(())
    }

    /// A valid token was presented (in `#handshake` or `#authenticate`). An error leaves the
    /// socket unauthenticated; with `isBadToken` the client also drops the token.
    async fn authenticate(&self, _socket: &Socket, _token: &Value) -> Result<(), ErrorObject> {
        Ok(())
    }

    /// A client subscribes. An error refuses the subscription and is sent to the client.
    async fn subscribe(
        &self,
        _socket: &Socket,
        _channel: &str,
        _data: Option<&RawValue>,
    ) -> Result<(), ErrorObject> {
        Ok(())
    }

    /// A client publishes (after `allow_client_publish` is checked). An error blocks it.
    async fn publish_in(
        &self,
        _socket: &Socket,
        _channel: &str,
        _data: &RawValue,
    ) -> Result<PublishIn, ErrorObject> {
        Ok(PublishIn::Allow)
    }

    /// Whether [`Handler::publish_out`] is implemented; when false (the default) the fan-out
    /// path skips the per-recipient call and sends the shared frame.
    fn has_publish_out(&self) -> bool {
        false
    }

    /// A channel message is about to be sent to one subscriber.
    fn publish_out(&self, _socket: &Socket, _channel: &str, _data: &RawValue) -> PublishOut {
        PublishOut::Allow
    }

    /// A client invokes a procedure: the answer is the reply's data, an error its error.
    async fn invoke(
        &self,
        _socket: &Socket,
        procedure: &str,
        _data: Option<&RawValue>,
    ) -> Result<Value, ErrorObject> {
        Err(no_procedure(procedure))
    }

    /// A client transmits an event (no answer).
    async fn transmit(&self, _socket: &Socket, _event: &str, _data: Option<&RawValue>) {}

    /// A frame that is not a SocketCluster packet (sc-formatter's raw message).
    fn raw(&self, _socket: &Socket, _message: &str) {}

    /// Channels whose presence the app needs (exact names, or prefixes ending in `*`), in
    /// addition to `[worker] presence_channels`.
    fn presence_channels(&self) -> Vec<String> {
        Vec::new()
    }

    /// Whether any of the event hooks below is implemented; when false the worker does not
    /// schedule them at all (the stock worker's sockets skip that work). Default: true.
    fn has_event_hooks(&self) -> bool {
        true
    }

    /// The handshake was accepted: the socket is open (the stock server's `connection`).
    async fn connected(&self, _socket: &Socket) {}

    /// The socket joined a channel (after `subscribe` allowed it).
    async fn subscribed(&self, _socket: &Socket, _channel: &str) {}

    /// The socket left a channel: the client unsubscribed, the server kicked it out, or the
    /// socket closed (then once per channel it held, before `disconnected`).
    async fn unsubscribed(&self, _socket: &Socket, _channel: &str) {}

    /// The socket became authenticated: a valid token in `#handshake` or `#authenticate`, or
    /// the server's `set_auth_token`.
    async fn authenticated(&self, _socket: &Socket) {}

    /// The socket lost its token: the client removed it, the server called `deauthenticate`,
    /// or it expired.
    async fn deauthenticated(&self, _socket: &Socket) {}

    /// The socket closed (with the code, if one was exchanged).
    async fn disconnected(&self, _socket: &Socket, _code: Option<u16>) {}
}

/// The answer to an invoke of a procedure nobody handles (the stock server's).
pub(crate) fn no_procedure(procedure: &str) -> ErrorObject {
    ErrorObject::new(
        "InvalidActionError",
        format!("No handler for the {procedure:?} procedure on this server"),
    )
}

/// The stock worker's handler: pure pub/sub and auth, no procedures.
#[derive(Debug, Default, Clone, Copy)]
pub struct DefaultHandler;

impl Handler for DefaultHandler {
    fn has_event_hooks(&self) -> bool {
        false
    }
}

impl HttpRejection {
    /// A refusal with a status and a message body.
    pub fn new(status: u16, message: impl Into<String>) -> Self {
        Self { status, message: message.into() }
    }
}
