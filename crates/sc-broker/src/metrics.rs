//! The broker's figures: publishes and deliveries, the worker streams it cut for not reading,
//! and, read at each scrape, the attached worker streams, channels, subscriptions and exchange
//! keys, and with the Redis backend the state of its link to Redis (`sc_broker_redis_up`, when
//! the outage began, reconnections, publishes lost, messages received from other clusters).
//!
//! The counters are one set per process ([`get`]), bumped by the router without a lookup; the
//! gauges are read from the router and the exchange when scraped ([`State`]), so nothing is
//! kept up to date in between. [`registry`] exposes them (with the process figures) for
//! `GET /metrics` and the master's scrape, see [`sc_common::metrics`].

use std::sync::{Arc, LazyLock};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use crate::exchange::Exchange;
use crate::redis::Bridge;
use crate::router::Router;

/// The counters of this broker process.
#[derive(Debug, Default)]
pub(crate) struct Metrics {
    /// Publishes received from workers.
    pub(crate) publishes: Counter,
    /// Deliveries queued to worker streams (one per subscribed stream and publish).
    pub(crate) deliveries: Counter,
    /// Worker streams cut because their queue was full.
    pub(crate) stream_cuts: Counter,
}

/// The broker's state, read at each scrape.
#[derive(Debug)]
struct State {
    router: Arc<Router>,
    exchange: Arc<Exchange>,
    /// The link to Redis (Redis backend only).
    bridge: Option<Arc<Bridge>>,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::default);

impl Collector for State {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let subscriptions: usize = self.router.subscriptions().iter().map(|(_, n)| n).sum();
        let gauges = [
            ("sc_broker_streams", "Worker streams attached", self.router.stream_count()),
            (
                "sc_broker_channels",
                "Channels with at least one subscribed worker stream",
                self.router.channel_count(),
            ),
            ("sc_broker_subscriptions", "Channel subscriptions of the worker streams", subscriptions),
            ("sc_exchange_keys", "Keys in this broker's exchange shard", self.exchange.len()),
        ];
        for (name, help, value) in gauges {
            let gauge = ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX));
            let metric = encoder.encode_descriptor(name, help, None, gauge.metric_type())?;
            gauge.encode(metric)?;
        }
        if let Some(bridge) = &self.bridge {
            encode_redis(&mut encoder, bridge)?;
        }
        Ok(())
    }
}

/// The link to Redis: two gauges and three counters (`_total` is added by the encoders).
fn encode_redis(encoder: &mut DescriptorEncoder<'_>, bridge: &Bridge) -> Result<(), std::fmt::Error> {
    let health = bridge.health();
    let gauges = [
        (
            "sc_broker_redis_up",
            "1 while Redis answers this broker's checks (four a second), 0 during an outage",
            f64::from(u8::from(health.up)),
        ),
        (
            "sc_broker_redis_down_since_seconds",
            "When the current Redis outage began (seconds since the Unix epoch); 0 while Redis is up",
            health.down_since_ms.map_or(0.0, |ms| ms as f64 / 1000.0),
        ),
    ];
    for (name, help, value) in gauges {
        let gauge = ConstGauge::new(value);
        let metric = encoder.encode_descriptor(name, help, None, gauge.metric_type())?;
        gauge.encode(metric)?;
    }
    let counters = [
        (
            "sc_broker_redis_reconnects",
            "Redis outages that ended (Redis reachable again, subscriptions renewed)",
            health.reconnects,
        ),
        (
            "sc_broker_redis_lost_publishes",
            "Publishes not sent to Redis (Redis unreachable, or the outbox full): other clusters never got them",
            health.lost_publishes,
        ),
        (
            "sc_broker_redis_received",
            "Messages from other clusters delivered to this broker's subscribers",
            health.received,
        ),
    ];
    for (name, help, value) in counters {
        let counter = ConstCounter::new(value);
        let metric = encoder.encode_descriptor(name, help, None, counter.metric_type())?;
        counter.encode(metric)?;
    }
    Ok(())
}

/// The counters of this process.
pub(crate) fn get() -> &'static Metrics {
    &METRICS
}

/// A registry of this broker's figures, labelled `role="broker"` and its id; `bridge` adds
/// the link to Redis.
pub(crate) fn registry(
    id: &str,
    router: Arc<Router>,
    exchange: Arc<Exchange>,
    bridge: Option<Arc<Bridge>>,
) -> Registry {
    let m = get();
    let mut registry = sc_common::metrics::registry("broker", id);
    registry.register("sc_broker_publishes", "Publishes received from workers", m.publishes.clone());
    registry.register(
        "sc_broker_deliveries",
        "Deliveries queued to worker streams (one per subscribed stream and publish)",
        m.deliveries.clone(),
    );
    registry.register(
        "sc_broker_stream_cuts",
        "Worker streams cut because they did not read their deliveries",
        m.stream_cuts.clone(),
    );
    registry.register_collector(Box::new(State { router, exchange, bridge }));
    registry
}
