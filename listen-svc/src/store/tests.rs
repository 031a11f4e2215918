//! Conformance tests for [`ConversationStore`]. Each test takes a fresh store from
//! `stores()`, so every implementation runs the same suite.

use super::*;
use std::sync::Arc;
use std::time::Duration;

/// A store under test, and how to reach its data behind its back.
struct Fixture {
    store: Arc<dyn ConversationStore>,
    location: Location,
    _dir: Option<tempfile::TempDir>,
}

impl Fixture {
    /// A new PROCESSING conversation of user "u", unowned: its id.
    async fn queued(&self) -> String {
        self.store
            .submit(new("u", None, Status::Processing, 0), Admission::Always)
            .await
            .unwrap()
            .unwrap()
            .id
    }
}

enum Location {
    Sqlite(std::path::PathBuf),
    Postgres(String),
}

async fn sqlite() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nested/listen.db");
    let store = Arc::new(SqliteStore::open(&path).unwrap());
    Fixture {
        store,
        location: Location::Sqlite(path),
        _dir: Some(dir),
    }
}

/// A fresh database on the test process's throwaway PostgreSQL server.
async fn postgres() -> Fixture {
    let url = ::tests::postgres::fresh_database().await;
    let store = Arc::new(PostgresStore::open(&url).await.unwrap());
    Fixture {
        store,
        location: Location::Postgres(url),
        _dir: None,
    }
}

impl Fixture {
    /// A second store on the same data, as after a restart.
    async fn reopen(&self) -> Arc<dyn ConversationStore> {
        match &self.location {
            Location::Sqlite(path) => Arc::new(SqliteStore::open(path).unwrap()),
            Location::Postgres(url) => Arc::new(PostgresStore::open(url).await.unwrap()),
        }
    }

    /// Runs `sql` (one or more statements, the same on both stores) on the raw database.
    async fn execute(&self, sql: &str) {
        match &self.location {
            Location::Sqlite(path) => {
                rusqlite::Connection::open(path)
                    .unwrap()
                    .execute_batch(sql)
                    .unwrap();
            }
            Location::Postgres(url) => {
                let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
                    .await
                    .unwrap();
                tokio::spawn(connection);
                client.batch_execute(sql).await.unwrap();
            }
        }
    }

    /// Overwrites a row's segments with bytes that do not decode.
    async fn corrupt_segments(&self, id: &str) {
        match &self.location {
            Location::Sqlite(path) => {
                let raw = rusqlite::Connection::open(path).unwrap();
                raw.execute(
                    "UPDATE conversations SET segments = x'ffffffff' WHERE id = ?1",
                    [id],
                )
                .unwrap();
            }
            Location::Postgres(url) => {
                let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
                    .await
                    .unwrap();
                tokio::spawn(connection);
                client
                    .execute(
                        "UPDATE conversations SET segments = '\\xffffffff'::bytea WHERE id = $1",
                        &[&id],
                    )
                    .await
                    .unwrap();
            }
        }
    }

    /// Stores a row's uid as bytes instead of text (on PostgreSQL the column's type changes).
    async fn mistype_uid(&self, id: &str) {
        match &self.location {
            Location::Sqlite(path) => {
                let raw = rusqlite::Connection::open(path).unwrap();
                raw.execute("UPDATE conversations SET uid = x'75' WHERE id = ?1", [id])
                    .unwrap();
            }
            Location::Postgres(url) => {
                let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
                    .await
                    .unwrap();
                tokio::spawn(connection);
                client
                    .batch_execute(
                        "ALTER TABLE conversations ALTER COLUMN uid TYPE bytea \
                         USING convert_to(uid, 'UTF8')",
                    )
                    .await
                    .unwrap();
            }
        }
    }
}

/// Runs each named test against every store implementation.
macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod sqlite_store {
            $( #[tokio::test] async fn $name() { super::$name(super::sqlite().await).await } )*
        }
        mod postgres_store {
            $( #[tokio::test] async fn $name() { super::$name(super::postgres().await).await } )*
        }
    };
}

mod claim_at_submit;
mod fair_queue;

conformance!(
    submit_then_get_round_trips_everything,
    same_idempotency_key_returns_the_same_conversation,
    claim_takes_unowned_processing_rows_oldest_first_and_only_once,
    expired_leases_are_claimed_by_others_and_renewal_prevents_it,
    renewal_covers_only_the_rows_named,
    concurrent_claims_never_take_the_same_row,
    completion_is_idempotent,
    failed_conversations_can_be_retried_once_failed,
    list_pages_newest_first_with_filters,
    concurrent_submits_all_land,
    concurrent_submits_with_one_key_make_one_conversation,
    data_survives_reopening,
    a_failing_operation_does_not_undo_others,
    corrupt_rows_are_reported_not_misread,
    mistyped_columns_are_reported_by_name_not_panicked_on,
    discarded_completions_and_delivery_results_are_stored,
    live_conversation_appends_in_order_and_finishes_to_processing,
    live_conversation_without_text_is_discarded,
    only_unexpired_live_conversations_are_resumable,
    the_stores_own_clock_decides_leases_and_deadlines,
    expired_live_conversations_are_finished_at_their_deadline,
    trace_context_is_stored_and_claimed_with_the_conversation,
    status_counts_are_capped,
);

