//! The master's side of `sc.metrics.v1.Metrics/Scrape` (the edge where the generated metrics
//! types become [`Figures`]): one lazily connected client per member process, every member
//! asked in parallel within a deadline, with the cluster secret as bearer.

use std::collections::HashMap;
use std::time::Duration;

use futures_util::future::join_all;
use sc_common::membership::Member;
use sc_common::secret::Attach;
use sc_proto::metrics::v1 as pb;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use super::Scraped;
use crate::health::Instance;

type Client = pb::metrics_client::MetricsClient<InterceptedService<Channel, Attach>>;

/// The figures of one member that the admin page charts (0 for a family it does not have), and
/// the state of a broker's link to Redis, which `/status` shows.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct Figures {
    /// `sc_connections_open`, summed over its labels (transport).
    pub(crate) connections_open: f64,
    /// `sc_messages_received_total`.
    pub(crate) messages_received: f64,
    /// `sc_messages_sent_total`.
    pub(crate) messages_sent: f64,
    /// `sc_broker_publishes_total`.
    pub(crate) publishes: f64,
    /// `sc_broker_deliveries_total`.
    pub(crate) deliveries: f64,
    /// `sc_broker_redis_up` (1 or 0): `None` for a member without a link to Redis.
    pub(crate) redis_up: Option<f64>,
    /// `sc_broker_redis_down_since_seconds`: when its Redis outage began (0 while up).
    pub(crate) redis_down_since: f64,
}

/// The scrape clients of the live member processes.
#[derive(Debug)]
pub(crate) struct Clients {
    attach: Attach,
    deadline: Duration,
    /// Per member process: its gRPC address and a client of it.
    clients: HashMap<Instance, (String, Client)>,
}

impl Figures {
    /// The figures in one Scrape answer: each family the page uses, summed over its samples.
    pub(crate) fn from_scrape(response: &pb::ScrapeResponse) -> Self {
        let mut figures = Self::default();
        for family in &response.families {
            let sum = || family.samples.iter().map(|s| s.value).filter(|v| v.is_finite()).sum::<f64>();
            let slot = match family.name.as_str() {
                "sc_connections_open" => &mut figures.connections_open,
                "sc_messages_received_total" => &mut figures.messages_received,
                "sc_messages_sent_total" => &mut figures.messages_sent,
                "sc_broker_publishes_total" => &mut figures.publishes,
                "sc_broker_deliveries_total" => &mut figures.deliveries,
                "sc_broker_redis_down_since_seconds" => &mut figures.redis_down_since,
                "sc_broker_redis_up" => {
                    figures.redis_up = Some(sum());
                    continue;
                }
                _ => continue,
            };
            *slot += sum();
        }
        figures
    }
}

impl Clients {
    /// No clients yet; each scrape sends `secret` and may take `deadline`.
    pub(crate) fn new(secret: &str, deadline: Duration) -> Self {
        Self { attach: Attach::new(secret), deadline, clients: HashMap::new() }
    }

    /// Scrapes every member in parallel. A member that does not serve Scrape (UNIMPLEMENTED:
    /// a daemon without metrics), fails or does not answer within the deadline gives `None`.
    pub(crate) async fn scrape_all(&mut self, members: &[Member]) -> Vec<Scraped> {
        self.clients.retain(|instance, (grpc, _)| {
            members.iter().any(|m| m.id == instance.0 && m.pid == instance.1 && &m.grpc == grpc)
        });
        for member in members {
            let instance = (member.id.clone(), member.pid);
            if self.clients.contains_key(&instance) {
                continue;
            }
            let Ok(endpoint) = Endpoint::from_shared(format!("http://{}", member.grpc)) else { continue };
            let channel = endpoint.connect_timeout(self.deadline).connect_lazy();
            let client = pb::metrics_client::MetricsClient::with_interceptor(channel, self.attach.clone());
            self.clients.insert(instance, (member.grpc.clone(), client));
        }
        let deadline = self.deadline;
        let asks = members.iter().map(|member| {
            let instance = (member.id.clone(), member.pid);
            let client = self.clients.get(&instance).map(|(_, client)| client.clone());
            async move {
                let figures = match client {
                    Some(mut client) => {
                        match tokio::time::timeout(deadline, client.scrape(pb::ScrapeRequest {})).await {
                            Ok(Ok(response)) => Some(Figures::from_scrape(response.get_ref())),
                            Ok(Err(status)) if status.code() == tonic::Code::Unimplemented => None,
                            Ok(Err(status)) => {
                                tracing::debug!(id = %instance.0, error = %status, "scrape failed");
                                None
                            }
                            Err(_) => {
                                tracing::debug!(id = %instance.0, ?deadline, "scrape timed out");
                                None
                            }
                        }
                    }
                    None => None,
                };
                (instance, member.role, figures)
            }
        });
        join_all(asks).await
    }
}
