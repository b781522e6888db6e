//! The worker's links to the brokers: one `sc.broker.v1.Broker/Attach` stream per live broker.
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
//!   a slow broker slows publishers down instead of growing memory.
//!
//! This module is the gRPC edge on the worker side: wire types stay here.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use sc_common::batch::BatchStream;
use sc_common::membership::Backoff;
use sc_common::{rendezvous, secret};
use sc_proto::broker::v1 as pb;
use tokio::sync::{Notify, Semaphore, mpsc, watch};
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use crate::hub::Hub;

/// Publishes that may be queued to one broker before publishers wait.
const PUBLISH_WINDOW: usize = 8192;
/// Most commands in one gRPC message.
const MAX_BATCH: usize = 512;
/// How long the old owner of a moved channel (or a broker that left) keeps delivering to this
/// worker: long enough for every other worker to see the same membership change and stop
/// publishing to the old owner. A leaving broker drains until the workers closed their streams
/// (at most `sc_broker::DRAIN`, which is longer).
pub const BREAK_DELAY: Duration = Duration::from_secs(2);
/// How long a publish waits for its channel's broker to be linked (a worker that just started,
/// or a broker that is being replaced) before it fails.
pub const LINK_WAIT: Duration = Duration::from_secs(3);

/// Why a publish could not be handed to a broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    #[error("no broker is available for this channel")]
    NoBroker,
}

/// The worker's broker links.
#[derive(Debug)]
pub struct BrokerPool {
    worker_id: String,
    secret: String,
    /// std Mutex: held for map updates and non-blocking sends, never across await.
    state: Mutex<State>,
    /// Wakes publishers waiting for a broker stream to open.
    linked: Notify,
}

#[derive(Debug, Default)]
struct State {
    /// Channels this worker holds at the broker level, each with whether its owner broker has
    /// confirmed the subscription (a sync marker after it came back).
    channels: HashMap<Arc<str>, watch::Sender<bool>>,
    next_sync: u64,
    /// Live brokers by id.
    brokers: BTreeMap<String, Entry>,
    next_generation: u64,
}

#[derive(Debug)]
struct Entry {
    grpc: String,
    generation: u64,
    /// Left the membership: owns nothing, its stream stays open until [`BREAK_DELAY`] passed.
    leaving: bool,
    /// Sync markers sent on the open stream, with the channels each confirms.
    syncs: HashMap<u64, Vec<Arc<str>>>,
    /// The open stream, if any: commands sent while it is `None` are not needed later (the
    /// subscriptions are replayed when it opens; publishes fail fast).
    link: Option<Link>,
    stop: CancellationToken,
}

/// A broker client for unary calls (the exchange).
pub type Client = pb::broker_client::BrokerClient<InterceptedService<Channel, secret::Attach>>;

#[derive(Debug, Clone)]
struct Link {
    tx: mpsc::UnboundedSender<pb::Command>,
    client: Client,
    /// Free slots of the publish window; given back as the stream takes publishes out.
    window: Arc<Semaphore>,
}

impl BrokerPool {
    /// A pool for the worker `worker_id`, authenticating with the cluster `secret`.
    pub fn new(worker_id: String, secret: String) -> Self {
        Self { worker_id, secret, state: Mutex::new(State::default()), linked: Notify::new() }
    }

    /// Holds `channel` at the broker level (called for its first local subscriber). The
    /// receiver turns true once the owner broker confirmed the subscription: from then on every
    /// publish to the channel reaches this worker.
    pub fn subscribe(&self, channel: &Arc<str>) -> watch::Receiver<bool> {
        let mut state = self.lock();
        let (tx, rx) = watch::channel(false);
        state.channels.insert(channel.clone(), tx);
        if let Some(id) = state.owner(channel.as_bytes()).map(str::to_owned) {
            state.subscribe_and_sync(&id, vec![channel.clone()]);
        }
        rx
    }

    /// Whether (and when) a held channel's subscription is confirmed; `None` if not held.
    pub fn confirmation(&self, channel: &str) -> Option<watch::Receiver<bool>> {
        self.lock().channels.get(channel).map(watch::Sender::subscribe)
    }

    /// Stops holding `channel` (called when its last local subscriber left).
    pub fn unsubscribe(&self, channel: &str) {
        let mut state = self.lock();
        state.channels.remove(channel);
        state.send_to_owner(channel, || unsubscribe(channel));
    }

