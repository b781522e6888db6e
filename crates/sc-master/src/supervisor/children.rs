//! What the supervisor knows of each child process, for the status API and for the last-resort
//! kill on a second signal, and how it signals them.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard, OnceLock, PoisonError};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use rustix::process::{Pid, Signal};
use sc_common::Role;
use tokio::time::Instant;

/// The table of supervised children, shared by the child tasks, the admin API and `main`.
#[derive(Debug, Default)]
pub(crate) struct Children {
    /// std Mutex: short updates and copies, never held across await.
    table: Mutex<BTreeMap<String, ChildStatus>>,
    /// When a shutdown must be over; set once by [`super::Supervisor::stop`].
    pub(super) deadline: OnceLock<Instant>,
    /// Restarts by the child's role and the cause, for `sc_child_restarts_total`.
    restarts_by_cause: Family<[(&'static str, &'static str); 2], Counter>,
}

/// One supervised child.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ChildStatus {
    pub(crate) role: Role,
    /// The current process; `None` while waiting to respawn.
    pub(crate) pid: Option<u32>,
    pub(crate) state: ChildState,
    /// Processes started after the first one (respawns and rolling-restart replacements).
    pub(crate) restarts: u32,
    /// When the current process started.
    pub(crate) started: Option<Instant>,
    /// A replacement being started in a rolling restart.
    pub(crate) replacement: Option<u32>,
    /// The last error line the child printed (any of its processes), or how its last process
    /// ended when that was a crash it printed no error for.
    pub(crate) last_error: Option<String>,
    /// The process that printed `last_error`.
    pub(super) last_error_pid: Option<u32>,
}

/// The lifecycle state of a supervised child.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ChildState {
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
    /// Being drained on demand (a broker leaving the membership gracefully).
    Draining,
    /// Drained: stopped until it is started again on demand.
    Drained,
}

impl ChildState {
    /// The name used in the status API.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            ChildState::Running => "running",
            ChildState::Replacing => "replacing",
            ChildState::Backoff => "backoff",
            ChildState::Stopping => "stopping",
            ChildState::Stopped => "stopped",
            ChildState::Draining => "draining",
            ChildState::Drained => "drained",
        }
    }
}

impl Children {
    /// A copy of the table.
    pub(crate) fn snapshot(&self) -> BTreeMap<String, ChildStatus> {
        self.lock().clone()
    }

    /// SIGKILL to every child process, for a master that must exit at once (second signal).
    pub(crate) fn kill_all(&self) {
        for status in self.lock().values() {
            for pid in status.pid.iter().chain(status.replacement.iter()) {
                signal(*pid, Signal::KILL);
            }
        }
    }

    /// Sends `signal` to every running child of `role`; returns how many there were.
    pub(crate) fn signal_role(&self, role: Role, sent: Signal) -> usize {
        let pids: Vec<u32> = self.lock().values().filter(|s| s.role == role).filter_map(|s| s.pid).collect();
        for pid in &pids {
            signal(*pid, sent);
        }
        pids.len()
    }

    /// The restart counters by role and cause, to register in the master's metrics.
    pub(crate) fn restart_counts(&self) -> Family<[(&'static str, &'static str); 2], Counter> {
        self.restarts_by_cause.clone()
    }

    /// Counts a restart of a child of `role` ordered for `cause` (`exit`, `health_check`,
    /// `spawn_failed`, `rolling_restart`).
    pub(super) fn count_restart(&self, role: Role, cause: &'static str) {
        self.restarts_by_cause.get_or_create(&[("child_role", role.as_str()), ("cause", cause)]).inc();
    }

    /// Changes the status of `id` (made, waiting to respawn, on first use).
    pub(super) fn update(&self, id: &str, role: Role, change: impl FnOnce(&mut ChildStatus)) {
        let mut table = self.lock();
        let status = table.entry(id.to_owned()).or_insert(ChildStatus {
            role,
            pid: None,
            state: ChildState::Backoff,
            restarts: 0,
            started: None,
            replacement: None,
            last_error: None,
            last_error_pid: None,
        });
        change(status);
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, ChildStatus>> {
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Sends `sent` to the process `pid` (one we spawned); a process already gone is no error.
pub(super) fn signal(pid: u32, sent: Signal) {
    if let Some(pid) = i32::try_from(pid).ok().and_then(Pid::from_raw) {
        let _ = rustix::process::kill_process(pid, sent);
    }
}

/// The name of a signal number, for the central log.
pub(super) fn signal_name(number: i32) -> &'static str {
    const NAMES: [(Signal, &str); 6] = [
        (Signal::KILL, "SIGKILL"),
        (Signal::TERM, "SIGTERM"),
        (Signal::SEGV, "SIGSEGV"),
        (Signal::ABORT, "SIGABRT"),
        (Signal::INT, "SIGINT"),
        (Signal::BUS, "SIGBUS"),
    ];
    NAMES.iter().find(|(signal, _)| signal.as_raw() == number).map_or("signal", |(_, name)| name)
}
