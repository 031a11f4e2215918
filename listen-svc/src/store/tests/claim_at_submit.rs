//! Conformance tests for claim at submit: a Submit with a lease writes its conversation
//! already claimed when nothing is queued, and otherwise queues it as always.

use super::*;

fn leased(uid: &str, key: Option<&str>, owner: &str) -> NewConversation {
    NewConversation {
        lease: Some(Lease {
            owner: owner.into(),
            lease_ms: LEASE,
        }),
        ..new(uid, key, Status::Processing, 1_000)
    }
}

/// Well after any lease taken now by the store's clock has run out.
fn after_the_lease() -> Now {
    Now::At(now_ms() + LEASE + 60_000)
}

async fn submit(store: &dyn ConversationStore, new: NewConversation) -> Submitted {
    store.submit(new, Admission::Always).await.unwrap().unwrap()
}

async fn queued_total(store: &dyn ConversationStore) -> u64 {
    let stats = store.queue_stats(Now::Store).await.unwrap();
    stats.iter().map(|s| s.queued).sum()
}

async fn assert_counters_match_the_rows(store: &dyn ConversationStore) {
    assert_eq!(
        store.reconcile_queue().await.unwrap(),
        0,
        "the queue's counters drifted from the rows"
    );
}

async fn with_nothing_queued_a_leased_submit_is_written_claimed(f: Fixture) {
    let conversation = leased("u", Some("k"), "a");
    let submitted = submit(f.store.as_ref(), conversation.clone()).await;
    let claimed = submitted.claimed.expect("written claimed");
    assert!(submitted.created);
    assert_eq!(submitted.status, Status::Processing);
    assert_eq!(
        *claimed,
        Claimed {
            id: conversation.id.clone(),
            uid: "u".into(),
            language: "en".into(),
            segments: conversation.segments.clone(),
            finished_at_ms: Some(1_000),
            generation: 1,
            attempts: 0,
            priority: Priority::Interactive,
            waited_ms: Some(0),
            trace: Default::default(),
        }
    );
    assert_eq!(queued_total(f.store.as_ref()).await, 0, "never queued");
    assert_eq!(f.store.count_processing().await.unwrap(), 1);
    assert!(
        f.store
            .claim("b", Now::Store, LEASE, 10, ClaimOrder::InteractiveFirst)
            .await
            .unwrap()
            .is_empty(),
        "leased to a: nobody else claims it"
    );
    // It is renewed and settled like any claimed row, with the generation it was written with.
    assert_eq!(
        f.store
            .renew("a", vec![conversation.id.clone()], Now::Store, LEASE)
            .await
            .unwrap(),
        1
    );
    assert!(
        f.store
            .complete(&conversation.id, 1, Completion::default(), 1, 2_000)
            .await
            .unwrap()
    );
    let got = f.store.get(&conversation.id).await.unwrap().unwrap();
    assert_eq!(got.status, Status::Completed);
    assert_eq!(got.segments, conversation.segments);
    assert_counters_match_the_rows(f.store.as_ref()).await;
}

async fn a_leased_submit_is_queued_behind_anything_that_waits(f: Fixture) {
    // A bulk conversation waits: even an interactive one with a lease goes through the queue.
    let waiting = NewConversation {
        priority: Priority::Bulk,
        ..new("w", None, Status::Processing, 0)
    };
    let waiting = submit(f.store.as_ref(), waiting).await.id;
    let submitted = submit(f.store.as_ref(), leased("u", None, "a")).await;
    assert!(submitted.created);
    assert_eq!(submitted.claimed, None, "queued, not claimed");
    assert_eq!(queued_total(f.store.as_ref()).await, 2);
    assert_counters_match_the_rows(f.store.as_ref()).await;
    let claimed = f
        .store
        .claim("a", Now::Store, LEASE, 10, ClaimOrder::BulkFirst)
        .await
        .unwrap();
    let ids: Vec<&str> = claimed.iter().map(|c| c.id.as_str()).collect();
    assert_eq!(ids, [waiting.as_str(), submitted.id.as_str()]);
    assert!(claimed.iter().all(|c| c.generation == 1));
    assert_eq!(queued_total(f.store.as_ref()).await, 0);
    assert_counters_match_the_rows(f.store.as_ref()).await;
}

async fn a_known_key_with_a_lease_answers_the_stored_one_and_claims_nothing(f: Fixture) {
    let first = submit(f.store.as_ref(), leased("u", Some("k"), "a")).await;
    assert!(first.claimed.is_some());
    let again = submit(f.store.as_ref(), leased("u", Some("k"), "a")).await;
    assert_eq!(
        again,
        Submitted {
            id: first.id.clone(),
            status: Status::Processing,
            created: false,
            claimed: None,
        }
    );
    // Also when the stored one was queued.
    let queued = submit(f.store.as_ref(), new("v", Some("k"), Status::Processing, 0)).await;
    let again = submit(f.store.as_ref(), leased("v", Some("k"), "a")).await;
    assert_eq!(
        (again.id, again.created, again.claimed),
        (queued.id, false, None)
    );
    assert_eq!(f.store.count_processing().await.unwrap(), 2);
    assert_eq!(queued_total(f.store.as_ref()).await, 1);
    assert_counters_match_the_rows(f.store.as_ref()).await;
}

async fn a_lease_taken_at_submit_expires_and_is_fenced_like_a_claimed_one(f: Fixture) {
    let id = submit(f.store.as_ref(), leased("u", None, "a"))
        .await
        .claimed
        .expect("written claimed")
        .id;
    let taken = f
        .store
        .claim(
            "b",
            after_the_lease(),
            LEASE,
            10,
            ClaimOrder::InteractiveFirst,
        )
        .await
        .unwrap();
    assert_eq!(taken.len(), 1, "claimed again once its lease ran out");
    assert_eq!(
        (taken[0].id.as_str(), taken[0].generation),
        (id.as_str(), 2)
    );
    assert_eq!(taken[0].waited_ms, None, "not a first claim");
    assert!(
        !f.store
            .complete(&id, 1, Completion::default(), 1, 2_000)
            .await
            .unwrap(),
        "the fenced-off owner's outcome changes nothing"
    );
    assert!(
        f.store
            .complete(&id, 2, Completion::default(), 2, 2_000)
            .await
            .unwrap()
    );
    assert_counters_match_the_rows(f.store.as_ref()).await;

    // Released (a clean shutdown), it is claimable at once.
    let id = submit(f.store.as_ref(), leased("u", None, "a"))
        .await
        .claimed
        .expect("written claimed")
        .id;
    assert_eq!(f.store.release("a").await.unwrap(), 1);
    let taken = f
        .store
        .claim("b", Now::Store, LEASE, 10, ClaimOrder::InteractiveFirst)
        .await
        .unwrap();
    assert_eq!(
        taken.iter().map(|c| c.id.as_str()).collect::<Vec<_>>(),
        [id.as_str()]
    );
    assert_counters_match_the_rows(f.store.as_ref()).await;
}

conformance!(
    with_nothing_queued_a_leased_submit_is_written_claimed,
    a_leased_submit_is_queued_behind_anything_that_waits,
    a_known_key_with_a_lease_answers_the_stored_one_and_claims_nothing,
    a_lease_taken_at_submit_expires_and_is_fenced_like_a_claimed_one,
);
