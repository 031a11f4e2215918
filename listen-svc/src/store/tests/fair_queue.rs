//! Conformance tests for the queue: fair order across uids, priorities, admission bounds and
//! the counters behind the queue gauges.

use super::*;

conformance!(
    claims_take_turns_between_uids_and_keep_each_uids_order,
    a_new_uid_is_claimed_next_whatever_the_backlog,
    interactive_is_claimed_before_bulk_and_bulk_first_claims_take_bulk,
    admission_bounds_refuse_and_store_nothing_but_answer_existing_keys,
    a_refused_finish_leaves_the_conversation_in_progress_and_its_deadline_admits_it,
    queue_counts_and_waits_follow_first_claims,
    fair_order_survives_reopening,
    a_stale_outcome_does_not_settle_a_retried_conversation,
    counters_are_recomputed_from_the_rows_when_the_store_opens,
);

/// Submits a PROCESSING conversation of `uid` at `priority`, unbounded; its id.
async fn put(store: &dyn ConversationStore, uid: &str, priority: Priority) -> String {
    let mut conversation = new(uid, None, Status::Processing, 0);
    conversation.priority = priority;
    store
        .submit(conversation, Admission::Always)
        .await
        .unwrap()
        .unwrap()
        .id
}

async fn put_many(store: &dyn ConversationStore, uid: &str, n: usize) -> Vec<String> {
    let mut ids = Vec::new();
    for _ in 0..n {
        ids.push(put(store, uid, Priority::Interactive).await);
    }
    ids
}

async fn claim_ids(store: &dyn ConversationStore, limit: usize, order: ClaimOrder) -> Vec<String> {
    store
        .claim("owner", Now::Store, LEASE, limit, order)
        .await
        .unwrap()
        .into_iter()
        .map(|c| c.id)
        .collect()
}

fn bounds(max_queued: u64, max_queued_per_uid: u64) -> Admission {
    Admission::Bounded(QueueBounds {
        max_queued,
        max_queued_per_uid,
    })
}

async fn claims_take_turns_between_uids_and_keep_each_uids_order(f: Fixture) {
    let a = put_many(f.store.as_ref(), "a", 4).await;
    let b = put_many(f.store.as_ref(), "b", 2).await;
    let order = claim_ids(f.store.as_ref(), 10, ClaimOrder::InteractiveFirst).await;
    assert_eq!(
        order,
        [&a[0], &b[0], &a[1], &b[1], &a[2], &a[3]].map(String::clone),
        "uids alternate; each uid in submission order"
    );
}

async fn a_new_uid_is_claimed_next_whatever_the_backlog(f: Fixture) {
    let a = put_many(f.store.as_ref(), "a", 30).await;
    assert_eq!(
        claim_ids(f.store.as_ref(), 3, ClaimOrder::InteractiveFirst).await,
        a[..3]
    );
    let b = put(f.store.as_ref(), "b", Priority::Interactive).await;
    assert_eq!(
        claim_ids(f.store.as_ref(), 1, ClaimOrder::InteractiveFirst).await,
        [b],
        "behind none of a's 27 still queued"
    );
    assert_eq!(
        claim_ids(f.store.as_ref(), 1, ClaimOrder::InteractiveFirst).await,
        [a[3].clone()]
    );
}

async fn interactive_is_claimed_before_bulk_and_bulk_first_claims_take_bulk(f: Fixture) {
    let mut bulk = Vec::new();
    for _ in 0..3 {
        bulk.push(put(f.store.as_ref(), "importer", Priority::Bulk).await);
    }
    let live = put_many(f.store.as_ref(), "person", 2).await;
    assert_eq!(
        claim_ids(f.store.as_ref(), 2, ClaimOrder::InteractiveFirst).await,
        live
    );
    let later = put(f.store.as_ref(), "person", Priority::Interactive).await;
    assert_eq!(
        claim_ids(f.store.as_ref(), 1, ClaimOrder::BulkFirst).await,
        [bulk[0].clone()],
        "a bulk-first claim takes bulk work although interactive work waits"
    );
    assert_eq!(
        claim_ids(f.store.as_ref(), 10, ClaimOrder::BulkFirst).await,
        [&bulk[1], &bulk[2], &later].map(String::clone),
        "then interactive work fills the rest of the claim"
    );
    assert!(
        claim_ids(f.store.as_ref(), 10, ClaimOrder::InteractiveFirst)
            .await
            .is_empty()
    );
}

