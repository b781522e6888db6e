//! Local fan-out: which of this worker's sockets hold which channels.
//!
//! The worker subscribes a channel on its broker once, when the first local socket subscribes,
//! and drops it when the last one leaves ([`BrokerPool`] does the broker side). A message
//! delivered by a broker is encoded into a `#publish` frame once, and the same bytes are queued
//! to every local subscriber's [`Outbox`].

use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock};

use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::brokers::BrokerPool;
use crate::outbox::Outbox;
use crate::protocol;

/// Identifies one socket within this worker.
pub type SocketKey = u64;

/// The local subscribers of one channel.
type Subscribers = Vec<(SocketKey, Arc<Outbox>)>;

/// The worker's channel table and its broker pool.
#[derive(Debug)]
pub struct Hub {
    /// RwLock: deliveries (readers) far outnumber subscription changes (writers). Never held
    /// across await; lock order is hub, then pool.
    channels: RwLock<HashMap<Arc<str>, Subscribers>>,
    pool: BrokerPool,
}

impl Hub {
    /// A hub sending broker traffic through `pool`.
    pub fn new(pool: BrokerPool) -> Self {
        Self {
            channels: RwLock::new(HashMap::new()),
            pool,
        }
    }

    /// The broker pool.
    pub fn pool(&self) -> &BrokerPool {
        &self.pool
    }

    /// Adds a socket to a channel; returns the shared channel name. Idempotent per socket.
    pub fn subscribe(&self, channel: &str, key: SocketKey, outbox: &Arc<Outbox>) -> Arc<str> {
        let mut channels = self
            .channels
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(subscribers) = channels.get_mut(channel)
            && !subscribers.iter().any(|(k, _)| *k == key)
        {
            subscribers.push((key, outbox.clone()));
        }
        if let Some((name, _)) = channels.get_key_value(channel) {
            return name.clone();
        }
        let name: Arc<str> = channel.into();
        channels.insert(name.clone(), vec![(key, outbox.clone())]);
        self.pool.subscribe(&name);
        name
    }

    /// Removes a socket from a channel; returns whether it was subscribed.
    pub fn unsubscribe(&self, channel: &str, key: SocketKey) -> bool {
        let mut channels = self
            .channels
            .write()
            .unwrap_or_else(PoisonError::into_inner);
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

    /// Queues a broker delivery to every local subscriber: one encode, shared bytes.
    pub fn deliver(&self, channel: &str, data: &[u8]) {
        let channels = self.channels.read().unwrap_or_else(PoisonError::into_inner);
        let Some(subscribers) = channels.get(channel) else {
            return;
        };
        let frame = Utf8Bytes::from(protocol::encode_publish(channel, data));
        for (_, outbox) in subscribers {
            outbox.push(frame.clone());
        }
    }

    /// Channels with at least one local subscriber.
    pub fn channel_count(&self) -> usize {
        self.channels
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}
