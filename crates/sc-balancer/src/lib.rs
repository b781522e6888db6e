//! sc-balancer: the cluster's public listener.
//!
//! It accepts client connections on its public listener: the one passed by whoever started it
//! (`LISTEN_FDS`: the master in supervise mode, which binds the port once and passes the same
//! socket to every balancer it runs, or systemd socket activation), else `[balancer] listen`,
//! bound here without SO_REUSEPORT, so that a port in use is an error ([`public_listener`]).
//! It ends TLS when `[balancer] tls_cert` is set (`tls`; SIGHUP
//! reloads the certificate), picks a worker by rendezvous hashing of the client IP over the
//! live workers (so a client keeps its worker while the membership is unchanged, and only the
//! clients of a worker that leaves move), connects to it (over its Unix socket when the worker
//! has one on this host, else TCP; the next worker in rendezvous order if it refuses), writes a
//! PROXY v2 header with the real client address and the TLS flag, and then forwards bytes both
//! ways without parsing them (`forward`). It watches the worker membership through the master
//! and serves grpc.health.v1, its metrics (`sc.metrics.v1`, for the master) and Prometheus text at
//! `GET /metrics` on its gRPC listener (`metrics`).
//!
//! Every connection has deadlines before it is useful: a client that sends nothing within
//! `[balancer] first_byte_timeout` (after its TLS handshake, itself bounded by
//! `tls_handshake_timeout`) is dropped before a worker is picked, and one that its worker has
//! not upgraded to WebSocket within `upgrade_timeout` of its accept is closed, whatever it sends
//! (slowloris, idle keep-alive). When the process runs out of file descriptors the accept loop
//! backs off and logs one line a second (`sc_common::net::accept`).
//!
//! Behind a load balancer that sends the PROXY protocol (`[balancer] accept_proxy_protocol`),
//! each connection's header is read right after accept and its source address stands for the
//! client from then on (`inbound`).
//!
//! Entry points: [`Balancer::bind`], then [`Balancer::serve`].

#![warn(missing_docs)]

mod forward;
mod handoff;
mod inbound;
mod metrics;
mod tls;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use sc_common::config::Config;
use sc_common::membership::{Event, Member, Membership, Role, default_id};
use sc_common::per_ip::{Pending, PendingByIp};
use sc_common::{Error, MasterLink, listen_fds, net, proxy_protocol, rendezvous, signal};
use tokio::net::{TcpListener, TcpStream, UnixStream};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The listen queue of the public listener: a burst of reconnecting clients (a worker drained,
/// a balancer restarted) waits there instead of being refused.
const BACKLOG: u32 = 4096;

/// A balancer with its listeners bound.
#[derive(Debug)]
pub struct Balancer {
    config: Config,
    id: String,
    listener: TcpListener,
    grpc: TcpListener,
    tls: Option<Arc<tls::Certificates>>,
}

/// A worker a connection can go to.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Target {
    id: String,
    /// TCP "host:port".
    addr: String,
    /// Its Unix socket path; empty if none.
    unix: String,
}

/// What every connection task shares.
#[derive(Debug)]
struct Shared {
    local: SocketAddr,
    connect_timeout: Duration,
    handshake_timeout: Duration,
    first_byte_timeout: Duration,
    upgrade_timeout: Duration,
    /// Connections per client IP not forwarded yet (`[balancer] max_pending_per_ip`).
    pending: PendingByIp,
    /// Hand-off links to the workers on this host (`[balancer] handoff`); `None`: proxy all.
    links: Option<Arc<handoff::Links>>,
    /// TLS 1.3 connections are handed off too (`[balancer] tls_handoff`).
    tls_handoff: bool,
}

