//! The worker's broker edge: the one module that speaks `sc.broker.v1` and touches its
//! generated types.
//!
//! Everything else in the worker talks in domain terms: a broker stream takes [`Command`]s
//! (subscribe, unsubscribe, publish, sync markers, presence members) and yields [`Batch`]es (messages for this
//! worker's channels, and the sync markers the broker passed); the exchange's key/value data is
//! reached through [`Kv`]. [`Connect`] opens a stream; [`Grpc`] is the real one (tonic over
//! TCP, authenticated with the cluster secret), and the pool's unit tests use a fake.
//!
//! Place in the worker: socket -> [`crate::brokers`] (the pool, which broker owns what) -> this
//! edge -> the broker -> this edge -> the pool's delivery sink ([`crate::hub`]) -> outboxes.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use std::pin::Pin;

use futures_util::stream::BoxStream;
use futures_util::{Stream, StreamExt};
use sc_common::secret;
use sc_proto::broker::v1 as pb;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use crate::error::Error;
use crate::presence::PresenceMember;

/// One command on a broker stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Command {
    /// Deliver this channel's messages to this worker.
    Subscribe(Arc<str>),
    /// Stop delivering this channel's messages to this worker.
    Unsubscribe(Arc<str>),
    /// Publish JSON text to a channel.
    Publish { channel: String, data: Bytes },
    /// A marker the broker echoes once it has handled every command before it.
    Sync(u64),
    /// A socket of this worker joined a presence channel.
    PresenceJoin { channel: Arc<str>, member: PresenceMember },
    /// A socket of this worker left a presence channel.
    PresenceLeave { channel: Arc<str>, id: String },
    /// This worker's complete member set of a presence channel (`more`: a part, the rest
    /// follows in the next commands).
    PresenceReset { channel: Arc<str>, members: Vec<PresenceMember>, more: bool },
}

impl Command {
    /// About how many bytes this command takes in a gRPC message (for cutting batches below
    /// the message limit): its strings and bytes, and a margin for the framing.
    pub(crate) fn wire_size(&self) -> usize {
        16 + match self {
            Self::Subscribe(channel) | Self::Unsubscribe(channel) => channel.len(),
            Self::Publish { channel, data } => channel.len() + data.len(),
            Self::Sync(_) => 0,
            Self::PresenceJoin { channel, member } => channel.len() + member_size(member),
            Self::PresenceLeave { channel, id } => channel.len() + id.len(),
            Self::PresenceReset { channel, members, .. } => {
                channel.len() + members.iter().map(member_size).sum::<usize>()
            }
        }
    }
}

/// About how many bytes a presence member takes in a gRPC message.
pub(crate) fn member_size(member: &PresenceMember) -> usize {
    8 + member.id.len() + member.user.as_ref().map_or(0, String::len)
}

/// What a broker sent on the stream in one message.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Batch {
    /// Messages for channels this worker subscribed, in the broker's order: (channel, JSON).
    pub(crate) deliveries: Vec<(String, Bytes)>,
    /// Sync markers the broker has passed.
    pub(crate) synced: Vec<u64>,
}

/// The commands a stream sends, already batched (one gRPC message per item). `Sync` because
/// tonic's request body must be.
pub(crate) type Commands = Pin<Box<dyn Stream<Item = Vec<Command>> + Send + Sync + 'static>>;
/// What an open stream yields until it ends (`None`) or fails.
pub(crate) type Batches = BoxStream<'static, Result<Batch, Error>>;

/// An open broker stream, and unary calls to the same broker.
pub(crate) struct Opened {
    pub(crate) kv: Kv,
    pub(crate) batches: Batches,
}

/// Opens streams to brokers.
#[async_trait::async_trait]
pub(crate) trait Connect: Send + Sync + 'static {
    /// Connects to the broker at `grpc` (host:port); the stream that sends `commands` is
    /// attached when the returned batches are first polled.
    async fn open(&self, grpc: &str, commands: Commands) -> Result<Opened, Error>;
}

/// The real connector: gRPC over TCP, with the cluster secret and this worker's id.
#[derive(Debug)]
pub(crate) struct Grpc {
    worker_id: String,
    secret: String,
    /// The largest gRPC message either way (`Config::grpc_message_limit`).
    message_limit: usize,
}

type Client = pb::broker_client::BrokerClient<InterceptedService<Channel, secret::Attach>>;

/// Unary calls to one broker: the exchange's key/value data, in domain types.
#[derive(Debug, Clone)]
pub(crate) struct Kv {
    /// `None` only for the pool's unit tests (a fake link has no broker behind it).
    client: Option<Client>,
}

impl Grpc {
    /// A connector for the worker `worker_id`, authenticating with the cluster `secret`, with
    /// gRPC messages up to `message_limit` bytes both ways.
    pub(crate) fn new(worker_id: String, secret: String, message_limit: usize) -> Self {
        Self { worker_id, secret, message_limit }
    }
}

