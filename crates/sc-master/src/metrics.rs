//! The master's own figures and the whole cluster's `/metrics`: the master side of the
//! `sc.metrics.v1` contract (the only module of the master that touches its types).
//!
//! `GET /metrics` on the admin listener ([`ClusterMetrics::text`]) scrapes every registered
//! member over gRPC, in parallel and within [`SCRAPE_TIMEOUT`]; a member that does not answer
//! in time is left out of that answer and counted in `sc_scrape_errors_total`. Every member
//! sample is labelled with the member's `role` and `id` (the member's own labels of that name
//! are replaced), the master's own samples with `role="master"`, and families of the same name
//! are merged so each appears once. The result is encoded by prometheus-client ([`Gathered`]
//! is a `Collector` of the gathered families), not by hand.
//!
//! The master's own figures: the restarts of its children by role and cause
//! (`sc_child_restarts_total`, counted by the supervisor in [`crate::supervisor::Children`]),
//! the failed scrapes, and the process figures.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use sc_common::membership::{Member, Role};
use sc_common::secret::Attach;
use sc_proto::metrics::v1 as pb;
use tonic::transport::Endpoint;

use crate::registry::Registry as Members;
use crate::supervisor::Children;

/// How long the master waits for a member's figures.
pub(crate) const SCRAPE_TIMEOUT: Duration = Duration::from_secs(2);

/// The causes of `sc_child_restarts_total`, as the supervisor counts them.
const RESTART_CAUSES: [&str; 4] = ["exit", "health_check", "spawn_failed", "rolling_restart"];

