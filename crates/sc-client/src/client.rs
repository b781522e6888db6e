//! The caller's side: [`connect`], the [`Client`] handle and the [`Responder`] for server
//! invokes.
//!
//! A [`Client`] is an `Arc` plus a queue sender: clone it freely into as many tasks as needed.
//! Calls serialise their frame in the caller's task (one `String`, which becomes the WebSocket
//! frame without a copy) and queue it for the connection task. The connection closes (code
//! 1000) when the last `Client` clone is dropped.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;
use serde_json::value::RawValue;
use tokio::sync::{mpsc, oneshot, watch};

use crate::connection::{self, HANDSHAKE_CID, OUTBOUND_QUEUE, Outbound, Reply, Shared, State};
use crate::{ClientConfig, CloseInfo, Error, Events, ProtocolVersion, codec};

/// A handle on one connection; cheap to clone, usable from many tasks.
#[derive(Debug, Clone)]
pub struct Client {
    shared: Arc<Shared>,
    outbound: mpsc::Sender<Outbound>,
}

/// The server's answer to `#handshake`.
#[derive(Debug, Clone, PartialEq)]
pub struct Handshake {
    /// The socket id the server gave (opaque).
    pub id: String,
    /// The server expects a ping at least this often; the client closes with 4000 otherwise.
    pub ping_timeout: Duration,
    /// Whether the token sent in the handshake was accepted.
    pub is_authenticated: bool,
    /// Why the token sent in the handshake was rejected (the handshake still succeeds).
    pub auth_error: Option<Value>,
}

/// The answer to `#authenticate`.
#[derive(Debug, Clone, PartialEq)]
pub struct AuthStatus {
    /// Whether the token was accepted.
    pub is_authenticated: bool,
    /// Why it was rejected, as the server sent it.
    pub auth_error: Option<Value>,
}

/// Answers one server-to-client invoke; the cid is echoed with its JSON type.
#[derive(Debug)]
pub struct Responder {
    rid: Box<RawValue>,
    /// Weak: an unanswered invoke does not keep the connection open.
    outbound: mpsc::WeakSender<Outbound>,
    shared: Arc<Shared>,
}

#[derive(Serialize)]
struct SubscribeData<'a> {
    channel: &'a str,
    #[serde(rename = "waitForAuth", skip_serializing_if = "std::ops::Not::not")]
    wait_for_auth: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<&'a Value>,
}

#[derive(Serialize)]
struct PublishData<'a, T> {
    channel: &'a str,
    data: T,
}

#[derive(Serialize)]
struct DisconnectData<'a> {
    code: u16,
    #[serde(skip_serializing_if = "str::is_empty")]
    data: &'a str,
}

/// Removes a pending invoke when its call ends without a reply (timeout or cancellation), so
/// the map holds only calls someone still waits for.
struct PendingGuard<'a> {
    shared: &'a Shared,
    cid: u64,
    armed: bool,
}

/// Connects, completes `#handshake` and starts the connection task; see [`ClientConfig`].
pub async fn connect(config: ClientConfig) -> Result<(Client, Events), Error> {
    let (ws, early, handshake) = connection::open(&config).await?;
    let (outbound, outbound_rx) = mpsc::channel(OUTBOUND_QUEUE);
    let (events_tx, events_rx) = mpsc::channel(config.event_buffer.max(1));
    let shared = Arc::new(Shared {
        protocol: config.protocol,
        ack_timeout: config.ack_timeout,
        next_cid: AtomicU64::new(HANDSHAKE_CID + 1),
        state: std::sync::Mutex::new(State { auth_token: config.auth_token.clone(), ..State::default() }),
        closed: watch::Sender::new(None),
        handshake,
    });
    let task_config = connection::TaskConfig {
        ping_timeout: (!config.ping_timeout_disabled).then_some(shared.handshake.ping_timeout),
        close_timeout: config.close_timeout,
    };
    tokio::spawn(connection::run(
        ws,
        Arc::clone(&shared),
        outbound_rx,
        outbound.downgrade(),
        events_tx,
        early,
        task_config,
    ));
    Ok((Client { shared, outbound }, Events::new(events_rx)))
}

impl Client {
    /// The socket id from the handshake.
    pub fn id(&self) -> &str {
        &self.shared.handshake.id
    }

    /// The handshake reply.
    pub fn handshake(&self) -> &Handshake {
        &self.shared.handshake
    }

