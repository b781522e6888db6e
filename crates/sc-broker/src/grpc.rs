//! The `sc.broker.v1` gRPC service: the edge between the wire types and the broker's
//! [`Router`](crate::router::Router) and the exchange [`Store`].

use std::pin::Pin;
use std::sync::Arc;

use futures_util::{Stream, StreamExt};
use sc_common::batch::BatchStream;
use sc_proto::broker::v1 as pb;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use bytes::Bytes;

use crate::exchange::ExchangeError;
use crate::handover;
use crate::presence::{self, Presence};
use crate::router::{self, Router};
use crate::store::Store;

/// Most deliveries sent in one gRPC message.
const MAX_BATCH: usize = 512;

/// The gRPC service of one broker.
#[derive(Debug, Clone)]
pub(crate) struct BrokerService {
    pub(crate) router: Arc<Router>,
    pub(crate) store: Store,
    pub(crate) queue: usize,
    pub(crate) shutdown: CancellationToken,
    /// The largest gRPC message to or from a worker (`Config::grpc_message_limit`): delivery
    /// batches are cut below it.
    pub(crate) message_limit: usize,
    /// With the Redis backend: publishes go on to Redis too.
    pub(crate) bridge: Option<Arc<crate::redis::Bridge>>,
    /// The members of the presence channels this broker owns.
    pub(crate) presence: Arc<Presence>,
}

impl BrokerService {
    /// The service as tonic serves it, behind the cluster-secret check.
    pub(crate) fn into_server(
        self,
        secret: &str,
    ) -> tonic::codegen::InterceptedService<pb::broker_server::BrokerServer<Self>, sc_common::secret::Check>
    {
        let limit = self.message_limit;
        let server = pb::broker_server::BrokerServer::new(self)
            .max_decoding_message_size(limit)
            .max_encoding_message_size(limit);
        tonic::codegen::InterceptedService::new(server, sc_common::secret::Check::new(secret))
    }
}

type DeliveryStream = Pin<Box<dyn Stream<Item = Result<pb::DeliveryBatch, Status>> + Send>>;

#[tonic::async_trait]
impl pb::broker_server::Broker for BrokerService {
    type AttachStream = DeliveryStream;

