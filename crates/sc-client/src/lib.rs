//! A Rust client for the SocketCluster wire protocol, version 1 (socketcluster-client v14 line)
//! and version 2 (v17 to v20 line).
//!
//! It plays the part of the stock npm client against sc-rs (the balancer in front of the
//! workers) or against the stock Node servers: the cross-daemon tests use it, and so does the
//! load generator `sc-bench`. It does not reconnect and keeps no channel state: a test or a
//! bench decides itself what a dropped connection means.
//!
//! Entry point: [`connect`] opens TCP (optionally from a chosen source address, since the
//! balancer hashes by client IP), upgrades to WebSocket, completes `#handshake` and returns a
//! [`Client`] (a cheap, cloneable handle for calls) and [`Events`] (everything the server sends
//! that is not a reply). Each connection runs on one tokio task that reads and writes; queued
//! outbound frames are written with one flush per batch.
//!
//! ```no_run
//! # async fn demo() -> Result<(), sc_client::Error> {
//! use sc_client::{ClientConfig, Event};
//! let (client, mut events) =
//!     sc_client::connect(ClientConfig::new("ws://127.0.0.1:8000/socketcluster/")).await?;
//! client.subscribe("news").await?;
//! client.publish("news", &serde_json::json!({"hi": 1})).await?;
//! while let Some(event) = events.recv().await {
//!     if let Event::Publish { channel, data } = event {
//!         println!("{channel}: {}", data.get());
//!         break;
//!     }
//! }
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

mod client;
mod codec;
mod connection;
mod error;
mod event;
mod transport;

pub use client::{AuthStatus, Client, Handshake, Responder, connect};
pub use error::Error;
pub use event::{Event, Events};

/// The wire protocol spoken; there is no negotiation, both ends must agree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ProtocolVersion {
    /// socketcluster v14 and older: `"#1"`/`"#2"` pings, `#disconnect` before closing.
    V1,
    /// socketcluster v15 and later: `""`/`""` pings, the reason in the close frame.
    #[default]
    V2,
}

/// How to connect. Build with [`ClientConfig::new`] and adjust the public fields.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// `ws://host:port/socketcluster/` (a query string is passed through).
    pub url: String,
    /// The protocol version to speak (the server must speak it too).
    pub protocol: ProtocolVersion,
    /// Sent in `#handshake`; `None` sends `null`, as the stock clients do.
    pub auth_token: Option<String>,
    /// Source address to bind before connecting; our balancer picks a worker by client IP.
    pub local_addr: Option<IpAddr>,
    /// How long an invoke (and the handshake) waits for its reply; the stock default is 10 s.
    pub ack_timeout: Duration,
    /// TCP connect plus WebSocket upgrade; the stock default is 20 s.
    pub connect_timeout: Duration,
    /// Skip the client-side check that the server pings at least every `pingTimeout`
    /// (`pingTimeoutDisabled` in the stock clients). For tests that pause the server.
    pub ping_timeout_disabled: bool,
    /// How many events may wait for the consumer of [`Events`] before the connection stops
    /// reading the socket.
    pub event_buffer: usize,
    /// How long a close we start waits for the server's close frame.
    pub close_timeout: Duration,
    /// The TLS configuration (trusted roots) for `wss://` URLs; `None` refuses `wss://`.
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

/// How a connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseInfo {
    /// The close code: the server's close frame, or the code we closed with (4000 for a ping
    /// timeout, the v1 `#disconnect` code); `None` when the connection broke without one.
    pub code: Option<u16>,
    /// The close frame's reason, else the v1 `#disconnect` reason, else why it broke.
    pub reason: String,
}

impl ClientConfig {
    /// Protocol v2, no token, the stock timeouts.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            protocol: ProtocolVersion::V2,
            auth_token: None,
            local_addr: None,
            ack_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(20),
            ping_timeout_disabled: false,
            event_buffer: 1024,
            close_timeout: Duration::from_secs(3),
            tls: None,
        }
    }

    /// The same, speaking `protocol`.
    pub fn with_protocol(mut self, protocol: ProtocolVersion) -> Self {
        self.protocol = protocol;
        self
    }

    /// The same, trusting the CA certificates of the PEM file `ca` for `wss://` URLs (ring
    /// provider, TLS 1.2 and 1.3).
    pub fn with_ca_file(mut self, ca: &std::path::Path) -> Result<Self, Error> {
        self.tls = Some(transport::client_config(ca)?);
        Ok(self)
    }
}

impl std::fmt::Display for CloseInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.code {
            Some(code) => write!(f, "code {code}")?,
            None => f.write_str("no close code")?,
        }
        if !self.reason.is_empty() {
            write!(f, ": {}", self.reason)?;
        }
        Ok(())
    }
}
