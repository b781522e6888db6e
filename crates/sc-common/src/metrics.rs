//! The plumbing of every daemon's metrics (prometheus-client), and the member side of the
//! `sc.metrics.v1` contract.
//!
//! Each daemon keeps its own figures (its `metrics` module: atomics, resolved once at start)
//! and registers them in a [`registry`], which labels every sample with the daemon's `role` and
//! `id` and adds the process figures ([`ProcessCollector`]: CPU seconds, resident memory, open
//! file descriptors, read from /proc on each scrape). A member (balancer, worker, broker) adds
//! [`routes`] to the gRPC server on its health listener: the `sc.metrics.v1.Metrics` service
//! (cluster-secret bearer, like every internal call) that the master scrapes, and a plain
//! HTTP/1.1 `GET /metrics` with the Prometheus text format for per-process scrapers. The master
//! serves the whole cluster's figures on its admin listener (sc-master's `metrics` module).
//!
//! The text is prometheus-client's own encoder; [`scrape`] converts a registry to the wire
//! contract through prometheus-client's Prometheus data model, so no format is written by hand.

use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::prometheus_protobuf::prometheus_data_model as model;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use sc_proto::metrics::v1 as pb;

use crate::secret;

/// The `Content-Type` of the Prometheus text format that `GET /metrics` answers with.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// The figures of this process that the kernel keeps: CPU time, resident memory and open file
/// descriptors, read from /proc at each scrape (nothing to update in between). Reports what it
/// can read; on a system without /proc, nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct ProcessCollector;

/// One reading of [`ProcessCollector`].
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct ProcessStats {
    /// User and system CPU time, in seconds.
    pub cpu_seconds: Option<f64>,
    /// Resident set size, in bytes.
    pub resident_bytes: Option<i64>,
    /// Open file descriptors.
    pub open_fds: Option<i64>,
}

/// The `sc.metrics.v1.Metrics` service of a member: its registry, scraped on request.
#[derive(Debug, Clone)]
struct Scraper {
    registry: Arc<Registry>,
}

