//! sc-broker: pub/sub and the exchange data for one shard of channels and keys.
//!
//! Workers attach one gRPC stream each (`sc.broker.v1.Broker/Attach`) and subscribe the
//! channels their sockets hold; a publish arriving on any stream is delivered to every subscribed
//! stream, the publisher's own included. Which broker owns a channel is the workers' decision
//! (rendezvous hashing over the live brokers, see `sc_common::rendezvous`); the broker serves
//! whatever it is sent. It registers with the master and serves grpc.health.v1 on the same port,
//! with its metrics (`sc.metrics.v1`, for the master) and Prometheus text at `GET /metrics`
//! (`metrics`).
//!
//! Workers also report the members of presence channels on their streams (`presence`): the
//! broker that owns such a channel answers who is in it and publishes join and leave events on
//! `#presence/<channel>`, and drops a worker's members when its stream ends.
//!
//! The exchange data lives in a `store`: this broker's memory, whose keys follow their owner
//! when the broker membership changes (`handover`: pulled before serving, pushed when held
//! but not owned), or Redis.
//!
//! Entry points: [`Broker::bind`], then [`Broker::serve`].

#![warn(missing_docs)]

mod exchange;
mod grpc;
mod handover;
mod metrics;
mod presence;
mod redis;
mod router;
mod store;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use sc_common::config::{BrokerBackend, Config};
use sc_common::membership::{Event, Member, Role, default_id};
use sc_common::{MasterLink, net};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub use sc_common::Error;

/// The longest a leaving broker keeps serving after it left the membership. It stops sooner
/// once every worker closed its stream, which workers do a break delay after they saw it leave
/// (so nothing in flight to it is lost).
pub const DRAIN: Duration = Duration::from_secs(6);

/// Drops expired exchange keys every second.
async fn sweep(exchange: Arc<exchange::Exchange>, stopped: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = stopped.cancelled() => return,
            _ = tick.tick() => {
                let swept = exchange.sweep();
                if swept > 0 {
                    tracing::trace!(swept, "expired keys dropped");
                }
            }
        }
    }
}

/// A broker with its listener bound.
#[derive(Debug)]
pub struct Broker {
    config: Config,
    id: String,
    listener: TcpListener,
    addr: SocketAddr,
}

impl Broker {
    /// Binds the gRPC listener (`[broker] listen`).
    pub async fn bind(config: Config) -> Result<Self, Error> {
        let id = config.broker.id.clone().unwrap_or_else(|| default_id(Role::Broker));
        let listener = net::bind(config.broker.listen).await?;
        let addr = listener.local_addr()?;
        Ok(Self { config, id, listener, addr })
    }

    /// The bound gRPC address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves until `shutdown` is cancelled. `events` feeds the central log (if a master is
    /// configured).
    pub async fn serve(
        self,
        events: mpsc::Receiver<Event>,
        shutdown: CancellationToken,
    ) -> Result<(), Error> {
        let secret = &self.config.cluster.secret;
        let message_limit = self.config.grpc_message_limit();
        let exchange = Arc::new(exchange::Exchange::default());
        // Cancelled once this broker leaves on purpose: from then on it owns no exchange key.
        let leaving = CancellationToken::new();
        let (mover, closed) = handover::Mover::new(
            self.id.clone(),
            secret.clone(),
            message_limit,
            exchange.clone(),
            leaving.clone(),
        )
        .await;
        // The worker streams and the gRPC server outlive `shutdown` by the drain period.
        let stopped = CancellationToken::new();
        let queue = self.config.broker.worker_queue;
        let routes = Arc::new(router::Router::new(queue));
        let presence = Arc::new(presence::Presence::default());
        let (store, bridge) = match self.config.broker.backend {
            BrokerBackend::Memory => {
                (store::Store::Memory { exchange: exchange.clone(), gate: mover.gate() }, None)
            }
            BrokerBackend::Redis => {
                let cluster_id =
                    self.config.broker.cluster_id.clone().unwrap_or_else(|| {
                        format!("{}-{}-{}", self.id, std::process::id(), sc_common::now_ms())
                    });
                // Redis may start after the cluster: wait for it (the broker registers, and so
                // takes channels, only once it is connected).
                let urls = &self.config.broker.redis_url;
                let mut backoff =
                    sc_common::membership::Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
                let (kv, bridge) = loop {
                    match redis::connect(urls, cluster_id.clone(), routes.clone(), stopped.clone()).await {
                        Ok(connected) => break connected,
                        Err(e) => tracing::error!(error = %e, "cannot connect to redis, retrying"),
                    }
                    tokio::select! {
                        _ = shutdown.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(backoff.next_delay()) => {}
                    }
                };
                let watcher = bridge.clone();
                routes.watch_channels(Box::new(move |channel, held| watcher.held(channel, held)));
                (store::Store::Redis(kv), Some(bridge))
            }
        };
        let memory = matches!(store, store::Store::Memory { .. });
        if let Some(url) = &self.config.broker.master {
            let advertise_ip = self.config.cluster.advertise_ip;
            let me = Member::this_process(
                Role::Broker,
                &self.id,
                self.addr,
                None,
                String::new(),
                advertise_ip,
                url,
            );
            let link = MasterLink::new(url, secret, me, vec![Role::Broker])?;
            let members = link.spawn(events, shutdown.clone());
            if memory {
                tokio::spawn(mover.clone().run(members, closed, stopped.clone()));
            } else {
                // Redis holds the data: nothing moves between brokers.
                drop(closed);
            }
        } else {
            // Alone: no other broker to pull keys from.
            drop(closed);
        }
        let registry =
            Arc::new(metrics::registry(&self.id, routes.clone(), exchange.clone(), bridge.clone()));
        let service = grpc::BrokerService {
            router: routes.clone(),
            store,
            queue,
            shutdown: stopped.clone(),
            message_limit,
            bridge,
            presence: presence.clone(),
        };
        tokio::spawn(sweep(exchange, stopped.clone()));
        let (health_reporter, health) = net::health();
        let router = tonic::transport::Server::builder()
            .accept_http1(true)
            .add_routes(sc_common::metrics::routes(registry, secret))
            .add_service(health)
            .add_service(service.into_server(secret));
        tracing::info!(id = %self.id, addr = %self.addr, "broker listening");
        // Graceful leave: out of the membership first, so that workers move their channels (they
        // keep their streams to this broker open a little longer, for publishes already on the
        // way), then serve on for the drain period, then stop.
        let draining = {
            let (master, secret, id) = (self.config.broker.master.clone(), secret.clone(), self.id.clone());
            let stopped = stopped.clone();
            async move {
                shutdown.cancelled().await;
                // Leaving: the workers move their channels away and close their streams, which
                // is no member leaving a channel.
                presence.quiet();
                health_reporter.set_service_status("", tonic_health::ServingStatus::NotServing).await;
                if let Some(url) = master {
                    sc_common::deregister(&url, &secret, &id, std::process::id(), Duration::from_secs(2))
                        .await;
                    // Its exchange keys go to their new owners (who also pull them when they
                    // see it leave); late writes from workers still on the way go too.
                    leaving.cancel();
                    mover.push().await;
                    let deadline = tokio::time::Instant::now() + DRAIN;
                    while routes.stream_count() > 0 && tokio::time::Instant::now() < deadline {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    mover.push().await;
                }
                stopped.cancel();
            }
        };
        tokio::spawn(draining);
        net::serve_grpc(router, self.listener, stopped).await
    }
}
