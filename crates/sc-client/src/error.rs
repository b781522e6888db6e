//! The crate's one error type.

use std::time::Duration;

use serde_json::Value;

use crate::CloseInfo;

/// Everything that can go wrong when connecting or calling.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The URL does not parse, or names no host.
    #[error("invalid url {url}: {reason}")]
    InvalidUrl {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A scheme other than `ws://` and `wss://`, or `wss://` without [`crate::ClientConfig::tls`].
    #[error("unsupported url scheme {0}")]
    UnsupportedScheme(String),
    /// The CA file could not be read or holds no usable certificate.
    #[error("tls: {0}")]
    Tls(String),
    /// DNS, bind or TCP connect failed.
    #[error("connect: {0}")]
    Io(#[from] std::io::Error),
    /// The WebSocket upgrade or the socket itself failed.
    #[error("websocket: {0}")]
    WebSocket(#[from] Box<tokio_tungstenite::tungstenite::Error>),
    /// TCP connect plus WebSocket upgrade took longer than `connect_timeout`.
    #[error("connect timed out after {0:?}")]
    ConnectTimeout(Duration),
    /// The server answered `#handshake` with an error and closed with `code`.
    #[error("handshake rejected with {code}: {name}: {message}")]
    HandshakeRejected {
        /// The close code.
        code: u16,
        /// The error's `name`.
        name: String,
        /// The error's `message`.
        message: String,
        /// The error object as sent.
        raw: Value,
    },
    /// The server's answer to an invoke was an error object.
    #[error("remote error {name}: {message}")]
    Remote {
        /// The error's `name`.
        name: String,
        /// The error's `message`.
        message: String,
        /// The error object as sent (a string stays a string).
        raw: Value,
    },
    /// No answer within the ack timeout; the stock servers never answer unknown procedures.
    #[error("no response to {event} within {after:?}")]
    Timeout {
        /// The event invoked.
        event: String,
        /// The ack timeout.
        after: Duration,
    },
    /// The connection is closed, or closed while the call was pending.
    #[error("connection closed ({})", .0)]
    Closed(CloseInfo),
    /// The server broke the protocol (for example, a handshake reply without an id).
    #[error("protocol: {0}")]
    Protocol(String),
    /// Outbound data failed to serialise, or inbound reply data is not valid JSON.
    #[error("json: {0}")]
    Json(#[from] serde_json::Error),
}

impl From<tokio_tungstenite::tungstenite::Error> for Error {
    fn from(error: tokio_tungstenite::tungstenite::Error) -> Self {
        Self::WebSocket(Box::new(error))
    }
}

impl Error {
    /// Builds [`Error::Remote`] from a wire error: `{name, message, …}` or a bare string.
    pub(crate) fn remote(raw: Value) -> Self {
        let field = |key: &str| raw.get(key).and_then(Value::as_str).unwrap_or_default().to_owned();
        let (name, message) = match &raw {
            Value::String(s) => (String::new(), s.clone()),
            _ => (field("name"), field("message")),
        };
        Self::Remote { name, message, raw }
    }

    /// The remote error's name (`"BrokerError"`, ...), if this is one.
    pub fn remote_name(&self) -> Option<&str> {
        match self {
            Self::Remote { name, .. } | Self::HandshakeRejected { name, .. } => Some(name),
            _ => None,
        }
    }
}
