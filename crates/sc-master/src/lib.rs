//! sc-master: the cluster's control plane.
//!
//! It keeps the membership ([`registry`]) that balancers and workers watch over gRPC
//! ([`grpc`], `sc.master.v1`), checks every member's health ([`health`]), writes the central
//! log of every daemon's errors ([`central_log`]) and, in supervise mode, runs the balancer,
//! workers and brokers as child processes and respawns them ([`supervisor`]). It is not on the
//! data path: the other daemons keep serving without it.
//!
//! Entry points: [`Master::bind`], then [`Master::serve`].

pub mod central_log;
pub mod grpc;
pub mod health;
pub mod registry;
pub mod supervisor;

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sc_common::config::{Config, MasterMode};
use sc_common::membership::Membership;
use sc_common::{Error, Role, daemon, secret};
use sc_proto::master::v1::master_server::MasterServer;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::central_log::CentralLog;
use crate::health::Instance;
use crate::registry::Registry;
use crate::supervisor::{ChildSpec, Supervisor};

/// A master with its gRPC listener bound.
#[derive(Debug)]
pub struct Master {
    config: Config,
    config_file: Option<PathBuf>,
    listener: TcpListener,
    addr: SocketAddr,
    registry: Arc<Registry>,
    log: Arc<CentralLog>,
}

impl Master {
    /// Binds the gRPC listener (`[master] listen`; port 0 picks a free one, which suits
    /// supervise mode and tests). `config_file` is handed on to the children in supervise mode.
    pub async fn bind(mut config: Config, config_file: Option<&Path>) -> Result<Self, Error> {
        if config.cluster.secret.is_empty() {
            config.cluster.secret = secret::generate();
        }
        let config_file = config_file.map(std::path::absolute).transpose()?;
        let listener = daemon::bind(config.master.listen).await?;
        let addr = listener.local_addr()?;
        Ok(Self {
            config,
            config_file,
            listener,
            addr,
            registry: Arc::new(Registry::default()),
            log: Arc::new(CentralLog::default()),
        })
    }

    /// The bound gRPC address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The membership table (for tests and the status API).
    pub fn registry(&self) -> Arc<Registry> {
        self.registry.clone()
    }

    /// The central log.
    pub fn central_log(&self) -> Arc<CentralLog> {
        self.log.clone()
    }

    /// Serves until `shutdown`; in supervise mode runs the cluster and stops it in order
    /// (balancers, workers, brokers) on the way out.
    pub async fn serve(self, shutdown: CancellationToken) -> Result<(), Error> {
        let supervise = self.config.master.mode == MasterMode::Supervise;
        let specs = if supervise { self.child_specs()? } else { Vec::new() };
        let child_env = self.child_env();
        let (failed_tx, mut failed_rx) = mpsc::unbounded_channel();
        let (healthy_tx, healthy_rx) = watch::channel(BTreeSet::new());
        let checks = shutdown.child_token();
        let checker = health::Checker {
            registry: self.registry.clone(),
            log: self.log.clone(),
            interval: self.config.master.health_interval,
            failures: self.config.master.health_failures,
            failed: failed_tx,
            healthy: healthy_tx,
        };
        tokio::spawn(checker.run(checks.clone()));

        let grpc_shutdown = CancellationToken::new();
        let (health_reporter, health) = daemon::health();
        let service = grpc::MasterService { registry: self.registry.clone(), log: self.log.clone() };
        let secret = &self.config.cluster.secret;
        let router = tonic::transport::Server::builder()
            .add_service(health)
            .add_service(MasterServer::with_interceptor(service, secret::Check::new(secret)));
        let grpc = tokio::spawn(daemon::serve_grpc(router, self.listener, grpc_shutdown.clone()));
        tracing::info!(addr = %self.addr, mode = ?self.config.master.mode, "master listening");

        if supervise {
            let expected: Vec<String> = specs.iter().flatten().map(|s| s.id.clone()).collect();
            let settings = supervisor::Settings {
                registry: self.registry.clone(),
                log: self.log.clone(),
                env: child_env,
                backoff: self.config.master.respawn_backoff,
                backoff_max: self.config.master.respawn_backoff_max,
                grace: self.config.master.shutdown_grace,
            };
            let supervisor = Supervisor::start(specs, settings);
            let path = self.config.worker.path.clone();
            tokio::spawn(announce_ready(self.registry.watch(), healthy_rx, expected, path, shutdown.clone()));
            supervisor.kill_failed(&mut failed_rx, &shutdown).await;
            shutdown.cancelled().await;
            tracing::info!("stopping the cluster");
            supervisor.stop().await;
        } else {
            shutdown.cancelled().await;
        }
        checks.cancel();
        health_reporter.set_service_status("", tonic_health::ServingStatus::NotServing).await;
        grpc_shutdown.cancel();
        match grpc.await {
            Ok(outcome) => outcome?,
            Err(e) => tracing::error!(error = %e, "grpc task failed"),
        }
        tracing::info!("master stopped");
        Ok(())
    }

