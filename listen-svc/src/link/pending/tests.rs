use super::*;
use shared::backoff::Backoff;
use shared::proto::pusher::v1::{Failed, Processed, Structured};

const ACK_TIMEOUT: Duration = Duration::from_secs(120);

/// No jitter, so resend times are exact: 1 s, 2 s, 4 s, ...
const RETRY: Backoff = Backoff {
    initial: Duration::from_secs(1),
    multiplier: 2.0,
    jitter: 0.0,
    max: Duration::from_secs(30),
};

fn pending(capacity: usize, max_attempts: u32) -> Pending {
    Pending::new(
        capacity,
        Attempts {
            max_attempts,
            ack_timeout: ACK_TIMEOUT,
            retry_backoff: RETRY,
        },
    )
}

fn claimed(id: &str) -> Claimed {
    Claimed {
        id: id.into(),
        uid: "u".into(),
        language: "en".into(),
        segments: vec![shared::proto::listen::v1::Segment {
            text: "hi".into(),
            ..Default::default()
        }],
        finished_at_ms: Some(1_700_000_000_123),
        generation: 1,
        attempts: 0,
        priority: crate::store::Priority::Interactive,
        waited_ms: None,
        trace: Default::default(),
    }
}

fn processed(id: &str, attempt: u32) -> Ack {
    Ack {
        conversation_id: id.into(),
        attempt,
        outcome: Some(ack::Outcome::Processed(Processed {
            structured: Some(Structured {
                title: "T".into(),
                ..Default::default()
            }),
            ..Default::default()
        })),
    }
}

fn failed(id: &str, attempt: u32, retryable: bool) -> Ack {
    Ack {
        conversation_id: id.into(),
        attempt,
        outcome: Some(ack::Outcome::Failed(Failed {
            reason: "boom".into(),
            retryable,
        })),
    }
}

/// Sends everything due, returning the attempts put on the wire.
fn send_due(p: &mut Pending, now: Instant) -> Vec<(String, u32)> {
    let mut due = p.due(now);
    due.sort();
    due.into_iter()
        .map(|id| {
            let r = p.mark_sent(&id, 1, now).unwrap();
            (id, r.attempt)
        })
        .collect()
}

#[test]
fn is_bounded_and_never_evicts() {
    let now = Instant::now();
    let mut p = pending(2, 5);
    assert!(p.insert(claimed("a"), now));
    assert!(p.insert(claimed("b"), now));
    assert_eq!(p.free_slots(), 0);
    assert!(!p.insert(claimed("c"), now), "full: refused, not evicted");
    assert_eq!(p.len(), 2);
    // Re-claiming a pending id updates its generation without taking a slot.
    assert!(p.insert(
        Claimed {
            generation: 9,
            ..claimed("a")
        },
        now
    ));
    assert_eq!(p.get("a").unwrap().generation, 9);
}

#[test]
fn request_carries_the_conversation_and_a_rising_attempt() {
    let now = Instant::now();
    let mut p = pending(4, 5);
    p.insert(claimed("a"), now);
    let first = p.mark_sent("a", 1, now).unwrap();
    assert_eq!(
        (
            first.conversation_id.as_str(),
            first.uid.as_str(),
            first.attempt
        ),
        ("a", "u", 1)
    );
    assert_eq!(first.segments[0].text, "hi");
    assert_eq!(first.finished_at.unwrap().seconds, 1_700_000_000);
    assert_eq!(first.finished_at.unwrap().nanos, 123_000_000);
    assert_eq!(p.mark_sent("a", 1, now).unwrap().attempt, 2);
}

#[test]
fn processed_ack_completes_with_the_result() {
    let now = Instant::now();
    let mut p = pending(4, 5);
    p.insert(claimed("a"), now);
    assert_eq!(send_due(&mut p, now), vec![("a".to_string(), 1)]);
    let AckAction::Complete {
        generation,
        processed: outcome,
        attempts,
    } = p.ack(processed("a", 1), now)
    else {
        panic!()
    };
    let title = outcome.structured.unwrap().title;
    assert_eq!((generation, title.as_str(), attempts), (1, "T", 1));
    assert_eq!(
        p.ack(processed("a", 1), now),
        AckAction::Ignore(Ignored::Duplicate)
    );
    p.remove("a");
    assert_eq!(
        p.ack(processed("a", 1), now),
        AckAction::Ignore(Ignored::Unknown)
    );
}