fn segment(text: &str) -> api::Segment {
    api::Segment {
        text: text.into(),
        speaker: "SPEAKER_0".into(),
        start: 1.5,
        end: 2.25,
        is_user: true,
    }
}

fn new(uid: &str, key: Option<&str>, status: Status, now_ms: i64) -> NewConversation {
    NewConversation {
        id: uuid::Uuid::now_v7().to_string(),
        uid: uid.into(),
        idempotency_key: key.map(String::from),
        language: "en".into(),
        segments: vec![segment("hello there"), segment("second")],
        status,
        priority: Priority::Interactive,
        now_ms,
        trace: Default::default(),
        lease: None,
    }
}

const LEASE: i64 = 30_000;

async fn submit_then_get_round_trips_everything(f: Fixture) {
    let conversation = new("u1", Some("k1"), Status::Processing, 1_000);
    let submitted = f
        .store
        .submit(conversation.clone(), Admission::Always)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        submitted,
        Submitted {
            id: conversation.id.clone(),
            status: Status::Processing,
            created: true,
            claimed: None,
        }
    );
    let got = f.store.get(&conversation.id).await.unwrap().unwrap();
    assert_eq!(got.uid, "u1");
    assert_eq!(got.language, "en");
    assert_eq!(got.segments, conversation.segments);
    assert_eq!(
        (got.created_at_ms, got.finished_at_ms, got.completed_at_ms),
        (1_000, Some(1_000), None)
    );
    assert_eq!(
        (
            got.status,
            got.structured.clone(),
            got.attempts,
            got.last_error.clone()
        ),
        (Status::Processing, None, 0, None)
    );
    assert!(f.store.get("no-such-id").await.unwrap().is_none());
}

async fn same_idempotency_key_returns_the_same_conversation(f: Fixture) {
    let first = f
        .store
        .submit(
            new("u1", Some("k"), Status::Processing, 1),
            Admission::Always,
        )
        .await
        .unwrap()
        .unwrap();
    let again = f
        .store
        .submit(
            new("u1", Some("k"), Status::Processing, 2),
            Admission::Always,
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (again.id.as_str(), again.created),
        (first.id.as_str(), false)
    );
    // Keys are per uid, and no key means always new.
    let other_user = f
        .store
        .submit(
            new("u2", Some("k"), Status::Processing, 3),
            Admission::Always,
        )
        .await
        .unwrap()
        .unwrap();
    assert_ne!(other_user.id, first.id);
    let a = f
        .store
        .submit(new("u1", None, Status::Processing, 4), Admission::Always)
        .await
        .unwrap()
        .unwrap();
    let b = f
        .store
        .submit(new("u1", None, Status::Processing, 5), Admission::Always)
        .await
        .unwrap()
        .unwrap();
    assert!(a.created && b.created && a.id != b.id);
}

async fn claim_takes_unowned_processing_rows_oldest_first_and_only_once(f: Fixture) {
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(
            f.store
                .submit(new("u", None, Status::Processing, i), Admission::Always)
                .await
                .unwrap()
                .unwrap()
                .id,
        );
    }
    f.store
        .submit(new("u", None, Status::Discarded, 9), Admission::Always)
        .await
        .unwrap()
        .unwrap();

    let first = f
        .store
        .claim("a", Now::At(100), LEASE, 3, ClaimOrder::InteractiveFirst)
        .await
        .unwrap();
    assert_eq!(
        first.iter().map(|c| c.id.clone()).collect::<Vec<_>>(),
        ids[..3]
    );
    assert!(first.iter().all(|c| c.generation == 1));
    assert_eq!(
        first[0].segments,
        vec![segment("hello there"), segment("second")]
    );

    let rest = f
        .store
        .claim("b", Now::At(100), LEASE, 10, ClaimOrder::InteractiveFirst)
        .await
        .unwrap();
    assert_eq!(
        rest.iter().map(|c| c.id.clone()).collect::<Vec<_>>(),
        ids[3..],
        "never the discarded one"
    );
    assert!(
        f.store
            .claim("c", Now::At(100), LEASE, 10, ClaimOrder::InteractiveFirst)
            .await
            .unwrap()
            .is_empty()
    );

    // Released rows (restart under the same identity, clean shutdown) are claimable at once.
    assert_eq!(f.store.release("a").await.unwrap(), 3);
    let own = f
        .store
        .claim("a", Now::At(200), LEASE, 10, ClaimOrder::InteractiveFirst)
        .await
        .unwrap();
    assert_eq!(own.len(), 3);
    assert!(
        own.iter().all(|c| c.generation == 2),
        "a re-claim bumps the generation"
    );
}