    /// The protocol version this connection speaks.
    pub fn protocol(&self) -> ProtocolVersion {
        self.shared.protocol
    }

    /// Calls `event` and returns the reply's data (`Null` when absent).
    ///
    /// Fails with [`Error::Remote`] for an error reply, [`Error::Timeout`] after the ack
    /// timeout (the stock servers never answer an unknown procedure) and [`Error::Closed`]
    /// when the connection ends first.
    pub async fn invoke(&self, event: &str, data: impl Serialize) -> Result<Value, Error> {
        match self.invoke_raw(event, data).await? {
            Some(raw) => Ok(serde_json::from_str(raw.get())?),
            None => Ok(Value::Null),
        }
    }

    /// Like [`Client::invoke`], but returns the reply's data as JSON text, unparsed.
    pub async fn invoke_raw(
        &self,
        event: &str,
        data: impl Serialize,
    ) -> Result<Option<Box<RawValue>>, Error> {
        let cid = self.shared.next_cid.fetch_add(1, Ordering::Relaxed);
        let frame = codec::encode_emit(event, Some(&data), Some(cid))?;
        let (reply_tx, reply_rx) = oneshot::channel();
        let mut guard = self.register(cid, reply_tx)?;
        // Like the stock clients, the ack timer includes the time spent in the queue.
        let outcome = tokio::time::timeout(self.shared.ack_timeout, async {
            self.outbound.send(Outbound::Frame(frame.into())).await.ok()?;
            reply_rx.await.ok()
        })
        .await;
        match outcome {
            Err(_) => Err(Error::Timeout { event: event.to_owned(), after: self.shared.ack_timeout }),
            Ok(None) => Err(self.shared.closed_error()),
            Ok(Some(reply)) => {
                // The reader removed the entry when it took the sender.
                guard.armed = false;
                match reply {
                    Reply::Data(data) => Ok(data),
                    Reply::Error(error) => Err(Error::remote(serde_json::from_str(error.get())?)),
                    Reply::Closed(info) => Err(Error::Closed(info)),
                }
            }
        }
    }

    /// Sends `event` without a cid; the server never answers.
    pub async fn transmit(&self, event: &str, data: impl Serialize) -> Result<(), Error> {
        let frame = codec::encode_emit(event, Some(&data), None)?;
        self.send(frame).await
    }

    /// Subscribes to `channel`; fails with [`Error::Remote`] if the server refuses.
    pub async fn subscribe(&self, channel: &str) -> Result<(), Error> {
        self.subscribe_with(channel, false, None).await
    }

    /// Subscribes with the `waitForAuth` flag and subscription data. Unlike the stock
    /// clients, this does not hold a `waitForAuth` subscription back until authenticated: it
    /// is sent at once and the server decides.
    pub async fn subscribe_with(
        &self,
        channel: &str,
        wait_for_auth: bool,
        data: Option<Value>,
    ) -> Result<(), Error> {
        let request = SubscribeData { channel, wait_for_auth, data: data.as_ref() };
        self.invoke_raw("#subscribe", &request).await.map(drop)
    }

    /// Unsubscribes without a cid, like the stock clients: there is no reply.
    pub async fn unsubscribe(&self, channel: &str) -> Result<(), Error> {
        self.transmit("#unsubscribe", channel).await
    }

    /// Publishes and waits for the server's ack (`invokePublish`). Subscribers, including
    /// this client, get the message before the ack.
    pub async fn publish(&self, channel: &str, data: impl Serialize) -> Result<(), Error> {
        self.invoke_raw("#publish", PublishData { channel, data }).await.map(drop)
    }

    /// Publishes without a cid (`transmitPublish`): no ack, no error report.
    pub async fn transmit_publish(&self, channel: &str, data: impl Serialize) -> Result<(), Error> {
        self.transmit("#publish", PublishData { channel, data }).await
    }

    /// Sends `#authenticate`. On success the token becomes [`Client::auth_token`]; on an error
    /// reply the token is cleared, as the stock clients do.
    pub async fn authenticate(&self, token: &str) -> Result<AuthStatus, Error> {
        match self.invoke("#authenticate", token).await {
            Ok(data) => {
                let status = AuthStatus {
                    is_authenticated: data.get("isAuthenticated").and_then(Value::as_bool).unwrap_or(false),
                    auth_error: data.get("authError").filter(|e| !e.is_null()).cloned(),
                };
                if status.is_authenticated {
                    self.shared.lock().auth_token = Some(token.to_owned());
                }
                Ok(status)
            }
            Err(error @ Error::Remote { .. }) => {
                self.shared.lock().auth_token = None;
                Err(error)
            }
            Err(error) => Err(error),
        }
    }

