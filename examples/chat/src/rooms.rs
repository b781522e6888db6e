//! The chat's rooms: room `r` is the channel `chat/r`. What the app keeps of them is in the
//! exchange (the brokers' key/value store), so every worker of the cluster sees the same:
//!
//! - the history: the list `history/r`, the last `[app] history` messages of the room, added
//!   to by each message before it is published (so a message a subscriber receives is already
//!   in the history) and trimmed to that length;
//! - who is here: each worker writes the members it holds (the sockets subscribed to `chat/r`,
//!   each with the user of its token when it joined) under `who/r/on/<worker id>`, and names
//!   itself once in the list `who/r/workers`; [`Rooms::who`] reads them all. A worker's list
//!   expires unless it is rewritten (every [`REFRESH`]), so the members of a worker that died
//!   leave within [`MEMBERS_TTL`];
//! - the rooms: the list `rooms`, each room named once by each worker that had a member there.
//!
//! After each join and leave, once its list is written, the worker publishes a notice
//! `{"event": "join" | "leave", "room", "id", "user"}` on the channel `who/r` (the page
//! subscribes to it and asks [`Rooms::who`] again).
//!
//! The who-is-here bookkeeping ([`Joined`], the writer task, the `who/…` keys) is the part that
//! cluster-wide presence in the worker replaces (`Exchange::presence` and the `#presence/…`
//! events); the rest stays.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use sc_worker::{Error, Exchange, Socket, Sockets};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::mpsc;

/// The channel of room `r` is `chat/r`.
const ROOM_PREFIX: &str = "chat/";
/// The channel of room `r`'s join and leave notices is `who/r`.
pub(crate) const NOTICE_PREFIX: &str = "who/";
/// The list of rooms.
const ROOMS_KEY: &str = "rooms";
/// How long a worker's member list outlives its last write.
const MEMBERS_TTL: Duration = Duration::from_secs(60);
/// How often a worker rewrites its member lists (well within [`MEMBERS_TTL`]).
const REFRESH: Duration = Duration::from_secs(20);
/// Joins and leaves waiting for the writer; a socket's hook waits when it is full.
const CHANGES: usize = 1024;

/// One member of a room: a socket in it (the shape of the worker's presence members).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Member {
    /// The socket id.
    pub(crate) id: String,
    /// The username of the socket's token when it joined; `None` for an anonymous socket.
    pub(crate) user: Option<String>,
}