/// The connection to a worker.
enum WorkerStream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Balancer {
    /// Loads the TLS certificate (if configured), takes or binds the public listener (see
    /// [`public_listener`]) and binds the gRPC health listener (`[balancer] grpc_listen`).
    pub async fn bind(config: Config) -> Result<Self, Error> {
        let id = config.balancer.id.clone().unwrap_or_else(|| default_id(Role::Balancer));
        let tls = match (&config.balancer.tls_cert, &config.balancer.tls_key) {
            (Some(cert), Some(key)) => Some(Arc::new(
                tls::Certificates::load(cert, key)
                    .map_err(|e| Error::Config(format!("{}: {e}", e.config_key())))?,
            )),
            _ => None,
        };
        let listener = public_listener(&config)?;
        let grpc = net::bind(config.balancer.grpc_listen).await?;
        Ok(Self { config, id, listener, grpc, tls })
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
                let me = Member::this_process(
                    Role::Balancer,
                    &self.id,
                    grpc_addr,
                    Some(addr),
                    String::new(),
                    advertise_ip,
                    url,
                );
                let link = MasterLink::new(url, &self.config.cluster.secret, me, vec![Role::Worker])?;
                link.spawn(events, shutdown.clone())
            }
            None => {
                tracing::warn!("no [balancer] master configured: no workers to forward to");
                watch::channel(Membership::default()).1
            }
        };

        let (health_reporter, health) = net::health();
        let registry = Arc::new(metrics::registry(&self.id));
        let grpc = tonic::transport::Server::builder()
            .accept_http1(true)
            .add_routes(sc_common::metrics::routes(registry, &self.config.cluster.secret))
            .add_service(health);
        let grpc_task = tokio::spawn(net::serve_grpc(grpc, self.grpc, shutdown.clone()));
        tokio::spawn(reload_on_sighup(self.tls.clone(), shutdown.clone()));

        let shared = Arc::new(Shared {
            local: addr,
            connect_timeout: self.config.balancer.connect_timeout,
            handshake_timeout: self.config.balancer.tls_handshake_timeout,
            first_byte_timeout: self.config.balancer.first_byte_timeout,
            upgrade_timeout: self.config.balancer.upgrade_timeout,
            pending: PendingByIp::new(self.config.balancer.max_pending_per_ip),
            links: self.config.balancer.handoff.then(|| {
                Arc::new(handoff::Links::new(self.id.clone(), self.config.balancer.connect_timeout))
            }),
            tls_handoff: self.config.balancer.tls_handoff,
        });
        // One permit per open connection: at the limit the accept loop waits for a permit, so
        // new clients queue in the kernel's backlog instead of costing memory and descriptors.
        let limit = match self.config.balancer.max_connections {
            0 => None,
            n => Some(Arc::new(Semaphore::new(n))),
        };
        tracing::info!(id = %self.id, %addr, grpc = %grpc_addr, tls = self.tls.is_some(), "balancer listening");
        let tracker = TaskTracker::new();
        loop {
            let permit = match &limit {
                Some(limit) => tokio::select! {
                    _ = shutdown.cancelled() => break,
                    permit = limit.clone().acquire_owned() => permit.ok(),
                },
                None => None,
            };
            let listener = &self.listener;
            let Some((client, remote)) = net::accept(|| listener.accept(), &shutdown).await else { break };
            metrics::get().accepted(self.tls.is_some());
            if self.config.balancer.accept_proxy_protocol {
                // The peer is the load balancer: the client, and so its per-IP budget, is known
                // only from the header.
                let tls = self.tls.as_ref().map(|certificates| certificates.current());
                let task =
                    inbound::serve_proxied(client, remote, workers.clone(), shared.clone(), tls, permit);
                tracker.spawn(task);
                continue;
            }
            // One address may not hold many connections that are not forwarded yet (silent
            // ones wait out first_byte_timeout): past its budget, closed at once.
            let Some(slot) = shared.pending.try_acquire(remote.ip()) else {
                tracing::debug!(%remote, "too many pending connections from one address, closing");
                metrics::get().refused(self.tls.is_some(), metrics::Refused::PendingPerIp);
                continue;
            };
            let (workers, shared) = (workers.clone(), shared.clone());
            match &self.tls {
                Some(certificates) => {
                    let config = certificates.current();
                    tracker.spawn(handle_tls(client, remote, workers, shared, config, slot, permit, true));
                }
                None => {
                    tracker.spawn(handle_plain(client, remote, workers, shared, slot, permit, true));
                }
            }
        }
        // Stop accepting first; forwarded connections run on until their workers close them
        // (the master drains the workers right after the balancers), within the grace period.
        drop(self.listener);
        health_reporter.set_service_status("", tonic_health::ServingStatus::NotServing).await;
        tracker.close();
        tracing::info!(id = %self.id, open = tracker.len(), "balancer draining");
        tracker.wait().await;
        let _ = grpc_task.await;
        tracing::info!(id = %self.id, "balancer stopped");
        Ok(())
    }
}