    /// What every child gets in its environment: the cluster secret and, unless configured, a
    /// per-cluster auth key so a token signed on one worker is valid on all.
    fn child_env(&self) -> Vec<(String, String)> {
        let mut env = vec![("SC_CLUSTER__SECRET".to_owned(), self.config.cluster.secret.clone())];
        if self.config.worker.auth_key.is_empty() && self.config.worker.auth_algorithm.starts_with("HS") {
            env.push(("SC_WORKER__AUTH_KEY".to_owned(), secret::generate()));
        }
        env
    }

    /// The children of supervise mode, by shutdown tier: balancer, workers, brokers.
    fn child_specs(&self) -> Result<Vec<Vec<ChildSpec>>, Error> {
        let bin_dir = match &self.config.master.bin_dir {
            Some(dir) => dir.clone(),
            None => std::env::current_exe()?
                .parent()
                .map(Path::to_path_buf)
                .ok_or_else(|| Error::Config("cannot find the folder of sc-master".into()))?,
        };
        let master_url = format!("http://{}", self.addr);
        let program = |role: Role, command: &Option<PathBuf>| -> Result<PathBuf, Error> {
            let program = command.clone().unwrap_or_else(|| bin_dir.join(format!("sc-{}", role.as_str())));
            if program.components().count() > 1 && !program.exists() {
                return Err(Error::Config(format!(
                    "{}.command: {} does not exist (build it with `cargo build --release`, or set [master] bin_dir)",
                    role.as_str(),
                    program.display()
                )));
            }
            Ok(program)
        };
        let spec = |role: Role, id: String, program: &PathBuf| {
            let mut args: Vec<OsString> = Vec::new();
            if let Some(file) = &self.config_file {
                args.extend(["--config".into(), file.clone().into_os_string()]);
            }
            args.extend([
                "--id".into(),
                id.clone().into(),
                "--master".into(),
                master_url.clone().into(),
                "--supervisor-pid".into(),
                std::process::id().to_string().into(),
            ]);
            ChildSpec { id, role, program: program.clone(), args }
        };
        let balancer = program(Role::Balancer, &self.config.balancer.command)?;
        let worker = program(Role::Worker, &self.config.worker.command)?;
        let broker = program(Role::Broker, &self.config.broker.command)?;
        Ok(vec![
            vec![spec(Role::Balancer, "balancer-0".into(), &balancer)],
            (0..self.config.cluster.workers)
                .map(|i| spec(Role::Worker, format!("worker-{i}"), &worker))
                .collect(),
            (0..self.config.cluster.brokers)
                .map(|i| spec(Role::Broker, format!("broker-{i}"), &broker))
                .collect(),
        ])
    }
}

/// Prints `cluster ready: <url>` on stdout once every expected member is registered and has
/// passed a health check.
async fn announce_ready(
    mut members: watch::Receiver<Arc<Membership>>,
    mut healthy: watch::Receiver<BTreeSet<Instance>>,
    expected: Vec<String>,
    path: String,
    shutdown: CancellationToken,
) {
    loop {
        let url = {
            let snapshot = members.borrow_and_update().clone();
            let healthy = healthy.borrow_and_update();
            let all_up = expected.iter().all(|id| {
                snapshot.members.iter().any(|m| &m.id == id && healthy.contains(&(m.id.clone(), m.pid)))
            });
            all_up.then(|| public_url(&snapshot, &path)).flatten()
        };
        if let Some(url) = url {
            tracing::info!(%url, "cluster ready");
            println!("cluster ready: {url}");
            return;
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = members.changed() => {}
            _ = healthy.changed() => {}
        }
    }
}

/// The WebSocket URL of the first balancer, with a wildcard address shown as loopback.
fn public_url(membership: &Membership, path: &str) -> Option<String> {
    let balancer = membership.with_role(Role::Balancer).next()?;
    let mut addr: SocketAddr = balancer.public.parse().ok()?;
    if addr.ip().is_unspecified() {
        addr.set_ip(if addr.is_ipv4() {
            [127, 0, 0, 1].into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    Some(format!("ws://{addr}{path}"))
}
