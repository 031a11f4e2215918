//! Property tests (a fuzz suite run by `cargo test`): request validation and the stored
//! encodings, over arbitrary inputs.

use crate::store::{SegmentList, has_text};
use crate::validate::{Limits, validate_segments, validate_submit};
use proptest::prelude::*;
use prost::Message;
use shared::proto::listen::v1 as api;

const LIMITS: Limits = Limits {
    max_segments: 8,
    max_segment_bytes: 64,
    max_conversation_bytes: 1 << 20,
};

fn any_f64() -> impl Strategy<Value = f64> {
    prop_oneof![
        Just(f64::NAN),
        Just(f64::INFINITY),
        Just(f64::NEG_INFINITY),
        Just(-0.0),
        -10.0..1e6f64,
    ]
}

fn any_text() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        Just("   ".to_string()),
        "\\PC{0,80}",
        ".{0,20}"
    ]
}

prop_compose! {
    fn any_segment()(text in any_text(), speaker in ".{0,140}", start in any_f64(), end in any_f64(), is_user in any::<bool>()) -> api::Segment {
        api::Segment { text, speaker, start, end, is_user }
    }
}

prop_compose! {
    fn any_submit()(uid in prop_oneof![Just(String::new()), ".{0,140}"], key in ".{0,140}", language in ".{0,40}",
                    segments in prop::collection::vec(any_segment(), 0..12),
                    priority in -1i32..4) -> api::SubmitConversationRequest {
        api::SubmitConversationRequest { uid, segments, idempotency_key: key, language, priority }
    }
}

proptest! {
    /// Validation never panics; what it accepts meets every stated limit; what it rejects
    /// names one of the request's fields.
    #[test]
    fn submit_validation_accepts_only_what_the_limits_allow(request in any_submit()) {
        let original = request.clone();
        match validate_submit(request, LIMITS) {
            Ok(new) => {
                prop_assert!(!new.uid.trim().is_empty() && new.uid.len() <= 128);
                prop_assert!(!new.uid.chars().any(char::is_control));
                prop_assert!(new.segments.len() <= LIMITS.max_segments);
                for s in &new.segments {
                    prop_assert!(s.text.len() <= LIMITS.max_segment_bytes);
                    prop_assert!(s.start.is_finite() && s.start >= 0.0 && s.end.is_finite() && s.end >= s.start);
                }
                prop_assert_eq!(new.segments, original.segments, "accepted input is stored unchanged");
            }
            Err(crate::error::ApiError::Invalid { field, .. }) => {
                let known = ["uid", "idempotency_key", "language", "segments", "priority"];
                prop_assert!(known.iter().any(|k| field.starts_with(k)), "field {field}");
            }
            Err(other) => prop_assert!(false, "unexpected {other:?}"),
        }
    }

    /// Session batches: the running total is enforced across batches.
    #[test]
    fn segment_batches_never_exceed_the_conversation_limit(batch in prop::collection::vec(any_segment(), 0..12), already in 0usize..12) {
        if validate_segments("segments", &batch, LIMITS, already).is_ok() {
            prop_assert!(already + batch.len() <= LIMITS.max_segments);
        }
    }

    /// Stored segments decode to exactly what was encoded, and appending encodings appends
    /// lists (what live sessions rely on: `segments || new` in SQL).
    #[test]
    fn segment_encoding_round_trips_and_appends(a in prop::collection::vec(any_segment(), 0..6), b in prop::collection::vec(any_segment(), 0..6)) {
        let mut bytes = SegmentList { segments: a.clone() }.encode_to_vec();
        let decoded = SegmentList::decode(bytes.as_slice()).unwrap().segments;
        prop_assert!(same_segments(&decoded, &a));
        bytes.extend(SegmentList { segments: b.clone() }.encode_to_vec());
        let both = SegmentList::decode(bytes.as_slice()).unwrap().segments;
        let expected: Vec<_> = a.iter().chain(&b).cloned().collect();
        prop_assert!(same_segments(&both, &expected));
        prop_assert_eq!(has_text(&both), has_text(&a) || has_text(&b));
    }

    /// Arbitrary bytes in the store never panic the decoder.
    #[test]
    fn decoding_garbage_fails_cleanly(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let _ = SegmentList::decode(bytes.as_slice());
        let _ = api::Structured::decode(bytes.as_slice());
    }
}

/// Equality by value, with NaN equal to NaN. (Not by bits: proto3 does not encode a field
/// equal to its default, and -0.0 == 0.0, so -0.0 comes back as 0.0: the same number.)
fn same_segments(a: &[api::Segment], b: &[api::Segment]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(x, y)| {
            x.text == y.text
                && x.speaker == y.speaker
                && x.is_user == y.is_user
                && same_f64(x.start, y.start)
                && same_f64(x.end, y.end)
        })
}

fn same_f64(a: f64, b: f64) -> bool {
    a == b || (a.is_nan() && b.is_nan())
}