impl ProcessStats {
    /// Reads this process's figures from /proc/self.
    pub fn read() -> Self {
        let cpu_seconds = std::fs::read_to_string("/proc/self/stat").ok().and_then(|stat| {
            // The command name (field 2) may hold spaces: count fields after its closing ')'.
            let after = stat.rsplit_once(')')?.1;
            let mut fields = after.split_ascii_whitespace();
            // After ')': state is field 3, utime field 14, stime field 15.
            let utime: u64 = fields.nth(11)?.parse().ok()?;
            let stime: u64 = fields.next()?.parse().ok()?;
            let ticks = rustix::param::clock_ticks_per_second();
            (ticks > 0).then(|| (utime + stime) as f64 / ticks as f64)
        });
        let resident_bytes = std::fs::read_to_string("/proc/self/statm").ok().and_then(|statm| {
            let pages: i64 = statm.split_ascii_whitespace().nth(1)?.parse().ok()?;
            Some(pages * i64::try_from(rustix::param::page_size()).ok()?)
        });
        // The directory handle that read_dir holds is one of them.
        let open_fds = std::fs::read_dir("/proc/self/fd")
            .ok()
            .map(|entries| i64::try_from(entries.count()).unwrap_or(i64::MAX).saturating_sub(1));
        Self { cpu_seconds, resident_bytes, open_fds }
    }
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let stats = ProcessStats::read();
        if let Some(seconds) = stats.cpu_seconds {
            let counter = ConstCounter::new(seconds);
            let metric = encoder.encode_descriptor(
                "process_cpu",
                "User and system CPU time spent by this process",
                Some(&Unit::Seconds),
                counter.metric_type(),
            )?;
            counter.encode(metric)?;
        }
        if let Some(bytes) = stats.resident_bytes {
            let gauge = ConstGauge::new(bytes);
            let metric = encoder.encode_descriptor(
                "process_resident_memory",
                "Resident memory of this process",
                Some(&Unit::Bytes),
                gauge.metric_type(),
            )?;
            gauge.encode(metric)?;
        }
        if let Some(fds) = stats.open_fds {
            let gauge = ConstGauge::new(fds);
            let metric = encoder.encode_descriptor(
                "process_open_fds",
                "Open file descriptors of this process",
                None,
                gauge.metric_type(),
            )?;
            gauge.encode(metric)?;
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl pb::metrics_server::Metrics for Scraper {
    async fn scrape(
        &self,
        _request: tonic::Request<pb::ScrapeRequest>,
    ) -> Result<tonic::Response<pb::ScrapeResponse>, tonic::Status> {
        Ok(tonic::Response::new(scrape(&self.registry)))
    }
}

/// Counts something as open (a connection) while it lives: the gauge goes up when made and
/// down when dropped.
#[derive(Debug)]
pub struct Open(&'static Gauge);

impl Open {
    /// Counts one more on `gauge` until the guard is dropped.
    pub fn new(gauge: &'static Gauge) -> Self {
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The `transport` label of a connection: `tls` or `plain`.
pub fn transport(tls: bool) -> &'static str {
    if tls { "tls" } else { "plain" }
}

/// Client connections by transport: accepted, open, and refused by one of `N` reasons. Every
/// labelled counter is resolved once, when made, so that counting is an atomic add.
#[derive(Debug)]
pub struct Connections<const N: usize> {
    accepted: Family<[(&'static str, &'static str); 1], Counter>,
    refused: Family<[(&'static str, &'static str); 2], Counter>,
    open: Family<[(&'static str, &'static str); 1], Gauge>,
    /// By transport (index: `tls as usize`).
    by_transport: [ResolvedConnections<N>; 2],
}

/// The labelled counters of one transport.
#[derive(Debug)]
struct ResolvedConnections<const N: usize> {
    accepted: Counter,
    open: Gauge,
    refused: [Counter; N],
}

impl<const N: usize> Connections<N> {
    /// Counters for both transports and every reason (`reasons`: their `reason` labels).
    pub fn new(reasons: [&'static str; N]) -> Self {
        let accepted = Family::<_, Counter>::default();
        let refused = Family::<_, Counter>::default();
        let open = Family::<_, Gauge>::default();
        let by_transport = [false, true].map(|tls| {
            let transport = ("transport", transport(tls));
            ResolvedConnections {
                accepted: accepted.get_or_create_owned(&[transport]),
                open: open.get_or_create_owned(&[transport]),
                refused: reasons.map(|why| refused.get_or_create_owned(&[transport, ("reason", why)])),
            }
        });
        Self { accepted, refused, open, by_transport }
    }

    /// A connection accepted.
    pub fn accepted(&self, tls: bool) {
        self.by_transport[usize::from(tls)].accepted.inc();
    }

    /// A connection refused for the reason at `reason` in the list given to [`Connections::new`].
    pub fn refused(&self, tls: bool, reason: usize) {
        if let Some(counter) = self.by_transport[usize::from(tls)].refused.get(reason) {
            counter.inc();
        }
    }

    /// Counts a connection as open until the returned guard is dropped.
    pub fn open(&'static self, tls: bool) -> Open {
        Open::new(&self.by_transport[usize::from(tls)].open)
    }

    /// Registers `sc_connections_accepted`, `sc_connections_refused` and `sc_connections_open`
    /// with these help texts.
    pub fn register(&self, registry: &mut Registry, accepted: &str, refused: &str, open: &str) {
        registry.register("sc_connections_accepted", accepted, self.accepted.clone());
        registry.register("sc_connections_refused", refused, self.refused.clone());
        registry.register("sc_connections_open", open, self.open.clone());
    }
}

/// A registry whose every sample carries `role` and `id` (the daemon's), with the process
/// figures ([`ProcessCollector`]) already in it.
pub fn registry(role: &str, id: &str) -> Registry {
    let labels = [("role".into(), role.to_owned().into()), ("id".into(), id.to_owned().into())];
    let mut registry = Registry::with_labels(labels.into_iter());
    registry.register_collector(Box::new(ProcessCollector));
    registry
}

/// A histogram of durations in seconds, from 0.5 ms to about 16 s (doubling buckets), for
/// handshake latencies.
pub fn seconds_histogram() -> Histogram {
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(0.0005, 2.0, 16))
}

/// The Prometheus text (version 0.0.4) of `registry`.
pub fn text(registry: &Registry) -> String {
    let mut text = String::new();
    if let Err(e) = prometheus_client::encoding::prometheus_text::encode(&mut text, registry) {
        tracing::warn!(error = %e, "metrics could not be encoded");
    }
    text
}

/// What a member adds to the gRPC server on its health listener: the `sc.metrics.v1.Metrics`
/// service, behind the cluster secret, and `GET /metrics` (Prometheus text, over HTTP/1.1: the
/// server needs `accept_http1(true)`), which like grpc.health.v1 needs no secret.
pub fn routes(registry: Arc<Registry>, cluster_secret: &str) -> tonic::service::Routes {
    let service = pb::metrics_server::MetricsServer::with_interceptor(
        Scraper { registry: registry.clone() },
        secret::Check::new(cluster_secret),
    );
    let router = tonic::service::Routes::new(service).into_axum_router().route(
        "/metrics",
        axum::routing::get(move || {
            let registry = registry.clone();
            async move { ([(axum::http::header::CONTENT_TYPE, CONTENT_TYPE)], text(&registry)) }
        }),
    );
    tonic::service::Routes::from(router)
}

/// `registry` as the `sc.metrics.v1` contract: one family per metric, with the names of the
/// text format (counters with `_total`, units in the name) and every label of a sample.
pub fn scrape(registry: &Registry) -> pb::ScrapeResponse {
    let families = match prometheus_client::encoding::prometheus_protobuf::encode(registry) {
        Ok(families) => families,
        Err(e) => {
            tracing::warn!(error = %e, "metrics could not be encoded");
            Vec::new()
        }
    };
    pb::ScrapeResponse { families: families.into_iter().map(family_to_pb).collect() }
}

fn family_to_pb(family: model::MetricFamily) -> pb::Family {
    let kind = match model::MetricType::try_from(family.r#type) {
        Ok(model::MetricType::Counter) => pb::Kind::Counter,
        Ok(model::MetricType::Gauge) => pb::Kind::Gauge,
        Ok(model::MetricType::Histogram) => pb::Kind::Histogram,
        _ => pb::Kind::Unspecified,
    };
    let samples = family
        .metric
        .into_iter()
        .map(|metric| {
            let labels = metric
                .label
                .into_iter()
                .map(|pair| pb::Label { name: pair.name, value: pair.value })
                .collect();
            let mut sample = pb::Sample { labels, ..Default::default() };
            if let Some(counter) = metric.counter {
                sample.value = counter.value;
            } else if let Some(gauge) = metric.gauge {
                sample.value = gauge.value;
            } else if let Some(histogram) = metric.histogram {
                sample.sum = histogram.sample_sum;
                sample.count = histogram.sample_count;
                sample.buckets = histogram
                    .bucket
                    .into_iter()
                    .map(|b| pb::Bucket { upper_bound: b.upper_bound, count: b.cumulative_count })
                    .collect();
            } else if let Some(untyped) = metric.untyped {
                sample.value = untyped.value;
            }
            sample
        })
        .collect();
    pb::Family { name: family.name, help: family.help, kind: kind as i32, samples }
}

#[cfg(test)]
mod tests {
    use prometheus_client::metrics::counter::Counter;
    use prometheus_client::metrics::family::Family;

    use super::*;

    #[test]
    fn the_process_figures_are_read() {
        let stats = ProcessStats::read();
        assert!(stats.cpu_seconds.is_some_and(|s| s >= 0.0), "{stats:?}");
        assert!(stats.resident_bytes.is_some_and(|b| b > 1024 * 1024), "{stats:?}");
        // Other tests of this process open and close descriptors meanwhile, so the count is only
        // bounded below: by the 64 files held here and standard input, output and error.
        let files: Vec<_> = (0..64).map(|_| std::fs::File::open("/proc/self/stat").unwrap()).collect();
        let open = ProcessStats::read().open_fds.unwrap();
        assert!(open >= files.len() as i64 + 3, "{open} open descriptors while holding {}", files.len());
    }

    #[test]
    fn a_registry_becomes_text_and_the_contract_alike() {
        let mut registry = registry("worker", "worker-7");
        let messages: Counter = Counter::default();
        messages.inc_by(3);
        registry.register("sc_messages_received", "Messages from clients", messages);
        let open: Family<[(&'static str, &'static str); 1], prometheus_client::metrics::gauge::Gauge> =
            Family::default();
        open.get_or_create(&[("transport", "tls")]).set(2);
        registry.register("sc_connections_open", "Open connections", open);
        let latency = seconds_histogram();
        latency.observe(0.003);
        latency.observe(100.0);
        registry.register_with_unit("sc_handshake_duration", "Handshake latency", Unit::Seconds, latency);

        let text = text(&registry);
        assert!(text.contains("sc_messages_received_total{role=\"worker\",id=\"worker-7\"} 3\n"), "{text}");
        assert!(text.contains("# TYPE process_cpu_seconds_total counter"), "{text}");

        let scraped = scrape(&registry);
        let family = |name: &str| scraped.families.iter().find(|f| f.name == name).unwrap().clone();
        let received = family("sc_messages_received_total");
        assert_eq!(received.kind, pb::Kind::Counter as i32);
        assert_eq!(received.samples[0].value, 3.0);
        let labels: Vec<(&str, &str)> =
            received.samples[0].labels.iter().map(|l| (l.name.as_str(), l.value.as_str())).collect();
        assert_eq!(labels, [("role", "worker"), ("id", "worker-7")]);
        let open = family("sc_connections_open");
        assert_eq!(open.kind, pb::Kind::Gauge as i32);
        assert_eq!(open.samples[0].value, 2.0);
        assert_eq!(open.samples[0].labels.len(), 3, "role, id and transport");
        let latency = family("sc_handshake_duration_seconds");
        assert_eq!(latency.kind, pb::Kind::Histogram as i32);
        let sample = &latency.samples[0];
        assert_eq!(sample.count, 2);
        assert!((sample.sum - 100.003).abs() < 1e-9);
        let last = sample.buckets.last().unwrap();
        assert!(last.upper_bound.is_infinite() && last.count == 2, "cumulative, +Inf last: {sample:?}");
        let at_4ms = sample.buckets.iter().find(|b| b.upper_bound >= 0.004).unwrap();
        assert_eq!(at_4ms.count, 1);
        assert!(family("process_open_fds").samples[0].value > 0.0);
    }

    #[tokio::test]
    async fn the_scrape_needs_the_cluster_secret_and_get_metrics_is_plain_http() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        let registry = Arc::new(registry("broker", "broker-9"));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let router =
            tonic::transport::Server::builder().accept_http1(true).add_routes(routes(registry, "s3cret"));
        let shutdown = tokio_util::sync::CancellationToken::new();
        tokio::spawn(crate::net::serve_grpc(router, listener, shutdown.clone()));

        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut anonymous = pb::metrics_client::MetricsClient::new(channel.clone());
        let refused = anonymous.scrape(pb::ScrapeRequest {}).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unauthenticated);
        let mut member =
            pb::metrics_client::MetricsClient::with_interceptor(channel, secret::Attach::new("s3cret"));
        let families = member.scrape(pb::ScrapeRequest {}).await.unwrap().into_inner().families;
        assert!(families.iter().any(|f| f.name == "process_open_fds"), "{families:?}");

        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request = format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        assert!(
            response.to_ascii_lowercase().contains("content-type: text/plain; version=0.0.4"),
            "{response}"
        );
        assert!(response.contains("process_open_fds{role=\"broker\",id=\"broker-9\"}"), "{response}");
        shutdown.cancel();
    }
}
