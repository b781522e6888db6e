//! One client socket: the SocketCluster conversation over an accepted WebSocket.
//!
//! One task per socket owns the WebSocket. It reads client frames and answers them, writes what
//! other tasks queued in the socket's outbox (fan-out, the app's [`Socket`] handle, invoke
//! handlers), pings and enforces the handshake and pong timeouts when the worker's timers say
//! so ([`crate::timers`]: the task holds no timer of its own). Replies and queued frames are
//! written with one flush per wake-up. On exit it leaves every channel it held.
//!
//! Memory: every idle socket holds this task, so what it keeps across its wait is counted in
//! bytes (see the budget tests): rare paths (handling a frame, an event hook, the close) are
//! boxed, allocated only while they run.
//!
//! Protocol versions (reference section 8): in `[worker] protocol_version = "auto"` a socket
//! pings in both styles (`"#1"` and `""`) until its first pong locks it to v1 or v2; reply shapes
//! that differ between the client lines use the unions both accept.

use std::borrow::Cow;
use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use std::pin::Pin;
use std::task::Poll;

use futures_util::{Sink, SinkExt, StreamExt};
use serde_json::Value;
use serde_json::value::RawValue;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message, Utf8Bytes};

use crate::app::{Handler, PublishIn, PublishOut};
use crate::auth;
use crate::brokers::{BrokerPool, LINK_WAIT, Receipt};
pub use crate::handle::Socket;
use crate::handle::{Peer, Services};
use crate::hub::{self, Hub, Recipient};
use crate::outbox::{Due, Event, Outbound};
use crate::protocol::{self, ErrorObject, Inbound, Packet, Protocol};
use sc_common::config::ProtocolVersion;
use sc_common::per_ip::Pending;

/// Close code: no pong within the ping timeout (clients reconnect at once).
pub const CLOSE_PONG_TIMEOUT: u16 = 4001;
/// Close code: no `#handshake` within the handshake timeout.
pub const CLOSE_HANDSHAKE_TIMEOUT: u16 = 4005;
/// Close code: a malformed `#handshake` or `#authenticate`, or a handshake the app rejected.
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
/// Close code: the client broke the WebSocket protocol (an unmasked or reserved frame, an
/// oversized control frame...).
pub const CLOSE_PROTOCOL_ERROR: u16 = 1002;
/// Close code: a text message that is not valid UTF-8.
pub const CLOSE_INVALID_DATA: u16 = 1007;
/// Close code: a message larger than `[worker] max_payload`.
pub const CLOSE_TOO_BIG: u16 = 1009;

/// How long closing a socket may take: the close frame waits behind what is unsent, which a
/// client that reads again (a slow consumer catching up) still gets; one that does not is
/// dropped after this.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Invokes a client may have unanswered before the worker stops reading it (flow control, so
/// that a client pipelining invokes is slowed, not closed as a slow consumer).
const MAX_INVOKES_IN_FLIGHT: usize = 256;

/// The socket settings of one worker (`[worker]`, see the README for each key).
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub(crate) protocol: ProtocolVersion,
    pub(crate) ping_timeout: Duration,
    pub(crate) socket_channel_limit: usize,
    pub(crate) max_outbound_bytes: usize,
    pub(crate) max_channel_name: usize,
    pub(crate) allow_client_publish: bool,
}

/// What every socket of a worker shares.
pub(crate) struct Context {
    /// Local fan-out: subscriptions.
    pub(crate) hub: Arc<Hub>,
    /// The brokers: publishes.
    pub(crate) pool: Arc<BrokerPool>,
    /// The app's hooks.
    pub(crate) handler: Arc<dyn Handler>,
    /// What the sockets' handles share (the auth engine among it).
    pub(crate) services: Arc<Services>,
    pub(crate) settings: Settings,
    /// The sockets' tasks, which a drain waits for.
    pub(crate) tasks: tokio_util::task::TaskTracker,
    /// Every socket's pings and handshake deadline, and the drain signal (every socket closes
    /// with [`CLOSE_SHUTDOWN`]).
    pub(crate) timers: crate::timers::Timers,
}

/// The socket task's own state.
struct Conversation {
    socket: Socket,
    context: Arc<Context>,
    handshaken: bool,
    /// The channels it holds; boxed, allocated at the first subscription (most sockets of some
    /// apps never subscribe, and every idle socket holds this struct).
    #[allow(clippy::box_collection)]
    subscriptions: Option<Box<HashSet<Arc<str>>>>,
    /// This socket as the hub's subscriber, made on its first subscription.
    recipient: Option<Arc<dyn Recipient>>,
    /// Frames to write at the end of this wake-up.
    replies: Vec<String>,
    /// Counts the socket against its client's address until the handshake completes (boxed:
    /// gone after the handshake, and every idle socket holds this struct).
    pending: Option<Box<Pending>>,
}

impl Drop for Conversation {
    /// A socket task that ends by a panic (caught in [`crate::http`]) still leaves its channels,
    /// so the hub holds no dead subscriber.
    fn drop(&mut self) {
        self.leave_all();
    }
}

/// A socket as a channel subscriber: deliveries go to its outbox, through the app's
/// `publish_out` hook when it has one.
struct Subscriber {
    socket: Socket,
    handler: Arc<dyn Handler>,
}

/// What woke the socket's loop.
enum Wake {
    /// The write buffer was flushed to the kernel (or the connection failed).
    Flushed(Result<(), tungstenite::Error>),
    /// Something was queued in the outbox, or signalled (a ping, the handshake deadline, the
    /// drain).
    Outbox,
    /// A client frame, an error, or the end of the stream.
    Frame(Option<Result<Message, tungstenite::Error>>),
}

/// What the loop has handed to the WebSocket but not yet seen flushed to the kernel.
#[derive(Default)]
struct Output {
    /// Bytes written into the WebSocket since the last completed flush (an estimate: frame
    /// payloads; headers are a few bytes each).
    unsent: usize,
}

