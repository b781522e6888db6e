//! Supervise mode: the master runs the balancer, workers and brokers as child processes.
//!
//! Each child has a task ([`supervise`]) that starts it, waits for it to exit (or kills it when
//! the health checker gave up on it: a hung process), takes it out of the membership and starts
//! it again after an exponential backoff (`[master] respawn_backoff` doubling to
//! `respawn_backoff_max`, back to the start once the child has passed its health checks for a
//! minute). Every exit goes to the central log with its exit code or signal; three exits in a
//! row without that healthy minute are reported as a crash loop, at ERROR.
//!
//! Rolling restart ([`Supervisor::rolling_restart`], SIGUSR2 or the admin API) replaces the
//! workers one at a time, make before break: the old process is retired (it may not register
//! again, so it cannot take its record back) and the new process (same id, so rendezvous
//! placement does not move) is started while the old one still serves; once the new one is
//! registered and healthy, the old one is drained with SIGTERM and its clients reconnect at once
//! to the new one. The next worker goes only after that.
//!
//! Children are started with `--id`, `--master` (this master's gRPC URL), `--supervisor-pid`
//! (they exit when this process is gone, even after a SIGKILL) and the cluster secret in
//! `SC_CLUSTER__SECRET`. Shutdown ([`Supervisor::stop`]) goes by tiers within one deadline:
//! SIGTERM to the balancers (they stop accepting), then to the workers (they drain), then,
//! once both are gone, to the brokers; whatever still runs at the deadline is killed.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use sc_common::Role;
use sc_common::membership::{Backoff, Severity};
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::MasterError;
use crate::central_log::CentralLog;
use crate::health::{HealthMap, Instance};
use crate::registry::Registry;

/// Time healthy after which a child's backoff starts over.
const STABLE_UPTIME: Duration = Duration::from_secs(60);
/// Exits in a row (without a healthy minute between them) that make a crash loop.
const CRASH_LOOP: u32 = 3;
/// How long a replacement may take to register and pass a health check in a rolling restart.
const REPLACE_TIMEOUT: Duration = Duration::from_secs(30);

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
    pub health: watch::Receiver<HealthMap>,
    pub children: Arc<Children>,
    pub env: Vec<(String, String)>,
    pub backoff: Duration,
    pub backoff_max: Duration,
    pub grace: Duration,
}

/// What the supervisor knows of each child, for the status API and for the last-resort kill
/// on a second signal.
#[derive(Debug, Default)]
pub struct Children {
    /// std Mutex: short updates and copies, never held across await.
    table: Mutex<BTreeMap<String, ChildStatus>>,
    /// When a shutdown must be over; set once by [`Supervisor::stop`].
    deadline: OnceLock<Instant>,
}

/// One supervised child.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChildStatus {
    pub role: Role,
    /// The current process; `None` while waiting to respawn.
    pub pid: Option<u32>,
    pub state: ChildState,
    /// Processes started after the first one (respawns and rolling-restart replacements).
    pub restarts: u32,
    /// When the current process started.
    pub started: Option<Instant>,
    /// A replacement being started in a rolling restart.
    pub replacement: Option<u32>,
}

/// The lifecycle state of a supervised child.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChildState {
    /// Running (healthy or not: the health map says which).
    Running,
    /// Being replaced by a new process (rolling restart).
    Replacing,
    /// Exited; waiting for the backoff delay before the respawn.
    Backoff,
    /// Shutting down with the cluster.
    Stopping,
    /// Gone for good (the cluster stopped).
    Stopped,
}

/// The running children.
#[derive(Debug)]
pub struct Supervisor {
    /// One order queue per child task; unbounded because orders are rare (health kills and
    /// rolling restarts) and the sender must never wait.
    orders: HashMap<String, mpsc::UnboundedSender<Order>>,
    /// Worker ids, in restart order.
    workers: Vec<String>,
    /// The shutdown tiers in order. std Mutex: taken once by [`Supervisor::stop`].
    tiers: Mutex<Vec<Tier>>,
    children: Arc<Children>,
    log: Arc<CentralLog>,
    rolling: AtomicBool,
}

/// One shutdown tier: its stop switch, its child tasks and their ids.
type Tier = (CancellationToken, JoinSet<()>, Vec<String>);

/// Something a child task is told to do.
#[derive(Debug)]
enum Order {
    /// Kill the process `pid` (the health checker gave up on it); it will be respawned.
    Kill(u32),
    /// Replace the process with a new one, make before break; answers when the old one is gone.
    Replace(oneshot::Sender<Result<Replaced, String>>),
}