    /// Sends `#removeAuthToken` and forgets the token.
    pub async fn deauthenticate(&self) -> Result<(), Error> {
        self.shared.lock().auth_token = None;
        let frame = codec::encode_emit::<()>("#removeAuthToken", None, None)?;
        self.send(frame).await
    }

    /// The current token: the configured one, then whatever `#setAuthToken`,
    /// `#removeAuthToken` and [`Client::authenticate`] made of it.
    pub fn auth_token(&self) -> Option<String> {
        self.shared.lock().auth_token.clone()
    }

    /// Sends `text` as one text frame, verbatim (for tests of bad input).
    pub async fn send_raw(&self, text: &str) -> Result<(), Error> {
        self.send(text.to_owned()).await
    }

    /// Closes with `code` and `reason` and waits until the connection has ended. For v1 it
    /// first sends `#disconnect {code, data}`, like the v14 client.
    pub async fn disconnect(&self, code: u16, reason: &str) -> CloseInfo {
        if self.shared.protocol == ProtocolVersion::V1
            && let Ok(frame) =
                codec::encode_emit("#disconnect", Some(&DisconnectData { code, data: reason }), None)
        {
            let _ = self.send(frame).await;
        }
        let close = Outbound::Close { code, reason: reason.to_owned() };
        let _ = self.outbound.send(close).await;
        self.closed().await
    }

    /// Waits until the connection has ended and returns how.
    pub async fn closed(&self) -> CloseInfo {
        let mut closed = self.shared.closed.subscribe();
        let info = match closed.wait_for(Option::is_some).await {
            Ok(info) => info.clone(),
            // Unreachable: the sender lives in `shared`, which this handle holds.
            Err(_) => None,
        };
        info.unwrap_or_else(|| CloseInfo { code: None, reason: "connection task ended".into() })
    }

    /// How the connection ended, if it has.
    pub fn close_info(&self) -> Option<CloseInfo> {
        self.shared.closed.borrow().clone()
    }

    async fn send(&self, frame: String) -> Result<(), Error> {
        self.outbound.send(Outbound::Frame(frame.into())).await.map_err(|_| self.shared.closed_error())
    }

    fn register(&self, cid: u64, reply: oneshot::Sender<Reply>) -> Result<PendingGuard<'_>, Error> {
        let mut state = self.shared.lock();
        if let Some(info) = &state.close {
            return Err(Error::Closed(info.clone()));
        }
        state.pending.insert(cid, reply);
        Ok(PendingGuard { shared: &self.shared, cid, armed: true })
    }
}

impl Responder {
    pub(crate) fn new(rid: Box<RawValue>, outbound: mpsc::WeakSender<Outbound>, shared: Arc<Shared>) -> Self {
        Self { rid, outbound, shared }
    }

    /// The server's cid, as JSON text.
    pub fn cid(&self) -> &str {
        self.rid.get()
    }

    /// Answers with `data`.
    pub async fn end(self, data: impl Serialize) -> Result<(), Error> {
        let frame = codec::encode_response(&self.rid, Some(&data))?;
        self.send(frame).await
    }

    /// Answers without data: `{"rid":n}`.
    pub async fn end_empty(self) -> Result<(), Error> {
        let frame = codec::encode_response::<()>(&self.rid, None)?;
        self.send(frame).await
    }

    /// Answers with an error object `{name, message}`.
    pub async fn error(self, name: &str, message: &str) -> Result<(), Error> {
        self.error_value(serde_json::json!({ "name": name, "message": message })).await
    }

    /// Answers with any error value (the stock servers pass a string through unchanged).
    pub async fn error_value(self, error: Value) -> Result<(), Error> {
        let frame = codec::encode_error(&self.rid, &error)?;
        self.send(frame).await
    }

    async fn send(&self, frame: String) -> Result<(), Error> {
        let outbound = self.outbound.upgrade().ok_or_else(|| self.shared.closed_error())?;
        outbound.send(Outbound::Frame(frame.into())).await.map_err(|_| self.shared.closed_error())
    }
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.shared.lock().pending.remove(&self.cid);
        }
    }
}
