//! An example app: a chat worker built on the sc-worker library.
//!
//! - `login` {username}: signs an auth token for the user (sent to the client as
//!   `#setAuthToken`) and answers `{"username": …}`;
//! - channels named `private` or `private/…` need an authenticated socket to subscribe;
//! - messages published to `chat/…` are stamped with the sender's username (publish-in rewrite);
//! - `echo`: answers its data; `whoami`: the token payload; `peer`: the client's address and
//!   whether it came over TLS, as the worker knows them (from the balancer's PROXY header);
//! - `ask` {event, data}: invokes `event` on the calling client and answers with its reply (a
//!   server-to-client invoke round trip); `tell` {event, data}: transmits to the client;
//! - `kick` {channel, message}, `logout`, `bye` {code, reason}: kick out, deauthenticate and
//!   disconnect the calling socket; `announce` {channel, data}: publishes from server code;
//! - a transmitted `ping-me` is answered by a transmitted `pong` with the same data;
//! - an upgrade request whose query has `deny=1` is refused with HTTP 401 (upgrade hook), and a
//!   handshake with the token of a user logged in as `banned` is rejected with close code 4403
//!   (handshake hook);
//! - the page in `public/` (served at `/`) is a small chat client.
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
        let private = channel == "private" || channel.starts_with("private/");
        if private && !socket.is_authenticated() {
            return Err(ErrorObject::new("SubscribeBlocked", format!("log in to subscribe to {channel}")));
        }
        Ok(())
    }

    async fn publish_in(
        &self,
        socket: &Socket,
        channel: &str,
        data: &RawValue,
    ) -> Result<PublishIn, ErrorObject> {
        if !channel.starts_with("chat/") {
            return Ok(PublishIn::Allow);
        }
        let from = socket.auth_token().and_then(|t| t.get("username").cloned()).unwrap_or(json!("anonymous"));
        let text: Value = serde_json::from_str(data.get()).unwrap_or(Value::Null);
        Ok(PublishIn::Rewrite(json!({ "from": from, "text": text })))
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
                socket
                    .exchange()
                    .publish(channel, &data["data"])
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

fn main() -> std::process::ExitCode {
    sc_common::cli::member_main(Role::Worker, |mut config, events, shutdown| async move {
        if config.worker.static_dir.is_none() {
            config.worker.static_dir = Some(PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/public")));
        }
        sc_worker::Worker::bind_with(config, Arc::new(Chat)).await?.serve(events, shutdown).await
    })
}
