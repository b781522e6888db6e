//! The typed app API: [`App`] registers procedures, events, hooks and HTTP routes by name, with
//! serde types for what the client sends and what it gets back, and implements the low-level
//! [`Handler`] for them. [`AppContext`] is what the app is built from: its `[app]` settings as
//! its own type and the worker's handles (exchange, sockets), there before the first socket.
//!
//! ```no_run
//! use serde::{Deserialize, Serialize};
//! use sc_worker::{App, AppContext, ErrorObject};
//!
//! #[derive(Deserialize)]
//! struct Login { username: String }
//!
//! #[derive(Serialize)]
//! struct Welcome { username: String }
//!
//! fn app(_ctx: AppContext) -> App {
//!     App::new().procedure("login", |socket, login: Login| async move {
//!         socket.set_auth_token(serde_json::json!({ "username": login.username }))?;
//!         Ok(Welcome { username: login.username })
//!     })
//! }
//!
//! fn main() -> std::process::ExitCode {
//!     sc_worker::run(app)
//! }
//! ```
//!
//! A payload that does not fit the handler's type gets an `InvalidArgumentsError` naming the
//! procedure or event (the stock error shape); an unknown procedure keeps the stock
//! `InvalidActionError`. Hooks run as [`Handler`] describes (middleware and events in the
//! socket's task, in order; procedures and events in their own tasks).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use serde_json::value::RawValue;

use crate::app::{Handler, HttpRejection, PublishIn, PublishOut, UpgradeRequest};
use crate::exchange::Exchange;
use crate::handle::Socket;
use crate::handle::Sockets;
use crate::protocol::ErrorObject;

type Boxed<T> = Pin<Box<dyn Future<Output = T> + Send>>;
/// A procedure or event, its payload decoded for its handler.
type Call = Box<dyn Fn(Socket, Option<&RawValue>) -> Boxed<Result<Value, ErrorObject>> + Send + Sync>;
type Hook<A, T = ()> = Box<dyn Fn(A) -> Boxed<T> + Send + Sync>;
type ChannelHook<T = ()> = Hook<(Socket, String), T>;
type UpgradeCheck = Box<dyn Fn(&UpgradeRequest) -> Result<(), HttpRejection> + Send + Sync>;
type PublishInCheck = Hook<(Socket, String, Value), Result<PublishIn, ErrorObject>>;
type PublishOutCheck = Box<dyn Fn(&Socket, &str, &RawValue) -> PublishOut + Send + Sync>;

/// What an app is built from: its settings and the worker's handles. `C` is the app's own
/// settings type, read from the `[app]` table of the cluster's config file (and `SC_APP__*`
/// variables); the default `()` takes none.
#[derive(Debug, Clone)]
pub struct AppContext<C = ()> {
    /// The `[app]` settings.
    pub config: C,
    /// The exchange: publish, subscribe and key/value data from server code.
    pub exchange: Exchange,
    /// This worker's open sockets.
    pub sockets: Sockets,
    /// This worker's id.
    pub worker_id: String,
}

