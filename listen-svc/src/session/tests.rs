//! The session registry in-process, on a temporary SQLite store: its bounds, and how it
//! routes a settled conversation's outcome to the session waiting for it.

use super::*;
use crate::store::{Completion, NewConversation, SqliteStore};
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
        sessions: Sessions::new(max_sessions, max_per_uid, Arc::clone(&store)),
        store,
        _dir: dir,
    }
}

/// A conversation of `uid`, submitted and claimed by this test; returns (id, generation).
async fn claimed(store: &dyn ConversationStore, uid: &str) -> (String, i64) {
    let id = uuid::Uuid::now_v7().to_string();
    store
        .submit(NewConversation {
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
            now_ms: now_ms(),
        })
        .await
        .unwrap();
    let rows = store
        .claim("test", now_ms(), now_ms() + 60_000, 1)
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
async fn a_completed_outcome_reaches_the_session_waiting_for_it() {
    let f = fixture(10, 8);
    let (id, generation) = claimed(f.store.as_ref(), "u").await;
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
    let (tx, mut rx) = mpsc::channel(EVENT_BUFFER);
    f.sessions.wait_for(&id, &tx);
    f.sessions.settled(&id);
    let event = rx.recv().await.unwrap().unwrap().event.unwrap();
    let Event::ConversationProcessed(processed) = event else {
        panic!("expected conversation_processed, got {event:?}");
    };
    let conversation = processed.conversation.unwrap();
    assert_eq!(conversation.id, id);
    assert_eq!(conversation.structured.unwrap().title, "Ship the report");
    assert!(!f.sessions.lock().waiting.contains_key(&id), "routed once");
}

#[tokio::test]
async fn a_failed_outcome_carries_its_reason() {
    let f = fixture(10, 8);
    let (id, generation) = claimed(f.store.as_ref(), "u").await;
    assert!(
        f.store
            .fail(&id, generation, "pusher said no", 1)
            .await
            .unwrap()
    );
    let (tx, mut rx) = mpsc::channel(EVENT_BUFFER);
    f.sessions.wait_for(&id, &tx);
    f.sessions.settled(&id);
    let event = rx.recv().await.unwrap().unwrap().event.unwrap();
    assert_eq!(
        event,
        Event::ConversationFailed(ConversationFailed {
            conversation_id: id,
            reason: "pusher said no".into(),
        })
    );
}

#[tokio::test]
async fn outcomes_nobody_waits_for_are_not_routed_and_a_full_buffer_drops_them() {
    let f = fixture(10, 8);
    let (id, generation) = claimed(f.store.as_ref(), "u").await;
    assert!(f.store.fail(&id, generation, "no", 1).await.unwrap());

    // Forgotten (the session ended): nothing is sent.
    let (tx, mut rx) = mpsc::channel(EVENT_BUFFER);
    f.sessions.wait_for(&id, &tx);
    f.sessions.forget(&HashSet::from([id.clone()]));
    f.sessions.settled(&id);
    drop(tx);
    assert!(
        rx.recv().await.is_none(),
        "a forgotten session gets nothing"
    );

    // A session that does not read: the outcome is dropped, the registry never waits.
    let (tx, mut rx) = mpsc::channel(1);
    tx.try_send(Ok(SessionEvent { event: None })).unwrap();
    f.sessions.wait_for(&id, &tx);
    f.sessions.settled(&id);
    drop(tx);
    // The routing task holds the last sender until it gives up; then only the event that
    // filled the buffer is there.
    tokio::time::timeout(Duration::from_secs(10), async {
        while rx.sender_strong_count() > 0 {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the routing task ends without waiting for the reader");
    assert_eq!(rx.len(), 1);
    assert_eq!(rx.recv().await.unwrap().unwrap().event, None);
    assert!(f.sessions.lock().waiting.is_empty());
}