async fn admission_bounds_refuse_and_store_nothing_but_answer_existing_keys(f: Fixture) {
    let limits = bounds(3, 2);
    let submit = |uid: &str, key: &str| {
        let store = Arc::clone(&f.store);
        let conversation = new(uid, Some(key), Status::Processing, 0);
        async move { store.submit(conversation, limits).await.unwrap() }
    };
    let first = submit("a", "k0").await.unwrap();
    submit("a", "k1").await.unwrap();
    assert_eq!(
        submit("a", "k2").await.unwrap_err(),
        QueueFull::Uid {
            uid: "a".into(),
            limit: 2
        }
    );
    let again = submit("a", "k0").await.unwrap();
    assert_eq!(
        (again.id, again.created),
        (first.id.clone(), false),
        "an existing key is answered over the bound"
    );
    // Nothing to queue: never refused.
    let empty = f
        .store
        .submit(new("a", Some("empty"), Status::Discarded, 0), limits)
        .await
        .unwrap()
        .unwrap();
    assert!(empty.created);
    submit("b", "k0").await.unwrap();
    assert_eq!(
        submit("c", "k0").await.unwrap_err(),
        QueueFull::Total { limit: 3 }
    );
    assert_eq!(
        f.store.count_processing().await.unwrap(),
        3,
        "nothing stored"
    );
    let stats = f.store.queue_stats(Now::Store).await.unwrap();
    assert_eq!(stats[0].queued, 3);

    // A claim makes room.
    assert_eq!(
        claim_ids(f.store.as_ref(), 1, ClaimOrder::InteractiveFirst).await,
        [first.id]
    );
    submit("c", "k0").await.unwrap();
    assert_eq!(f.store.queue_stats(Now::Store).await.unwrap()[0].queued, 3);
    assert_counters_match_the_rows(f.store.as_ref()).await;
}

async fn a_refused_finish_leaves_the_conversation_in_progress_and_its_deadline_admits_it(
    f: Fixture,
) {
    put(f.store.as_ref(), "a", Priority::Interactive).await;
    let conversation = live("a", 1_000, 0);
    let live_id = conversation.id.clone();
    f.store.start_conversation(conversation).await.unwrap();
    f.store
        .append_segments(&live_id, vec![segment("words")], Now::At(0))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        f.store
            .finish(&live_id, Now::At(10), bounds(100, 1))
            .await
            .unwrap(),
        Err(QueueFull::Uid {
            uid: "a".into(),
            limit: 1
        })
    );
    let kept = f.store.get(&live_id).await.unwrap().unwrap();
    assert_eq!((kept.status, kept.segment_count), (Status::InProgress, 1));
    assert_eq!(
        f.store
            .find_resumable("a", Now::At(10))
            .await
            .unwrap()
            .map(|r| r.id),
        Some(live_id.clone()),
        "a new session resumes it"
    );
    // Past its deadline the sweeper finishes it whatever the bounds.
    let swept = f.store.finish_expired(Now::At(5_000), 10).await.unwrap();
    assert_eq!(swept, [(live_id, Status::Processing)]);
    assert_eq!(f.store.queue_stats(Now::Store).await.unwrap()[0].queued, 2);
    assert_counters_match_the_rows(f.store.as_ref()).await;
}

async fn queue_counts_and_waits_follow_first_claims(f: Fixture) {
    put_many(f.store.as_ref(), "a", 2).await;
    put(f.store.as_ref(), "b", Priority::Bulk).await;
    let stats = f.store.queue_stats(Now::Store).await.unwrap();
    assert_eq!((stats[0].queued, stats[1].queued), (2, 1));
    assert!(stats[0].oldest_age_ms >= 0 && stats[0].oldest_age_ms < 60_000);

    let first = f
        .store
        .claim("a", Now::Store, LEASE, 10, ClaimOrder::InteractiveFirst)
        .await
        .unwrap();
    assert_eq!(first.len(), 3);
    assert!(first.iter().all(|c| c.waited_ms.is_some_and(|ms| ms >= 0)));
    assert_eq!(
        first.iter().map(|c| c.priority).collect::<Vec<_>>(),
        [Priority::Interactive, Priority::Interactive, Priority::Bulk]
    );
    assert_eq!(
        f.store.queue_stats(Now::Store).await.unwrap(),
        [QueueStats::default(); 2],
        "nothing waits: counts and ages are 0"
    );

    // Claimed again after a release: not a first claim, not counted again.
    f.store.release("a").await.unwrap();
    let again = f
        .store
        .claim("b", Now::Store, LEASE, 10, ClaimOrder::InteractiveFirst)
        .await
        .unwrap();
    assert_eq!(again.len(), 3);
    assert!(again.iter().all(|c| c.waited_ms.is_none()));
    assert_eq!(f.store.queue_stats(Now::Store).await.unwrap()[0].queued, 0);

    // A retried conversation waits again.
    let failed = &again[0];
    assert!(
        f.store
            .fail(&failed.id, failed.generation, "no", 1)
            .await
            .unwrap()
    );
    f.store.retry(&failed.id).await.unwrap();
    assert_eq!(f.store.queue_stats(Now::Store).await.unwrap()[0].queued, 1);
    let retried = f
        .store
        .claim("b", Now::Store, LEASE, 10, ClaimOrder::InteractiveFirst)
        .await
        .unwrap();
    assert_eq!(retried.len(), 1);
    assert!(retried[0].waited_ms.is_some());
    assert_counters_match_the_rows(f.store.as_ref()).await;
}

