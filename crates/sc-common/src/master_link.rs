//! The link from a member daemon to the master: registration, the membership watch and the
//! forwarding of central log events (`sc.master.v1`).
//!
//! A balancer, worker or broker holds a [`MasterLink`]: it registers the daemon, keeps a watch
//! on the members it depends on (the balancer on workers, a worker on brokers) and forwards
//! events for the central log. If the master goes away the link keeps the last membership it
//! saw (the master is not on the data path) and registers again when the master is back.
//! [`deregister`] tells the master that a member leaves on purpose.
//!
//! This module is sc-common's gRPC edge: the only one that touches the generated types, which
//! it converts to and from [`crate::membership`].

use std::time::Duration;

use sc_proto::master::v1 as pb;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};

use crate::membership::{Backoff, Event, Member, Membership, Role, Severity};
use crate::{Error, secret};

/// How often a linked daemon registers again (see [`MasterLink::spawn`]).
const REREGISTER: Duration = Duration::from_secs(5);

/// A daemon's link to the master: registration, membership watch, event forwarding.
#[derive(Debug)]
pub struct MasterLink {
    client: pb::master_client::MasterClient<
        tonic::service::interceptor::InterceptedService<Channel, secret::Attach>,
    >,
    me: Member,
    watch_roles: Vec<Role>,
}

impl MasterLink {
    /// A link to the master at `url` ("http://host:port") for the member `me`, watching the
    /// members with `watch_roles`. Connects lazily: the master may not be up yet.
    pub fn new(url: &str, secret: &str, me: Member, watch_roles: Vec<Role>) -> Result<Self, Error> {
        let endpoint = Endpoint::from_shared(url.to_owned())
            .map_err(|_| Error::Address(url.to_owned()))?
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true);
        let channel = endpoint.connect_lazy();
        let client = pb::master_client::MasterClient::with_interceptor(channel, secret::Attach::new(secret));
        Ok(Self { client, me, watch_roles })
    }

    /// Runs the link until `shutdown`: registers (again after every loss of the master), keeps
    /// the membership watch going and forwards `events`. The returned receiver starts empty
    /// (epoch 0) and holds the latest snapshot.
    pub fn spawn(
        self,
        mut events: mpsc::Receiver<Event>,
        shutdown: CancellationToken,
    ) -> watch::Receiver<Membership> {
        let (tx, rx) = watch::channel(Membership::default());
        let reporter = {
            let mut client = self.client.clone();
            let me = self.me.clone();
            let shutdown = shutdown.clone();
            async move {
                loop {
                    let event = tokio::select! {
                        _ = shutdown.cancelled() => return,
                        event = events.recv() => match event { Some(e) => e, None => return },
                    };
                    let request = pb::Event {
                        role: role_to_pb(me.role) as i32,
                        id: me.id.clone(),
                        pid: me.pid,
                        time_ms: event.time_ms,
                        severity: severity_to_pb(event.severity) as i32,
                        message: event.message,
                        location: event.location,
                    };
                    // A lost event is not worth blocking for: the daemon's own log has it too.
                    let _ = tokio::time::timeout(Duration::from_secs(2), client.report_event(request)).await;
                }
            }
        };
        tokio::spawn(reporter);
        tokio::spawn(self.run(tx, shutdown));
        rx
    }

    async fn run(mut self, tx: watch::Sender<Membership>, shutdown: CancellationToken) {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let mut lost_since: Option<std::time::Instant> = None;
        loop {
            let attempt = async {
                self.register().await?;
                let request = pb::WatchMembersRequest {
                    roles: self.watch_roles.iter().map(|r| role_to_pb(*r) as i32).collect(),
                };
                let mut stream = self.client.watch_members(request).await?.into_inner();
                tracing::debug!(id = %self.me.id, "registered with master");
                lost_since = None;
                backoff.reset();
                // Registering again now and then brings back a member that the health checks
                // removed while it was only slow or stopped (SIGSTOP, then SIGCONT): nothing
                // else would tell the master it is alive. Same record, same epoch: cheap.
                let mut heartbeat =
                    tokio::time::interval_at(tokio::time::Instant::now() + REREGISTER, REREGISTER);
                loop {
                    tokio::select! {
                        snapshot = stream.message() => match snapshot? {
                            Some(snapshot) => {
                                tx.send_replace(membership_from_pb(snapshot));
                            }
                            None => break,
                        },
                        _ = heartbeat.tick() => self.register().await?,
                    }
                }
                Ok::<(), tonic::Status>(())
            };
            let outcome = tokio::select! {
                _ = shutdown.cancelled() => return,
                outcome = attempt => outcome,
            };
            let since = *lost_since.get_or_insert_with(std::time::Instant::now);
            match outcome {
                Err(status) if since.elapsed() > Duration::from_secs(5) => {
                    tracing::warn!(code = ?status.code(), message = status.message(), "master unreachable, serving with the last membership");
                }
                Err(status) => tracing::debug!(code = ?status.code(), "master link down"),
                Ok(()) => tracing::debug!("master closed the membership stream"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(backoff.next_delay()) => {}
            }
        }
    }

    async fn register(&mut self) -> Result<(), tonic::Status> {
        let request = pb::RegisterRequest {
            role: role_to_pb(self.me.role) as i32,
            id: self.me.id.clone(),
            addresses: Some(pb::Addresses {
                grpc: self.me.grpc.clone(),
                public: self.me.public.clone(),
                unix: self.me.unix.clone(),
            }),
            pid: self.me.pid,
        };
        self.client.register(request).await?;
        Ok(())
    }
}

