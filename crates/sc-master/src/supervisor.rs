//! Supervise mode: the master runs the balancer, workers and brokers as child processes.
//!
//! Each child has a task that starts it, waits for it to exit (or kills it when the health
//! checker gave up on it), takes it out of the membership and starts it again after an
//! exponential backoff (`[master] respawn_backoff` doubling to `respawn_backoff_max`, back to
//! the start after a minute of uptime). Every exit and respawn goes to the central log.
//!
//! Children are started with `--id`, `--master` (this master's gRPC URL), `--supervisor-pid`
//! (they exit when this process is gone, even after a SIGKILL) and the cluster secret in
//! `SC_CLUSTER__SECRET`. Shutdown goes by tiers: balancers first, then workers, brokers last,
//! each sent SIGTERM and killed if still running after the grace period.

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;

use sc_common::Role;
use sc_common::membership::{Backoff, Severity};
use tokio::process::{Child, Command};
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::central_log::CentralLog;
use crate::health::Instance;
use crate::registry::Registry;

/// Uptime after which a child's backoff starts over.
const STABLE_UPTIME: Duration = Duration::from_secs(60);

/// One child process to keep running.
#[derive(Debug, Clone)]
pub struct ChildSpec {
    pub id: String,
    pub role: Role,
    pub program: PathBuf,
    pub args: Vec<OsString>,
}

/// What every child task shares.
#[derive(Debug, Clone)]
pub struct Settings {
    pub registry: Arc<Registry>,
    pub log: Arc<CentralLog>,
    pub env: Vec<(String, String)>,
    pub backoff: Duration,
    pub backoff_max: Duration,
    pub grace: Duration,
}

/// The running children.
#[derive(Debug)]
pub struct Supervisor {
    /// One kill switch per child id, pulled when the health checker removed it.
    kills: HashMap<String, Arc<Notify>>,
    tiers: Vec<(CancellationToken, JoinSet<()>)>,
}

impl Supervisor {
    /// Starts every child. `specs` come grouped by shutdown tier: balancers, workers, brokers.
    pub fn start(specs: Vec<Vec<ChildSpec>>, settings: Settings) -> Self {
        let mut kills = HashMap::new();
        let mut tiers = Vec::new();
        for tier in specs {
            let stop = CancellationToken::new();
            let mut tasks = JoinSet::new();
            for spec in tier {
                let kill = Arc::new(Notify::new());
                kills.insert(spec.id.clone(), kill.clone());
                tasks.spawn(supervise(spec, settings.clone(), kill, stop.clone()));
            }
            tiers.push((stop, tasks));
        }
        Self { kills, tiers }
    }

    /// Kills the process of a member that the health checker removed (it will be respawned).
    pub fn kill(&self, instance: &Instance) {
        if let Some(kill) = self.kills.get(&instance.0) {
            kill.notify_one();
        }
    }

    /// Forwards health failures to [`Supervisor::kill`] until the channel closes or `shutdown`.
    pub async fn kill_failed(
        &self,
        failed: &mut mpsc::UnboundedReceiver<Instance>,
        shutdown: &CancellationToken,
    ) {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                instance = failed.recv() => match instance {
                    Some(instance) => self.kill(&instance),
                    None => return,
                },
            }
        }
    }

    /// Stops the children tier by tier (balancers, workers, brokers), each with SIGTERM and a
    /// kill after the grace period.
    pub async fn stop(self) {
        for (stop, mut tasks) in self.tiers {
            stop.cancel();
            while tasks.join_next().await.is_some() {}
        }
    }
}

async fn supervise(spec: ChildSpec, settings: Settings, kill: Arc<Notify>, stop: CancellationToken) {
    let mut backoff = Backoff::new(settings.backoff, settings.backoff_max);
    let log = &settings.log;
    loop {
        if stop.is_cancelled() {
            return;
        }
        let mut child = match spawn(&spec, &settings.env) {
            Ok(child) => child,
            Err(e) => {
                let delay = backoff.next_delay();
                log.master(
                    Severity::Error,
                    format!(
                        "cannot start {} ({}): {e}; retrying in {delay:?}",
                        spec.id,
                        spec.program.display()
                    ),
                );
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(delay) => continue,
                }
            }
        };
        let pid = child.id().unwrap_or(0);
        let started = Instant::now();
        tracing::info!(id = %spec.id, pid, "started");
        let status = tokio::select! {
            status = child.wait() => status,
            _ = kill.notified() => {
                let _ = child.start_kill();
                child.wait().await
            }
            _ = stop.cancelled() => {
                terminate(&mut child, pid, settings.grace).await;
                settings.registry.remove(&spec.id, Some(pid));
                tracing::info!(id = %spec.id, pid, "stopped");
                return;
            }
        };
        settings.registry.remove(&spec.id, Some(pid));
        if stop.is_cancelled() {
            return;
        }
        if started.elapsed() >= STABLE_UPTIME {
            backoff.reset();
        }
        let delay = backoff.next_delay();
        let how = describe(status);
        let severity = if delay >= settings.backoff_max { Severity::Error } else { Severity::Warning };
        let looping = if delay >= settings.backoff_max { " (crash loop)" } else { "" };
        log.master(severity, format!("{} (pid {pid}) {how}{looping}; respawning in {delay:?}", spec.id));
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

fn spawn(spec: &ChildSpec, env: &[(String, String)]) -> std::io::Result<Child> {
    Command::new(&spec.program)
        .args(&spec.args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
}

/// SIGTERM, then SIGKILL if the child is still there after `grace`.
async fn terminate(child: &mut Child, pid: u32, grace: Duration) {
    if let Ok(pid) = i32::try_from(pid) {
        // SAFETY: kill(2) with a pid we spawned and have not reaped yet (we hold the Child).
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
    }
    if tokio::time::timeout(grace, child.wait()).await.is_err() {
        tracing::warn!(pid, ?grace, "child did not stop in time, killing it");
        let _ = child.start_kill();
        let _ = child.wait().await;
    }
}

fn describe(status: std::io::Result<ExitStatus>) -> String {
    use std::os::unix::process::ExitStatusExt;
    match status {
        Ok(status) => match (status.code(), status.signal()) {
            (Some(code), _) => format!("exited with code {code}"),
            (None, Some(signal)) => format!("was killed by signal {signal}"),
            _ => "exited".to_owned(),
        },
        Err(e) => format!("could not be waited for: {e}"),
    }
}
