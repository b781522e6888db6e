//! sc-worker: the SocketCluster server of the cluster.
//!
//! Balancers forward client connections here (with a PROXY v2 header carrying the real client
//! address). The worker serves HTTP with hyper, upgrades `[worker] path` to WebSocket
//! (tungstenite) and speaks the SocketCluster protocol ([`protocol`], [`socket`]). Channels are
//! fanned out locally ([`hub`]) and shared with the other workers through the brokers
//! ([`brokers`]): one broker subscription per channel per worker, one encode per message.
//! It registers with the master, watches the broker membership and serves grpc.health.v1.
//!
//! Entry points: [`Worker::bind`], then [`Worker::serve`].

pub mod brokers;
pub mod http;
pub mod hub;
pub mod outbox;
pub mod protocol;
pub mod socket;

use std::net::SocketAddr;
use std::sync::Arc;

use sc_common::config::Config;
use sc_common::daemon;
use sc_common::membership::{Event, MasterLink, Member, Role};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use sc_common::Error;

/// A worker with its listeners bound.
#[derive(Debug)]
pub struct Worker {
    config: Config,
    id: String,
    listener: TcpListener,
    grpc: TcpListener,
}

impl Worker {
    /// Binds the HTTP/WebSocket listener (`[worker] listen`) and the gRPC health listener
    /// (`[worker] grpc_listen`).
    pub async fn bind(config: Config) -> Result<Self, Error> {
        let id = config
            .worker
            .id
            .clone()
            .unwrap_or_else(|| daemon::default_id(Role::Worker));
        let listener = daemon::bind(config.worker.listen).await?;
        let grpc = daemon::bind(config.worker.grpc_listen).await?;
        Ok(Self {
            config,
            id,
            listener,
            grpc,
        })
    }

    /// The bound HTTP/WebSocket address.
    pub fn local_addr(&self) -> Result<SocketAddr, Error> {
        Ok(self.listener.local_addr()?)
    }

    /// The bound gRPC (health) address.
    pub fn grpc_addr(&self) -> Result<SocketAddr, Error> {
        Ok(self.grpc.local_addr()?)
    }

    /// Serves until `shutdown` is cancelled, then closes every socket with a reconnect code.
    /// `events` feeds the master's central log.
    pub async fn serve(
        self,
        events: mpsc::Receiver<Event>,
        shutdown: CancellationToken,
    ) -> Result<(), Error> {
        let addr = self.local_addr()?;
        let grpc_addr = self.grpc_addr()?;
        let pool = brokers::BrokerPool::new(self.id.clone(), self.config.cluster.secret.clone());
        let hub = Arc::new(hub::Hub::new(pool));

        if let Some(url) = &self.config.worker.master {
            let me = Member {
                role: Role::Worker,
                id: self.id.clone(),
                grpc: grpc_addr.to_string(),
                public: addr.to_string(),
                unix: String::new(),
                pid: std::process::id(),
            };
            let link = MasterLink::new(url, &self.config.cluster.secret, me, vec![Role::Broker])?;
            let mut members = link.spawn(events, shutdown.clone());
            let hub = hub.clone();
            tokio::spawn(async move {
                loop {
                    let brokers: Vec<(String, String)> = members
                        .borrow_and_update()
                        .with_role(Role::Broker)
                        .map(|m| (m.id.clone(), m.grpc.clone()))
                        .collect();
                    hub.pool().apply(brokers, &hub);
                    if members.changed().await.is_err() {
                        return;
                    }
                }
            });
        } else {
            tracing::warn!("no [worker] master configured: no brokers, so no pub/sub");
        }

        // Sockets are closed only after the listener is gone (see below), so a client that
        // reconnects at once is refused here and goes to another worker instead of waiting in
        // this listener's backlog.
        let close_sockets = CancellationToken::new();
        let shared = Arc::new(socket::Shared::new(
            hub,
            &self.config.worker,
            close_sockets.clone(),
        ));
        let sockets = TaskTracker::new();
        let http = Arc::new(http::Http {
            shared,
            path: http::Http::normalise_path(&self.config.worker.path),
            worker_id: self.id.parse().map_err(|_| {
                Error::Config(format!(
                    "worker.id: {:?} is not a valid header value",
                    self.id
                ))
            })?,
            sockets: sockets.clone(),
            faults: std::env::var(http::FAULTS_ENV).is_ok_and(|v| v == "1"),
        });

        let (health_reporter, health) = daemon::health();
        let grpc = tonic::transport::Server::builder().add_service(health);
        let grpc_task = tokio::spawn(daemon::serve_grpc(grpc, self.grpc, shutdown.clone()));

        tracing::info!(id = %self.id, %addr, grpc = %grpc_addr, path = %self.config.worker.path, "worker listening");
        let tracker = TaskTracker::new();
        loop {
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => break,
                accepted = self.listener.accept() => accepted,
            };
            match accepted {
                Ok((stream, remote)) => {
                    tracker.spawn(http::serve_connection(http.clone(), stream, remote));
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
        // Drain: refuse new connections first, then close every socket with the reconnect-now
        // close, then wait for the close frames to be written (bounded by the caller's grace).
        drop(self.listener);
        health_reporter
            .set_service_status("", tonic_health::ServingStatus::NotServing)
            .await;
        let open = sockets.len();
        close_sockets.cancel();
        tracker.close();
        tracker.wait().await;
        sockets.close();
        sockets.wait().await;
        tracing::info!(id = %self.id, sockets = open, "worker drained");
        let _ = grpc_task.await;
        tracing::info!(id = %self.id, "worker stopped");
        Ok(())
    }
}
