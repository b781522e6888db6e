//! The broker pool: which broker owns which channel, and one stream to each live broker.
//!
//! A channel's broker is the rendezvous owner of its name among the live brokers' ids. The pool
//! keeps the set of channels this worker holds (one broker subscription per channel, whatever
//! the number of local sockets) and:
//! - on a (re)connected stream, subscribes every channel that broker owns, so a broker restart
//!   loses no subscription;
//! - on a membership change, subscribes each moved channel on its new owner at once and
//!   unsubscribes it from the old one only [`BREAK_DELAY`] later (make before break), and keeps
//!   the stream to a broker that left open for as long: publishes that other workers sent to the
//!   old owner before they saw the change are still delivered (zero loss when a broker is added or
//!   leaves gracefully, see docs/architecture.md);
//! - sends publishes to the owner, with a bounded window of publishes in flight per broker so
//!   a slow broker slows publishers down instead of growing memory. Publishes follow a
//!   membership change [`MOVE_GRACE`] later than subscriptions do: for that long they still go
//!   to a moved channel's old owner (where every worker keeps its subscription until
//!   [`BREAK_DELAY`]), so that every worker has subscribed on the new owner, whenever it saw
//!   the change, before anyone publishes there;
//! - hands what the brokers deliver to its [`DeliverySink`] (the hub);
//! - reports the members of presence channels (see [`crate::presence`]) to each channel's
//!   owner, and replays a channel's whole set to it when it changes (a move, a reopened
//!   stream). `#presence/<c>` channels are placed with `c`, whose owner publishes them.
//!
//! The wire is not here: streams are opened through [`crate::broker_link`], the worker's only
//! gRPC edge towards the brokers, which the unit tests below replace with a fake.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use sc_common::batch::BatchStream;
use sc_common::membership::Backoff;
use sc_common::rendezvous;
use tokio::sync::{Notify, Semaphore, mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::broker_link::{Command, Connect, Kv};
use crate::error::Error;
use crate::presence::{self, PresenceMember};

/// Publishes that may be queued to one broker before publishers wait.
const PUBLISH_WINDOW: usize = 8192;
/// Most commands in one gRPC message.
const MAX_BATCH: usize = 512;
/// How long the old owner of a moved channel (or a broker that left) keeps delivering to this
/// worker: long enough for every other worker to see the same membership change and stop
/// publishing to the old owner. A leaving broker drains until the workers closed their streams
/// (at most `sc_broker::DRAIN`, which is longer).
pub(crate) const BREAK_DELAY: Duration = Duration::from_secs(2);
/// How long publishes keep going to a moved channel's old owner after a membership change:
/// longer than workers take to see the same change and subscribe on the new owner, shorter
/// than [`BREAK_DELAY`].
pub(crate) const MOVE_GRACE: Duration = Duration::from_secs(1);
/// Brokers a worker sees within this long of its first one are the cluster it starts into,
/// not brokers joining it.
const FOUNDING: Duration = Duration::from_millis(500);
/// Most bytes of members in one presence reset command (a larger set is sent in parts).
const RESET_CHUNK: usize = 256 * 1024;
/// How long a publish waits for its channel's broker to be linked (a worker that just started,
/// or a broker that is being replaced) before it fails.
pub(crate) const LINK_WAIT: Duration = Duration::from_secs(3);

/// Called once when the owner broker has applied a publish (`Ok`: every worker subscribed to
/// the channel will get it unless that broker dies first), or when that can no longer happen
/// (`Err`: the stream to the broker ended first). It runs on the link's task: it must not block.
pub(crate) type Receipt = Box<dyn FnOnce(Result<(), Error>) + Send>;

/// Publishes waiting for their receipt on one stream, by sync token. std Mutex: taken for an
/// insert or a removal, never across await.
type Receipts = Arc<Mutex<HashMap<u64, Receipt>>>;

/// Where the pool hands the messages brokers deliver (the worker's local fan-out).
pub(crate) trait DeliverySink: Send + Sync + 'static {
    /// A message for `channel` (JSON text) arrived from its broker; `lone` when it came alone
    /// in its batch (a quiet moment, not a burst).
    fn deliver(&self, channel: &str, data: &Bytes, lone: bool);
}

/// The worker's broker links.
pub(crate) struct BrokerPool {
    connector: Arc<dyn Connect>,
    /// The largest gRPC message to a broker: command batches are cut below it, and a publish
    /// that could not fit is refused.
    message_limit: usize,
    /// std Mutex: held for map updates and non-blocking sends, never across await.
    state: Mutex<State>,
    /// Wakes publishers waiting for a broker stream to open.
    linked: Notify,
    /// Cancelled by [`BrokerPool::close`]: every link stops.
    closed: CancellationToken,
}

#[derive(Debug, Default)]
struct State {
    /// Channels this worker holds at the broker level, each with whether its owner broker has
    /// confirmed the subscription (a sync marker after it came back).
    channels: HashMap<Arc<str>, watch::Sender<bool>>,
    /// The members this worker has in presence channels: socket id to user, per channel (a
    /// subset of `channels`).
    presence: HashMap<Arc<str>, BTreeMap<String, Option<String>>>,
    next_sync: u64,
    /// Live brokers by id.
    brokers: BTreeMap<String, Entry>,
    next_generation: u64,
    /// When this worker first saw a broker (its start, as far as the pool is concerned).
    first_seen: Option<Instant>,
}

#[derive(Debug)]
struct Entry {
    grpc: String,
    generation: u64,
    /// When this broker id joined brokers that were already there (kept when it restarts at a
    /// new address); `None` for the first brokers this worker saw, which replace no owner.
    joined: Option<Instant>,
    /// Left the membership (when): owns nothing, its stream stays open until [`BREAK_DELAY`]
    /// passed.
    left: Option<Instant>,
    /// Sync markers sent on the open stream, with the channels each confirms.
    syncs: HashMap<u64, Vec<Arc<str>>>,
    /// The open stream, if any: commands sent while it is `None` are not needed later (the
    /// subscriptions are replayed when it opens; publishes fail fast).
    link: Option<Link>,
    stop: CancellationToken,
}

