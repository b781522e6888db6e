//! Local fan-out: which of this worker's sockets hold which channels.
//!
//! The worker subscribes a channel on its broker once, when the first local socket subscribes,
//! and drops it when the last one leaves ([`BrokerPool`] does the broker side). The hub is the
//! pool's [`DeliverySink`]: a message delivered by a broker is encoded into a `#publish` frame
//! once, and the same bytes go to every local subscriber (a [`Recipient`]: a socket's outbox,
//! or an exchange subscription's queue). Publishing does not pass through here: sockets and the exchange
//! hand publishes to the pool directly.
//!
//! Presence (see [`crate::presence`]): a subscriber that is a member (a socket, see
//! [`Recipient::member`]) joining or leaving a presence channel is reported to the pool.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, PoisonError, RwLock};

use bytes::Bytes;
use serde_json::value::RawValue;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::brokers::{BrokerPool, DeliverySink};
use crate::presence::{self, PresenceMember};
use crate::protocol;

/// Identifies one subscriber (a socket or an exchange subscription) within this worker.
pub(crate) type SocketKey = u64;

/// One channel message, as each local subscriber gets it.
#[derive(Debug)]
pub(crate) struct Message<'a> {
    /// The channel.
    pub(crate) channel: &'a str,
    /// The message as JSON text (empty for `null`).
    pub(crate) data: &'a Bytes,
    /// The `#publish` frame, encoded once for every socket.
    pub(crate) frame: &'a Utf8Bytes,
    /// The message as a JSON value, when the app looks at each delivery (`publish_out`).
    pub(crate) json: Option<&'a RawValue>,
    /// It may be written to an idle socket directly (it came alone, not in a burst).
    pub(crate) direct: bool,
}

/// A local subscriber of channels: a client socket or server code. Called on the fan-out
/// path, under the hub's read lock: it must only queue, never wait.
pub(crate) trait Recipient: Send + Sync {
    /// Queues `message` for this subscriber.
    fn deliver(&self, message: &Message<'_>);

    /// This subscriber as a presence member (a socket: its id, and the `user_field` of its
    /// auth token as its user); `None` for one that is no member (server code).
    fn member(&self, _user_field: &str) -> Option<PresenceMember> {
        None
    }
}

/// The local subscribers of one channel.
type Subscribers = Vec<(SocketKey, Arc<dyn Recipient>)>;

/// The worker's channel table.
pub(crate) struct Hub {
    /// RwLock: deliveries (readers) far outnumber subscription changes (writers). Never held
    /// across await; lock order is hub, then pool (a channel's first subscriber and the pool's
    /// subscription are made under the same write lock, so they cannot cross a last leave).
    channels: RwLock<HashMap<Arc<str>, Subscribers>>,
    /// Where channels are held at the broker level.
    pool: Arc<BrokerPool>,
    /// The app has a `publish_out` hook: recipients get each message as a JSON value too. Set
    /// once the app is built (after the hub, which the app's exchange handle needs).
    with_json: AtomicBool,
    /// Which channels are presence channels (none by default); set once, when the app is
    /// built (it may name channels too), before any socket.
    presence: OnceLock<presence::Settings>,
    next_key: AtomicU64,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub").field("pool", &self.pool).finish_non_exhaustive()
    }
}

impl Hub {
    /// A hub holding its channels on `pool`.
    pub(crate) fn new(pool: Arc<BrokerPool>) -> Self {
        Self {
            channels: RwLock::new(HashMap::new()),
            pool,
            with_json: AtomicBool::new(false),
            presence: OnceLock::new(),
            next_key: AtomicU64::new(1),
        }
    }

    /// Whether recipients look at each message (the app's `publish_out` hook): then it is
    /// parsed once per delivery, not per recipient.
    pub(crate) fn set_with_json(&self, with_json: bool) {
        self.with_json.store(with_json, Ordering::Relaxed);
    }