async fn expired_leases_are_claimed_by_others_and_renewal_prevents_it(f: Fixture) {
    let id = f.queued().await;
    let other = f.queued().await;
    f.store
        .claim("a", Now::At(0), LEASE, 10, ClaimOrder::InteractiveFirst)
        .await
        .unwrap();
    let both = vec![id.clone(), other.clone()];
    // Only the owner renews, and only rows that exist.
    assert_eq!(
        f.store
            .renew("b", both.clone(), Now::At(LEASE), LEASE)
            .await
            .unwrap(),
        0
    );
    let mut named = both.clone();
    named.push(uuid::Uuid::now_v7().to_string());
    assert_eq!(
        f.store
            .renew("a", named, Now::At(LEASE), LEASE)
            .await
            .unwrap(),
        2
    );
    assert!(
        f.store
            .claim(
                "b",
                Now::At(LEASE + 1),
                LEASE - 1,
                10,
                ClaimOrder::InteractiveFirst
            )
            .await
            .unwrap()
            .is_empty(),
        "renewed"
    );

    let taken = f
        .store
        .claim(
            "b",
            Now::At(2 * LEASE + 1),
            LEASE - 1,
            10,
            ClaimOrder::InteractiveFirst,
        )
        .await
        .unwrap();
    assert_eq!(taken.len(), 2);
    // The old owner is fenced off: its outcome does not land, the new owner's does.
    assert!(
        !f.store
            .complete(&id, 1, Completion::default(), 1, 5)
            .await
            .unwrap()
    );
    assert!(!f.store.fail(&other, 1, "late", 1).await.unwrap());
    let generation = taken.iter().find(|c| c.id == id).unwrap().generation;
    assert!(
        f.store
            .complete(&id, generation, Completion::default(), 1, 5)
            .await
            .unwrap()
    );
    assert_eq!(
        f.store.get(&other).await.unwrap().unwrap().status,
        Status::Processing
    );
}

/// The link renews what its windows hold; a row it no longer tracks must not be kept alive
/// by its owner's renewals, or it would stay PROCESSING for as long as the owner lives.
async fn renewal_covers_only_the_rows_named(f: Fixture) {
    let tracked = f.queued().await;
    let forgotten = f.queued().await;
    assert_eq!(
        f.store
            .claim("a", Now::At(0), LEASE, 10, ClaimOrder::InteractiveFirst)
            .await
            .unwrap()
            .len(),
        2
    );
    assert_eq!(
        f.store
            .renew("a", vec![tracked.clone()], Now::At(LEASE), LEASE)
            .await
            .unwrap(),
        1
    );
    let taken = f
        .store
        .claim(
            "b",
            Now::At(LEASE + 1),
            2 * LEASE - 1,
            10,
            ClaimOrder::InteractiveFirst,
        )
        .await
        .unwrap();
    let taken: Vec<&str> = taken.iter().map(|c| c.id.as_str()).collect();
    assert_eq!(taken, vec![forgotten.as_str()]);
}

async fn completion_is_idempotent(f: Fixture) {
    let id = f.queued().await;
    let claimed = f
        .store
        .claim("a", Now::At(0), LEASE, 1, ClaimOrder::InteractiveFirst)
        .await
        .unwrap();
    let structured = api::Structured {
        title: "T".into(),
        overview: "O".into(),
        action_items: vec!["I will".into()],
        category: "work".into(),
    };
    assert!(
        f.store
            .complete(
                &id,
                claimed[0].generation,
                Completion {
                    structured: structured.clone(),
                    ..Default::default()
                },
                2,
                77
            )
            .await
            .unwrap()
    );
    assert!(
        !f.store
            .complete(&id, claimed[0].generation, Completion::default(), 3, 78)
            .await
            .unwrap(),
        "duplicate"
    );
    assert!(
        !f.store
            .fail(&id, claimed[0].generation, "late", 4)
            .await
            .unwrap(),
        "late failure"
    );
    let got = f.store.get(&id).await.unwrap().unwrap();
    assert_eq!(
        (
            got.status,
            got.structured,
            got.attempts,
            got.completed_at_ms
        ),
        (Status::Completed, Some(structured), 2, Some(77))
    );
    assert!(
        f.store
            .claim(
                "b",
                Now::At(i64::MAX - 1),
                1,
                10,
                ClaimOrder::InteractiveFirst
            )
            .await
            .unwrap()
            .is_empty()
    );
}

