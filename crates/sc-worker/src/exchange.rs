//! The exchange as server code sees it: publish to a channel and subscribe to one from inside
//! the worker (the stock `worker.exchange` / `agServer.exchange`).
//!
//! A publish goes through the channel's broker like a client's, so every subscriber on every
//! worker gets it. A subscription joins the local fan-out like a socket does (one broker
//! subscription per channel per worker, whoever holds it) and yields the messages as JSON.

use std::sync::Arc;

use bytes::Bytes;
use serde_json::Value;
use tokio::sync::mpsc;

use crate::brokers::PublishError;
use crate::hub::{Hub, ServerMessage, SocketKey, Subscriber};

/// Messages a subscription holds before newer ones are dropped (with a warning).
const SUBSCRIPTION_QUEUE: usize = 4096;

/// The worker's exchange; cheap to clone.
#[derive(Debug, Clone)]
pub struct Exchange {
    hub: Arc<Hub>,
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

    /// Subscribes server code to `channel`.
    pub fn subscribe(&self, channel: &str) -> Subscription {
        let (tx, rx) = mpsc::channel(SUBSCRIPTION_QUEUE);
        let key = self.hub.next_key();
        let channel = self.hub.subscribe(channel, key, &Subscriber::Server(tx));
        Subscription { hub: self.hub.clone(), key, channel, rx }
    }
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
