//! The worker's runtime errors: one enum, mapped to gRPC and HTTP status codes here and nowhere
//! else.
//!
//! Start-up problems (configuration, binding) are `sc_common::Error` (re-exported as
//! [`crate::StartError`]); everything that can go wrong while serving is an [`Error`]: a broker
//! that is not there, a broker that refused a call (with its gRPC code kept), a reply the worker
//! cannot read, a link that failed.

use http::StatusCode;
use tonic::Code;

/// Something the worker could not do while serving.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// No broker owns the channel or key right now (none linked within the link wait).
    #[error("no broker is available for this channel or key")]
    NoBroker,
    /// The broker answered a call with an error status.
    #[error("the broker refused ({code:?}): {message}")]
    Refused {
        /// The broker's gRPC code.
        code: Code,
        /// The broker's message.
        message: String,
    },
    /// The broker's reply could not be read (not the JSON the exchange stores).
    #[error("the broker sent a bad reply: {0}")]
    BadReply(String),
    /// A publish larger than the worker-broker link carries (`[worker] max_payload` plus
    /// `max_channel_name`).
    #[error("the message is too large for the brokers")]
    TooLarge,
    /// The connection to a broker could not be made or broke.
    #[error("broker link failed: {0}")]
    Link(String),
    /// A publish to a `#presence/` channel: only the brokers publish presence events.
    #[error("{0} is a presence event channel: only the brokers publish there")]
    ReservedChannel(String),
    /// A presence call on a channel that `[worker] presence_channels` does not name.
    #[error("{0} is not a presence channel (see [worker] presence_channels)")]
    NotPresence(String),
}

impl Error {
    /// A short, stable name for logs and JSON bodies.
    pub fn code(&self) -> &'static str {
        match self {
            Self::NoBroker => "no_broker",
            Self::Refused { .. } => "refused",
            Self::BadReply(_) => "bad_reply",
            Self::Link(_) => "link_failed",
            Self::TooLarge => "too_large",
            Self::ReservedChannel(_) => "reserved_channel",
            Self::NotPresence(_) => "not_presence",
        }
    }

    /// The HTTP status for this error (the worker's HTTP API).
    pub fn http_status(&self) -> StatusCode {
        match self {
            Self::NoBroker | Self::Link(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Refused { code, .. } => match code {
                Code::InvalidArgument | Code::OutOfRange | Code::FailedPrecondition => {
                    StatusCode::BAD_REQUEST
                }
                Code::NotFound => StatusCode::NOT_FOUND,
                Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
                Code::Unauthenticated => StatusCode::UNAUTHORIZED,
                Code::PermissionDenied => StatusCode::FORBIDDEN,
                Code::Unavailable | Code::DeadlineExceeded => StatusCode::SERVICE_UNAVAILABLE,
                _ => StatusCode::BAD_GATEWAY,
            },
            Self::BadReply(_) => StatusCode::BAD_GATEWAY,
            Self::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::ReservedChannel(_) => StatusCode::FORBIDDEN,
            Self::NotPresence(_) => StatusCode::NOT_FOUND,
        }
    }
}

/// What a client sees of a worker error in an app's reply: `BrokerError` (the stock server's
/// name for a failed exchange call), with the error's code in `code`. Lets an app's handler use
/// `?` on exchange calls.
impl From<Error> for crate::protocol::ErrorObject {
    fn from(error: Error) -> Self {
        Self::new("BrokerError", error.to_string()).with("code", serde_json::Value::from(error.code()))
    }
}

impl From<tonic::Status> for Error {
    fn from(status: tonic::Status) -> Self {
        Self::Refused { code: status.code(), message: status.message().to_owned() }
    }
}

impl From<tonic::transport::Error> for Error {
    fn from(error: tonic::transport::Error) -> Self {
        Self::Link(error.to_string())
    }
}

impl From<Error> for tonic::Status {
    fn from(error: Error) -> Self {
        let message = error.to_string();
        match error {
            Error::NoBroker | Error::Link(_) => Self::unavailable(message),
            Error::Refused { code, message } => Self::new(code, message),
            Error::BadReply(_) => Self::internal(message),
            Error::TooLarge => Self::resource_exhausted(message),
            Error::ReservedChannel(_) => Self::permission_denied(message),
            Error::NotPresence(_) => Self::not_found(message),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_keeps_the_brokers_code() {
        let error = Error::from(tonic::Status::invalid_argument("key too long"));
        assert_eq!(error.http_status(), StatusCode::BAD_REQUEST);
        let status = tonic::Status::from(error);
        assert_eq!((status.code(), status.message()), (Code::InvalidArgument, "key too long"));
    }

    #[test]
    fn every_case_has_its_own_mapping() {
        assert_eq!(Error::NoBroker.http_status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(tonic::Status::from(Error::NoBroker).code(), Code::Unavailable);
        assert_eq!(Error::BadReply("x".into()).http_status(), StatusCode::BAD_GATEWAY);
        assert_eq!(tonic::Status::from(Error::BadReply("x".into())).code(), Code::Internal);
        assert_eq!(Error::Link("down".into()).code(), "link_failed");
        assert_eq!(Error::ReservedChannel("#presence/a".into()).http_status(), StatusCode::FORBIDDEN);
        assert_eq!(Error::NotPresence("a".into()).http_status(), StatusCode::NOT_FOUND);
        assert_eq!(tonic::Status::from(Error::NotPresence("a".into())).code(), Code::NotFound);
    }
}
