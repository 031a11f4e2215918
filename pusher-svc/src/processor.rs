//! The processing pipeline behind every job: structure, then discard or tell integrations.
//!
//! This module owns the step traits and their result types ([`Structurer`] answers a
//! [`Structure`]); the implementations (`structurer::Builtin`, `llm::Llm`) depend on it,
//! never the other way round.

use crate::webhook::Webhooks;
use shared::proto::pusher::v1::{ProcessConversation, Processed, Structured};
use std::sync::Arc;
use tracing::{Instrument, info_span};

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
        } = self
            .structurer
            .structure(request)
            .instrument(info_span!("structure"))
            .await?;
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
