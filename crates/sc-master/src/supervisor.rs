//! Supervise mode: the master runs the balancer, workers and brokers as child processes.
//!
//! Each child has a task ([`supervise`]) that runs one process after another: [`run_child`] is
//! one process's life (start it, wait for it to exit or kill it when the health checker gave up
//! on it, a hung process, and take it out of the membership), and the child's [`CrashLoop`]
//! says how long to wait before the next one and whether the exits make a crash loop. Every
//! exit goes to the central log with its exit code or signal.
//!
//! A child whose very first process exits before it ever passed a health check failed its first
//! start: a bad configuration, a port in use, a missing file. Respawning it would only loop, so
//! the child task reports [`MasterError::FirstStart`] (with the last line the child printed on
//! stderr, its error, see [`stderr`]) on `Settings::failed_start`, and the master stops the
//! cluster and exits with it. Crashes after a successful start keep the respawn back-off.
//!
//! Rolling restart ([`Supervisor::start_rolling_restart`], SIGUSR2 or the admin API) replaces
//! the workers one at a time, make before break: the old process is retired (it may not
//! register again, so it cannot take its record back) and the new process (same id, so
//! rendezvous placement does not move) is started while the old one still serves; once the new
//! one is registered and healthy, the old one is drained with SIGTERM and its clients reconnect
//! at once to the new one. The next worker goes only after that.
//!
//! Draining a broker ([`Supervisor::drain`], the admin API) takes it out of the membership at
//! once, as its own graceful leave does (it is retired first, so that it cannot register
//! again): the workers move its channels to the other brokers, and it gets SIGTERM, on which it
//! serves the streams still open for its drain period and exits. It stays stopped (`drained`)
//! until [`Supervisor::undrain`] starts it again. The last running broker cannot be drained.
//!
//! What a child is started with is in [`env`]; the table of children (status API, last-resort
//! kill) in [`children`]. Shutdown ([`Supervisor::stop`]) goes by tiers within one deadline:
//! SIGTERM to the balancers (they stop accepting), then to the workers (they drain), then,
//! once both are gone, to the brokers; whatever still runs at the deadline is killed.

use std::collections::HashMap;
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustix::process::Signal;
use sc_common::Role;
use sc_common::membership::Severity;
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

mod children;
mod crash_loop;
mod env;
mod listeners;
mod stderr;

pub(crate) use children::{ChildState, Children};
pub(crate) use env::{ChildSpec, Programs, child_env, child_specs};
pub(crate) use listeners::PublicListener;

use crate::MasterError;
use crate::central_log::CentralLog;
use crate::health::{HealthMap, Instance};
use crate::registry::Registry;
use children::{signal, signal_name};
use crash_loop::CrashLoop;

/// How long a replacement may take to register and pass a health check in a rolling restart.
const REPLACE_TIMEOUT: Duration = Duration::from_secs(30);

/// What every child task shares.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub(crate) registry: Arc<Registry>,
    pub(crate) log: Arc<CentralLog>,
    pub(crate) health: watch::Receiver<HealthMap>,
    pub(crate) children: Arc<Children>,
    pub(crate) env: Vec<(String, String)>,
    pub(crate) backoff: Duration,
    pub(crate) backoff_max: Duration,
    pub(crate) grace: Duration,
    /// Where a child that failed its first start says so (see the module doc); unbounded:
    /// at most one message per child.
    pub(crate) failed_start: mpsc::UnboundedSender<MasterError>,
    /// The public listener that every balancer is started with (see [`listeners`]); `None`:
    /// balancers bind `[balancer] listen` themselves.
    pub(crate) public: Option<Arc<PublicListener>>,
}

/// The running children.
#[derive(Debug)]
pub(crate) struct Supervisor {
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
    /// Rolling restarts started, and how the last one ended. std Mutex: short copies.
    rolling_outcome: Mutex<(u64, Option<RollingOutcome>)>,
}

/// How a rolling restart ended, for the status API and the admin page.
#[derive(Debug, Clone)]
pub(crate) struct RollingOutcome {
    /// Which one it was (1 for the first of this master).
    pub(crate) number: u64,
    /// Whether every worker was replaced.
    pub(crate) ok: bool,
    /// What the central log says of its end.
    pub(crate) message: String,
    /// When it ended, milliseconds since the Unix epoch.
    pub(crate) finished_ms: u64,
}

