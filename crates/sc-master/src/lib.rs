//! sc-master: the cluster's control plane.
//!
//! It keeps the membership ([`registry`]) that balancers and workers watch over gRPC
//! ([`grpc`], `sc.master.v1`), checks every member's health ([`health`]), writes the central
//! log of every daemon's errors and notices ([`central_log`]), serves the admin and status API
//! ([`admin`]) and, in supervise mode, runs the balancer, workers and brokers as child
//! processes, respawns them and restarts the workers one at a time on SIGUSR2 ([`supervisor`]).
//! In supervise mode it also gives the workers a per-cluster folder for their Unix sockets
//! (removed on exit) so that the balancers reach them without TCP, lets `[cluster] balancers`
//! share one port, and passes SIGHUP on to the balancers (TLS certificate reload).
//! It is not on the data path: the other daemons keep serving without it, and in standalone
//! mode they register again when it comes back.
//!
//! Entry points: [`Master::bind`], then [`Master::serve`].

pub mod admin;
pub mod central_log;
pub mod grpc;
pub mod health;
pub mod registry;
pub mod supervisor;

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
use crate::health::HealthMap;
use crate::registry::Registry;
use crate::supervisor::{ChildSpec, Children, Supervisor};

/// What the master turns down, mapped to gRPC and HTTP codes in one place.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MasterError {
    /// A process being replaced in a rolling restart tried to register again.
    #[error("{id} (pid {pid}) is being replaced and may not register again")]
    Retired { id: String, pid: u32 },
    /// A rolling restart was asked for while one runs.
    #[error("a rolling restart is already running")]
    RollingRestartRunning,
    /// A rolling restart was asked of a standalone master.
    #[error("standalone mode: the master runs no processes to restart")]
    Standalone,
}

impl MasterError {
    /// The gRPC status for this error.
    pub fn to_status(&self) -> tonic::Status {
        tonic::Status::failed_precondition(self.to_string())
    }

    /// The HTTP status for this error (admin API).
    pub fn http_status(&self) -> http::StatusCode {
        http::StatusCode::CONFLICT
    }
}

/// A master with its gRPC listener bound.
#[derive(Debug)]
pub struct Master {
    config: Config,
    config_file: Option<PathBuf>,
    listener: TcpListener,
    addr: SocketAddr,
    admin: TcpListener,
    admin_addr: SocketAddr,
    registry: Arc<Registry>,
    log: Arc<CentralLog>,
    children: Arc<Children>,
    /// The workers' Unix socket folder this master made (supervise mode, `[worker] unix_dir`
    /// unset); removed when it stops.
    runtime_dir: Option<PathBuf>,
}

impl Master {
    /// Binds the gRPC listener (`[master] listen`; port 0 picks a free one, which suits
    /// supervise mode and tests) and the admin API (`[master] admin_listen`). `config_file` is
    /// handed on to the children in supervise mode.
    pub async fn bind(mut config: Config, config_file: Option<&Path>) -> Result<Self, Error> {
        if config.cluster.secret.is_empty() {
            config.cluster.secret = secret::generate();
        }
        let config_file = config_file.map(std::path::absolute).transpose()?;
        let listener = daemon::bind(config.master.listen).await?;
        let addr = listener.local_addr()?;
        let admin = daemon::bind(config.master.admin_listen).await?;
        let admin_addr = admin.local_addr()?;
        let runtime_dir = if config.master.mode == MasterMode::Supervise && config.worker.unix_dir.is_none() {
            Some(make_runtime_dir()?)
        } else {
            None
        };
        Ok(Self {
            runtime_dir,
            config,
            config_file,
            listener,
            addr,
            admin,
            admin_addr,
            registry: Arc::new(Registry::default()),
            log: Arc::new(CentralLog::default()),
            children: Arc::new(Children::default()),
        })
    }

    /// The bound gRPC address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The bound admin API address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// The supervised children (empty in standalone mode); `main` kills them on a second
    /// signal.
    pub fn children(&self) -> Arc<Children> {
        self.children.clone()
    }

