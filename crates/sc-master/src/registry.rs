//! The membership: who is registered and alive, with an epoch that moves on at every change.
//!
//! Registration (gRPC `Register`) adds or replaces a member; the health checker and the
//! supervisor remove it. Every change publishes a whole snapshot on a watch channel, which the
//! `WatchMembers` streams forward. A process being replaced in a rolling restart is *retired*:
//! it may not register again, so its replacement (same id) keeps the record.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};

use sc_common::membership::{Member, Membership};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::MasterError;

/// The master's member table.
#[derive(Debug)]
pub(crate) struct Registry {
    /// std Mutex: each operation is a map update plus a non-blocking watch send.
    inner: Mutex<Inner>,
    snapshots: watch::Sender<Arc<Membership>>,
}

#[derive(Debug, Default)]
struct Inner {
    epoch: u64,
    members: BTreeMap<String, Member>,
    /// When each member's current record was registered (for uptimes in standalone mode).
    since: HashMap<String, Instant>,
    /// Processes (id, pid) that may not register again.
    retired: HashSet<(String, u32)>,
}

impl Default for Registry {
    fn default() -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            snapshots: watch::channel(Arc::new(Membership::default())).0,
        }
    }
}

impl Registry {
    /// Adds or replaces a member; returns the new epoch, or [`MasterError::Retired`] for a
    /// process that is being replaced.
    pub(crate) fn register(&self, member: Member) -> Result<u64, MasterError> {
        let mut inner = self.lock();
        if inner.retired.contains(&(member.id.clone(), member.pid)) {
            return Err(MasterError::Retired { id: member.id, pid: member.pid });
        }
        if inner.members.get(&member.id) == Some(&member) {
            return Ok(inner.epoch);
        }
        inner.since.insert(member.id.clone(), Instant::now());
        inner.members.insert(member.id.clone(), member);
        Ok(self.publish(&mut inner))
    }

    /// Turns down further registrations of the process `pid` of member `id` (a rolling restart
    /// is replacing it), or, with `retire` false, lifts that again once the process is gone.
    pub(crate) fn retire(&self, id: &str, pid: u32, retire: bool) {
        let mut inner = self.lock();
        if retire {
            inner.retired.insert((id.to_owned(), pid));
        } else {
            inner.retired.remove(&(id.to_owned(), pid));
        }
    }

    /// When each member's current record was registered.
    pub(crate) fn registered_since(&self) -> HashMap<String, Instant> {
        self.lock().since.clone()
    }

    /// Removes a member if it is still the process `pid` (any process if `None`); returns
    /// whether it was removed.
    pub(crate) fn remove(&self, id: &str, pid: Option<u32>) -> bool {
        let mut inner = self.lock();
        let matches = inner.members.get(id).is_some_and(|m| pid.is_none_or(|pid| m.pid == pid));
        if matches {
            inner.members.remove(id);
            inner.since.remove(id);
            self.publish(&mut inner);
        }
        matches
    }

    /// The current membership.
    pub(crate) fn snapshot(&self) -> Arc<Membership> {
        self.snapshots.borrow().clone()
    }

    /// A receiver of every new snapshot.
    pub(crate) fn watch(&self) -> watch::Receiver<Arc<Membership>> {
        self.snapshots.subscribe()
    }

    fn publish(&self, inner: &mut Inner) -> u64 {
        inner.epoch += 1;
        let snapshot = Membership { epoch: inner.epoch, members: inner.members.values().cloned().collect() };
        self.snapshots.send_replace(Arc::new(snapshot));
        inner.epoch
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use sc_common::Role;

    use super::*;

    fn member(id: &str, pid: u32) -> Member {
        Member {
            role: Role::Worker,
            id: id.into(),
            grpc: "127.0.0.1:1".into(),
            public: String::new(),
            unix: String::new(),
            pid,
        }
    }

    #[test]
    fn epoch_moves_on_changes_only() {
        let registry = Registry::default();
        assert_eq!(registry.register(member("w-1", 10)).ok(), Some(1));
        assert_eq!(registry.register(member("w-1", 10)).ok(), Some(1), "same record, same epoch");
        assert_eq!(registry.register(member("w-1", 11)).ok(), Some(2));
        assert_eq!(registry.register(member("w-2", 12)).ok(), Some(3));
        assert_eq!(registry.snapshot().members.len(), 2);
    }

    #[test]
    fn remove_checks_the_pid() {
        let registry = Registry::default();
        registry.register(member("w-1", 10)).unwrap();
        assert!(!registry.remove("w-1", Some(9)), "an older process's exit keeps the new one");
        assert!(registry.remove("w-1", Some(10)));
        assert!(!registry.remove("w-1", None));
        assert_eq!(registry.snapshot().epoch, 2);
    }

    #[test]
    fn a_retired_process_cannot_take_its_record_back() {
        let registry = Registry::default();
        registry.register(member("w-1", 10)).unwrap();
        registry.retire("w-1", 10, true);
        assert_eq!(registry.register(member("w-1", 11)).ok(), Some(2), "the replacement");
        assert!(matches!(registry.register(member("w-1", 10)), Err(MasterError::Retired { pid: 10, .. })));
        assert_eq!(registry.snapshot().members[0].pid, 11);
        registry.retire("w-1", 10, false);
        assert!(registry.register(member("w-1", 10)).is_ok());
    }

    #[tokio::test]
    async fn watchers_see_changes() {
        let registry = Registry::default();
        let mut rx = registry.watch();
        registry.register(member("w-1", 10)).unwrap();
        rx.changed().await.unwrap();
        assert_eq!(rx.borrow().epoch, 1);
    }
}
