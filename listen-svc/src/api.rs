//! `listen.v1.Listen`: request validation, store calls, and conversions to the wire types.
//!
//! Submit commits to the store and wakes the link; it never waits on pusher.

use crate::auth;
use crate::error::ApiError;
use crate::link::LinkHandle;
use crate::session;
use crate::store::{
    Conversation, ConversationStore, ListFilter, NewConversation, RetryOutcome, Status, now_ms,
};
use shared::proto::listen::v1 as api;
use shared::proto::listen::v1::listen_server::Listen;
use std::sync::Arc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Streaming};

const MAX_ID_BYTES: usize = 128;
const MAX_LANGUAGE_BYTES: usize = 35;
const DEFAULT_PAGE_SIZE: u32 = 50;
const MAX_PAGE_SIZE: u32 = 500;

/// Input limits, from the command line.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    pub max_segments: usize,
    pub max_segment_bytes: usize,
}

pub(crate) struct ListenService {
    pub store: Arc<dyn ConversationStore>,
    pub link: LinkHandle,
    pub limits: Limits,
    pub pusher_url: String,
    pub max_in_flight: usize,
    pub sessions: session::Context,
}

type Reply<T> = Result<Response<T>, tonic::Status>;

#[tonic::async_trait]
impl Listen for ListenService {
    type SessionStream = ReceiverStream<Result<api::SessionEvent, tonic::Status>>;