/// What a replacement achieved.
#[derive(Debug, Clone, Copy)]
struct Replaced {
    old: u32,
    new: u32,
    /// From the order to the new process passing its first health check.
    ready_after: Duration,
    /// How long the old process took to drain and exit.
    drained_in: Duration,
}

impl ChildState {
    /// The name used in the status API.
    pub fn as_str(self) -> &'static str {
        match self {
            ChildState::Running => "running",
            ChildState::Replacing => "replacing",
            ChildState::Backoff => "backoff",
            ChildState::Stopping => "stopping",
            ChildState::Stopped => "stopped",
        }
    }
}

impl Children {
    /// A copy of the table.
    pub fn snapshot(&self) -> BTreeMap<String, ChildStatus> {
        self.lock().clone()
    }

    /// SIGKILL to every child process, for a master that must exit at once (second signal).
    pub fn kill_all(&self) {
        for status in self.lock().values() {
            for pid in status.pid.iter().chain(status.replacement.iter()) {
                signal(*pid, libc::SIGKILL);
            }
        }
    }

    /// Sends `signal` to every running child of `role`; returns how many there were.
    pub fn signal_role(&self, role: Role, signal_number: i32) -> usize {
        let pids: Vec<u32> = self.lock().values().filter(|s| s.role == role).filter_map(|s| s.pid).collect();
        for pid in &pids {
            signal(*pid, signal_number);
        }
        pids.len()
    }