async fn failed_conversations_can_be_retried_once_failed(f: Fixture) {
    let id = f.queued().await;
    let later = f.queued().await;
    assert_eq!(
        f.store.retry(&id).await.unwrap(),
        RetryOutcome::NotFailed(Status::Processing)
    );
    assert_eq!(f.store.retry("nope").await.unwrap(), RetryOutcome::NotFound);

    let generation = f
        .store
        .claim("a", Now::At(0), LEASE, 1, ClaimOrder::InteractiveFirst)
        .await
        .unwrap()[0]
        .generation;
    assert!(f.store.fail(&id, generation, "poison", 5).await.unwrap());
    let failed = f.store.get(&id).await.unwrap().unwrap();
    assert_eq!(
        (failed.status, failed.last_error.as_deref(), failed.attempts),
        (Status::Failed, Some("poison"), 5)
    );

    let RetryOutcome::Retried(retried) = f.store.retry(&id).await.unwrap() else {
        panic!()
    };
    assert_eq!(
        (retried.status, retried.last_error, retried.attempts),
        (Status::Processing, None, 5)
    );
    // A retried conversation goes to the back of the queue.
    let claimed = f
        .store
        .claim("a", Now::At(1), LEASE - 1, 10, ClaimOrder::InteractiveFirst)
        .await
        .unwrap();
    assert_eq!(
        claimed.iter().map(|c| c.id.clone()).collect::<Vec<_>>(),
        vec![later, id]
    );
    assert_eq!(
        claimed[1].attempts, 5,
        "attempt numbers continue after a retry"
    );
}

async fn list_pages_newest_first_with_filters(f: Fixture) {
    let mut u1 = Vec::new();
    for i in 0..5 {
        u1.push(
            f.store
                .submit(new("u1", None, Status::Processing, i), Admission::Always)
                .await
                .unwrap()
                .unwrap()
                .id,
        );
    }
    let discarded = f
        .store
        .submit(new("u1", None, Status::Discarded, 9), Admission::Always)
        .await
        .unwrap()
        .unwrap()
        .id;
    f.store
        .submit(new("u2", None, Status::Processing, 9), Admission::Always)
        .await
        .unwrap()
        .unwrap();

    let page = |uid: Option<&str>, status, before: Option<String>, limit| ListFilter {
        uid: uid.map(String::from),
        status,
        before_id: before,
        limit,
        with_segments: true,
    };
    let first = f
        .store
        .list(page(Some("u1"), Some(Status::Processing), None, 3))
        .await
        .unwrap();
    let ids: Vec<_> = first.iter().map(|c| c.id.clone()).collect();
    assert_eq!(ids, vec![u1[4].clone(), u1[3].clone(), u1[2].clone()]);
    let second = f
        .store
        .list(page(
            Some("u1"),
            Some(Status::Processing),
            Some(ids[2].clone()),
            3,
        ))
        .await
        .unwrap();
    assert_eq!(
        second.iter().map(|c| c.id.clone()).collect::<Vec<_>>(),
        vec![u1[1].clone(), u1[0].clone()]
    );

    assert_eq!(
        f.store
            .list(page(Some("u1"), None, None, 100))
            .await
            .unwrap()
            .len(),
        6
    );
    assert_eq!(
        f.store
            .list(page(None, Some(Status::Discarded), None, 100))
            .await
            .unwrap()[0]
            .id,
        discarded
    );
    assert_eq!(
        f.store
            .list(page(None, None, None, 100))
            .await
            .unwrap()
            .len(),
        7
    );
    assert_eq!(f.store.count_processing().await.unwrap(), 6);

    // Without segments a page reads none of them, and still says how many there are.
    let full = &first[0];
    assert_eq!(full.segments.len(), 2);
    assert_eq!(full.segment_count, 2);
    let basic = f
        .store
        .list(ListFilter {
            with_segments: false,
            ..page(Some("u1"), Some(Status::Processing), None, 3)
        })
        .await
        .unwrap();
    assert_eq!(basic.len(), 3);
    assert!(basic[0].segments.is_empty());
    assert_eq!(
        Conversation {
            segments: full.segments.clone(),
            ..basic[0].clone()
        },
        *full
    );
}

async fn concurrent_submits_all_land(f: Fixture) {
    let tasks: Vec<_> = (0..300)
        .map(|i| {
            let store = Arc::clone(&f.store);
            tokio::spawn(async move {
                store
                    .submit(
                        new(
                            &format!("u{}", i % 7),
                            Some(&format!("k{i}")),
                            Status::Processing,
                            i,
                        ),
                        Admission::Always,
                    )
                    .await
            })
        })
        .collect();
    for task in tasks {
        assert!(task.await.unwrap().unwrap().unwrap().created);
    }
    assert_eq!(f.store.count_processing().await.unwrap(), 300);
}

