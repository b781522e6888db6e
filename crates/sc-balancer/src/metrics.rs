//! The balancer's figures: connections accepted, refused (by reason), open, and TLS
//! handshakes with their latency, each by transport (`plain` or `tls`).
//!
//! One set per process ([`get`]): every labelled counter is resolved once, here, so the accept
//! path and the connection tasks only bump atomics. [`registry`] exposes them (with the process
//! figures) for `GET /metrics` and the master's scrape, see [`sc_common::metrics`].

use std::sync::LazyLock;

use sc_common::metrics::{Open, transport};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

/// The figures of this balancer process.
#[derive(Debug)]
pub(crate) struct Metrics {
    accepted: Family<[(&'static str, &'static str); 1], Counter>,
    refused: Family<[(&'static str, &'static str); 2], Counter>,
    open: Family<[(&'static str, &'static str); 1], Gauge>,
    tls_handshakes: Counter,
    tls_handshake_duration: Histogram,
    handed_off: Counter,
    /// Resolved members of the families above, by transport (index: `tls as usize`).
    by_transport: [Resolved; 2],
}

/// The labelled counters of one transport.
#[derive(Debug)]
struct Resolved {
    accepted: Counter,
    open: Gauge,
    refused: [Counter; Refused::ALL.len()],
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

    fn label(self) -> &'static str {
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
        let accepted = Family::<_, Counter>::default();
        let refused = Family::<_, Counter>::default();
        let open = Family::<_, Gauge>::default();
        let by_transport = [false, true].map(|tls| {
            let transport = ("transport", transport(tls));
            Resolved {
                accepted: accepted.get_or_create_owned(&[transport]),
                open: open.get_or_create_owned(&[transport]),
                refused: Refused::ALL
                    .map(|why| refused.get_or_create_owned(&[transport, ("reason", why.label())])),
            }
        });
        Self {
            accepted,
            refused,
            open,
            tls_handshakes: Counter::default(),
            tls_handshake_duration: sc_common::metrics::seconds_histogram(),
            handed_off: Counter::default(),
            by_transport,
        }
    }

    /// A connection accepted on the public listener.
    pub(crate) fn accepted(&self, tls: bool) {
        self.by_transport[usize::from(tls)].accepted.inc();
    }

    /// A connection closed before it was forwarded, and why.
    pub(crate) fn refused(&self, tls: bool, why: Refused) {
        let index = Refused::ALL.iter().position(|r| *r == why).unwrap_or(0);
        self.by_transport[usize::from(tls)].refused[index].inc();
    }

    /// Counts a connection as open until the returned guard is dropped.
    pub(crate) fn open(&'static self, tls: bool) -> Open {
        Open::new(&self.by_transport[usize::from(tls)].open)
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
    registry.register(
        "sc_connections_accepted",
        "Client connections accepted on the public listener",
        metrics.accepted.clone(),
    );
    registry.register(
        "sc_connections_refused",
        "Client connections closed before they were forwarded to a worker, by reason",
        metrics.refused.clone(),
    );
    registry.register("sc_connections_open", "Client connections open", metrics.open.clone());
    registry.register(
        "sc_connections_handed_off",
        "Plain connections passed to their worker on this host (then counted open by the worker)",
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
