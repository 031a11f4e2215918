//! Every refusal pusher answers a call with, and its gRPC status.
//!
//! The handlers in `service` return [`PusherError`]; [`reject`] is the one place a refused
//! request is logged and counted (`pusher_rejected_requests_total{code}`), once, at the level
//! its cause deserves. The conversion to a `tonic::Status` is pure
//! (`From<PusherError> for Status`). A leaf: it imports no other module of the crate.

use std::time::Duration;
use tonic::Status;
use tracing::{debug, error, warn};

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum PusherError {
    /// The request is malformed; the message names the field. Listen checks its requests
    /// before sending them, so this means a client that does not.
    #[error("{field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    /// A `process` on a Connect stream before its `hello`.
    #[error("the first message on a Connect stream must be hello")]
    NotGreeted,
    /// Pusher is shutting down; the caller should send to another replica.
    #[error("pusher is draining; send to another replica")]
    Draining,
    /// The job registry is full; the caller should ask again after `retry_after`.
    #[error("pusher is at its job limit; retry after {} ms", .retry_after.as_millis())]
    Busy { retry_after: Duration },
    /// A job ended without answering its requester: a bug inside pusher.
    #[error("job ended without a result")]
    NoResult,
}

impl PusherError {
    pub(crate) fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        PusherError::Invalid {
            field,
            reason: reason.into(),
        }
    }

    /// The status code's name, as the `code` label of `pusher_rejected_requests_total`.
    fn code_label(&self) -> &'static str {
        match self {
            PusherError::Invalid { .. } => "invalid_argument",
            PusherError::NotGreeted => "failed_precondition",
            PusherError::Draining => "unavailable",
            PusherError::Busy { .. } => "resource_exhausted",
            PusherError::NoResult => "internal",
        }
    }
}

/// Logs and counts a refused request, then converts it. Every status pusher returns, and
/// every request it drops, passes here.
pub(crate) fn reject(error: PusherError) -> Status {
    match &error {
        PusherError::Invalid { .. } | PusherError::NotGreeted => {
            warn!(%error, "rejected request")
        }
        PusherError::Draining | PusherError::Busy { .. } => debug!(%error, "request refused"),
        PusherError::NoResult => error!(%error, "request failed inside pusher"),
    }
    metrics::counter!("pusher_rejected_requests_total", "code" => error.code_label()).increment(1);
    error.into()
}

/// Pure: the status for each error. Callers go through [`reject`].
impl From<PusherError> for Status {
    fn from(error: PusherError) -> Status {
        let message = error.to_string();
        match error {
            PusherError::Invalid { .. } => Status::invalid_argument(message),
            PusherError::NotGreeted => Status::failed_precondition(message),
            PusherError::Draining => Status::unavailable(message),
            PusherError::Busy { .. } => Status::resource_exhausted(message),
            PusherError::NoResult => Status::internal(message),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn each_error_has_its_code_label_and_message() {
        for (error, code, label, message) in [
            (
                PusherError::invalid("conversation_id", "must not be empty"),
                Code::InvalidArgument,
                "invalid_argument",
                "conversation_id: must not be empty",
            ),
            (
                PusherError::NotGreeted,
                Code::FailedPrecondition,
                "failed_precondition",
                "the first message on a Connect stream must be hello",
            ),
            (
                PusherError::Draining,
                Code::Unavailable,
                "unavailable",
                "pusher is draining; send to another replica",
            ),
            (
                PusherError::Busy {
                    retry_after: Duration::from_millis(750),
                },
                Code::ResourceExhausted,
                "resource_exhausted",
                "pusher is at its job limit; retry after 750 ms",
            ),
            (
                PusherError::NoResult,
                Code::Internal,
                "internal",
                "job ended without a result",
            ),
        ] {
            assert_eq!(error.code_label(), label);
            let status = Status::from(error.clone());
            assert_eq!((status.code(), status.message()), (code, message));
            let rejected = reject(error);
            assert_eq!((rejected.code(), rejected.message()), (code, message));
        }
    }
}
