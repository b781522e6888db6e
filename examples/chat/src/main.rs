//! An example app: a chat worker built on the sc-worker app API ([`sc_worker::run`] and
//! [`App`]), with typed procedures, middleware, hooks and HTTP routes.
//!
//! - `login` {username}: signs an auth token for the user (sent to the client as
//!   `#setAuthToken`) and answers `{"username": …}`;
//! - `private/<name>` is the inbox of the user `<name>`: only a socket logged in as `<name>` may
//!   subscribe to it (`private` alone belongs to nobody);
//! - a message on a channel that shows a sender (`chat/…` and `private/…`) is stamped
//!   `{"from": <username>, "text": <data>}` with the name in the socket's auth token, whether a
//!   client publishes it (publish-in rewrite) or asks for it with `announce`; an anonymous
//!   socket may not post there, so no message ever claims a sender that did not send it;
//! - rooms (see [`rooms`]): `chat/<room>` is a room; its last `[app] history` messages are kept
//!   in the exchange (`history` {room} answers them), `who` {room} answers who is in it across
//!   the cluster, and each join and leave is announced on `who/<room>` (a channel clients may
//!   read, not publish to); `GET /api/rooms` lists the rooms;
//! - `echo`: answers its data; `whoami`: the token payload; `peer`: the client's address and
//!   whether it came over TLS, as the worker knows them (from the balancer's PROXY header);
//! - `ask` {event, data}: invokes `event` on the calling client and answers with its reply (a
//!   server-to-client invoke round trip); `tell` {event, data}: transmits to the client;
//! - `kick` {channel, message}, `logout`, `bye` {code, reason}: kick out, deauthenticate and
//!   disconnect the calling socket; `announce` {channel, data}: publishes from server code
//!   (stamped with the sender on `chat/…` and `private/…`, as above);
//! - a transmitted `ping-me` is answered by a transmitted `pong` with the same data;
//! - an upgrade request whose query has `deny=1` is refused with HTTP 401 (upgrade middleware),
//!   and a handshake with the token of a user logged in as `banned` is rejected with close code
//!   4403 (handshake middleware);
//! - the page `public/index.html` (served at `/`) is a chat client on the stock
//!   `socketcluster-client` browser build (served at `/socketcluster-client.min.js`); see
//!   [`files`] for where both are found.
//!
//! `login` trusts the name it is given, as a demo: a real app checks a password or an identity
//! provider there. Everything else (who may subscribe, who a message is from) follows from the
//! signed token, never from what the client writes in a message.
//!
//! The master runs this binary instead of the stock worker when `[worker] command` names it; see
//! examples/chat/README.md.

mod files;
mod rooms;

use std::path::PathBuf;
use std::sync::Arc;

use rooms::{NOTICE_PREFIX, Rooms, room_of};
use sc_worker::axum::response::{IntoResponse, Json};
use sc_worker::axum::{Router, routing::get};
use sc_worker::{App, AppContext, ErrorObject, HttpRejection, PublishIn, Socket};
use serde::de::IgnoredAny;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// The `[app]` settings (`SC_APP__*`).
#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct Settings {
    /// How many messages of each room the exchange keeps, and `history` answers (0: none).
    history: usize,
    /// The browser client served at `/socketcluster-client.min.js`; unset: the installed copy,
    /// else the source tree's `node_modules` (see [`files`]).
    client_js: Option<PathBuf>,
}

impl Default for Settings {
    fn default() -> Self {
        Self { history: 50, client_js: None }
    }
}

#[derive(Deserialize)]
struct Login {
    username: String,
}

#[derive(Serialize)]
struct Welcome {
    username: String,
}

/// `ask` and `tell`: an event for the client, with its data.
#[derive(Deserialize)]
struct ToClient {
    event: String,
    #[serde(default)]
    data: Value,
}

#[derive(Deserialize)]
struct Kick {
    channel: String,
    #[serde(default)]
    message: Value,
}

#[derive(Deserialize)]
struct Bye {
    code: Option<u16>,
    reason: Option<String>,
}

#[derive(Deserialize)]
struct Announce {
    channel: String,
    #[serde(default)]
    data: Value,
}

