//! An example app: a chat worker built on the sc-worker library.
//!
//! - `login` {username}: signs an auth token for the user (sent to the client as
//!   `#setAuthToken`) and answers `{"username": …}`;
//! - `private/<name>` is the inbox of the user `<name>`: only a socket logged in as `<name>` may
//!   subscribe to it (`private` alone belongs to nobody);
//! - a message on a channel that shows a sender (`chat/…` and `private/…`) is stamped
//!   `{"from": <username>, "text": <data>}` with the name in the socket's auth token, whether a
//!   client publishes it (publish-in rewrite) or asks for it with `announce`; an anonymous
//!   socket may not post there, so no message ever claims a sender that did not send it;
//! - `echo`: answers its data; `whoami`: the token payload; `peer`: the client's address and
//!   whether it came over TLS, as the worker knows them (from the balancer's PROXY header);
//! - `ask` {event, data}: invokes `event` on the calling client and answers with its reply (a
//!   server-to-client invoke round trip); `tell` {event, data}: transmits to the client;
//! - `kick` {channel, message}, `logout`, `bye` {code, reason}: kick out, deauthenticate and
//!   disconnect the calling socket; `announce` {channel, data}: publishes from server code
//!   (stamped with the sender on `chat/…` and `private/…`, as above);
//! - a transmitted `ping-me` is answered by a transmitted `pong` with the same data;
//! - an upgrade request whose query has `deny=1` is refused with HTTP 401 (upgrade hook), and a
//!   handshake with the token of a user logged in as `banned` is rejected with close code 4403
//!   (handshake hook);
//! - the page in `public/` (served at `/`) is a small chat client; `[worker] static_dir` says
//!   where it is, by default the installed copy beside the binary
//!   (`<prefix>/share/sc-rs/chat/public`, where the Dockerfile puts it), else the source tree's.
//!
//! `login` trusts the name it is given, as a demo: a real app checks a password or an identity
//! provider there. Everything else (who may subscribe, who a message is from) follows from the
//! signed token, never from what the client writes in a message.
//!
//! The master runs this binary instead of the stock worker when `[worker] command` names it; see
//! examples/chat/README.md.

use std::path::PathBuf;
use std::sync::Arc;

use sc_common::Role;
use sc_worker::{ErrorObject, Handler};
use sc_worker::{HttpRejection, PublishIn, Socket, UpgradeRequest};
use serde_json::value::RawValue;
use serde_json::{Value, json};

/// The chat app's hooks.
struct Chat;

fn parse(data: Option<&RawValue>) -> Value {
    data.and_then(|d| serde_json::from_str(d.get()).ok()).unwrap_or(Value::Null)
}

fn field<'a>(data: &'a Value, key: &str) -> Result<&'a str, ErrorObject> {
    data.get(key)
        .and_then(Value::as_str)
        .ok_or_else(|| ErrorObject::new("InvalidArgumentsError", format!("{key} must be a string")))
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

#[async_trait::async_trait]
impl Handler for Chat {
    async fn upgrade(&self, request: &UpgradeRequest) -> Result<(), HttpRejection> {
        if request.uri.contains("deny=1") {
            return Err(HttpRejection::new(401, "upgrade refused by the app"));
        }
        Ok(())
    }

    async fn handshake(&self, socket: &Socket) -> Result<(), ErrorObject> {
        let banned = socket.auth_token().and_then(|t| t.get("username").cloned()) == Some(json!("banned"));
        if banned {
            return Err(
                ErrorObject::new("BannedError", "this user is banned").with("statusCode", json!(4403))
            );
        }
        Ok(())
    }

    async fn subscribe(
        &self,
        socket: &Socket,
        channel: &str,
        _data: Option<&RawValue>,
    ) -> Result<(), ErrorObject> {
        let Some(owner) = private_owner(channel) else { return Ok(()) };
        match username(socket) {
            None => Err(ErrorObject::new("SubscribeBlocked", format!("log in to subscribe to {channel}"))),
            Some(name) if name == owner => Ok(()),
            Some(_) => {
                Err(ErrorObject::new("SubscribeBlocked", format!("{channel} belongs to another user")))
            }
        }
    }

