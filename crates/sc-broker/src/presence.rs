//! Presence: who is subscribed to a presence channel, as the workers report it.
//!
//! Workers send the members of the presence channels this broker owns on their `Attach`
//! streams (join, leave, and a full reset when a channel's owner changes or a stream reopens).
//! The broker keeps them per channel and per stream: a socket lives on one worker, but a worker
//! may briefly have two streams here (a reconnect), so a member counts once however many
//! streams list it. When a stream ends its members go with it: that is how a worker killed
//! with SIGKILL leaves every channel at once (its TCP connection closes with the process).
//!
//! Each change of the member set (a member new to the channel, or gone from every stream) is an
//! [`Event`], which the caller publishes on `#presence/<channel>`; workers route that channel to
//! the same broker as `<channel>`, so its subscribers get the events from the owner. A broker
//! that is leaving the cluster is [`quiet`](Presence::quiet): its streams close as the workers
//! move away, and those members are not leaving their channels.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;

use crate::router::StreamId;

/// The prefix of the channels where join and leave events are published.
pub(crate) const EVENT_PREFIX: &str = "#presence/";

/// One member: a socket id and, when its socket was authenticated, its user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Member {
    pub(crate) id: String,
    pub(crate) user: Option<String>,
}

/// A change of a channel's member set, to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Event {
    /// `#presence/<channel>`.
    pub(crate) channel: String,
    /// The event as JSON text: `{"event":"join"|"leave","channel":..,"id":..,"user":..}`.
    pub(crate) data: Bytes,
}

/// The presence channels' members; see the module doc.
#[derive(Debug, Default)]
pub(crate) struct Presence {
    /// std Mutex: held for map updates only, never across await.
    inner: Mutex<Inner>,
    /// Set once this broker leaves the cluster: no more events.
    quiet: AtomicBool,
}

/// A stream's members of one channel: socket id to user.
type Members = BTreeMap<String, Option<String>>;

#[derive(Debug, Default)]
struct Inner {
    /// Channel, then stream, then its members.
    channels: HashMap<Arc<str>, HashMap<StreamId, Members>>,
    /// The channels where each stream has members (for dropping a stream).
    streams: HashMap<StreamId, HashSet<Arc<str>>>,
    /// A reset in several parts being received, per stream and channel.
    staged: HashMap<(StreamId, Arc<str>), Members>,
}

impl Presence {
    /// A member joined `channel` on stream `stream`.
    pub(crate) fn join(&self, stream: StreamId, channel: &str, member: Member) -> Vec<Event> {
        let mut inner = self.lock();
        let channel = inner.intern(channel);
        let new = !inner.present(&channel, &member.id);
        let event = new.then(|| event(&channel, "join", &member.id, member.user.as_deref()));
        inner.streams.entry(stream).or_default().insert(channel.clone());
        inner.channels.entry(channel).or_default().entry(stream).or_default().insert(member.id, member.user);
        self.events(event.into_iter().collect())
    }

    /// A member left `channel` on stream `stream`.
    pub(crate) fn leave(&self, stream: StreamId, channel: &str, id: &str) -> Vec<Event> {
        let mut inner = self.lock();
        let Some(user) = inner.remove(stream, channel, id) else { return Vec::new() };
        let gone = !inner.present(channel, id);
        self.events(gone.then(|| event(channel, "leave", id, user.as_deref())).into_iter().collect())
    }

    /// Replaces what stream `stream` holds of `channel` with `members` (with `more`: a part,
    /// more follow; the set is applied with the last part).
    pub(crate) fn reset(
        &self,
        stream: StreamId,
        channel: &str,
        members: Vec<Member>,
        more: bool,
    ) -> Vec<Event> {
        let mut inner = self.lock();
        let channel = inner.intern(channel);
        let mut set = inner.staged.remove(&(stream, channel.clone())).unwrap_or_default();
        set.extend(members.into_iter().map(|m| (m.id, m.user)));
        if more {
            inner.staged.insert((stream, channel), set);
            return Vec::new();
        }
        let old = inner.take(stream, &channel);
        let mut events = Vec::new();
        for (id, user) in &old {
            if !set.contains_key(id) && !inner.present(&channel, id) {
                events.push(event(&channel, "leave", id, user.as_deref()));
            }
        }
        for (id, user) in &set {
            if !old.contains_key(id) && !inner.present(&channel, id) {
                events.push(event(&channel, "join", id, user.as_deref()));
            }
        }
        if !set.is_empty() {
            inner.streams.entry(stream).or_default().insert(channel.clone());
            inner.channels.entry(channel).or_default().insert(stream, set);
        }
        self.events(events)
    }

