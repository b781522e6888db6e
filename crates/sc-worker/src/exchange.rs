//! The exchange as server code sees it: publish to a channel and subscribe to one from inside
//! the worker (the stock `worker.exchange` / `agServer.exchange`), and the shared key/value data.
//!
//! A publish goes through the channel's broker like a client's, so every subscriber on every
//! worker gets it. A subscription joins the local fan-out like a socket does (one broker
//! subscription per channel per worker, whoever holds it) and yields the messages as JSON.
//! Key/value calls go to the broker that owns the key (rendezvous hashing, like channels).
//! Presence calls (who is in a presence channel, and its join/leave events) go to the broker
//! that owns the channel (see [`crate::presence`]).

use std::sync::Arc;

use bytes::Bytes;
use serde_json::Value;
use tokio::sync::{mpsc, watch};

use crate::broker_link::Kv;
use crate::brokers::{BrokerPool, Receipt};
use crate::error::Error;
use crate::hub::{Hub, Message, Recipient, SocketKey};
use crate::presence::{self, Presence, PresenceEvent};

/// Messages a subscription holds before newer ones are dropped (with a warning).
const SUBSCRIPTION_QUEUE: usize = 4096;

/// The worker's exchange; cheap to clone.
#[derive(Debug, Clone)]
pub struct Exchange {
    /// Local fan-out, for subscriptions.
    hub: Arc<Hub>,
    /// The brokers, for publishes and key/value calls.
    pool: Arc<BrokerPool>,
}

/// A server-side subscription to one channel; dropping it unsubscribes.
#[derive(Debug)]
pub struct Subscription {
    hub: Arc<Hub>,
    key: SocketKey,
    channel: Arc<str>,
    rx: mpsc::Receiver<Bytes>,
}

impl Exchange {
    pub(crate) fn new(hub: Arc<Hub>, pool: Arc<BrokerPool>) -> Self {
        Self { hub, pool }
    }

    /// Publishes `data` to `channel`, to every subscriber on every worker.
    pub async fn publish(&self, channel: &str, data: &Value) -> Result<(), Error> {
        self.publish_raw(channel, Bytes::from(data.to_string())).await
    }