#[async_trait::async_trait]
impl Connect for Grpc {
    async fn open(&self, grpc: &str, commands: Commands) -> Result<Opened, Error> {
        let channel = Endpoint::from_shared(format!("http://{grpc}"))?
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            .connect()
            .await?;
        let client =
            pb::broker_client::BrokerClient::with_interceptor(channel, secret::Attach::new(&self.secret))
                .max_decoding_message_size(self.message_limit)
                .max_encoding_message_size(self.message_limit);
        let mut request = tonic::Request::new(encode(commands));
        if let Ok(value) = self.worker_id.parse() {
            request.metadata_mut().insert("sc-worker-id", value);
        }
        // The stream is attached when the caller first polls for batches, so the commands it
        // queues as soon as the connection is made (the replayed subscriptions) leave with the
        // attach itself: the window in which other workers already publish to this broker
        // while it does not know this worker's channels stays one connect, not two round trips.
        let mut attaching = client.clone();
        let batches = futures_util::stream::once(async move { attaching.attach(request).await })
            .map(|attached| match attached {
                Ok(response) => decode(response.into_inner()),
                Err(status) => futures_util::stream::once(async move { Err(Error::from(status)) }).boxed(),
            })
            .flatten()
            .boxed();
        Ok(Opened { kv: Kv { client: Some(client) }, batches })
    }
}

/// The commands as the wire carries them.
fn encode(commands: Commands) -> impl Stream<Item = pb::WorkerBatch> + Send + Sync + 'static {
    commands.map(to_pb_batch)
}

/// The broker's messages in domain terms.
fn decode(batches: tonic::Streaming<pb::DeliveryBatch>) -> Batches {
    batches.map(|batch| batch.map(from_pb_batch).map_err(Error::from)).boxed()
}

fn to_pb_batch(commands: Vec<Command>) -> pb::WorkerBatch {
    let commands = commands
        .into_iter()
        .map(|command| {
            let kind = match command {
                Command::Subscribe(channel) => pb::command::Kind::Subscribe(channel.to_string()),
                Command::Unsubscribe(channel) => pb::command::Kind::Unsubscribe(channel.to_string()),
                Command::Publish { channel, data } => {
                    pb::command::Kind::Publish(pb::Publish { channel, data })
                }
                Command::Sync(token) => pb::command::Kind::Sync(token),
                Command::PresenceJoin { channel, member } => {
                    pb::command::Kind::PresenceJoin(pb::PresenceJoin {
                        channel: channel.to_string(),
                        member: Some(to_pb_member(member)),
                    })
                }
                Command::PresenceLeave { channel, id } => {
                    pb::command::Kind::PresenceLeave(pb::PresenceLeave { channel: channel.to_string(), id })
                }
                Command::PresenceReset { channel, members, more } => {
                    pb::command::Kind::PresenceReset(pb::PresenceReset {
                        channel: channel.to_string(),
                        members: members.into_iter().map(to_pb_member).collect(),
                        more,
                    })
                }
            };
            pb::Command { kind: Some(kind) }
        })
        .collect();
    pb::WorkerBatch { commands }
}

fn to_pb_member(member: PresenceMember) -> pb::PresenceMember {
    pb::PresenceMember { id: member.id, user: member.user }
}

fn from_pb_batch(batch: pb::DeliveryBatch) -> Batch {
    Batch {
        deliveries: batch.deliveries.into_iter().map(|d| (d.channel, d.data)).collect(),
        synced: batch.synced,
    }
}

impl Kv {
    /// A `Kv` with no broker behind it: every call fails with [`Error::NoBroker`].
    #[cfg(test)]
    pub(crate) fn detached() -> Self {
        Self { client: None }
    }

    fn client(&self) -> Result<Client, Error> {
        self.client.clone().ok_or(Error::NoBroker)
    }

    /// Stores `value` (JSON text) under `key`.
    pub(crate) async fn set(&self, key: &str, value: Bytes) -> Result<(), Error> {
        self.client()?.set(pb::SetRequest { key: key.to_owned(), value }).await?;
        Ok(())
    }

    /// The value (JSON text) under `key`.
    pub(crate) async fn get(&self, key: &str) -> Result<Option<Bytes>, Error> {
        Ok(self.client()?.get(pb::GetRequest { key: key.to_owned() }).await?.into_inner().value)
    }

    /// Removes `key`, returning its value.
    pub(crate) async fn remove(&self, key: &str) -> Result<Option<Bytes>, Error> {
        Ok(self.client()?.remove(pb::RemoveRequest { key: key.to_owned() }).await?.into_inner().value)
    }

    /// Appends `value` to the list under `key`; its index.
    pub(crate) async fn add(&self, key: &str, value: Bytes) -> Result<u64, Error> {
        Ok(self.client()?.add(pb::AddRequest { key: key.to_owned(), value }).await?.into_inner().index)
    }