    /// Stream `stream` unsubscribed `channel`: its members of it are dropped without events
    /// (the worker holds them on the channel's new owner; a member that really left was sent
    /// as a leave first).
    pub(crate) fn unsubscribe(&self, stream: StreamId, channel: &str) {
        let mut inner = self.lock();
        inner.take(stream, channel);
        inner.staged.remove(&(stream, Arc::from(channel)));
    }

    /// Stream `stream` ended: its members leave, with an event for each that no other stream
    /// lists.
    pub(crate) fn detach(&self, stream: StreamId) -> Vec<Event> {
        let mut inner = self.lock();
        inner.staged.retain(|(s, _), _| *s != stream);
        let Some(channels) = inner.streams.remove(&stream) else { return Vec::new() };
        let mut events = Vec::new();
        for channel in channels {
            let old = inner.take(stream, &channel);
            for (id, user) in old {
                if !inner.present(&channel, &id) {
                    events.push(event(&channel, "leave", &id, user.as_deref()));
                }
            }
        }
        self.events(events)
    }

    /// The members of `channel`, each once, sorted by socket id.
    pub(crate) fn members(&self, channel: &str) -> Vec<Member> {
        let inner = self.lock();
        let mut all: BTreeMap<&str, &Option<String>> = BTreeMap::new();
        for members in inner.channels.get(channel).into_iter().flat_map(HashMap::values) {
            for (id, user) in members {
                all.entry(id).or_insert(user);
            }
        }
        all.into_iter().map(|(id, user)| Member { id: id.to_owned(), user: user.clone() }).collect()
    }

    /// Channels with at least one member.
    #[cfg(test)]
    pub(crate) fn channel_count(&self) -> usize {
        self.lock().channels.len()
    }

    /// From now on, no events (this broker is leaving the cluster).
    pub(crate) fn quiet(&self) {
        self.quiet.store(true, Ordering::Relaxed);
    }