    /// Sets which channels are presence channels (`[worker] presence_channels` and the
    /// app's); a second call changes nothing.
    pub(crate) fn set_presence(&self, settings: presence::Settings) {
        let _ = self.presence.set(settings);
    }

    /// Which channels are presence channels.
    pub(crate) fn presence(&self) -> &presence::Settings {
        static NONE: presence::Settings = presence::Settings::NONE;
        self.presence.get().unwrap_or(&NONE)
    }

    /// `subscriber` as a member of `channel`, if that is a presence channel and the subscriber
    /// a member (a socket).
    fn presence_member(&self, channel: &str, subscriber: &Arc<dyn Recipient>) -> Option<PresenceMember> {
        let presence = self.presence();
        if !presence.matches(channel) {
            return None;
        }
        subscriber.member(&presence.user_field)
    }

    /// Tells the pool that `subscriber` joined `channel`, if that is a presence channel and
    /// the subscriber a member (called under the write lock, after the pool holds `channel`).
    fn join(&self, channel: &Arc<str>, subscriber: &Arc<dyn Recipient>) {
        if let Some(member) = self.presence_member(channel, subscriber) {
            self.pool.join(channel, member);
        }
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
        subscriber: &Arc<dyn Recipient>,
    ) -> (Arc<str>, Option<watch::Receiver<bool>>) {
        let mut channels = self.channels.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(name) = channels.get_key_value(channel).map(|(name, _)| name.clone()) {
            if let Some(subscribers) = channels.get_mut(&name)
                && !subscribers.iter().any(|(k, _)| *k == key)
            {
                subscribers.push((key, subscriber.clone()));
                crate::metrics::get().subscriptions.inc();
                self.join(&name, subscriber);
            }
            return (name, self.pool.confirmation(channel));
        }
        let name: Arc<str> = channel.into();
        channels.insert(name.clone(), vec![(key, subscriber.clone())]);
        crate::metrics::get().subscriptions.inc();
        crate::metrics::get().channels.inc();
        let confirmed = self.pool.subscribe(&name);
        self.join(&name, subscriber);
        (name, Some(confirmed))
    }

    /// Removes a subscriber from a channel; returns whether it was subscribed.
    pub(crate) fn unsubscribe(&self, channel: &str, key: SocketKey) -> bool {
        let mut channels = self.channels.write().unwrap_or_else(PoisonError::into_inner);
        let Some(subscribers) = channels.get_mut(channel) else {
            return false;
        };
        let Some(index) = subscribers.iter().position(|(k, _)| *k == key) else {
            return false;
        };
        let (_, subscriber) = subscribers.swap_remove(index);
        crate::metrics::get().subscriptions.dec();
        // The leave before the broker-level unsubscribe below, which drops members silently.
        if let Some(member) = self.presence_member(channel, &subscriber) {
            self.pool.leave(channel, &member.id);
        }
        if subscribers.is_empty() {
            channels.remove(channel);
            crate::metrics::get().channels.dec();
            self.pool.unsubscribe(channel);
        }
        true
    }
}

impl DeliverySink for Hub {
    /// Queues a broker delivery to every local subscriber: one encode, shared bytes. A `lone`
    /// message may be written to idle sockets directly ([`crate::direct`]); the messages of a
    /// burst go through the sockets' tasks, which write each socket's share with one syscall.
    fn deliver(&self, channel: &str, data: &Bytes, lone: bool) {
        let channels = self.channels.read().unwrap_or_else(PoisonError::into_inner);
        let Some(subscribers) = channels.get(channel) else { return };
        let frame = Utf8Bytes::from(protocol::encode_publish(channel, data));
        let json: Option<Box<RawValue>> = if self.with_json.load(Ordering::Relaxed) {
            let text = if data.is_empty() { "null" } else { std::str::from_utf8(data).unwrap_or("null") };
            RawValue::from_string(text.to_owned()).ok()
        } else {
            None
        };
        let message = Message { channel, data, frame: &frame, json: json.as_deref(), direct: lone };
        for (_, subscriber) in subscribers {
            subscriber.deliver(&message);
        }
    }
}
