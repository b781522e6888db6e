//! The `sc.master.v1` gRPC service: the edge between the wire types and the [`Registry`] and
//! [`CentralLog`].

use std::pin::Pin;
use std::sync::Arc;

use futures_util::{Stream, StreamExt};
use sc_common::membership::{self, Member, Severity};
use sc_proto::master::v1 as pb;
use tokio::time::Instant;
use tokio_stream::wrappers::WatchStream;
use tonic::{Request, Response, Status};

use crate::central_log::{CentralLog, Entry};
use crate::registry::Registry;

/// The master's gRPC service.
#[derive(Debug, Clone)]
pub struct MasterService {
    pub registry: Arc<Registry>,
    pub log: Arc<CentralLog>,
    /// Membership streams send nothing before this instant. A standalone master that starts
    /// (or restarts) while the cluster runs gives the surviving members time to register again,
    /// so that nobody is sent a partial membership (a worker told "no brokers" would drop its
    /// broker links).
    pub settle_until: Option<Instant>,
}

type MembershipStream = Pin<Box<dyn Stream<Item = Result<pb::Membership, Status>> + Send>>;

#[tonic::async_trait]
impl pb::master_server::Master for MasterService {
    type WatchMembersStream = MembershipStream;

    async fn register(
        &self,
        request: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        let request = request.into_inner();
        let role =
            membership::role_from_pb(request.role).ok_or_else(|| Status::invalid_argument("unknown role"))?;
        if request.id.is_empty() {
            return Err(Status::invalid_argument("empty member id"));
        }
        let addresses = request.addresses.unwrap_or_default();
        if addresses.grpc.parse::<std::net::SocketAddr>().is_err() && !addresses.grpc.contains(':') {
            return Err(Status::invalid_argument(format!("bad grpc address {:?}", addresses.grpc)));
        }
        let member = Member {
            role,
            id: request.id,
            grpc: addresses.grpc,
            public: addresses.public,
            unix: addresses.unix,
            pid: request.pid,
        };
        let (id, pid) = (member.id.clone(), member.pid);
        let before = self.registry.snapshot().epoch;
        let epoch = self.registry.register(member).map_err(|e| e.to_status())?;
        if epoch != before {
            self.log.master(Severity::Notice, format!("{id} (pid {pid}) registered, epoch {epoch}"));
        }
        Ok(Response::new(pb::RegisterResponse { epoch }))
    }

    async fn deregister(
        &self,
        request: Request<pb::DeregisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        let request = request.into_inner();
        if self.registry.remove(&request.id, Some(request.pid)) {
            self.log.master(
                Severity::Notice,
                format!("{} (pid {}) left the membership", request.id, request.pid),
            );
        }
        Ok(Response::new(pb::RegisterResponse { epoch: self.registry.snapshot().epoch }))
    }

    async fn watch_members(
        &self,
        request: Request<pb::WatchMembersRequest>,
    ) -> Result<Response<Self::WatchMembersStream>, Status> {
        let roles: Vec<_> =
            request.into_inner().roles.into_iter().filter_map(membership::role_from_pb).collect();
        let settle = self.settle_until;
        let registry = self.registry.clone();
        let snapshots = futures_util::stream::once(async move {
            if let Some(until) = settle {
                tokio::time::sleep_until(until).await;
            }
            WatchStream::new(registry.watch())
        })
        .flatten();
        let stream = snapshots.map(move |snapshot| {
            let members = snapshot
                .members
                .iter()
                .filter(|m| roles.is_empty() || roles.contains(&m.role))
                .map(membership::member_to_pb)
                .collect();
            Ok(pb::Membership { epoch: snapshot.epoch, members })
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn report_event(
        &self,
        request: Request<pb::Event>,
    ) -> Result<Response<pb::ReportEventResponse>, Status> {
        let event = request.into_inner();
        let severity = match pb::Severity::try_from(event.severity) {
            Ok(pb::Severity::Error) => Severity::Error,
            Ok(pb::Severity::Warning) => Severity::Warning,
            _ => Severity::Notice,
        };
        self.log.record(Entry {
            role: membership::role_from_pb(event.role),
            id: event.id,
            pid: event.pid,
            time_ms: event.time_ms,
            severity,
            message: event.message,
            location: event.location,
        });
        Ok(Response::new(pb::ReportEventResponse {}))
    }
}