#[test]
fn expired_acks_are_resent_with_backoff_then_fail_after_max_attempts() {
    let t0 = Instant::now();
    let mut p = pending(4, 3);
    p.insert(claimed("a"), t0);
    let mut now = t0;
    let mut sends = send_due(&mut p, now);
    for expected_backoff in [1, 2] {
        now += ACK_TIMEOUT;
        assert!(p.expire(now).is_empty());
        assert_eq!(
            p.next_timer(true),
            Some(now + Duration::from_secs(expected_backoff))
        );
        assert!(p.due(now).is_empty(), "waits out the backoff");
        now += Duration::from_secs(expected_backoff);
        sends.extend(send_due(&mut p, now));
    }
    assert_eq!(sends.iter().map(|s| s.1).collect::<Vec<_>>(), vec![1, 2, 3]);
    now += ACK_TIMEOUT;
    let failed = p.expire(now);
    assert_eq!(failed.len(), 1);
    let AckAction::Fail {
        reason, attempts, ..
    } = &failed[0].1
    else {
        panic!()
    };
    assert_eq!(*attempts, 3);
    assert!(
        reason.contains("no ack") && reason.contains("3 attempts"),
        "{reason}"
    );
}

#[test]
fn progress_extends_the_deadline_so_nothing_is_resent() {
    let t0 = Instant::now();
    let mut p = pending(4, 1);
    p.insert(claimed("a"), t0);
    send_due(&mut p, t0);
    let mut now = t0;
    for _ in 0..10 {
        now += Duration::from_secs(100);
        assert!(p.progress("a", 1, now));
        assert!(p.expire(now).is_empty());
        assert!(p.due(now).is_empty());
    }
    assert_eq!(
        p.get("a").unwrap().attempt,
        1,
        "a 1000 s job with progress is sent once"
    );
    assert!(
        !p.progress("a", 7, now),
        "progress for another attempt is ignored"
    );
    assert!(matches!(
        p.ack(processed("a", 1), now),
        AckAction::Complete { .. }
    ));
}

#[test]
fn busy_is_not_an_attempt() {
    let t0 = Instant::now();
    let mut p = pending(4, 2);
    p.insert(claimed("a"), t0);
    let mut now = t0;
    for _ in 0..20 {
        let (_, attempt) = send_due(&mut p, now)[0].clone();
        assert!(p.busy("a", attempt, Duration::from_millis(500), now));
        assert_eq!(p.next_timer(true), Some(now + Duration::from_millis(500)));
        now += Duration::from_millis(500);
    }
    assert_eq!(p.get("a").unwrap().budget_used, 0);
    // Still the full budget of 2: one retryable failure is re-sent, the second gives up.
    let (_, attempt) = send_due(&mut p, now)[0].clone();
    assert!(matches!(
        p.ack(failed("a", attempt, true), now),
        AckAction::Resend { .. }
    ));
    now += Duration::from_secs(1);
    let (_, attempt) = send_due(&mut p, now)[0].clone();
    let AckAction::Fail { reason, .. } = p.ack(failed("a", attempt, true), now) else {
        panic!()
    };
    assert_eq!(reason, "boom (gave up after 2 attempts)");
}

#[test]
fn permanent_failure_fails_at_once() {
    let now = Instant::now();
    let mut p = pending(4, 5);
    p.insert(claimed("a"), now);
    send_due(&mut p, now);
    assert_eq!(
        p.ack(failed("a", 1, false), now),
        AckAction::Fail {
            generation: 1,
            reason: "boom".into(),
            attempts: 1
        }
    );
}

#[test]
fn stale_failures_are_ignored_but_any_processed_result_is_the_result() {
    let t0 = Instant::now();
    let mut p = pending(4, 5);
    p.insert(claimed("a"), t0);
    send_due(&mut p, t0);
    let now = t0 + ACK_TIMEOUT;
    p.expire(now);
    send_due(&mut p, now + Duration::from_secs(1)); // attempt 2 in flight
    assert_eq!(
        p.ack(failed("a", 1, false), now),
        AckAction::Ignore(Ignored::Stale)
    );
    assert_eq!(
        p.ack(processed("a", 3), now),
        AckAction::Ignore(Ignored::Stale),
        "from the future"
    );
    assert!(
        matches!(p.get("a").unwrap().state, EntryState::InFlight { .. }),
        "untouched"
    );
    assert!(matches!(
        p.ack(processed("a", 1), now),
        AckAction::Complete { attempts: 2, .. }
    ));
}