    /// Publishes JSON text as is (it must be valid JSON). Returns once the channel's broker has
    /// the message.
    pub async fn publish_raw(&self, channel: &str, json: Bytes) -> Result<(), Error> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let receipt: Receipt = Box::new(move |outcome| {
            let _ = tx.send(outcome);
        });
        self.pool.publish(channel, json, Some(receipt)).await?;
        rx.await.unwrap_or(Err(Error::NoBroker))
    }

    /// Stores `value` under `key`.
    pub async fn set(&self, key: &str, value: &Value) -> Result<(), Error> {
        self.kv(key).await?.set(key, Bytes::from(value.to_string())).await
    }

    /// The value under `key`.
    pub async fn get(&self, key: &str) -> Result<Option<Value>, Error> {
        self.kv(key).await?.get(key).await?.map(|v| json(&v)).transpose()
    }

    /// Removes `key`, returning its value.
    pub async fn remove(&self, key: &str) -> Result<Option<Value>, Error> {
        self.kv(key).await?.remove(key).await?.map(|v| json(&v)).transpose()
    }

    /// Appends `value` to the list under `key` (creating it); returns its index.
    pub async fn add(&self, key: &str, value: &Value) -> Result<u64, Error> {
        self.kv(key).await?.add(key, Bytes::from(value.to_string())).await
    }

    /// The slice `[start, end)` of the list under `key` (negative: from the end).
    pub async fn get_range(&self, key: &str, start: i64, end: Option<i64>) -> Result<Vec<Value>, Error> {
        list(&self.kv(key).await?.get_range(key, start, end).await?)
    }

    /// Removes the slice `[start, end)` of the list under `key` and returns it.
    pub async fn remove_range(&self, key: &str, start: i64, end: Option<i64>) -> Result<Vec<Value>, Error> {
        list(&self.kv(key).await?.remove_range(key, start, end).await?)
    }

    /// Elements of the list (or keys of the object) under `key`.
    pub async fn count(&self, key: &str) -> Result<u64, Error> {
        self.kv(key).await?.count(key).await
    }

    /// Whether `key` exists.
    pub async fn has_key(&self, key: &str) -> Result<bool, Error> {
        self.kv(key).await?.has_key(key).await
    }

    /// Makes `keys` expire after `seconds`; returns how many exist.
    pub async fn expire(&self, keys: &[&str], seconds: u64) -> Result<u64, Error> {
        let mut changed = 0;
        // Keys may live on different brokers: one call per key, each to its owner.
        for key in keys {
            changed += self.kv(key).await?.expire(key, seconds).await?;
        }
        Ok(changed)
    }

    /// Makes `keys` permanent again; returns how many exist.
    pub async fn unexpire(&self, keys: &[&str]) -> Result<u64, Error> {
        let mut changed = 0;
        for key in keys {
            changed += self.kv(key).await?.unexpire(key).await?;
        }
        Ok(changed)
    }

    /// When `key` expires, in milliseconds since the Unix epoch.
    pub async fn get_expiry(&self, key: &str) -> Result<Option<u64>, Error> {
        self.kv(key).await?.get_expiry(key).await
    }

    /// Unary calls to the broker that owns `key`.
    async fn kv(&self, key: &str) -> Result<Kv, Error> {
        self.pool.kv(key).await
    }

    /// The members of presence channel `channel`, cluster-wide, from the broker that owns it.
    /// Fails with [`Error::NotPresence`] for a channel that `[worker] presence_channels` does
    /// not name.
    pub async fn presence(&self, channel: &str) -> Result<Presence, Error> {
        if !self.hub.presence().matches(channel) {
            return Err(Error::NotPresence(channel.to_owned()));
        }
        let members = self.pool.presence(channel).await?;
        Ok(Presence { channel: channel.to_owned(), count: members.len(), members })
    }

    /// Subscribes server code to the join and leave events of presence channel `channel` (they
    /// are published on `#presence/<channel>`). Returns once the channel's broker has the
    /// subscription (or after [`LINK_WAIT`](crate::brokers::LINK_WAIT), 3 s, without a broker:
    /// it is made when one links), so every change after the call is delivered. Fails with
    /// [`Error::NotPresence`] for a channel that `[worker] presence_channels` does not name.
    pub async fn presence_events(&self, channel: &str) -> Result<PresenceEvents, Error> {
        if !self.hub.presence().matches(channel) {
            return Err(Error::NotPresence(channel.to_owned()));
        }
        let (subscription, confirmed) =
            self.subscribe_confirmed(&format!("{}{channel}", presence::EVENT_PREFIX));
        if let Some(mut confirmed) = confirmed {
            let _ = tokio::time::timeout(crate::brokers::LINK_WAIT, confirmed.wait_for(|done| *done)).await;
        }
        Ok(PresenceEvents { subscription })
    }

    /// Subscribes server code to `channel`.
    pub fn subscribe(&self, channel: &str) -> Subscription {
        self.subscribe_confirmed(channel).0
    }

    /// [`Exchange::subscribe`], with the broker's confirmation of the channel's subscription
    /// (see [`Hub::subscribe`]).
    fn subscribe_confirmed(&self, channel: &str) -> (Subscription, Option<watch::Receiver<bool>>) {
        let (tx, rx) = mpsc::channel(SUBSCRIPTION_QUEUE);
        let key = self.hub.next_key();
        let recipient: Arc<dyn Recipient> = Arc::new(ServerRecipient(tx));
        let (channel, confirmed) = self.hub.subscribe(channel, key, &recipient);
        (Subscription { hub: self.hub.clone(), key, channel, rx }, confirmed)
    }
}

/// A server-side subscription to a channel's presence events; dropping it unsubscribes.
#[derive(Debug)]
pub struct PresenceEvents {
    subscription: Subscription,
}

impl PresenceEvents {
    /// The next join or leave; `None` once the worker shuts down.
    pub async fn next(&mut self) -> Option<PresenceEvent> {
        loop {
            let value = self.subscription.next().await?;
            match serde_json::from_value::<PresenceEvent>(value) {
                Ok(event) => return Some(event),
                Err(e) => tracing::warn!(error = %e, "unreadable presence event skipped"),
            }
        }
    }

    /// The subscription's channel (`#presence/<channel>`).
    pub fn channel(&self) -> &str {
        self.subscription.channel()
    }
}

/// An exchange subscription as the hub sees it: a bounded queue of messages.
struct ServerRecipient(mpsc::Sender<Bytes>);

impl Recipient for ServerRecipient {
    fn deliver(&self, message: &Message<'_>) {
        if self.0.try_send(message.data.clone()).is_err() {
            tracing::warn!(channel = %message.channel, "exchange subscription not keeping up, message dropped");
        }
    }
}

fn json(bytes: &[u8]) -> Result<Value, Error> {
    serde_json::from_slice(bytes).map_err(|e| Error::BadReply(e.to_string()))
}

fn list(bytes: &[u8]) -> Result<Vec<Value>, Error> {
    serde_json::from_slice(bytes).map_err(|e| Error::BadReply(e.to_string()))
}

impl Subscription {
    /// The channel.
    pub fn channel(&self) -> &str {
        &self.channel
    }

    /// The next message (as JSON); `None` once the worker shuts down.
    pub async fn next(&mut self) -> Option<Value> {
        let data = self.rx.recv().await?;
        Some(if data.is_empty() { Value::Null } else { serde_json::from_slice(&data).unwrap_or(Value::Null) })
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.hub.unsubscribe(&self.channel, self.key);
    }
}
