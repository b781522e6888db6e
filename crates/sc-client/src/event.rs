//! What the server sends that is not a reply to one of our calls, delivered in wire order.
//!
//! [`Events`] is a bounded channel. When its consumer falls behind and the buffer
//! ([`crate::ClientConfig::event_buffer`]) is full, the connection task stops reading the socket
//! until there is room: memory stays bounded and the back-pressure reaches the server through
//! TCP. While it waits it neither answers pings nor sees replies, so a consumer that stays stuck
//! for longer than the server's ping timeout gets the connection closed (4001 from the server).
//! Dropping [`Events`] is fine: events are then discarded and the connection keeps working.

use std::pin::Pin;
use std::task::{Context, Poll};

use futures_util::Stream;
use serde_json::Value;
use serde_json::value::RawValue;
use tokio::sync::mpsc;

use crate::CloseInfo;
use crate::client::Responder;

/// One thing the server sent (or the end of the connection).
#[derive(Debug)]
pub enum Event {
    /// A message on a subscribed channel (our own publishes come back too). `data` is the
    /// payload's JSON text, `null` when absent; parse it only if needed.
    Publish {
        /// The channel.
        channel: String,
        /// The payload's JSON text.
        data: Box<RawValue>,
    },
    /// The server unsubscribed us from `channel`.
    KickOut {
        /// The channel.
        channel: String,
        /// The server's message, as sent.
        message: Value,
    },
    /// The server issued a token; [`crate::Client::auth_token`] already returns it.
    SetAuthToken(String),
    /// The server removed our token.
    RemoveAuthToken,
    /// A custom event without a reply; `data` is `null` when absent.
    Transmit {
        /// The event name.
        event: String,
        /// The payload's JSON text.
        data: Box<RawValue>,
    },
    /// A server-to-client invoke; answer through `responder` (dropping it sends nothing, and
    /// the server's call times out).
    Invoke {
        /// The procedure name.
        event: String,
        /// The payload's JSON text.
        data: Box<RawValue>,
        /// Sends the answer.
        responder: Responder,
    },
    /// A frame that is not a packet (sc-formatter rules), or a packet the client does not
    /// understand; the whole frame text.
    Raw(String),
    /// v1 only: the server announced that it closes with `code`; [`Event::Closed`] follows.
    Disconnect {
        /// The announced close code.
        code: Option<u16>,
        /// The announced reason, as sent.
        reason: Value,
    },
    /// The connection ended; always the last event.
    Closed(CloseInfo),
}

/// The receiving end of a connection's events; also a [`Stream`].
#[derive(Debug)]
pub struct Events {
    rx: mpsc::Receiver<Event>,
}

impl Event {
    /// Parses the payload of a publish, transmit or invoke into a [`Value`].
    pub fn data_value(&self) -> Option<Value> {
        match self {
            Self::Publish { data, .. } | Self::Transmit { data, .. } | Self::Invoke { data, .. } => {
                serde_json::from_str(data.get()).ok()
            }
            _ => None,
        }
    }
}

impl Events {
    pub(crate) fn new(rx: mpsc::Receiver<Event>) -> Self {
        Self { rx }
    }

    /// The next event; `None` after [`Event::Closed`] has been received.
    pub async fn recv(&mut self) -> Option<Event> {
        self.rx.recv().await
    }

    /// The next event if one is waiting.
    pub fn try_recv(&mut self) -> Option<Event> {
        self.rx.try_recv().ok()
    }

    /// Receives up to `limit` waiting events into `buffer` (at least one, unless closed): the
    /// cheap way to drain a busy connection.
    pub async fn recv_many(&mut self, buffer: &mut Vec<Event>, limit: usize) -> usize {
        self.rx.recv_many(buffer, limit).await
    }
}

impl Stream for Events {
    type Item = Event;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        self.rx.poll_recv(cx)
    }
}
