//! sc-master: the cluster's control plane.
//!
//! It keeps the membership (`registry`) that balancers and workers watch over gRPC (`grpc`,
//! `sc.master.v1`, the only module that touches the generated types), checks every member's
//! health (`health`), writes the central log of every daemon's errors and notices
//! (`central_log`), gathers every member's metrics over `sc.metrics.v1` (`metrics`, for `GET
//! /metrics`; `samples`, every second for the admin page's charts), serves the admin API and
//! the admin web page (`admin`) and, in supervise mode, runs the balancer, workers and brokers
//! as child processes, respawns them, restarts the workers one at a time on SIGUSR2 and drains
//! a broker on demand (`supervisor`). In supervise mode it also gives the workers a
//! per-cluster folder for their Unix sockets (removed on exit), binds the balancers' public
//! port once and passes the listening socket to every balancer it runs (one owner per port: a
//! port in use stops the master at once; a balancer restart refuses no connection), and passes
//! SIGHUP on to the balancers (TLS certificate reload). It is not on the data path: the other daemons keep serving without it, and in
//! standalone mode they register again when it comes back.
//!
//! Entry points: [`Master::bind`], then [`Master::serve`]; [`Master::ready`] tells when the
//! cluster is up; [`status::fetch`] reads a running master's status for `sc-master status`; [`new_app::generate`] writes a new app crate for `sc-master new`. Errors: [`MasterError`], mapped to gRPC and HTTP codes in `error`.

#![warn(missing_docs)]

mod admin;
mod central_log;
mod error;
mod grpc;
mod health;
mod metrics;
pub mod new_app;
mod registry;
mod samples;
pub mod status;
mod supervisor;

pub use error::MasterError;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustix::process::Signal;
use sc_common::config::{Config, MasterMode};
use sc_common::membership::{Membership, Severity};
use sc_common::net;
use sc_common::{Error, Role, secret, signal};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::central_log::CentralLog;
use crate::health::HealthMap;
use crate::registry::Registry;
use crate::supervisor::{ChildSpec, Children, PublicListener, Supervisor};

/// A master with its listeners bound and, in supervise mode, its children planned.
#[derive(Debug)]
pub struct Master {
    config: Config,
    listener: TcpListener,
    addr: SocketAddr,
    admin: TcpListener,
    admin_addr: SocketAddr,
    registry: Arc<Registry>,
    log: Arc<CentralLog>,
    children: Arc<Children>,
    /// The children by shutdown tier (empty in standalone mode).
    specs: Vec<Vec<ChildSpec>>,
    /// What the master adds to every child's environment.
    env: Vec<(String, String)>,
    /// The workers' Unix socket folder this master made (supervise mode, `[worker] unix_dir`
    /// unset); removed when it stops.
    runtime_dir: Option<PathBuf>,
    /// The balancers' public listener (supervise mode), bound here and lent to each balancer.
    public: Option<Arc<PublicListener>>,
    /// The public URL once the cluster is ready; see [`Master::ready`].
    ready: watch::Sender<Option<String>>,
    /// Whether `[master] admin_token` was made at start (unset in the config).
    admin_token_generated: bool,
}