    /// Publishes `data` (JSON text) to `channel` through its owner broker, waiting up to
    /// [`LINK_WAIT`] for that broker's stream to open.
    pub async fn publish(&self, channel: &str, data: Bytes) -> Result<(), PublishError> {
        let link = self.owner_link(channel.as_bytes()).await?;
        // The permit is given back by the stream when it takes the publish out.
        match link.window.acquire().await {
            Ok(permit) => permit.forget(),
            Err(_) => return Err(PublishError::NoBroker),
        }
        let command = pb::Command {
            kind: Some(pb::command::Kind::Publish(pb::Publish { channel: channel.to_owned(), data })),
        };
        link.tx.send(command).map_err(|_| PublishError::NoBroker)
    }

    /// A client for unary calls to the broker that owns `key` (the exchange), waiting up to
    /// [`LINK_WAIT`] for it.
    pub async fn client_for(&self, key: &str) -> Result<Client, PublishError> {
        Ok(self.owner_link(key.as_bytes()).await?.client)
    }

    async fn owner_link(&self, key: &[u8]) -> Result<Link, PublishError> {
        let deadline = tokio::time::Instant::now() + LINK_WAIT;
        loop {
            let linked = self.linked.notified();
            tokio::pin!(linked);
            linked.as_mut().enable();
            if let Some(link) = self.lock().owner_link(key) {
                return Ok(link);
            }
            if tokio::time::timeout_at(deadline, linked).await.is_err() {
                return Err(PublishError::NoBroker);
            }
        }
    }

    /// Brokers with an open stream.
    pub fn linked(&self) -> usize {
        self.lock().brokers.values().filter(|e| e.link.is_some()).count()
    }