/// Tells the master at `url` that the member `id` (process `pid`) is leaving on purpose, so that
/// it leaves the membership at once instead of after failed health checks. Best effort: bounded
/// by `timeout`, and an unreachable master is only logged.
pub async fn deregister(url: &str, secret: &str, id: &str, pid: u32, timeout: Duration) {
    let call = async {
        let channel = Endpoint::from_shared(url.to_owned())
            .map_err(|e| e.to_string())?
            .connect_timeout(timeout)
            .connect()
            .await
            .map_err(|e| e.to_string())?;
        let mut client =
            pb::master_client::MasterClient::with_interceptor(channel, secret::Attach::new(secret));
        client
            .deregister(pb::DeregisterRequest { id: id.to_owned(), pid })
            .await
            .map_err(|s| s.message().to_owned())?;
        Ok::<(), String>(())
    };
    match tokio::time::timeout(timeout, call).await {
        Ok(Ok(())) => tracing::debug!(%id, "deregistered"),
        Ok(Err(e)) => tracing::debug!(%id, error = %e, "could not deregister"),
        Err(_) => tracing::debug!(%id, "deregistering timed out"),
    }
}

/// Converts a role to its wire form.
fn role_to_pb(role: Role) -> pb::Role {
    match role {
        Role::Balancer => pb::Role::Balancer,
        Role::Worker => pb::Role::Worker,
        Role::Broker => pb::Role::Broker,
    }
}

/// Converts a role from its wire form; `None` for an unknown value.
fn role_from_pb(role: i32) -> Option<Role> {
    match pb::Role::try_from(role).ok()? {
        pb::Role::Balancer => Some(Role::Balancer),
        pb::Role::Worker => Some(Role::Worker),
        pb::Role::Broker => Some(Role::Broker),
        pb::Role::Unspecified => None,
    }
}

fn severity_to_pb(severity: Severity) -> pb::Severity {
    match severity {
        Severity::Notice => pb::Severity::Notice,
        Severity::Warning => pb::Severity::Warning,
        Severity::Error => pb::Severity::Error,
    }
}

/// Converts a membership snapshot from its wire form, skipping members of unknown roles.
fn membership_from_pb(snapshot: pb::Membership) -> Membership {
    let members = snapshot
        .members
        .into_iter()
        .filter_map(|m| {
            let addresses = m.addresses.unwrap_or_default();
            Some(Member {
                role: role_from_pb(m.role)?,
                id: m.id,
                grpc: addresses.grpc,
                public: addresses.public,
                unix: addresses.unix,
                pid: m.pid,
            })
        })
        .collect();
    Membership { epoch: snapshot.epoch, members }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn membership_from_the_wire_form_skips_unknown_roles() {
        let wire = |role: pb::Role, id: &str| pb::Member {
            role: role as i32,
            id: id.into(),
            addresses: Some(pb::Addresses {
                grpc: "127.0.0.1:1".into(),
                public: "127.0.0.1:2".into(),
                unix: String::new(),
            }),
            pid: 42,
        };
        let snapshot = pb::Membership {
            epoch: 7,
            members: vec![wire(pb::Role::Worker, "worker-1"), wire(pb::Role::Unspecified, "odd")],
        };
        let member = Member {
            role: Role::Worker,
            id: "worker-1".into(),
            grpc: "127.0.0.1:1".into(),
            public: "127.0.0.1:2".into(),
            unix: String::new(),
            pid: 42,
        };
        assert_eq!(membership_from_pb(snapshot), Membership { epoch: 7, members: vec![member] });
        assert_eq!(role_from_pb(role_to_pb(Role::Broker) as i32), Some(Role::Broker));
        assert_eq!(role_from_pb(99), None);
    }
}
