//! The central log: errors and notices from every daemon, written in one place.
//!
//! Daemons report through the gRPC `ReportEvent` call; the master adds its own events
//! (exits, respawns, health failures). Each entry is logged by the master under the target
//! `central` (so RUST_LOG and the JSON format apply), except those of the master's own
//! children, whose lines the master relays already, and the most recent ones are kept in memory
//! (`GET /log`, `/status`).

use std::collections::{HashSet, VecDeque};
use std::sync::{Mutex, PoisonError};

use sc_common::Role;
use sc_common::membership::Severity;
use sc_common::now_ms;

/// How many entries are kept in memory.
const KEEP: usize = 1000;

/// One entry of the central log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Entry {
    /// `None` for the master itself.
    pub(crate) role: Option<Role>,
    pub(crate) id: String,
    pub(crate) pid: u32,
    pub(crate) time_ms: u64,
    pub(crate) severity: Severity,
    pub(crate) message: String,
    pub(crate) location: String,
}

/// The in-memory tail of the central log.
#[derive(Debug, Default)]
pub(crate) struct CentralLog {
    /// std Mutex: a push or a copy, never held across await.
    recent: Mutex<VecDeque<Entry>>,
    /// The processes whose standard error the master relays (its children in supervise mode):
    /// their events are kept but not printed again, since their own lines are on the master's
    /// output already. Kept for the master's life (a pid per child process started: small);
    /// an event may arrive after its process is gone. std Mutex: an insert or a lookup.
    relayed: Mutex<HashSet<u32>>,
}

impl CentralLog {
    /// The process `pid`'s own lines are relayed to the master's output: its events are kept,
    /// not printed.
    pub(crate) fn relaying(&self, pid: u32) {
        self.relayed.lock().unwrap_or_else(PoisonError::into_inner).insert(pid);
    }

    /// Writes an entry to the log (unless its process's lines are relayed, see
    /// [`CentralLog::relaying`]) and keeps it.
    pub(crate) fn record(&self, entry: Entry) {
        let relayed = entry.role.is_some()
            && self.relayed.lock().unwrap_or_else(PoisonError::into_inner).contains(&entry.pid);
        if !relayed {
            Self::print(&entry);
        }
        let mut recent = self.recent.lock().unwrap_or_else(PoisonError::into_inner);
        if recent.len() == KEEP {
            recent.pop_front();
        }
        recent.push_back(entry);
    }

    /// Logs `entry` under the target `central`.
    fn print(entry: &Entry) {
        let role = entry.role.map_or("master", Role::as_str);
        let (id, pid, message) = (&entry.id, entry.pid, &entry.message);
        // Left out when there is none, rather than printed empty.
        let location = (!entry.location.is_empty()).then_some(entry.location.as_str());
        match entry.severity {
            Severity::Error => {
                tracing::error!(target: "central", role, %id, pid, location, "{message}")
            }
            Severity::Warning => {
                tracing::warn!(target: "central", role, %id, pid, location, "{message}")
            }
            Severity::Notice => {
                tracing::info!(target: "central", role, %id, pid, location, "{message}")
            }
        }
    }

    /// An event of the master's own.
    pub(crate) fn master(&self, severity: Severity, message: String) {
        self.record(Entry {
            role: None,
            id: "master".into(),
            pid: std::process::id(),
            time_ms: now_ms(),
            severity,
            message,
            location: String::new(),
        });
    }

    /// The most recent entries, oldest first.
    pub(crate) fn recent(&self) -> Vec<Entry> {
        self.recent.lock().unwrap_or_else(PoisonError::into_inner).iter().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_most_recent() {
        let log = CentralLog::default();
        for i in 0..(KEEP + 5) {
            log.master(Severity::Notice, format!("event {i}"));
        }
        let recent = log.recent();
        assert_eq!(recent.len(), KEEP);
        assert_eq!(recent[0].message, "event 5");
        assert_eq!(recent.last().unwrap().message, format!("event {}", KEEP + 4));
    }
}
