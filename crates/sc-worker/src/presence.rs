//! Presence: the cluster-wide view of who is subscribed to a channel.
//!
//! Opt-in per channel (`[worker] presence_channels`; off by default, and then free). When a
//! socket subscribes to a presence channel, the hub tells the broker pool, which reports the
//! member (the socket id, and the `[worker] presence_user_field` of its auth token as `user`)
//! to the broker that owns the channel; an unsubscribe, a kick-out or a disconnect reports it
//! gone. The pool replays a channel's members to its new owner when the owner changes or a
//! stream reopens, so the owner always has every worker's set. A worker that dies takes its
//! members with it: its broker streams end with the process, and each broker drops what they
//! carried (see sc-broker's `presence` module).
//!
//! The owner publishes each change as a [`PresenceEvent`] on `#presence/<channel>`, a channel
//! placed on the same broker as `<channel>`. Server code reads them with
//! [`Exchange::presence_events`](crate::Exchange::presence_events) and the member list with
//! [`Exchange::presence`](crate::Exchange::presence); backends with `GET
//! /api/presence/<channel>` (in [`crate::http`]). Clients may neither subscribe nor publish to
//! `#presence/` channels: the app decides what to forward to them.
//!
//! What this module holds: the settings (which channels, which token field), the public types
//! and the channel-name rules; it uses no other module of the worker. The bookkeeping is in
//! [`crate::hub`] and [`crate::brokers`], the server-side calls in [`crate::exchange`].

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Where the join and leave events of channel `c` are published: `#presence/c`.
pub(crate) const EVENT_PREFIX: &str = "#presence/";

/// One member of a presence channel: a subscribed socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresenceMember {
    /// The socket id.
    pub id: String,
    /// The `[worker] presence_user_field` of the socket's auth token when it subscribed, if it
    /// was authenticated and the token has that field (a string, or else the field's JSON).
    pub user: Option<String>,
}

/// The members of a presence channel across the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Presence {
    /// The channel.
    pub channel: String,
    /// How many members (`members.len()`).
    pub count: usize,
    /// Every member once, sorted by socket id.
    pub members: Vec<PresenceMember>,
}

/// What happened to a member.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PresenceChange {
    /// The socket subscribed to the channel.
    Join,
    /// The socket unsubscribed, was kicked out, disconnected, or its worker died.
    Leave,
}

/// A join or leave, as published on `#presence/<channel>` (the JSON has these fields, `event`
/// being `"join"` or `"leave"`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresenceEvent {
    /// Join or leave.
    pub event: PresenceChange,
    /// The presence channel (without the `#presence/` prefix).
    pub channel: String,
    /// The socket id.
    pub id: String,
    /// The member's user, as in [`PresenceMember::user`].
    pub user: Option<String>,
}

/// Which channels are presence channels and what a member's user is (`[worker]
/// presence_channels` and `presence_user_field`).
#[derive(Debug, Clone, Default)]
pub(crate) struct Settings {
    /// Exact names, and prefixes (the patterns ending in `*`; "*" is the empty prefix).
    exact: Vec<String>,
    prefixes: Vec<String>,
    /// The token field shown as the member's user.
    pub(crate) user_field: String,
}

impl Settings {
    /// No presence channel.
    pub(crate) const NONE: Self = Self { exact: Vec::new(), prefixes: Vec::new(), user_field: String::new() };

    /// The settings of `[worker]`, with the app's own `patterns` added to
    /// `presence_channels`.
    pub(crate) fn from_config(config: &sc_common::config::WorkerConfig, patterns: &[String]) -> Self {
        let mut settings = Self { user_field: config.presence_user_field.clone(), ..Self::default() };
        for pattern in config.presence_channels.iter().chain(patterns) {
            match pattern.strip_suffix('*') {
                Some(prefix) => settings.prefixes.push(prefix.to_owned()),
                None => settings.exact.push(pattern.clone()),
            }
        }
        settings
    }

    /// Whether `channel`'s subscribers are tracked.
    pub(crate) fn matches(&self, channel: &str) -> bool {
        if is_event_channel(channel) {
            return false;
        }
        self.exact.iter().any(|c| c == channel)
            || self.prefixes.iter().any(|p| channel.starts_with(p.as_str()))
    }
}

/// Whether `channel` carries presence events (`#presence/...`): written by the brokers only.
pub(crate) fn is_event_channel(channel: &str) -> bool {
    channel.starts_with(EVENT_PREFIX)
}

/// What decides a channel's broker: its name, or for `#presence/<c>` the name `c`, so that a
/// channel's events come from the broker that holds its members.
pub(crate) fn owner_key(channel: &str) -> &[u8] {
    channel.strip_prefix(EVENT_PREFIX).unwrap_or(channel).as_bytes()
}

/// The member's user from a token payload: the field as a string, or its JSON for another
/// non-null value.
pub(crate) fn user_of(payload: &Value, field: &str) -> Option<String> {
    match payload.get(field)? {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        other => Some(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(patterns: &[&str]) -> Settings {
        let config = sc_common::config::WorkerConfig {
            presence_channels: patterns.iter().map(|p| (*p).to_owned()).collect(),
            ..Default::default()
        };
        Settings::from_config(&config, &[])
    }

    #[test]
    fn patterns_are_names_or_prefixes() {
        let off = settings(&[]);
        assert!(!off.matches("chat/a") && !off.matches(""));
        let some = settings(&["chat/*", "lobby"]);
        assert!(some.matches("chat/a") && some.matches("chat/") && some.matches("lobby"));
        assert!(!some.matches("lobby2") && !some.matches("chat") && !some.matches("news"));
        let all = settings(&["*"]);
        assert!(all.matches("anything") && all.matches(""));
        assert!(!all.matches("#presence/anything"), "event channels are never presence channels");
        assert_eq!(all.user_field, "username");
    }

    #[test]
    fn event_channels_live_with_their_channel() {
        assert_eq!(owner_key("#presence/chat/a"), b"chat/a");
        assert_eq!(owner_key("chat/a"), b"chat/a");
        assert!(is_event_channel("#presence/x") && !is_event_channel("presence/x"));
    }

    #[test]
    fn the_user_is_the_token_field() {
        let payload = serde_json::json!({"username": "alice", "id": 7, "none": null});
        assert_eq!(user_of(&payload, "username").as_deref(), Some("alice"));
        assert_eq!(user_of(&payload, "id").as_deref(), Some("7"));
        assert_eq!(user_of(&payload, "none"), None);
        assert_eq!(user_of(&payload, "missing"), None);
    }

    #[test]
    fn events_read_as_the_broker_writes_them() {
        let json = r#"{"event":"leave","channel":"room","id":"abc","user":null}"#;
        let event: PresenceEvent = serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(event.event, PresenceChange::Leave);
        assert_eq!((event.channel.as_str(), event.id.as_str(), event.user), ("room", "abc", None));
    }
}