/// The public listener: the one named `public` that the starter passed (`LISTEN_FDS`, see
/// [`sc_common::listen_fds`]; its address wins over `[balancer] listen`), else `[balancer]
/// listen` bound here.
pub fn public_listener(config: &Config) -> Result<TcpListener, Error> {
    match listen_fds::take(listen_fds::PUBLIC)? {
        Some(inherited) => {
            let listener = TcpListener::from_std(inherited)?;
            tracing::debug!(addr = %listener.local_addr()?, "public listener passed by the starter");
            Ok(listener)
        }
        None => net::bind_public(config.balancer.listen, BACKLOG, "[balancer] listen"),
    }
}

/// The workers in rendezvous order for a client IP: the owner first, then the fallbacks.
fn ranked_targets(membership: &Membership, client: SocketAddr) -> Vec<Target> {
    let workers: Vec<&Member> = membership.with_role(Role::Worker).collect();
    let key = client.ip().to_string();
    let ids = rendezvous::ranked(workers.iter().map(|m| m.id.as_str()), key.as_bytes());
    ids.into_iter()
        .filter_map(|id| workers.iter().find(|m| m.id == id))
        .map(|m| Target { id: m.id.clone(), addr: m.public.clone(), unix: m.unix.clone() })
        .collect()
}

/// SIGHUP reloads the certificate and key; a bad pair is reported and the old one kept. Without
/// TLS the signal is ignored (the master passes SIGHUP on to every balancer, and its default
/// action would end the process).
async fn reload_on_sighup(certificates: Option<Arc<tls::Certificates>>, shutdown: CancellationToken) {
    signal::on_each_signal(tokio::signal::unix::SignalKind::hangup(), "SIGHUP", shutdown, || {
        let Some(certificates) = &certificates else {
            tracing::debug!("sighup without tls: nothing to reload");
            return;
        };
        match certificates.reload() {
            Ok(()) => tracing::info!("tls certificate reloaded"),
            Err(e) => tracing::error!(error = %e, "tls certificate reload failed, keeping the previous one"),
        }
    })
    .await;
}

/// A plain client: hand it off to its worker when that worker is on this host, else pick and
/// connect a worker and forward. Its own task (not a branch of the TLS one) so that a plain
/// connection's task is only as large as its own state. `permit` counts the connection against
/// `[balancer] max_connections` until it closes (in the worker, for a handed-off one). Only a
/// connection whose socket tells its real address (`may_hand_off`: not one behind an inbound
/// PROXY header) is handed off.
async fn handle_plain(
    client: TcpStream,
    remote: SocketAddr,
    workers: watch::Receiver<Membership>,
    shared: Arc<Shared>,
    slot: Pending,
    permit: handoff::Permit,
    may_hand_off: bool,
) {
    let _open = metrics::get().open(false);
    let upgrade_by = Instant::now() + shared.upgrade_timeout;
    let _ = client.set_nodelay(true);
    if !first_byte(&client, remote, &shared, upgrade_by).await {
        metrics::get().refused(false, metrics::Refused::FirstByte);
        return;
    }
    let links = shared.links.as_ref().filter(|_| may_hand_off);
    let (client, _permit) = match links {
        // Boxed: the hand-off's state lives only until the socket is passed.
        Some(links) => {
            match Box::pin(hand_off(links, client, remote, workers.clone(), &shared, permit, upgrade_by))
                .await
            {
                Ok(()) => return,
                Err(back) => back,
            }
        }
        None => (client, permit),
    };
    let Some((worker, id)) = connect_worker(remote, workers, &shared, false).await else {
        metrics::get().refused(false, metrics::Refused::NoWorker);
        return;
    };
    // Forwarded: from here the worker counts it until its handshake.
    drop(slot);
    drop(shared);
    tracing::debug!(%remote, worker = %id, "forwarding");
    drop(id);
    let outcome = match &worker {
        WorkerStream::Tcp(worker) => forward::forward(&client, worker, Some(upgrade_by)).await,
        WorkerStream::Unix(worker) => forward::forward(&client, worker, Some(upgrade_by)).await,
    };
    if let Err(e) = outcome {
        tracing::debug!(%remote, error = %e, "connection ended with an error");
    }
}

