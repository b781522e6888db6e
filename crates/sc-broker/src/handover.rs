//! Exchange keys that follow their owner (memory backend).
//!
//! Workers send a key's exchange calls to its rendezvous owner among the live brokers, so
//! when the membership changes, keys change owner: a broker that dies leaves its keys to an
//! interim owner, and gets them back when it returns; a broker that joins takes some keys, one
//! that leaves gives its keys away. The data must follow, or acknowledged writes vanish. Each
//! broker watches the broker membership (through its master link) and:
//! - **pulls** (`Handover`) before it serves: when the view changes, and at its start before it
//!   answers its first exchange call, it asks every other broker (of the previous view and the
//!   new one) for the keys it owns under the new view, and merges them. Exchange calls wait for
//!   the pull (the [`Gate`]), so a broker that comes back never answers "no such key" for a key
//!   another broker still holds for it;
//! - **pushes** (`Accept`) what it holds but does not own, once a second and at once when the
//!   view changes: writes that reached it from a worker that had not seen the change yet, and
//!   everything when it leaves (graceful stop, or replaced by a newer process with its id).
//!   A pushed key is forgotten here only if nothing wrote it meanwhile; the owner merges it
//!   (the later write wins, see [`Exchange::merge`]).
//!
//! What is not kept: the keys of a broker killed with SIGKILL (they were only in its memory),
//! keys taken out by a pull whose answer never arrived (the claimant died during the call),
//! and removals made on the old owner during a move (no tombstones: a removed key may come
//! back from the other side). docs/redis.md compares this with the Redis backend.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use sc_common::membership::{Member, Membership, Role};
use sc_common::{rendezvous, secret};
use sc_proto::broker::v1 as pb;
use tokio::sync::{OwnedRwLockWriteGuard, RwLock, watch};
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use crate::exchange::{Exchange, Moved};

/// Exchange calls wait on this while a pull runs (read: a call; write: a pull). A tokio
/// RwLock: the pull holds it across its gRPC calls, and it is fair, so a pull waiting for the
/// calls in progress holds back the new ones.
pub(crate) type Gate = Arc<RwLock<()>>;

/// How long a broker waits, at its start, for a membership that lists it before it serves
/// exchange calls anyway (a master that is down: nothing to pull from a view it cannot see).
const FIRST_VIEW_WAIT: Duration = Duration::from_secs(5);
/// How long one pull or push call to another broker may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// How often keys held but not owned are pushed to their owner.
const PUSH_EVERY: Duration = Duration::from_secs(1);
/// How long after a view change writes from workers that have not seen it yet may still
/// arrive: strays are looked for that long (a scan of the whole store), and always while
/// leaving.
const STRAYS_FOR: Duration = Duration::from_secs(15);

type Client = pb::broker_client::BrokerClient<InterceptedService<Channel, secret::Attach>>;

/// The broker's side of key moves.
#[derive(Debug)]
pub(crate) struct Mover {
    id: String,
    pid: u32,
    secret: String,
    message_limit: usize,
    exchange: Arc<Exchange>,
    gate: Gate,
    /// Cancelled when this broker leaves (graceful stop): it owns nothing from then on.
    leaving: CancellationToken,
    /// std Mutex: map lookups and the last view, never held across await.
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// The brokers of the last view this broker acted on.
    view: Vec<Member>,
    /// Clients to other brokers by gRPC address (lazy connections).
    clients: HashMap<String, Client>,
}

impl Mover {
    /// A mover for broker `id` (this process), and the gate closed until its first pull.
    pub(crate) async fn new(
        id: String,
        secret: String,
        message_limit: usize,
        exchange: Arc<Exchange>,
        leaving: CancellationToken,
    ) -> (Arc<Self>, OwnedRwLockWriteGuard<()>) {
        let gate: Gate = Arc::new(RwLock::new(()));
        let closed = gate.clone().write_owned().await;
        let mover = Self {
            id,
            pid: std::process::id(),
            secret,
            message_limit,
            exchange,
            gate,
            leaving,
            state: Mutex::default(),
        };
        (Arc::new(mover), closed)
    }