    /// The folder of the workers' Unix sockets that this master made and removes on exit;
    /// `main` removes it too on an immediate exit.
    pub fn runtime_dir(&self) -> Option<PathBuf> {
        self.runtime_dir.clone()
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
    /// (balancers, workers, brokers) within `[master] shutdown_grace` on the way out. SIGUSR2
    /// starts a rolling restart of the workers.
    pub async fn serve(self, shutdown: CancellationToken) -> Result<(), Error> {
        let supervise = self.config.master.mode == MasterMode::Supervise;
        let child_env = self.child_env()?;
        let specs = if supervise { self.child_specs()? } else { Vec::new() };
        let started = tokio::time::Instant::now();
        let (failed_tx, mut failed_rx) = mpsc::unbounded_channel();
        let (health_tx, health_rx) = watch::channel(HealthMap::new());
        let checks = shutdown.child_token();
        let checker = health::Checker {
            registry: self.registry.clone(),
            log: self.log.clone(),
            interval: self.config.master.health_interval,
            failures: self.config.master.health_failures,
            failed: failed_tx,
            healthy: health_tx,
        };
        tokio::spawn(checker.run(checks.clone()));

        let grpc_shutdown = CancellationToken::new();
        let (health_reporter, health) = daemon::health();
        let service = grpc::MasterService {
            registry: self.registry.clone(),
            log: self.log.clone(),
            settle_until: (!supervise).then(|| started + self.config.master.settle),
        };
        let secret = &self.config.cluster.secret;
        let router = tonic::transport::Server::builder()
            .add_service(health)
            .add_service(MasterServer::with_interceptor(service, secret::Check::new(secret)));
        let grpc = tokio::spawn(daemon::serve_grpc(router, self.listener, grpc_shutdown.clone()));
        tracing::info!(addr = %self.addr, admin = %self.admin_addr, mode = ?self.config.master.mode, "master listening");
        println!("admin api: http://{}", self.admin_addr);

        let supervisor = supervise.then(|| {
            let settings = supervisor::Settings {
                registry: self.registry.clone(),
                log: self.log.clone(),
                health: health_rx.clone(),
                children: self.children.clone(),
                env: child_env,
                backoff: self.config.master.respawn_backoff,
                backoff_max: self.config.master.respawn_backoff_max,
                grace: self.config.master.shutdown_grace,
            };
            let expected: Vec<String> = specs.iter().flatten().map(|s| s.id.clone()).collect();
            let scheme = if self.config.balancer.tls_cert.is_some() { "wss" } else { "ws" };
            tokio::spawn(announce_ready(
                self.registry.watch(),
                health_rx.clone(),
                expected,
                format!("{scheme}://{{}}{}", self.config.worker.path),
                shutdown.clone(),
            ));
            Arc::new(Supervisor::start(specs, settings))
        });

        let admin_shutdown = CancellationToken::new();
        let admin = Arc::new(admin::Admin {
            mode: self.config.master.mode,
            grpc: self.addr,
            started,
            registry: self.registry.clone(),
            log: self.log.clone(),
            health: health_rx,
            children: self.children.clone(),
            supervisor: supervisor.clone(),
        });
        let admin_task = tokio::spawn(admin.serve(self.admin, admin_shutdown.clone()));
        tokio::spawn(rolling_restart_on_sigusr2(supervisor.clone(), self.log.clone(), shutdown.clone()));
        tokio::spawn(forward_sighup(self.children.clone(), shutdown.clone()));

        if let Some(supervisor) = &supervisor {
            supervisor.kill_failed(&mut failed_rx, &shutdown).await;
            shutdown.cancelled().await;
            tracing::info!("stopping the cluster");
            supervisor.stop(self.config.master.shutdown_grace).await;
        } else {
            shutdown.cancelled().await;
        }
        checks.cancel();
        health_reporter.set_service_status("", tonic_health::ServingStatus::NotServing).await;
        grpc_shutdown.cancel();
        admin_shutdown.cancel();
        let _ = admin_task.await;
        match grpc.await {
            Ok(outcome) => outcome?,
            Err(e) => tracing::error!(error = %e, "grpc task failed"),
        }
        if let Some(dir) = &self.runtime_dir {
            let _ = std::fs::remove_dir_all(dir);
        }
        tracing::info!("master stopped");
        Ok(())
    }

    /// What every child gets in its environment: the cluster secret and, unless configured, a
    /// per-cluster auth key, so that a token signed on one worker is valid on all of them.
    /// In supervise mode also the workers' Unix socket folder and, for several balancers on a
    /// port 0 listener, one free port for all of them (each would pick its own otherwise).
    fn child_env(&self) -> Result<Vec<(String, String)>, Error> {
        let mut env = vec![("SC_CLUSTER__SECRET".to_owned(), self.config.cluster.secret.clone())];
        if self.config.worker.auth_key.is_empty() && self.config.worker.auth_algorithm.starts_with("HS") {
            env.push(("SC_WORKER__AUTH_KEY".to_owned(), secret::generate()));
        }
        if let Some(dir) = &self.runtime_dir {
            env.push(("SC_WORKER__UNIX_DIR".to_owned(), dir.display().to_string()));
        }
        let listen = self.config.balancer.listen;
        if self.config.cluster.balancers > 1 && listen.port() == 0 {
            let port = std::net::TcpListener::bind(listen)
                .and_then(|l| l.local_addr())
                .map_err(|source| Error::Bind { addr: listen.to_string(), source })?
                .port();
            env.push(("SC_BALANCER__LISTEN".to_owned(), SocketAddr::new(listen.ip(), port).to_string()));
        }
        Ok(env)
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
            (0..self.config.cluster.balancers)
                .map(|i| spec(Role::Balancer, format!("balancer-{i}"), &balancer))
                .collect(),
            (0..self.config.cluster.workers)
                .map(|i| spec(Role::Worker, format!("worker-{i}"), &worker))
                .collect(),
            (0..self.config.cluster.brokers)
                .map(|i| spec(Role::Broker, format!("broker-{i}"), &broker))
                .collect(),
        ])
    }
}

