//! The processing step behind every job.

use crate::structurer;
use shared::proto::pusher::v1::{ProcessConversation, Structured};
use std::time::Duration;

/// Why a conversation could not be processed, and whether trying again may help.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub(crate) struct ProcessError {
    pub reason: String,
    pub retryable: bool,
}

impl ProcessError {
    pub(crate) fn retryable(reason: impl Into<String>) -> Self {
        ProcessError {
            reason: reason.into(),
            retryable: true,
        }
    }
}

/// Turns a finished conversation into its structured result.
#[async_trait::async_trait]
pub(crate) trait Processor: Send + Sync + 'static {
    async fn process(&self, request: &ProcessConversation) -> Result<Structured, ProcessError>;
}

/// The built-in deterministic structurer, optionally preceded by a simulated latency (to
/// stand in for an LLM call in demos and load tests).
pub(crate) struct Builtin {
    pub simulated_latency: Duration,
}

#[async_trait::async_trait]
impl Processor for Builtin {
    async fn process(&self, request: &ProcessConversation) -> Result<Structured, ProcessError> {
        if !self.simulated_latency.is_zero() {
            tokio::time::sleep(self.simulated_latency).await;
        }
        Ok(structurer::structure(&request.segments))
    }
}