    /// The gate exchange calls wait on.
    pub(crate) fn gate(&self) -> Gate {
        self.gate.clone()
    }

    /// Follows the membership until `stopped`: pulls on every change of the broker view (the
    /// first one while `closed`, the gate taken at construction, is held), pushes strays.
    pub(crate) async fn run(
        self: Arc<Self>,
        mut members: watch::Receiver<Membership>,
        closed: OwnedRwLockWriteGuard<()>,
        stopped: CancellationToken,
    ) {
        let mut closed = Some(closed);
        let first_deadline = tokio::time::Instant::now() + FIRST_VIEW_WAIT;
        let mut watching = true;
        let mut tick = tokio::time::interval(PUSH_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut strays_until = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = stopped.cancelled() => return,
                changed = members.changed(), if watching => watching = changed.is_ok(),
                _ = tick.tick() => {}
            }
            let snapshot = members.borrow_and_update().clone();
            let view: Vec<Member> = snapshot.with_role(Role::Broker).cloned().collect();
            let previous = self.lock().view.clone();
            let listed = view.iter().any(|m| self.is_me(m));
            if snapshot.epoch > 0 && view != previous {
                if listed && !self.leaving.is_cancelled() {
                    let guard = match closed.take() {
                        Some(guard) => guard,
                        None => self.gate.clone().write_owned().await,
                    };
                    self.pull(&previous, &view).await;
                    drop(guard);
                }
                self.lock().view = view;
                strays_until = tokio::time::Instant::now() + STRAYS_FOR;
                self.push().await;
                continue;
            }
            if closed.is_some() && tokio::time::Instant::now() >= first_deadline {
                tracing::warn!(id = %self.id, "no membership listing this broker yet, serving the exchange without a pull");
                closed = None;
            }
            if self.leaving.is_cancelled() || tokio::time::Instant::now() < strays_until {
                self.push().await;
            }
        }
    }

    /// Pushes every key this broker holds but does not own to its owner (the last step of a
    /// graceful stop, and the once-a-second sweep). Best effort: a key whose owner cannot be
    /// reached stays here for the next push.
    pub(crate) async fn push(&self) {
        let (ids, by_id) = {
            let state = self.lock();
            let by_id: HashMap<String, Member> =
                state.view.iter().map(|m| (m.id.clone(), m.clone())).collect();
            (self.owner_ids(&state.view), by_id)
        };
        if ids.is_empty() {
            return;
        }
        let live = !self.leaving.is_cancelled() && by_id.get(&self.id).is_some_and(|m| self.is_me(m));
        let owned_here = |key: &str| live && rendezvous::owner(ids.iter(), key.as_bytes()) == Some(&self.id);
        let strays = self.exchange.strays(owned_here);
        if strays.is_empty() {
            return;
        }
        let mut by_owner: HashMap<&str, Vec<(Moved, u64)>> = HashMap::new();
        for (entry, version) in strays {
            if let Some(owner) = rendezvous::owner(ids.iter(), entry.key.as_bytes()) {
                by_owner.entry(owner.as_str()).or_default().push((entry, version));
            }
        }
        for (owner, all) in by_owner {
            let Some(member) = by_id.get(owner) else { continue };
            let Some(client) = self.client(&member.grpc) else { continue };
            for entries in chunks(all, self.message_limit / 2) {
                self.push_to(owner, client.clone(), entries).await;
            }
        }
    }

    /// One `Accept` call: `entries` to the broker `owner`, forgotten here once it has them.
    async fn push_to(&self, owner: &str, mut client: Client, entries: Vec<(Moved, u64)>) {
        let request = pb::AcceptRequest { entries: entries.iter().map(|(e, _)| to_pb(e.clone())).collect() };
        match tokio::time::timeout(CALL_TIMEOUT, client.accept(request)).await {
            Ok(Ok(_)) => {
                for (entry, version) in &entries {
                    self.exchange.forget_if_unchanged(&entry.key, *version);
                }
                tracing::debug!(to = %owner, keys = entries.len(), "exchange keys handed over");
            }
            Ok(Err(status)) => {
                tracing::debug!(to = %owner, code = ?status.code(), "exchange hand-over refused, retrying")
            }
            Err(_) => tracing::debug!(to = %owner, "exchange hand-over timed out, retrying"),
        }
    }

    /// Asks every other broker of `previous` and `view` for the keys this broker owns under
    /// `view`, and merges them.
    async fn pull(&self, previous: &[Member], view: &[Member]) {
        let ids = self.owner_ids(view);
        let mut peers = BTreeSet::new();
        for member in previous.iter().chain(view) {
            if !self.is_me(member) {
                peers.insert(member.grpc.clone());
            }
        }
        let calls = peers.into_iter().filter_map(|grpc| {
            let mut client = self.client(&grpc)?;
            let request = pb::HandoverRequest { claimant: self.id.clone(), brokers: ids.clone() };
            Some(async move {
                let outcome = tokio::time::timeout(CALL_TIMEOUT, client.handover(request)).await;
                (grpc, outcome)
            })
        });
        let mut taken = 0;
        for (grpc, outcome) in futures_util::future::join_all(calls).await {
            match outcome {
                Ok(Ok(response)) => {
                    let entries: Vec<Moved> =
                        response.into_inner().entries.into_iter().map(from_pb).collect();
                    taken += entries.len();
                    self.exchange.merge(entries);
                }
                // A broker that died is in the previous view: nothing to get from it.
                Ok(Err(status)) => tracing::debug!(%grpc, code = ?status.code(), "exchange pull failed"),
                Err(_) => tracing::debug!(%grpc, "exchange pull timed out"),
            }
        }
        if taken > 0 {
            tracing::info!(id = %self.id, keys = taken, "exchange keys taken over from other brokers");
        }
    }

    /// The ids that own keys under `view`: every broker's, less this process's own when it
    /// leaves (a newer process with the same id keeps it).
    fn owner_ids(&self, view: &[Member]) -> Vec<String> {
        let leaving = self.leaving.is_cancelled();
        view.iter().filter(|m| !(leaving && self.is_me(m))).map(|m| m.id.clone()).collect()
    }

    fn is_me(&self, member: &Member) -> bool {
        member.id == self.id && member.pid == self.pid
    }

    fn client(&self, grpc: &str) -> Option<Client> {
        let mut state = self.lock();
        if let Some(client) = state.clients.get(grpc) {
            return Some(client.clone());
        }
        let endpoint = Endpoint::from_shared(format!("http://{grpc}")).ok()?;
        let channel = endpoint.connect_timeout(CALL_TIMEOUT).tcp_nodelay(true).connect_lazy();
        let client =
            pb::broker_client::BrokerClient::with_interceptor(channel, secret::Attach::new(&self.secret))
                .max_decoding_message_size(self.message_limit)
                .max_encoding_message_size(self.message_limit);
        state.clients.insert(grpc.to_owned(), client.clone());
        Some(client)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Splits moved keys into groups of about `budget` bytes at most (one gRPC message each).
fn chunks(entries: Vec<(Moved, u64)>, budget: usize) -> Vec<Vec<(Moved, u64)>> {
    let mut out: Vec<Vec<(Moved, u64)>> = Vec::new();
    let mut size = 0;
    for entry in entries {
        let len = entry.0.key.len() + entry.0.value.len() + 32;
        match out.last_mut() {
            Some(last) if size + len <= budget => last.push(entry),
            _ => {
                size = 0;
                out.push(vec![entry]);
            }
        }
        size += len;
    }
    out
}

/// A moved key in its wire form.
pub(crate) fn to_pb(entry: Moved) -> pb::KeyEntry {
    pb::KeyEntry {
        key: entry.key,
        value: entry.value.into(),
        expires_at_ms: entry.expires_at,
        written_ms: entry.written_ms,
        appended: entry.appended,
    }
}

/// A moved key from its wire form.
pub(crate) fn from_pb(entry: pb::KeyEntry) -> Moved {
    Moved {
        key: entry.key,
        value: entry.value.to_vec(),
        expires_at: entry.expires_at_ms,
        written_ms: entry.written_ms,
        appended: entry.appended,
    }
}
