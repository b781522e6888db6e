//! The exchange as server code sees it: publish to a channel and subscribe to one from inside
//! the worker (the stock `worker.exchange` / `agServer.exchange`), and the shared key/value data.
//!
//! A publish goes through the channel's broker like a client's, so every subscriber on every
//! worker gets it. A subscription joins the local fan-out like a socket does (one broker
//! subscription per channel per worker, whoever holds it) and yields the messages as JSON.
//! Key/value calls go to the broker that owns the key (rendezvous hashing, like channels).

use std::sync::Arc;

use bytes::Bytes;
use sc_proto::broker::v1 as pb;
use serde_json::Value;
use tokio::sync::mpsc;

use crate::brokers::{Client, PublishError};
use crate::hub::{Hub, ServerMessage, SocketKey, Subscriber};

/// Messages a subscription holds before newer ones are dropped (with a warning).
const SUBSCRIPTION_QUEUE: usize = 4096;

/// The worker's exchange; cheap to clone.
#[derive(Debug, Clone)]
pub struct Exchange {
    hub: Arc<Hub>,
}

/// Why a key/value call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExchangeError {
    #[error("no broker is available for this key")]
    NoBroker,
    #[error("the broker refused: {0}")]
    Refused(String),
    #[error("the broker sent bad JSON: {0}")]
    BadReply(String),
}

/// A server-side subscription to one channel; dropping it unsubscribes.
#[derive(Debug)]
pub struct Subscription {
    hub: Arc<Hub>,
    key: SocketKey,
    channel: Arc<str>,
    rx: mpsc::Receiver<ServerMessage>,
}

impl Exchange {
    pub(crate) fn new(hub: Arc<Hub>) -> Self {
        Self { hub }
    }

    /// Publishes `data` to `channel`, to every subscriber on every worker.
    pub async fn publish(&self, channel: &str, data: &Value) -> Result<(), PublishError> {
        self.publish_raw(channel, Bytes::from(data.to_string())).await
    }

    /// Publishes JSON text as is (it must be valid JSON).
    pub async fn publish_raw(&self, channel: &str, json: Bytes) -> Result<(), PublishError> {
        self.hub.pool().publish(channel, json).await
    }

    /// Stores `value` under `key`.
    pub async fn set(&self, key: &str, value: &Value) -> Result<(), ExchangeError> {
        let request = pb::SetRequest { key: key.to_owned(), value: Bytes::from(value.to_string()) };
        self.client(key).await?.set(request).await.map_err(refused)?;
        Ok(())
    }

    /// The value under `key`.
    pub async fn get(&self, key: &str) -> Result<Option<Value>, ExchangeError> {
        let reply =
            self.client(key).await?.get(pb::GetRequest { key: key.to_owned() }).await.map_err(refused)?;
        reply.into_inner().value.map(|v| json(&v)).transpose()
    }

    /// Removes `key`, returning its value.
    pub async fn remove(&self, key: &str) -> Result<Option<Value>, ExchangeError> {
        let request = pb::RemoveRequest { key: key.to_owned() };
        let reply = self.client(key).await?.remove(request).await.map_err(refused)?;
        reply.into_inner().value.map(|v| json(&v)).transpose()
    }

    /// Appends `value` to the list under `key` (creating it); returns its index.
    pub async fn add(&self, key: &str, value: &Value) -> Result<u64, ExchangeError> {
        let request = pb::AddRequest { key: key.to_owned(), value: Bytes::from(value.to_string()) };
        Ok(self.client(key).await?.add(request).await.map_err(refused)?.into_inner().index)
    }

    /// The slice `[start, end)` of the list under `key` (negative: from the end).
    pub async fn get_range(
        &self,
        key: &str,
        start: i64,
        end: Option<i64>,
    ) -> Result<Vec<Value>, ExchangeError> {
        let request = pb::RangeRequest { key: key.to_owned(), start, end };
        let reply = self.client(key).await?.get_range(request).await.map_err(refused)?;
        list(&reply.into_inner().values)
    }