impl Master {
    /// Checks what the configuration asks of this host (in supervise mode: that the daemon
    /// programs exist), then binds the gRPC listener (`[master] listen`; port 0 picks a free
    /// one, which suits supervise mode and tests), the admin API (`[master] admin_listen`) and,
    /// in supervise mode, the balancers' public listener (`[balancer] listen`; in use: an error
    /// naming the key and the address, before any child starts).
    /// `config_file` is handed on to the children in supervise mode.
    pub async fn bind(mut config: Config, config_file: Option<&Path>) -> Result<Self, Error> {
        let supervise = config.master.mode == MasterMode::Supervise;
        let programs = supervise.then(|| supervisor::Programs::find(&config)).transpose()?;
        if config.cluster.secret.is_empty() {
            config.cluster.secret = secret::generate();
        }
        let admin_token_generated = config.master.admin_token.is_empty();
        if admin_token_generated {
            config.master.admin_token = secret::generate();
        }
        let config_file = config_file.map(std::path::absolute).transpose()?;
        let listener = net::bind(config.master.listen).await?;
        let addr = listener.local_addr()?;
        let admin = net::bind(config.master.admin_listen).await?;
        let admin_addr = admin.local_addr()?;
        let public = if supervise {
            Some(Arc::new(PublicListener::bind(config.balancer.listen).await?))
        } else {
            None
        };
        let runtime_dir =
            if supervise && config.worker.unix_dir.is_none() { Some(make_runtime_dir()?) } else { None };
        let env = supervisor::child_env(&config, runtime_dir.as_deref(), public.as_ref().map(|p| p.addr()));
        let specs = match &programs {
            Some(programs) => {
                supervisor::child_specs(&config, programs, config_file.as_deref(), &format!("http://{addr}"))
            }
            None => Vec::new(),
        };
        Ok(Self {
            config,
            listener,
            addr,
            admin,
            admin_addr,
            registry: Arc::new(Registry::default()),
            log: Arc::new(CentralLog::default()),
            children: Arc::new(Children::default()),
            specs,
            env,
            runtime_dir,
            public,
            ready: watch::channel(None).0,
            admin_token_generated,
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

    /// The admin API's bearer token when the master made it (`[master] admin_token` unset),
    /// for `main` to print once; `None` when it came from the configuration.
    pub fn generated_admin_token(&self) -> Option<&str> {
        self.admin_token_generated.then_some(self.config.master.admin_token.as_str())
    }

    /// The public WebSocket URL of the cluster (`ws://` or `wss://`, the first balancer's
    /// address, `[worker] path`) once every supervised child is registered and has passed a
    /// health check; `None` until then, and always in standalone mode.
    pub fn ready(&self) -> watch::Receiver<Option<String>> {
        self.ready.subscribe()
    }

    /// What `main` runs before an immediate exit (a second signal): kills every child process
    /// and removes the workers' Unix socket folder, which [`Master::serve`] would do on a
    /// graceful stop.
    pub fn kill_switch(&self) -> impl FnOnce() + Send + 'static {
        let children = self.children.clone();
        let runtime_dir = self.runtime_dir.clone();
        move || {
            children.kill_all();
            if let Some(dir) = runtime_dir {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
    }

    /// Serves until `shutdown`; in supervise mode runs the cluster and stops it in order
    /// (balancers, workers, brokers) within `[master] shutdown_grace` on the way out. SIGUSR2
    /// starts a rolling restart of the workers. In supervise mode a child that fails its first
    /// start stops the cluster and ends this with [`MasterError::FirstStart`] (or
    /// [`MasterError::Spawn`]), instead of a respawn loop.
    pub async fn serve(self, shutdown: CancellationToken) -> Result<(), MasterError> {
        let supervise = self.config.master.mode == MasterMode::Supervise;
        let started = tokio::time::Instant::now();
        let (failed_tx, mut failed_rx) = mpsc::unbounded_channel();
        let (failed_start_tx, mut failed_start_rx) = mpsc::unbounded_channel();
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
        let (health_reporter, health) = net::health();
        let service = grpc::MasterService {
            registry: self.registry.clone(),
            log: self.log.clone(),
            settle_until: (!supervise).then(|| started + self.config.master.settle),
        };
        let secret = &self.config.cluster.secret;
        let router =
            tonic::transport::Server::builder().add_service(health).add_service(service.into_server(secret));
        let grpc = tokio::spawn(net::serve_grpc(router, self.listener, grpc_shutdown.clone()));
        tracing::info!(addr = %self.addr, admin = %self.admin_addr, mode = ?self.config.master.mode, "master listening");

        let supervisor = supervise.then(|| {
            let settings = supervisor::Settings {
                registry: self.registry.clone(),
                log: self.log.clone(),
                health: health_rx.clone(),
                children: self.children.clone(),
                env: self.env,
                backoff: self.config.master.respawn_backoff,
                backoff_max: self.config.master.respawn_backoff_max,
                grace: self.config.master.shutdown_grace,
                failed_start: failed_start_tx,
                public: self.public.clone(),
            };
            let expected: Vec<String> = self.specs.iter().flatten().map(|s| s.id.clone()).collect();
            let scheme = if self.config.balancer.tls_cert.is_some() { "wss" } else { "ws" };
            tokio::spawn(announce_ready(
                self.registry.watch(),
                health_rx.clone(),
                expected,
                format!("{scheme}://{{}}{}", self.config.worker.path),
                self.ready,
                shutdown.clone(),
            ));
            Arc::new(Supervisor::start(self.specs, settings))
        });

        let samples = Arc::new(samples::Samples::default());
        let sampler = samples::Sampler {
            registry: self.registry.clone(),
            samples: samples.clone(),
            secret: self.config.cluster.secret.clone(),
        };
        tokio::spawn(sampler.run(checks.clone()));

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
            addr: self.admin_addr,
            token: self.config.master.admin_token.clone(),
            metrics: metrics::ClusterMetrics::new(
                &self.children,
                self.registry.clone(),
                self.config.cluster.secret.clone(),
            ),
            samples,
        });
        let admin_task = tokio::spawn(admin.serve(self.admin, admin_shutdown.clone()));
        tokio::spawn(rolling_restart_on_sigusr2(supervisor.clone(), self.log.clone(), shutdown.clone()));
        tokio::spawn(forward_sighup(self.children.clone(), shutdown.clone()));

        let mut failed_start = None;
        if let Some(supervisor) = &supervisor {
            let running = async {
                supervisor.kill_failed(&mut failed_rx, &shutdown).await;
                shutdown.cancelled().await;
            };
            tokio::select! {
                () = running => {}
                Some(error) = failed_start_rx.recv() => failed_start = Some(error),
            }
            tracing::info!("stopping the cluster");
            if let Some(public) = &self.public {
                public.close();
            }
            supervisor.stop(self.config.master.shutdown_grace).await;
        } else {
            shutdown.cancelled().await;
        }
        checks.cancel();
        health_reporter.set_service_status("", tonic_health::ServingStatus::NotServing).await;
        grpc_shutdown.cancel();
        admin_shutdown.cancel();
        let _ = admin_task.await;
        let outcome = match grpc.await {
            Ok(outcome) => outcome.map_err(MasterError::Grpc),
            Err(e) => {
                tracing::error!(error = %e, "grpc task failed");
                Ok(())
            }
        };
        if let Some(dir) = &self.runtime_dir {
            let _ = std::fs::remove_dir_all(dir);
        }
        tracing::info!("master stopped");
        match failed_start {
            Some(error) => Err(error),
            None => outcome,
        }
    }
}

/// SIGUSR2 starts a rolling restart of the workers (supervise mode), as with the Node
/// original's `rebootOnSignal`, but one worker at a time.
async fn rolling_restart_on_sigusr2(
    supervisor: Option<Arc<Supervisor>>,
    log: Arc<CentralLog>,
    shutdown: CancellationToken,
) {
    signal::on_each_signal(tokio::signal::unix::SignalKind::user_defined2(), "SIGUSR2", shutdown, || {
        let outcome = match &supervisor {
            Some(supervisor) => supervisor.start_rolling_restart(),
            None => Err(MasterError::Standalone),
        };
        if let Err(why) = outcome {
            log.master(Severity::Warning, format!("SIGUSR2 ignored: {why}"));
        }
    })
    .await;
}

/// SIGHUP goes on to every balancer child, which reloads its TLS certificate and key.
async fn forward_sighup(children: Arc<Children>, shutdown: CancellationToken) {
    signal::on_each_signal(tokio::signal::unix::SignalKind::hangup(), "SIGHUP", shutdown, || {
        let signalled = children.signal_role(Role::Balancer, Signal::HUP);
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
    let temp = std::env::temp_dir();
    remove_stale_runtime_dirs(&temp);
    let dir = temp.join(name);
    // A leftover of an earlier master with the same pid.
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
    Ok(dir)
}

/// Removes the runtime folders (`sc-<pid>`, `sc-<pid>-<n>`) in `temp` that masters of this
/// user left behind when they were killed before they could clean up: only those whose owner
/// process is gone (another running master keeps its own).
fn remove_stale_runtime_dirs(temp: &Path) {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(temp) else { return };
    let me = rustix::process::getuid().as_raw();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(runtime_dir_owner) else { continue };
        let ours = entry.metadata().is_ok_and(|m| m.is_dir() && m.uid() == me);
        if ours && pid != std::process::id() && !process_exists(pid) {
            tracing::debug!(dir = %entry.path().display(), pid, "removing the runtime folder of a master that is gone");
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// The pid in a runtime folder's name (`sc-<pid>` or `sc-<pid>-<n>`).
fn runtime_dir_owner(name: &str) -> Option<u32> {
    let rest = name.strip_prefix("sc-")?;
    let (pid, n) = rest.split_once('-').unwrap_or((rest, "0"));
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    (digits(pid) && digits(n)).then(|| pid.parse().ok()).flatten()
}

/// Whether a process `pid` exists (signal 0; a process of another user exists too).
fn process_exists(pid: u32) -> bool {
    let Some(pid) = i32::try_from(pid).ok().and_then(rustix::process::Pid::from_raw) else { return false };
    !matches!(rustix::process::test_kill_process(pid), Err(rustix::io::Errno::SRCH))
}

/// Sends the public URL on `ready` once every expected member is registered and has passed a
/// health check.
async fn announce_ready(
    mut members: watch::Receiver<Arc<Membership>>,
    mut healthy: watch::Receiver<HealthMap>,
    expected: Vec<String>,
    url_template: String,
    ready: watch::Sender<Option<String>>,
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
            ready.send_replace(Some(url));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runtime_folders_are_named_by_their_master() {
        assert_eq!(runtime_dir_owner("sc-123"), Some(123));
        assert_eq!(runtime_dir_owner("sc-123-2"), Some(123));
        for other in ["sc-", "sc-x", "sc-config-test-12", "sc-12-", "sc-12-a", "other-12", "sc-1-2-3"] {
            assert_eq!(runtime_dir_owner(other), None, "{other}");
        }
        assert!(process_exists(std::process::id()));
    }
}