/// The labels of a failed scrape: the member's role and id.
type ScrapeLabels = [(&'static str, String); 2];

/// The master's registry and what it needs to gather the members' figures.
#[derive(Debug)]
pub(crate) struct ClusterMetrics {
    registry: Registry,
    scrape_errors: Family<ScrapeLabels, Counter>,
    members: Arc<Members>,
    secret: String,
}

/// Metric families gathered from several processes, as one registry's collector.
#[derive(Debug)]
struct Gathered(Vec<pb::Family>);

impl ClusterMetrics {
    /// The master's figures (its children's restarts from `children`), and the members of
    /// `members` to scrape with the cluster `secret`.
    pub(crate) fn new(children: &Children, members: Arc<Members>, secret: String) -> Self {
        let mut registry = sc_common::metrics::registry("master", "master");
        // Every series at zero from the start, so that an alert on its rate has a baseline.
        let restarts = children.restart_counts();
        for role in [Role::Balancer, Role::Worker, Role::Broker] {
            for cause in RESTART_CAUSES {
                restarts.get_or_create_owned(&[("child_role", role.as_str()), ("cause", cause)]);
            }
        }
        registry.register(
            "sc_child_restarts",
            "Child processes restarted by the master, by the child's role and the cause (exit: it exited or crashed; health_check: killed after failing its health checks; spawn_failed: it could not be started; rolling_restart: replaced)",
            children.restart_counts(),
        );
        let scrape_errors = Family::<ScrapeLabels, Counter>::default();
        registry.register(
            "sc_scrape_errors",
            "Members whose figures the master could not gather for /metrics (no answer in time, or an error)",
            scrape_errors.clone(),
        );
        Self { registry, scrape_errors, members, secret }
    }

    /// The whole cluster's figures as Prometheus text: every member's, scraped now, and the
    /// master's own.
    pub(crate) async fn text(&self) -> String {
        let members = self.members.snapshot();
        let scrapes = members.members.iter().map(|member| async move {
            let scraped = tokio::time::timeout(SCRAPE_TIMEOUT, scrape(member, &self.secret)).await;
            (member, scraped)
        });
        let mut gathered = Gathered(Vec::new());
        let mut index = HashMap::new();
        for (member, scraped) in join_all(scrapes).await {
            match scraped {
                Ok(Ok(response)) => gathered.merge(&mut index, response, member.role.as_str(), &member.id),
                outcome => {
                    let why = match outcome {
                        Ok(Err(status)) => status.message().to_owned(),
                        _ => format!("no answer within {SCRAPE_TIMEOUT:?}"),
                    };
                    tracing::debug!(id = %member.id, grpc = %member.grpc, %why, "metrics scrape failed");
                    let labels =
                        [("member_role", member.role.as_str().to_owned()), ("member", member.id.clone())];
                    self.scrape_errors.get_or_create(&labels).inc();
                }
            }
        }
        let own = sc_common::metrics::scrape(&self.registry);
        gathered.merge(&mut index, own, "master", "master");
        let mut registry = Registry::default();
        registry.register_collector(Box::new(gathered));
        sc_common::metrics::text(&registry)
    }
}

impl Gathered {
    /// Adds `response`'s families, every sample labelled `role` and `id`, to those of the same
    /// name already gathered (`index`: position by name).
    fn merge(
        &mut self,
        index: &mut HashMap<String, usize>,
        response: pb::ScrapeResponse,
        role: &str,
        id: &str,
    ) {
        for mut family in response.families {
            for sample in &mut family.samples {
                sample.labels.retain(|l| l.name != "role" && l.name != "id");
                sample.labels.insert(0, pb::Label { name: "id".into(), value: id.to_owned() });
                sample.labels.insert(0, pb::Label { name: "role".into(), value: role.to_owned() });
            }
            match index.get(&family.name) {
                Some(&at) => {
                    let known = &mut self.0[at];
                    // Two processes that disagree on a family's type: the first one wins.
                    if known.kind == family.kind {
                        known.samples.append(&mut family.samples);
                    }
                }
                None => {
                    index.insert(family.name.clone(), self.0.len());
                    self.0.push(family);
                }
            }
        }
    }
}

impl Collector for Gathered {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        for family in &self.0 {
            let kind = pb::Kind::try_from(family.kind).unwrap_or(pb::Kind::Unspecified);
            let (metric_type, name) = match kind {
                // The encoder adds the suffix again.
                pb::Kind::Counter => {
                    (MetricType::Counter, family.name.strip_suffix("_total").unwrap_or(&family.name))
                }
                pb::Kind::Gauge => (MetricType::Gauge, family.name.as_str()),
                pb::Kind::Histogram => (MetricType::Histogram, family.name.as_str()),
                pb::Kind::Unspecified => (MetricType::Unknown, family.name.as_str()),
            };
            let mut metric = encoder.encode_descriptor(name, &family.help, None, metric_type)?;
            for sample in &family.samples {
                let labels: Vec<(&str, &str)> =
                    sample.labels.iter().map(|l| (l.name.as_str(), l.value.as_str())).collect();
                let mut sample_encoder = metric.encode_family(&labels)?;
                match kind {
                    pb::Kind::Counter => {
                        sample_encoder.encode_counter::<NoLabelSet, _, f64>(&sample.value, None)?
                    }
                    pb::Kind::Histogram => {
                        // The contract's buckets are cumulative; the encoder wants each bucket's own.
                        let mut below = 0;
                        let buckets: Vec<(f64, u64)> = sample
                            .buckets
                            .iter()
                            .map(|b| {
                                let own = b.count.saturating_sub(below);
                                below = b.count;
                                (b.upper_bound, own)
                            })
                            .collect();
                        sample_encoder.encode_histogram::<NoLabelSet>(
                            sample.sum,
                            sample.count,
                            &buckets,
                            None,
                        )?;
                    }
                    pb::Kind::Gauge | pb::Kind::Unspecified => sample_encoder.encode_gauge(&sample.value)?,
                }
            }
        }
        Ok(())
    }
}

/// One member's figures over `sc.metrics.v1`.
async fn scrape(member: &Member, secret: &str) -> Result<pb::ScrapeResponse, tonic::Status> {
    let endpoint = Endpoint::from_shared(format!("http://{}", member.grpc))
        .map_err(|e| tonic::Status::invalid_argument(e.to_string()))?
        .connect_timeout(SCRAPE_TIMEOUT);
    let channel = endpoint.connect().await.map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let mut client = pb::metrics_client::MetricsClient::with_interceptor(channel, Attach::new(secret));
    Ok(client.scrape(pb::ScrapeRequest {}).await?.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counter(name: &str, value: f64, labels: &[(&str, &str)]) -> pb::Family {
        pb::Family {
            name: name.into(),
            help: "Help.".into(),
            kind: pb::Kind::Counter as i32,
            samples: vec![pb::Sample {
                labels: labels
                    .iter()
                    .map(|(n, v)| pb::Label { name: (*n).into(), value: (*v).into() })
                    .collect(),
                value,
                ..Default::default()
            }],
        }
    }

    #[test]
    fn families_of_several_processes_appear_once_labelled_by_member() {
        let mut gathered = Gathered(Vec::new());
        let mut index = HashMap::new();
        let worker = |value| pb::ScrapeResponse {
            families: vec![counter("sc_messages_sent_total", value, &[("role", "worker"), ("id", "x")])],
        };
        gathered.merge(&mut index, worker(5.0), "worker", "worker-0");
        gathered.merge(&mut index, worker(7.0), "worker", "worker-1");
        let histogram = pb::Family {
            name: "sc_handshake_duration_seconds".into(),
            help: "Latency.".into(),
            kind: pb::Kind::Histogram as i32,
            samples: vec![pb::Sample {
                buckets: vec![
                    pb::Bucket { upper_bound: 0.1, count: 1 },
                    pb::Bucket { upper_bound: 1.0, count: 3 },
                    pb::Bucket { upper_bound: f64::INFINITY, count: 4 },
                ],
                sum: 2.5,
                count: 4,
                ..Default::default()
            }],
        };
        gathered.merge(&mut index, pb::ScrapeResponse { families: vec![histogram] }, "worker", "worker-0");
        let mut registry = Registry::default();
        registry.register_collector(Box::new(gathered));
        let text = sc_common::metrics::text(&registry);
        assert_eq!(text.matches("# TYPE sc_messages_sent_total counter").count(), 1, "{text}");
        assert!(text.contains("sc_messages_sent_total{role=\"worker\",id=\"worker-0\"} 5.0\n"), "{text}");
        assert!(text.contains("sc_messages_sent_total{role=\"worker\",id=\"worker-1\"} 7.0\n"), "{text}");
        assert!(!text.contains("id=\"x\""), "the member's own id label is replaced: {text}");
        assert!(text.contains("# HELP sc_messages_sent_total Help.\n"), "{text}");
        assert!(
            text.contains(
                "sc_handshake_duration_seconds_bucket{role=\"worker\",id=\"worker-0\",le=\"1\"} 3\n"
            ),
            "cumulative again: {text}"
        );
        assert!(text.contains("le=\"+Inf\"} 4\n"), "{text}");
        assert_eq!(text.matches("le=\"+Inf\"").count(), 1, "{text}");
        assert!(
            text.contains("sc_handshake_duration_seconds_count{role=\"worker\",id=\"worker-0\"} 4\n"),
            "{text}"
        );
    }
}
