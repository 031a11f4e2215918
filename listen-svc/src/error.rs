//! API errors and their gRPC statuses. Handlers return `Result<_, ApiError>` and use `?`.

use crate::store::StoreError;
use tonic::Status;
use tracing::{error, info, warn};

#[derive(Debug, thiserror::Error)]
pub(crate) enum ApiError {
    /// The request is malformed; the message names the field.
    #[error("{field}: {reason}")]
    Invalid { field: String, reason: String },
    #[error("conversation {0} not found")]
    NotFound(String),
    #[error("conversation {id} is {status}; only FAILED conversations can be retried")]
    NotRetryable { id: String, status: &'static str },
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
}

/// Each error is logged here, once, at the level its cause deserves; internal details stay
/// in the log and out of the status.
impl From<ApiError> for Status {
    fn from(error: ApiError) -> Status {
        match &error {
            ApiError::Invalid { .. } => {
                metrics::counter!("listen_rejected_requests_total", "code" => "invalid_argument")
                    .increment(1);
                info!(%error, "rejected invalid request");
                Status::invalid_argument(error.to_string())
            }
            ApiError::NotFound(_) => Status::not_found(error.to_string()),
            ApiError::NotRetryable { .. } => Status::failed_precondition(error.to_string()),
            ApiError::Store(StoreError::Unavailable(detail)) => {
                metrics::counter!("listen_store_errors_total", "kind" => "unavailable")
                    .increment(1);
                warn!(%detail, "store unavailable");
                Status::unavailable("the conversation store is unavailable; retry later")
            }
            ApiError::Store(StoreError::Corrupt(detail)) => {
                metrics::counter!("listen_store_errors_total", "kind" => "corrupt").increment(1);
                error!(%detail, "stored data is corrupt");
                Status::internal("a stored conversation could not be read")
            }
        }
    }
}
