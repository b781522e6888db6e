//! The broker's pub/sub core: which worker streams hold which channels, and delivery.
//!
//! Each attached worker stream gets a bounded delivery queue. A publish is pushed to every
//! subscribed stream's queue while the router lock is held, so every subscriber sees a channel's
//! messages in the same order: the order the broker received them. A stream whose queue is full
//! is a worker that stopped reading: it is cut (its stream ends with an error, the worker
//! reconnects and subscribes again) rather than allowed to stall everyone or grow memory.
//! Before that point publishers slow down: once a queue is half full, the publishing stream waits
//! for it to drain (see [`Router::publish`]).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// A message for one worker stream.
#[derive(Debug, Clone)]
pub(crate) struct Delivery {
    pub(crate) channel: Arc<str>,
    pub(crate) data: Bytes,
}

/// What goes out on a worker stream: deliveries, and the answers to its sync markers.
#[derive(Debug, Clone)]
pub(crate) enum Outgoing {
    Delivery(Delivery),
    /// Every command the worker sent before this marker is applied.
    Synced(u64),
}

impl Outgoing {
    /// About how many bytes this item takes in a gRPC message (for cutting batches).
    pub(crate) fn wire_size(&self) -> usize {
        match self {
            Self::Delivery(d) => d.channel.len() + d.data.len() + 16,
            Self::Synced(_) => 12,
        }
    }
}

/// Identifies one attached worker stream.
pub(crate) type StreamId = u64;

/// Channel subscriptions of the attached worker streams.
pub(crate) struct Router {
    /// std Mutex: held only for map updates and non-blocking queue pushes, never across await.
    inner: Mutex<Inner>,
    queue: usize,
    /// Told when a channel gets its first subscribed stream (`true`) or loses its last one, in
    /// that order (called under the router lock: it must not block). Set once, by the Redis
    /// bridge.
    watcher: OnceLock<Watcher>,
}

/// See [`Router::watch_channels`].
pub(crate) type Watcher = Box<dyn Fn(&Arc<str>, bool) + Send + Sync>;

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Router")
            .field("inner", &self.inner)
            .field("queue", &self.queue)
            .finish_non_exhaustive()
    }
}

/// The worker side of an attachment, held by the stream handler.
#[derive(Debug)]
pub(crate) struct Attachment {
    pub(crate) id: StreamId,
    /// Deliveries for this worker.
    pub(crate) deliveries: mpsc::Receiver<Outgoing>,
    /// Cancelled when the router cuts this stream (slow consumer).
    pub(crate) cut: CancellationToken,
}

#[derive(Debug, Default)]
struct Inner {
    next_id: StreamId,
    channels: HashMap<Arc<str>, Vec<StreamId>>,
    streams: HashMap<StreamId, Stream>,
}

#[derive(Debug)]
struct Stream {
    worker: String,
    tx: mpsc::Sender<Outgoing>,
    cut: CancellationToken,
    channels: HashSet<Arc<str>>,
}

impl Router {
    /// A router giving each worker stream a queue of `queue` deliveries.
    pub(crate) fn new(queue: usize) -> Self {
        Self { inner: Mutex::new(Inner::default()), queue: queue.max(2), watcher: OnceLock::new() }
    }

    /// Calls `watcher` whenever a channel gets its first subscribed stream or loses its last.
    pub(crate) fn watch_channels(&self, watcher: Watcher) {
        let _ = self.watcher.set(watcher);
    }

    /// Attaches a worker stream.
    pub(crate) fn attach(&self, worker: &str) -> Attachment {
        let (tx, deliveries) = mpsc::channel(self.queue);
        let cut = CancellationToken::new();
        let mut inner = self.lock();
        inner.next_id += 1;
        let id = inner.next_id;
        let stream = Stream { worker: worker.to_owned(), tx, cut: cut.clone(), channels: HashSet::new() };
        inner.streams.insert(id, stream);
        Attachment { id, deliveries, cut }
    }

    /// Detaches a stream and drops all its subscriptions.
    pub(crate) fn detach(&self, id: StreamId) {
        let mut inner = self.lock();
        let Some(stream) = inner.streams.remove(&id) else {
            return;
        };
        for channel in stream.channels {
            if inner.remove_subscriber(&channel, id) {
                self.notify(&channel, false);
            }
        }
    }

    /// Subscribes a stream to a channel (idempotent).
    pub(crate) fn subscribe(&self, id: StreamId, channel: &str) {
        let mut inner = self.lock();
        let Some(stream) = inner.streams.get_mut(&id) else {
            return;
        };
        if stream.channels.contains(channel) {
            return;
        }
        let channel: Arc<str> = match inner.channels.get_key_value(channel) {
            Some((key, _)) => key.clone(),
            None => channel.into(),
        };
        if let Some(stream) = inner.streams.get_mut(&id) {
            stream.channels.insert(channel.clone());
        }
        let subscribers = inner.channels.entry(channel.clone()).or_default();
        subscribers.push(id);
        if subscribers.len() == 1 {
            self.notify(&channel, true);
        }
    }

    /// Unsubscribes a stream from a channel (idempotent).
    pub(crate) fn unsubscribe(&self, id: StreamId, channel: &str) {
        let mut inner = self.lock();
        let Some(stream) = inner.streams.get_mut(&id) else {
            return;
        };
        if let Some(channel) = stream.channels.take(channel)
            && inner.remove_subscriber(&channel, id)
        {
            self.notify(&channel, false);
        }
    }