impl Output {
    /// Queues a frame in the WebSocket's write buffer without waiting: the loop flushes it
    /// when the socket is writable.
    fn send<S>(&mut self, ws: &mut WebSocketStream<S>, message: Message) -> Result<(), End>
    where
        S: AsyncRead + AsyncWrite + ReadReady + Unpin,
    {
        crate::metrics::get().sent(message.len());
        // The frame and its header.
        self.unsent += message.len() + 14;
        if let Message::Text(text) = &message
            && ws.get_mut().write_text(text.as_bytes())
        {
            // The cap tungstenite puts on its own buffer (the loop closes a slow reader sooner,
            // after the wake-up, at `[worker] max_outbound_bytes`).
            if self.unsent > ws.get_config().max_write_buffer_size {
                return Err(End::Close(CLOSE_SLOW_CONSUMER, "Socket outbound buffer overflowed".into()));
            }
            return Ok(());
        }
        Pin::new(ws).start_send(message).map_err(|e| match e {
            tungstenite::Error::WriteBufferFull(_) => {
                End::Close(CLOSE_SLOW_CONSUMER, "Socket outbound buffer overflowed".into())
            }
            _ => End::Gone(None),
        })
    }
}

/// Why the loop ended.
enum End {
    /// The client sent a close frame (with this code): tungstenite has queued the reply (1002
    /// for a code a close frame may not carry), which still has to be flushed.
    ClosedByClient(Option<u16>),
    /// The connection failed: nothing more to send.
    Gone(Option<u16>),
    /// We close, with this code and reason.
    Close(u16, Cow<'static, str>),
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context").field("settings", &self.settings).finish_non_exhaustive()
    }
}

impl Recipient for Subscriber {
    fn deliver(&self, message: &hub::Message<'_>) {
        let decision = message.json.map(|json| self.handler.publish_out(&self.socket, message.channel, json));
        let frame = match decision {
            None | Some(PublishOut::Allow) => message.frame.clone(),
            Some(PublishOut::Block) => return,
            Some(PublishOut::Rewrite(value)) => {
                Utf8Bytes::from(protocol::encode_publish(message.channel, value.to_string().as_bytes()))
            }
        };
        if message.direct {
            self.socket.push_direct(frame);
        } else {
            self.socket.push_item(Outbound::Frame(frame));
        }
    }

    fn member(&self, user_field: &str) -> Option<crate::presence::PresenceMember> {
        let user =
            self.socket.auth_token().and_then(|payload| crate::presence::user_of(&payload, user_field));
        Some(crate::presence::PresenceMember { id: self.socket.id().to_owned(), user })
    }
}

impl Settings {
    /// The settings from `[worker]`.
    pub(crate) fn from_config(config: &sc_common::config::WorkerConfig) -> Self {
        Self {
            protocol: config.protocol_version,
            ping_timeout: config.ping_timeout,
            socket_channel_limit: config.socket_channel_limit,
            // One whole message always fits.
            max_outbound_bytes: usize::try_from(config.max_outbound_bytes.max(config.max_payload))
                .unwrap_or(usize::MAX),
            max_channel_name: usize::try_from(config.max_channel_name).unwrap_or(usize::MAX),
            allow_client_publish: config.allow_client_publish,
        }
    }
}

/// Runs one socket until it closes.
///
/// A function returning an `async move` block, not an `async fn`: an async fn's future holds
/// each argument twice (as captured and as bound), and the WebSocket is 320 bytes of every idle
/// socket.
#[allow(clippy::manual_async_fn)]
pub(crate) fn run<S>(
    mut ws: WebSocketStream<S>,
    context: Arc<Context>,
    peer: Peer,
    pending: Option<Pending>,
    direct: Option<crate::direct::Direct>,
) -> impl Future<Output = ()>
where
    S: AsyncRead + AsyncWrite + ReadReady + Unpin,
{
    async move {
        let _open = crate::metrics::get().socket_opened(peer.tls);
        // Auto mode: unknown until the first pong.
        let version = match context.settings.protocol {
            ProtocolVersion::Auto => None,
            ProtocolVersion::V1 => Some(Protocol::V1),
            ProtocolVersion::V2 => Some(Protocol::V2),
        };
        let socket = Socket::new(
            context.services.clone(),
            context.hub.next_key(),
            &new_socket_id(),
            peer,
            version,
            direct,
        );
        context.timers.add(&socket);
        let mut conversation = Conversation {
            socket: socket.clone(),
            context: context.clone(),
            handshaken: false,
            subscriptions: None,
            recipient: None,
            replies: Vec::new(),
            pending: pending.map(Box::new),
        };
        tracing::debug!(id = %socket.id(), addr = ?peer.addr, tls = peer.tls, "socket open");
        let Err(end) = conversation.serve(&mut ws).await;
        // Boxed: the close runs once, at the end; every idle socket's task would hold its size.
        Box::pin(finish(conversation, ws, end)).await;
    }
}