#[derive(Clone)]
struct Link {
    tx: mpsc::UnboundedSender<Command>,
    kv: Kv,
    /// Free slots of the publish window; given back as the stream takes publishes out.
    window: Arc<Semaphore>,
    /// Publishes waiting for the broker's sync marker; failed when the stream ends.
    receipts: Receipts,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link").field("kv", &self.kv).finish_non_exhaustive()
    }
}

impl std::fmt::Debug for BrokerPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerPool").field("state", &self.state).finish_non_exhaustive()
    }
}

impl BrokerPool {
    /// A pool opening its streams with `connector`.
    pub(crate) fn new(connector: Arc<dyn Connect>, message_limit: usize) -> Self {
        Self {
            connector,
            message_limit,
            state: Mutex::new(State::default()),
            linked: Notify::new(),
            closed: CancellationToken::new(),
        }
    }

    /// Holds `channel` at the broker level (called for its first local subscriber). The
    /// receiver turns true once the owner broker confirmed the subscription: from then on every
    /// publish to the channel reaches this worker.
    pub(crate) fn subscribe(self: &Arc<Self>, channel: &Arc<str>) -> watch::Receiver<bool> {
        let mut state = self.lock();
        let (tx, rx) = watch::channel(false);
        state.channels.insert(channel.clone(), tx);
        let owner = state.owner(presence::owner_key(channel)).map(str::to_owned);
        if let Some(id) = &owner {
            state.subscribe_and_sync(id, vec![channel.clone()]);
        }
        // During a move, publishes still go to the channel's previous owner for MOVE_GRACE
        // (from this worker and, seen a little later, from the others): hold the channel there
        // too until the break, as a channel that was held before the move is.
        let previous = state.publish_owner(presence::owner_key(channel), Instant::now()).map(str::to_owned);
        if let Some(previous) = previous.filter(|p| Some(p) != owner.as_ref())
            && let Some(link) = state.link(&previous)
        {
            let _ = link.tx.send(Command::Subscribe(channel.clone()));
            self.break_later(Vec::new(), vec![(channel.clone(), previous)]);
        }
        rx
    }

    /// Whether (and when) a held channel's subscription is confirmed; `None` if not held.
    pub(crate) fn confirmation(&self, channel: &str) -> Option<watch::Receiver<bool>> {
        self.lock().channels.get(channel).map(watch::Sender::subscribe)
    }

    /// Stops holding `channel` (called when its last local subscriber left).
    pub(crate) fn unsubscribe(&self, channel: &str) {
        let mut state = self.lock();
        if let Some((channel, _)) = state.channels.remove_entry(channel) {
            state.presence.remove(&channel);
            state.send_to_owner(&channel, Command::Unsubscribe(channel.clone()));
        }
    }

    /// A local socket joined presence channel `channel` (which this worker holds): tells the
    /// channel's owner.
    pub(crate) fn join(&self, channel: &Arc<str>, member: PresenceMember) {
        let mut state = self.lock();
        let members = state.presence.entry(channel.clone()).or_default();
        members.insert(member.id.clone(), member.user.clone());
        state.send_to_owner(channel, Command::PresenceJoin { channel: channel.clone(), member });
    }

    /// A local socket left presence channel `channel`: tells the channel's owner.
    pub(crate) fn leave(&self, channel: &str, id: &str) {
        let mut state = self.lock();
        let Some(channel) = state.presence.get_key_value(channel).map(|(c, _)| c.clone()) else { return };
        // An emptied set stays until the channel is unsubscribed: a move still replays it, so
        // that an owner that had this worker's members before gets the empty set.
        if state.presence.get_mut(&channel).and_then(|members| members.remove(id)).is_none() {
            return;
        }
        state.send_to_owner(&channel, Command::PresenceLeave { channel: channel.clone(), id: id.to_owned() });
    }

    /// The members of presence channel `channel`, cluster-wide, from its owner broker (waiting
    /// up to [`LINK_WAIT`] for its stream).
    pub(crate) async fn presence(&self, channel: &str) -> Result<Vec<PresenceMember>, Error> {
        let link = self.owner_link(presence::owner_key(channel), Route::Current).await?;
        link.kv.presence(channel).await
    }

    /// Publishes `data` (JSON text) to `channel` through its owner broker, waiting up to
    /// [`LINK_WAIT`] for that broker's stream to open. With a `receipt`, the broker confirms the
    /// publish (a sync marker right after it) and the receipt is called with the outcome,
    /// exactly once, unless this returns an error first (then the receipt is dropped unused).
    pub(crate) async fn publish(
        &self,
        channel: &str,
        data: Bytes,
        receipt: Option<Receipt>,
    ) -> Result<(), Error> {
        if presence::is_event_channel(channel) {
            return Err(Error::ReservedChannel(channel.to_owned()));
        }
        let command = Command::Publish { channel: channel.to_owned(), data };
        if command.wire_size() > self.batch_budget() {
            return Err(Error::TooLarge);
        }
        let link = self.owner_link(presence::owner_key(channel), Route::Publish).await?;
        // The permit is given back by the stream when it takes the publish out.
        match link.window.acquire().await {
            Ok(permit) => permit.forget(),
            Err(_) => return Err(Error::NoBroker),
        }
        let Some(receipt) = receipt else {
            return link.tx.send(command).map_err(|_| Error::NoBroker);
        };
        let token = self.lock().next_token();
        // Registered before the marker is sent, so the answer cannot come first.
        lock(&link.receipts).insert(token, receipt);
        if link.tx.send(command).and_then(|()| link.tx.send(Command::Sync(token))).is_err() {
            // The stream ended meanwhile: fail the receipt unless its drain already did.
            if let Some(receipt) = lock(&link.receipts).remove(&token) {
                receipt(Err(Error::NoBroker));
            }
        }
        Ok(())
    }

    /// Unary calls to the broker that owns `key` (the exchange), waiting up to [`LINK_WAIT`]
    /// for its stream.
    pub(crate) async fn kv(&self, key: &str) -> Result<Kv, Error> {
        Ok(self.owner_link(key.as_bytes(), Route::Current).await?.kv)
    }