async fn data_survives_reopening(f: Fixture) {
    let id = f
        .store
        .submit(
            new("u", Some("k"), Status::Processing, 0),
            Admission::Always,
        )
        .await
        .unwrap()
        .unwrap()
        .id;
    let reopened = f.reopen().await;
    assert_eq!(
        reopened.get(&id).await.unwrap().unwrap().status,
        Status::Processing
    );
    assert!(
        !reopened
            .submit(
                new("u", Some("k"), Status::Processing, 1),
                Admission::Always
            )
            .await
            .unwrap()
            .unwrap()
            .created
    );
}

async fn a_failing_operation_does_not_undo_others(f: Fixture) {
    let mut same_id = new("u", None, Status::Processing, 0);
    f.store
        .submit(same_id.clone(), Admission::Always)
        .await
        .unwrap()
        .unwrap();
    same_id.idempotency_key = Some("different".into());
    // Same primary key: this insert fails, concurrently with good ones.
    let (bad, good) = tokio::join!(
        f.store.submit(same_id, Admission::Always),
        f.store
            .submit(new("u", None, Status::Processing, 0), Admission::Always)
    );
    assert!(matches!(bad, Err(StoreError::Unavailable(_))));
    assert!(good.unwrap().unwrap().created);
    assert_eq!(f.store.count_processing().await.unwrap(), 2);
}

async fn corrupt_rows_are_reported_not_misread(f: Fixture) {
    let id = f.queued().await;
    f.corrupt_segments(&id).await;
    assert!(matches!(
        f.store.get(&id).await,
        Err(StoreError::Corrupt(_))
    ));
}

async fn mistyped_columns_are_reported_by_name_not_panicked_on(f: Fixture) {
    let id = f.queued().await;
    f.mistype_uid(&id).await;
    let names_uid = |result: Result<_, StoreError>| match result {
        Err(StoreError::Corrupt(detail)) => detail.contains("uid"),
        _ => false,
    };
    assert!(names_uid(f.store.get(&id).await.map(|_| ())));
    assert!(names_uid(
        f.store
            .claim("a", Now::At(0), LEASE, 10, ClaimOrder::InteractiveFirst)
            .await
            .map(|_| ())
    ));
}

#[test]
fn newer_schema_is_refused_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.db");
    rusqlite::Connection::open(&path)
        .unwrap()
        .pragma_update(None, "user_version", 99)
        .unwrap();
    let Err(error) = SqliteStore::open(&path) else {
        panic!("opened a newer schema")
    };
    assert!(error.to_string().contains("newer"), "{error}");
}

async fn concurrent_claims_never_take_the_same_row(f: Fixture) {
    for i in 0..200 {
        f.store
            .submit(new("u", None, Status::Processing, i), Admission::Always)
            .await
            .unwrap()
            .unwrap();
    }
    let claims: Vec<_> = (0..8)
        .map(|owner| {
            let store = Arc::clone(&f.store);
            tokio::spawn(async move {
                let mut mine = Vec::new();
                loop {
                    let batch = store
                        .claim(
                            &format!("o{owner}"),
                            Now::At(0),
                            LEASE,
                            7,
                            ClaimOrder::InteractiveFirst,
                        )
                        .await
                        .unwrap();
                    if batch.is_empty() {
                        return mine;
                    }
                    mine.extend(batch.into_iter().map(|c| c.id));
                }
            })
        })
        .collect();
    let mut all = Vec::new();
    for claim in claims {
        all.extend(claim.await.unwrap());
    }
    let unique: std::collections::HashSet<_> = all.iter().collect();
    assert_eq!(
        (all.len(), unique.len()),
        (200, 200),
        "every row claimed exactly once"
    );
}

async fn concurrent_submits_with_one_key_make_one_conversation(f: Fixture) {
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let store = Arc::clone(&f.store);
            tokio::spawn(async move {
                store
                    .submit(
                        new("u", Some("same"), Status::Processing, i),
                        Admission::Always,
                    )
                    .await
                    .unwrap()
                    .unwrap()
            })
        })
        .collect();
    let mut ids = std::collections::HashSet::new();
    let mut created = 0;
    for task in tasks {
        let submitted = task.await.unwrap();
        created += usize::from(submitted.created);
        ids.insert(submitted.id);
    }
    assert_eq!((ids.len(), created), (1, 1));
    assert_eq!(f.store.count_processing().await.unwrap(), 1);
}

