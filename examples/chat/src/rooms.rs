//! The chat's rooms: room `r` is the channel `chat/r`. What the app keeps of them is shared by
//! every worker of the cluster:
//!
//! - the history: the exchange list `history/r`, the last `[app] history` messages of the room,
//!   added to by each message before it is published (so a message a subscriber receives is
//!   already in the history) and trimmed to that length;
//! - who is here: the worker's presence on `chat/*` (the app names those channels with
//!   `App::presence`): [`Rooms::who`] is `exchange.presence("chat/r")`, right across workers
//!   and after a worker dies;
//! - the rooms: the exchange list `rooms`, each room named once by each worker that had a member
//!   there.
//!
//! Join and leave notices `{"event": "join" | "leave", "room", "id", "user"}` go out on the
//! channel `who/r` (the page subscribes to it and asks [`Rooms::who`] again): each worker with a
//! member in the room follows the room's presence events and forwards those of its own sockets,
//! so each notice is sent once, after the member list has it.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, PoisonError};

use sc_worker::{Error, Exchange, PresenceChange, PresenceMember, Sockets};
use serde::Serialize;
use serde_json::{Value, json};

/// The channel of room `r` is `chat/r`.
const ROOM_PREFIX: &str = "chat/";
/// The channel of room `r`'s join and leave notices is `who/r`.
pub(crate) const NOTICE_PREFIX: &str = "who/";
/// The list of rooms.
const ROOMS_KEY: &str = "rooms";

/// Who is in a room, across the cluster.
#[derive(Debug, Serialize)]
pub(crate) struct Who {
    pub(crate) room: String,
    pub(crate) count: usize,
    /// Every member once: its socket id and the username of its token when it joined.
    pub(crate) members: Vec<PresenceMember>,
}

/// A room as `GET /api/rooms` lists it.
#[derive(Debug, Serialize)]
pub(crate) struct RoomInfo {
    room: String,
    /// Sockets in it now.
    members: usize,
    /// Messages in its history.
    messages: u64,
}

/// The rooms of the cluster as this worker sees them; shared by the app's handlers.
#[derive(Debug)]
pub(crate) struct Rooms {
    exchange: Exchange,
    sockets: Sockets,
    /// The last messages kept per room.
    history: usize,
    /// Rooms this worker follows (named in `rooms`, notices forwarded). std Mutex: one set
    /// operation at a time, never across an await.
    followed: Mutex<HashSet<String>>,
}

/// The room of a channel: `r` for `chat/r` (not empty); `None` for other channels.
pub(crate) fn room_of(channel: &str) -> Option<&str> {
    channel.strip_prefix(ROOM_PREFIX).filter(|room| !room.is_empty())
}

fn history_key(room: &str) -> String {
    format!("history/{room}")
}

/// Strings of a JSON list, sorted, each once.
fn distinct(values: Vec<Value>) -> Vec<String> {
    let mut strings: Vec<String> = values.into_iter().filter_map(|v| v.as_str().map(str::to_owned)).collect();
    strings.sort();
    strings.dedup();
    strings
}

impl Rooms {
    /// The rooms, keeping `history` messages per room.
    pub(crate) fn new(exchange: Exchange, sockets: Sockets, history: usize) -> Arc<Self> {
        Arc::new(Self { exchange, sockets, history, followed: Mutex::new(HashSet::new()) })
    }

    /// Keeps a chat message of `room` in its history (before it is published).
    pub(crate) async fn remember(&self, room: &str, message: &Value) -> Result<(), Error> {
        if self.history == 0 {
            return Ok(());
        }
        let key = history_key(room);
        let index = self.exchange.add(&key, message).await?;
        if index >= self.history as u64 {
            // Everything but the last `history`; two workers trimming at once remove nothing twice.
            let keep = i64::try_from(self.history).unwrap_or(i64::MAX);
            self.exchange.remove_range(&key, 0, Some(-keep)).await?;
        }
        Ok(())
    }

