//! Local fan-out: which of this worker's sockets hold which channels.
//!
//! The worker subscribes a channel on its broker once, when the first local socket subscribes,
//! and drops it when the last one leaves ([`BrokerPool`] does the broker side). The hub is the
//! pool's [`DeliverySink`]: a message delivered by a broker is encoded into a `#publish` frame
//! once, and the same bytes are queued to every local subscriber's outbox
//! ([`crate::outbox::Outbox`]). Publishing does not pass through here: sockets and the exchange
//! hand publishes to the pool directly.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

use bytes::Bytes;
use serde_json::value::RawValue;
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::app::{Handler, PublishOut};
use crate::brokers::{BrokerPool, DeliverySink};
use crate::protocol;
use crate::socket::Socket;

/// Identifies one subscriber (a socket or an exchange subscription) within this worker.
pub(crate) type SocketKey = u64;

/// Who receives a channel's messages on this worker.
#[derive(Debug, Clone)]
pub(crate) enum Subscriber {
    /// A client socket: gets `#publish` frames in its outbox.
    Socket(Socket),
    /// Server code (an exchange subscription): gets the messages as JSON text.
    Server(mpsc::Sender<Bytes>),
}

/// The local subscribers of one channel.
type Subscribers = Vec<(SocketKey, Subscriber)>;

/// The worker's channel table.
pub(crate) struct Hub {
    /// RwLock: deliveries (readers) far outnumber subscription changes (writers). Never held
    /// across await; lock order is hub, then pool (a channel's first subscriber and the pool's
    /// subscription are made under the same write lock, so they cannot cross a last leave).
    channels: RwLock<HashMap<Arc<str>, Subscribers>>,
    /// Where channels are held at the broker level.
    pool: Arc<BrokerPool>,
    handler: Arc<dyn Handler>,
    next_key: AtomicU64,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub").field("pool", &self.pool).finish_non_exhaustive()
    }
}

impl Hub {
    /// A hub holding its channels on `pool`, asking `handler` about each delivery when it has a
    /// `publish_out` hook.
    pub(crate) fn new(pool: Arc<BrokerPool>, handler: Arc<dyn Handler>) -> Self {
        Self { channels: RwLock::new(HashMap::new()), pool, handler, next_key: AtomicU64::new(1) }
    }

    /// A fresh subscriber key.
    pub(crate) fn next_key(&self) -> SocketKey {
        self.next_key.fetch_add(1, Ordering::Relaxed)
    }

    /// Adds a subscriber to a channel (idempotent per key). Returns the shared channel name and
    /// the broker's confirmation of the channel's subscription (see [`BrokerPool::subscribe`]).
    pub(crate) fn subscribe(
        &self,
        channel: &str,
        key: SocketKey,
        subscriber: &Subscriber,
    ) -> (Arc<str>, Option<watch::Receiver<bool>>) {
        let mut channels = self.channels.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(subscribers) = channels.get_mut(channel)
            && !subscribers.iter().any(|(k, _)| *k == key)
        {
            subscribers.push((key, subscriber.clone()));
        }
        if let Some((name, _)) = channels.get_key_value(channel) {
            return (name.clone(), self.pool.confirmation(channel));
        }
        let name: Arc<str> = channel.into();
        channels.insert(name.clone(), vec![(key, subscriber.clone())]);
        let confirmed = self.pool.subscribe(&name);
        (name, Some(confirmed))
    }

    /// Removes a socket from a channel; returns whether it was subscribed.
    pub(crate) fn unsubscribe(&self, channel: &str, key: SocketKey) -> bool {
        let mut channels = self.channels.write().unwrap_or_else(PoisonError::into_inner);
        let Some(subscribers) = channels.get_mut(channel) else {
            return false;
        };
        let Some(index) = subscribers.iter().position(|(k, _)| *k == key) else {
            return false;
        };
        subscribers.swap_remove(index);
        if subscribers.is_empty() {
            channels.remove(channel);
            self.pool.unsubscribe(channel);
        }
        true
    }
}

impl DeliverySink for Hub {
    /// Queues a broker delivery to every local subscriber: one encode, shared bytes (unless a
    /// `publish_out` hook rewrites it for a recipient).
    fn deliver(&self, channel: &str, data: &Bytes) {
        let channels = self.channels.read().unwrap_or_else(PoisonError::into_inner);
        let Some(subscribers) = channels.get(channel) else { return };
        let frame = Utf8Bytes::from(protocol::encode_publish(channel, data));
        let raw: Option<Box<RawValue>> = if self.handler.has_publish_out() {
            let text = if data.is_empty() { "null" } else { std::str::from_utf8(data).unwrap_or("null") };
            RawValue::from_string(text.to_owned()).ok()
        } else {
            None
        };
        for (_, subscriber) in subscribers {
            match subscriber {
                Subscriber::Socket(socket) => {
                    let decision = raw.as_deref().map(|raw| self.handler.publish_out(socket, channel, raw));
                    let frame = match decision {
                        None | Some(PublishOut::Allow) => frame.clone(),
                        Some(PublishOut::Block) => continue,
                        Some(PublishOut::Rewrite(value)) => {
                            Utf8Bytes::from(protocol::encode_publish(channel, value.to_string().as_bytes()))
                        }
                    };
                    socket.outbox().push(frame);
                }
                Subscriber::Server(tx) => {
                    if tx.try_send(data.clone()).is_err() {
                        tracing::warn!(%channel, "exchange subscription not keeping up, message dropped");
                    }
                }
            }
        }
    }
}