/// A TLS client: the handshake (bounded by `[balancer] tls_handshake_timeout`), then as
/// [`handle_plain`]: a TLS 1.3 session for a worker on this host is handed off with its keys
/// (`[balancer] tls_handoff`), any other is forwarded with the PROXY header's TLS flag set.
#[allow(clippy::too_many_arguments)]
async fn handle_tls(
    client: TcpStream,
    remote: SocketAddr,
    workers: watch::Receiver<Membership>,
    shared: Arc<Shared>,
    config: Arc<rustls::ServerConfig>,
    slot: Pending,
    permit: handoff::Permit,
    may_hand_off: bool,
) {
    let _open = metrics::get().open(true);
    let accepted = Instant::now();
    let upgrade_by = accepted + shared.upgrade_timeout;
    let _ = client.set_nodelay(true);
    // Boxed: the handshake's state is large and short-lived; the task keeps only what the
    // forwarding needs.
    let handshake = Box::pin(tls::handshake(&client, config));
    let mut tls = match tokio::time::timeout(shared.handshake_timeout, handshake).await {
        Ok(Ok(tls)) => {
            metrics::get().tls_handshake(accepted.elapsed().as_secs_f64());
            tls
        }
        Ok(Err(e)) => {
            tracing::debug!(%remote, error = %e, "tls handshake failed");
            metrics::get().refused(true, metrics::Refused::TlsHandshake);
            return;
        }
        Err(_) => {
            tracing::debug!(%remote, "tls handshake timed out");
            metrics::get().refused(true, metrics::Refused::TlsHandshake);
            return;
        }
    };
    // The handshake read no further than its own records, so the client's request is still in
    // the socket (rustls holds no plaintext unless a client sent early data, which is off).
    let buffered = match tls.process_new_packets() {
        Ok(state) => state.plaintext_bytes_to_read() > 0,
        Err(e) => {
            tracing::debug!(%remote, error = %e, "tls error after the handshake");
            return;
        }
    };
    if !buffered && !first_byte(&client, remote, &shared, upgrade_by).await {
        metrics::get().refused(true, metrics::Refused::FirstByte);
        return;
    }
    let links = shared
        .links
        .as_ref()
        .filter(|_| may_hand_off && shared.tls_handoff && !buffered && tls::can_hand_off(&tls));
    let (client, mut tls, _permit) = match links {
        // Boxed: the hand-off's state lives only until the socket is passed.
        Some(links) => {
            let handed =
                hand_off_tls(links, client, tls, remote, workers.clone(), &shared, permit, upgrade_by);
            match Box::pin(handed).await {
                Ok(()) => return,
                Err(back) => back,
            }
        }
        None => (client, tls, permit),
    };
    let Some((worker, id)) = connect_worker(remote, workers, &shared, true).await else {
        metrics::get().refused(true, metrics::Refused::NoWorker);
        return;
    };
    drop(slot);
    drop(shared);
    tracing::debug!(%remote, worker = %id, "forwarding tls");
    drop(id);
    let (linger, by) = (forward::HALF_CLOSED_LINGER, Some(upgrade_by));
    let outcome = match &worker {
        WorkerStream::Tcp(worker) => forward::forward_tls(&client, &mut tls, worker, linger, by).await,
        WorkerStream::Unix(worker) => forward::forward_tls(&client, &mut tls, worker, linger, by).await,
    };
    if let Err(e) = outcome {
        tracing::debug!(%remote, error = %e, "connection ended with an error");
    }
}

