//! sc-balancer: the cluster's public listener.
//!
//! It accepts client connections on `[balancer] listen`, picks a worker by rendezvous hashing
//! of the client IP over the live workers (so a client keeps its worker while the membership is
//! unchanged, and only the clients of a worker that leaves move), connects to it (the next in
//! rendezvous order if it refuses), writes a PROXY v2 header with the real client address and
//! then forwards bytes both ways without parsing them ([`forward`]). It watches the worker
//! membership through the master and serves grpc.health.v1.
//!
//! Entry points: [`Balancer::bind`], then [`Balancer::serve`].

pub mod forward;

use std::net::SocketAddr;
use std::time::Duration;

use sc_common::config::Config;
use sc_common::membership::{Event, MasterLink, Member, Membership, Role};
use sc_common::{Error, daemon, proxy_protocol, rendezvous};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// A balancer with its listeners bound.
#[derive(Debug)]
pub struct Balancer {
    config: Config,
    id: String,
    listener: TcpListener,
    grpc: TcpListener,
}

/// A worker a connection can go to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub id: String,
    pub addr: String,
}

impl Balancer {
    /// Binds the public listener (`[balancer] listen`) and the gRPC health listener
    /// (`[balancer] grpc_listen`).
    pub async fn bind(config: Config) -> Result<Self, Error> {
        let id = config.balancer.id.clone().unwrap_or_else(|| daemon::default_id(Role::Balancer));
        let listener = daemon::bind(config.balancer.listen).await?;
        let grpc = daemon::bind(config.balancer.grpc_listen).await?;
        Ok(Self { config, id, listener, grpc })
    }

    /// The bound public address.
    pub fn local_addr(&self) -> Result<SocketAddr, Error> {
        Ok(self.listener.local_addr()?)
    }

    /// Serves until `shutdown`: stops accepting at once, lets open connections finish within
    /// the caller's grace period. `events` feeds the master's central log.
    pub async fn serve(
        self,
        events: mpsc::Receiver<Event>,
        shutdown: CancellationToken,
    ) -> Result<(), Error> {
        let addr = self.local_addr()?;
        let grpc_addr = self.grpc.local_addr()?;
        let workers = match &self.config.balancer.master {
            Some(url) => {
                let advertise_ip = self.config.cluster.advertise_ip;
                let me = Member {
                    role: Role::Balancer,
                    id: self.id.clone(),
                    grpc: daemon::advertised(grpc_addr, advertise_ip, Some(url)).to_string(),
                    public: daemon::advertised(addr, advertise_ip, Some(url)).to_string(),
                    unix: String::new(),
                    pid: std::process::id(),
                };
                let link = MasterLink::new(url, &self.config.cluster.secret, me, vec![Role::Worker])?;
                link.spawn(events, shutdown.clone())
            }
            None => {
                tracing::warn!("no [balancer] master configured: no workers to forward to");
                watch::channel(Membership::default()).1
            }
        };

        let (health_reporter, health) = daemon::health();
        let grpc = tonic::transport::Server::builder().add_service(health);
        let grpc_task = tokio::spawn(daemon::serve_grpc(grpc, self.grpc, shutdown.clone()));

        tracing::info!(id = %self.id, %addr, grpc = %grpc_addr, "balancer listening");
        let connect_timeout = self.config.balancer.connect_timeout;
        let tracker = TaskTracker::new();
        loop {
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => break,
                accepted = self.listener.accept() => accepted,
            };
            match accepted {
                Ok((client, remote)) => {
                    let workers = workers.clone();
                    tracker.spawn(handle(client, remote, addr, workers, connect_timeout));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        // Stop accepting first; forwarded connections run on until their workers close them
        // (the master drains the workers right after the balancers), within the grace period.
        drop(self.listener);
        health_reporter.set_service_status("", tonic_health::ServingStatus::NotServing).await;
        tracker.close();
        tracker.wait().await;
        let _ = grpc_task.await;
        tracing::info!(id = %self.id, "balancer stopped");
        Ok(())
    }
}

/// The workers in rendezvous order for a client IP: the owner first, then the fallbacks.
pub fn ranked_targets(membership: &Membership, client: SocketAddr) -> Vec<Target> {
    let workers: Vec<&Member> = membership.with_role(Role::Worker).collect();
    let key = client.ip().to_string();
    let ids = rendezvous::ranked(workers.iter().map(|m| m.id.as_str()), key.as_bytes());
    ids.into_iter()
        .filter_map(|id| workers.iter().find(|m| m.id == id))
        .map(|m| Target { id: m.id.clone(), addr: m.public.clone() })
        .collect()
}

async fn handle(
    client: TcpStream,
    remote: SocketAddr,
    local: SocketAddr,
    mut workers: watch::Receiver<Membership>,
    connect_timeout: Duration,
) {
    let _ = client.set_nodelay(true);
    // Right after start-up the membership may still be empty: wait a little for workers.
    let deadline = tokio::time::Instant::now() + connect_timeout;
    let targets = loop {
        let targets = ranked_targets(&workers.borrow_and_update(), remote);
        if !targets.is_empty() {
            break targets;
        }
        if tokio::time::timeout_at(deadline, workers.changed()).await.is_err() {
            tracing::debug!(%remote, "no live worker, dropping connection");
            return;
        }
    };
    let header = proxy_protocol::encode(remote, local, false);
    for target in targets {
        let connect = tokio::time::timeout(connect_timeout, TcpStream::connect(&target.addr)).await;
        let mut worker = match connect {
            Ok(Ok(worker)) => worker,
            Ok(Err(e)) => {
                tracing::debug!(worker = %target.id, error = %e, "worker refused, trying the next");
                continue;
            }
            Err(_) => {
                tracing::debug!(worker = %target.id, "worker connect timed out, trying the next");
                continue;
            }
        };
        let _ = worker.set_nodelay(true);
        if worker.write_all(&header).await.is_err() {
            continue;
        }
        tracing::debug!(%remote, worker = %target.id, "forwarding");
        if let Err(e) = forward::forward(&client, &worker).await {
            tracing::debug!(%remote, error = %e, "connection ended with an error");
        }
        return;
    }
    tracing::debug!(%remote, "every worker refused, dropping connection");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workers(ids: &[&str]) -> Membership {
        let members = ids
            .iter()
            .enumerate()
            .map(|(i, id)| Member {
                role: Role::Worker,
                id: (*id).into(),
                grpc: String::new(),
                public: format!("127.0.0.1:{}", 9000 + i),
                unix: String::new(),
                pid: 1,
            })
            .collect();
        Membership { epoch: 1, members }
    }

    #[test]
    fn same_ip_same_worker_and_only_the_leavers_clients_move() {
        let all = workers(&["worker-0", "worker-1", "worker-2"]);
        let fewer = workers(&["worker-0", "worker-2"]);
        let mut moved = 0;
        for i in 0..300u32 {
            let ip = std::net::Ipv4Addr::from(0x0a00_0000 + i);
            let client = SocketAddr::new(ip.into(), 5000);
            let first = ranked_targets(&all, client);
            assert_eq!(first.len(), 3);
            let other_port = SocketAddr::new(ip.into(), 6000);
            assert_eq!(first[0].id, ranked_targets(&all, other_port)[0].id, "port does not matter");
            let after = &ranked_targets(&fewer, client)[0];
            if first[0].id == "worker-1" {
                moved += 1;
                assert_eq!(after.id, first[1].id, "a moved client goes to its next choice");
            } else {
                assert_eq!(after.id, first[0].id);
            }
        }
        assert!(moved > 50 && moved < 150, "{moved}");
    }
}