/// SIGUSR2 starts a rolling restart of the workers (supervise mode), as with the Node
/// original's `rebootOnSignal`, but one worker at a time.
async fn rolling_restart_on_sigusr2(
    supervisor: Option<Arc<Supervisor>>,
    log: Arc<CentralLog>,
    shutdown: CancellationToken,
) {
    daemon::on_each_signal(tokio::signal::unix::SignalKind::user_defined2(), "SIGUSR2", shutdown, || {
        let outcome = match &supervisor {
            Some(supervisor) => supervisor.start_rolling_restart(),
            None => Err(MasterError::Standalone),
        };
        if let Err(why) = outcome {
            log.master(sc_common::membership::Severity::Warning, format!("SIGUSR2 ignored: {why}"));
        }
    })
    .await;
}

/// SIGHUP goes on to every balancer child, which reloads its TLS certificate and key.
async fn forward_sighup(children: Arc<Children>, shutdown: CancellationToken) {
    daemon::on_each_signal(tokio::signal::unix::SignalKind::hangup(), "SIGHUP", shutdown, || {
        let signalled = children.signal_role(Role::Balancer, libc::SIGHUP);
        tracing::info!(balancers = signalled, "sighup passed on to the balancers");
    })
    .await;
}

/// Makes the per-cluster folder of the workers' Unix sockets, readable by this user only.
fn make_runtime_dir() -> Result<PathBuf, Error> {
    use std::os::unix::fs::PermissionsExt;
    // One per master; a process that runs several (tests) numbers the later ones.
    static MADE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let name = match MADE.fetch_add(1, std::sync::atomic::Ordering::Relaxed) {
        0 => format!("sc-{}", std::process::id()),
        n => format!("sc-{}-{n}", std::process::id()),
    };
    let dir = std::env::temp_dir().join(name);
    // A leftover of an earlier master with the same pid.
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
    Ok(dir)
}

/// Prints `cluster ready: <url>` on stdout once every expected member is registered and has
/// passed a health check.
async fn announce_ready(
    mut members: watch::Receiver<Arc<Membership>>,
    mut healthy: watch::Receiver<HealthMap>,
    expected: Vec<String>,
    url_template: String,
    shutdown: CancellationToken,
) {
    loop {
        let url = {
            let snapshot = members.borrow_and_update().clone();
            let healthy = healthy.borrow_and_update();
            let all_up = expected.iter().all(|id| {
                snapshot.members.iter().any(|m| {
                    &m.id == id
                        && healthy.get(&(m.id.clone(), m.pid)).is_some_and(|h| h.healthy_since.is_some())
                })
            });
            all_up.then(|| public_url(&snapshot, &url_template)).flatten()
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

/// The WebSocket URL of the first balancer (`template` with `{}` for the address), with a
/// wildcard address shown as loopback.
fn public_url(membership: &Membership, template: &str) -> Option<String> {
    let balancer = membership.with_role(Role::Balancer).next()?;
    let mut addr: SocketAddr = balancer.public.parse().ok()?;
    if addr.ip().is_unspecified() {
        addr.set_ip(if addr.is_ipv4() {
            [127, 0, 0, 1].into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    Some(template.replacen("{}", &addr.to_string(), 1))
}