#[tokio::test]
async fn postgres_refuses_a_newer_schema_with_a_clear_error() {
    let url = ::tests::postgres::fresh_database().await;
    PostgresStore::open(&url).await.unwrap();
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    client
        .execute("INSERT INTO schema_migrations (version) VALUES (99)", &[])
        .await
        .unwrap();
    let Err(error) = PostgresStore::open(&url).await else {
        panic!("opened a newer schema")
    };
    assert!(error.to_string().contains("newer"), "{error}");
}

#[tokio::test]
async fn postgres_replicas_starting_together_migrate_once() {
    let url = ::tests::postgres::fresh_database().await;
    let opens: Vec<_> = (0..4)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { PostgresStore::open(&url).await.map(|_| ()) })
        })
        .collect();
    for open in opens {
        open.await.unwrap().unwrap();
    }
}

fn live(uid: &str, timeout_ms: i64, now_ms: i64) -> NewLive {
    NewLive {
        id: uuid::Uuid::now_v7().to_string(),
        uid: uid.into(),
        language: "en".into(),
        timeout_ms,
        now: Now::At(now_ms),
        trace: Default::default(),
    }
}

async fn live_conversation_appends_in_order_and_finishes_to_processing(f: Fixture) {
    let conversation = live("u", 10_000, 0);
    let id = conversation.id.clone();
    f.store.start_conversation(conversation).await.unwrap();
    let got = f.store.get(&id).await.unwrap().unwrap();
    assert_eq!(
        (got.status, got.segments.len(), got.finished_at_ms),
        (Status::InProgress, 0, None)
    );

    let first = vec![segment("one"), segment("two")];
    let second = vec![segment("three")];
    assert_eq!(
        f.store
            .append_segments(&id, first, Now::At(100))
            .await
            .unwrap(),
        Some(2)
    );
    assert_eq!(
        f.store
            .append_segments(&id, second, Now::At(200))
            .await
            .unwrap(),
        Some(3)
    );
    let texts: Vec<String> = f
        .store
        .get(&id)
        .await
        .unwrap()
        .unwrap()
        .segments
        .into_iter()
        .map(|s| s.text)
        .collect();
    assert_eq!(texts, ["one", "two", "three"]);
    assert!(
        f.store
            .claim("a", Now::At(0), LEASE, 10, ClaimOrder::InteractiveFirst)
            .await
            .unwrap()
            .is_empty(),
        "in progress is not queued"
    );

    assert_eq!(
        f.store
            .finish(&id, Now::At(300), Admission::Always)
            .await
            .unwrap()
            .unwrap(),
        Some(Status::Processing)
    );
    assert_eq!(
        f.store
            .finish(&id, Now::At(400), Admission::Always)
            .await
            .unwrap()
            .unwrap(),
        None,
        "finishing twice changes nothing"
    );
    assert_eq!(
        f.store
            .append_segments(&id, vec![segment("late")], Now::At(500))
            .await
            .unwrap(),
        None
    );
    let got = f.store.get(&id).await.unwrap().unwrap();
    assert_eq!(
        (got.status, got.segments.len(), got.finished_at_ms),
        (Status::Processing, 3, Some(300))
    );
    let claimed = f
        .store
        .claim("a", Now::At(0), LEASE, 10, ClaimOrder::InteractiveFirst)
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].segments.len(), 3);
}

async fn live_conversation_without_text_is_discarded(f: Fixture) {
    let conversation = live("u", 10_000, 0);
    let id = conversation.id.clone();
    f.store.start_conversation(conversation).await.unwrap();
    f.store
        .append_segments(&id, vec![segment("  ")], Now::At(10))
        .await
        .unwrap();
    assert_eq!(
        f.store
            .finish(&id, Now::At(20), Admission::Always)
            .await
            .unwrap()
            .unwrap(),
        Some(Status::Discarded)
    );
    assert!(
        f.store
            .claim("a", Now::At(0), LEASE, 10, ClaimOrder::InteractiveFirst)
            .await
            .unwrap()
            .is_empty()
    );
}

async fn only_unexpired_live_conversations_are_resumable(f: Fixture) {
    let conversation = live("u", 1_000, 0);
    let id = conversation.id.clone();
    f.store.start_conversation(conversation).await.unwrap();
    f.store
        .append_segments(&id, vec![segment("hi")], Now::At(500))
        .await
        .unwrap();
    let resumable = f
        .store
        .find_resumable("u", Now::At(1_400))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        resumable,
        Resumable {
            id: id.clone(),
            segment_count: 1,
            segment_bytes: encode_segments(&[segment("hi")]).len() as i64,
            remaining_ms: 100
        }
    );
    assert!(
        f.store
            .find_resumable("u", Now::At(1_600))
            .await
            .unwrap()
            .is_none(),
        "past its deadline"
    );
    assert!(
        f.store
            .find_resumable("someone-else", Now::At(1_400))
            .await
            .unwrap()
            .is_none()
    );
    f.store
        .finish(&id, Now::At(1_450), Admission::Always)
        .await
        .unwrap()
        .unwrap();
    assert!(
        f.store
            .find_resumable("u", Now::At(1_460))
            .await
            .unwrap()
            .is_none(),
        "finished"
    );
}

