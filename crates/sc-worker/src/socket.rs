//! One client socket: the SocketCluster conversation over an accepted WebSocket.
//!
//! One task per socket owns the WebSocket. It reads client frames and answers them, writes
//! whatever other tasks queued in its [`Outbox`] (fan-out), pings on a timer and enforces the
//! handshake and pong timeouts. Replies and queued frames are written with one flush per wake-up.
//! On exit it leaves every channel it held.

use std::collections::{HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use serde_json::value::RawValue;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tokio_util::sync::CancellationToken;

use crate::hub::{Hub, SocketKey};
use crate::outbox::Outbox;
use crate::protocol::{self, Inbound, Packet};

/// Close code: no pong within the ping timeout (clients reconnect at once).
pub const CLOSE_PONG_TIMEOUT: u16 = 4001;
/// Close code: no `#handshake` within the handshake timeout.
pub const CLOSE_HANDSHAKE_TIMEOUT: u16 = 4005;
/// Close code: a malformed `#handshake`.
pub const CLOSE_BAD_HANDSHAKE: u16 = 4008;
/// Close code: a message before the handshake.
pub const CLOSE_BEFORE_HANDSHAKE: u16 = 4009;
/// Close code: the socket's outbound queue overflowed (it did not read fast enough); clients
/// reconnect with backoff.
pub const CLOSE_SLOW_CONSUMER: u16 = 4100;
/// Close code: the worker is shutting down or being replaced in a rolling restart. It is sent as
/// a close frame *without* a status code, which the clients report as 1005: with 4000 and 4001,
/// the only codes after which both the v14 and the v20 clients reconnect at once instead of
/// after a 10-20 s backoff (see docs/architecture.md, "Draining a worker").
pub const CLOSE_SHUTDOWN: u16 = 1005;

/// What every socket of a worker shares.
#[derive(Debug)]
pub struct Shared {
    pub hub: Arc<Hub>,
    pub ping_interval: Duration,
    pub ping_timeout: Duration,
    pub handshake_timeout: Duration,
    pub outbound_queue: usize,
    pub shutdown: CancellationToken,
    next_key: AtomicU64,
}

/// Who is on the other end, as far as the worker knows.
#[derive(Debug, Clone, Copy)]
pub struct Peer {
    /// The client's address (from the PROXY header when behind the balancer).
    pub addr: Option<SocketAddr>,
    /// The client connected over TLS (terminated before the worker).
    pub tls: bool,
}

struct Socket {
    key: SocketKey,
    id: String,
    shared: Arc<Shared>,
    outbox: Arc<Outbox>,
    handshaken: bool,
    subscriptions: HashSet<Arc<str>>,
    /// Frames to write at the end of this wake-up.
    replies: Vec<String>,
}

/// Why the loop ended.
enum End {
    /// The client closed or the connection failed: nothing more to send.
    Gone,
    /// We close, with this code and reason.
    Close(u16, &'static str),
}

impl Shared {
    /// Socket settings for one worker.
    pub fn new(
        hub: Arc<Hub>,
        config: &sc_common::config::WorkerConfig,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            hub,
            ping_interval: config.ping_interval,
            ping_timeout: config.ping_timeout,
            handshake_timeout: config.handshake_timeout,
            outbound_queue: config.outbound_queue,
            shutdown,
            next_key: AtomicU64::new(1),
        }
    }
}

/// Runs one socket until it closes.
pub async fn run<S>(mut ws: WebSocketStream<S>, shared: Arc<Shared>, peer: Peer)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut socket = Socket {
        key: shared.next_key.fetch_add(1, Ordering::Relaxed),
        id: new_socket_id(),
        outbox: Arc::new(Outbox::new(shared.outbound_queue)),
        shared,
        handshaken: false,
        subscriptions: HashSet::new(),
        replies: Vec::new(),
    };
    tracing::debug!(id = %socket.id, addr = ?peer.addr, tls = peer.tls, "socket open");
    let end = socket.serve(&mut ws).await;
    socket.leave_all();
    if let End::Close(code, reason) = end {
        tracing::debug!(id = %socket.id, code, reason, "closing socket");
        // 1005 may not travel in a frame (RFC 6455 7.4.1): it is an empty close frame.
        let frame = (code != CLOSE_SHUTDOWN).then(|| CloseFrame {
            code: CloseCode::from(code),
            reason: reason.into(),
        });
        // A peer that stalls must not hold the task: the close gets a bounded time.
        let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(frame)).await;
    }
    tracing::debug!(id = %socket.id, "socket closed");
}

