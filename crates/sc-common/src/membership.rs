//! Membership as the daemons see it: roles, members, snapshots, central log events.
//!
//! The master (sc-master) owns the membership; a balancer, worker or broker sees it through
//! its [`crate::MasterLink`], which turns the wire form into these types. Nothing here knows
//! the wire form.

use std::time::Duration;

/// What a daemon is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// The public listener (sc-balancer).
    Balancer,
    /// A SocketCluster server (sc-worker or an app's worker binary).
    Worker,
    /// Pub/sub and key/value (sc-broker).
    Broker,
}

/// One live member of the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// What it is.
    pub role: Role,
    /// Stable id, the input of rendezvous hashing.
    pub id: String,
    /// grpc.health.v1 (and sc.broker.v1 on brokers), "host:port".
    pub grpc: String,
    /// The client-facing listener, "host:port"; empty if none.
    pub public: String,
    /// A Unix socket for the client-facing listener; empty if none.
    pub unix: String,
    /// Its process id (a process replaced under the same id has a new one).
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
    /// Lifecycle (INFO).
    Notice,
    /// Something went wrong and was handled (WARN).
    Warning,
    /// An operator must act (ERROR).
    Error,
}

/// An entry for the central log.
#[derive(Debug, Clone)]
pub struct Event {
    /// How bad it is.
    pub severity: Severity,
    /// The log line, with its fields.
    pub message: String,
    /// Where it was logged: "file:line", or the log target.
    pub location: String,
    /// When, in milliseconds since the Unix epoch.
    pub time_ms: u64,
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
    /// (a wildcard address becomes a dialable one, see [`crate::net::advertised`]).
    pub fn this_process(
        role: Role,
        id: &str,
        grpc: std::net::SocketAddr,
        public: Option<std::net::SocketAddr>,
        unix: String,
        advertise_ip: Option<std::net::IpAddr>,
        master_url: &str,
    ) -> Self {
        let dialable = |addr| crate::net::advertised(addr, advertise_ip, Some(master_url)).to_string();
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
        Self { severity, message: message.into(), location: location.into(), time_ms: crate::now_ms() }
    }
}

/// The id a member uses when none is configured: role, host name and pid, which is unique on
/// one host and, in a container (pid 1), stable across restarts of the container.
pub fn default_id(role: Role) -> String {
    format!("{}-{}-{}", role.as_str(), crate::net::hostname(), std::process::id())
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
    fn default_ids_name_the_host() {
        let id = default_id(Role::Worker);
        assert!(id.starts_with(&format!("worker-{}-", crate::net::hostname())), "{id}");
    }
}
