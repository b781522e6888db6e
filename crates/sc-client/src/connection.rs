//! One connection: opening it ([`open`]: TCP, WebSocket upgrade, `#handshake`) and the task that
//! owns the socket afterwards ([`run`]).
//!
//! The task reads and writes concurrently (two futures in one task over the split stream), so a
//! long write never delays answering a ping and a slow read never delays the writes. Writes
//! come from every [`crate::Client`] handle through one bounded queue; the writer takes
//! whatever is queued, feeds it into tungstenite's write buffer and flushes once, so a burst of
//! frames costs one `write` syscall, not one per frame. Replies are matched to pending invokes
//! through [`Shared`]; everything else goes to [`crate::Events`].

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use serde_json::Value;
use serde_json::value::RawValue;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{Instant, timeout, timeout_at};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tracing::{debug, trace};

use crate::client::{Handshake, Responder};
use crate::codec::{self, Decoded, Frame};
use crate::transport::Transport;
use crate::{ClientConfig, CloseInfo, Error, Event, ProtocolVersion};

/// The socket type: TCP, or TLS over TCP for `wss://`.
pub(crate) type Ws = WebSocketStream<Transport>;

/// The `#handshake` is always our first call.
pub(crate) const HANDSHAKE_CID: u64 = 1;

/// Frames queued for the writer. Big enough that a burst of publishes from a bench task does
/// not wait for the writer frame by frame; a full queue makes callers wait (back-pressure).
pub(crate) const OUTBOUND_QUEUE: usize = 1024;

/// How many queued frames one flush may carry: bounds the write buffer at a few hundred
/// frames while still amortising the syscall.
const WRITE_BATCH: usize = 256;

/// State shared by the client handles and the connection task.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) protocol: ProtocolVersion,
    pub(crate) ack_timeout: Duration,
    pub(crate) handshake: Handshake,
    /// The next cid; the handshake took 1. Atomic so that any handle can call without a lock.
    pub(crate) next_cid: AtomicU64,
    /// std Mutex: held for a map insert or remove or a token swap, never across an await.
    pub(crate) state: Mutex<State>,
    /// Set once by the task when the connection has ended; [`crate::Client::closed`] waits on it.
    pub(crate) closed: watch::Sender<Option<CloseInfo>>,
}

/// The mutable part of [`Shared`].
#[derive(Debug, Default)]
pub(crate) struct State {
    /// Invokes waiting for their reply, by cid.
    pub(crate) pending: HashMap<u64, oneshot::Sender<Reply>>,
    pub(crate) auth_token: Option<String>,
    /// The close frame we sent, if we started the close: reported when the server then drops
    /// the connection without answering it.
    pub(crate) closing: Option<CloseInfo>,
    /// Set (under this lock, together with draining `pending`) when the connection ended, so
    /// that no invoke can register after the drain and wait for nothing.
    pub(crate) close: Option<CloseInfo>,
}

/// What a pending invoke receives.
#[derive(Debug)]
pub(crate) enum Reply {
    Data(Option<Box<RawValue>>),
    Error(Box<RawValue>),
    Closed(CloseInfo),
}

/// A request to the writer.
#[derive(Debug)]
pub(crate) enum Outbound {
    Frame(Utf8Bytes),
    /// Send a close frame and wait (bounded) for the server's.
    Close {
        code: u16,
        reason: String,
    },
}

/// The settings the task needs from [`ClientConfig`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct TaskConfig {
    /// `None` when the ping timeout check is disabled.
    pub(crate) ping_timeout: Option<Duration>,
    pub(crate) close_timeout: Duration,
}

/// Why the read or write side stopped.
#[derive(Debug)]
enum End {
    /// The server's close frame arrived.
    Remote(CloseInfo),
    /// We close with `code`; `sent` when the close frame is already out.
    Local { code: u16, reason: String, sent: bool },
    /// The connection broke without a close handshake.
    Broken(String),
}