/// Closes a socket whose loop ended: the close frame (and a v1 `#disconnect`) for a close of
/// ours, then the app's hooks.
async fn finish<S>(mut conversation: Conversation, mut ws: WebSocketStream<S>, end: End)
where
    S: AsyncRead + AsyncWrite + ReadReady + Unpin,
{
    let (context, socket) = (conversation.context.clone(), conversation.socket.clone());
    conversation.leave_all();
    socket.fail_pending();
    let code = match end {
        End::Gone(code) => code,
        End::ClosedByClient(code) => {
            let _ = tokio::time::timeout(Duration::from_secs(1), ws.flush()).await;
            code
        }
        End::Close(code, reason) => {
            tracing::debug!(id = %socket.id(), code, %reason, "closing socket");
            if code == CLOSE_SLOW_CONSUMER {
                crate::metrics::get().slow_consumer_close();
            }
            // v1 clients read the reason from a #disconnect event before the close; the v14
            // client closes itself with that code, so only codes a close frame may carry.
            let sendable = !matches!(code, 1004..=1006 | 1015);
            let v1_disconnect = (!socket.speaks(Protocol::V2) && sendable)
                .then(|| Message::Text(protocol::encode_disconnect(code, &reason).into()));
            // 1005 may not travel in a frame (RFC 6455 7.4.1): it is an empty close frame.
            let frame = sendable
                .then(|| CloseFrame { code: CloseCode::from(code), reason: truncate_reason(&reason).into() });
            // A peer that stalls (a slow consumer, for one) must not hold the task: the whole
            // close gets a bounded time.
            let close = async {
                if let Some(disconnect) = v1_disconnect {
                    ws.feed(disconnect).await?;
                }
                ws.close(frame).await
            };
            let closed = tokio::time::timeout(CLOSE_TIMEOUT, close).await;
            if matches!(closed, Ok(Ok(()))) {
                linger(ws.get_mut()).await;
            }
            Some(code)
        }
    };
    if conversation.handshaken {
        context.services.sockets.remove(&socket);
    }
    if conversation.handshaken && context.services.events {
        let channels = conversation.subscriptions.take().map(|set| *set).unwrap_or_default();
        closed(&context, &socket, channels, code).await;
    }
    tracing::debug!(id = %socket.id(), "socket closed");
}

/// The app's hooks for a closed socket: `unsubscribed` for each channel it held, then
/// `disconnected`.
async fn closed(context: &Context, socket: &Socket, channels: HashSet<Arc<str>>, code: Option<u16>) {
    for channel in channels {
        context.handler.unsubscribed(socket, &channel).await;
    }
    context.handler.disconnected(socket, code).await;
}

impl Conversation {
    /// The socket's loop. One `poll_fn` waits on everything at once (the outbox, which also
    /// brings the timers' and the drain's signals, the client's frames, write progress), so a
    /// wake-up costs what happened, not a re-poll of every source. Writes never block the
    /// loop: frames go into the WebSocket's write buffer, and flushing it is one more thing to
    /// wait on; a client that stops reading is closed (4100) once `[worker] max_outbound_bytes`
    /// are unsent, and the pong timeout (4001) fires even while a write is pending.
    async fn serve<S>(&mut self, ws: &mut WebSocketStream<S>) -> Result<std::convert::Infallible, End>
    where
        S: AsyncRead + AsyncWrite + ReadReady + Unpin,
    {
        let context = self.context.clone();
        let settings = &context.settings;
        let socket = self.socket.clone();
        let start = Instant::now();
        let mut last_seen = start;
        let mut queued = VecDeque::new();
        let mut output = Output::default();
        // A read may bring in several frames; only the first is returned, and tokio forgets the
        // readiness after a short read, so after each frame (and at the start, when the HTTP
        // side may have read past the upgrade) the WebSocket is polled once more regardless.
        let mut maybe_buffered = true;

        loop {
            let handshaken = self.handshaken;
            let reading = socket.invokes_in_flight() < MAX_INVOKES_IN_FLIGHT;
            // Nothing unwritten: frames for this socket may go out directly until it wakes.
            if output.unsent == 0 {
                socket.outbox().release();
            }
            let wake = std::future::poll_fn(|cx| {
                if output.unsent > 0
                    && let Poll::Ready(flushed) = Pin::new(&mut *ws).poll_flush(cx)
                {
                    return Poll::Ready(Wake::Flushed(flushed));
                }
                if socket.outbox().poll_ready(cx).is_ready() {
                    return Poll::Ready(Wake::Outbox);
                }
                // Flow control: with too many of its invokes unanswered, the client is not read
                // until some are (an answer wakes the loop through the outbox). The WebSocket
                // is read only when the kernel says there is something to read or the last
                // poll returned a frame (more may be buffered): a wake-up for the outbox costs
                // no read attempt.
                if reading && (maybe_buffered || ws.get_ref().poll_read_ready(cx).is_ready()) {
                    // A read may write (tungstenite answers a ping or a close at once).
                    socket.outbox().claim();
                    match ws.poll_next_unpin(cx) {
                        Poll::Ready(frame) => {
                            maybe_buffered = true;
                            return Poll::Ready(Wake::Frame(frame));
                        }
                        Poll::Pending => maybe_buffered = false,
                    }
                }
                Poll::Pending
            })
            .await;
            socket.outbox().claim();

            match wake {
                Wake::Flushed(Ok(())) => output.unsent = 0,
                Wake::Flushed(Err(_)) => return Err(End::Gone(None)),
                Wake::Outbox => {
                    let Ok(due) = socket.outbox().take(&mut queued) else {
                        return Err(End::Close(
                            CLOSE_SLOW_CONSUMER,
                            "Socket outbound queue overflowed".into(),
                        ));
                    };
                    if due.has(Due::SHUTDOWN) {
                        return Err(End::Close(CLOSE_SHUTDOWN, "Worker is shutting down".into()));
                    }
                    if due.has(Due::HANDSHAKE) && !self.handshaken {
                        return Err(End::Close(
                            CLOSE_HANDSHAKE_TIMEOUT,
                            "Did not receive #handshake from client before timeout".into(),
                        ));
                    }
                    if due.has(Due::PING) {
                        if last_seen.elapsed() > settings.ping_timeout {
                            return Err(End::Close(CLOSE_PONG_TIMEOUT, "Client pong timed out".into()));
                        }
                        // Both styles until the first pong tells the protocol (auto mode).
                        let (v1, v2) = (socket.speaks(Protocol::V1), socket.speaks(Protocol::V2));
                        for (ping, wanted) in [(protocol::PING_V1, !v2), (protocol::PING_V2, !v1)] {
                            if wanted {
                                output.send(ws, Message::Text(Utf8Bytes::from_static(ping)))?;
                            }
                        }
                    }
                    while let Some(item) = queued.pop_front() {
                        let frame = match item {
                            Outbound::Frame(frame) => frame,
                            Outbound::KickOut { channel, message } => {
                                if !self.leave(&channel) {
                                    continue;
                                }
                                socket.event(Event::Unsubscribed(channel.as_str().into()));
                                protocol::encode_kick_out(&channel, &message).into()
                            }
                            Outbound::Close { code, reason } => return Err(End::Close(code, reason.into())),
                            Outbound::Event(event) => {
                                // Boxed: held only while a hook runs, not by every idle socket.
                                Box::pin(self.event(event)).await;
                                continue;
                            }
                            Outbound::Rest(rest) => {
                                output.unsent += rest.len();
                                ws.get_mut().write_first(rest);
                                continue;
                            }
                        };
                        output.send(ws, Message::Text(frame))?;
                    }
                }
                Wake::Frame(frame) => {
                    let text = match frame {
                        None => return Err(End::Gone(None)),
                        Some(Err(tungstenite::Error::Capacity(e))) => {
                            tracing::debug!(id = %socket.id(), error = %e, "message too big");
                            return Err(End::Close(CLOSE_TOO_BIG, "Message too big".into()));
                        }
                        Some(Err(e)) => {
                            tracing::debug!(id = %socket.id(), error = %e, "socket read failed");
                            return Err(violation(&e).unwrap_or(End::Gone(None)));
                        }
                        Some(Ok(Message::Text(text))) => text,
                        // The stock server decodes binary frames as text too.
                        Some(Ok(Message::Binary(bytes))) => match Utf8Bytes::try_from(bytes) {
                            Ok(text) => text,
                            Err(_) => continue,
                        },
                        Some(Ok(Message::Close(frame))) => {
                            return Err(End::ClosedByClient(frame.map(|f| u16::from(f.code))));
                        }
                        // WebSocket-level ping/pong: tungstenite queued the answer.
                        Some(Ok(_)) => {
                            output.unsent += 1;
                            continue;
                        }
                    };
                    last_seen = Instant::now();
                    crate::metrics::get().received(text.len());
                    // Boxed: the handling future is large and lives only while a frame is
                    // handled, not in every idle socket.
                    Box::pin(self.handle_text(&text)).await?;
                    if !handshaken && self.handshaken {
                        crate::metrics::get().handshake(start.elapsed().as_secs_f64());
                    }
                }
            }
            // Taken, not drained: an idle socket keeps no reply buffer.
            if !self.replies.is_empty() {
                for reply in std::mem::take(&mut self.replies) {
                    output.send(ws, Message::Text(reply.into()))?;
                }
            }
            if output.unsent > settings.max_outbound_bytes {
                return Err(End::Close(CLOSE_SLOW_CONSUMER, "Socket outbound buffer overflowed".into()));
            }
        }
    }