    async fn session(
        &self,
        request: Request<Streaming<api::SessionRequest>>,
    ) -> Reply<Self::SessionStream> {
        let caller = auth::caller(&request)?;
        let slot = self.sessions.sessions.enter()?;
        let (tx, rx) = tokio::sync::mpsc::channel(session::EVENT_BUFFER);
        tokio::spawn(session::run(
            self.sessions.clone(),
            caller,
            request.into_inner(),
            tx,
            slot,
        ));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn submit_conversation(
        &self,
        request: Request<api::SubmitConversationRequest>,
    ) -> Reply<api::SubmitConversationResponse> {
        let caller = auth::caller(&request)?;
        let request = request.into_inner();
        let new = validate_submit(request, self.limits)?;
        caller.require("uid", &new.uid)?;
        let submitted = self.store.submit(new).await.map_err(ApiError::from)?;
        if submitted.created {
            let status = if submitted.status == Status::Processing {
                "processing"
            } else {
                "discarded"
            };
            metrics::counter!("listen_conversations_total", "status" => status).increment(1);
        }
        if submitted.created && submitted.status == Status::Processing {
            self.link.wake();
        }
        Ok(Response::new(api::SubmitConversationResponse {
            conversation_id: submitted.id,
            status: submitted.status.to_proto() as i32,
        }))
    }

    async fn get_conversation(
        &self,
        request: Request<api::GetConversationRequest>,
    ) -> Reply<api::Conversation> {
        let caller = auth::caller(&request)?;
        let id = validate_id("conversation_id", &request.into_inner().conversation_id)?;
        let conversation = self
            .store
            .get(&id)
            .await
            .map_err(ApiError::from)?
            .ok_or(ApiError::NotFound(id))?;
        caller.require("conversation_id", &conversation.uid)?;
        Ok(Response::new(to_proto(conversation)))
    }

    async fn list_conversations(
        &self,
        request: Request<api::ListConversationsRequest>,
    ) -> Reply<api::ListConversationsResponse> {
        let caller = auth::caller(&request)?;
        let request = request.into_inner();
        let uid = match request.uid.as_str() {
            // A user lists its own conversations; services and open mode may list everyone's.
            "" => caller.own_uid().map(String::from),
            uid => {
                let uid = validate_text("uid", uid, MAX_ID_BYTES)?.to_string();
                caller.require("uid", &uid)?;
                Some(uid)
            }
        };
        let status = match api::ConversationStatus::try_from(request.status) {
            Ok(status) => Status::from_proto(status),
            Err(_) => {
                return Err(ApiError::invalid(
                    "status",
                    format!("unknown value {}", request.status),
                )
                .into());
            }
        };
        let before_id = match request.page_token.as_str() {
            "" => None,
            token => Some(validate_id("page_token", token)?),
        };
        let page_size = match request.page_size {
            0 => DEFAULT_PAGE_SIZE,
            n => n.min(MAX_PAGE_SIZE),
        } as usize;
        let mut conversations = self
            .store
            .list(ListFilter {
                uid,
                status,
                before_id,
                limit: page_size + 1,
            })
            .await
            .map_err(ApiError::from)?;
        let next_page_token = if conversations.len() > page_size {
            conversations.truncate(page_size);
            conversations
                .last()
                .map(|c| c.id.clone())
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(api::ListConversationsResponse {
            conversations: conversations.into_iter().map(to_proto).collect(),
            next_page_token,
        }))
    }

    async fn retry_conversation(
        &self,
        request: Request<api::RetryConversationRequest>,
    ) -> Reply<api::Conversation> {
        let caller = auth::caller(&request)?;
        let id = validate_id("conversation_id", &request.into_inner().conversation_id)?;
        if caller.own_uid().is_some() {
            let owner = self
                .store
                .get(&id)
                .await
                .map_err(ApiError::from)?
                .ok_or_else(|| ApiError::NotFound(id.clone()))?;
            caller.require("conversation_id", &owner.uid)?;
        }
        match self.store.retry(&id).await.map_err(ApiError::from)? {
            RetryOutcome::Retried(conversation) => {
                self.link.wake();
                Ok(Response::new(to_proto(*conversation)))
            }
            RetryOutcome::NotFailed(status) => Err(ApiError::NotRetryable {
                id,
                status: status_name(status),
            }
            .into()),
            RetryOutcome::NotFound => Err(ApiError::NotFound(id).into()),
        }
    }

    async fn get_link_status(
        &self,
        request: Request<api::GetLinkStatusRequest>,
    ) -> Reply<api::LinkStatus> {
        if let Some(uid) = auth::caller(&request)?.own_uid() {
            return Err(tonic::Status::permission_denied(format!(
                "the link status is for services (token scope --auth-service-scope); {uid:?} is a user"
            )));
        }
        let snapshot = self.link.snapshot();
        // The link's own state is reported even when the store cannot be counted.
        let (queued, last_error) = match self.store.count_processing().await {
            Ok(processing) => (
                processing.saturating_sub(snapshot.pending as u64),
                snapshot.last_error,
            ),
            Err(error) => (0, format!("cannot count queued work: {error}")),
        };
        Ok(Response::new(api::LinkStatus {
            state: snapshot.state as i32,
            pending: snapshot.pending as u32,
            queued,
            reconnects: snapshot.reconnects,
            last_error,
            consecutive_failures: snapshot.consecutive_failures,
            max_in_flight: self.max_in_flight as u32,
            pusher_url: self.pusher_url.clone(),
            acks_ignored: snapshot.acks_ignored,
            transcripts_dropped: snapshot.transcripts_dropped,
            endpoints: snapshot
                .endpoints
                .into_iter()
                .map(|e| api::EndpointStatus {
                    address: e.address,
                    state: e.state as i32,
                    pending: e.pending as u32,
                    reconnects: e.reconnects,
                    consecutive_failures: e.consecutive_failures,
                    last_error: e.last_error,
                    draining: e.draining,
                    retiring: e.retiring,
                    pusher_id: e.pusher_id,
                })
                .collect(),
        }))
    }
}

#[cfg(test)]
pub(crate) fn validate_submit_for_fuzz(
    request: api::SubmitConversationRequest,
    limits: Limits,
) -> Result<NewConversation, ApiError> {
    validate_submit(request, limits)
}

fn validate_submit(
    request: api::SubmitConversationRequest,
    limits: Limits,
) -> Result<NewConversation, ApiError> {
    let uid = validate_text("uid", &request.uid, MAX_ID_BYTES)?.to_string();
    let idempotency_key = match request.idempotency_key.as_str() {
        "" => None,
        key => Some(validate_text("idempotency_key", key, MAX_ID_BYTES)?.to_string()),
    };
    if request.language.len() > MAX_LANGUAGE_BYTES {
        return Err(ApiError::invalid(
            "language",
            format!("longer than {MAX_LANGUAGE_BYTES} bytes"),
        ));
    }
    validate_segments("segments", &request.segments, limits, 0)?;
    let has_text = request.segments.iter().any(|s| !s.text.trim().is_empty());
    Ok(NewConversation {
        id: uuid::Uuid::now_v7().to_string(),
        uid,
        idempotency_key,
        language: request.language,
        segments: request.segments,
        status: if has_text {
            Status::Processing
        } else {
            Status::Discarded
        },
        now_ms: now_ms(),
    })
}

/// Checks a batch of segments joining `already` stored ones. Field names start with `field`
/// (`segments[3].text`).
pub(crate) fn validate_segments(
    field: &str,
    segments: &[api::Segment],
    limits: Limits,
    already: usize,
) -> Result<(), ApiError> {
    let total = already + segments.len();
    if total > limits.max_segments {
        let reason = if already == 0 {
            format!(
                "{} segments exceeds the limit of {}",
                segments.len(),
                limits.max_segments
            )
        } else {
            format!(
                "{} more segments would make {total}, over the limit of {} per conversation; send finish first",
                segments.len(),
                limits.max_segments
            )
        };
        return Err(ApiError::invalid(field, reason));
    }
    for (i, segment) in segments.iter().enumerate() {
        if segment.text.len() > limits.max_segment_bytes {
            return Err(ApiError::invalid(
                format!("{field}[{i}].text"),
                format!(
                    "{} bytes exceeds the limit of {}",
                    segment.text.len(),
                    limits.max_segment_bytes
                ),
            ));
        }
        if segment.speaker.len() > MAX_ID_BYTES {
            return Err(ApiError::invalid(
                format!("{field}[{i}].speaker"),
                format!("longer than {MAX_ID_BYTES} bytes"),
            ));
        }
        if !segment.start.is_finite() || segment.start < 0.0 {
            return Err(ApiError::invalid(
                format!("{field}[{i}].start"),
                "must be a finite number of seconds >= 0",
            ));
        }
        if !segment.end.is_finite() || segment.end < segment.start {
            return Err(ApiError::invalid(
                format!("{field}[{i}].end"),
                "must be a finite number of seconds >= start",
            ));
        }
    }
    Ok(())
}

/// Non-empty, bounded, no control characters.
pub(crate) fn validate_text<'a>(
    field: &str,
    value: &'a str,
    max: usize,
) -> Result<&'a str, ApiError> {
    if value.trim().is_empty() {
        return Err(ApiError::invalid(field, "must not be empty"));
    }
    if value.len() > max {
        return Err(ApiError::invalid(field, format!("longer than {max} bytes")));
    }
    if value.chars().any(char::is_control) {
        return Err(ApiError::invalid(
            field,
            "must not contain control characters",
        ));
    }
    Ok(value)
}