    fn update(&self, id: &str, role: Role, change: impl FnOnce(&mut ChildStatus)) {
        let mut table = self.lock();
        let status = table.entry(id.to_owned()).or_insert(ChildStatus {
            role,
            pid: None,
            state: ChildState::Backoff,
            restarts: 0,
            started: None,
            replacement: None,
        });
        change(status);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, ChildStatus>> {
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Supervisor {
    /// Starts every child. `specs` come grouped by shutdown tier: balancers, workers, brokers.
    pub fn start(specs: Vec<Vec<ChildSpec>>, settings: Settings) -> Self {
        let mut orders = HashMap::new();
        let mut workers = Vec::new();
        let mut tiers = Vec::new();
        for tier in specs {
            let stop = CancellationToken::new();
            let mut tasks = JoinSet::new();
            let ids = tier.iter().map(|spec| spec.id.clone()).collect();
            for spec in tier {
                let (tx, rx) = mpsc::unbounded_channel();
                orders.insert(spec.id.clone(), tx);
                if spec.role == Role::Worker {
                    workers.push(spec.id.clone());
                }
                tasks.spawn(supervise(spec, settings.clone(), rx, stop.clone()));
            }
            tiers.push((stop, tasks, ids));
        }
        Self {
            orders,
            workers,
            tiers: Mutex::new(tiers),
            children: settings.children.clone(),
            log: settings.log.clone(),
            rolling: AtomicBool::new(false),
        }
    }

    /// Kills the process of a member that the health checker removed (it will be respawned).
    pub fn kill(&self, instance: &Instance) {
        if let Some(orders) = self.orders.get(&instance.0) {
            let _ = orders.send(Order::Kill(instance.1));
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

    /// Whether a rolling restart is running.
    pub fn rolling_restart_running(&self) -> bool {
        self.rolling.load(Ordering::Acquire)
    }

    /// Starts a rolling restart of the workers in the background, unless one is running.
    pub fn start_rolling_restart(self: &Arc<Self>) -> Result<(), MasterError> {
        if self.rolling.swap(true, Ordering::AcqRel) {
            return Err(MasterError::RollingRestartRunning);
        }
        let this = self.clone();
        tokio::spawn(async move {
            this.rolling_restart().await;
            this.rolling.store(false, Ordering::Release);
        });
        Ok(())
    }

    /// Replaces the workers one at a time, each only after the previous replacement is healthy
    /// and its old process has drained. Stops at the first failure (the old process of the
    /// failed one keeps serving).
    async fn rolling_restart(&self) {
        let started = Instant::now();
        self.log
            .master(Severity::Notice, format!("rolling restart of {} workers started", self.workers.len()));
        for id in &self.workers {
            let Some(orders) = self.orders.get(id) else {
                continue;
            };
            let (tx, rx) = oneshot::channel();
            if orders.send(Order::Replace(tx)).is_err() {
                return;
            }
            match rx.await {
                Ok(Ok(r)) => self.log.master(
                    Severity::Notice,
                    format!(
                        "{id} replaced (pid {} -> {}): new one healthy after {:?}, old one drained in {:?}",
                        r.old, r.new, r.ready_after, r.drained_in
                    ),
                ),
                Ok(Err(why)) => {
                    self.log.master(Severity::Error, format!("rolling restart stopped at {id}: {why}"));
                    return;
                }
                // The cluster is stopping.
                Err(_) => return,
            }
        }
        self.log.master(Severity::Notice, format!("rolling restart done in {:?}", started.elapsed()));
    }

    /// Stops the children by tier within `grace` overall: SIGTERM to the balancers (they stop
    /// accepting), then the workers (they drain their sockets), then, once both tiers are gone,
    /// the brokers. Whatever still runs at the deadline is killed.
    pub async fn stop(&self, grace: Duration) {
        let _ = self.children.deadline.set(Instant::now() + grace);
        let mut tiers = std::mem::take(&mut *self.tiers.lock().unwrap_or_else(PoisonError::into_inner));
        // Front tiers (balancers and workers) go together, in order; the brokers last, since
        // draining workers may still publish.
        let last = if tiers.len() > 1 { tiers.pop() } else { None };
        for (stop, _, ids) in &tiers {
            stop.cancel();
            // The balancers get their SIGTERM (and stop accepting) before the workers close
            // their sockets and the clients reconnect: wait (briefly) until each child task has
            // sent it, which it does right after marking itself stopping.
            for _ in 0..100 {
                let table = self.children.snapshot();
                let signalled = ids.iter().all(|id| {
                    table
                        .get(id)
                        .is_none_or(|s| !matches!(s.state, ChildState::Running | ChildState::Replacing))
                });
                if signalled {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        for (_, mut tasks, _) in tiers {
            while tasks.join_next().await.is_some() {}
        }
        if let Some((stop, mut tasks, _)) = last {
            stop.cancel();
            while tasks.join_next().await.is_some() {}
        }
    }
}

/// One child's life: start, wait, respawn; obey orders; stop with the cluster.
async fn supervise(
    spec: ChildSpec,
    settings: Settings,
    mut orders: mpsc::UnboundedReceiver<Order>,
    stop: CancellationToken,
) {
    let mut backoff = Backoff::new(settings.backoff, settings.backoff_max);
    let mut health = settings.health.clone();
    let log = &settings.log;
    let children = &settings.children;
    let mut crashes = 0u32;
    let mut first = true;
    loop {
        if stop.is_cancelled() {
            break;
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
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(delay) => continue,
                }
            }
        };
        let mut pid = child.id().unwrap_or(0);
        let mut healthy_since = None;
        children.update(&spec.id, spec.role, |s| {
            s.pid = Some(pid);
            s.state = ChildState::Running;
            s.started = Some(Instant::now());
            if !first {
                s.restarts += 1;
            }
        });
        first = false;
        tracing::info!(id = %spec.id, pid, "started");
        let (status, killed) = loop {
            tokio::select! {
                status = child.wait() => break (status, false),
                order = orders.recv() => match order {
                    Some(Order::Kill(target)) if target == pid => {
                        let _ = child.start_kill();
                        break (child.wait().await, true);
                    }
                    Some(Order::Kill(_)) => {}
                    Some(Order::Replace(done)) => {
                        match replace(&spec, &settings, &mut child, &stop).await {
                            Ok((new, replaced)) => {
                                child = new;
                                pid = replaced.new;
                                healthy_since = Some(Instant::now());
                                let _ = done.send(Ok(replaced));
                            }
                            Err(why) => {
                                let _ = done.send(Err(why));
                            }
                        }
                    }
                    None => {}
                },
                changed = health.changed() => {
                    if changed.is_ok() {
                        healthy_since = health
                            .borrow_and_update()
                            .get(&(spec.id.clone(), pid))
                            .and_then(|h| h.healthy_since);
                    }
                }
                _ = stop.cancelled() => {
                    children.update(&spec.id, spec.role, |s| s.state = ChildState::Stopping);
                    terminate(&mut child, pid, children.deadline.get().copied(), settings.grace).await;
                    settings.registry.remove(&spec.id, Some(pid));
                    tracing::info!(id = %spec.id, pid, "stopped");
                    children.update(&spec.id, spec.role, |s| {
                        s.pid = None;
                        s.state = ChildState::Stopped;
                    });
                    return;
                }
            }
        };
        settings.registry.remove(&spec.id, Some(pid));
        children.update(&spec.id, spec.role, |s| {
            s.pid = None;
            s.state = ChildState::Backoff;
        });
        if stop.is_cancelled() {
            break;
        }
        if healthy_since.is_some_and(|since| since.elapsed() >= STABLE_UPTIME) {
            backoff.reset();
            crashes = 0;
        }
        crashes += 1;
        let delay = backoff.next_delay();
        let mut how = describe(status);
        if killed {
            how = format!("was killed by the master after failing its health checks ({how})");
        }
        let message = if crashes >= CRASH_LOOP {
            format!(
                "{} is crash-looping: {crashes} exits in a row without a healthy minute; the last one (pid {pid}) {how}; respawning in {delay:?}",
                spec.id
            )
        } else {
            format!("{} (pid {pid}) {how}; respawning in {delay:?}", spec.id)
        };
        let severity = if crashes >= CRASH_LOOP { Severity::Error } else { Severity::Warning };
        log.master(severity, message);
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(delay) => {}
        }
    }
    children.update(&spec.id, spec.role, |s| {
        s.pid = None;
        s.state = ChildState::Stopped;
    });
}

/// Make before break: retires `old`, starts a new process for `spec` while `old` serves, waits
/// until the new one is registered and healthy, then drains the old one. On failure the new
/// process is killed and the old one keeps serving.
async fn replace(
    spec: &ChildSpec,
    settings: &Settings,
    old: &mut Child,
    stop: &CancellationToken,
) -> Result<(Child, Replaced), String> {
    let ordered = Instant::now();
    let old_pid = old.id().unwrap_or(0);
    // Retired first: the old process's periodic re-registration must not take the record back
    // from its replacement (it keeps serving with the membership it has meanwhile).
    settings.registry.retire(&spec.id, old_pid, true);
    let mut new = match spawn(spec, &settings.env) {
        Ok(new) => new,
        Err(e) => {
            settings.registry.retire(&spec.id, old_pid, false);
            return Err(format!("cannot start: {e}"));
        }
    };
    let new_pid = new.id().unwrap_or(0);
    let children = &settings.children;
    children.update(&spec.id, spec.role, |s| {
        s.state = ChildState::Replacing;
        s.replacement = Some(new_pid);
    });
    tracing::info!(id = %spec.id, old = old_pid, new = new_pid, "replacement started");
    let instance = (spec.id.clone(), new_pid);
    let mut health = settings.health.clone();
    let deadline = ordered + REPLACE_TIMEOUT;
    let outcome = loop {
        let ready = health.borrow_and_update().get(&instance).is_some_and(|h| h.healthy_since.is_some());
        if ready {
            break Ok(());
        }
        tokio::select! {
            changed = health.changed() => if changed.is_err() { break Err("the health checker stopped".to_owned()) },
            status = new.wait() => break Err(format!("the replacement (pid {new_pid}) {}", describe(status))),
            _ = tokio::time::sleep_until(deadline) => break Err(format!("the replacement (pid {new_pid}) was not healthy within {REPLACE_TIMEOUT:?}")),
            _ = stop.cancelled() => break Err("the cluster is stopping".to_owned()),
        }
    };
    if let Err(why) = outcome {
        let _ = new.start_kill();
        let _ = new.wait().await;
        settings.registry.remove(&spec.id, Some(new_pid));
        // The old process registers again on its own within its retry backoff.
        settings.registry.retire(&spec.id, old_pid, false);
        children.update(&spec.id, spec.role, |s| {
            s.state = ChildState::Running;
            s.replacement = None;
        });
        return Err(why);
    }
    let ready_after = ordered.elapsed();
    let draining = Instant::now();
    terminate(old, old_pid, None, settings.grace).await;
    let drained_in = draining.elapsed();
    settings.registry.remove(&spec.id, Some(old_pid));
    settings.registry.retire(&spec.id, old_pid, false);
    children.update(&spec.id, spec.role, |s| {
        s.pid = Some(new_pid);
        s.replacement = None;
        s.state = ChildState::Running;
        s.started = Some(Instant::now());
        s.restarts += 1;
    });
    Ok((new, Replaced { old: old_pid, new: new_pid, ready_after, drained_in }))
}

fn spawn(spec: &ChildSpec, env: &[(String, String)]) -> std::io::Result<Child> {
    Command::new(&spec.program)
        .args(&spec.args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
}

/// SIGTERM, then SIGKILL if the child is still there at `deadline` (or after `grace`).
async fn terminate(child: &mut Child, pid: u32, deadline: Option<Instant>, grace: Duration) {
    signal(pid, libc::SIGTERM);
    let deadline = deadline.unwrap_or_else(|| Instant::now() + grace);
    if tokio::time::timeout_at(deadline, child.wait()).await.is_err() {
        tracing::warn!(pid, ?grace, "child did not stop in time, killing it");
        let _ = child.start_kill();
        let _ = child.wait().await;
    }
}

fn signal(pid: u32, signal: i32) {
    if let Ok(pid) = i32::try_from(pid)
        && pid > 0
    {
        // SAFETY: kill(2) has no memory-safety preconditions; the pid is one we spawned.
        unsafe {
            libc::kill(pid, signal);
        }
    }
}

fn describe(status: std::io::Result<ExitStatus>) -> String {
    use std::os::unix::process::ExitStatusExt;
    match status {
        Ok(status) => match (status.code(), status.signal()) {
            (Some(code), _) => format!("exited with code {code}"),
            (None, Some(signal)) => {
                format!("was killed by signal {signal} ({})", signal_name(signal))
            }
            _ => "exited".to_owned(),
        },
        Err(e) => format!("could not be waited for: {e}"),
    }
}

fn signal_name(signal: i32) -> &'static str {
    match signal {
        libc::SIGKILL => "SIGKILL",
        libc::SIGTERM => "SIGTERM",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGABRT => "SIGABRT",
        libc::SIGINT => "SIGINT",
        libc::SIGBUS => "SIGBUS",
        _ => "signal",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::Health;

    /// Waits (in paused time, which moves on while we wait) for `check` to hold.
    async fn until<T>(mut check: impl FnMut() -> Option<T>) -> T {
        for _ in 0..100_000 {
            if let Some(value) = check() {
                return value;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("condition never held");
    }

    fn current_pid(children: &Children, id: &str, not: &[u32]) -> Option<u32> {
        let pid = children.snapshot().get(id)?.pid?;
        (!not.contains(&pid)).then_some(pid)
    }

    #[tokio::test(start_paused = true)]
    async fn backoff_doubles_reports_a_crash_loop_and_resets_after_a_healthy_minute() {
        let log = Arc::new(CentralLog::default());
        let children = Arc::new(Children::default());
        let (health_tx, health_rx) = watch::channel(HealthMap::new());
        let settings = Settings {
            registry: Arc::new(Registry::default()),
            log: log.clone(),
            health: health_rx,
            children: children.clone(),
            env: Vec::new(),
            backoff: Duration::from_millis(100),
            backoff_max: Duration::from_secs(30),
            grace: Duration::from_secs(1),
        };
        let spec = ChildSpec {
            id: "worker-0".into(),
            role: Role::Worker,
            program: "sleep".into(),
            args: vec!["1000".into()],
        };
        let supervisor = Supervisor::start(vec![vec![spec]], settings);
        let said = |needle: String| {
            let log = log.clone();
            move || log.recent().into_iter().find(|e| e.message.contains(&needle))
        };

        let mut seen = Vec::new();
        for (n, delay) in [(1, "100ms"), (2, "200ms"), (3, "400ms")] {
            let pid = until(|| current_pid(&children, "worker-0", &seen)).await;
            seen.push(pid);
            signal(pid, libc::SIGKILL);
            let entry = until(said(format!("pid {pid}) was killed by signal 9"))).await;
            assert!(entry.message.contains(&format!("respawning in {delay}")), "{entry:?}");
            let crash_loop = n >= CRASH_LOOP;
            assert_eq!(entry.message.contains("crash-looping"), crash_loop, "{entry:?}");
            let severity = if crash_loop { Severity::Error } else { Severity::Warning };
            assert_eq!(entry.severity, severity);
        }
        // Three exits, three respawns (the last one after its 400 ms).
        until(|| (children.snapshot()["worker-0"].restarts == 3).then_some(())).await;

        // A minute healthy: the next exit starts the backoff over.
        let pid = until(|| current_pid(&children, "worker-0", &seen)).await;
        seen.push(pid);
        health_tx.send_modify(|map| {
            map.insert(("worker-0".into(), pid), Health { healthy_since: Some(Instant::now()), misses: 0 });
        });
        tokio::time::advance(STABLE_UPTIME + Duration::from_secs(1)).await;
        signal(pid, libc::SIGKILL);
        let entry = until(said(format!("pid {pid}) was killed by signal 9"))).await;
        assert!(entry.message.contains("respawning in 100ms"), "{entry:?}");
        assert_eq!(entry.severity, Severity::Warning, "no longer a crash loop");

        supervisor.stop(Duration::from_secs(1)).await;
        assert!(children.snapshot()["worker-0"].pid.is_none());
    }
}
