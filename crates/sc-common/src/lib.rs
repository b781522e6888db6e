//! What every daemon of the cluster shares.
//!
//! The four daemons (sc-master, sc-balancer, sc-worker, sc-broker) each build on this crate:
//! - [`config`]: the one TOML file with `[cluster] [master] [balancer] [worker] [broker]`,
//!   environment overrides `SC_<SECTION>__<KEY>`, strict about unknown keys;
//! - [`rendezvous`]: the stable hash that places channels on brokers and clients on workers;
//! - [`membership`]: the domain view of the master's membership (roles, members, central log
//!   events); [`MasterLink`] registers a daemon and watches the members it depends on;
//! - [`secret`]: the cluster secret that authenticates internal gRPC calls;
//! - [`cli`]: the command line and `main` every member daemon shares, and the exit codes;
//! - [`telemetry`]: tracing, the forwarding of log lines to the central log, the panic hook;
//! - [`signal`]: SIGTERM/SIGINT shutdown, per-signal handlers and the orphan watchdog;
//! - [`net`]: binding, the accept loop with back-off, grpc.health.v1, advertised addresses;
//! - [`listen_fds`]: listeners passed by the starter (the master, systemd socket activation);
//! - [`proxy_protocol`]: the PROXY v2 header from balancer to worker;
//! - [`batch`]: a stream adapter that turns a queue into batches without added latency;
//! - [`metrics`]: the metrics registry of a daemon, its process figures, `GET /metrics` and the
//!   member side of `sc.metrics.v1`.
//!
//! Only the private `master_link` module touches the generated `sc.master.v1` types, and
//! [`metrics`] the `sc.metrics.v1` ones.

#![warn(missing_docs)]

pub mod batch;
pub mod cli;
pub mod config;
pub mod handoff;
pub mod listen_fds;
mod master_link;
pub mod membership;
pub mod metrics;
pub mod net;
pub mod per_ip;
pub mod proxy_protocol;
pub mod rendezvous;
pub mod secret;
pub mod signal;
pub mod size;
pub mod telemetry;

pub use config::Config;
pub use master_link::{MasterLink, deregister};
pub use membership::{Member, Membership, Role};

/// Errors of the daemons' start-up paths (configuration, binding, dialing the master); a
/// running daemon has its own error type.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration could not be read or is invalid; maps to exit code 64.
    #[error("config: {0}")]
    Config(String),
    /// A listener could not be bound.
    #[error("bind {addr}: {source}")]
    Bind {
        /// The address (or socket path) that could not be bound.
        addr: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// An address given to us (by config or by the master) does not parse.
    #[error("bad address {0:?}")]
    Address(String),
    /// A gRPC transport error.
    #[error("transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// Other I/O.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