    /// Applies a new set of live brokers (id, gRPC address): links new ones, lets gone ones
    /// drain, and moves the channels whose owner changed, make before break.
    pub fn apply(&self, brokers: Vec<(String, String)>, hub: &Arc<Hub>) {
        let mut state = self.lock();
        let before: Vec<(Arc<str>, Option<String>)> = state
            .channels
            .keys()
            .map(|c| (c.clone(), state.owner(c.as_bytes()).map(str::to_owned)))
            .collect();

        let wanted: BTreeMap<String, String> = brokers.into_iter().collect();
        let mut draining = Vec::new();
        state.brokers.retain(|id, entry| match wanted.get(id) {
            Some(grpc) if *grpc == entry.grpc => {
                entry.leaving = false;
                true
            }
            // Restarted elsewhere: the old process is gone, nothing to drain.
            Some(_) => {
                entry.stop.cancel();
                false
            }
            None if entry.leaving => true,
            None => {
                tracing::debug!(broker = %id, "broker left, draining");
                entry.leaving = true;
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
            let stop = CancellationToken::new();
            let entry = Entry {
                grpc: grpc.clone(),
                generation,
                leaving: false,
                syncs: HashMap::new(),
                link: None,
                stop: stop.clone(),
            };
            state.brokers.insert(id.clone(), entry);
            tracing::debug!(broker = %id, %grpc, "broker joined");
            tokio::spawn(run_link(hub.clone(), id, grpc, generation, stop));
        }

        let mut breaks = Vec::new();
        for (channel, old) in before {
            let new = state.owner(channel.as_bytes()).map(str::to_owned);
            if new == old {
                continue;
            }
            // Make: the new owner at once (or when its stream opens).
            if let Some(link) = new.as_deref().and_then(|id| state.link(id)) {
                let _ = link.tx.send(subscribe(&channel));
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
            let hub = hub.clone();
            tokio::spawn(async move {
                tokio::time::sleep(BREAK_DELAY).await;
                hub.pool().finish_moves(draining, breaks);
            });
        }
    }

    /// The break half of [`BrokerPool::apply`]: closes the streams of brokers that left and
    /// unsubscribes moved channels from their old owners, unless things changed back meanwhile.
    fn finish_moves(&self, draining: Vec<(String, u64)>, breaks: Vec<(Arc<str>, String)>) {
        let mut state = self.lock();
        for (id, generation) in draining {
            if state.brokers.get(&id).is_some_and(|e| e.leaving && e.generation == generation)
                && let Some(entry) = state.brokers.remove(&id)
            {
                tracing::debug!(broker = %id, "broker stream closed after draining");
                entry.stop.cancel();
            }
        }
        for (channel, old) in breaks {
            let still_moved = state.owner(channel.as_bytes()) != Some(old.as_str());
            let leaving = state.brokers.get(&old).is_none_or(|e| e.leaving);
            if still_moved
                && !leaving
                && let Some(link) = state.link(&old)
            {
                let _ = link.tx.send(unsubscribe(&channel));
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
        self.next_sync += 1;
        let token = self.next_sync;
        let Some(entry) = self.brokers.get_mut(id) else { return };
        let Some(link) = &entry.link else { return };
        for channel in &channels {
            let _ = link.tx.send(subscribe(channel));
        }
        let _ = link.tx.send(pb::Command { kind: Some(pb::command::Kind::Sync(token)) });
        entry.syncs.insert(token, channels);
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
        let live = self.brokers.iter().filter(|(_, e)| !e.leaving).map(|(id, _)| id.as_str());
        rendezvous::owner(live, key)
    }

    fn link(&self, id: &str) -> Option<&Link> {
        self.brokers.get(id).and_then(|e| e.link.as_ref())
    }

    fn owner_link(&self, key: &[u8]) -> Option<Link> {
        self.owner(key).and_then(|id| self.link(id)).cloned()
    }

    fn send_to_owner(&self, channel: &str, command: impl FnOnce() -> pb::Command) {
        if let Some(link) = self.owner(channel.as_bytes()).and_then(|id| self.link(id)) {
            let _ = link.tx.send(command());
        }
    }
}

fn subscribe(channel: &str) -> pb::Command {
    pb::Command { kind: Some(pb::command::Kind::Subscribe(channel.to_owned())) }
}

fn unsubscribe(channel: &str) -> pb::Command {
    pb::Command { kind: Some(pb::command::Kind::Unsubscribe(channel.to_owned())) }
}

/// Keeps one broker's stream open until `stop`, reconnecting with backoff.
async fn run_link(hub: Arc<Hub>, id: String, grpc: String, generation: u64, stop: CancellationToken) {
    let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(2));
    let mut failures = 0u32;
    loop {
        let outcome = tokio::select! {
            _ = stop.cancelled() => return,
            outcome = link_once(&hub, &id, &grpc, generation) => outcome,
        };
        // The stream is gone: stop routing to it.
        {
            let mut state = hub.pool().lock();
            if let Some(entry) = state.brokers.get_mut(&id).filter(|e| e.generation == generation) {
                entry.link = None;
                entry.syncs.clear();
            }
        }
        match outcome {
            Ok(true) => {
                backoff.reset();
                failures = 0;
            }
            Ok(false) => {}
            Err(e) => {
                failures += 1;
                if failures == 5 {
                    tracing::warn!(broker = %id, %grpc, error = %e, "cannot reach broker, retrying");
                } else {
                    tracing::debug!(broker = %id, %grpc, error = %e, "broker link failed");
                }
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(backoff.next_delay()) => {}
        }
    }
}

/// One stream's life. `Ok(true)` if it was open and ended, `Ok(false)` if superseded.
async fn link_once(hub: &Arc<Hub>, id: &str, grpc: &str, generation: u64) -> Result<bool, String> {
    let pool = hub.pool();
    let endpoint = Endpoint::from_shared(format!("http://{grpc}"))
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true);
    let channel = endpoint.connect().await.map_err(|e| e.to_string())?;
    let mut client =
        pb::broker_client::BrokerClient::with_interceptor(channel, secret::Attach::new(&pool.secret))
            .max_decoding_message_size(64 * 1024 * 1024);

    let (tx, rx) = mpsc::unbounded_channel();
    let window = Arc::new(Semaphore::new(PUBLISH_WINDOW));
    {
        let mut state = pool.lock();
        let owned: Vec<Arc<str>> =
            state.channels.keys().filter(|c| state.owner(c.as_bytes()) == Some(id)).cloned().collect();
        let Some(entry) = state.brokers.get_mut(id).filter(|e| e.generation == generation) else {
            return Ok(false);
        };
        entry.link = Some(Link { tx, client: client.clone(), window: window.clone() });
        entry.syncs.clear();
        tracing::debug!(broker = %id, channels = owned.len(), "broker stream open");
        // Replay this broker's channels (after a restart it knows none), confirmed by one sync.
        state.subscribe_and_sync(id, owned);
    }
    pool.linked.notify_waiters();

    let commands = BatchStream::new(rx, MAX_BATCH).map(move |commands: Vec<pb::Command>| {
        let publishes =
            commands.iter().filter(|c| matches!(c.kind, Some(pb::command::Kind::Publish(_)))).count();
        window.add_permits(publishes);
        pb::WorkerBatch { commands }
    });
    let mut request = tonic::Request::new(commands);
    if let Ok(value) = pool.worker_id.parse() {
        request.metadata_mut().insert("sc-worker-id", value);
    }
    let mut deliveries = client.attach(request).await.map_err(|s| s.to_string())?.into_inner();
    loop {
        match deliveries.message().await {
            Ok(Some(batch)) => {
                for delivery in batch.deliveries {
                    hub.deliver(&delivery.channel, &delivery.data);
                }
                if !batch.synced.is_empty() {
                    pool.lock().confirm(id, generation, &batch.synced);
                }
            }
            Ok(None) => {
                tracing::debug!(broker = %id, "broker closed the stream");
                return Ok(true);
            }
            Err(status) => {
                tracing::debug!(broker = %id, %status, "broker stream failed");
                return Ok(true);
            }
        }
    }
}