/// One shutdown tier: its stop switch, its child tasks and their ids.
type Tier = (CancellationToken, JoinSet<()>, Vec<String>);

/// A started process and the relay of its stderr, which ends with the last line it wrote.
type Spawned = (Child, JoinHandle<Option<String>>);

/// Something a child task is told to do.
#[derive(Debug)]
enum Order {
    /// Kill the process `pid` (the health checker gave up on it); it will be respawned.
    Kill(u32),
    /// Replace the process with a new one, make before break; answers when the old one is gone.
    Replace(oneshot::Sender<Result<Replaced, MasterError>>),
    /// Take the process out of the membership, stop it gracefully and start none until
    /// [`Order::Undrain`] (brokers).
    Drain,
    /// Start a drained child again.
    Undrain,
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

impl Supervisor {
    /// Starts every child. `specs` come grouped by shutdown tier: balancers, workers, brokers.
    pub(crate) fn start(specs: Vec<Vec<ChildSpec>>, settings: Settings) -> Self {
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
            rolling_outcome: Mutex::new((0, None)),
        }
    }

    /// Kills the process of a member that the health checker removed (it will be respawned).
    pub(crate) fn kill(&self, instance: &Instance) {
        if let Some(orders) = self.orders.get(&instance.0) {
            let _ = orders.send(Order::Kill(instance.1));
        }
    }

