//! The processing pipeline behind every job: structure, then discard or tell integrations.

use crate::structurer;
use crate::webhook::Webhooks;
use shared::proto::pusher::v1::{ProcessConversation, Processed, Structured};
use std::sync::Arc;
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

/// Turns a finished conversation into its outcome.
#[async_trait::async_trait]
pub(crate) trait Processor: Send + Sync + 'static {
    async fn process(&self, request: &ProcessConversation) -> Result<Processed, ProcessError>;
}

/// A structurer's answer.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Structure {
    pub structured: Structured,
    /// Empty or noise: the conversation ends DISCARDED.
    pub discard: bool,
}

/// The first step: title, overview, action items, category, and whether to discard.
#[async_trait::async_trait]
pub(crate) trait Structurer: Send + Sync + 'static {
    async fn structure(&self, request: &ProcessConversation) -> Result<Structure, ProcessError>;
}

/// The built-in deterministic structurer, optionally preceded by a simulated latency (to
/// stand in for an LLM call in demos and load tests).
pub(crate) struct Builtin {
    pub simulated_latency: Duration,
}

#[async_trait::async_trait]
impl Structurer for Builtin {
    async fn structure(&self, request: &ProcessConversation) -> Result<Structure, ProcessError> {
        if !self.simulated_latency.is_zero() {
            tokio::time::sleep(self.simulated_latency).await;
        }
        Ok(structurer::structure(&request.segments))
    }
}

/// structure -> discard, or deliver to webhooks. A webhook that fails never fails the
/// conversation: its result travels in the outcome.
pub(crate) struct Pipeline {
    pub structurer: Arc<dyn Structurer>,
    pub webhooks: Webhooks,
}

#[async_trait::async_trait]
impl Processor for Pipeline {
    async fn process(&self, request: &ProcessConversation) -> Result<Processed, ProcessError> {
        let Structure {
            structured,
            discard,
        } = self.structurer.structure(request).await?;
        if discard {
            return Ok(Processed {
                structured: Some(structured),
                discarded: true,
                deliveries: Vec::new(),
            });
        }
        let deliveries = self.webhooks.deliver(request, &structured).await;
        Ok(Processed {
            structured: Some(structured),
            discarded: false,
            deliveries,
        })
    }
}