    /// Queues a message to every stream subscribed to `channel`. Returns the queues that are
    /// more than half full, for the publisher to wait on (see [`wait_for_room`]).
    pub(crate) fn publish(&self, channel: &str, data: Bytes) -> Vec<mpsc::Sender<Outgoing>> {
        let mut congested = Vec::new();
        crate::metrics::get().publishes.inc();
        let inner = self.lock();
        let Some((channel, subscribers)) = inner.channels.get_key_value(channel) else {
            return congested;
        };
        for id in subscribers {
            let Some(stream) = inner.streams.get(id) else {
                continue;
            };
            let delivery = Outgoing::Delivery(Delivery { channel: channel.clone(), data: data.clone() });
            match stream.tx.try_send(delivery) {
                Ok(()) => {
                    crate::metrics::get().deliveries.inc();
                    if stream.tx.capacity() < self.queue / 2 {
                        congested.push(stream.tx.clone());
                    }
                }
                Err(mpsc::error::TrySendError::Full(_)) => {
                    if !stream.cut.is_cancelled() {
                        crate::metrics::get().stream_cuts.inc();
                        tracing::error!(worker = %stream.worker, queue = self.queue, "worker stream not reading, cutting it");
                        stream.cut.cancel();
                    }
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {}
            }
        }
        congested
    }

    /// Answers a stream's sync marker: the commands before it are applied (the caller applies
    /// commands in order). A full queue cuts the stream, as for deliveries.
    pub(crate) fn sync(&self, id: StreamId, token: u64) {
        let inner = self.lock();
        let Some(stream) = inner.streams.get(&id) else { return };
        if let Err(mpsc::error::TrySendError::Full(_)) = stream.tx.try_send(Outgoing::Synced(token)) {
            if !stream.cut.is_cancelled() {
                crate::metrics::get().stream_cuts.inc();
            }
            tracing::error!(worker = %stream.worker, "worker stream not reading, cutting it");
            stream.cut.cancel();
        }
    }

    /// Attached worker streams.
    pub(crate) fn stream_count(&self) -> usize {
        self.lock().streams.len()
    }

    /// Channels with at least one subscribed stream.
    pub(crate) fn channel_count(&self) -> usize {
        self.lock().channels.len()
    }

    /// Each attached stream's worker id and subscription count, by stream id.
    pub(crate) fn subscriptions(&self) -> Vec<(String, usize)> {
        let inner = self.lock();
        let mut streams: Vec<_> = inner.streams.iter().collect();
        streams.sort_by_key(|(id, _)| **id);
        streams.into_iter().map(|(_, s)| (s.worker.clone(), s.channels.len())).collect()
    }

    fn notify(&self, channel: &Arc<str>, held: bool) {
        if let Some(watcher) = self.watcher.get() {
            watcher(channel, held);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves maps that are still consistent enough to use.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Inner {
    /// Drops one subscriber; returns whether the channel has none left.
    fn remove_subscriber(&mut self, channel: &str, id: StreamId) -> bool {
        if let Some(subscribers) = self.channels.get_mut(channel) {
            subscribers.retain(|s| *s != id);
            if subscribers.is_empty() {
                self.channels.remove(channel);
                return true;
            }
        }
        false
    }
}

/// Waits until each congested queue is back to at most half full, or closed.
pub(crate) async fn wait_for_room(congested: Vec<mpsc::Sender<Outgoing>>, queue: usize) {
    for tx in congested {
        // Reserving half the queue waits for the consumer to drain it; the permits are given
        // back at once.
        let _ = tx.reserve_many(queue / 2).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    #[tokio::test]
    async fn delivers_to_subscribed_streams_only() {
        let router = Router::new(16);
        let mut a = router.attach("a");
        let mut b = router.attach("b");
        router.subscribe(a.id, "news");
        router.subscribe(a.id, "news");
        router.subscribe(b.id, "chat");
        router.publish("news", data("1"));
        router.publish("chat", data("2"));
        router.publish("none", data("3"));
        let Outgoing::Delivery(got) = a.deliveries.recv().await.unwrap() else { panic!() };
        assert_eq!((&*got.channel, &got.data[..]), ("news", &b"1"[..]));
        assert!(a.deliveries.try_recv().is_err(), "subscribing twice delivers once");
        let Outgoing::Delivery(got) = b.deliveries.recv().await.unwrap() else { panic!() };
        assert_eq!(&got.data[..], b"2");
        router.sync(b.id, 7);
        assert!(matches!(b.deliveries.recv().await.unwrap(), Outgoing::Synced(7)));
    }

    #[tokio::test]
    async fn unsubscribe_and_detach_drop_subscriptions() {
        let router = Router::new(16);
        let mut a = router.attach("a");
        let b = router.attach("b");
        router.subscribe(a.id, "news");
        router.subscribe(b.id, "news");
        router.unsubscribe(a.id, "news");
        router.publish("news", data("1"));
        assert!(a.deliveries.try_recv().is_err());
        router.detach(b.id);
        assert_eq!(router.channel_count(), 0);
    }

    #[tokio::test]
    async fn a_full_queue_cuts_the_stream() {
        let router = Router::new(4);
        let a = router.attach("a");
        router.subscribe(a.id, "news");
        for i in 0..5 {
            router.publish("news", data(&i.to_string()));
        }
        assert!(a.cut.is_cancelled());
    }

    #[tokio::test]
    async fn congestion_is_reported_past_half() {
        let router = Router::new(4);
        let a = router.attach("a");
        router.subscribe(a.id, "news");
        assert!(router.publish("news", data("1")).is_empty());
        assert!(router.publish("news", data("2")).is_empty());
        assert_eq!(router.publish("news", data("3")).len(), 1);
    }
}