/// An app: its procedures, events, hooks and HTTP routes. Build it with the methods below
/// (each takes and returns the app), and run it with [`crate::run`].
#[derive(Default)]
pub struct App {
    procedures: HashMap<String, Call>,
    events: HashMap<String, Call>,
    upgrade: Option<UpgradeCheck>,
    handshake: Option<Hook<Socket, Result<(), ErrorObject>>>,
    authenticate: Option<Hook<(Socket, Value), Result<(), ErrorObject>>>,
    subscribe: Option<ChannelHook<Result<(), ErrorObject>>>,
    publish_in: Option<PublishInCheck>,
    publish_out: Option<PublishOutCheck>,
    connected: Option<Hook<Socket>>,
    subscribed: Option<ChannelHook>,
    unsubscribed: Option<ChannelHook>,
    authenticated: Option<Hook<Socket>>,
    deauthenticated: Option<Hook<Socket>>,
    disconnected: Option<Hook<(Socket, Option<u16>)>>,
    routes: Option<axum::Router>,
    presence: Vec<String>,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App")
            .field("procedures", &self.procedures.keys().collect::<Vec<_>>())
            .field("events", &self.events.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// Decodes a payload for the handler of `kind` `name`.
fn decode<T: DeserializeOwned>(kind: &str, name: &str, data: Option<&RawValue>) -> Result<T, ErrorObject> {
    let text = data.map_or("null", RawValue::get);
    serde_json::from_str(text).map_err(|e| {
        ErrorObject::new("InvalidArgumentsError", format!("Invalid data for the {name:?} {kind}: {e}"))
    })
}

/// Boxes a hook that takes `A`.
fn hook<A, T, F, Fut>(f: F) -> Option<Hook<A, T>>
where
    F: Fn(A) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = T> + Send + 'static,
{
    Some(Box::new(move |args| Box::pin(f(args))))
}

impl App {
    /// An app with nothing registered: the stock worker's behaviour.
    pub fn new() -> Self {
        Self::default()
    }

    /// A procedure the client invokes (`socket.invoke(name, data)`): `data` is decoded as
    /// `Req` (`()` for none), and the handler's `Ok` is the reply's data, its `Err` the reply's
    /// error.
    pub fn procedure<Req, Rep, F, Fut>(mut self, name: &str, handler: F) -> Self
    where
        Req: DeserializeOwned + Send + 'static,
        Rep: Serialize + 'static,
        F: Fn(Socket, Req) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Rep, ErrorObject>> + Send + 'static,
    {
        let owned = name.to_owned();
        let call: Call = Box::new(move |socket, data| match decode::<Req>("procedure", &owned, data) {
            Ok(request) => {
                let reply = handler(socket, request);
                Box::pin(async move { serde_json::to_value(reply.await?).map_err(reply_error) })
            }
            Err(error) => Box::pin(std::future::ready(Err(error))),
        });
        self.procedures.insert(name.to_owned(), call);
        self
    }

    /// An event the client transmits (`socket.transmit(name, data)`): `data` is decoded as
    /// `Msg`; nothing is answered. (A client that invokes it instead gets `null` once the
    /// handler is done, or the error if `data` does not decode.)
    pub fn on<Msg, F, Fut>(mut self, name: &str, handler: F) -> Self
    where
        Msg: DeserializeOwned + Send + 'static,
        F: Fn(Socket, Msg) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let owned = name.to_owned();
        let call: Call = Box::new(move |socket, data| match decode::<Msg>("event", &owned, data) {
            Ok(message) => {
                let done = handler(socket, message);
                Box::pin(async move {
                    done.await;
                    Ok(Value::Null)
                })
            }
            Err(error) => Box::pin(std::future::ready(Err(error))),
        });
        self.events.insert(name.to_owned(), call);
        self
    }

    /// HTTP routes served next to the WebSocket path (an axum `Router`; give it the handles
    /// it needs with `with_state`). Files of `[worker] static_dir` come first, then these;
    /// `/healthz`, `/readyz`, the WebSocket path and the backend API (`/api/publish`,
    /// `/api/exchange/`, `/api/presence/`) stay the worker's. Several calls add up.
    pub fn routes(mut self, router: axum::Router) -> Self {
        self.routes = Some(match self.routes.take() {
            Some(routes) => routes.merge(router),
            None => router,
        });
        self
    }

    /// Tracks who is subscribed to the channels matching `pattern` (an exact name, or a prefix
    /// ending in `*`) across the cluster, for `exchange.presence(channel)` and
    /// `exchange.presence_events(channel)`; adds to `[worker] presence_channels`.
    pub fn presence(mut self, pattern: &str) -> Self {
        self.presence.push(pattern.to_owned());
        self
    }

    /// Middleware before the WebSocket upgrade (the stock HANDSHAKE_WS): an error answers the
    /// HTTP request with its status.
    pub fn allow_upgrade<F>(mut self, check: F) -> Self
    where
        F: Fn(&UpgradeRequest) -> Result<(), HttpRejection> + Send + Sync + 'static,
    {
        self.upgrade = Some(Box::new(check));
        self
    }

    /// Middleware on the `#handshake` (HANDSHAKE_SC): an error rejects the socket, closing it
    /// with the error's `statusCode` (4008 if unset).
    pub fn allow_handshake<F, Fut>(mut self, check: F) -> Self
    where
        F: Fn(Socket) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), ErrorObject>> + Send + 'static,
    {
        self.handshake = hook(check);
        self
    }

