//! What the master turns down or fails at, and how each case maps to a gRPC code (the
//! `sc.master.v1` service) and an HTTP status (the admin API), in one place.
//!
//! | case | gRPC | HTTP | why |
//! |---|---|---|---|
//! | [`MasterError::Retired`] | FAILED_PRECONDITION | 409 | the process is being replaced: its state, not the request, is wrong |
//! | [`MasterError::RollingRestartRunning`] | ABORTED | 409 | a concurrent operation; ask again once it is over |
//! | [`MasterError::Standalone`] | UNIMPLEMENTED | 400 | a standalone master runs no processes: the request makes no sense to it |
//! | [`MasterError::Spawn`] | INTERNAL | 500 | the host refused to start a process |
//! | [`MasterError::ReplacementExited`] | UNAVAILABLE | 503 | the new process died; the old one serves on |
//! | [`MasterError::ReplacementTimeout`] | DEADLINE_EXCEEDED | 504 | the new process was not healthy in time |
//! | [`MasterError::Stopping`] | UNAVAILABLE | 503 | the cluster is shutting down |
//! | [`MasterError::HealthCheckerStopped`] | INTERNAL | 500 | a master task ended early: a bug |
//! | [`MasterError::Grpc`] | INTERNAL | 500 | the gRPC server failed |
//! | [`MasterError::FirstStart`] | FAILED_PRECONDITION | 500 | a child exited before it was ever healthy: the master exits with it (never an API answer) |
//! | [`MasterError::NoSuchBroker`] | NOT_FOUND | 404 | no supervised broker has that id |
//! | [`MasterError::LastBroker`] | FAILED_PRECONDITION | 409 | draining it would leave no broker |
//! | [`MasterError::BrokerState`] | FAILED_PRECONDITION | 409 | the broker is not in the state the request needs |

use std::time::Duration;

use http::StatusCode;
use tonic::Code;

/// Everything the master turns down or fails at once it runs (start-up errors are
/// [`sc_common::Error`]).
#[derive(Debug, thiserror::Error)]
pub enum MasterError {
    /// A process being replaced in a rolling restart tried to register again.
    #[error("{id} (pid {pid}) is being replaced and may not register again")]
    Retired {
        /// The member id.
        id: String,
        /// The process being replaced.
        pid: u32,
    },
    /// A rolling restart was asked for while one runs.
    #[error("a rolling restart is already running")]
    RollingRestartRunning,
    /// A rolling restart was asked of a standalone master.
    #[error("standalone mode: the master runs no processes to restart")]
    Standalone,
    /// A child process could not be started.
    #[error("cannot start {program}: {source}")]
    Spawn {
        /// The program that was run.
        program: String,
        /// Why it could not be.
        #[source]
        source: std::io::Error,
    },
    /// A rolling restart's replacement ended before it was healthy.
    #[error("the replacement (pid {pid}) {how}")]
    ReplacementExited {
        /// The replacement process.
        pid: u32,
        /// How it ended ("exited with code 1", "was killed by signal 9 (SIGKILL)").
        how: String,
    },
    /// A rolling restart's replacement was not healthy in time.
    #[error("the replacement (pid {pid}) was not healthy within {timeout:?}")]
    ReplacementTimeout {
        /// The replacement process.
        pid: u32,
        /// How long it had.
        timeout: Duration,
    },
    /// The cluster is stopping.
    #[error("the cluster is stopping")]
    Stopping,
    /// The health checker ended while it was needed.
    #[error("the health checker stopped")]
    HealthCheckerStopped,
    /// The gRPC server failed.
    #[error("grpc server: {0}")]
    Grpc(#[source] sc_common::Error),
    /// A supervised child exited before it ever passed a health check, the first time it was
    /// started: a configuration or host problem that respawning would not fix.
    #[error("{id} (pid {pid}) failed at its first start: it {how}{}", said(.message))]
    FirstStart {
        /// The member id.
        id: String,
        /// The process.
        pid: u32,
        /// How it ended ("exited with code 64").
        how: String,
        /// Its exit code, if it exited (64: bad configuration).
        code: Option<i32>,
        /// The last line it wrote on stderr: its error.
        message: String,
    },
    /// A drain or undrain named no supervised broker.
    #[error("no supervised broker is called {id:?}")]
    NoSuchBroker {
        /// The id asked for.
        id: String,
    },
    /// A drain asked for the last running broker.
    #[error("{id} is the last running broker: draining it would leave the workers none")]
    LastBroker {
        /// The broker.
        id: String,
    },
    /// A drain of a broker that is not running, or an undrain of one that is not drained.
    #[error("{id} is {state}; it must be {need}")]
    BrokerState {
        /// The broker.
        id: String,
        /// Its state (status API name).
        state: &'static str,
        /// The state the request needs.
        need: &'static str,
    },
}

/// What a child printed last, for [`MasterError::FirstStart`].
fn said(message: &str) -> String {
    if message.is_empty() { ", printing nothing on stderr".to_owned() } else { format!(": {message}") }
}

impl MasterError {
    /// The gRPC code of this error.
    pub fn code(&self) -> Code {
        match self {
            MasterError::Retired { .. }
            | MasterError::FirstStart { .. }
            | MasterError::LastBroker { .. }
            | MasterError::BrokerState { .. } => Code::FailedPrecondition,
            MasterError::NoSuchBroker { .. } => Code::NotFound,
            MasterError::RollingRestartRunning => Code::Aborted,
            MasterError::Standalone => Code::Unimplemented,
            MasterError::ReplacementExited { .. } | MasterError::Stopping => Code::Unavailable,
            MasterError::ReplacementTimeout { .. } => Code::DeadlineExceeded,
            MasterError::Spawn { .. } | MasterError::HealthCheckerStopped | MasterError::Grpc(_) => {
                Code::Internal
            }
        }
    }