/// `history` and `who`.
#[derive(Deserialize)]
struct RoomRequest {
    room: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Peer {
    remote_address: Option<String>,
    remote_port: Option<u16>,
    tls: bool,
}

/// The username in the socket's auth token; `None` when the socket is not logged in.
fn username(socket: &Socket) -> Option<String> {
    socket.auth_token().and_then(|t| t.get("username").and_then(Value::as_str).map(str::to_owned))
}

/// The owner of a private channel: `<name>` for `private/<name>`, `""` (nobody: `login` refuses
/// an empty name) for `private`; `None` for any other channel.
fn private_owner(channel: &str) -> Option<&str> {
    if channel == "private" { Some("") } else { channel.strip_prefix("private/") }
}

/// Whether a channel's messages show who sent them (the chat page prints `from`).
fn shows_sender(channel: &str) -> bool {
    channel.starts_with("chat/") || private_owner(channel).is_some()
}

/// `text` stamped with the sender's name from the auth token; an anonymous socket is refused,
/// since any name it wrote would be a claim nobody checked.
fn stamped(socket: &Socket, channel: &str, text: Value) -> Result<Value, ErrorObject> {
    let from = username(socket)
        .ok_or_else(|| ErrorObject::new("LoginRequired", format!("log in to post on {channel}")))?;
    Ok(json!({ "from": from, "text": text }))
}

/// Who may subscribe: `private/<name>` is `<name>`'s only; every other channel is open.
fn may_subscribe(socket: &Socket, channel: &str) -> Result<(), ErrorObject> {
    let Some(owner) = private_owner(channel) else { return Ok(()) };
    match username(socket) {
        None => Err(ErrorObject::new("SubscribeBlocked", format!("log in to subscribe to {channel}"))),
        Some(name) if name == owner => Ok(()),
        Some(_) => Err(ErrorObject::new("SubscribeBlocked", format!("{channel} belongs to another user"))),
    }
}

/// What goes out on `channel` for `data` sent by `socket` (a publish or an `announce`): stamped
/// with the sender where the channel shows one, and kept in the history of a room.
async fn outgoing(rooms: &Rooms, socket: &Socket, channel: &str, data: Value) -> Result<Value, ErrorObject> {
    if !shows_sender(channel) {
        return Ok(data);
    }
    let message = stamped(socket, channel, data)?;
    if let Some(room) = room_of(channel) {
        rooms.remember(room, &message).await?;
    }
    Ok(message)
}

/// `GET /api/rooms`: `{"rooms": [{"room", "members", "messages"}]}`.
fn api(rooms: Arc<Rooms>) -> Router {
    Router::new().route(
        "/api/rooms",
        get(move || {
            let rooms = rooms.clone();
            async move {
                match rooms.list().await {
                    Ok(list) => Json(json!({ "rooms": list })).into_response(),
                    Err(error) => {
                        (error.http_status(), Json(json!({ "error": error.to_string() }))).into_response()
                    }
                }
            }
        }),
    )
}

/// The chat app.
fn chat(ctx: AppContext<Settings>) -> App {
    let rooms = Rooms::new(ctx.exchange, ctx.sockets, ctx.config.history);
    let (publishing, announcing, joining) = (rooms.clone(), rooms.clone(), rooms.clone());
    let (history, who) = (rooms.clone(), rooms.clone());
    App::new()
        .allow_upgrade(|request| {
            if request.uri.contains("deny=1") {
                return Err(HttpRejection::new(401, "upgrade refused by the app"));
            }
            Ok(())
        })
        .allow_handshake(|socket| async move {
            if username(&socket).as_deref() == Some("banned") {
                return Err(
                    ErrorObject::new("BannedError", "this user is banned").with("statusCode", json!(4403))
                );
            }
            Ok(())
        })
        .allow_subscribe(|socket, channel| async move { may_subscribe(&socket, &channel) })
        .publish_in(move |socket, channel, data| {
            let rooms = publishing.clone();
            async move {
                if channel.starts_with(NOTICE_PREFIX) {
                    return Err(ErrorObject::new("PublishBlocked", format!("{channel} is the server's")));
                }
                if !shows_sender(&channel) {
                    return Ok(PublishIn::Allow);
                }
                Ok(PublishIn::Rewrite(outgoing(&rooms, &socket, &channel, data).await?))
            }
        })
        .presence("chat/*")
        .on_subscribe(move |_socket, channel| {
            let rooms = joining.clone();
            async move {
                if let Some(room) = room_of(&channel) {
                    rooms.joined(room).await;
                }
            }
        })
        .procedure("login", |socket, login: Login| async move {
            if login.username.is_empty() {
                return Err(ErrorObject::new("LoginError", "username must not be empty"));
            }
            socket.set_auth_token(json!({ "username": login.username }))?;
            Ok(Welcome { username: login.username })
        })
        .procedure("logout", |socket, _: IgnoredAny| async move {
            socket.deauthenticate();
            Ok(())
        })
        .procedure("echo", |_, data: Value| async move { Ok(data) })
        .procedure("whoami", |socket, _: IgnoredAny| async move { Ok(socket.auth_token()) })
        .procedure("peer", |socket, _: IgnoredAny| async move {
            Ok(Peer {
                remote_address: socket.remote_addr().map(|a| a.ip().to_string()),
                remote_port: socket.remote_addr().map(|a| a.port()),
                tls: socket.is_tls(),
            })
        })
        .procedure("ask", |socket, ask: ToClient| async move { socket.invoke(&ask.event, &ask.data).await })
        .procedure("tell", |socket, tell: ToClient| async move {
            socket.transmit(&tell.event, &tell.data);
            Ok(())
        })
        .procedure("kick", |socket, kick: Kick| async move {
            socket.kick_out(&kick.channel, &kick.message);
            Ok(())
        })
        .procedure("bye", |socket, bye: Option<Bye>| async move {
            let bye = bye.unwrap_or(Bye { code: None, reason: None });
            socket.disconnect(bye.code.unwrap_or(4567), bye.reason.as_deref().unwrap_or("custom reason"));
            Ok(())
        })
        .procedure("announce", move |socket, announce: Announce| {
            let rooms = announcing.clone();
            async move {
                let message = outgoing(&rooms, &socket, &announce.channel, announce.data).await?;
                socket.exchange().publish(&announce.channel, &message).await?;
                Ok(())
            }
        })
        .procedure("history", move |_, request: RoomRequest| {
            let rooms = history.clone();
            async move { Ok(rooms.history(&request.room).await?) }
        })
        .procedure("who", move |_, request: RoomRequest| {
            let rooms = who.clone();
            async move { Ok(rooms.who(&request.room).await?) }
        })
        .on("ping-me", |socket, data: Value| async move { socket.transmit("pong", &data) })
        .routes(files::routes(ctx.config.client_js))
        .routes(api(rooms))
}

fn main() -> std::process::ExitCode {
    sc_worker::run(chat)
}
