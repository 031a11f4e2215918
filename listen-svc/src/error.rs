//! Every error a Listen call can end with, and its gRPC status.
//!
//! Handlers, sessions and the auth interceptor return [`ApiError`]; the conversion to a
//! `tonic::Status` is pure (`From<ApiError> for Status`). [`reject`] is the one place where a
//! refused call is logged and counted, once, at the level its cause deserves; internal details
//! stay in the log and out of the status.

use crate::store::{QueueFull, StoreError};
use std::time::Duration;
use tonic::Status;
use tonic_types::{ErrorDetails, StatusExt};
use tracing::{debug, error, info, warn};

#[derive(Debug, thiserror::Error)]
pub(crate) enum ApiError {
    /// The request is malformed; the message names the field.
    #[error("{field}: {reason}")]
    Invalid { field: String, reason: String },
    #[error("conversation {0} not found")]
    NotFound(String),
    #[error("conversation {id} is {status}; only FAILED conversations can be retried")]
    NotRetryable { id: String, status: &'static str },
    /// A request out of order on a stream (a second `start`); the message names the field.
    #[error("{field}: {reason}")]
    OutOfOrder {
        field: &'static str,
        reason: &'static str,
    },
    /// No valid bearer token; the message says what is wrong with it.
    #[error("authorization: {0}")]
    Unauthenticated(String),
    /// The caller is known but may not do this.
    #[error("{0}")]
    PermissionDenied(String),
    /// A bound (the message names its flag) is reached; retry later.
    #[error("{0}")]
    Exhausted(String),
    /// The queue is at a bound: a Submit stored nothing; retry after the delay (sent as a
    /// `google.rpc.RetryInfo` detail too).
    #[error("{full}; nothing was stored, retry in {}s", retry_after.as_secs_f64())]
    QueueFull {
        full: QueueFull,
        retry_after: Duration,
    },
    /// The queue is at a bound when a session finishes: its conversation stays IN_PROGRESS
    /// with every segment (the message says so, so that no client sends them again).
    #[error(
        "{full}; conversation {id} stays IN_PROGRESS with its segments: in {}s, start a \
         session for the same uid (it resumes the conversation) and send Finish again",
        retry_after.as_secs_f64()
    )]
    FinishRefused {
        id: String,
        full: QueueFull,
        retry_after: Duration,
    },
    /// The client did not send what the protocol needs within its deadline.
    #[error("{0}")]
    TooSlow(&'static str),
    /// Listen is stopping; the message says how to resume.
    #[error("{0}")]
    ShuttingDown(&'static str),
    /// A broken invariant inside listen; the message is safe to show.
    #[error("{0}")]
    Internal(&'static str),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl ApiError {
    pub(crate) fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        ApiError::Invalid {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// A full queue refused new work: RESOURCE_EXHAUSTED with `retry_after` as RetryInfo.
    pub(crate) fn queue_full(full: QueueFull, retry_after: Duration) -> Self {
        ApiError::QueueFull { full, retry_after }
    }

    /// A full queue refused a session's finish of conversation `id`.
    pub(crate) fn finish_refused(id: &str, full: QueueFull, retry_after: Duration) -> Self {
        ApiError::FinishRefused {
            id: id.to_string(),
            full,
            retry_after,
        }
    }

    /// The status code's name, as the `code` label of `listen_rejected_requests_total`.
    fn code_label(&self) -> &'static str {
        match self {
            ApiError::Invalid { .. } => "invalid_argument",
            ApiError::NotFound(_) => "not_found",
            ApiError::NotRetryable { .. } | ApiError::OutOfOrder { .. } => "failed_precondition",
            ApiError::Unauthenticated(_) => "unauthenticated",
            ApiError::PermissionDenied(_) => "permission_denied",
            ApiError::Exhausted(_)
            | ApiError::QueueFull { .. }
            | ApiError::FinishRefused { .. } => "resource_exhausted",
            ApiError::TooSlow(_) => "deadline_exceeded",
            ApiError::ShuttingDown(_) | ApiError::Store(StoreError::Unavailable(_)) => {
                "unavailable"
            }
            ApiError::Internal(_) | ApiError::Store(StoreError::Corrupt(_)) => "internal",
        }
    }
}

/// Logs and counts a refused call, then converts it. Every status listen returns passes here.
pub(crate) fn reject(error: ApiError) -> Status {
    match &error {
        ApiError::Store(StoreError::Unavailable(detail)) => {
            metrics::counter!("listen_store_errors_total", "kind" => "unavailable").increment(1);
            warn!(%detail, "store unavailable");
        }
        ApiError::Store(StoreError::Corrupt(detail)) => {
            metrics::counter!("listen_store_errors_total", "kind" => "corrupt").increment(1);
            error!(%detail, "stored data is corrupt");
        }
        ApiError::Internal(_) => error!(%error, "request failed inside listen"),
        ApiError::NotFound(_) | ApiError::ShuttingDown(_) => debug!(%error, "request refused"),
        _ => info!(%error, "rejected request"),
    }
    if !matches!(error, ApiError::Store(_)) {
        metrics::counter!("listen_rejected_requests_total", "code" => error.code_label())
            .increment(1);
    }
    error.into()
}

/// Pure: the status for each error. Callers go through [`reject`].
impl From<ApiError> for Status {
    fn from(error: ApiError) -> Status {
        let message = error.to_string();
        match error {
            ApiError::Invalid { .. } => Status::invalid_argument(message),
            ApiError::NotFound(_) => Status::not_found(message),
            ApiError::NotRetryable { .. } | ApiError::OutOfOrder { .. } => {
                Status::failed_precondition(message)
            }
            ApiError::Unauthenticated(_) => Status::unauthenticated(message),
            ApiError::PermissionDenied(_) => Status::permission_denied(message),
            ApiError::Exhausted(_) => Status::resource_exhausted(message),
            ApiError::QueueFull { retry_after, .. }
            | ApiError::FinishRefused { retry_after, .. } => Status::with_error_details(
                tonic::Code::ResourceExhausted,
                message,
                ErrorDetails::with_retry_info(Some(retry_after)),
            ),
            ApiError::TooSlow(_) => Status::deadline_exceeded(message),
            ApiError::ShuttingDown(_) => Status::unavailable(message),
            ApiError::Internal(_) => Status::internal(message),
            ApiError::Store(StoreError::Unavailable(_)) => {
                Status::unavailable("the conversation store is unavailable; retry later")
            }
            ApiError::Store(StoreError::Corrupt(_)) => {
                Status::internal("a stored conversation could not be read")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn each_error_has_its_code_and_a_message_without_internal_details() {
        let full = Status::from(ApiError::QueueFull {
            full: QueueFull::Total { limit: 5 },
            retry_after: Duration::from_secs(10),
        });
        assert_eq!(full.code(), Code::ResourceExhausted);
        assert_eq!(
            full.message(),
            "5 conversations are queued, listen's limit (--max-queued); nothing was stored, retry in 10s"
        );
        assert_eq!(
            full.get_details_retry_info().and_then(|r| r.retry_delay),
            Some(Duration::from_secs(10))
        );
        for (error, code, message) in [
            (
                ApiError::invalid("segments[1].text", "too long"),
                Code::InvalidArgument,
                "segments[1].text: too long",
            ),
            (
                ApiError::Unauthenticated("a bearer token is required".into()),
                Code::Unauthenticated,
                "authorization: a bearer token is required",
            ),
            (
                ApiError::OutOfOrder {
                    field: "start",
                    reason: "a session is started once; open a new stream",
                },
                Code::FailedPrecondition,
                "start: a session is started once; open a new stream",
            ),
            (
                ApiError::Store(StoreError::Unavailable(
                    "connection refused to 10.0.0.1".into(),
                )),
                Code::Unavailable,
                "the conversation store is unavailable; retry later",
            ),
            (
                ApiError::Store(StoreError::Corrupt("row abc: bad status".into())),
                Code::Internal,
                "a stored conversation could not be read",
            ),
        ] {
            let status = Status::from(error);
            assert_eq!((status.code(), status.message()), (code, message));
        }
    }
}