/// What the service does: no time given, the store judges by its own clock (PostgreSQL's,
/// shared by every replica; SQLite's process clock).
async fn the_stores_own_clock_decides_leases_and_deadlines(f: Fixture) {
    let id = f
        .store
        .submit(
            new("u", None, Status::Processing, now_ms()),
            Admission::Always,
        )
        .await
        .unwrap()
        .unwrap()
        .id;
    assert_eq!(
        f.store
            .claim("a", Now::Store, 60_000, 10, ClaimOrder::InteractiveFirst)
            .await
            .unwrap()
            .len(),
        1
    );
    assert!(
        f.store
            .claim("b", Now::Store, 60_000, 10, ClaimOrder::InteractiveFirst)
            .await
            .unwrap()
            .is_empty(),
        "a live lease holds"
    );
    assert_eq!(
        f.store
            .renew("a", vec![id.clone()], Now::Store, 50)
            .await
            .unwrap(),
        1
    );
    // Claimed by "b" once the 50 ms lease has run out by the store's clock.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let taken = loop {
        let taken = f
            .store
            .claim("b", Now::Store, 60_000, 10, ClaimOrder::InteractiveFirst)
            .await
            .unwrap();
        if !taken.is_empty() || std::time::Instant::now() > deadline {
            break taken;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(taken.len(), 1, "a lease runs out by the store's clock");
    assert_eq!(taken[0].id, id);

    let mut conversation = live("talker", 60_000, 0);
    conversation.now = Now::Store;
    let live_id = conversation.id.clone();
    f.store.start_conversation(conversation).await.unwrap();
    f.store
        .append_segments(&live_id, vec![segment("hi")], Now::Store)
        .await
        .unwrap();
    let resumable = f
        .store
        .find_resumable("talker", Now::Store)
        .await
        .unwrap()
        .expect("its deadline is a minute away");
    assert!(
        (55_000..=60_000).contains(&resumable.remaining_ms),
        "{resumable:?}"
    );
    assert!(
        f.store
            .finish_expired(Now::Store, 10)
            .await
            .unwrap()
            .is_empty()
    );
    let created = f.store.get(&live_id).await.unwrap().unwrap().created_at_ms;
    assert!(
        (now_ms() - created).abs() < 60_000,
        "created {created}, now {}",
        now_ms()
    );
}

async fn expired_live_conversations_are_finished_at_their_deadline(f: Fixture) {
    let talk = live("u", 1_000, 0);
    let silent = live("u", 1_000, 0);
    let fresh = live("u", 60_000, 0);
    let (talk_id, silent_id, fresh_id) = (talk.id.clone(), silent.id.clone(), fresh.id.clone());
    for c in [talk, silent, fresh] {
        f.store.start_conversation(c).await.unwrap();
    }
    f.store
        .append_segments(&talk_id, vec![segment("hello")], Now::At(200))
        .await
        .unwrap();
    f.store
        .append_segments(&fresh_id, vec![segment("hello")], Now::At(200))
        .await
        .unwrap();

    let mut finished = f.store.finish_expired(Now::At(5_000), 100).await.unwrap();
    finished.sort_by(|a, b| a.0.cmp(&b.0));
    let mut want = vec![
        (talk_id.clone(), Status::Processing),
        (silent_id.clone(), Status::Discarded),
    ];
    want.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(finished, want);
    assert_eq!(
        f.store.get(&talk_id).await.unwrap().unwrap().finished_at_ms,
        Some(1_200),
        "at its deadline"
    );
    assert_eq!(
        f.store.get(&fresh_id).await.unwrap().unwrap().status,
        Status::InProgress
    );
    assert!(
        f.store
            .finish_expired(Now::At(5_000), 100)
            .await
            .unwrap()
            .is_empty(),
        "each once"
    );
    assert_eq!(
        f.store
            .claim("a", Now::At(0), LEASE, 10, ClaimOrder::InteractiveFirst)
            .await
            .unwrap()
            .len(),
        1
    );
}

async fn discarded_completions_and_delivery_results_are_stored(f: Fixture) {
    let kept = f.queued().await;
    let noise = f.queued().await;
    let claimed = f
        .store
        .claim("a", Now::At(0), LEASE, 10, ClaimOrder::InteractiveFirst)
        .await
        .unwrap();
    let deliveries = vec![
        api::WebhookDelivery {
            url: "http://a/hook".into(),
            delivered: true,
            attempts: 1,
            status_code: 200,
            error: String::new(),
        },
        api::WebhookDelivery {
            url: "http://b/hook".into(),
            delivered: false,
            attempts: 3,
            status_code: 503,
            error: "gave up".into(),
        },
    ];
    let completion = Completion {
        structured: api::Structured {
            title: "T".into(),
            ..Default::default()
        },
        discarded: false,
        deliveries: deliveries.clone(),
    };
    assert!(
        f.store
            .complete(&kept, claimed[0].generation, completion, 1, 10)
            .await
            .unwrap()
    );
    let discard = Completion {
        discarded: true,
        ..Default::default()
    };
    assert!(
        f.store
            .complete(&noise, claimed[1].generation, discard, 1, 10)
            .await
            .unwrap()
    );

    let kept = f.store.get(&kept).await.unwrap().unwrap();
    assert_eq!(
        (kept.status, kept.deliveries),
        (Status::Completed, deliveries)
    );
    let noise = f.store.get(&noise).await.unwrap().unwrap();
    assert_eq!(
        (noise.status, noise.deliveries.len()),
        (Status::Discarded, 0)
    );
}

/// Under sustained writes the WAL is rewound, not grown: before the fix, 30 000 submits left
/// a 540 MiB WAL; the file now stays near its size limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_wal_stays_bounded_under_sustained_writes() {
    let f = sqlite().await;
    let Location::Sqlite(path) = &f.location else {
        unreachable!()
    };
    let wal = path.with_extension("db-wal");
    let text = "x".repeat(2048);
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..32 {
        let (store, text) = (Arc::clone(&f.store), text.clone());
        tasks.spawn(async move {
            for i in 0..250 {
                let mut conversation = new(
                    &format!("u{worker}"),
                    Some(&format!("{worker}-{i}")),
                    Status::Processing,
                    i,
                );
                conversation.segments = vec![segment(&text)];
                store
                    .submit(conversation, Admission::Always)
                    .await
                    .unwrap()
                    .unwrap();
            }
        });
    }
    let mut largest = 0;
    while !tasks.is_empty() {
        tokio::select! {
            done = tasks.join_next() => { done.unwrap().unwrap(); }
            _ = tokio::time::sleep(std::time::Duration::from_millis(50)) => {}
        }
        largest = largest.max(std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0));
    }
    assert_eq!(f.store.count_processing().await.unwrap(), 8_000);
    let mib = largest / (1024 * 1024);
    eprintln!("largest WAL seen: {mib} MiB");
    assert!(mib <= 80, "WAL grew to {mib} MiB");
}