/// The read side of the task.
struct Reader {
    shared: Arc<Shared>,
    protocol: ProtocolVersion,
    /// Weak, so that the connection closes when every client handle is gone.
    outbound: mpsc::WeakSender<Outbound>,
    events: mpsc::Sender<Event>,
    ping_timeout: Option<Duration>,
}

#[derive(Serialize)]
struct HandshakeData<'a> {
    #[serde(rename = "authToken")]
    auth_token: Option<&'a str>,
}

impl Shared {
    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        // Every critical section leaves the state consistent, so a poisoned lock is usable.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The error for a call on a closed connection.
    pub(crate) fn closed_error(&self) -> Error {
        Error::Closed(
            self.lock()
                .close
                .clone()
                .unwrap_or_else(|| CloseInfo { code: None, reason: "connection task ended".into() }),
        )
    }
}

/// TCP (from `local_addr`), WebSocket upgrade and `#handshake`. Returns the socket, any frames
/// that arrived before the handshake reply (to be handled first), and the reply.
pub(crate) async fn open(config: &ClientConfig) -> Result<(Ws, Vec<String>, Handshake), Error> {
    let invalid = |reason: &str| Error::InvalidUrl { url: config.url.clone(), reason: reason.to_owned() };
    let request = config.url.as_str().into_client_request().map_err(|e| invalid(&e.to_string()))?;
    let uri = request.uri();
    let tls = match uri.scheme_str() {
        Some("ws") => None,
        Some("wss") => match &config.tls {
            Some(tls) => Some(Arc::clone(tls)),
            None => return Err(Error::UnsupportedScheme("wss (no tls configuration)".to_owned())),
        },
        Some(other) => return Err(Error::UnsupportedScheme(other.to_owned())),
        None => return Err(invalid("no scheme")),
    };
    let host = uri
        .host()
        .ok_or_else(|| invalid("no host"))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = uri.port_u16().unwrap_or(if tls.is_some() { 443 } else { 80 });
    let ws = timeout(config.connect_timeout, async {
        let tcp = tcp_connect(&host, port, config.local_addr).await?;
        let transport = match tls {
            None => Transport::Plain(tcp),
            Some(tls) => Transport::tls(tls, &host, tcp).await?,
        };
        let (ws, _response) = tokio_tungstenite::client_async_with_config(request, transport, None).await?;
        Ok::<_, Error>(ws)
    })
    .await
    .map_err(|_| Error::ConnectTimeout(config.connect_timeout))??;
    handshake(ws, config).await
}

/// Connects to the first address of `host` in the family of `local` (if given), bound to it.
async fn tcp_connect(host: &str, port: u16, local: Option<IpAddr>) -> Result<TcpStream, Error> {
    let mut last_error = None;
    for addr in tokio::net::lookup_host((host, port)).await? {
        if local.is_some_and(|l| l.is_ipv4() != addr.is_ipv4()) {
            continue;
        }
        let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
        if let Some(local) = local {
            socket.bind(SocketAddr::new(local, 0))?;
        }
        match socket.connect(addr).await {
            Ok(stream) => {
                // Frames are small and latency matters more than packet count; batching
                // happens in the writer instead.
                stream.set_nodelay(true)?;
                return Ok(stream);
            }
            Err(e) => last_error = Some(e),
        }
    }
    Err(last_error
        .unwrap_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::AddrNotAvailable,
                format!("no address for {host}:{port} in the family of the local address"),
            )
        })
        .into())
}