    async fn owner_link(&self, key: &[u8], route: Route) -> Result<Link, Error> {
        let deadline = tokio::time::Instant::now() + LINK_WAIT;
        loop {
            let linked = self.linked.notified();
            tokio::pin!(linked);
            linked.as_mut().enable();
            if let Some(link) = self.lock().owner_link(key, route, Instant::now()) {
                return Ok(link);
            }
            if tokio::time::timeout_at(deadline, linked).await.is_err() {
                return Err(Error::NoBroker);
            }
        }
    }

    /// Brokers with an open stream.
    pub(crate) fn linked(&self) -> usize {
        self.lock().brokers.values().filter(|e| e.link.is_some()).count()
    }

    /// Applies a new set of live brokers (id, gRPC address): links new ones (their deliveries
    /// go to `sink`), lets gone ones drain, and moves the channels whose owner changed, make
    /// before break.
    pub(crate) fn apply(self: &Arc<Self>, brokers: Vec<(String, String)>, sink: &Arc<dyn DeliverySink>) {
        if self.closed.is_cancelled() {
            return;
        }
        let mut state = self.lock();
        let before: Vec<(Arc<str>, Option<String>)> = state
            .channels
            .keys()
            .map(|c| (c.clone(), state.owner(presence::owner_key(c)).map(str::to_owned)))
            .collect();

        let now = Instant::now();
        // The brokers this worker finds at its start (they register one by one, and another
        // worker may see them all at once) take no channel from anyone: no grace for them.
        // Only a broker that joins a running pool does.
        let first_seen = *state.first_seen.get_or_insert(now);
        let joined = (now.duration_since(first_seen) >= FOUNDING).then_some(now);
        let wanted: BTreeMap<String, String> = brokers.into_iter().collect();
        let mut draining = Vec::new();
        let mut restarted = HashMap::new();
        state.brokers.retain(|id, entry| match wanted.get(id) {
            Some(grpc) if *grpc == entry.grpc => {
                entry.left = None;
                true
            }
            // Restarted elsewhere: the old process is gone, nothing to drain; the id owns
            // what it owned.
            Some(_) => {
                entry.stop.cancel();
                restarted.insert(id.clone(), entry.joined);
                false
            }
            None if entry.left.is_some() => true,
            None => {
                tracing::debug!(broker = %id, "broker left, draining");
                entry.left = Some(now);
                draining.push((id.clone(), entry.generation));
                true
            }
        });
        for (id, grpc) in wanted {
            if state.brokers.contains_key(&id) {
                continue;
            }
            state.next_generation += 1;
            let generation = state.next_generation;
            let stop = self.closed.child_token();
            let entry = Entry {
                grpc: grpc.clone(),
                generation,
                joined: restarted.get(&id).copied().unwrap_or(joined),
                left: None,
                syncs: HashMap::new(),
                link: None,
                stop: stop.clone(),
            };
            state.brokers.insert(id.clone(), entry);
            tracing::debug!(broker = %id, %grpc, "broker joined");
            let link = LinkTask { pool: self.clone(), sink: sink.clone(), id, grpc, generation };
            tokio::spawn(link.run(stop));
        }

        let mut breaks = Vec::new();
        for (channel, old) in before {
            let new = state.owner(presence::owner_key(&channel)).map(str::to_owned);
            if new == old {
                continue;
            }
            // Make: the new owner at once (or when its stream opens), with this worker's
            // members if it is a presence channel (the old owner drops them at the break).
            if let Some(link) = new.as_deref().and_then(|id| state.link(id)) {
                let _ = link.tx.send(Command::Subscribe(channel.clone()));
                state.replay_presence(link, &channel);
            }
            // Break: later, so that publishes already on their way to the old owner arrive.
            if let Some(old) = old {
                breaks.push((channel, old));
            }
        }
        drop(state);
        // Publishes waiting for an owner may have one now.
        self.linked.notify_waiters();
        if !draining.is_empty() || !breaks.is_empty() {
            self.break_later(draining, breaks);
        }
    }

