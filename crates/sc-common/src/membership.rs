//! Membership as the daemons see it, and the link from a daemon to the master.
//!
//! The master (sc-master) owns the membership. A balancer, worker or broker holds a
//! [`MasterLink`]: it registers the daemon, keeps a watch on the members it depends on (the
//! balancer on workers, a worker on brokers) and forwards events for the central log. If the
//! master goes away the link keeps the last membership it saw (the master is not on the data
//! path) and registers again when the master is back.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sc_proto::master::v1 as pb;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};

use crate::{Error, secret};

/// How often a linked daemon registers again (see [`MasterLink::spawn`]).
const REREGISTER: Duration = Duration::from_secs(5);

/// What a daemon is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    Balancer,
    Worker,
    Broker,
}

/// One live member of the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub role: Role,
    /// Stable id, the input of rendezvous hashing.
    pub id: String,
    /// grpc.health.v1 (and sc.broker.v1 on brokers), "host:port".
    pub grpc: String,
    /// The client-facing listener, "host:port"; empty if none.
    pub public: String,
    /// A Unix socket for the client-facing listener; empty if none.
    pub unix: String,
    pub pid: u32,
}

/// The live members at one point in time.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Membership {
    /// Moves on with every change (within one master run).
    pub epoch: u64,
    /// Sorted by id.
    pub members: Vec<Member>,
}

/// How bad a reported event is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Notice,
    Warning,
    Error,
}

/// An entry for the central log.
#[derive(Debug, Clone)]
pub struct Event {
    pub severity: Severity,
    pub message: String,
    pub location: String,
    pub time_ms: u64,
}

/// A daemon's link to the master: registration, membership watch, event forwarding.
#[derive(Debug)]
pub struct MasterLink {
    client: pb::master_client::MasterClient<
        tonic::service::interceptor::InterceptedService<Channel, secret::Attach>,
    >,
    me: Member,
    watch_roles: Vec<Role>,
}

impl Role {
    /// The lowercase name used in ids, logs and the status API.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Balancer => "balancer",
            Role::Worker => "worker",
            Role::Broker => "broker",
        }
    }
}

impl Member {
    /// This process as a member with `role`: its listeners as other hosts should dial them
    /// (a wildcard address becomes a dialable one, see [`crate::daemon::advertised`]).
    pub fn this_process(
        role: Role,
        id: &str,
        grpc: std::net::SocketAddr,
        public: Option<std::net::SocketAddr>,
        unix: String,
        advertise_ip: Option<std::net::IpAddr>,
        master_url: &str,
    ) -> Self {
        let dialable = |addr| crate::daemon::advertised(addr, advertise_ip, Some(master_url)).to_string();
        Self {
            role,
            id: id.to_owned(),
            grpc: dialable(grpc),
            public: public.map(dialable).unwrap_or_default(),
            unix,
            pid: std::process::id(),
        }
    }
}

impl Membership {
    /// The members with `role`.
    pub fn with_role(&self, role: Role) -> impl Iterator<Item = &Member> {
        self.members.iter().filter(move |m| m.role == role)
    }
}

impl Event {
    /// An event happening now.
    pub fn now(severity: Severity, message: impl Into<String>, location: impl Into<String>) -> Self {
        Self { severity, message: message.into(), location: location.into(), time_ms: now_ms() }
    }
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

/// Exponential backoff with a cap.
#[derive(Debug, Clone)]
pub struct Backoff {
    first: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    /// Starts at `first`, doubles up to `max`.
    pub fn new(first: Duration, max: Duration) -> Self {
        Self { first, max, next: first }
    }

    /// The delay to wait now; the following one doubles.
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(self.max);
        delay
    }

    /// Back to the first delay.
    pub fn reset(&mut self) {
        self.next = self.first;
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Converts a role to its wire form.
pub fn role_to_pb(role: Role) -> pb::Role {
    match role {
        Role::Balancer => pb::Role::Balancer,
        Role::Worker => pb::Role::Worker,
        Role::Broker => pb::Role::Broker,
    }
}

/// Converts a role from its wire form; `None` for an unknown value.
pub fn role_from_pb(role: i32) -> Option<Role> {
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
pub fn membership_from_pb(snapshot: pb::Membership) -> Membership {
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

/// Converts a member to its wire form.
pub fn member_to_pb(member: &Member) -> pb::Member {
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
    fn backoff_doubles_to_the_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(500));
        let delays: Vec<_> = (0..5).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(delays, [100, 200, 400, 500, 500]);
        b.reset();
        assert_eq!(b.next_delay().as_millis(), 100);
    }

    #[test]
    fn member_round_trips_through_the_wire_form() {
        let member = Member {
            role: Role::Worker,
            id: "worker-1".into(),
            grpc: "127.0.0.1:1".into(),
            public: "127.0.0.1:2".into(),
            unix: String::new(),
            pid: 42,
        };
        let snapshot = pb::Membership { epoch: 7, members: vec![member_to_pb(&member)] };
        assert_eq!(membership_from_pb(snapshot), Membership { epoch: 7, members: vec![member] });
    }
}