/// Sends `#handshake` and waits for its reply within the ack timeout, answering pings.
async fn handshake(mut ws: Ws, config: &ClientConfig) -> Result<(Ws, Vec<String>, Handshake), Error> {
    let protocol = config.protocol;
    let frame = codec::encode_emit(
        "#handshake",
        Some(&HandshakeData { auth_token: config.auth_token.as_deref() }),
        Some(HANDSHAKE_CID),
    )?;
    ws.send(Message::text(frame)).await?;
    let mut early = Vec::new();
    let outcome = timeout(config.ack_timeout, async {
        loop {
            let text = match ws.next().await {
                None => return Err(broken("closed during the handshake")),
                Some(Err(e)) => return Err(e.into()),
                Some(Ok(Message::Text(text))) => text,
                Some(Ok(Message::Binary(bytes))) => {
                    early.push(String::from_utf8_lossy(&bytes).into_owned());
                    continue;
                }
                Some(Ok(Message::Close(frame))) => {
                    return Err(Error::Closed(close_info(frame)));
                }
                Some(Ok(_)) => continue,
            };
            let reply = match codec::decode(text.as_str(), protocol) {
                Decoded::Ping => {
                    ws.send(Message::text(protocol.pong())).await?;
                    continue;
                }
                Decoded::Packet(packet) => handshake_reply(codec::classify(packet, protocol)),
                Decoded::Batch(items) => {
                    // A server batching on handshake may put the reply in an array; the other
                    // elements are handled after it, one by one.
                    let mut reply = None;
                    for item in items {
                        let frame = codec::decode_element(item).map(|p| codec::classify(p, protocol));
                        match frame.and_then(handshake_reply) {
                            Some(r) if reply.is_none() => reply = Some(r),
                            _ => early.push(item.get().to_owned()),
                        }
                    }
                    reply
                }
                Decoded::Raw => None,
            };
            match reply {
                Some(reply) => return Ok(reply),
                None => early.push(text.as_str().to_owned()),
            }
        }
    })
    .await;
    let (data, error) = match outcome {
        Ok(Ok(reply)) => reply,
        Ok(Err(e)) => return Err(e),
        Err(_) => {
            close_quietly(&mut ws, 4003, "Failed to complete handshake", config).await;
            return Err(Error::Timeout { event: "#handshake".into(), after: config.ack_timeout });
        }
    };
    if let Some(error) = error {
        // v2 servers put the close code in error.statusCode, v1 servers in data.code; the
        // stock clients fall back to 4003.
        let code = [error.get("statusCode"), data.as_ref().and_then(|d| d.get("code"))]
            .into_iter()
            .flatten()
            .find_map(|c| c.as_u64().and_then(|c| u16::try_from(c).ok()))
            .unwrap_or(4003);
        close_quietly(&mut ws, code, "", config).await;
        let Error::Remote { name, message, raw } = Error::remote(error) else {
            return Err(Error::Protocol("handshake error".into()));
        };
        return Err(Error::HandshakeRejected { code, name, message, raw });
    }
    let data = data.unwrap_or(Value::Null);
    let id = data
        .get("id")
        .and_then(Value::as_str)
        .ok_or_else(|| Error::Protocol(format!("handshake reply without an id: {data}")))?
        .to_owned();
    let handshake = Handshake {
        id,
        ping_timeout: Duration::from_millis(
            data.get("pingTimeout").and_then(Value::as_u64).unwrap_or(20_000),
        ),
        is_authenticated: data.get("isAuthenticated").and_then(Value::as_bool).unwrap_or(false),
        auth_error: data.get("authError").filter(|e| !e.is_null()).cloned(),
    };
    debug!(id = %handshake.id, "connected");
    Ok((ws, early, handshake))
}

/// The data and error of the handshake reply, if `frame` is it.
fn handshake_reply(frame: Frame<'_>) -> Option<(Option<Value>, Option<Value>)> {
    match frame {
        Frame::Response { rid: HANDSHAKE_CID, data, error } => {
            let value = |raw: Option<&RawValue>| raw.and_then(|r| serde_json::from_str(r.get()).ok());
            Some((value(data), value(error)))
        }
        _ => None,
    }
}