async fn fair_order_survives_reopening(f: Fixture) {
    let a = put_many(f.store.as_ref(), "a", 10).await;
    assert_eq!(
        claim_ids(f.store.as_ref(), 4, ClaimOrder::InteractiveFirst).await,
        a[..4]
    );
    let reopened = f.reopen().await;
    let b = put(reopened.as_ref(), "b", Priority::Interactive).await;
    assert_eq!(
        claim_ids(reopened.as_ref(), 2, ClaimOrder::InteractiveFirst).await,
        [b, a[4].clone()]
    );
    assert_eq!(reopened.queue_stats(Now::Store).await.unwrap()[0].queued, 5);
}

/// The counters equal what the rows say: recomputing them corrects nothing.
async fn assert_counters_match_the_rows(store: &dyn ConversationStore) {
    assert_eq!(
        store.reconcile_queue().await.unwrap(),
        0,
        "the queue's counters drifted from the rows"
    );
}

async fn a_stale_outcome_does_not_settle_a_retried_conversation(f: Fixture) {
    let id = put(f.store.as_ref(), "a", Priority::Interactive).await;
    let first = f
        .store
        .claim("a", Now::Store, LEASE, 1, ClaimOrder::InteractiveFirst)
        .await
        .unwrap()
        .remove(0);
    assert!(f.store.fail(&id, first.generation, "no", 1).await.unwrap());
    f.store.retry(&id).await.unwrap();

    // The first attempt's outcome, arriving again (a re-sent Ack, a settle retried after
    // its commit was lost), is fenced off: the retried conversation waits for its own run.
    let stale = Completion {
        structured: Default::default(),
        discarded: false,
        deliveries: vec![],
    };
    assert!(
        !f.store
            .complete(&id, first.generation, stale, 1, 0)
            .await
            .unwrap()
    );
    assert!(
        !f.store
            .fail(&id, first.generation, "late", 1)
            .await
            .unwrap()
    );
    assert_eq!(
        f.store.get(&id).await.unwrap().unwrap().status,
        Status::Processing
    );
    assert_eq!(f.store.queue_stats(Now::Store).await.unwrap()[0].queued, 1);
    assert_counters_match_the_rows(f.store.as_ref()).await;

    let second = f
        .store
        .claim("a", Now::Store, LEASE, 1, ClaimOrder::InteractiveFirst)
        .await
        .unwrap()
        .remove(0);
    assert!(second.generation > first.generation);
    assert_counters_match_the_rows(f.store.as_ref()).await;
}

async fn counters_are_recomputed_from_the_rows_when_the_store_opens(f: Fixture) {
    put_many(f.store.as_ref(), "a", 3).await;
    put(f.store.as_ref(), "b", Priority::Bulk).await;
    assert_counters_match_the_rows(f.store.as_ref()).await;
    // What a listen-svc older than the counters leaves behind in a rolling upgrade: counts
    // that miss rows and count rows gone, a claimed row still marked waiting, a uid without
    // its row and a row without its uid.
    f.execute(
        "UPDATE queue_priorities SET queued = queued + 7 WHERE priority = 0; \
         UPDATE queue_priorities SET queued = 0 WHERE priority = 1; \
         DELETE FROM queue_uids WHERE uid = 'b'; \
         INSERT INTO queue_uids (uid, priority, queued, finish) VALUES ('gone', 0, 5, 9); \
         UPDATE conversations SET owner = 'old' WHERE id = \
             (SELECT id FROM conversations WHERE uid = 'a' ORDER BY queue_seq LIMIT 1)",
    )
    .await;

    let store = f.reopen().await;
    let stats = store.queue_stats(Now::Store).await.unwrap();
    assert_eq!((stats[0].queued, stats[1].queued), (2, 1));
    assert_counters_match_the_rows(store.as_ref()).await;
    // Admission reads the corrected counts: uid a has 2 waiting, b 1.
    assert!(
        store
            .submit(new("a", None, Status::Processing, 0), bounds(100, 3))
            .await
            .unwrap()
            .is_ok()
    );
    assert!(
        store
            .submit(new("a", None, Status::Processing, 0), bounds(100, 3))
            .await
            .unwrap()
            .is_err()
    );
    assert!(
        store
            .submit(new("b", None, Status::Processing, 0), bounds(5, 2))
            .await
            .unwrap()
            .is_ok()
    );
    assert!(
        store
            .submit(new("c", None, Status::Processing, 0), bounds(5, 2))
            .await
            .unwrap()
            .is_err(),
        "5 waiting in all"
    );
}
