//! What every daemon of the cluster shares.
//!
//! The four daemons (sc-master, sc-balancer, sc-worker, sc-broker) each build on this crate:
//! - [`config`]: the one TOML file with `[cluster] [master] [balancer] [worker] [broker]`,
//!   environment overrides `SC_<SECTION>__<KEY>`, strict about unknown keys;
//! - [`rendezvous`]: the stable hash that places channels on brokers and clients on workers;
//! - [`membership`]: the domain view of the master's membership, and the client that registers
//!   a daemon and watches the members it depends on;
//! - [`secret`]: the cluster secret that authenticates internal gRPC calls;
//! - [`daemon`]: the command line every daemon shares, telemetry, signals and the orphan watchdog;
//! - [`proxy_protocol`]: the PROXY v2 header from balancer to worker;
//! - [`batch`]: a stream adapter that turns a queue into batches without added latency.

pub mod batch;
pub mod config;
pub mod daemon;
pub mod membership;
pub mod proxy_protocol;
pub mod rendezvous;
pub mod secret;
pub mod size;

pub use config::Config;
pub use membership::{Member, Membership, Role};

/// Errors shared by the daemons' start-up paths.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration could not be read or is invalid; maps to exit code 64.
    #[error("config: {0}")]
    Config(String),
    /// A listener could not be bound.
    #[error("bind {addr}: {source}")]
    Bind {
        addr: String,
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
