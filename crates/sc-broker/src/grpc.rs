//! The `sc.broker.v1` gRPC service: the edge between the wire types and the broker's
//! [`Router`](crate::router::Router) and [`Exchange`](crate::exchange::Exchange).

use std::pin::Pin;
use std::sync::Arc;

use futures_util::{Stream, StreamExt};
use sc_common::batch::BatchStream;
use sc_proto::broker::v1 as pb;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use bytes::Bytes;

use crate::exchange::{Exchange, ExchangeError};
use crate::router::{self, Router};

/// Most deliveries sent in one gRPC message.
const MAX_BATCH: usize = 512;

/// The gRPC service of one broker.
#[derive(Debug, Clone)]
pub(crate) struct BrokerService {
    pub(crate) router: Arc<Router>,
    pub(crate) exchange: Arc<Exchange>,
    pub(crate) queue: usize,
    pub(crate) shutdown: CancellationToken,
    /// The largest gRPC message to or from a worker (`Config::grpc_message_limit`): delivery
    /// batches are cut below it.
    pub(crate) message_limit: usize,
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
                    match command.kind {
                        Some(pb::command::Kind::Subscribe(channel)) => router.subscribe(id, &channel),
                        Some(pb::command::Kind::Unsubscribe(channel)) => router.unsubscribe(id, &channel),
                        Some(pb::command::Kind::Sync(token)) => router.sync(id, token),
                        Some(pb::command::Kind::Publish(publish)) => {
                            let congested = router.publish(&publish.channel, publish.data);
                            if !congested.is_empty() {
                                router::wait_for_room(congested, queue).await;
                            }
                        }
                        None => {}
                    }
                }
            }
            router.detach(id);
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
        self.exchange.set(request.key, &request.value).map_err(to_status)?;
        Ok(Response::new(pb::SetResponse {}))
    }

    async fn get(&self, request: Request<pb::GetRequest>) -> Result<Response<pb::GetResponse>, Status> {
        let request = request.into_inner();
        check_key(&request.key)?;
        Ok(Response::new(pb::GetResponse { value: self.exchange.get(&request.key).map(Bytes::from) }))
    }

    async fn remove(
        &self,
        request: Request<pb::RemoveRequest>,
    ) -> Result<Response<pb::RemoveResponse>, Status> {
        let request = request.into_inner();
        check_key(&request.key)?;
        Ok(Response::new(pb::RemoveResponse { value: self.exchange.remove(&request.key).map(Bytes::from) }))
    }

    async fn add(&self, request: Request<pb::AddRequest>) -> Result<Response<pb::AddResponse>, Status> {
        let request = request.into_inner();
        check_key(&request.key)?;
        let index = self.exchange.add(request.key, &request.value).map_err(to_status)?;
        Ok(Response::new(pb::AddResponse { index }))
    }

    async fn get_range(
        &self,
        request: Request<pb::RangeRequest>,
    ) -> Result<Response<pb::RangeResponse>, Status> {
        let request = request.into_inner();
        check_key(&request.key)?;
        let values = self.exchange.get_range(&request.key, request.start, request.end).map_err(to_status)?;
        Ok(Response::new(pb::RangeResponse { values: Bytes::from(values) }))
    }

    async fn remove_range(
        &self,
        request: Request<pb::RangeRequest>,
    ) -> Result<Response<pb::RangeResponse>, Status> {
        let request = request.into_inner();
        check_key(&request.key)?;
        let values =
            self.exchange.remove_range(&request.key, request.start, request.end).map_err(to_status)?;
        Ok(Response::new(pb::RangeResponse { values: Bytes::from(values) }))
    }

    async fn count(&self, request: Request<pb::KeyRequest>) -> Result<Response<pb::CountResponse>, Status> {
        let request = request.into_inner();
        check_key(&request.key)?;
        Ok(Response::new(pb::CountResponse { count: self.exchange.count(&request.key) }))
    }

    async fn has_key(
        &self,
        request: Request<pb::KeyRequest>,
    ) -> Result<Response<pb::HasKeyResponse>, Status> {
        let request = request.into_inner();
        check_key(&request.key)?;
        Ok(Response::new(pb::HasKeyResponse { exists: self.exchange.has_key(&request.key) }))
    }

    async fn expire(
        &self,
        request: Request<pb::ExpireRequest>,
    ) -> Result<Response<pb::ExpireResponse>, Status> {
        let request = request.into_inner();
        let changed = self.exchange.expire(&request.keys, request.seconds);
        Ok(Response::new(pb::ExpireResponse { changed }))
    }

    async fn unexpire(
        &self,
        request: Request<pb::UnexpireRequest>,
    ) -> Result<Response<pb::ExpireResponse>, Status> {
        let request = request.into_inner();
        Ok(Response::new(pb::ExpireResponse { changed: self.exchange.unexpire(&request.keys) }))
    }

    async fn get_expiry(
        &self,
        request: Request<pb::KeyRequest>,
    ) -> Result<Response<pb::GetExpiryResponse>, Status> {
        let request = request.into_inner();
        check_key(&request.key)?;
        Ok(Response::new(pb::GetExpiryResponse { expires_at_ms: self.exchange.get_expiry(&request.key) }))
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

fn to_status(error: ExchangeError) -> Status {
    match error {
        ExchangeError::BadJson(_) => Status::invalid_argument(error.to_string()),
        ExchangeError::NotAList(_) => Status::failed_precondition(error.to_string()),
    }
}

fn check_key(key: &str) -> Result<(), Status> {
    if key.is_empty() {
        return Err(Status::invalid_argument("empty key"));
    }
    Ok(())
}