impl Socket {
    async fn serve<S>(&mut self, ws: &mut WebSocketStream<S>) -> End
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let shared = self.shared.clone();
        let start = Instant::now();
        let mut ping = tokio::time::interval_at(start + shared.ping_interval, shared.ping_interval);
        ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let handshake_deadline = tokio::time::sleep(shared.handshake_timeout);
        tokio::pin!(handshake_deadline);
        let mut last_seen = start;
        let mut queued = VecDeque::new();

        loop {
            tokio::select! {
                _ = shared.shutdown.cancelled() => return End::Close(CLOSE_SHUTDOWN, "Worker is shutting down"),
                frame = ws.next() => {
                    let text = match frame {
                        None => return End::Gone,
                        Some(Err(e)) => {
                            tracing::debug!(id = %self.id, error = %e, "socket read failed");
                            return End::Gone;
                        }
                        Some(Ok(Message::Text(text))) => text,
                        Some(Ok(Message::Binary(bytes))) => match Utf8Bytes::try_from(bytes) {
                            Ok(text) => text,
                            Err(_) => continue, // not text: a raw message for the app
                        },
                        Some(Ok(Message::Close(_))) => return End::Gone,
                        Some(Ok(_)) => continue, // WebSocket-level ping/pong: tungstenite answers
                    };
                    last_seen = Instant::now();
                    if let Err(end) = self.handle_text(&text).await {
                        return end;
                    }
                }
                _ = self.outbox.ready() => {
                    if self.outbox.take(&mut queued).is_err() {
                        return End::Close(CLOSE_SLOW_CONSUMER, "Socket outbound queue overflowed");
                    }
                    for frame in queued.drain(..) {
                        if ws.feed(Message::Text(frame)).await.is_err() {
                            return End::Gone;
                        }
                    }
                }
                _ = ping.tick() => {
                    if last_seen.elapsed() > shared.ping_timeout {
                        return End::Close(CLOSE_PONG_TIMEOUT, "Client pong timed out");
                    }
                    if ws.feed(Message::Text(Utf8Bytes::from_static(protocol::PING_V2))).await.is_err() {
                        return End::Gone;
                    }
                }
                _ = &mut handshake_deadline, if !self.handshaken => {
                    return End::Close(CLOSE_HANDSHAKE_TIMEOUT, "Did not receive #handshake from client before timeout");
                }
            }
            for reply in self.replies.drain(..) {
                if ws.feed(Message::Text(reply.into())).await.is_err() {
                    return End::Gone;
                }
            }
            if ws.flush().await.is_err() {
                return End::Gone;
            }
        }
    }

    async fn handle_text(&mut self, text: &str) -> Result<(), End> {
        match protocol::decode(text) {
            Inbound::Pong => Ok(()),
            Inbound::Packet(packet) => self.handle_packet(packet).await,
            Inbound::Batch(packets) => {
                for packet in packets {
                    self.handle_packet(packet).await?;
                }
                Ok(())
            }
            Inbound::Raw if !self.handshaken => Err(End::Close(
                CLOSE_BEFORE_HANDSHAKE,
                "Server received a message before the client handshake",
            )),
            Inbound::Raw => Ok(()),
        }
    }

    async fn handle_packet(&mut self, packet: Packet<'_>) -> Result<(), End> {
        let cid = packet.rpc_cid();
        let event = packet.event.as_deref();
        if !self.handshaken {
            return match (event, cid) {
                (Some("#handshake"), Some(cid)) => {
                    self.handshaken = true;
                    let timeout = self.shared.ping_timeout.as_millis() as u64;
                    self.replies
                        .push(protocol::encode_handshake(cid, &self.id, timeout));
                    Ok(())
                }
                (Some("#handshake"), None) => Err(End::Close(
                    CLOSE_BAD_HANDSHAKE,
                    "Handshake request was malformatted",
                )),
                _ => Err(End::Close(
                    CLOSE_BEFORE_HANDSHAKE,
                    "Server received a message before the client handshake",
                )),
            };
        }
        match event {
            // A response to a server invoke (none are made yet) or a stray packet.
            None => {}
            Some("#handshake") => {
                if let Some(cid) = cid {
                    let timeout = self.shared.ping_timeout.as_millis() as u64;
                    self.replies
                        .push(protocol::encode_handshake(cid, &self.id, timeout));
                }
            }
            Some("#subscribe") => self.subscribe(packet.data, cid),
            Some("#unsubscribe") => self.unsubscribe(packet.data, cid),
            Some("#publish") => self.publish(packet.data, cid).await,
            // Authentication arrives with the JWT support; the client owns its token meanwhile.
            Some("#removeAuthToken") => {}
            Some(name) => {
                if let Some(cid) = cid {
                    let message = format!("No handler for the {name:?} event on this server");
                    self.replies
                        .push(protocol::encode_error(cid, "InvalidActionError", &message));
                } else {
                    tracing::trace!(id = %self.id, event = name, "unhandled transmit");
                }
            }
        }
        Ok(())
    }

    fn subscribe(&mut self, data: Option<&RawValue>, cid: Option<&RawValue>) {
        // v20 ignores a #subscribe without a cid.
        let Some(cid) = cid else { return };
        let parsed =
            data.and_then(|d| serde_json::from_str::<protocol::SubscribeData>(d.get()).ok());
        let Some(request) = parsed else {
            self.replies.push(protocol::encode_error(
                cid,
                "InvalidActionError",
                "Subscribe channel name was malformatted",
            ));
            return;
        };
        if !self.subscriptions.contains(&*request.channel) {
            let name = self
                .shared
                .hub
                .subscribe(&request.channel, self.key, &self.outbox);
            self.subscriptions.insert(name);
        }
        self.replies.push(protocol::encode_ack(cid));
    }

    fn unsubscribe(&mut self, data: Option<&RawValue>, cid: Option<&RawValue>) {
        let channel =
            data.and_then(|d| serde_json::from_str::<std::borrow::Cow<'_, str>>(d.get()).ok());
        let removed = match &channel {
            Some(channel) if self.subscriptions.remove(&**channel) => {
                self.shared.hub.unsubscribe(channel, self.key);
                true
            }
            _ => false,
        };
        if let Some(cid) = cid {
            if removed {
                self.replies.push(protocol::encode_ack(cid));
            } else {
                let name = channel.as_deref().unwrap_or("");
                let message = format!(
                    "Failed to unsubscribe socket from the {name} channel - Socket was not subscribed"
                );
                self.replies
                    .push(protocol::encode_error(cid, "BrokerError", &message));
            }
        }
    }

    async fn publish(&mut self, data: Option<&RawValue>, cid: Option<&RawValue>) {
        let parsed = data.and_then(|d| serde_json::from_str::<protocol::PublishData>(d.get()).ok());
        let Some(request) = parsed else {
            if let Some(cid) = cid {
                self.replies.push(protocol::encode_error(
                    cid,
                    "InvalidActionError",
                    "Publish channel name was malformatted",
                ));
            }
            return;
        };
        let payload = request
            .data
            .map_or_else(Bytes::new, |d| Bytes::copy_from_slice(d.get().as_bytes()));
        let outcome = self
            .shared
            .hub
            .pool()
            .publish(&request.channel, payload)
            .await;
        if let Some(cid) = cid {
            match outcome {
                Ok(()) => self.replies.push(protocol::encode_ack(cid)),
                Err(e) => {
                    let message =
                        format!("Failed to publish to the {} channel - {e}", request.channel);
                    self.replies
                        .push(protocol::encode_error(cid, "BrokerError", &message));
                }
            }
        } else if let Err(e) = outcome {
            tracing::debug!(id = %self.id, channel = %request.channel, error = %e, "publish dropped");
        }
    }

    fn leave_all(&mut self) {
        for channel in self.subscriptions.drain() {
            self.shared.hub.unsubscribe(&channel, self.key);
        }
    }
}

impl Drop for Socket {
    /// A socket task that ends by a panic (caught in [`crate::http`]) still leaves its channels,
    /// so the hub holds no dead outbox.
    fn drop(&mut self) {
        self.leave_all();
    }
}

/// A socket id like the stock server's: 15 random bytes, URL-safe base64 (20 characters).
fn new_socket_id() -> String {
    let bytes: [u8; 15] = rand::random();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_ids_look_like_the_stock_ones() {
        let id = new_socket_id();
        assert_eq!(id.len(), 20);
        assert!(
            id.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        );
        assert_ne!(id, new_socket_id());
    }
}