    /// Middleware on a valid token (AUTHENTICATE), with its payload: an error leaves the socket
    /// unauthenticated.
    pub fn allow_authenticate<F, Fut>(mut self, check: F) -> Self
    where
        F: Fn(Socket, Value) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), ErrorObject>> + Send + 'static,
    {
        self.authenticate = hook(move |(socket, token)| check(socket, token));
        self
    }

    /// Middleware on a client's subscribe (SUBSCRIBE): an error refuses it.
    pub fn allow_subscribe<F, Fut>(mut self, check: F) -> Self
    where
        F: Fn(Socket, String) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), ErrorObject>> + Send + 'static,
    {
        self.subscribe = hook(move |(socket, channel)| check(socket, channel));
        self
    }

    /// Middleware on a client's publish (PUBLISH_IN), with its data: allow, rewrite, or refuse
    /// with an error.
    pub fn publish_in<F, Fut>(mut self, check: F) -> Self
    where
        F: Fn(Socket, String, Value) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<PublishIn, ErrorObject>> + Send + 'static,
    {
        self.publish_in = hook(move |(socket, channel, data)| check(socket, channel, data));
        self
    }

    /// Middleware on each delivery to each subscriber (PUBLISH_OUT); runs on the fan-out path,
    /// so it is synchronous and must be cheap.
    pub fn publish_out<F>(mut self, check: F) -> Self
    where
        F: Fn(&Socket, &str, &RawValue) -> PublishOut + Send + Sync + 'static,
    {
        self.publish_out = Some(Box::new(check));
        self
    }

    /// A socket is open: its handshake was accepted (the stock server's `connection`).
    pub fn on_connect<F, Fut>(mut self, hook_fn: F) -> Self
    where
        F: Fn(Socket) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.connected = hook(hook_fn);
        self
    }

    /// A socket joined a channel.
    pub fn on_subscribe<F, Fut>(mut self, hook_fn: F) -> Self
    where
        F: Fn(Socket, String) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.subscribed = hook(move |(socket, channel)| hook_fn(socket, channel));
        self
    }

    /// A socket left a channel (it unsubscribed, was kicked out, or closed).
    pub fn on_unsubscribe<F, Fut>(mut self, hook_fn: F) -> Self
    where
        F: Fn(Socket, String) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.unsubscribed = hook(move |(socket, channel)| hook_fn(socket, channel));
        self
    }

    /// A socket became authenticated.
    pub fn on_authenticate<F, Fut>(mut self, hook_fn: F) -> Self
    where
        F: Fn(Socket) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.authenticated = hook(hook_fn);
        self
    }

    /// A socket lost its token.
    pub fn on_deauthenticate<F, Fut>(mut self, hook_fn: F) -> Self
    where
        F: Fn(Socket) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.deauthenticated = hook(hook_fn);
        self
    }

    /// A socket closed, with the close code if one was exchanged.
    pub fn on_disconnect<F, Fut>(mut self, hook_fn: F) -> Self
    where
        F: Fn(Socket, Option<u16>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.disconnected = hook(move |(socket, code)| hook_fn(socket, code));
        self
    }

    /// The HTTP routes, for the worker's HTTP side.
    pub(crate) fn take_routes(&mut self) -> Option<axum::Router> {
        self.routes.take()
    }
}

/// Runs an event hook if the app set one (its arguments are made only then).
async fn fire<A>(hook: Option<&Hook<A>>, args: impl FnOnce() -> A) {
    if let Some(hook) = hook {
        hook(args()).await;
    }
}