/// Closes with `code` and waits (bounded) for the server's close frame; errors are moot.
async fn close_quietly(ws: &mut Ws, code: u16, reason: &str, config: &ClientConfig) {
    let _ = ws.send(Message::Close(Some(close_frame(code, reason)))).await;
    let _ = timeout(config.close_timeout, async { while let Some(Ok(_)) = ws.next().await {} }).await;
}

/// Runs the connection until it ends, then fails pending invokes and sends [`Event::Closed`].
pub(crate) async fn run(
    ws: Ws,
    shared: Arc<Shared>,
    mut outbound: mpsc::Receiver<Outbound>,
    weak_outbound: mpsc::WeakSender<Outbound>,
    events: mpsc::Sender<Event>,
    early: Vec<String>,
    config: TaskConfig,
) {
    let (mut sink, mut stream) = ws.split();
    let mut reader = Reader {
        protocol: shared.protocol,
        shared: Arc::clone(&shared),
        outbound: weak_outbound,
        events,
        ping_timeout: config.ping_timeout,
    };
    let end = async {
        for text in &early {
            if let Some(end) = reader.on_text(text).await {
                return end;
            }
        }
        tokio::select! {
            end = reader.read(&mut stream) => end,
            end = write(&mut sink, &mut outbound, &shared, config.close_timeout) => end,
        }
    }
    .await;
    let info = match end {
        End::Remote(info) => {
            // tungstenite queued the reply to the server's close; the next read flushes it.
            let _ = timeout(config.close_timeout, stream.next()).await;
            info
        }
        End::Local { code, reason, sent } => {
            if !sent {
                let _ = sink.send(Message::Close(Some(close_frame(code, &reason)))).await;
            }
            let _ = timeout(config.close_timeout, async {
                while let Some(Ok(message)) = stream.next().await {
                    if message.is_close() {
                        break;
                    }
                }
            })
            .await;
            CloseInfo { code: Some(code), reason }
        }
        End::Broken(reason) => shared.lock().closing.clone().unwrap_or(CloseInfo { code: None, reason }),
    };
    drop((sink, stream));
    debug!(id = %shared.handshake.id, close = %info, "closed");
    let pending = {
        let mut state = shared.lock();
        state.close = Some(info.clone());
        std::mem::take(&mut state.pending)
    };
    // From here on sends fail at once instead of queueing into a dead connection.
    drop(outbound);
    for (_, waiter) in pending {
        let _ = waiter.send(Reply::Closed(info.clone()));
    }
    shared.closed.send_replace(Some(info.clone()));
    // May wait for a slow consumer; the socket is already gone, so that costs only this task.
    let _ = reader.events.send(Event::Closed(info)).await;
}

/// The write side: batches of queued frames, one flush per batch.
async fn write(
    sink: &mut SplitSink<Ws, Message>,
    outbound: &mut mpsc::Receiver<Outbound>,
    shared: &Shared,
    close_timeout: Duration,
) -> End {
    // Reused for every batch: no allocation per frame on this path.
    let mut batch = Vec::with_capacity(WRITE_BATCH);
    loop {
        if outbound.recv_many(&mut batch, WRITE_BATCH).await == 0 {
            // Every client handle is gone: nobody can use the connection any more.
            return End::Local { code: 1000, reason: String::new(), sent: false };
        }
        trace!(frames = batch.len(), "write batch");
        for out in batch.drain(..) {
            match out {
                Outbound::Frame(text) => {
                    if let Err(e) = sink.feed(Message::Text(text)).await {
                        return End::Broken(e.to_string());
                    }
                }
                Outbound::Close { code, reason } => {
                    shared.lock().closing = Some(CloseInfo { code: Some(code), reason: reason.clone() });
                    if let Err(e) = sink.send(Message::Close(Some(close_frame(code, &reason)))).await {
                        return End::Broken(e.to_string());
                    }
                    // The reader sees the server's close frame and wins the race; this only
                    // bounds the wait for a server that never answers.
                    tokio::time::sleep(close_timeout).await;
                    return End::Local { code, reason, sent: true };
                }
            }
        }
        if let Err(e) = sink.flush().await {
            return End::Broken(e.to_string());
        }
    }
}