    async fn handle_text(&mut self, text: &str) -> Result<(), End> {
        match protocol::decode(text) {
            Inbound::Pong(version) => {
                self.socket.lock_version(version);
                self.check_expiry();
                Ok(())
            }
            Inbound::Packet(packet) => self.handle_packet(packet).await,
            // Protocol v1 (server v14) refuses a batch as the first frame; v2 takes one that
            // starts with the handshake.
            Inbound::Batch(_) if !self.handshaken && self.socket.speaks(Protocol::V1) => {
                Err(before_handshake())
            }
            Inbound::Batch(packets) => {
                for packet in packets {
                    self.handle_packet(packet).await?;
                }
                Ok(())
            }
            Inbound::Raw if !self.handshaken => Err(before_handshake()),
            Inbound::Raw => {
                self.context.handler.raw(&self.socket, text);
                Ok(())
            }
        }
    }

    /// Protocol v2 (and auto, whose v20 clients always send numbers) only take numeric cids as
    /// RPCs; v1 takes any.
    fn strict(&self) -> bool {
        !self.socket.speaks(Protocol::V1)
    }

    async fn handle_packet(&mut self, packet: Packet<'_>) -> Result<(), End> {
        let cid = packet.rpc_cid(self.strict());
        let event = packet.event.as_deref();
        if !self.handshaken {
            return match event {
                Some("#handshake") => self.handshake(packet.data, cid).await,
                _ => Err(before_handshake()),
            };
        }
        let expired = self.check_expiry();
        let Some(event) = event else {
            // A response to a server-to-client invoke.
            if let Some(rid) = packet.rid.and_then(|r| r.get().parse::<u64>().ok()) {
                let answer = match packet.error {
                    Some(error) => Err(error_from_client(error)),
                    None => Ok(packet
                        .data
                        .and_then(|d| serde_json::from_str(d.get()).ok())
                        .unwrap_or(Value::Null)),
                };
                self.socket.answer(rid, answer);
            }
            return Ok(());
        };
        match event {
            "#handshake" => {
                if let Some(cid) = cid {
                    let reply = self.handshake_reply(cid, None);
                    self.replies.push(reply);
                }
            }
            "#subscribe" => self.subscribe(packet.data, cid, expired).await,
            "#unsubscribe" => self.unsubscribe(packet.data, cid),
            "#publish" => self.publish(packet.data, cid).await,
            "#authenticate" => self.authenticate(packet.data, cid).await?,
            "#removeAuthToken" => {
                if self.socket.set_verified(None) {
                    self.socket.event(Event::Deauthenticated);
                }
            }
            // v1 clients announce their close; a v1 server closes with their code.
            "#disconnect" if !self.socket.speaks(Protocol::V2) => {
                let code = packet
                    .data
                    .and_then(|d| serde_json::from_str::<Value>(d.get()).ok())
                    .and_then(|d| d.get("code").and_then(Value::as_u64))
                    .and_then(|c| u16::try_from(c).ok())
                    .filter(|c| (1000..5000).contains(c) && *c != 1005 && *c != 1006)
                    .unwrap_or(1000);
                return Err(End::Close(code, "".into()));
            }
            name => self.custom_event(name, packet.data, cid),
        }
        Ok(())
    }

