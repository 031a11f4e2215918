//! Conversions between listen's stored types and the wire (`listen.v1`, `pusher.v1`). Pure;
//! a leaf that the handlers, sessions and the link all use.

use crate::store::{Completion, Conversation, Status};
use shared::proto::listen::v1 as api;
use shared::proto::pusher::v1 as pusher;

/// The wire name of a lifecycle status, as clients see it in messages.
pub(crate) fn status_name(status: Status) -> &'static str {
    match status {
        Status::InProgress => "IN_PROGRESS",
        Status::Processing => "PROCESSING",
        Status::Completed => "COMPLETED",
        Status::Failed => "FAILED",
        Status::Discarded => "DISCARDED",
    }
}

/// Milliseconds since the Unix epoch as a protobuf Timestamp.
pub(crate) fn timestamp(ms: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: (ms.rem_euclid(1000) * 1_000_000) as i32,
    }
}

/// How much of a conversation a read returns (`listen.v1.ConversationView`, resolved).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum View {
    /// Everything but the segments.
    Basic,
    Full,
}

/// A stored conversation as the API returns it, in `view`.
pub(crate) fn to_proto_in(view: View, c: Conversation) -> api::Conversation {
    match view {
        View::Full => to_proto(c),
        View::Basic => to_proto(Conversation {
            segments: Vec::new(),
            ..c
        }),
    }
}

/// A stored conversation as the API returns it, whole.
pub(crate) fn to_proto(c: Conversation) -> api::Conversation {
    api::Conversation {
        segment_count: c.segment_count,
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

/// Pusher's processed outcome in listen's terms.
pub(crate) fn completion_of(processed: pusher::Processed) -> Completion {
    let s = processed.structured.unwrap_or_default();
    Completion {
        structured: api::Structured {
            title: s.title,
            overview: s.overview,
            action_items: s.action_items,
            category: s.category,
        },
        discarded: processed.discarded,
        deliveries: processed
            .deliveries
            .into_iter()
            .map(|d| api::WebhookDelivery {
                url: d.url,
                delivered: d.delivered,
                attempts: d.attempts,
                status_code: d.status_code,
                error: d.error,
            })
            .collect(),
    }
}

/// Live segments in pusher's terms, for realtime forwarding.
pub(crate) fn transcript_batch(
    session_id: &str,
    uid: &str,
    conversation_id: &str,
    segments: &[api::Segment],
) -> pusher::TranscriptBatch {
    pusher::TranscriptBatch {
        session_id: session_id.to_string(),
        uid: uid.to_string(),
        conversation_id: conversation_id.to_string(),
        segments: segments
            .iter()
            .map(|s| pusher::Segment {
                text: s.text.clone(),
                speaker: s.speaker.clone(),
                start: s.start,
                end: s.end,
                is_user: s.is_user,
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
