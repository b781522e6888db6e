//! Generated gRPC types and services for the cluster's internal contracts.
//!
//! Only this crate runs code generation. Each daemon converts these types to its own domain
//! types at its edge (its `grpc` module); domain code does not import `sc_proto`.

#![allow(clippy::all, missing_docs)]

/// `sc.master.v1`: membership, health and the central log (served by sc-master).
pub mod master {
    pub mod v1 {
        tonic::include_proto!("sc.master.v1");
    }
}

/// `sc.broker.v1`: pub/sub streams and the exchange (served by sc-broker).
pub mod broker {
    pub mod v1 {
        tonic::include_proto!("sc.broker.v1");
    }
}

/// `sc.metrics.v1`: each member's figures, gathered by sc-master (served by every member).
pub mod metrics {
    pub mod v1 {
        tonic::include_proto!("sc.metrics.v1");
    }
}