    async fn handshake(&mut self, data: Option<&RawValue>, cid: Option<&RawValue>) -> Result<(), End> {
        let Some(cid) = cid else {
            // Server v14 opened the socket without answering; v18.1+ closes 4008.
            if self.socket.speaks(Protocol::V1) {
                self.handshaken = true;
                self.pending = None;
                self.context.services.sockets.insert(&self.socket);
                self.socket.event(Event::Connected);
                return Ok(());
            }
            return Err(End::Close(CLOSE_BAD_HANDSHAKE, "Handshake request was malformatted".into()));
        };
        let token =
            data.and_then(|d| serde_json::from_str::<protocol::HandshakeData>(d.get()).ok()).and_then(|d| {
                d.auth_token.map(|t| serde_json::from_str::<Cow<'_, str>>(t.get()).map_err(|_| ()))
            });
        let auth_error = match token {
            None => None,
            Some(Err(())) => Some(
                ErrorObject::new("AuthTokenInvalidError", "jwt must be a string")
                    .with("isBadToken", Value::Bool(true)),
            ),
            Some(Ok(signed)) => self.verify(&signed).await.err(),
        };
        if let Err(error) = self.context.handler.handshake(&self.socket).await {
            let code = error
                .extra
                .get("statusCode")
                .and_then(Value::as_u64)
                .and_then(|c| u16::try_from(c).ok())
                .unwrap_or(CLOSE_BAD_HANDSHAKE);
            self.replies.push(protocol::encode_handshake_rejection(cid, &error, code));
            return Err(End::Close(code, error.message.into()));
        }
        self.handshaken = true;
        self.pending = None;
        self.context.services.sockets.insert(&self.socket);
        let reply = self.handshake_reply(cid, auth_error.as_ref());
        self.replies.push(reply);
        self.socket.event(Event::Connected);
        if self.socket.is_authenticated() {
            self.socket.event(Event::Authenticated);
        }
        if auth_error.as_ref().is_some_and(ErrorObject::is_bad_token) {
            self.replies.push(protocol::encode_remove_auth_token(self.socket.speaks(Protocol::V2)));
        }
        Ok(())
    }

    /// The handshake reply for the socket's current auth state.
    fn handshake_reply(&self, cid: &RawValue, auth_error: Option<&ErrorObject>) -> String {
        let timeout = self.context.settings.ping_timeout.as_millis() as u64;
        protocol::encode_handshake(cid, self.socket.id(), timeout, self.socket.is_authenticated(), auth_error)
    }

    /// Verifies a token and runs the app's authenticate hook; on success the socket is
    /// authenticated, on failure it is not (whatever it was before).
    async fn verify(&mut self, signed: &str) -> Result<(), ErrorObject> {
        let outcome = match self.context.services.auth.verify(signed) {
            Ok(token) => match self.context.handler.authenticate(&self.socket, &token.payload).await {
                Ok(()) => Ok(token),
                Err(error) => Err(error),
            },
            Err(error) => Err(error),
        };
        match outcome {
            Ok(token) => {
                self.socket.set_verified(Some(token));
                Ok(())
            }
            Err(error) => {
                if self.socket.set_verified(None) && self.handshaken {
                    self.socket.event(Event::Deauthenticated);
                }
                Err(error)
            }
        }
    }

    async fn authenticate(&mut self, data: Option<&RawValue>, cid: Option<&RawValue>) -> Result<(), End> {
        let Some(cid) = cid else {
            if self.socket.speaks(Protocol::V1) {
                return Ok(());
            }
            return Err(End::Close(CLOSE_BAD_HANDSHAKE, "Authenticate request was malformatted".into()));
        };
        let signed = data.and_then(|d| serde_json::from_str::<Cow<'_, str>>(d.get()).ok());
        let outcome = match signed {
            Some(signed) => self.verify(&signed).await,
            None => {
                if self.socket.set_verified(None) {
                    self.socket.event(Event::Deauthenticated);
                }
                Err(ErrorObject::new("AuthTokenInvalidError", "jwt must be provided")
                    .with("isBadToken", Value::Bool(true)))
            }
        };
        match outcome {
            Ok(()) => {
                self.replies.push(protocol::encode_auth_ok(cid));
                self.socket.event(Event::Authenticated);
            }
            Err(error) => {
                let bad = error.is_bad_token();
                let v1 = self.socket.speaks(Protocol::V1);
                let remove = protocol::encode_remove_auth_token(!v1);
                // v14 sent #removeAuthToken before the response, v20 after.
                if bad && v1 {
                    self.replies.push(remove.clone());
                }
                self.replies.push(protocol::encode_auth_failure(cid, &error, bad));
                if bad && !v1 {
                    self.replies.push(remove);
                }
            }
        }
        Ok(())
    }

    /// Drops an expired token (telling the client); returns the expiry error if it did.
    fn check_expiry(&mut self) -> Option<ErrorObject> {
        let exp = self.socket.expire_token()?;
        self.replies.push(protocol::encode_remove_auth_token(self.socket.speaks(Protocol::V2)));
        self.socket.event(Event::Deauthenticated);
        Some(auth::expired_error(exp))
    }

    async fn subscribe(
        &mut self,
        data: Option<&RawValue>,
        cid: Option<&RawValue>,
        expired: Option<ErrorObject>,
    ) {
        // v20 ignores a #subscribe without a cid; v14 subscribes anyway.
        if cid.is_none() && self.socket.speaks(Protocol::V2) {
            return;
        }
        let reply = |replies: &mut Vec<String>, error: Option<ErrorObject>| {
            if let Some(cid) = cid {
                replies.push(match error {
                    None => protocol::encode_ack(cid),
                    Some(error) => protocol::encode_error(cid, &error),
                });
            }
        };
        let lenient = !self.socket.speaks(Protocol::V2);
        let parsed = data.and_then(|d| match serde_json::from_str::<protocol::SubscribeData>(d.get()) {
            Ok(request) => Some((request.channel, request.wait_for_auth, request.data)),
            // v14 also took the bare channel name.
            Err(_) if lenient => serde_json::from_str::<Cow<'_, str>>(d.get()).ok().map(|c| (c, false, None)),
            Err(_) => None,
        });
        let Some((channel, wait_for_auth, sub_data)) = parsed else {
            let error = ErrorObject::new("InvalidActionError", "Subscribe channel name was malformatted");
            reply(&mut self.replies, Some(error));
            return;
        };
        if let (true, Some(error)) = (wait_for_auth, expired) {
            reply(&mut self.replies, Some(error));
            return;
        }
        if let Some(error) = self.channel_too_long(&channel) {
            reply(&mut self.replies, Some(error));
            return;
        }
        // Presence events reveal who is where: the app forwards what it wants (docs/presence.md).
        if crate::presence::is_event_channel(&channel) {
            let message = format!(
                "Failed to subscribe socket to the {channel} channel - it is reserved for server code"
            );
            reply(&mut self.replies, Some(ErrorObject::new("InvalidActionError", message)));
            return;
        }
        let held = self.subscriptions.get_or_insert_with(Box::default);
        if held.contains(&*channel) {
            reply(&mut self.replies, None);
            return;
        }
        let limit = self.context.settings.socket_channel_limit;
        if held.len() >= limit {
            let message = format!(
                "Failed to subscribe socket to the {channel} channel - InvalidActionError: Socket {} tried to exceed the channel subscription limit of {limit}",
                self.socket.id()
            );
            reply(&mut self.replies, Some(ErrorObject::new("BrokerError", message)));
            return;
        }
        if let Err(error) = self.context.handler.subscribe(&self.socket, &channel, sub_data).await {
            reply(&mut self.replies, Some(error));
            return;
        }
        let recipient = self.recipient.get_or_insert_with(|| {
            Arc::new(Subscriber { socket: self.socket.clone(), handler: self.context.handler.clone() })
        });
        let (name, confirmed) = self.context.hub.subscribe(&channel, self.socket.key(), recipient);
        self.subscriptions.get_or_insert_with(Box::default).insert(name.clone());
        // Acknowledge once the owner broker has the subscription, so that every publish after
        // the ack reaches this client (as with the single-process stock server). Without a
        // broker for now, the subscription stands and is made when one links.
        if let Some(mut confirmed) = confirmed
            && !*confirmed.borrow()
        {
            let wait = confirmed.wait_for(|done| *done);
            if tokio::time::timeout(LINK_WAIT, wait).await.is_err() {
                tracing::debug!(id = %self.socket.id(), %channel, "subscription not confirmed by a broker yet");
            }
        }
        reply(&mut self.replies, None);
        self.socket.event(Event::Subscribed(name));
    }

    fn unsubscribe(&mut self, data: Option<&RawValue>, cid: Option<&RawValue>) {
        let channel = data.and_then(|d| serde_json::from_str::<Cow<'_, str>>(d.get()).ok());
        let removed = channel.as_deref().is_some_and(|channel| self.leave(channel));
        if let (true, Some(channel)) = (removed, channel.as_deref()) {
            self.socket.event(Event::Unsubscribed(channel.into()));
        }
        if let Some(cid) = cid {
            if removed {
                self.replies.push(protocol::encode_ack(cid));
            } else {
                let name = channel.as_deref().unwrap_or("");
                let message = format!(
                    "Failed to unsubscribe socket from the {name} channel - InvalidActionError: Socket {} tried to unsubscribe from a channel which it is not subscribed to",
                    self.socket.id()
                );
                self.replies.push(protocol::encode_error(cid, &ErrorObject::new("BrokerError", message)));
            }
        }
    }

    async fn publish(&mut self, data: Option<&RawValue>, cid: Option<&RawValue>) {
        let fail = |replies: &mut Vec<String>, error: ErrorObject| {
            if let Some(cid) = cid {
                replies.push(protocol::encode_error(cid, &error));
            }
        };
        if !self.context.settings.allow_client_publish {
            fail(
                &mut self.replies,
                ErrorObject::new("InvalidActionError", "Client publish feature is disabled"),
            );
            return;
        }
        let parsed = data.and_then(|d| serde_json::from_str::<protocol::PublishData>(d.get()).ok());
        let Some(request) = parsed else {
            fail(
                &mut self.replies,
                ErrorObject::new("InvalidActionError", "Publish channel name was malformatted"),
            );
            return;
        };
        if let Some(error) = self.channel_too_long(&request.channel) {
            fail(&mut self.replies, error);
            return;
        }
        let null = RawValue::NULL;
        let raw = request.data.unwrap_or(null);
        let payload = match self.context.handler.publish_in(&self.socket, &request.channel, raw).await {
            Err(error) => {
                fail(&mut self.replies, error);
                return;
            }
            Ok(PublishIn::Allow) => match request.data {
                Some(data) => Bytes::copy_from_slice(data.get().as_bytes()),
                None => Bytes::new(),
            },
            Ok(PublishIn::Rewrite(value)) => Bytes::from(value.to_string()),
        };
        // The ack means the channel's broker has the message: it is sent when the broker
        // confirms, or an error if the link to it fails first (docs/architecture.md).
        let receipt = cid.map(|cid| {
            let socket = self.socket.clone();
            let cid: Box<RawValue> = cid.to_owned();
            let channel = request.channel.to_string();
            Box::new(move |outcome: Result<(), crate::error::Error>| {
                socket.push_frame(match outcome {
                    Ok(()) => protocol::encode_ack(&cid),
                    Err(e) => protocol::encode_error(&cid, &publish_failed(&channel, &e)),
                });
            }) as Receipt
        });
        if let Err(e) = self.context.pool.publish(&request.channel, payload, receipt).await {
            fail(&mut self.replies, publish_failed(&request.channel, &e));
        }
    }

    /// The error for a channel name longer than `[worker] max_channel_name`, if it is.
    fn channel_too_long(&self, channel: &str) -> Option<ErrorObject> {
        let limit = self.context.settings.max_channel_name;
        (channel.len() > limit).then(|| {
            ErrorObject::new(
                "InvalidActionError",
                format!("Channel name is {} bytes long, more than the limit of {limit} bytes", channel.len()),
            )
        })
    }

    /// A custom event: an invoke (with a cid) or a transmit. Both run in their own task so that
    /// the app may take its time or talk back to this client.
    fn custom_event(&mut self, name: &str, data: Option<&RawValue>, cid: Option<&RawValue>) {
        let socket = self.socket.clone();
        let handler = self.context.handler.clone();
        let name = name.to_owned();
        let data: Option<Box<RawValue>> = data.map(ToOwned::to_owned);
        match cid {
            Some(cid) => {
                let cid: Box<RawValue> = cid.to_owned();
                let in_flight = socket.invoke_started();
                tokio::spawn(async move {
                    let frame = match handler.invoke(&socket, &name, data.as_deref()).await {
                        Ok(value) => protocol::encode_response(&cid, &value.to_string()),
                        Err(error) => protocol::encode_error(&cid, &error),
                    };
                    // Counted out before the answer wakes the socket's loop, which may then
                    // read the client again.
                    drop(in_flight);
                    socket.push_frame(frame);
                });
            }
            None => {
                tokio::spawn(async move { handler.transmit(&socket, &name, data.as_deref()).await });
            }
        }
    }

    /// Runs one of the app's event hooks (queued through the outbox, so in order).
    async fn event(&self, event: Event) {
        let (handler, socket) = (&self.context.handler, &self.socket);
        match event {
            Event::Connected => handler.connected(socket).await,
            Event::Authenticated => handler.authenticated(socket).await,
            Event::Deauthenticated => handler.deauthenticated(socket).await,
            Event::Subscribed(channel) => handler.subscribed(socket, &channel).await,
            Event::Unsubscribed(channel) => handler.unsubscribed(socket, &channel).await,
        }
    }

    /// Leaves a channel this socket holds; returns whether it held it.
    fn leave(&mut self, channel: &str) -> bool {
        if self.subscriptions.as_mut().is_some_and(|held| held.remove(channel)) {
            self.context.hub.unsubscribe(channel, self.socket.key());
            // The last one: the set is released.
            if self.subscriptions.as_ref().is_some_and(|held| held.is_empty()) {
                self.subscriptions = None;
            }
            true
        } else {
            false
        }
    }

    /// Leaves every channel at the hub (no more deliveries); the socket's list stays, for the
    /// `unsubscribed` hooks after the close. Leaving twice changes nothing.
    fn leave_all(&mut self) {
        for channel in self.subscriptions.iter().flat_map(|held| held.iter()) {
            self.context.hub.unsubscribe(channel, self.socket.key());
        }
    }
}

/// The close that RFC 6455 asks for when a client breaks the protocol (section 7.4.1: 1002 for
/// a protocol error, 1007 for a text message that is not UTF-8); `None` for a connection that
/// simply failed.
fn violation(error: &tungstenite::Error) -> Option<End> {
    use tungstenite::error::ProtocolError as P;
    match error {
        tungstenite::Error::Utf8(_) => {
            Some(End::Close(CLOSE_INVALID_DATA, "Invalid UTF-8 in a text message".into()))
        }
        tungstenite::Error::Protocol(
            P::NonZeroReservedBits
            | P::UnmaskedFrameFromClient
            | P::FragmentedControlFrame
            | P::ControlFrameTooBig
            | P::UnknownControlFrameType(_)
            | P::UnknownDataFrameType(_)
            | P::UnexpectedContinueFrame
            | P::ExpectedFragment(_)
            | P::InvalidOpcode(_)
            | P::InvalidCloseSequence,
        ) => Some(End::Close(CLOSE_PROTOCOL_ERROR, "WebSocket protocol error".into())),
        _ => None,
    }
}

/// The error a client gets for a publish the brokers did not take.
fn publish_failed(channel: &str, error: &crate::error::Error) -> ErrorObject {
    ErrorObject::new("BrokerError", format!("Failed to publish to the {channel} channel - {error}"))
}

fn before_handshake() -> End {
    End::Close(CLOSE_BEFORE_HANDSHAKE, "Server received a message before the client handshake".into())
}

/// An error object a client sent in a response; a non-object becomes the message.
fn error_from_client(raw: &RawValue) -> ErrorObject {
    match serde_json::from_str::<Value>(raw.get()) {
        Ok(Value::Object(mut map)) => {
            let name = map
                .remove("name")
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_else(|| "Error".into());
            let message =
                map.remove("message").and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default();
            ErrorObject { name, message, extra: map }
        }
        Ok(other) => ErrorObject::new("Error", other.to_string()),
        Err(_) => ErrorObject::new("Error", raw.get()),
    }
}

/// Reads and discards what the client still sends, until it closes (bounded in time and bytes).
/// Closing a socket with unread data makes the kernel send a reset, which can reach the client
/// before our close frame (it would see 1006 instead of our code): after a too-big message, for
/// one, the rest of that message is still on its way.
async fn linger<S: AsyncRead + Unpin>(stream: &mut S) {
    use tokio::io::AsyncReadExt;
    let drain = async {
        // On the heap: a buffer in the future would make every socket's task that much larger.
        let mut buffer = vec![0u8; 4096];
        let mut left: usize = 8 * 1024 * 1024;
        while left > 0 {
            match stream.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), drain).await;
}

/// A connection that can tell whether a read would find anything, without reading (which,
/// through tungstenite, means preparing its read buffer first).
pub(crate) trait ReadReady {
    /// Ready when a read may make progress: data, end of stream or an error. It says nothing of
    /// what a read already brought into the WebSocket's buffer (tokio forgets the readiness
    /// after a short read): the loop polls once more after each frame for that.
    fn poll_read_ready(&self, cx: &mut std::task::Context<'_>) -> Poll<std::io::Result<()>>;

    /// Queues bytes to go out before anything written after: the rest of a frame a direct
    /// write sent in part. Only a connection shared for direct writes gets any.
    fn write_first(&mut self, _bytes: Bytes) {
        debug_assert!(false, "a direct write's rest on a connection without direct writes");
    }

    /// Queues a text frame to go out with the next flush, in a buffer released once it is out
    /// (tungstenite's write buffer keeps its largest size); false if this connection has no
    /// such buffer (then the frame goes through tungstenite).
    fn write_text(&mut self, _payload: &[u8]) -> bool {
        false
    }
}

impl ReadReady for tokio::net::TcpStream {
    fn poll_read_ready(&self, cx: &mut std::task::Context<'_>) -> Poll<std::io::Result<()>> {
        tokio::net::TcpStream::poll_read_ready(self, cx)
    }
}

impl ReadReady for crate::direct::Shared {
    fn poll_read_ready(&self, cx: &mut std::task::Context<'_>) -> Poll<std::io::Result<()>> {
        self.tcp().poll_read_ready(cx)
    }

    fn write_first(&mut self, bytes: Bytes) {
        crate::direct::Shared::write_first(self, bytes);
    }

    fn write_text(&mut self, payload: &[u8]) -> bool {
        crate::direct::Shared::write_text(self, payload);
        true
    }
}

impl ReadReady for crate::tls::TlsStream {
    fn poll_read_ready(&self, cx: &mut std::task::Context<'_>) -> Poll<std::io::Result<()>> {
        crate::tls::TlsStream::poll_read_ready(self, cx)
    }

    fn write_first(&mut self, bytes: Bytes) {
        crate::tls::TlsStream::write_first(self, bytes);
    }
}

impl ReadReady for tokio::net::UnixStream {
    fn poll_read_ready(&self, cx: &mut std::task::Context<'_>) -> Poll<std::io::Result<()>> {
        tokio::net::UnixStream::poll_read_ready(self, cx)
    }
}

/// Connections whose readiness cannot be seen: always read.
impl<T> ReadReady for hyper_util::rt::TokioIo<T> {
    fn poll_read_ready(&self, _: &mut std::task::Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl ReadReady for tokio::io::DuplexStream {
    fn poll_read_ready(&self, _: &mut std::task::Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Close reasons travel in a control frame: at most 123 bytes.
fn truncate_reason(reason: &str) -> String {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    reason[..end].to_owned()
}

/// A socket id like the stock server's: 15 random bytes, URL-safe base64 (20 characters).
fn new_socket_id() -> String {
    let bytes: [u8; 15] = rand::random();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// What an idle socket's task holds is mostly this future (plus the WebSocket's buffers,
    /// allocated apart). It grows when a large future is held across the loop; keep it inside
    /// the budget (box what only runs sometimes, as `handle_text` is).
    /// A socket context with no broker and the default settings, for tests.
    pub(crate) fn context() -> Arc<Context> {
        let connector = crate::broker_link::Grpc::new("w".into(), "s".into(), 4 << 20);
        let pool = Arc::new(BrokerPool::new(Arc::new(connector), 4 << 20));
        let hub = Arc::new(Hub::new(pool.clone()));
        let auth = auth::AuthEngine::new("HS256", "key", None, None, Duration::from_secs(60)).unwrap();
        let services = Services {
            auth,
            ack_timeout: Duration::from_secs(1),
            exchange: crate::exchange::Exchange::new(hub.clone(), pool.clone()),
            sockets: crate::handle::Sockets::default(),
            events: false,
            outbound_queue: 1024,
        };
        let config = sc_common::config::WorkerConfig::default();
        Arc::new(Context {
            hub,
            pool,
            handler: Arc::new(crate::app::DefaultHandler),
            services: Arc::new(services),
            settings: Settings::from_config(&config),
            tasks: tokio_util::task::TaskTracker::new(),
            timers: crate::timers::Timers::new(config.ping_interval, config.handshake_timeout),
        })
    }

    /// What an idle socket's task holds is mostly this future (plus the WebSocket's buffers,
    /// allocated apart). It grows when a large future is held across the loop; keep it inside
    /// the budget (box what only runs sometimes, as `handle_text` is).
    #[tokio::test]
    async fn an_idle_sockets_task_stays_inside_its_memory_budget() {
        const BUDGET: usize = 960;
        let context = context();
        let (server, _client) = tokio::io::duplex(64);
        let ws = WebSocketStream::from_raw_socket(
            server,
            tokio_tungstenite::tungstenite::protocol::Role::Server,
            None,
        )
        .await;
        let task = run(ws, context, Peer { addr: None, tls: false }, None, None);
        let size = std::mem::size_of_val(&task);
        eprintln!("socket task future: {size} bytes (budget {BUDGET})");
        assert!(size <= BUDGET, "the socket task future is {size} bytes, over its budget of {BUDGET}");
    }

    #[test]
    fn socket_ids_look_like_the_stock_ones() {
        let id = new_socket_id();
        assert_eq!(id.len(), 20);
        assert!(id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'));
        assert_ne!(id, new_socket_id());
    }

    #[test]
    fn reasons_fit_a_close_frame() {
        assert_eq!(truncate_reason("short"), "short");
        let long = "é".repeat(100);
        let cut = truncate_reason(&long);
        assert!(cut.len() <= 123 && long.starts_with(&cut));
    }

    #[test]
    fn client_errors_keep_their_fields() {
        let raw = RawValue::from_string(r#"{"name":"E","message":"m","extra":1}"#.into()).unwrap();
        let error = error_from_client(&raw);
        assert_eq!((error.name.as_str(), error.message.as_str()), ("E", "m"));
        assert_eq!(error.extra["extra"], 1);
    }
}