/// Conversation ids are UUIDs; anything else cannot exist.
fn validate_id(field: &str, value: &str) -> Result<String, ApiError> {
    if value.is_empty() {
        return Err(ApiError::invalid(field, "must not be empty"));
    }
    uuid::Uuid::parse_str(value)
        .map(|id| id.to_string())
        .map_err(|_| ApiError::invalid(field, format!("{value:?} is not a conversation id")))
}

fn status_name(status: Status) -> &'static str {
    match status {
        Status::InProgress => "IN_PROGRESS",
        Status::Processing => "PROCESSING",
        Status::Completed => "COMPLETED",
        Status::Failed => "FAILED",
        Status::Discarded => "DISCARDED",
    }
}

pub(crate) fn timestamp(ms: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: (ms.rem_euclid(1000) * 1_000_000) as i32,
    }
}

pub(crate) fn to_proto(c: Conversation) -> api::Conversation {
    api::Conversation {
        id: c.id,
        uid: c.uid,
        status: c.status.to_proto() as i32,
        segments: c.segments,
        structured: c.structured,
        attempts: c.attempts,
        last_error: c.last_error.unwrap_or_default(),
        created_at: Some(timestamp(c.created_at_ms)),
        finished_at: c.finished_at_ms.map(timestamp),
        completed_at: c.completed_at_ms.map(timestamp),
        language: c.language,
        deliveries: c.deliveries,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        max_segments: 3,
        max_segment_bytes: 10,
    };

    fn submit(uid: &str, texts: &[&str]) -> api::SubmitConversationRequest {
        api::SubmitConversationRequest {
            uid: uid.into(),
            segments: texts
                .iter()
                .map(|t| api::Segment {
                    text: t.to_string(),
                    end: 1.0,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    fn invalid_field(result: Result<NewConversation, ApiError>) -> String {
        match result {
            Err(ApiError::Invalid { field, .. }) => field,
            other => panic!("expected invalid, got {other:?}"),
        }
    }

    #[test]
    fn names_the_offending_field() {
        assert_eq!(
            invalid_field(validate_submit(submit("", &["a"]), LIMITS)),
            "uid"
        );
        assert_eq!(
            invalid_field(validate_submit(submit("u\u{7}", &["a"]), LIMITS)),
            "uid"
        );
        assert_eq!(
            invalid_field(validate_submit(submit("u", &["a", "b", "c", "d"]), LIMITS)),
            "segments"
        );
        assert_eq!(
            invalid_field(validate_submit(
                submit("u", &["ok", "this is too long"]),
                LIMITS
            )),
            "segments[1].text"
        );
        let mut backwards = submit("u", &["a"]);
        backwards.segments[0].start = 5.0;
        assert_eq!(
            invalid_field(validate_submit(backwards, LIMITS)),
            "segments[0].end"
        );
        let mut nan = submit("u", &["a"]);
        nan.segments[0].start = f64::NAN;
        assert_eq!(
            invalid_field(validate_submit(nan, LIMITS)),
            "segments[0].start"
        );
        let mut key = submit("u", &["a"]);
        key.idempotency_key = "k".repeat(129);
        assert_eq!(
            invalid_field(validate_submit(key, LIMITS)),
            "idempotency_key"
        );
    }

    #[test]
    fn text_decides_between_processing_and_discarded() {
        assert_eq!(
            validate_submit(submit("u", &["hi"]), LIMITS)
                .unwrap()
                .status,
            Status::Processing
        );
        assert_eq!(
            validate_submit(submit("u", &[" ", ""]), LIMITS)
                .unwrap()
                .status,
            Status::Discarded
        );
        assert_eq!(
            validate_submit(submit("u", &[]), LIMITS).unwrap().status,
            Status::Discarded
        );
    }

    #[test]
    fn ids_must_be_uuids() {
        assert!(validate_id("conversation_id", "not-an-id").is_err());
        assert!(validate_id("conversation_id", "").is_err());
        let id = uuid::Uuid::now_v7().to_string();
        assert_eq!(validate_id("conversation_id", &id).unwrap(), id);
    }

    #[test]
    fn timestamps_split_milliseconds() {
        assert_eq!(
            timestamp(1_500),
            prost_types::Timestamp {
                seconds: 1,
                nanos: 500_000_000
            }
        );
        assert_eq!(
            timestamp(-1),
            prost_types::Timestamp {
                seconds: -1,
                nanos: 999_000_000
            }
        );
    }
}