    /// Removes the slice `[start, end)` of the list under `key` and returns it.
    pub async fn remove_range(
        &self,
        key: &str,
        start: i64,
        end: Option<i64>,
    ) -> Result<Vec<Value>, ExchangeError> {
        let request = pb::RangeRequest { key: key.to_owned(), start, end };
        let reply = self.client(key).await?.remove_range(request).await.map_err(refused)?;
        list(&reply.into_inner().values)
    }

    /// Elements of the list (or keys of the object) under `key`.
    pub async fn count(&self, key: &str) -> Result<u64, ExchangeError> {
        let request = pb::KeyRequest { key: key.to_owned() };
        Ok(self.client(key).await?.count(request).await.map_err(refused)?.into_inner().count)
    }

    /// Whether `key` exists.
    pub async fn has_key(&self, key: &str) -> Result<bool, ExchangeError> {
        let request = pb::KeyRequest { key: key.to_owned() };
        Ok(self.client(key).await?.has_key(request).await.map_err(refused)?.into_inner().exists)
    }

    /// Makes `keys` expire after `seconds`; returns how many exist.
    pub async fn expire(&self, keys: &[&str], seconds: u64) -> Result<u64, ExchangeError> {
        let mut changed = 0;
        // Keys may live on different brokers: one call per key, each to its owner.
        for key in keys {
            let request = pb::ExpireRequest { keys: vec![(*key).to_owned()], seconds };
            changed += self.client(key).await?.expire(request).await.map_err(refused)?.into_inner().changed;
        }
        Ok(changed)
    }

    /// Makes `keys` permanent again; returns how many exist.
    pub async fn unexpire(&self, keys: &[&str]) -> Result<u64, ExchangeError> {
        let mut changed = 0;
        for key in keys {
            let request = pb::UnexpireRequest { keys: vec![(*key).to_owned()] };
            changed += self.client(key).await?.unexpire(request).await.map_err(refused)?.into_inner().changed;
        }
        Ok(changed)
    }

    /// When `key` expires, in milliseconds since the Unix epoch.
    pub async fn get_expiry(&self, key: &str) -> Result<Option<u64>, ExchangeError> {
        let request = pb::KeyRequest { key: key.to_owned() };
        Ok(self.client(key).await?.get_expiry(request).await.map_err(refused)?.into_inner().expires_at_ms)
    }

    async fn client(&self, key: &str) -> Result<Client, ExchangeError> {
        self.hub.pool().client_for(key).await.map_err(|_| ExchangeError::NoBroker)
    }

    /// Subscribes server code to `channel`.
    pub fn subscribe(&self, channel: &str) -> Subscription {
        let (tx, rx) = mpsc::channel(SUBSCRIPTION_QUEUE);
        let key = self.hub.next_key();
        let (channel, _confirmed) = self.hub.subscribe(channel, key, &Subscriber::Server(tx));
        Subscription { hub: self.hub.clone(), key, channel, rx }
    }
}

fn refused(status: tonic::Status) -> ExchangeError {
    ExchangeError::Refused(status.message().to_owned())
}

fn json(bytes: &[u8]) -> Result<Value, ExchangeError> {
    serde_json::from_slice(bytes).map_err(|e| ExchangeError::BadReply(e.to_string()))
}

fn list(bytes: &[u8]) -> Result<Vec<Value>, ExchangeError> {
    serde_json::from_slice(bytes).map_err(|e| ExchangeError::BadReply(e.to_string()))
}

impl Subscription {
    /// The channel.
    pub fn channel(&self) -> &str {
        &self.channel
    }

    /// The next message (as JSON); `None` once the worker shuts down.
    pub async fn next(&mut self) -> Option<Value> {
        let message = self.rx.recv().await?;
        Some(if message.data.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&message.data).unwrap_or(Value::Null)
        })
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.hub.unsubscribe(&self.channel, self.key);
    }
}