    /// The HTTP status of this error (admin API).
    pub fn http_status(&self) -> StatusCode {
        match self {
            MasterError::Retired { .. }
            | MasterError::RollingRestartRunning
            | MasterError::LastBroker { .. }
            | MasterError::BrokerState { .. } => StatusCode::CONFLICT,
            MasterError::NoSuchBroker { .. } => StatusCode::NOT_FOUND,
            MasterError::Standalone => StatusCode::BAD_REQUEST,
            MasterError::ReplacementExited { .. } | MasterError::Stopping => StatusCode::SERVICE_UNAVAILABLE,
            MasterError::ReplacementTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            MasterError::Spawn { .. }
            | MasterError::HealthCheckerStopped
            | MasterError::Grpc(_)
            | MasterError::FirstStart { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl From<MasterError> for tonic::Status {
    fn from(error: MasterError) -> Self {
        tonic::Status::new(error.code(), error.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_case_has_its_own_code() {
        let retired = MasterError::Retired { id: "worker-0".into(), pid: 7 };
        assert_eq!(retired.code(), Code::FailedPrecondition);
        assert_eq!(retired.http_status(), StatusCode::CONFLICT);
        assert_eq!(MasterError::RollingRestartRunning.code(), Code::Aborted);
        assert_eq!(MasterError::RollingRestartRunning.http_status(), StatusCode::CONFLICT);
        assert_eq!(MasterError::Standalone.code(), Code::Unimplemented);
        assert_eq!(MasterError::Standalone.http_status(), StatusCode::BAD_REQUEST);
        let timeout = MasterError::ReplacementTimeout { pid: 1, timeout: Duration::from_secs(30) };
        assert_eq!(timeout.http_status(), StatusCode::GATEWAY_TIMEOUT);
        let status = tonic::Status::from(retired);
        assert_eq!(status.code(), Code::FailedPrecondition);
        assert_eq!(status.message(), "worker-0 (pid 7) is being replaced and may not register again");
    }
}
