//! Request validation: the limits every request is held to, and checks that name the
//! offending field (`segments[3].text`) in an INVALID_ARGUMENT status. Pure; used by the unary
//! handlers, live sessions and the property tests.

use crate::error::ApiError;
use crate::store::{NewConversation, Priority, Status, now_ms};
use crate::wire::View;
use shared::proto::listen::v1 as api;

/// Bytes in a uid, idempotency key, speaker or other identifier.
pub(crate) const MAX_ID_BYTES: usize = 128;
/// Bytes in a language tag (BCP 47 allows up to 35 in practice).
pub(crate) const MAX_LANGUAGE_BYTES: usize = 35;

/// Input limits, from the command line.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    pub max_segments: usize,
    pub max_segment_bytes: usize,
    /// Encoded bytes of one conversation's segments: what the link can still send to pusher
    /// in one message (--max-message-bytes less room for the other fields).
    pub max_conversation_bytes: usize,
}

/// Room left in a message to pusher for everything but the segments (ids, uid, language,
/// timestamps: a few hundred bytes).
pub(crate) const PROCESS_OVERHEAD_BYTES: usize = 4096;

/// A Submit's fields, checked, as the row to store.
pub(crate) fn validate_submit(
    request: api::SubmitConversationRequest,
    limits: Limits,
) -> Result<NewConversation, ApiError> {
    let uid = validate_text("uid", &request.uid, MAX_ID_BYTES)?.to_string();
    let idempotency_key = match request.idempotency_key.as_str() {
        "" => None,
        key => Some(validate_text("idempotency_key", key, MAX_ID_BYTES)?.to_string()),
    };
    validate_language("language", &request.language)?;
    validate_segments("segments", &request.segments, limits, 0)?;
    validate_conversation_bytes("segments", &request.segments, limits, 0)?;
    let priority = validate_priority("priority", request.priority)?;
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
        priority,
        now_ms: now_ms(),
        trace: Default::default(),
        lease: None,
    })
}

/// A request's `Priority` (unspecified is interactive).
pub(crate) fn validate_priority(field: &str, value: i32) -> Result<Priority, ApiError> {
    match api::Priority::try_from(value) {
        Ok(api::Priority::Unspecified | api::Priority::Interactive) => Ok(Priority::Interactive),
        Ok(api::Priority::Bulk) => Ok(Priority::Bulk),
        Err(_) => Err(ApiError::invalid(
            field,
            format!(
                "{value} is not a priority; use PRIORITY_INTERACTIVE (1, the default) or PRIORITY_BULK (2)"
            ),
        )),
    }
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
pub(crate) fn validate_id(field: &str, value: &str) -> Result<String, ApiError> {
    if value.is_empty() {
        return Err(ApiError::invalid(field, "must not be empty"));
    }
    uuid::Uuid::parse_str(value)
        .map(|id| id.to_string())
        .map_err(|_| ApiError::invalid(field, format!("{value:?} is not a conversation id")))
}

/// Checks that `segments` joining `already` stored bytes of segments keep the conversation
/// small enough to send to pusher in one message. Returns the new total.
pub(crate) fn validate_conversation_bytes(
    field: &str,
    segments: &[api::Segment],
    limits: Limits,
    already: usize,
) -> Result<usize, ApiError> {
    let total = already + crate::store::encode_segments(segments).len();
    if total > limits.max_conversation_bytes {
        return Err(ApiError::invalid(
            field,
            format!(
                "the conversation would be {total} bytes of segments, over the {} that can be \
                 sent for processing (--max-message-bytes); send finish first",
                limits.max_conversation_bytes
            ),
        ));
    }
    Ok(total)
}

/// A `ConversationView`; UNSPECIFIED means the method's `default`.
pub(crate) fn validate_view(field: &str, value: i32, default: View) -> Result<View, ApiError> {
    match api::ConversationView::try_from(value) {
        Ok(api::ConversationView::Unspecified) => Ok(default),
        Ok(api::ConversationView::Basic) => Ok(View::Basic),
        Ok(api::ConversationView::Full) => Ok(View::Full),
        Err(_) => Err(ApiError::invalid(
            field,
            format!(
                "{value} is not a view; use CONVERSATION_VIEW_BASIC (1) or CONVERSATION_VIEW_FULL (2)"
            ),
        )),
    }
}

/// A BCP-47 language tag's length (the tag itself is not checked); empty is allowed.
pub(crate) fn validate_language(field: &str, value: &str) -> Result<(), ApiError> {
    if value.len() > MAX_LANGUAGE_BYTES {
        return Err(ApiError::invalid(
            field,
            format!("longer than {MAX_LANGUAGE_BYTES} bytes"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        max_segments: 3,
        max_segment_bytes: 10,
        max_conversation_bytes: 40,
    };

    #[test]
    fn a_conversation_is_bounded_by_what_can_be_sent() {
        let segment = |text: &str| api::Segment {
            text: text.into(),
            ..Default::default()
        };
        // Each 10-byte segment encodes to 14 bytes in the stored list.
        let total =
            validate_conversation_bytes("segments", &[segment("0123456789")], LIMITS, 14).unwrap();
        assert_eq!(total, 28);
        let refused = validate_conversation_bytes("segments", &[segment("0123456789")], LIMITS, 28)
            .unwrap_err()
            .to_string();
        assert!(
            refused.starts_with("segments: the conversation would be 42 bytes"),
            "{refused}"
        );
    }

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
        let mut priority = submit("u", &["a"]);
        priority.priority = 7;
        assert_eq!(invalid_field(validate_submit(priority, LIMITS)), "priority");
    }

    #[test]
    fn priority_defaults_to_interactive() {
        let mut request = submit("u", &["a"]);
        assert_eq!(
            validate_submit(request.clone(), LIMITS).unwrap().priority,
            Priority::Interactive
        );
        request.priority = api::Priority::Bulk as i32;
        assert_eq!(
            validate_submit(request, LIMITS).unwrap().priority,
            Priority::Bulk
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
}