#[test]
fn replay_resends_everything_with_a_fresh_budget() {
    let t0 = Instant::now();
    let mut p = pending(4, 3);
    p.insert(claimed("a"), t0);
    p.insert(claimed("b"), t0);
    let mut now = t0;
    // Spend two of three attempts on the first stream.
    send_due(&mut p, now);
    for _ in 0..1 {
        now += ACK_TIMEOUT;
        p.expire(now);
        now += Duration::from_secs(5);
        send_due(&mut p, now);
    }
    assert_eq!(p.get("a").unwrap().budget_used, 2);
    // The stream drops; a new one comes up: all due now, budget reset.
    now += Duration::from_secs(1);
    assert_eq!(p.replay(now), 2);
    assert_eq!(p.due(now).len(), 2);
    // Three more sends are allowed before giving up.
    for _ in 0..3 {
        assert_eq!(send_due(&mut p, now).len(), 2);
        now += ACK_TIMEOUT;
        let failed = p.expire(now);
        if p.get("a").unwrap().budget_used < 3 {
            assert!(failed.is_empty());
        }
        now += Duration::from_secs(10);
    }
    assert_eq!(
        p.get("a").unwrap().attempt,
        5,
        "wire attempts keep rising across streams"
    );
    assert!(matches!(p.get("a").unwrap().state, EntryState::Settling));
}

#[test]
fn settling_entries_are_not_replayed_and_a_failed_write_is_retried() {
    let now = Instant::now();
    let mut p = pending(4, 5);
    p.insert(claimed("a"), now);
    send_due(&mut p, now);
    p.ack(processed("a", 1), now);
    assert_eq!(p.replay(now), 0);
    assert_eq!(p.next_timer(true), None);
    p.unsettle("a", now + Duration::from_secs(1));
    assert_eq!(p.due(now + Duration::from_secs(1)), vec!["a".to_string()]);
}

#[test]
fn a_full_stream_buffer_does_not_spend_budget() {
    let now = Instant::now();
    let mut p = pending(4, 1);
    p.insert(claimed("a"), now);
    for _ in 0..5 {
        p.mark_sent("a", 1, now);
        p.unsend("a", now);
    }
    assert_eq!(p.get("a").unwrap().budget_used, 0);
}

/// The link's timer loop on tokio's paused clock: sleep until `next_timer`, expire, send
/// what is due. A request that is never acked is sent `max_attempts` times at the expected
/// moments, then failed when the last deadline passes.
#[tokio::test(start_paused = true)]
async fn resend_schedule_follows_the_paused_clock() {
    let start = Instant::now();
    let mut p = pending(4, 3);
    p.insert(claimed("silent"), start);
    let mut sends = Vec::new();
    let failed_at = loop {
        let now = Instant::now();
        sends.extend(
            send_due(&mut p, now)
                .into_iter()
                .map(|(_, attempt)| (attempt, now - start)),
        );
        if !p.expire(now).is_empty() {
            break now - start;
        }
        tokio::time::sleep_until(p.next_timer(true).expect("a timer while unsettled")).await;
    };
    // Sent at 0; 120 s ack deadline + 1 s backoff; 120 s + 2 s backoff; fails 120 s later.
    assert_eq!(
        sends,
        vec![
            (1, Duration::ZERO),
            (2, Duration::from_secs(121)),
            (3, Duration::from_secs(243))
        ]
    );
    assert_eq!(failed_at, Duration::from_secs(363));
}

#[test]
fn attempt_numbers_continue_from_the_stored_count() {
    let now = Instant::now();
    let mut p = pending(4, 5);
    // A retried conversation that was sent 3 times before it failed.
    p.insert(
        Claimed {
            attempts: 3,
            ..claimed("a")
        },
        now,
    );
    assert_eq!(send_due(&mut p, now), vec![("a".to_string(), 4)]);
    // A late failure for the old attempt 1 cannot fail the new attempt.
    assert_eq!(
        p.ack(failed("a", 1, false), now),
        AckAction::Ignore(Ignored::Stale)
    );
    assert_eq!(
        p.get("a").unwrap().budget_used,
        1,
        "a fresh budget all the same"
    );
}

