//! Health checks: grpc.health.v1 `Check` on every member, every `[master] health_interval`.
//!
//! A member that fails `[master] health_failures` checks in a row (no answer within the
//! interval, an error, or NOT_SERVING) leaves the membership; in supervise mode the supervisor
//! is told, kills it and respawns it. The health of every checked member (healthy since when,
//! misses in a row) is published on a watch channel for the ready signal (`Master::ready`), the
//! supervisor (backoff reset, rolling restart) and the status API.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;
use sc_common::membership::Severity;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::central_log::CentralLog;
use crate::registry::Registry;

/// A member process: its id and pid.
pub(crate) type Instance = (String, u32);

/// The health of every checked member process.
pub(crate) type HealthMap = BTreeMap<Instance, Health>;

/// What the checks say about one member process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Health {
    /// Passing every check since then; `None` until the first pass and after a miss.
    pub(crate) healthy_since: Option<Instant>,
    /// Failed checks in a row.
    pub(crate) misses: u32,
}

/// The checker's settings and outputs.
#[derive(Debug)]
pub(crate) struct Checker {
    pub(crate) registry: Arc<Registry>,
    pub(crate) log: Arc<CentralLog>,
    pub(crate) interval: Duration,
    pub(crate) failures: u32,
    /// Members removed for failing their checks, for the supervisor to kill.
    pub(crate) failed: mpsc::UnboundedSender<Instance>,
    /// The health of every registered member.
    pub(crate) healthy: watch::Sender<HealthMap>,
}

/// Why one health check failed.
#[derive(Debug, thiserror::Error)]
enum CheckFailed {
    #[error("not serving")]
    NotServing,
    #[error("{}", .0.message())]
    Refused(tonic::Status),
    #[error("no answer within {0:?}")]
    NoAnswer(Duration),
}

struct Target {
    grpc: String,
    client: HealthClient<Channel>,
    misses: u32,
}

impl Checker {
    /// Checks every member each interval until `shutdown`.
    pub(crate) async fn run(self, shutdown: CancellationToken) {
        let mut targets: HashMap<Instance, Target> = HashMap::new();
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let snapshot = self.registry.snapshot();
            let live: BTreeSet<Instance> = snapshot.members.iter().map(|m| (m.id.clone(), m.pid)).collect();
            targets.retain(|instance, _| live.contains(instance));
            self.healthy.send_if_modified(|healthy| {
                let before = healthy.len();
                healthy.retain(|instance, _| live.contains(instance));
                healthy.len() != before
            });
            for member in &snapshot.members {
                let instance = (member.id.clone(), member.pid);
                let stale = targets.get(&instance).is_some_and(|t| t.grpc != member.grpc);
                if stale || !targets.contains_key(&instance) {
                    let Ok(endpoint) = Endpoint::from_shared(format!("http://{}", member.grpc)) else {
                        continue;
                    };
                    let channel = endpoint.connect_timeout(self.interval).connect_lazy();
                    let target =
                        Target { grpc: member.grpc.clone(), client: HealthClient::new(channel), misses: 0 };
                    targets.insert(instance, target);
                }
            }
            let timeout = self.interval;
            let checks = targets.iter_mut().map(|(instance, target)| async move {
                let request = HealthCheckRequest { service: String::new() };
                let outcome = tokio::time::timeout(timeout, target.client.check(request)).await;
                let verdict = match outcome {
                    Ok(Ok(response)) if response.get_ref().status == ServingStatus::Serving as i32 => Ok(()),
                    Ok(Ok(_)) => Err(CheckFailed::NotServing),
                    Ok(Err(status)) => Err(CheckFailed::Refused(status)),
                    Err(_) => Err(CheckFailed::NoAnswer(timeout)),
                };
                (instance, target, verdict)
            });
            for (instance, target, verdict) in join_all(checks).await {
                match verdict {
                    Ok(()) => {
                        target.misses = 0;
                        self.healthy.send_if_modified(|healthy| {
                            let health = healthy.entry(instance.clone()).or_default();
                            let before = *health;
                            health.misses = 0;
                            health.healthy_since.get_or_insert_with(Instant::now);
                            *health != before
                        });
                    }
                    Err(why) => {
                        target.misses += 1;
                        let misses = target.misses;
                        self.healthy.send_modify(|healthy| {
                            let health = healthy.entry(instance.clone()).or_default();
                            health.misses = misses;
                            health.healthy_since = None;
                        });
                        tracing::debug!(id = %instance.0, misses = target.misses, %why, "health check failed");
                        if target.misses == self.failures
                            && self.registry.remove(&instance.0, Some(instance.1))
                        {
                            self.log.master(
                                Severity::Error,
                                format!(
                                    "{} (pid {}) failed {} health checks in a row ({why}), removed from the membership",
                                    instance.0, instance.1, self.failures
                                ),
                            );
                            let _ = self.failed.send(instance.clone());
                        }
                    }
                }
            }
        }
    }
}
