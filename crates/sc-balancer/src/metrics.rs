//! The balancer's figures: connections accepted, refused (by reason), open, and TLS
//! handshakes with their latency, each by transport (`plain` or `tls`).
//!
//! One set per process ([`get`]): every labelled counter is resolved once, here, so the accept
//! path and the connection tasks only bump atomics. [`registry`] exposes them (with the process
//! figures) for `GET /metrics` and the master's scrape, see [`sc_common::metrics`].

use std::sync::LazyLock;

use sc_common::metrics::{Connections, Open};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

/// The figures of this balancer process.
#[derive(Debug)]
pub(crate) struct Metrics {
    connections: Connections<{ Refused::ALL.len() }>,
    tls_handshakes: Counter,
    tls_handshake_duration: Histogram,
    handed_off: Counter,
}

/// Why the balancer closed a connection before forwarding it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// The client's address had `[balancer] max_pending_per_ip` connections not forwarded yet.
    PendingPerIp,
    /// The TLS handshake failed or timed out.
    TlsHandshake,
    /// The client sent nothing within `[balancer] first_byte_timeout`.
    FirstByte,
    /// No worker took the connection.
    NoWorker,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

impl Refused {
    const ALL: [Refused; 4] =
        [Refused::PendingPerIp, Refused::TlsHandshake, Refused::FirstByte, Refused::NoWorker];

    const fn label(self) -> &'static str {
        match self {
            Refused::PendingPerIp => "pending_per_ip",
            Refused::TlsHandshake => "tls_handshake",
            Refused::FirstByte => "first_byte_timeout",
            Refused::NoWorker => "no_worker",
        }
    }
}

impl Metrics {
    fn new() -> Self {
        Self {
            connections: Connections::new(Refused::ALL.map(Refused::label)),
            tls_handshakes: Counter::default(),
            tls_handshake_duration: sc_common::metrics::seconds_histogram(),
            handed_off: Counter::default(),
        }
    }

    /// A connection accepted on the public listener.
    pub(crate) fn accepted(&self, tls: bool) {
        self.connections.accepted(tls);
    }

    /// A connection closed before it was forwarded, and why.
    pub(crate) fn refused(&self, tls: bool, why: Refused) {
        let index = Refused::ALL.iter().position(|r| *r == why).unwrap_or(0);
        self.connections.refused(tls, index);
    }

    /// Counts a connection as open until the returned guard is dropped.
    pub(crate) fn open(&'static self, tls: bool) -> Open {
        self.connections.open(tls)
    }

    /// A plain connection handed to its worker on this host (from then on the worker's).
    pub(crate) fn handed_off(&self) {
        self.handed_off.inc();
    }

    /// A TLS handshake completed after `seconds`.
    pub(crate) fn tls_handshake(&self, seconds: f64) {
        self.tls_handshakes.inc();
        self.tls_handshake_duration.observe(seconds);
    }
}

/// The figures of this process.
pub(crate) fn get() -> &'static Metrics {
    &METRICS
}

/// A registry of this balancer's figures, labelled `role="balancer"` and its id.
pub(crate) fn registry(id: &str) -> Registry {
    let metrics = get();
    let mut registry = sc_common::metrics::registry("balancer", id);
    metrics.connections.register(
        &mut registry,
        "Client connections accepted on the public listener",
        "Client connections closed before they were forwarded to a worker, by reason",
        "Client connections open",
    );
    registry.register(
        "sc_connections_handed_off",
        "Connections (plain, and TLS after the handshake) passed to their worker on this host (then counted open by the worker)",
        metrics.handed_off.clone(),
    );
    registry.register("sc_tls_handshakes", "TLS handshakes completed", metrics.tls_handshakes.clone());
    registry.register_with_unit(
        "sc_tls_handshake_duration",
        "Time from accept to the end of the TLS handshake",
        Unit::Seconds,
        metrics.tls_handshake_duration.clone(),
    );
    registry
}