    /// [`BrokerPool::finish_moves`] after [`BREAK_DELAY`], unless the pool closes first.
    fn break_later(self: &Arc<Self>, draining: Vec<(String, u64)>, breaks: Vec<(Arc<str>, String)>) {
        let pool = self.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = pool.closed.cancelled() => {}
                _ = tokio::time::sleep(BREAK_DELAY) => pool.finish_moves(draining, breaks),
            }
        });
    }

    /// Most bytes of commands in one gRPC message: the limit less a margin for the framing.
    fn batch_budget(&self) -> usize {
        self.message_limit.saturating_sub(64 * 1024)
    }

    /// Stops every link (the worker is shutting down).
    pub(crate) fn close(&self) {
        self.closed.cancel();
    }

    /// The break half of [`BrokerPool::apply`]: closes the streams of brokers that left and
    /// unsubscribes moved channels from their old owners, unless things changed back meanwhile.
    fn finish_moves(&self, draining: Vec<(String, u64)>, breaks: Vec<(Arc<str>, String)>) {
        let mut state = self.lock();
        for (id, generation) in draining {
            if state.brokers.get(&id).is_some_and(|e| e.left.is_some() && e.generation == generation)
                && let Some(entry) = state.brokers.remove(&id)
            {
                tracing::debug!(broker = %id, "broker stream closed after draining");
                entry.stop.cancel();
            }
        }
        for (channel, old) in breaks {
            let still_moved = state.owner(presence::owner_key(&channel)) != Some(old.as_str());
            let leaving = state.brokers.get(&old).is_none_or(|e| e.left.is_some());
            if still_moved
                && !leaving
                && let Some(link) = state.link(&old)
            {
                let _ = link.tx.send(Command::Unsubscribe(channel));
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl State {
    /// Subscribes `channels` on broker `id` (if linked), followed by a sync marker whose answer
    /// confirms them.
    fn subscribe_and_sync(&mut self, id: &str, channels: Vec<Arc<str>>) {
        let token = self.next_token();
        let Some(entry) = self.brokers.get_mut(id) else { return };
        let Some(link) = &entry.link else { return };
        for channel in &channels {
            let _ = link.tx.send(Command::Subscribe(channel.clone()));
        }
        let _ = link.tx.send(Command::Sync(token));
        entry.syncs.insert(token, channels);
    }

    /// A fresh sync marker (for subscriptions and publish receipts alike, so they never clash).
    fn next_token(&mut self) -> u64 {
        self.next_sync += 1;
        self.next_sync
    }

    /// The broker `id` answered sync markers: their channels are confirmed.
    fn confirm(&mut self, id: &str, generation: u64, tokens: &[u64]) {
        let Some(entry) = self.brokers.get_mut(id).filter(|e| e.generation == generation) else { return };
        let confirmed: Vec<Arc<str>> =
            tokens.iter().filter_map(|t| entry.syncs.remove(t)).flatten().collect();
        for channel in confirmed {
            if let Some(tx) = self.channels.get(&channel) {
                tx.send_replace(true);
            }
        }
    }

    /// The owner of a channel or key among the brokers that have not left.
    fn owner(&self, key: &[u8]) -> Option<&str> {
        let live = self.brokers.iter().filter(|(_, e)| e.left.is_none()).map(|(id, _)| id.as_str());
        rendezvous::owner(live, key)
    }

    /// Where publishes to a channel go at `now`: its owner in the membership as it was
    /// [`MOVE_GRACE`] ago (brokers that joined since do not count yet, brokers that left since
    /// still do), or the current owner when that view is empty.
    fn publish_owner(&self, key: &[u8], now: Instant) -> Option<&str> {
        let settled = self.brokers.iter().filter(|(_, e)| {
            e.joined.is_none_or(|joined| now.duration_since(joined) >= MOVE_GRACE)
                && e.left.is_none_or(|left| now.duration_since(left) < MOVE_GRACE)
        });
        rendezvous::owner(settled.map(|(id, _)| id.as_str()), key).or_else(|| self.owner(key))
    }

    fn link(&self, id: &str) -> Option<&Link> {
        self.brokers.get(id).and_then(|e| e.link.as_ref())
    }

    /// The open link to the broker that `route` picks for `key`. A publish whose delayed owner
    /// has no open stream (a broker that died) goes to the current owner.
    fn owner_link(&self, key: &[u8], route: Route, now: Instant) -> Option<Link> {
        let delayed = match route {
            Route::Publish => self.publish_owner(key, now).and_then(|id| self.link(id)),
            Route::Current => None,
        };
        delayed.or_else(|| self.owner(key).and_then(|id| self.link(id))).cloned()
    }

    fn send_to_owner(&self, channel: &str, command: Command) {
        if let Some(link) = self.owner(presence::owner_key(channel)).and_then(|id| self.link(id)) {
            let _ = link.tx.send(command);
        }
    }

    /// Sends this worker's whole member set of presence channel `channel` (if it had members
    /// there since it was subscribed) on `link`, in parts of at most [`RESET_CHUNK`] bytes.
    fn replay_presence(&self, link: &Link, channel: &Arc<str>) {
        let Some(members) = self.presence.get(channel) else { return };
        let mut part = Vec::new();
        let mut size = 0;
        for (id, user) in members {
            let member = PresenceMember { id: id.clone(), user: user.clone() };
            let member_size = crate::broker_link::member_size(&member);
            if size + member_size > RESET_CHUNK && !part.is_empty() {
                let members = std::mem::take(&mut part);
                let _ =
                    link.tx.send(Command::PresenceReset { channel: channel.clone(), members, more: true });
                size = 0;
            }
            size += member_size;
            part.push(member);
        }
        let _ = link.tx.send(Command::PresenceReset { channel: channel.clone(), members: part, more: false });
    }
}

/// Which owner a call goes to.
#[derive(Debug, Clone, Copy)]
enum Route {
    /// Publishes: the owner as of [`MOVE_GRACE`] ago.
    Publish,
    /// Subscriptions and key/value calls: the owner now.
    Current,
}

/// One broker's link: keeps its stream open, reconnecting with backoff, until stopped.
struct LinkTask {
    pool: Arc<BrokerPool>,
    sink: Arc<dyn DeliverySink>,
    id: String,
    grpc: String,
    generation: u64,
}

/// How one stream's life ended.
enum Ended {
    /// It was open, then the broker closed it or it failed.
    Closed,
    /// A newer link to the same broker id replaced this one before it opened.
    Superseded,
}

impl LinkTask {
    async fn run(self, stop: CancellationToken) {
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(2));
        let mut failures = 0u32;
        loop {
            let outcome = tokio::select! {
                _ = stop.cancelled() => return,
                outcome = self.once() => outcome,
            };
            // The stream is gone: stop routing to it.
            {
                let mut state = self.pool.lock();
                if let Some(entry) =
                    state.brokers.get_mut(&self.id).filter(|e| e.generation == self.generation)
                {
                    entry.link = None;
                    entry.syncs.clear();
                }
            }
            match outcome {
                Ok(Ended::Closed) => {
                    backoff.reset();
                    failures = 0;
                }
                Ok(Ended::Superseded) => return,
                Err(e) => {
                    failures += 1;
                    if failures == 5 {
                        tracing::warn!(broker = %self.id, grpc = %self.grpc, error = %e, "cannot reach broker, retrying");
                    } else {
                        tracing::debug!(broker = %self.id, grpc = %self.grpc, error = %e, "broker link failed");
                    }
                }
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(backoff.next_delay()) => {}
            }
            crate::metrics::get().broker_link_reconnect();
        }
    }

    /// One stream's life: open, replay this broker's channels, deliver until it ends.
    async fn once(&self) -> Result<Ended, Error> {
        let (tx, rx) = mpsc::unbounded_channel();
        let window = Arc::new(Semaphore::new(PUBLISH_WINDOW));
        let taken = window.clone();
        let batches =
            BatchStream::new(rx, MAX_BATCH).with_byte_limit(self.pool.batch_budget(), Command::wire_size);
        let commands = Box::pin(batches.map(move |commands: Vec<Command>| {
            let publishes = commands.iter().filter(|c| matches!(c, Command::Publish { .. })).count();
            taken.add_permits(publishes);
            commands
        }));
        let opened = self.pool.connector.open(&self.grpc, commands).await?;
        let (id, generation) = (self.id.as_str(), self.generation);
        let receipts = Receipts::default();
        {
            let mut state = self.pool.lock();
            let owned: Vec<Arc<str>> = state
                .channels
                .keys()
                .filter(|c| state.owner(presence::owner_key(c)) == Some(id))
                .cloned()
                .collect();
            let Some(entry) = state.brokers.get_mut(id).filter(|e| e.generation == generation) else {
                return Ok(Ended::Superseded);
            };
            entry.link = Some(Link { tx, kv: opened.kv, window, receipts: receipts.clone() });
            entry.syncs.clear();
            tracing::debug!(broker = %id, channels = owned.len(), "broker stream open");
            // Replay this broker's channels (after a restart it knows none), confirmed by one
            // sync, and this worker's members of its presence channels.
            let presence: Vec<Arc<str>> =
                owned.iter().filter(|c| state.presence.contains_key(*c)).cloned().collect();
            state.subscribe_and_sync(id, owned);
            if let Some(link) = state.link(id) {
                for channel in &presence {
                    state.replay_presence(link, channel);
                }
            }
        }
        self.pool.linked.notify_waiters();

        let mut batches = opened.batches;
        let cause = loop {
            match batches.next().await {
                Some(Ok(batch)) => {
                    let lone = batch.deliveries.len() == 1;
                    for (channel, data) in &batch.deliveries {
                        self.sink.deliver(channel, data, lone);
                    }
                    if !batch.synced.is_empty() {
                        self.confirm(&receipts, &batch.synced);
                    }
                }
                None => break Error::Link("the broker closed the stream".into()),
                Some(Err(error)) => break error,
            }
        };
        tracing::warn!(broker = %id, grpc = %self.grpc, error = %cause, "broker link reset, reconnecting");
        crate::metrics::get().broker_link_reset();
        // Publishes the broker has not confirmed may be lost: tell their publishers.
        let waiting: Vec<Receipt> = lock(&receipts).drain().map(|(_, receipt)| receipt).collect();
        for receipt in waiting {
            receipt(Err(cause.clone()));
        }
        Ok(Ended::Closed)
    }

    /// Sync markers answered: publish receipts succeed, subscriptions are confirmed.
    fn confirm(&self, receipts: &Receipts, tokens: &[u64]) {
        let mut subscriptions = Vec::new();
        for token in tokens {
            let receipt = lock(receipts).remove(token);
            match receipt {
                Some(receipt) => receipt(Ok(())),
                None => subscriptions.push(*token),
            }
        }
        if !subscriptions.is_empty() {
            self.pool.lock().confirm(&self.id, self.generation, &subscriptions);
        }
    }
}

fn lock(receipts: &Receipts) -> std::sync::MutexGuard<'_, HashMap<u64, Receipt>> {
    receipts.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    //! The pool against a fake broker edge: membership changes, make before break, a link that
    //! fails. Paused time, so BREAK_DELAY and the backoff cost nothing.

    #![allow(clippy::unwrap_used)]

    use std::collections::HashSet;

    use futures_util::stream;

    use super::*;
    use crate::broker_link::{Batch, Commands, Opened};

    /// A fake edge: records every command per broker address, answers sync markers, and can be
    /// told to refuse connections or to break an open stream.
    #[derive(Default)]
    struct Fake {
        inner: Arc<Mutex<FakeState>>,
    }

    #[derive(Default)]
    struct FakeState {
        /// Every command sent, with the address it went to.
        sent: Vec<(String, Command)>,
        /// Connections to refuse, per address.
        refuse: HashMap<String, u32>,
        /// Opens per address.
        opens: HashMap<String, u32>,
        /// Ends the open stream of an address.
        breakers: HashMap<String, CancellationToken>,
        /// Deliveries to push into an address's open stream.
        inject: HashMap<String, mpsc::UnboundedSender<Result<Batch, Error>>>,
        /// Sync markers are not answered (a broker that hangs).
        mute: bool,
    }

    #[async_trait::async_trait]
    impl Connect for Fake {
        async fn open(&self, grpc: &str, mut commands: Commands) -> Result<Opened, Error> {
            let (tx, rx) = mpsc::unbounded_channel();
            let broken = CancellationToken::new();
            {
                let mut state = self.inner.lock().unwrap();
                if let Some(left) = state.refuse.get_mut(grpc).filter(|n| **n > 0) {
                    *left -= 1;
                    return Err(Error::Link("connection refused".into()));
                }
                *state.opens.entry(grpc.to_owned()).or_default() += 1;
                state.breakers.insert(grpc.to_owned(), broken.clone());
                state.inject.insert(grpc.to_owned(), tx.clone());
            }
            let recorder = Recorder { state: self.inner.clone(), grpc: grpc.to_owned(), answers: tx };
            tokio::spawn(async move {
                while let Some(batch) = commands.next().await {
                    recorder.record(batch);
                }
            });
            let batches = stream::unfold((rx, broken), |(mut rx, broken)| async move {
                tokio::select! {
                    _ = broken.cancelled() => None,
                    item = rx.recv() => item.map(|item| (item, (rx, broken))),
                }
            })
            .boxed();
            Ok(Opened { kv: Kv::detached(), batches })
        }
    }

    /// Records one stream's commands into the fake's state and answers its sync markers.
    struct Recorder {
        state: Arc<Mutex<FakeState>>,
        grpc: String,
        answers: mpsc::UnboundedSender<Result<Batch, Error>>,
    }

    impl Recorder {
        fn record(&self, batch: Vec<Command>) {
            let mut synced = Vec::new();
            let mut state = self.state.lock().unwrap();
            for command in batch {
                if let Command::Sync(token) = command {
                    synced.push(token);
                }
                state.sent.push((self.grpc.clone(), command));
            }
            if !synced.is_empty() && !state.mute {
                let _ = self.answers.send(Ok(Batch { deliveries: Vec::new(), synced }));
            }
        }
    }

    impl Fake {
        fn sent(&self, grpc: &str) -> Vec<Command> {
            let state = self.inner.lock().unwrap();
            state.sent.iter().filter(|(g, _)| g == grpc).map(|(_, c)| c.clone()).collect()
        }

        fn subscribed(&self, grpc: &str) -> HashSet<Arc<str>> {
            let mut held = HashSet::new();
            for command in self.sent(grpc) {
                match command {
                    Command::Subscribe(c) => {
                        held.insert(c);
                    }
                    Command::Unsubscribe(c) => {
                        held.remove(&c);
                    }
                    _ => {}
                }
            }
            held
        }
    }

    impl Fake {
        /// The members of `channel` that the broker at `grpc` holds from this worker, applying
        /// the presence commands as it does (an unsubscribe drops them).
        fn members(&self, grpc: &str, channel: &str) -> Vec<String> {
            let mut held: BTreeMap<String, Option<String>> = BTreeMap::new();
            let mut staged = Vec::new();
            for command in self.sent(grpc) {
                match command {
                    Command::PresenceJoin { channel: c, member } if &*c == channel => {
                        held.insert(member.id, member.user);
                    }
                    Command::PresenceLeave { channel: c, id } if &*c == channel => {
                        held.remove(&id);
                    }
                    Command::PresenceReset { channel: c, members, more } if &*c == channel => {
                        staged.extend(members);
                        if !more {
                            held = staged.drain(..).map(|m| (m.id, m.user)).collect();
                        }
                    }
                    Command::Unsubscribe(c) if &*c == channel => held.clear(),
                    _ => {}
                }
            }
            held.into_keys().collect()
        }
    }

    /// Collects deliveries.
    #[derive(Default)]
    struct Sink(Mutex<Vec<(String, Bytes)>>);

    impl DeliverySink for Sink {
        fn deliver(&self, channel: &str, data: &Bytes, _lone: bool) {
            self.0.lock().unwrap().push((channel.to_owned(), data.clone()));
        }
    }

    fn brokers(ids: &[&str]) -> Vec<(String, String)> {
        ids.iter().map(|id| ((*id).to_owned(), format!("{id}:1"))).collect()
    }

    /// Lets the spawned link tasks run (time is paused, so this only yields).
    async fn settle() {
        for _ in 0..50 {
            tokio::task::yield_now().await;
        }
    }

    fn setup() -> (Arc<Fake>, Arc<BrokerPool>, Arc<Sink>, Arc<dyn DeliverySink>) {
        let fake = Arc::new(Fake::default());
        let pool = Arc::new(BrokerPool::new(fake.clone(), 4 * 1024 * 1024));
        let sink = Arc::new(Sink::default());
        let dyn_sink: Arc<dyn DeliverySink> = sink.clone();
        (fake, pool, sink, dyn_sink)
    }

    fn channels(n: usize) -> Vec<Arc<str>> {
        (0..n).map(|i| Arc::from(format!("channel-{i}"))).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn a_subscription_is_confirmed_by_the_owner_and_deliveries_reach_the_sink() {
        let (fake, pool, sink, dyn_sink) = setup();
        pool.apply(brokers(&["a"]), &dyn_sink);
        settle().await;
        assert_eq!(pool.linked(), 1);
        let channel: Arc<str> = "news".into();
        let mut confirmed = pool.subscribe(&channel);
        tokio::time::timeout(Duration::from_secs(1), confirmed.wait_for(|c| *c)).await.unwrap().unwrap();
        assert!(fake.subscribed("a:1").contains(&channel));

        let inject = fake.inner.lock().unwrap().inject["a:1"].clone();
        let batch = Batch { deliveries: vec![("news".into(), Bytes::from_static(b"1"))], synced: vec![] };
        inject.send(Ok(batch)).unwrap();
        settle().await;
        assert_eq!(sink.0.lock().unwrap().as_slice(), [("news".to_owned(), Bytes::from_static(b"1"))]);

        pool.publish("news", Bytes::from_static(b"2"), None).await.unwrap();
        settle().await;
        assert!(
            fake.sent("a:1")
                .contains(&Command::Publish { channel: "news".into(), data: Bytes::from_static(b"2") })
        );

        pool.unsubscribe("news");
        settle().await;
        assert!(fake.subscribed("a:1").is_empty());
        pool.close();
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_broker_takes_its_channels_make_before_break() {
        let (fake, pool, _sink, sink) = setup();
        pool.apply(brokers(&["a"]), &sink);
        settle().await;
        let all = channels(40);
        for channel in &all {
            pool.subscribe(channel);
        }
        settle().await;
        assert_eq!(fake.subscribed("a:1").len(), all.len());

        pool.apply(brokers(&["a", "b"]), &sink);
        settle().await;
        let moved = fake.subscribed("b:1");
        assert!(
            !moved.is_empty() && moved.len() < all.len(),
            "some, not all, channels move: {}",
            moved.len()
        );
        for channel in &moved {
            let owner = rendezvous::owner(["a", "b"], channel.as_bytes()).unwrap();
            assert_eq!(owner, "b");
        }
        // Make before break: the old owner still has every channel until BREAK_DELAY passed.
        assert_eq!(fake.subscribed("a:1").len(), all.len());
        tokio::time::advance(BREAK_DELAY + Duration::from_millis(10)).await;
        settle().await;
        let kept = fake.subscribed("a:1");
        assert_eq!(kept.len() + moved.len(), all.len());
        assert!(kept.is_disjoint(&moved));
        pool.close();
    }

    #[tokio::test(start_paused = true)]
    async fn publishes_follow_a_move_only_after_the_grace() {
        let (fake, pool, _sink, sink) = setup();
        pool.apply(brokers(&["a"]), &sink);
        settle().await;
        tokio::time::advance(FOUNDING).await;
        let moved = channels(40)
            .into_iter()
            .find(|c| rendezvous::owner(["a", "b"], c.as_bytes()) == Some("b"))
            .unwrap();
        pool.subscribe(&moved);
        settle().await;

        pool.apply(brokers(&["a", "b"]), &sink);
        settle().await;
        // b is linked and holds the channel's subscription, but publishes still go to a, where
        // every worker keeps its subscription until the break.
        assert!(fake.subscribed("b:1").contains(&moved));
        let publish =
            |n: &'static [u8]| Command::Publish { channel: moved.to_string(), data: Bytes::from_static(n) };
        pool.publish(&moved, Bytes::from_static(b"1"), None).await.unwrap();
        settle().await;
        assert!(fake.sent("a:1").contains(&publish(b"1")));

        tokio::time::advance(MOVE_GRACE).await;
        pool.publish(&moved, Bytes::from_static(b"2"), None).await.unwrap();
        settle().await;
        assert!(fake.sent("b:1").contains(&publish(b"2")), "after the grace, the new owner");

        // b leaves: publishes keep going to it while it drains (its stream is open), then to a.
        pool.apply(brokers(&["a"]), &sink);
        settle().await;
        pool.publish(&moved, Bytes::from_static(b"3"), None).await.unwrap();
        settle().await;
        assert!(fake.sent("b:1").contains(&publish(b"3")));
        tokio::time::advance(MOVE_GRACE).await;
        pool.publish(&moved, Bytes::from_static(b"4"), None).await.unwrap();
        settle().await;
        assert!(fake.sent("a:1").contains(&publish(b"4")));
        pool.close();
    }

    #[tokio::test(start_paused = true)]
    async fn a_channel_subscribed_during_a_move_is_held_where_publishes_still_go() {
        let (fake, pool, _sink, sink) = setup();
        pool.apply(brokers(&["a"]), &sink);
        settle().await;
        tokio::time::advance(FOUNDING).await;
        pool.apply(brokers(&["a", "b"]), &sink);
        settle().await;
        // Subscribed after the change, a channel of b: another worker that has not seen b yet
        // (or this one, for MOVE_GRACE) publishes it to a, so a must deliver it here too.
        let fresh = channels(40)
            .into_iter()
            .find(|c| rendezvous::owner(["a", "b"], c.as_bytes()) == Some("b"))
            .unwrap();
        pool.subscribe(&fresh);
        settle().await;
        assert!(fake.subscribed("b:1").contains(&fresh));
        assert!(fake.subscribed("a:1").contains(&fresh), "held at the previous owner during the grace");
        tokio::time::advance(BREAK_DELAY + Duration::from_millis(10)).await;
        settle().await;
        assert!(!fake.subscribed("a:1").contains(&fresh), "released there after the break");
        assert!(fake.subscribed("b:1").contains(&fresh));
        pool.close();
    }

    #[tokio::test(start_paused = true)]
    async fn a_broker_that_leaves_drains_then_closes() {
        let (fake, pool, _sink, sink) = setup();
        pool.apply(brokers(&["a", "b"]), &sink);
        settle().await;
        let all = channels(40);
        for channel in &all {
            pool.subscribe(channel);
        }
        settle().await;
        let on_b = fake.subscribed("b:1");
        assert!(!on_b.is_empty());

        pool.apply(brokers(&["a"]), &sink);
        settle().await;
        // Every channel is on a at once; b's stream stays open (and its subscriptions) while
        // publishes sent to it before the change drain.
        assert_eq!(fake.subscribed("a:1").len(), all.len());
        assert_eq!(pool.linked(), 2);
        tokio::time::advance(BREAK_DELAY + Duration::from_millis(10)).await;
        settle().await;
        assert_eq!(pool.linked(), 1);
        // The leaving broker is closed, not unsubscribed channel by channel.
        assert_eq!(fake.subscribed("b:1"), on_b);
        pool.close();
    }

    #[tokio::test(start_paused = true)]
    async fn a_broker_that_comes_back_within_the_delay_keeps_its_channels() {
        let (fake, pool, _sink, sink) = setup();
        pool.apply(brokers(&["a", "b"]), &sink);
        settle().await;
        for channel in &channels(40) {
            pool.subscribe(channel);
        }
        settle().await;
        let on_b = fake.subscribed("b:1");
        pool.apply(brokers(&["a"]), &sink);
        settle().await;
        pool.apply(brokers(&["a", "b"]), &sink);
        settle().await;
        tokio::time::advance(BREAK_DELAY + Duration::from_millis(10)).await;
        settle().await;
        assert_eq!(pool.linked(), 2);
        assert_eq!(fake.subscribed("b:1"), on_b);
        pool.close();
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_link_retries_and_replays_its_channels() {
        let (fake, pool, _sink, sink) = setup();
        fake.inner.lock().unwrap().refuse.insert("a:1".into(), 3);
        pool.apply(brokers(&["a"]), &sink);
        settle().await;
        assert_eq!(pool.linked(), 0);
        // Subscriptions made while no stream is open are confirmed once one opens.
        let channel: Arc<str> = "late".into();
        let mut confirmed = pool.subscribe(&channel);
        // A publish waits for the link (up to LINK_WAIT) instead of failing at once.
        let publish = tokio::spawn({
            let pool = pool.clone();
            async move { pool.publish("late", Bytes::from_static(b"x"), None).await }
        });
        tokio::time::timeout(Duration::from_secs(2), confirmed.wait_for(|c| *c)).await.unwrap().unwrap();
        publish.await.unwrap().unwrap();
        assert_eq!(fake.inner.lock().unwrap().opens["a:1"], 1);

        // The stream breaks: the link reconnects and subscribes everything again.
        let breaker = fake.inner.lock().unwrap().breakers["a:1"].clone();
        breaker.cancel();
        settle().await;
        tokio::time::advance(Duration::from_secs(3)).await;
        settle().await;
        assert_eq!(fake.inner.lock().unwrap().opens["a:1"], 2);
        let subscribes =
            fake.sent("a:1").iter().filter(|c| **c == Command::Subscribe(channel.clone())).count();
        assert_eq!(subscribes, 2, "subscribed once, then again after the reconnect");
        pool.close();
    }

    #[tokio::test(start_paused = true)]
    async fn a_publish_receipt_comes_from_the_broker_or_fails_with_the_link() {
        let (fake, pool, _sink, sink) = setup();
        pool.apply(brokers(&["a"]), &sink);
        settle().await;
        let outcomes: Arc<Mutex<Vec<Result<(), Error>>>> = Arc::default();
        let receipt = || -> Receipt {
            let outcomes = outcomes.clone();
            Box::new(move |outcome| outcomes.lock().unwrap().push(outcome))
        };
        pool.publish("c", Bytes::from_static(b"1"), Some(receipt())).await.unwrap();
        settle().await;
        assert_eq!(outcomes.lock().unwrap().as_slice(), [Ok(())]);

        // Unconfirmed when the stream breaks: the publisher hears of it, once.
        fake.inner.lock().unwrap().mute = true;
        pool.publish("c", Bytes::from_static(b"2"), Some(receipt())).await.unwrap();
        settle().await;
        assert_eq!(outcomes.lock().unwrap().len(), 1, "no receipt before the broker answers");
        let breaker = fake.inner.lock().unwrap().breakers["a:1"].clone();
        breaker.cancel();
        settle().await;
        let outcomes = outcomes.lock().unwrap();
        assert_eq!(outcomes.len(), 2);
        assert!(matches!(outcomes[1], Err(Error::Link(_))), "{:?}", outcomes[1]);
        pool.close();
    }

    fn member(id: &str) -> PresenceMember {
        PresenceMember { id: id.to_owned(), user: Some(format!("user-{id}")) }
    }

    #[tokio::test(start_paused = true)]
    async fn presence_members_go_to_the_owner_and_follow_a_move() {
        let (fake, pool, _sink, sink) = setup();
        pool.apply(brokers(&["a"]), &sink);
        settle().await;
        tokio::time::advance(FOUNDING).await;
        // A channel b will own, with its event channel: both on the same broker.
        let room = channels(40)
            .into_iter()
            .find(|c| rendezvous::owner(["a", "b"], c.as_bytes()) == Some("b"))
            .unwrap();
        let events: Arc<str> = format!("#presence/{room}").into();
        pool.subscribe(&room);
        pool.subscribe(&events);
        for id in ["s1", "s2", "s3"] {
            pool.join(&room, member(id));
        }
        pool.leave(&room, "s2");
        pool.leave(&room, "nobody");
        settle().await;
        assert_eq!(fake.members("a:1", &room), ["s1", "s3"]);
        assert!(fake.subscribed("a:1").contains(&events));

        // b joins: it gets the channel, its event channel and the whole member set at once.
        pool.apply(brokers(&["a", "b"]), &sink);
        settle().await;
        assert_eq!(fake.members("b:1", &room), ["s1", "s3"]);
        assert!(fake.subscribed("b:1").contains(&events), "#presence/<c> lives with <c>");
        pool.join(&room, member("s4"));
        settle().await;
        assert_eq!(fake.members("b:1", &room), ["s1", "s3", "s4"], "new members go to the new owner");
        // After the break the old owner has none of them (dropped with the unsubscribe).
        tokio::time::advance(BREAK_DELAY + Duration::from_millis(10)).await;
        settle().await;
        assert!(fake.members("a:1", &room).is_empty());

        // The stream to b breaks: the reopened one gets the set again.
        let breaker = fake.inner.lock().unwrap().breakers["b:1"].clone();
        breaker.cancel();
        settle().await;
        tokio::time::advance(Duration::from_secs(3)).await;
        settle().await;
        assert_eq!(fake.inner.lock().unwrap().opens["b:1"], 2);
        let resets = fake
            .sent("b:1")
            .iter()
            .filter(|c| matches!(c, Command::PresenceReset { channel, .. } if *channel == room))
            .count();
        assert_eq!(resets, 2, "one replay per stream");
        assert_eq!(fake.members("b:1", &room), ["s1", "s3", "s4"]);

        // Everyone leaves and the channel is released.
        for id in ["s1", "s3", "s4"] {
            pool.leave(&room, id);
        }
        pool.unsubscribe(&room);
        settle().await;
        assert!(fake.members("b:1", &room).is_empty());
        assert!(pool.lock().presence.is_empty());
        pool.close();
    }

    #[tokio::test(start_paused = true)]
    async fn a_large_member_set_is_replayed_in_parts() {
        let (fake, pool, _sink, sink) = setup();
        let room: Arc<str> = "big".into();
        pool.subscribe(&room);
        // Joined before any broker is linked: sent with the replay when the stream opens.
        let n = 20_000;
        for i in 0..n {
            pool.join(&room, member(&format!("socket-{i:05}")));
        }
        pool.apply(brokers(&["a"]), &sink);
        settle().await;
        let parts = fake
            .sent("a:1")
            .iter()
            .filter(|c| matches!(c, Command::PresenceReset { .. }))
            .map(Command::wire_size)
            .collect::<Vec<_>>();
        assert!(parts.len() > 1, "{} parts", parts.len());
        assert!(parts.iter().all(|size| *size <= RESET_CHUNK + 64), "{parts:?}");
        assert_eq!(fake.members("a:1", &room).len(), n);
        pool.close();
    }

    #[tokio::test(start_paused = true)]
    async fn presence_event_channels_are_not_for_publishing() {
        let (_fake, pool, _sink, sink) = setup();
        pool.apply(brokers(&["a"]), &sink);
        settle().await;
        let refused = pool.publish("#presence/room", Bytes::from_static(b"{}"), None).await;
        assert_eq!(refused, Err(Error::ReservedChannel("#presence/room".into())));
        pool.close();
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_broker_a_publish_fails_after_the_link_wait() {
        let (_fake, pool, _sink, _dyn_sink) = setup();
        let started = tokio::time::Instant::now();
        assert_eq!(pool.publish("x", Bytes::new(), None).await, Err(Error::NoBroker));
        assert!(started.elapsed() >= LINK_WAIT);
        assert!(matches!(pool.kv("x").await, Err(Error::NoBroker)));
    }
}