/// Who is in a room, across the cluster.
#[derive(Debug, Serialize)]
pub(crate) struct Who {
    pub(crate) room: String,
    pub(crate) count: usize,
    /// Every member once, sorted by socket id.
    pub(crate) members: Vec<Member>,
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

/// Join or leave.
#[derive(Debug, Clone, Copy, Serialize)]
#[serde(rename_all = "lowercase")]
enum Event {
    Join,
    Leave,
}

/// A join or leave on this worker, for the writer.
#[derive(Debug)]
struct Change {
    event: Event,
    room: String,
    member: Member,
}

/// The rooms a socket is in, each with its user when it joined (per-socket state, kept with
/// `Socket::insert`). std Mutex: one map operation at a time, never across an await.
#[derive(Debug, Default)]
struct Joined(Mutex<BTreeMap<String, Option<String>>>);

impl Joined {
    fn rooms(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Option<String>>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The rooms of the cluster as this worker sees them; shared by the app's handlers.
#[derive(Debug)]
pub(crate) struct Rooms {
    exchange: Exchange,
    /// The last messages kept per room.
    history: usize,
    /// To the writer of this worker's member lists.
    changes: mpsc::Sender<Change>,
}

/// The room of a channel: `r` for `chat/r` (not empty); `None` for other channels.
pub(crate) fn room_of(channel: &str) -> Option<&str> {
    channel.strip_prefix(ROOM_PREFIX).filter(|room| !room.is_empty())
}

fn history_key(room: &str) -> String {
    format!("history/{room}")
}

fn workers_key(room: &str) -> String {
    format!("who/{room}/workers")
}

fn members_key(room: &str, worker: &str) -> String {
    format!("who/{room}/on/{worker}")
}

/// Strings of a JSON list, sorted, each once.
fn distinct(values: Vec<Value>) -> Vec<String> {
    let mut strings: Vec<String> = values.into_iter().filter_map(|v| v.as_str().map(str::to_owned)).collect();
    strings.sort();
    strings.dedup();
    strings
}

impl Rooms {
    /// The rooms, keeping `history` messages per room; starts this worker's writer of member
    /// lists (so it must run inside the worker's runtime).
    pub(crate) fn start(
        exchange: Exchange,
        sockets: Sockets,
        worker_id: String,
        history: usize,
    ) -> Arc<Self> {
        let (changes, rx) = mpsc::channel(CHANGES);
        let writer = Writer { exchange: exchange.clone(), sockets, worker_id };
        tokio::spawn(writer.run(rx));
        Arc::new(Self { exchange, history, changes })
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
        let workers = distinct(self.exchange.get_range(&workers_key(room), 0, None).await?);
        let mut members: Vec<Member> = Vec::new();
        for worker in workers {
            if let Some(list) = self.exchange.get(&members_key(room, &worker)).await? {
                members.extend(serde_json::from_value::<Vec<Member>>(list).unwrap_or_default());
            }
        }
        members.sort_by(|a, b| a.id.cmp(&b.id));
        members.dedup_by(|a, b| a.id == b.id);
        Ok(Who { room: room.to_owned(), count: members.len(), members })
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

    /// `socket` joined `room` (it subscribed to `chat/<room>`), as `user`.
    pub(crate) async fn joined(&self, socket: &Socket, room: &str, user: Option<String>) {
        let joined = match socket.state::<Joined>() {
            Some(joined) => joined,
            None => {
                // Hooks of one socket run in order, in its task: nobody inserts meanwhile.
                socket.insert(Joined::default());
                let Some(joined) = socket.state::<Joined>() else { return };
                joined
            }
        };
        joined.rooms().insert(room.to_owned(), user.clone());
        self.changed(Event::Join, room, socket, user).await;
    }

    /// `socket` left `room` (unsubscribed, kicked out or closed).
    pub(crate) async fn left(&self, socket: &Socket, room: &str) {
        let Some(joined) = socket.state::<Joined>() else { return };
        let Some(user) = joined.rooms().remove(room) else { return };
        self.changed(Event::Leave, room, socket, user).await;
    }

    async fn changed(&self, event: Event, room: &str, socket: &Socket, user: Option<String>) {
        let member = Member { id: socket.id().to_owned(), user };
        // Fails only once the writer is gone, when the worker stops.
        let _ = self.changes.send(Change { event, room: room.to_owned(), member }).await;
    }
}

/// The one task that writes this worker's member lists: one writer, so the last list written
/// is of the latest state, with no lock held across the exchange calls.
struct Writer {
    exchange: Exchange,
    sockets: Sockets,
    worker_id: String,
}

impl Writer {
    async fn run(self, mut changes: mpsc::Receiver<Change>) {
        // Rooms whose `workers` list names this worker, and rooms where it has members.
        let mut registered: HashSet<String> = HashSet::new();
        let mut active: HashSet<String> = HashSet::new();
        let mut refresh = tokio::time::interval(REFRESH);
        loop {
            tokio::select! {
                change = changes.recv() => {
                    let Some(change) = change else { return };
                    let room = change.room.clone();
                    if let Err(error) = self.write(&room, &mut registered, &mut active).await {
                        tracing::warn!(%room, %error, "member list not written");
                    }
                    let notice = json!({
                        "event": change.event,
                        "room": room,
                        "id": change.member.id,
                        "user": change.member.user,
                    });
                    if let Err(error) = self.exchange.publish(&format!("{NOTICE_PREFIX}{room}"), &notice).await {
                        tracing::warn!(%room, %error, "join/leave notice not published");
                    }
                }
                _ = refresh.tick() => {
                    for room in active.clone() {
                        if let Err(error) = self.write(&room, &mut registered, &mut active).await {
                            tracing::warn!(%room, %error, "member list not refreshed");
                        }
                    }
                }
            }
        }
    }

    /// Writes this worker's members of `room`, as the sockets say now.
    async fn write(
        &self,
        room: &str,
        registered: &mut HashSet<String>,
        active: &mut HashSet<String>,
    ) -> Result<(), Error> {
        let mut members: Vec<Member> = self
            .sockets
            .all()
            .iter()
            .filter_map(|socket| {
                let user = socket.state::<Joined>()?.rooms().get(room)?.clone();
                Some(Member { id: socket.id().to_owned(), user })
            })
            .collect();
        members.sort_by(|a, b| a.id.cmp(&b.id));
        let key = members_key(room, &self.worker_id);
        if members.is_empty() {
            active.remove(room);
            self.exchange.remove(&key).await?;
        } else {
            active.insert(room.to_owned());
            self.exchange.set(&key, &json!(members)).await?;
            self.exchange.expire(&[&key], MEMBERS_TTL.as_secs()).await?;
        }
        if !registered.contains(room) {
            self.exchange.add(&workers_key(room), &json!(self.worker_id)).await?;
            self.exchange.add(ROOMS_KEY, &json!(room)).await?;
            registered.insert(room.to_owned());
        }
        Ok(())
    }
}