    /// The slice `[start, end)` of the list under `key`, as a JSON array.
    pub(crate) async fn get_range(&self, key: &str, start: i64, end: Option<i64>) -> Result<Bytes, Error> {
        let request = pb::RangeRequest { key: key.to_owned(), start, end };
        Ok(self.client()?.get_range(request).await?.into_inner().values)
    }

    /// Removes the slice `[start, end)` of the list under `key`; it, as a JSON array.
    pub(crate) async fn remove_range(&self, key: &str, start: i64, end: Option<i64>) -> Result<Bytes, Error> {
        let request = pb::RangeRequest { key: key.to_owned(), start, end };
        Ok(self.client()?.remove_range(request).await?.into_inner().values)
    }

    /// Elements of the list (or keys of the object) under `key`.
    pub(crate) async fn count(&self, key: &str) -> Result<u64, Error> {
        Ok(self.client()?.count(pb::KeyRequest { key: key.to_owned() }).await?.into_inner().count)
    }

    /// Whether `key` exists.
    pub(crate) async fn has_key(&self, key: &str) -> Result<bool, Error> {
        Ok(self.client()?.has_key(pb::KeyRequest { key: key.to_owned() }).await?.into_inner().exists)
    }

    /// Makes `key` expire after `seconds`; 1 if it exists, else 0.
    pub(crate) async fn expire(&self, key: &str, seconds: u64) -> Result<u64, Error> {
        let request = pb::ExpireRequest { keys: vec![key.to_owned()], seconds };
        Ok(self.client()?.expire(request).await?.into_inner().changed)
    }

    /// Makes `key` permanent again; 1 if it exists, else 0.
    pub(crate) async fn unexpire(&self, key: &str) -> Result<u64, Error> {
        let request = pb::UnexpireRequest { keys: vec![key.to_owned()] };
        Ok(self.client()?.unexpire(request).await?.into_inner().changed)
    }

    /// The members of presence channel `channel` as this broker holds them (each once, sorted
    /// by socket id).
    pub(crate) async fn presence(&self, channel: &str) -> Result<Vec<PresenceMember>, Error> {
        let request = pb::PresenceRequest { channel: channel.to_owned() };
        let members = self.client()?.presence(request).await?.into_inner().members;
        Ok(members.into_iter().map(|m| PresenceMember { id: m.id, user: m.user }).collect())
    }

    /// When `key` expires, in milliseconds since the Unix epoch.
    pub(crate) async fn get_expiry(&self, key: &str) -> Result<Option<u64>, Error> {
        Ok(self
            .client()?
            .get_expiry(pb::KeyRequest { key: key.to_owned() })
            .await?
            .into_inner()
            .expires_at_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_and_batches_convert_both_ways() {
        let batch = to_pb_batch(vec![
            Command::Subscribe("a".into()),
            Command::Publish { channel: "a".into(), data: Bytes::from_static(b"1") },
            Command::Unsubscribe("a".into()),
            Command::Sync(7),
            Command::PresenceJoin {
                channel: "a".into(),
                member: PresenceMember { id: "s1".into(), user: Some("alice".into()) },
            },
            Command::PresenceLeave { channel: "a".into(), id: "s1".into() },
            Command::PresenceReset {
                channel: "a".into(),
                members: vec![PresenceMember { id: "s2".into(), user: None }],
                more: true,
            },
        ]);
        let kinds: Vec<_> = batch.commands.into_iter().filter_map(|c| c.kind).collect();
        assert_eq!(kinds.len(), 7);
        assert!(matches!(&kinds[0], pb::command::Kind::Subscribe(c) if c == "a"));
        assert!(matches!(&kinds[1], pb::command::Kind::Publish(p) if p.channel == "a" && p.data == "1"));
        assert!(matches!(&kinds[2], pb::command::Kind::Unsubscribe(c) if c == "a"));
        assert!(matches!(kinds[3], pb::command::Kind::Sync(7)));
        assert!(matches!(&kinds[4], pb::command::Kind::PresenceJoin(j)
            if j.channel == "a" && j.member.as_ref().is_some_and(|m| m.id == "s1" && m.user.as_deref() == Some("alice"))));
        assert!(matches!(&kinds[5], pb::command::Kind::PresenceLeave(l) if l.id == "s1"));
        assert!(matches!(&kinds[6], pb::command::Kind::PresenceReset(r)
            if r.more && r.members.len() == 1 && r.members[0].user.is_none()));

        let delivered = from_pb_batch(pb::DeliveryBatch {
            deliveries: vec![pb::Delivery { channel: "b".into(), data: Bytes::from_static(b"2") }],
            synced: vec![3],
        });
        assert_eq!(delivered.deliveries, vec![("b".to_owned(), Bytes::from_static(b"2"))]);
        assert_eq!(delivered.synced, vec![3]);
    }
}