    fn events(&self, events: Vec<Event>) -> Vec<Event> {
        if self.quiet.load(Ordering::Relaxed) { Vec::new() } else { events }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves maps that are still consistent enough to use.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Inner {
    /// The shared name of `channel`.
    fn intern(&self, channel: &str) -> Arc<str> {
        match self.channels.get_key_value(channel) {
            Some((name, _)) => name.clone(),
            None => channel.into(),
        }
    }

    /// Whether any stream lists `id` in `channel`.
    fn present(&self, channel: &str, id: &str) -> bool {
        self.channels.get(channel).is_some_and(|streams| streams.values().any(|m| m.contains_key(id)))
    }

    /// Removes one member of a stream; its user if it was there.
    fn remove(&mut self, stream: StreamId, channel: &str, id: &str) -> Option<Option<String>> {
        let streams = self.channels.get_mut(channel)?;
        let members = streams.get_mut(&stream)?;
        let user = members.remove(id)?;
        if members.is_empty() {
            self.take(stream, channel);
        }
        Some(user)
    }

    /// Takes a stream's members of a channel out, cleaning up the empty maps.
    fn take(&mut self, stream: StreamId, channel: &str) -> Members {
        let Some(streams) = self.channels.get_mut(channel) else { return Members::new() };
        let members = streams.remove(&stream).unwrap_or_default();
        if streams.is_empty() {
            self.channels.remove(channel);
        }
        if let Some(channels) = self.streams.get_mut(&stream) {
            channels.remove(channel);
            if channels.is_empty() {
                self.streams.remove(&stream);
            }
        }
        members
    }
}

/// A join or leave event of `channel`.
fn event(channel: &str, kind: &str, id: &str, user: Option<&str>) -> Event {
    let data = serde_json::json!({ "event": kind, "channel": channel, "id": id, "user": user });
    Event { channel: format!("{EVENT_PREFIX}{channel}"), data: Bytes::from(data.to_string()) }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn member(id: &str, user: Option<&str>) -> Member {
        Member { id: id.into(), user: user.map(Into::into) }
    }

    /// (kind, id) of each event, checking the channel.
    fn kinds(events: &[Event], channel: &str) -> Vec<(String, String)> {
        events
            .iter()
            .map(|e| {
                assert_eq!(e.channel, format!("#presence/{channel}"));
                let v: serde_json::Value = serde_json::from_slice(&e.data).unwrap();
                assert_eq!(v["channel"], channel);
                (v["event"].as_str().unwrap().to_owned(), v["id"].as_str().unwrap().to_owned())
            })
            .collect()
    }

    fn ids(presence: &Presence, channel: &str) -> Vec<String> {
        presence.members(channel).into_iter().map(|m| m.id).collect()
    }

    fn pair(kind: &str, id: &str) -> (String, String) {
        (kind.to_owned(), id.to_owned())
    }

    #[test]
    fn joins_and_leaves_make_events_once_per_member() {
        let p = Presence::default();
        let events = p.join(1, "room", member("a", Some("alice")));
        assert_eq!(kinds(&events, "room"), [pair("join", "a")]);
        let v: serde_json::Value = serde_json::from_slice(&events[0].data).unwrap();
        assert_eq!(v["user"], "alice");
        assert_eq!(kinds(&p.join(2, "room", member("b", None)), "room"), [pair("join", "b")]);
        // The same socket listed again (a second stream of its worker): no second join.
        assert!(p.join(3, "room", member("a", Some("alice"))).is_empty());
        assert_eq!(p.members("room"), [member("a", Some("alice")), member("b", None)]);
        // Leaving one stream while another lists it: still present.
        assert!(p.leave(1, "room", "a").is_empty());
        assert_eq!(ids(&p, "room"), ["a", "b"]);
        assert_eq!(kinds(&p.leave(3, "room", "a"), "room"), [pair("leave", "a")]);
        // A leave for someone not there (or on another stream) changes nothing.
        assert!(p.leave(1, "room", "b").is_empty());
        assert_eq!(kinds(&p.leave(2, "room", "b"), "room"), [pair("leave", "b")]);
        assert!(p.members("room").is_empty());
        assert_eq!(p.channel_count(), 0);
    }

    #[test]
    fn a_stream_that_ends_takes_its_members_with_it() {
        let p = Presence::default();
        p.join(1, "room", member("a", None));
        p.join(1, "room", member("b", None));
        p.join(1, "other", member("a", None));
        p.join(2, "room", member("c", None));
        let mut events: Vec<(String, String)> = p
            .detach(1)
            .iter()
            .map(|e| {
                let v: serde_json::Value = serde_json::from_slice(&e.data).unwrap();
                (e.channel.clone(), format!("{} {}", v["event"].as_str().unwrap(), v["id"].as_str().unwrap()))
            })
            .collect();
        events.sort();
        // "room" keeps c.
        let expected =
            [("#presence/other", "leave a"), ("#presence/room", "leave a"), ("#presence/room", "leave b")];
        assert_eq!(events, expected.map(|(c, e)| (c.to_owned(), e.to_owned())));
        assert_eq!(ids(&p, "room"), ["c"]);
        assert!(p.members("other").is_empty());
        assert!(p.detach(1).is_empty(), "detaching twice does nothing");
        assert_eq!(p.channel_count(), 1);
    }

    #[test]
    fn a_reset_replaces_a_streams_set_with_events_for_the_difference() {
        let p = Presence::default();
        p.join(1, "room", member("a", None));
        p.join(1, "room", member("b", None));
        p.join(2, "room", member("z", None));
        // In two parts: nothing happens until the last.
        assert!(p.reset(1, "room", vec![member("b", None)], true).is_empty());
        assert_eq!(ids(&p, "room"), ["a", "b", "z"]);
        let mut events =
            kinds(&p.reset(1, "room", vec![member("c", None), member("z", None)], false), "room");
        events.sort();
        assert_eq!(events, [pair("join", "c"), pair("leave", "a")]);
        assert_eq!(ids(&p, "room"), ["b", "c", "z"]);
        // An empty reset empties the stream's set.
        let mut events = kinds(&p.reset(1, "room", Vec::new(), false), "room");
        events.sort();
        assert_eq!(events, [pair("leave", "b"), pair("leave", "c")], "z is still listed by stream 2");
        assert_eq!(ids(&p, "room"), ["z"]);
        // A reset on a stream that had nothing (a channel's new owner): joins.
        assert_eq!(kinds(&p.reset(3, "room", vec![member("y", None)], false), "room"), [pair("join", "y")]);
    }

    #[test]
    fn an_unsubscribe_drops_a_streams_members_silently() {
        let p = Presence::default();
        p.join(1, "room", member("a", None));
        p.join(2, "room", member("b", None));
        p.reset(1, "room", vec![member("x", None)], true);
        p.unsubscribe(1, "room");
        assert_eq!(ids(&p, "room"), ["b"]);
        // The staged part was dropped too.
        assert_eq!(kinds(&p.reset(1, "room", Vec::new(), false), "room"), []);
        assert!(p.detach(1).is_empty());
    }

    #[test]
    fn a_quiet_broker_keeps_count_but_sends_no_events() {
        let p = Presence::default();
        p.join(1, "room", member("a", None));
        p.quiet();
        assert!(p.join(1, "room", member("b", None)).is_empty());
        assert_eq!(ids(&p, "room"), ["a", "b"]);
        assert!(p.detach(1).is_empty());
        assert!(p.members("room").is_empty());
    }
}