impl Reader {
    /// Reads until the connection ends, answering pings and watching the ping timeout.
    async fn read(&mut self, stream: &mut SplitStream<Ws>) -> End {
        // The deadline only advances on pings, like the stock clients; it does not run while
        // the reader waits for a slow events consumer, since tokio's timeout polls the read
        // before the timer and buffered pings are seen first.
        let mut deadline = self.ping_timeout.map(|t| Instant::now() + t);
        loop {
            let next = match deadline {
                Some(at) => match timeout_at(at, stream.next()).await {
                    Ok(next) => next,
                    Err(_) => {
                        return End::Local {
                            code: 4000,
                            reason: "Server ping timed out".into(),
                            sent: false,
                        };
                    }
                },
                None => stream.next().await,
            };
            let message = match next {
                None => return End::Broken("connection ended without a close frame".into()),
                Some(Err(e)) => return End::Broken(e.to_string()),
                Some(Ok(message)) => message,
            };
            match message {
                Message::Text(text) => {
                    if text.as_str() == self.protocol.ping() {
                        deadline = self.ping_timeout.map(|t| Instant::now() + t);
                        self.send(Utf8Bytes::from_static(self.protocol.pong())).await;
                        continue;
                    }
                    if let Some(end) = self.on_text(text.as_str()).await {
                        return end;
                    }
                }
                // The stock clients surface binary frames as raw messages.
                Message::Binary(bytes) => {
                    let text = String::from_utf8_lossy(&bytes).into_owned();
                    self.emit(Event::Raw(text)).await;
                }
                Message::Close(frame) => return End::Remote(close_info(frame)),
                // WebSocket-level pings are answered by tungstenite.
                Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
            }
        }
    }

    /// Handles one text frame (not a ping).
    async fn on_text(&mut self, text: &str) -> Option<End> {
        match codec::decode(text, self.protocol) {
            Decoded::Ping => {
                self.send(Utf8Bytes::from_static(self.protocol.pong())).await;
                None
            }
            Decoded::Raw => {
                self.emit(Event::Raw(text.to_owned())).await;
                None
            }
            Decoded::Packet(packet) => {
                let frame = codec::classify(packet, self.protocol);
                self.on_frame(frame, text).await
            }
            Decoded::Batch(items) => {
                for item in items {
                    let end = match codec::decode_element(item) {
                        Some(packet) => {
                            let frame = codec::classify(packet, self.protocol);
                            self.on_frame(frame, text).await
                        }
                        None => {
                            self.emit(Event::Raw(text.to_owned())).await;
                            None
                        }
                    };
                    if end.is_some() {
                        return end;
                    }
                }
                None
            }
        }
    }