    async fn publish_in(
        &self,
        socket: &Socket,
        channel: &str,
        data: &RawValue,
    ) -> Result<PublishIn, ErrorObject> {
        if !shows_sender(channel) {
            return Ok(PublishIn::Allow);
        }
        let text: Value = serde_json::from_str(data.get()).unwrap_or(Value::Null);
        Ok(PublishIn::Rewrite(stamped(socket, channel, text)?))
    }

    async fn invoke(
        &self,
        socket: &Socket,
        procedure: &str,
        data: Option<&RawValue>,
    ) -> Result<Value, ErrorObject> {
        let data = parse(data);
        match procedure {
            "login" => {
                let username = field(&data, "username")?;
                if username.is_empty() {
                    return Err(ErrorObject::new("LoginError", "username must not be empty"));
                }
                socket.set_auth_token(json!({ "username": username }))?;
                Ok(json!({ "username": username }))
            }
            "logout" => {
                socket.deauthenticate();
                Ok(Value::Null)
            }
            "echo" => Ok(data),
            "whoami" => Ok(socket.auth_token().unwrap_or(Value::Null)),
            "peer" => Ok(json!({
                "remoteAddress": socket.remote_addr().map(|a| a.ip().to_string()),
                "remotePort": socket.remote_addr().map(|a| a.port()),
                "tls": socket.is_tls(),
            })),
            "ask" => socket.invoke(field(&data, "event")?, &data["data"]).await,
            "tell" => {
                socket.transmit(field(&data, "event")?, &data["data"]);
                Ok(Value::Null)
            }
            "kick" => {
                socket.kick_out(field(&data, "channel")?, &data["message"]);
                Ok(Value::Null)
            }
            "bye" => {
                let code = data["code"].as_u64().and_then(|c| u16::try_from(c).ok()).unwrap_or(4567);
                socket.disconnect(code, data["reason"].as_str().unwrap_or("custom reason"));
                Ok(Value::Null)
            }
            "announce" => {
                let channel = field(&data, "channel")?;
                let message = if shows_sender(channel) {
                    stamped(socket, channel, data["data"].clone())?
                } else {
                    data["data"].clone()
                };
                socket
                    .exchange()
                    .publish(channel, &message)
                    .await
                    .map_err(|e| ErrorObject::new("BrokerError", e.to_string()))?;
                Ok(Value::Null)
            }
            other => Err(ErrorObject::new("UnknownProcedureError", format!("no procedure {other:?}"))),
        }
    }

    async fn transmit(&self, socket: &Socket, event: &str, data: Option<&RawValue>) {
        if event == "ping-me" {
            socket.transmit("pong", &parse(data));
        }
    }
}

/// Where the page is installed beside the binary: `<prefix>/bin/sc-chat-worker` serves
/// `<prefix>/share/sc-rs/chat/public` (the Dockerfile copies it to /usr/local/share/...).
const INSTALLED_PUBLIC: &str = "../share/sc-rs/chat/public";

/// The page's folder when `[worker] static_dir` is unset: the installed one if there is one,
/// else the source tree's (a binary run from target/).
fn default_public() -> PathBuf {
    let installed = std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.join(INSTALLED_PUBLIC)))
        .filter(|dir| dir.is_dir());
    installed.unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/public")))
}

fn main() -> std::process::ExitCode {
    sc_common::cli::member_main(Role::Worker, |mut config, events, shutdown| async move {
        if config.worker.static_dir.is_none() {
            config.worker.static_dir = Some(default_public());
        }
        sc_worker::Worker::bind_with(config, Arc::new(Chat)).await?.serve(events, shutdown).await
    })
}