/// Hands a TLS client, its handshake done, to its worker (as [`hand_off`]) with its session;
/// `Err` gives it back to be proxied when that worker has no link on this host. Once the
/// session has left rustls the connection can only go to the worker: if sending it fails,
/// it is closed (the client reconnects).
#[allow(clippy::too_many_arguments)]
async fn hand_off_tls(
    links: &Arc<handoff::Links>,
    client: TcpStream,
    tls: rustls::ServerConnection,
    remote: SocketAddr,
    workers: watch::Receiver<Membership>,
    shared: &Shared,
    permit: handoff::Permit,
    upgrade_by: Instant,
) -> Result<(), (TcpStream, rustls::ServerConnection, handoff::Permit)> {
    let Some(target) = wait_for_targets(remote, workers, shared).await.and_then(|t| t.into_iter().next())
    else {
        return Err((client, tls, permit));
    };
    let Some(link) = links.link_to(&target).await else { return Err((client, tls, permit)) };
    let session = match tls::session(tls) {
        Ok(session) => session,
        Err(e) => {
            tracing::debug!(%remote, error = %e, "tls session not handed off, closing");
            return Ok(());
        }
    };
    match links.send(&link, &target, client, permit, Some(upgrade_by), Some(session)).await {
        Ok(()) => {
            metrics::get().handed_off();
            tracing::debug!(%remote, worker = %target.id, "tls handed off");
        }
        Err(_) => tracing::debug!(%remote, worker = %target.id, "tls hand-off failed, closing"),
    }
    Ok(())
}

/// Waits until the client has sent something (data, or its end of stream), for at most
/// `[balancer] first_byte_timeout` and not past its upgrade deadline; `false` when it stayed
/// silent (the caller drops the connection). A peek, not a readiness wait: readiness may be
/// reported spuriously, and the byte must stay for the worker.
async fn first_byte(client: &TcpStream, remote: SocketAddr, shared: &Shared, upgrade_by: Instant) -> bool {
    let until = upgrade_by.min(Instant::now() + shared.first_byte_timeout);
    let mut byte = [0u8; 1];
    match tokio::time::timeout_at(until, client.peek(&mut byte)).await {
        Ok(Ok(_)) => true,
        Ok(Err(e)) => {
            tracing::debug!(%remote, error = %e, "client socket failed before its first byte");
            false
        }
        Err(_) => {
            tracing::debug!(%remote, "no first byte within first_byte_timeout, closing");
            false
        }
    }
}

/// Hands the client to its worker (the first in rendezvous order) when that worker takes
/// hand-offs on this host; `Err` gives the connection back to be proxied (to the same worker
/// if it is reachable otherwise, so stickiness holds either way).
async fn hand_off(
    links: &Arc<handoff::Links>,
    client: TcpStream,
    remote: SocketAddr,
    workers: watch::Receiver<Membership>,
    shared: &Shared,
    permit: handoff::Permit,
    upgrade_by: Instant,
) -> Result<(), (TcpStream, handoff::Permit)> {
    let Some(target) = wait_for_targets(remote, workers, shared).await.and_then(|t| t.into_iter().next())
    else {
        return Err((client, permit));
    };
    // The worker enforces the rest of the upgrade deadline.
    links.hand_off(&target, client, permit, Some(upgrade_by)).await?;
    metrics::get().handed_off();
    tracing::debug!(%remote, worker = %target.id, "handed off");
    Ok(())
}