fn trace(span: &str) -> TraceContext {
    TraceContext::new(
        Some(format!("00-4bf92f3577b34da6a3ce929d0e0e4736-{span}-01")),
        Some("k=v".into()),
    )
}

async fn trace_context_is_stored_and_claimed_with_the_conversation(f: Fixture) {
    let mut submitted = new("u", None, Status::Processing, 0);
    submitted.trace = trace("00f067aa0ba902b7");
    let submitted_id = f
        .store
        .submit(submitted, Admission::Always)
        .await
        .unwrap()
        .unwrap()
        .id;
    let mut live = live("u", 10_000, 0);
    live.trace = trace("b7ad6b7169203331");
    let live_id = live.id.clone();
    f.store.start_conversation(live).await.unwrap();
    f.store
        .append_segments(&live_id, vec![segment("hello")], Now::At(1))
        .await
        .unwrap();
    f.store
        .finish(&live_id, Now::At(2), Admission::Always)
        .await
        .unwrap()
        .unwrap();
    let untraced = f.queued().await;

    let claimed = f
        .store
        .claim("me", Now::At(3), LEASE, 10, ClaimOrder::InteractiveFirst)
        .await
        .unwrap();
    let trace_of = |id: &str| claimed.iter().find(|c| c.id == id).unwrap().trace.clone();
    assert_eq!(trace_of(&submitted_id), trace("00f067aa0ba902b7"));
    assert_eq!(trace_of(&live_id), trace("b7ad6b7169203331"));
    assert_eq!(trace_of(&untraced), TraceContext::default());
}

async fn status_counts_are_capped(f: Fixture) {
    for _ in 0..3 {
        f.queued().await;
    }
    f.store
        .submit(new("u", None, Status::Discarded, 0), Admission::Always)
        .await
        .unwrap()
        .unwrap();
    let count = |status, cap| f.store.count_status(status, cap);
    assert_eq!(count(Status::Processing, 10).await.unwrap(), 3);
    assert_eq!(count(Status::Processing, 2).await.unwrap(), 2, "capped");
    assert_eq!(count(Status::Discarded, 10).await.unwrap(), 1);
    assert_eq!(count(Status::Completed, 10).await.unwrap(), 0);
}
