//! The `sc.master.v1` gRPC service: the master's edge, the only module that touches the wire
//! types; it converts them to and from the domain types of [`sc_common::membership`] for the
//! [`Registry`] and the [`CentralLog`].

use std::pin::Pin;
use std::sync::Arc;

use futures_util::{Stream, StreamExt};
use sc_common::membership::{Member, Role, Severity};
use sc_proto::master::v1 as pb;
use tokio::time::Instant;
use tokio_stream::wrappers::WatchStream;
use tonic::{Request, Response, Status};

use crate::central_log::{CentralLog, Entry};
use crate::registry::Registry;

/// The master's gRPC service.
#[derive(Debug, Clone)]
pub(crate) struct MasterService {
    pub(crate) registry: Arc<Registry>,
    pub(crate) log: Arc<CentralLog>,
    /// Membership streams send nothing before this instant. A standalone master that starts
    /// (or restarts) while the cluster runs gives the surviving members time to register again,
    /// so that nobody is sent a partial membership (a worker told "no brokers" would drop its
    /// broker links).
    pub(crate) settle_until: Option<Instant>,
}

type MembershipStream = Pin<Box<dyn Stream<Item = Result<pb::Membership, Status>> + Send>>;

impl MasterService {
    /// The service as tonic serves it, behind the cluster-secret check.
    pub(crate) fn into_server(
        self,
        secret: &str,
    ) -> tonic::codegen::InterceptedService<pb::master_server::MasterServer<Self>, sc_common::secret::Check>
    {
        pb::master_server::MasterServer::with_interceptor(self, sc_common::secret::Check::new(secret))
    }
}

#[tonic::async_trait]
impl pb::master_server::Master for MasterService {
    type WatchMembersStream = MembershipStream;

    async fn register(
        &self,
        request: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        let request = request.into_inner();
        let role = role_from_pb(request.role).ok_or_else(|| Status::invalid_argument("unknown role"))?;
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
        let epoch = self.registry.register(member)?;
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
        let roles: Vec<_> = request.into_inner().roles.into_iter().filter_map(role_from_pb).collect();
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
                .map(member_to_pb)
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
            role: role_from_pb(event.role),
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

/// A role from its wire form; `None` for an unknown value.
fn role_from_pb(role: i32) -> Option<Role> {
    match pb::Role::try_from(role).ok()? {
        pb::Role::Balancer => Some(Role::Balancer),
        pb::Role::Worker => Some(Role::Worker),
        pb::Role::Broker => Some(Role::Broker),
        pb::Role::Unspecified => None,
    }
}

fn role_to_pb(role: Role) -> pb::Role {
    match role {
        Role::Balancer => pb::Role::Balancer,
        Role::Worker => pb::Role::Worker,
        Role::Broker => pb::Role::Broker,
    }
}

/// A member in its wire form.
fn member_to_pb(member: &Member) -> pb::Member {
    pb::Member {
        role: role_to_pb(member.role) as i32,
        id: member.id.clone(),
        addresses: Some(pb::Addresses {
            grpc: member.grpc.clone(),
            public: member.public.clone(),
            unix: member.unix.clone(),
        }),
        pid: member.pid,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_round_trip_through_the_wire_form() {
        for role in [Role::Balancer, Role::Worker, Role::Broker] {
            assert_eq!(role_from_pb(role_to_pb(role) as i32), Some(role));
        }
        assert_eq!(role_from_pb(pb::Role::Unspecified as i32), None);
        assert_eq!(role_from_pb(42), None);
        let member = Member {
            role: Role::Broker,
            id: "broker-0".into(),
            grpc: "127.0.0.1:1".into(),
            public: String::new(),
            unix: String::new(),
            pid: 9,
        };
        let wire = member_to_pb(&member);
        assert_eq!((wire.role, wire.id.as_str(), wire.pid), (pb::Role::Broker as i32, "broker-0", 9));
        assert_eq!(wire.addresses.unwrap().grpc, "127.0.0.1:1");
    }
}