    /// Forwards health failures to [`Supervisor::kill`] until the channel closes or `shutdown`.
    pub(crate) async fn kill_failed(
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
    pub(crate) fn rolling_restart_running(&self) -> bool {
        self.rolling.load(Ordering::Acquire)
    }

    /// How many rolling restarts were started, and how the last one that ended did.
    pub(crate) fn rolling_restarts(&self) -> (u64, Option<RollingOutcome>) {
        self.rolling_outcome.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Starts a rolling restart of the workers in the background, unless one is running; returns
    /// its number (see [`RollingOutcome::number`]).
    pub(crate) fn start_rolling_restart(self: &Arc<Self>) -> Result<u64, MasterError> {
        if self.rolling.swap(true, Ordering::AcqRel) {
            return Err(MasterError::RollingRestartRunning);
        }
        let number = {
            let mut outcome = self.rolling_outcome.lock().unwrap_or_else(PoisonError::into_inner);
            outcome.0 += 1;
            outcome.0
        };
        let this = self.clone();
        tokio::spawn(async move {
            let (ok, message) = this.rolling_restart().await;
            let finished_ms =
                SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
            this.rolling_outcome.lock().unwrap_or_else(PoisonError::into_inner).1 =
                Some(RollingOutcome { number, ok, message, finished_ms });
            this.rolling.store(false, Ordering::Release);
        });
        Ok(number)
    }

    /// Drains the broker `id` in the background (see the module doc): refused for an unknown
    /// id or another role, a broker that is not running, and the last running broker.
    pub(crate) fn drain(&self, id: &str) -> Result<(), MasterError> {
        let table = self.children.snapshot();
        let orders = self.broker_orders(id, &table)?;
        let state = table[id].state;
        if state != ChildState::Running {
            return Err(MasterError::BrokerState {
                id: id.to_owned(),
                state: state.as_str(),
                need: "running",
            });
        }
        let others = table
            .iter()
            .filter(|(other, s)| {
                other.as_str() != id && s.role == Role::Broker && s.state == ChildState::Running
            })
            .count();
        if others == 0 {
            return Err(MasterError::LastBroker { id: id.to_owned() });
        }
        // Marked at once, so that draining the other brokers now sees this one gone.
        self.children.update(id, Role::Broker, |s| s.state = ChildState::Draining);
        orders.send(Order::Drain).map_err(|_| MasterError::Stopping)
    }

    /// Starts a drained broker again.
    pub(crate) fn undrain(&self, id: &str) -> Result<(), MasterError> {
        let table = self.children.snapshot();
        let orders = self.broker_orders(id, &table)?;
        let state = table[id].state;
        if state != ChildState::Drained {
            return Err(MasterError::BrokerState {
                id: id.to_owned(),
                state: state.as_str(),
                need: "drained",
            });
        }
        orders.send(Order::Undrain).map_err(|_| MasterError::Stopping)
    }

    /// The order queue of the broker `id`.
    fn broker_orders(
        &self,
        id: &str,
        table: &std::collections::BTreeMap<String, children::ChildStatus>,
    ) -> Result<&mpsc::UnboundedSender<Order>, MasterError> {
        match (self.orders.get(id), table.get(id)) {
            (Some(orders), Some(status)) if status.role == Role::Broker => Ok(orders),
            _ => Err(MasterError::NoSuchBroker { id: id.to_owned() }),
        }
    }

    /// Replaces the workers one at a time, each only after the previous replacement is healthy
    /// and its old process has drained. Stops at the first failure (the old process of the
    /// failed one keeps serving). Returns whether every worker was replaced, and the message
    /// logged at the end.
    async fn rolling_restart(&self) -> (bool, String) {
        let started = Instant::now();
        self.log
            .master(Severity::Notice, format!("rolling restart of {} workers started", self.workers.len()));
        for id in &self.workers {
            let Some(orders) = self.orders.get(id) else {
                continue;
            };
            let (tx, rx) = oneshot::channel();
            if orders.send(Order::Replace(tx)).is_err() {
                return (false, MasterError::Stopping.to_string());
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
                    let message = format!("rolling restart stopped at {id}: {why}");
                    self.log.master(Severity::Error, message.clone());
                    return (false, message);
                }
                // The cluster is stopping.
                Err(_) => return (false, MasterError::Stopping.to_string()),
            }
        }
        let message = format!("rolling restart done in {:?}", started.elapsed());
        self.log.master(Severity::Notice, message.clone());
        (true, message)
    }

    /// Stops the children by tier within `grace` overall: SIGTERM to the balancers (they stop
    /// accepting), then the workers (they drain their sockets), then, once both tiers are gone,
    /// the brokers. Whatever still runs at the deadline is killed.
    pub(crate) async fn stop(&self, grace: Duration) {
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

/// How one child process's life ended (see [`run_child`]).
#[derive(Debug)]
enum Exit {
    /// It could not be started.
    NotStarted(MasterError),
    /// It ended: on its own, or killed by the master after failing its health checks.
    Ended {
        pid: u32,
        status: std::io::Result<ExitStatus>,
        killed: bool,
        /// Passing its health checks since then (`None`: never, or not at the end).
        healthy_since: Option<Instant>,
        /// Whether it ever passed a health check.
        ever_healthy: bool,
        /// The last line it wrote on stderr.
        last_line: Option<String>,
    },
    /// The cluster is stopping: it was terminated and marked stopped.
    Stopped,
    /// It was drained on demand ([`Order::Drain`]); no respawn until [`Order::Undrain`].
    Drained,
}

/// One child's life after life: [`run_child`], then the respawn delay of its [`CrashLoop`],
/// until the cluster stops.
async fn supervise(
    spec: ChildSpec,
    settings: Settings,
    mut orders: mpsc::UnboundedReceiver<Order>,
    stop: CancellationToken,
) {
    let mut crashes = CrashLoop::new(settings.backoff, settings.backoff_max);
    let mut restart = false;
    while !stop.is_cancelled() {
        let first = !restart;
        let (severity, message, delay) = match run_child(&spec, &settings, &mut orders, &stop, restart).await
        {
            Exit::Stopped => return,
            Exit::Drained => {
                if !wait_for_undrain(&mut orders, &stop).await {
                    break;
                }
                restart = true;
                continue;
            }
            Exit::NotStarted(e) if first => {
                settings.log.master(Severity::Error, format!("{}: {e}", spec.id));
                let _ = settings.failed_start.send(e);
                break;
            }
            Exit::NotStarted(e) => {
                settings.children.count_restart(spec.role, "spawn_failed");
                let delay = crashes.not_started();
                (Severity::Error, format!("{}: {e}; retrying in {delay:?}", spec.id), delay)
            }
            Exit::Ended { pid, status, killed, healthy_since, ever_healthy, last_line } => {
                restart = true;
                if stop.is_cancelled() {
                    break;
                }
                if first && !killed && !ever_healthy {
                    let code = status.as_ref().ok().and_then(ExitStatus::code);
                    let error = MasterError::FirstStart {
                        id: spec.id.clone(),
                        pid,
                        how: describe(status),
                        code,
                        message: last_line.unwrap_or_default(),
                    };
                    settings.log.master(Severity::Error, error.to_string());
                    let _ = settings.failed_start.send(error);
                    break;
                }
                settings.children.count_restart(spec.role, if killed { "health_check" } else { "exit" });
                let respawn = crashes.exited(healthy_since, Instant::now());
                let delay = respawn.delay;
                let mut how = describe(status);
                if killed {
                    how = format!("was killed by the master after failing its health checks ({how})");
                }
                // A crash that printed no error of its own is shown by how it ended.
                settings.children.update(&spec.id, spec.role, |s| {
                    if s.last_error_pid != Some(pid) {
                        s.last_error = Some(format!("pid {pid} {how}"));
                        s.last_error_pid = Some(pid);
                    }
                });
                let message = if respawn.is_crash_loop() {
                    format!(
                        "{} is crash-looping: {} exits in a row without a healthy minute; the last one (pid {pid}) {how}; respawning in {delay:?}",
                        spec.id, respawn.exits
                    )
                } else {
                    format!("{} (pid {pid}) {how}; respawning in {delay:?}", spec.id)
                };
                (respawn.severity(), message, delay)
            }
        };
        settings.log.master(severity, message);
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(delay) => {}
        }
    }
    settings.children.update(&spec.id, spec.role, |s| {
        s.pid = None;
        s.state = ChildState::Stopped;
    });
}

/// One process of `spec`: starts it, obeys orders while it runs (a health kill, a rolling
/// restart's replacement, after which the replacement is the process waited for), stops it
/// with the cluster, and says how it ended. `restart` counts the start as a restart.
async fn run_child(
    spec: &ChildSpec,
    settings: &Settings,
    orders: &mut mpsc::UnboundedReceiver<Order>,
    stop: &CancellationToken,
    restart: bool,
) -> Exit {
    let children = &settings.children;
    let (mut child, mut last_line) = match spawn(spec, settings) {
        Ok(spawned) => spawned,
        Err(e) => return Exit::NotStarted(e),
    };
    let mut health = settings.health.clone();
    let mut pid = child.id().unwrap_or(0);
    let mut healthy_since = None;
    let mut ever_healthy = false;
    children.update(&spec.id, spec.role, |s| {
        s.pid = Some(pid);
        s.state = ChildState::Running;
        s.started = Some(Instant::now());
        if restart {
            s.restarts += 1;
        }
    });
    tracing::info!(id = %spec.id, pid, "started");
    let (status, killed) = loop {
        tokio::select! {
            status = child.wait() => break (status, false),
            order = orders.recv() => match order {
                Some(Order::Kill(target)) if target == pid => {
                    let _ = child.start_kill();
                    break (child.wait().await, true);
                }
                Some(Order::Kill(_) | Order::Undrain) | None => {}
                Some(Order::Drain) => return drain(spec, settings, &mut child, pid).await,
                Some(Order::Replace(done)) => {
                    let replaced = replace(spec, settings, &mut child, stop).await.map(|(new, replaced)| {
                        (child, last_line) = new;
                        pid = replaced.new;
                        healthy_since = Some(Instant::now());
                        ever_healthy = true;
                        replaced
                    });
                    let _ = done.send(replaced);
                }
            },
            changed = health.changed() => {
                if changed.is_ok() {
                    healthy_since = health
                        .borrow_and_update()
                        .get(&(spec.id.clone(), pid))
                        .and_then(|h| h.healthy_since);
                    ever_healthy |= healthy_since.is_some();
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
                return Exit::Stopped;
            }
        }
    };
    settings.registry.remove(&spec.id, Some(pid));
    children.update(&spec.id, spec.role, |s| {
        s.pid = None;
        s.state = ChildState::Backoff;
    });
    // The child has exited: its stderr ends at once (unless a process it started holds it).
    let last_line =
        tokio::time::timeout(Duration::from_secs(1), last_line).await.ok().and_then(Result::ok).flatten();
    Exit::Ended { pid, status, killed, healthy_since, ever_healthy, last_line }
}

/// Drains the process `pid` of `spec` (see the module doc): out of the membership and retired,
/// SIGTERM, waited for (killed after `[master] shutdown_grace`), marked drained.
async fn drain(spec: &ChildSpec, settings: &Settings, child: &mut Child, pid: u32) -> Exit {
    let started = Instant::now();
    settings.children.update(&spec.id, spec.role, |s| s.state = ChildState::Draining);
    settings.registry.retire(&spec.id, pid, true);
    settings.registry.remove(&spec.id, Some(pid));
    terminate(child, pid, None, settings.grace).await;
    settings.registry.retire(&spec.id, pid, false);
    settings.children.update(&spec.id, spec.role, |s| {
        s.pid = None;
        s.started = None;
        s.state = ChildState::Drained;
    });
    settings.log.master(
        Severity::Notice,
        format!(
            "{} (pid {pid}) drained in {:?}: its channels moved to the other brokers; it stays stopped until undrained",
            spec.id,
            started.elapsed()
        ),
    );
    Exit::Drained
}

/// Waits, while a child is drained, for [`Order::Undrain`] (true) or the cluster's stop (false).
/// A rolling restart's replacement order is answered with an error meanwhile.
async fn wait_for_undrain(orders: &mut mpsc::UnboundedReceiver<Order>, stop: &CancellationToken) -> bool {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return false,
            order = orders.recv() => match order {
                Some(Order::Undrain) => return true,
                Some(Order::Replace(done)) => {
                    let _ = done.send(Err(MasterError::Stopping));
                }
                Some(Order::Kill(_) | Order::Drain) => {}
                None => return false,
            },
        }
    }
}

/// Make before break: retires `old`, starts a new process for `spec` while `old` serves, waits
/// until the new one is registered and healthy, then drains the old one. On failure the new
/// process is killed and the old one keeps serving.
async fn replace(
    spec: &ChildSpec,
    settings: &Settings,
    old: &mut Child,
    stop: &CancellationToken,
) -> Result<(Spawned, Replaced), MasterError> {
    let ordered = Instant::now();
    let old_pid = old.id().unwrap_or(0);
    // Retired first: the old process's periodic re-registration must not take the record back
    // from its replacement (it keeps serving with the membership it has meanwhile).
    settings.registry.retire(&spec.id, old_pid, true);
    let (mut new, new_stderr) = match spawn(spec, settings) {
        Ok(new) => new,
        Err(e) => {
            settings.registry.retire(&spec.id, old_pid, false);
            return Err(e);
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
            changed = health.changed() => if changed.is_err() { break Err(MasterError::HealthCheckerStopped) },
            status = new.wait() => break Err(MasterError::ReplacementExited { pid: new_pid, how: describe(status) }),
            _ = tokio::time::sleep_until(deadline) => {
                break Err(MasterError::ReplacementTimeout { pid: new_pid, timeout: REPLACE_TIMEOUT });
            }
            _ = stop.cancelled() => break Err(MasterError::Stopping),
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
    children.count_restart(spec.role, "rolling_restart");
    Ok(((new, new_stderr), Replaced { old: old_pid, new: new_pid, ready_after, drained_in }))
}

/// Starts a process of `spec`, its stderr relayed to the master's ([`stderr::relay`]); a
/// balancer gets the public listener ([`listeners`]). Every child has a process group of its
/// own: Ctrl-C in a terminal signals the terminal's foreground group, which is then the master
/// alone, and the master stops the children in order (balancers, workers, brokers) instead of
/// all of them getting SIGINT at once.
fn spawn(spec: &ChildSpec, settings: &Settings) -> Result<Spawned, MasterError> {
    let spawn_error = |source| MasterError::Spawn { program: spec.program.display().to_string(), source };
    let inherits = match &settings.public {
        Some(public) if spec.role == Role::Balancer => {
            public.command(&spec.program, &spec.args).map_err(spawn_error)?
        }
        _ => None,
    };
    let mut command = match inherits {
        Some(command) => command,
        None => {
            let mut command = Command::new(&spec.program);
            command.args(&spec.args);
            for var in listeners::LISTEN_VARS {
                command.env_remove(var);
            }
            command
        }
    };
    let mut child = command
        .envs(settings.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(spawn_error)?;
    let pid = child.id().unwrap_or(0);
    // Its central log events would repeat the lines relayed here.
    settings.log.relaying(pid);
    let last_line = match child.stderr.take() {
        Some(stderr) => {
            let (children, id, role) = (settings.children.clone(), spec.id.clone(), spec.role);
            stderr::relay(stderr, spec.id.clone(), move |error| {
                children.update(&id, role, |s| {
                    s.last_error = Some(error);
                    s.last_error_pid = Some(pid);
                });
            })
        }
        None => tokio::spawn(async { None }),
    };
    Ok((child, last_line))
}

/// SIGTERM, then SIGKILL if the child is still there at `deadline` (or after `grace`).
async fn terminate(child: &mut Child, pid: u32, deadline: Option<Instant>, grace: Duration) {
    signal(pid, Signal::TERM);
    let deadline = deadline.unwrap_or_else(|| Instant::now() + grace);
    if tokio::time::timeout_at(deadline, child.wait()).await.is_err() {
        tracing::warn!(pid, ?grace, "child did not stop in time, killing it");
        let _ = child.start_kill();
        let _ = child.wait().await;
    }
}

/// How a process ended, for the central log.
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::Health;
    use crash_loop::{CRASH_LOOP, STABLE_UPTIME};

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
            failed_start: mpsc::unbounded_channel().0,
            public: None,
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
            if n == 1 {
                // A first start that succeeded: only then do exits make a crash loop.
                health_tx.send_modify(|map| {
                    map.insert(
                        ("worker-0".into(), pid),
                        Health { healthy_since: Some(Instant::now()), misses: 0 },
                    );
                });
                until(|| (children.snapshot()["worker-0"].state == ChildState::Running).then_some(())).await;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            seen.push(pid);
            signal(pid, Signal::KILL);
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
        signal(pid, Signal::KILL);
        let entry = until(said(format!("pid {pid}) was killed by signal 9"))).await;
        assert!(entry.message.contains("respawning in 100ms"), "{entry:?}");
        assert_eq!(entry.severity, Severity::Warning, "no longer a crash loop");

        supervisor.stop(Duration::from_secs(1)).await;
        assert!(children.snapshot()["worker-0"].pid.is_none());
    }

    #[tokio::test]
    async fn a_child_that_fails_its_first_start_is_reported_with_its_last_words_not_respawned() {
        let log = Arc::new(CentralLog::default());
        let children = Arc::new(Children::default());
        let (failed_start, mut failed) = mpsc::unbounded_channel();
        let settings = Settings {
            registry: Arc::new(Registry::default()),
            log: log.clone(),
            health: watch::channel(HealthMap::new()).1,
            children: children.clone(),
            env: Vec::new(),
            backoff: Duration::from_millis(10),
            backoff_max: Duration::from_millis(10),
            grace: Duration::from_secs(1),
            failed_start,
            public: None,
        };
        let spec = ChildSpec {
            id: "balancer-0".into(),
            role: Role::Balancer,
            program: "sh".into(),
            args: vec![
                "-c".into(),
                "echo starting >&2; echo 'config: balancer.tls_key: bad' >&2; exit 64".into(),
            ],
        };
        let supervisor = Supervisor::start(vec![vec![spec]], settings);
        let error = tokio::time::timeout(Duration::from_secs(10), failed.recv()).await.unwrap().unwrap();
        let MasterError::FirstStart { ref id, code, ref message, .. } = error else { panic!("{error:?}") };
        assert_eq!(
            (id.as_str(), code, message.as_str()),
            ("balancer-0", Some(64), "config: balancer.tls_key: bad")
        );
        assert!(
            error.to_string().contains("failed at its first start: it exited with code 64: config:"),
            "{error}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(children.snapshot()["balancer-0"].restarts, 0, "not respawned");
        supervisor.stop(Duration::from_secs(1)).await;
    }
}