    async fn attach(
        &self,
        request: Request<Streaming<pb::WorkerBatch>>,
    ) -> Result<Response<Self::AttachStream>, Status> {
        let worker = request
            .metadata()
            .get("sc-worker-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("unknown")
            .to_owned();
        let mut commands = request.into_inner();
        let attachment = self.router.attach(&worker);
        let id = attachment.id;
        tracing::debug!(%worker, stream = id, "worker attached");

        // Commands: applied in order by one task per stream.
        let router = self.router.clone();
        let queue = self.queue;
        let cut = attachment.cut.clone();
        let shutdown = self.shutdown.clone();
        let bridge = self.bridge.clone();
        let members = self.presence.clone();
        tokio::spawn(async move {
            loop {
                let batch = tokio::select! {
                    _ = cut.cancelled() => break,
                    _ = shutdown.cancelled() => break,
                    batch = commands.message() => batch,
                };
                let batch = match batch {
                    Ok(Some(batch)) => batch,
                    Ok(None) => break,
                    Err(status) => {
                        tracing::debug!(%worker, %status, "worker stream failed");
                        break;
                    }
                };
                for command in batch.commands {
                    let events = match command.kind {
                        Some(pb::command::Kind::Subscribe(channel)) => {
                            router.subscribe(id, &channel);
                            Vec::new()
                        }
                        Some(pb::command::Kind::Unsubscribe(channel)) => {
                            router.unsubscribe(id, &channel);
                            members.unsubscribe(id, &channel);
                            Vec::new()
                        }
                        Some(pb::command::Kind::Sync(token)) => {
                            router.sync(id, token);
                            Vec::new()
                        }
                        // Only the broker publishes presence events.
                        Some(pb::command::Kind::Publish(publish))
                            if publish.channel.starts_with(presence::EVENT_PREFIX) =>
                        {
                            Vec::new()
                        }
                        Some(pb::command::Kind::Publish(publish)) => {
                            if let Some(bridge) = &bridge {
                                bridge.publish(publish.channel.as_str().into(), publish.data.clone());
                            }
                            let congested = router.publish(&publish.channel, publish.data);
                            if !congested.is_empty() {
                                router::wait_for_room(congested, queue).await;
                            }
                            Vec::new()
                        }
                        Some(pb::command::Kind::PresenceJoin(join)) => match join.member {
                            Some(member) => members.join(id, &join.channel, from_pb_member(member)),
                            None => Vec::new(),
                        },
                        Some(pb::command::Kind::PresenceLeave(leave)) => {
                            members.leave(id, &leave.channel, &leave.id)
                        }
                        Some(pb::command::Kind::PresenceReset(reset)) => {
                            let set = reset.members.into_iter().map(from_pb_member).collect();
                            members.reset(id, &reset.channel, set, reset.more)
                        }
                        None => Vec::new(),
                    };
                    publish_events(&router, events);
                }
            }
            router.detach(id);
            publish_events(&router, members.detach(id));
            cut.cancel();
            tracing::debug!(%worker, stream = id, "worker detached");
        });

        // Deliveries: whatever is queued goes out in one message.
        let cut = attachment.cut;
        // Cut below the message limit: the channel and data of each item, and a margin for the
        // protobuf framing (a few bytes per item).
        let budget = self.message_limit.saturating_sub(64 * 1024);
        let deliveries = BatchStream::new(attachment.deliveries, MAX_BATCH)
            .with_byte_limit(budget, router::Outgoing::wire_size)
            .map(|batch| {
                let mut out =
                    pb::DeliveryBatch { deliveries: Vec::with_capacity(batch.len()), synced: Vec::new() };
                for item in batch {
                    match item {
                        router::Outgoing::Delivery(d) => {
                            out.deliveries.push(pb::Delivery { channel: d.channel.to_string(), data: d.data })
                        }
                        router::Outgoing::Synced(token) => out.synced.push(token),
                    }
                }
                Ok(out)
            })
            .take_until(cut.cancelled_owned());
        Ok(Response::new(Box::pin(deliveries)))
    }

    async fn set(&self, request: Request<pb::SetRequest>) -> Result<Response<pb::SetResponse>, Status> {
        let request = request.into_inner();
        check_key(&request.key)?;
        self.store.set(request.key, &request.value).await.map_err(to_status)?;
        Ok(Response::new(pb::SetResponse {}))
    }

    async fn get(&self, request: Request<pb::GetRequest>) -> Result<Response<pb::GetResponse>, Status> {
        let request = request.into_inner();
        check_key(&request.key)?;
        let value = self.store.get(&request.key).await.map_err(to_status)?;
        Ok(Response::new(pb::GetResponse { value: value.map(Bytes::from) }))
    }

    async fn remove(
        &self,
        request: Request<pb::RemoveRequest>,
    ) -> Result<Response<pb::RemoveResponse>, Status> {
        let request = request.into_inner();
        check_key(&request.key)?;
        let value = self.store.remove(&request.key).await.map_err(to_status)?;
        Ok(Response::new(pb::RemoveResponse { value: value.map(Bytes::from) }))
    }

    async fn add(&self, request: Request<pb::AddRequest>) -> Result<Response<pb::AddResponse>, Status> {
        let request = request.into_inner();
        check_key(&request.key)?;
        let index = self.store.add(request.key, &request.value).await.map_err(to_status)?;
        Ok(Response::new(pb::AddResponse { index }))
    }

    async fn get_range(
        &self,
        request: Request<pb::RangeRequest>,
    ) -> Result<Response<pb::RangeResponse>, Status> {
        let request = request.into_inner();
        check_key(&request.key)?;
        let values =
            self.store.get_range(&request.key, request.start, request.end).await.map_err(to_status)?;
        Ok(Response::new(pb::RangeResponse { values: Bytes::from(values) }))
    }

    async fn remove_range(
        &self,
        request: Request<pb::RangeRequest>,
    ) -> Result<Response<pb::RangeResponse>, Status> {
        let request = request.into_inner();
        check_key(&request.key)?;
        let values =
            self.store.remove_range(&request.key, request.start, request.end).await.map_err(to_status)?;
        Ok(Response::new(pb::RangeResponse { values: Bytes::from(values) }))
    }

    async fn count(&self, request: Request<pb::KeyRequest>) -> Result<Response<pb::CountResponse>, Status> {
        let request = request.into_inner();
        check_key(&request.key)?;
        let count = self.store.count(&request.key).await.map_err(to_status)?;
        Ok(Response::new(pb::CountResponse { count }))
    }

    async fn has_key(
        &self,
        request: Request<pb::KeyRequest>,
    ) -> Result<Response<pb::HasKeyResponse>, Status> {
        let request = request.into_inner();
        check_key(&request.key)?;
        let exists = self.store.has_key(&request.key).await.map_err(to_status)?;
        Ok(Response::new(pb::HasKeyResponse { exists }))
    }

    async fn expire(
        &self,
        request: Request<pb::ExpireRequest>,
    ) -> Result<Response<pb::ExpireResponse>, Status> {
        let request = request.into_inner();
        let changed = self.store.expire(&request.keys, request.seconds).await.map_err(to_status)?;
        Ok(Response::new(pb::ExpireResponse { changed }))
    }

    async fn unexpire(
        &self,
        request: Request<pb::UnexpireRequest>,
    ) -> Result<Response<pb::ExpireResponse>, Status> {
        let request = request.into_inner();
        let changed = self.store.unexpire(&request.keys).await.map_err(to_status)?;
        Ok(Response::new(pb::ExpireResponse { changed }))
    }

    async fn get_expiry(
        &self,
        request: Request<pb::KeyRequest>,
    ) -> Result<Response<pb::GetExpiryResponse>, Status> {
        let request = request.into_inner();
        check_key(&request.key)?;
        let expires_at_ms = self.store.get_expiry(&request.key).await.map_err(to_status)?;
        Ok(Response::new(pb::GetExpiryResponse { expires_at_ms }))
    }

    async fn handover(
        &self,
        request: Request<pb::HandoverRequest>,
    ) -> Result<Response<pb::HandoverResponse>, Status> {
        let request = request.into_inner();
        let Some(exchange) = self.store.memory() else {
            return Ok(Response::new(pb::HandoverResponse { entries: Vec::new() }));
        };
        let claimant = request.claimant.as_str();
        let brokers = request.brokers;
        // Cut below the message limit: what does not fit follows by push (the strays sweep).
        let owned = |key: &str| {
            sc_common::rendezvous::owner(brokers.iter(), key.as_bytes()).map(String::as_str) == Some(claimant)
        };
        let taken = exchange.take(owned, self.message_limit / 2);
        if !taken.is_empty() {
            tracing::debug!(%claimant, keys = taken.len(), "exchange keys handed over on request");
        }
        Ok(Response::new(pb::HandoverResponse { entries: taken.into_iter().map(handover::to_pb).collect() }))
    }

    async fn accept(
        &self,
        request: Request<pb::AcceptRequest>,
    ) -> Result<Response<pb::AcceptResponse>, Status> {
        let entries = request.into_inner().entries;
        if let Some(exchange) = self.store.memory() {
            exchange.merge(entries.into_iter().map(handover::from_pb).collect());
        }
        Ok(Response::new(pb::AcceptResponse {}))
    }

    async fn presence(
        &self,
        request: Request<pb::PresenceRequest>,
    ) -> Result<Response<pb::PresenceResponse>, Status> {
        let channel = request.into_inner().channel;
        let members = self
            .presence
            .members(&channel)
            .into_iter()
            .map(|m| pb::PresenceMember { id: m.id, user: m.user })
            .collect();
        Ok(Response::new(pb::PresenceResponse { members }))
    }

    async fn stats(
        &self,
        _request: Request<pb::StatsRequest>,
    ) -> Result<Response<pb::StatsResponse>, Status> {
        let streams = self
            .router
            .subscriptions()
            .into_iter()
            .map(|(worker, n)| pb::StreamStats { worker, subscriptions: n as u64 })
            .collect();
        Ok(Response::new(pb::StatsResponse { channels: self.router.channel_count() as u64, streams }))
    }
}

/// Publishes presence events to the subscribers of their `#presence/` channels. Not through
/// the Redis bridge: presence is this cluster's.
fn publish_events(router: &Router, events: Vec<presence::Event>) {
    for event in events {
        // A full queue cuts its stream (the router's rule); events do not wait for room.
        let _ = router.publish(&event.channel, event.data);
    }
}

fn from_pb_member(member: pb::PresenceMember) -> presence::Member {
    presence::Member { id: member.id, user: member.user }
}

fn to_status(error: ExchangeError) -> Status {
    match error {
        ExchangeError::BadJson(_) => Status::invalid_argument(error.to_string()),
        ExchangeError::NotAList(_) => Status::failed_precondition(error.to_string()),
        ExchangeError::Backend(_) => Status::unavailable(error.to_string()),
    }
}

fn check_key(key: &str) -> Result<(), Status> {
    if key.is_empty() {
        return Err(Status::invalid_argument("empty key"));
    }
    Ok(())
}