    /// The last messages of `room`, oldest first.
    pub(crate) async fn history(&self, room: &str) -> Result<Vec<Value>, Error> {
        if self.history == 0 {
            return Ok(Vec::new());
        }
        let last = i64::try_from(self.history).unwrap_or(i64::MAX);
        self.exchange.get_range(&history_key(room), -last, None).await
    }

    /// Who is in `room`, across the cluster.
    pub(crate) async fn who(&self, room: &str) -> Result<Who, Error> {
        let mut presence = self.exchange.presence(&format!("{ROOM_PREFIX}{room}")).await?;
        presence.members.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(Who { room: room.to_owned(), count: presence.count, members: presence.members })
    }

    /// Every room anyone joined, with its members and messages now.
    pub(crate) async fn list(&self) -> Result<Vec<RoomInfo>, Error> {
        let mut rooms = Vec::new();
        for room in distinct(self.exchange.get_range(ROOMS_KEY, 0, None).await?) {
            let members = self.who(&room).await?.count;
            let messages = self.exchange.count(&history_key(&room)).await?;
            rooms.push(RoomInfo { room, members, messages });
        }
        Ok(rooms)
    }

    /// A socket of this worker joined `room`: the first time, this worker names the room in
    /// `rooms` and starts forwarding its notices.
    pub(crate) async fn joined(self: &Arc<Self>, room: &str) {
        let first = self.followed.lock().unwrap_or_else(PoisonError::into_inner).insert(room.to_owned());
        if !first {
            return;
        }
        // Events from here on, then the members so far (the join that brought us here may be
        // older than the events' subscription): those of this worker's are announced first.
        let channel = format!("{ROOM_PREFIX}{room}");
        let followed = async {
            let events = self.exchange.presence_events(&channel).await?;
            let members = self.exchange.presence(&channel).await?.members;
            Ok::<_, Error>((events, members))
        };
        match followed.await {
            Ok((events, members)) => {
                tokio::spawn(self.clone().forward(room.to_owned(), members, events));
            }
            Err(error) => {
                tracing::warn!(%room, %error, "presence events not followed");
                self.followed.lock().unwrap_or_else(PoisonError::into_inner).remove(room);
            }
        }
        if let Err(error) = self.exchange.add(ROOMS_KEY, &json!(room)).await {
            tracing::warn!(%room, %error, "room not listed");
        }
    }

    /// Publishes a notice on `who/<room>` for each join and leave of this worker's sockets:
    /// the joins of `members` (the room when this worker started following it), then `events`.
    async fn forward(
        self: Arc<Self>,
        room: String,
        members: Vec<PresenceMember>,
        mut events: sc_worker::PresenceEvents,
    ) {
        // This worker's members of the room, as announced (a join may come twice, from the
        // list and the events, or after the channel moves between brokers: it is announced once).
        let mut mine: HashSet<String> = HashSet::new();
        for member in members {
            self.announce(&room, &mut mine, PresenceChange::Join, member.id, member.user).await;
        }
        while let Some(event) = events.next().await {
            self.announce(&room, &mut mine, event.event, event.id, event.user).await;
        }
    }

    /// Publishes one join or leave notice, if it is of this worker's socket and news.
    async fn announce(
        &self,
        room: &str,
        mine: &mut HashSet<String>,
        event: PresenceChange,
        id: String,
        user: Option<String>,
    ) {
        let news = match event {
            PresenceChange::Join => self.sockets.get(&id).is_some() && mine.insert(id.clone()),
            PresenceChange::Leave => mine.remove(&id),
        };
        if !news {
            return;
        }
        let notice = json!({ "event": event, "room": room, "id": id, "user": user });
        if let Err(error) = self.exchange.publish(&format!("{NOTICE_PREFIX}{room}"), &notice).await {
            tracing::warn!(%room, %error, "join/leave notice not published");
        }
    }
}
