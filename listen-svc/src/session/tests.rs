//! The session registry in-process, on a temporary SQLite store: its bounds, how it routes a
//! settled conversation to the session waiting for it, and the outcome event each stored
//! status becomes.

use super::*;
use crate::store::{ClaimOrder, Completion, NewConversation, Priority, SqliteStore, now_ms};
use shared::proto::listen::v1 as api;

struct Fixture {
    sessions: Arc<Sessions>,
    store: Arc<dyn ConversationStore>,
    _dir: tempfile::TempDir,
}

fn fixture(max_sessions: usize, max_per_uid: usize) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn ConversationStore> =
        Arc::new(SqliteStore::open(&dir.path().join("listen.db")).unwrap());
    Fixture {
        sessions: Sessions::new(max_sessions, max_per_uid),
        store,
        _dir: dir,
    }
}

/// A conversation of `uid`, submitted and claimed by this test; returns (id, generation).
async fn claimed(store: &dyn ConversationStore, uid: &str) -> (String, i64) {
    let id = uuid::Uuid::now_v7().to_string();
    store
        .submit(
            NewConversation {
                id: id.clone(),
                uid: uid.into(),
                idempotency_key: None,
                language: String::new(),
                segments: vec![api::Segment {
                    text: "we need to ship the report".into(),
                    end: 1.0,
                    ..Default::default()
                }],
                status: Lifecycle::Processing,
                priority: Priority::Interactive,
                now_ms: now_ms(),
                trace: Default::default(),
                lease: None,
            },
            Admission::Always,
        )
        .await
        .unwrap()
        .unwrap();
    let rows = store
        .claim("test", Now::Store, 60_000, 1, ClaimOrder::InteractiveFirst)
        .await
        .unwrap();
    assert_eq!(rows.len(), 1);
    (id, rows[0].generation)
}

fn exhausted(result: Result<impl Sized, ApiError>) -> String {
    match result {
        Err(ApiError::Exhausted(message)) => message,
        Err(other) => panic!("expected RESOURCE_EXHAUSTED, got {other:?}"),
        Ok(_) => panic!("expected RESOURCE_EXHAUSTED, got a slot"),
    }
}

#[tokio::test]
async fn open_sessions_are_bounded_and_a_dropped_slot_frees_its_place() {
    let f = fixture(2, 8);
    let first = f.sessions.enter().unwrap();
    let _second = f.sessions.enter().unwrap();
    assert!(exhausted(f.sessions.enter()).contains("--max-sessions"));
    drop(first);
    let _third = f.sessions.enter().expect("a freed slot is taken again");
}

#[tokio::test]
async fn sessions_per_uid_are_bounded_per_uid_and_forgotten_at_zero() {
    let f = fixture(10, 2);
    let a1 = f.sessions.enter_uid("a").unwrap();
    let a2 = f.sessions.enter_uid("a").unwrap();
    let message = exhausted(f.sessions.enter_uid("a"));
    assert!(message.starts_with("start.uid"), "{message}");
    assert!(message.contains("--max-sessions-per-uid"), "{message}");
    let _b = f
        .sessions
        .enter_uid("b")
        .expect("another uid has its own bound");
    drop(a1);
    drop(a2);
    assert!(
        !f.sessions.lock().per_uid.contains_key("a"),
        "no entry left at zero"
    );
    let _a = f.sessions.enter_uid("a").unwrap();
}

#[tokio::test]
async fn a_completed_outcome_is_processed_in_the_basic_view() {
    let f = fixture(10, 8);
    let (id, generation) = claimed(f.store.as_ref(), "u").await;
    assert_eq!(
        outcome_event(f.store.as_ref(), &id).await,
        None,
        "still processing"
    );
    let completion = Completion {
        structured: api::Structured {
            title: "Ship the report".into(),
            ..Default::default()
        },
        ..Default::default()
    };
    assert!(
        f.store
            .complete(&id, generation, completion, 1, now_ms())
            .await
            .unwrap()
    );
    let event = outcome_event(f.store.as_ref(), &id).await.unwrap();
    let Event::ConversationProcessed(processed) = event else {
        panic!("expected conversation_processed, got {event:?}");
    };
    let conversation = processed.conversation.unwrap();
    assert_eq!(conversation.id, id);
    assert_eq!(conversation.structured.unwrap().title, "Ship the report");
    assert!(conversation.segments.is_empty(), "the client sent them");
    assert_eq!(conversation.segment_count, 1);
}

#[tokio::test]
async fn failed_and_discarded_outcomes_are_their_own_events() {
    let f = fixture(10, 8);
    let (failed, generation) = claimed(f.store.as_ref(), "u").await;
    assert!(
        f.store
            .fail(&failed, generation, "pusher said no", 1)
            .await
            .unwrap()
    );
    assert_eq!(
        outcome_event(f.store.as_ref(), &failed).await,
        Some(Event::ConversationFailed(ConversationFailed {
            conversation_id: failed.clone(),
            reason: "pusher said no".into(),
        }))
    );
    // The structurer judged it noise: processed, and discarded.
    let (noise, generation) = claimed(f.store.as_ref(), "u").await;
    let discarded = Completion {
        discarded: true,
        ..Default::default()
    };
    assert!(
        f.store
            .complete(&noise, generation, discarded, 1, now_ms())
            .await
            .unwrap()
    );
    assert_eq!(
        outcome_event(f.store.as_ref(), &noise).await,
        Some(Event::ConversationDiscarded(ConversationDiscarded {
            conversation_id: noise,
        }))
    );
    assert_eq!(
        outcome_event(f.store.as_ref(), &uuid::Uuid::now_v7().to_string()).await,
        None
    );
}

#[tokio::test]
async fn a_settled_conversation_is_routed_once_to_the_session_waiting_for_it() {
    let f = fixture(10, 8);
    let (tx, mut rx) = mpsc::channel(OUTCOME_BUFFER);
    f.sessions.wait_for("c1", &tx);
    f.sessions.settled("c1");
    f.sessions.settled("c1");
    assert_eq!(rx.try_recv(), Ok("c1".to_string()));
    assert!(rx.try_recv().is_err(), "routed once");
    assert!(f.sessions.lock().waiting.is_empty());
}

#[tokio::test]
async fn notices_nobody_waits_for_are_not_routed_and_a_full_queue_drops_them() {
    let f = fixture(10, 8);

    // Forgotten (the session ended): nothing is sent.
    let (tx, mut rx) = mpsc::channel(OUTCOME_BUFFER);
    f.sessions.wait_for("c1", &tx);
    f.sessions.forget(&HashSet::from(["c1".to_string()]));
    f.sessions.settled("c1");
    assert!(rx.try_recv().is_err(), "a forgotten session gets nothing");

    // A session that does not read: the notice is dropped, the registry never waits.
    let (tx, mut rx) = mpsc::channel(1);
    tx.try_send("earlier".to_string()).unwrap();
    f.sessions.wait_for("c2", &tx);
    f.sessions.settled("c2");
    assert_eq!(rx.try_recv(), Ok("earlier".to_string()));
    assert!(rx.try_recv().is_err());
    assert!(f.sessions.lock().waiting.is_empty());
}