#[test]
fn a_stream_that_takes_no_sends_only_waits_for_deadlines() {
    let now = Instant::now();
    let mut p = pending(4, 5);
    p.insert(claimed("a"), now);
    p.insert(claimed("b"), now);
    p.mark_sent("a", 1, now);
    assert_eq!(p.next_timer(true), Some(now), "b is due now");
    assert_eq!(
        p.next_timer(false),
        Some(now + ACK_TIMEOUT),
        "a draining stream must not wake up for b, which it will not send"
    );
}

#[test]
fn entries_move_between_windows_with_a_fresh_budget_and_their_attempts() {
    let now = Instant::now();
    let mut from = pending(4, 2);
    let mut to = pending(1, 2);
    for id in ["a", "b", "c"] {
        from.insert(claimed(id), now);
    }
    send_due(&mut from, now); // a, b, c in flight, attempt 1
    from.ack(processed("c", 1), now); // c is settling: it stays

    assert!(
        from.take_movable(10, false).is_empty(),
        "in-flight entries stay while their stream lives"
    );
    let moved = from.take_movable(10, true);
    assert_eq!(moved.len(), 2);
    assert_eq!(from.len(), 1);
    assert!(from.contains("c"));

    let mut moved = moved.into_iter();
    let (id, entry) = moved.next().unwrap();
    to.adopt(id.clone(), entry, now).unwrap();
    let (other, entry) = moved.next().unwrap();
    assert!(
        to.adopt(other, entry, now).is_err(),
        "a full window refuses"
    );

    let entry = to.get(&id).unwrap();
    assert_eq!((entry.attempt, entry.budget_used), (1, 0));
    assert_eq!(to.due(now), vec![id.clone()]);
    assert_eq!(to.mark_sent(&id, 2, now).unwrap().attempt, 2);
    assert_eq!(
        to.ack(processed(&id, 2), now),
        AckAction::Complete {
            generation: 1,
            processed: match processed(&id, 2).outcome {
                Some(ack::Outcome::Processed(p)) => p,
                _ => unreachable!(),
            },
            attempts: 2
        }
    );
}

#[test]
fn take_movable_respects_its_limit() {
    let now = Instant::now();
    let mut p = pending(8, 5);
    for id in ["a", "b", "c", "d"] {
        p.insert(claimed(id), now);
    }
    assert_eq!(p.take_movable(3, false).len(), 3);
    assert_eq!(p.len(), 1);
}

#[test]
fn a_request_too_large_to_send_is_settled_as_a_permanent_failure_never_sent() {
    let now = Instant::now();
    let mut p = pending(4, 3);
    assert!(p.insert(claimed("small"), now));
    assert_eq!(p.refuse_if_larger("small", 1024), None, "it fits");
    let mut big = claimed("big");
    big.segments[0].text = "x".repeat(2_000);
    assert!(p.insert(big, now));
    let Some(AckAction::Fail {
        generation, reason, ..
    }) = p.refuse_if_larger("big", 1024)
    else {
        panic!("expected a permanent failure");
    };
    assert_eq!(generation, 1);
    assert!(reason.contains("--max-message-bytes (1024)"), "{reason}");
    assert_eq!(
        p.due(now),
        ["small".to_string()],
        "the big one is never sent"
    );
    assert_eq!(p.refuse_if_larger("big", 1024), None, "refused once");
}

#[test]
fn a_replay_is_told_apart_from_a_retry_until_the_next_send() {
    let t0 = Instant::now();
    let mut p = pending(4, 3);
    p.insert(claimed("never-sent"), t0);
    p.replay(t0);
    assert!(
        !p.get("never-sent").unwrap().replayed,
        "a first send is not a replay"
    );
    send_due(&mut p, t0);
    p.replay(t0);
    assert!(p.get("never-sent").unwrap().replayed);
    send_due(&mut p, t0);
    assert!(
        !p.get("never-sent").unwrap().replayed,
        "cleared by the send"
    );
    // A retry after an ack deadline is not a replay.
    let later = t0 + ACK_TIMEOUT;
    p.expire(later);
    assert!(!p.get("never-sent").unwrap().replayed);
}

#[test]
fn the_stored_trace_context_rides_on_the_request() {
    let mut p = pending(1, 3);
    let mut traced = claimed("a");
    traced.trace = shared::telemetry::TraceContext::new(
        Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()),
        Some("k=v".into()),
    );
    p.insert(traced, Instant::now());
    let request = &p.get("a").unwrap().request;
    assert_eq!(
        (request.traceparent.as_str(), request.tracestate.as_str()),
        (
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "k=v"
        )
    );
}