/// A reply the app's type could not turn into JSON.
fn reply_error(error: serde_json::Error) -> ErrorObject {
    ErrorObject::new("ServerError", format!("the reply could not be encoded: {error}"))
}

#[async_trait::async_trait]
impl Handler for App {
    async fn upgrade(&self, request: &UpgradeRequest) -> Result<(), HttpRejection> {
        self.upgrade.as_ref().map_or(Ok(()), |check| check(request))
    }

    async fn handshake(&self, socket: &Socket) -> Result<(), ErrorObject> {
        match &self.handshake {
            Some(check) => check(socket.clone()).await,
            None => Ok(()),
        }
    }

    async fn authenticate(&self, socket: &Socket, token: &Value) -> Result<(), ErrorObject> {
        match &self.authenticate {
            Some(check) => check((socket.clone(), token.clone())).await,
            None => Ok(()),
        }
    }

    async fn subscribe(
        &self,
        socket: &Socket,
        channel: &str,
        _data: Option<&RawValue>,
    ) -> Result<(), ErrorObject> {
        match &self.subscribe {
            Some(check) => check((socket.clone(), channel.to_owned())).await,
            None => Ok(()),
        }
    }

    async fn publish_in(
        &self,
        socket: &Socket,
        channel: &str,
        data: &RawValue,
    ) -> Result<PublishIn, ErrorObject> {
        match &self.publish_in {
            Some(check) => {
                let data = serde_json::from_str(data.get()).unwrap_or(Value::Null);
                check((socket.clone(), channel.to_owned(), data)).await
            }
            None => Ok(PublishIn::Allow),
        }
    }

    fn has_publish_out(&self) -> bool {
        self.publish_out.is_some()
    }

    fn presence_channels(&self) -> Vec<String> {
        self.presence.clone()
    }

    fn has_event_hooks(&self) -> bool {
        self.connected.is_some()
            || self.subscribed.is_some()
            || self.unsubscribed.is_some()
            || self.authenticated.is_some()
            || self.deauthenticated.is_some()
            || self.disconnected.is_some()
    }

    fn publish_out(&self, socket: &Socket, channel: &str, data: &RawValue) -> PublishOut {
        self.publish_out.as_ref().map_or(PublishOut::Allow, |check| check(socket, channel, data))
    }

    async fn invoke(
        &self,
        socket: &Socket,
        procedure: &str,
        data: Option<&RawValue>,
    ) -> Result<Value, ErrorObject> {
        match self.procedures.get(procedure).or_else(|| self.events.get(procedure)) {
            Some(call) => call(socket.clone(), data).await,
            None => Err(crate::app::no_procedure(procedure)),
        }
    }

    async fn transmit(&self, socket: &Socket, event: &str, data: Option<&RawValue>) {
        let Some(call) = self.events.get(event) else { return };
        if let Err(error) = call(socket.clone(), data).await {
            tracing::debug!(id = %socket.id(), event, error = %error.message, "transmitted event not handled");
        }
    }

    async fn connected(&self, socket: &Socket) {
        fire(self.connected.as_ref(), || socket.clone()).await;
    }

    async fn subscribed(&self, socket: &Socket, channel: &str) {
        fire(self.subscribed.as_ref(), || (socket.clone(), channel.to_owned())).await;
    }

    async fn unsubscribed(&self, socket: &Socket, channel: &str) {
        fire(self.unsubscribed.as_ref(), || (socket.clone(), channel.to_owned())).await;
    }

    async fn authenticated(&self, socket: &Socket) {
        fire(self.authenticated.as_ref(), || socket.clone()).await;
    }

    async fn deauthenticated(&self, socket: &Socket) {
        fire(self.deauthenticated.as_ref(), || socket.clone()).await;
    }

    async fn disconnected(&self, socket: &Socket, code: Option<u16>) {
        fire(self.disconnected.as_ref(), || (socket.clone(), code)).await;
    }
}