    /// Handles one packet; `text` is the whole frame, for raw events.
    async fn on_frame(&mut self, frame: Frame<'_>, text: &str) -> Option<End> {
        match frame {
            Frame::Response { rid, data, error } => {
                let waiter = self.shared.lock().pending.remove(&rid);
                match waiter {
                    Some(waiter) => {
                        let reply = match error {
                            Some(error) => Reply::Error(error.to_owned()),
                            None => Reply::Data(data.map(ToOwned::to_owned)),
                        };
                        let _ = waiter.send(reply);
                    }
                    None => trace!(rid, "reply to no pending call"),
                }
            }
            Frame::Publish { channel, data } => {
                let channel = channel.into_owned();
                self.emit(Event::Publish { channel, data: owned_or_null(data) }).await;
            }
            Frame::KickOut { channel, message } => {
                let channel = channel.into_owned();
                self.emit(Event::KickOut { channel, message: to_value(message) }).await;
            }
            Frame::SetAuthToken { token, cid } => {
                let token = token.into_owned();
                self.shared.lock().auth_token = Some(token.clone());
                self.ack(cid).await;
                self.emit(Event::SetAuthToken(token)).await;
            }
            Frame::RemoveAuthToken { cid } => {
                self.shared.lock().auth_token = None;
                self.ack(cid).await;
                self.emit(Event::RemoveAuthToken).await;
            }
            Frame::Disconnect { code, reason } => {
                let reason = to_value(reason);
                let reason_text = match &reason {
                    Value::Null => String::new(),
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                self.emit(Event::Disconnect { code, reason }).await;
                // The v14 client closes its side with the announced code right away.
                return Some(End::Local { code: code.unwrap_or(1000), reason: reason_text, sent: false });
            }
            Frame::Invoke { event, data, cid } => {
                let event = event.into_owned();
                let responder =
                    Responder::new(cid.to_owned(), self.outbound.clone(), Arc::clone(&self.shared));
                self.emit(Event::Invoke { event, data: owned_or_null(data), responder }).await;
            }
            Frame::Transmit { event, data } => {
                let event = event.into_owned();
                self.emit(Event::Transmit { event, data: owned_or_null(data) }).await;
            }
            Frame::Raw => self.emit(Event::Raw(text.to_owned())).await,
        }
        None
    }

    /// Answers a server invoke of `#setAuthToken` / `#removeAuthToken` that wants an ack.
    async fn ack(&self, cid: Option<&RawValue>) {
        if let Some(cid) = cid
            && let Ok(frame) = codec::encode_response::<()>(cid, None)
        {
            self.send(Utf8Bytes::from(frame)).await;
        }
    }

    /// Queues a frame; lost only when the connection is going away anyway.
    async fn send(&self, frame: Utf8Bytes) {
        if let Some(outbound) = self.outbound.upgrade() {
            let _ = outbound.send(Outbound::Frame(frame)).await;
        }
    }

    /// Delivers an event, waiting while the consumer's buffer is full (back-pressure). A
    /// dropped [`crate::Events`] discards it.
    async fn emit(&self, event: Event) {
        let _ = self.events.send(event).await;
    }
}

/// A close frame with a code tungstenite will send and a reason that fits a control frame.
pub(crate) fn close_frame(code: u16, reason: &str) -> CloseFrame {
    // 1005, 1006 and 1015 are reserved for reporting and must not be sent.
    let code = match code {
        1000..=1003 | 1007..=1014 | 3000..=4999 => code,
        _ => 1000,
    };
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    CloseFrame { code: CloseCode::from(code), reason: Utf8Bytes::from(reason.get(..end).unwrap_or_default()) }
}

fn close_info(frame: Option<CloseFrame>) -> CloseInfo {
    match frame {
        Some(frame) => {
            CloseInfo { code: Some(u16::from(frame.code)), reason: frame.reason.as_str().to_owned() }
        }
        // A close frame without a status reads as 1005, as in browsers.
        None => CloseInfo { code: Some(1005), reason: String::new() },
    }
}

fn broken(reason: &str) -> Error {
    Error::Closed(CloseInfo { code: None, reason: reason.to_owned() })
}

/// Absent data is reported as `null`.
fn owned_or_null(data: Option<&RawValue>) -> Box<RawValue> {
    data.unwrap_or(RawValue::NULL).to_owned()
}

fn to_value(raw: Option<&RawValue>) -> Value {
    raw.and_then(|r| serde_json::from_str(r.get()).ok()).unwrap_or(Value::Null)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_frames_are_sendable() {
        assert_eq!(u16::from(close_frame(4000, "x").code), 4000);
        assert_eq!(u16::from(close_frame(1005, "").code), 1000);
        assert_eq!(u16::from(close_frame(5000, "").code), 1000);
        let long = "é".repeat(100);
        let frame = close_frame(1000, &long);
        assert!(frame.reason.len() <= 123);
        assert!(long.starts_with(frame.reason.as_str()));
    }
}
