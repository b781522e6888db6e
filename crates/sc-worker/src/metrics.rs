//! The worker's figures: WebSocket connections accepted, refused (by reason) and open by
//! transport (`plain` or `tls`, as the balancer's PROXY header says), SocketCluster handshakes
//! and their latency, messages and bytes in and out, outbound queue drops and slow-consumer
//! closes, broker link resets and reconnects, and the local subscriptions and channels.
//!
//! One set per process ([`get`]): every labelled counter is resolved once, here, so the socket
//! tasks only bump atomics (no lock, no allocation, no label lookup per message). [`registry`]
//! exposes them (with the process figures) for `GET /metrics` and the master's scrape, see
//! [`sc_common::metrics`].

use std::sync::LazyLock;

use sc_common::metrics::{Connections, Open};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

/// The figures of this worker process.
#[derive(Debug)]
pub(crate) struct Metrics {
    connections: Connections<{ Refused::ALL.len() }>,
    handshakes: Counter,
    handshake_duration: Histogram,
    messages_received: Counter,
    messages_sent: Counter,
    bytes_received: Counter,
    bytes_sent: Counter,
    outbound_drops: Counter,
    slow_consumer_closes: Counter,
    broker_link_resets: Counter,
    broker_link_reconnects: Counter,
    /// Socket-channel subscriptions held by this worker's sockets.
    pub(crate) subscriptions: Gauge,
    /// Channels with at least one local subscriber.
    pub(crate) channels: Gauge,
}

/// Why the worker refused a connection or an upgrade.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// The client's address had `[worker] max_pending_per_ip` connections before their handshake.
    PendingPerIp,
    /// The `Origin` header is not in `[worker] origins`.
    Origin,
    /// The app's `upgrade` hook rejected it.
    App,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

impl Refused {
    const ALL: [Refused; 3] = [Refused::PendingPerIp, Refused::Origin, Refused::App];

    const fn label(self) -> &'static str {
        match self {
            Refused::PendingPerIp => "pending_per_ip",
            Refused::Origin => "origin",
            Refused::App => "app",
        }
    }
}

impl Metrics {
    fn new() -> Self {
        Self {
            connections: Connections::new(Refused::ALL.map(Refused::label)),
            handshakes: Counter::default(),
            handshake_duration: sc_common::metrics::seconds_histogram(),
            messages_received: Counter::default(),
            messages_sent: Counter::default(),
            bytes_received: Counter::default(),
            bytes_sent: Counter::default(),
            outbound_drops: Counter::default(),
            slow_consumer_closes: Counter::default(),
            broker_link_resets: Counter::default(),
            broker_link_reconnects: Counter::default(),
            subscriptions: Gauge::default(),
            channels: Gauge::default(),
        }
    }

    /// A WebSocket opened: counts it accepted, and open until the guard is dropped.
    pub(crate) fn socket_opened(&'static self, tls: bool) -> Open {
        self.connections.accepted(tls);
        self.connections.open(tls)
    }

    /// A connection or upgrade refused, and why.
    pub(crate) fn refused(&self, tls: bool, why: Refused) {
        let index = Refused::ALL.iter().position(|r| *r == why).unwrap_or(0);
        self.connections.refused(tls, index);
    }

    /// A SocketCluster handshake accepted `seconds` after the socket opened.
    pub(crate) fn handshake(&self, seconds: f64) {
        self.handshakes.inc();
        self.handshake_duration.observe(seconds);
    }

    /// A WebSocket message from a client, of `bytes` bytes.
    pub(crate) fn received(&self, bytes: usize) {
        self.messages_received.inc();
        self.bytes_received.inc_by(bytes as u64);
    }

    /// A WebSocket message to a client, of `bytes` bytes (payload).
    pub(crate) fn sent(&self, bytes: usize) {
        self.messages_sent.inc();
        self.bytes_sent.inc_by(bytes as u64);
    }

    /// A frame dropped because its socket's outbound queue was full.
    pub(crate) fn outbound_drop(&self) {
        self.outbound_drops.inc();
    }

    /// Frames dropped so far (for tests).
    #[cfg(test)]
    pub(crate) fn outbound_drops(&self) -> u64 {
        self.outbound_drops.get()
    }

    /// A socket closed as a slow consumer (4100).
    pub(crate) fn slow_consumer_close(&self) {
        self.slow_consumer_closes.inc();
    }

    /// An open broker stream ended.
    pub(crate) fn broker_link_reset(&self) {
        self.broker_link_resets.inc();
    }

    /// A broker stream is opened again, after a reset or a failed attempt.
    pub(crate) fn broker_link_reconnect(&self) {
        self.broker_link_reconnects.inc();
    }
}

/// The figures of this process.
pub(crate) fn get() -> &'static Metrics {
    &METRICS
}

/// A registry of this worker's figures, labelled `role="worker"` and its id.
pub(crate) fn registry(id: &str) -> Registry {
    let m = get();
    let mut registry = sc_common::metrics::registry("worker", id);
    m.connections.register(
        &mut registry,
        "WebSocket connections opened",
        "Connections or WebSocket upgrades refused, by reason",
        "WebSocket connections open",
    );
    registry.register("sc_handshakes", "SocketCluster handshakes accepted", m.handshakes.clone());
    registry.register_with_unit(
        "sc_handshake_duration",
        "Time from the WebSocket opening to the SocketCluster handshake's acceptance",
        Unit::Seconds,
        m.handshake_duration.clone(),
    );
    registry.register(
        "sc_messages_received",
        "WebSocket messages from clients (pongs included)",
        m.messages_received.clone(),
    );
    registry.register(
        "sc_messages_sent",
        "WebSocket messages to clients (replies, deliveries, pings)",
        m.messages_sent.clone(),
    );
    registry.register_with_unit(
        "sc_received",
        "Payload bytes of the WebSocket messages from clients",
        Unit::Bytes,
        m.bytes_received.clone(),
    );
    registry.register_with_unit(
        "sc_sent",
        "Payload bytes of the WebSocket messages to clients",
        Unit::Bytes,
        m.bytes_sent.clone(),
    );
    registry.register(
        "sc_outbound_drops",
        "Frames dropped because a socket's outbound queue was full",
        m.outbound_drops.clone(),
    );
    registry.register(
        "sc_slow_consumer_closes",
        "Sockets closed as slow consumers (code 4100)",
        m.slow_consumer_closes.clone(),
    );
    registry.register(
        "sc_broker_link_resets",
        "Open broker streams that ended",
        m.broker_link_resets.clone(),
    );
    registry.register(
        "sc_broker_link_reconnects",
        "Broker stream attempts after a reset or a failed attempt",
        m.broker_link_reconnects.clone(),
    );
    registry.register(
        "sc_subscriptions",
        "Channel subscriptions of this worker's sockets",
        m.subscriptions.clone(),
    );
    registry.register("sc_channels", "Channels with a subscriber on this worker", m.channels.clone());
    registry
}