/// The workers in rendezvous order for `remote`, waiting up to `connect_timeout` for the first
/// worker right after start-up; `None` when there is none.
async fn wait_for_targets(
    remote: SocketAddr,
    mut workers: watch::Receiver<Membership>,
    shared: &Shared,
) -> Option<Vec<Target>> {
    let deadline = tokio::time::Instant::now() + shared.connect_timeout;
    loop {
        let targets = ranked_targets(&workers.borrow_and_update(), remote);
        if !targets.is_empty() {
            return Some(targets);
        }
        // Err inside: the membership will never change (no master configured, or stopping);
        // without this the loop would spin.
        if !matches!(tokio::time::timeout_at(deadline, workers.changed()).await, Ok(Ok(()))) {
            tracing::debug!(%remote, "no live worker, dropping connection");
            return None;
        }
    }
}

/// Connects to the client's worker (the next in rendezvous order if it refuses) and sends the
/// PROXY v2 header; `None` when no worker takes the connection.
async fn connect_worker(
    remote: SocketAddr,
    workers: watch::Receiver<Membership>,
    shared: &Shared,
    tls: bool,
) -> Option<(WorkerStream, String)> {
    // Right after start-up the membership may still be empty: wait a little for workers.
    let targets = wait_for_targets(remote, workers, shared).await?;
    let header = proxy_protocol::encode(remote, shared.local, tls);
    for target in targets {
        let Some(worker) = Box::pin(connect(&target, shared.connect_timeout)).await else { continue };
        let written = match &worker {
            WorkerStream::Tcp(stream) => forward::write_all(stream, &header).await,
            WorkerStream::Unix(stream) => forward::write_all(stream, &header).await,
        };
        if written.is_ok() {
            return Some((worker, target.id));
        }
    }
    tracing::debug!(%remote, "every worker refused, dropping connection");
    None
}

/// The worker's Unix socket if it has one here (same host), else its TCP listener.
async fn connect(target: &Target, timeout: Duration) -> Option<WorkerStream> {
    if !target.unix.is_empty() {
        match tokio::time::timeout(timeout, UnixStream::connect(&target.unix)).await {
            Ok(Ok(stream)) => return Some(WorkerStream::Unix(stream)),
            // Not on this host, or gone: TCP below.
            Ok(Err(e)) => tracing::trace!(worker = %target.id, error = %e, "unix socket refused, using tcp"),
            Err(_) => tracing::trace!(worker = %target.id, "unix connect timed out, using tcp"),
        }
    }
    match tokio::time::timeout(timeout, TcpStream::connect(&target.addr)).await {
        Ok(Ok(stream)) => {
            let _ = stream.set_nodelay(true);
            Some(WorkerStream::Tcp(stream))
        }
        Ok(Err(e)) => {
            tracing::debug!(worker = %target.id, error = %e, "worker refused, trying the next");
            None
        }
        Err(_) => {
            tracing::debug!(worker = %target.id, "worker connect timed out, trying the next");
            None
        }
    }
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
#[cfg(test)]
mod size {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// A plain connection's task is what an idle proxied connection costs besides its sockets
    /// (docs/balancer-memory.md; a handed-off one costs the balancer nothing): keep it inside
    /// its budget.
    #[tokio::test]
    async fn a_plain_connections_task_stays_inside_its_budget() {
        const BUDGET: usize = 1536;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = TcpStream::connect(addr).await.unwrap();
        let shared = Arc::new(Shared {
            local: addr,
            connect_timeout: Duration::ZERO,
            handshake_timeout: Duration::ZERO,
            first_byte_timeout: Duration::ZERO,
            upgrade_timeout: Duration::ZERO,
            pending: PendingByIp::new(0),
            links: None,
            tls_handoff: true,
        });
        let workers = watch::channel(Membership::default()).1;
        let slot = shared.pending.acquire(addr.ip());
        let task = handle_plain(client, addr, workers, shared, slot, None, true);
        let size = std::mem::size_of_val(&task);
        assert!(size <= BUDGET, "the plain connection task is {size} bytes, over its budget of {BUDGET}");
    }
}
